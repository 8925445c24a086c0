//! The host-patch machine: connect to the Docker host over SSH, check that
//! dpkg can run, refresh the package lists, upgrade, reboot when the host needs
//! it, and check that the host came back on the new boot and kernel.
//!
//! The machine is pure. Its memory ([`HostMemory`]) is persisted in the journal
//! with every transition, and the commands it queues ([`HostCommand`]) run
//! only after that record is synced. The long steps run as jobs detached on
//! the host, and the memory keeps the job's id so that a restarted agent attaches
//! to the same job instead of starting a second one.
//!
//! Reboots are bounded twice: at most `max_reboots` per attempt, counted when
//! `Rebooting` is entered (so before the reboot command runs), and never for a
//! kernel that a reboot already failed to activate.

use serde::{Deserialize, Serialize};

use crate::kernel;
use crate::machine::MachineKind;
use crate::model::{Failure, FailureKind};

crate::define_machine! {
    machine: MachineKind::HostPatch,
    smlang: Host, HostStates, HostEvents,
    states: HostState {
        Idle = 1,
        Connecting = 2,
        Preflight = 3,
        UpdatingLists = 4,
        Upgrading = 5,
        RebootPending = 6,
        Rebooting = 7,
        VerifyingBoot = 8,
        Done = 9,
        Failed = 10,
    },
    events: HostEvent {
        Start = 1,
        Resumed = 2,
        Connected = 3,
        Unreachable = 4,
        HostKeyRejected = 5,
        CommandFailed = 6,
        PreflightPassed = 7,
        RepairNeeded = 8,
        DpkgBusy = 9,
        JobFinished = 10,
        RebootRequired = 11,
        RebootNotRequired = 12,
        RebootIssued = 13,
        BootVerified = 14,
    },
    table: HOST_TABLE,
    transitions: {
        Idle + Start / start_attempt = Connecting,
        Idle + Resumed = Idle,

        Connecting + Connected / start_preflight = Preflight,
        Connecting + Unreachable(Failure) / fail_attempt = Failed,
        Connecting + HostKeyRejected(Failure) / reject_host_key = Failed,
        Connecting + CommandFailed(Failure) / fail_attempt = Failed,
        Connecting + Resumed [can_resume] / reconnect = Connecting,
        Connecting + Resumed / give_up_after_restarts = Failed,

        Preflight + PreflightPassed / start_update_lists = UpdatingLists,
        Preflight + RepairNeeded(Interruption) [can_repair] / start_repair = Preflight,
        Preflight + RepairNeeded(Interruption) / upgrade_after_repair = UpdatingLists,
        Preflight + JobFinished(JobReport) [job_succeeded] / recheck_after_repair = Preflight,
        Preflight + JobFinished(JobReport) / fail_job = Failed,
        Preflight + DpkgBusy(Failure) / report_busy = Failed,
        Preflight + Unreachable(Failure) / fail_attempt = Failed,
        Preflight + HostKeyRejected(Failure) / reject_host_key = Failed,
        Preflight + CommandFailed(Failure) / fail_attempt = Failed,
        Preflight + Resumed [can_resume] / repeat_preflight = Preflight,
        Preflight + Resumed / give_up_after_restarts = Failed,

        UpdatingLists + JobFinished(JobReport) [job_succeeded] / start_upgrade = Upgrading,
        UpdatingLists + JobFinished(JobReport) / fail_job = Failed,
        UpdatingLists + Unreachable(Failure) / fail_attempt = Failed,
        UpdatingLists + HostKeyRejected(Failure) / reject_host_key = Failed,
        UpdatingLists + CommandFailed(Failure) / fail_attempt = Failed,
        UpdatingLists + Resumed [can_resume] / reattach_job = UpdatingLists,
        UpdatingLists + Resumed / give_up_after_restarts = Failed,

        Upgrading + JobFinished(JobReport) [job_succeeded] / check_reboot = RebootPending,
        Upgrading + JobFinished(JobReport) / fail_job = Failed,
        Upgrading + Unreachable(Failure) / fail_attempt = Failed,
        Upgrading + HostKeyRejected(Failure) / reject_host_key = Failed,
        Upgrading + CommandFailed(Failure) / fail_attempt = Failed,
        Upgrading + Resumed [can_resume] / reattach_job = Upgrading,
        Upgrading + Resumed / give_up_after_restarts = Failed,

        RebootPending + RebootRequired(RebootCheck) [may_reboot] / start_reboot = Rebooting,
        RebootPending + RebootRequired(RebootCheck) / reject_reboot = Failed,
        RebootPending + RebootNotRequired / finish = Done,
        RebootPending + Unreachable(Failure) / fail_attempt = Failed,
        RebootPending + HostKeyRejected(Failure) / reject_host_key = Failed,
        RebootPending + CommandFailed(Failure) / fail_attempt = Failed,
        RebootPending + Resumed [can_resume] / repeat_reboot_check = RebootPending,
        RebootPending + Resumed / give_up_after_restarts = Failed,

        Rebooting + RebootIssued / await_boot = VerifyingBoot,
        Rebooting + Unreachable(Failure) / fail_around_reboot = Failed,
        Rebooting + HostKeyRejected(Failure) / reject_host_key = Failed,
        Rebooting + CommandFailed(Failure) / fail_around_reboot = Failed,
        Rebooting + Resumed [can_resume] / repeat_reboot = Rebooting,
        Rebooting + Resumed / give_up_after_restarts = Failed,

        VerifyingBoot + BootVerified(BootReport) [kernel_activated] / check_reboot_after_boot = RebootPending,
        VerifyingBoot + BootVerified(BootReport) / record_kernel_not_activated = Failed,
        VerifyingBoot + Unreachable(Failure) / fail_after_reboot = Failed,
        VerifyingBoot + HostKeyRejected(Failure) / reject_host_key = Failed,
        VerifyingBoot + CommandFailed(Failure) / fail_after_reboot = Failed,
        VerifyingBoot + Resumed [can_resume] / repeat_boot_wait = VerifyingBoot,
        VerifyingBoot + Resumed / give_up_after_restarts = Failed,

        Done + Start / start_attempt = Connecting,
        Done + Resumed = Done,

        Failed + Start / start_attempt = Connecting,
        Failed + Resumed = Failed,
    }
}

