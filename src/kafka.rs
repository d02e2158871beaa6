//! A small Kafka client, enough for the Kafka transport ([`crate::transport::kafka`]): bootstrap
//! from a list of brokers (the first that answers), topic metadata and partition leaders, topic
//! creation through the admin API (no ZooKeeper), produce and fetch of uncompressed record
//! batches, the latest offset of a partition, committed offsets of a consumer group (the simple,
//! member-less kind), and SASL/PLAIN or SCRAM-SHA-256/512, over TCP or TLS.
//!
//! The wire format is the `kafka-protocol` crate's (generated from Kafka's own message schemas);
//! this module only frames requests, matches answers to them and picks versions both sides know.
//! Everything a broker sends is bounded ([`MAX_RESPONSE`]) and every exchange has a timeout.

use crate::dial;
use crate::link::BoxIo;
use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::error::ParseResponseErrorCode;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Largest answer read from a broker (a fetch asks for at most a few MiB).
pub const MAX_RESPONSE: usize = 64 << 20;
/// How long one exchange may take beyond any wait the request itself asks for.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach the cluster.
#[derive(Clone)]
pub struct Config {
    /// Bootstrap brokers, `host:port`, tried in order.
    pub brokers: Vec<String>,
    /// TLS to the brokers (with this trust), or plain TCP.
    pub tls: Option<Arc<dial::Tls>>,
    /// SASL authentication after connecting.
    pub sasl: Option<Sasl>,
    /// The client id brokers log.
    pub client_id: String,
}

impl Config {
    /// From the command line's options (the same on the agent and the controller): `brokers`
    /// comma-separated `host:port`; `tls` with extra CA certificates from `ca_file`; SASL
    /// `mechanism` with `user` and `password` (`@FILE` reads it from a file).
    pub fn from_options(
        brokers: &str,
        tls: bool,
        ca_file: Option<&std::path::Path>,
        mechanism: Option<&str>,
        user: Option<&str>,
        password: Option<&str>,
        client_id: &str,
    ) -> Result<Config, String> {
        let list: Vec<String> =
            brokers.split(',').map(str::trim).filter(|b| !b.is_empty()).map(str::to_string).collect();
        if list.is_empty() {
            return Err("--kafka needs at least one broker, e.g. --kafka kafka1:9092,kafka2:9092".into());
        }
        for b in &list {
            dial::split_host_port(b).map_err(|e| format!("--kafka {b}: {e} (give HOST:PORT)"))?;
        }
        let tls = if tls || ca_file.is_some() {
            let trust =
                crate::tls::Trust { ca_file: ca_file.map(|p| p.to_path_buf()), pin: None, insecure: false };
            Some(Arc::new(dial::Tls::new(&trust)?))
        } else {
            None
        };
        let sasl = match (mechanism, user, password) {
            (None, None, None) => None,
            (m, Some(user), Some(password)) => {
                let password = match password.strip_prefix('@') {
                    Some(file) => std::fs::read_to_string(file)
                        .map_err(|e| format!("cannot read the Kafka password from {file}: {e}"))?
                        .trim_end_matches(['\n', '\r'])
                        .to_string(),
                    None => password.to_string(),
                };
                let mechanism = Mechanism::parse(m.unwrap_or("PLAIN"))?;
                Some(Sasl { mechanism, user: user.to_string(), password })
            }
            _ => return Err("SASL needs both --kafka-user and --kafka-password".into()),
        };
        Ok(Config { brokers: list, tls, sasl, client_id: client_id.to_string() })
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("brokers", &self.brokers)
            .field("tls", &self.tls.is_some())
            .field("sasl", &self.sasl.as_ref().map(|s| s.mechanism()))
            .finish()
    }
}

/// SASL credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Sasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: Mechanism,
    /// The user name.
    pub user: String,
    /// The password.
    pub password: String,
}

impl Sasl {
    fn mechanism(&self) -> &'static str {
        self.mechanism.name()
    }
}

/// A SASL mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// User and password in the clear (use it over TLS).
    Plain,
    /// RFC 5802 with SHA-256.
    ScramSha256,
    /// RFC 5802 with SHA-512.
    ScramSha512,
}

impl Mechanism {
    /// The name brokers know it by.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }

    /// From its name (any case).
    pub fn parse(name: &str) -> Result<Mechanism, String> {
        match name.to_ascii_uppercase().as_str() {
            "PLAIN" => Ok(Mechanism::Plain),
            "SCRAM-SHA-256" => Ok(Mechanism::ScramSha256),
            "SCRAM-SHA-512" => Ok(Mechanism::ScramSha512),
            _ => Err(format!("unknown SASL mechanism {name:?}: use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")),
        }
    }
}

/// Why a Kafka exchange failed; the sentence says what to do where something can be done.
#[derive(Debug)]
pub enum KafkaError {
    /// No bootstrap broker could be reached; what each said.
    NoBroker(Vec<String>),
    /// The connection to a broker failed or timed out.
    Io {
        /// `host:port`.
        broker: String,
        /// What happened.
        error: String,
    },
    /// The broker answered with an error code.
    Broker {
        /// What was asked ("produce to wisp.a/1").
        what: String,
        /// Kafka's error code.
        code: i16,
        /// Its name, and the broker's message where it sent one.
        text: String,
    },
    /// The broker cannot do what this client needs (an API or version it lacks), or sent what no
    /// broker sends.
    Protocol(String),
    /// SASL authentication failed.
    Auth(String),
}

