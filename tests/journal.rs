//! Integration tests of the journal file, one section per concern. Every
//! test works on journal files it creates in a temporary directory.

#[path = "support/journal.rs"]
mod support;

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use eventpi_autoupdate::journal::record::{MachineErrorRecord, StackMemoryRecord, TransitionRecord, tag};
use eventpi_autoupdate::journal::{History, Journal, JournalError, JournalState, ReadStats, Record, RecordMeta, frame};
use eventpi_autoupdate::machine::stack::{
    Outcome, PlannedService, Rejection, StackEvents, StackFacts, StackMachine, StackMemory, StackPlan, StackSettings, StackState,
};
use eventpi_autoupdate::machine::{MachineKind, describe_machine};
use eventpi_autoupdate::model::{CommitId, Digest, Failure, Release, ServiceImage};
use eventpi_autoupdate::report;

use support::*;

/// Appends `records` one at a time through a new handle, so each record is
/// one frame, and returns the handle.
fn append_each(directory: &Path, records: &[Record]) -> Journal {
    let mut journal = Journal::open(directory, small_options()).expect("a new journal opens");
    for record in records {
        journal.append(vec![record.clone()]).expect("the lease holder may append");
    }
    journal
}

/// Returns the records with the one at `skipped` left out.
fn without(records: &[Record], skipped: usize) -> Vec<Record> {
    let mut kept = records.to_vec();
    kept.remove(skipped);
    kept
}

// Torn writes

#[test]
fn torn_last_record_every_offset() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    let records = mixed_records();
    drop(append_each(directory.path(), &records));
    let pristine = fs::read(&path).unwrap();
    let frames = frame_ranges(&path);
    assert_eq!(frames.len(), records.len(), "each append of one record writes one frame");
    let last = frames.last().unwrap().clone();
    let region_start = current_header(&path).active_region_start();
    let earlier = &records[..records.len() - 1];
    let added = transition(1, 1, 2, 100);

    for cut in last.clone() {
        fs::write(&path, &pristine).unwrap();
        zero_range(&path, cut..last.end);
        let damaged = fs::read(&path).unwrap();
        let left = &damaged[last.start as usize..cut as usize];
        let expected_torn = left.iter().rposition(|&byte| byte != 0).map_or(0, |index| index as u64 + 1);

        let reader = Journal::open_read_only(directory.path()).unwrap();
        assert_eq!(reader.stats().torn_bytes, expected_torn, "cut at {cut}: a read-only handle reports the torn bytes");
        assert_eq!(reader.state(), &fold(earlier, History::All), "cut at {cut}: a read-only handle reads every earlier record");
        drop(reader);
        assert!(fs::read(&path).unwrap() == damaged, "cut at {cut}: a read-only handle leaves the torn bytes in place");

        let mut writer = Journal::open(directory.path(), small_options()).unwrap();
        assert_eq!(writer.stats().torn_bytes, expected_torn, "cut at {cut}: a writer reports the torn bytes");
        assert_eq!(writer.state(), &fold(earlier, History::Recent), "cut at {cut}: a writer reads every earlier record");
        let after_last_valid = read_bytes(&path, last.start, (last.end - last.start) as usize);
        assert!(after_last_valid.iter().all(|&byte| byte == 0), "cut at {cut}: a writer zeroes the torn bytes");
        assert_eq!(writer.usage().0, last.start - region_start, "cut at {cut}: the next append goes where the torn record began");

        writer.assume_epoch(1);
        writer.append(vec![added.clone()]).unwrap();
        drop(writer);

        let frames_after = frame_ranges(&path);
        assert_eq!(frames_after.last().unwrap().start, last.start, "cut at {cut}: the new record lands right after the last valid one");
        let reopened = Journal::open(directory.path(), small_options()).unwrap();
        let expected = fold(earlier.iter().chain([&added]), History::Recent);
        assert_eq!(reopened.state(), &expected, "cut at {cut}: the new record reads back after reopening");
        assert_eq!(reopened.stats(), ReadStats::default(), "cut at {cut}: nothing is skipped after the writer's repair");
    }
}

#[test]
fn read_only_counts_torn_bytes_once() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    let records = mixed_records();
    drop(append_each(directory.path(), &records));
    let end = frame_ranges(&path).last().unwrap().end;
    write_bytes(&path, end, &[frame::SYNC, 0x21, 0x00, 0x00]);

    let mut reader = Journal::open_read_only(directory.path()).unwrap();
    for _ in 0..3 {
        reader.refresh().unwrap();
    }

    assert_eq!(reader.stats().torn_bytes, 2, "the torn bytes end at the last non-zero byte and are counted once");
    assert_eq!(reader.state().total_transitions(), 3, "every record before the torn bytes is read");
}

// Flipped bits

/// Where a flipped bit lies, and so what reading the journal must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlipArea {
    /// Inside the 36-byte header of slot 0 or 1.
    HeaderSlot(usize),
    /// In a slot after its header: bytes no reader looks at.
    SlotPadding(usize),
    /// Inside frame `index` of the active region.
    Frame(usize),
    /// In the zero bytes after the last frame.
    AfterEnd,
}

