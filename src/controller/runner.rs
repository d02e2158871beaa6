//! Runs one build step by step on its node: starts each step through the node's session (whichever
//! link it has), waits for the step's end through its [`StepHandle`], survives the agent's absence
//! for up to the grace, carries a cancel to the agent, and writes each step's end to the store.

pub use super::build::LiveBuild;
use super::pipeline;
use super::session::Out;
use super::steps::{StepEvent, StepHandle};
use super::store::{self, BuildState, StepState};
use super::Controller;
use crate::proto::{ExitStatus, Frame};
use std::sync::atomic::Ordering;
use std::sync::Arc;
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

/// Run a build's steps from `from` on `node`. `running` is given when step `from` is already
/// running on the agent (picked up after a controller restart): it is not started again.
pub async fn run_build(
    ctl: Arc<Controller>,
    build: Arc<LiveBuild>,
    node: String,
    from: u32,
    mut running: Option<StepHandle>,
) {
    let id = build.id;
    // The build is marked running together with its first step (one store write).
    let mut start_on = (from == 1).then(|| node.clone());
    if from == 1 {
        log::info!("build {id}: running on node {node}");
    }
    let workspace = pipeline::workspace_name(&build.pipeline.name);
    let mut state = BuildState::Success;
    let mut message = String::new();
    // Whether the build's end went into the store with its last step.
    let mut ended = false;
    let last = build.pipeline.steps.len() as u32;
    for (i, spec) in build.pipeline.steps.iter().enumerate().skip(from as usize - 1) {
        let step = i as u32 + 1;
        if build.cancelled.load(Ordering::SeqCst) {
            state = BuildState::Aborted;
            message = "cancelled".into();
            break;
        }
        let (end, bytes) =
            run_step(&ctl, &build, &node, step, &workspace, spec, running.take(), start_on.take()).await;
        let (step_state, exit, code) = step_result(&end);
        log::info!("build {id} step {step}: {exit} (node {node})");
        match step_state {
            StepState::Success => {}
            StepState::Aborted => {
                state = BuildState::Aborted;
                message = format!("cancelled during step {step}");
            }
            _ => {
                state = BuildState::Failure;
                message = format!("step {step} ({}) failed: {exit}", spec.name);
            }
        }
        if state == BuildState::Failure && build.cancelled.load(Ordering::SeqCst) {
            state = BuildState::Aborted;
        }
        // The build's last step and the build's end are one store write.
        ended = state != BuildState::Success || step == last;
        let finish = ended.then(|| (state, message.clone()));
        // The end is read back in the same store call, so waiters for the result need no read.
        let record = ctl
            .store_must(&build, move |s| {
                let stored = store::StepEnd { state: step_state, exit: &exit, code, bytes };
                s.end_step(id, step, &stored, finish.as_ref().map(|(st, m)| (*st, m.as_str())))?;
                finish.as_ref().map(|_| s.build_with_steps(id)).transpose()
            })
            .await;
        if let Some((Some(b), steps)) = record {
            ctl.count_final(&b);
            build.set_final(b, steps);
        }
        build.steps_done.store(step, Ordering::SeqCst);
        build.changed.notify(usize::MAX);
        if ended {
            break;
        }
    }
    log::info!("build {id}: finished {} {message}", state.as_str());
    // Cancelled before a step ran (or no step left after a restart): the end is written alone.
    if !ended {
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
    }
    ctl.build_done(&build, &node);
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
    running: Option<StepHandle>,
    start_on: Option<String>,
) -> (StepEnd, u64) {
    let id = build.id;
    let mut start_write = None;
    let handle = match running {
        Some(h) => h,
        None => {
            let path = ctl.logs.step_path(id, step);
            // A build numbered in this run of the controller has no log files yet (numbers are never
            // reused); one picked up after a restart may have a file from an earlier start.
            let log = if build.recovered() {
                match smol::unblock(move || super::logs::StepLog::create(path)).await {
                    Ok(l) => l,
                    Err(e) => {
                        let m = format!(
                            "cannot reset the step log {}: {e}",
                            ctl.logs.step_path(id, step).display()
                        );
                        return (StepEnd::Lost(m), 0);
                    }
                }
            } else {
                super::logs::StepLog::new(path)
            };
            let h = ctl.steps.open(build, step, node, log, false);
            // The step starts while its start is written: the store thread keeps the order of the
            // writes, and the step's end is written only after this one has landed (below).
            let (c, b) = (ctl.clone(), build.clone());
            start_write = Some(ctl.ex.spawn(async move {
                c.store_must(&b, move |s| s.start_step(id, step, start_on.as_deref())).await;
                b.changed.notify(usize::MAX);
            }));
            h
        }
    };
    let end = wait_step(ctl, build, node, step, workspace, spec, &handle).await;
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
) -> StepEnd {
    let id = build.id;
    let grace = ctl.timing.agent_grace;
    let mut cancel_sent_on = 0u64; // the link a Cancel went out on
    let mut cancel_deadline: Option<Instant> = None;
    loop {
        let listener = build.changed.listen();
        let session = ctl.session_of(node);
        if !handle.slot.started() {
            if build.cancelled.load(Ordering::SeqCst) {
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
        if build.cancelled.load(Ordering::SeqCst) {
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

    async fn add_node(ctl: &Arc<Controller>) -> (Arc<Session>, Receiver<Out>) {
        let rec = NodeRecord {
            name: "n".into(),
            labels: vec!["l".into()],
            executors: 1,
            websocket: true,
            work_dir: String::new(),
            origin: "static".into(),
        };
        ctl.add_node(rec).await.unwrap();
        let (tx, rx) = smol::channel::bounded(64);
        let s = Arc::new(Session::new(ctl.session_id(), "n", "test", tx));
        assert!(ctl.attach(&s, None));
        (s, rx)
    }

    async fn next_start(rx: &Receiver<Out>) -> (u64, u32) {
        loop {
            match rx.recv().await.unwrap() {
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
            let id = ctl.submit(yaml.into()).await.unwrap();
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
            assert_eq!(ctl.node_status("n").unwrap().2, 0);
        }));
        ctl.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_step_whose_agent_stays_away_past_the_grace_fails_as_lost() {
        let (ctl, ex, dir) = setup("grace", Duration::from_millis(200));
        smol::block_on(ex.run(async {
            let (s, rx) = add_node(&ctl).await;
            let id = ctl.submit("name: g\nagent: {label: l}\nsteps:\n  - sh: a\n".into()).await.unwrap();
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
            let id = ctl.submit(yaml.into()).await.unwrap();
            match rx.recv().await.unwrap() {
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
            let (tx, rx) = smol::channel::bounded(64);
            let caps = crate::proto::CAP_CONTAINER_STEPS;
            let newer =
                Arc::new(Session { capabilities: caps, ..Session::new(ctl.session_id(), "n", "t", tx) });
            assert!(ctl.attach(&newer, None));
            let id = ctl.submit(yaml.into()).await.unwrap();
            assert_eq!(next_start(&rx).await, (id, 1));
            agent_runs(&ctl, id, 1, b"", 0).await;
            match rx.recv().await.unwrap() {
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
                .submit("name: c\nagent: {label: l}\nsteps:\n  - sh: a\n  - sh: b\n".into())
                .await
                .unwrap();
            assert_eq!(next_start(&rx).await, (id, 1));
            ctl.cancel(id).await.unwrap();
            loop {
                if let Out::Frame(Frame::Cancel { build, step }) = rx.recv().await.unwrap() {
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
