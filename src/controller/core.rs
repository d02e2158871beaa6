//! The controller's hub: it owns the nodes, the queue and the live builds (one lock, never held
//! across an await), and wires the parts together: sessions ([`super::session`]) attach to nodes,
//! the queue ([`super::queue`]) decides, the runner ([`super::runner`]) runs, the step table
//! ([`super::steps`]) carries output, the store runs on its own thread ([`super::store`]).

use super::cloud::{self, Cloud};
use super::logs::{self, Logs};
use super::nodes::{Node, Nodes};
use super::noisy::Noisy;
use super::pipeline;
use super::queue::{Decision, Queue};
use super::runner::{self, LiveBuild};
use super::session::{self, Failures, Out, Reconciled, Session};
use super::steps::StepTable;
use super::store::{self, BuildRecord, BuildState, NodeRecord, StepRecord, StepState, Store, StoreThread};
use event_listener::Event;
use smol::Executor;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

pub use super::runner::AGENT_GRACE;

/// Pipelines up to this size are parsed on the executor: with the nesting bounded the parse is
/// linear, a few microseconds for a pipeline this size, less than handing it to another thread
/// costs. Larger ones (up to the 1 MiB body limit) go to the blocking pool.
pub const INLINE_PARSE: usize = 4096;
/// How long a store write that failed (a full disk) waits before it is tried again.
pub const STORE_RETRY: Duration = Duration::from_secs(1);

/// The controller's link timings.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often each side of an agent link pings the other.
    pub ping_interval: Duration,
    /// How long a new agent link may take to authenticate.
    pub handshake_timeout: Duration,
    /// How long a running build waits for its disconnected agent.
    pub agent_grace: Duration,
}

/// An error for API callers: an HTTP status and a sentence.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What went wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        log::error!("store: {e}");
        if store::is_disk_full(&e) {
            return Self::new(507, "disk full on the controller: free space in its data dir and try again");
        }
        Self::new(500, format!("store error: {e}"))
    }
}

/// What the state lock guards.
#[derive(Default)]
pub(super) struct State {
    pub(super) nodes: Nodes,
    pub(super) queue: Queue,
    pub(super) builds: HashMap<u64, Arc<LiveBuild>>,
    /// The clouds, in the order they were applied.
    pub(super) clouds: Vec<Arc<dyn Cloud>>,
    /// Why recently gone cloud nodes went (a running build on one fails with it), newest last.
    pub(super) gone: std::collections::VecDeque<(String, String)>,
    /// Queued build units' runners, waiting for a node (or why none comes), by (build, unit).
    pub(super) waiters: HashMap<(u64, u32), smol::channel::Sender<Result<String, String>>>,
}

/// A node with its live status, as the API lists it.
pub struct NodeStatus {
    /// The stored node.
    pub rec: NodeRecord,
    /// Its agent is connected.
    pub online: bool,
    /// Executors running a build now.
    pub busy: u32,
    /// What its connected agent said it is: version, architecture, OS.
    pub agent: Option<(String, String, String)>,
}

