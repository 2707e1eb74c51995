//! The host side of the agent protocol: one connection per VM, any number
//! of execs at once (routed by exec id), file and control requests one at a
//! time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::{encode, read_frame_async, Exec, Request, Response};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::VmError;

type Frame = (Response, Vec<u8>);

/// How long one frame may wait for the guest to take it before the
/// connection is given up (10 MiB files move in well under a second).
const SEND_STALL: Duration = Duration::from_secs(30);

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    execs: Mutex<HashMap<u64, mpsc::UnboundedSender<Frame>>>,
    control: tokio::sync::Mutex<mpsc::UnboundedReceiver<Frame>>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

#[derive(Clone)]
pub struct AgentConn {
    inner: Arc<Inner>,
}

/// What one exec produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecOutput {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub duration: Duration,
}

/// Streamed pieces of an exec, for callers that forward them live.
#[derive(Clone, Debug, PartialEq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited(ExecOutput),
}

impl AgentConn {
    pub fn new(stream: UnixStream) -> AgentConn {
        let (mut reader, writer) = stream.into_split();
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(writer),
            execs: Mutex::default(),
            control: tokio::sync::Mutex::new(control_rx),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                let frame = read_frame_async::<Response>(&mut reader).await;
                let Some(inner) = weak.upgrade() else { return };
                match frame {
                    Ok((response, body)) => {
                        let id = match &response {
                            Response::Stdout { id }
                            | Response::Stderr { id }
                            | Response::Exited { id, .. } => Some(*id),
                            Response::Error { id: Some(id), .. } => Some(*id),
                            _ => None,
                        };
                        match id {
                            Some(id) => {
                                let execs = inner.execs.lock().expect("execs");
                                if let Some(tx) = execs.get(&id) {
                                    let _ = tx.send((response, body));
                                }
                            }
                            None => {
                                let _ = control_tx.send((response, body));
                            }
                        }
                    }
                    Err(error) if error.recoverable() => continue,
                    Err(_) => {
                        inner.closed.store(true, Ordering::SeqCst);
                        inner.execs.lock().expect("execs").clear();
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

    async fn send(&self, request: &Request, body: &[u8]) -> Result<(), VmError> {
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
    ) -> Result<(), VmError> {
        if self.is_closed() {
            return Err(VmError::Agent("the guest agent is gone".into()));
        }
        let frame = encode(request, body);
        let write = async {
            let mut writer = self.inner.writer.lock().await;
            writer.write_all(&frame).await
        };
        match tokio::time::timeout(limit, write).await {
            Ok(written) => Ok(written?),
            Err(_) => {
                // The frame may be half written: nothing after it would parse.
                self.inner.closed.store(true, Ordering::SeqCst);
                Err(VmError::Agent("the guest agent stopped reading".into()))
            }
        }
    }

    /// One control request and its answer, both within `timeout`.
    async fn control(
        &self,
        request: &Request,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Frame, VmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.inner.control.lock().await;
        while rx.try_recv().is_ok() {}
        self.send_within(request, body, timeout).await?;
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((Response::Error { message, .. }, _))) => Err(VmError::Agent(message)),
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(VmError::Agent("the guest agent is gone".into())),
            Err(_) => Err(VmError::Agent(
                "the guest agent did not answer in time".into(),
            )),
        }
    }

    pub async fn ping(&self, timeout: Duration) -> Result<(), VmError> {
        match self.control(&Request::Ping, b"", timeout).await? {
            (Response::Pong { version, .. }, _) if version == kiln_proto::VERSION => Ok(()),
            (other, _) => Err(VmError::Agent(format!(
                "unexpected answer to ping: {other:?}"
            ))),
        }
    }

    pub async fn write_file(
        &self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<(), VmError> {
        let request = Request::WriteFile {
            path: path.to_string(),
            mode,
        };
        self.control(&request, data, Duration::from_secs(60))
            .await
            .map(|_| ())
    }

    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, VmError> {
        let request = Request::ReadFile {
            path: path.to_string(),
        };
        match self.control(&request, b"", Duration::from_secs(60)).await? {
            (Response::FileData { .. }, body) => Ok(body),
            (other, _) => Err(VmError::Agent(format!("unexpected answer: {other:?}"))),
        }
    }

    pub async fn shutdown(&self) -> Result<(), VmError> {
        self.control(&Request::Shutdown, b"", Duration::from_secs(2))
            .await
            .map(|_| ())
    }

    /// Starts a command; its output arrives on the returned channel, ending
    /// with `ExecEvent::Exited`. Returns the exec id (for `kill`).
    pub async fn exec_stream(
        &self,
        mut exec: Exec,
        stdin: &[u8],
    ) -> Result<(u64, mpsc::UnboundedReceiver<ExecEvent>), VmError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        exec.id = id;
        let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<Frame>();
        self.inner.execs.lock().expect("execs").insert(id, raw_tx);
        if let Err(error) = self.send(&Request::Exec(exec), stdin).await {
            self.inner.execs.lock().expect("execs").remove(&id);
            return Err(error);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut output = ExecOutput::default();
            while let Some((response, body)) = raw_rx.recv().await {
                match response {
                    Response::Stdout { .. } => {
                        output.stdout.extend_from_slice(&body);
                        let _ = tx.send(ExecEvent::Stdout(body));
                    }
                    Response::Stderr { .. } => {
                        output.stderr.extend_from_slice(&body);
                        let _ = tx.send(ExecEvent::Stderr(body));
                    }
                    Response::Exited {
                        code,
                        signal,
                        timed_out,
                        duration_us,
                        ..
                    } => {
                        output.exit_code = code;
                        output.signal = signal;
                        output.timed_out = timed_out;
                        output.duration = Duration::from_micros(duration_us);
                        let _ = tx.send(ExecEvent::Exited(output));
                        break;
                    }
                    Response::Error { message, .. } => {
                        output.stderr.extend_from_slice(message.as_bytes());
                        output.exit_code = Some(127);
                        let _ = tx.send(ExecEvent::Exited(output));
                        break;
                    }
                    _ => {}
                }
            }
            inner.execs.lock().expect("execs").remove(&id);
        });
        Ok((id, rx))
    }

