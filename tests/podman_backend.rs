//! The podman backend against the real podman: hand-built Pod manifests run as real containers
//! (images built locally, see common/images.rs). Every pod a test makes is named after the test
//! run and removed when the test ends, also when it fails. Needs root (scripts/test.sh runs it so).

mod common;

use common::images::{agent_image, busybox_image, require_podman};
use common::{wait_for, TempDir};
use k8s_openapi::api::core::v1::Pod;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use wisp::controller::cloud::backend::{ContainerState, Phase, PodBackend, PodEvent, PodInfo, Selector};
use wisp::controller::cloud::podman::Podman;

/// The label every pod of one test carries.
const RUN_LABEL: &str = "wisp.test/run";

/// One test's pods: names start with its prefix, all carry `RUN_LABEL=prefix`; removed on drop.
struct Run {
    prefix: String,
}

impl Run {
    fn new(tag: &str) -> Self {
        require_podman();
        let prefix = format!("wpt-{}-{tag}", std::process::id());
        let run = Self { prefix };
        run.clean();
        run
    }

    fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    fn selector(&self) -> Selector {
        [(RUN_LABEL.to_string(), self.prefix.clone())].into()
    }

    /// A Pod: `name`, this run's label plus `labels`, and `spec` (YAML under `spec:`, indented
    /// by two spaces).
    fn pod(&self, what: &str, labels: &[(&str, &str)], spec: &str) -> Pod {
        let mut yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  labels:\n    {RUN_LABEL}: {}\n",
            self.name(what),
            self.prefix
        );
        for (k, v) in labels {
            yaml.push_str(&format!("    {k}: {v}\n"));
        }
        yaml.push_str("spec:\n");
        yaml.push_str(&spec.replace("BUSYBOX", busybox_image()));
        serde_yaml_ng::from_str(&yaml).unwrap_or_else(|e| panic!("bad test manifest: {e}\n{yaml}"))
    }

    /// Remove every pod of this run (by name prefix and by label).
    fn clean(&self) {
        let out = Command::new("podman")
            .args(["pod", "ps", "--format", "{{.Name}} {{.Labels}}"])
            .output()
            .expect("podman pod ps");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(' ').next().unwrap_or("");
            if name.starts_with(&format!("{}-", self.prefix)) || line.contains(&self.prefix) {
                let _ = Command::new("podman")
                    .args(["pod", "rm", "-f", "-t", "0", "--ignore", name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.clean();
    }
}

/// One backend for all tests of this file, on the podman service it starts (stopped when the
/// test process ends).
fn podman() -> &'static Podman {
    static PODMAN: std::sync::OnceLock<Podman> = std::sync::OnceLock::new();
    PODMAN.get_or_init(|| Podman::new(None, None, None))
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    smol::block_on(f)
}

/// A watch running on a thread of its own, its events in a channel; stopped on drop.
struct Watch {
    rx: mpsc::Receiver<PodEvent>,
    stop: Option<smol::channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    fn start(backend: &'static Podman, selector: Selector) -> Self {
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = smol::channel::bounded::<()>(1);
        let thread = std::thread::spawn(move || {
            smol::block_on(async move {
                let on = Box::new(move |e: PodEvent| {
                    let _ = tx.send(e);
                });
                let watch = backend.watch(&selector, on);
                smol::future::or(watch, async {
                    let _ = stopped.recv().await;
                })
                .await
            })
        });
        Self { rx, stop: Some(stop), thread: Some(thread) }
    }

    /// The next event, or a panic naming `what` after `limit`.
    fn next(&self, what: &str, limit: Duration) -> PodEvent {
        self.rx
            .recv_timeout(limit)
            .unwrap_or_else(|_| panic!("no watch event within {limit:?}: waiting for {what}"))
    }

    /// Skip events until one `f` accepts; panics after `limit`, listing what came instead.
    fn until<T>(&self, what: &str, limit: Duration, mut f: impl FnMut(&PodEvent) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => {
                    if let Some(v) = f(&e) {
                        return v;
                    }
                    seen.push(e);
                }
                Err(_) => panic!("timed out after {limit:?} waiting for {what}; events instead: {seen:#?}"),
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn changed<'a>(e: &'a PodEvent, name: &str) -> Option<&'a PodInfo> {
    match e {
        PodEvent::Changed(p) if p.name == name => Some(p),
        _ => None,
    }
}

fn state<'a>(p: &'a PodInfo, container: &str) -> &'a ContainerState {
    &p.containers
        .iter()
        .find(|(n, _)| n == container)
        .unwrap_or_else(|| panic!("no container {container} in {p:#?}"))
        .1
}

