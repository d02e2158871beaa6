//! Hostile inputs and peers: workspace paths that try to leave the work dir, and a slowloris on
//! both ports while a build runs.

mod common;
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn submit_err(ctl: &Controller, yaml: &str) -> String {
    let f = ctl.data.path().join("bad.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = ctl.wisp(&["run", f.to_str().unwrap()]);
    assert!(!out.status.success(), "accepted: {yaml}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn workspace_paths_cannot_leave_the_work_dir() {
    let ctl = Controller::start();
    let work = TempDir::new("ws-escape");
    let secret = ctl.add_node("w1", "esc", &[]);
    let _a = ctl.agent("w1", &secret, true, &work.path().join("w1"));
    ctl.wait_online("w1");
    let step = |extra: &str| format!("name: esc\nagent: {{label: esc}}\nsteps:\n  - sh: pwd\n{extra}");
    for (dir, why) in [
        ("../..", "contains \"..\""),
        ("a/../../b", "contains \"..\""),
        ("/etc", "is absolute"),
        ("/", "is absolute"),
    ] {
        let e = submit_err(&ctl, &step(&format!("    dir: '{dir}'\n")));
        assert!(e.contains(why), "dir {dir:?}: {e}");
    }
    for name in ["..", ".", "../x", "/etc"] {
        let yaml = format!("name: '{name}'\nagent: {{label: esc}}\nsteps:\n  - sh: pwd\n");
        let f = ctl.data.path().join("n.yaml");
        std::fs::write(&f, &yaml).unwrap();
        let out = ctl.wisp(&["run", f.to_str().unwrap(), "--follow"]);
        let text = String::from_utf8_lossy(&out.stdout);
        // Either refused, or run inside WORK/workspace/ in one safe component.
        if out.status.success() {
            let inside = work.path().join("w1").canonicalize().unwrap().join("workspace");
            assert!(text.contains(inside.to_str().unwrap()), "name {name:?} ran outside: {text}");
            assert!(!text.contains("/etc\n"), "{text}");
        }
    }
    // A symlink left by one step cannot carry the next one out of the workspace.
    let yaml = "name: links\nagent: {label: esc}\nsteps:\n  - sh: ln -s / out && ln -s .. up\n  \
                - sh: pwd\n    dir: out/tmp\n";
    let (code, out) = ctl.run(yaml);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("a symlink leads out of the workspace"), "{out}");
    let yaml = "name: links\nagent: {label: esc}\nsteps:\n  - sh: pwd\n    dir: up/elsewhere\n";
    let (code, out) = ctl.run(yaml);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("a symlink leads out of the workspace"), "{out}");
    assert!(!work.path().join("w1/workspace/elsewhere").exists());
}

