//! Load generator for `scripts/bench.sh` (issue 6). Not part of the agent binary.
//!
//!   loadgen idle --url URL --data DIR --addr HOST:PORT --n N --prefix P
//!       adds N nodes (label `idle`) through the API, connects each over TCP from this one process,
//!       runs the real handshake and answers the controller's pings; prints `connected N` once all
//!       are online, then serves until killed.
//!   loadgen dispatch --url URL --data DIR --label L --builds K --concurrency C
//!       submits K one-step `true` builds for label L (C at a time), waits for each result (one
//!       `POST /api/builds?wait=60` per build, on kept-alive connections) and
//!       prints `latency_ms p50 p99 min max`, `builds_per_s X` and `failures F`.
use std::time::{Duration, Instant};

use smol::net::TcpStream;
use smol::Timer;
use wisp::auth::{self, ClientHandshake, ClientStep};
use wisp::cli::client::{Client, Remote};
use wisp::controller::api::{BuildInfo, NewNode, NodeCreated};
use wisp::link::{self, BoxIo};
use wisp::proto::Frame;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
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

async fn idle_agent(addr: String, name: String, secret: String) -> Result<(), String> {
    let stream = TcpStream::connect(addr.as_str()).await.map_err(|e| format!("{name}: connect: {e}"))?;
    let (mut reader, mut writer) = link::tcp(Box::pin(stream) as BoxIo);
    let (mut hs, hello) = ClientHandshake::new(&name, &secret, auth::random_nonce(), 0);
    writer.send(&hello).await.map_err(|e| format!("{name}: {e}"))?;
    let interval_ms = loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return Err(format!("{name}: closed during the handshake")),
            Err(e) => return Err(format!("{name}: {e}")),
        };
        match hs.on_frame(&frame) {
            ClientStep::Send(f) => writer.send(&f).await.map_err(|e| format!("{name}: {e}"))?,
            ClientStep::Done { ping_interval_ms, .. } => {
                let keys = hs.session_keys().expect("keys");
                reader.authenticate(&keys.to_agent, keys.version);
                writer.authenticate(&keys.to_controller, keys.version);
                break ping_interval_ms;
            }
            other => return Err(format!("{name}: handshake: {other:?}")),
        }
    };
    // Like the agent: list the steps this agent holds (none) right after the handshake.
    let mut buf = [0u8; 0];
    let steps =
        wisp::proto::encode_steps(std::iter::empty(), &mut buf).map_err(|e| format!("{name}: {e}"))?;
    writer.send(&Frame::Running { steps }).await.map_err(|e| format!("{name}: {e}"))?;
    CONNECTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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
            Ok(None) => break Err(format!("{name}: closed")),
            Err(e) => break Err(format!("{name}: {e}")),
        }
    };
    drop(tx);
    writer_task.cancel().await;
    result
}

static CONNECTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

async fn idle(args: Vec<String>) -> i32 {
    let c = client(&args);
    let addr = need(&args, "--addr");
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
                websocket: false,
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
            let secret = v.secret;
            let failed = failed.clone();
            ex.spawn({
                let addr = addr.clone();
                async move {
                    if let Err(e) = idle_agent(addr, name, secret).await {
                        eprintln!("loadgen: {e}");
                        failed.set(failed.get() + 1);
                    }
                }
            })
            .detach();
            if i % 64 == 63 {
                Timer::after(Duration::from_millis(1)).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while CONNECTED.load(std::sync::atomic::Ordering::SeqCst) < n {
            if Instant::now() > deadline || failed.get() > 0 {
                eprintln!(
                    "loadgen: only {} of {n} connected ({} failed)",
                    CONNECTED.load(std::sync::atomic::Ordering::SeqCst),
                    failed.get()
                );
                return 1;
            }
            Timer::after(Duration::from_millis(20)).await;
        }
        println!("connected {n}");
        loop {
            Timer::after(Duration::from_secs(1)).await;
            if failed.get() > 0 {
                eprintln!("loadgen: {} idle agents lost their link", failed.get());
                return 1;
            }
        }
    })
    .await
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
    let q = |p: f64| v[(((v.len() as f64) * p).ceil() as usize).saturating_sub(1).min(v.len() - 1)];
    println!("latency_ms {:.3} {:.3} {:.3} {:.3}", q(0.5), q(0.99), v[0], v[v.len() - 1]);
    println!("builds_per_s {:.1}", v.len() as f64 / secs);
    println!("failures {}", errs.len());
    i32::from(!errs.is_empty())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("idle") => smol::block_on(idle(args)),
        Some("dispatch") => smol::block_on(dispatch(args)),
        _ => {
            eprintln!("usage: loadgen idle|dispatch ... (see the source)");
            2
        }
    };
    std::process::exit(code);
}
