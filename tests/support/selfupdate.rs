//! The agent in real containers for the self-update tests: a registry with
//! versions of the agent's image, the reserved partition as a bind-mounted
//! directory, the agent's container, and the networks around it.
//!
//! Every container and network a fleet creates carries `eventpi.test=1` and
//! `eventpi.test.fleet=<registry port>`. The agent copies its labels to the
//! containers it creates, so dropping the fleet removes them all.

#![allow(dead_code)]

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use eventpi_autoupdate::journal::{Journal, JournalState};
use eventpi_autoupdate::machine::selfupdate::SelfUpdateMemory;
use eventpi_autoupdate::selfupdate::audit::{Audit, audit};
use serde_json::Value;
use tempfile::TempDir;

use crate::support::{BASE_IMAGE, Registry, cli, run, wait_until};

/// Repository of the agent's image in each test registry.
pub const REPOSITORY: &str = "eventpi-test/agent";

/// Port of the handover API in the agent's default configuration.
pub const HANDOVER_PORT: u16 = 8750;

/// Builds the agent's test image once per test process and returns its name.
pub fn base_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/self-update-test-image.sh");
        let output = Command::new(&script).stdin(Stdio::null()).stderr(Stdio::inherit()).output().expect("run scripts/self-update-test-image.sh");
        assert!(output.status.success(), "scripts/self-update-test-image.sh failed ({})", output.status);
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    })
}

