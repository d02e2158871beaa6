//! The agent: connects out to the controller, authenticates, runs the steps it is sent and
//! streams their output back within the credit the controller grants.
//!
//! Memory is fixed per link and per step (a few frame-sized buffers); nothing grows with the
//! amount of output, with a slow controller, or with what a peer claims. Steps outlive links:
//! each step's output goes through a spool file until the controller has stored it, and after a
//! reconnect the agent reports its steps (`Running`), the controller answers each with `Resume`
//! (replay from what it has) or `Abandon`, and the output continues with nothing lost or doubled.

pub mod connect;
pub mod jnlp;
pub mod process;
pub mod spool;

use crate::auth::{self, ClientHandshake, ClientStep};
use crate::link::{LinkError, LinkReader, LinkWriter, OutputBuf, Watchdog};
use crate::proto::{self, ExitStatus, Frame, RejectCode, StepStart, MAX_MESSAGE, MAX_OUTPUT_CHUNK};
pub use connect::Mode;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use process::Reaper;
use smol::channel::{bounded, Receiver, Sender};
use smol::io::AsyncReadExt;
use smol::lock::Mutex;
use smol::{LocalExecutor, Timer};
use spool::Spool;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long each handshake step may take before the attempt is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time between TERM and KILL when a step's process group is stopped.
pub const KILL_GRACE: Duration = Duration::from_secs(3);
/// First reconnect delay; doubles per failure up to `BACKOFF_MAX`, with up to 50% jitter added.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest reconnect delay before jitter (Jenkins' agent caps at 10 s too).
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A link is declared dead after this many ping intervals without any frame from the controller.
pub const DEAD_AFTER_PINGS: u32 = 3;
/// Default most output bytes a step may hold in its spool while the controller is away.
pub const DEFAULT_SPOOL_CAP: u64 = 1 << 30;
/// Most steps listed in one `Running` frame (far above any executor count).
const MAX_REPORTED: usize = 1000;

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Controller URL (`http://host:8080/`).
    pub url: String,
    /// Node name.
    pub name: String,
    /// Node secret (64 hex characters).
    pub secret: String,
    /// WebSocket, direct TCP or TCP with port discovery.
    pub mode: Mode,
    /// Directory holding workspaces.
    pub work_dir: PathBuf,
    /// How the controller's TLS certificate is checked.
    pub trust: crate::tls::Trust,
    /// Most output bytes a step holds in its spool while the controller is away; then the step
    /// is not read (it blocks on write) until the controller is back.
    pub spool_cap: u64,
}

/// Why the agent stopped.
#[derive(Debug)]
pub enum AgentError {
    /// The controller refused this node; retrying would not help.
    Rejected(RejectCode, String),
    /// The peer is not a controller that knows this node's secret.
    Untrusted(String),
    /// The configuration cannot work (bad URL, unreadable certificate).
    Config(String),
}

