//! The agent as its users and its steps see it: which refusals it retries and which end it, what
//! a step can learn about its agent through /proc, the paths steps are given, starting from a
//! descriptor or the Kubernetes environment against the default self-signed TLS, two agents in one
//! process with their own shutdown, and what the agent logs.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn agent_cmd(ctl: &Controller, name: &str, secret: &str, work: &Path) -> Command {
    let mut cmd = Command::new(AGENT);
    cmd.args(["--url", &ctl.url(), "--name", name, "--secret", secret, "--work-dir"]).arg(work);
    cmd
}

/// A build's record once it has ended (works with TLS too: asks through the CLI's JSON API client).
fn finished(ctl: &Controller, id: u64) -> serde_json::Value {
    ctl.wait_build_state(id, Duration::from_secs(60))
}

#[test]
fn an_agent_refused_for_a_reason_it_can_retry_keeps_trying_and_gets_in() {
    let ctl = Controller::start();
    let work = TempDir::new("lockout");
    let secret = ctl.add_node("r1", "rl", &["--tcp"]);
    let run_agent = |s: &str, tag: &str| {
        let mut cmd = agent_cmd(&ctl, "r1", s, &work.path().join(tag));
        cmd.args(["--direct", &ctl.agent_addr]);
        spawn_logged(cmd, work.path(), tag)
    };
    for i in 0..10 {
        let mut a = run_agent(&"0".repeat(64), &format!("wrong{i}"));
        assert_eq!(a.wait_exit(Duration::from_secs(20)), 4, "{}", a.log_text());
    }
    // Others' failures from the same address never keep the right secret out.
    let started = Instant::now();
    let mut first = run_agent(&secret, "right");
    ctl.wait_online("r1");
    assert!(started.elapsed() < Duration::from_secs(10), "{}", first.log_text());
    // A second agent for the node is refused as "already connected": a refusal it can retry.
    let second = run_agent(&secret, "second");
    let log = wait_for("the refusal to be logged", Duration::from_secs(20), || {
        let t = second.log_text();
        t.contains("already connected").then_some(t)
    });
    assert!(log.contains("reconnecting in") && !log.contains("certificate"), "{log}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(alive(second.pid()), "the agent gave up on a refusal it can retry: {}", second.log_text());
    first.kill("TERM");
    wait_for("the second agent to get in", Duration::from_secs(60), || {
        second.log_text().contains("connected to").then_some(())
    });
    let (code, out) = ctl.run("name: after\nagent: {label: rl}\nsteps:\n  - sh: echo in\n");
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_step_cannot_read_its_agents_secret_from_proc() {
    let ctl = Controller::start();
    let work = TempDir::new("scrub");
    // The secret both on the command line and in the environment, as a careless wrapper passes it.
    let s1 = ctl.add_node("s1", "scrub1", &[]);
    let mut cmd = agent_cmd(&ctl, "s1", &s1, &work.path().join("s1"));
    cmd.arg("--websocket").env("JENKINS_SECRET", &s1);
    let a1 = spawn_logged(cmd, work.path(), "s1");
    // The positional form of Kubernetes pod templates.
    let s2 = ctl.add_node("s2", "scrub2", &["--tcp"]);
    let mut cmd = Command::new(AGENT);
    cmd.args([&s2, "s2"])
        .env("JENKINS_URL", ctl.url())
        .env("JENKINS_DIRECT_CONNECTION", &ctl.agent_addr)
        .env("JENKINS_SECRET", &s2)
        .env("JENKINS_AGENT_WORKDIR", work.path().join("s2"));
    let a2 = spawn_logged(cmd, work.path(), "s2");
    ctl.wait_online("s1");
    ctl.wait_online("s2");
    for (label, secret, agent) in [("scrub1", &s1, &a1), ("scrub2", &s2, &a2)] {
        // The step looks for the secret where any process of the same user can read it.
        let yaml = format!(
            "name: peek\nagent: {{label: {label}}}\nenv: {{S: \"{secret}\"}}\nsteps:\n  - sh: |\n      \
             if grep -q \"$S\" /proc/$PPID/environ; then echo ENVIRON-LEAK; fi\n      \
             if grep -q \"$S\" /proc/$PPID/cmdline; then echo CMDLINE-LEAK; fi\n      \
             tr '\\0' ' ' < /proc/$PPID/cmdline; echo\n      \
             echo checked parent $PPID\n"
        );
        let (code, out) = ctl.run(&yaml);
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains(&format!("checked parent {}", agent.pid())),
            "the step's parent is the agent: {out}"
        );
        assert!(!out.lines().any(|l| l.ends_with("-LEAK")), "a step read its agent's secret: {out}");
        // What /proc shows to anyone else, read from here.
        for file in ["environ", "cmdline"] {
            let bytes = std::fs::read(format!("/proc/{}/{file}", agent.pid())).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(secret.as_str()), "/proc/{}/{file} holds the secret: {text}", agent.pid());
        }
    }
    // The rest of the command line is untouched.
    let cmdline = String::from_utf8(std::fs::read(format!("/proc/{}/cmdline", a1.pid())).unwrap()).unwrap();
    assert!(cmdline.split('\0').any(|a| a == "--websocket"), "{cmdline:?}");
    assert!(cmdline.split('\0').any(|a| a == "s1"), "{cmdline:?}");
}

