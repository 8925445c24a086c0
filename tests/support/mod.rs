//! Real components for integration tests: a registry, a git server, test
//! images, a stack repository with a device branch, and the agent process.
//!
//! Everything a test creates in Docker carries the label `eventpi.test=1` and
//! names unique to the test (the registry's port is part of every image name
//! and of the Compose project), so tests can run side by side on one engine.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tempfile::TempDir;

/// Label on every container and image the tests create.
pub const TEST_LABEL: &str = "eventpi.test=1";

/// Base image of every test image: busybox-static in a `FROM scratch` image.
pub const BASE_IMAGE: &str = "eventpi-test/busybox:1";

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

/// Runs a command and returns its standard output, panicking with its
/// standard error when it fails.
pub fn run(program: &str, arguments: &[&str]) -> String {
    run_in(None, program, arguments)
}

pub fn run_in(directory: Option<&Path>, program: &str, arguments: &[&str]) -> String {
    let mut command = Command::new(program);
    command.args(arguments).stdin(Stdio::null());
    if let Some(directory) = directory {
        command.current_dir(directory);
    }
    let output = command.output().unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {arguments:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until `condition` holds, checking every 200 ms, and panics with
/// `what` and the agent's log when `timeout` passes first.
pub fn wait_until(what: &str, timeout: Duration, agent: Option<&Agent>, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let log = agent.map(Agent::log_tail).unwrap_or_default();
    panic!("timed out after {timeout:?} waiting for {what}\n--- agent log (tail) ---\n{log}");
}

/// A Docker registry (Debian's docker-registry) on a loopback port, with its
/// storage in a temporary directory.
pub struct Registry {
    pub port: u16,
    directory: TempDir,
    child: Option<Child>,
}

impl Registry {
    pub fn start() -> Registry {
        let directory = tempfile::tempdir().expect("temporary directory");
        let mut registry = Registry { port: free_port(), directory, child: None };
        registry.resume();
        registry
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the registry again on the same port and storage.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "registry already running");
        let config = self.directory.path().join("config.yml");
        let storage = self.directory.path().join("storage");
        let log = self.directory.path().join("registry.log");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n",
                storage.display(),
                self.port
            ),
        )
        .unwrap();
        let log_file = fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new("docker-registry")
            .args(["serve", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start docker-registry; run scripts/setup-host.sh first");
        self.child = Some(child);
        wait_until("the registry to listen", Duration::from_secs(20), None, || TcpStream::connect(self.address()).is_ok());
    }

    /// Stops the registry; its storage stays for `resume`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_until("the registry port to close", Duration::from_secs(10), None, || TcpStream::connect(self.address()).is_err());
    }

    /// Returns the manifest digest the registry serves for `name:tag`, read
    /// from its `Docker-Content-Digest` header.
    pub fn manifest_digest(&self, name: &str, tag: &str) -> String {
        let mut stream = TcpStream::connect(self.address()).expect("connect to the registry");
        let request = format!(
            "HEAD /v2/{name}/manifests/{tag} HTTP/1.1\r\nHost: {}\r\nAccept: application/vnd.docker.distribution.manifest.v2+json\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n",
            self.address()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case("docker-content-digest").then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no digest for {name}:{tag} in: {response}"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Local copies of this registry's images: the port makes the names unique to this test.
        let references = Command::new("docker")
            .args(["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", &format!("reference={}/*", self.address())])
            .output();
        if let Ok(output) = references {
            for reference in String::from_utf8_lossy(&output.stdout).lines() {
                let _ = Command::new("docker").args(["rmi", "--force", reference]).output();
            }
        }
    }
}

/// `git daemon` serving the bare repositories in a temporary directory.
pub struct GitServer {
    pub port: u16,
    pub base: TempDir,
    child: Option<Child>,
}

impl GitServer {
    pub fn start() -> GitServer {
        let base = tempfile::tempdir().expect("temporary directory");
        let mut server = GitServer { port: free_port(), base, child: None };
        server.resume();
        server
    }

    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "git daemon already running");
        let base = self.base.path().to_str().unwrap().to_string();
        let child = Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
                &format!("--port={}", self.port),
                &format!("--base-path={base}"),
                &base,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start git daemon");
        self.child = Some(child);
        let address = format!("127.0.0.1:{}", self.port);
        wait_until("git daemon to listen", Duration::from_secs(20), None, || TcpStream::connect(&address).is_ok());
    }

    /// Stops the daemon and the children it forked for open connections.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            kill_group(child);
        }
        let address = format!("127.0.0.1:{}", self.port);
        wait_until("git daemon port to close", Duration::from_secs(10), None, || TcpStream::connect(&address).is_err());
    }

    pub fn url(&self, repository: &str) -> String {
        format!("git://127.0.0.1:{}/{repository}", self.port)
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            kill_group(child);
        }
    }
}

