//! The controller as a new user and an attacker meet it: a full disk, a build no node can take,
//! hostile build numbers, node names and nesting, the bearer scheme, and what it keeps private on
//! disk.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// A small tmpfs mounted on a directory of its own, unmounted on drop.
struct SmallDisk {
    dir: TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = TempDir::new("tmpfs");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Self { dir }
    }

    /// Fill what is left with a file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        let path = self.dir.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = f.write_all(&[0]);
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Needs root for the tmpfs (CI runs as root, as the fault tests do).
#[test]
fn a_full_disk_stalls_a_build_with_a_reason_and_it_resumes_byte_exact_when_space_returns() {
    require_root();
    let disk = SmallDisk::mount("8m");
    let data = TempDir(disk.dir.path().join("data"));
    std::fs::create_dir_all(data.path()).unwrap();
    let ctl = Controller::start_in(data, &[]);
    let work = TempDir::new("diskfull");
    let secret = ctl.add_node("d1", "disk", &[]);
    let agent = ctl.agent("d1", &secret, true, &work.path().join("d1"));
    ctl.wait_online("d1");
    let go = work.path().join("go");
    let yaml = format!(
        "name: full\nagent: {{label: disk}}\nsteps:\n  - sh: while [ ! -e {} ]; do sleep 0.05; done; seq 1 100000\n",
        go.display()
    );
    let id = ctl.submit(&yaml);
    wait_for("the step to start", Duration::from_secs(20), || {
        (ctl.build_json(id)["state"] == "running").then_some(())
    });
    let filler = disk.fill();
    std::fs::write(&go, b"").unwrap();
    let why = wait_for("the build to say why it stalls", Duration::from_secs(30), || {
        ctl.build_json(id)["waiting"].as_str().map(str::to_string)
    });
    assert!(why.starts_with("disk full on the controller"), "{why}");
    // It stays running with its agent connected: no reconnect loop into the same error.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ctl.build_json(id)["state"], "running");
    // (The controller's own log is on the full disk too: the agent's tells.)
    let agent_log = agent.log_text();
    assert!(!agent_log.contains("reconnecting") && !agent_log.contains("link lost"), "{agent_log}");
    std::fs::remove_file(&filler).unwrap();
    let b = ctl.wait_build_state(id, Duration::from_secs(60));
    assert_eq!(b["state"], "success", "{b}");
    assert!(b.get("waiting").is_none(), "{b}");
    let expected: Vec<u8> = (1..=100_000).flat_map(|i| format!("{i}\n").into_bytes()).collect();
    let log = ctl.step_log(id, 1);
    assert_eq!(log.len(), expected.len(), "the log is byte-exact: nothing lost, nothing twice");
    assert_eq!(sha256(&log), sha256(&expected));
    assert_eq!(b["steps"][0]["bytes"], expected.len() as u64);
}

#[test]
fn a_build_no_node_can_take_says_why_it_waits_at_once() {
    let ctl = Controller::start();
    let _ = ctl.add_node("lin", "linux", &[]);
    let id = ctl.submit("name: win\nagent: {label: windows}\nsteps:\n  - sh: ver\n");
    assert_eq!(ctl.build_json(id)["waiting"], "no node has label 'windows'");
    let out = String::from_utf8_lossy(&ctl.wisp(&["builds"]).stdout).into_owned();
    let line = out.lines().find(|l| l.starts_with(&format!("#{id}\t"))).unwrap_or_default().to_string();
    assert!(line.ends_with("\twaiting: no node has label 'windows'"), "{out}");
    let id2 = ctl.submit("name: lin\nagent: {label: linux}\nsteps:\n  - sh: 'true'\n");
    assert_eq!(ctl.build_json(id2)["waiting"], "waiting for an agent: lin match 'linux' but it is offline");
    // A follower hears it with the first bytes, not when the build ends.
    let mut s = TcpStream::connect(&ctl.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /api/builds/{id}/log?follow=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        ctl.token()
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    while !String::from_utf8_lossy(&got).contains("no node has label 'windows'") {
        let n = s.read(&mut buf).expect("the follower is told within 5 s");
        assert!(n > 0 && started.elapsed() < Duration::from_secs(5));
        got.extend_from_slice(&buf[..n]);
    }
    let want = format!("==> build #{id} waiting: no node has label 'windows'");
    assert!(String::from_utf8_lossy(&got).contains(&want), "{}", String::from_utf8_lossy(&got));
}

#[test]
fn build_numbers_too_large_for_a_build_are_not_found() {
    let ctl = Controller::start();
    for id in
        ["9223372036854775808", "18446744073709551615", "18446744073709551616", "99999999999999999999999"]
    {
        let (status, body) = ctl.get(&format!("/api/builds/{id}"));
        assert_eq!(status, 404, "{id}: {}", String::from_utf8_lossy(&body));
        let (status, _) = ctl.get(&format!("/api/builds/{id}/log"));
        assert_eq!(status, 404, "{id} log");
    }
    let (status, _) = ctl.get("/api/builds/12abc");
    assert_eq!(status, 400);
    let (status, _) = ctl.get("/api/builds/7");
    assert_eq!(status, 404);
}

#[test]
fn the_bearer_scheme_is_read_in_any_case() {
    let ctl = Controller::start();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let mut s = TcpStream::connect(&ctl.http).unwrap();
        write!(
            s,
            "GET /api/nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {scheme} {}\r\n\r\n",
            ctl.token()
        )
        .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{scheme}: {r}");
    }
}

