//! The running agent's outside surface: notifications to a webhook, the
//! control socket with status and metrics, and `update-now`.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use support::{Agent, AgentSetup, Answer, Behaviour, Webhook, World, compose_file, notifications_section, push_image, wait_until};

const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const SECRET: &str = "webhook-test-secret";

fn agent_with(world: &World, extra_stack: &str, extra_sections: &str) -> Agent {
    Agent::configure(AgentSetup {
        repository: world.git.url("stack.git"),
        branch: &world.repo.branch,
        project: world.project.clone(),
        extra_stack,
        extra_sections,
    })
}

fn kinds(received: &[support::Received]) -> Vec<String> {
    received.iter().map(|request| serde_json::from_str::<serde_json::Value>(&request.body).unwrap()["kind"].as_str().unwrap().to_string()).collect()
}

fn assert_signed(request: &support::Received) {
    let timestamp = request.headers.get("x-eventpi-timestamp").expect("a timestamp header");
    let signature = request.headers.get("x-eventpi-signature").expect("a signature header");
    assert_eq!(signature, &support::python_signature(SECRET, timestamp, &request.body), "the signature verifies");
    let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(request.headers.get("x-eventpi-id"), body["id"].as_str().map(str::to_string).as_ref(), "the id header matches the body");
}

#[test]
fn outage_and_kill_lose_no_notification() {
    let world = World::new("runtime-0001");
    let good = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &good)]))]);
    let mut webhook = Webhook::start();
    let secrets = tempfile::tempdir().unwrap();
    let mut agent = agent_with(&world, "", &notifications_section(secrets.path(), &webhook, SECRET));
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    wait_until("the update-applied notification", STEP_TIMEOUT, Some(&agent), || webhook.accepted().len() == 1);

    webhook.stop();
    let mut bad_commits = Vec::new();
    for version in 7..=9 {
        let missing = format!("{}/web:v{version}", world.registry.address());
        let bad = world.repo.commit(&format!("web v{version}"), &[("compose.yaml", &compose_file(&[("web", &missing)]))]);
        wait_until("the bad commit to be rejected", STEP_TIMEOUT, Some(&agent), || agent.status().contains(&format!("rejected commit {}", &bad[..12])));
        bad_commits.push(bad);
        if version == 8 {
            agent.kill();
            agent.start();
        }
    }
    webhook.resume();
    wait_until("three more notifications", STEP_TIMEOUT, Some(&agent), || webhook.accepted().len() >= 4);
    std::thread::sleep(Duration::from_secs(3));

    let accepted = webhook.accepted();
    let later = &accepted[1..];
    let ids: std::collections::BTreeSet<String> = later.iter().map(|request| request.headers["x-eventpi-id"].clone()).collect();
    assert_eq!(ids.len(), 3, "exactly three distinct ids: {:?}", kinds(later));
    assert_eq!(later.len(), 3, "each delivered once");
    assert_eq!(kinds(later), vec!["commit-rejected"; 3]);
    for (request, bad) in later.iter().zip(&bad_commits) {
        assert!(request.body.contains(&bad[..12]), "in order: {} names {}", request.body, &bad[..12]);
        assert_signed(request);
    }
}

#[test]
fn failing_webhook_is_retried_without_duplicates() {
    let world = World::new("runtime-0002");
    let good = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let webhook = Webhook::start();
    webhook.script(&[Answer::ServerError, Answer::Hang]);
    let secrets = tempfile::tempdir().unwrap();
    let mut agent = agent_with(&world, "", &notifications_section(secrets.path(), &webhook, SECRET));
    agent.start();

    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &good)]))]);
    wait_until("the notification to be accepted", STEP_TIMEOUT, Some(&agent), || webhook.accepted().len() == 1);
    std::thread::sleep(Duration::from_secs(4));

    let received = webhook.received.lock().unwrap().clone();
    let answers: Vec<Answer> = received.iter().map(|request| request.answer).collect();
    assert_eq!(answers, vec![Answer::ServerError, Answer::Hang, Answer::Ok], "500, then a hang, then 200");
    let ids: Vec<&String> = received.iter().map(|request| &request.headers["x-eventpi-id"]).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "every attempt carries the same id: {ids:?}");
    assert_eq!(webhook.accepted().len(), 1, "no id is delivered again after the 200");
    assert!(agent.known_good_is(&first));
    assert!(agent.log().contains("notification not delivered"), "the failures are logged");
}