/// Kind of job run on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    /// `dpkg --configure -a` after an interrupted dpkg run.
    Repair,
    /// `apt-get update`.
    UpdateLists,
    /// `apt-get full-upgrade`, keeping local configuration files.
    Upgrade,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Repair => "repair",
            JobKind::UpdateLists => "update-lists",
            JobKind::Upgrade => "upgrade",
        }
    }
}

/// A job detached on the host, named before it starts so that a restarted
/// agent finds it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostJob {
    /// Unique on the host. It also names the job's systemd unit and directory.
    pub id: String,
    pub kind: JobKind,
}

/// End state of a job on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    Succeeded,
    /// The job's command exited with this status.
    Failed {
        exit_code: i32,
    },
    /// The job is neither running nor finished: the host rebooted or someone
    /// killed it.
    Lost,
    /// The job ran longer than its timeout. It is left running, because
    /// killing dpkg mid-unpack breaks the host.
    TimedOut {
        seconds: u64,
    },
}

/// The outcome of a job as the driver read it from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    pub job: HostJob,
    pub status: JobStatus,
    /// The last lines of the job's output.
    pub output_tail: String,
}

impl JobReport {
    /// Describes a job that did not succeed, with its last output lines.
    pub fn describe(&self) -> String {
        let what = match &self.status {
            JobStatus::Succeeded => "succeeded".to_string(),
            JobStatus::Failed { exit_code } => format!("failed with exit status {exit_code}"),
            JobStatus::Lost => "stopped without an exit status (the host rebooted or the job was killed)".to_string(),
            JobStatus::TimedOut { seconds } => format!("is still running after {seconds} s; it was left running"),
        };
        let tail = crate::driver::process::last_lines(&self.output_tail, 4);
        if tail.is_empty() {
            format!("{} job {} {what}", self.job.kind.name(), self.job.id)
        } else {
            format!("{} job {} {what}: {tail}", self.job.kind.name(), self.job.id)
        }
    }
}

/// Reason dpkg needs a repair, as the preflight check found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interruption {
    /// For example "dpkg --audit lists blocker".
    pub description: String,
}

/// The running kernel and the kernels installed on the host.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KernelReport {
    /// The running kernel's release, as `uname -r` prints it.
    pub running: String,
    /// Releases of the installed kernels, one per `/lib/modules` directory.
    pub installed: Vec<String>,
}

impl KernelReport {
    /// Returns the newest installed kernel of the running kernel's flavour.
    pub fn newest(&self) -> Option<&str> {
        kernel::newest_of_flavour(&self.running, &self.installed)
    }

    /// Tells whether the running kernel is the newest installed one of its
    /// flavour. With no installed kernel of that flavour there is nothing
    /// newer to boot, so it counts as the newest.
    pub fn runs_newest(&self) -> bool {
        self.newest().is_none_or(|newest| kernel::compare(&self.running, newest) != std::cmp::Ordering::Less)
    }
}

/// Result of the reboot check: boot id, kernels and reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootCheck {
    /// The boot id before the reboot.
    pub boot_id: String,
    pub kernels: KernelReport,
    /// Reasons for the reboot, for example the packages listed in
    /// `/run/reboot-required.pkgs`.
    pub reasons: Vec<String>,
}

/// Boot id and kernels that the host reported after the reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReport {
    pub boot_id: String,
    pub kernels: KernelReport,
}

/// One run of the patch cycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAttempt {
    /// Counts attempts over the life of the device, starting at 1.
    pub number: u32,
    /// Agent restarts during this attempt.
    pub resumes: u32,
    /// Reboots started during this attempt, counted before the reboot command.
    pub reboots: u32,
    /// Whether this attempt already ran the repair job.
    pub repaired: bool,
    /// The job of the current step, persisted before it starts.
    pub job: Option<HostJob>,
    /// The boot id before the reboot in progress.
    pub boot_before_reboot: Option<String>,
    /// The kernel the reboot in progress is expected to start.
    pub expected_kernel: Option<String>,
}

/// Result of the last attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostOutcome {
    /// Packages are up to date and the host runs its newest kernel.
    Patched {
        reboots: u32,
    },
    /// Another process held the dpkg lock for the whole wait.
    Busy {
        reason: String,
    },
    /// The host offered a key other than the pinned one, so nothing was run.
    HostKeyRejected {
        reason: String,
    },
    /// The host rebooted but still runs its old kernel.
    KernelNotActivated {
        running: String,
        expected: String,
    },
    Failed {
        reason: String,
    },
}

