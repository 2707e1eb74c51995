//! The audit trail's chain: what a record is, how its hash is made, and how
//! a tenant's chain is checked. Records are chained per tenant: each holds
//! its number in the tenant's chain (`seq`, from 1), the hash of the one
//! before and its own hash over both and every field. Editing a field
//! breaks that record's hash; inserting or deleting one breaks the numbers
//! or the link of the next; cutting the tail is caught by the tenant's head
//! (the last number and hash, kept beside the chain).

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::Millis;

/// The hash before a tenant's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, as the trail keeps it. Never a request body, never a
/// secret's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub time: Millis,
    pub tenant: String,
    /// `key`, `user`, `webhook`, `schedule`, `rule`, `broker`, `job` or
    /// `system`.
    pub actor_kind: String,
    /// The key id, user name, trigger, schedule or rule name.
    pub actor: String,
    /// What was done: for API calls the method and route
    /// (`POST /api/v1/jobs/{id}/cancel`), for automated actions a dotted
    /// name (`schedule.fire`, `rule.action`, `secret.read`).
    pub action: String,
    /// What it was done to: the resource's API path where it has one.
    pub resource: String,
    pub request_id: String,
    /// The caller's address, empty for automated actions.
    pub source: String,
    /// The status code, with the error code after a space when it failed
    /// (`403 policy_denied`); `ok` or an error code for automated actions.
    pub outcome: String,
    /// Why, where there is a why: the rule and its triggering event, an
    /// approval's comment.
    pub rationale: Option<String>,
}

/// The hash of the record numbered `seq` whose predecessor's hash is
/// `prev`: SHA-256 over the predecessor's hash and the fields as one JSON
/// array (unambiguous: no field can run into the next), in hex.
pub fn chain_hash(prev: &str, seq: i64, r: &AuditRecord) -> String {
    // A tuple serialises as a JSON array, without building a value first.
    let fields = (
        seq,
        r.time,
        &r.tenant,
        &r.actor_kind,
        &r.actor,
        &r.action,
        &r.resource,
        &r.request_id,
        &r.source,
        &r.outcome,
        &r.rationale,
    );
    let mut hasher = Sha256::new();
    hasher.update(prev.as_bytes());
    hasher.update(b"\n");
    let mut encoded = Vec::with_capacity(256);
    serde_json::to_writer(&mut encoded, &fields).expect("strings and numbers always encode");
    hasher.update(&encoded);
    hex::encode(hasher.finalize())
}

/// A chained record as stored.
#[derive(Clone, Debug)]
pub struct ChainedRecord {
    /// The row's id (its place among all tenants' rows).
    pub id: i64,
    pub seq: i64,
    pub prev_hash: String,
    pub hash: String,
    pub record: AuditRecord,
}

/// What is wrong with a chain, at which record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Break {
    pub tenant: String,
    pub seq: i64,
    pub id: Option<i64>,
    pub problem: String,
}

/// Checks one tenant's chain, fed record by record in `seq` order; ends
/// with [`ChainCheck::finish`] against the tenant's head.
#[derive(Debug)]
pub struct ChainCheck {
    tenant: String,
    next_seq: i64,
    prev_hash: String,
    pub checked: u64,
    pub breaks: Vec<Break>,
}

/// At most this many breaks are listed per tenant: a chain cut near its
/// start would otherwise list every record after the cut.
const BREAKS_MAX: usize = 100;

