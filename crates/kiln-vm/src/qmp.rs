//! A minimal QMP client: QEMU's JSON control protocol on a Unix socket,
//! used to save and restore VM state. A state is saved to a descriptor
//! handed over with `getfd` (`SCM_RIGHTS`), never to a shell command, so
//! no path reaches a shell.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::VmError;

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

fn qmp_error(message: impl Into<String>) -> VmError {
    VmError::Qmp(message.into())
}

impl Qmp {
    /// Connects (waiting for the socket to appear) and negotiates.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, VmError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                Err(e) => return Err(qmp_error(format!("connect {}: {e}", path.display()))),
            }
        };
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer,
        };
        qmp.read_message().await?; // greeting
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(qmp_error("connection closed"));
        }
        serde_json::from_str(&line).map_err(|e| qmp_error(e.to_string()))
    }

    /// Runs a command and returns its `return` value (events are skipped).
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, VmError> {
        let request = json!({"execute": command, "arguments": arguments});
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .await?;
        self.read_return(command).await
    }

    /// Reads up to the answer of the command just sent (events are skipped).
    async fn read_return(&mut self, command: &str) -> Result<Value, VmError> {
        loop {
            let message = self.read_message().await?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(qmp_error(format!("{command}: {error}")));
            }
        }
    }

    pub async fn status(&mut self) -> Result<String, VmError> {
        let status = self.execute("query-status", json!({})).await?;
        Ok(status["status"].as_str().unwrap_or("").to_string())
    }

    /// Hands QEMU a descriptor under `name` (QMP `getfd`, the descriptor
    /// riding along as `SCM_RIGHTS`).
    pub async fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), VmError> {
        let request = json!({"execute": "getfd", "arguments": {"fdname": name}});
        let line = format!("{request}\n");
        let socket: &UnixStream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        let mut sent = 0;
        while sent < line.len() {
            socket.writable().await?;
            let result = socket.try_io(tokio::io::Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(&line.as_bytes()[sent..])];
                // The descriptor goes with the first byte only.
                let rights = [ControlMessage::ScmRights(&fds)];
                let cmsgs: &[ControlMessage] = if sent == 0 { &rights } else { &[] };
                sendmsg::<()>(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
                    .map_err(std::io::Error::from)
            });
            match result {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.read_return("getfd").await?;
        Ok(())
    }

    /// Saves the whole machine state into `file` (the VM is paused
    /// afterwards).
    pub async fn save(&mut self, file: std::fs::File, timeout: Duration) -> Result<(), VmError> {
        self.send_fd("snapshot", file.as_fd()).await?;
        // QEMU holds its own copy now.
        drop(file);
        self.execute("migrate", json!({"uri": "fd:snapshot"}))
            .await?;
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.execute("query-migrate", json!({})).await?;
            match state["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(qmp_error(format!("migrate: {state}")))
                }
                _ if Instant::now() > deadline => {
                    return Err(qmp_error("migrate did not finish in time"))
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Waits for an incoming migration to load, then resumes the VM.
    pub async fn resume_after_incoming(&mut self, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.status().await?.as_str() {
                "inmigrate" if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                "inmigrate" => return Err(qmp_error("state did not load in time")),
                _ => break,
            }
        }
        self.execute("cont", json!({})).await?;
        Ok(())
    }
}
