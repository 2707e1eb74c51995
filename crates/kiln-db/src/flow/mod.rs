//! Pipelines in the store. A run advances in transactions of its own,
//! driven by `flow_outbox`: a trigger on `jobs` writes a row there in the
//! very transaction that records a step job's end, and [`Db::flow_advance`]
//! consumes rows in the transaction that moves the run on (step states,
//! instances, the next steps' jobs). A crash before that commit leaves the
//! outbox row for the next advancer; a crash after it leaves nothing to redo.
//! The run's row is locked first in every transaction that changes it, so
//! advancers, cancels, retries and approvals of one run never interleave.
//!
//! The rules themselves are `kiln_flow`'s pure functions; this module loads
//! state, calls them and writes what they decided, through [`FlowTx`], the
//! handful of statements each driver implements.

pub(crate) mod pg;
mod rows;
mod schedules;
mod sqlite;

pub(crate) use rows::*;
pub use schedules::{FireRecord, ScheduleRecord};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use kiln_core::files::{FileInput, JobFiles};
use kiln_core::{JobKinds, JobStatus, Millis, NewJob, SpecError};
use kiln_flow::advance::{self, Mode, RunStatus, StepState, StepStatus};
use kiln_flow::def::{Checked, PipelineDef, StepDef};
use kiln_flow::policy::{PolicySet, Subject};
use kiln_flow::template;
use serde::Serialize;
use serde_json::{json, Value};

use crate::audit::note::Change;
use crate::{Db, DbError, DbResult};

macro_rules! dispatch_flow {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Db::Sqlite($store) => $call,
            Db::Postgres($store) => $call,
        }
    };
}
pub(crate) use dispatch_flow;

/// Most stdout kept per instance for dependants' templates.
pub const INSTANCE_STDOUT_MAX: usize = 256 * 1024;
/// Largest rendered spec of a step job.
pub const RENDERED_SPEC_MAX: usize = 1024 * 1024;
/// Outbox rows one advance transaction takes.
const OUTBOX_BATCH: i64 = 2_000;

/// One version of a pipeline as stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PipelineRecord {
    pub name: String,
    pub version: i32,
    pub definition: Value,
    pub created_at: Millis,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunRecord {
    pub id: i64,
    #[serde(skip)]
    pub tenant: String,
    pub pipeline: String,
    pub version: i32,
    pub status: RunStatus,
    #[serde(skip)]
    pub mode: RunMode,
    pub params: Value,
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub trigger: String,
    /// Bumped by each retry of the run; part of every step job's unique key.
    pub attempt: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
}

/// The stored form of [`Mode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RunMode {
    #[default]
    Normal,
    Stopping,
    Cancelling,
}

