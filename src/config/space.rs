//! `[space]`: the filesystems the space guard watches, its marks, the
//! recorder it stops, what reclaiming may remove, and the pull check.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration;
use crate::machine::space::{Marks, Role};

/// `[space]`: the space guard. Every key has a default; without
/// `[space.<role>]` tables the guard watches only the reserved partition.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SpaceConfig {
    /// Time between two samples of every filesystem (`statvfs`).
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// Shortest time between two reclaims while a filesystem stays low.
    #[serde(deserialize_with = "duration")]
    pub reclaim_interval: Duration,
    /// A forecast crossing of the recordings' stop mark within this time warns.
    #[serde(deserialize_with = "duration")]
    pub forecast_horizon: Duration,
    /// Age of the oldest sample the forecast fits.
    #[serde(deserialize_with = "duration")]
    pub forecast_window: Duration,
    /// Free bytes a pull needs per byte of compressed layer: the download
    /// plus the unpacked layer.
    pub pull_size_factor: f64,
    pub recordings: Option<FilesystemConfig>,
    pub docker: Option<FilesystemConfig>,
    pub root: Option<FilesystemConfig>,
    /// Default: the journal directory.
    pub reserved: Option<FilesystemConfig>,
    pub recorder: Option<RecorderConfig>,
    pub reclaim: ReclaimConfig,
}

impl Default for SpaceConfig {
    fn default() -> Self {
        SpaceConfig {
            interval: Duration::from_secs(30),
            reclaim_interval: Duration::from_secs(15 * 60),
            forecast_horizon: Duration::from_secs(24 * 3600),
            forecast_window: Duration::from_secs(6 * 3600),
            pull_size_factor: 3.0,
            recordings: None,
            docker: None,
            root: None,
            reserved: None,
            recorder: None,
            reclaim: ReclaimConfig::default(),
        }
    }
}

/// `[space.<role>]`: one watched filesystem. Percentages are of the
/// filesystem's size, as unprivileged users see it (`f_bavail`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FilesystemConfig {
    /// A directory on the filesystem, as a path inside the agent's container.
    pub path: PathBuf,
    /// Default: 15 for recordings, 10 for docker and root, 0 for reserved.
    pub stop_below_percent: Option<f64>,
    /// Default: 20 for recordings, 15 for docker and root, 0 for reserved.
    pub resume_above_percent: Option<f64>,
    /// Default: 5, and 0 for reserved.
    pub stop_below_inodes_percent: Option<f64>,
    /// Default: 10, and 0 for reserved.
    pub resume_above_inodes_percent: Option<f64>,
}

impl FilesystemConfig {
    /// Returns the marks with the defaults of `role` filled in. The reserved
    /// partition is reported but never low by default: the journal file on it
    /// is allocated in full when it is created, so a nearly full reserved
    /// partition is its normal state.
    pub fn marks(&self, role: Role) -> Marks {
        let (stop, resume, stop_inodes, resume_inodes) = match role {
            Role::Recordings => (15.0, 20.0, 5.0, 10.0),
            Role::Docker | Role::Root => (10.0, 15.0, 5.0, 10.0),
            Role::Reserved => (0.0, 0.0, 0.0, 0.0),
        };
        Marks {
            stop_below_percent: self.stop_below_percent.unwrap_or(stop),
            resume_above_percent: self.resume_above_percent.unwrap_or(resume),
            stop_below_inodes_percent: self.stop_below_inodes_percent.unwrap_or(stop_inodes),
            resume_above_inodes_percent: self.resume_above_inodes_percent.unwrap_or(resume_inodes),
        }
    }
}

/// `[space.recorder]`: how the guard stops and starts the recorder. Exactly
/// one of `container`, `service` or the two commands.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RecorderConfig {
    /// Name of a container, stopped and started through the Docker API.
    pub container: Option<String>,
    /// A service of the managed Compose project (`stack.project`).
    pub service: Option<String>,
    /// Command and arguments that stop the recorder.
    #[serde(default)]
    pub stop_command: Vec<String>,
    /// Command and arguments that start the recorder.
    #[serde(default)]
    pub start_command: Vec<String>,
    /// Time a stop or start may take; a container gets this long to exit
    /// before Docker kills it.
    #[serde(default = "default_recorder_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

fn default_recorder_timeout() -> Duration {
    Duration::from_secs(60)
}

/// `[space.reclaim]`: limits on what reclaiming removes. Volumes and the
/// containers of the managed project are never removed, nor images with a
/// keep-tag or used by a container.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(default)]
pub struct ReclaimConfig {
    /// A label as `key` or `key=value`: when set, only stopped containers and
    /// images that carry it are removed, and the build cache is left alone,
    /// because its entries carry no labels.
    pub only_label: Option<String>,
    /// A label key: containers and images that carry it are never removed.
    pub keep_label: Option<String>,
}

impl SpaceConfig {
    /// Returns each configured filesystem with its role.
    pub fn filesystems(&self) -> Vec<(Role, &FilesystemConfig)> {
        let entries = [(Role::Recordings, &self.recordings), (Role::Docker, &self.docker), (Role::Root, &self.root), (Role::Reserved, &self.reserved)];
        entries.into_iter().filter_map(|(role, entry)| entry.as_ref().map(|entry| (role, entry))).collect()
    }
}

