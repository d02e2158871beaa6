//! The web page: overview, nodes, builds with their live logs, and a form to submit a pipeline,
//! served by the controller on its HTTP port under its path prefix.
//!
//! Pages are rendered here from the templates in `pages/` (askama, compiled in, every value
//! HTML-escaped unless a template says otherwise, and none does); one style sheet and one script
//! are compiled in too: nothing is fetched from elsewhere and nothing needs a build step. The
//! script only adds what a rendered page cannot do alone: it swaps in a fresh rendering of the
//! page's live part every two seconds, draws the live log (server-sent events from the log
//! follower, ANSI colours as spans, text only) and reads an uploaded file into the form.
//!
//! Access: a login with the API token gives a session cookie (`HttpOnly`, `SameSite=Strict`,
//! `Secure` over TLS) naming a session held in memory; every form that changes something
//! carries the session's CSRF token, checked in constant time. Every page is sent with a strict
//! Content-Security-Policy (scripts and styles from this controller only, no inline script, no
//! framing). A rotated API token ends every session.

use super::core::ApiError;
use super::core::Controller;
use super::http::{self, Body};
use askama::Template;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a session lasts without use.
const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// Most sessions held; the least recently used goes first.
const MAX_SESSIONS: usize = 10_000;
/// The session cookie's name.
const COOKIE: &str = "wisp_session";
/// Builds in one page of a list.
const PAGE: u32 = 50;
/// Queued builds the overview lists (the count above it has them all).
const QUEUE_SHOWN: usize = 100;
/// The last this many bytes of a log are what its page shows first.
pub const LOG_TAIL: u64 = 256 * 1024;
/// Longest form body read (a pipeline pasted into the form).
const MAX_FORM: usize = 1 << 20;

/// Every page's headers: what may run and load, and that nothing frames it.
const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Sessions of people logged in, and the path prefix pages live under.
#[derive(Default)]
pub struct Web {
    sessions: Mutex<HashMap<String, Session>>,
    prefix: OnceLock<String>,
}

/// One login.
struct Session {
    csrf: String,
    used: Instant,
}

impl Web {
    /// Serve pages (and everything else) under `prefix` (`/ci`; "" for the root). Set once.
    pub fn set_prefix(&self, prefix: &str) {
        let p = prefix.trim_end_matches('/');
        let _ = self.prefix.set(if p.is_empty() {
            String::new()
        } else {
            format!("/{}", p.trim_start_matches('/'))
        });
    }

    /// The path prefix ("" or `/ci`).
    pub fn prefix(&self) -> &str {
        self.prefix.get().map(String::as_str).unwrap_or("")
    }

    /// A new session: its id and CSRF token.
    fn open(&self) -> (String, String) {
        let id = crate::auth::hex(&crate::auth::random_nonce());
        let csrf = crate::auth::hex(&crate::auth::random_nonce());
        let mut s = self.sessions.lock().unwrap();
        s.retain(|_, v| v.used.elapsed() < SESSION_IDLE);
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s.iter().min_by_key(|(_, v)| v.used).map(|(k, _)| k.clone()) {
                s.remove(&oldest);
            }
        }
        s.insert(id.clone(), Session { csrf: csrf.clone(), used: Instant::now() });
        (id, csrf)
    }

    /// The CSRF token of live session `id`, which is marked used.
    fn session(&self, id: &str) -> Option<String> {
        let mut s = self.sessions.lock().unwrap();
        let live = s.get_mut(id).filter(|v| v.used.elapsed() < SESSION_IDLE)?;
        live.used = Instant::now();
        Some(live.csrf.clone())
    }

    fn close(&self, id: &str) {
        self.sessions.lock().unwrap().remove(id);
    }

    /// End every session (the API token changed).
    pub fn close_all(&self) {
        self.sessions.lock().unwrap().clear();
    }
}

/// What every page's frame needs.
pub struct Chrome {
    /// The path prefix.
    pub p: String,
    /// The session's CSRF token ("" when logged out).
    pub csrf: String,
    /// Whether someone is logged in.
    pub signed_in: bool,
}

