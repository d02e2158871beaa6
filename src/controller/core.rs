//! The controller's live state: nodes and their links, the queue, dispatch, and the task that
//! runs each build step by step on its node.

use super::labels::LabelExpr;
use super::nodes::{Node, Nodes};
use super::pipeline::{self, Pipeline};
use super::store::{BuildRecord, BuildState, NodeRecord, Store};
use crate::proto::ExitStatus;
use event_listener::Event;
use smol::channel::{bounded, Receiver, Sender};
use smol::Executor;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Output bytes an agent may send per step before the controller grants more: enough to keep a
/// loopback link busy, small enough that a stalled controller holds the step's pipe, not memory.
pub const STEP_CREDIT: u32 = 256 * 1024;
/// How long a cancelled step's Exit may take before the build is ended without it.
pub const CANCEL_WAIT: Duration = Duration::from_secs(15);
/// Default time a running build waits for its disconnected agent before failing with "agent lost".
pub const AGENT_GRACE: Duration = Duration::from_secs(300);

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
        Self::new(500, format!("store error: {e}"))
    }
}

/// A frame the controller sends to an agent, owned so it can wait in a link's queue.
#[derive(Debug)]
pub enum Out {
    /// Run a step.
    StepStart {
        /// Build number.
        build: u64,
        /// Step index.
        step: u32,
        /// Workspace directory name.
        workspace: String,
        /// The step.
        spec: pipeline::Step,
    },
    /// More output credit, and how much output is stored.
    Credit {
        /// Build number.
        build: u64,
        /// Step index.
        step: u32,
        /// Bytes.
        bytes: u32,
        /// Output stored so far.
        stored: u64,
    },
    /// Go on with a step after a reconnect, from `offset`.
    Resume {
        /// Build number.
        build: u64,
        /// Step index.
        step: u32,
        /// Output bytes stored.
        offset: u64,
    },
    /// Forget a step the controller gave up.
    Abandon {
        /// Build number.
        build: u64,
        /// Step index.
        step: u32,
    },
    /// Output stored up to an offset.
    Ack {
        /// Build number.
        build: u64,
        /// Step index.
        step: u32,
        /// Offset.
        offset: u64,
    },
    /// Kill a step.
    Cancel {
        /// Build number.
        build: u64,
        /// Step index.
        step: u32,
    },
    /// Liveness check.
    Ping(u64),
    /// Answer to the agent's ping.
    Pong(u64),
    /// Refuse and close (the message is for the agent's log).
    Close(String),
}

/// What to tell a reconnected agent about the steps it holds.
pub struct Reconciled {
    /// Go on from the stored offset: (build, step, offset).
    pub resume: Vec<(u64, u32, u64)>,
    /// Kill and forget: (build, step).
    pub abandon: Vec<(u64, u32)>,
}

/// How a step ended, as the build task learns it.
#[derive(Debug)]
pub enum StepEnd {
    /// The agent reported an exit.
    Exit(ExitStatus, String),
    /// The link to the agent went away.
    Lost(String),
}

/// Where a running step's output goes. Sinks belong to the controller, not to a link: a step
/// outlives the link it started on.
pub struct Sink {
    /// The node the step runs on.
    pub node: String,
    /// The StepStart went out (the agent may hold the step).
    pub started: bool,
    /// The step's log file.
    pub file: LogFile,
    /// Bytes stored so far.
    pub offset: u64,
    /// Tells the build task the step ended.
    pub done: Sender<StepEnd>,
    /// The build, to wake its followers.
    pub build: Arc<LiveBuild>,
}

/// A step's log file, made when its first byte arrives: a step with no output costs no
/// directory and no file (the readers treat a missing file as an empty log).
pub struct LogFile {
    path: PathBuf,
    file: Option<File>,
}

impl LogFile {
    /// The log at `path`; nothing is created yet. Returns it and the bytes it already holds (a
    /// controller restarted mid-step appends to what it had stored).
    pub fn open(path: PathBuf) -> std::io::Result<(Self, u64)> {
        match std::fs::metadata(&path) {
            Ok(m) => Ok((Self { path, file: None }, m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Self { path, file: None }, 0)),
            Err(e) => Err(e),
        }
    }