impl KafkaError {
    /// Whether trying again later can help (a broker down or busy, a leader moving), as against
    /// a setting that must change.
    pub fn is_transient(&self) -> bool {
        match self {
            KafkaError::NoBroker(_) | KafkaError::Io { .. } => true,
            KafkaError::Broker { code, .. } => code.err().is_some_and(|e| e.is_retriable()),
            KafkaError::Protocol(_) | KafkaError::Auth(_) => false,
        }
    }

    /// The broker's error code, if it sent one.
    pub fn code(&self) -> Option<i16> {
        match self {
            KafkaError::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for KafkaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KafkaError::NoBroker(tried) => write!(
                f,
                "no Kafka broker answered ({}): check --kafka and that the brokers run",
                tried.join("; ")
            ),
            KafkaError::Io { broker, error } => write!(f, "Kafka broker {broker}: {error}"),
            KafkaError::Broker { what, text, .. } => write!(f, "{what}: the broker said {text}"),
            KafkaError::Protocol(m) => write!(f, "{m}"),
            KafkaError::Auth(m) => write!(f, "Kafka authentication failed: {m}"),
        }
    }
}

impl std::error::Error for KafkaError {}

fn encode_error(e: impl fmt::Display) -> KafkaError {
    KafkaError::Protocol(format!("cannot encode a Kafka request: {e}"))
}

fn broker_error(what: impl Into<String>, code: i16, message: Option<&StrBytes>) -> KafkaError {
    let name = match code.err() {
        Some(e) => format!("{e:?}"),
        None => "no error".into(),
    };
    let text = match message {
        Some(m) if !m.is_empty() => format!("{name} (error {code}): {}", m.as_str()),
        _ => format!("{name} (error {code})"),
    };
    KafkaError::Broker { what: what.into(), code, text }
}

/// Error codes the transport looks at.
pub mod code {
    /// The fetch offset is outside the partition's log.
    pub const OFFSET_OUT_OF_RANGE: i16 = 1;
    /// The topic or partition is not known (yet).
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    /// This broker does not lead the partition.
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    /// The topic exists already.
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;
}

/// The API versions this client can speak: (key, lowest, highest). The highest one the broker
/// also knows is used. Fetch stops at 11, the last before flexible versions: tansu 0.6 answers a
/// v12 fetch with a tagged field (tag 0 at the top, NodeEndpoints) that only v16 defines.
const WANTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 11),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 4, 12),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::FindCoordinator, 1, 3),
    (ApiKey::SaslHandshake, 1, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
    (ApiKey::CreateTopics, 2, 7),
];

/// One connection to one broker.
struct Conn {
    io: BoxIo,
    addr: String,
    correlation: i32,
    versions: HashMap<i16, i16>,
    client_id: StrBytes,
}

impl Conn {
    async fn open(cfg: &Config, addr: &str) -> Result<Conn, KafkaError> {
        let io_err = |error: String| KafkaError::Io { broker: addr.to_string(), error };
        let (host, port) = dial::split_host_port(addr).map_err(|e| io_err(e.to_string()))?;
        let io =
            dial::open_stream(&host, port, cfg.tls.as_deref()).await.map_err(|e| io_err(e.to_string()))?;
        let mut conn = Conn {
            io,
            addr: addr.to_string(),
            correlation: 0,
            versions: HashMap::new(),
            client_id: StrBytes::from_string(cfg.client_id.clone()),
        };
        let mut req = ApiVersionsRequest::default();
        req.client_software_name = StrBytes::from_static_str("wisp");
        req.client_software_version = StrBytes::from_static_str(env!("CARGO_PKG_VERSION"));
        let answer: ApiVersionsResponse = conn.exchange(ApiKey::ApiVersions, &req, 3, Duration::ZERO).await?;
        if let Some(code) = answer.error_code.err() {
            return Err(KafkaError::Protocol(format!(
                "Kafka broker {addr} refused the version query ({code:?}): it is older than Kafka 2.4, which this \
                 client needs"
            )));
        }
        let theirs: HashMap<i16, (i16, i16)> =
            answer.api_keys.iter().map(|k| (k.api_key, (k.min_version, k.max_version))).collect();
        for &(key, low, high) in WANTED {
            let Some(&(their_low, their_high)) = theirs.get(&(key as i16)) else { continue };
            let v = high.min(their_high);
            if v >= low && v >= their_low {
                conn.versions.insert(key as i16, v);
            }
        }
        if let Some(sasl) = &cfg.sasl {
            conn.authenticate(sasl).await?;
        }
        Ok(conn)
    }

    /// The version of `key` this connection uses; an error naming the API when there is none.
    fn version(&self, key: ApiKey) -> Result<i16, KafkaError> {
        self.versions.get(&(key as i16)).copied().ok_or_else(|| {
            KafkaError::Protocol(format!(
                "Kafka broker {} does not offer {key:?} in a version this client speaks: it needs Kafka 2.4 or \
                 later (or a broker that implements the same APIs)",
                self.addr
            ))
        })
    }

