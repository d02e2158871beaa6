//! Frames as Kafka records, for agents that reach the controller only through a Kafka cluster.
//!
//! Each node has one topic, `wisp.NODE`, with two partitions: [`TO_AGENT`] (0, written by the
//! controller) and [`TO_CONTROLLER`] (1, written by the agent). A link is a *session*: the agent
//! picks 16 random bytes when it connects, and every record of the session, both ways, has them
//! as its key. A record's value is the frame's number in its direction (a `u64`, big-endian,
//! from 0) and then the frame exactly as the link made it (its tag included once the handshake is
//! done). The receiving side takes only the records of its session, in number order: a number
//! already taken is a duplicate (a produce the client sent again after a broker restart or a
//! timeout) and is dropped; a number beyond the next one ends the link (records were lost).
//!
//! The handshake and the per-frame tags are those of every wire (see [`crate::link`]), so
//! anyone who can write to the topic can neither drive the agent nor forge its output: a record
//! of an old session, replayed, has another key and is ignored; one replayed into the current
//! session has a number already taken; one with a number made up fails its tag, which is
//! computed over the receiver's own count, and ends the link (the agent then opens a new one).
//!
//! The agent starts reading [`TO_AGENT`] at its end when it connects (nothing before belongs to
//! its new session). The controller reads [`TO_CONTROLLER`] of every node from the offset its
//! consumer group committed, so a session an agent opened while the controller was down is
//! answered when it is back (see `controller::kafka`).

use super::{FrameRecv, FrameSend, TransportError, HEADROOM};
use crate::kafka::{self, Client, KafkaError};
use bytes::{Bytes, BytesMut};
use smol::channel::{bounded, Receiver, Sender};
use std::collections::VecDeque;
use std::time::Duration;

/// The partition the controller writes and the agent reads.
pub const TO_AGENT: i32 = 0;
/// The partition the agent writes and the controller reads.
pub const TO_CONTROLLER: i32 = 1;
/// Bytes of a session id (the records' key).
pub const SESSION_LEN: usize = 16;
/// Bytes of a frame's number in front of it.
const SEQ_LEN: usize = 8;
/// Settings of a node topic made by either side: records are needed only until read, and a day
/// is room for a controller that is down a long time.
pub const TOPIC_CONFIGS: &[(&str, &str)] = &[("cleanup.policy", "delete"), ("retention.ms", "86400000")];
/// Most bytes of records one produce carries.
const MAX_BATCH: usize = 1 << 20;
/// Frames queued for the producer: with the link's credit, what bounds the sender's memory.
const SEND_QUEUE: usize = 64;
/// The longest a fetch waits at the broker for the first record, once nothing has come for a
/// while; see [`Wait`].
pub const FETCH_WAIT: Duration = Duration::from_millis(100);
/// The wait of a fetch right after records came.
pub const FETCH_WAIT_BUSY: Duration = Duration::from_millis(2);

/// How long the next fetch may wait at the broker: short while records flow, doubling to
/// [`FETCH_WAIT`] while none come. Kafka answers a waiting fetch as soon as a record arrives, so
/// there a short wait only costs a few more requests while busy; tansu 0.6 always waits out the
/// whole wait, so there the wait is the latency, and a long one would throttle a stream to one
/// credit window per wait.
#[derive(Debug, Clone, Copy)]
pub struct Wait(Duration);

impl Default for Wait {
    fn default() -> Self {
        Wait(FETCH_WAIT_BUSY)
    }
}

impl Wait {
    /// The wait for the next fetch.
    pub fn get(self) -> Duration {
        self.0
    }

    /// The last fetch brought records (`true`) or nothing.
    pub fn after(&mut self, got: bool) {
        self.0 = if got { FETCH_WAIT_BUSY } else { (self.0 * 2).min(FETCH_WAIT) };
    }
}
/// Most bytes one fetch brings per partition.
pub const FETCH_BYTES: i32 = 1 << 20;

