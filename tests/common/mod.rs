//! Test harness: real `wisp` controllers and `wisp-agent` processes on 127.0.0.1, ephemeral ports,
//! temporary data dirs; everything is killed and removed on drop.
#![allow(dead_code)]

pub mod browser;
pub mod images;
pub mod kafka;
pub mod kmock;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const WISP: &str = env!("CARGO_BIN_EXE_wisp");
pub const AGENT: &str = env!("CARGO_BIN_EXE_wisp-agent");

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "wisp-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Poll `f` every 20 ms until it returns Some, or panic with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running process killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Wait for the process to exit (up to `limit`) and return its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let child = &mut self.child;
        wait_for("process exit", limit, || child.try_wait().unwrap()).code().unwrap_or(-1)
    }
    pub fn kill(&mut self, sig: &str) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A controller process with its own data dir.
pub struct Controller {
    pub proc: Option<Proc>,
    pub data: TempDir,
    pub http: String,
    pub agent_addr: String,
    pub extra_args: Vec<String>,
    /// Fixed (HTTP, agent) ports, kept across restarts; None picks free ports at each start.
    pub ports: Option<(u16, u16)>,
    /// Serve TLS (the default of `wisp serve`); false passes `--no-tls`, which most tests use.
    pub tls: bool,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Controller {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Self {
        Self::launched(args, None, false)
    }

    /// A controller with TLS on both ports, as `wisp serve` runs by default (self-signed identity
    /// unless `args` give --tls-cert/--tls-key).
    pub fn start_tls(args: &[&str]) -> Self {
        Self::launched(args, None, true)
    }

    /// The controller's identity fingerprint (TLS controllers only).
    pub fn fingerprint(&self) -> String {
        std::fs::read_to_string(self.data.path().join("fingerprint")).unwrap().trim().to_string()
    }

    /// A controller on fixed ports that stay the same when it is restarted (agents can find it again).
    pub fn start_on_fixed_ports(args: &[&str]) -> Self {
        Self::launched(args, Some((free_port(), free_port())), false)
    }

    /// A controller (no TLS) whose data dir is `data` (a directory the test prepared).
    pub fn start_in(data: TempDir, args: &[&str]) -> Self {
        Self::launched_in(data, args, None, false)
    }

    fn launched(args: &[&str], ports: Option<(u16, u16)>, tls: bool) -> Self {
        Self::launched_in(TempDir::new("ctl"), args, ports, tls)
    }

    fn launched_in(data: TempDir, args: &[&str], ports: Option<(u16, u16)>, tls: bool) -> Self {
        let mut c = Self {
            proc: None,
            data,
            http: String::new(),
            agent_addr: String::new(),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            ports,
            tls,
        };
        c.launch();
        c
    }

    /// SIGKILL the controller, leaving it down until `launch`.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    pub fn launch(&mut self) {
        let listening = self.data.path().join("listening");
        let _ = std::fs::remove_file(&listening);
        let log = self.data.path().join(format!("controller-{}.log", Instant::now().elapsed().as_nanos()));
        let (http_port, agent_port) = self.ports.unwrap_or((0, 0));
        let child = Command::new(WISP)
            .args(["serve", "--http-port", &http_port.to_string(), "--agent-port", &agent_port.to_string()])
            .args(if self.extra_args.iter().any(|a| a == "--bind") {
                &[][..]
            } else {
                &["--bind", "127.0.0.1"][..]
            })
            .arg("--data")
            .arg(self.data.path())
            .args(if self.tls { &[][..] } else { &["--no-tls"][..] })
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.proc = Some(Proc { child, log });
        let text = wait_for("the controller to listen", Duration::from_secs(20), || {
            std::fs::read_to_string(&listening).ok()
        });
        for line in text.lines() {
            if let Some(a) = line.strip_prefix("http ") {
                self.http = a.to_string();
            }
            if let Some(a) = line.strip_prefix("agent ") {
                self.agent_addr = a.to_string();
            }
        }
    }

