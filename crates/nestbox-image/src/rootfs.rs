//! Template root filesystems.
//!
//! Two stages, so a new guest binary only redoes the cheap one:
//!
//! 1. **base tree** (cached under `<cache>/rootfs/<key>/`, keyed by suite, mirror,
//!    variant, packages and [`TREE_VERSION`]): a bare `debootstrap` of the variant
//!    (itself cached, shared by all recipes), then the recipe's packages installed by
//!    the tree's own `apt-get` in a chroot of a copy (apt resolves and orders
//!    dependencies properly, which debootstrap's `--include` does not). Each tree then
//!    loses apt caches and lists, docs, man and info pages, and dpkg is kept from
//!    installing them again.
//! 2. **image** (every build): copy the tree, add the user `user` (uid 1000), hostname,
//!    hosts, a placeholder resolv.conf and `/usr/local/bin/nestbox-guest`, then pack it
//!    with `mkfs.ext4 -d` and shrink it ([`crate::ext4::pack`]).
//!
//! Both stages write into temporary directories and rename into place, so an interrupted
//! build leaves nothing half-written behind.
//!
//! Every use of a cached tree stamps it (`<key>.used` beside it, never inside: the tree is
//! copied into images). [`prune`] removes trees no build has used for [`TREE_MAX_IDLE`]
//! (old recipes, old suites or mirrors, old [`TREE_VERSION`]s) and scratch directories an
//! interrupted build left, never through a mount.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nestbox_hostsys::process::{Cmd, ProcessError};

use crate::ext4::{self, Ext4Info};
use crate::manifest::{Recipe, hash_json};
use crate::progress::{Progress, Step};
use crate::{ImageError, blocking};

/// Bumped when stage 1 changes.
const TREE_VERSION: u32 = 2;

/// A cached tree no build used for this long is removed by [`prune`].
pub const TREE_MAX_IDLE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A scratch directory of a build older than this was left by an interrupted build.
const SCRATCH_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Records that `tree` was used now (see the module docs).
fn stamp(tree: &Path) {
    let Some(name) = tree.file_name() else { return };
    let mut stamp = name.to_os_string();
    stamp.push(".used");
    let path = tree.with_file_name(stamp);
    if let Err(e) = std::fs::write(&path, b"") {
        tracing::warn!(path = %path.display(), error = %e, "stamping a cached tree");
    }
}

/// How long ago `path` was last modified (`None`: unknown, e.g. it is gone).
fn age(path: &Path) -> Option<Duration> {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
}

/// Removes from `cache_dir` the cached trees not in `keep` that no build used for
/// `max_idle` (by their stamp, or the tree itself if it has none) and the scratch
/// directories of builds interrupted more than a day ago (in `rootfs/` and `work/`).
/// Mounts below one are unmounted first; if any remains, it is left alone. Returns how
/// many were removed.
pub fn prune(cache_dir: &Path, keep: &[PathBuf], max_idle: Duration) -> usize {
    let mut removed = 0;
    let mut remove = |dir: &Path| {
        if !unmount_below(dir) {
            tracing::error!(dir = %dir.display(), "mounts remain below a stale cache directory; not deleting it");
            return;
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "removing a stale cache directory")
            }
        }
    };
    let entries = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let trees = cache_dir.join("rootfs");
    for path in entries(&trees) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if name.starts_with(".build-") {
            if is_dir && age(&path).is_some_and(|a| a > SCRATCH_MAX_AGE) {
                remove(&path);
            }
            continue;
        }
        if let Some(tree) = name.strip_suffix(".used") {
            // A stamp whose tree is gone.
            if !trees.join(tree).exists() {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if !is_dir || keep.contains(&path) {
            continue;
        }
        let stamp = trees.join(format!("{name}.used"));
        let idle = age(&stamp).or_else(|| age(&path));
        if idle.is_some_and(|a| a > max_idle) {
            remove(&path);
            let _ = std::fs::remove_file(&stamp);
        }
    }
    for path in entries(&cache_dir.join("work")) {
        let scratch = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("rootfs-"));
        if scratch && age(&path).is_some_and(|a| a > SCRATCH_MAX_AGE) {
            remove(&path);
        }
    }
    removed
}