    /// Send `req` at `version` and read its answer; `wait` is how long the broker itself may hold
    /// the answer (a fetch's long poll), on top of [`REQUEST_TIMEOUT`].
    async fn exchange<Q: Encodable + HeaderVersion, A: Decodable + HeaderVersion>(
        &mut self,
        key: ApiKey,
        req: &Q,
        version: i16,
        wait: Duration,
    ) -> Result<A, KafkaError> {
        let addr = self.addr.clone();
        let io_err = |error: String| KafkaError::Io { broker: addr.clone(), error };
        self.correlation = self.correlation.wrapping_add(1);
        let mut header = RequestHeader::default();
        header.request_api_key = key as i16;
        header.request_api_version = version;
        header.correlation_id = self.correlation;
        header.client_id = Some(self.client_id.clone());
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&[0; 4]);
        header.encode(&mut buf, Q::header_version(version)).map_err(encode_error)?;
        req.encode(&mut buf, version).map_err(encode_error)?;
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        let io = &mut self.io;
        let exchange = async {
            io.write_all(&buf).await?;
            io.flush().await?;
            let mut size = [0u8; 4];
            io.read_exact(&mut size).await?;
            let size = u32::from_be_bytes(size) as usize;
            if size > MAX_RESPONSE {
                return Err(std::io::Error::other(format!(
                    "answer of {size} bytes is over the {MAX_RESPONSE}-byte limit"
                )));
            }
            let mut body = vec![0u8; size];
            io.read_exact(&mut body).await?;
            Ok(body)
        };
        let limit = REQUEST_TIMEOUT + wait;
        let body = match smol::future::or(async { Some(exchange.await) }, async {
            smol::Timer::after(limit).await;
            None
        })
        .await
        {
            Some(Ok(b)) => b,
            Some(Err(e)) => return Err(io_err(e.to_string())),
            None => return Err(io_err(format!("no answer within {} s", limit.as_secs()))),
        };
        let mut body = Bytes::from(body);
        let unreadable =
            |e: &dyn fmt::Display| io_err(format!("sent an answer this client cannot read: {e}"));
        let head =
            ResponseHeader::decode(&mut body, A::header_version(version)).map_err(|e| unreadable(&e))?;
        if head.correlation_id != self.correlation {
            return Err(io_err(format!(
                "answered request {} when {} was asked",
                head.correlation_id, self.correlation
            )));
        }
        A::decode(&mut body, version).map_err(|e| unreadable(&e))
    }

    async fn call<Q: Encodable + HeaderVersion, A: Decodable + HeaderVersion>(
        &mut self,
        key: ApiKey,
        req: &Q,
        wait: Duration,
    ) -> Result<A, KafkaError> {
        let v = self.version(key)?;
        self.exchange(key, req, v, wait).await
    }

    async fn authenticate(&mut self, sasl: &Sasl) -> Result<(), KafkaError> {
        let mut hs = SaslHandshakeRequest::default();
        hs.mechanism = StrBytes::from_static_str(sasl.mechanism());
        let answer: SaslHandshakeResponse = self.call(ApiKey::SaslHandshake, &hs, Duration::ZERO).await?;
        if answer.error_code != 0 {
            let offered: Vec<&str> = answer.mechanisms.iter().map(|m| m.as_str()).collect();
            return Err(KafkaError::Auth(format!(
                "broker {} does not take SASL {} (it offers {})",
                self.addr,
                sasl.mechanism(),
                if offered.is_empty() { "none".to_string() } else { offered.join(", ") }
            )));
        }
        match sasl.mechanism {
            Mechanism::Plain => {
                let mut msg = Vec::new();
                msg.push(0);
                msg.extend_from_slice(sasl.user.as_bytes());
                msg.push(0);
                msg.extend_from_slice(sasl.password.as_bytes());
                self.sasl_step(msg).await?;
            }
            Mechanism::ScramSha256 | Mechanism::ScramSha512 => {
                let mut scram = scram::Client::new(sasl);
                let server_first = self.sasl_step(scram.first()).await?;
                let last = scram.last(&server_first).map_err(KafkaError::Auth)?;
                let server_final = self.sasl_step(last).await?;
                scram.verify(&server_final).map_err(KafkaError::Auth)?;
            }
        }
        Ok(())
    }

    async fn sasl_step(&mut self, bytes: Vec<u8>) -> Result<Bytes, KafkaError> {
        let mut req = SaslAuthenticateRequest::default();
        req.auth_bytes = Bytes::from(bytes);
        let answer: SaslAuthenticateResponse =
            self.call(ApiKey::SaslAuthenticate, &req, Duration::ZERO).await?;
        if answer.error_code != 0 {
            let m = answer.error_message.as_ref().map(|m| m.as_str().to_string()).unwrap_or_default();
            return Err(KafkaError::Auth(format!("broker {}: {m} (error {})", self.addr, answer.error_code)));
        }
        Ok(answer.auth_bytes)
    }
}

/// A record as fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Its offset in the partition.
    pub offset: i64,
    /// Its key.
    pub key: Option<Bytes>,
    /// Its value.
    pub value: Option<Bytes>,
}

/// What a fetch of one partition brought.
#[derive(Debug, Default)]
pub struct FetchResult {
    /// Records at or after the offset asked for, in order.
    pub records: Vec<Fetched>,
    /// Where the next fetch starts: past the last whole batch read, skipped ones included.
    pub next: i64,
    /// The partition's high watermark.
    pub high_watermark: i64,
    /// Batches this client could not read (compressed, or damaged), skipped.
    pub skipped: u32,
}

