//! A pod cloud: agents in pods made from pod templates, run by a [`PodBackend`] (the Kubernetes
//! API or the local podman). This is the life cycle; the backends only create, delete, list and
//! watch.
//!
//! - **Caps.** `instanceCap` (per template) and `containerCap` (per cloud) count the pods this
//!   cloud has, starting or running (kept pods do not count). Reservations are made under the
//!   controller's state lock ([`Cloud::reserve`]), so no race can make a fourth pod for a cap of 3.
//! - **Start.** A reservation names the pod (= node: the template's name, `-`, five random
//!   characters); [`Cloud::launch`] creates it and waits for its agent up to `connectTimeout`.
//!   A pod that fails first (an image that cannot be pulled, a container that exits, a pod that
//!   is deleted) or an agent that does not connect in time fails the build it was started for,
//!   with the pod's reason, its events and the last lines of the agent container's log. After
//!   [`MAX_FAILURES`] such failures in a row a template starts no more pods, and builds that need
//!   it fail at once saying so, until the cloud is applied again.
//! - **Under a build.** A pod deleted, evicted or whose agent container ended under a running
//!   build fails that build at once with the reason (no wait for the agent grace).
//! - **After a build.** One build per pod, unless `idleMinutes` keeps it for the next matching
//!   build; then the pod is deleted, or kept per `podRetention` (its node stays, taking no builds,
//!   until removed with `wisp node rm`).
//! - **Orphans.** The watch (one label-selected watch per cloud, not a poll per pod) deletes every
//!   pod of this controller and cloud that belongs to no node: at start (the first list) and
//!   whenever one appears. Nodes whose pod vanished while the controller was down are removed.

use super::backend::{ContainerState, Phase, PodBackend, PodEvent, PodInfo, Selector};
use super::{AfterBuild, Cloud, CloudFuture, CloudView, Host, Reserve, TemplateView, Want};
use crate::controller::store::NodeRecord;
use crate::controller::template::{self, AgentEnv, CloudSpec, PodTemplate, Retention};
use event_listener::Event;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// How long after a list that missed a pod it is looked for again.
pub const CONFIRM_AFTER: Duration = Duration::from_secs(1);
/// Pod failures in a row after which a template starts no more pods.
pub const MAX_FAILURES: u32 = 3;
/// Seconds an agent has to connect when a template sets no `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: u64 = 100;
/// How long a pod whose agent connected waits for a first build when its template keeps pods
/// for no build after (`idleMinutes: 0`): the build it was started for usually takes it at once.
pub const FRESH_IDLE: Duration = Duration::from_secs(60);
/// Longest a single backend call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of the agent container's log a failure shows.
pub const LOG_LINES: usize = 20;
/// Label naming the controller that made a pod.
pub const CONTROLLER_LABEL: &str = "wisp.dev/controller";
/// Label naming the cloud that made a pod.
pub const CLOUD_LABEL: &str = "wisp.dev/cloud";
/// Label naming the template a pod was made from.
pub const TEMPLATE_LABEL: &str = "wisp.dev/template";
/// Where the workspace volume is mounted in every container of a pod.
pub const WORK_DIR: &str = "/home/jenkins/agent";

/// Where a pod is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Life {
    /// Reserved; being created or waiting for its agent.
    Starting,
    /// Its agent connected.
    Online,
    /// Kept after its build (retention): counts toward no cap.
    Kept,
    /// Being deleted.
    Deleting,
}

/// One pod of this cloud.
#[derive(Debug)]
struct PodEntry {
    /// The (resolved) template it was made from.
    template: Arc<PodTemplate>,
    /// The build it was started for.
    build: u64,
    life: Life,
    /// The backend accepted it (a list without it means it is gone).
    created: bool,
    /// Last state the watch reported.
    info: Option<PodInfo>,
    /// Why it failed before its agent connected, once known.
    failed: Option<String>,
    /// A build on it failed (for `onFailure` retention).
    build_failed: bool,
    /// Bumped whenever an idle period starts; an idle timer acts only on its own period.
    idle_gen: u64,
    /// When it was reserved, when the backend was asked to create it, and when the backend
    /// answered (the timings its connect reports).
    times: Times,
}

