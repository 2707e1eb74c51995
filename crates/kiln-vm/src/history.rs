//! Execution history: every command run in a VM leaves a row, `running` at
//! its start and finished at its end (see `kiln_db::executions`). Writing
//! it never fails the command: each write is bounded in time and its errors
//! are logged.

use std::time::{Duration, Instant};

use kiln_db::executions::{ExecutionEnd, ExecutionStart};
use kiln_db::Db;

use crate::job::ExecRequest;
use crate::ExecOutput;

/// The head of each stream kept in the row; the rest went to the caller
/// (or, for jobs, into the job's result).
pub const HEAD_BYTES: usize = 16 << 10;

/// A write slower than this is given up (and logged), so a stalled
/// database cannot hold up a command or its answer.
const WRITE_WITHIN: Duration = Duration::from_secs(2);

/// Who ran a command, and how.
#[derive(Clone, Debug)]
pub enum Source {
    /// `POST /vms/{id}/execute`, with the caller's key id.
    Api { key_id: String },
    /// `GET /vms/{id}/exec/ws`, with the caller's key id.
    WebSocket { key_id: String },
    /// A `vm` or `vm:execute` job; its result holds the output.
    Job { id: i64 },
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn bounded<T>(
    what: &str,
    write: impl std::future::Future<Output = kiln_db::DbResult<T>>,
) -> Option<T> {
    match tokio::time::timeout(WRITE_WITHIN, write).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not record an execution's {what}");
            None
        }
        Err(_) => {
            tracing::warn!("recording an execution's {what} took too long; skipped");
            None
        }
    }
}

/// The head of a stream, and how many bytes it had.
#[derive(Default)]
struct Head {
    kept: Vec<u8>,
    bytes: u64,
}

impl Head {
    fn add(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        let room = HEAD_BYTES.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }
}

/// One command's row, from its start to its end. Dropped without an end
/// (the caller left, the job was killed: the command is killed with it),
/// it is finished `abandoned` in the background.
pub struct Recording {
    db: Option<Db>,
    id: Option<i64>,
    started: Instant,
    output_ref: Option<String>,
    stdout: Head,
    stderr: Head,
    /// Output dropped on its way (past the caller's cap).
    truncated: bool,
}

impl Recording {
    /// Writes the start. Env values and stdin are left out: secrets pass
    /// there; env names are kept.
    pub async fn start(
        db: Option<Db>,
        tenant: &str,
        vm_id: &str,
        source: Source,
        request: &ExecRequest,
    ) -> Recording {
        let (source_name, job_id, actor) = match &source {
            Source::Api { key_id } => ("api", None, key_id.clone()),
            Source::WebSocket { key_id } => ("websocket", None, key_id.clone()),
            Source::Job { id } => ("job", Some(*id), format!("job:{id}")),
        };
        let start = ExecutionStart {
            tenant: tenant.to_string(),
            vm_id: vm_id.to_string(),
            source: source_name.to_string(),
            job_id,
            actor,
            command: request.command.clone(),
            args: request.args.clone(),
            env_names: request.env.keys().cloned().collect(),
            cwd: request.cwd.clone(),
            started_at: now_ms(),
        };
        let id = match &db {
            Some(db) => bounded("start", db.execution_start(&start)).await,
            None => None,
        };
        Recording {
            db,
            id,
            started: Instant::now(),
            output_ref: job_id.map(|id| format!("job:{id}")),
            stdout: Head::default(),
            stderr: Head::default(),
            truncated: false,
        }
    }

    /// The row's id, when the start was written.
    pub fn id(&self) -> Option<i64> {
        self.id
    }

    /// Output as it streams by.
    pub fn stdout(&mut self, data: &[u8]) {
        self.stdout.add(data);
    }

    pub fn stderr(&mut self, data: &[u8]) {
        self.stderr.add(data);
    }

    fn end(&mut self, status: &str) -> ExecutionEnd {
        ExecutionEnd {
            status: status.to_string(),
            finished_at: now_ms(),
            duration_ms: self.started.elapsed().as_millis().min(i64::MAX as u128) as i64,
            stdout_bytes: self.stdout.bytes.min(i64::MAX as u64) as i64,
            stderr_bytes: self.stderr.bytes.min(i64::MAX as u64) as i64,
            truncated: self.truncated,
            stdout_head: self.stdout.text(),
            stderr_head: self.stderr.text(),
            output_ref: self.output_ref.clone(),
            ..ExecutionEnd::default()
        }
    }

    async fn write(mut self, end: ExecutionEnd) {
        if let (Some(db), Some(id)) = (self.db.take(), self.id.take()) {
            bounded("end", db.execution_finish(id, &end)).await;
        }
    }

    /// The command ended; `out` holds what it wrote unless it was streamed
    /// (then its buffers are empty and the streamed output counts).
    pub async fn exited(mut self, out: &ExecOutput) {
        self.stdout(&out.stdout);
        self.stderr(&out.stderr);
        self.truncated |= out.truncated;
        let mut end = self.end("exited");
        end.exit_code = Some(out.status());
        end.signal = out.signal;
        end.timed_out = out.timed_out;
        if out.duration > Duration::ZERO {
            end.duration_ms = out.duration.as_millis().min(i64::MAX as u128) as i64;
        }
        self.write(end).await;
    }

    /// The command could not run or its VM failed under it.
    pub async fn failed(mut self, error: impl std::fmt::Display) {
        let mut end = self.end("error");
        end.error = Some(kiln_core::names::sanitise_message(&error.to_string(), 1024));
        self.write(end).await;
    }

    /// The command was killed because its caller left or its job was killed.
    pub async fn abandoned(mut self, why: &str) {
        let mut end = self.end("abandoned");
        end.error = Some(why.to_string());
        self.write(end).await;
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let (Some(db), Some(id)) = (self.db.take(), self.id.take()) else {
            return;
        };
        let mut end = self.end("abandoned");
        end.error = Some("the caller went away; the command was killed".into());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                bounded("end", db.execution_finish(id, &end)).await;
            });
        }
    }
}
