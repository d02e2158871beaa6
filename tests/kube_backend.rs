//! The Kubernetes backend of pod clouds (`controller::cloud::kubernetes`) against kmock, an
//! independent in-memory Kubernetes API emulator from PyPI, used because no real API server can
//! be installed on the machines these tests run on. kmock has no kubelet: where a pod should have
//! a status (running, evicted, an image that cannot be pulled), the test sets it through kmock's
//! own HTTP API, as a kubelet would report it, and checks what the backend makes of it.

mod common;
use common::kmock::Kmock;
use common::TempDir;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wisp::controller::cloud::backend::{ContainerState, Phase, PodBackend, PodEvent, PodInfo, Selector};
use wisp::controller::cloud::kubernetes::{ConnectSpec, Kubernetes};

const NS: &str = "wisp-test";

fn selector(pairs: &[(&str, &str)]) -> Selector {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    let labels: serde_json::Map<String, serde_json::Value> =
        labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": labels },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{ "name": "jnlp", "image": "wisp-agent:dev",
                             "env": [{ "name": "JENKINS_AGENT_NAME", "value": name }] }]
        }
    }))
    .unwrap()
}

fn pod_json(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": NS, "labels": labels },
        "spec": { "containers": [{ "name": "jnlp", "image": "wisp-agent:dev" }] }
    })
}

/// A container status as a kubelet reports it.
fn status_of(name: &str, state: serde_json::Value) -> serde_json::Value {
    json!({ "name": name, "image": "wisp-agent:dev", "imageID": "", "ready": false,
            "restartCount": 0, "state": state })
}

