//! The HTTP routes: the agent-facing ones (the `/wsagents/` WebSocket endpoint, port discovery,
//! the agent descriptor) and the JSON API with its log streams. Paths and queries are
//! percent-decoded before they are matched.

use super::api::types as api;
use super::core::{ApiError, Controller, NodeStatus};
use super::labels;
use super::store::{NodeRecord, StepState};
use crate::link::{self, BoxIo};
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::Role;
use async_tungstenite::WebSocketStream;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use smol::stream::StreamExt;
use smol_hyper::rt::FuturesIo;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest request body accepted (a pipeline, a node).
pub const MAX_BODY: usize = 1024 * 1024;

/// A response body.
pub type Body = BoxBody<Bytes, std::io::Error>;

pub(super) fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
    r
}

fn json_response(status: StatusCode, v: impl serde::Serialize) -> Response<Body> {
    let v = serde_json::to_string(&v)
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot encode the answer: {e}\"}}"));
    full(status, "application/json", format!("{v}\n"))
}

fn error(e: ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, api::ErrorBody { error: e.message })
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme in any case, as RFC 9110
/// says schemes are).
fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A path segment or query value with `%XX` decoded; None if it decodes to bytes that are not
/// UTF-8.
fn decode(s: &str) -> Option<Cow<'_, str>> {
    percent_encoding::percent_decode_str(s).decode_utf8().ok()
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
    let p = ctl.web.prefix();
    match req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) {
        Some(h) => format!("{scheme}://{h}{p}/"),
        None => match ctl.addrs.get() {
            Some((http, _)) => format!("{scheme}://{http}{p}/"),
            None => format!("{scheme}://127.0.0.1:8080{p}/"),
        },
    }
}

/// The identity an agent should pin: ours, unless the request came through a proxy (whose
/// certificate the agent sees instead).
fn pin_for<'a>(req: &Request<Incoming>, fp: Option<&'a str>) -> Option<&'a str> {
    fp.filter(|_| !req.headers().contains_key("X-Forwarded-Proto"))
}

