//! stdout and stderr for a guest: kept up to a cap. Writing past the cap
//! keeps what fits and traps the guest, so an output flood ends at once as
//! `output_truncated` rather than spinning until its timeout.
//!
//! With a log tap (live logs), every byte also goes to the tap, and the
//! guest traps only at the tap's much larger cap: the result keeps its
//! first `cap` bytes (`truncated`), the log store the whole output. A tap
//! that is full makes the guest wait (`check_write` says 0 and `ready`
//! waits for the store), so a flood goes at the store's pace.
//!
//! With secrets, every byte passes a redactor first, so neither the result
//! nor the tap ever holds a value; [`CappedOutput::finish`] lets out what
//! it held back at the end.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use kiln_core::redact::{RedactStream, Redactor};
use kiln_logs::{LogTap, Stream, Written};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

#[derive(Default)]
struct Inner {
    buffer: BytesMut,
    truncated: bool,
    redact: Option<RedactStream>,
}

#[derive(Clone)]
pub struct CappedOutput {
    cap: usize,
    inner: Arc<Mutex<Inner>>,
    tap: Option<(LogTap, Stream)>,
}

impl CappedOutput {
    pub fn new(cap: usize) -> CappedOutput {
        CappedOutput {
            cap,
            inner: Arc::default(),
            tap: None,
        }
    }

    /// Also hands every byte to `tap` as `stream`.
    pub fn tapped(cap: usize, tap: LogTap, stream: Stream) -> CappedOutput {
        CappedOutput {
            tap: Some((tap, stream)),
            ..CappedOutput::new(cap)
        }
    }

    /// Redacts `redactor`'s values from everything written from now on.
    pub fn redact_with(&self, redactor: &Arc<Redactor>) {
        self.inner.lock().expect("output").redact = Some(redactor.stream());
    }

    /// The end of the output: what the redactor held back is let out.
    pub fn finish(&self) {
        let held = match self.inner.lock().expect("output").redact.as_mut() {
            Some(redact) => redact.finish(),
            None => return,
        };
        self.push_clear(&held);
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.inner.lock().expect("output").buffer).into_owned()
    }

    pub fn truncated(&self) -> bool {
        self.inner.lock().expect("output").truncated
    }

    /// Keeps what fits; false when the guest must stop (past the cap, or
    /// past the tap's cap when there is one).
    fn push(&self, bytes: &[u8]) -> bool {
        let redacted;
        let bytes = match self.inner.lock().expect("output").redact.as_mut() {
            Some(redact) => {
                redacted = redact.feed(bytes);
                &redacted[..]
            }
            None => bytes,
        };
        self.push_clear(bytes)
    }

    /// [`CappedOutput::push`] after redaction.
    fn push_clear(&self, bytes: &[u8]) -> bool {
        let fits = {
            let mut inner = self.inner.lock().expect("output");
            let room = self.cap.saturating_sub(inner.buffer.len());
            let take = room.min(bytes.len());
            inner.buffer.extend_from_slice(&bytes[..take]);
            if take < bytes.len() {
                inner.truncated = true;
            }
            take == bytes.len()
        };
        match &self.tap {
            None => fits,
            Some((tap, stream)) => {
                let kept = tap.write(*stream, bytes) == Written::Kept;
                if !kept {
                    // The flood ends here, as `output_truncated`.
                    self.inner.lock().expect("output").truncated = true;
                }
                kept
            }
        }
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        if self.push(&bytes) {
            Ok(())
        } else {
            Err(StreamError::Trap(anyhow::anyhow!("output limit reached")))
        }
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(match &self.tap {
            None => 64 << 10,
            Some((tap, _)) => tap.room().min(64 << 10),
        })
    }
}

#[async_trait::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {
        if let Some((tap, _)) = &self.tap {
            if tap.room() == 0 {
                tap.wait_room(1).await;
            }
        }
    }
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.push(buf) {
            Poll::Ready(Ok(buf.len()))
        } else {
            Poll::Ready(Err(std::io::Error::other("output limit reached")))
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
