//! The queue and the dispatch decision: which queued build runs on which free node, which waits
//! for a cloud, and why each of the others waits. Pure: no I/O and no locks of its own; the
//! controller calls it under its state lock and acts on the decisions after releasing it.

use super::cloud::{Cloud, Reserve, Want, STATIC};
use super::labels::LabelExpr;
use super::nodes::{Node, Nodes};
use super::template::PodTemplate;
use std::collections::VecDeque;
use std::sync::Arc;

/// A queued build.
#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    /// Which of the build's agent reservations (its plan's unit).
    unit: u32,
    expr: LabelExpr,
    /// A pod template the pipeline carries inline.
    inline: Option<Arc<PodTemplate>>,
    /// The cloud asked to start an agent for it and the node reserved, if any.
    reserved: Option<(String, String)>,
    /// Why no cloud could start one yet (at a cap).
    note: Option<String>,
}

/// What dispatch decided for one build.
#[derive(Clone)]
pub enum Decision {
    /// Run it on this node (whose busy count is already raised).
    Run {
        /// Build number.
        build: u64,
        /// The build's unit.
        unit: u32,
        /// Node name.
        node: String,
    },
    /// Launch the agent of this node, which a cloud reserved for the build (the node is added).
    Provision {
        /// Build number.
        build: u64,
        /// The build's unit.
        unit: u32,
        /// The cloud.
        cloud: Arc<dyn Cloud>,
        /// Node name.
        node: String,
    },
    /// Fail the build (taken out of the queue): a cloud refuses to start agents for it.
    Fail {
        /// Build number.
        build: u64,
        /// The build's unit.
        unit: u32,
        /// Why.
        message: String,
    },
}

impl std::fmt::Debug for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Run { build, unit, node } => write!(f, "Run({build}.{unit} on {node})"),
            Self::Provision { build, unit, cloud, node } => {
                write!(f, "Provision({build}.{unit}: {node} from {})", cloud.name())
            }
            Self::Fail { build, unit, message } => write!(f, "Fail({build}.{unit}: {message})"),
        }
    }
}

impl PartialEq for Decision {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Run { build: a, unit: u, node: x }, Self::Run { build: b, unit: v, node: y }) => {
                a == b && u == v && x == y
            }
            (
                Self::Provision { build: a, unit: u, cloud: c, node: x },
                Self::Provision { build: b, unit: v, cloud: d, node: y },
            ) => a == b && u == v && c.name() == d.name() && x == y,
            (Self::Fail { build: a, unit: u, message: x }, Self::Fail { build: b, unit: v, message: y }) => {
                a == b && u == v && x == y
            }
            _ => false,
        }
    }
}

/// Queued builds, oldest first.
#[derive(Debug, Default)]
pub struct Queue {
    entries: VecDeque<Entry>,
}

impl Queue {
    /// Queue build `id`, which needs a node that `expr` matches.
    pub fn push(&mut self, id: u64, expr: LabelExpr) {
        self.push_with(id, expr, None);
    }

    /// Queue build `id`, which needs a node that `expr` matches or a pod of its inline template.
    pub fn push_with(&mut self, id: u64, expr: LabelExpr, inline: Option<Arc<PodTemplate>>) {
        self.push_unit(id, 0, expr, inline);
    }

    /// Queue unit `unit` of build `id` (one of its agent reservations).
    pub fn push_unit(&mut self, id: u64, unit: u32, expr: LabelExpr, inline: Option<Arc<PodTemplate>>) {
        self.entries.push_back(Entry { id, unit, expr, inline, reserved: None, note: None });
    }

