//! Live logs. A sandbox writes its output into a [`LogTap`]: a bounded
//! buffer per job attempt or VM command, written under a lock without any
//! I/O. One writer task per process ([`LogSink::start`]) drains every tap
//! every `flush_every` (sooner when one fills), cuts the bytes at line
//! ends into chunks and stores the whole round in one transaction
//! (`kiln_db::logs`). Past `db_bytes_per_source` a source's text goes to
//! the blob store, one segment per round, and its row keeps the key.
//!
//! Memory is bounded: a tap holds at most `tap_buffer_bytes` and all taps
//! together at most `buffered_bytes_max`. When a tap is full its writer
//! waits for the store ([`LogTap::wait_room`]: backpressure, so a job that
//! prints as fast as it can goes at the store's pace and nothing is lost);
//! when the store makes no progress for `stall`, the tap is marked stalled
//! and drops what does not fit, counted, until the store catches up, then
//! a marker line says how much was dropped. So a slow store slows a
//! flooding job, and a stalled one costs a job at most `stall` of waiting,
//! never its result. Past `source_bytes_max` a source keeps nothing more,
//! and a marker says so.

mod loki;
mod node;
mod tap;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kiln_blob::BlobStore;
use kiln_db::logs::{LogChunk, NewLogChunk};
use kiln_db::Db;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use loki::{push_loop, LokiConfig};
pub use node::{node_layer, NodeLayer, NodeLines};
pub use tap::{LogTap, Origin, Stream, Written};

use tap::TapInner;

/// The longest text one row holds; longer cuts are split.
pub const CHUNK_BYTES_MAX: usize = 256 << 10;

#[derive(Clone, Debug)]
pub struct LogConfig {
    /// The node id written on every row.
    pub node: String,
    /// The most output one job attempt or command keeps (a marker says
    /// where it stopped).
    pub source_bytes_max: u64,
    /// A source's first bytes kept in the database; the rest goes to the
    /// blob store in segments.
    pub db_bytes_per_source: u64,
    /// What one tap buffers before its writer waits.
    pub tap_buffer_bytes: usize,
    /// What all taps of the process buffer together.
    pub buffered_bytes_max: usize,
    /// How often the writer drains the taps.
    pub flush_every: Duration,
    /// How long a tap waits for the store before it drops instead.
    pub stall: Duration,
}

impl LogConfig {
    pub fn new(node: &str) -> LogConfig {
        LogConfig {
            node: node.to_string(),
            source_bytes_max: 64 << 20,
            db_bytes_per_source: 1 << 20,
            tap_buffer_bytes: 4 << 20,
            buffered_bytes_max: 64 << 20,
            flush_every: Duration::from_millis(50),
            stall: Duration::from_secs(2),
        }
    }
}

/// What the writer has done since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub chunks: u64,
    pub bytes: u64,
    /// Bytes dropped because the store fell behind (not past a cap).
    pub dropped_bytes: u64,
    /// Rounds the store refused three times (their chunks were lost).
    pub failed_rounds: u64,
    /// Node lines dropped because their queue was full.
    pub node_lines_dropped: u64,
    /// Segments written to the blob store.
    pub segments: u64,
}

#[derive(Default)]
struct Counters {
    chunks: AtomicU64,
    bytes: AtomicU64,
    dropped_bytes: AtomicU64,
    failed_rounds: AtomicU64,
    segments: AtomicU64,
}

pub(crate) struct Shared {
    config: LogConfig,
    db: Db,
    blobs: Option<BlobStore>,
    taps: Mutex<Vec<Arc<TapInner>>>,
    kick: Notify,
    /// Bytes in every tap's buffer.
    buffered: AtomicUsize,
    counters: Counters,
    node_lines: Mutex<Option<NodeLines>>,
}

impl Shared {
    fn taps(&self) -> std::sync::MutexGuard<'_, Vec<Arc<TapInner>>> {
        self.taps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The process's handle on the log store. Cloning is cheap.
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
}

impl LogSink {
    /// Starts the writer; it drains everything once more after `stop` and
    /// ends. `blobs` takes large volumes (without it, everything stays in
    /// the database). The nodes' lines, if [`node_layer`] was installed,
    /// are taken here.
    pub fn start(
        db: Db,
        blobs: Option<BlobStore>,
        config: LogConfig,
        stop: CancellationToken,
    ) -> (LogSink, tokio::task::JoinHandle<()>) {
        let shared = Arc::new(Shared {
            config,
            db,
            blobs,
            taps: Mutex::default(),
            kick: Notify::new(),
            buffered: AtomicUsize::new(0),
            counters: Counters::default(),
            node_lines: Mutex::new(node::take_lines()),
        });
        let writer = tokio::spawn(write_loop(shared.clone(), stop));
        (LogSink { shared }, writer)
    }