fn socket_request(agent: &Agent, request: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(agent.socket()).expect("connect to the control socket");
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, response)
}

fn get(agent: &Agent, path: &str) -> (u16, String) {
    socket_request(agent, &format!("GET {path} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n"))
}

fn post(agent: &Agent, path: &str, body: &str) -> (u16, String) {
    socket_request(
        agent,
        &format!("POST {path} HTTP/1.1\r\nhost: agent\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()),
    )
}

fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default()
}

#[test]
fn status_and_metrics_show_update_and_rollback() {
    let world = World::new("runtime-0003");
    let good = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let broken = push_image(&world.registry, "web", "v2", Behaviour::ExitAfter { seconds: 1 });
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &good)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    world.repo.commit("web v2, which exits", &[("compose.yaml", &compose_file(&[("web", &broken)]))]);
    wait_until("the rollback", STEP_TIMEOUT, Some(&agent), || agent.status().contains("last outcome: rolled back"));

    let (status_code, response) = get(&agent, "/status");
    assert_eq!(status_code, 200);
    let status: serde_json::Value = serde_json::from_str(body_of(&response)).expect("status is JSON");
    let stack = status["machines"].as_array().unwrap().iter().find(|machine| machine["name"] == "stack").expect("the stack machine");
    assert_eq!(status["live"], true);
    assert_eq!(stack["known_good"]["commit"], first.as_str());
    assert!(stack["last_outcome"].as_str().unwrap().starts_with("rolled back"), "{stack}");
    assert!(stack["last_error"]["message"].as_str().unwrap().contains("exited"), "{stack}");
    assert!(status["lease"]["epoch"].as_u64().unwrap() >= 1);
    assert!(status["disks"].as_array().unwrap().iter().any(|disk| disk["role"] == "reserved"), "{status}");
    assert_eq!(status["outbox"]["pending"].as_u64(), Some(3), "applied, gate failed, rollback wait in the outbox without a webhook");

    let (metrics_code, metrics_response) = get(&agent, "/metrics");
    assert_eq!(metrics_code, 200);
    let metrics = body_of(&metrics_response);
    let parse = "import sys\nfrom prometheus_client.parser import text_string_to_metric_families\nfor family in text_string_to_metric_families(sys.stdin.read()):\n    for sample in family.samples:\n        labels = ','.join(f'{k}={v}' for k, v in sorted(sample.labels.items()))\n        print(f'{sample.name}{{{labels}}} {sample.value}')\n";
    let parsed = python_stdin(parse, metrics);
    assert!(parsed.contains("autoupdate_updates_total{machine=stack,outcome=applied} 1.0"), "{parsed}");
    assert!(parsed.contains("autoupdate_updates_total{machine=stack,outcome=rolled_back} 1.0"), "{parsed}");
    assert!(parsed.contains("autoupdate_rollbacks_total{machine=stack} 1.0"), "{parsed}");
    assert!(parsed.contains("autoupdate_notifications_pending{} 3.0"), "{parsed}");
    assert!(parsed.contains("autoupdate_machine_state{machine=stack,state=Idle} 1.0"), "{parsed}");
    assert!(parsed.contains("autoupdate_update_duration_seconds_count{machine=stack} 2.0"), "{parsed}");
    assert!(parsed.contains("autoupdate_filesystem_free_bytes{path="), "{parsed}");

    let text = agent.live_status();
    assert!(text.contains("(agent 0.1.0, running)"), "{text}");
    assert!(text.contains("LED: rolled back"), "{text}");
}

