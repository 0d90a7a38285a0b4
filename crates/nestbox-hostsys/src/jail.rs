//! A private root for one process (a VMM): its own mount namespace whose root is an empty
//! tmpfs holding only the files it was given, bound at their usual absolute paths, entered
//! with `pivot_root`; then its own unprivileged user, no capabilities and no way to gain
//! any. Started through [`crate::process::Cmd::jail`].
//!
//! ```text
//!   child, still root:  unshare(mount, ipc, uts) ─ / made private ─ tmpfs on `root`
//!     ─ for each entry: parents made, mount point made, bind (read-only unless writable)
//!     ─ proc (hidepid=invisible, subset=pid: the process sees only its own user's pids)
//!     ─ pivot_root(root) ─ old root detached
//!     ─ capability bounding set emptied ─ groups, gid, uid set ─ no_new_privs ─ exec
//! ```
//!
//! Invariants:
//! - nothing of the host is visible in the jail but what an entry names (and the
//!   process's own `/proc`); paths keep their host names, so command lines need no
//!   rewriting;
//! - everything the child does after the fork is an async-signal-safe system call on
//!   strings and buffers built before it ([`Prepared`]);
//! - a bind's source must exist when the command is built ([`Jail::prepare`] checks), so a
//!   missing file is reported with its name, not as an opaque spawn error.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// What the jail holds besides its (empty) root.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A file or directory of the host at the same path; read-only unless `writable`.
    Bind { path: PathBuf, writable: bool },
    /// A symbolic link (`/lib64 -> usr/lib64` on a merged-/usr system).
    Symlink { path: PathBuf, target: PathBuf },
}

/// A jail for one process.
#[derive(Debug, Clone)]
pub struct Jail {
    root: PathBuf,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    entries: Vec<Entry>,
}

/// A jail that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A path is relative or climbs (`..`).
    #[error("jail path {} must be absolute and normal", path.display())]
    BadPath {
        /// The path.
        path: PathBuf,
    },
    /// A bind's source cannot be used.
    #[error("cannot put {} in the jail", path.display())]
    Source {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process would keep root.
    #[error("a jailed process must not run as root")]
    Root,
}

/// The host directories of a program and its shared libraries: `/usr` and, where they are
/// directories rather than links into `/usr`, the old top-level ones.
const SYSTEM_DIRS: &[&str] = &["/usr", "/lib", "/lib64", "/bin", "/sbin"];
/// Host files a dynamically linked program may read at start.
const SYSTEM_FILES: &[&str] = &["/etc/ld.so.cache"];
/// Device nodes every jail gets.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom"];

impl Jail {
    /// A jail mounted on `root` (an empty directory of the host: the tmpfs goes over it in
    /// the child's own mount namespace only) for a process running as `uid`:`gid`.
    pub fn new(root: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        Self {
            root: root.into(),
            uid,
            gid,
            groups: Vec::new(),
            entries: Vec::new(),
        }
    }

    /// Adds what a dynamically linked program of the host needs to start: `/usr` (and the
    /// top-level library and binary directories, as links or read-only binds like the
    /// host has them), the loader cache and `/dev/{null,zero,urandom}`.
    pub fn with_system(mut self) -> Self {
        for dir in SYSTEM_DIRS {
            let path = Path::new(dir);
            match std::fs::read_link(path) {
                Ok(target) => self.entries.push(Entry::Symlink {
                    path: path.into(),
                    target,
                }),
                Err(_) if path.is_dir() => self = self.bind(path, false),
                Err(_) => {}
            }
        }
        for file in SYSTEM_FILES {
            if Path::new(file).exists() {
                self = self.bind(file, false);
            }
        }
        for dev in DEVICES {
            self = self.bind(dev, true);
        }
        self
    }

    /// Binds the host's `path` at the same path, writable or read-only.
    pub fn bind(mut self, path: impl Into<PathBuf>, writable: bool) -> Self {
        let path = path.into();
        if !self
            .entries
            .iter()
            .any(|e| matches!(e, Entry::Bind { path: p, .. } if *p == path))
        {
            self.entries.push(Entry::Bind { path, writable });
        }
        self
    }

    /// Adds a supplementary group (e.g. the owner group of `/dev/kvm`).
    pub fn group(mut self, gid: u32) -> Self {
        self.groups.push(gid);
        self
    }

    /// The user the process runs as.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The paths bound into the jail, with whether each is writable.
    pub fn binds(&self) -> impl Iterator<Item = (&Path, bool)> {
        self.entries.iter().filter_map(|e| match e {
            Entry::Bind { path, writable } => Some((path.as_path(), *writable)),
            Entry::Symlink { .. } => None,
        })
    }

