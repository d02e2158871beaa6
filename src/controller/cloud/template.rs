//! Clouds and pod templates as the user declares them in YAML (`wisp cloud apply FILE`), with the
//! Jenkins kubernetes plugin's field names and meanings.
//!
//! SKELETON: the types the life cycle (`pods.rs`) codes against. Parsing, merging
//! (`PodTemplateUtils.combine`), inheritance and the Pod manifest are filled in next to it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which backend runs a cloud's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CloudKind {
    /// The Kubernetes API.
    Kubernetes,
    /// The local podman (`podman kube play`).
    Podman,
}

/// `podRetention`: whether a pod is kept after its build.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Retention {
    /// The cloud's setting (for a template); for a cloud, the same as `never`.
    #[default]
    Default,
    /// Always delete.
    Never,
    /// Keep the pod when its build failed or the pod itself failed.
    OnFailure,
    /// Never delete.
    Always,
    /// Keep the pod when it was evicted.
    Evicted,
}

/// One cloud, with its templates.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CloudSpec {
    /// Its name.
    pub name: String,
    /// Its backend (`Podman` when absent in a default-constructed value).
    pub kind: Option<CloudKind>,
    /// Namespace pods go into (Kubernetes; podman ignores it).
    pub namespace: Option<String>,
    /// Most pods of this cloud at once; 0 = unlimited.
    pub container_cap: u32,
    /// Labels every pod of the cloud gets (default `jenkins: slave`).
    pub pod_labels: BTreeMap<String, String>,
    /// Retention for templates that say `default`.
    pub pod_retention: Retention,
    /// Agents dial the controller over WebSocket (`JENKINS_WEB_SOCKET=true`).
    pub web_socket: bool,
    /// Agents dial the agent port directly (`JENKINS_DIRECT_CONNECTION=host:port`).
    pub direct_connection: bool,
    /// URL the agents dial; default: the controller's own.
    pub jenkins_url: Option<String>,
    /// `host:port` of the agent port for direct connections; default: from the URL.
    pub jenkins_tunnel: Option<String>,
    /// Image of the `jnlp` container when a template names none.
    pub agent_image: Option<String>,
    /// Kubernetes: API server URL (else the kubeconfig's or the in-cluster one).
    pub server_url: Option<String>,
    /// Kubernetes: the API server's CA certificate, PEM.
    pub server_certificate: Option<String>,
    /// Kubernetes: a bearer token, or `@FILE` to read one.
    pub credentials_token: Option<String>,
    /// Kubernetes: kubeconfig path (else `KUBECONFIG`, `~/.kube/config`, in-cluster).
    pub kubeconfig: Option<String>,
    /// Kubernetes: kubeconfig context.
    pub context: Option<String>,
    /// Kubernetes: skip the API server's certificate check.
    pub skip_tls_verify: bool,
    /// podman: the program to run (default `podman`).
    pub podman: Option<String>,
    /// podman: the network pods join (default `host`, so agents reach a controller on loopback).
    pub network: Option<String>,
    /// The templates.
    pub templates: Vec<PodTemplate>,
}

/// A container of a template.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ContainerTemplate {
    /// Name (`jnlp` is the agent's).
    pub name: String,
    /// Image.
    pub image: Option<String>,
    /// Command (the entrypoint), as a shell-free list.
    pub command: Option<Vec<String>>,
    /// Arguments.
    pub args: Option<Vec<String>>,
    /// Environment, by name.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub working_dir: Option<String>,
    /// `resources` as Kubernetes has them (requests/limits), kept as written.
    pub resources: Option<serde_json::Value>,
}

/// A pod template.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PodTemplate {
    /// Name; pods are named after it.
    pub name: String,
    /// The labels it serves, space separated.
    pub label: Option<String>,
    /// Parents, space separated (later wins); `Some("")` turns inheritance off.
    pub inherit_from: Option<String>,
    /// The raw pod YAML layers, oldest first (after inheritance, `override` keeps the last only).
    pub yaml: Option<String>,
    /// Containers.
    pub containers: Vec<ContainerTemplate>,
    /// Most pods of this template at once; `None` = unlimited.
    pub instance_cap: Option<u32>,
    /// Minutes a pod waits for another build after one; 0 = one build per pod.
    pub idle_minutes: u32,
    /// Retention.
    pub pod_retention: Retention,
    /// `activeDeadlineSeconds` of the pod, when > 0.
    pub active_deadline_seconds: u64,
    /// Seconds the agent has to connect once the pod is created; `None` = the default.
    pub connect_timeout: Option<u64>,
    /// The container steps run in when they name none (`None` or `jnlp`: the agent's own).
    pub default_container: Option<String>,
}

// ---- SHIM (replaced by the template helper's work at merge) ----
/// shim
pub struct AgentEnv {
    /// shim
    pub node: String,
    /// shim
    pub secret: String,
    /// shim
    pub url: String,
    /// shim
    pub direct: Option<String>,
    /// shim
    pub web_socket: bool,
    /// shim
    pub instance_identity: String,
    /// shim
    pub controller_id: String,
    /// shim
    pub agent_image: String,
}
/// shim
#[derive(Debug)]
pub struct ConfigError(pub String);
impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
/// shim
pub fn parse_clouds(_: &str) -> Result<Vec<CloudSpec>, ConfigError> {
    Err(ConfigError("shim".into()))
}
/// shim
pub fn resolve(t: &PodTemplate, _: &[PodTemplate]) -> PodTemplate {
    t.clone()
}
/// shim
pub fn pod_name(t: &str) -> String {
    format!("{t}-bcdfg")
}
/// shim
pub fn pod_manifest(
    _: &PodTemplate,
    _: &CloudSpec,
    _: &AgentEnv,
) -> Result<k8s_openapi::api::core::v1::Pod, String> {
    Err("shim".into())
}
impl Retention {
    /// shim
    pub fn keeps(self, _: Retention, _: bool, _: bool, _: bool) -> bool {
        false
    }
}
impl CloudSpec {
    /// shim
    pub fn template_for(&self, _: &crate::controller::labels::LabelExpr) -> Option<&PodTemplate> {
        None
    }
}