impl RunMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RunMode::Normal => "normal",
            RunMode::Stopping => "stopping",
            RunMode::Cancelling => "cancelling",
        }
    }

    pub fn parse(text: &str) -> RunMode {
        match text {
            "stopping" => RunMode::Stopping,
            "cancelling" => RunMode::Cancelling,
            _ => RunMode::Normal,
        }
    }

    fn mode(self) -> Mode {
        match self {
            RunMode::Normal => Mode::Normal,
            RunMode::Stopping => Mode::Stopping,
            RunMode::Cancelling => Mode::Cancelling,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepRecord {
    pub step: String,
    pub status: StepStatus,
    pub total: i32,
    pub succeeded: i32,
    pub failed: i32,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<Millis>,
    /// A gate's condition and values, an approval's decision, an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

impl StepRecord {
    fn pending(step: &str) -> StepRecord {
        StepRecord {
            step: step.to_string(),
            status: StepStatus::Pending,
            total: 0,
            succeeded: 0,
            failed: 0,
            started_at: None,
            finished_at: None,
            deadline_at: None,
            detail: None,
        }
    }

    fn state(&self) -> StepState {
        StepState {
            status: self.status,
            total: self.total.max(0) as u32,
            succeeded: self.succeeded.max(0) as u32,
            failed: self.failed.max(0) as u32,
        }
    }

    fn set_state(&mut self, state: StepState) {
        self.status = state.status;
        self.total = state.total as i32;
        self.succeeded = state.succeeded as i32;
        self.failed = state.failed as i32;
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceRecord {
    pub step: String,
    pub index: i32,
    /// The run attempt that made its current job.
    pub attempt: i32,
    pub job_id: Option<i64>,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip)]
    pub stdout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
}

/// A step job's end as the jobs table has it.
#[derive(Clone, Debug)]
pub struct JobEnd {
    pub job_id: i64,
    pub status: JobStatus,
    pub exit_code: Option<i32>,
    pub stdout: Option<String>,
    pub error: Option<String>,
    pub finished_at: Option<Millis>,
}

/// A file a run's step kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunFile {
    /// Its place under the run: `<step>/<path>`, or `<step>/<index>/<path>`
    /// for an instance of a fanned-out step (where dependants find it too).
    pub name: String,
    pub step: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<i32>,
    pub path: String,
    pub size: u64,
    pub digest: String,
    pub job_id: i64,
}

/// A run with everything about it, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RunView {
    #[serde(flatten)]
    pub run: RunRecord,
    pub steps: Vec<StepView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepView {
    #[serde(flatten)]
    pub step: StepRecord,
    pub instances: Vec<InstanceRecord>,
}

#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    pub pipeline: Option<String>,
    pub status: Option<RunStatus>,
    pub label: Option<(String, String)>,
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// What a new run asks for.
#[derive(Clone, Debug)]
pub struct NewRun {
    pub tenant: String,
    pub pipeline: String,
    pub params: serde_json::Map<String, Value>,
    pub labels: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    pub trigger: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum FlowError {
    NotFound(&'static str),
    /// The request does not fit the run's state (cancel a finished run, …).
    Conflict(String),
    /// The params or the definition were refused.
    Invalid(String),
    /// An admission policy refused a step job the run would start.
    Denied {
        policy: String,
        message: String,
    },
}

/// The outcome of a flow call: the store failed, or the request was refused.
pub type FlowResult<T> = Result<Result<T, FlowError>, DbError>;

/// A run's row as a driver reads it.
pub(crate) struct NewRunRow<'a> {
    pub tenant: &'a str,
    pub pipeline: &'a str,
    pub version: i32,
    pub status: RunStatus,
    pub params: String,
    pub labels: String,
    pub idempotency_key: Option<&'a str>,
    pub trigger: &'a str,
    pub now: Millis,
}

/// Commits `tx` with the request's audit record in it (see
/// `crate::audit::note`): the change and its record are one.
pub(crate) async fn commit_audited(
    mut tx: Box<dyn FlowTx>,
    change: Change,
    resource: Option<&str>,
) -> DbResult<()> {
    let record = crate::audit::note::claim(change, resource);
    let claimed = record.is_some();
    let result = async move {
        if let Some(record) = &record {
            tx.audit_insert(record).await?;
        }
        tx.commit().await
    }
    .await;
    if result.is_err() && claimed {
        crate::audit::note::unclaim();
    }
    result
}

/// The statements the flow engine needs inside one transaction; each driver
/// implements them.
#[async_trait::async_trait]
pub(crate) trait FlowTx: Send {
    /// Writes an audit record in this transaction.
    async fn audit_insert(&mut self, record: &kiln_core::audit::AuditRecord) -> DbResult<()>;
    /// The tenant's policy version (0: never had a policy).
    async fn policy_version(&mut self, tenant: &str) -> DbResult<i64>;
    async fn policy_rows(&mut self, tenant: &str) -> DbResult<Vec<crate::policies::PolicyRow>>;
    async fn lock_run(&mut self, id: i64) -> DbResult<Option<RunRecord>>;
    async fn get_run(&mut self, tenant: &str, id: i64) -> DbResult<Option<RunRecord>>;
    async fn insert_run(&mut self, run: &NewRunRow<'_>) -> DbResult<Option<i64>>;
    async fn run_by_key(
        &mut self,
        tenant: &str,
        pipeline: &str,
        key: &str,
    ) -> DbResult<Option<i64>>;
    async fn update_run(&mut self, run: &RunRecord) -> DbResult<()>;
    /// Runs of this pipeline running now, and the oldest queued one.
    async fn active_runs(&mut self, tenant: &str, pipeline: &str) -> DbResult<(i64, Option<i64>)>;
    async fn steps(&mut self, run_id: i64) -> DbResult<Vec<StepRecord>>;
    async fn steps_named(&mut self, run_id: i64, names: &[String]) -> DbResult<Vec<StepRecord>>;
    /// Steps of the run that have ended, and how many of those failed or
    /// were cancelled.
    async fn step_counts(&mut self, run_id: i64) -> DbResult<(i64, i64)>;
    async fn put_steps(&mut self, run_id: i64, steps: &[&StepRecord]) -> DbResult<()>;
    /// [`FlowTx::put_instances`] and [`FlowTx::put_steps`] in one trip.
    async fn put_rows(
        &mut self,
        run_id: i64,
        instances: &[InstanceRecord],
        steps: &[&StepRecord],
    ) -> DbResult<()>;
    async fn instances(
        &mut self,
        run_id: i64,
        steps: Option<&[String]>,
    ) -> DbResult<Vec<InstanceRecord>>;
    async fn put_instances(&mut self, run_id: i64, rows: &[InstanceRecord]) -> DbResult<()>;
    /// The `files` of the jobs' results (JSON text), without the rest of
    /// the result: a run's artefact list never reads its output.
    async fn job_files(&mut self, run_id: i64, job_ids: &[i64]) -> DbResult<Vec<(i64, String)>>;
    /// `quiet`: other processes are not told of these jobs (the caller
    /// leases them now, or tells them with [`FlowTx::notify_jobs`]).
    async fn insert_jobs(
        &mut self,
        jobs: &[NewJob],
        run_id: Option<i64>,
        now: Millis,
        quiet: bool,
    ) -> DbResult<Vec<i64>>;
    /// Tells other processes at commit that jobs are waiting.
    async fn notify_jobs(&mut self) -> DbResult<()>;
    async fn cancel_jobs(&mut self, ids: &[i64], now: Millis) -> DbResult<()>;
    /// Step ends waiting in the outbox (of one run, or of any), oldest
    /// first, locked for this transaction.
    async fn take_outbox(&mut self, run: Option<i64>, limit: i64)
        -> DbResult<Vec<(i64, i64, i64)>>;
    async fn delete_outbox(&mut self, ids: &[i64]) -> DbResult<()>;
    /// Writes attempt ends in this transaction; each job written comes back
    /// with its run and the status it took.
    async fn complete_jobs(
        &mut self,
        done: &[crate::Completion],
    ) -> DbResult<Vec<(i64, Option<i64>, String)>>;
    /// The run row, locked, unless another transaction holds it (then
    /// `None` at once, never a wait), with the run's instances on these
    /// jobs, each with its job's end, in the same statement. When the run
    /// is locked, the outbox rows of these jobs go too (the advance is
    /// here); when another transaction holds it, they stay for the advancer.
    /// `steps`: the run's rows of these steps come back too (a step
    /// without a row is pending).
    async fn take_run_ends(
        &mut self,
        run_id: i64,
        job_ids: &[i64],
        steps: &[String],
    ) -> DbResult<Option<RunEnds>>;
    /// Leases those of `ids` that are ready and that nothing waits ahead
    /// of (no job of the request's kinds at the same or a more urgent
    /// priority waiting since before `request.now`), in queues without
    /// settings.
    async fn lease_ready(
        &mut self,
        ids: &[i64],
        request: &crate::lease::LeaseRequest<'_>,
    ) -> DbResult<Vec<kiln_core::LeasedJob>>;
    /// [`FlowTx::put_rows`] and [`FlowTx::lease_ready`] in one trip: the
    /// last writes of a chained step's advance.
    async fn put_rows_leasing(
        &mut self,
        run_id: i64,
        instances: &[InstanceRecord],
        steps: &[&StepRecord],
        ids: &[i64],
        request: &crate::lease::LeaseRequest<'_>,
    ) -> DbResult<Vec<kiln_core::LeasedJob>>;
    /// The last writes of an advance whose completion's worker takes the
    /// step jobs it makes: `jobs` inserted unannounced, the first `offered`
    /// of them leased to `request`'s worker where [`FlowTx::lease_ready`]
    /// would lease them, and the rows written, each instance of a new job
    /// (its `job_id` unset) pointed at the job by the job's idempotency key
    /// ([`step_job_key`]; only the default, which writes `instances` after
    /// the insert, sets their `job_id`). Returns the new jobs' ids, in order,
    /// and those leased. PostgreSQL does it in one statement, writing the jobs leased
    /// as it inserts them; this default inserts, then writes and leases.
    #[allow(clippy::too_many_arguments)]
    async fn put_rows_inserting(
        &mut self,
        run_id: i64,
        jobs: &[NewJob],
        offered: usize,
        instances: &mut [InstanceRecord],
        steps: &[&StepRecord],
        request: &crate::lease::LeaseRequest<'_>,
        now: Millis,
    ) -> DbResult<(Vec<i64>, Vec<kiln_core::LeasedJob>)> {
        let ids = self.insert_jobs(jobs, Some(run_id), now, true).await?;
        point_at_jobs(run_id, jobs, &ids, instances);
        let offer = &ids[..offered.min(ids.len())];
        let leased = self
            .put_rows_leasing(run_id, instances, steps, offer, request)
            .await?;
        Ok((ids, leased))
    }
    async fn definition(
        &mut self,
        tenant: &str,
        name: &str,
        version: Option<i32>,
    ) -> DbResult<Option<PipelineRecord>>;
    async fn waiting_past(&mut self, now: Millis, limit: i64) -> DbResult<Vec<(i64, String)>>;
    async fn schedule_put(&mut self, s: &ScheduleRecord) -> DbResult<()>;
    async fn schedule_get(&mut self, tenant: &str, name: &str) -> DbResult<Option<ScheduleRecord>>;
    async fn schedule_list(&mut self, tenant: &str) -> DbResult<Vec<ScheduleRecord>>;
    async fn schedule_delete(&mut self, tenant: &str, name: &str) -> DbResult<bool>;
    /// Unpaused schedules whose next tick is due, locked for this
    /// transaction (skipping those another scheduler holds).
    async fn schedules_due(&mut self, now: Millis, limit: i64) -> DbResult<Vec<ScheduleRecord>>;
    async fn schedule_moved(&mut self, s: &ScheduleRecord) -> DbResult<()>;
    /// False when this tick already has a fire: another scheduler made it.
    async fn fire_insert(&mut self, fire: &FireRecord) -> DbResult<bool>;
    async fn fire_update(&mut self, fire: &FireRecord) -> DbResult<()>;
    async fn fires(&mut self, tenant: &str, name: &str, limit: i64) -> DbResult<Vec<FireRecord>>;
    /// The newest fire that started something.
    async fn last_fire(&mut self, tenant: &str, name: &str) -> DbResult<Option<FireRecord>>;
    async fn job_active(&mut self, id: i64) -> DbResult<bool>;
    async fn run_active(&mut self, id: i64) -> DbResult<bool>;
    async fn run_exists(&mut self, id: i64) -> DbResult<bool>;
    /// Makes a queue limited to one job at a time unless it has settings.
    async fn queue_serial(&mut self, tenant: &str, name: &str, now: Millis) -> DbResult<()>;
    async fn commit(self: Box<Self>) -> DbResult<()>;
}

/// Parsed definitions by (tenant, name, version): versions never change, so
/// a cached one is always right. Bounded; cleared whole when full.
#[derive(Default)]
pub struct DefCache {
    map: Mutex<HashMap<(String, String, i32), Arc<Checked>>>,
    /// The definition and step of each step job this process inserted
    /// (immutable facts): a completion of one names the steps its end can
    /// move before it has read the run, and reads them with it.
    jobs: Mutex<HashMap<i64, (Arc<Checked>, usize)>>,
    /// Tenants' admission policies, which every step job must pass.
    pub(crate) policies: crate::policies::PolicyCache,
}

const DEF_CACHE_MAX: usize = 512;
const JOB_STEPS_MAX: usize = 100_000;

impl DefCache {
    fn get(&self, tenant: &str, name: &str, version: i32) -> Option<Arc<Checked>> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(tenant.to_string(), name.to_string(), version))
            .cloned()
    }

    fn remember_jobs(&self, checked: &Arc<Checked>, jobs: &[(i64, usize)]) {
        if jobs.is_empty() {
            return;
        }
        let mut map = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() + jobs.len() > JOB_STEPS_MAX {
            map.clear();
        }
        for &(id, step) in jobs {
            map.insert(id, (checked.clone(), step));
        }
    }

    /// The names of the steps the ends of these jobs can move (the ended
    /// steps, their dependants and those dependants' dependencies), when
    /// this process knows every job's step; the entries are dropped.
    fn steps_moved_by(&self, jobs: &[i64]) -> Option<Vec<String>> {
        let mut map = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let mut checked: Option<Arc<Checked>> = None;
        let mut ended = BTreeSet::new();
        for id in jobs {
            let (c, step) = map.get(id)?;
            if checked.as_ref().is_some_and(|k| !Arc::ptr_eq(k, c)) {
                return None;
            }
            checked = Some(c.clone());
            ended.insert(*step);
        }
        for id in jobs {
            map.remove(id);
        }
        let checked = checked?;
        let wanted = around(&checked, ended);
        Some(
            wanted
                .into_iter()
                .map(|i| checked.def.steps[i].id.clone())
                .collect(),
        )
    }

    fn put(&self, tenant: &str, name: &str, version: i32, checked: Arc<Checked>) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= DEF_CACHE_MAX {
            map.clear();
        }
        map.insert((tenant.to_string(), name.to_string(), version), checked);
    }
}

/// Kinds that check every spec: stored definitions were checked when they
/// were applied, so reading one back needs no kind.
fn trusting_kinds(def: &PipelineDef) -> JobKinds {
    let mut kinds = JobKinds::new();
    for step in &def.steps {
        // Whether the kind takes files and secrets was checked at apply.
        kinds
            .add_with_files(&step.kind, |_| Ok(()))
            .with_secrets(&step.kind);
    }
    kinds
}

async fn load_def(
    tx: &mut dyn FlowTx,
    cache: &DefCache,
    tenant: &str,
    name: &str,
    version: i32,
) -> DbResult<Arc<Checked>> {
    if let Some(checked) = cache.get(tenant, name, version) {
        return Ok(checked);
    }
    let record = tx
        .definition(tenant, name, Some(version))
        .await?
        .ok_or_else(|| DbError::Corrupt(format!("pipeline {name} version {version} is missing")))?;
    let def: PipelineDef = serde_json::from_value(record.definition)
        .map_err(|e| DbError::Corrupt(format!("pipeline {name} version {version}: {e}")))?;
    let kinds = trusting_kinds(&def);
    let checked = Arc::new(
        def.check(&kinds)
            .map_err(|e| DbError::Corrupt(format!("pipeline {name} version {version}: {e}")))?,
    );
    cache.put(tenant, name, version, checked.clone());
    Ok(checked)
}

/// The steps whose decision may change once `settled` have settled: their
/// dependants, and those dependants' dependencies.
fn around(checked: &Checked, settled: impl IntoIterator<Item = usize>) -> BTreeSet<usize> {
    let mut wanted = BTreeSet::new();
    for i in settled {
        wanted.insert(i);
        for &c in &checked.children[i] {
            wanted.insert(c);
            wanted.extend(checked.parents[c].iter().copied());
        }
    }
    wanted
}

/// Everything one advance works on: the run, its definition, its steps.
struct Advance<'a> {
    run: RunRecord,
    checked: Arc<Checked>,
    steps: Vec<StepRecord>,
    changed: BTreeSet<usize>,
    kinds: &'a JobKinds,
    /// The tenant's admission policies: each step job must pass them.
    policies: Arc<PolicySet>,
    /// The first refusal of a step job by a policy: (policy, why).
    denied: Option<(String, String)>,
    now: Millis,
    /// Jobs were inserted: workers should look.
    made_jobs: bool,
    /// The step jobs this advance inserted, in order.
    new_jobs: Vec<i64>,
    /// Those jobs with their step's index.
    job_steps: Vec<(i64, usize)>,
    run_changed: bool,
    /// Which steps' states were read. An advance after a step job ends reads
    /// only the steps it can move (the ended steps, their dependants and
    /// those dependants' other dependencies), so a long run costs the same
    /// per step at its end as at its start; the others stand as unknown.
    known: Vec<bool>,
    /// Instance rows to write, held until something reads instances or the
    /// advance is written: one statement for all of them.
    pending: Vec<InstanceRecord>,
    /// Step jobs are inserted without telling other processes: the
    /// completion that advances the run leases them itself.
    quiet: bool,
    /// Step jobs are held until the advance's last write, which inserts
    /// them with the rows and leases them to the completion's worker
    /// ([`FlowTx::put_rows_inserting`]); anything that reads instances
    /// first inserts them ([`Advance::flush`]).
    defer_inserts: bool,
    /// The held step jobs, each with its step's index.
    deferred: Vec<(NewJob, usize)>,
}

