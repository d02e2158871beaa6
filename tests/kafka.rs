//! The Kafka transport end to end, against a real Kafka-API broker (tansu; see
//! tests/common/kafka.rs for why that one and what it does differently from Kafka): agents that
//! reach the controller only through the broker run builds whose stored log is compared byte for
//! byte (SHA-256) with what the step wrote (the step tees its output to a file), across a
//! controller SIGKILL, a broker restart and an agent SIGKILL, with the first bootstrap broker
//! down; and records forged or replayed by an independent client (kafka-python) are refused.

mod common;
use common::kafka::Broker;
use common::*;
use std::process::Command;
use std::time::Duration;

/// A controller on fixed ports that also serves Kafka sessions through `broker`.
fn controller(broker: &Broker, extra: &[&str]) -> Controller {
    let list = format!("127.0.0.1:{},{}", free_port(), broker.addr());
    let mut args = vec!["--kafka", list.as_str()];
    args.extend_from_slice(extra);
    Controller::start_on_fixed_ports(&args)
}

/// Node `name` and its agent, which knows only the brokers (the first of them down).
fn agent(ctl: &Controller, broker: &Broker, name: &str, work: &TempDir) -> Proc {
    let secret = ctl.add_node(name, "kafka", &[]);
    let dir = work.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let list = format!("127.0.0.1:{},{}", free_port(), broker.addr());
    let mut cmd = Command::new(AGENT);
    cmd.args(["--kafka", &list, "--name", name, "--secret", &secret, "--work-dir"]).arg(&dir);
    let p = spawn_logged(cmd, &dir, name);
    ctl.wait_online(name);
    p
}

/// A step that writes `lines` numbered lines with some random bytes, `pause` seconds apart in
/// blocks of 200, and keeps a copy of what it wrote in `out.txt` of its workspace.
fn stream(lines: u32, pause: &str) -> String {
    format!(
        "name: stream\nagent: {{label: kafka}}\nsteps:\n  - sh: |\n      i=0\n      while [ $i -lt {lines} ]; do\n        \
         seq $i $((i+199)); head -c 300 /dev/urandom | od -An -tx1; i=$((i+200)); sleep {pause}\n      done | tee out.txt\n"
    )
}

/// The copy the step kept, found in the agent's work dir.
fn written(work: &TempDir) -> Vec<u8> {
    let found = Command::new("find").arg(work.path()).args(["-name", "out.txt"]).output().unwrap();
    let path = String::from_utf8(found.stdout).unwrap();
    std::fs::read(path.lines().next().expect("the step's out.txt")).unwrap()
}

fn same_bytes(ctl: &Controller, id: u64, work: &TempDir) {
    let log = ctl.step_log(id, 1);
    let wrote = written(work);
    assert!(!wrote.is_empty());
    assert_eq!(sha256(&log), sha256(&wrote), "stored {} bytes, the step wrote {}", log.len(), wrote.len());
}

/// Stored bytes of step 1 of build `id`, once there are some.
fn wait_stored(ctl: &Controller, id: u64) -> usize {
    wait_for("output stored", Duration::from_secs(60), || {
        let (status, body) = ctl.get(&format!("/api/builds/{id}/steps/1/log"));
        (status == 200 && body.len() > 20_000).then_some(body.len())
    })
}

#[test]
fn a_build_over_kafka_stores_its_log_byte_for_byte_though_the_first_broker_is_down() {
    let broker = Broker::start();
    let ctl = controller(&broker, &[]);
    let work = TempDir::new("kafka-e2e");
    let _a = agent(&ctl, &broker, "k-e2e", &work);
    let line = ctl.node_line("k-e2e").unwrap();
    assert!(line.contains("online"), "{line}");
    let (code, out) = ctl.run(&stream(20_000, "0"));
    assert_eq!(code, 0, "{out}\n{}", ctl.log_text());
    same_bytes(&ctl, 1, &work);
    assert!(ctl.log_text().contains("from kafka:wisp.k-e2e#"), "{}", ctl.log_text());
}

