//! podman's REST API (libpod, v4) on its Unix socket, and the `podman system service` the
//! controller runs for it when the cloud names no socket of its own.
//!
//! Why the API and not one `podman` process per call: each process the controller starts (fork,
//! exec, pipes, reaping) cost it about a millisecond of CPU, five or more of them per pod; a
//! request on the socket costs some tens of microseconds. The answers are read into typed
//! structs of only the fields used.
//!
//! One HTTP/1.1 connection per request (podman's service answers a warm socket in well under a
//! millisecond); every request is bounded in time and in answer size, and the event stream in
//! line length.
//!
//! What podman 4.3.1 answers, checked on this kind of machine:
//! - `POST /play/kube?start=false` creates the pod and pulls its images; a pull that fails is a
//!   500 whose `message` reads `playing YAML file: initializing source docker://IMAGE: ...`, and
//!   it leaves a pod in state `Created` behind.
//! - `POST /pods/NAME/start` runs the init containers to their end; one that fails is a 409
//!   `init container ID exited with code N`. A missing pod is a 404 everywhere.
//! - `GET /containers/json` lists the pod's labels on each of its containers (the infra
//!   container has none), not its annotations; the state, exit code and creation time are there,
//!   an OOM kill and a start error only in `GET /containers/ID/json`.
//! - `GET /events` gives Docker's event shape: `Type`, `Action`, `Actor.ID` and
//!   `Actor.Attributes` (`name`, `podId`, `containerExitCode` and the container's labels).

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::Connection;
use hyper::{Method, Request, Response};
use serde::Deserialize;
use smol::future::FutureExt as _;
use smol::net::unix::UnixStream;
use smol::Timer;
use smol_hyper::rt::FuturesIo;
use std::collections::BTreeMap;
use std::future::Future;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The API version in request paths (podman 4.x serves it).
pub const API: &str = "/v4.0.0/libpod";
/// Longest answer read, in bytes (a listing of many pods is some KiB each).
pub const MAX_ANSWER: usize = 16 << 20;
/// Longest event taken from the stream (one is a few hundred bytes; longer ones are skipped).
pub const MAX_EVENT_LINE: usize = 64 << 10;
/// Longest a listing, inspection or removal may take: podman answers these in well under a
/// second; longer means it hangs on a lock.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a service started by the controller may take to answer on its socket.
const SERVICE_START: Duration = Duration::from_secs(30);

/// A podman service's socket, and the service itself when the controller runs it.
#[derive(Clone)]
pub struct PodmanApi {
    socket: PathBuf,
    service: Option<Arc<Service>>,
}

impl std::fmt::Debug for PodmanApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodmanApi").field("socket", &self.socket).finish()
    }
}

impl PodmanApi {
    /// The service someone else runs on `socket` (`unix://` in front is allowed).
    pub fn new(socket: impl AsRef<str>) -> Self {
        let s = socket.as_ref();
        Self { socket: PathBuf::from(s.strip_prefix("unix://").unwrap_or(s)), service: None }
    }

    /// A service of the controller's own: `program system service` on a socket in a private
    /// directory, started at once, restarted when it exits, and stopped (SIGTERM) when the last
    /// clone of this is dropped or the controller dies.
    pub fn own(program: &str) -> Self {
        let service = Service::start(program);
        Self { socket: service.socket.clone(), service: Some(service) }
    }