/// The idempotency key of a step job: one job per run, step instance and
/// run attempt.
pub(crate) fn step_job_key(run_id: i64, step: &str, index: i32, attempt: i32) -> String {
    format!("run:{run_id}:{step}:{index}:{attempt}")
}

/// Sets the `job_id` of each instance without one whose step job is among
/// `jobs` (inserted as `ids`).
fn point_at_jobs(run_id: i64, jobs: &[NewJob], ids: &[i64], instances: &mut [InstanceRecord]) {
    let by_key: HashMap<&str, i64> = jobs
        .iter()
        .zip(ids)
        .filter_map(|(job, &id)| job.idempotency_key.as_deref().map(|k| (k, id)))
        .collect();
    for row in instances.iter_mut().filter(|r| r.job_id.is_none()) {
        let key = step_job_key(run_id, &row.step, row.index, row.attempt);
        row.job_id = by_key.get(key.as_str()).copied();
    }
}

impl Advance<'_> {
    /// Writes the held instance rows (the last of each instance wins).
    async fn flush(&mut self, tx: &mut dyn FlowTx) -> DbResult<()> {
        self.insert_deferred(tx).await?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = self.take_pending();
        tx.put_instances(self.run.id, &rows).await
    }

    /// Inserts the held step jobs and points their instances at them.
    async fn insert_deferred(&mut self, tx: &mut dyn FlowTx) -> DbResult<()> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let (jobs, steps): (Vec<NewJob>, Vec<usize>) =
            std::mem::take(&mut self.deferred).into_iter().unzip();
        let ids = tx
            .insert_jobs(&jobs, Some(self.run.id), self.now, self.quiet)
            .await?;
        self.inserted(&jobs, &steps, &ids);
        Ok(())
    }

    /// Records step jobs inserted (in order, with their steps' indexes).
    fn inserted(&mut self, jobs: &[NewJob], steps: &[usize], ids: &[i64]) {
        self.new_jobs.extend(ids);
        self.job_steps
            .extend(ids.iter().zip(steps).map(|(&id, &i)| (id, i)));
        point_at_jobs(self.run.id, jobs, ids, &mut self.pending);
    }

    fn take_pending(&mut self) -> Vec<InstanceRecord> {
        let mut rows = std::mem::take(&mut self.pending);
        // One upsert may not touch a row twice.
        let mut seen = HashSet::new();
        rows.reverse();
        rows.retain(|r| seen.insert((r.step.clone(), r.index)));
        rows.reverse();
        rows
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.checked.position(id)
    }

    fn partial(&self) -> bool {
        !self.known.iter().all(|k| *k)
    }

    /// Reads the states of these steps (and marks them known).
    async fn know(&mut self, tx: &mut dyn FlowTx, wanted: BTreeSet<usize>) -> DbResult<()> {
        let missing: Vec<usize> = wanted.into_iter().filter(|&i| !self.known[i]).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = missing
            .iter()
            .map(|&i| self.checked.def.steps[i].id.clone())
            .collect();
        let mut stored: HashMap<String, StepRecord> = tx
            .steps_named(self.run.id, &names)
            .await?
            .into_iter()
            .map(|s| (s.step.clone(), s))
            .collect();
        for (i, name) in missing.into_iter().zip(names) {
            self.steps[i] = stored
                .remove(&name)
                .unwrap_or_else(|| StepRecord::pending(&name));
            self.known[i] = true;
        }
        Ok(())
    }

    fn around(&self, settled: impl IntoIterator<Item = usize>) -> BTreeSet<usize> {
        around(&self.checked, settled)
    }

    fn states(&self) -> Vec<StepState> {
        self.steps
            .iter()
            .zip(&self.known)
            .map(|(s, known)| {
                if *known {
                    s.state()
                } else {
                    // Unknown stands as running: neither decided on nor
                    // settled, so nothing starts or ends because of it.
                    StepState {
                        status: StepStatus::Running,
                        ..StepState::pending()
                    }
                }
            })
            .collect()
    }

    /// Decides and applies until nothing more settles at once (gates,
    /// approvals decided, empty fan-outs, steps that failed to render).
    async fn settle(&mut self, tx: &mut dyn FlowTx) -> DbResult<()> {
        for _ in 0..=2 * self.steps.len() + 2 {
            if self.run.status != RunStatus::Running {
                return Ok(());
            }
            let decision = advance::decide(&self.checked, &self.states(), self.run.mode.mode());
            let mut settled = Vec::new();
            for &i in &decision.skip {
                self.steps[i].status = StepStatus::Skipped;
                self.steps[i].finished_at = Some(self.now);
                self.changed.insert(i);
                settled.push(i);
            }
            for &i in &decision.start {
                self.start(tx, i).await?;
                if self.steps[i].status.is_settled() {
                    settled.push(i);
                }
            }
            if settled.is_empty() {
                // Nothing moved without waiting on a job or a person.
                if !self.partial() {
                    let states: Vec<StepState> = self.steps.iter().map(StepRecord::state).collect();
                    if let Some(status) =
                        advance::decide(&self.checked, &states, self.run.mode.mode()).finished
                    {
                        self.finish(status);
                    }
                }
                return Ok(());
            }
            if self.partial() {
                let wanted = self.around(settled);
                self.know(tx, wanted).await?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, status: RunStatus) {
        self.run.status = status;
        self.run.finished_at = Some(self.now);
        if status == RunStatus::Failed && self.run.reason.is_none() {
            let failed: Vec<&str> = self
                .steps
                .iter()
                .filter(|s| matches!(s.status, StepStatus::Failed))
                .map(|s| s.step.as_str())
                .collect();
            self.run.reason = Some(if failed.is_empty() {
                "a step failed".to_string()
            } else {
                format!("step failed: {}", failed.join(", "))
            });
        }
        self.run_changed = true;
    }

    async fn start(&mut self, tx: &mut dyn FlowTx, i: usize) -> DbResult<()> {
        let step = self.checked.def.steps[i].clone();
        self.changed.insert(i);
        self.steps[i].started_at = Some(self.now);
        self.steps[i].detail = None;
        match step.kind.as_str() {
            kiln_flow::def::GATE => self.decide_gate(tx, i, &step).await,
            kiln_flow::def::APPROVAL => {
                let deadline_s = step.approval.as_ref().map_or(24 * 3600, |a| a.deadline_s);
                self.steps[i].status = StepStatus::Waiting;
                self.steps[i].deadline_at = Some(self.now.saturating_add(deadline_s * 1000));
                Ok(())
            }
            _ => self.start_jobs(tx, i, &step).await,
        }
    }

    async fn decide_gate(&mut self, tx: &mut dyn FlowTx, i: usize, step: &StepDef) -> DbResult<()> {
        let Some(condition) = &step.condition else {
            return self.fail_step(i, "a gate without a condition".into());
        };
        let context = self.context(tx, step, None).await?;
        let values = condition.bindings(&context);
        let (passed, error) = match condition.eval_bool(&context) {
            Ok(passed) => (passed, None),
            Err(e) => (false, Some(e.to_string())),
        };
        let mut detail = json!({
            "condition": condition.source(),
            "values": values,
            "result": passed,
        });
        if let Some(error) = &error {
            detail["error"] = json!(error);
        }
        self.steps[i].detail = Some(detail.clone());
        self.steps[i].finished_at = Some(self.now);
        if passed {
            self.steps[i].status = StepStatus::Succeeded;
        } else {
            self.steps[i].status = StepStatus::Failed;
            if self.run.mode == RunMode::Normal {
                self.run.mode = RunMode::Stopping;
                self.run.reason = Some("policy".into());
                self.run.detail = Some(json!({"step": step.id, "gate": detail}));
                self.run_changed = true;
            }
        }
        Ok(())
    }

    /// The run's reason names the first step that failed.
    fn note_failure(&mut self, i: usize) {
        if self.run.reason.is_none() {
            self.run.reason = Some(format!("step failed: {}", self.steps[i].step));
            self.run_changed = true;
        }
    }

    fn fail_step(&mut self, i: usize, error: String) -> DbResult<()> {
        self.note_failure(i);
        self.steps[i].status = StepStatus::Failed;
        self.steps[i].finished_at = Some(self.now);
        self.steps[i].detail = Some(json!({ "error": error }));
        Ok(())
    }

    async fn start_jobs(&mut self, tx: &mut dyn FlowTx, i: usize, step: &StepDef) -> DbResult<()> {
        let base = self.context(tx, step, None).await?;
        let items: Vec<Option<Value>> = match &step.for_each {
            None => vec![None],
            Some(text) => {
                let rendered = match template::Template::parse(text) {
                    Ok(Some(t)) => t.render(&base),
                    Ok(None) => Err("for_each is not a template".into()),
                    Err(e) => Err(e),
                };
                match rendered {
                    Ok(Value::Array(items)) if items.len() <= kiln_flow::def::FOR_EACH_MAX => {
                        items.into_iter().map(Some).collect()
                    }
                    Ok(Value::Array(items)) => {
                        return self.fail_step(
                            i,
                            format!(
                                "for_each made {} items; at most {}",
                                items.len(),
                                kiln_flow::def::FOR_EACH_MAX
                            ),
                        )
                    }
                    Ok(other) => {
                        return self.fail_step(
                            i,
                            format!("for_each must be a list, not {}", type_name(&other)),
                        )
                    }
                    Err(e) => return self.fail_step(i, format!("for_each: {e}")),
                }
            }
        };
        // Instances that succeeded on an earlier attempt of the run are
        // kept (a first attempt has none).
        let kept: HashMap<i32, InstanceRecord> = if self.run.attempt > 1 {
            self.flush(tx).await?;
            tx.instances(self.run.id, Some(std::slice::from_ref(&step.id)))
                .await?
                .into_iter()
                .filter(|r| r.status == "succeeded")
                .map(|r| (r.index, r))
                .collect()
        } else {
            HashMap::new()
        };
        let files = self.files_of(tx, step).await?;
        let mut jobs = Vec::new();
        let mut rows = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let index = index as i32;
            if kept.contains_key(&index) {
                continue;
            }
            let mut context = base.clone();
            if let Some(item) = item {
                context["item"] = item.clone();
                context["item_index"] = json!(index);
            }
            let spec = match template::render_value(&step.spec, &context) {
                Ok(spec) => spec,
                Err(e) => return self.fail_step(i, format!("spec{e}")),
            };
            let spec = match (spec, &files) {
                (Value::Object(mut map), Some(Value::Object(files))) => {
                    map.extend(files.clone());
                    Value::Object(map)
                }
                (spec, _) => spec,
            };
            // Names only: the values are fetched by the worker that runs it.
            let spec = match spec {
                Value::Object(mut map) if !step.secrets.is_empty() => {
                    map.insert("secrets".into(), json!(step.secrets));
                    Value::Object(map)
                }
                spec => spec,
            };
            // Checked with the inputs in: a fan-out taking every file of
            // another fan-out would otherwise write specs without bound.
            if spec.to_string().len() > RENDERED_SPEC_MAX {
                return self.fail_step(
                    i,
                    format!("the rendered spec with its inputs is over {RENDERED_SPEC_MAX} bytes; pass large values as artifacts"),
                );
            }
            match self.kinds.check(&step.kind, &spec) {
                Ok(()) => {}
                Err(SpecError::UnknownKind(kind)) => {
                    return self.fail_step(i, format!("unknown kind {kind:?}"))
                }
                Err(SpecError::Invalid(message)) => {
                    return self.fail_step(i, format!("invalid spec: {message}"))
                }
            }
            let job = self.job_of(step, index, spec);
            if !self.policies.is_empty() {
                let mut subject = Subject::of_job(&job, self.kinds.describe(&step.kind, &job.spec));
                // Judged by the kind the step names, as a submission is.
                subject.kind = &step.kind;
                if let Err(denial) = self.policies.admit(&subject) {
                    let text = denial.to_string();
                    self.denied
                        .get_or_insert_with(|| (denial.policy, text.clone()));
                    return self.fail_step(i, format!("policy_denied: {text}"));
                }
            }
            jobs.push(job);
            rows.push(InstanceRecord {
                step: step.id.clone(),
                index,
                attempt: self.run.attempt,
                job_id: None,
                status: "running".into(),
                item: item.clone(),
                exit_code: None,
                stdout: None,
                error: None,
                started_at: Some(self.now),
                finished_at: None,
            });
        }
        self.made_jobs |= !rows.is_empty();
        self.pending.extend(rows);
        if self.defer_inserts {
            self.deferred.extend(jobs.into_iter().map(|job| (job, i)));
        } else {
            let ids = tx
                .insert_jobs(&jobs, Some(self.run.id), self.now, self.quiet)
                .await?;
            self.inserted(&jobs, &vec![i; ids.len()], &ids);
        }
        let mut state = StepState::started(items.len() as u32);
        state.succeeded = kept.len() as u32;
        if state.total > 0 && state.succeeded >= state.total {
            state.status = StepStatus::Succeeded;
        }
        self.steps[i].set_state(state);
        if state.status.is_settled() {
            self.steps[i].finished_at = Some(self.now);
        }
        Ok(())
    }

    /// The files a step's jobs keep and take, as spec fields: its artifacts
    /// as `outputs`; for each input, the file of every instance of the
    /// producer that succeeded, at the place `PipelineDef::input_place`
    /// gives. Only job ids and paths travel in the spec, never content.
    async fn files_of(&mut self, tx: &mut dyn FlowTx, step: &StepDef) -> DbResult<Option<Value>> {
        if step.artifacts.is_empty() && step.inputs.is_empty() {
            return Ok(None);
        }
        let mut files = JobFiles {
            outputs: step.artifacts.clone(),
            inputs: Vec::new(),
        };
        if !step.inputs.is_empty() {
            let names: BTreeSet<String> = step.inputs.iter().map(|i| i.step.clone()).collect();
            let names: Vec<String> = names.into_iter().collect();
            self.flush(tx).await?;
            let producers = tx.instances(self.run.id, Some(&names)).await?;
            for input in &step.inputs {
                let fanned = self
                    .checked
                    .def
                    .step(&input.step)
                    .is_some_and(|s| s.for_each.is_some());
                for row in &producers {
                    let Some(job) = row
                        .job_id
                        .filter(|_| row.step == input.step && row.status == "succeeded")
                    else {
                        continue;
                    };
                    files.inputs.push(FileInput {
                        job,
                        path: input.path.clone(),
                        to: fanned.then(|| format!("{}/{}/{}", input.step, row.index, input.path)),
                    });
                }
            }
        }
        Ok(Some(
            serde_json::to_value(files).map_err(|e| DbError::Corrupt(e.to_string()))?,
        ))
    }

    fn job_of(&self, step: &StepDef, index: i32, spec: Value) -> NewJob {
        let kind = self.kinds.stored_kind(&step.kind, &spec);
        let mut job = NewJob::new(&self.run.tenant, &kind, spec);
        if let Some(queue) = &step.queue {
            job.queue = queue.clone();
        }
        if let Some(priority) = step.priority {
            job.priority = priority;
        }
        // A step runs once unless it asks for retries: a pipeline's author
        // says which steps are safe to repeat.
        job.max_attempts = step.retry.as_ref().map_or(1, |r| r.max_attempts);
        if let Some(backoff) = step.retry.as_ref().and_then(|r| r.backoff) {
            job.backoff = backoff;
        }
        if let Some(timeout) = step.timeout_ms {
            job.timeout_ms = timeout;
        }
        job.labels = self.run.labels.clone();
        job.labels.extend(step.labels.clone());
        job.labels
            .insert("kiln.run".into(), self.run.id.to_string());
        job.labels
            .insert("kiln.pipeline".into(), self.run.pipeline.clone());
        job.labels.insert("kiln.step".into(), step.id.clone());
        job.idempotency_key = Some(step_job_key(self.run.id, &step.id, index, self.run.attempt));
        job
    }

    /// What templates of `step` may read: params, the run, and each upstream
    /// step it names (one value, or a list for a fanned-out step).
    async fn context(
        &mut self,
        tx: &mut dyn FlowTx,
        step: &StepDef,
        _item: Option<&Value>,
    ) -> DbResult<Value> {
        let mut named: BTreeSet<String> = BTreeSet::new();
        let mut collect = |expr: &kiln_flow::Expr| {
            for path in expr.references() {
                if path.first().map(String::as_str) == Some("steps") {
                    if let Some(id) = path.get(1) {
                        named.insert(id.clone());
                    }
                }
            }
        };
        if let Ok(templates) = template::templates_in(&step.spec) {
            for (_, t) in &templates {
                t.exprs().for_each(&mut collect);
            }
        }
        if let Some(Ok(Some(t))) = step.for_each.as_deref().map(template::Template::parse) {
            t.exprs().for_each(&mut collect);
        }
        if let Some(condition) = &step.condition {
            collect(condition);
        }
        let wanted: BTreeSet<usize> = named.iter().filter_map(|id| self.index(id)).collect();
        self.know(tx, wanted).await?;
        let mut steps = serde_json::Map::new();
        let job_steps: Vec<String> = named
            .iter()
            .filter(|id| self.checked.def.step(id).is_some_and(|s| s.is_job()))
            .cloned()
            .collect();
        let mut instances: BTreeMap<String, Vec<InstanceRecord>> = BTreeMap::new();
        if !job_steps.is_empty() {
            self.flush(tx).await?;
            for row in tx.instances(self.run.id, Some(&job_steps)).await? {
                instances.entry(row.step.clone()).or_default().push(row);
            }
        }
        for id in &named {
            let Some(i) = self.index(id) else { continue };
            let def = &self.checked.def.steps[i];
            let status = self.steps[i].status.as_str();
            let mut rows = instances.remove(id).unwrap_or_default();
            rows.sort_by_key(|r| r.index);
            let value = if def.for_each.is_some() {
                json!({
                    "status": status,
                    "exit_code": rows.iter().map(|r| json!(r.exit_code)).collect::<Vec<_>>(),
                    "stdout": rows.iter().map(|r| json!(r.stdout)).collect::<Vec<_>>(),
                    "output": rows.iter().map(|r| output_of(r.stdout.as_deref())).collect::<Vec<_>>(),
                    "items": rows.iter().map(|r| r.item.clone().unwrap_or(Value::Null)).collect::<Vec<_>>(),
                })
            } else {
                let row = rows.first();
                json!({
                    "status": status,
                    "exit_code": row.and_then(|r| r.exit_code),
                    "stdout": row.and_then(|r| r.stdout.clone()),
                    "output": output_of(row.and_then(|r| r.stdout.as_deref())),
                })
            };
            steps.insert(id.clone(), value);
        }
        Ok(json!({
            "params": self.run.params,
            "run": {
                "id": self.run.id,
                "attempt": self.run.attempt,
                "pipeline": self.run.pipeline,
                "version": self.run.version,
            },
            "steps": steps,
        }))
    }

    async fn write(self, tx: &mut dyn FlowTx) -> DbResult<bool> {
        Ok(self.write_leasing(tx, None).await?.made)
    }

    /// [`Advance::write`], and with `lease` (how many, to whom) the first of
    /// its new jobs leased in the statement that writes its rows.
    async fn write_leasing(
        mut self,
        tx: &mut dyn FlowTx,
        lease: Option<(usize, &crate::LeaseRequest<'_>)>,
    ) -> DbResult<Written> {
        let mut leased = Vec::new();
        // Only when every new job is held: the first `n` of them all are offered.
        let inserting =
            lease.filter(|(n, _)| *n > 0 && !self.deferred.is_empty() && self.new_jobs.is_empty());
        if inserting.is_none() {
            self.insert_deferred(tx).await?;
        }
        let mut instances = self.take_pending();
        let changed: Vec<&StepRecord> = self.changed.iter().map(|&i| &self.steps[i]).collect();
        let offered: Vec<i64> = match lease {
            Some((n, _)) => self.new_jobs.iter().take(n).copied().collect(),
            None => Vec::new(),
        };
        let leasing = lease
            .filter(|_| !offered.is_empty())
            .map(|(_, request)| (offered.as_slice(), request));
        let rows = !(instances.is_empty() && changed.is_empty());
        let mut made = Vec::new();
        match (inserting, leasing, rows) {
            (Some((n, request)), _, _) => {
                let (jobs, steps): (Vec<NewJob>, Vec<usize>) =
                    std::mem::take(&mut self.deferred).into_iter().unzip();
                let (ids, got) = tx
                    .put_rows_inserting(
                        self.run.id,
                        &jobs,
                        n,
                        &mut instances,
                        &changed,
                        request,
                        self.now,
                    )
                    .await?;
                leased = got;
                made = ids.iter().zip(&steps).map(|(&id, &i)| (id, i)).collect();
            }
            (None, Some((ids, request)), true) => {
                leased = tx
                    .put_rows_leasing(self.run.id, &instances, &changed, ids, request)
                    .await?;
            }
            (None, leasing, _) => {
                match (instances.is_empty(), changed.is_empty()) {
                    (true, true) => {}
                    (false, true) => tx.put_instances(self.run.id, &instances).await?,
                    (true, false) => tx.put_steps(self.run.id, &changed).await?,
                    (false, false) => tx.put_rows(self.run.id, &instances, &changed).await?,
                }
                if let Some((ids, request)) = leasing {
                    leased = tx.lease_ready(ids, request).await?;
                }
            }
        }
        // A step known to be unsettled keeps the run going: no need to count.
        let open = self
            .steps
            .iter()
            .zip(&self.known)
            .any(|(s, known)| *known && !s.status.is_settled());
        if self.run.status == RunStatus::Running && self.partial() && !open {
            // Written first, so the count includes what this advance settled.
            let (settled, bad) = tx.step_counts(self.run.id).await?;
            if settled >= self.steps.len() as i64 {
                let status = match self.run.mode {
                    RunMode::Cancelling => RunStatus::Cancelled,
                    RunMode::Stopping => RunStatus::Failed,
                    RunMode::Normal if bad > 0 => RunStatus::Failed,
                    RunMode::Normal => RunStatus::Succeeded,
                };
                self.finish(status);
            }
        }
        if self.run_changed {
            tx.update_run(&self.run).await?;
        }
        self.new_jobs.extend(made.iter().map(|(id, _)| *id));
        self.job_steps.extend(made);
        Ok(Written {
            made: self.made_jobs,
            new_jobs: self.new_jobs,
            job_steps: self.job_steps,
            leased,
        })
    }
}

/// What an advance's last write did: whether it made jobs, the step jobs
/// it inserted (in order, and with their steps' indexes) and those leased.
struct Written {
    made: bool,
    new_jobs: Vec<i64>,
    job_steps: Vec<(i64, usize)>,
    leased: Vec<kiln_core::LeasedJob>,
}

/// Stdout read as JSON when it is JSON (a step's structured output), else null.
fn output_of(stdout: Option<&str>) -> Value {
    stdout
        .and_then(|s| serde_json::from_str(s.trim()).ok())
        .unwrap_or(Value::Null)
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

async fn load_advance<'a>(
    tx: &mut dyn FlowTx,
    cache: &DefCache,
    kinds: &'a JobKinds,
    run: RunRecord,
    now: Millis,
) -> DbResult<Advance<'a>> {
    let mut advance = new_advance(tx, cache, kinds, run, now).await?;
    let all: BTreeSet<usize> = (0..advance.steps.len()).collect();
    advance.know(tx, all).await?;
    Ok(advance)
}

