//! Self-update by handover, with the agent in real containers on the local
//! Docker engine: the agent follows a tag in a test registry, and each test
//! pushes a new version of the agent's image, good or broken, to that tag.
//!
//! The images are built FROM scratch from a static build with failpoints
//! (scripts/self-update-test-image.sh). A broken version carries its
//! failpoint in its image's environment, so only its containers honour it.

mod support;

#[path = "support/selfupdate.rs"]
mod fleet;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use eventpi_autoupdate::machine::selfupdate::SELF_UPDATE_TABLE;
use fleet::{Fleet, HANDOVER_PORT, base_image, container_log, docker_try, inspect, kill_main_process};
use serde_json::Value;
use support::{Tmpfs, run, wait_until};

const STEP_TIMEOUT: Duration = Duration::from_secs(120);

fn labels_of(container: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(container["Config"]["Labels"].clone()).unwrap_or_default()
}

fn networks_of(container: &Value) -> BTreeSet<String> {
    container["NetworkSettings"]["Networks"].as_object().map(|networks| networks.keys().cloned().collect()).unwrap_or_default()
}

fn mounts_of(container: &Value) -> BTreeSet<(String, String, bool)> {
    container["Mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|mount| {
            (
                mount["Source"].as_str().unwrap_or_default().to_string(),
                mount["Destination"].as_str().unwrap_or_default().to_string(),
                mount["RW"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

fn short(id: &str) -> &str {
    &id[..12]
}

/// Waits until the agent's only container is a new one that runs
/// `version` under the first container's name, and returns it.
fn wait_for_new_agent(fleet: &Fleet, old: &str, version: &str) -> Value {
    wait_until(&format!("the agent to run {version} under its first name"), STEP_TIMEOUT, None, || {
        let containers = fleet.agent_containers();
        containers.len() == 1
            && containers[0]["Id"] != old
            && containers[0]["Name"] == format!("/{}", fleet.agent_name)
            && labels_of(&containers[0]).get("eventpi.test.version").map(String::as_str) == Some(version)
    });
    fleet.agent_containers().pop().expect("the agent's container")
}

/// Waits until the self-update machine is back in `Idle` with `digest`
/// marked as failed and no candidate container left.
fn wait_for_failed_attempt(fleet: &Fleet, digest: &str) {
    let candidate = format!("{}-update-1", fleet.agent_name);
    wait_until(&format!("image {digest} to be marked failed and its container removed"), STEP_TIMEOUT, None, || {
        let marked = fleet.machine().is_some_and(|(state, memory)| state == "Idle" && memory.failed.iter().any(|failed| failed.digest.to_string() == digest));
        marked && inspect(&candidate).is_none()
    });
}

/// Checks what a failed attempt leaves: the old agent with its lease and its
/// container, the digest marked with a retry time, and a notification.
fn assert_old_agent_kept_control(fleet: &Fleet, old: &str, digest: &str) {
    let audit = fleet.audit();
    assert_eq!(audit.leases.len(), 1, "no other agent took a lease: {:?}", audit.leases);
    assert_eq!(audit.leases[0].holder, format!("container:{}", short(old)));
    assert!(audit.overlaps().is_empty(), "{:?}", audit.overlaps());

    let containers = fleet.agent_containers();
    assert_eq!(containers.len(), 1, "only the old agent is left");
    assert_eq!(containers[0]["Id"], old);
    assert_eq!(containers[0]["State"]["Status"], "running");

    let (_, memory) = fleet.machine().unwrap();
    let failed = memory.failed.iter().find(|failed| failed.digest.to_string() == digest).expect("the digest is marked failed");
    assert_eq!(failed.failures, 1);
    let state = fleet.state().unwrap();
    let failed_at = state.machine(2).and_then(|view| view.last_change).map(|meta| meta.monotonic_ms).unwrap();
    let delay = failed.retry_at.ms.saturating_sub(failed_at);
    assert!((45_000..=61_000).contains(&delay), "the retry waits the minimum backoff of 1m less up to 20 % jitter, not {delay} ms");
    assert!(state.outbox.iter().any(|notification| notification.kind == "self-update-failed"), "{:?}", state.outbox);

    // The check runs every second, but the failed digest waits for its retry time.
    let attempts = memory.attempts_started;
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(fleet.machine().unwrap().1.attempts_started, attempts, "no new attempt during the backoff");
}

/// Starts the first agent on version v1 and waits for its lease.
fn start_v1(fleet: &Fleet, extra: &[&str]) -> String {
    fleet.push_version("v1", None);
    let old = fleet.start_agent(extra);
    fleet.wait_for_lease_of(&old, STEP_TIMEOUT);
    old
}

#[test]
fn update_replaces_agent_container() {
    let fleet = Fleet::new("");
    assert!(docker_try(&["network", "inspect", &fleet.handover_network]).is_none(), "the agent creates the handover network");
    let old = start_v1(&fleet, &["--label", "site=hall-4", "--label", "com.docker.compose.project=eventpi-test-not-a-stack", "--env", "TZ=Europe/Warsaw"]);
    let before = inspect(&old).unwrap();

    let digest = fleet.push_version("v2", None);
    let new = wait_for_new_agent(&fleet, &old, "v2");

    let new_id = new["Id"].as_str().unwrap().to_string();
    let labels = labels_of(&new);
    for (key, value) in labels_of(&before).iter().filter(|(key, _)| !key.starts_with("com.docker.compose.") && *key != "eventpi.test.version") {
        assert_eq!(labels.get(key), Some(value), "label {key} is kept");
    }
    assert!(!labels.keys().any(|key| key.starts_with("com.docker.compose.")), "{labels:?}");
    assert_eq!(mounts_of(&new), mounts_of(&before));
    let mut expected_networks = networks_of(&before);
    expected_networks.insert(fleet.handover_network.clone());
    assert_eq!(networks_of(&new), expected_networks);
    assert_eq!(new["HostConfig"]["RestartPolicy"]["Name"], "unless-stopped");
    let environment: Vec<String> = serde_json::from_value(new["Config"]["Env"].clone()).unwrap();
    assert!(environment.contains(&"TZ=Europe/Warsaw".to_string()), "{environment:?}");
    let repo_digests = inspect_image_digests(new["Image"].as_str().unwrap());
    assert!(repo_digests.iter().any(|entry| entry.ends_with(&digest)), "{repo_digests:?}");
    let network = docker_try(&["network", "inspect", "--format", "{{index .Labels \"eventpi.autoupdate.network\"}}", &fleet.handover_network]);
    assert_eq!(network.as_deref().map(str::trim), Some("1"), "the agent created the handover network");

    let audit = fleet.audit();
    let holders: Vec<(u64, String)> = audit.leases.iter().map(|lease| (lease.epoch, lease.holder.clone())).collect();
    assert_eq!(holders, vec![(1, format!("container:{}", short(&old))), (2, format!("container:{}", short(&new_id)))]);
    assert_eq!(audit.confirmed.iter().map(|confirmed| confirmed.epoch).collect::<Vec<_>>(), vec![2]);
    assert!(audit.overlaps().is_empty(), "{:?}", audit.overlaps());
    let steps: Vec<(String, u64)> = audit.steps.iter().map(|step| (step.to.clone(), step.epoch)).collect();
    let expected: Vec<(String, u64)> =
        [("Checking", 1), ("Pulling", 1), ("Creating", 1), ("Starting", 1), ("HandingOver", 1), ("Probation", 2), ("Retiring", 2), ("Idle", 2)]
            .iter()
            .map(|(state, epoch)| (state.to_string(), *epoch))
            .collect();
    assert_eq!(steps, expected);
    wait_until("the status to show the update", Duration::from_secs(10), None, || fleet.status().contains(&format!("updated to image {digest}")));
}

fn inspect_image_digests(image: &str) -> Vec<String> {
    let text = run("docker", &["image", "inspect", "--format", "{{json .RepoDigests}}", image]);
    serde_json::from_str(text.trim()).unwrap_or_default()
}

#[test]
fn update_now_self_streams_progress() {
    let fleet = Fleet::new("check_interval = \"1h\"");
    let old = start_v1(&fleet, &[]);
    let cli = ["exec", old.as_str(), "/autoupdate", "update-now", "--self", "--config", "/etc/eventpi/autoupdate.toml"];
    let up_to_date = run("docker", &cli);
    assert!(up_to_date.contains("self-update: the agent runs the newest image"), "{up_to_date}");

    let digest = fleet.push_version("v2", None);
    let output = run("docker", &cli);

    assert!(output.contains("self-update: Starting --Ready--> HandingOver"), "{output}");
    assert!(output.contains("self-update: handed over to container"), "{output}");
    let new = wait_for_new_agent(&fleet, &old, "v2");
    let status = run("docker", &["exec", new["Id"].as_str().unwrap(), "/autoupdate", "status", "--config", "/etc/eventpi/autoupdate.toml"]);
    assert!(status.contains("self-update: Idle"), "{status}");
    assert!(status.contains(&format!("last outcome: updated to image {digest}")), "{status}");
    assert!(
        status.contains(&format!("holder container:{}", short(new["Id"].as_str().unwrap())))
            || status.contains(&format!("held by container:{}", short(new["Id"].as_str().unwrap()))),
        "{status}"
    );
}

#[test]
fn exiting_candidate_is_removed() {
    let fleet = Fleet::new("");
    let old = start_v1(&fleet, &[]);

    let digest = fleet.push_version("v2", Some("self-update:Candidate:before-command"));
    wait_for_failed_attempt(&fleet, &digest);

    assert_old_agent_kept_control(&fleet, &old, &digest);
    let (_, memory) = fleet.machine().unwrap();
    let reason = &memory.failure_of(&digest.parse().unwrap()).unwrap().reason;
    assert!(reason.contains("restarted") || reason.contains("exit code"), "{reason}");
}

#[test]
fn silent_candidate_times_out() {
    let fleet = Fleet::new("start_timeout = \"6s\"");
    let old = start_v1(&fleet, &[]);

    let digest = fleet.push_version("v2", Some("self-update:Candidate:stall"));
    wait_for_failed_attempt(&fleet, &digest);

    assert_old_agent_kept_control(&fleet, &old, &digest);
    let (_, memory) = fleet.machine().unwrap();
    let reason = &memory.failure_of(&digest.parse().unwrap()).unwrap().reason;
    assert!(reason.contains("did not respond on the handover API within 6s"), "{reason}");
}

#[test]
fn lost_response_counts_as_handover() {
    let fleet = Fleet::new("");
    let old = start_v1(&fleet, &[]);

    fleet.push_version("v2", Some("self-update:Candidate:drop-response"));
    let new = wait_for_new_agent(&fleet, &old, "v2");

    let audit = fleet.audit();
    assert_eq!(audit.leases.len(), 2, "{:?}", audit.leases);
    assert_eq!(audit.leases[1].holder, format!("container:{}", short(new["Id"].as_str().unwrap())));
    assert!(audit.aborted.is_empty(), "the old agent did not withdraw the lease it found taken: {:?}", audit.aborted);
    assert_eq!(audit.confirmed.len(), 1);
    assert!(audit.overlaps().is_empty(), "{:?}", audit.overlaps());
    let log = fleet.log("first-agent");
    assert!(log.contains("the response was lost, but the journal shows the new agent's lease"), "{log}");
    let new_log = container_log(new["Id"].as_str().unwrap());
    assert!(new_log.contains("drop-response"), "the candidate dropped its response: {new_log}");
}

#[test]
fn crash_looping_candidate_is_taken_back() {
    let fleet = Fleet::new("");
    let old = start_v1(&fleet, &[]);

    let digest = fleet.push_version("v2", Some("self-update:Probation:before-command"));
    wait_for_failed_attempt(&fleet, &digest);

    let audit = fleet.audit();
    let holders: Vec<String> = audit.leases.iter().map(|lease| lease.holder.clone()).collect();
    let old_holder = format!("container:{}", short(&old));
    assert_eq!(holders.len(), 3, "{holders:?}");
    assert_eq!(holders[0], old_holder);
    assert_ne!(holders[1], old_holder, "the candidate took epoch 2");
    assert_eq!(holders[2], old_holder, "the old agent took the lease back with epoch 3");
    assert!(audit.confirmed.is_empty());
    assert!(audit.overlaps().is_empty(), "{:?}", audit.overlaps());
    let taken_back = audit.steps.iter().find(|step| step.event == "TakenBack").expect("a TakenBack step");
    assert_eq!(taken_back.epoch, 3);
    assert!(audit.steps.iter().any(|step| step.to == "Idle" && step.epoch == 3), "the old agent acts again: {:?}", audit.steps);
    let containers = fleet.agent_containers();
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0]["Id"], old);
    let (_, memory) = fleet.machine().unwrap();
    let reason = &memory.failure_of(&digest.parse().unwrap()).unwrap().reason;
    assert!(reason.contains("restarted"), "{reason}");
}

#[test]
fn restarted_old_agent_stays_passive() {
    let fleet = Fleet::new("probation = \"15s\"\nconfirm_timeout = \"90s\"");
    let old = start_v1(&fleet, &[]);

    fleet.push_version("v2", None);
    wait_until("the candidate to take lease epoch 2", STEP_TIMEOUT, None, || fleet.state().is_some_and(|state| state.lease_epoch() == 2));
    kill_main_process(&old);
    wait_until("the engine to restart the old agent", Duration::from_secs(30), None, || {
        inspect(&old).is_some_and(|container| container["RestartCount"].as_i64() == Some(1) && container["State"]["Status"] == "running")
    });
    wait_until("the restarted old agent to watch the handover", Duration::from_secs(30), None, || {
        fleet.log("first-agent").matches("handed over; watching the new agent's probation without acting").count() >= 2
    });
    let new = wait_for_new_agent(&fleet, &old, "v2");

    let audit = fleet.audit();
    let holders: Vec<String> = audit.leases.iter().map(|lease| lease.holder.clone()).collect();
    assert_eq!(holders, vec![format!("container:{}", short(&old)), format!("container:{}", short(new["Id"].as_str().unwrap()))]);
    assert!(audit.overlaps().is_empty(), "{:?}", audit.overlaps());
    assert!(audit.steps.iter().skip_while(|step| step.epoch == 1).all(|step| step.epoch == 2), "{:?}", audit.steps);
    assert_eq!(audit.confirmed.len(), 1);
}

#[test]
fn killed_candidate_is_cleaned_up() {
    let fleet = Fleet::new("start_timeout = \"60s\"");
    let old = start_v1(&fleet, &[]);
    let candidate = format!("{}-update-1", fleet.agent_name);

    let digest = fleet.push_version("v2", Some("self-update:Candidate:stall"));
    wait_until("the candidate to run", STEP_TIMEOUT, None, || inspect(&candidate).is_some_and(|container| container["State"]["Status"] == "running"));
    kill_main_process(&candidate);
    wait_for_failed_attempt(&fleet, &digest);

    assert_old_agent_kept_control(&fleet, &old, &digest);
    let (_, memory) = fleet.machine().unwrap();
    assert!(memory.failure_of(&digest.parse().unwrap()).unwrap().reason.contains("restarted"));

    // A candidate left behind by an agent that stopped between creating it
    // and recording it, and another agent's candidate.
    let fleet_label = fleet.label();
    let agent_label = format!("eventpi.autoupdate.agent={}", fleet.agent_name);
    let orphan = format!("{}-update-7", fleet.agent_name);
    let foreign = format!("eventpi-test-foreign-{}", fleet.id);
    for (name, agent) in [(&orphan, agent_label.as_str()), (&foreign, "eventpi.autoupdate.agent=eventpi-test-someone-else")] {
        run(
            "docker",
            &[
                "run",
                "--detach",
                "--name",
                name,
                "--label",
                "eventpi.test=1",
                "--label",
                &fleet_label,
                "--label",
                "eventpi.autoupdate.candidate=7",
                "--label",
                agent,
                "--entrypoint",
                "sleep",
                base_image(),
                "600",
            ],
        );
    }
    kill_main_process(&old);

    wait_until("the restarted agent to remove the orphaned candidate", STEP_TIMEOUT, None, || inspect(&orphan).is_none());
    assert!(inspect(&foreign).is_some_and(|container| container["State"]["Status"] == "running"), "another agent's candidate is not touched");
    let audit = fleet.audit();
    assert_eq!(audit.leases.len(), 1, "the restarted agent kept its own lease: {:?}", audit.leases);
    assert!(fleet.log("first-agent").contains("removed a candidate container that holds no lease"));
}

#[test]
fn handover_api_rejects_bad_requests() {
    let fleet = Fleet::new("start_timeout = \"45s\"");
    let old = start_v1(&fleet, &["--env", "AUTOUPDATE_FAILPOINT=self-update:Starting:stall"]);
    let candidate = format!("{}-update-1", fleet.agent_name);

    let digest = fleet.push_version("v2", None);
    wait_until("the candidate to serve the handover API", STEP_TIMEOUT, None, || container_log(&candidate).contains("candidate: serving the handover API"));
    let candidate_info = inspect(&candidate).unwrap();
    let environment: Vec<String> = serde_json::from_value(candidate_info["Config"]["Env"].clone()).unwrap();
    let token = environment.iter().find_map(|entry| entry.strip_prefix("AUTOUPDATE_HANDOVER_TOKEN=")).expect("the candidate's token").to_string();
    let records_before = journal_records(&fleet);

    let url = |path: &str| format!("http://{candidate}:{HANDOVER_PORT}{path}");
    let bearer = format!("--header 'Authorization: Bearer {token}'");
    let valid = format!(r#"{{"epoch":1,"offered_epoch":2,"old_container":"{old}","digest":"{digest}"}}"#);
    let cases = [
        ("no token", url("/ready"), String::new(), 401),
        ("wrong token", url("/ready"), "--header 'Authorization: Bearer 0000'".to_string(), 401),
        ("wrong token with a valid body", url("/handover"), format!("--header 'Authorization: Bearer 0000' --post-data '{valid}'"), 401),
        ("malformed body", url("/handover"), format!("{bearer} --post-data 'not json'"), 400),
        ("oversized body", url("/handover"), format!("{bearer} --post-file /tmp/big"), 413),
        ("unknown field", url("/handover"), format!("{bearer} --post-data '{{\"epoch\":1,\"admin\":true}}'"), 400),
        ("valid body while no handover is offered", url("/handover"), format!("{bearer} --post-data '{valid}'"), 409),
        ("wrong method", url("/handover"), bearer.clone(), 405),
        ("unknown path", url("/admin"), bearer.clone(), 404),
    ];
    for (case, url, options, expected) in &cases {
        let status = fleet.request_from(&fleet.handover_network, url, options);
        assert_eq!(status, *expected, "{case}");
    }
    let site_address = candidate_info["NetworkSettings"]["Networks"][&fleet.site_network]["IPAddress"].as_str().unwrap().to_string();
    let from_site = fleet.request_from(&fleet.site_network, &format!("http://{site_address}:{HANDOVER_PORT}/ready"), &bearer);
    assert_eq!(from_site, 0, "the API listens only on the handover network");
    assert_eq!(candidate_info["HostConfig"]["PortBindings"].as_object().map_or(0, |ports| ports.len()), 0, "no host port is published");
    assert_eq!(docker_try(&["port", &candidate]).unwrap_or_default().trim(), "");

    assert_eq!(journal_records(&fleet), records_before, "no rejected request changed the journal");
    let (state, _) = fleet.machine().unwrap();
    assert_eq!(state, "Starting");
    let candidate_after = inspect(&candidate).unwrap();
    assert_eq!(candidate_after["State"]["Status"], "running");
    assert_eq!(candidate_after["RestartCount"], 0);

    wait_for_failed_attempt(&fleet, &digest);
    assert_eq!(fleet.audit().leases.len(), 1);
}

fn journal_records(fleet: &Fleet) -> usize {
    let mut journal = eventpi_autoupdate::journal::Journal::open_read_only(&fleet.journal_dir()).unwrap();
    journal.records().unwrap().len()
}

#[test]
fn unrelated_containers_are_untouched() {
    let fleet = Fleet::new("");
    let hostname = format!("eventpi-agent-{}", fleet.id);
    let old = start_v1(&fleet, &["--hostname", &hostname]);
    run("docker", &["network", "create", "--label", "eventpi.test=1", "--label", &fleet.label(), &fleet.handover_network]);

    let fleet_label = fleet.label();
    let mut bystanders = Vec::new();
    for index in 0..10 {
        let name = format!("eventpi-test-bystander-{}-{index}", fleet.id);
        let mut arguments = vec!["--name".to_string(), name.clone(), "--label".into(), "eventpi.test=1".into(), "--label".into(), fleet_label.clone()];
        let (image, command): (String, Vec<&str>) = match index {
            // The agent's host name.
            0 => {
                arguments.extend(["--hostname".into(), hostname.clone()]);
                (support::BASE_IMAGE.into(), vec!["sleep", "600"])
            }
            // The agent's own image, under another name.
            1 => {
                arguments.extend(["--entrypoint".into(), "sleep".into()]);
                (fleet.followed.clone(), vec!["600"])
            }
            // Another agent's candidate.
            2 => {
                arguments.extend([
                    "--label".into(),
                    "eventpi.autoupdate.candidate=1".into(),
                    "--label".into(),
                    "eventpi.autoupdate.agent=eventpi-test-other".into(),
                ]);
                (support::BASE_IMAGE.into(), vec!["sleep", "600"])
            }
            // On the handover network.
            3 => {
                arguments.extend(["--network".into(), fleet.handover_network.clone()]);
                (support::BASE_IMAGE.into(), vec!["sleep", "600"])
            }
            _ => (support::BASE_IMAGE.into(), vec!["sleep", "600"]),
        };
        let verb = if index == 4 { "create" } else { "run" };
        let mut full = vec![verb.to_string()];
        if verb == "run" {
            full.push("--detach".into());
        }
        full.extend(arguments);
        full.push(image);
        full.extend(command.iter().map(|part| part.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        run("docker", &full);
        bystanders.push(name);
    }
    let before: Vec<Value> = bystanders.iter().map(|name| inspect(name).unwrap()).collect();

    fleet.push_version("v2", None);
    wait_for_new_agent(&fleet, &old, "v2");

    for (name, before) in bystanders.iter().zip(&before) {
        let after = inspect(name).unwrap_or_else(|| panic!("{name} was removed"));
        assert_eq!(after["Id"], before["Id"], "{name}");
        assert_eq!(after["State"]["Status"], before["State"]["Status"], "{name}");
        assert_eq!(after["State"]["StartedAt"], before["State"]["StartedAt"], "{name} was not restarted");
        assert_eq!(after["RestartCount"], 0, "{name}");
        assert_eq!(after["Name"], before["Name"], "{name} kept its name");
    }
}

#[test]
fn private_cgroup_namespace_finds_own_id() {
    let fleet = Fleet::new("");
    let old = start_v1(&fleet, &["--cgroupns", "private"]);

    let cgroup = run("docker", &["exec", &old, "cat", "/proc/1/cgroup"]);
    assert!(cgroup.lines().all(|line| line.ends_with(":/")), "the cgroup paths are empty in a private namespace: {cgroup}");
    let holder = fleet.state().unwrap().lease.unwrap().holder;
    assert_eq!(holder, format!("container:{}", short(&old)));

    fleet.push_version("v2", None);
    let new = wait_for_new_agent(&fleet, &old, "v2");

    assert_eq!(new["HostConfig"]["CgroupnsMode"], "private");
    let holder = fleet.state().unwrap().lease.unwrap().holder;
    assert_eq!(holder, format!("container:{}", short(new["Id"].as_str().unwrap())));
}

#[test]
fn wrong_platform_image_is_rejected() {
    let fleet = Fleet::new("");
    let old = start_v1(&fleet, &[]);

    let digest = fleet.push_version_for_platform("v2", "linux/arm64");
    wait_until("the arm64 image to be rejected", STEP_TIMEOUT, None, || {
        fleet.machine().is_some_and(|(state, memory)| state == "Idle" && memory.failure_of(&digest.parse().unwrap()).is_some())
    });

    let (_, memory) = fleet.machine().unwrap();
    let reason = &memory.failure_of(&digest.parse().unwrap()).unwrap().reason;
    assert!(reason.contains("built for linux/arm64"), "{reason}");
    assert!(reason.contains("this device runs linux/amd64"), "{reason}");
    assert!(memory.attempt.is_none());
    assert_eq!(fleet.agent_containers().len(), 1, "no candidate was created");
    assert_eq!(fleet.audit().leases.len(), 1);
    assert!(fleet.audit().steps.iter().all(|step| step.to != "Creating"));
    let _ = old;
}

/// What an update reaches after one agent was killed in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The new agent runs under the old name.
    Updated,
    /// The old agent holds the newest lease, and the digest is marked failed.
    OldAgentKeptControl,
}

/// Which agent carries the failpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Old,
    New,
}

/// Mounts a 1 MiB tmpfs as the agent's Docker data root, so the new
/// image cannot fit. The reclaim label matches nothing, so the cleanup
/// before the refusal removes nothing that other tests use.
#[test]
fn full_disk_refuses_pull_until_space_returns() {
    let docker_root = Tmpfs::mount(1);
    let sections = format!(
        "[space]\ninterval = \"1s\"\n\n[space.reclaim]\nonly_label = \"eventpi.test.unused={}\"\n\n[space.docker]\npath = \"/docker-root\"\n",
        std::process::id()
    );
    let fleet = Fleet::with_sections("retry_backoff_min = \"5s\"\nretry_backoff_max = \"10s\"", &sections);
    let root_mount = format!("type=bind,source={},target=/docker-root", docker_root.path.display());
    let old = start_v1(&fleet, &["--mount", &root_mount]);

    let digest = fleet.push_version("v2", None);
    // The build left v2 in the engine. Once it is removed, only a pull can bring it back.
    run("docker", &["image", "rm", &fleet.followed]);
    wait_for_failed_attempt(&fleet, &digest);

    let (_, memory) = fleet.machine().unwrap();
    let reason = &memory.failure_of(&digest.parse().unwrap()).unwrap().reason;
    assert!(reason.contains("not enough space to pull"), "{reason}");
    assert!(reason.contains("/docker-root (docker)"), "{reason}");
    let repository = fleet.followed.rsplit_once(':').unwrap().0;
    assert!(docker_try(&["image", "inspect", &format!("{repository}@{digest}")]).is_none(), "the new image was not pulled");
    let containers = fleet.agent_containers();
    assert_eq!(containers.len(), 1, "no candidate container was created");
    assert_eq!(containers[0]["Id"], old);
    assert_eq!(containers[0]["State"]["Status"], "running");
    let audit = fleet.audit();
    assert_eq!(audit.leases.len(), 1, "the old agent keeps the only lease: {:?}", audit.leases);
    let state = fleet.state().unwrap();
    let notified = state.outbox.iter().any(|notification| notification.kind == "device-problem" && notification.message.contains("not enough space"));
    assert!(notified, "{:?}", state.outbox);

    docker_root.resize(1024);
    let new = wait_for_new_agent(&fleet, &old, "v2");

    let repo_digests = inspect_image_digests(new["Image"].as_str().unwrap());
    assert!(repo_digests.iter().any(|entry| entry.ends_with(&digest)), "{repo_digests:?}");
    assert!(fleet.audit().overlaps().is_empty(), "{:?}", fleet.audit().overlaps());
}

struct KillCase {
    state: &'static str,
    point: &'static str,
    victim: Victim,
    /// Whether the new version exits at once, so that the attempt fails.
    failing_version: bool,
    expected: Outcome,
}

/// Returns the kill cases of a state, one at each failpoint the state
/// reaches, each in the agent that reaches it during an update.
fn kill_cases_for(state: &'static str) -> Vec<KillCase> {
    let case = |point, victim, failing_version, expected| KillCase { state, point, victim, failing_version, expected };
    let both = |victim, failing_version, expected| {
        vec![case("after-persist", victim, failing_version, expected), case("before-command", victim, failing_version, expected)]
    };
    match state {
        // Idle waits for the next check and runs no command of its own.
        "Idle" => vec![case("after-persist", Victim::New, false, Outcome::Updated)],
        // A check that finds nothing writes nothing, so the step into
        // Checking is written together with the step that leaves it, and
        // Checking is never the state at rest after a write.
        "Checking" => vec![case("before-command", Victim::Old, false, Outcome::Updated)],
        "Pulling" => both(Victim::Old, false, Outcome::Updated),
        "Creating" | "Starting" | "HandingOver" => both(Victim::Old, false, Outcome::OldAgentKeptControl),
        // The new agent records Probation in the append that takes the
        // lease, before it responds to the handover request. Killed there or
        // before its probation command, it is restarted by the engine during
        // its probation, and the old agent takes the lease back.
        "Probation" => both(Victim::New, false, Outcome::OldAgentKeptControl),
        "Retiring" => both(Victim::New, false, Outcome::Updated),
        "Aborting" => both(Victim::Old, true, Outcome::OldAgentKeptControl),
        other => panic!("no kill case for self-update state {other}; add one here"),
    }
}

/// Runs one case and returns a description of what went wrong, if anything.
fn run_kill_case(case: &KillCase) -> Result<(), String> {
    let fleet = Fleet::new("start_timeout = \"15s\"\nprobation = \"2s\"");
    let failpoint = format!("self-update:{}:{}", case.state, case.point);
    let once = fleet.once_file();
    let failpoint_env = format!("AUTOUPDATE_FAILPOINT={failpoint}");
    let once_env = format!("AUTOUPDATE_FAILPOINT_ONCE={once}");
    let old_flags: Vec<&str> = match case.victim {
        Victim::Old => vec!["--env", &failpoint_env, "--env", &once_env],
        Victim::New => Vec::new(),
    };
    let old = start_v1(&fleet, &old_flags);

    // The old agent's environment reaches the new container and overrides
    // the image's, so a failing version fails through its command instead.
    let lines = match (case.victim, case.failing_version) {
        (Victim::New, _) => format!("ENV AUTOUPDATE_FAILPOINT={failpoint} AUTOUPDATE_FAILPOINT_ONCE={once}\n"),
        (Victim::Old, true) => "CMD [\"--no-such-option\"]\n".to_string(),
        (Victim::Old, false) => String::new(),
    };
    let digest = fleet.push_version_with("v2", &lines);

    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    let reached = loop {
        let idle = fleet.machine().is_some_and(|(state, _)| state == "Idle");
        let containers = fleet.agent_containers();
        let updated =
            containers.len() == 1 && containers[0]["Id"] != old && labels_of(&containers[0]).get("eventpi.test.version").map(String::as_str) == Some("v2");
        let failed = fleet.machine().is_some_and(|(_, memory)| memory.failure_of(&digest.parse().unwrap()).is_some())
            && containers.len() == 1
            && containers[0]["Id"] == old;
        if idle && updated && containers[0]["Name"] == format!("/{}", fleet.agent_name) {
            break Some(Outcome::Updated);
        }
        if idle && failed {
            break Some(Outcome::OldAgentKeptControl);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    if reached != Some(case.expected) {
        return Err(format!("reached {reached:?} instead of {:?}; machine {:?}", case.expected, fleet.machine().map(|(state, _)| state)));
    }
    if !std::path::Path::new(&once).exists() {
        return Err("the failpoint never fired".into());
    }

    let audit = fleet.audit();
    if !audit.overlaps().is_empty() {
        return Err(format!("steps under an older lease: {:?}", audit.overlaps()));
    }
    let newest = audit.leases.last().map(|lease| lease.holder.clone()).unwrap_or_default();
    let agent = fleet.agent_containers().pop().map(|container| container["Id"].as_str().unwrap_or_default().to_string()).unwrap_or_default();
    if newest != format!("container:{}", short(&agent)) {
        return Err(format!("the newest lease is held by {newest}, but the agent is {agent}"));
    }
    if case.state == "HandingOver" && audit.aborted != vec![2] {
        return Err(format!("the offered epoch was not withdrawn: {:?}", audit.aborted));
    }
    Ok(())
}

#[test]
fn agent_killed_in_every_state_recovers() {
    let cases: Vec<KillCase> = SELF_UPDATE_TABLE.states.iter().flat_map(|state| kill_cases_for(state.name)).collect();
    let failures = std::sync::Mutex::new(Vec::new());
    let rows = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for chunk in cases.chunks(cases.len().div_ceil(3)) {
            let failures = &failures;
            let rows = &rows;
            scope.spawn(move || {
                for case in chunk {
                    let result = run_kill_case(case);
                    let outcome = if result.is_ok() { format!("{:?}", case.expected) } else { "FAILED".to_string() };
                    rows.lock().unwrap().push(format!("self-update  {:<12} {:<15} {:<4} {outcome}", case.state, case.point, format!("{:?}", case.victim)));
                    if let Err(problem) = result {
                        failures.lock().unwrap().push(format!("{} ({:?} agent, {}): {problem}", case.state, case.victim, case.point));
                    }
                }
            });
        }
    });
    let mut rows = rows.into_inner().unwrap();
    rows.sort();
    println!("machine      state        point           kill outcome\n{}", rows.join("\n"));
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
}