    /// The socket requests go to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Connect, waiting for a service of the controller's own that is (re)starting.
    async fn connect(&self) -> Result<UnixStream, String> {
        let deadline = Instant::now() + SERVICE_START;
        loop {
            match UnixStream::connect(&self.socket).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    let starting = matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused);
                    match &self.service {
                        Some(service) if starting && Instant::now() < deadline => {
                            if let Some(why) = service.failed() {
                                return Err(why);
                            }
                            Timer::after(Duration::from_millis(20)).await;
                        }
                        Some(service) => {
                            return Err(service.failed().unwrap_or_else(|| {
                                format!(
                                    "podman's service (started by the controller) does not answer at {}: {e}",
                                    self.socket.display()
                                )
                            }))
                        }
                        None => {
                            return Err(format!(
                                "cannot reach podman's service at {}: {e} (start it with `podman system service \
                                 --time=0 unix://{0}`, or enable podman.socket, or leave the cloud's `socket` \
                                 unset for the controller to run one)",
                                self.socket.display()
                            ))
                        }
                    }
                }
            }
        }
    }

    /// Send `METHOD API/PATH` with `body`: the answer's head and body, and its connection (which
    /// the body is read through).
    async fn send(
        &self,
        method: &Method,
        path: &str,
        ctype: &str,
        body: Vec<u8>,
    ) -> Result<(Response<Incoming>, Driven), String> {
        let what = format!("{method} {path}");
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(FuturesIo::new(stream))
            .await
            .map_err(|e| format!("podman's service, {what}: {e}"))?;
        let mut conn = Driven { conn: Some(Box::pin(conn)) };
        let req = Request::builder()
            .method(method)
            .uri(format!("{API}{path}"))
            .header("host", "podman")
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("podman's service, {what}: {e}"))?;
        let resp =
            conn.run(sender.send_request(req)).await.map_err(|e| format!("podman's service, {what}: {e}"))?;
        Ok((resp, conn))
    }

    /// `METHOD API/PATH` with `body` (of type `ctype`), for at most `limit`: the status and the
    /// whole answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        ctype: &str,
        body: Vec<u8>,
        limit: Duration,
    ) -> Result<(u16, Bytes), String> {
        let run = async {
            let (resp, mut conn) = self.send(&method, path, ctype, body).await?;
            let status = resp.status().as_u16();
            let body = conn
                .run(Limited::new(resp.into_body(), MAX_ANSWER).collect())
                .await
                .map_err(|e| format!("podman's service, {method} {path}: reading the answer: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        run.or(async {
            Timer::after(limit).await;
            Err(format!(
                "podman's service gave no answer to {method} {path} within {}s (podman may hang on a lock: \
                 `podman ps` shows whether it answers)",
                limit.as_secs()
            ))
        })
        .await
    }

    /// `GET` of a JSON answer of type `T`; `None` for a 404.
    async fn get<T: for<'de> Deserialize<'de>>(&self, path: &str, what: &str) -> Result<Option<T>, String> {
        match self.call(Method::GET, path, "application/json", Vec::new(), CALL_TIMEOUT).await? {
            (200, b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("podman's service gave {what} this controller cannot read: {e}")),
            (404, _) => Ok(None),
            (s, b) => Err(format!("podman could not give {what} ({s}): {}", error_text(&b))),
        }
    }

    /// Whether the service answers `_ping`.
    pub async fn ping(&self) -> Result<(), String> {
        match self.call(Method::GET, "/_ping", "text/plain", Vec::new(), CALL_TIMEOUT).await? {
            (200, _) => Ok(()),
            (s, b) => Err(format!("podman's service answered _ping with {s}: {}", error_text(&b))),
        }
    }

    /// `podman kube play` of `yaml` on `network`, started or not: `Err` has podman's message.
    pub async fn play_kube(
        &self,
        yaml: &str,
        network: &str,
        start: bool,
        limit: Duration,
    ) -> Result<(), String> {
        let path = format!("/play/kube?network={}&start={start}", urlencode(network));
        match self.call(Method::POST, &path, "application/yaml", yaml.as_bytes().to_vec(), limit).await? {
            (200, _) => Ok(()),
            (_, b) => Err(error_text(&b)),
        }
    }

    /// Start pod `name` (its init containers run to their end): `Err` has podman's message.
    pub async fn start_pod(&self, name: &str, limit: Duration) -> Result<(), String> {
        let path = format!("/pods/{}/start", urlencode(name));
        match self.call(Method::POST, &path, "application/json", Vec::new(), limit).await? {
            // 304: already running.
            (200 | 304, _) => Ok(()),
            (_, b) => Err(error_text(&b)),
        }
    }

    /// Remove pod `name` and its containers at once (killed first: a removal alone gives each
    /// container 10 s after SIGTERM, which a shell as PID 1 ignores, and podman 4.3 takes a stop
    /// with `t=0` for its default); a pod already gone is not an error.
    pub async fn remove_pod(&self, name: &str) -> Result<(), String> {
        let kill = format!("/pods/{}/kill?signal=SIGKILL", urlencode(name));
        match self.call(Method::POST, &kill, "application/json", Vec::new(), CALL_TIMEOUT).await? {
            // 409: nothing runs in it.
            (200 | 404 | 409, _) => {}
            (s, b) => log::debug!("podman: killing pod {name} ({s}): {}", error_text(&b)),
        }
        let path = format!("/pods/{}?force=true", urlencode(name));
        match self.call(Method::DELETE, &path, "application/json", Vec::new(), CALL_TIMEOUT).await? {
            (200 | 404, _) => Ok(()),
            (s, b) => Err(format!("podman could not remove pod {name} ({s}): {}", error_text(&b))),
        }
    }

    /// The pods with every label of `labels`.
    pub async fn pods(&self, labels: &BTreeMap<String, String>) -> Result<Vec<ApiPod>, String> {
        let label: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let filters = serde_json::json!({ "label": label });
        let path = format!("/pods/json?filters={}", urlencode(&filters.to_string()));
        Ok(self.get::<Option<Vec<ApiPod>>>(&path, "a pod list").await?.flatten().unwrap_or_default())
    }

    /// All containers (running or not) of the pods with ids `pods`.
    pub async fn containers(&self, pods: &[&str]) -> Result<Vec<ApiContainer>, String> {
        if pods.is_empty() {
            return Ok(Vec::new());
        }
        let filters = serde_json::json!({ "pod": pods });
        let path = format!("/containers/json?all=true&filters={}", urlencode(&filters.to_string()));
        Ok(self
            .get::<Option<Vec<ApiContainer>>>(&path, "a container list")
            .await?
            .flatten()
            .unwrap_or_default())
    }

    /// What only an inspection tells of container `id`; `None` when it is gone.
    pub async fn container_detail(&self, id: &str) -> Result<Option<ApiDetail>, String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Inspect {
            state: ApiDetail,
        }
        let path = format!("/containers/{}/json", urlencode(id));
        Ok(self.get::<Inspect>(&path, "a container's state").await?.map(|i| i.state))
    }

    /// Where each of the volumes `names` that exists keeps its files, by name (one request).
    pub async fn volume_mountpoints(&self, names: &[String]) -> Result<BTreeMap<String, String>, String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Volume {
            name: String,
            mountpoint: String,
        }
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        let filters = serde_json::json!({ "name": names });
        let path = format!("/volumes/json?filters={}", urlencode(&filters.to_string()));
        let found =
            self.get::<Option<Vec<Volume>>>(&path, "a volume list").await?.flatten().unwrap_or_default();
        // The name filter matches parts of names too: only the asked-for ones are kept.
        Ok(found.into_iter().filter(|v| names.contains(&v.name)).map(|v| (v.name, v.mountpoint)).collect())
    }

    /// The stream of container and pod events since unix second `since`, as they happen.
    pub async fn events(&self, since: u64) -> Result<EventStream, String> {
        let filters = serde_json::json!({ "type": ["container", "pod"] });
        let path = format!("/events?stream=true&since={since}&filters={}", urlencode(&filters.to_string()));
        let open = async {
            let (resp, mut conn) = self.send(&Method::GET, &path, "application/json", Vec::new()).await?;
            if resp.status() != 200 {
                let status = resp.status().as_u16();
                let body =
                    conn.run(Limited::new(resp.into_body(), 64 << 10).collect()).await.map(|b| b.to_bytes());
                return Err(format!(
                    "podman's service refused the event stream ({status}): {}",
                    body.map(|b| error_text(&b)).unwrap_or_default()
                ));
            }
            Ok(EventStream {
                body: resp.into_body(),
                conn,
                buf: Vec::new(),
                pending: Bytes::new(),
                over: false,
            })
        };
        open.or(async {
            Timer::after(CALL_TIMEOUT).await;
            Err(format!("podman's service did not open its event stream within {}s", CALL_TIMEOUT.as_secs()))
        })
        .await
    }
}

