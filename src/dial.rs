//! Dialing the controller, for the agent and the CLI: the controller URL, TLS client settings, a
//! byte stream to it, a link (WebSocket on its HTTP(S) port, or TCP on its inbound agent port,
//! given or found from `/tcpSlaveAgentListener/`), and small bounded HTTP GETs.
//!
//! Every failure is a [`DialError`] that says what to do, and [`DialError::is_permanent`] tells a
//! retry loop whether time can heal it.

use crate::link::{self, BoxIo, LinkReader, LinkWriter};
use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::{self, http};
use futures_rustls::pki_types::ServerName;
use futures_rustls::rustls;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::TcpStream;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// How long opening a TCP connection (or a TLS or WebSocket handshake, or an HTTP exchange) may
/// take: long enough for a loaded controller across the world, short enough to retry soon.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP answer header read during port discovery.
const MAX_DISCOVERY_RESPONSE: usize = 8 * 1024;
/// Most headers read from an HTTP answer (a controller sends about ten, a proxy adds a few).
const MAX_HEADERS: usize = 64;

/// Why dialing the controller failed. The `Display` form is a sentence that says what to do.
#[derive(Debug)]
pub enum DialError {
    /// The controller's address is malformed (`--url`, `--direct`). Permanent.
    BadAddress(String),
    /// No connection: refused, unreachable, or the name did not resolve.
    Unreachable {
        /// `host:port` dialed.
        addr: String,
        /// What the operating system said.
        error: io::Error,
    },
    /// A step of dialing took longer than [`CONNECT_TIMEOUT`].
    TimedOut {
        /// What was under way ("connecting to HOST:PORT", "GET /path").
        what: String,
    },
    /// The controller's TLS certificate is not trusted with this client's settings: no retry can
    /// succeed until the certificate or the trust options change. Permanent.
    CertificateUntrusted {
        /// `host:port` dialed.
        addr: String,
        /// What rustls said about the certificate.
        reason: String,
    },
    /// The peer closed or reset the connection during the TLS handshake, before any certificate
    /// was judged: typically a controller shedding load (closing on accept) or restarting.
    HandshakeCut {
        /// `host:port` dialed.
        addr: String,
    },
    /// The TLS handshake failed for another reason (no common protocol, an alert from the peer,
    /// a peer that does not speak TLS at all).
    Tls {
        /// `host:port` dialed.
        addr: String,
        /// What rustls said.
        reason: String,
    },
    /// An HTTP answer that is not the one asked for (a status, a refused WebSocket upgrade), or
    /// no readable answer at all. Permanent for 4xx statuses except 408 and 429.
    Http {
        /// The whole sentence.
        message: String,
        /// The status, if an answer could be read.
        status: Option<u16>,
    },
    /// The controller answered port discovery without a TCP agent port. Permanent.
    NoAgentPort {
        /// The whole sentence.
        message: String,
    },
    /// The connection failed after it was open (writing a request, reading an answer, the
    /// WebSocket handshake).
    Io {
        /// What was under way.
        what: String,
        /// The error, as text (WebSocket errors carry an I/O error or a protocol complaint).
        error: String,
    },
}

impl DialError {
    /// True when retrying cannot succeed until someone changes the configuration (the agent's
    /// options, the controller's certificate, a proxy): a malformed address, an untrusted
    /// certificate, a 4xx answer other than 408/429, no TCP agent port announced. A retry loop may
    /// stop on these, or at least retry at its slowest pace; it should print the message either way.
    ///
    /// False for what time can heal: a controller that is down, restarting or overloaded (refused
    /// connections, a TLS handshake cut off by the peer, 5xx answers), a slow network (timeouts),
    /// and TLS failures other than the certificate (which a controller being reconfigured may
    /// cause for a moment).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::BadAddress(_) | Self::CertificateUntrusted { .. } | Self::NoAgentPort { .. } => true,
            Self::Http { status: Some(s), .. } => (400..500).contains(s) && *s != 408 && *s != 429,
            Self::Unreachable { .. }
            | Self::TimedOut { .. }
            | Self::HandshakeCut { .. }
            | Self::Tls { .. }
            | Self::Http { status: None, .. }
            | Self::Io { .. } => false,
        }
    }
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadAddress(m) | Self::Http { message: m, .. } | Self::NoAgentPort { message: m } => {
                f.write_str(m)
            }
            Self::Unreachable { addr, error } => write!(
                f,
                "cannot connect to {addr}: {error} (is the controller running, and is this its address?)"
            ),
            Self::TimedOut { what } => write!(
                f,
                "{what} timed out after {}s (a slow or overloaded controller, or a firewall dropping \
                 packets)",
                CONNECT_TIMEOUT.as_secs()
            ),
            Self::CertificateUntrusted { addr, reason } => {
                write!(f, "TLS handshake with {addr} failed: {reason} ({})", crate::tls::TLS_ADVICE)
            }
            Self::HandshakeCut { addr } => write!(
                f,
                "{addr} closed the connection during the TLS handshake: the controller may be \
                 overloaded or restarting (or the port does not speak TLS); trying again later should help"
            ),
            Self::Tls { addr, reason } => write!(
                f,
                "TLS handshake with {addr} failed: {reason} (the URL's scheme must match the controller: \
                 https:// when it serves TLS, http:// when it runs --no-tls)"
            ),
            Self::Io { what, error } => write!(f, "{what}: {error}"),
        }
    }
}