/// When a pod was reserved, asked for and created.
#[derive(Debug, Clone, Copy)]
struct Times {
    reserved: Instant,
    create_call: Option<Instant>,
    created: Option<Instant>,
}

impl Times {
    fn now() -> Self {
        Self { reserved: Instant::now(), create_call: None, created: None }
    }
}

/// A run of pod failures of one template.
#[derive(Debug, Default, Clone)]
struct Streak {
    count: u32,
    last: String,
}

struct Inner {
    spec: Arc<CloudSpec>,
    pods: HashMap<String, PodEntry>,
    streaks: HashMap<String, Streak>,
    /// Whether the backend answered the last list, or why not.
    status: String,
}

/// A cloud of agent pods.
pub struct PodCloud {
    /// This cloud, for tasks started from `&self`.
    me: std::sync::Weak<PodCloud>,
    name: String,
    backend: RwLock<Arc<dyn PodBackend>>,
    inner: Mutex<Inner>,
    /// Fires when any pod's state changes (wakes launches waiting for their agent).
    changed: Event,
}

impl PodCloud {
    /// A cloud from `spec`, its pods run by `backend`.
    pub fn new(spec: CloudSpec, backend: Arc<dyn PodBackend>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            name: spec.name.clone(),
            backend: RwLock::new(backend),
            inner: Mutex::new(Inner {
                spec: Arc::new(spec),
                pods: HashMap::new(),
                streaks: HashMap::new(),
                status: "starting".into(),
            }),
            changed: Event::new(),
        })
    }

    /// Take a new spec (and backend) for the same cloud: its pods stay; failure streaks are
    /// forgotten (the user fixed something).
    pub fn update(&self, spec: CloudSpec, backend: Arc<dyn PodBackend>) {
        *self.backend.write().unwrap_or_else(|e| e.into_inner()) = backend;
        let mut inner = self.lock();
        inner.spec = Arc::new(spec);
        inner.streaks.clear();
    }

    /// The spec in force.
    pub fn spec(&self) -> Arc<CloudSpec> {
        self.lock().spec.clone()
    }

    fn clone_arc(&self) -> Arc<Self> {
        self.me.upgrade().expect("the cloud is alive while its methods run")
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn backend(&self) -> Arc<dyn PodBackend> {
        self.backend.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Labels every pod of this cloud carries, to select them by.
    fn selector(&self, host: &Arc<dyn Host>) -> Selector {
        let mut s = Selector::new();
        s.insert(CONTROLLER_LABEL.into(), label_value(&host.controller_id()));
        s.insert(CLOUD_LABEL.into(), label_value(&self.name));
        s
    }

    /// Delete pod `name` (bounded in time); errors are logged.
    async fn delete(&self, name: &str) {
        let backend = self.backend();
        match with_timeout(backend.delete(name)).await {
            Ok(()) => log::info!("cloud '{}': pod {name} deleted", self.name),
            Err(e) => log::warn!("cloud '{}': cannot delete pod {name}: {e}", self.name),
        }
    }

    /// Pod `node` failed before its agent connected: diagnose, delete or keep it, count the
    /// failure, fail its build.
    async fn fail_start(&self, node: &str, reason: String, host: &Arc<dyn Host>) {
        let (build, template, keep, created) = {
            let mut inner = self.lock();
            let cloud_retention = inner.spec.pod_retention;
            let Some(e) = inner.pods.get_mut(node) else { return };
            e.failed.get_or_insert_with(|| reason.clone());
            let evicted = e.info.as_ref().is_some_and(|i| i.reason == "Evicted");
            let keep = e.created && e.template.pod_retention.keeps(cloud_retention, true, true, evicted);
            e.life = if keep { Life::Kept } else { Life::Deleting };
            (e.build, e.template.clone(), keep, e.created)
        };
        let mut message =
            format!("pod {node} (template '{}') could not start an agent: {reason}", template.name);
        if created {
            let backend = self.backend();
            let d = with_timeout(async { Ok(backend.diagnose(node, "jnlp", LOG_LINES).await) })
                .await
                .unwrap_or_default();
            if !d.events.is_empty() {
                message.push_str("\nevents:");
                for l in d.events.iter().rev().take(20).rev() {
                    message.push_str("\n  ");
                    message.push_str(crate::text::truncate(l, 500));
                }
            }
            if !d.log_tail.is_empty() {
                message.push_str("\nlast lines of the jnlp container's log:");
                for l in &d.log_tail {
                    message.push_str("\n  ");
                    message.push_str(crate::text::truncate(l, 500));
                }
            }
        }
        let stopped = {
            let mut inner = self.lock();
            let s = inner.streaks.entry(template.name.clone()).or_default();
            s.count += 1;
            s.last = reason.clone();
            s.count >= MAX_FAILURES
        };
        if stopped {
            message.push_str(&format!(
                "\ntemplate '{}' has failed {MAX_FAILURES} times in a row: it starts no more pods until \
                 the cloud is applied again (`wisp cloud apply FILE`)",
                template.name
            ));
        }
        log::warn!("cloud '{}' (build {build}): {message}", self.name);
        if keep {
            log::info!(
                "cloud '{}': pod {node} kept (podRetention); `wisp node rm {node}` deletes it",
                self.name
            );
            host.retire(node, format!("kept after a failed start: {reason}"));
        } else {
            if created {
                self.delete(node).await;
            }
            self.lock().pods.remove(node);
            host.remove_node(node);
        }
        host.fail_queued(node, message);
        host.redispatch();
    }

    /// React to one event of the watch.
    fn on_event(&self, ev: PodEvent, host: &Arc<dyn Host>) {
        let mut actions: Vec<Action> = Vec::new();
        // Read before the cloud's lock: the controller's lock is never taken inside it (dispatch
        // takes them the other way round).
        let nodes: std::collections::HashSet<String> = host.nodes_of(&self.name).into_iter().collect();
        {
            let mut inner = self.lock();
            match ev {
                PodEvent::Listed(list) => {
                    inner.status = "ok".into();
                    let names: std::collections::HashSet<String> =
                        list.iter().map(|p| p.name.clone()).collect();
                    // Pods known here but not listed (unless not created yet), and nodes of this
                    // cloud with no pod known at all (gone while the controller was down): asked
                    // about once more before their builds fail, since one list can miss a pod
                    // that is there.
                    let missing: Vec<String> = inner
                        .pods
                        .iter()
                        .filter(|(n, e)| e.created && !names.contains(n.as_str()))
                        .map(|(n, _)| n.clone())
                        .collect();
                    for n in missing {
                        actions.push(Action::Confirm(n.clone(), format!("pod {n} no longer exists")));
                    }
                    for n in nodes.iter().filter(|n| !names.contains(*n) && !inner.pods.contains_key(*n)) {
                        actions.push(Action::Confirm(
                            n.clone(),
                            format!("pod {n} no longer exists (it went while the controller was away)"),
                        ));
                    }
                    for p in list {
                        actions.extend(self.seen(&mut inner, p, &nodes));
                    }
                }
                PodEvent::Changed(p) => actions.extend(self.seen(&mut inner, p, &nodes)),
                PodEvent::Deleted { name, .. } => {
                    actions.extend(gone_action(&mut inner, &name, format!("pod {name} was deleted")));
                }
            }
        }
        self.changed.notify(usize::MAX);
        for a in actions {
            match a {
                Action::Orphan(n) => {
                    log::info!("cloud '{}': pod {n} belongs to no node (an orphan): deleting it", self.name);
                    let me = self.backend();
                    let name = self.name.clone();
                    host.spawn(Box::pin(async move {
                        if let Err(e) = with_timeout(me.delete(&n)).await {
                            log::warn!("cloud '{name}': cannot delete orphan pod {n}: {e}");
                        }
                    }));
                }
                Action::Gone(n, why) => {
                    log::warn!("cloud '{}': {why}", self.name);
                    host.node_gone(&n, why);
                    host.redispatch();
                }
                Action::Confirm(n, why) => {
                    let me = self.clone_arc();
                    let host = host.clone();
                    let selector = self.selector(&host);
                    host.clone().spawn(Box::pin(async move {
                        smol::Timer::after(CONFIRM_AFTER).await;
                        let backend = me.backend();
                        let there = match with_timeout(backend.list(&selector)).await {
                            Ok(pods) => pods.iter().any(|p| p.name == n),
                            // Cannot tell: the next list decides.
                            Err(_) => return,
                        };
                        if there {
                            return;
                        }
                        let action = gone_action(&mut me.lock(), &n, why.clone());
                        match action {
                            Some(Action::Gone(n, why)) => {
                                log::warn!("cloud '{}': {why}", me.name);
                                host.node_gone(&n, why);
                                host.redispatch();
                            }
                            _ if !me.lock().pods.contains_key(&n) && host.nodes_of(&me.name).contains(&n) => {
                                log::warn!("cloud '{}': {why}", me.name);
                                host.node_gone(&n, why);
                            }
                            _ => {}
                        }
                    }));
                }
            }
        }
    }

    /// A pod's state as the watch reports it: adopt it, record it, or find it orphaned or failed.
    fn seen(
        &self,
        inner: &mut Inner,
        p: PodInfo,
        nodes: &std::collections::HashSet<String>,
    ) -> Option<Action> {
        let name = p.name.clone();
        let Some(e) = inner.pods.get_mut(&name) else {
            if !nodes.contains(&name) {
                return Some(Action::Orphan(name));
            }
            // A pod from before a restart whose node still exists: adopt it.
            let tname = p.labels.get(TEMPLATE_LABEL).cloned().unwrap_or_default();
            let template = inner
                .spec
                .templates
                .iter()
                .find(|t| label_value(&t.name) == tname)
                .map(|t| Arc::new(template::resolve(t, &inner.spec.templates).0))
                .unwrap_or_else(|| Arc::new(PodTemplate { name: tname, ..Default::default() }));
            log::info!("cloud '{}': pod {name} adopted (template '{}')", self.name, template.name);
            inner.pods.insert(
                name.clone(),
                PodEntry {
                    template,
                    build: 0,
                    life: Life::Online,
                    created: true,
                    info: Some(p),
                    failed: None,
                    build_failed: false,
                    idle_gen: 0,
                    times: Times::now(),
                },
            );
            return None;
        };
        e.created = true;
        let verdict = judge(&p);
        e.info = Some(p);
        match (&e.life, verdict) {
            (Life::Starting, Some(why)) => {
                e.failed.get_or_insert(why);
                None
            }
            (Life::Online, Some(why)) if e.failed.is_none() => {
                e.failed = Some(why.clone());
                Some(Action::Gone(name, why))
            }
            _ => None,
        }
    }

    /// Resolve the template a build needs.
    fn template_for(&self, spec: &CloudSpec, want: &Want<'_>) -> Option<PodTemplate> {
        match want.inline {
            Some(inline) => {
                let (mut t, warnings) = template::resolve(inline, &spec.templates);
                for w in warnings {
                    log::warn!("build {}: its inline pod template: {w}", want.build);
                }
                if t.name.is_empty() {
                    t.name = format!("build-{}", want.build);
                }
                Some(t)
            }
            None => spec.template_for(want.expr).map(|t| template::resolve(t, &spec.templates).0),
        }
    }
}

/// What the watch found that the controller must hear of (done without the cloud's lock).
enum Action {
    Orphan(String),
    Gone(String, String),
    /// Not in a list: gone with this reason if a second look does not find it either.
    Confirm(String, String),
}

/// Pod `name` is gone: a starting pod failed; a running one's build fails at once.
fn gone_action(inner: &mut Inner, name: &str, why: String) -> Option<Action> {
    let e = inner.pods.get_mut(name)?;
    match e.life {
        Life::Starting => {
            e.failed.get_or_insert(why);
            None
        }
        Life::Deleting => {
            inner.pods.remove(name);
            None
        }
        Life::Online | Life::Kept => {
            let reason = e.info.as_ref().filter(|i| i.reason == "Evicted").map(|i| {
                format!(
                    "pod {name} was evicted: {}",
                    if i.message.is_empty() { "no reason given" } else { &i.message }
                )
            });
            inner.pods.remove(name);
            Some(Action::Gone(name.to_string(), reason.unwrap_or(why)))
        }
    }
}

/// Why a pod cannot (or can no longer) run an agent, from its state; None while it may.
pub fn judge(p: &PodInfo) -> Option<String> {
    if p.reason == "Evicted" {
        let m = if p.message.is_empty() { "no reason given" } else { &p.message };
        return Some(format!("pod {} was evicted: {m}", p.name));
    }
    for (c, st) in &p.containers {
        match st {
            ContainerState::Waiting { reason, message }
                if matches!(
                    reason.as_str(),
                    "ErrImagePull"
                        | "ImagePullBackOff"
                        | "InvalidImageName"
                        | "ErrImageNeverPull"
                        | "CreateContainerConfigError"
                        | "CreateContainerError"
                        | "CrashLoopBackOff"
                        | "RunContainerError"
                ) =>
            {
                let m = if message.is_empty() { String::new() } else { format!(": {message}") };
                return Some(format!("container {c}: {reason}{m}"));
            }
            ContainerState::Terminated { exit_code, reason, message }
                if c == "jnlp" || *exit_code != 0 || p.phase == Phase::Failed =>
            {
                // An init container that ended with 0 is done, not failed.
                if c != "jnlp" && *exit_code == 0 {
                    continue;
                }
                let mut s = format!("container {c} exited with code {exit_code}");
                if !reason.is_empty() {
                    s.push_str(&format!(" ({reason})"));
                }
                if !message.is_empty() {
                    s.push_str(&format!(": {message}"));
                }
                return Some(s);
            }
            _ => {}
        }
    }
    match p.phase {
        Phase::Failed | Phase::Succeeded => {
            let mut s = format!("pod {} ended ({:?})", p.name, p.phase);
            if !p.reason.is_empty() {
                s.push_str(&format!(": {}", p.reason));
            }
            if !p.message.is_empty() {
                s.push_str(&format!(": {}", p.message));
            }
            Some(s)
        }
        _ => None,
    }
}

/// Whether a cloud's agents dial over WebSocket: when it says so, and when it asks for neither
/// that nor a direct connection (one connection on the HTTP port, through any proxy; the agent's
/// other way, asking the HTTP port for the agent port first, costs a second TLS handshake).
fn web_socket(spec: &CloudSpec) -> bool {
    spec.web_socket || !spec.direct_connection
}

/// `s` as a valid label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
pub fn label_value(s: &str) -> String {
    let mut v: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' })
        .take(63)
        .collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    while v.starts_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.remove(0);
    }
    v
}