/// A pod of `GET /pods/json`, the fields used.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ApiPod {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its labels.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// A container of `GET /containers/json`, the fields used.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ApiContainer {
    /// Its id.
    pub id: String,
    /// Its names (podman gives one).
    #[serde(default)]
    pub names: Vec<String>,
    /// When it was made (RFC 3339).
    #[serde(default)]
    pub created: String,
    /// `created`, `running`, `exited`, ...
    #[serde(default)]
    pub state: String,
    /// Its exit code once it exited.
    #[serde(default)]
    pub exit_code: i32,
    /// Whether it is the pod's infra container.
    #[serde(default)]
    pub is_infra: bool,
    /// The id of its pod.
    #[serde(default)]
    pub pod: String,
    /// Its labels (the pod's are among them).
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// What `GET /containers/ID/json` adds to a listing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ApiDetail {
    /// The kernel's OOM killer ended it.
    #[serde(default, rename = "OOMKilled")]
    pub oom_killed: bool,
    /// Why it could not start, if so.
    #[serde(default)]
    pub error: String,
}

/// One event of `GET /events`, the fields used.
#[derive(Debug, Deserialize)]
pub struct ApiEvent {
    /// `container` or `pod`.
    #[serde(rename = "Type", default)]
    pub kind: String,
    /// `create`, `start`, `died`, `remove`, ...
    #[serde(rename = "Action", default)]
    pub action: String,
    /// What it is about.
    #[serde(rename = "Actor", default)]
    pub actor: ApiActor,
}

