//! kmock, an independent in-memory Kubernetes API emulator from PyPI (MIT), started per test on
//! 127.0.0.1 by `tests/kmock/server.py` (which says what it adds for tests). It is installed into
//! a venv under the target dir (`target/kmock-venv`) the first time a test needs it.

use super::TempDir;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// The kmock release the tests were written against.
pub const KMOCK_VERSION: &str = "0.8";

/// The venv with kmock, made when missing (a marker file says it was made completely).
pub fn kmock_python() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().to_path_buf();
    let venv = target.join("kmock-venv");
    let python = venv.join("bin/python");
    let marker = venv.join(format!(".kmock-{KMOCK_VERSION}"));
    if marker.exists() {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}; install python3 (3.11 or later)"));
        assert!(
            out.status.success(),
            "{what} failed: {}{}\ninstall python3 and python3-venv (apt-get install python3-venv) and \
             let pip reach PyPI, or run scripts/test.sh, which does",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv), "python3 -m venv");
    run(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            &format!("kmock=={KMOCK_VERSION}"),
        ]),
        "pip install kmock",
    );
    std::fs::write(&marker, "").unwrap();
    python
}

/// A running emulator, killed on drop.
pub struct Kmock {
    child: Child,
    /// Kept open: the launcher exits when it closes.
    _stdin: ChildStdin,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its stderr.
    pub log: PathBuf,
    _dir: TempDir,
}

impl Kmock {
    /// An emulator on a free port.
    pub fn start() -> Self {
        Self::start_on(None)
    }

    /// An emulator on `port` (a free one when `None`).
    pub fn start_on(port: Option<u16>) -> Self {
        let python = kmock_python();
        let dir = TempDir::new("kmock");
        let log = dir.path().join("kmock.log");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kmock/server.py");
        let mut cmd = Command::new(python);
        cmd.arg(script);
        if let Some(p) = port {
            cmd.arg(p.to_string());
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start tests/kmock/server.py");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Some(url) = line.trim().strip_prefix("URL ") else {
            let _ = child.kill();
            panic!(
                "kmock did not start (said {line:?}); its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        let addr = url.trim_start_matches("http://").trim_end_matches('/').to_string();
        Self { child, _stdin: stdin, addr, log, _dir: dir }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The port it serves on.
    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Kill it now (the port stops answering).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// One HTTP/1.0 request to the emulator's own API (not through the backend): status, body.
    pub fn http(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
        super::try_http(&self.addr, method, path, &[("Content-Type", content_type)], body).unwrap()
    }

    /// `http` with a JSON body, answering JSON; panics unless the status is 2xx.
    pub fn json(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &serde_json::Value,
    ) -> serde_json::Value {
        let (status, out) = self.http(method, path, content_type, body.to_string().as_bytes());
        assert!((200..300).contains(&status), "{method} {path}: {status} {}", String::from_utf8_lossy(&out));
        serde_json::from_slice(&out).unwrap()
    }

    /// Create an object of core/v1 `plural` in `ns`.
    pub fn create(&self, ns: &str, plural: &str, object: serde_json::Value) {
        self.json("POST", &format!("/api/v1/namespaces/{ns}/{plural}"), "application/json", &object);
    }

    /// Merge `status` into pod `name`'s status, as a kubelet would report it.
    pub fn set_status(&self, ns: &str, name: &str, status: serde_json::Value) {
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}/status");
        self.json("PATCH", &path, "application/merge-patch+json", &serde_json::json!({ "status": status }));
    }

    /// Delete pod `name` directly.
    pub fn delete_pod(&self, ns: &str, name: &str) {
        let (status, out) =
            self.http("DELETE", &format!("/api/v1/namespaces/{ns}/pods/{name}"), "application/json", b"");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&out));
    }

    /// Pod `name` as stored, if any.
    pub fn pod(&self, ns: &str, name: &str) -> Option<serde_json::Value> {
        let (status, out) =
            self.http("GET", &format!("/api/v1/namespaces/{ns}/pods/{name}"), "application/json", b"");
        (status == 200).then(|| serde_json::from_slice(&out).unwrap())
    }

    /// Store the log the emulator serves for `container` of pod `name`.
    pub fn set_log(&self, ns: &str, pod: &str, container: &str, text: &str) {
        let (status, _) =
            self.http("PUT", &format!("/_test/logs/{ns}/{pod}/{container}"), "text/plain", text.as_bytes());
        assert_eq!(status, 200);
    }

    /// Every request served so far: `{method, path, query, authorization}`.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        let (_, out) = self.http("GET", "/_test/requests", "application/json", b"");
        serde_json::from_slice(&out).unwrap()
    }

    /// The emulator's stderr, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Kmock {
    fn drop(&mut self) {
        self.stop();
    }
}
