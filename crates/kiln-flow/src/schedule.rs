//! Cron schedules: when a schedule fires, what a late scheduler catches up
//! on, and what happens when a fire overlaps the previous one. Pure: `now`
//! is always a parameter.
//!
//! # Expressions
//!
//! Parsed by croner: 5 fields (`minute hour day-of-month month day-of-week`,
//! minute granularity) or 6 fields (a leading seconds field), plus the
//! nicknames `@yearly @annually @monthly @weekly @daily @midnight @hourly`.
//! When both day-of-month and day-of-week are restricted, a day matches if
//! either does (Vixie cron). Fields are matched against the wall clock of the
//! schedule's IANA time zone.
//!
//! # Daylight saving time
//!
//! A pattern is *fixed-time* when its second, minute and hour fields are each
//! a single value (`30 2 * * *`); otherwise it is an *interval* pattern
//! (`0 * * * *`, `*/15 * * * *`, `0 2,14 * * *`). This is croner's
//! classification, and the rules follow Vixie cron:
//!
//! * Spring forward (a wall-clock time that does not exist): a fixed-time
//!   pattern fires once, at the first instant after the gap (`30 2 * * *` in
//!   Europe/Berlin on 2026-03-29 fires at 03:00 CEST). Interval ticks inside
//!   the gap are skipped, so an hourly pattern fires 23 times that day.
//! * Fall back (a wall-clock time that happens twice): a fixed-time pattern
//!   fires once, on the first pass (`30 2 * * *` on 2026-10-25 fires at
//!   02:30 CEST only). Interval patterns fire on both passes, so an hourly
//!   pattern fires 25 times that day, every real hour.
//!
//! Ticks are always returned in real-time order, strictly increasing.
//!
//! croner's own search resolves a repeated wall-clock time to its first
//! instant, which can land before the instant searched from, and its
//! iterator yields out of order inside a repeated hour. So croner is used
//! here only as a wall-clock matcher (searching in UTC, where no time is
//! missing or repeated), and the mapping from wall clock to instants is done
//! below with chrono-tz.

use std::str::FromStr;

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc,
};
use chrono_tz::{GapInfo, Tz};
use croner::parser::{CronParser, Seconds, Year};
use croner::{Cron, JobType};
use kiln_core::Millis;
use serde::{Deserialize, Serialize};

/// Longest accepted expression or time zone name, in bytes.
pub const MAX_INPUT_LEN: usize = 256;
/// Upper bound on `max_catch_up` in [`due`]: bounds the work of one call.
pub const MAX_CATCH_UP: usize = 1000;
/// [`Due::skipped`] is exact up to this many ticks and saturates there, so a
/// per-second schedule that was down for a year costs no more than this.
pub const SKIPPED_COUNT_CAP: usize = 1000;

/// Wall-clock matches examined per search before giving up. A search
/// passes over a match only inside a repeated hour (a fixed-time pattern's
/// second pass) or a skipped one (one jump per gap), so this is generous.
const MAX_SEARCH_STEPS: usize = 64;

const FIELD_NAMES_5: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];
const FIELD_NAMES_6: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day-of-month",
    "month",
    "day-of-week",
];

/// Why an expression or time zone was rejected; the message suits a 422.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("cron: expression is empty")]
    Empty,
    #[error("cron: expression is {len} bytes, the limit is {max}")]
    ExpressionTooLong { len: usize, max: usize },
    #[error("cron: expected 5 or 6 fields, got {0}")]
    FieldCount(usize),
    #[error("cron: unknown nickname {0:?}")]
    UnknownNickname(String),
    #[error("cron: invalid {field} field {value:?}")]
    InvalidField { field: &'static str, value: String },
    #[error("cron: invalid expression {expression:?}: {reason}")]
    Invalid { expression: String, reason: String },
    #[error("cron: expression {0:?} never matches any date and time")]
    NeverFires(String),
    #[error("time zone name is {len} bytes, the limit is {max}")]
    TimeZoneTooLong { len: usize, max: usize },
    #[error("unknown time zone {0:?}")]
    UnknownTimeZone(String),
}

/// What to do about ticks missed while the scheduler was down or late.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Fire only ticks that are on time (within the grace period).
    #[default]
    None,
    /// Fire the newest due tick, skip the older ones.
    Latest,
    /// Fire every due tick, up to `max_catch_up` newest ones.
    All,
}

/// What to do when a tick comes while the previous fire is still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    #[default]
    Skip,
    Queue,
    Allow,
}

/// A parsed cron expression bound to its time zone.
#[derive(Clone, Debug)]
pub struct CronSpec {
    expression: String,
    timezone: String,
    cron: Cron,
    tz: Tz,
    fixed_time: bool,
}

