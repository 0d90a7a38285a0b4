//! Where things live by default, and small file helpers with safe permissions.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Default data directory of the server roles.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/nestbox";
/// Default listen address of the REST API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";

/// Creates `dir` (and parents) readable only by its owner.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The master secret: `NESTBOX_SECRET` (hex or text, ≥ 32 bytes) or a file created on
/// first use.
pub fn master_secret(file: &Path) -> anyhow::Result<Vec<u8>> {
    if let Ok(s) = std::env::var("NESTBOX_SECRET") {
        let bytes = hex::decode(s.trim()).unwrap_or_else(|_| s.trim().as_bytes().to_vec());
        if bytes.len() < 32 {
            bail!("NESTBOX_SECRET must be at least 32 bytes (64 hex digits)");
        }
        return Ok(bytes);
    }
    match std::fs::read_to_string(file) {
        Ok(s) => {
            let bytes =
                hex::decode(s.trim()).with_context(|| format!("{} is not hex", file.display()))?;
            if bytes.len() < 32 {
                bail!("{} holds fewer than 32 bytes", file.display());
            }
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = vec![0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            write_private(file, hex::encode(&bytes).as_bytes())?;
            Ok(bytes)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// The static guest agent binary: explicit path, `NESTBOX_GUEST_BIN`, next to this
/// executable, or in the build tree.
pub fn guest_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("NESTBOX_GUEST_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let candidates = [
        dir.join("nestbox-guest"),
        dir.join("../x86_64-unknown-linux-gnu/guest/nestbox-guest"),
        dir.join("../../x86_64-unknown-linux-gnu/guest/nestbox-guest"),
    ];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "cannot find the static guest agent `nestbox-guest`; build it with `make guest` or pass --guest-bin \
         (looked in {})",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Where the CLI keeps its settings.
pub fn client_config_file() -> PathBuf {
    if let Some(p) = std::env::var_os("NESTBOX_CONFIG") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("nestbox").join("config.toml")
}