/// What the connected agent of `n` said it is (none while offline, or from an agent too old to say).
fn agent_of(n: &super::nodes::Node) -> Option<(String, String, String)> {
    n.conn.as_ref()?.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl NodeStatus {
    fn of(n: &super::nodes::Node) -> NodeStatus {
        NodeStatus { rec: n.rec.clone(), online: n.conn.is_some(), busy: n.busy, agent: agent_of(n) }
    }
}

/// A node with its live state, for the web page.
pub struct NodeView {
    /// As stored.
    pub rec: NodeRecord,
    /// Executors running a build.
    pub busy: u32,
    /// Its agent is connected.
    pub online: bool,
    /// Over WebSocket (the live link's, else the configured one).
    pub websocket: bool,
    /// Round-trip time of the live link's last ping, in µs.
    pub rtt_us: Option<u64>,
    /// Its agent connected since the controller started.
    pub ever_online: bool,
    /// When it last went online or offline.
    pub changed: Option<std::time::SystemTime>,
    /// When the controller made or loaded it.
    pub since: Instant,
    /// While offline: steps started on it that wait for its agent to come back.
    pub held_steps: usize,
    /// The live link's peer address.
    pub peer: Option<String>,
    /// What its agent said it is: version, architecture, OS.
    pub agent: Option<(String, String, String)>,
}

/// The builds queued and running, as the overview shows them.
pub struct Activity {
    /// Queued builds (the first ones asked for), oldest first, with why each waits.
    pub queued: Vec<(u64, Option<String>)>,
    /// Running builds, by number.
    pub running: Vec<u64>,
    /// How many builds are queued in all.
    pub queue_len: usize,
}

/// The controller.
pub struct Controller {
    /// Data directory (absolute).
    pub data: PathBuf,
    key: Vec<u8>,
    token: Mutex<String>,
    /// The store, on its own thread.
    pub store: StoreThread,
    /// Where step logs live.
    pub logs: Logs,
    /// The running steps.
    pub steps: StepTable,
    state: Mutex<State>,
    /// This controller, for what needs an `Arc` of it from `&self` (the cloud host).
    me: std::sync::Weak<Controller>,
    /// The clouds of pods, for applying a new spec to one.
    pub(super) pod_clouds: Mutex<Vec<Arc<super::cloud::pods::PodCloud>>>,
    /// The watch task of each cloud, by name.
    pub(super) cloud_tasks: Mutex<HashMap<String, smol::Task<()>>>,
    /// How agents dial this controller, once it listens.
    pub dial: OnceLock<cloud::Dial>,
    /// A stable id of this controller (in `DATA/controller-id`): labels the pods it makes.
    pub id: String,
    /// Failed agent handshakes by source address.
    pub failures: Failures,
    /// Throttled warnings for what peers can cause by the thousand.
    pub noisy: Noisy,
    /// Runs every task of the controller.
    pub ex: Arc<Executor<'static>>,
    /// Deadlines of HTTP requests (header timeouts, `?wait`) and of agent links' keepalive, on
    /// one timer.
    pub deadlines: Arc<super::deadlines::Deadlines>,
    /// Bound addresses (HTTP, agent port), once listening.
    pub addrs: OnceLock<(SocketAddr, SocketAddr)>,
    /// Link timings.
    pub timing: Timing,
    next_session: AtomicU64,
    /// Set when the controller is told to stop.
    pub stopping: AtomicBool,
    /// Fires when `stopping` is set.
    pub stop: Event,
    /// The web page's sessions and path prefix.
    pub web: super::web::Web,
    /// What `/metrics` shows.
    pub metrics: super::metrics::Metrics,
    /// `/metrics` answers without the API token (`--metrics-public`).
    pub metrics_public: AtomicBool,
}

/// Read a secret file, or create it with `make()` and mode 0600.
fn secret_file(path: &std::path::Path, make: impl FnOnce() -> String) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let s = make();
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            f.write_all(s.as_bytes())?;
            f.write_all(b"\n")?;
            Ok(s)
        }
        Err(e) => Err(e),
    }
}

