//! Clouds and pod templates as the user declares them in YAML (`wisp cloud apply FILE`), with the
//! Jenkins kubernetes plugin's field names and meanings: the model and its parser (`parse.rs`),
//! inheritance and merging (`merge.rs`, the plugin's `PodTemplateUtils.combine`) and the Pod
//! manifest of one agent (`pod.rs`).
//!
//! ```yaml
//! clouds:
//!   - podman:                      # or kubernetes: (namespace, serverUrl, kubeconfig, ...)
//!       name: local
//!       containerCap: 10           # 0 = unlimited
//!       podRetention: never        # never | onFailure | always | evicted
//!       webSocket: true            # or directConnection: true (+ jenkinsTunnel: host:port)
//!       templates:
//!         - name: maven            # a DNS-1123 label of at most 57 characters
//!           label: "maven java"
//!           inheritFrom: base      # space separated, later names win
//!           yaml: |                # a Pod (or part of one): the base the fields below go over
//!             spec: {containers: [{name: build, image: busybox}]}
//!           containers: [{name: build, image: maven, command: [sleep], args: ["9999"]}]
//! ```
//!
//! Precedence, as in the plugin: a template's `yaml` is the base and everything else the template
//! (and every template it inherits from) declares goes over it. A `yaml` container and a
//! container template of the same name are combined field by field with the container template
//! winning wherever it sets a field (image, command, args, workingDir, resources entries, env
//! vars by name, mounts by path), and the yaml's value surviving only where no container template
//! of the whole inheritance chain sets one. So a child's `yaml` cannot replace the image of a
//! container its parent declares as a container template (plugin issue #2830): declare the
//! container as a container template in the child instead, or keep the parent's in `yaml` too.
//!
//! Every parse is bounded: a file is at most [`MAX_FILE`] bytes and nests at most
//! [`MAX_NESTING`] levels (checked by a scan before serde_yaml_ng reads it), and so does the Pod
//! YAML of each template.

mod merge;
mod parse;
mod pod;

pub use merge::{combine, resolve};
pub use pod::{pod_manifest, pod_name, AgentEnv, TOOLS_DIR, WORKSPACE_DIR};

use super::labels::LabelExpr;
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// Largest cloud file accepted, in bytes.
pub const MAX_FILE: usize = 1024 * 1024;
/// Deepest nesting accepted in a cloud file and in a template's Pod YAML (`[ ]`, `{ }` and
/// indented blocks together); a Pod needs about 10, and the scan keeps the parse linear.
pub const MAX_NESTING: usize = 64;
/// Longest template name: a pod is named `NAME-xxxxx`, and a pod name is at most 63 characters.
pub const MAX_TEMPLATE_NAME: usize = 57;

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

impl Retention {
    /// Whether a pod whose build is over is kept: `default` defers to `cloud_default`, and a
    /// cloud's `default` is `never`.
    pub fn keeps(
        self,
        cloud_default: Retention,
        build_failed: bool,
        pod_failed: bool,
        evicted: bool,
    ) -> bool {
        let effective = match self {
            Retention::Default => cloud_default,
            r => r,
        };
        match effective {
            Retention::Default | Retention::Never => false,
            Retention::Always => true,
            Retention::OnFailure => build_failed || pod_failed,
            Retention::Evicted => evicted,
        }
    }
}

/// `yamlMergeStrategy`: how the `yaml` layers of a template and its parents make one Pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MergeStrategy {
    /// Only the last layer (the nearest template's own `yaml`, else its nearest parent's) counts.
    #[default]
    Override,
    /// All layers are combined, oldest first, by the same rules as templates.
    Merge,
}

/// A volume of a template, mounted in every container of the pod (the plugin's `volumes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TemplateVolume {
    /// `emptyDirVolume`: scratch space that lives as long as the pod.
    EmptyDirVolume {
        /// Where containers see it.
        mount_path: String,
        /// Backed by memory (tmpfs) rather than disk.
        memory: bool,
    },
    /// `hostPathVolume`: a directory of the node.
    HostPathVolume {
        /// The node's directory.
        host_path: String,
        /// Where containers see it.
        mount_path: String,
        /// Mounted read-only.
        read_only: bool,
    },
    /// `persistentVolumeClaim`: an existing claim.
    PersistentVolumeClaim {
        /// The claim's name.
        claim_name: String,
        /// Where containers see it.
        mount_path: String,
        /// Mounted read-only.
        read_only: bool,
    },
    /// `configMapVolume`: a config map's keys as files.
    ConfigMapVolume {
        /// The config map's name.
        config_map_name: String,
        /// Where containers see it.
        mount_path: String,
        /// Mount only this path of the volume.
        sub_path: Option<String>,
    },
    /// `secretVolume`: a secret's keys as files.
    SecretVolume {
        /// The secret's name.
        secret_name: String,
        /// Where containers see it.
        mount_path: String,
    },
}