/// Returns the state and counts a read must return after one flipped bit,
/// as the table in the "Damage" section of the `journal` module lists them.
fn expected_after_flip(area: FlipArea, records: &[Record], frames: &[std::ops::Range<u64>], file: &[u8]) -> (JournalState, ReadStats) {
    let all = fold(records, History::All);
    match area {
        FlipArea::HeaderSlot(_) => (all, ReadStats { damaged_header_slots: 1, ..ReadStats::default() }),
        FlipArea::SlotPadding(_) => (all, ReadStats::default()),
        FlipArea::Frame(index) if index + 1 < frames.len() => {
            let length = frames[index].end - frames[index].start;
            let stats = ReadStats { damaged_bytes: length, damaged_spans: 1, ..ReadStats::default() };
            (fold(&without(records, index), History::All), stats)
        }
        FlipArea::Frame(index) => {
            // Region 1 of this journal was never used, so the last non-zero
            // byte of the file is the end of the torn bytes in region 0.
            let start = frames[index].start as usize;
            let last_non_zero = file.iter().rposition(|&byte| byte != 0).expect("the journal has a non-zero byte");
            let stats = ReadStats { torn_bytes: (last_non_zero + 1 - start) as u64, ..ReadStats::default() };
            (fold(&without(records, index), History::All), stats)
        }
        FlipArea::AfterEnd => (all, ReadStats { torn_bytes: 1, ..ReadStats::default() }),
    }
}

#[test]
fn bit_flip_every_position() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    let records = mixed_records();
    drop(append_each(directory.path(), &records));
    let pristine = fs::read(&path).unwrap();
    let frames = frame_ranges(&path);

    let mut positions: Vec<(u64, FlipArea)> = Vec::new();
    for (slot, &offset) in HEADER_SLOT_OFFSETS.iter().enumerate() {
        let header_end = offset + HEADER_BYTES as u64;
        positions.extend((offset..header_end).map(|byte| (byte, FlipArea::HeaderSlot(slot))));
        positions.extend((header_end..header_end + 8).map(|byte| (byte, FlipArea::SlotPadding(slot))));
    }
    for (index, range) in frames.iter().enumerate() {
        positions.extend(range.clone().map(|byte| (byte, FlipArea::Frame(index))));
    }
    let end = frames.last().unwrap().end;
    positions.extend((end..end + 16).map(|byte| (byte, FlipArea::AfterEnd)));

    for &(offset, area) in &positions {
        for bit in 0..8 {
            let case = format!("bit {bit} of file byte {offset} ({area:?})");
            fs::write(&path, &pristine).unwrap();
            flip_bit(&path, offset, bit);
            let damaged = fs::read(&path).unwrap();

            let opened = catch_unwind(AssertUnwindSafe(|| Journal::open_read_only(directory.path())));
            let journal = match opened {
                Ok(Ok(journal)) => journal,
                Ok(Err(error)) => panic!("{case}: opening failed: {error}"),
                Err(_) => panic!("{case}: opening panicked"),
            };

            let (state, stats) = expected_after_flip(area, &records, &frames, &damaged);
            assert_eq!(journal.stats(), stats, "{case}: counts of skipped bytes");
            assert_eq!(journal.state(), &state, "{case}: records read");
        }
    }
}

#[test]
fn both_header_slots_damaged_rejected() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    drop(append_each(directory.path(), &mixed_records()));
    flip_bit(&path, HEADER_SLOT_OFFSETS[0] + 13, 0);
    flip_bit(&path, HEADER_SLOT_OFFSETS[1] + 13, 0);

    let result = Journal::open(directory.path(), small_options());

    assert!(matches!(result, Err(JournalError::NoValidHeader { .. })), "expected NoValidHeader, got {result:?}");
}

#[test]
fn short_file_has_no_valid_header() {
    let directory = tempfile::tempdir().unwrap();
    std::fs::write(journal_path(directory.path()), b"").unwrap();

    let result = Journal::open(directory.path(), small_options());

    assert!(matches!(result, Err(JournalError::NoValidHeader { .. })), "expected NoValidHeader, got {result:?}");
}

#[test]
fn missing_file_is_named_for_readers() {
    let directory = tempfile::tempdir().unwrap();

    let error = Journal::open_read_only(directory.path()).unwrap_err();

    assert!(matches!(error, JournalError::NotFound { .. }), "expected NotFound, got {error:?}");
    assert!(error.to_string().contains("--journal"), "{error}");
}

#[test]
fn agent_moves_empty_journal_aside() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    std::fs::write(&path, b"").unwrap();
    let config = eventpi_autoupdate::config::JournalConfig { directory: directory.path().to_path_buf(), size_kib: 64 };

    let opened = eventpi_autoupdate::agent::open_journal(&config);

    assert!(opened.is_ok(), "{:?}", opened.err());
    assert_eq!(std::fs::metadata(directory.path().join("journal.bin.unreadable")).unwrap().len(), 0);
    assert!(Journal::open_read_only(directory.path()).is_ok(), "a new journal replaces the empty file");
}

#[test]
fn writer_repairs_damaged_header_slot() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    drop(append_each(directory.path(), &mixed_records()));
    let intact = read_bytes(&path, HEADER_SLOT_OFFSETS[0], HEADER_BYTES);
    flip_bit(&path, HEADER_SLOT_OFFSETS[1] + 20, 0);

    let writer = Journal::open(directory.path(), small_options()).unwrap();
    let repaired = read_bytes(&path, HEADER_SLOT_OFFSETS[1], HEADER_BYTES);
    drop(writer);
    let reopened = Journal::open_read_only(directory.path()).unwrap();

    assert_eq!(repaired, intact, "the writer copies the valid header into the damaged slot");
    assert_eq!(reopened.stats().damaged_header_slots, 0, "no slot is damaged after the repair");
}

