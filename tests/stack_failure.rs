//! Stack updates that go wrong: failed health gates, reverts with the registry
//! offline, the factory reset, a flaky registry link, the on-boot policy and
//! damaged clones.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{Behaviour, CuttingProxy, World, compose_file, count_transitions, project_containers, push_image, push_large_image, run, wait_until};

const STEP_TIMEOUT: Duration = Duration::from_secs(120);

fn web_image(agent: &support::Agent) -> String {
    project_containers(&agent.project).into_iter().find(|container| container.service == "web").map(|container| container.image).unwrap_or_default()
}

#[test]
fn failed_gate_reverts_by_digest_offline() {
    let mut world = World::new("failure-0001");
    let good = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let good_digest = world.registry.manifest_digest("web", "v1");
    let broken = push_image(&world.registry, "web", "v2", Behaviour::ExitAfter { seconds: 1 });
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &good)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    // The tag v1 now points at the broken image: a revert by tag would fail.
    run("docker", &["tag", &broken, &good]);
    run("docker", &["push", "--quiet", &good]);
    assert_ne!(world.registry.manifest_digest("web", "v1"), good_digest, "the tag v1 moved");
    let bad = world.repo.commit("web v2, which exits after a second", &[("compose.yaml", &compose_file(&[("web", &broken)]))]);
    wait_until("the bad commit's images to be pulled", STEP_TIMEOUT, Some(&agent), || count_transitions(&agent, "Pulling", "Pulled", "Ready") == 2);
    world.registry.stop();

    wait_until("the revert to finish", STEP_TIMEOUT, Some(&agent), || agent.status().contains("last outcome: rolled back"));

    let status = agent.status();
    assert!(agent.known_good_is(&first), "the known-good commit stays:\n{status}");
    assert!(status.contains(&format!("rejected commit {}", &bad[..12])), "the failed commit is rejected:\n{status}");
    assert_eq!(web_image(&agent), format!("{}/web@{good_digest}", world.registry.address()), "web runs the known-good digest");
    assert_eq!(count_transitions(&agent, "Probation", "GateFailed", "Reverting"), 1);
    assert_eq!(count_transitions(&agent, "RevertProbation", "GatePassed", "Idle"), 1);

    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(count_transitions(&agent, "Fetching", "TipFetched", "Validating"), 2, "the rejected commit is not tried again");
}

#[test]
fn keep_tags_follow_known_good() {
    let world = World::new("failure-0002");
    let first_image = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let second_image = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &first_image)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let keep_filter = format!("reference=autoupdate-keep/{}:*", world.project);
    let tags = || run("docker", &["images", "--format", "{{.Tag}} {{.ID}}", "--filter", &keep_filter]);
    wait_until("the keep-tag of the first commit", STEP_TIMEOUT, Some(&agent), || tags().contains(&first[..12]));

    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &second_image)]))]);
    wait_until("the second commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&second));
    wait_until("the keep-tag to move", STEP_TIMEOUT, Some(&agent), || tags().contains(&second[..12]) && !tags().contains(&first[..12]));

    let listed = tags();
    assert_eq!(listed.lines().count(), 1, "one keep-tag per service of the known-good commit: {listed}");
    let image_id = run(
        "docker",
        &["image", "inspect", "--format", "{{.Id}}", &format!("{}/web@{}", world.registry.address(), world.registry.manifest_digest("web", "v2"))],
    );
    assert!(image_id.contains(listed.split_whitespace().nth(1).unwrap()), "the keep-tag points at the v2 image");
    assert!(agent.checkout.parent().is_some());
}

/// Writes a factory reset script that logs each start and end to `log`,
/// sleeping `seconds` in between, and exits 0.
fn reset_script(directory: &Path, log: &Path, seconds: u32) -> std::path::PathBuf {
    let script = directory.join("factory-reset.sh");
    std::fs::write(&script, format!("#!/bin/sh\necho \"start $AUTOUPDATE_RESET_REASON\" >> {log}\nsleep {seconds}\necho end >> {log}\n", log = log.display()))
        .unwrap();
    support::make_executable(&script);
    script
}

