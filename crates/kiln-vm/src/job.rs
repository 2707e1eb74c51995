//! The `vm` job kind: a fresh VM per attempt — boot, run one command,
//! collect the result, tear down — whatever way the attempt ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use kiln_core::{AttemptEnd, JobResult, LeasedJob};
use kiln_worker::JobHandler;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{Exec, VmManager, VmRequest};

/// Output kept inline per stream.
pub const OUTPUT_CAP: usize = 1 << 20;

#[derive(Clone, Debug, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmJobSpec {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    #[serde(default)]
    pub stdin: String,
    #[serde(default = "default_image")]
    pub image: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
}

fn default_image() -> String {
    "default".into()
}
fn default_vcpus() -> u8 {
    1
}
fn default_memory() -> u32 {
    128
}

impl VmJobSpec {
    pub fn parse(spec: &serde_json::Value) -> Result<VmJobSpec, String> {
        let spec: VmJobSpec = serde_json::from_value(spec.clone()).map_err(|e| e.to_string())?;
        if spec.command.is_empty() {
            return Err("command must not be empty".into());
        }
        if !(1..=8).contains(&spec.vcpus) {
            return Err("vcpus must be 1 to 8".into());
        }
        if !(64..=4096).contains(&spec.memory_mib) {
            return Err("memory_mib must be 64 to 4096".into());
        }
        Ok(spec)
    }
}

/// The attempt's end for a finished command: success on exit code 0.
fn exec_end(out: &crate::ExecOutput, started: Instant) -> AttemptEnd {
    let (stdout, cut_out) = cap(&out.stdout);
    let (stderr, cut_err) = cap(&out.stderr);
    let exit_code = out.exit_code.unwrap_or(128 + out.signal.unwrap_or(0));
    let result = JobResult {
        exit_code,
        stdout,
        stderr,
        duration_ms: started.elapsed().as_millis() as i64,
        truncated: cut_out || cut_err,
    };
    if exit_code == 0 {
        AttemptEnd::Succeeded(result)
    } else {
        AttemptEnd::Failed {
            error: format!("exit code {exit_code}"),
            result: Some(result),
            permanent: false,
        }
    }
}

pub fn cap(bytes: &[u8]) -> (String, bool) {
    let truncated = bytes.len() > OUTPUT_CAP;
    (
        String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_CAP)]).into_owned(),
        truncated,
    )
}

pub struct VmJobHandler(pub Arc<VmManager>);

#[async_trait::async_trait]
impl JobHandler for VmJobHandler {
    async fn run(&self, job: &LeasedJob, kill: CancellationToken) -> AttemptEnd {
        let spec = match VmJobSpec::parse(&job.spec) {
            Ok(spec) => spec,
            Err(error) => {
                return AttemptEnd::Failed {
                    result: None,
                    error: format!("invalid spec: {error}"),
                    permanent: true,
                }
            }
        };
        let started = Instant::now();
        let request = VmRequest {
            tenant: job.tenant.clone(),
            image: spec.image.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            ttl: Some(std::time::Duration::from_millis(
                job.timeout_ms.max(1) as u64 + 60_000,
            )),
            idle_timeout: None,
            labels: BTreeMap::from([("job".to_string(), job.id.to_string())]),
        };
        let vm = tokio::select! {
            vm = self.0.create(request) => vm,
            _ = kill.cancelled() => return AttemptEnd::Failed { result: None, error: "killed while booting".into(), permanent: false },
        };
        let vm = match vm {
            Ok(vm) => vm,
            Err(error) => {
                return AttemptEnd::Failed {
                    result: None,
                    error: error.to_string(),
                    permanent: false,
                }
            }
        };
        let outcome = async {
            let Some(agent) = self.0.agent(&job.tenant, &vm.id).await else {
                return Some(Err(crate::VmError::Agent("the VM vanished".into())));
            };
            let exec = Exec {
                command: spec.command.clone(),
                args: spec.args.clone(),
                env: spec.env.clone(),
                cwd: spec.cwd.clone(),
                ..Exec::default()
            };
            tokio::select! {
                out = agent.exec(exec, spec.stdin.as_bytes()) => Some(out),
                _ = kill.cancelled() => None,
            }
        }
        .await;
        self.0.delete(&job.tenant, &vm.id).await;
        match outcome {
            None => AttemptEnd::Failed {
                result: None,
                error: "killed".into(),
                permanent: false,
            },
            Some(Err(error)) => AttemptEnd::Failed {
                result: None,
                error: error.to_string(),
                permanent: false,
            },
            Some(Ok(out)) => exec_end(&out, started),
        }
    }
}