#[test]
fn writer_rewrites_stale_header_slot() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    let mut journal = Journal::open(directory.path(), small_options()).unwrap();
    journal.take_lease("agent-a", meta(0)).unwrap();
    let first_generation = read_bytes(&path, 0, HEADER_BLOCK_BYTES as usize);
    let mut index = 1;
    while current_header(&path).generation == 1 {
        journal.append(vec![transition(1, 1, 2, index)]).unwrap();
        index += 1;
    }
    let expected = journal.state().clone();
    drop(journal);

    // Generation 2 is written to slot 0 first, so a crash before the second
    // write leaves slot 1 with the valid header of generation 1.
    write_bytes(&path, HEADER_SLOT_OFFSETS[1], &first_generation[2048..2048 + HEADER_BYTES]);
    drop(Journal::open(directory.path(), small_options()).unwrap());
    let slot_1 = stored_header(&path, 1);
    flip_bit(&path, HEADER_SLOT_OFFSETS[0] + 12, 3);
    let reopened = Journal::open(directory.path(), small_options()).unwrap();

    assert_eq!(slot_1.generation, 2, "the writer rewrites the older slot with the current header");
    assert_eq!(reopened.state(), &expected, "with slot 0 damaged, slot 1 still names the compacted region");
}

// Records from newer versions

#[test]
fn unknown_tag_skipped_and_counted() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    let before = [lease(1, "agent-a", 0), transition(1, 1, 2, 1)];
    let mut journal = append_each(directory.path(), &before);
    let header = current_header(&path);
    let unknown_at = header.active_region_start() + journal.usage().0;
    let raw = frame::encode(header.generation, 250, b"a record type from a newer agent");
    write_bytes(&path, unknown_at, &raw);

    let after = transition(1, 2, 3, 2);
    journal.append(vec![after.clone()]).unwrap();
    let writer_unknown = journal.state().unknown_records;
    drop(journal);
    let mut other = Journal::open(directory.path(), small_options()).unwrap();
    other.assume_epoch(1);
    let last = transition(1, 3, 1, 3);
    other.append(vec![last.clone()]).unwrap();
    drop(other);
    let reader = Journal::open_read_only(directory.path()).unwrap();

    let mut expected = fold(before.iter().chain([&after, &last]), History::All);
    expected.unknown_records = 1;
    let frames = frame_ranges(&path);
    assert_eq!(writer_unknown, 1, "the handle that appends next reads and counts the unknown record");
    assert_eq!(frames[2].start, unknown_at, "the unknown record stays between the known ones");
    assert_eq!(frames[3].start, unknown_at + raw.len() as u64, "the next append lands after the unknown record");
    assert_eq!(reader.state(), &expected, "every known record is read and the unknown one is counted");
    assert_eq!(reader.stats(), ReadStats::default(), "an unknown record is not damage");
}

#[test]
fn undecodable_payload_skipped_and_counted() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    let before = [lease(1, "agent-a", 0), transition(1, 1, 2, 1)];
    let mut journal = append_each(directory.path(), &before);
    let header = current_header(&path);
    let raw = frame::encode(header.generation, tag::TRANSITION, &[0xFF, 0xFF, 0xFF]);
    write_bytes(&path, header.active_region_start() + journal.usage().0, &raw);

    let after = transition(1, 2, 3, 2);
    journal.append(vec![after.clone()]).unwrap();
    drop(journal);
    let reader = Journal::open_read_only(directory.path()).unwrap();

    let mut expected = fold(before.iter().chain([&after]), History::All);
    expected.undecodable_records = 1;
    assert_eq!(reader.state(), &expected, "every other record is read and the undecodable one is counted");
}

// Golden journal of format version 1

/// A journal written by version 0.1.0 and the `autoupdate replay` text it
/// gives. Every later version must read it the same way, so the files are
/// never regenerated: a new format version gets a new folder.
const GOLDEN_DIRECTORY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/journal-v1");

const GOLDEN_HOLDER: &str = "container:3f9c2a1b7e4d";

fn commit(hex: &str) -> CommitId {
    hex.parse().expect("golden commit ids are 40 hex digits")
}

fn digest(hex: &str) -> Digest {
    format!("sha256:{hex}").parse().expect("golden digests are 64 hex digits")
}

fn golden_boot_id(text: &str) -> [u8; 16] {
    eventpi_autoupdate::seams::parse_uuid(text).expect("golden boot ids are UUIDs")
}

fn golden_release(commit_hex: &str, web_tag: &str, web_digest: &str) -> Release {
    Release {
        commit: commit(commit_hex),
        services: vec![
            ServiceImage { service: "web".into(), image: format!("registry.local:5000/eventpi/web:{web_tag}"), digest: digest(web_digest) },
            ServiceImage {
                service: "recorder".into(),
                image: "registry.local:5000/eventpi/recorder:1.9.2".into(),
                digest: digest("5d41402abc4b2a76b9719d911017c592ae7d6e1b2a0f3c4d5e6f708192a3b4c5"),
            },
        ],
    }
}

