//! The shell scripts the host-patch driver runs on the host, and the parsers
//! for what they print.
//!
//! Every script is POSIX `sh` and uses only tools of a minimal Debian or
//! Raspberry Pi OS system (coreutils, util-linux, grep, mawk or gawk, dpkg,
//! apt). Scripts print `key=value` lines, so that a message from a tool
//! cannot be mistaken for a result.
//!
//! A job runs detached from the SSH session: through `systemd-run` as a
//! transient unit named after the job where systemd runs, and through
//! `setsid` otherwise. Its directory on the host contains the command, the
//! output, the runner's pid and, once it ended, its exit status. The runner
//! claims the job with `mkdir`, so a job started twice still runs once.

use std::time::Duration;

use crate::driver::ssh::shell_quote;
use crate::machine::host::{HostJob, JobKind, KernelReport};

/// Bytes of a job's output read back with its status: enough for the
/// error lines, small enough for every poll.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// Delimiter of the here-documents that carry job files. No job text
/// contains it.
const HEREDOC_END: &str = "EVENTPI_AUTOUPDATE_END_OF_FILE";

/// Paths of dpkg's and apt's locks. dpkg and apt take them with `fcntl`, so
/// `lslocks` lists their holders.
const LOCK_PATHS: [&str; 4] = ["/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock", "/var/lib/apt/lists/lock", "/var/cache/apt/archives/lock"];

/// Environment for every apt and dpkg run: no questions, no needrestart
/// prompts or service restarts, no changelog pager.
const NONINTERACTIVE: &str = "export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 APT_LISTCHANGES_FRONTEND=none LC_ALL=C";

/// Returns the command that a job of `kind` runs. `lock_wait` is how long
/// apt itself waits for a dpkg lock taken after the preflight check.
pub fn job_command(kind: JobKind, lock_wait: Duration) -> String {
    let lock_timeout = lock_wait.as_secs().max(1);
    let apt = format!("apt-get -q -y -o DPkg::Lock::Timeout={lock_timeout} -o Dpkg::Use-Pty=0");
    match kind {
        JobKind::Repair => format!("{NONINTERACTIVE}\nset -x\ndpkg --force-confdef --force-confold --configure -a\n"),
        JobKind::UpdateLists => format!("{NONINTERACTIVE}\nset -x\n{apt} update\n"),
        JobKind::Upgrade => format!("{NONINTERACTIVE}\nset -x\n{apt} -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold full-upgrade\n"),
    }
}

/// The runner, stored as `run` in the job directory and started detached
/// with the directory as its argument.
const RUNNER: &str = r#"#!/bin/sh
# Runs one eventpi-autoupdate job. mkdir is atomic, so a second start of the
# same job exits here instead of running the command again.
dir="$1"
mkdir "$dir/claimed" 2>/dev/null || exit 0
echo $$ >"$dir/pid"
date +%s >"$dir/started"
sh "$dir/command" >"$dir/output" 2>&1 </dev/null
echo $? >"$dir/exit.new"
mv "$dir/exit.new" "$dir/exit"
"#;

/// Returns the job's directory on the host.
pub fn job_directory(root: &str, job: &HostJob) -> String {
    format!("{}/{}", root.trim_end_matches('/'), job.id)
}