/// The default unprivileged user (E2B's default user).
pub const USER_NAME: &str = "user";
/// Its uid and gid.
pub const USER_ID: u32 = 1000;

/// The cached tree for a recipe, built if missing: the bare debootstrap tree of its
/// variant, plus its packages installed with apt inside a copy of it.
pub(crate) async fn base_tree(
    cache_dir: &Path,
    mirror: &str,
    suite: &str,
    recipe: &Recipe,
    progress: &dyn Progress,
) -> Result<PathBuf, ImageError> {
    let bare = bare_tree(cache_dir, mirror, suite, &recipe.variant, progress).await?;
    if recipe.packages.is_empty() {
        return Ok(bare);
    }
    let key = hash_json(&(
        TREE_VERSION,
        suite,
        mirror,
        &recipe.variant,
        &recipe.packages,
    ));
    let root = cache_dir.join("rootfs");
    let tree = root.join(&key[..16]);
    let step = Step::start(
        progress,
        format!("apt-get install {}", recipe.packages.join(" ")),
    );
    if tree.join("etc/debian_version").exists() {
        step.cached();
        stamp(&tree);
        return Ok(tree);
    }
    let tmp = scratch(&root)?;
    let target = tmp.path().join("tree");
    Cmd::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&bare)
        .arg(&target)
        .timeout(Duration::from_secs(1800))
        .run()
        .await
        .map_err(ImageError::tool(format!("copy {}", bare.display())))?;
    let log = tmp.path().join("apt.log");
    let installed = install_packages(&target, &recipe.packages, &log, &step, mirror, suite).await;
    let unmounted = unmount_below(&target);
    installed?;
    if !unmounted {
        return Err(ImageError::Io {
            op: "unmount what the package install mounted in",
            path: target,
            source: std::io::Error::last_os_error(),
        });
    }
    slim(&target).await?;
    let _ = std::fs::rename(&log, target.join("var/log/nestbox-apt.log"));
    std::fs::rename(&target, &tree).map_err(ImageError::io("rename into place", &tree))?;
    stamp(&tree);
    step.done();
    Ok(tree)
}

/// The cached bare debootstrap tree of `variant`, built if missing.
async fn bare_tree(
    cache_dir: &Path,
    mirror: &str,
    suite: &str,
    variant: &str,
    progress: &dyn Progress,
) -> Result<PathBuf, ImageError> {
    let no_packages: &[String] = &[];
    let key = hash_json(&(TREE_VERSION, suite, mirror, variant, no_packages));
    let root = cache_dir.join("rootfs");
    let tree = root.join(&key[..16]);
    let step = Step::start(progress, format!("debootstrap {variant} {suite}"));
    if tree.join("etc/debian_version").exists() {
        step.cached();
        stamp(&tree);
        return Ok(tree);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(ImageError::NotRoot {
            what: "debootstrap",
        });
    }
    std::fs::create_dir_all(&root).map_err(ImageError::io("create", &root))?;
    let tmp = scratch(&root)?;
    let target = tmp.path().join("tree");
    let log = tmp.path().join("debootstrap.log");
    let cmd = Cmd::new("debootstrap")
        .arg(format!("--variant={variant}"))
        .arg(suite)
        .arg(&target)
        .arg(mirror)
        .new_session();
    run_streaming(&cmd, &log, &step, mirror, suite).await?;
    if !unmount_below(&target) {
        return Err(ImageError::Io {
            op: "unmount what debootstrap left mounted in",
            path: target,
            source: std::io::Error::last_os_error(),
        });
    }
    slim(&target).await?;
    // Keep the log next to the tree for later questions.
    let _ = std::fs::rename(&log, target.join("var/log/nestbox-debootstrap.log"));
    std::fs::rename(&target, &tree).map_err(ImageError::io("rename into place", &tree))?;
    stamp(&tree);
    step.done();
    Ok(tree)
}