impl CronSpec {
    /// Parses `expression` (5 or 6 fields, or a nickname) in the IANA zone
    /// `timezone`. Rejects patterns that can never match a date.
    pub fn parse(expression: &str, timezone: &str) -> Result<CronSpec, ScheduleError> {
        if expression.len() > MAX_INPUT_LEN {
            return Err(ScheduleError::ExpressionTooLong {
                len: expression.len(),
                max: MAX_INPUT_LEN,
            });
        }
        if timezone.len() > MAX_INPUT_LEN {
            return Err(ScheduleError::TimeZoneTooLong {
                len: timezone.len(),
                max: MAX_INPUT_LEN,
            });
        }
        let expression = expression.trim();
        if expression.is_empty() {
            return Err(ScheduleError::Empty);
        }
        let tz =
            Tz::from_str(timezone).map_err(|_| ScheduleError::UnknownTimeZone(timezone.into()))?;

        // Nicknames are expanded here rather than by croner, which lacks @midnight.
        let expanded = if expression.starts_with('@') {
            nickname(expression).ok_or_else(|| ScheduleError::UnknownNickname(expression.into()))?
        } else {
            expression
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if !(5..=6).contains(&fields.len()) {
            return Err(ScheduleError::FieldCount(fields.len()));
        }
        let parser = parser();
        let cron = parser
            .parse(&fields.join(" "))
            .map_err(|e| diagnose(&parser, expression, &fields, &e))?;
        if !can_match(&cron) {
            return Err(ScheduleError::NeverFires(expression.into()));
        }
        let fixed_time = cron.determine_job_type() == JobType::FixedTime;
        Ok(CronSpec {
            expression: expression.to_string(),
            timezone: timezone.to_string(),
            cron,
            tz,
            fixed_time,
        })
    }

    /// The expression as given, without surrounding whitespace.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The IANA time zone name as given.
    pub fn timezone(&self) -> &str {
        &self.timezone
    }

    /// The first tick strictly after `after`, or None if the pattern never
    /// fires again (including a pattern whose only matches fall in skipped
    /// wall-clock hours).
    pub fn next_after(&self, after: Millis) -> Option<Millis> {
        // Ticks are whole seconds, so "after the second containing `after`" is exact.
        self.next_after_secs(after.div_euclid(1000))
            .and_then(|s| s.checked_mul(1000))
    }

    /// The newest tick at or before `at`, or None if there is none.
    pub fn prev_at_or_before(&self, at: Millis) -> Option<Millis> {
        self.prev_at_or_before_secs(at.div_euclid(1000))
            .and_then(|s| s.checked_mul(1000))
    }

    /// Up to `max` ticks in (from, to], in order.
    pub fn ticks_between(&self, from: Millis, to: Millis, max: usize) -> Vec<Millis> {
        let mut out = Vec::new();
        let mut cursor = from;
        while out.len() < max {
            match self.next_after(cursor) {
                Some(t) if t <= to => {
                    out.push(t);
                    cursor = t;
                }
                _ => break,
            }
        }
        out
    }

    fn next_after_secs(&self, after: i64) -> Option<i64> {
        let start = self.tz.from_utc_datetime(&utc_naive(after)?);
        let start_wall = start.naive_local();
        let mut best = None;

        // On the first pass of a repeated hour, the second pass of wall-clock
        // times already passed is still ahead: the earliest such tick is a candidate.
        if !self.fixed_time {
            if let LocalResult::Ambiguous(a, b) = self.tz.from_local_datetime(&start_wall) {
                let (first, second) = order(a.timestamp(), b.timestamp());
                if first == after {
                    best = self.first_second_pass_tick(first, second);
                }
            }
        }

        let mut wall = start_wall;
        for _ in 0..MAX_SEARCH_STEPS {
            wall = self.wall_next(wall, false)?;
            match self.tz.from_local_datetime(&wall) {
                LocalResult::None if !self.fixed_time => {
                    // Interval ticks in a gap are skipped: resume at its end.
                    let end = GapInfo::new(&wall, &self.tz)?.end?;
                    wall = end.naive_local().checked_sub_signed(Duration::seconds(1))?;
                    continue;
                }
                _ => {}
            }
            let found = self
                .instants(wall)
                .into_iter()
                .flatten()
                .filter(|&t| t > after)
                .min();
            if let Some(t) = found {
                return Some(best.map_or(t, |b: i64| b.min(t)));
            }
        }
        best
    }

    fn prev_at_or_before_secs(&self, at: i64) -> Option<i64> {
        let start = self.tz.from_utc_datetime(&utc_naive(at)?);
        let start_wall = start.naive_local();
        let mut best = None;

        // On the second pass of a repeated hour, first-pass ticks of wall-clock
        // times still ahead are already behind: the newest such tick is a candidate.
        if let LocalResult::Ambiguous(a, b) = self.tz.from_local_datetime(&start_wall) {
            let (first, second) = order(a.timestamp(), b.timestamp());
            if second == at {
                best = self.last_first_pass_tick(first, second);
            }
        }

        let mut wall = start_wall;
        let mut inclusive = true;
        for _ in 0..MAX_SEARCH_STEPS {
            wall = self.wall_prev(wall, inclusive)?;
            inclusive = false;
            match self.tz.from_local_datetime(&wall) {
                LocalResult::None if !self.fixed_time => {
                    let (begin, _) = GapInfo::new(&wall, &self.tz)?.begin?;
                    wall = begin;
                    continue;
                }
                _ => {}
            }
            let found = self
                .instants(wall)
                .into_iter()
                .flatten()
                .filter(|&t| t <= at)
                .max();
            if let Some(t) = found {
                return Some(best.map_or(t, |b: i64| b.max(t)));
            }
        }
        best
    }

    /// The tick instants of a matching wall-clock time, per the DST rules
    /// in the module docs.
    fn instants(&self, wall: NaiveDateTime) -> [Option<i64>; 2] {
        match self.tz.from_local_datetime(&wall) {
            LocalResult::Single(t) => [Some(t.timestamp()), None],
            LocalResult::Ambiguous(a, b) => {
                let (first, second) = order(a.timestamp(), b.timestamp());
                if self.fixed_time {
                    [Some(first), None]
                } else {
                    [Some(first), Some(second)]
                }
            }
            LocalResult::None if self.fixed_time => [
                GapInfo::new(&wall, &self.tz)
                    .and_then(|g| g.end)
                    .map(|t| t.timestamp()),
                None,
            ],
            LocalResult::None => [None, None],
        }
    }

    /// Inside a repeated hour whose wall-clock time `wall` occurs at instants
    /// `first` and `second`: the earliest interval tick on the second pass.
    fn first_second_pass_tick(&self, first: i64, second: i64) -> Option<i64> {
        let change = self.offset_change(first, second)?;
        let second_pass_start = self.tz.from_utc_datetime(&utc_naive(change)?).naive_local();
        let wall = self.wall_next(second_pass_start, true)?;
        match self.tz.from_local_datetime(&wall) {
            LocalResult::Ambiguous(a, b) => Some(a.timestamp().max(b.timestamp())),
            _ => None,
        }
    }

    /// Inside a repeated hour whose wall-clock time `wall` occurs at instants
    /// `first` and `second`: the newest tick on the first pass.
    fn last_first_pass_tick(&self, first: i64, second: i64) -> Option<i64> {
        let change = self.offset_change(first, second)?;
        // The first pass ends just before the change.
        let first_pass_end = self
            .tz
            .from_utc_datetime(&utc_naive(change.checked_sub(1)?)?)
            .naive_local();
        let wall = self.wall_prev(first_pass_end, true)?;
        match self.tz.from_local_datetime(&wall) {
            LocalResult::Ambiguous(a, b) => Some(a.timestamp().min(b.timestamp())),
            _ => None,
        }
    }

    /// The first instant in (lo, hi] with the offset `hi` has, given that
    /// `lo` has a different one and a single change lies between them (both
    /// are one wall-clock time in a repeated hour, a few hours apart at most).
    fn offset_change(&self, mut lo: i64, mut hi: i64) -> Option<i64> {
        let target = self.offset_at(hi)?;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.offset_at(mid)? == target {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }

    fn offset_at(&self, secs: i64) -> Option<i32> {
        let utc = utc_naive(secs)?;
        Some(
            self.tz
                .offset_from_utc_datetime(&utc)
                .fix()
                .local_minus_utc(),
        )
    }

    /// The next matching wall-clock time, searched in UTC where every
    /// wall-clock time exists exactly once.
    fn wall_next(&self, wall: NaiveDateTime, inclusive: bool) -> Option<NaiveDateTime> {
        self.cron
            .find_next_occurrence(&Utc.from_utc_datetime(&wall), inclusive)
            .ok()
            .map(|t| t.naive_utc())
    }

    fn wall_prev(&self, wall: NaiveDateTime, inclusive: bool) -> Option<NaiveDateTime> {
        self.cron
            .find_previous_occurrence(&Utc.from_utc_datetime(&wall), inclusive)
            .ok()
            .map(|t| t.naive_utc())
    }
}

fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

fn nickname(expression: &str) -> Option<&'static str> {
    let lower = expression.to_ascii_lowercase();
    Some(match lower.as_str() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        _ => return None,
    })
}

