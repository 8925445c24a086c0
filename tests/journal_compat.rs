//! Journal compatibility in both directions.
//!
//! Backwards: a golden journal written by this version with records of every
//! machine and every record type except the compaction marker stays in
//! `tests/golden/`, and every later
//! build must replay it to the committed text. Forwards: a journal with record
//! tags from a newer version, inside the ranges this build already uses and
//! beyond them, is read with those records skipped and a warning, never an
//! error.

// Only some of the shared journal helpers are used here.
#[allow(dead_code)]
#[path = "support/journal.rs"]
mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use eventpi_autoupdate::journal::record::{
    ApplyHoldRecord, HostMemoryRecord, LeaseAbortRecord, LeaseConfirmedRecord, MachineErrorRecord, MachineStateRecord, NotificationDeliveredRecord,
    NotificationDroppedRecord, NotificationRecord, OutboxCountersRecord, SelfUpdateMemoryRecord, SpaceMemoryRecord, StackMemoryRecord, TransitionRecord, tag,
};
use eventpi_autoupdate::journal::{Journal, JournalState, ReadStats, Record, RecordMeta, frame};
use eventpi_autoupdate::machine::MachineKind;
use eventpi_autoupdate::machine::host::{HostEvents, HostFacts, HostJob, HostMachine, HostMemory, HostSettings, HostState, JobKind, JobReport, JobStatus};
use eventpi_autoupdate::machine::selfupdate::{
    BootTime, ContainerRef, SelfUpdateEvents, SelfUpdateFacts, SelfUpdateMachine, SelfUpdateMemory, SelfUpdateSettings, SelfUpdateState, Target,
};
use eventpi_autoupdate::machine::space::{Marks, Moment, Reading, Role, Sample, SpaceEvents, SpaceMachine, SpaceMemory, SpaceSettings, SpaceState};
use eventpi_autoupdate::machine::stack::{PlannedService, StackEvents, StackFacts, StackMachine, StackMemory, StackPlan, StackSettings, StackState};
use eventpi_autoupdate::model::{CommitId, Digest, Failure, Release, ServiceImage};

use support::*;

/// A journal written by version 0.1.0 with transitions of all four machines
/// and every record type except the compaction marker, and the `autoupdate replay` text it gives. The
/// files are never regenerated: a new record version gets a new folder.
const GOLDEN_DIRECTORY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/journal-v1-every-machine");

const HOLDER: &str = "container:3f9a1c2b7d4e";

/// Tags no record of this build uses: the last tag of each range an area
/// owns, and tags past every range.
const FUTURE_TAGS: [u8; 11] = [15, 31, 47, 63, 79, 95, 111, 127, 128, 200, 255];

/// Appends the records of a deterministic scenario: times advance by fixed
/// steps from a fixed boot, so the file comes out the same on every run.
struct Recorder {
    journal: Journal,
    monotonic_ms: u64,
    epoch: u64,
}

impl Recorder {
    fn new(directory: &Path) -> Self {
        Recorder { journal: Journal::open(directory, small_options()).expect("a new journal opens"), monotonic_ms: 20_000, epoch: 0 }
    }

    fn meta(&mut self) -> RecordMeta {
        self.monotonic_ms += 1_500;
        RecordMeta {
            boot_id: *b"golden-every-bt1",
            monotonic_ms: self.monotonic_ms,
            // 2026-11-02T08:00:00Z at boot.
            wall_ms: 1_793_606_400_000 + self.monotonic_ms,
            clock_synced: true,
        }
    }

    fn take_lease(&mut self) {
        let meta = self.meta();
        self.epoch = self.journal.take_lease(HOLDER, meta).expect("the recorder takes the lease");
    }

    fn append(&mut self, records: Vec<Record>) {
        self.journal.append(records).expect("the recorder holds the lease");
    }

    /// Appends one transition with the machine's memory record and, for a
    /// failure, its error record, as the drivers do.
    fn transition(&mut self, machine: MachineKind, codes: (u8, u8, u8), attempt: u32, memory: Record, failure: Option<String>) {
        let meta = self.meta();
        let (from, event, to) = codes;
        let mut records = vec![Record::Transition(TransitionRecord { meta, machine: machine.code(), from, event, to, attempt })];
        records.push(with_meta(memory, meta));
        if let Some(message) = failure {
            records.push(Record::MachineError(MachineErrorRecord { meta, machine: machine.code(), message }));
        }
        self.append(records);
    }
}

