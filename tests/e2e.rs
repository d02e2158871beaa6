//! End to end: a real controller and real agents run shell builds over WebSocket and TCP.

mod common;
use common::*;
use std::time::Duration;

fn online_node(ctl: &Controller, name: &str, ws: bool, work: &TempDir) -> Proc {
    let secret = ctl.add_node(name, "linux test", if ws { &[] } else { &["--tcp"] });
    let agent = ctl.agent(name, &secret, ws, work.path());
    ctl.wait_online(name);
    agent
}

#[test]
fn build_over_websocket_succeeds_and_streams_its_log() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let _agent = online_node(&ctl, "ws1", true, &work);
    let (code, out) = ctl.run(
        "name: hello\nagent: {label: linux}\nenv: {GREETING: hi}\nsteps:\n  - sh: echo \"$GREETING from $NODE_NAME\"\n  - sh: echo second >&2\n",
    );
    assert_eq!(code, 0, "{out}\n{}", ctl.log_text());
    assert!(out.contains("hi from ws1\n"), "{out}");
    assert!(out.contains("second\n"), "stderr is merged: {out}");
    assert!(out.contains("==> step 1:") && out.contains("==> step 2:"), "step boundaries are marked: {out}");
    assert!(out.contains("==> build #1 SUCCESS"), "{out}");
}

#[test]
fn build_over_tcp_succeeds_and_a_failing_step_stops_the_pipeline() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let _agent = online_node(&ctl, "tcp1", false, &work);
    let (code, out) =
        ctl.run("name: t\nsteps:\n  - sh: echo one\n  - sh: echo two; exit 3\n  - sh: echo three\n");
    assert_eq!(code, 1, "a failed build exits 1: {out}");
    assert!(out.contains("one\n") && out.contains("two\n"), "{out}");
    assert!(!out.contains("three"), "the step after the failure must not run: {out}");
    let b = ctl.build_json(1);
    assert_eq!(b["state"], "failure");
    assert_eq!(b["steps"][1]["code"], 3, "the exit code passes through: {b}");
    assert_eq!(b["steps"][2]["state"], "skipped");
    let (code, _) = ctl.run("name: ok\nsteps:\n  - sh: exit 0\n");
    assert_eq!(code, 0);
}

#[test]
fn binary_output_arrives_byte_exact() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let _agent = online_node(&ctl, "bin1", true, &work);
    // NUL bytes, invalid UTF-8, 3 MB of random bytes and a last line with no newline; the step
    // keeps a copy of exactly what it wrote.
    let script = r#"{ printf 'a\000b\377\376c\n'; head -c 3000000 /dev/urandom; printf 'last line without newline'; } | tee out.bin"#;
    let yaml = format!("name: bin\nsteps:\n  - sh: '{}'\n", script.replace('\'', "''"));
    let id = ctl.submit(&yaml);
    let b = ctl.wait_build_state(id, Duration::from_secs(60));
    assert_eq!(b["state"], "success", "{b}");
    let produced = std::fs::read(work.path().join("workspace/bin/out.bin")).unwrap();
    assert_eq!(produced.len(), 3_000_000 + 7 + 25);
    let stored = ctl.step_log(id, 1);
    assert_eq!(sha256(&stored), sha256(&produced));
}

#[test]
fn wrong_secret_and_unknown_node_are_rejected_with_their_own_messages() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let secret = ctl.add_node("n1", "linux", &[]);
    let mut bad = ctl.agent("n1", &"0".repeat(64), true, work.path());
    assert_eq!(bad.wait_exit(Duration::from_secs(20)), 4, "{}", bad.log_text());
    assert!(bad.log_text().contains("wrong secret for node 'n1'"), "{}", bad.log_text());
    let mut unknown = ctl.agent("ghost", &secret, false, work.path());
    assert_eq!(unknown.wait_exit(Duration::from_secs(20)), 3, "{}", unknown.log_text());
    assert!(unknown.log_text().contains("no node named 'ghost'"), "{}", unknown.log_text());
    // The secret never appears in the controller's log.
    assert!(!ctl.log_text().contains(&secret));
}