/// Kills a child started with `process_group(0)` together with its group.
fn kill_group(mut child: Child) {
    // SAFETY: kill(2) on the child's own process group.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
}

/// A bare repository with a work tree used to commit and push to the device
/// branch, as an operator would.
pub struct StackRepo {
    pub bare: PathBuf,
    pub work: PathBuf,
    pub branch: String,
}

impl StackRepo {
    /// Creates `<server base>/stack.git` and an empty work tree on `branch`.
    pub fn create(server: &GitServer, branch: &str) -> StackRepo {
        let bare = server.base.path().join("stack.git");
        let work = server.base.path().join("work");
        run("git", &["init", "--quiet", "--bare", "--initial-branch=main", bare.to_str().unwrap()]);
        run("git", &["init", "--quiet", &format!("--initial-branch={branch}"), work.to_str().unwrap()]);
        let repo = StackRepo { bare, work, branch: branch.to_string() };
        repo.git(&["config", "user.name", "Stack Operator"]);
        repo.git(&["config", "user.email", "operator@example.invalid"]);
        repo.git(&["remote", "add", "origin", repo.bare.to_str().unwrap()]);
        repo
    }

    pub fn git(&self, arguments: &[&str]) -> String {
        run_in(Some(&self.work), "git", arguments)
    }

    /// Writes `files`, commits them and pushes the branch. Returns the commit id.
    pub fn commit(&self, message: &str, files: &[(&str, &str)]) -> String {
        for (name, content) in files {
            let path = self.work.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, content).unwrap();
        }
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message]);
        self.push();
        self.head()
    }

    pub fn push(&self) {
        self.git(&["push", "--quiet", "--force", "origin", &format!("HEAD:refs/heads/{}", self.branch)]);
    }

    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"]).trim().to_string()
    }
}

/// Builds the busybox base image once per engine. Tests run in separate
/// processes, so a lock file serialises the first build.
pub fn ensure_base_image() {
    let lock_path = std::env::temp_dir().join("eventpi-test-base-image.lock");
    let lock = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).unwrap();
    lock.lock().expect("lock the base image build");

    let present = Command::new("docker").args(["image", "inspect", BASE_IMAGE]).output().map(|output| output.status.success());
    if present.unwrap_or(false) {
        return;
    }
    let context = tempfile::tempdir().unwrap();
    fs::copy("/bin/busybox", context.path().join("busybox")).expect("copy /bin/busybox: install busybox-static");
    fs::write(
        context.path().join("Dockerfile"),
        format!("FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nLABEL {TEST_LABEL}\n"),
    )
    .unwrap();
    run("docker", &["build", "--quiet", "--tag", BASE_IMAGE, context.path().to_str().unwrap()]);
}

/// What a test image's main process does.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Prints its version and runs until stopped.
    Serve,
    /// Exits with status 1 after `seconds`.
    ExitAfter { seconds: u32 },
    /// Runs until stopped and has a healthcheck that passes once `/tmp/ready` exists,
    /// which the process creates after `seconds`.
    HealthyAfter { seconds: u32 },
    /// Runs until stopped with a healthcheck that always fails.
    Unhealthy,
}