#[test]
fn double_failure_runs_factory_reset_once() {
    let world = World::new("failure-0003");
    let flags = tempfile::tempdir().unwrap();
    std::fs::write(flags.path().join("ok"), "").unwrap();
    let log = flags.path().join("reset.log");
    let script = reset_script(flags.path(), &log, 3);
    // v1 runs while the flag file exists, so the test can make it fail later.
    let flagged = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let broken = push_image(&world.registry, "web", "v2", Behaviour::ExitAfter { seconds: 1 });
    let with_flag = |image: &str| {
        format!(
            "services:\n  web:\n    image: {image}\n    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; while test -e /flags/ok; do sleep 0.2; done; exit 1\"]\n    volumes: [\"{}:/flags\"]\n    stop_grace_period: 1s\n    labels:\n      eventpi.test: \"1\"\n",
            flags.path().display()
        )
    };
    let first = world.repo.commit("web v1 with a flag", &[("compose.yaml", &with_flag(&flagged))]);
    let mut agent = world.agent(&format!("factory_reset_command = [\"{}\"]", script.display()));
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    std::fs::remove_file(flags.path().join("ok")).unwrap();
    world.repo.commit("web v2, which exits", &[("compose.yaml", &compose_file(&[("web", &broken)]))]);
    wait_until("the factory reset script to start", STEP_TIMEOUT, Some(&agent), || std::fs::read_to_string(&log).unwrap_or_default().contains("start"));
    agent.kill();
    agent.start();
    wait_until("the factory reset to finish", STEP_TIMEOUT, Some(&agent), || agent.status().contains("last outcome: factory reset"));

    let log_text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(log_text.matches("start").count(), 2, "the reset ran again after the power cut:\n{log_text}");
    assert!(log_text.contains("known-good commit"), "the script got the reason:\n{log_text}");
    assert_eq!(count_transitions(&agent, "FactoryReset", "ResetDone", "Idle"), 1, "exactly one completed reset");
    assert_eq!(count_transitions(&agent, "RevertProbation", "GateFailed", "FactoryReset"), 1, "the reset followed the failed revert");
    let status = agent.status();
    assert!(status.contains(&format!("known-good commit {} failed too", &first[..12])), "the status says why:\n{status}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count_transitions(&agent, "FactoryReset", "ResetDone", "Idle"), 1, "no retry after the reset");
}

#[test]
fn flaky_registry_link_is_retried() {
    let world = World::new("failure-0004");
    let large = push_large_image(&world.registry, "big", "v1", 24);
    let proxy = CuttingProxy::start(world.registry.port, 2 * 1024 * 1024);
    let through_proxy = large.replace(&world.registry.address(), &proxy.address());
    let small = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &small)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let before = project_containers(&world.project);

    let second = world.repo.commit("add the large image", &[("compose.yaml", &compose_file(&[("web", &small), ("big", &through_proxy)]))]);
    wait_until("a pull to fail on the cut link", Duration::from_secs(240), Some(&agent), || count_transitions(&agent, "Pulling", "PullFailed", "Idle") >= 1);

    assert!(proxy.cut_count() > 0, "the proxy cut connections");
    assert_eq!(project_containers(&world.project), before, "nothing stopped while the pull failed");
    assert!(!agent.status().contains(&format!("rejected commit {}", &second[..12])), "a cut link does not reject the commit");
    proxy.set_limit(0);
    wait_until("the commit to be applied once the link works", Duration::from_secs(240), Some(&agent), || agent.known_good_is(&second));
    assert!(agent.log().contains("backing off"), "the agent backed off between tries");
}