fn pids_in(path: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn cancel_kills_the_step_and_its_background_children() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let _agent = online_node(&ctl, "c1", true, &work);
    let script =
        "sleep 1000 & echo $! > pids; (sleep 1000; echo never) & echo $! >> pids; echo started; wait";
    let id = ctl.submit(&format!("name: cancelme\nsteps:\n  - sh: '{script}'\n"));
    let pidfile = work.path().join("workspace/cancelme/pids");
    wait_for("the step to start its children", Duration::from_secs(20), || {
        (pids_in(&pidfile).len() == 2).then_some(())
    });
    let pids = pids_in(&pidfile);
    assert!(pids.iter().all(|p| alive(*p)));
    let out = ctl.wisp(&["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b = ctl.wait_build_state(id, Duration::from_secs(30));
    assert_eq!(b["state"], "aborted", "{b}");
    wait_for("the children to die", Duration::from_secs(10), || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
    let out = ctl.wisp(&["log", &id.to_string(), "--follow"]);
    assert_eq!(out.status.code(), Some(2), "an aborted build exits 2");
}

#[test]
fn step_timeout_kills_the_whole_process_group() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let _agent = online_node(&ctl, "t1", false, &work);
    let script = "sleep 1000 & echo $! > pids; trap \"\" TERM; sleep 1000 & echo $! >> pids; wait";
    let (code, out) = ctl.run(&format!("name: slow\nsteps:\n  - sh: '{script}'\n    timeout: 2s\n"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("timed out"), "{out}");
    let pids = pids_in(&work.path().join("workspace/slow/pids"));
    assert_eq!(pids.len(), 2);
    wait_for("the group to die", Duration::from_secs(10), || pids.iter().all(|p| !alive(*p)).then_some(()));
}

#[test]
fn controller_restart_keeps_nodes_and_build_history() {
    let mut ctl = Controller::start();
    let work = TempDir::new("work");
    let secret = ctl.add_node("r1", "linux", &["--executors", "2"]);
    let (code, _) = {
        let _agent = ctl.agent("r1", &secret, true, work.path());
        ctl.wait_online("r1");
        ctl.run("name: before\nsteps:\n  - sh: echo remembered\n")
    };
    assert_eq!(code, 0);
    ctl.restart();
    let line = ctl.node_line("r1").expect("node survives");
    assert!(line.contains("\toffline\t2\tlinux"), "{line}");
    let builds = String::from_utf8(ctl.wisp(&["builds"]).stdout).unwrap();
    assert!(builds.contains("#1\tsuccess\tbefore"), "{builds}");
    assert_eq!(ctl.step_log(1, 1), b"remembered\n");
    // The same secret still works after the restart.
    let _agent = ctl.agent("r1", &secret, false, work.path());
    ctl.wait_online("r1");
    assert_eq!(ctl.run("name: after\nsteps:\n  - sh: echo again\n").0, 0);
}

#[test]
fn a_queued_build_waits_for_a_matching_node() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let id = ctl.submit("name: arm\nagent: {label: 'arm64 && !windows'}\nsteps:\n  - sh: echo on arm\n");
    let _x86 = online_node(&ctl, "x86", true, &work);
    assert_eq!(ctl.build_json(id)["state"], "queued", "no matching node yet");
    let secret = ctl.add_node("pi", "linux arm64", &[]);
    let _pi = ctl.agent("pi", &secret, true, &work.path().join("pi"));
    let b = ctl.wait_build_state(id, Duration::from_secs(20));
    assert_eq!((b["state"].as_str(), b["node"].as_str()), (Some("success"), Some("pi")));
}

#[test]
fn missing_shell_fails_the_step_with_a_clear_message() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let _agent = online_node(&ctl, "s1", true, &work);
    let (code, out) = ctl.run("name: noshell\nsteps:\n  - sh: echo hi\n    shell: /nonexistent/sh\n");
    assert_eq!(code, 1);
    assert!(out.contains("no shell: `/nonexistent/sh` does not exist"), "{out}");
}

#[test]
fn the_jnlp_descriptor_has_jenkins_argument_order_and_needs_the_token() {
    let ctl = Controller::start();
    ctl.add_node("j1", "linux", &["--work-dir", "/home/wisp/agent"]);
    let secret = String::from_utf8(ctl.wisp(&["node", "secret", "j1"]).stdout).unwrap().trim().to_string();
    let (status, _) = http_request(&ctl.http, "GET", "/computer/j1/jenkins-agent.jnlp", None, b"");
    assert_eq!(status, 401);
    let (status, body) = ctl.get("/computer/j1/jenkins-agent.jnlp");
    assert_eq!(status, 200);
    let xml = String::from_utf8(body).unwrap();
    let args: Vec<&str> =
        xml.split("<argument>").skip(1).map(|a| a.split("</argument>").next().unwrap()).collect();
    let url = ctl.url();
    assert_eq!(
        args,
        vec![secret.as_str(), "j1", "-webSocket", "-workDir", "/home/wisp/agent", "-url", url.as_str()]
    );
    assert!(xml.contains("<application-desc main-class=\"hudson.remoting.jnlp.Main\">"));
}

#[test]
fn positional_secret_name_and_jenkins_environment_work() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let secret = ctl.add_node("k8s-abcde", "linux", &[]);
    let mut cmd = std::process::Command::new(AGENT);
    cmd.args([&secret, "k8s-abcde"])
        .env("JENKINS_URL", ctl.url())
        .env("JENKINS_WEB_SOCKET", "true")
        .env("JENKINS_AGENT_WORKDIR", work.path());
    let _agent = spawn_logged(cmd, work.path(), "positional");
    ctl.wait_online("k8s-abcde");
    let mut cmd = std::process::Command::new(AGENT);
    let secret_file = work.path().join("secret");
    let secret2 = ctl.add_node("envnode", "linux", &["--tcp"]);
    std::fs::write(&secret_file, format!("{secret2}\n")).unwrap();
    cmd.args(["--secret", &format!("@{}", secret_file.display())])
        .env("JENKINS_URL", ctl.url())
        .env("JENKINS_AGENT_NAME", "envnode")
        .env("JENKINS_AGENT_WORKDIR", work.path());
    // No --direct and no --websocket: the agent finds the TCP port as Jenkins agents do.
    let _agent2 = spawn_logged(cmd, work.path(), "envnode");
    ctl.wait_online("envnode");
}

