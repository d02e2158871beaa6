//! Opening a link to the controller: WebSocket on its HTTP(S) port, or TCP (optionally TLS) on its
//! inbound agent port, found directly or from the controller's `/tcpSlaveAgentListener/` answer.

use crate::link::{self, BoxIo, LinkReader, LinkWriter};
use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::{self, http};
use futures_rustls::pki_types::ServerName;
use futures_rustls::rustls;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// How long opening a TCP connection (or a TLS or WebSocket handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP answer header read during port discovery.
const MAX_DISCOVERY_RESPONSE: usize = 8 * 1024;

/// How the agent reaches the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// WebSocket at `URL/wsagents/`.
    WebSocket,
    /// TCP to this `host:port`.
    Direct(String),
    /// TCP to the port the controller announces at `URL/tcpSlaveAgentListener/`.
    Discover,
}

/// The parts of the controller URL the agent uses.
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

/// Parse `http[s]://host[:port][/prefix]` (ws and wss are accepted too).
pub fn parse_url(url: &str) -> Result<Target, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad controller URL {url:?}: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http" | "ws") => false,
        Some("https" | "wss") => true,
        _ => return Err(format!("bad controller URL {url:?}: use http://HOST:PORT/ or https://HOST:PORT/")),
    };
    let host = uri.host().ok_or_else(|| format!("bad controller URL {url:?}: no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let mut prefix = uri.path().to_string();
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok(Target { tls, host, port, prefix })
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

    /// No certificate check and no warning about it: only for fetching what the node secret seals.
    pub fn unchecked_for_sealed_content() -> Result<Self, String> {
        let trust = crate::tls::Trust { insecure: true, ..Default::default() };
        Ok(Self { config: Arc::new(trust.client_config()?), insecure: false })
    }
}

async fn with_timeout<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    smol::future::or(fut, async {
        smol::Timer::after(CONNECT_TIMEOUT).await;
        Err(format!("{what} timed out after {}s", CONNECT_TIMEOUT.as_secs()))
    })
    .await
}

/// Open a TCP connection, with TLS if `tls` is given, within `CONNECT_TIMEOUT`.
pub async fn open_stream(host: &str, port: u16, tls: Option<&Tls>) -> Result<BoxIo, String> {
    with_timeout(&format!("connecting to {host}:{port}"), async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match tls {
            None => Ok(Box::pin(tcp) as BoxIo),
            Some(tls) => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| format!("bad TLS name {host}: {e}"))?;
                if tls.insecure {
                    log::warn!(
                        "--no-certificate-check: not checking who {host}:{port} is; only the node secret \
                         stands between this agent and an impostor"
                    );
                }
                let conn = futures_rustls::TlsConnector::from(tls.config.clone());
                let stream = conn.connect(name, tcp).await.map_err(|e| {
                    format!("TLS handshake with {host}:{port} failed: {e} ({})", crate::tls::TLS_ADVICE)
                })?;
                Ok(Box::pin(stream) as BoxIo)
            }
        }
    })
    .await
}

/// Open a link to the controller in the configured mode.
pub async fn open(
    target: &Target,
    mode: &Mode,
    name: &str,
    tls: Option<&Tls>,
) -> Result<(LinkReader, LinkWriter), String> {
    match mode {
        Mode::WebSocket => {
            let io = open_stream(&target.host, target.port, tls).await?;
            let scheme = if target.tls { "wss" } else { "ws" };
            let host =
                if target.host.contains(':') { format!("[{}]", target.host) } else { target.host.clone() };
            let url = format!("{scheme}://{host}:{}{}wsagents/", target.port, target.prefix);
            let mut req = url.as_str().into_client_request().map_err(|e| format!("bad URL {url}: {e}"))?;
            if let Ok(v) = http::HeaderValue::from_str(name) {
                req.headers_mut().insert("Node-Name", v);
            }
            let ws = with_timeout("the WebSocket handshake", async {
                match async_tungstenite::client_async_with_config(req, io, Some(link::ws_config())).await {
                    Ok((ws, _)) => Ok(ws),
                    Err(tungstenite::Error::Http(resp)) => Err(format!(
                        "{url} answered HTTP {} instead of a WebSocket upgrade: is --url the controller's \
                         address, and does any proxy in between pass WebSocket upgrades?",
                        resp.status()
                    )),
                    Err(e) => Err(format!("WebSocket handshake with {url} failed: {e}")),
                }
            })
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
    }
}

/// Split `host:port` (IPv6 in brackets).
pub fn split_host_port(addr: &str) -> Result<(String, u16), String> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("bad address {addr:?}: use HOST:PORT"))?;
    let port = port.parse().map_err(|_| format!("bad port in {addr:?}"))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

