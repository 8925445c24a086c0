//! Reads a journal back and checks the handovers in it: the leases in order,
//! and, for every self-update step, whether the agent that wrote it held the
//! newest lease at that point of the journal.
//!
//! The journal's order is the order of the appends under its lock, so a step
//! written under an older epoch after a newer lease would mean that two
//! agents acted at once. Fencing forbids it, and [`Audit::overlaps`] shows
//! that it did not happen.

use serde::Serialize;

use crate::journal::Record;
use crate::machine::{MachineKind, describe_event, describe_state};

/// One lease in the order the journal holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseEntry {
    pub epoch: u64,
    pub holder: String,
    pub monotonic_ms: u64,
}

/// One self-update step and the epoch it was written under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepEntry {
    pub from: String,
    pub event: String,
    pub to: String,
    /// The writer's lease epoch.
    pub epoch: u64,
    /// The newest lease epoch at this point of the journal.
    pub newest_epoch: u64,
    pub monotonic_ms: u64,
}

/// Leases and self-update steps read from a journal.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Audit {
    pub leases: Vec<LeaseEntry>,
    pub aborted: Vec<u64>,
    pub confirmed: Vec<LeaseEntry>,
    pub steps: Vec<StepEntry>,
}

impl Audit {
    /// Returns the steps written by an agent that did not hold the newest
    /// lease: moments in which two agents acted.
    pub fn overlaps(&self) -> Vec<&StepEntry> {
        self.steps.iter().filter(|step| step.epoch != step.newest_epoch).collect()
    }

    /// Returns the holder of `epoch`.
    pub fn holder_of(&self, epoch: u64) -> Option<&str> {
        self.leases.iter().find(|lease| lease.epoch == epoch).map(|lease| lease.holder.as_str())
    }

    /// Returns the monotonic time of the first step that moved to `to`.
    pub fn first_step_to(&self, to: &str) -> Option<&StepEntry> {
        self.steps.iter().find(|step| step.to == to)
    }
}

/// Builds the audit from records in journal order.
pub fn audit(records: &[Record]) -> Audit {
    let machine = MachineKind::SelfUpdate.code();
    let mut audit = Audit::default();
    let mut newest = 0u64;
    let mut transition = None;
    for record in records {
        match record {
            Record::Lease(lease) if lease.epoch > newest && !audit.aborted.contains(&lease.epoch) => {
                newest = lease.epoch;
                audit.leases.push(LeaseEntry { epoch: lease.epoch, holder: lease.holder.clone(), monotonic_ms: lease.meta.monotonic_ms });
            }
            Record::LeaseAbort(abort) => audit.aborted.push(abort.epoch),
            Record::LeaseConfirmed(confirmed) => {
                let holder = audit.holder_of(confirmed.epoch).unwrap_or_default().to_string();
                audit.confirmed.push(LeaseEntry { epoch: confirmed.epoch, holder, monotonic_ms: confirmed.meta.monotonic_ms });
            }
            Record::Transition(step) if step.machine == machine => transition = Some(*step),
            Record::SelfUpdateMemory(memory) => {
                // Every self-update step is a transition followed by the
                // memory record that carries the writer's epoch.
                if let Some(step) = transition.take() {
                    audit.steps.push(StepEntry {
                        from: describe_state(machine, step.from),
                        event: describe_event(machine, step.event),
                        to: describe_state(machine, step.to),
                        epoch: memory.epoch,
                        newest_epoch: newest,
                        monotonic_ms: step.meta.monotonic_ms,
                    });
                }
            }
            _ => {}
        }
    }
    audit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::{LeaseRecord, RecordMeta, SelfUpdateMemoryRecord, TransitionRecord};
    use crate::machine::selfupdate::SelfUpdateMemory;

    fn lease(epoch: u64, holder: &str) -> Record {
        Record::Lease(LeaseRecord { meta: RecordMeta::default(), epoch, holder: holder.into() })
    }

    fn step(epoch: u64, from: u8, to: u8) -> [Record; 2] {
        let machine = MachineKind::SelfUpdate.code();
        [
            Record::Transition(TransitionRecord { meta: RecordMeta::default(), machine, from, event: 1, to, attempt: 1 }),
            Record::SelfUpdateMemory(SelfUpdateMemoryRecord { meta: RecordMeta::default(), epoch, memory: SelfUpdateMemory::default() }),
        ]
    }

    #[test]
    fn steps_under_newest_lease_do_not_overlap() {
        let mut records = vec![lease(1, "old")];
        records.extend(step(1, 5, 6));
        records.push(lease(2, "new"));
        records.extend(step(2, 6, 7));

        let audit = audit(&records);

        assert_eq!(audit.leases.len(), 2);
        assert_eq!(audit.steps.len(), 2);
        assert!(audit.overlaps().is_empty());
    }

    #[test]
    fn step_under_older_lease_is_an_overlap() {
        let mut records = vec![lease(1, "old"), lease(2, "new")];
        records.extend(step(1, 5, 6));

        let audit = audit(&records);

        assert_eq!(audit.overlaps().len(), 1);
        assert_eq!(audit.overlaps()[0].newest_epoch, 2);
    }
}
