//! Users' credentials and sessions: argon2id password hashes, signed
//! session tokens (JWT, HS256) with their rotating keys, the per-process
//! cache of live sessions, and the settings logins follow.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use axum::http::HeaderMap;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use kiln_core::users::ThrottlePolicy;
use kiln_db::Db;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// argon2id memory cost in KiB (19 MiB), iterations and lanes: OWASP's
/// first recommended setting.
pub const ARGON2_M_KIB: u32 = 19_456;
pub const ARGON2_T: u32 = 2;
pub const ARGON2_P: u32 = 1;

/// Default lifetime of a session token.
pub const TOKEN_TTL_S_DEFAULT: u64 = 900;
/// Bytes of an HS256 signing key.
pub const TOKEN_KEY_BYTES: usize = 32;
/// The issuer every token names.
const ISSUER: &str = "kiln";
/// How often a process looks whether the key file changed (a rotation).
const KEY_FILE_CHECK: Duration = Duration::from_secs(1);

/// The session cookie (the token, HttpOnly) and the CSRF cookie (readable
/// by the console's script, which sends it back as `X-CSRF-Token`).
pub const SESSION_COOKIE: &str = "kiln_session";
pub const CSRF_COOKIE: &str = "kiln_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

fn argon2() -> Argon2<'static> {
    let params = Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None)
        .expect("the argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A PHC string: `$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`.
fn hash_now(password: &[u8]) -> Result<String, String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    argon2()
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| e.to_string())
}

/// Verified against unknown users, so they cost what a real one does.
static DUMMY_HASH: LazyLock<String> =
    LazyLock::new(|| hash_now(&rand::random::<[u8; 32]>()).expect("hashing random bytes works"));

/// Who logins are slowed down for, and how.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    pub token_ttl_s: u64,
    /// Mark cookies `Secure` on every answer, not only on requests a
    /// trusted proxy says came over TLS.
    pub secure_cookies: bool,
    /// Peers whose `X-Forwarded-Proto` and `X-Forwarded-For` are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub account: ThrottlePolicy,
    pub source: ThrottlePolicy,
}

impl Default for AuthSettings {
    fn default() -> AuthSettings {
        AuthSettings {
            token_ttl_s: TOKEN_TTL_S_DEFAULT,
            secure_cookies: false,
            trusted_proxies: vec![
                "127.0.0.0/8".parse().expect("static network"),
                "::1/128".parse().expect("static network"),
            ],
            account: ThrottlePolicy::ACCOUNT,
            source: ThrottlePolicy::SOURCE,
        }
    }
}

impl AuthSettings {
    fn trusts(&self, peer: Option<IpAddr>) -> bool {
        let Some(ip) = peer else { return false };
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer, or the address a trusted proxy
    /// appended to `X-Forwarded-For`.
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> String {
        if self.trusts(peer) {
            let forwarded = headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter_map(|v| v.parse::<IpAddr>().ok())
                .next_back();
            if let Some(ip) = forwarded {
                return ip.to_string();
            }
        }
        peer.map(|ip| ip.to_string())
            .unwrap_or_else(|| "local".to_string())
    }

    /// Whether cookies set on this answer are `Secure`.
    pub fn secure(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> bool {
        self.secure_cookies
            || (self.trusts(peer)
                && headers
                    .get("x-forwarded-proto")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("https")))
    }
}

/// What a session token says.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The username.
    pub sub: String,
    pub tenant: String,
    pub role: String,
    /// The session, revocable.
    pub sid: String,
    /// What `X-CSRF-Token` must say on writes the cookie authenticates.
    pub csrf: String,
    pub iat: i64,
    pub exp: i64,
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    Expired,
    Invalid,
}

#[derive(Clone)]
struct SigningKey {
    kid: String,
    secret: Vec<u8>,
}

impl SigningKey {
    fn new(secret: Vec<u8>) -> SigningKey {
        let digest = Sha256::new()
            .chain_update(b"kiln-token-key-id\n")
            .chain_update(&secret)
            .finalize();
        SigningKey {
            kid: hex::encode(&digest[..8]),
            secret,
        }
    }

    fn random() -> SigningKey {
        SigningKey::new(rand::random::<[u8; TOKEN_KEY_BYTES]>().to_vec())
    }
}