fn scratch(root: &Path) -> Result<ScratchDir, ImageError> {
    std::fs::create_dir_all(root).map_err(ImageError::io("create", root))?;
    Ok(ScratchDir(Some(
        tempfile::Builder::new()
            .prefix(".build-")
            .tempdir_in(root)
            .map_err(ImageError::io("create a directory in", root))?,
    )))
}

/// Installs `packages` into `tree` with the tree's own apt, chrooted. Mounts /proc and
/// the host's /dev inside it (the caller unmounts everything below `tree`), lends it the
/// host's resolv.conf, and keeps package scripts from starting services.
async fn install_packages(
    tree: &Path,
    packages: &[String],
    log: &Path,
    step: &Step<'_>,
    mirror: &str,
    suite: &str,
) -> Result<(), ImageError> {
    {
        let tree = tree.to_path_buf();
        blocking(move || prepare_chroot(&tree)).await?;
    }
    let script = format!(
        "set -e\napt-get update\napt-get install -y --no-install-recommends {}\napt-get clean\n",
        packages.join(" ")
    );
    let cmd = Cmd::new("chroot")
        .arg(tree)
        .args(["/bin/sh", "-c", &script])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .new_session();
    let res = run_streaming(&cmd, log, step, mirror, suite).await;
    let _ = std::fs::remove_file(tree.join("usr/sbin/policy-rc.d"));
    res
}

fn prepare_chroot(tree: &Path) -> Result<(), ImageError> {
    use nix::mount::{MsFlags, mount};
    let proc_dir = tree.join("proc");
    let dev_dir = tree.join("dev");
    for d in [&proc_dir, &dev_dir] {
        std::fs::create_dir_all(d).map_err(ImageError::io("create", d))?;
    }
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| ImageError::io("mount proc on", &proc_dir)(e.into()))?;
    mount(
        Some("/dev"),
        &dev_dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| ImageError::io("bind /dev on", &dev_dir)(e.into()))?;
    let resolv = tree.join("etc/resolv.conf");
    let _ = std::fs::remove_file(&resolv);
    std::fs::copy("/etc/resolv.conf", &resolv).map_err(ImageError::io("copy", &resolv))?;
    let policy = tree.join("usr/sbin/policy-rc.d");
    std::fs::write(
        &policy,
        "#!/bin/sh\n# Added while building a Nestbox image.\nexit 101\n",
    )
    .map_err(ImageError::io("write", &policy))?;
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755))
        .map_err(ImageError::io("chmod", &policy))
}

/// A scratch directory that debootstrap may have mounted things into (/proc, /sys, and
/// in containers a bind mount of the host's /dev). Removal first unmounts everything
/// below it; if that fails the directory is left in place rather than deleting through a
/// mount into the host.
struct ScratchDir(Option<tempfile::TempDir>);

impl ScratchDir {
    fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map_or(Path::new("/nonexistent"), |t| t.path())
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Some(tmp) = self.0.take()
            && !unmount_below(tmp.path())
        {
            let kept = tmp.keep();
            tracing::error!(dir = %kept.display(), "mounts remain below a failed debootstrap; not deleting it");
        }
    }
}

/// Unmounts every mount at or below `dir`, deepest first. False if any remain. (Mount
/// points are listed by their real paths: `dir` is resolved first, through symlinks.)
fn unmount_below(dir: &Path) -> bool {
    let resolved = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let dir = resolved.as_path();
    let mounts = |dir: &Path| -> Vec<PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            // mountinfo escapes spaces and the like as octal (\040).
            .map(|p| PathBuf::from(p.replace("\\040", " ")))
            .filter(|p| p.starts_with(dir))
            .collect()
    };
    let mut found = mounts(dir);
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in &found {
        if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %m.display(), %e, "cannot unmount");
        }
    }
    mounts(dir).is_empty()
}