/// Whether the request carries a live session's cookie.
pub fn signed_in(ctl: &Controller, req: &Request<Incoming>) -> bool {
    cookie(req, COOKIE).is_some_and(|id| ctl.web.session(&id).is_some())
}

/// Whether `segs` (the path after the prefix) is one of the web page's.
pub fn is_page(method: &Method, segs: &[&str]) -> bool {
    matches!(
        (method, segs),
        (&Method::GET, [""] | ["nodes"] | ["submit"] | ["login"])
            | (&Method::POST, ["login"] | ["logout"] | ["submit"])
            | (&Method::GET, ["static", _] | ["nodes", _] | ["builds", _])
            | (&Method::POST, ["nodes", _, "remove"] | ["builds", _, "cancel" | "rebuild"])
            | (&Method::GET, ["builds", _, "log", "live" | "raw"])
            | (&Method::GET, ["builds", _, "artifacts", _, ..])
    )
}

/// Answer a request for one of the web page's paths (see [`is_page`]).
pub async fn page(
    ctl: &Arc<Controller>,
    req: Request<Incoming>,
    segs: &[&str],
    fp: Option<&str>,
) -> Response<Body> {
    let p = ctl.web.prefix().to_string();
    let forwarded = req.headers().get("X-Forwarded-Proto").and_then(|h| h.to_str().ok());
    let secure = match forwarded {
        Some(f) => f.eq_ignore_ascii_case("https"),
        None => fp.is_some(),
    };
    if let (&Method::GET, ["static", file]) = (req.method(), segs) {
        return asset(file);
    }
    let sid = cookie(&req, COOKIE);
    let csrf = sid.as_deref().and_then(|id| ctl.web.session(id));
    match (req.method().clone(), segs) {
        (Method::GET, ["login"]) => {
            let next = http::query_param(&req, "next").unwrap_or_default();
            return login_page(&p, "", &next, StatusCode::OK);
        }
        (Method::POST, ["login"]) => return login(ctl, req, &p, secure).await,
        _ => {}
    }
    let Some(csrf) = csrf else {
        if req.method() == Method::GET && !segs.last().is_some_and(|s| *s == "live" || *s == "raw") {
            let here = req.uri().path_and_query().map(|x| x.as_str()).unwrap_or("/");
            return redirect(&format!("{p}/login?next={}", encode(here)));
        }
        return plain(StatusCode::UNAUTHORIZED, "log in first: your session ended or was never opened\n");
    };
    let c = Chrome { p: p.clone(), csrf: csrf.clone(), signed_in: true };
    if req.method() == Method::POST {
        let form = match read_form(req).await {
            Ok(f) => f,
            Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("{}\n", e.message)),
        };
        let given = form.get("csrf").map(String::as_str).unwrap_or("");
        if !crate::auth::constant_time_eq(given.as_bytes(), csrf.as_bytes()) {
            return plain(
                StatusCode::FORBIDDEN,
                "this form is stale or came from another site (its CSRF token does not match): reload the page and \
                 try again\n",
            );
        }
        let result = match segs {
            ["logout"] => {
                if let Some(id) = &sid {
                    ctl.web.close(id);
                }
                let mut r = redirect(&format!("{p}/login"));
                r.headers_mut().insert(header::SET_COOKIE, session_cookie(&p, "", secure, 0));
                return r;
            }
            ["submit"] => {
                let yaml = form.get("yaml").cloned().unwrap_or_default();
                return match ctl.submit(yaml.clone(), Vec::new()).await {
                    Ok(id) => redirect(&format!("{p}/builds/{id}")),
                    Err(e) => render(StatusCode::BAD_REQUEST, &SubmitPage { c, error: e.message, yaml }),
                };
            }
            ["nodes", name, "remove"] => ctl.remove_node(name).await.map(|_| format!("{p}/nodes")),
            ["builds", id, "cancel"] => match http::parse_id(id) {
                Ok(n) => ctl.cancel(n).await.map(|_| format!("{p}/builds/{n}")),
                Err(e) => Err(e),
            },
            ["builds", id, "rebuild"] => match http::parse_id(id) {
                Ok(n) => match ctl.build(n).await {
                    Ok(b) => {
                        let params = super::store::decode_params(&b.params);
                        ctl.submit(b.yaml, params).await.map(|new| format!("{p}/builds/{new}"))
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
            _ => Err(ApiError::new(404, "no such page")),
        };
        return match result {
            Ok(to) => redirect(&to),
            Err(e) => error_page(&c, e),
        };
    }
    let result = match segs {
        [""] => overview(ctl, &c, &req).await,
        ["nodes"] => Ok(nodes_page(ctl, &c, &req, fp.is_some())),
        ["nodes", name] => node_page(ctl, &c, &req, name, fp).await,
        ["submit"] => Ok(render(
            StatusCode::OK,
            &SubmitPage { c: Chrome { ..c }, error: String::new(), yaml: String::new() },
        )),
        ["builds", id] => build_page(ctl, &c, id).await,
        ["builds", id, "log", "live"] => live_log(ctl, &req, id).await,
        ["builds", id, "log", "raw"] => match http::parse_id(id) {
            Ok(n) => http::log_stream(ctl, n, false, 0).await,
            Err(e) => Err(e),
        },
        ["builds", id, "artifacts", rest @ ..] if !rest.is_empty() => match http::parse_id(id) {
            Ok(n) => http::get_artifact(ctl, n, &rest.join("/")).await.map(|mut r| {
                // Saved as a file, never shown inline (an artifact's bytes are the build's, not ours).
                let name = rest.last().map(|n| n.replace(['"', '\\', '\r', '\n'], "_")).unwrap_or_default();
                if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
                    r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
                }
                r
            }),
            Err(e) => Err(e),
        },
        _ => Err(ApiError::new(404, "no such page")),
    };
    result.unwrap_or_else(|e| error_page(&Chrome { p, csrf, signed_in: true }, e))
}

/// The value of cookie `name`, if the request has it.
fn cookie(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers().get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        v.split(';').find_map(|kv| {
            let (k, val) = kv.trim().split_once('=')?;
            (k == name && val.len() == 64 && val.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| val.to_string())
        })
    })
}

