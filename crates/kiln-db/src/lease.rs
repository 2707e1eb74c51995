//! The parts of leasing both drivers share: what a lease statement sets, how
//! the candidates of one call become the leased batch, and how a batch is
//! decoded row by row.
//!
//! A lease is one transaction in both drivers: the candidates are picked
//! (and, on PostgreSQL, locked) by kind from the main fetch index and by
//! queue from each concurrency-limited queue; the best `limit` of them by
//! priority are leased in one `UPDATE`; rows that cannot be decoded are
//! failed in the same transaction. An error anywhere rolls the whole lease
//! back, so no job is ever left leased to a worker that never heard of it.

use std::collections::HashMap;

use kiln_core::{LeasedJob, Millis};

use crate::rows::LeasedRow;

/// What a caller of [`crate::Db::job_lease_with`] asks for.
#[derive(Clone, Debug)]
pub struct LeaseRequest<'a> {
    pub worker_id: &'a str,
    /// Kinds this worker handles; jobs of other kinds are never read.
    pub kinds: &'a [String],
    pub limit: i64,
    pub lease_ms: i64,
    pub now: Millis,
    /// Most jobs of one tenant running at once (`TenantQuotas::jobs_running_max`).
    pub tenant_running_max: Option<u32>,
}

impl LeaseRequest<'_> {
    /// When the leases run out; saturating, since `lease_ms` comes from
    /// configuration.
    pub fn lease_until(&self) -> Millis {
        self.now.saturating_add(self.lease_ms.max(0))
    }

    /// Only tenants with more than this many running jobs could go past
    /// their quota in this call, so only their counts are read.
    pub fn quota_floor(&self) -> Option<i64> {
        self.tenant_running_max
            .map(|max| (max as i64).saturating_sub(self.limit))
    }
}

/// A job a lease could take: enough to rank it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Candidate {
    pub id: i64,
    pub tenant: String,
    pub priority: i16,
    pub run_at: i64,
}

/// How many more jobs each tenant may start. Tenants listed in `running`
/// (those near their quota) get what their count leaves; any other tenant
/// has fewer than `max - limit` running, so the quota itself bounds it.
#[derive(Clone, Debug, Default)]
pub struct Rooms {
    near_quota: HashMap<String, i64>,
    otherwise: Option<i64>,
}

pub fn rooms(tenant_running_max: Option<u32>, running: Vec<(String, i64)>) -> Rooms {
    let Some(max) = tenant_running_max else {
        return Rooms::default();
    };
    Rooms {
        near_quota: running
            .into_iter()
            .map(|(tenant, n)| (tenant, (max as i64 - n).max(0)))
            .collect(),
        otherwise: Some(max as i64),
    }
}

impl Rooms {
    fn of(&self, tenant: &str) -> Option<i64> {
        self.near_quota.get(tenant).copied().or(self.otherwise)
    }
}

/// Tenants that may start nothing now: leases skip their jobs outright.
pub fn full_tenants(rooms: &Rooms) -> Vec<String> {
    rooms
        .near_quota
        .iter()
        .filter(|(_, room)| **room <= 0)
        .map(|(tenant, _)| tenant.clone())
        .collect()
}

/// The best `limit` candidates, strictly by priority then FIFO, with no
/// tenant going past its room. Limited queues' candidates compete with the
/// rest on priority, so neither can starve the other; the limits themselves
/// were applied when the candidates were picked. Returned in id order.
pub fn choose(mut candidates: Vec<Candidate>, limit: i64, rooms: &Rooms) -> Vec<i64> {
    candidates.sort_by_key(|c| (c.priority, c.run_at, c.id));
    candidates.dedup_by_key(|c| c.id);
    let mut taken_by_tenant: HashMap<&str, i64> = HashMap::new();
    let mut chosen = Vec::new();
    for candidate in &candidates {
        if chosen.len() as i64 >= limit {
            break;
        }
        let taken = taken_by_tenant.entry(&candidate.tenant).or_default();
        if rooms
            .of(&candidate.tenant)
            .is_some_and(|room| *taken >= room)
        {
            continue;
        }
        *taken += 1;
        chosen.push(candidate.id);
    }
    chosen.sort_unstable();
    chosen
}

