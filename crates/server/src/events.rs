//! The event hub: every event the server learns of (provisioning progress from Create
//! and Start, status changes seen by the status watcher) goes to every Watch stream.
//!
//! Status events (created, running, exited, failed, deleted) come from two sources that
//! can see the same change — the RPC that caused it and the watcher that polls the state
//! directories — so the hub drops a status event equal to the last one it published for
//! that sandbox.

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
    /// Status events of a sandbox without an id are never taken for repeats: the id is
    /// what tells one sandbox's news from another's.
    pub fn publish(&self, id: &str, name: Option<&str>, kind: Kind) {
        if let Some(key) = status_key(&kind).filter(|_| !id.is_empty()) {
            let mut last = self.last_status.lock().expect("hub lock");
            if last.get(id) == Some(&key) {
                return;
            }
            last.insert(id.to_owned(), key);
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
}

/// What makes two status events the same news; `None` for progress events. A created
/// sandbox's details do not matter, only that it is (again) created.
fn status_key(kind: &Kind) -> Option<Kind> {
    match kind {
        Kind::Created(_) => Some(Kind::Created(Default::default())),
        Kind::Running(_) | Kind::Exited(_) | Kind::Failed(_) | Kind::Deleted(_) => {
            Some(kind.clone())
        }
        _ => None,
    }
}

/// Milliseconds since the Unix epoch, on this host's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Booting, Deleted, Running, Sandbox};

    #[test]
    fn repeated_status_events_are_dropped_progress_is_not() {
        let hub = Hub::default();
        let mut rx = hub.subscribe();
        hub.publish("a", None, Kind::Booting(Booting {}));
        hub.publish("a", None, Kind::Booting(Booting {}));
        hub.publish("a", Some("n"), Kind::Running(Running {}));
        hub.publish("a", Some("n"), Kind::Running(Running {}));
        hub.publish("b", None, Kind::Running(Running {}));
        hub.publish("a", None, Kind::Deleted(Deleted {}));
        hub.publish("a", None, Kind::Deleted(Deleted {}));
        let created = |started_unix| {
            Kind::Created(Sandbox {
                id: "c".into(),
                started_unix,
                ..Default::default()
            })
        };
        hub.publish("c", None, created(0));
        hub.publish("c", None, created(1));
        let mut seen = Vec::new();
        while let Ok(event) = rx.try_recv() {
            let kind = match event.kind.unwrap() {
                Kind::Booting(_) => "booting",
                Kind::Running(_) => "running",
                Kind::Deleted(_) => "deleted",
                Kind::Created(_) => "created",
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
                "c:created"
            ]
        );
    }
}
