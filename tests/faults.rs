//! Builds survive real faults. Each test streams about 200 MB of numbered lines from a step
//! (`seq 1 N | tee out.txt`) and injects one fault mid-stream: a silent network partition between
//! network namespaces (5 s, and 90 s: longer than the ping timeout, shorter than the grace), a
//! controller killed with SIGKILL and restarted on its data dir, the nginx in front of the
//! controller restarted, an agent killed, a partition longer than the agent grace. The stored log
//! is then compared byte for byte (SHA-256) with what the step wrote.
//!
//! Needs root (network namespaces, iptables) and nginx; `scripts/test.sh` installs both. Each test
//! prints a `FAULT` line with the time to resume and the bytes replayed (run with `--nocapture`).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Lines the streaming step writes: 24,000,000 numbered lines are 204,888,897 bytes.
fn lines() -> u64 {
    std::env::var("WISP_FAULT_LINES").ok().and_then(|v| v.parse().ok()).unwrap_or(24_000_000)
}

/// Bytes `seq 1 n` writes.
fn seq_bytes(n: u64) -> u64 {
    let (mut total, mut lo, mut digits) = (0, 1u64, 1u64);
    while lo <= n {
        let hi = (lo * 10 - 1).min(n);
        total += (hi - lo + 1) * (digits + 1);
        lo *= 10;
        digits += 1;
    }
    total
}

const MB: u64 = 1_000_000;

fn stream_pipeline(name: &str, label: &str) -> String {
    format!(
        "name: {name}\nagent: {{label: {label}}}\nsteps:\n  - sh: echo $$ > sh.pid; seq 1 {} | tee out.txt\n",
        lines()
    )
}

/// Run a command line, panicking with its output if it fails.
fn run_ok(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test host for the agent: its own network namespace joined to this one by a veth pair. The
/// controller binds the host side's address; the agent runs inside the namespace.
struct NetLab {
    ns: String,
    host_if: String,
    agent_if: String,
    host_ip: String,
}

impl NetLab {
    fn new(k: u8) -> Self {
        require_root();
        let lab = Self {
            ns: format!("wisp-fault{k}"),
            host_if: format!("wf{k}h"),
            agent_if: format!("wf{k}a"),
            host_ip: format!("10.231.{k}.1"),
        };
        // Leftovers of an interrupted run.
        let _ = Command::new("ip").args(["netns", "del", &lab.ns]).output();
        let _ = Command::new("ip").args(["link", "del", &lab.host_if]).output();
        run_ok(&["ip", "netns", "add", &lab.ns]);
        run_ok(&["ip", "link", "add", &lab.host_if, "type", "veth", "peer", "name", &lab.agent_if]);
        run_ok(&["ip", "link", "set", &lab.agent_if, "netns", &lab.ns]);
        run_ok(&["ip", "addr", "add", &format!("{}/30", lab.host_ip), "dev", &lab.host_if]);
        run_ok(&["ip", "-n", &lab.ns, "addr", "add", &format!("10.231.{k}.2/30"), "dev", &lab.agent_if]);
        run_ok(&["ip", "link", "set", &lab.host_if, "up"]);
        run_ok(&["ip", "-n", &lab.ns, "link", "set", &lab.agent_if, "up"]);
        run_ok(&["ip", "-n", &lab.ns, "link", "set", "lo", "up"]);
        lab
    }

    /// Every packet on the agent's link vanishes; neither side gets an error.
    fn partition(&self) {
        for (chain, dir) in [("OUTPUT", "-o"), ("INPUT", "-i")] {
            run_ok(&[
                "ip",
                "netns",
                "exec",
                &self.ns,
                "iptables",
                "-A",
                chain,
                dir,
                &self.agent_if,
                "-j",
                "DROP",
            ]);
        }
    }

    fn heal(&self) {
        run_ok(&["ip", "netns", "exec", &self.ns, "iptables", "-F"]);
    }

    /// Start an agent for `name` inside the namespace (`ip netns exec` execs it: same pid).
    fn agent(
        &self,
        ctl: &Controller,
        name: &str,
        secret: &str,
        ws: bool,
        work: &Path,
        extra: &[&str],
    ) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, AGENT, "--url", &ctl.url(), "--name", name, "--secret", secret]);
        cmd.arg("--work-dir").arg(work).args(extra);
        if ws {
            cmd.arg("--websocket");
        } else {
            cmd.args(["--direct", &ctl.agent_addr]);
        }
        spawn_logged(cmd, work, name)
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
    }
}

