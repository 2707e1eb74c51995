//! The tap a sandbox writes its output into: a bounded buffer per stream,
//! filled under a lock without I/O and drained by the writer task.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use kiln_db::logs::NewLogChunk;

use crate::{Round, Shared, CHUNK_BYTES_MAX};

/// Where output comes from. A job's output (wasm, or the `vm` kind's
/// command) has `job_id` and source `job`; a command run through the API
/// has source `vm`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub tenant: String,
    pub job_id: Option<i64>,
    pub attempt: Option<i32>,
    pub vm_id: Option<String>,
    pub exec_id: Option<i64>,
}

impl Origin {
    pub fn job(tenant: &str, job_id: i64, attempt: i32) -> Origin {
        Origin {
            tenant: tenant.to_string(),
            job_id: Some(job_id),
            attempt: Some(attempt),
            ..Origin::default()
        }
    }

    pub fn vm(tenant: &str, vm_id: &str) -> Origin {
        Origin {
            tenant: tenant.to_string(),
            vm_id: Some(vm_id.to_string()),
            ..Origin::default()
        }
    }

    fn source(&self) -> &'static str {
        if self.job_id.is_some() {
            "job"
        } else {
            "vm"
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// What became of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Kept,
    /// The source reached its byte cap: this write kept only what fitted,
    /// and nothing more will be kept.
    Capped,
}

/// Bytes without a line end wait this long for the rest of their line.
const PARTIAL_LINE_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    partial_since: Option<Instant>,
}

#[derive(Default)]
struct TapState {
    streams: [Pending; 2],
    buffered: usize,
    /// Bytes taken toward the cap (kept or dropped).
    taken: u64,
    /// Dropped while stalled, not yet told.
    dropped: u64,
    capped: bool,
    cap_told: bool,
    stalled: bool,
    closed: bool,
    seq: i64,
    /// Text this source has in database rows.
    db_bytes: u64,
    finished: Vec<tokio::sync::oneshot::Sender<()>>,
}

pub(crate) struct TapInner {
    origin: Origin,
    /// Blob keys of this source start with it.
    prefix: String,
    state: Mutex<TapState>,
    pub(crate) drained: tokio::sync::Notify,
}

impl TapInner {
    fn state(&self) -> MutexGuard<'_, TapState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After a round with this tap's bytes was stored: the store keeps up.
    pub(crate) fn recovered(&self) {
        self.state().stalled = false;
    }

    /// Moves what this tap holds into `round`: whole lines, or everything
    /// when `everything` (closed, or nobody writes any more), or a partial
    /// line that waited long enough. True when the tap is done with.
    pub(crate) fn take_into(
        self: &Arc<Self>,
        shared: &Shared,
        round: &mut Round,
        everything: bool,
    ) -> bool {
        let mut st = self.state();
        let everything = everything || st.closed;
        let mut took = 0usize;
        for (index, name) in [(0, "stdout"), (1, "stderr")] {
            let pending = &mut st.streams[index];
            if pending.bytes.is_empty() {
                continue;
            }
            let cut = if everything || pending.bytes.len() >= CHUNK_BYTES_MAX {
                pending.bytes.len()
            } else if let Some(end) = pending.bytes.iter().rposition(|b| *b == b'\n') {
                end + 1
            } else {
                let since = *pending.partial_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= PARTIAL_LINE_WAIT {
                    pending.bytes.len()
                } else {
                    0
                }
            };
            if cut == 0 {
                continue;
            }
            // A character cut in two waits for its other half.
            let cut = if everything {
                cut
            } else {
                utf8_boundary(&pending.bytes, cut)
            };
            if cut == 0 {
                continue;
            }
            let rest = pending.bytes.split_off(cut);
            let taken = std::mem::replace(&mut pending.bytes, rest);
            pending.partial_since = None;
            took += taken.len();
            let level = if index == 0 { "info" } else { "warn" };
            self.push_text(shared, &mut st, round, name, level, taken);
        }
        st.buffered -= took;
        shared.buffered.fetch_sub(took, Ordering::Relaxed);
        if st.dropped > 0 {
            let dropped = std::mem::take(&mut st.dropped);
            shared
                .counters
                .dropped_bytes
                .fetch_add(dropped, Ordering::Relaxed);
            let text = format!(
                "[kiln: {dropped} bytes of output were dropped here: the log store fell behind]\n"
            );
            self.push_text(shared, &mut st, round, "log", "warn", text.into_bytes());
        }
        if st.capped && !st.cap_told && st.buffered == 0 {
            st.cap_told = true;
            let text = format!(
                "[kiln: output past {} bytes is not kept]\n",
                shared.config.source_bytes_max
            );
            self.push_text(shared, &mut st, round, "log", "warn", text.into_bytes());
        }
        if took > 0 || st.stalled {
            round.drained.push(self.clone());
        }
        let done = everything && st.buffered == 0;
        if done {
            round.finished.append(&mut st.finished);
        }
        done
    }

