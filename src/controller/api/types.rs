//! Request and answer bodies of the JSON API, one type per shape, exactly as they travel.
//!
//! | call | status | body |
//! |---|---|---|
//! | `GET /api/nodes` | 200 | [`NodeList`] |
//! | `POST /api/nodes` (body [`NewNode`]) | 201 | [`NodeCreated`] |
//! | `GET /api/nodes/NAME` | 200 | [`NodeInfo`] |
//! | `DELETE /api/nodes/NAME` | 200 | [`NodeRemoved`] |
//! | `POST /api/builds` (body: the pipeline YAML) | 201 | [`Submitted`]; with `?wait=` a [`BuildInfo`] |
//! | `GET /api/builds` | 200 | [`BuildList`] |
//! | `GET /api/builds/N[?wait=]` | 200 | [`BuildInfo`] |
//! | `POST /api/builds/N/cancel` | 200 | [`Cancelled`] |
//! | `POST /api/token/rotate` | 200 | [`TokenRotated`] |
//! | any refusal | 4xx, 5xx | [`ErrorBody`] |
//!
//! Answers carry no field a type here does not name; readers ignore fields they do not know, so a
//! newer controller may add some.

use serde::{Deserialize, Serialize};

/// Where a build is in its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    /// Waiting for a matching free executor.
    Queued,
    /// Running on a node.
    Running,
    /// Every step exited 0.
    Success,
    /// A step failed (or the build could not run).
    Failure,
    /// Cancelled by a user.
    Aborted,
}

impl BuildState {
    /// The spelling stored and sent (`"queued"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Aborted => "aborted",
        }
    }

    /// The state named `s` (as stored; anything unknown reads as a failure).
    pub fn parse(s: &str) -> Self {
        match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "success" => Self::Success,
            "aborted" => Self::Aborted,
            _ => Self::Failure,
        }
    }

    /// True once the build can no longer change.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Success | Self::Failure | Self::Aborted)
    }
}

/// Where a step is in its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Not started yet.
    Pending,
    /// Running on the build's node.
    Running,
    /// Exited 0.
    Success,
    /// Exited otherwise, was killed, timed out, or its agent was lost.
    Failure,
    /// Cancelled with its build.
    Aborted,
    /// Never ran: the build ended before it.
    Skipped,
}

impl StepState {
    /// The spelling stored and sent (`"pending"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Aborted => "aborted",
            Self::Skipped => "skipped",
        }
    }

    /// The state named `s` (as stored; anything unknown reads as a failure).
    pub fn parse(s: &str) -> Self {
        match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "success" => Self::Success,
            "aborted" => Self::Aborted,
            "skipped" => Self::Skipped,
            _ => Self::Failure,
        }
    }

    /// True once the step can no longer change.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }
}

/// `POST /api/nodes`: the node to add. Only `name` is required.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NewNode {
    /// Unique name (see `labels::check_node_name`).
    pub name: String,
    /// Labels, separated by spaces or commas.
    #[serde(default)]
    pub labels: String,
    /// Builds it runs at once, 1 to 1024.
    #[serde(default = "one")]
    pub executors: u32,
    /// Its agent connects over WebSocket (else over the TCP agent port).
    #[serde(default = "yes")]
    pub websocket: bool,
    /// Work dir to pass to the agent ("" for the agent's default).
    #[serde(default)]
    pub work_dir: String,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// A node as `GET /api/nodes` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeEntry {
    /// Unique name.
    pub name: String,
    /// Labels, in the order given.
    pub labels: Vec<String>,
    /// How many builds it runs at once.
    pub executors: u32,
    /// True while its agent is connected.
    pub online: bool,
    /// Executors running a build now.
    pub busy: u32,
    /// True when its agent connects over WebSocket.
    pub websocket: bool,
    /// Work dir passed to the agent ("" for the agent's default).
    pub work_dir: String,
    /// Where the node came from: `static` (added by a user) or the cloud that made it.
    #[serde(default = "static_origin")]
    pub origin: String,
    /// What its agent said it is, while connected (an agent too old to say has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentBuild>,
}

/// An agent's build, as it tells the controller after the handshake.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentBuild {
    /// `wisp-agent --version` without the name: `0.1.0 (1a2b3c4d5e6f)`.
    pub version: String,
    /// CPU architecture (Rust's names: `x86_64`, `aarch64`, `arm`).
    pub arch: String,
    /// Operating system (`linux`).
    pub os: String,
}

fn static_origin() -> String {
    "static".into()
}

