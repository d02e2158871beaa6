//! A connected agent: the handshake, the "already connected" check, reconciling the steps it
//! holds after a reconnect, and the reader and writer that carry output, credit and keepalive.
//! Anything the peer sends affects only its own link.

use super::deadlines::Coarse;
use super::steps::{self, StepEvent, STEP_CREDIT};
use super::Controller;
use crate::auth::{self, ServerHandshake, ServerStep};
use crate::link::{LinkError, LinkReader, LinkWriter};
use crate::proto::{self, Frame, RejectCode, StepStart};
use event_listener::Event;
use smol::channel::{bounded, Receiver, Sender};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use crate::proto::{DEAD_AFTER_PINGS, HANDSHAKE_TIMEOUT};
/// How long the old link of a reconnecting node has to answer a ping before it is replaced.
pub const STALE_CHECK: Duration = Duration::from_secs(3);
/// Frames waiting to be written to one agent (bounded: a stuck agent blocks its own producers).
const OUT_QUEUE: usize = 64;
/// Failed handshakes one source address may have within [`FAILURE_WINDOW`] before the answers
/// to its further failures are slowed down by [`FAILURE_DELAY`] (a proxy in front counts as one
/// address, so a correct handshake is never refused for this: only failures are slowed).
pub const MAX_FAILURES: u32 = 10;
/// The window over which failed handshakes are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long the rejection of a failed handshake waits once its address has had too many: a
/// guesser gets one answer per link per this long, and its log lines are counted, not written.
pub const FAILURE_DELAY: Duration = Duration::from_secs(2);
/// Source addresses remembered for failures before the expired ones are swept.
const MAX_FAILURE_SOURCES: usize = 100_000;

/// The grid that every link's ping and silence deadlines are rounded up to (see
/// [`super::deadlines::Coarse`]): 1/256 of the ping interval, from 10 to 100 ms. Coarser would
/// mean fewer wake-ups, but also longer bursts of pings that a build dispatched meanwhile waits
/// behind (with 10,000 agents and a 1 s grid: 30-90 ms every second).
fn keepalive_grid(ping: Duration) -> Duration {
    (ping / 256).clamp(Duration::from_millis(10), Duration::from_millis(100))
}

/// Milliseconds since this was first called: a clock that fits in an atomic.
pub fn millis() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Microseconds since this was first called.
fn micros() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// What waits in a link's queue to be written: a frame that owns its data, or one of the two
/// that borrow (built by the writer from what is kept here).
#[derive(Debug)]
pub enum Out {
    /// A frame without borrowed data (credit, acks, pings, cancels...).
    Frame(Frame<'static>),
    /// Run a step.
    Start {
        /// Build number.
        build: u64,
        /// Step index.
        step: u32,
        /// Workspace directory name.
        workspace: String,
        /// The container to run it in ("" for the agent's own; see `Pipeline::container_of`).
        container: String,
        /// The step.
        spec: super::pipeline::Step,
    },
    /// Bytes of an unpack step's archive (`Frame::Put`).
    Put {
        /// Build number.
        build: u64,
        /// Step index.
        step: u32,
        /// Where `data` starts in the archive.
        offset: u64,
        /// At most `MAX_PUT_CHUNK` bytes; empty at the end.
        data: bytes::Bytes,
    },
    /// Refuse and close (the message is for the agent's log).
    Close(String),
}

/// One authenticated agent link.
pub struct Session {
    /// Unique per controller run.
    pub id: u64,
    /// Node name.
    pub node: String,
    /// Peer address, for logs.
    pub peer: String,
    /// Frames to send.
    pub tx: OutTx,
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
    /// The capability bits the agent's `Hello` set (`proto::CAP_*`).
    pub capabilities: u32,
    /// The link runs over WebSocket (else TCP, or Kafka).
    pub websocket: bool,
    /// The output credit each of its steps starts with (a larger window through Kafka).
    pub credit: u32,
    /// The keepalive ping last sent: its id, and when (µs on [`micros`]'s clock).
    pub ping_sent: AtomicU64,
    /// When that ping was sent.
    pub ping_at: AtomicU64,
    /// Round-trip time of the last keepalive ping answered, in µs (0: none yet).
    pub rtt_us: AtomicU64,
    /// What the agent said it is (`AgentInfo`): version, architecture, OS.
    pub info: std::sync::Mutex<Option<(String, String, String)>>,
}

/// The sending end of a link's queue of frames to write. Items are boxed: the queue allocates its
/// `OUT_QUEUE` slots up front, and a slot then holds a pointer, not the largest `Out` (about 1 KiB
/// per link instead of 14, on every idle agent).
#[derive(Clone)]
pub struct OutTx(Sender<Box<Out>>);

/// The link's writer is gone (or, for `try_send`, its queue is full).
#[derive(Debug)]
pub struct NotQueued;

impl OutTx {
    /// Queue `out`, waiting for room; fails once the link's writer is gone.
    pub async fn send(&self, out: Out) -> Result<(), NotQueued> {
        self.0.send(Box::new(out)).await.map_err(|_| NotQueued)
    }

