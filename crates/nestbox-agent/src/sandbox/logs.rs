//! A sandbox's log: what its VM writes to its console (the kernel, init and the guest
//! agent, which logs one JSON object per line), collected into time-stamped entries on the
//! host, plus the host's own lifecycle events for it.
//!
//! ```text
//!   console.log (written by the VMM)  ──collect──▶  logs.jsonl  ──rotate──▶  logs.1.jsonl
//!        read from `offset`, consumed                 one entry per line        the previous
//!        bytes punched out of the file                {seq, ts, level, msg,     generation
//!                                                      fields}
//! ```
//!
//! Invariants:
//! - entries are numbered (`seq`) without gaps from 1, and their times never go back: an
//!   entry takes the guest's own time when it has one that lies between the previous
//!   entry's and now, else the host's time of collection (the guest's clock is the
//!   tenant's to change);
//! - the log is bounded: `logs.jsonl` rotates at [`ROTATE_BYTES`] (one older generation is
//!   kept), lines are cut at [`MAX_LINE`], and the console file's consumed bytes are given
//!   back to the file system (a hole punched behind the read position), so a chatty guest
//!   cannot fill the host's disk;
//! - a new VMM truncates the console file: [`SandboxLog::new_console`] must be called
//!   before one starts, so no line is read twice or cut;
//! - the read position is kept in `logs.pos`, so an agent restart neither repeats nor
//!   loses lines.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The VMM's console output in a sandbox's directory.
pub(crate) const CONSOLE_FILE: &str = "console.log";
const LOG_FILE: &str = "logs.jsonl";
const OLD_LOG_FILE: &str = "logs.1.jsonl";
const POS_FILE: &str = "logs.pos";

/// `logs.jsonl` is rotated once it is this large (so a sandbox keeps at most twice this).
pub(crate) const ROTATE_BYTES: u64 = 4 << 20;
/// Longer console lines are cut (the rest of the line is dropped).
pub(crate) const MAX_LINE: usize = 16 << 10;
/// Consumed console bytes are punched out once this many have accumulated.
const PUNCH_EVERY: u64 = 1 << 20;
/// How much of the console file's end is never punched (boot errors quote its tail).
const KEEP_TAIL: u64 = 64 << 10;
/// At most this much console output is read per collection.
const READ_CHUNK: u64 = 1 << 20;

/// Severity, as E2B names it (ordered: `debug < info < warn < error`).
pub use nestbox_types::api::LogLevel as Level;

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its number in the sandbox's log, from 1.
    pub seq: u64,
    /// When, in Unix milliseconds.
    pub ts: i64,
    /// Severity.
    pub level: Level,
    /// The message.
    pub msg: String,
    /// Structured fields (`source` says where it came from: `console`, `guest` or `host`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
}

/// What to read from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Forward: entries at or after this time; backward: at or before it.
    pub start_ms: Option<i64>,
    /// Forward: entries after this `seq`; backward: before it.
    pub cursor: Option<u64>,
    /// At most this many entries.
    pub limit: usize,
    /// Newest first, going back in time.
    pub backward: bool,
    /// Entries at least this severe.
    pub min_level: Level,
    /// Entries whose message contains this (case-insensitively).
    pub search: Option<String>,
}

/// A page of entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// In the direction asked for.
    pub entries: Vec<Entry>,
    /// Whether more entries matched past the last one.
    pub more: bool,
}

/// Where the collector is: persisted as `logs.pos`.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Position {
    /// Bytes of the console file already read.
    offset: u64,
    /// Up to where the console file has been punched.
    punched: u64,
}

/// The writer of one sandbox's log. Blocking I/O: call it from a blocking context.
#[derive(Debug)]
pub(crate) struct SandboxLog {
    dir: PathBuf,
    pos: Position,
    /// The start of a console line whose end has not arrived yet.
    partial: Vec<u8>,
    next_seq: u64,
    last_ts: i64,
}