/// Replaces the metadata of a memory record.
fn with_meta(record: Record, meta: RecordMeta) -> Record {
    match record {
        Record::StackMemory(record) => Record::StackMemory(StackMemoryRecord { meta, ..record }),
        Record::HostMemory(record) => Record::HostMemory(HostMemoryRecord { meta, ..record }),
        Record::SpaceMemory(record) => Record::SpaceMemory(SpaceMemoryRecord { meta, ..record }),
        Record::SelfUpdateMemory(record) => Record::SelfUpdateMemory(SelfUpdateMemoryRecord { meta, ..record }),
        other => other,
    }
}

fn release(byte: u8) -> Release {
    Release {
        commit: CommitId([byte; 20]),
        services: vec![ServiceImage { service: "web".into(), image: "registry.local:5000/eventpi/web:2".into(), digest: Digest([byte; 32]) }],
    }
}

fn plan() -> StackPlan {
    StackPlan { services: vec![PlannedService { service: "web".into(), image: "registry.local:5000/eventpi/web:2".into() }] }
}

fn run_stack(recorder: &mut Recorder) {
    let mut machine = StackMachine::restore(StackState::Idle, StackMemory::default(), StackSettings::default());
    let events = [
        StackEvents::Poll,
        StackEvents::TipFetched(CommitId([0x21; 20])),
        StackEvents::Valid(plan()),
        StackEvents::Pulled(release(0x21)),
        StackEvents::PolicyAllows,
        StackEvents::Applied,
        StackEvents::GatePassed,
        StackEvents::Poll,
        StackEvents::TipFetched(CommitId([0x22; 20])),
        StackEvents::Valid(plan()),
        StackEvents::PullFailed(Failure::transient("registry.local:5000 did not respond within 30 s")),
    ];
    for event in events {
        let step = machine.handle(event, StackFacts { boot_id: *b"golden-every-bt1" }).expect("the stack scenario follows the table");
        let memory = Record::StackMemory(StackMemoryRecord { meta: RecordMeta::default(), memory: machine.memory().clone() });
        let failure = step.failure.map(|failure| failure.message);
        recorder.transition(MachineKind::Stack, (step.from.code(), step.event.code(), step.to.code()), step.attempt, memory, failure);
    }
}

fn run_host(recorder: &mut Recorder) {
    let mut machine = HostMachine::restore(HostState::Idle, HostMemory::default(), HostSettings::default());
    let job = |kind| JobReport { job: HostJob { id: "a1b2c3".into(), kind }, status: JobStatus::Succeeded, output_tail: String::new() };
    let events = [
        HostEvents::Start,
        HostEvents::Connected,
        HostEvents::PreflightPassed,
        HostEvents::JobFinished(job(JobKind::UpdateLists)),
        HostEvents::JobFinished(job(JobKind::Upgrade)),
        HostEvents::RebootNotRequired,
    ];
    for event in events {
        let step = machine.handle(event, HostFacts { nonce: 0x5eed }).expect("the host scenario follows the table");
        let memory = Record::HostMemory(HostMemoryRecord { meta: RecordMeta::default(), memory: machine.memory().clone() });
        recorder.transition(MachineKind::HostPatch, (step.from.code(), step.event.code(), step.to.code()), step.attempt, memory, step.failure);
    }

    let step = machine.handle(HostEvents::Start, HostFacts { nonce: 0x5eee }).expect("a done machine starts again");
    let memory = Record::HostMemory(HostMemoryRecord { meta: RecordMeta::default(), memory: machine.memory().clone() });
    recorder.transition(MachineKind::HostPatch, (step.from.code(), step.event.code(), step.to.code()), step.attempt, memory, None);
    let step = machine.handle(HostEvents::Unreachable(Failure::transient("ssh to host-gateway:22 timed out")), HostFacts { nonce: 0x5eee }).unwrap();
    let memory = Record::HostMemory(HostMemoryRecord { meta: RecordMeta::default(), memory: machine.memory().clone() });
    recorder.transition(MachineKind::HostPatch, (step.from.code(), step.event.code(), step.to.code()), step.attempt, memory, step.failure);
}

fn disk(role: Role, free_percent: u64) -> Reading {
    Reading {
        role,
        path: format!("/srv/{}", role.name()),
        total_bytes: 100 << 30,
        free_bytes: free_percent << 30,
        total_inodes: 1_000_000,
        free_inodes: 500_000,
        marks: Marks { stop_below_percent: 15.0, resume_above_percent: 20.0, stop_below_inodes_percent: 5.0, resume_above_inodes_percent: 10.0 },
        reclaim_helps: role == Role::Docker,
    }
}