struct Ring {
    /// The first signs; all verify.
    keys: Vec<SigningKey>,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// The keys tokens are signed with: one in memory, or a file (one key of
/// 64 hex digits a line; the first signs, the others still verify) that
/// every API process of a deployment shares and re-reads when it changes.
pub struct TokenKeys {
    path: Option<PathBuf>,
    ring: RwLock<Ring>,
}

fn parse_keys(text: &str) -> Result<Vec<SigningKey>, String> {
    let keys: Vec<SigningKey> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            hex::decode(line)
                .ok()
                .filter(|b| b.len() == TOKEN_KEY_BYTES)
                .map(SigningKey::new)
                .ok_or_else(|| format!("a line is not {} hex digits", TOKEN_KEY_BYTES * 2))
        })
        .collect::<Result<_, _>>()?;
    if keys.is_empty() {
        return Err("no key in the file".into());
    }
    Ok(keys)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Writes the keys readable by their owner only, whole or not at all: a
/// new file (0600) renamed over the old.
fn write_keys(path: &Path, keys: &[SigningKey]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    for key in keys {
        writeln!(file, "{}", hex::encode(&key.secret))?;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn io_error(path: &Path, message: String) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {message}", path.display()),
    )
}

impl TokenKeys {
    /// A key of this process alone (tests; a single process).
    pub fn ephemeral() -> TokenKeys {
        TokenKeys {
            path: None,
            ring: RwLock::new(Ring {
                keys: vec![SigningKey::random()],
                modified: None,
                checked: Instant::now(),
            }),
        }
    }

    /// The keys in `path`; when the file is missing and `create`, a new
    /// key is made there (0600).
    pub fn open(path: &Path, create: bool) -> std::io::Result<TokenKeys> {
        let keys = match std::fs::read_to_string(path) {
            Ok(text) => parse_keys(&text).map_err(|e| io_error(path, e))?,
            Err(error) if create && error.kind() == std::io::ErrorKind::NotFound => {
                let keys = vec![SigningKey::random()];
                write_keys(path, &keys)?;
                keys
            }
            Err(error) => return Err(error),
        };
        Ok(TokenKeys {
            path: Some(path.to_path_buf()),
            ring: RwLock::new(Ring {
                keys,
                modified: modified(path),
                checked: Instant::now(),
            }),
        })
    }

    /// Puts a new key first in `path` and keeps the one that signed until
    /// now, so tokens it signed verify until they expire; older keys go.
    /// Returns the new key's id and the kept one's.
    pub fn rotate(path: &Path) -> std::io::Result<(String, String)> {
        let text = std::fs::read_to_string(path)?;
        let old = parse_keys(&text).map_err(|e| io_error(path, e))?;
        let new = SigningKey::random();
        let ids = (new.kid.clone(), old[0].kid.clone());
        write_keys(path, &[new, old[0].clone()])?;
        Ok(ids)
    }

    /// Re-reads the file if it changed (at most once a `KEY_FILE_CHECK`,
    /// or at once when `force`).
    fn refresh(&self, force: bool) {
        let Some(path) = &self.path else { return };
        {
            let ring = self.ring.read().unwrap_or_else(PoisonError::into_inner);
            if !force && ring.checked.elapsed() < KEY_FILE_CHECK {
                return;
            }
        }
        let mut ring = self.ring.write().unwrap_or_else(PoisonError::into_inner);
        ring.checked = Instant::now();
        let now = modified(path);
        if now == ring.modified {
            return;
        }
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| parse_keys(&t))
        {
            Ok(keys) => {
                tracing::info!(path = %path.display(), signing = %keys[0].kid, "token keys reloaded");
                ring.keys = keys;
                ring.modified = now;
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "token key file unreadable; keeping the keys in use")
            }
        }
    }

    /// The id of the key that signs now.
    pub fn signing_kid(&self) -> String {
        self.refresh(false);
        self.ring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys[0]
            .kid
            .clone()
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, ApiError> {
        self.refresh(false);
        let key = self
            .ring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys[0]
            .clone();
        let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(key.kid);
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(&key.secret))
            .map_err(ApiError::internal)
    }

    fn find(&self, kid: &str) -> Option<SigningKey> {
        self.ring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .cloned()
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        let kid = header.kid.ok_or(TokenError::Invalid)?;
        self.refresh(false);
        // A key this process has not seen yet: another process may have
        // rotated a moment ago.
        let key = match self.find(&kid) {
            Some(key) => key,
            None => {
                self.refresh(true);
                self.find(&kid).ok_or(TokenError::Invalid)?
            }
        };
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = 0;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&key.secret), &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })
    }
}

