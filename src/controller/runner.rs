//! Runs one build step by step on its node: starts each step through the node's session (whichever
//! link it has), waits for the step's end through its [`StepHandle`], survives the agent's absence
//! for up to the grace, carries a cancel to the agent, and writes each step's end to the store.

use super::archives;
pub use super::build::LiveBuild;
use super::pipeline;
use super::pipeline::plan::{Block, Exec, PostSteps};
use super::pipeline::stages::RetryOn;
use super::pipeline::Kind;
use super::session::Out;
use super::steps::{StepEvent, StepHandle};
use super::store::{self, BuildState, StepRecord, StepState};
use super::Controller;
use crate::proto::{ExitStatus, Frame};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a cancelled step's Exit may take before the build is ended without it.
pub const CANCEL_WAIT: Duration = Duration::from_secs(15);
/// Default time a running build waits for its disconnected agent before failing with "agent lost".
pub const AGENT_GRACE: Duration = Duration::from_secs(300);

/// How a step ended, as the runner learns it.
#[derive(Debug)]
pub enum StepEnd {
    /// The agent reported an exit.
    Exit(ExitStatus, String),
    /// The step could not run or its agent was lost.
    Lost(String),
}

/// The state, exit description and code a step's end is stored with.
pub fn step_result(end: &StepEnd) -> (StepState, String, Option<i32>) {
    let code_of = |st: ExitStatus| match st {
        ExitStatus::Code(c) => Some(c),
        _ => None,
    };
    match end {
        StepEnd::Exit(ExitStatus::Code(0), _) => (StepState::Success, "exit code 0".to_string(), Some(0)),
        StepEnd::Exit(ExitStatus::Cancelled, _) => (StepState::Aborted, "cancelled".to_string(), None),
        StepEnd::Exit(st, m) if m.is_empty() => (StepState::Failure, st.to_string(), code_of(*st)),
        StepEnd::Exit(st, m) => (StepState::Failure, format!("{st}: {m}"), code_of(*st)),
        StepEnd::Lost(m) => (StepState::Failure, m.clone(), None),
    }
}

/// What a build step, block or branch came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything in it succeeded.
    Success,
    /// Something failed; `lost` when its agent went away (a node gone, a pod failed or deleted,
    /// no contact within the grace), which `retry: {on: [agent-lost]}` retries.
    Failure {
        /// For people.
        message: String,
        /// The agent was lost.
        lost: bool,
    },
    /// Cancelled.
    Aborted(String),
}

impl Outcome {
    fn failed(message: String) -> Self {
        Outcome::Failure { message, lost: false }
    }
}

/// What stops a step besides its own end: a cancel of the build (counted from `base`, so a post
/// block after a cancel runs until the next one) or a failing sibling of a `failFast` group.
#[derive(Clone, Default)]
pub struct Stop {
    base: u32,
    flags: Vec<Arc<std::sync::atomic::AtomicBool>>,
}

impl Stop {
    /// Whether the build was cancelled (after `base`) or a fail-fast group was stopped.
    pub fn hit(&self, build: &LiveBuild) -> bool {
        build.cancels.load(Ordering::SeqCst) > self.base
            || self.flags.iter().any(|f| f.load(Ordering::SeqCst))
    }

    fn with_flag(&self, f: Arc<std::sync::atomic::AtomicBool>) -> Self {
        let mut s = self.clone();
        s.flags.push(f);
        s
    }
}

/// What the store says of a build that was running when the controller stopped: each step's
/// row, and a handle for each step that was running (opened before any agent reconnects).
#[derive(Default)]
pub struct Memo {
    /// Rows by step number.
    pub rows: HashMap<u32, StepRecord>,
    /// Open handles of the steps that were running, by step number.
    pub handles: HashMap<u32, StepHandle>,
}

/// One build's run.
struct Run {
    ctl: Arc<Controller>,
    build: Arc<LiveBuild>,
    workspace: String,
    /// Unit 0's node while held (from its first use to the build's end).
    main: smol::lock::Mutex<Option<String>>,
    /// The next number for another attempt of a step.
    next: std::sync::atomic::AtomicU32,
    memo: Mutex<Memo>,
    /// The build is not marked running yet (its first step marks it).
    unstarted: std::sync::atomic::AtomicBool,
}

type Boxed<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>>;