/// Builds `<registry>/<name>:<tag>` from the base image and pushes it. The
/// version text makes each (name, tag) a distinct image with its own digest.
pub fn push_image(registry: &Registry, name: &str, tag: &str, behaviour: Behaviour) -> String {
    ensure_base_image();
    let reference = format!("{}/{name}:{tag}", registry.address());
    let version = format!("{name}-{tag}");
    let (command, healthcheck) = match behaviour {
        Behaviour::Serve => (format!("echo {version}; trap 'exit 0' TERM; while true; do sleep 1; done"), String::new()),
        Behaviour::ExitAfter { seconds } => (format!("echo {version}; sleep {seconds}; exit 1"), String::new()),
        Behaviour::HealthyAfter { seconds } => (
            format!("echo {version}; trap 'exit 0' TERM; sleep {seconds}; touch /tmp/ready; while true; do sleep 1; done"),
            "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD [\"test\", \"-e\", \"/tmp/ready\"]\n".to_string(),
        ),
        Behaviour::Unhealthy => (
            format!("echo {version}; trap 'exit 0' TERM; while true; do sleep 1; done"),
            "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD [\"false\"]\n".to_string(),
        ),
    };
    let context = tempfile::tempdir().unwrap();
    fs::write(
        context.path().join("Dockerfile"),
        format!("FROM {BASE_IMAGE}\nLABEL {TEST_LABEL} eventpi.test.version=\"{version}\"\n{healthcheck}CMD [\"sh\", \"-c\", \"{command}\"]\n"),
    )
    .unwrap();
    run("docker", &["build", "--quiet", "--tag", &reference, context.path().to_str().unwrap()]);
    run("docker", &["push", "--quiet", &reference]);
    reference
}

/// Returns a compose file for `services`, each `(name, image reference)`,
/// labelled for cleanup and stopped quickly.
pub fn compose_file(services: &[(&str, &str)]) -> String {
    let mut text = String::from("services:\n");
    for (name, image) in services {
        text.push_str(&format!("  {name}:\n    image: {image}\n    stop_grace_period: 1s\n    labels:\n      eventpi.test: \"1\"\n"));
    }
    text
}

/// One transition as `autoupdate replay --json` prints it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Transition {
    pub machine: String,
    pub from: String,
    pub event: String,
    pub to: String,
    pub attempt: u32,
    pub wall_ms: u64,
    pub monotonic_ms: u64,
}

/// The agent binary under test, with a configuration and a journal in a
/// temporary directory.
pub struct Agent {
    pub directory: TempDir,
    pub config: PathBuf,
    pub journal: PathBuf,
    pub checkout: PathBuf,
    pub project: String,
    log: PathBuf,
    child: Option<Child>,
    environment: Vec<(String, String)>,
}

/// Settings for a test agent; `extra` is appended to the `[stack]` section.
pub struct AgentSetup<'a> {
    pub repository: String,
    pub branch: &'a str,
    pub project: String,
    pub extra_stack: &'a str,
    pub extra_sections: &'a str,
}

impl Agent {
    /// Writes the configuration; `start` runs the agent.
    /// `extra_stack` lines replace the default line with the same key.
    pub fn configure(setup: AgentSetup<'_>) -> Agent {
        let directory = tempfile::tempdir().expect("temporary directory");
        let journal = directory.path().join("reserved/journal");
        let checkout = directory.path().join("device/stack");
        let config = directory.path().join("agent.toml");
        let defaults = [
            format!("repository = \"{}\"", setup.repository),
            format!("branch = \"{}\"", setup.branch),
            format!("checkout = \"{}\"", checkout.display()),
            format!("project = \"{}\"", setup.project),
            "poll_interval = \"1s\"".to_string(),
            "probation = \"2s\"".to_string(),
            "git_timeout = \"20s\"".to_string(),
            "compose_timeout = \"2m\"".to_string(),
            "pull_timeout = \"2m\"".to_string(),
            "retry_backoff_min = \"1s\"".to_string(),
            "retry_backoff_max = \"3s\"".to_string(),
        ];
        let key_of = |line: &str| line.split('=').next().unwrap_or_default().trim().to_string();
        let overridden: Vec<String> = setup.extra_stack.lines().map(key_of).collect();
        let mut stack: Vec<String> = defaults.into_iter().filter(|line| !overridden.contains(&key_of(line))).collect();
        stack.extend(setup.extra_stack.lines().map(str::to_string));
        fs::write(
            &config,
            format!(
                "[journal]\ndirectory = \"{}\"\nsize_kib = 256\n\n[stack]\n{}\n\n{}\n",
                journal.display(),
                stack.join("\n"),
                setup.extra_sections
            ),
        )
        .unwrap();
        let log = directory.path().join("agent.log");
        Agent { directory, config, journal, checkout, project: setup.project, log, child: None, environment: Vec::new() }
    }

