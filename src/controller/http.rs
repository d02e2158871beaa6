//! The controller's listeners: HTTP (JSON API, log streams, the agent descriptor and the
//! `/wsagents/` WebSocket endpoint) and the TCP inbound agent port.

use super::agents;
use super::core::{ApiError, Controller};
use super::identity::ServerTls;
use super::labels;
use super::store::NodeRecord;
use crate::link::{self, BoxIo};
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::Role;
use async_tungstenite::WebSocketStream;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use smol::net::{TcpListener, TcpStream};
use smol::stream::StreamExt;
use smol_hyper::rt::FuturesIo;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest request body accepted (a pipeline, a node).
pub const MAX_BODY: usize = 1024 * 1024;
/// Chunk size for log streams.
const LOG_CHUNK: usize = 64 * 1024;

/// A response body.
pub type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
    r
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    full(status, "application/json", format!("{v}\n"))
}

fn error(e: ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, json!({ "error": e.message }))
}

/// How long a client may take to finish the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections (both ports together) that may be in the TLS handshake at once; more are closed
/// as soon as they are accepted.
pub const MAX_HANDSHAKING: usize = 4096;

static HANDSHAKING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a connection as handshaking while it lives.
struct Handshaking;

impl Handshaking {
    fn enter() -> Option<Self> {
        if HANDSHAKING.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKING {
            HANDSHAKING.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Self)
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        HANDSHAKING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wrap an accepted connection in TLS if the controller speaks TLS; None if the handshake fails
/// or takes longer than `TLS_HANDSHAKE_TIMEOUT` (logged).
async fn accept_tls(
    stream: TcpStream,
    tls: Option<&ServerTls>,
    peer: SocketAddr,
    port: &str,
) -> Option<BoxIo> {
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else { return Some(Box::pin(stream)) };
    let Some(_counted) = Handshaking::enter() else {
        log::warn!("{port} {peer}: {MAX_HANDSHAKING} connections already in the TLS handshake, closing");
        return None;
    };
    let handshake = async { Some(tls.acceptor.accept(stream).await) };
    let timeout = async {
        smol::Timer::after(TLS_HANDSHAKE_TIMEOUT).await;
        None
    };
    match smol::future::or(handshake, timeout).await {
        Some(Ok(s)) => Some(Box::pin(s)),
        Some(Err(e)) => {
            log::warn!("{port} {peer}: TLS handshake failed: {e}");
            None
        }
        None => {
            log::warn!(
                "{port} {peer}: no TLS handshake within {}s, closing",
                TLS_HANDSHAKE_TIMEOUT.as_secs()
            );
            None
        }
    }
}

/// Accept HTTP(S) connections forever.
pub async fn http_loop(ctl: Arc<Controller>, listener: TcpListener, tls: Option<Arc<ServerTls>>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::warn!("http accept: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctl2 = ctl.clone();
        let tls = tls.clone();
        ctl.ex
            .spawn(async move {
                let Some(io) = accept_tls(stream, tls.as_deref(), peer, "http").await else { return };
                let fingerprint: Option<Arc<str>> = tls.map(|t| t.fingerprint.as_str().into());
                let timer = super::deadlines::HyperTimer(ctl2.deadlines.clone());
                let service = hyper::service::service_fn(move |req| {
                    let ctl = ctl2.clone();
                    let fp = fingerprint.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(ctl, req, peer, fp.as_deref()).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(timer)
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(FuturesIo::new(io), service)
                    .with_upgrades();
                if let Err(e) = conn.await {
                    log::debug!("http connection from {peer}: {e}");
                }
            })
            .detach();
    }
}

/// Accept TCP (or TLS) agent links forever.
pub async fn agent_loop(ctl: Arc<Controller>, listener: TcpListener, tls: Option<Arc<ServerTls>>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::warn!("agent port accept: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctl2 = ctl.clone();
        let tls = tls.clone();
        ctl.ex
            .spawn(async move {
                let Some(io) = accept_tls(stream, tls.as_deref(), peer, "agent port").await else { return };
                let (r, w) = link::tcp(io);
                agents::serve(ctl2, r, w, peer.to_string()).await;
            })
            .detach();
    }
}

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers().get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

/// The URL agents should use, from `Host` (the address the caller reached us by) and the scheme
/// (a proxy's `X-Forwarded-Proto`, else whether we speak TLS).
fn public_url(ctl: &Controller, req: &Request<Incoming>, fp: Option<&str>) -> String {
    let forwarded = req.headers().get("X-Forwarded-Proto").and_then(|h| h.to_str().ok());
    let scheme = match forwarded {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        Some(_) => "http",
        None if fp.is_some() => "https",
        None => "http",
    };
    match req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) {
        Some(h) => format!("{scheme}://{h}/"),
        None => match ctl.addrs.get() {
            Some((http, _)) => format!("{scheme}://{http}/"),
            None => format!("{scheme}://127.0.0.1:8080/"),
        },
    }
}

/// The identity an agent should pin: ours, unless the request came through a proxy (whose
/// certificate the agent sees instead).
fn pin_for<'a>(req: &Request<Incoming>, fp: Option<&'a str>) -> Option<&'a str> {
    fp.filter(|_| !req.headers().contains_key("X-Forwarded-Proto"))
}

async fn route(
    ctl: Arc<Controller>,
    req: Request<Incoming>,
    peer: SocketAddr,
    fp: Option<&str>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segs.as_slice()) {
        (&Method::GET, ["wsagents"]) => return ws_upgrade(ctl, req, peer),
        (&Method::GET, ["tcpSlaveAgentListener"]) => {
            let mut r = full(StatusCode::OK, "text/plain", "wisp agent listener\n");
            if let Some((_, agent)) = ctl.addrs.get() {
                r.headers_mut().insert("X-Jenkins-JNLP-Port", HeaderValue::from(agent.port()));
            }
            return r;
        }
        (&Method::GET, [""]) => {
            return full(StatusCode::OK, "text/plain", "wisp controller: see /api/builds\n")
        }
        _ => {}
    }
    // An agent holding its node's secret may fetch its own descriptor sealed with that secret.
    if let (&Method::GET, ["computer", name, "jenkins-agent.jnlp" | "slave-agent.jnlp"]) =
        (req.method(), segs.as_slice())
    {
        if req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "encrypt=true")) {
            return match jnlp_xml(&ctl, &req, name, fp) {
                Ok(xml) => {
                    let sealed = crate::auth::seal_descriptor(&ctl.secret(name), name, xml.as_bytes());
                    full(StatusCode::OK, "application/octet-stream", sealed)
                }
                Err(e) => error(e),
            };
        }
    }
    if !bearer(&req).is_some_and(|t| ctl.token_ok(t)) {
        return error(ApiError::new(
            401,
            "missing or wrong API token: pass --token, set WISP_TOKEN, or run the CLI with --data pointing at the \
             controller's data dir",
        ));
    }
    let result = match (req.method().clone(), segs.as_slice()) {
        (Method::GET, ["computer", name, "jenkins-agent.jnlp" | "slave-agent.jnlp"]) => {
            jnlp(&ctl, &req, name, fp)
        }
        (Method::GET, ["api", "nodes"]) => Ok(list_nodes(&ctl)),
        (Method::POST, ["api", "token", "rotate"]) => {
            ctl.rotate_token().map(|t| json_response(StatusCode::OK, json!({ "token": t })))
        }
        (Method::POST, ["api", "nodes"]) => add_node(&ctl, req, fp).await,
        (Method::GET, ["api", "nodes", name]) => node_info(&ctl, &req, name, fp),
        (Method::DELETE, ["api", "nodes", name]) => {
            ctl.remove_node(name).map(|_| json_response(StatusCode::OK, json!({ "removed": name })))
        }
        (Method::POST, ["api", "builds"]) => submit(&ctl, req).await,
        (Method::GET, ["api", "builds"]) => list_builds(&ctl),
        (Method::GET, ["api", "builds", id]) => {
            let wait = query_param(&req, "wait");
            build_info(&ctl, id, wait.as_deref()).await
        }
        (Method::POST, ["api", "builds", id, "cancel"]) => parse_id(id)
            .and_then(|id| ctl.cancel(id))
            .map(|_| json_response(StatusCode::OK, json!({ "cancelled": true }))),
        (Method::GET, ["api", "builds", id, "log"]) => {
            let follow = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "follow=1" || p == "follow=true"));
            // `?offset=N`: skip the first N bytes of the stream (a follower resuming after a restart).
            let offset = match query_param(&req, "offset").map(|o| o.parse::<u64>()) {
                None => Ok(0),
                Some(Ok(n)) => Ok(n),
                Some(Err(_)) => Err(ApiError::new(400, "bad offset: give a byte count, e.g. ?offset=1024")),
            };
            offset.and_then(|offset| parse_id(id).and_then(|id| log_stream(&ctl, id, follow, offset)))
        }
        (Method::GET, ["api", "builds", id, "steps", step, "log"]) => step_log(&ctl, id, step),
        _ => Err(ApiError::new(404, format!("no such endpoint: {} {path}", req.method()))),
    };
    result.unwrap_or_else(error)
}

