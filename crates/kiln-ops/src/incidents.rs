//! Incident detectors. They read the event log from their cursor
//! (`incidents` in `event_cursors`) and open, repeat and clear incidents;
//! what each looks for, its thresholds and their defaults are in
//! [`crate::detectors`]:
//!
//! | detector | opens on | fingerprint | clears when |
//! |---|---|---|---|
//! | node lost | `node.lost` | `node_lost:<node>` | `node.online` of that node |
//! | dead-letter burst | `count` `job.dead` of one queue within `window_s` | `dead_letter_burst:<queue>` | no `job.dead` of that queue for `quiet_s` |
//! | failure rate | ≥ `ratio` of ≥ `min_ends` ends of one queue and kind within `window_s` failed | `failure_rate:<queue>:<kind>` | the ratio falls below, or no sighting for `window_s` |
//! | backlog age | the oldest ready job of a queue waits over `max_age_s` (a periodic look, not an event) | `backlog_age:<queue>` | it no longer does |
//! | VM boot failures | `count` failed boots within `window_s` (`vm:create` or `vm` attempts ending with a boot error) | `vm_boot_failures` | no failed boot for `quiet_s` |
//! | pipeline run failed | `run.failed` | `run_failed:<pipeline>` | a `run.succeeded` of that pipeline |
//!
//! A detector that is not `enabled` for a tenant sees nothing of it; one
//! whose `auto_resolve` is off never clears (its incidents wait for a
//! person). The rules that decide (`Detectors::see`, `Detectors::backlog`,
//! `Detectors::quiet`) are pure: events or figures in, what to do out; the
//! loop applies them to the store. The memory they keep is bounded: per
//! key (tenant and queue, or tenant, queue and kind) at most a count's
//! worth of times or 30 time buckets, and at most [`KEYS_MAX`] keys per
//! detector. An incident's opening and every change of its state are
//! events themselves (migration 0012's triggers), which the detectors
//! ignore.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use kiln_core::Millis;
use kiln_db::events::{Event, EventQuery, PAGE_MAX};
use kiln_db::incidents::{Incident, Sighting};
use kiln_db::Db;
use kiln_worker::now_millis;
use tokio_util::sync::CancellationToken;

use crate::detectors::DetectorSettings;

pub const CURSOR: &str = "incidents";

/// Keys of one detector's memory at most; past it the stale go, then all.
pub const KEYS_MAX: usize = 10_000;
/// Buckets of a failure-rate window.
const RATE_BUCKETS: i64 = 30;
/// How often the backlog is looked at.
const BACKLOG_EVERY: Duration = Duration::from_secs(10);
/// How often tenants' settings are read again.
const SETTINGS_EVERY: Duration = Duration::from_secs(5);

/// What the rules decide.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Sighted {
        tenant: String,
        fingerprint: String,
        kind: &'static str,
        severity: String,
        title: String,
    },
    Cleared {
        tenant: String,
        fingerprint: String,
        why: String,
    },
}

/// Errors of the attempts of `vm` jobs that mean the VM never booted (the
/// messages of `kiln_vm::VmError`'s boot variants).
const BOOT_ERRORS: [&str; 4] = [
    "qemu exited during the boot",
    "no answer from the guest agent within",
    "accelerator ",
    "starting ",
];

/// Whether a job's attempt that ended with `error` was a VM that failed to
/// boot: any failure of a `vm:create` job but a refused spec, a kill, a
/// host without room or a lost worker, or a `vm` job's failure with one of
/// the boot errors.
pub fn is_boot_failure(kind: &str, error: &str) -> bool {
    let boot_error = BOOT_ERRORS.iter().any(|e| error.starts_with(e));
    match kind {
        "vm:create" => {
            !error.is_empty()
                && !error.starts_with("invalid")
                && !error.starts_with("killed")
                && !error.starts_with("no capacity")
                && !error.starts_with("lease expired")
        }
        "vm" => boot_error,
        _ => false,
    }
}

/// Times of recent sightings per key, bounded by a count and a window.
#[derive(Default)]
struct CountWindows {
    keys: HashMap<(String, String), VecDeque<Millis>>,
}

