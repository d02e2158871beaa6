//! podman's REST API client against real podman services: one the test starts on a socket of
//! its own (as a user's `podman.socket` would be) and one the client starts and stops itself.
//! Root only, like the other podman tests.

mod common;
use common::images::{agent_image, require_podman};
use common::{wait_for, TempDir};
use std::process::{Command, Stdio};
use std::time::Duration;
use wisp::controller::cloud::podman_api::PodmanApi;

/// A pod of one container running the agent's `--version`, labelled `wisp.dev/test=TAG`.
fn pod_yaml(name: &str, tag: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{wisp.dev/test: {tag}}}}}\nspec:\n  \
         restartPolicy: Never\n  containers:\n    - {{name: jnlp, image: {}, args: [--version]}}\n",
        agent_image()
    )
}

/// Play, list by label, remove (twice) and a refused manifest, on `api`.
fn play_list_remove(api: &PodmanApi, name: &str, tag: &str) -> Result<(Vec<String>, usize, String), String> {
    let labels = [("wisp.dev/test".to_string(), tag.to_string())].into();
    smol::block_on(async {
        api.ping().await?;
        api.play_kube(&pod_yaml(name, tag), "host", true, Duration::from_secs(60)).await?;
        let names = api.pods(&labels).await?.into_iter().map(|p| p.name).collect();
        api.remove_pod(name).await?;
        api.remove_pod(name).await?;
        let after = api.pods(&labels).await?.len();
        let bad = api
            .play_kube("kind: Pod\nspec: [not a pod]\n", "host", false, Duration::from_secs(60))
            .await
            .expect_err("a bad pod is refused");
        Ok((names, after, bad))
    })
}

#[test]
fn a_service_the_user_runs_is_used_on_its_socket() {
    require_podman();
    let dir = TempDir::new("podman-api");
    let socket = dir.path().join("podman.sock");
    let mut service = Command::new("podman")
        .args(["system", "service", "--time=0"])
        .arg(format!("unix://{}", socket.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the service's socket", Duration::from_secs(20), || socket.exists().then_some(()));
    let api = PodmanApi::new(format!("unix://{}", socket.display()));
    let name = format!("api-{}", std::process::id());
    let result = play_list_remove(&api, &name, "api");
    let _ = Command::new("podman").args(["pod", "rm", "-f", "-t", "0", &name]).output();
    let _ = service.kill();
    let _ = service.wait();
    let (names, after, bad) = result.unwrap();
    assert!(names.contains(&name), "listed by label: {names:?}");
    assert_eq!(after, 0, "removed");
    assert!(!bad.is_empty() && bad.len() <= 2000, "podman's reason, bounded: {bad}");

    // Nothing listens any more: the error says what to start.
    let e = smol::block_on(api.ping()).unwrap_err();
    assert!(e.contains("cannot reach podman's service at") && e.contains("podman system service"), "{e}");
}

#[test]
fn the_clients_own_service_starts_serves_and_stops_with_it() {
    require_podman();
    let dir = TempDir::new("podman-own");
    let pids = dir.path().join("pids");
    let wrapper = dir.path().join("podman");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\n[ \"$1\" = system ] && echo $$ >> '{}'\nexec podman \"$@\"\n", pids.display()),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&wrapper).status().unwrap();
    let api = PodmanApi::own(&wrapper.display().to_string());
    let socket = api.socket().to_path_buf();
    let name = format!("own-{}", std::process::id());
    let result = play_list_remove(&api, &name, "own");
    let _ = Command::new("podman").args(["pod", "rm", "-f", "-t", "0", &name]).output();
    let (names, after, _) = result.unwrap();
    assert!(names.contains(&name), "listed by label: {names:?}");
    assert_eq!(after, 0);
    let pid = std::fs::read_to_string(&pids).unwrap().trim().to_string();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(api);
    wait_for("the service to stop", Duration::from_secs(20), || {
        (!std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")))
        .then_some(())
    });
    assert!(!socket.exists(), "its socket directory is removed");
}

#[test]
fn a_missing_podman_program_is_an_error_that_says_what_to_do() {
    let api = PodmanApi::own("/nonexistent/podman");
    let e = smol::block_on(api.ping()).unwrap_err();
    assert!(
        e.contains("cannot run `/nonexistent/podman system service`") && e.contains("install podman"),
        "{e}"
    );
}
