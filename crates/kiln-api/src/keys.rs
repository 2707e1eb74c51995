//! API key resolution with a short-lived cache: a key is hashed and looked up
//! once every few seconds, not on every request. Keys the store does not
//! know are cached too, so repeating a made-up key costs no query.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_db::Db;

use crate::error::ApiError;
use crate::extract::Caller;

/// How long a resolved key is trusted before it is looked up again; a
/// revocation through another process takes at most this long to bite.
const TTL: Duration = Duration::from_secs(5);

/// Most keys remembered; past this the cache starts afresh.
const ENTRIES_MAX: usize = 10_000;

/// A key's hash → who it is (`None`: no such key), and when that was learnt.
type Entries = HashMap<String, (Option<Caller>, Instant)>;

#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<Entries>,
}

impl KeyCache {
    /// Who holds `secret`, if anyone. `may_look_up` is asked before the
    /// store is queried, so look-ups can be limited.
    pub async fn resolve(
        &self,
        db: &Db,
        secret: &str,
        may_look_up: impl FnOnce() -> Result<(), ApiError>,
    ) -> Result<Option<Caller>, ApiError> {
        let hash = kiln_db::hash_key(secret);
        if let Some((caller, at)) = self.lock().get(&hash) {
            if at.elapsed() < TTL {
                return Ok(caller.clone());
            }
        }
        may_look_up()?;
        let caller = db.key_find_by_hash(&hash).await?.map(|key| Caller {
            tenant: key.tenant,
            key_id: key.id,
            scopes: key.scopes,
        });
        let mut entries = self.lock();
        if entries.len() >= ENTRIES_MAX {
            entries.clear();
        }
        entries.insert(hash, (caller.clone(), Instant::now()));
        Ok(caller)
    }

    /// Forgets a revoked key at once in this process.
    pub fn forget_key_id(&self, key_id: &str) {
        self.lock()
            .retain(|_, (caller, _)| caller.as_ref().is_none_or(|caller| caller.key_id != key_id));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The map holds no invariant a panicking holder could break.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
