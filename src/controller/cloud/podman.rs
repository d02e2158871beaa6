//! The podman backend: Kubernetes Pod manifests run by the local podman (`podman kube play`), for
//! ARM boxes and edge hosts without a cluster.
//!
//! It talks to podman's REST API on a Unix socket ([`super::podman_api`]): the service a user
//! runs (the cloud's `socket`, e.g. systemd's `podman.socket`) or, by default, a `podman system
//! service` the controller starts, supervises and stops itself. A process per call (the way this
//! backend first drove the `podman` program) cost the controller about a millisecond of CPU
//! each, five or more per pod; a request costs some tens of microseconds. Only a diagnosis (the
//! events and log lines of a pod that failed, rare) still runs the `podman` program. Every call
//! is bounded in time and in the bytes read. The watch reads one event stream (containers and
//! pods) and, after each burst of events about this selector's pods, lists them again and
//! reports what changed; a full list every [`RESYNC`] is the safety net, and a stream that ends
//! is opened again with a new [`PodEvent::Listed`].
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
//!   pod restart, which nothing here does). Nothing else tells an init container from another,
//!   and the API's container list shows labels, not annotations: the backend writes the init
//!   containers' names into the pod label [`INIT_NAMES_LABEL`] (which podman copies onto every
//!   container) and leaves it out of the labels it reports.
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
use super::podman_api::{ApiContainer, ApiDetail, ApiEvent, ApiPod, PodmanApi};
use crate::text::truncate;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use smol::future::FutureExt as _;
use smol::io::{AsyncRead, AsyncReadExt};
use smol::process::{Command, Stdio};
use smol::Timer;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The pod annotation that keeps init containers after they ran (podman removes them otherwise).
pub const INIT_TYPE_ANNOTATION: &str = "io.podman.annotations.init.container.type";
/// The pod label (so on every container) that names the pod's init containers, `.` separated
/// (container names have no dots): podman keeps no other trace of which containers are init
/// containers.
pub const INIT_NAMES_LABEL: &str = "wisp.dev/init-containers";
/// Most a diagnosis' `podman` command may take: podman answers in well under a second; longer
/// means it hangs on its lock.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most `kube play` (image pulls) or `pod start` (init containers) may take.
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// Most bytes read from one command's standard output (a listing of many pods is some KiB each).
const MAX_OUTPUT: usize = 16 << 20;
/// Most bytes kept of one command's standard error (only its reason is wanted).
const MAX_STDERR: usize = 64 << 10;
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
#[derive(Debug)]
pub struct Podman {
    program: String,
    network: String,
    api: PodmanApi,
    /// What inspections told of terminated containers (it does not change), by id; only the
    /// containers of the last listing are kept.
    details: Mutex<HashMap<String, ApiDetail>>,
}

impl Podman {
    /// A backend for podman's service on `socket` (`unix://PATH` or `PATH`) or, when that is
    /// unset, for one it starts with `program` (default `podman`). Pods go on `network`
    /// (default `host`, so agents reach a controller listening on 127.0.0.1; anything else is
    /// the network `kube play` puts them on). A diagnosis runs `program`.
    pub fn new(program: Option<String>, network: Option<String>, socket: Option<String>) -> Self {
        let program = program.filter(|p| !p.is_empty()).unwrap_or_else(|| "podman".into());
        let api = match socket.filter(|s| !s.is_empty()) {
            Some(s) => PodmanApi::new(s),
            None => PodmanApi::own(&program),
        };
        Self {
            program,
            network: network.filter(|n| !n.is_empty()).unwrap_or_else(|| "host".into()),
            api,
            details: Mutex::new(HashMap::new()),
        }
    }
}

/// What one podman command did.
struct Output {
    success: bool,
    stdout: Vec<u8>,
    stderr: String,
}

/// Read `r` to its end, keeping the first `cap` bytes.
async fn read_capped(mut r: impl AsyncRead + Unpin, cap: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap - buf.len();
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    buf
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

/// The image podman could not pull, from its message (`... initializing source docker://IMAGE:
/// ...`), if it says so.
fn pulling(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once("initializing source docker://")?;
    let image = rest.split(": ").next()?;
    (!image.is_empty()).then_some(image)
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
        let labels = pod.metadata.labels.get_or_insert_with(Default::default);
        labels.insert(INIT_NAMES_LABEL.into(), init_names.join("."));
    }
    Ok((name, pod, renamed.into_values().collect()))
}