/// `f`, or an error after [`CALL_TIMEOUT`].
async fn with_timeout<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    smol::future::or(f, async {
        smol::Timer::after(CALL_TIMEOUT).await;
        Err(format!("no answer within {}s", CALL_TIMEOUT.as_secs()))
    })
    .await
}

impl Cloud for PodCloud {
    fn name(&self) -> &str {
        &self.name
    }

    fn reserve(&self, want: &Want<'_>) -> Reserve {
        let mut inner = self.lock();
        let spec = inner.spec.clone();
        let Some(t) = self.template_for(&spec, want) else { return Reserve::No };
        if let Some(s) = inner.streaks.get(&t.name).filter(|s| s.count >= MAX_FAILURES) {
            return Reserve::Refused(format!(
                "template '{}' of cloud '{}' starts no pods: it failed {} times in a row (last: {}); fix it \
                 and apply the cloud again (`wisp cloud apply FILE`)",
                t.name, self.name, s.count, s.last
            ));
        }
        let live = |e: &&PodEntry| matches!(e.life, Life::Starting | Life::Online | Life::Deleting);
        let of_template =
            inner.pods.values().filter(live).filter(|e| e.template.name == t.name).count() as u32;
        if let Some(cap) = t.instance_cap.filter(|&c| of_template >= c) {
            return Reserve::Full(format!(
                "template '{}' is at its instanceCap of {cap} ({of_template} pods)",
                t.name
            ));
        }
        let total = inner.pods.values().filter(live).count() as u32;
        if spec.container_cap > 0 && total >= spec.container_cap {
            return Reserve::Full(format!(
                "cloud '{}' is at its containerCap of {} ({total} pods)",
                self.name, spec.container_cap
            ));
        }
        let name = loop {
            let n = template::pod_name(&t.name);
            if !(want.taken)(&n) && !inner.pods.contains_key(&n) {
                break n;
            }
        };
        let labels = if want.inline.is_some() {
            Vec::new()
        } else {
            let mut l: Vec<String> =
                t.label.as_deref().unwrap_or("").split_whitespace().map(str::to_string).collect();
            l.push(t.name.clone());
            l
        };
        let rec = NodeRecord {
            name: name.clone(),
            labels,
            executors: 1,
            websocket: web_socket(&spec),
            work_dir: WORK_DIR.into(),
            origin: self.name.clone(),
        };
        inner.pods.insert(
            name,
            PodEntry {
                template: Arc::new(t),
                build: want.build,
                life: Life::Starting,
                created: false,
                info: None,
                failed: None,
                build_failed: false,
                idle_gen: 0,
                times: Times::now(),
            },
        );
        Reserve::Node(rec)
    }

