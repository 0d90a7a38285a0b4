//! Control groups: one per VMM, with CPU, memory, process-count and I/O limits set from
//! its sandbox's size, so a sandbox uses what it was given and no more and a noisy one
//! cannot starve the host or its neighbours.
//!
//! Both kernels' interfaces are supported, found in `/proc/self/mountinfo`:
//! - **cgroup v2** (unified), when its root offers the `cpu`, `memory` and `pids`
//!   controllers: one directory per group, the controllers enabled down the path
//!   (`cgroup.subtree_control`), limits in `cpu.max`, `cpu.weight`, `memory.max`,
//!   `pids.max` and `io.weight` (where the I/O scheduler offers it);
//! - **cgroup v1**, when `cpu`, `memory` and `pids` are mounted as v1 hierarchies (each
//!   maybe co-mounted with others): one directory per group in each, limits in
//!   `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `cpu.shares`, `memory.limit_in_bytes`,
//!   `pids.max`, and `blkio.weight` where present.
//!
//! A process joins its group before it runs anything: [`crate::process::Cmd::join_cgroups`]
//! writes `0` to each `cgroup.procs` in the child between fork and exec, so every page
//! and thread of the VMM is counted from the start.
//!
//! Invariants: groups live under a per-instance parent (`nestbox-<tag>`), so removing an
//! instance's leftovers never touches another's; a group is removed (every hierarchy)
//! once its process has exited, and [`Hierarchy::sweep`] removes the empty groups a
//! crash left.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A cgroup operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A directory or file of a group could not be made or written.
    #[error("cgroup {}: cannot {op}", path.display())]
    Io {
        /// What we tried.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The limits of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per period, in thousandths of a CPU (1500 = one and a half CPUs).
    pub cpu_millis: u32,
    /// Relative CPU weight under contention (v1 shares; 1024 = one CPU's worth).
    pub cpu_shares: u32,
    /// Memory (resident, page cache and tmpfs pages it faults in), bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u32,
    /// Relative I/O weight (10–1000, 100 = default), where the scheduler offers one.
    pub io_weight: u16,
}

/// The CFS period the CPU limit is expressed in, microseconds.
const CPU_PERIOD_US: u64 = 100_000;
/// Controllers a group needs.
const REQUIRED: [&str; 3] = ["cpu", "memory", "pids"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// Each controller's mount point (`blkio` optional).
    V1(Vec<(&'static str, PathBuf)>),
    /// The unified hierarchy's root.
    V2(PathBuf),
}

/// The host's cgroup hierarchy that groups are made in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    kind: Kind,
}

/// One group: its directory in every hierarchy it spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    dirs: Vec<PathBuf>,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { op, path, source }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io("write", path))
}