impl std::error::Error for DialError {}

impl From<DialError> for String {
    fn from(e: DialError) -> Self {
        e.to_string()
    }
}

/// How the agent reaches the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// WebSocket at `URL/wsagents/`.
    WebSocket,
    /// TCP to this `host:port`.
    Direct(String),
    /// TCP to the port the controller announces at `URL/tcpSlaveAgentListener/`.
    Discover,
    /// Records on the node's topic of a Kafka cluster.
    #[cfg(feature = "kafka")]
    Kafka(KafkaMode),
}

/// The Kafka cluster an agent reaches the controller through.
#[cfg(feature = "kafka")]
#[derive(Debug, Clone)]
pub struct KafkaMode(pub Arc<crate::kafka::Config>);

#[cfg(feature = "kafka")]
impl PartialEq for KafkaMode {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[cfg(feature = "kafka")]
impl Eq for KafkaMode {}

/// Open a new Kafka session as node `name`: its link, with the tasks that move its records
/// started on smol's global executor (they end with the link).
#[cfg(feature = "kafka")]
pub async fn open_kafka(
    cfg: &crate::kafka::Config,
    name: &str,
) -> Result<(LinkReader, LinkWriter), DialError> {
    let (r, w, reading, producing) = crate::transport::kafka::connect(cfg, name).await.map_err(|e| {
        if e.is_transient() {
            DialError::Io { what: "reaching the Kafka cluster".into(), error: e.to_string() }
        } else {
            DialError::BadAddress(e.to_string())
        }
    })?;
    smol::spawn(reading).detach();
    smol::spawn(producing).detach();
    Ok(link::kafka(r, w))
}

/// The parts of the controller URL a client uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// https or wss.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port (default 80/443).
    pub port: u16,
    /// Path prefix, always ending in `/` (Jenkins may live under `/jenkins/`).
    pub prefix: String,
}

impl Target {
    /// The host as it goes in a URL or a `Host` header (an IPv6 address in brackets).
    fn url_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// Parse `http[s]://host[:port][/prefix]` (ws and wss are accepted too).
pub fn parse_url(url: &str) -> Result<Target, DialError> {
    let bad = |why: String| DialError::BadAddress(format!("bad controller URL {url:?}: {why}"));
    let uri: http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    let tls = match uri.scheme_str() {
        Some("http" | "ws") => false,
        Some("https" | "wss") => true,
        _ => return Err(bad("use http://HOST:PORT/ or https://HOST:PORT/".into())),
    };
    let host = uri.host().ok_or_else(|| bad("no host".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let mut prefix = uri.path().to_string();
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok(Target { tls, host, port, prefix })
}

/// Split `host:port` (IPv6 in brackets).
pub fn split_host_port(addr: &str) -> Result<(String, u16), DialError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| DialError::BadAddress(format!("bad address {addr:?}: use HOST:PORT")))?;
    let port = port.parse().map_err(|_| DialError::BadAddress(format!("bad port in {addr:?}")))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

/// TLS settings for connections to the controller.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    insecure: bool,
}

impl Tls {
    /// Trust the controller as `trust` says (webpki roots and `--cert`, a pinned identity, or no
    /// check at all).
    pub fn new(trust: &crate::tls::Trust) -> Result<Self, String> {
        Ok(Self { config: Arc::new(trust.client_config()?), insecure: trust.insecure })
    }