/// Bytes of step 1's log the controller has stored (its log file).
fn stored_len(ctl: &Controller, id: u64) -> u64 {
    std::fs::metadata(ctl.data.path().join(format!("builds/{id}/1.log"))).map(|m| m.len()).unwrap_or(0)
}

fn wait_stored(ctl: &Controller, id: u64, at_least: u64) {
    wait_for(&format!("{at_least} bytes of build {id}'s log"), Duration::from_secs(120), || {
        (stored_len(ctl, id) >= at_least).then_some(())
    });
    assert!(
        stored_len(ctl, id) < seq_bytes(lines()) && ctl.build_json(id)["state"] == "running",
        "the fault must hit mid-stream"
    );
}

/// Time until the stored log grows again after a fault ended.
fn time_to_resume(ctl: &Controller, id: u64, limit: Duration, agent: &Proc) -> Duration {
    let t0 = Instant::now();
    let base = stored_len(ctl, id);
    while stored_len(ctl, id) == base {
        assert!(
            t0.elapsed() < limit,
            "the log did not grow again within {limit:?}\n--- controller:\n{}\n--- agent:\n{}",
            ctl.log_text(),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// What the controller logged about resumed steps: (seconds offline, bytes replayed) per resume.
fn resumes(log: &str) -> Vec<(f64, u64)> {
    log.lines()
        .filter(|l| l.contains("resumed on node"))
        .filter_map(|l| {
            let secs = l.split(" after ").nth(1)?.split('s').next()?.parse().ok()?;
            let bytes = l.split("agent replays ").nth(1)?.split(' ').next()?.parse().ok()?;
            Some((secs, bytes))
        })
        .collect()
}

/// Bytes under `dir` (the agent's spool).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The build succeeded and its stored log is exactly what the step wrote.
fn assert_log_exact(ctl: &Controller, id: u64, out: &Path) {
    let b = ctl.wait_build_state(id, Duration::from_secs(300));
    assert_eq!(b["state"], "success", "{b}\n{}", ctl.log_text());
    let produced = std::fs::read(out).unwrap();
    assert_eq!(produced.len() as u64, seq_bytes(lines()), "the step wrote all its lines");
    let stored = ctl.step_log(id, 1);
    assert_eq!(stored.len(), produced.len(), "stored length");
    assert_eq!(sha256(&stored), sha256(&produced), "the stored log is byte-exact");
}

/// The stored log is a prefix of what the step wrote: nothing doubled, nothing out of place.
fn assert_log_prefix(ctl: &Controller, id: u64, out: &Path) -> usize {
    let produced = std::fs::read(out).unwrap();
    let stored = ctl.step_log(id, 1);
    assert!(stored.len() <= produced.len());
    assert_eq!(
        sha256(&stored),
        sha256(&produced[..stored.len()]),
        "the stored log is a prefix of the output"
    );
    stored.len()
}

/// Print a figure line and keep it in `target/tmp/faults.txt`, which `scripts/test.sh` shows.
fn figure(line: String) {
    use std::io::Write;
    eprintln!("{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

fn report(scenario: &str, resume: Duration, log: &str, extra: &str) {
    let r = resumes(log);
    let replayed: u64 = r.iter().map(|x| x.1).sum();
    figure(format!(
        "FAULT {scenario}: output flowing again {:.2}s after the fault ended; {} session resume(s), {replayed} \
         bytes replayed{}; {extra}",
        resume.as_secs_f64(),
        r.len(),
        r.iter().map(|x| format!(" (offline {:.1}s)", x.0)).collect::<String>()
    ));
}

fn pid_in(path: &Path) -> u32 {
    wait_for(&format!("{}", path.display()), Duration::from_secs(30), || {
        std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok())
    })
}

/// Kill what is left of a step's process group (a test that failed half way).
struct GroupGuard(PathBuf);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", pid.trim())]).output();
        }
    }
}

#[test]
fn build_survives_a_five_second_silent_partition() {
    let lab = NetLab::new(1);
    let ctl = Controller::start_with(&["--bind", &lab.host_ip]);
    let work = TempDir::new("p5");
    let secret = ctl.add_node("p5", "p5", &["--tcp"]);
    let agent = lab.agent(&ctl, "p5", &secret, false, work.path(), &[]);
    ctl.wait_online("p5");
    let id = ctl.submit(&stream_pipeline("p5", "p5"));
    let _g = GroupGuard(work.path().join("workspace/p5/sh.pid"));
    wait_stored(&ctl, id, 20 * MB);
    lab.partition();
    std::thread::sleep(Duration::from_millis(500));
    let before = stored_len(&ctl, id);
    std::thread::sleep(Duration::from_millis(4500));
    let during = stored_len(&ctl, id) - before;
    assert_eq!(during, 0, "nothing crosses a partition");
    lab.heal();
    let resume = time_to_resume(&ctl, id, Duration::from_secs(60), &agent);
    assert_log_exact(&ctl, id, &work.path().join("workspace/p5/out.txt"));
    report(
        "5 s partition, tcp",
        resume,
        &ctl.log_text(),
        &format!("agent VmHWM {} KiB", vm_hwm_kib(agent.pid())),
    );
}

#[test]
fn build_survives_a_ninety_second_partition_longer_than_the_ping_timeout() {
    let lab = NetLab::new(2);
    // Default ping interval (15 s: a link is dead after 45 s) and grace (300 s).
    let ctl = Controller::start_with(&["--bind", &lab.host_ip]);
    let work = TempDir::new("p90");
    let secret = ctl.add_node("p90", "p90", &[]);
    let agent = lab.agent(&ctl, "p90", &secret, true, work.path(), &[]);
    ctl.wait_online("p90");
    let id = ctl.submit(&stream_pipeline("p90", "p90"));
    let _g = GroupGuard(work.path().join("workspace/p90/sh.pid"));
    wait_stored(&ctl, id, 20 * MB);
    lab.partition();
    let t0 = Instant::now();
    let spool = work.path().join(".wisp/spool");
    let mut spool_max = 0;
    while t0.elapsed() < Duration::from_secs(90) {
        spool_max = spool_max.max(dir_bytes(&spool));
        std::thread::sleep(Duration::from_millis(200));
    }
    let ctl_log = ctl.log_text();
    assert!(ctl_log.contains("node p90: offline"), "the controller declares the link dead:\n{ctl_log}");
    assert!(
        agent.log_text().contains("the link is dead"),
        "the agent declares it dead:\n{}",
        agent.log_text()
    );
    assert!(spool_max > 0, "while apart, the agent spools the step's output");
    // The step wrote everything and exited while apart; its exit is delivered after the replay.
    let sh = pid_in(&work.path().join("workspace/p90/sh.pid"));
    assert!(!alive(sh), "the step finished during the partition (spool cap 1 GiB)");
    lab.heal();
    let resume = time_to_resume(&ctl, id, Duration::from_secs(60), &agent);
    assert_log_exact(&ctl, id, &work.path().join("workspace/p90/out.txt"));
    let log = ctl.log_text();
    assert!(log.contains("build 1 step 1: resumed on node p90"), "{log}");
    // Offline from the agent's last frame, not from when the controller noticed (45 s later).
    let away = resumes(&log).first().map(|r| r.0).unwrap_or(0.0);
    assert!(away >= 90.0, "the resume says {away:.1}s offline after a 90 s partition:\n{log}");
    assert_eq!(dir_bytes(&spool), 0, "the spool is emptied once the controller has everything");
    report(
        "90 s partition, websocket",
        resume,
        &log,
        &format!("spool peak {spool_max} bytes; agent VmHWM {} KiB", vm_hwm_kib(agent.pid())),
    );
}

#[test]
fn build_survives_a_controller_killed_and_restarted_mid_stream() {
    let mut ctl = Controller::start_on_fixed_ports(&[]);
    let work = TempDir::new("ck");
    let secret = ctl.add_node("ck", "ck", &["--tcp"]);
    let agent = ctl.agent("ck", &secret, false, work.path());
    ctl.wait_online("ck");
    let id = ctl.submit(&stream_pipeline("ck", "ck"));
    let _g = GroupGuard(work.path().join("workspace/ck/sh.pid"));
    wait_stored(&ctl, id, 20 * MB);
    ctl.kill();
    std::thread::sleep(Duration::from_secs(1));
    ctl.launch();
    let resume = time_to_resume(&ctl, id, Duration::from_secs(60), &agent);
    assert_log_exact(&ctl, id, &work.path().join("workspace/ck/out.txt"));
    let log = ctl.log_text();
    assert!(log.contains("build 1 step 1: was running on node ck when the controller stopped"), "{log}");
    report("controller SIGKILL + restart, tcp", resume, &log, "");
}

/// nginx on 127.0.0.1 in front of a controller, from the config kept in `tests/proxy/`.
struct Nginx {
    dir: TempDir,
    conf: PathBuf,
    port: u16,
    proc: Option<Proc>,
}

impl Nginx {
    fn start(upstream: &str) -> Self {
        let dir = TempDir::new("nginx");
        let port = free_port();
        let template =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/proxy/nginx-ws.conf"))
                .unwrap();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            template
                .replace("@PREFIX@", dir.path().to_str().unwrap())
                .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
                .replace("@UPSTREAM@", upstream),
        )
        .unwrap();
        let mut n = Self { dir, conf, port, proc: None };
        n.launch();
        n
    }

    fn launch(&mut self) {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("nginx is not installed: scripts/test.sh installs it (apt-get install nginx)");
        let mut cmd = Command::new(nginx);
        // One process: a test that ends with SIGKILL (Proc's drop) leaves no orphaned worker behind.
        cmd.arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(&self.conf)
            .args(["-g", "daemon off; master_process off;"]);
        self.proc = Some(spawn_logged(cmd, self.dir.path(), "nginx-stderr"));
        let addr = format!("127.0.0.1:{}", self.port);
        wait_for("nginx to listen", Duration::from_secs(20), || std::net::TcpStream::connect(&addr).ok());
    }

    /// Fast shutdown (SIGTERM closes every proxied connection), then a new nginx on the same port.
    fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill("TERM");
            p.wait_exit(Duration::from_secs(20));
        }
        self.launch();
    }
}

