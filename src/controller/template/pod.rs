//! The Pod manifest of one agent: a resolved template's `yaml` layers as the base, its fields
//! over them (both by [`combine_pods`]), then what every wisp agent pod needs: the `jnlp`
//! container with the agent's settings in its environment, the workspace volume, and the
//! `wisp-tools` init container and volume through which steps run in the other containers
//! (each of them starts `wisp-agent step-server` in front of its own command; there is no exec).

use super::merge::combine_pods;
use super::parse::{check_pod_yaml, valid_label_value};
use super::{CloudSpec, PodTemplate, TemplateVolume};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, HostPathVolumeSource,
    LocalObjectReference, PersistentVolumeClaimVolumeSource, Pod, PodSpec, ResourceRequirements,
    SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use ring::rand::SecureRandom;
use serde_json::Value;
use std::collections::BTreeMap;

/// Where every container sees the build's workspace, and the agent's work directory.
pub const WORKSPACE_DIR: &str = "/home/jenkins/agent";
/// Where every container sees the wisp tools (`wisp-agent` and the step sockets).
pub const TOOLS_DIR: &str = "/wisp";
/// The workspace volume's name (a template may define its own volume of this name).
const WORKSPACE_VOLUME: &str = "workspace-volume";
/// The tools volume's and init container's name (reserved).
const TOOLS: &str = "wisp-tools";
/// The agent's container.
const JNLP: &str = "jnlp";
/// The characters of a pod name's random suffix (the plugin's: no vowels, so no words).
const SUFFIX_CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz0123456789";
/// Longest pod name (a DNS-1123 label).
const MAX_POD_NAME: usize = 63;

/// What one agent pod is told about its agent and its controller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentEnv {
    /// The node's name (also the pod's name).
    pub node: String,
    /// The node's secret (`JENKINS_SECRET`).
    pub secret: String,
    /// The URL the agent dials (`JENKINS_URL`).
    pub url: String,
    /// `host:port` for a direct connection (`JENKINS_DIRECT_CONNECTION`), if used.
    pub direct: Option<String>,
    /// Dial over WebSocket (`JENKINS_WEB_SOCKET=true`).
    pub web_socket: bool,
    /// The controller's public key, which the agent pins (`JENKINS_INSTANCE_IDENTITY`).
    pub instance_identity: String,
    /// The controller's identity, put in the `wisp.dev/controller` label.
    pub controller_id: String,
    /// Image of the `jnlp` container when the template gives none.
    pub agent_image: String,
}

