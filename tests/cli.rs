//! The `wisp` command line as people use it: exit codes, help and version, TLS options, closed
//! pipes, files named in errors, following a build through a controller restart, the demo, and
//! the API's answers read through the types the CLI uses.

mod common;
use common::*;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use wisp::controller::api;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `wisp ARGS` with no data dir of a controller behind it.
fn wisp_alone(args: &[&str]) -> Output {
    Command::new(WISP)
        .args(args)
        .env_remove("WISP_URL")
        .env_remove("WISP_TOKEN")
        .env_remove("WISP_INSTANCE_IDENTITY")
        .env_remove("WISP_CERT")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn usage_errors_exit_64_never_the_build_failed_code() {
    let dir = TempDir::new("usage");
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, "name: a\nsteps: [{sh: make}]\n").unwrap();
    let f = file.to_str().unwrap();
    for args in [
        &["frobnicate"][..],
        &["run"],
        &["log", "seven"],
        &["nodes", "--no-such-option"],
        &["run", f, "--follow", "--wait"],
        &[],
    ] {
        let out = wisp_alone(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", text(&out.stderr));
        assert!(!out.stderr.is_empty(), "{args:?}: a usage error says what is wrong");
    }
    let out = wisp_alone(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn version_prints_the_version_and_commit() {
    for (bin, name) in [(WISP, "wisp"), (AGENT, "wisp-agent")] {
        let out = Command::new(bin).arg("--version").output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("{name} {}\n", expected_version()));
    }
}

/// The agent tells the controller its build, and `wisp nodes` shows it in its last column.
#[test]
fn nodes_shows_each_connected_agents_version_and_architecture() {
    let ctl = Controller::start();
    let work = TempDir::new("nodes-version");
    let _agent = ctl.online_agent("v1", "linux", false, 1, work.path());
    let want = format!("\t{} {}/{}", expected_version(), std::env::consts::ARCH, std::env::consts::OS);
    let line = wait_for("the agent's build in `wisp nodes`", Duration::from_secs(10), || {
        ctl.node_line("v1").filter(|l| l.ends_with(&want))
    });
    assert!(line.starts_with("v1\tonline\t1\tlinux\t"), "{line}");
    ctl.add_node("v2", "linux", &[]);
    let off = ctl.node_line("v2").unwrap();
    assert!(off.ends_with("\toffline\t1\tlinux\t-"), "an agent not connected has no build: {off}");
}

#[test]
fn help_describes_each_command_in_its_own_words() {
    let out = wisp_alone(&["--help"]);
    let help = text(&out.stdout);
    assert!(!help.contains("Where the controller is"), "{help}");
    let line = |cmd: &str| {
        help.lines()
            .find(|l| l.trim_start().starts_with(&format!("{cmd} ")))
            .unwrap_or_else(|| panic!("no {cmd} in {help}"))
            .to_string()
    };
    assert!(line("node").contains("add, remove or show the secret of a node"), "{help}");
    assert!(line("run").contains("submit a pipeline"), "{help}");
    // Every client command takes the same connection options, described the same way.
    for cmd in [&["nodes"][..], &["node", "add"], &["node", "rm"], &["run"], &["log"], &["token", "rotate"]] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let h = text(&wisp_alone(&args).stdout);
        for opt in ["--url", "--token", "--data", "--instance-identity", "--cert", "--no-certificate-check"] {
            assert!(h.contains(opt), "{cmd:?} --help lacks {opt}: {h}");
        }
        assert!(h.contains("(or WISP_URL"), "{cmd:?}: {h}");
    }
}

#[test]
fn client_commands_accept_the_tls_options_their_advice_names() {
    let ctl = Controller::start_tls(&[]);
    let fp = ctl.fingerprint();
    ctl.add_node("n1", "tls", &[]);
    // A data dir without the controller's fingerprint: the CLI has nothing to pin.
    let elsewhere = TempDir::new("elsewhere");
    let (url, token) = (ctl.url(), ctl.token());
    let nodes = |extra: &[&str]| {
        let mut args =
            vec!["nodes", "--url", &url, "--token", &token, "--data", elsewhere.path().to_str().unwrap()];
        args.extend_from_slice(extra);
        wisp_alone(&args)
    };
    let out = nodes(&[]);
    assert_eq!(out.status.code(), Some(3));
    let advice = text(&out.stderr);
    for opt in ["--instance-identity", "--cert", "--no-certificate-check"] {
        assert!(advice.contains(opt), "advice lacks {opt}: {advice}");
    }
    let out = nodes(&["--instance-identity", &fp]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("n1\t"), "{}", text(&out.stdout));
    let out = nodes(&["--no-certificate-check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--no-certificate-check: not checking"), "{}", text(&out.stderr));
    let out = nodes(&["--instance-identity", &format!("sha256:{}", "ab".repeat(32))]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("not the pinned"), "{}", text(&out.stderr));
    let out = nodes(&["--cert", "/nonexistent/ca.pem"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("/nonexistent/ca.pem"), "{}", text(&out.stderr));
}

/// Run a client command whose stdout is a pipe that nobody reads any more.
fn with_closed_stdout(ctl: &Controller, args: &[&str]) -> std::process::ExitStatus {
    let mut child = Command::new(WISP)
        .args(args)
        .arg("--data")
        .arg(ctl.data.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert_eq!(err, "", "{args:?}: nothing to say about a reader that went away");
    status
}

#[test]
fn a_reader_that_goes_away_ends_the_command_quietly() {
    let ctl = Controller::start();
    let work = TempDir::new("sigpipe");
    let secret = ctl.add_node("n1", "x", &[]);
    let _agent = ctl.agent("n1", &secret, true, work.path());
    ctl.wait_online("n1");
    let (code, _) = ctl.run("name: says\nsteps: [{sh: echo something}]\n");
    assert_eq!(code, 0);
    for args in [&["builds"][..], &["nodes"], &["log", "1"], &["log", "1", "--follow"]] {
        let status = with_closed_stdout(&ctl, args);
        assert_eq!(
            status.signal(),
            Some(13),
            "{args:?}: ended by SIGPIPE, as `ls | head` ends ls: {status:?}"
        );
    }
}

#[test]
fn pipeline_errors_name_the_file_and_the_line() {
    let ctl = Controller::start();
    let file = ctl.data.path().join("bad.yaml");
    std::fs::write(&file, "name: a\nsteps:\n  - sh: a\n  - sh: b\n  - sh: c\n    timeout: 5x\n").unwrap();
    let out = ctl.wisp(&["run", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        text(&out.stderr),
        format!(
            "wisp: {}: line 6 column 14: steps[2].timeout: \"5x\" is not a duration (use seconds or e.g. \
             \"30s\", \"5m\", \"1h\")\n",
            file.display()
        )
    );
}

#[test]
fn node_add_refuses_a_bad_name_before_asking_the_controller() {
    let dir = TempDir::new("badname");
    // No controller at all: the name is refused first, in the words the controller would use.
    let out = wisp_alone(&[
        "node",
        "add",
        "team/builder",
        "--url",
        "http://127.0.0.1:9/",
        "--token",
        "t",
        "--data",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3));
    let want = wisp::controller::labels::check_node_name("team/builder").unwrap_err();
    assert_eq!(text(&out.stderr), format!("wisp: {want}\n"));
}

#[test]
fn a_failed_serve_leaves_no_new_data_dir_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let parent = TempDir::new("serve-fail");
    let data = parent.path().join("new/data");
    let serve = |data: &std::path::Path| {
        Command::new(WISP)
            .args(["serve", "--bind", "127.0.0.1", "--no-tls", "--agent-port", "0", "--http-port", &port])
            .arg("--data")
            .arg(data)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = serve(&data);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("cannot listen for HTTP"), "{}", text(&out.stderr));
    assert!(!parent.path().join("new").exists(), "the data dir (and its parent) it made is gone");
    // A data dir that was there before is kept, with what it held.
    let kept = parent.path().join("kept");
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::write(kept.join("mine"), "x").unwrap();
    assert_eq!(serve(&kept).status.code(), Some(3));
    assert!(kept.join("mine").exists());
}

const TEN_SECONDS: &str =
    "name: long\nagent: {label: follow}\nsteps:\n  - sh: 'for i in $(seq 1 100); do echo line \
                           $i; sleep 0.1; done'\n  - sh: echo done\n";

/// What a follower of `TEN_SECONDS` prints, byte for byte.
fn ten_seconds_log(id: u64) -> String {
    let lines: String = (1..=100).map(|i| format!("line {i}\n")).collect();
    format!(
        "==> step 1: for i in $(seq 1 100); do echo line $i; sleep 0.1; done\n{lines}==> step 1: success (exit \
         code 0)\n==> step 2: echo done\ndone\n==> step 2: success (exit code 0)\n==> build #{id} SUCCESS\n"
    )
}

#[test]
fn followers_ride_out_a_controller_restart_and_end_byte_exact() {
    let mut ctl = Controller::start_on_fixed_ports(&[]);
    let work = TempDir::new("follow");
    let secret = ctl.add_node("f1", "follow", &[]);
    let _agent = ctl.agent("f1", &secret, true, work.path());
    ctl.wait_online("f1");
    let file = ctl.data.path().join("long.yaml");
    std::fs::write(&file, TEN_SECONDS).unwrap();
    let spawn = |args: &[&str], tag: &str| {
        let mut cmd = Command::new(WISP);
        cmd.args(args).arg("--data").arg(ctl.data.path());
        let out = std::fs::File::create(work.path().join(format!("{tag}.out"))).unwrap();
        let err = std::fs::File::create(work.path().join(format!("{tag}.err"))).unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().unwrap()
    };
    let mut run = spawn(&["run", file.to_str().unwrap(), "--follow"], "run");
    let read =
        |tag: &str, ext: &str| std::fs::read_to_string(work.path().join(format!("{tag}.{ext}"))).unwrap();
    wait_for("the build to start", Duration::from_secs(30), || {
        read("run", "out").contains("line 5\n").then_some(())
    });
    let mut log = spawn(&["log", "1", "--follow"], "log");
    wait_for("the second follower", Duration::from_secs(30), || {
        read("log", "out").contains("line 10\n").then_some(())
    });
    ctl.kill();
    std::thread::sleep(Duration::from_secs(2));
    ctl.launch();
    let status = [&mut run, &mut log]
        .map(|c| wait_for("the followers to end", Duration::from_secs(60), || c.try_wait().unwrap()));
    for (tag, st) in ["run", "log"].iter().zip(status) {
        assert_eq!(st.code(), Some(0), "{tag}: {}", read(tag, "err"));
        assert_eq!(read(tag, "out"), ten_seconds_log(1), "{tag}: {}", read(tag, "err"));
        let err = read(tag, "err");
        assert!(err.contains("lost the controller") && err.contains("retrying in"), "{tag}: {err}");
    }
}

/// `wisp run --wait` waits through a controller SIGKILLed and restarted while the build runs
/// (submitted once, so one build), and ends with the build's result.
#[test]
fn run_wait_rides_out_a_controller_restart_with_one_build() {
    let mut ctl = Controller::start_on_fixed_ports(&[]);
    let work = TempDir::new("run-wait");
    let _agent = ctl.online_agent("rw1", "follow", true, 1, work.path());
    let file = ctl.data.path().join("long.yaml");
    std::fs::write(&file, TEN_SECONDS).unwrap();
    let (out, err) = (work.path().join("run.out"), work.path().join("run.err"));
    let mut run = Command::new(WISP)
        .args(["run", file.to_str().unwrap(), "--wait", "--data"])
        .arg(ctl.data.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let log = ctl.data.path().join("builds/1/1.log");
    wait_for("the build to stream", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).ok().filter(|l| l.contains("line 5\n")).map(|_| ())
    });
    ctl.kill();
    std::thread::sleep(Duration::from_secs(2));
    ctl.launch();
    let st = wait_for("wisp run to end", Duration::from_secs(60), || run.try_wait().unwrap());
    let (out, err) = (std::fs::read_to_string(out).unwrap(), std::fs::read_to_string(err).unwrap());
    assert_eq!(st.code(), Some(0), "{out}{err}");
    let bytes = (1..=100).map(|i| format!("line {i}\n").len()).sum::<usize>() + "done\n".len();
    assert_eq!(out, format!("build #1 SUCCESS ({bytes} output bytes stored)\n"), "{err}");
    assert!(err.contains("lost the controller") && err.contains("retrying in"), "{err}");
    let (status, body) = ctl.get("/api/builds");
    let builds: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200);
    assert_eq!(builds["builds"].as_array().map(|b| b.len()), Some(1), "one submit, one build: {builds}");
}

/// The notice of why a build waits comes before its log and is not counted in the byte offset a
/// follower resumes at: after a restart the log goes on where it broke, nothing twice or lost.
#[test]
fn a_follower_is_told_why_the_build_waits_and_still_resumes_byte_exact() {
    let mut ctl = Controller::start_on_fixed_ports(&[]);
    let work = TempDir::new("follow-wait");
    let secret = ctl.add_node("f2", "follow", &[]);
    let file = ctl.data.path().join("long.yaml");
    std::fs::write(&file, TEN_SECONDS).unwrap();
    let out_path = work.path().join("run.out");
    let mut run = Command::new(WISP)
        .args(["run", file.to_str().unwrap(), "--follow", "--data"])
        .arg(ctl.data.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(work.path().join("run.err")).unwrap())
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&out_path).unwrap();
    let notice = "==> build #1 waiting: waiting for an agent: f2 match 'follow' but it is offline\n";
    wait_for("the notice", Duration::from_secs(10), || read().contains(notice).then_some(()));
    let _agent = ctl.agent("f2", &secret, true, work.path());
    wait_for("the build to stream", Duration::from_secs(30), || read().contains("line 10\n").then_some(()));
    ctl.kill();
    std::thread::sleep(Duration::from_secs(2));
    ctl.launch();
    let st = wait_for("the follower to end", Duration::from_secs(60), || run.try_wait().unwrap());
    let err = std::fs::read_to_string(work.path().join("run.err")).unwrap();
    assert_eq!(st.code(), Some(0), "{err}");
    assert_eq!(read(), format!("{notice}{}", ten_seconds_log(1)), "{err}");
}