/// A kubeconfig whose context points at `server` with namespace `ns`.
fn kubeconfig(dir: &TempDir, server: &str, ns: &str) -> std::path::PathBuf {
    let path = dir.path().join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: other\n\
         clusters:\n- name: kmock\n  cluster:\n    server: {server}\n\
         - name: nowhere\n  cluster:\n    server: http://127.0.0.1:9\n\
         users:\n- name: tester\n  user:\n    token: from-kubeconfig\n\
         contexts:\n- name: test\n  context:\n    cluster: kmock\n    user: tester\n    namespace: {ns}\n\
         - name: other\n  context:\n    cluster: nowhere\n    user: tester\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn connect(spec: &ConnectSpec) -> Kubernetes {
    smol::block_on(Kubernetes::connect(spec)).unwrap()
}

fn by_url(k: &Kmock) -> ConnectSpec {
    ConnectSpec {
        server_url: Some(k.url()),
        token: Some("s3cret".into()),
        namespace: Some(NS.into()),
        ..ConnectSpec::default()
    }
}

/// A query string as kmock recorded it, percent-decoded.
fn decoded(query: &serde_json::Value) -> String {
    percent_encoding::percent_decode_str(query.as_str().unwrap()).decode_utf8_lossy().into_owned()
}

fn names(pods: &[PodInfo]) -> Vec<&str> {
    pods.iter().map(|p| p.name.as_str()).collect()
}

#[test]
fn kubeconfig_context_gives_server_and_namespace_and_pods_are_managed_by_label() {
    let k = Kmock::start();
    let dir = TempDir::new("kubeconfig");
    let path = kubeconfig(&dir, &k.url(), NS);
    let b = connect(&ConnectSpec {
        kubeconfig: Some(path),
        context: Some("test".into()),
        ..ConnectSpec::default()
    });
    assert_eq!(b.namespace(), NS, "the context's namespace");
    let mine = [("jenkins", "slave"), ("wisp/cloud", "kube")];
    smol::block_on(async {
        b.create(&pod("agent-1", &mine)).await.unwrap();
        b.create(&pod("other-1", &[("jenkins", "slave"), ("wisp/cloud", "elsewhere")])).await.unwrap();
        let listed = b.list(&selector(&mine)).await.unwrap();
        assert_eq!(names(&listed), ["agent-1"], "a pod with other labels is not listed");
        assert_eq!(listed[0].labels, selector(&mine));
        assert_eq!(listed[0].phase, Phase::Pending, "a pod without a status yet is pending");
        // Stored in the context's namespace, with the manifest as given.
        let stored = k.pod(NS, "agent-1").expect("agent-1 is stored in the namespace");
        assert_eq!(stored["spec"]["containers"][0]["env"][0]["value"], "agent-1");

        // The server is asked with the selector (a real API server filters by it).
        let asked = k.requests();
        let list = asked
            .iter()
            .find(|r| r["method"] == "GET" && r["path"] == format!("/api/v1/namespaces/{NS}/pods"))
            .expect("a list request");
        let query = decoded(&list["query"]);
        assert!(query.contains("labelSelector=jenkins=slave,wisp/cloud=kube"), "{query}");
        assert_eq!(list["authorization"], "Bearer from-kubeconfig", "the kubeconfig user's token");

        let again = b.create(&pod("agent-1", &mine)).await.unwrap_err();
        assert!(
            again.contains("creating pod agent-1")
                && again.contains("409")
                && again.contains("exists already"),
            "{again}"
        );

        b.delete("agent-1").await.unwrap();
        assert!(k.pod(NS, "agent-1").is_none(), "deleted");
        b.delete("agent-1").await.expect("a pod already gone is not an error");
        assert!(b.list(&selector(&mine)).await.unwrap().is_empty());
        assert_eq!(names(&b.list(&selector(&[("jenkins", "slave")])).await.unwrap()), ["other-1"]);
    });
    let delete = k.requests().into_iter().find(|r| r["method"] == "DELETE").expect("a delete request");
    assert_eq!(delete["path"], format!("/api/v1/namespaces/{NS}/pods/agent-1"));
}

#[test]
fn url_and_token_connect_without_a_kubeconfig_and_a_token_file_is_read() {
    let k = Kmock::start();
    let b = connect(&by_url(&k));
    assert_eq!(b.namespace(), NS);
    smol::block_on(b.create(&pod("agent-2", &[("a", "b")]))).unwrap();
    let sent = k.requests().into_iter().find(|r| r["method"] == "POST").unwrap();
    assert_eq!(sent["authorization"], "Bearer s3cret");
    assert_eq!(sent["path"], format!("/api/v1/namespaces/{NS}/pods"));

    let dir = TempDir::new("token");
    let file = dir.path().join("token");
    std::fs::write(&file, "from-file\n").unwrap();
    let b =
        connect(&ConnectSpec { token: Some(format!("@{}", file.display())), namespace: None, ..by_url(&k) });
    assert_eq!(b.namespace(), "default", "no namespace given and no kubeconfig: default");
    assert!(smol::block_on(b.list(&selector(&[("a", "b")]))).unwrap().is_empty(), "agent-2 is in {NS}");
    let last =
        k.requests().into_iter().rev().find(|r| r["path"] == "/api/v1/namespaces/default/pods").unwrap();
    assert_eq!(last["authorization"], "Bearer from-file", "the file's token, without its newline");

    // A file that holds the token alone goes to kube as a token file (which kube re-reads about
    // once a minute, as service account tokens rotate; too slow to show here).
    std::fs::write(&file, "first").unwrap();
    let b =
        connect(&ConnectSpec { token: Some(format!("@{}", file.display())), namespace: None, ..by_url(&k) });
    smol::block_on(b.list(&selector(&[("a", "b")]))).unwrap();
    let last =
        k.requests().into_iter().rev().find(|r| r["path"] == "/api/v1/namespaces/default/pods").unwrap();
    assert_eq!(last["authorization"], "Bearer first");

    let missing = smol::block_on(Kubernetes::connect(&ConnectSpec {
        token: Some("@/nonexistent/token".into()),
        ..by_url(&k)
    }))
    .err()
    .unwrap();
    assert!(missing.contains("credentialsToken file /nonexistent/token"), "{missing}");
}

#[test]
fn list_maps_phase_reason_and_container_states() {
    let k = Kmock::start();
    let b = connect(&by_url(&k));
    let mine = [("wisp", "t")];
    smol::block_on(async {
        for name in ["running", "evicted", "nopull", "ended"] {
            b.create(&pod(name, &mine)).await.unwrap();
        }
    });
    k.set_status(
        NS,
        "running",
        json!({ "phase": "Running", "containerStatuses": [status_of("jnlp", json!({ "running": { "startedAt": "2026-01-01T00:00:00Z" } }))] }),
    );
    k.set_status(
        NS,
        "evicted",
        json!({ "phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory." }),
    );
    k.set_status(
        NS,
        "nopull",
        json!({
            "phase": "Pending",
            "initContainerStatuses": [status_of("setup", json!({ "terminated": { "exitCode": 0, "reason": "Completed" } }))],
            "containerStatuses": [status_of("jnlp", json!({ "waiting": { "reason": "ErrImagePull", "message": "pull access denied for wisp-agent" } }))]
        }),
    );
    k.set_status(
        NS,
        "ended",
        json!({ "phase": "Failed", "containerStatuses": [status_of("jnlp", json!({ "terminated": { "exitCode": 137, "reason": "OOMKilled" } }))] }),
    );
    let mut pods = smol::block_on(b.list(&selector(&mine))).unwrap();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    let by = |n: &str| pods.iter().find(|p| p.name == n).unwrap().clone();
    assert_eq!(by("running").phase, Phase::Running);
    assert_eq!(by("running").containers, [("jnlp".to_string(), ContainerState::Running)]);
    let ev = by("evicted");
    assert_eq!((ev.phase, ev.reason.as_str()), (Phase::Failed, "Evicted"));
    assert_eq!(ev.message, "The node was low on resource: memory.");
    assert_eq!(
        by("nopull").containers,
        [
            (
                "setup".to_string(),
                ContainerState::Terminated {
                    exit_code: 0,
                    reason: "Completed".into(),
                    message: String::new()
                }
            ),
            (
                "jnlp".to_string(),
                ContainerState::Waiting {
                    reason: "ErrImagePull".into(),
                    message: "pull access denied for wisp-agent".into()
                }
            ),
        ],
        "init containers first"
    );
    assert_eq!(
        by("ended").containers[0].1,
        ContainerState::Terminated { exit_code: 137, reason: "OOMKilled".into(), message: String::new() }
    );
}

/// Runs `b.watch(selector)` on a thread of its own until the returned sender is dropped.
fn watch(b: &Arc<Kubernetes>, sel: Selector) -> (mpsc::Receiver<PodEvent>, smol::channel::Sender<()>) {
    let (tx, rx) = mpsc::channel();
    let (stop, stopped) = smol::channel::bounded::<()>(1);
    let b = b.clone();
    std::thread::spawn(move || {
        smol::block_on(smol::future::or(
            b.watch(
                &sel,
                Box::new(move |e| {
                    let _ = tx.send(e);
                }),
            ),
            async {
                let _ = stopped.recv().await;
            },
        ))
    });
    (rx, stop)
}

/// The next event that `want` accepts, skipping others (a watch may repeat a pod's state).
fn next_event(
    rx: &mpsc::Receiver<PodEvent>,
    what: &str,
    mut want: impl FnMut(&PodEvent) -> bool,
) -> PodEvent {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) if want(&e) => return e,
            Ok(e) => seen.push(e),
            Err(_) => panic!("no {what} within 20 s; saw {seen:#?}"),
        }
    }
}