/// Returns a script that starts the job unless it was started before. It
/// prints `launcher=systemd-run`, `launcher=setsid` or `launcher=none` (the
/// job had been claimed already).
///
/// NOTE: the tests run the `setsid` branch only, because their host runs no
/// systemd. The `systemd-run` branch is checked for shell syntax alone.
pub fn start_job(root: &str, job: &HostJob, command: &str) -> String {
    let directory = shell_quote(&job_directory(root, job));
    let unit = shell_quote(&format!("{}.service", job.id));
    let description = shell_quote(&format!("eventpi-autoupdate {} job", job.kind.name()));
    let root = shell_quote(root);
    format!(
        r#"set -eu
dir={directory}
if [ -e "$dir/claimed" ]; then echo launcher=none; exit 0; fi
mkdir -p "$dir"
cat >"$dir/command" <<'{HEREDOC_END}'
{command}
{HEREDOC_END}
cat >"$dir/run" <<'{HEREDOC_END}'
{RUNNER}
{HEREDOC_END}
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
  if ! systemctl is-active --quiet {unit}; then
    systemd-run --unit={unit} --description={description} --collect --quiet sh "$dir/run" "$dir"
  fi
  echo launcher=systemd-run
else
  setsid -f sh "$dir/run" "$dir" </dev/null >/dev/null 2>&1
  echo launcher=setsid
fi
find {root} -mindepth 1 -maxdepth 1 -type d -mtime +30 -exec rm -rf {{}} + 2>/dev/null || true
"#
    )
}

/// Returns a script that prints the job's state, the host's clock, the job's
/// start time and exit status when known, then `--- output` and the tail of
/// its output.
pub fn job_status(root: &str, job: &HostJob) -> String {
    let directory = shell_quote(&job_directory(root, job));
    format!(
        r#"dir={directory}
if [ ! -d "$dir" ]; then echo state=absent; exit 0; fi
echo "now=$(date +%s)"
if [ -f "$dir/started" ]; then echo "started=$(cat "$dir/started")"; fi
# The runner is looked for before the exit file: it writes that file before
# it ends, so a runner gone by then has always left its exit status.
alive=no
if [ -f "$dir/pid" ] && tr '\0' ' ' <"/proc/$(cat "$dir/pid")/cmdline" 2>/dev/null | grep -q -F "$dir/run"; then
  alive=yes
fi
if [ -f "$dir/exit" ]; then
  echo state=finished
  echo "exit=$(cat "$dir/exit")"
elif [ ! -d "$dir/claimed" ]; then
  echo state=unclaimed
elif [ ! -f "$dir/pid" ] || [ "$alive" = yes ]; then
  echo state=running
else
  echo state=lost
fi
echo '--- output'
tail -c {OUTPUT_TAIL_BYTES} "$dir/output" 2>/dev/null || true
"#
    )
}

/// A job's state as the status script printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// The job directory does not exist: the job was never started.
    Absent,
    /// The directory exists but no runner claimed it yet.
    Unclaimed,
    Running,
    Finished {
        exit_code: i32,
    },
    /// Claimed, not finished, and its runner is gone.
    Lost,
}

/// A parsed status report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatusReport {
    pub state: JobState,
    /// The host's clock, in seconds since the epoch.
    pub now: Option<u64>,
    /// When the runner started, by the host's clock.
    pub started: Option<u64>,
    pub output_tail: String,
}

impl JobStatusReport {
    /// Returns how long the job has run by the host's clock.
    pub fn running_for(&self) -> Option<Duration> {
        Some(Duration::from_secs(self.now?.saturating_sub(self.started?)))
    }
}

/// Parses the output of [`job_status`].
pub fn parse_job_status(output: &str) -> Result<JobStatusReport, String> {
    let (head, tail) = output.split_once("--- output\n").unwrap_or((output, ""));
    let mut state = None;
    let mut exit_code = None;
    let mut now = None;
    let mut started = None;
    for (key, value) in key_values(head) {
        match key {
            "state" => state = Some(value.to_string()),
            "exit" => exit_code = value.parse::<i32>().ok(),
            "now" => now = value.parse().ok(),
            "started" => started = value.parse().ok(),
            _ => {}
        }
    }

    let state = match state.as_deref() {
        Some("absent") => JobState::Absent,
        Some("unclaimed") => JobState::Unclaimed,
        Some("running") => JobState::Running,
        Some("lost") => JobState::Lost,
        Some("finished") => JobState::Finished { exit_code: exit_code.ok_or("the job's exit file does not hold a number")? },
        Some(other) => return Err(format!("unknown job state {other:?}")),
        None => return Err(format!("the status script printed no state: {:?}", first_line(output))),
    };
    Ok(JobStatusReport { state, now, started, output_tail: tail.to_string() })
}