impl HostOutcome {
    pub fn describe(&self) -> String {
        match self {
            HostOutcome::Patched { reboots: 0 } => "patched, no reboot needed".to_string(),
            HostOutcome::Patched { reboots } => format!("patched with {reboots} reboot(s)"),
            HostOutcome::Busy { reason } => format!("busy: {reason}"),
            HostOutcome::HostKeyRejected { reason } => format!("host key rejected: {reason}"),
            HostOutcome::KernelNotActivated { running, expected } => {
                format!("kernel not activated: the host rebooted but still runs {running} instead of {expected}")
            }
            HostOutcome::Failed { reason } => format!("failed: {reason}"),
        }
    }
}

/// Kernels remembered as not activated. Older entries cannot matter once a
/// newer kernel of their flavour is installed.
const REMEMBERED_KERNELS: usize = 8;

/// Memory of the host-patch machine between transitions, persisted in the
/// journal.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostMemory {
    pub attempts_started: u32,
    pub attempt: Option<HostAttempt>,
    /// Reason a person has to look at the host. An attempt that ends in
    /// `Done` clears it.
    pub needs_attention: Option<String>,
    pub last_outcome: Option<HostOutcome>,
    /// Kernel releases that a reboot did not activate. The machine never
    /// reboots for them again.
    pub kernels_not_activated: Vec<String>,
}

/// Work for the driver, queued by the machine's actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCommand {
    /// Open an SSH session, checking the pinned host key.
    Connect,
    /// Check free space, the dpkg lock and interrupted dpkg runs.
    Preflight,
    /// Start the job unless the host already has it, then wait for its end.
    RunJob { job: HostJob },
    /// Ask the host whether it needs a reboot and read its boot id and kernels.
    CheckReboot,
    /// Reboot the host, unless its boot id already differs from `boot_before`.
    Reboot { boot_before: String },
    /// Wait until the host reports a boot id other than `boot_before`.
    AwaitBoot { boot_before: String },
}

/// Limits the machine reads from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSettings {
    /// Agent restarts allowed in one attempt before it takes the failure path.
    pub max_resumes: u32,
    /// Reboots allowed in one attempt. With 0 the machine never reboots.
    pub max_reboots: u32,
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings { max_resumes: 5, max_reboots: 1 }
    }
}

/// Facts the driver sets before each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostFacts {
    /// A random number that makes new job ids unique on the host.
    pub nonce: u32,
}

/// Memory, facts and queued commands of a running host-patch machine.
#[derive(Debug, Default)]
pub struct HostContext {
    pub memory: HostMemory,
    pub facts: HostFacts,
    pub settings: HostSettings,
    pub commands: Vec<HostCommand>,
}

/// Result type smlang expects from an action. `Err` leaves the state as it was.
type ActionResult = Result<(), ()>;

impl HostContext {
    fn attempt(&self) -> Option<&HostAttempt> {
        self.memory.attempt.as_ref()
    }

    fn attempt_mut(&mut self) -> Result<&mut HostAttempt, ()> {
        self.memory.attempt.as_mut().ok_or(())
    }

    /// Names a new job and stores it in the memory, so that it is persisted
    /// before the driver starts it.
    fn queue_new_job(&mut self, kind: JobKind) -> ActionResult {
        let nonce = self.facts.nonce;
        let attempt = self.attempt_mut()?;
        let job = HostJob { id: format!("eventpi-autoupdate-{}-{}-{nonce:08x}", attempt.number, kind.name()), kind };
        attempt.job = Some(job.clone());
        self.commands.push(HostCommand::RunJob { job });
        Ok(())
    }

    fn count_resume(&mut self) -> ActionResult {
        self.attempt_mut()?.resumes += 1;
        Ok(())
    }

    fn end_attempt(&mut self, outcome: HostOutcome, needs_attention: bool) {
        if needs_attention {
            self.memory.needs_attention = Some(outcome.describe());
        }
        self.memory.last_outcome = Some(outcome);
        self.memory.attempt = None;
    }

    fn fail(&mut self, reason: String, needs_attention: bool) {
        self.end_attempt(HostOutcome::Failed { reason }, needs_attention);
    }
}

impl HostStateMachineContext for HostContext {
    fn can_resume(&self) -> Result<bool, ()> {
        Ok(self.attempt().is_some_and(|attempt| attempt.resumes < self.settings.max_resumes))
    }

    fn can_repair(&self, _interruption: &Interruption) -> Result<bool, ()> {
        Ok(self.attempt().is_some_and(|attempt| !attempt.repaired))
    }

    fn job_succeeded(&self, report: &JobReport) -> Result<bool, ()> {
        Ok(report.status == JobStatus::Succeeded)
    }

    fn may_reboot(&self, check: &RebootCheck) -> Result<bool, ()> {
        let Some(attempt) = self.attempt() else { return Ok(false) };
        let under_limit = attempt.reboots < self.settings.max_reboots;
        let failed_before = check.kernels.newest().is_some_and(|newest| self.memory.kernels_not_activated.iter().any(|kernel| kernel == newest));
        Ok(under_limit && !failed_before)
    }

    fn kernel_activated(&self, report: &BootReport) -> Result<bool, ()> {
        let booted = self.attempt().and_then(|attempt| attempt.boot_before_reboot.as_deref()) != Some(report.boot_id.as_str());
        Ok(booted && report.kernels.runs_newest())
    }

