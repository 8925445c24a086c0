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
    assert!(output.status.success(), "{program} {arguments:?} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr));
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
    auth: Option<RegistryAuth>,
}

/// Basic authentication of a test registry: an htpasswd file on the
/// registry's side, and a Docker client configuration, of this registry
/// alone, that pushes log in with.
struct RegistryAuth {
    username: String,
    password: String,
    docker_config: PathBuf,
}

impl Registry {
    pub fn start() -> Registry {
        let directory = tempfile::tempdir().expect("temporary directory");
        let mut registry = Registry { port: free_port(), directory, child: None, auth: None };
        registry.first_start();
        registry
    }

    /// Starts a registry that requires HTTP basic authentication (htpasswd,
    /// bcrypt) over plain HTTP on its loopback port, and logs the test's own
    /// Docker client configuration in to it for pushes.
    pub fn start_with_auth(username: &str, password: &str) -> Registry {
        let directory = tempfile::tempdir().expect("temporary directory");
        let htpasswd = run("htpasswd", &["-Bbn", username, password]);
        fs::write(directory.path().join("htpasswd"), htpasswd).unwrap();
        let docker_config = directory.path().join("docker-client");
        fs::create_dir_all(&docker_config).unwrap();
        let auth = RegistryAuth { username: username.to_string(), password: password.to_string(), docker_config };
        let mut registry = Registry { port: free_port(), directory, child: None, auth: Some(auth) };
        registry.first_start();

        let login = Command::new("docker")
            .args(["login", "--username", username, "--password-stdin", &registry.address()])
            .env("DOCKER_CONFIG", &registry.auth.as_ref().unwrap().docker_config)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run docker login");
        let mut login = login;
        login.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
        let output = login.wait_with_output().unwrap();
        assert!(output.status.success(), "docker login failed: {}", String::from_utf8_lossy(&output.stderr));
        registry
    }