fn session_cookie(p: &str, id: &str, secure: bool, max_age: u64) -> HeaderValue {
    let path = if p.is_empty() { "/" } else { p };
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path={path}; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("cookie header")
}

async fn login(ctl: &Arc<Controller>, req: Request<Incoming>, p: &str, secure: bool) -> Response<Body> {
    let form = match read_form(req).await {
        Ok(f) => f,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("{}\n", e.message)),
    };
    let next = form.get("next").cloned().unwrap_or_default();
    let token = form.get("token").map(|t| t.trim()).unwrap_or("");
    if !ctl.token_ok(token) {
        return login_page(p, "That is not this controller's API token.", &next, StatusCode::UNAUTHORIZED);
    }
    let (id, _) = ctl.web.open();
    // Only a path of this site: never an absolute URL or `//host` a link could smuggle in.
    let to = if next.starts_with(&format!("{p}/")) && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        format!("{p}/")
    };
    let mut r = redirect(&to);
    r.headers_mut().insert(header::SET_COOKIE, session_cookie(p, &id, secure, SESSION_IDLE.as_secs()));
    r
}

/// A form body (`application/x-www-form-urlencoded`), by field.
async fn read_form(req: Request<Incoming>) -> Result<HashMap<String, String>, ApiError> {
    let body = http::body_bytes(req, MAX_FORM).await?;
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::new(400, "the form is not UTF-8"))?;
    let mut out = HashMap::new();
    for kv in text.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ApiError::new(400, "a form field is not UTF-8 once decoded"))
        };
        out.insert(dec(k)?, dec(v)?);
    }
    Ok(out)
}

/// `s` percent-encoded for a query value.
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `s` percent-encoded for one path segment (node names in links).
fn segment(s: &str) -> String {
    encode(s)
}

