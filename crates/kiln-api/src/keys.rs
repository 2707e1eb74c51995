//! API key resolution with a short-lived cache: a key is hashed and looked up
//! once every few seconds, not on every request. Keys the store does not
//! know are cached too, so repeating a made-up key costs no query. Each
//! key's last use is recorded off the request path, at most once a minute
//! per key and process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use kiln_core::Millis;
use kiln_db::Db;

use crate::error::ApiError;
use crate::extract::Caller;

/// How long a resolved key is trusted before it is looked up again; a
/// revocation through another process takes at most this long to bite.
const TTL: Duration = Duration::from_secs(5);

/// Most keys remembered; past this the cache starts afresh.
const ENTRIES_MAX: usize = 10_000;

/// A key's last use is written at most this often (per process).
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// A key's hash → who it is and until when (`None`: no such key), and when
/// that was learnt.
type Entries = HashMap<String, (Option<(Caller, Option<Millis>)>, Instant)>;

#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<Entries>,
    /// When each key's use was last written from this process.
    touched: Mutex<HashMap<String, Instant>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps hold no invariant a panicking holder could break.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn expired() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "expired",
        "this API key has expired",
    )
}

impl KeyCache {
    /// Who holds `secret`, if anyone. `may_look_up` is asked before the
    /// store is queried, so look-ups can be limited. An expired key is an
    /// error of its own (`expired`).
    pub async fn resolve(
        &self,
        db: &Db,
        secret: &str,
        may_look_up: impl FnOnce() -> Result<(), ApiError>,
    ) -> Result<Option<Caller>, ApiError> {
        let hash = kiln_db::hash_key(secret);
        let cached = lock(&self.entries)
            .get(&hash)
            .filter(|(_, at)| at.elapsed() < TTL)
            .map(|(found, _)| found.clone());
        let found = match cached {
            Some(found) => found,
            None => {
                may_look_up()?;
                let found = db.key_find_by_hash(&hash).await?.map(|key| {
                    let expires_at = key.expires_at;
                    (Caller::key(key.tenant, key.id, key.scopes), expires_at)
                });
                let mut entries = lock(&self.entries);
                if entries.len() >= ENTRIES_MAX {
                    entries.clear();
                }
                entries.insert(hash, (found.clone(), Instant::now()));
                found
            }
        };
        let Some((caller, expires_at)) = found else {
            return Ok(None);
        };
        if expires_at.is_some_and(|at| at <= crate::now_millis()) {
            return Err(expired());
        }
        self.touch(db, &caller.key_id);
        Ok(Some(caller))
    }

    /// Records the key's use, unless this process did so lately; the
    /// write runs on its own task, so no request waits for it.
    fn touch(&self, db: &Db, key_id: &str) {
        {
            let mut touched = lock(&self.touched);
            if touched
                .get(key_id)
                .is_some_and(|at| at.elapsed() < TOUCH_EVERY)
            {
                return;
            }
            if touched.len() >= ENTRIES_MAX {
                touched.clear();
            }
            touched.insert(key_id.to_string(), Instant::now());
        }
        let db = db.clone();
        let id = key_id.to_string();
        tokio::spawn(async move {
            if let Err(error) = db.key_touch(&[id], crate::now_millis()).await {
                tracing::debug!(%error, "could not record a key's last use");
            }
        });
    }

    /// Forgets a revoked key at once in this process.
    pub fn forget_key_id(&self, key_id: &str) {
        lock(&self.entries).retain(|_, (found, _)| {
            found
                .as_ref()
                .is_none_or(|(caller, _)| caller.key_id != key_id)
        });
    }
}
