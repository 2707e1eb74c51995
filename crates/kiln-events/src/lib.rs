//! The event log for its readers. The store writes events in the
//! transaction of each change (`kiln_db::events`); this crate reads them.
//!
//! One [`EventHub`] per process tails the log and broadcasts each new event
//! once, whatever the number of streams. A [`Subscription`] first reads the
//! log from its resume point (`Last-Event-ID`, `?after=`) page by page, then
//! follows the broadcast, skipping what it already sent: positions only
//! grow and are never filled in late, so a stream resumed anywhere, across
//! restarts, has no gap and no duplicate. The broadcast buffer is bounded: a
//! reader that falls that far behind is dropped with the reason, and comes
//! back with its last id.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_core::names::check_name;
use kiln_db::events::{Event, EventQuery};
use kiln_db::{Db, DbResult};
use tokio::sync::broadcast;

pub mod amqp;
pub mod nats;
pub mod notify;

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Events a subscriber may fall behind the newest before it is dropped.
pub const BUFFER: usize = 4096;
/// Most type patterns and labels in a filter.
pub const FILTER_MAX: usize = 16;
/// Events read per page from the log.
const PAGE: i64 = 500;
/// The longest the tail waits without a wake-up (a write in another process
/// on SQLite is seen at the latest after this).
const POLL: Duration = Duration::from_millis(250);

/// Which events a reader wants, within its tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Exact types, or prefixes ending in `.` (from patterns like `job.*`);
    /// empty: every type.
    pub types: Vec<String>,
    /// `kind:id`, e.g. `job:42` or `run:7`.
    pub resource: Option<(String, String)>,
    /// Every one must match.
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidFilter(pub String);

impl EventFilter {
    /// From query parameters: `type` (comma-separated; `job.*`, `run.succeeded`,
    /// `*`), `resource` (`kind:id`), `label` (`key=value`, comma-separated).
    pub fn parse(
        types: Option<&str>,
        resource: Option<&str>,
        labels: Option<&str>,
    ) -> Result<EventFilter, InvalidFilter> {
        let mut filter = EventFilter::default();
        for pattern in types.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
            if pattern == "*" {
                filter.types.clear();
                break;
            }
            let (name, prefix) = match pattern.strip_suffix(".*") {
                Some(stem) => (stem, true),
                None => (pattern, false),
            };
            check_name("type", name).map_err(|e| InvalidFilter(e.to_string()))?;
            filter.types.push(if prefix {
                format!("{name}.")
            } else {
                name.to_string()
            });
        }
        if let Some(resource) = resource.filter(|r| !r.is_empty()) {
            let (kind, id) = resource
                .split_once(':')
                .ok_or_else(|| InvalidFilter("resource must be kind:id".into()))?;
            check_name("resource kind", kind).map_err(|e| InvalidFilter(e.to_string()))?;
            kiln_core::names::check_text("resource id", id, 256)
                .map_err(|e| InvalidFilter(e.to_string()))?;
            filter.resource = Some((kind.to_string(), id.to_string()));
        }
        for pair in labels.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| InvalidFilter("label must be key=value".into()))?;
            check_name("label key", key).map_err(|e| InvalidFilter(e.to_string()))?;
            kiln_core::names::check_text("label value", value, 256)
                .map_err(|e| InvalidFilter(e.to_string()))?;
            filter.labels.insert(key.to_string(), value.to_string());
        }
        if filter.types.len() > FILTER_MAX || filter.labels.len() > FILTER_MAX {
            return Err(InvalidFilter(format!(
                "at most {FILTER_MAX} types and {FILTER_MAX} labels"
            )));
        }
        Ok(filter)
    }

    /// Whether an event of `tenant`'s log passes.
    pub fn matches(&self, tenant: &str, event: &Event) -> bool {
        event.tenant == tenant
            && (self.types.is_empty()
                || self.types.iter().any(|t| {
                    if t.ends_with('.') {
                        event.kind.starts_with(t.as_str())
                    } else {
                        event.kind == *t
                    }
                }))
            && self
                .resource
                .as_ref()
                .is_none_or(|(k, id)| event.resource.kind == *k && event.resource.id == *id)
            && self
                .labels
                .iter()
                .all(|(k, v)| event.labels.get(k) == Some(v))
    }

    fn query<'a>(&'a self, tenant: &'a str, after: i64, limit: i64) -> EventQuery<'a> {
        EventQuery {
            tenant: Some(tenant),
            types: &self.types,
            resource: self
                .resource
                .as_ref()
                .map(|(k, id)| (k.as_str(), id.as_str())),
            after,
            limit,
        }
    }
}

/// One page of a tenant's log: the events that pass, and the position to
/// ask after next (past everything read, matching or not).
#[derive(Clone, Debug)]
pub struct Page {
    pub events: Vec<Event>,
    pub next_after: i64,
}

