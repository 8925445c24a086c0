//! Feeds bytes to the journal reader as a journal file.
//!
//! The first input byte picks the mode. In raw mode the rest of the input is
//! the whole file, which exercises the header checks. In framed mode the rest
//! is a list of records, `tag (u8), length (u16 LE), payload`, which the
//! target frames with valid CRCs behind a valid header, so the fuzzer reaches
//! record decoding and replay instead of stopping at a checksum. Any tag may
//! appear, also tags of a newer version. Reading must never panic, and a
//! file the reader accepts must replay to text.

#![no_main]

use std::io::Write;

use eventpi_autoupdate::journal::{FILE_NAME, Journal, MIN_REGION_BYTES, frame};
use eventpi_autoupdate::report;
use libfuzzer_sys::fuzz_target;

/// Bytes before the first region: two header slots.
const HEADER_BLOCK: usize = 4096;
const HEADER_SLOTS: [usize; 2] = [0, 2048];
const MAGIC: &[u8; 8] = b"EPAUJRN1";
const FORMAT_VERSION: u32 = 1;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let file = if mode % 2 == 0 { rest.to_vec() } else { framed_file(mode, rest) };

    let directory = tempfile::tempdir().expect("a temporary directory can be created");
    let mut output = std::fs::File::create(directory.path().join(FILE_NAME)).expect("the journal file can be created");
    output.write_all(&file).expect("the journal file can be written");
    drop(output);

    let Ok(mut journal) = Journal::open_read_only(directory.path()) else { return };
    let text = report::replay_text(journal.state());
    let transitions = journal.state().total_transitions();
    assert!(transitions == 0 || !text.is_empty(), "{transitions} transitions replay to no text");
    let _ = journal.records();
    let _ = journal.refresh();
});

/// Builds a journal file with one region of the minimum size behind a valid
/// header, holding the records encoded in `records`.
fn framed_file(mode: u8, mut records: &[u8]) -> Vec<u8> {
    let region_bytes = MIN_REGION_BYTES as usize;
    let generation = u64::from(mode >> 1) + 1;
    let active = (mode >> 7) & 1;

    let mut file = vec![0u8; HEADER_BLOCK + 2 * region_bytes];
    let header = header(generation, active, region_bytes as u64);
    for slot in HEADER_SLOTS {
        file[slot..slot + header.len()].copy_from_slice(&header);
    }

    let region_start = HEADER_BLOCK + usize::from(active) * region_bytes;
    let mut position = 0usize;
    while records.len() >= 3 {
        let tag = records[0];
        let length = usize::from(u16::from_le_bytes([records[1], records[2]])).min(records.len() - 3);
        let payload = &records[3..3 + length];
        records = &records[3 + length..];
        let encoded = frame::encode(generation, tag, payload);
        if position + encoded.len() > region_bytes {
            break;
        }
        file[region_start + position..region_start + position + encoded.len()].copy_from_slice(&encoded);
        position += encoded.len();
    }
    file
}

/// Encodes a header slot as the journal writes it: magic, format version,
/// generation, active region, three padding bytes, region size and a CRC-32
/// over the fields before it.
fn header(generation: u64, active: u8, region_bytes: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; 36];
    bytes[0..8].copy_from_slice(MAGIC);
    bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes[12..20].copy_from_slice(&generation.to_le_bytes());
    bytes[20] = active;
    bytes[24..32].copy_from_slice(&region_bytes.to_le_bytes());
    let checksum = crc32fast::hash(&bytes[..32]);
    bytes[32..36].copy_from_slice(&checksum.to_le_bytes());
    bytes
}
