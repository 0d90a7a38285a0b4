//! Applies image layers, bottom first, to a directory tree: the image's root filesystem.
//!
//! A layer is a tar (plain, gzip or zstd: told by its first bytes, not by its declared
//! type) read twice. The first pass applies its whiteouts to what the layers below left:
//! `dir/.wh.name` removes `dir/name`, `dir/.wh..wh..opq` empties `dir`. The second pass
//! extracts every other entry, keeping owners, modes and times.
//!
//! Layers are untrusted input and this runs as root, so:
//! - nothing is written, removed or changed outside the tree: entries with `..` are
//!   skipped, every parent is resolved and must stay inside (the `tar` crate's
//!   `unpack_in`), hard links must point inside, and a whiteout whose path crosses a
//!   symbolic link is ignored;
//! - an entry never writes through what is already there: a symbolic link or file in the
//!   place of a directory entry is removed first (else the directory's mode and owner
//!   would be set through the link), and a directory in the place of anything else is
//!   removed with its contents;
//! - device nodes and FIFOs are not made (the guest mounts its own `/dev`);
//! - the tree's size is bounded ([`Limits`]).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use crate::OciError;

/// The opaque-directory marker.
const OPAQUE: &str = ".wh..wh..opq";
/// The whiteout prefix.
const WHITEOUT: &str = ".wh.";

/// What a tree may grow to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes of file content, all layers together.
    pub max_bytes: u64,
    /// Most entries, all layers together.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 20 << 30,
            max_entries: 2_000_000,
        }
    }
}

/// What applying layers did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Entries extracted.
    pub entries: u64,
    /// Bytes of file content extracted.
    pub bytes: u64,
    /// Paths removed by whiteouts.
    pub whiteouts: u64,
    /// Device nodes and FIFOs left out.
    pub skipped: u64,
}

/// Longest tar extension header (a long name, a long link, PAX records) accepted: the
/// `tar` crate holds each in memory whole.
const MAX_EXTENSION: u64 = 1 << 20;

/// A reader that fails once more than `left` bytes came through (a decompression bomb
/// costs at most that much work).
struct Capped<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::other("the layer unpacks to more than the image may hold")
        })?;
        Ok(n)
    }
}

/// Opens a layer file, decompressing by its magic bytes, reading at most what `limits`
/// allow the whole tree (and its tar headers).
fn open_layer(path: &Path, limits: &Limits) -> Result<Box<dyn Read>, OciError> {
    let inner = open_decompressed(path)?;
    Ok(Box::new(Capped {
        inner,
        left: limits
            .max_bytes
            .saturating_add(limits.max_entries.saturating_mul(2048)),
    }))
}

fn open_decompressed(path: &Path) -> Result<Box<dyn Read>, OciError> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).map_err(OciError::io("open", path))?;
    let n = f.read(&mut magic).map_err(OciError::io("read", path))?;
    drop(f);
    let file = BufReader::new(File::open(path).map_err(OciError::io("open", path))?);
    Ok(if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::stream::read::Decoder::new(file).map_err(OciError::io("read zstd", path))?)
    } else {
        Box::new(file)
    })
}

/// An entry path's normal components (`None` if it climbs with `..`).
fn normal(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return None,
        }
    }
    Some(out)
}

/// `tree/rel` if every component of `rel` is a real directory (no symbolic link, nothing
/// missing).
fn real_dir_in(tree: &Path, rel: &Path) -> Option<PathBuf> {
    let mut at = tree.to_path_buf();
    for c in rel.components() {
        at.push(c);
        if !std::fs::symlink_metadata(&at).ok()?.is_dir() {
            return None;
        }
    }
    Some(at)
}

/// An error with its causes, for a layer's message.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        next = s.source();
    }
    msg
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn layer_err(index: usize, why: impl Into<String>) -> OciError {
    OciError::Layer {
        index,
        why: why.into(),
    }
}