/// Run a build from its plan, to its end: units reserved as its stages need them, parallel
/// branches at once, retries and post steps as the plan says. `memo` is what the store holds of
/// a build picked up after a restart (steps that ended are not run again; running ones are
/// waited for).
pub async fn run_build(ctl: Arc<Controller>, build: Arc<LiveBuild>, memo: Memo) {
    let id = build.id;
    let planned = build.plan.steps.len() as u32;
    let next = memo.rows.keys().copied().max().unwrap_or(0).max(planned) + 1;
    let started = memo.rows.values().any(|r| r.state != StepState::Pending && r.state != StepState::Skipped);
    // Unit 0's node, when a step of it had started before a restart.
    let main_node = memo
        .rows
        .values()
        .filter(|r| build.plan.step(r.origin.unwrap_or(r.index)).is_some_and(|p| p.unit == 0))
        .find_map(|r| r.node.clone());
    let run = Arc::new(Run {
        workspace: pipeline::workspace_name(&build.pipeline.name),
        main: smol::lock::Mutex::new(None),
        next: next.into(),
        memo: Mutex::new(memo),
        unstarted: (!started).into(),
        ctl: ctl.clone(),
        build: build.clone(),
    });
    if let Some(node) = main_node {
        if ctl.reserve_known(&node) {
            *run.main.lock().await = Some(node);
        } else {
            log::warn!("build {id}: its node {node} no longer exists");
        }
    }
    let outcome = run.clone().exec(build.plan.root.clone(), Stop::default()).await;
    if let Some(node) = run.main.lock().await.take() {
        ctl.release_unit(&build, &node, outcome != Outcome::Success);
    }
    let (state, message) = match outcome {
        Outcome::Success => (BuildState::Success, String::new()),
        Outcome::Failure { message, .. } if build.cancelled.load(Ordering::SeqCst) => {
            (BuildState::Aborted, message)
        }
        Outcome::Failure { message, .. } => (BuildState::Failure, message),
        Outcome::Aborted(m) => (BuildState::Aborted, m),
    };
    log::info!("build {id}: finished {} {message}", state.as_str());
    // Stashes live as long as their build.
    let stashes = archives::stash_dir(&ctl, id);
    let _ = smol::unblock(move || std::fs::remove_dir_all(stashes)).await;
    let (b, steps) = ctl
        .store_must(&build, move |s| {
            s.finish_build(id, state, &message)?;
            s.build_with_steps(id)
        })
        .await;
    if let Some(b) = b {
        ctl.count_final(&b);
        build.set_final(b, steps);
    }
    ctl.build_ended(&build);
}

