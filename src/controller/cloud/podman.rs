//! The podman backend: Kubernetes Pod manifests run by the local podman (`podman kube play`), for
//! ARM boxes and edge hosts without a cluster.
//!
//! It drives the `podman` program through `smol::process`, not podman's REST API: the CLI needs no
//! `podman system service` running beside the controller (nothing to start, supervise or find a
//! socket of), works the same for root and rootless podman, and its errors are the sentences
//! podman prints, where the API's are JSON to unpick. Every call is bounded in time and in the
//! bytes read. The watch reads one `podman events` stream (containers and pods) and, after each
//! burst of events about this selector's pods, lists them again and reports what changed; a full
//! list every [`RESYNC`] is the safety net, and a dead `podman events` is started again with a
//! new [`PodEvent::Listed`].
//!
//! What podman 4.3.1 (Debian bookworm) does with a Pod manifest, checked on this kind of machine:
//! - Labels of the pod are the pod's (`pod ps --filter label=k=v` finds it; several `label`
//!   filters must all match) and are copied onto every container, merged with the image's own
//!   labels (`io.buildah.version`), so a container's labels are not the pod's: [`PodInfo::labels`]
//!   comes from the pod. The infra container has none.
//! - Containers are named `<pod>-<container>`; the infra container `<pod id prefix>-infra`.
//! - `hostNetwork: true` is honoured, and so is `kube play --network host` (the default here):
//!   agents reach a controller on 127.0.0.1. Without either, pods join `podman-default-kube-network`.
//! - `restartPolicy: Never` is honoured: an exited container stays exited with its exit code. With
//!   no `restartPolicy` podman restarts an exited container at once, again and again (35 times in
//!   3 s), as Kubernetes' default `Always` would with no backoff: the generator must emit `Never`.
//! - Init containers run, in order, while the pod starts (`kube play` or `pod start` waits for
//!   them); one that fails fails the start ("init container ID exited with code 1"). By default
//!   podman then removes them, so nothing could report their state: this backend sets the pod
//!   annotation [`INIT_TYPE_ANNOTATION`]` = always`, which keeps them (they would run again on a
//!   pod restart, which nothing here does). Pod annotations are copied onto every container,
//!   that one too, and nothing else tells an init container from another: the backend also
//!   writes the init containers' names into the pod annotation [`INIT_NAMES_ANNOTATION`].
//! - `emptyDir` is a podman *named volume called after the volume*: two pods whose manifests both
//!   name a volume `workspace` share one directory, each other's files included. `medium: Memory`
//!   is ignored (still a disk volume). A new volume is chowned to the user of whichever container
//!   mounts it first while it is still empty, a race: with the agent (UID 1000) and a busybox
//!   (root) sharing a workspace, the agent could write to it in some runs and not in others.
//!   `securityContext.fsGroup` is ignored. So this backend renames each `emptyDir` volume to
//!   `<pod>-<volume>` (unique per pod; the mounts follow), creates the pod with `kube play
//!   --start=false` (podman makes the volumes as anonymous volumes, removed with the pod, also by
//!   a `podman pod rm` from outside), makes each volume's directory mode 0777 (Kubernetes' own
//!   emptyDir mode) and then starts the pod. Any UID can then create files in it; a file keeps
//!   its creator's mode, as on Kubernetes. The Pod manifest generator needs to emit nothing
//!   special for this (no fsGroup, no chmod init container); `runAsUser` works as usual.
//! - `activeDeadlineSeconds` is accepted and ignored (a pod outlives it): the life cycle has to
//!   enforce it itself. Image pulls happen in `kube play`; a registry that cannot be reached fails
//!   it at once ("initializing source docker://...: no such host") and leaves a pod in state
//!   `Created` behind, which `create` removes.
//! - `podman pod rm -f` waits 10 s for a container that ignores SIGTERM (a shell as PID 1 does);
//!   `delete` passes `-t 0`.
//! - `podman events --until 1s` means one second from now (it streams until then); an absolute
//!   time in the past gives nothing. Filters of one key are OR-ed, of different keys AND-ed
//!   (`container=` and `pod=` together match nothing); a container's `died` event carries
//!   `ContainerExitCode` and the pod's labels but no pod id.

use super::backend::{
    BackendFuture, ContainerState, Diagnosis, Phase, PodBackend, PodEvent, PodInfo, Selector,
};
use crate::text::truncate;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use smol::future::FutureExt as _;
use smol::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use smol::process::{Child, ChildStdout, Command, Stdio};
use smol::Timer;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The pod annotation that keeps init containers after they ran (podman removes them otherwise).
pub const INIT_TYPE_ANNOTATION: &str = "io.podman.annotations.init.container.type";
/// The pod annotation (so on every container) that names the pod's init containers, comma
/// separated: podman keeps no other trace of which containers are init containers.
pub const INIT_NAMES_ANNOTATION: &str = "wisp.dev/init-containers";
/// Most a listing, inspection or event query may take: podman answers these in well under a
/// second; longer means it hangs on its lock.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most `kube play` (image pulls) or `pod start` (init containers) may take.
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// Most bytes read from one command's standard output (a listing of many pods is some KiB each).
const MAX_OUTPUT: usize = 16 << 20;
/// Most bytes kept of one command's standard error (only its reason is wanted).
const MAX_STDERR: usize = 64 << 10;
/// Longest `podman events` line taken (one event is a few hundred bytes; longer ones are skipped).
const MAX_EVENT_LINE: usize = 64 << 10;
/// Quiet time that ends a burst of events (a pod's start is some twenty events within ms).
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Longest a burst may delay the list that follows it.
const DEBOUNCE_MAX: Duration = Duration::from_millis(500);
/// Interval of the full list that catches whatever the event stream missed.
const RESYNC: Duration = Duration::from_secs(30);
/// How soon a pod missing from one listing is looked for again.
const RECHECK: Duration = Duration::from_millis(300);
/// Backoff after a failed watch, doubled up to [`BACKOFF_MAX`], reset after a healthy [`RESYNC`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest backoff between watch attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Events started this long before the first list are replayed, so none falls between the two.
const EVENTS_OVERLAP_SECS: u64 = 2;
/// Most event lines a diagnosis keeps (the newest).
const MAX_DIAG_EVENTS: usize = 200;
/// Most log lines a diagnosis asks for.
const MAX_LOG_LINES: usize = 10_000;
/// Longest reason quoted from podman in an error.
const MAX_REASON: usize = 2000;