    /// A new, empty log at `path`: a file left by an earlier start of the step (a restart found it
    /// pending) is removed; nothing is created yet.
    pub fn create(path: PathBuf) -> std::io::Result<Self> {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(Self { path, file: None }),
        }
    }

    /// Append bytes, making the file (and its build directory) on first use.
    pub fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = std::fs::OpenOptions::new().append(true).create(true).open(&self.path)?;
            self.file = Some(f);
        }
        self.file.as_mut().expect("opened above").write_all(data)
    }
}

/// One authenticated agent link.
pub struct Conn {
    /// Unique per controller run.
    pub id: u64,
    /// Node name.
    pub node: String,
    /// Peer address, for logs.
    pub peer: String,
    /// Frames to send (bounded: a stuck agent blocks its own producers, nothing grows).
    pub tx: Sender<Out>,
    /// Id of the last Pong received.
    pub last_pong: AtomicU64,
    /// Fires on every Pong.
    pub pong: Event,
    /// When the last frame came from the agent, in ms on [`millis`]'s clock.
    pub last_frame: AtomicU64,
    /// Set when the link is closed for its silence.
    pub silent: AtomicBool,
    /// Set when the link is to be closed.
    pub closing: AtomicBool,
    /// Fires when `closing` is set.
    pub close: Event,
}

/// Milliseconds since this was first called: a clock that fits in an atomic.
pub fn millis() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Conn {
    /// Ask the link to close.
    pub fn shut(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.close.notify(usize::MAX);
    }

    /// True if the agent answers a ping within `wait`.
    pub async fn is_alive(&self, wait: Duration) -> bool {
        let id = u64::from_be_bytes(crate::auth::random_nonce()[..8].try_into().unwrap()) | 1;
        if self.tx.try_send(Out::Ping(id)).is_err() {
            return false;
        }
        let deadline = std::time::Instant::now() + wait;
        loop {
            let listener = self.pong.listen();
            if self.last_pong.load(Ordering::SeqCst) == id {
                return true;
            }
            let timed_out = smol::future::or(
                async {
                    listener.await;
                    false
                },
                async {
                    smol::Timer::at(deadline).await;
                    true
                },
            )
            .await;
            if timed_out {
                return self.last_pong.load(Ordering::SeqCst) == id;
            }
        }
    }
}

/// A queued or running build.
pub struct LiveBuild {
    /// Build number.
    pub id: u64,
    /// The parsed pipeline.
    pub pipeline: Pipeline,
    /// Set by `wisp cancel`.
    pub cancelled: AtomicBool,
    /// Fires on step changes, cancels, node changes and the end of the build (wakes the runner,
    /// waiters and followers).
    pub changed: Event,
    /// Fires on each piece of output stored (wakes log followers only: a waiter for the result has
    /// no business waking per output frame).
    pub output: Event,
    /// Steps finished so far.
    pub steps_done: AtomicU32,
}

#[derive(Default)]
struct State {
    nodes: Nodes,
    queue: VecDeque<u64>,
    builds: HashMap<u64, Arc<LiveBuild>>,
}

/// The controller.
pub struct Controller {
    /// Data directory.
    pub data: PathBuf,
    key: Vec<u8>,
    token: Mutex<String>,
    store: Mutex<Store>,
    state: Mutex<State>,
    /// Runs every task of the controller.
    pub ex: Arc<Executor<'static>>,
    /// Deadlines of HTTP requests (header timeouts, `?wait`) and of agent links' keepalive, on
    /// one timer.
    pub deadlines: Arc<super::deadlines::Deadlines>,
    /// Bound addresses (HTTP, agent port), once listening.
    pub addrs: OnceLock<(SocketAddr, SocketAddr)>,
    /// How often each side pings the other.
    pub ping_interval: Duration,
    /// How long a new agent link may take to authenticate.
    pub handshake_timeout: Duration,
    /// How long a running build waits for its disconnected agent.
    pub agent_grace: Duration,
    /// Output sinks of the steps that are running, by (build, step).
    steps: Mutex<HashMap<(u64, u32), Sink>>,
    next_conn: AtomicU64,
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

impl Controller {
    /// Open the data dir (creating it, its key and API token on first start) and load state.
    pub fn open(data: PathBuf, ex: Arc<Executor<'static>>, timing: Timing) -> Result<Arc<Self>, String> {
        std::fs::create_dir_all(data.join("builds"))
            .map_err(|e| format!("cannot create {}: {e}", data.display()))?;
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
        let mut state = State::default();
        for rec in store.nodes().map_err(|e| format!("store: {e}"))? {
            state.nodes.insert(Node::new(rec));
        }
        let deadlines = super::deadlines::Deadlines::new();
        ex.spawn(deadlines.clone().run()).detach();
        let ctl = Arc::new(Self {
            data,
            key: key.into_bytes(),
            token: Mutex::new(token),
            store: Mutex::new(store),
            state: Mutex::new(state),
            ex,
            deadlines,
            addrs: OnceLock::new(),
            ping_interval: timing.ping_interval,
            handshake_timeout: timing.handshake_timeout,
            agent_grace: timing.agent_grace,
            steps: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        });
        ctl.recover()?;
        Ok(ctl)
    }