/// Returns the preflight script: free space, holders of dpkg and apt locks,
/// and signs of an interrupted dpkg run.
pub fn preflight() -> String {
    let paths = LOCK_PATHS.map(|path| format!("$3 == \"{path}\"")).join(" || ");
    format!(
        r#"LC_ALL=C; export LC_ALL
for path in / /var/cache/apt/archives; do
  df -Pk "$path" | awk -v path="$path" 'NR == 2 {{ print "free_kib=" $4 " " path }}'
done
for path in /boot/firmware /boot; do
  if mountpoint -q "$path" 2>/dev/null; then
    df -Pk "$path" | awk -v path="$path" 'NR == 2 {{ print "boot_free_kib=" $4 " " path }}'
    break
  fi
done
if command -v lslocks >/dev/null 2>&1; then
  lslocks --noheadings --raw --output PID,COMMAND,PATH 2>/dev/null | awk '{paths} {{ print "lock=" $1 " " $2 " " $3 }}'
else
  echo lock_probe=missing
fi
if [ -n "$(ls -A /var/lib/dpkg/updates 2>/dev/null)" ]; then echo interrupted=updates; fi
dpkg --audit 2>&1 | head -n 20 | sed 's/^/audit=/'
"#
    )
}

/// A process that holds a dpkg or apt lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    pub pid: u32,
    pub command: String,
    pub path: String,
}

/// Free space on one filesystem of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeSpace {
    pub path: String,
    pub free_kib: u64,
}

/// Findings of the preflight script.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreflightReport {
    pub free: Vec<FreeSpace>,
    /// Free space on a separate boot filesystem.
    pub boot_free: Option<FreeSpace>,
    pub lock_holders: Vec<LockHolder>,
    /// `lslocks` is missing, so lock holders are unknown. apt then waits for
    /// the lock itself.
    pub lock_probe_missing: bool,
    /// `/var/lib/dpkg/updates` contains files of an unfinished dpkg run.
    pub pending_updates: bool,
    /// Lines of `dpkg --audit`: packages left half installed or configured.
    pub audit: Vec<String>,
}

impl PreflightReport {
    /// Tells whether dpkg must be repaired before apt can run.
    pub fn interrupted(&self) -> bool {
        self.pending_updates || !self.audit.is_empty()
    }

    /// Describes why dpkg needs a repair, for logs and the journal.
    pub fn interruption(&self) -> String {
        let mut reasons = Vec::new();
        if self.pending_updates {
            reasons.push("dpkg was interrupted (/var/lib/dpkg/updates is not empty)".to_string());
        }
        let packages: Vec<&str> =
            self.audit.iter().map(|line| line.trim()).filter(|line| !line.is_empty() && !line.ends_with(':') && !line.ends_with('.')).collect();
        if !self.audit.is_empty() {
            reasons.push(format!("dpkg --audit lists {}", if packages.is_empty() { "problems".to_string() } else { packages.join(", ") }));
        }
        reasons.join("; ")
    }
}

/// Parses the output of [`preflight`].
pub fn parse_preflight(output: &str) -> PreflightReport {
    let mut report = PreflightReport::default();
    for (key, value) in key_values(output) {
        match key {
            "free_kib" | "boot_free_kib" => {
                let Some((kib, path)) = value.split_once(' ') else { continue };
                let Ok(free_kib) = kib.parse() else { continue };
                let space = FreeSpace { path: path.to_string(), free_kib };
                if key == "free_kib" {
                    report.free.push(space);
                } else {
                    report.boot_free = Some(space);
                }
            }
            "lock" => {
                let mut fields = value.splitn(3, ' ');
                let (Some(pid), Some(command), Some(path)) = (fields.next(), fields.next(), fields.next()) else { continue };
                let Ok(pid) = pid.parse() else { continue };
                report.lock_holders.push(LockHolder { pid, command: command.replace("\\x20", " "), path: path.to_string() });
            }
            "lock_probe" => report.lock_probe_missing = value == "missing",
            "interrupted" => report.pending_updates = true,
            "audit" => report.audit.push(value.to_string()),
            _ => {}
        }
    }
    report
}