#[test]
fn workspace_is_absolute_with_a_relative_or_default_work_dir() {
    let ctl = Controller::start();
    let work = TempDir::new("relwd");
    let check = |label: &str| {
        let (code, out) = ctl.run(&format!(
            "name: abs\nagent: {{label: {label}}}\nsteps:\n  - sh: |\n      \
             case \"$WORKSPACE\" in /*) echo WORKSPACE-IS-ABSOLUTE;; esac\n      \
             touch marker\n      \
             cd /tmp && ls \"$WORKSPACE\"\n"
        ));
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("WORKSPACE-IS-ABSOLUTE") && out.contains("marker"), "{out}");
    };
    let s1 = ctl.add_node("rel", "rel", &[]);
    let mut cmd = Command::new(AGENT);
    cmd.args(["--url", &ctl.url(), "--name", "rel", "--secret", &s1, "--websocket", "--work-dir", "a/../b"])
        .current_dir(work.path());
    let _a = spawn_logged(cmd, work.path(), "rel");
    ctl.wait_online("rel");
    check("rel");
    assert!(work.path().join("b/workspace/abs/marker").exists());
    // No --work-dir at all: the current directory.
    let cwd = work.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let s2 = ctl.add_node("dflt", "dflt", &[]);
    let mut cmd = Command::new(AGENT);
    cmd.args(["--url", &ctl.url(), "--name", "dflt", "--secret", &s2, "--websocket"]).current_dir(&cwd);
    let _b = spawn_logged(cmd, work.path(), "dflt");
    ctl.wait_online("dflt");
    check("dflt");
    assert!(cwd.join("workspace/abs/marker").exists());
}

/// Standard base64 with padding (what Jenkins' `JENKINS_INSTANCE_IDENTITY` holds).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The controller's public key as the Kubernetes plugin injects it: base64 of its DER
/// SubjectPublicKeyInfo (`InstanceIdentity.getPublic().getEncoded()`).
fn jenkins_identity(ctl: &Controller) -> String {
    use futures_rustls::pki_types::{pem::PemObject, CertificateDer};
    let cert = CertificateDer::from_pem_file(ctl.data.path().join("tls/cert.pem")).unwrap();
    let ee = webpki::EndEntityCert::try_from(&cert).unwrap();
    base64(ee.subject_public_key_info().as_ref())
}