impl Run {
    fn exec(self: Arc<Self>, e: Exec, stop: Stop) -> Boxed<'static> {
        Box::pin(async move {
            match e {
                Exec::Seq(list) => {
                    for x in list {
                        if stop.hit(&self.build) {
                            return Outcome::Aborted("cancelled".into());
                        }
                        let r = self.clone().exec(x, stop.clone()).await;
                        if r != Outcome::Success {
                            return r;
                        }
                    }
                    Outcome::Success
                }
                Exec::Par { branches, fail_fast } => {
                    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let inner = if fail_fast { stop.with_flag(flag.clone()) } else { stop.clone() };
                    let tasks: Vec<_> = branches
                        .into_iter()
                        .map(|b| {
                            let (me, inner, flag) = (self.clone(), inner.clone(), flag.clone());
                            self.ctl.ex.spawn(async move {
                                let r = me.clone().exec(b, inner).await;
                                if fail_fast
                                    && matches!(r, Outcome::Failure { .. })
                                    && !flag.swap(true, Ordering::SeqCst)
                                {
                                    log::info!(
                                        "build {}: a branch failed; failFast stops the others",
                                        me.build.id
                                    );
                                    me.build.changed.notify(usize::MAX);
                                }
                                r
                            })
                        })
                        .collect();
                    let mut results = Vec::with_capacity(tasks.len());
                    for t in tasks {
                        results.push(t.await);
                    }
                    // The first failure wins; then a cancel; else success.
                    if let Some(f) = results.iter().find(|r| matches!(r, Outcome::Failure { .. })) {
                        return f.clone();
                    }
                    results.into_iter().find(|r| matches!(r, Outcome::Aborted(_))).unwrap_or(Outcome::Success)
                }
                Exec::Block(b) => self.block(&b, &stop).await,
                Exec::Post { body, post } => {
                    let r = self.clone().exec(*body, stop.clone()).await;
                    let node = match self.unit_node(0, &stop).await {
                        Ok(n) => n,
                        Err(e) => return worst(r, e),
                    };
                    let p = self.post(&post, 1, &r, &node, &stop).await;
                    worst(r, p)
                }
            }
        })
    }

    /// Unit 0's node, reserving it at its first use.
    async fn unit_node(&self, unit: u32, stop: &Stop) -> Result<String, Outcome> {
        let mut main = self.main.lock().await;
        if let Some(n) = main.as_ref().filter(|n| self.ctl.node(n).is_some()) {
            return Ok(n.clone());
        }
        let node = self.reserve(unit, stop).await?;
        *main = Some(node.clone());
        Ok(node)
    }

    /// Queue unit `unit` and wait for its node (or for a cancel).
    async fn reserve(&self, unit: u32, stop: &Stop) -> Result<String, Outcome> {
        let u = &self.build.plan.units[unit as usize];
        let id = self.build.id;
        let rx = self.ctl.request_unit(&self.build, unit, u.label_expr.clone(), u.kubernetes.clone());
        loop {
            let listener = self.build.changed.listen();
            // (When dispatch gave it a node meanwhile, the node arrives below and the attempt
            // stops at its first step.)
            if stop.hit(&self.build) && self.ctl.withdraw_unit(id, unit) {
                return Err(Outcome::Aborted("cancelled while waiting for an agent".into()));
            }
            let got = smol::future::or(async { Some(rx.recv().await) }, async {
                listener.await;
                None
            })
            .await;
            match got {
                Some(Ok(Ok(node))) => return Ok(node),
                Some(Ok(Err(message))) => return Err(Outcome::failed(message)),
                Some(Err(_)) => return Err(Outcome::Aborted("cancelled while waiting for an agent".into())),
                None => {}
            }
        }
    }

    /// A block, with its `retry:`.
    async fn block(self: &Arc<Self>, b: &Block, stop: &Stop) -> Outcome {
        if b.skipped {
            return Outcome::Success;
        }
        let id = self.build.id;
        for attempt in 1..=b.retry.count {
            if stop.hit(&self.build) {
                return Outcome::Aborted("cancelled".into());
            }
            let r = self.attempt(b, attempt, stop).await;
            match &r {
                Outcome::Failure { message, lost }
                    if attempt < b.retry.count && (*lost || b.retry.on == RetryOn::Failure) =>
                {
                    log::info!(
                        "build {id}: stage {:?} failed ({message}); attempt {} of {} follows",
                        b.stage,
                        attempt + 1,
                        b.retry.count
                    );
                }
                _ => return r,
            }
        }
        Outcome::failed("no attempt left".into())
    }

    /// One attempt of a block: its unit reserved (or unit 0's node), its steps in order, its post.
    async fn attempt(self: &Arc<Self>, b: &Block, attempt: u32, stop: &Stop) -> Outcome {
        let mut nums = Vec::with_capacity(b.steps.len());
        for &p in &b.steps {
            nums.push((p, self.number(p, attempt, 1).await));
        }
        // A node a step of this attempt had started on before a restart.
        let known = {
            let memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
            nums.iter().find_map(|(_, n)| memo.rows.get(n).and_then(|r| r.node.clone()))
        };
        let own = b.unit != 0;
        let node = if !own {
            match self.unit_node(0, stop).await {
                Ok(n) => n,
                Err(e) => return e,
            }
        } else if let Some(n) = known {
            if !self.ctl.reserve_known(&n) {
                return Outcome::Failure { message: format!("node {n} no longer exists"), lost: true };
            }
            n
        } else {
            match self.reserve(b.unit, stop).await {
                Ok(n) => n,
                Err(e) => return e,
            }
        };
        let mut r = Outcome::Success;
        for (p, n) in nums {
            if stop.hit(&self.build) {
                r = Outcome::Aborted("cancelled".into());
                break;
            }
            r = self.step(p, n, attempt, &node, stop).await;
            if r != Outcome::Success {
                break;
            }
        }
        let lost = matches!(r, Outcome::Failure { lost: true, .. });
        if !lost {
            let post = self.post(&b.post, attempt, &r, &node, stop).await;
            r = worst(r, post);
        }
        if own {
            self.ctl.release_unit(&self.build, &node, r != Outcome::Success);
        } else if lost {
            // Unit 0's node is lost: the next use reserves another.
            let mut main = self.main.lock().await;
            if main.as_deref() == Some(node.as_str()) {
                main.take();
                self.ctl.release_unit(&self.build, &node, true);
            }
        }
        r
    }

    /// Post steps by how `r` came out: `always` first, then the block of the result.
    async fn post(
        self: &Arc<Self>,
        post: &PostSteps,
        attempt: u32,
        r: &Outcome,
        node: &str,
        stop: &Stop,
    ) -> Outcome {
        let list = match r {
            Outcome::Success => &post.success,
            Outcome::Failure { .. } => &post.failure,
            Outcome::Aborted(_) => &post.aborted,
        };
        if post.always.is_empty() && list.is_empty() {
            return Outcome::Success;
        }
        // After a cancel, post steps run until the next cancel.
        let stop = match r {
            Outcome::Aborted(_) => {
                Stop { base: self.build.cancels.load(Ordering::SeqCst), ..Stop::default() }
            }
            _ => stop.clone(),
        };
        for &p in post.always.iter().chain(list) {
            let n = self.number(p, attempt, 1).await;
            let s = self.step(p, n, attempt, node, &stop).await;
            if s != Outcome::Success {
                return s;
            }
        }
        Outcome::Success
    }

    /// The number of planned step `p`'s attempt `attempt` (the stage's) and `rerun` (the
    /// step's own): `p` itself for the first, else a new step added to the build (or the one
    /// added before a restart).
    async fn number(&self, p: u32, attempt: u32, rerun: u32) -> u32 {
        if attempt == 1 && rerun == 1 {
            return p;
        }
        {
            let memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) =
                memo.rows.values().find(|r| r.origin == Some(p) && r.attempt == attempt && r.rerun == rerun)
            {
                return r.index;
            }
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let planned = self.build.plan.step(p).expect("planned step");
        let (name, stage) = (planned.step.name.clone(), planned.stage.clone());
        let name = if rerun > 1 { format!("{name} (again, {rerun})") } else { name };
        let stage = if attempt > 1 { format!("{stage} (attempt {attempt})") } else { stage };
        let id = self.build.id;
        let (name2, stage2) = (name.clone(), stage.clone());
        self.ctl
            .store_must(&self.build, move |s| {
                s.add_step(
                    id,
                    n,
                    &store::NewStep { name: &name2, stage: &stage2, skipped: false },
                    p,
                    attempt,
                    rerun,
                )
            })
            .await;
        let rec = StepRecord {
            index: n,
            name,
            state: StepState::Pending,
            exit: String::new(),
            code: None,
            bytes: 0,
            started: None,
            finished: None,
            stage,
            node: None,
            origin: Some(p),
            attempt,
            rerun,
        };
        self.memo.lock().unwrap_or_else(|e| e.into_inner()).rows.insert(n, rec);
        self.build.changed.notify(usize::MAX);
        n
    }

    /// Planned step `p` as step `n`, with its own `retry:`.
    async fn step(self: &Arc<Self>, p: u32, n: u32, attempt: u32, node: &str, stop: &Stop) -> Outcome {
        let planned = self.build.plan.step(p).expect("planned step");
        let mut n = n;
        let mut rerun = 1;
        loop {
            let r = self.one(p, n, node, stop).await;
            match r {
                Outcome::Failure { lost: false, .. }
                    if rerun < planned.attempts && !stop.hit(&self.build) =>
                {
                    rerun += 1;
                    n = self.number(p, attempt, rerun).await;
                }
                r => return r,
            }
        }
    }

    /// Step `n` (planned step `p`) on `node`, once; or what the store says it came to before a
    /// restart.
    async fn one(self: &Arc<Self>, p: u32, n: u32, node: &str, stop: &Stop) -> Outcome {
        let id = self.build.id;
        let planned = self.build.plan.step(p).expect("planned step");
        let (row, handle) = {
            let mut memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
            (memo.rows.get(&n).cloned(), memo.handles.remove(&n))
        };
        if let Some(r) = &row {
            match r.state {
                StepState::Success | StepState::Skipped => return Outcome::Success,
                StepState::Failure => {
                    return Outcome::failed(format!("step {n} ({}) failed: {}", r.name, r.exit));
                }
                StepState::Aborted => return Outcome::Aborted(format!("cancelled during step {n}")),
                StepState::Running | StepState::Pending => {}
            }
        }
        let first = self.unstarted.swap(false, Ordering::SeqCst);
        let (spec, path, feed) = match &planned.kind {
            Kind::Sh => (planned.step.clone(), self.ctl.logs.step_path(id, n), None),
            Kind::Stash { .. } | Kind::Archive { .. } => {
                (archives::pack_step(planned), archives::pack_path(&self.ctl, id, n), None)
            }
            Kind::Unstash { name } => {
                let stash = archives::stash_path(&self.ctl, id, name);
                let st = stash.clone();
                match smol::unblock(move || std::fs::metadata(&st)).await {
                    Ok(m) => (
                        archives::unpack_step(planned, m.len()),
                        self.ctl.logs.step_path(id, n),
                        Some((stash, m.len())),
                    ),
                    Err(_) => {
                        let have = archives::stash_names(&self.ctl, id).await;
                        let m = format!(
                            "no stash {name:?} in this build{} (a stash step of an earlier stage makes it)",
                            if have.is_empty() {
                                String::new()
                            } else {
                                format!(" (it has {})", have.join(", "))
                            }
                        );
                        return self.refuse(p, n, node, first, m, stop).await;
                    }
                }
            }
        };
        if planned.kind != Kind::Sh && self.ctl.session_of(node).is_some_and(|s| !s.archives()) {
            let m = format!(
                "the agent of node '{node}' cannot stash, unstash or archive (it is older than that): upgrade \
                 its wisp-agent"
            );
            return self.refuse(p, n, node, first, m, stop).await;
        }
        // Artifacts are unpacked as they arrive; a stash stays as it came.
        let unpacking = match planned.kind {
            Kind::Archive { .. } => match archives::Unpacking::start(&self.ctl, id, n) {
                Ok(u) => Some(u),
                Err(e) => {
                    log::warn!(
                        "build {id} step {n}: {e}; the artifacts will be unpacked once they are all in"
                    );
                    None
                }
            },
            _ => None,
        };
        let (mut end, bytes) = run_step(
            &self.ctl,
            &self.build,
            node,
            n,
            &self.workspace,
            &spec,
            path,
            feed,
            handle,
            first,
            stop,
        )
        .await;
        if let (Kind::Stash { .. } | Kind::Archive { .. }, StepEnd::Exit(ExitStatus::Code(0), summary)) =
            (&planned.kind, &end)
        {
            let log = self.ctl.logs.step_path(id, n);
            let line = match archives::after_pack(&self.ctl, id, n, &planned.kind, summary, unpacking).await {
                Ok(line) => line,
                Err(m) => {
                    end = StepEnd::Exit(ExitStatus::Code(1), m.clone());
                    format!("{m}\n")
                }
            };
            let _ = smol::unblock(move || std::fs::write(log, line)).await;
        }
        self.end_step(p, n, node, end, bytes, stop).await
    }

    /// Step `n` cannot start on `node` (`why`): it is marked started there and failed at once.
    async fn refuse(
        self: &Arc<Self>,
        p: u32,
        n: u32,
        node: &str,
        first: bool,
        why: String,
        stop: &Stop,
    ) -> Outcome {
        let (id, nd) = (self.build.id, node.to_string());
        self.ctl.store_must(&self.build, move |s| s.start_step(id, n, &nd, first)).await;
        self.end_step(p, n, node, StepEnd::Lost(why), 0, stop).await
    }

    /// Store how step `n` (planned step `p`) ended and say what it came to.
    async fn end_step(
        self: &Arc<Self>,
        p: u32,
        n: u32,
        node: &str,
        end: StepEnd,
        bytes: u64,
        stop: &Stop,
    ) -> Outcome {
        let id = self.build.id;
        let planned = self.build.plan.step(p).expect("planned step");
        let (step_state, exit, code) = step_result(&end);
        let lost = matches!(end, StepEnd::Lost(_)) && self.ctl.node_lost(node);
        log::info!("build {id} step {n}: {exit} (node {node})");
        let stored_exit = exit.clone();
        self.ctl
            .store_must(&self.build, move |s| {
                let stored = store::StepEnd { state: step_state, exit: &stored_exit, code, bytes };
                s.end_step(id, n, &stored, None)
            })
            .await;
        self.build.mark_done(n);
        self.build.changed.notify(usize::MAX);
        let what = if planned.stage.is_empty() {
            format!("step {n} ({})", planned.step.name)
        } else {
            format!("step {n} ({}, in {})", planned.step.name, planned.stage)
        };
        match step_state {
            StepState::Success => Outcome::Success,
            StepState::Aborted => Outcome::Aborted(format!("cancelled during step {n}")),
            _ if stop.hit(&self.build) => Outcome::Aborted(format!("cancelled during step {n}")),
            _ => Outcome::Failure { message: format!("{what} failed: {exit}"), lost },
        }
    }
}