    pub fn with_env(mut self, key: &str, value: &str) -> Agent {
        self.environment.push((key.to_string(), value.to_string()));
        self
    }

    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.environment.retain(|(existing, _)| existing != key);
        if let Some(value) = value {
            self.environment.push((key.to_string(), value.to_string()));
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_autoupdate"));
        command
            .args(["run", "--config", self.config.to_str().unwrap()])
            .env("AUTOUPDATE_LOG", "info,eventpi_autoupdate=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (key, value) in &self.environment {
            command.env(key, value);
        }
        self.child = Some(command.spawn().expect("start the agent"));
    }

    /// Sends SIGTERM and waits for the exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent is running");
        // SAFETY: kill(2) on the agent's own pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        wait_for_exit(&mut child, Duration::from_secs(20))
    }

    /// Kills the agent with SIGKILL, as a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Returns the exit status once the agent exited by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent is running");
        wait_for_exit(&mut child, timeout)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().map(|status| status.is_none()).unwrap_or(false),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Returns every transition in the journal, read by `autoupdate replay --json`.
    pub fn replay(&self) -> Vec<Transition> {
        if !self.journal.join("journal.bin").exists() {
            return Vec::new();
        }
        let output = cli(&["replay", "--json", "--journal", self.journal.to_str().unwrap()]);
        serde_json::from_str(&output).unwrap_or_else(|error| panic!("replay output is not JSON: {error}: {output}"))
    }

    /// Returns the text of `autoupdate status`.
    pub fn status(&self) -> String {
        if !self.journal.join("journal.bin").exists() {
            return String::new();
        }
        cli(&["status", "--journal", self.journal.to_str().unwrap()])
    }

    /// Tells whether the status names `commit` as the known-good commit.
    pub fn known_good_is(&self, commit: &str) -> bool {
        self.status().contains(&format!("known-good commit {commit}"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("--- agent log (tail) ---\n{}", self.log_tail());
        }
        remove_project(&self.project);
    }
}

fn wait_for_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("agent did not exit within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the agent's CLI and returns its standard output.
pub fn cli(arguments: &[&str]) -> String {
    run(env!("CARGO_BIN_EXE_autoupdate"), arguments)
}

/// Removes a Compose project's containers, networks and keep-tags.
pub fn remove_project(project: &str) {
    let label = format!("label=com.docker.compose.project={project}");
    let ids = Command::new("docker").args(["ps", "-aq", "--filter", &label]).output().map(|output| output.stdout).unwrap_or_default();
    for id in String::from_utf8_lossy(&ids).split_whitespace() {
        let _ = Command::new("docker").args(["rm", "--force", "--volumes", id]).output();
    }
    let networks = Command::new("docker").args(["network", "ls", "-q", "--filter", &label]).output().map(|output| output.stdout).unwrap_or_default();
    for id in String::from_utf8_lossy(&networks).split_whitespace() {
        let _ = Command::new("docker").args(["network", "rm", id]).output();
    }
    let volumes = Command::new("docker").args(["volume", "ls", "-q", "--filter", &label]).output().map(|output| output.stdout).unwrap_or_default();
    for id in String::from_utf8_lossy(&volumes).split_whitespace() {
        let _ = Command::new("docker").args(["volume", "rm", "--force", id]).output();
    }
    let keep = Command::new("docker")
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", &format!("reference=autoupdate-keep/{project}:*")])
        .output()
        .map(|output| output.stdout)
        .unwrap_or_default();
    for reference in String::from_utf8_lossy(&keep).lines() {
        let _ = Command::new("docker").args(["rmi", reference]).output();
    }
}

/// One container of a Compose project, as `docker inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub service: String,
    pub image: String,
    pub state: String,
    pub started_at: String,
}

