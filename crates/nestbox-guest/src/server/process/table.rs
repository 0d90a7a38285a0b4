//! The process table: every process started through `process.Process` until it ends.
//!
//! A process is inserted when it starts and removed by its supervisor right before the end
//! event is published, so a `Connect` either attaches in time to see the end or gets
//! `not_found`. Tags are unique among running processes: a tag is reserved *before* the
//! process is spawned (a duplicate fails without starting anything) and released when the
//! process ends or fails to start. The lock is held only for map operations.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nestbox_envd::connect::ConnectError;
use nestbox_envd::process::{ProcessConfig, ProcessInfo, ProcessSelector, process_selector};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::ChildStdin;
use tokio::sync::Mutex as AsyncMutex;

use super::output::Broadcaster;
use super::spawn::PtyMaster;

/// Where a process's input goes.
#[derive(Debug)]
pub enum InputSink {
    /// Its stdin pipe.
    Pipe(ChildStdin),
    /// Its terminal.
    Pty(Arc<PtyMaster>),
}

/// A running process, shared by its supervisor and the request handlers.
#[derive(Debug)]
pub struct ProcessHandle {
    /// Pid, which is also the process group id.
    pub pid: u32,
    /// The client's tag.
    pub tag: Option<String>,
    /// The configuration as requested (reported by `List`).
    pub config: ProcessConfig,
    /// Its events.
    pub output: Broadcaster,
    /// Its input; `None` once closed (or never opened).
    pub input: AsyncMutex<Option<InputSink>>,
    /// Its terminal, for resizing.
    pub pty: Option<Arc<PtyMaster>>,
    /// Set by the supervisor once the process has been reaped: from then on its pid may
    /// belong to someone else, so no signal may be sent to it.
    pub exited: AtomicBool,
}

impl ProcessHandle {
    /// Sends `signal` to the process's group, unless it has been reaped already.
    pub fn signal_group(&self, signal: Signal) -> Result<(), nix::Error> {
        if self.exited.load(Ordering::Acquire) {
            return Err(nix::Error::ESRCH);
        }
        let pgid = Pid::from_raw(i32::try_from(self.pid).map_err(|_| nix::Error::EINVAL)?);
        nix::sys::signal::killpg(pgid, signal)
    }
}

#[derive(Debug, Default)]
struct Inner {
    by_pid: HashMap<u32, Arc<ProcessHandle>>,
    /// Tag → pid; 0 while the tagged process is being spawned.
    tags: HashMap<String, u32>,
}

/// The table.
#[derive(Debug, Default)]
pub struct ProcessTable {
    inner: Mutex<Inner>,
}

/// A reserved tag, released on drop unless the process was inserted.
#[derive(Debug)]
pub struct TagReservation<'a> {
    table: &'a ProcessTable,
    tag: Option<String>,
}

impl Drop for TagReservation<'_> {
    fn drop(&mut self) {
        if let Some(tag) = self.tag.take() {
            let mut inner = self.table.lock();
            if inner.tags.get(&tag) == Some(&0) {
                inner.tags.remove(&tag);
            }
        }
    }
}

impl ProcessTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `tag` for a process about to start: `already_exists` if it is taken.
    pub fn reserve_tag(&self, tag: Option<&str>) -> Result<TagReservation<'_>, ConnectError> {
        if let Some(tag) = tag {
            let mut inner = self.lock();
            if inner.tags.contains_key(tag) {
                return Err(ConnectError::already_exists(format!(
                    "a process with tag {tag:?} is already running"
                )));
            }
            inner.tags.insert(tag.to_owned(), 0);
        }
        Ok(TagReservation {
            table: self,
            tag: tag.map(str::to_owned),
        })
    }

    /// Inserts a started process, turning its tag reservation into its tag.
    pub fn insert(&self, handle: Arc<ProcessHandle>, mut reservation: TagReservation<'_>) {
        let mut inner = self.lock();
        if let Some(tag) = reservation.tag.take() {
            inner.tags.insert(tag, handle.pid);
        }
        inner.by_pid.insert(handle.pid, handle);
    }

    /// Removes an ended process.
    pub fn remove(&self, pid: u32) {
        let mut inner = self.lock();
        if let Some(handle) = inner.by_pid.remove(&pid)
            && let Some(tag) = &handle.tag
            && inner.tags.get(tag) == Some(&pid)
        {
            inner.tags.remove(tag);
        }
    }

    /// The process a selector names: `not_found` when none, `invalid_argument` when the
    /// selector is empty.
    pub fn get(
        &self,
        selector: Option<&ProcessSelector>,
    ) -> Result<Arc<ProcessHandle>, ConnectError> {
        let inner = self.lock();
        match selector.and_then(|s| s.selector.as_ref()) {
            Some(process_selector::Selector::Pid(pid)) => {
                inner.by_pid.get(pid).cloned().ok_or_else(|| {
                    ConnectError::not_found(format!("no running process with pid {pid}"))
                })
            }
            Some(process_selector::Selector::Tag(tag)) => inner
                .tags
                .get(tag)
                .and_then(|pid| inner.by_pid.get(pid))
                .cloned()
                .ok_or_else(|| {
                    ConnectError::not_found(format!("no running process with tag {tag:?}"))
                }),
            None => Err(ConnectError::invalid_argument(
                "the request selects no process (pid or tag)",
            )),
        }
    }

    /// The running processes, by pid.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let inner = self.lock();
        let mut list: Vec<ProcessInfo> = inner
            .by_pid
            .values()
            .map(|h| ProcessInfo {
                config: Some(h.config.clone()),
                pid: h.pid,
                tag: h.tag.clone(),
            })
            .collect();
        list.sort_by_key(|p| p.pid);
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(pid: u32, tag: Option<&str>) -> Arc<ProcessHandle> {
        Arc::new(ProcessHandle {
            pid,
            tag: tag.map(str::to_owned),
            config: ProcessConfig::default(),
            output: Broadcaster::default(),
            input: AsyncMutex::new(None),
            pty: None,
            exited: AtomicBool::new(false),
        })
    }

    #[test]
    fn tags_are_unique_and_released() {
        let table = ProcessTable::default();
        let reservation = table.reserve_tag(Some("web")).unwrap();
        assert!(table.reserve_tag(Some("web")).is_err());
        table.insert(handle(10, Some("web")), reservation);
        assert_eq!(
            table.get(Some(&ProcessSelector::tag("web"))).unwrap().pid,
            10
        );
        assert_eq!(table.get(Some(&ProcessSelector::pid(10))).unwrap().pid, 10);
        assert!(table.reserve_tag(Some("web")).is_err());
        table.remove(10);
        assert!(table.get(Some(&ProcessSelector::tag("web"))).is_err());
        // A failed start releases its reservation.
        drop(table.reserve_tag(Some("web")).unwrap());
        assert!(table.reserve_tag(Some("web")).is_ok());
        assert!(table.get(None).is_err());
        assert!(table.list().is_empty());
    }
}