    /// Take build `id` out (all its units); true if it was queued.
    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.id != id);
        self.entries.len() != before
    }

    /// Take unit `unit` of build `id` out; true if it was queued.
    pub fn remove_unit(&mut self, id: u64, unit: u32) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| (e.id, e.unit) != (id, unit));
        self.entries.len() != before
    }

    /// The units of build `id` that are queued.
    pub fn units_of(&self, id: u64) -> Vec<u32> {
        self.entries.iter().filter(|e| e.id == id).map(|e| e.unit).collect()
    }

    /// Builds waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first `limit` queued builds, oldest first (each once, however many units it queued).
    pub fn ids(&self, limit: usize) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for e in &self.entries {
            if out.len() == limit {
                break;
            }
            if !out.contains(&e.id) {
                out.push(e.id);
            }
        }
        out
    }

    /// Whether build `id` is queued.
    pub fn contains(&self, id: u64) -> bool {
        self.entries.iter().any(|e| e.id == id)
    }

    /// The queued build unit that node `node` was reserved for, taken out of the queue.
    pub fn take_reserved(&mut self, node: &str) -> Option<(u64, u32)> {
        let i = self.entries.iter().position(|e| e.reserved.as_ref().is_some_and(|(_, n)| n == node))?;
        self.entries.remove(i).map(|e| (e.id, e.unit))
    }

    /// Start every queued build that has a matching node with a free executor, oldest first
    /// (raising that node's busy count). For each build that no free node can take and no static
    /// node matches, ask the clouds (once per build, until one reserves a node for it, which is
    /// added to `nodes`).
    pub fn dispatch(&mut self, nodes: &mut Nodes, clouds: &[Arc<dyn Cloud>]) -> Vec<Decision> {
        let mut out = Vec::new();
        // Expressions that found no free node in this pass: executors only fill up during it,
        // so the builds after that wait for them need no look.
        let mut full: Vec<LabelExpr> = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            let e = &self.entries[i];
            let picked = if full.contains(&e.expr) { None } else { nodes.pick(&e.expr) };
            if let Some(node) = picked {
                nodes.update(&node, |n| n.busy += 1);
                let e = self.entries.remove(i).expect("in range");
                // The node may have been reserved for a later build: that one takes over this
                // build's reservation (or is asked again when this build had none).
                if let Some(f) =
                    self.entries.iter_mut().find(|f| f.reserved.as_ref().is_some_and(|(_, n)| *n == node))
                {
                    f.reserved = e.reserved.clone();
                }
                out.push(Decision::Run { build: e.id, unit: e.unit, node });
                continue;
            }
            if !full.contains(&e.expr) {
                full.push(e.expr.clone());
            }
            let e = &mut self.entries[i];
            // A build that asks for no label runs on static nodes only, unless it carries its own
            // pod template; one that a static node matches waits for it. (The scan of the nodes
            // comes last: only builds a cloud may take pay for it.)
            let wants_cloud = e.inline.is_some() || !e.expr.is_any();
            if e.reserved.is_none()
                && wants_cloud
                && !clouds.is_empty()
                && !nodes.values().any(|n| n.rec.origin == STATIC && e.expr.matches(&n.match_labels))
            {
                let mut answer = None;
                {
                    let taken = |name: &str| nodes.contains_key(name);
                    let want =
                        Want { build: e.id, expr: &e.expr, inline: e.inline.as_deref(), taken: &taken };
                    for c in clouds {
                        match c.reserve(&want) {
                            Reserve::No => continue,
                            Reserve::Full(why) => {
                                e.note = Some(format!("waiting for cloud '{}': {why}", c.name()));
                            }
                            other => answer = Some((c.clone(), other)),
                        }
                        break;
                    }
                }
                match answer {
                    Some((c, Reserve::Node(rec))) => {
                        e.note = None;
                        if e.inline.is_some() {
                            // Only the pod made for it may take a build with its own template.
                            if let Ok(x) = super::labels::parse(&rec.name) {
                                e.expr = x;
                            }
                        }
                        e.reserved = Some((c.name().to_string(), rec.name.clone()));
                        let node = rec.name.clone();
                        nodes.insert(Node::ephemeral(rec));
                        out.push(Decision::Provision { build: e.id, unit: e.unit, cloud: c, node });
                    }
                    Some((_, Reserve::Refused(message))) => {
                        let e = self.entries.remove(i).expect("in range");
                        out.push(Decision::Fail { build: e.id, unit: e.unit, message });
                        continue;
                    }
                    _ => {}
                }
            }
            i += 1;
        }
        out
    }

    /// Why build `id` waits, for people; None if it is not queued.
    pub fn why(&self, id: u64, nodes: &Nodes) -> Option<String> {
        let e = self.entries.iter().find(|e| e.id == id)?;
        let label = if e.expr.is_any() { "any node".to_string() } else { format!("'{}'", e.expr) };
        if let Some((c, node)) = &e.reserved {
            return Some(format!("waiting for cloud '{c}' to start an agent for {label} (pod {node})"));
        }
        if let Some(note) = &e.note {
            return Some(note.clone());
        }
        let matching: Vec<_> = nodes.values().filter(|n| e.expr.matches(&n.match_labels)).collect();
        if matching.is_empty() {
            return Some(if e.expr.is_any() {
                "no node exists: add one with `wisp node add NAME`".to_string()
            } else if is_one_label(&e.expr) {
                format!("no node has label {label}")
            } else {
                format!("no node matches {label}")
            });
        }
        let online = matching.iter().filter(|n| n.conn.is_some()).count();
        if online == 0 {
            let names: Vec<&str> = matching.iter().take(5).map(|n| n.rec.name.as_str()).collect();
            let more =
                if matching.len() > 5 { format!(" and {} more", matching.len() - 5) } else { String::new() };
            return Some(format!(
                "waiting for an agent: {} match {label} but {} offline",
                names.join(", ") + &more,
                if matching.len() == 1 { "it is" } else { "all are" }
            ));
        }
        let ahead = self.ids(usize::MAX).iter().take_while(|q| **q != id).count();
        let mut why = format!(
            "all executors busy on the {online} online node{} matching {label}",
            if online == 1 { "" } else { "s" }
        );
        if ahead > 0 {
            why.push_str(&format!(
                " ({ahead} build{} ahead in the queue)",
                if ahead == 1 { "" } else { "s" }
            ));
        }
        Some(why)
    }
}