/// Pass 0: the layer's extension headers are of a size that may be held in memory.
fn check_headers(layer: &Path, index: usize, limits: &Limits) -> Result<(), OciError> {
    let mut archive = tar::Archive::new(open_layer(layer, limits)?);
    let entries = archive
        .entries()
        .map_err(|e| layer_err(index, e.to_string()))?
        .raw(true);
    for entry in entries {
        let entry = entry.map_err(|e| layer_err(index, chain(&e)))?;
        let kind = entry.header().entry_type();
        let extension = matches!(
            kind,
            EntryType::GNULongName
                | EntryType::GNULongLink
                | EntryType::XHeader
                | EntryType::XGlobalHeader
        );
        if extension && entry.size() > MAX_EXTENSION {
            return Err(layer_err(
                index,
                format!("a tar extension header of {} bytes", entry.size()),
            ));
        }
    }
    Ok(())
}

/// Pass 1: this layer's whiteouts, applied to the layers below.
fn whiteouts(
    tree: &Path,
    layer: &Path,
    index: usize,
    limits: &Limits,
    applied: &mut Applied,
) -> Result<(), OciError> {
    let mut archive = tar::Archive::new(open_layer(layer, limits)?);
    for entry in archive
        .entries()
        .map_err(|e| layer_err(index, e.to_string()))?
    {
        let entry = entry.map_err(|e| layer_err(index, e.to_string()))?;
        let path = entry.path().map_err(|e| layer_err(index, e.to_string()))?;
        let Some(rel) = normal(&path) else { continue };
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with(WHITEOUT) {
            continue;
        }
        let dir = rel.parent().unwrap_or(Path::new(""));
        let Some(dir_path) = real_dir_in(tree, dir) else {
            continue;
        };
        if name == OPAQUE {
            let children = std::fs::read_dir(&dir_path).map_err(OciError::io("list", &dir_path))?;
            for child in children.flatten() {
                remove_any(&child.path()).map_err(OciError::io("remove", &child.path()))?;
                applied.whiteouts += 1;
            }
        } else {
            let hidden = &name[WHITEOUT.len()..];
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                continue;
            }
            let target = dir_path.join(hidden);
            if std::fs::symlink_metadata(&target).is_ok() {
                remove_any(&target).map_err(OciError::io("remove", &target))?;
                applied.whiteouts += 1;
            }
        }
    }
    Ok(())
}

/// Pass 2: this layer's entries.
fn extract(
    tree: &Path,
    layer: &Path,
    index: usize,
    limits: &Limits,
    applied: &mut Applied,
) -> Result<(), OciError> {
    let canonical_tree = tree.canonicalize().map_err(OciError::io("resolve", tree))?;
    let mut archive = tar::Archive::new(open_layer(layer, limits)?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    for entry in archive
        .entries()
        .map_err(|e| layer_err(index, e.to_string()))?
    {
        let mut entry = entry.map_err(|e| layer_err(index, e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| layer_err(index, e.to_string()))?
            .into_owned();
        let Some(rel) = normal(&path) else {
            tracing::warn!(layer = index, path = %path.display(), "entry climbs out of the tree; skipped");
            continue;
        };
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with(WHITEOUT) {
            continue;
        }
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                applied.skipped += 1;
                continue;
            }
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => {
                continue;
            }
            _ => {}
        }
        applied.entries += 1;
        applied.bytes += entry.size();
        if applied.entries > limits.max_entries || applied.bytes > limits.max_bytes {
            return Err(OciError::TooLarge {
                what: "the image's files".into(),
                limit: limits.max_bytes,
            });
        }
        // What is already in the entry's place must not be written through.
        let parent = rel.parent().unwrap_or(Path::new(""));
        if let Ok(canonical_parent) = tree.join(parent).canonicalize() {
            if !canonical_parent.starts_with(&canonical_tree) {
                return Err(layer_err(
                    index,
                    format!(
                        "`{}` leads out of the image through a symbolic link",
                        rel.display()
                    ),
                ));
            }
            let here = canonical_parent.join(name);
            if let Ok(meta) = std::fs::symlink_metadata(&here) {
                // A hard link replaces what is there (an upper layer re-shipping a linked
                // file), unless it names that very path.
                let linked_to_itself = kind == EntryType::Link
                    && entry
                        .link_name()
                        .ok()
                        .flatten()
                        .and_then(|l| normal(&l))
                        .is_some_and(|l| l == rel);
                let replace = match kind {
                    EntryType::Directory => !meta.is_dir(),
                    EntryType::Link => !linked_to_itself,
                    _ => meta.is_dir(),
                };
                if replace {
                    remove_any(&here).map_err(OciError::io("replace", &here))?;
                }
            }
        }
        entry.unpack_in(tree).map_err(|e| {
            // The tar crate's messages name the host's path of the tree: not the
            // image's business.
            let why = chain(&e).replace(&tree.display().to_string(), "");
            layer_err(index, format!("`{}`: {why}", rel.display()))
        })?;
    }
    Ok(())
}