/// An advance that knows no step's state yet: callers read what they need.
async fn new_advance<'a>(
    tx: &mut dyn FlowTx,
    cache: &DefCache,
    kinds: &'a JobKinds,
    run: RunRecord,
    now: Millis,
) -> DbResult<Advance<'a>> {
    let checked = load_def(tx, cache, &run.tenant, &run.pipeline, run.version).await?;
    let policies = policies_in(tx, &cache.policies, &run.tenant).await?;
    let steps: Vec<StepRecord> = checked
        .def
        .steps
        .iter()
        .map(|s| StepRecord::pending(&s.id))
        .collect();
    let n = steps.len();
    Ok(Advance {
        run,
        checked,
        steps,
        changed: BTreeSet::new(),
        kinds,
        policies,
        denied: None,
        now,
        made_jobs: false,
        new_jobs: Vec::new(),
        job_steps: Vec::new(),
        run_changed: false,
        known: vec![false; n],
        pending: Vec::new(),
        quiet: false,
        defer_inserts: false,
        deferred: Vec::new(),
    })
}

/// A tenant's policies through the process's cache, read in the
/// transaction when the cached set may be stale.
async fn policies_in(
    tx: &mut dyn FlowTx,
    cache: &crate::policies::PolicyCache,
    tenant: &str,
) -> DbResult<Arc<PolicySet>> {
    if let Some(set) = cache.fresh(tenant) {
        return Ok(set);
    }
    let version = tx.policy_version(tenant).await?;
    if let Some(set) = cache.confirm(tenant, version) {
        return Ok(set);
    }
    let rows = tx.policy_rows(tenant).await?;
    Ok(cache.store(tenant, version, crate::policies::set_of(rows)))
}

