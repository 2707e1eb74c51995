//! The host side of the agent protocol: one connection per VM, any number
//! of execs and requests at once, each routed by its id.
//!
//! The guest is not trusted. Nothing it sends is held beyond a fixed bound:
//! one frame at a time is read (its body bounded by what its message may
//! carry), each exec's frames wait in a small bounded queue (the reader
//! waits when it is full, and gives up on an exec whose consumer stops
//! taking them), collected output is capped as it arrives, and a frame
//! that answers no open request is dropped. Every exec with a timeout also
//! has a host-side deadline, since a guest may ignore the one it is given.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::redact::{RedactStream, Redactor};
pub use kiln_proto::ErrorKind;
use kiln_proto::{encode, read_frame_async, Entry, Exec, Request, Response};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::VmError;

type Frame = (Response, Vec<u8>);

/// How long one frame may wait for the guest to take it before the
/// connection is given up (10 MiB files move in well under a second).
const SEND_STALL: Duration = Duration::from_secs(30);
/// Frames of one exec waiting for its consumer (each at most one chunk).
const EXEC_QUEUE: usize = 16;
/// How long the reader waits for an exec's consumer to make room before it
/// drops that exec, so one slow consumer cannot stall the whole VM.
const CONSUMER_STALL: Duration = Duration::from_secs(30);
/// Past an exec's own timeout, how long the guest has to report its end.
const EXEC_GRACE: Duration = Duration::from_secs(10);
/// Output kept per stream by [`AgentConn::exec`]; the rest is dropped and
/// `truncated` set.
pub const OUTPUT_CAP: usize = 1 << 20;
/// Signals a guest may report (Linux has 64).
const SIGNAL_MAX: i32 = 64;
/// How long a file request may take (10 MiB files, listings of
/// [`kiln_proto::LIST_MAX`] entries).
const FILE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The connection to the guest agent is closed.
    #[error("the guest agent is gone")]
    Gone,
    /// The guest stopped taking what the host writes.
    #[error("the guest agent stopped reading")]
    Stalled,
    /// No answer came in time.
    #[error("the guest agent did not answer in time")]
    Timeout,
    /// The output of an exec was not taken in time and was given up.
    #[error("the command's output was not taken in time")]
    Abandoned,
    /// The guest refused the request.
    #[error("{message}")]
    Guest { kind: ErrorKind, message: String },
    /// The guest sent something the protocol does not allow.
    #[error("the guest agent broke the protocol: {0}")]
    Protocol(String),
    /// The request is larger than a frame may be.
    #[error("{0}")]
    TooLarge(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<AgentError> for VmError {
    fn from(error: AgentError) -> VmError {
        VmError::Agent(error.to_string())
    }
}

/// Where a frame for an id goes.
enum Route {
    Exec(mpsc::Sender<Frame>),
    Control(oneshot::Sender<Frame>),
}

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    routes: Mutex<HashMap<u64, Route>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    execs: AtomicUsize,
    /// The files under [`SECRETS_DIR`] and how many holders each has. Held
    /// across the guest's answers, so a write and a removal of one name
    /// never cross.
    secrets: tokio::sync::Mutex<HashMap<String, usize>>,
    /// The secrets the VM keeps for its life, and their redactor: every
    /// command's output is redacted of them.
    kept: Mutex<Kept>,
    /// What every exec runs with unless it says otherwise (the image's).
    defaults: Mutex<Option<Arc<ExecDefaults>>>,
}

/// An image's environment, working directory and user (an OCI image's
/// `Env`, `WorkingDir` and `User`): every command in its VMs starts with
/// them unless its request says otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecDefaults {
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl ExecDefaults {
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.cwd.is_none() && self.user.is_none()
    }

    /// Fills in what `exec` leaves open: a variable the request sets wins,
    /// as do its cwd and user.
    pub fn apply(&self, exec: &mut Exec) {
        for (key, value) in &self.env {
            exec.env.entry(key.clone()).or_insert_with(|| value.clone());
        }
        if exec.cwd.is_none() {
            exec.cwd.clone_from(&self.cwd);
        }
        if exec.user.is_none() {
            exec.user.clone_from(&self.user);
        }
    }
}

#[derive(Default)]
struct Kept {
    values: Vec<(String, Vec<u8>)>,
    redactor: Option<Arc<Redactor>>,
}

/// Where a command's secrets are, one file per name, mode 0400 (a tmpfs
/// the agent mounts at start).
pub const SECRETS_DIR: &str = "/run/secrets";

impl Inner {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Dropping the senders ends every waiting request and exec.
        self.routes().clear();
    }
}

