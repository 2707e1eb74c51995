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

/// The user a request names, as a lookup error the protocol reports as
/// invalid: an account's name, or as OCI images spell it, `uid`,
/// `uid:gid`, `name:group` or `name:gid`.
pub fn require(spec: &str) -> std::io::Result<User> {
    resolve(spec, &records("passwd"), &records("group"))
        .map_err(|message| std::io::Error::new(std::io::ErrorKind::InvalidInput, message))
}

/// [`require`] over the records of passwd and group. A name is looked up
/// as it is first (the first account of that name, as getpwnam(3) finds
/// it), so an account named by digits only is still found. A uid with an
/// account is that account; one without has gid 0 unless one is given
/// (as container runtimes do) and `/` as its home.
fn resolve(spec: &str, passwd: &[Vec<String>], group: &[Vec<String>]) -> Result<User, String> {
    let account = |test: &dyn Fn(&[String]) -> bool| {
        passwd.iter().filter(|f| test(f)).find_map(|fields| {
            Some(User {
                name: fields.first()?.clone(),
                uid: id(fields.get(2))?,
                gid: id(fields.get(3))?,
                home: fields.get(5).cloned().unwrap_or_default(),
            })
        })
    };
    if let Some(user) = account(&|f| f.first().map(String::as_str) == Some(spec)) {
        return Ok(user);
    }
    let (who, group_spec) = match spec.split_once(':') {
        Some((who, group)) => (who, Some(group)),
        None => (spec, None),
    };
    let mut user = match account(&|f| f.first().map(String::as_str) == Some(who)) {
        Some(user) => user,
        None => {
            let uid = numeric(who).ok_or_else(|| format!("no user {spec}"))?;
            account(&|f| id(f.get(2)) == Some(uid)).unwrap_or_else(|| User {
                name: uid.to_string(),
                uid,
                gid: 0,
                home: "/".into(),
            })
        }
    };
    if let Some(name) = group_spec {
        user.gid = numeric(name)
            .or_else(|| {
                group
                    .iter()
                    .find(|f| f.first().map(String::as_str) == Some(name))
                    .and_then(|f| id(f.get(2)))
            })
            .ok_or_else(|| format!("no group {name}"))?;
    }
    Ok(user)
}

/// A decimal id and nothing else (no sign, no spaces).
fn numeric(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Vec<Vec<String>> {
        text.lines()
            .map(|line| line.split(':').map(str::to_string).collect())
            .collect()
    }

    fn who(spec: &str) -> Result<(String, u32, u32, String), String> {
        let passwd = table(
            "root:x:0:0:root:/root:/bin/sh\n\
             user:x:1000:1000::/home/user:/bin/sh\n\
             42:x:4242:4242::/home/answer:/bin/sh",
        );
        let group = table("root:x:0:\nuser:x:1000:\nstaff:x:50:user");
        resolve(spec, &passwd, &group).map(|u| (u.name, u.uid, u.gid, u.home))
    }

    #[test]
    fn users_are_names_uids_and_groups_as_oci_images_spell_them() {
        let user =
            |name: &str, uid, gid, home: &str| Ok((name.to_string(), uid, gid, home.to_string()));
        assert_eq!(who("user"), user("user", 1000, 1000, "/home/user"));
        assert_eq!(who("root"), user("root", 0, 0, "/root"));
        // A uid with an account is that account.
        assert_eq!(who("1000"), user("user", 1000, 1000, "/home/user"));
        // Without one: gid 0 and / as home.
        assert_eq!(who("2000"), user("2000", 2000, 0, "/"));
        assert_eq!(who("2000:3000"), user("2000", 2000, 3000, "/"));
        assert_eq!(who("1000:50"), user("user", 1000, 50, "/home/user"));
        assert_eq!(who("user:staff"), user("user", 1000, 50, "/home/user"));
        assert_eq!(who("2000:staff"), user("2000", 2000, 50, "/"));
        // A name made of digits is the name first.
        assert_eq!(who("42"), user("42", 4242, 4242, "/home/answer"));
        for bad in [
            "nobody",
            "",
            ":",
            "user:",
            ":0",
            "user:nogroup",
            "-1",
            "+5",
            " 5",
            "4294967296",
            "1000:-1",
            "a:b:c",
        ] {
            assert!(who(bad).is_err(), "{bad:?}: {:?}", who(bad));
        }
    }
}