    fn push_text(
        &self,
        shared: &Shared,
        st: &mut TapState,
        round: &mut Round,
        stream: &str,
        level: &str,
        bytes: Vec<u8>,
    ) {
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        round.bytes += text.len() as u64;
        // The source's first bytes go to rows, the rest to the blob store.
        let room = match shared.blobs {
            Some(_) => shared
                .config
                .db_bytes_per_source
                .saturating_sub(st.db_bytes),
            None => u64::MAX,
        };
        let (rows, segment) = if text.len() as u64 <= room {
            (text, None)
        } else {
            let mut cut = room as usize;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let mut rows = text;
            let segment = rows.split_off(cut);
            (rows, Some(segment))
        };
        if !rows.is_empty() {
            for text in split_text(rows, CHUNK_BYTES_MAX) {
                st.db_bytes += text.len() as u64;
                let row = self.row(shared, st, stream, level, text);
                round.rows.push(row);
            }
        }
        if let Some(text) = segment {
            let mut row = self.row(shared, st, stream, level, String::new());
            row.bytes = text.len() as i64;
            row.blob_key = Some(format!("{}/{}", self.prefix, row.seq));
            round.segments.push((round.rows.len(), text));
            round.rows.push(row);
        }
    }

    fn row(
        &self,
        shared: &Shared,
        st: &mut TapState,
        stream: &str,
        level: &str,
        text: String,
    ) -> NewLogChunk {
        st.seq += 1;
        NewLogChunk {
            tenant: self.origin.tenant.clone(),
            source: self.origin.source().into(),
            job_id: self.origin.job_id,
            attempt: self.origin.attempt,
            vm_id: self.origin.vm_id.clone(),
            exec_id: self.origin.exec_id,
            node: shared.config.node.clone(),
            stream: stream.into(),
            seq: st.seq,
            level: level.into(),
            ts: crate::now_millis(),
            bytes: text.len() as i64,
            text,
            blob_key: None,
        }
    }
}

/// The largest cut at or before `cut` that does not split a character.
fn utf8_boundary(bytes: &[u8], cut: usize) -> usize {
    match std::str::from_utf8(&bytes[..cut]) {
        Ok(_) => cut,
        Err(e) if e.error_len().is_none() => e.valid_up_to().max(cut.saturating_sub(3)),
        Err(_) => cut,
    }
}

/// Splits text into pieces of at most `max` bytes, at character bounds.
fn split_text(mut text: String, max: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    while text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let rest = text.split_off(cut);
        pieces.push(std::mem::replace(&mut text, rest));
    }
    pieces.push(text);
    pieces
}

/// One job attempt's or command's output on its way to the store. Clones
/// share the buffer. Writing never blocks; [`LogTap::wait_room`] is where
/// a writer that can wait does.
#[derive(Clone)]
pub struct LogTap {
    inner: Arc<TapInner>,
    shared: Arc<Shared>,
}

impl LogTap {
    pub(crate) fn new(shared: Arc<Shared>, origin: Origin) -> LogTap {
        let prefix = format!("logs/{}/{:016x}", origin.tenant, rand::random::<u64>());
        let inner = Arc::new(TapInner {
            origin,
            prefix,
            state: Mutex::default(),
            drained: tokio::sync::Notify::new(),
        });
        shared.taps().push(inner.clone());
        LogTap { inner, shared }
    }

    /// Bytes a write can hand over now without any being dropped; 0 means
    /// wait ([`LogTap::wait_room`]). A stalled or capped tap takes (and
    /// drops) anything.
    pub fn room(&self) -> usize {
        let st = self.inner.state();
        if st.stalled || st.capped || st.closed {
            return usize::MAX;
        }
        self.room_in(&st)
    }

