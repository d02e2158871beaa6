//! `/metrics`: the controller's figures in Prometheus' text format, through `prometheus-client`.
//!
//! Counters and histograms are updated where things happen (a dispatch pass, a build's end, a
//! stored output write, a handshake refused, a link back, a pod made); the gauges (agents
//! online, executors, queue length) are read from the controller's state when scraped. A scrape
//! takes the state lock once, for as long as counting the nodes takes, and encodes outside it.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Label pairs of one series.
type Labels = Vec<(&'static str, String)>;

/// Every series the controller keeps.
pub struct Metrics {
    registry: Registry,
    agents_online: Family<Labels, Gauge>,
    executors_busy: Gauge,
    executors_total: Gauge,
    nodes: Family<Labels, Gauge>,
    queue_length: Gauge,
    queue_wait: Histogram,
    builds: Family<Labels, Counter>,
    build_duration: Histogram,
    step_output_bytes: Counter,
    dispatch_latency: Histogram,
    handshake_failures: Family<Labels, Counter>,
    reconnects: Counter,
    replayed_bytes: Counter,
    pods_started: Family<Labels, Counter>,
    pod_failures: Family<Labels, Counter>,
    pod_start: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wisp");
        let m = Self {
            agents_online: Family::default(),
            executors_busy: Gauge::default(),
            executors_total: Gauge::default(),
            nodes: Family::default(),
            queue_length: Gauge::default(),
            // 1 ms to about 9 h.
            queue_wait: Histogram::new(exponential_buckets(0.001, 4.0, 13)),
            builds: Family::default(),
            // 100 ms to about 30 h.
            build_duration: Histogram::new(exponential_buckets(0.1, 4.0, 10)),
            step_output_bytes: Counter::default(),
            // 10 µs to about 2.6 s.
            dispatch_latency: Histogram::new(exponential_buckets(0.00001, 4.0, 10)),
            handshake_failures: Family::default(),
            reconnects: Counter::default(),
            replayed_bytes: Counter::default(),
            pods_started: Family::default(),
            pod_failures: Family::default(),
            // 10 ms to about 11 min.
            pod_start: Histogram::new(exponential_buckets(0.01, 4.0, 9)),
            registry: Registry::default(),
        };
        registry.register("agents_online", "Agents connected, by transport", m.agents_online.clone());
        registry.register("executors_busy", "Executors running a build", m.executors_busy.clone());
        registry.register("executors", "Executors of the nodes online", m.executors_total.clone());
        registry.register("nodes", "Nodes, by state (online, offline)", m.nodes.clone());
        registry.register("queue_length", "Builds waiting for a node", m.queue_length.clone());
        registry.register(
            "queue_wait_seconds",
            "Time from a build's submit (or its recovery after a restart) to its dispatch",
            m.queue_wait.clone(),
        );
        registry.register("builds", "Builds finished, by result", m.builds.clone());
        registry.register(
            "build_duration_seconds",
            "Time from a build's dispatch to its end",
            m.build_duration.clone(),
        );
        registry.register("step_output_bytes", "Step output stored", m.step_output_bytes.clone());
        registry.register(
            "dispatch_latency_seconds",
            "Time a dispatch pass (matching queued builds to free executors) holds the controller",
            m.dispatch_latency.clone(),
        );
        registry.register(
            "handshake_failures",
            "Agent handshakes refused, by reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "reconnects",
            "Agents that came back after their link was lost",
            m.reconnects.clone(),
        );
        registry.register(
            "replayed_bytes",
            "Output bytes agents sent again after a reconnect",
            m.replayed_bytes.clone(),
        );
        registry.register(
            "pods_started",
            "Pods a cloud started whose agent came online, by cloud",
            m.pods_started.clone(),
        );
        registry.register(
            "pod_failures",
            "Pods that failed to start or connect, by cloud",
            m.pod_failures.clone(),
        );
        registry.register(
            "pod_start_seconds",
            "Time from a pod's reservation to its agent online",
            m.pod_start.clone(),
        );
        Self { registry, ..m }
    }
}

