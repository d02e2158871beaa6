//! Starting the controller: its configuration, its listening sockets and the executor threads.

use super::core::{self, Controller};
use super::{archives, cloud, identity, runner, server, session};
use smol::Executor;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How `wisp serve` runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Data directory (store, logs, key, token).
    pub data: PathBuf,
    /// Address to listen on.
    pub bind: IpAddr,
    /// HTTP port (0 for any free port).
    pub http_port: u16,
    /// TCP inbound agent port (0 for any free port).
    pub agent_port: u16,
    /// How often each side of an agent link pings the other.
    pub ping_interval: Duration,
    /// How long an agent link may take to finish its handshake before it is closed.
    pub handshake_timeout: Duration,
    /// How long a running build waits for its disconnected agent before failing.
    pub agent_grace: Duration,
    /// Executor threads. One by default: every hand-off of a task between executor threads is a
    /// context switch, and on a small machine one thread served streaming and dispatch with a
    /// quarter less CPU (more threads pay off only with many TLS links busy at once).
    pub threads: usize,
    /// PEM certificate (chain) for TLS; with `tls_key`. None: a self-signed identity in the data dir.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Connections per port that may be in the TLS handshake at once; more are closed on accept.
    pub handshake_budget: usize,
    /// `/metrics` answers without the API token.
    pub metrics_public: bool,
    /// How long a build's artifacts are kept after they were archived; `None` for ever.
    pub keep_artifacts: Option<Duration>,
    /// Path prefix every HTTP path is under (`/ci`; "" for the root), as behind a shared host.
    pub prefix: String,
    /// Plain HTTP and TCP, no TLS on either port (`--no-tls`: tests, or a proxy in front that
    /// terminates TLS).
    pub no_tls: bool,
    /// Also serve agents through this Kafka cluster (`--kafka`).
    #[cfg(feature = "kafka")]
    pub kafka: Option<crate::kafka::Config>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::from("wisp-data"),
            bind: IpAddr::from([0, 0, 0, 0]),
            http_port: 8080,
            agent_port: 50000,
            ping_interval: Duration::from_secs(15),
            handshake_timeout: session::HANDSHAKE_TIMEOUT,
            agent_grace: runner::AGENT_GRACE,
            threads: 1,
            tls_cert: None,
            tls_key: None,
            no_tls: false,
            #[cfg(feature = "kafka")]
            kafka: None,
            prefix: String::new(),
            metrics_public: false,
            keep_artifacts: Some(Duration::from_secs(30 * 86_400)),
            handshake_budget: server::MAX_HANDSHAKING,
        }
    }
}

/// A controller serving in the background, stopped by [`Server::stop`].
pub struct Server {
    /// The controller.
    pub ctl: Arc<Controller>,
    loops: Vec<smol::Task<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Closed to end the executor threads.
    run: smol::channel::Sender<()>,
}

impl Server {
    /// Stop: both ports stop listening, every agent link is closed, the executor threads end and
    /// the store is closed (its lock on the data dir released) before this returns.
    pub fn stop(self) {
        self.ctl.shutdown();
        smol::block_on(async {
            for t in self.loops {
                t.await;
            }
        });
        self.run.close();
        for t in self.threads {
            let _ = t.join();
        }
        self.ctl.store.close_and_wait();
        log::info!("wisp controller: stopped");
    }

    /// Keep serving for the life of the process.
    pub fn detach(self) -> Arc<Controller> {
        for t in self.loops {
            t.detach();
        }
        std::mem::forget(self.run);
        self.ctl
    }
}

/// Serve until `shutdown` completes, then stop cleanly (see [`Server::stop`]).
pub fn serve(cfg: ServeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), String> {
    let server = launch(cfg)?;
    smol::block_on(shutdown);
    server.stop();
    Ok(())
}

/// Start a controller in the background for the life of the process (see [`launch`]).
pub fn start(cfg: ServeConfig) -> Result<Arc<Controller>, String> {
    launch(cfg).map(Server::detach)
}