/// Runs a long tool with output to `log`, forwarding its `I:`/`W:`/`E:` lines as progress.
async fn run_streaming(
    cmd: &Cmd,
    log: &Path,
    step: &Step<'_>,
    mirror: &str,
    suite: &str,
) -> Result<(), ImageError> {
    let mut child = cmd
        .spawn(Some(log))
        .map_err(ImageError::tool(step.name()))?;
    let mut offset = 0usize;
    let mut forward = |final_pass: bool| {
        let Ok(text) = std::fs::read(log) else { return };
        let Some(new) = text.get(offset..) else {
            return;
        };
        // Only whole lines, unless the tool has exited.
        let end = if final_pass {
            new.len()
        } else {
            new.iter().rposition(|c| *c == b'\n').map_or(0, |p| p + 1)
        };
        for line in String::from_utf8_lossy(&new[..end]).lines() {
            if line.starts_with("I: ") || line.starts_with("W: ") || line.starts_with("E: ") {
                step.output(line);
            }
        }
        offset += end;
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(ImageError::tool(step.name()))?,
            _ = tokio::time::sleep(Duration::from_millis(250)) => forward(false),
        }
    };
    forward(true);
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read(log).unwrap_or_default();
    let stderr = nestbox_hostsys::process::tail(&text);
    let network = [
        "Failed getting release file",
        "Couldn't download",
        "Temporary failure",
        "Could not resolve",
        "unable to resolve",
        "Connection refused",
        "Invalid Release file",
    ];
    if let Some(line) = stderr
        .lines()
        .rev()
        .find(|l| network.iter().any(|n| l.contains(n)))
    {
        return Err(ImageError::MirrorUnreachable {
            mirror: mirror.into(),
            suite: suite.into(),
            detail: line.trim().to_string(),
        });
    }
    Err(ImageError::Tool {
        step: step.name().to_string(),
        source: ProcessError::Failed {
            argv: cmd.argv(),
            status,
            stderr,
        },
    })
}

/// Removes what a sandbox never needs from a fresh debootstrap tree.
async fn slim(tree: &Path) -> Result<(), ImageError> {
    let tree = tree.to_path_buf();
    blocking(move || {
        for dir in [
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/info",
        ] {
            empty_dir(&tree.join(dir))?;
        }
        for f in ["var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin"] {
            let _ = std::fs::remove_file(tree.join(f));
        }
        let partial = tree.join("var/cache/apt/archives/partial");
        std::fs::create_dir_all(&partial).map_err(ImageError::io("create", &partial))?;
        let cfg = tree.join("etc/dpkg/dpkg.cfg.d/01-nestbox-nodoc");
        if let Some(parent) = cfg.parent() {
            std::fs::create_dir_all(parent).map_err(ImageError::io("create", parent))?;
        }
        std::fs::write(
            &cfg,
            "# Sandboxes carry no documentation (added by nestbox-image).\n\
             path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n",
        )
        .map_err(ImageError::io("write", &cfg))
    })
    .await
}

/// Deletes a directory's contents (not the directory). Missing is fine.
fn empty_dir(dir: &Path) -> Result<(), ImageError> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let p = e.path();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let res = if is_dir {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        res.map_err(ImageError::io("remove", &p))?;
    }
    Ok(())
}

/// An account database of the tree (`/etc/passwd`, `group`, …) as text: empty when it is
/// missing or a symbolic link (which is never followed), refused when it is not text or
/// is huge.
fn read_db(path: &Path) -> Result<String, ImageError> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Ok(String::new());
    }
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(ImageError::io("read", path)(e)),
        Ok(m) if m.len() > 4 << 20 => Err(ImageError::BadTree(format!(
            "/etc/{} is larger than 4 MiB",
            path.file_name().unwrap_or_default().to_string_lossy()
        ))),
        Ok(_) => {
            let bytes = std::fs::read(path).map_err(ImageError::io("read", path))?;
            String::from_utf8(bytes).map_err(|_| {
                ImageError::BadTree(format!(
                    "/etc/{} is not UTF-8 text",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ))
            })
        }
    }
}