/// The local podman as a [`PodBackend`].
#[derive(Debug, Clone)]
pub struct Podman {
    program: String,
    network: String,
}

impl Podman {
    /// A backend that runs `program` (default `podman`) and puts pods on `network` (default
    /// `host`, so agents reach a controller listening on 127.0.0.1; anything else is passed to
    /// `podman kube play --network`).
    pub fn new(program: Option<String>, network: Option<String>) -> Self {
        Self {
            program: program.filter(|p| !p.is_empty()).unwrap_or_else(|| "podman".into()),
            network: network.filter(|n| !n.is_empty()).unwrap_or_else(|| "host".into()),
        }
    }
}

/// What one podman command did.
struct Output {
    success: bool,
    status: String,
    stdout: Vec<u8>,
    stdout_over: bool,
    stderr: String,
}

impl Output {
    /// Why it failed, in podman's words.
    fn reason(&self) -> String {
        let r = podman_reason(&self.stderr);
        if r.is_empty() {
            format!("podman exited with {}", self.status)
        } else {
            r
        }
    }
}

/// Read `r` to its end, keeping the first `cap` bytes; whether more came.
async fn read_capped(mut r: impl AsyncRead + Unpin, cap: usize) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    let mut over = false;
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap - buf.len();
                if n > room {
                    over = true;
                }
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    (buf, over)
}

/// A pod name podman and Kubernetes both take: a DNS label (also keeps it from reading as an
/// option on podman's command line).
fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// The reason podman gives on standard error: its `Error:` lines and logged errors, without its
/// progress lines and noise; else whatever else it printed. One line, bounded.
fn podman_reason(stderr: &str) -> String {
    let mut errors = Vec::new();
    let mut others = Vec::new();
    for line in stderr.lines().map(str::trim) {
        if line.is_empty()
            || line.starts_with("failed to connect to syslog")
            || line.starts_with("Trying to pull ")
        {
            continue;
        }
        if let Some(rest) = line.strip_prefix("Error: ") {
            errors.push(rest.to_string());
        } else if line.starts_with("time=") {
            if line.contains("level=error") || line.contains("level=fatal") {
                if let Some(msg) = logged_msg(line) {
                    errors.push(msg);
                }
            }
        } else {
            others.push(line.to_string());
        }
    }
    let all = if errors.is_empty() { others } else { errors };
    truncate(&all.join("; "), MAX_REASON).to_string()
}

/// `msg="..."` of a logrus line, unescaped.
fn logged_msg(line: &str) -> Option<String> {
    let start = line.find("msg=\"")? + 5;
    let mut out = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    Some(out)
}

/// The image podman was pulling when it failed (`Trying to pull IMAGE...`), if it says so.
fn pulling(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("Trying to pull "))
        .map(|i| i.trim_end_matches('.'))
}

/// The manifest as podman is given it, and the names of its emptyDir volumes (see the module
/// doc): emptyDir volumes renamed `<pod>-<volume>` with their mounts, and init containers kept.
fn prepare(pod: &Pod) -> Result<(String, Pod, Vec<String>), String> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    if !valid_name(&name) {
        return Err(format!(
            "pod name '{}' is not a DNS label (1 to 63 characters of a-z, 0-9 and '-', not starting or ending \
             with '-')",
            truncate(&name, 100)
        ));
    }
    let mut pod = pod.clone();
    let Some(spec) = pod.spec.as_mut() else {
        return Err(format!("pod {name} has no spec"));
    };
    let mut renamed = BTreeMap::new();
    for v in spec.volumes.iter_mut().flatten() {
        if v.empty_dir.is_some() {
            let new = format!("{name}-{}", v.name);
            renamed.insert(std::mem::replace(&mut v.name, new.clone()), new);
        }
    }
    let init_names: Vec<String> = spec.init_containers.iter().flatten().map(|c| c.name.clone()).collect();
    let containers = spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten());
    for m in containers.flat_map(|c| c.volume_mounts.iter_mut().flatten()) {
        if let Some(new) = renamed.get(&m.name) {
            m.name = new.clone();
        }
    }
    if !init_names.is_empty() {
        let annotations = pod.metadata.annotations.get_or_insert_with(Default::default);
        annotations.entry(INIT_TYPE_ANNOTATION.into()).or_insert_with(|| "always".into());
        annotations.insert(INIT_NAMES_ANNOTATION.into(), init_names.join(","));
    }
    Ok((name, pod, renamed.into_values().collect()))
}

/// Whether `labels` has every pair of `selector`.
fn matches(labels: &BTreeMap<String, String>, selector: &Selector) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `podman pod ps --format json`, the fields used.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PsPod {
    id: String,
    name: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    infra_id: Option<String>,
    #[serde(default)]
    containers: Option<Vec<PsContainer>>,
}

/// A container of [`PsPod`].
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PsContainer {
    id: String,
}

/// `podman container inspect --format` giving [`Inspected`]'s fields only, one object a line.
const INSPECT_FORMAT: &str = "{\"Id\":{{json .ID}},\"Name\":{{json .Name}},\"Created\":{{json .Created}},\
\"State\":{\"Status\":{{json .State.Status}},\"ExitCode\":{{json .State.ExitCode}},\
\"OOMKilled\":{{json .State.OOMKilled}},\"Error\":{{json .State.Error}}},\
\"Config\":{\"Annotations\":{{json .Config.Annotations}}}}";

