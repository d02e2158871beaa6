//! The Kubernetes cloud end to end: a controller whose `kubernetes` cloud talks to kmock, an
//! independent in-memory Kubernetes API emulator from PyPI (no real API server can be installed
//! on the machines these tests run on), through kube-rs.
//!
//! kmock has no kubelet, so the test plays one: a bridge thread watches the pods created in kmock
//! and runs each pod's `jnlp` container as a real `wisp-agent` process with the environment the
//! controller put in the pod spec (so the agent really proves the pod's secret and pins the
//! controller's identity), reports the pod Running, and kills the agent when the pod is deleted.
//! Provisioning, caps, orphan clean-up and deletion per retention are then the controller's own
//! doing against the API.

mod common;
use common::kmock::Kmock;
use common::{try_http, wait_for, Controller, Proc, TempDir, AGENT};
use serde_json::json;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NS: &str = "ci";

/// The test's kubelet: runs the jnlp container of every pod kmock holds as a local agent.
struct Bridge {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Most pods seen in kmock at once.
    most: Arc<AtomicUsize>,
    /// Pods started so far.
    started: Arc<Mutex<Vec<String>>>,
}

impl Bridge {
    fn start(kmock: &Kmock) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(Mutex::new(Vec::new()));
        let addr = kmock.addr.clone();
        let (s, m, st) = (stop.clone(), most.clone(), started.clone());
        let thread = std::thread::spawn(move || {
            let api = KmockHttp(addr);
            let work = TempDir::new("bridge");
            let mut agents: HashMap<String, Proc> = HashMap::new();
            while !s.load(Ordering::SeqCst) {
                let list = api.get(&format!("/api/v1/namespaces/{NS}/pods"));
                let pods = list["items"].as_array().cloned().unwrap_or_default();
                m.fetch_max(pods.len(), Ordering::SeqCst);
                let names: Vec<String> =
                    pods.iter().filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string)).collect();
                for p in &pods {
                    let name = p["metadata"]["name"].as_str().unwrap_or_default().to_string();
                    if agents.contains_key(&name) || p["metadata"]["labels"]["wisp.dev/controller"].is_null()
                    {
                        continue;
                    }
                    let jnlp = p["spec"]["containers"]
                        .as_array()
                        .and_then(|cs| cs.iter().find(|c| c["name"] == "jnlp"))
                        .cloned()
                        .unwrap_or_default();
                    let dir = work.path().join(&name);
                    std::fs::create_dir_all(&dir).unwrap();
                    let mut cmd = Command::new(AGENT);
                    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
                    for e in jnlp["env"].as_array().cloned().unwrap_or_default() {
                        if let (Some(k), Some(v)) = (e["name"].as_str(), e["value"].as_str()) {
                            cmd.env(k, v);
                        }
                    }
                    // The pod's workspace volume is a directory here.
                    cmd.env("JENKINS_AGENT_WORKDIR", &dir);
                    let log = dir.join("agent.log");
                    let child = cmd
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(std::fs::File::create(&log).unwrap())
                        .spawn()
                        .unwrap();
                    agents.insert(name.clone(), Proc { child, log });
                    api.patch_status(
                        &name,
                        json!({"phase": "Running", "containerStatuses": [
                            {"name": "jnlp", "ready": true, "restartCount": 0, "image": "x", "imageID": "",
                             "state": {"running": {}}}]}),
                    );
                    st.lock().unwrap().push(name);
                }
                agents.retain(|n, _| names.contains(n));
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self { stop, thread: Some(thread), most, started }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// kmock's API from the bridge thread, which must not panic (a failed call is tried again at the
/// next poll).
struct KmockHttp(String);
impl KmockHttp {
    fn get(&self, path: &str) -> serde_json::Value {
        let (_, body) = try_http(&self.0, "GET", path, &[], b"").unwrap_or_default();
        serde_json::from_slice(&body).unwrap_or_default()
    }
    fn patch_status(&self, name: &str, status: serde_json::Value) {
        let body = json!({ "status": status }).to_string();
        let path = format!("/api/v1/namespaces/{NS}/pods/{name}/status");
        let _ = try_http(
            &self.0,
            "PATCH",
            &path,
            &[("Content-Type", "application/merge-patch+json")],
            body.as_bytes(),
        );
    }
}

fn kubeconfig(dir: &TempDir, kmock: &Kmock) -> std::path::PathBuf {
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: k\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: k\n  \
             context: {{cluster: k, user: u, namespace: {NS}}}\ncurrent-context: k\nusers:\n- name: u\n  user: {{token: t0k}}\n",
            kmock.url()
        ),
    )
    .unwrap();
    path
}

