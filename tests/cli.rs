//! The command line: configuration checks, status and replay of journals.

mod support;

use std::process::Command;

fn autoupdate(arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_autoupdate")).args(arguments).output().expect("run autoupdate")
}

const VALID: &str = r#"
[journal]
directory = "/var/lib/eventpi/journal"

[stack]
repository = "git://127.0.0.1/stack.git"
branch = "device-0001"
checkout = "/srv/eventpi/stack"
"#;

#[test]
fn check_config_accepts_valid_file() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("agent.toml");
    std::fs::write(&path, VALID).unwrap();

    let output = autoupdate(&["check-config", path.to_str().unwrap()]);

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("valid"));
}

#[test]
fn check_config_lists_every_problem() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("agent.toml");
    let text = VALID.replace("checkout =", "poll_interval = 30\nbogus = true\ncheckout =").replace("device-0001", "bad branch");
    std::fs::write(&path, text).unwrap();

    let output = autoupdate(&["check-config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(1), "exit status 1 on an invalid file");
    assert!(stderr.contains("line 9: stack.bogus: unknown key"), "{stderr}");
    assert!(stderr.contains("line 8: stack.poll_interval"), "{stderr}");
    assert!(stderr.contains("with its unit"), "{stderr}");
}

#[test]
fn check_config_warns_on_former_policy_key() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("agent.toml");
    std::fs::write(&path, VALID.replace("checkout =", "apply_policy = \"on-boot\"\ncheckout =")).unwrap();

    let output = autoupdate(&["check-config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert!(output.status.success(), "the former key still works: {stderr}");
    assert!(stderr.contains("warning:"), "{stderr}");
    assert!(stderr.contains("line 8: stack.apply_policy: is replaced by `policy` in [stack.apply]"), "{stderr}");
}

#[test]
fn check_config_lists_window_problems() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("agent.toml");
    let apply = "\n[stack.apply]\npolicy = \"window\"\nwindows = [\"02:00-04:00 Europe/Warszawa\", \"2:00-04:00 UTC\"]\n";
    std::fs::write(&path, format!("{VALID}{apply}")).unwrap();

    let output = autoupdate(&["check-config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("(2 problems)"), "{stderr}");
    assert!(stderr.contains("line 12: stack.apply.windows: invalid maintenance window \"02:00-04:00 Europe/Warszawa\""), "{stderr}");
    assert!(stderr.contains("\"2:00\" is not a time of day"), "{stderr}");
}

#[test]
fn check_config_reports_syntax_line() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("agent.toml");
    std::fs::write(&path, "[journal]\ndirectory = \"/x\"\n[stack\n").unwrap();

    let output = autoupdate(&["check-config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("line 3"), "{stderr}");
}

#[test]
fn check_config_names_missing_file() {
    let output = autoupdate(&["check-config", "/nonexistent/agent.toml"]);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("/nonexistent/agent.toml"), "{stderr}");
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn status_of_missing_journal_fails_clearly() {
    let directory = tempfile::tempdir().unwrap();

    let output = autoupdate(&["status", "--journal", directory.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert!(!output.status.success());
    assert!(stderr.contains("journal.bin"), "the error names the file: {stderr}");
}

#[test]
fn replay_of_garbage_file_fails_clearly() {
    let directory = tempfile::tempdir().unwrap();
    std::fs::write(directory.path().join("journal.bin"), vec![0x55u8; 100_000]).unwrap();

    let output = autoupdate(&["replay", "--journal", directory.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert!(!output.status.success());
    assert!(stderr.contains("no valid header"), "{stderr}");
}

#[test]
fn diagram_of_unknown_machine_lists_machines() {
    let output = autoupdate(&["diagram", "toaster"]);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert!(!output.status.success());
    assert!(stderr.contains("stack"), "{stderr}");
}

#[test]
fn status_without_agent_names_options() {
    let directory = tempfile::tempdir().unwrap();
    let socket = directory.path().join("absent.sock");

    let output = autoupdate(&["status", "--socket", socket.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("absent.sock"), "the error names the socket: {stderr}");
    assert!(stderr.contains("pass --journal DIR"), "the error says what to pass: {stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "the cause appears once: {stderr}");
}