impl ChainCheck {
    pub fn new(tenant: &str) -> ChainCheck {
        ChainCheck {
            tenant: tenant.to_string(),
            next_seq: 1,
            prev_hash: GENESIS.to_string(),
            checked: 0,
            breaks: Vec::new(),
        }
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    fn flag(&mut self, seq: i64, id: Option<i64>, problem: String) {
        if self.breaks.len() < BREAKS_MAX {
            self.breaks.push(Break {
                tenant: self.tenant.clone(),
                seq,
                id,
                problem,
            });
        }
    }

    pub fn feed(&mut self, c: &ChainedRecord) {
        self.checked += 1;
        if c.record.tenant != self.tenant {
            self.flag(
                c.seq,
                Some(c.id),
                format!(
                    "belongs to tenant {:?} but sits in this chain",
                    c.record.tenant
                ),
            );
        }
        if c.seq > self.next_seq {
            let missing = if c.seq - self.next_seq == 1 {
                format!("record {} is missing (deleted)", self.next_seq)
            } else {
                format!(
                    "records {}..{} are missing (deleted)",
                    self.next_seq,
                    c.seq - 1
                )
            };
            self.flag(c.seq, Some(c.id), missing);
        } else if c.seq < self.next_seq {
            self.flag(
                c.seq,
                Some(c.id),
                "number repeats an earlier record (inserted)".into(),
            );
        }
        if c.prev_hash != self.prev_hash {
            self.flag(
                c.seq,
                Some(c.id),
                "does not link to the record before it (a record was inserted, deleted or \
                 changed before it)"
                    .into(),
            );
        }
        if chain_hash(&c.prev_hash, c.seq, &c.record) != c.hash {
            self.flag(
                c.seq,
                Some(c.id),
                "its fields do not match its hash (modified)".into(),
            );
        }
        self.next_seq = c.seq.max(self.next_seq - 1) + 1;
        self.prev_hash = c.hash.clone();
    }

    /// Compares the end of the chain with the head kept for the tenant
    /// (`None`: no head, so no chained record may exist).
    pub fn finish(mut self, head: Option<(i64, &str)>) -> ChainCheck {
        let last = self.next_seq - 1;
        match head {
            None if last > 0 => self.flag(
                last,
                None,
                "chain has records but no head (inserted)".into(),
            ),
            None => {}
            Some((seq, hash)) => {
                if seq > last {
                    self.flag(
                        seq,
                        None,
                        format!(
                            "the head is at record {seq} but the chain ends at {last} (deleted)"
                        ),
                    );
                } else if seq < last {
                    self.flag(
                        last,
                        None,
                        format!("records after the head ({seq}) exist (inserted)"),
                    );
                } else if hash != self.prev_hash {
                    self.flag(
                        seq,
                        None,
                        "the last record's hash is not the head's (modified)".into(),
                    );
                }
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: i64) -> AuditRecord {
        AuditRecord {
            time: 1_000 + n,
            tenant: "acme".into(),
            actor_kind: "key".into(),
            actor: "k1".into(),
            action: "POST /api/v1/jobs".into(),
            resource: format!("/api/v1/jobs/{n}"),
            request_id: format!("r{n}"),
            source: "127.0.0.1".into(),
            outcome: "201".into(),
            rationale: None,
        }
    }

    fn chain(n: i64) -> Vec<ChainedRecord> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let record = record(seq);
                let hash = chain_hash(&prev, seq, &record);
                let c = ChainedRecord {
                    id: seq * 10,
                    seq,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                    record,
                };
                prev = hash;
                c
            })
            .collect()
    }

    fn check(records: &[ChainedRecord], head: Option<(i64, &str)>) -> Vec<Break> {
        let mut check = ChainCheck::new("acme");
        for r in records {
            check.feed(r);
        }
        check.finish(head).breaks
    }

    #[test]
    fn the_hash_is_over_the_fields_as_one_json_array() {
        let r = record(1);
        let expected = {
            let mut h = Sha256::new();
            h.update(GENESIS.as_bytes());
            h.update(b"\n");
            h.update(
                br#"[1,1001,"acme","key","k1","POST /api/v1/jobs","/api/v1/jobs/1","r1","127.0.0.1","201",null]"#,
            );
            hex::encode(h.finalize())
        };
        assert_eq!(chain_hash(GENESIS, 1, &r), expected);
    }