/// The Pod for one agent of `t` (already [`resolve`](super::resolve)d) in `cloud`.
pub fn pod_manifest(t: &PodTemplate, cloud: &CloudSpec, agent: &AgentEnv) -> Result<Pod, String> {
    let mut base = Value::Object(Default::default());
    for layer in t.yaml_layers() {
        check_pod_yaml(layer).map_err(|e| format!("template {:?}: yaml: {e}", t.name))?;
        let pod: Pod =
            serde_yaml_ng::from_str(layer).map_err(|e| format!("template {:?}: yaml: {e}", t.name))?;
        base = combine_pods(&base, &to_json(&pod)?);
    }
    let combined = combine_pods(&base, &to_json(&template_pod(t, cloud, agent)?)?);
    let mut pod: Pod = serde_json::from_value(combined).map_err(|e| format!("template {:?}: {e}", t.name))?;

    pod.metadata.name = Some(agent.node.clone());
    if pod.metadata.namespace.is_none() {
        pod.metadata.namespace.clone_from(&cloud.namespace);
    }
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert("wisp.dev/controller".into(), sanitize_label_value(&agent.controller_id));
    labels.insert("wisp.dev/template".into(), sanitize_label_value(&t.name));

    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    // The life cycle counts on a pod that ends with its agent.
    spec.restart_policy = Some("Never".into());
    if !spec.containers.iter().any(|c| c.name == JNLP) {
        spec.containers.push(Container { name: JNLP.into(), ..Container::default() });
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    if volumes.iter().any(|v| v.name == TOOLS) {
        return Err(format!(
            "template {:?}: the volume name {TOOLS:?} is reserved for wisp; rename it",
            t.name
        ));
    }
    if !volumes.iter().any(|v| v.name == WORKSPACE_VOLUME) {
        volumes.push(Volume {
            name: WORKSPACE_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
    }
    volumes.push(Volume {
        name: TOOLS.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });

    let jnlp = spec.containers.iter_mut().find(|c| c.name == JNLP).expect("added above");
    if jnlp.image.as_deref().unwrap_or("").is_empty() {
        jnlp.image = Some(agent.agent_image.clone());
    }
    let workdir = jnlp.working_dir.get_or_insert_with(|| WORKSPACE_DIR.into()).clone();
    let jnlp_image = jnlp.image.clone().unwrap_or_default();
    if jnlp_image.is_empty() {
        return Err(format!(
            "template {:?}: the jnlp container has no image and no agent image is set",
            t.name
        ));
    }

    let tools_mount =
        VolumeMount { name: TOOLS.into(), mount_path: TOOLS_DIR.into(), ..VolumeMount::default() };
    for c in &mut spec.containers {
        if c.image.as_deref().unwrap_or("").is_empty() {
            return Err(format!(
                "template {:?}: container {:?} has no image; give it one in containers or in yaml",
                t.name, c.name
            ));
        }
        if c.working_dir.as_deref().unwrap_or("").is_empty() {
            c.working_dir = Some(workdir.clone());
        }
        let env = c.env.get_or_insert_with(Vec::new);
        for (k, v) in &t.env_vars {
            if !env.iter().any(|e| e.name == *k) {
                env.push(env_var(k, v));
            }
        }
        let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
        if mounts.iter().any(|m| m.mount_path == TOOLS_DIR || m.name == TOOLS) {
            return Err(format!(
                "template {:?}: container {:?} mounts something at {TOOLS_DIR} or names volume {TOOLS:?}; both are \
                 reserved for wisp",
                t.name, c.name
            ));
        }
        if !mounts.iter().any(|m| m.mount_path == WORKSPACE_DIR || m.name == WORKSPACE_VOLUME) {
            mounts.push(VolumeMount {
                name: WORKSPACE_VOLUME.into(),
                mount_path: WORKSPACE_DIR.into(),
                ..VolumeMount::default()
            });
        }
        mounts.push(tools_mount.clone());
        if c.name == JNLP {
            let own = std::mem::take(env);
            let mut all: Vec<EnvVar> = agent_env(agent)
                .into_iter()
                .filter(|(k, _)| !own.iter().any(|e| e.name == *k))
                .map(|(k, v)| env_var(k, &v))
                .collect();
            all.extend(own);
            *env = all;
        } else {
            let mut command: Vec<String> =
                ["/wisp/wisp-agent", "step-server", "--socket"].map(String::from).into();
            command.push(format!("{TOOLS_DIR}/{}.sock", c.name));
            let own: Vec<String> = c.command.take().unwrap_or_default();
            let args = c.args.take().unwrap_or_default();
            // Without a command of its own the container's image entrypoint is unknown here, so
            // its args alone cannot be kept: the step server is then all the container runs.
            if !own.is_empty() {
                command.push("--".into());
                command.extend(own);
                command.extend(args);
            }
            c.command = Some(command);
        }
    }
    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    if inits.iter().any(|c| c.name == TOOLS) {
        return Err(format!("template {:?}: the init container name {TOOLS:?} is reserved for wisp", t.name));
    }
    inits.insert(
        0,
        Container {
            name: TOOLS.into(),
            image: Some(jnlp_image),
            command: Some(["/wisp-agent", "install", "/wisp/wisp-agent"].map(String::from).into()),
            volume_mounts: Some(vec![tools_mount]),
            ..Container::default()
        },
    );
    Ok(pod)
}

/// What only the `jnlp` container gets, by name.
fn agent_env(agent: &AgentEnv) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("JENKINS_URL", agent.url.clone()),
        ("JENKINS_SECRET", agent.secret.clone()),
        ("JENKINS_AGENT_NAME", agent.node.clone()),
        ("JENKINS_NAME", agent.node.clone()),
        ("JENKINS_AGENT_WORKDIR", WORKSPACE_DIR.into()),
    ];
    if let Some(direct) = &agent.direct {
        env.push(("JENKINS_DIRECT_CONNECTION", direct.clone()));
    } else if agent.web_socket {
        env.push(("JENKINS_WEB_SOCKET", "true".into()));
    }
    env.push(("JENKINS_INSTANCE_IDENTITY", agent.instance_identity.clone()));
    env.push(("WISP_STEP_SOCKETS", TOOLS_DIR.into()));
    env
}

fn env_var(k: &str, v: &str) -> EnvVar {
    EnvVar { name: k.into(), value: Some(v.into()), ..EnvVar::default() }
}

fn to_json(pod: &Pod) -> Result<Value, String> {
    serde_json::to_value(pod).map_err(|e| e.to_string())
}

/// The template's own fields as a Pod (the plugin's `PodTemplateBuilder` before the yaml).
fn template_pod(t: &PodTemplate, cloud: &CloudSpec, agent: &AgentEnv) -> Result<Pod, String> {
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for (i, v) in t.volumes.iter().enumerate() {
        let name = format!("volume-{i}");
        let (volume, read_only, sub_path) = k8s_volume(v, &name);
        volumes.push(volume);
        mounts.push(VolumeMount {
            name,
            mount_path: v.mount_path().into(),
            read_only: read_only.then_some(true),
            sub_path,
            ..VolumeMount::default()
        });
    }
    let mut containers = Vec::new();
    for c in &t.containers {
        let mut env: Vec<EnvVar> = Vec::new();
        for (k, v) in t.env_vars.iter().chain(&c.env) {
            match env.iter_mut().find(|e| e.name == *k) {
                Some(e) => e.value = Some(v.clone()),
                None => env.push(env_var(k, v)),
            }
        }
        let resources: Option<ResourceRequirements> = c
            .resources
            .clone()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| format!("template {:?}: container {:?}: resources: {e}", t.name, c.name))?;
        containers.push(Container {
            name: c.name.clone(),
            image: c.image.clone(),
            command: c.command.clone(),
            args: c.args.clone(),
            working_dir: c.working_dir.clone(),
            env: Some(env),
            resources,
            volume_mounts: Some(mounts.clone()),
            ..Container::default()
        });
    }
    let mut labels = cloud.pod_labels.clone();
    labels.extend(t.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels.insert("wisp.dev/controller".into(), sanitize_label_value(&agent.controller_id));
    labels.insert("wisp.dev/template".into(), sanitize_label_value(&t.name));
    let secrets: Vec<LocalObjectReference> =
        t.image_pull_secrets.iter().map(|s| LocalObjectReference { name: s.clone() }).collect();
    Ok(Pod {
        metadata: ObjectMeta {
            labels: Some(labels),
            annotations: Some(t.annotations.clone()).filter(|a| !a.is_empty()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers,
            volumes: Some(volumes),
            active_deadline_seconds: (t.active_deadline_seconds > 0)
                .then(|| i64::try_from(t.active_deadline_seconds).unwrap_or(i64::MAX)),
            service_account_name: t.service_account.clone(),
            image_pull_secrets: Some(secrets),
            node_selector: Some(t.node_selector.clone()).filter(|n| !n.is_empty()),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// A template volume as Kubernetes has it, with its mount's read-only flag and sub path.
fn k8s_volume(v: &TemplateVolume, name: &str) -> (Volume, bool, Option<String>) {
    let mut volume = Volume { name: name.into(), ..Volume::default() };
    match v {
        TemplateVolume::EmptyDirVolume { memory, .. } => {
            volume.empty_dir =
                Some(EmptyDirVolumeSource { medium: memory.then(|| "Memory".into()), ..Default::default() });
            (volume, false, None)
        }
        TemplateVolume::HostPathVolume { host_path, read_only, .. } => {
            volume.host_path = Some(HostPathVolumeSource { path: host_path.clone(), type_: None });
            (volume, *read_only, None)
        }
        TemplateVolume::PersistentVolumeClaim { claim_name, read_only, .. } => {
            volume.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name.clone(),
                read_only: read_only.then_some(true),
            });
            (volume, *read_only, None)
        }
        TemplateVolume::ConfigMapVolume { config_map_name, sub_path, .. } => {
            volume.config_map =
                Some(ConfigMapVolumeSource { name: config_map_name.clone(), ..Default::default() });
            (volume, false, sub_path.clone())
        }
        TemplateVolume::SecretVolume { secret_name, .. } => {
            volume.secret =
                Some(SecretVolumeSource { secret_name: Some(secret_name.clone()), ..Default::default() });
            (volume, false, None)
        }
    }
}

/// `s` as a valid label value (the plugin's `sanitizeLabel`): its last 63 characters, anything
/// outside `[A-Za-z0-9._-]` as `_`, and a first or last character that is not a letter or digit
/// as `x`.
pub(super) fn sanitize_label_value(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let tail = &chars[chars.len().saturating_sub(MAX_POD_NAME)..];
    let mut out: Vec<char> = tail
        .iter()
        .map(|&c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect();
    let n = out.len();
    for i in [0, n.saturating_sub(1)] {
        if n > 0 && !out[i].is_ascii_alphanumeric() {
            out[i] = 'x';
        }
    }
    let out: String = out.into_iter().collect();
    debug_assert!(valid_label_value(&out), "{out:?}");
    out
}

/// A new pod name for `template`: its name (cut so the whole fits 63 characters), `-`, and five
/// random characters from `bcdfghjklmnpqrstvwxz0123456789`.
pub fn pod_name(template: &str) -> String {
    let base = if template.is_empty() { "agent" } else { template };
    let base: String = base.chars().take(MAX_POD_NAME - 6).collect();
    let mut name = base.trim_end_matches('-').to_string();
    name.push('-');
    let rng = ring::rand::SystemRandom::new();
    let mut picked = 0;
    while picked < 5 {
        let mut bytes = [0u8; 16];
        rng.fill(&mut bytes).expect("the OS random source failed");
        // Only bytes below the largest multiple of 30, so every character is equally likely.
        let limit = (256 / SUFFIX_CHARS.len() * SUFFIX_CHARS.len()) as u8;
        for b in bytes.into_iter().filter(|&b| b < limit) {
            if picked == 5 {
                break;
            }
            name.push(char::from(SUFFIX_CHARS[usize::from(b) % SUFFIX_CHARS.len()]));
            picked += 1;
        }
    }
    name
}

#[cfg(test)]
mod tests;