fn list(run: &Run, extra: &[(&str, &str)]) -> Vec<PodInfo> {
    let mut sel = run.selector();
    sel.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    block(podman().list(&sel)).expect("list")
}

/// An init container (root) and two containers that share an emptyDir: the writer runs as UID
/// 1000 (the agent image's user), the reader as root and prints what both wrote.
const SHARED: &str = r#"
  restartPolicy: Never
  initContainers:
  - name: init
    image: BUSYBOX
    command: ["/bin/sh", "-c", "echo init-ran > /ws/init.txt"]
    volumeMounts: [{name: workspace, mountPath: /ws}]
  containers:
  - name: writer
    image: BUSYBOX
    securityContext: {runAsUser: 1000, runAsGroup: 1000}
    command: ["/bin/sh", "-c", "echo hello-from-$(id -u) > /ws/f.txt; exec sleep 600"]
    volumeMounts: [{name: workspace, mountPath: /ws}]
  - name: reader
    image: BUSYBOX
    command: ["/bin/sh", "-c", "while [ ! -s /ws/f.txt ]; do sleep 0.1; done; cat /ws/init.txt /ws/f.txt; exec sleep 600"]
    volumeMounts: [{name: workspace, mountPath: /ws}]
  volumes:
  - name: workspace
    emptyDir: {}
"#;

#[test]
fn pod_with_init_container_and_shared_empty_dir_runs_and_the_watch_sees_it() {
    let run = Run::new("shared");
    let w = Watch::start(podman(), run.selector());
    match w.next("the first Listed", Duration::from_secs(30)) {
        PodEvent::Listed(pods) => assert!(pods.is_empty(), "{pods:#?}"),
        e => panic!("the watch began with {e:?}, not Listed"),
    }
    let name = run.name("a");
    block(podman().create(&run.pod("a", &[], SHARED))).expect("create");
    let p = w.until("the pod Running", Duration::from_secs(30), |e| {
        changed(e, &name).filter(|p| p.phase == Phase::Running).cloned()
    });
    let names: Vec<&str> = p.containers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["init", "writer", "reader"], "init containers first, then in manifest order");
    assert!(matches!(state(&p, "init"), ContainerState::Terminated { exit_code: 0, .. }), "{p:#?}");
    assert_eq!(state(&p, "writer"), &ContainerState::Running);
    assert_eq!(p.labels.get(RUN_LABEL), Some(&run.prefix));
    assert!(
        !p.labels.contains_key("io.buildah.version"),
        "the image's labels are not the pod's: {:?}",
        p.labels
    );

    // The reader (root) read what the init container (root) and the writer (UID 1000) wrote.
    let tail = wait_for("the reader's output", Duration::from_secs(20), || {
        let d = block(podman().diagnose(&name, "reader", 10));
        (d.log_tail.len() >= 2).then_some(d.log_tail)
    });
    assert_eq!(tail, ["init-ran", "hello-from-1000"]);
}

#[test]
fn pods_of_two_runs_do_not_share_an_empty_dir_of_the_same_name() {
    let run = Run::new("two");
    let spec = r#"
  restartPolicy: Never
  containers:
  - name: c
    image: BUSYBOX
    command: ["/bin/sh", "-c", "echo $(hostname) >> /ws/who; sleep 1; cat /ws/who; exec sleep 600"]
    volumeMounts: [{name: workspace, mountPath: /ws}]
  volumes:
  - name: workspace
    emptyDir: {}
"#;
    block(podman().create(&run.pod("x", &[], spec))).expect("create x");
    block(podman().create(&run.pod("y", &[], spec))).expect("create y");
    for who in ["x", "y"] {
        let tail = wait_for("the pod's output", Duration::from_secs(20), || {
            let d = block(podman().diagnose(&run.name(who), "c", 10));
            (!d.log_tail.is_empty()).then_some(d.log_tail)
        });
        assert_eq!(tail, [run.name(who)], "each pod sees only its own workspace");
    }
}

