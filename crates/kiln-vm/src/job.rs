//! What a VM is asked for and what runs in it, parsed and checked in one
//! place for the API, the `vm` kind and the `vm:*` tasks: [`VmShape`] (the
//! machine and its lifetime) and [`ExecRequest`] (one command). Both refuse
//! unknown fields, bound every number and refuse NUL in every string, so a
//! bad spec is refused at submit and nothing in one can overflow later.
//!
//! Then the kinds themselves: `vm` (a fresh VM per attempt: boot, run one
//! command, collect the result, tear down, whatever way the attempt ends)
//! and the lifecycle tasks `vm:create`, `vm:execute` (alias `exec`) and
//! `vm:delete`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::files::{FileRef, JobFiles, BYTES_MAX, FILE_BYTES_MAX};
use kiln_core::job::limits::{LABELS_MAX, LABEL_VALUE_MAX};
use kiln_core::names::{check_guest_path, check_ident, check_name, check_text};
use kiln_core::{AttemptEnd, JobKinds, JobResult, LeasedJob};
use kiln_worker::secrets::{Opened, Recipient};
use kiln_worker::JobHandler;
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::agent::ExecOutput;
use crate::history::{Recording, Source};
use crate::net::NetworkSpec;
use crate::{Exec, VmManager, VmRequest};

pub const VCPUS_MAX: u8 = 8;
pub const MEMORY_MIB_MIN: u32 = 64;
pub const MEMORY_MIB_MAX: u32 = 4096;
/// The longest a VM may live or idle: a week.
pub const LIFETIME_S_MAX: u64 = 7 * 24 * 3600;
pub const DEFAULT_TTL_S: u64 = 600;
/// The longest a command may run: a day.
pub const TIMEOUT_MS_MAX: u64 = 24 * 3600 * 1000;
pub const COMMAND_MAX: usize = 4096;
pub const ARGS_MAX: usize = 1024;
pub const ENV_MAX: usize = 256;
/// Stdin given with the request (more can stream over a WebSocket).
pub const STDIN_MAX: usize = kiln_proto::BODY_MAX;

/// Why a spec was refused; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

fn refuse(message: impl ToString) -> InvalidSpec {
    InvalidSpec(message.to_string())
}

/// The machine a VM runs on and how long it lives.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "RawShape")]
pub struct VmShape {
    /// An image under the images directory (`[a-z0-9][a-z0-9-]*`).
    pub image: String,
    /// 1 to 8.
    pub vcpus: u8,
    /// 64 to 4096.
    pub memory_mib: u32,
    /// Deleted this long after creation (1 s to a week; default 600 s).
    pub ttl_s: u64,
    /// Deleted after this long without use (1 s to a week).
    pub idle_timeout_s: Option<u64>,
    /// Absent: no network at all (only `lo` in the guest).
    pub network: Option<NetworkSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShape {
    image: Option<String>,
    vcpus: Option<u8>,
    memory_mib: Option<u32>,
    ttl_s: Option<u64>,
    idle_timeout_s: Option<u64>,
    network: Option<NetworkSpec>,
}

impl VmShape {
    /// The fields of a shape, for specs that hold one among other fields.
    pub const FIELDS: [&'static str; 6] = [
        "image",
        "vcpus",
        "memory_mib",
        "ttl_s",
        "idle_timeout_s",
        "network",
    ];
    /// The machine alone (a `vm` job's VM lives as long as its attempt).
    pub const MACHINE_FIELDS: [&'static str; 4] = ["image", "vcpus", "memory_mib", "network"];

    pub fn request(&self, tenant: &str, labels: BTreeMap<String, String>) -> VmRequest {
        VmRequest {
            tenant: tenant.to_string(),
            image: self.image.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            ttl: Some(Duration::from_secs(self.ttl_s)),
            idle_timeout: self.idle_timeout_s.map(Duration::from_secs),
            labels,
            network: self.network.clone(),
        }
    }
}

impl Default for VmShape {
    fn default() -> VmShape {
        VmShape {
            image: "default".into(),
            vcpus: 1,
            memory_mib: 128,
            ttl_s: DEFAULT_TTL_S,
            idle_timeout_s: None,
            network: None,
        }
    }
}

impl TryFrom<RawShape> for VmShape {
    type Error = InvalidSpec;

