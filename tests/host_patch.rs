//! `autoupdate host-patch` against a real Debian host in a container: a real
//! sshd with its own host key, real apt and dpkg, and a package repository
//! built by the test. See `tests/support/host.rs` for the host.

mod support;

#[path = "support/host.rs"]
mod host;

use std::time::Duration;

use eventpi_autoupdate::machine::host::{HOST_TABLE, HostState};
use host::{FIRST_KERNEL, Package, TestHost, Transition, wait_for};

/// Exit status of `autoupdate host-patch` when the dpkg lock stayed held.
const EXIT_BUSY: i32 = 75;

const NEW_KERNEL: &str = "6.6.62+rpt-rpi-v8";

fn states(transitions: &[Transition]) -> Vec<String> {
    transitions.iter().map(|transition| transition.to.clone()).collect()
}

/// Starts a host with `hello` 1.0 installed and `hello` 2.0 published.
fn host_with_update() -> TestHost {
    let host = TestHost::start();
    host.publish(&Package::new("hello", "1.0"));
    host.install(&["hello"]);
    host.publish(&Package::new("hello", "2.0"));
    host
}

/// Starts a host whose next upgrade installs a new kernel through the
/// `linux-image-rpi-v8` meta package, the way Raspberry Pi OS ships kernels.
fn host_with_kernel_update(activates: bool) -> TestHost {
    let host = TestHost::start();
    host.publish(&Package::new("linux-image-rpi-v8", "1"));
    host.install(&["linux-image-rpi-v8"]);
    host.publish(&Package::kernel(NEW_KERNEL, activates));
    host.publish(&Package::new("linux-image-rpi-v8", "2").depends(&format!("linux-image-{NEW_KERNEL}")));
    host
}

/// Builds a package whose postinst, while `/etc/slow-block` exists, announces
/// itself in `/run/slow-started` and waits up to 120 s for
/// `/run/slow-release`, so a test can act while dpkg runs.
fn slow_package(version: &str) -> Package {
    Package::new("slow", version).postinst(
        "if [ \"$1\" = configure ] && [ -e /etc/slow-block ]; then\n  touch /run/slow-started\n  for i in $(seq 1 600); do [ -e /run/slow-release ] && break; sleep 0.2; done\nfi\n",
    )
}

/// Starts a host with `slow` 1.0 installed and `slow` 2.0 published, whose
/// upgrade waits for the test.
fn host_with_slow_update() -> TestHost {
    let host = TestHost::start();
    host.publish(&slow_package("1.0"));
    host.install(&["slow"]);
    host.publish(&slow_package("2.0"));
    host.exec("touch /etc/slow-block");
    host
}

#[test]
fn newer_package_is_upgraded_without_reboot() {
    let host = host_with_update();
    let config = host.config("");
    let boot = host.boot_id();

    let run = host.patch(&config, &[]);

    assert_eq!(run.code(), Some(0), "log:\n{}", run.log);
    assert!(run.stdout.contains("patched, no reboot needed"), "{}", run.stdout);
    assert_eq!(host.version("hello").as_deref(), Some("2.0"));
    assert_eq!(host.boot_id(), boot);
    assert_eq!(host.reboots(), 0);
    assert!(host.docker_logs().contains("Accepted publickey for root"), "sshd log:\n{}", host.docker_logs());
    let transitions = host.transitions();
    assert_eq!(states(&transitions), ["Connecting", "Preflight", "UpdatingLists", "Upgrading", "RebootPending", "Done"]);
    eprintln!("upgrade without reboot took {:?}", run.took);
}

#[test]
fn required_reboot_is_verified() {
    let host = host_with_kernel_update(true);
    let config = host.config("");
    let boot = host.boot_id();

    let run = host.patch(&config, &[]);

    assert_eq!(run.code(), Some(0), "log:\n{}", run.log);
    assert!(run.stdout.contains("patched with 1 reboot"), "{}", run.stdout);
    assert_ne!(host.boot_id(), boot);
    assert_eq!(host.running_kernel(), NEW_KERNEL);
    assert_eq!(host.reboots(), 1);
    let transitions = host.transitions();
    assert_eq!(
        states(&transitions),
        ["Connecting", "Preflight", "UpdatingLists", "Upgrading", "RebootPending", "Rebooting", "VerifyingBoot", "RebootPending", "Done"]
    );
    eprintln!("upgrade with reboot took {:?}", run.took);
}