/// Runs `docker` and returns its standard output, or `None` when it failed.
pub fn docker_try(arguments: &[&str]) -> Option<String> {
    let output = Command::new("docker").args(arguments).stdin(Stdio::null()).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Returns a container's log, standard output and error together; empty
/// when the container does not exist.
pub fn container_log(container: &str) -> String {
    let Ok(output) = Command::new("docker").args(["logs", container]).stdin(Stdio::null()).output() else { return String::new() };
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// Returns `docker inspect` of a container, or `None` when it does not exist.
pub fn inspect(container: &str) -> Option<Value> {
    let text = docker_try(&["inspect", "--type", "container", container])?;
    let mut list: Vec<Value> = serde_json::from_str(&text).ok()?;
    list.pop()
}

/// Sends SIGKILL to a container's main process from the host, as a crash
/// or the kernel's OOM killer would. Unlike `docker kill`, this leaves the
/// restart policy in force.
pub fn kill_main_process(container: &str) {
    let pid = inspect(container).and_then(|container| container["State"]["Pid"].as_i64()).unwrap_or(0);
    assert!(pid > 0, "container {container} has no running process");
    // SAFETY: kill(2) on a pid the engine reported for a test container.
    let status = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(status, 0, "kill -9 {pid} failed");
}

/// A registry with the agent's image, the files the agent mounts, and the
/// names of its containers and networks.
pub struct Fleet {
    pub registry: Registry,
    pub id: u16,
    pub directory: TempDir,
    /// The tag the agent follows.
    pub followed: String,
    /// Name of the first agent container, which every later one takes over.
    pub agent_name: String,
    pub site_network: String,
    pub handover_network: String,
    pub config: PathBuf,
    /// `docker logs` processes that copy container logs into files.
    followers: Mutex<Vec<Child>>,
}

impl Fleet {
    /// Starts a registry and writes the configuration; lines of `extra`
    /// replace the `[self_update]` defaults with the same key.
    pub fn new(extra: &str) -> Fleet {
        Fleet::with_sections(extra, "")
    }

    /// Like [`Fleet::new`], with the TOML tables of `sections` after
    /// `[self_update]`.
    pub fn with_sections(extra: &str, sections: &str) -> Fleet {
        let registry = Registry::start();
        let id = registry.port;
        let directory = tempfile::tempdir().expect("temporary directory");
        fs::create_dir_all(directory.path().join("reserved")).unwrap();
        let fleet_label = format!("eventpi.test.fleet={id}");
        let site_network = format!("eventpi-test-site-{id}");
        run("docker", &["network", "create", "--label", "eventpi.test=1", "--label", &fleet_label, &site_network]);

        let mut fleet = Fleet {
            followed: format!("{}/{REPOSITORY}:stable", registry.address()),
            agent_name: format!("eventpi-test-agent-{id}"),
            handover_network: format!("eventpi-test-handover-{id}"),
            config: directory.path().join("autoupdate.toml"),
            site_network,
            registry,
            id,
            directory,
            followers: Mutex::new(Vec::new()),
        };
        fleet.write_config(extra, sections);
        fleet
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.directory.path().join("reserved/journal")
    }

    fn write_config(&mut self, extra: &str, sections: &str) {
        let defaults = [
            format!("network = \"{}\"", self.handover_network),
            "check_interval = \"1s\"".to_string(),
            "check_jitter_percent = 0".to_string(),
            "start_timeout = \"20s\"".to_string(),
            "handover_timeout = \"5s\"".to_string(),
            "probation = \"3s\"".to_string(),
            "confirm_timeout = \"30s\"".to_string(),
            "retry_backoff_min = \"1m\"".to_string(),
            "retry_backoff_max = \"5m\"".to_string(),
            "stop_timeout = \"2s\"".to_string(),
        ];
        let key_of = |line: &str| line.split('=').next().unwrap_or_default().trim().to_string();
        let overridden: Vec<String> = extra.lines().map(key_of).collect();
        let mut lines: Vec<String> = defaults.into_iter().filter(|line| !overridden.contains(&key_of(line))).collect();
        lines.extend(extra.lines().filter(|line| !line.trim().is_empty()).map(str::to_string));
        let text = format!(
            "[agent]\nname = \"test-device-{}\"\n\n[journal]\ndirectory = \"{}\"\nsize_kib = 256\n\n[self_update]\n{}\n\n{sections}",
            self.id,
            self.journal_dir().display(),
            lines.join("\n")
        );
        fs::write(&self.config, text).unwrap();
    }

    /// Builds a version of the agent's image, pushes it as the followed tag
    /// and returns its manifest digest. `failpoint` goes into the image's
    /// environment, so only containers of this version honour it.
    pub fn push_version(&self, version: &str, failpoint: Option<&str>) -> String {
        let lines = failpoint.map(|point| format!("ENV AUTOUPDATE_FAILPOINT={point}\n")).unwrap_or_default();
        self.push_version_with(version, &lines)
    }

    /// Like [`Fleet::push_version`], with `lines` added to the Dockerfile.
    pub fn push_version_with(&self, version: &str, lines: &str) -> String {
        let reference = self.build_version(version, lines, &self.followed);
        self.registry.push(&reference);
        self.registry.manifest_digest(REPOSITORY, "stable")
    }

    /// Returns the file of `AUTOUPDATE_FAILPOINT_ONCE`, on the reserved
    /// partition that every agent container of the fleet mounts.
    pub fn once_file(&self) -> String {
        self.directory.path().join("reserved/failpoint-fired").display().to_string()
    }

    /// Builds a version locally under `tag`.
    pub fn build_version(&self, version: &str, lines: &str, tag: &str) -> String {
        let context = tempfile::tempdir().unwrap();
        fs::write(context.path().join("Dockerfile"), format!("FROM {}\nLABEL eventpi.test=1 eventpi.test.version=\"{version}\"\n{lines}", base_image()))
            .unwrap();
        run("docker", &["build", "--quiet", "--tag", tag, context.path().to_str().unwrap()]);
        tag.to_string()
    }

    /// Builds a version whose image configuration names `platform`, pushes
    /// it as the followed tag and returns its manifest digest.
    pub fn push_version_for_platform(&self, version: &str, platform: &str) -> String {
        let local = format!("{}/{REPOSITORY}:{version}-native", self.registry.address());
        self.build_version(version, "", &local);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/set-image-platform.sh");
        run(script.to_str().unwrap(), &[&local, platform, &self.followed]);
        self.registry.push(&self.followed);
        self.registry.manifest_digest(REPOSITORY, "stable")
    }

    /// Runs the first agent container with the fleet's mounts and labels,
    /// plus `extra` flags of `docker run`, and returns its id.
    pub fn start_agent(&self, extra: &[&str]) -> String {
        let reserved = self.directory.path().join("reserved");
        let reserved_mount = format!("type=bind,source={0},target={0}", reserved.display());
        let config_mount = format!("type=bind,source={},target=/etc/eventpi/autoupdate.toml,readonly", self.config.display());
        let fleet_label = format!("eventpi.test.fleet={}", self.id);
        let mut arguments = vec![
            "run",
            "--detach",
            "--name",
            &self.agent_name,
            "--label",
            "eventpi.test=1",
            "--label",
            &fleet_label,
            "--restart",
            "unless-stopped",
            "--network",
            &self.site_network,
            "--volume",
            "/var/run/docker.sock:/var/run/docker.sock",
            "--mount",
            &reserved_mount,
            "--mount",
            &config_mount,
            "--env",
            "AUTOUPDATE_LOG=info,eventpi_autoupdate=debug",
        ];
        arguments.extend_from_slice(extra);
        arguments.push(&self.followed);
        let id = run("docker", &arguments).trim().to_string();
        self.follow_logs(&id, "first-agent");
        id
    }

    /// Copies a container's log, across its restarts, into a file of the
    /// fleet, so that it can be read after the container is removed.
    pub fn follow_logs(&self, container: &str, name: &str) {
        let path = self.directory.path().join(format!("{name}.log"));
        let log = fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let script = format!("while docker inspect {container} >/dev/null 2>&1; do docker logs --follow --since 0 {container}; sleep 0.5; done");
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("follow the container's log");
        self.followers.lock().unwrap().push(child);
    }

    /// Returns a followed log; lines may repeat when the container restarted.
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.directory.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Returns the ids of every container of this fleet.
    pub fn containers(&self) -> Vec<String> {
        let filter = format!("label=eventpi.test.fleet={}", self.id);
        docker_try(&["ps", "-aq", "--no-trunc", "--filter", &filter]).unwrap_or_default().split_whitespace().map(str::to_string).collect()
    }

    /// Returns the containers of this fleet that belong to the agent: the
    /// first one and every candidate, by name.
    pub fn agent_containers(&self) -> Vec<Value> {
        let filter = format!("name=^/{}", self.agent_name);
        let ids = docker_try(&["ps", "-aq", "--no-trunc", "--filter", &filter]).unwrap_or_default();
        ids.split_whitespace().filter_map(inspect).collect()
    }

    /// Returns the journal's state, read from the bind-mounted directory.
    pub fn state(&self) -> Option<JournalState> {
        Journal::open_read_only(&self.journal_dir()).ok().map(|journal| journal.state().clone())
    }

    /// Returns the self-update machine's state name and memory.
    pub fn machine(&self) -> Option<(String, SelfUpdateMemory)> {
        let state = self.state()?;
        let code = state.machine(2).and_then(|view| view.state)?;
        let name = eventpi_autoupdate::machine::describe_state(2, code);
        Some((name, state.self_update.clone().map(|(_, memory)| memory).unwrap_or_default()))
    }

    /// Returns the audit of the journal's leases and self-update steps.
    pub fn audit(&self) -> Audit {
        let mut journal = Journal::open_read_only(&self.journal_dir()).expect("open the journal read-only");
        audit(&journal.records().expect("read the journal's records"))
    }

    /// Waits until the journal holds a lease of `container`.
    pub fn wait_for_lease_of(&self, container: &str, timeout: Duration) {
        let holder = format!("container:{}", &container[..12]);
        wait_until(&format!("a lease of {holder}"), timeout, None, || self.state().and_then(|state| state.lease).is_some_and(|lease| lease.holder == holder));
    }

    /// Returns the status text that the agent CLI prints from the journal.
    pub fn status(&self) -> String {
        cli(&["status", "--journal", self.journal_dir().to_str().unwrap()])
    }

    /// Sends an HTTP request from a busybox container on `network` and
    /// returns the status code, 0 when the connection failed.
    pub fn request_from(&self, network: &str, url: &str, wget_options: &str) -> u16 {
        let fleet_label = format!("eventpi.test.fleet={}", self.id);
        let script =
            format!("mkdir -p /tmp; head -c 8192 /dev/zero | tr '\\0' a > /tmp/big; timeout 10 wget -q -S -O /dev/null {wget_options} {url} 2>&1; true");
        let output = Command::new("docker")
            .args(["run", "--rm", "--label", "eventpi.test=1", "--label", &fleet_label, "--network", network, BASE_IMAGE, "sh", "-c", &script])
            .stdin(Stdio::null())
            .output()
            .expect("run a busybox client");
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        let status = text.split("HTTP/1.1 ").nth(1).and_then(|rest| rest.get(..3)).and_then(|code| code.parse().ok());
        if status.is_none() {
            eprintln!("no HTTP status from {url}: {text}");
        }
        status.unwrap_or(0)
    }

    /// Returns a fleet label argument for `docker run`.
    pub fn label(&self) -> String {
        format!("eventpi.test.fleet={}", self.id)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // The agents first, and then the rest twice, because an agent may be
        // creating or connecting a container when it is removed, and the
        // engine finishes that call after the removal.
        for container in self.agent_containers() {
            let id = container["Id"].as_str().unwrap_or_default().to_string();
            let _ = Command::new("docker").args(["rm", "--force", &id]).output();
        }
        std::thread::sleep(Duration::from_secs(2));
        for _ in 0..2 {
            for id in self.containers() {
                let _ = Command::new("docker").args(["rm", "--force", &id]).output();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        for follower in self.followers.get_mut().unwrap().iter_mut() {
            // SAFETY: kill(2) on the follower's own process group.
            unsafe {
                libc::kill(-(follower.id() as i32), libc::SIGKILL);
            }
            let _ = follower.wait();
        }
        for network in [&self.site_network, &self.handover_network] {
            for _ in 0..5 {
                let removed = Command::new("docker").args(["network", "rm", network]).output().is_ok_and(|output| output.status.success());
                if removed || docker_try(&["network", "inspect", network]).is_none() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        if std::thread::panicking() {
            for name in ["first-agent", "new-agent"] {
                let log = self.log(name);
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("--- {name} log (tail) ---\n{}", lines[lines.len().saturating_sub(80)..].join("\n"));
            }
        }
    }
}