    /// Pushes a local image to this registry, logged in when it needs it.
    pub fn push(&self, reference: &str) {
        let mut command = Command::new("docker");
        command.args(["push", "--quiet", reference]).stdin(Stdio::null());
        if let Some(auth) = &self.auth {
            command.env("DOCKER_CONFIG", &auth.docker_config);
        }
        let output = command.output().expect("run docker push");
        assert!(output.status.success(), "docker push {reference} failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// Returns the registry's log: its access log lists every request.
    pub fn log(&self) -> String {
        fs::read_to_string(self.directory.path().join("registry.log")).unwrap_or_default()
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the registry again on the same port and storage.
    /// Starts the registry for the first time. Another test can take the
    /// free port before the registry binds it, so a registry that exits at
    /// start is tried again on a new port.
    fn first_start(&mut self) {
        for _ in 0..5 {
            if self.spawn() {
                return;
            }
            self.port = free_port();
        }
        panic!("docker-registry exited at start on five ports; see {}", self.directory.path().join("registry.log").display());
    }

    /// Starts the registry again on its port, with its storage kept.
    pub fn resume(&mut self) {
        assert!(self.spawn(), "docker-registry exited at start on port {}; see {}", self.port, self.directory.path().join("registry.log").display());
    }

    /// Starts docker-registry and waits until it listens. Returns false when
    /// the process exits instead, for example because its port is taken.
    fn spawn(&mut self) -> bool {
        assert!(self.child.is_none(), "registry already running");
        let config = self.directory.path().join("config.yml");
        let storage = self.directory.path().join("storage");
        let log = self.directory.path().join("registry.log");
        let auth = match &self.auth {
            Some(_) => format!("auth:\n  htpasswd:\n    realm: eventpi-test\n    path: {}\n", self.directory.path().join("htpasswd").display()),
            None => String::new(),
        };
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n{auth}",
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
        let mut child = child;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if TcpStream::connect(self.address()).is_ok() {
                // A listener of another process on a reused port also accepts,
                // so the registry must still run a moment later.
                thread::sleep(Duration::from_millis(200));
                if child.try_wait().ok().flatten().is_some() {
                    return false;
                }
                self.child = Some(child);
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("timed out after 20s waiting for the registry to listen on port {}", self.port);
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
        let authorization = match &self.auth {
            Some(auth) => {
                let pair = format!("{}:{}", auth.username, auth.password);
                format!("Authorization: Basic {}\r\n", base64_encode(pair.as_bytes()))
            }
            None => String::new(),
        };
        let request = format!(
            "HEAD /v2/{name}/manifests/{tag} HTTP/1.1\r\nHost: {}\r\n{authorization}Accept: application/vnd.docker.distribution.manifest.v2+json\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n",
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
        let references =
            Command::new("docker").args(["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", &format!("reference={}/*", self.address())]).output();
        if let Ok(output) = references {
            for reference in String::from_utf8_lossy(&output.stdout).lines() {
                let _ = Command::new("docker").args(["rmi", "--force", reference]).output();
            }
        }
    }
}

/// Encodes `bytes` as standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in bytes.chunks(3) {
        let value = chunk.iter().enumerate().fold(0u32, |value, (index, byte)| value | u32::from(*byte) << (16 - 8 * index));
        for index in 0..4 {
            if index <= chunk.len() {
                text.push(ALPHABET[(value >> (18 - 6 * index) & 63) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    text
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
            .args(["daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1", &format!("--port={}", self.port), &format!("--base-path={base}"), &base])
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

/// Creates an ed25519 key pair without a passphrase at `path` and
/// `path.pub`, and returns the public key as `type base64`.
pub fn generate_ssh_key(path: &Path, comment: &str) -> String {
    run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path.to_str().unwrap()]);
    public_key(path)
}

/// Returns the public key of the pair at `path` as `type base64`.
pub fn public_key(path: &Path) -> String {
    let text = fs::read_to_string(path.with_extension("pub")).expect("read the public key");
    text.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// Debian's OpenSSH server on a loopback port, started as a plain process
/// with its own host key and configuration. It accepts one deploy key for
/// the user running the tests, and git runs over it with that user's rights.
pub struct SshServer {
    pub port: u16,
    pub directory: TempDir,
    /// Private deploy key that the server accepts.
    pub deploy_key: PathBuf,
    child: Option<Child>,
}

impl SshServer {
    pub fn start() -> SshServer {
        let directory = tempfile::tempdir().expect("temporary directory");
        let deploy_key = directory.path().join("deploy_key");
        let deploy_public = generate_ssh_key(&deploy_key, "eventpi-test-deploy");
        fs::write(directory.path().join("authorized_keys"), format!("restrict {deploy_public}\n")).unwrap();
        let mut server = SshServer { port: free_port(), directory, deploy_key, child: None };
        server.regenerate_host_key();
        server.resume();
        server
    }

    fn host_key_path(&self) -> PathBuf {
        self.directory.path().join("ssh_host_ed25519_key")
    }

    /// Returns the public host key as `type base64`.
    pub fn host_key(&self) -> String {
        public_key(&self.host_key_path())
    }

    /// Replaces the host key with a new one; a running server uses it from
    /// the next connection.
    pub fn regenerate_host_key(&mut self) {
        let path = self.host_key_path();
        let _ = fs::remove_file(&path);
        let _ = fs::remove_file(path.with_extension("pub"));
        generate_ssh_key(&path, "eventpi-test-host");
    }

    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "sshd already running");
        let user = run("id", &["-un"]).trim().to_string();
        if user == "root" {
            // sshd started by root needs its privilege separation directory,
            // which Debian's service unit creates.
            fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        }

        let config = self.directory.path().join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\nAllowUsers {user}\nLogLevel VERBOSE\n",
                self.port,
                self.host_key_path().display(),
                self.directory.path().join("authorized_keys").display(),
            ),
        )
        .unwrap();

        let log = fs::OpenOptions::new().create(true).append(true).open(self.directory.path().join("sshd.log")).unwrap();
        // sshd re-executes itself, so it needs its absolute path.
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start /usr/sbin/sshd; run scripts/setup-host.sh first");
        self.child = Some(child);
        let address = format!("127.0.0.1:{}", self.port);
        wait_until("sshd to listen", Duration::from_secs(20), None, || TcpStream::connect(&address).is_ok());
    }

    /// Stops the server and the session processes it forked.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            kill_group(child);
        }
        let address = format!("127.0.0.1:{}", self.port);
        wait_until("sshd port to close", Duration::from_secs(10), None, || TcpStream::connect(&address).is_err());
    }

    /// Returns the `ssh://` URL of a repository at an absolute path.
    pub fn url(&self, repository: &Path) -> String {
        let user = run("id", &["-un"]).trim().to_string();
        format!("ssh://{user}@127.0.0.1:{}{}", self.port, repository.display())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.directory.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for SshServer {
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
        StackRepo::create_in(server.base.path(), branch)
    }

    /// Creates `<base>/stack.git` and an empty work tree on `branch`.
    pub fn create_in(base: &Path, branch: &str) -> StackRepo {
        let bare = base.join("stack.git");
        let work = base.join("work");
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

    /// Like [`StackRepo::commit`], with an SSH signature by the private key
    /// at `key`.
    pub fn commit_signed(&self, message: &str, files: &[(&str, &str)], key: &Path) -> String {
        for (name, content) in files {
            let path = self.work.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, content).unwrap();
        }
        self.git(&["add", "--all"]);
        let signing_key = format!("user.signingkey={}", key.display());
        self.git(&["-c", "gpg.format=ssh", "-c", &signing_key, "commit", "--quiet", "--allow-empty", "--gpg-sign", "-m", message]);
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
    registry.push(&reference);
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
    binary: PathBuf,
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
        let socket = directory.path().join("control.sock");
        let control = if setup.extra_sections.contains("[control]") { String::new() } else { format!("[control]\nsocket = \"{}\"\n", socket.display()) };
        fs::write(
            &config,
            format!(
                "[journal]\ndirectory = \"{}\"\nsize_kib = 256\n\n[stack]\n{}\n\n{control}\n{}\n",
                journal.display(),
                stack.join("\n"),
                setup.extra_sections
            ),
        )
        .unwrap();
        let log = directory.path().join("agent.log");
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_autoupdate"));
        Agent { directory, config, journal, checkout, project: setup.project, log, child: None, environment: Vec::new(), binary }
    }

    /// Runs another build of the agent, such as the release binary.
    pub fn with_binary(mut self, binary: PathBuf) -> Agent {
        self.binary = binary;
        self
    }

    /// Appends `text` to the configuration file, for sections such as
    /// `[git]` or `[[registry]]`.
    pub fn append_config(&self, text: &str) {
        let mut file = fs::OpenOptions::new().append(true).open(&self.config).unwrap();
        file.write_all(format!("\n{text}\n").as_bytes()).unwrap();
    }

    /// Returns the bytes of the journal file, empty when it does not exist.
    pub fn journal_bytes(&self) -> Vec<u8> {
        fs::read(self.journal.join("journal.bin")).unwrap_or_default()
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
        let mut command = Command::new(&self.binary);
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

    /// Returns the text of `autoupdate status` from the running agent.
    pub fn live_status(&self) -> String {
        cli(&["status", "--config", self.config.to_str().unwrap()])
    }

    /// Returns the control socket of this agent.
    pub fn socket(&self) -> PathBuf {
        self.directory.path().join("control.sock")
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
        format!(
            "FROM {BASE_IMAGE}\nLABEL {TEST_LABEL}\nCOPY payload.bin /payload.bin\nCMD [\"sh\", \"-c\", \"trap 'exit 0' TERM; while true; do sleep 1; done\"]\n"
        ),
    )
    .unwrap();
    run("docker", &["build", "--quiet", "--tag", &reference, context.path().to_str().unwrap()]);
    registry.push(&reference);
    // Without a local copy of its layers, a pull has to download them.
    run("docker", &["rmi", &reference]);
    reference
}

/// Counts the transitions `from --event--> to` of the stack machine.
pub fn count_transitions(agent: &Agent, from: &str, event: &str, to: &str) -> usize {
    agent
        .replay()
        .iter()
        .filter(|transition| transition.machine == "stack" && transition.from == from && transition.event == event && transition.to == to)
        .count()
}

/// How the webhook receiver answers the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    ServerError,
    /// Reads the request and never answers.
    Hang,
}

/// One request the webhook receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
    /// How the receiver answered it.
    pub answer: Answer,
}

/// A webhook receiver on a loopback port that records every request. Its
/// answers come from a script, then `Answer::Ok` once the script runs out.
pub struct Webhook {
    pub port: u16,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    script: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Answer>>>,
    running: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Webhook {
    pub fn start() -> Webhook {
        let mut webhook = Webhook { port: free_port(), received: Default::default(), script: Default::default(), running: None };
        webhook.resume();
        webhook
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Queues answers for the next requests.
    pub fn script(&self, answers: &[Answer]) {
        self.script.lock().unwrap().extend(answers.iter().copied());
    }

    /// Starts listening again on the same port.
    pub fn resume(&mut self) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind the webhook port");
        listener.set_nonblocking(true).unwrap();
        let running = std::sync::Arc::new(AtomicBool::new(true));
        let (flag, received, script) = (running.clone(), self.received.clone(), self.script.clone());
        thread::spawn(move || {
            while flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (received, script) = (received.clone(), script.clone());
                        thread::spawn(move || serve_webhook_request(stream, &received, &script));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        self.running = Some(running);
    }

    /// Stops listening: connections are refused until `resume`.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        let address = format!("127.0.0.1:{}", self.port);
        wait_until("the webhook port to close", Duration::from_secs(5), None, || TcpStream::connect(&address).is_err());
    }

    /// Returns the requests answered with `Answer::Ok`.
    pub fn accepted(&self) -> Vec<Received> {
        self.received.lock().unwrap().iter().filter(|request| request.answer == Answer::Ok).cloned().collect()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

fn serve_webhook_request(mut stream: TcpStream, received: &std::sync::Mutex<Vec<Received>>, script: &std::sync::Mutex<std::collections::VecDeque<Answer>>) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut data = Vec::new();
    let mut buffer = [0u8; 4096];
    let header_end = loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(count) => data.extend_from_slice(&buffer[..count]),
        }
        if let Some(position) = data.windows(4).position(|window| window == b"\r\n\r\n") {
            break position + 4;
        }
    };
    let head = String::from_utf8_lossy(&data[..header_end]).into_owned();
    let mut headers = std::collections::HashMap::new();
    for line in head.lines().skip(1) {
        if let Some((key, value)) = line.split_once(':') {
            headers.insert(key.trim().to_lowercase(), value.trim().to_string());
        }
    }
    let length: usize = headers.get("content-length").and_then(|value| value.parse().ok()).unwrap_or(0);
    while data.len() < header_end + length {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(count) => data.extend_from_slice(&buffer[..count]),
        }
    }
    let body = String::from_utf8_lossy(&data[header_end..header_end + length]).into_owned();
    let answer = script.lock().unwrap().pop_front().unwrap_or(Answer::Ok);
    received.lock().unwrap().push(Received { headers, body, answer });
    match answer {
        Answer::Ok => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
        Answer::ServerError => {
            let _ = stream.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
        Answer::Hang => thread::sleep(Duration::from_secs(30)),
    }
}

/// Computes `sha256=<hex>` of HMAC-SHA256 over `<timestamp>.<body>` with
/// Python's hmac module, independent of the agent's own code.
pub fn python_signature(secret: &str, timestamp: &str, body: &str) -> String {
    let script =
        "import hmac, hashlib, sys; print('sha256=' + hmac.new(sys.argv[1].encode(), (sys.argv[2] + '.' + sys.argv[3]).encode(), hashlib.sha256).hexdigest())";
    run("python3", &["-c", script, secret, timestamp, body]).trim().to_string()
}

/// Writes a webhook secret file with mode 0600 and returns the config section.
pub fn notifications_section(directory: &Path, webhook: &Webhook, secret: &str) -> String {
    let path = directory.join("webhook.secret");
    fs::write(&path, secret).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "[notifications]\nwebhook_url = \"{}\"\nsecret_file = \"{}\"\ntimeout = \"2s\"\nretry_backoff_min = \"500ms\"\nretry_backoff_max = \"2s\"\n",
        webhook.url(),
        path.display()
    )
}

/// A size-limited tmpfs on a fresh directory, unmounted when dropped.
pub struct Tmpfs {
    _directory: TempDir,
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(megabytes: u64) -> Tmpfs {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        run("mount", &["-t", "tmpfs", "-o", &format!("size={megabytes}m,mode=0755"), "eventpi-test", path.to_str().unwrap()]);
        Tmpfs { _directory: directory, path }
    }

    /// Changes the size limit in place. Bind mounts of the tmpfs, in
    /// containers too, see the new size at once.
    pub fn resize(&self, megabytes: u64) {
        run("mount", &["-o", &format!("remount,size={megabytes}m"), self.path.to_str().unwrap()]);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount(&self.path);
    }
}

/// Unmounts `path`, lazily when a process still uses it.
pub fn unmount(path: &Path) {
    let unmounted = Command::new("umount").arg(path).stderr(Stdio::null()).status().is_ok_and(|status| status.success());
    if !unmounted {
        let _ = Command::new("umount").arg("--lazy").arg(path).status();
    }
}