/// A client: connections to the brokers it has needed, and where partitions lead. One task uses
/// it at a time (the transport keeps one for producing and one for fetching, so a long poll never
/// holds up a send).
pub struct Client {
    cfg: Config,
    /// By `host:port`.
    conns: HashMap<String, Conn>,
    /// Broker id → `host:port`, from the last metadata.
    brokers: HashMap<i32, String>,
    /// (topic, partition) → leader id.
    leaders: HashMap<(String, i32), i32>,
    /// The controller broker (where topics are made).
    controller: Option<i32>,
    /// The bootstrap broker in use.
    bootstrap: Option<String>,
}

impl Client {
    /// A client for `cfg`; nothing is dialed until the first request.
    pub fn new(cfg: Config) -> Client {
        Client {
            cfg,
            conns: HashMap::new(),
            brokers: HashMap::new(),
            leaders: HashMap::new(),
            controller: None,
            bootstrap: None,
        }
    }

    /// The brokers this client bootstraps from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A connection to any bootstrap broker: the one in use, else the first that answers.
    async fn any(&mut self) -> Result<&mut Conn, KafkaError> {
        if let Some(b) = self.bootstrap.clone() {
            if self.conns.contains_key(&b) {
                return Ok(self.conns.get_mut(&b).expect("checked"));
            }
        }
        let mut tried = Vec::new();
        for b in self.cfg.brokers.clone() {
            match Conn::open(&self.cfg, &b).await {
                Ok(c) => {
                    if !tried.is_empty() {
                        log::info!("Kafka: using broker {b} ({})", tried.join("; "));
                    }
                    self.conns.insert(b.clone(), c);
                    self.bootstrap = Some(b.clone());
                    return Ok(self.conns.get_mut(&b).expect("inserted"));
                }
                Err(e @ (KafkaError::Auth(_) | KafkaError::Protocol(_))) => return Err(e),
                Err(e) => tried.push(format!("{b}: {e}")),
            }
        }
        Err(KafkaError::NoBroker(tried))
    }

    /// A connection to broker `id`.
    async fn to(&mut self, id: i32) -> Result<&mut Conn, KafkaError> {
        let addr =
            self.brokers.get(&id).cloned().ok_or_else(|| {
                KafkaError::Protocol(format!("the cluster's metadata names no broker {id}"))
            })?;
        if !self.conns.contains_key(&addr) {
            let c = Conn::open(&self.cfg, &addr).await?;
            self.conns.insert(addr.clone(), c);
        }
        Ok(self.conns.get_mut(&addr).expect("inserted"))
    }

    /// Forget connection `addr` after it failed (and, with it, what the metadata said).
    fn drop_conn(&mut self, addr: &str) {
        self.conns.remove(addr);
        if self.bootstrap.as_deref() == Some(addr) {
            self.bootstrap = None;
        }
        self.leaders.clear();
    }

    /// Run `f` on a connection; a failed connection is forgotten so the next call dials again.
    fn forget_on_io(&mut self, addr: &str, e: &KafkaError) {
        if matches!(e, KafkaError::Io { .. }) {
            self.drop_conn(addr);
        } else if e.code() == Some(code::NOT_LEADER_OR_FOLLOWER) {
            self.leaders.clear();
        }
    }

    /// Read the cluster's metadata for `topics`: brokers, the controller, partition leaders.
    /// Returns, per topic, its error code (0, or unknown topic) and partition count.
    pub async fn metadata(&mut self, topics: &[&str]) -> Result<Vec<(String, i16, usize)>, KafkaError> {
        let mut req = MetadataRequest::default();
        req.allow_auto_topic_creation = false;
        req.topics = Some(
            topics
                .iter()
                .map(|t| {
                    let mut m = MetadataRequestTopic::default();
                    m.name = Some(TopicName(StrBytes::from_string(t.to_string())));
                    m
                })
                .collect(),
        );
        let conn = self.any().await?;
        let addr = conn.addr.clone();
        let answer: MetadataResponse = match conn.call(ApiKey::Metadata, &req, Duration::ZERO).await {
            Ok(a) => a,
            Err(e) => {
                self.forget_on_io(&addr, &e);
                return Err(e);
            }
        };
        for b in &answer.brokers {
            self.brokers.insert(b.node_id.0, format!("{}:{}", b.host.as_str(), b.port));
        }
        self.controller = Some(answer.controller_id.0).filter(|&c| c >= 0);
        let mut out = Vec::new();
        for t in &answer.topics {
            let name = t.name.as_ref().map(|n| n.0.as_str().to_string()).unwrap_or_default();
            for p in &t.partitions {
                if p.error_code == 0 && p.leader_id.0 >= 0 {
                    self.leaders.insert((name.clone(), p.partition_index), p.leader_id.0);
                }
            }
            out.push((name, t.error_code, t.partitions.len()));
        }
        Ok(out)
    }