#[test]
fn jnlp_url_with_a_secret_file_starts_the_agent_like_agent_jar() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let wd = work.path().join("from-descriptor");
    ctl.add_node("jn", "linux", &["--work-dir", wd.to_str().unwrap()]);
    let secret = String::from_utf8(ctl.wisp(&["node", "secret", "jn"]).stdout).unwrap().trim().to_string();
    let secret_file = work.path().join("secret-file");
    std::fs::write(&secret_file, &secret).unwrap();
    let jnlp = format!("{}computer/jn/jenkins-agent.jnlp", ctl.url());

    // Without the token the plain descriptor stays closed; sealed, it reveals nothing without the secret.
    let (status, sealed) =
        http_request(&ctl.http, "GET", "/computer/jn/jenkins-agent.jnlp?encrypt=true", None, b"");
    assert_eq!(status, 200);
    assert!(!String::from_utf8_lossy(&sealed).contains(&secret), "the secret must not travel in clear");
    assert!(wisp::auth::open_descriptor(&secret, "jn", &sealed).is_some());
    assert!(wisp::auth::open_descriptor(&"0".repeat(64), "jn", &sealed).is_none());

    // A wrong secret: exit code 4 with a sentence; an unknown node: exit code 3.
    let bad_file = work.path().join("bad");
    std::fs::write(&bad_file, "0".repeat(64)).unwrap();
    let mut cmd = std::process::Command::new(AGENT);
    cmd.args(["-jnlpUrl", &jnlp, "-secret", &format!("@{}", bad_file.display())]);
    let mut bad = spawn_logged(cmd, work.path(), "bad");
    assert_eq!(bad.wait_exit(Duration::from_secs(20)), 4, "{}", bad.log_text());
    assert!(bad.log_text().contains("does not open with this secret"), "{}", bad.log_text());
    let mut cmd = std::process::Command::new(AGENT);
    let ghost = format!("{}computer/ghost/jenkins-agent.jnlp", ctl.url());
    cmd.args(["-jnlpUrl", &ghost, "-secret", &secret]);
    let mut unknown = spawn_logged(cmd, work.path(), "ghost");
    assert_eq!(unknown.wait_exit(Duration::from_secs(20)), 3, "{}", unknown.log_text());
    assert!(unknown.log_text().contains("no node named 'ghost'"), "{}", unknown.log_text());

    // The Jenkins form: the descriptor supplies URL, name, WebSocket and work dir.
    let mut cmd = std::process::Command::new(AGENT);
    cmd.args(["-jnlpUrl", &jnlp, "-secret", &format!("@{}", secret_file.display())]);
    let _agent = spawn_logged(cmd, work.path(), "jn");
    ctl.wait_online("jn");
    let (code, out) = ctl.run("name: jn\nsteps:\n  - sh: pwd -P\n");
    assert_eq!(code, 0, "{out}");
    let wd = std::fs::canonicalize(&wd).unwrap();
    assert!(out.contains(&format!("{}/workspace/jn\n", wd.display())), "{out}");
}

