//! The audit record a request is building, kept in a task-local so that
//! neither handler signatures nor store signatures carry it. The API's
//! middleware opens the scope ([`scope`]) and fills in the request's facts;
//! the caller's extractor and the handler add who and what (`note_*`); the
//! store method that makes the request's change writes the record in that
//! change's own transaction ([`stamp`]); the middleware writes it
//! afterwards only for requests that changed nothing (a refusal, a 404)
//! or for audited reads.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use kiln_core::audit::AuditRecord;

#[derive(Default)]
pub struct Note {
    /// The request, as the middleware saw it before the handler ran.
    pub request: Option<RequestFacts>,
    /// Written by a store method in its change's transaction.
    pub written: bool,
    pub tenant: Option<String>,
    pub actor_kind: &'static str,
    pub actor: String,
    pub resource: Option<String>,
    pub rationale: Option<String>,
    /// A read that is audited all the same.
    pub force: bool,
}

#[derive(Clone, Debug)]
pub struct RequestFacts {
    pub action: String,
    pub request_id: String,
    pub source: String,
    /// The request's path: the resource, unless a note names another.
    pub path: String,
    /// The route's documented success statuses (2xx), for the outcome of
    /// a record written before the answer is known.
    pub success: Vec<u16>,
}

#[derive(Clone, Default)]
pub struct Slot(Arc<Mutex<Note>>);

impl Slot {
    pub fn new(request: Option<RequestFacts>) -> Slot {
        Slot(Arc::new(Mutex::new(Note {
            request,
            ..Note::default()
        })))
    }

    /// The note as it stands, leaving an empty one.
    pub fn take(&self) -> Note {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

tokio::task_local! {
    static NOTE: Slot;
}

/// Runs `fut` with `slot` as its request's note.
pub async fn scope<F: Future>(slot: Slot, fut: F) -> F::Output {
    NOTE.scope(slot, fut).await
}

fn with_note<T>(f: impl FnOnce(&mut Note) -> T) -> Option<T> {
    NOTE.try_with(|slot| f(&mut slot.0.lock().unwrap_or_else(PoisonError::into_inner)))
        .ok()
}

/// Who is acting, in which tenant (set when the caller is known).
pub fn note_actor(tenant: &str, kind: &'static str, actor: &str) {
    with_note(|n| {
        n.tenant = Some(tenant.to_string());
        n.actor_kind = kind;
        n.actor = actor.to_string();
    });
}

/// The resource acted on, where the request's path does not name it (a
/// create names what it made).
pub fn note_resource(resource: impl Into<String>) {
    let resource = resource.into();
    with_note(|n| n.resource = Some(resource));
}

/// Why: an approval's comment, a rejection's reason.
pub fn note_rationale(rationale: impl Into<String>) {
    let rationale = rationale.into();
    with_note(|n| n.rationale = Some(rationale));
}

/// Audits this request even though its method reads.
pub fn note_audited_read() {
    with_note(|n| n.force = true);
}

/// What the stored change was, for the record's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Something new was made (`201` where the route documents it).
    Created,
    /// Something that was there changed or went.
    Changed,
}

fn outcome(success: &[u16], change: Change) -> String {
    let code = match (success, change) {
        ([only], _) => *only,
        (codes, Change::Created) if codes.contains(&201) => 201,
        (codes, Change::Changed) if codes.contains(&200) => 200,
        (codes, Change::Changed) if codes.contains(&204) => 204,
        ([first, ..], _) => *first,
        ([], Change::Created) => 201,
        ([], Change::Changed) => 200,
    };
    code.to_string()
}

/// The record this request's change leaves, once, marking it written;
/// `None` outside a request, for a request no tenant was named for, or
/// once written. `resource` names what the change made when the request's
/// path does not (an id only the store knows).
pub fn claim(change: Change, resource: Option<&str>) -> Option<AuditRecord> {
    with_note(|n| {
        let facts = n.request.as_ref()?;
        if n.written {
            return None;
        }
        let tenant = n.tenant.clone()?;
        if let Some(resource) = resource {
            n.resource = Some(resource.to_string());
        }
        let record = AuditRecord {
            time: now_millis(),
            tenant,
            actor_kind: n.actor_kind.to_string(),
            actor: n.actor.clone(),
            action: facts.action.clone(),
            resource: n.resource.clone().unwrap_or_else(|| facts.path.clone()),
            request_id: facts.request_id.clone(),
            source: facts.source.clone(),
            outcome: outcome(&facts.success, change),
            rationale: n.rationale.clone(),
        };
        n.written = true;
        Some(record)
    })
    .flatten()
}

/// Whether this request's record has been claimed by a change.
pub fn claimed() -> bool {
    with_note(|n| n.written).unwrap_or(false)
}

/// Gives back a claim whose transaction did not commit, so the record is
/// written afterwards with the request's real outcome.
pub fn unclaim() {
    with_note(|n| n.written = false);
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_documented_statuses() {
        assert_eq!(outcome(&[201], Change::Changed), "201");
        assert_eq!(outcome(&[204], Change::Changed), "204");
        assert_eq!(outcome(&[200, 201], Change::Created), "201");
        assert_eq!(outcome(&[200, 201], Change::Changed), "200");
        assert_eq!(outcome(&[], Change::Created), "201");
        assert_eq!(outcome(&[], Change::Changed), "200");
    }

    #[tokio::test]
    async fn a_request_claims_its_record_once() {
        assert!(
            claim(Change::Created, None).is_none(),
            "no scope, no record"
        );
        let slot = Slot::new(Some(RequestFacts {
            action: "PUT /api/v1/secrets/{name}".into(),
            request_id: "r1".into(),
            source: "127.0.0.1".into(),
            path: "/api/v1/secrets/db".into(),
            success: vec![201],
        }));
        scope(slot.clone(), async {
            assert!(claim(Change::Created, None).is_none(), "no tenant yet");
            note_actor("acme", "key", "k1");
            let record = claim(Change::Created, None).expect("claimed");
            assert_eq!(record.outcome, "201");
            assert_eq!(record.resource, "/api/v1/secrets/db", "the path by default");
            assert!(claim(Change::Changed, None).is_none(), "only once");
            unclaim();
            assert!(
                claim(Change::Changed, None).is_some(),
                "again after unclaim"
            );
        })
        .await;
        assert!(slot.take().written);
    }
}
