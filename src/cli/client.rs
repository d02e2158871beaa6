//! The CLI's HTTP client for the controller's JSON API (hyper over smol). JSON calls reuse idle
//! keep-alive connections and read their answers into the types of `controller::api`; log
//! streams get a connection of their own.

use crate::controller::api::ErrorBody;
use crate::dial::{parse_url, Target};
use crate::link::BoxIo;
use bytes::Bytes;
use futures_rustls::pki_types::ServerName;
use futures_rustls::rustls::ClientConfig;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use smol::net::TcpStream;
use smol_hyper::rt::FuturesIo;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long connecting to the controller (TCP and TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most idle connections kept for reuse.
const MAX_IDLE: usize = 16;

/// Said after a failed TLS handshake: the options that make the CLI trust the controller.
const TLS_ADVICE: &str = "for the controller's own (self-signed) identity give --instance-identity \
     FINGERPRINT (it is in the controller's DATA/fingerprint), or --data DATA where that file is; for a \
     private CA give --cert CA.pem; --no-certificate-check skips the check (unsafe)";

/// Where the controller is and how to trust and authenticate to it, as the command line says.
#[derive(Debug, Clone, Default)]
pub struct Remote {
    /// `--url` (else `WISP_URL`, else the data dir's `listening`, else `http://127.0.0.1:8080/`).
    pub url: Option<String>,
    /// `--token` (else `WISP_TOKEN`, else the data dir's `token`).
    pub token: Option<String>,
    /// `--data` (default `./wisp-data`): where the controller keeps its URL, token and identity.
    pub data: Option<PathBuf>,
    /// `--instance-identity`: pin the controller's public key (`sha256:HEX`).
    pub instance_identity: Option<String>,
    /// `--cert`: extra CA certificates (PEM) to trust.
    pub cert: Option<PathBuf>,
    /// `--no-certificate-check`: trust any certificate.
    pub no_certificate_check: bool,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The controller could not be reached, or the connection broke: worth trying again later.
    Unreachable {
        /// The controller's URL.
        url: String,
        /// What went wrong, in a few words.
        cause: String,
        /// Whether to ask if `wisp serve` runs (the connection itself was refused or timed out).
        hint: bool,
    },
    /// The controller refused the request: its HTTP status and its sentence.
    Refused {
        /// HTTP status code.
        status: u16,
        /// The `error` of its answer.
        message: String,
    },
    /// Anything else: an answer that makes no sense, a local problem.
    Other(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unreachable { url, cause, hint } => {
                write!(f, "cannot reach the controller at {url}: {cause}")?;
                if *hint {
                    f.write_str(" (is `wisp serve` running? set --url or WISP_URL)")?;
                }
                Ok(())
            }
            Error::Other(m) | Error::Refused { message: m, .. } => f.write_str(m),
        }
    }
}

impl From<String> for Error {
    fn from(m: String) -> Self {
        Error::Other(m)
    }
}

/// A connection to the controller's API.
pub struct Client {
    target: Target,
    url: String,
    token: String,
    tls: Option<Arc<ClientConfig>>,
    /// Connections whose last exchange ended cleanly, ready for another request.
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

impl Client {
    /// Resolve the URL and the token, and how to check an https controller: with the trust
    /// options given (as `wisp-agent` takes them), else `WISP_INSTANCE_IDENTITY` (a pinned
    /// fingerprint) or `WISP_CERT` (a CA file) if set, else the fingerprint in `DATA/fingerprint`
    /// when the URL is the one in `DATA/listening`, else the webpki roots.
    pub fn new(remote: &Remote) -> Result<Self, String> {
        let data = remote.data.clone().unwrap_or_else(|| PathBuf::from("wisp-data"));
        let local = read_trimmed(&data.join("listening")).and_then(|l| {
            if let Some(u) = l.lines().find_map(|line| line.strip_prefix("url ")) {
                return Some(u.to_string());
            }
            let addr = l.lines().find_map(|line| line.strip_prefix("http "))?;
            Some(format!("http://{addr}/"))
        });
        let url = remote
            .url
            .clone()
            .or_else(|| env("WISP_URL"))
            .or_else(|| local.clone())
            .unwrap_or_else(|| "http://127.0.0.1:8080/".into());
        let token = remote
            .token
            .clone()
            .or_else(|| env("WISP_TOKEN"))
            .or_else(|| read_trimmed(&data.join("token")))
            .ok_or_else(|| {
                format!(
                    "no API token: pass --token or set WISP_TOKEN, or --data DIR where the controller keeps \
                     it (looked in {})",
                    data.join("token").display()
                )
            })?;
        let target = parse_url(&url)?;
        let tls = if target.tls {
            let given =
                remote.instance_identity.is_some() || remote.cert.is_some() || remote.no_certificate_check;
            let mut trust = crate::tls::Trust::default();
            if given {
                trust.ca_file = remote.cert.clone();
                trust.pin =
                    remote.instance_identity.as_deref().map(crate::tls::parse_fingerprint).transpose()?;
                trust.insecure = remote.no_certificate_check;
            } else if let Some(fp) = env("WISP_INSTANCE_IDENTITY") {
                trust.pin = Some(crate::tls::parse_fingerprint(&fp)?);
            } else if let Some(ca) = env("WISP_CERT") {
                trust.ca_file = Some(PathBuf::from(ca));
            } else if local.as_deref() == Some(url.as_str()) {
                trust.pin = read_trimmed(&data.join("fingerprint"))
                    .map(|fp| crate::tls::parse_fingerprint(&fp))
                    .transpose()?;
            }
            if trust.insecure {
                eprintln!(
                    "wisp: --no-certificate-check: not checking who {}:{} is; the API token goes to whoever \
                     answers",
                    target.host, target.port
                );
            }
            Some(Arc::new(trust.client_config()?))
        } else {
            None
        };
        Ok(Self { target, url, token, tls, idle: Mutex::new(Vec::new()) })
    }