#[test]
fn submit_and_wait_answers_with_the_result_and_a_silent_step_has_an_empty_log() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let _agent = online_node(&ctl, "w1", false, &work);
    let token = ctl.token();
    // One call: submitted, held until final, answered with the record.
    let yaml = b"name: quiet\nsteps:\n  - sh: \"true\"\n  - sh: exit 3\n";
    let (status, body) = http_request(&ctl.http, "POST", "/api/builds?wait=30", Some(&token), yaml);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["state"], "failure", "{v}");
    assert_eq!(v["steps"][0]["state"], "success", "{v}");
    assert_eq!(v["steps"][1]["code"], 3, "{v}");
    let id = v["id"].as_u64().unwrap();
    // The steps wrote nothing: no log file was made, and the log reads empty (not 404).
    assert!(!ctl.data.path().join(format!("builds/{id}/1.log")).exists());
    let (status, body) =
        http_request(&ctl.http, "GET", &format!("/api/builds/{id}/steps/1/log"), Some(&token), b"");
    assert_eq!((status, body.len()), (200, 0));
    // GET ?wait on a running build returns when it ends, well before the wait runs out.
    let (_, body) = http_request(
        &ctl.http,
        "POST",
        "/api/builds",
        Some(&token),
        b"name: slow\nsteps:\n  - sh: sleep 1; echo done\n",
    );
    let id = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["id"].as_u64().unwrap();
    let t0 = std::time::Instant::now();
    let (status, body) =
        http_request(&ctl.http, "GET", &format!("/api/builds/{id}?wait=60"), Some(&token), b"");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, v["state"].as_str()), (200, Some("success")), "{v}");
    assert!(t0.elapsed() < Duration::from_secs(30), "answered when the build ended");
    assert_eq!(v["steps"][0]["bytes"], 5, "{v}");
    // A short wait on a build that is not final answers with its current state.
    let (_, body) = http_request(
        &ctl.http,
        "POST",
        "/api/builds",
        Some(&token),
        b"name: slower\nsteps:\n  - sh: sleep 5\n",
    );
    let id = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["id"].as_u64().unwrap();
    let (status, body) =
        http_request(&ctl.http, "GET", &format!("/api/builds/{id}?wait=0.2"), Some(&token), b"");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200);
    assert!(matches!(v["state"].as_str(), Some("queued" | "running")), "{v}");
    let (status, body) = http_request(&ctl.http, "GET", "/api/builds/1?wait=soon", Some(&token), b"");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("?wait=30"));
}

#[test]
fn a_second_controller_on_the_same_data_dir_is_refused() {
    let ctl = Controller::start();
    let out = std::process::Command::new(WISP)
        .args(["serve", "--http-port", "0", "--agent-port", "0", "--bind", "127.0.0.1", "--no-tls", "--data"])
        .arg(ctl.data.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("another controller is using the data dir"), "{err}");
    // The first one is unharmed.
    assert!(ctl.wisp(&["nodes"]).status.success());
}

#[test]
fn run_wait_exits_with_the_result_without_the_log() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let _agent = online_node(&ctl, "rw1", true, &work);
    let file = work.path().join("p.yaml");
    std::fs::write(&file, "name: w\nsteps:\n  - sh: echo twelve bytes\n  - sh: exit 4\n").unwrap();
    let out = ctl.wisp(&["run", file.to_str().unwrap(), "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAILURE: step 2") && stdout.contains("(13 output bytes stored)"), "{stdout}");
    assert!(!stdout.contains("twelve"), "no log with --wait: {stdout}");
}

/// A process that left the step's process group (`setsid`) and holds its output open: the step
/// still ends, once the pipe has been readable and silent for twice the kill grace, with the
/// output written before kept.
#[test]
fn a_step_ends_though_a_process_outside_its_group_holds_the_output_open() {
    let ctl = Controller::start();
    let work = TempDir::new("work");
    let _agent = online_node(&ctl, "held1", true, &work);
    let script = "echo before; setsid sleep 60 & echo after";
    let started = std::time::Instant::now();
    let (code, out) = ctl.run(&format!("name: held\nsteps:\n  - sh: '{script}'\n"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("before\n") && out.contains("after\n"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(40), "ended without waiting for the sleep");
}
