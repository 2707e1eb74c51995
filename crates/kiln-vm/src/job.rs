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
        let duration_ms = started.elapsed().as_millis() as i64;
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
            Some(Ok(out)) => {
                let (stdout, cut_out) = cap(&out.stdout);
                let (stderr, cut_err) = cap(&out.stderr);
                let exit_code = out.exit_code.unwrap_or(128 + out.signal.unwrap_or(0));
                let result = JobResult {
                    exit_code,
                    stdout,
                    stderr,
                    duration_ms,
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
        }
    }
}