fn run_space(recorder: &mut Recorder) {
    let settings = SpaceSettings { has_recorder: true, recorder_service: Some("recorder".into()), ..SpaceSettings::default() };
    let mut machine = SpaceMachine::restore(SpaceState::Watching, SpaceMemory::default(), settings);
    let sample = |recordings: u64, minute: u64| Sample {
        readings: vec![disk(Role::Recordings, recordings), disk(Role::Docker, 60)],
        forecast: None,
        now: Moment { boot_id: *b"golden-every-bt1", monotonic_ms: minute * 60_000 },
    };
    let events = [
        SpaceEvents::Sampled(sample(40, 1)),
        SpaceEvents::Sampled(sample(9, 2)),
        SpaceEvents::RecorderStopped,
        SpaceEvents::Sampled(sample(30, 20)),
        SpaceEvents::RecorderStartFailed(Failure::transient("docker start recorder failed: container is restarting")),
        SpaceEvents::Sampled(sample(31, 21)),
        SpaceEvents::RecorderStarted,
    ];
    for event in events {
        let step = machine.handle(event).expect("the space scenario follows the table");
        let memory = Record::SpaceMemory(SpaceMemoryRecord { meta: RecordMeta::default(), memory: machine.memory().clone() });
        let failure = step.failure.map(|failure| failure.message);
        recorder.transition(MachineKind::SpaceGuard, (step.from.code(), step.event.code(), step.to.code()), 0, memory, failure);
    }
}

fn run_self_update(recorder: &mut Recorder) {
    let mut machine = SelfUpdateMachine::restore(SelfUpdateState::Idle, SelfUpdateMemory::default(), SelfUpdateSettings::default());
    let target = Target {
        image: "registry.local:5000/eventpi/autoupdate:stable".into(),
        digest: Digest([0x41; 32]),
        running: Some(Digest([0x40; 32])),
        old: ContainerRef { id: "3f9a1c2b7d4e".repeat(5) + "0000", name: "autoupdate".into() },
    };
    let candidate = ContainerRef { id: "8e7d6c5b4a39".repeat(5) + "1111", name: "autoupdate-candidate-1".into() };
    let events = [
        SelfUpdateEvents::Check,
        SelfUpdateEvents::NewDigest(target),
        SelfUpdateEvents::Pulled,
        SelfUpdateEvents::Created(candidate),
        SelfUpdateEvents::Ready(recorder.epoch + 1),
        SelfUpdateEvents::HandoverFailed(Failure::transient("the candidate did not respond within 10 s")),
        SelfUpdateEvents::Removed,
    ];
    for event in events {
        let facts = SelfUpdateFacts { now: BootTime { boot_id: *b"golden-every-bt1", ms: recorder.monotonic_ms }, jitter_permille: 50, forced: false };
        let step = machine.handle(event, facts).expect("the self-update scenario follows the table");
        if step.to == SelfUpdateState::Aborting && step.from == SelfUpdateState::HandingOver {
            let meta = recorder.meta();
            recorder.append(vec![Record::LeaseAbort(LeaseAbortRecord { meta, epoch: recorder.epoch + 1 })]);
        }
        let memory = Record::SelfUpdateMemory(SelfUpdateMemoryRecord { meta: RecordMeta::default(), epoch: recorder.epoch, memory: machine.memory().clone() });
        let failure = step.failure.map(|failure| failure.message);
        recorder.transition(MachineKind::SelfUpdate, (step.from.code(), step.event.code(), step.to.code()), step.attempt, memory, failure);
    }
}