    fn launch(self: Arc<Self>, node: String, build: u64, host: Arc<dyn Host>) -> CloudFuture<()> {
        Box::pin(async move {
            let template = self.lock().pods.get(&node).map(|e| e.template.clone());
            let Some(template) = template else { return };
            let spec = self.spec();
            let Some(dial) = host.dial() else {
                return self.fail_start(&node, "the controller does not listen yet".into(), &host).await;
            };
            let agent = AgentEnv {
                node: node.clone(),
                secret: host.secret(&node),
                url: spec.jenkins_url.clone().unwrap_or_else(|| dial.url.clone()),
                direct: spec
                    .direct_connection
                    .then(|| spec.jenkins_tunnel.clone().unwrap_or_else(|| dial.agent.clone())),
                web_socket: web_socket(&spec),
                instance_identity: dial.fingerprint.clone().unwrap_or_default(),
                controller_id: host.controller_id(),
                agent_image: spec.agent_image.clone().unwrap_or_else(|| DEFAULT_AGENT_IMAGE.to_string()),
            };
            let mut pod = match template::pod_manifest(&template, &spec, &agent) {
                Ok(p) => p,
                Err(e) => return self.fail_start(&node, format!("bad pod template: {e}"), &host).await,
            };
            let labels = pod.metadata.labels.get_or_insert_with(Default::default);
            labels.extend(self.selector(&host));
            labels.insert(TEMPLATE_LABEL.into(), label_value(&template.name));
            log::info!(
                "build {build}: cloud '{}' starts pod {node} (template '{}') on {}",
                self.name,
                template.name,
                self.backend().kind()
            );
            let backend = self.backend();
            if let Some(e) = self.lock().pods.get_mut(&node) {
                e.times.create_call = Some(Instant::now());
            }
            if let Err(e) = with_timeout(backend.create(&pod)).await {
                return self.fail_start(&node, e, &host).await;
            }
            if let Some(e) = self.lock().pods.get_mut(&node) {
                e.created = true;
                e.times.created = Some(Instant::now());
            }
            let timeout = Duration::from_secs(template.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT));
            let deadline = Instant::now() + timeout;
            loop {
                let listener = self.changed.listen();
                let state = self.lock().pods.get(&node).map(|e| (e.life.clone(), e.failed.clone()));
                match state {
                    None => return,
                    Some((Life::Starting, Some(why))) => return self.fail_start(&node, why, &host).await,
                    Some((Life::Starting, None)) => {}
                    Some(_) => return,
                }
                if Instant::now() >= deadline {
                    let phase = self.lock().pods.get(&node).and_then(|e| e.info.clone());
                    let state = match phase {
                        Some(i) => format!("the pod is {:?}", i.phase),
                        None => "the backend reported no state for the pod".into(),
                    };
                    let why = format!(
                        "its agent did not connect within {}s (connectTimeout); {state}: check that the pod \
                         can reach the controller at {}",
                        timeout.as_secs(),
                        agent.direct.as_deref().unwrap_or(&agent.url)
                    );
                    return self.fail_start(&node, why, &host).await;
                }
                smol::future::or(listener, async {
                    smol::Timer::at(deadline).await;
                })
                .await;
            }
        })
    }

    fn connected(&self, node: &str) {
        let mut inner = self.lock();
        let Some(e) = inner.pods.get_mut(node) else { return };
        if e.life != Life::Starting {
            return;
        }
        e.life = Life::Online;
        e.idle_gen += 1;
        let times = e.times;
        let tname = e.template.name.clone();
        inner.streaks.remove(&tname);
        drop(inner);
        self.changed.notify(usize::MAX);
        // Where the time to a running agent went: wisp's own share up to the create call, then
        // the backend's (which may still be answering when the agent connects: podman's
        // `pod start` returns after the containers run).
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1000.0;
        let now = Instant::now();
        let unix_ms = |at: Instant| {
            let wall = std::time::SystemTime::now() - now.saturating_duration_since(at);
            wall.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
        };
        match times.create_call {
            Some(call) => log::info!(
                "cloud '{}': pod {node} online {:.1} ms after it was reserved: {:.2} ms to the create call, \
                 {:.1} ms from the create call to the agent's connect{} (create call at unix ms {:.1}, online at \
                 unix ms {:.1})",
                self.name,
                ms(times.reserved, now),
                ms(times.reserved, call),
                ms(call, now),
                match times.created {
                    Some(c) => format!("; {}'s create took {:.1} ms", self.backend().kind(), ms(call, c)),
                    None => format!(", before {}'s create returned", self.backend().kind()),
                },
                unix_ms(call),
                unix_ms(now),
            ),
            None => log::info!("cloud '{}': pod {node} online", self.name),
        }
    }

    fn build_ended(&self, node: &str, failed: bool) -> AfterBuild {
        let mut inner = self.lock();
        let Some(e) = inner.pods.get_mut(node) else { return AfterBuild::Release };
        e.build_failed |= failed;
        if e.template.idle_minutes > 0 && e.life == Life::Online && e.failed.is_none() {
            e.idle_gen += 1;
            AfterBuild::Reuse
        } else {
            AfterBuild::Release
        }
    }

    fn idle(self: Arc<Self>, node: String, host: Arc<dyn Host>) -> CloudFuture<()> {
        Box::pin(async move {
            let Some((gen, minutes)) =
                self.lock().pods.get(&node).map(|e| (e.idle_gen, e.template.idle_minutes))
            else {
                return;
            };
            let wait = if minutes == 0 { FRESH_IDLE } else { Duration::from_secs(u64::from(minutes) * 60) };
            smol::Timer::after(wait).await;
            let still =
                self.lock().pods.get(&node).is_some_and(|e| e.idle_gen == gen && e.life == Life::Online);
            if still && !host.is_busy(&node) {
                log::info!("cloud '{}': pod {node} idle for {}s: releasing it", self.name, wait.as_secs());
                host.retire(&node, "idle time is up".into());
                self.release(node, host).await;
            }
        })
    }

    fn release(self: Arc<Self>, node: String, host: Arc<dyn Host>) -> CloudFuture<()> {
        Box::pin(async move {
            let keep = {
                let mut inner = self.lock();
                let cloud_retention = inner.spec.pod_retention;
                let Some(e) = inner.pods.get_mut(&node) else {
                    drop(inner);
                    host.remove_node(&node);
                    return;
                };
                let pod_failed =
                    e.info.as_ref().is_some_and(|i| matches!(i.phase, Phase::Failed | Phase::Unknown));
                let evicted = e.info.as_ref().is_some_and(|i| i.reason == "Evicted");
                let keep =
                    e.template.pod_retention.keeps(cloud_retention, e.build_failed, pod_failed, evicted);
                e.life = if keep { Life::Kept } else { Life::Deleting };
                keep
            };
            if keep {
                log::info!(
                    "cloud '{}': pod {node} kept (podRetention); `wisp node rm {node}` deletes it",
                    self.name
                );
                host.retire(&node, "kept after its build (podRetention)".into());
            } else {
                self.delete(&node).await;
                self.lock().pods.remove(&node);
                host.remove_node(&node);
            }
            host.redispatch();
        })
    }

    fn node_removed(self: Arc<Self>, node: String) -> CloudFuture<()> {
        Box::pin(async move {
            let known = match self.lock().pods.get_mut(&node) {
                Some(e) => {
                    e.life = Life::Deleting;
                    true
                }
                None => false,
            };
            if known {
                self.delete(&node).await;
                self.lock().pods.remove(&node);
            }
        })
    }

    fn run(self: Arc<Self>, host: Arc<dyn Host>) -> CloudFuture<()> {
        Box::pin(async move {
            let selector = self.selector(&host);
            let backend = self.backend();
            let me = self.clone();
            let h = host.clone();
            backend.watch(&selector, Box::new(move |ev| me.on_event(ev, &h))).await;
        })
    }

    fn default_container(&self, node: &str) -> Option<String> {
        self.lock().pods.get(node).and_then(|e| e.template.default_container.clone())
    }

    fn view(&self) -> CloudView {
        let inner = self.lock();
        let spec = &inner.spec;
        let live = |e: &&PodEntry| matches!(e.life, Life::Starting | Life::Online | Life::Deleting);
        let templates = spec
            .templates
            .iter()
            .map(|t| {
                let status = match inner.streaks.get(&t.name) {
                    Some(s) if s.count >= MAX_FAILURES => {
                        format!("stopped after {} failures in a row: {}", s.count, s.last)
                    }
                    Some(s) => format!("ok ({} failures in a row; last: {})", s.count, s.last),
                    None => "ok".into(),
                };
                TemplateView {
                    cloud: self.name.clone(),
                    name: t.name.clone(),
                    label: t.label.clone().unwrap_or_default(),
                    inherit_from: t.inherit_from.clone().unwrap_or_default(),
                    instance_cap: t.instance_cap,
                    idle_minutes: t.idle_minutes,
                    pod_retention: t.pod_retention.as_str().to_string(),
                    pods: inner.pods.values().filter(live).filter(|e| e.template.name == t.name).count()
                        as u32,
                    status,
                }
            })
            .collect();
        CloudView {
            name: self.name.clone(),
            kind: self.backend().kind().to_string(),
            namespace: spec.namespace.clone(),
            container_cap: spec.container_cap,
            pods: inner.pods.len() as u32,
            templates,
            status: inner.status.clone(),
        }
    }
}

/// Image of the `jnlp` container when neither the template nor the cloud names one: the scratch
/// image `scripts/build-image.sh` builds.
pub const DEFAULT_AGENT_IMAGE: &str = "localhost/wisp-agent:dev";

impl Retention {
    /// As `wisp templates` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Never => "never",
            Self::OnFailure => "onFailure",
            Self::Always => "always",
            Self::Evicted => "evicted",
        }
    }
}
