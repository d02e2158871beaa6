//! The controller's side of agent links: the handshake, the "already connected" check, and the
//! reader and writer loops that store output, grant credit and keep the link alive.

use super::core::{millis, Conn, Controller, Out, StepEnd, STEP_CREDIT};
use super::deadlines::Coarse;
use crate::auth::{self, ServerHandshake, ServerStep};
use crate::link::{LinkError, LinkReader, LinkWriter};
use crate::proto::{self, Frame, RejectCode, StepStart};
use event_listener::Event;
use smol::channel::{bounded, Receiver};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an agent has to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old link of a reconnecting node has to answer a ping before it is replaced.
pub const STALE_CHECK: Duration = Duration::from_secs(3);
/// A link is declared dead after this many ping intervals without a frame from the agent.
pub const DEAD_AFTER_PINGS: u32 = 3;

/// The grid that every link's ping and silence deadlines are rounded up to (see
/// [`super::deadlines::Coarse`]): 1/256 of the ping interval, from 10 to 100 ms. Coarser would
/// mean fewer wake-ups, but also longer bursts of pings that a build dispatched meanwhile waits
/// behind (with 10,000 agents and a 1 s grid: 30-90 ms every second).
fn keepalive_grid(ping: Duration) -> Duration {
    (ping / 256).clamp(Duration::from_millis(10), Duration::from_millis(100))
}

/// Frames waiting to be written to one agent.
const OUT_QUEUE: usize = 64;
/// Output credit is granted back in batches of this many bytes (a quarter of the window).
const CREDIT_BATCH: u32 = STEP_CREDIT / 4;
/// Failed handshakes one source address may have within `FAILURE_WINDOW`; after that its new links
/// are refused until the window has passed (a proxy in front counts as one address).
pub const MAX_FAILURES: u32 = 10;
/// The window over which failed handshakes are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Failed handshakes by source address: (start of the window, failures in it).
static FAILURES: std::sync::Mutex<Option<HashMap<IpAddr, (Instant, u32)>>> = std::sync::Mutex::new(None);

fn source(peer: &str) -> Option<IpAddr> {
    peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

/// Failures of `ip` in the current window (0 once the window is over).
fn failures(ip: IpAddr) -> u32 {
    let mut map = FAILURES.lock().unwrap_or_else(|e| e.into_inner());
    let map = map.get_or_insert_with(HashMap::new);
    match map.get(&ip) {
        Some((since, n)) if since.elapsed() < FAILURE_WINDOW => *n,
        Some(_) => {
            map.remove(&ip);
            0
        }
        None => 0,
    }
}

fn record_failure(ip: IpAddr) {
    let mut map = FAILURES.lock().unwrap_or_else(|e| e.into_inner());
    let map = map.get_or_insert_with(HashMap::new);
    if map.len() > 100_000 {
        map.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
    }
    let e = map.entry(ip).or_insert((Instant::now(), 0));
    if e.0.elapsed() >= FAILURE_WINDOW {
        *e = (Instant::now(), 0);
    }
    e.1 += 1;
}

async fn timeout<T>(d: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(fut.await) }, async {
        smol::Timer::after(d).await;
        None
    })
    .await
}

async fn reject(writer: &mut LinkWriter, code: RejectCode, message: &str) {
    let msg = if message.len() > proto::MAX_MESSAGE { &message[..proto::MAX_MESSAGE] } else { message };
    let _ = timeout(Duration::from_secs(2), writer.send(&Frame::Reject { code, message: msg })).await;
    writer.close().await;
}

