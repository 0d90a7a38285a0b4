//! Reproducible archives of copy sources: a gzip-compressed tar whose bytes depend only on
//! the files' names, contents, kinds and permission bits.
//!
//! Entries are sorted by name; owners are 0, times are 0 (the gzip header's too) and
//! symbolic links are stored as links, never followed. A directory's *contents* are
//! archived (unpacked into the step's destination); a single file is archived under the
//! name it is to have.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use flate2::Compression;
use sha2::{Digest, Sha256};

use crate::{Archive, RecipeError};

fn io_error(path: &Path, e: std::io::Error) -> RecipeError {
    RecipeError::Source {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o7777);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &Path,
    name: &Path,
) -> Result<(), RecipeError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| io_error(path, e))?;
    let mode = meta.permissions().mode();
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(path).map_err(|e| io_error(path, e))?;
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, name, &target)
            .map_err(|e| io_error(path, e))?;
    } else if kind.is_dir() {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        tar.append_data(&mut h, name, std::io::empty())
            .map_err(|e| io_error(path, e))?;
        let mut children: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| io_error(path, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| io_error(path, e))?;
        children.sort();
        for child in children {
            append(tar, &path.join(&child), &name.join(&child))?;
        }
    } else if kind.is_file() {
        let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
        let mut h = header(tar::EntryType::Regular, mode, meta.len());
        tar.append_data(&mut h, name, file)
            .map_err(|e| io_error(path, e))?;
    } else {
        return Err(RecipeError::Source {
            path: path.display().to_string(),
            message: "is neither a file, a directory nor a symbolic link".into(),
        });
    }
    Ok(())
}

/// Archives `source`: a directory's contents, or a file under `file_name` (its own name
/// if `None`).
pub fn pack(source: &Path, file_name: Option<&str>) -> Result<Archive, RecipeError> {
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let meta = std::fs::symlink_metadata(source).map_err(|e| io_error(source, e))?;
    if meta.is_dir() {
        let mut children: Vec<_> = std::fs::read_dir(source)
            .map_err(|e| io_error(source, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| io_error(source, e))?;
        children.sort();
        for child in children {
            append(&mut tar, &source.join(&child), Path::new(&child))?;
        }
    } else {
        let name = match file_name {
            Some(n) => n.to_string(),
            None => source
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        append(&mut tar, source, Path::new(&name))?;
    }
    let data = tar
        .into_inner()
        .and_then(|gz| gz.finish())
        .map_err(|e| io_error(source, e))?;
    Ok(Archive {
        hash: hex::encode(Sha256::digest(&data)),
        data,
        source: source.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn names(a: &Archive) -> Vec<String> {
        let gz = flate2::read::GzDecoder::new(&a.data[..]);
        tar::Archive::new(gz)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn the_same_files_give_the_same_archive() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app");
        std::fs::create_dir_all(src.join("lib")).unwrap();
        std::fs::write(src.join("b.txt"), "b").unwrap();
        std::fs::write(src.join("lib/a.py"), "print(1)").unwrap();
        std::os::unix::fs::symlink("b.txt", src.join("link")).unwrap();
        let one = pack(&src, None).unwrap();
        // Another modification time changes nothing; another byte changes the hash.
        std::fs::write(src.join("b.txt"), "b").unwrap();
        assert_eq!(pack(&src, None).unwrap().hash, one.hash);
        std::fs::write(src.join("b.txt"), "c").unwrap();
        assert_ne!(pack(&src, None).unwrap().hash, one.hash);
        assert_eq!(names(&one), ["b.txt", "lib", "lib/a.py", "link"]);
    }

    #[test]
    fn a_file_is_stored_under_the_name_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("conf.ini"), "x=1").unwrap();
        let a = pack(&dir.path().join("conf.ini"), Some("app.ini")).unwrap();
        assert_eq!(names(&a), ["app.ini"]);
        let b = pack(&dir.path().join("conf.ini"), None).unwrap();
        assert_eq!(names(&b), ["conf.ini"]);
    }
}