/// The object of an [`ApiEvent`].
#[derive(Debug, Default, Deserialize)]
pub struct ApiActor {
    /// Its id.
    #[serde(rename = "ID", default)]
    pub id: String,
    /// `name`, `podId`, `containerExitCode` and the labels.
    #[serde(rename = "Attributes", default)]
    pub attributes: BTreeMap<String, String>,
}

/// The lines of an event stream, each at most [`MAX_EVENT_LINE`] bytes; a longer one is an
/// `Err` (and skipped). Cancel-safe: a line read halfway stays here.
pub struct EventStream {
    body: Incoming,
    conn: Driven,
    buf: Vec<u8>,
    pending: Bytes,
    over: bool,
}

impl EventStream {
    /// The next line; `None` when the stream ends.
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, String>> {
        loop {
            if self.pending.is_empty() {
                let frame = match self.conn.run(self.body.frame()).await? {
                    Ok(f) => f,
                    Err(_) => return None,
                };
                if let Ok(data) = frame.into_data() {
                    self.pending = data;
                }
                continue;
            }
            let chunk = &self.pending[..];
            if let Some(i) = chunk.iter().position(|&b| b == b'\n') {
                let over = std::mem::take(&mut self.over) || self.buf.len() + i > MAX_EVENT_LINE;
                if !over {
                    self.buf.extend_from_slice(&chunk[..i]);
                }
                self.pending.advance(i + 1);
                let line = std::mem::take(&mut self.buf);
                if !over && line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(if over {
                    Err(format!("an event over {MAX_EVENT_LINE} bytes was skipped"))
                } else {
                    Ok(line)
                });
            }
            let n = chunk.len();
            if self.over || self.buf.len() + n > MAX_EVENT_LINE {
                self.over = true;
                self.buf.clear();
            } else {
                self.buf.extend_from_slice(chunk);
            }
            self.pending.advance(n);
        }
    }
}

/// A client connection to podman's service, polled by whoever waits on it (no task of its own:
/// a spawned one would hand every answer from one thread to another).
pub struct Driven {
    conn: Option<Pin<Box<Conn>>>,
}

/// hyper's side of one connection to the service.
type Conn = Connection<FuturesIo<UnixStream>, Full<Bytes>>;

impl Driven {
    /// `work`, with the connection driven while it runs. A connection that ends is not polled
    /// again; what it delivered (or the error its end causes) reaches `work`.
    async fn run<T>(&mut self, work: impl Future<Output = T>) -> T {
        let conn = &mut self.conn;
        work.or(async move {
            if let Some(c) = conn.as_mut() {
                let _ = c.as_mut().await;
                *conn = None;
            }
            std::future::pending().await
        })
        .await
    }
}

/// A `podman system service` the controller runs, on a socket in a private directory. A
/// thread of its own starts it, waits for it and starts it again when it exits (after a
/// backoff); the kernel sends it SIGTERM when that thread (so the controller) dies, so a
/// controller killed outright leaves no service behind, and podman, told to stop rather than
/// killed, finishes what it does and releases its locks.
pub struct Service {
    socket: PathBuf,
    dir: PathBuf,
    stop: AtomicBool,
    pid: AtomicI32,
    error: Mutex<Option<String>>,
}

