//! The state a journal's records add up to, and the records that rebuild it
//! after compaction.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::journal::record::FactoryResetMemoryRecord;
use crate::journal::record::{
    ApplyHoldRecord, CompactedRecord, HostMemoryRecord, LeaseAbortRecord, LeaseConfirmedRecord, LeaseRecord, MachineErrorRecord, MachineStateRecord,
    NotificationRecord, OutboxCountersRecord, Record, RecordMeta, SelfUpdateMemoryRecord, SpaceMemoryRecord, StackMemoryRecord, TransitionRecord,
};
use crate::machine::factory::FactoryResetMemory;
use crate::machine::host::HostMemory;
use crate::machine::selfupdate::SelfUpdateMemory;
use crate::machine::space::SpaceMemory;
use crate::machine::stack::StackMemory;

/// Lease epochs remembered as aborted or confirmed. Older ones cannot matter:
/// a new lease always takes an epoch above every remembered one.
const REMEMBERED_EPOCHS: usize = 16;

/// Transitions a compacted region keeps, so `replay` still shows recent history.
pub const KEPT_TRANSITIONS: usize = 128;

/// Fold of one machine's records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineView {
    /// The state code after the last transition; `None` before the first.
    pub state: Option<u8>,
    /// The attempt number of the machine's last transition.
    ///
    /// NOTE: after a compaction this is 0 when the machine's last transition
    /// is older than the last `KEPT_TRANSITIONS`, because
    /// `MachineStateRecord` has no attempt field.
    pub attempt: u32,
    pub last_error: Option<MachineErrorRecord>,
    /// Metadata of the machine's last transition.
    pub last_change: Option<RecordMeta>,
}

/// How many transitions the fold keeps in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// Keep every transition read: for `replay`.
    All,
    /// Keep the last few: enough for a compaction snapshot.
    Recent,
}

/// The fold of every record read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalState {
    pub machines: BTreeMap<u8, MachineView>,
    pub stack_memory: Option<StackMemory>,
    pub host_memory: Option<HostMemory>,
    pub space_memory: Option<SpaceMemory>,
    pub factory_reset_memory: Option<FactoryResetMemory>,
    /// The self-update machine's memory and the lease epoch its last step
    /// was written under.
    pub self_update: Option<(u64, SelfUpdateMemory)>,
    /// The lease with the highest epoch.
    pub lease: Option<LeaseRecord>,
    pub aborted_epochs: BTreeSet<u64>,
    pub confirmed_epochs: BTreeSet<u64>,
    pub transitions: VecDeque<TransitionRecord>,
    /// Transitions no longer in `transitions`: compacted or beyond the kept
    /// history.
    pub dropped_transitions: u64,
    /// Records with a tag from a newer version, skipped.
    pub unknown_records: u64,
    /// Records with a known tag whose payload did not decode, skipped.
    pub undecodable_records: u64,
    /// Notifications not yet delivered, oldest first.
    pub outbox: VecDeque<NotificationRecord>,
    pub notifications_delivered: u64,
    pub notifications_dropped: u64,
    /// The last apply hold of each machine, by machine code.
    pub apply_holds: BTreeMap<u8, ApplyHoldRecord>,
    history: History,
}

impl JournalState {
    pub fn new(history: History) -> Self {
        JournalState {
            machines: BTreeMap::new(),
            stack_memory: None,
            host_memory: None,
            space_memory: None,
            factory_reset_memory: None,
            self_update: None,
            lease: None,
            aborted_epochs: BTreeSet::new(),
            confirmed_epochs: BTreeSet::new(),
            transitions: VecDeque::new(),
            dropped_transitions: 0,
            unknown_records: 0,
            undecodable_records: 0,
            outbox: VecDeque::new(),
            notifications_delivered: 0,
            notifications_dropped: 0,
            apply_holds: BTreeMap::new(),
            history,
        }
    }

    /// Returns the epoch of the current lease, 0 when no lease was taken.
    pub fn lease_epoch(&self) -> u64 {
        self.lease.as_ref().map_or(0, |lease| lease.epoch)
    }

    /// Returns the epoch the next lease must take: above every lease and
    /// every aborted epoch.
    pub fn next_epoch(&self) -> u64 {
        let highest_abort = self.aborted_epochs.iter().next_back().copied().unwrap_or(0);
        self.lease_epoch().max(highest_abort) + 1
    }

    pub fn machine(&self, machine: u8) -> Option<&MachineView> {
        self.machines.get(&machine)
    }

    /// Counts every transition ever appended, including compacted ones.
    pub fn total_transitions(&self) -> u64 {
        self.dropped_transitions + self.transitions.len() as u64
    }