/// Writes the scenario: a lease, the four machines in turn, notifications
/// and their outbox, an apply hold, a machine state record and a confirmed
/// lease.
fn write_every_machine_scenario(directory: &Path) {
    let mut recorder = Recorder::new(directory);
    recorder.take_lease();
    let meta = recorder.meta();
    recorder.append(vec![Record::LeaseConfirmed(LeaseConfirmedRecord { meta, epoch: recorder.epoch })]);

    run_stack(&mut recorder);
    let meta = recorder.meta();
    recorder.append(vec![Record::ApplyHold(ApplyHoldRecord {
        meta,
        machine: MachineKind::Stack.code(),
        reason: "outside the maintenance window 02:00-04:00 Europe/Berlin".into(),
        deferred_ms: 3_600_000,
    })]);
    run_host(&mut recorder);
    run_space(&mut recorder);
    run_self_update(&mut recorder);

    let meta = recorder.meta();
    let notification = |id: u8, severity: u8, kind: &str, message: &str| {
        Record::Notification(NotificationRecord {
            meta,
            id: [id; 16],
            severity,
            kind: kind.into(),
            machine: MachineKind::SelfUpdate.code(),
            message: message.into(),
        })
    };
    recorder.append(vec![
        notification(1, 2, "self-update-failed", "the handover to autoupdate-candidate-1 failed; the running agent keeps control"),
        notification(2, 1, "space-low", "recordings below 15 % free; the recorder was stopped"),
    ]);
    let meta = recorder.meta();
    recorder.append(vec![
        Record::NotificationDelivered(NotificationDeliveredRecord { meta, id: [1; 16] }),
        Record::NotificationDropped(NotificationDroppedRecord { meta, id: [2; 16] }),
        Record::OutboxCounters(OutboxCountersRecord { meta, delivered: 1, dropped: 1 }),
        Record::MachineState(MachineStateRecord { meta, machine: MachineKind::Stack.code(), state: StackState::Idle.code() }),
    ]);
}

/// Runs `autoupdate replay` on the journal in `directory`.
fn run_replay(directory: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_autoupdate")).arg("replay").arg("--journal").arg(directory).output().expect("the autoupdate binary runs")
}