impl CountWindows {
    /// Adds a sighting at `time`; whether `count` fell within `window`.
    fn add(&mut self, key: (String, String), time: Millis, count: u32, window: Millis) -> bool {
        if self.keys.len() >= KEYS_MAX && !self.keys.contains_key(&key) {
            self.keys
                .retain(|_, times| times.back().is_some_and(|t| time - t < window));
            if self.keys.len() >= KEYS_MAX {
                self.keys.clear();
            }
        }
        let times = self.keys.entry(key).or_default();
        times.push_back(time);
        while times.front().is_some_and(|t| time - t >= window) {
            times.pop_front();
        }
        // Bounded by the count: only whether it is reached matters.
        while times.len() > count as usize {
            times.pop_front();
        }
        times.len() >= count as usize
    }
}

/// Job ends per time bucket: (bucket start, ends, failures).
type Buckets = VecDeque<(Millis, u32, u32)>;

/// The detectors' memory between events.
#[derive(Default)]
pub struct Detectors {
    defaults: DetectorSettings,
    tenants: HashMap<String, DetectorSettings>,
    dead: CountWindows,
    boots: CountWindows,
    rates: HashMap<(String, String, String), Buckets>,
}

fn ms(seconds: u64) -> Millis {
    i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX)
}

impl Detectors {
    pub fn new(defaults: DetectorSettings) -> Detectors {
        Detectors {
            defaults,
            ..Default::default()
        }
    }

    /// Sets the tenants' settings (those with overrides; the others use the
    /// defaults). Overrides that no longer pass are left out.
    pub fn set_overrides(&mut self, overrides: &[(String, serde_json::Value)]) {
        self.tenants = overrides
            .iter()
            .filter_map(|(tenant, o)| Some((tenant.clone(), self.defaults.with_overrides(o).ok()?)))
            .collect();
    }

    pub fn settings(&self, tenant: &str) -> &DetectorSettings {
        self.tenants.get(tenant).unwrap_or(&self.defaults)
    }