    fn start_attempt(&mut self) -> ActionResult {
        self.memory.attempts_started += 1;
        self.memory.attempt = Some(HostAttempt {
            number: self.memory.attempts_started,
            resumes: 0,
            reboots: 0,
            repaired: false,
            job: None,
            boot_before_reboot: None,
            expected_kernel: None,
        });
        self.commands.push(HostCommand::Connect);
        Ok(())
    }

    fn reconnect(&mut self) -> ActionResult {
        self.count_resume()?;
        self.commands.push(HostCommand::Connect);
        Ok(())
    }

    fn start_preflight(&mut self) -> ActionResult {
        self.commands.push(HostCommand::Preflight);
        Ok(())
    }

    fn start_update_lists(&mut self) -> ActionResult {
        self.queue_new_job(JobKind::UpdateLists)
    }

    fn start_repair(&mut self, _interruption: Interruption) -> ActionResult {
        self.attempt_mut()?.repaired = true;
        self.queue_new_job(JobKind::Repair)
    }

    /// Goes on after one repair even though dpkg still lists packages: a
    /// package left half-installed by an interrupted unpack stays so until apt
    /// installs it again, which the upgrade does.
    fn upgrade_after_repair(&mut self, _interruption: Interruption) -> ActionResult {
        self.queue_new_job(JobKind::UpdateLists)
    }

    fn recheck_after_repair(&mut self, _report: JobReport) -> ActionResult {
        self.attempt_mut()?.job = None;
        self.commands.push(HostCommand::Preflight);
        Ok(())
    }

    fn repeat_preflight(&mut self) -> ActionResult {
        self.count_resume()?;
        match self.attempt().and_then(|attempt| attempt.job.clone()) {
            Some(job) => self.commands.push(HostCommand::RunJob { job }),
            None => self.commands.push(HostCommand::Preflight),
        }
        Ok(())
    }

    fn reattach_job(&mut self) -> ActionResult {
        self.count_resume()?;
        let job = self.attempt().and_then(|attempt| attempt.job.clone()).ok_or(())?;
        self.commands.push(HostCommand::RunJob { job });
        Ok(())
    }

    fn start_upgrade(&mut self, _report: JobReport) -> ActionResult {
        self.queue_new_job(JobKind::Upgrade)
    }

    fn check_reboot(&mut self, _report: JobReport) -> ActionResult {
        self.attempt_mut()?.job = None;
        self.commands.push(HostCommand::CheckReboot);
        Ok(())
    }

    fn repeat_reboot_check(&mut self) -> ActionResult {
        self.count_resume()?;
        self.commands.push(HostCommand::CheckReboot);
        Ok(())
    }

    fn start_reboot(&mut self, check: RebootCheck) -> ActionResult {
        let attempt = self.attempt_mut()?;
        attempt.reboots += 1;
        attempt.boot_before_reboot = Some(check.boot_id.clone());
        attempt.expected_kernel = check.kernels.newest().map(str::to_string);
        self.commands.push(HostCommand::Reboot { boot_before: check.boot_id });
        Ok(())
    }

    fn reject_reboot(&mut self, check: RebootCheck) -> ActionResult {
        let reboots = self.attempt().map_or(0, |attempt| attempt.reboots);
        let newest = check.kernels.newest().map(str::to_string);
        let known_bad = newest.as_ref().filter(|newest| self.memory.kernels_not_activated.contains(newest));
        let reason = match known_bad {
            Some(kernel) => format!("the host asks for a reboot, but an earlier reboot did not activate kernel {kernel}; not rebooting for it again"),
            None => format!(
                "the host still asks for a reboot after {reboots} reboot(s), the maximum per attempt (host.max_reboots = {})",
                self.settings.max_reboots
            ),
        };
        self.fail(reason, true);
        Ok(())
    }

    fn finish(&mut self) -> ActionResult {
        let reboots = self.attempt().map_or(0, |attempt| attempt.reboots);
        self.memory.needs_attention = None;
        self.end_attempt(HostOutcome::Patched { reboots }, false);
        Ok(())
    }

    fn await_boot(&mut self) -> ActionResult {
        let boot_before = self.attempt().and_then(|attempt| attempt.boot_before_reboot.clone()).ok_or(())?;
        self.commands.push(HostCommand::AwaitBoot { boot_before });
        Ok(())
    }

    /// Repeats the reboot step after a restart. The driver's reboot command
    /// first compares the boot id, so a host that already rebooted is not
    /// rebooted again, and the reboot counter does not grow.
    fn repeat_reboot(&mut self) -> ActionResult {
        self.count_resume()?;
        let boot_before = self.attempt().and_then(|attempt| attempt.boot_before_reboot.clone()).ok_or(())?;
        self.commands.push(HostCommand::Reboot { boot_before });
        Ok(())
    }

    fn repeat_boot_wait(&mut self) -> ActionResult {
        self.count_resume()?;
        self.await_boot()
    }

    fn check_reboot_after_boot(&mut self, _report: BootReport) -> ActionResult {
        let attempt = self.attempt_mut()?;
        attempt.boot_before_reboot = None;
        attempt.expected_kernel = None;
        self.commands.push(HostCommand::CheckReboot);
        Ok(())
    }