impl AgentError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 2,
            Self::Rejected(RejectCode::UnknownNode, _) => 3,
            Self::Rejected(RejectCode::WrongSecret, _) => 4,
            Self::Rejected(RejectCode::UnsupportedVersion, _) => 5,
            Self::Rejected(..) => 6,
            Self::Untrusted(_) => 7,
        }
    }
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rejected(_, m) => write!(f, "the controller refused this agent: {m}"),
            Self::Untrusted(m) => write!(f, "{m}"),
            Self::Config(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for AgentError {}

/// Fetch the node's descriptor from `jnlp_url` (see [`jnlp`]), retrying with backoff while the
/// controller cannot be reached.
pub fn fetch_descriptor(
    jnlp_url: &str,
    name: &str,
    secret: &str,
    trust: &crate::tls::Trust,
) -> Result<jnlp::Descriptor, AgentError> {
    let tls = if connect::parse_url(jnlp_url).map_err(AgentError::Config)?.tls {
        Some(connect::Tls::new(trust).map_err(AgentError::Config)?)
    } else {
        None
    };
    smol::block_on(async {
        let mut backoff = Backoff::default();
        loop {
            match jnlp::fetch(jnlp_url, name, secret, tls.as_ref()).await {
                Ok(d) => return Ok(d),
                Err(jnlp::JnlpError::Fatal(m)) => return Err(AgentError::Config(m)),
                Err(jnlp::JnlpError::UnknownNode(m)) => {
                    return Err(AgentError::Rejected(RejectCode::UnknownNode, m))
                }
                Err(jnlp::JnlpError::WrongSecret(m)) => {
                    return Err(AgentError::Rejected(RejectCode::WrongSecret, m))
                }
                Err(jnlp::JnlpError::Retry(m)) => {
                    let delay = backoff.next();
                    log::warn!("fetching the agent descriptor: {m}; retrying in {:.1}s", delay.as_secs_f64());
                    Timer::after(delay).await;
                }
            }
        }
    })
}

/// Run the agent until it is rejected or receives SIGTERM/SIGINT (then `Ok`).
pub fn run(cfg: Config) -> Result<(), AgentError> {
    let ex = Rc::new(LocalExecutor::new());
    // The executor parks between wake-ups and async-io's own thread waits on I/O alone. With
    // `smol::block_on` this thread would poll I/O itself, but async-io's helper thread then wakes
    // on a back-off timer (50 µs up to 10 ms) after each burst and takes the poller over between
    // builds: with 100 agents on 2 cores that cost each agent about a third more CPU per build.
    smol::future::block_on(ex.run(run_on(ex.clone(), cfg)))
}

/// Run the agent on an executor the caller drives.
pub async fn run_on(ex: Rc<LocalExecutor<'static>>, cfg: Config) -> Result<(), AgentError> {
    let target = connect::parse_url(&cfg.url).map_err(AgentError::Config)?;
    let tls =
        if target.tls { Some(connect::Tls::new(&cfg.trust).map_err(AgentError::Config)?) } else { None };
    let reaper =
        Reaper::install(std::process::id() == 1).map_err(|e| AgentError::Config(format!("signals: {e}")))?;
    // Spools of an earlier agent process belong to steps that died with it.
    let _ = std::fs::remove_dir_all(cfg.work_dir.join(".wisp").join("spool"));
    let agent = Rc::new(Agent {
        cfg,
        ex,
        reaper: reaper.clone(),
        steps: RefCell::new(HashMap::new()),
        link: RefCell::new(None),
        generation: Cell::new(0),
    });
    let main = {
        let agent = agent.clone();
        async move {
            let mut backoff = Backoff::default();
            loop {
                let started = Instant::now();
                match agent.session(&target, tls.as_ref()).await {
                    Ok(()) => {}
                    Err(End::Fatal(e)) => return Err(e),
                    Err(End::Retry(msg)) => log::warn!("{msg}"),
                }
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Backoff::default();
                }
                let delay = backoff.next();
                log::info!("reconnecting in {:.1}s", delay.as_secs_f64());
                Timer::after(delay).await;
            }
        }
    };
    let stop = async {
        reaper.run().await;
        log::info!("terminating: stopping running steps");
        agent.stop_all_steps();
        // Give the steps' TERM → KILL sequences time to run.
        let deadline = Instant::now() + KILL_GRACE + Duration::from_secs(1);
        while !agent.steps.borrow().is_empty() && Instant::now() < deadline {
            Timer::after(Duration::from_millis(20)).await;
        }
        Ok(())
    };
    smol::future::or(main, stop).await
}

enum End {
    Fatal(AgentError),
    Retry(String),
}

#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = BACKOFF_MIN.saturating_mul(1 << self.failures.min(8)).min(BACKOFF_MAX);
        self.failures += 1;
        let r = auth::random_nonce();
        let jitter = f64::from(u16::from_be_bytes([r[0], r[1]])) / f64::from(u16::MAX) * 0.5;
        base.mul_f64(1.0 + jitter)
    }
}

