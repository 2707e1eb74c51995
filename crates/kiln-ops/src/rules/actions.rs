//! What the actions do, against the store, as the rule's tenant: every
//! look-up and change carries the tenant, so a rule can name only its own
//! tenant's jobs, queues, incidents, subscriptions, pipelines and VMs
//! (another's are "not found"), and only the deployment's rules drain
//! nodes.

use std::collections::BTreeMap;

use kiln_core::{JobKinds, JobStatus, NewJob};
use kiln_db::events::{Event, EventQuery};
use kiln_db::flow::{FlowError, NewRun};
use kiln_db::{Db, JobFilter, QueueInfo, RetryOutcome};
use kiln_worker::now_millis;
use serde_json::{json, Value};

use super::{id_of, Action};
use crate::DEPLOYMENT_TENANT;

/// What one action is done with.
pub struct Actor<'a> {
    pub db: &'a Db,
    pub kinds: &'a JobKinds,
    pub tenant: &'a str,
    pub rule: &'a str,
    pub event: &'a Event,
}

/// An action's outcome: what it did, or why it could not.
pub type Outcome = Result<Value, String>;

fn db_error(error: kiln_db::DbError) -> String {
    format!("the store failed: {error}")
}

impl Actor<'_> {
    /// An idempotency key for the `index`th action of this rule on this
    /// event: a second engine, or this one after a crash, makes no second
    /// job or run. `kiln:` keys are refused at the API, so no tenant can
    /// take one first.
    fn key(&self, index: usize, part: &str) -> String {
        format!("kiln:rule:{}:{}:{index}{part}", self.rule, self.event.id)
    }

    pub async fn run(&self, index: usize, action: &Action) -> Outcome {
        let now = now_millis();
        let db = self.db;
        let tenant = self.tenant;
        match action {
            Action::RetryJob { job } => {
                let id = id_of(job).ok_or("not a job id")?;
                match db.job_retry(tenant, id, now).await.map_err(db_error)? {
                    RetryOutcome::Requeued(_) => Ok(json!({"job": id.to_string()})),
                    RetryOutcome::NotFound => Err(format!("job {id} not found")),
                    RetryOutcome::NotRetryable(job) => Err(format!(
                        "job {id} is {}; only failed, dead or cancelled jobs are retried",
                        job.status.as_str()
                    )),
                }
            }
            Action::RetryDeadJobs {
                queue,
                kind,
                label,
                limit,
            } => {
                let filter = JobFilter {
                    status: Some(JobStatus::Dead),
                    kind: kind.clone(),
                    queue: queue.clone(),
                    label: label
                        .as_ref()
                        .and_then(|l| l.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string())),
                    limit: *limit,
                    ..Default::default()
                };
                let dead = db.job_list(tenant, &filter).await.map_err(db_error)?;
                let mut retried = Vec::new();
                for job in &dead {
                    if let RetryOutcome::Requeued(_) =
                        db.job_retry(tenant, job.id, now).await.map_err(db_error)?
                    {
                        retried.push(job.id.to_string());
                    }
                }
                Ok(json!({"retried": retried.len(), "jobs": retried}))
            }
            Action::PauseQueue { queue } => self.set_queue(queue, Some(true), None).await,
            Action::ResumeQueue { queue } => self.set_queue(queue, Some(false), None).await,
            Action::SetQueueLimit { queue, limit } => {
                self.set_queue(queue, None, Some(*limit)).await
            }
            Action::DrainNode { node } => {
                if tenant != DEPLOYMENT_TENANT {
                    return Err("drain_node is for the deployment's own rules".into());
                }
                match crate::drain(db, node).await.map_err(db_error)? {
                    Some(_) => Ok(json!({"node": node})),
                    None => Err(format!("node {node} not found")),
                }
            }
            Action::RestartVm { vm } => self.restart_vm(index, vm).await,
            Action::RunJob { job } => {
                let mut new = NewJob::new(tenant, &job.kind, job.spec.clone());
                new.queue = job.queue.clone().unwrap_or_else(|| "default".into());
                if let Some(n) = job.max_attempts {
                    new.max_attempts = n;
                }
                if let Some(ms) = job.timeout_ms {
                    new.timeout_ms = ms;
                }
                new.labels = job.labels.clone();
                new.labels.insert("rule".to_string(), self.rule.to_string());
                new.idempotency_key = Some(self.key(index, ""));
                new.validate().map_err(|e| e.to_string())?;
                self.kinds
                    .check(&new.kind, &new.spec)
                    .map_err(|e| kiln_core::names::sanitise_message(&e.to_string(), 512))?;
                // The tenant's admission policies judge a rule's job as
                // they judge one submitted through the API.
                let policies = db.policy_set(tenant).await.map_err(db_error)?;
                if !policies.is_empty() {
                    let subject = kiln_flow::policy::Subject::of_job(
                        &new,
                        self.kinds.describe(&new.kind, &new.spec),
                    );
                    policies
                        .admit(&subject)
                        .map_err(|denial| format!("policy_denied: {denial}"))?;
                }
                // A command for a VM of one host of many goes to that host.
                new.kind = self.kinds.stored_kind(&new.kind, &new.spec);
                if new.kind == "wasm" {
                    let module = new.spec.get("module").and_then(Value::as_str).unwrap_or("");
                    if db
                        .module_get(tenant, module)
                        .await
                        .map_err(db_error)?
                        .is_none()
                    {
                        return Err(format!("module {module} is not stored"));
                    }
                }
                let (job, _) = db.job_insert(&new, now).await.map_err(db_error)?;
                Ok(json!({"job": job.id.to_string()}))
            }
            Action::RunPipeline { pipeline, params } => {
                let new = NewRun {
                    tenant: tenant.to_string(),
                    pipeline: pipeline.clone(),
                    params: params.clone(),
                    labels: BTreeMap::from([("rule".to_string(), self.rule.to_string())]),
                    idempotency_key: Some(self.key(index, "")),
                    trigger: format!("rule:{}", self.rule),
                };
                match db
                    .run_create(&new, self.kinds, now)
                    .await
                    .map_err(db_error)?
                {
                    Ok((run, _)) => Ok(json!({"run": run.run.id.to_string()})),
                    Err(FlowError::NotFound(what)) => Err(format!("{what} not found")),
                    Err(FlowError::Conflict(m) | FlowError::Invalid(m)) => Err(m),
                    Err(FlowError::Denied { message, .. }) => Err(message),
                }
            }
            Action::ResolveIncident { incident, notes } => {
                let id = match incident {
                    Some(id) => id_of(id),
                    None if self.event.resource.kind == "incident" => {
                        id_of(&self.event.resource.id)
                    }
                    None => None,
                }
                .ok_or("no incident: the event is not an incident's, and none is named")?;
                let notes = format!("[rule {}] {}", self.rule, notes.as_deref().unwrap_or(""));
                match db
                    .incident_set(tenant, id, "resolved", Some(notes.trim_end()), now)
                    .await
                    .map_err(db_error)?
                {
                    Some(true) => Ok(json!({"incident": id.to_string()})),
                    Some(false) => Err(format!("incident {id} is already resolved")),
                    None => Err(format!("incident {id} not found")),
                }
            }
            Action::Notify { subscription } => {
                let Some(found) = db
                    .subscription_get(tenant, subscription)
                    .await
                    .map_err(db_error)?
                else {
                    return Err(format!("subscription {subscription} not found"));
                };
                let mut job = kiln_events::notify::delivery_job(&found, self.event);
                job.idempotency_key = Some(self.key(index, ""));
                let (job, _) = db.job_insert(&job, now).await.map_err(db_error)?;
                Ok(json!({"delivery": job.id.to_string()}))
            }
        }
    }

    async fn set_queue(
        &self,
        queue: &str,
        paused: Option<bool>,
        limit: Option<Option<i32>>,
    ) -> Outcome {
        let current = self
            .db
            .queue_get(self.tenant, queue)
            .await
            .map_err(db_error)?;
        let wanted = QueueInfo {
            paused: paused.unwrap_or(current.paused),
            concurrency_limit: limit.unwrap_or(current.concurrency_limit),
            ..current
        };
        let set = self
            .db
            .queue_upsert(&wanted, now_millis())
            .await
            .map_err(db_error)?;
        Ok(
            json!({"queue": queue, "paused": set.paused, "concurrency_limit": set.concurrency_limit}),
        )
    }

    /// The VM's shape comes from its `vm.created` event: its host holds it
    /// in memory, so the restart goes through jobs any VM worker can run.
    async fn restart_vm(&self, index: usize, vm: &str) -> Outcome {
        let types = vec!["vm.created".to_string()];
        let created = self
            .db
            .event_read(&EventQuery {
                tenant: Some(self.tenant),
                types: &types,
                resource: Some(("vm", vm)),
                after: 0,
                limit: 1,
            })
            .await
            .map_err(db_error)?;
        let Some(created) = created.first() else {
            return Err(format!("vm {vm} not found"));
        };
        let shape = |key: &str| created.data.get(key).cloned().unwrap_or(Value::Null);
        let mut delete = NewJob::new(self.tenant, "vm:delete", json!({"vm_id": vm}));
        delete.idempotency_key = Some(self.key(index, ":delete"));
        delete.max_attempts = 1;
        let mut create = NewJob::new(
            self.tenant,
            "vm:create",
            json!({"image": shape("image"), "vcpus": shape("vcpus"),
                   "memory_mib": shape("memory_mib"), "labels": created.labels}),
        );
        create.idempotency_key = Some(self.key(index, ":create"));
        for job in [&delete, &create] {
            self.kinds
                .check(&job.kind, &job.spec)
                .map_err(|e| kiln_core::names::sanitise_message(&e.to_string(), 512))?;
        }
        delete.kind = self.kinds.stored_kind(&delete.kind, &delete.spec);
        let now = now_millis();
        let (deleting, _) = self.db.job_insert(&delete, now).await.map_err(db_error)?;
        let (creating, _) = self.db.job_insert(&create, now).await.map_err(db_error)?;
        Ok(json!({"delete_job": deleting.id.to_string(), "create_job": creating.id.to_string()}))
    }
}