impl SandboxLog {
    /// Opens (or starts) the log in `dir`, continuing its numbering and read position.
    pub(crate) fn open(dir: &Path) -> Self {
        let pos = std::fs::read(dir.join(POS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let last = last_entry(&dir.join(LOG_FILE)).or_else(|| last_entry(&dir.join(OLD_LOG_FILE)));
        Self {
            dir: dir.to_path_buf(),
            pos,
            partial: Vec::new(),
            next_seq: last.as_ref().map_or(1, |e| e.seq + 1),
            last_ts: last.map_or(0, |e| e.ts),
        }
    }

    /// A new VMM is about to start and truncate the console file: read it from the start.
    /// What the previous one left unfinished on a line is logged as it is.
    pub(crate) fn new_console(&mut self) -> std::io::Result<()> {
        self.collect(Utc::now().timestamp_millis())?;
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            let now = Utc::now().timestamp_millis();
            let entry = self.entry_from_console(&line, now);
            self.append(entry.into_iter().collect())?;
        }
        self.pos = Position::default();
        self.save_pos()
    }

    /// Logs an event of the host's (paused, resumed, …).
    pub(crate) fn event(&mut self, level: Level, msg: &str) -> std::io::Result<()> {
        let now = Utc::now().timestamp_millis();
        let mut fields = BTreeMap::new();
        fields.insert("source".to_string(), "host".to_string());
        let entry = self.next(now, None, level, msg.to_string(), fields);
        self.append(vec![entry])
    }

    /// Reads what the console got since the last call and logs its complete lines.
    pub(crate) fn collect(&mut self, now_ms: i64) -> std::io::Result<()> {
        let console = self.dir.join(CONSOLE_FILE);
        // Writable only so that read bytes can be punched out (`fallocate` needs it).
        let mut file = match OpenOptions::new().read(true).write(true).open(&console) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        if len < self.pos.offset {
            // Truncated under us (a VMM started without `new_console`): start over.
            self.pos = Position::default();
            self.partial.clear();
        }
        if len == self.pos.offset {
            return Ok(());
        }
        file.seek(SeekFrom::Start(self.pos.offset))?;
        let mut chunk = Vec::new();
        Read::take(&file, READ_CHUNK).read_to_end(&mut chunk)?;
        self.pos.offset += chunk.len() as u64;
        let mut entries = Vec::new();
        let mut rest = chunk.as_slice();
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(nl);
            rest = &tail[1..];
            if self.partial.is_empty() {
                entries.extend(self.entry_from_console(line, now_ms));
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                extend_capped(&mut whole, line);
                entries.extend(self.entry_from_console(&whole, now_ms));
            }
        }
        extend_capped(&mut self.partial, rest);
        self.append(entries)?;
        self.save_pos()?;
        self.punch(&file);
        Ok(())
    }

    /// Gives the console bytes already read back to the file system (keeping the tail).
    fn punch(&mut self, file: &File) {
        let upto = self.pos.offset.saturating_sub(KEEP_TAIL);
        if upto < self.pos.punched + PUNCH_EVERY {
            return;
        }
        let Ok(len) = i64::try_from(upto) else { return };
        // A file system that cannot punch holes keeps the bytes; nothing else changes.
        if nix::fcntl::fallocate(
            file.as_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            len,
        )
        .is_ok()
        {
            self.pos.punched = upto;
        }
    }

    fn entry_from_console(&mut self, line: &[u8], now_ms: i64) -> Option<Entry> {
        let text = String::from_utf8_lossy(&line[..line.len().min(MAX_LINE)]);
        let text = text.trim_end_matches('\r').trim_matches('\0');
        if text.trim().is_empty() {
            return None;
        }
        let (guest_ts, level, msg, fields) = parse_line(text);
        Some(self.next(now_ms, guest_ts, level, msg, fields))
    }

    fn next(
        &mut self,
        now_ms: i64,
        guest_ts: Option<i64>,
        level: Level,
        msg: String,
        fields: BTreeMap<String, String>,
    ) -> Entry {
        let ts = guest_ts
            .filter(|&t| t >= self.last_ts && t <= now_ms)
            .unwrap_or(now_ms)
            .max(self.last_ts);
        self.last_ts = ts;
        let seq = self.next_seq;
        self.next_seq += 1;
        Entry {
            seq,
            ts,
            level,
            msg,
            fields,
        }
    }

    fn append(&mut self, entries: Vec<Entry>) -> std::io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(LOG_FILE);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() >= ROTATE_BYTES) {
            std::fs::rename(&path, self.dir.join(OLD_LOG_FILE))?;
        }
        let mut out = Vec::new();
        for e in &entries {
            serde_json::to_writer(&mut out, e).map_err(std::io::Error::other)?;
            out.push(b'\n');
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?
            .write_all(&out)
    }

    fn save_pos(&self) -> std::io::Result<()> {
        let tmp = self.dir.join("logs.pos.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(&self.pos).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, self.dir.join(POS_FILE))
    }
}

fn extend_capped(buf: &mut Vec<u8>, more: &[u8]) {
    let room = MAX_LINE.saturating_sub(buf.len());
    buf.extend_from_slice(&more[..more.len().min(room)]);
}