/// The agent's controls over one step, shared by the step's task and the link.
struct StepCtl {
    /// Output bytes the controller lets us send.
    credit: Cell<u64>,
    /// Output below this offset is stored by the controller.
    stored: Cell<u64>,
    /// Output bytes read from the step so far (reported in `Running`).
    produced: Cell<u64>,
    /// The link generation this step sends on: the link that started or resumed it.
    generation: Cell<u64>,
    /// Set by `Resume`: send again from this offset.
    resume_at: Cell<Option<u64>>,
    /// The controller acknowledged the step's exit.
    exit_acked: Cell<bool>,
    cancelled: Cell<bool>,
    /// Stop at once and forget the step, reporting nothing (the controller gave it up, or the
    /// agent is terminating).
    abandoned: Cell<bool>,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

impl StepCtl {
    fn new(credit: u32, generation: u64) -> Self {
        let (wake_tx, wake_rx) = bounded(1);
        Self {
            credit: Cell::new(u64::from(credit)),
            stored: Cell::new(0),
            produced: Cell::new(0),
            generation: Cell::new(generation),
            resume_at: Cell::new(None),
            exit_acked: Cell::new(false),
            cancelled: Cell::new(false),
            abandoned: Cell::new(false),
            wake_tx,
            wake_rx,
        }
    }
    fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }
}

/// The current link to the controller, as steps see it.
#[derive(Clone)]
struct Link {
    writer: Writer,
    generation: u64,
    /// Fails (its sender is dropped) when the link ends, so a send stuck on a dead link gives up.
    closed: Receiver<()>,
    /// Tells the session that a send failed, so it ends the link at once.
    broken: Sender<()>,
}

impl Link {
    /// A send on this link failed: end its session and wait until it is gone. Without the wait
    /// a step would retry the send at once, forever, and starve the task that reads the link.
    async fn failed(&self) {
        let _ = self.broken.try_send(());
        let _ = self.closed.recv().await;
    }
}

/// Send `frame` on `link`; false if the link ended first (the frame may or may not have gone).
async fn send_on(link: &Link, frame: &Frame<'_>) -> bool {
    smol::future::or(async { link.writer.lock().await.send(frame).await.is_ok() }, async {
        let _ = link.closed.recv().await;
        false
    })
    .await
}

/// Send `len` bytes of step output from `out` at `offset` on `link`, as [`send_on`].
async fn send_output_on(link: &Link, out: &mut OutputBuf, key: (u64, u32), offset: u64, len: usize) -> bool {
    smol::future::or(
        async { link.writer.lock().await.send_output(out, key.0, key.1, offset, len).await.is_ok() },
        async {
            let _ = link.closed.recv().await;
            false
        },
    )
    .await
}

struct Agent {
    cfg: Config,
    ex: Rc<LocalExecutor<'static>>,
    reaper: Rc<Reaper>,
    steps: RefCell<HashMap<(u64, u32), Rc<StepCtl>>>,
    /// The live link, if any.
    link: RefCell<Option<Link>>,
    /// Counts links; a step sends only on the link of its generation.
    generation: Cell<u64>,
}

type Writer = Rc<Mutex<LinkWriter>>;

async fn timeout<T>(d: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(fut.await) }, async {
        Timer::after(d).await;
        None
    })
    .await
}

