//! Envelope encryption of secrets: each version's value is sealed with a
//! fresh data key (XChaCha20-Poly1305, 24-byte random nonces), and the data
//! key is sealed with the deployment's master key. Both seals are bound to
//! the secret's tenant, name and version (associated data), so a sealed
//! value copied to another row does not open. Rotating the master key
//! re-seals data keys only; values are never decrypted for it.
//!
//! Pure: keys and nonces come from the caller.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

pub const KEY_BYTES: usize = 32;
pub const NONCE_BYTES: usize = 24;
/// The largest secret value.
pub const VALUE_MAX: usize = 64 << 10;

/// A secret's name becomes a file name in sandboxes
/// (`/run/secrets/<name>`): letters, digits, `_` and `-`, 1 to 64, starting
/// with a letter or digit, so it is never `.`, `..` or a path.
pub fn check_name(name: &str) -> Result<(), String> {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        Ok(())
    } else {
        Err(
            "a secret name is 1 to 64 letters, digits, _ and -, starting with a letter or digit"
                .into(),
        )
    }
}

/// The deployment's master key.
#[derive(Clone)]
pub struct MasterKey([u8; KEY_BYTES]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id())
    }
}

impl MasterKey {
    pub fn new(bytes: [u8; KEY_BYTES]) -> MasterKey {
        MasterKey(bytes)
    }

    /// From its file's text: 64 hex digits.
    pub fn parse(text: &str) -> Option<MasterKey> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(MasterKey(bytes.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A name for the key that reveals nothing of it: stored with every
    /// wrapped data key, so a node with another master key says so instead
    /// of failing to decrypt.
    pub fn id(&self) -> String {
        let digest = Sha256::new()
            .chain_update(b"kiln-master-key-id\n")
            .chain_update(self.0)
            .finalize();
        hex::encode(&digest[..8])
    }
}

/// One sealed version of a secret, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub nonce: [u8; NONCE_BYTES],
    pub wrapped_key: Vec<u8>,
    pub wrap_nonce: [u8; NONCE_BYTES],
    pub master_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("this secret was sealed under master key {sealed}, and this node holds {held}")]
    OtherMaster { sealed: String, held: String },
    #[error("the secret does not open: its stored form was altered")]
    Corrupt,
}

fn aad(tenant: &str, name: &str, version: i64) -> Vec<u8> {
    format!("kiln-secret-v1\n{tenant}\n{name}\n{version}").into_bytes()
}

fn seal_with(key: &[u8; KEY_BYTES], nonce: &[u8; NONCE_BYTES], aad: &[u8], msg: &[u8]) -> Vec<u8> {
    XChaCha20Poly1305::new(key.into())
        .encrypt(XNonce::from_slice(nonce), Payload { msg, aad })
        .expect("XChaCha20-Poly1305 seals any message that fits in memory")
}

fn open_with(
    key: &[u8; KEY_BYTES],
    nonce: &[u8; NONCE_BYTES],
    aad: &[u8],
    msg: &[u8],
) -> Result<Vec<u8>, SecretError> {
    XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg, aad })
        .map_err(|_| SecretError::Corrupt)
}

/// The fresh randomness one seal takes.
pub struct Fresh {
    pub data_key: [u8; KEY_BYTES],
    pub nonce: [u8; NONCE_BYTES],
    pub wrap_nonce: [u8; NONCE_BYTES],
}

pub fn seal(
    master: &MasterKey,
    (tenant, name, version): (&str, &str, i64),
    value: &[u8],
    fresh: Fresh,
) -> Sealed {
    let aad = aad(tenant, name, version);
    Sealed {
        ciphertext: seal_with(&fresh.data_key, &fresh.nonce, &aad, value),
        nonce: fresh.nonce,
        wrapped_key: seal_with(&master.0, &fresh.wrap_nonce, &aad, &fresh.data_key),
        wrap_nonce: fresh.wrap_nonce,
        master_id: master.id(),
    }
}

fn data_key(
    master: &MasterKey,
    aad: &[u8],
    sealed: &Sealed,
) -> Result<[u8; KEY_BYTES], SecretError> {
    if sealed.master_id != master.id() {
        return Err(SecretError::OtherMaster {
            sealed: sealed.master_id.clone(),
            held: master.id(),
        });
    }
    open_with(&master.0, &sealed.wrap_nonce, aad, &sealed.wrapped_key)?
        .try_into()
        .map_err(|_| SecretError::Corrupt)
}

pub fn open(
    master: &MasterKey,
    (tenant, name, version): (&str, &str, i64),
    sealed: &Sealed,
) -> Result<Vec<u8>, SecretError> {
    let aad = aad(tenant, name, version);
    let key = data_key(master, &aad, sealed)?;
    open_with(&key, &sealed.nonce, &aad, &sealed.ciphertext)
}

