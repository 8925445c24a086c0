//! Helpers for the journal tests: the on-disk layout, deterministic records,
//! and byte-level edits of a journal file.
//!
//! The layout constants are written out here instead of taken from the crate,
//! so a change to the file format of version 1 fails these tests.

use std::fs;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use eventpi_autoupdate::journal::frame;
use eventpi_autoupdate::journal::record::{LeaseAbortRecord, LeaseConfirmedRecord, LeaseRecord, MachineErrorRecord, StackMemoryRecord, TransitionRecord};
use eventpi_autoupdate::journal::{FILE_NAME, History, JournalOptions, JournalState, Record, RecordMeta};
use eventpi_autoupdate::machine::stack::{Attempt, Outcome, StackMemory};
use eventpi_autoupdate::model::{CommitId, Digest, Release, ServiceImage};

/// Bytes before region 0: the two header slots and their padding.
pub const HEADER_BLOCK_BYTES: u64 = 4096;

/// File offsets of the two header slots.
pub const HEADER_SLOT_OFFSETS: [u64; 2] = [0, 2048];

/// Length of the encoded header at the start of each slot.
pub const HEADER_BYTES: usize = 36;

/// Smallest region a journal may have.
pub const MIN_REGION_BYTES: u64 = 16 * 1024;

/// Size of a journal with two regions of the minimum size: 36 KiB.
pub const SMALL_FILE_BYTES: u64 = HEADER_BLOCK_BYTES + 2 * MIN_REGION_BYTES;

/// Options for a 36 KiB journal that syncs every append, as the agent does.
pub fn small_options() -> JournalOptions {
    JournalOptions { file_bytes: SMALL_FILE_BYTES, sync: true, history: History::Recent }
}

/// Returns the path of the journal file in `directory`.
pub fn journal_path(directory: &Path) -> PathBuf {
    directory.join(FILE_NAME)
}

/// The header fields as they are stored in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredHeader {
    pub generation: u64,
    pub active: u8,
    pub region_bytes: u64,
}

impl StoredHeader {
    /// Returns the file offset where the active region starts.
    pub fn active_region_start(&self) -> u64 {
        HEADER_BLOCK_BYTES + u64::from(self.active) * self.region_bytes
    }
}

/// Parses the header in `slot` (0 or 1) without checking its CRC.
pub fn stored_header(path: &Path, slot: usize) -> StoredHeader {
    let bytes = read_bytes(path, HEADER_SLOT_OFFSETS[slot], HEADER_BYTES);
    StoredHeader {
        generation: u64::from_le_bytes(bytes[12..20].try_into().expect("the slice is 8 bytes long")),
        active: bytes[20],
        region_bytes: u64::from_le_bytes(bytes[24..32].try_into().expect("the slice is 8 bytes long")),
    }
}

/// Returns the header in force. Both slots must agree, as they do in every
/// journal that no test has damaged.
pub fn current_header(path: &Path) -> StoredHeader {
    let first = stored_header(path, 0);
    let second = stored_header(path, 1);
    assert_eq!(first, second, "both header slots of {} hold the current header", path.display());
    first
}

/// Returns the file offsets of every valid frame in the active region, in
/// order.
pub fn frame_ranges(path: &Path) -> Vec<Range<u64>> {
    let header = current_header(path);
    let start = header.active_region_start();
    let region = read_bytes(path, start, header.region_bytes as usize);
    let scan = frame::scan(&region, 0, header.generation);
    scan.frames.iter().map(|frame| start + frame.offset as u64..start + frame.end() as u64).collect()
}

pub fn read_bytes(path: &Path, offset: u64, length: usize) -> Vec<u8> {
    let file = fs::File::open(path).expect("the journal file exists");
    let mut bytes = vec![0u8; length];
    file.read_exact_at(&mut bytes, offset).expect("the range lies inside the journal file");
    bytes
}

pub fn write_bytes(path: &Path, offset: u64, bytes: &[u8]) {
    let file = fs::OpenOptions::new().write(true).open(path).expect("the journal file exists");
    file.write_all_at(bytes, offset).expect("writing inside the journal file succeeds");
}