impl Agent {
    /// One connection: open, handshake, report held steps, serve until the link ends.
    async fn session(
        self: &Rc<Self>,
        target: &connect::Target,
        tls: Option<&connect::Tls>,
    ) -> Result<(), End> {
        let (mut reader, writer) =
            connect::open(target, &self.cfg.mode, &self.cfg.name, tls).await.map_err(End::Retry)?;
        let writer: Writer = Rc::new(Mutex::new(writer));
        let ping_ms = self.handshake(&mut reader, &writer).await?;
        let generation = self.generation.get() + 1;
        self.generation.set(generation);
        // Tell the controller which steps this agent still holds; it answers Resume or Abandon.
        let held: Vec<(u64, u32, u64)> = self
            .steps
            .borrow()
            .iter()
            .map(|(k, c)| (k.0, k.1, c.produced.get()))
            .take(MAX_REPORTED)
            .collect();
        let mut buf = vec![0u8; held.len() * 20];
        let steps = proto::encode_steps(held.iter().copied(), &mut buf)
            .map_err(|e| End::Retry(format!("listing held steps: {e}")))?;
        match timeout(HANDSHAKE_TIMEOUT, async { writer.lock().await.send(&Frame::Running { steps }).await })
            .await
        {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(End::Retry(format!("handshake: {e}"))),
            None => {
                return Err(End::Retry("handshake: the controller did not take our step list in time".into()))
            }
        }
        drop(buf);
        if held.is_empty() {
            log::info!("connected to {} as node '{}'", self.cfg.url, self.cfg.name);
        } else {
            log::info!(
                "connected to {} as node '{}'; {} step(s) to resume",
                self.cfg.url,
                self.cfg.name,
                held.len()
            );
        }
        drop(held);
        let (close_tx, closed) = bounded::<()>(1);
        let (broken, broken_rx) = bounded::<()>(1);
        *self.link.borrow_mut() = Some(Link { writer: writer.clone(), generation, closed, broken });
        let interval = Duration::from_millis(u64::from(ping_ms.clamp(100, 600_000)));
        let pinger = {
            let writer = writer.clone();
            self.ex.spawn(async move {
                let mut id = 0u64;
                loop {
                    Timer::after(interval).await;
                    id += 1;
                    if writer.lock().await.send(&Frame::Ping { id }).await.is_err() {
                        break;
                    }
                }
            })
        };
        let result =
            self.serve(&mut reader, &writer, generation, interval * DEAD_AFTER_PINGS, &broken_rx).await;
        drop(pinger);
        // Steps stop sending on this link (sends stuck on it give up) and keep spooling.
        *self.link.borrow_mut() = None;
        drop(close_tx);
        for (k, c) in self.steps.borrow().iter() {
            if c.generation.get() == generation && !c.abandoned.get() {
                log::info!("build {} step {}: link lost; output goes to the spool", k.0, k.1);
            }
            c.wake();
        }
        let _ = timeout(Duration::from_secs(2), async { writer.lock().await.close().await }).await;
        result
    }

