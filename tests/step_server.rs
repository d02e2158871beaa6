//! Steps in sibling containers without the exec API: a real controller, an agent with
//! `WISP_STEP_SOCKETS` pointing at a directory (the pod's shared volume), and real
//! `wisp-agent step-server` processes on sockets there (the pod's other containers), running
//! pipelines whose steps say `container: build`. No containers are needed: what matters is that
//! the step runs under the step server, not under the agent, and behaves as a local `sh` step.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A "pod": a controller, the agent of node `pod` and the directory its step servers' sockets
/// go in.
struct Pod {
    ctl: Controller,
    work: TempDir,
    agent: Proc,
}

impl Pod {
    /// `wait` is the agent's WISP_STEP_SOCKET_WAIT.
    fn start(wait: &str) -> Self {
        Self::start_with(Controller::start(), wait)
    }

    fn start_with(ctl: Controller, wait: &str) -> Self {
        let work = TempDir::new("pod");
        std::fs::create_dir_all(work.path().join("wisp")).unwrap();
        let secret = ctl.add_node("pod", "pod", &[]);
        let mut cmd = Command::new(AGENT);
        cmd.args(["--url", &ctl.url(), "--name", "pod", "--secret", &secret, "--websocket", "--work-dir"])
            .arg(work.path().join("agent"))
            .env("WISP_STEP_SOCKETS", work.path().join("wisp"))
            .env("WISP_STEP_SOCKET_WAIT", wait);
        let agent = spawn_logged(cmd, work.path(), "agent");
        ctl.wait_online("pod");
        Self { ctl, work, agent }
    }

    fn socket(&self, container: &str) -> PathBuf {
        self.work.path().join("wisp").join(format!("{container}.sock"))
    }

    /// Start the step server of `container` (with `extra` arguments) and wait for its socket.
    fn server(&self, container: &str, extra: &[&str]) -> Proc {
        let socket = self.socket(container);
        let before = std::fs::metadata(&socket).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let mut cmd = Command::new(AGENT);
        cmd.args(["step-server", "--socket"]).arg(&socket).args(extra);
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!("server-{container}-{}", N.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let p = spawn_logged(cmd, self.work.path(), &tag);
        wait_for("the step server's socket", Duration::from_secs(20), || {
            let now = std::fs::metadata(&socket).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
            (now.is_some() && now != before).then_some(())
        });
        p
    }

    /// The workspace directory of pipeline `name` (shared by the agent and its step servers).
    fn workspace(&self, name: &str) -> PathBuf {
        self.work.path().join("agent/workspace").join(name)
    }

    fn logs(&self, servers: &[&Proc]) -> String {
        let mut s =
            format!("--- agent:\n{}\n--- controller:\n{}", self.agent.log_text(), self.ctl.log_text());
        for p in servers {
            s += &format!("\n--- step server {}:\n{}", p.pid(), p.log_text());
        }
        s
    }
}

fn pids_in(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The parent of `pid`, from /proc.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(") ").next()?.split_whitespace().nth(1)?.parse().ok()
}

/// The children of `pid` whose command is `comm`.
fn children_named(pid: u32, comm: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| ppid(*p) == Some(pid))
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm))
        .collect()
}

/// Kills the processes listed in a file when dropped (what a dead step server leaves behind
/// outside a container, where its PID namespace would have taken them along).
struct Leftovers(PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for p in pids_in(&self.0) {
            let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
        }
    }
}