#[derive(Clone)]
pub struct AgentConn {
    inner: Arc<Inner>,
}

/// What one exec produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecOutput {
    pub exit_code: Option<i32>,
    /// The signal that ended it (1 to 64).
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output past [`OUTPUT_CAP`] on either stream was dropped.
    pub truncated: bool,
    pub duration: Duration,
}

impl ExecOutput {
    /// The shell's convention: the exit code, or 128 + the signal.
    pub fn status(&self) -> i32 {
        exit_status(self.exit_code, self.signal)
    }
}

/// The exit code, or 128 + the signal; signals are checked to be at most
/// 64 when they arrive, so this cannot overflow.
pub fn exit_status(code: Option<i32>, signal: Option<i32>) -> i32 {
    code.unwrap_or_else(|| 128 + signal.unwrap_or(0).clamp(0, SIGNAL_MAX))
}

/// Streamed pieces of an exec, for callers that forward them live.
#[derive(Clone, Debug, PartialEq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The end; its output fields are empty.
    Exited(ExecOutput),
}

/// A running exec. Dropping it before its end kills the command, so a
/// caller that goes away (a client that disconnects, a job that is killed)
/// takes its command with it.
pub struct ExecStream {
    conn: AgentConn,
    id: u64,
    frames: mpsc::Receiver<Frame>,
    deadline: Option<Instant>,
    /// The command could not start: its error, reported as stderr, then
    /// an exit of 127 (as a shell does).
    failed: Option<ExecOutput>,
    ended: bool,
    /// Redaction of stdout and stderr, when the command has secrets.
    redact: Option<[RedactStream; 2]>,
    /// Events ready to hand out (what redaction let out at the end).
    pending: VecDeque<ExecEvent>,
}

/// Secret files held in a VM (see [`AgentConn::hold_secrets`]). Release
/// it when the command ends; dropped unreleased, it is released in the
/// background. [`SecretHold::keep`] leaves the files for the VM's life.
pub struct SecretHold {
    conn: Option<AgentConn>,
    names: Vec<String>,
}

impl SecretHold {
    /// Holds nothing.
    pub fn none() -> SecretHold {
        SecretHold {
            conn: None,
            names: Vec::new(),
        }
    }

    /// Removes the files no other holder needs.
    pub async fn release(mut self) -> Result<(), AgentError> {
        let (Some(conn), names) = (self.conn.take(), std::mem::take(&mut self.names)) else {
            return Ok(());
        };
        conn.release_secrets(&names).await
    }

    /// The files stay until the VM goes.
    pub fn keep(mut self) {
        self.conn = None;
    }
}

impl Drop for SecretHold {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let names = std::mem::take(&mut self.names);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = conn.release_secrets(&names).await;
            });
        }
    }
}

