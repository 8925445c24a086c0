//! Journal record types and their tags.
//!
//! Tags are never reused and a record type never changes its fields: a changed
//! record gets a new tag, and readers keep decoding the old one. A reader skips
//! a tag it does not know, so an older agent still reads the records it does
//! know (a lease above all) in a journal that a newer agent wrote.

use serde::{Deserialize, Serialize};

use crate::machine::factory::FactoryResetMemory;
use crate::machine::host::HostMemory;
use crate::machine::selfupdate::SelfUpdateMemory;
use crate::machine::space::SpaceMemory;
use crate::machine::stack::StackMemory;

/// When and on which boot a record was written. Every record carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RecordMeta {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`) as 16 bytes.
    pub boot_id: [u8; 16],
    /// Monotonic time in milliseconds since the boot.
    pub monotonic_ms: u64,
    /// Wall time in milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Whether the kernel reported the wall clock as synchronised.
    pub clock_synced: bool,
}

/// One transition of one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionRecord {
    pub meta: RecordMeta,
    /// A [`crate::machine::MachineKind`] code.
    pub machine: u8,
    pub from: u8,
    pub event: u8,
    pub to: u8,
    /// The machine's attempt number at the time, 0 when none runs.
    pub attempt: u32,
}

/// The right to act, held by the agent with the highest epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub meta: RecordMeta,
    pub epoch: u64,
    /// Agent that took the lease: a container id, or a host name outside Docker.
    pub holder: String,
}

/// A lease epoch that was offered to a candidate and withdrawn. A lease with
/// this epoch can no longer be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAbortRecord {
    pub meta: RecordMeta,
    pub epoch: u64,
}

/// The holder of `epoch` finished its probation after a handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseConfirmedRecord {
    pub meta: RecordMeta,
    pub epoch: u64,
}

/// The last error of a machine, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineErrorRecord {
    pub meta: RecordMeta,
    pub machine: u8,
    pub message: String,
}

/// Marks the start of a compacted region; older transitions were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactedRecord {
    pub meta: RecordMeta,
    /// Transitions dropped by this and all earlier compactions.
    pub dropped_transitions: u64,
}

/// The current state of a machine, written by compaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStateRecord {
    pub meta: RecordMeta,
    pub machine: u8,
    pub state: u8,
}

/// The stack machine's memory after a transition that changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackMemoryRecord {
    pub meta: RecordMeta,
    pub memory: StackMemory,
}

/// A notification waiting in the outbox until the webhook takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationRecord {
    pub meta: RecordMeta,
    /// Idempotency id, sent with every delivery attempt.
    pub id: [u8; 16],
    /// A [`crate::notify::Severity`] code.
    pub severity: u8,
    /// Short machine-readable kind, such as `rollback` or `commit-rejected`.
    pub kind: String,
    /// A [`crate::machine::MachineKind`] code.
    pub machine: u8,
    pub message: String,
}

/// The webhook accepted a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationDeliveredRecord {
    pub meta: RecordMeta,
    pub id: [u8; 16],
}

/// A notification dropped from a full outbox to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationDroppedRecord {
    pub meta: RecordMeta,
    pub id: [u8; 16],
}

/// Outbox totals, written by compaction so they survive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxCountersRecord {
    pub meta: RecordMeta,
    pub delivered: u64,
    pub dropped: u64,
}

/// The host-patch machine's memory after a transition that changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMemoryRecord {
    pub meta: RecordMeta,
    pub memory: HostMemory,
}

/// Reason a pulled update of one machine waits for its apply policy, and how
/// long update locks have deferred it. An empty `reason` with zero
/// `deferred_ms` means the update no longer waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyHoldRecord {
    pub meta: RecordMeta,
    /// A [`crate::machine::MachineKind`] code.
    pub machine: u8,
    /// The reason in words, such as `update lock held by file
    /// /srv/shared/lock`, or empty when the update does not wait.
    pub reason: String,
    /// Monotonic milliseconds that update locks have deferred the pending
    /// update, summed over boots.
    pub deferred_ms: u64,
}