    /// The controller URL in use.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn lost(&self, cause: impl fmt::Display) -> Error {
        Error::Unreachable { url: self.url.clone(), cause: cause.to_string(), hint: false }
    }

    /// A TCP connection to the controller, in TLS if its URL is https, within `CONNECT_TIMEOUT`.
    async fn open(&self) -> Result<BoxIo, Error> {
        let (host, port) = (self.target.host.as_str(), self.target.port);
        let unreachable = |cause: String| Error::Unreachable { url: self.url.clone(), cause, hint: true };
        let connect = async {
            let tcp = TcpStream::connect((host, port)).await.map_err(|e| unreachable(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let Some(cfg) = &self.tls else { return Ok(Box::pin(tcp) as BoxIo) };
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| Error::Other(format!("bad TLS name {host}: {e}")))?;
            let tls =
                futures_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp).await.map_err(|e| {
                    if e.kind() != std::io::ErrorKind::InvalidData {
                        return self.lost(format!("TLS handshake: {e}"));
                    }
                    // A refused certificate will be refused again: not worth retrying.
                    Error::Other(format!(
                        "cannot reach the controller at {}: TLS handshake with {host}:{port} failed: {e} \
                     ({TLS_ADVICE}; or set WISP_INSTANCE_IDENTITY or WISP_CERT)",
                        self.url
                    ))
                })?;
            Ok(Box::pin(tls) as BoxIo)
        };
        smol::future::or(connect, async {
            smol::Timer::after(CONNECT_TIMEOUT).await;
            Err(unreachable(format!("no connection within {}s", CONNECT_TIMEOUT.as_secs())))
        })
        .await
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Error> {
        let stream = self.open().await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(FuturesIo::new(stream)).await.map_err(|e| self.lost(e))?;
        smol::spawn(async move {
            let _ = conn.await;
        })
        .detach();
        Ok(sender)
    }

    /// An idle kept-alive connection if one is still open, else a new one.
    async fn sender(&self, reuse: bool) -> Result<(SendRequest<Full<Bytes>>, bool), Error> {
        if reuse {
            loop {
                let Some(mut s) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() else { break };
                if s.ready().await.is_ok() {
                    return Ok((s, true));
                }
            }
        }
        Ok((self.connect().await?, false))
    }

    /// Send a request; on a reused connection that the controller closed before taking the
    /// request (an idle keep-alive timing out), send it again on a new one.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        reuse: bool,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, SendRequest<Full<Bytes>>), Error> {
        let (host, port) = (&self.target.host, self.target.port);
        let uri = format!("{}{}", self.target.prefix.trim_end_matches('/'), path);
        let (mut sender, mut reused) = self.sender(reuse).await?;
        loop {
            let req = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .header("Host", format!("{host}:{port}"))
                .header("Authorization", format!("Bearer {}", self.token))
                .body(Full::new(body.clone()))
                .map_err(|e| Error::Other(format!("bad request {uri}: {e}")))?;
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, sender)),
                Err(e) if reused && e.message().is_some() => {
                    // Not sent at all: safe to send again, even a POST.
                    (sender, reused) = (self.connect().await?, false);
                }
                Err(e) => return Err(self.lost(e.into_error())),
            }
        }
    }

    /// The refusal a non-2xx answer carries (its `{"error": ...}`); 502 to 504, which a proxy
    /// gives while the controller behind it is away, count as unreachable.
    fn refusal(&self, status: StatusCode, body: &[u8]) -> Error {
        let message = serde_json::from_slice::<ErrorBody>(body)
            .map(|b| b.error)
            .unwrap_or_else(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(body).trim()));
        if matches!(status.as_u16(), 502..=504) {
            return self.lost(message);
        }
        Error::Refused { status: status.as_u16(), message }
    }

    /// Call the API and read its answer as `T`; a refusal becomes its status and sentence.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<T, Error> {
        let (resp, sender) = self.send(method, path, body.into(), true).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.lost(format!("reading the answer: {e}")))?
            .to_bytes();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
        drop(idle);
        if !status.is_success() {
            return Err(self.refusal(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::Other(format!(
                "{}: unexpected answer (HTTP {status}; {e}): {}",
                self.url,
                String::from_utf8_lossy(&bytes)
            ))
        })
    }

    /// `GET path`, read as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call(Method::GET, path, Bytes::new()).await
    }

    /// Stream a GET answer's body into `out` as it arrives, until it ends.
    pub async fn stream(&self, path: &str, out: &mut dyn Write) -> Result<(), Error> {
        let (resp, _sender) = self.send(Method::GET, path, Bytes::new(), false).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes =
                body.collect().await.map_err(|e| self.lost(format!("reading the answer: {e}")))?.to_bytes();
            return Err(self.refusal(status, &bytes));
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.lost(format!("the log stream broke: {e}")))?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data).and_then(|_| out.flush()).map_err(|e| Error::Other(e.to_string()))?;
            }
        }
        Ok(())
    }
}