#[test]
fn output_is_byte_exact_and_exit_codes_and_signals_pass_through() {
    let pod = Pod::start("10s");
    let server = pod.server("build", &[]);
    // NUL bytes, invalid UTF-8, 3 MB of random bytes and no final newline, through the step
    // server's credit window and the agent's spool; a local step before it in the same build.
    let script =
        r#"{ printf 'a\000b\377\376c\n'; head -c 3000000 /dev/urandom; printf 'last line'; } | tee out.bin"#;
    let yaml = format!(
        "name: bin\nagent: {{label: pod}}\nsteps:\n  - sh: echo local\n  - sh: '{}'\n    container: build\n",
        script.replace('\'', "''")
    );
    let id = pod.ctl.submit(&yaml);
    let b = pod.ctl.wait_build_state(id, Duration::from_secs(60));
    assert_eq!(b["state"], "success", "{b}\n{}", pod.logs(&[&server]));
    let produced = std::fs::read(pod.workspace("bin").join("out.bin")).unwrap();
    assert_eq!(produced.len(), 3_000_000 + 7 + 9);
    let stored = pod.ctl.step_log(id, 2);
    assert_eq!(stored.len(), produced.len());
    assert_eq!(sha256(&stored), sha256(&produced), "the stored log is byte-exact");
    assert_eq!(pod.ctl.step_log(id, 1), b"local\n");
    // Exit codes and signals come through as they do from a local step.
    for (script, exit, code) in [
        ("exit 3", "exit code 3", Some(3)),
        ("echo bye; kill -KILL $$", "killed by signal 9", None),
        ("true", "exit code 0", Some(0)),
    ] {
        let id = pod.ctl.submit(&format!(
            "name: code\nagent: {{label: pod}}\nsteps:\n  - sh: '{script}'\n    container: build\n"
        ));
        let b = pod.ctl.wait_build_state(id, Duration::from_secs(30));
        let step = &b["steps"][0];
        assert_eq!(step["exit"], exit, "{b}\n{}", pod.logs(&[&server]));
        assert_eq!(step["code"], serde_json::json!(code), "{b}");
        assert_eq!(b["state"], if code == Some(0) { "success" } else { "failure" }, "{b}");
    }
}

#[test]
fn a_container_step_runs_under_its_step_server_and_a_kept_command_is_kept() {
    let pod = Pod::start("10s");
    let build = pod.server("build", &[]);
    let tools = pod.server("tools", &["--", "sleep", "1000"]);
    // The container's own command runs as the step server's child.
    let sleeps = wait_for("the kept command", Duration::from_secs(10), || {
        let s = children_named(tools.pid(), "sleep");
        (!s.is_empty()).then_some(s)
    });
    // Each step says who its parent is, and how its shell starts out with signals (blocked and
    // ignored ones, read with builtins only): the same in the container as in the agent's.
    let me = r#"echo "parent $PPID"; while read -r l; do case $l in Sig[BI]*) echo "$l";; esac; done < /proc/$$/status"#;
    let yaml = format!(
        "name: who\nagent: {{label: pod}}\nsteps:\n  - sh: '{me}'\n  - sh: '{me}'\n    container: build\n  \
         - sh: echo \"parent $PPID in $PWD\"\n    container: tools\n    dir: sub\n"
    );
    let id = pod.ctl.submit(&yaml);
    let b = pod.ctl.wait_build_state(id, Duration::from_secs(30));
    assert_eq!(b["state"], "success", "{b}\n{}", pod.logs(&[&build, &tools]));
    let log = |step| String::from_utf8(pod.ctl.step_log(id, step)).unwrap();
    let (local, inside) = (log(1), log(2));
    let (first, signals) = local.split_once('\n').unwrap();
    assert_eq!(first, format!("parent {}", pod.agent.pid()), "a local step runs under the agent");
    assert_eq!(inside, format!("parent {}\n{signals}", build.pid()), "the step runs under the step server");
    assert!(
        signals.contains("SigBlk:\t0000000000000000\n"),
        "a step starts with no signal blocked: {signals}"
    );
    assert!(signals.contains("SigIgn"), "{signals}");
    let dir = std::fs::canonicalize(pod.workspace("who").join("sub")).unwrap();
    assert_eq!(log(3), format!("parent {} in {}\n", tools.pid(), dir.display()));
    // SIGTERM goes on to the kept command, and the server exits with its code (128 + TERM).
    let mut tools = tools;
    tools.kill("TERM");
    assert_eq!(tools.wait_exit(Duration::from_secs(10)), 143, "{}", tools.log_text());
    assert!(sleeps.iter().all(|p| !alive(*p)));
    assert!(!pod.socket("tools").exists(), "the server removes its socket");
    // Without a command, SIGTERM stops the server with 0.
    let mut build = build;
    build.kill("TERM");
    assert_eq!(build.wait_exit(Duration::from_secs(10)), 0, "{}", build.log_text());
}