#[test]
fn build_survives_an_nginx_restart_and_pings_keep_an_idle_link_through_it() {
    let ctl = Controller::start();
    let mut nginx = Nginx::start(&ctl.http);
    let work = TempDir::new("ngx");
    let secret = ctl.add_node("ngx", "ngx", &[]);
    let mut cmd = Command::new(AGENT);
    cmd.args(["--url", &format!("http://127.0.0.1:{}/", nginx.port), "--name", "ngx", "--secret", &secret]);
    cmd.arg("--websocket").arg("--work-dir").arg(work.path());
    let agent = spawn_logged(cmd, work.path(), "ngx");
    ctl.wait_online("ngx");
    // nginx closes a proxied connection after 60 s without traffic (proxy_read_timeout's default);
    // the pings (every 15 s, both ways) keep the idle link up well past that.
    std::thread::sleep(Duration::from_secs(75));
    let log = ctl.log_text();
    assert_eq!(log.matches("node ngx: online").count(), 1, "the idle link stayed up through nginx:\n{log}");
    assert!(!log.contains("node ngx: offline"), "{log}");

    let id = ctl.submit(&stream_pipeline("ngx", "ngx"));
    let _g = GroupGuard(work.path().join("workspace/ngx/sh.pid"));
    wait_stored(&ctl, id, 20 * MB);
    nginx.restart();
    let resume = time_to_resume(&ctl, id, Duration::from_secs(60), &agent);
    assert_log_exact(&ctl, id, &work.path().join("workspace/ngx/out.txt"));
    let log = ctl.log_text();
    assert_eq!(log.matches("node ngx: online").count(), 2, "one reconnect through the new nginx:\n{log}");
    assert!(log.contains("resumed on node ngx"), "{log}");
    // The CLI follows a log through the same proxy.
    let out = Command::new(WISP)
        .args(["log", &id.to_string(), "--follow", "--url", &format!("http://127.0.0.1:{}/", nginx.port)])
        .arg("--token")
        .arg(ctl.token())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last = format!("\n{}\n", lines());
    let text = &out.stdout;
    assert!(text.windows(last.len()).any(|w| w == last.as_bytes()), "the whole log came through nginx");
    assert!(text.len() as u64 >= seq_bytes(lines()) && text.len() as u64 <= seq_bytes(lines()) + 200);
    report("nginx restart, websocket", resume, &log, "");
}