/// Returns the release of the first commit, which is applied and is the
/// known-good commit at the end.
fn golden_release_applied() -> Release {
    golden_release("3b18e512dba79e4c8300dd08aeb37f8e728b8dad", "2.4.0", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
}

/// Returns the release of the third commit, whose probation fails so the
/// device rolls back.
fn golden_release_rolled_back() -> Release {
    golden_release("e5a7c9b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a1c3", "2.5.0", "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752")
}

const GOLDEN_REJECTED_COMMIT: &str = "9c2e6f0a41b5d7e83f1a2c4b6d8e0f1a3c5b7d9e";

const GOLDEN_PROBATION_FAILURE: &str = "service web exited with code 1 during probation";

fn plan_of(release: &Release) -> StackPlan {
    let services = release.services.iter().map(|service| PlannedService { service: service.service.clone(), image: service.image.clone() }).collect();
    StackPlan { services }
}

/// Drives a stack machine and persists each step as the stack driver does:
/// the transition, the memory when it changed, and the failure as the
/// machine's last error. Times and boot ids are fixed, not read from the
/// clock.
struct GoldenRecorder {
    journal: Journal,
    machine: StackMachine,
    boot_id: [u8; 16],
    boot_wall_ms: u64,
    monotonic_ms: u64,
    clock_synced: bool,
}

impl GoldenRecorder {
    fn new(directory: &Path) -> Self {
        GoldenRecorder {
            journal: Journal::open(directory, small_options()).expect("a new golden journal opens"),
            machine: StackMachine::restore(StackState::Idle, StackMemory::default(), StackSettings::default()),
            boot_id: golden_boot_id("6f1c8a9e-2b3d-4e5f-8a9b-0c1d2e3f4a5b"),
            // 2026-11-02T08:00:00Z
            boot_wall_ms: 1_793_606_400_000,
            monotonic_ms: 21_000,
            clock_synced: true,
        }
    }

    fn meta(&self) -> RecordMeta {
        RecordMeta { boot_id: self.boot_id, monotonic_ms: self.monotonic_ms, wall_ms: self.boot_wall_ms + self.monotonic_ms, clock_synced: self.clock_synced }
    }

    fn wait(&mut self, seconds: u64) {
        self.monotonic_ms += seconds * 1000;
    }

    /// Starts a new boot `seconds_down` after the last record. The agent
    /// starts 14 s into the boot, before the clock is synchronised.
    fn reboot(&mut self, boot_id: &str, seconds_down: u64) {
        let wall_ms = self.meta().wall_ms + seconds_down * 1000;
        self.boot_id = golden_boot_id(boot_id);
        self.monotonic_ms = 14_000;
        self.boot_wall_ms = wall_ms - self.monotonic_ms;
        self.clock_synced = false;
    }

    fn take_lease(&mut self) {
        let meta = self.meta();
        self.journal.take_lease(GOLDEN_HOLDER, meta).expect("the golden agent takes the lease");
    }

    fn handle(&mut self, event: StackEvents) {
        let step = self.machine.handle(event, StackFacts { boot_id: self.boot_id }).expect("every event of the golden scenario is one its state takes");
        let meta = self.meta();
        let machine = MachineKind::Stack.code();
        let mut records = vec![Record::Transition(TransitionRecord {
            meta,
            machine,
            from: step.from.code(),
            event: step.event.code(),
            to: step.to.code(),
            attempt: step.attempt,
        })];
        if step.memory_changed {
            records.push(Record::StackMemory(StackMemoryRecord { meta, memory: self.machine.memory().clone() }));
        }
        if let Some(failure) = step.failure {
            records.push(Record::MachineError(MachineErrorRecord { meta, machine, message: failure.message }));
        }
        self.journal.append(records).expect("the golden agent holds the lease");
    }
}

/// Writes the golden scenario into a new journal in `directory`: a full
/// update, a rejected commit, a power cut, and an update that rolls back.
fn write_golden_scenario(directory: &Path) {
    let applied = golden_release_applied();
    let rolled_back = golden_release_rolled_back();
    let mut recorder = GoldenRecorder::new(directory);
    recorder.take_lease();

    recorder.wait(2);
    recorder.handle(StackEvents::Poll);
    recorder.wait(1);
    recorder.handle(StackEvents::TipFetched(applied.commit));
    recorder.wait(3);
    recorder.handle(StackEvents::Valid(plan_of(&applied)));
    recorder.wait(48);
    recorder.handle(StackEvents::Pulled(applied.clone()));
    recorder.wait(1);
    recorder.handle(StackEvents::PolicyAllows);
    recorder.wait(9);
    recorder.handle(StackEvents::Applied);
    recorder.wait(300);
    recorder.handle(StackEvents::GatePassed);

    recorder.wait(3600);
    recorder.handle(StackEvents::Poll);
    recorder.wait(1);
    recorder.handle(StackEvents::TipFetched(commit(GOLDEN_REJECTED_COMMIT)));
    recorder.wait(2);
    recorder.handle(StackEvents::Invalid(Failure::rejected(
        "commit 9c2e6f0a41b5: docker compose config failed: service \"web\" has neither an image nor a build context specified",
    )));

    recorder.wait(1800);
    recorder.reboot("0d9b7c35-8e21-4f6a-b3c4-d5e6f7a8b9c0", 40);
    recorder.take_lease();
    recorder.handle(StackEvents::Resumed);
    recorder.wait(1);
    recorder.handle(StackEvents::Poll);
    recorder.clock_synced = true;
    recorder.wait(1);
    recorder.handle(StackEvents::TipFetched(rolled_back.commit));
    recorder.wait(2);
    recorder.handle(StackEvents::Valid(plan_of(&rolled_back)));
    recorder.wait(52);
    recorder.handle(StackEvents::Pulled(rolled_back.clone()));
    recorder.wait(1);
    recorder.handle(StackEvents::PolicyAllows);
    recorder.wait(10);
    recorder.handle(StackEvents::Applied);
    recorder.wait(95);
    recorder.handle(StackEvents::GateFailed(Failure::rejected(GOLDEN_PROBATION_FAILURE)));
    recorder.wait(12);
    recorder.handle(StackEvents::Applied);
    recorder.wait(300);
    recorder.handle(StackEvents::GatePassed);
}

/// Runs `autoupdate replay` on the journal in `directory` and returns its
/// standard output.
fn run_replay(directory: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_autoupdate")).arg("replay").arg("--journal").arg(directory).output().expect("the autoupdate binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "autoupdate replay failed with {}: {stderr}", output.status);
    String::from_utf8(output.stdout).expect("replay prints UTF-8")
}