    #[test]
    fn an_untouched_chain_passes() {
        let c = chain(5);
        let head = (5, c[4].hash.as_str());
        assert_eq!(check(&c, Some(head)), vec![]);
        assert_eq!(check(&[], None), vec![]);
    }

    #[test]
    fn every_field_is_covered_by_the_hash() {
        let base = record(1);
        let h = chain_hash(GENESIS, 1, &base);
        let variants: [fn(&mut AuditRecord); 10] = [
            |r| r.time += 1,
            |r| r.tenant.push('x'),
            |r| r.actor_kind.push('x'),
            |r| r.actor.push('x'),
            |r| r.action.push('x'),
            |r| r.resource.push('x'),
            |r| r.request_id.push('x'),
            |r| r.source.push('x'),
            |r| r.outcome.push('x'),
            |r| r.rationale = Some(String::new()),
        ];
        for change in variants {
            let mut r = base.clone();
            change(&mut r);
            assert_ne!(chain_hash(GENESIS, 1, &r), h);
        }
        assert_ne!(chain_hash(GENESIS, 2, &base), h);
        // Fields cannot slide into each other.
        let mut a = base.clone();
        a.actor = "k1x".into();
        a.action = "y".into();
        let mut b = base.clone();
        b.actor = "k1".into();
        b.action = "xy".into();
        assert_ne!(chain_hash(GENESIS, 1, &a), chain_hash(GENESIS, 1, &b));
    }

    #[test]
    fn a_modified_record_is_named() {
        let mut c = chain(5);
        let head = c[4].hash.clone();
        c[2].record.outcome = "200".into();
        let breaks = check(&c, Some((5, &head)));
        assert_eq!(breaks.len(), 1, "{breaks:?}");
        assert_eq!(breaks[0].seq, 3);
        assert!(breaks[0].problem.contains("modified"));
    }

    #[test]
    fn a_deleted_record_is_named() {
        let mut c = chain(5);
        let head = c[4].hash.clone();
        c.remove(1);
        let breaks = check(&c, Some((5, &head)));
        assert_eq!(breaks[0].seq, 3);
        assert!(
            breaks[0].problem.contains("record 2 is missing"),
            "{breaks:?}"
        );
        // Cutting the tail leaves the chain whole but short of its head.
        let c = chain(5);
        let breaks = check(&c[..4], Some((5, &head)));
        assert_eq!(breaks.len(), 1);
        assert!(breaks[0].problem.contains("deleted"), "{breaks:?}");
    }

    #[test]
    fn an_inserted_record_is_named() {
        // In the middle, renumbering what follows.
        let c = chain(4);
        let head_hash = c[3].hash.clone();
        let mut forged = c.clone();
        let mut extra = c[1].clone();
        extra.record.actor = "intruder".into();
        extra.seq = 3;
        extra.prev_hash = c[1].hash.clone();
        extra.hash = chain_hash(&extra.prev_hash, 3, &extra.record);
        for r in forged.iter_mut().skip(2) {
            r.seq += 1;
        }
        forged.insert(2, extra);
        let breaks = check(&forged, Some((4, &head_hash)));
        assert!(breaks.iter().any(|b| b.seq == 4), "{breaks:?}");
        // At the end, past the head.
        let mut c = chain(3);
        let head = c[2].hash.clone();
        let mut tail = c[2].clone();
        tail.seq = 4;
        tail.prev_hash = head.clone();
        tail.hash = chain_hash(&head, 4, &tail.record);
        c.push(tail);
        let breaks = check(&c, Some((3, &head)));
        assert_eq!(breaks.len(), 1);
        assert!(breaks[0].problem.contains("inserted"), "{breaks:?}");
        // A repeated number.
        let mut c = chain(3);
        let dup = c[1].clone();
        c.insert(2, dup);
        assert!(check(&c, None)
            .iter()
            .any(|b| b.problem.contains("repeats")));
    }
}
