//! Integration tests of the journal file, one section per concern. Every
//! test works on journal files it creates in a temporary directory.

#[path = "support/journal.rs"]
mod support;

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use eventpi_autoupdate::journal::record::tag;
use eventpi_autoupdate::journal::{History, Journal, JournalError, JournalState, ReadStats, Record, frame};

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