/// Answer one HTTP request.
pub async fn route(
    ctl: Arc<Controller>,
    req: Request<Incoming>,
    peer: SocketAddr,
    fp: Option<&str>,
) -> Response<Body> {
    let full_path = req.uri().path().to_string();
    let prefix = ctl.web.prefix();
    let path = match full_path.strip_prefix(prefix) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.to_string(),
        _ => {
            return error(ApiError::new(
                404,
                format!("this controller serves under {prefix}/ (its --prefix): {prefix}{full_path} may be what you want"),
            ))
        }
    };
    let Some(decoded) = path.trim_matches('/').split('/').map(decode).collect::<Option<Vec<_>>>() else {
        return error(ApiError::new(400, "the request path is not valid UTF-8 once percent-decoded"));
    };
    let segs: Vec<&str> = decoded.iter().map(|s| s.as_ref()).collect();
    match (req.method(), segs.as_slice()) {
        (&Method::GET, ["wsagents"]) => return ws_upgrade(ctl, req, peer),
        (&Method::GET, ["tcpSlaveAgentListener"]) => {
            let mut r = full(StatusCode::OK, "text/plain", "wisp agent listener\n");
            if let Some((_, agent)) = ctl.addrs.get() {
                r.headers_mut().insert("X-Jenkins-JNLP-Port", HeaderValue::from(agent.port()));
            }
            return r;
        }
        _ => {}
    }
    if let (&Method::GET, ["metrics"]) = (req.method(), segs.as_slice()) {
        let allowed = ctl.metrics_public.load(Ordering::Relaxed)
            || bearer(&req).is_some_and(|t| ctl.token_ok(t))
            || super::web::signed_in(&ctl, &req);
        if !allowed {
            return error(ApiError::new(
                401,
                "/metrics needs the API token as a bearer token (Prometheus: `authorization: {credentials_file: \
                 DATA/token}`), or start the controller with --metrics-public",
            ));
        }
        return full(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ctl.metrics_text(),
        );
    }
    if super::web::is_page(req.method(), &segs) {
        return super::web::page(&ctl, req, &segs, fp).await;
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
            ctl.rotate_token().await.map(|t| json_response(StatusCode::OK, api::TokenRotated { token: t }))
        }
        (Method::POST, ["api", "nodes"]) => add_node(&ctl, req, fp).await,
        (Method::GET, ["api", "nodes", name]) => {
            known_node(&ctl, name).and_then(|_| node_info(&ctl, &req, name, fp))
        }
        (Method::DELETE, ["api", "nodes", name]) => match known_node(&ctl, name) {
            Ok(()) => ctl
                .remove_node(name)
                .await
                .map(|_| json_response(StatusCode::OK, api::NodeRemoved { removed: name.to_string() })),
            Err(e) => Err(e),
        },
        (Method::POST, ["api", "clouds"]) => match body_text(req).await {
            Ok(text) => ctl.apply_clouds(text).await.map(|(applied, warnings)| {
                json_response(StatusCode::OK, api::CloudsApplied { applied, warnings })
            }),
            Err(e) => Err(e),
        },
        (Method::GET, ["api", "clouds"]) => Ok(json_response(StatusCode::OK, ctl.cloud_views())),
        (Method::DELETE, ["api", "clouds", name]) => ctl
            .remove_cloud(name)
            .await
            .map(|()| json_response(StatusCode::OK, api::CloudRemoved { removed: name.to_string() })),
        (Method::GET, ["api", "templates"]) => Ok(json_response(StatusCode::OK, ctl.template_views())),
        (Method::POST, ["api", "builds"]) => submit(&ctl, req).await,
        (Method::GET, ["api", "builds"]) => list_builds(&ctl).await,
        (Method::GET, ["api", "builds", id]) => {
            let wait = query_param(&req, "wait");
            build_info(&ctl, id, wait.as_deref()).await
        }
        (Method::POST, ["api", "builds", id, "cancel"]) => match parse_id(id) {
            Ok(id) => ctl
                .cancel(id)
                .await
                .map(|_| json_response(StatusCode::OK, api::Cancelled { cancelled: true })),
            Err(e) => Err(e),
        },
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
            match offset.and_then(|offset| parse_id(id).map(|id| (id, offset))) {
                Ok((id, offset)) => log_stream(&ctl, id, follow, offset).await,
                Err(e) => Err(e),
            }
        }
        (Method::GET, ["api", "builds", id, "steps", step, "log"]) => step_log(&ctl, id, step).await,
        (Method::GET, ["api", "builds", id, "artifacts"]) => match parse_id(id) {
            Ok(id) => list_artifacts(&ctl, id).await,
            Err(e) => Err(e),
        },
        (Method::GET, ["api", "builds", id, "artifacts", rest @ ..]) if !rest.is_empty() => {
            match parse_id(id) {
                Ok(id) => get_artifact(&ctl, id, &rest.join("/")).await,
                Err(e) => Err(e),
            }
        }
        _ => Err(ApiError::new(404, format!("no such endpoint: {} {path}", req.method()))),
    };
    result.unwrap_or_else(error)
}

/// A build number: digits (a leading `#` allowed). A number too large to be a build is a build
/// that does not exist (404), not a bad request.
pub(super) fn parse_id(s: &str) -> Result<u64, ApiError> {
    let digits = s.trim_start_matches('#');
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::new(400, format!("bad build number {s:?}")));
    }
    digits.parse().map_err(|_| ApiError::new(404, format!("no build #{digits}")))
}

/// A node named in a path: found by its exact name (so a node stored before the name rules
/// existed can still be described and removed); for a name no node has, the answer says what
/// is wrong with it when it breaks the rules.
fn check_name(name: &str) -> Result<(), ApiError> {
    labels::check_node_name(name).map_err(|e| ApiError::new(404, format!("no node named {name:?}: {e}")))
}

fn known_node(ctl: &Controller, name: &str) -> Result<(), ApiError> {
    if ctl.node(name).is_some() {
        return Ok(());
    }
    check_name(name)?;
    Err(ApiError::new(404, format!("no node named '{name}'")))
}

async fn body_text(req: Request<Incoming>) -> Result<String, ApiError> {
    let body = body_bytes(req, MAX_BODY).await?;
    String::from_utf8(body.to_vec()).map_err(|_| ApiError::new(400, "request body is not UTF-8"))
}

/// The request's body, at most `max` bytes.
pub(super) async fn body_bytes(req: Request<Incoming>, max: usize) -> Result<Bytes, ApiError> {
    let body = Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| ApiError::new(413, format!("request body refused: {e} (limit {max} bytes)")))?;
    Ok(body.to_bytes())
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
            super::session::serve(ctl2, r, w, peer.to_string()).await;
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

