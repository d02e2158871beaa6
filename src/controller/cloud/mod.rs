//! Clouds: sources of agents started on demand.
//!
//! Dispatch asks the clouds, in the order they were applied, when no free node matches a queued
//! build: [`Cloud::reserve`] runs under the controller's state lock, so a cloud's caps hold under
//! any race (every reservation of every build is decided under that one lock). A reservation
//! names the node the agent will connect as; the controller adds it at once (in memory: it is
//! stored when its agent first connects, so a pod whose agent never came is an orphan after a
//! restart) and then [`Cloud::launch`] starts the agent off the lock. The cloud reports back
//! through [`Host`]: a pod that failed fails the build it was started for, with the reason; a pod
//! deleted or evicted under a running build fails that build at once.
//!
//! `pods.rs` is the one implementation: pod templates ([`super::template`], which pipelines use
//! too) run by a [`backend`] (`kubernetes.rs` through the Kubernetes API, `podman.rs` through the
//! local podman).

pub mod backend;
pub mod kubernetes;
pub mod podman;
pub mod podman_api;
pub mod pods;

use super::labels::LabelExpr;
use super::store::NodeRecord;
use super::template::PodTemplate;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A future a cloud answers with.
pub type CloudFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a queued build asks a cloud for.
pub struct Want<'a> {
    /// The build.
    pub build: u64,
    /// Its label expression.
    pub expr: &'a LabelExpr,
    /// A pod template the pipeline carries inline (`agent: {kubernetes: ...}`).
    pub inline: Option<&'a PodTemplate>,
    /// Whether a node name is taken already.
    pub taken: &'a dyn Fn(&str) -> bool,
}

/// A cloud's answer to [`Cloud::reserve`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reserve {
    /// It does not serve this build.
    No,
    /// It serves it but is at a cap: the build waits (the sentence says which cap).
    Full(String),
    /// It serves it but will not start agents for it now: the build fails with this sentence.
    Refused(String),
    /// An agent will connect as this node: add it, then [`Cloud::launch`] it.
    Node(NodeRecord),
}

/// What the controller does with a cloud node once a build on it is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterBuild {
    /// Keep it for the next build; [`Cloud::idle`] runs until one comes or the time is up.
    Reuse,
    /// Take no more builds on it; [`Cloud::release`] deletes or keeps its pod.
    Release,
}

pub use super::api::types::{CloudView, TemplateView};

/// How agents reach the controller, as the cloud tells them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    /// The controller's URL (`https://127.0.0.1:8080/`), for agents on this host.
    pub url: String,
    /// The agent port's `host:port`, for direct connections.
    pub agent: String,
    /// The controller's TLS fingerprint (`sha256:...`), when it serves TLS.
    pub fingerprint: Option<String>,
}

/// What a cloud may ask of the controller. Called without the controller's state lock held.
pub trait Host: Send + Sync + 'static {
    /// The secret node `node` proves itself with.
    fn secret(&self, node: &str) -> String;
    /// How agents reach the controller (None until it listens).
    fn dial(&self) -> Option<Dial>;
    /// A stable id of this controller (labels its pods).
    fn controller_id(&self) -> String;
    /// Whether node `name` has a build on it.
    fn is_busy(&self, name: &str) -> bool;
    /// The nodes whose origin is the cloud `cloud`.
    fn nodes_of(&self, cloud: &str) -> Vec<String>;
    /// Fail the queued build node `node` was reserved for, with `message` (its agent could not
    /// start). A build that ran elsewhere meanwhile is not touched.
    fn fail_queued(&self, node: &str, message: String);
    /// The pod of node `name` is gone (deleted, evicted, its agent container ended): fail the
    /// build on it at once with `reason` and remove the node.
    fn node_gone(&self, name: &str, reason: String);
    /// Keep node `name` (its pod is kept for inspection) but give it no more builds.
    fn retire(&self, name: &str, why: String);
    /// Remove node `name` (its pod was deleted).
    fn remove_node(&self, name: &str);
    /// Dispatch again (a cap has room, or a template stopped).
    fn redispatch(&self);
    /// Run `fut` on the controller's executor.
    fn spawn(&self, fut: CloudFuture<()>);
}

/// A source of agents.
pub trait Cloud: Send + Sync {
    /// Its name (a node's origin names it).
    fn name(&self) -> &str;

