//! Credentials, pinned servers and signed desired state, against a real
//! registry with basic authentication, a real sshd and signed commits.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{
    Agent, AgentSetup, Behaviour, GitServer, Registry, SshServer, StackRepo, World, compose_file, generate_ssh_key, project_containers, push_image, run,
    wait_until,
};

const STEP_TIMEOUT: Duration = Duration::from_secs(90);

/// Writes `content` to `path` with permission bits `mode`.
fn write_file(path: &Path, content: &str, mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Returns the SHA256 fingerprint of the public key of the pair at `key`.
fn fingerprint(key: &Path) -> String {
    let output = run("ssh-keygen", &["-l", "-E", "sha256", "-f", key.with_extension("pub").to_str().unwrap()]);
    output.split_whitespace().nth(1).expect("ssh-keygen -l prints bits, fingerprint, comment, type").to_string()
}

fn rejected(agent: &Agent, commit: &str) -> bool {
    agent.status().contains(&format!("rejected commit {}", &commit[..12]))
}

#[test]
fn registry_basic_auth_pulls_and_hides_password() {
    let password = format!("Pw-{}-k9Xq", std::process::id());
    let registry = Registry::start_with_auth("device", &password);
    let git = GitServer::start();
    let repo = StackRepo::create(&git, "trust-0001");
    let project = format!("eventpi-test-{}", registry.port);
    let web = push_image(&registry, "web", "v1", Behaviour::Serve);
    // Without a local copy, the daemon has to ask the registry.
    run("docker", &["rmi", &web]);
    let first = repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web)]))]);
    let mut agent = Agent::configure(AgentSetup { repository: git.url("stack.git"), branch: "trust-0001", project, extra_stack: "", extra_sections: "" });

    agent.start();
    wait_until("the pull without credentials to fail", STEP_TIMEOUT, Some(&agent), || agent.status().contains("registry refused access"));
    let status = agent.status();
    assert!(status.contains(&web), "the error names the image:\n{status}");
    assert!(status.contains(&format!("[[registry]] entry for {}", registry.address())), "the error names the setting:\n{status}");
    assert!(project_containers(&agent.project).is_empty(), "nothing was started");
    agent.stop();

    let password_file = agent.directory.path().join("secrets/registry-password");
    write_file(&password_file, &format!("{password}\n"), 0o600);
    agent.append_config(&format!("[[registry]]\nhost = \"{}\"\nusername = \"device\"\npassword_file = \"{}\"", registry.address(), password_file.display()));
    agent.start();
    wait_until("the commit to become known-good with credentials", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    let containers = project_containers(&agent.project);
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].state, "running");
    assert!(containers[0].image.contains(&registry.manifest_digest("web", "v1")), "web runs the pulled digest: {}", containers[0].image);
    assert!(registry.log().contains("auth.user.name=device"), "the registry saw the device's login");
    let log = agent.log();
    assert!(log.contains("registry refused access"), "the log has the first failure");
    assert!(!log.contains(&password), "the password is in the agent log");
    let journal = agent.journal_bytes();
    assert!(!journal.is_empty(), "the journal exists");
    assert!(!journal.windows(password.len()).any(|window| window == password.as_bytes()), "the password is in the journal file");
    assert!(!agent.status().contains(&password), "the password is in the status");
    let replay = support::cli(&["replay", "--journal", agent.journal.to_str().unwrap()]);
    assert!(!replay.contains(&password), "the password is in the replay");
}

/// Returns the `[git]` section for an ssh repository with `host_key` pinned
/// and a copy of the server's deploy key in the agent's directory.
fn ssh_git_section(agent: &Agent, ssh: &SshServer, host_key: &str) -> String {
    let key_file = agent.directory.path().join("secrets/deploy_key");
    write_file(&key_file, &fs::read_to_string(&ssh.deploy_key).unwrap(), 0o600);
    format!("[git]\nssh_key_file = \"{}\"\nssh_host_keys = [\"{host_key}\"]", key_file.display())
}