/// The space-guard machine's memory after a transition that changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceMemoryRecord {
    pub meta: RecordMeta,
    pub memory: SpaceMemory,
}

/// The self-update machine's memory after each of its steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfUpdateMemoryRecord {
    pub meta: RecordMeta,
    /// The lease epoch of the agent that wrote the step, so that the journal
    /// shows which agent drove each step of a handover.
    pub epoch: u64,
    pub memory: SelfUpdateMemory,
}

/// The factory-reset machine's memory after a transition that changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactoryResetMemoryRecord {
    pub meta: RecordMeta,
    pub memory: FactoryResetMemory,
}

/// Every record this build reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Transition(TransitionRecord),
    Lease(LeaseRecord),
    LeaseAbort(LeaseAbortRecord),
    LeaseConfirmed(LeaseConfirmedRecord),
    MachineError(MachineErrorRecord),
    Compacted(CompactedRecord),
    MachineState(MachineStateRecord),
    StackMemory(StackMemoryRecord),
    Notification(NotificationRecord),
    NotificationDelivered(NotificationDeliveredRecord),
    NotificationDropped(NotificationDroppedRecord),
    OutboxCounters(OutboxCountersRecord),
    HostMemory(HostMemoryRecord),
    ApplyHold(ApplyHoldRecord),
    SpaceMemory(SpaceMemoryRecord),
    SelfUpdateMemory(SelfUpdateMemoryRecord),
    FactoryResetMemory(FactoryResetMemoryRecord),
}

/// Tag values. Append new ones; never reuse or renumber.
///
/// Each area of the agent adds its records inside its own range:
/// 1-15 journal and lease, 16-31 stack update, 32-47 self-update, 48-63 host
/// patch, 64-79 space guard, 80-95 factory reset and panel, 96-111
/// notifications, 112-127 apply policies.
pub mod tag {
    pub const TRANSITION: u8 = 1;
    pub const LEASE: u8 = 2;
    pub const LEASE_ABORT: u8 = 3;
    pub const LEASE_CONFIRMED: u8 = 4;
    pub const MACHINE_ERROR: u8 = 5;
    pub const COMPACTED: u8 = 6;
    pub const MACHINE_STATE: u8 = 7;
    pub const STACK_MEMORY: u8 = 16;
    pub const SELF_UPDATE_MEMORY: u8 = 32;
    pub const NOTIFICATION: u8 = 96;
    pub const NOTIFICATION_DELIVERED: u8 = 97;
    pub const NOTIFICATION_DROPPED: u8 = 98;
    pub const OUTBOX_COUNTERS: u8 = 99;
    pub const HOST_MEMORY: u8 = 48;
    pub const APPLY_HOLD: u8 = 112;
    pub const SPACE_MEMORY: u8 = 64;
    pub const FACTORY_RESET_MEMORY: u8 = 80;
}

/// Error for a payload with a known tag that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record with tag {tag} does not decode: {reason}")]
pub struct DecodeError {
    pub tag: u8,
    pub reason: String,
}

/// Outcome of decoding one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant, reason = "each decoded record is moved once; a box would add an allocation per record")]
pub enum Decoded {
    Known(Record),
    /// A tag from a newer version; the record is skipped.
    UnknownTag(u8),
}

impl Record {
    pub fn tag(&self) -> u8 {
        match self {
            Record::Transition(_) => tag::TRANSITION,
            Record::Lease(_) => tag::LEASE,
            Record::LeaseAbort(_) => tag::LEASE_ABORT,
            Record::LeaseConfirmed(_) => tag::LEASE_CONFIRMED,
            Record::MachineError(_) => tag::MACHINE_ERROR,
            Record::Compacted(_) => tag::COMPACTED,
            Record::MachineState(_) => tag::MACHINE_STATE,
            Record::StackMemory(_) => tag::STACK_MEMORY,
            Record::Notification(_) => tag::NOTIFICATION,
            Record::NotificationDelivered(_) => tag::NOTIFICATION_DELIVERED,
            Record::NotificationDropped(_) => tag::NOTIFICATION_DROPPED,
            Record::OutboxCounters(_) => tag::OUTBOX_COUNTERS,
            Record::HostMemory(_) => tag::HOST_MEMORY,
            Record::ApplyHold(_) => tag::APPLY_HOLD,
            Record::SpaceMemory(_) => tag::SPACE_MEMORY,
            Record::SelfUpdateMemory(_) => tag::SELF_UPDATE_MEMORY,
            Record::FactoryResetMemory(_) => tag::FACTORY_RESET_MEMORY,
        }
    }