#[test]
fn a_slowloris_on_both_ports_does_not_starve_a_build_or_a_new_agent() {
    // This process holds 1000 sockets: raise its open-file limit (the controller raises its own).
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    // TLS on (the default), so half-open connections also sit in the TLS handshake.
    let ctl = Controller::start_tls(&[]);
    let fp = ctl.fingerprint();
    let work = TempDir::new("slowloris");
    let secret = ctl.add_node("s1", "slow", &[]);
    let mut cmd = std::process::Command::new(AGENT);
    cmd.args(["--url", &ctl.url(), "--name", "s1", "--secret", &secret, "--websocket"])
        .args(["--instance-identity", &fp, "--work-dir"])
        .arg(work.path().join("s1"));
    let _a = spawn_logged(cmd, work.path(), "s1");
    ctl.wait_online("s1");
    let id = ctl.submit(
        "name: during\nagent: {label: slow}\nsteps:\n  - sh: for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.5; done\n",
    );
    // 500 idle connections on each port, each having sent a few bytes and then nothing.
    let mut idle = Vec::new();
    for addr in [ctl.http.clone(), ctl.agent_addr.clone()] {
        for _ in 0..500 {
            let mut s = TcpStream::connect(&addr).unwrap();
            let _ = s.write_all(&[0x16, 0x03]); // the start of a TLS record, never finished
            idle.push(s);
        }
    }
    let started = Instant::now();
    let b = ctl.wait_build_state_tls(id, Duration::from_secs(60));
    assert_eq!(b, "success", "the build under a slowloris");
    // A new agent still gets in while the idle connections are held.
    let s2 = ctl.add_node("s2", "slow2", &["--tcp"]);
    let mut cmd = std::process::Command::new(AGENT);
    cmd.args(["--url", &ctl.url(), "--name", "s2", "--secret", &s2, "--direct", &ctl.agent_addr])
        .args(["--instance-identity", &fp, "--work-dir"])
        .arg(work.path().join("s2"));
    let _a2 = spawn_logged(cmd, work.path(), "s2");
    ctl.wait_online("s2");
    let (code, out) = ctl.run("name: after\nagent: {label: slow2}\nsteps:\n  - sh: echo still served\n");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("still served"));
    assert!(started.elapsed() < Duration::from_secs(60));
    // The idle connections are cut after the TLS handshake timeout, not kept forever.
    wait_for("idle TLS connections closed", Duration::from_secs(30), || {
        ctl.log_text().contains("no TLS handshake within").then_some(())
    });
    drop(idle);
}

#[test]
fn failed_handshakes_are_logged_without_secrets_and_rate_limited_per_address() {
    let ctl = Controller::start();
    let work = TempDir::new("ratelimit");
    let secret = ctl.add_node("r1", "rl", &["--tcp"]);
    let wrong = "0".repeat(64);
    let run_agent = |s: &str, tag: &str| {
        let mut cmd = std::process::Command::new(AGENT);
        cmd.args([
            "--url",
            &ctl.url(),
            "--name",
            "r1",
            "--secret",
            s,
            "--direct",
            &ctl.agent_addr,
            "--work-dir",
        ])
        .arg(work.path().join(tag));
        spawn_logged(cmd, work.path(), tag)
    };
    for i in 0..10 {
        let mut a = run_agent(&wrong, &format!("wrong{i}"));
        assert_eq!(a.wait_exit(Duration::from_secs(20)), 4, "{}", a.log_text());
    }
    let log = ctl.log_text();
    let rejections =
        log.lines().filter(|l| l.contains("rejected (WrongSecret)") && l.contains("'r1'")).count();
    assert_eq!(rejections, 10, "one log line per rejection, naming the node: {log}");
    assert!(!log.contains(&secret) && !log.contains(&wrong), "a secret reached the log");
    // The 11th try from the same address is refused before the handshake, even with the right
    // secret; the agent retries later (tests/agent.rs follows it until it gets in).
    let a = run_agent(&secret, "right");
    wait_for("the refusal", Duration::from_secs(20), || {
        a.log_text().contains("too many failed handshakes").then_some(())
    });
    assert!(alive(a.pid()), "{}", a.log_text());
    assert!(ctl.log_text().contains("refused: 10 failed handshakes from 127.0.0.1"));
    assert!(ctl.node_line("r1").unwrap().contains("\toffline\t"));
}

#[test]
fn the_api_token_rotates_and_the_old_one_stops_working() {
    let ctl = Controller::start();
    let old = ctl.token();
    let out = ctl.wisp(&["token", "rotate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(new.len(), 64);
    assert_ne!(new, old);
    assert_eq!(ctl.token(), new, "DATA/token holds the new token");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ctl.data.path().join("token")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let (status, _) = http_request(&ctl.http, "GET", "/api/nodes", Some(&old), b"");
    assert_eq!(status, 401);
    let (status, _) = http_request(&ctl.http, "GET", "/api/nodes", Some(&new), b"");
    assert_eq!(status, 200);
    assert!(!ctl.log_text().contains(&new) && !ctl.log_text().contains(&old));
}
