//! A real Kafka-API broker for the Kafka transport's tests: tansu 0.6 (crates.io, Apache-2.0),
//! built once per machine by `scripts/tansu.sh` (no Apache Kafka installs here), started per test
//! on 127.0.0.1 with its sqlite storage engine in the test's own directory, so its records survive
//! a broker restart. The independent client is kafka-python (PyPI) in a venv under the target
//! dir, driven by `tests/kafka/records.py`.
//!
//! What tansu 0.6 does differently from Kafka, found while writing these tests: a fetch that
//! waits for records is answered only when its whole wait is over, never early when a record
//! arrives (the transport keeps its waits short while records flow); its memory engine reports a
//! high watermark one batch behind (the fetches of a client that reads up to it come back empty),
//! which is why the tests use the sqlite engine; and it answers a v12 fetch with a tagged field
//! only v16 defines (the client stops at v11).

use super::{free_port, wait_for, TempDir};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The kafka-python release the records script was written against.
pub const KAFKA_PYTHON: &str = "3.0.12";

/// The tansu binary (built by `scripts/tansu.sh` when this machine has none; that can take 10 to
/// 30 minutes once).
pub fn tansu() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/tansu.sh");
        let out = Command::new("bash").arg(script).stderr(Stdio::inherit()).output().expect("bash");
        assert!(out.status.success(), "scripts/tansu.sh failed: see its output above");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// A broker process on a fixed port, with its storage in a directory of its own; killed on drop.
pub struct Broker {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its storage and log.
    pub dir: TempDir,
    starts: u32,
}

impl Broker {
    /// A broker on a free port, ready for clients.
    pub fn start() -> Broker {
        let mut b = Broker { child: None, port: free_port(), dir: TempDir::new("tansu"), starts: 0 };
        b.launch();
        b
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Start it (again) on the same port and storage; waits until it accepts connections.
    pub fn launch(&mut self) {
        self.starts += 1;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.path().join(format!("broker-{}.log", self.starts))).unwrap();
        let child = Command::new(tansu())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let addr = self.addr();
        wait_for("the broker to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&addr).ok().map(|_| ())
        });
    }

    /// SIGKILL it, leaving it down until [`Broker::launch`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// What it logged, all starts.
    pub fn log_text(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("broker-{i}.log"))).unwrap_or_default()
            })
            .collect()
    }

    /// Run `tests/kafka/records.py` against this broker.
    pub fn records(&self, args: &[&str]) -> Output {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kafka/records.py");
        let out = Command::new(kafka_python()).arg(script).arg(self.addr()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "records.py {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The venv with kafka-python, made when missing (a marker file says it was made completely).
pub fn kafka_python() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().to_path_buf();
    let venv = target.join("kafka-python-venv");
    let python = venv.join("bin/python");
    let marker = venv.join(format!(".kafka-python-{KAFKA_PYTHON}"));
    if marker.exists() {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}; install python3"));
        assert!(
            out.status.success(),
            "{what} failed: {}{}\ninstall python3-venv and let pip reach PyPI, or run scripts/test.sh, which does",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv), "python3 -m venv");
    let pkg = format!("kafka-python=={KAFKA_PYTHON}");
    run(
        Command::new(&python).args(["-m", "pip", "install", "-q", "--disable-pip-version-check", &pkg]),
        "pip install kafka-python",
    );
    std::fs::write(&marker, "").unwrap();
    python
}