#[test]
fn list_selects_by_every_label_of_the_selector() {
    let run = Run::new("list");
    let spec = r#"
  restartPolicy: Never
  containers:
  - name: c
    image: BUSYBOX
    command: ["/bin/sh", "-c", "exec sleep 600"]
"#;
    block(podman().create(&run.pod("a", &[("role", "a")], spec))).expect("create a");
    block(podman().create(&run.pod("b", &[("role", "b")], spec))).expect("create b");
    let a: Vec<String> = list(&run, &[("role", "a")]).into_iter().map(|p| p.name).collect();
    assert_eq!(a, [run.name("a")]);
    let mut all: Vec<String> = list(&run, &[]).into_iter().map(|p| p.name).collect();
    all.sort();
    assert_eq!(all, [run.name("a"), run.name("b")]);
    assert!(list(&run, &[("role", "c")]).is_empty());
}

#[test]
fn a_container_that_exits_3_is_terminated_with_3_and_the_pod_failed() {
    let run = Run::new("exit");
    let spec = r#"
  restartPolicy: Never
  containers:
  - name: jnlp
    image: BUSYBOX
    command: ["/bin/sh", "-c", "for i in 1 2 3 4 5 6 7 8; do echo line $i; done; echo oops >&2; exit 3"]
"#;
    let w = Watch::start(podman(), run.selector());
    assert!(matches!(w.next("Listed", Duration::from_secs(30)), PodEvent::Listed(_)));
    let name = run.name("e");
    block(podman().create(&run.pod("e", &[], spec))).expect("create");
    let p = w.until("the pod Failed", Duration::from_secs(30), |e| {
        changed(e, &name).filter(|p| p.phase == Phase::Failed).cloned()
    });
    match state(&p, "jnlp") {
        ContainerState::Terminated { exit_code: 3, reason, .. } => assert_eq!(reason, "Error"),
        s => panic!("jnlp is {s:?}"),
    }
    let listed = list(&run, &[]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].phase, Phase::Failed);

    let d = block(podman().diagnose(&name, "jnlp", 3));
    assert_eq!(d.log_tail, ["line 7", "line 8", "oops"], "stdout and stderr in time order");
    assert!(
        d.events.iter().any(|e| e.contains(&format!("{name}-jnlp died (exit code 3)"))),
        "{:#?}",
        d.events
    );
    assert!(d.events.iter().any(|e| e.contains(&format!("pod {name} create"))), "{:#?}", d.events);
}