/// Starts the oldest queued run of a pipeline when one of its runs ended and
/// its run concurrency leaves room.
async fn promote_queued(
    tx: &mut dyn FlowTx,
    cache: &DefCache,
    kinds: &JobKinds,
    tenant: &str,
    pipeline: &str,
    concurrency: Option<u32>,
    now: Millis,
) -> DbResult<bool> {
    let Some(limit) = concurrency else {
        return Ok(false);
    };
    let (running, next) = tx.active_runs(tenant, pipeline).await?;
    let Some(next) = next.filter(|_| running < limit as i64) else {
        return Ok(false);
    };
    let Some(mut run) = tx.lock_run(next).await? else {
        return Ok(false);
    };
    if run.status != RunStatus::Queued {
        return Ok(false);
    }
    run.status = RunStatus::Running;
    run.started_at = Some(now);
    let mut advance = load_advance(tx, cache, kinds, run, now).await?;
    advance.run_changed = true;
    advance.changed.extend(0..advance.steps.len());
    advance.settle(tx).await?;
    advance.write(tx).await
}

impl Db {
    pub(crate) async fn flow_tx(&self, write: bool) -> DbResult<Box<dyn FlowTx>> {
        Ok(match self {
            Db::Postgres(s) => Box::new(pg::PgFlowTx::begin(&s.pool).await?),
            Db::Sqlite(s) => {
                Box::new(sqlite::SqliteFlowTx::begin(if write { &s.write } else { &s.read }).await?)
            }
        })
    }

    pub(crate) fn defs(&self) -> &DefCache {
        match self {
            Db::Postgres(s) => &s.defs,
            Db::Sqlite(s) => &s.defs,
        }
    }

    /// Signalled when step jobs may have ended (in this process, or on
    /// PostgreSQL anywhere): the advancer's wake-up.
    pub fn flow_wakeup(&self) -> Arc<tokio::sync::Notify> {
        match self {
            Db::Postgres(s) => s.flow_wakeup.clone(),
            Db::Sqlite(s) => s.flow_wakeup.clone(),
        }
    }

    /// Stores a new version of a pipeline (already checked by the caller)
    /// and returns it.
    pub async fn pipeline_put(
        &self,
        tenant: &str,
        def: &PipelineDef,
        now: Millis,
    ) -> DbResult<PipelineRecord> {
        let definition =
            serde_json::to_value(def).map_err(|e| DbError::Invalid(format!("definition: {e}")))?;
        dispatch_flow!(self, s => s.pipeline_put(tenant, &def.name, &definition, now).await)
    }

    /// A pipeline's newest version, or the one asked for; deleted pipelines
    /// are found only by version (their runs still show them).
    pub async fn pipeline_get(
        &self,
        tenant: &str,
        name: &str,
        version: Option<i32>,
    ) -> DbResult<Option<PipelineRecord>> {
        let mut tx = self.flow_tx(false).await?;
        let found = tx.definition(tenant, name, version).await?;
        tx.commit().await?;
        self.events_written();
        Ok(found)
    }

    /// Newest version of each pipeline not deleted.
    pub async fn pipeline_list(&self, tenant: &str) -> DbResult<Vec<PipelineRecord>> {
        dispatch_flow!(self, s => s.pipeline_list(tenant).await)
    }

    pub async fn pipeline_versions(
        &self,
        tenant: &str,
        name: &str,
    ) -> DbResult<Vec<(i32, Millis)>> {
        dispatch_flow!(self, s => s.pipeline_versions(tenant, name).await)
    }

    /// Deletes a pipeline: no new runs; its runs and their versions stay.
    pub async fn pipeline_delete(&self, tenant: &str, name: &str) -> DbResult<bool> {
        dispatch_flow!(self, s => s.pipeline_delete(tenant, name).await)
    }

    /// The files a run's steps kept, from each step instance's latest job;
    /// `None` when the tenant has no such run.
    pub async fn run_files(&self, tenant: &str, id: i64) -> DbResult<Option<Vec<RunFile>>> {
        let mut tx = self.flow_tx(false).await?;
        if tx.get_run(tenant, id).await?.is_none() {
            return Ok(None);
        }
        let rows = tx.instances(id, None).await?;
        let ids: Vec<i64> = rows.iter().filter_map(|r| r.job_id).collect();
        let mut kept: HashMap<i64, Vec<kiln_core::files::FileRef>> = tx
            .job_files(id, &ids)
            .await?
            .into_iter()
            .map(|(job, files)| (job, serde_json::from_str(&files).unwrap_or_default()))
            .collect();
        tx.commit().await?;
        self.events_written();
        let mut files = Vec::new();
        for row in rows {
            let Some((job_id, job_files)) = row
                .job_id
                .and_then(|job| kept.remove(&job).map(|files| (job, files)))
            else {
                continue;
            };
            // A fanned-out step's instances carry their item.
            let index = row.item.is_some().then_some(row.index);
            for file in job_files {
                files.push(RunFile {
                    name: match index {
                        Some(i) => format!("{}/{i}/{}", row.step, file.path),
                        None => format!("{}/{}", row.step, file.path),
                    },
                    step: row.step.clone(),
                    index,
                    path: file.path,
                    size: file.size,
                    digest: file.digest,
                    job_id,
                });
            }
        }
        Ok(Some(files))
    }

    /// Starts a run of a pipeline's newest version: its params resolved,
    /// its first steps' jobs queued, all in one transaction. The same
    /// idempotency key gives back the run it made before (`false`).
    pub async fn run_create(
        &self,
        new: &NewRun,
        kinds: &JobKinds,
        now: Millis,
    ) -> FlowResult<(RunView, bool)> {
        let mut tx = self.flow_tx(true).await?;
        let made = run_create_in(tx.as_mut(), self.defs(), kinds, new, now, true).await?;
        let (id, fresh, jobs) = match made {
            Ok(made) => made,
            Err(e) => return Ok(Err(e)),
        };
        if fresh {
            commit_audited(tx, Change::Created, Some(&format!("/api/v1/runs/{id}"))).await?;
        } else {
            tx.commit().await?;
        }
        self.events_written();
        if jobs {
            self.wakeup().notify_waiters();
        }
        let view = self.run_get(&new.tenant, id).await?;
        Ok(view.map(|v| (v, fresh)).ok_or(FlowError::NotFound("run")))
    }