/// Returns the script that reads the boot id, the running and installed
/// kernels, and whether the host needs a reboot. The three seam commands
/// come from the configuration.
pub fn host_facts(boot_id_command: &str, kernel_release_command: &str, installed_kernels_command: &str) -> String {
    format!(
        r#"LC_ALL=C; export LC_ALL
echo "boot_id=$( ( {boot_id_command} ) 2>/dev/null | head -n 1 )"
echo "kernel=$( ( {kernel_release_command} ) 2>/dev/null | head -n 1 )"
( {installed_kernels_command} ) 2>/dev/null | sed 's/^/installed=/'
if [ -e /run/reboot-required ]; then
  echo "reboot=/run/reboot-required exists"
  if [ -f /run/reboot-required.pkgs ]; then sed 's/^/reboot_package=/' /run/reboot-required.pkgs; fi
fi
if command -v needrestart >/dev/null 2>&1; then
  needrestart -b 2>/dev/null | sed -n 's/^NEEDRESTART-KSTA: */needrestart_ksta=/p'
fi
"#
    )
}

/// Findings of the host-facts script.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostFactsReport {
    pub boot_id: String,
    pub kernels: KernelReport,
    /// Reasons for a reboot, empty when none is needed.
    pub reboot_reasons: Vec<String>,
}

/// Parses the output of [`host_facts`]. The boot id and the kernel release
/// must not be empty: without them the reboot cannot be verified.
pub fn parse_host_facts(output: &str) -> Result<HostFactsReport, String> {
    let mut report = HostFactsReport::default();
    let mut packages = Vec::new();
    for (key, value) in key_values(output) {
        match key {
            "boot_id" => report.boot_id = value.trim().to_string(),
            "kernel" => report.kernels.running = value.trim().to_string(),
            "installed" if !value.trim().is_empty() => report.kernels.installed.push(value.trim().to_string()),
            "reboot" => report.reboot_reasons.push(value.to_string()),
            "reboot_package" => packages.push(value.trim().to_string()),
            // needrestart's kernel status: 2 is an ABI-compatible upgrade and 3
            // a version upgrade. Both take a reboot to activate.
            "needrestart_ksta" if matches!(value.trim(), "2" | "3") => {
                report.reboot_reasons.push("needrestart reports a pending kernel upgrade".to_string());
            }
            _ => {}
        }
    }
    if !packages.is_empty() {
        report.reboot_reasons.push(format!("packages asking for it: {}", packages.join(", ")));
    }
    if let Some(newest) = report.kernels.newest().filter(|_| !report.kernels.runs_newest()) {
        report.reboot_reasons.push(format!("kernel {newest} is installed but {} runs", report.kernels.running));
    }

    if report.boot_id.is_empty() {
        return Err("host.boot_id_command printed nothing; check that it prints the boot id".to_string());
    }
    if report.kernels.running.is_empty() {
        return Err("host.kernel_release_command printed nothing; check that it prints the running kernel's release".to_string());
    }
    Ok(report)
}

/// Wraps a script for `sh -c`, through `sudo -n` when configured.
pub fn wrap(script: &str, use_sudo: bool) -> String {
    let command = format!("sh -c {}", shell_quote(script));
    if use_sudo { format!("sudo -n {command}") } else { command }
}