    pub fn meta(&self) -> &RecordMeta {
        match self {
            Record::Transition(record) => &record.meta,
            Record::Lease(record) => &record.meta,
            Record::LeaseAbort(record) => &record.meta,
            Record::LeaseConfirmed(record) => &record.meta,
            Record::MachineError(record) => &record.meta,
            Record::Compacted(record) => &record.meta,
            Record::MachineState(record) => &record.meta,
            Record::StackMemory(record) => &record.meta,
            Record::Notification(record) => &record.meta,
            Record::NotificationDelivered(record) => &record.meta,
            Record::NotificationDropped(record) => &record.meta,
            Record::OutboxCounters(record) => &record.meta,
            Record::HostMemory(record) => &record.meta,
            Record::ApplyHold(record) => &record.meta,
            Record::SpaceMemory(record) => &record.meta,
            Record::SelfUpdateMemory(record) => &record.meta,
            Record::FactoryResetMemory(record) => &record.meta,
        }
    }

    /// Encodes the payload with postcard.
    pub fn encode_payload(&self) -> Vec<u8> {
        let encoded = match self {
            Record::Transition(record) => postcard::to_stdvec(record),
            Record::Lease(record) => postcard::to_stdvec(record),
            Record::LeaseAbort(record) => postcard::to_stdvec(record),
            Record::LeaseConfirmed(record) => postcard::to_stdvec(record),
            Record::MachineError(record) => postcard::to_stdvec(record),
            Record::Compacted(record) => postcard::to_stdvec(record),
            Record::MachineState(record) => postcard::to_stdvec(record),
            Record::StackMemory(record) => postcard::to_stdvec(record),
            Record::Notification(record) => postcard::to_stdvec(record),
            Record::NotificationDelivered(record) => postcard::to_stdvec(record),
            Record::NotificationDropped(record) => postcard::to_stdvec(record),
            Record::OutboxCounters(record) => postcard::to_stdvec(record),
            Record::HostMemory(record) => postcard::to_stdvec(record),
            Record::ApplyHold(record) => postcard::to_stdvec(record),
            Record::SpaceMemory(record) => postcard::to_stdvec(record),
            Record::SelfUpdateMemory(record) => postcard::to_stdvec(record),
            Record::FactoryResetMemory(record) => postcard::to_stdvec(record),
        };
        encoded.expect("postcard encodes these plain structs into a Vec without error")
    }