#[test]
fn cancel_kills_the_whole_process_group_of_a_container_step() {
    let pod = Pod::start("10s");
    let server = pod.server("build", &[]);
    let script =
        "echo $$ > shell; sleep 1000 & echo $! > pids; (sleep 1000; echo never) & echo $! >> pids; echo started; wait";
    let id = pod.ctl.submit(&format!(
        "name: cancelme\nagent: {{label: pod}}\nsteps:\n  - sh: '{script}'\n    container: build\n"
    ));
    let ws = pod.workspace("cancelme");
    wait_for("the step to start its children", Duration::from_secs(20), || {
        (pids_in(&ws.join("pids")).len() == 2).then_some(())
    });
    let pids = pids_in(&ws.join("pids"));
    let shell = pids_in(&ws.join("shell"))[0];
    assert_eq!(ppid(shell), Some(server.pid()), "the step's shell is the step server's child");
    assert!(pids.iter().all(|p| alive(*p)));
    let out = pod.ctl.wisp(&["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b = pod.ctl.wait_build_state(id, Duration::from_secs(30));
    assert_eq!(b["state"], "aborted", "{b}\n{}", pod.logs(&[&server]));
    assert_eq!(b["steps"][0]["exit"], "cancelled", "{b}");
    wait_for("the group to die", Duration::from_secs(10), || {
        pids.iter().chain([&shell]).all(|p| !alive(*p)).then_some(())
    });
}

#[test]
fn a_step_timeout_kills_the_whole_process_group_in_the_container() {
    let pod = Pod::start("10s");
    let server = pod.server("build", &[]);
    // A child that ignores TERM: the KILL after the grace gets it.
    let script = "sleep 1000 & echo $! > pids; trap \"\" TERM; sleep 1000 & echo $! >> pids; wait";
    let started = Instant::now();
    let (code, out) = pod.ctl.run(&format!(
        "name: slow\nagent: {{label: pod}}\nsteps:\n  - sh: '{script}'\n    timeout: 2s\n    container: build\n"
    ));
    assert_eq!(code, 1, "{out}\n{}", pod.logs(&[&server]));
    assert!(out.contains("timed out"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    let pids = pids_in(&pod.workspace("slow").join("pids"));
    assert_eq!(pids.len(), 2);
    wait_for("the group to die", Duration::from_secs(10), || pids.iter().all(|p| !alive(*p)).then_some(()));
}

#[test]
fn a_container_without_a_step_server_fails_the_step_with_what_to_check() {
    let pod = Pod::start("2s");
    let started = Instant::now();
    let (code, out) =
        pod.ctl.run("name: none\nagent: {label: pod}\nsteps:\n  - sh: echo hi\n    container: nosuch\n");
    let took = started.elapsed();
    assert_eq!(code, 1, "{out}");
    let want = format!(
        "container 'nosuch' has no step server at {} after 2 s (is the container running, and does its pod \
         template mount the wisp-tools volume?)",
        pod.socket("nosuch").display()
    );
    let b = pod.ctl.build_json(1);
    assert_eq!(b["steps"][0]["exit"], format!("could not start: {want}"), "{b}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(15), "{took:?}");
    // A socket file that nobody listens on (a server that died) is waited for the same way.
    std::os::unix::net::UnixListener::bind(pod.socket("stale")).unwrap();
    let (code, _) =
        pod.ctl.run("name: stale\nagent: {label: pod}\nsteps:\n  - sh: echo hi\n    container: stale\n");
    assert_eq!(code, 1);
    assert!(pod.ctl.build_json(2)["steps"][0]["exit"].as_str().unwrap().contains("has no step server"));
}

#[test]
fn a_step_server_killed_mid_step_fails_the_step_and_a_new_one_serves_the_next() {
    let pod = Pod::start("30s");
    let mut server = pod.server("build", &[]);
    let id = pod.ctl.submit(
        "name: dies\nagent: {label: pod}\nsteps:\n  - sh: 'sleep 1000 & echo $! > pids; echo $$ >> pids; echo started; wait'\n    \
         container: build\n",
    );
    let pidfile = pod.workspace("dies").join("pids");
    let _leftovers = Leftovers(pidfile.clone());
    wait_for("the step to start", Duration::from_secs(20), || {
        (pids_in(&pidfile).len() == 2 && pod.ctl.step_log(id, 1) == b"started\n").then_some(())
    });
    let cut = Instant::now();
    server.kill("KILL");
    let b = pod.ctl.wait_build_state(id, Duration::from_secs(30));
    assert!(cut.elapsed() < Duration::from_secs(15), "the failure took {:?}", cut.elapsed());
    assert_eq!(b["state"], "failure", "{b}");
    let exit = b["steps"][0]["exit"].as_str().unwrap();
    let want = format!(
        "the step server of container 'build' ({}) went away mid-step",
        pod.socket("build").display()
    );
    assert!(exit.contains(&want), "{exit}\n{}", pod.logs(&[&server]));
    assert_eq!(String::from_utf8(pod.ctl.step_log(id, 1)).unwrap(), "started\n");
    // The next step waits for the new server (its socket replaces the dead one's) and runs on it.
    let waiting = "waiting up to 30 s for the step server of container 'build'";
    let before = pod.agent.log_text().matches(waiting).count();
    let id =
        pod.ctl.submit("name: next\nagent: {label: pod}\nsteps:\n  - sh: echo again\n    container: build\n");
    wait_for("the step to wait for a step server", Duration::from_secs(20), || {
        (pod.agent.log_text().matches(waiting).count() > before).then_some(())
    });
    let fresh = pod.server("build", &[]);
    let b = pod.ctl.wait_build_state(id, Duration::from_secs(40));
    assert_eq!(b["state"], "success", "{b}\n{}", pod.logs(&[&fresh]));
    assert_eq!(pod.ctl.step_log(id, 1), b"again\n");
    assert!(pod.agent.log_text().contains(waiting));
}

#[test]
fn a_container_steps_output_survives_a_controller_restart_through_the_agents_spool() {
    let mut pod = Pod::start_with(Controller::start_on_fixed_ports(&[]), "10s");
    let server = pod.server("build", &[]);
    let yaml = "name: spool\nagent: {label: pod}\nsteps:\n  - sh: 'for i in $(seq 1 80); do seq 1 20000; sleep 0.05; done | tee out.txt'\n    \
                container: build\n";
    let id = pod.ctl.submit(yaml);
    let stored = |ctl: &Controller| {
        std::fs::metadata(ctl.data.path().join(format!("builds/{id}/1.log"))).map(|m| m.len()).unwrap_or(0)
    };
    wait_for("1 MB of output stored", Duration::from_secs(30), || {
        (stored(&pod.ctl) >= 1_000_000).then_some(())
    });
    pod.ctl.kill();
    std::thread::sleep(Duration::from_secs(1));
    pod.ctl.launch();
    let b = pod.ctl.wait_build_state(id, Duration::from_secs(60));
    assert_eq!(b["state"], "success", "{b}\n{}", pod.logs(&[&server]));
    let produced = std::fs::read(pod.workspace("spool").join("out.txt")).unwrap();
    assert!(produced.len() > 2_000_000);
    let log = pod.ctl.step_log(id, 1);
    assert_eq!(log.len(), produced.len());
    assert_eq!(sha256(&log), sha256(&produced), "the stored log is byte-exact after the restart");
    assert!(pod.agent.log_text().contains("output goes to the spool"), "{}", pod.agent.log_text());
}

#[test]
fn install_copies_a_runnable_agent_binary() {
    let dir = TempDir::new("install");
    let dest = dir.path().join("wisp-agent");
    let out = Command::new(AGENT).args(["install"]).arg(&dest).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("installed {}", dest.display()));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dest).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(AGENT).unwrap(), "a copy of the running binary");
    let v = Command::new(&dest).arg("--version").output().unwrap();
    assert!(v.status.success() && String::from_utf8_lossy(&v.stdout).starts_with("wisp-agent "));
    // Into a directory, and over an older copy; no temporary file is left behind.
    let sub = dir.path().join("tools");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("wisp-agent"), b"old").unwrap();
    let out = Command::new(&dest).args(["install"]).arg(&sub).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(sub.join("wisp-agent")).unwrap(), std::fs::read(AGENT).unwrap());
    let names: Vec<_> = std::fs::read_dir(&sub).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["wisp-agent"]);
    // Where it cannot write, it says so and what to check.
    let out = Command::new(AGENT).args(["install", "/nonexistent-wisp-dir/wisp-agent"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is /nonexistent-wisp-dir a mounted, writable volume?"), "{err}");
}