    fn record_kernel_not_activated(&mut self, report: BootReport) -> ActionResult {
        let attempt = self.attempt().cloned().ok_or(())?;
        if attempt.boot_before_reboot.as_deref() == Some(report.boot_id.as_str()) {
            self.fail(format!("the host reported boot id {} again after the reboot", report.boot_id), true);
            return Ok(());
        }

        let expected = report.kernels.newest().map(str::to_string).or(attempt.expected_kernel).unwrap_or_default();
        if !self.memory.kernels_not_activated.contains(&expected) {
            self.memory.kernels_not_activated.push(expected.clone());
        }
        let excess = self.memory.kernels_not_activated.len().saturating_sub(REMEMBERED_KERNELS);
        self.memory.kernels_not_activated.drain(..excess);
        self.end_attempt(HostOutcome::KernelNotActivated { running: report.kernels.running, expected }, true);
        Ok(())
    }

    fn fail_attempt(&mut self, failure: Failure) -> ActionResult {
        self.fail(failure.message, failure.kind == FailureKind::Local);
        Ok(())
    }

    /// Ends the attempt when the reboot step fails. The host may be down or
    /// half way through a reboot, so a person should look whatever the cause.
    fn fail_around_reboot(&mut self, failure: Failure) -> ActionResult {
        self.fail(format!("while rebooting: {}", failure.message), true);
        Ok(())
    }

    fn fail_after_reboot(&mut self, failure: Failure) -> ActionResult {
        self.fail(format!("after the reboot: {}", failure.message), true);
        Ok(())
    }

    fn reject_host_key(&mut self, failure: Failure) -> ActionResult {
        self.end_attempt(HostOutcome::HostKeyRejected { reason: failure.message }, true);
        Ok(())
    }

    fn report_busy(&mut self, failure: Failure) -> ActionResult {
        self.end_attempt(HostOutcome::Busy { reason: failure.message }, false);
        Ok(())
    }

    /// Ends the attempt after a job failed. A failed upgrade or repair leaves
    /// dpkg in a state a person should look at, but a failed list update does
    /// not.
    fn fail_job(&mut self, report: JobReport) -> ActionResult {
        let needs_attention = report.job.kind != JobKind::UpdateLists;
        self.fail(report.describe(), needs_attention);
        Ok(())
    }

    fn give_up_after_restarts(&mut self) -> ActionResult {
        let resumes = self.attempt().map_or(0, |attempt| attempt.resumes);
        self.fail(format!("the agent restarted {resumes} times during this attempt (host.max_resumes = {})", self.settings.max_resumes), true);
        Ok(())
    }
}

/// Result of feeding one event to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub from: HostState,
    pub event: HostEvent,
    pub to: HostState,
    /// Commands to run once the transition is persisted.
    pub commands: Vec<HostCommand>,
    /// Reason the attempt failed, when this step entered `Failed`. The driver
    /// records it as the machine's last error.
    pub failure: Option<String>,
    /// Whether the machine's memory changed and must be persisted.
    pub memory_changed: bool,
    /// Number of the attempt the step belongs to, 0 outside any attempt.
    pub attempt: u32,
}

/// Error for an event the current state does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the host-patch machine in state {state:?} does not take event {event:?}")]
pub struct UnexpectedEvent {
    pub state: HostState,
    pub event: HostEvent,
}

/// The host-patch machine with its context: the only way the driver changes it.
pub struct HostMachine {
    inner: HostStateMachine<HostContext>,
}

impl HostMachine {
    /// Builds a machine in `state` with persisted `memory`, as after a restart.
    pub fn restore(state: HostState, memory: HostMemory, settings: HostSettings) -> Self {
        let context = HostContext { memory, facts: HostFacts::default(), settings, commands: Vec::new() };
        HostMachine { inner: HostStateMachine::new_with_state(context, state.into()) }
    }

    pub fn state(&self) -> HostState {
        self.inner.state().into()
    }

    pub fn memory(&self) -> &HostMemory {
        &self.inner.context().memory
    }

    /// Tells whether the machine is between attempts.
    pub fn is_resting(&self) -> bool {
        matches!(self.state(), HostState::Idle | HostState::Done | HostState::Failed)
    }