#[test]
fn the_log_stream_resumes_at_a_byte_offset() {
    let ctl = Controller::start();
    let work = TempDir::new("offset");
    let secret = ctl.add_node("o1", "o", &[]);
    let _agent = ctl.agent("o1", &secret, true, work.path());
    ctl.wait_online("o1");
    let (code, _) = ctl.run("name: o\nsteps: [{sh: seq 1 1000}, {sh: echo two}]\n");
    assert_eq!(code, 0);
    let (status, full) = ctl.get("/api/builds/1/log?follow=1");
    assert_eq!(status, 200);
    assert!(text(&full).ends_with("==> build #1 SUCCESS\n"), "{}", text(&full));
    for offset in [1, 17, 1000, full.len() - 1, full.len(), full.len() + 5] {
        for follow in ["follow=1&", ""] {
            let (status, rest) = ctl.get(&format!("/api/builds/1/log?{follow}offset={offset}"));
            assert_eq!(status, 200);
            let want = if follow.is_empty() {
                // Without follow the stream stops before the build's last line.
                let plain = ctl.get("/api/builds/1/log").1;
                plain.get(offset..).unwrap_or_default().to_vec()
            } else {
                full.get(offset..).unwrap_or_default().to_vec()
            };
            assert_eq!(text(&rest), text(&want), "offset {offset} {follow}");
        }
    }
    let (status, body) = ctl.get("/api/builds/1/log?follow=1&offset=-3");
    assert_eq!(status, 400, "{}", text(&body));
    assert!(text(&body).contains("bad offset"), "{}", text(&body));
}