    /// Decodes a payload read under `tag`.
    pub fn decode(tag: u8, payload: &[u8]) -> Result<Decoded, DecodeError> {
        fn parse<T: serde::de::DeserializeOwned>(tag: u8, payload: &[u8]) -> Result<T, DecodeError> {
            postcard::from_bytes(payload).map_err(|error| DecodeError { tag, reason: error.to_string() })
        }

        let record = match tag {
            tag::TRANSITION => Record::Transition(parse(tag, payload)?),
            tag::LEASE => Record::Lease(parse(tag, payload)?),
            tag::LEASE_ABORT => Record::LeaseAbort(parse(tag, payload)?),
            tag::LEASE_CONFIRMED => Record::LeaseConfirmed(parse(tag, payload)?),
            tag::MACHINE_ERROR => Record::MachineError(parse(tag, payload)?),
            tag::COMPACTED => Record::Compacted(parse(tag, payload)?),
            tag::MACHINE_STATE => Record::MachineState(parse(tag, payload)?),
            tag::STACK_MEMORY => Record::StackMemory(parse(tag, payload)?),
            tag::NOTIFICATION => Record::Notification(parse(tag, payload)?),
            tag::NOTIFICATION_DELIVERED => Record::NotificationDelivered(parse(tag, payload)?),
            tag::NOTIFICATION_DROPPED => Record::NotificationDropped(parse(tag, payload)?),
            tag::OUTBOX_COUNTERS => Record::OutboxCounters(parse(tag, payload)?),
            tag::HOST_MEMORY => Record::HostMemory(parse(tag, payload)?),
            tag::APPLY_HOLD => Record::ApplyHold(parse(tag, payload)?),
            tag::SPACE_MEMORY => Record::SpaceMemory(parse(tag, payload)?),
            tag::SELF_UPDATE_MEMORY => Record::SelfUpdateMemory(parse(tag, payload)?),
            tag::FACTORY_RESET_MEMORY => Record::FactoryResetMemory(parse(tag, payload)?),
            unknown => return Ok(Decoded::UnknownTag(unknown)),
        };
        Ok(Decoded::Known(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_record_is_small() {
        let record = Record::Transition(TransitionRecord {
            meta: RecordMeta { boot_id: [0xAB; 16], monotonic_ms: 10 * 24 * 3600 * 1000, wall_ms: 1_796_000_000_000, clock_synced: true },
            machine: 1,
            from: 6,
            event: 10,
            to: 7,
            attempt: 1000,
        });

        let framed = super::super::frame::OVERHEAD + record.encode_payload().len();

        assert!(framed < 64, "a framed transition takes {framed} bytes");
    }

    #[test]
    fn host_memory_round_trips_under_its_tag() {
        let memory = crate::machine::host::HostMemory {
            attempts_started: 3,
            needs_attention: Some("kernel not activated".into()),
            kernels_not_activated: vec!["6.6.62+rpt-rpi-v8".into()],
            ..Default::default()
        };
        let record = Record::HostMemory(HostMemoryRecord { meta: RecordMeta::default(), memory });

        let decoded = Record::decode(tag::HOST_MEMORY, &record.encode_payload()).unwrap();

        assert_eq!(record.tag(), 48);
        assert_eq!(decoded, Decoded::Known(record));
    }

    #[test]
    fn apply_hold_round_trips() {
        let record = Record::ApplyHold(ApplyHoldRecord {
            meta: RecordMeta { boot_id: [7; 16], monotonic_ms: 5, wall_ms: 6, clock_synced: false },
            machine: 1,
            reason: "update lock held by file /srv/shared/lock".into(),
            deferred_ms: 90_000,
        });

        let decoded = Record::decode(tag::APPLY_HOLD, &record.encode_payload());

        assert_eq!(decoded, Ok(Decoded::Known(record)));
    }

    #[test]
    fn self_update_memory_round_trips_under_its_tag() {
        let memory = crate::machine::selfupdate::SelfUpdateMemory { attempts_started: 2, ..Default::default() };
        let record = Record::SelfUpdateMemory(SelfUpdateMemoryRecord { meta: RecordMeta::default(), epoch: 3, memory });

        let decoded = Record::decode(tag::SELF_UPDATE_MEMORY, &record.encode_payload()).unwrap();

        assert_eq!(record.tag(), 32);
        assert_eq!(decoded, Decoded::Known(record));
    }

    #[test]
    fn factory_reset_memory_round_trips_under_its_tag() {
        let memory = crate::machine::factory::FactoryResetMemory { reason: Some("button".into()), resets_done: 1, ..Default::default() };
        let record = Record::FactoryResetMemory(FactoryResetMemoryRecord { meta: RecordMeta::default(), memory });

        let decoded = Record::decode(tag::FACTORY_RESET_MEMORY, &record.encode_payload()).unwrap();

        assert_eq!(record.tag(), 80);
        assert_eq!(decoded, Decoded::Known(record));
    }

    #[test]
    fn unknown_tag_is_reported_not_failed() {
        assert_eq!(Record::decode(200, &[1, 2, 3]), Ok(Decoded::UnknownTag(200)));
    }

    #[test]
    fn truncated_payload_is_decode_error() {
        let record = Record::Lease(LeaseRecord { meta: RecordMeta::default(), epoch: 3, holder: "abc".into() });
        let payload = record.encode_payload();

        let error = Record::decode(tag::LEASE, &payload[..payload.len() - 1]).unwrap_err();

        assert_eq!(error.tag, tag::LEASE);
    }
}
