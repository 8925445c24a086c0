//! State shared by the parts of a running agent: the journal, the clocks,
//! the LED, the turns, the metrics, the outbox and the progress stream.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};

use crate::coordinator::Coordinator;
use crate::journal::{Journal, JournalError, Record};
use crate::metrics::Metrics;
use crate::notify::{self, Notice};
use crate::panel::{Board, ButtonHandle};
use crate::seams::Seams;
use crate::status::{self, AgentStatus};

/// A journal shared by the parts of one agent.
pub type SharedJournal = Arc<Mutex<Journal>>;

/// One line of the progress stream that `update-now` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Progress {
    /// A machine moved.
    Step { machine: String, from: String, event: String, to: String, commit: Option<String> },
    /// Bytes of an image pull so far.
    Pull { image: String, current: u64, total: u64 },
    /// A machine finished a run it was asked for, or that a poll started.
    Finished { machine: String, outcome: String, ok: bool },
    /// The agent could not run the request.
    Error { message: String },
}

/// A filesystem whose free space the status reports.
#[derive(Debug, Clone)]
pub struct WatchedDisk {
    pub role: String,
    pub path: PathBuf,
}

/// The shared parts of a running agent.
pub struct Runtime {
    pub device: String,
    pub journal: SharedJournal,
    pub seams: Seams,
    pub board: Board,
    /// Sends edges to the panel button; `autoupdate button` presses it too.
    pub button: ButtonHandle,
    pub coordinator: Coordinator,
    pub metrics: Metrics,
    pub progress: broadcast::Sender<Progress>,
    /// Wakes the notification sender when something was queued.
    pub outbox_wake: Arc<Notify>,
    /// Wakes the stack machine for a check now.
    pub stack_wake: Arc<Notify>,
    /// Requests to the factory-reset machine.
    pub factory_reset: Arc<crate::driver::factory::FactoryResetHandle>,
    /// Starts a host patch run now.
    pub host_wake: Arc<Notify>,
    /// Whether this agent patches its host (`[host]` is configured).
    pub host_patch_enabled: std::sync::atomic::AtomicBool,
    /// Requests to the self-update machine.
    pub self_update: Arc<crate::selfupdate::SelfUpdateHandle>,
    /// Maximum notifications kept in the outbox.
    pub outbox_capacity: usize,
    pub disks: Vec<WatchedDisk>,
}

impl Runtime {
    pub fn new(device: String, journal: SharedJournal, seams: Seams, outbox_capacity: usize, disks: Vec<WatchedDisk>) -> Runtime {
        let (progress, _) = broadcast::channel(256);
        Runtime {
            device,
            journal,
            seams,
            board: Board::new(),
            // The agent replaces this handle with one its button task reads.
            button: ButtonHandle::new(Default::default()).0,
            coordinator: Coordinator::new(),
            metrics: Metrics::new(),
            progress,
            outbox_wake: Arc::new(Notify::new()),
            stack_wake: Arc::new(Notify::new()),
            host_wake: Arc::new(Notify::new()),
            factory_reset: Arc::default(),
            host_patch_enabled: std::sync::atomic::AtomicBool::new(false),
            self_update: crate::selfupdate::SelfUpdateHandle::new(),
            outbox_capacity,
            disks,
        }
    }

    pub fn lock_journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().expect("no code panics while holding the journal lock")
    }

    /// Appends `records` and the notifications `notices` in one synced
    /// write, dropping old notifications from a full outbox.
    pub fn append_with_notices(&self, records: Vec<Record>, notices: &[Notice]) -> Result<(), JournalError> {
        let meta = self.seams.meta();
        let capacity = self.outbox_capacity;
        self.lock_journal().append_with(|state| {
            let mut all = records;
            all.extend(notify::queue_records(state, notices, meta, capacity));
            Ok((all, ()))
        })?;
        if !notices.is_empty() {
            self.outbox_wake.notify_one();
        }
        Ok(())
    }

    /// Sends a progress event to every `update-now` client listening.
    pub fn report(&self, progress: Progress) {
        // Having no receiver is the normal case: no client requested progress.
        let _ = self.progress.send(progress);
    }

    /// Builds the live status.
    pub fn status(&self) -> AgentStatus {
        let mut status = {
            let mut journal = self.lock_journal();
            if let Err(error) = journal.refresh() {
                tracing::warn!(%error, "cannot re-read the journal for the status");
            }
            status::from_journal(&journal, &self.device)
        };
        status.live = true;
        status.led = Some(self.board.shown().name().to_string());
        status::add_turns(&mut status, &self.coordinator.snapshot());
        status.disks = self.disks.iter().filter_map(|disk| status::disk(&disk.role, &disk.path)).collect();
        crate::driver::space::annotate_status(&mut status, &self.journal);
        status
    }
}