fn python_stdin(script: &str, input: &str) -> String {
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "the Prometheus parser rejected the metrics: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn bad_requests_get_client_errors() {
    let world = World::new("runtime-0004");
    let good = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &good)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let before = agent.replay().len();

    let cases: Vec<(&str, (u16, String))> = vec![
        ("unknown path", get(&agent, "/nothing-here")),
        ("wrong method on status", post(&agent, "/status", "{}")),
        ("wrong method on update-now", get(&agent, "/update-now")),
        ("malformed JSON", post(&agent, "/update-now", "{not json")),
        ("unknown field", post(&agent, "/update-now", "{\"process\":\"stack\",\"force\":true}")),
        ("unknown process", post(&agent, "/update-now", "{\"process\":\"kernel\"}")),
        ("unknown press", post(&agent, "/button", "{\"press\":\"twice\"}")),
        ("oversized body", post(&agent, "/button", &format!("{{\"press\":\"{}\"}}", "x".repeat(10_000)))),
        (
            "body that never arrives",
            socket_request(&agent, "POST /button HTTP/1.1\r\nhost: agent\r\ncontent-length: 50\r\nconnection: close\r\n\r\n{\"press\""),
        ),
        ("garbage request line", socket_request(&agent, "HELLO\r\n\r\n")),
    ];
    for (case, (status, response)) in &cases {
        assert!((400..500).contains(status), "{case}: expected a 4xx answer, got {status}: {response}");
    }

    assert!(agent.is_running(), "the agent keeps running");
    assert_eq!(get(&agent, "/status").0, 200, "the socket still answers");
    assert_eq!(agent.replay().len(), before, "no request changed a machine");
}

#[test]
fn update_now_prints_progress() {
    let world = World::new("runtime-0005");
    let good = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &good)]))]);
    let mut agent = world.agent("poll_interval = \"10m\"");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    let second_image = support::push_large_image(&world.registry, "web", "v2", 8);
    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &second_image)]))]);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_autoupdate"))
        .args(["update-now", "--stack", "--config", agent.config.to_str().unwrap()])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);

    assert!(output.status.success(), "update-now succeeds: {printed}{}", String::from_utf8_lossy(&output.stderr));
    assert!(printed.contains("stack: Fetching --TipFetched--> Validating"), "{printed}");
    assert!(printed.contains(&format!("pull {second_image}: ")), "{printed}");
    assert!(printed.contains(" of 9 MiB"), "an 8 MiB random layer compresses to just over 8 MiB: {printed}");
    assert!(printed.contains(&format!("stack: applied commit {}", &second[..12])), "{printed}");
    assert!(agent.known_good_is(&second));

    let missing = format!("{}/web:v9", world.registry.address());
    world.repo.commit("web v9", &[("compose.yaml", &compose_file(&[("web", &missing)]))]);
    let rejected =
        std::process::Command::new(env!("CARGO_BIN_EXE_autoupdate")).args(["update-now", "--config", agent.config.to_str().unwrap()]).output().unwrap();
    assert_eq!(rejected.status.code(), Some(1), "a rejected commit makes update-now fail");
    assert!(String::from_utf8_lossy(&rejected.stdout).contains("does not exist"), "{}", String::from_utf8_lossy(&rejected.stdout));

    let unsupported = std::process::Command::new(env!("CARGO_BIN_EXE_autoupdate"))
        .args(["update-now", "--host", "--config", agent.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!unsupported.status.success());
    assert!(String::from_utf8_lossy(&unsupported.stderr).contains("not set up"), "{}", String::from_utf8_lossy(&unsupported.stderr));
}

#[test]
fn status_reads_journal_when_agent_is_down() {
    let world = World::new("runtime-0006");
    let good = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &good)]))]);
    let mut agent = world.agent_with_sections("", "[agent]\nname = \"runtime-device-6\"\n");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    assert!(agent.live_status().contains("running)"));

    // A second configuration with another journal but the same socket.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let journal = agent.journal.to_str().unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_config = other.path().join("other.toml");
    std::fs::write(&other_config, text.replace(journal, &other.path().join("journal").display().to_string())).unwrap();
    let shared = std::process::Command::new(env!("CARGO_BIN_EXE_autoupdate")).args(["status", "--config", other_config.to_str().unwrap()]).output().unwrap();
    let warning = String::from_utf8_lossy(&shared.stderr);
    assert!(warning.contains("another agent may use this socket"), "{warning}");
    let own = std::process::Command::new(env!("CARGO_BIN_EXE_autoupdate")).args(["status", "--config", agent.config.to_str().unwrap()]).output().unwrap();
    assert!(!String::from_utf8_lossy(&own.stderr).contains("warning"), "{}", String::from_utf8_lossy(&own.stderr));

    agent.stop();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_autoupdate")).args(["status", "--config", agent.config.to_str().unwrap()]).output().unwrap();

    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("reading the journal instead"));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("read from its journal"), "{text}");
    assert!(text.contains("runtime-device-6"), "the device name comes from the configuration: {text}");
    assert!(text.contains(&format!("known-good commit {first}")), "{text}");
    assert!(!agent.socket().exists(), "the socket is removed when the agent stops");
}
