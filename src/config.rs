//! The agent's TOML configuration: parsing, defaults and validation.
//!
//! Every duration is a string with its unit (`"90s"`, `"5m"`, `"1h 30m"`), so
//! a bare number is an error rather than a guess. Unknown keys are errors; they
//! are collected with `serde_ignored` so that all of them are reported at once.
//! Validation reports every problem it finds, each with its key and, where the
//! key appears in the file, its line.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

pub mod self_update;
pub mod space;
pub mod trust;

pub use self_update::SelfUpdateConfig;
pub use space::SpaceConfig;
pub use trust::{GitConfig, RegistryConfig, Transport};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub agent: AgentConfig,
    pub journal: JournalConfig,
    pub docker: DockerConfig,
    /// `[stack]`; `autoupdate run` needs it, `[self_update]` or both.
    pub stack: Option<StackConfig>,
    /// `[self_update]`, present when the agent updates its own container.
    pub self_update: Option<SelfUpdateConfig>,
    pub control: ControlConfig,
    pub notifications: NotificationsConfig,
    pub panel: PanelConfig,
    pub seams: SeamsConfig,
    /// `[host]`, present when the agent patches its Docker host.
    pub host: Option<HostConfig>,
    pub git: GitConfig,
    /// `[[registry]]` entries, one per registry host that needs credentials.
    pub registries: Vec<RegistryConfig>,
    pub space: SpaceConfig,
    /// Settings that still work but should be rewritten, such as a key that
    /// moved.
    pub warnings: Vec<Problem>,
}

/// `[control]`: the local API for the CLI and monitoring.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ControlConfig {
    /// Unix socket of the control API.
    pub socket: PathBuf,
    /// Also serve the API on this TCP port of 127.0.0.1, for a metrics
    /// scraper on the device. Never bound to another address.
    pub tcp_port: Option<u16>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig { socket: PathBuf::from("/run/eventpi/autoupdate.sock"), tcp_port: None }
    }
}

/// `[notifications]`: the webhook that receives failures, rollbacks, factory
/// resets and warnings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct NotificationsConfig {
    /// `http://` or `https://` URL that receives each notification as a JSON
    /// POST. Without it, notifications wait in the outbox.
    pub webhook_url: Option<String>,
    /// File with the shared secret for the HMAC-SHA256 signature; mode 0600.
    pub secret_file: Option<PathBuf>,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Notifications kept in the outbox; when it is full, the oldest of the
    /// lowest severity is dropped and counted.
    pub max_pending: usize,
    #[serde(deserialize_with = "duration")]
    pub retry_backoff_min: Duration,
    #[serde(deserialize_with = "duration")]
    pub retry_backoff_max: Duration,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            webhook_url: None,
            secret_file: None,
            timeout: Duration::from_secs(10),
            max_pending: 200,
            retry_backoff_min: Duration::from_secs(5),
            retry_backoff_max: Duration::from_secs(900),
        }
    }
}

/// The sections that `autoupdate host-patch` needs: `[stack]` may be missing,
/// `[host]` must be there.
#[derive(Debug, Clone, PartialEq)]
pub struct HostPatchConfig {
    pub agent: AgentConfig,
    pub journal: JournalConfig,
    pub seams: SeamsConfig,
    pub host: HostConfig,
}

/// `[agent]`: identity, logging and local working files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AgentConfig {
    /// Name of the device in logs and notifications; default: the host name.
    pub name: Option<String>,
    /// Directory for the generated override files and validation checkouts.
    /// Default: `state` beside the journal directory.
    pub state_directory: Option<PathBuf>,
    pub log_format: LogFormat,
    /// A `tracing` filter such as `info` or `eventpi_autoupdate=debug`.
    pub log_level: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig { name: None, state_directory: None, log_format: LogFormat::Human, log_level: "info".into() }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines, with colours on a terminal.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `[journal]`: where the journal lives.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JournalConfig {
    /// Directory on the reserved partition.
    pub directory: PathBuf,
    /// Size of the journal file when it is created, in KiB.
    #[serde(default = "default_journal_kib")]
    pub size_kib: u64,
}

fn default_journal_kib() -> u64 {
    2052
}

/// `[docker]`: how to reach the engine.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(default)]
pub struct DockerConfig {
    /// A `unix://` path of the engine's socket. Default: `DOCKER_HOST`, or
    /// `/var/run/docker.sock`.
    pub host: Option<String>,
    /// Platform every image must be built for, as `os/arch[/variant]`.
    /// Default: the engine's own platform.
    pub platform: Option<String>,
    /// Command that runs Compose v2, with its leading arguments, for example
    /// `["docker", "compose"]`. Default: `docker compose` when the docker CLI
    /// has the plugin, otherwise a standalone `docker-compose` of version 2.
    pub compose_command: Option<Vec<String>>,
}

/// When a pulled update may be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// As soon as the images are pulled.
    Immediate,
    /// Only after the device booted again since the pull.
    OnBoot,
    /// Only inside one of the maintenance windows, with a synchronised clock.
    Window,
}

/// The apply policy table of an update process, such as `[stack.apply]`.
///
/// TODO: `[self_update.apply]` and `[host_patch.apply]` take this same table
/// once those processes exist; `ApplyConfig::policy` and
/// `driver::apply_gate` are written for any process.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ApplyConfig {
    /// Default: `immediate`.
    pub policy: Option<PolicyKind>,
    /// Daily windows as `"HH:MM-HH:MM Area/City"`, used by `policy = "window"`.
    pub windows: Vec<String>,
    /// Files that hold the update lock while they exist, for example on a
    /// volume shared with the applications.
    pub lock_files: Vec<PathBuf>,
    /// A label key: a running container that carries it holds the update lock.
    pub lock_label: Option<String>,
    /// Time update locks may defer an update, summed over boots, before it is
    /// applied anyway.
    #[serde(deserialize_with = "duration")]
    pub max_deferral: Duration,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig { policy: None, windows: Vec::new(), lock_files: Vec::new(), lock_label: None, max_deferral: Duration::from_secs(24 * 3600) }
    }
}

