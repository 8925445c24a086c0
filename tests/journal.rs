//! Integration tests of the journal file, one section per concern. Every
//! test works on journal files it creates in a temporary directory.

#[path = "support/journal.rs"]
mod support;

use std::path::Path;

use eventpi_autoupdate::journal::{Journal, JournalError, Record};

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