    /// Adds one record to the fold.
    pub fn apply(&mut self, record: &Record) {
        match record {
            Record::Transition(transition) => {
                let view = self.machines.entry(transition.machine).or_default();
                view.state = Some(transition.to);
                view.attempt = transition.attempt;
                view.last_change = Some(transition.meta);
                self.transitions.push_back(*transition);
                if self.history == History::Recent && self.transitions.len() > KEPT_TRANSITIONS {
                    self.transitions.pop_front();
                    self.dropped_transitions += 1;
                }
            }
            Record::Lease(lease) => {
                let newer = lease.epoch > self.lease_epoch() && !self.aborted_epochs.contains(&lease.epoch);
                if newer {
                    self.lease = Some(lease.clone());
                }
            }
            Record::LeaseAbort(abort) => remember(&mut self.aborted_epochs, abort.epoch),
            Record::LeaseConfirmed(confirmed) => remember(&mut self.confirmed_epochs, confirmed.epoch),
            Record::MachineError(error) => {
                self.machines.entry(error.machine).or_default().last_error = Some(error.clone());
            }
            Record::Compacted(compacted) => {
                self.dropped_transitions = self.dropped_transitions.max(compacted.dropped_transitions);
            }
            Record::MachineState(state) => {
                let view = self.machines.entry(state.machine).or_default();
                view.state = Some(state.state);
                view.last_change.get_or_insert(state.meta);
            }
            Record::StackMemory(memory) => self.stack_memory = Some(memory.memory.clone()),
            Record::Notification(notification) => {
                if !self.outbox.iter().any(|queued| queued.id == notification.id) {
                    self.outbox.push_back(notification.clone());
                }
            }
            Record::NotificationDelivered(delivered) => {
                if let Some(index) = self.outbox.iter().position(|queued| queued.id == delivered.id) {
                    self.outbox.remove(index);
                    self.notifications_delivered += 1;
                }
            }
            Record::NotificationDropped(dropped) => {
                if let Some(index) = self.outbox.iter().position(|queued| queued.id == dropped.id) {
                    self.outbox.remove(index);
                    self.notifications_dropped += 1;
                }
            }
            Record::OutboxCounters(counters) => {
                self.notifications_delivered = self.notifications_delivered.max(counters.delivered);
                self.notifications_dropped = self.notifications_dropped.max(counters.dropped);
            }
            Record::HostMemory(memory) => self.host_memory = Some(memory.memory.clone()),
            Record::SpaceMemory(memory) => self.space_memory = Some(memory.memory.clone()),
            Record::FactoryResetMemory(memory) => self.factory_reset_memory = Some(memory.memory.clone()),
            Record::SelfUpdateMemory(memory) => self.self_update = Some((memory.epoch, memory.memory.clone())),
            Record::ApplyHold(hold) => {
                self.apply_holds.insert(hold.machine, hold.clone());
            }
        }
    }

    /// Returns the records that rebuild this state in an empty region, keeping
    /// the last `kept` transitions.
    pub fn snapshot(&self, meta: RecordMeta, kept: usize) -> Vec<Record> {
        let kept = kept.min(self.transitions.len());
        let dropped = self.dropped_transitions + (self.transitions.len() - kept) as u64;
        let mut records = vec![Record::Compacted(CompactedRecord { meta, dropped_transitions: dropped })];

        if let Some(lease) = &self.lease {
            records.push(Record::Lease(lease.clone()));
        }
        for &epoch in &self.aborted_epochs {
            records.push(Record::LeaseAbort(LeaseAbortRecord { meta, epoch }));
        }
        for &epoch in &self.confirmed_epochs {
            records.push(Record::LeaseConfirmed(LeaseConfirmedRecord { meta, epoch }));
        }
        if let Some(memory) = &self.stack_memory {
            records.push(Record::StackMemory(StackMemoryRecord { meta, memory: memory.clone() }));
        }
        if let Some(memory) = &self.host_memory {
            records.push(Record::HostMemory(HostMemoryRecord { meta, memory: memory.clone() }));
        }
        if let Some(memory) = &self.space_memory {
            records.push(Record::SpaceMemory(SpaceMemoryRecord { meta, memory: memory.clone() }));
        }
        if let Some(memory) = &self.factory_reset_memory {
            records.push(Record::FactoryResetMemory(FactoryResetMemoryRecord { meta, memory: memory.clone() }));
        }
        if let Some((epoch, memory)) = &self.self_update {
            records.push(Record::SelfUpdateMemory(SelfUpdateMemoryRecord { meta, epoch: *epoch, memory: memory.clone() }));
        }

        records.push(Record::OutboxCounters(OutboxCountersRecord { meta, delivered: self.notifications_delivered, dropped: self.notifications_dropped }));
        records.extend(self.outbox.iter().cloned().map(Record::Notification));
        let held = self.apply_holds.values().filter(|hold| !hold.reason.is_empty() || hold.deferred_ms > 0);
        records.extend(held.map(|hold| Record::ApplyHold(hold.clone())));

        let first_kept = self.transitions.len() - kept;
        records.extend(self.transitions.iter().skip(first_kept).map(|transition| Record::Transition(*transition)));

        // States and errors come after the transitions, so a machine whose last
        // transition was dropped still ends in its current state.
        for (&machine, view) in &self.machines {
            if let Some(state) = view.state {
                let state_meta = view.last_change.unwrap_or(meta);
                records.push(Record::MachineState(MachineStateRecord { meta: state_meta, machine, state }));
            }
            if let Some(error) = &view.last_error {
                records.push(Record::MachineError(error.clone()));
            }
        }
        records
    }
}