/// Whether `labels` has every pair of `selector`.
fn matches(labels: &BTreeMap<String, String>, selector: &Selector) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A container's state as Kubernetes names it, from its listing (and, once it terminated with
/// a failure, what its inspection told).
fn container_state(c: &ApiContainer, detail: Option<&ApiDetail>) -> ContainerState {
    let (oom, error) = detail.map(|d| (d.oom_killed, d.error.clone())).unwrap_or_default();
    match c.state.as_str() {
        "running" | "paused" | "stopping" => ContainerState::Running,
        "exited" | "stopped" => ContainerState::Terminated {
            exit_code: c.exit_code,
            reason: if oom {
                "OOMKilled"
            } else if c.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .into(),
            message: error,
        },
        "created" | "configured" | "initialized" | "" => ContainerState::Waiting {
            reason: if error.is_empty() { "ContainerCreating" } else { "CreateContainerError" }.into(),
            message: error,
        },
        other => {
            ContainerState::Waiting { reason: "Unknown".into(), message: format!("podman state {other}") }
        }
    }
}

/// Whether a container's listing leaves out what an inspection would add (a terminated
/// container that failed: OOM kill or start error).
fn wants_detail(c: &ApiContainer) -> bool {
    matches!(c.state.as_str(), "exited" | "stopped") && c.exit_code != 0
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

/// Build [`Seen`] pods from a pod listing, their containers' listing and what inspections
/// told of some (by container id).
fn assemble(
    pods: Vec<ApiPod>,
    containers: Vec<ApiContainer>,
    details: &HashMap<String, ApiDetail>,
    selector: &Selector,
) -> Vec<Seen> {
    let mut by_pod: HashMap<String, Vec<ApiContainer>> = HashMap::new();
    for c in containers {
        by_pod.entry(c.pod.clone()).or_default().push(c);
    }
    let mut out = Vec::new();
    for p in pods {
        let mut labels = p.labels.unwrap_or_default();
        if !matches(&labels, selector) {
            continue;
        }
        let init_names: HashSet<String> = labels
            .remove(INIT_NAMES_LABEL)
            .map(|v| v.split('.').map(str::to_string).collect())
            .unwrap_or_default();
        let mut ids = vec![p.id.clone()];
        let mut cs = Vec::new();
        for c in by_pod.remove(&p.id).unwrap_or_default() {
            ids.push(c.id.clone());
            if !c.is_infra {
                cs.push(c);
            }
        }
        let prefix = format!("{}-", p.name);
        let short = |c: &ApiContainer| {
            let name = c.names.first().map(String::as_str).unwrap_or(&c.id);
            name.strip_prefix(&prefix).unwrap_or(name).to_string()
        };
        let init = |c: &ApiContainer| init_names.contains(&short(c));
        // Init containers first; each kind in the order podman made them (the manifest's).
        cs.sort_by(|a, b| (!init(a), &a.created).cmp(&(!init(b), &b.created)));
        let states: Vec<(bool, String, ContainerState)> =
            cs.iter().map(|c| (init(c), short(c), container_state(c, details.get(&c.id)))).collect();
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

/// One `podman events --format json` line (a diagnosis reads them), the fields used.
#[derive(Deserialize)]
struct Event {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "Time", default)]
    time: String,
    #[serde(rename = "ContainerExitCode", default)]
    exit_code: Option<i64>,
}

/// Whether an event of the API's stream may change what a watch of `selector` reports, given
/// the ids of its pods and their containers.
fn concerns(e: &ApiEvent, selector: &Selector, ids: &HashSet<String>) -> bool {
    if e.kind == "pod" {
        return true; // few, and a new pod's event carries no labels
    }
    let attrs = &e.actor.attributes;
    if ids.contains(&e.actor.id) || attrs.get("podId").is_some_and(|p| ids.contains(p)) {
        return true;
    }
    // A container of a pod not listed yet: it carries the pod's labels.
    !selector.is_empty() && selector.iter().all(|(k, v)| attrs.get(k) == Some(v))
}

impl Event {
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

/// Removes a pod whose creation did not finish (the future was dropped: a timeout), from a
/// task of its own since a drop cannot wait.
struct Unfinished {
    api: PodmanApi,
    name: String,
    armed: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (api, name) = (self.api.clone(), std::mem::take(&mut self.name));
        smol::spawn(async move {
            if let Err(e) = api.remove_pod(&name).await {
                log::warn!("{e}");
            }
        })
        .detach();
    }
}

impl Podman {
    /// Run podman with `args`, for at most `limit` (a diagnosis only: the rest is the API).
    async fn run(&self, args: &[&str], limit: Duration) -> Result<Output, String> {
        let what =
            format!("`{} {}`", self.program, args.iter().take(2).copied().collect::<Vec<_>>().join(" "));
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {what}: {e} (install podman, or name the program in the cloud's `podman` setting)"
                )
            })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let work = async {
            let out = async {
                match stdout {
                    Some(r) => read_capped(r, MAX_OUTPUT).await,
                    None => Vec::new(),
                }
            };
            let err = async {
                match stderr {
                    Some(r) => read_capped(r, MAX_STDERR).await,
                    None => Vec::new(),
                }
            };
            let (stdout, stderr) = smol::future::zip(out, err).await;
            (stdout, stderr, child.status().await)
        };
        let done = async { Some(work.await) }
            .or(async {
                Timer::after(limit).await;
                None
            })
            .await;
        let Some((stdout, stderr, status)) = done else {
            return Err(format!("{what} gave no answer within {}s", limit.as_secs()));
        };
        let status = status.map_err(|e| format!("waiting for {what}: {e}"))?;
        Ok(Output {
            success: status.success(),
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// The pods matching `selector`, with their containers' states: two requests, and one
    /// inspection for each container that newly terminated with a failure.
    async fn snapshot(&self, selector: &Selector) -> Result<Vec<Seen>, String> {
        let pods: Vec<ApiPod> = self
            .api
            .pods(selector)
            .await?
            .into_iter()
            .filter(|p| matches(p.labels.as_ref().unwrap_or(&BTreeMap::new()), selector))
            .collect();
        let ids: Vec<&str> = pods.iter().map(|p| p.id.as_str()).collect();
        // A container removed since the pod listing is simply not listed.
        let containers = self.api.containers(&ids).await?;
        let known: HashSet<String> = self.details.lock().unwrap().keys().cloned().collect();
        let mut found = Vec::new();
        for c in containers.iter().filter(|c| wants_detail(c) && !known.contains(&c.id)) {
            match self.api.container_detail(&c.id).await {
                Ok(Some(d)) => found.push((c.id.clone(), d)),
                Ok(None) => {}
                Err(e) => log::debug!("podman watch: {e}"),
            }
        }
        let mut details = self.details.lock().unwrap();
        details.extend(found);
        let listed: HashSet<&str> = containers.iter().map(|c| c.id.as_str()).collect();
        details.retain(|id, _| listed.contains(id.as_str()));
        Ok(assemble(pods, containers, &details, selector))
    }

    /// Make each volume's directory writable by every UID (Kubernetes' emptyDir mode).
    async fn open_volumes(&self, volumes: &[String]) -> Result<(), String> {
        let found = self.api.volume_mountpoints(volumes).await?;
        for v in volumes {
            let Some(mountpoint) = found.get(v) else {
                return Err(format!("podman made no volume {v} for the pod's emptyDir"));
            };
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(mountpoint, std::fs::Permissions::from_mode(0o777)).map_err(|e| {
                format!(
                    "cannot make emptyDir volume {v} writable for every container (chmod 0777 {mountpoint}): {e}; \
                     run the controller on the podman host as the user podman runs as"
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
        let Ok(out) = self.run(&["container", "inspect", "--format", "{{.Name}}", &id], CALL_TIMEOUT).await
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

    async fn create_pod(&self, pod: &Pod) -> Result<(), String> {
        let (name, pod, volumes) = prepare(pod)?;
        let yaml =
            serde_yaml_ng::to_string(&pod).map_err(|e| format!("cannot write pod {name} as YAML: {e}"))?;
        let mut unfinished = Unfinished { api: self.api.clone(), name: name.clone(), armed: true };
        let failure = match self.api.play_kube(&yaml, &self.network, false, START_TIMEOUT).await {
            Err(e) => Some(match pulling(&e) {
                Some(image) => format!(
                    "podman cannot pull image {image} for pod {name}: {}; check the image name and that this host \
                     reaches its registry, or build or load the image here",
                    e.strip_prefix("playing YAML file: ").unwrap_or(&e)
                ),
                None => format!("podman could not create pod {name}: {e}"),
            }),
            Ok(()) => match self.open_volumes(&volumes).await {
                Err(e) => Some(e),
                Ok(()) => match self.api.start_pod(&name, START_TIMEOUT).await {
                    Ok(()) => None,
                    Err(e) => Some(format!("podman could not start pod {name}: {}", self.explain(e).await)),
                },
            },
        };
        let Some(failure) = failure else {
            unfinished.armed = false;
            return Ok(());
        };
        match self.api.remove_pod(&name).await {
            Ok(()) => unfinished.armed = false,
            Err(e) => log::warn!("{e}"),
        }
        Err(failure)
    }

    /// The last `lines` lines of container `full_name`'s log, its standard output and error
    /// merged in time order.
    async fn log_tail(&self, full_name: &str, lines: usize) -> Vec<String> {
        let n = lines.min(MAX_LOG_LINES).to_string();
        let Ok(out) = self.run(&["logs", "--timestamps", "--tail", &n, full_name], CALL_TIMEOUT).await else {
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
        if let Ok(out) = self.run(&["pod", "inspect", "--format", "json", name], CALL_TIMEOUT).await {
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
        let (a, b) =
            smol::future::zip(self.run(&containers, CALL_TIMEOUT), self.run(&pod_args, CALL_TIMEOUT)).await;
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

    /// One watch: open the event stream, list, then report changes until the stream or a
    /// list fails.
    async fn watch_once(
        &self,
        selector: &Selector,
        on: &mut (dyn FnMut(PodEvent) + Send + '_),
    ) -> Result<(), String> {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut lines = self.api.events(since.saturating_sub(EVENTS_OVERLAP_SECS)).await?;
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
                    if !event_concerns(&line, selector, &ids) {
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
                return Err("podman's event stream ended".into());
            }
        }
    }
}

/// Whether an event line may concern the watched pods (an unreadable line is logged).
fn event_concerns(line: &[u8], selector: &Selector, ids: &HashSet<String>) -> bool {
    match serde_json::from_slice::<ApiEvent>(line) {
        Ok(e) => concerns(&e, selector, ids),
        Err(e) => {
            log::debug!(
                "podman watch: an event this backend cannot read ({e}): {}",
                String::from_utf8_lossy(line)
            );
            false
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
            self.api.remove_pod(name).await
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

    fn listed(state: &str, code: i32) -> ApiContainer {
        serde_json::from_value(serde_json::json!({"Id": "c", "State": state, "ExitCode": code})).unwrap()
    }

    #[test]
    fn states_map_to_kubernetes_names() {
        let st = |state, code| container_state(&listed(state, code), None);
        assert_eq!(st("running", 0), ContainerState::Running);
        assert_eq!(
            st("exited", 3),
            ContainerState::Terminated { exit_code: 3, reason: "Error".into(), message: String::new() }
        );
        assert_eq!(
            st("exited", 0),
            ContainerState::Terminated { exit_code: 0, reason: "Completed".into(), message: String::new() }
        );
        assert!(wants_detail(&listed("exited", 137)) && !wants_detail(&listed("exited", 0)));
        let oom = ApiDetail { oom_killed: true, error: String::new() };
        assert!(matches!(
            container_state(&listed("exited", 137), Some(&oom)),
            ContainerState::Terminated { reason, .. } if reason == "OOMKilled"
        ));
        assert!(
            matches!(st("created", 0), ContainerState::Waiting { reason, .. } if reason == "ContainerCreating")
        );
        let failed = ApiDetail { oom_killed: false, error: "exec: no such file".into() };
        assert_eq!(
            container_state(&listed("created", 0), Some(&failed)),
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
    fn the_image_that_could_not_be_pulled_is_named() {
        // podman 4.3.1's answer to a kube play whose image cannot be pulled.
        let message = "playing YAML file: initializing source docker://registry.invalid/nope:1: pinging container \
                       registry registry.invalid: Get \"https://registry.invalid/v2/\": dial tcp: no such host";
        assert_eq!(pulling(message), Some("registry.invalid/nope:1"));
        assert_eq!(pulling("playing YAML file: something else"), None);
        assert_eq!(pulling("initializing source docker://: x"), None);
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
        assert_eq!(out.metadata.annotations.unwrap()[INIT_TYPE_ANNOTATION], "always");
        assert_eq!(out.metadata.labels.unwrap()[INIT_NAMES_LABEL], "init");

        let mut bad = pod.clone();
        bad.metadata.name = Some("--rm".into());
        assert!(prepare(&bad).unwrap_err().contains("not a DNS label"));
    }

    #[test]
    fn events_concern_the_watched_pods_only() {
        let sel: Selector = [("app".to_string(), "wisp".to_string())].into();
        let ids: HashSet<String> = ["c1".to_string(), "p1".to_string()].into();
        let ev = |kind: &str, id: &str, attrs: serde_json::Value| {
            let line =
                serde_json::json!({"Type": kind, "Action": "x", "Actor": {"ID": id, "Attributes": attrs}});
            event_concerns(line.to_string().as_bytes(), &sel, &ids)
        };
        assert!(ev("pod", "p9", serde_json::json!({})));
        assert!(ev("container", "c1", serde_json::json!({})));
        assert!(ev("container", "c9", serde_json::json!({"podId": "p1"})));
        assert!(ev("container", "c2", serde_json::json!({"app": "wisp"})));
        assert!(!ev("container", "c3", serde_json::json!({"app": "other"})));
        assert!(!ev("container", "c4", serde_json::json!({})));
        assert!(!event_concerns(b"not json", &sel, &ids));
        let died: Event = serde_json::from_str(
            r#"{"Type":"container","ID":"c1","Name":"p-jnlp","Status":"died","ContainerExitCode":3,
                "Time":"2026-12-01T12:57:40.122438569Z"}"#,
        )
        .unwrap();
        assert_eq!(died.line(), "2026-12-01T12:57:40Z container p-jnlp died (exit code 3)");
    }

    #[test]
    fn init_containers_are_the_ones_the_label_names() {
        // As podman 4.3.1's API answers: every container but the infra one has the pod's labels.
        let pods: Vec<ApiPod> = serde_json::from_value(serde_json::json!([
            {"Id": "p1", "Name": "p", "Labels": {"app": "wisp", INIT_NAMES_LABEL: "setup.prep"}},
            {"Id": "p2", "Name": "q", "Labels": {"app": "other"}},
        ]))
        .unwrap();
        let c = |id: &str, name: &str, created: &str, state: &str, code: i32, pod: &str| {
            serde_json::json!({"Id": id, "Names": [name], "Created": created, "State": state, "ExitCode": code,
                               "Pod": pod, "IsInfra": name.ends_with("-infra")})
        };
        let containers: Vec<ApiContainer> = serde_json::from_value(serde_json::json!([
            c("i", "0123-infra", "2026-01-01T00:00:00Z", "running", 0, "p1"),
            c("c1", "p-jnlp", "2026-01-01T00:00:03Z", "running", 0, "p1"),
            c("c2", "p-setup", "2026-01-01T00:00:01Z", "exited", 0, "p1"),
            c("c0", "p-prep", "2026-01-01T00:00:02Z", "exited", 0, "p1"),
            c("c3", "p-tools", "2026-01-01T00:00:04Z", "exited", 137, "p1"),
            c("j", "4567-infra", "2026-01-01T00:00:00Z", "running", 0, "p2"),
        ]))
        .unwrap();
        let details: HashMap<String, ApiDetail> =
            [("c3".to_string(), ApiDetail { oom_killed: true, error: String::new() })].into();
        let sel: Selector = [("app".to_string(), "wisp".to_string())].into();
        let seen = assemble(pods, containers, &details, &sel);
        assert_eq!(seen.len(), 1, "the other pod does not match");
        let p = &seen[0].info;
        let names: Vec<&str> = p.containers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["setup", "prep", "jnlp", "tools"]);
        assert_eq!(p.phase, Phase::Running);
        assert!(
            matches!(&p.containers[3].1, ContainerState::Terminated { reason, .. } if reason == "OOMKilled")
        );
        assert_eq!(
            p.labels,
            Selector::from([("app".to_string(), "wisp".to_string())]),
            "the init label is ours"
        );
        assert_eq!(seen[0].ids, ["p1", "i", "c1", "c2", "c0", "c3"]);
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