#[test]
fn log_of_an_ended_build_ends_as_following_it_does() {
    let ctl = Controller::start();
    let work = TempDir::new("logend");
    let secret = ctl.add_node("l1", "l", &["--tcp"]);
    let _agent = ctl.agent("l1", &secret, false, work.path());
    ctl.wait_online("l1");
    for (yaml, code) in
        [("name: ok\nsteps: [{sh: echo fine}]\n", 0), ("name: bad\nsteps: [{sh: echo no; exit 3}]\n", 1)]
    {
        let id = ctl.submit(yaml);
        ctl.wait_build_state(id, Duration::from_secs(30));
        let id = id.to_string();
        let (plain, follow) = (ctl.wisp(&["log", &id]), ctl.wisp(&["log", &id, "--follow"]));
        assert_eq!(text(&plain.stdout), text(&follow.stdout));
        assert!(text(&plain.stdout).lines().last().unwrap().starts_with(&format!("==> build #{id} ")));
        assert_eq!((plain.status.code(), follow.status.code()), (Some(code), Some(code)), "{yaml}");
    }
}

#[test]
fn the_demo_prints_the_build_log_and_keeps_log_lines_in_files() {
    let dir = TempDir::new("demo");
    let data = dir.path().join("wisp-data");
    let out = Command::new(WISP)
        .args(["demo", "--data"])
        .arg(&data)
        .env_remove("WISP_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("step output line 3\n") && stdout.contains("==> build #1 SUCCESS\n"), "{stdout}");
    for (name, s) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(!s.contains(" INFO "), "{name} holds log lines:\n{s}");
    }
    // The header names where the logs went, and they are there.
    for f in ["controller.log", "agent.log"] {
        let path = data.join(f);
        assert!(stderr.contains(&path.display().to_string()), "{f} not named: {stderr}");
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.contains(" INFO "), "{f}: {log}");
    }
}