impl Service {
    fn start(program: &str) -> Arc<Self> {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wisp-podman-{}-{n}", std::process::id()));
        let service = Arc::new(Self {
            socket: dir.join("podman.sock"),
            dir: dir.clone(),
            stop: AtomicBool::new(false),
            pid: AtomicI32::new(0),
            error: Mutex::new(None),
        });
        let made = {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::DirBuilder::new().mode(0o700).create(&dir)
        };
        if let Err(e) = made {
            *service.error.lock().unwrap() =
                Some(format!("cannot make a directory for podman's service socket ({}): {e}", dir.display()));
            return service;
        }
        let weak = Arc::downgrade(&service);
        let program = program.to_string();
        let spawned = std::thread::Builder::new()
            .name("podman-service".into())
            .spawn(move || supervise(&program, &weak));
        if let Err(e) = spawned {
            *service.error.lock().unwrap() = Some(format!("cannot start a thread for podman's service: {e}"));
        }
        service
    }

    /// Why the service cannot run, when it cannot.
    fn failed(&self) -> Option<String> {
        self.error.lock().unwrap().clone()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let pid = self.pid.load(Ordering::SeqCst);
        if pid > 0 {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The service's thread: run it until the [`Service`] is dropped.
fn supervise(program: &str, service: &std::sync::Weak<Service>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(s) = service.upgrade() else { return };
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = std::fs::remove_file(&s.socket);
        let mut cmd = std::process::Command::new(program);
        cmd.args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", s.socket.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        #[cfg(target_os = "linux")]
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGTERM))
                    .map_err(std::io::Error::from)
            });
        }
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let why = format!(
                    "cannot run `{program} system service`: {e} (install podman, or name the program in the \
                     cloud's `podman` setting, or a running service's socket in its `socket` setting)"
                );
                log::error!("{why}");
                *s.error.lock().unwrap() = Some(why);
                return;
            }
        };
        s.pid.store(child.id() as i32, Ordering::SeqCst);
        *s.error.lock().unwrap() = None;
        drop(s); // the service may be dropped while podman runs
        let status = child.wait();
        let Some(s) = service.upgrade() else { return };
        s.pid.store(0, Ordering::SeqCst);
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        log::warn!("podman's service exited ({status}); starting it again in {}s", backoff.as_secs());
        drop(s);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// The `message` (else `cause`) of a libpod error answer, or its `Errs` (a pod's start or stop
/// lists one per container), else the text.
pub fn error_text(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => match v["message"].as_str().or(v["cause"].as_str()) {
            Some(m) => m.to_string(),
            None => v["Errs"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e.as_str()).collect::<Vec<_>>().join("; "))
                .unwrap_or_default(),
        },
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    crate::text::truncate(text.trim(), 2000).to_string()
}

/// `s` percent-encoded for a query value or path segment.
fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_give_podmans_message() {
        let b = br#"{"cause":"no such pod","message":"no pod with name or ID x found: no such pod","response":404}"#;
        assert_eq!(error_text(b), "no pod with name or ID x found: no such pod");
        assert_eq!(error_text(b"{\"cause\":\"only\"}"), "only");
        assert_eq!(error_text(b"plain words\n"), "plain words");
        assert_eq!(
            error_text(br#"{"Errs":["starting container 1: no such file","two"],"Id":"x"}"#),
            "starting container 1: no such file; two"
        );
        assert!(error_text(&vec![b'x'; 100_000]).len() <= 2000);
    }

    #[test]
    fn events_read_in_dockers_shape() {
        let line = r#"{"status":"died","Type":"container","Action":"died","Actor":{"ID":"abc","Attributes":{"containerExitCode":"3","name":"p-main","podId":"","wisp.dev/test":"probe"}},"time":1,"timeNano":1}"#;
        let e: ApiEvent = serde_json::from_str(line).unwrap();
        assert_eq!((e.kind.as_str(), e.action.as_str(), e.actor.id.as_str()), ("container", "died", "abc"));
        assert_eq!(e.actor.attributes["containerExitCode"], "3");
    }
}