#[test]
fn held_dpkg_lock_reports_busy() {
    let host = host_with_update();
    let config = host.config("dpkg_lock_wait = \"4s\"");
    host.exec_detached(
        r#"perl -MFcntl -e 'open(my $f, ">>", "/var/lib/dpkg/lock-frontend") or die; my $l = pack("s s x4 q q i x4", F_WRLCK, 0, 0, 0, 0); fcntl($f, F_SETLK, $l) or die; open(my $p, ">", "/run/holder.pid"); print $p "$$\n"; close $p; sleep 600'"#,
    );
    wait_for("the lock holder", Duration::from_secs(10), || host.check("test -s /run/holder.pid"));
    let holder = host.exec("cat /run/holder.pid").trim().to_string();

    let run = host.patch(&config, &[]);

    assert_eq!(run.code(), Some(EXIT_BUSY), "log:\n{}", run.log);
    assert!(run.log.contains("busy"), "log:\n{}", run.log);
    assert!(run.log.contains(&format!("held by pid {holder} (perl)")), "log:\n{}", run.log);
    assert!(run.took >= Duration::from_secs(4), "waited only {:?}", run.took);
    assert!(host.check(&format!("kill -0 {holder}")), "the lock holder {holder} is gone");
    assert_eq!(host.version("hello").as_deref(), Some("1.0"));
    assert!(host.jobs().is_empty(), "jobs started: {:?}", host.jobs());
    assert!(host.status().contains("busy"), "{}", host.status());
}

#[test]
fn interrupted_dpkg_is_repaired() {
    let host = TestHost::start();
    host.publish(&Package::new("blocker", "1.0"));
    host.install(&["blocker"]);
    let blocking = "if [ \"$1\" = upgrade ] && [ -e /etc/blocker-block ]; then\n  mkfifo /run/blocker.fifo\n  cat /run/blocker.fifo >/dev/null\nfi\n";
    host.publish(&Package::new("blocker", "2.0").preinst(blocking));
    host.exec("touch /etc/blocker-block");
    host.exec_detached("dpkg -i /srv/repo/blocker_2.0_all.deb >/run/dpkg.log 2>&1");
    wait_for("the blocking preinst", Duration::from_secs(20), || host.check("test -p /run/blocker.fifo"));
    host.exec("kill -9 $(pidof dpkg) && rm /etc/blocker-block && echo released >/run/blocker.fifo");
    assert!(!host.exec("dpkg --audit").trim().is_empty(), "dpkg --audit finds nothing after the kill");
    let config = host.config("");

    let run = host.patch(&config, &[]);

    assert_eq!(run.code(), Some(0), "log:\n{}", run.log);
    assert_eq!(host.version("blocker").as_deref(), Some("2.0"));
    assert_eq!(host.exec("dpkg --audit").trim(), "");
    let transitions = host.transitions();
    let repairs = transitions.iter().filter(|transition| transition.event == "RepairNeeded").count();
    assert!(repairs >= 1, "{transitions:?}");
    assert_eq!(host.jobs().iter().filter(|job| job.contains("-repair-")).count(), 1, "{:?}", host.jobs());
}

#[test]
fn cut_connection_does_not_stop_upgrade() {
    let host = host_with_slow_update();
    let config = host.config("");
    let (child, log_path) = host.spawn_patch(&config, &[]);

    wait_for("the upgrade's postinst", Duration::from_secs(120), || host.check("test -e /run/slow-started"));
    host.cut_connections();
    std::thread::sleep(Duration::from_secs(3));
    host.exec("touch /run/slow-release");
    let (status, stdout) = host::wait_with_timeout(child, host::RUN_TIMEOUT, &log_path);
    let log = std::fs::read_to_string(&log_path).unwrap();

    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(stdout.contains("patched"), "{stdout}");
    assert!(log.contains("reconnecting"), "log:\n{log}");
    assert_eq!(host.version("slow").as_deref(), Some("2.0"));
    assert_eq!(host.jobs().iter().filter(|job| job.contains("-upgrade-")).count(), 1, "{:?}", host.jobs());
}