/// `value` read as `T` and written back is `value` again.
fn same_through<T: serde::Serialize + serde::de::DeserializeOwned>(value: &[u8]) -> T {
    let v: serde_json::Value = serde_json::from_slice(value).unwrap();
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    assert_eq!(serde_json::to_value(&t).unwrap(), v);
    t
}

#[test]
fn every_api_answer_reads_into_its_type_unchanged() {
    let ctl = Controller::start();
    let token = ctl.token();
    let call =
        |method: &str, path: &str, body: &[u8]| http_request(&ctl.http, method, path, Some(&token), body);
    let (status, body) = call("POST", "/api/nodes", br#"{"name": "n1", "labels": "a b", "executors": 2}"#);
    assert_eq!(status, 201);
    let created: api::NodeCreated = same_through(&body);
    assert_eq!((created.node.name.as_str(), created.node.executors), ("n1", 2));
    let work = TempDir::new("api");
    let _agent = ctl.agent("n1", &created.secret, true, work.path());
    ctl.wait_online("n1");
    let (_, body) = call("GET", "/api/nodes", b"");
    assert!(same_through::<api::NodeList>(&body).nodes[0].online);
    let (_, body) = call("GET", "/api/nodes/n1", b"");
    same_through::<api::NodeInfo>(&body);
    let (status, body) =
        call("POST", "/api/builds", b"name: one\nsteps: [{sh: echo 1}, {sh: exit 2}, {sh: echo 3}]\n");
    assert_eq!(status, 201);
    let id = same_through::<api::Submitted>(&body).id;
    let (_, body) = call("GET", &format!("/api/builds/{id}?wait=30"), b"");
    let info: api::BuildInfo = same_through(&body);
    let states: Vec<_> = info.steps.iter().map(|s| s.state).collect();
    assert_eq!(states, [api::StepState::Success, api::StepState::Failure, api::StepState::Skipped]);
    assert_eq!(info.build.state, api::BuildState::Failure);
    let (_, body) = call("POST", "/api/builds?wait=0", b"name: two\nsteps: [{sh: sleep 30}]\n");
    let running: api::BuildInfo = same_through(&body);
    let (_, body) = call("GET", "/api/builds", b"");
    let list: api::BuildList = same_through(&body);
    assert_eq!(list.builds.len(), 2);
    let (_, body) = call("POST", &format!("/api/builds/{}/cancel", running.build.id), b"");
    same_through::<api::Cancelled>(&body);
    let (status, body) = call("GET", "/api/builds/99", b"");
    assert_eq!(status, 404);
    same_through::<api::ErrorBody>(&body);
    let (_, body) = call("DELETE", "/api/nodes/n1", b"");
    assert_eq!(same_through::<api::NodeRemoved>(&body).removed, "n1");
    let (_, body) = call("POST", "/api/token/rotate", b"");
    same_through::<api::TokenRotated>(&body);
}

/// `wisp cloud apply` loads clouds from a file without a restart; `wisp clouds` and
/// `wisp templates` list them; a bad file is refused with its line and column and changes
/// nothing already loaded; the clouds are kept across a restart.
#[test]
fn cloud_apply_lists_and_refuses_a_bad_file_keeping_what_was_loaded() {
    let mut c = Controller::start_on_fixed_ports(&[]);
    let f = c.data.path().join("cloud.yaml");
    let apply = |text: &str| {
        std::fs::write(&f, text).unwrap();
        c.wisp(&["cloud", "apply", f.to_str().unwrap()])
    };
    let good = "clouds:\n  - podman:\n      name: edge\n      containerCap: 4\n      templates:\n        - {name: base}\n        - name: maven\n          label: \"maven java\"\n          inheritFrom: base nosuch\n          instanceCap: 2\n          idleMinutes: 5\n          podRetention: onFailure\n";
    let out = apply(good);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "cloud 'edge' applied\n");
    assert!(text(&out.stderr).contains("nosuch"), "an unknown parent is warned about: {}", text(&out.stderr));
    let clouds = text(&c.wisp(&["clouds"]).stdout);
    assert!(clouds.starts_with("edge\tpodman\tpods 0\tcap 4\ttemplates 2\t"), "{clouds}");
    let templates = text(&c.wisp(&["templates"]).stdout);
    assert!(
        templates.contains("edge\tmaven\tmaven java\tpods 0\tcap 2\tidle 5m\tonFailure\tok"),
        "{templates}"
    );
    // A typo on line 6: refused with its place, and the loaded cloud stays as it was.
    let bad = good.replace("          instanceCap: 2", "          instanceCapp: 2");
    let out = apply(&bad);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(err.contains("cloud.yaml: line 10, column 11"), "{err}");
    assert!(err.contains("instanceCapp") && err.contains("instanceCap"), "{err}");
    let out = apply("clouds: [{podman: {name: edge, templates: [{name: Bad_Name}]}}]\n");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&c.wisp(&["templates"]).stdout), templates, "nothing already loaded is lost");
    c.restart();
    assert_eq!(text(&c.wisp(&["templates"]).stdout), templates, "kept across a restart");
    let out = c.wisp(&["cloud", "rm", "edge"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&c.wisp(&["clouds"]).stdout), "");
}