/// True if the expression is a single label (so "has label" reads right).
fn is_one_label(expr: &LabelExpr) -> bool {
    let s = expr.to_string();
    !s.contains(|c: char| c.is_whitespace() || "&|!()".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::labels;
    use crate::controller::nodes::Node;
    use crate::controller::session::Session;
    use crate::controller::store::NodeRecord;

    fn node(name: &str, labels: &str, executors: u32, online: bool) -> Node {
        let mut n = Node::new(NodeRecord {
            name: name.into(),
            labels: labels.split_whitespace().map(String::from).collect(),
            executors,
            websocket: false,
            work_dir: String::new(),
            origin: "static".into(),
        });
        if online {
            let (tx, _rx) = crate::controller::session::out_queue(1);
            n.conn = Some(Arc::new(Session::new(1, name, "test", tx)));
        }
        n
    }

    fn nodes(list: Vec<Node>) -> Nodes {
        let mut n = Nodes::default();
        list.into_iter().for_each(|x| n.insert(x));
        n
    }

    fn expr(s: &str) -> LabelExpr {
        labels::parse(s).unwrap()
    }

    use crate::controller::cloud::testing::TestCloud;

    #[test]
    fn oldest_build_first_on_the_least_busy_node() {
        let mut n = nodes(vec![node("a", "linux", 2, true), node("b", "linux", 2, true)]);
        let mut q = Queue::default();
        for id in 1..=5 {
            q.push(id, expr("linux"));
        }
        let d = q.dispatch(&mut n, &[]);
        let runs: Vec<_> = d
            .iter()
            .map(|d| match d {
                Decision::Run { build, node, .. } => (*build, node.as_str()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(runs, vec![(1, "a"), (2, "b"), (3, "a"), (4, "b")]);
        assert_eq!(q.len(), 1);
        assert!(q.contains(5));
        assert_eq!(q.why(5, &n).unwrap(), "all executors busy on the 2 online nodes matching 'linux'");
        // A freed executor takes the build that waited.
        n.update("b", |x| x.busy -= 1);
        assert_eq!(q.dispatch(&mut n, &[]), vec![Decision::Run { build: 5, unit: 0, node: "b".into() }]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_build_that_cannot_run_yet_does_not_hold_up_others() {
        let mut n = nodes(vec![node("a", "linux", 1, true)]);
        let mut q = Queue::default();
        q.push(1, expr("windows"));
        q.push(2, expr("linux"));
        assert_eq!(q.dispatch(&mut n, &[]), vec![Decision::Run { build: 2, unit: 0, node: "a".into() }]);
        assert_eq!(q.why(1, &n).unwrap(), "no node has label 'windows'");
        assert_eq!(q.why(2, &n), None, "no longer queued");
    }

    #[test]
    fn says_why_a_build_waits() {
        let n = nodes(vec![node("a", "linux arm64", 1, false), node("b", "linux", 1, false)]);
        let mut q = Queue::default();
        q.push(1, expr("linux && arm64"));
        q.push(2, expr("linux"));
        q.push(3, expr("mac || windows"));
        q.push(4, expr(""));
        assert_eq!(q.why(1, &n).unwrap(), "waiting for an agent: a match 'linux && arm64' but it is offline");
        assert_eq!(q.why(2, &n).unwrap(), "waiting for an agent: a, b match 'linux' but all are offline");
        assert_eq!(q.why(3, &n).unwrap(), "no node matches 'mac || windows'");
        let empty = Nodes::default();
        assert_eq!(q.why(4, &empty).unwrap(), "no node exists: add one with `wisp node add NAME`");
    }

    #[test]
    fn a_cloud_is_asked_once_for_a_label_no_static_node_has_and_caps_hold() {
        let mut n = nodes(vec![node("a", "linux", 1, true)]);
        let cloud = TestCloud::new("k8s", 2);
        let clouds: Vec<Arc<dyn Cloud>> = vec![cloud.clone()];
        let mut q = Queue::default();
        q.push(1, expr("k8s"));
        q.push(2, expr("windows"));
        q.push(3, expr("linux"));
        q.push(4, expr("linux"));
        q.push(5, expr("k8s"));
        q.push(6, expr("k8s"));
        let d = q.dispatch(&mut n, &clouds);
        let c: Arc<dyn Cloud> = cloud.clone();
        assert_eq!(
            d,
            vec![
                Decision::Provision { build: 1, unit: 0, cloud: c.clone(), node: "k8s-1".into() },
                Decision::Run { build: 3, unit: 0, node: "a".into() },
                Decision::Provision { build: 5, unit: 0, cloud: c.clone(), node: "k8s-2".into() },
            ]
        );
        // The reserved nodes are added (offline) for their agents to connect as.
        assert!(n.contains_key("k8s-1") && n.contains_key("k8s-2"));
        // Asked once: the next pass does not ask again for 1 and 5; 6 finds the cap.
        assert_eq!(q.dispatch(&mut n, &clouds), vec![]);
        assert_eq!(cloud.made.lock().unwrap().len(), 2);
        assert_eq!(q.why(1, &n).unwrap(), "waiting for cloud 'test' to start an agent for 'k8s' (pod k8s-1)");
        assert_eq!(q.why(6, &n).unwrap(), "waiting for cloud 'test': at its cap of 2");
        assert_eq!(q.why(2, &n).unwrap(), "no node has label 'windows'");
        assert_eq!(
            q.why(4, &n).unwrap(),
            "all executors busy on the 1 online node matching 'linux' (2 builds ahead in the queue)"
        );
    }

    #[test]
    fn a_build_that_takes_a_pod_reserved_for_a_later_one_hands_over_its_reservation() {
        let mut n = Nodes::default();
        let cloud = TestCloud::new("k8s", 5);
        let clouds: Vec<Arc<dyn Cloud>> = vec![cloud.clone()];
        let mut q = Queue::default();
        q.push(1, expr("k8s"));
        q.push(2, expr("k8s"));
        q.dispatch(&mut n, &clouds);
        // k8s-2 (reserved for 2) connects first: the older build 1 takes it, and 2 now waits
        // for k8s-1.
        let (tx, _rx) = crate::controller::session::out_queue(1);
        n.update("k8s-2", |x| x.conn = Some(Arc::new(Session::new(1, "k8s-2", "test", tx))));
        assert_eq!(
            q.dispatch(&mut n, &clouds),
            vec![Decision::Run { build: 1, unit: 0, node: "k8s-2".into() }]
        );
        assert_eq!(q.take_reserved("k8s-1"), Some((2, 0)));
        assert_eq!(q.take_reserved("k8s-2"), None);
    }
}