/// Copies the golden journal into a temporary directory, so no test can
/// change the committed file.
fn golden_copy() -> tempfile::TempDir {
    let directory = tempfile::tempdir().unwrap();
    let source = Path::new(GOLDEN_DIRECTORY).join("journal.bin");
    fs::copy(&source, journal_path(directory.path())).unwrap_or_else(|error| panic!("cannot copy {}: {error}", source.display()));
    directory
}

#[test]
#[ignore = "rewrites tests/golden/journal-v1; run with UPDATE_GOLDEN=1 and --ignored only for a new golden version"]
fn generate_golden_v1() {
    if std::env::var_os("UPDATE_GOLDEN").is_none_or(|value| value != "1") {
        eprintln!("UPDATE_GOLDEN=1 is not set; the golden journal was not rewritten");
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    write_golden_scenario(directory.path());
    let replay = run_replay(directory.path());

    fs::create_dir_all(GOLDEN_DIRECTORY).unwrap();
    fs::copy(journal_path(directory.path()), Path::new(GOLDEN_DIRECTORY).join("journal.bin")).unwrap();
    fs::write(Path::new(GOLDEN_DIRECTORY).join("replay.txt"), replay).unwrap();
}

#[test]
fn golden_v1_replay_matches() {
    let directory = golden_copy();
    let expected = fs::read_to_string(Path::new(GOLDEN_DIRECTORY).join("replay.txt")).unwrap();

    let replay = run_replay(directory.path());

    assert_eq!(replay, expected, "autoupdate replay of the golden journal differs from replay.txt");
}

#[test]
fn golden_v1_final_state_matches() {
    let directory = golden_copy();
    let expected_memory = StackMemory {
        running: Some(golden_release_applied()),
        known_good: Some(golden_release_applied()),
        attempt: None,
        rejected: Some(Rejection { commit: golden_release_rolled_back().commit, reason: GOLDEN_PROBATION_FAILURE.to_string() }),
        resumes: 0,
        transient_failures: 0,
        attempts_started: 3,
        needs_attention: None,
        last_outcome: Some(Outcome::RolledBack { failed: golden_release_rolled_back().commit, restored: golden_release_applied().commit }),
        factory_resets: 0,
        factory_reset_reason: None,
    };

    let journal = Journal::open_read_only(directory.path()).unwrap();
    let state = journal.state();
    let stack = state.machine(MachineKind::Stack.code()).expect("the golden journal has stack transitions");

    assert_eq!(state.stack_memory.as_ref(), Some(&expected_memory), "final stack memory");
    assert_eq!(stack.state, Some(StackState::Idle.code()), "the stack machine ends in Idle");
    let last_error = stack.last_error.as_ref().map(|error| error.message.as_str());
    assert_eq!(last_error, Some(GOLDEN_PROBATION_FAILURE), "the stack machine's last error");
    let lease = state.lease.as_ref().map(|lease| (lease.epoch, lease.holder.as_str()));
    assert_eq!(lease, Some((2, GOLDEN_HOLDER)), "the lease taken after the reboot");
    assert_eq!(state.total_transitions(), 20, "every transition of the scenario");
    assert_eq!(journal.stats(), ReadStats::default(), "nothing in the golden journal is skipped");
    assert_eq!(state.unknown_records + state.undecodable_records, 0, "every golden record decodes");
}

#[test]
fn golden_v1_accepts_appends() {
    let directory = golden_copy();
    let mut journal = Journal::open(directory.path(), small_options()).unwrap();

    let epoch = journal.take_lease("container:0a1b2c3d4e5f", meta(0)).unwrap();
    journal.append(vec![transition(MachineKind::Stack.code(), 1, 2, 1)]).unwrap();
    drop(journal);
    let reopened = Journal::open_read_only(directory.path()).unwrap();

    assert_eq!(epoch, 3, "the next lease after the golden journal's epoch 2");
    assert_eq!(reopened.state().total_transitions(), 21, "the golden transitions and the new one");
}

// Fencing

#[test]
fn fenced_handle_writes_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    let mut first = Journal::open(directory.path(), small_options()).unwrap();
    let mut second = Journal::open(directory.path(), small_options()).unwrap();
    let first_epoch = first.take_lease("agent-a", meta(0)).unwrap();
    let second_epoch = second.take_lease("agent-b", meta(1)).unwrap();
    let before = fs::read(&path).unwrap();

    let result = first.append(vec![transition(1, 1, 2, 2)]);

    assert_eq!(first_epoch, 1, "the first lease takes epoch 1");
    assert_eq!(second_epoch, 2, "the second handle reads the first lease and takes epoch 2");
    assert!(matches!(result, Err(JournalError::Fenced { ours: 1, newest: 2 })), "expected Fenced, got {result:?}");
    assert!(fs::read(&path).unwrap() == before, "a fenced append leaves the file unchanged");
}