/// Runs `script` in `shell` (`-c`) and returns its stdout, failing with its stderr.
fn shell_out(shell: &str, script: &str) -> String {
    let out = Command::new(shell).arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// `scripts/completions.py` makes bash and zsh completions from the binaries' own `--help`: each
/// command, subcommand and option is offered where it belongs, and a file name after an option
/// that takes a value. zsh's completion system is stood in for by two functions that print what
/// `_describe` and `_arguments` were given (driving a real zsh line editor needs a terminal).
#[test]
fn shell_completions_follow_the_argument_definitions() {
    let gen = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/completions.py");
    let dir = TempDir::new("completions");
    let bash_file = dir.path().join("wisp.bash");
    let out = Command::new("python3").args([gen, "bash", WISP, AGENT]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(&bash_file, &out.stdout).unwrap();
    std::fs::write(dir.path().join("wisp-data"), "").unwrap();
    let complete = |words: &str| {
        let script = format!(
            "cd {dir} && source {file} && COMP_WORDS=({words}) && COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)) \
             && f=_${{COMP_WORDS[0]//-/_}} && $f && echo \"${{COMPREPLY[*]}}\"",
            dir = dir.path().display(),
            file = bash_file.display()
        );
        shell_out("bash", &script).trim().to_string()
    };
    assert_eq!(complete("wisp no"), "node nodes");
    assert_eq!(complete("wisp node ''"), "add secret rm");
    assert_eq!(complete("wisp node add --la"), "--labels");
    assert_eq!(complete("wisp log --fo"), "--follow");
    assert_eq!(complete("wisp run --data wisp-d"), "wisp-data", "a file after an option with a value");
    assert_eq!(complete("wisp serve --no-t"), "--no-tls");
    assert_eq!(complete("wisp-agent --webs"), "--websocket");
    assert_eq!(complete("wisp token ''"), "rotate");

    let out = Command::new("python3").args([gen, "zsh", WISP]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let zsh_file = dir.path().join("_wisp");
    std::fs::write(&zsh_file, &out.stdout).unwrap();
    assert!(text(&out.stdout).starts_with("#compdef wisp\n"));
    let offer = |words: &str| {
        let script = format!(
            "_describe() {{ print -l -- ${{(P)2}} }}; _arguments() {{ print -l -- \"$@\" }}; \
             words=({words}); CURRENT=${{#words}}; source {}",
            zsh_file.display()
        );
        shell_out("zsh", &format!("emulate zsh; {script}"))
    };
    let node = offer("wisp node ''");
    assert!(node.contains("add:add a node and print its secret"), "{node}");
    assert!(node.contains("rm:remove a node"), "{node}");
    let log = offer("wisp log ''");
    assert!(log.contains("-f[keep streaming until the build ends"), "{log}");
    assert!(log.contains("--data[the controller's data dir"), "{log}");
    assert!(log.contains(":value:_files"), "{log}");
}

// ---- the README against the binaries' own --help ----

/// README.md, whose sections these tests hold to the binaries' `--help`.
fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The text of the README section whose `###` heading is `heading`, up to the next `###` or `##`.
fn readme_section(readme: &str, heading: &str) -> String {
    let start = readme
        .lines()
        .position(|l| l == format!("### {heading}"))
        .unwrap_or_else(|| panic!("README.md has no section `### {heading}`"));
    let body: Vec<&str> = readme
        .lines()
        .skip(start + 1)
        .take_while(|l| !(l.starts_with("### ") || l.starts_with("## ")))
        .collect();
    body.join("\n")
}

/// The options a `--help` text lists, each as its long name and its short one if any
/// (`-f, --follow`), without `--help`.
fn help_options(help: &str) -> Vec<(String, Option<String>)> {
    let list = help.split("\nOptions:\n").nth(1).unwrap_or("");
    let list = list.split("\nCommands:\n").next().unwrap();
    let mut opts = Vec::new();
    for line in list.lines() {
        let Some(names) = line.strip_prefix("  ").filter(|l| l.starts_with('-')) else { continue };
        let names = names.split("  ").next().unwrap().trim();
        let mut short = None;
        let mut long = None;
        for n in names.split(", ") {
            if n.starts_with("--") {
                long = Some(n.to_string());
            } else if n.starts_with('-') {
                short = Some(n.to_string());
            }
        }
        let long = long.unwrap_or_else(|| panic!("an option without a long name in {line:?}"));
        if long != "--help" {
            opts.push((long, short));
        }
    }
    assert!(!opts.is_empty(), "no options found in:\n{help}");
    opts
}

/// The option names (`--word-word`) written in code spans or code blocks of `text`: what follows a
/// backtick or sits in a ``` block, up to a character that cannot be in an option's name.
fn mentioned_options(text: &str) -> std::collections::BTreeSet<String> {
    let mut found = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices("--") {
        let before = if i == 0 { b' ' } else { bytes[i - 1] };
        if !matches!(before, b'`' | b' ' | b'[' | b'(' | b'|' | b'\n') {
            continue;
        }
        let name: String = text[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        if !name.is_empty() && !name.ends_with('-') {
            found.insert(format!("--{name}"));
        }
    }
    found
}

/// Whether `text` names the option as a user would type it: `` `--opt`` in a code span, or `--opt`
/// in a code block or a usage line, followed by the end of its name.
fn names_option(text: &str, opt: &str) -> bool {
    text.match_indices(opt).any(|(i, _)| {
        let next = text[i + opt.len()..].chars().next().unwrap_or(' ');
        let prev = text[..i].chars().last().unwrap_or(' ');
        !(next.is_ascii_alphanumeric() || next == '-') && matches!(prev, '`' | ' ' | '[' | '(' | '|' | '\n')
    })
}

/// The description `--help` gives `opt`, its lines joined by single spaces.
fn help_entry(help: &str, opt: &str) -> Option<String> {
    let mut lines = help.lines().skip_while(|l| {
        let l = l.trim_start();
        !(l.starts_with(opt) && l[opt.len()..].chars().next().is_none_or(char::is_whitespace))
    });
    let first = lines.next()?.trim_start()[opt.len()..].to_string();
    let rest = lines.take_while(|l| l.starts_with("      "));
    Some(
        std::iter::once(first.as_str())
            .chain(rest)
            .flat_map(str::split_whitespace)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

#[test]
fn serve_help_and_the_readme_table_agree_on_options_and_defaults() {
    let help = text(&wisp_alone(&["serve", "--help"]).stdout);
    let section = readme_section(&readme(), "`wisp serve`");
    let opts = help_options(&help);
    for (long, _) in &opts {
        assert!(
            names_option(&section, long),
            "`wisp serve --help` has {long}; README's `wisp serve` section does not"
        );
    }
    // Every row of the table is an option the controller has, and its default is what --help says.
    let mut rows = 0;
    for row in section.lines().filter(|l| l.starts_with("| `--")) {
        rows += 1;
        let cells: Vec<&str> = row.split(" | ").collect();
        let opt = cells[0].trim_start_matches("| `").split([' ', '`']).next().unwrap();
        let entry = help_entry(&help, opt)
            .unwrap_or_else(|| panic!("README's `wisp serve` table has {opt}; `wisp serve --help` does not"));
        let readme_default = cells.get(1).map(|c| c.trim().trim_matches('`')).unwrap_or("");
        if let Some(d) = entry.split("(default ").nth(1) {
            let help_default = d.split([')', ';']).next().unwrap();
            if !help_default.starts_with(char::is_alphabetic) || help_default.starts_with("./") {
                assert_eq!(readme_default, help_default, "{opt}: README's default is not --help's ({entry})");
            }
        }
    }
    assert!(rows >= 15, "README's `wisp serve` table: only {rows} rows found");
}

#[test]
fn agent_help_and_the_readme_agree_on_options() {
    let help = text(&Command::new(AGENT).arg("--help").output().unwrap().stdout);
    let readme = readme();
    let sections = readme_section(&readme, "`wisp-agent`") + &readme_section(&readme, "Agents through Kafka");
    let opts = help_options(&help);
    for (long, _) in &opts {
        assert!(
            names_option(&sections, long),
            "`wisp-agent --help` has {long}; README's agent sections do not"
        );
    }
    // The usage block at the top of the section names only options the agent has.
    let usage =
        sections.split("```").nth(1).expect("README's `wisp-agent` section starts with a usage block");
    for opt in mentioned_options(usage) {
        assert!(
            opts.iter().any(|(l, _)| *l == opt),
            "README's agent usage names {opt}; `wisp-agent --help` has no such option"
        );
    }
}

/// The client command lines `wisp --help` leads to, each with its `--help` text: `["node", "add"]`.
fn client_commands() -> Vec<(Vec<String>, String)> {
    fn commands(help: &str) -> Vec<String> {
        let Some(list) = help.split("\nCommands:\n").nth(1) else { return Vec::new() };
        list.lines()
            .filter_map(|l| l.strip_prefix("  ").filter(|l| !l.starts_with(' ')))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect()
    }
    let mut out = Vec::new();
    let mut todo: Vec<Vec<String>> =
        commands(&text(&wisp_alone(&["--help"]).stdout)).into_iter().map(|c| vec![c]).collect();
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = text(&wisp_alone(&args).stdout);
        let subs = commands(&help);
        if subs.is_empty() {
            out.push((path, help));
        } else {
            todo.extend(subs.into_iter().map(|s| [path.clone(), vec![s]].concat()));
        }
    }
    out
}

#[test]
fn every_client_command_and_option_is_in_the_readme() {
    let readme = readme();
    let section = readme_section(&readme, "Client commands");
    // Options every client command shares; the section names each once.
    let shared = ["--url", "--token", "--data", "--instance-identity", "--cert", "--no-certificate-check"];
    for opt in shared {
        assert!(names_option(&section, opt), "README's Client commands do not name {opt}");
    }
    let commands = client_commands();
    assert!(commands.len() >= 15, "only {} client commands found", commands.len());
    for (path, help) in &commands {
        let line = format!("wisp {}", path.join(" "));
        if path[0] == "serve" {
            continue; // its own section, checked above
        }
        assert!(
            section.contains(&format!("`{line}")),
            "`{line}` is a command (`wisp --help`) that README's Client commands do not show"
        );
        for (long, short) in help_options(help) {
            if shared.contains(&long.as_str()) {
                continue;
            }
            let named =
                names_option(&section, &long) || short.as_deref().is_some_and(|s| names_option(&section, s));
            assert!(named, "`{line} --help` has {long}; README's Client commands do not");
        }
    }
}
