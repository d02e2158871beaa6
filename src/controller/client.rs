//! The CLI's HTTP client for the controller's JSON API (hyper over smol). JSON calls reuse idle
//! keep-alive connections; log streams get a connection of their own.

use crate::dial::{self, parse_url, Target, Tls};
use crate::link::BoxIo;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use smol::net::TcpStream;
use smol_hyper::rt::FuturesIo;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// How long connecting to the controller may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the controller is and how to authenticate to it.
pub struct Client {
    target: Target,
    url: String,
    token: String,
    tls: Option<Tls>,
    /// Connections whose last exchange ended cleanly, ready for another request.
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// Most idle connections kept for reuse.
const MAX_IDLE: usize = 16;

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

impl Client {
    /// Resolve the URL (`--url`, `WISP_URL`, `DATA/listening`, default) and the token (`--token`,
    /// `WISP_TOKEN`, `DATA/token`). An https URL is checked with `WISP_INSTANCE_IDENTITY` (a pinned
    /// fingerprint) or `WISP_CERT` (a CA file) if set, else with the fingerprint in `DATA/fingerprint`
    /// when the URL is the one in `DATA/listening`, else with the webpki roots.
    pub fn new(url: Option<String>, token: Option<String>, data: Option<PathBuf>) -> Result<Self, String> {
        let data = data.unwrap_or_else(|| PathBuf::from("wisp-data"));
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let local = read_trimmed(&data.join("listening")).and_then(|l| {
            if let Some(u) = l.lines().find_map(|line| line.strip_prefix("url ")) {
                return Some(u.to_string());
            }
            let addr = l.lines().find_map(|line| line.strip_prefix("http "))?;
            Some(format!("http://{addr}/"))
        });
        let url = url
            .or_else(|| env("WISP_URL"))
            .or_else(|| local.clone())
            .unwrap_or_else(|| "http://127.0.0.1:8080/".into());
        let token = token
            .or_else(|| env("WISP_TOKEN"))
            .or_else(|| read_trimmed(&data.join("token")))
            .ok_or_else(|| {
                format!(
                "no API token: pass --token or set WISP_TOKEN, or --data DIR where the controller keeps it \
                 (looked in {})",
                data.join("token").display()
            )
            })?;
        let target = parse_url(&url)?;
        let tls = if target.tls {
            let mut trust =
                crate::tls::Trust { ca_file: env("WISP_CERT").map(PathBuf::from), ..Default::default() };
            if let Some(fp) = env("WISP_INSTANCE_IDENTITY") {
                trust.pin = Some(crate::tls::parse_fingerprint(&fp)?);
            } else if trust.ca_file.is_none() && local.as_deref() == Some(url.as_str()) {
                trust.pin = read_trimmed(&data.join("fingerprint"))
                    .map(|fp| crate::tls::parse_fingerprint(&fp))
                    .transpose()?;
            }
            Some(Tls::new(&trust)?)
        } else {
            None
        };
        Ok(Self { target, url, token, tls, idle: Mutex::new(Vec::new()) })
    }

    /// The controller URL in use.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let (host, port) = (&self.target.host, self.target.port);
        let stream: BoxIo = match &self.tls {
            Some(tls) => dial::open_stream(host, port, Some(tls)).await.map_err(|e| {
                format!(
                    "cannot reach the controller at {}: {e} (the CLI also reads WISP_INSTANCE_IDENTITY and \
                     WISP_CERT)",
                    self.url
                )
            })?,
            None => Box::pin(
                smol::future::or(
                    async {
                        let s = TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
                        let _ = s.set_nodelay(true);
                        Ok(s)
                    },
                    async {
                        smol::Timer::after(CONNECT_TIMEOUT).await;
                        Err("timed out".to_string())
                    },
                )
                .await
                .map_err(|e| {
                    format!(
                        "cannot reach the controller at {}: {e} (is `wisp serve` running? set --url or \
                         WISP_URL)",
                        self.url
                    )
                })?,
            ),
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(FuturesIo::new(stream))
            .await
            .map_err(|e| format!("talking to {}: {e}", self.url))?;
        smol::spawn(async move {
            let _ = conn.await;
        })
        .detach();
        Ok(sender)
    }

    /// An idle kept-alive connection if one is still open, else a new one.
    async fn sender(&self, reuse: bool) -> Result<(SendRequest<Full<Bytes>>, bool), String> {
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
    ) -> Result<(hyper::Response<hyper::body::Incoming>, SendRequest<Full<Bytes>>), String> {
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
                .map_err(|e| e.to_string())?;
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, sender)),
                Err(e) if reused && e.message().is_some() => {
                    // Not sent at all: safe to send again, even a POST.
                    (sender, reused) = (self.connect().await?, false);
                }
                Err(e) => return Err(format!("talking to {}: {}", self.url, e.into_error())),
            }
        }
    }

    /// Call the API and decode its JSON answer; a non-2xx answer becomes its error message.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<serde_json::Value, String> {
        let (resp, sender) = self.send(method, path, body.into(), true).await?;
        let status = resp.status();
        let bytes =
            resp.into_body().collect().await.map_err(|e| format!("reading the answer: {e}"))?.to_bytes();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
        drop(idle);
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| {
            format!("{}: unexpected answer (HTTP {status}): {}", self.url, String::from_utf8_lossy(&bytes))
        })?;
        if !status.is_success() {
            let msg = v["error"].as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
            return Err(msg);
        }
        Ok(v)
    }

    /// Stream a GET answer's body into `out` as it arrives.
    pub async fn stream(&self, path: &str, out: &mut dyn Write) -> Result<(), String> {
        let (resp, _sender) = self.send(Method::GET, path, Bytes::new(), false).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            return Err(v["error"].as_str().map(str::to_string).unwrap_or_else(|| format!("HTTP {status}")));
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("log stream broke: {e}"))?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data).map_err(|e| e.to_string())?;
                out.flush().map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}