    fn room_in(&self, st: &TapState) -> usize {
        let config = &self.shared.config;
        let global = config
            .buffered_bytes_max
            .saturating_sub(self.shared.buffered.load(Ordering::Relaxed));
        config
            .tap_buffer_bytes
            .saturating_sub(st.buffered)
            .min(global)
    }

    /// Waits until the writer made room for `wanted` bytes (or all the
    /// room a tap has), at most `stall`; then the tap is stalled (it drops
    /// instead of waiting) until a round with its bytes is stored.
    pub async fn wait_room(&self, wanted: usize) {
        let wanted = wanted.clamp(1, self.shared.config.tap_buffer_bytes);
        let deadline = tokio::time::Instant::now() + self.shared.config.stall;
        loop {
            let notified = self.inner.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.room() >= wanted {
                return;
            }
            self.shared.kick.notify_one();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let mut st = self.inner.state();
                if !st.stalled {
                    st.stalled = true;
                    tracing::debug!(origin = ?self.inner.origin, "the log store fell behind; output is dropped until it catches up");
                }
                return;
            }
        }
    }

    /// Hands output over; never blocks. What does not fit (the store fell
    /// behind) is dropped and counted; past the source's cap nothing more
    /// is kept.
    pub fn write(&self, stream: Stream, bytes: &[u8]) -> Written {
        let mut st = self.inner.state();
        if st.capped {
            return Written::Capped;
        }
        if st.closed || bytes.is_empty() {
            return Written::Kept;
        }
        let cap_left = self.shared.config.source_bytes_max.saturating_sub(st.taken);
        let take = bytes
            .len()
            .min(usize::try_from(cap_left).unwrap_or(usize::MAX));
        st.taken += take as u64;
        let keep = take.min(self.room_in(&st));
        st.dropped += (take - keep) as u64;
        let pending = &mut st.streams[stream.index()];
        pending.bytes.extend_from_slice(&bytes[..keep]);
        st.buffered += keep;
        self.shared.buffered.fetch_add(keep, Ordering::Relaxed);
        let full = st.buffered * 2 >= self.shared.config.tap_buffer_bytes;
        let written = if take < bytes.len() {
            st.capped = true;
            Written::Capped
        } else {
            Written::Kept
        };
        drop(st);
        if full || written == Written::Capped {
            self.shared.kick.notify_one();
        }
        written
    }

    /// Waits for room, then writes: for writers that can wait (a VM's
    /// output pump), so the guest goes at the store's pace.
    pub async fn write_paced(&self, stream: Stream, bytes: &[u8]) -> Written {
        if self.room() < bytes.len() {
            self.wait_room(bytes.len()).await;
        }
        self.write(stream, bytes)
    }

    /// True once the source reached its byte cap.
    pub fn capped(&self) -> bool {
        self.inner.state().capped
    }

    /// Bytes taken so far (kept or dropped), up to the cap.
    pub fn taken(&self) -> u64 {
        self.inner.state().taken
    }

    /// Ends the tap and waits (at most twice `stall`) until everything it
    /// took is stored, so a job's end is written after its last line.
    pub async fn finish(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut st = self.inner.state();
            st.closed = true;
            st.finished.push(tx);
        }
        self.shared.kick.notify_one();
        let _ = tokio::time::timeout(self.shared.config.stall * 2, rx).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_cuts_never_split_a_character() {
        let text = "aé€😀".as_bytes();
        for (cut, expect) in [
            (1, 1),
            (2, 1),
            (3, 3),
            (4, 3),
            (5, 3),
            (6, 6),
            (7, 6),
            (9, 6),
            (10, 10),
        ] {
            assert_eq!(utf8_boundary(text, cut), expect, "cut {cut}");
        }
    }

    #[test]
    fn long_text_splits_at_character_bounds() {
        for (text, max, expect) in [
            ("abcdef", 4, vec!["abcd", "ef"]),
            ("abc", 4, vec!["abc"]),
            ("aé€", 3, vec!["aé", "€"]),
            ("", 4, vec![""]),
        ] {
            assert_eq!(split_text(text.to_string(), max), expect, "{text}");
        }
    }
}