#[test]
fn ssh_host_key_is_pinned() {
    let registry = Registry::start();
    let mut ssh = SshServer::start();
    let repo = StackRepo::create_in(ssh.directory.path(), "trust-0002");
    let project = format!("eventpi-test-{}", registry.port);
    let web_v1 = push_image(&registry, "web", "v1", Behaviour::Serve);
    let web_v2 = push_image(&registry, "web", "v2", Behaviour::Serve);
    let first = repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))]);
    let mut agent = Agent::configure(AgentSetup { repository: ssh.url(&repo.bare), branch: "trust-0002", project, extra_stack: "", extra_sections: "" });
    let pinned = ssh.host_key();
    agent.append_config(&ssh_git_section(&agent, &ssh, &pinned));

    agent.start();
    wait_until("the first commit over ssh to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let before = project_containers(&agent.project);
    let known_hosts = fs::read_to_string(agent.directory.path().join("reserved/state/ssh/known_hosts")).unwrap();
    assert_eq!(known_hosts, format!("[127.0.0.1]:{} {pinned}\n", ssh.port), "known_hosts holds the pinned key only");

    ssh.stop();
    ssh.regenerate_host_key();
    ssh.resume();
    let second = repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &web_v2)]))]);
    wait_until("the changed host key to be reported", STEP_TIMEOUT, Some(&agent), || agent.status().contains("does not match git.ssh_host_keys"));
    std::thread::sleep(Duration::from_secs(3));

    let status = agent.status();
    assert!(status.contains("NEEDS ATTENTION"), "the device needs attention:\n{status}");
    assert!(!status.contains("unreachable"), "a changed key is not reported as unreachable:\n{status}");
    assert!(status.contains(&format!("[127.0.0.1]:{}", ssh.port)), "the error names the server:\n{status}");
    assert!(agent.known_good_is(&first), "the known-good commit stays:\n{status}");
    assert_eq!(project_containers(&agent.project), before, "container ids and start times are unchanged");
    assert!(agent.log().contains("does not match git.ssh_host_keys"), "the log has the error");
    assert!(agent.is_running(), "the agent keeps running");

    agent.stop();
    let config = fs::read_to_string(&agent.config).unwrap();
    fs::write(&agent.config, config.replace(&pinned, &ssh.host_key())).unwrap();
    agent.start();
    wait_until("the second commit once the new key is pinned", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&second));
    let status = agent.status();
    assert!(!status.contains("NEEDS ATTENTION"), "the attention mark is cleared:\n{status}");
}

/// Keys of the signing tests: one in the device's allowed signers list and
/// one that is not.
struct Signers {
    _directory: tempfile::TempDir,
    operator: PathBuf,
    operator_public: String,
    stranger: PathBuf,
    stranger_public: String,
}

impl Signers {
    fn new() -> Signers {
        let directory = tempfile::tempdir().unwrap();
        let operator = directory.path().join("operator");
        let stranger = directory.path().join("stranger");
        let operator_public = generate_ssh_key(&operator, "operator");
        let stranger_public = generate_ssh_key(&stranger, "stranger");
        Signers { _directory: directory, operator, operator_public, stranger, stranger_public }
    }
}

/// Configures `agent` to require signed commits with an allowed signers list
/// that names `public_key`, and returns the list's path.
fn require_signatures(agent: &Agent, public_key: &str) -> PathBuf {
    let list = agent.directory.path().join("reserved/allowed_signers");
    write_file(&list, &format!("operator@example.invalid namespaces=\"git\" {public_key}\n"), 0o644);
    agent.append_config(&format!("[git]\nrequire_signed_commits = true\nallowed_signers_file = \"{}\"", list.display()));
    list
}