    /// No certificate check and no warning about it: only for fetching what the node secret seals
    /// (the jnlp descriptor), whose seal, not TLS, makes it authentic.
    pub fn unchecked_for_sealed_content() -> Result<Self, String> {
        let trust = crate::tls::Trust { insecure: true, ..Default::default() };
        Ok(Self { config: Arc::new(trust.client_config()?), insecure: false })
    }
}

async fn with_timeout<T>(
    what: impl FnOnce() -> String,
    fut: impl std::future::Future<Output = Result<T, DialError>>,
) -> Result<T, DialError> {
    smol::future::or(fut, async {
        smol::Timer::after(CONNECT_TIMEOUT).await;
        Err(DialError::TimedOut { what: what() })
    })
    .await
}

/// Tell a certificate this client does not trust from a handshake the peer cut off and from
/// other TLS failures.
fn tls_failure(addr: String, e: io::Error) -> DialError {
    use io::ErrorKind::*;
    if let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        return match tls {
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                DialError::CertificateUntrusted { addr, reason: tls.to_string() }
            }
            _ => DialError::Tls { addr, reason: tls.to_string() },
        };
    }
    match e.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => DialError::HandshakeCut { addr },
        _ => DialError::Tls { addr, reason: e.to_string() },
    }
}

/// Open a TCP connection, with TLS if `tls` is given, within `CONNECT_TIMEOUT`.
pub async fn open_stream(host: &str, port: u16, tls: Option<&Tls>) -> Result<BoxIo, DialError> {
    let addr = || if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    with_timeout(|| format!("connecting to {}", addr()), async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|error| DialError::Unreachable { addr: addr(), error })?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = tls else { return Ok(Box::pin(tcp) as BoxIo) };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| DialError::BadAddress(format!("bad TLS name {host}: {e}")))?;
        if tls.insecure {
            log::warn!(
                "--no-certificate-check: not checking who {} is; only the node secret stands between \
                 this agent and an impostor",
                addr()
            );
        }
        let conn = futures_rustls::TlsConnector::from(tls.config.clone());
        let stream = conn.connect(name, tcp).await.map_err(|e| tls_failure(addr(), e))?;
        Ok(Box::pin(stream) as BoxIo)
    })
    .await
}

/// Open a link to the controller in the given mode, announcing node `name` to proxies' logs.
pub async fn open(
    target: &Target,
    mode: &Mode,
    name: &str,
    tls: Option<&Tls>,
) -> Result<(LinkReader, LinkWriter), DialError> {
    match mode {
        Mode::WebSocket => {
            let io = open_stream(&target.host, target.port, tls).await?;
            let scheme = if target.tls { "wss" } else { "ws" };
            let url = format!("{scheme}://{}:{}{}wsagents/", target.url_host(), target.port, target.prefix);
            let mut req = url
                .as_str()
                .into_client_request()
                .map_err(|e| DialError::BadAddress(format!("bad URL {url}: {e}")))?;
            if let Ok(v) = http::HeaderValue::from_str(name) {
                req.headers_mut().insert("Node-Name", v);
            }
            let ws = with_timeout(
                || "the WebSocket handshake".into(),
                async {
                    match async_tungstenite::client_async_with_config(req, io, Some(link::ws_agent_config())).await {
                        Ok((ws, _)) => Ok(ws),
                        Err(tungstenite::Error::Http(resp)) => Err(DialError::Http {
                            message: format!(
                                "{url} answered HTTP {} instead of a WebSocket upgrade: is --url the \
                                 controller's address, and does any proxy in between pass WebSocket upgrades?",
                                resp.status()
                            ),
                            status: Some(resp.status().as_u16()),
                        }),
                        Err(e) => Err(DialError::Io {
                            what: format!("WebSocket handshake with {url} failed"),
                            error: e.to_string(),
                        }),
                    }
                },
            )
            .await?;
            Ok(link::websocket(ws))
        }
        Mode::Direct(addr) => {
            let (host, port) = split_host_port(addr)?;
            Ok(link::tcp(open_stream(&host, port, tls).await?))
        }
        Mode::Discover => {
            let port = discover_port(target, tls).await?;
            Ok(link::tcp(open_stream(&target.host, port, tls).await?))
        }
        #[cfg(feature = "kafka")]
        Mode::Kafka(k) => open_kafka(&k.0, name).await,
    }
}

