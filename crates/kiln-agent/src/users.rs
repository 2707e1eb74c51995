//! Users and groups, read from the guest's own /etc/passwd and /etc/group:
//! a static binary has no NSS, and these files are all an image has.
//! `KILN_AGENT_ETC` points the agent at another directory (for tests, which
//! must not touch the host's /etc).

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

/// Read no more of either file than this: the guest's files are not
/// trusted to be small.
const ETC_MAX: u64 = 4 << 20;
/// The kernel's NGROUPS_MAX; setgroups(2) refuses more.
const GROUPS_MAX: usize = 65_536;

#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

fn etc(file: &str) -> PathBuf {
    std::env::var_os("KILN_AGENT_ETC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc"))
        .join(file)
}

/// The records of an /etc database, split at ':'; none when it is missing.
fn records(file: &str) -> Vec<Vec<String>> {
    let mut text = Vec::new();
    if let Ok(f) = std::fs::File::open(etc(file)) {
        let _ = f.take(ETC_MAX).read_to_end(&mut text);
    }
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split(':').map(str::to_string).collect())
        .collect()
}

fn id(field: Option<&String>) -> Option<u32> {
    field?.parse().ok()
}

/// The first user of that name, as getpwnam(3) would find it.
pub fn lookup(name: &str) -> Option<User> {
    records("passwd").into_iter().find_map(|fields| {
        if fields.first().map(String::as_str) != Some(name) {
            return None;
        }
        Some(User {
            name: name.to_string(),
            uid: id(fields.get(2))?,
            gid: id(fields.get(3))?,
            home: fields.get(5).cloned().unwrap_or_default(),
        })
    })
}

/// The user as a lookup error the protocol reports as invalid.
pub fn require(name: &str) -> std::io::Result<User> {
    lookup(name).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no user {name}"))
    })
}

/// The user's primary group, then every group that lists them.
pub fn groups(user: &User) -> Vec<libc::gid_t> {
    let mut groups = vec![user.gid];
    for fields in records("group") {
        let Some(gid) = id(fields.get(2)) else {
            continue;
        };
        let member = fields
            .get(3)
            .is_some_and(|members| members.split(',').any(|m| m == user.name));
        if member && !groups.contains(&gid) {
            groups.push(gid);
            if groups.len() == GROUPS_MAX {
                break;
            }
        }
    }
    groups
}

/// Names of owners and groups, read once for a listing of many entries.
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    pub fn load() -> Names {
        let table = |file| {
            let mut table = HashMap::new();
            for fields in records(file) {
                if let (Some(name), Some(id)) = (fields.first(), id(fields.get(2))) {
                    // The first of an id wins, as with getpwuid(3).
                    table.entry(id).or_insert_with(|| name.clone());
                }
            }
            table
        };
        Names {
            users: table("passwd"),
            groups: table("group"),
        }
    }

    pub fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    pub fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}