/// Whether a bearer credential is a session token rather than an API key:
/// keys are `kiln_<id>_<secret>`, tokens three dot-separated parts.
pub fn is_token(credential: &str) -> bool {
    !credential.starts_with("kiln_") && credential.bytes().filter(|b| *b == b'.').count() == 2
}

/// How long a live session is trusted before it is looked up again; a
/// logout through another process takes at most this long to bite.
const SESSION_TTL: Duration = Duration::from_secs(5);
const SESSIONS_MAX: usize = 10_000;

struct SessionEntry {
    tenant: String,
    username: String,
    live: bool,
    at: Instant,
}

/// Sessions looked up lately, like `KeyCache` for keys.
#[derive(Default)]
pub struct SessionCache {
    entries: Mutex<HashMap<String, SessionEntry>>,
}

impl SessionCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionEntry>> {
        // The map holds no invariant a panicking holder could break.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the session of these claims is live.
    pub async fn live(&self, db: &Db, claims: &Claims) -> Result<bool, ApiError> {
        if let Some(entry) = self.lock().get(&claims.sid) {
            if !entry.live || entry.at.elapsed() < SESSION_TTL {
                return Ok(entry.live);
            }
        }
        let live = db.session_live(&claims.sid, crate::now_millis()).await?;
        let mut entries = self.lock();
        if entries.len() >= SESSIONS_MAX {
            entries.retain(|_, e| !e.live);
            if entries.len() >= SESSIONS_MAX {
                entries.clear();
            }
        }
        entries.insert(
            claims.sid.clone(),
            SessionEntry {
                tenant: claims.tenant.clone(),
                username: claims.sub.clone(),
                live,
                at: Instant::now(),
            },
        );
        Ok(live)
    }

    /// A session ended here: refused at once in this process.
    pub fn forget(&self, sid: &str) {
        if let Some(entry) = self.lock().get_mut(sid) {
            entry.live = false;
        }
    }

    /// Every session of a user this process knows of ended.
    pub fn forget_user(&self, tenant: &str, username: &str) {
        for entry in self.lock().values_mut() {
            if entry.tenant == tenant && entry.username == username {
                entry.live = false;
            }
        }
    }
}

/// Everything users and sessions need, in `AppState`.
pub struct Auth {
    keys: RwLock<Arc<TokenKeys>>,
    pub sessions: SessionCache,
    settings: RwLock<AuthSettings>,
    /// argon2 runs take 19 MiB each: this many at once, the rest wait.
    hashing: tokio::sync::Semaphore,
}

impl Default for Auth {
    fn default() -> Auth {
        let lanes = std::thread::available_parallelism().map_or(2, |n| n.get());
        // Made once per process, ahead of the first unknown user, whose
        // answer would otherwise take a hash longer.
        std::thread::spawn(|| LazyLock::force(&DUMMY_HASH));
        Auth {
            keys: RwLock::new(Arc::new(TokenKeys::ephemeral())),
            sessions: SessionCache::default(),
            settings: RwLock::new(AuthSettings::default()),
            hashing: tokio::sync::Semaphore::new(lanes.clamp(1, 16)),
        }
    }
}

impl Auth {
    pub fn keys(&self) -> Arc<TokenKeys> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Signs with these keys from now on (set at start-up).
    pub fn set_keys(&self, keys: TokenKeys) {
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
    }

    pub fn settings(&self) -> AuthSettings {
        self.settings
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// [`AuthSettings::client_address`] under the lock, without a copy of
    /// the settings (every audited request asks).
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> String {
        self.settings
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .client_address(peer, headers)
    }

    pub fn set_settings(&self, settings: AuthSettings) {
        *self
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner) = settings;
    }