fn changed(name: &str, phase: Phase) -> impl FnMut(&PodEvent) -> bool + '_ {
    move |e| matches!(e, PodEvent::Changed(p) if p.name == name && p.phase == phase)
}

#[test]
fn watch_lists_then_reports_status_changes_and_deletions() {
    let k = Kmock::start();
    let b = Arc::new(connect(&by_url(&k)));
    k.create(NS, "pods", pod_json("before", json!({ "wisp": "w" })));
    k.create(NS, "pods", pod_json("stranger", json!({ "wisp": "other" })));
    let (rx, _stop) = watch(&b, selector(&[("wisp", "w")]));
    let PodEvent::Listed(first) = next_event(&rx, "the first list", |e| matches!(e, PodEvent::Listed(_)))
    else {
        unreachable!()
    };
    assert_eq!(names(&first), ["before"], "the pod with other labels is not in the list");

    k.set_status(
        NS,
        "before",
        json!({ "phase": "Running", "containerStatuses": [status_of("jnlp", json!({ "running": {} }))] }),
    );
    let PodEvent::Changed(p) = next_event(&rx, "before running", changed("before", Phase::Running)) else {
        unreachable!()
    };
    assert_eq!(p.containers, [("jnlp".to_string(), ContainerState::Running)]);

    smol::block_on(b.create(&pod("later", &[("wisp", "w")]))).unwrap();
    next_event(&rx, "later created", changed("later", Phase::Pending));
    k.set_status(
        NS,
        "later",
        json!({ "phase": "Pending", "containerStatuses": [status_of("jnlp", json!({ "waiting": { "reason": "ImagePullBackOff", "message": "Back-off pulling image" } }))] }),
    );
    next_event(&rx, "later's image pull back-off", |e| {
        matches!(e, PodEvent::Changed(p) if p.name == "later"
            && matches!(&p.containers[..], [(n, ContainerState::Waiting { reason, .. })] if n == "jnlp" && reason == "ImagePullBackOff"))
    });

    k.set_status(NS, "before", json!({ "phase": "Failed", "reason": "Evicted", "message": "low on memory" }));
    let PodEvent::Changed(p) = next_event(&rx, "before evicted", changed("before", Phase::Failed)) else {
        unreachable!()
    };
    assert_eq!(p.reason, "Evicted");

    k.set_status(NS, "stranger", json!({ "phase": "Running" }));
    k.delete_pod(NS, "stranger");
    k.delete_pod(NS, "before");
    // Nothing about the pod with other labels comes through, in any event: every event up to one
    // about a selected pod made after all of the stranger's changes is checked.
    let about = |e: &PodEvent| match e {
        PodEvent::Changed(p) => p.name.clone(),
        PodEvent::Deleted { name, .. } => name.clone(),
        PodEvent::Listed(l) => names(l).join(","),
    };
    let e = next_event(&rx, "before deleted", |e| {
        assert!(!about(e).contains("stranger"), "{e:?}");
        matches!(e, PodEvent::Deleted { .. })
    });
    assert_eq!(e, PodEvent::Deleted { name: "before".into(), labels: selector(&[("wisp", "w")]) });
    k.create(NS, "pods", pod_json("sentinel", json!({ "wisp": "w" })));
    next_event(&rx, "the pod made last", |e| {
        assert!(!about(e).contains("stranger"), "{e:?}");
        about(e) == "sentinel"
    });
}