/// An HTTP answer: status code, header block, body.
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// The status line and headers, as received.
    pub head: String,
    /// The headers, names as received.
    pub headers: Vec<(String, String)>,
    /// The body, up to the size limit given.
    pub body: Vec<u8>,
}

impl HttpAnswer {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// An answer's header block as parsed: its length, the status and the headers.
struct Head {
    len: usize,
    status: u16,
    headers: Vec<(String, String)>,
}

/// Parse an answer's header block; None until it is complete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = resp.parse(buf)? else { return Ok(None) };
    let headers = resp
        .headers
        .iter()
        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string()))
        .collect();
    Ok(Some(Head { len, status: resp.code.unwrap_or(0), headers }))
}

/// A bounded HTTP/1.0 GET of `path_and_query` (which starts with `/`): reads at most `max` bytes,
/// or only the header block if `head_only`. Fails on connection errors, an unreadable answer and
/// after `CONNECT_TIMEOUT`; any status is an answer.
pub async fn http_get(
    target: &Target,
    tls: Option<&Tls>,
    path_and_query: &str,
    max: usize,
    head_only: bool,
) -> Result<HttpAnswer, DialError> {
    let mut io = open_stream(&target.host, target.port, tls).await?;
    let path = path_and_query;
    let failed =
        |what: &str, e: io::Error| DialError::Io { what: format!("{what} {path}"), error: e.to_string() };
    with_timeout(|| format!("GET {path}"), async {
        let default_port = if target.tls { 443 } else { 80 };
        let host = target.url_host();
        let host = if target.port == default_port { host } else { format!("{host}:{}", target.port) };
        let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        io.write_all(req.as_bytes()).await.map_err(|e| failed("GET", e))?;
        io.flush().await.map_err(|e| failed("GET", e))?;
        let mut buf = vec![0u8; max];
        let mut len = 0;
        let mut head = None;
        while len < buf.len() {
            let n = io.read(&mut buf[len..]).await.map_err(|e| failed("reading", e))?;
            if n == 0 {
                break;
            }
            len += n;
            if head.is_none() {
                head = parse_head(&buf[..len]).map_err(|e| unreadable(path, &e.to_string()))?;
                if head.is_some() && head_only {
                    break;
                }
            }
        }
        buf.truncate(len);
        let Some(Head { len: head_len, status, headers }) = head else {
            let why = if len == max { "its header is too long" } else { "it ended before its header did" };
            return Err(unreadable(path, why));
        };
        let text = String::from_utf8_lossy(&buf[..head_len]).trim_end().to_string();
        let body = buf.split_off(head_len);
        Ok(HttpAnswer { status, head: text, headers, body })
    })
    .await
}

fn unreadable(path: &str, why: &str) -> DialError {
    DialError::Http {
        message: format!(
            "the answer to GET {path} is not readable HTTP ({why}): is the URL the controller's?"
        ),
        status: None,
    }
}

/// Ask the controller which TCP port takes agents, as Jenkins agents do.
pub async fn discover_port(target: &Target, tls: Option<&Tls>) -> Result<u16, DialError> {
    let path = format!("{}tcpSlaveAgentListener/", target.prefix);
    let answer = http_get(target, tls, &path, MAX_DISCOVERY_RESPONSE, true).await?;
    let no_port = |why: String| DialError::NoAgentPort {
        message: format!("{path} {why}: use --websocket, or --direct HOST:PORT"),
    };
    if let Some(v) = answer.header("X-Jenkins-JNLP-Port") {
        return v.parse().map_err(|_| no_port(format!("announced a bad TCP agent port {v:?}")));
    }
    let status_line = answer.head.lines().next().unwrap_or("").to_string();
    let error = DialError::Http {
        message: format!("{path} answered {status_line} while looking for the TCP agent port"),
        status: Some(answer.status),
    };
    if answer.status < 300 || error.is_permanent() {
        return Err(no_port(format!("did not announce a TCP agent port ({status_line})")));
    }
    Err(error)
}

#[cfg(test)]
mod tests;