impl ApplyConfig {
    /// Builds the policy, or returns each problem as the key inside the table
    /// and its message.
    pub fn policy(&self) -> Result<crate::policy::ApplyPolicy, Vec<(&'static str, String)>> {
        use crate::policy::{ApplyPolicy, Timing, Window};

        let mut problems = Vec::new();
        let mut windows = Vec::new();
        for text in &self.windows {
            match text.parse::<Window>() {
                Ok(window) => windows.push(window),
                Err(error) => problems.push(("windows", error.to_string())),
            }
        }
        let kind = self.policy.unwrap_or(PolicyKind::Immediate);
        if kind == PolicyKind::Window && self.windows.is_empty() {
            problems.push(("windows", "policy \"window\" needs at least one window, for example [\"02:00-04:00 Europe/Warsaw\"]".to_string()));
        }
        if kind != PolicyKind::Window && !self.windows.is_empty() {
            problems.push(("windows", "windows are used only with policy = \"window\"; set the policy or remove the windows".to_string()));
        }
        for file in &self.lock_files {
            if !file.is_absolute() {
                problems.push(("lock_files", format!("{} must be an absolute path", file.display())));
            }
        }
        if let Some(label) = &self.lock_label {
            let valid = !label.is_empty() && label.chars().all(|character| character.is_ascii_alphanumeric() || "._-/".contains(character));
            if !valid {
                problems.push((
                    "lock_label",
                    format!("{label:?} is not a label key: use letters, digits, '.', '-', '_' and '/', for example \"eventpi.update-lock\""),
                ));
            }
        }
        if self.max_deferral.is_zero() {
            problems.push(("max_deferral", "must be longer than zero; to ignore update locks, remove lock_files and lock_label".to_string()));
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let timing = match kind {
            PolicyKind::Immediate => Timing::Immediate,
            PolicyKind::OnBoot => Timing::OnBoot,
            PolicyKind::Window => Timing::Windows(windows),
        };
        Ok(ApplyPolicy { timing, max_deferral: self.max_deferral })
    }
}

/// `[stack]`: the device branch and how to run it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StackConfig {
    /// URL of the git repository with the compose files.
    pub repository: String,
    /// The branch this device follows.
    pub branch: String,
    /// Working tree of the clone. Compose runs there, so it must be the same
    /// path inside and outside the agent's container.
    pub checkout: PathBuf,
    /// Compose files, relative to the checkout.
    #[serde(default = "default_compose_files")]
    pub compose_files: Vec<String>,
    /// Compose project name.
    #[serde(default = "default_project")]
    pub project: String,
    #[serde(default = "default_poll_interval", deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// Share of the poll interval added or removed at random, in percent.
    #[serde(default = "default_poll_jitter")]
    pub poll_jitter_percent: u8,
    #[serde(default = "default_git_timeout", deserialize_with = "duration")]
    pub git_timeout: Duration,
    #[serde(default = "default_compose_timeout", deserialize_with = "duration")]
    pub compose_timeout: Duration,
    #[serde(default = "default_pull_timeout", deserialize_with = "duration")]
    pub pull_timeout: Duration,
    /// How long every service must stay healthy after an update.
    #[serde(default = "default_probation", deserialize_with = "duration")]
    pub probation: Duration,
    /// How long a service with a healthcheck may stay `starting` after the
    /// probation window before the gate fails.
    #[serde(default = "default_health_grace", deserialize_with = "duration")]
    pub health_grace: Duration,
    /// When a pulled commit may be applied, and which locks defer it.
    #[serde(default)]
    pub apply: ApplyConfig,
    /// The former place of `stack.apply.policy`. Parsing moves a value found
    /// here into `apply.policy` and adds a warning, so this is `None` in a
    /// parsed configuration.
    #[serde(default)]
    pub apply_policy: Option<PolicyKind>,
    /// Agent restarts allowed in one attempt before it takes the failure path.
    #[serde(default = "default_max_resumes")]
    pub max_resumes: u32,
    /// First delay after a transient failure; it doubles up to the maximum.
    #[serde(default = "default_retry_min", deserialize_with = "duration")]
    pub retry_backoff_min: Duration,
    #[serde(default = "default_retry_max", deserialize_with = "duration")]
    pub retry_backoff_max: Duration,
    /// Command run as the last fallback, with its arguments.
    #[serde(default)]
    pub factory_reset_command: Vec<String>,
    #[serde(default = "default_reset_timeout", deserialize_with = "duration")]
    pub factory_reset_timeout: Duration,
}

fn default_compose_files() -> Vec<String> {
    vec!["compose.yaml".into()]
}
fn default_project() -> String {
    "eventpi".into()
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_poll_jitter() -> u8 {
    10
}
fn default_git_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_compose_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_pull_timeout() -> Duration {
    Duration::from_secs(1800)
}
fn default_probation() -> Duration {
    Duration::from_secs(60)
}
fn default_health_grace() -> Duration {
    Duration::from_secs(120)
}
fn default_max_resumes() -> u32 {
    5
}
fn default_retry_min() -> Duration {
    Duration::from_secs(10)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(900)
}
fn default_reset_timeout() -> Duration {
    Duration::from_secs(1800)
}

/// LED and button backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PanelBackend {
    /// LED changes go to the log.
    Simulated,
    /// rppal on the Pi's GPIO pins (needs the `gpio` build feature).
    Gpio,
}

/// `[panel]`: the status LED and the button.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct PanelConfig {
    pub backend: PanelBackend,
    /// BCM GPIO number of the LED.
    pub led_pin: u8,
    /// BCM GPIO number of the button, wired to ground with the internal pull-up.
    pub button_pin: u8,
    /// A button level must stay this long before it counts.
    #[serde(deserialize_with = "duration")]
    pub debounce: Duration,
    /// Holding the button this long arms the factory reset.
    #[serde(deserialize_with = "duration")]
    pub long_hold: Duration,
    /// Holding the button this long, counted from the press, cancels the
    /// armed reset; releasing before it starts the reset.
    #[serde(deserialize_with = "duration")]
    pub cancel_after: Duration,
    /// Directory with the factory compose files and image archives that the
    /// factory reset restores. Default: `factory` beside journal.directory.
    pub factory_directory: Option<PathBuf>,
}

impl Default for PanelConfig {
    fn default() -> Self {
        let button = crate::panel::button::ButtonSettings::default();
        PanelConfig {
            backend: PanelBackend::Simulated,
            led_pin: 17,
            button_pin: 27,
            debounce: button.debounce,
            long_hold: button.long_hold,
            cancel_after: button.cancel_after,
            factory_directory: None,
        }
    }
}

impl PanelConfig {
    pub fn button_settings(&self) -> crate::panel::button::ButtonSettings {
        crate::panel::button::ButtonSettings { debounce: self.debounce, long_hold: self.long_hold, cancel_after: self.cancel_after }
    }
}

/// Checks that the button's times leave room for a press, a hold and a
/// release inside the confirmation window.
fn check_panel(panel: &PanelConfig, report: &mut impl FnMut(&str, String)) {
    let show = |value: Duration| humantime::format_duration(value).to_string();
    if panel.debounce.is_zero() || panel.debounce > Duration::from_secs(1) {
        report("panel.debounce", format!("{} is outside 1ms..1s; a mechanical button settles within about 20ms, so 50ms is typical", show(panel.debounce)));
    }
    if panel.long_hold < Duration::from_secs(2) || panel.long_hold <= panel.debounce {
        report("panel.long_hold", format!("{} is too short: a factory reset needs a deliberate hold of at least 2s", show(panel.long_hold)));
    }
    if panel.cancel_after < panel.long_hold + Duration::from_secs(2) {
        report(
            "panel.cancel_after",
            format!(
                "{} leaves less than 2s after panel.long_hold ({}) to release the button; set it at least 2s above",
                show(panel.cancel_after),
                show(panel.long_hold)
            ),
        );
    }
    if let Some(directory) = &panel.factory_directory
        && !directory.is_absolute()
    {
        report("panel.factory_directory", format!("{} must be an absolute path", directory.display()));
    }
}

/// `[seams]`: sources of facts that a container or a test replaces.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SeamsConfig {
    /// File holding the kernel's boot id as a UUID.
    pub boot_id_file: PathBuf,
    /// For tests only: a file whose content sets the wall time and whether the
    /// clock counts as synchronised, read on every look at the clock, as
    /// `2025-06-10T12:00:00Z synced` or `... unsynced`. Monotonic time stays
    /// the kernel's. Default: the system clock and the kernel's time-sync flag.
    pub clock_file: Option<PathBuf>,
}

impl Default for SeamsConfig {
    fn default() -> Self {
        SeamsConfig { boot_id_file: PathBuf::from("/proc/sys/kernel/random/boot_id"), clock_file: None }
    }
}

