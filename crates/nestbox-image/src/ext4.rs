//! ext4 images without mounting: pack a directory (`mkfs.ext4 -d`), shrink to the
//! minimum and truncate (templates are stored shrunk), and expand sparse again
//! ([`expand_image`], the host agent's start-up step).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use nestbox_hostsys::process::Cmd;

use crate::{ImageError, blocking};

/// Geometry of a packed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4Info {
    /// Image file size in bytes (= filesystem size after shrinking).
    pub size_bytes: u64,
    /// `resize2fs -P`'s minimum, in bytes.
    pub fs_min_bytes: u64,
    /// Filesystem block size.
    pub block_size: u64,
}

/// Reads (block count, block size) from the superblock at byte 1024.
pub fn geometry(path: &Path) -> Result<(u64, u64), ImageError> {
    let f = std::fs::File::open(path).map_err(ImageError::io("open", path))?;
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, 1024)
        .map_err(ImageError::io("read the superblock of", path))?;
    let le32 = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return Err(ImageError::Io {
            op: "recognise an ext4 filesystem in",
            path: path.into(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        });
    }
    let block_size = 1024u64 << le32(0x18).min(6);
    let mut blocks = u64::from(le32(0x04));
    if le32(0x60) & 0x80 != 0 {
        blocks |= u64::from(le32(0x150)) << 32;
    }
    Ok((blocks, block_size))
}

/// Bytes a tree needs on ext4 (files rounded to 4 KiB, plus a block per inode). A file
/// with several links counts once, and a sparse file by what it really holds (the tree may
/// come from an image, whose sizes are the image's to choose).
fn tree_usage(dir: &Path) -> Result<(u64, u64), ImageError> {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(ImageError::io("list", &d))?;
        for e in rd.flatten() {
            inodes += 1;
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            let held = md.len().min(md.blocks().saturating_mul(512));
            bytes = bytes.saturating_add(held.div_ceil(4096) * 4096 + 4096);
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// e2fsck -fy; exit status 1 ("errors corrected") is fine.
async fn fsck(image: &Path) -> Result<(), ImageError> {
    let cmd = Cmd::new("e2fsck")
        .args(["-f", "-y"])
        .arg(image)
        .timeout(Duration::from_secs(600));
    let out = cmd
        .output()
        .await
        .map_err(ImageError::tool(format!("check {}", image.display())))?;
    match out.status.code() {
        Some(0 | 1) => Ok(()),
        _ => Err(ImageError::Tool {
            step: format!("check {}", image.display()),
            source: nestbox_hostsys::process::ProcessError::Failed {
                argv: cmd.argv(),
                status: nestbox_hostsys::process::Exit::Status(out.status),
                stderr: nestbox_hostsys::process::tail(if out.stderr.is_empty() {
                    &out.stdout
                } else {
                    &out.stderr
                }),
            },
        }),
    }
}

/// Packs `tree` into a new ext4 image at `out`, shrunk to its minimum.
pub async fn pack(tree: &Path, out: &Path) -> Result<Ext4Info, ImageError> {
    let (bytes, inodes) = {
        let t = tree.to_path_buf();
        blocking(move || tree_usage(&t)).await?
    };
    // Room for metadata and the journal; resize2fs -M takes the slack back.
    let size_mib = (bytes + inodes * 256) * 13 / 10 / (1 << 20) + 128;
    Cmd::new("mkfs.ext4")
        .args([
            "-q", "-F", "-L", "rootfs", "-b", "4096", "-i", "16384", "-I", "256", "-m", "0",
        ])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1", "-d"])
        .arg(tree)
        .arg(out)
        .arg(format!("{size_mib}M"))
        .timeout(Duration::from_secs(1800))
        .run()
        .await
        .map_err(ImageError::tool(format!(
            "pack {} into {}",
            tree.display(),
            out.display()
        )))?;
    fsck(out).await?;
    Cmd::new("resize2fs")
        .arg("-M")
        .arg(out)
        .timeout(Duration::from_secs(1800))
        .run()
        .await
        .map_err(ImageError::tool(format!("shrink {}", out.display())))?;
    let (blocks, block_size) = geometry(out)?;
    let size_bytes = blocks * block_size;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(ImageError::io("open", out))?;
    f.set_len(size_bytes)
        .map_err(ImageError::io("truncate", out))?;
    drop(f);
    let min = Cmd::new("resize2fs")
        .arg("-P")
        .arg(out)
        .run()
        .await
        .map_err(ImageError::tool(format!(
            "estimate the minimum size of {}",
            out.display()
        )))?
        .stdout_text();
    let min_blocks = min
        .lines()
        .find_map(|l| {
            l.split("filesystem:")
                .nth(1)
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .unwrap_or(blocks);
    Ok(Ext4Info {
        size_bytes,
        fs_min_bytes: min_blocks * block_size,
        block_size,
    })
}

/// What [`expand_image`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expansion {
    /// The image was already at least that large.
    Unchanged {
        /// Its size in bytes.
        size: u64,
    },
    /// Grown (sparse: no new disk space is allocated).
    Grown {
        /// Size before.
        from: u64,
        /// Size after.
        to: u64,
    },
}

/// Grows an ext4 image file to `size` bytes: sparse truncate, then `resize2fs` to fill it.
/// The image must not be in use. Stored templates are shrunk; the host agent expands
/// them to the default disk size at start-up (the seed's EnsureImageSizes).
pub async fn expand_image(path: &Path, size: u64) -> Result<Expansion, ImageError> {
    let current = std::fs::metadata(path)
        .map_err(ImageError::io("stat", path))?
        .len();
    let (blocks, block_size) = geometry(path)?;
    let target = size.max(current) / block_size * block_size;
    if blocks * block_size >= target {
        return Ok(Expansion::Unchanged { size: current });
    }
    if current < size {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(ImageError::io("open", path))?;
        f.set_len(size).map_err(ImageError::io("extend", path))?;
    }
    fsck(path).await?;
    Cmd::new("resize2fs")
        .arg(path)
        .timeout(Duration::from_secs(1800))
        .run()
        .await
        .map_err(ImageError::tool(format!("grow {}", path.display())))?;
    Ok(Expansion::Grown {
        from: current,
        to: size.max(current),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pack_shrinks_and_expand_grows() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hostname"), "x\n").unwrap();
        std::fs::write(tree.join("big"), vec![7u8; 3 << 20]).unwrap();
        let img = dir.path().join("rootfs.ext4");
        let info = pack(&tree, &img).await.unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len(), info.size_bytes);
        assert!(info.size_bytes < 64 << 20, "not shrunk: {info:?}");
        assert_eq!(info.block_size, 4096);
        assert!(info.fs_min_bytes <= info.size_bytes);

        let grown = expand_image(&img, 256 << 20).await.unwrap();
        assert_eq!(
            grown,
            Expansion::Grown {
                from: info.size_bytes,
                to: 256 << 20
            }
        );
        let (blocks, bs) = geometry(&img).unwrap();
        assert_eq!(blocks * bs, 256 << 20);
        // Sparse: the file did not allocate the new space.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&img).unwrap().blocks() * 512 < 64 << 20);
        assert_eq!(
            expand_image(&img, 128 << 20).await.unwrap(),
            Expansion::Unchanged { size: 256 << 20 }
        );
        // The content survived.
        let cat = Cmd::new("debugfs")
            .args(["-R", "cat /etc/hostname"])
            .arg(&img)
            .run()
            .await
            .unwrap();
        assert_eq!(cat.stdout_text(), "x");
    }
}