/// Appends a line to a file unless a line with the same first field exists. A symbolic
/// link in the file's place is replaced, never followed.
fn add_entry(path: &Path, line: &str) -> Result<(), ImageError> {
    let text = read_db(path)?;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(path).map_err(ImageError::io("remove", path))?;
    }
    let key = line.split(':').next().unwrap_or_default();
    if text.lines().any(|l| l.split(':').next() == Some(key)) {
        return Ok(());
    }
    let mut out = text;
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(line);
    out.push('\n');
    std::fs::write(path, out).map_err(ImageError::io("write", path))
}

/// `tree/rel` as a real directory: made where missing, refused where a symbolic link (or
/// anything but a directory) stands on the way — the tree may come from an image, and
/// nothing here may follow a link out of it.
fn real_dir(tree: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let mut at = tree.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ImageError::BadTree(format!(
                    "/{rel} cannot be set up: /{} is not a directory",
                    at.strip_prefix(tree).unwrap_or(&at).display()
                )));
            }
            Err(_) => std::fs::create_dir(&at).map_err(ImageError::io("create", &at))?,
        }
    }
    Ok(at)
}

/// The uid and gid of our user in a tree with these `passwd` and `group`: its own if it
/// has the user already; else [`USER_ID`], or the first id from there that no account
/// (group) of the tree holds — an image may have its own user at 1000 (`ubuntu`, `node`).
fn user_ids(passwd: &str, group: &str) -> (u32, u32) {
    let field = |line: &str, i: usize| line.split(':').nth(i).map(str::to_string);
    let entry = |db: &str| {
        db.lines()
            .find(|l| l.split(':').next() == Some(USER_NAME))
            .map(str::to_string)
    };
    let ids = |db: &str, i: usize| -> std::collections::HashSet<u32> {
        db.lines()
            .filter_map(|l| field(l, i).and_then(|f| f.parse().ok()))
            .collect()
    };
    let free = |taken: &std::collections::HashSet<u32>, from: u32| {
        (from..u32::MAX)
            .find(|n| !taken.contains(n))
            .unwrap_or(from)
    };
    if let Some(line) = entry(passwd) {
        let uid = field(&line, 2)
            .and_then(|f| f.parse().ok())
            .unwrap_or(USER_ID);
        let gid = field(&line, 3).and_then(|f| f.parse().ok()).unwrap_or(uid);
        return (uid, gid);
    }
    let uid = free(&ids(passwd, 2), USER_ID);
    let gid = match entry(group)
        .and_then(|l| field(&l, 2))
        .and_then(|f| f.parse().ok())
    {
        Some(gid) => gid,
        None => {
            let taken = ids(group, 2);
            if taken.contains(&uid) {
                free(&taken, USER_ID)
            } else {
                uid
            }
        }
    };
    (uid, gid)
}

/// The shell of the user we add: bash where the tree has it.
fn login_shell(tree: &Path) -> &'static str {
    let has = |p: &str| std::fs::symlink_metadata(tree.join(p)).is_ok();
    if has("bin/bash") || has("usr/bin/bash") {
        "/bin/bash"
    } else {
        "/bin/sh"
    }
}

