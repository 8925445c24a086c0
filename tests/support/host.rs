//! A throwaway Debian host for the host-patch tests: a container of the image
//! that `scripts/host-test-image.sh` builds. It runs a real sshd with its own
//! host key, and real apt and dpkg read a flat package repository that the
//! test builds with `dpkg-deb` and `dpkg-scanpackages` in a temporary
//! directory mounted at `/srv/repo`.
//!
//! The sshd port is published on 127.0.0.1 only. A reboot restarts the
//! container (its restart policy is `always`), which writes a new boot id and
//! mounts a fresh `/run`. Every container carries `eventpi.test=1` and a name
//! unique to the test; it is removed when the `TestHost` is dropped.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tempfile::TempDir;

use crate::support::{TEST_LABEL, free_port, run};

/// Limit for one `autoupdate host-patch` run in these tests.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// The running kernel of a fresh test host.
pub const FIRST_KERNEL: &str = "6.6.51+rpt-rpi-v8";

static HOST_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Builds or finds the test image once per test binary.
fn host_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/host-test-image.sh");
        run("bash", &[script.to_str().expect("the repository path is UTF-8")]).trim().to_string()
    })
}

/// A Debian package built for the test repository.
#[derive(Debug, Clone)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub depends: Option<String>,
    pub preinst: Option<String>,
    pub postinst: Option<String>,
    /// Files the package installs, as (absolute path, content).
    pub files: Vec<(String, String)>,
}

impl Package {
    pub fn new(name: &str, version: &str) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            depends: None,
            preinst: None,
            postinst: None,
            files: vec![(format!("/usr/share/{name}/version"), format!("{version}\n"))],
        }
    }

    pub fn depends(mut self, depends: &str) -> Package {
        self.depends = Some(depends.into());
        self
    }

    pub fn preinst(mut self, script: &str) -> Package {
        self.preinst = Some(script.into());
        self
    }

    pub fn postinst(mut self, script: &str) -> Package {
        self.postinst = Some(script.into());
        self
    }

    pub fn file(mut self, path: &str, content: &str) -> Package {
        self.files.push((path.into(), content.into()));
        self
    }

    /// A kernel package in the style of Raspberry Pi OS: its modules
    /// directory, and a postinst that requests a reboot. With `activates`, the
    /// postinst also tells the simulated boot loader to start it next.
    pub fn kernel(release: &str, activates: bool) -> Package {
        let mut postinst = format!("if [ \"$1\" = configure ]; then\n  touch /run/reboot-required\n  echo linux-image-{release} >>/run/reboot-required.pkgs\n");
        if activates {
            postinst.push_str(&format!("  echo {release} >/etc/eventpi-test/boot_kernel\n"));
        }
        postinst.push_str("fi\n");
        Package::new(&format!("linux-image-{release}"), "1").file(&format!("/lib/modules/{release}/modules.order"), "").postinst(&postinst)
    }
}

/// One `autoupdate host-patch` run that ended.
#[derive(Debug)]
pub struct PatchRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub log: String,
    pub took: Duration,
}

impl PatchRun {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Tells whether the run was stopped by SIGKILL, as a failpoint does.
    pub fn was_killed(&self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        self.status.signal() == Some(libc::SIGKILL)
    }
}

/// One transition of the host-patch machine, from `autoupdate replay --json`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Transition {
    pub machine: String,
    pub from: String,
    pub event: String,
    pub to: String,
    pub attempt: u32,
}

/// A Debian host in a container, with its repository, keys and journal.
pub struct TestHost {
    pub name: String,
    pub port: u16,
    pub directory: TempDir,
}