    pub async fn run_get(&self, tenant: &str, id: i64) -> DbResult<Option<RunView>> {
        let mut tx = self.flow_tx(false).await?;
        let Some(run) = tx.get_run(tenant, id).await? else {
            tx.commit().await?;
            self.events_written();
            return Ok(None);
        };
        let checked = load_def(
            tx.as_mut(),
            self.defs(),
            &run.tenant,
            &run.pipeline,
            run.version,
        )
        .await?;
        let stored: HashMap<String, StepRecord> = tx
            .steps(id)
            .await?
            .into_iter()
            .map(|s| (s.step.clone(), s))
            .collect();
        let mut instances: HashMap<String, Vec<InstanceRecord>> = HashMap::new();
        for row in tx.instances(id, None).await? {
            instances.entry(row.step.clone()).or_default().push(row);
        }
        tx.commit().await?;
        self.events_written();
        let steps = checked
            .def
            .steps
            .iter()
            .map(|s| {
                let mut rows = instances.remove(&s.id).unwrap_or_default();
                rows.sort_by_key(|r| r.index);
                StepView {
                    step: stored
                        .get(&s.id)
                        .cloned()
                        .unwrap_or_else(|| StepRecord::pending(&s.id)),
                    instances: rows,
                }
            })
            .collect();
        Ok(Some(RunView { run, steps }))
    }

    pub async fn run_list(&self, tenant: &str, filter: &RunFilter) -> DbResult<Vec<RunRecord>> {
        dispatch_flow!(self, s => s.run_list(tenant, filter).await)
    }

    /// [`Db::job_complete_many`] for a worker that runs pipeline steps: in
    /// the transaction that records the ends, the runs of the step jobs
    /// that ended advance (each run whose row no other transaction holds;
    /// the rest stay in the outbox for the advancer), and up to
    /// `lease.limit` of the step jobs those advances make are leased to the
    /// caller when nothing waits ahead of them. A chain of steps then costs
    /// one transaction per step instead of three. Should advancing fail,
    /// the transaction is dropped and the ends are recorded alone, so the
    /// outbox keeps them (no savepoint: two statements fewer on the path
    /// every step takes, and the ends are idempotent to write again).
    pub async fn job_complete_advancing(
        &self,
        done: &[crate::Completion],
        kinds: &JobKinds,
        lease: Option<&crate::LeaseRequest<'_>>,
        now: Millis,
    ) -> DbResult<(crate::Completed, Vec<kiln_core::LeasedJob>)> {
        if done.is_empty() {
            return Ok(Default::default());
        }
        let mut sorted = done.to_vec();
        sorted.sort_by_key(|c| c.id);
        let begun = if let [one] = sorted.as_slice() {
            // A chain's step: the end, the run's lock and its read in one trip.
            let names = self.defs().steps_moved_by(&[one.id]);
            let asked = names.as_deref().unwrap_or_default();
            let begun: DbResult<(Box<dyn FlowTx>, _, _)> = match self {
                Db::Sqlite(s) => sqlite::SqliteFlowTx::complete_one(&s.write, one, asked)
                    .await
                    .map(|(tx, written, ends)| (Box::new(tx) as _, written, ends)),
                Db::Postgres(s) => pg::PgFlowTx::complete_one(&s.pool, &s.step_lane, one, asked)
                    .await
                    .map(|(tx, written, ends)| (Box::new(tx) as _, written, ends)),
            };
            begun.map(|(tx, written, ends)| (tx, written, ends.map(|ends| (ends, names))))
        } else {
            match self.flow_tx(true).await {
                Ok(mut tx) => tx
                    .complete_jobs(&sorted)
                    .await
                    .map(|written| (tx, written, None)),
                Err(error) => Err(error),
            }
        };
        let (mut tx, written, taken) = match begun {
            Ok(begun) => begun,
            Err(error) if error.is_unavailable() => return Err(error),
            // A refused batch goes the way that writes row by row.
            Err(_) => return Ok((self.job_complete_many(&sorted).await?, Vec::new())),
        };
        if written.is_empty() {
            // A stale end (the lease moved on): nothing to advance, and a
            // one-trip begin may have taken an outbox row it must leave.
            drop(tx);
            return Ok((self.job_complete_many(&sorted).await?, Vec::new()));
        }
        let applied: Vec<i64> = written.iter().map(|w| w.0).collect();
        // Step jobs that reached a final state (a retry waits for its next
        // try; a retry of a job cancelled meanwhile ends it cancelled).
        let ends: Vec<(i64, i64)> = written
            .iter()
            .filter(|(_, _, status)| JobStatus::parse(status).is_some_and(|s| s.is_terminal()))
            .filter_map(|(id, run, _)| run.map(|run| (*id, run)))
            .collect();
        let inline = match advance_inline(tx.as_mut(), self.defs(), kinds, &ends, taken, lease, now)
            .await
        {
            Ok(inline) => inline,
            Err(error) if error.is_unavailable() => return Err(error),
            Err(error) => {
                tracing::warn!(%error, "advancing runs with their step ends failed; the advancer takes them");
                drop(tx);
                return Ok((self.job_complete_many(&sorted).await?, Vec::new()));
            }
        };
        tx.commit().await?;
        self.fire_watchers(&applied);
        if inline.left {
            self.flow_wakeup().notify_waiters();
        }
        self.events_written();
        if inline.unleased || sorted.iter().any(|c| c.status == JobStatus::Scheduled) {
            self.wakeup().notify_waiters();
        }
        Ok((
            crate::Completed {
                applied,
                quarantined: Vec::new(),
            },
            inline.leased,
        ))
    }

    /// Consumes step ends from the outbox and advances their runs, one
    /// transaction per batch. Returns how many ends were taken. A batch the
    /// store refuses (a run whose state cannot be read, say) is retried run
    /// by run, and a run that still fails ends `failed` with the reason, so
    /// one bad run never holds up the others.
    pub async fn flow_advance(&self, kinds: &JobKinds, now: Millis) -> DbResult<usize> {
        match self.flow_advance_batch(kinds, now, None).await {
            Err(error) if !error.is_unavailable() => {
                tracing::warn!(%error, "a batch of step ends was refused; advancing run by run");
                self.flow_advance_each(kinds, now).await
            }
            other => other,
        }
    }