    /// An argon2id hash of `password`, off the async threads.
    pub async fn hash_password(&self, password: String) -> Result<String, ApiError> {
        let _permit = self.hashing.acquire().await.map_err(ApiError::internal)?;
        tokio::task::spawn_blocking(move || hash_now(password.as_bytes()))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)
    }

    /// Whether `password` matches `hash` (the parameters are read from the
    /// hash). No hash (no such user): a hash nobody knows the password of
    /// is checked instead, so the answer takes as long either way.
    pub async fn verify_password(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, ApiError> {
        let _permit = self.hashing.acquire().await.map_err(ApiError::internal)?;
        tokio::task::spawn_blocking(move || {
            let known = hash.is_some();
            let hash = hash.unwrap_or_else(|| DUMMY_HASH.clone());
            let Ok(parsed) = PasswordHash::new(&hash) else {
                return false;
            };
            let matches = argon2()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok();
            known && matches
        })
        .await
        .map_err(ApiError::internal)
    }
}

/// A random token for ids and CSRF values: 32 hex digits.
pub fn random_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Compares without stopping at the first difference.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_until_they_expire_and_only_with_their_key() {
        let keys = TokenKeys::ephemeral();
        let now = crate::now_millis() / 1000;
        let claims = |exp| Claims {
            iss: ISSUER.into(),
            sub: "ada".into(),
            tenant: "acme".into(),
            role: "viewer".into(),
            sid: "s1".into(),
            csrf: "c".into(),
            iat: now,
            exp,
        };
        let token = keys.sign(&claims(now + 60)).unwrap();
        assert!(is_token(&token));
        assert_eq!(keys.verify(&token).unwrap().sub, "ada");
        let old = keys.sign(&claims(now - 1)).unwrap();
        assert_eq!(keys.verify(&old).unwrap_err(), TokenError::Expired);
        // Another key, or a token changed by a byte, does not verify.
        assert_eq!(
            TokenKeys::ephemeral().verify(&token).unwrap_err(),
            TokenError::Invalid
        );
        let mut forged = token.clone().into_bytes();
        let at = forged.len() - 3;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        assert!(keys.verify(&String::from_utf8(forged).unwrap()).is_err());
        // An unsigned token is not accepted.
        let parts: Vec<&str> = token.split('.').collect();
        let none = format!(
            "{}.{}.",
            base64_url(r#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert!(keys.verify(&none).is_err());
        assert!(!is_token("kiln_abc_def.g.h"));
    }

    fn base64_url(text: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    #[test]
    fn key_files_rotate_keeping_the_previous_key() {
        let dir = std::env::temp_dir().join(format!("kiln-token-keys-{}", random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token.key");
        assert!(TokenKeys::open(&path, false).is_err());
        let keys = TokenKeys::open(&path, true).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let first = keys.signing_kid();
        let (new, kept) = TokenKeys::rotate(&path).unwrap();
        assert_eq!(kept, first);
        assert_ne!(new, first);
        let reopened = TokenKeys::open(&path, false).unwrap();
        assert_eq!(reopened.signing_kid(), new);
        // Rotating again drops the oldest.
        let (newer, kept) = TokenKeys::rotate(&path).unwrap();
        assert_eq!(kept, new);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert_ne!(newer, first);
        std::fs::write(&path, "not hex\n").unwrap();
        assert!(TokenKeys::open(&path, false).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cookies_and_comparison() {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::COOKIE,
            "a=1; kiln_session=tok.en.x; kiln_csrf=abc".parse().unwrap(),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("tok.en.x"));
        assert_eq!(cookie(&headers, CSRF_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, "b"), None);
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
    }

    #[test]
    fn passwords_hash_with_the_stated_parameters() {
        let hash = hash_now(b"correct horse battery").unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        let parsed = PasswordHash::new(&hash).unwrap();
        assert!(argon2()
            .verify_password(b"correct horse battery", &parsed)
            .is_ok());
        assert!(argon2().verify_password(b"wrong", &parsed).is_err());
    }

    #[test]
    fn forwarded_addresses_only_from_trusted_proxies() {
        let settings = AuthSettings::default();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.7".parse().unwrap(),
        );
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        let proxy = Some("127.0.0.1".parse().unwrap());
        let stranger = Some("192.0.2.1".parse().unwrap());
        assert_eq!(settings.client_address(proxy, &headers), "198.51.100.7");
        assert_eq!(settings.client_address(stranger, &headers), "192.0.2.1");
        assert!(settings.secure(proxy, &headers));
        assert!(!settings.secure(stranger, &headers));
    }
}