    fn try_from(raw: RawShape) -> Result<VmShape, InvalidSpec> {
        let defaults = VmShape::default();
        let shape = VmShape {
            image: raw.image.unwrap_or(defaults.image),
            vcpus: raw.vcpus.unwrap_or(defaults.vcpus),
            memory_mib: raw.memory_mib.unwrap_or(defaults.memory_mib),
            ttl_s: raw.ttl_s.unwrap_or(defaults.ttl_s),
            idle_timeout_s: raw.idle_timeout_s,
            network: raw.network,
        };
        check_ident("image", &shape.image).map_err(refuse)?;
        if !(1..=VCPUS_MAX).contains(&shape.vcpus) {
            return Err(refuse(format_args!("vcpus must be 1 to {VCPUS_MAX}")));
        }
        if !(MEMORY_MIB_MIN..=MEMORY_MIB_MAX).contains(&shape.memory_mib) {
            return Err(refuse(format_args!(
                "memory_mib must be {MEMORY_MIB_MIN} to {MEMORY_MIB_MAX}"
            )));
        }
        for (what, seconds) in [
            ("ttl_s", Some(shape.ttl_s)),
            ("idle_timeout_s", shape.idle_timeout_s),
        ] {
            if seconds.is_some_and(|s| !(1..=LIFETIME_S_MAX).contains(&s)) {
                return Err(refuse(format_args!(
                    "{what} must be 1 to {LIFETIME_S_MAX} seconds"
                )));
            }
        }
        Ok(shape)
    }
}

/// One command to run in a VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "RawExec")]
pub struct ExecRequest {
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Absolute path inside the VM.
    pub cwd: Option<String>,
    pub stdin: String,
    /// Killed after this long (1 ms to a day).
    pub timeout_ms: Option<u64>,
    /// The tenant's secrets to write at `/run/secrets/<name>` (mode 0400)
    /// for this command; removed when it ends.
    pub secrets: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    #[serde(default)]
    stdin: String,
    timeout_ms: Option<u64>,
    #[serde(default)]
    secrets: Vec<String>,
}

impl TryFrom<RawExec> for ExecRequest {
    type Error = InvalidSpec;

    fn try_from(raw: RawExec) -> Result<ExecRequest, InvalidSpec> {
        let request = ExecRequest {
            command: raw.command,
            args: raw.args,
            env: raw.env,
            cwd: raw.cwd,
            stdin: raw.stdin,
            timeout_ms: raw.timeout_ms,
            secrets: raw.secrets,
        };
        request.check()?;
        Ok(request)
    }
}

impl ExecRequest {
    fn check(&self) -> Result<(), InvalidSpec> {
        if self.command.is_empty() {
            return Err(refuse("command must not be empty"));
        }
        check_text("command", &self.command, COMMAND_MAX).map_err(refuse)?;
        if self.args.len() > ARGS_MAX {
            return Err(refuse(format_args!("at most {ARGS_MAX} args")));
        }
        for arg in &self.args {
            check_text("args", arg, kiln_proto::HEADER_MAX).map_err(refuse)?;
        }
        if self.env.len() > ENV_MAX {
            return Err(refuse(format_args!("at most {ENV_MAX} env variables")));
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') {
                return Err(refuse("env names must be non-empty and without '='"));
            }
            check_text("env name", name, COMMAND_MAX).map_err(refuse)?;
            check_text("env value", value, kiln_proto::HEADER_MAX).map_err(refuse)?;
        }
        if let Some(cwd) = &self.cwd {
            check_guest_path("cwd", cwd).map_err(refuse)?;
        }
        check_text("stdin", &self.stdin, STDIN_MAX).map_err(refuse)?;
        kiln_core::secrets::check_requested(&self.secrets).map_err(refuse)?;
        if self
            .timeout_ms
            .is_some_and(|ms| !(1..=TIMEOUT_MS_MAX).contains(&ms))
        {
            return Err(refuse(format_args!(
                "timeout_ms must be 1 to {TIMEOUT_MS_MAX}"
            )));
        }
        // The whole request must fit in one frame header.
        let header = serde_json::to_vec(&kiln_proto::Request::Exec(self.exec(None, false)))
            .map_err(refuse)?;
        if header.len() > kiln_proto::HEADER_MAX - 256 {
            return Err(refuse(format_args!(
                "command, args, env and cwd must encode in under {} bytes",
                kiln_proto::HEADER_MAX - 256
            )));
        }
        Ok(())
    }

    /// The agent's exec; `default_timeout_ms` when the request names none,
    /// and `stdin_open` keeps stdin open for more (streamed exec).
    pub fn exec(&self, default_timeout_ms: Option<u64>, stdin_open: bool) -> Exec {
        Exec {
            command: self.command.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            timeout_ms: self.timeout_ms.or(default_timeout_ms),
            stdin_open,
            ..Exec::default()
        }
    }
}

/// Moves the named fields of a JSON object into an object of their own;
/// the rest stays. Specs that join a shape or an exec with other fields
/// are parsed as the two parts, each refusing what it does not know.
fn split(spec: &Value, fields: &[&str]) -> Result<(Value, Value), InvalidSpec> {
    let Value::Object(all) = spec else {
        return Err(refuse("spec must be an object"));
    };
    let (named, rest): (serde_json::Map<_, _>, serde_json::Map<_, _>) = all
        .clone()
        .into_iter()
        .partition(|(key, _)| fields.contains(&key.as_str()));
    Ok((Value::Object(named), Value::Object(rest)))
}

fn parse<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, InvalidSpec> {
    serde_json::from_value(value).map_err(refuse)
}

/// Labels on a VM: at most 32, keys by the name grammar, values bounded.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), InvalidSpec> {
    if labels.len() > LABELS_MAX {
        return Err(refuse(format_args!("at most {LABELS_MAX} labels")));
    }
    for (key, value) in labels {
        check_name("label key", key).map_err(refuse)?;
        check_text("label value", value, LABEL_VALUE_MAX).map_err(refuse)?;
    }
    Ok(())
}

/// The `vm` kind: a machine (image, vcpus, memory_mib), one command, and
/// the files it takes and keeps (paths relative to `cwd`, or to `/`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "Value")]
pub struct VmJobSpec {
    #[serde(flatten)]
    pub shape: VmShape,
    #[serde(flatten)]
    pub exec: ExecRequest,
    #[serde(flatten)]
    pub files: JobFiles,
}