#[test]
fn the_data_dir_and_what_it_holds_are_private_whatever_the_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let ctl = Controller::start_tls(&[]);
    let secret = ctl.add_node("p1", "p", &[]);
    let work = TempDir::new("private");
    let mut cmd = Command::new(AGENT);
    cmd.args(["--url", &ctl.url(), "--name", "p1", "--secret", &secret, "--websocket"])
        .args(["--instance-identity", &ctl.fingerprint(), "--work-dir"])
        .arg(work.path().join("p1"));
    let _a = spawn_logged(cmd, work.path(), "p1");
    ctl.wait_online("p1");
    let id = ctl.submit("name: p\nagent: {label: p}\nsteps:\n  - sh: echo private\n");
    assert_eq!(ctl.wait_build_state_tls(id, Duration::from_secs(30)), "success");
    let mode = |p: &str| std::fs::metadata(ctl.data.path().join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(""), 0o700);
    for f in ["wisp.db", "token", "secret.key", "tls/key.pem", &format!("builds/{id}/1.log")] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
    for d in ["builds", "tls", &format!("builds/{id}")] {
        assert_eq!(mode(d), 0o700, "{d}");
    }
}

#[test]
fn a_node_name_that_cannot_be_a_path_segment_is_refused_on_every_path() {
    let ctl = Controller::start();
    let token = ctl.token();
    for bad in ["a/b", "..", "a b", "x%2Fy", "-rf", "semi;colon", "ünï"] {
        let body = format!("{{\"name\": {bad:?}}}");
        let (status, answer) = http_request(&ctl.http, "POST", "/api/nodes", Some(&token), body.as_bytes());
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status, 400, "{bad}: {answer}");
        assert!(answer.contains("bad node name"), "{bad}: {answer}");
        let out = ctl.wisp(&["node", "add", bad]);
        assert!(!out.status.success(), "the CLI took {bad:?}");
    }
    // A name within the rules can be fetched, described and removed, through the CLI and the API.
    let _ = ctl.add_node("b1.x_y-2", "l", &[]);
    let (status, _) = ctl.get("/api/nodes/b1.x_y-2");
    assert_eq!(status, 200);
    let (status, answer) = ctl.get("/api/nodes/a%2Fb");
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&answer));
    let out = ctl.wisp(&["node", "rm", "b1.x_y-2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(ctl.node_line("b1.x_y-2").is_none());
}

#[test]
fn a_mebibyte_of_nesting_is_refused_and_the_controller_keeps_answering() {
    let ctl = Controller::start();
    let token = ctl.token();
    let http = ctl.http.clone();
    let attack = std::thread::spawn(move || {
        let mut body = b"name: deep\nsteps: ".to_vec();
        body.resize(1024 * 1024 - 64, b'[');
        http_request(&http, "POST", "/api/builds", Some(&token), &body)
    });
    // The API answers meanwhile (the parse runs off the executor, and is linear now anyway).
    for _ in 0..20 {
        let (status, _) = ctl.get("/api/nodes");
        assert_eq!(status, 200);
    }
    let (status, answer) = attack.join().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("nests deeper than 32 levels"), "{answer}");
}