enum Handshake {
    Accepted(String, Frame<'static>, auth::SessionKeys),
    Rejected(RejectCode, String),
    Failed(String),
}

async fn handshake(ctl: &Controller, reader: &mut LinkReader, writer: &mut LinkWriter) -> Handshake {
    let ping_ms = ctl.ping_interval.as_millis().min(u32::MAX as u128) as u32;
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
        let step = match hs.on_frame(&frame) {
            ServerStep::LookupNode(name) => {
                let name = name.to_string();
                let secret = ctl.secret_if_known(&name);
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
                return Handshake::Accepted(hs.name().to_string(), welcome, keys);
            }
            ServerStep::Reject(code, m) => return Handshake::Rejected(code, m),
            ServerStep::LookupNode(_) => unreachable!("answered above"),
        }
    }
}

/// Serve one agent link from its first frame to its end. Only this link is affected by
/// anything the peer sends.
pub async fn serve(ctl: Arc<Controller>, mut reader: LinkReader, mut writer: LinkWriter, peer: String) {
    let limit = ctl.handshake_timeout;
    let ip = source(&peer);
    if let Some(ip) = ip {
        let n = failures(ip);
        if n >= MAX_FAILURES {
            log::warn!(
                "agent link from {peer}: refused: {n} failed handshakes from {ip} in the last {}s",
                FAILURE_WINDOW.as_secs()
            );
            let m =
                format!("too many failed handshakes from {ip}; try again in {}s", FAILURE_WINDOW.as_secs());
            reject(&mut writer, RejectCode::ProtocolError, &m).await;
            return;
        }
    }
    let name = match timeout(limit, handshake(&ctl, &mut reader, &mut writer)).await {
        None => {
            log::warn!("agent link from {peer}: handshake not finished within {limit:?}, closing");
            reject(&mut writer, RejectCode::ProtocolError, "handshake timed out").await;
            return;
        }
        Some(Handshake::Failed(m)) => {
            log::warn!("agent link from {peer}: {m}");
            return;
        }
        Some(Handshake::Rejected(code, m)) => {
            log::warn!("agent link from {peer}: rejected ({code:?}): {m}");
            if let Some(ip) = ip {
                record_failure(ip);
            }
            reject(&mut writer, code, &m).await;
            return;
        }
        Some(Handshake::Accepted(name, welcome, keys)) => {
            // A node that is still connected is refused only if its old link answers a ping:
            // a proxy may have dropped that link silently.
            let old = ctl.conn_of(&name);
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
            writer.authenticate(&keys.to_agent);
            reader.authenticate(&keys.to_controller);
            (name, old)
        }
    };
    let (name, old) = name;
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
    let (tx, rx) = bounded(OUT_QUEUE);
    let conn = Arc::new(Conn {
        id: ctl.conn_id(),
        node: name.clone(),
        peer,
        tx,
        last_pong: AtomicU64::new(0),
        pong: Event::new(),
        last_frame: AtomicU64::new(millis()),
        silent: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        close: Event::new(),
    });
    let told = ctl.reconcile(&name, &held);
    let alarm =
        ctl.deadlines.coarse_until(Instant::now() + ctl.ping_interval, keepalive_grid(ctl.ping_interval));
    let writer_task = ctl.ex.spawn(write_loop(writer, rx, conn.clone(), ctl.ping_interval, alarm));
    for (build, step, offset) in told.resume {
        let _ = conn.tx.send(Out::Resume { build, step, offset }).await;
    }
    for (build, step) in told.abandon {
        let _ = conn.tx.send(Out::Abandon { build, step }).await;
    }
    if !ctl.attach(&conn, old.as_ref()) {
        let _ = conn.tx.send(Out::Close("another agent took this node meanwhile; retrying".into())).await;
        conn.tx.close();
        let mut writer = writer_task.await;
        writer.close().await;
        return;
    }
    let why = read_loop(&ctl, &conn, &mut reader).await;
    conn.shut();
    ctl.detach(&conn, &why);
    // The writer ends when the channel closes; stop it at once instead of draining to a dead peer.
    conn.tx.close();
    let mut writer = writer_task.await;
    writer.close().await;
}