    /// Re-queue builds that were queued when the controller stopped, and pick up those that were
    /// running where their logs end: their agents reconnect and resume within the grace.
    fn recover(self: &Arc<Self>) -> Result<(), String> {
        let unfinished = self.store().unfinished_builds().map_err(|e| format!("store: {e}"))?;
        for b in unfinished {
            let p = match pipeline::parse(&b.yaml) {
                Ok(p) => p,
                Err(e) => {
                    let _ = self.store().finish_build(b.id, BuildState::Failure, &format!("{e}"));
                    continue;
                }
            };
            let live = Arc::new(LiveBuild::new(b.id, p));
            if b.state != BuildState::Running {
                self.state().builds.insert(b.id, live);
                self.state().queue.push_back(b.id);
                log::info!("build {}: queued again after restart", b.id);
                continue;
            }
            let steps = self.store().steps(b.id).map_err(|e| format!("store: {e}"))?;
            let node = b.node.clone().unwrap_or_default();
            let known = self.state().nodes.contains_key(&node);
            let next = steps.iter().find(|s| s.state == "running" || s.state == "pending");
            let Some(next) = next.filter(|_| known) else {
                let why = if known { "no step left to run" } else { "its node no longer exists" };
                log::warn!("build {}: was running when the controller stopped; failing it: {why}", b.id);
                let _ = self.store().finish_build(
                    b.id,
                    BuildState::Failure,
                    &format!("controller restarted: {why}"),
                );
                continue;
            };
            let (step, running) = (next.index, next.state == "running");
            live.steps_done.store(step - 1, Ordering::SeqCst);
            if running {
                let path = self.data.join("builds").join(b.id.to_string()).join(format!("{step}.log"));
                let (file, offset) = LogFile::open(path.clone())
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let (done, done_rx) = bounded(1);
                self.steps().insert(
                    (b.id, step),
                    Sink { node: node.clone(), started: true, file, offset, done, build: live.clone() },
                );
                log::info!(
                    "build {} step {step}: was running on node {node} when the controller stopped; \
                     {offset} bytes stored, waiting for the agent to resume it",
                    b.id
                );
                self.spawn_build(live, node, step, Some(done_rx));
            } else {
                log::info!("build {}: continuing with step {step} on node {node} after restart", b.id);
                self.spawn_build(live, node, step, None);
            }
        }
        Ok(())
    }

    fn spawn_build(
        self: &Arc<Self>,
        build: Arc<LiveBuild>,
        node: String,
        from: u32,
        running: Option<Receiver<StepEnd>>,
    ) {
        {
            let mut st = self.state();
            st.builds.insert(build.id, build.clone());
            st.nodes.update(&node, |n| n.busy += 1);
        }
        let ctl = self.clone();
        self.ex.spawn(async move { ctl.run_build(build, node, from, running).await }).detach();
    }