/// Returns the containers of a Compose project, sorted by service.
pub fn project_containers(project: &str) -> Vec<ContainerInfo> {
    let ids = run("docker", &["ps", "-aq", "--filter", &format!("label=com.docker.compose.project={project}")]);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let mut arguments = vec!["inspect"];
    arguments.extend(ids);
    let inspected: serde_json::Value = serde_json::from_str(&run("docker", &arguments)).unwrap();
    let mut containers: Vec<ContainerInfo> = inspected
        .as_array()
        .unwrap()
        .iter()
        .map(|container| ContainerInfo {
            id: container["Id"].as_str().unwrap().to_string(),
            service: container["Config"]["Labels"]["com.docker.compose.service"].as_str().unwrap_or_default().to_string(),
            image: container["Config"]["Image"].as_str().unwrap_or_default().to_string(),
            state: container["State"]["Status"].as_str().unwrap_or_default().to_string(),
            started_at: container["State"]["StartedAt"].as_str().unwrap_or_default().to_string(),
        })
        .collect();
    containers.sort_by(|left, right| left.service.cmp(&right.service));
    containers
}

/// Makes a file executable.
pub fn make_executable(path: &Path) {
    let mut permissions = fs::metadata(path).unwrap().permissions();
    permissions.set_mode(0o755);
    fs::set_permissions(path, permissions).unwrap();
}

/// Builds a fresh test setup: a registry, a git server and a stack repository.
pub struct World {
    pub registry: Registry,
    pub git: GitServer,
    pub repo: StackRepo,
    pub project: String,
}

impl World {
    pub fn new(branch: &str) -> World {
        let registry = Registry::start();
        let git = GitServer::start();
        let repo = StackRepo::create(&git, branch);
        let project = format!("eventpi-test-{}", registry.port);
        World { registry, git, repo, project }
    }

    pub fn agent(&self, extra_stack: &str) -> Agent {
        self.agent_with_sections(extra_stack, "")
    }

    /// Configures an agent with `extra_sections` appended after `[stack]`,
    /// such as `[stack.apply]` or `[seams]`.
    pub fn agent_with_sections(&self, extra_stack: &str, extra_sections: &str) -> Agent {
        Agent::configure(AgentSetup {
            repository: self.git.url("stack.git"),
            branch: &self.repo.branch,
            project: self.project.clone(),
            extra_stack,
            extra_sections,
        })
    }
}

/// The file behind the agent's `[seams] clock_file`: the agent reads the wall
/// time and the synchronised flag from it on every look at the clock.
pub struct ClockFile {
    pub directory: TempDir,
    pub path: PathBuf,
}

impl ClockFile {
    /// Creates the file with `time` (RFC 3339) and the synchronised flag.
    pub fn new(time: &str, synced: bool) -> ClockFile {
        let directory = tempfile::tempdir().expect("temporary directory");
        let path = directory.path().join("clock");
        let clock = ClockFile { directory, path };
        clock.set(time, synced);
        clock
    }

    /// Sets the wall time and the flag. The file is replaced by a rename, so
    /// the agent never reads it half written.
    pub fn set(&self, time: &str, synced: bool) {
        let staging = self.directory.path().join("clock.new");
        fs::write(&staging, format!("{time} {}\n", if synced { "synced" } else { "unsynced" })).unwrap();
        fs::rename(&staging, &self.path).unwrap();
    }