#[test]
fn jnlp_url_and_the_kubernetes_forms_run_builds_against_the_default_self_signed_tls() {
    let ctl = Controller::start_tls(&[]);
    let work = TempDir::new("tls-forms");
    let mut agents = Vec::new();
    // --jnlp-url exactly as README shows it: a WebSocket node and a TCP node (its port found
    // through /tcpSlaveAgentListener/ over TLS).
    for (name, label, extra) in [("jws", "f1", &[][..]), ("jtcp", "f2", &["--tcp"][..])] {
        let wd = work.path().join(name);
        let mut args = vec!["--work-dir", wd.to_str().unwrap()];
        args.extend_from_slice(extra);
        let secret = ctl.add_node(name, label, &args);
        let file = work.path().join(format!("{name}.secret"));
        std::fs::write(&file, &secret).unwrap();
        let mut cmd = Command::new(AGENT);
        cmd.args(["--jnlp-url", &format!("{}computer/{name}/jenkins-agent.jnlp", ctl.url())])
            .args(["--secret", &format!("@{}", file.display())]);
        let agent = spawn_logged(cmd, work.path(), name);
        ctl.wait_online(name);
        let id = ctl
            .submit(&format!("name: {name}\nagent: {{label: {label}}}\nsteps:\n  - sh: echo via {name}\n"));
        assert_eq!(ctl.wait_build_state_tls(id, Duration::from_secs(60)), "success", "{}", agent.log_text());
        agents.push(agent);
    }
    // The positional form with the Kubernetes plugin's environment: WebSocket, and direct TCP
    // with the identity in Jenkins' format (base64 of the public key) or wisp's (sha256:HEX).
    let b64 = jenkins_identity(&ctl);
    let fp = ctl.fingerprint();
    let cases = [
        ("kws", "k1", b64.as_str(), true),
        ("kdirect", "k2", b64.as_str(), false),
        ("kfp", "k3", fp.as_str(), false),
    ];
    for (name, label, identity, ws) in cases {
        let secret = ctl.add_node(name, label, if ws { &[] } else { &["--tcp"] });
        let mut cmd = Command::new(AGENT);
        cmd.args([&secret, name])
            .env("JENKINS_URL", ctl.url())
            .env("JENKINS_INSTANCE_IDENTITY", identity)
            .env("JENKINS_AGENT_WORKDIR", work.path().join(name));
        if ws {
            cmd.env("JENKINS_WEB_SOCKET", "true");
        } else {
            cmd.env("JENKINS_DIRECT_CONNECTION", &ctl.agent_addr);
        }
        agents.push(spawn_logged(cmd, work.path(), name));
        ctl.wait_online(name);
        let id = ctl
            .submit(&format!("name: {name}\nagent: {{label: {label}}}\nsteps:\n  - sh: echo via {name}\n"));
        assert_eq!(ctl.wait_build_state_tls(id, Duration::from_secs(60)), "success");
    }
}

#[test]
fn a_certificate_that_never_verifies_ends_the_agent_with_exit_code_8() {
    let ctl = Controller::start_tls(&[]);
    let work = TempDir::new("tls-never");
    let secret = ctl.add_node("n1", "x", &[]);
    let started = Instant::now();
    // A wrong pin, and no trust at all (the self-signed identity is in no CA store).
    let mut cmd = agent_cmd(&ctl, "n1", &secret, &work.path().join("a"));
    cmd.args(["--websocket", "--instance-identity", &format!("sha256:{}", "ab".repeat(32))]);
    let mut pinned = spawn_logged(cmd, work.path(), "pinned");
    let mut cmd = agent_cmd(&ctl, "n1", &secret, &work.path().join("b"));
    cmd.arg("--websocket");
    let mut unchecked = spawn_logged(cmd, work.path(), "none");
    // 5 tries 1, 2, 4 and 8 s apart (plus up to 50% jitter) take at most 23 s.
    for (agent, what) in [(&mut pinned, "not the pinned"), (&mut unchecked, "invalid peer certificate")] {
        assert_eq!(agent.wait_exit(Duration::from_secs(45)), 8, "{}", agent.log_text());
        let log = agent.log_text();
        let last = log.lines().last().unwrap_or_default();
        assert!(last.contains("5 tries") && last.contains(what), "{log}");
        for advice in ["--instance-identity", "--cert", "--no-certificate-check"] {
            assert!(last.contains(advice), "advice {advice} missing: {log}");
        }
    }
    assert!(started.elapsed() < Duration::from_secs(40));
}