    async fn flow_advance_batch(
        &self,
        kinds: &JobKinds,
        now: Millis,
        run: Option<i64>,
    ) -> DbResult<usize> {
        let mut tx = self.flow_tx(true).await?;
        let rows = tx.take_outbox(run, OUTBOX_BATCH).await?;
        if rows.is_empty() {
            tx.commit().await?;
            self.events_written();
            return Ok(0);
        }
        let mut by_run: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for (_, run_id, job_id) in &rows {
            by_run.entry(*run_id).or_default().push(*job_id);
        }
        let mut made_jobs = false;
        let mut held = BTreeSet::new();
        for (run_id, job_ids) in by_run {
            match advance_run(tx.as_mut(), self.defs(), kinds, run_id, &job_ids, now).await? {
                Some(made) => made_jobs |= made,
                None => {
                    held.insert(run_id);
                }
            }
        }
        let ids: Vec<i64> = rows
            .iter()
            .filter(|r| !held.contains(&r.1))
            .map(|r| r.0)
            .collect();
        if !ids.is_empty() {
            tx.delete_outbox(&ids).await?;
        }
        tx.commit().await?;
        self.events_written();
        if made_jobs {
            self.wakeup().notify_waiters();
        }
        if !held.is_empty() {
            // A completion's transaction has the run; look again shortly.
            let wake = self.flow_wakeup();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                wake.notify_waiters();
            });
        }
        Ok(ids.len())
    }

    async fn flow_advance_each(&self, kinds: &JobKinds, now: Millis) -> DbResult<usize> {
        let mut tx = self.flow_tx(false).await?;
        let rows = tx.take_outbox(None, OUTBOX_BATCH).await?;
        tx.commit().await?;
        self.events_written();
        let runs: BTreeSet<i64> = rows.iter().map(|r| r.1).collect();
        let mut taken = 0;
        for run_id in runs {
            match self.flow_advance_batch(kinds, now, Some(run_id)).await {
                Ok(n) => taken += n,
                Err(error) if error.is_unavailable() => return Err(error),
                Err(error) => {
                    tracing::error!(run_id, %error, "a run cannot be advanced; it ends failed");
                    let mut tx = self.flow_tx(true).await?;
                    let gone = tx.take_outbox(Some(run_id), i64::MAX).await?;
                    if let Some(mut run) = tx.lock_run(run_id).await? {
                        if !run.status.is_terminal() {
                            run.status = RunStatus::Failed;
                            run.finished_at = Some(now);
                            run.reason = Some(kiln_core::names::sanitise_message(
                                &format!("the run could not be advanced: {error}"),
                                crate::lease::ERROR_MAX,
                            ));
                            tx.update_run(&run).await?;
                        }
                    }
                    let ids: Vec<i64> = gone.iter().map(|r| r.0).collect();
                    tx.delete_outbox(&ids).await?;
                    tx.commit().await?;
                    self.events_written();
                    taken += gone.len();
                }
            }
        }
        Ok(taken)
    }

    /// Cancels a run: its running jobs are cancelled, its pending steps
    /// skipped, its waiting approvals closed.
    pub async fn run_cancel(&self, tenant: &str, id: i64, now: Millis) -> FlowResult<RunView> {
        let mut tx = self.flow_tx(true).await?;
        let Some(mut run) = tx.lock_run(id).await?.filter(|r| r.tenant == tenant) else {
            return Ok(Err(FlowError::NotFound("run")));
        };
        if run.status.is_terminal() {
            return Ok(Err(FlowError::Conflict(format!(
                "run {id} has already ended ({})",
                run.status.as_str()
            ))));
        }
        run.mode = RunMode::Cancelling;
        run.reason = Some("cancelled".into());
        if run.status == RunStatus::Queued {
            run.status = RunStatus::Running;
        }
        let running: Vec<i64> = tx
            .instances(id, None)
            .await?
            .into_iter()
            .filter(|r| r.status == "running")
            .filter_map(|r| r.job_id)
            .collect();
        tx.cancel_jobs(&running, now).await?;
        let no_kinds = JobKinds::new();
        let mut advance = load_advance(tx.as_mut(), self.defs(), &no_kinds, run, now).await?;
        for (i, step) in advance.steps.iter_mut().enumerate() {
            if step.status == StepStatus::Waiting {
                step.status = StepStatus::Cancelled;
                step.finished_at = Some(now);
                advance.changed.insert(i);
            }
        }
        advance.run_changed = true;
        advance.settle(tx.as_mut()).await?;
        let finished = advance.run.status.is_terminal();
        let (pipeline, concurrency) = (
            advance.run.pipeline.clone(),
            advance.checked.def.concurrency,
        );
        advance.write(tx.as_mut()).await?;
        if finished {
            promote_queued(
                tx.as_mut(),
                self.defs(),
                &no_kinds,
                tenant,
                &pipeline,
                concurrency,
                now,
            )
            .await?;
        }
        commit_audited(tx, Change::Changed, None).await?;
        self.events_written();
        self.flow_wakeup().notify_waiters();
        Ok(self
            .run_get(tenant, id)
            .await?
            .ok_or(FlowError::NotFound("run")))
    }

    /// Runs a failed or cancelled run again from the steps that did not
    /// succeed; succeeded steps (and succeeded instances of a fan-out) stay.
    pub async fn run_retry(
        &self,
        tenant: &str,
        id: i64,
        kinds: &JobKinds,
        now: Millis,
    ) -> FlowResult<RunView> {
        let mut tx = self.flow_tx(true).await?;
        let Some(mut run) = tx.lock_run(id).await?.filter(|r| r.tenant == tenant) else {
            return Ok(Err(FlowError::NotFound("run")));
        };
        if !matches!(run.status, RunStatus::Failed | RunStatus::Cancelled) {
            return Ok(Err(FlowError::Conflict(format!(
                "only a failed or cancelled run can be retried; run {id} is {}",
                run.status.as_str()
            ))));
        }
        run.status = RunStatus::Running;
        run.mode = RunMode::Normal;
        run.attempt += 1;
        run.reason = None;
        run.detail = None;
        run.finished_at = None;
        let mut advance = load_advance(tx.as_mut(), self.defs(), kinds, run, now).await?;
        let mut states: Vec<StepState> = advance.steps.iter().map(StepRecord::state).collect();
        for i in advance::reset_for_retry(&mut states) {
            advance.steps[i] = StepRecord::pending(&advance.steps[i].step);
            advance.changed.insert(i);
        }
        advance.run_changed = true;
        advance.settle(tx.as_mut()).await?;
        let made = advance.write(tx.as_mut()).await?;
        commit_audited(tx, Change::Changed, None).await?;
        self.events_written();
        if made {
            self.wakeup().notify_waiters();
        }
        Ok(self
            .run_get(tenant, id)
            .await?
            .ok_or(FlowError::NotFound("run")))
    }

    /// Records an approval step's decision (who and why) and moves the run on.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_decide(
        &self,
        tenant: &str,
        id: i64,
        step: &str,
        approve: bool,
        by: &str,
        comment: Option<&str>,
        kinds: &JobKinds,
        now: Millis,
    ) -> FlowResult<RunView> {
        let mut tx = self.flow_tx(true).await?;
        let Some(run) = tx.lock_run(id).await?.filter(|r| r.tenant == tenant) else {
            return Ok(Err(FlowError::NotFound("run")));
        };
        let mut advance = load_advance(tx.as_mut(), self.defs(), kinds, run, now).await?;
        let Some(i) = advance.index(step) else {
            return Ok(Err(FlowError::NotFound("step")));
        };
        if advance.checked.def.steps[i].kind != kiln_flow::def::APPROVAL {
            return Ok(Err(FlowError::Conflict(format!(
                "step {step:?} is not an approval"
            ))));
        }
        if advance.steps[i].status != StepStatus::Waiting {
            return Ok(Err(FlowError::Conflict(format!(
                "step {step:?} is {}, not waiting for a decision",
                advance.steps[i].status.as_str()
            ))));
        }
        decide_approval(&mut advance, i, approve, by, comment);
        advance.settle(tx.as_mut()).await?;
        let finished = advance.run.status.is_terminal();
        let (pipeline, concurrency) = (
            advance.run.pipeline.clone(),
            advance.checked.def.concurrency,
        );
        let made = advance.write(tx.as_mut()).await?;
        if finished {
            promote_queued(
                tx.as_mut(),
                self.defs(),
                kinds,
                tenant,
                &pipeline,
                concurrency,
                now,
            )
            .await?;
        }
        commit_audited(tx, Change::Changed, None).await?;
        self.events_written();
        if made {
            self.wakeup().notify_waiters();
        }
        Ok(self
            .run_get(tenant, id)
            .await?
            .ok_or(FlowError::NotFound("run")))
    }

    /// Rejects approvals whose deadline passed; returns how many.
    pub async fn flow_expire_approvals(&self, kinds: &JobKinds, now: Millis) -> DbResult<usize> {
        let mut tx = self.flow_tx(true).await?;
        let due = tx.waiting_past(now, 100).await?;
        let mut n = 0;
        let mut made = false;
        for (run_id, step) in due {
            let Some(run) = tx.lock_run(run_id).await? else {
                continue;
            };
            let tenant = run.tenant.clone();
            let mut advance = load_advance(tx.as_mut(), self.defs(), kinds, run, now).await?;
            let Some(i) = advance.index(&step) else {
                continue;
            };
            if advance.steps[i].status != StepStatus::Waiting {
                continue;
            }
            decide_approval(
                &mut advance,
                i,
                false,
                "deadline",
                Some("no decision before the deadline"),
            );
            advance.settle(tx.as_mut()).await?;
            let finished = advance.run.status.is_terminal();
            let (pipeline, concurrency) = (
                advance.run.pipeline.clone(),
                advance.checked.def.concurrency,
            );
            made |= advance.write(tx.as_mut()).await?;
            if finished {
                made |= promote_queued(
                    tx.as_mut(),
                    self.defs(),
                    kinds,
                    &tenant,
                    &pipeline,
                    concurrency,
                    now,
                )
                .await?;
            }
            n += 1;
        }
        tx.commit().await?;
        self.events_written();
        if made {
            self.wakeup().notify_waiters();
        }
        Ok(n)
    }
}

fn decide_approval(
    advance: &mut Advance<'_>,
    i: usize,
    approve: bool,
    by: &str,
    comment: Option<&str>,
) {
    let now = advance.now;
    let step = &mut advance.steps[i];
    step.status = if approve {
        StepStatus::Succeeded
    } else {
        StepStatus::Failed
    };
    step.finished_at = Some(now);
    step.deadline_at = None;
    step.detail = Some(json!({
        "decision": if approve { "approved" } else { "rejected" },
        "by": by,
        "comment": comment,
        "at": now,
    }));
    advance.changed.insert(i);
    if !approve && advance.run.reason.is_none() {
        advance.run.reason = Some(format!("rejected at {}", advance.steps[i].step));
        advance.run_changed = true;
    }
}

/// Creates a run inside a transaction (the API's and the scheduler's).
/// Returns the run id, whether it is new, and whether jobs were queued.
/// With `refuse_denied`, a first step an admission policy refuses refuses
/// the run (the caller rolls back); without, that step fails in the run.
pub(crate) async fn run_create_in(
    tx: &mut dyn FlowTx,
    cache: &DefCache,
    kinds: &JobKinds,
    new: &NewRun,
    now: Millis,
    refuse_denied: bool,
) -> DbResult<Result<(i64, bool, bool), FlowError>> {
    if let Some(key) = &new.idempotency_key {
        if let Some(id) = tx.run_by_key(&new.tenant, &new.pipeline, key).await? {
            return Ok(Ok((id, false, false)));
        }
    }
    let Some(record) = tx.definition(&new.tenant, &new.pipeline, None).await? else {
        return Ok(Err(FlowError::NotFound("pipeline")));
    };
    let checked = load_def(tx, cache, &new.tenant, &new.pipeline, record.version).await?;
    let params = match kiln_flow::def::resolve_params(&checked.def, &new.params) {
        Ok(params) => params,
        Err(e) => return Ok(Err(FlowError::Invalid(e.to_string()))),
    };
    let status = match checked.def.concurrency {
        Some(limit) => {
            let (running, _) = tx.active_runs(&new.tenant, &new.pipeline).await?;
            if running >= limit as i64 {
                RunStatus::Queued
            } else {
                RunStatus::Running
            }
        }
        None => RunStatus::Running,
    };
    let mut labels = checked.def.labels.clone();
    labels.extend(new.labels.clone());
    let row = NewRunRow {
        tenant: &new.tenant,
        pipeline: &new.pipeline,
        version: record.version,
        status,
        params: Value::Object(params).to_string(),
        labels: serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into()),
        idempotency_key: new.idempotency_key.as_deref(),
        trigger: &new.trigger,
        now,
    };
    let Some(id) = tx.insert_run(&row).await? else {
        // A concurrent request with the same key won.
        let key = new.idempotency_key.as_deref().unwrap_or_default();
        return match tx.run_by_key(&new.tenant, &new.pipeline, key).await? {
            Some(id) => Ok(Ok((id, false, false))),
            None => Err(DbError::Corrupt(
                "a run's idempotency key conflicted but no run has it".into(),
            )),
        };
    };
    let run = tx
        .lock_run(id)
        .await?
        .ok_or_else(|| DbError::Corrupt("a run just made is missing".into()))?;
    // A new run has no step rows yet: every step is known pending.
    let mut advance = new_advance(tx, cache, kinds, run, now).await?;
    advance.known.iter_mut().for_each(|k| *k = true);
    advance.changed.extend(0..advance.steps.len());
    if status == RunStatus::Running {
        advance.settle(tx).await?;
    }
    if let Some((policy, message)) = advance.denied.take().filter(|_| refuse_denied) {
        return Ok(Err(FlowError::Denied { policy, message }));
    }
    let made = advance.write(tx).await?;
    Ok(Ok((id, true, made)))
}

/// One run's share of an outbox batch: each ended job folded into its
/// instance and step, then the run decided on. `None` when another
/// transaction holds the run: waiting for it here, with this batch's other
/// runs and counters already held, could close a cycle with a completion
/// that holds the run and wants those.
async fn advance_run(
    tx: &mut dyn FlowTx,
    cache: &DefCache,
    kinds: &JobKinds,
    run_id: i64,
    job_ids: &[i64],
    now: Millis,
) -> DbResult<Option<bool>> {
    let Some(ends) = tx.take_run_ends(run_id, job_ids, &[]).await? else {
        // Gone (its ends mean nothing now) or held elsewhere.
        return Ok(if tx.run_exists(run_id).await? {
            None
        } else {
            Some(false)
        });
    };
    Ok(Some(
        advance_locked(tx, cache, kinds, ends, None, now, Offer::None)
            .await?
            .0,
    ))
}

