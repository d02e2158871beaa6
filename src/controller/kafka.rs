//! The controller's side of the Kafka transport (see [`crate::transport::kafka`] for the records):
//! one task reads partition `TO_CONTROLLER` of every node's topic in one fetch per broker, from
//! the offset its consumer group ([`GROUP`]) committed, and hands each session's frames to that
//! session's link, which [`super::session::serve`] serves like any other. A session the
//! controller has not seen starts with its frame 0, the agent's `Hello` for the topic's own node;
//! anything else of an unknown session (an agent's records from before the controller
//! restarted, a replay) is passed over.
//!
//! What a hostile writer to a topic can do is bounded: a session that does not finish its
//! handshake ends with the handshake timeout, and at most [`MAX_PENDING`] such sessions per node
//! wait at once (the oldest goes first); a session that did (more than the handshake's frames
//! went through) is never pushed out by new ones.

use super::session;
use super::Controller;
use crate::kafka::{self, Client, KafkaError};
use crate::proto::{self, Frame};
use crate::transport::kafka::{self as wire, Sequence, Take, SESSION_LEN, TO_AGENT, TO_CONTROLLER};
use bytes::Bytes;
use smol::channel::{bounded, Sender};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The consumer group whose offsets say how far the controller has read.
pub const GROUP: &str = "wisp-controller";
/// Sessions per node that have not (yet) gone past their handshake.
pub const MAX_PENDING: usize = 8;
/// Frames queued for one session's link before its partition waits.
const SESSION_QUEUE: usize = 256;
/// Frames of the handshake the agent sends (Hello, Auth): a session past them is established.
const HANDSHAKE_FRAMES: u64 = 2;
/// How often the list of nodes is read again (new nodes get topics).
const REFRESH: Duration = Duration::from_secs(2);
/// How often read offsets are committed.
const COMMIT: Duration = Duration::from_secs(1);

struct Incoming {
    id: [u8; SESSION_LEN],
    seq: Sequence,
    frames: u64,
    tx: Sender<Result<Bytes, String>>,
}

struct Part {
    node: String,
    next: i64,
    committed: i64,
    sessions: Vec<Incoming>,
}

/// Serve Kafka sessions until the controller stops.
pub async fn hub(ctl: Arc<Controller>, cfg: kafka::Config) {
    let mut client = Client::new(cfg.clone());
    let mut parts: BTreeMap<String, Part> = BTreeMap::new();
    let (mut refreshed, mut committed) = (None::<Instant>, Instant::now());
    let mut failures = 0u32;
    let mut wait = wire::Wait::default();
    log::info!("Kafka: serving agents through {}", cfg.brokers.join(", "));
    loop {
        if refreshed.is_none_or(|t| t.elapsed() >= REFRESH) {
            match refresh(&ctl, &mut client, &mut parts).await {
                Ok(()) => refreshed = Some(Instant::now()),
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        log::warn!("Kafka: {e}; trying again");
                    }
                    smol::Timer::after(wire::backoff(failures)).await;
                    continue;
                }
            }
        }
        if parts.is_empty() {
            smol::Timer::after(Duration::from_millis(500)).await;
            refreshed = None;
            continue;
        }
        let asks: Vec<(String, i32, i64)> =
            parts.iter().map(|(t, p)| (t.clone(), TO_CONTROLLER, p.next)).collect();
        match client.fetch_many(&asks, wait.get(), wire::FETCH_BYTES).await {
            Ok(results) => {
                failures = 0;
                let before: i64 = parts.values().map(|p| p.next).sum();
                for ((topic, _), got) in results {
                    let Some(part) = parts.get_mut(&topic) else { continue };
                    match got {
                        Ok(got) => deliver(&ctl, &cfg, &topic, part, got),
                        Err(e) if e.code() == Some(kafka::code::OFFSET_OUT_OF_RANGE) => {
                            log::warn!("Kafka: {e}; reading {topic} from its end");
                            if let Ok(end) = client.end_offset(&topic, TO_CONTROLLER).await {
                                part.next = end;
                            }
                        }
                        Err(e) => log::debug!("Kafka: {e}"),
                    }
                }
                wait.after(parts.values().map(|p| p.next).sum::<i64>() != before);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    log::warn!("Kafka: {e}; trying again");
                }
                smol::Timer::after(wire::backoff(failures)).await;
            }
        }
        if committed.elapsed() >= COMMIT {
            committed = Instant::now();
            for (topic, p) in parts.iter_mut().filter(|(_, p)| p.next != p.committed) {
                match client.commit(GROUP, topic, TO_CONTROLLER, p.next).await {
                    Ok(()) => p.committed = p.next,
                    Err(e) => {
                        log::debug!("Kafka: {e}");
                        break;
                    }
                }
            }
        }
    }
}

