//! The controller's nodes, indexed for dispatch by what can take a build now.
//!
//! Dispatch used to test every node against a build's label expression: with 10,000 agents
//! connected, half of the controller's time per build went into that scan, and a queue of builds
//! that no free node matches cost a scan per queued build on every dispatch. Here the nodes that
//! are online with a free executor sit in ordered sets, one per label, least busy first; an
//! expression is tested only on the nodes of the labels it needs (or the node it names).

use super::labels::LabelExpr;
use super::session::Session;
use super::store::NodeRecord;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// A node and, when online, its link.
pub struct Node {
    /// As stored.
    pub rec: NodeRecord,
    /// Labels plus the node's own name, for matching.
    pub match_labels: Vec<String>,
    /// The live link, if online.
    pub conn: Option<Arc<Session>>,
    /// Executors in use.
    pub busy: u32,
    /// Since when the node has had no link (the controller's start, for a node never seen).
    pub offline_since: Option<Instant>,
    /// Whether its record is in the store. A cloud's node is stored when its agent first
    /// connects: a pod whose agent never came is an orphan after a restart.
    pub persisted: bool,
    /// When this controller made or loaded it.
    pub since: Instant,
    /// When its agent last connected or went away, as wall time (None: not since this
    /// controller started).
    pub changed: Option<std::time::SystemTime>,
    /// Whether its agent has connected since this controller started.
    pub ever_online: bool,
}

impl Node {
    /// A node as stored, offline and idle.
    pub fn new(rec: NodeRecord) -> Self {
        let mut match_labels = rec.labels.clone();
        match_labels.push(rec.name.clone());
        Self {
            rec,
            match_labels,
            conn: None,
            busy: 0,
            offline_since: Some(Instant::now()),
            persisted: true,
            since: Instant::now(),
            changed: None,
            ever_online: false,
        }
    }

    /// A node a cloud reserved, not stored yet.
    pub fn ephemeral(rec: NodeRecord) -> Self {
        Self { persisted: false, ..Self::new(rec) }
    }

    /// Online with an executor free.
    fn free(&self) -> bool {
        self.conn.is_some() && self.busy < self.rec.executors
    }

    /// Where it sorts among free nodes: least busy first, then by name.
    fn key(&self) -> (u32, String) {
        (self.busy, self.rec.name.clone())
    }
}

/// Every node by name, and the free ones by label.
#[derive(Default)]
pub struct Nodes {
    all: BTreeMap<String, Node>,
    /// Free nodes (online, an executor free) per label, least busy first. Not per node name: an
    /// expression that names a node finds it by name in `all` (a set per node would cost about
    /// 800 bytes each: 8 MB with 10,000 agents).
    free: HashMap<String, FreeSet>,
    /// Every free node, least busy first: for expressions that need no particular label.
    free_any: FreeSet,
}

impl Nodes {
    /// The node named `name`.
    pub fn get(&self, name: &str) -> Option<&Node> {
        self.all.get(name)
    }

    /// Whether there is a node named `name`.
    pub fn contains_key(&self, name: &str) -> bool {
        self.all.contains_key(name)
    }

    /// Every node, by name.
    pub fn values(&self) -> impl Iterator<Item = &Node> {
        self.all.values()
    }

    /// Add (or replace) a node.
    pub fn insert(&mut self, node: Node) {
        self.remove(&node.rec.name);
        if node.free() {
            index(&mut self.free, &mut self.free_any, &node, node.key());
        }
        self.all.insert(node.rec.name.clone(), node);
    }

    /// Take a node out.
    pub fn remove(&mut self, name: &str) -> Option<Node> {
        let node = self.all.remove(name)?;
        if node.free() {
            unindex(&mut self.free, &mut self.free_any, &node, &node.key());
        }
        Some(node)
    }

    /// Change the node named `name` (its link, its busy count: not its record) and keep the index
    /// right.
    pub fn update<R>(&mut self, name: &str, f: impl FnOnce(&mut Node) -> R) -> Option<R> {
        let Self { all, free, free_any } = self;
        let node = all.get_mut(name)?;
        let before = node.free().then(|| node.key());
        let out = f(node);
        let after = node.free().then(|| node.key());
        if before != after {
            if let Some(k) = &before {
                unindex(free, free_any, node, k);
            }
            if let Some(k) = after {
                index(free, free_any, node, k);
            }
        }
        Some(out)
    }

    /// The free node that `expr` matches with the fewest executors in use (by name among equals).
    pub fn pick(&self, expr: &LabelExpr) -> Option<String> {
        let first_match =
            |set: &FreeSet| set.iter().find(|(_, name)| expr.matches(&self.all[name].match_labels)).cloned();
        let by_name = |l: &str| {
            let n = self.all.get(l)?;
            (n.free() && expr.matches(&n.match_labels)).then(|| n.key())
        };
        let best = match expr.required_labels() {
            Some(labels) => labels
                .iter()
                .filter_map(|l| self.free.get(*l))
                .filter_map(first_match)
                .chain(labels.iter().filter_map(|l| by_name(l)))
                .min(),
            None => first_match(&self.free_any),
        };
        best.map(|(_, name)| name)
    }
}