    /// Runs a command to the end and returns everything it printed.
    pub async fn exec(&self, mut exec: Exec, stdin: &[u8]) -> Result<ExecOutput, VmError> {
        // Collected here rather than through `exec_stream`: one task hop
        // less on the path every exec takes.
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        exec.id = id;
        let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<Frame>();
        self.inner.execs.lock().expect("execs").insert(id, raw_tx);
        let sent = self.send(&Request::Exec(exec), stdin).await;
        let mut output = ExecOutput::default();
        let result = match sent {
            Err(error) => Err(error),
            Ok(()) => loop {
                match raw_rx.recv().await {
                    Some((Response::Stdout { .. }, body)) => output.stdout.extend_from_slice(&body),
                    Some((Response::Stderr { .. }, body)) => output.stderr.extend_from_slice(&body),
                    Some((
                        Response::Exited {
                            code,
                            signal,
                            timed_out,
                            duration_us,
                            ..
                        },
                        _,
                    )) => {
                        output.exit_code = code;
                        output.signal = signal;
                        output.timed_out = timed_out;
                        output.duration = Duration::from_micros(duration_us);
                        break Ok(output);
                    }
                    Some((Response::Error { message, .. }, _)) => {
                        output.stderr.extend_from_slice(message.as_bytes());
                        output.exit_code = Some(127);
                        break Ok(output);
                    }
                    Some(_) => {}
                    None => {
                        break Err(VmError::Agent(
                            "the guest agent went away during the command".into(),
                        ))
                    }
                }
            },
        };
        self.inner.execs.lock().expect("execs").remove(&id);
        result
    }

    pub async fn send_stdin(&self, id: u64, data: &[u8], eof: bool) -> Result<(), VmError> {
        self.send(&Request::Stdin { id, eof }, data).await
    }

    pub async fn kill(&self, id: u64, signal: i32) -> Result<(), VmError> {
        self.send(&Request::Kill { id, signal }, b"").await
    }
}