/// A TLS controller with a kubernetes cloud named `k8s` on kmock, whose templates are `templates`.
fn setup(templates: &str) -> (Kmock, Controller, TempDir) {
    let kmock = Kmock::start();
    let dir = TempDir::new("kubecfg");
    let kc = kubeconfig(&dir, &kmock);
    let c = Controller::start_tls(&[]);
    let file = c.data.path().join("cloud.yaml");
    std::fs::write(
        &file,
        format!(
            "clouds:\n  - kubernetes:\n      name: k8s\n      kubeconfig: {}\n      templates:\n{templates}",
            kc.display()
        ),
    )
    .unwrap();
    let out = c.wisp(&["cloud", "apply", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (kmock, c, dir)
}

fn pod_names(kmock: &Kmock) -> Vec<String> {
    let (_, body) = kmock.http("GET", &format!("/api/v1/namespaces/{NS}/pods"), "application/json", b"");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    v["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn controller_id(c: &Controller) -> String {
    std::fs::read_to_string(c.data.path().join("controller-id")).unwrap().trim().to_string()
}

/// A build gets a pod from the API at once; its agent (run by the bridge with the pod's own
/// environment) connects and runs it; retention `never` deletes the pod after it, `always` keeps it.
#[test]
fn builds_get_pods_through_the_api_and_pods_are_deleted_or_kept_per_retention() {
    let (kmock, c, _d) = setup(
        "        - {name: gone, label: gone, podRetention: never}\n        - {name: kept, label: kept, podRetention: always}\n",
    );
    let _bridge = Bridge::start(&kmock);
    let (code, out) = c.run("name: k\nagent: {label: gone}\nsteps: [{sh: 'echo hello from $NODE_NAME'}]\n");
    assert_eq!(code, 0, "{out}\n{}", c.log_text());
    let node = out.lines().find_map(|l| l.strip_prefix("hello from ")).expect("node name").to_string();
    assert!(node.starts_with("gone-") && node.len() == "gone-".len() + 5, "{node}");
    wait_for("the pod to be deleted", Duration::from_secs(20), || {
        (!pod_names(&kmock).contains(&node)).then_some(())
    });
    // The pod as created: labels, restartPolicy and the agent's environment.
    let (code, out) = c.run("name: k\nagent: {label: kept}\nsteps: [{sh: 'echo on $NODE_NAME'}]\n");
    assert_eq!(code, 0, "{out}");
    let kept = out.lines().find_map(|l| l.strip_prefix("on ")).unwrap().to_string();
    wait_for("the pod's retention", Duration::from_secs(20), || {
        c.log_text().contains(&format!("pod {kept} kept (podRetention)")).then_some(())
    });
    let pod = kmock.pod(NS, &kept).expect("an `always` pod is kept");
    assert_eq!(pod["metadata"]["labels"]["wisp.dev/controller"], controller_id(&c).as_str());
    assert_eq!(pod["metadata"]["labels"]["jenkins"], "slave");
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    let env: Vec<String> =
        pod["spec"]["containers"].as_array().unwrap().iter().find(|x| x["name"] == "jnlp").unwrap()["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect();
    for k in [
        "JENKINS_URL",
        "JENKINS_SECRET",
        "JENKINS_AGENT_NAME",
        "JENKINS_NAME",
        "JENKINS_AGENT_WORKDIR",
        "JENKINS_INSTANCE_IDENTITY",
    ] {
        assert!(env.contains(&k.to_string()), "{k} in {env:?}");
    }
}

/// Ten builds at once against `instanceCap: 2`: kmock never holds a third pod, and all ten run.
#[test]
fn caps_hold_against_the_api() {
    let (kmock, c, _d) = setup("        - {name: capped, label: capped, instanceCap: 2}\n");
    let bridge = Bridge::start(&kmock);
    let ids: Vec<u64> =
        (0..10).map(|_| c.submit("name: k\nagent: {label: capped}\nsteps: [{sh: 'sleep 0.2'}]\n")).collect();
    for id in ids {
        assert_eq!(c.wait_build_state_tls(id, Duration::from_secs(120)), "success", "build {id}");
    }
    assert!(
        bridge.most.load(Ordering::SeqCst) <= 2,
        "kmock held {} pods",
        bridge.most.load(Ordering::SeqCst)
    );
    assert!(
        bridge.started.lock().unwrap().len() >= 5,
        "one pod per build: {:?}",
        bridge.started.lock().unwrap()
    );
}

/// Pods of this controller that belong to no node are deleted: one there before the cloud is
/// applied (the first list) and one that appears later (the watch).
#[test]
fn orphan_pods_are_deleted_at_start_and_when_they_appear() {
    let kmock = Kmock::start();
    let dir = TempDir::new("kubecfg");
    let kc = kubeconfig(&dir, &kmock);
    let c = Controller::start_tls(&[]);
    let id = controller_id(&c);
    let orphan = |name: &str, cloud: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": {"wisp.dev/controller": id, "wisp.dev/cloud": cloud}},
               "spec": {"containers": [{"name": "jnlp", "image": "x"}]}})
    };
    kmock.create(NS, "pods", orphan("old-orphan", "k8s"));
    // Another controller's pod (or another cloud's) is not touched.
    let mut foreign = orphan("not-mine", "k8s");
    foreign["metadata"]["labels"]["wisp.dev/controller"] = json!("someone-else");
    kmock.create(NS, "pods", foreign);
    let file = c.data.path().join("cloud.yaml");
    std::fs::write(
        &file,
        format!("clouds:\n  - kubernetes:\n      name: k8s\n      kubeconfig: {}\n      templates: [{{name: t}}]\n", kc.display()),
    )
    .unwrap();
    let out = c.wisp(&["cloud", "apply", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the old orphan to go", Duration::from_secs(20), || {
        (!pod_names(&kmock).contains(&"old-orphan".to_string())).then_some(())
    });
    kmock.create(NS, "pods", orphan("new-orphan", "k8s"));
    wait_for("the new orphan to go", Duration::from_secs(20), || {
        (!pod_names(&kmock).contains(&"new-orphan".to_string())).then_some(())
    });
    assert!(pod_names(&kmock).contains(&"not-mine".to_string()));
}

/// A pod evicted under a running build fails the build at once with the eviction's message.
#[test]
fn an_evicted_pod_fails_its_build_at_once() {
    let (kmock, c, _d) = setup("        - {name: ev, label: ev}\n");
    let _bridge = Bridge::start(&kmock);
    let id = c.submit("name: k\nagent: {label: ev}\nsteps: [{sh: 'echo started; sleep 600'}]\n");
    wait_for("the step to run", Duration::from_secs(60), || {
        String::from_utf8_lossy(&c.wisp(&["log", &id.to_string()]).stdout).contains("started").then_some(())
    });
    let pod = pod_names(&kmock).into_iter().next().unwrap();
    let t = Instant::now();
    kmock.set_status(
        NS,
        &pod,
        json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}),
    );
    assert_eq!(c.wait_build_state_tls(id, Duration::from_secs(60)), "failure");
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
    let out = c.wisp(&["builds"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("evicted") && text.contains("low on resource"), "{text}");
}