fn replay_stdout(directory: &Path) -> String {
    let output = run_replay(directory);
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

fn read_state(directory: &Path) -> (JournalState, ReadStats) {
    let journal = Journal::open_read_only(directory).expect("the journal opens for reading");
    (journal.state().clone(), journal.stats())
}

#[test]
#[ignore = "rewrites tests/golden/journal-v1-every-machine; run with UPDATE_GOLDEN=1 and --ignored only for a new record version"]
fn generate_golden_every_machine() {
    if std::env::var_os("UPDATE_GOLDEN").is_none_or(|value| value != "1") {
        eprintln!("UPDATE_GOLDEN=1 is not set; the golden journal was not rewritten");
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    write_every_machine_scenario(directory.path());
    let replay = replay_stdout(directory.path());

    fs::create_dir_all(GOLDEN_DIRECTORY).unwrap();
    fs::copy(journal_path(directory.path()), Path::new(GOLDEN_DIRECTORY).join("journal.bin")).unwrap();
    fs::write(Path::new(GOLDEN_DIRECTORY).join("replay.txt"), replay).unwrap();
}

#[test]
fn golden_every_machine_replay_matches() {
    let directory = golden_copy();
    let expected = fs::read_to_string(Path::new(GOLDEN_DIRECTORY).join("replay.txt")).unwrap();

    let replay = replay_stdout(directory.path());

    assert_eq!(replay, expected, "autoupdate replay of the golden journal differs from replay.txt");
}

#[test]
fn golden_every_machine_decodes_fully() {
    let directory = golden_copy();

    let (state, stats) = read_state(directory.path());

    assert_eq!(stats, ReadStats::default(), "nothing in the golden journal is damaged");
    assert_eq!(state.unknown_records, 0, "every golden tag is known");
    assert_eq!(state.undecodable_records, 0, "every golden payload decodes");
    for machine in [MachineKind::Stack, MachineKind::HostPatch, MachineKind::SpaceGuard, MachineKind::SelfUpdate] {
        assert!(state.machine(machine.code()).is_some(), "the golden journal has transitions of {machine}");
    }
    assert!(state.stack_memory.is_some(), "stack memory is read");
    assert!(state.host_memory.is_some(), "host memory is read");
    assert!(state.space_memory.is_some(), "space memory is read");
    assert!(state.self_update.is_some(), "self-update memory is read");
}

/// The golden journal contains every record type that appends write, so a
/// type left out of the scenario fails here.
#[test]
fn golden_every_machine_has_every_tag() {
    let directory = golden_copy();
    let path = journal_path(directory.path());
    let header = current_header(&path);
    let region = read_bytes(&path, header.active_region_start(), header.region_bytes as usize);

    let scan = frame::scan(&region, 0, header.generation);
    let mut tags: Vec<u8> = scan.frames.iter().map(|raw| raw.tag).collect();
    tags.sort_unstable();
    tags.dedup();

    let written_by_agent = [
        tag::TRANSITION,
        tag::LEASE,
        tag::LEASE_ABORT,
        tag::LEASE_CONFIRMED,
        tag::MACHINE_ERROR,
        tag::MACHINE_STATE,
        tag::STACK_MEMORY,
        tag::SELF_UPDATE_MEMORY,
        tag::HOST_MEMORY,
        tag::SPACE_MEMORY,
        tag::NOTIFICATION,
        tag::NOTIFICATION_DELIVERED,
        tag::NOTIFICATION_DROPPED,
        tag::OUTBOX_COUNTERS,
        tag::APPLY_HOLD,
    ];
    for expected in written_by_agent {
        assert!(tags.contains(&expected), "the golden journal has no record with tag {expected}");
    }
}

/// The generator still writes a journal that this build reads to the same
/// state and replay as the committed one.
#[test]
fn generator_matches_golden_every_machine() {
    let generated = tempfile::tempdir().unwrap();
    write_every_machine_scenario(generated.path());
    let golden = golden_copy();

    let (generated_state, _) = read_state(generated.path());
    let (golden_state, _) = read_state(golden.path());

    assert_eq!(replay_stdout(generated.path()), replay_stdout(golden.path()), "the generated journal replays like the golden one");
    assert_eq!(generated_state, golden_state, "the generated journal reads to the golden state");
}

/// Records with tags from a newer version, between known records, are
/// skipped and counted, `autoupdate replay` warns about them, and an older
/// agent still appends after them.
#[test]
fn future_tags_skipped_with_warning() {
    let directory = golden_copy();
    let path = journal_path(directory.path());
    let (golden_state, _) = read_state(directory.path());
    let golden_replay = fs::read_to_string(Path::new(GOLDEN_DIRECTORY).join("replay.txt")).unwrap();

    let header = current_header(&path);
    let (used, _) = Journal::open_read_only(directory.path()).unwrap().usage();
    let mut offset = header.active_region_start() + used;
    for future in FUTURE_TAGS {
        let raw = frame::encode(header.generation, future, format!("a record with tag {future} from a newer agent").as_bytes());
        write_bytes(&path, offset, &raw);
        offset += raw.len() as u64;
    }
    let mut writer = Journal::open(directory.path(), small_options()).expect("a journal with newer records opens for appending");
    writer.assume_epoch(golden_state.lease_epoch());
    let meta = RecordMeta { boot_id: *b"golden-every-bt1", monotonic_ms: 900_000, wall_ms: 1_793_607_300_000, clock_synced: true };
    let after = Record::Transition(TransitionRecord { meta, machine: MachineKind::Stack.code(), from: 1, event: 1, to: 2, attempt: 0 });
    writer.append(vec![after.clone()]).expect("the lease holder appends after newer records");
    drop(writer);

    let (state, stats) = read_state(directory.path());
    let output = run_replay(directory.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    let mut expected = golden_state.clone();
    expected.apply(&after);
    expected.unknown_records = FUTURE_TAGS.len() as u64;
    assert_eq!(stats, ReadStats::default(), "records from a newer version are not damage");
    assert_eq!(state, expected, "every known record is read and each newer one is counted");
    assert!(output.status.success(), "autoupdate replay failed with {}: {stderr}", output.status);
    assert!(stdout.starts_with(&golden_replay), "the golden transitions replay unchanged:\n{stdout}");
    assert!(stdout.ends_with("stack        Idle --Poll--> Fetching\n"), "the transition after the newer records replays:\n{stdout}");
    assert!(
        stderr.contains(&format!("skipped {} records with tags from a newer agent version", FUTURE_TAGS.len())),
        "replay warns about the skipped records:\n{stderr}"
    );
}

/// A transition whose wall time lies past the year 9999, as a wrong clock or
/// a damaged record gives, replays and shows in the status instead of
/// stopping either command.
#[test]
fn far_future_time_replays() {
    let directory = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(directory.path(), small_options()).unwrap();
    let meta = RecordMeta { boot_id: *b"golden-every-bt1", monotonic_ms: 1_000, wall_ms: u64::MAX, clock_synced: false };
    journal.take_lease(HOLDER, meta).unwrap();
    journal.append(vec![Record::Transition(TransitionRecord { meta, machine: MachineKind::Stack.code(), from: 1, event: 1, to: 2, attempt: 0 })]).unwrap();
    drop(journal);

    let replay = replay_stdout(directory.path());
    let status = Command::new(env!("CARGO_BIN_EXE_autoupdate")).arg("status").arg("--journal").arg(directory.path()).output().unwrap();

    assert!(replay.contains("18446744073709551615 ms after the Unix epoch"), "{replay}");
    assert!(status.status.success(), "autoupdate status failed: {}", String::from_utf8_lossy(&status.stderr));
}