#[test]
fn a_killed_agent_fails_its_build_with_agent_lost_within_the_grace() {
    const GRACE: u64 = 15;
    let ctl = Controller::start_with(&["--agent-grace", &GRACE.to_string()]);
    let work = TempDir::new("kill");
    let secret = ctl.add_node("victim", "victim", &["--tcp"]);
    let mut victim = ctl.agent("victim", &secret, false, &work.path().join("victim"));
    let secret = ctl.add_node("other", "other", &[]);
    let _other = ctl.agent("other", &secret, true, &work.path().join("other"));
    ctl.wait_online("victim");
    ctl.wait_online("other");
    let id = ctl.submit(&stream_pipeline("victim", "victim"));
    let ws = work.path().join("victim/workspace/victim");
    let _g = GroupGuard(ws.join("sh.pid"));
    wait_stored(&ctl, id, 20 * MB);
    victim.kill("KILL");
    let t0 = Instant::now();
    // The controller serves other builds throughout.
    let mut served = 0;
    let b = loop {
        let (code, out) =
            ctl.run(&format!("name: other\nagent: {{label: other}}\nsteps:\n  - sh: echo served {served}\n"));
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(&format!("served {served}\n")), "{out}");
        served += 1;
        let b = ctl.build_json(id);
        if b["state"] != "running" {
            break b;
        }
        assert!(t0.elapsed() < Duration::from_secs(GRACE + 30), "the build waits past its grace");
        std::thread::sleep(Duration::from_millis(500));
    };
    let failed_after = t0.elapsed();
    assert_eq!(b["state"], "failure", "{b}");
    assert!(b["message"].as_str().unwrap_or("").contains("agent lost"), "{b}");
    assert!(failed_after >= Duration::from_secs(GRACE - 1), "the build got its grace: {failed_after:?}");
    assert!(failed_after <= Duration::from_secs(GRACE + 10), "failed within the grace: {failed_after:?}");
    let stored = assert_log_prefix(&ctl, id, &ws.join("out.txt"));
    figure(format!(
        "FAULT agent SIGKILL, tcp: build failed 'agent lost' {:.1}s after the kill (grace {GRACE}s); {served} \
         other builds served meanwhile; {stored} bytes stored, a byte-exact prefix",
        failed_after.as_secs_f64()
    ));
}