    pub fn see(&mut self, event: &Event) -> Vec<Verdict> {
        let settings = self.settings(&event.tenant).clone();
        let tenant = event.tenant.clone();
        let text = |key: &str| event.data.get(key).and_then(|v| v.as_str()).unwrap_or("");
        let mut out = Vec::new();
        let sighted = |fingerprint: String, kind: &'static str, severity: &str, title: String| {
            Verdict::Sighted {
                tenant: tenant.clone(),
                fingerprint,
                kind,
                severity: severity.to_string(),
                title,
            }
        };
        let cleared = |fingerprint: String, why: String| Verdict::Cleared {
            tenant: tenant.clone(),
            fingerprint,
            why,
        };
        let what = format!(
            "{} {}:{}",
            event.kind, event.resource.kind, event.resource.id
        );
        match event.kind.as_str() {
            "node.lost" if settings.node_lost.enabled => out.push(sighted(
                format!("node_lost:{}", event.resource.id),
                "node_lost",
                &settings.node_lost.severity,
                format!("node {} lost", event.resource.id),
            )),
            "node.online" if settings.node_lost.enabled && settings.node_lost.auto_resolve => out
                .push(cleared(
                    format!("node_lost:{}", event.resource.id),
                    format!("cleared by {what}"),
                )),
            "run.failed" if settings.run_failed.enabled => out.push(sighted(
                format!("run_failed:{}", text("pipeline")),
                "run_failed",
                &settings.run_failed.severity,
                format!("pipeline {} failed", text("pipeline")),
            )),
            "run.succeeded" if settings.run_failed.enabled && settings.run_failed.auto_resolve => {
                out.push(cleared(
                    format!("run_failed:{}", text("pipeline")),
                    format!("cleared by {what}"),
                ))
            }
            _ => {}
        }
        let queue = text("queue").to_string();
        let kind = text("kind").to_string();
        let d = &settings.dead_letter_burst;
        if event.kind == "job.dead"
            && d.enabled
            && self.dead.add(
                (tenant.clone(), queue.clone()),
                event.time,
                d.count,
                ms(d.window_s),
            )
        {
            out.push(sighted(
                format!("dead_letter_burst:{queue}"),
                "dead_letter_burst",
                &d.severity,
                format!(
                    "{} or more jobs dead in queue {queue} within {} s",
                    d.count, d.window_s
                ),
            ));
        }
        let v = &settings.vm_boot_failures;
        let ended_attempt = matches!(
            event.kind.as_str(),
            "job.failed" | "job.dead" | "job.retried"
        );
        if ended_attempt
            && v.enabled
            && is_boot_failure(&kind, text("error"))
            && self.boots.add(
                (tenant.clone(), String::new()),
                event.time,
                v.count,
                ms(v.window_s),
            )
        {
            out.push(sighted(
                "vm_boot_failures".into(),
                "vm_boot_failures",
                &v.severity,
                format!(
                    "{} or more VM boots failed within {} s",
                    v.count, v.window_s
                ),
            ));
        }
        let f = &settings.failure_rate;
        let end = match event.kind.as_str() {
            "job.succeeded" => Some(false),
            "job.failed" | "job.dead" => Some(true),
            _ => None,
        };
        if let (Some(failed), true) = (end, f.enabled) {
            let (ends, fails) = self.rate_add(
                (tenant.clone(), queue.clone(), kind.clone()),
                event.time,
                failed,
                ms(f.window_s),
            );
            if ends >= f.min_ends {
                let fingerprint = format!("failure_rate:{queue}:{kind}");
                if f64::from(fails) >= f.ratio * f64::from(ends) {
                    out.push(sighted(
                        fingerprint,
                        "failure_rate",
                        &f.severity,
                        format!(
                            "{fails} of the last {ends} {kind} jobs of queue {queue} failed within {} s",
                            f.window_s
                        ),
                    ));
                } else if f.auto_resolve {
                    out.push(cleared(
                        fingerprint,
                        format!("{fails} of {ends} failed: under the threshold"),
                    ));
                }
            }
        }
        out
    }

    /// Adds a job end to its key's window; the window's (ends, failures).
    fn rate_add(
        &mut self,
        key: (String, String, String),
        time: Millis,
        failed: bool,
        window: Millis,
    ) -> (u32, u32) {
        let bucket_ms = (window / RATE_BUCKETS).max(1);
        if self.rates.len() >= KEYS_MAX && !self.rates.contains_key(&key) {
            self.rates
                .retain(|_, b| b.back().is_some_and(|(t, _, _)| time - t < window));
            if self.rates.len() >= KEYS_MAX {
                self.rates.clear();
            }
        }
        let buckets = self.rates.entry(key).or_default();
        let start = time - time.rem_euclid(bucket_ms);
        match buckets.back_mut() {
            Some((t, ends, fails)) if *t == start => {
                *ends = ends.saturating_add(1);
                *fails = fails.saturating_add(u32::from(failed));
            }
            _ => buckets.push_back((start, 1, u32::from(failed))),
        }
        while buckets.front().is_some_and(|(t, _, _)| time - t >= window)
            || buckets.len() as i64 > RATE_BUCKETS + 1
        {
            buckets.pop_front();
        }
        buckets
            .iter()
            .fold((0, 0), |(e, f), (_, ends, fails)| (e + ends, f + fails))
    }

    /// The backlog's verdicts: each queue whose oldest ready job became
    /// ready at `since` is sighted when it waited too long; each open
    /// backlog incident whose queue is no longer among them clears.
    pub fn backlog(
        &self,
        oldest: &[(String, String, Millis)],
        open: &[Incident],
        now: Millis,
    ) -> Vec<Verdict> {
        let mut out = Vec::new();
        let mut late = std::collections::HashSet::new();
        for (tenant, queue, since) in oldest {
            let b = &self.settings(tenant).backlog_age;
            if !b.enabled || now - since <= ms(b.max_age_s) {
                continue;
            }
            late.insert((tenant.as_str(), queue.as_str()));
            out.push(Verdict::Sighted {
                tenant: tenant.clone(),
                fingerprint: format!("backlog_age:{queue}"),
                kind: "backlog_age",
                severity: b.severity.clone(),
                title: format!(
                    "the oldest ready job of queue {queue} has waited over {} s",
                    b.max_age_s
                ),
            });
        }
        for incident in open.iter().filter(|i| i.kind == "backlog_age") {
            let queue = incident
                .fingerprint
                .strip_prefix("backlog_age:")
                .unwrap_or("");
            let b = &self.settings(&incident.tenant).backlog_age;
            if b.auto_resolve && !late.contains(&(incident.tenant.as_str(), queue)) {
                out.push(Verdict::Cleared {
                    tenant: incident.tenant.clone(),
                    fingerprint: incident.fingerprint.clone(),
                    why: format!("no job of queue {queue} waits over {} s", b.max_age_s),
                });
            }
        }
        out
    }

    /// Incidents that clear by time: bursts and boot failures quiet for
    /// their `quiet_s`, failure rates not sighted for their `window_s`.
    pub fn quiet(&self, open: &[Incident], now: Millis) -> Vec<Verdict> {
        open.iter()
            .filter_map(|incident| {
                let s = self.settings(&incident.tenant);
                let (auto, after) = match incident.kind.as_str() {
                    "dead_letter_burst" => (
                        s.dead_letter_burst.auto_resolve,
                        s.dead_letter_burst.quiet_s,
                    ),
                    "vm_boot_failures" => {
                        (s.vm_boot_failures.auto_resolve, s.vm_boot_failures.quiet_s)
                    }
                    "failure_rate" => (s.failure_rate.auto_resolve, s.failure_rate.window_s),
                    _ => return None,
                };
                (auto && now - incident.updated_at >= ms(after)).then(|| Verdict::Cleared {
                    tenant: incident.tenant.clone(),
                    fingerprint: incident.fingerprint.clone(),
                    why: format!("not seen for {after} s"),
                })
            })
            .collect()
    }
}