/// `[host]`: how to reach and patch the Docker host over SSH.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HostConfig {
    /// Time between two patch runs of the agent, jittered like the polls.
    /// `autoupdate update-now --host` starts one at once.
    #[serde(default = "default_host_interval", deserialize_with = "duration")]
    pub interval: Duration,
    /// When a patch run may start, and which locks defer it. Updating,
    /// upgrading and rebooting all happen inside the run, so the whole run
    /// waits for the policy. `on-boot` does not apply to the host.
    #[serde(default)]
    pub apply: ApplyConfig,
    /// Host name or IP address of the host's sshd. From a container, Docker's
    /// `host-gateway` name (for example `host.docker.internal`) reaches it.
    pub address: String,
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    #[serde(default = "default_ssh_user")]
    pub user: String,
    /// OpenSSH private key file, without a passphrase.
    pub key_file: PathBuf,
    /// The host's public key: a `known_hosts` line, a public key line such as
    /// `ssh-ed25519 AAAA...`, or a `SHA256:` fingerprint as `ssh-keygen -lf`
    /// prints it. Any other key is rejected.
    pub host_key: String,
    /// Runs every command through `sudo -n`, for a user other than root.
    #[serde(default)]
    pub use_sudo: bool,
    #[serde(default = "default_ssh_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Limit for each short command: checks, starting a job, reading its status.
    #[serde(default = "default_host_command_timeout", deserialize_with = "duration")]
    pub command_timeout: Duration,
    /// How long the agent keeps trying to reconnect when the connection drops
    /// outside a job.
    #[serde(default = "default_reconnect_window", deserialize_with = "duration")]
    pub reconnect_window: Duration,
    #[serde(default = "default_update_lists_timeout", deserialize_with = "duration")]
    pub update_lists_timeout: Duration,
    /// How long the agent waits for the upgrade job. A job past it is left
    /// running, because killing dpkg mid-unpack breaks the host.
    #[serde(default = "default_upgrade_timeout", deserialize_with = "duration")]
    pub upgrade_timeout: Duration,
    #[serde(default = "default_repair_timeout", deserialize_with = "duration")]
    pub repair_timeout: Duration,
    /// How long the host may take to come back after a reboot.
    #[serde(default = "default_boot_timeout", deserialize_with = "duration")]
    pub boot_timeout: Duration,
    /// Time between two reads of a running job's status.
    #[serde(default = "default_job_poll_interval", deserialize_with = "duration")]
    pub job_poll_interval: Duration,
    /// How long to wait for another process to release the dpkg lock before
    /// reporting the host busy. The holder is never killed.
    #[serde(default = "default_dpkg_lock_wait", deserialize_with = "duration")]
    pub dpkg_lock_wait: Duration,
    /// Reboots allowed in one attempt. With 0 the host is never rebooted.
    #[serde(default = "default_max_reboots")]
    pub max_reboots: u32,
    /// Agent restarts allowed in one attempt before it takes the failure path.
    #[serde(default = "default_max_resumes")]
    pub max_resumes: u32,
    /// Free space needed on `/` and on `/var/cache/apt/archives`, in MiB.
    #[serde(default = "default_min_free_mib")]
    pub min_free_mib: u64,
    /// Free space needed on `/boot/firmware` or `/boot` when it is a separate
    /// filesystem, in MiB.
    #[serde(default = "default_min_free_boot_mib")]
    pub min_free_boot_mib: u64,
    /// Directory on the host for the jobs' scripts, output and exit status.
    #[serde(default = "default_job_directory")]
    pub job_directory: String,
    /// Shell command on the host that prints the boot id.
    #[serde(default = "default_boot_id_command")]
    pub boot_id_command: String,
    /// Shell command on the host that prints the running kernel's release.
    #[serde(default = "default_kernel_release_command")]
    pub kernel_release_command: String,
    /// Shell command on the host that prints the installed kernels' releases,
    /// one per line.
    #[serde(default = "default_installed_kernels_command")]
    pub installed_kernels_command: String,
    /// Shell command on the host that reboots it.
    #[serde(default = "default_reboot_command")]
    pub reboot_command: String,
}

fn default_host_interval() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_ssh_port() -> u16 {
    22
}
fn default_ssh_user() -> String {
    "root".into()
}
fn default_ssh_connect_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_host_command_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_reconnect_window() -> Duration {
    Duration::from_secs(300)
}
fn default_update_lists_timeout() -> Duration {
    Duration::from_secs(900)
}
fn default_upgrade_timeout() -> Duration {
    Duration::from_secs(2 * 3600)
}
fn default_repair_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_boot_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_job_poll_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_dpkg_lock_wait() -> Duration {
    Duration::from_secs(600)
}
fn default_max_reboots() -> u32 {
    1
}
fn default_min_free_mib() -> u64 {
    500
}
fn default_min_free_boot_mib() -> u64 {
    50
}
fn default_job_directory() -> String {
    "/var/lib/eventpi-autoupdate/jobs".into()
}
fn default_boot_id_command() -> String {
    "cat /proc/sys/kernel/random/boot_id".into()
}
fn default_kernel_release_command() -> String {
    "uname -r".into()
}
fn default_installed_kernels_command() -> String {
    "ls -1 /lib/modules".into()
}
fn default_reboot_command() -> String {
    "systemctl reboot".into()
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    struct DurationText;

    impl serde::de::Visitor<'_> for DurationText {
        type Value = Duration;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a duration with its unit, such as \"30s\", \"5m\" or \"1h 30m\"")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text).map_err(|error| E::custom(format!("invalid duration {text:?}: {error}; write it with a unit, such as \"30s\"")))
        }
    }

    deserializer.deserialize_str(DurationText)
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, for example `stack.poll_interval`; empty for a syntax error.
    pub key: String,
    /// 1-based line, where the key or the error could be located.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Error for a configuration that cannot be used, listing every problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration {} ({} problem", self.path.display(), self.problems.len())?;
        if self.problems.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str("):")?;
        for problem in &self.problems {
            write!(f, "\n  {}: {problem}", self.path.display())?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            path: path.to_path_buf(),
            problems: vec![Problem { key: String::new(), line: None, message: format!("cannot read the file: {error}") }],
        })?;
        Config::parse(&text).map_err(|problems| ConfigError { path: path.to_path_buf(), problems })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
        let parts = Parts::parse(text, Needs { stack: true, host: false })?;
        Ok(Config {
            agent: parts.agent,
            journal: parts.journal,
            docker: parts.docker,
            stack: parts.stack,
            self_update: parts.self_update,
            control: parts.control,
            notifications: parts.notifications,
            panel: parts.panel,
            seams: parts.seams,
            host: parts.host,
            git: parts.git,
            registries: parts.registries,
            space: parts.space,
            warnings: parts.warnings,
        })
    }

    /// Returns the directory of the factory material: panel.factory_directory,
    /// or `factory` beside the journal's directory, which is where the
    /// reserved partition keeps it (see hw/README.md).
    pub fn factory_directory(&self) -> PathBuf {
        self.panel.factory_directory.clone().unwrap_or_else(|| match self.journal.directory.parent() {
            Some(parent) => parent.join("factory"),
            None => self.journal.directory.join("factory"),
        })
    }

    /// Returns the directory for override files and validation checkouts.
    pub fn state_directory(&self) -> PathBuf {
        self.agent.state_directory.clone().unwrap_or_else(|| match self.journal.directory.parent() {
            Some(parent) => parent.join("state"),
            None => PathBuf::from("/var/lib/eventpi-autoupdate/state"),
        })
    }
}

/// Optional sections that a command needs.
#[derive(Debug, Clone, Copy)]
struct Needs {
    /// `[stack]`, unless `[self_update]` is there.
    stack: bool,
    host: bool,
}

/// Every section of a configuration file, before a command picks the ones it
/// uses.
struct Parts {
    agent: AgentConfig,
    journal: JournalConfig,
    docker: DockerConfig,
    stack: Option<StackConfig>,
    self_update: Option<SelfUpdateConfig>,
    control: ControlConfig,
    notifications: NotificationsConfig,
    panel: PanelConfig,
    seams: SeamsConfig,
    host: Option<HostConfig>,
    git: GitConfig,
    registries: Vec<RegistryConfig>,
    space: SpaceConfig,
    warnings: Vec<Problem>,
}