    /// Close the queue: the writer ends once it has sent what is queued.
    pub fn close(&self) -> bool {
        self.0.close()
    }

    /// Queue `out` if there is room now.
    pub fn try_send(&self, out: Out) -> Result<(), NotQueued> {
        self.0.try_send(Box::new(out)).map_err(|_| NotQueued)
    }
}

/// A queue of at most `cap` frames for one link.
pub fn out_queue(cap: usize) -> (OutTx, Receiver<Box<Out>>) {
    let (tx, rx) = bounded(cap);
    (OutTx(tx), rx)
}

impl Session {
    /// A session for `node` whose frames go to `tx`.
    pub fn new(id: u64, node: &str, peer: &str, tx: OutTx) -> Self {
        Self {
            id,
            node: node.to_string(),
            peer: peer.to_string(),
            tx,
            last_pong: AtomicU64::new(0),
            pong: Event::new(),
            last_frame: AtomicU64::new(millis()),
            silent: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            close: Event::new(),
            capabilities: 0,
            websocket: false,
            credit: STEP_CREDIT,
            ping_sent: AtomicU64::new(0),
            ping_at: AtomicU64::new(0),
            rtt_us: AtomicU64::new(0),
            info: std::sync::Mutex::new(None),
        }
    }

    /// Whether the agent can run steps in sibling containers (`proto::CAP_CONTAINER_STEPS`).
    pub fn runs_container_steps(&self) -> bool {
        self.capabilities & proto::CAP_CONTAINER_STEPS != 0
    }

    /// Whether the agent packs and unpacks archives (artifacts, stash).
    pub fn archives(&self) -> bool {
        self.capabilities & proto::CAP_ARCHIVE != 0
    }

    /// Ask the link to close.
    pub fn shut(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.close.notify(usize::MAX);
    }

    /// When the agent was last heard from.
    pub fn last_heard(&self) -> Instant {
        let quiet = millis().saturating_sub(self.last_frame.load(Ordering::Relaxed));
        Instant::now().checked_sub(Duration::from_millis(quiet)).unwrap_or_else(Instant::now)
    }