/// The topic of node `name`: `wisp.NAME`. Kafka topic names take letters, digits, `.`, `_` and
/// `-`; a node name with `+` (which wisp allows) has no topic.
pub fn topic(name: &str) -> Result<String, String> {
    if name.contains('+') {
        return Err(format!(
            "node name {name:?} has '+', which a Kafka topic name cannot: give a node that connects over Kafka a \
             name of letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(format!("wisp.{name}"))
}

/// A fresh session id.
pub fn new_session() -> [u8; SESSION_LEN] {
    let n = crate::auth::random_nonce();
    let mut s = [0u8; SESSION_LEN];
    s.copy_from_slice(&n[..SESSION_LEN]);
    s
}

/// What a receiver makes of one record of its partition.
#[derive(Debug, PartialEq, Eq)]
pub enum Take {
    /// The next frame of the session.
    Frame(Bytes),
    /// Not for this session, or a number already taken: dropped.
    Drop,
    /// A number beyond the next: records of the session were lost.
    Gap(u64),
}

/// Order keeper for one direction of one session.
#[derive(Debug, Clone)]
pub struct Sequence {
    session: [u8; SESSION_LEN],
    next: u64,
}

impl Sequence {
    /// A session's receiving side, expecting frame 0.
    pub fn new(session: [u8; SESSION_LEN]) -> Sequence {
        Sequence { session, next: 0 }
    }

    /// Judge record (`key`, `value`).
    pub fn take(&mut self, key: Option<&Bytes>, value: Option<&Bytes>) -> Take {
        if key.map(|k| &k[..]) != Some(&self.session[..]) {
            return Take::Drop;
        }
        let Some((seq, frame)) = value.and_then(split_value) else { return Take::Drop };
        if seq < self.next {
            return Take::Drop;
        }
        if seq > self.next {
            return Take::Gap(seq);
        }
        self.next += 1;
        Take::Frame(frame)
    }
}

/// A record value's frame number and frame.
pub fn split_value(value: &Bytes) -> Option<(u64, Bytes)> {
    if value.len() < SEQ_LEN {
        return None;
    }
    let seq = u64::from_be_bytes(value[..SEQ_LEN].try_into().expect("8 bytes"));
    Some((seq, value.slice(SEQ_LEN..)))
}

/// The receiving half: frames handed over in order by whoever reads the partition.
pub struct Reader {
    rx: Receiver<Result<Bytes, String>>,
    current: BytesMut,
}

impl Reader {
    /// A reader of the frames sent into `rx` (an error ends the link with its sentence).
    pub fn new(rx: Receiver<Result<Bytes, String>>) -> Reader {
        Reader { rx, current: BytesMut::new() }
    }
}

impl FrameRecv for Reader {
    async fn recv(&mut self, max: usize) -> Result<Option<&mut [u8]>, TransportError> {
        match self.rx.recv().await {
            Err(_) => Ok(None),
            Ok(Err(m)) => Err(TransportError::Protocol(m)),
            Ok(Ok(frame)) => {
                if frame.len() > max {
                    return Err(TransportError::Protocol(format!(
                        "a Kafka record holds a frame of {} bytes, over the {max}-byte limit",
                        frame.len()
                    )));
                }
                Ok(Some(super::hold(&mut self.current, frame)))
            }
        }
    }
}

/// The sending half: frames numbered and queued for a producer task.
pub struct Writer {
    tx: Sender<Bytes>,
    seq: u64,
}

impl FrameSend for Writer {
    async fn send(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        let frame = &buf[HEADROOM..];
        let mut value = Vec::with_capacity(SEQ_LEN + frame.len());
        value.extend_from_slice(&self.seq.to_be_bytes());
        value.extend_from_slice(frame);
        self.tx.send(Bytes::from(value)).await.map_err(|_| {
            TransportError::Io(std::io::Error::other("the Kafka producer stopped (see the log for why)"))
        })?;
        self.seq += 1;
        Ok(())
    }

    async fn close(&mut self) {
        self.tx.close();
    }
}

/// A writer of session `session`'s frames to `topic`/`partition`, and the producer task that
/// sends them (run it; it ends once the writer is gone and everything queued is sent, or when the
/// cluster refuses for a reason time cannot heal).
pub fn writer(
    cfg: kafka::Config,
    topic: String,
    partition: i32,
    session: [u8; SESSION_LEN],
) -> (Writer, impl std::future::Future<Output = ()> + Send) {
    let (tx, rx) = bounded(SEND_QUEUE);
    (
        Writer { tx, seq: 0 },
        produce_loop(Client::new(cfg), topic, partition, Bytes::copy_from_slice(&session), rx),
    )
}

/// How long to wait after the `n`th failure in a row: 100 ms doubling to 2 s.
pub fn backoff(n: u32) -> Duration {
    Duration::from_millis(100u64 << n.min(5)).min(Duration::from_secs(2))
}

async fn produce_loop(mut client: Client, topic: String, partition: i32, key: Bytes, rx: Receiver<Bytes>) {
    let mut batch: Vec<(Bytes, Bytes)> = Vec::new();
    while let Ok(first) = rx.recv().await {
        let mut size = first.len();
        batch.push((key.clone(), first));
        while size < MAX_BATCH {
            match rx.try_recv() {
                Ok(v) => {
                    size += v.len();
                    batch.push((key.clone(), v));
                }
                Err(_) => break,
            }
        }
        let mut failures = 0u32;
        loop {
            match client.produce(&topic, partition, &batch).await {
                Ok(_) => break,
                Err(e) if e.is_transient() || e.code() == Some(kafka::code::UNKNOWN_TOPIC_OR_PARTITION) => {
                    if failures == 0 || failures.is_multiple_of(20) {
                        log::warn!("Kafka: cannot send to {topic}/{partition} ({e}); trying again");
                    }
                    smol::Timer::after(backoff(failures)).await;
                    failures += 1;
                    if rx.is_closed() && failures > 50 {
                        // The link is gone and the cluster still refuses: give up what is queued.
                        return;
                    }
                }
                Err(e) => {
                    log::error!("Kafka: cannot send to {topic}/{partition}: {e}");
                    rx.close();
                    return;
                }
            }
        }
        batch.clear();
    }
}

/// The agent's side of a new session to node `name`'s topic: makes the topic if it may (the
/// controller makes it too), notes where [`TO_AGENT`] ends, and returns the two halves plus the
/// tasks that move their records (spawn both).
pub async fn connect(
    cfg: &kafka::Config,
    name: &str,
) -> Result<
    (
        Reader,
        Writer,
        impl std::future::Future<Output = ()> + Send,
        impl std::future::Future<Output = ()> + Send,
    ),
    KafkaError,
> {
    let topic = topic(name).map_err(KafkaError::Protocol)?;
    let mut client = Client::new(cfg.clone());
    match client.create_topic(&topic, 2, TOPIC_CONFIGS).await {
        Ok(_) => {}
        // Not allowed to: the controller makes node topics.
        Err(KafkaError::Broker { code, .. }) if code == 29 || code == 31 => {}
        Err(e) => return Err(e),
    }
    let start = end_offset(&mut client, &topic, TO_AGENT).await?;
    let session = new_session();
    let (frames, rx) = bounded(SEND_QUEUE);
    let reading = fetch_loop(client, topic.clone(), TO_AGENT, start, Sequence::new(session), frames);
    let (writer, producing) = self::writer(cfg.clone(), topic, TO_CONTROLLER, session);
    Ok((Reader::new(rx), writer, reading, producing))
}

/// The end of `topic`/`partition`, waiting a little for a topic just made to have a leader.
async fn end_offset(client: &mut Client, topic: &str, partition: i32) -> Result<i64, KafkaError> {
    let mut tries = 0;
    loop {
        match client.end_offset(topic, partition).await {
            Err(e) if e.code() == Some(kafka::code::UNKNOWN_TOPIC_OR_PARTITION) && tries < 50 => {
                tries += 1;
                smol::Timer::after(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Read `topic`/`partition` from `offset` and hand the session's frames to `frames` in order,
/// until the reader is gone or the session broke.
async fn fetch_loop(
    mut client: Client,
    topic: String,
    partition: i32,
    mut offset: i64,
    mut seq: Sequence,
    frames: Sender<Result<Bytes, String>>,
) {
    let mut failures = 0u32;
    let mut wait = Wait::default();
    let mut queue: VecDeque<Bytes> = VecDeque::new();
    loop {
        while let Some(f) = queue.pop_front() {
            if frames.send(Ok(f)).await.is_err() {
                return;
            }
        }
        if frames.is_closed() {
            return;
        }
        match client.fetch(&topic, partition, offset, wait.get(), FETCH_BYTES).await {
            Ok(got) => {
                failures = 0;
                wait.after(got.next > offset);
                for r in &got.records {
                    match seq.take(r.key.as_ref(), r.value.as_ref()) {
                        Take::Frame(f) => queue.push_back(f),
                        Take::Drop => {}
                        Take::Gap(n) => {
                            let _ = frames
                                .send(Err(format!(
                                    "records of this session are missing from {topic}/{partition} (frame {n} came \
                                     next; expected {})",
                                    seq.next
                                )))
                                .await;
                            return;
                        }
                    }
                }
                offset = got.next;
            }
            Err(e) if e.code() == Some(kafka::code::OFFSET_OUT_OF_RANGE) => {
                let _ = frames.send(Err(format!("{e}: the records this session needs are gone"))).await;
                return;
            }
            Err(e) if e.is_transient() => {
                if failures == 0 || failures.is_multiple_of(20) {
                    log::warn!("Kafka: cannot read {topic}/{partition} ({e}); trying again");
                }
                smol::Timer::after(backoff(failures)).await;
                failures += 1;
            }
            Err(e) => {
                let _ = frames.send(Err(e.to_string())).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(seq: u64, frame: &[u8]) -> Bytes {
        let mut v = seq.to_be_bytes().to_vec();
        v.extend_from_slice(frame);
        Bytes::from(v)
    }

    #[test]
    fn a_session_takes_its_own_records_in_order_and_drops_the_rest() {
        let (mine, other) = ([1u8; SESSION_LEN], [2u8; SESSION_LEN]);
        let key = Bytes::copy_from_slice(&mine);
        let mut s = Sequence::new(mine);
        assert_eq!(s.take(Some(&key), Some(&value(0, b"a"))), Take::Frame(Bytes::from_static(b"a")));
        // Another session's record, a replay of frame 0, a value too short for a number, no key.
        assert_eq!(s.take(Some(&Bytes::copy_from_slice(&other)), Some(&value(1, b"x"))), Take::Drop);
        assert_eq!(s.take(Some(&key), Some(&value(0, b"a"))), Take::Drop);
        assert_eq!(s.take(Some(&key), Some(&Bytes::from_static(b"1234"))), Take::Drop);
        assert_eq!(s.take(None, Some(&value(1, b"b"))), Take::Drop);
        assert_eq!(s.take(Some(&key), Some(&value(1, b"b"))), Take::Frame(Bytes::from_static(b"b")));
        assert_eq!(s.take(Some(&key), Some(&value(3, b"d"))), Take::Gap(3));
    }

    #[test]
    fn topics_are_the_node_name_under_wisp() {
        assert_eq!(topic("arm-box_1.lab").unwrap(), "wisp.arm-box_1.lab");
        assert!(topic("a+b").unwrap_err().contains("'+'"));
    }

    #[test]
    fn backoff_doubles_to_two_seconds() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(10), Duration::from_secs(2));
    }
}
