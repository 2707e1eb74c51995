//! Users: their roles, the rules a password must meet, and the login
//! throttle (how repeated failures slow down, then lock). Pure: the store
//! keeps the counters, the API hashes and verifies.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Millis, Scope, Scopes};

/// What a user may do; each role is a fixed set of key scopes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything of the tenant, changes nothing.
    Viewer,
    /// Reads, submits and changes work, approves steps.
    Operator,
    /// Everything in the tenant: keys and users too.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// The scopes a signed-in user of this role holds.
    pub fn scopes(self) -> Scopes {
        Scopes(match self {
            Role::Viewer => vec![Scope::Read],
            Role::Operator => vec![Scope::Read, Scope::Write, Scope::Approve],
            Role::Admin => vec![Scope::Admin],
        })
    }
}

/// Shortest password accepted, in characters.
pub const PASSWORD_MIN_CHARS: usize = 12;
/// Longest password accepted, in bytes: hashing cost must not grow with
/// what a client sends.
pub const PASSWORD_MAX_BYTES: usize = 1024;

/// Whether `password` may be set.
pub fn check_password(password: &str) -> Result<(), String> {
    if password.chars().count() < PASSWORD_MIN_CHARS {
        return Err(format!(
            "a password needs at least {PASSWORD_MIN_CHARS} characters"
        ));
    }
    if password.len() > PASSWORD_MAX_BYTES {
        return Err(format!(
            "a password holds at most {PASSWORD_MAX_BYTES} bytes"
        ));
    }
    if password.contains('\0') {
        return Err("a password cannot contain a NUL character".into());
    }
    Ok(())
}

/// When repeated login failures slow down and lock, for one counter (an
/// account, or a source address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrottlePolicy {
    /// Failures within `window_ms` that lock.
    pub failures_max: i64,
    pub window_ms: Millis,
    /// How long a lock lasts.
    pub lock_ms: Millis,
    /// After the n-th failure the next attempt waits `delay_ms * 2^(n-1)`.
    pub delay_ms: Millis,
}

impl ThrottlePolicy {
    /// Per account: 5 failures in 15 minutes lock it for 15 minutes; before
    /// that each failure doubles the wait (1, 2, 4, 8 s).
    pub const ACCOUNT: ThrottlePolicy = ThrottlePolicy {
        failures_max: 5,
        window_ms: 15 * 60_000,
        lock_ms: 15 * 60_000,
        delay_ms: 1_000,
    };

    /// Per source address: more room, since many people may share one
    /// address (an office behind NAT), and no growing wait.
    pub const SOURCE: ThrottlePolicy = ThrottlePolicy {
        failures_max: 20,
        window_ms: 15 * 60_000,
        lock_ms: 15 * 60_000,
        delay_ms: 0,
    };

    /// How long to wait after `failures` failures, the last at `last_at`.
    fn delay_after(&self, failures: i64) -> Millis {
        if failures <= 0 || self.delay_ms <= 0 {
            return 0;
        }
        self.delay_ms.saturating_mul(1 << (failures - 1).min(20))
    }
}

/// One counter as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailureCount {
    /// Failures counted since `window_start`.
    pub failures: i64,
    pub window_start: Millis,
    pub last_at: Millis,
    pub locked_until: Option<Millis>,
}

/// Whether an attempt may go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Proceed,
    /// Too soon after the last failure: retry in this many ms.
    SlowDown(Millis),
    /// Locked: retry in this many ms.
    Locked(Millis),
}

impl Verdict {
    /// The stricter of two verdicts (the account's and the source's).
    pub fn and(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::Locked(a), Verdict::Locked(b)) => Verdict::Locked(a.max(b)),
            (Verdict::Locked(a), _) | (_, Verdict::Locked(a)) => Verdict::Locked(a),
            (Verdict::SlowDown(a), Verdict::SlowDown(b)) => Verdict::SlowDown(a.max(b)),
            (Verdict::SlowDown(a), _) | (_, Verdict::SlowDown(a)) => Verdict::SlowDown(a),
            _ => Verdict::Proceed,
        }
    }
}

/// Before an attempt: what `count` (as stored, or none) allows at `now`.
pub fn before_attempt(
    policy: &ThrottlePolicy,
    count: Option<&FailureCount>,
    now: Millis,
) -> Verdict {
    let Some(count) = count else {
        return Verdict::Proceed;
    };
    if let Some(until) = count.locked_until.filter(|until| *until > now) {
        return Verdict::Locked(until - now);
    }
    // Failures out of the window no longer count.
    if count.window_start + policy.window_ms <= now {
        return Verdict::Proceed;
    }
    // No wait asked: even a failure counted a moment after `now` was read
    // (an attempt in flight) does not hold this one back.
    let delay = policy.delay_after(count.failures);
    let ready = count.last_at + delay;
    if delay > 0 && ready > now {
        return Verdict::SlowDown(ready - now);
    }
    Verdict::Proceed
}