/// `podman container inspect`, the fields used.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspected {
    id: String,
    name: String,
    #[serde(default)]
    created: String,
    state: InspectedState,
    #[serde(default)]
    config: Option<InspectedConfig>,
}

/// Its state.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedState {
    #[serde(default)]
    status: String,
    #[serde(default)]
    exit_code: i32,
    #[serde(default, rename = "OOMKilled")]
    oom_killed: bool,
    #[serde(default)]
    error: String,
}

/// Its configuration.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedConfig {
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// A container's state as Kubernetes names it.
fn container_state(s: &InspectedState) -> ContainerState {
    match s.status.as_str() {
        "running" | "paused" | "stopping" => ContainerState::Running,
        "exited" | "stopped" => ContainerState::Terminated {
            exit_code: s.exit_code,
            reason: if s.oom_killed {
                "OOMKilled"
            } else if s.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .into(),
            message: s.error.clone(),
        },
        "created" | "configured" | "initialized" | "" => ContainerState::Waiting {
            reason: if s.error.is_empty() { "ContainerCreating" } else { "CreateContainerError" }.into(),
            message: s.error.clone(),
        },
        other => {
            ContainerState::Waiting { reason: "Unknown".into(), message: format!("podman state {other}") }
        }
    }
}

/// A pod's phase from its containers (`init` says which are init containers), as Kubernetes
/// decides it for `restartPolicy: Never`.
fn phase(containers: &[(bool, ContainerState)]) -> Phase {
    use ContainerState::*;
    if containers.iter().all(|(init, _)| *init) {
        return if containers.is_empty() { Phase::Unknown } else { Phase::Pending };
    }
    let mut init_done = true;
    for (_, s) in containers.iter().filter(|(init, _)| *init) {
        match s {
            Terminated { exit_code: 0, .. } => {}
            Terminated { .. } => return Phase::Failed,
            _ => init_done = false,
        }
    }
    if !init_done {
        return Phase::Pending;
    }
    let main = || containers.iter().filter(|(init, _)| !*init).map(|(_, s)| s);
    if main().any(|s| *s == Running) {
        Phase::Running
    } else if main().any(|s| matches!(s, Waiting { .. })) {
        Phase::Pending
    } else if main().all(|s| matches!(s, Terminated { exit_code: 0, .. })) {
        Phase::Succeeded
    } else {
        Phase::Failed
    }
}

/// A pod as listed, with the podman ids that tie events to it.
#[derive(Debug, Clone)]
struct Seen {
    info: PodInfo,
    ids: Vec<String>,
}

/// Build [`Seen`] pods from a pod listing and the inspection of their containers.
fn assemble(pods: Vec<PsPod>, inspected: Vec<Inspected>, selector: &Selector) -> Vec<Seen> {
    let mut by_id: BTreeMap<String, Inspected> = inspected.into_iter().map(|c| (c.id.clone(), c)).collect();
    let mut out = Vec::new();
    for p in pods {
        let labels = p.labels.unwrap_or_default();
        if !matches(&labels, selector) {
            continue;
        }
        let mut ids = vec![p.id.clone()];
        let mut cs = Vec::new();
        for c in p.containers.unwrap_or_default() {
            ids.push(c.id.clone());
            if p.infra_id.as_deref() == Some(c.id.as_str()) {
                continue;
            }
            if let Some(i) = by_id.remove(&c.id) {
                cs.push(i);
            }
        }
        let prefix = format!("{}-", p.name);
        let short = |c: &Inspected| c.name.strip_prefix(&prefix).unwrap_or(&c.name).to_string();
        let init_names: HashSet<String> = cs
            .iter()
            .find_map(|c| c.config.as_ref()?.annotations.as_ref()?.get(INIT_NAMES_ANNOTATION))
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        let init = |c: &Inspected| init_names.contains(&short(c));
        // Init containers first; each kind in the order podman made them (the manifest's).
        cs.sort_by(|a, b| (!init(a), &a.created).cmp(&(!init(b), &b.created)));
        let states: Vec<(bool, String, ContainerState)> =
            cs.iter().map(|c| (init(c), short(c), container_state(&c.state))).collect();
        let flags: Vec<(bool, ContainerState)> = states.iter().map(|(i, _, s)| (*i, s.clone())).collect();
        out.push(Seen {
            info: PodInfo {
                name: p.name,
                labels,
                phase: phase(&flags),
                reason: String::new(),
                message: String::new(),
                containers: states.into_iter().map(|(_, n, s)| (n, s)).collect(),
            },
            ids,
        });
    }
    out
}

/// One `podman events --format json` line, the fields used.
#[derive(Deserialize)]
struct Event {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "PodID", default)]
    pod_id: Option<String>,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "Time", default)]
    time: String,
    #[serde(rename = "ContainerExitCode", default)]
    exit_code: Option<i64>,
    #[serde(rename = "Attributes", default)]
    attributes: Option<BTreeMap<String, serde_json::Value>>,
}

impl Event {
    /// Whether it may change what a watch of `selector` reports, given the ids of its pods.
    fn concerns(&self, selector: &Selector, ids: &HashSet<String>) -> bool {
        if self.kind == "pod" {
            return true; // few, and a new pod's event carries no labels
        }
        if ids.contains(&self.id) || self.pod_id.as_ref().is_some_and(|p| ids.contains(p)) {
            return true;
        }
        // A container of a pod not listed yet: it carries the pod's labels.
        let attrs = self.attributes.as_ref();
        !selector.is_empty()
            && selector.iter().all(|(k, v)| attrs.and_then(|a| a.get(k)).and_then(|x| x.as_str()) == Some(v))
    }

    /// One line for a diagnosis: `2026-01-02T03:04:05Z container p-jnlp died (exit code 3)`.
    fn line(&self) -> String {
        let time = if self.time.len() >= 19 { format!("{}Z", &self.time[..19]) } else { self.time.clone() };
        let code = match (self.status.as_str(), self.exit_code) {
            ("died", Some(c)) => format!(" (exit code {c})"),
            _ => String::new(),
        };
        format!("{time} {} {} {}{code}", self.kind, truncate(&self.name, 200), truncate(&self.status, 100))
    }
}

