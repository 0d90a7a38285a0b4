//! The initramfs: a newc cpio with `/init` = the static guest binary (stage 1), the
//! virtio modules under `/lib/modules/` and `/lib/modules/order` listing them in load
//! order. Uncompressed: gzip saves nothing measurable at this size (RUNTIME-FACTS §1).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nestbox_hostsys::process::Cmd;

use crate::kernel::Module;
use crate::{ImageError, blocking};

/// Writes the staging tree for the archive.
fn stage(dir: &Path, guest: &Path, modules: &[Module]) -> Result<Vec<String>, ImageError> {
    for d in ["dev", "proc", "sys", "newroot", "lib/modules"] {
        let p = dir.join(d);
        std::fs::create_dir_all(&p).map_err(ImageError::io("create", &p))?;
    }
    let init = dir.join("init");
    std::fs::copy(guest, &init).map_err(ImageError::io("copy the guest binary to", &init))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .map_err(ImageError::io("chmod", &init))?;
    let mut order = String::new();
    for m in modules {
        let file = format!("{}.ko", m.name);
        let p = dir.join("lib/modules").join(&file);
        std::fs::write(&p, &m.bytes).map_err(ImageError::io("write", &p))?;
        order.push_str(&file);
        order.push('\n');
    }
    let p = dir.join("lib/modules/order");
    std::fs::write(&p, order).map_err(ImageError::io("write", &p))?;
    // The kernel opens /dev/console for PID 1 before devtmpfs is mounted. Creating the
    // node needs CAP_MKNOD; without it stage 1 reopens the console after mounting /dev.
    let console = dir.join("dev/console");
    let _ = nix::sys::stat::mknod(
        &console,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(5, 1),
    );

    let mut entries = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(ImageError::io("list", &d))?;
        for e in rd.flatten() {
            let path = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path.clone());
            }
            if let Ok(rel) = path.strip_prefix(dir) {
                entries.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    // Sorted: parents before children, and a stable archive for stable inputs.
    entries.sort();
    Ok(entries)
}

/// Builds `out` from the guest binary and the modules.
pub(crate) async fn build(out: &Path, guest: &Path, modules: &[Module]) -> Result<(), ImageError> {
    let staging = tempfile::Builder::new()
        .prefix("nestbox-initramfs-")
        .tempdir()
        .map_err(ImageError::io(
            "create a temporary directory in",
            std::env::temp_dir(),
        ))?;
    let entries = {
        let dir = staging.path().to_path_buf();
        let guest = guest.to_path_buf();
        let modules = modules.to_vec();
        blocking(move || stage(&dir, &guest, &modules)).await?
    };
    let list: String = entries.iter().map(|e| format!("{e}\n")).collect();
    Cmd::new("cpio")
        .args([
            "-o",
            "-H",
            "newc",
            "--quiet",
            "--reproducible",
            "-R",
            "0:0",
            "-O",
        ])
        .arg(out)
        .current_dir(staging.path())
        .stdin(list.into_bytes())
        .run()
        .await
        .map_err(ImageError::tool(format!(
            "write the initramfs {}",
            out.display()
        )))?;
    Ok(())
}

/// The content of the member `name` of a newc cpio archive (our initramfs: its `init` is
/// the guest binary, which hosts add to root filesystems they make from OCI images).
pub fn read_member(archive: &Path, name: &str) -> Result<Vec<u8>, ImageError> {
    let data = std::fs::read(archive).map_err(ImageError::io("read", archive))?;
    let bad = |detail: &str| ImageError::Kernel {
        path: archive.to_path_buf(),
        detail: format!("initramfs: {detail}"),
    };
    let field = |at: usize, i: usize| -> Result<usize, ImageError> {
        let start = at + 6 + i * 8;
        let hex = data
            .get(start..start + 8)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| bad("truncated header"))?;
        usize::from_str_radix(hex, 16).map_err(|_| bad("malformed header"))
    };
    let pad4 = |n: usize| n.div_ceil(4) * 4;
    let mut at = 0;
    while at + 110 <= data.len() {
        if !matches!(&data[at..at + 6], b"070701" | b"070702") {
            return Err(bad("not a newc archive"));
        }
        let size = field(at, 6)?;
        let name_size = field(at, 11)?;
        let name_start = at + 110;
        let member = data
            .get(name_start..name_start + name_size.saturating_sub(1))
            .ok_or_else(|| bad("truncated name"))?;
        let data_start = pad4(name_start + name_size);
        if member == b"TRAILER!!!" {
            break;
        }
        let body = data
            .get(data_start..data_start + size)
            .ok_or_else(|| bad("truncated member"))?;
        if member == name.as_bytes() {
            return Ok(body.to_vec());
        }
        at = pad4(data_start + size);
    }
    Err(bad(&format!("no member `{name}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn archive_lists_init_modules_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let guest = dir.path().join("guest");
        std::fs::write(&guest, b"\x7fELF fake").unwrap();
        let mods = vec![
            Module {
                name: "virtio_ring".into(),
                bytes: b"a".to_vec(),
            },
            Module {
                name: "virtio".into(),
                bytes: b"b".to_vec(),
            },
        ];
        let out = dir.path().join("initramfs.cpio");
        build(&out, &guest, &mods).await.unwrap();
        let listing = Cmd::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&out)
            .run()
            .await
            .unwrap()
            .stdout_text();
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(read_member(&out, "init").unwrap(), b"\x7fELF fake");
        assert_eq!(
            read_member(&out, "lib/modules/order").unwrap(),
            b"virtio_ring.ko\nvirtio.ko\n"
        );
        assert!(read_member(&out, "nope").is_err());
        for want in [
            "init",
            "lib/modules/order",
            "lib/modules/virtio.ko",
            "lib/modules/virtio_ring.ko",
            "newroot",
            "proc",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        let extract = tempfile::tempdir().unwrap();
        Cmd::new("cpio")
            .args(["-i", "--quiet", "-d", "-F"])
            .arg(&out)
            .current_dir(extract.path())
            .run()
            .await
            .unwrap();
        let order = std::fs::read_to_string(extract.path().join("lib/modules/order")).unwrap();
        assert_eq!(order, "virtio_ring.ko\nvirtio.ko\n");
        let mode = std::fs::metadata(extract.path().join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
    }
}