/// Reads one page of `tenant`'s events after `after`.
pub async fn page(
    db: &Db,
    tenant: &str,
    filter: &EventFilter,
    after: i64,
    limit: i64,
) -> DbResult<Page> {
    let rows = db.event_read(&filter.query(tenant, after, limit)).await?;
    let next_after = rows.last().map_or(after, |e| e.id);
    Ok(Page {
        events: rows
            .into_iter()
            .filter(|e| filter.matches(tenant, e))
            .collect(),
        next_after,
    })
}

/// Tails the log once for the whole process.
pub struct EventHub {
    db: Db,
    sender: broadcast::Sender<Arc<Event>>,
    /// The newest position broadcast.
    last: AtomicI64,
}

impl EventHub {
    /// Starts the tail from the log's newest position. The task ends with
    /// `stop` or once the hub is dropped.
    pub async fn start(db: Db) -> DbResult<Arc<EventHub>> {
        let last = db.event_last().await?;
        let (sender, _) = broadcast::channel(BUFFER);
        let hub = Arc::new(EventHub {
            db,
            sender,
            last: AtomicI64::new(last),
        });
        tokio::spawn(tail(Arc::downgrade(&hub)));
        Ok(hub)
    }

    /// The newest position broadcast so far.
    pub fn position(&self) -> i64 {
        self.last.load(Ordering::Acquire)
    }

    /// A stream of `tenant`'s events passing `filter`: those after `after`
    /// first (from the log), then new ones as they come. Without `after`
    /// it starts at the newest event.
    pub fn subscribe(&self, tenant: &str, filter: EventFilter, after: Option<i64>) -> Subscription {
        let receiver = self.sender.subscribe();
        let cursor = after.unwrap_or_else(|| self.last.load(Ordering::Acquire));
        Subscription {
            db: self.db.clone(),
            tenant: tenant.to_string(),
            filter,
            receiver,
            cursor,
            backlog: VecDeque::new(),
            read_to: cursor,
            caught_up: after.is_none(),
        }
    }
}

async fn tail(hub: std::sync::Weak<EventHub>) {
    loop {
        let Some(strong) = hub.upgrade() else { return };
        let ready = strong.db.events_ready();
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let after = strong.last.load(Ordering::Acquire);
        let query = EventQuery {
            tenant: None,
            types: &[],
            resource: None,
            after,
            limit: kiln_db::events::PAGE_MAX,
        };
        let more = match strong.db.event_read(&query).await {
            Ok(events) => {
                let full = events.len() as i64 == kiln_db::events::PAGE_MAX;
                for event in events {
                    strong.last.store(event.id, Ordering::Release);
                    // No receiver is not an error: nobody listens yet.
                    let _ = strong.sender.send(Arc::new(event));
                }
                full
            }
            Err(error) => {
                tracing::warn!(%error, "reading the event log failed");
                false
            }
        };
        drop(strong);
        if more {
            continue;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Why a stream ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ended {
    /// The reader fell too far behind; it resumes with its last id.
    #[error(
        "slow consumer: fell more than {BUFFER} events behind; reconnect with Last-Event-ID {0}"
    )]
    Slow(i64),
    #[error("the event log could not be read: {0}")]
    Store(String),
    /// The process is stopping.
    #[error("the server is stopping")]
    Closed,
}

/// One reader's stream.
pub struct Subscription {
    db: Db,
    tenant: String,
    filter: EventFilter,
    receiver: broadcast::Receiver<Arc<Event>>,
    /// The position of the last event handed out or passed over.
    cursor: i64,
    /// Events read from the log and not yet handed out.
    backlog: VecDeque<Event>,
    /// How far the last page read got (past events the labels filtered out).
    read_to: i64,
    caught_up: bool,
}

impl Subscription {
    /// The position the next event will come after.
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    /// The next event, waiting for one when there is none.
    pub async fn next(&mut self) -> Result<Event, Ended> {
        loop {
            if let Some(event) = self.backlog.pop_front() {
                self.cursor = event.id;
                return Ok(event);
            }
            self.cursor = self.cursor.max(self.read_to);
            if !self.caught_up {
                let query = self.filter.query(&self.tenant, self.cursor, PAGE);
                let rows = self
                    .db
                    .event_read(&query)
                    .await
                    .map_err(|e| Ended::Store(e.to_string()))?;
                // A short page is the end of the log as it stood; what
                // comes after arrives through the broadcast, which was
                // joined before this read.
                self.caught_up = (rows.len() as i64) < PAGE;
                self.read_to = rows.last().map_or(self.cursor, |e| e.id);
                let (tenant, filter) = (&self.tenant, &self.filter);
                self.backlog
                    .extend(rows.into_iter().filter(|e| filter.matches(tenant, e)));
                continue;
            }
            match self.receiver.recv().await {
                Ok(event) if event.id > self.cursor => {
                    self.cursor = event.id;
                    if self.filter.matches(&self.tenant, &event) {
                        return Ok((*event).clone());
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return Err(Ended::Slow(self.cursor))
                }
                Err(broadcast::error::RecvError::Closed) => return Err(Ended::Closed),
            }
        }
    }
}