impl AgentConn {
    pub fn new(stream: UnixStream) -> AgentConn {
        let (mut reader, writer) = stream.into_split();
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(writer),
            routes: Mutex::default(),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            execs: AtomicUsize::new(0),
            secrets: tokio::sync::Mutex::default(),
            kept: Mutex::default(),
            defaults: Mutex::default(),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                let frame = read_frame_async::<Response>(&mut reader).await;
                let Some(inner) = weak.upgrade() else { return };
                match frame {
                    Ok(frame) => route(&inner, frame).await,
                    Err(error) if error.recoverable() => {
                        tracing::debug!(%error, "dropped a bad frame from a guest");
                    }
                    Err(_) => {
                        inner.close();
                        return;
                    }
                }
            }
        });
        AgentConn { inner }
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Execs running on this connection (for idle expiry: a VM with a
    /// running command is in use).
    pub fn active_execs(&self) -> usize {
        self.inner.execs.load(Ordering::SeqCst)
    }

    pub fn busy(&self) -> bool {
        self.active_execs() > 0
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn send(&self, request: &Request, body: &[u8]) -> Result<(), AgentError> {
        self.send_within(request, body, SEND_STALL).await
    }

    /// Writes one frame, giving up after `limit`: a guest that never opens
    /// its port (a failed boot) stops QEMU reading the socket, and a write
    /// would otherwise wait for ever.
    async fn send_within(
        &self,
        request: &Request,
        body: &[u8],
        limit: Duration,
    ) -> Result<(), AgentError> {
        if self.is_closed() {
            return Err(AgentError::Gone);
        }
        let frame = encode(request, body).map_err(|e| AgentError::TooLarge(e.to_string()))?;
        let write = async {
            let mut writer = self.inner.writer.lock().await;
            writer.write_all(&frame).await
        };
        match tokio::time::timeout(limit, write).await {
            Ok(written) => Ok(written?),
            Err(_) => {
                // The frame may be half written: nothing after it would parse.
                self.inner.close();
                Err(AgentError::Stalled)
            }
        }
    }

    /// One request and its answer, both within `timeout`.
    async fn control(
        &self,
        request: impl FnOnce(u64) -> Request,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Frame, AgentError> {
        let deadline = Instant::now() + timeout;
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.inner.routes().insert(id, Route::Control(tx));
        let _route = RouteGuard {
            inner: &self.inner,
            id,
        };
        self.send_within(&request(id), body, timeout).await?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok((Response::Error { kind, message, .. }, _))) => {
                Err(AgentError::Guest { kind, message })
            }
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(_)) => Err(AgentError::Gone),
            Err(_) => Err(AgentError::Timeout),
        }
    }

    /// A request answered by `Done`.
    async fn command(
        &self,
        request: impl FnOnce(u64) -> Request,
        body: &[u8],
        timeout: Duration,
    ) -> Result<(), AgentError> {
        match self.control(request, body, timeout).await? {
            (Response::Done { .. }, _) => Ok(()),
            (other, _) => Err(unexpected(&other)),
        }
    }

    pub async fn ping(&self, timeout: Duration) -> Result<(), AgentError> {
        match self
            .control(|id| Request::Ping { id }, b"", timeout)
            .await?
        {
            (Response::Pong { version, .. }, _) if version == kiln_proto::VERSION => Ok(()),
            (other, _) => Err(unexpected(&other)),
        }
    }

    pub async fn write_file(
        &self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<(), AgentError> {
        self.write_file_as(path, data, mode, None).await
    }

    /// Writes a file as [`AgentConn::write_file`]; with a `user`, a
    /// relative path is under their home, and the file (and any parent
    /// made for it) is theirs.
    pub async fn write_file_as(
        &self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
        user: Option<&str>,
    ) -> Result<(), AgentError> {
        let path = path.to_string();
        let user = user.map(str::to_string);
        self.command(
            |id| Request::WriteFile {
                id,
                path,
                mode,
                user,
            },
            data,
            FILE_TIMEOUT,
        )
        .await
    }

    /// A request answered by `Entries`.
    async fn entries(
        &self,
        request: impl FnOnce(u64) -> Request,
    ) -> Result<Vec<Entry>, AgentError> {
        match self.control(request, b"", FILE_TIMEOUT).await? {
            // The body is at most a frame's, so this parse is bounded too.
            (Response::Entries { .. }, body) => serde_json::from_slice(&body)
                .map_err(|e| AgentError::Protocol(format!("bad entries: {e}"))),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// A request answered by exactly one entry.
    async fn entry(&self, request: impl FnOnce(u64) -> Request) -> Result<Entry, AgentError> {
        let mut entries = self.entries(request).await?;
        match (entries.pop(), entries.is_empty()) {
            (Some(entry), true) => Ok(entry),
            _ => Err(AgentError::Protocol(
                "expected exactly one entry".to_string(),
            )),
        }
    }

    /// The entry of `path` (a symlink is described, not followed). In this
    /// and the calls below, a relative path is under the home of `user`
    /// (or `/`), and what is created is that user's.
    pub async fn stat(&self, path: &str, user: Option<&str>) -> Result<Entry, AgentError> {
        let (path, user) = (path.to_string(), user.map(str::to_string));
        self.entry(|id| Request::Stat { id, path, user }).await
    }

    /// What is under the directory `path`, `depth` levels down (0 is 1),
    /// sorted by path, symlinks not followed. `NotFound` when it is
    /// missing, `Invalid` when it is not a directory, `TooLarge` past
    /// [`kiln_proto::LIST_MAX`] entries.
    pub async fn list_dir(
        &self,
        path: &str,
        depth: u32,
        user: Option<&str>,
    ) -> Result<Vec<Entry>, AgentError> {
        let (path, user) = (path.to_string(), user.map(str::to_string));
        self.entries(|id| Request::ListDir {
            id,
            path,
            depth,
            user,
        })
        .await
    }

    /// Creates a directory and its parents; `Exists` when it is there.
    pub async fn make_dir(&self, path: &str, user: Option<&str>) -> Result<Entry, AgentError> {
        let (path, user) = (path.to_string(), user.map(str::to_string));
        self.entry(|id| Request::MakeDir { id, path, user }).await
    }

    /// Renames `source` to `destination` (making its parents); the
    /// destination's entry.
    pub async fn rename(
        &self,
        source: &str,
        destination: &str,
        user: Option<&str>,
    ) -> Result<Entry, AgentError> {
        let (source, destination) = (source.to_string(), destination.to_string());
        let user = user.map(str::to_string);
        self.entry(|id| Request::Move {
            id,
            source,
            destination,
            user,
        })
        .await
    }

    /// Removes `path`, a directory with all under it; `NotFound` when
    /// there is nothing.
    pub async fn remove_all(&self, path: &str, user: Option<&str>) -> Result<(), AgentError> {
        let (path, user) = (path.to_string(), user.map(str::to_string));
        self.command(|id| Request::Remove { id, path, user }, b"", FILE_TIMEOUT)
            .await
    }

    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, AgentError> {
        let path = path.to_string();
        match self
            .control(|id| Request::ReadFile { id, path }, b"", FILE_TIMEOUT)
            .await?
        {
            (Response::FileData { .. }, body) => Ok(body),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Removes a file; done also when there is none.
    pub async fn remove_file(&self, path: &str) -> Result<(), AgentError> {
        let path = path.to_string();
        self.command(|id| Request::RemoveFile { id, path }, b"", FILE_TIMEOUT)
            .await
    }

    /// Writes each secret to `/run/secrets/<name>`, mode 0400, and holds
    /// it there until the returned hold is released: a file goes when the
    /// last command (or VM) holding its name is done, so commands running
    /// side by side in one VM keep each other's files. On an error nothing
    /// stays held.
    pub async fn hold_secrets(
        &self,
        values: &[(String, Vec<u8>)],
    ) -> Result<SecretHold, AgentError> {
        let mut hold = SecretHold {
            conn: Some(self.clone()),
            names: Vec::with_capacity(values.len()),
        };
        let mut held = self.inner.secrets.lock().await;
        for (name, value) in values {
            kiln_core::secrets::check_name(name).map_err(AgentError::TooLarge)?;
            *held.entry(name.clone()).or_default() += 1;
            hold.names.push(name.clone());
            // Written again when held already: a newer version may have come.
            if let Err(error) = self
                .write_file(&format!("{SECRETS_DIR}/{name}"), value, Some(0o400))
                .await
            {
                drop(held);
                let _ = hold.release().await;
                return Err(error);
            }
        }
        Ok(hold)
    }

    /// Writes secrets the VM keeps for its whole life (a VM created with
    /// secrets, a `vm` job's VM); every command's output from now on is
    /// redacted of them.
    pub async fn keep_secrets(&self, values: &[(String, Vec<u8>)]) -> Result<(), AgentError> {
        if values.is_empty() {
            return Ok(());
        }
        self.hold_secrets(values).await?.keep();
        let mut kept = self.inner.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.values.extend(values.iter().cloned());
        kept.redactor = Redactor::new(&kept.values).map_err(AgentError::TooLarge)?;
        Ok(())
    }

    /// The redactor for a command given `values`, with the VM's kept
    /// secrets; `None` when there is nothing to redact.
    pub fn redactor_with(
        &self,
        values: &[(String, Vec<u8>)],
    ) -> Result<Option<Arc<Redactor>>, String> {
        let kept = self.inner.kept.lock().unwrap_or_else(|e| e.into_inner());
        if values.is_empty() {
            return Ok(kept.redactor.clone());
        }
        let mut all = kept.values.clone();
        all.extend(values.iter().cloned());
        Redactor::new(&all)
    }

    async fn release_secrets(&self, names: &[String]) -> Result<(), AgentError> {
        let mut held = self.inner.secrets.lock().await;
        let mut result = Ok(());
        for name in names {
            let Some(count) = held.get_mut(name) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                held.remove(name);
                if let Err(error) = self.remove_file(&format!("{SECRETS_DIR}/{name}")).await {
                    result = result.and(Err(error));
                }
            }
        }
        result
    }

    /// Credits `seed` to the guest's entropy pool and reseeds its CRNG.
    pub async fn add_entropy(&self, seed: &[u8]) -> Result<(), AgentError> {
        self.command(
            |id| Request::AddEntropy { id },
            seed,
            Duration::from_secs(10),
        )
        .await
    }

    /// Sets the guest's wall clock.
    pub async fn set_clock(&self, unix_ns: u64) -> Result<(), AgentError> {
        self.command(
            |id| Request::SetClock { id, unix_ns },
            b"",
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.command(|id| Request::Shutdown { id }, b"", Duration::from_secs(2))
            .await
    }

    /// Every exec from now on starts with `defaults` where its request is
    /// silent (see [`ExecDefaults::apply`]).
    pub fn set_exec_defaults(&self, defaults: ExecDefaults) {
        let defaults = (!defaults.is_empty()).then(|| Arc::new(defaults));
        *self
            .inner
            .defaults
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = defaults;
    }

    /// Takes over from the connection this guest had before it was paused
    /// and restored: request ids go on after the old ones (the guest may
    /// still run commands under them) and the kept secrets stay kept.
    pub fn continue_from(&self, old: &AgentConn) {
        self.inner
            .next_id
            .fetch_max(old.inner.next_id.load(Ordering::Relaxed), Ordering::Relaxed);
        let (values, redactor) = {
            let kept = old.inner.kept.lock().unwrap_or_else(|e| e.into_inner());
            (kept.values.clone(), kept.redactor.clone())
        };
        let mut kept = self.inner.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.values = values;
        kept.redactor = redactor;
    }

    /// The stream of exec `id`, started on the connection this one
    /// continues (see [`AgentConn::continue_from`]): its events from now on.
    pub fn adopt(&self, id: u64) -> ExecStream {
        let (tx, frames) = mpsc::channel(EXEC_QUEUE);
        self.inner.routes().insert(id, Route::Exec(tx));
        self.inner.execs.fetch_add(1, Ordering::SeqCst);
        let mut stream = ExecStream {
            conn: self.clone(),
            id,
            frames,
            deadline: None,
            failed: None,
            ended: false,
            redact: None,
            pending: VecDeque::new(),
        };
        if let Some(kept) = self.redactor_with(&[]).ok().flatten() {
            stream.redact_with(&kept);
        }
        stream
    }

    /// Starts a command with `stdin` as the first of its input; its events
    /// come from the returned stream, redacted of the VM's kept secrets
    /// (see [`ExecStream::redact_with`] for a command's own).
    pub async fn exec_stream(
        &self,
        mut exec: Exec,
        stdin: &[u8],
    ) -> Result<ExecStream, AgentError> {
        let id = self.next_id();
        exec.id = id;
        let defaults = self
            .inner
            .defaults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(defaults) = defaults {
            defaults.apply(&mut exec);
        }
        let deadline = exec
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms) + EXEC_GRACE);
        let (tx, frames) = mpsc::channel(EXEC_QUEUE);
        self.inner.routes().insert(id, Route::Exec(tx));
        self.inner.execs.fetch_add(1, Ordering::SeqCst);
        let mut stream = ExecStream {
            conn: self.clone(),
            id,
            frames,
            deadline,
            failed: None,
            ended: false,
            redact: None,
            pending: VecDeque::new(),
        };
        if let Some(kept) = self.redactor_with(&[]).ok().flatten() {
            stream.redact_with(&kept);
        }
        if let Err(error) = self.send(&Request::Exec(exec), stdin).await {
            // Never started: nothing to kill.
            stream.ended = true;
            return Err(error);
        }
        Ok(stream)
    }

    /// Runs a command to the end; output past [`OUTPUT_CAP`] per stream is
    /// dropped as it arrives.
    pub async fn exec(&self, exec: Exec, stdin: &[u8]) -> Result<ExecOutput, AgentError> {
        self.exec_tapped(exec, stdin, None, None).await
    }

    /// As [`AgentConn::exec`], and all the output also goes to `tap` as it
    /// arrives, at the log store's pace (a full tap stops this reader, and
    /// so, through the bounded exec queue, the guest). With a `redactor`,
    /// secret values are redacted from the output before it goes anywhere.
    pub async fn exec_tapped(
        &self,
        exec: Exec,
        stdin: &[u8],
        tap: Option<&kiln_logs::LogTap>,
        redactor: Option<&Arc<Redactor>>,
    ) -> Result<ExecOutput, AgentError> {
        let mut stream = self.exec_stream(exec, stdin).await?;
        // Else the VM's kept secrets only, as every stream.
        if let Some(redactor) = redactor {
            stream.redact_with(redactor);
        }
        let mut output = ExecOutput::default();
        loop {
            match stream.next().await? {
                ExecEvent::Stdout(data) => {
                    if let Some(tap) = tap {
                        tap.write_paced(kiln_logs::Stream::Stdout, &data).await;
                    }
                    output.truncated |= append_capped(&mut output.stdout, &data)
                }
                ExecEvent::Stderr(data) => {
                    if let Some(tap) = tap {
                        tap.write_paced(kiln_logs::Stream::Stderr, &data).await;
                    }
                    output.truncated |= append_capped(&mut output.stderr, &data)
                }
                ExecEvent::Exited(end) => {
                    output.exit_code = end.exit_code;
                    output.signal = end.signal;
                    output.timed_out = end.timed_out;
                    output.duration = end.duration;
                    return Ok(output);
                }
            }
        }
    }
}

/// Appends what fits under [`OUTPUT_CAP`]; true when something was dropped.
fn append_capped(buffer: &mut Vec<u8>, data: &[u8]) -> bool {
    let room = OUTPUT_CAP.saturating_sub(buffer.len());
    buffer.extend_from_slice(&data[..data.len().min(room)]);
    data.len() > room
}

fn unexpected(response: &Response) -> AgentError {
    AgentError::Protocol(format!("unexpected answer: {response:?}"))
}

/// Hands a frame to whoever waits for its id.
async fn route(inner: &Inner, frame: Frame) {
    let Some(id) = frame.0.id() else {
        tracing::debug!(response = ?frame.0, "dropped a frame that answers nothing");
        return;
    };
    let exec = {
        let mut routes = inner.routes();
        match routes.get(&id) {
            Some(Route::Exec(tx)) => tx.clone(),
            Some(Route::Control(_)) => {
                if let Some(Route::Control(tx)) = routes.remove(&id) {
                    let _ = tx.send(frame);
                }
                return;
            }
            // A late answer to a request given up on, or an id the host
            // never used.
            None => return,
        }
    };
    let frame = match exec.try_send(frame) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
        Err(mpsc::error::TrySendError::Full(frame)) => frame,
    };
    // The consumer is behind: wait for room (the guest waits with us), but
    // not for ever.
    if tokio::time::timeout(CONSUMER_STALL, exec.send(frame))
        .await
        .is_err()
    {
        inner.routes().remove(&id);
    }
}

/// Removes a request's route when its caller is done or gone.
struct RouteGuard<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.inner.routes().remove(&self.id);
    }
}

