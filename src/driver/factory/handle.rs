//! Requests to the factory-reset machine and the outcome of each reset.

use std::sync::Mutex;

use tokio::sync::{Notify, watch};

/// Outcome of the last finished factory reset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Finished {
    /// Resets finished since the agent started, successful or not.
    pub count: u64,
    /// `None` when the reset succeeded, otherwise the reason it failed.
    pub error: Option<String>,
}

/// Lets the button and the stack driver ask for a factory reset and wait
/// for it. Shared through the runtime.
#[derive(Debug)]
pub struct FactoryResetHandle {
    pending: Mutex<Option<String>>,
    wake: Notify,
    finished: watch::Sender<Finished>,
}

impl Default for FactoryResetHandle {
    fn default() -> Self {
        FactoryResetHandle { pending: Mutex::new(None), wake: Notify::new(), finished: watch::channel(Finished::default()).0 }
    }
}

impl FactoryResetHandle {
    /// Asks for a factory reset. A request while another waits is merged
    /// into it; the first reason is kept.
    pub fn request(&self, reason: &str) {
        tracing::warn!(machine = "factory-reset", reason, "factory reset requested");
        let mut pending = self.pending.lock().expect("no code panics while holding the request lock");
        pending.get_or_insert_with(|| reason.to_string());
        drop(pending);
        self.wake.notify_one();
    }

    /// Waits for a request and returns its reason.
    pub async fn next_request(&self) -> String {
        loop {
            let notified = self.wake.notified();
            if let Some(reason) = self.take_request() {
                return reason;
            }
            notified.await;
        }
    }

    /// Removes a waiting request, if any, and returns its reason.
    pub fn take_request(&self) -> Option<String> {
        self.pending.lock().expect("no code panics while holding the request lock").take()
    }

    /// Publishes the outcome of a finished reset.
    pub fn finish(&self, error: Option<String>) {
        self.finished.send_modify(|finished| {
            finished.count += 1;
            finished.error = error;
        });
    }

    /// Returns a receiver of every finished reset.
    pub fn subscribe(&self) -> watch::Receiver<Finished> {
        self.finished.subscribe()
    }
}