impl TryFrom<Value> for VmJobSpec {
    type Error = InvalidSpec;

    fn try_from(spec: Value) -> Result<VmJobSpec, InvalidSpec> {
        VmJobSpec::parse(&spec)
    }
}

impl VmJobSpec {
    pub fn parse(spec: &Value) -> Result<VmJobSpec, InvalidSpec> {
        let (shape, rest) = split(spec, &VmShape::MACHINE_FIELDS)?;
        let (files, exec) = split(&rest, &JobFiles::FIELDS)?;
        let files: JobFiles = parse(files)?;
        files.check().map_err(refuse)?;
        Ok(VmJobSpec {
            shape: parse(shape)?,
            exec: parse(exec)?,
            files,
        })
    }

    /// Where a file path of the spec is in the guest.
    fn guest_path(&self, rel: &str) -> String {
        let base = self
            .exec
            .cwd
            .as_deref()
            .unwrap_or("/")
            .trim_end_matches('/');
        format!("{base}/{rel}")
    }
}

/// `POST /vms` and `vm:create`: a shape and labels.
#[derive(Clone, Debug, PartialEq, Eq, Default, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "Value")]
pub struct CreateVmSpec {
    #[serde(flatten)]
    pub shape: VmShape,
    pub labels: BTreeMap<String, String>,
    /// The tenant's secrets to write at `/run/secrets/<name>` (mode 0400)
    /// for the VM's whole life.
    pub secrets: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateExtras {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    secrets: Vec<String>,
}

impl TryFrom<Value> for CreateVmSpec {
    type Error = InvalidSpec;

    fn try_from(spec: Value) -> Result<CreateVmSpec, InvalidSpec> {
        let (shape, extras) = split(&spec, &VmShape::FIELDS)?;
        let extras: CreateExtras = parse(extras)?;
        check_labels(&extras.labels)?;
        kiln_core::secrets::check_requested(&extras.secrets).map_err(refuse)?;
        Ok(CreateVmSpec {
            shape: parse(shape)?,
            labels: extras.labels,
            secrets: extras.secrets,
        })
    }
}

/// `vm:execute` (and `exec`): a command for a VM that exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecuteVmSpec {
    pub vm_id: String,
    pub exec: ExecRequest,
}

/// `vm:delete`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteVmSpec {
    pub vm_id: String,
}

impl ExecuteVmSpec {
    pub fn parse(spec: &Value) -> Result<ExecuteVmSpec, InvalidSpec> {
        let (target, exec) = split(spec, &["vm_id"])?;
        let DeleteVmSpec { vm_id } = DeleteVmSpec::parse(&target)?;
        Ok(ExecuteVmSpec {
            vm_id,
            exec: parse(exec)?,
        })
    }
}

impl DeleteVmSpec {
    pub fn parse(spec: &Value) -> Result<DeleteVmSpec, InvalidSpec> {
        let spec: DeleteVmSpec = parse(spec.clone())?;
        check_name("vm_id", &spec.vm_id).map_err(refuse)?;
        Ok(spec)
    }
}

fn check_vm(spec: &Value) -> Result<(), String> {
    VmJobSpec::parse(spec).map(drop).map_err(|e| e.0)
}

fn check_create(spec: &Value) -> Result<(), String> {
    parse::<CreateVmSpec>(spec.clone())
        .map(drop)
        .map_err(|e| e.0)
}

/// A machine's shape as admission policies see it, defaults filled in.
pub fn describe_shape(shape: &VmShape) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    fields.insert("image".into(), Value::from(shape.image.clone()));
    fields.insert("vcpus".into(), Value::from(shape.vcpus));
    fields.insert("memory_mib".into(), Value::from(shape.memory_mib));
    if let Some(network) = &shape.network {
        fields.insert("network".into(), network.describe());
    }
    fields
}

/// The shape among a spec's fields, whatever the others are.
fn describe_fields(spec: &Value, fields: &[&str]) -> serde_json::Map<String, Value> {
    split(spec, fields)
        .and_then(|(shape, _)| parse::<VmShape>(shape))
        .map(|shape| describe_shape(&shape))
        .unwrap_or_default()
}

fn describe_vm(spec: &Value) -> serde_json::Map<String, Value> {
    describe_fields(spec, &VmShape::MACHINE_FIELDS)
}

fn describe_create(spec: &Value) -> serde_json::Map<String, Value> {
    describe_fields(spec, &VmShape::FIELDS)
}

fn check_execute(spec: &Value) -> Result<(), String> {
    ExecuteVmSpec::parse(spec).map(drop).map_err(|e| e.0)
}

fn check_delete(spec: &Value) -> Result<(), String> {
    DeleteVmSpec::parse(spec).map(drop).map_err(|e| e.0)
}

/// A command for a VM of one host of many (`vm-…@<host>`) is stored as
/// `<kind>@<host>`, a kind only that host's worker handles: the lease's
/// kind index routes it, and no other host ever takes it to fail it.
fn route_to_owner(kind: &str, spec: &Value) -> Option<String> {
    let host = crate::manager::owner_of(spec.get("vm_id")?.as_str()?)?;
    Some(format!("{kind}@{host}"))
}