fn with_headers(mut r: Response<Body>) -> Response<Body> {
    let h = r.headers_mut();
    h.insert("Content-Security-Policy", HeaderValue::from_static(CSP));
    h.insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
    h.insert("X-Frame-Options", HeaderValue::from_static("DENY"));
    h.insert("Referrer-Policy", HeaderValue::from_static("same-origin"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    r
}

fn render(status: StatusCode, t: &impl Template) -> Response<Body> {
    match t.render() {
        Ok(html) => with_headers(http::full(status, "text/html; charset=utf-8", html)),
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot render this page: {e}\n")),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    with_headers(http::full(status, "text/plain; charset=utf-8", text.to_string()))
}

fn redirect(to: &str) -> Response<Body> {
    let mut r = with_headers(http::full(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", ""));
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The compiled-in style sheet and script.
fn asset(file: &str) -> Response<Body> {
    let (ctype, body): (&str, &'static str) = match file {
        "app.css" => ("text/css; charset=utf-8", include_str!("static/app.css")),
        "app.js" => ("text/javascript; charset=utf-8", include_str!("static/app.js")),
        _ => return plain(StatusCode::NOT_FOUND, "no such file\n"),
    };
    let mut r = http::full(StatusCode::OK, ctype, Bytes::from_static(body.as_bytes()));
    // Short: a new controller version's files are picked up within minutes.
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    with_headers(r)
}

#[derive(Template)]
#[template(path = "login.html", config = "src/controller/web/askama.toml")]
struct LoginPage<'a> {
    c: Chrome,
    error: &'a str,
    next: &'a str,
}

fn login_page(p: &str, error: &str, next: &str, status: StatusCode) -> Response<Body> {
    let c = Chrome { p: p.to_string(), csrf: String::new(), signed_in: false };
    render(status, &LoginPage { c, error, next })
}

#[derive(Template)]
#[template(
    source = "{% extends \"base.html\" %}{% block title %}Error{% endblock %}{% block main %}<main><h1>{{ status }}</h1><p class=\"error\" id=\"error\">{{ message }}</p></main>{% endblock %}",
    ext = "html",
    config = "src/controller/web/askama.toml"
)]
struct ErrorPage<'a> {
    c: &'a Chrome,
    status: u16,
    message: &'a str,
}

fn error_page(c: &Chrome, e: ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    render(status, &ErrorPage { c, status: e.status, message: &e.message })
}

/// Seconds as people read a duration: `42 s`, `3 min 5 s`, `2 h 10 min`.
fn duration(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A build as the lists show it.
struct BuildRow {
    id: u64,
    name: String,
    state: &'static str,
    node: String,
    node_url: String,
    /// Waiting, elapsed or taken: by the list.
    age: String,
    /// When it finished, relative.
    when: String,
    why: String,
}

impl BuildRow {
    fn new(b: &super::store::BuildRecord, why: Option<String>) -> Self {
        let t = now();
        let age = match (b.started, b.finished) {
            (Some(s), Some(f)) => duration(f - s),
            (Some(s), None) => duration(t - s),
            (None, Some(f)) => duration(f - b.created),
            (None, None) => duration(t - b.created),
        };
        let node = b.node.clone().unwrap_or_default();
        BuildRow {
            id: b.id,
            name: b.name.clone(),
            state: b.state.as_str(),
            node_url: segment(&node),
            node,
            age,
            when: b.finished.map(|f| format!("{} ago", duration(t - f))).unwrap_or_default(),
            why: why.unwrap_or_default(),
        }
    }
}

#[derive(Template)]
#[template(path = "overview.html", config = "src/controller/web/askama.toml")]
struct Overview {
    c: Chrome,
    online: usize,
    offline: usize,
    busy: usize,
    queue_len: usize,
    queue: Vec<BuildRow>,
    running: Vec<BuildRow>,
    recent: Vec<BuildRow>,
    older: Option<u64>,
}

async fn overview(
    ctl: &Arc<Controller>,
    c: &Chrome,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let before = http::query_param(req, "before").and_then(|b| b.parse::<u64>().ok());
    let nodes = ctl.nodes();
    let online = nodes.iter().filter(|n| n.online).count();
    let busy = nodes.iter().filter(|n| n.online && n.busy > 0).count();
    let super::core::Activity { queued, running, queue_len } = ctl.activity(QUEUE_SHOWN);
    let ids: Vec<u64> = queued.iter().map(|(id, _)| *id).chain(running.iter().copied()).collect();
    let mut known: HashMap<u64, super::store::BuildRecord> =
        ctl.builds_by_id(ids).await?.into_iter().map(|b| (b.id, b)).collect();
    let queue =
        queued.into_iter().filter_map(|(id, why)| known.get(&id).map(|b| BuildRow::new(b, why))).collect();
    let running = running.iter().filter_map(|id| known.remove(id).map(|b| BuildRow::new(&b, None))).collect();
    let recent: Vec<BuildRow> =
        ctl.finished_builds(None, before, PAGE).await?.iter().map(|b| BuildRow::new(b, None)).collect();
    let older = (recent.len() == PAGE as usize).then(|| recent.last().map(|b| b.id)).flatten();
    let page = Overview {
        c: Chrome { p: c.p.clone(), csrf: c.csrf.clone(), signed_in: true },
        online,
        offline: nodes.len() - online,
        busy,
        queue_len,
        queue,
        running,
        recent,
        older,
    };
    Ok(render(StatusCode::OK, &page))
}

/// A node as the pages show it.
struct NodeRow {
    name: String,
    url: String,
    state: &'static str,
    state_class: &'static str,
    /// Since when it is in that state, for people.
    since: String,
    labels: String,
    busy: u32,
    executors: u32,
    transport: String,
    rtt: String,
    origin: String,
    peer: String,
    /// `wisp-agent 0.1.0 (aarch64, linux)`, or "" when not known.
    agent: String,
}

/// When `t` was, relative to now: `3 min 5 s ago`.
fn ago(t: SystemTime) -> String {
    let secs = SystemTime::now().duration_since(t).map(|d| d.as_secs() as i64).unwrap_or(0);
    format!("{} ago", duration(secs))
}

fn node_row(n: &super::core::NodeView, tls: bool) -> NodeRow {
    let (state, state_class) = match (n.online, n.ever_online, n.held_steps) {
        (true, _, _) => ("online", "online"),
        (false, _, h) if h > 0 => ("lost", "lost"),
        (false, true, _) => ("offline", "offline"),
        (false, false, _) => ("never connected", "never"),
    };
    let since = match (n.changed, state) {
        (Some(t), _) => ago(t),
        (None, "never connected") => "since the controller started".to_string(),
        (None, _) => {
            let t = SystemTime::now() - n.since.elapsed();
            format!("{} (when the controller started)", ago(t))
        }
    };
    let mut transport = if n.websocket { "WebSocket" } else { "TCP" }.to_string();
    if tls {
        transport.push_str(", TLS");
    }
    NodeRow {
        name: n.rec.name.clone(),
        url: segment(&n.rec.name),
        state,
        state_class,
        since: if n.held_steps > 0 {
            format!("{since}; {} step(s) wait for it", n.held_steps)
        } else {
            since
        },
        labels: n.rec.labels.join(" "),
        busy: n.busy,
        executors: n.rec.executors,
        transport,
        rtt: n.rtt_us.map(|us| format!("{:.1} ms", us as f64 / 1000.0)).unwrap_or_default(),
        origin: if n.rec.origin == "static" {
            "static".to_string()
        } else {
            format!("cloud {}, pod {}", n.rec.origin, n.rec.name)
        },
        peer: n.peer.clone().unwrap_or_default(),
        agent: match &n.agent {
            Some((v, a, o)) => format!("wisp-agent {v} ({a}, {o})"),
            None if n.online => "not reported (an older agent)".into(),
            None => String::new(),
        },
    }
}

#[derive(Template)]
#[template(path = "nodes.html", config = "src/controller/web/askama.toml")]
struct NodesPage<'a> {
    c: &'a Chrome,
    nodes: Vec<NodeRow>,
    total: usize,
    next: Option<String>,
}

/// Nodes in one page of the nodes list.
const NODES_PAGE: usize = 200;

fn nodes_page(ctl: &Arc<Controller>, c: &Chrome, req: &Request<Incoming>, tls: bool) -> Response<Body> {
    let after = http::query_param(req, "after").unwrap_or_default();
    let all = ctl.node_views();
    let total = all.len();
    // By name (the controller keeps them so): the page after `after`.
    let rest: Vec<&super::core::NodeView> =
        all.iter().filter(|n| after.is_empty() || n.rec.name > after).collect();
    let nodes: Vec<NodeRow> = rest.iter().take(NODES_PAGE).map(|n| node_row(n, tls)).collect();
    let next = (rest.len() > NODES_PAGE).then(|| nodes.last().map(|n| encode(&n.name))).flatten();
    render(StatusCode::OK, &NodesPage { c, nodes, total, next })
}

#[derive(Template)]
#[template(path = "node.html", config = "src/controller/web/askama.toml")]
struct NodePage<'a> {
    c: &'a Chrome,
    n: NodeRow,
    builds: Vec<BuildRow>,
    command: Option<String>,
}

async fn node_page(
    ctl: &Arc<Controller>,
    c: &Chrome,
    req: &Request<Incoming>,
    name: &str,
    fp: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let views = ctl.node_views();
    let Some(view) = views.iter().find(|n| n.rec.name == name) else {
        return Err(ApiError::new(404, format!("no node named '{}'", crate::text::truncate(name, 100))));
    };
    let rec = &view.rec;
    let builds = ctl
        .finished_builds(Some(name.to_string()), None, PAGE)
        .await?
        .iter()
        .map(|b| BuildRow::new(b, None))
        .collect();
    let command = (http::query_param(req, "secret").as_deref() == Some("show"))
        .then(|| http::node_command(ctl, req, rec, fp));
    Ok(render(StatusCode::OK, &NodePage { c, n: node_row(view, fp.is_some()), builds, command }))
}

/// A step as the build page shows it.
struct StepRow {
    index: u32,
    /// Its stage's path ("" for a pipeline of plain steps).
    stage: String,
    /// The node it ran on ("" before it started).
    node: String,
    name: String,
    state: &'static str,
    exit: String,
    bytes: u64,
    /// How long it ran (or has been running).
    took: String,
}

/// One artifact on a build's page.
struct ArtifactRow {
    path: String,
    /// The path with each part percent-encoded, for the link.
    url: String,
    size: u64,
    sha256: String,
}

#[derive(Template)]
#[template(path = "build.html", config = "src/controller/web/askama.toml")]
struct BuildPage<'a> {
    c: &'a Chrome,
    b: BuildRow,
    message: String,
    is_final: bool,
    steps: Vec<StepRow>,
    artifacts: Vec<ArtifactRow>,
    tail: u64,
}