/// Take in the nodes made or removed since the last look: a new one gets its topic (made if
/// missing) and is read from where [`GROUP`] left it (its start when the topic is new, the
/// last [`SINCE`] of it when the group never read it).
async fn refresh(
    ctl: &Controller,
    client: &mut Client,
    parts: &mut BTreeMap<String, Part>,
) -> Result<(), KafkaError> {
    let names: Vec<String> = ctl.state().nodes.values().map(|n| n.rec.name.clone()).collect();
    let mut topics = BTreeMap::new();
    for n in names {
        if let Ok(t) = wire::topic(&n) {
            topics.insert(t, n);
        }
    }
    parts.retain(|t, _| topics.contains_key(t));
    for (topic, node) in topics {
        if parts.contains_key(&topic) {
            continue;
        }
        let made = client.create_topic(&topic, 2, wire::TOPIC_CONFIGS).await?;
        let next = match client.committed(GROUP, &topic, TO_CONTROLLER).await? {
            Some(o) => o,
            None if made => 0,
            // Never read: from a little before now, so an agent that connected just before its
            // node was added (or the controller first started) is answered, not what is older.
            None => since(client, &topic, SINCE).await?,
        };
        log::debug!("Kafka: reading {topic} from offset {next}");
        parts.insert(topic, Part { node, next, committed: next, sessions: Vec::new() });
    }
    Ok(())
}

/// How far back a topic the controller has never read is read from.
const SINCE: Duration = Duration::from_secs(30);

async fn since(client: &mut Client, topic: &str, back: Duration) -> Result<i64, KafkaError> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let from = now.saturating_sub(back).as_millis() as i64;
    let mut tries = 0;
    loop {
        match client.offset_since(topic, TO_CONTROLLER, from).await {
            Err(e) if e.code() == Some(kafka::code::UNKNOWN_TOPIC_OR_PARTITION) && tries < 50 => {
                tries += 1;
                smol::Timer::after(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Hand the records of one fetch to their sessions; a full session queue stops the partition at
/// that record (read again from there next time).
fn deliver(
    ctl: &Arc<Controller>,
    cfg: &kafka::Config,
    topic: &str,
    part: &mut Part,
    got: kafka::FetchResult,
) {
    for r in &got.records {
        part.sessions.retain(|s| !s.tx.is_closed());
        let (Some(key), Some(value)) = (&r.key, &r.value) else { continue };
        let Ok(id) = <[u8; SESSION_LEN]>::try_from(&key[..]) else { continue };
        let at = match part.sessions.iter().position(|s| s.id == id) {
            Some(i) => i,
            None => {
                let Some((0, frame)) = wire::split_value(value) else { continue };
                if !is_hello_of(&frame, &part.node) {
                    continue;
                }
                let pending: Vec<usize> = (0..part.sessions.len())
                    .filter(|&i| part.sessions[i].frames <= HANDSHAKE_FRAMES)
                    .collect();
                if pending.len() >= MAX_PENDING {
                    log::warn!(
                        "Kafka: {topic}: {} sessions in their handshake at once; dropping the oldest",
                        pending.len()
                    );
                    part.sessions.remove(pending[0]);
                }
                part.sessions.push(open(ctl, cfg, topic, id));
                part.sessions.len() - 1
            }
        };
        let s = &mut part.sessions[at];
        if s.tx.is_full() {
            part.next = r.offset;
            return;
        }
        match s.seq.take(Some(key), Some(value)) {
            Take::Frame(f) => {
                s.frames += 1;
                if s.tx.try_send(Ok(f)).is_err() {
                    part.sessions.remove(at);
                }
            }
            Take::Drop => {}
            Take::Gap(n) => {
                let _ = s.tx.try_send(Err(format!(
                    "records of this session are missing from {topic} (frame {n} came next)"
                )));
                part.sessions.remove(at);
            }
        }
    }
    part.next = got.next;
}

/// Whether `frame` is a `Hello` from node `node`.
fn is_hello_of(frame: &[u8], node: &str) -> bool {
    matches!(proto::decode(frame), Ok(Frame::Hello { name, .. }) if name == node)
}

/// A new session: its link, served like any other, and the producer of its answers.
fn open(ctl: &Arc<Controller>, cfg: &kafka::Config, topic: &str, id: [u8; SESSION_LEN]) -> Incoming {
    let (tx, rx) = bounded(SESSION_QUEUE);
    let (writer, producing) = wire::writer(cfg.clone(), topic.to_string(), TO_AGENT, id);
    let (reader, writer) = crate::link::kafka(wire::Reader::new(rx), writer);
    let peer = format!("kafka:{topic}#{}", crate::auth::hex(&id[..4]));
    ctl.ex.spawn(producing).detach();
    ctl.ex.spawn(session::serve(ctl.clone(), reader, writer, peer)).detach();
    Incoming { id, seq: Sequence::new(id), frames: 0, tx }
}