impl ExecStream {
    /// The exec's id on its connection.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Redacts `redactor`'s values from the output from now on (in place
    /// of what it redacted before: give one with the VM's kept secrets,
    /// [`AgentConn::redactor_with`]).
    pub fn redact_with(&mut self, redactor: &Arc<Redactor>) {
        self.redact = Some([redactor.stream(), redactor.stream()]);
    }

    /// The next piece of output, or the end. After the end, or an error,
    /// the stream is over. Cancel-safe: what redaction holds back stays in
    /// the stream.
    pub async fn next(&mut self) -> Result<ExecEvent, AgentError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let event = self.next_raw().await?;
            let Some([out, err]) = self.redact.as_mut() else {
                return Ok(event);
            };
            match event {
                ExecEvent::Stdout(data) => {
                    let data = out.feed(&data);
                    if !data.is_empty() {
                        return Ok(ExecEvent::Stdout(data));
                    }
                }
                ExecEvent::Stderr(data) => {
                    let data = err.feed(&data);
                    if !data.is_empty() {
                        return Ok(ExecEvent::Stderr(data));
                    }
                }
                ExecEvent::Exited(end) => {
                    let (out, err) = (out.finish(), err.finish());
                    if !out.is_empty() {
                        self.pending.push_back(ExecEvent::Stdout(out));
                    }
                    if !err.is_empty() {
                        self.pending.push_back(ExecEvent::Stderr(err));
                    }
                    self.pending.push_back(ExecEvent::Exited(end));
                }
            }
        }
    }

    async fn next_raw(&mut self) -> Result<ExecEvent, AgentError> {
        if let Some(end) = self.failed.take() {
            self.ended = true;
            return Ok(ExecEvent::Exited(end));
        }
        if self.ended {
            return Err(AgentError::Gone);
        }
        let received = match self.deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, self.frames.recv()).await {
                Ok(frame) => frame,
                Err(_) => return Err(AgentError::Timeout),
            },
            None => self.frames.recv().await,
        };
        let Some((response, body)) = received else {
            return Err(if self.conn.is_closed() {
                AgentError::Gone
            } else {
                AgentError::Abandoned
            });
        };
        match response {
            Response::Stdout { .. } => Ok(ExecEvent::Stdout(body)),
            Response::Stderr { .. } => Ok(ExecEvent::Stderr(body)),
            Response::Exited {
                code,
                signal,
                timed_out,
                duration_us,
                ..
            } => {
                if signal.is_some_and(|s| !(1..=SIGNAL_MAX).contains(&s)) {
                    return Err(AgentError::Protocol(format!(
                        "exec ended by signal {signal:?}"
                    )));
                }
                self.ended = true;
                Ok(ExecEvent::Exited(ExecOutput {
                    exit_code: code,
                    signal,
                    timed_out,
                    duration: Duration::from_micros(duration_us),
                    ..ExecOutput::default()
                }))
            }
            Response::Error { message, .. } => {
                // The command never started, so there is nothing to kill.
                self.ended = true;
                self.failed = Some(ExecOutput {
                    exit_code: Some(127),
                    ..ExecOutput::default()
                });
                Ok(ExecEvent::Stderr(message.into_bytes()))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// The way to this exec's stdin, signals and terminal from other tasks
    /// (while the stream is read in one).
    pub fn control(&self) -> ExecControl {
        ExecControl {
            conn: self.conn.clone(),
            id: self.id,
        }
    }

    /// More stdin (for an exec started with `stdin_open`); `eof` closes it.
    pub async fn send_stdin(&self, data: &[u8], eof: bool) -> Result<(), AgentError> {
        self.control().send_stdin(data, eof).await
    }

    /// Signals the command's process group.
    pub async fn kill(&self, signal: i32) -> Result<(), AgentError> {
        self.control().kill(signal).await
    }
}

/// Clonable: sends stdin, signals and PTY resizes to a running exec from
/// any task. Sent after the exec's end, they reach nothing (a resize is
/// answered `NotFound`).
#[derive(Clone)]
pub struct ExecControl {
    conn: AgentConn,
    id: u64,
}

impl ExecControl {
    /// The exec's id on its connection.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// More stdin (for an exec started with `stdin_open`); `eof` closes it
    /// (on a PTY, only stops the writing: the terminal stays).
    pub async fn send_stdin(&self, data: &[u8], eof: bool) -> Result<(), AgentError> {
        self.conn
            .send(&Request::Stdin { id: self.id, eof }, data)
            .await
    }

    /// Signals the command's process group.
    pub async fn kill(&self, signal: i32) -> Result<(), AgentError> {
        self.conn
            .send(
                &Request::Kill {
                    id: self.id,
                    signal,
                },
                b"",
            )
            .await
    }

    /// Resizes the exec's PTY; `NotFound` when it has none (or has ended).
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<(), AgentError> {
        let exec = self.id;
        self.conn
            .command(
                |id| Request::Resize {
                    id,
                    exec,
                    cols,
                    rows,
                },
                b"",
                Duration::from_secs(10),
            )
            .await
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        self.conn.inner.routes().remove(&self.id);
        self.conn.inner.execs.fetch_sub(1, Ordering::SeqCst);
        if self.ended || self.failed.is_some() || self.conn.is_closed() {
            return;
        }
        // Given up before its end: the command must not run on alone.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let conn = self.conn.clone();
            let id = self.id;
            runtime.spawn(async move {
                let _ = conn
                    .send(
                        &Request::Kill {
                            id,
                            signal: libc::SIGKILL,
                        },
                        b"",
                    )
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_proto::{EntryKind, PtySize};
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A connection whose guest end the test plays.
    fn pair() -> (AgentConn, UnixStream) {
        let (host, guest) = UnixStream::pair().unwrap();
        (AgentConn::new(host), guest)
    }

    async fn next_request(guest: &mut UnixStream) -> Request {
        read_frame_async::<Request>(guest).await.unwrap().0
    }

    async fn answer(guest: &mut UnixStream, response: &Response, body: &[u8]) {
        guest
            .write_all(&encode(response, body).unwrap())
            .await
            .unwrap();
    }

    fn entry(path: &str) -> Entry {
        Entry {
            name: path.rsplit('/').next().unwrap().into(),
            path: path.into(),
            kind: EntryKind::Dir,
            size: 4096,
            mode: 0o755,
            uid: 1000,
            gid: 1000,
            owner: "user".into(),
            group: "user".into(),
            modified_ns: 0,
            symlink_target: None,
        }
    }

    #[tokio::test]
    async fn execs_start_with_the_image_defaults_their_request_leaves_open() {
        let (conn, mut guest) = pair();
        conn.set_exec_defaults(ExecDefaults {
            env: BTreeMap::from([
                ("GREETING".into(), "from-image".into()),
                ("PATH".into(), "/opt/bin:/bin".into()),
            ]),
            cwd: Some("/srv/work".into()),
            user: Some("1000:1000".into()),
        });
        let plain = Exec {
            command: "id".into(),
            ..Exec::default()
        };
        let _bare = conn.exec_stream(plain.clone(), b"").await.unwrap();
        let Request::Exec(sent) = next_request(&mut guest).await else {
            panic!()
        };
        assert_eq!(sent.env["GREETING"], "from-image");
        assert_eq!(sent.env["PATH"], "/opt/bin:/bin");
        assert_eq!(sent.cwd.as_deref(), Some("/srv/work"));
        assert_eq!(sent.user.as_deref(), Some("1000:1000"));

        let own = Exec {
            env: BTreeMap::from([("GREETING".into(), "own".into())]),
            cwd: Some("/tmp".into()),
            user: Some("root".into()),
            ..plain.clone()
        };
        let _own = conn.exec_stream(own, b"").await.unwrap();
        let Request::Exec(sent) = next_request(&mut guest).await else {
            panic!()
        };
        assert_eq!(sent.env["GREETING"], "own");
        assert_eq!(sent.env["PATH"], "/opt/bin:/bin");
        assert_eq!(
            (sent.cwd.as_deref(), sent.user.as_deref()),
            (Some("/tmp"), Some("root"))
        );

        // Empty defaults are none at all.
        conn.set_exec_defaults(ExecDefaults::default());
        let _after = conn.exec_stream(plain, b"").await.unwrap();
        let Request::Exec(sent) = next_request(&mut guest).await else {
            panic!()
        };
        assert!(sent.env.is_empty() && sent.cwd.is_none() && sent.user.is_none());
    }

    #[tokio::test]
    async fn file_requests_carry_their_user_and_read_entries_from_the_body() {
        let (conn, mut guest) = pair();
        let listing = tokio::spawn({
            let conn = conn.clone();
            async move { conn.list_dir("docs", 2, Some("user")).await }
        });
        let Request::ListDir {
            id,
            path,
            depth,
            user,
        } = next_request(&mut guest).await
        else {
            panic!()
        };
        assert_eq!(
            (path.as_str(), depth, user.as_deref()),
            ("docs", 2, Some("user"))
        );
        let entries = vec![entry("/home/user/docs/a"), entry("/home/user/docs/b")];
        let body = serde_json::to_vec(&entries).unwrap();
        answer(&mut guest, &Response::Entries { id }, &body).await;
        assert_eq!(listing.await.unwrap().unwrap(), entries);

        // A refusal keeps its kind.
        let made = tokio::spawn({
            let conn = conn.clone();
            async move { conn.make_dir("/tmp/x", None).await }
        });
        let Request::MakeDir { id, .. } = next_request(&mut guest).await else {
            panic!()
        };
        let exists = Response::Error {
            id: Some(id),
            kind: ErrorKind::Exists,
            message: "/tmp/x: exists".into(),
        };
        answer(&mut guest, &exists, b"").await;
        assert!(matches!(
            made.await.unwrap(),
            Err(AgentError::Guest {
                kind: ErrorKind::Exists,
                ..
            })
        ));

        // One entry is asked for: two, or a body that is not entries, is
        // the guest breaking the protocol.
        for body in [serde_json::to_vec(&entries).unwrap(), b"[{".to_vec()] {
            let stat = tokio::spawn({
                let conn = conn.clone();
                async move { conn.stat("/x", None).await }
            });
            let Request::Stat { id, .. } = next_request(&mut guest).await else {
                panic!()
            };
            answer(&mut guest, &Response::Entries { id }, &body).await;
            assert!(matches!(stat.await.unwrap(), Err(AgentError::Protocol(_))));
        }
    }

    #[tokio::test]
    async fn a_resize_is_answered_under_its_own_id_beside_its_exec() {
        let (conn, mut guest) = pair();
        let exec = Exec {
            command: "sh".into(),
            pty: Some(PtySize { cols: 80, rows: 24 }),
            stdin_open: true,
            ..Exec::default()
        };
        let mut stream = conn.exec_stream(exec, b"").await.unwrap();
        let Request::Exec(started) = next_request(&mut guest).await else {
            panic!()
        };
        let control = stream.control();
        assert_eq!(control.id(), started.id);
        let resize = tokio::spawn({
            let control = control.clone();
            async move { control.resize(120, 40).await }
        });
        let Request::Resize {
            id,
            exec,
            cols,
            rows,
        } = next_request(&mut guest).await
        else {
            panic!()
        };
        assert_ne!(id, started.id);
        assert_eq!((exec, cols, rows), (started.id, 120, 40));
        answer(&mut guest, &Response::Done { id }, b"").await;
        resize.await.unwrap().unwrap();

        control.send_stdin(b"ls\n", false).await.unwrap();
        let (request, body) = read_frame_async::<Request>(&mut guest).await.unwrap();
        assert_eq!(
            request,
            Request::Stdin {
                id: exec,
                eof: false
            }
        );
        assert_eq!(body, b"ls\n");
        answer(&mut guest, &Response::Stdout { id: exec }, b"a\r\n").await;
        assert_eq!(
            stream.next().await.unwrap(),
            ExecEvent::Stdout(b"a\r\n".to_vec())
        );
    }
}