/// Names the field croner rejected: each field is parsed alone, the others
/// wildcards, and the first one that fails is reported.
fn diagnose(
    parser: &CronParser,
    expression: &str,
    fields: &[&str],
    error: &croner::errors::CronError,
) -> ScheduleError {
    let names: &[&str] = if fields.len() == 6 {
        &FIELD_NAMES_6
    } else {
        &FIELD_NAMES_5
    };
    for (i, (field, name)) in fields.iter().zip(names).enumerate() {
        let probe: Vec<&str> = (0..fields.len())
            .map(|j| if j == i { *field } else { "*" })
            .collect();
        if parser.parse(&probe.join(" ")).is_err() {
            return ScheduleError::InvalidField {
                field: name,
                value: (*field).to_string(),
            };
        }
    }
    ScheduleError::Invalid {
        expression: expression.to_string(),
        reason: error.to_string(),
    }
}

/// Whether some second of some day matches. Day patterns repeat every 28
/// years between 1901 and 2099, so scanning 2000..=2028 covers every
/// (month, day, weekday, leap year) combination. Rejecting impossible
/// patterns here keeps croner from searching up to its year-5000 limit.
fn can_match(cron: &Cron) -> bool {
    let p = &cron.pattern;
    let any = |n: u32, f: &dyn Fn(u32) -> bool| (0..n).any(f);
    if !any(60, &|s| p.second_match(s).unwrap_or(false))
        || !any(60, &|m| p.minute_match(m).unwrap_or(false))
        || !any(24, &|h| p.hour_match(h).unwrap_or(false))
    {
        return false;
    }
    let (Some(mut day), Some(end)) = (
        NaiveDate::from_ymd_opt(2000, 1, 1),
        NaiveDate::from_ymd_opt(2029, 1, 1),
    ) else {
        return false;
    };
    while day < end {
        if p.month_match(day.month()).unwrap_or(false)
            && p.day_match(day.year(), day.month(), day.day())
                .unwrap_or(false)
        {
            return true;
        }
        match day.succ_opt() {
            Some(next) => day = next,
            None => return false,
        }
    }
    false
}