/// `GET /api/nodes`: every node, by name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeList {
    /// The nodes.
    pub nodes: Vec<NodeEntry>,
}

/// `GET /api/nodes/NAME`: the node with its secret and the command that starts its agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node as listed.
    #[serde(flatten)]
    pub node: NodeEntry,
    /// The node's secret (64 hex digits).
    pub secret: String,
    /// The `wisp-agent` command line for this node, as `wisp node add` prints it.
    pub command: String,
}

/// `POST /api/nodes` answers with the new node as `GET /api/nodes/NAME` gives it.
pub type NodeCreated = NodeInfo;

/// `DELETE /api/nodes/NAME`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRemoved {
    /// The name of the node removed.
    pub removed: String,
}

/// A build as `GET /api/builds` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildRecord {
    /// Build number.
    pub id: u64,
    /// Pipeline name.
    pub name: String,
    /// State or result.
    pub state: BuildState,
    /// Node it ran on, once dispatched.
    pub node: Option<String>,
    /// Why it failed or was aborted, for people ("" otherwise).
    pub message: String,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds, once running.
    pub started: Option<i64>,
    /// Unix seconds, once final.
    pub finished: Option<i64>,
    /// Only while the controller is running the build: whether a cancel is on its way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelling: Option<bool>,
    /// Only while queued or stalled: why the build waits, for people ("no node has label
    /// 'windows'", "disk full on the controller: ...").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// A step of a build.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StepRecord {
    /// Index from 1.
    pub index: u32,
    /// Display name.
    pub name: String,
    /// State or result.
    pub state: StepState,
    /// How it ended, for people: "exit code 3", "killed by signal 9", "timed out"... ("" before).
    pub exit: String,
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Output bytes stored.
    pub bytes: u64,
    /// Unix seconds, once started (unknown for steps stored by a wisp before 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<i64>,
    /// Unix seconds, once ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<i64>,
    /// The stage it belongs to ("build / arch=x86_64"; "" for a pipeline of plain steps).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stage: String,
    /// The node it ran on, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// For another attempt of a step: the step it repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<u32>,
    /// The stage's attempt it belongs to (from 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub attempt: u32,
    /// The step's own attempt within it (from 1; a step's `retry:`).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub rerun: u32,
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// `GET /api/builds/N/artifacts`: what the build's archive steps kept, by path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArtifactList {
    /// The artifacts.
    pub artifacts: Vec<crate::controller::archives::Artifact>,
}

/// `GET /api/builds/N` (and `POST /api/builds?wait=`): the build with its steps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildInfo {
    /// The build as listed.
    #[serde(flatten)]
    pub build: BuildRecord,
    /// Its steps, in order.
    pub steps: Vec<StepRecord>,
}

/// `GET /api/builds`: the newest builds, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildList {
    /// The builds.
    pub builds: Vec<BuildRecord>,
}

/// A cloud as `wisp clouds` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CloudView {
    /// Its name.
    pub name: String,
    /// `kubernetes` or `podman`.
    pub kind: String,
    /// Namespace (Kubernetes).
    pub namespace: Option<String>,
    /// Most pods at once (0: no cap).
    pub container_cap: u32,
    /// Pods it has now (starting, running, idle or kept).
    pub pods: u32,
    /// Its templates.
    pub templates: Vec<TemplateView>,
    /// Whether its backend answers, or why not.
    pub status: String,
}

/// A template as `wisp templates` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateView {
    /// The cloud it belongs to.
    pub cloud: String,
    /// Its name.
    pub name: String,
    /// The labels it serves.
    pub label: String,
    /// Its parents.
    pub inherit_from: String,
    /// Most pods at once, if capped.
    pub instance_cap: Option<u32>,
    /// Minutes a pod waits for another build.
    pub idle_minutes: u32,
    /// Retention as configured.
    pub pod_retention: String,
    /// Pods of it now (not counting kept ones).
    pub pods: u32,
    /// `ok`, or why it starts no pods.
    pub status: String,
}

/// `POST /api/clouds`: the clouds the file declared, all applied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CloudsApplied {
    /// Their names.
    pub applied: Vec<String>,
    /// What was applied but looks wrong (an `inheritFrom` naming no template, a cycle).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// `DELETE /api/clouds/NAME`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CloudRemoved {
    /// The cloud's name.
    pub removed: String,
}

/// `POST /api/builds` without `?wait=`: the new build's number.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Submitted {
    /// Build number.
    pub id: u64,
}

/// `POST /api/builds/N/cancel`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cancelled {
    /// Always true: the cancel was taken.
    pub cancelled: bool,
}