type FreeSet = BTreeSet<(u32, String)>;

fn index(free: &mut HashMap<String, FreeSet>, free_any: &mut FreeSet, node: &Node, key: (u32, String)) {
    for l in &node.rec.labels {
        free.entry(l.clone()).or_default().insert(key.clone());
    }
    free_any.insert(key);
}

fn unindex(free: &mut HashMap<String, FreeSet>, free_any: &mut FreeSet, node: &Node, key: &(u32, String)) {
    for l in &node.rec.labels {
        if let Some(set) = free.get_mut(l) {
            set.remove(key);
            if set.is_empty() {
                free.remove(l);
            }
        }
    }
    free_any.remove(key);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::labels;
    use proptest::prelude::*;

    fn conn(node: &str) -> Arc<Session> {
        let (tx, _rx) = crate::controller::session::out_queue(1);
        Arc::new(Session::new(1, node, "test", tx))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(usize, u8, u32),
        Remove(usize),
        Connect(usize),
        Disconnect(usize),
        Busy(usize),
        Idle(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let i = 0..6usize;
        prop_oneof![
            (i.clone(), 0..8u8, 1..4u32).prop_map(|(i, l, e)| Op::Insert(i, l, e)),
            i.clone().prop_map(Op::Remove),
            i.clone().prop_map(Op::Connect),
            i.clone().prop_map(Op::Disconnect),
            i.clone().prop_map(Op::Busy),
            i.prop_map(Op::Idle),
        ]
    }

    /// What dispatch did before the index: every node tested, the least busy free match first
    /// (by name among equals).
    fn scan(nodes: &Nodes, expr: &LabelExpr) -> Option<String> {
        nodes
            .values()
            .filter(|n| n.conn.is_some() && n.busy < n.rec.executors)
            .filter(|n| expr.matches(&n.match_labels))
            .min_by_key(|n| n.busy)
            .map(|n| n.rec.name.clone())
    }

    proptest! {
        /// After any sequence of changes, the index picks what a scan of every node picks.
        #[test]
        fn the_index_picks_what_a_scan_of_every_node_picks(ops in proptest::collection::vec(op(), 1..60)) {
            let exprs: Vec<LabelExpr> = [
                "", "a", "b && c", "a || b", "!a", "a && !b", "n3", "(a || c) && !n1", "a || !b", "zzz", "n2 || c",
                "n4 && b",
            ]
            .iter()
            .map(|e| labels::parse(e).unwrap())
            .collect();
            let mut nodes = Nodes::default();
            for op in ops {
                match op {
                    Op::Insert(i, mask, executors) => {
                        let labels = ["a", "b", "c"]
                            .iter()
                            .enumerate()
                            .filter(|(b, _)| mask & (1 << b) != 0)
                            .map(|(_, l)| l.to_string())
                            .collect();
                        let name = format!("n{i}");
                        nodes.insert(Node::new(NodeRecord {
                            name,
                            labels,
                            executors,
                            websocket: false,
                            work_dir: String::new(),
                            origin: "static".into(),
                        }));
                    }
                    Op::Remove(i) => {
                        nodes.remove(&format!("n{i}"));
                    }
                    Op::Connect(i) => {
                        let name = format!("n{i}");
                        let c = conn(&name);
                        nodes.update(&name, |n| n.conn = Some(c));
                    }
                    Op::Disconnect(i) => {
                        nodes.update(&format!("n{i}"), |n| n.conn = None);
                    }
                    Op::Busy(i) => {
                        nodes.update(&format!("n{i}"), |n| n.busy += 1);
                    }
                    Op::Idle(i) => {
                        nodes.update(&format!("n{i}"), |n| n.busy = n.busy.saturating_sub(1));
                    }
                }
                for e in &exprs {
                    prop_assert_eq!(nodes.pick(e), scan(&nodes, e), "expression `{}`", e);
                }
            }
        }
    }

    #[test]
    fn expressions_name_the_labels_a_match_needs() {
        let req = |e: &str| labels::parse(e).unwrap().required_labels().map(|v| v.join(" "));
        assert_eq!(req(""), None);
        assert_eq!(req("a"), Some("a".into()));
        assert_eq!(req("a && b && c"), Some("a".into()));
        assert_eq!(req("!a && b"), Some("b".into()));
        assert_eq!(req("(a || b) && c"), Some("c".into()));
        assert_eq!(req("a || (b && c)"), Some("a b".into()));
        assert_eq!(req("a || !b"), None);
        assert_eq!(req("!a"), None);
    }
}