impl Hierarchy {
    /// The host's usable hierarchy: v2 when its root offers the controllers, else v1
    /// when they are mounted; `None` when neither (then VMMs cannot be confined).
    pub fn detect() -> Option<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        Self::from_mountinfo(&mountinfo, Path::new("/"))
    }

    /// [`Hierarchy::detect`] from a `mountinfo` text, with mount points under `root`
    /// (tests point it at a scratch directory).
    pub fn from_mountinfo(mountinfo: &str, root: &Path) -> Option<Self> {
        let mut v1: Vec<(&'static str, PathBuf)> = Vec::new();
        let mut v2: Option<PathBuf> = None;
        for line in mountinfo.lines() {
            // `… mount-point options … - fstype source super-options`
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount = left.split_whitespace().nth(4).unwrap_or_default();
            let mut right = right.split_whitespace();
            let fstype = right.next().unwrap_or_default();
            let options = right.nth(1).unwrap_or_default();
            let at = root.join(mount.trim_start_matches('/'));
            match fstype {
                "cgroup2" => v2 = Some(at),
                "cgroup" => {
                    for c in ["cpu", "memory", "pids", "blkio"] {
                        if options.split(',').any(|o| o == c) && !v1.iter().any(|(n, _)| *n == c) {
                            v1.push((c, at.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(root) = v2 {
            let offered =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let offered: Vec<&str> = offered.split_whitespace().collect();
            if REQUIRED.iter().all(|c| offered.contains(c)) {
                return Some(Self {
                    kind: Kind::V2(root),
                });
            }
        }
        REQUIRED
            .iter()
            .all(|c| v1.iter().any(|(n, _)| n == c))
            .then_some(Self { kind: Kind::V1(v1) })
    }

    /// `cgroup v2` or `cgroup v1`, for logs.
    pub fn describe(&self) -> &'static str {
        match self.kind {
            Kind::V1(_) => "cgroup v1",
            Kind::V2(_) => "cgroup v2",
        }
    }

    /// The group at `path` (relative, e.g. `nestbox-<tag>/<vm>`), without creating it.
    pub fn group(&self, path: &Path) -> Group {
        let dirs = match &self.kind {
            Kind::V1(mounts) => {
                let mut seen: Vec<PathBuf> = Vec::new();
                for (_, m) in mounts {
                    // Co-mounted controllers share one directory.
                    let d = m.join(path);
                    if !seen.contains(&d) {
                        seen.push(d);
                    }
                }
                seen
            }
            Kind::V2(root) => vec![root.join(path)],
        };
        Group { dirs }
    }

    /// Creates the group at `path` with `limits` (replacing the limits of one that
    /// exists). On failure what was created is removed.
    pub fn create(&self, path: &Path, limits: &Limits) -> Result<Group, CgroupError> {
        let group = self.group(path);
        let made = self.make(path, &group, limits);
        if made.is_err() {
            let _ = group.remove();
        }
        made.map(|()| group)
    }

    fn make(&self, path: &Path, group: &Group, limits: &Limits) -> Result<(), CgroupError> {
        let quota = u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000;
        match &self.kind {
            Kind::V2(root) => {
                // Every level down to the group's parent hands the controllers on.
                let mut dir = root.clone();
                let enable = "+cpu +memory +pids";
                write(&dir.join("cgroup.subtree_control"), enable)?;
                let parents: Vec<_> = path
                    .parent()
                    .map(|p| p.components().collect())
                    .unwrap_or_default();
                for part in parents {
                    dir = dir.join(part);
                    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
                    write(&dir.join("cgroup.subtree_control"), enable)?;
                }
                let d = &group.dirs[0];
                std::fs::create_dir_all(d).map_err(io("create", d))?;
                write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                // cgroup v2 weights run 1–10000, 100 being v1's 1024 shares.
                let weight = (u64::from(limits.cpu_shares) * 100 / 1024).clamp(1, 10_000);
                write(&d.join("cpu.weight"), &weight.to_string())?;
                write(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
                write(&d.join("pids.max"), &limits.pids.to_string())?;
                let io_weight = d.join("io.weight");
                if io_weight.exists() {
                    write(&io_weight, &format!("default {}", limits.io_weight))?;
                }
            }
            Kind::V1(_) => {
                for d in &group.dirs {
                    std::fs::create_dir_all(d).map_err(io("create", d))?;
                }
                let file =
                    |name: &str| group.dirs.iter().map(|d| d.join(name)).find(|p| p.exists());
                let set = |name: &str, value: String| match file(name) {
                    Some(p) => write(&p, &value),
                    None => Err(CgroupError::Io {
                        op: "find",
                        path: group.dirs[0].join(name),
                        source: std::io::ErrorKind::NotFound.into(),
                    }),
                };
                set("cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
                set("cpu.cfs_quota_us", quota.to_string())?;
                set("cpu.shares", limits.cpu_shares.max(2).to_string())?;
                set("memory.limit_in_bytes", limits.memory_bytes.to_string())?;
                set("pids.max", limits.pids.to_string())?;
                if let Some(p) = file("blkio.weight") {
                    write(&p, &limits.io_weight.clamp(10, 1000).to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Removes the empty groups under `parent` whose names are not in `keep` (what a
    /// crash left). Groups that still hold a process stay.
    pub fn sweep(&self, parent: &Path, keep: &HashSet<String>) -> usize {
        let mut removed = 0;
        let roots: Vec<PathBuf> = self.group(parent).dirs;
        let mut names: HashSet<String> = HashSet::new();
        for root in &roots {
            if let Ok(entries) = std::fs::read_dir(root) {
                names.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .filter_map(|e| e.file_name().to_str().map(String::from)),
                );
            }
        }
        for name in names.difference(keep) {
            if self.group(&parent.join(name)).remove().is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

impl Group {
    /// Its `cgroup.procs` files (one per hierarchy): a process writing `0` to each joins
    /// the group.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Its directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Removes the group (its processes must have exited); a group already gone is not an
    /// error.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut first = None;
        for d in &self.dirs {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    first.get_or_insert(CgroupError::Io {
                        op: "remove",
                        path: d.clone(),
                        source: e,
                    });
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "\
35 25 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
37 35 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
38 35 0:33 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
39 35 0:34 / /sys/fs/cgroup/blkio rw - cgroup cgroup rw,blkio
40 35 0:35 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";

    fn limits() -> Limits {
        Limits {
            cpu_millis: 1500,
            cpu_shares: 1024,
            memory_bytes: 768 << 20,
            pids: 512,
            io_weight: 100,
        }
    }

    #[test]
    fn v1_groups_get_every_limit_and_go_away() {
        let root = tempfile::tempdir().unwrap();
        for c in ["cpu", "memory", "pids", "blkio", "unified"] {
            std::fs::create_dir_all(root.path().join("sys/fs/cgroup").join(c)).unwrap();
        }
        // The unified hierarchy offers no controllers: v1 it is.
        std::fs::write(
            root.path().join("sys/fs/cgroup/unified/cgroup.controllers"),
            "",
        )
        .unwrap();
        let h = Hierarchy::from_mountinfo(V1, root.path()).unwrap();
        assert_eq!(h.describe(), "cgroup v1");
        let cg = root.path().join("sys/fs/cgroup");
        // The kernel makes the interface files; the fake makes them as it goes.
        let g = h.group(Path::new("nestbox-t/vm1"));
        for d in g.dirs() {
            std::fs::create_dir_all(d).unwrap();
        }
        for (c, f) in [
            ("cpu", "cpu.cfs_period_us"),
            ("cpu", "cpu.cfs_quota_us"),
            ("cpu", "cpu.shares"),
            ("memory", "memory.limit_in_bytes"),
            ("pids", "pids.max"),
            ("blkio", "blkio.weight"),
        ] {
            std::fs::write(cg.join(c).join("nestbox-t/vm1").join(f), "").unwrap();
        }
        let g = h.create(Path::new("nestbox-t/vm1"), &limits()).unwrap();
        let read = |c: &str, f: &str| {
            std::fs::read_to_string(cg.join(c).join("nestbox-t/vm1").join(f)).unwrap()
        };
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "150000");
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (768u64 << 20).to_string()
        );
        assert_eq!(read("pids", "pids.max"), "512");
        assert_eq!(read("blkio", "blkio.weight"), "100");
        assert_eq!(g.procs_files().len(), 4);
        // The kernel's files vanish with the directory; the fake's must go first.
        for d in g.dirs() {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        g.remove().unwrap();
        assert!(g.dirs().iter().all(|d| !d.exists()));
        g.remove().unwrap();
    }

    #[test]
    fn v2_is_chosen_when_it_offers_the_controllers() {
        let root = tempfile::tempdir().unwrap();
        let unified = root.path().join("sys/fs/cgroup/unified");
        std::fs::create_dir_all(&unified).unwrap();
        std::fs::write(
            unified.join("cgroup.controllers"),
            "cpuset cpu io memory pids",
        )
        .unwrap();
        let h = Hierarchy::from_mountinfo(V1, root.path()).unwrap();
        assert_eq!(h.describe(), "cgroup v2");
        let g = h.create(Path::new("nestbox-t/vm1"), &limits()).unwrap();
        let d = &g.dirs()[0];
        assert_eq!(
            std::fs::read_to_string(d.join("cpu.max")).unwrap(),
            "150000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("cpu.weight")).unwrap(),
            "100"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("memory.max")).unwrap(),
            (768u64 << 20).to_string()
        );
        assert_eq!(std::fs::read_to_string(d.join("pids.max")).unwrap(), "512");
        for dir in [unified.clone(), unified.join("nestbox-t")] {
            assert_eq!(
                std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap(),
                "+cpu +memory +pids"
            );
        }
    }

    #[test]
    fn no_controllers_no_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        let only_v2 = "40 35 0:35 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        std::fs::create_dir_all(root.path().join("sys/fs/cgroup")).unwrap();
        std::fs::write(root.path().join("sys/fs/cgroup/cgroup.controllers"), "").unwrap();
        assert_eq!(Hierarchy::from_mountinfo(only_v2, root.path()), None);
        assert_eq!(Hierarchy::from_mountinfo("", root.path()), None);
    }

    #[test]
    fn sweep_removes_only_unknown_empty_groups() {
        let root = tempfile::tempdir().unwrap();
        let unified = root.path().join("sys/fs/cgroup/unified");
        std::fs::create_dir_all(&unified).unwrap();
        std::fs::write(unified.join("cgroup.controllers"), "cpu memory pids").unwrap();
        let h = Hierarchy::from_mountinfo(V1, root.path()).unwrap();
        for name in ["keep", "gone"] {
            std::fs::create_dir_all(unified.join("nestbox-t").join(name)).unwrap();
        }
        let keep: HashSet<String> = ["keep".to_string()].into();
        assert_eq!(h.sweep(Path::new("nestbox-t"), &keep), 1);
        assert!(unified.join("nestbox-t/keep").exists());
        assert!(!unified.join("nestbox-t/gone").exists());
    }
}