/// Adds our files to a root filesystem tree (a copied base tree, or an unpacked OCI
/// image): the user `user` (uid 1000) unless the tree has one by that name, hostname,
/// hosts, a placeholder resolv.conf and the guest agent at `/usr/local/bin/nestbox-guest`.
/// Never follows a symbolic link of the tree: links in the place of a file are replaced,
/// links on the way to a directory refuse the tree.
pub fn customize(tree: &Path, guest: &Path, hostname: &str) -> Result<(), ImageError> {
    let etc = real_dir(tree, "etc")?;
    let days = chrono::Utc::now().timestamp() / 86_400;
    let shell = login_shell(tree);
    let (uid, gid) = user_ids(
        &read_db(&etc.join("passwd"))?,
        &read_db(&etc.join("group"))?,
    );
    add_entry(
        &etc.join("passwd"),
        &format!("{USER_NAME}:x:{uid}:{gid}::/home/{USER_NAME}:{shell}"),
    )?;
    add_entry(&etc.join("group"), &format!("{USER_NAME}:x:{gid}:"))?;
    add_entry(
        &etc.join("shadow"),
        &format!("{USER_NAME}:*:{days}:0:99999:7:::"),
    )?;
    add_entry(&etc.join("gshadow"), &format!("{USER_NAME}:!::"))?;
    let home = real_dir(tree, &format!("home/{USER_NAME}"))?;
    let skel_is_dir = std::fs::symlink_metadata(etc.join("skel")).is_ok_and(|m| m.is_dir());
    if skel_is_dir && let Ok(rd) = std::fs::read_dir(etc.join("skel")) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                let dst = home.join(e.file_name());
                if std::fs::symlink_metadata(&dst).is_ok() {
                    continue;
                }
                std::fs::copy(e.path(), &dst).map_err(ImageError::io("copy to", &dst))?;
                std::os::unix::fs::lchown(&dst, Some(uid), Some(gid))
                    .map_err(ImageError::io("chown", &dst))?;
            }
        }
    }
    std::os::unix::fs::lchown(&home, Some(uid), Some(gid))
        .map_err(ImageError::io("chown", &home))?;
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755))
        .map_err(ImageError::io("chmod", &home))?;

    let write = |rel: &str, body: String| -> Result<(), ImageError> {
        let p = tree.join(rel);
        // An image or debootstrap may leave a symlink here (resolv.conf); replace, never
        // follow.
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            if m.is_dir() {
                std::fs::remove_dir_all(&p).map_err(ImageError::io("remove", &p))?;
            } else {
                std::fs::remove_file(&p).map_err(ImageError::io("remove", &p))?;
            }
        }
        std::fs::write(&p, body).map_err(ImageError::io("write", &p))
    };
    write("etc/hostname", format!("{hostname}\n"))?;
    write(
        "etc/hosts",
        format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
        ),
    )?;
    // Never ship the build host's resolvers; nestbox-guest writes nbx.dns at boot.
    write(
        "etc/resolv.conf",
        "# written by nestbox-guest at boot from nbx.dns\n".into(),
    )?;

    real_dir(tree, "usr/local/bin")?;
    write("usr/local/bin/nestbox-guest", String::new())?;
    let dst = tree.join("usr/local/bin/nestbox-guest");
    std::fs::copy(guest, &dst).map_err(ImageError::io("copy the guest binary to", &dst))?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
        .map_err(ImageError::io("chmod", &dst))?;
    Ok(())
}

