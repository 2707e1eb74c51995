//! stdout and stderr for a guest: kept up to a cap. Writing past the cap
//! keeps what fits and traps the guest, so an output flood ends at once as
//! `output_truncated` rather than spinning until its timeout.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

#[derive(Default)]
struct Inner {
    buffer: BytesMut,
    truncated: bool,
}

#[derive(Clone)]
pub struct CappedOutput {
    cap: usize,
    inner: Arc<Mutex<Inner>>,
}

impl CappedOutput {
    pub fn new(cap: usize) -> CappedOutput {
        CappedOutput {
            cap,
            inner: Arc::default(),
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.inner.lock().expect("output").buffer).into_owned()
    }

    pub fn truncated(&self) -> bool {
        self.inner.lock().expect("output").truncated
    }

    /// Keeps what fits; false when something had to be dropped.
    fn push(&self, bytes: &[u8]) -> bool {
        let mut inner = self.inner.lock().expect("output");
        let room = self.cap.saturating_sub(inner.buffer.len());
        let take = room.min(bytes.len());
        inner.buffer.extend_from_slice(&bytes[..take]);
        if take < bytes.len() {
            inner.truncated = true;
            return false;
        }
        true
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
        Ok(64 << 10)
    }
}

#[async_trait::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
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