#[test]
fn on_boot_policy_waits_for_new_boot() {
    let world = World::new("failure-0005");
    let boot = tempfile::tempdir().unwrap();
    let boot_id = boot.path().join("boot_id");
    std::fs::write(&boot_id, "11111111-1111-1111-1111-111111111111\n").unwrap();
    let first_image = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let second_image = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &first_image)]))]);
    let mut agent = support::Agent::configure(support::AgentSetup {
        repository: world.git.url("stack.git"),
        branch: &world.repo.branch,
        project: world.project.clone(),
        extra_stack: "",
        extra_sections: &format!("[stack.apply]\npolicy = \"on-boot\"\n\n[seams]\nboot_id_file = \"{}\"\n", boot_id.display()),
    });
    agent.start();
    wait_until("the first commit to be pulled", STEP_TIMEOUT, Some(&agent), || count_transitions(&agent, "Pulling", "Pulled", "Ready") == 1);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!agent.known_good_is(&first), "nothing is applied before the boot id changes");
    assert!(project_containers(&world.project).is_empty(), "no container was started");

    std::fs::write(&boot_id, "22222222-2222-2222-2222-222222222222\n").unwrap();
    wait_until("the first commit after the new boot", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &second_image)]))]);
    wait_until("the second commit to be pulled", STEP_TIMEOUT, Some(&agent), || count_transitions(&agent, "Pulling", "Pulled", "Ready") == 2);
    std::thread::sleep(Duration::from_secs(3));
    assert!(agent.known_good_is(&first), "the second commit waits for the next boot");
    agent.kill();
    std::fs::write(&boot_id, "33333333-3333-3333-3333-333333333333\n").unwrap();
    agent.start();
    wait_until("the second commit after the reboot", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&second));
}

#[test]
fn crash_loop_takes_failure_path() {
    let world = World::new("failure-0006");
    let first_image = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let second_image = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &first_image)]))]);
    let mut agent = world.agent("probation = \"20s\"");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    agent.kill();
    agent.set_env("AUTOUPDATE_FAILPOINT", Some("stack:Probation:after-persist"));

    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &second_image)]))]);
    let mut kills = 0;
    for _ in 0..10 {
        agent.start();
        let exited = (0..150).any(|_| {
            std::thread::sleep(Duration::from_millis(200));
            !agent.is_running()
        });
        if !exited {
            break;
        }
        agent.kill();
        kills += 1;
    }

    assert!(kills >= 2, "the failpoint killed the agent {kills} times");
    assert!(kills <= 7, "the resume limit ended the crash loop after {kills} kills");
    wait_until("the attempt to end in its failure path", STEP_TIMEOUT, Some(&agent), || agent.status().contains("last outcome: rolled back"));
    assert!(agent.known_good_is(&first), "the device is back on the known-good commit");
    assert!(agent.status().contains(&format!("rejected commit {}", &second[..12])));
    assert!(agent.status().contains("restarted too often"), "the status says why:\n{}", agent.status());
}

/// Damage done to the device's clone, as a power cut in the middle of a git
/// command can leave it.
fn damage(kind: &str, checkout: &Path) {
    let git = checkout.join(".git");
    match kind {
        "stale index.lock" => std::fs::write(git.join("index.lock"), "").unwrap(),
        "garbage index" => std::fs::write(git.join("index"), vec![0xAB; 300]).unwrap(),
        "empty HEAD" => std::fs::write(git.join("HEAD"), "").unwrap(),
        "empty remote ref" => {
            let reference = std::fs::read_dir(git.join("refs/remotes/origin")).unwrap().next().unwrap().unwrap().path();
            std::fs::write(reference, "").unwrap();
        }
        "truncated pack" => {
            for entry in std::fs::read_dir(git.join("objects/pack")).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|extension| extension == "pack") {
                    let length = std::fs::metadata(&path).unwrap().len();
                    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                    file.set_len(length / 2).unwrap();
                }
            }
        }
        "garbage config" => std::fs::write(git.join("config"), "[core\n\u{0}\u{1}garbage").unwrap(),
        "missing .git" => std::fs::remove_dir_all(&git).unwrap(),
        "clone replaced by a file" => {
            std::fs::remove_dir_all(checkout).unwrap();
            std::fs::write(checkout, "not a directory").unwrap();
        }
        other => panic!("unknown damage {other}"),
    }
}