    /// The leader of `topic`/`partition`, from metadata read now if not known.
    async fn leader(&mut self, topic: &str, partition: i32) -> Result<i32, KafkaError> {
        if let Some(&l) = self.leaders.get(&(topic.to_string(), partition)) {
            return Ok(l);
        }
        let meta = self.metadata(&[topic]).await?;
        if let Some((_, code, _)) = meta.first().filter(|m| m.1 != 0) {
            return Err(broker_error(format!("metadata of topic {topic}"), *code, None));
        }
        self.leaders.get(&(topic.to_string(), partition)).copied().ok_or_else(|| {
            broker_error(format!("metadata of {topic}/{partition}"), code::UNKNOWN_TOPIC_OR_PARTITION, None)
        })
    }

    /// Make topic `name` with `partitions` partitions and the given settings (`retention.ms`...);
    /// Ok(false) if it was there already.
    pub async fn create_topic(
        &mut self,
        name: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<bool, KafkaError> {
        let mut topic = CreatableTopic::default();
        topic.name = TopicName(StrBytes::from_string(name.to_string()));
        topic.num_partitions = partitions;
        topic.replication_factor = -1;
        topic.configs = configs
            .iter()
            .map(|(k, v)| {
                let mut c = CreatableTopicConfig::default();
                c.name = StrBytes::from_string(k.to_string());
                c.value = Some(StrBytes::from_string(v.to_string()));
                c
            })
            .collect();
        let mut req = CreateTopicsRequest::default();
        req.topics = vec![topic];
        req.timeout_ms = 10_000;
        if self.controller.is_none() {
            self.metadata(&[]).await?;
        }
        let conn = match self.controller {
            Some(id) => self.to(id).await?,
            None => self.any().await?,
        };
        let addr = conn.addr.clone();
        let answer: CreateTopicsResponse = match conn.call(ApiKey::CreateTopics, &req, Duration::ZERO).await {
            Ok(a) => a,
            Err(e) => {
                self.forget_on_io(&addr, &e);
                return Err(e);
            }
        };
        let Some(t) = answer.topics.first() else {
            return Err(KafkaError::Protocol(format!(
                "broker {addr} answered a topic creation with no topic"
            )));
        };
        match t.error_code {
            0 => Ok(true),
            code::TOPIC_ALREADY_EXISTS => Ok(false),
            c => Err(broker_error(format!("creating topic {name}"), c, t.error_message.as_ref())),
        }
    }

    /// Append `records` (key, value) to `topic`/`partition` as one batch, acknowledged by all
    /// in-sync replicas; returns the first one's offset.
    pub async fn produce(
        &mut self,
        topic: &str,
        partition: i32,
        records: &[(Bytes, Bytes)],
    ) -> Result<i64, KafkaError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let batch: Vec<Record> = records
            .iter()
            .enumerate()
            .map(|(i, (k, v))| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                sequence: -1,
                timestamp: now,
                key: Some(k.clone()),
                value: Some(v.clone()),
                headers: Default::default(),
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &batch,
            &RecordEncodeOptions { version: 2, compression: Compression::None },
        )
        .map_err(|e| KafkaError::Protocol(format!("cannot encode a record batch: {e}")))?;
        let mut part = PartitionProduceData::default();
        part.index = partition;
        part.records = Some(buf.freeze());
        let mut data = TopicProduceData::default();
        data.name = TopicName(StrBytes::from_string(topic.to_string()));
        data.partition_data = vec![part];
        let mut req = ProduceRequest::default();
        req.acks = -1;
        req.timeout_ms = 10_000;
        req.topic_data = vec![data];
        let leader = self.leader(topic, partition).await?;
        let conn = self.to(leader).await?;
        let addr = conn.addr.clone();
        let result =
            conn.call(ApiKey::Produce, &req, Duration::ZERO).await.and_then(|answer: ProduceResponse| {
                let p = answer.responses.first().and_then(|t| t.partition_responses.first()).ok_or_else(
                    || KafkaError::Protocol(format!("broker {addr} answered a produce with no partition")),
                )?;
                match p.error_code {
                    0 => Ok(p.base_offset),
                    c => Err(broker_error(
                        format!("producing to {topic}/{partition}"),
                        c,
                        p.error_message.as_ref(),
                    )),
                }
            });
        if let Err(e) = &result {
            self.forget_on_io(&addr, e);
        }
        result
    }

    /// Records of `topic`/`partition` from `offset`, waiting up to `wait` for the first if none
    /// is there yet, at most about `max_bytes`.
    pub async fn fetch(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        wait: Duration,
        max_bytes: i32,
    ) -> Result<FetchResult, KafkaError> {
        let mut got = self.fetch_many(&[(topic.to_string(), partition, offset)], wait, max_bytes).await?;
        got.pop().expect("one result per partition asked").1
    }