/// After counting this attempt as a failure up front (so attempts made at
/// once are all counted): whether it may still be checked. The n-th
/// failure within the window is checked while n ≤ `failures_max`.
pub fn within_allowance(policy: &ThrottlePolicy, failures_now: i64) -> bool {
    failures_now <= policy.failures_max
}

/// After a failed attempt left `failures_now` failures: lock until when,
/// if it should lock.
pub fn lock_after(policy: &ThrottlePolicy, failures_now: i64, now: Millis) -> Option<Millis> {
    (failures_now >= policy.failures_max).then_some(now + policy.lock_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_scope_sets() {
        assert!(!Role::Viewer.scopes().allows(Scope::Write));
        assert!(Role::Viewer.scopes().allows(Scope::Read));
        assert!(Role::Operator.scopes().allows(Scope::Write));
        assert!(Role::Operator.scopes().allows(Scope::Approve));
        assert!(!Role::Operator.scopes().allows(Scope::Admin));
        assert!(Role::Admin.scopes().allows(Scope::Admin));
        assert!(!Role::Admin.scopes().allows(Scope::System));
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn passwords() {
        assert!(check_password("short").is_err());
        assert!(check_password("elevenchars").is_err());
        assert!(check_password("twelve chars").is_ok());
        // Characters, not bytes: twelve multi-byte characters pass.
        assert!(check_password(&"é".repeat(12)).is_ok());
        assert!(check_password(&"x".repeat(PASSWORD_MAX_BYTES + 1)).is_err());
        assert!(check_password("twelve chars\0").is_err());
    }

    #[test]
    fn failures_slow_down_then_lock_then_end() {
        let p = ThrottlePolicy::ACCOUNT;
        let at = |failures, last_at, locked_until| FailureCount {
            failures,
            window_start: 0,
            last_at,
            locked_until,
        };
        assert_eq!(before_attempt(&p, None, 0), Verdict::Proceed);
        // 1, 2, 4, 8 s after the 1st to 4th failure.
        assert_eq!(
            before_attempt(&p, Some(&at(1, 100, None)), 600),
            Verdict::SlowDown(500)
        );
        assert_eq!(
            before_attempt(&p, Some(&at(1, 100, None)), 1_100),
            Verdict::Proceed
        );
        assert_eq!(
            before_attempt(&p, Some(&at(3, 0, None)), 1_000),
            Verdict::SlowDown(3_000)
        );
        assert_eq!(
            before_attempt(&p, Some(&at(4, 0, None)), 8_000),
            Verdict::Proceed
        );
        // The 5th failure locks for 15 minutes, and the lock ends.
        assert_eq!(lock_after(&p, 4, 10), None);
        assert_eq!(lock_after(&p, 5, 10), Some(10 + 15 * 60_000));
        let locked = at(0, 10, Some(10 + 15 * 60_000));
        assert_eq!(
            before_attempt(&p, Some(&locked), 60_010),
            Verdict::Locked(14 * 60_000)
        );
        assert_eq!(
            before_attempt(&p, Some(&locked), 15 * 60_000 + 10),
            Verdict::Proceed
        );
        // Failures older than the window are forgotten.
        assert_eq!(
            before_attempt(&p, Some(&at(4, 0, None)), 15 * 60_000),
            Verdict::Proceed
        );
        // Counted up front: attempts past the allowance are never checked.
        assert!(within_allowance(&p, 5));
        assert!(!within_allowance(&p, 6));
        // The source's counter has no growing wait.
        let s = ThrottlePolicy::SOURCE;
        assert_eq!(
            before_attempt(&s, Some(&at(19, 0, None)), 1),
            Verdict::Proceed
        );
        assert_eq!(
            before_attempt(&s, Some(&at(3, 50, None)), 10),
            Verdict::Proceed
        );
    }

    #[test]
    fn the_stricter_verdict_wins() {
        use Verdict::*;
        assert_eq!(Proceed.and(Proceed), Proceed);
        assert_eq!(Proceed.and(SlowDown(5)), SlowDown(5));
        assert_eq!(SlowDown(9).and(Locked(5)), Locked(5));
        assert_eq!(Locked(3).and(Locked(7)), Locked(7));
        assert_eq!(SlowDown(3).and(SlowDown(7)), SlowDown(7));
    }
}