    /// Feeds one event. On success the machine has moved and the returned
    /// step lists the commands to run after persisting it. On error the
    /// machine, its memory and its queue are unchanged.
    pub fn handle(&mut self, event: HostEvents, facts: HostFacts) -> Result<Step, UnexpectedEvent> {
        let from = self.state();
        let event_code = HostEvent::from(&event);
        let before = self.inner.context().memory.clone();
        self.inner.context_mut().facts = facts;

        if self.inner.process_event(event).is_err() {
            let context = self.inner.context_mut();
            context.memory = before;
            context.commands.clear();
            return Err(UnexpectedEvent { state: from, event: event_code });
        }

        let to = self.state();
        let context = self.inner.context_mut();
        let commands = std::mem::take(&mut context.commands);
        let memory_changed = context.memory != before;
        let attempt = context.memory.attempt.as_ref().or(before.attempt.as_ref()).map_or(0, |attempt| attempt.number);
        let entered_failed = to == HostState::Failed && from != HostState::Failed;
        let failure = entered_failed.then(|| context.memory.last_outcome.as_ref().map(HostOutcome::describe)).flatten();
        Ok(Step { from, event: event_code, to, commands, failure, memory_changed, attempt })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT_A: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    const BOOT_B: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

    fn facts() -> HostFacts {
        HostFacts { nonce: 0xabcd }
    }

    fn fresh() -> HostMachine {
        HostMachine::restore(HostState::Idle, HostMemory::default(), HostSettings::default())
    }

    fn feed(machine: &mut HostMachine, event: HostEvents) -> Step {
        machine.handle(event, facts()).expect("every event in these scenarios is expected")
    }

    fn current_job(machine: &HostMachine) -> HostJob {
        machine.memory().attempt.as_ref().and_then(|attempt| attempt.job.clone()).expect("a job is stored")
    }

    fn finished(machine: &HostMachine, status: JobStatus) -> HostEvents {
        HostEvents::JobFinished(JobReport { job: current_job(machine), status, output_tail: "Setting up blocker (2.0) ...\n".into() })
    }

    fn kernels(running: &str, installed: &[&str]) -> KernelReport {
        KernelReport { running: running.into(), installed: installed.iter().map(|release| release.to_string()).collect() }
    }

    fn reboot_check(running: &str, installed: &[&str]) -> HostEvents {
        HostEvents::RebootRequired(RebootCheck { boot_id: BOOT_A.into(), kernels: kernels(running, installed), reasons: vec!["linux-image".into()] })
    }

    fn booted(boot_id: &str, running: &str, installed: &[&str]) -> HostEvents {
        HostEvents::BootVerified(BootReport { boot_id: boot_id.into(), kernels: kernels(running, installed) })
    }

    /// Feeds the events up to the end of a successful upgrade.
    fn upgrade(machine: &mut HostMachine) {
        feed(machine, HostEvents::Start);
        feed(machine, HostEvents::Connected);
        feed(machine, HostEvents::PreflightPassed);
        let lists = finished(machine, JobStatus::Succeeded);
        feed(machine, lists);
        let upgraded = finished(machine, JobStatus::Succeeded);
        feed(machine, upgraded);
    }

    const OLD: &str = "6.6.51+rpt-rpi-v8";
    const NEW: &str = "6.6.62+rpt-rpi-v8";

    #[test]
    fn upgrade_without_reboot_ends_done() {
        use HostState::*;
        let mut machine = fresh();

        let states: Vec<HostState> =
            [feed(&mut machine, HostEvents::Start), feed(&mut machine, HostEvents::Connected), feed(&mut machine, HostEvents::PreflightPassed)]
                .iter()
                .map(|step| step.to)
                .collect();
        let lists = finished(&machine, JobStatus::Succeeded);
        let after_lists = feed(&mut machine, lists);
        let upgraded = finished(&machine, JobStatus::Succeeded);
        let after_upgrade = feed(&mut machine, upgraded);
        let done = feed(&mut machine, HostEvents::RebootNotRequired);

        assert_eq!(states, vec![Connecting, Preflight, UpdatingLists]);
        assert_eq!(after_lists.to, Upgrading);
        assert_eq!(after_upgrade.to, RebootPending);
        assert_eq!(after_upgrade.commands, vec![HostCommand::CheckReboot]);
        assert_eq!(done.to, Done);
        assert_eq!(machine.memory().last_outcome, Some(HostOutcome::Patched { reboots: 0 }));
        assert_eq!(machine.memory().attempt, None);
    }

    #[test]
    fn jobs_are_named_before_they_start() {
        let mut machine = fresh();
        feed(&mut machine, HostEvents::Start);
        feed(&mut machine, HostEvents::Connected);

        let step = feed(&mut machine, HostEvents::PreflightPassed);

        let job = current_job(&machine);
        assert_eq!(job.id, "eventpi-autoupdate-1-update-lists-0000abcd");
        assert_eq!(step.commands, vec![HostCommand::RunJob { job }]);
        assert!(step.memory_changed);
    }

    #[test]
    fn reboot_and_new_kernel_end_done() {
        let mut machine = fresh();
        upgrade(&mut machine);

        let reboot = feed(&mut machine, reboot_check(OLD, &[OLD, NEW]));
        let issued = feed(&mut machine, HostEvents::RebootIssued);
        let verified = feed(&mut machine, booted(BOOT_B, NEW, &[OLD, NEW]));
        let done = feed(&mut machine, HostEvents::RebootNotRequired);

        assert_eq!(reboot.to, HostState::Rebooting);
        assert_eq!(reboot.commands, vec![HostCommand::Reboot { boot_before: BOOT_A.into() }]);
        assert_eq!(issued.commands, vec![HostCommand::AwaitBoot { boot_before: BOOT_A.into() }]);
        assert_eq!(verified.to, HostState::RebootPending);
        assert_eq!(done.to, HostState::Done);
        assert_eq!(machine.memory().last_outcome, Some(HostOutcome::Patched { reboots: 1 }));
    }

    #[test]
    fn reboot_is_counted_before_it_runs() {
        let mut machine = fresh();
        upgrade(&mut machine);

        let step = feed(&mut machine, reboot_check(OLD, &[OLD, NEW]));

        assert!(step.memory_changed);
        assert_eq!(machine.memory().attempt.as_ref().map(|attempt| attempt.reboots), Some(1));
    }

    #[test]
    fn old_kernel_after_reboot_is_not_activated() {
        let mut machine = fresh();
        upgrade(&mut machine);
        feed(&mut machine, reboot_check(OLD, &[OLD, NEW]));
        feed(&mut machine, HostEvents::RebootIssued);

        let step = feed(&mut machine, booted(BOOT_B, OLD, &[OLD, NEW]));

        assert_eq!(step.to, HostState::Failed);
        assert_eq!(machine.memory().last_outcome, Some(HostOutcome::KernelNotActivated { running: OLD.into(), expected: NEW.into() }));
        assert_eq!(machine.memory().kernels_not_activated, vec![NEW.to_string()]);
        assert!(machine.memory().needs_attention.as_deref().is_some_and(|text| text.contains("kernel not activated")));
        assert!(step.failure.is_some_and(|text| text.contains("kernel not activated")));
    }

    #[test]
    fn kernel_not_activated_is_never_rebooted_again() {
        let mut machine = fresh();
        upgrade(&mut machine);
        feed(&mut machine, reboot_check(OLD, &[OLD, NEW]));
        feed(&mut machine, HostEvents::RebootIssued);
        feed(&mut machine, booted(BOOT_B, OLD, &[OLD, NEW]));

        upgrade(&mut machine);
        let step = feed(&mut machine, reboot_check(OLD, &[OLD, NEW]));

        assert_eq!(step.to, HostState::Failed);
        assert!(step.commands.is_empty());
        assert!(step.failure.is_some_and(|text| text.contains("did not activate")));
    }

    #[test]
    fn newer_kernel_after_failed_one_may_reboot() {
        let mut machine = fresh();
        upgrade(&mut machine);
        feed(&mut machine, reboot_check(OLD, &[OLD, NEW]));
        feed(&mut machine, HostEvents::RebootIssued);
        feed(&mut machine, booted(BOOT_B, OLD, &[OLD, NEW]));

        upgrade(&mut machine);
        let step = feed(&mut machine, reboot_check(OLD, &[OLD, NEW, "6.6.70+rpt-rpi-v8"]));

        assert_eq!(step.to, HostState::Rebooting);
    }

    #[test]
    fn reboot_limit_ends_in_failed() {
        let mut machine = fresh();
        upgrade(&mut machine);
        feed(&mut machine, reboot_check(OLD, &[OLD, NEW]));
        feed(&mut machine, HostEvents::RebootIssued);
        feed(&mut machine, booted(BOOT_B, NEW, &[OLD, NEW]));

        let step = feed(&mut machine, reboot_check(NEW, &[OLD, NEW]));

        assert_eq!(step.to, HostState::Failed);
        assert!(step.commands.is_empty());
        assert!(step.failure.is_some_and(|text| text.contains("max_reboots")));
    }

    #[test]
    fn zero_max_reboots_never_reboots() {
        let settings = HostSettings { max_reboots: 0, ..HostSettings::default() };
        let mut machine = HostMachine::restore(HostState::Idle, HostMemory::default(), settings);
        upgrade(&mut machine);

        let step = feed(&mut machine, reboot_check(OLD, &[OLD, NEW]));

        assert_eq!(step.to, HostState::Failed);
    }

    #[test]
    fn restarts_during_reboot_never_add_a_reboot() {
        let mut machine = fresh();
        upgrade(&mut machine);
        feed(&mut machine, reboot_check(OLD, &[OLD, NEW]));

        let mut commands = Vec::new();
        for _ in 0..10 {
            let step = feed(&mut machine, HostEvents::Resumed);
            commands.extend(step.commands);
        }

        let reboots = commands.iter().filter(|command| matches!(command, HostCommand::Reboot { .. })).count();
        assert_eq!(reboots, 5);
        assert!(commands.iter().all(|command| *command == HostCommand::Reboot { boot_before: BOOT_A.into() }));
        assert_eq!(machine.state(), HostState::Failed);
        assert_eq!(machine.memory().attempt, None);
    }

    #[test]
    fn resume_limit_ends_in_failed() {
        let mut machine = fresh();
        feed(&mut machine, HostEvents::Start);
        feed(&mut machine, HostEvents::Connected);
        feed(&mut machine, HostEvents::PreflightPassed);
        let upgraded_lists = finished(&machine, JobStatus::Succeeded);
        feed(&mut machine, upgraded_lists);
        let job = current_job(&machine);

        let states: Vec<HostState> = (0..7).map(|_| feed(&mut machine, HostEvents::Resumed).to).collect();

        assert_eq!(&states[..5], &[HostState::Upgrading; 5]);
        assert_eq!(states[5], HostState::Failed);
        assert_eq!(states[6], HostState::Failed);
        assert!(machine.memory().needs_attention.as_deref().is_some_and(|text| text.contains("restarted 5 times")));
        assert_eq!(job.kind, JobKind::Upgrade);
    }

    #[test]
    fn resume_reattaches_the_same_job() {
        let mut machine = fresh();
        feed(&mut machine, HostEvents::Start);
        feed(&mut machine, HostEvents::Connected);
        feed(&mut machine, HostEvents::PreflightPassed);
        let job = current_job(&machine);

        let step = machine.handle(HostEvents::Resumed, HostFacts { nonce: 7 }).unwrap();

        assert_eq!(step.commands, vec![HostCommand::RunJob { job }]);
    }

    #[test]
    fn interrupted_dpkg_is_repaired_once() {
        let mut machine = fresh();
        feed(&mut machine, HostEvents::Start);
        feed(&mut machine, HostEvents::Connected);

        let repair = feed(&mut machine, HostEvents::RepairNeeded(Interruption { description: "blocker half-installed".into() }));
        let repaired = finished(&machine, JobStatus::Succeeded);
        let recheck = feed(&mut machine, repaired);
        let again = feed(&mut machine, HostEvents::RepairNeeded(Interruption { description: "blocker half-installed".into() }));

        assert_eq!(repair.to, HostState::Preflight);
        assert!(matches!(&repair.commands[..], [HostCommand::RunJob { job }] if job.kind == JobKind::Repair));
        assert_eq!(recheck.commands, vec![HostCommand::Preflight]);
        assert_eq!(again.to, HostState::UpdatingLists);
    }

    #[test]
    fn failed_repair_needs_attention() {
        let mut machine = fresh();
        feed(&mut machine, HostEvents::Start);
        feed(&mut machine, HostEvents::Connected);
        feed(&mut machine, HostEvents::RepairNeeded(Interruption { description: "dpkg interrupted".into() }));

        let failed = finished(&machine, JobStatus::Failed { exit_code: 1 });
        let step = feed(&mut machine, failed);

        assert_eq!(step.to, HostState::Failed);
        assert!(machine.memory().needs_attention.is_some());
    }

    #[test]
    fn busy_dpkg_ends_without_attention() {
        let mut machine = fresh();
        feed(&mut machine, HostEvents::Start);
        feed(&mut machine, HostEvents::Connected);

        let step = feed(&mut machine, HostEvents::DpkgBusy(Failure::transient("lock held by pid 42 (unattended-upgr)")));

        assert_eq!(step.to, HostState::Failed);
        assert!(matches!(&machine.memory().last_outcome, Some(HostOutcome::Busy { reason }) if reason.contains("pid 42")));
        assert_eq!(machine.memory().needs_attention, None);
    }

    #[test]
    fn changed_host_key_needs_attention() {
        let mut machine = fresh();
        feed(&mut machine, HostEvents::Start);

        let step = feed(&mut machine, HostEvents::HostKeyRejected(Failure::local("offered SHA256:abc")));

        assert_eq!(step.to, HostState::Failed);
        assert!(step.commands.is_empty());
        assert!(matches!(machine.memory().last_outcome, Some(HostOutcome::HostKeyRejected { .. })));
        assert!(machine.memory().needs_attention.is_some());
    }

    #[test]
    fn done_clears_attention() {
        let mut machine = fresh();
        feed(&mut machine, HostEvents::Start);
        feed(&mut machine, HostEvents::HostKeyRejected(Failure::local("offered SHA256:abc")));

        upgrade(&mut machine);
        feed(&mut machine, HostEvents::RebootNotRequired);

        assert_eq!(machine.memory().needs_attention, None);
    }

    #[test]
    fn unreachable_during_reboot_needs_attention() {
        let mut machine = fresh();
        upgrade(&mut machine);
        feed(&mut machine, reboot_check(OLD, &[OLD, NEW]));

        let step = feed(&mut machine, HostEvents::Unreachable(Failure::transient("connection refused")));

        assert_eq!(step.to, HostState::Failed);
        assert!(machine.memory().needs_attention.as_deref().is_some_and(|text| text.contains("while rebooting")));
    }

    #[test]
    fn lost_upgrade_job_fails() {
        let mut machine = fresh();
        feed(&mut machine, HostEvents::Start);
        feed(&mut machine, HostEvents::Connected);
        feed(&mut machine, HostEvents::PreflightPassed);
        let lists = finished(&machine, JobStatus::Succeeded);
        feed(&mut machine, lists);

        let lost = finished(&machine, JobStatus::Lost);
        let step = feed(&mut machine, lost);

        assert_eq!(step.to, HostState::Failed);
        assert!(step.failure.is_some_and(|text| text.contains("without an exit status")));
    }

    #[test]
    fn unexpected_event_changes_nothing() {
        let mut machine = fresh();
        let before = machine.memory().clone();

        let error = machine.handle(HostEvents::RebootIssued, facts()).unwrap_err();

        assert_eq!(error.state, HostState::Idle);
        assert_eq!(machine.state(), HostState::Idle);
        assert_eq!(machine.memory(), &before);
    }

    #[test]
    fn busy_states_handle_resume_and_failures() {
        let resting = [HostState::Idle, HostState::Done, HostState::Failed];
        let failures = [HostEvent::Resumed, HostEvent::Unreachable, HostEvent::HostKeyRejected, HostEvent::CommandFailed];
        for state in HostState::ALL.iter().filter(|state| !resting.contains(state)) {
            for event in failures {
                assert!(HOST_TABLE.handles(state.code(), event.code()), "{state:?} does not handle {event:?}");
            }
        }
    }

    #[test]
    fn resting_states_take_start() {
        for state in [HostState::Idle, HostState::Done, HostState::Failed] {
            assert!(HOST_TABLE.handles(state.code(), HostEvent::Start.code()), "{state:?}");
            assert!(HOST_TABLE.handles(state.code(), HostEvent::Resumed.code()), "{state:?}");
        }
    }

    #[test]
    fn table_lists_every_state() {
        let codes: Vec<u8> = HOST_TABLE.states.iter().map(|state| state.code).collect();
        let expected: Vec<u8> = HostState::ALL.iter().map(|state| state.code()).collect();
        assert_eq!(codes, expected);
        assert_eq!(HOST_TABLE.start, HostState::Idle.code());
        assert_eq!(HOST_TABLE.machine, MachineKind::HostPatch);
    }
}