#[test]
fn killed_agent_reattaches_to_its_job() {
    let host = host_with_slow_update();
    let config = host.config("");
    let (mut child, _) = host.spawn_patch(&config, &[]);

    wait_for("the upgrade's postinst", Duration::from_secs(120), || host.check("test -e /run/slow-started"));
    child.kill().unwrap();
    child.wait().unwrap();
    let jobs_after_kill = host.jobs();
    assert!(host.check("pidof dpkg"), "dpkg stopped with the agent");
    let rerun = std::thread::scope(|scope| {
        let rerun = scope.spawn(|| host.patch(&config, &[]));
        std::thread::sleep(Duration::from_secs(3));
        host.exec("touch /run/slow-release");
        rerun.join().unwrap()
    });

    assert_eq!(rerun.code(), Some(0), "log:\n{}", rerun.log);
    assert!(rerun.log.contains("resuming the attempt"), "log:\n{}", rerun.log);
    assert_eq!(host.version("slow").as_deref(), Some("2.0"));
    assert_eq!(host.jobs(), jobs_after_kill);
    assert_eq!(host.jobs().iter().filter(|job| job.contains("-upgrade-")).count(), 1, "{:?}", host.jobs());
    let transitions = host.transitions();
    assert_eq!(transitions.iter().filter(|transition| transition.event == "Resumed").count(), 1, "{transitions:?}");
}

#[test]
fn changed_host_key_is_rejected() {
    let host = host_with_update();
    let config = host.config("");
    let pinned = host.host_key();
    host.regenerate_host_keys();
    assert_ne!(host.host_key(), pinned);

    let run = host.patch(&config, &[]);

    assert_eq!(run.code(), Some(1), "log:\n{}", run.log);
    assert!(run.log.contains("which is not the pinned key"), "log:\n{}", run.log);
    assert!(run.log.contains("nothing was run"), "log:\n{}", run.log);
    assert!(!run.log.contains("AAAA"), "a key appears in the log:\n{}", run.log);
    assert_eq!(host.version("hello").as_deref(), Some("1.0"));
    assert!(host.jobs().is_empty(), "jobs started: {:?}", host.jobs());
    assert!(!host.docker_logs().contains("Accepted publickey"), "sshd accepted a login:\n{}", host.docker_logs());
    let status = host.status();
    assert!(status.contains("NEEDS ATTENTION: host key rejected"), "{status}");
}

#[test]
fn old_kernel_is_not_rebooted_twice() {
    let host = host_with_kernel_update(false);
    let config = host.config("");

    let first = host.patch(&config, &[]);
    let boot_after_first = host.boot_id();
    let second = host.patch(&config, &[]);

    assert_eq!(first.code(), Some(1), "log:\n{}", first.log);
    assert!(first.log.contains("kernel not activated"), "log:\n{}", first.log);
    assert_eq!(host.running_kernel(), FIRST_KERNEL);
    assert_eq!(second.code(), Some(1), "log:\n{}", second.log);
    assert!(second.log.contains("did not activate kernel"), "log:\n{}", second.log);
    assert_eq!(host.boot_id(), boot_after_first);
    assert_eq!(host.reboots(), 1);
    assert!(host.status().contains("NEEDS ATTENTION"), "{}", host.status());
}

#[test]
fn failpoint_in_each_state_recovers() {
    if !eventpi_autoupdate::failpoint::ENABLED {
        eprintln!("skipped: build with --features failpoints to run the failpoint cases");
        return;
    }
    let cases: Vec<(String, &str)> =
        HOST_TABLE.states.iter().flat_map(|state| ["after-persist", "before-command"].map(|point| (state.name.to_string(), point))).collect();
    assert_eq!(cases.len(), 2 * HostState::ALL.len());

    // Three hosts at a time: each case waits mostly on dpkg and restarts.
    let failures: Vec<String> = std::thread::scope(|scope| {
        let chunks: Vec<Vec<(String, &str)>> = cases.chunks(cases.len().div_ceil(3)).map(<[_]>::to_vec).collect();
        let workers: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(move || chunk.iter().filter_map(|(state, point)| failpoint_case(state, point).err()).collect::<Vec<_>>()))
            .collect();
        workers.into_iter().flat_map(|worker| worker.join().unwrap()).collect()
    });

    assert!(failures.is_empty(), "{} failpoint case(s) failed:\n{}", failures.len(), failures.join("\n\n"));
}

