//! Load generator for `scripts/bench.sh` (issue 6). Not part of the agent binary.
//!
//!   loadgen idle --url URL --data DIR (--addr HOST:PORT | --ws) --n N --prefix P [--reconnect]
//!       adds N nodes (label `idle`) through the API, connects each from this one process (TCP to
//!       HOST:PORT, or WebSocket at URL/wsagents/; TLS with the identity in DIR/fingerprint pinned
//!       when URL is https), runs the real handshake and answers the controller's pings; prints
//!       `connected N` once all are online, then serves until killed. A lost link ends the run,
//!       unless `--reconnect`: then each agent dials again with the agent's own backoff (1 s,
//!       doubling to 10 s, plus up to half again of jitter), and once all N are back after a loss
//!       it prints `reconnected N at NS` (the wall clock in ns since the epoch).
//!   loadgen dispatch --url URL --data DIR --label L --builds K --concurrency C
//!       submits K one-step `true` builds for label L (C at a time), waits for each result (one
//!       `POST /api/builds?wait=60` per build, on kept-alive connections) and
//!       prints `latency_ms p50 p99 min max`, `builds_per_s X` and `failures F`.
//!   loadgen probe --url URL --data DIR --path P --seconds S [--every-ms M]
//!       GETs P one call after another (M ms apart, default 100) for S seconds and prints
//!       `latency_ms p50 p99 min max` of the calls answered, `answered N` and `errors E`.
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use smol::Timer;
use wisp::auth::{self, ClientHandshake, ClientStep};
use wisp::cli::client::{Client, Remote};
use wisp::controller::api::{BuildInfo, NewNode, NodeCreated};
use wisp::dial::{self, Mode, Target, Tls};
use wisp::proto::Frame;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn flag(args: &[String], name: &str) -> bool {
    args.iter().any(|a| a == name)
}

fn need(args: &[String], name: &str) -> String {
    arg(args, name).unwrap_or_else(|| {
        eprintln!("loadgen: missing {name}");
        std::process::exit(2)
    })
}

fn client(args: &[String]) -> Client {
    let remote = Remote {
        url: Some(need(args, "--url")),
        data: Some(need(args, "--data").into()),
        ..Remote::default()
    };
    Client::new(&remote).unwrap_or_else(|e| {
        eprintln!("loadgen: {e}");
        std::process::exit(2)
    })
}

/// How the idle agents reach the controller: as `wisp-agent` does, through `wisp::dial`.
struct Dialer {
    target: Target,
    mode: Mode,
    tls: Option<Tls>,
}

impl Dialer {
    fn from_args(args: &[String]) -> Result<Dialer, String> {
        let url = need(args, "--url");
        let target = dial::parse_url(&url).map_err(|e| e.to_string())?;
        let mode = match (arg(args, "--addr"), flag(args, "--ws")) {
            (Some(addr), false) => Mode::Direct(addr),
            (None, true) => Mode::WebSocket,
            _ => return Err("give one of --addr HOST:PORT and --ws".into()),
        };
        let tls = if target.tls {
            let path = std::path::Path::new(&need(args, "--data")).join("fingerprint");
            let fp = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let trust = wisp::tls::Trust {
                pin: Some(wisp::tls::parse_fingerprint(fp.trim())?),
                ..Default::default()
            };
            Some(Tls::new(&trust)?)
        } else {
            None
        };
        Ok(Dialer { target, mode, tls })
    }
}

/// Agents through the handshake now.
static CONNECTED: AtomicUsize = AtomicUsize::new(0);

/// Counts an agent in [`CONNECTED`] while it lives.
struct Online;

impl Online {
    fn new() -> Online {
        CONNECTED.fetch_add(1, Ordering::SeqCst);
        Online
    }
}