/// Applies `layers` (files, bottom first) to `tree`, an existing directory.
pub fn apply_layers(tree: &Path, layers: &[PathBuf], limits: &Limits) -> Result<Applied, OciError> {
    let mut applied = Applied::default();
    for (i, layer) in layers.iter().enumerate() {
        let index = i + 1;
        check_headers(layer, index, limits)?;
        whiteouts(tree, layer, index, limits, &mut applied)?;
        extract(tree, layer, index, limits, &mut applied)?;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, &'a str),
        Link(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Node(&'a str),
    }

    fn tar(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_mtime(1_700_000_000);
            h.set_size(0);
            let (path, body): (&str, &[u8]) = match e {
                E::Dir(p, mode) => {
                    h.set_entry_type(EntryType::Directory);
                    h.set_mode(*mode);
                    (p, b"")
                }
                E::File(p, body) => {
                    h.set_entry_type(EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(body.len() as u64);
                    (p, body.as_bytes())
                }
                E::Link(p, to) | E::Hard(p, to) => {
                    h.set_entry_type(if matches!(e, E::Link(..)) {
                        EntryType::Symlink
                    } else {
                        EntryType::Link
                    });
                    h.set_mode(0o777);
                    h.set_link_name_literal(to).unwrap();
                    (p, b"")
                }
                E::Node(p) => {
                    h.set_entry_type(EntryType::Char);
                    h.set_mode(0o666);
                    (p, b"")
                }
            };
            // Raw names: a hostile layer's `..` must reach the code under test.
            let name = &mut h.as_old_mut().name;
            name.fill(0);
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, body).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, data: Vec<u8>) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn layers_stack_with_whiteouts_in_every_compression() {
        let work = tempfile::tempdir().unwrap();
        let tree = work.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let base = tar(&[
            E::Dir("etc/", 0o755),
            E::File("etc/keep", "base"),
            E::File("etc/gone", "x"),
            E::Dir("opt/", 0o755),
            E::Dir("opt/app/", 0o750),
            E::File("opt/app/old", "old"),
            E::Dir("var/cache/", 0o755),
            E::File("var/cache/big", "cache"),
            E::Node("dev/null"),
            E::Hard("etc/keep-again", "etc/keep"),
        ]);
        let top = tar(&[
            E::File("etc/.wh.gone", ""),
            E::File("opt/app/.wh..wh..opq", ""),
            E::File("opt/app/new", "new"),
            E::File("var/.wh.cache", ""),
            E::File("etc/keep", "top"),
        ]);
        let layers = vec![
            write(work.path(), "l1", gzip(&base)),
            write(
                work.path(),
                "l2",
                zstd::stream::encode_all(top.as_slice(), 1).unwrap(),
            ),
        ];
        let applied = apply_layers(&tree, &layers, &Limits::default()).unwrap();
        let read = |p: &str| std::fs::read_to_string(tree.join(p)).ok();
        assert_eq!(read("etc/keep").as_deref(), Some("top"));
        assert_eq!(read("etc/keep-again").as_deref(), Some("base"));
        assert_eq!(read("etc/gone"), None);
        assert_eq!(read("opt/app/old"), None);
        assert_eq!(read("opt/app/new").as_deref(), Some("new"));
        assert!(!tree.join("var/cache").exists());
        assert!(!tree.join("dev/null").exists());
        assert!(!tree.join("etc/.wh.gone").exists());
        let meta = std::fs::metadata(tree.join("opt/app")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o750);
        assert_eq!(meta.uid(), 1000);
        assert_eq!(applied.skipped, 1);
        assert_eq!(applied.whiteouts, 3);

        // A plain (uncompressed) layer works too.
        let plain = write(work.path(), "l3", tar(&[E::File("plain", "yes")]));
        apply_layers(&tree, &[plain], &Limits::default()).unwrap();
        assert_eq!(read("plain").as_deref(), Some("yes"));
    }

    #[test]
    fn nothing_outside_the_tree_is_touched() {
        let work = tempfile::tempdir().unwrap();
        let tree = work.path().join("tree");
        let outside = work.path().join("outside");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "keep").unwrap();
        let mode_before = std::fs::metadata(&outside).unwrap().mode();
        let out = outside.to_str().unwrap();

        // A link to the outside, then a directory entry at the link (its mode must not
        // reach the outside), a whiteout through the link, and a file under it.
        let l1 = tar(&[E::Link("escape", out), E::Link("again", out)]);
        let l2 = tar(&[
            E::Dir("escape/", 0o777),
            E::File("again/.wh.secret", ""),
            E::File("../climb", "x"),
        ]);
        let layers = vec![write(work.path(), "l1", l1), write(work.path(), "l2", l2)];
        apply_layers(&tree, &layers, &Limits::default()).unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).unwrap(),
            "keep"
        );
        assert_eq!(std::fs::metadata(&outside).unwrap().mode(), mode_before);
        assert!(tree.join("escape").is_dir() && !tree.join("escape").is_symlink());
        assert!(!work.path().join("climb").exists());

        // Writing through the remaining link is refused.
        let l3 = write(work.path(), "l3", tar(&[E::File("again/planted", "x")]));
        let err = apply_layers(&tree, &[l3], &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("layer 1"), "{err}");
        assert!(!outside.join("planted").exists());

        // So is a hard link to a file outside.
        let l4 = write(work.path(), "l4", tar(&[E::Hard("h", "../outside/secret")]));
        assert!(apply_layers(&tree, &[l4], &Limits::default()).is_err());
        assert!(!tree.join("h").exists());
    }

    #[test]
    fn odd_whiteouts_and_relinked_files() {
        let work = tempfile::tempdir().unwrap();
        let tree = work.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(work.path().join("beside"), "keep").unwrap();
        let l1 = tar(&[
            E::File("bin/perl", "v1"),
            E::Hard("bin/perl5", "bin/perl"),
            E::File("etc/keep", "x"),
        ]);
        // Whiteouts of nothing, of `.` and of `..` remove nothing; an upper layer
        // re-ships a hard-linked file.
        let l2 = tar(&[
            E::File(".wh..", ""),
            E::File(".wh...", ""),
            E::File("etc/.wh.", ""),
            E::File("bin/perl", "v2"),
            E::Hard("bin/perl5", "bin/perl"),
        ]);
        let layers = vec![write(work.path(), "l1", l1), write(work.path(), "l2", l2)];
        apply_layers(&tree, &layers, &Limits::default()).unwrap();
        let read = |p: &str| std::fs::read_to_string(tree.join(p)).unwrap();
        assert_eq!(read("bin/perl5"), "v2");
        assert_eq!(read("etc/keep"), "x");
        assert_eq!(
            std::fs::read_to_string(work.path().join("beside")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn huge_extension_headers_are_refused_before_they_are_read() {
        let work = tempfile::tempdir().unwrap();
        let tree = work.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::GNULongName);
        h.set_size(2 << 20);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, "././@LongLink", std::io::repeat(b'a').take(2 << 20))
            .unwrap();
        let bytes = b.into_inner().unwrap();
        let l = write(work.path(), "l", gzip(&bytes));
        let err = apply_layers(&tree, &[l], &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("extension header"), "{err}");
    }

    #[test]
    fn a_tree_larger_than_its_limit_is_refused() {
        let work = tempfile::tempdir().unwrap();
        let tree = work.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let l = write(
            work.path(),
            "l",
            tar(&[E::File("a", "0123456789"), E::File("b", "0123456789")]),
        );
        let limits = Limits {
            max_bytes: 15,
            max_entries: 100,
        };
        assert!(matches!(
            apply_layers(&tree, &[l], &limits),
            Err(OciError::TooLarge { .. })
        ));
    }
}
