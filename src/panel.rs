//! The status LED: what each part of the agent reports, and the one condition
//! the LED shows when several hold.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Agent condition shown on the LED, from the highest priority to the
/// lowest. When several conditions apply, the LED shows the first in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Condition {
    ResetRunning,
    ResetArmed,
    NeedsAttention,
    NoSpace,
    WaitingForDocker,
    Applying,
    Downloading,
    Checking,
    RolledBack,
    Starting,
    Healthy,
}

impl Condition {
    pub fn name(self) -> &'static str {
        match self {
            Condition::ResetRunning => "factory reset running",
            Condition::ResetArmed => "factory reset armed",
            Condition::NeedsAttention => "needs attention",
            Condition::NoSpace => "no space",
            Condition::WaitingForDocker => "waiting for the Docker engine",
            Condition::Applying => "applying",
            Condition::Downloading => "downloading",
            Condition::Checking => "checking",
            Condition::RolledBack => "rolled back",
            Condition::Starting => "starting",
            Condition::Healthy => "idle and healthy",
        }
    }
}

/// Parts of the agent that report a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Agent,
    Stack,
    Host,
    /// The space guard: "no space" while a watched filesystem is low.
    Space,
    SelfUpdate,
}

/// Collects the condition of every source and publishes the one that wins.
#[derive(Debug, Clone)]
pub struct Board {
    conditions: Arc<Mutex<BTreeMap<Source, Condition>>>,
    shown: watch::Sender<Condition>,
}

impl Default for Board {
    fn default() -> Self {
        Board::new()
    }
}

impl Board {
    pub fn new() -> Board {
        let (shown, _) = watch::channel(Condition::Starting);
        Board { conditions: Arc::default(), shown }
    }

    /// Sets or clears the condition one source reports.
    pub fn set(&self, source: Source, condition: Option<Condition>) {
        let winner = {
            let mut conditions = self.conditions.lock().expect("no code panics while holding the board lock");
            match condition {
                Some(condition) => conditions.insert(source, condition),
                None => conditions.remove(&source),
            };
            conditions.values().min().copied().unwrap_or(Condition::Healthy)
        };
        self.shown.send_if_modified(|shown| {
            let changed = *shown != winner;
            *shown = winner;
            changed
        });
    }

    /// Returns the condition the LED shows now.
    pub fn shown(&self) -> Condition {
        *self.shown.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Condition> {
        self.shown.subscribe()
    }
}

/// Shows the LED in the log: one line each time the shown condition changes.
pub async fn run_simulated(mut shown: watch::Receiver<Condition>) {
    let mut current = *shown.borrow_and_update();
    tracing::info!(led = current.name(), "LED");
    while shown.changed().await.is_ok() {
        let next = *shown.borrow_and_update();
        if next != current {
            // Every poll shows "checking" for a moment; those blinks go to debug.
            let routine = matches!((current, next), (Condition::Healthy, Condition::Checking) | (Condition::Checking, Condition::Healthy));
            current = next;
            if routine {
                tracing::debug!(led = current.name(), "LED");
            } else {
                tracing::info!(led = current.name(), "LED");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priority_condition_wins() {
        let board = Board::new();

        board.set(Source::Stack, Some(Condition::Applying));
        board.set(Source::Agent, Some(Condition::NoSpace));

        assert_eq!(board.shown(), Condition::NoSpace);
    }

    #[test]
    fn cleared_condition_falls_back() {
        let board = Board::new();
        board.set(Source::Stack, Some(Condition::Applying));

        board.set(Source::Stack, None);

        assert_eq!(board.shown(), Condition::Healthy);
    }
}
