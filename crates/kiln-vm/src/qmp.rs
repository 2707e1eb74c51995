//! A minimal QMP client: QEMU's JSON control protocol on a Unix socket,
//! used to save and restore VM state.

use std::path::Path;
use std::time::{Duration, Instant};

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
    VmError::Boot(format!("qmp: {}", message.into()))
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

    /// Saves the whole machine state to `file` (the VM is paused afterwards).
    pub async fn save(&mut self, file: &Path, timeout: Duration) -> Result<(), VmError> {
        let uri = format!("exec:cat > '{}'", file.display());
        self.execute("migrate", json!({"uri": uri})).await?;
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