impl Drop for Online {
    fn drop(&mut self) {
        CONNECTED.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The agent's reconnect delay after `failures` failed dials in a row.
fn backoff(failures: u32) -> Duration {
    let base = wisp::agent::BACKOFF_MIN.saturating_mul(1 << failures.min(8)).min(wisp::agent::BACKOFF_MAX);
    let r = auth::random_nonce();
    base.mul_f64(1.0 + f64::from(u16::from_be_bytes([r[0], r[1]])) / f64::from(u16::MAX) * 0.5)
}

/// One idle agent: dial, handshake, then ping and answer pings until the link ends. It ends
/// only with an error: whether it got through the handshake, and why it ended.
async fn idle_agent(d: &Dialer, name: &str, secret: &str) -> Result<Infallible, (bool, String)> {
    let (mut reader, mut writer) = dial::open(&d.target, &d.mode, name, d.tls.as_ref())
        .await
        .map_err(|e| (false, format!("{name}: {e}")))?;
    let fail = |e: String| (false, format!("{name}: {e}"));
    let (mut hs, hello) = ClientHandshake::new(name, secret, auth::random_nonce(), 0);
    writer.send(&hello).await.map_err(|e| fail(e.to_string()))?;
    let interval_ms = loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return Err(fail("closed during the handshake".into())),
            Err(e) => return Err(fail(e.to_string())),
        };
        match hs.on_frame(&frame) {
            ClientStep::Send(f) => writer.send(&f).await.map_err(|e| fail(e.to_string()))?,
            ClientStep::Done { ping_interval_ms, .. } => {
                let keys = hs.session_keys().expect("keys");
                reader.authenticate(&keys.to_agent, keys.version);
                writer.authenticate(&keys.to_controller, keys.version);
                break ping_interval_ms;
            }
            other => return Err(fail(format!("handshake: {other:?}"))),
        }
    };
    // Like the agent: list the steps this agent holds (none) right after the handshake.
    let mut buf = [0u8; 0];
    let steps = wisp::proto::encode_steps(std::iter::empty(), &mut buf).map_err(|e| fail(e.to_string()))?;
    writer.send(&Frame::Running { steps }).await.map_err(|e| fail(e.to_string()))?;
    let _online = Online::new();
    // The controller drops a link that sends nothing for a few ping intervals: ping as the agent
    // does, and answer its pings. One writer task; the reader hands it the ids to answer.
    let (tx, rx) = smol::channel::bounded::<u64>(8);
    let every = Duration::from_millis(u64::from(interval_ms.max(100)));
    let writer_task = smol::spawn(async move {
        let mut id = 0u64;
        loop {
            let next = smol::future::or(async { rx.recv().await.ok().map(Some) }, async {
                Timer::after(every).await;
                Some(None)
            })
            .await;
            let frame = match next {
                None => return,
                Some(Some(pong)) => Frame::Pong { id: pong },
                Some(None) => {
                    id += 1;
                    Frame::Ping { id }
                }
            };
            if writer.send(&frame).await.is_err() {
                return;
            }
        }
    });
    let result = loop {
        match reader.next().await {
            Ok(Some(Frame::Ping { id })) => {
                let _ = tx.send(id).await;
            }
            Ok(Some(_)) => {}
            Ok(None) => break Err((true, format!("{name}: closed"))),
            Err(e) => break Err((true, format!("{name}: {e}"))),
        }
    };
    drop(tx);
    writer_task.cancel().await;
    result
}

/// An idle agent for the whole run: with `reconnect`, it dials again after each loss.
async fn idle_forever(d: std::rc::Rc<Dialer>, name: String, secret: String, reconnect: bool) -> String {
    let mut failures = 0;
    loop {
        let Err((was_online, e)) = idle_agent(&d, &name, &secret).await;
        if !reconnect {
            return e;
        }
        failures = if was_online { 0 } else { failures + 1 };
        Timer::after(backoff(failures)).await;
    }
}