    /// Checks the jail and builds everything the child needs, before the fork.
    pub(crate) fn prepare(&self) -> Result<Prepared, JailError> {
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::Root);
        }
        let root = checked(&self.root)?;
        let mut steps: Vec<Step> = Vec::new();
        let mut made: Vec<PathBuf> = Vec::new();
        let mut parents = |path: &Path, steps: &mut Vec<Step>| -> Result<(), JailError> {
            let mut at = PathBuf::from("/");
            let comps: Vec<_> = path.components().skip(1).collect();
            for c in comps.iter().take(comps.len().saturating_sub(1)) {
                at.push(c);
                if !made.contains(&at) {
                    made.push(at.clone());
                    steps.push(Step::Mkdir(cstr(&inside(&root, &at))?));
                }
            }
            Ok(())
        };
        for entry in &self.entries {
            match entry {
                Entry::Bind { path, writable } => {
                    let path = checked(path)?;
                    let meta = std::fs::metadata(&path).map_err(|source| JailError::Source {
                        path: path.clone(),
                        source,
                    })?;
                    parents(&path, &mut steps)?;
                    let target = cstr(&inside(&root, &path))?;
                    if meta.is_dir() {
                        steps.push(Step::Mkdir(target.clone()));
                    } else {
                        steps.push(Step::Touch(target.clone()));
                    }
                    steps.push(Step::Bind {
                        source: cstr(&path)?,
                        target,
                        writable: *writable,
                    });
                }
                Entry::Symlink { path, target } => {
                    let path = checked(path)?;
                    parents(&path, &mut steps)?;
                    steps.push(Step::Symlink {
                        target: cstr(target)?,
                        path: cstr(&inside(&root, &path))?,
                    });
                }
            }
        }
        Ok(Prepared {
            root: cstr(&root)?,
            proc_dir: cstr(&root.join("proc"))?,
            steps,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.iter().map(|g| *g as libc::gid_t).collect(),
        })
    }
}

/// `path` if it is absolute with no `.`/`..` components.
fn checked(path: &Path) -> Result<PathBuf, JailError> {
    let normal = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if normal {
        Ok(path.to_path_buf())
    } else {
        Err(JailError::BadPath { path: path.into() })
    }
}

/// Where the host's absolute `path` is under `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn cstr(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::BadPath { path: path.into() })
}

/// One mount-namespace step in the child.
#[derive(Debug)]
enum Step {
    Mkdir(CString),
    Touch(CString),
    Bind {
        source: CString,
        target: CString,
        writable: bool,
    },
    Symlink {
        target: CString,
        path: CString,
    },
}

