//! Reading a VM's serial console log as it grows: find marker lines with a deadline.
//!
//! The console is a plain file QEMU appends to (`-chardev file`). Markers are matched at
//! the start of a line (after stripping `\r`), so kernel messages and echoed input do not
//! produce false positives.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Follows a console log file from the start.
#[derive(Debug)]
pub struct ConsoleWatcher {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl ConsoleWatcher {
    /// Watches `path` (which may not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Complete lines appended since the last call.
    pub fn new_lines(&mut self) -> Vec<String> {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let Ok(n) = f.read_to_end(&mut buf) else {
            return Vec::new();
        };
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf);
        let mut lines = Vec::new();
        while let Some(pos) = self.partial.iter().position(|c| *c == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line);
            lines.push(text.trim_end_matches(['\n', '\r']).to_string());
        }
        lines
    }

    /// Polls until a line starts with `marker`; returns that line. `alive` is asked on
    /// every poll; when it says the VM is gone, the wait ends with `Ok(None)`. `Err(())`
    /// on time-out.
    pub async fn wait_for(
        &mut self,
        marker: &str,
        limit: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> Result<Option<String>, ()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            for line in self.new_lines() {
                if line.starts_with(marker) {
                    return Ok(Some(line));
                }
            }
            if !alive() {
                // One last read: the marker may have been written right before exit.
                return Ok(self.new_lines().into_iter().find(|l| l.starts_with(marker)));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The last `n` lines of a file, for error messages.
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn finds_markers_at_line_start_across_partial_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut w = ConsoleWatcher::new(&path);
        assert!(w.new_lines().is_empty());
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"boot\r\nsaid NESTBOX-READY t=1 inside\nNESTBOX-RE")
            .unwrap();
        assert_eq!(w.new_lines(), vec!["boot", "said NESTBOX-READY t=1 inside"]);
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            f.write_all(b"ADY t=1234\n").unwrap();
        });
        let line = w
            .wait_for("NESTBOX-READY", Duration::from_secs(5), || true)
            .await
            .unwrap();
        assert_eq!(line.as_deref(), Some("NESTBOX-READY t=1234"));
        writer.await.unwrap();
        assert_eq!(tail_lines(&path, 1), "NESTBOX-READY t=1234");
    }

    #[tokio::test]
    async fn times_out_or_stops_when_the_vm_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ConsoleWatcher::new(dir.path().join("none.log"));
        assert_eq!(
            w.wait_for("X", Duration::from_millis(30), || true).await,
            Err(())
        );
        assert_eq!(
            w.wait_for("X", Duration::from_secs(5), || false).await,
            Ok(None)
        );
    }
}