/// Lines of a child's output, each at most [`MAX_EVENT_LINE`] bytes; a longer one is an `Err`
/// (and skipped). Cancel-safe: a line read halfway stays in the reader.
struct Lines {
    reader: BufReader<ChildStdout>,
    buf: Vec<u8>,
    over: bool,
}

impl Lines {
    /// The next line; `None` at the end of the stream.
    async fn next(&mut self) -> Option<Result<Vec<u8>, String>> {
        loop {
            let chunk = match self.reader.fill_buf().await {
                Ok(c) => c,
                Err(_) => return None, // a broken pipe: the stream is over
            };
            if chunk.is_empty() {
                return None;
            }
            if let Some(i) = chunk.iter().position(|&b| b == b'\n') {
                let over = std::mem::take(&mut self.over) || self.buf.len() + i > MAX_EVENT_LINE;
                if !over {
                    self.buf.extend_from_slice(&chunk[..i]);
                }
                self.reader.consume(i + 1);
                let line = std::mem::take(&mut self.buf);
                return Some(if over {
                    Err(format!("an event line over {MAX_EVENT_LINE} bytes was skipped"))
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
            self.reader.consume(n);
        }
    }
}

/// Removes a pod whose creation did not finish (the future was dropped: a timeout), from a
/// thread of its own since a drop cannot wait.
struct Unfinished {
    program: String,
    name: String,
    armed: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (program, name) = (self.program.clone(), self.name.clone());
        let _ = std::thread::Builder::new().name("podman-rm".into()).spawn(move || {
            let _ = std::process::Command::new(program)
                .args(["pod", "rm", "-f", "-t", "0", "--ignore", &name])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        });
    }
}

impl Podman {
    /// Run podman with `args` (and `input` on its standard input), for at most `limit`.
    async fn run(&self, args: &[&str], input: Option<&[u8]>, limit: Duration) -> Result<Output, String> {
        let what =
            format!("`{} {}`", self.program, args.iter().take(2).copied().collect::<Vec<_>>().join(" "));
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {what}: {e} (install podman, or name the program in the cloud's `podman` setting)"
                )
            })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let work = async {
            let feed = async {
                if let (Some(mut w), Some(data)) = (stdin, input) {
                    let _ = w.write_all(data).await;
                    let _ = w.close().await;
                }
            };
            let out = async {
                match stdout {
                    Some(r) => read_capped(r, MAX_OUTPUT).await,
                    None => (Vec::new(), false),
                }
            };
            let err = async {
                match stderr {
                    Some(r) => read_capped(r, MAX_STDERR).await.0,
                    None => Vec::new(),
                }
            };
            let ((), ((stdout, stdout_over), stderr)) =
                smol::future::zip(feed, smol::future::zip(out, err)).await;
            let status = child.status().await;
            (stdout, stdout_over, stderr, status)
        };
        let done = async { Some(work.await) }
            .or(async {
                Timer::after(limit).await;
                None
            })
            .await;
        let Some((stdout, stdout_over, stderr, status)) = done else {
            return Err(format!("{what} gave no answer within {}s", limit.as_secs()));
        };
        let status = status.map_err(|e| format!("waiting for {what}: {e}"))?;
        Ok(Output {
            success: status.success(),
            status: status.to_string(),
            stdout,
            stdout_over,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// Run podman and parse its JSON answer, which it may give (for what exists) even when it
    /// fails (for what does not).
    async fn json<T: for<'de> Deserialize<'de>>(&self, args: &[&str], partial_ok: bool) -> Result<T, String> {
        let out = self.run(args, None, CALL_TIMEOUT).await?;
        let what =
            format!("`{} {}`", self.program, args.iter().take(2).copied().collect::<Vec<_>>().join(" "));
        if !out.success && (!partial_ok || out.stdout.is_empty()) {
            return Err(format!("{what} failed: {}", out.reason()));
        }
        if out.stdout_over {
            return Err(format!("{what} printed more than {MAX_OUTPUT} bytes"));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("{what} printed JSON this backend cannot read: {e}"))
    }

    /// Run podman and read one JSON value of type `T` per line of its output. A failing run
    /// that printed something (some of the named objects were gone) gives what it printed.
    async fn json_lines<T: for<'de> Deserialize<'de>>(&self, args: &[&str]) -> Result<Vec<T>, String> {
        let out = self.run(args, None, CALL_TIMEOUT).await?;
        let what =
            format!("`{} {}`", self.program, args.iter().take(2).copied().collect::<Vec<_>>().join(" "));
        if !out.success && out.stdout.is_empty() {
            return Err(format!("{what} failed: {}", out.reason()));
        }
        if out.stdout_over {
            return Err(format!("{what} printed more than {MAX_OUTPUT} bytes"));
        }
        out.stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(|l| {
                serde_json::from_slice(l)
                    .map_err(|e| format!("{what} printed JSON this backend cannot read: {e}"))
            })
            .collect()
    }

    /// The pods matching `selector`, with their containers' states.
    async fn snapshot(&self, selector: &Selector) -> Result<Vec<Seen>, String> {
        let mut args = vec!["pod".to_string(), "ps".into(), "--format".into(), "json".into()];
        for (k, v) in selector {
            args.push("--filter".into());
            args.push(format!("label={k}={v}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pods: Vec<PsPod> = self.json::<Option<Vec<PsPod>>>(&args, false).await?.unwrap_or_default();
        let pods: Vec<PsPod> = pods
            .into_iter()
            .filter(|p| matches(p.labels.as_ref().unwrap_or(&BTreeMap::new()), selector))
            .collect();
        let ids: Vec<&str> = pods
            .iter()
            .flat_map(|p| {
                let infra = p.infra_id.as_deref();
                p.containers.iter().flatten().map(|c| c.id.as_str()).filter(move |id| Some(*id) != infra)
            })
            .collect();
        let inspected: Vec<Inspected> = if ids.is_empty() {
            Vec::new()
        } else {
            // Only the fields used, one JSON object a line: podman's whole inspect output is some
            // 10 KiB a container, and reading it for every container at every change was most of
            // the controller's CPU per pod.
            let mut args = vec!["container", "inspect", "--format", INSPECT_FORMAT];
            args.extend(ids);
            // A container removed since the listing makes podman fail for it, and print the others;
            // when all are gone the pods are taken as they are listed (no container states), not
            // as an error that would restart the watch.
            match self.json_lines::<Inspected>(&args).await {
                Ok(v) => v,
                Err(e) => {
                    log::debug!("podman watch: {e}");
                    Vec::new()
                }
            }
        };
        Ok(assemble(pods, inspected, selector))
    }

    /// Make each volume's directory writable by every UID (Kubernetes' emptyDir mode).
    async fn open_volumes(&self, volumes: &[String]) -> Result<(), String> {
        if volumes.is_empty() {
            return Ok(());
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Volume {
            name: String,
            mountpoint: String,
        }
        let mut args = vec!["volume", "inspect", "--format", "json"];
        args.extend(volumes.iter().map(String::as_str));
        let found: Vec<Volume> = self.json(&args, false).await?;
        for v in volumes {
            let Some(found) = found.iter().find(|f| &f.name == v) else {
                return Err(format!("podman made no volume {v} for the pod's emptyDir"));
            };
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&found.mountpoint, std::fs::Permissions::from_mode(0o777)).map_err(|e| {
                format!(
                    "cannot make emptyDir volume {v} writable for every container (chmod 0777 {}): {e}; run the \
                     controller on the podman host as the user podman runs as",
                    found.mountpoint
                )
            })?;
        }
        Ok(())
    }

    /// Name the containers podman's message names by id (`init container 81c2... exited`), and
    /// add the last lines of that container's log.
    async fn explain(&self, reason: String) -> String {
        let id = reason.split(|c: char| !c.is_ascii_hexdigit()).find(|w| w.len() == 64).map(str::to_string);
        let Some(id) = id else { return reason };
        let Ok(out) =
            self.run(&["container", "inspect", "--format", "{{.Name}}", &id], None, CALL_TIMEOUT).await
        else {
            return reason;
        };
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.success || name.is_empty() {
            return reason;
        }
        let mut text = reason.replace(&id, &name);
        let tail = self.log_tail(&name, 5).await;
        if !tail.is_empty() {
            text.push_str(&format!("; the last lines of its log: {}", tail.join(" | ")));
        }
        truncate(&text, MAX_REASON * 2).to_string()
    }

    /// Remove pod `name` at once; a pod already gone is fine.
    async fn remove(&self, name: &str) -> Result<(), String> {
        let out = self.run(&["pod", "rm", "-f", "-t", "0", "--ignore", name], None, CALL_TIMEOUT).await?;
        if out.success {
            Ok(())
        } else {
            Err(format!("podman could not remove pod {name}: {}", out.reason()))
        }
    }

    async fn create_pod(&self, pod: &Pod) -> Result<(), String> {
        let (name, pod, volumes) = prepare(pod)?;
        let yaml =
            serde_yaml_ng::to_string(&pod).map_err(|e| format!("cannot write pod {name} as YAML: {e}"))?;
        let mut unfinished = Unfinished { program: self.program.clone(), name: name.clone(), armed: true };
        let play = ["kube", "play", "--start=false", "--network", &self.network, "-"];
        let out = self.run(&play, Some(yaml.as_bytes()), START_TIMEOUT).await?;
        let failure = if !out.success {
            Some(match pulling(&out.stderr) {
                Some(image) => format!(
                    "podman cannot pull image {image} for pod {name}: {}; check the image name and that this host \
                     reaches its registry, or build or load the image here",
                    out.reason()
                ),
                None => format!("podman could not create pod {name}: {}", out.reason()),
            })
        } else if let Err(e) = self.open_volumes(&volumes).await {
            Some(e)
        } else {
            let out = self.run(&["pod", "start", &name], None, START_TIMEOUT).await?;
            if out.success {
                None
            } else {
                Some(format!("podman could not start pod {name}: {}", self.explain(out.reason()).await))
            }
        };
        let Some(failure) = failure else {
            unfinished.armed = false;
            return Ok(());
        };
        match self.remove(&name).await {
            Ok(()) => unfinished.armed = false,
            Err(e) => log::warn!("{e}"),
        }
        Err(failure)
    }

    /// The last `lines` lines of container `full_name`'s log, its standard output and error
    /// merged in time order.
    async fn log_tail(&self, full_name: &str, lines: usize) -> Vec<String> {
        let n = lines.min(MAX_LOG_LINES).to_string();
        let Ok(out) = self.run(&["logs", "--timestamps", "--tail", &n, full_name], None, CALL_TIMEOUT).await
        else {
            return Vec::new();
        };
        if !out.success {
            return Vec::new();
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut all: Vec<(&str, &str)> =
            stdout.lines().chain(out.stderr.lines()).map(split_timestamp).collect();
        // Stable: lines of one stream that share a timestamp keep their order.
        all.sort_by(|a, b| a.0.cmp(b.0));
        let skip = all.len().saturating_sub(lines);
        all.into_iter().skip(skip).map(|(_, l)| l.to_string()).collect()
    }

    /// Events about pod `name` and its containers (`container` among them even when the pod is
    /// gone), oldest first.
    async fn pod_events(&self, name: &str, container: &str) -> Vec<String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Inspect {
            #[serde(default)]
            created: String,
            #[serde(default)]
            containers: Option<Vec<Member>>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Member {
            name: String,
        }
        let mut since = "24h".to_string();
        let mut names = vec![format!("{name}-{container}")];
        if let Ok(out) = self.run(&["pod", "inspect", "--format", "json", name], None, CALL_TIMEOUT).await {
            // podman 4.3 prints one object, later versions an array.
            let one = serde_json::from_slice::<Inspect>(&out.stdout).ok().or_else(|| {
                serde_json::from_slice::<Vec<Inspect>>(&out.stdout).ok().and_then(|v| v.into_iter().next())
            });
            if let Some(p) = one {
                if !p.created.is_empty() {
                    since = p.created;
                }
                names.extend(
                    p.containers
                        .into_iter()
                        .flatten()
                        .map(|c| c.name)
                        .filter(|n| n.starts_with(&format!("{name}-"))),
                );
            }
        }
        names.sort();
        names.dedup();
        // `--until 1s`: one second from now (see the module doc); filters of different keys
        // would AND, so the pod's own events are a query of their own.
        let base = ["events", "--format", "json", "--since", &since, "--until", "1s"];
        let mut containers: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        for n in &names {
            containers.push("--filter".into());
            containers.push(format!("container={n}"));
        }
        let containers: Vec<&str> = containers.iter().map(String::as_str).collect();
        let pod_filter = format!("pod={name}");
        let mut pod_args = base.to_vec();
        pod_args.extend(["--filter", &pod_filter]);
        let (a, b) = smol::future::zip(
            self.run(&containers, None, CALL_TIMEOUT),
            self.run(&pod_args, None, CALL_TIMEOUT),
        )
        .await;
        let mut events: Vec<Event> = [a, b]
            .into_iter()
            .flatten()
            .flat_map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Event>(l).ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        events.sort_by(|a, b| a.time.cmp(&b.time));
        let skip = events.len().saturating_sub(MAX_DIAG_EVENTS);
        events.into_iter().skip(skip).map(|e| e.line()).collect()
    }

    /// One watch: start `podman events`, list, then report changes until the stream or a list
    /// fails.
    async fn watch_once(
        &self,
        selector: &Selector,
        on: &mut (dyn FnMut(PodEvent) + Send + '_),
    ) -> Result<(), String> {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let since = since.saturating_sub(EVENTS_OVERLAP_SECS).to_string();
        let args = [
            "events",
            "--format",
            "json",
            "--filter",
            "type=container",
            "--filter",
            "type=pod",
            "--since",
            &since,
        ];
        let mut std_cmd = std::process::Command::new(&self.program);
        std_cmd.args(args);
        // A controller killed outright drops no future: the kernel ends this watch with it, or
        // it would outlive every controller that started one.
        #[cfg(target_os = "linux")]
        unsafe {
            use std::os::unix::process::CommandExt;
            std_cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGKILL))
                    .map_err(std::io::Error::from)
            });
        }
        // Stdio is set on the converted command: the conversion does not carry it over.
        let mut cmd = Command::from(std_cmd);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true);
        let mut child: Child =
            cmd.spawn().map_err(|e| format!("cannot run `{} events`: {e}", self.program))?;
        let stdout = child.stdout.take().ok_or("podman events has no output")?;
        let mut lines = Lines { reader: BufReader::new(stdout), buf: Vec::new(), over: false };

        let seen = self.snapshot(selector).await?;
        let mut known: BTreeMap<String, PodInfo> = BTreeMap::new();
        let mut ids: HashSet<String> = HashSet::new();
        for s in &seen {
            known.insert(s.info.name.clone(), s.info.clone());
            ids.extend(s.ids.iter().cloned());
        }
        on(PodEvent::Listed(seen.into_iter().map(|s| s.info).collect()));
        let mut resync_at = Instant::now() + RESYNC;
        let mut missing: HashSet<String> = HashSet::new();

        loop {
            let next = async { Some(lines.next().await) }
                .or(async {
                    Timer::at(resync_at).await;
                    None
                })
                .await;
            let mut ended = false;
            match next {
                None => {} // a quiet RESYNC: list anyway
                Some(None) => ended = true,
                Some(Some(Err(e))) => {
                    log::warn!("podman watch: {e}");
                    continue;
                }
                Some(Some(Ok(line))) => {
                    if !self.concerns(&line, selector, &ids) {
                        continue;
                    }
                    // Let the burst finish, then list once.
                    let until = Instant::now() + DEBOUNCE_MAX;
                    loop {
                        let quiet = Instant::now() + DEBOUNCE;
                        let more = async { Some(lines.next().await) }
                            .or(async {
                                Timer::at(quiet.min(until)).await;
                                None
                            })
                            .await;
                        match more {
                            None => break,
                            Some(None) => {
                                ended = true;
                                break;
                            }
                            Some(Some(_)) if Instant::now() >= until => break,
                            Some(Some(_)) => {}
                        }
                    }
                }
            }
            let seen = self.snapshot(selector).await?;
            let mut now: BTreeMap<String, PodInfo> = BTreeMap::new();
            ids.clear();
            for s in seen {
                ids.extend(s.ids);
                if known.get(&s.info.name) != Some(&s.info) {
                    on(PodEvent::Changed(s.info.clone()));
                }
                now.insert(s.info.name.clone(), s.info);
            }
            resync_at = Instant::now() + RESYNC;
            // A pod missing from one listing is reported deleted only when the next one (soon)
            // misses it too: a listing taken while podman creates or removes other pods has been
            // seen to leave out one that is there.
            for (name, info) in std::mem::take(&mut known) {
                match now.entry(name) {
                    std::collections::btree_map::Entry::Occupied(e) => {
                        missing.remove(e.key());
                    }
                    std::collections::btree_map::Entry::Vacant(e) if missing.remove(e.key()) => {
                        on(PodEvent::Deleted { name: e.key().clone(), labels: info.labels });
                    }
                    std::collections::btree_map::Entry::Vacant(e) => {
                        missing.insert(e.key().clone());
                        e.insert(info);
                        resync_at = Instant::now() + RECHECK;
                    }
                }
            }
            known = now;
            if ended {
                let status = child.status().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                return Err(format!("`{} events` ended ({status})", self.program));
            }
        }
    }

    /// Whether an event line may concern the watched pods (an unreadable line is logged).
    fn concerns(&self, line: &[u8], selector: &Selector, ids: &HashSet<String>) -> bool {
        match serde_json::from_slice::<Event>(line) {
            Ok(e) => e.concerns(selector, ids),
            Err(e) => {
                log::debug!(
                    "podman watch: an event this backend cannot read ({e}): {}",
                    String::from_utf8_lossy(line)
                );
                false
            }
        }
    }
}

/// `2026-01-02T03:04:05.123456789Z text` as (timestamp, text).
fn split_timestamp(line: &str) -> (&str, &str) {
    match line.split_once(' ') {
        Some((t, rest)) if t.len() >= 20 && t.as_bytes()[4] == b'-' && t.contains('T') => (t, rest),
        _ => ("", line),
    }
}

impl PodBackend for Podman {
    fn kind(&self) -> &'static str {
        "podman"
    }

    /// Create and start the pod: `kube play --start=false` (image pulls: a pull that fails fails
    /// here), the emptyDir volumes opened, then `pod start` (init containers run to their end).
    /// On any failure the pod is removed again and the error says why in podman's words.
    fn create<'a>(&'a self, pod: &'a Pod) -> BackendFuture<'a, Result<(), String>> {
        Box::pin(self.create_pod(pod))
    }

    fn delete<'a>(&'a self, name: &'a str) -> BackendFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if !valid_name(name) {
                return Err(format!("'{}' is not a pod name", truncate(name, 100)));
            }
            self.remove(name).await
        })
    }

    fn list<'a>(&'a self, selector: &'a Selector) -> BackendFuture<'a, Result<Vec<PodInfo>, String>> {
        Box::pin(async move { Ok(self.snapshot(selector).await?.into_iter().map(|s| s.info).collect()) })
    }

    fn watch<'a>(
        &'a self,
        selector: &'a Selector,
        mut on: Box<dyn FnMut(PodEvent) + Send + 'a>,
    ) -> BackendFuture<'a, ()> {
        Box::pin(async move {
            let mut backoff = BACKOFF_MIN;
            loop {
                let started = Instant::now();
                let e = self.watch_once(selector, &mut *on).await.err().unwrap_or_default();
                if started.elapsed() >= RESYNC {
                    backoff = BACKOFF_MIN;
                }
                log::warn!("podman watch: {e}; listing again in {}s", backoff.as_secs());
                Timer::after(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        })
    }

    fn diagnose<'a>(
        &'a self,
        name: &'a str,
        container: &'a str,
        lines: usize,
    ) -> BackendFuture<'a, Diagnosis> {
        Box::pin(async move {
            if !valid_name(name) || !valid_name(container) {
                return Diagnosis::default();
            }
            let full = format!("{name}-{container}");
            let (events, log_tail) =
                smol::future::zip(self.pod_events(name, container), self.log_tail(&full, lines)).await;
            Diagnosis { events, log_tail }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, EmptyDirVolumeSource, PodSpec, Volume, VolumeMount};

    fn state(status: &str, code: i32) -> InspectedState {
        InspectedState { status: status.into(), exit_code: code, oom_killed: false, error: String::new() }
    }

    #[test]
    fn states_map_to_kubernetes_names() {
        assert_eq!(container_state(&state("running", 0)), ContainerState::Running);
        assert_eq!(
            container_state(&state("exited", 3)),
            ContainerState::Terminated { exit_code: 3, reason: "Error".into(), message: String::new() }
        );
        assert_eq!(
            container_state(&state("exited", 0)),
            ContainerState::Terminated { exit_code: 0, reason: "Completed".into(), message: String::new() }
        );
        let mut oom = state("exited", 137);
        oom.oom_killed = true;
        assert!(
            matches!(container_state(&oom), ContainerState::Terminated { reason, .. } if reason == "OOMKilled")
        );
        assert!(
            matches!(container_state(&state("created", 0)), ContainerState::Waiting { reason, .. } if reason == "ContainerCreating")
        );
        let mut failed = state("created", 0);
        failed.error = "exec: no such file".into();
        assert_eq!(
            container_state(&failed),
            ContainerState::Waiting {
                reason: "CreateContainerError".into(),
                message: "exec: no such file".into()
            }
        );
    }

    #[test]
    fn phase_follows_kubernetes_for_restart_policy_never() {
        use ContainerState::*;
        let t = |c| Terminated { exit_code: c, reason: String::new(), message: String::new() };
        let w = || Waiting { reason: "ContainerCreating".into(), message: String::new() };
        assert_eq!(phase(&[]), Phase::Unknown);
        assert_eq!(phase(&[(true, t(0)), (false, Running)]), Phase::Running);
        assert_eq!(phase(&[(true, Running), (false, w())]), Phase::Pending);
        assert_eq!(phase(&[(true, t(1)), (false, w())]), Phase::Failed);
        assert_eq!(phase(&[(false, t(3)), (false, Running)]), Phase::Running);
        assert_eq!(phase(&[(false, t(3)), (false, t(0))]), Phase::Failed);
        assert_eq!(phase(&[(true, t(0)), (false, t(0))]), Phase::Succeeded);
        assert_eq!(phase(&[(false, w()), (false, t(0))]), Phase::Pending);
    }

    #[test]
    fn reasons_are_podman_sentences_without_noise() {
        let stderr = "Trying to pull registry.invalid/nope:1...\nError: initializing source \
                      docker://registry.invalid/nope:1: pinging container registry registry.invalid: no such host\n";
        assert_eq!(
            podman_reason(stderr),
            "initializing source docker://registry.invalid/nope:1: pinging container registry registry.invalid: no such host"
        );
        assert_eq!(pulling(stderr), Some("registry.invalid/nope:1"));
        let logged = "time=\"2026\" level=warning msg=\"ignored\"\ntime=\"2026\" level=error msg=\"Removing \\\"x\\\": busy\"\n\
                      failed to connect to syslog: Initialization\n";
        assert_eq!(podman_reason(logged), "Removing \"x\": busy");
        assert_eq!(podman_reason("something odd\n"), "something odd");
        assert!(podman_reason(&"x".repeat(10 * MAX_REASON)).len() <= MAX_REASON);
    }

    #[test]
    fn names_must_be_dns_labels() {
        assert!(valid_name("agent-x1b2c"));
        for bad in ["", "-rm", "a-", "A", "a b", "a_b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    fn mount(name: &str) -> VolumeMount {
        VolumeMount { name: name.into(), mount_path: "/ws".into(), ..Default::default() }
    }

    #[test]
    fn empty_dirs_get_names_of_their_pod_and_init_containers_are_kept() {
        let c = |n: &str, v: &str| Container {
            name: n.into(),
            volume_mounts: Some(vec![mount(v)]),
            ..Default::default()
        };
        let pod = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("p-1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                init_containers: Some(vec![c("init", "ws")]),
                containers: vec![c("a", "ws"), c("b", "cfg")],
                volumes: Some(vec![
                    Volume {
                        name: "ws".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    },
                    Volume { name: "cfg".into(), ..Default::default() },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (name, out, volumes) = prepare(&pod).unwrap();
        assert_eq!(name, "p-1");
        assert_eq!(volumes, vec!["p-1-ws".to_string()]);
        let spec = out.spec.unwrap();
        let mounts = |c: &Container| c.volume_mounts.as_ref().unwrap()[0].name.clone();
        assert_eq!(mounts(&spec.containers[0]), "p-1-ws");
        assert_eq!(mounts(&spec.containers[1]), "cfg");
        assert_eq!(mounts(&spec.init_containers.as_ref().unwrap()[0]), "p-1-ws");
        assert_eq!(spec.volumes.unwrap()[1].name, "cfg");
        let annotations = out.metadata.annotations.unwrap();
        assert_eq!(annotations[INIT_TYPE_ANNOTATION], "always");
        assert_eq!(annotations[INIT_NAMES_ANNOTATION], "init");

        let mut bad = pod.clone();
        bad.metadata.name = Some("--rm".into());
        assert!(prepare(&bad).unwrap_err().contains("not a DNS label"));
    }

    #[test]
    fn events_concern_the_watched_pods_only() {
        let sel: Selector = [("app".to_string(), "wisp".to_string())].into();
        let ids: HashSet<String> = ["c1".to_string()].into();
        let ev = |j: &str| serde_json::from_str::<Event>(j).unwrap();
        assert!(ev(r#"{"Type":"pod","ID":"p9","Status":"create","Attributes":null}"#).concerns(&sel, &ids));
        assert!(ev(r#"{"Type":"container","ID":"c1","Status":"died"}"#).concerns(&sel, &ids));
        assert!(ev(r#"{"Type":"container","ID":"c2","Attributes":{"app":"wisp"}}"#).concerns(&sel, &ids));
        assert!(!ev(r#"{"Type":"container","ID":"c3","Attributes":{"app":"other"}}"#).concerns(&sel, &ids));
        assert!(!ev(r#"{"Type":"container","ID":"c4","Attributes":null}"#).concerns(&sel, &ids));
        let died =
            ev(r#"{"Type":"container","ID":"c1","Name":"p-jnlp","Status":"died","ContainerExitCode":3,
                         "Time":"2026-12-01T12:57:40.122438569Z"}"#);
        assert_eq!(died.line(), "2026-12-01T12:57:40Z container p-jnlp died (exit code 3)");
    }

    #[test]
    fn init_containers_are_the_ones_the_annotation_names() {
        // As podman 4.3.1 answers: every container has the pod's annotations.
        let pods: Vec<PsPod> = serde_json::from_str(
            r#"[{"Id":"p1","Name":"p","InfraId":"i","Labels":{"app":"wisp"},
                 "Containers":[{"Id":"i"},{"Id":"c2"},{"Id":"c1"},{"Id":"c3"}]},
                {"Id":"p2","Name":"q","InfraId":"j","Labels":{"app":"other"},"Containers":[{"Id":"j"}]}]"#,
        )
        .unwrap();
        let annotations =
            format!(r#"{{"{INIT_NAMES_ANNOTATION}":"setup","{INIT_TYPE_ANNOTATION}":"always"}}"#);
        let c = |id: &str, name: &str, created: &str, state: &str| {
            format!(
                r#"{{"Id":"{id}","Name":"{name}","Created":"{created}","State":{state},
                    "Config":{{"Annotations":{annotations}}}}}"#
            )
        };
        let inspected = format!(
            "[{},{},{}]",
            c("c1", "p-jnlp", "2026-01-01T00:00:02Z", r#"{"Status":"running"}"#),
            c("c2", "p-setup", "2026-01-01T00:00:01Z", r#"{"Status":"exited","ExitCode":0}"#),
            c(
                "c3",
                "p-tools",
                "2026-01-01T00:00:03Z",
                r#"{"Status":"exited","ExitCode":3,"OOMKilled":false}"#
            ),
        );
        let inspected: Vec<Inspected> = serde_json::from_str(&inspected).unwrap();
        let sel: Selector = [("app".to_string(), "wisp".to_string())].into();
        let seen = assemble(pods, inspected, &sel);
        assert_eq!(seen.len(), 1, "the other pod does not match");
        let p = &seen[0].info;
        let names: Vec<&str> = p.containers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["setup", "jnlp", "tools"]);
        assert_eq!(p.phase, Phase::Running);
        assert_eq!(seen[0].ids, ["p1", "i", "c2", "c1", "c3"]);
    }

    #[test]
    fn log_lines_lose_their_timestamps() {
        assert_eq!(
            split_timestamp("2026-12-01T13:00:16.841408990Z out 1"),
            ("2026-12-01T13:00:16.841408990Z", "out 1")
        );
        assert_eq!(split_timestamp("plain line"), ("", "plain line"));
    }
}