async fn build_page(ctl: &Arc<Controller>, c: &Chrome, id: &str) -> Result<Response<Body>, ApiError> {
    let id = http::parse_id(id)?;
    let (b, steps) = ctl.build_with_steps(id).await?;
    let message = ctl.waiting(id).map(|w| format!("waiting: {w}")).unwrap_or_else(|| b.message.clone());
    let steps = steps
        .iter()
        .map(|s| StepRow {
            index: s.index,
            stage: s.stage.clone(),
            node: s.node.clone().unwrap_or_default(),
            name: s.name.clone(),
            state: s.state.as_str(),
            exit: s.exit.clone(),
            bytes: s.bytes,
            took: match (s.started, s.finished) {
                (Some(a), Some(b)) => duration(b - a),
                (Some(a), None) if s.state == super::api::StepState::Running => duration(now() - a),
                _ => String::new(),
            },
        })
        .collect();
    let is_final = b.state.is_final();
    let dir = super::archives::artifacts_dir(ctl, id);
    let artifacts = smol::unblock(move || super::archives::list(&dir))
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|a| ArtifactRow {
            url: a.path.split('/').map(encode).collect::<Vec<_>>().join("/"),
            path: a.path,
            size: a.size,
            sha256: a.sha256,
        })
        .collect();
    Ok(render(
        StatusCode::OK,
        &BuildPage { c, b: BuildRow::new(&b, None), message, is_final, steps, artifacts, tail: LOG_TAIL },
    ))
}

