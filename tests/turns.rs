//! Turns between the stack update and the host patch inside one agent: only
//! one of them changes the device at a time, and the status shows the one
//! that waits and why.

mod support;

#[path = "support/host.rs"]
mod host;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use host::{Package, TestHost};
use support::{Agent, AgentSetup, Behaviour, World, compose_file, push_image, wait_until};

const STEP_TIMEOUT: Duration = Duration::from_secs(180);

fn status_json(agent: &Agent) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_autoupdate")).args(["status", "--json", "--config", agent.config.to_str().unwrap()]).output().unwrap();
    serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null)
}

fn turn_holder(agent: &Agent) -> Option<String> {
    status_json(agent)["turn"]["process"].as_str().map(str::to_string)
}

fn waiting_reason(agent: &Agent, machine: &str) -> Option<String> {
    let status = status_json(agent);
    status["machines"].as_array()?.iter().find(|view| view["name"] == machine)?["waiting"].as_str().map(str::to_string)
}

fn update_now(agent: &Agent, flag: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_autoupdate"))
        .args(["update-now", flag, "--config", agent.config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> (bool, String) {
    let output = child.wait_with_output().unwrap();
    (output.status.success(), format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
}

fn last_position(agent: &Agent, machine: &str, from: &str, to: &str) -> Option<usize> {
    agent.replay().iter().rposition(|transition| transition.machine == machine && transition.from == from && transition.to == to)
}

#[test]
fn stack_and_host_patch_take_turns() {
    let world = World::new("turns-0001");
    let test_host = TestHost::start();
    test_host.publish(&Package::new("hello", "1.0"));
    test_host.install(&["hello"]);
    test_host.publish(&Package::new("hello", "2.0"));

    let first_image = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let second_image = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let third_image = push_image(&world.registry, "web", "v3", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &first_image)]))]);
    let mut agent = Agent::configure(AgentSetup {
        repository: world.git.url("stack.git"),
        branch: &world.repo.branch,
        project: world.project.clone(),
        extra_stack: "probation = \"15s\"",
        extra_sections: &test_host.host_section("interval = \"1h\""),
    });
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    // The stack update holds the turn through its probation, so a host patch
    // requested meanwhile waits for it.
    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &second_image)]))]);
    wait_until("the stack update to hold the turn", STEP_TIMEOUT, Some(&agent), || turn_holder(&agent).as_deref() == Some("stack"));
    let host_request = update_now(&agent, "--host");
    wait_until("the host patch to wait for its turn", STEP_TIMEOUT, Some(&agent), || waiting_reason(&agent, "host-patch").is_some());
    let reason = waiting_reason(&agent, "host-patch").unwrap();
    assert!(reason.contains("waiting for stack to finish"), "the status says why the host patch waits: {reason}");
    assert!(reason.contains(&second[..12]), "and names the commit being applied: {reason}");
    assert_eq!(test_host.version("hello").as_deref(), Some("1.0"), "nothing was upgraded during the stack update");

    let (host_ok, host_output) = finish(host_request);
    assert!(host_ok, "the host patch ran after the stack update: {host_output}");
    assert!(host_output.contains("host-patch: patched"), "{host_output}");
    assert!(agent.known_good_is(&second));
    assert_eq!(test_host.version("hello").as_deref(), Some("2.0"));
    let stack_done = last_position(&agent, "stack", "Probation", "Idle").unwrap();
    let host_started = agent.replay().iter().position(|transition| transition.machine == "host-patch").unwrap();
    assert!(stack_done < host_started, "the host patch started only after the stack update ended");

    // Now the host patch holds the turn with a slow upgrade, so a pulled
    // stack update waits for it.
    test_host.publish(&Package::new("hello", "3.0").preinst("sleep 15"));
    let host_request = update_now(&agent, "--host");
    wait_until("the host patch to hold the turn", STEP_TIMEOUT, Some(&agent), || turn_holder(&agent).as_deref() == Some("host-patch"));
    let third = world.repo.commit("web v3", &[("compose.yaml", &compose_file(&[("web", &third_image)]))]);
    wait_until("the stack update to wait for its turn", STEP_TIMEOUT, Some(&agent), || waiting_reason(&agent, "stack").is_some());
    let reason = waiting_reason(&agent, "stack").unwrap();
    assert!(reason.contains("waiting for host-patch to finish"), "{reason}");
    assert!(!agent.known_good_is(&third));

    let (host_ok, host_output) = finish(host_request);
    assert!(host_ok, "{host_output}");
    wait_until("the stack update after the host patch", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&third));
    let replayed = agent.replay();
    let host_done =
        replayed.iter().rposition(|transition| transition.machine == "host-patch" && transition.to == "Done").expect("the second host patch is done");
    let stack_applied =
        replayed.iter().rposition(|transition| transition.machine == "stack" && transition.event == "PolicyAllows").expect("the third commit was applied");
    assert!(host_done < stack_applied, "the stack update applied only after the host patch ended");
}
