//! The controller's listeners: the HTTP(S) port (API, `/wsagents/`, descriptors) and the TCP
//! inbound agent port. Each port has its own budget of connections in the TLS handshake, so a
//! flood of silent connections on one (a slowloris on the HTTP port) never keeps agents off the
//! other; refusals are logged at most once per interval with a count.

use super::identity::ServerTls;
use super::noisy::Noisy;
use super::Controller;
use crate::link::{self, BoxIo};
use smol::net::{TcpListener, TcpStream};
use smol_hyper::rt::FuturesIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a client may take to finish the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections per port that may be in the TLS handshake at once by default (`--handshake-budget`);
/// more are closed as soon as they are accepted. Each port has its own budget.
pub const MAX_HANDSHAKING: usize = 4096;
/// How long an HTTP client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (out of descriptors): the listener is tried again after it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections of one port in the TLS handshake, and the port's throttled warnings.
pub struct Budget {
    port: &'static str,
    used: AtomicUsize,
    max: usize,
    noisy: Noisy,
}

impl Budget {
    /// A budget of `max` connections for the port called `port` in logs.
    pub fn new(port: &'static str, max: usize) -> Arc<Self> {
        Arc::new(Self { port, used: AtomicUsize::new(0), max, noisy: Noisy::default() })
    }

    fn enter(self: &Arc<Self>) -> Option<Slot> {
        if self.used.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.used.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot(self.clone()))
    }
}

/// A connection counted against its port's budget while it lives.
struct Slot(Arc<Budget>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wrap an accepted connection in TLS if the controller speaks TLS; None if the handshake fails,
/// takes longer than `TLS_HANDSHAKE_TIMEOUT` or the port's budget is spent (logged, throttled).
async fn accept_tls(
    stream: TcpStream,
    tls: Option<&ServerTls>,
    peer: SocketAddr,
    budget: &Arc<Budget>,
) -> Option<BoxIo> {
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else { return Some(Box::pin(stream)) };
    let port = budget.port;
    let Some(_counted) = budget.enter() else {
        budget.noisy.warn(
            "budget",
            &format!(
                "{port} {peer}: {} connections already in the TLS handshake on this port, closing (overloaded, or a slowloris)",
                budget.max
            ),
        );
        return None;
    };
    let handshake = async { Some(tls.acceptor.accept(stream).await) };
    let timeout = async {
        smol::Timer::after(TLS_HANDSHAKE_TIMEOUT).await;
        None
    };
    match smol::future::or(handshake, timeout).await {
        Some(Ok(s)) => Some(Box::pin(s)),
        Some(Err(e)) => {
            budget.noisy.warn("tls-failed", &format!("{port} {peer}: TLS handshake failed: {e}"));
            None
        }
        None => {
            budget.noisy.warn(
                "tls-timeout",
                &format!(
                    "{port} {peer}: no TLS handshake within {}s, closing",
                    TLS_HANDSHAKE_TIMEOUT.as_secs()
                ),
            );
            None
        }
    }
}

/// The next connection, or None once the controller is told to stop.
async fn accept(
    ctl: &Controller,
    listener: &TcpListener,
    budget: &Budget,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let stop = ctl.stop.listen();
        if ctl.stopping.load(Ordering::SeqCst) {
            return None;
        }
        let next = smol::future::or(async { Some(listener.accept().await) }, async {
            stop.await;
            None
        })
        .await?;
        match next {
            Ok(x) => return Some(x),
            Err(e) => {
                budget.noisy.warn("accept", &format!("{} accept: {e}", budget.port));
                smol::Timer::after(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Accept HTTP(S) connections until the controller stops.
pub async fn http_loop(
    ctl: Arc<Controller>,
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    budget: usize,
) {
    let budget = Budget::new("http", budget);
    while let Some((stream, peer)) = accept(&ctl, &listener, &budget).await {
        let ctl2 = ctl.clone();
        let tls = tls.clone();
        let budget = budget.clone();
        ctl.ex
            .spawn(async move {
                let Some(io) = accept_tls(stream, tls.as_deref(), peer, &budget).await else { return };
                let fingerprint: Option<Arc<str>> = tls.map(|t| t.fingerprint.as_str().into());
                let timer = super::deadlines::HyperTimer(ctl2.deadlines.clone());
                let service = hyper::service::service_fn(move |req| {
                    let ctl = ctl2.clone();
                    let fp = fingerprint.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            super::http::route(ctl, req, peer, fp.as_deref()).await,
                        )
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(timer)
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(FuturesIo::new(io), service)
                    .with_upgrades();
                if let Err(e) = conn.await {
                    log::debug!("http connection from {peer}: {e}");
                }
            })
            .detach();
    }
}

/// Accept TCP (or TLS) agent links until the controller stops.
pub async fn agent_loop(
    ctl: Arc<Controller>,
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    budget: usize,
) {
    let budget = Budget::new("agent port", budget);
    while let Some((stream, peer)) = accept(&ctl, &listener, &budget).await {
        let ctl2 = ctl.clone();
        let tls = tls.clone();
        let budget = budget.clone();
        ctl.ex
            .spawn(async move {
                let Some(io) = accept_tls(stream, tls.as_deref(), peer, &budget).await else { return };
                let (r, w) = link::tcp(io);
                super::session::serve(ctl2, r, w, peer.to_string()).await;
            })
            .detach();
    }
}
