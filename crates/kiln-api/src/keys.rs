//! API key resolution with a short-lived cache: a key is hashed and looked up
//! once every few seconds, not on every request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_db::Db;

use crate::error::ApiError;
use crate::extract::Caller;

/// How long a resolved key is trusted before it is looked up again; a
/// revocation through another process takes at most this long to bite.
const TTL: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl KeyCache {
    pub async fn resolve(&self, db: &Db, secret: &str) -> Result<Option<Caller>, ApiError> {
        let hash = kiln_db::hash_key(secret);
        if let Some((caller, at)) = self.entries.lock().expect("key cache").get(&hash) {
            if at.elapsed() < TTL {
                return Ok(Some(caller.clone()));
            }
        }
        let Some(key) = db.key_find_by_hash(&hash).await? else {
            self.entries.lock().expect("key cache").remove(&hash);
            return Ok(None);
        };
        let caller = Caller {
            tenant: key.tenant,
            key_id: key.id,
            scopes: key.scopes,
        };
        let mut entries = self.entries.lock().expect("key cache");
        if entries.len() > 10_000 {
            entries.clear();
        }
        entries.insert(hash, (caller.clone(), Instant::now()));
        Ok(Some(caller))
    }

    /// Forgets a revoked key at once in this process.
    pub fn forget_key_id(&self, key_id: &str) {
        self.entries
            .lock()
            .expect("key cache")
            .retain(|_, (caller, _)| caller.key_id != key_id);
    }
}
