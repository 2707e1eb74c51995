//! Incident detectors. They read the event log from their cursor
//! (`incidents` in `event_cursors`) and open, repeat and clear incidents:
//!
//! | detector | opens on | fingerprint | clears when |
//! |---|---|---|---|
//! | node lost | `node.lost` | `node_lost:<node>` | `node.online` of that node |
//! | dead-letter burst | `dead_burst` or more `job.dead` of one queue within `dead_window` | `dead_letter_burst:<queue>` | no `job.dead` of that queue for `quiet` |
//! | pipeline run failed | `run.failed` | `run_failed:<pipeline>` | a `run.succeeded` of that pipeline |
//!
//! The rules that decide (`Detectors::see`) are pure: events in, what to
//! do out; the loop applies them to the store. An incident's opening and
//! every change of its state are events themselves (migration 0012's
//! triggers), which the detectors ignore.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use kiln_core::Millis;
use kiln_db::events::{Event, EventQuery, PAGE_MAX};
use kiln_db::incidents::Sighting;
use kiln_db::Db;
use kiln_worker::now_millis;
use tokio_util::sync::CancellationToken;

pub const CURSOR: &str = "incidents";

#[derive(Clone, Debug)]
pub struct IncidentConfig {
    /// `job.dead` events of one queue that make a burst...
    pub dead_burst: usize,
    /// ...within this long.
    pub dead_window: Duration,
    /// A burst's incident clears after this long without a `job.dead`.
    pub quiet: Duration,
}

impl Default for IncidentConfig {
    fn default() -> IncidentConfig {
        IncidentConfig {
            dead_burst: 5,
            dead_window: Duration::from_secs(60),
            quiet: Duration::from_secs(300),
        }
    }
}

/// What the rules decide for one event.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Sighted {
        tenant: String,
        fingerprint: String,
        kind: &'static str,
        severity: &'static str,
        title: String,
    },
    Cleared {
        tenant: String,
        fingerprint: String,
    },
}

/// The detectors' memory between events: recent `job.dead` times per
/// (tenant, queue), bounded by the window.
#[derive(Default)]
pub struct Detectors {
    config: IncidentConfig,
    dead: HashMap<(String, String), VecDeque<Millis>>,
}

/// Keys of the dead-letter memory at most; past it the oldest go.
const DEAD_KEYS_MAX: usize = 10_000;

impl Detectors {
    pub fn new(config: IncidentConfig) -> Detectors {
        Detectors {
            config,
            dead: HashMap::new(),
        }
    }

    pub fn see(&mut self, event: &Event) -> Option<Verdict> {
        let tenant = event.tenant.clone();
        let text = |key: &str| event.data.get(key).and_then(|v| v.as_str()).unwrap_or("");
        match event.kind.as_str() {
            "node.lost" => Some(Verdict::Sighted {
                fingerprint: format!("node_lost:{}", event.resource.id),
                kind: "node_lost",
                severity: "high",
                title: format!("node {} lost", event.resource.id),
                tenant,
            }),
            "node.online" => Some(Verdict::Cleared {
                fingerprint: format!("node_lost:{}", event.resource.id),
                tenant,
            }),
            "run.failed" => Some(Verdict::Sighted {
                fingerprint: format!("run_failed:{}", text("pipeline")),
                kind: "run_failed",
                severity: "medium",
                title: format!("pipeline {} failed", text("pipeline")),
                tenant,
            }),
            "run.succeeded" => Some(Verdict::Cleared {
                fingerprint: format!("run_failed:{}", text("pipeline")),
                tenant,
            }),
            "job.dead" => {
                let queue = text("queue").to_string();
                let window = i64::try_from(self.config.dead_window.as_millis()).unwrap_or(i64::MAX);
                if self.dead.len() >= DEAD_KEYS_MAX {
                    self.dead
                        .retain(|_, times| times.back().is_some_and(|t| event.time - t < window));
                    if self.dead.len() >= DEAD_KEYS_MAX {
                        self.dead.clear();
                    }
                }
                let times = self
                    .dead
                    .entry((tenant.clone(), queue.clone()))
                    .or_default();
                times.push_back(event.time);
                while times.front().is_some_and(|t| event.time - t >= window) {
                    times.pop_front();
                }
                // Bounded by the burst size: only the count matters.
                while times.len() > self.config.dead_burst {
                    times.pop_front();
                }
                (times.len() >= self.config.dead_burst).then(|| Verdict::Sighted {
                    fingerprint: format!("dead_letter_burst:{queue}"),
                    kind: "dead_letter_burst",
                    severity: "high",
                    title: format!(
                        "{} or more jobs dead in queue {queue} within {} s",
                        self.config.dead_burst,
                        self.config.dead_window.as_secs()
                    ),
                    tenant,
                })
            }
            _ => None,
        }
    }
}

