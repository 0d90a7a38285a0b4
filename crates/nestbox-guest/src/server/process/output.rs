//! Fan-out of a process's events to its subscribers (the `Start` stream and any `Connect`
//! streams), without ever letting a subscriber slow the process down.
//!
//! Each subscriber has its own bounded queue of [`QUEUE_EVENTS`] events (output chunks are at
//! most [`super::spawn::READ_CHUNK`] bytes, so at most 8 MiB per subscriber). Publishing never
//! waits: a subscriber whose queue is full is **detached** — its queue is closed and its
//! stream ends with `resource_exhausted` ("fell behind the process's output"), so the client
//! learns that it lost output instead of silently missing bytes; it may reattach with
//! `Connect` and continue from live output. The process and the other subscribers carry on.
//!
//! One slot of every queue is kept free for the end event, so a subscriber that keeps up
//! always receives it. After [`Broadcaster::close`] nobody can subscribe and publishing is a
//! no-op (readers may still be draining pipes that a grandchild holds open).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use nestbox_envd::process::ProcessEvent;
use tokio::sync::mpsc;

/// Events a subscriber may have queued.
pub const QUEUE_EVENTS: usize = 256;
/// Subscribers one process may have at once.
pub const MAX_SUBSCRIBERS: usize = 32;

#[derive(Debug)]
struct Slot {
    tx: mpsc::Sender<ProcessEvent>,
    overflowed: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Inner {
    slots: Vec<Slot>,
    closed: bool,
}

/// The publishing side, owned by the process's handle.
#[derive(Debug, Default)]
pub struct Broadcaster {
    inner: Mutex<Inner>,
}

/// Why a subscription could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The process has ended.
    #[error("the process has ended")]
    Closed,
    /// Too many subscribers.
    #[error("the process has {MAX_SUBSCRIBERS} subscribers already")]
    Full,
}

/// What a subscriber receives next.
#[derive(Debug)]
pub enum Received {
    /// An event.
    Event(ProcessEvent),
    /// The subscriber fell behind and was detached.
    Overflowed,
    /// The queue closed without an end event (the process table was torn down).
    Closed,
}

/// The receiving side, one per stream.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<ProcessEvent>,
    overflowed: Arc<AtomicBool>,
}

impl Subscription {
    /// Waits for the next event.
    pub async fn recv(&mut self) -> Received {
        match self.rx.recv().await {
            Some(event) => Received::Event(event),
            None if self.overflowed.load(Ordering::Acquire) => Received::Overflowed,
            None => Received::Closed,
        }
    }
}

impl Broadcaster {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a subscriber that receives every event published from now on.
    pub fn subscribe(&self) -> Result<Subscription, SubscribeError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(SubscribeError::Closed);
        }
        inner.slots.retain(|s| !s.tx.is_closed());
        if inner.slots.len() >= MAX_SUBSCRIBERS {
            return Err(SubscribeError::Full);
        }
        let (tx, rx) = mpsc::channel(QUEUE_EVENTS + 1);
        let overflowed = Arc::new(AtomicBool::new(false));
        inner.slots.push(Slot {
            tx,
            overflowed: Arc::clone(&overflowed),
        });
        Ok(Subscription { rx, overflowed })
    }

    /// Sends `event` to every subscriber that has room, detaching those that do not.
    pub fn publish(&self, event: &ProcessEvent) {
        let mut inner = self.lock();
        if inner.closed {
            return;
        }
        inner.slots.retain(|slot| {
            // Keep one slot free for the end event.
            if slot.tx.capacity() <= 1 {
                if !slot.tx.is_closed() {
                    slot.overflowed.store(true, Ordering::Release);
                    tracing::debug!("detaching a subscriber that fell behind");
                }
                return false;
            }
            slot.tx.try_send(event.clone()).is_ok()
        });
    }

    /// Sends the end event and closes every queue; later subscriptions fail.
    pub fn close(&self, end: ProcessEvent) {
        let mut inner = self.lock();
        inner.closed = true;
        for slot in inner.slots.drain(..) {
            if slot.tx.try_send(end.clone()).is_err() && !slot.tx.is_closed() {
                slot.overflowed.store(true, Ordering::Release);
            }
        }
    }

    /// Number of attached subscribers.
    #[cfg(test)]
    pub fn subscribers(&self) -> usize {
        let mut inner = self.lock();
        inner.slots.retain(|s| !s.tx.is_closed());
        inner.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nestbox_envd::process::process_event;

    fn data(n: u8) -> ProcessEvent {
        ProcessEvent {
            event: Some(process_event::Event::Data(process_event::DataEvent {
                output: Some(process_event::data_event::Output::Stdout(vec![n].into())),
            })),
        }
    }

    fn end() -> ProcessEvent {
        ProcessEvent {
            event: Some(process_event::Event::End(process_event::EndEvent::default())),
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_detached_and_others_continue() {
        let b = Broadcaster::default();
        let mut slow = b.subscribe().unwrap();
        let mut fast = b.subscribe().unwrap();
        for i in 0..(QUEUE_EVENTS * 2) {
            b.publish(&data((i % 256) as u8));
            assert!(matches!(fast.recv().await, Received::Event(_)));
        }
        b.close(end());
        assert!(matches!(fast.recv().await, Received::Event(e) if e == end()));
        assert!(matches!(fast.recv().await, Received::Closed));
        // The slow one gets what fitted, then learns it was detached.
        let mut got = 0;
        loop {
            match slow.recv().await {
                Received::Event(_) => got += 1,
                Received::Overflowed => break,
                Received::Closed => panic!("expected overflow"),
            }
        }
        assert_eq!(got, QUEUE_EVENTS);
        assert!(matches!(b.subscribe(), Err(SubscribeError::Closed)));
    }

    #[tokio::test]
    async fn the_end_event_always_fits() {
        let b = Broadcaster::default();
        let mut sub = b.subscribe().unwrap();
        for i in 0..(QUEUE_EVENTS - 1) {
            b.publish(&data(i as u8));
        }
        b.close(end());
        let mut events = 0;
        let mut saw_end = false;
        while let Received::Event(e) = sub.recv().await {
            events += 1;
            saw_end = e == end();
        }
        assert_eq!(events, QUEUE_EVENTS);
        assert!(saw_end);
    }

    #[test]
    fn subscribers_are_bounded_and_pruned() {
        let b = Broadcaster::default();
        let subs: Vec<_> = (0..MAX_SUBSCRIBERS)
            .map(|_| b.subscribe().unwrap())
            .collect();
        assert_eq!(b.subscribe().unwrap_err(), SubscribeError::Full);
        drop(subs);
        assert_eq!(b.subscribers(), 0);
        assert!(b.subscribe().is_ok());
    }
}