/// The gauges' values at a scrape.
pub struct Snapshot {
    /// Agents online over WebSocket.
    pub online_ws: i64,
    /// Agents online over TCP.
    pub online_tcp: i64,
    /// Nodes offline.
    pub offline: i64,
    /// Executors busy.
    pub busy: i64,
    /// Executors of the nodes online.
    pub executors: i64,
    /// Builds queued.
    pub queued: i64,
}

impl Metrics {
    /// The text a scrape gets, with the gauges set from `now`.
    pub fn render(&self, now: Snapshot) -> String {
        self.agents_online.get_or_create(&vec![("transport", "websocket".into())]).set(now.online_ws);
        self.agents_online.get_or_create(&vec![("transport", "tcp".into())]).set(now.online_tcp);
        self.nodes.get_or_create(&vec![("state", "online".into())]).set(now.online_ws + now.online_tcp);
        self.nodes.get_or_create(&vec![("state", "offline".into())]).set(now.offline);
        self.executors_busy.set(now.busy);
        self.executors_total.set(now.executors);
        self.queue_length.set(now.queued);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// A build left the queue for a node after `waited`.
    pub fn dispatched(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// A dispatch pass took `took`.
    pub fn dispatch_pass(&self, took: Duration) {
        self.dispatch_latency.observe(took.as_secs_f64());
    }

    /// A build ended with `result` after running `ran` (None: it never ran).
    pub fn build_ended(&self, result: &str, ran: Option<Duration>) {
        self.builds.get_or_create(&vec![("result", result.to_string())]).inc();
        if let Some(d) = ran {
            self.build_duration.observe(d.as_secs_f64());
        }
    }

    /// `n` bytes of step output were stored.
    pub fn output(&self, n: u64) {
        self.step_output_bytes.inc_by(n);
    }

    /// An agent handshake was refused for `reason` (`bad_secret`, `timeout`, ...).
    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures.get_or_create(&vec![("reason", reason.to_string())]).inc();
    }

    /// An agent came back after its link was lost.
    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// A reconnected agent sends `bytes` of output again.
    pub fn replayed(&self, bytes: u64) {
        self.replayed_bytes.inc_by(bytes);
    }

    /// Cloud `cloud`'s pod came online `took` after its reservation.
    pub fn pod_online(&self, cloud: &str, took: Duration) {
        self.pods_started.get_or_create(&vec![("cloud", cloud.to_string())]).inc();
        self.pod_start.observe(took.as_secs_f64());
    }

    /// Cloud `cloud`'s pod failed to start or connect.
    pub fn pod_failed(&self, cloud: &str) {
        self.pod_failures.get_or_create(&vec![("cloud", cloud.to_string())]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_is_prometheus_text_with_every_series() {
        let m = Metrics::default();
        m.build_ended("success", Some(Duration::from_secs(3)));
        m.output(1234);
        m.handshake_failed("bad_secret");
        m.reconnected();
        m.replayed(10);
        m.pod_online("local", Duration::from_millis(700));
        let text =
            m.render(Snapshot { online_ws: 2, online_tcp: 1, offline: 4, busy: 1, executors: 3, queued: 5 });
        for line in [
            "wisp_agents_online{transport=\"websocket\"} 2",
            "wisp_agents_online{transport=\"tcp\"} 1",
            "wisp_nodes{state=\"offline\"} 4",
            "wisp_queue_length 5",
            "wisp_builds_total{result=\"success\"} 1",
            "wisp_step_output_bytes_total 1234",
            "wisp_handshake_failures_total{reason=\"bad_secret\"} 1",
            "wisp_replayed_bytes_total 10",
            "wisp_pods_started_total{cloud=\"local\"} 1",
            "# TYPE wisp_build_duration_seconds histogram",
            "wisp_build_duration_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