/// `vm:create`, `vm:execute` (alias `exec`) and `vm:delete`: the sandbox
/// lifecycle as queue tasks, for callers that want it queued. The VM lives
/// in the worker process that created it; see ARCHITECTURE.md for routing.
pub struct VmTaskHandler {
    pub manager: Arc<VmManager>,
    pub task: VmTask,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmTask {
    Create,
    Execute,
    Delete,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTask {
    #[serde(default = "default_image")]
    image: String,
    #[serde(default = "default_vcpus")]
    vcpus: u8,
    #[serde(default = "default_memory")]
    memory_mib: u32,
    ttl_s: Option<u64>,
    idle_timeout_s: Option<u64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecuteTask {
    vm_id: String,
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    #[serde(default)]
    stdin: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteTask {
    vm_id: String,
}

fn invalid(error: serde_json::Error) -> AttemptEnd {
    AttemptEnd::Failed {
        result: None,
        error: format!("invalid spec: {error}"),
        permanent: true,
    }
}

fn output(stdout: String, started: Instant) -> AttemptEnd {
    AttemptEnd::Succeeded(JobResult {
        exit_code: 0,
        stdout,
        stderr: String::new(),
        duration_ms: started.elapsed().as_millis() as i64,
        truncated: false,
    })
}

fn no_vm(id: &str) -> AttemptEnd {
    AttemptEnd::Failed {
        result: None,
        error: format!("vm {id} not found"),
        permanent: true,
    }
}

#[async_trait::async_trait]
impl JobHandler for VmTaskHandler {
    async fn run(&self, job: &LeasedJob, kill: CancellationToken) -> AttemptEnd {
        let started = Instant::now();
        let tenant = &job.tenant;
        match self.task {
            VmTask::Create => {
                let spec: CreateTask = match serde_json::from_value(job.spec.clone()) {
                    Ok(spec) => spec,
                    Err(error) => return invalid(error),
                };
                let request = VmRequest {
                    tenant: tenant.clone(),
                    image: spec.image,
                    vcpus: spec.vcpus.clamp(1, 8),
                    memory_mib: spec.memory_mib.clamp(64, 4096),
                    ttl: Some(std::time::Duration::from_secs(spec.ttl_s.unwrap_or(600))),
                    idle_timeout: spec.idle_timeout_s.map(std::time::Duration::from_secs),
                    labels: spec.labels,
                };
                tokio::select! {
                    created = self.manager.create(request) => match created {
                        Ok(vm) => output(serde_json::json!({"vm_id": vm.id, "boot_ms": vm.boot_ms}).to_string(), started),
                        Err(error) => AttemptEnd::Failed { result: None, error: error.to_string(), permanent: false },
                    },
                    _ = kill.cancelled() => AttemptEnd::Failed { result: None, error: "killed while booting".into(), permanent: false },
                }
            }
            VmTask::Execute => {
                let spec: ExecuteTask = match serde_json::from_value(job.spec.clone()) {
                    Ok(spec) => spec,
                    Err(error) => return invalid(error),
                };
                let Some(agent) = self.manager.agent(tenant, &spec.vm_id).await else {
                    return no_vm(&spec.vm_id);
                };
                let (exec_id, mut events) = match agent
                    .exec_stream(
                        Exec {
                            command: spec.command,
                            args: spec.args,
                            env: spec.env,
                            cwd: spec.cwd,
                            ..Exec::default()
                        },
                        spec.stdin.as_bytes(),
                    )
                    .await
                {
                    Ok(started) => started,
                    Err(error) => {
                        return AttemptEnd::Failed {
                            result: None,
                            error: error.to_string(),
                            permanent: false,
                        }
                    }
                };
                let out = loop {
                    tokio::select! {
                        event = events.recv() => match event {
                            Some(crate::ExecEvent::Exited(out)) => break out,
                            Some(_) => {}
                            None => return AttemptEnd::Failed { result: None, error: "the VM went away".into(), permanent: false },
                        },
                        _ = kill.cancelled() => {
                            // The VM stays; only the command dies.
                            let _ = agent.kill(exec_id, 9).await;
                            return AttemptEnd::Failed { result: None, error: "killed".into(), permanent: false };
                        }
                    }
                };
                exec_end(&out, started)
            }
            VmTask::Delete => {
                let spec: DeleteTask = match serde_json::from_value(job.spec.clone()) {
                    Ok(spec) => spec,
                    Err(error) => return invalid(error),
                };
                if self.manager.delete(tenant, &spec.vm_id).await {
                    output(String::new(), started)
                } else {
                    no_vm(&spec.vm_id)
                }
            }
        }
    }
}

/// Registers every VM kind on a handler set.
pub fn register(
    handlers: kiln_worker::Handlers,
    manager: &Arc<VmManager>,
) -> kiln_worker::Handlers {
    let task = |task| {
        Arc::new(VmTaskHandler {
            manager: manager.clone(),
            task,
        })
    };
    handlers
        .with("vm", Arc::new(VmJobHandler(manager.clone())))
        .with("vm:create", task(VmTask::Create))
        .with("vm:execute", task(VmTask::Execute))
        .with("exec", task(VmTask::Execute))
        .with("vm:delete", task(VmTask::Delete))
}