fn node_entry(n: &NodeStatus) -> api::NodeEntry {
    let rec = &n.rec;
    api::NodeEntry {
        name: rec.name.clone(),
        labels: rec.labels.clone(),
        executors: rec.executors,
        online: n.online,
        busy: n.busy,
        websocket: rec.websocket,
        work_dir: rec.work_dir.clone(),
        origin: rec.origin.clone(),
        agent: n.agent.as_ref().map(|(version, arch, os)| api::AgentBuild {
            version: version.clone(),
            arch: arch.clone(),
            os: os.clone(),
        }),
    }
}

fn list_nodes(ctl: &Controller) -> Response<Body> {
    let nodes = ctl.nodes().iter().map(node_entry).collect();
    json_response(StatusCode::OK, api::NodeList { nodes })
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

/// The agent command line for node `rec` as a caller of `req` would run it.
pub(super) fn node_command(
    ctl: &Controller,
    req: &Request<Incoming>,
    rec: &NodeRecord,
    fp: Option<&str>,
) -> String {
    agent_command(ctl, &public_url(ctl, req, fp), rec, pin_for(req, fp))
}

fn node_info(
    ctl: &Controller,
    req: &Request<Incoming>,
    name: &str,
    fp: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let n = ctl.node_status(name).ok_or_else(|| ApiError::new(404, format!("no node named '{name}'")))?;
    let info = api::NodeInfo {
        node: node_entry(&n),
        secret: ctl.secret(name),
        command: agent_command(ctl, &public_url(ctl, req, fp), &n.rec, pin_for(req, fp)),
    };
    Ok(json_response(StatusCode::OK, info))
}

async fn add_node(
    ctl: &Arc<Controller>,
    req: Request<Incoming>,
    fp: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let url = public_url(ctl, &req, fp);
    let pin = pin_for(&req, fp);
    let n: api::NewNode = serde_json::from_str(&body_text(req).await?)
        .map_err(|e| ApiError::new(400, format!("bad node: {e}")))?;
    labels::check_node_name(&n.name)
        .map_err(|e| ApiError::new(400, format!("bad node name {:?}: {e}", n.name)))?;
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
        origin: super::cloud::STATIC.into(),
    };
    ctl.add_node(rec.clone()).await?;
    let info = api::NodeCreated {
        secret: ctl.secret(&rec.name),
        command: agent_command(ctl, &url, &rec, pin),
        node: node_entry(&NodeStatus { rec, online: false, busy: 0, agent: None }),
    };
    Ok(json_response(StatusCode::CREATED, info))
}

/// Queue a pipeline: `{"id": N}`. With `?wait=SECS` the answer is held until the build is final
/// (or SECS have passed) and is the build's record, as `GET /api/builds/N?wait=SECS` gives it:
/// submit and result in one call (like `jenkins-cli build -s`).
async fn submit(ctl: &Arc<Controller>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let wait = query_param(&req, "wait").map(|w| parse_wait(&w)).transpose()?;
    let params = submit_params(&req)?;
    let yaml = body_text(req).await?;
    let id = ctl.submit(yaml, params).await?;
    match wait {
        None => Ok(json_response(StatusCode::CREATED, api::Submitted { id })),
        Some(wait) => Ok(json_response(StatusCode::CREATED, build_record(ctl, id, wait).await?)),
    }
}

fn build_json(ctl: &Controller, b: super::store::BuildRecord) -> api::BuildRecord {
    let live = ctl.live(b.id);
    api::BuildRecord {
        cancelling: live.as_ref().map(|l| l.cancelled.load(Ordering::SeqCst)),
        waiting: live.and_then(|_| ctl.waiting(b.id)),
        id: b.id,
        name: b.name,
        state: b.state,
        node: b.node,
        message: b.message,
        created: b.created,
        started: b.started,
        finished: b.finished,
    }
}

async fn list_builds(ctl: &Controller) -> Result<Response<Body>, ApiError> {
    let builds = ctl.builds(100).await?;
    let builds = builds.into_iter().map(|b| build_json(ctl, b)).collect();
    Ok(json_response(StatusCode::OK, api::BuildList { builds }))
}

/// The value of query parameter `name`, percent-decoded, if given.
pub(super) fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (decode(k).as_deref() == Some(name)).then(|| decode(v).map(|v| v.into_owned())).flatten()
    })
}

