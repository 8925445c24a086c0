//! The journal: one preallocated file on the reserved partition that records
//! every transition before the command it announces runs.
//!
//! # File layout
//!
//! ```text
//! 0      header slot A ┐ both hold the current header; they differ only
//! 2048   header slot B ┘ while a new one is being written
//! 4096   region 0 ─┐ two regions of equal size; the header names the
//! 4096+R region 1 ─┘ active one. Records are appended to it.
//! ```
//!
//! The file is zero-filled when created and afterwards only overwritten in
//! place, so writing a record never allocates a block and cannot fail with "no
//! space left". When the active region fills up, compaction zeroes the idle
//! region, writes a snapshot of the current state into it, syncs, and then
//! writes the header with the next generation into both slots, one after the
//! other with a sync between. Readers take the valid slot with the highest
//! generation, so a torn header write leaves either the old header or the new
//! one in force, and a damaged slot is covered by the other one.
//!
//! # Damage
//!
//! Every frame carries a CRC-32, and each header slot carries one over its
//! fields, so a damaged frame or slot is detected and never read as data. The
//! table lists what opening or refreshing a journal does after one flipped
//! bit or a write cut short. `tests/journal.rs` checks each row for every bit
//! of a small journal's headers and records, and for a cut at every byte of
//! the last record.
//!
//! | Damage | What a read returns | What a writer does |
//! |---|---|---|
//! | one header slot | the other slot's header and every record; `damaged_header_slots` is 1 | copies the valid header into the slot |
//! | both header slots | [`JournalError::NoValidHeader`] | nothing: the agent moves the file aside |
//! | a slot's bytes after its 36-byte header | every record: these bytes are never read | nothing |
//! | a record followed by a valid one | every other record; `damaged_bytes` is the damaged frame's length and `damaged_spans` is 1 | nothing: the next compaction leaves the frame out |
//! | the last record, or a write cut short | every other record; `torn_bytes` runs from the damaged frame's first byte to the last non-zero byte | zeroes the torn bytes, so the next record goes where the damaged one began |
//! | a zero byte after the last record | every record; `torn_bytes` is 1 | zeroes the byte |
//!
//! A frame with a valid CRC is not damage even when this build cannot use
//! it: a tag from a newer version is skipped and counted in
//! [`JournalState::unknown_records`], and a payload that does not decode in
//! [`JournalState::undecodable_records`].
//!
//! # Concurrency and fencing
//!
//! Every append holds an exclusive `flock` on the file, re-reads the header and
//! any records appended by another process, and then checks the fence: an
//! agent may append only while its epoch equals the newest lease in the
//! journal. The only other append allowed is a new lease with a higher epoch.
//! Because every action is journaled first, an agent fenced out cannot act.

pub mod frame;
pub mod record;
pub mod state;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use record::{Record, RecordMeta};
pub use state::{History, JournalState};

use record::{Decoded, LeaseRecord};

/// Name of the journal file inside the journal directory.
pub const FILE_NAME: &str = "journal.bin";

const HEADER_BLOCK: u64 = 4096;
const HEADER_SLOTS: [u64; 2] = [0, 2048];
const MAGIC: &[u8; 8] = b"EPAUJRN1";
const FORMAT_VERSION: u32 = 1;
const HEADER_LENGTH: usize = 8 + 4 + 8 + 1 + 3 + 8 + 4;

/// Smallest region allowed: room for a snapshot and some transitions.
pub const MIN_REGION_BYTES: u64 = 16 * 1024;

/// Compaction starts once an append would fill the active region past this
/// share, so a snapshot always fits in the idle one.
const COMPACT_AT_PERCENT: u64 = 75;