async fn idle(args: Vec<String>) -> i32 {
    let c = client(&args);
    let dialer = match Dialer::from_args(&args) {
        Ok(d) => std::rc::Rc::new(d),
        Err(e) => {
            eprintln!("loadgen: {e}");
            return 2;
        }
    };
    let websocket = dialer.mode == Mode::WebSocket;
    let reconnect = flag(&args, "--reconnect");
    let n: usize = need(&args, "--n").parse().expect("--n");
    let prefix = arg(&args, "--prefix").unwrap_or_else(|| "idle".into());
    let ex = smol::LocalExecutor::new();
    let failed = std::rc::Rc::new(std::cell::Cell::new(0usize));
    ex.run(async {
        for i in 0..n {
            let name = format!("{prefix}{i}");
            let node = NewNode {
                name: name.clone(),
                labels: "idle".into(),
                executors: 1,
                websocket,
                work_dir: String::new(),
            };
            let body = serde_json::to_string(&node).expect("a node serialises");
            let v: NodeCreated = match c.call(hyper::Method::POST, "/api/nodes", body).await {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("loadgen: adding {name}: {e}");
                    return 1;
                }
            };
            let failed = failed.clone();
            let agent = idle_forever(dialer.clone(), name, v.secret, reconnect);
            ex.spawn(async move {
                eprintln!("loadgen: {}", agent.await);
                failed.set(failed.get() + 1);
            })
            .detach();
            if i % 64 == 63 {
                Timer::after(Duration::from_millis(1)).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while CONNECTED.load(Ordering::SeqCst) < n {
            if Instant::now() > deadline || failed.get() > 0 {
                eprintln!(
                    "loadgen: only {} of {n} connected ({} failed)",
                    CONNECTED.load(Ordering::SeqCst),
                    failed.get()
                );
                return 1;
            }
            Timer::after(Duration::from_millis(20)).await;
        }
        println!("connected {n}");
        // Whether some agents are down now, waiting to be all back.
        let mut down = false;
        loop {
            Timer::after(Duration::from_millis(20)).await;
            if failed.get() > 0 {
                eprintln!("loadgen: {} idle agents lost their link", failed.get());
                return 1;
            }
            let now = CONNECTED.load(Ordering::SeqCst);
            if now < n && !down {
                down = true;
                eprintln!("loadgen: links lost: {} of {n} down", n - now);
            } else if now == n && down {
                down = false;
                let ns = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock").as_nanos();
                println!("reconnected {n} at {ns}");
            }
        }
    })
    .await
}

/// GET one path over and over; prints the latency of the calls answered.
async fn probe(args: Vec<String>) -> i32 {
    let c = client(&args);
    let path = need(&args, "--path");
    let secs: f64 = need(&args, "--seconds").parse().expect("--seconds");
    let every = Duration::from_millis(
        arg(&args, "--every-ms").map(|s| s.parse().expect("--every-ms")).unwrap_or(100),
    );
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (mut lat, mut errors) = (Vec::new(), 0usize);
    while Instant::now() < end {
        let t0 = Instant::now();
        match c.get::<serde_json::Value>(&path).await {
            Ok(_) => lat.push(t0.elapsed().as_secs_f64() * 1000.0),
            Err(e) => {
                if errors == 0 {
                    eprintln!("loadgen: GET {path}: {e}");
                }
                errors += 1;
            }
        }
        Timer::at(t0 + every).await;
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    if lat.is_empty() {
        eprintln!("loadgen: no GET {path} was answered");
        return 1;
    }
    print_latency(&lat);
    println!("answered {}", lat.len());
    println!("errors {errors}");
    0
}

/// Prints `latency_ms p50 p99 min max` of `v` (sorted, not empty; nearest-rank quantiles).
fn print_latency(v: &[f64]) {
    let q = |p: f64| v[(((v.len() as f64) * p).ceil() as usize).saturating_sub(1).min(v.len() - 1)];
    println!("latency_ms {:.3} {:.3} {:.3} {:.3}", q(0.5), q(0.99), v[0], v[v.len() - 1]);
}

async fn one_build(c: &Client, yaml: &str) -> Result<(f64, bool), String> {
    let t0 = Instant::now();
    // Submit and wait in one call: the controller answers once the build is final (`?wait=`).
    let b: BuildInfo = c
        .call(hyper::Method::POST, "/api/builds?wait=60", yaml.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let (id, state) = (b.build.id, b.build.state);
    if !state.is_final() {
        return Err(format!("build {id} not done after 60 s"));
    }
    Ok((t0.elapsed().as_secs_f64() * 1000.0, state == wisp::controller::api::BuildState::Success))
}

async fn dispatch(args: Vec<String>) -> i32 {
    let c = std::rc::Rc::new(client(&args));
    let label = need(&args, "--label");
    let builds: usize = need(&args, "--builds").parse().expect("--builds");
    let conc: usize = arg(&args, "--concurrency").map(|s| s.parse().expect("--concurrency")).unwrap_or(1);
    let yaml =
        std::rc::Rc::new(format!("name: bench\nagent:\n  label: \"{label}\"\nsteps:\n  - sh: \"true\"\n"));
    let ex = std::rc::Rc::new(smol::LocalExecutor::new());
    let lat = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let errors = std::rc::Rc::new(std::cell::RefCell::new(Vec::<String>::new()));
    let next = std::rc::Rc::new(std::cell::Cell::new(0usize));
    let t0 = Instant::now();
    ex.run(async {
        let mut tasks = Vec::new();
        for _ in 0..conc.max(1) {
            let (c, yaml, lat, errors, next) =
                (c.clone(), yaml.clone(), lat.clone(), errors.clone(), next.clone());
            tasks.push(ex.spawn(async move {
                while next.get() < builds {
                    next.set(next.get() + 1);
                    match one_build(&c, &yaml).await {
                        Ok((ms, ok)) => {
                            if !ok {
                                errors.borrow_mut().push("a build failed".into());
                            }
                            lat.borrow_mut().push(ms)
                        }
                        Err(e) => errors.borrow_mut().push(e),
                    }
                }
            }));
        }
        for t in tasks {
            t.await;
        }
    })
    .await;
    let secs = t0.elapsed().as_secs_f64();
    let mut v = lat.borrow().clone();
    v.sort_by(|a, b| a.total_cmp(b));
    let errs = errors.borrow();
    for e in errs.iter().take(5) {
        eprintln!("loadgen: {e}");
    }
    if v.is_empty() {
        eprintln!("loadgen: no build completed");
        return 1;
    }
    print_latency(&v);
    println!("builds_per_s {:.1}", v.len() as f64 / secs);
    println!("failures {}", errs.len());
    i32::from(!errs.is_empty())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("idle") => smol::block_on(idle(args)),
        Some("dispatch") => smol::block_on(dispatch(args)),
        Some("probe") => smol::block_on(probe(args)),
        _ => {
            eprintln!("usage: loadgen idle|dispatch|probe ... (see the source)");
            2
        }
    };
    std::process::exit(code);
}