fn utc_naive(secs: i64) -> Option<NaiveDateTime> {
    DateTime::from_timestamp(secs, 0).map(|t| t.naive_utc())
}

fn order(a: i64, b: i64) -> (i64, i64) {
    (a.min(b), a.max(b))
}

/// What a scheduler does with a schedule whose `next_fire_at` is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// Ticks to fire now, oldest first.
    pub fire: Vec<Millis>,
    /// Due ticks not fired; exact up to [`SKIPPED_COUNT_CAP`], saturating there.
    pub skipped: u64,
    /// The first tick strictly after `now` (None: the pattern never fires again).
    pub next_fire_at: Option<Millis>,
}

/// The due ticks are those in `[next_fire_at, now]`. `grace_ms`: a tick at
/// most this late still counts as on time (the scheduler's poll lag), so
/// [`CatchUp::None`] fires it; a tick later than that was missed.
///
/// * `None`: fire only ticks within grace;
/// * `Latest`: fire the newest due tick (on time or not), skip the rest;
/// * `All`: fire every due tick up to `max_catch_up` newest ones, skip older ones.
///
/// `max_catch_up` is clamped to `1..=MAX_CATCH_UP` and also caps `None`
/// (several ticks can be on time for a per-second schedule). The work is
/// bounded by `max_catch_up + SKIPPED_COUNT_CAP` tick searches however long
/// the scheduler was down: ticks are walked back from `now`, never forward
/// through the whole gap.
///
/// If `next_fire_at > now` nothing is due: nothing fires and `next_fire_at`
/// comes back unchanged.
pub fn due(
    spec: &CronSpec,
    next_fire_at: Millis,
    now: Millis,
    policy: CatchUp,
    grace_ms: i64,
    max_catch_up: usize,
) -> Due {
    if next_fire_at > now {
        return Due {
            fire: Vec::new(),
            skipped: 0,
            next_fire_at: Some(next_fire_at),
        };
    }
    let grace = grace_ms.max(0);
    let want = match policy {
        CatchUp::Latest => 1,
        CatchUp::None | CatchUp::All => max_catch_up.clamp(1, MAX_CATCH_UP),
    };

    let mut fire = Vec::new();
    let mut cursor = now;
    while fire.len() < want {
        let Some(t) = spec.prev_at_or_before(cursor) else {
            break;
        };
        // Walking back, ticks only get older and later: stop at the first miss.
        if t < next_fire_at || (policy == CatchUp::None && now.saturating_sub(t) > grace) {
            break;
        }
        fire.push(t);
        cursor = t.saturating_sub(1);
    }
    fire.reverse();

    // Fired ticks are the newest due ones, so the skipped are all before them.
    let skipped_until = fire.first().map_or(now, |t| t.saturating_sub(1));
    let skipped = spec
        .ticks_between(
            next_fire_at.saturating_sub(1),
            skipped_until,
            SKIPPED_COUNT_CAP,
        )
        .len() as u64;

    Due {
        fire,
        skipped,
        next_fire_at: spec.next_after(now),
    }
}

/// Whether to fire a tick while the schedule's previous fire is still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverlapDecision {
    Fire,
    Skip,
    /// Fire, but the target waits for the previous one to finish (Queue).
    Defer,
}

