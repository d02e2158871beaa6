//! The controller's side of its clouds: applying cloud files (`wisp cloud apply`), keeping them in
//! the store, running each cloud's watch, and what a cloud may ask of the controller ([`Host`]).

use super::cloud::backend::PodBackend;
use super::cloud::pods::PodCloud;
use super::cloud::{self, Cloud, CloudFuture, CloudView, Dial, Host, TemplateView};
use super::core::{ApiError, Controller};
use super::template::{self, CloudKind, CloudSpec};
use std::sync::Arc;

impl Controller {
    /// Apply a cloud file: every cloud in it is added, or replaces the one of its name (its pods
    /// stay). Nothing is applied when any part of the file is bad. Returns the names applied and
    /// warnings about what was applied (an `inheritFrom` that names no template).
    pub async fn apply_clouds(
        self: &Arc<Self>,
        text: String,
    ) -> Result<(Vec<String>, Vec<String>), ApiError> {
        let specs = template::parse_clouds(&text).map_err(|e| ApiError::new(400, e.to_string()))?;
        if specs.is_empty() {
            return Err(ApiError::new(
                400,
                "the file declares no cloud: expected `clouds:` with at least one",
            ));
        }
        let mut warnings = Vec::new();
        for spec in &specs {
            for t in &spec.templates {
                for w in template::resolve(t, &spec.templates).1 {
                    warnings.push(format!("cloud '{}', template '{}': {w}", spec.name, t.name));
                }
            }
        }
        let mut made = Vec::new();
        for spec in &specs {
            let backend = backend_for(spec)
                .await
                .map_err(|e| ApiError::new(400, format!("cloud '{}': {e}", spec.name)))?;
            made.push((spec.clone(), backend));
        }
        let rows: Vec<(String, String)> = specs.iter().map(|s| (s.name.clone(), text.clone())).collect();
        self.store.call(move |s| s.put_clouds(&rows)).await?;
        let names = specs.iter().map(|s| s.name.clone()).collect();
        for (spec, backend) in made {
            self.install_cloud(spec, backend);
        }
        self.dispatch();
        Ok((names, warnings))
    }

    /// Load the clouds kept in the store (at start). A cloud that cannot be loaded is logged and
    /// left out; the others load.
    pub async fn load_clouds(self: &Arc<Self>) {
        let rows = match self.store.call(|s| s.clouds()).await {
            Ok(r) => r,
            Err(e) => return log::error!("store: cannot read the clouds: {e}"),
        };
        for (name, text) in rows {
            let spec = match template::parse_clouds(&text) {
                Ok(specs) => specs.into_iter().find(|s| s.name == name),
                Err(e) => {
                    log::error!("cloud '{name}': its stored file no longer parses: {e}");
                    continue;
                }
            };
            let Some(spec) = spec else { continue };
            // Applied while this load ran: the newer file is in force already.
            if self.pod_cloud(&name).is_some() {
                continue;
            }
            match backend_for(&spec).await {
                Ok(b) => self.install_cloud(spec, b),
                Err(e) => log::error!("cloud '{name}': {e}"),
            }
        }
        self.dispatch();
    }