impl Parts {
    fn parse(text: &str, needs: Needs) -> Result<Parts, Vec<Problem>> {
        let mut table = match toml::from_str::<toml::Table>(text) {
            Ok(table) => table,
            Err(error) => {
                let line = error.span().map(|span| line_of_offset(text, span.start));
                let mut message = error.message().trim().to_string();
                if message == "duplicate key"
                    && let Some(key) = error.span().and_then(|span| text.get(span))
                {
                    message = format!("duplicate key {}; keep one of the two", key.trim());
                }
                return Err(vec![Problem { key: String::new(), line, message }]);
            }
        };

        let mut sections = Sections { text, problems: Vec::new() };
        let agent = sections.optional::<AgentConfig>(&mut table, "agent");
        let journal = sections.required::<JournalConfig>(&mut table, "journal");
        let docker = sections.optional::<DockerConfig>(&mut table, "docker");
        let stack = if needs.stack && !table.contains_key("stack") && !table.contains_key("self_update") {
            sections.problem("stack", "missing section [stack]; autoupdate run needs [stack], [self_update] or both");
            None
        } else {
            sections.present::<StackConfig>(&mut table, "stack", false)
        };
        let self_update = sections.present::<SelfUpdateConfig>(&mut table, "self_update", false);
        let control = sections.optional::<ControlConfig>(&mut table, "control");
        let notifications = sections.optional::<NotificationsConfig>(&mut table, "notifications");
        let panel = sections.optional::<PanelConfig>(&mut table, "panel");
        let seams = sections.optional::<SeamsConfig>(&mut table, "seams");
        let host = sections.present::<HostConfig>(&mut table, "host", needs.host);
        let git = sections.optional::<GitConfig>(&mut table, "git");
        let registries = sections.array::<RegistryConfig>(&mut table, "registry");
        let space = sections.optional::<SpaceConfig>(&mut table, "space");
        for unknown in table.keys() {
            sections.problem(
                unknown,
                "unknown section or key; the sections are agent, journal, docker, stack, self_update, git, [[registry]], control, notifications, panel, seams, host and space",
            );
        }

        let mut problems = sections.problems;
        let sections = (agent, journal, docker, stack, self_update, control, notifications, panel, seams, host, git, registries, space);
        match sections {
            (
                Some(agent),
                Some(journal),
                Some(docker),
                Some(stack),
                Some(self_update),
                Some(control),
                Some(notifications),
                Some(panel),
                Some(seams),
                Some(host),
                Some(git),
                Some(registries),
                Some(space),
            ) => {
                let mut parts = Parts {
                    agent,
                    journal,
                    docker,
                    stack,
                    self_update,
                    control,
                    notifications,
                    panel,
                    seams,
                    host,
                    git,
                    registries,
                    space,
                    warnings: Vec::new(),
                };
                // A key already reported has its default here; a second
                // problem for it would only repeat the first.
                let reported: Vec<String> = problems.iter().map(|problem| problem.key.clone()).collect();
                if parts.panel.backend == PanelBackend::Gpio && !cfg!(feature = "gpio") {
                    let key = "panel.backend";
                    let message =
                        "is \"gpio\", but this build has no GPIO support; the LED is simulated in the log. Use a build with the cargo feature gpio".to_string();
                    parts.warnings.push(Problem { key: key.into(), line: line_of_key(text, key), message });
                }
                let later = parts.migrate(text).into_iter().chain(parts.check(text));
                problems.extend(later.filter(|problem| !reported.contains(&problem.key)));
                if problems.is_empty() {
                    return Ok(parts);
                }
                // The file is rejected anyway, so its warnings go with the problems.
                problems.extend(parts.warnings.into_iter().map(|warning| Problem { message: format!("(warning) {}", warning.message), ..warning }));
                Err(in_line_order(problems))
            }
            _ => Err(in_line_order(problems)),
        }
    }

    /// Moves settings from their former keys to their current ones, adding a
    /// warning for each, and returns the conflicts it finds.
    fn migrate(&mut self, text: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let Some(stack) = self.stack.as_mut() else { return problems };
        if let Some(kind) = stack.apply_policy.take() {
            let key = "stack.apply_policy";
            let line = line_of_key(text, key);
            if stack.apply.policy.is_some() {
                let message = "is replaced by stack.apply.policy, which is set too; remove stack.apply_policy".to_string();
                problems.push(Problem { key: key.into(), line, message });
            } else {
                stack.apply.policy = Some(kind);
                let message = "is replaced by `policy` in [stack.apply]; it is still read, but move it there".to_string();
                self.warnings.push(Problem { key: key.into(), line, message });
            }
        }
        problems
    }

    /// Checks values that parse but cannot work.
    fn check(&self, text: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut report = |key: &str, message: String| {
            problems.push(Problem { key: key.to_string(), line: line_of_key(text, key), message });
        };

        if let Some(stack) = &self.stack {
            check_stack(stack, &mut report);
        }
        if let Some(host) = &self.host {
            check_host(host, &mut report);
        }
        check_panel(&self.panel, &mut report);
        if !self.journal.directory.is_absolute() {
            report("journal.directory", format!("{} must be an absolute path", self.journal.directory.display()));
        }
        if self.journal.size_kib < 36 {
            report("journal.size_kib", format!("{} KiB is below the minimum of 36 KiB", self.journal.size_kib));
        }
        if let Some(host) = &self.docker.host
            && !host.starts_with("unix://")
        {
            report("docker.host", format!("{host:?} is not supported: use a unix:// socket path"));
        }
        let empty_command = self.docker.compose_command.as_ref().is_some_and(|command| command.first().is_none_or(|program| program.trim().is_empty()));
        if empty_command {
            report("docker.compose_command", "must name a program, for example [\"docker\", \"compose\"]".into());
        }
        if let Some(platform) = &self.docker.platform
            && crate::platform::Platform::parse(platform).is_none()
        {
            report("docker.platform", format!("{platform:?} is not a platform: write os/arch or os/arch/variant, for example linux/arm64"));
        }
        if !self.control.socket.is_absolute() {
            report("control.socket", format!("{} must be an absolute path", self.control.socket.display()));
        }
        if self.control.tcp_port == Some(0) {
            report("control.tcp_port", "must be a port number from 1 to 65535".into());
        }
        check_notifications(&self.notifications, &mut report);
        space::check_space(&self.space, &mut report);
        if let Some(clock_file) = &self.seams.clock_file
            && !clock_file.is_absolute()
        {
            report("seams.clock_file", format!("{} must be an absolute path", clock_file.display()));
        }
        if self.agent.log_level.parse::<tracing_subscriber::filter::Targets>().is_err() {
            report("agent.log_level", format!("{:?} is not a valid tracing filter, for example \"info\"", self.agent.log_level));
        }
        if let Some(stack) = &self.stack {
            problems.extend(trust::check_git(&self.git, &stack.repository, text));
        }
        problems.extend(trust::check_registries(&self.registries, text));
        if let Some(self_update) = &self.self_update {
            problems.extend(self_update::check(self_update, text));
        }
        problems
    }
}

fn check_notifications(notifications: &NotificationsConfig, report: &mut impl FnMut(&str, String)) {
    if let Some(url) = &notifications.webhook_url {
        let parsed = url.parse::<hyper::Uri>();
        let scheme_ok = parsed.as_ref().is_ok_and(|uri| matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some());
        if !scheme_ok {
            report("notifications.webhook_url", format!("{url:?} is not an http:// or https:// URL with a host"));
        }
        if notifications.secret_file.is_none() {
            report("notifications.secret_file", "is missing: the webhook needs a shared secret for the signature".into());
        }
    }
    if notifications.max_pending == 0 {
        report("notifications.max_pending", "must be at least 1".into());
    }
    if notifications.timeout.is_zero() {
        report("notifications.timeout", "must be longer than zero".into());
    }
    if notifications.retry_backoff_min.is_zero() || notifications.retry_backoff_max < notifications.retry_backoff_min {
        report("notifications.retry_backoff_max", "must be at least notifications.retry_backoff_min, which must be longer than zero".into());
    }
}