#[test]
fn stale_and_aborted_leases_rejected() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    let mut first = Journal::open(directory.path(), small_options()).unwrap();
    let mut second = Journal::open(directory.path(), small_options()).unwrap();
    first.take_lease("agent-a", meta(0)).unwrap();
    second.take_lease("agent-b", meta(1)).unwrap();

    let equal = first.append(vec![lease(2, "agent-a", 2)]);
    let older = first.append(vec![lease(1, "agent-a", 3)]);
    second.append(vec![lease_abort(3, 4)]).unwrap();
    let before_aborted = fs::read(&path).unwrap();
    let aborted = first.append(vec![lease(3, "agent-a", 5)]);
    let aborted_by_holder = second.append(vec![lease(3, "agent-b", 6)]);
    let unchanged = fs::read(&path).unwrap() == before_aborted;
    let kept = second.append(vec![transition(1, 1, 2, 7)]);
    drop((first, second));
    let reader = Journal::open_read_only(directory.path()).unwrap();

    assert!(matches!(equal, Err(JournalError::StaleLease { epoch: 2, newest: 2 })), "lease with the newest epoch: {equal:?}");
    assert!(matches!(older, Err(JournalError::StaleLease { epoch: 1, newest: 2 })), "lease with an older epoch: {older:?}");
    assert!(matches!(aborted, Err(JournalError::StaleLease { epoch: 3, newest: 2 })), "lease with an aborted epoch: {aborted:?}");
    assert!(
        matches!(aborted_by_holder, Err(JournalError::StaleLease { epoch: 3, newest: 2 })),
        "the holder cannot take an aborted epoch either: {aborted_by_holder:?}"
    );
    assert!(unchanged, "rejected leases leave the file unchanged");
    assert!(kept.is_ok(), "the holder keeps appending: {kept:?}");
    let lease = reader.state().lease.as_ref().map(|lease| (lease.epoch, lease.holder.as_str()));
    assert_eq!(lease, Some((2, "agent-b")), "the lease in the file");
    assert!(reader.state().aborted_epochs.contains(&3), "the aborted epoch in the file");
    assert_eq!(reader.state().total_transitions(), 1, "the holder's transition in the file");
}

#[test]
fn take_lease_skips_aborted_epoch() {
    let directory = tempfile::tempdir().unwrap();
    let mut first = Journal::open(directory.path(), small_options()).unwrap();
    let mut second = Journal::open(directory.path(), small_options()).unwrap();
    first.take_lease("agent-a", meta(0)).unwrap();
    second.take_lease("agent-b", meta(1)).unwrap();
    second.append(vec![lease_abort(3, 2)]).unwrap();

    let epoch = first.take_lease("agent-a", meta(3)).unwrap();
    let fenced = second.append(vec![transition(1, 1, 2, 4)]);

    assert_eq!(epoch, 4, "the new lease skips the aborted epoch 3");
    assert!(matches!(fenced, Err(JournalError::Fenced { ours: 2, newest: 4 })), "expected Fenced, got {fenced:?}");
}

// Compaction

/// Appends to a 36 KiB journal, enough to compact it many times. The test
/// requires at least 5 compactions.
const FILL_APPENDS: u64 = 2000;

/// The last append that carries stack memory, an error, a lease record or a
/// transition of machine 5. Later appends carry transitions of machines 1
/// and 4 only, and they compact the journal again. So only the snapshot can
/// carry those records and machine 5's state.
const LAST_DETAILED_APPEND: u64 = 1600;

/// What `fill_with_compactions` appended.
struct Fill {
    records: Vec<Record>,
    transitions: Vec<TransitionRecord>,
    compactions: u64,
    /// Transitions appended from the append that ran the last compaction on.
    transitions_since_compaction: usize,
    /// Number of the append that ran the last compaction, counted from 1.
    last_compaction_at: u64,
}

/// Appends transitions of three machines, stack memory, errors, lease aborts
/// and a lease confirmation through `holder`, which holds lease epoch 1.
fn fill_with_compactions(directory: &Path, holder: &mut Journal) -> Fill {
    let path = journal_path(directory);
    let mut fill = Fill { records: Vec::new(), transitions: Vec::new(), compactions: 0, transitions_since_compaction: 0, last_compaction_at: 0 };
    let mut generation = current_header(&path).generation;

    for index in 1..=FILL_APPENDS {
        let machine = if index % 2 == 0 { 1 } else { 4 };
        let from = (index % 10) as u8 + 1;
        let to = ((index + 1) % 10) as u8 + 1;
        let mut records = vec![transition(machine, from, to, index)];
        let detailed = index <= LAST_DETAILED_APPEND;
        if detailed && index % 10 == 0 {
            records.push(stack_memory(1, (index / 10 % 250) as u8, index));
        }
        if detailed && index % 50 == 0 {
            records.push(transition_outside_attempt(5, 1, (index / 50 % 3) as u8 + 1, index));
        }
        if detailed && index % 100 == 0 {
            records.push(machine_error(4, &format!("data filesystem has {} % free, below the 15 % watermark", index % 15), index));
        }
        match index {
            500 => records.push(lease_abort(2, index)),
            900 => records.push(lease_abort(3, index)),
            1200 => records.push(lease_confirmed(1, index)),
            _ => {}
        }
        holder.append(records.clone()).expect("the holder of lease epoch 1 may append");
        let records_transitions = records.iter().filter(|record| matches!(record, Record::Transition(_))).count();

        for record in &records {
            if let Record::Transition(appended) = record {
                fill.transitions.push(*appended);
            }
        }
        fill.records.extend(records);
        let now = current_header(&path).generation;
        if now != generation {
            fill.compactions += 1;
            fill.transitions_since_compaction = 0;
            fill.last_compaction_at = index;
            generation = now;
        }
        fill.transitions_since_compaction += records_transitions;
    }
    fill
}

