//! API key scopes. Each scope includes the ones below it.
//!
//! `read`, `write`, `approve` and `admin` act inside the key's tenant:
//! `approve` decides pipeline approval steps (and can write), so who may
//! release is kept apart from who may submit. `system` is the
//! deployment's own scope (shared queues, `/metrics`, the worker list, other
//! tenants' keys): only the key kiln makes at first start holds it, and only
//! a `system` key can mint another.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Approve,
    Admin,
    System,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Approve => "approve",
            Scope::Admin => "admin",
            Scope::System => "system",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "approve" => Some(Scope::Approve),
            "admin" => Some(Scope::Admin),
            "system" => Some(Scope::System),
            _ => None,
        }
    }
}

/// The scopes a key carries; `allows` answers whether a request may proceed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes(pub Vec<Scope>);

impl Scopes {
    pub fn allows(&self, needed: Scope) -> bool {
        self.0.iter().any(|held| *held >= needed)
    }

    /// Comma-separated, as stored.
    pub fn to_text(&self) -> String {
        self.0
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn parse(text: &str) -> Option<Scopes> {
        text.split(',')
            .filter(|s| !s.is_empty())
            .map(Scope::parse)
            .collect::<Option<Vec<_>>>()
            .map(Scopes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_scopes_include_lower() {
        let write = Scopes(vec![Scope::Write]);
        assert!(write.allows(Scope::Read));
        assert!(write.allows(Scope::Write));
        assert!(!write.allows(Scope::Admin));
        assert!(!write.allows(Scope::Approve));
        assert!(Scopes(vec![Scope::Approve]).allows(Scope::Write));
        assert!(Scopes(vec![Scope::Admin]).allows(Scope::Approve));
        assert!(Scopes(vec![Scope::Admin]).allows(Scope::Write));
        assert!(!Scopes(vec![Scope::Admin]).allows(Scope::System));
        assert!(Scopes(vec![Scope::System]).allows(Scope::Admin));
        assert!(!Scopes(vec![]).allows(Scope::Read));
        assert_eq!(Scopes::parse("read,admin").unwrap().to_text(), "read,admin");
        assert!(Scopes::parse("read,root").is_none());
    }
}