/// Flips bit `bit` (0 = least significant) of the byte at `offset`.
pub fn flip_bit(path: &Path, offset: u64, bit: u8) {
    let byte = read_bytes(path, offset, 1)[0];
    write_bytes(path, offset, &[byte ^ (1 << bit)]);
}

/// Overwrites `range` with zero bytes.
pub fn zero_range(path: &Path, range: Range<u64>) {
    write_bytes(path, range.start, &vec![0u8; (range.end - range.start) as usize]);
}

/// Returns the metadata of the `index`-th record of a test: a fixed boot id
/// and times one second apart, so files come out the same on every run.
pub fn meta(index: u64) -> RecordMeta {
    RecordMeta { boot_id: *b"journal-test-bt1", monotonic_ms: 60_000 + index * 1_000, wall_ms: 1_793_606_400_000 + index * 1_000, clock_synced: true }
}

pub fn lease(epoch: u64, holder: &str, index: u64) -> Record {
    Record::Lease(LeaseRecord { meta: meta(index), epoch, holder: holder.to_string() })
}

pub fn lease_abort(epoch: u64, index: u64) -> Record {
    Record::LeaseAbort(LeaseAbortRecord { meta: meta(index), epoch })
}

pub fn lease_confirmed(epoch: u64, index: u64) -> Record {
    Record::LeaseConfirmed(LeaseConfirmedRecord { meta: meta(index), epoch })
}

/// Returns a transition of `machine` whose attempt number is `index`, so a
/// reader can tell which append it came from.
pub fn transition(machine: u8, from: u8, to: u8, index: u64) -> Record {
    Record::Transition(TransitionRecord { meta: meta(index), machine, from, event: 1, to, attempt: index as u32 })
}

/// Returns a transition of a machine that runs no attempts, such as the
/// space guard, so its attempt number is 0.
pub fn transition_outside_attempt(machine: u8, from: u8, to: u8, index: u64) -> Record {
    Record::Transition(TransitionRecord { meta: meta(index), machine, from, event: 1, to, attempt: 0 })
}

pub fn machine_error(machine: u8, message: &str, index: u64) -> Record {
    Record::MachineError(MachineErrorRecord { meta: meta(index), machine, message: message.to_string() })
}

pub fn release(byte: u8) -> Release {
    Release {
        commit: CommitId([byte; 20]),
        services: vec![
            ServiceImage { service: "web".into(), image: "registry.local:5000/eventpi/web:1".into(), digest: Digest([byte; 32]) },
            ServiceImage { service: "recorder".into(), image: "registry.local:5000/eventpi/recorder:1".into(), digest: Digest([byte.wrapping_add(1); 32]) },
        ],
    }
}

/// Stack memory in the middle of an attempt from `known_good` to `target`.
pub fn stack_memory(known_good: u8, target: u8, index: u64) -> Record {
    let memory = StackMemory {
        running: Some(release(known_good)),
        known_good: Some(release(known_good)),
        attempt: Some(Attempt {
            number: u32::from(target),
            target: CommitId([target; 20]),
            plan: None,
            pulled: Some(release(target)),
            pulled_on_boot: Some(*b"journal-test-bt1"),
        }),
        attempts_started: u32::from(target),
        last_outcome: Some(Outcome::Applied { commit: CommitId([known_good; 20]) }),
        ..StackMemory::default()
    };
    Record::StackMemory(StackMemoryRecord { meta: meta(index), memory })
}

/// Records of every kind, in an order the fence accepts from one handle:
/// the lease comes first.
pub fn mixed_records() -> Vec<Record> {
    vec![
        lease(1, "agent-a", 0),
        transition(1, 1, 2, 1),
        stack_memory(1, 2, 2),
        transition(1, 2, 3, 3),
        machine_error(1, "compose file of commit 0202020202 is invalid: services.web.image is missing", 4),
        lease_abort(2, 5),
        lease_confirmed(1, 6),
        transition(1, 3, 1, 7),
        stack_memory(1, 3, 8),
    ]
}

/// Folds `records` into a new state, as a reader that saw exactly these
/// records would.
pub fn fold<'a>(records: impl IntoIterator<Item = &'a Record>, history: History) -> JournalState {
    let mut state = JournalState::new(history);
    for record in records {
        state.apply(record);
    }
    state
}