    /// Records of several partitions at once, each from its offset (one request per leader
    /// broker, the first of them waiting up to `wait` when nothing is there yet), at most about
    /// `max_bytes` from each. One result per partition asked, in order; a partition's own error
    /// (an unknown topic, an offset out of range) is its result, not the call's.
    pub async fn fetch_many(
        &mut self,
        parts: &[(String, i32, i64)],
        wait: Duration,
        max_bytes: i32,
    ) -> Result<Vec<((String, i32), Result<FetchResult, KafkaError>)>, KafkaError> {
        let mut by_leader: Vec<(i32, Vec<usize>)> = Vec::new();
        let mut results: Vec<Option<Result<FetchResult, KafkaError>>> = parts.iter().map(|_| None).collect();
        for (i, (topic, partition, _)) in parts.iter().enumerate() {
            match self.leader(topic, *partition).await {
                Ok(l) => match by_leader.iter_mut().find(|(id, _)| *id == l) {
                    Some((_, v)) => v.push(i),
                    None => by_leader.push((l, vec![i])),
                },
                Err(e @ KafkaError::Broker { .. }) => results[i] = Some(Err(e)),
                Err(e) => return Err(e),
            }
        }
        let mut first = true;
        for (leader, idx) in by_leader {
            let mut req = FetchRequest::default();
            req.replica_id = BrokerId(-1);
            req.max_wait_ms = if first { wait.as_millis() as i32 } else { 0 };
            req.min_bytes = 1;
            req.max_bytes = max_bytes.saturating_mul(idx.len() as i32);
            req.isolation_level = 0;
            req.session_epoch = -1;
            for &i in &idx {
                let (topic, partition, offset) = &parts[i];
                let mut p = FetchPartition::default();
                p.partition = *partition;
                p.fetch_offset = *offset;
                p.partition_max_bytes = max_bytes;
                p.current_leader_epoch = -1;
                p.last_fetched_epoch = -1;
                p.log_start_offset = -1;
                let name = TopicName(StrBytes::from_string(topic.clone()));
                match req.topics.iter_mut().find(|t| t.topic == name) {
                    Some(t) => t.partitions.push(p),
                    None => {
                        let mut t = FetchTopic::default();
                        t.topic = name;
                        t.partitions = vec![p];
                        req.topics.push(t);
                    }
                }
            }
            let waited = if first { wait } else { Duration::ZERO };
            first = false;
            let conn = self.to(leader).await?;
            let addr = conn.addr.clone();
            let answer: FetchResponse = match conn.call(ApiKey::Fetch, &req, waited).await {
                Ok(a) => a,
                Err(e) => {
                    self.forget_on_io(&addr, &e);
                    return Err(e);
                }
            };
            if answer.error_code != 0 {
                return Err(broker_error(format!("fetching from broker {addr}"), answer.error_code, None));
            }
            let mut stale = false;
            for t in answer.responses {
                let topic = t.topic.0.as_str().to_string();
                for data in t.partitions {
                    let Some(&i) =
                        idx.iter().find(|&&i| parts[i].0 == topic && parts[i].1 == data.partition_index)
                    else {
                        continue;
                    };
                    let offset = parts[i].2;
                    results[i] = Some(if data.error_code != 0 {
                        stale |= data.error_code == code::NOT_LEADER_OR_FOLLOWER;
                        Err(broker_error(
                            format!("fetching {topic}/{} from {offset}", data.partition_index),
                            data.error_code,
                            None,
                        ))
                    } else {
                        let mut out = read_batches(data.records.unwrap_or_default(), offset);
                        out.high_watermark = data.high_watermark;
                        Ok(out)
                    });
                }
            }
            if stale {
                self.leaders.clear();
            }
        }
        Ok(parts
            .iter()
            .zip(results)
            .map(|((t, p, _), r)| {
                let r = r.unwrap_or_else(|| {
                    Err(KafkaError::Protocol(format!("the broker's fetch answer left out {t}/{p}")))
                });
                ((t.clone(), *p), r)
            })
            .collect())
    }

    /// The offset the next record of `topic`/`partition` will get (its end).
    pub async fn end_offset(&mut self, topic: &str, partition: i32) -> Result<i64, KafkaError> {
        self.list_offset(topic, partition, -1).await
    }

    /// The offset of the first record of `topic`/`partition` written at or after `millis`
    /// (milliseconds since the epoch); the end when there is none.
    pub async fn offset_since(
        &mut self,
        topic: &str,
        partition: i32,
        millis: i64,
    ) -> Result<i64, KafkaError> {
        match self.list_offset(topic, partition, millis).await? {
            o if o >= 0 => Ok(o),
            _ => self.end_offset(topic, partition).await,
        }
    }

    async fn list_offset(&mut self, topic: &str, partition: i32, timestamp: i64) -> Result<i64, KafkaError> {
        let mut p = ListOffsetsPartition::default();
        p.partition_index = partition;
        p.timestamp = timestamp;
        p.current_leader_epoch = -1;
        let mut t = ListOffsetsTopic::default();
        t.name = TopicName(StrBytes::from_string(topic.to_string()));
        t.partitions = vec![p];
        let mut req = ListOffsetsRequest::default();
        req.replica_id = BrokerId(-1);
        req.topics = vec![t];
        let leader = self.leader(topic, partition).await?;
        let conn = self.to(leader).await?;
        let addr = conn.addr.clone();
        let result = conn.call(ApiKey::ListOffsets, &req, Duration::ZERO).await.and_then(
            |answer: ListOffsetsResponse| {
                let p = answer.topics.first().and_then(|t| t.partitions.first()).ok_or_else(|| {
                    KafkaError::Protocol(format!("broker {addr} answered ListOffsets with no partition"))
                })?;
                match p.error_code {
                    0 => Ok(p.offset),
                    c => Err(broker_error(format!("the end of {topic}/{partition}"), c, None)),
                }
            },
        );
        if let Err(e) = &result {
            self.forget_on_io(&addr, e);
        }
        result
    }