/// Decodes each leased row on its own: a row that cannot be read (a spec or
/// backoff written by a newer version, say) fails alone, with the reason.
pub fn decode(rows: Vec<LeasedRow>) -> (Vec<LeasedJob>, Vec<(i64, String)>) {
    let mut jobs = Vec::with_capacity(rows.len());
    let mut bad = Vec::new();
    for row in rows {
        let id = row.id();
        match LeasedJob::try_from(row) {
            Ok(job) => jobs.push(job),
            Err(error) => {
                tracing::error!(id, %error, "a leased job cannot be read; failing it");
                bad.push((
                    id,
                    kiln_core::names::sanitise_message(
                        &format!("the stored job cannot be read: {error}"),
                        ERROR_MAX,
                    ),
                ));
            }
        }
    }
    (jobs, bad)
}

/// Longest error text the store writes.
pub const ERROR_MAX: usize = 4096;

/// What a lease writes to each chosen row (`$1` worker, `$2` now, `$3` lease
/// end); both drivers number their parameters the same way.
pub const LEASE_SET: &str = "status = 'running', attempt = attempt + 1, worker_id = $1, \
     started_at = $2, lease_expires_at = $3";

/// `sql` with its parameters `$k` written `{sigil}{k + from - 1}`: a
/// statement numbered from 1 placed after others in one query.
pub(crate) fn renumber(sql: &str, sigil: char, from: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' || !chars.peek().is_some_and(char::is_ascii_digit) {
            out.push(c);
            continue;
        }
        let mut k = 0usize;
        while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
            k = k * 10 + d as usize;
            chars.next();
        }
        out.push(sigil);
        out.push_str(&(k + from - 1).to_string());
    }
    out
}

/// Failing a row that cannot be decoded (`$1` now, `$2` error, `$3` id).
pub const FAIL_UNREADABLE: &str = "UPDATE jobs SET status = 'failed', finished_at = $1, \
     error = $2, lease_expires_at = NULL WHERE id = $3 AND status = 'running'";

/// The lost-lease rule, the one place it is written: a job whose lease
/// expired runs again at once while attempts remain; a cancel request ends
/// it as cancelled; with no attempt left it is dead.
pub const LOST_STATUS: &str = "CASE WHEN cancel_requested THEN 'cancelled' \
     WHEN attempt - retry_from >= max_attempts THEN 'dead' ELSE 'queued' END";

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: i64, tenant: &str, priority: i16) -> Candidate {
        Candidate {
            id,
            tenant: tenant.into(),
            priority,
            run_at: id,
        }
    }

    #[test]
    fn renumber_moves_every_parameter() {
        assert_eq!(
            renumber("a = $1, b = $12 AND c = $2::int8[] AND d = '$'", '$', 22),
            "a = $22, b = $33 AND c = $23::int8[] AND d = '$'"
        );
        assert_eq!(renumber(LEASE_SET, '?', 1), LEASE_SET.replace('$', "?"));
        assert_eq!(renumber("x = $3", '?', 4), "x = ?6");
    }

    #[test]
    fn choose_ranks_by_priority_and_keeps_tenants_in_their_room() {
        let all = vec![
            c(5, "a", 3),
            c(1, "a", 2),
            c(2, "b", 0),
            c(3, "a", 0),
            c(4, "a", 1),
        ];
        assert_eq!(choose(all.clone(), 2, &Rooms::default()), vec![2, 3]);
        let one_for_a = rooms(Some(3), vec![("a".into(), 2)]);
        assert_eq!(choose(all.clone(), 10, &one_for_a), vec![2, 3]);
        let none_for_a = rooms(Some(3), vec![("a".into(), 3)]);
        assert_eq!(choose(all.clone(), 10, &none_for_a), vec![2]);
        let two_each = rooms(Some(2), vec![]);
        assert_eq!(choose(all, 10, &two_each), vec![2, 3, 4]);
        assert_eq!(
            full_tenants(&rooms(Some(3), vec![("a".into(), 3), ("b".into(), 2)])),
            vec!["a".to_string()]
        );
    }
}