/// The kinds a VM host of tag `host` handles on top of the others: its own
/// VMs' commands.
pub fn owned_kinds(host: &str) -> [String; 3] {
    ["vm:execute", "exec", "vm:delete"].map(|kind| format!("{kind}@{host}"))
}

/// Registers the spec check of every VM kind.
pub fn job_kinds(kinds: &mut JobKinds) {
    kinds
        .add_with_files("vm", check_vm)
        .add_described("vm", describe_vm)
        .add("vm:create", check_create)
        .add_described("vm:create", describe_create)
        .add_routed("vm:execute", check_execute, route_to_owner)
        .add_routed("exec", check_execute, route_to_owner)
        .add_routed("vm:delete", check_delete, route_to_owner);
    for kind in ["vm", "vm:create", "vm:execute", "exec"] {
        kinds.with_secrets(kind);
    }
}

/// Output as a job stores it: text, with NUL (which PostgreSQL refuses in
/// text and jsonb) replaced.
fn stored_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}")
}

/// The attempt's end for a finished command: success on exit code 0.
fn exec_end(out: &ExecOutput, started: Instant) -> AttemptEnd {
    let exit_code = out.status();
    let result = JobResult {
        exit_code,
        stdout: stored_text(&out.stdout),
        stderr: stored_text(&out.stderr),
        duration_ms: started.elapsed().as_millis().min(i64::MAX as u128) as i64,
        truncated: out.truncated,
        ..Default::default()
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

fn failed(error: impl std::fmt::Display, permanent: bool) -> AttemptEnd {
    AttemptEnd::Failed {
        result: None,
        error: kiln_core::names::sanitise_message(&error.to_string(), 4096),
        permanent,
    }
}

fn invalid(error: InvalidSpec) -> AttemptEnd {
    failed(format_args!("invalid spec: {error}"), true)
}

/// Runs `exec` in the VM until it ends or `kill` fires; output capped as
/// it arrives. Dropping the stream on a kill kills the command.
async fn run_exec(
    agent: &crate::AgentConn,
    exec: Exec,
    stdin: &[u8],
    kill: &CancellationToken,
    tap: Option<&kiln_logs::LogTap>,
    opened: &Opened,
) -> Option<Result<ExecOutput, crate::agent::AgentError>> {
    let redactor = match agent.redactor_with(&opened.values) {
        Ok(redactor) => redactor,
        Err(error) => return Some(Err(crate::agent::AgentError::TooLarge(error))),
    };
    let out = tokio::select! {
        out = agent.exec_tapped(exec, stdin, tap, redactor.as_ref()) => Some(out),
        _ = kill.cancelled() => None,
    };
    if let Some(tap) = tap {
        tap.finish().await;
    }
    out
}

/// A tap for a job's command in the VM `vm_id`.
fn job_tap(
    manager: &VmManager,
    job: &LeasedJob,
    vm_id: &str,
    exec_id: Option<i64>,
) -> Option<kiln_logs::LogTap> {
    manager.log_tap(kiln_logs::Origin {
        vm_id: Some(vm_id.to_string()),
        exec_id,
        ..kiln_logs::Origin::job(&job.tenant, job.id, job.attempt)
    })
}

pub struct VmJobHandler {
    pub manager: Arc<VmManager>,
    /// Where job files are kept and fetched.
    pub blobs: kiln_blob::BlobStore,
}

impl VmJobHandler {
    /// Writes the spec's inputs into the guest before the command runs. The
    /// error says whether another attempt could do better: an input that
    /// does not exist never will.
    async fn place_inputs(
        &self,
        job: &LeasedJob,
        spec: &VmJobSpec,
        agent: &crate::AgentConn,
    ) -> Result<(), (String, bool)> {
        let mut total = 0u64;
        for input in &spec.files.inputs {
            let bytes = self
                .blobs
                .input_file(&job.tenant, input)
                .await
                .map_err(|e| {
                    let missing = matches!(e, kiln_blob::BlobError::NotFound(_));
                    (
                        format!("input {} of job {}: {e}", input.path, input.job),
                        missing,
                    )
                })?;
            total += bytes.len() as u64;
            if total > BYTES_MAX {
                return Err((format!("inputs are over {BYTES_MAX} bytes"), true));
            }
            let to = spec.guest_path(input.destination());
            agent
                .write_file(&to, &bytes, None)
                .await
                .map_err(|e| (format!("input {}: {e}", input.destination()), false))?;
        }
        Ok(())
    }

    /// Reads the declared outputs from the guest and keeps them.
    async fn keep_outputs(
        &self,
        job: &LeasedJob,
        spec: &VmJobSpec,
        agent: &crate::AgentConn,
    ) -> Result<Vec<FileRef>, String> {
        let mut files = Vec::with_capacity(spec.files.outputs.len());
        let mut total = 0u64;
        for path in &spec.files.outputs {
            let bytes = agent
                .read_file(&spec.guest_path(path))
                .await
                .map_err(|e| match e {
                    crate::agent::AgentError::Guest {
                        kind: kiln_proto::ErrorKind::NotFound,
                        ..
                    } => {
                        format!("output {path} was not produced")
                    }
                    other => format!("output {path}: {other}"),
                })?;
            total += bytes.len() as u64;
            if bytes.len() as u64 > FILE_BYTES_MAX || total > BYTES_MAX {
                return Err(format!(
                    "output {path} takes the outputs over their size limit"
                ));
            }
            files.push(
                self.blobs
                    .keep_file(&job.tenant, job.id, path, bytes::Bytes::from(bytes))
                    .await
                    .map_err(|e| format!("output {path}: {e}"))?,
            );
        }
        Ok(files)
    }
}

#[async_trait::async_trait]
impl JobHandler for VmJobHandler {
    async fn run(&self, job: &LeasedJob, kill: CancellationToken) -> AttemptEnd {
        let spec = match VmJobSpec::parse(&job.spec) {
            Ok(spec) => spec,
            Err(error) => return invalid(error),
        };
        let started = Instant::now();
        // Opened before the boot: a job that cannot have its secrets fails
        // without one.
        let opened = match self
            .manager
            .open_secrets(&job.tenant, &spec.exec.secrets, &Recipient::job(job.id))
            .await
        {
            Ok(opened) => opened,
            Err(error) => return failed(error, false),
        };
        let job_ms = u64::try_from(job.timeout_ms.max(1)).unwrap_or(1);
        let mut request = spec.shape.request(
            &job.tenant,
            BTreeMap::from([("job".to_string(), job.id.to_string())]),
        );
        request.ttl = Some(Duration::from_millis(job_ms.saturating_add(60_000)));
        let vm = tokio::select! {
            vm = self.manager.create(request) => vm,
            _ = kill.cancelled() => return failed("killed while booting", false),
        };
        let vm = match vm {
            Ok(vm) => vm,
            Err(error) => return failed(error, false),
        };
        let end = match self.manager.agent(&job.tenant, &vm.id).await {
            None => failed(crate::agent::AgentError::Gone, false),
            // The VM dies with its files.
            Some(agent) => match agent.keep_secrets(&opened.values).await {
                Ok(()) => {
                    self.exec_in(job, &spec, &agent, &vm.id, started, &kill)
                        .await
                }
                Err(error) => failed(format_args!("secrets: {error}"), false),
            },
        };
        self.manager.delete(&job.tenant, &vm.id).await;
        end
    }
}

impl VmJobHandler {
    /// The attempt inside a booted VM: inputs, the command, outputs.
    async fn exec_in(
        &self,
        job: &LeasedJob,
        spec: &VmJobSpec,
        agent: &crate::AgentConn,
        vm_id: &str,
        started: Instant,
        kill: &CancellationToken,
    ) -> AttemptEnd {
        if !spec.files.inputs.is_empty() {
            let placed = tokio::select! {
                placed = self.place_inputs(job, spec, agent) => placed,
                _ = kill.cancelled() => return failed("killed", false),
            };
            if let Err((error, permanent)) = placed {
                return failed(error, permanent);
            }
        }
        let job_ms = u64::try_from(job.timeout_ms.max(1)).unwrap_or(1);
        let exec = spec.exec.exec(Some(job_ms), false);
        let recording = Recording::start(
            self.manager.history(),
            &job.tenant,
            vm_id,
            Source::Job { id: job.id },
            &spec.exec,
        )
        .await;
        let tap = job_tap(&self.manager, job, vm_id, recording.id());
        let mut end = match run_exec(
            agent,
            exec,
            spec.exec.stdin.as_bytes(),
            kill,
            tap.as_ref(),
            // The VM's kept secrets are redacted from every command.
            &Opened::none(),
        )
        .await
        {
            None => {
                recording.abandoned("the job was killed").await;
                return failed("killed", false);
            }
            Some(Err(error)) => {
                let end = failed(&error, false);
                recording.failed(error).await;
                return end;
            }
            Some(Ok(out)) => {
                recording.exited(&out).await;
                exec_end(&out, started)
            }
        };
        if let AttemptEnd::Succeeded(result) = &mut end {
            if !spec.files.outputs.is_empty() {
                let kept = tokio::select! {
                    kept = self.keep_outputs(job, spec, agent) => kept,
                    _ = kill.cancelled() => Err("killed".to_string()),
                };
                match kept {
                    Ok(files) => result.files = files,
                    Err(error) => {
                        return AttemptEnd::Failed {
                            result: Some(result.clone()),
                            error,
                            permanent: false,
                        }
                    }
                }
            }
        }
        end
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

fn output(stdout: String, started: Instant) -> AttemptEnd {
    AttemptEnd::Succeeded(JobResult {
        exit_code: 0,
        stdout,
        stderr: String::new(),
        duration_ms: started.elapsed().as_millis().min(i64::MAX as u128) as i64,
        truncated: false,
        ..Default::default()
    })
}

fn no_vm(id: &str) -> AttemptEnd {
    failed(format_args!("vm {id} not found"), true)
}

impl VmTaskHandler {
    async fn create(&self, job: &LeasedJob, kill: CancellationToken) -> AttemptEnd {
        let spec: CreateVmSpec = match parse(job.spec.clone()) {
            Ok(spec) => spec,
            Err(error) => return invalid(error),
        };
        let started = Instant::now();
        let opened = match self
            .manager
            .open_secrets(&job.tenant, &spec.secrets, &Recipient::job(job.id))
            .await
        {
            Ok(opened) => opened,
            Err(error) => return failed(error, false),
        };
        let request = spec.shape.request(&job.tenant, spec.labels);
        let vm = tokio::select! {
            created = self.manager.create(request) => match created {
                Ok(vm) => vm,
                Err(error) => return failed(error, false),
            },
            _ = kill.cancelled() => return failed("killed while booting", false),
        };
        if let Err(error) = self.give_for_life(&job.tenant, &vm.id, &opened).await {
            self.manager.delete(&job.tenant, &vm.id).await;
            return failed(format_args!("secrets: {error}"), false);
        }
        output(
            serde_json::json!({"vm_id": vm.id, "boot_ms": vm.boot_ms}).to_string(),
            started,
        )
    }

    /// Writes a new VM's secrets, kept for its whole life.
    async fn give_for_life(
        &self,
        tenant: &str,
        vm_id: &str,
        opened: &Opened,
    ) -> Result<(), crate::agent::AgentError> {
        if opened.values.is_empty() {
            return Ok(());
        }
        let agent = self
            .manager
            .agent(tenant, vm_id)
            .await
            .ok_or(crate::agent::AgentError::Gone)?;
        agent.keep_secrets(&opened.values).await
    }

    async fn execute(&self, job: &LeasedJob, kill: CancellationToken) -> AttemptEnd {
        let spec = match ExecuteVmSpec::parse(&job.spec) {
            Ok(spec) => spec,
            Err(error) => return invalid(error),
        };
        let started = Instant::now();
        let Some(agent) = self.manager.use_agent(&job.tenant, &spec.vm_id).await else {
            return no_vm(&spec.vm_id);
        };
        let opened = match self
            .manager
            .open_secrets(&job.tenant, &spec.exec.secrets, &Recipient::job(job.id))
            .await
        {
            Ok(opened) => opened,
            Err(error) => return failed(error, false),
        };
        let hold = match agent.hold_secrets(&opened.values).await {
            Ok(hold) => hold,
            Err(error) => return failed(format_args!("secrets: {error}"), false),
        };
        let job_ms = u64::try_from(job.timeout_ms.max(1)).unwrap_or(1);
        let recording = Recording::start(
            self.manager.history(),
            &job.tenant,
            &spec.vm_id,
            Source::Job { id: job.id },
            &spec.exec,
        )
        .await;
        let tap = job_tap(&self.manager, job, &spec.vm_id, recording.id());
        // The VM stays; on a kill only the command dies.
        let out = run_exec(
            &agent,
            spec.exec.exec(Some(job_ms), false),
            spec.exec.stdin.as_bytes(),
            &kill,
            tap.as_ref(),
            &opened,
        )
        .await;
        // The files go with the command (unless another command holds them).
        if let Err(error) = hold.release().await {
            tracing::warn!(%error, vm = %spec.vm_id, "a command's secret files could not be removed");
        }
        match out {
            None => {
                recording.abandoned("the job was killed").await;
                failed("killed", false)
            }
            Some(Err(error)) => {
                let end = failed(&error, false);
                recording.failed(error).await;
                end
            }
            Some(Ok(out)) => {
                recording.exited(&out).await;
                exec_end(&out, started)
            }
        }
    }

    async fn delete(&self, job: &LeasedJob) -> AttemptEnd {
        let spec = match DeleteVmSpec::parse(&job.spec) {
            Ok(spec) => spec,
            Err(error) => return invalid(error),
        };
        if self.manager.delete(&job.tenant, &spec.vm_id).await {
            output(String::new(), Instant::now())
        } else {
            no_vm(&spec.vm_id)
        }
    }
}

#[async_trait::async_trait]
impl JobHandler for VmTaskHandler {
    async fn run(&self, job: &LeasedJob, kill: CancellationToken) -> AttemptEnd {
        match self.task {
            VmTask::Create => self.create(job, kill).await,
            VmTask::Execute => self.execute(job, kill).await,
            VmTask::Delete => self.delete(job).await,
        }
    }
}

/// Registers every VM kind on a handler set.
pub fn register(
    handlers: kiln_worker::Handlers,
    manager: &Arc<VmManager>,
    blobs: &kiln_blob::BlobStore,
) -> kiln_worker::Handlers {
    let task = |task| {
        Arc::new(VmTaskHandler {
            manager: manager.clone(),
            task,
        })
    };
    let mut handlers = handlers
        .with(
            "vm",
            Arc::new(VmJobHandler {
                manager: manager.clone(),
                blobs: blobs.clone(),
            }),
        )
        .with("vm:create", task(VmTask::Create))
        .with("vm:execute", task(VmTask::Execute))
        .with("exec", task(VmTask::Execute))
        .with("vm:delete", task(VmTask::Delete));
    if let Some(host) = manager.host_tag() {
        let [execute, exec, delete] = owned_kinds(host);
        handlers = handlers
            .with(&execute, task(VmTask::Execute))
            .with(&exec, task(VmTask::Execute))
            .with(&delete, task(VmTask::Delete));
    }
    handlers
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commands_for_a_vm_of_one_host_of_many_go_to_that_host() {
        let mut kinds = JobKinds::new();
        job_kinds(&mut kinds);
        let remote = json!({"vm_id": "vm-1a2b@host-7", "command": "true"});
        let local = json!({"vm_id": "vm-1a2b", "command": "true"});
        assert_eq!(
            kinds.stored_kind("vm:execute", &remote),
            "vm:execute@host-7"
        );
        assert_eq!(kinds.stored_kind("exec", &remote), "exec@host-7");
        assert_eq!(kinds.stored_kind("vm:execute", &local), "vm:execute");
        assert_eq!(
            kinds.stored_kind("vm:delete", &json!({"vm_id": "vm-1@h"})),
            "vm:delete@h"
        );
        // A create is placed by whoever leases it; a `vm` job owns its VM.
        assert_eq!(kinds.stored_kind("vm:create", &remote), "vm:create");
        assert_eq!(kinds.stored_kind("vm", &remote), "vm");
        assert_eq!(owned_kinds("h"), ["vm:execute@h", "exec@h", "vm:delete@h"]);
        for kind in owned_kinds(&"x".repeat(crate::manager::HOST_TAG_MAX)) {
            kiln_core::names::check_name("kind", &kind).unwrap();
        }
    }

    #[test]
    fn policies_see_the_shape_a_vm_runs_with() {
        let mut kinds = JobKinds::new();
        job_kinds(&mut kinds);
        let fields = |kind: &str, spec: Value| Value::Object(kinds.describe(kind, &spec));
        // Defaults filled in where the spec is silent.
        assert_eq!(
            fields("vm", json!({"command": "true", "secrets": ["db"]})),
            json!({"image": "default", "vcpus": 1, "memory_mib": 128, "secrets": ["db"]})
        );
        assert_eq!(
            fields(
                "vm:create",
                json!({"memory_mib": 512, "vcpus": 2, "labels": {"a": "b"}})
            ),
            json!({"image": "default", "vcpus": 2, "memory_mib": 512})
        );
        // A kind without a describer shows what its spec names.
        assert_eq!(
            fields("vm:execute", json!({"vm_id": "vm-1", "command": "true"})),
            json!({})
        );
    }

    #[test]
    fn host_tags_fit_in_ids_and_kinds() {
        use crate::manager::{host_tag, owner_of, HOST_TAG_MAX};
        assert_eq!(host_tag("worker-1-4242"), "worker-1-4242");
        let long = host_tag(&format!("{}-1", "h".repeat(80)));
        assert!(
            long.len() <= HOST_TAG_MAX && long.starts_with('h'),
            "{long}"
        );
        assert_ne!(host_tag("a@b-1"), "a@b-1");
        assert_eq!(owner_of("vm-12@worker-1"), Some("worker-1"));
        assert_eq!(owner_of("vm-12"), None);
        assert_eq!(owner_of("vm-12@"), None);
        let id = format!("vm-{}@{}", "f".repeat(16), "x".repeat(HOST_TAG_MAX));
        kiln_core::names::check_name("vm id", &id).unwrap();
    }

    /// Checks `spec` under `kind`: `Ok` or the start of the error message.
    fn check(kind: &str, spec: Value, expect: Result<(), &str>) {
        let shown: String = spec.to_string().chars().take(200).collect();
        let mut kinds = JobKinds::new();
        job_kinds(&mut kinds);
        let got = kinds.check(kind, &spec).map_err(|e| match e {
            kiln_core::SpecError::Invalid(message) => message,
            other => panic!("{other}"),
        });
        match (got, expect) {
            (Ok(()), Ok(())) => {}
            (Err(message), Err(start)) => assert!(
                message.contains(start),
                "{kind} {shown}: {message:?} does not say {start:?}"
            ),
            (got, expect) => panic!("{kind} {shown}: got {got:?}, expected {expect:?}"),
        }
    }

    #[test]
    fn vm_specs() {
        let ok = Ok(());
        check("vm", json!({"command": "true"}), ok);
        check(
            "vm",
            json!({"command": "sh", "args": ["-c", "x"], "image": "default", "vcpus": 2, "memory_mib": 256, "timeout_ms": 5000, "env": {"A": "b"}, "cwd": "/tmp", "stdin": "in"}),
            ok,
        );
        check("vm", json!({"args": []}), Err("missing field `command`"));
        check(
            "vm",
            json!({"command": ""}),
            Err("command must not be empty"),
        );
        check(
            "vm",
            json!({"command": "x", "nope": 1}),
            Err("unknown field `nope`"),
        );
        check(
            "vm",
            json!({"command": "x", "a\u{0}": 1}),
            Err("unknown field"),
        );
        check(
            "vm",
            json!({"command": "x", "ttl_s": 5}),
            Err("unknown field `ttl_s`"),
        );
        check(
            "vm",
            json!({"command": "x", "image": "../x"}),
            Err("image must start"),
        );
        check(
            "vm",
            json!({"command": "x", "image": "/tmp/x"}),
            Err("image must start"),
        );
        check(
            "vm",
            json!({"command": "x", "image": "a'b"}),
            Err("image may hold only"),
        );
        check(
            "vm",
            json!({"command": "x", "image": ""}),
            Err("image must be 1 to"),
        );
        check(
            "vm",
            json!({"command": "x", "vcpus": 0}),
            Err("vcpus must be 1 to 8"),
        );
        check(
            "vm",
            json!({"command": "x", "vcpus": 300}),
            Err("invalid value"),
        );
        check(
            "vm",
            json!({"command": "x", "memory_mib": 1u64 << 40}),
            Err("invalid value"),
        );
        check(
            "vm",
            json!({"command": "x", "memory_mib": 8192}),
            Err("memory_mib must be"),
        );
        check(
            "vm",
            json!({"command": "x", "timeout_ms": 0}),
            Err("timeout_ms must be"),
        );
        check(
            "vm",
            json!({"command": "x", "timeout_ms": u64::MAX}),
            Err("timeout_ms must be"),
        );
        check(
            "vm",
            json!({"command": "a\u{0}b"}),
            Err("command contains a NUL"),
        );
        check(
            "vm",
            json!({"command": "x", "args": ["\u{0}"]}),
            Err("args contains a NUL"),
        );
        check(
            "vm",
            json!({"command": "x", "env": {"A\u{0}": "b"}}),
            Err("env name contains"),
        );
        check(
            "vm",
            json!({"command": "x", "env": {"A=B": "b"}}),
            Err("env names must"),
        );
        check(
            "vm",
            json!({"command": "x", "env": {"A": "\u{0}"}}),
            Err("env value contains"),
        );
        check(
            "vm",
            json!({"command": "x", "cwd": "tmp"}),
            Err("cwd must be an absolute"),
        );
        check(
            "vm",
            json!({"command": "x", "stdin": "\u{0}"}),
            Err("stdin contains a NUL"),
        );
        check(
            "vm",
            json!({"command": "x", "args": vec!["\u{1}".repeat(20); 1000]}),
            Err("must encode in under"),
        );
        check(
            "vm",
            json!({"command": "x", "args": vec!["a"; 2000]}),
            Err("at most 1024 args"),
        );
        check("vm", json!(["command"]), Err("spec must be an object"));
        check(
            "vm",
            json!({"command": "x", "secrets": ["db", "api-key"]}),
            ok,
        );
        check(
            "vm",
            json!({"command": "x", "secrets": ["/etc/passwd"]}),
            Err("secrets[0]"),
        );
        check(
            "vm:execute",
            json!({"vm_id": "vm-1", "command": "x", "secrets": ["a", "a"]}),
            Err("twice"),
        );
        check("vm:create", json!({"secrets": ["db"]}), ok);
        check("vm:create", json!({"secrets": ["."]}), Err("secrets[0]"));
        check(
            "vm:delete",
            json!({"vm_id": "vm-1", "secrets": ["db"]}),
            Err("unknown field"),
        );
    }

    #[test]
    fn vm_task_specs() {
        let ok = Ok(());
        check("vm:create", json!({}), ok);
        check(
            "vm:create",
            json!({"image": "default", "vcpus": 1, "memory_mib": 128, "ttl_s": 60, "idle_timeout_s": 30, "labels": {"team": "a"}}),
            ok,
        );
        check(
            "vm:create",
            json!({"image": "../x"}),
            Err("image must start"),
        );
        check(
            "vm:create",
            json!({"image": "a'b;reboot"}),
            Err("image may hold only"),
        );
        check(
            "vm:create",
            json!({"ttl_s": u64::MAX}),
            Err("ttl_s must be 1 to"),
        );
        check("vm:create", json!({"ttl_s": 0}), Err("ttl_s must be 1 to"));
        check(
            "vm:create",
            json!({"idle_timeout_s": 1u64 << 62}),
            Err("idle_timeout_s must be"),
        );
        check(
            "vm:create",
            json!({"memory_mib": 1_000_000}),
            Err("memory_mib must be"),
        );
        check(
            "vm:create",
            json!({"command": "x"}),
            Err("unknown field `command`"),
        );
        check(
            "vm:create",
            json!({"labels": {"a/b": "x"}}),
            Err("label key may hold"),
        );
        check(
            "vm:create",
            json!({"labels": {"a": "\u{0}"}}),
            Err("label value contains"),
        );
        check(
            "vm:execute",
            json!({"vm_id": "vm-1", "command": "true"}),
            ok,
        );
        check(
            "exec",
            json!({"vm_id": "vm-1", "command": "true", "timeout_ms": 1000}),
            ok,
        );
        check(
            "exec",
            json!({"command": "true"}),
            Err("missing field `vm_id`"),
        );
        check(
            "vm:execute",
            json!({"vm_id": "vm\u{0}", "command": "true"}),
            Err("vm_id may hold"),
        );
        check(
            "vm:execute",
            json!({"vm_id": "../vm", "command": "true"}),
            Err("vm_id must start"),
        );
        check(
            "vm:execute",
            json!({"vm_id": "vm-1", "command": "x", "timeout_ms": 1u64 << 63}),
            Err("timeout_ms must be"),
        );
        check(
            "vm:execute",
            json!({"vm_id": "vm-1", "command": "x", "image": "default"}),
            Err("unknown field `image`"),
        );
        check("vm:delete", json!({"vm_id": "vm-1"}), ok);
        check(
            "vm:delete",
            json!({"vm_id": "vm-1", "force": true}),
            Err("unknown field `force`"),
        );
        check("vm:delete", json!({}), Err("missing field `vm_id`"));
    }

    #[test]
    fn defaults_fill_a_shape() {
        let spec = VmJobSpec::parse(&json!({"command": "true"})).unwrap();
        assert_eq!(spec.shape, VmShape::default());
        assert_eq!(spec.exec.exec(Some(5), false).timeout_ms, Some(5));
    }
}