fn key_values(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(|line| line.split_once('='))
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> HostJob {
        HostJob { id: "eventpi-autoupdate-1-upgrade-0000abcd".into(), kind: JobKind::Upgrade }
    }

    #[test]
    fn upgrade_keeps_local_config_files() {
        let command = job_command(JobKind::Upgrade, Duration::from_secs(600));

        assert!(command.contains("DEBIAN_FRONTEND=noninteractive"));
        assert!(command.contains("-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold full-upgrade"));
        assert!(command.contains("DPkg::Lock::Timeout=600"));
    }

    #[test]
    fn start_script_names_unit_after_job() {
        let script = start_job("/var/lib/eventpi-autoupdate/jobs", &job(), "true");

        assert!(script.contains("systemd-run --unit='eventpi-autoupdate-1-upgrade-0000abcd.service'"));
        assert!(script.contains("setsid -f sh \"$dir/run\" \"$dir\""));
        assert!(script.contains("dir='/var/lib/eventpi-autoupdate/jobs/eventpi-autoupdate-1-upgrade-0000abcd'"));
    }

    #[test]
    fn finished_status_parses() {
        let output = "now=1700000100\nstarted=1700000000\nstate=finished\nexit=100\n--- output\nE: broken\n";

        let report = parse_job_status(output).unwrap();

        assert_eq!(report.state, JobState::Finished { exit_code: 100 });
        assert_eq!(report.running_for(), Some(Duration::from_secs(100)));
        assert_eq!(report.output_tail, "E: broken\n");
    }

    #[test]
    fn output_cannot_fake_a_state() {
        let output = "now=1\nstate=running\n--- output\nstate=finished\nexit=0\n";

        let report = parse_job_status(output).unwrap();

        assert_eq!(report.state, JobState::Running);
    }

    #[test]
    fn missing_state_is_an_error() {
        assert!(parse_job_status("sh: 1: syntax error\n").is_err());
    }

    #[test]
    fn preflight_finds_lock_holder_and_audit() {
        let output = "free_kib=2048000 /\nfree_kib=2048000 /var/cache/apt/archives\nlock=67 perl /var/lib/dpkg/lock-frontend\n\
                      audit=The following packages are in a mess due to serious problems during\naudit=installation.  They must be reinstalled for them (and any packages\naudit=that depend on them) to function properly:\naudit= blocker              test\naudit=\n";

        let report = parse_preflight(output);

        assert_eq!(report.free.len(), 2);
        assert_eq!(report.lock_holders, vec![LockHolder { pid: 67, command: "perl".into(), path: "/var/lib/dpkg/lock-frontend".into() }]);
        assert!(report.interrupted());
        assert!(report.interruption().contains("blocker"), "{}", report.interruption());
    }

    #[test]
    fn host_facts_find_reboot_reasons() {
        let output = "boot_id=abc\nkernel=6.6.51+rpt-rpi-v8\ninstalled=6.6.51+rpt-rpi-v8\ninstalled=6.6.62+rpt-rpi-v8\nreboot=/run/reboot-required exists\nreboot_package=linux-image-rpi-v8\n";

        let report = parse_host_facts(output).unwrap();

        assert_eq!(report.boot_id, "abc");
        assert_eq!(report.reboot_reasons.len(), 3, "{:?}", report.reboot_reasons);
    }

    #[test]
    fn host_facts_need_boot_id() {
        let error = parse_host_facts("boot_id=\nkernel=6.1.0-28-arm64\n").unwrap_err();

        assert!(error.contains("host.boot_id_command"));
    }

    #[test]
    fn scripts_pass_shell_syntax_check() {
        let scripts = [
            start_job("/var/lib/eventpi-autoupdate/jobs", &job(), &job_command(JobKind::Upgrade, Duration::from_secs(60))),
            job_status("/var/lib/eventpi-autoupdate/jobs", &job()),
            preflight(),
            host_facts("cat /proc/sys/kernel/random/boot_id", "uname -r", "ls -1 /lib/modules"),
        ];
        for script in scripts {
            let output = std::process::Command::new("sh").args(["-n", "-c", &script]).output().unwrap();
            assert!(output.status.success(), "{}\n{script}", String::from_utf8_lossy(&output.stderr));
        }
    }

    #[test]
    fn wrap_uses_sudo_when_asked() {
        assert_eq!(wrap("echo 'x'", true), r"sudo -n sh -c 'echo '\''x'\'''");
        assert_eq!(wrap("true", false), "sh -c 'true'");
    }
}