#[test]
fn a_silent_watch_lists_again_and_a_watch_recovers_when_the_server_comes_back() {
    let mut k = Kmock::start();
    let port = k.port();
    let b = Arc::new(connect(&ConnectSpec { watch_silence: Duration::from_secs(1), ..by_url(&k) }));
    let (rx, _stop) = watch(&b, selector(&[("wisp", "s")]));
    let listed = |e: &PodEvent| matches!(e, PodEvent::Listed(_));
    next_event(&rx, "the first list", listed);
    let t = Instant::now();
    next_event(&rx, "a second list after a silence of 1 s", listed);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    k.stop();
    std::thread::sleep(Duration::from_millis(500));
    let k = Kmock::start_on(Some(port));
    k.create(NS, "pods", pod_json("after", json!({ "wisp": "s" })));
    let e =
        next_event(&rx, "a list from the new server", |e| matches!(e, PodEvent::Listed(l) if !l.is_empty()));
    let PodEvent::Listed(l) = e else { unreachable!() };
    assert_eq!(names(&l), ["after"]);
}

#[test]
fn diagnose_reads_the_pods_events_and_its_log_tail() {
    let k = Kmock::start();
    let b = connect(&by_url(&k));
    smol::block_on(b.create(&pod("sick", &[("wisp", "d")]))).unwrap();
    let event = |name: &str, pod: &str, reason: &str, message: &str, at: &str, count: u32| {
        json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": { "name": name, "namespace": NS },
            "involvedObject": { "kind": "Pod", "name": pod, "namespace": NS },
            "reason": reason, "message": message, "type": "Warning", "count": count,
            "firstTimestamp": at, "lastTimestamp": at
        })
    };
    k.create(
        NS,
        "events",
        event("e2", "sick", "BackOff", "Back-off pulling image \"x\"", "2026-01-01T00:00:05Z", 3),
    );
    k.create(
        NS,
        "events",
        event("e1", "sick", "Failed", "Failed to pull image \"x\"", "2026-01-01T00:00:01Z", 1),
    );
    k.create(
        NS,
        "events",
        event("e3", "healthy", "Pulled", "Successfully pulled", "2026-01-01T00:00:02Z", 1),
    );
    k.set_log(NS, "sick", "jnlp", "one\ntwo\nthree\nfour\n");
    let d = smol::block_on(b.diagnose("sick", "jnlp", 2));
    assert_eq!(
        d.events,
        ["Failed: Failed to pull image \"x\"", "BackOff: Back-off pulling image \"x\" (3 times)"],
        "oldest first, only this pod's"
    );
    assert_eq!(d.log_tail, ["three", "four"]);
    let asked = k.requests();
    let ev = asked
        .iter()
        .find(|r| r["method"] == "GET" && r["path"] == format!("/api/v1/namespaces/{NS}/events"))
        .unwrap();
    assert!(decoded(&ev["query"]).contains("fieldSelector=involvedObject.name=sick"), "{ev}");

    // Nothing known: empty, no error.
    let d = smol::block_on(b.diagnose("sick", "sidecar", 5));
    assert!(d.log_tail.is_empty(), "{d:?}");
    let d = smol::block_on(b.diagnose("unknown", "jnlp", 5));
    assert!(d.events.is_empty() && d.log_tail.is_empty(), "{d:?}");
}

/// Runs `f` and returns its result and how long it took.
fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let out = smol::block_on(f);
    (out, t.elapsed())
}

