//! The grammars of everything a request may name. Each is checked at the API
//! edge and again where the name is used (a path, a QEMU argument, a SQL
//! parameter, a metric label), so no caller can skip it. Names never become
//! shell words; the strictest grammar (`ident`) is the one that may become a
//! path component.

use std::fmt;

/// Why a name or a text value was refused; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} {problem}")]
pub struct InvalidName {
    pub what: String,
    pub problem: String,
}

fn refuse(what: &str, problem: impl fmt::Display) -> InvalidName {
    InvalidName {
        what: what.to_string(),
        problem: problem.to_string(),
    }
}

/// Longest name of any grammar here.
pub const NAME_MAX: usize = 64;
/// Longest path inside a guest.
pub const GUEST_PATH_MAX: usize = 4096;

/// Names that become a path component on the host: images, snapshots,
/// shapes. `[a-z0-9][a-z0-9-]{0,63}`: no dot, no slash, no quote, nothing a
/// shell or QEMU's option parser treats specially.
pub fn check_ident(what: &str, name: &str) -> Result<(), InvalidName> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(refuse(
            what,
            format_args!("must be 1 to {NAME_MAX} characters"),
        ));
    }
    let bytes = name.as_bytes();
    if !bytes[0].is_ascii_lowercase() && !bytes[0].is_ascii_digit() {
        return Err(refuse(
            what,
            "must start with a lowercase letter or a digit",
        ));
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return Err(refuse(what, "may hold only a-z, 0-9 and -"));
    }
    Ok(())
}

/// Kinds, queues, label keys and key names: `[A-Za-z0-9][A-Za-z0-9_.:@-]*`,
/// at most 64 bytes. These never become paths, but they do become SQL
/// parameters and (bounded) metric labels; no slash, so none can pose as one.
pub fn check_name(what: &str, name: &str) -> Result<(), InvalidName> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(refuse(
            what,
            format_args!("must be 1 to {NAME_MAX} characters"),
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(refuse(what, "must start with a letter or a digit"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
    {
        return Err(refuse(what, "may hold only letters, digits and _ - . : @"));
    }
    Ok(())
}

/// Free text stored in a database column (labels, idempotency keys, error
/// messages): bounded and without NUL, which PostgreSQL refuses in `text`.
pub fn check_text(what: &str, text: &str, max_bytes: usize) -> Result<(), InvalidName> {
    if text.len() > max_bytes {
        return Err(refuse(
            what,
            format_args!("is longer than {max_bytes} bytes"),
        ));
    }
    if text.contains('\0') {
        return Err(refuse(what, "contains a NUL character"));
    }
    Ok(())
}

/// A module id: `sha256:` and 64 lowercase hex digits.
pub fn check_module_id(what: &str, id: &str) -> Result<(), InvalidName> {
    let hex = id
        .strip_prefix("sha256:")
        .ok_or_else(|| refuse(what, "must be sha256:<64 hex digits>"))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(refuse(what, "must be sha256:<64 lowercase hex digits>"));
    }
    Ok(())
}

/// A path inside a guest: absolute, bounded, no NUL. It is handed to the
/// guest's agent as a value, never to a host path or a shell.
pub fn check_guest_path(what: &str, path: &str) -> Result<(), InvalidName> {
    if !path.starts_with('/') {
        return Err(refuse(what, "must be an absolute path"));
    }
    check_text(what, path, GUEST_PATH_MAX)
}

/// Whether any string or key inside a JSON value holds a NUL: PostgreSQL's
/// `jsonb` refuses `\u0000`, so such a value must be refused at the edge.
pub fn json_has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(json_has_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v))
        }
        _ => false,
    }
}

/// Replaces NUL and other control characters (but newline and tab) so a
/// message built from input can always be stored and shown; bounded.
pub fn sanitise_message(text: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_bytes));
    for c in text.chars() {
        let c = if c.is_control() && c != '\n' && c != '\t' {
            '\u{FFFD}'
        } else {
            c
        };
        if out.len() + c.len_utf8() > max_bytes {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(f: fn(&str, &str) -> Result<(), InvalidName>, input: &str, ok: bool) {
        assert_eq!(f("x", input).is_ok(), ok, "{input:?}");
    }

    #[test]
    fn idents_cannot_walk_or_quote() {
        check(check_ident, "default", true);
        check(check_ident, "python-3", true);
        check(check_ident, "0abc", true);
        check(check_ident, "", false);
        check(check_ident, "-x", false);
        check(check_ident, "..", false);
        check(check_ident, "../scratch", false);
        check(check_ident, "/tmp/x", false);
        check(check_ident, "a'b", false);
        check(check_ident, "a b", false);
        check(check_ident, "a,b", false);
        check(check_ident, "A", false);
        check(check_ident, "a\0", false);
        check(check_ident, &"a".repeat(65), false);
        check(check_ident, &"a".repeat(64), true);
    }

    #[test]
    fn names_allow_kinds_and_queues() {
        check(check_name, "vm:create", true);
        check(check_name, "vm@host-1", true);
        check(check_name, "emails.v2", true);
        check(check_name, "a/b", false);
        check(check_name, ".hidden", false);
        check(check_name, "a\0b", false);
        check(check_name, "a b", false);
        check(check_name, "", false);
    }

    #[test]
    fn module_ids_and_guest_paths() {
        check(check_module_id, &format!("sha256:{}", "a".repeat(64)), true);
        check(
            check_module_id,
            &format!("sha256:{}", "A".repeat(64)),
            false,
        );
        check(check_module_id, "sha256:abc", false);
        check(check_module_id, "../x", false);
        check(check_guest_path, "/tmp/x", true);
        check(check_guest_path, "tmp/x", false);
        check(check_guest_path, "/tmp/\0", false);
    }

    #[test]
    fn nul_is_found_anywhere_in_json() {
        assert!(!json_has_nul(&serde_json::json!({"a": ["b", {"c": 1}]})));
        assert!(json_has_nul(
            &serde_json::json!({"a": ["b", {"c": "\u{0}"}]})
        ));
        assert!(json_has_nul(&serde_json::json!({"a\u{0}": 1})));
    }

    #[test]
    fn sanitised_messages_are_storable_and_bounded() {
        assert_eq!(sanitise_message("a\0b\nc", 100), "a\u{FFFD}b\nc");
        assert_eq!(sanitise_message("abcdef", 3), "abc");
        assert_eq!(sanitise_message("ééé", 5), "éé");
    }
}