/// Opens, repeats and clears incidents from the log until `stop`, with
/// `defaults` for tenants that set nothing of their own.
pub async fn detect_loop(db: Db, defaults: DetectorSettings, stop: CancellationToken) {
    let mut failures = 0u32;
    let mut detectors = Detectors::new(defaults);
    while !stop.is_cancelled() {
        match detect_from_cursor(&db, &mut detectors, &stop).await {
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

async fn apply(
    db: &Db,
    verdict: Verdict,
    event: Option<&Event>,
    now: Millis,
) -> Result<(), kiln_db::DbError> {
    match verdict {
        Verdict::Sighted {
            tenant,
            fingerprint,
            kind,
            severity,
            title,
        } => {
            let entry = match event {
                Some(e) => format!("{} {}:{}", e.kind, e.resource.kind, e.resource.id),
                None => title.clone(),
            };
            let sighting = Sighting {
                tenant: &tenant,
                fingerprint: &fingerprint,
                kind,
                severity: &severity,
                title: &title,
                event_id: event.map(|e| e.id),
                entry: &entry,
            };
            db.incident_sighted(&sighting, now).await?;
        }
        Verdict::Cleared {
            tenant,
            fingerprint,
            why,
        } => {
            db.incident_clear(&tenant, &fingerprint, event.map(|e| e.id), &why, now)
                .await?;
        }
    }
    Ok(())
}

async fn detect_from_cursor(
    db: &Db,
    detectors: &mut Detectors,
    stop: &CancellationToken,
) -> Result<(), kiln_db::DbError> {
    let ready = db.events_ready();
    let mut cursor = db.event_cursor(CURSOR).await?;
    if cursor == 0 {
        cursor = db.event_last().await?;
        db.event_cursor_put(CURSOR, cursor, now_millis()).await?;
    }
    let mut settings_read: Option<std::time::Instant> = None;
    let mut backlog_read: Option<std::time::Instant> = None;
    loop {
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if settings_read.is_none_or(|t| t.elapsed() >= SETTINGS_EVERY) {
            detectors.set_overrides(&db.detector_settings_all().await?);
            settings_read = Some(std::time::Instant::now());
        }
        let events = db
            .event_read(&EventQuery {
                after: cursor,
                limit: PAGE_MAX,
                ..Default::default()
            })
            .await?;
        let now = now_millis();
        for event in &events {
            for verdict in detectors.see(event) {
                apply(db, verdict, Some(event), now).await?;
            }
        }
        if let Some(last) = events.last().map(|e| e.id) {
            cursor = last;
            db.event_cursor_put(CURSOR, cursor, now).await?;
        }
        // Some incidents clear by time, not by an event.
        let mut open = Vec::new();
        for kind in ["dead_letter_burst", "vm_boot_failures", "failure_rate"] {
            open.extend(db.incidents_quiet(kind, now).await?);
        }
        for verdict in detectors.quiet(&open, now) {
            apply(db, verdict, None, now).await?;
        }
        // The backlog is a figure to look at, not an event.
        if backlog_read.is_none_or(|t| t.elapsed() >= BACKLOG_EVERY) {
            backlog_read = Some(std::time::Instant::now());
            let shortest = detectors
                .tenants
                .values()
                .chain(std::iter::once(&detectors.defaults))
                .map(|s| ms(s.backlog_age.max_age_s))
                .min()
                .unwrap_or(0);
            let oldest = db.job_oldest_waiting(now - shortest, 1000).await?;
            let open = db.incidents_quiet("backlog_age", now + 1).await?;
            for verdict in detectors.backlog(&oldest, &open, now) {
                apply(db, verdict, None, now).await?;
            }
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

    /// What the detectors say of each event in turn: `+fingerprint` for a
    /// sighting, `-fingerprint` for a clear.
    fn check(settings: serde_json::Value, events: &[Event], expect: &[&[&str]]) {
        let mut d = Detectors::new(
            DetectorSettings::default()
                .with_overrides(&settings)
                .unwrap(),
        );
        let got: Vec<Vec<String>> = events
            .iter()
            .map(|e| {
                d.see(e)
                    .into_iter()
                    .map(|v| match v {
                        Verdict::Sighted { fingerprint, .. } => format!("+{fingerprint}"),
                        Verdict::Cleared { fingerprint, .. } => format!("-{fingerprint}"),
                    })
                    .collect()
            })
            .collect();
        let expect: Vec<Vec<String>> = expect
            .iter()
            .map(|v| v.iter().map(|s| s.to_string()).collect())
            .collect();
        assert_eq!(got, expect);
    }

    fn dead(t: Millis, queue: &str) -> Event {
        event(
            "job.dead",
            t,
            "job:1",
            json!({"queue": queue, "kind": "noop", "error": "exit code 3"}),
        )
    }

    fn ok(t: Millis, queue: &str) -> Event {
        event(
            "job.succeeded",
            t,
            "job:1",
            json!({"queue": queue, "kind": "noop"}),
        )
    }

    #[test]
    fn a_burst_is_that_many_dead_jobs_of_one_queue_within_the_window() {
        let settings = json!({"dead_letter_burst": {"count": 3, "window_s": 10}, "failure_rate": {"enabled": false}});
        check(
            settings.clone(),
            &[
                dead(0, "q"),
                dead(1_000, "other"),
                dead(2_000, "q"),
                dead(10_500, "q"),
                dead(11_000, "q"),
            ],
            // The first fell out of the window before the fourth.
            &[&[], &[], &[], &[], &["+dead_letter_burst:q"]],
        );
        let off = json!({"dead_letter_burst": {"count": 1, "enabled": false}, "failure_rate": {"enabled": false}});
        check(off, &[dead(0, "q")], &[&[]]);
    }

    #[test]
    fn nodes_and_runs_open_and_clear_by_their_own_events_unless_told_not_to() {
        let events = [
            event("node.lost", 1, "node:h-1", json!({})),
            event("node.online", 2, "node:h-1", json!({})),
            event("run.failed", 3, "run:7", json!({"pipeline": "build"})),
            event("run.succeeded", 4, "run:8", json!({"pipeline": "build"})),
            event("incident.opened", 5, "incident:1", json!({})),
            event("key.created", 6, "key:1", json!({})),
        ];
        check(
            json!({}),
            &events,
            &[
                &["+node_lost:h-1"],
                &["-node_lost:h-1"],
                &["+run_failed:build"],
                &["-run_failed:build"],
                &[],
                &[],
            ],
        );
        check(
            json!({"node_lost": {"auto_resolve": false}, "run_failed": {"enabled": false}}),
            &events,
            &[&["+node_lost:h-1"], &[], &[], &[], &[], &[]],
        );
    }

    #[test]
    fn a_failure_rate_needs_enough_ends_and_clears_below_the_ratio() {
        let settings = json!({"failure_rate": {"ratio": 0.5, "min_ends": 4, "window_s": 60}});
        check(
            settings,
            &[
                dead(0, "q"),
                ok(1, "q"),
                dead(2, "q"),
                ok(3, "q"),
                ok(4, "q"),
                dead(5, "other"),
                ok(120_000, "q"),
            ],
            &[
                &[],
                &[],
                &[],
                // 2 of 4 failed.
                &["+failure_rate:q:noop"],
                // 2 of 5.
                &["-failure_rate:q:noop"],
                &[],
                // The window moved on: one end is not enough to say.
                &[],
            ],
        );
    }

    #[test]
    fn boot_failures_are_vm_attempts_that_never_booted() {
        for (kind, error, boot) in [
            (
                "vm:create",
                "qemu exited during the boot (exit status: 1): …",
                true,
            ),
            (
                "vm:create",
                "no answer from the guest agent within 30s",
                true,
            ),
            ("vm:create", "invalid spec: image", false),
            ("vm:create", "killed while booting", false),
            ("vm:create", "lease expired: worker lost", false),
            ("vm:create", "", false),
            ("vm", "no answer from the guest agent within 30s", true),
            ("vm", "exit code 1", false),
            ("wasm", "qemu exited during the boot", false),
        ] {
            assert_eq!(is_boot_failure(kind, error), boot, "{kind} {error}");
        }
        let boot = |t, status: &str| {
            event(
                status,
                t,
                "job:1",
                json!({"kind": "vm:create", "queue": "q", "error": "qemu exited during the boot (1): x"}),
            )
        };
        check(
            json!({"vm_boot_failures": {"count": 2, "window_s": 60}, "failure_rate": {"enabled": false}}),
            &[boot(0, "job.retried"), boot(1, "job.dead")],
            &[&[], &["+vm_boot_failures"]],
        );
    }

    fn incident(kind: &str, fingerprint: &str, updated_at: Millis) -> Incident {
        Incident {
            id: 1,
            tenant: "acme".into(),
            fingerprint: fingerprint.into(),
            kind: kind.into(),
            severity: "high".into(),
            title: String::new(),
            status: "open".into(),
            occurrences: 1,
            opened_at: 0,
            updated_at,
            resolved_at: None,
            resolved_by: None,
            notes: None,
        }
    }

    #[test]
    fn backlogs_open_past_their_age_and_clear_when_the_queue_moves() {
        let d = Detectors::new(
            DetectorSettings::default()
                .with_overrides(&json!({"backlog_age": {"max_age_s": 60}}))
                .unwrap(),
        );
        let oldest = [
            ("acme".to_string(), "slow".to_string(), 0),
            ("acme".to_string(), "fresh".to_string(), 50_000),
        ];
        let open = [
            incident("backlog_age", "backlog_age:gone", 0),
            incident("backlog_age", "backlog_age:slow", 0),
        ];
        let got: Vec<String> = d
            .backlog(&oldest, &open, 100_000)
            .into_iter()
            .map(|v| match v {
                Verdict::Sighted { fingerprint, .. } => format!("+{fingerprint}"),
                Verdict::Cleared { fingerprint, .. } => format!("-{fingerprint}"),
            })
            .collect();
        assert_eq!(got, ["+backlog_age:slow", "-backlog_age:gone"]);
    }

    #[test]
    fn quiet_incidents_clear_after_their_own_period() {
        let d = Detectors::new(
            DetectorSettings::default()
                .with_overrides(&json!({"dead_letter_burst": {"quiet_s": 1}, "vm_boot_failures": {"auto_resolve": false}}))
                .unwrap(),
        );
        let open = [
            incident("dead_letter_burst", "dead_letter_burst:q", 0),
            incident("dead_letter_burst", "dead_letter_burst:r", 900),
            incident("vm_boot_failures", "vm_boot_failures", 0),
            incident("node_lost", "node_lost:h", 0),
        ];
        let cleared: Vec<String> = d
            .quiet(&open, 1_500)
            .into_iter()
            .map(|v| match v {
                Verdict::Cleared { fingerprint, .. } => fingerprint,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(cleared, ["dead_letter_burst:q"]);
    }

    #[test]
    fn memory_stays_bounded_by_the_keys() {
        let mut d = Detectors::new(DetectorSettings::default());
        for i in 0..(KEYS_MAX as i64 + 50) {
            d.see(&dead(i, &format!("q{i}")));
        }
        assert!(d.dead.keys.len() <= KEYS_MAX);
        assert!(d.rates.len() <= KEYS_MAX);
    }
}