    /// Add or replace a cloud and (re)start its watch. The look-up and the insertion are one step
    /// under the clouds' lock: two clouds of one name would each take the other's pods for
    /// orphans.
    fn install_cloud(self: &Arc<Self>, spec: CloudSpec, backend: Arc<dyn PodBackend>) {
        let name = spec.name.clone();
        let c = {
            let mut clouds = self.pod_clouds.lock().unwrap_or_else(|e| e.into_inner());
            match clouds.iter().find(|c| c.name() == name).cloned() {
                Some(c) => {
                    c.update(spec, backend);
                    c
                }
                None => {
                    let c = PodCloud::new(spec, backend);
                    clouds.push(c.clone());
                    self.state().clouds.push(c.clone());
                    c
                }
            }
        };
        let host: Arc<dyn Host> = self.clone();
        let task = self.ex.spawn(c.clone().run(host));
        self.cloud_tasks.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), task);
        log::info!("cloud '{name}': applied ({} templates)", c.spec().templates.len());
    }

    fn pod_cloud(&self, name: &str) -> Option<Arc<PodCloud>> {
        self.pod_clouds.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|c| c.name() == name).cloned()
    }

    /// Remove a cloud. Refused while it has pods.
    pub async fn remove_cloud(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let c = self.pod_cloud(name).ok_or_else(|| ApiError::new(404, format!("no cloud named '{name}'")))?;
        let pods = c.view().pods;
        if pods > 0 {
            return Err(ApiError::new(
                409,
                format!("cloud '{name}' still has {pods} pods: wait for their builds, or remove their nodes first"),
            ));
        }
        let n = name.to_string();
        self.store.call(move |s| s.remove_cloud(&n)).await?;
        self.state().clouds.retain(|c| c.name() != name);
        self.pod_clouds.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| c.name() != name);
        self.cloud_tasks.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        log::info!("cloud '{name}': removed");
        Ok(())
    }

    /// The clouds, as `wisp clouds` shows them.
    pub fn cloud_views(&self) -> Vec<CloudView> {
        let clouds: Vec<_> = self.state().clouds.clone();
        clouds.iter().map(|c| c.view()).collect()
    }

    /// Every template of every cloud.
    pub fn template_views(&self) -> Vec<TemplateView> {
        self.cloud_views().into_iter().flat_map(|c| c.templates).collect()
    }

    /// A node's agent connected: a cloud's node is stored now, and its cloud hears of it.
    pub(super) fn cloud_node_connected(self: &Arc<Self>, node: &str) {
        let (rec, cloud) = {
            let mut st = self.state();
            let Some(n) = st.nodes.get(node) else { return };
            let origin = n.rec.origin.clone();
            let since = n.since;
            let rec = (!n.persisted).then(|| n.rec.clone());
            if rec.is_some() {
                st.nodes.update(node, |n| n.persisted = true);
            }
            if rec.is_some() {
                // First connect of a cloud's node: its pod started.
                self.metrics.pod_online(&origin, since.elapsed());
            }
            (rec, st.clouds.iter().find(|c| c.name() == origin).cloned())
        };
        if let Some(rec) = rec {
            let name = rec.name.clone();
            let ctl = self.clone();
            self.ex
                .spawn(async move {
                    if let Err(e) = ctl.store.call(move |s| s.add_node(&rec)).await {
                        log::error!("node {name}: cannot store it: {e}");
                    }
                })
                .detach();
        }
        if let Some(c) = cloud {
            c.connected(node);
        }
    }

    /// The default container of steps on `node`, from its pod template.
    pub fn default_container(&self, node: &str) -> Option<String> {
        let st = self.state();
        let origin = &st.nodes.get(node)?.rec.origin;
        st.clouds.iter().find(|c| c.name() == origin)?.default_container(node)
    }

    /// Why the cloud node `node` went, if it went with a reason.
    pub fn gone_reason(&self, node: &str) -> Option<String> {
        self.state().gone.iter().rev().find(|(n, _)| n == node).map(|(_, r)| r.clone())
    }

    /// Take a node out of the state (and the store when it was stored), closing its link.
    fn drop_node(self: &Arc<Self>, name: &str, reason: Option<String>) {
        let node = {
            let mut st = self.state();
            if let Some(r) = reason {
                st.gone.push_back((name.to_string(), r));
                while st.gone.len() > GONE_KEPT {
                    st.gone.pop_front();
                }
            }
            st.nodes.remove(name)
        };
        let Some(node) = node else { return };
        if let Some(c) = &node.conn {
            c.shut();
        }
        if node.persisted {
            let n = name.to_string();
            let ctl = self.clone();
            self.ex
                .spawn(async move {
                    if let Err(e) = ctl.store.call(move |s| s.remove_node(&n)).await {
                        log::error!("store: cannot remove node: {e}");
                    }
                })
                .detach();
        }
        log::info!("node {name}: removed with its pod");
        self.wake_builds();
    }
}

/// Reasons kept for nodes that went.
const GONE_KEPT: usize = 256;

/// The backend a cloud's spec asks for.
async fn backend_for(spec: &CloudSpec) -> Result<Arc<dyn PodBackend>, String> {
    match spec.kind.unwrap_or(CloudKind::Podman) {
        CloudKind::Podman => Ok(Arc::new(cloud::podman::Podman::new(
            spec.podman.clone(),
            spec.network.clone(),
            spec.socket.clone(),
        ))),
        CloudKind::Kubernetes => {
            let k = async_compat::Compat::new(cloud::kubernetes::Kubernetes::connect(&spec.into())).await?;
            Ok(Arc::new(k))
        }
    }
}

impl Host for Controller {
    fn secret(&self, node: &str) -> String {
        Controller::secret(self, node)
    }

    fn dial(&self) -> Option<Dial> {
        self.dial.get().cloned()
    }

    fn controller_id(&self) -> String {
        self.id.clone()
    }

    fn is_busy(&self, name: &str) -> bool {
        self.state().nodes.get(name).is_some_and(|n| n.busy > 0)
    }

    fn nodes_of(&self, cloud: &str) -> Vec<String> {
        self.state().nodes.values().filter(|n| n.rec.origin == cloud).map(|n| n.rec.name.clone()).collect()
    }

    fn fail_queued(&self, node: &str, message: String) {
        let unit = {
            let mut st = self.state();
            if let Some(n) = st.nodes.get(node) {
                self.metrics.pod_failed(&n.rec.origin);
            }
            st.queue.take_reserved(node)
        };
        match unit {
            Some((build, unit)) => self.fail_unit(build, unit, message),
            None => log::info!("node {node}: no queued build waits for it any more"),
        }
    }

    fn node_gone(&self, name: &str, reason: String) {
        self.arc().drop_node(name, Some(reason));
    }

    fn retire(&self, name: &str, why: String) {
        log::info!("node {name}: takes no more builds ({why})");
        self.state().nodes.update(name, |n| n.rec.executors = 0);
    }

    fn remove_node(&self, name: &str) {
        self.arc().drop_node(name, None);
    }

    fn redispatch(&self) {
        self.arc().dispatch();
    }

    fn spawn(&self, fut: CloudFuture<()>) {
        self.ex.spawn(fut).detach();
    }
}