fn parse_id(s: &str) -> Result<u64, ApiError> {
    s.trim_start_matches('#').parse().map_err(|_| ApiError::new(400, format!("bad build number {s:?}")))
}

async fn body_text(req: Request<Incoming>) -> Result<String, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::new(413, format!("request body refused: {e} (limit {MAX_BODY} bytes)")))?;
    String::from_utf8(body.to_bytes().to_vec()).map_err(|_| ApiError::new(400, "request body is not UTF-8"))
}

fn ws_upgrade(ctl: Arc<Controller>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let h = req.headers();
    let is_upgrade = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = h.get(header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes()));
    let (true, Some(accept)) = (is_upgrade, key) else {
        log::warn!("http {peer}: plain request to /wsagents/ refused");
        return full(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "/wsagents/ is the agent WebSocket endpoint: connect with `wisp-agent --websocket`, and make sure \
             proxies pass the Upgrade and Connection headers\n",
        );
    };
    let name = h.get("Node-Name").and_then(|v| v.to_str().ok()).unwrap_or("?").to_string();
    log::debug!("http {peer}: WebSocket upgrade for node {name}");
    let ctl2 = ctl.clone();
    ctl.ex
        .spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => return log::warn!("http {peer}: upgrade failed: {e}"),
            };
            let parts = match upgraded.downcast::<FuturesIo<BoxIo>>() {
                Ok(p) => p,
                Err(_) => return log::error!("http {peer}: upgraded stream of an unexpected type"),
            };
            let io: BoxIo = Box::pin(parts.io.into_inner());
            let ws = WebSocketStream::from_partially_read(
                io,
                parts.read_buf.to_vec(),
                Role::Server,
                Some(link::ws_config()),
            )
            .await;
            let (r, w) = link::websocket(ws);
            agents::serve(ctl2, r, w, peer.to_string()).await;
        })
        .detach();
    let mut r = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).unwrap());
    r
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The Jenkins-shaped JNLP descriptor: arguments in agent.jar's order.
fn jnlp(
    ctl: &Controller,
    req: &Request<Incoming>,
    name: &str,
    fp: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    Ok(full(StatusCode::OK, "application/x-java-jnlp-file", jnlp_xml(ctl, req, name, fp)?))
}