/// Errors of journal operations.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A read, write, sync or lock on the journal file failed.
    #[error("journal {path}: {action} failed: {source}")]
    Io { path: PathBuf, action: &'static str, source: io::Error },

    /// Neither header slot contains a valid header: the file is not a journal
    /// or both slots are damaged.
    #[error("journal {path} has no valid header; move the file aside and the agent starts a new journal")]
    NoValidHeader { path: PathBuf },

    /// The file's size does not match the region size in its header.
    #[error(
        "journal {path} is {actual} bytes but its header describes {expected}; the file was cut or extended. Move the file aside and the agent starts a new journal"
    )]
    SizeMismatch { path: PathBuf, actual: u64, expected: u64 },

    /// The journal file is missing.
    #[error("journal {path} not found; check the directory given with --journal or journal.directory. The agent creates the journal when it first starts")]
    NotFound { path: PathBuf },

    /// The requested journal size leaves regions smaller than the minimum.
    #[error("journal size of {requested} bytes is too small: use at least {minimum} bytes")]
    TooSmall { requested: u64, minimum: u64 },

    /// Another agent holds a newer lease: this one must not act.
    #[error("fenced out: this agent holds lease epoch {ours} but the journal's newest lease is epoch {newest}")]
    Fenced { ours: u64, newest: u64 },

    /// A lease append whose epoch is not above the newest lease, or was aborted.
    #[error("lease epoch {epoch} cannot be taken: the newest lease is epoch {newest}, or {epoch} was aborted")]
    StaleLease { epoch: u64, newest: u64 },

    /// A set of records is larger than an empty region.
    #[error("records of {bytes} bytes do not fit in a journal region of {region} bytes even after compaction")]
    Full { bytes: usize, region: u64 },

    /// A caller's condition checked under the journal lock did not hold.
    #[error("{0}")]
    Refused(String),
}

/// Counts of what reading the journal skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Bytes of damaged records between valid ones.
    pub damaged_bytes: u64,
    /// Number of damaged stretches between valid records.
    pub damaged_spans: u64,
    /// Non-zero bytes after the last valid record: a torn final write. A
    /// writer zeroes them, and a read-only handle counts them once.
    pub torn_bytes: u64,
    /// Header slots without a valid header when the header was last loaded.
    /// A writer rewrites them from the other slot.
    pub damaged_header_slots: u64,
}

impl ReadStats {
    pub fn ignored_bytes(&self) -> u64 {
        self.damaged_bytes + self.torn_bytes
    }
}