impl HostPatchConfig {
    /// Reads and validates the sections of a configuration file that a host
    /// patch needs. Sections it does not use are still validated.
    pub fn load(path: &Path) -> Result<HostPatchConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            path: path.to_path_buf(),
            problems: vec![Problem { key: String::new(), line: None, message: format!("cannot read the file: {error}") }],
        })?;
        HostPatchConfig::parse(&text).map_err(|problems| ConfigError { path: path.to_path_buf(), problems })
    }

    /// Parses and validates configuration text that has a `[host]` section.
    pub fn parse(text: &str) -> Result<HostPatchConfig, Vec<Problem>> {
        let parts = Parts::parse(text, Needs { stack: false, host: true })?;
        let host = parts.host.expect("Parts::parse reports a missing [host] when it is needed");
        Ok(HostPatchConfig { agent: parts.agent, journal: parts.journal, seams: parts.seams, host })
    }
}

fn check_stack(stack: &StackConfig, report: &mut impl FnMut(&str, String)) {
    if stack.repository.trim().is_empty() {
        report("stack.repository", "must name a git repository URL".into());
    }
    if !valid_branch(&stack.branch) {
        report("stack.branch", format!("{:?} is not a valid git branch name", stack.branch));
    }
    if !stack.checkout.is_absolute() {
        report("stack.checkout", format!("{} must be an absolute path", stack.checkout.display()));
    }
    if stack.compose_files.is_empty() {
        report("stack.compose_files", "must list at least one compose file".into());
    }
    for file in &stack.compose_files {
        if Path::new(file).is_absolute() || file.split('/').any(|part| part == "..") {
            report("stack.compose_files", format!("{file:?} must be a path inside the checkout, without \"..\""));
        }
    }
    if !valid_project(&stack.project) {
        report(
            "stack.project",
            format!("{:?} is not a valid Compose project name: use lowercase letters, digits, '-' and '_', starting with a letter or digit", stack.project),
        );
    }
    for (key, value) in [
        ("stack.poll_interval", stack.poll_interval),
        ("stack.git_timeout", stack.git_timeout),
        ("stack.compose_timeout", stack.compose_timeout),
        ("stack.pull_timeout", stack.pull_timeout),
        ("stack.retry_backoff_min", stack.retry_backoff_min),
        ("stack.factory_reset_timeout", stack.factory_reset_timeout),
    ] {
        if value.is_zero() {
            report(key, "must be longer than zero".into());
        }
    }
    if stack.poll_jitter_percent > 50 {
        report("stack.poll_jitter_percent", format!("{} is above the maximum of 50", stack.poll_jitter_percent));
    }
    if let Err(apply_problems) = stack.apply.policy() {
        for (key, message) in apply_problems {
            report(&format!("stack.apply.{key}"), message);
        }
    }
    if stack.retry_backoff_max < stack.retry_backoff_min {
        report("stack.retry_backoff_max", "must not be shorter than stack.retry_backoff_min".into());
    }
}

fn check_host(host: &HostConfig, report: &mut impl FnMut(&str, String)) {
    if host.interval < Duration::from_secs(60) {
        report("host.interval", "must be at least one minute".into());
    }
    if host.apply.policy == Some(PolicyKind::OnBoot) {
        report("host.apply.policy", "on-boot does not apply to host patching: use immediate or window".into());
    }
    if let Err(apply_problems) = host.apply.policy() {
        for (key, message) in apply_problems {
            report(&format!("host.apply.{key}"), message);
        }
    }
    if host.address.trim().is_empty() || host.address.contains(char::is_whitespace) {
        report("host.address", format!("{:?} is not a host name or IP address", host.address));
    }
    if host.port == 0 {
        report("host.port", "must be a TCP port from 1 to 65535".into());
    }
    if host.user.is_empty() || !host.user.chars().all(|character| character.is_ascii_alphanumeric() || "._-".contains(character)) {
        report("host.user", format!("{:?} is not a user name: use letters, digits, '.', '_' and '-'", host.user));
    }
    if !host.key_file.is_absolute() {
        report("host.key_file", format!("{} must be an absolute path", host.key_file.display()));
    }
    if let Err(reason) = crate::driver::ssh::PinnedHostKey::parse(&host.host_key) {
        report("host.host_key", reason);
    }
    for (key, value) in [
        ("host.connect_timeout", host.connect_timeout),
        ("host.command_timeout", host.command_timeout),
        ("host.update_lists_timeout", host.update_lists_timeout),
        ("host.upgrade_timeout", host.upgrade_timeout),
        ("host.repair_timeout", host.repair_timeout),
        ("host.boot_timeout", host.boot_timeout),
        ("host.job_poll_interval", host.job_poll_interval),
    ] {
        if value.is_zero() {
            report(key, "must be longer than zero".into());
        }
    }
    let safe_path = host.job_directory.starts_with('/')
        && host.job_directory.len() > 1
        && host.job_directory.chars().all(|character| character.is_ascii_alphanumeric() || "/._-".contains(character))
        && !host.job_directory.split('/').any(|part| part == "..");
    if !safe_path {
        report("host.job_directory", format!("{:?} must be an absolute path of letters, digits, '/', '.', '_' and '-', without \"..\"", host.job_directory));
    }
    for (key, command) in [
        ("host.boot_id_command", &host.boot_id_command),
        ("host.kernel_release_command", &host.kernel_release_command),
        ("host.installed_kernels_command", &host.installed_kernels_command),
        ("host.reboot_command", &host.reboot_command),
    ] {
        if command.trim().is_empty() {
            report(key, "must be a shell command".into());
        }
    }
}

struct Sections<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Sections<'_> {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem { key: key.to_string(), line: line_of_key(self.text, key), message: message.into() });
    }

    fn required<T: DeserializeOwned>(&mut self, table: &mut toml::Table, name: &str) -> Option<T> {
        if !table.contains_key(name) {
            self.problem(name, format!("missing section [{name}]"));
            return None;
        }
        self.optional(table, name)
    }

    /// Parses a section that may be missing unless `required`. Returns
    /// `Some(None)` for a missing section and `None` after a problem.
    fn present<T: DeserializeOwned>(&mut self, table: &mut toml::Table, name: &str, required: bool) -> Option<Option<T>> {
        if !table.contains_key(name) && !required {
            return Some(None);
        }
        self.required(table, name).map(Some)
    }

    /// Reads an array of tables (`[[name]]`), each entry on its own, so that a
    /// problem names the entry as `name[index].key` with its line.
    fn array<T: DeserializeOwned>(&mut self, table: &mut toml::Table, name: &str) -> Option<Vec<T>> {
        let Some(value) = table.remove(name) else { return Some(Vec::new()) };
        let toml::Value::Array(items) = value else {
            self.problem(name, format!("must be an array of tables: write each entry as [[{name}]]"));
            return None;
        };

        let mut entries = Vec::new();
        let mut failed = false;
        for (index, item) in items.into_iter().enumerate() {
            let result = serde_path_to_error::deserialize::<_, T>(item);
            match result {
                Ok(entry) => entries.push(entry),
                Err(error) => {
                    failed = true;
                    let path = error.path().to_string();
                    let field = if path == "." { String::new() } else { path };
                    let message = error.into_inner().to_string();
                    let field = match (field.is_empty(), message.strip_prefix("unknown field `")) {
                        (true, Some(rest)) => rest.split('`').next().unwrap_or_default().to_string(),
                        _ => field,
                    };
                    let line = trust::line_of_array_key(self.text, name, index, &field);
                    let key = if field.is_empty() { format!("{name}[{index}]") } else { format!("{name}[{index}].{field}") };
                    let message = match message.strip_prefix("unknown field ") {
                        Some(rest) => format!("unknown key {rest}"),
                        None => plain_words(&message),
                    };
                    self.problems.push(Problem { key, line, message });
                }
            }
        }
        if failed { None } else { Some(entries) }
    }

    /// Parses a section that may be missing. A key with a wrong value is
    /// reported, left out, and the section parsed again, so one run reports
    /// every such key. The section is returned with the left-out keys at
    /// their defaults, so later checks can still look at the rest of it.
    /// Its problems still keep the configuration from being accepted.
    fn optional<T: DeserializeOwned>(&mut self, table: &mut toml::Table, name: &str) -> Option<T> {
        let mut value = table.remove(name).unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
        if !value.is_table() {
            self.problem(name, format!("must be a table: write it as [{name}]"));
            return None;
        }

        // Each pass leaves out one key, so the passes end. A pass stops at
        // its first wrong value, so each pass looks for unknown keys again.
        let mut unknown_reported: Vec<String> = Vec::new();
        loop {
            let mut unknown = Vec::new();
            // serde_ignored writes `?` for the `Some` of an optional table; the key has no such part.
            let mut collect = |path: serde_ignored::Path<'_>| unknown.push(path.to_string().replace(".?.", "."));
            let ignoring = serde_ignored::Deserializer::new(value.clone(), &mut collect);
            let result = serde_path_to_error::deserialize::<_, T>(ignoring);
            for key in unknown {
                if !unknown_reported.contains(&key) {
                    self.problem(&format!("{name}.{key}"), unknown_key_message::<T>(&key));
                    unknown_reported.push(key);
                }
            }

            let error = match result {
                Ok(section) => return Some(section),
                Err(error) => error,
            };
            let path = error.path().to_string();
            let key = if path == "." || path.is_empty() { name.to_string() } else { format!("{name}.{path}") };
            let message = error.into_inner().to_string();
            // toml ends the message with "\nin `key`", which the problem names already.
            let message = message.split("\nin `").next().unwrap_or_default().to_string();
            let message = match message.strip_prefix("unknown field ") {
                Some(rest) => format!("unknown key {rest}"),
                None => plain_words(&message),
            };
            self.problem(&key, message);
            if key == name || !remove_dotted(&mut value, &path) {
                return None;
            }
        }
    }
}