fn jnlp_xml(
    ctl: &Controller,
    req: &Request<Incoming>,
    name: &str,
    fp: Option<&str>,
) -> Result<String, ApiError> {
    let node = ctl.node(name).ok_or_else(|| ApiError::new(404, format!("no node named '{name}'")))?;
    let url = public_url(ctl, req, fp);
    let mut args = vec![ctl.secret(name), name.to_string()];
    if node.websocket {
        args.push("-webSocket".into());
    }
    if !node.work_dir.is_empty() {
        args.push("-workDir".into());
        args.push(node.work_dir.clone());
    }
    args.push("-url".into());
    args.push(url.clone());
    if let Some(fp) = pin_for(req, fp) {
        args.push("-instanceIdentity".into());
        args.push(fp.to_string());
    }
    let args: String = args.iter().map(|a| format!("    <argument>{}</argument>\n", xml_escape(a))).collect();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<jnlp codebase=\"{url}computer/{n}/\" spec=\"1.0+\">\n  \
         <information>\n    <title>Agent for {n}</title>\n    <vendor>wisp</vendor>\n  </information>\n  \
         <security>\n    <all-permissions/>\n  </security>\n  <resources>\n    <j2se version=\"1.8+\"/>\n  \
         </resources>\n  <application-desc main-class=\"hudson.remoting.jnlp.Main\">\n{args}  </application-desc>\n</jnlp>\n",
        url = xml_escape(&url),
        n = xml_escape(name),
    );
    Ok(body)
}