#[test]
fn damaged_clone_is_repaired() {
    let world = World::new("failure-0007");
    let images: Vec<String> = (1..=9).map(|version| push_image(&world.registry, "web", &format!("v{version}"), Behaviour::Serve)).collect();
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &images[0])]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    let kinds =
        ["stale index.lock", "garbage index", "empty HEAD", "empty remote ref", "truncated pack", "garbage config", "missing .git", "clone replaced by a file"];
    for (index, kind) in kinds.iter().enumerate() {
        agent.kill();
        let before = project_containers(&world.project);
        damage(kind, &agent.checkout);
        agent.start();
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(project_containers(&world.project), before, "{kind}: the running stack stays untouched");

        let next = world.repo.commit(&format!("web v{}", index + 2), &[("compose.yaml", &compose_file(&[("web", &images[index + 1])]))]);
        wait_until(&format!("{kind}: the next commit to be applied"), STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&next));
        let head = run("git", &["-C", agent.checkout.to_str().unwrap(), "rev-parse", "HEAD"]);
        assert_eq!(head.trim(), next, "{kind}: the repaired clone is at the new commit");
    }
}

/// Returns the id and name of every container of `project`.
fn container_names(project: &str) -> Vec<(String, String)> {
    let listed = run("docker", &["ps", "-a", "--filter", &format!("label=com.docker.compose.project={project}"), "--format", "{{.ID}} {{.Names}}"]);
    listed.lines().filter_map(|line| line.split_once(' ')).map(|(id, name)| (id.to_string(), name.to_string())).collect()
}

/// Creates the replacement that Compose v2 makes while it recreates the
/// container `id`: the same labels and image, under the temporary name
/// `<12 digits of id>_<name>`, never started.
fn create_replacement(id: &str) -> String {
    let inspected: serde_json::Value = serde_json::from_str(&run("docker", &["inspect", id])).unwrap();
    let container = &inspected[0];
    let name = container["Name"].as_str().unwrap().trim_start_matches('/');
    let temporary = format!("{}_{name}", &container["Id"].as_str().unwrap()[..12]);
    let mut arguments = vec!["create".to_string(), "--name".to_string(), temporary.clone()];
    for (key, value) in container["Config"]["Labels"].as_object().unwrap() {
        arguments.push("--label".to_string());
        arguments.push(format!("{key}={}", value.as_str().unwrap()));
    }
    arguments.push(container["Config"]["Image"].as_str().unwrap().to_string());
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    run("docker", &arguments);
    temporary
}

#[test]
fn interrupted_recreate_is_repaired() {
    let world = World::new("failure-0008");
    let web_v1 = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let web_v2 = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    // Compose stopped after creating the replacement: the old container and
    // the replacement both exist.
    let (old_id, old_name) = container_names(&world.project).pop().expect("the web container");
    let replacement = create_replacement(&old_id);
    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &web_v2)]))]);
    wait_until("the second commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&second));
    let names = container_names(&world.project);
    assert_eq!(names.len(), 1, "one container is left: {names:?}");
    assert_eq!(names[0].1, old_name, "it has the service's own name");
    assert!(!names.iter().any(|(_, name)| *name == replacement), "the replacement is gone: {names:?}");
    assert!(web_image(&agent).ends_with(&world.registry.manifest_digest("web", "v2")), "web runs v2");

    // Compose stopped after removing the old container: only the
    // replacement is left, under its temporary name.
    let (current_id, current_name) = container_names(&world.project).pop().unwrap();
    run("docker", &["stop", "--time", "1", &current_id]);
    let temporary = format!("{}_{current_name}", &current_id[..12]);
    run("docker", &["rename", &current_id, &temporary]);
    let third = world.repo.commit("web v1 again", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))]);
    wait_until("the third commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&third));
    let names = container_names(&world.project);
    assert_eq!(names.len(), 1, "one container is left: {names:?}");
    assert_eq!(names[0].1, current_name, "it has the service's own name");
    assert!(web_image(&agent).ends_with(&world.registry.manifest_digest("web", "v1")), "web runs v1");
    assert_eq!(count_transitions(&agent, "Probation", "GateFailed", "Reverting"), 0, "no update was rolled back");
}