    async fn handshake(&self, reader: &mut LinkReader, writer: &Writer) -> Result<u32, End> {
        let (mut hs, hello) = ClientHandshake::new(&self.cfg.name, &self.cfg.secret, auth::random_nonce(), 0);
        let send_err = |e: LinkError| End::Retry(format!("handshake: {e}"));
        writer.lock().await.send(&hello).await.map_err(send_err)?;
        loop {
            let frame = match timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
                None => return Err(End::Retry("handshake: the controller did not answer in time".into())),
                Some(Err(e)) => return Err(End::Retry(format!("handshake: {e}"))),
                Some(Ok(None)) => {
                    return Err(End::Retry("handshake: the controller closed the connection".into()))
                }
                Some(Ok(Some(f))) => f,
            };
            match hs.on_frame(&frame) {
                ClientStep::Send(f) => writer.lock().await.send(&f).await.map_err(send_err)?,
                ClientStep::Done { ping_interval_ms, .. } => {
                    let keys = hs.session_keys().expect("keys are known once the controller answered");
                    reader.authenticate(&keys.to_agent);
                    writer.lock().await.authenticate(&keys.to_controller);
                    return Ok(ping_interval_ms);
                }
                ClientStep::Rejected(code @ (RejectCode::AlreadyConnected | RejectCode::TryLater), m) => {
                    return Err(End::Retry(format!("the controller said: {m} ({code:?}); will retry")))
                }
                ClientStep::Rejected(code, m) => return Err(End::Fatal(AgentError::Rejected(code, m))),
                ClientStep::Failed(m) => return Err(End::Fatal(AgentError::Untrusted(m))),
            }
        }
    }

    async fn serve(
        self: &Rc<Self>,
        reader: &mut LinkReader,
        writer: &Writer,
        generation: u64,
        dead_after: Duration,
        broken: &Receiver<()>,
    ) -> Result<(), End> {
        let mut watchdog = Watchdog::new(dead_after);
        loop {
            let next = async { Some(reader.next().await) };
            let failed = async {
                let _ = broken.recv().await;
                None
            };
            let frame = match watchdog.guard(smol::future::or(next, failed)).await {
                Some(None) => {
                    return Err(End::Retry("sending to the controller failed: the link is broken".into()))
                }
                Some(Some(r)) => Some(r),
                None => None,
            };
            let frame = match frame {
                None => {
                    return Err(End::Retry(format!(
                        "no word from the controller for {}s: the link is dead",
                        dead_after.as_secs()
                    )))
                }
                Some(Err(e)) => return Err(End::Retry(format!("link to the controller failed: {e}"))),
                Some(Ok(None)) => return Err(End::Retry("the controller closed the connection".into())),
                Some(Ok(Some(f))) => f,
            };
            let step = |build: u64, step: u32| self.steps.borrow().get(&(build, step)).cloned();
            match frame {
                Frame::StepStart(s) => self.start_step(&s, generation),
                Frame::Credit { build, step: st, bytes, stored } => {
                    if let Some(c) = step(build, st) {
                        c.credit.set(c.credit.get().saturating_add(u64::from(bytes)));
                        c.stored.set(c.stored.get().max(stored));
                        c.wake();
                    }
                }
                Frame::Ack { build, step: st, offset } => {
                    if let Some(c) = step(build, st) {
                        c.stored.set(c.stored.get().max(offset));
                        c.exit_acked.set(true);
                        c.wake();
                    }
                }
                Frame::Resume { build, step: st, offset, credit } => match step(build, st) {
                    Some(c) => {
                        c.resume_at.set(Some(offset));
                        c.stored.set(c.stored.get().max(offset));
                        c.credit.set(u64::from(credit));
                        c.exit_acked.set(false);
                        c.generation.set(generation);
                        c.wake();
                    }
                    None => log::warn!("build {build} step {st}: resume for a step this agent does not hold"),
                },
                Frame::Abandon { build, step: st } => {
                    if let Some(c) = step(build, st) {
                        log::warn!(
                            "build {build} step {st}: the controller gave this step up while we were apart; \
                             killing its process group"
                        );
                        c.abandoned.set(true);
                        c.wake();
                    }
                }
                Frame::Cancel { build, step: st } => {
                    if let Some(c) = step(build, st) {
                        log::info!("build {build} step {st}: cancel requested");
                        c.cancelled.set(true);
                        c.wake();
                    }
                }
                Frame::Pong { .. } => {}
                Frame::Ping { id } => {
                    if timeout(dead_after, async { writer.lock().await.send(&Frame::Pong { id }).await })
                        .await
                        .is_none_or(|r| r.is_err())
                    {
                        return Err(End::Retry(
                            "could not answer the controller's ping: the link is dead".into(),
                        ));
                    }
                }
                Frame::Reject { message, .. } => {
                    return Err(End::Retry(format!("the controller closed the session: {message}")))
                }
                other => {
                    return Err(End::Retry(format!(
                        "protocol error: unexpected {} frame from the controller",
                        auth::frame_kind(&other)
                    )))
                }
            }
        }
    }

    /// Kill every step and forget it (the agent is terminating).
    fn stop_all_steps(&self) {
        for ctl in self.steps.borrow().values() {
            ctl.abandoned.set(true);
            ctl.wake();
        }
    }

    /// The live link, if it is the one of `generation`.
    fn link_for(&self, generation: u64) -> Option<Link> {
        self.link.borrow().as_ref().filter(|l| l.generation == generation).cloned()
    }

    fn start_step(self: &Rc<Self>, s: &StepStart<'_>, generation: u64) {
        let key = (s.build, s.step);
        if self.steps.borrow().contains_key(&key) {
            log::warn!("build {} step {}: already running, duplicate start ignored", s.build, s.step);
            return;
        }
        log::info!(
            "build {} step {}: starting `{} -c ...` in workspace {}",
            s.build,
            s.step,
            s.shell,
            s.workspace
        );
        let spool_dir = self.cfg.work_dir.join(".wisp").join("spool").join(format!("{}-{}", s.build, s.step));
        let started = Spool::create(spool_dir.clone(), self.cfg.spool_cap)
            .map_err(|e| format!("cannot create the output spool {}: {e}", spool_dir.display()))
            .and_then(|spool| Ok((spool, self.workspace_dir(s)?)))
            .and_then(|(spool, dir)| {
                let build = s.build.to_string();
                let step = s.step.to_string();
                let ws = dir.to_string_lossy().into_owned();
                let extra = [
                    ("WORKSPACE", ws.as_str()),
                    ("BUILD_NUMBER", build.as_str()),
                    ("WISP_BUILD", build.as_str()),
                    ("WISP_STEP", step.as_str()),
                    ("NODE_NAME", self.cfg.name.as_str()),
                ];
                let child =
                    process::spawn_shell(s.shell, s.script, &dir, extra.into_iter().chain(s.env.iter()))?;
                Ok((spool, child))
            });
        match started {
            Err(msg) => {
                log::warn!("build {} step {}: {msg}", s.build, s.step);
                let Some(link) = self.link_for(generation) else { return };
                let (build, step) = key;
                self.ex
                    .spawn(async move {
                        let exit = Frame::Exit {
                            build,
                            step,
                            status: ExitStatus::StartFailed,
                            offset: 0,
                            message: clip(&msg),
                        };
                        send_on(&link, &exit).await;
                    })
                    .detach();
            }
            Ok((spool, child)) => {
                let ctl = Rc::new(StepCtl::new(s.credit, generation));
                self.steps.borrow_mut().insert(key, ctl.clone());
                let exited = self.reaper.watch(child.pid);
                let deadline = (s.timeout_secs > 0)
                    .then(|| Instant::now() + Duration::from_secs(u64::from(s.timeout_secs)));
                let agent = self.clone();
                self.ex
                    .spawn(async move {
                        run_step(key, child, exited, &ctl, deadline, &agent, spool).await;
                        agent.steps.borrow_mut().remove(&key);
                    })
                    .detach();
            }
        }
    }

    /// The step's directory: WORK_DIR/workspace/WORKSPACE/DIR, created if missing.
    fn workspace_dir(&self, s: &StepStart<'_>) -> Result<PathBuf, String> {
        for part in [s.workspace, s.dir] {
            let p = Path::new(part);
            if p.is_absolute() || p.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return Err(format!("refused workspace path {part:?}: it must stay inside the work dir"));
            }
        }
        if s.workspace.is_empty() {
            return Err("empty workspace name".into());
        }
        // A symlink an earlier step left in the workspace must not lead out of it: no component
        // below the work dir may be one (checked before anything is created).
        let mut dir = self.cfg.work_dir.join("workspace");
        for part in Path::new(s.workspace).components().chain(Path::new(s.dir).components()) {
            dir.push(part);
            if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(format!(
                    "refused workspace path {:?}: a symlink leads out of the workspace",
                    s.dir
                ));
            }
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create workspace {}: {e}", dir.display()))?;
        Ok(dir)
    }
}

