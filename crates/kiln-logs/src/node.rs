//! The node's own lines: a tracing layer that hands every info, warn and
//! error event to a bounded queue the log writer drains. It never blocks
//! the code that logs: a full queue drops the line and counts it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Lines waiting for the writer.
const QUEUE: usize = 4_096;
/// The longest line kept.
const LINE_MAX: usize = 8 << 10;

pub(crate) struct NodeLine {
    pub level: &'static str,
    pub ts: i64,
    pub text: String,
}

/// The queue's reading end, taken by the log writer.
pub struct NodeLines {
    rx: mpsc::Receiver<NodeLine>,
}

impl NodeLines {
    pub(crate) fn drain(&mut self, max: usize) -> Vec<NodeLine> {
        let mut lines = Vec::new();
        while lines.len() < max {
            match self.rx.try_recv() {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        lines
    }
}

static LINES: OnceLock<Mutex<Option<NodeLines>>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Set once a writer took the queue: until then lines are not formatted.
static ATTACHED: AtomicBool = AtomicBool::new(false);

pub(crate) fn take_lines() -> Option<NodeLines> {
    let lines = LINES
        .get()?
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if lines.is_some() {
        ATTACHED.store(true, Ordering::Relaxed);
    }
    lines
}

pub(crate) fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The layer feeding the store; install it once, at start. The process's
/// first [`crate::LogSink`] takes the lines.
pub fn node_layer() -> NodeLayer {
    let (tx, rx) = mpsc::channel(QUEUE);
    let _ = LINES.set(Mutex::new(Some(NodeLines { rx })));
    NodeLayer { tx: Arc::new(tx) }
}

pub struct NodeLayer {
    tx: Arc<mpsc::Sender<NodeLine>>,
}

struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for NodeLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !ATTACHED.load(Ordering::Relaxed) {
            return;
        }
        let meta = event.metadata();
        let level = match *meta.level() {
            Level::ERROR => "error",
            Level::WARN => "warn",
            Level::INFO => "info",
            _ => return,
        };
        let mut fields = Fields {
            message: String::new(),
            rest: String::new(),
        };
        event.record(&mut fields);
        let mut text = format!("{}: {}{}", meta.target(), fields.message, fields.rest);
        if text.len() > LINE_MAX {
            let mut cut = LINE_MAX;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        text.push('\n');
        let line = NodeLine {
            level,
            ts: crate::now_millis(),
            text,
        };
        if self.tx.try_send(line).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}