    /// True if the agent answers a ping within `wait`.
    pub async fn is_alive(&self, wait: Duration) -> bool {
        let id = u64::from_be_bytes(crate::auth::random_nonce()[..8].try_into().unwrap()) | 1;
        if self.tx.try_send(Out::Frame(Frame::Ping { id })).is_err() {
            return false;
        }
        let deadline = Instant::now() + wait;
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

/// Failed handshakes by source address, owned by one controller.
#[derive(Default)]
pub struct Failures {
    map: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Failures {
    /// Count a failure of `ip`; returns the failures in its current window.
    pub fn record(&self, ip: IpAddr) -> u32 {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > MAX_FAILURE_SOURCES {
            map.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
        }
        let e = map.entry(ip).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= FAILURE_WINDOW {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
        e.1
    }
}

fn source(peer: &str) -> Option<IpAddr> {
    peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

async fn timeout<T>(d: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(fut.await) }, async {
        smol::Timer::after(d).await;
        None
    })
    .await
}

async fn reject(writer: &mut LinkWriter, code: RejectCode, message: &str) {
    let message = crate::text::truncate(message, proto::MAX_MESSAGE);
    let _ = timeout(Duration::from_secs(2), writer.send(&Frame::Reject { code, message })).await;
    writer.close().await;
}

enum Handshake {
    Accepted(String, Frame<'static>, Box<auth::SessionKeys>),
    Rejected(RejectCode, String),
    Failed(String),
}

/// The handshake with a new link; `capabilities` gets the bits of the agent's `Hello`.
async fn handshake(
    ctl: &Controller,
    reader: &mut LinkReader,
    writer: &mut LinkWriter,
    capabilities: &mut u32,
) -> Handshake {
    let ping_ms = ctl.timing.ping_interval.as_millis().min(u32::MAX as u128) as u32;
    let mut hs = ServerHandshake::new(auth::random_nonce(), ping_ms);
    loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return Handshake::Failed("closed during the handshake".into()),
            Err(e) => {
                let msg = e.to_string();
                return match e {
                    LinkError::Io(_) => Handshake::Failed(msg),
                    _ => Handshake::Rejected(RejectCode::ProtocolError, msg),
                };
            }
        };
        if let Frame::Hello { capabilities: c, .. } = frame {
            *capabilities = c;
        }
        let step = match hs.on_frame(&frame) {
            ServerStep::LookupNode(name) => {
                let secret = ctl.secret_if_known(name);
                hs.on_secret(secret.as_deref())
            }
            other => other,
        };
        match step {
            ServerStep::Send(f) => {
                if let Err(e) = writer.send(&f).await {
                    return Handshake::Failed(e.to_string());
                }
            }
            ServerStep::Accept(welcome) => {
                let keys = hs.session_keys().expect("keys exist once the agent is accepted").clone();
                return Handshake::Accepted(hs.name().to_string(), welcome, Box::new(keys));
            }
            ServerStep::Reject(code, m) => return Handshake::Rejected(code, m),
            ServerStep::LookupNode(_) => unreachable!("answered above"),
        }
    }
}

/// Serve one agent link from its first frame to its end.
pub async fn serve(ctl: Arc<Controller>, mut reader: LinkReader, mut writer: LinkWriter, peer: String) {
    let limit = ctl.timing.handshake_timeout;
    let mut capabilities = 0;
    let (name, old) = match timeout(limit, handshake(&ctl, &mut reader, &mut writer, &mut capabilities)).await
    {
        None => {
            ctl.noisy.warn(
                "handshake-timeout",
                &format!("agent link from {peer}: handshake not finished within {limit:?}, closing"),
            );
            reject(&mut writer, RejectCode::ProtocolError, "handshake timed out").await;
            ctl.metrics.handshake_failed("timeout");
            return;
        }
        Some(Handshake::Failed(m)) => {
            ctl.noisy.warn("handshake-failed", &format!("agent link from {peer}: {m}"));
            ctl.metrics.handshake_failed("link_failed");
            return;
        }
        Some(Handshake::Rejected(code, m)) => {
            ctl.metrics.handshake_failed(reject_reason(code));
            let n = source(&peer).map_or(0, |ip| ctl.failures.record(ip));
            if n > MAX_FAILURES {
                // Only failures are slowed, and their lines counted: a correct handshake from the
                // same address (every agent behind a proxy) is never affected.
                ctl.noisy.warn(
                    "handshake-rejected-slowed",
                    &format!(
                        "agent link from {peer}: rejected ({code:?}): {m} ({n} failures from this address in {}s: answers slowed by {}s)",
                        FAILURE_WINDOW.as_secs(),
                        FAILURE_DELAY.as_secs()
                    ),
                );
                smol::Timer::after(FAILURE_DELAY).await;
            } else {
                log::warn!("agent link from {peer}: rejected ({code:?}): {m}");
            }
            reject(&mut writer, code, &m).await;
            return;
        }
        Some(Handshake::Accepted(name, welcome, keys)) => {
            // A node that is still connected is refused only if its old link answers a ping:
            // a proxy may have dropped that link silently.
            let old = ctl.session_of(&name);
            if let Some(old) = &old {
                if old.is_alive(STALE_CHECK).await {
                    log::warn!("node {name}: refused a second link from {peer}: link {} is alive", old.id);
                    let m = format!(
                        "node '{name}' is already connected from {} and answers pings; stop that agent first",
                        old.peer
                    );
                    reject(&mut writer, RejectCode::AlreadyConnected, &m).await;
                    return;
                }
                log::warn!(
                    "node {name}: old link {} did not answer a ping in {}s, replacing it",
                    old.id,
                    STALE_CHECK.as_secs()
                );
                old.shut();
                ctl.detach(old, "replaced by a new connection");
            }
            if let Err(e) = writer.send(&welcome).await {
                log::warn!("node {name}: {e}");
                return;
            }
            // Every frame from here on is authenticated both ways.
            writer.authenticate(&keys.to_agent, keys.version);
            reader.authenticate(&keys.to_controller, keys.version);
            (name, old)
        }
    };
    // The agent's first word after Welcome: the steps it still holds.
    let held: Vec<(u64, u32, u64)> = match timeout(limit, reader.next()).await {
        Some(Ok(Some(Frame::Running { steps }))) => steps.iter().collect(),
        Some(Ok(Some(other))) => {
            let m =
                format!("expected the agent's Running list after Welcome, got {}", auth::frame_kind(&other));
            log::warn!("node {name}: {m}");
            reject(&mut writer, RejectCode::ProtocolError, &m).await;
            return;
        }
        Some(Err(e)) => {
            log::warn!("node {name}: {e}");
            if !matches!(e, LinkError::Io(_)) {
                reject(&mut writer, RejectCode::ProtocolError, &e.to_string()).await;
            }
            return;
        }
        Some(Ok(None)) => return log::warn!("node {name}: closed before listing its steps"),
        None => {
            log::warn!("node {name}: no step list within {limit:?}, closing");
            reject(&mut writer, RejectCode::ProtocolError, "step list timed out").await;
            return;
        }
    };
    let (tx, rx) = out_queue(OUT_QUEUE);
    let websocket = reader.is_websocket();
    let credit = if reader.is_kafka() { steps::KAFKA_STEP_CREDIT } else { STEP_CREDIT };
    let session = Arc::new(Session {
        capabilities,
        websocket,
        credit,
        ..Session::new(ctl.session_id(), &name, &peer, tx)
    });
    let told = ctl.reconcile(&name, &held);
    ctl.metrics.replayed(told.replayed);
    let ping = ctl.timing.ping_interval;
    let alarm = ctl.deadlines.coarse_until(Instant::now() + ping, keepalive_grid(ping));
    let writer_task = ctl.ex.spawn(write_loop(writer, rx, session.clone(), ping, alarm));
    for (build, step, offset) in told.resume {
        let f = Frame::Resume { build, step, offset, credit: session.credit };
        let _ = session.tx.send(Out::Frame(f)).await;
    }
    for (build, step) in told.abandon {
        let _ = session.tx.send(Out::Frame(Frame::Abandon { build, step })).await;
    }
    if !ctl.attach(&session, old.as_ref()) {
        let _ = session.tx.send(Out::Close("another agent took this node meanwhile; retrying".into())).await;
        session.tx.close();
        let mut writer = writer_task.await;
        writer.close().await;
        return;
    }
    if capabilities & proto::CAP_AGENT_INFO != 0 {
        let _ = session.tx.try_send(Out::Frame(Frame::InfoRequest));
    }
    let why = read_loop(&ctl, &session, &mut reader).await;
    session.shut();
    ctl.detach(&session, &why);
    // The writer ends when the channel closes; stop it at once instead of draining to a dead peer.
    session.tx.close();
    let mut writer = writer_task.await;
    writer.close().await;
}

/// Write frames from `rx` to the agent until it closes, a ping every `ping` whatever else is sent,
/// and close the link once no frame has come from the agent for `DEAD_AFTER_PINGS` pings. Both
/// wait on `alarm`, a deadline on the controller's shared timer: no reactor timer per link, and
/// the reader, which only notes when each frame came, is never woken for a check.
async fn write_loop(
    mut writer: LinkWriter,
    rx: Receiver<Box<Out>>,
    session: Arc<Session>,
    ping: Duration,
    mut alarm: Coarse,
) -> LinkWriter {
    // Where a StepStart's environment is encoded: made for the first step, so an idle link costs
    // nothing here.
    let mut env = Vec::new();
    let mut ping_id = 0u64;
    let dead_after = ping * DEAD_AFTER_PINGS;
    let mut next_ping = Instant::now() + ping;
    loop {
        let next = smol::future::or(async { rx.recv().await.ok().map(|b| *b) }, async {
            loop {
                (&mut alarm).await;
                let now = Instant::now();
                let last = session.last_frame.load(Ordering::Relaxed);
                let quiet = Duration::from_millis(millis().saturating_sub(last));
                if quiet >= dead_after {
                    session.silent.store(true, Ordering::SeqCst);
                    session.shut();
                    return None;
                }
                let ping_due = now >= next_ping;
                if ping_due {
                    next_ping = now + ping;
                }
                // A live agent sends a frame at least every ping interval, so the next ping
                // comes first and the silence is checked along with it.
                alarm.set_at(next_ping.min(now + (dead_after - quiet)));
                if ping_due {
                    ping_id += 1;
                    session.ping_at.store(micros(), Ordering::Relaxed);
                    session.ping_sent.store(ping_id, Ordering::Relaxed);
                    return Some(Out::Frame(Frame::Ping { id: ping_id }));
                }
            }
        })
        .await;
        let Some(out) = next else { break };
        let result = match &out {
            Out::Frame(f) => writer.send(f).await,
            Out::Start { build, step, workspace, container, spec } => {
                let vars = spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                if env.is_empty() {
                    env = vec![0u8; proto::MAX_FRAME];
                }
                match proto::encode_env(vars, &mut env) {
                    Ok(env) => {
                        let f = Frame::StepStart(StepStart {
                            build: *build,
                            step: *step,
                            timeout_secs: spec.timeout_secs,
                            credit: session.credit,
                            workspace,
                            dir: &spec.dir,
                            shell: &spec.shell,
                            script: &spec.script,
                            env,
                            container,
                        });
                        writer.send(&f).await
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Out::Put { build, step, offset, data } => {
                writer.send(&Frame::Put { build: *build, step: *step, offset: *offset, data }).await
            }
            Out::Close(m) => {
                let message = crate::text::truncate(m, proto::MAX_MESSAGE);
                let _ = writer.send(&Frame::Reject { code: RejectCode::ProtocolError, message }).await;
                break;
            }
        };
        if let Err(e) = result {
            log::debug!("agent link writer: {e}");
            break;
        }
    }
    writer
}

/// Read frames until the link ends; returns why it ended.
async fn read_loop(ctl: &Arc<Controller>, session: &Arc<Session>, reader: &mut LinkReader) -> String {
    let dead_after = ctl.timing.ping_interval * DEAD_AFTER_PINGS;
    // Closed by the writer for the agent's silence (see `write_loop`), or by the controller.
    let closed = || {
        if session.silent.load(Ordering::SeqCst) {
            format!("no frame for {}s (missed pings)", dead_after.as_secs())
        } else {
            "closed by the controller".into()
        }
    };
    let node = session.node.as_str();
    loop {
        let listener = session.close.listen();
        if session.closing.load(Ordering::SeqCst) {
            return closed();
        }
        let next = smol::future::or(async { Some(reader.next().await) }, async {
            listener.await;
            None
        })
        .await;
        let frame = match next {
            None => return closed(),
            Some(Ok(None)) => return "the agent closed the connection".into(),
            Some(Err(e)) => {
                if !matches!(e, LinkError::Io(_)) {
                    let _ = session.tx.try_send(Out::Close(e.to_string()));
                }
                return e.to_string();
            }
            Some(Ok(Some(f))) => f,
        };
        session.last_frame.store(millis(), Ordering::Relaxed);
        match frame {
            Frame::Output { build, step, offset, data } => {
                let Some(slot) = ctl.steps.on_node(build, step, node) else {
                    log::warn!("node {node}: output for unknown build {build} step {step} dropped");
                    continue;
                };
                match slot.output(offset, data) {
                    Ok(true) => {
                        ctl.ex.spawn(steps::flush(ctl.clone(), slot)).detach();
                    }
                    Ok(false) => {}
                    Err(m) => {
                        let _ = session.tx.try_send(Out::Close(m.clone()));
                        return m;
                    }
                }
            }
            Frame::Exit { build, step, status, offset, message } => {
                let Some(slot) = ctl.steps.on_node(build, step, node) else {
                    log::warn!("node {node}: exit for unknown build {build} step {step}");
                    continue;
                };
                match slot.exit(status, message, offset) {
                    Ok(Some(at)) => {
                        let _ = session.tx.send(Out::Frame(Frame::Ack { build, step, offset: at })).await;
                    }
                    Ok(None) => {}
                    Err(m) => {
                        let _ = session.tx.try_send(Out::Close(m.clone()));
                        return m;
                    }
                }
            }
            Frame::Taken { build, step, offset } => match ctl.steps.on_node(build, step, node) {
                Some(slot) => slot.taken(offset, session.id),
                None => log::debug!("node {node}: taken for unknown build {build} step {step}"),
            },
            Frame::Ping { id } => {
                let _ = session.tx.send(Out::Frame(Frame::Pong { id })).await;
            }
            Frame::AgentInfo { version, arch, os } => {
                // Shown on the web page and by `wisp nodes`: printable ASCII and spaces only (the
                // codec bounds the lengths).
                let clean =
                    |s: &str| s.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').collect::<String>();
                *session.info.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((clean(version), clean(arch), clean(os)));
            }
            Frame::Pong { id } => {
                if id == session.ping_sent.load(Ordering::Relaxed) {
                    let rtt = micros().saturating_sub(session.ping_at.load(Ordering::Relaxed));
                    session.rtt_us.store(rtt.max(1), Ordering::Relaxed);
                }
                session.last_pong.store(id, Ordering::SeqCst);
                session.pong.notify(usize::MAX);
            }
            other => {
                let m =
                    format!("protocol error: unexpected {} frame from the agent", auth::frame_kind(&other));
                let _ = session.tx.try_send(Out::Close(m.clone()));
                return m;
            }
        }
    }
}

/// A refusal's reason as a metric label.
fn reject_reason(code: RejectCode) -> &'static str {
    match code {
        RejectCode::UnknownNode => "unknown_node",
        RejectCode::WrongSecret => "wrong_secret",
        RejectCode::UnsupportedVersion => "unsupported_version",
        RejectCode::AlreadyConnected => "already_connected",
        RejectCode::ProtocolError => "protocol_error",
        RejectCode::TryLater => "try_later",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

/// What to tell a reconnected agent about the steps it holds.
pub struct Reconciled {
    /// Go on from the stored offset: (build, step, offset).
    pub resume: Vec<(u64, u32, u64)>,
    /// Kill and forget: (build, step).
    pub abandon: Vec<(u64, u32)>,
    /// Output bytes the agent sends again (what it produced past what is stored).
    pub replayed: u64,
}

/// A reconnected agent's list of the steps it holds, against the steps the controller started on
/// its node: which to resume (from the offset on disk) and which to abandon. `lost` gets each
/// started step the agent no longer has, with why.
pub fn reconcile(
    node: &str,
    held: &[(u64, u32, u64)],
    started: &[Arc<steps::Slot>],
    away: Option<Duration>,
) -> Reconciled {
    let mut resume = Vec::new();
    let mut abandon = Vec::new();
    let mut replayed = 0;
    for &(b, s, produced) in held {
        match started.iter().find(|k| (k.build, k.step) == (b, s)) {
            Some(slot) if produced >= slot.stored() => {
                let stored = slot.stored();
                log::info!(
                    "build {b} step {s}: resumed on node {node} after {:.1}s offline: controller has {stored} bytes, \
                     agent replays {} bytes",
                    away.unwrap_or_default().as_secs_f64(),
                    produced - stored
                );
                resume.push((b, s, stored));
                replayed += produced - stored;
            }
            Some(slot) => {
                let m = format!(
                    "agent '{node}' has {produced} output bytes but the controller stored {}: output lost",
                    slot.stored()
                );
                log::error!("build {b} step {s}: {m}");
                slot.tell(StepEvent::Lost(m));
                abandon.push((b, s));
            }
            None => {
                log::info!("build {b} step {s}: node {node} still holds it, but it is over; abandoning it");
                abandon.push((b, s));
            }
        }
    }
    for slot in started {
        if !held.iter().any(|h| (h.0, h.1) == (slot.build, slot.step)) {
            let m = format!("agent '{node}' came back without this step (was the agent restarted?)");
            log::warn!("build {} step {}: {m}", slot.build, slot.step);
            slot.set_started(false);
            slot.tell(StepEvent::Lost(m));
        }
    }
    Reconciled { resume, abandon, replayed }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejection_longer_than_the_limit_is_cut_between_characters() {
        smol::block_on(async {
            let (a, b) = smol::net::unix::UnixStream::pair().unwrap();
            let (_, mut writer) = crate::link::tcp(Box::pin(a));
            let (mut reader, _) = crate::link::tcp(Box::pin(b));
            // One byte, then two-byte characters: the limit falls inside one of them.
            let message = format!("x{}", "é".repeat(proto::MAX_MESSAGE));
            reject(&mut writer, RejectCode::ProtocolError, &message).await;
            match reader.next().await.unwrap() {
                Some(Frame::Reject { message: got, .. }) => {
                    assert_eq!(got.len(), proto::MAX_MESSAGE - 1);
                    assert!(message.starts_with(got));
                }
                other => panic!("{other:?}"),
            }
        });
    }
}