/// Builds `out` (an ext4 image, shrunk) from the base tree plus our files. `work` is a
/// scratch directory that the caller removes.
pub(crate) async fn build_image(
    base: &Path,
    work: &Path,
    guest: &Path,
    hostname: &str,
    out: &Path,
) -> Result<Ext4Info, ImageError> {
    let tree = work.join("tree");
    Cmd::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(base)
        .arg(&tree)
        .timeout(Duration::from_secs(1800))
        .run()
        .await
        .map_err(ImageError::tool(format!("copy {}", base.display())))?;
    {
        let (tree, guest, hostname) = (tree.clone(), guest.to_path_buf(), hostname.to_string());
        blocking(move || customize(&tree, &guest, &hostname)).await?;
    }
    ext4::pack(&tree, out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_removes_only_stale_trees_and_old_scratch() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path();
        let trees = cache.join("rootfs");
        let old = std::time::SystemTime::now() - Duration::from_secs(40 * 24 * 3600);
        let make = |name: &str| {
            let t = trees.join(name);
            std::fs::create_dir_all(t.join("etc")).unwrap();
            std::fs::write(t.join("etc/debian_version"), "12\n").unwrap();
            t
        };
        let set_old = |p: &Path| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        };
        // Used recently: stays.
        let fresh = make("aaaaaaaaaaaaaaaa");
        stamp(&fresh);
        // Stamped long ago: goes, with its stamp.
        let stale = make("bbbbbbbbbbbbbbbb");
        stamp(&stale);
        set_old(&trees.join("bbbbbbbbbbbbbbbb.used"));
        // Stale but used by this build: stays.
        let kept = make("cccccccccccccccc");
        stamp(&kept);
        set_old(&trees.join("cccccccccccccccc.used"));
        // An old interrupted build's scratch directory goes; a running build's stays.
        let scratch_old = trees.join(".build-old");
        std::fs::create_dir_all(scratch_old.join("tree")).unwrap();
        let scratch_new = trees.join(".build-new");
        std::fs::create_dir_all(&scratch_new).unwrap();
        let work_old = cache.join("work/rootfs-old");
        std::fs::create_dir_all(&work_old).unwrap();
        for d in [&scratch_old, &work_old] {
            // Directories take their times through a descriptor opened for reading.
            let f = std::fs::File::open(d).unwrap();
            f.set_modified(old).unwrap();
        }
        // A stamp whose tree is gone goes.
        std::fs::write(trees.join("dddddddddddddddd.used"), b"").unwrap();

        let removed = prune(cache, std::slice::from_ref(&kept), TREE_MAX_IDLE);
        assert_eq!(removed, 3, "the stale tree and two scratch directories");
        assert!(fresh.exists() && kept.exists());
        assert!(!stale.exists() && !trees.join("bbbbbbbbbbbbbbbb.used").exists());
        assert!(!scratch_old.exists() && !work_old.exists());
        assert!(scratch_new.exists());
        assert!(!trees.join("dddddddddddddddd.used").exists());
    }

    #[test]
    fn customize_adds_user_files_and_guest() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        std::fs::create_dir_all(tree.join("etc/skel")).unwrap();
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/bash"), "").unwrap();
        std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        std::fs::write(tree.join("etc/group"), "root:x:0:\n").unwrap();
        std::fs::write(tree.join("etc/skel/.bashrc"), "# hi\n").unwrap();
        std::os::unix::fs::symlink("/run/resolv.conf", tree.join("etc/resolv.conf")).unwrap();
        let guest = dir.path().join("guest-bin");
        std::fs::write(&guest, b"bin").unwrap();
        let is_root = nix::unistd::geteuid().is_root();
        let res = customize(tree, &guest, "nestbox");
        if !is_root {
            return; // chown needs root
        }
        res.unwrap();
        customize(tree, &guest, "nestbox").unwrap(); // idempotent
        let passwd = std::fs::read_to_string(tree.join("etc/passwd")).unwrap();
        assert_eq!(
            passwd
                .matches("user:x:1000:1000::/home/user:/bin/bash")
                .count(),
            1
        );
        assert!(
            std::fs::read_to_string(tree.join("etc/shadow"))
                .unwrap()
                .starts_with("user:*:")
        );
        assert!(tree.join("home/user/.bashrc").exists());
        assert!(
            !std::fs::symlink_metadata(tree.join("etc/resolv.conf"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let mode = std::fs::metadata(tree.join("usr/local/bin/nestbox-guest"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_to_string(tree.join("etc/hostname")).unwrap(),
            "nestbox\n"
        );
    }

    #[test]
    fn our_user_takes_a_free_id_or_keeps_its_own() {
        assert_eq!(
            user_ids("root:x:0:0::/root:/bin/sh\n", "root:x:0:\n"),
            (1000, 1000)
        );
        assert_eq!(
            user_ids(
                "root:x:0:0::/root:/bin/sh\nubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n",
                "root:x:0:\nubuntu:x:1000:\n"
            ),
            (1001, 1001)
        );
        assert_eq!(
            user_ids("user:x:1500:1600::/home/user:/bin/sh\n", ""),
            (1500, 1600)
        );
        assert_eq!(user_ids("", "staff:x:1000:\n"), (1000, 1001));
    }

    #[test]
    fn nothing_is_mounted_below_a_fresh_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(unmount_below(dir.path()));
    }

    #[test]
    fn empty_dir_keeps_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/f"), "x").unwrap();
        empty_dir(&dir.path().join("a")).unwrap();
        assert!(dir.path().join("a").is_dir());
        assert_eq!(std::fs::read_dir(dir.path().join("a")).unwrap().count(), 0);
        empty_dir(&dir.path().join("missing")).unwrap();
    }
}