fn node_json(rec: &NodeRecord, online: bool, busy: u32) -> serde_json::Value {
    json!({
        "name": rec.name, "labels": rec.labels, "executors": rec.executors, "online": online,
        "busy": busy, "websocket": rec.websocket, "work_dir": rec.work_dir,
    })
}

fn list_nodes(ctl: &Controller) -> Response<Body> {
    let nodes: Vec<_> = ctl.nodes().iter().map(|(r, on, busy)| node_json(r, *on, *busy)).collect();
    json_response(StatusCode::OK, json!({ "nodes": nodes }))
}

/// The agent command line for a node, as `wisp node add` prints it.
fn agent_command(ctl: &Controller, url: &str, rec: &NodeRecord, pin: Option<&str>) -> String {
    let mut cmd = format!("wisp-agent --url {url} --name {} --secret {}", rec.name, ctl.secret(&rec.name));
    if let Some(fp) = pin {
        cmd.push_str(&format!(" --instance-identity {fp}"));
    }
    if rec.websocket {
        cmd.push_str(" --websocket");
    } else if let Some((_, agent)) = ctl.addrs.get() {
        let host = url.trim_start_matches("http://").trim_start_matches("https://");
        let host = host.split('/').next().unwrap_or("127.0.0.1");
        let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
        cmd.push_str(&format!(" --direct {host}:{}", agent.port()));
    }
    if !rec.work_dir.is_empty() {
        cmd.push_str(&format!(" --work-dir {}", rec.work_dir));
    }
    cmd
}

fn node_info(
    ctl: &Controller,
    req: &Request<Incoming>,
    name: &str,
    fp: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let (rec, online, busy) = ctl
        .nodes()
        .into_iter()
        .find(|(r, _, _)| r.name == *name)
        .ok_or_else(|| ApiError::new(404, format!("no node named '{name}'")))?;
    let mut v = node_json(&rec, online, busy);
    v["secret"] = json!(ctl.secret(name));
    v["command"] = json!(agent_command(ctl, &public_url(ctl, req, fp), &rec, pin_for(req, fp)));
    Ok(json_response(StatusCode::OK, v))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNode {
    name: String,
    #[serde(default)]
    labels: String,
    #[serde(default = "one")]
    executors: u32,
    #[serde(default = "yes")]
    websocket: bool,
    #[serde(default)]
    work_dir: String,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

async fn add_node(
    ctl: &Controller,
    req: Request<Incoming>,
    fp: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let url = public_url(ctl, &req, fp);
    let pin = pin_for(&req, fp);
    let n: NewNode = serde_json::from_str(&body_text(req).await?)
        .map_err(|e| ApiError::new(400, format!("bad node: {e}")))?;
    labels::validate_label(&n.name).map_err(|e| ApiError::new(400, format!("bad node name: {e}")))?;
    let labels = labels::split_labels(&n.labels).map_err(|e| ApiError::new(400, e.to_string()))?;
    if !(1..=1024).contains(&n.executors) {
        return Err(ApiError::new(400, "executors must be between 1 and 1024"));
    }
    let rec = NodeRecord {
        name: n.name,
        labels,
        executors: n.executors,
        websocket: n.websocket,
        work_dir: n.work_dir,
    };
    ctl.add_node(rec.clone())?;
    let mut v = node_json(&rec, false, 0);
    v["secret"] = json!(ctl.secret(&rec.name));
    v["command"] = json!(agent_command(ctl, &url, &rec, pin));
    Ok(json_response(StatusCode::CREATED, v))
}

/// Queue a pipeline: `{"id": N}`. With `?wait=SECS` the answer is held until the build is final
/// (or SECS have passed) and is the build's record, as `GET /api/builds/N?wait=SECS` gives it:
/// submit and result in one call (like `jenkins-cli build -s`).
async fn submit(ctl: &Arc<Controller>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let wait = query_param(&req, "wait").map(|w| parse_wait(&w)).transpose()?;
    let yaml = body_text(req).await?;
    let id = ctl.submit(&yaml)?;
    match wait {
        None => Ok(json_response(StatusCode::CREATED, json!({ "id": id }))),
        Some(wait) => Ok(json_response(StatusCode::CREATED, build_record(ctl, id, wait).await?)),
    }
}

fn build_json(ctl: &Controller, b: &super::store::BuildRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(b).unwrap_or_default();
    if let Some(live) = ctl.live(b.id) {
        v["cancelling"] = json!(live.cancelled.load(Ordering::SeqCst));
    }
    v
}

fn list_builds(ctl: &Controller) -> Result<Response<Body>, ApiError> {
    let builds = ctl.store().builds(100)?;
    let list: Vec<_> = builds.iter().map(|b| build_json(ctl, b)).collect();
    Ok(json_response(StatusCode::OK, json!({ "builds": list })))
}

/// The value of query parameter `name`, if given.
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_string())
    })
}