#[test]
fn two_agents_in_one_process_stop_independently() {
    let ctl = Controller::start();
    let work = TempDir::new("inproc");
    let mut agents = Vec::new();
    for (name, label) in [("p1", "inproc1"), ("p2", "inproc2")] {
        let cfg = wisp::agent::Config {
            url: ctl.url(),
            name: name.into(),
            secret: ctl.add_node(name, label, &[]),
            mode: wisp::agent::Mode::WebSocket,
            work_dir: work.path().join(name),
            trust: Default::default(),
            spool_cap: wisp::agent::DEFAULT_SPOOL_CAP,
        };
        let (stopper, shutdown) = wisp::agent::Shutdown::stopper();
        agents.push((stopper, std::thread::spawn(move || wisp::agent::run(cfg, shutdown))));
        ctl.wait_online(name);
    }
    // Each agent learns of its own steps' exits.
    for label in ["inproc1", "inproc2"] {
        let id = ctl.submit(&format!(
            "name: {label}\nagent: {{label: {label}}}\nsteps:\n  - sh: sleep 1; echo on {label}\n"
        ));
        assert_eq!(finished(&ctl, id)["state"], "success");
    }
    // Stopping p1 kills its running step and closes its link; p2 goes on.
    let pidfile = work.path().join("long.pid");
    ctl.submit(&format!(
        "name: long\nagent: {{label: inproc1}}\nsteps:\n  - sh: echo $$ > {}; sleep 60\n",
        pidfile.display()
    ));
    let pid: u32 = wait_for("the long step to start", Duration::from_secs(20), || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });
    let (stopper, p1) = agents.remove(0);
    stopper.stop();
    wait_for("p1 to stop", Duration::from_secs(10), || p1.is_finished().then_some(()));
    assert!(p1.join().unwrap().is_ok(), "a stopped agent returns Ok");
    assert!(!alive(pid), "the stopped agent's step was not killed");
    ctl.wait_offline("p1", Duration::from_secs(10));
    let id = ctl.submit("name: after\nagent: {label: inproc2}\nsteps:\n  - sh: sleep 1; echo still on p2\n");
    assert_eq!(finished(&ctl, id)["state"], "success");
    assert!(ctl.node_line("p2").unwrap().contains("\tonline\t"));
    assert!(!agents[0].1.is_finished());
}