/// Kills the agent at `host-patch:{state}:{point}` and runs it again.
///
/// For `Failed`, the upgrade installs a kernel that the reboot does not
/// activate, so the attempt fails. For every other state it installs one that
/// the reboot activates. Either way the host ends where a run without the kill
/// ends, with exactly one reboot. `Idle` is only a start state, so its
/// failpoints never fire.
fn failpoint_case(state: &str, point: &str) -> Result<(), String> {
    let fails = state == "Failed";
    let host = host_with_kernel_update(!fails);
    let config = host.config("");
    let armed = format!("host-patch:{state}:{point}");

    let first = host.patch(&config, &[("AUTOUPDATE_FAILPOINT", &armed)]);
    let killed = first.was_killed();
    let has_command = !matches!(state, "Done" | "Failed");
    let expected_kill = state != "Idle" && (point == "after-persist" || has_command);
    if killed != expected_kill {
        return Err(format!("{armed}: killed = {killed}, expected {expected_kill}; exit {:?}\n{}", first.status, first.log));
    }

    let second = if killed { host.patch(&config, &[]) } else { first };
    let kernel = host.running_kernel();
    let reboots = host.reboots();
    let (expected_code, expected_kernel) = if fails { (1, FIRST_KERNEL) } else { (0, NEW_KERNEL) };
    let installed = host.version(&format!("linux-image-{NEW_KERNEL}")).is_some();
    if second.code() != Some(expected_code) || kernel != expected_kernel || reboots != 1 || !installed {
        return Err(format!(
            "{armed}: exit {:?} (expected {expected_code}), kernel {kernel} (expected {expected_kernel}), {reboots} reboot(s), kernel package installed: {installed}\n{}",
            second.status, second.log
        ));
    }
    eprintln!("{armed}: killed {killed}, ended with exit {expected_code} after one reboot");
    Ok(())
}

#[test]
fn sudo_user_patches_host() {
    let host = host_with_update();
    host.exec(
        "useradd -m -p '*' -s /bin/sh patcher && mkdir -p /home/patcher/.ssh && cp /root/.ssh/authorized_keys /home/patcher/.ssh/ \
         && chown -R patcher /home/patcher/.ssh && echo 'patcher ALL=(ALL) NOPASSWD: ALL' >/etc/sudoers.d/patcher",
    );
    let config = host.config("user = \"patcher\"\nuse_sudo = true");

    let run = host.patch(&config, &[]);

    assert_eq!(run.code(), Some(0), "log:\n{}", run.log);
    assert_eq!(host.version("hello").as_deref(), Some("2.0"));
    assert_eq!(host.exec("stat -c %U /var/lib/eventpi-autoupdate/jobs").trim(), "root");
}

#[test]
fn upgrade_timeout_leaves_dpkg_running() {
    let host = host_with_slow_update();
    let config = host.config("upgrade_timeout = \"4s\"");

    let run = host.patch(&config, &[]);
    let dpkg_running = host.check("pidof dpkg");
    let status = host.status();
    host.exec("touch /run/slow-release");
    wait_for("dpkg to finish", Duration::from_secs(60), || !host.check("pidof dpkg"));
    let second = host.patch(&config, &[]);

    assert_eq!(run.code(), Some(1), "log:\n{}", run.log);
    assert!(run.log.contains("it was left running"), "log:\n{}", run.log);
    assert!(dpkg_running, "dpkg was stopped at the timeout");
    assert!(status.contains("NEEDS ATTENTION"), "{status}");
    assert_eq!(second.code(), Some(0), "log:\n{}", second.log);
    assert_eq!(host.version("slow").as_deref(), Some("2.0"));
}