/// Parameters of a submit: each `?param=NAME=VALUE` (percent-encoded), at most
/// [`MAX_PARAMS`], a name given once.
fn submit_params(req: &Request<Incoming>) -> Result<Vec<(String, String)>, ApiError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for kv in req.uri().query().unwrap_or("").split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if decode(k).as_deref() != Some("param") {
            continue;
        }
        let v =
            decode(v).ok_or_else(|| ApiError::new(400, "a ?param= is not valid percent-encoded UTF-8"))?;
        let Some((name, value)) = v.split_once('=') else {
            return Err(ApiError::new(400, format!("?param={v}: give NAME=VALUE")));
        };
        if out.iter().any(|(n, _)| n == name) {
            return Err(ApiError::new(400, format!("parameter {name} is given twice")));
        }
        if out.len() == MAX_PARAMS {
            return Err(ApiError::new(400, format!("more than {MAX_PARAMS} parameters")));
        }
        out.push((name.to_string(), value.to_string()));
    }
    Ok(out)
}

/// Parameters one submit may give.
pub const MAX_PARAMS: usize = 64;

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
async fn build_record(ctl: &Controller, id: u64, wait: Duration) -> Result<api::BuildInfo, ApiError> {
    let deadline = Instant::now() + wait;
    let mut timer = ctl.deadlines.sleep_until(deadline);
    // A build the controller still holds is not final until its runner keeps the final record
    // (read back with its last store write): wait on it in memory, and answer from that record.
    if let Some(live) = ctl.live(id) {
        loop {
            let listener = live.changed.listen();
            if let Some(last) = live.final_record() {
                let (b, steps) = (*last).clone();
                let build = api::BuildRecord { cancelling: None, waiting: None, ..build_json(ctl, b) };
                return Ok(api::BuildInfo { build, steps });
            }
            if Instant::now() >= deadline || ctl.live(id).is_none() {
                break;
            }
            smol::future::or(listener, async {
                (&mut timer).await;
            })
            .await;
        }
    }
    let (b, steps) = ctl.build_with_steps(id).await?;
    Ok(api::BuildInfo { build: build_json(ctl, b), steps })
}

