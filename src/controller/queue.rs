//! The queue and the dispatch decision: which queued build runs on which free node, which waits
//! for a cloud, and why each of the others waits. Pure: no I/O and no locks of its own; the
//! controller calls it under its state lock and acts on the decisions after releasing it.

use super::cloud::Cloud;
use super::labels::LabelExpr;
use super::nodes::Nodes;
use std::collections::VecDeque;
use std::sync::Arc;

/// A queued build.
#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    expr: LabelExpr,
    /// The cloud asked to start an agent for it, if any.
    cloud: Option<usize>,
}

/// What dispatch decided for one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run it on this node (whose busy count is already raised).
    Run {
        /// Build number.
        build: u64,
        /// Node name.
        node: String,
    },
    /// Ask the cloud at this index of the clouds given to start an agent for it.
    Provision {
        /// Build number.
        build: u64,
        /// Index into the clouds.
        cloud: usize,
    },
}

/// Queued builds, oldest first.
#[derive(Debug, Default)]
pub struct Queue {
    entries: VecDeque<Entry>,
}

impl Queue {
    /// Queue build `id`, which needs a node that `expr` matches.
    pub fn push(&mut self, id: u64, expr: LabelExpr) {
        self.entries.push_back(Entry { id, expr, cloud: None });
    }

    /// Take build `id` out; true if it was queued.
    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.id != id);
        self.entries.len() != before
    }

    /// Builds waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether build `id` is queued.
    pub fn contains(&self, id: u64) -> bool {
        self.entries.iter().any(|e| e.id == id)
    }

    /// Start every queued build that has a matching node with a free executor, oldest first
    /// (raising that node's busy count), and ask a cloud for each build that no node at all can
    /// take but a cloud serves (once per build).
    pub fn dispatch(&mut self, nodes: &mut Nodes, clouds: &[Arc<dyn Cloud>]) -> Vec<Decision> {
        let mut out = Vec::new();
        // Expressions that found no free node in this pass: executors only fill up during it,
        // so the builds after that wait for them need no look.
        let mut full: Vec<LabelExpr> = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            let e = &mut self.entries[i];
            if full.contains(&e.expr) {
                i += 1;
                continue;
            }
            match nodes.pick(&e.expr) {
                Some(node) => {
                    nodes.update(&node, |n| n.busy += 1);
                    let e = self.entries.remove(i).expect("in range");
                    out.push(Decision::Run { build: e.id, node });
                }
                None => {
                    full.push(e.expr.clone());
                    if e.cloud.is_none() && !nodes.values().any(|n| e.expr.matches(&n.match_labels)) {
                        if let Some(c) = clouds.iter().position(|c| c.serves(&e.expr)) {
                            e.cloud = Some(c);
                            out.push(Decision::Provision { build: e.id, cloud: c });
                        }
                    }
                    i += 1;
                }
            }
        }
        out
    }

    /// Why build `id` waits, for people; None if it is not queued.
    pub fn why(&self, id: u64, nodes: &Nodes, clouds: &[Arc<dyn Cloud>]) -> Option<String> {
        let e = self.entries.iter().find(|e| e.id == id)?;
        let label = if e.expr.is_any() { "any node".to_string() } else { format!("'{}'", e.expr) };
        if let Some(c) = e.cloud.and_then(|c| clouds.get(c)) {
            return Some(format!("waiting for cloud '{}' to start an agent for {label}", c.name()));
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
        let ahead = self.entries.iter().take_while(|q| q.id != id).count();
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
    use crate::controller::cloud::CloudFuture;
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
            let (tx, _rx) = smol::channel::bounded(1);
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

    struct TestCloud(&'static str);
    impl Cloud for TestCloud {
        fn name(&self) -> &str {
            "test"
        }
        fn serves(&self, label: &LabelExpr) -> bool {
            label.matches(&[self.0.to_string()])
        }
        fn provision(&self, _: &LabelExpr) -> CloudFuture<Result<NodeRecord, String>> {
            Box::pin(async { Err("not in this test".to_string()) })
        }
        fn release(&self, _: &str) -> CloudFuture<()> {
            Box::pin(async {})
        }
    }

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
                Decision::Run { build, node } => (*build, node.as_str()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(runs, vec![(1, "a"), (2, "b"), (3, "a"), (4, "b")]);
        assert_eq!(q.len(), 1);
        assert!(q.contains(5));
        assert_eq!(q.why(5, &n, &[]).unwrap(), "all executors busy on the 2 online nodes matching 'linux'");
        // A freed executor takes the build that waited.
        n.update("b", |x| x.busy -= 1);
        assert_eq!(q.dispatch(&mut n, &[]), vec![Decision::Run { build: 5, node: "b".into() }]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_build_that_cannot_run_yet_does_not_hold_up_others() {
        let mut n = nodes(vec![node("a", "linux", 1, true)]);
        let mut q = Queue::default();
        q.push(1, expr("windows"));
        q.push(2, expr("linux"));
        assert_eq!(q.dispatch(&mut n, &[]), vec![Decision::Run { build: 2, node: "a".into() }]);
        assert_eq!(q.why(1, &n, &[]).unwrap(), "no node has label 'windows'");
        assert_eq!(q.why(2, &n, &[]), None, "no longer queued");
    }

    #[test]
    fn says_why_a_build_waits() {
        let n = nodes(vec![node("a", "linux arm64", 1, false), node("b", "linux", 1, false)]);
        let mut q = Queue::default();
        q.push(1, expr("linux && arm64"));
        q.push(2, expr("linux"));
        q.push(3, expr("mac || windows"));
        q.push(4, expr(""));
        assert_eq!(
            q.why(1, &n, &[]).unwrap(),
            "waiting for an agent: a match 'linux && arm64' but it is offline"
        );
        assert_eq!(
            q.why(2, &n, &[]).unwrap(),
            "waiting for an agent: a, b match 'linux' but all are offline"
        );
        assert_eq!(q.why(3, &n, &[]).unwrap(), "no node matches 'mac || windows'");
        let empty = Nodes::default();
        assert_eq!(q.why(4, &empty, &[]).unwrap(), "no node exists: add one with `wisp node add NAME`");
    }

    #[test]
    fn a_cloud_is_asked_once_for_a_label_no_node_has() {
        let mut n = nodes(vec![node("a", "linux", 1, true)]);
        let clouds: Vec<Arc<dyn Cloud>> = vec![Arc::new(TestCloud("k8s"))];
        let mut q = Queue::default();
        q.push(1, expr("k8s"));
        q.push(2, expr("windows"));
        q.push(3, expr("linux"));
        q.push(4, expr("linux"));
        let d = q.dispatch(&mut n, &clouds);
        assert_eq!(
            d,
            vec![Decision::Provision { build: 1, cloud: 0 }, Decision::Run { build: 3, node: "a".into() }]
        );
        // Asked once: the next pass does not ask again, and a label a node has (busy) is not
        // sent to the cloud.
        assert_eq!(q.dispatch(&mut n, &clouds), vec![]);
        assert_eq!(q.why(1, &n, &clouds).unwrap(), "waiting for cloud 'test' to start an agent for 'k8s'");
        assert_eq!(q.why(2, &n, &clouds).unwrap(), "no node has label 'windows'");
        assert_eq!(
            q.why(4, &n, &clouds).unwrap(),
            "all executors busy on the 1 online node matching 'linux' (2 builds ahead in the queue)"
        );
    }
}
