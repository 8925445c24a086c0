//! Runs the apply policy of one machine against the real world: reads the
//! clock seam and the update locks, counts how long locks defer the pending
//! update, and persists that count with the reason the update waits.
//!
//! Deferral is counted with the monotonic clock (`tokio::time::Instant`)
//! between two checks while a lock is held, and added to the total that the
//! journal carries over from earlier boots. A wall-clock jump therefore
//! neither adds nor removes deferral time.

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::driver::docker::Engine;
use crate::driver::stack::SharedJournal;
use crate::journal::record::ApplyHoldRecord;
use crate::journal::{JournalError, Record};
use crate::machine::MachineKind;
use crate::policy::{self, ApplyPolicy, Decision, PolicyFacts, WallClock};
use crate::seams::Seams;

/// Time between two journal records of a growing deferral. A power cut loses
/// up to this much of the count, plus one policy check interval.
const DEFERRAL_SAVE_INTERVAL: Duration = Duration::from_secs(60);

/// Sources of the update lock that applications set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockSources {
    /// Each file holds the lock while it exists.
    pub files: Vec<PathBuf>,
    /// A running container with this label key holds the lock.
    pub label: Option<String>,
}

impl LockSources {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.label.is_none()
    }
}

/// The hold last written to the journal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Persisted {
    reason: String,
    deferred_ms: u64,
}

/// The apply policy of one machine with the state it keeps between checks.
pub struct ApplyGate {
    machine: MachineKind,
    policy: ApplyPolicy,
    locks: LockSources,
    journal: SharedJournal,
    seams: Seams,
    engine: Engine,
    /// Deferral summed over boots, up to `counted_at`.
    deferred: Duration,
    /// Monotonic time of the last check that found a lock, while checks run
    /// back to back; `None` after a pause.
    counted_at: Option<Instant>,
    persisted: Persisted,
    persisted_at: Instant,
}

impl ApplyGate {
    /// Builds the gate with the deferral that the journal carries over.
    pub fn new(machine: MachineKind, policy: ApplyPolicy, locks: LockSources, journal: SharedJournal, seams: Seams, engine: Engine) -> ApplyGate {
        let persisted = {
            let journal = journal.lock().expect("no code panics while holding the journal lock");
            journal
                .state()
                .apply_holds
                .get(&machine.code())
                .map_or_else(Persisted::default, |hold| Persisted { reason: hold.reason.clone(), deferred_ms: hold.deferred_ms })
        };
        ApplyGate {
            machine,
            policy,
            locks,
            journal,
            seams,
            engine,
            deferred: Duration::from_millis(persisted.deferred_ms),
            counted_at: None,
            persisted,
            persisted_at: Instant::now(),
        }
    }

    /// Checks the policy once and returns whether the update may be applied
    /// now. `blocked` is a reason of the caller's to wait anyway, such as a
    /// missing image; it is reported like a policy hold.
    pub async fn check(&mut self, booted_since_pull: bool, blocked: Option<String>) -> Result<bool, JournalError> {
        let lock = self.find_lock().await;
        let now = Instant::now();
        match (&lock, self.counted_at) {
            (Some(_), Some(counted_at)) => {
                self.deferred += now.duration_since(counted_at);
                self.counted_at = Some(now);
            }
            (Some(_), None) => self.counted_at = Some(now),
            (None, _) => self.counted_at = None,
        }

        let clock = &self.seams.clock;
        let facts =
            PolicyFacts { clock: WallClock { wall_ms: clock.wall_ms(), synced: clock.clock_synced() }, booted_since_pull, lock, deferred: self.deferred };
        // The caller's reason comes first: it asks for action, and the update
        // could not be applied even if the policy allowed it.
        let decision = match (blocked, policy::decide(&self.policy, &facts)) {
            (Some(blocked), _) => Err(blocked),
            (None, Decision::Wait(hold)) => Err(hold.to_string()),
            (None, decision) => Ok(decision),
        };

        match decision {
            Ok(decision) => {
                if let Decision::ApplyDespiteLock { holder } = &decision {
                    let deferred = humantime::format_duration(Duration::from_secs(self.deferred.as_secs()));
                    let maximum = humantime::format_duration(self.policy.max_deferral);
                    tracing::warn!(machine = self.machine.name(), lock = %holder, %deferred, %maximum, "update locks deferred the update for the maximum deferral; applying despite the lock");
                }
                Ok(true)
            }
            Err(reason) => {
                self.save(reason, false)?;
                Ok(false)
            }
        }
    }

    /// Records that the update is being applied: the hold is cleared and the
    /// deferral count starts again from zero for the next update.
    pub fn finish(&mut self) -> Result<(), JournalError> {
        self.deferred = Duration::ZERO;
        self.counted_at = None;
        self.save(String::new(), true)
    }

    /// Stops counting until the next check, as when the driver leaves to poll
    /// the branch, and persists the deferral counted so far.
    pub fn pause(&mut self) -> Result<(), JournalError> {
        self.counted_at = None;
        let reason = self.persisted.reason.clone();
        self.save(reason, true)
    }

    /// Appends a hold record when the reason changed, or when the deferral
    /// grew and `force` is set or the last record is older than
    /// `DEFERRAL_SAVE_INTERVAL`.
    fn save(&mut self, reason: String, force: bool) -> Result<(), JournalError> {
        let deferred_ms = u64::try_from(self.deferred.as_millis()).unwrap_or(u64::MAX);
        let next = Persisted { reason, deferred_ms };
        if next == self.persisted {
            return Ok(());
        }
        let reason_changed = next.reason != self.persisted.reason;
        if !reason_changed && !force && self.persisted_at.elapsed() < DEFERRAL_SAVE_INTERVAL {
            return Ok(());
        }

        if reason_changed && !next.reason.is_empty() {
            tracing::info!(machine = self.machine.name(), reason = %next.reason, "pulled update waits");
        }
        let record = ApplyHoldRecord { meta: self.seams.meta(), machine: self.machine.code(), reason: next.reason.clone(), deferred_ms };
        self.journal.lock().expect("no code panics while holding the journal lock").append(vec![Record::ApplyHold(record)])?;
        self.persisted = next;
        self.persisted_at = Instant::now();
        Ok(())
    }

    /// Returns a description of the first update lock found held.
    async fn find_lock(&self) -> Option<String> {
        for file in &self.locks.files {
            match std::fs::symlink_metadata(file) {
                Ok(_) => return Some(format!("file {}", file.display())),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                // A lock that cannot be checked is treated as held: applying
                // could stop what the lock protects.
                Err(error) => return Some(format!("file {} (cannot check it: {error})", file.display())),
            }
        }
        let label = self.locks.label.as_deref()?;
        match self.engine.running_with_label(label).await {
            Ok(names) if names.is_empty() => None,
            Ok(names) => Some(format!("container {} (label {label})", names.join(", "))),
            Err(error) => Some(format!("label {label} (cannot list the running containers: {error})")),
        }
    }
}
