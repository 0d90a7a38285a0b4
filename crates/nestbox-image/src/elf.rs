//! Just enough ELF64 reading for the image builder: is a binary static, does a kernel
//! carry the PVH entry note, what does a module's `.modinfo` say.
//!
//! Pure functions over byte slices; malformed input yields `None`/`false`, never a panic.

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point QEMU's `-kernel` boots through.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 0x12;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Whether `b` starts like a little-endian ELF64 file.
pub fn is_elf64(b: &[u8]) -> bool {
    b.len() > 64 && b[..4] == *b"\x7fELF" && b[4] == 2 && b[5] == 1
}

/// Program headers as (type, offset, file size).
fn program_headers(b: &[u8]) -> Option<Vec<(u32, usize, usize)>> {
    if !is_elf64(b) {
        return None;
    }
    let phoff = usize::try_from(u64_at(b, 0x20)?).ok()?;
    let phentsize = usize::from(u16_at(b, 0x36)?);
    let phnum = usize::from(u16_at(b, 0x38)?);
    let mut out = Vec::with_capacity(phnum);
    for i in 0..phnum {
        let h = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32_at(b, h)?;
        let off = usize::try_from(u64_at(b, h + 8)?).ok()?;
        let size = usize::try_from(u64_at(b, h + 32)?).ok()?;
        out.push((p_type, off, size));
    }
    Some(out)
}

/// Whether an ELF executable is statically linked (has no `PT_INTERP`).
pub fn is_static_executable(b: &[u8]) -> Option<bool> {
    Some(!program_headers(b)?.iter().any(|(t, _, _)| *t == PT_INTERP))
}

/// Whether an ELF kernel carries the Xen `PHYS32_ENTRY` note (PVH direct boot).
pub fn has_pvh_entry_note(b: &[u8]) -> bool {
    let Some(headers) = program_headers(b) else {
        return false;
    };
    headers
        .iter()
        .filter(|(t, _, _)| *t == PT_NOTE)
        .any(|&(_, off, size)| notes_contain(b, off, size, b"Xen", XEN_ELFNOTE_PHYS32_ENTRY))
}

fn notes_contain(b: &[u8], off: usize, size: usize, name: &[u8], wanted: u32) -> bool {
    let Some(end) = off.checked_add(size).filter(|e| *e <= b.len()) else {
        return false;
    };
    let align = |n: usize| (n + 3) & !3;
    let mut p = off;
    while p + 12 <= end {
        let (Some(namesz), Some(descsz), Some(ntype)) =
            (u32_at(b, p), u32_at(b, p + 4), u32_at(b, p + 8))
        else {
            return false;
        };
        let (namesz, descsz) = (namesz as usize, descsz as usize);
        let name_start = p + 12;
        let note_name = b.get(name_start..name_start + namesz).unwrap_or_default();
        let trimmed = note_name.strip_suffix(b"\0").unwrap_or(note_name);
        if trimmed == name && ntype == wanted {
            return true;
        }
        p = name_start + align(namesz) + align(descsz);
    }
    false
}

/// The contents of the named section.
pub fn section<'a>(b: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if !is_elf64(b) {
        return None;
    }
    let shoff = usize::try_from(u64_at(b, 0x28)?).ok()?;
    let shentsize = usize::from(u16_at(b, 0x3A)?);
    let shnum = usize::from(u16_at(b, 0x3C)?);
    let shstrndx = usize::from(u16_at(b, 0x3E)?);
    let header = |i: usize| -> Option<(u32, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(b, h)?;
        let off = usize::try_from(u64_at(b, h + 24)?).ok()?;
        let size = usize::try_from(u64_at(b, h + 32)?).ok()?;
        Some((name, off, size))
    };
    let (_, stroff, strsize) = header(shstrndx)?;
    let strtab = b.get(stroff..stroff.checked_add(strsize)?)?;
    for i in 0..shnum {
        let (name, off, size) = header(i)?;
        let name_bytes = strtab.get(name as usize..)?;
        let name_end = name_bytes.iter().position(|c| *c == 0)?;
        if &name_bytes[..name_end] == wanted.as_bytes() {
            return b.get(off..off.checked_add(size)?);
        }
    }
    None
}

/// The `depends=` entry of a kernel module's `.modinfo`, split into module names.
pub fn module_depends(ko: &[u8]) -> Option<Vec<String>> {
    let info = section(ko, ".modinfo")?;
    for entry in info.split(|c| *c == 0) {
        if let Some(deps) = entry.strip_prefix(b"depends=") {
            let deps = String::from_utf8_lossy(deps);
            return Some(
                deps.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.replace('-', "_"))
                    .collect(),
            );
        }
    }
    Some(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_elf_is_rejected_quietly() {
        assert!(!is_elf64(b"hello"));
        assert!(!has_pvh_entry_note(&[0u8; 100]));
        assert_eq!(is_static_executable(b"#!/bin/sh\n"), None);
        assert_eq!(module_depends(b"junk"), None);
    }

    #[test]
    fn this_test_binary_is_an_elf() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(is_elf64(&exe));
        assert!(is_static_executable(&exe).is_some());
        assert!(!has_pvh_entry_note(&exe));
    }

    #[test]
    fn notes_are_walked() {
        // One note: namesz 4 ("Xen\0"), descsz 4, type 0x12.
        let mut n = Vec::new();
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&0x12u32.to_le_bytes());
        n.extend_from_slice(b"Xen\0");
        n.extend_from_slice(&[1, 2, 3, 4]);
        assert!(notes_contain(&n, 0, n.len(), b"Xen", 0x12));
        assert!(!notes_contain(&n, 0, n.len(), b"Xen", 0x11));
        assert!(!notes_contain(&n, 0, n.len() + 1, b"Xen", 0x12));
    }
}