/// Longest `?wait=` a client may ask for, in seconds.
pub const MAX_WAIT_SECS: u64 = 300;

/// `?wait=SECS`: seconds, at most [`MAX_WAIT_SECS`].
fn parse_wait(w: &str) -> Result<Duration, ApiError> {
    let secs = w
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .ok_or_else(|| ApiError::new(400, format!("bad wait {w:?}: give seconds, e.g. ?wait=30")))?;
    Ok(Duration::from_secs_f64(secs.min(MAX_WAIT_SECS as f64)))
}

/// A build's record and steps. With `?wait=SECS` the answer is held until the build is final or
/// SECS (at most [`MAX_WAIT_SECS`]) have passed, so a client learns the result without polling.
async fn build_info(ctl: &Controller, id: &str, wait: Option<&str>) -> Result<Response<Body>, ApiError> {
    let id = parse_id(id)?;
    let wait = wait.map(parse_wait).transpose()?.unwrap_or(Duration::ZERO);
    Ok(json_response(StatusCode::OK, build_record(ctl, id, wait).await?))
}

/// The build's record with its steps, once it is final or `wait` has passed.
async fn build_record(ctl: &Controller, id: u64, wait: Duration) -> Result<serde_json::Value, ApiError> {
    let deadline = Instant::now() + wait;
    let mut timer = ctl.deadlines.sleep_until(deadline);
    let b = loop {
        let listener = ctl.live(id).map(|l| l.changed.listen());
        let b = ctl.build(id)?;
        let Some(listener) = listener.filter(|_| !b.state.is_final()) else { break b };
        if Instant::now() >= deadline {
            break b;
        }
        smol::future::or(listener, async {
            (&mut timer).await;
        })
        .await;
    };
    let steps = ctl.store().steps(id)?;
    let mut v = build_json(ctl, &b);
    v["steps"] = serde_json::to_value(steps).unwrap_or_default();
    Ok(v)
}

fn stream_response(rx: smol::channel::Receiver<Bytes>, content_type: &str) -> Response<Body> {
    let stream = rx.map(|b| Ok::<_, std::io::Error>(hyper::body::Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
    r
}

fn step_log(ctl: &Controller, id: &str, step: &str) -> Result<Response<Body>, ApiError> {
    let id = parse_id(id)?;
    let step: u32 = step.parse().map_err(|_| ApiError::new(400, format!("bad step number {step:?}")))?;
    ctl.build(id)?;
    let path = ctl.data.join("builds").join(id.to_string()).join(format!("{step}.log"));
    let file = match std::fs::File::open(&path) {
        Ok(f) => Some(f),
        // A step that started but wrote nothing has no file: its log is empty.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let started = ctl.store().steps(id)?.iter().any(|s| s.index == step && s.state != "pending");
            if !started {
                return Err(ApiError::new(404, format!("build #{id} has no log for step {step} (yet)")));
            }
            None
        }
        Err(e) => {
            return Err(ApiError::new(500, format!("cannot read the log of build #{id} step {step}: {e}")))
        }
    };
    let (tx, rx) = smol::channel::bounded(4);
    ctl.ex
        .spawn(async move {
            let Some(mut file) = file else { return };
            let mut buf = vec![0u8; LOG_CHUNK];
            while let Ok(n) = file.read(&mut buf) {
                if n == 0 || tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    break;
                }
            }
        })
        .detach();
    Ok(stream_response(rx, "application/octet-stream"))
}

/// The build's log as people read it: each step's output between `==> step N` markers; with
/// `follow`, it stays open until the build ends.
fn log_stream(ctl: &Arc<Controller>, id: u64, follow: bool, offset: u64) -> Result<Response<Body>, ApiError> {
    ctl.build(id)?;
    let (tx, rx) = smol::channel::bounded(4);
    let tx = Tx { tx, skip: offset.into() };
    let ctl = ctl.clone();
    ctl.ex
        .clone()
        .spawn(async move {
            let _ = follow_log(&ctl, id, follow, &tx).await;
        })
        .detach();
    Ok(stream_response(rx, "text/plain; charset=utf-8"))
}

