//! The podman cloud end to end, with real containers: a controller (TLS, as `wisp serve` runs by
//! default) starts agent pods from pod templates through the local podman (`podman kube play`);
//! the `jnlp` container is the FROM-scratch agent image and the build container an image made
//! here from busybox-static. Root only (podman runs rootful here, as in CI).

mod common;

use common::images::{agent_image, busybox_image, require_podman};
use common::{wait_for, Controller};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The pods podman has whose labels include `label=value`, by name.
fn pods_with(label: &str, value: &str) -> Vec<String> {
    let out = Command::new("podman")
        .args(["pod", "ps", "--filter", &format!("label={label}={value}"), "--format", "{{.Name}}"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
}

/// Pods made by the controller whose data dir is `c`'s.
fn pods_of(c: &Controller) -> Vec<String> {
    pods_with("wisp.dev/controller", &controller_id(c))
}

fn controller_id(c: &Controller) -> String {
    std::fs::read_to_string(c.data.path().join("controller-id")).unwrap().trim().to_string()
}

fn pod_exists(name: &str) -> bool {
    Command::new("podman").args(["pod", "exists", name]).status().unwrap().success()
}

/// Remove every pod of the controller (a test's clean-up, also when it fails).
struct Cleanup(String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in pods_with("wisp.dev/controller", &self.0) {
            let _ = Command::new("podman").args(["pod", "rm", "-f", "-t", "0", &p]).output();
        }
    }
}

/// A controller with the cloud file `cloud` applied, and the guard that removes its pods. Bind
/// them as `let (_clean, c)`: the controller, declared last, is dropped (killed) first, so it
/// cannot start a pod after the clean-up.
fn controller_with(cloud: &str) -> (Cleanup, Controller) {
    require_podman();
    agent_image();
    busybox_image();
    let c = Controller::start_tls(&[]);
    let cleanup = Cleanup(controller_id(&c));
    apply(&c, cloud);
    (cleanup, c)
}

fn apply(c: &Controller, cloud: &str) {
    let f = c.data.path().join("cloud.yaml");
    std::fs::write(&f, cloud).unwrap();
    let out = c.wisp(&["cloud", "apply", f.to_str().unwrap()]);
    assert!(out.status.success(), "cloud apply failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A podman cloud named `local` with `templates` (YAML list items, indented 8 spaces).
fn cloud(extra: &str, templates: &str) -> String {
    format!(
        "clouds:\n  - podman:\n      name: local\n      agentImage: {}\n{extra}      templates:\n{templates}",
        agent_image()
    )
}

/// A template with the agent and a busybox build container; steps run in `build` by default.
/// The agent's own container gets a shell too (busybox mounted at /bin/sh), so steps can run
/// in both.
fn template(name: &str, extra: &str) -> String {
    format!(
        r#"        - name: {name}
          label: {name}
          defaultContainer: build
          connectTimeout: 60
{extra}          containers:
            - name: build
              image: {busybox}
          yaml: |
            spec:
              containers:
                - name: jnlp
                  volumeMounts: [{{name: sh, mountPath: /bin/sh}}]
              volumes:
                - name: sh
                  hostPath: {{path: /bin/busybox, type: File}}
"#,
        busybox = busybox_image()
    )
}

fn build_message(c: &Controller, id: u64) -> String {
    let out = c.wisp(&["builds"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find(|l| l.starts_with(&format!("#{id}\t"))).unwrap_or("").to_string()
}

fn log(c: &Controller, id: u64) -> String {
    String::from_utf8_lossy(&c.wisp(&["log", &id.to_string()]).stdout).into_owned()
}

/// A build whose steps run in the build container and in the agent's own share the workspace;
/// the pod is deleted after it (retention `never`) and its node goes with it.
#[test]
fn a_build_runs_in_both_containers_of_its_pod_and_the_pod_goes_after() {
    let (_clean, c) = controller_with(&cloud("", &template("both", "")));
    let (code, out) = c.run(
        "name: both\nagent: {label: both}\nsteps:\n  - sh: echo from-jnlp > j.txt; echo \"jnlp sees $(cat /proc/1/cmdline | tr '\\0' ' ')\"\n    container: jnlp\n  - sh: echo \"build reads $(cat j.txt)\"; ls /bin/busybox\n",
    );
    assert_eq!(code, 0, "{out}\n{}", c.log_text());
    assert!(out.contains("jnlp sees /wisp-agent"), "{out}");
    assert!(out.contains("build reads from-jnlp"), "{out}");
    assert!(out.contains("/bin/busybox"), "{out}");
    wait_for("the pod to be deleted", Duration::from_secs(30), || pods_of(&c).is_empty().then_some(()));
    // The node goes once the controller's delete call returns (podman lists the pod as gone a
    // moment before that).
    wait_for("the pod's node to go", Duration::from_secs(10), || {
        let nodes = String::from_utf8_lossy(&c.wisp(&["nodes"]).stdout).into_owned();
        (!nodes.contains("both-")).then_some(())
    });
    // /metrics counted the pod (scraped over the controller's TLS with the CLI's own client).
    let remote = wisp::cli::client::Remote {
        url: None,
        token: None,
        data: Some(c.data.path().to_path_buf()),
        instance_identity: None,
        cert: None,
        no_certificate_check: false,
    };
    let client = wisp::cli::client::Client::new(&remote).unwrap();
    let mut scrape = Vec::new();
    smol::block_on(client.stream("/metrics", &mut scrape)).unwrap();
    let scrape = String::from_utf8(scrape).unwrap();
    assert!(scrape.contains("wisp_pods_started_total{cloud=\"local\"} 1"), "{scrape}");
    assert!(scrape.contains("wisp_pod_start_seconds_count 1"), "{scrape}");
}

/// Cancel of a step in the sibling container kills its whole process group there.
#[test]
fn cancel_of_a_step_in_the_build_container_kills_its_processes() {
    let (_clean, c) = controller_with(&cloud("", &template("cancel", "")));
    let id = c.submit(
        "name: cancel\nagent: {label: cancel}\nsteps:\n  - sh: sleep 4242 & sleep 4243; echo never\n",
    );
    let sleeping = || {
        let out = Command::new("pgrep").args(["-f", "^sleep 424[23]$"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    wait_for("the step's processes", Duration::from_secs(60), || (sleeping() == 2).then_some(()));
    let out = c.wisp(&["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.wait_build_state_tls(id, Duration::from_secs(30)), "aborted");
    wait_for("the step's processes to be gone", Duration::from_secs(10), || (sleeping() == 0).then_some(()));
}

/// `podRetention`: `never` deletes after a failed build, `onFailure` keeps a failed build's pod
/// (its node stays, taking no builds) and deletes a good one's, `always` keeps even a good one's.
#[test]
fn retention_never_on_failure_and_always() {
    let templates = [
        template("never", "          podRetention: never\n"),
        template("onfail", "          podRetention: onFailure\n"),
        template("always", "          podRetention: always\n"),
    ]
    .concat();
    let (_clean, c) = controller_with(&cloud("", &templates));
    let run = |label: &str, ok: bool| -> String {
        let script = if ok { "true" } else { "exit 3" };
        let id = c.submit(&format!(
            "name: r\nagent: {{label: {label}}}\nsteps:\n  - sh: echo node=$NODE_NAME; {script}\n"
        ));
        c.wait_build_state_tls(id, Duration::from_secs(90));
        let text = log(&c, id);
        text.lines().find_map(|l| l.strip_prefix("node=")).expect("the node's name in the log").to_string()
    };
    let never_bad = run("never", false);
    let onfail_bad = run("onfail", false);
    let onfail_good = run("onfail", true);
    let always_good = run("always", true);
    // Each pod's end is decided once its build is over: deleted, or logged as kept.
    for gone in [&never_bad, &onfail_good] {
        wait_for(&format!("pod {gone} to be deleted"), Duration::from_secs(30), || {
            (!pod_exists(gone)).then_some(())
        });
    }
    for kept in [&onfail_bad, &always_good] {
        wait_for(&format!("pod {kept} to be kept"), Duration::from_secs(30), || {
            c.log_text().contains(&format!("pod {kept} kept (podRetention)")).then_some(())
        });
        assert!(pod_exists(kept), "{kept} is kept");
    }
    // A kept pod's node stays but takes no more builds; removing the node deletes the pod.
    let nodes = String::from_utf8_lossy(&c.wisp(&["nodes"]).stdout).into_owned();
    assert!(nodes.contains(&onfail_bad), "{nodes}");
    let out = c.wisp(&["node", "rm", &always_good]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the kept pod to be deleted with its node", Duration::from_secs(30), || {
        (!pod_exists(&always_good)).then_some(())
    });
}

/// `idleMinutes` keeps a pod for the next matching build: two builds in a row, one pod.
#[test]
fn idle_minutes_reuse_the_pod_for_the_next_build() {
    let (_clean, c) = controller_with(&cloud("", &template("idle", "          idleMinutes: 1\n")));
    let node_of = |id: u64| {
        c.wait_build_state_tls(id, Duration::from_secs(90));
        log(&c, id).lines().find_map(|l| l.strip_prefix("node=").map(str::to_string)).unwrap()
    };
    let first = node_of(c.submit("name: i\nagent: {label: idle}\nsteps: [{sh: echo node=$NODE_NAME}]\n"));
    let second = node_of(c.submit("name: i\nagent: {label: idle}\nsteps: [{sh: echo node=$NODE_NAME}]\n"));
    assert_eq!(first, second, "the second build ran on the idle pod");
    assert_eq!(pods_of(&c), vec![first], "one pod, still there while idle");
}

/// 100 builds submitted at once against `instanceCap: 3`: a watcher checking continuously never
/// sees a fourth pod (in podman or among the controller's nodes), and all 100 complete.
#[test]
fn one_hundred_builds_against_a_cap_of_three_never_see_a_fourth_pod() {
    let (_clean, c) = controller_with(&cloud("", &template("cap", "          instanceCap: 3\n")));
    let id = controller_id(&c);
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, most) = (stop.clone(), most.clone());
        std::thread::spawn(move || {
            let mut looks = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let n = pods_with("wisp.dev/controller", &id).len();
                most.fetch_max(n, Ordering::SeqCst);
                looks += 1;
                // Each look is a `podman pod ps`; back to back they would hold a core of the two
                // the pods themselves need. The controller's log below catches any pod between.
                std::thread::sleep(Duration::from_millis(50));
            }
            looks
        })
    };
    let f = c.data.path().join("cap.yaml");
    std::fs::write(&f, "name: cap\nagent: {label: cap}\nsteps: [{sh: 'true'}]\n").unwrap();
    // Submitted from 10 threads at once.
    let ids: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..10)
            .map(|_| {
                s.spawn(|| {
                    (0..10)
                        .map(|_| {
                            let out = c.wisp(&["run", f.to_str().unwrap()]);
                            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                            String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(ids.len(), 100);
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut nodes_most = 0;
    for id in &ids {
        loop {
            let out = c.wisp(&["nodes"]);
            let n = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("cap-")).count();
            nodes_most = nodes_most.max(n);
            let state = c.build_state_now(*id);
            if matches!(state.as_str(), "success" | "failure" | "aborted") {
                assert_eq!(state, "success", "build {id}: {}", build_message(&c, *id));
                break;
            }
            assert!(Instant::now() < deadline, "build {id} did not finish: {}", build_message(&c, *id));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    stop.store(true, Ordering::SeqCst);
    let looks = watcher.join().unwrap();
    // Exact as well: a pod exists in podman only between the controller's create call (its log
    // line "starts pod X") and the return of its delete ("pod X deleted"); the most of those
    // intervals open at once, read from the controller's log in order, bounds how many pods
    // podman ever held (the poll above could miss a pod that lived briefly).
    let (mut live, mut live_most, mut created) = (std::collections::HashSet::new(), 0, 0);
    for line in c.log_text().lines() {
        if let Some(rest) = line.split(" starts pod ").nth(1) {
            live.insert(rest.split(' ').next().unwrap().to_string());
            created += 1;
        } else if let Some(rest) = line.split(": pod ").nth(1).filter(|r| r.ends_with(" deleted")) {
            live.remove(rest.trim_end_matches(" deleted"));
        }
        live_most = live_most.max(live.len());
    }
    assert!(looks > 5, "the poller looked only {looks} times");
    assert!(created >= 100, "a pod per build: {created} created");
    assert!(live_most <= 3, "podman's events show {live_most} pods at once");
    assert!(most.load(Ordering::SeqCst) <= 3, "podman had {} pods at once", most.load(Ordering::SeqCst));
    assert!(nodes_most <= 3, "the controller had {nodes_most} cloud nodes at once");
}

/// An image that cannot be pulled fails the build fast, with the reason; after three such
/// failures the template starts no more pods and says so.
#[test]
fn an_unpullable_image_fails_fast_with_the_reason_and_the_template_stops_after_three() {
    let t = "        - name: nopull\n          label: nopull\n          containers:\n            - {name: build, image: registry.invalid/nope:1}\n";
    let (_clean, c) = controller_with(&cloud("", t));
    let started = Instant::now();
    let mut messages = Vec::new();
    for _ in 0..4 {
        let id = c.submit("name: np\nagent: {label: nopull}\nsteps: [{sh: 'true'}]\n");
        assert_eq!(c.wait_build_state_tls(id, Duration::from_secs(120)), "failure");
        messages.push(build_message(&c, id));
    }
    for m in &messages[..3] {
        assert!(m.contains("registry.invalid/nope:1"), "the reason names the image: {m}");
    }
    assert!(messages[3].contains("starts no pods"), "the fourth is refused at once: {}", messages[3]);
    assert!(started.elapsed() < Duration::from_secs(120), "took {:?}", started.elapsed());
    assert!(pods_of(&c).is_empty(), "no pod is left: {:?}", pods_of(&c));
}

/// An agent that never connects (the pod cannot reach the controller) fails the build after
/// `connectTimeout`, with the agent container's last log lines.
#[test]
fn an_agent_that_never_connects_fails_the_build_after_the_connect_timeout() {
    let port = common::free_port();
    let (_clean, c) = controller_with(&cloud(
        &format!("      jenkinsUrl: https://127.0.0.1:{port}/\n"),
        &template("noconn", "").replace("connectTimeout: 60", "connectTimeout: 8"),
    ));
    let started = Instant::now();
    let id = c.submit("name: nc\nagent: {label: noconn}\nsteps: [{sh: 'true'}]\n");
    assert_eq!(c.wait_build_state_tls(id, Duration::from_secs(60)), "failure");
    let out = c.wisp(&["log", &id.to_string()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), build_message(&c, id));
    assert!(text.contains("did not connect within 8s"), "{text}");
    assert!(text.contains("last lines of the jnlp container's log"), "the agent's own words: {text}");
    assert!(started.elapsed() < Duration::from_secs(40), "took {:?}", started.elapsed());
    wait_for("the pod to be deleted", Duration::from_secs(30), || pods_of(&c).is_empty().then_some(()));
}

/// A pod removed with `podman pod rm -f` under a running build fails it at once (not after
/// the agent grace of 300 s), saying the pod was deleted.
#[test]
fn a_pod_removed_under_a_running_build_fails_it_at_once() {
    let (_clean, c) = controller_with(&cloud("", &template("rmpod", "")));
    let id = c.submit("name: rm\nagent: {label: rmpod}\nsteps: [{sh: 'echo started; sleep 600'}]\n");
    let pod = wait_for("the pod", Duration::from_secs(60), || pods_of(&c).into_iter().next());
    wait_for("the step to run", Duration::from_secs(60), || log(&c, id).contains("started").then_some(()));
    let removed = Instant::now();
    let out = Command::new("podman").args(["pod", "rm", "-f", "-t", "0", &pod]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.wait_build_state_tls(id, Duration::from_secs(60)), "failure");
    assert!(removed.elapsed() < Duration::from_secs(30), "took {:?}", removed.elapsed());
    let m = format!("{}{}", build_message(&c, id), log(&c, id));
    // podman kills the containers before it removes the pod: whichever end is seen first is the
    // reason given (the pod's deletion, the kill of the agent's or the build's container, or the
    // build container's step server going away under the step).
    let said = (m.contains(&format!("pod {pod}")) && m.contains("deleted"))
        || m.contains("container jnlp exited with code 137")
        || m.contains("container build exited with code 137")
        || m.contains("went away mid-step");
    assert!(said, "{m}");
}

/// A pod left by a controller killed while it started (its agent had not connected, so no node
/// of it was stored) is an orphan after the restart, and is deleted.
#[test]
fn an_orphan_pod_left_by_a_killed_controller_is_removed_after_restart() {
    let port = common::free_port();
    let (_clean, mut c) = controller_with(&cloud(
        &format!("      jenkinsUrl: https://127.0.0.1:{port}/\n"),
        &template("orphan", ""),
    ));
    let _id = c.submit("name: o\nagent: {label: orphan}\nsteps: [{sh: 'true'}]\n");
    let pod = wait_for("the pod", Duration::from_secs(60), || pods_of(&c).into_iter().next());
    // Killed once podman has started the pod: a `podman kube play` cut off by the kill could
    // leave podman's locks to a `pod rm` of the same pod (podman 4.3 was seen to hang so).
    wait_for("the pod to run", Duration::from_secs(60), || {
        let out = Command::new("podman")
            .args(["pod", "ps", "--filter", &format!("name=^{pod}$"), "--filter", "status=running", "-q"])
            .output()
            .unwrap();
        (!out.stdout.is_empty()).then_some(())
    });
    c.kill();
    assert!(pod_exists(&pod));
    c.launch();
    wait_for("the orphan to be deleted", Duration::from_secs(60), || (!pod_exists(&pod)).then_some(()));
}

/// A pipeline that carries its own pod template (inheriting a cloud's template and naming its
/// default container) gets a pod made from it, used by no other build.
#[test]
fn a_pipeline_with_an_inline_template_gets_its_own_pod() {
    let (_clean, c) = controller_with(&cloud("", &template("base", "")));
    let (code, out) = c.run(
        "name: inline\nagent:\n  kubernetes:\n    inheritFrom: base\n    defaultContainer: build\n    envVars: [{key: FROM_INLINE, value: yes}]\nsteps:\n  - sh: echo \"node $NODE_NAME inline=$FROM_INLINE\"; ls /bin/busybox\n",
    );
    assert_eq!(code, 0, "{out}\n{}", c.log_text());
    assert!(out.contains("inline=yes"), "the inline template's env: {out}");
    assert!(out.contains("/bin/busybox"), "ran in the build container: {out}");
    let node =
        out.lines().find_map(|l| l.strip_prefix("node ")).unwrap().split(' ').next().unwrap().to_string();
    assert!(node.starts_with("build-1-"), "named after the build: {node}");
}

/// A container of the pod that exits fails the build with that container's exit, not a hang.
#[test]
fn a_container_that_exits_fails_the_build_with_its_exit_code() {
    let t = format!(
        "        - name: exits\n          label: exits\n          defaultContainer: build\n          containers:\n            - {{name: build, image: {}, command: [sh, -c, 'exit 7']}}\n",
        busybox_image()
    );
    let (_clean, c) = controller_with(&cloud("", &t));
    let started = Instant::now();
    let id = c.submit("name: ex\nagent: {label: exits}\nsteps: [{sh: 'sleep 5; echo done'}]\n");
    assert_eq!(c.wait_build_state_tls(id, Duration::from_secs(60)), "failure");
    assert!(started.elapsed() < Duration::from_secs(40), "took {:?}", started.elapsed());
    let m = format!("{}{}", build_message(&c, id), log(&c, id));
    assert!(m.contains("container build exited with code 7"), "{m}");
}
