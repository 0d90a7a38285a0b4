//! Users and groups, read from `/etc/passwd` and `/etc/group` directly.
//!
//! The guest is a static glibc binary, where NSS (`getpwnam`) cannot load its modules, so
//! the files are parsed here. A [`UserDb`] is a snapshot: callers load it per request, which
//! keeps users added inside the sandbox (`useradd`) visible without a cache to invalidate.

use std::path::PathBuf;

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";

/// A user a process can run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell (`/bin/sh` when the entry names none).
    pub shell: String,
    /// Supplementary groups, including the primary one.
    pub groups: Vec<u32>,
}

/// Why a user cannot be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// No entry of that name.
    #[error("user {name:?} does not exist")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// The user database cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

#[derive(Debug, Clone)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// A snapshot of the user and group databases.
#[derive(Debug, Clone, Default)]
pub struct UserDb {
    users: Vec<PasswdEntry>,
    groups: Vec<GroupEntry>,
}

impl UserDb {
    /// Reads `/etc/passwd` and `/etc/group` (a missing group file is an empty one).
    pub fn load() -> Result<Self, UserError> {
        let passwd = std::fs::read_to_string(PASSWD).map_err(|source| UserError::Read {
            path: PASSWD,
            source,
        })?;
        let group = match std::fs::read_to_string(GROUP) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(UserError::Read {
                    path: GROUP,
                    source,
                });
            }
        };
        Ok(Self::parse(&passwd, &group))
    }

    /// Parses the two files' contents; malformed lines are skipped.
    pub fn parse(passwd: &str, group: &str) -> Self {
        let users = passwd
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() < 7 || f[0].is_empty() {
                    return None;
                }
                Some(PasswdEntry {
                    name: f[0].to_owned(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: f[5].to_owned(),
                    shell: f[6].to_owned(),
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() < 4 || f[0].is_empty() {
                    return None;
                }
                Some(GroupEntry {
                    name: f[0].to_owned(),
                    gid: f[2].parse().ok()?,
                    members: f[3]
                        .split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(str::to_owned)
                        .collect(),
                })
            })
            .collect();
        Self { users, groups }
    }

    fn user_from(&self, entry: &PasswdEntry) -> User {
        let mut groups = vec![entry.gid];
        for group in &self.groups {
            if group.members.contains(&entry.name) && !groups.contains(&group.gid) {
                groups.push(group.gid);
            }
        }
        User {
            name: entry.name.clone(),
            uid: entry.uid,
            gid: entry.gid,
            home: if entry.home.is_empty() {
                PathBuf::from("/")
            } else {
                PathBuf::from(&entry.home)
            },
            shell: if entry.shell.is_empty() {
                "/bin/sh".to_owned()
            } else {
                entry.shell.clone()
            },
            groups,
        }
    }

    /// The user called `name`.
    pub fn user(&self, name: &str) -> Result<User, UserError> {
        self.users
            .iter()
            .find(|u| u.name == name)
            .map(|e| self.user_from(e))
            .ok_or_else(|| UserError::NotFound {
                name: name.to_owned(),
            })
    }

    /// The first user with `uid`.
    pub fn user_by_uid(&self, uid: u32) -> Option<User> {
        self.users
            .iter()
            .find(|u| u.uid == uid)
            .map(|e| self.user_from(e))
    }

    /// The name of `uid`, or the number as text.
    pub fn user_name(&self, uid: u32) -> String {
        self.users
            .iter()
            .find(|u| u.uid == uid)
            .map_or_else(|| uid.to_string(), |u| u.name.clone())
    }

    /// The name of `gid`, or the number as text.
    pub fn group_name(&self, gid: u32) -> String {
        self.groups
            .iter()
            .find(|g| g.gid == gid)
            .map_or_else(|| gid.to_string(), |g| g.name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # comment\n\
        broken line\n\
        user:x:1000:1000::/home/user:\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nuser:x:1000:\nsudo:x:27:user,other\ndocker:x:999: user \n";

    #[test]
    fn parses_users_and_groups() {
        let db = UserDb::parse(PASSWD, GROUP);
        let user = db.user("user").unwrap();
        assert_eq!(user.uid, 1000);
        assert_eq!(user.home, PathBuf::from("/home/user"));
        assert_eq!(user.shell, "/bin/sh");
        assert_eq!(user.groups, vec![1000, 27, 999]);
        assert_eq!(db.user("root").unwrap().groups, vec![0]);
        assert!(matches!(db.user("ghost"), Err(UserError::NotFound { .. })));
        assert_eq!(db.user_name(65534), "nobody");
        assert_eq!(db.user_name(4242), "4242");
        assert_eq!(db.group_name(27), "sudo");
        assert_eq!(db.user_by_uid(0).unwrap().name, "root");
    }
}