/// Describes an unknown key of a section parsed as `T`: the nearest known
/// key when one is close, otherwise every key of the section. Keys of nested
/// tables get the README's key tables instead.
fn unknown_key_message<T: DeserializeOwned>(key: &str) -> String {
    let known = field_names::<T>();
    if key.contains('.') || known.is_empty() {
        return "unknown key; check its spelling against the key tables in README.md".to_string();
    }
    let nearest = known.iter().map(|name| (strsim::damerau_levenshtein(key, name), *name)).min();
    match nearest {
        Some((distance, name)) if distance <= 2 => format!("unknown key; did you mean {name}?"),
        _ => format!("unknown key; the keys of this section are {}", known.join(", ")),
    }
}

/// Returns the field names a derived `Deserialize` of `T` accepts, read
/// from its call to `deserialize_struct`, or none when `T` is not a struct.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Recorder<'a>(&'a mut &'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for Recorder<'_> {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("fields recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit unit_struct
            newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Recorder(&mut fields));
    fields
}

/// Sorts problems by line, keeping the order of those on one line. Problems
/// without a line come last.
fn in_line_order(mut problems: Vec<Problem>) -> Vec<Problem> {
    problems.sort_by_key(|problem| problem.line.unwrap_or(usize::MAX));
    problems
}

