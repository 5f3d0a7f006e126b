//! The event hub: every event the server learns of (provisioning progress from Create
//! and Start, status changes seen by the status watcher) goes to every Watch stream.
//!
//! Status events (running, exited, failed, deleted) come from two sources that can see
//! the same change — the Start call that booted a sandbox and the watcher that polls
//! the state directories — so the hub drops a status event equal to the last one it
//! published for that sandbox.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

use crate::proto::event::Kind;
use crate::proto::Event;

/// Events a slow Watch stream may fall behind by before it is ended with ABORTED.
const BACKLOG: usize = 4096;

/// Fans events out to the Watch streams.
#[derive(Debug)]
pub struct Hub {
    sender: broadcast::Sender<Event>,
    last_status: Mutex<HashMap<String, Kind>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            sender: broadcast::channel(BACKLOG).0,
            last_status: Mutex::new(HashMap::new()),
        }
    }
}

impl Hub {
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    /// Publishes `kind` for the sandbox `id` (empty while a Create has not chosen one).
    pub fn publish(&self, id: &str, name: Option<&str>, kind: Kind) {
        if is_status(&kind) {
            let mut last = self.last_status.lock().expect("hub lock");
            if last.get(id) == Some(&kind) {
                return;
            }
            if matches!(kind, Kind::Deleted(_)) {
                last.remove(id);
            } else {
                last.insert(id.to_owned(), kind.clone());
            }
        }
        let event = Event {
            sandbox_id: id.to_owned(),
            name: name.unwrap_or_default().to_owned(),
            time_unix_ms: now_ms(),
            kind: Some(kind),
        };
        // No receivers is fine: nobody watches.
        let _ = self.sender.send(event);
    }

    /// Records `kind` as a sandbox's known status without publishing it (what the
    /// server found at start-up is not news).
    pub fn remember(&self, id: &str, kind: Kind) {
        self.last_status
            .lock()
            .expect("hub lock")
            .insert(id.to_owned(), kind);
    }
}

/// Whether `kind` reports a status (as opposed to progress within one).
fn is_status(kind: &Kind) -> bool {
    matches!(
        kind,
        Kind::Created(_) | Kind::Running(_) | Kind::Exited(_) | Kind::Failed(_) | Kind::Deleted(_)
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Booting, Deleted, Running};

    #[test]
    fn repeated_status_events_are_dropped_progress_is_not() {
        let hub = Hub::default();
        let mut rx = hub.subscribe();
        hub.publish("a", None, Kind::Booting(Booting {}));
        hub.publish("a", None, Kind::Booting(Booting {}));
        hub.publish("a", Some("n"), Kind::Running(Running {}));
        hub.publish("a", Some("n"), Kind::Running(Running {}));
        hub.publish("b", None, Kind::Running(Running {}));
        hub.remember("c", Kind::Running(Running {}));
        hub.publish("c", None, Kind::Running(Running {}));
        hub.publish("a", None, Kind::Deleted(Deleted {}));
        hub.publish("a", None, Kind::Running(Running {}));
        let mut seen = Vec::new();
        while let Ok(event) = rx.try_recv() {
            let kind = match event.kind.unwrap() {
                Kind::Booting(_) => "booting",
                Kind::Running(_) => "running",
                Kind::Deleted(_) => "deleted",
                other => panic!("unexpected {other:?}"),
            };
            seen.push(format!("{}:{kind}", event.sandbox_id));
        }
        assert_eq!(
            seen,
            [
                "a:booting",
                "a:booting",
                "a:running",
                "b:running",
                "a:deleted",
                "a:running"
            ]
        );
    }
}