/// Opens, repeats and clears incidents from the log until `stop`.
pub async fn detect_loop(db: Db, config: IncidentConfig, stop: CancellationToken) {
    let mut failures = 0u32;
    let mut detectors = Detectors::new(config.clone());
    while !stop.is_cancelled() {
        match detect_from_cursor(&db, &config, &mut detectors, &stop).await {
            Ok(()) => return,
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "the incident detectors stopped; starting again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200 << failures.min(5))) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

async fn detect_from_cursor(
    db: &Db,
    config: &IncidentConfig,
    detectors: &mut Detectors,
    stop: &CancellationToken,
) -> Result<(), kiln_db::DbError> {
    let ready = db.events_ready();
    let mut cursor = db.event_cursor(CURSOR).await?;
    if cursor == 0 {
        cursor = db.event_last().await?;
        db.event_cursor_put(CURSOR, cursor, now_millis()).await?;
    }
    let quiet = i64::try_from(config.quiet.as_millis()).unwrap_or(i64::MAX);
    loop {
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let events = db
            .event_read(&EventQuery {
                after: cursor,
                limit: PAGE_MAX,
                ..Default::default()
            })
            .await?;
        let now = now_millis();
        for event in &events {
            match detectors.see(event) {
                Some(Verdict::Sighted {
                    tenant,
                    fingerprint,
                    kind,
                    severity,
                    title,
                }) => {
                    let entry = format!(
                        "{} {}:{}",
                        event.kind, event.resource.kind, event.resource.id
                    );
                    let sighting = Sighting {
                        tenant: &tenant,
                        fingerprint: &fingerprint,
                        kind,
                        severity,
                        title: &title,
                        event_id: Some(event.id),
                        entry: &entry,
                    };
                    db.incident_sighted(&sighting, now).await?;
                }
                Some(Verdict::Cleared {
                    tenant,
                    fingerprint,
                }) => {
                    let entry = format!(
                        "cleared by {} {}:{}",
                        event.kind, event.resource.kind, event.resource.id
                    );
                    db.incident_clear(&tenant, &fingerprint, Some(event.id), &entry, now)
                        .await?;
                }
                None => {}
            }
        }
        if let Some(last) = events.last().map(|e| e.id) {
            cursor = last;
            db.event_cursor_put(CURSOR, cursor, now).await?;
        }
        // Bursts clear by time, not by an event.
        for incident in db.incidents_quiet("dead_letter_burst", now - quiet).await? {
            let entry = format!("no dead job for {} s", config.quiet.as_secs());
            db.incident_clear(&incident.tenant, &incident.fingerprint, None, &entry, now)
                .await?;
        }
        if events.len() as i64 == PAGE_MAX {
            continue;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_db::events::Resource;
    use serde_json::json;

    fn event(kind: &str, time: Millis, resource: &str, data: serde_json::Value) -> Event {
        let (rk, id) = resource.split_once(':').unwrap();
        Event {
            id: time,
            time,
            tenant: "acme".into(),
            kind: kind.into(),
            resource: Resource {
                kind: rk.into(),
                id: id.into(),
            },
            labels: Default::default(),
            data,
        }
    }

    #[test]
    fn a_burst_is_that_many_dead_jobs_of_one_queue_within_the_window() {
        let mut d = Detectors::new(IncidentConfig {
            dead_burst: 3,
            dead_window: Duration::from_secs(10),
            quiet: Duration::from_secs(60),
        });
        let dead = |t: Millis, queue: &str| event("job.dead", t, "job:1", json!({"queue": queue}));
        assert_eq!(d.see(&dead(0, "q")), None);
        assert_eq!(d.see(&dead(1_000, "other")), None);
        assert_eq!(d.see(&dead(2_000, "q")), None);
        // The first fell out of the window: still two.
        assert_eq!(d.see(&dead(10_500, "q")), None);
        match d.see(&dead(11_000, "q")) {
            Some(Verdict::Sighted {
                fingerprint, kind, ..
            }) => {
                assert_eq!(
                    (fingerprint.as_str(), kind),
                    ("dead_letter_burst:q", "dead_letter_burst")
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nodes_and_runs_open_and_clear_by_their_own_events() {
        let mut d = Detectors::default();
        let lost = d.see(&event("node.lost", 1, "node:h-1", json!({})));
        assert!(
            matches!(lost, Some(Verdict::Sighted { ref fingerprint, .. }) if fingerprint == "node_lost:h-1")
        );
        let back = d.see(&event("node.online", 2, "node:h-1", json!({})));
        assert!(
            matches!(back, Some(Verdict::Cleared { ref fingerprint, .. }) if fingerprint == "node_lost:h-1")
        );
        let failed = d.see(&event(
            "run.failed",
            3,
            "run:7",
            json!({"pipeline": "build"}),
        ));
        assert!(
            matches!(failed, Some(Verdict::Sighted { ref fingerprint, .. }) if fingerprint == "run_failed:build")
        );
        let ok = d.see(&event(
            "run.succeeded",
            4,
            "run:8",
            json!({"pipeline": "build"}),
        ));
        assert!(
            matches!(ok, Some(Verdict::Cleared { ref fingerprint, .. }) if fingerprint == "run_failed:build")
        );
        assert_eq!(
            d.see(&event("incident.opened", 5, "incident:1", json!({}))),
            None
        );
        assert_eq!(d.see(&event("job.succeeded", 6, "job:1", json!({}))), None);
    }
}