/// Start a controller in the background: open its data dir, bind both ports, write
/// `DATA/listening` (`http ADDR` and `agent ADDR` lines), and serve on executor threads.
pub fn launch(cfg: ServeConfig) -> Result<Server, String> {
    raise_fd_limit();
    let ex = Arc::new(Executor::new());
    let (run, until) = smol::channel::bounded::<()>(1);
    let mut threads = Vec::new();
    for i in 0..cfg.threads.max(1) {
        let ex = ex.clone();
        let until = until.clone();
        let t = std::thread::Builder::new()
            .name(format!("wisp-{i}"))
            .spawn(move || {
                smol::block_on(ex.run(async {
                    let _ = until.recv().await;
                }))
            })
            .map_err(|e| format!("cannot start threads: {e}"))?;
        threads.push(t);
    }
    let timing = core::Timing {
        ping_interval: cfg.ping_interval,
        handshake_timeout: cfg.handshake_timeout,
        agent_grace: cfg.agent_grace,
    };
    let ctl = Controller::open(cfg.data.clone(), ex.clone(), timing)?;
    if !cfg.prefix.is_empty() && !valid_prefix(&cfg.prefix) {
        return Err(format!(
            "--prefix {:?} is not a path: give one like /ci (letters, digits, '-', '_', '.', '/')",
            cfg.prefix
        ));
    }
    ctl.web.set_prefix(&cfg.prefix);
    ctl.metrics_public.store(cfg.metrics_public, std::sync::atomic::Ordering::Relaxed);
    let tls = if cfg.no_tls {
        if cfg.tls_cert.is_some() || cfg.tls_key.is_some() {
            return Err("--no-tls contradicts --tls-cert/--tls-key: choose one".into());
        }
        let _ = std::fs::remove_file(cfg.data.join("fingerprint"));
        None
    } else {
        Some(Arc::new(identity::load(&cfg.data, cfg.tls_cert.as_deref(), cfg.tls_key.as_deref())?))
    };
    let http = listen(SocketAddr::new(cfg.bind, cfg.http_port)).map_err(|e| {
        format!("cannot listen for HTTP on {}:{}: {e} (choose another --http-port)", cfg.bind, cfg.http_port)
    })?;
    let agent = listen(SocketAddr::new(cfg.bind, cfg.agent_port)).map_err(|e| {
        format!(
            "cannot listen for agents on {}:{}: {e} (choose another --agent-port)",
            cfg.bind, cfg.agent_port
        )
    })?;
    let (ha, aa) =
        (http.local_addr().map_err(|e| e.to_string())?, agent.local_addr().map_err(|e| e.to_string())?);
    let _ = ctl.addrs.set((ha, aa));
    {
        let local = |a: SocketAddr| {
            if a.ip().is_unspecified() {
                SocketAddr::new([127, 0, 0, 1].into(), a.port())
            } else {
                a
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let _ = ctl.dial.set(cloud::Dial {
            url: format!("{scheme}://{}/", local(ha)),
            agent: local(aa).to_string(),
            fingerprint: tls.as_ref().map(|t| t.fingerprint.clone()),
        });
    }
    let show = |a: SocketAddr| {
        if a.ip().is_unspecified() {
            SocketAddr::new([127, 0, 0, 1].into(), a.port())
        } else {
            a
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listening =
        format!("http {}\nagent {}\nurl {scheme}://{}{}/\n", show(ha), show(aa), show(ha), ctl.web.prefix());
    let tmp = cfg.data.join("listening.tmp");
    std::fs::write(&tmp, listening)
        .and_then(|_| std::fs::rename(&tmp, cfg.data.join("listening")))
        .map_err(|e| format!("cannot write {}: {e}", cfg.data.join("listening").display()))?;
    log::info!(
        "wisp controller: {} on {ha} (agents over WebSocket at /wsagents/), {} agents on {aa}, data in {}",
        if tls.is_some() { "HTTPS" } else { "HTTP" },
        if tls.is_some() { "TLS" } else { "plain TCP" },
        cfg.data.display()
    );
    match &tls {
        Some(t) if t.self_signed => log::info!(
            "TLS: self-signed identity {} (kept in {}); agents pin it with --instance-identity {}",
            t.fingerprint,
            cfg.data.join("tls").display(),
            t.fingerprint
        ),
        Some(t) => log::info!("TLS: identity {} from --tls-cert", t.fingerprint),
        None => log::warn!(
            "TLS is off (--no-tls): secrets stay unsent but builds, logs and the API token travel in clear; \
             use this only behind a proxy that terminates TLS"
        ),
    }
    {
        let c = ctl.clone();
        ex.spawn(async move { c.load_clouds().await }).detach();
    }
    let loops = vec![
        ex.spawn(server::http_loop(ctl.clone(), http, tls.clone(), cfg.handshake_budget)),
        ex.spawn(server::agent_loop(ctl.clone(), agent, tls, cfg.handshake_budget)),
    ];
    if let Some(keep) = cfg.keep_artifacts {
        ex.spawn(archives::expire_loop(ctl.clone(), keep)).detach();
    }
    #[cfg(feature = "kafka")]
    if let Some(k) = cfg.kafka.clone() {
        ex.spawn(super::kafka::hub(ctl.clone(), k)).detach();
    }
    Ok(Server { ctl, loops, threads, run })
}

/// Raise the soft limit on open files to the hard limit: every agent link and every client is a
/// descriptor, and the usual soft limit of 1024 is too few to ride out a slowloris.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            log::warn!("cannot raise the open-file limit from {soft} to {hard}");
        }
    }
}

/// Connections a listening socket holds before they are accepted. std's 128 overflows when
/// thousands of agents dial at once (after a controller restart): the kernel drops the SYNs
/// beyond it, and each dropped one costs its agent a second or more before it tries again, then
/// a doubled backoff. The kernel caps it at `net.core.somaxconn` (4096 by default).
const BACKLOG: i32 = 4096;

/// Listen on `addr` (address reuse on, as std does) with a backlog of [`BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<smol::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    smol::net::TcpListener::try_from(std::net::TcpListener::from(socket))
}

/// Whether `p` may be a path prefix: `/`-separated segments of URL-safe characters.
fn valid_prefix(p: &str) -> bool {
    p.len() <= 200
        && p.split('/').all(|seg| seg != "." && seg != "..")
        && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1,000 agents dialling at once all get through the handshake while the controller has
    /// not yet accepted one (with std's backlog of 128, the rest would wait a second or more).
    #[test]
    fn a_burst_of_connects_beyond_stds_backlog_is_queued_not_dropped() {
        let l = listen(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = l.local_addr().unwrap();
        let connected = smol::block_on(async {
            let dials: Vec<_> = (0..1000)
                .map(|_| {
                    smol::spawn(async move {
                        let dial = async { smol::net::TcpStream::connect(addr).await.ok() };
                        let late = async {
                            smol::Timer::after(std::time::Duration::from_millis(500)).await;
                            None
                        };
                        smol::future::or(dial, late).await
                    })
                })
                .collect();
            let mut streams = Vec::new();
            for d in dials {
                streams.extend(d.await);
            }
            streams.len()
        });
        // The kernel caps the backlog at net.core.somaxconn (4096 unless someone lowered it).
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        assert_eq!(connected, 1000.min(somaxconn.min(BACKLOG as usize) + 1));
        drop(l);
    }
}