/// Asserts that two states agree, one field at a time so a failure names
/// the field.
fn assert_same_state(actual: &JournalState, expected: &JournalState, context: &str) {
    assert_eq!(actual.machines, expected.machines, "{context}: machines");
    assert_eq!(actual.stack_memory, expected.stack_memory, "{context}: stack memory");
    assert_eq!(actual.lease, expected.lease, "{context}: lease");
    assert_eq!(actual.aborted_epochs, expected.aborted_epochs, "{context}: aborted epochs");
    assert_eq!(actual.confirmed_epochs, expected.confirmed_epochs, "{context}: confirmed epochs");
    assert_eq!(actual.transitions, expected.transitions, "{context}: kept transitions");
    assert_eq!(actual.dropped_transitions, expected.dropped_transitions, "{context}: dropped transitions");
}

#[test]
fn compaction_preserves_state_and_history() {
    let directory = tempfile::tempdir().unwrap();
    let mut holder = Journal::open(directory.path(), small_options()).unwrap();
    let lease_record = lease(1, "agent-a", 0);
    holder.append(vec![lease_record.clone()]).unwrap();

    let fill = fill_with_compactions(directory.path(), &mut holder);
    let expected = fold([&lease_record].into_iter().chain(&fill.records), History::Recent);
    let fresh = Journal::open(directory.path(), small_options()).unwrap();
    let reader = Journal::open_read_only(directory.path()).unwrap();
    let entries = report::replay_entries(reader.state());
    let text = report::replay_text(reader.state());

    assert!(fill.compactions >= 5, "{FILL_APPENDS} appends compacted the journal only {} times", fill.compactions);
    let last_compaction = fill.last_compaction_at;
    assert!(last_compaction > LAST_DETAILED_APPEND, "the last compaction ran at append {last_compaction}, before the last detailed one");
    assert_same_state(holder.state(), &expected, "holder after compaction against the fold of every record");
    assert_same_state(fresh.state(), holder.state(), "fresh read against the holder");
    assert_eq!(fresh.stats(), ReadStats::default(), "a compacted region has no damaged or torn bytes");
    assert_eq!(entries.len(), 128 + fill.transitions_since_compaction, "replay lists the 128 kept transitions and the later ones");
    let dropped = fill.transitions.len() - entries.len();
    assert_eq!(reader.state().dropped_transitions, dropped as u64, "dropped transitions counted by the reader");
    assert_eq!(text.lines().next(), Some(format!("({dropped} earlier transitions were compacted away)").as_str()), "first replay line");
    let replayed: Vec<(String, u32)> = entries.iter().map(|entry| (entry.machine.clone(), entry.attempt)).collect();
    let latest: Vec<(String, u32)> = fill.transitions[dropped..].iter().map(|transition| (describe_machine(transition.machine), transition.attempt)).collect();
    assert_eq!(replayed, latest, "replay lists the latest transitions in order");
}

#[test]
fn compaction_zeroes_reused_region() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    let mut holder = Journal::open(directory.path(), small_options()).unwrap();
    holder.take_lease("agent-a", meta(0)).unwrap();

    let mut index = 1;
    while current_header(&path).generation < 3 {
        holder.append(vec![transition(1, 1, 2, index)]).unwrap();
        index += 1;
    }
    let header = current_header(&path);
    let (end, region_bytes) = holder.usage();
    let rest = read_bytes(&path, header.active_region_start() + end, (region_bytes - end) as usize);
    let reader = Journal::open_read_only(directory.path()).unwrap();

    assert_eq!(header.active, 0, "generation 3 uses region 0 again");
    assert!(rest.iter().all(|&byte| byte == 0), "the bytes after the records of the reused region are zero");
    assert_eq!(reader.stats(), ReadStats::default(), "a reader finds no torn bytes in the reused region");
}

#[test]
fn stale_handle_rereads_compacted_header() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    let mut holder = Journal::open(directory.path(), small_options()).unwrap();
    holder.take_lease("agent-a", meta(0)).unwrap();
    let mut stale = Journal::open(directory.path(), small_options()).unwrap();
    let generation_at_open = current_header(&path).generation;

    fill_with_compactions(directory.path(), &mut holder);
    let generation_after_fill = current_header(&path).generation;
    let epoch = stale.take_lease("agent-b", meta(FILL_APPENDS + 1)).unwrap();
    let fresh = Journal::open(directory.path(), small_options()).unwrap();
    let fenced = holder.append(vec![transition(1, 1, 2, FILL_APPENDS + 2)]);

    assert!(generation_after_fill > generation_at_open, "the journal was compacted after the stale handle opened");
    assert_eq!(epoch, 4, "the stale handle reads the aborted epochs 2 and 3 appended after it opened");
    assert_same_state(stale.state(), fresh.state(), "stale handle after its append against a fresh read");
    assert!(matches!(fenced, Err(JournalError::Fenced { ours: 1, newest: 4 })), "expected Fenced, got {fenced:?}");
}

// Locking and readers next to a writer

