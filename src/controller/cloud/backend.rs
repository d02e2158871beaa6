//! The seam between a pod cloud's life cycle (caps, retention, failures, orphans: `pods.rs`) and
//! what runs the pods: the Kubernetes API (`kubernetes.rs`) or the local podman (`podman.rs`).
//! A backend creates, deletes, lists and watches Pod manifests and tells why a pod failed; it
//! keeps no state of its own about builds or nodes.

use k8s_openapi::api::core::v1::Pod;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

/// A future a backend answers with.
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Labels to select pods by: every pair must match (`a=b,c=d`).
pub type Selector = BTreeMap<String, String>;

/// A pod's phase, as Kubernetes names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted; its containers are not all started (pulling images, init containers running).
    Pending,
    /// Bound and at least one container is running.
    Running,
    /// Every container ended with status 0.
    Succeeded,
    /// Every container ended, at least one with an error (or was killed).
    Failed,
    /// The backend cannot tell.
    Unknown,
}

/// One container's state.
#[allow(missing_docs)] // the fields are Kubernetes' own, named in each variant's line
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Not started yet; `reason` as Kubernetes gives it (`ContainerCreating`, `ErrImagePull`,
    /// `ImagePullBackOff`, `CreateContainerConfigError`, ...).
    Waiting { reason: String, message: String },
    /// Running.
    Running,
    /// Ended with `exit_code`; `reason` such as `Error`, `Completed`, `OOMKilled`.
    Terminated { exit_code: i32, reason: String, message: String },
}

/// What a backend knows of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's name (the node's name).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its phase.
    pub phase: Phase,
    /// `status.reason` (`Evicted`, `DeadlineExceeded`, ...), empty when none.
    pub reason: String,
    /// `status.message`, empty when none.
    pub message: String,
    /// Its containers (init containers first), by name.
    pub containers: Vec<(String, ContainerState)>,
}

/// A change a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvent {
    /// A pod was created or its status changed: its state now.
    Changed(PodInfo),
    /// A pod is gone (deleted by anyone, or removed by the backend).
    Deleted {
        /// The pod's name.
        name: String,
        /// Its labels when last seen.
        labels: BTreeMap<String, String>,
    },
    /// The watch (re)started: these are all the pods that match now. Pods the cloud knew and
    /// that are not in the list are gone.
    Listed(Vec<PodInfo>),
}

/// Why a pod failed, for the build's log: the backend's events and the agent container's last
/// log lines, where it has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnosis {
    /// Events about the pod, oldest first, one line each (`Failed: pulling image "x": ...`).
    pub events: Vec<String>,
    /// The last lines of the given container's log.
    pub log_tail: Vec<String>,
}

/// What runs pods.
pub trait PodBackend: Send + Sync + 'static {
    /// Its kind, for messages: `kubernetes` or `podman`.
    fn kind(&self) -> &'static str;

    /// Create `pod`. An error is a sentence that says what failed (an image that cannot be pulled
    /// may fail here, as podman's does, or later in the pod's status, as Kubernetes' does).
    fn create<'a>(&'a self, pod: &'a Pod) -> BackendFuture<'a, Result<(), String>>;

    /// Delete the pod `name` and its containers, at once (no grace). A pod already gone is not
    /// an error.
    fn delete<'a>(&'a self, name: &'a str) -> BackendFuture<'a, Result<(), String>>;

    /// The pods whose labels match `selector`.
    fn list<'a>(&'a self, selector: &'a Selector) -> BackendFuture<'a, Result<Vec<PodInfo>, String>>;

    /// Watch the pods whose labels match `selector`, calling `on` for every event, until the
    /// returned future is dropped. It begins with [`PodEvent::Listed`] and starts again with a
    /// new `Listed` after any error (logged, with a short backoff); it never returns.
    fn watch<'a>(
        &'a self,
        selector: &'a Selector,
        on: Box<dyn FnMut(PodEvent) + Send + 'a>,
    ) -> BackendFuture<'a, ()>;

    /// What the backend can tell about pod `name`: its events and the last `lines` lines of
    /// `container`'s log. Best effort: whatever cannot be read is left empty.
    fn diagnose<'a>(
        &'a self,
        name: &'a str,
        container: &'a str,
        lines: usize,
    ) -> BackendFuture<'a, Diagnosis>;
}