    /// Output sinks of running steps, locked.
    pub fn steps(&self) -> MutexGuard<'_, HashMap<(u64, u32), Sink>> {
        self.steps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store, locked.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
    pub fn rotate_token(&self) -> Result<String, ApiError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let new = crate::auth::hex(&crate::auth::random_nonce());
        let (path, tmp) = (self.data.join("token"), self.data.join("token.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(format!("{new}\n").as_bytes()))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| ApiError::new(500, format!("cannot write {}: {e}", path.display())))?;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = new.clone();
        log::info!("API token rotated");
        Ok(new)
    }

    /// True if `token` is the API token (constant time).
    pub fn token_ok(&self, token: &str) -> bool {
        let t = self.token.lock().unwrap_or_else(|e| e.into_inner());
        crate::auth::constant_time_eq(t.as_bytes(), token.as_bytes())
    }

    /// A fresh link id.
    pub fn conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Add a node.
    pub fn add_node(&self, rec: NodeRecord) -> Result<(), ApiError> {
        let mut st = self.state();
        if st.nodes.contains_key(&rec.name) {
            return Err(ApiError::new(409, format!("a node named '{}' already exists", rec.name)));
        }
        self.store().add_node(&rec)?;
        log::info!(
            "node {}: added (labels: {}, executors: {})",
            rec.name,
            rec.labels.join(" "),
            rec.executors
        );
        st.nodes.insert(Node::new(rec));
        Ok(())
    }

    /// Remove a node (its link, if any, is closed).
    pub fn remove_node(&self, name: &str) -> Result<(), ApiError> {
        let node = self.state().nodes.remove(name);
        match node {
            None => Err(ApiError::new(404, format!("no node named '{name}'"))),
            Some(n) => {
                self.store().remove_node(name)?;
                if let Some(c) = n.conn {
                    c.shut();
                }
                log::info!("node {name}: removed");
                Ok(())
            }
        }
    }

    /// Nodes with their live status: (record, online, busy).
    pub fn nodes(&self) -> Vec<(NodeRecord, bool, u32)> {
        self.state().nodes.values().map(|n| (n.rec.clone(), n.conn.is_some(), n.busy)).collect()
    }

    /// The record of one node.
    pub fn node(&self, name: &str) -> Option<NodeRecord> {
        self.state().nodes.get(name).map(|n| n.rec.clone())
    }

    /// The node's current link, if any.
    pub fn conn_of(&self, node: &str) -> Option<Arc<Conn>> {
        self.state().nodes.get(node).and_then(|n| n.conn.clone())
    }

    /// Make `conn` the node's link, unless the node is gone or `old` is no longer its link.
    pub fn attach(self: &Arc<Self>, conn: &Arc<Conn>, old: Option<&Arc<Conn>>) -> bool {
        {
            let mut st = self.state();
            let attached = st.nodes.update(&conn.node, |node| {
                let current = node.conn.as_ref().map(|c| c.id);
                if current != old.map(|c| c.id) {
                    return false;
                }
                node.conn = Some(conn.clone());
                node.offline_since = None;
                true
            });
            if attached != Some(true) {
                return false;
            }
        }
        log::info!("node {}: online (link {} from {})", conn.node, conn.id, conn.peer);
        self.wake_builds();
        self.dispatch();
        true
    }

    /// Wake every live build's task (a node came or went).
    fn wake_builds(&self) {
        let builds: Vec<_> = self.state().builds.values().cloned().collect();
        for b in builds {
            b.changed.notify(usize::MAX);
        }
    }

    /// Since when `node` has been offline; None while online, Err if there is no such node.
    fn offline_since(&self, node: &str) -> Result<Option<Instant>, ()> {
        let st = self.state();
        let n = st.nodes.get(node).ok_or(())?;
        Ok(if n.conn.is_some() { None } else { Some(n.offline_since.unwrap_or_else(Instant::now)) })
    }

    /// Forget `conn` as its node's link. Its running steps wait for the agent to come back
    /// (up to the grace).
    pub fn detach(&self, conn: &Arc<Conn>, why: &str) {
        let running: Vec<(u64, u32)> =
            self.steps().iter().filter(|(_, s)| s.node == conn.node && s.started).map(|(k, _)| *k).collect();
        {
            let mut st = self.state();
            let agent_grace = self.agent_grace;
            st.nodes.update(&conn.node, |node| {
                if node.conn.as_ref().is_some_and(|c| c.id == conn.id) {
                    node.conn = None;
                    node.offline_since = Some(Instant::now());
                    log::info!("node {}: offline ({why})", conn.node);
                    for (b, s) in &running {
                        log::info!(
                            "build {b} step {s}: agent '{}' is away; waiting up to {}s for it to resume",
                            conn.node,
                            agent_grace.as_secs()
                        );
                    }
                }
            });
        }
        self.wake_builds();
    }

    /// A reconnected agent's list of the steps it holds: which to resume (with the stored
    /// offset) and which to abandon. Steps the controller started on the node that the agent no
    /// longer has end as lost.
    pub fn reconcile(&self, node: &str, held: &[(u64, u32, u64)]) -> Reconciled {
        let away = self.offline_since(node).ok().flatten().map(|t| t.elapsed());
        let mut resume = Vec::new();
        let mut abandon = Vec::new();
        let mut steps = self.steps();
        for &(b, s, produced) in held {
            match steps.get(&(b, s)).filter(|k| k.node == node && k.started) {
                Some(sink) if produced >= sink.offset => {
                    log::info!(
                        "build {b} step {s}: resumed on node {node} after {:.1}s offline: controller has {} bytes, \
                         agent replays {} bytes",
                        away.unwrap_or_default().as_secs_f64(),
                        sink.offset,
                        produced - sink.offset
                    );
                    resume.push((b, s, sink.offset));
                }
                Some(sink) => {
                    let m = format!(
                        "agent '{node}' has {produced} output bytes but the controller stored {}: output lost",
                        sink.offset
                    );
                    log::error!("build {b} step {s}: {m}");
                    let _ = sink.done.try_send(StepEnd::Lost(m));
                    abandon.push((b, s));
                }
                None => {
                    log::info!(
                        "build {b} step {s}: node {node} still holds it, but it is over; abandoning it"
                    );
                    abandon.push((b, s));
                }
            }
        }
        for ((b, s), sink) in steps.iter_mut() {
            if sink.node == node && sink.started && !held.iter().any(|h| (h.0, h.1) == (*b, *s)) {
                let m = format!("agent '{node}' came back without this step (was the agent restarted?)");
                log::warn!("build {b} step {s}: {m}");
                sink.started = false;
                let _ = sink.done.try_send(StepEnd::Lost(m));
            }
        }
        Reconciled { resume, abandon }
    }

    /// Queue a pipeline; returns the build number.
    pub fn submit(self: &Arc<Self>, yaml: &str) -> Result<u64, ApiError> {
        let p = pipeline::parse(yaml).map_err(|e| ApiError::new(400, e.to_string()))?;
        let names: Vec<String> = p.steps.iter().map(|s| s.name.clone()).collect();
        let id = self.store().insert_build(&p.name, yaml, &names)?;
        log::info!("build {id}: queued ({}, label '{}')", p.name, p.label.as_deref().unwrap_or(""));
        {
            let mut st = self.state();
            st.builds.insert(id, Arc::new(LiveBuild::new(id, p)));
            st.queue.push_back(id);
        }
        self.dispatch();
        Ok(id)
    }

    /// The live build, if queued or running.
    pub fn live(&self, id: u64) -> Option<Arc<LiveBuild>> {
        self.state().builds.get(&id).cloned()
    }

    /// A build's record.
    pub fn build(&self, id: u64) -> Result<BuildRecord, ApiError> {
        self.store().build(id)?.ok_or_else(|| ApiError::new(404, format!("no build #{id}")))
    }

    /// Cancel a queued or running build.
    pub fn cancel(self: &Arc<Self>, id: u64) -> Result<(), ApiError> {
        let queued = {
            let mut st = self.state();
            let Some(b) = st.builds.get(&id).cloned() else {
                let rec = self.build(id)?;
                return Err(ApiError::new(
                    409,
                    format!("build #{id} already finished ({})", rec.state.as_str()),
                ));
            };
            b.cancelled.store(true, Ordering::SeqCst);
            b.changed.notify(usize::MAX);
            let pos = st.queue.iter().position(|q| *q == id);
            if let Some(pos) = pos {
                st.queue.remove(pos);
                st.builds.remove(&id);
            }
            pos.map(|_| b)
        };
        log::info!("build {id}: cancel requested");
        if let Some(b) = queued {
            self.store().finish_build(id, BuildState::Aborted, "cancelled while queued")?;
            b.changed.notify(usize::MAX);
        }
        Ok(())
    }

    /// Start every queued build that has a matching node with a free executor, oldest first.
    pub fn dispatch(self: &Arc<Self>) {
        let mut started = Vec::new();
        {
            let mut st = self.state();
            let st = &mut *st;
            // Expressions that found no free node in this pass: executors only fill up during
            // it, so the builds after that wait for them need no look.
            let mut full: Vec<&LabelExpr> = Vec::new();
            let mut i = 0;
            while i < st.queue.len() {
                let build = &st.builds[&st.queue[i]];
                let expr = &build.pipeline.label_expr;
                if full.contains(&expr) {
                    i += 1;
                    continue;
                }
                match st.nodes.pick(expr) {
                    Some(node) => {
                        st.nodes.update(&node, |n| n.busy += 1);
                        st.queue.remove(i);
                        started.push((build.clone(), node));
                    }
                    None => {
                        full.push(expr);
                        i += 1;
                    }
                }
            }
        }
        for (build, node) in started {
            let ctl = self.clone();
            self.ex.spawn(async move { ctl.run_build(build, node, 1, None).await }).detach();
        }
    }

    /// Run a build's steps from `from` on `node`. `running` is given when step `from` is already
    /// running on the agent (picked up after a controller restart): it is not started again.
    async fn run_build(
        self: Arc<Self>,
        build: Arc<LiveBuild>,
        node: String,
        from: u32,
        mut running: Option<Receiver<StepEnd>>,
    ) {
        let id = build.id;
        // The build is marked running together with its first step (one store write).
        let mut start_on = (from == 1).then_some(node.as_str());
        if from == 1 {
            log::info!("build {id}: running on node {node}");
        }
        let workspace = pipeline::workspace_name(&build.pipeline.name);
        let dir = self.data.join("builds").join(id.to_string());
        let mut state = BuildState::Success;
        let mut message = String::new();
        // Whether the build's end went into the store with its last step.
        let mut ended = false;
        let last = build.pipeline.steps.len() as u32;
        for (i, spec) in build.pipeline.steps.iter().enumerate().skip(from as usize - 1) {
            let step = i as u32 + 1;
            if build.cancelled.load(Ordering::SeqCst) {
                state = BuildState::Aborted;
                message = "cancelled".into();
                break;
            }
            let (end, bytes) = self
                .run_step(&build, &node, &dir, step, &workspace, spec, running.take(), start_on.take())
                .await;
            let (step_state, exit, code) = match &end {
                StepEnd::Exit(ExitStatus::Code(0), _) => ("success", "exit code 0".to_string(), Some(0)),
                StepEnd::Exit(ExitStatus::Cancelled, _) => ("aborted", "cancelled".to_string(), None),
                StepEnd::Exit(st, m) if m.is_empty() => ("failure", st.to_string(), code_of(*st)),
                StepEnd::Exit(st, m) => ("failure", format!("{st}: {m}"), code_of(*st)),
                StepEnd::Lost(m) => ("failure", m.clone(), None),
            };
            log::info!("build {id} step {step}: {exit} (node {node})");
            match step_state {
                "success" => {}
                "aborted" => {
                    state = BuildState::Aborted;
                    message = format!("cancelled during step {step}");
                }
                _ => {
                    state = BuildState::Failure;
                    message = format!("step {step} ({}) failed: {exit}", spec.name);
                }
            }
            if state == BuildState::Failure && build.cancelled.load(Ordering::SeqCst) {
                state = BuildState::Aborted;
            }
            // The build's last step and the build's end are one store write.
            ended = state != BuildState::Success || step == last;
            let stored = super::store::StepEnd { state: step_state, exit: &exit, code, bytes };
            let finish = ended.then_some((state, message.as_str()));
            if let Err(e) = self.store().end_step(id, step, &stored, finish) {
                log::error!("build {id}: store: {e}");
            }
            build.steps_done.store(step, Ordering::SeqCst);
            build.changed.notify(usize::MAX);
            if ended {
                break;
            }
        }
        log::info!("build {id}: finished {} {message}", state.as_str());
        // Cancelled before a step ran (or no step left after a restart): the end is written alone.
        if !ended {
            if let Err(e) = self.store().finish_build(id, state, &message) {
                log::error!("build {id}: store: {e}");
            }
        }
        {
            let mut st = self.state();
            st.builds.remove(&id);
            st.nodes.update(&node, |n| n.busy = n.busy.saturating_sub(1));
        }
        build.changed.notify(usize::MAX);
        self.dispatch();
    }

    /// Run one step on `node` and wait for its end. The step survives its agent's absence for
    /// up to the grace; a cancel reaches the agent on whatever link it has.
    #[allow(clippy::too_many_arguments)]
    async fn run_step(
        &self,
        build: &Arc<LiveBuild>,
        node: &str,
        dir: &std::path::Path,
        step: u32,
        workspace: &str,
        spec: &pipeline::Step,
        running: Option<Receiver<StepEnd>>,
        start_on: Option<&str>,
    ) -> (StepEnd, u64) {
        let id = build.id;
        let key = (id, step);
        let log_path = dir.join(format!("{step}.log"));
        let done_rx = match running {
            Some(rx) => rx,
            None => {
                let file = match LogFile::create(log_path.clone()) {
                    Ok(f) => f,
                    Err(e) => {
                        let m = format!("cannot reset the step log {}: {e}", log_path.display());
                        return (StepEnd::Lost(m), 0);
                    }
                };
                let (done, done_rx) = bounded(1);
                let sink = Sink {
                    node: node.to_string(),
                    started: false,
                    file,
                    offset: 0,
                    done,
                    build: build.clone(),
                };
                self.steps().insert(key, sink);
                if let Err(e) = self.store().start_step(id, step, start_on) {
                    log::error!("build {id}: store: {e}");
                }
                build.changed.notify(usize::MAX);
                done_rx
            }
        };
        let mut cancel_sent_on = 0u64; // the link a Cancel went out on
        let mut cancel_deadline: Option<Instant> = None;
        let end = loop {
            let listener = build.changed.listen();
            let conn = self.conn_of(node);
            let started = self.steps().get(&key).is_some_and(|s| s.started);
            if !started {
                if build.cancelled.load(Ordering::SeqCst) {
                    break StepEnd::Exit(ExitStatus::Cancelled, "cancelled before it started".into());
                }
                if let Some(c) = &conn {
                    let start = Out::StepStart {
                        build: id,
                        step,
                        workspace: workspace.to_string(),
                        spec: spec.clone(),
                    };
                    // Marked started first: the agent may answer before the send returns.
                    if let Some(s) = self.steps().get_mut(&key) {
                        s.started = true;
                    }
                    if c.tx.send(start).await.is_err() {
                        if let Some(s) = self.steps().get_mut(&key) {
                            s.started = false;
                        }
                    }
                    continue;
                }
            }
            if build.cancelled.load(Ordering::SeqCst) {
                cancel_deadline.get_or_insert_with(|| Instant::now() + CANCEL_WAIT);
                if let Some(c) = conn.as_ref().filter(|c| c.id != cancel_sent_on) {
                    if c.tx.send(Out::Cancel { build: id, step }).await.is_ok() {
                        cancel_sent_on = c.id;
                    }
                }
            }
            let grace_end = match self.offline_since(node) {
                Err(()) => break StepEnd::Lost(format!("node '{node}' was removed")),
                Ok(since) => since.map(|t| t + self.agent_grace),
            };
            let wake_at = [grace_end, cancel_deadline].into_iter().flatten().min();
            let waited = smol::future::or(async { Some(done_rx.recv().await) }, async {
                match wake_at {
                    Some(t) => {
                        smol::future::or(listener, async {
                            smol::Timer::at(t).await;
                        })
                        .await;
                    }
                    None => listener.await,
                }
                None
            })
            .await;
            match waited {
                Some(Ok(end)) => break end,
                Some(Err(_)) => break StepEnd::Lost("the step's sink closed".into()),
                None => {}
            }
            let now = Instant::now();
            if grace_end.is_some_and(|t| now >= t) {
                let m = format!(
                    "agent lost: no contact with node '{node}' for {}s (the agent grace)",
                    self.agent_grace.as_secs()
                );
                log::warn!("build {id} step {step}: {m}");
                break StepEnd::Lost(m);
            }
            if cancel_deadline.is_some_and(|t| now >= t) {
                break StepEnd::Lost(format!("agent '{node}' did not confirm the cancel in time"));
            }
        };
        let bytes = self.steps().remove(&key).map(|s| s.offset);
        let bytes = match bytes {
            Some(b) => b,
            // The link removed the sink when it delivered the exit; read the size from the file.
            None => std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0),
        };
        (end, bytes)
    }
}

fn code_of(st: ExitStatus) -> Option<i32> {
    match st {
        ExitStatus::Code(c) => Some(c),
        _ => None,
    }
}

impl LiveBuild {
    fn new(id: u64, pipeline: Pipeline) -> Self {
        Self {
            id,
            pipeline,
            cancelled: AtomicBool::new(false),
            changed: Event::new(),
            output: Event::new(),
            steps_done: AtomicU32::new(0),
        }
    }
}