/// A console line: the guest agent's JSON (`{"timestamp","level","fields":{"message",…}}`)
/// or plain text (the kernel, init).
fn parse_line(text: &str) -> (Option<i64>, Level, String, BTreeMap<String, String>) {
    #[derive(Deserialize)]
    struct GuestLine {
        timestamp: Option<String>,
        level: Option<String>,
        #[serde(default)]
        fields: serde_json::Map<String, serde_json::Value>,
    }
    let mut fields = BTreeMap::new();
    if text.starts_with('{')
        && let Ok(line) = serde_json::from_str::<GuestLine>(text)
        && let Some(serde_json::Value::String(msg)) = line.fields.get("message")
    {
        let ts = line
            .timestamp
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.timestamp_millis());
        let level = line
            .level
            .as_deref()
            .and_then(Level::parse)
            .unwrap_or(Level::Info);
        fields.insert("source".to_string(), "guest".to_string());
        for (k, v) in &line.fields {
            if k == "message" || k == "source" {
                continue;
            }
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            fields.insert(k.clone(), v);
        }
        return (ts, level, msg.clone(), fields);
    }
    fields.insert("source".to_string(), "console".to_string());
    (None, Level::Info, text.to_string(), fields)
}

fn last_entry(path: &Path) -> Option<Entry> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Entry>(l).ok())
}