#[derive(Template)]
#[template(path = "submit.html", config = "src/controller/web/askama.toml")]
struct SubmitPage {
    c: Chrome,
    error: String,
    yaml: String,
}

/// The build's log as server-sent events: each chunk an event whose id is the log offset after
/// it (a reconnecting `EventSource` resumes there), `skipped` first when the log's start is
/// left out (`?tail=N`: about the last N bytes), and `end` when the build is over.
async fn live_log(
    ctl: &Arc<Controller>,
    req: &Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let id = http::parse_id(id)?;
    let resume =
        req.headers().get("Last-Event-ID").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let offset = match resume {
        Some(o) => o,
        None => {
            let tail = http::query_param(req, "tail").and_then(|t| t.parse::<u64>().ok());
            match tail {
                Some(t) => {
                    let stored: u64 = ctl.build_steps(id).await?.iter().map(|s| s.bytes).sum();
                    stored.saturating_sub(t)
                }
                None => 0,
            }
        }
    };
    let rx = http::log_chunks(ctl, id, true, offset).await?;
    let (tx, out) = smol::channel::bounded::<Bytes>(4);
    ctl.ex
        .spawn(async move {
            if resume.is_none()
                && offset > 0
                && tx.send(format!("event: skipped\ndata: {offset}\n\n").into()).await.is_err()
            {
                return;
            }
            let mut at = offset;
            while let Ok((chunk, counted)) = rx.recv().await {
                if counted {
                    at += chunk.len() as u64;
                }
                if tx.send(sse_event(&chunk, counted.then_some(at))).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Bytes::from_static(b"event: end\ndata: \n\n")).await;
        })
        .detach();
    let mut r = http::stream_response(out, "text/event-stream");
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx would otherwise hold the stream back in its buffer.
    r.headers_mut().insert("X-Accel-Buffering", HeaderValue::from_static("no"));
    Ok(with_headers(r))
}