#[test]
fn a_partition_longer_than_the_grace_fails_the_build_and_the_agent_kills_the_step() {
    let lab = NetLab::new(6);
    let ctl =
        Controller::start_with(&["--bind", &lab.host_ip, "--agent-grace", "20", "--ping-interval", "2"]);
    let work = TempDir::new("pg");
    let secret = ctl.add_node("pg", "pg", &[]);
    let agent = lab.agent(&ctl, "pg", &secret, true, work.path(), &["--spool-cap", "64M"]);
    ctl.wait_online("pg");
    let script =
        format!("echo $$ > sh.pid; sleep 100000 & echo $! > bg.pid; seq 1 {} | tee out.txt; wait", lines());
    let id = ctl.submit(&format!("name: pg\nagent: {{label: pg}}\nsteps:\n  - sh: '{script}'\n"));
    let ws = work.path().join("workspace/pg");
    let _g = GroupGuard(ws.join("sh.pid"));
    wait_stored(&ctl, id, 20 * MB);
    let (sh, bg) = (pid_in(&ws.join("sh.pid")), pid_in(&ws.join("bg.pid")));
    lab.partition();
    let t0 = Instant::now();
    let spool = work.path().join(".wisp/spool");
    let mut spool_max = 0;
    let b = loop {
        spool_max = spool_max.max(dir_bytes(&spool));
        let b = ctl.build_json(id);
        if b["state"] != "running" {
            break b;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the build waits past its grace");
        std::thread::sleep(Duration::from_millis(200));
    };
    let failed_after = t0.elapsed();
    assert_eq!(b["state"], "failure", "{b}");
    assert!(b["message"].as_str().unwrap_or("").contains("agent lost"), "{b}");
    // While apart the spool filled to its cap and the step blocked on its write: nothing dropped.
    let spool_now = dir_bytes(&spool);
    assert!(spool_max <= 64 * 1024 * 1024 + 8 * 1024 * 1024, "the spool keeps to its cap: {spool_max}");
    assert!(spool_now >= 60 * 1024 * 1024, "the spool filled up while apart: {spool_now}");
    let written = std::fs::metadata(ws.join("out.txt")).unwrap().len();
    assert!(written < seq_bytes(lines()), "the step is blocked, not finished");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(std::fs::metadata(ws.join("out.txt")).unwrap().len(), written, "the step blocks on its write");
    assert!(alive(sh) && alive(bg));
    lab.heal();
    let healed = Instant::now();
    wait_for("the agent to kill the abandoned step", Duration::from_secs(60), || {
        (!alive(sh) && !alive(bg)).then_some(())
    });
    let killed_after = healed.elapsed();
    let alog = agent.log_text();
    assert!(alog.contains("gave this step up"), "the agent learns the build was abandoned:\n{alog}");
    wait_for("the spool to go", Duration::from_secs(10), || (dir_bytes(&spool) == 0).then_some(()));
    let stored = assert_log_prefix(&ctl, id, &ws.join("out.txt"));
    figure(format!(
        "FAULT partition longer than the grace, websocket: build failed 'agent lost' {:.1}s into the partition \
         (ping 2 s, grace 20 s); spool peak {spool_max} bytes (cap 64 MiB); step group killed {:.1}s after the \
         heal; {stored} bytes stored, a byte-exact prefix; agent VmHWM {} KiB",
        failed_after.as_secs_f64(),
        killed_after.as_secs_f64(),
        vm_hwm_kib(agent.pid())
    ));
}

#[test]
fn seq_bytes_counts_what_seq_writes() {
    let out = Command::new("seq").args(["1", "12345"]).output().unwrap();
    assert_eq!(out.stdout.len() as u64, seq_bytes(12345));
}