/// `a` then `b`: the first that did not succeed.
fn worst(a: Outcome, b: Outcome) -> Outcome {
    if a != Outcome::Success {
        a
    } else {
        b
    }
}

/// Run one step on `node` and wait for its end. The step survives its agent's absence for
/// up to the grace; a cancel reaches the agent on whatever link it has. Returns the end and the
/// output bytes stored.
#[allow(clippy::too_many_arguments)]
async fn run_step(
    ctl: &Arc<Controller>,
    build: &Arc<LiveBuild>,
    node: &str,
    step: u32,
    workspace: &str,
    spec: &pipeline::Step,
    path: PathBuf,
    feed: Option<(PathBuf, u64)>,
    running: Option<StepHandle>,
    first: bool,
    stop: &Stop,
) -> (StepEnd, u64) {
    let id = build.id;
    let mut start_write = None;
    let handle = match running {
        Some(h) => h,
        None => {
            // A build numbered in this run of the controller has no log files yet (numbers are never
            // reused); one picked up after a restart may have a file from an earlier start.
            let log = if build.recovered() {
                match smol::unblock(move || super::logs::StepLog::create(path)).await {
                    Ok(l) => l,
                    Err(e) => {
                        let m = format!("cannot reset the step log: {e}");
                        return (StepEnd::Lost(m), 0);
                    }
                }
            } else {
                super::logs::StepLog::new(path)
            };
            let h = ctl.steps.open(build, step, node, log, false);
            // The step starts while its start is written: the store thread keeps the order of the
            // writes, and the step's end is written only after this one has landed (below).
            let (c, b, on) = (ctl.clone(), build.clone(), node.to_string());
            start_write = Some(ctl.ex.spawn(async move {
                c.store_must(&b, move |s| s.start_step(id, step, &on, first)).await;
                b.changed.notify(usize::MAX);
            }));
            h
        }
    };
    let end = match feed {
        None => wait_step(ctl, build, node, step, workspace, spec, &handle, stop).await,
        Some((stash, size)) => {
            let feeding = archives::feed(ctl.clone(), build.clone(), handle.slot.clone(), stash, size);
            smol::future::or(wait_step(ctl, build, node, step, workspace, spec, &handle, stop), async {
                feeding.await;
                std::future::pending().await
            })
            .await
        }
    };
    if let Some(w) = start_write {
        w.await;
    }
    build.set_stalled(None);
    ctl.steps.close(id, step);
    (end, handle.slot.stored())
}