/// The log stream's sender, which drops the first `skip` bytes it is given (`?offset=`).
struct Tx {
    tx: smol::channel::Sender<Bytes>,
    skip: std::sync::atomic::AtomicU64,
}

async fn send(tx: &Tx, b: impl Into<Bytes>) -> Result<(), ()> {
    let mut b: Bytes = b.into();
    let skip = tx.skip.load(Ordering::Relaxed);
    if skip > 0 {
        let n = skip.min(b.len() as u64);
        tx.skip.store(skip - n, Ordering::Relaxed);
        b = b.slice(n as usize..);
        if b.is_empty() {
            return Ok(());
        }
    }
    tx.tx.send(b).await.map_err(|_| ())
}

async fn follow_log(ctl: &Controller, id: u64, follow: bool, tx: &Tx) -> Result<(), ()> {
    let dir = ctl.data.join("builds").join(id.to_string());
    let steps = ctl.store().steps(id).map_err(|_| ())?;
    let mut buf = vec![0u8; LOG_CHUNK];
    for s in &steps {
        // Wait for the step to start (or for the build to end without it).
        loop {
            let live = ctl.live(id);
            let listener = live.as_ref().map(|b| b.changed.listen());
            let state =
                ctl.store().steps(id).map_err(|_| ())?.get(s.index as usize - 1).map(|s| s.state.clone());
            match state.as_deref() {
                Some("pending") if follow && listener.is_some() => listener.unwrap().await,
                Some("pending" | "skipped") | None => return finish(ctl, id, follow, tx).await,
                Some(_) => break,
            }
        }
        send(tx, format!("==> step {}: {}\n", s.index, s.name)).await?;
        let path = dir.join(format!("{}.log", s.index));
        let mut file = None;
        let mut last = b'\n';
        // Bounds a missed notification; one timer for the step, not one per wake-up.
        let mut tick = smol::Timer::interval(Duration::from_secs(1));
        loop {
            let live = ctl.live(id);
            let listener = live.as_ref().map(|b| smol::future::or(b.changed.listen(), b.output.listen()));
            let done = live.as_ref().is_none_or(|b| b.steps_done.load(Ordering::SeqCst) >= s.index);
            // The file appears with the step's first byte (looked for after `done` is read, so a
            // step that ended with output is never taken for an empty one).
            if file.is_none() {
                file = std::fs::File::open(&path).ok();
            }
            if let Some(f) = file.as_mut() {
                loop {
                    let n = f.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    last = buf[n - 1];
                    send(tx, Bytes::copy_from_slice(&buf[..n])).await?;
                }
            }
            if done || !follow {
                break;
            }
            // A notification is the normal wake-up; the timer only bounds a missed one.
            if let Some(l) = listener {
                smol::future::or(l, async {
                    tick.next().await;
                })
                .await;
            }
        }
        if last != b'\n' {
            send(tx, "\n").await?;
        }
        let rec = ctl.store().steps(id).map_err(|_| ())?;
        if let Some(r) = rec.get(s.index as usize - 1) {
            if r.state != "running" {
                send(tx, format!("==> step {}: {} ({})\n", s.index, r.state, r.exit)).await?;
            }
        }
    }
    finish(ctl, id, follow, tx).await
}

async fn finish(ctl: &Controller, id: u64, follow: bool, tx: &Tx) -> Result<(), ()> {
    if !follow {
        return Ok(());
    }
    // Wait for the build's final state (steps may be done while the record is being written).
    loop {
        let live = ctl.live(id);
        let listener = live.as_ref().map(|b| b.changed.listen());
        let b = ctl.build(id).map_err(|_| ())?;
        if b.state.is_final() {
            let msg = if b.message.is_empty() { String::new() } else { format!(": {}", b.message) };
            return send(tx, format!("==> build #{id} {}{msg}\n", b.state.as_str().to_uppercase())).await;
        }
        match listener {
            Some(l) => {
                smol::future::or(l, async {
                    smol::Timer::after(Duration::from_secs(1)).await;
                })
                .await
            }
            None => {
                smol::Timer::after(Duration::from_millis(50)).await;
            }
        }
    }
}