/// Runs `work` on a thread while the test holds an exclusive `flock` on the
/// journal file through its own descriptor, as another process would.
/// Returns whether `work` finished within 300 ms, before the lock was
/// released.
fn finished_while_locked(path: &Path, work: impl FnOnce() + Send + 'static) -> bool {
    let other_process = fs::File::open(path).unwrap();
    other_process.lock().unwrap();
    let (sender, receiver) = mpsc::channel();
    let worker = thread::spawn(move || {
        work();
        sender.send(()).unwrap();
    });
    let finished = receiver.recv_timeout(Duration::from_millis(300)).is_ok();
    other_process.unlock().unwrap();
    worker.join().expect("the work finishes once the lock is released");
    finished
}

#[test]
fn append_and_refresh_wait_for_lock() {
    let directory = tempfile::tempdir().unwrap();
    let path = journal_path(directory.path());
    let mut writer = Journal::open(directory.path(), small_options()).unwrap();
    writer.take_lease("agent-a", meta(0)).unwrap();
    let mut reader = Journal::open_read_only(directory.path()).unwrap();

    let append_finished = finished_while_locked(&path, move || {
        writer.append(vec![transition(1, 1, 2, 1)]).expect("the append succeeds once the lock is released");
    });
    let refresh_finished = finished_while_locked(&path, move || {
        reader.refresh().expect("the refresh succeeds once the lock is released");
    });

    assert!(!append_finished, "an append returned while another process held the journal's flock");
    assert!(!refresh_finished, "a read-only refresh returned while another process held the journal's flock");
}

/// Appends made by the writer thread; several compactions happen meanwhile.
const CONCURRENT_APPENDS: u64 = 400;

/// Checks what a reader sees after one refresh, and returns the number of
/// transitions it has read so far.
fn check_reader_view(journal: &Journal, name: &str, seen_before: u64) -> u64 {
    let state = journal.state();
    let seen = state.total_transitions();
    assert_eq!(journal.stats(), ReadStats::default(), "{name}: a reader next to a live writer sees no damaged or torn bytes");
    assert_eq!(state.undecodable_records, 0, "{name}: every record decodes");
    assert!(seen >= seen_before, "{name}: the count of transitions went back from {seen_before} to {seen}");

    let attempts: Vec<u32> = state.transitions.iter().map(|transition| transition.attempt).collect();
    let contiguous = attempts.windows(2).all(|pair| pair[1] == pair[0] + 1);
    assert!(contiguous, "{name}: transitions are read without gaps or repeats: {attempts:?}");
    let last = attempts.last().map_or(0, |&attempt| u64::from(attempt));
    assert_eq!(last, seen, "{name}: the last transition read is the {seen}th appended");

    // Every tenth append carries the stack memory in the same write as its
    // transition, so a reader sees both or neither.
    let target = state.stack_memory.as_ref().and_then(|memory| memory.attempt.as_ref()).map(|attempt| attempt.target);
    let expected_target = (seen >= 10).then_some(CommitId([(seen / 10) as u8; 20]));
    assert_eq!(target, expected_target, "{name}: the stack memory matches the last transition read");
    seen
}

#[test]
fn readers_follow_concurrent_writer() {
    let directory = tempfile::tempdir().unwrap();
    let mut writer = Journal::open(directory.path(), small_options()).unwrap();
    writer.take_lease("writer", meta(0)).unwrap();
    let readers = vec![
        ("read-only reader", Journal::open_read_only(directory.path()).unwrap()),
        ("first agent reader", Journal::open(directory.path(), small_options()).unwrap()),
        ("second agent reader", Journal::open(directory.path(), small_options()).unwrap()),
    ];
    let writer_done = Arc::new(AtomicBool::new(false));

    let reader_threads: Vec<_> = readers
        .into_iter()
        .map(|(name, mut journal)| {
            let writer_done = Arc::clone(&writer_done);
            thread::spawn(move || {
                let mut seen = 0;
                let mut partial_views = 0u64;
                loop {
                    let finished = writer_done.load(Ordering::Acquire);
                    journal.refresh().unwrap_or_else(|error| panic!("{name}: refresh failed: {error}"));
                    let previous = seen;
                    seen = check_reader_view(&journal, name, seen);
                    if seen != previous && seen < CONCURRENT_APPENDS {
                        partial_views += 1;
                    }
                    if finished {
                        return (name, journal, partial_views);
                    }
                }
            })
        })
        .collect();

    let writer_thread = thread::spawn(move || {
        for index in 1..=CONCURRENT_APPENDS {
            let mut records = vec![transition(1, 1, 2, index)];
            if index % 10 == 0 {
                records.push(stack_memory(1, (index / 10) as u8, index));
            }
            writer.append(records).expect("the writer holds the lease");
            // flock is not fair: without a pause the writer takes the lock
            // again at once and the readers rarely get between two appends.
            thread::sleep(Duration::from_millis(1));
        }
        writer
    });
    let writer = writer_thread.join().expect("the writer thread finishes");
    writer_done.store(true, Ordering::Release);
    let path = journal_path(directory.path());

    assert!(current_header(&path).generation > 2, "the writer compacted the journal while the readers read");
    for thread in reader_threads {
        let (name, reader, partial_views) = thread.join().expect("a reader thread finishes without a failed check");
        assert!(partial_views > 0, "{name} never read the journal between the writer's first and last append");
        assert_eq!(reader.state().total_transitions(), CONCURRENT_APPENDS, "{name}: every transition read at the end");
        assert_eq!(reader.state().stack_memory, writer.state().stack_memory, "{name}: stack memory converges");
        assert_eq!(reader.state().lease, writer.state().lease, "{name}: lease converges");
        assert_eq!(reader.state().machines, writer.state().machines, "{name}: machines converge");
    }
}