    /// Under the controller's state lock: whether it serves `want`, and if so reserve an agent
    /// for it within its caps. Must not call the [`Host`].
    fn reserve(&self, want: &Want<'_>) -> Reserve;

    /// Start the agent of a node [`Cloud::reserve`] returned, and watch it until its agent
    /// connects or it fails (then reported through the host).
    fn launch(self: Arc<Self>, node: String, build: u64, host: Arc<dyn Host>) -> CloudFuture<()>;

    /// Node `node`'s agent connected.
    fn connected(&self, node: &str);

    /// Under the controller's state lock: a build on `node` ended (`failed` when it did not
    /// succeed). Must not call the host.
    fn build_ended(&self, node: &str, failed: bool) -> AfterBuild;

    /// Node `node` waits for another build: once its idle time is up with no build on it,
    /// release it.
    fn idle(self: Arc<Self>, node: String, host: Arc<dyn Host>) -> CloudFuture<()>;

    /// The node takes no more builds: delete its pod or keep it per its retention.
    fn release(self: Arc<Self>, node: String, host: Arc<dyn Host>) -> CloudFuture<()>;

    /// The node was removed by a user: delete its pod.
    fn node_removed(self: Arc<Self>, node: String) -> CloudFuture<()>;

    /// The watch of its pods: adopts its pods after a restart, deletes orphans, reports pods
    /// that fail or vanish. Runs until dropped.
    fn run(self: Arc<Self>, host: Arc<dyn Host>) -> CloudFuture<()>;

    /// The default container of steps on `node` (the template's `defaultContainer`).
    fn default_container(&self, node: &str) -> Option<String>;

    /// How `wisp clouds` shows it.
    fn view(&self) -> CloudView;
}

/// Where a node came from, as its record spells it.
pub const STATIC: &str = "static";

/// A cloud for unit tests: serves one label, reserves nodes `NAME-1`, `NAME-2`, ... up to a cap,
/// and starts nothing (the test plays the agent).
#[cfg(test)]
pub mod testing {
    use super::*;
    use std::sync::Mutex;

    /// See the module doc.
    pub struct TestCloud {
        /// Its name and the label it serves.
        pub label: &'static str,
        /// Most nodes at once.
        pub cap: usize,
        /// Nodes reserved so far, and those launched.
        pub made: Mutex<Vec<String>>,
        /// Nodes launched.
        pub launched: Mutex<Vec<(String, u64)>>,
    }

    impl TestCloud {
        /// Serves `label`, at most `cap` nodes.
        pub fn new(label: &'static str, cap: usize) -> Arc<Self> {
            Arc::new(Self { label, cap, made: Mutex::new(Vec::new()), launched: Mutex::new(Vec::new()) })
        }
    }

    impl Cloud for TestCloud {
        fn name(&self) -> &str {
            "test"
        }
        fn reserve(&self, want: &Want<'_>) -> Reserve {
            if !want.expr.matches(&[self.label.to_string()]) {
                return Reserve::No;
            }
            let mut made = self.made.lock().unwrap();
            if made.len() >= self.cap {
                return Reserve::Full(format!("at its cap of {}", self.cap));
            }
            let name = format!("{}-{}", self.label, made.len() + 1);
            made.push(name.clone());
            Reserve::Node(NodeRecord {
                name,
                labels: vec![self.label.to_string()],
                executors: 1,
                websocket: true,
                work_dir: String::new(),
                origin: "test".into(),
            })
        }
        fn launch(self: Arc<Self>, node: String, build: u64, _: Arc<dyn Host>) -> CloudFuture<()> {
            self.launched.lock().unwrap().push((node, build));
            Box::pin(async {})
        }
        fn connected(&self, _: &str) {}
        fn build_ended(&self, _: &str, _: bool) -> AfterBuild {
            AfterBuild::Release
        }
        fn idle(self: Arc<Self>, _: String, _: Arc<dyn Host>) -> CloudFuture<()> {
            Box::pin(async {})
        }
        fn release(self: Arc<Self>, node: String, host: Arc<dyn Host>) -> CloudFuture<()> {
            Box::pin(async move { host.remove_node(&node) })
        }
        fn node_removed(self: Arc<Self>, _: String) -> CloudFuture<()> {
            Box::pin(async {})
        }
        fn run(self: Arc<Self>, _: Arc<dyn Host>) -> CloudFuture<()> {
            Box::pin(std::future::pending())
        }
        fn default_container(&self, _: &str) -> Option<String> {
            None
        }
        fn view(&self) -> CloudView {
            CloudView {
                name: "test".into(),
                kind: "test".into(),
                namespace: None,
                container_cap: self.cap as u32,
                pods: self.made.lock().unwrap().len() as u32,
                templates: Vec::new(),
                status: "ok".into(),
            }
        }
    }
}