/// Rewrites serde's wording for a value of the wrong type or a missing key
/// in the words of a configuration file.
fn plain_words(message: &str) -> String {
    let mut message = message.trim().to_string();
    let ranges = [
        ("u8", "a whole number from 0 to 255"),
        ("u16", "a whole number from 0 to 65535"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u64", "a whole number from 0 to 18446744073709551615"),
        ("usize", "a whole number of 0 or more"),
        ("i64", "a whole number"),
        ("f64", "a number"),
    ];
    for (rust, words) in ranges {
        if let Some(start) = message.strip_suffix(&format!("expected {rust}")) {
            message = format!("{start}expected {words}");
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`');
        message = format!("missing required key {field}");
    }
    message
}

/// Removes the key at the dotted `path` (as serde_path_to_error writes it)
/// from a table. Returns false when there is no such key.
fn remove_dotted(value: &mut toml::Value, path: &str) -> bool {
    let parts: Vec<&str> = path.split('.').filter(|part| *part != "?").collect();
    let Some((last, parents)) = parts.split_last() else { return false };
    let mut current = value;
    for part in parents {
        current = match current {
            toml::Value::Table(table) => match table.get_mut(*part) {
                Some(next) => next,
                None => return false,
            },
            toml::Value::Array(items) => match part.parse::<usize>().ok().and_then(|index| items.get_mut(index)) {
                Some(next) => next,
                None => return false,
            },
            _ => return false,
        };
    }
    match current {
        toml::Value::Table(table) => table.remove(*last).is_some(),
        _ => false,
    }
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Finds the line of a dotted key: its `key = ...` line inside its table, or
/// the table's header for a section. Returns `None` for a key not written in
/// the file, such as a missing one.
pub fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut current: Vec<String> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_start_matches('[');
            let name = header.split(']').next().unwrap_or_default();
            current = name.split('.').map(|part| part.trim().trim_matches('"').to_string()).collect();
            if current == parts {
                return Some(index + 1);
            }
            continue;
        }
        let Some((name, _)) = line.split_once('=') else { continue };
        let mut full = current.clone();
        full.extend(name.trim().split('.').map(|part| part.trim().trim_matches('"').to_string()));
        if full == parts {
            return Some(index + 1);
        }
    }
    None
}

fn valid_branch(branch: &str) -> bool {
    !branch.is_empty()
        && !branch.starts_with('-')
        && !branch.starts_with('/')
        && !branch.ends_with('/')
        && !branch.ends_with(".lock")
        && !branch.contains("..")
        && !branch.contains("@{")
        && !branch.chars().any(|character| character.is_control() || " ~^:?*[\\".contains(character))
}

fn valid_project(project: &str) -> bool {
    let mut characters = project.chars();
    let first_valid = characters.next().is_some_and(|first| first.is_ascii_lowercase() || first.is_ascii_digit());
    first_valid && characters.all(|character| character.is_ascii_lowercase() || character.is_ascii_digit() || character == '-' || character == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[journal]
directory = "/var/lib/eventpi/journal"

[stack]
repository = "git://127.0.0.1/stack.git"
branch = "device-0001"
checkout = "/srv/eventpi/stack"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::parse(MINIMAL).unwrap();

        assert_eq!(config.stack.as_ref().unwrap().poll_interval, Duration::from_secs(60));
        assert_eq!(config.stack.as_ref().unwrap().compose_files, vec!["compose.yaml".to_string()]);
        assert_eq!(config.stack.as_ref().unwrap().apply.policy, None);
        assert_eq!(config.stack.as_ref().unwrap().apply.policy().unwrap().timing, crate::policy::Timing::Immediate);
        assert_eq!(config.state_directory(), PathBuf::from("/var/lib/eventpi/state"));
    }

    #[test]
    fn panel_defaults_and_factory_directory() {
        let config = Config::parse(MINIMAL).unwrap();

        assert_eq!(config.panel.button_settings(), crate::panel::button::ButtonSettings::default());
        assert_eq!(config.factory_directory(), PathBuf::from("/var/lib/eventpi/factory"));
    }

    #[test]
    fn button_times_without_room_are_rejected() {
        let text = format!("{MINIMAL}\n[panel]\nlong_hold = \"1s\"\ncancel_after = \"2s\"\nfactory_directory = \"factory\"\n");

        let problems = Config::parse(&text).unwrap_err();
        let find = |key: &str| problems.iter().find(|problem| problem.key == key).unwrap_or_else(|| panic!("no problem for {key}: {problems:?}"));

        assert!(find("panel.long_hold").message.contains("1s"), "{}", find("panel.long_hold").message);
        assert!(find("panel.cancel_after").message.contains("2s"), "{}", find("panel.cancel_after").message);
        assert!(find("panel.factory_directory").message.contains("absolute"), "{}", find("panel.factory_directory").message);
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn bare_number_duration_is_rejected() {
        let text = MINIMAL.replace("checkout =", "poll_interval = 60\ncheckout =");

        let problems = Config::parse(&text).unwrap_err();

        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "stack.poll_interval");
        assert_eq!(problems[0].line, Some(8));
        assert!(problems[0].message.contains("with its unit"), "{}", problems[0].message);
        assert!(!problems[0].message.contains('\n'), "the key is named once: {}", problems[0].message);
    }

    #[test]
    fn every_problem_is_reported() {
        let text = format!("{MINIMAL}\nsurprise = 1\n[panel]\nled_pin = 5\ncolour = \"red\"\n[agent]\nlog_format = \"fancy\"\n");

        let problems = Config::parse(&text).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|problem| problem.key.as_str()).collect();

        assert!(keys.contains(&"stack.surprise"), "{keys:?}");
        assert!(keys.contains(&"panel.colour"), "{keys:?}");
        assert!(keys.contains(&"agent.log_format"), "{keys:?}");
    }

    #[test]
    fn unknown_key_has_its_line() {
        let text = MINIMAL.replace("branch =", "brnach = \"x\"\nbranch =");

        let problems = Config::parse(&text).unwrap_err();

        assert_eq!(problems[0].key, "stack.brnach");
        assert_eq!(problems[0].line, Some(7));
    }

    #[test]
    fn syntax_error_has_its_line() {
        let problems = Config::parse("[journal\ndirectory = 1\n").unwrap_err();

        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, Some(1));
    }

    #[test]
    fn missing_sections_are_named() {
        let problems = Config::parse("").unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|problem| problem.key.as_str()).collect();

        assert_eq!(keys, vec!["journal", "stack"]);
    }

    #[test]
    fn semantic_problems_are_all_listed() {
        let text =
            MINIMAL.replace("device-0001", "bad..branch").replace("/srv/eventpi/stack", "relative/path").replace("[stack]", "[stack]\nproject = \"Bad Name\"");

        let problems = Config::parse(&text).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|problem| problem.key.as_str()).collect();

        assert_eq!(keys, vec!["stack.project", "stack.branch", "stack.checkout"]);
    }

    #[test]
    fn gpio_backend_warns_without_feature() {
        let text = format!("{MINIMAL}\n[panel]\nbackend = \"gpio\"\n");

        let config = Config::parse(&text).unwrap();
        let warning = config.warnings.iter().find(|warning| warning.key == "panel.backend");

        if cfg!(feature = "gpio") {
            assert!(warning.is_none(), "{:?}", config.warnings);
        } else {
            let warning = warning.expect("a warning for panel.backend");
            assert_eq!(warning.line, Some(11));
            assert!(warning.message.contains("cargo feature gpio"), "{}", warning.message);
        }
    }

    #[test]
    fn type_and_semantic_problems_in_one_run() {
        let text = MINIMAL
            .replace("device-0001", "bad..branch")
            .replace("[stack]", "[stack]\npoll_interval = 2\nprobation = \"soon\"\nmax_resumes = \"three\"\nprobaton = \"1m\"")
            .replace("[journal]", "[journal]\nsize_kib = \"big\"");

        let problems = Config::parse(&text).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|problem| problem.key.as_str()).collect();

        assert!(keys.contains(&"journal.size_kib"), "{problems:?}");
        assert!(keys.contains(&"stack.poll_interval"), "{problems:?}");
        assert!(keys.contains(&"stack.probation"), "{problems:?}");
        assert!(keys.contains(&"stack.max_resumes"), "{problems:?}");
        assert!(keys.contains(&"stack.probaton"), "{problems:?}");
        assert!(keys.contains(&"stack.branch"), "the semantic check runs too: {problems:?}");
        assert_eq!(keys.len(), 6, "each key once: {problems:?}");
        let interval = problems.iter().find(|problem| problem.key == "stack.poll_interval").unwrap();
        assert_eq!(interval.line, Some(7), "{interval:?}");
    }

    const HOST: &str = r#"
[journal]
directory = "/var/lib/eventpi/journal"

[host]
address = "host.docker.internal"
key_file = "/etc/eventpi/host_ed25519"
host_key = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
"#;

    #[test]
    fn host_section_gets_defaults_without_stack() {
        let config = HostPatchConfig::parse(HOST).unwrap();

        assert_eq!(config.host.port, 22);
        assert_eq!(config.host.user, "root");
        assert_eq!(config.host.max_reboots, 1);
        assert_eq!(config.host.dpkg_lock_wait, Duration::from_secs(600));
        assert_eq!(config.host.boot_id_command, "cat /proc/sys/kernel/random/boot_id");
    }

    #[test]
    fn agent_config_keeps_host_section() {
        let text = format!("{MINIMAL}{}", HOST.replace("[journal]\ndirectory = \"/var/lib/eventpi/journal\"\n", ""));

        let config = Config::parse(&text).unwrap();

        assert_eq!(config.host.map(|host| host.address), Some("host.docker.internal".to_string()));
    }

    #[test]
    fn host_patch_needs_host_section() {
        let problems = HostPatchConfig::parse(MINIMAL).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|problem| problem.key.as_str()).collect();

        assert_eq!(keys, vec!["host"]);
    }

    #[test]
    fn host_problems_have_key_and_line() {
        let text = HOST
            .replace("SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "not-a-key")
            .replace("/etc/eventpi/host_ed25519", "relative/key")
            .replace("[host]", "[host]\nupgrade_timeout = \"0s\"\njob_directory = \"/tmp/x y\"");

        let problems = HostPatchConfig::parse(&text).unwrap_err();
        let found: Vec<(&str, Option<usize>)> = problems.iter().map(|problem| (problem.key.as_str(), problem.line)).collect();

        assert_eq!(found, vec![("host.upgrade_timeout", Some(6)), ("host.job_directory", Some(7)), ("host.key_file", Some(9)), ("host.host_key", Some(10))]);
    }

    #[test]
    fn known_hosts_line_is_a_valid_pin() {
        let line = "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
        let text = HOST.replace("SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", line);

        assert!(HostPatchConfig::parse(&text).is_ok());
    }

    #[test]
    fn window_policy_is_read() {
        let text = format!(
            "{MINIMAL}\n[stack.apply]\npolicy = \"window\"\nwindows = [\"02:00-04:00 Europe/Warsaw\"]\nlock_files = [\"/srv/shared/update.lock\"]\nlock_label = \"eventpi.update-lock\"\nmax_deferral = \"6h\"\n"
        );

        let config = Config::parse(&text).unwrap();
        let policy = config.stack.as_ref().unwrap().apply.policy().unwrap();

        assert!(matches!(&policy.timing, crate::policy::Timing::Windows(windows) if windows.len() == 1));
        assert_eq!(policy.max_deferral, Duration::from_secs(6 * 3600));
        assert_eq!(config.stack.as_ref().unwrap().apply.lock_label.as_deref(), Some("eventpi.update-lock"));
        assert!(config.warnings.is_empty());
    }

    #[test]
    fn problem_messages_name_the_fix() {
        // Each case: the configuration text, the key reported and its message.
        let cases = [
            (format!("{MINIMAL}poll_intervall = \"1s\"\n"), "stack.poll_intervall", "unknown key; did you mean poll_interval?"),
            (MINIMAL.replace("[journal]", "[journal]\nsurprise = 1"), "journal.surprise", "unknown key; the keys of this section are directory, size_kib"),
            (MINIMAL.replace("branch = \"device-0001\"\n", ""), "stack", "missing required key branch"),
            (
                MINIMAL.replace("checkout =", "max_resumes = \"five\"\ncheckout ="),
                "stack.max_resumes",
                "invalid type: string \"five\", expected a whole number from 0 to 4294967295",
            ),
        ];

        for (text, key, message) in cases {
            let problems = Config::parse(&text).unwrap_err();

            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].key, key);
            assert_eq!(problems[0].message, message);
        }
    }

    #[test]
    fn duplicate_key_is_named() {
        let text = MINIMAL.replace("checkout =", "branch = \"device-0002\"\ncheckout =");

        let problems = Config::parse(&text).unwrap_err();

        assert!(problems[0].message.starts_with("duplicate key branch"), "{}", problems[0].message);
        assert_eq!(problems[0].line, Some(8));
    }

    #[test]
    fn problems_are_in_line_order() {
        let text = format!("{}poll_interval = 60\nbogus = 1\n", MINIMAL.replace("directory = ", "size_kib = 1\ndirectory = "));

        let problems = Config::parse(&text).unwrap_err();

        let lines: Vec<Option<usize>> = problems.iter().map(|problem| problem.line).collect();
        let mut sorted = lines.clone();
        sorted.sort_by_key(|line| line.unwrap_or(usize::MAX));
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(lines, sorted);
    }

    #[test]
    fn warning_is_kept_beside_problems() {
        let text = format!("{}bogus = 1\n", MINIMAL.replace("checkout =", "apply_policy = \"on-boot\"\ncheckout ="));

        let problems = Config::parse(&text).unwrap_err();

        assert!(problems.iter().any(|problem| problem.key == "stack.bogus"), "{problems:?}");
        assert!(problems.iter().any(|problem| problem.key == "stack.apply_policy" && problem.message.starts_with("(warning)")), "{problems:?}");
    }

    #[test]
    fn former_apply_policy_key_is_migrated() {
        let text = MINIMAL.replace("checkout =", "apply_policy = \"on-boot\"\ncheckout =");

        let config = Config::parse(&text).unwrap();

        assert_eq!(config.stack.as_ref().unwrap().apply.policy, Some(PolicyKind::OnBoot));
        assert_eq!(config.stack.as_ref().unwrap().apply_policy, None);
        assert_eq!(config.warnings.len(), 1);
        assert_eq!(config.warnings[0].key, "stack.apply_policy");
        assert_eq!(config.warnings[0].line, Some(8));
    }

    #[test]
    fn former_and_current_policy_conflict() {
        let text = format!("{}\n[stack.apply]\npolicy = \"immediate\"\n", MINIMAL.replace("checkout =", "apply_policy = \"on-boot\"\ncheckout ="));

        let problems = Config::parse(&text).unwrap_err();

        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "stack.apply_policy");
    }

    #[test]
    fn apply_problems_have_keys_and_lines() {
        let text = format!(
            "{MINIMAL}\n[stack.apply]\npolicy = \"window\"\nwindows = [\"02:00-04:00 Mars/Olympus\"]\nlock_files = [\"relative.lock\"]\nmax_deferral = \"0s\"\n"
        );

        let problems = Config::parse(&text).unwrap_err();
        let found: Vec<(&str, Option<usize>)> = problems.iter().map(|problem| (problem.key.as_str(), problem.line)).collect();

        assert_eq!(found, vec![("stack.apply.windows", Some(12)), ("stack.apply.lock_files", Some(13)), ("stack.apply.max_deferral", Some(14))]);
        assert!(problems[0].message.contains("Mars/Olympus"), "{}", problems[0].message);
    }

    #[test]
    fn window_policy_without_windows_is_rejected() {
        let text = format!("{MINIMAL}\n[stack.apply]\npolicy = \"window\"\n");

        let problems = Config::parse(&text).unwrap_err();

        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "stack.apply.windows");
    }

    #[test]
    fn space_section_is_read() {
        let text = format!(
            "{MINIMAL}\n[space]\ninterval = \"10s\"\n[space.recordings]\npath = \"/srv/recordings\"\nstop_below_percent = 12.5\n[space.recorder]\nservice = \"recorder\"\n"
        );

        let config = Config::parse(&text).unwrap();

        let recordings = config.space.recordings.as_ref().unwrap();
        assert_eq!(config.space.interval, Duration::from_secs(10));
        assert_eq!(recordings.marks(crate::machine::space::Role::Recordings).stop_below_percent, 12.5);
        assert_eq!(recordings.marks(crate::machine::space::Role::Recordings).resume_above_percent, 20.0);
        assert_eq!(config.space.recorder.as_ref().and_then(|recorder| recorder.service.as_deref()), Some("recorder"));
    }

    #[test]
    fn space_problems_have_keys_and_lines() {
        let text = format!(
            "{MINIMAL}\n[space]\npull_size_factor = 0.5\n[space.docker]\npath = \"relative\"\nstop_below_percent = 30\nresume_above_percent = 20\nsize = 3\n[space.recorder]\ncontainer = \"rec\"\nservice = \"rec\"\n"
        );

        let problems = Config::parse(&text).unwrap_err();
        let found: Vec<(&str, Option<usize>)> = problems.iter().map(|problem| (problem.key.as_str(), problem.line)).collect();

        assert_eq!(
            found,
            vec![
                ("space.pull_size_factor", Some(11)),
                ("space.docker.path", Some(13)),
                ("space.docker.resume_above_percent", Some(15)),
                ("space.docker.size", Some(16)),
                ("space.recorder", Some(17)),
                ("space.recorder", Some(17)),
            ],
            "the unknown key and the values that cannot work, in one run"
        );
        let fixed = text.replace("size = 3\n", "");
        let problems = Config::parse(&fixed).unwrap_err();
        let found: Vec<(&str, Option<usize>)> = problems.iter().map(|problem| (problem.key.as_str(), problem.line)).collect();
        assert_eq!(
            found,
            vec![
                ("space.pull_size_factor", Some(11)),
                ("space.docker.path", Some(13)),
                ("space.docker.resume_above_percent", Some(15)),
                ("space.recorder", Some(16)),
                ("space.recorder", Some(16)),
            ]
        );
    }

    #[test]
    fn self_update_alone_is_enough_for_run() {
        let text = "[journal]\ndirectory = \"/var/lib/eventpi/journal\"\n\n[self_update]\nnetwork = \"eventpi-agent\"\n";

        let config = Config::parse(text).unwrap();

        assert_eq!(config.stack, None);
        assert_eq!(config.self_update.map(|section| section.handover_port), Some(8750));
    }

    #[test]
    fn self_update_unknown_key_is_named() {
        let text = format!("{MINIMAL}\n[self_update]\nprobation = \"5m\"\nconfirm_timeout = \"1m\"\nsurprise = 1\n");

        let problems = Config::parse(&text).unwrap_err();
        let found: Vec<(&str, Option<usize>)> = problems.iter().map(|problem| (problem.key.as_str(), problem.line)).collect();

        assert_eq!(found, vec![("self_update.confirm_timeout", Some(12)), ("self_update.surprise", Some(13))]);
    }

    #[test]
    fn confirm_timeout_problem_has_its_line() {
        let text = format!("{MINIMAL}\n[self_update]\nprobation = \"5m\"\nconfirm_timeout = \"1m\"\n");

        let problems = Config::parse(&text).unwrap_err();

        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "self_update.confirm_timeout");
        assert_eq!(problems[0].line, Some(12));
    }

    #[test]
    fn clock_file_must_be_absolute() {
        let text = format!("{MINIMAL}\n[seams]\nclock_file = \"clock.txt\"\n");

        let problems = Config::parse(&text).unwrap_err();

        assert_eq!(problems[0].key, "seams.clock_file");
    }
}