/// Write frames from `rx` to the agent until it closes, a ping every `ping` whatever else is sent,
/// and close the link once no frame has come from the agent for `DEAD_AFTER_PINGS` pings. Both
/// wait on `alarm`, a deadline on the controller's shared timer: no reactor timer per link, and
/// the reader, which only notes when each frame came, is never woken for a check.
async fn write_loop(
    mut writer: LinkWriter,
    rx: Receiver<Out>,
    conn: Arc<Conn>,
    ping: Duration,
    mut alarm: Coarse,
) -> LinkWriter {
    let mut env = vec![0u8; proto::MAX_FRAME].into_boxed_slice();
    let mut ping_id = 0u64;
    let dead_after = ping * DEAD_AFTER_PINGS;
    let mut next_ping = Instant::now() + ping;
    loop {
        let next = smol::future::or(async { rx.recv().await.ok() }, async {
            loop {
                (&mut alarm).await;
                let now = Instant::now();
                let last = conn.last_frame.load(Ordering::Relaxed);
                let quiet = Duration::from_millis(millis().saturating_sub(last));
                if quiet >= dead_after {
                    conn.silent.store(true, Ordering::SeqCst);
                    conn.shut();
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
                    return Some(Out::Ping(ping_id));
                }
            }
        })
        .await;
        let Some(out) = next else { break };
        let result = match &out {
            Out::StepStart { build, step, workspace, spec } => {
                let vars = spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                match proto::encode_env(vars, &mut env) {
                    Ok(env) => {
                        let f = Frame::StepStart(StepStart {
                            build: *build,
                            step: *step,
                            timeout_secs: spec.timeout_secs,
                            credit: STEP_CREDIT,
                            workspace,
                            dir: &spec.dir,
                            shell: &spec.shell,
                            script: &spec.script,
                            env,
                        });
                        writer.send(&f).await
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Out::Credit { build, step, bytes, stored } => {
                writer
                    .send(&Frame::Credit { build: *build, step: *step, bytes: *bytes, stored: *stored })
                    .await
            }
            Out::Resume { build, step, offset } => {
                let f = Frame::Resume { build: *build, step: *step, offset: *offset, credit: STEP_CREDIT };
                writer.send(&f).await
            }
            Out::Abandon { build, step } => writer.send(&Frame::Abandon { build: *build, step: *step }).await,
            Out::Ack { build, step, offset } => {
                writer.send(&Frame::Ack { build: *build, step: *step, offset: *offset }).await
            }
            Out::Cancel { build, step } => writer.send(&Frame::Cancel { build: *build, step: *step }).await,
            Out::Ping(id) => writer.send(&Frame::Ping { id: *id }).await,
            Out::Pong(id) => writer.send(&Frame::Pong { id: *id }).await,
            Out::Close(m) => {
                let _ = writer.send(&Frame::Reject { code: RejectCode::ProtocolError, message: m }).await;
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
async fn read_loop(ctl: &Controller, conn: &Arc<Conn>, reader: &mut LinkReader) -> String {
    let dead_after = ctl.ping_interval * DEAD_AFTER_PINGS;
    // Credit owed to the agent for output stored but not yet granted back: granted in batches of
    // CREDIT_BATCH, so a fast stream costs one Credit frame per 64 KiB instead of one per output
    // frame (a pipe read often brings less than a full frame). The batch is well under the step's
    // credit window, so the agent never stalls waiting for it; the Ack of the step's exit settles
    // whatever is still owed.
    let mut owed: Option<((u64, u32), u32, u64)> = None;
    // Closed by the writer for the agent's silence (see `write_loop`), or by the controller.
    let closed = || {
        if conn.silent.load(Ordering::SeqCst) {
            format!("no frame for {}s (missed pings)", dead_after.as_secs())
        } else {
            "closed by the controller".into()
        }
    };
    loop {
        let listener = conn.close.listen();
        if conn.closing.load(Ordering::SeqCst) {
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
                    let _ = conn.tx.try_send(Out::Close(e.to_string()));
                }
                return e.to_string();
            }
            Some(Ok(Some(f))) => f,
        };
        conn.last_frame.store(millis(), Ordering::Relaxed);
        match frame {
            Frame::Output { build, step, offset, data } => {
                let stored = match store_output(ctl, conn, build, step, offset, data) {
                    Ok(stored) => stored,
                    Err(m) => {
                        let _ = conn.tx.try_send(Out::Close(m.clone()));
                        return m;
                    }
                };
                let key = (build, step);
                if let Some((k, bytes, stored)) = owed.take_if(|(k, _, _)| *k != key) {
                    let credit = Out::Credit { build: k.0, step: k.1, bytes, stored };
                    if conn.tx.send(credit).await.is_err() {
                        return "writer closed".into();
                    }
                }
                let due = owed.map_or(0, |(_, b, _)| b) + data.len() as u32;
                if due >= CREDIT_BATCH {
                    owed = None;
                    if conn.tx.send(Out::Credit { build, step, bytes: due, stored }).await.is_err() {
                        return "writer closed".into();
                    }
                } else {
                    owed = Some((key, due, stored));
                }
            }
            Frame::Exit { build, step, status, offset, message } => {
                owed.take_if(|(k, _, _)| *k == (build, step));
                // Decide under the lock, act after it: the lock is never held across an await.
                let stored = {
                    let sinks = ctl.steps();
                    sinks.get(&(build, step)).filter(|s| s.node == conn.node).map(|sink| {
                        if sink.offset == offset {
                            let _ = sink.done.try_send(StepEnd::Exit(status, message.to_string()));
                        }
                        sink.offset
                    })
                };
                match stored {
                    Some(have) if have != offset => {
                        let m = format!(
                            "build {build} step {step}: exit says {offset} output bytes but {have} arrived"
                        );
                        let _ = conn.tx.try_send(Out::Close(m.clone()));
                        return m;
                    }
                    Some(have) => {
                        let _ = conn.tx.send(Out::Ack { build, step, offset: have }).await;
                    }
                    None => log::warn!("node {}: exit for unknown build {build} step {step}", conn.node),
                }
            }
            Frame::Ping { id } => {
                let _ = conn.tx.send(Out::Pong(id)).await;
            }
            Frame::Pong { id } => {
                conn.last_pong.store(id, Ordering::SeqCst);
                conn.pong.notify(usize::MAX);
            }
            other => {
                let m =
                    format!("protocol error: unexpected {} frame from the agent", auth::frame_kind(&other));
                let _ = conn.tx.try_send(Out::Close(m.clone()));
                return m;
            }
        }
    }
}

/// Append output to its step's log, dropping bytes already stored (a replay) and refusing gaps.
/// Returns the stored length.
fn store_output(
    ctl: &Controller,
    conn: &Conn,
    build: u64,
    step: u32,
    offset: u64,
    data: &[u8],
) -> Result<u64, String> {
    let mut sinks = ctl.steps();
    let Some(sink) = sinks.get_mut(&(build, step)).filter(|s| s.node == conn.node) else {
        log::warn!("node {}: output for unknown build {build} step {step} dropped", conn.node);
        return Ok(offset + data.len() as u64);
    };
    if offset > sink.offset {
        return Err(format!(
            "build {build} step {step}: output at offset {offset} but only {} bytes stored",
            sink.offset
        ));
    }
    let skip = (sink.offset - offset) as usize;
    if skip >= data.len() {
        return Ok(sink.offset);
    }
    let fresh = &data[skip..];
    if let Err(e) = sink.file.write_all(fresh) {
        return Err(format!("build {build} step {step}: cannot write the log: {e}"));
    }
    sink.offset += fresh.len() as u64;
    sink.build.output.notify(usize::MAX);
    Ok(sink.offset)
}