/// Reads a page of the log in `dir` (blocking).
pub(crate) fn read(dir: &Path, q: &Query) -> std::io::Result<Page> {
    let search = q.search.as_ref().map(|s| s.to_lowercase());
    let matches = |e: &Entry| {
        e.level >= q.min_level
            && match q.start_ms {
                Some(t) if q.backward => e.ts <= t,
                Some(t) => e.ts >= t,
                None => true,
            }
            && match q.cursor {
                Some(c) if q.backward => e.seq < c,
                Some(c) => e.seq > c,
                None => true,
            }
            && search
                .as_ref()
                .is_none_or(|s| e.msg.to_lowercase().contains(s))
    };
    let mut all = Vec::new();
    for name in [OLD_LOG_FILE, LOG_FILE] {
        let file = match File::open(dir.join(name)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in BufReader::new(file).lines() {
            // A line cut by a crash mid-write is skipped.
            if let Ok(e) = serde_json::from_str::<Entry>(&line?)
                && matches(&e)
            {
                all.push(e);
            }
        }
    }
    if q.backward {
        all.reverse();
    }
    let more = all.len() > q.limit;
    all.truncate(q.limit);
    Ok(Page { entries: all, more })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(dir: &Path, text: &str) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(CONSOLE_FILE))
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn q() -> Query {
        Query {
            start_ms: None,
            cursor: None,
            limit: 100,
            backward: false,
            min_level: Level::Debug,
            search: None,
        }
    }

    fn msgs(p: &Page) -> Vec<&str> {
        p.entries.iter().map(|e| e.msg.as_str()).collect()
    }

    #[test]
    fn console_lines_become_entries_and_guest_json_keeps_its_level_and_fields() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SandboxLog::open(dir.path());
        console(
            dir.path(),
            "{\"timestamp\":\"2026-12-03T00:00:00.500Z\",\"level\":\"WARN\",\"fields\":{\"message\":\"process ended\",\"pid\":7,\"status\":\"exit 1\"},\"target\":\"x\"}\n[    0.1] Linux version\r\n\nhalf a li",
        );
        log.collect(1_800_000_000_000).unwrap();
        let page = read(dir.path(), &q()).unwrap();
        assert_eq!(msgs(&page), ["process ended", "[    0.1] Linux version"]);
        let (b, a) = (&page.entries[0], &page.entries[1]);
        assert_eq!((b.seq, a.seq), (1, 2));
        assert_eq!(a.fields["source"], "console");
        assert_eq!(
            (b.level, b.fields["source"].as_str()),
            (Level::Warn, "guest")
        );
        assert_eq!(
            (b.fields["pid"].as_str(), b.fields["status"].as_str()),
            ("7", "exit 1")
        );
        // The guest's time lies between the previous entry's and now: it is kept; the
        // plain line gets the host's.
        assert_eq!((b.ts, a.ts), (1_796_256_000_500, 1_800_000_000_000));
        assert!(!b.fields.contains_key("message"));

        // The rest of the line arrives; the guest's clock is behind the log: host time.
        console(
            dir.path(),
            "ne\n{\"timestamp\":\"2000-01-01T00:00:00Z\",\"level\":\"INFO\",\"fields\":{\"message\":\"late\"}}\n",
        );
        log.collect(1_800_000_001_000).unwrap();
        let page = read(dir.path(), &q()).unwrap();
        assert_eq!(&msgs(&page)[2..], ["half a line", "late"]);
        assert_eq!(page.entries[3].ts, 1_800_000_001_000);
    }

    #[test]
    fn numbering_and_position_survive_a_restart_and_a_new_console_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SandboxLog::open(dir.path());
        console(dir.path(), "one\ntwo\n");
        log.collect(1000).unwrap();
        drop(log);
        // Reopened (an agent restart): nothing is read twice; numbering goes on.
        let mut log = SandboxLog::open(dir.path());
        console(dir.path(), "three\n");
        log.collect(2000).unwrap();
        log.event(Level::Info, "paused").unwrap();
        // A new VMM truncates the console.
        log.new_console().unwrap();
        std::fs::write(dir.path().join(CONSOLE_FILE), "four\n").unwrap();
        log.collect(3000).unwrap();
        let page = read(dir.path(), &q()).unwrap();
        assert_eq!(msgs(&page), ["one", "two", "three", "paused", "four"]);
        let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert_eq!(page.entries[3].fields["source"], "host");
        // Times never go back, even when the clock does.
        log.event(Level::Info, "x").unwrap();
        let page = read(dir.path(), &q()).unwrap();
        assert!(page.entries.windows(2).all(|w| w[0].ts <= w[1].ts));
    }

    #[test]
    fn queries_page_both_ways_and_filter_by_level_time_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SandboxLog::open(dir.path());
        for (i, lvl) in ["INFO", "WARN", "ERROR", "DEBUG", "INFO"]
            .iter()
            .enumerate()
        {
            console(
                dir.path(),
                &format!("{{\"level\":\"{lvl}\",\"fields\":{{\"message\":\"Line {i}\"}}}}\n"),
            );
            log.collect(1000 + i as i64 * 10).unwrap();
        }
        let first = read(dir.path(), &Query { limit: 2, ..q() }).unwrap();
        assert_eq!((msgs(&first), first.more), (vec!["Line 0", "Line 1"], true));
        let next = read(
            dir.path(),
            &Query {
                limit: 2,
                cursor: Some(first.entries[1].seq),
                ..q()
            },
        )
        .unwrap();
        assert_eq!(msgs(&next), ["Line 2", "Line 3"]);
        let back = read(
            dir.path(),
            &Query {
                backward: true,
                limit: 3,
                ..q()
            },
        )
        .unwrap();
        assert_eq!(msgs(&back), ["Line 4", "Line 3", "Line 2"]);
        let warn = read(
            dir.path(),
            &Query {
                min_level: Level::Warn,
                ..q()
            },
        )
        .unwrap();
        assert_eq!(msgs(&warn), ["Line 1", "Line 2"]);
        let since = read(
            dir.path(),
            &Query {
                start_ms: Some(1020),
                ..q()
            },
        )
        .unwrap();
        assert_eq!(msgs(&since), ["Line 2", "Line 3", "Line 4"]);
        let until = read(
            dir.path(),
            &Query {
                start_ms: Some(1010),
                backward: true,
                ..q()
            },
        )
        .unwrap();
        assert_eq!(msgs(&until), ["Line 1", "Line 0"]);
        let found = read(
            dir.path(),
            &Query {
                search: Some("line 3".into()),
                ..q()
            },
        )
        .unwrap();
        assert_eq!(msgs(&found), ["Line 3"]);
    }

    #[test]
    fn the_log_is_bounded_long_lines_are_cut_and_read_bytes_are_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SandboxLog::open(dir.path());
        let long = "x".repeat(MAX_LINE * 2);
        console(dir.path(), &format!("{long}\n"));
        log.collect(1).unwrap();
        let page = read(dir.path(), &q()).unwrap();
        assert_eq!(page.entries[0].msg.len(), MAX_LINE);

        // Enough output to rotate twice: at most two generations stay.
        let line = format!("{}\n", "y".repeat(1000));
        let mut total = 0u64;
        while total < ROTATE_BYTES * 3 {
            console(dir.path(), &line.repeat(1000));
            log.collect(2).unwrap();
            total += line.len() as u64 * 1000;
        }
        let kept: u64 = [LOG_FILE, OLD_LOG_FILE]
            .iter()
            .map(|n| std::fs::metadata(dir.path().join(n)).unwrap().len())
            .sum();
        assert!(
            kept <= ROTATE_BYTES * 2 + (READ_CHUNK * 2),
            "{kept} bytes kept"
        );
        let page = read(dir.path(), &q()).unwrap();
        assert!(page.entries[0].seq > 1, "the oldest generation went");
        // The console file keeps its size but not its read bytes.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.path().join(CONSOLE_FILE)).unwrap();
        assert!(meta.len() > ROTATE_BYTES * 3);
        assert!(log.pos.punched > 0, "ext4, XFS and tmpfs punch holes");
        assert!(meta.blocks() * 512 < meta.len() / 2, "holes punched");
    }
}