/// `POST /api/token/rotate`: the new API token (the old one no longer works).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRotated {
    /// The new token.
    pub token: String,
}

/// The body of every refusal (4xx and 5xx).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// What went wrong and what to do, as one sentence.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::store;
    use serde_json::{json, Value};

    /// `value` read as `T` and written back is `value` again: no field missing, renamed or retyped.
    fn round_trips<T: Serialize + serde::de::DeserializeOwned>(value: Value) -> T {
        let t: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"));
        assert_eq!(serde_json::to_value(&t).unwrap(), value);
        t
    }

    #[test]
    fn states_use_their_lowercase_names_everywhere() {
        for s in [
            BuildState::Queued,
            BuildState::Running,
            BuildState::Success,
            BuildState::Failure,
            BuildState::Aborted,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
            assert_eq!(BuildState::parse(s.as_str()), s);
        }
        for s in [
            StepState::Pending,
            StepState::Running,
            StepState::Success,
            StepState::Failure,
            StepState::Aborted,
            StepState::Skipped,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
            assert_eq!(StepState::parse(s.as_str()), s);
        }
        assert_eq!(BuildState::parse("weird"), BuildState::Failure);
        assert_eq!(StepState::parse("weird"), StepState::Failure);
        assert!(serde_json::from_value::<BuildState>(json!("Success")).is_err());
    }

    /// The store's records, serialised as the routes did before these types existed, read back the same.
    #[test]
    fn build_and_step_records_match_the_stores_serialisation() {
        let b = store::BuildRecord {
            id: 7,
            name: "hello".into(),
            state: BuildState::Running,
            node: Some("n1".into()),
            message: String::new(),
            created: 1_700_000_000,
            started: Some(1_700_000_001),
            finished: None,
            yaml: "name: hello".into(),
            params: String::new(),
        };
        let s = store::StepRecord {
            index: 1,
            name: "echo hi".into(),
            state: StepState::Running,
            exit: String::new(),
            code: None,
            bytes: 12,
            started: Some(1_700_000_001),
            finished: None,
            stage: "build / arch=x86_64".into(),
            node: Some("n1".into()),
            origin: None,
            attempt: 1,
            rerun: 1,
        };
        let mut v = serde_json::to_value(&b).unwrap();
        round_trips::<BuildRecord>(v.clone());
        v["cancelling"] = json!(false);
        let listed: BuildRecord = round_trips(v.clone());
        assert_eq!(listed.cancelling, Some(false));
        v["steps"] = serde_json::to_value(vec![s]).unwrap();
        let info: BuildInfo = round_trips(v);
        assert_eq!((info.build.id, info.steps[0].state), (7, StepState::Running));
        round_trips::<BuildList>(json!({ "builds": [serde_json::to_value(&b).unwrap()] }));
    }

    #[test]
    fn node_bodies_match_the_routes() {
        let entry = json!({
            "name": "n1", "labels": ["linux", "x86_64"], "executors": 2, "online": true,
            "busy": 1, "websocket": true, "work_dir": "", "origin": "static",
        });
        round_trips::<NodeList>(json!({ "nodes": [entry.clone()] }));
        let mut info = entry;
        info["secret"] = json!("ab".repeat(32));
        info["command"] =
            json!("wisp-agent --url http://127.0.0.1:8080/ --name n1 --secret abab --websocket");
        let n: NodeInfo = round_trips(info);
        assert_eq!((n.node.name.as_str(), n.node.busy), ("n1", 1));
        round_trips::<NodeRemoved>(json!({ "removed": "n1" }));
    }

    #[test]
    fn new_node_fills_defaults_and_refuses_unknown_fields() {
        let n: NewNode = serde_json::from_value(json!({ "name": "n1" })).unwrap();
        assert_eq!(
            n,
            NewNode {
                name: "n1".into(),
                labels: String::new(),
                executors: 1,
                websocket: true,
                work_dir: String::new()
            }
        );
        let e = serde_json::from_value::<NewNode>(json!({ "name": "n1", "lables": "x" })).unwrap_err();
        assert!(e.to_string().contains("unknown field `lables`"), "{e}");
    }

    #[test]
    fn small_answers_match_the_routes() {
        assert_eq!(round_trips::<Submitted>(json!({ "id": 3 })).id, 3);
        round_trips::<Cancelled>(json!({ "cancelled": true }));
        round_trips::<TokenRotated>(json!({ "token": "t" }));
        round_trips::<ErrorBody>(json!({ "error": "no node named 'x'" }));
    }
}
