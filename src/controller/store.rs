//! The controller's embedded store: nodes, builds and steps in SQLite (bundled, WAL mode).
//! Step logs are plain files beside it (`builds/ID/STEP.log`), written by the agent links.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A node as stored.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeRecord {
    /// Unique name.
    pub name: String,
    /// Labels, in the order given.
    pub labels: Vec<String>,
    /// How many builds it runs at once.
    pub executors: u32,
    /// True when its agent connects over WebSocket (shapes the printed command and descriptor).
    pub websocket: bool,
    /// Work dir to pass to the agent ("" for the agent's default).
    pub work_dir: String,
    /// Where the node came from: `static` (added by a user) or the name of the cloud that made it.
    pub origin: String,
}

pub use super::api::types::{BuildState, StepRecord, StepState};

/// Parameters as stored: one `NAME=VALUE` per line (names never hold `=` or a newline; values
/// may hold `=`, and a newline is escaped as `\\n`, a backslash as `\\\\`).
pub fn encode_params(params: &[(String, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{k}={}\n", v.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r")))
        .collect()
}

/// The inverse of [`encode_params`].
pub fn decode_params(s: &str) -> Vec<(String, String)> {
    s.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let mut out = String::with_capacity(v.len());
            let mut it = v.chars();
            while let Some(c) = it.next() {
                match (c, c == '\\') {
                    (_, true) => match it.next() {
                        Some('n') => out.push('\n'),
                        Some('r') => out.push('\r'),
                        Some(x) => out.push(x),
                        None => {}
                    },
                    (c, false) => out.push(c),
                }
            }
            (k.to_string(), out)
        })
        .collect()
}

/// A build as stored.
#[derive(Debug, Clone, Serialize)]
pub struct BuildRecord {
    /// Build number.
    pub id: u64,
    /// Pipeline name.
    pub name: String,
    /// State or result.
    pub state: BuildState,
    /// Node it ran on, once dispatched.
    pub node: Option<String>,
    /// Why it failed or was aborted, for people.
    pub message: String,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds, once running.
    pub started: Option<i64>,
    /// Unix seconds, once final.
    pub finished: Option<i64>,
    /// The pipeline as submitted.
    #[serde(skip)]
    pub yaml: String,
    /// Its parameters as given, `NAME=VALUE` lines (read for recovery only).
    #[serde(skip)]
    pub params: String,
}

/// A step row to add: its name and stage path; `skipped` when planned not to run.
pub struct NewStep<'a> {
    /// Display name.
    pub name: &'a str,
    /// Stage path ("" for none).
    pub stage: &'a str,
    /// Planned not to run (a `when:` that does not hold).
    pub skipped: bool,
}

/// How a step ended, as stored.
pub struct StepEnd<'a> {
    /// Success, failure or aborted.
    pub state: StepState,
    /// "exit code 3", "killed by signal 9"...
    pub exit: &'a str,
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Output bytes stored.
    pub bytes: u64,
}

/// The schema this code writes (kept in the `meta` table under `schema`).
pub const SCHEMA_VERSION: u32 = 5;

/// Store errors carry the SQLite message.
pub type Result<T> = std::result::Result<T, rusqlite::Error>;