#[test]
fn unauthorized_key_is_reported() {
    let host = host_with_update();
    let config = host.config("");
    host.exec("rm /root/.ssh/authorized_keys");

    let run = host.patch(&config, &[]);

    assert_eq!(run.code(), Some(1), "log:\n{}", run.log);
    assert!(run.log.contains("rejected the SSH key"), "log:\n{}", run.log);
    assert!(run.log.contains("authorized_keys"), "log:\n{}", run.log);
    assert_eq!(host.version("hello").as_deref(), Some("1.0"));
    assert!(host.status().contains("NEEDS ATTENTION"), "{}", host.status());
}

#[test]
fn missing_key_file_is_reported() {
    let host = TestHost::start();
    let config = host.config("key_file = \"/nonexistent/eventpi/id_ed25519\"");

    let run = host.patch(&config, &[]);

    assert_eq!(run.code(), Some(1), "log:\n{}", run.log);
    assert!(run.log.contains("cannot load the SSH key /nonexistent/eventpi/id_ed25519 (host.key_file)"), "log:\n{}", run.log);
    assert!(host.jobs().is_empty(), "jobs started: {:?}", host.jobs());
}

#[test]
fn closed_port_fails_without_attention() {
    let host = TestHost::start();
    let port = support::free_port();
    let config = host.config(&format!("port = {port}"));

    let run = host.patch(&config, &[]);

    assert_eq!(run.code(), Some(1), "log:\n{}", run.log);
    assert!(run.log.contains(&format!("cannot connect to 127.0.0.1:{port} over SSH")), "log:\n{}", run.log);
    assert!(run.took < Duration::from_secs(30), "took {:?}", run.took);
    let status = host.status();
    assert!(status.contains("last outcome: failed"), "{status}");
    assert!(!status.contains("NEEDS ATTENTION"), "{status}");
}

#[test]
fn low_free_space_stops_before_apt() {
    let host = host_with_update();
    let config = host.config("min_free_mib = 100000000");

    let run = host.patch(&config, &[]);

    assert_eq!(run.code(), Some(1), "log:\n{}", run.log);
    assert!(run.log.contains("MiB free on / of the host"), "log:\n{}", run.log);
    assert!(host.jobs().is_empty(), "jobs started: {:?}", host.jobs());
    assert_eq!(host.version("hello").as_deref(), Some("1.0"));
}

#[test]
fn invalid_host_section_lists_problems() {
    let directory = tempfile::tempdir().unwrap();
    let journal = directory.path().join("journal");
    let unknown_key = format!(
        "[journal]\ndirectory = \"{}\"\n\n[host]\naddress = \"127.0.0.1\"\nkey_file = \"/k\"\nhost_key = \"SHA256:short\"\nmax_reboot = 2\n",
        journal.display()
    );
    let bad_values = unknown_key.replace("max_reboot = 2\n", "").replace("/k", "relative/key");

    let first = host_patch_errors(directory.path(), &unknown_key);
    let second = host_patch_errors(directory.path(), &bad_values);

    assert!(first.contains("line 8: host.max_reboot: unknown key"), "{first}");
    assert!(second.contains("line 6: host.key_file: relative/key must be an absolute path"), "{second}");
    assert!(second.contains("line 7: host.host_key: \"SHA256:short\" is not a SHA256 fingerprint"), "{second}");
    assert!(!journal.exists(), "a journal was created for an invalid configuration");
}

/// Runs `autoupdate host-patch` with a configuration that must be rejected
/// and returns its standard error.
fn host_patch_errors(directory: &std::path::Path, text: &str) -> String {
    let config = directory.join("autoupdate.toml");
    std::fs::write(&config, text).unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_autoupdate")).args(["host-patch", "--config"]).arg(&config).output().unwrap();

    assert_eq!(output.status.code(), Some(1));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn check_config_accepts_host_only_file() {
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("autoupdate.toml");
    let text = "[journal]\ndirectory = \"/var/lib/eventpi/journal\"\n\n[host]\naddress = \"127.0.0.1\"\nkey_file = \"/etc/eventpi/host_ed25519\"\n\
                host_key = \"SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"\n";
    std::fs::write(&config, text).unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_autoupdate")).arg("check-config").arg(&config).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);

    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("valid for host-patch"), "{stdout}");
}