pub(super) fn stream_response(rx: smol::channel::Receiver<Bytes>, content_type: &str) -> Response<Body> {
    let stream = rx.map(|b| Ok::<_, std::io::Error>(hyper::body::Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
    r
}

/// `{"artifacts": [{"path", "size", "sha256"}]}`: what the build's archive steps kept.
async fn list_artifacts(ctl: &Arc<Controller>, id: u64) -> Result<Response<Body>, ApiError> {
    ctl.build(id).await?;
    let dir = super::archives::artifacts_dir(ctl, id);
    let list = smol::unblock(move || super::archives::list(&dir))
        .await
        .map_err(|e| ApiError::new(500, format!("cannot read the artifacts of build #{id}: {e}")))?;
    Ok(json_response(StatusCode::OK, api::ArtifactList { artifacts: list }))
}

/// One artifact's bytes, streamed. Only a path the build's index lists is served, and only as a
/// regular file reached through real directories (never a symlink).
pub(super) async fn get_artifact(
    ctl: &Arc<Controller>,
    id: u64,
    path: &str,
) -> Result<Response<Body>, ApiError> {
    ctl.build(id).await?;
    let dir = super::archives::artifacts_dir(ctl, id);
    let want = path.to_string();
    let file = smol::unblock(move || -> Result<(std::fs::File, u64), ApiError> {
        let list = super::archives::list(&dir)
            .map_err(|e| ApiError::new(500, format!("cannot read the artifact index: {e}")))?;
        let Some(a) = list.into_iter().find(|a| a.path == want) else {
            return Err(ApiError::new(
                404,
                format!("build #{id} has no artifact {want:?} (`wisp artifacts {id}` lists them)"),
            ));
        };
        let mut at = dir.join("files");
        let parts: Vec<&str> = a.path.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            if part.is_empty() || *part == "." || *part == ".." {
                return Err(ApiError::new(404, format!("no artifact {want:?}")));
            }
            at.push(part);
            let m = std::fs::symlink_metadata(&at)
                .map_err(|e| ApiError::new(404, format!("artifact {want:?}: {e}")))?;
            let ok = if i + 1 == parts.len() { m.file_type().is_file() } else { m.file_type().is_dir() };
            if !ok {
                return Err(ApiError::new(404, format!("artifact {want:?} is not a regular file here")));
            }
        }
        let f = std::fs::File::open(&at)
            .map_err(|e| ApiError::new(500, format!("cannot open artifact {want:?}: {e}")))?;
        Ok((f, a.size))
    })
    .await?;
    let (tx, rx) = smol::channel::bounded(4);
    ctl.ex
        .spawn(async move {
            use smol::io::AsyncReadExt;
            let mut f = smol::Unblock::with_capacity(256 << 10, file.0);
            loop {
                let mut buf = vec![0u8; 256 << 10];
                match f.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(Bytes::from(buf)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        })
        .detach();
    let mut r = stream_response(rx, "application/octet-stream");
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(file.1));
    Ok(r)
}

async fn step_log(ctl: &Arc<Controller>, id: &str, step: &str) -> Result<Response<Body>, ApiError> {
    let id = parse_id(id)?;
    let step: u32 = step.parse().map_err(|_| ApiError::new(400, format!("bad step number {step:?}")))?;
    ctl.build(id).await?;
    let reader =
        ctl.logs.reader(id, step).await.map_err(|e| {
            ApiError::new(500, format!("cannot read the log of build #{id} step {step}: {e}"))
        })?;
    // A step that started but wrote nothing has no file: its log is empty.
    if reader.is_none() {
        let started =
            ctl.build_steps(id).await?.iter().any(|s| s.index == step && s.state != StepState::Pending);
        if !started {
            return Err(ApiError::new(404, format!("build #{id} has no log for step {step} (yet)")));
        }
    }
    let (tx, rx) = smol::channel::bounded(4);
    ctl.ex
        .spawn(async move {
            let Some(mut reader) = reader else { return };
            while let Ok(chunk) = reader.next().await {
                if chunk.is_empty() || tx.send(chunk).await.is_err() {
                    break;
                }
            }
        })
        .detach();
    Ok(stream_response(rx, "application/octet-stream"))
}

/// The build's log as people read it: each step's output between `==> step N` markers; with
/// `follow`, it stays open until the build ends.
pub(super) async fn log_stream(
    ctl: &Arc<Controller>,
    id: u64,
    follow: bool,
    offset: u64,
) -> Result<Response<Body>, ApiError> {
    let chunks = log_chunks(ctl, id, follow, offset).await?;
    let (tx, rx) = smol::channel::bounded(4);
    ctl.ex
        .spawn(async move {
            while let Ok((chunk, _)) = chunks.recv().await {
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        })
        .detach();
    Ok(stream_response(rx, "text/plain; charset=utf-8"))
}

/// The build's log as people read it, in chunks, each marked whether it is part of the log
/// (counted by `offset`) or a notice of the stream's (why the build waits).
pub(super) async fn log_chunks(
    ctl: &Arc<Controller>,
    id: u64,
    follow: bool,
    offset: u64,
) -> Result<smol::channel::Receiver<(Bytes, bool)>, ApiError> {
    ctl.build(id).await?;
    let (tx, rx) = smol::channel::bounded(4);
    let tx = Tx { tx, skip: offset.into(), resumed: offset > 0 };
    let ctl = ctl.clone();
    ctl.ex
        .clone()
        .spawn(async move {
            let _ = follow_log(&ctl, id, follow, &tx).await;
        })
        .detach();
    Ok(rx)
}

/// The log stream's sender, which drops the first `skip` bytes it is given (`?offset=`).
struct Tx {
    tx: smol::channel::Sender<(Bytes, bool)>,
    skip: std::sync::atomic::AtomicU64,
    /// An offset was given: the stream goes on from where an earlier one broke.
    resumed: bool,
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
    tx.tx.send((b, true)).await.map_err(|_| ())
}

/// Bounds a missed notification while following; one timer per step, not one per wake-up.
const FOLLOW_TICK: Duration = Duration::from_secs(1);

async fn follow_log(ctl: &Controller, id: u64, follow: bool, tx: &Tx) -> Result<(), ()> {
    // What the reader was last told about why the build waits or stalls.
    let mut told: Option<String> = None;
    // Steps in number order; another attempt of a step (a retry) is added as the build runs.
    let mut next = 0usize;
    loop {
        let steps = ctl.build_steps(id).await.map_err(|_| ())?;
        let Some(s) = steps.get(next).cloned() else {
            match ctl.live(id) {
                Some(b) if follow => {
                    let l = b.changed.listen();
                    if ctl.live(id).is_none() {
                        continue;
                    }
                    smol::future::or(l, async {
                        smol::Timer::after(FOLLOW_TICK).await;
                    })
                    .await;
                    continue;
                }
                _ => break,
            }
        };
        next += 1;
        // Wait for the step to start (or for the build to end without it).
        let ran = loop {
            let live = ctl.live(id);
            let listener = live.as_ref().map(|b| b.changed.listen());
            let state = ctl.build_steps(id).await.map_err(|_| ())?.get(s.index as usize - 1).map(|s| s.state);
            match state {
                Some(StepState::Pending) if follow && listener.is_some() => {
                    tell_waiting(ctl, id, &mut told, tx).await?;
                    smol::future::or(listener.unwrap(), async {
                        smol::Timer::after(FOLLOW_TICK).await;
                    })
                    .await;
                }
                // Not run (skipped, or the build ended before it), or not yet while not
                // following: the next step.
                Some(StepState::Pending | StepState::Skipped) | None => break false,
                Some(_) => break true,
            }
        };
        if !ran {
            continue;
        }
        let stage = if s.stage.is_empty() { String::new() } else { format!(" [{}]", s.stage) };
        send(tx, format!("==> step {}{stage}: {}\n", s.index, s.name)).await?;
        let mut reader = None;
        let mut last = b'\n';
        let mut tick = smol::Timer::interval(FOLLOW_TICK);
        loop {
            let live = ctl.live(id);
            let listener = live.as_ref().map(|b| smol::future::or(b.changed.listen(), b.output.listen()));
            let done = live.as_ref().is_none_or(|b| b.is_done(s.index));
            // The file appears with the step's first byte (looked for after `done` is read, so a
            // step that ended with output is never taken for an empty one).
            if reader.is_none() {
                reader = ctl.logs.reader(id, s.index).await.ok().flatten();
            }
            if let Some(r) = reader.as_mut() {
                // An offset into this step's output is sought to, not read (a page showing the
                // last part of a 1 GiB log reads only that part).
                let skip = tx.skip.load(Ordering::Relaxed);
                if skip > 0 {
                    if let Ok((k, Some(b))) = r.skip(skip).await {
                        tx.skip.fetch_sub(k, Ordering::Relaxed);
                        last = b;
                    }
                }
                loop {
                    let chunk = r.next().await.unwrap_or_default();
                    if chunk.is_empty() {
                        break;
                    }
                    last = chunk[chunk.len() - 1];
                    send(tx, chunk).await?;
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
        let rec = ctl.build_steps(id).await.map_err(|_| ())?;
        if let Some(r) = rec.get(s.index as usize - 1) {
            if r.state != StepState::Running {
                send(tx, format!("==> step {}: {} ({})\n", s.index, r.state.as_str(), r.exit)).await?;
            }
        }
    }
    finish(ctl, id, follow, tx).await
}

/// Tell a follower why the build waits before its first step, when that changed since it was
/// last told. These notices are the stream's prelude: not part of the log, so not counted by
/// `?offset=`, and a resumed stream (an offset given) has none.
async fn tell_waiting(ctl: &Controller, id: u64, told: &mut Option<String>, tx: &Tx) -> Result<(), ()> {
    if tx.resumed {
        return Ok(());
    }
    let now = ctl.waiting(id);
    if now != *told {
        if let Some(why) = &now {
            let line = format!("==> build #{id} waiting: {why}\n");
            tx.tx.send((line.into(), false)).await.map_err(|_| ())?;
        }
        *told = now;
    }
    Ok(())
}

async fn finish(ctl: &Controller, id: u64, follow: bool, tx: &Tx) -> Result<(), ()> {
    if !follow {
        return Ok(());
    }
    // Wait for the build's final state (steps may be done while the record is being written).
    loop {
        let live = ctl.live(id);
        let listener = live.as_ref().map(|b| b.changed.listen());
        let b = ctl.build(id).await.map_err(|_| ())?;
        if b.state.is_final() {
            let msg = if b.message.is_empty() { String::new() } else { format!(": {}", b.message) };
            return send(tx, format!("==> build #{id} {}{msg}\n", b.state.as_str().to_uppercase())).await;
        }
        match listener {
            Some(l) => {
                smol::future::or(l, async {
                    smol::Timer::after(FOLLOW_TICK).await;
                })
                .await
            }
            None => {
                smol::Timer::after(Duration::from_millis(50)).await;
            }
        }
    }
}