#[test]
fn a_controller_killed_mid_stream_comes_back_and_the_log_is_exact() {
    let broker = Broker::start();
    let mut ctl = controller(&broker, &[]);
    let work = TempDir::new("kafka-ctl-kill");
    let _a = agent(&ctl, &broker, "k-ctl", &work);
    let id = ctl.submit(&stream(30_000, "0.02"));
    let before = wait_stored(&ctl, id);
    ctl.kill();
    std::thread::sleep(Duration::from_secs(2));
    ctl.launch();
    let state = ctl.wait_build_state(id, Duration::from_secs(120));
    assert_eq!(state["state"], "success", "{state}\n{}", ctl.log_text());
    let after = ctl.step_log(id, 1).len();
    assert!(after > before, "more was stored after the restart ({before} then {after})");
    same_bytes(&ctl, id, &work);
}

#[test]
fn a_broker_restarted_mid_stream_loses_nothing() {
    let mut broker = Broker::start();
    let ctl = controller(&broker, &[]);
    let work = TempDir::new("kafka-broker");
    let _a = agent(&ctl, &broker, "k-brk", &work);
    let id = ctl.submit(&stream(30_000, "0.02"));
    wait_stored(&ctl, id);
    broker.kill();
    std::thread::sleep(Duration::from_secs(2));
    broker.launch();
    let state = ctl.wait_build_state(id, Duration::from_secs(120));
    assert_eq!(state["state"], "success", "{state}\n{}\n{}", ctl.log_text(), broker.log_text());
    same_bytes(&ctl, id, &work);
}

#[test]
fn an_agent_killed_mid_stream_fails_its_build_with_an_exact_prefix_stored() {
    let broker = Broker::start();
    let ctl = controller(&broker, &["--agent-grace", "3"]);
    let work = TempDir::new("kafka-agent-kill");
    let mut a = agent(&ctl, &broker, "k-agt", &work);
    let id = ctl.submit(&stream(100_000, "0.02"));
    wait_stored(&ctl, id);
    a.kill("KILL");
    let state = ctl.wait_build_state(id, Duration::from_secs(60));
    assert_eq!(state["state"], "failure", "{state}");
    let log = ctl.step_log(id, 1);
    let wrote = written(&work);
    assert!(
        log.len() <= wrote.len() && wrote.starts_with(&log),
        "the stored log is a prefix of what was written"
    );
}

/// Someone who can write to the node's topic replays the controller's record that started a
/// step, numbered as the next frame of the live session, and appends made-up and old records
/// the agent sent: the step does not run again, no made-up byte reaches the log, and the build
/// ends well with its log exact.
#[test]
fn forged_and_replayed_records_are_refused() {
    let broker = Broker::start();
    let ctl = controller(&broker, &[]);
    let work = TempDir::new("kafka-forge");
    let _a = agent(&ctl, &broker, "k-frg", &work);
    let marker = work.path().join("ran");
    let once =
        format!("name: once\nagent: {{label: kafka}}\nsteps:\n  - sh: \"echo x >> {}\"\n", marker.display());
    let (code, out) = ctl.run(&once);
    assert_eq!(code, 0, "{out}");
    let dump = |p: &str| -> Vec<(u64, String, i64, usize)> {
        let out = broker.records(&["dump", "wisp.k-frg", p]);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f[0].parse().unwrap(), f[1].to_string(), f[2].parse().unwrap(), f[3].parse().unwrap())
            })
            .collect()
    };
    // The controller's records to the agent: the biggest one is the StepStart with the script.
    let down = dump("0");
    let start = down.iter().max_by_key(|r| r.3).unwrap().clone();
    let last = down.last().unwrap().clone();
    broker.records(&["renumber", "wisp.k-frg", "0", &start.0.to_string(), &(last.2 + 1).to_string()]);
    // Made up: the live session's key and its next number, with bytes no secret tagged.
    let up = dump("1");
    let last_up = up.last().unwrap().clone();
    let mut forged = format!("{:016x}", last_up.2 + 1);
    forged.push_str(&"41".repeat(60));
    broker.records(&["write", "wisp.k-frg", "1", &last_up.1, &forged]);
    // Old: the first record the agent ever sent (its Hello), appended again.
    broker.records(&["renumber", "wisp.k-frg", "1", &up[0].0.to_string(), "0"]);
    // The link may have ended over the made-up records; the agent comes back and builds go on.
    let id = ctl.submit(&stream(5_000, "0"));
    let state = ctl.wait_build_state(id, Duration::from_secs(120));
    assert_eq!(state["state"], "success", "{state}\n{}", ctl.log_text());
    same_bytes(&ctl, id, &work);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "x\n", "the replayed step did not run again");
    assert!(!ctl.step_log(id, 1).windows(8).any(|w| w == b"AAAAAAAA"), "no forged byte stored");
}