fn clip(msg: &str) -> &str {
    if msg.len() <= MAX_MESSAGE {
        return msg;
    }
    let mut end = MAX_MESSAGE;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

enum Ev {
    Read(std::io::Result<usize>),
    Exited(WaitStatus),
    Wake,
    Timer,
}

/// Run one step to its end: read its output into the spool, send it within credit while a link
/// of the step's generation is up, replay from the spool after a resume, deliver the exit and
/// wait for the controller to acknowledge it. Returns when the step is acknowledged or abandoned.
async fn run_step(
    key: (u64, u32),
    mut child: process::Child,
    exited: Receiver<WaitStatus>,
    ctl: &StepCtl,
    deadline: Option<Instant>,
    agent: &Agent,
    mut spool: Spool,
) {
    let (build, step) = key;
    let mut out = OutputBuf::default();
    let mut sent = 0u64; // output sent on the current link (what the controller will have)
    let mut eof = false;
    let mut status: Option<ExitStatus> = None;
    let mut reason: Option<ExitStatus> = None; // TimedOut or Cancelled
    let mut term_at: Option<Instant> = None; // when TERM was sent to the group
    let mut killed = false;
    let mut exit_sent_on = 0u64; // the link generation the Exit went out on
    let mut message = String::new(); // for the Exit: what went wrong on the agent's side
    let mut logged_end = false;
    loop {
        if ctl.abandoned.get() {
            process::kill_group(child.pid, Signal::SIGKILL);
            log::info!("build {build} step {step}: abandoned; process group killed, output dropped");
            return;
        }
        if let Some(off) = ctl.resume_at.take() {
            if off < spool.acked() || off > spool.produced() {
                // Cannot happen unless the controller lost stored output; say so and end the step.
                message = format!(
                    "the controller has {off} output bytes but the agent holds bytes {}..{}; output lost",
                    spool.acked(),
                    spool.produced()
                );
                log::error!("build {build} step {step}: {message}");
                process::kill_group(child.pid, Signal::SIGKILL);
                reason = Some(ExitStatus::StartFailed);
                eof = true;
                spool.release(spool.produced());
                sent = spool.produced();
            } else {
                log::info!(
                    "build {build} step {step}: resuming at offset {off}: {} bytes to replay from the spool",
                    spool.produced() - off
                );
                sent = off;
                spool.release(off);
            }
            exit_sent_on = 0;
        }
        spool.release(ctl.stored.get().min(sent));
        if ctl.exit_acked.get() && exit_sent_on != 0 {
            log::info!("build {build} step {step}: done; spool peak {} bytes", spool.peak());
            return;
        }
        if reason.is_none() && ctl.cancelled.get() {
            reason = Some(ExitStatus::Cancelled);
        }
        if reason.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            log::info!("build {build} step {step}: timed out");
            reason = Some(ExitStatus::TimedOut);
        }
        // Stop the group when the step was cancelled or timed out, and clear out leftover
        // background processes once the shell itself has exited.
        if (reason.is_some() || status.is_some()) && term_at.is_none() {
            process::kill_group(child.pid, Signal::SIGTERM);
            term_at = Some(Instant::now());
        }
        let link = agent.link_for(ctl.generation.get());
        if let Some(t) = term_at {
            if !killed && t.elapsed() >= KILL_GRACE {
                process::kill_group(child.pid, Signal::SIGKILL);
                killed = true;
            } else if killed
                && !eof
                && status.is_some()
                && (ctl.credit.get() > 0 || link.is_none())
                && t.elapsed() >= KILL_GRACE * 2
            {
                // A process that left the group holds the pipe open; stop waiting for it.
                log::warn!("build {build} step {step}: output pipe still open after KILL, not waiting");
                eof = true;
            }
        }
        if let Some(link) = &link {
            let credit = ctl.credit.get().min(MAX_OUTPUT_CHUNK as u64) as usize;
            if sent < spool.produced() && credit > 0 {
                match spool.read_at(sent, &mut out.space()[..credit]) {
                    Ok(n) => {
                        if send_output_on(link, &mut out, key, sent, n).await {
                            sent += n as u64;
                            ctl.credit.set(ctl.credit.get() - n as u64);
                        } else {
                            link.failed().await;
                        }
                    }
                    Err(e) => {
                        message = format!("reading the output spool: {e}");
                        log::error!("build {build} step {step}: {message}");
                        process::kill_group(child.pid, Signal::SIGKILL);
                        reason = Some(ExitStatus::StartFailed);
                        eof = true;
                        sent = spool.produced();
                    }
                }
                continue;
            }
            if eof && status.is_some() && sent == spool.produced() && exit_sent_on != link.generation {
                let st = reason.or(status).unwrap_or(ExitStatus::Code(-1));
                if !logged_end {
                    log::info!("build {build} step {step}: {st}");
                    logged_end = true;
                }
                let exit = Frame::Exit { build, step, status: st, offset: sent, message: clip(&message) };
                if send_on(link, &exit).await {
                    exit_sent_on = link.generation;
                } else {
                    link.failed().await;
                }
                continue;
            }
        }
        let next_timer = match (term_at, deadline, reason) {
            (Some(_), _, _) if eof || (killed && ctl.credit.get() == 0 && link.is_some()) => None,
            (Some(t), _, _) => Some(t + if killed { KILL_GRACE * 2 } else { KILL_GRACE }),
            (None, Some(d), None) => Some(d),
            _ => None,
        };
        // Read the pipe while connected only within credit, caught up with the spool; while
        // apart, until the spool is full (then the step blocks on its write, nothing is lost).
        let limit = match &link {
            Some(_) if sent == spool.produced() => ctl.credit.get().min(MAX_OUTPUT_CHUNK as u64) as usize,
            Some(_) => 0,
            None if spool.full() => 0,
            None => MAX_OUTPUT_CHUNK,
        };
        let read = async {
            if eof || limit == 0 {
                std::future::pending().await
            }
            Ev::Read(child.output.read(&mut out.space()[..limit]).await)
        };
        let exit = async {
            if status.is_some() {
                std::future::pending().await
            }
            match exited.recv().await {
                Ok(st) => Ev::Exited(st),
                Err(_) => std::future::pending().await,
            }
        };
        let wake = async {
            let _ = ctl.wake_rx.recv().await;
            Ev::Wake
        };
        let timer = async {
            match next_timer {
                Some(t) => Timer::at(t).await,
                None => std::future::pending().await,
            };
            Ev::Timer
        };
        let ev = smol::future::or(smol::future::or(read, exit), smol::future::or(wake, timer)).await;
        match ev {
            Ev::Read(Ok(0)) => eof = true,
            Ev::Read(Ok(n)) => {
                let at = spool.produced();
                if let Err(e) = spool.append(&out.space()[..n]) {
                    message = format!("cannot write the output spool in {}: {e}", spool.dir().display());
                    log::error!("build {build} step {step}: {message}");
                    process::kill_group(child.pid, Signal::SIGKILL);
                    reason.get_or_insert(ExitStatus::StartFailed);
                    eof = true;
                    continue;
                }
                ctl.produced.set(spool.produced());
                if let Some(link) = &link {
                    if at == sent {
                        if send_output_on(link, &mut out, key, at, n).await {
                            sent += n as u64;
                            ctl.credit.set(ctl.credit.get().saturating_sub(n as u64));
                        } else {
                            link.failed().await;
                        }
                    }
                }
            }
            Ev::Read(Err(e)) => {
                log::warn!("build {build} step {step}: reading output: {e}");
                eof = true;
            }
            Ev::Exited(st) => {
                status = Some(match st {
                    WaitStatus::Exited(_, code) => ExitStatus::Code(code),
                    WaitStatus::Signaled(_, sig, _) => ExitStatus::Signal(sig as i32),
                    _ => ExitStatus::Code(-1),
                });
            }
            Ev::Wake | Ev::Timer => {}
        }
    }
}