#[allow(clippy::too_many_arguments)]
async fn wait_step(
    ctl: &Arc<Controller>,
    build: &Arc<LiveBuild>,
    node: &str,
    step: u32,
    workspace: &str,
    spec: &pipeline::Step,
    handle: &StepHandle,
    stop: &Stop,
) -> StepEnd {
    let id = build.id;
    let grace = ctl.timing.agent_grace;
    let mut cancel_sent_on = 0u64; // the link a Cancel went out on
    let mut cancel_deadline: Option<Instant> = None;
    loop {
        let listener = build.changed.listen();
        let session = ctl.session_of(node);
        if !handle.slot.started() {
            if stop.hit(build) {
                return StepEnd::Exit(ExitStatus::Cancelled, "cancelled before it started".into());
            }
            if let Some(s) = &session {
                // The step's own `container:`, else the pipeline's default, else the default of
                // the pod template its node was made from.
                let node_default = ctl.default_container(node);
                let container = match build.pipeline.container_of(spec) {
                    "" if spec.container.is_none() && build.pipeline.default_container.is_none() => {
                        match node_default.as_deref() {
                            None | Some(pipeline::AGENT_CONTAINER) => "",
                            Some(c) => c,
                        }
                    }
                    c => c,
                };
                if !container.is_empty() && !crate::proto::valid_container_name(container) {
                    return StepEnd::Lost(format!(
                        "bad container name {container:?} (the pod template's defaultContainer)"
                    ));
                }
                if !container.is_empty() && !s.runs_container_steps() {
                    return StepEnd::Lost(format!(
                        "the step runs in container '{container}', but the agent of node '{node}' cannot run \
                         steps in other containers (it is older than that): upgrade its wisp-agent"
                    ));
                }
                let start = Out::Start {
                    build: id,
                    step,
                    workspace: workspace.to_string(),
                    container: container.to_string(),
                    spec: spec.clone(),
                };
                // Marked started first: the agent may answer before the send returns.
                handle.slot.set_started(true);
                if s.tx.send(start).await.is_err() {
                    handle.slot.set_started(false);
                }
                continue;
            }
        }
        if stop.hit(build) {
            cancel_deadline.get_or_insert_with(|| Instant::now() + CANCEL_WAIT);
            if let Some(s) = session.as_ref().filter(|s| s.id != cancel_sent_on) {
                if s.tx.send(Out::Frame(Frame::Cancel { build: id, step })).await.is_ok() {
                    cancel_sent_on = s.id;
                }
            }
        }
        let grace_end = match ctl.offline_since(node) {
            None => {
                let why = ctl.gone_reason(node).unwrap_or_else(|| format!("node '{node}' was removed"));
                return StepEnd::Lost(why);
            }
            Some(since) => since.map(|t| t + grace),
        };
        let wake_at = [grace_end, cancel_deadline].into_iter().flatten().min();
        let waited = smol::future::or(async { Some(handle.events.recv().await) }, async {
            match wake_at {
                Some(t) => {
                    smol::future::or(listener, async {
                        smol::Timer::at(t).await;
                    })
                    .await;
                }
                None => listener.await,
            }
            None
        })
        .await;
        match waited {
            Some(Ok(StepEvent::Exit(status, m))) => return StepEnd::Exit(status, m),
            Some(Ok(StepEvent::Lost(m))) => return StepEnd::Lost(m),
            Some(Ok(StepEvent::Stalled(why))) => build.set_stalled(Some(why)),
            Some(Ok(StepEvent::Flowing)) => build.set_stalled(None),
            Some(Err(_)) => return StepEnd::Lost("the step's event stream closed".into()),
            None => {}
        }
        let now = Instant::now();
        if grace_end.is_some_and(|t| now >= t) {
            let m = format!(
                "agent lost: no contact with node '{node}' for {}s (the agent grace)",
                grace.as_secs()
            );
            log::warn!("build {id} step {step}: {m}");
            return StepEnd::Lost(m);
        }
        if cancel_deadline.is_some_and(|t| now >= t) {
            return StepEnd::Lost(format!("agent '{node}' did not confirm the cancel in time"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::core::Timing;
    use crate::controller::session::Session;
    use crate::controller::store::NodeRecord;
    use smol::channel::Receiver;
    use smol::Executor;

    fn timing(grace: Duration) -> Timing {
        Timing {
            ping_interval: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(10),
            agent_grace: grace,
        }
    }

    /// A controller on a temp dir with one node "n" whose link is a channel the test reads:
    /// the test plays the agent's part by hand.
    fn setup(tag: &str, grace: Duration) -> (Arc<Controller>, Arc<Executor<'static>>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("wisp-runner-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ex = Arc::new(Executor::new());
        let ctl = Controller::open(dir.clone(), ex.clone(), timing(grace)).unwrap();
        (ctl, ex, dir)
    }

    async fn add_node(ctl: &Arc<Controller>) -> (Arc<Session>, Receiver<Box<Out>>) {
        let rec = NodeRecord {
            name: "n".into(),
            labels: vec!["l".into()],
            executors: 1,
            websocket: true,
            work_dir: String::new(),
            origin: "static".into(),
        };
        ctl.add_node(rec).await.unwrap();
        let (tx, rx) = super::super::session::out_queue(64);
        let s = Arc::new(Session::new(ctl.session_id(), "n", "test", tx));
        assert!(ctl.attach(&s, None));
        (s, rx)
    }

    async fn next_start(rx: &Receiver<Box<Out>>) -> (u64, u32) {
        loop {
            match *rx.recv().await.unwrap() {
                Out::Start { build, step, .. } => return (build, step),
                _ => continue,
            }
        }
    }

    /// Deliver output and an exit as the session's reader would.
    async fn agent_runs(ctl: &Arc<Controller>, build: u64, step: u32, out: &[u8], code: i32) {
        let slot = ctl.steps.on_node(build, step, "n").expect("the step is registered");
        if slot.output(0, out).unwrap() {
            crate::controller::steps::flush(ctl.clone(), slot.clone()).await;
        }
        // A replay of what is stored changes nothing.
        assert!(!slot.output(0, out).unwrap());
        slot.exit(ExitStatus::Code(code), "", out.len() as u64).unwrap();
    }

    #[test]
    fn runs_each_step_through_the_session_and_stops_at_the_first_failure() {
        let (ctl, ex, dir) = setup("steps", AGENT_GRACE);
        smol::block_on(ex.run(async {
            let (_s, rx) = add_node(&ctl).await;
            let yaml = "name: r\nagent: {label: l}\nsteps:\n  - sh: a\n  - sh: b\n  - sh: c\n";
            let id = ctl.submit(yaml.into(), Vec::new()).await.unwrap();
            assert_eq!(next_start(&rx).await, (id, 1));
            agent_runs(&ctl, id, 1, b"one\n", 0).await;
            assert_eq!(next_start(&rx).await, (id, 2));
            agent_runs(&ctl, id, 2, b"two\n", 3).await;
            let b = loop {
                let b = ctl.build(id).await.unwrap();
                if b.state.is_final() {
                    break b;
                }
                smol::Timer::after(Duration::from_millis(5)).await;
            };
            assert_eq!(b.state, BuildState::Failure);
            assert_eq!(b.message, "step 2 (b) failed: exit code 3");
            let steps = ctl.build_steps(id).await.unwrap();
            let states: Vec<_> = steps.iter().map(|s| s.state).collect();
            assert_eq!(states, vec![StepState::Success, StepState::Failure, StepState::Skipped]);
            assert_eq!((steps[0].bytes, steps[1].code), (4, Some(3)));
            assert_eq!(std::fs::read(ctl.logs.step_path(id, 2)).unwrap(), b"two\n");
            // The executor is free again.
            assert_eq!(ctl.node_status("n").unwrap().busy, 0);
        }));
        ctl.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_step_whose_agent_stays_away_past_the_grace_fails_as_lost() {
        let (ctl, ex, dir) = setup("grace", Duration::from_millis(200));
        smol::block_on(ex.run(async {
            let (s, rx) = add_node(&ctl).await;
            let id = ctl
                .submit("name: g\nagent: {label: l}\nsteps:\n  - sh: a\n".into(), Vec::new())
                .await
                .unwrap();
            assert_eq!(next_start(&rx).await, (id, 1));
            ctl.detach(&s, "test cut");
            let b = loop {
                let b = ctl.build(id).await.unwrap();
                if b.state.is_final() {
                    break b;
                }
                smol::Timer::after(Duration::from_millis(10)).await;
            };
            assert_eq!(b.state, BuildState::Failure);
            assert!(b.message.contains("agent lost: no contact with node 'n'"), "{}", b.message);
        }));
        ctl.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_container_step_goes_only_to_an_agent_that_can_forward_it() {
        let (ctl, ex, dir) = setup("container", AGENT_GRACE);
        smol::block_on(ex.run(async {
            let (s, rx) = add_node(&ctl).await;
            let yaml = "name: k\nagent: {label: l}\nsteps:\n  - sh: a\n  - sh: b\n    container: build\n";
            let finished = |id| {
                let ctl = ctl.clone();
                async move {
                    loop {
                        let b = ctl.build(id).await.unwrap();
                        if b.state.is_final() {
                            return b;
                        }
                        smol::Timer::after(Duration::from_millis(5)).await;
                    }
                }
            };
            // An agent without the capability bit runs the local step and never sees the other.
            let id = ctl.submit(yaml.into(), Vec::new()).await.unwrap();
            match *rx.recv().await.unwrap() {
                Out::Start { step: 1, container, .. } => assert_eq!(container, ""),
                other => panic!("{other:?}"),
            }
            agent_runs(&ctl, id, 1, b"", 0).await;
            let b = finished(id).await;
            assert_eq!(b.state, BuildState::Failure);
            assert!(
                b.message.contains(
                    "step 2 (b) failed: the step runs in container 'build', but the agent of node 'n' cannot \
                     run steps in other containers"
                ),
                "{}",
                b.message
            );
            assert!(rx.try_recv().is_err(), "nothing more went to the agent");
            // An agent that sets it gets the container in the step's start.
            ctl.detach(&s, "test: a newer agent");
            let (tx, rx) = super::super::session::out_queue(64);
            let caps = crate::proto::CAP_CONTAINER_STEPS;
            let newer =
                Arc::new(Session { capabilities: caps, ..Session::new(ctl.session_id(), "n", "t", tx) });
            assert!(ctl.attach(&newer, None));
            let id = ctl.submit(yaml.into(), Vec::new()).await.unwrap();
            assert_eq!(next_start(&rx).await, (id, 1));
            agent_runs(&ctl, id, 1, b"", 0).await;
            match *rx.recv().await.unwrap() {
                Out::Start { step: 2, container, .. } => assert_eq!(container, "build"),
                other => panic!("{other:?}"),
            }
            agent_runs(&ctl, id, 2, b"in build\n", 0).await;
            assert_eq!(finished(id).await.state, BuildState::Success);
        }));
        ctl.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cancel_reaches_the_agent_and_its_exit_aborts_the_build() {
        let (ctl, ex, dir) = setup("cancel", AGENT_GRACE);
        smol::block_on(ex.run(async {
            let (_s, rx) = add_node(&ctl).await;
            let id = ctl
                .submit("name: c\nagent: {label: l}\nsteps:\n  - sh: a\n  - sh: b\n".into(), Vec::new())
                .await
                .unwrap();
            assert_eq!(next_start(&rx).await, (id, 1));
            ctl.cancel(id).await.unwrap();
            loop {
                if let Out::Frame(Frame::Cancel { build, step }) = *rx.recv().await.unwrap() {
                    assert_eq!((build, step), (id, 1));
                    break;
                }
            }
            let slot = ctl.steps.on_node(id, 1, "n").unwrap();
            slot.exit(ExitStatus::Cancelled, "", 0).unwrap();
            let b = loop {
                let b = ctl.build(id).await.unwrap();
                if b.state.is_final() {
                    break b;
                }
                smol::Timer::after(Duration::from_millis(5)).await;
            };
            assert_eq!((b.state, b.message.as_str()), (BuildState::Aborted, "cancelled during step 1"));
        }));
        ctl.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