/// A run locked with what its advance reads first.
pub(crate) struct RunEnds {
    pub run: RunRecord,
    /// Its instances on the ended jobs, each with its job's end.
    pub ended: Vec<(InstanceRecord, JobEnd)>,
    /// Rows of the steps asked for.
    pub steps: Vec<StepRecord>,
}

/// What advancing runs in a completion's transaction did.
#[derive(Default)]
struct Inline {
    leased: Vec<kiln_core::LeasedJob>,
    /// Step ends stay in the outbox (a run another transaction held).
    left: bool,
    /// Jobs were made that this worker did not lease.
    unleased: bool,
}

async fn advance_inline(
    tx: &mut dyn FlowTx,
    cache: &DefCache,
    kinds: &JobKinds,
    ends: &[(i64, i64)],
    mut taken: Option<(RunEnds, Option<Vec<String>>)>,
    lease: Option<&crate::LeaseRequest<'_>>,
    now: Millis,
) -> DbResult<Inline> {
    let mut out = Inline::default();
    if ends.is_empty() {
        return Ok(out);
    }
    let mut by_run: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for &(job_id, run_id) in ends {
        by_run.entry(run_id).or_default().push(job_id);
    }
    // One run (a chain's step, most often): its next steps are leased in
    // the statement that writes its rows.
    let single = by_run.len() == 1;
    let mut fresh = Vec::new();
    let mut offered = 0;
    for (run_id, jobs) in by_run {
        let (ends, names) = match taken.take() {
            Some((ends, names)) if ends.run.id == run_id => (ends, names),
            _ => {
                // Never waits for a run: one held elsewhere is the advancer's.
                let names = cache.steps_moved_by(&jobs);
                let asked = names.as_deref().unwrap_or_default();
                let Some(ends) = tx.take_run_ends(run_id, &jobs, asked).await? else {
                    out.left = true;
                    continue;
                };
                (ends, names)
            }
        };
        let offer = match lease.filter(|r| r.limit > 0) {
            Some(request) if single => Offer::Now(request, jobs.len()),
            Some(_) => Offer::Later,
            None => Offer::None,
        };
        let (made, new, leased) = advance_locked(tx, cache, kinds, ends, names, now, offer).await?;
        // No more than ended here: the run's tenant keeps its running count.
        let mine = new.iter().take(jobs.len());
        offered += mine.len();
        match leased {
            Some(leased) => out.leased.extend(leased),
            None => fresh.extend(mine),
        }
        // Jobs this worker will not be offered: more than ended, or the
        // first steps of a queued run the end let start.
        out.unleased |= made && (new.len() > jobs.len() || new.is_empty());
    }
    if let Some(request) = lease.filter(|r| r.limit > 0 && !fresh.is_empty()) {
        fresh.truncate(request.limit as usize);
        let request = crate::LeaseRequest {
            now,
            ..request.clone()
        };
        out.leased = tx.lease_ready(&fresh, &request).await?;
    }
    out.unleased |= out.leased.len() < offered;
    if out.unleased {
        tx.notify_jobs().await?;
    }
    Ok(out)
}

/// What a completion's worker takes of the step jobs an advance makes.
#[derive(Clone, Copy)]
enum Offer<'a> {
    /// Nothing: they are announced to every worker.
    None,
    /// Inserted unannounced; the caller leases them after.
    Later,
    /// Up to this many (the ends that made room) leased in the advance's
    /// last write.
    Now(&'a crate::LeaseRequest<'a>, usize),
}

/// [`advance_run`] on a run row this transaction has locked, with the
/// instances whose jobs ended; also returns the step jobs it inserted.
async fn advance_locked(
    tx: &mut dyn FlowTx,
    cache: &DefCache,
    kinds: &JobKinds,
    ends: RunEnds,
    asked: Option<Vec<String>>,
    now: Millis,
    offer: Offer<'_>,
) -> DbResult<(bool, Vec<i64>, Option<Vec<kiln_core::LeasedJob>>)> {
    let RunEnds { run, ended, steps } = ends;
    let tenant = run.tenant.clone();
    // Only instances still on the job that ended: a job of an earlier
    // attempt of the run, ending late, changes nothing.
    let mine: Vec<(InstanceRecord, JobEnd)> = ended
        .into_iter()
        .filter(|(r, end)| r.status == "running" && end.status.is_terminal())
        .collect();
    let mut advance = new_advance(tx, cache, kinds, run, now).await?;
    advance.quiet = !matches!(offer, Offer::None);
    advance.defer_inserts = matches!(offer, Offer::Now(..));
    if let Some(names) = asked {
        let mut rows: HashMap<String, StepRecord> =
            steps.into_iter().map(|r| (r.step.clone(), r)).collect();
        for name in names {
            if let Some(i) = advance.index(&name) {
                advance.steps[i] = rows
                    .remove(&name)
                    .unwrap_or_else(|| StepRecord::pending(&name));
                advance.known[i] = true;
            }
        }
    }
    let ended_steps: BTreeSet<usize> = mine
        .iter()
        .filter_map(|(r, _)| advance.index(&r.step))
        .collect();
    let wanted = advance.around(ended_steps);
    advance.know(tx, wanted).await?;
    for (mut row, end) in mine {
        let ok = end.status == JobStatus::Succeeded;
        row.status = match end.status {
            JobStatus::Succeeded => "succeeded",
            JobStatus::Cancelled => "cancelled",
            _ => "failed",
        }
        .into();
        row.exit_code = end.exit_code;
        row.stdout = end
            .stdout
            .as_deref()
            .map(|s| truncate(s, INSTANCE_STDOUT_MAX));
        row.error = end.error.clone();
        row.finished_at = end.finished_at.or(Some(now));
        if let Some(i) = advance.index(&row.step) {
            let mut state = advance.steps[i].state();
            state.instance_ended(ok);
            if state.status == StepStatus::Failed && advance.run.mode == RunMode::Cancelling {
                state.status = StepStatus::Cancelled;
            }
            advance.steps[i].set_state(state);
            if state.status.is_settled() {
                advance.steps[i].finished_at = Some(now);
            }
            if state.status == StepStatus::Failed {
                advance.note_failure(i);
            }
            advance.changed.insert(i);
        }
        advance.pending.push(row);
    }
    if advance.run.status == RunStatus::Running {
        advance.settle(tx).await?;
    }
    let finished = advance.run.status.is_terminal();
    let (pipeline, concurrency) = (
        advance.run.pipeline.clone(),
        advance.checked.def.concurrency,
    );
    let checked = advance.checked.clone();
    let lease = match offer {
        Offer::Now(request, ends) => Some((
            ends.min(usize::try_from(request.limit).unwrap_or(0)),
            crate::LeaseRequest {
                now,
                ..request.clone()
            },
        )),
        _ => None,
    };
    let written = advance
        .write_leasing(tx, lease.as_ref().map(|(n, r)| (*n, r)))
        .await?;
    cache.remember_jobs(&checked, &written.job_steps);
    let mut made = written.made;
    if finished {
        made |= promote_queued(tx, cache, kinds, &tenant, &pipeline, concurrency, now).await?;
    }
    Ok((made, written.new_jobs, lease.map(|_| written.leased)))
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_700_000_000_000;

    fn noop_kinds() -> JobKinds {
        let mut kinds = JobKinds::new();
        kinds.add("noop", |_| Ok(()));
        kinds
    }

    /// A run of a two-step chain with its first step's job leased, and
    /// that job's successful end.
    async fn first_step_done(db: &Db) -> (i64, crate::Completion) {
        let def = json!({"name": "pair", "steps": [
            {"id": "a", "kind": "noop"},
            {"id": "b", "kind": "noop", "depends_on": ["a"]},
        ]});
        let checked = PipelineDef::from_json(def, &noop_kinds()).expect("a valid definition");
        db.pipeline_put("acme", &checked.def, T0).await.unwrap();
        let new = NewRun {
            tenant: "acme".into(),
            pipeline: "pair".into(),
            params: Default::default(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            trigger: "api".into(),
        };
        let run = db
            .run_create(&new, &noop_kinds(), T0)
            .await
            .unwrap()
            .expect("the run starts")
            .0;
        let leased = db
            .job_lease("w1", &["noop".to_string()], 1, 60_000, T0 + 1)
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        let done = crate::Completion {
            id: leased[0].id,
            attempt: leased[0].attempt,
            status: JobStatus::Succeeded,
            run_at: None,
            result: Some(kiln_core::JobResult {
                exit_code: 0,
                stdout: "ok".into(),
                stderr: String::new(),
                duration_ms: 0,
                truncated: false,
                files: Vec::new(),
            }),
            error: None,
            record: kiln_core::AttemptRecord {
                attempt: leased[0].attempt,
                worker_id: Some("w1".into()),
                started_at: Some(T0 + 1),
                finished_at: T0 + 2,
                outcome: "succeeded".into(),
                exit_code: Some(0),
                error: None,
                duration_ms: Some(0),
            },
        };
        (run.run.id, done)
    }

    /// The one trip a chained step's end costs reads what its advance
    /// needs: the run, the instance on the job with the job's end, and the
    /// step rows asked for.
    async fn one_trip_reads_the_run(db: Db) {
        let (run, done) = first_step_done(&db).await;
        let steps = ["b".to_string()];
        let (tx, written, ends): (Box<dyn FlowTx>, _, _) = match &db {
            Db::Sqlite(s) => {
                let (tx, w, e) = sqlite::SqliteFlowTx::complete_one(&s.write, &done, &steps)
                    .await
                    .unwrap();
                (Box::new(tx), w, e)
            }
            Db::Postgres(s) => {
                let (tx, w, e) = pg::PgFlowTx::complete_one(&s.pool, &s.step_lane, &done, &steps)
                    .await
                    .unwrap();
                (Box::new(tx), w, e)
            }
        };
        assert_eq!(written, vec![(done.id, Some(run), "succeeded".to_string())]);
        let ends = ends.expect("the run was read in the same trip");
        assert_eq!(ends.run.id, run);
        assert_eq!(ends.ended.len(), 1);
        let (instance, end) = &ends.ended[0];
        assert_eq!(
            (instance.step.as_str(), instance.status.as_str()),
            ("a", "running")
        );
        assert_eq!((end.job_id, end.status), (done.id, JobStatus::Succeeded));
        let names: Vec<&str> = ends.steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(names, vec!["b"], "only the steps asked for");
        // The run was taken in that trip: its end is not left in the
        // outbox for the advancer (deleted on SQLite, never written on
        // PostgreSQL).
        tx.commit().await.unwrap();
        assert_eq!(db.flow_advance(&noop_kinds(), T0 + 3).await.unwrap(), 0);
    }

    crate::on_both_databases!(one_trip_reads_the_run);
}