/// Give `path` mode `mode` if it exists.
fn restrict(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Controller {
    /// Open the data dir (creating it, its key and API token on first start, all private to this
    /// user) and load state.
    pub fn open(data: PathBuf, ex: Arc<Executor<'static>>, timing: Timing) -> Result<Arc<Self>, String> {
        Self::open_with(data, ex, timing, Vec::new())
    }

    /// [`Controller::open`] with clouds that dispatch may ask for agents.
    pub fn open_with(
        data: PathBuf,
        ex: Arc<Executor<'static>>,
        timing: Timing,
        clouds: Vec<Arc<dyn Cloud>>,
    ) -> Result<Arc<Self>, String> {
        logs::create_private_dir(&data.join("builds"))
            .and_then(|_| restrict(&data, 0o700))
            .map_err(|e| format!("cannot create {}: {e}", data.display()))?;
        let data =
            std::fs::canonicalize(&data).map_err(|e| format!("cannot open {}: {e}", data.display()))?;
        let key = secret_file(&data.join("secret.key"), || crate::auth::hex(&crate::auth::random_nonce()))
            .map_err(|e| format!("controller key in {}: {e}", data.display()))?;
        let token = secret_file(&data.join("token"), || crate::auth::hex(&crate::auth::random_nonce()))
            .map_err(|e| format!("API token in {}: {e}", data.display()))?;
        let store = Store::open(&data).map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => format!(
                "another controller is using the data dir {} (its store is locked): stop it first, or \
                     give this one another --data",
                data.display()
            ),
            _ => format!("cannot open the store in {}: {e}", data.display()),
        })?;
        for f in ["wisp.db", "wisp.db-wal", "wisp.db-shm", "builds"] {
            let mode = if f == "builds" { 0o700 } else { 0o600 };
            restrict(&data.join(f), mode).map_err(|e| format!("cannot restrict {f}: {e}"))?;
        }
        let id = secret_file(&data.join("controller-id"), || {
            crate::auth::hex(&crate::auth::random_nonce())[..12].to_string()
        })
        .map_err(|e| format!("controller id in {}: {e}", data.display()))?;
        let mut state = State { clouds, ..Default::default() };
        for rec in store.nodes().map_err(|e| format!("store: {e}"))? {
            state.nodes.insert(Node::new(rec));
        }
        let unfinished = store.unfinished_builds().map_err(|e| format!("store: {e}"))?;
        let mut steps_of = HashMap::new();
        for b in unfinished.iter().filter(|b| b.state == BuildState::Running) {
            steps_of.insert(b.id, store.steps(b.id).map_err(|e| format!("store: {e}"))?);
        }
        let store = StoreThread::spawn(store).map_err(|e| format!("cannot start the store thread: {e}"))?;
        let deadlines = super::deadlines::Deadlines::new();
        ex.spawn(deadlines.clone().run()).detach();
        let ctl = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            pod_clouds: Mutex::new(Vec::new()),
            logs: Logs::new(&data),
            data,
            key: key.into_bytes(),
            token: Mutex::new(token),
            store,
            steps: StepTable::default(),
            state: Mutex::new(state),
            cloud_tasks: Mutex::new(HashMap::new()),
            dial: OnceLock::new(),
            id,
            failures: Failures::default(),
            noisy: Noisy::default(),
            ex,
            deadlines,
            addrs: OnceLock::new(),
            timing,
            next_session: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            stop: Event::new(),
            web: super::web::Web::default(),
            metrics: super::metrics::Metrics::default(),
            metrics_public: AtomicBool::new(false),
        });
        ctl.recover(unfinished, steps_of)?;
        Ok(ctl)
    }

    /// Pick up builds that were queued or running when the controller stopped: each goes on
    /// from what the store says of its steps (ended ones are not run again); a running step's
    /// agent resumes it within the grace (its handle is opened here, before any agent can
    /// reconnect).
    fn recover(
        self: &Arc<Self>,
        unfinished: Vec<BuildRecord>,
        mut steps_of: HashMap<u64, Vec<StepRecord>>,
    ) -> Result<(), String> {
        for b in unfinished {
            let params = store::decode_params(&b.params);
            let planned = pipeline::parse(&b.yaml).and_then(|p| p.plan_with(&params).map(|plan| (p, plan)));
            let (p, plan) = match planned {
                Ok(x) => x,
                Err(e) => {
                    let m = format!("{e}");
                    self.store_later(move |s| s.finish_build(b.id, BuildState::Failure, &m));
                    continue;
                }
            };
            let live = Arc::new(LiveBuild::new(b.id, p, plan));
            live.mark_recovered();
            let mut memo = runner::Memo::default();
            for r in steps_of.remove(&b.id).unwrap_or_default() {
                if r.state == StepState::Running {
                    let node = r.node.clone().or_else(|| b.node.clone()).unwrap_or_default();
                    if self.state().nodes.contains_key(&node) {
                        let packs = live.plan.step(r.origin.unwrap_or(r.index)).is_some_and(|p| {
                            matches!(p.kind, pipeline::Kind::Stash { .. } | pipeline::Kind::Archive { .. })
                        });
                        let path = if packs {
                            super::archives::pack_path(self, b.id, r.index)
                        } else {
                            self.logs.step_path(b.id, r.index)
                        };
                        let log = logs::StepLog::open(path.clone())
                            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                        let offset = log.stored();
                        memo.handles.insert(r.index, self.steps.open(&live, r.index, &node, log, true));
                        log::info!(
                            "build {} step {}: was running on node {node} when the controller stopped; \
                             {offset} bytes stored, waiting for the agent to resume it",
                            b.id,
                            r.index
                        );
                    }
                }
                memo.rows.insert(r.index, r);
            }
            log::info!("build {}: picked up after restart ({})", b.id, b.state.as_str());
            self.state().builds.insert(b.id, live.clone());
            self.ex.spawn(runner::run_build(self.clone(), live, memo)).detach();
        }
        Ok(())
    }

    /// This controller as an `Arc`.
    pub(super) fn arc(&self) -> Arc<Self> {
        self.me.upgrade().expect("the controller is alive while its methods run")
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run a store write that must land: while it fails (a full disk) it is retried every
    /// [`STORE_RETRY`], and `build` shows why it stalls.
    pub async fn store_must<T: Send + 'static>(
        &self,
        build: &LiveBuild,
        f: impl Fn(&mut Store) -> store::Result<T> + Send + Sync + 'static,
    ) -> T {
        let f = Arc::new(f);
        let mut failing = false;
        let out = loop {
            let g = f.clone();
            match self.store.call(move |s| g(s)).await {
                Ok(v) => break v,
                Err(e) => {
                    if !failing {
                        let why = if store::is_disk_full(&e) {
                            format!("disk full on the controller: cannot write the store ({e})")
                        } else {
                            format!("cannot write the store on the controller ({e})")
                        };
                        log::error!("build {}: {why}; retrying every {}s", build.id, STORE_RETRY.as_secs());
                        build.set_stalled(Some(why));
                        failing = true;
                    }
                    smol::Timer::after(STORE_RETRY).await;
                }
            }
        };
        if failing {
            log::info!("build {}: the store takes writes again", build.id);
            build.set_stalled(None);
        }
        out
    }

    /// Queue a store write from sync code, logging a failure.
    fn store_later(&self, f: impl FnOnce(&mut Store) -> store::Result<()> + Send + 'static) {
        let store = self.store.clone();
        self.ex
            .spawn(async move {
                if let Err(e) = store.call(f).await {
                    log::error!("store: {e}");
                }
            })
            .detach();
    }

    /// The node's secret.
    pub fn secret(&self, node: &str) -> String {
        crate::auth::node_secret(&self.key, node)
    }

    /// The secret of an existing node, None if there is no such node.
    pub fn secret_if_known(&self, node: &str) -> Option<String> {
        self.state().nodes.contains_key(node).then(|| self.secret(node))
    }

    /// Replace the API token with a new random one, kept in `DATA/token` (mode 0600); returns it.
    pub async fn rotate_token(&self) -> Result<String, ApiError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let new = crate::auth::hex(&crate::auth::random_nonce());
        let (path, tmp) = (self.data.join("token"), self.data.join("token.tmp"));
        let line = format!("{new}\n");
        let p = path.clone();
        smol::unblock(move || {
            let _ = std::fs::remove_file(&tmp);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .and_then(|_| std::fs::rename(&tmp, &p))
        })
        .await
        .map_err(|e| ApiError::new(500, format!("cannot write {}: {e}", path.display())))?;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = new.clone();
        // Sessions were opened with the old token: they end with it.
        self.web.close_all();
        log::info!("API token rotated");
        Ok(new)
    }

    /// True if `token` is the API token (constant time).
    pub fn token_ok(&self, token: &str) -> bool {
        let t = self.token.lock().unwrap_or_else(|e| e.into_inner());
        crate::auth::constant_time_eq(t.as_bytes(), token.as_bytes())
    }

    /// A fresh link id.
    pub fn session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Add a node.
    pub async fn add_node(self: &Arc<Self>, rec: NodeRecord) -> Result<(), ApiError> {
        if self.state().nodes.contains_key(&rec.name) {
            return Err(ApiError::new(409, format!("a node named '{}' already exists", rec.name)));
        }
        let r = rec.clone();
        self.store.call(move |s| s.add_node(&r)).await.map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => {
                ApiError::new(409, format!("a node named '{}' already exists", rec.name))
            }
            _ => e.into(),
        })?;
        log::info!(
            "node {}: added (labels: {}, executors: {}, origin: {})",
            rec.name,
            rec.labels.join(" "),
            rec.executors,
            rec.origin
        );
        self.state().nodes.insert(Node::new(rec));
        self.dispatch();
        Ok(())
    }

    /// Remove a node (its link, if any, is closed).
    pub async fn remove_node(&self, name: &str) -> Result<(), ApiError> {
        if !self.state().nodes.contains_key(name) {
            return Err(ApiError::new(404, format!("no node named '{name}'")));
        }
        let n = name.to_string();
        self.store.call(move |s| s.remove_node(&n)).await?;
        let (node, cloud) = {
            let mut st = self.state();
            let node = st.nodes.remove(name);
            let origin = node.as_ref().map(|n| n.rec.origin.clone()).unwrap_or_default();
            (node, st.clouds.iter().find(|c| c.name() == origin).cloned())
        };
        if let Some(c) = node.and_then(|n| n.conn) {
            c.shut();
        }
        if let Some(c) = cloud {
            self.ex.spawn(c.node_removed(name.to_string())).detach();
        }
        log::info!("node {name}: removed");
        self.wake_builds();
        Ok(())
    }

    /// Every node as the web page shows it.
    pub fn node_views(&self) -> Vec<NodeView> {
        let waiting: HashMap<String, usize> = {
            let mut m = HashMap::new();
            for s in self.steps.all_started() {
                *m.entry(s).or_default() += 1;
            }
            m
        };
        let st = self.state();
        st.nodes
            .values()
            .map(|n| NodeView {
                rec: n.rec.clone(),
                busy: n.busy,
                online: n.conn.is_some(),
                websocket: n.conn.as_ref().map_or(n.rec.websocket, |c| c.websocket),
                rtt_us: n.conn.as_ref().map(|c| c.rtt_us.load(Ordering::Relaxed)).filter(|r| *r > 0),
                ever_online: n.ever_online,
                changed: n.changed,
                since: n.since,
                held_steps: if n.conn.is_none() { waiting.get(&n.rec.name).copied().unwrap_or(0) } else { 0 },
                peer: n.conn.as_ref().map(|c| c.peer.clone()),
                agent: agent_of(n),
            })
            .collect()
    }

    /// Nodes with their live status.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.state().nodes.values().map(NodeStatus::of).collect()
    }

    /// One node with its live status.
    pub fn node_status(&self, name: &str) -> Option<NodeStatus> {
        self.state().nodes.get(name).map(NodeStatus::of)
    }

    /// The record of one node.
    pub fn node(&self, name: &str) -> Option<NodeRecord> {
        self.state().nodes.get(name).map(|n| n.rec.clone())
    }

    /// The node's current link, if any.
    pub fn session_of(&self, node: &str) -> Option<Arc<Session>> {
        self.state().nodes.get(node).and_then(|n| n.conn.clone())
    }

    /// Send `out` on the node's current link, if it has one (a frame for a step whose agent is
    /// away is not needed: the reconnect settles credit and acks).
    pub async fn send_to(&self, node: &str, frame: crate::proto::Frame<'static>) {
        if let Some(s) = self.session_of(node) {
            let _ = s.tx.send(Out::Frame(frame)).await;
        }
    }

    /// Make `session` the node's link, unless the node is gone or `old` is no longer its link.
    pub fn attach(self: &Arc<Self>, session: &Arc<Session>, old: Option<&Arc<Session>>) -> bool {
        {
            let mut st = self.state();
            let attached = st.nodes.update(&session.node, |node| {
                let current = node.conn.as_ref().map(|c| c.id);
                if current != old.map(|c| c.id) {
                    return false;
                }
                node.conn = Some(session.clone());
                node.offline_since = None;
                node.changed = Some(std::time::SystemTime::now());
                if node.ever_online {
                    self.metrics.reconnected();
                }
                node.ever_online = true;
                true
            });
            if attached != Some(true) {
                return false;
            }
        }
        log::info!("node {}: online (link {} from {})", session.node, session.id, session.peer);
        self.cloud_node_connected(&session.node);
        self.wake_builds();
        self.dispatch();
        true
    }

    /// Wake every live build's task (a node came or went).
    pub(super) fn wake_builds(&self) {
        let builds: Vec<_> = self.state().builds.values().cloned().collect();
        for b in builds {
            b.changed.notify(usize::MAX);
        }
    }

    /// Since when `node` has been offline: `Some(None)` while online, None if there is no such
    /// node.
    pub fn offline_since(&self, node: &str) -> Option<Option<Instant>> {
        let st = self.state();
        let n = st.nodes.get(node)?;
        Some(if n.conn.is_some() { None } else { Some(n.offline_since.unwrap_or_else(Instant::now)) })
    }

    /// Forget `session` as its node's link. Its running steps wait for the agent to come back
    /// (up to the grace). The node counts as offline from the last frame its agent sent, not
    /// from when the controller noticed.
    pub fn detach(&self, session: &Arc<Session>, why: &str) {
        let running = self.steps.started_on(&session.node);
        {
            let mut st = self.state();
            let grace = self.timing.agent_grace;
            st.nodes.update(&session.node, |node| {
                if node.conn.as_ref().is_some_and(|c| c.id == session.id) {
                    node.conn = None;
                    node.offline_since = Some(session.last_heard());
                    node.changed = Some(std::time::SystemTime::now());
                    log::info!("node {}: offline ({why})", session.node);
                    for s in &running {
                        log::info!(
                            "build {} step {}: agent '{}' is away; waiting up to {}s for it to resume",
                            s.build,
                            s.step,
                            session.node,
                            grace.as_secs()
                        );
                    }
                }
            });
        }
        self.wake_builds();
    }

    /// A reconnected agent's list of the steps it holds: which to resume and which to abandon.
    pub fn reconcile(&self, node: &str, held: &[(u64, u32, u64)]) -> Reconciled {
        let away = self.offline_since(node).flatten().map(|t| t.elapsed());
        session::reconcile(node, held, &self.steps.started_on(node), away)
    }

    /// Queue a pipeline with parameter values `params`; returns the build number. A large
    /// pipeline is parsed off the executor.
    pub async fn submit(
        self: &Arc<Self>,
        yaml: String,
        params: Vec<(String, String)>,
    ) -> Result<u64, ApiError> {
        let plan = move |yaml: String| {
            let r = pipeline::parse(&yaml).and_then(|p| p.plan_with(&params).map(|plan| (p, plan)));
            (r, yaml)
        };
        let (r, yaml) =
            if yaml.len() <= INLINE_PARSE { plan(yaml) } else { smol::unblock(move || plan(yaml)).await };
        let (p, plan) = r.map_err(|e| ApiError::new(400, e.to_string()))?;
        let name = p.name.clone();
        let params = store::encode_params(&plan.params);
        let rows: Vec<(String, String, bool)> =
            plan.steps.iter().map(|s| (s.step.name.clone(), s.stage.clone(), s.skipped)).collect();
        let id = self
            .store
            .call(move |s| {
                let steps: Vec<store::NewStep<'_>> = rows
                    .iter()
                    .map(|(n, st, sk)| store::NewStep { name: n, stage: st, skipped: *sk })
                    .collect();
                s.insert_build(&name, &yaml, &params, &steps)
            })
            .await?;
        log::info!("build {id}: queued ({}, label '{}')", p.name, p.label.as_deref().unwrap_or(""));
        let live = Arc::new(LiveBuild::new(id, p, plan));
        self.state().builds.insert(id, live.clone());
        self.ex.spawn(runner::run_build(self.clone(), live, runner::Memo::default())).detach();
        Ok(id)
    }

    /// Queue unit `unit` of `build`: the receiver gets the node dispatch gives it (its busy
    /// count raised), or why none will come.
    pub(super) fn request_unit(
        self: &Arc<Self>,
        build: &LiveBuild,
        unit: u32,
        expr: crate::controller::labels::LabelExpr,
        inline: Option<crate::controller::template::PodTemplate>,
    ) -> smol::channel::Receiver<Result<String, String>> {
        let (tx, rx) = smol::channel::bounded(1);
        {
            let mut st = self.state();
            st.queue.push_unit(build.id, unit, expr, inline.map(Arc::new));
            st.waiters.insert((build.id, unit), tx);
        }
        self.dispatch();
        rx
    }

    /// Take a queued unit out; false when dispatch already gave it a node.
    pub(super) fn withdraw_unit(&self, build: u64, unit: u32) -> bool {
        let mut st = self.state();
        let was = st.queue.remove_unit(build, unit);
        if was {
            st.waiters.remove(&(build, unit));
        }
        was
    }

    /// Take an executor of `node` (a build picked up after a restart goes on where it was);
    /// false when there is no such node.
    pub(super) fn reserve_known(&self, node: &str) -> bool {
        self.state().nodes.update(node, |n| n.busy += 1).is_some()
    }

    /// Whether `node` is gone (removed, or its pod deleted or failed): a step that ended as
    /// lost there lost its agent.
    pub(super) fn node_lost(&self, node: &str) -> bool {
        let st = self.state();
        match st.nodes.get(node) {
            None => true,
            Some(n) => n.conn.is_none(),
        }
    }

    /// The live build, if queued or running.
    pub fn live(&self, id: u64) -> Option<Arc<LiveBuild>> {
        self.state().builds.get(&id).cloned()
    }

    /// Why a queued build waits or a running one stalls, for people; None if it does neither.
    pub fn waiting(&self, id: u64) -> Option<String> {
        let st = self.state();
        if let Some(why) = st.queue.why(id, &st.nodes) {
            return Some(why);
        }
        st.builds.get(&id).and_then(|b| b.stalled())
    }

    /// A build's record.
    pub async fn build(&self, id: u64) -> Result<BuildRecord, ApiError> {
        // Build numbers are SQLite row ids: none is above i64::MAX.
        if id > i64::MAX as u64 {
            return Err(ApiError::new(404, format!("no build #{id}")));
        }
        self.store
            .call(move |s| s.build(id))
            .await?
            .ok_or_else(|| ApiError::new(404, format!("no build #{id}")))
    }

    /// A build's record and its steps, in one store call.
    pub async fn build_with_steps(&self, id: u64) -> Result<(BuildRecord, Vec<StepRecord>), ApiError> {
        if id > i64::MAX as u64 {
            return Err(ApiError::new(404, format!("no build #{id}")));
        }
        let (b, steps) =
            self.store.call(move |s| Ok::<_, rusqlite::Error>((s.build(id)?, s.steps(id)?))).await?;
        let b = b.ok_or_else(|| ApiError::new(404, format!("no build #{id}")))?;
        Ok((b, steps))
    }

    /// The newest `limit` builds, newest first.
    pub async fn builds(&self, limit: u32) -> Result<Vec<BuildRecord>, ApiError> {
        Ok(self.store.call(move |s| s.builds(limit)).await?)
    }

    /// What the overview shows live: the first `limit` queued builds and the running ones.
    pub fn activity(&self, limit: usize) -> Activity {
        let st = self.state();
        let queued = st.queue.ids(limit).into_iter().map(|id| (id, st.queue.why(id, &st.nodes))).collect();
        let mut running: Vec<u64> = st.builds.keys().copied().filter(|id| !st.queue.contains(*id)).collect();
        running.sort_unstable();
        Activity { queued, running, queue_len: st.queue.len() }
    }

    /// A page of final builds (on `node`), newest first, below `before`.
    pub async fn finished_builds(
        &self,
        node: Option<String>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<BuildRecord>, ApiError> {
        Ok(self.store.call(move |s| s.finished_builds(node.as_deref(), before, limit)).await?)
    }

    /// The builds numbered `ids` (those that exist).
    pub async fn builds_by_id(&self, ids: Vec<u64>) -> Result<Vec<BuildRecord>, ApiError> {
        Ok(self.store.call(move |s| s.builds_by_id(&ids)).await?)
    }

    /// A build's steps.
    pub async fn build_steps(&self, id: u64) -> Result<Vec<StepRecord>, ApiError> {
        Ok(self.store.call(move |s| s.steps(id)).await?)
    }

    /// Cancel a queued or running build: its queued units are withdrawn, its running steps
    /// stopped; its runner ends it (after any `post: aborted` steps).
    pub async fn cancel(self: &Arc<Self>, id: u64) -> Result<(), ApiError> {
        let found = {
            let mut st = self.state();
            match st.builds.get(&id).cloned() {
                None => None,
                Some(b) => {
                    for unit in st.queue.units_of(id) {
                        st.queue.remove_unit(id, unit);
                        if let Some(tx) = st.waiters.remove(&(id, unit)) {
                            let _ = tx.try_send(Err("cancelled while queued".into()));
                        }
                    }
                    Some(b)
                }
            }
        };
        let Some(b) = found else {
            let rec = self.build(id).await?;
            return Err(ApiError::new(409, format!("build #{id} already finished ({})", rec.state.as_str())));
        };
        log::info!("build {id}: cancel requested");
        b.cancel();
        Ok(())
    }

    /// Start every queued build that has a matching node with a free executor, oldest first, and
    /// ask clouds for agents where no node can take a build.
    pub fn dispatch(self: &Arc<Self>) {
        let mut runs = Vec::new();
        let mut asks = Vec::new();
        let mut fails = Vec::new();
        let started = Instant::now();
        {
            let mut st = self.state();
            let st = &mut *st;
            for d in st.queue.dispatch(&mut st.nodes, &st.clouds) {
                match d {
                    Decision::Run { build, unit, node } => match st.waiters.remove(&(build, unit)) {
                        Some(tx) => runs.push((st.builds.get(&build).cloned(), tx, node)),
                        None => {
                            st.nodes.update(&node, |n| n.busy = n.busy.saturating_sub(1));
                        }
                    },
                    Decision::Provision { build, unit: _, cloud, node } => asks.push((build, cloud, node)),
                    Decision::Fail { build, unit, message } => {
                        fails.extend(st.waiters.remove(&(build, unit)).map(|tx| (tx, message)))
                    }
                }
            }
        }
        self.metrics.dispatch_pass(started.elapsed());
        for (b, tx, node) in runs {
            if let Some(b) = &b {
                self.metrics.dispatched(b.queued_at.elapsed());
            }
            if tx.try_send(Ok(node.clone())).is_err() {
                self.state().nodes.update(&node, |n| n.busy = n.busy.saturating_sub(1));
            }
        }
        for (build, cloud, node) in asks {
            log::info!("build {build}: cloud '{}' reserved node {node} for it", cloud.name());
            let host: Arc<dyn cloud::Host> = self.clone();
            self.ex.spawn(cloud.launch(node, build, host)).detach();
        }
        for (tx, message) in fails {
            let _ = tx.try_send(Err(message));
        }
    }

    /// Count a build's final record into the metrics.
    pub(super) fn count_final(&self, b: &BuildRecord) {
        let ran = match (b.started, b.finished) {
            (Some(s), Some(f)) => Some(Duration::from_secs((f - s).max(0) as u64)),
            _ => None,
        };
        self.metrics.build_ended(b.state.as_str(), ran);
    }

    /// What a scrape of `/metrics` gets.
    pub fn metrics_text(&self) -> String {
        let snap = {
            let st = self.state();
            let mut s = super::metrics::Snapshot {
                online_ws: 0,
                online_tcp: 0,
                offline: 0,
                busy: 0,
                executors: 0,
                queued: 0,
            };
            for n in st.nodes.values() {
                match &n.conn {
                    Some(c) if c.websocket => s.online_ws += 1,
                    Some(_) => s.online_tcp += 1,
                    None => s.offline += 1,
                }
                if n.conn.is_some() {
                    s.busy += i64::from(n.busy);
                    s.executors += i64::from(n.rec.executors);
                }
            }
            s.queued = st.queue.len() as i64;
            s
        };
        self.metrics.render(snap)
    }

    /// A queued unit cannot get a node (its pod failed to start): its runner is told why.
    pub(super) fn fail_unit(&self, build: u64, unit: u32, message: String) {
        if let Some(tx) = self.state().waiters.remove(&(build, unit)) {
            let _ = tx.try_send(Err(message));
        }
    }

    /// A build unit is done with `node`: free its executor, tell the node's cloud (which may
    /// delete its pod), and dispatch again.
    pub fn release_unit(self: &Arc<Self>, build: &LiveBuild, node: &str, failed: bool) {
        let after = {
            let mut st = self.state();
            let origin = st.nodes.get(node).map(|n| n.rec.origin.clone()).unwrap_or_default();
            let after = st
                .clouds
                .iter()
                .find(|c| c.name() == origin)
                .map(|c| (c.clone(), c.build_ended(node, failed)));
            if let Some((_, cloud::AfterBuild::Release)) = &after {
                // Taken out of dispatch before its executor is freed.
                st.nodes.update(node, |n| n.rec.executors = 0);
            }
            st.nodes.update(node, |n| n.busy = n.busy.saturating_sub(1));
            after
        };
        if let Some((c, after)) = after {
            let host: Arc<dyn cloud::Host> = self.clone();
            let fut = match after {
                cloud::AfterBuild::Reuse => c.idle(node.to_string(), host),
                cloud::AfterBuild::Release => c.release(node.to_string(), host),
            };
            self.ex.spawn(fut).detach();
        }
        build.changed.notify(usize::MAX);
        self.dispatch();
    }

    /// A build's runner is done: it is no longer live.
    pub fn build_ended(self: &Arc<Self>, build: &LiveBuild) {
        {
            let mut st = self.state();
            st.builds.remove(&build.id);
            for unit in st.queue.units_of(build.id) {
                st.queue.remove_unit(build.id, unit);
                st.waiters.remove(&(build.id, unit));
            }
        }
        build.changed.notify(usize::MAX);
        self.dispatch();
    }

    /// Stop: accept loops end, every link is closed, the store thread ends once its queue is done.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify(usize::MAX);
        let sessions: Vec<_> = self.state().nodes.values().filter_map(|n| n.conn.clone()).collect();
        for s in sessions {
            s.shut();
        }
        self.store.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::cloud::testing::TestCloud;

    pub(crate) fn timing() -> Timing {
        Timing {
            ping_interval: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(10),
            agent_grace: Duration::from_secs(300),
        }
    }

    #[test]
    fn a_store_write_that_fails_for_a_full_disk_is_retried_and_the_build_shows_why() {
        use std::sync::atomic::AtomicU32;
        let dir = std::env::temp_dir().join(format!("wisp-must-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ex = Arc::new(Executor::new());
        let ctl = Controller::open(dir.clone(), ex.clone(), timing()).unwrap();
        let p = pipeline::parse("name: p\nsteps: [{sh: 'true'}]\n").unwrap();
        let plan = p.plan.clone();
        let build = Arc::new(LiveBuild::new(1, p, plan));
        let tries = Arc::new(AtomicU32::new(0));
        let t = tries.clone();
        let b = build.clone();
        smol::block_on(ex.run(async {
            let write = ctl.store_must(&build, move |_| {
                if t.fetch_add(1, Ordering::SeqCst) < 2 {
                    let full = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL);
                    return Err(rusqlite::Error::SqliteFailure(full, None));
                }
                Ok(())
            });
            let watch = async {
                while b.stalled().is_none() {
                    smol::Timer::after(Duration::from_millis(5)).await;
                }
                b.stalled().unwrap()
            };
            let (why, ()) = smol::future::zip(watch, write).await;
            assert!(why.starts_with("disk full on the controller: cannot write the store"), "{why}");
        }));
        assert_eq!(tries.load(Ordering::SeqCst), 3, "retried until it landed");
        assert_eq!(build.stalled(), None, "the stall is cleared once the write lands");
        ctl.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dispatch_asks_a_cloud_and_its_node_is_kept_in_memory_until_its_agent_connects() {
        let dir = std::env::temp_dir().join(format!("wisp-cloud-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ex = Arc::new(Executor::new());
        let cloud = TestCloud::new("pods", 1);
        let ctl = Controller::open_with(dir.clone(), ex.clone(), timing(), vec![cloud.clone()]).unwrap();
        smol::block_on(ex.run(async {
            let id = ctl
                .submit("name: p\nagent: {label: pods}\nsteps: [{sh: 'true'}]\n".into(), Vec::new())
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while cloud.launched.lock().unwrap().is_empty() {
                assert!(Instant::now() < deadline, "the cloud was not asked");
                smol::Timer::after(Duration::from_millis(10)).await;
            }
            assert_eq!(cloud.launched.lock().unwrap()[0], ("pods-1".to_string(), id));
            assert_eq!(ctl.node("pods-1").unwrap().origin, "test");
            // Not stored until its agent connects.
            let stored = ctl.store.call(|s| s.nodes()).await.unwrap();
            assert!(stored.is_empty(), "{stored:?}");
            // Its agent has not connected yet: the build says so.
            assert_eq!(
                ctl.waiting(id).unwrap(),
                "waiting for cloud 'test' to start an agent for 'pods' (pod pods-1)"
            );
            // A start that fails fails the build it was for, with the reason.
            use crate::controller::cloud::Host;
            ctl.fail_queued("pods-1", "image cannot be pulled".into());
            while ctl.live(id).is_some() {
                assert!(Instant::now() < deadline, "the build did not fail");
                smol::Timer::after(Duration::from_millis(10)).await;
            }
            let b = ctl.build(id).await.unwrap();
            assert_eq!((b.state, b.message.as_str()), (BuildState::Failure, "image cannot be pulled"));
        }));
        ctl.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
