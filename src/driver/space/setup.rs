//! Builds the space guard and the pull check from the configuration.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::config::space::path_of;
use crate::driver::docker::Engine;
use crate::driver::space::preflight::{PullCheck, PullTarget};
use crate::driver::space::reclaim::{ReclaimSettings, Reclaimer};
use crate::driver::space::recorder::{Recorder, RecorderAction};
use crate::driver::space::registry::ManifestReader;
use crate::driver::space::{GuardSettings, SpaceDriver, WatchedFilesystem};
use crate::machine::space::{Role, SpaceSettings};
use crate::runtime::{Runtime, WatchedDisk};

/// Agent restarts allowed in one busy state of the guard.
const MAX_RESUMES: u32 = 5;

/// Returns the filesystems the guard watches: every configured role, and the
/// reserved partition at the journal directory unless it is configured.
pub fn watched_filesystems(config: &Config) -> Vec<WatchedFilesystem> {
    let space = &config.space;
    let mut filesystems: Vec<WatchedFilesystem> =
        space.filesystems().into_iter().map(|(role, entry)| WatchedFilesystem { role, path: entry.path.clone(), marks: entry.marks(role) }).collect();
    if space.reserved.is_none() {
        let marks = crate::config::space::FilesystemConfig {
            path: config.journal.directory.clone(),
            stop_below_percent: None,
            resume_above_percent: None,
            stop_below_inodes_percent: None,
            resume_above_inodes_percent: None,
        }
        .marks(Role::Reserved);
        filesystems.push(WatchedFilesystem { role: Role::Reserved, path: config.journal.directory.clone(), marks });
    }
    filesystems
}

/// Returns the disks the status reports: the guard's filesystems and the
/// one that holds the stack's checkout.
pub fn watched_disks(config: &Config) -> Vec<WatchedDisk> {
    let mut disks: Vec<WatchedDisk> =
        watched_filesystems(config).into_iter().map(|filesystem| WatchedDisk { role: filesystem.role.name().into(), path: filesystem.path }).collect();
    if let Some(stack) = &config.stack {
        let checkout_parent = stack.checkout.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
        disks.push(WatchedDisk { role: "stack".into(), path: checkout_parent });
    }
    disks
}

/// Builds the guard's driver and the check that stack pulls run first.
pub async fn build(config: &Config, engine: &Engine, runtime: Arc<Runtime>) -> (SpaceDriver, PullCheck) {
    let space = &config.space;
    // Without [stack] the agent manages no Compose project: the reclaim then
    // has no project's containers to keep, and a recorder service has none.
    let project = config.stack.as_ref().map(|stack| stack.project.clone()).unwrap_or_default();

    let recorder = space.recorder.as_ref().map(|recorder| {
        let action = match (&recorder.container, &recorder.service) {
            (Some(container), _) => RecorderAction::Container(container.clone()),
            (None, Some(service)) => RecorderAction::Service { project: project.clone(), service: service.clone() },
            (None, None) => RecorderAction::Commands { stop: recorder.stop_command.clone(), start: recorder.start_command.clone() },
        };
        Recorder { action, engine: engine.clone(), timeout: recorder.timeout }
    });
    let recorder_service = match &recorder {
        Some(recorder) => recorder.compose_service(&project).await,
        None => None,
    };

    let reclaim = ReclaimSettings {
        project,
        only_label: space.reclaim.only_label.clone(),
        keep_label: space.reclaim.keep_label.clone(),
        kept_containers: recorder.as_ref().map(Recorder::container_names).unwrap_or_default(),
    };
    let reclaimer = Reclaimer::new(engine.clone(), runtime.journal.clone(), reclaim);

    let filesystems = watched_filesystems(config);
    let target = [Role::Docker, Role::Root].into_iter().find_map(|role| {
        let path = path_of(space, role, &config.journal.directory)?;
        let marks = filesystems.iter().find(|filesystem| filesystem.role == role)?.marks;
        Some(PullTarget { role, path, marks })
    });
    if target.is_none() {
        tracing::info!(machine = "space-guard", "neither [space.docker] nor [space.root] is configured, so pulls are not checked for space");
    }
    let check = PullCheck {
        machine: "stack",
        engine: engine.clone(),
        reader: ManifestReader::new(engine.credentials().clone(), insecure_registries(engine).await),
        reclaimer: reclaimer.clone(),
        target,
        size_factor: space.pull_size_factor,
    };

    let machine = SpaceSettings {
        max_resumes: MAX_RESUMES,
        has_recorder: recorder.is_some(),
        recorder_service,
        reclaim_interval_ms: u64::try_from(space.reclaim_interval.as_millis()).unwrap_or(u64::MAX),
        forecast_horizon_s: space.forecast_horizon.as_secs(),
    };
    let settings = GuardSettings { filesystems, interval: space.interval, forecast_window: space.forecast_window, machine };
    (SpaceDriver::new(runtime, recorder, reclaimer, settings), check)
}

/// Returns the registries the daemon reaches over plain HTTP: its insecure
/// networks (127.0.0.0/8 by default) and the hosts it marks as not secure.
async fn insecure_registries(engine: &Engine) -> Vec<String> {
    let info = match engine.api().info().await {
        Ok(info) => info,
        Err(error) => {
            tracing::warn!(%error, "cannot read the daemon's registry settings; only 127.0.0.0/8 counts as insecure");
            return vec!["127.0.0.0/8".to_string()];
        }
    };
    let Some(registry) = info.registry_config else { return vec!["127.0.0.0/8".to_string()] };
    let mut insecure = registry.insecure_registry_cidrs.unwrap_or_default();
    for (name, index) in registry.index_configs.unwrap_or_default() {
        if index.secure == Some(false) {
            insecure.push(name);
        }
    }
    insecure
}