#[test]
fn unsigned_and_foreign_commits_are_rejected() {
    let world = World::new("trust-0003");
    let signers = Signers::new();
    let web_v1 = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let web_v2 = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let mut agent = world.agent("");
    require_signatures(&agent, &signers.operator_public);
    let first = world.repo.commit_signed("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))], &signers.operator);

    agent.start();
    wait_until("the signed commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let before = project_containers(&world.project);
    assert!(agent.log().contains("commit signature verified"), "the log records the check");

    let unsigned = world.repo.commit("web v2 unsigned", &[("compose.yaml", &compose_file(&[("web", &web_v2)]))]);
    wait_until("the unsigned commit to be rejected", STEP_TIMEOUT, Some(&agent), || rejected(&agent, &unsigned));
    let status = agent.status();
    assert!(status.contains("the commit is not signed"), "the status gives the reason:\n{status}");
    assert_eq!(project_containers(&world.project), before, "container ids and start times are unchanged");

    let foreign = world.repo.commit_signed("web v2 by a stranger", &[("compose.yaml", &compose_file(&[("web", &web_v2)]))], &signers.stranger);
    wait_until("the commit signed by another key to be rejected", STEP_TIMEOUT, Some(&agent), || rejected(&agent, &foreign));
    let status = agent.status();
    assert!(status.contains(&format!("signed by key {}", fingerprint(&signers.stranger))), "the status names the key:\n{status}");
    assert!(status.contains("not in the allowed signers list"), "the status gives the reason:\n{status}");
    assert!(agent.known_good_is(&first), "the known-good commit stays:\n{status}");
    assert_eq!(project_containers(&world.project), before, "container ids and start times are unchanged");
    let log = agent.log();
    assert!(log.contains("the commit is not signed"), "the log has the unsigned rejection");
    assert!(log.contains("not in the allowed signers list"), "the log has the foreign rejection");

    let second = world.repo.commit_signed("web v2 signed", &[("compose.yaml", &compose_file(&[("web", &web_v2)]))], &signers.operator);
    wait_until("the next signed commit to be applied", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&second));
}

#[test]
fn signers_list_rotates_by_signed_commit() {
    let world = World::new("trust-0004");
    let signers = Signers::new();
    let web_v1 = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let web_v2 = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let web_v3 = push_image(&world.registry, "web", "v3", Behaviour::Serve);
    let mut agent = world.agent("");
    let list = require_signatures(&agent, &signers.operator_public);
    let provisioned = fs::read_to_string(&list).unwrap();
    let first = world.repo.commit_signed("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))], &signers.operator);
    agent.start();
    wait_until("the signed commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    let takeover = format!("stranger@example.invalid namespaces=\"git\" {}\n", signers.stranger_public);
    let forged = world.repo.commit_signed(
        "the stranger adds itself",
        &[("compose.yaml", &compose_file(&[("web", &web_v2)])), (".autoupdate/allowed_signers", &takeover)],
        &signers.stranger,
    );
    wait_until("the self-signed rotation to be rejected", STEP_TIMEOUT, Some(&agent), || rejected(&agent, &forged));
    assert_eq!(fs::read_to_string(&list).unwrap(), provisioned, "an untrusted commit leaves the list as it is");

    let handover = format!("maintainer@example.invalid namespaces=\"git\" {}\n", signers.stranger_public);
    let rotation = world.repo.commit_signed(
        "hand the branch over to the maintainer key",
        &[("compose.yaml", &compose_file(&[("web", &web_v2)])), (".autoupdate/allowed_signers", &handover)],
        &signers.operator,
    );
    wait_until("the rotation commit to be applied", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&rotation));
    let rotated = fs::read_to_string(&list).unwrap();
    assert!(rotated.contains(&signers.stranger_public), "the list has the new key:\n{rotated}");
    assert!(!rotated.contains(&signers.operator_public), "the list dropped the old key:\n{rotated}");
    assert!(rotated.contains(&rotation), "the list names the commit it came from:\n{rotated}");

    let by_new_key = world.repo.commit_signed("web v3 by the maintainer", &[("compose.yaml", &compose_file(&[("web", &web_v3)]))], &signers.stranger);
    wait_until("a commit by the new key to be applied", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&by_new_key));

    let by_old_key = world.repo.commit_signed("web v1 by the retired key", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))], &signers.operator);
    wait_until("a commit by the retired key to be rejected", STEP_TIMEOUT, Some(&agent), || rejected(&agent, &by_old_key));
    assert!(agent.known_good_is(&by_new_key), "the device stays on the maintainer's commit");
}

#[test]
fn open_credentials_file_stops_start() {
    let directory = tempfile::tempdir().unwrap();
    let password_file = directory.path().join("registry-password");
    write_file(&password_file, "s3cr3t-never-printed\n", 0o644);
    let key_file = directory.path().join("deploy_key");
    let host_key = generate_ssh_key(&key_file, "device");
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o640)).unwrap();
    let sections = format!(
        "[git]\nssh_key_file = \"{}\"\nssh_host_keys = [\"{host_key}\"]\n\n[[registry]]\nhost = \"127.0.0.1:5000\"\nusername = \"device\"\npassword_file = \"{}\"\n",
        key_file.display(),
        password_file.display()
    );
    let mut agent = Agent::configure(AgentSetup {
        repository: "ssh://git@127.0.0.1:9/stack.git".into(),
        branch: "trust-0005",
        project: "eventpi-test-trust-0005".into(),
        extra_stack: "",
        extra_sections: &sections,
    });

    agent.start();
    let status = agent.wait_exit(Duration::from_secs(20));

    let log = agent.log();
    assert!(!status.success(), "the agent exits with a failure: {status}\n{log}");
    assert!(log.contains(&format!("credentials file {} has mode 0644", password_file.display())), "{log}");
    assert!(log.contains(&format!("credentials file {} has mode 0640", key_file.display())), "{log}");
    assert!(log.contains("it needs mode 0600"), "{log}");
    assert!(log.contains("registry[0].password_file"), "{log}");
    assert!(!log.contains("s3cr3t-never-printed"), "{log}");
    assert!(agent.journal_bytes().is_empty(), "no journal was written, so no lease was taken");

    let check = Command::new(env!("CARGO_BIN_EXE_autoupdate")).args(["check-config", agent.config.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "check-config fails: {stderr}");
    assert!(stderr.contains("has mode 0644"), "{stderr}");

    fs::set_permissions(&password_file, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_autoupdate")).args(["check-config", agent.config.to_str().unwrap()]).output().unwrap();
    assert!(check.status.success(), "check-config passes once the modes are 0600: {}", String::from_utf8_lossy(&check.stderr));
}
