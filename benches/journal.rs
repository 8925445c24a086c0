//! Journal figures: the size of a framed transition record, the time of an
//! append with and without sync, and the time to open (recover) a journal
//! whose active region is nearly full. Prints one line per figure.
//!
//! Run with `cargo bench --bench journal`; `make bench` runs it with the rest.

use std::time::{Duration, Instant};

use eventpi_autoupdate::journal::frame;
use eventpi_autoupdate::journal::record::TransitionRecord;
use eventpi_autoupdate::journal::{History, Journal, JournalOptions, Record, RecordMeta};

const APPENDS: usize = 2000;
const OPENS: usize = 50;

fn transition(index: u64) -> Record {
    Record::Transition(TransitionRecord {
        meta: RecordMeta { boot_id: [0x5A; 16], monotonic_ms: 864_000_000 + index * 1000, wall_ms: 1_796_000_000_000 + index * 1000, clock_synced: true },
        machine: 1,
        from: (index % 10) as u8 + 1,
        event: (index % 15) as u8 + 1,
        to: ((index + 1) % 10) as u8 + 1,
        attempt: (index / 7) as u32,
    })
}

fn options(sync: bool) -> JournalOptions {
    JournalOptions { file_bytes: 2052 * 1024, sync, history: History::Recent }
}

fn append_time(sync: bool) -> Duration {
    let directory = tempfile::tempdir().expect("temporary directory");
    let mut journal = Journal::open(directory.path(), options(sync)).expect("create a journal");
    journal.take_lease("bench", RecordMeta::default()).expect("take the lease");
    let started = Instant::now();
    for index in 0..APPENDS {
        journal.append(vec![transition(index as u64)]).expect("append");
    }
    started.elapsed() / APPENDS as u32
}

/// Fills the active region to just below the compaction threshold and times
/// opening the file, which reads and folds every record.
fn recovery_time() -> (Duration, u64, u64) {
    let directory = tempfile::tempdir().expect("temporary directory");
    let mut journal = Journal::open(directory.path(), options(false)).expect("create a journal");
    journal.take_lease("bench", RecordMeta::default()).expect("take the lease");
    let mut index = 0u64;
    loop {
        let (used, region) = journal.usage();
        if used + 200 > region * 74 / 100 {
            break;
        }
        journal.append(vec![transition(index)]).expect("append");
        index += 1;
    }
    let (used, _) = journal.usage();
    drop(journal);

    let started = Instant::now();
    for _ in 0..OPENS {
        let journal = Journal::open(directory.path(), options(false)).expect("reopen");
        assert!(journal.state().total_transitions() > 0, "the journal was read");
    }
    (started.elapsed() / OPENS as u32, used, index)
}

fn main() {
    let record = transition(123_456);
    let framed = frame::OVERHEAD + record.encode_payload().len();
    println!("journal.transition_record_bytes {framed}");

    let synced = append_time(true);
    println!("journal.append_synced_us {:.1}", synced.as_secs_f64() * 1e6);
    let unsynced = append_time(false);
    println!("journal.append_unsynced_us {:.1}", unsynced.as_secs_f64() * 1e6);

    let (recovery, used, records) = recovery_time();
    println!("journal.recovery_ms {:.2}", recovery.as_secs_f64() * 1e3);
    println!("journal.recovery_bytes {used}");
    println!("journal.recovery_records {records}");
}