/// One server-sent event carrying `chunk` as text (invalid UTF-8 shown as U+FFFD; carriage
/// returns as line ends, since an event's lines cannot hold one), with `id` when given.
fn sse_event(chunk: &[u8], id: Option<u64>) -> Bytes {
    let text = String::from_utf8_lossy(chunk);
    let mut out = String::with_capacity(text.len() + 64);
    if let Some(id) = id {
        out.push_str(&format!("id: {id}\n"));
    }
    for line in text.replace("\r\n", "\n").split(['\n', '\r']) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_lines_and_their_offset() {
        assert_eq!(&sse_event(b"a\nb", Some(3))[..], b"id: 3\ndata: a\ndata: b\n\n");
        assert_eq!(&sse_event(b"a\n", None)[..], b"data: a\ndata: \n\n");
        assert_eq!(&sse_event(b"x\r\ny\rz", None)[..], b"data: x\ndata: y\ndata: z\n\n");
        assert_eq!(&sse_event(b"\xff", None)[..], "data: \u{fffd}\n\n".as_bytes());
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(duration(42), "42 s");
        assert_eq!(duration(185), "3 min 5 s");
        assert_eq!(duration(7800), "2 h 10 min");
        assert_eq!(duration(-5), "0 s");
    }

    #[test]
    fn pages_are_escaped() {
        let c = Chrome { p: String::new(), csrf: "t".into(), signed_in: true };
        let html = ErrorPage { c: &c, status: 400, message: "<script>alert(1)</script>" }.render().unwrap();
        assert!(
            html.contains("&#60;script&#62;alert(1)&#60;/script&#62;") && !html.contains("<script>alert"),
            "{html}"
        );
    }

    #[test]
    fn the_prefix_is_normalized() {
        for (given, want) in [("", ""), ("/", ""), ("/ci", "/ci"), ("ci/", "/ci"), ("/a/b/", "/a/b")] {
            let w = Web::default();
            w.set_prefix(given);
            assert_eq!(w.prefix(), want, "{given}");
        }
    }
}