    /// SIGKILL the controller and start it again on the same data dir (new ports).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    pub fn url(&self) -> String {
        format!("{}://{}/", if self.tls { "https" } else { "http" }, self.http)
    }

    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data.path().join("token")).unwrap().trim().to_string()
    }

    /// Run a client command against this controller.
    pub fn wisp(&self, args: &[&str]) -> Output {
        Command::new(WISP)
            .args(args)
            .arg("--data")
            .arg(self.data.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Add a node and return its secret.
    pub fn add_node(&self, name: &str, labels: &str, extra: &[&str]) -> String {
        let mut args = vec!["node", "add", name, "--labels", labels];
        args.extend_from_slice(extra);
        let out = self.wisp(&args);
        assert!(out.status.success(), "node add failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines().find_map(|l| l.strip_prefix("secret: ")).expect("secret line").to_string()
    }

    /// Start an agent for `name`: `ws` true for WebSocket, false for direct TCP.
    pub fn agent(&self, name: &str, secret: &str, ws: bool, work: &Path) -> Proc {
        let mut cmd = Command::new(AGENT);
        cmd.args(["--url", &self.url(), "--name", name, "--secret", secret, "--work-dir"]).arg(work);
        if ws {
            cmd.arg("--websocket");
        } else {
            cmd.args(["--direct", &self.agent_addr]);
        }
        spawn_logged(cmd, work, name)
    }

    /// Add node `name` with `labels` and `executors`, start its agent in `work/NAME` (over
    /// WebSocket when `ws`, else TCP) and wait until it is online.
    pub fn online_agent(&self, name: &str, labels: &str, ws: bool, executors: u32, work: &Path) -> Proc {
        let n = executors.to_string();
        let mut extra = vec!["--executors", n.as_str()];
        if !ws {
            extra.push("--tcp");
        }
        let secret = self.add_node(name, labels, &extra);
        let dir = work.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let agent = self.agent(name, &secret, ws, &dir);
        self.wait_online(name);
        agent
    }

    pub fn node_line(&self, name: &str) -> Option<String> {
        let out = self.wisp(&["nodes"]);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .find(|l| l.split('\t').next() == Some(name))
            .map(str::to_string)
    }

    pub fn wait_online(&self, name: &str) {
        wait_for(&format!("node {name} online"), Duration::from_secs(20), || {
            self.node_line(name).filter(|l| l.contains("\tonline\t"))
        });
    }

    pub fn wait_offline(&self, name: &str, limit: Duration) {
        wait_for(&format!("node {name} offline"), limit, || {
            self.node_line(name).filter(|l| l.contains("\toffline\t"))
        });
    }

    /// Submit a pipeline and follow it; returns (exit code, stdout).
    pub fn run(&self, yaml: &str) -> (i32, String) {
        let f = self.data.path().join(format!("p-{}.yaml", std::process::id()));
        std::fs::write(&f, yaml).unwrap();
        let out = self.wisp(&["run", f.to_str().unwrap(), "--follow"]);
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Submit a pipeline without following; returns the build number.
    pub fn submit(&self, yaml: &str) -> u64 {
        static N: AtomicU32 = AtomicU32::new(0);
        let f = self.data.path().join(format!("s-{}.yaml", N.fetch_add(1, Ordering::SeqCst)));
        std::fs::write(&f, yaml).unwrap();
        let out = self.wisp(&["run", f.to_str().unwrap()]);
        assert!(out.status.success(), "submit failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
    }

    /// GET an API path with the token; returns (status, body).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        http_request(&self.http, "GET", path, Some(&self.token()), b"")
    }

    pub fn build_json(&self, id: u64) -> serde_json::Value {
        let (status, body) = self.get(&format!("/api/builds/{id}"));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    pub fn wait_build_state(&self, id: u64, limit: Duration) -> serde_json::Value {
        wait_for(&format!("build {id} to finish"), limit, || {
            let b = self.build_json(id);
            matches!(b["state"].as_str(), Some("success" | "failure" | "aborted")).then_some(b)
        })
    }

    /// The state of build `id` once it ends, asked through the CLI (works with TLS too).
    pub fn wait_build_state_tls(&self, id: u64, limit: Duration) -> String {
        wait_for(&format!("build {id} to finish"), limit, || {
            let out = self.wisp(&["builds"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = text.lines().find(|l| l.starts_with(&format!("#{id}\t")))?.to_string();
            let state = line.split('\t').nth(1)?.to_string();
            matches!(state.as_str(), "success" | "failure" | "aborted").then_some(state)
        })
    }

    /// The state of build `id` now, asked through the CLI (works with TLS too).
    pub fn build_state_now(&self, id: u64) -> String {
        let out = self.wisp(&["builds"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text.lines().find(|l| l.starts_with(&format!("#{id}\t"))).expect("the build is listed");
        line.split('\t').nth(1).unwrap_or("").to_string()
    }

    pub fn step_log(&self, id: u64, step: u32) -> Vec<u8> {
        let (status, body) = self.get(&format!("/api/builds/{id}/steps/{step}/log"));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        body
    }
}

pub fn spawn_logged(mut cmd: Command, dir: &Path, tag: &str) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let log = dir.join(format!("{tag}.log"));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// A minimal HTTP/1.0 client (the response is read to EOF).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    try_http(addr, method, path, &headers, body).unwrap()
}

/// One HTTP/1.0 request to `addr` with extra `headers`: the status and the body, or the I/O
/// error (for callers that must not panic, such as a thread that polls a server).
pub fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let head =
        format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok((status, resp[split + 4..].to_vec()))
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

/// True if `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit(") ").next().and_then(|r| r.chars().next());
            !matches!(state, Some('Z' | 'X'))
        }
        Err(_) => false,
    }
}

/// Panic with what to do unless the tests run as root (network namespaces, iptables, mounts,
/// PID namespaces): `scripts/test.sh` runs them so, as CI does.
pub fn require_root() {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "these tests need root (network namespaces, iptables, a tmpfs, a PID namespace); run them as root, \
         as scripts/test.sh does (it installs iptables and nginx too)"
    );
}

/// The version both binaries print: the package's, with the commit of this checkout when git
/// can tell it (the binaries are built from the tree the tests run in).
pub fn expected_version() -> String {
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(c) => format!("{} ({c})", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_string(),
    }
}