    /// Returns the `[seams]` section that points the agent at this file.
    pub fn section(&self) -> String {
        format!("[seams]\nclock_file = \"{}\"\n", self.path.display())
    }
}

/// Returns the milliseconds since the epoch of an RFC 3339 UTC time such as
/// `2025-06-11T00:00:00Z`.
pub fn epoch_ms(time: &str) -> u64 {
    let output = run("date", &["--utc", "--date", time, "+%s"]);
    output.trim().parse::<u64>().expect("date prints seconds") * 1000
}

/// A TCP proxy on a loopback port in front of the registry. While its limit
/// is non-zero, the link goes down after that many bytes from the registry:
/// the connection carrying them is cut and every later connection is closed
/// at once, until `set_limit(0)` brings the link back.
pub struct CuttingProxy {
    pub port: u16,
    limit: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Connections that were cut.
    pub cuts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CuttingProxy {
    pub fn start(upstream_port: u16, limit: u64) -> CuttingProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let limit = Arc::new(AtomicU64::new(limit));
        let cuts = Arc::new(AtomicU64::new(0));
        let (thread_limit, thread_cuts) = (limit.clone(), cuts.clone());
        let sent_total = Arc::new(AtomicU64::new(0));
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let allowed = thread_limit.load(Ordering::SeqCst);
                if allowed > 0 && thread_cuts.load(Ordering::SeqCst) > 0 {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                if allowed == 0 {
                    thread_cuts.store(0, Ordering::SeqCst);
                    sent_total.store(0, Ordering::SeqCst);
                }
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)) else { continue };
                let cuts = thread_cuts.clone();
                let sent_total = sent_total.clone();
                let (mut client_read, mut upstream_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut client_read, &mut upstream_write);
                    let _ = upstream_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut upstream_read, mut client_write) = (upstream, client);
                thread::spawn(move || {
                    let mut buffer = [0u8; 16 * 1024];
                    loop {
                        let count = match upstream_read.read(&mut buffer) {
                            Ok(0) | Err(_) => break,
                            Ok(count) => count,
                        };
                        let sent = sent_total.fetch_add(count as u64, Ordering::SeqCst);
                        if allowed > 0 && sent + count as u64 > allowed {
                            let part = allowed.saturating_sub(sent) as usize;
                            let _ = client_write.write_all(&buffer[..part.min(count)]);
                            cuts.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        if client_write.write_all(&buffer[..count]).is_err() {
                            break;
                        }
                    }
                    let _ = client_write.shutdown(std::net::Shutdown::Both);
                    let _ = upstream_read.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingProxy { port, limit, cuts }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sets the bytes allowed per connection; 0 lets everything through.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn cut_count(&self) -> u64 {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Builds and pushes `<registry>/<name>:<tag>` with a layer of `megabytes`
/// of random data, so that a pull takes many reads.
pub fn push_large_image(registry: &Registry, name: &str, tag: &str, megabytes: usize) -> String {
    ensure_base_image();
    let reference = format!("{}/{name}:{tag}", registry.address());
    let context = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; megabytes * 1024 * 1024];
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(registry.port);
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    fs::write(context.path().join("payload.bin"), data).unwrap();
    fs::write(
        context.path().join("Dockerfile"),
        format!("FROM {BASE_IMAGE}\nLABEL {TEST_LABEL}\nCOPY payload.bin /payload.bin\nCMD [\"sh\", \"-c\", \"trap 'exit 0' TERM; while true; do sleep 1; done\"]\n"),
    )
    .unwrap();
    run("docker", &["build", "--quiet", "--tag", &reference, context.path().to_str().unwrap()]);
    run("docker", &["push", "--quiet", &reference]);
    // Without a local copy of its layers, a pull has to download them.
    run("docker", &["rmi", &reference]);
    reference
}

/// Counts the transitions `from --event--> to` of the stack machine.
pub fn count_transitions(agent: &Agent, from: &str, event: &str, to: &str) -> usize {
    agent.replay().iter().filter(|transition| transition.machine == "stack" && transition.from == from && transition.event == event && transition.to == to).count()
}