    /// A tap for one job attempt or command.
    pub fn tap(&self, origin: Origin) -> LogTap {
        LogTap::new(self.shared.clone(), origin)
    }

    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        LogStats {
            chunks: c.chunks.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            dropped_bytes: c.dropped_bytes.load(Ordering::Relaxed),
            failed_rounds: c.failed_rounds.load(Ordering::Relaxed),
            node_lines_dropped: node::dropped(),
            segments: c.segments.load(Ordering::Relaxed),
        }
    }
}

/// A chunk's text, from its row or the blob store.
pub async fn chunk_text(blobs: &BlobStore, chunk: &LogChunk) -> String {
    match &chunk.blob_key {
        None => chunk.text.clone(),
        Some(key) => match blobs.get(key).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(error) => format!("[kiln: this part of the log is unavailable: {error}]\n"),
        },
    }
}

/// Retention of the blob segments whose rows retention deleted.
pub async fn delete_segments(blobs: &BlobStore, keys: &[String]) {
    for key in keys {
        if let Err(error) = blobs.delete(key).await {
            tracing::debug!(%key, %error, "a log segment could not be deleted");
        }
    }
}

pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One round's rows, and the taps to tell once they are stored.
#[derive(Default)]
struct Round {
    rows: Vec<NewLogChunk>,
    /// Segments to put in the blob store before the rows: (row index, text).
    segments: Vec<(usize, String)>,
    drained: Vec<Arc<TapInner>>,
    finished: Vec<tokio::sync::oneshot::Sender<()>>,
    bytes: u64,
}

async fn write_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut node_seq = 0i64;
    loop {
        let idle = shared.taps().is_empty();
        let wait = if idle {
            Duration::from_millis(250)
        } else {
            shared.config.flush_every
        };
        let stopping = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = shared.kick.notified() => false,
            _ = stop.cancelled() => true,
        };
        let mut round = collect(&shared, stopping);
        node_rows(&shared, &mut round, &mut node_seq);
        store(&shared, round).await;
        if stopping {
            return;
        }
    }
}

/// Takes what the taps hold into a round.
fn collect(shared: &Shared, everything: bool) -> Round {
    let mut round = Round::default();
    let mut taps = shared.taps();
    taps.retain(|tap| {
        let orphan = Arc::strong_count(tap) == 1;
        let done = tap.take_into(shared, &mut round, everything || orphan);
        !done
    });
    round
}

fn node_rows(shared: &Shared, round: &mut Round, seq: &mut i64) {
    let mut lines = shared
        .node_lines
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let Some(lines) = lines.as_mut() else {
        return;
    };
    for line in lines.drain(1_000) {
        *seq += 1;
        round.bytes += line.text.len() as u64;
        round.rows.push(NewLogChunk {
            tenant: String::new(),
            source: "node".into(),
            node: shared.config.node.clone(),
            stream: "log".into(),
            seq: *seq,
            level: line.level.into(),
            ts: line.ts,
            bytes: line.text.len() as i64,
            text: line.text,
            ..NewLogChunk::default()
        });
    }
}

/// Writes a round: segments to the blob store, then every row in one
/// transaction, retried twice; then wakes the taps that waited for room
/// and the callers that waited for their tap to be stored.
async fn store(shared: &Shared, mut round: Round) {
    if round.rows.is_empty() {
        for tap in &round.drained {
            tap.drained.notify_waiters();
        }
        for done in round.finished {
            let _ = done.send(());
        }
        return;
    }
    for (index, text) in std::mem::take(&mut round.segments) {
        let (Some(blobs), Some(key)) = (&shared.blobs, round.rows[index].blob_key.clone()) else {
            continue;
        };
        let put = tokio::time::timeout(
            Duration::from_secs(10),
            blobs.put(&key, bytes::Bytes::from(text.clone())),
        )
        .await;
        if matches!(put, Ok(Ok(()))) {
            shared.counters.segments.fetch_add(1, Ordering::Relaxed);
        } else {
            // Kept in the row instead: the output is not lost for it.
            round.rows[index].blob_key = None;
            round.rows[index].text = text;
        }
    }
    let mut stored = false;
    for wait in [200u64, 1_000, 0] {
        match tokio::time::timeout(Duration::from_secs(10), shared.db.log_insert(&round.rows)).await
        {
            Ok(Ok(())) => {
                stored = true;
                break;
            }
            Ok(Err(error)) => tracing::debug!(%error, "log chunks not stored; retrying"),
            Err(_) => tracing::debug!("log chunks not stored in 10 s; retrying"),
        }
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
    let c = &shared.counters;
    if stored {
        c.chunks
            .fetch_add(round.rows.len() as u64, Ordering::Relaxed);
        c.bytes.fetch_add(round.bytes, Ordering::Relaxed);
    } else {
        c.failed_rounds.fetch_add(1, Ordering::Relaxed);
        c.dropped_bytes.fetch_add(round.bytes, Ordering::Relaxed);
        tracing::warn!(
            chunks = round.rows.len(),
            bytes = round.bytes,
            "the log store refused a round of output three times; it was dropped"
        );
    }
    for tap in &round.drained {
        if stored {
            tap.recovered();
        }
        tap.drained.notify_waiters();
    }
    for done in round.finished {
        let _ = done.send(());
    }
}