/// Checks values that parse but cannot work.
pub(super) fn check_space(space: &SpaceConfig, report: &mut impl FnMut(&str, String)) {
    for (key, value) in [
        ("space.interval", space.interval),
        ("space.reclaim_interval", space.reclaim_interval),
        ("space.forecast_horizon", space.forecast_horizon),
        ("space.forecast_window", space.forecast_window),
    ] {
        if value.is_zero() {
            report(key, "must be longer than zero".into());
        }
    }
    if space.pull_size_factor.is_nan() || space.pull_size_factor < 1.0 {
        report("space.pull_size_factor", format!("{} is below 1: a pull needs at least the size of its layers", space.pull_size_factor));
    }

    for (role, filesystem) in space.filesystems() {
        check_filesystem(role, filesystem, report);
    }
    if let Some(recorder) = &space.recorder {
        check_recorder(recorder, report);
        if space.recordings.is_none() {
            report("space.recorder", "needs [space.recordings] with the path of the filesystem the recorder writes to".into());
        }
    }
    for (key, label) in [("space.reclaim.only_label", &space.reclaim.only_label), ("space.reclaim.keep_label", &space.reclaim.keep_label)] {
        if let Some(label) = label {
            let name = label.split_once('=').map_or(label.as_str(), |(name, _)| name);
            let valid = !name.is_empty() && name.chars().all(|character| character.is_ascii_alphanumeric() || "._-/".contains(character));
            if !valid {
                report(key, format!("{label:?} is not a label: write key or key=value, with a key of letters, digits, '.', '-', '_' and '/'"));
            }
        }
    }
}

fn check_filesystem(role: Role, filesystem: &FilesystemConfig, report: &mut impl FnMut(&str, String)) {
    let prefix = format!("space.{}", role.name());
    if !filesystem.path.is_absolute() {
        report(&format!("{prefix}.path"), format!("{} must be an absolute path", filesystem.path.display()));
    }
    let marks = filesystem.marks(role);
    let values = [
        ("stop_below_percent", marks.stop_below_percent),
        ("resume_above_percent", marks.resume_above_percent),
        ("stop_below_inodes_percent", marks.stop_below_inodes_percent),
        ("resume_above_inodes_percent", marks.resume_above_inodes_percent),
    ];
    for (key, value) in values {
        if !(0.0..=100.0).contains(&value) {
            report(&format!("{prefix}.{key}"), format!("{value} is not a percentage from 0 to 100"));
        }
    }
    if marks.resume_above_percent < marks.stop_below_percent {
        let message = format!(
            "{} is below stop_below_percent ({}); the resume mark must be at or above the stop mark",
            marks.resume_above_percent, marks.stop_below_percent
        );
        report(&format!("{prefix}.resume_above_percent"), message);
    }
    if marks.resume_above_inodes_percent < marks.stop_below_inodes_percent {
        let message = format!(
            "{} is below stop_below_inodes_percent ({}); the resume mark must be at or above the stop mark",
            marks.resume_above_inodes_percent, marks.stop_below_inodes_percent
        );
        report(&format!("{prefix}.resume_above_inodes_percent"), message);
    }
}

fn check_recorder(recorder: &RecorderConfig, report: &mut impl FnMut(&str, String)) {
    let commands = !recorder.stop_command.is_empty() || !recorder.start_command.is_empty();
    let actions = usize::from(recorder.container.is_some()) + usize::from(recorder.service.is_some()) + usize::from(commands);
    if actions != 1 {
        report("space.recorder", "set exactly one of container, service, or stop_command with start_command".into());
    }
    if commands {
        for (action, command) in [("stop", &recorder.stop_command), ("start", &recorder.start_command)] {
            if command.first().is_none_or(|program| program.trim().is_empty()) {
                let example = format!("[\"/usr/local/bin/recorder\", \"{action}\"]");
                report(&format!("space.recorder.{action}_command"), format!("must name a program with its arguments, for example {example}"));
            }
        }
    }
    for (key, name) in [("space.recorder.container", &recorder.container), ("space.recorder.service", &recorder.service)] {
        if let Some(name) = name {
            let valid = !name.is_empty() && name.chars().all(|character| character.is_ascii_alphanumeric() || "._-".contains(character));
            if !valid {
                report(key, format!("{name:?} is not a container or service name: use letters, digits, '.', '_' and '-'"));
            }
        }
    }
    if recorder.timeout.is_zero() {
        report("space.recorder.timeout", "must be longer than zero".into());
    }
}

/// Returns the path of `role`'s filesystem: the configured one, or the
/// journal directory for the reserved partition.
pub fn path_of(space: &SpaceConfig, role: Role, journal_directory: &std::path::Path) -> Option<PathBuf> {
    let configured = space.filesystems().into_iter().find(|(entry_role, _)| *entry_role == role).map(|(_, entry)| entry.path.clone());
    match (configured, role) {
        (Some(path), _) => Some(path),
        (None, Role::Reserved) => Some(journal_directory.to_path_buf()),
        (None, _) => None,
    }
}
