//! Turns: only one process changes the device at a time.
//!
//! A host patch can restart dockerd, a stack update must not race a handover,
//! and a factory reset replaces everything, so the self-update, the stack
//! update, the host patch and the factory reset take turns. When several
//! wait, the turn goes to the first in this order: factory reset,
//! self-update, stack update, host patch. The space guard never takes a turn:
//! it always runs. Downloads do not need a turn; only steps that stop, start
//! or replace something do.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::Notify;

/// The processes that take turns, in the order they get the turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Process {
    FactoryReset,
    SelfUpdate,
    Stack,
    HostPatch,
}

impl Process {
    pub fn name(self) -> &'static str {
        match self {
            Process::FactoryReset => "factory-reset",
            Process::SelfUpdate => "self-update",
            Process::Stack => "stack",
            Process::HostPatch => "host-patch",
        }
    }
}

/// The process holding the turn, and what it does with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub process: Process,
    pub purpose: String,
}

/// A process waiting for the turn, and why it waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Waiter {
    pub process: Process,
    pub purpose: String,
    pub reason: String,
}

/// Holder and waiters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Snapshot {
    pub holder: Option<Holder>,
    pub waiting: Vec<Waiter>,
}

#[derive(Debug, Default)]
struct Turns {
    holder: Option<Holder>,
    waiting: BTreeMap<Process, String>,
}

/// Hands out turns; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Coordinator {
    turns: Arc<Mutex<Turns>>,
    released: Arc<Notify>,
}

impl Coordinator {
    pub fn new() -> Coordinator {
        Coordinator::default()
    }

    /// Waits for the turn and returns it. `purpose` shows in the status, for
    /// example "apply commit 1a2b3c4d5e6f". The turn is released when the
    /// returned value is dropped.
    pub async fn acquire(&self, process: Process, purpose: &str) -> Turn {
        let mut announced = false;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();

            {
                let mut turns = self.lock();
                let ahead = turns.waiting.keys().any(|waiting| *waiting < process);
                if turns.holder.is_none() && !ahead {
                    turns.waiting.remove(&process);
                    turns.holder = Some(Holder { process, purpose: purpose.to_string() });
                    if announced {
                        tracing::info!(process = process.name(), purpose, "got the turn");
                    }
                    return Turn { coordinator: self.clone(), process };
                }
                turns.waiting.insert(process, purpose.to_string());
                if !announced {
                    let blocker = turns.holder.as_ref().map_or("a process ahead of it", |holder| holder.process.name());
                    tracing::info!(process = process.name(), purpose, waiting_for = blocker, "waiting for the turn");
                    announced = true;
                }
            }
            released.await;
        }
    }

    /// Returns the holder of the turn and the waiting processes, with the reason.
    pub fn snapshot(&self) -> Snapshot {
        let turns = self.lock();
        let waiting = turns
            .waiting
            .iter()
            .map(|(process, purpose)| {
                let reason = match &turns.holder {
                    Some(holder) => format!("waiting for {} to finish: {}", holder.process.name(), holder.purpose),
                    None => "waiting for a process with higher priority".to_string(),
                };
                Waiter { process: *process, purpose: purpose.clone(), reason }
            })
            .collect();
        Snapshot { holder: turns.holder.clone(), waiting }
    }

    /// Returns the wait reason of `process`, if it waits.
    pub fn waiting_reason(&self, process: Process) -> Option<String> {
        self.snapshot().waiting.into_iter().find(|waiter| waiter.process == process).map(|waiter| waiter.reason)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Turns> {
        // A panic while holding this lock leaves the turns consistent: every
        // change is a single assignment.
        self.turns.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn release(&self, process: Process) {
        let mut turns = self.lock();
        if turns.holder.as_ref().is_some_and(|holder| holder.process == process) {
            turns.holder = None;
        }
        drop(turns);
        self.released.notify_waiters();
    }
}

/// The right to change the device, held until dropped.
#[derive(Debug)]
pub struct Turn {
    coordinator: Coordinator,
    process: Process,
}

impl Turn {
    pub fn process(&self) -> Process {
        self.process
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.coordinator.release(self.process);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn second_process_waits_for_first() {
        let coordinator = Coordinator::new();
        let stack = coordinator.acquire(Process::Stack, "apply").await;
        let waiter = coordinator.clone();
        let host = tokio::spawn(async move { waiter.acquire(Process::HostPatch, "upgrade").await.process() });

        tokio::time::sleep(Duration::from_millis(10)).await;
        let snapshot = coordinator.snapshot();
        assert_eq!(snapshot.holder.as_ref().map(|holder| holder.process), Some(Process::Stack));
        assert_eq!(snapshot.waiting.len(), 1);
        assert!(snapshot.waiting[0].reason.contains("waiting for stack to finish"), "{}", snapshot.waiting[0].reason);
        assert!(!host.is_finished());

        drop(stack);
        assert_eq!(host.await.unwrap(), Process::HostPatch);
    }

    #[tokio::test(start_paused = true)]
    async fn priority_decides_among_waiters() {
        let coordinator = Coordinator::new();
        let first = coordinator.acquire(Process::HostPatch, "upgrade").await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for process in [Process::HostPatch, Process::Stack, Process::SelfUpdate] {
            let coordinator = coordinator.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let turn = coordinator.acquire(process, "work").await;
                order.lock().unwrap().push(process);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(turn);
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        drop(first);
        for task in tasks {
            task.await.unwrap();
        }

        assert_eq!(*order.lock().unwrap(), vec![Process::SelfUpdate, Process::Stack, Process::HostPatch]);
    }

    #[tokio::test(start_paused = true)]
    async fn free_turn_is_taken_at_once() {
        let coordinator = Coordinator::new();

        let turn = coordinator.acquire(Process::Stack, "apply").await;

        assert_eq!(coordinator.snapshot().holder.map(|holder| holder.purpose), Some("apply".to_string()));
        drop(turn);
        assert_eq!(coordinator.snapshot().holder, None);
    }
}
