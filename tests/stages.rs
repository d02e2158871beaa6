//! Pipelines with stages across real agents: stages in order on the agents their labels name,
//! parallel branches at once, a matrix over two agents, failFast, post blocks, when and
//! parameters, step and stage retries, and a stage that loses its agent run again on another.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// A node with `labels` and its agent, online (over WebSocket when `ws`, else TCP).
fn node(ctl: &Controller, name: &str, labels: &str, ws: bool, work: &TempDir) -> Proc {
    ctl.online_agent(name, labels, ws, 4, work.path())
}

/// The build's steps as (stage, name, state, node).
fn steps(ctl: &Controller, id: u64) -> Vec<(String, String, String, String)> {
    let b = ctl.build_json(id);
    b["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap_or("").to_string(),
                s["name"].as_str().unwrap_or("").to_string(),
                s["state"].as_str().unwrap_or("").to_string(),
                s["node"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn run_file(ctl: &Controller, yaml: &str, extra: &[&str]) -> (i32, String, String) {
    let f = ctl.data.path().join(format!("p-{}.yaml", std::process::id()));
    std::fs::write(&f, yaml).unwrap();
    let mut args = vec!["run", f.to_str().unwrap(), "--follow"];
    args.extend_from_slice(extra);
    let out = ctl.wisp(&args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn stages_run_in_order_on_the_agents_their_labels_name_and_a_matrix_spans_both() {
    let ctl = Controller::start();
    let work = TempDir::new("stages");
    let _a = node(&ctl, "amd", "linux x86_64", false, &work);
    let _b = node(&ctl, "arm", "linux aarch64", true, &work);
    let yaml = r#"
name: multi
agent: {label: linux}
stages:
  - name: first
    agent: {label: x86_64}
    steps: [{sh: echo "first on $NODE_NAME"}]
  - name: build
    agent: {label: "linux && ${arch}"}
    matrix:
      axes: {arch: [x86_64, aarch64]}
    steps: [{sh: echo "cell $arch on $NODE_NAME"}]
  - name: last
    agent: {label: aarch64}
    steps: [{sh: echo "last on $NODE_NAME"}]
"#;
    let (code, out, err) = run_file(&ctl, yaml, &[]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", ctl.log_text());
    for line in ["first on amd\n", "cell x86_64 on amd\n", "cell aarch64 on arm\n", "last on arm\n"] {
        assert!(out.contains(line), "{line:?} in {out}");
    }
    assert!(out.contains("==> step 2 [build / arch=x86_64]: echo \"cell $arch on $NODE_NAME\""), "{out}");
    let s = steps(&ctl, 1);
    let got: Vec<(&str, &str, &str)> =
        s.iter().map(|(st, _, state, n)| (st.as_str(), state.as_str(), n.as_str())).collect();
    assert_eq!(
        got,
        [
            ("first", "success", "amd"),
            ("build / arch=x86_64", "success", "amd"),
            ("build / arch=aarch64", "success", "arm"),
            ("last", "success", "arm"),
        ]
    );
    // Each stage with an agent of its own gave its executor back: nothing is busy.
    let (status, body) = ctl.get("/api/nodes");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{v}");
    assert!(nodes.iter().all(|n| n["busy"] == 0), "{v}");
}

#[test]
fn parallel_branches_run_at_once_and_fail_fast_stops_the_others() {
    let ctl = Controller::start();
    let work = TempDir::new("par");
    let _a = node(&ctl, "p1", "linux", false, &work);
    let marks = TempDir::new("marks");
    let m = marks.path().display();
    // Two branches on the pipeline's agent, each marking its start and waiting for the other's:
    // they can only both finish if they run at the same time.
    let yaml = format!(
        r#"
name: par
agent: {{label: linux}}
stages:
  - name: both
    parallel:
      - name: a
        steps: [{{sh: "touch {m}/a; for i in $(seq 100); do [ -e {m}/b ] && exit 0; sleep 0.1; done; exit 1"}}]
      - name: b
        steps: [{{sh: "touch {m}/b; for i in $(seq 100); do [ -e {m}/a ] && exit 0; sleep 0.1; done; exit 1"}}]
"#
    );
    let (code, out, err) = run_file(&ctl, &yaml, &[]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", ctl.log_text());

    let yaml = r#"
name: fast
agent: {label: linux}
stages:
  - name: both
    failFast: true
    parallel:
      - {name: bad, steps: [{sh: "sleep 0.5; exit 3"}]}
      - {name: slow, steps: [{sh: "sleep 60"}]}
  - name: never
    steps: [{sh: echo never}]
"#;
    let t0 = Instant::now();
    let (code, out, _) = run_file(&ctl, yaml, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(t0.elapsed() < Duration::from_secs(30), "failFast did not stop the slow branch: {out}");
    let s = steps(&ctl, 2);
    assert_eq!(
        (s[0].2.as_str(), s[1].2.as_str(), s[2].2.as_str()),
        ("failure", "aborted", "skipped"),
        "{s:?}"
    );
    let b = ctl.build_json(2);
    assert_eq!(b["message"], "step 1 (sleep 0.5; exit 3, in both / bad) failed: exit code 3", "{b}");
}

#[test]
fn post_blocks_when_and_parameters() {
    let ctl = Controller::start();
    let work = TempDir::new("post");
    let _a = node(&ctl, "n1", "linux", true, &work);
    let yaml = r#"
name: post
agent: {label: linux}
parameters:
  - {name: TARGET, default: x86_64, choices: [x86_64, aarch64]}
stages:
  - name: build
    steps: [{sh: "echo building for $TARGET; [ \"$FAIL\" != yes ]"}]
    env: {FAIL: "no"}
    post:
      always: [{sh: echo stage-always}]
      success: [{sh: echo stage-success}]
      failure: [{sh: echo stage-failure}]
  - name: arm-only
    when: {env: {TARGET: aarch64}}
    steps: [{sh: echo arm-only ran}]
post:
  always: [{sh: echo pipeline-always}]
  failure: [{sh: echo pipeline-failure}]
"#;
    let (code, out, err) = run_file(&ctl, yaml, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("building for x86_64\n")
            && out.contains("stage-always\n")
            && out.contains("stage-success\n"),
        "{out}"
    );
    assert!(
        !out.contains("stage-failure") && !out.contains("arm-only ran") && !out.contains("pipeline-failure"),
        "{out}"
    );
    assert!(out.contains("pipeline-always\n"), "{out}");
    let s = steps(&ctl, 1);
    let state = |name: &str| s.iter().find(|x| x.1 == name).map(|x| x.2.clone()).unwrap();
    assert_eq!(state("echo stage-failure"), "skipped");
    assert_eq!(state("echo arm-only ran"), "skipped");

    let (code, out, err) = run_file(&ctl, yaml, &["-p", "TARGET=aarch64"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("building for aarch64\n") && out.contains("arm-only ran\n"), "{out}");

    let failing = yaml.replace("FAIL: \"no\"", "FAIL: \"yes\"");
    let (code, out, _) = run_file(&ctl, &failing, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("stage-always\n")
            && out.contains("stage-failure\n")
            && out.contains("pipeline-failure\n"),
        "{out}"
    );
    assert!(!out.contains("stage-success") && !out.contains("arm-only ran"), "{out}");

    // Refused at submit: the CLI's error exit (3), with the reason.
    let (code, _, err) = run_file(&ctl, yaml, &["-p", "TARGET=mips"]);
    assert_eq!(code, 3);
    assert!(err.contains("-p TARGET=mips: \"mips\" is not one of its choices: x86_64, aarch64"), "{err}");
    let (code, _, err) = run_file(&ctl, yaml, &["-p", "NOPE=1"]);
    assert_eq!(code, 3);
    assert!(err.contains("the pipeline has no parameter \"NOPE\"; it has TARGET"), "{err}");
}

#[test]
fn a_cancel_runs_the_aborted_post_steps() {
    let ctl = Controller::start();
    let work = TempDir::new("cancel");
    let _a = node(&ctl, "c1", "linux", true, &work);
    let id = ctl.submit(
        "name: c\nagent: {label: linux}\nstages:\n  - name: s\n    steps: [{sh: sleep 60}]\n    post:\n      aborted: [{sh: echo cleaned up}]\n",
    );
    wait_for("the step to run", Duration::from_secs(20), || {
        (steps(&ctl, id)[0].2 == "running").then_some(())
    });
    let out = ctl.wisp(&["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b = ctl.wait_build_state(id, Duration::from_secs(30));
    assert_eq!(b["state"], "aborted", "{b}");
    let s = steps(&ctl, id);
    assert_eq!((s[0].2.as_str(), s[1].2.as_str()), ("aborted", "success"), "{s:?}");
    assert_eq!(ctl.step_log(id, 2), b"cleaned up\n");
}

#[test]
fn step_retries_and_stage_retries_on_failure_run_again_and_keep_every_attempt() {
    let ctl = Controller::start();
    let work = TempDir::new("retry");
    let _a = node(&ctl, "r1", "linux", false, &work);
    let marks = TempDir::new("rmarks");
    let c = marks.path().join("count");
    let c = c.display();
    // Fails twice, then succeeds: the step's retry: 3 takes three attempts.
    let yaml = format!(
        "name: r\nagent: {{label: linux}}\nsteps:\n  - sh: \"n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo try $n; [ $n -ge 3 ]\"\n    retry: 3\n"
    );
    let (code, out, err) = run_file(&ctl, &yaml, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let s = steps(&ctl, 1);
    let states: Vec<&str> = s.iter().map(|x| x.2.as_str()).collect();
    assert_eq!(states, ["failure", "failure", "success"], "{s:?}");
    assert!(s[1].1.ends_with("(again, 2)") && s[2].1.ends_with("(again, 3)"), "{s:?}");
    assert_eq!(ctl.step_log(1, 3), b"try 3\n");
    // A stage retried only on agent-lost does not run again for an ordinary failure.
    let yaml = "name: r2\nagent: {label: linux}\nstages:\n  - name: s\n    retry: {count: 3, on: [agent-lost]}\n    steps: [{sh: exit 4}]\n";
    let (code, out, _) = run_file(&ctl, yaml, &[]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(steps(&ctl, 2).len(), 1);
    // retry: 2 on a stage runs the whole stage again.
    let d = marks.path().join("stage");
    let d = d.display();
    let yaml = format!(
        "name: r3\nagent: {{label: linux}}\nstages:\n  - name: s\n    retry: 2\n    steps:\n      - sh: echo one\n      - sh: \"[ -e {d} ] || {{ touch {d}; exit 1; }}\"\n"
    );
    let (code, out, err) = run_file(&ctl, &yaml, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let s = steps(&ctl, 3);
    let got: Vec<(&str, &str)> = s.iter().map(|x| (x.0.as_str(), x.2.as_str())).collect();
    assert_eq!(
        got,
        [("s", "success"), ("s", "failure"), ("s (attempt 2)", "success"), ("s (attempt 2)", "success")]
    );
}

#[test]
fn a_stage_that_loses_its_agent_runs_again_on_another() {
    let ctl = Controller::start_with(&["--agent-grace", "2"]);
    let work = TempDir::new("lost");
    let mut x = node(&ctl, "x1", "flaky", false, &work);
    let mut y = node(&ctl, "y1", "flaky", true, &work);
    let marks = TempDir::new("lmarks");
    let m = marks.path().join("ran");
    let m = m.display();
    // The first attempt marks and hangs; the second (on the other agent) sees the mark and ends.
    let yaml = format!(
        "name: lost\nstages:\n  - name: s\n    agent: {{label: flaky}}\n    retry: {{count: 2, on: [agent-lost]}}\n    steps:\n      - sh: \"if [ -e {m} ]; then echo second on $NODE_NAME; exit 0; fi; touch {m}; sleep 120\"\n"
    );
    let id = ctl.submit(&yaml);
    let first = wait_for("the step to start", Duration::from_secs(20), || {
        let s = steps(&ctl, id);
        (s[0].2 == "running" && marks.path().join("ran").exists()).then(|| s[0].3.clone())
    });
    // Its agent dies (SIGKILL: no goodbye); after the grace the stage runs again elsewhere.
    if first == "x1" {
        x.kill("KILL");
    } else {
        y.kill("KILL");
    }
    let b = ctl.wait_build_state(id, Duration::from_secs(60));
    assert_eq!(b["state"], "success", "{b}\n{}", ctl.log_text());
    let s = steps(&ctl, id);
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[0].2, "failure");
    let exit = ctl.build_json(id)["steps"][0]["exit"].as_str().unwrap().to_string();
    assert!(exit.contains("agent lost"), "{exit}");
    assert_eq!((s[1].0.as_str(), s[1].2.as_str()), ("s (attempt 2)", "success"));
    assert_ne!(s[1].3, first, "the second attempt ran on the other agent");
    let log = String::from_utf8(ctl.step_log(id, 2)).unwrap();
    assert_eq!(log, format!("second on {}\n", s[1].3));
}

/// A controller SIGKILLed while the second stage of a build streams on another agent: after the
/// restart the first stage is not run again, the second goes on where its log was, and the
/// build ends with every byte once.
#[test]
fn a_multi_stage_build_survives_the_controller_killed_mid_stage() {
    let mut ctl = Controller::start_on_fixed_ports(&[]);
    let work = TempDir::new("stages-kill");
    let _a = node(&ctl, "k1", "one", false, &work);
    let _b = node(&ctl, "k2", "two", true, &work);
    let marks = TempDir::new("kmarks");
    let runs = marks.path().join("first-runs");
    let yaml = format!(
        "name: kill\nstages:\n  - name: first\n    agent: {{label: one}}\n    steps: [{{sh: \"echo x >> {}; echo first\"}}]\n  - name: second\n    agent: {{label: two}}\n    steps: [{{sh: \"for i in $(seq 1 60); do echo line $i; sleep 0.1; done\"}}]\n",
        runs.display()
    );
    let id = ctl.submit(&yaml);
    wait_for("the second stage to stream", Duration::from_secs(30), || {
        let log = ctl.get(&format!("/api/builds/{id}/steps/2/log"));
        (log.0 == 200 && String::from_utf8_lossy(&log.1).contains("line 10\n")).then_some(())
    });
    ctl.kill();
    std::thread::sleep(Duration::from_secs(1));
    ctl.launch();
    let b = ctl.wait_build_state(id, Duration::from_secs(60));
    assert_eq!(b["state"], "success", "{b}\n{}", ctl.log_text());
    let want: String = (1..=60).map(|i| format!("line {i}\n")).collect();
    assert_eq!(String::from_utf8(ctl.step_log(id, 2)).unwrap(), want);
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "x\n", "the first stage ran once");
    let s = steps(&ctl, id);
    assert_eq!((s[0].3.as_str(), s[1].3.as_str()), ("k1", "k2"), "{s:?}");
    let (_, body) = ctl.get("/api/nodes");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["nodes"].as_array().unwrap().iter().all(|n| n["busy"] == 0), "{v}");
}