    /// The coordinator of consumer group `group`.
    async fn coordinator(&mut self, group: &str) -> Result<&mut Conn, KafkaError> {
        let mut req = FindCoordinatorRequest::default();
        req.key = StrBytes::from_string(group.to_string());
        req.key_type = 0;
        let conn = self.any().await?;
        let addr = conn.addr.clone();
        let answer: FindCoordinatorResponse =
            match conn.call(ApiKey::FindCoordinator, &req, Duration::ZERO).await {
                Ok(a) => a,
                Err(e) => {
                    self.forget_on_io(&addr, &e);
                    return Err(e);
                }
            };
        if answer.error_code != 0 {
            return Err(broker_error(
                format!("finding the coordinator of group {group}"),
                answer.error_code,
                answer.error_message.as_ref(),
            ));
        }
        let at = format!("{}:{}", answer.host.as_str(), answer.port);
        self.brokers.insert(answer.node_id.0, at);
        self.to(answer.node_id.0).await
    }

    /// Record `offset` as group `group`'s position in `topic`/`partition` (a simple commit: the
    /// group has no members).
    pub async fn commit(
        &mut self,
        group: &str,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<(), KafkaError> {
        let mut p = OffsetCommitRequestPartition::default();
        p.partition_index = partition;
        p.committed_offset = offset;
        p.committed_leader_epoch = -1;
        let mut t = OffsetCommitRequestTopic::default();
        t.name = TopicName(StrBytes::from_string(topic.to_string()));
        t.partitions = vec![p];
        let mut req = OffsetCommitRequest::default();
        req.group_id = GroupId(StrBytes::from_string(group.to_string()));
        req.generation_id_or_member_epoch = -1;
        req.retention_time_ms = -1;
        req.topics = vec![t];
        let conn = self.coordinator(group).await?;
        let addr = conn.addr.clone();
        let result = conn.call(ApiKey::OffsetCommit, &req, Duration::ZERO).await.and_then(
            |answer: OffsetCommitResponse| {
                let code = answer
                    .topics
                    .first()
                    .and_then(|t| t.partitions.first())
                    .map(|p| p.error_code)
                    .unwrap_or(0);
                match code {
                    0 => Ok(()),
                    c => Err(broker_error(
                        format!("committing {group}'s offset in {topic}/{partition}"),
                        c,
                        None,
                    )),
                }
            },
        );
        if let Err(e) = &result {
            self.forget_on_io(&addr, e);
        }
        result
    }

    /// Group `group`'s committed position in `topic`/`partition`, if it has one.
    pub async fn committed(
        &mut self,
        group: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Option<i64>, KafkaError> {
        let mut t = OffsetFetchRequestTopic::default();
        t.name = TopicName(StrBytes::from_string(topic.to_string()));
        t.partition_indexes = vec![partition];
        let mut req = OffsetFetchRequest::default();
        req.group_id = GroupId(StrBytes::from_string(group.to_string()));
        req.topics = Some(vec![t]);
        let conn = self.coordinator(group).await?;
        let addr = conn.addr.clone();
        let result = conn.call(ApiKey::OffsetFetch, &req, Duration::ZERO).await.and_then(
            |answer: OffsetFetchResponse| {
                if answer.error_code != 0 {
                    return Err(broker_error(format!("reading {group}'s offsets"), answer.error_code, None));
                }
                let p = answer.topics.first().and_then(|t| t.partitions.first());
                match p {
                    Some(p) if p.error_code != 0 => Err(broker_error(
                        format!("reading {group}'s offset in {topic}/{partition}"),
                        p.error_code,
                        None,
                    )),
                    Some(p) if p.committed_offset >= 0 => Ok(Some(p.committed_offset)),
                    _ => Ok(None),
                }
            },
        );
        if let Err(e) = &result {
            self.forget_on_io(&addr, e);
        }
        result
    }
}

/// The records of the whole batches in `data` at or after `from` (a fetch may end inside a
/// batch, and may start with records before `from`). A batch this client cannot read is skipped
/// and counted, not fatal: anyone who can write to a topic can write one.
fn read_batches(mut data: Bytes, from: i64) -> FetchResult {
    let mut out = FetchResult { next: from, ..Default::default() };
    while data.len() >= 12 {
        let base = i64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
        let len = i32::from_be_bytes(data[8..12].try_into().expect("4 bytes"));
        if len < 0 || data.len() < 12 + len as usize {
            break;
        }
        let mut batch = data.split_to(12 + len as usize);
        // The batch's last offset: base + lastOffsetDelta (at byte 23 of the header).
        let last = if batch.len() >= 27 {
            base + i32::from_be_bytes(batch[23..27].try_into().expect("4 bytes")) as i64
        } else {
            base
        };
        match RecordBatchDecoder::decode(&mut batch) {
            Ok(set) => {
                for r in set.records {
                    if r.offset >= from && !r.control {
                        out.records.push(Fetched { offset: r.offset, key: r.key, value: r.value });
                    }
                }
            }
            Err(e) => {
                log::debug!("Kafka: skipped a record batch at offset {base}: {e}");
                out.skipped += 1;
            }
        }
        out.next = out.next.max(last + 1);
    }
    // Drain what remains unread (a partial batch at the end of the answer).
    data.advance(data.len());
    out
}

mod scram {
    //! SCRAM (RFC 5802) client side, SHA-256 or SHA-512, on ring's HMAC and PBKDF2.

    use super::{Mechanism, Sasl};
    use ring::{digest, hmac, pbkdf2};

    pub struct Client {
        mechanism: Mechanism,
        user: String,
        password: String,
        nonce: String,
        first_bare: String,
        server_signature: Vec<u8>,
    }

    fn b64(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in data.chunks(3) {
            let n =
                (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= c.len() {
                    s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    fn unb64(s: &str) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in s.bytes().filter(|&c| c != b'=') {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return Err("the broker's SCRAM message is not base64".into()),
            };
            acc = acc << 6 | v as u32;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        Ok(out)
    }

    impl Client {
        pub fn new(sasl: &Sasl) -> Client {
            Client {
                mechanism: sasl.mechanism,
                user: sasl.user.replace('=', "=3D").replace(',', "=2C"),
                password: sasl.password.clone(),
                nonce: crate::auth::hex(&crate::auth::random_nonce()),
                first_bare: String::new(),
                server_signature: Vec::new(),
            }
        }

        fn algs(&self) -> (hmac::Algorithm, pbkdf2::Algorithm, &'static digest::Algorithm) {
            match self.mechanism {
                Mechanism::ScramSha512 => (hmac::HMAC_SHA512, pbkdf2::PBKDF2_HMAC_SHA512, &digest::SHA512),
                _ => (hmac::HMAC_SHA256, pbkdf2::PBKDF2_HMAC_SHA256, &digest::SHA256),
            }
        }

        pub fn first(&mut self) -> Vec<u8> {
            self.first_bare = format!("n={},r={}", self.user, self.nonce);
            format!("n,,{}", self.first_bare).into_bytes()
        }

        pub fn last(&mut self, server_first: &[u8]) -> Result<Vec<u8>, String> {
            let text =
                std::str::from_utf8(server_first).map_err(|_| "the broker's SCRAM message is not text")?;
            let (mut nonce, mut salt, mut iterations) = (None, None, None);
            for part in text.split(',') {
                match part.split_at_checked(2) {
                    Some(("r=", v)) => nonce = Some(v),
                    Some(("s=", v)) => salt = Some(unb64(v)?),
                    Some(("i=", v)) => iterations = v.parse::<u32>().ok(),
                    _ => {}
                }
            }
            let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
                return Err(format!("the broker's SCRAM challenge is incomplete: {text:?}"));
            };
            if !nonce.starts_with(&self.nonce) {
                return Err("the broker's SCRAM nonce does not extend ours".into());
            }
            let Some(iterations) = std::num::NonZeroU32::new(iterations).filter(|i| i.get() <= 1_000_000)
            else {
                return Err(format!(
                    "the broker asks for {iterations} SCRAM iterations (1 to 1000000 taken)"
                ));
            };
            let (mac, kdf, hash) = self.algs();
            let mut salted = vec![0u8; hash.output_len()];
            pbkdf2::derive(kdf, iterations, &salt, self.password.as_bytes(), &mut salted);
            let salted = hmac::Key::new(mac, &salted);
            let client_key = hmac::sign(&salted, b"Client Key");
            let stored = digest::digest(hash, client_key.as_ref());
            let without_proof = format!("c=biws,r={nonce}");
            let auth = format!("{},{text},{without_proof}", self.first_bare);
            let signature = hmac::sign(&hmac::Key::new(mac, stored.as_ref()), auth.as_bytes());
            let proof: Vec<u8> =
                client_key.as_ref().iter().zip(signature.as_ref()).map(|(a, b)| a ^ b).collect();
            let server_key = hmac::sign(&salted, b"Server Key");
            self.server_signature =
                hmac::sign(&hmac::Key::new(mac, server_key.as_ref()), auth.as_bytes()).as_ref().to_vec();
            Ok(format!("{without_proof},p={}", b64(&proof)).into_bytes())
        }

        pub fn verify(&self, server_final: &[u8]) -> Result<(), String> {
            let text =
                std::str::from_utf8(server_final).map_err(|_| "the broker's SCRAM answer is not text")?;
            if let Some(e) = text.strip_prefix("e=") {
                return Err(format!("the broker refused: {e}"));
            }
            let Some(v) = text.strip_prefix("v=") else {
                return Err(format!("the broker's SCRAM answer has no signature: {text:?}"));
            };
            if crate::auth::constant_time_eq(&unb64(v)?, &self.server_signature) {
                Ok(())
            } else {
                Err("the broker's SCRAM signature is wrong: it does not know the password (a broker in the \
                     middle?)"
                    .into())
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// RFC 7677's SCRAM-SHA-256 example, with its client nonce.
        #[test]
        fn the_rfc_7677_exchange() {
            let sasl =
                Sasl { mechanism: Mechanism::ScramSha256, user: "user".into(), password: "pencil".into() };
            let mut c = Client::new(&sasl);
            c.nonce = "rOprNGfwEbeRWgbNEkqO".into();
            assert_eq!(c.first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
            let last = c
                .last(
                    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                )
                .unwrap();
            assert_eq!(
                String::from_utf8(last).unwrap(),
                "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
            );
            c.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").unwrap();
            assert!(c.verify(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").is_err());
        }

        #[test]
        fn base64_both_ways() {
            for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
                assert_eq!(unb64(&b64(data)).unwrap(), data);
            }
            assert_eq!(b64(b"foobar"), "Zm9vYmFy");
            assert_eq!(b64(b"fo"), "Zm8=");
        }
    }
}