/// Settings for opening a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalOptions {
    /// Size of the whole file when it has to be created, in bytes.
    pub file_bytes: u64,
    /// Sync the file after every append. Only benchmarks turn this off.
    pub sync: bool,
    pub history: History,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions { file_bytes: 2 * 1024 * 1024 + HEADER_BLOCK, sync: true, history: History::Recent }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    generation: u64,
    active: u8,
    region_bytes: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LENGTH] {
        let mut bytes = [0u8; HEADER_LENGTH];
        bytes[0..8].copy_from_slice(MAGIC);
        bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes[12..20].copy_from_slice(&self.generation.to_le_bytes());
        bytes[20] = self.active;
        bytes[24..32].copy_from_slice(&self.region_bytes.to_le_bytes());
        let checksum = crc32fast::hash(&bytes[..32]);
        bytes[32..36].copy_from_slice(&checksum.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Header> {
        if bytes.len() < HEADER_LENGTH || &bytes[0..8] != MAGIC {
            return None;
        }
        let stored = u32::from_le_bytes(bytes[32..36].try_into().ok()?);
        if stored != crc32fast::hash(&bytes[..32]) {
            return None;
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
        let header = Header {
            generation: u64::from_le_bytes(bytes[12..20].try_into().ok()?),
            active: bytes[20],
            region_bytes: u64::from_le_bytes(bytes[24..32].try_into().ok()?),
        };
        let valid = version == FORMAT_VERSION && header.active <= 1 && header.region_bytes >= MIN_REGION_BYTES;
        valid.then_some(header)
    }

    fn region_start(&self, region: u8) -> u64 {
        HEADER_BLOCK + u64::from(region) * self.region_bytes
    }

    fn file_bytes(&self) -> u64 {
        HEADER_BLOCK + 2 * self.region_bytes
    }
}

/// Writes `header` into both slots with a sync after each, starting with the
/// slot that generation parity picks, so the two writes alternate in order.
fn write_header(file: &File, path: &Path, header: &Header) -> Result<(), JournalError> {
    let first = (header.generation % 2) as usize;
    for slot in [HEADER_SLOTS[first], HEADER_SLOTS[1 - first]] {
        file.write_all_at(&header.encode(), slot).map_err(io_error(path, "write header"))?;
        file.sync_data().map_err(io_error(path, "sync header"))?;
    }
    Ok(())
}

/// An open journal file and the state its records add up to.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    header: Header,
    /// Offset inside the active region where the next record goes.
    end: u64,
    state: JournalState,
    stats: ReadStats,
    /// Offset inside the active region of the torn bytes already counted in
    /// `stats`. A read-only handle cannot zero them and reads them again on
    /// every refresh.
    counted_torn_at: Option<u64>,
    /// The lease epoch this handle appends under; 0 before it takes one.
    epoch: u64,
    options: JournalOptions,
    writable: bool,
}

impl Journal {
    /// Opens the journal in `directory` for appending, creating the directory
    /// and a zero-filled file of `options.file_bytes` when missing. A torn
    /// final record is zeroed.
    pub fn open(directory: &Path, options: JournalOptions) -> Result<Journal, JournalError> {
        let path = directory.join(FILE_NAME);
        if !path.exists() {
            create_file(directory, &path, options.file_bytes)?;
        }
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_error(&path, "open"))?;
        Journal::load(file, path, options, true)
    }

    /// Opens an existing journal for reading only, keeping every transition.
    pub fn open_read_only(directory: &Path) -> Result<Journal, JournalError> {
        let path = directory.join(FILE_NAME);
        let file = File::open(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => JournalError::NotFound { path: path.clone() },
            _ => JournalError::Io { path: path.clone(), action: "open", source },
        })?;
        let options = JournalOptions { history: History::All, ..JournalOptions::default() };
        Journal::load(file, path, options, false)
    }

    fn load(file: File, path: PathBuf, options: JournalOptions, writable: bool) -> Result<Journal, JournalError> {
        let placeholder = Header { generation: 0, active: 0, region_bytes: MIN_REGION_BYTES };
        let mut journal = Journal {
            file,
            path,
            header: placeholder,
            end: 0,
            state: JournalState::new(options.history),
            stats: ReadStats::default(),
            counted_torn_at: None,
            epoch: 0,
            options,
            writable,
        };
        journal.locked(|journal| journal.reload())?;
        Ok(journal)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn state(&self) -> &JournalState {
        &self.state
    }

    pub fn stats(&self) -> ReadStats {
        self.stats
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Returns the bytes used in the active region and the region size.
    pub fn usage(&self) -> (u64, u64) {
        (self.end, self.header.region_bytes)
    }

    /// Reads records appended by other processes since the last read.
    pub fn refresh(&mut self) -> Result<(), JournalError> {
        self.locked(|journal| journal.refresh_locked())
    }

    /// Returns the records of the active region in the order they were
    /// appended, without damaged frames and tags this build does not know.
    /// The region starts with the snapshot of the last compaction, so older
    /// records are not among them.
    pub fn records(&mut self) -> Result<Vec<Record>, JournalError> {
        self.locked(|journal| {
            let (header, _) = journal.read_header()?;
            let mut bytes = vec![0u8; header.region_bytes as usize];
            let start = header.region_start(header.active);
            journal.file.read_exact_at(&mut bytes, start).map_err(io_error(&journal.path, "read"))?;
            let scan = frame::scan(&bytes, 0, header.generation);
            let known = scan.frames.iter().filter_map(|raw| match Record::decode(raw.tag, raw.payload) {
                Ok(Decoded::Known(record)) => Some(record),
                _ => None,
            });
            Ok(known.collect())
        })
    }

    /// Takes the lease with the next epoch for `holder`; from then on this
    /// handle appends under that epoch.
    pub fn take_lease(&mut self, holder: &str, meta: RecordMeta) -> Result<u64, JournalError> {
        self.append_with(|state| {
            let epoch = state.next_epoch();
            let lease = Record::Lease(LeaseRecord { meta, epoch, holder: holder.to_string() });
            Ok((vec![lease], epoch))
        })
    }

    /// Sets the epoch this handle appends under, for an agent that finds its
    /// own lease in the journal after a restart.
    pub fn assume_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Appends records as one write and syncs them, if the fence allows.
    pub fn append(&mut self, records: Vec<Record>) -> Result<(), JournalError> {
        self.append_with(|_| Ok((records, ())))
    }

    /// Under the journal lock and after reading what others appended, lets
    /// `build` look at the state and return records to append. Nothing is
    /// written when `build` fails.
    pub fn append_with<T>(&mut self, build: impl FnOnce(&JournalState) -> Result<(Vec<Record>, T), JournalError>) -> Result<T, JournalError> {
        assert!(self.writable, "append on a journal opened with open_read_only");
        self.locked(|journal| {
            journal.refresh_locked()?;
            let (records, value) = build(&journal.state)?;
            let epoch_after = journal.check_fence(&records)?;
            journal.write_locked(&records)?;
            journal.epoch = epoch_after;
            Ok(value)
        })
    }

    /// Returns the epoch of this handle after appending `records`, or the
    /// fence error that forbids the append.
    fn check_fence(&self, records: &[Record]) -> Result<u64, JournalError> {
        let mut newest = self.state.lease_epoch();
        let mut ours = self.epoch;
        for record in records {
            match record {
                Record::Lease(lease) => {
                    if lease.epoch <= newest || self.state.aborted_epochs.contains(&lease.epoch) {
                        return Err(JournalError::StaleLease { epoch: lease.epoch, newest });
                    }
                    newest = lease.epoch;
                    ours = lease.epoch;
                }
                _ if ours != newest => return Err(JournalError::Fenced { ours, newest }),
                _ => {}
            }
        }
        Ok(ours)
    }

    fn locked<T>(&mut self, work: impl FnOnce(&mut Journal) -> Result<T, JournalError>) -> Result<T, JournalError> {
        let lock = if self.writable { self.file.lock() } else { self.file.lock_shared() };
        lock.map_err(io_error(&self.path, "lock"))?;
        let result = work(self);
        // Closing the descriptor would release the lock too; an unlock error
        // leaves nothing to repair.
        let _ = self.file.unlock();
        result
    }

    /// Returns the valid header with the highest generation, and each slot's
    /// decoded header (`None` when invalid) in the order of `HEADER_SLOTS`.
    fn read_header(&self) -> Result<(Header, [Option<Header>; 2]), JournalError> {
        let mut block = vec![0u8; HEADER_BLOCK as usize];
        // A file shorter than the header block contains no header.
        self.file.read_exact_at(&mut block, 0).map_err(|source| match source.kind() {
            io::ErrorKind::UnexpectedEof => JournalError::NoValidHeader { path: self.path.clone() },
            _ => JournalError::Io { path: self.path.clone(), action: "read header", source },
        })?;
        let slots = HEADER_SLOTS.map(|slot| Header::decode(&block[slot as usize..]));
        let header =
            slots.iter().flatten().max_by_key(|header| header.generation).copied().ok_or_else(|| JournalError::NoValidHeader { path: self.path.clone() })?;

        let actual = self.file.metadata().map_err(io_error(&self.path, "stat"))?.len();
        if actual != header.file_bytes() {
            return Err(JournalError::SizeMismatch { path: self.path.clone(), actual, expected: header.file_bytes() });
        }
        Ok((header, slots))
    }

    /// Reads the header and the whole active region from scratch.
    fn reload(&mut self) -> Result<(), JournalError> {
        let (header, slots) = self.read_header()?;
        self.header = header;
        self.state = JournalState::new(self.options.history);
        self.stats = ReadStats::default();
        self.stats.damaged_header_slots = slots.iter().filter(|slot| slot.is_none()).count() as u64;
        self.counted_torn_at = None;
        self.end = 0;
        if self.writable {
            self.repair_header_slots(&slots)?;
        }
        self.read_from(0)
    }

    /// Rewrites every slot that does not contain the current header. That is
    /// a damaged slot, or an older one left by a crash between the two header
    /// writes of a compaction. Without the rewrite, damage to the other slot
    /// would make the journal unreadable or fall back to the inactive region.
    fn repair_header_slots(&self, slots: &[Option<Header>; 2]) -> Result<(), JournalError> {
        for (&offset, slot) in HEADER_SLOTS.iter().zip(slots) {
            if *slot != Some(self.header) {
                self.file.write_all_at(&self.header.encode(), offset).map_err(io_error(&self.path, "repair header"))?;
                self.file.sync_data().map_err(io_error(&self.path, "sync header"))?;
            }
        }
        Ok(())
    }

    fn refresh_locked(&mut self) -> Result<(), JournalError> {
        let (header, _) = self.read_header()?;
        if header != self.header {
            return self.reload();
        }

        // Appends always start where the last valid record ends, so a zero
        // byte there means nothing was appended since the last read.
        let mut first = [0u8; 1];
        if self.end < self.header.region_bytes {
            let at = self.header.region_start(self.header.active) + self.end;
            self.file.read_exact_at(&mut first, at).map_err(io_error(&self.path, "read"))?;
        }
        if first[0] == 0 {
            return Ok(());
        }
        self.read_from(self.end)
    }

    /// Reads and folds the records of the active region from `start` on, and
    /// zeroes a torn final record when this handle may write.
    fn read_from(&mut self, start: u64) -> Result<(), JournalError> {
        let region_start = self.header.region_start(self.header.active);
        let mut bytes = vec![0u8; (self.header.region_bytes - start) as usize];
        self.file.read_exact_at(&mut bytes, region_start + start).map_err(io_error(&self.path, "read"))?;

        let scan = frame::scan(&bytes, 0, self.header.generation);
        for raw in &scan.frames {
            match Record::decode(raw.tag, raw.payload) {
                Ok(Decoded::Known(record)) => self.state.apply(&record),
                Ok(Decoded::UnknownTag(_)) => self.state.unknown_records += 1,
                Err(_) => self.state.undecodable_records += 1,
            }
        }
        self.stats.damaged_bytes += scan.damaged_bytes as u64;
        self.stats.damaged_spans += scan.damaged_spans as u64;
        self.end = start + scan.end as u64;

        if scan.torn_bytes == 0 {
            return Ok(());
        }
        if self.counted_torn_at != Some(self.end) {
            self.stats.torn_bytes += scan.torn_bytes as u64;
        }
        if self.writable {
            let zeros = vec![0u8; bytes.len() - scan.end];
            self.file.write_all_at(&zeros, region_start + self.end).map_err(io_error(&self.path, "truncate torn record"))?;
            self.file.sync_data().map_err(io_error(&self.path, "sync"))?;
            self.counted_torn_at = None;
        } else {
            self.counted_torn_at = Some(self.end);
        }
        Ok(())
    }

    fn write_locked(&mut self, records: &[Record]) -> Result<(), JournalError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = self.encode(records, self.header.generation)?;

        let limit = self.header.region_bytes * COMPACT_AT_PERCENT / 100;
        if self.end + bytes.len() as u64 > limit {
            self.compact_locked()?;
            bytes = self.encode(records, self.header.generation)?;
            if self.end + bytes.len() as u64 > self.header.region_bytes {
                return Err(JournalError::Full { bytes: bytes.len(), region: self.header.region_bytes });
            }
        }

        let at = self.header.region_start(self.header.active) + self.end;
        self.file.write_all_at(&bytes, at).map_err(io_error(&self.path, "write"))?;
        if self.options.sync {
            self.file.sync_data().map_err(io_error(&self.path, "sync"))?;
        }
        self.end += bytes.len() as u64;
        for record in records {
            self.state.apply(record);
        }
        Ok(())
    }

    fn encode(&self, records: &[Record], generation: u64) -> Result<Vec<u8>, JournalError> {
        let mut bytes = Vec::new();
        for record in records {
            let payload = record.encode_payload();
            if payload.len() > frame::MAX_PAYLOAD {
                return Err(JournalError::Full { bytes: payload.len(), region: self.header.region_bytes });
            }
            bytes.extend_from_slice(&frame::encode(generation, record.tag(), &payload));
        }
        Ok(bytes)
    }

    /// Writes a snapshot of the state into the idle region and makes it the
    /// active one.
    ///
    /// NOTE: the snapshot is built from the folded state, so records with a
    /// tag this build does not know are left out. An older agent that
    /// compacts drops the records a newer agent wrote.
    fn compact_locked(&mut self) -> Result<(), JournalError> {
        let meta = self.state.transitions.back().map(|transition| transition.meta).unwrap_or_default();
        let snapshot = self.state.snapshot(meta, state::KEPT_TRANSITIONS);
        let next = Header { generation: self.header.generation + 1, active: 1 - self.header.active, region_bytes: self.header.region_bytes };
        let bytes = self.encode(&snapshot, next.generation)?;
        if bytes.len() as u64 > next.region_bytes / 2 {
            return Err(JournalError::Full { bytes: bytes.len(), region: next.region_bytes });
        }

        let region_start = next.region_start(next.active);
        write_zeros(&self.file, &self.path, region_start, next.region_bytes)?;
        self.file.write_all_at(&bytes, region_start).map_err(io_error(&self.path, "write snapshot"))?;
        self.file.sync_data().map_err(io_error(&self.path, "sync snapshot"))?;

        write_header(&self.file, &self.path, &next)?;

        self.header = next;
        self.end = bytes.len() as u64;
        self.counted_torn_at = None;
        let mut rebuilt = JournalState::new(self.options.history);
        for record in &snapshot {
            rebuilt.apply(record);
        }
        rebuilt.unknown_records = self.state.unknown_records;
        rebuilt.undecodable_records = self.state.undecodable_records;
        self.state = rebuilt;
        Ok(())
    }
}