#[test]
fn a_node_with_many_executors_notices_every_step_exit() {
    let ctl = Controller::start();
    let work = TempDir::new("many");
    let secret = ctl.add_node("many", "many", &["--executors", "100"]);
    let mut cmd = agent_cmd(&ctl, "many", &secret, &work.path().join("w"));
    cmd.arg("--websocket");
    let mut agent = spawn_logged(cmd, work.path(), "many");
    ctl.wait_online("many");
    let long: Vec<u64> =
        (0..90).map(|_| ctl.submit("name: long\nagent: {label: many}\nsteps:\n  - sh: sleep 60\n")).collect();
    wait_for("90 steps running", Duration::from_secs(30), || {
        (long.iter().filter(|id| ctl.build_json(**id)["state"] == "running").count() == 90).then_some(())
    });
    let short: Vec<u64> =
        (0..10).map(|_| ctl.submit("name: short\nagent: {label: many}\nsteps:\n  - sh: sleep 1\n")).collect();
    for id in short {
        let b = ctl.wait_build_state(id, Duration::from_secs(20));
        assert_eq!(b["state"], "success", "{b}");
    }
    agent.kill("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), 0, "{}", agent.log_text());
}

#[test]
fn a_spool_failure_mid_run_is_not_reported_as_a_failure_to_start() {
    // Fixed ports: the agent finds the controller again after it is killed and started.
    let mut ctl = Controller::start_on_fixed_ports(&[]);
    let work = TempDir::new("spoolfail");
    let secret = ctl.add_node("sp", "sp", &[]);
    let mut cmd = agent_cmd(&ctl, "sp", &secret, &work.path().join("w"));
    cmd.arg("--websocket");
    let agent = spawn_logged(cmd, work.path(), "sp");
    ctl.wait_online("sp");
    // The step puts a file where its output spool goes, then writes more than the agent holds in
    // memory while the controller is down (so none of it is acknowledged): the agent must spool
    // it to disk and cannot. (A controller that is only stopped, its link still up, would not do:
    // the agent sends within its credit window, which its memory holds, and the step waits.)
    let (ready, go) = (work.path().join("ready"), work.path().join("go"));
    let id = ctl.submit(&format!(
        "name: sp\nagent: {{label: sp}}\nsteps:\n  - sh: |\n      \
         s=\"$WORKSPACE/../../.wisp/spool/$WISP_BUILD-$WISP_STEP\"\n      \
         mkdir -p \"${{s%/*}}\"; rm -rf \"$s\"; : > \"$s\"\n      \
         touch {ready}; while [ ! -e {go} ]; do sleep 0.1; done\n      \
         head -c 2000000 /dev/zero; sleep 30\n",
        ready = ready.display(),
        go = go.display()
    ));
    wait_for("the step to be ready", Duration::from_secs(20), || ready.exists().then_some(()));
    ctl.kill();
    std::fs::write(&go, "").unwrap();
    wait_for("the agent to fail writing its spool", Duration::from_secs(20), || {
        agent.log_text().contains("cannot write the output spool").then_some(())
    });
    ctl.launch();
    let b = ctl.wait_build_state(id, Duration::from_secs(20));
    let text = b.to_string();
    assert_eq!(b["state"], "failure", "{text}");
    assert!(text.contains("output spool"), "{text}");
    assert!(!text.contains("could not start"), "a step that ran is reported as not started: {text}");
}

#[test]
fn the_wrong_secret_error_is_printed_once() {
    let ctl = Controller::start();
    let work = TempDir::new("once");
    ctl.add_node("n1", "x", &[]);
    let mut cmd = agent_cmd(&ctl, "n1", &"0".repeat(64), work.path());
    cmd.arg("--websocket");
    let mut a = spawn_logged(cmd, work.path(), "a");
    assert_eq!(a.wait_exit(Duration::from_secs(20)), 4);
    let log = a.log_text();
    assert_eq!(log.matches("wrong secret for node 'n1'").count(), 1, "{log}");
}

#[test]
fn agents_log_the_address_they_dialled_and_the_transport() {
    let ctl = Controller::start_tls(&[]);
    let fp = ctl.fingerprint();
    let work = TempDir::new("dialled");
    let s1 = ctl.add_node("t1", "x", &["--tcp"]);
    let mut cmd = agent_cmd(&ctl, "t1", &s1, &work.path().join("t1"));
    cmd.args(["--direct", &ctl.agent_addr, "--instance-identity", &fp]);
    let direct = spawn_logged(cmd, work.path(), "t1");
    let s2 = ctl.add_node("t2", "x", &["--tcp"]);
    let mut cmd = agent_cmd(&ctl, "t2", &s2, &work.path().join("t2"));
    cmd.args(["--instance-identity", &fp]); // the port from /tcpSlaveAgentListener/
    let found = spawn_logged(cmd, work.path(), "t2");
    let s3 = ctl.add_node("w1", "x", &[]);
    let mut cmd = agent_cmd(&ctl, "w1", &s3, &work.path().join("w1"));
    cmd.args(["--websocket", "--instance-identity", &fp]);
    let ws = spawn_logged(cmd, work.path(), "w1");
    for n in ["t1", "t2", "w1"] {
        ctl.wait_online(n);
    }
    let connected =
        |p: &Proc| p.log_text().lines().find(|l| l.contains("connected")).unwrap_or_default().to_string();
    for p in [&direct, &found] {
        let line = connected(p);
        assert!(line.contains(&format!("connected to {} over TCP with TLS", ctl.agent_addr)), "{line}");
        assert!(!line.contains("https://"), "{line}");
    }
    let line = connected(&ws);
    assert!(line.contains(&format!("connected to {} over WebSocket with TLS", ctl.http)), "{line}");
}

#[test]
fn sigterm_stops_the_agent_with_a_plain_line_and_closes_its_link_cleanly() {
    let ctl = Controller::start_tls(&[]);
    let fp = ctl.fingerprint();
    let work = TempDir::new("stop");
    let s1 = ctl.add_node("t1", "x", &["--tcp"]);
    let mut cmd = agent_cmd(&ctl, "t1", &s1, &work.path().join("t1"));
    cmd.args(["--direct", &ctl.agent_addr, "--instance-identity", &fp]);
    let tcp = spawn_logged(cmd, work.path(), "t1");
    let s2 = ctl.add_node("w1", "x", &[]);
    let mut cmd = agent_cmd(&ctl, "w1", &s2, &work.path().join("w1"));
    cmd.args(["--websocket", "--instance-identity", &fp]);
    let ws = spawn_logged(cmd, work.path(), "w1");
    for (name, mut agent) in [("t1", tcp), ("w1", ws)] {
        ctl.wait_online(name);
        agent.kill("TERM");
        assert_eq!(agent.wait_exit(Duration::from_secs(10)), 0, "{}", agent.log_text());
        let log = agent.log_text();
        assert!(log.lines().last().unwrap_or_default().ends_with("INFO  agent stopped"), "{log}");
        assert!(!log.contains("rustls"), "{log}");
        ctl.wait_offline(name, Duration::from_secs(10));
        let ctl_log = ctl.log_text();
        let offline = ctl_log.lines().find(|l| l.contains(&format!("node {name}: offline"))).unwrap();
        assert!(!offline.contains("rustls") && !offline.contains("close_notify"), "{offline}");
    }
}

#[test]
fn as_pid_1_the_agent_reaps_orphans_hides_its_secret_and_stops_on_sigterm() {
    require_root();
    let ctl = Controller::start();
    let work = TempDir::new("pid1");
    let secret = ctl.add_node("init", "init", &[]);
    let mut cmd = Command::new("unshare");
    cmd.args(["--fork", "--pid", "--mount-proc", "--kill-child", AGENT])
        .args(["--url", &ctl.url(), "--name", "init", "--websocket", "--work-dir"])
        .arg(work.path().join("w"))
        .env("JENKINS_SECRET", &secret);
    let mut unshare = spawn_logged(cmd, work.path(), "init");
    ctl.wait_online("init");
    // The step leaves an orphan (adopted by PID 1, the agent), waits for it to end, then lists
    // what is left in the namespace.
    let yaml = format!(
        "name: init\nagent: {{label: init}}\nenv: {{S: \"{secret}\"}}\nsteps:\n  - sh: |\n      \
         ( sleep 0.3 & )\n      \
         sleep 1.5\n      \
         for p in /proc/[0-9]*; do echo \"$p $(grep '^State' $p/status)\"; done\n      \
         if grep -q \"$S\" /proc/1/environ; then echo ENVIRON-LEAK; fi\n      \
         echo \"pid 1 is $(tr '\\0' ' ' < /proc/1/cmdline)\"\n"
    );
    let (code, out) = ctl.run(&yaml);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("pid 1 is {AGENT}")), "{out}");
    assert!(!out.contains("zombie"), "an orphan was not reaped: {out}");
    assert!(!out.lines().any(|l| l.ends_with("-LEAK")), "{out}");
    // SIGTERM to PID 1 from outside its namespace, as `podman stop` sends it.
    let agent: u32 = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.pid()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = Command::new("kill").args(["-TERM", &agent.to_string()]).status();
    assert_eq!(unshare.wait_exit(Duration::from_secs(10)), 0, "{}", unshare.log_text());
    assert!(unshare.log_text().trim_end().ends_with("agent stopped"), "{}", unshare.log_text());
}