pub fn overlap(policy: Overlap, previous_running: bool) -> OverlapDecision {
    match (policy, previous_running) {
        (_, false) | (Overlap::Allow, true) => OverlapDecision::Fire,
        (Overlap::Skip, true) => OverlapDecision::Skip,
        (Overlap::Queue, true) => OverlapDecision::Defer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Millis {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .expect("valid UTC time")
            .timestamp_millis()
    }

    fn spec(expr: &str, tz: &str) -> CronSpec {
        CronSpec::parse(expr, tz).expect("valid spec")
    }

    const MIN: Millis = 60_000;
    const HOUR: Millis = 3_600_000;

    #[test]
    fn five_fields_fire_on_whole_minutes() {
        let s = spec("*/15 9-17 * * 1-5", "UTC");
        // Friday 2026-01-02 17:50 -> Monday 09:00.
        assert_eq!(
            s.next_after(ms(2026, 1, 2, 17, 50, 0)),
            Some(ms(2026, 1, 5, 9, 0, 0))
        );
        assert_eq!(
            s.next_after(ms(2026, 1, 5, 9, 0, 0)),
            Some(ms(2026, 1, 5, 9, 15, 0))
        );
        assert_eq!(s.expression(), "*/15 9-17 * * 1-5");
        assert_eq!(s.timezone(), "UTC");
    }

    #[test]
    fn six_fields_have_second_granularity() {
        let s = spec("*/10 * * * * *", "UTC");
        let t0 = ms(2026, 5, 1, 12, 0, 0);
        let ticks = s.ticks_between(t0, t0 + MIN, 100);
        assert_eq!(ticks.len(), 6);
        assert!(ticks.windows(2).all(|w| w[1] - w[0] == 10_000));
        assert_eq!(ticks[0], t0 + 10_000);

        let s = spec("30 0 12 * * *", "UTC");
        assert_eq!(s.next_after(t0), Some(t0 + 30_000));
        assert_eq!(s.next_after(t0 + 30_000), Some(t0 + 24 * HOUR + 30_000));
    }

    #[test]
    fn nicknames_expand() {
        let from = ms(2026, 5, 13, 10, 20, 0); // a Wednesday
        let cases = [
            ("@yearly", ms(2027, 1, 1, 0, 0, 0)),
            ("@annually", ms(2027, 1, 1, 0, 0, 0)),
            ("@monthly", ms(2026, 6, 1, 0, 0, 0)),
            ("@weekly", ms(2026, 5, 17, 0, 0, 0)),
            ("@daily", ms(2026, 5, 14, 0, 0, 0)),
            ("@midnight", ms(2026, 5, 14, 0, 0, 0)),
            ("@hourly", ms(2026, 5, 13, 11, 0, 0)),
            ("@DAILY", ms(2026, 5, 14, 0, 0, 0)),
        ];
        for (expr, want) in cases {
            assert_eq!(spec(expr, "UTC").next_after(from), Some(want), "{expr}");
        }
        assert_eq!(
            CronSpec::parse("@fortnightly", "UTC").unwrap_err(),
            ScheduleError::UnknownNickname("@fortnightly".into())
        );
    }

    #[test]
    fn rare_dates_are_found() {
        // 2100 is not a leap year: the next 29 February after 2097 is in 2104.
        let s = spec("0 0 29 2 *", "UTC");
        assert_eq!(
            s.next_after(ms(2097, 3, 1, 0, 0, 0)),
            Some(ms(2104, 2, 29, 0, 0, 0))
        );
        assert_eq!(
            s.prev_at_or_before(ms(2104, 2, 28, 0, 0, 0)),
            Some(ms(2096, 2, 29, 0, 0, 0))
        );
    }

    #[test]
    fn timezone_shifts_the_wall_clock() {
        // 09:00 in New York (EDT, UTC-4) in June.
        let s = spec("0 9 * * *", "America/New_York");
        assert_eq!(
            s.next_after(ms(2026, 6, 1, 0, 0, 0)),
            Some(ms(2026, 6, 1, 13, 0, 0))
        );
    }

    #[test]
    fn bad_fields_name_the_field() {
        let err = |e: &str| {
            CronSpec::parse(e, "UTC")
                .expect_err("should be rejected")
                .to_string()
        };
        assert_eq!(err("61 * * * *"), r#"cron: invalid minute field "61""#);
        assert_eq!(err("0 24 * * *"), r#"cron: invalid hour field "24""#);
        assert_eq!(err("0 0 0 * *"), r#"cron: invalid day-of-month field "0""#);
        assert_eq!(err("0 0 * 13 *"), r#"cron: invalid month field "13""#);
        assert_eq!(err("0 0 * * 8"), r#"cron: invalid day-of-week field "8""#);
        assert_eq!(err("60 0 0 * * *"), r#"cron: invalid second field "60""#);
        assert_eq!(err("*/0 * * * *"), r#"cron: invalid minute field "*/0""#);
        assert_eq!(err("* * * *"), "cron: expected 5 or 6 fields, got 4");
        assert_eq!(err("* * * * * * *"), "cron: expected 5 or 6 fields, got 7");
        assert_eq!(err("   "), "cron: expression is empty");
        assert_eq!(
            err("0 0 30 2 *"),
            r#"cron: expression "0 0 30 2 *" never matches any date and time"#
        );
    }

    #[test]
    fn bad_zone_and_long_input_are_rejected() {
        assert_eq!(
            CronSpec::parse("* * * * *", "Mars/Olympus")
                .unwrap_err()
                .to_string(),
            r#"unknown time zone "Mars/Olympus""#
        );
        assert!(CronSpec::parse("* * * * *", "").is_err());
        let long = format!("0 0 * * {}", "1,".repeat(200));
        assert_eq!(
            CronSpec::parse(&long, "UTC").unwrap_err(),
            ScheduleError::ExpressionTooLong {
                len: long.len(),
                max: MAX_INPUT_LEN
            }
        );
        let zone = "A".repeat(MAX_INPUT_LEN + 1);
        assert!(matches!(
            CronSpec::parse("* * * * *", &zone),
            Err(ScheduleError::TimeZoneTooLong { .. })
        ));
    }

    #[test]
    fn hostile_expressions_are_errors_not_panics() {
        let junk = [
            "#",
            "L L L L L",
            "5#9 * * * *",
            "* * * * 5#9",
            "* * * * 5#0",
            "1-0 * * * *",
            "1-2-3 * * * *",
            "*/ * * * *",
            "/5 * * * *",
            "99999999999 * * * *",
            "-1 * * * *",
            "W W W W W",
            "* * LW * *",
            "@ * * * *",
            "* @ * * *",
            "٣ * * * *",
            "ß * * * *",
            "\u{0} * * * *",
            ", * * * *",
            "* * 31 2,4 *",
        ];
        for expr in junk {
            assert!(CronSpec::parse(expr, "UTC").is_err(), "{expr:?} accepted");
        }
        // Vixie OR: day 31 of April never exists, but any Monday does.
        assert!(CronSpec::parse("0 0 31 4 1", "UTC").is_ok());
    }

    #[test]
    fn next_after_is_strictly_after() {
        let s = spec("0 * * * *", "UTC");
        let t = ms(2026, 7, 1, 10, 0, 0);
        assert_eq!(s.next_after(t), Some(t + HOUR));
        assert_eq!(s.next_after(t - 1), Some(t));
        assert_eq!(s.next_after(t - 999), Some(t));
        assert_eq!(s.prev_at_or_before(t), Some(t));
        assert_eq!(s.prev_at_or_before(t - 1), Some(t - HOUR));
        assert_eq!(s.prev_at_or_before(t + 999), Some(t));
        // Out of chrono's range: no tick rather than a panic.
        assert_eq!(s.next_after(Millis::MAX), None);
        assert_eq!(s.prev_at_or_before(Millis::MIN), None);
    }

    /// Local midnight-to-midnight bounds of a Berlin day, as (from, to] for ticks_between.
    fn berlin_day(y: i32, m: u32, d: u32) -> (Millis, Millis) {
        let start = Tz::Europe__Berlin
            .with_ymd_and_hms(y, m, d, 0, 0, 0)
            .single()
            .expect("midnight exists");
        let next = start.date_naive().succ_opt().expect("next day");
        let end = Tz::Europe__Berlin
            .from_local_datetime(&next.and_hms_opt(0, 0, 0).expect("midnight"))
            .single()
            .expect("midnight exists");
        (start.timestamp_millis() - 1, end.timestamp_millis() - 1)
    }

    #[test]
    fn spring_forward_fixed_time_fires_once_after_the_gap() {
        let s = spec("30 2 * * *", "Europe/Berlin");
        let (from, to) = berlin_day(2026, 3, 29);
        // 02:30 does not exist; it fires at 03:00 CEST = 01:00 UTC.
        assert_eq!(
            s.ticks_between(from, to, 10),
            vec![ms(2026, 3, 29, 1, 0, 0)]
        );
        // Normal days around it keep 02:30 local.
        let (from, to) = berlin_day(2026, 3, 28);
        assert_eq!(
            s.ticks_between(from, to, 10),
            vec![ms(2026, 3, 28, 1, 30, 0)]
        );
        let (from, to) = berlin_day(2026, 3, 30);
        assert_eq!(
            s.ticks_between(from, to, 10),
            vec![ms(2026, 3, 30, 0, 30, 0)]
        );
        // Backward search agrees.
        assert_eq!(
            s.prev_at_or_before(ms(2026, 3, 29, 12, 0, 0)),
            Some(ms(2026, 3, 29, 1, 0, 0))
        );
    }

    #[test]
    fn fall_back_fixed_time_fires_once_on_the_first_pass() {
        let s = spec("30 2 * * *", "Europe/Berlin");
        let (from, to) = berlin_day(2026, 10, 25);
        // 02:30 CEST = 00:30 UTC; 02:30 CET (01:30 UTC) does not fire.
        assert_eq!(
            s.ticks_between(from, to, 10),
            vec![ms(2026, 10, 25, 0, 30, 0)]
        );
        // Searching from inside the second pass must not go back to the first.
        let second_pass = ms(2026, 10, 25, 1, 10, 0); // 02:10 CET
        assert_eq!(s.next_after(second_pass), Some(ms(2026, 10, 26, 1, 30, 0)));
        assert_eq!(
            s.prev_at_or_before(ms(2026, 10, 25, 1, 45, 0)),
            Some(ms(2026, 10, 25, 0, 30, 0))
        );
        // 02:10 CET is after 02:30 CEST: the newest tick is that morning's, not the day before.
        assert_eq!(
            s.prev_at_or_before(second_pass),
            Some(ms(2026, 10, 25, 0, 30, 0))
        );
    }

    #[test]
    fn hourly_fires_every_real_hour_across_dst() {
        let s = spec("0 * * * *", "Europe/Berlin");
        for ((y, m, d), want) in [
            ((2026, 3, 29), 23),
            ((2026, 10, 25), 25),
            ((2026, 7, 1), 24),
        ] {
            let (from, to) = berlin_day(y, m, d);
            let ticks = s.ticks_between(from, to, 100);
            assert_eq!(ticks.len(), want, "{y}-{m}-{d}");
            assert!(ticks.windows(2).all(|w| w[1] - w[0] == HOUR), "{ticks:?}");
        }
    }

    #[test]
    fn quarter_hours_stay_in_order_through_the_repeated_hour() {
        let s = spec("*/15 * * * *", "Europe/Berlin");
        let (from, to) = berlin_day(2026, 10, 25);
        let ticks = s.ticks_between(from, to, 200);
        assert_eq!(ticks.len(), 100);
        assert!(ticks.windows(2).all(|w| w[1] - w[0] == 15 * MIN));
        // From the first pass, the next tick may be on the second pass.
        assert_eq!(
            s.next_after(ms(2026, 10, 25, 0, 50, 0)), // 02:50 CEST
            Some(ms(2026, 10, 25, 1, 0, 0))           // 02:00 CET
        );
        assert_eq!(
            s.prev_at_or_before(ms(2026, 10, 25, 1, 5, 0)), // 02:05 CET
            Some(ms(2026, 10, 25, 1, 0, 0))
        );
        assert_eq!(
            s.prev_at_or_before(ms(2026, 10, 25, 0, 59, 59)), // 02:59:59 CEST
            Some(ms(2026, 10, 25, 0, 45, 0))
        );
    }

    /// Interval patterns fire at every instant whose wall clock matches:
    /// check next and prev against a minute-by-minute scan of both DST days.
    #[test]
    fn interval_patterns_match_a_brute_force_scan() {
        for expr in ["*/20 * * * *", "*/7 2 * * *", "0 2,14 * * *", "5 1-3 * * *"] {
            let s = spec(expr, "Europe/Berlin");
            for (y, m, d) in [(2026, 3, 29), (2026, 10, 25)] {
                let (from, to) = berlin_day(y, m, d);
                let mut want = Vec::new();
                let mut t = from + 1;
                while t <= to {
                    let local = Tz::Europe__Berlin.timestamp_millis_opt(t).unwrap();
                    if s.cron.is_time_matching(&local).unwrap() {
                        want.push(t);
                    }
                    t += MIN;
                }
                assert!(!s.fixed_time);
                if expr == "0 2,14 * * *" {
                    // Spring: 02:00 is skipped; fall: 02:00 fires on both passes.
                    assert_eq!(want.len(), if m == 3 { 1 } else { 3 });
                }
                assert_eq!(s.ticks_between(from, to, 500), want, "{expr} {y}-{m}-{d}");
                // Walking back from the end finds the same ticks.
                let mut back = Vec::new();
                let mut cursor = to;
                while let Some(t) = s.prev_at_or_before(cursor) {
                    if t <= from {
                        break;
                    }
                    back.push(t);
                    cursor = t - 1;
                }
                back.reverse();
                assert_eq!(back, want, "{expr} {y}-{m}-{d} backwards");
            }
        }
    }

    fn five_min() -> CronSpec {
        spec("*/5 * * * *", "UTC")
    }

    #[test]
    fn not_due_changes_nothing() {
        let t = ms(2026, 4, 1, 10, 0, 0);
        let d = due(&five_min(), t, t - 1, CatchUp::All, 30_000, 10);
        assert_eq!(
            d,
            Due {
                fire: vec![],
                skipped: 0,
                next_fire_at: Some(t)
            }
        );
    }

    #[test]
    fn on_time_tick_fires_under_every_policy() {
        let t = ms(2026, 4, 1, 10, 0, 0);
        for policy in [CatchUp::None, CatchUp::Latest, CatchUp::All] {
            let d = due(&five_min(), t, t + 2_000, policy, 30_000, 10);
            assert_eq!(d.fire, vec![t], "{policy:?}");
            assert_eq!(d.skipped, 0);
            assert_eq!(d.next_fire_at, Some(t + 5 * MIN));
        }
        // Exactly at the tick with no grace is still on time.
        let d = due(&five_min(), t, t, CatchUp::None, 0, 10);
        assert_eq!(d.fire, vec![t]);
    }

    #[test]
    fn a_bit_late_tick_is_missed_only_under_none() {
        let t = ms(2026, 4, 1, 10, 0, 0);
        let now = t + 60_000; // a minute late, grace 30 s
        let d = due(&five_min(), t, now, CatchUp::None, 30_000, 10);
        assert_eq!((d.fire.clone(), d.skipped), (vec![], 1));
        assert_eq!(d.next_fire_at, Some(t + 5 * MIN));
        for policy in [CatchUp::Latest, CatchUp::All] {
            let d = due(&five_min(), t, now, policy, 30_000, 10);
            assert_eq!((d.fire, d.skipped), (vec![t], 0), "{policy:?}");
        }
        // The same lateness within a larger grace is on time.
        let d = due(&five_min(), t, now, CatchUp::None, 90_000, 10);
        assert_eq!(d.fire, vec![t]);
    }

    #[test]
    fn down_for_hours() {
        let t = ms(2026, 4, 1, 10, 0, 0);
        let newest = t + 3 * HOUR; // 37 due ticks: t, t+5m, ..., t+3h
        let now = newest + 10_000;
        let s = five_min();

        let d = due(&s, t, now, CatchUp::None, 30_000, 10);
        assert_eq!((d.fire, d.skipped), (vec![newest], 36));
        let d = due(&s, t, now, CatchUp::None, 5_000, 10);
        assert_eq!((d.fire, d.skipped), (vec![], 37));

        let d = due(&s, t, now, CatchUp::Latest, 0, 10);
        assert_eq!((d.fire, d.skipped), (vec![newest], 36));

        let d = due(&s, t, now, CatchUp::All, 0, 5);
        let want: Vec<Millis> = (0..5).rev().map(|i| newest - i * 5 * MIN).collect();
        assert_eq!((d.fire, d.skipped), (want, 32));

        let d = due(&s, t, now, CatchUp::All, 0, 100);
        assert_eq!(d.fire.len(), 37);
        assert_eq!(d.fire[0], t);
        assert_eq!(d.fire[36], newest);
        assert_eq!(d.skipped, 0);
        assert_eq!(d.next_fire_at, Some(newest + 5 * MIN));

        // A stored next_fire_at between ticks: only real ticks count.
        let d = due(&s, t + 1, now, CatchUp::All, 0, 100);
        assert_eq!(d.fire.first(), Some(&(t + 5 * MIN)));
        assert_eq!(d.fire.len(), 36);
    }

    #[test]
    fn per_second_schedule_down_for_a_year_is_bounded() {
        let s = spec("* * * * * *", "UTC");
        let t = ms(2025, 6, 1, 0, 0, 0);
        let now = ms(2026, 6, 1, 0, 0, 0) + 500;
        let started = std::time::Instant::now();

        let d = due(&s, t, now, CatchUp::All, 0, 10);
        let now_s = now - 500;
        let want: Vec<Millis> = (0..10).rev().map(|i| now_s - i * 1000).collect();
        assert_eq!(d.fire, want);
        assert_eq!(d.skipped, SKIPPED_COUNT_CAP as u64);
        assert_eq!(d.next_fire_at, Some(now_s + 1000));

        let d = due(&s, t, now, CatchUp::Latest, 0, 10);
        assert_eq!((d.fire, d.skipped), (vec![now_s], SKIPPED_COUNT_CAP as u64));

        // 5 s of grace: the ticks of the last 5 s are on time.
        let d = due(&s, t, now, CatchUp::None, 5_000, 100);
        assert_eq!(d.fire.len(), 5);
        assert_eq!(d.fire.last(), Some(&now_s));

        // An absurd max_catch_up is clamped.
        let d = due(&s, t, now, CatchUp::All, 0, usize::MAX);
        assert_eq!(d.fire.len(), MAX_CATCH_UP);

        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn overlap_table() {
        use OverlapDecision::*;
        let table = [
            (Overlap::Skip, false, Fire),
            (Overlap::Skip, true, Skip),
            (Overlap::Queue, false, Fire),
            (Overlap::Queue, true, Defer),
            (Overlap::Allow, false, Fire),
            (Overlap::Allow, true, Fire),
        ];
        for (policy, running, want) in table {
            assert_eq!(overlap(policy, running), want, "{policy:?} {running}");
        }
    }

    #[test]
    fn policies_serialize_lowercase() {
        assert_eq!(
            serde_json::to_string(&CatchUp::Latest).unwrap(),
            r#""latest""#
        );
        assert_eq!(
            serde_json::from_str::<Overlap>(r#""queue""#).unwrap(),
            Overlap::Queue
        );
        assert_eq!(CatchUp::default(), CatchUp::None);
        assert_eq!(Overlap::default(), Overlap::Skip);
    }
}