impl TemplateVolume {
    /// Where containers see the volume (volumes merge by it).
    pub fn mount_path(&self) -> &str {
        match self {
            TemplateVolume::EmptyDirVolume { mount_path, .. }
            | TemplateVolume::HostPathVolume { mount_path, .. }
            | TemplateVolume::PersistentVolumeClaim { mount_path, .. }
            | TemplateVolume::ConfigMapVolume { mount_path, .. }
            | TemplateVolume::SecretVolume { mount_path, .. } => mount_path,
        }
    }
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
    /// Kubernetes: a bearer token, or `@FILE` to read one. Shown as `"***"` when serialized.
    #[serde(serialize_with = "hide_secret")]
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
    /// podman: the socket of a podman service to use (`unix:///run/podman/podman.sock`); unset,
    /// the controller runs `podman system service` on a socket of its own.
    pub socket: Option<String>,
    /// The templates.
    pub templates: Vec<PodTemplate>,
}

/// Serializes a secret as `"***"` (or null when unset), so listings never show it.
fn hide_secret<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("***"),
        None => s.serialize_none(),
    }
}

impl CloudSpec {
    /// The first template whose labels (its `label` split on whitespace, plus its name) satisfy
    /// `expr`; a template with no `label` serves expressions naming it.
    pub fn template_for(&self, expr: &LabelExpr) -> Option<&PodTemplate> {
        self.templates.iter().find(|t| expr.matches(&t.label_set()))
    }

    /// The template named `name`.
    pub fn template(&self, name: &str) -> Option<&PodTemplate> {
        self.templates.iter().find(|t| t.name == name)
    }
}

/// A container of a template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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
    /// `resources` as Kubernetes has them (requests/limits), checked against k8s-openapi's
    /// `ResourceRequirements` and kept as its JSON.
    pub resources: Option<serde_json::Value>,
}

/// A pod template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PodTemplate {
    /// Name; pods are named after it. Empty only for a pipeline's inline template without one.
    pub name: String,
    /// The labels it serves, space separated.
    pub label: Option<String>,
    /// Parents, space separated (later wins); `Some("")` turns inheritance off.
    pub inherit_from: Option<String>,
    /// The raw pod YAML layers, oldest first: one (or none) as parsed, the parents' before the
    /// template's own after [`resolve`]. Which of them make the pod: [`PodTemplate::yaml_layers`].
    pub yaml: Vec<String>,
    /// `yamlMergeStrategy`; `None` is `override`.
    pub yaml_merge_strategy: Option<MergeStrategy>,
    /// Containers.
    pub containers: Vec<ContainerTemplate>,
    /// Environment every container gets (`envVars`), by name; a container's own env wins.
    pub env_vars: Vec<(String, String)>,
    /// Volumes mounted in every container, by mount path.
    pub volumes: Vec<TemplateVolume>,
    /// `nodeSelector`: node labels the pod must be scheduled on.
    pub node_selector: BTreeMap<String, String>,
    /// `serviceAccount`: the pod's `serviceAccountName`.
    pub service_account: Option<String>,
    /// Names of the secrets images are pulled with.
    pub image_pull_secrets: Vec<String>,
    /// Pod annotations.
    pub annotations: BTreeMap<String, String>,
    /// Extra pod labels (beside the cloud's `podLabels`).
    pub labels: BTreeMap<String, String>,
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

impl PodTemplate {
    /// The labels the template serves: its `label` split on whitespace, and its name.
    pub fn label_set(&self) -> Vec<String> {
        let mut set: Vec<String> =
            self.label.as_deref().unwrap_or("").split_whitespace().map(str::to_string).collect();
        if !self.name.is_empty() {
            set.push(self.name.clone());
        }
        set
    }

    /// The `yaml` layers that make the pod, oldest first: all of them with `merge`, the last one
    /// with `override`.
    pub fn yaml_layers(&self) -> &[String] {
        match self.yaml_merge_strategy.unwrap_or_default() {
            MergeStrategy::Merge => &self.yaml,
            MergeStrategy::Override => &self.yaml[self.yaml.len().saturating_sub(1)..],
        }
    }
}

/// Why a cloud file (or a pipeline's inline template) was refused. Displays as
/// `line L, column C: MESSAGE` when the position is known, else `MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Line of the problem, from 1, when known.
    pub line: Option<usize>,
    /// Column of the problem, from 1 (in characters), when known.
    pub column: Option<usize>,
    /// What is wrong and what to do, with the field's path (`clouds[0].templates[1].name: ...`).
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parse and check a cloud file: `clouds:`, a list of one-key mappings (`podman:` or
/// `kubernetes:`) each holding a cloud. Errors carry the field's path and, for most, its
/// position. Templates are returned as written; [`resolve`] applies `inheritFrom`.
pub fn parse_clouds(text: &str) -> Result<Vec<CloudSpec>, ConfigError> {
    parse::parse_clouds(text)
}

#[cfg(test)]
mod tests;