fn io_error<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io { path: path.to_path_buf(), action, source }
}

fn write_zeros(file: &File, path: &Path, start: u64, length: u64) -> Result<(), JournalError> {
    const CHUNK: u64 = 64 * 1024;
    let zeros = vec![0u8; CHUNK as usize];
    let mut written = 0;
    while written < length {
        let count = CHUNK.min(length - written);
        file.write_all_at(&zeros[..count as usize], start + written).map_err(io_error(path, "zero-fill"))?;
        written += count;
    }
    Ok(())
}

/// Creates a zero-filled journal file under a temporary name, syncs it and
/// renames it into place, so a power cut never leaves a half-created journal.
fn create_file(directory: &Path, path: &Path, file_bytes: u64) -> Result<(), JournalError> {
    let minimum = HEADER_BLOCK + 2 * MIN_REGION_BYTES;
    if file_bytes < minimum {
        return Err(JournalError::TooSmall { requested: file_bytes, minimum });
    }
    std::fs::create_dir_all(directory).map_err(io_error(directory, "create directory"))?;

    let region_bytes = (file_bytes - HEADER_BLOCK) / 2 / 4096 * 4096;
    let header = Header { generation: 1, active: 0, region_bytes };
    let temporary = directory.join(format!("{FILE_NAME}.new"));
    let file = File::create(&temporary).map_err(io_error(&temporary, "create"))?;
    write_zeros(&file, &temporary, 0, header.file_bytes())?;
    write_header(&file, &temporary, &header)?;
    file.sync_all().map_err(io_error(&temporary, "sync"))?;
    drop(file);

    std::fs::rename(&temporary, path).map_err(io_error(path, "rename"))?;
    File::open(directory).and_then(|directory| directory.sync_all()).map_err(io_error(directory, "sync directory"))
}