#[test]
fn errors_are_sentences_and_bounded_in_time() {
    // Not a URL.
    let e = smol::block_on(Kubernetes::connect(&ConnectSpec {
        server_url: Some("not a url".into()),
        ..ConnectSpec::default()
    }))
    .err()
    .unwrap();
    assert!(e.contains("serverUrl \"not a url\"") && e.contains("https://HOST:PORT"), "{e}");
    let e = smol::block_on(Kubernetes::connect(&ConnectSpec {
        server_url: Some("http://127.0.0.1:1".into()),
        server_certificate: Some("not PEM".into()),
        ..ConnectSpec::default()
    }))
    .err()
    .unwrap();
    assert!(e.contains("serverCertificate"), "{e}");

    // Nothing listens there.
    let closed = common::free_port();
    let b = connect(&ConnectSpec {
        server_url: Some(format!("http://127.0.0.1:{closed}")),
        ..ConnectSpec::default()
    });
    let (r, took) = timed(b.create(&pod("p", &[])));
    let e = r.unwrap_err();
    assert!(
        e.contains("creating pod p in namespace default")
            && e.contains(&format!("cannot reach the Kubernetes API at http://127.0.0.1:{closed}/"))
            && e.contains("check serverUrl"),
        "{e}"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");

    // An emulator that stops.
    let mut k = Kmock::start();
    let b = connect(&by_url(&k));
    smol::block_on(b.list(&selector(&[("a", "b")]))).unwrap();
    k.stop();
    let (r, took) = timed(b.list(&selector(&[("a", "b")])));
    let e = r.unwrap_err();
    assert!(e.contains("listing pods a=b in namespace wisp-test: cannot reach the Kubernetes API"), "{e}");
    assert!(took < Duration::from_secs(15), "{took:?}");

    // A server that accepts and never answers: the call timeout ends the call.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = connect(&ConnectSpec {
        server_url: Some(format!("http://{}", hung.local_addr().unwrap())),
        call_timeout: Duration::from_secs(2),
        ..ConnectSpec::default()
    });
    let (r, took) = timed(b.delete("p"));
    let e = r.unwrap_err();
    assert!(e.contains("deleting pod p") && e.contains("did not answer within 2 s"), "{e}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(6), "{took:?}");
    let (d, took) = timed(b.diagnose("p", "jnlp", 10));
    assert_eq!(d, Default::default(), "best effort: empty");
    assert!(took < Duration::from_secs(10), "two bounded calls: {took:?}");

    // Names that cannot go into a URL are refused before any request.
    let e = smol::block_on(b.delete("../secrets")).unwrap_err();
    assert!(e.contains("not a Kubernetes name"), "{e}");
    let e = smol::block_on(b.list(&selector(&[("a", "b,c=d")]))).unwrap_err();
    assert!(e.contains("cannot be selected on"), "{e}");
}

#[test]
fn kubeconfig_errors_name_the_file_and_the_context() {
    let e = smol::block_on(Kubernetes::connect(&ConnectSpec {
        kubeconfig: Some("/nonexistent/kubeconfig".into()),
        ..ConnectSpec::default()
    }))
    .err()
    .unwrap();
    assert!(e.contains("cannot read the kubeconfig /nonexistent/kubeconfig"), "{e}");
    let dir = TempDir::new("kubeconfig-ctx");
    let path = kubeconfig(&dir, "http://127.0.0.1:9", NS);
    let e = smol::block_on(Kubernetes::connect(&ConnectSpec {
        kubeconfig: Some(path.clone()),
        context: Some("nope".into()),
        ..ConnectSpec::default()
    }))
    .err()
    .unwrap();
    assert!(e.contains(&format!("kubeconfig {}", path.display())) && e.contains("context nope"), "{e}");
}

/// With no URL, no kubeconfig anywhere and no service account, the error lists what was tried.
/// Runs the probe below in a child process with a clean environment (no `KUBECONFIG`, an empty
/// `HOME`, not in a cluster), so no other test's environment is touched.
#[test]
fn no_credentials_anywhere_says_what_to_set() {
    let home = TempDir::new("home");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "in_cluster_probe", "--ignored", "--nocapture"])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("HOME", home.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "run by no_credentials_anywhere_says_what_to_set in a clean environment"]
fn in_cluster_probe() {
    let e = smol::block_on(Kubernetes::connect(&ConnectSpec::default())).err().unwrap();
    assert!(
        e.contains("no Kubernetes credentials")
            && e.contains("KUBECONFIG is unset")
            && e.contains("in-cluster service account")
            && e.contains("give the cloud a serverUrl"),
        "{e}"
    );
}
