//! The steps that are running: where their output goes and how their end reaches the runner.
//!
//! A step belongs to the controller, not to a link: it outlives the link it started on, and
//! whichever link its agent has delivers its output and exit here. Output is appended to the
//! step's log off the executor; credit goes back to the agent only for bytes on disk, so a full
//! disk stops the agent's output (it waits in the agent's spool) instead of losing it, and the
//! link stays up while the step is stalled. The runner holds a [`StepHandle`]: a bounded stream of
//! the step's events.

use super::build::LiveBuild;
use super::logs::{self, StepLog};
use super::Controller;
use crate::proto::{ExitStatus, Frame};
use smol::channel::{bounded, Receiver, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Output bytes an agent may send per step before the controller grants more
/// ([`proto::STEP_WINDOW`](crate::proto::STEP_WINDOW)): enough to keep a loopback link busy,
/// small enough that a stalled controller holds the step's pipe, not memory, and never more than
/// the agent holds in memory.
pub const STEP_CREDIT: u32 = crate::proto::STEP_WINDOW as u32;
/// The credit window of a step whose agent goes through Kafka: a round trip there is a produce
/// and a fetch each way (tens of ms), and one window per round trip is the most a stream gets.
pub const KAFKA_STEP_CREDIT: u32 = 4 << 20;
/// Output credit is granted back in batches of this many bytes (half the window: the agent
/// always has the other half to send while the grant travels), so a fast stream costs one Credit
/// frame per 32 KiB stored, one per output frame at most.
pub const CREDIT_BATCH: u32 = STEP_CREDIT / 2;
/// How long a step whose log cannot be written waits before the write is tried again.
pub const WRITE_RETRY: Duration = Duration::from_secs(1);
/// Events that may wait for the runner: a step has one exit and a few stall changes.
const EVENT_QUEUE: usize = 16;

/// What happens to a step, as its runner learns it.
#[derive(Debug)]
pub enum StepEvent {
    /// The agent reported an exit and every output byte before it is stored.
    Exit(ExitStatus, String),
    /// The step's agent can no longer deliver it.
    Lost(String),
    /// The step's output cannot be stored (why); the agent holds it meanwhile.
    Stalled(String),
    /// Output is stored again after a stall.
    Flowing,
}

/// The runner's end of a step.
pub struct StepHandle {
    /// The step.
    pub slot: Arc<Slot>,
    /// Its events.
    pub events: Receiver<StepEvent>,
}

/// A running step.
pub struct Slot {
    /// Build number.
    pub build: u64,
    /// Step index.
    pub step: u32,
    /// The node it runs on.
    pub node: String,
    started: AtomicBool,
    /// For an unpack step: how far the agent has taken the archive, and on which link it said so.
    taken: Mutex<(u64, u64)>,
    live: Arc<LiveBuild>,
    out: Mutex<Output>,
    events: Sender<StepEvent>,
}

/// Output on its way to the log.
struct Output {
    /// None while a write is in flight (the writer has it).
    log: Option<StepLog>,
    /// Bytes on disk (kept here too while the writer holds the log).
    stored: u64,
    /// Bytes taken from the agent: `stored` plus `pending`.
    received: u64,
    /// Taken but not yet on disk (at most the credit window).
    pending: Vec<u8>,
    /// A write is in flight or waiting to be retried.
    writing: bool,
    /// The agent's exit, delivered once `stored` reaches its offset.
    exit: Option<(ExitStatus, String, u64)>,
    /// Credit owed to the agent for bytes stored since the last grant.
    owed: u32,
    /// Why output cannot be stored right now.
    stalled: bool,
}

impl Slot {
    fn out(&self) -> MutexGuard<'_, Output> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the StepStart went out (the agent may hold the step).
    pub fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// Mark the StepStart as sent (or, after a failed send, as not).
    pub fn set_started(&self, yes: bool) {
        self.started.store(yes, Ordering::SeqCst);
    }

    /// An unpack step's agent has taken its archive up to `offset` (said on link `link`).
    pub fn taken(&self, offset: u64, link: u64) {
        *self.taken.lock().unwrap_or_else(|e| e.into_inner()) = (offset, link);
        self.live.output.notify(usize::MAX);
    }

    /// How far the agent has taken an unpack step's archive, and the link it said so on (0:
    /// not yet).
    pub fn taken_at(&self) -> (u64, u64) {
        *self.taken.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Output bytes on disk.
    pub fn stored(&self) -> u64 {
        self.out().stored
    }

    /// Tell the runner something it cannot miss (the queue has room for a step's few events).
    pub fn tell(&self, ev: StepEvent) {
        let _ = self.events.try_send(ev);
    }

    /// Take output that the agent sent from `offset`: bytes already taken (a replay) are dropped
    /// and a gap is refused. Returns true when a writer must be started ([`flush`]).
    pub fn output(&self, offset: u64, data: &[u8]) -> Result<bool, String> {
        let mut o = self.out();
        if offset > o.received {
            return Err(format!(
                "build {} step {}: output at offset {offset} but only {} bytes arrived",
                self.build, self.step, o.received
            ));
        }
        let skip = (o.received - offset) as usize;
        if skip >= data.len() {
            return Ok(false);
        }
        let fresh = &data[skip..];
        o.pending.extend_from_slice(fresh);
        o.received += fresh.len() as u64;
        let start = !o.writing;
        o.writing = true;
        Ok(start)
    }

    /// The agent's exit after `offset` output bytes. Returns the offset to acknowledge now when
    /// every byte is already stored; otherwise the writer delivers the exit and the Ack.
    pub fn exit(&self, status: ExitStatus, message: &str, offset: u64) -> Result<Option<u64>, String> {
        let mut o = self.out();
        if offset != o.received {
            return Err(format!(
                "build {} step {}: exit says {offset} output bytes but {} arrived",
                self.build, self.step, o.received
            ));
        }
        if !o.writing && o.stored == offset {
            drop(o);
            self.tell(StepEvent::Exit(status, message.to_string()));
            return Ok(Some(offset));
        }
        o.exit = Some((status, message.to_string(), offset));
        Ok(None)
    }
}

/// Write a step's pending output to its log until none is left, granting credit for what is
/// stored and delivering the exit once everything before it is on disk. A write that fails (a
/// full disk) is retried every [`WRITE_RETRY`]; the step is reported stalled meanwhile.
pub async fn flush(ctl: Arc<Controller>, slot: Arc<Slot>) {
    let mut buf = Vec::new();
    loop {
        let taken = {
            let mut o = slot.out();
            if o.pending.is_empty() {
                o.writing = false;
                let stored = o.stored;
                let exit = o.exit.take_if(|(_, _, at)| *at == stored);
                Err((exit, std::mem::take(&mut o.owed), stored))
            } else {
                std::mem::swap(&mut buf, &mut o.pending);
                Ok(o.log.take().expect("one writer at a time"))
            }
        };
        let log = match taken {
            Ok(log) => log,
            Err((exit, owed, stored)) => {
                if let Some((status, message, at)) = exit {
                    slot.tell(StepEvent::Exit(status, message));
                    ctl.send_to(&slot.node, Frame::Ack { build: slot.build, step: slot.step, offset: at })
                        .await;
                } else if owed > 0 {
                    let credit = Frame::Credit { build: slot.build, step: slot.step, bytes: owed, stored };
                    ctl.send_to(&slot.node, credit).await;
                }
                return;
            }
        };
        let (log, data, result) = smol::unblock(move || {
            let mut log = log;
            let r = log.append(&buf);
            (log, buf, r)
        })
        .await;
        if result.is_ok() {
            ctl.metrics.output(data.len() as u64);
        }
        buf = data;
        // Decided under the lock, acted on after it: the lock is never held across an await.
        enum Next {
            Stored { was_stalled: bool, grant: Option<(u32, u64)> },
            Failed { first: bool, error: std::io::Error },
        }
        let next = {
            let mut o = slot.out();
            o.stored = log.stored();
            o.log = Some(log);
            match result {
                Ok(()) => {
                    o.owed = o.owed.saturating_add(buf.len() as u32);
                    buf.clear();
                    let was_stalled = std::mem::take(&mut o.stalled);
                    let grant = (o.owed >= CREDIT_BATCH).then(|| (std::mem::take(&mut o.owed), o.stored));
                    Next::Stored { was_stalled, grant }
                }
                Err(error) => {
                    // Nothing of `buf` is on disk: it goes back in front of what came meanwhile.
                    buf.extend_from_slice(&o.pending);
                    std::mem::swap(&mut buf, &mut o.pending);
                    buf.clear();
                    Next::Failed { first: !std::mem::replace(&mut o.stalled, true), error }
                }
            }
        };
        match next {
            Next::Stored { was_stalled, grant } => {
                slot.live.output.notify(usize::MAX);
                if was_stalled {
                    log::info!("build {} step {}: output is stored again", slot.build, slot.step);
                    slot.tell(StepEvent::Flowing);
                }
                if let Some((bytes, stored)) = grant {
                    let credit = Frame::Credit { build: slot.build, step: slot.step, bytes, stored };
                    ctl.send_to(&slot.node, credit).await;
                }
            }
            Next::Failed { first, error } => {
                if first {
                    let why = if logs::is_disk_full(&error) {
                        format!(
                            "disk full on the controller: cannot write the step's log ({error}); the agent \
                             holds the output until there is room"
                        )
                    } else {
                        format!("cannot write the step's log on the controller ({error}); retrying")
                    };
                    log::error!("build {} step {}: {why}", slot.build, slot.step);
                    slot.tell(StepEvent::Stalled(why));
                }
                smol::Timer::after(WRITE_RETRY).await;
            }
        }
    }
}

/// The running steps, by (build, step).
#[derive(Default)]
pub struct StepTable {
    map: Mutex<HashMap<(u64, u32), Arc<Slot>>>,
}

impl StepTable {
    fn map(&self) -> MutexGuard<'_, HashMap<(u64, u32), Arc<Slot>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a step on `node` whose output goes to `log`; `started` when the agent already
    /// holds it (picked up after a controller restart).
    pub fn open(
        &self,
        live: &Arc<LiveBuild>,
        step: u32,
        node: &str,
        log: StepLog,
        started: bool,
    ) -> StepHandle {
        let (events, rx) = bounded(EVENT_QUEUE);
        let stored = log.stored();
        let slot = Arc::new(Slot {
            build: live.id,
            step,
            node: node.to_string(),
            started: AtomicBool::new(started),
            taken: Mutex::new((0, 0)),
            live: live.clone(),
            out: Mutex::new(Output {
                log: Some(log),
                stored,
                received: stored,
                pending: Vec::new(),
                writing: false,
                exit: None,
                owed: 0,
                stalled: false,
            }),
            events,
        });
        self.map().insert((live.id, step), slot.clone());
        StepHandle { slot, events: rx }
    }

    /// The step (build, step) if it runs on `node`.
    pub fn on_node(&self, build: u64, step: u32, node: &str) -> Option<Arc<Slot>> {
        self.map().get(&(build, step)).filter(|s| s.node == node).cloned()
    }

    /// Forget a step (its runner is done with it).
    pub fn close(&self, build: u64, step: u32) {
        self.map().remove(&(build, step));
    }

    /// The node of every started step (one entry per step).
    pub fn all_started(&self) -> Vec<String> {
        self.map().values().filter(|s| s.started()).map(|s| s.node.clone()).collect()
    }

    /// The started steps of `node`.
    pub fn started_on(&self, node: &str) -> Vec<Arc<Slot>> {
        self.map().values().filter(|s| s.node == node && s.started()).cloned().collect()
    }
}