/// The open database.
pub struct Store {
    db: Connection,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Open (or create) `DIR/wisp.db`.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = Connection::open(dir.join("wisp.db"))?;
        // The controller is the database's only user: it holds the lock for as long as it runs
        // (no lock calls per transaction, no shared-memory index), and a second controller on
        // the same data dir is refused at once instead of corrupting the first one's state.
        db.busy_timeout(std::time::Duration::from_millis(200))?;
        db.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch("BEGIN EXCLUSIVE; COMMIT;")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS nodes (
                name TEXT PRIMARY KEY, labels TEXT NOT NULL, executors INTEGER NOT NULL,
                websocket INTEGER NOT NULL, work_dir TEXT NOT NULL, created INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS builds (
                id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, yaml TEXT NOT NULL,
                state TEXT NOT NULL, node TEXT, message TEXT NOT NULL DEFAULT '',
                created INTEGER NOT NULL, started INTEGER, finished INTEGER);
             CREATE TABLE IF NOT EXISTS steps (
                build INTEGER NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL,
                state TEXT NOT NULL, exit TEXT NOT NULL DEFAULT '', code INTEGER,
                bytes INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (build, idx));
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS clouds (name TEXT PRIMARY KEY, file TEXT NOT NULL, applied INTEGER NOT NULL);
             -- A node's builds, newest first (its web page), without a scan of every build.
             CREATE INDEX IF NOT EXISTS builds_by_node ON builds (node, id);",
        )?;
        let version: Option<u32> = db
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| r.get::<_, String>(0))
            .optional()?
            .and_then(|v| v.parse().ok());
        match version {
            // A store made before the schema was versioned (version 1): nodes had no origin.
            // Version 3 added the clouds table (created above when missing), version 4 the times
            // of each step, version 5 stages: a build's parameters, and each step's stage, node and
            // attempt.
            None | Some(1) | Some(2) | Some(3) | Some(4) => {
                let has = |table: &str, column: &str| -> Result<bool> {
                    db.prepare(&format!(
                        "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
                    ))?
                    .exists([])
                };
                if !has("nodes", "origin")? {
                    db.execute_batch("ALTER TABLE nodes ADD COLUMN origin TEXT NOT NULL DEFAULT 'static'")?;
                }
                if !has("steps", "started")? {
                    db.execute_batch("ALTER TABLE steps ADD COLUMN started INTEGER; ALTER TABLE steps ADD COLUMN finished INTEGER;")?;
                }
                if !has("steps", "stage")? {
                    db.execute_batch(
                        "ALTER TABLE builds ADD COLUMN params TEXT NOT NULL DEFAULT '';
                         ALTER TABLE steps ADD COLUMN stage TEXT NOT NULL DEFAULT '';
                         ALTER TABLE steps ADD COLUMN node TEXT;
                         ALTER TABLE steps ADD COLUMN origin INTEGER;
                         ALTER TABLE steps ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
                         ALTER TABLE steps ADD COLUMN rerun INTEGER NOT NULL DEFAULT 1;",
                    )?;
                }
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?1)",
                    [SCHEMA_VERSION.to_string()],
                )?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(v) => {
                return Err(rusqlite::Error::InvalidParameterName(format!(
                    "the store has schema version {v}, newer than this wisp knows ({SCHEMA_VERSION}): \
                     run a newer wisp on this data dir"
                )))
            }
        }
        Ok(Self { db })
    }

    /// Add a node; fails if the name is taken.
    pub fn add_node(&self, n: &NodeRecord) -> Result<()> {
        // Cached: a cloud adds (and removes) a node for every pod.
        self.db
            .prepare_cached(
                "INSERT INTO nodes (name, labels, executors, websocket, work_dir, created, origin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                n.name,
                n.labels.join(" "),
                n.executors,
                n.websocket,
                n.work_dir,
                now(),
                n.origin
            ])?;
        Ok(())
    }

    /// Keep the file each cloud was applied from, by cloud name (one transaction).
    pub fn put_clouds(&mut self, rows: &[(String, String)]) -> Result<()> {
        let tx = self.db.transaction()?;
        for (name, file) in rows {
            tx.execute(
                "INSERT INTO clouds (name, file, applied) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET file = excluded.file, applied = excluded.applied",
                params![name, file, now()],
            )?;
        }
        tx.commit()
    }

    /// Every cloud's name and the file it was applied from, in the order they were first applied.
    pub fn clouds(&self) -> Result<Vec<(String, String)>> {
        let mut q = self.db.prepare("SELECT name, file FROM clouds ORDER BY rowid")?;
        let rows = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// Forget a cloud; true if it existed.
    pub fn remove_cloud(&self, name: &str) -> Result<bool> {
        Ok(self.db.execute("DELETE FROM clouds WHERE name = ?1", [name])? > 0)
    }

    /// Delete a node; true if it existed.
    pub fn remove_node(&self, name: &str) -> Result<bool> {
        Ok(self.db.prepare_cached("DELETE FROM nodes WHERE name = ?1")?.execute([name])? > 0)
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let mut q = self.db.prepare(
            "SELECT name, labels, executors, websocket, work_dir, origin FROM nodes ORDER BY name",
        )?;
        let rows = q.query_map([], |r| {
            let labels: String = r.get(1)?;
            Ok(NodeRecord {
                name: r.get(0)?,
                labels: labels.split_whitespace().map(str::to_string).collect(),
                executors: r.get(2)?,
                websocket: r.get(3)?,
                work_dir: r.get(4)?,
                origin: r.get(5)?,
            })
        })?;
        rows.collect()
    }

    /// Record a new queued build with its parameters (`NAME=VALUE` lines) and its planned steps;
    /// returns its number.
    pub fn insert_build(&self, name: &str, yaml: &str, params: &str, steps: &[NewStep<'_>]) -> Result<u64> {
        let tx = self.db.unchecked_transaction()?;
        tx.prepare_cached(
            "INSERT INTO builds (name, yaml, state, created, params) VALUES (?1, ?2, 'queued', ?3, ?4)",
        )?
        .execute(params![name, yaml, now(), params])?;
        let id = tx.last_insert_rowid() as u64;
        {
            let mut q = tx.prepare_cached(
                "INSERT INTO steps (build, idx, name, state, stage) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (i, s) in steps.iter().enumerate() {
                let state = if s.skipped { "skipped" } else { "pending" };
                q.execute(params![id, i as u32 + 1, s.name, state, s.stage])?;
            }
        }
        tx.commit()?;
        Ok(id)
    }

    /// Add step `idx` to a build: another attempt (`attempt`, `rerun`) of planned step `origin`.
    pub fn add_step(
        &self,
        build: u64,
        idx: u32,
        s: &NewStep<'_>,
        origin: u32,
        attempt: u32,
        rerun: u32,
    ) -> Result<()> {
        self.db
            .prepare_cached(
                "INSERT OR IGNORE INTO steps (build, idx, name, state, stage, origin, attempt, rerun)
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6, ?7)",
            )?
            .execute(params![build, idx, s.name, s.stage, origin, attempt, rerun])?;
        Ok(())
    }

    /// Mark steps skipped (a post block whose condition did not hold).
    pub fn skip_steps(&self, build: u64, idx: &[u32]) -> Result<()> {
        let tx = self.db.unchecked_transaction()?;
        for i in idx {
            tx.prepare_cached(
                "UPDATE steps SET state = 'skipped' WHERE build = ?1 AND idx = ?2 AND state = 'pending'",
            )?
            .execute(params![build, i])?;
        }
        tx.commit()
    }

    /// Mark a step running on `node`; with `first`, also the build running (its first step), in
    /// one transaction.
    pub fn start_step(&self, build: u64, idx: u32, node: &str, first: bool) -> Result<()> {
        let tx = self.db.unchecked_transaction()?;
        if first {
            tx.prepare_cached("UPDATE builds SET state = 'running', node = ?2, started = ?3 WHERE id = ?1")?
                .execute(params![build, node, now()])?;
        }
        tx.prepare_cached(
            "UPDATE steps SET state = 'running', exit = '', code = NULL, bytes = 0, started = ?3, finished = NULL,
             node = ?4 WHERE build = ?1 AND idx = ?2",
        )?
        .execute(params![build, idx, now(), node])?;
        tx.commit()
    }

    /// Give a build its final state.
    pub fn finish_build(&self, id: u64, state: BuildState, message: &str) -> Result<()> {
        let tx = self.db.unchecked_transaction()?;
        Self::finish_in(&tx, id, state, message)?;
        tx.commit()
    }

    fn finish_in(db: &Connection, id: u64, state: BuildState, message: &str) -> Result<()> {
        db.prepare_cached("UPDATE builds SET state = ?2, message = ?3, finished = ?4 WHERE id = ?1")?
            .execute(params![id, state.as_str(), message, now()])?;
        // Steps that never ran are marked so, for people reading the build.
        db.prepare_cached("UPDATE steps SET state = 'skipped' WHERE build = ?1 AND state = 'pending'")?
            .execute([id])?;
        Ok(())
    }

    /// Update a step's state, exit description, exit code and stored byte count; with `finish`,
    /// also give the build its final state (its last step), in one transaction.
    pub fn end_step(
        &self,
        build: u64,
        idx: u32,
        end: &StepEnd<'_>,
        finish: Option<(BuildState, &str)>,
    ) -> Result<()> {
        let tx = self.db.unchecked_transaction()?;
        tx.prepare_cached(
            "UPDATE steps SET state = ?3, exit = ?4, code = ?5, bytes = ?6, finished = ?7 WHERE build = ?1 AND idx = ?2",
        )?
        .execute(params![build, idx, end.state.as_str(), end.exit, end.code, end.bytes, now()])?;
        if let Some((state, message)) = finish {
            Self::finish_in(&tx, build, state, message)?;
        }
        tx.commit()
    }

    fn build_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BuildRecord> {
        let state: String = r.get(3)?;
        Ok(BuildRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            yaml: r.get(2)?,
            state: BuildState::parse(&state),
            node: r.get(4)?,
            message: r.get(5)?,
            created: r.get(6)?,
            started: r.get(7)?,
            finished: r.get(8)?,
            params: r.get(9).unwrap_or_default(),
        })
    }

    /// One build.
    pub fn build(&self, id: u64) -> Result<Option<BuildRecord>> {
        self.db
            .prepare_cached(
                "SELECT id, name, yaml, state, node, message, created, started, finished, params FROM builds WHERE id = ?1",
            )?
            .query_row([id], Self::build_row)
            .optional()
    }

    /// One build and its steps.
    pub fn build_with_steps(&self, id: u64) -> Result<(Option<BuildRecord>, Vec<StepRecord>)> {
        Ok((self.build(id)?, self.steps(id)?))
    }

    /// The newest `limit` builds, newest first.
    pub fn builds(&self, limit: u32) -> Result<Vec<BuildRecord>> {
        let mut q = self.db.prepare(
            "SELECT id, name, yaml, state, node, message, created, started, finished FROM builds ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = q.query_map([limit], Self::build_row)?;
        rows.collect()
    }

    /// A page of final builds (on `node`, when given), newest first, below build `before` when
    /// given; without their pipelines' text (`yaml` is empty).
    pub fn finished_builds(
        &self,
        node: Option<&str>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<BuildRecord>> {
        // One statement per case: `(?1 IS NULL OR node = ?1)` would keep SQLite from the index
        // on (node, id) and from the rowid range.
        let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
        let cols = "SELECT id, name, '', state, node, message, created, started, finished FROM builds";
        let final_only = "state NOT IN ('queued', 'running')";
        match node {
            Some(node) => {
                let sql =
                    format!("{cols} WHERE node = ?1 AND id < ?2 AND {final_only} ORDER BY id DESC LIMIT ?3");
                let mut q = self.db.prepare_cached(&sql)?;
                let rows = q.query_map(params![node, before, limit], Self::build_row)?;
                rows.collect()
            }
            None => {
                let sql = format!("{cols} WHERE id < ?1 AND {final_only} ORDER BY id DESC LIMIT ?2");
                let mut q = self.db.prepare_cached(&sql)?;
                let rows = q.query_map(params![before, limit], Self::build_row)?;
                rows.collect()
            }
        }
    }

    /// The builds numbered `ids` that exist, without their pipelines' text, in no set order.
    pub fn builds_by_id(&self, ids: &[u64]) -> Result<Vec<BuildRecord>> {
        let mut q = self.db.prepare_cached(
            "SELECT id, name, '', state, node, message, created, started, finished FROM builds WHERE id = ?1",
        )?;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids.iter().filter(|&&id| id <= i64::MAX as u64) {
            if let Some(b) = q.query_row([id as i64], Self::build_row).optional()? {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Builds not yet final, oldest first (for recovery at start).
    pub fn unfinished_builds(&self) -> Result<Vec<BuildRecord>> {
        let mut q = self.db.prepare(
            "SELECT id, name, yaml, state, node, message, created, started, finished, params FROM builds
             WHERE state IN ('queued', 'running') ORDER BY id",
        )?;
        let rows = q.query_map([], Self::build_row)?;
        rows.collect()
    }

    /// A build's steps in order.
    pub fn steps(&self, build: u64) -> Result<Vec<StepRecord>> {
        let mut q = self.db.prepare_cached(
            "SELECT idx, name, state, exit, code, bytes, started, finished, stage, node, origin, attempt, rerun
             FROM steps WHERE build = ?1 ORDER BY idx",
        )?;
        let rows = q.query_map([build], |r| {
            let state: String = r.get(2)?;
            Ok(StepRecord {
                index: r.get(0)?,
                name: r.get(1)?,
                state: StepState::parse(&state),
                exit: r.get(3)?,
                code: r.get(4)?,
                bytes: r.get(5)?,
                started: r.get(6)?,
                finished: r.get(7)?,
                stage: r.get(8)?,
                node: r.get(9)?,
                origin: r.get(10)?,
                attempt: r.get(11)?,
                rerun: r.get(12)?,
            })
        })?;
        rows.collect()
    }
}

/// True if `e` says the disk (or the file system's quota) is full.
pub fn is_disk_full(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull))
        || matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_IOERR_WRITE)
}

type Job = Box<dyn FnOnce(&mut Store) + Send>;

/// Queries and writes waiting for the store thread.
const STORE_QUEUE: usize = 1024;

/// The store on a thread of its own: every query and write runs there, so a slow or full disk
/// stalls only what waits for the store, never pings, dispatch or other links on the executor.
#[derive(Clone)]
pub struct StoreThread {
    tx: smol::channel::Sender<Job>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl StoreThread {
    /// Move `store` to a new thread.
    pub fn spawn(mut store: Store) -> std::io::Result<Self> {
        let (tx, rx) = smol::channel::bounded::<Job>(STORE_QUEUE);
        let thread = std::thread::Builder::new().name("wisp-store".into()).spawn(move || {
            while let Ok(job) = rx.recv_blocking() {
                job(&mut store);
            }
        })?;
        Ok(Self { tx, thread: Arc::new(Mutex::new(Some(thread))) })
    }

    /// Run `f` on the store thread and wait for its answer. Once the store is closed (the
    /// controller stopped) the call never completes: a task of a stopped controller just stops.
    pub async fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Store) -> T + Send + 'static) -> T {
        let (tx, rx) = smol::channel::bounded(1);
        let job: Job = Box::new(move |s| {
            let _ = tx.try_send(f(s));
        });
        if self.tx.send(job).await.is_err() {
            return std::future::pending().await;
        }
        match rx.recv().await {
            Ok(v) => v,
            Err(_) => std::future::pending().await,
        }
    }

    /// Stop the thread once the calls already queued have run; the store (and its lock on the
    /// data dir) is released then.
    pub fn close(&self) {
        self.tx.close();
    }

    /// [`StoreThread::close`] and wait until the store is released.
    pub fn close_and_wait(&self) {
        self.tx.close();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store of schema 3 (no step times) opens as schema 4: its steps have no times, new
    /// ones get them.
    #[test]
    fn a_schema_3_store_gains_step_times() {
        let dir = std::env::temp_dir().join(format!("wisp-store-v3-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        {
            let db = Connection::open(dir.join("wisp.db")).unwrap();
            db.execute_batch(
                "CREATE TABLE nodes (name TEXT PRIMARY KEY, labels TEXT NOT NULL, executors INTEGER NOT NULL,
                    websocket INTEGER NOT NULL, work_dir TEXT NOT NULL, created INTEGER NOT NULL,
                    origin TEXT NOT NULL DEFAULT 'static');
                 CREATE TABLE builds (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, yaml TEXT NOT NULL,
                    state TEXT NOT NULL, node TEXT, message TEXT NOT NULL DEFAULT '', created INTEGER NOT NULL,
                    started INTEGER, finished INTEGER);
                 CREATE TABLE steps (build INTEGER NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL,
                    state TEXT NOT NULL, exit TEXT NOT NULL DEFAULT '', code INTEGER,
                    bytes INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (build, idx));
                 CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 INSERT INTO meta VALUES ('schema', '3');
                 INSERT INTO builds (id, name, yaml, state, created) VALUES (1, 'old', 'y', 'success', 1);
                 INSERT INTO steps (build, idx, name, state, exit, code, bytes) VALUES (1, 1, 'a', 'success', 'exit code 0', 0, 3);",
            )
            .unwrap();
        }
        let s = Store::open(&dir).unwrap();
        let old = s.steps(1).unwrap();
        assert_eq!((old[0].started, old[0].finished, old[0].bytes), (None, None, 3));
        let id = s.insert_build("new", "y", "", &[NewStep { name: "b", stage: "", skipped: false }]).unwrap();
        s.start_step(id, 1, "n", true).unwrap();
        let running = &s.steps(id).unwrap()[0];
        assert!(running.started.is_some() && running.finished.is_none());
        let end = StepEnd { state: StepState::Success, exit: "exit code 0", code: Some(0), bytes: 1 };
        s.end_step(id, 1, &end, None).unwrap();
        let done = &s.steps(id).unwrap()[0];
        assert!(done.finished.unwrap() >= done.started.unwrap());
        let v: String =
            s.db.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION.to_string());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nodes_and_builds_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("wisp-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        {
            let s = Store::open(&dir).unwrap();
            let n = NodeRecord {
                name: "n1".into(),
                labels: vec!["linux".into(), "x86_64".into()],
                executors: 2,
                websocket: true,
                work_dir: String::new(),
                origin: "static".into(),
            };
            s.add_node(&n).unwrap();
            assert!(s.add_node(&n).is_err(), "duplicate names are refused");
            let steps = [
                NewStep { name: "a", stage: "", skipped: false },
                NewStep { name: "b", stage: "", skipped: false },
            ];
            let id = s.insert_build("hello", "name: hello", "", &steps).unwrap();
            s.start_step(id, 1, "n1", true).unwrap();
            assert_eq!(s.build(id).unwrap().unwrap().state, BuildState::Running);
            let end = StepEnd { state: StepState::Success, exit: "exit code 0", code: Some(0), bytes: 12 };
            s.end_step(id, 1, &end, Some((BuildState::Success, ""))).unwrap();
        }
        let s = Store::open(&dir).unwrap();
        let second = Store::open(&dir).err().and_then(|e| e.sqlite_error_code());
        assert_eq!(second, Some(rusqlite::ErrorCode::DatabaseBusy), "one owner at a time");
        assert_eq!(s.nodes().unwrap()[0].labels, vec!["linux", "x86_64"]);
        let b = s.builds(10).unwrap();
        assert_eq!((b.len(), b[0].state, b[0].node.as_deref()), (1, BuildState::Success, Some("n1")));
        let steps = s.steps(b[0].id).unwrap();
        assert_eq!((steps[0].bytes, steps[1].state), (12, StepState::Skipped));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