fn remember(epochs: &mut BTreeSet<u64>, epoch: u64) {
    epochs.insert(epoch);
    while epochs.len() > REMEMBERED_EPOCHS {
        epochs.pop_first();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_keeps_host_memory() {
        let memory = HostMemory { attempts_started: 2, kernels_not_activated: vec!["6.6.62+rpt-rpi-v8".into()], ..HostMemory::default() };
        let mut state = JournalState::new(History::Recent);
        state.apply(&Record::HostMemory(HostMemoryRecord { meta: RecordMeta::default(), memory: memory.clone() }));

        let mut rebuilt = JournalState::new(History::Recent);
        for record in state.snapshot(RecordMeta::default(), KEPT_TRANSITIONS) {
            rebuilt.apply(&record);
        }

        assert_eq!(rebuilt.host_memory, Some(memory));
    }

    #[test]
    fn snapshot_keeps_factory_reset_memory() {
        let mut state = JournalState::new(History::Recent);
        let memory = FactoryResetMemory { reason: Some("button".into()), resumes: 2, ..FactoryResetMemory::default() };
        state.apply(&Record::FactoryResetMemory(FactoryResetMemoryRecord { meta: RecordMeta::default(), memory: memory.clone() }));

        let rebuilt = rebuilt_from(&state);

        assert_eq!(rebuilt.factory_reset_memory, Some(memory));
    }

    #[test]
    fn snapshot_keeps_space_memory() {
        use crate::machine::space::{Hold, LowFilesystem, Role, Shortage};
        let memory = SpaceMemory {
            low: vec![LowFilesystem { role: Role::Recordings, path: "/srv/recordings".into(), shortage: Shortage::Inodes }],
            hold: Some(Hold { service: Some("recorder".into()) }),
            reclaimed_bytes: 42,
            ..SpaceMemory::default()
        };
        let mut state = JournalState::new(History::Recent);
        state.apply(&Record::SpaceMemory(SpaceMemoryRecord { meta: RecordMeta::default(), memory: memory.clone() }));

        let rebuilt = rebuilt_from(&state);

        assert_eq!(rebuilt.space_memory, Some(memory));
    }

    #[test]
    fn snapshot_keeps_self_update_memory_and_epoch() {
        let memory = SelfUpdateMemory { attempts_started: 4, check_error: Some("registry down".into()), ..SelfUpdateMemory::default() };
        let mut state = JournalState::new(History::Recent);
        state.apply(&Record::SelfUpdateMemory(SelfUpdateMemoryRecord { meta: RecordMeta::default(), epoch: 7, memory: memory.clone() }));

        let rebuilt = rebuilt_from(&state);

        assert_eq!(rebuilt.self_update, Some((7, memory)));
    }

    fn hold(machine: u8, reason: &str, deferred_ms: u64) -> Record {
        Record::ApplyHold(ApplyHoldRecord { meta: RecordMeta::default(), machine, reason: reason.into(), deferred_ms })
    }

    fn rebuilt_from(state: &JournalState) -> JournalState {
        let mut rebuilt = JournalState::new(History::Recent);
        for record in state.snapshot(RecordMeta::default(), KEPT_TRANSITIONS) {
            rebuilt.apply(&record);
        }
        rebuilt
    }

    #[test]
    fn snapshot_keeps_apply_hold() {
        let mut state = JournalState::new(History::Recent);
        state.apply(&hold(1, "waiting for the next boot (policy on-boot)", 0));
        state.apply(&hold(1, "update lock held by file /srv/shared/lock", 90_000));

        let rebuilt = rebuilt_from(&state);

        assert_eq!(rebuilt.apply_holds, state.apply_holds);
        assert_eq!(rebuilt.apply_holds[&1].deferred_ms, 90_000);
    }

    #[test]
    fn snapshot_drops_cleared_apply_hold() {
        let mut state = JournalState::new(History::Recent);
        state.apply(&hold(1, "update lock held by file /srv/shared/lock", 90_000));
        state.apply(&hold(1, "", 0));

        let rebuilt = rebuilt_from(&state);

        assert!(rebuilt.apply_holds.is_empty());
    }
}