#[test]
fn a_pod_removed_from_outside_is_reported_deleted_promptly() {
    let run = Run::new("rm");
    let spec = r#"
  restartPolicy: Never
  containers:
  - name: c
    image: BUSYBOX
    command: ["/bin/sh", "-c", "exec sleep 600"]
"#;
    let w = Watch::start(podman(), run.selector());
    assert!(matches!(w.next("Listed", Duration::from_secs(30)), PodEvent::Listed(_)));
    let name = run.name("r");
    block(podman().create(&run.pod("r", &[("role", "x")], spec))).expect("create");
    w.until("the pod Running", Duration::from_secs(30), |e| {
        changed(e, &name).filter(|p| p.phase == Phase::Running).map(|_| ())
    });
    let out = Command::new("podman").args(["pod", "rm", "-f", "-t", "0", &name]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let removed = Instant::now();
    let labels = w.until("Deleted", Duration::from_secs(10), |e| match e {
        PodEvent::Deleted { name: n, labels } if *n == name => Some(labels.clone()),
        _ => None,
    });
    assert!(
        removed.elapsed() < Duration::from_secs(3),
        "Deleted came {:?} after the pod was removed",
        removed.elapsed()
    );
    assert_eq!(labels.get("role").map(String::as_str), Some("x"));
}

#[test]
fn an_image_that_cannot_be_pulled_fails_create_fast_with_a_sentence() {
    let run = Run::new("pull");
    let spec = r#"
  restartPolicy: Never
  containers:
  - name: ok
    image: BUSYBOX
    command: ["/bin/sh", "-c", "exec sleep 600"]
  - name: jnlp
    image: registry.invalid/nope:1
"#;
    let started = Instant::now();
    let e = block(podman().create(&run.pod("p", &[], spec))).expect_err("create must fail");
    eprintln!("create failed, as it must: {e}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert!(e.contains("cannot pull image registry.invalid/nope:1"), "{e}");
    assert!(e.contains("registry.invalid"), "{e}");
    assert!(!e.contains('{') && !e.contains('\n'), "one readable line, not JSON: {e}");
    assert!(list(&run, &[]).is_empty(), "the half-made pod is removed");
}

#[test]
fn a_failing_init_container_fails_create_naming_it_and_its_log() {
    let run = Run::new("init");
    let spec = r#"
  restartPolicy: Never
  initContainers:
  - name: prepare
    image: BUSYBOX
    command: ["/bin/sh", "-c", "echo no-space-left; exit 1"]
  containers:
  - name: c
    image: BUSYBOX
    command: ["/bin/sh", "-c", "exec sleep 600"]
"#;
    let e = block(podman().create(&run.pod("i", &[], spec))).expect_err("create must fail");
    eprintln!("create failed, as it must: {e}");
    assert!(e.contains(&format!("{}-prepare", run.name("i"))), "{e}");
    assert!(e.contains("code 1") && e.contains("no-space-left"), "{e}");
    assert!(list(&run, &[]).is_empty(), "the pod is removed");
}

#[test]
fn delete_removes_a_pod_and_a_pod_already_gone_is_ok() {
    let run = Run::new("del");
    let spec = r#"
  restartPolicy: Never
  containers:
  - name: c
    image: BUSYBOX
    command: ["/bin/sh", "-c", "exec sleep 600"]
"#;
    let name = run.name("d");
    block(podman().create(&run.pod("d", &[], spec))).expect("create");
    assert_eq!(list(&run, &[]).len(), 1);
    let started = Instant::now();
    block(podman().delete(&name)).expect("delete");
    // A stop with a grace would wait podman's 10 s before the KILL (`sleep` as PID 1 ignores
    // TERM); what stays under that was killed at once, however busy the machine is.
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "delete waited {:?} (no grace wanted)",
        started.elapsed()
    );
    assert!(list(&run, &[]).is_empty());
    block(podman().delete(&name)).expect("delete of a pod already gone");
    assert!(block(podman().delete("--all")).is_err(), "not a pod name");
}

/// podman's service killed under a watch: the backend starts it again, and the watch lists
/// again and goes on with a new event stream.
#[test]
fn the_watch_lists_again_after_podmans_service_dies() {
    let run = Run::new("events");
    let dir = TempDir::new("podman-wrapper");
    let pids = dir.path().join("service.pids");
    // The backend's program: podman itself, noting the pid of each service it becomes.
    let wrapper = dir.path().join("podman");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\n[ \"$1\" = system ] && echo $$ >> '{}'\nexec podman \"$@\"\n", pids.display()),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&wrapper).status().unwrap();
    let spec = r#"
  restartPolicy: Never
  containers:
  - name: c
    image: BUSYBOX
    command: ["/bin/sh", "-c", "exec sleep 600"]
"#;
    let name = run.name("w");
    block(podman().create(&run.pod("w", &[], spec))).expect("create");
    let backend: &'static Podman =
        Box::leak(Box::new(Podman::new(Some(wrapper.display().to_string()), None, None)));
    let w = Watch::start(backend, run.selector());
    match w.next("the first Listed", Duration::from_secs(30)) {
        PodEvent::Listed(p) => {
            assert_eq!(p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), [name.as_str()])
        }
        e => panic!("{e:?}"),
    }
    let pid = std::fs::read_to_string(&pids).unwrap().trim().to_string();
    assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    let again = w.until("a new Listed", Duration::from_secs(30), |e| match e {
        PodEvent::Listed(p) => Some(p.clone()),
        _ => None,
    });
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].phase, Phase::Running);
    // The new stream works: a removal is seen.
    block(podman().delete(&name)).expect("delete");
    w.until("Deleted after the restart", Duration::from_secs(10), |e| {
        matches!(e, PodEvent::Deleted { name: n, .. } if *n == name).then_some(())
    });
    let lines = std::fs::read_to_string(&pids).unwrap();
    assert_eq!(lines.lines().count(), 2, "podman's service started once more: {lines}");
}

#[test]
fn agent_image_builds_and_runs_as_uid_1000() {
    require_podman();
    let image = agent_image();
    let out = Command::new("podman").args(["run", "--rm", image, "--help"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Usage"), "{text}");
    let user = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Config.User}}", image])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "1000:1000");
}

#[test]
fn a_container_whose_command_is_missing_fails_create_naming_it() {
    let run = Run::new("exec");
    let spec = r#"
  restartPolicy: Never
  containers:
  - name: jnlp
    image: BUSYBOX
    command: ["/no/such/agent"]
"#;
    let e = block(podman().create(&run.pod("x", &[], spec))).expect_err("create must fail");
    eprintln!("create failed, as it must: {e}");
    assert!(e.contains(&format!("{}-jnlp", run.name("x"))), "{e}");
    assert!(e.contains("/no/such/agent"), "{e}");
    assert!(list(&run, &[]).is_empty(), "the pod is removed");
}