/// An HTTP answer: status code, header block, body.
pub struct HttpAnswer {
    /// Status code (0 if the status line was unreadable).
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    /// The body, up to the size limit given.
    pub body: Vec<u8>,
}

/// A bounded HTTP/1.0 GET of `path_and_query` (which starts with `/`): reads at most `max` bytes,
/// or only the header block if `head_only`. Fails on connection errors and after `CONNECT_TIMEOUT`.
pub async fn http_get(
    target: &Target,
    tls: Option<&Tls>,
    path_and_query: &str,
    max: usize,
    head_only: bool,
) -> Result<HttpAnswer, String> {
    let mut io = open_stream(&target.host, target.port, tls).await?;
    let path = path_and_query;
    with_timeout(&format!("GET {path}"), async {
        let host = if target.host.contains(':') { format!("[{}]", target.host) } else { target.host.clone() };
        let default_port = if target.tls { 443 } else { 80 };
        let host = if target.port == default_port { host } else { format!("{host}:{}", target.port) };
        let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        io.write_all(req.as_bytes()).await.map_err(|e| format!("GET {path}: {e}"))?;
        io.flush().await.map_err(|e| format!("GET {path}: {e}"))?;
        let mut buf = vec![0u8; max];
        let mut len = 0;
        while len < buf.len() {
            let n = io.read(&mut buf[len..]).await.map_err(|e| format!("reading {path}: {e}"))?;
            if n == 0 {
                break;
            }
            len += n;
            if head_only && buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        buf.truncate(len);
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n");
        let (head, body) = match split {
            Some(i) => (String::from_utf8_lossy(&buf[..i]).into_owned(), buf[i + 4..].to_vec()),
            None => (String::from_utf8_lossy(&buf).into_owned(), Vec::new()),
        };
        let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok(HttpAnswer { status, head, body })
    })
    .await
}

/// Ask the controller which TCP port takes agents, as Jenkins agents do.
pub async fn discover_port(target: &Target, tls: Option<&Tls>) -> Result<u16, String> {
    let path = format!("{}tcpSlaveAgentListener/", target.prefix);
    {
        let answer = http_get(target, tls, &path, MAX_DISCOVERY_RESPONSE, true).await?;
        let head = answer.head;
        for line in head.lines().skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("X-Jenkins-JNLP-Port") {
                    return v.trim().parse().map_err(|_| format!("{path}: bad port {:?}", v.trim()));
                }
            }
        }
        let status = head.lines().next().unwrap_or("").to_string();
        Err(format!(
            "{path} did not announce a TCP agent port ({status}): use --websocket, or --direct HOST:PORT"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults_and_prefixes() {
        let t = parse_url("http://127.0.0.1:8080").unwrap();
        assert_eq!(t, Target { tls: false, host: "127.0.0.1".into(), port: 8080, prefix: "/".into() });
        let t = parse_url("https://ci.example.com/jenkins").unwrap();
        assert_eq!((t.tls, t.port, t.prefix.as_str()), (true, 443, "/jenkins/"));
        assert!(parse_url("ftp://x").is_err());
        assert_eq!(split_host_port("[::1]:50000").unwrap(), ("::1".to_string(), 50000));
    }
}