/// A jail ready for the child: only system calls remain.
#[derive(Debug)]
pub(crate) struct Prepared {
    root: CString,
    proc_dir: CString,
    steps: Vec<Step>,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Prepared {
    /// Enters the jail. Runs in the forked child before exec: async-signal-safe system
    /// calls only, no allocation.
    pub(crate) fn enter(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        let tmpfs = c"tmpfs";
        let slash = c"/";
        let dot = c".";
        // SAFETY: system calls on NUL-terminated strings built before the fork and
        // buffers owned by `self`; none of them allocates.
        unsafe {
            check(libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
            ))?;
            check(libc::mount(
                null,
                slash.as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                tmpfs.as_ptr(),
                self.root.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=0755,size=64k".as_ptr().cast(),
            ))?;
            for step in &self.steps {
                match step {
                    Step::Mkdir(p) => {
                        if libc::mkdir(p.as_ptr(), 0o755) < 0
                            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Step::Touch(p) => {
                        let fd = libc::open(
                            p.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o600,
                        );
                        check(fd)?;
                        libc::close(fd);
                    }
                    Step::Bind {
                        source,
                        target,
                        writable,
                    } => {
                        check(libc::mount(
                            source.as_ptr(),
                            target.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ))?;
                        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
                        if !writable {
                            flags |= libc::MS_RDONLY;
                        }
                        check(libc::mount(
                            null,
                            target.as_ptr(),
                            null,
                            flags,
                            std::ptr::null(),
                        ))?;
                    }
                    Step::Symlink { target, path } => {
                        check(libc::symlink(target.as_ptr(), path.as_ptr()))?;
                    }
                }
            }
            if libc::mkdir(self.proc_dir.as_ptr(), 0o555) < 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                return Err(std::io::Error::last_os_error());
            }
            check(libc::mount(
                c"proc".as_ptr(),
                self.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"hidepid=invisible,subset=pid".as_ptr().cast(),
            ))?;
            check(libc::chdir(self.root.as_ptr()))?;
            // pivot_root(".", "."): the old root ends up stacked on the new one and is
            // then detached.
            check(libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int)?;
            check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(slash.as_ptr()))?;
            // The root tmpfs itself becomes read-only: only writable binds can be written.
            check(libc::mount(
                null,
                slash.as_ptr(),
                null,
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                std::ptr::null(),
            ))?;
            for cap in 0..64 {
                // EINVAL past the kernel's last capability.
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            check(libc::setresgid(self.gid, self.gid, self.gid))?;
            // Leaving uid 0 clears the permitted, effective and ambient capabilities.
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// A `struct ifreq` asking `TUNSETIFF` for the TAP device `name` with QEMU's flags (no
/// packet information, virtio-net headers), built before the fork.
pub(crate) fn tap_request(name: &str) -> Option<[u8; 40]> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    let mut ifr = [0u8; 40];
    ifr[..bytes.len()].copy_from_slice(bytes);
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    ifr[libc::IFNAMSIZ..libc::IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    Some(ifr)
}

/// Opens the TAP device `ifr` names in the current network namespace. Async-signal-safe.
pub(crate) fn open_tap(ifr: &[u8; 40]) -> std::io::Result<libc::c_int> {
    // SAFETY: open and ioctl on a buffer owned by the caller; the fd is closed on error.
    unsafe {
        let fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        check(fd)?;
        if libc::ioctl(fd, TUNSETIFF, ifr.as_ptr()) < 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_normal() {
        for bad in ["relative", "/a/../b", "./a"] {
            let err = Jail::new("/tmp", 1000, 1000)
                .bind(bad, false)
                .prepare()
                .unwrap_err();
            assert!(matches!(err, JailError::BadPath { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn root_is_refused_and_missing_sources_are_named() {
        assert!(matches!(
            Jail::new("/tmp", 0, 1000).prepare(),
            Err(JailError::Root)
        ));
        let err = Jail::new("/tmp", 1000, 1000)
            .bind("/nonexistent/nestbox", false)
            .prepare()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/nestbox"), "{err}");
    }

    #[test]
    fn parents_are_made_once_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.txt");
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let p = Jail::new("/jail", 1000, 1000)
            .bind(&a, true)
            .bind(&b, false)
            .bind(&a, false)
            .prepare()
            .unwrap();
        let mkdirs: Vec<_> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Mkdir(p) => Some(p.to_str().unwrap().to_string()),
                _ => None,
            })
            .collect();
        let depth = dir.path().components().count() - 1;
        assert_eq!(mkdirs.len(), depth, "{mkdirs:?}");
        assert!(mkdirs.windows(2).all(|w| w[1].starts_with(&w[0])));
        let binds: Vec<_> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Bind {
                    target, writable, ..
                } => Some((target.to_str().unwrap().to_string(), *writable)),
                _ => None,
            })
            .collect();
        assert_eq!(
            binds,
            vec![
                (format!("/jail{}", a.display()), true),
                (format!("/jail{}", b.display()), false)
            ]
        );
    }

    /// A real jail (needs root): the process runs as its user with no capabilities, sees
    /// only its binds (writable ones writable), its own `/proc` entries and the
    /// descriptor handed to it.
    #[tokio::test]
    async fn a_jailed_process_sees_only_its_files_and_has_no_privilege() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let rw = dir.path().join("rw.txt");
        let ro = dir.path().join("ro.txt");
        let hidden = dir.path().join("hidden.txt");
        std::fs::create_dir(&root).unwrap();
        for f in [&rw, &ro, &hidden] {
            std::fs::write(f, "host\n").unwrap();
        }
        std::os::unix::fs::chown(&rw, Some(4242), Some(4242)).unwrap();
        let passed = tempfile::tempfile().unwrap();
        use std::io::Write as _;
        (&passed).write_all(b"passed\n").unwrap();
        let script = format!(
            "id -u; id -g; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status; \
             echo jailed >> {rw}; echo no >> {ro} 2>/dev/null || echo ro-refused; \
             test -e {hidden} || echo hidden-absent; test -e /etc/passwd || echo passwd-absent; \
             head -c 7 /proc/self/fd/5; echo; ls /proc | grep -c '^[0-9]'",
            rw = rw.display(),
            ro = ro.display(),
            hidden = hidden.display()
        );
        let out = crate::process::Cmd::new("/bin/sh")
            .args(["-c", &script])
            .pass_fd(passed.into(), 5)
            .jail(
                Jail::new(&root, 4242, 4242)
                    .with_system()
                    .bind(&rw, true)
                    .bind(&ro, false),
            )
            .run()
            .await
            .unwrap();
        let text = out.stdout_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(&lines[..2], ["4242", "4242"], "{text}");
        for cap in ["CapEff:\t0000000000000000", "CapPrm:\t0000000000000000"] {
            assert!(text.contains(cap), "{text}");
        }
        assert!(text.contains("CapBnd:\t0000000000000000"), "{text}");
        assert!(text.contains("NoNewPrivs:\t1"), "{text}");
        for line in ["ro-refused", "hidden-absent", "passwd-absent", "passed"] {
            assert!(lines.contains(&line), "{line} missing from {text}");
        }
        // Only its own processes: the shell (and the pipeline's commands).
        let pids: u32 = lines.last().unwrap().parse().unwrap();
        assert!(pids <= 3, "{text}");
        assert_eq!(std::fs::read_to_string(&rw).unwrap(), "host\njailed\n");
        assert_eq!(std::fs::read_to_string(&ro).unwrap(), "host\n");
        // Nothing of the jail is left on the host.
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }

    #[test]
    fn tap_requests_carry_the_name_and_flags() {
        let ifr = tap_request("tap0").unwrap();
        assert_eq!(&ifr[..5], b"tap0\0");
        let flags = i16::from_ne_bytes([ifr[16], ifr[17]]);
        assert_eq!(
            i32::from(flags),
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR
        );
        assert!(tap_request("").is_none());
        assert!(tap_request("a-name-far-too-long").is_none());
    }
}