impl TestHost {
    /// Starts a host and installs `packages` (already published) on it.
    pub fn start() -> TestHost {
        let image = host_image();
        let directory = tempfile::tempdir().expect("temporary directory");
        let name = format!("eventpi-test-host-{}-{}", std::process::id(), HOST_COUNTER.fetch_add(1, Ordering::SeqCst));
        let repo = directory.path().join("repo");
        fs::create_dir_all(&repo).unwrap();
        fs::write(repo.join("Packages"), "").unwrap();

        let key = directory.path().join("id_ed25519");
        run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-C", "eventpi-test", "-f", key.to_str().unwrap()]);

        let port = free_port();
        let volume = format!("{}:/srv/repo:ro", repo.display());
        let publish = format!("127.0.0.1:{port}:22");
        let name_label = format!("eventpi.test.host={name}");
        run(
            "docker",
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--label",
                TEST_LABEL,
                "--label",
                &name_label,
                "--restart",
                "always",
                "--tmpfs",
                "/run",
                "-v",
                &volume,
                "-p",
                &publish,
                image,
            ],
        );
        let host = TestHost { name, port, directory };

        let public = fs::read_to_string(host.directory.path().join("id_ed25519.pub")).unwrap();
        host.exec_with_input("cat >/root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys", &public);
        host.wait_for_sshd(Duration::from_secs(30));
        host
    }

    pub fn repo(&self) -> PathBuf {
        self.directory.path().join("repo")
    }

    pub fn journal(&self) -> PathBuf {
        self.directory.path().join("journal")
    }

    pub fn key_file(&self) -> PathBuf {
        self.directory.path().join("id_ed25519")
    }

    /// Waits until sshd sends its version line on the published port.
    pub fn wait_for_sshd(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut banner = [0u8; 8];
                if stream.read_exact(&mut banner).is_ok() && banner.starts_with(b"SSH-2.0") {
                    return;
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!("sshd in {} did not answer on 127.0.0.1:{} within {timeout:?}\n{}", self.name, self.port, self.docker_logs());
    }

    pub fn docker_logs(&self) -> String {
        let output = Command::new("docker").args(["logs", "--tail", "40", &self.name]).output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
    }

    /// Runs a shell script in the container and returns its output; panics
    /// when it fails.
    pub fn exec(&self, script: &str) -> String {
        run("docker", &["exec", &self.name, "sh", "-c", script])
    }

    /// Runs a shell script in the container and returns whether it succeeded.
    pub fn check(&self, script: &str) -> bool {
        Command::new("docker").args(["exec", &self.name, "sh", "-c", script]).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success()
    }

    /// Starts a shell script in the container in the background.
    pub fn exec_detached(&self, script: &str) {
        run("docker", &["exec", "-d", &self.name, "sh", "-c", script]);
    }

    fn exec_with_input(&self, script: &str, input: &str) {
        let mut child = Command::new("docker").args(["exec", "-i", &self.name, "sh", "-c", script]).stdin(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "docker exec {script} failed");
    }

    /// Builds `package` into the repository and refreshes its index.
    pub fn publish(&self, package: &Package) {
        let build = tempfile::tempdir().unwrap();
        let root = build.path().join("root");
        let control = root.join("DEBIAN");
        fs::create_dir_all(&control).unwrap();
        let mut text = format!(
            "Package: {}\nVersion: {}\nArchitecture: all\nMaintainer: eventpi tests <tests@eventpi.invalid>\nDescription: test package\n",
            package.name, package.version
        );
        if let Some(depends) = &package.depends {
            text.push_str(&format!("Depends: {depends}\n"));
        }
        fs::write(control.join("control"), text).unwrap();
        for (name, script) in [("preinst", &package.preinst), ("postinst", &package.postinst)] {
            if let Some(script) = script {
                let path = control.join(name);
                fs::write(&path, format!("#!/bin/sh\nset -e\n{script}")).unwrap();
                crate::support::make_executable(&path);
            }
        }
        for (path, content) in &package.files {
            let target = root.join(path.trim_start_matches('/'));
            fs::create_dir_all(target.parent().unwrap()).unwrap();
            fs::write(target, content).unwrap();
        }

        let deb = self.repo().join(format!("{}_{}_all.deb", package.name, package.version));
        run("dpkg-deb", &["--root-owner-group", "-Zgzip", "--build", root.to_str().unwrap(), deb.to_str().unwrap()]);
        let index = crate::support::run_in(Some(&self.repo()), "dpkg-scanpackages", &["--multiversion", ".", "/dev/null"]);
        fs::write(self.repo().join("Packages"), index).unwrap();
    }

    /// Installs packages from the repository, as the host's setup would.
    pub fn install(&self, names: &[&str]) {
        self.exec(&format!("apt-get -q update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get -q -y install {} >/dev/null", names.join(" ")));
    }

    /// Returns the installed version of a package, or `None`.
    pub fn version(&self, name: &str) -> Option<String> {
        let output = Command::new("docker").args(["exec", &self.name, "dpkg-query", "-W", "-f", "${Status} ${Version}", name]).output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.strip_prefix("install ok installed ").map(str::to_string)
    }

    pub fn boot_id(&self) -> String {
        self.exec("cat /etc/eventpi-test/boot_id").trim().to_string()
    }

    pub fn running_kernel(&self) -> String {
        self.exec("cat /etc/eventpi-test/kernel_release").trim().to_string()
    }

    /// Counts the reboots the host was asked for.
    pub fn reboots(&self) -> usize {
        self.exec("cat /etc/eventpi-test/reboots 2>/dev/null || true").lines().count()
    }

    /// Returns the names of the job directories on the host.
    pub fn jobs(&self) -> Vec<String> {
        self.exec("ls -1 /var/lib/eventpi-autoupdate/jobs 2>/dev/null || true").lines().map(str::to_string).collect()
    }

    /// Returns the host's ed25519 public key line.
    pub fn host_key(&self) -> String {
        self.exec("cat /etc/ssh/ssh_host_ed25519_key.pub").trim().to_string()
    }

    /// Replaces the sshd host keys with new ones, as a reinstall would, and
    /// makes sshd load them.
    pub fn regenerate_host_keys(&self) {
        self.exec("rm -f /etc/ssh/ssh_host_* && ssh-keygen -A >/dev/null && kill -HUP 1");
        thread::sleep(Duration::from_millis(500));
        self.wait_for_sshd(Duration::from_secs(20));
    }

    /// Kills every sshd process of the container except the listener (PID
    /// 1), which cuts every SSH connection without touching their jobs.
    pub fn cut_connections(&self) {
        self.exec("for pid in $(pgrep sshd); do if [ \"$pid\" != 1 ]; then kill -9 \"$pid\"; fi; done");
    }

    /// Writes a configuration for this host and returns its path. `extra`
    /// lines go into `[host]` and replace the lines with the same keys.
    /// Returns a `[host]` section that reaches this host, for an agent
    /// configuration, followed by `extra` lines.
    pub fn host_section(&self, extra: &str) -> String {
        format!(
            "[host]\naddress = \"127.0.0.1\"\nport = {port}\nuser = \"root\"\nkey_file = \"{key}\"\nhost_key = \"[127.0.0.1]:{port} {host_key}\"\nconnect_timeout = \"10s\"\ncommand_timeout = \"60s\"\nreconnect_window = \"60s\"\nboot_timeout = \"90s\"\njob_poll_interval = \"1s\"\ndpkg_lock_wait = \"20s\"\nmin_free_mib = 64\nboot_id_command = \"cat /etc/eventpi-test/boot_id\"\nkernel_release_command = \"cat /etc/eventpi-test/kernel_release\"\nreboot_command = \"/usr/local/sbin/eventpi-test-reboot\"\n{extra}\n",
            port = self.port,
            key = self.key_file().display(),
            host_key = self.host_key(),
        )
    }

    pub fn config(&self, extra: &str) -> PathBuf {
        let template = format!(
            r#"[agent]
log_level = "eventpi_autoupdate=debug,info"

[journal]
directory = "{journal}"
size_kib = 256

[host]
address = "127.0.0.1"
port = {port}
user = "root"
key_file = "{key}"
host_key = "[127.0.0.1]:{port} {host_key}"
connect_timeout = "10s"
command_timeout = "60s"
reconnect_window = "60s"
boot_timeout = "90s"
job_poll_interval = "1s"
dpkg_lock_wait = "20s"
min_free_mib = 64
boot_id_command = "cat /etc/eventpi-test/boot_id"
kernel_release_command = "cat /etc/eventpi-test/kernel_release"
reboot_command = "/usr/local/sbin/eventpi-test-reboot"
"#,
            journal = self.journal().display(),
            port = self.port,
            key = self.key_file().display(),
            host_key = self.host_key(),
        );
        let key_of = |line: &str| line.split_once('=').map(|(key, _)| key.trim().to_string());
        let replaced: Vec<String> = extra.lines().filter_map(key_of).collect();
        let mut text: String =
            template.lines().filter(|line| key_of(line).is_none_or(|key| !replaced.contains(&key))).map(|line| format!("{line}\n")).collect();
        text.push_str(extra);
        text.push('\n');
        let path = self.directory.path().join("autoupdate.toml");
        fs::write(&path, text).unwrap();
        path
    }

    /// Starts `autoupdate host-patch` with `config`; its log goes to a file.
    pub fn spawn_patch(&self, config: &Path, environment: &[(&str, &str)]) -> (Child, PathBuf) {
        let log_path = self.directory.path().join(format!("run-{}.log", HOST_COUNTER.fetch_add(1, Ordering::SeqCst)));
        let log = fs::File::create(&log_path).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_autoupdate"));
        command.args(["--log-format", "human", "host-patch", "--config"]).arg(config).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        command.env_remove("AUTOUPDATE_FAILPOINT");
        for (key, value) in environment {
            command.env(key, value);
        }
        (command.spawn().expect("start autoupdate host-patch"), log_path)
    }

    /// Runs `autoupdate host-patch` to its end.
    pub fn patch(&self, config: &Path, environment: &[(&str, &str)]) -> PatchRun {
        let started = Instant::now();
        let (child, log_path) = self.spawn_patch(config, environment);
        let (status, stdout) = wait_with_timeout(child, RUN_TIMEOUT, &log_path);
        PatchRun { status, stdout, log: fs::read_to_string(&log_path).unwrap_or_default(), took: started.elapsed() }
    }

    /// Returns the host-patch transitions in the journal.
    pub fn transitions(&self) -> Vec<Transition> {
        let journal = self.journal();
        let json = run(env!("CARGO_BIN_EXE_autoupdate"), &["replay", "--json", "--journal", journal.to_str().unwrap()]);
        let all: Vec<Transition> = serde_json::from_str(&json).expect("replay --json prints a list of transitions");
        all.into_iter().filter(|transition| transition.machine == "host-patch").collect()
    }

    /// Returns `autoupdate status` for the journal.
    pub fn status(&self) -> String {
        let journal = self.journal();
        run(env!("CARGO_BIN_EXE_autoupdate"), &["status", "--journal", journal.to_str().unwrap()])
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", "-v", &self.name]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// Waits for `child` up to `timeout`; kills it and panics with its log when
/// it takes longer.
pub fn wait_with_timeout(mut child: Child, timeout: Duration, log_path: &Path) -> (ExitStatus, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stdout = String::new();
            if let Some(mut pipe) = child.stdout.take() {
                let _ = pipe.read_to_string(&mut stdout);
            }
            return (status, stdout);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log = fs::read_to_string(log_path).unwrap_or_default();
            panic!("autoupdate host-patch did not finish within {timeout:?}\n--- log ---\n{log}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `condition` holds, checking every 200 ms; panics with `what`
/// after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}