/// The same version with its data key sealed under `new` instead of `old`.
pub fn rewrap(
    old: &MasterKey,
    new: &MasterKey,
    (tenant, name, version): (&str, &str, i64),
    sealed: &Sealed,
    wrap_nonce: [u8; NONCE_BYTES],
) -> Result<Sealed, SecretError> {
    let aad = aad(tenant, name, version);
    let key = data_key(old, &aad, sealed)?;
    Ok(Sealed {
        wrapped_key: seal_with(&new.0, &wrap_nonce, &aad, &key),
        wrap_nonce,
        master_id: new.id(),
        ..sealed.clone()
    })
}

/// Most secrets one job, command or VM asks for.
pub const REQUESTED_MAX: usize = 32;

/// The `secrets` a spec asks for: at most [`REQUESTED_MAX`] names, each a
/// valid name, none twice.
pub fn check_requested(names: &[String]) -> Result<(), String> {
    if names.len() > REQUESTED_MAX {
        return Err(format!("secrets: at most {REQUESTED_MAX} names"));
    }
    for (i, name) in names.iter().enumerate() {
        check_name(name).map_err(|e| format!("secrets[{i}]: {e}"))?;
        if names[..i].contains(name) {
            return Err(format!("secrets[{i}]: {name} is named twice"));
        }
    }
    Ok(())
}

/// The names under a spec's `secrets` field (the kind's own check has
/// refused anything but a list of names); empty when there is none.
pub fn requested(spec: &serde_json::Value) -> Vec<String> {
    spec.get("secrets")
        .and_then(|v| v.as_array())
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .take(REQUESTED_MAX)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(n: u8) -> Fresh {
        Fresh {
            data_key: [n; KEY_BYTES],
            nonce: [n.wrapping_add(1); NONCE_BYTES],
            wrap_nonce: [n.wrapping_add(2); NONCE_BYTES],
        }
    }

    #[test]
    fn a_sealed_value_opens_only_where_it_was_sealed() {
        let master = MasterKey::new([7; KEY_BYTES]);
        let at = ("acme", "db-password", 3);
        let sealed = seal(&master, at, b"hunter2", fresh(1));
        assert!(!sealed.ciphertext.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(open(&master, at, &sealed).unwrap(), b"hunter2");
        // Another row, version or tenant: the associated data differs.
        for other in [
            ("evil", "db-password", 3),
            ("acme", "other", 3),
            ("acme", "db-password", 2),
        ] {
            assert_eq!(open(&master, other, &sealed), Err(SecretError::Corrupt));
        }
        let mut flipped = sealed.clone();
        flipped.ciphertext[0] ^= 1;
        assert_eq!(open(&master, at, &flipped), Err(SecretError::Corrupt));
        let other = MasterKey::new([8; KEY_BYTES]);
        assert!(matches!(
            open(&other, at, &sealed),
            Err(SecretError::OtherMaster { .. })
        ));
    }

    #[test]
    fn rotation_rewraps_the_data_key_and_keeps_the_value() {
        let (old, new) = (
            MasterKey::new([1; KEY_BYTES]),
            MasterKey::new([2; KEY_BYTES]),
        );
        let at = ("acme", "token", 1);
        let sealed = seal(&old, at, b"s3cret-value", fresh(9));
        let moved = rewrap(&old, &new, at, &sealed, [5; NONCE_BYTES]).unwrap();
        assert_eq!(moved.ciphertext, sealed.ciphertext);
        assert_eq!(moved.master_id, new.id());
        assert_eq!(open(&new, at, &moved).unwrap(), b"s3cret-value");
        assert!(open(&old, at, &moved).is_err());
    }

    #[test]
    fn master_keys_round_trip_as_hex_and_show_only_their_id() {
        let key = MasterKey::new([0xab; KEY_BYTES]);
        let again = MasterKey::parse(&format!("{}\n", key.to_hex())).unwrap();
        assert_eq!(again.id(), key.id());
        assert!(MasterKey::parse("abcd").is_none());
        assert!(!format!("{key:?}").contains("abab"));
    }

    #[test]
    fn names_are_plain_file_names() {
        for good in ["db_password", "API-TOKEN", "a", "0x"] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a.b",
            "_x",
            "-x",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_spec_asks_for_a_bounded_list_of_names() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(check_requested(&names(&["a", "b-c"])), Ok(()));
        assert!(check_requested(&names(&["a", "a"]))
            .unwrap_err()
            .contains("twice"));
        assert!(check_requested(&names(&["../x"]))
            .unwrap_err()
            .contains("secrets[0]"));
        let many: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
        assert!(check_requested(&many).is_err());
        assert_eq!(
            requested(&serde_json::json!({"secrets": ["x", "y"]})),
            names(&["x", "y"])
        );
        assert!(requested(&serde_json::json!({"command": "x"})).is_empty());
    }
}
