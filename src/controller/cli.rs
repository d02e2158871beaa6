//! The `wisp` command line: `serve`, the client commands, and `demo`.

use super::client::Client;
use super::store::BuildState;
use super::{start, ServeConfig};
use argh::FromArgs;
use hyper::Method;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Exit code for a build that failed.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code for a build that was cancelled.
pub const EXIT_ABORTED: i32 = 2;
/// Exit code for errors of the CLI itself (bad input, controller unreachable).
pub const EXIT_ERROR: i32 = 3;

/// wisp: a build controller with tiny static agents.
#[derive(FromArgs)]
struct Top {
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Serve(Serve),
    Node(NodeCmd),
    Nodes(Nodes),
    Run(Run),
    Builds(Builds),
    Log(LogCmd),
    Cancel(Cancel),
    Token(TokenCmd),
    Demo(Demo),
}

/// manage the API token
#[derive(FromArgs)]
#[argh(subcommand, name = "token")]
struct TokenCmd {
    #[argh(subcommand)]
    cmd: TokenSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum TokenSub {
    Rotate(TokenRotate),
}

/// replace the API token with a new one (kept in the controller's data dir) and print it; the
/// old token stops working at once
#[derive(FromArgs)]
#[argh(subcommand, name = "rotate")]
struct TokenRotate {
    /// controller URL
    #[argh(option)]
    url: Option<String>,
    /// the current API token
    #[argh(option)]
    token: Option<String>,
    /// controller data dir
    #[argh(option)]
    data: Option<PathBuf>,
}

/// run the controller
#[derive(FromArgs)]
#[argh(subcommand, name = "serve")]
struct Serve {
    /// data directory (default ./wisp-data)
    #[argh(option, default = "PathBuf::from(\"wisp-data\")")]
    data: PathBuf,
    /// HTTP port: API, web, and agents over WebSocket (default 8080; 0 picks a free port)
    #[argh(option, default = "8080")]
    http_port: u16,
    /// TCP inbound agent port (default 50000; 0 picks a free port)
    #[argh(option, default = "50000")]
    agent_port: u16,
    /// address to listen on (default 0.0.0.0)
    #[argh(option, default = "std::net::IpAddr::from([0, 0, 0, 0])")]
    bind: std::net::IpAddr,
    /// seconds between pings on agent links (default 15; links die after 3 missed)
    #[argh(option, default = "15")]
    ping_interval: u64,
    /// seconds a new agent connection may take to authenticate before it is closed (default 10)
    #[argh(option, default = "10")]
    handshake_timeout: u64,
    /// seconds a running build waits for its disconnected agent to come back before it fails
    /// with "agent lost" (default 300)
    #[argh(option, default = "300")]
    agent_grace: u64,
    /// PEM certificate (chain) to serve HTTPS and agent TLS with; needs --tls-key (default: a
    /// self-signed identity generated and kept in the data dir)
    #[argh(option)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[argh(option)]
    tls_key: Option<PathBuf>,
    /// serve plain HTTP and TCP without TLS (for tests, or behind a proxy that terminates TLS)
    #[argh(switch)]
    no_tls: bool,
    /// executor threads (default 1; more help only with many TLS agents streaming at once)
    #[argh(option)]
    threads: Option<usize>,
}

/// Where the controller is (shared by client commands).
#[derive(FromArgs)]
#[argh(subcommand, name = "node")]
/// manage nodes
struct NodeCmd {
    #[argh(subcommand)]
    cmd: NodeSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum NodeSub {
    Add(NodeAdd),
    Secret(NodeSecret),
    Rm(NodeRm),
}

/// add a node and print the command that starts its agent
#[derive(FromArgs)]
#[argh(subcommand, name = "add")]
struct NodeAdd {
    /// node name
    #[argh(positional)]
    name: String,
    /// labels, space separated, e.g. "linux x86_64"
    #[argh(option, default = "String::new()")]
    labels: String,
    /// builds it runs at once (default 1)
    #[argh(option, default = "1")]
    executors: u32,
    /// its agent connects over the TCP agent port instead of WebSocket
    #[argh(switch)]
    tcp: bool,
    /// work dir for the agent
    #[argh(option, default = "String::new()")]
    work_dir: String,
    /// controller URL (or WISP_URL; default from --data, else http://127.0.0.1:8080)
    #[argh(option)]
    url: Option<String>,
    /// API token (or WISP_TOKEN; default read from --data)
    #[argh(option)]
    token: Option<String>,
    /// controller data dir to find the URL and token in (default ./wisp-data)
    #[argh(option)]
    data: Option<PathBuf>,
}

/// print a node's secret
#[derive(FromArgs)]
#[argh(subcommand, name = "secret")]
struct NodeSecret {
    /// node name
    #[argh(positional)]
    name: String,
    /// controller URL
    #[argh(option)]
    url: Option<String>,
    /// API token
    #[argh(option)]
    token: Option<String>,
    /// controller data dir
    #[argh(option)]
    data: Option<PathBuf>,
}

/// remove a node
#[derive(FromArgs)]
#[argh(subcommand, name = "rm")]
struct NodeRm {
    /// node name
    #[argh(positional)]
    name: String,
    /// controller URL
    #[argh(option)]
    url: Option<String>,
    /// API token
    #[argh(option)]
    token: Option<String>,
    /// controller data dir
    #[argh(option)]
    data: Option<PathBuf>,
}

/// list nodes: NAME, online/offline, executors, labels
#[derive(FromArgs)]
#[argh(subcommand, name = "nodes")]
struct Nodes {
    /// controller URL
    #[argh(option)]
    url: Option<String>,
    /// API token
    #[argh(option)]
    token: Option<String>,
    /// controller data dir
    #[argh(option)]
    data: Option<PathBuf>,
}

/// submit a pipeline (YAML); with --follow or --wait, exit with its result
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct Run {
    /// pipeline file
    #[argh(positional)]
    file: PathBuf,
    /// stream the log until the build ends; exit 0 on success, 1 on failure, 2 if aborted
    #[argh(switch, short = 'f')]
    follow: bool,
    /// wait for the result without the log (one call, no polling); same exit codes as --follow
    #[argh(switch, short = 'w')]
    wait: bool,
    /// controller URL
    #[argh(option)]
    url: Option<String>,
    /// API token
    #[argh(option)]
    token: Option<String>,
    /// controller data dir
    #[argh(option)]
    data: Option<PathBuf>,
}

/// list recent builds
#[derive(FromArgs)]
#[argh(subcommand, name = "builds")]
struct Builds {
    /// controller URL
    #[argh(option)]
    url: Option<String>,
    /// API token
    #[argh(option)]
    token: Option<String>,
    /// controller data dir
    #[argh(option)]
    data: Option<PathBuf>,
}

/// print a build's log
#[derive(FromArgs)]
#[argh(subcommand, name = "log")]
struct LogCmd {
    /// build number
    #[argh(positional)]
    id: u64,
    /// keep streaming until the build ends, then exit with its result
    #[argh(switch, short = 'f')]
    follow: bool,
    /// controller URL
    #[argh(option)]
    url: Option<String>,
    /// API token
    #[argh(option)]
    token: Option<String>,
    /// controller data dir
    #[argh(option)]
    data: Option<PathBuf>,
}

/// cancel a queued or running build
#[derive(FromArgs)]
#[argh(subcommand, name = "cancel")]
struct Cancel {
    /// build number
    #[argh(positional)]
    id: u64,
    /// controller URL
    #[argh(option)]
    url: Option<String>,
    /// API token
    #[argh(option)]
    token: Option<String>,
    /// controller data dir
    #[argh(option)]
    data: Option<PathBuf>,
}

/// start a controller, a local agent and a sample build, and print the build's log
#[derive(FromArgs)]
#[argh(subcommand, name = "demo")]
struct Demo {
    /// data directory (default ./wisp-data)
    #[argh(option, default = "PathBuf::from(\"wisp-data\")")]
    data: PathBuf,
    /// pipeline to run instead of the built-in sample
    #[argh(option)]
    pipeline: Option<PathBuf>,
}

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("wisp: {msg}");
    std::process::exit(EXIT_ERROR);
}

/// Entry point of the `wisp` binary.
pub fn main() {
    let top: Top = argh::from_env();
    crate::logger::init();
    let code = match top.cmd {
        Cmd::Serve(s) => {
            let cfg = ServeConfig {
                data: s.data,
                bind: s.bind,
                http_port: s.http_port,
                agent_port: s.agent_port,
                ping_interval: Duration::from_secs(s.ping_interval.max(1)),
                handshake_timeout: Duration::from_secs(s.handshake_timeout.max(1)),
                agent_grace: Duration::from_secs(s.agent_grace),
                tls_cert: s.tls_cert,
                tls_key: s.tls_key,
                no_tls: s.no_tls,
                threads: s.threads.unwrap_or(ServeConfig::default().threads).clamp(1, 64),
            };
            if let Err(e) = start(cfg) {
                die(e);
            }
            loop {
                std::thread::park();
            }
        }
        Cmd::Node(n) => match n.cmd {
            NodeSub::Add(a) => client_do(a.url, a.token, a.data, |c| async move {
                let body = json!({
                    "name": a.name, "labels": a.labels, "executors": a.executors,
                    "websocket": !a.tcp, "work_dir": a.work_dir,
                });
                let v = c.json(Method::POST, "/api/nodes", body.to_string()).await?;
                println!("node '{}' added (labels: {}; executors: {})", a.name, a.labels, a.executors);
                println!("secret: {}", v["secret"].as_str().unwrap_or(""));
                println!("start its agent with:");
                println!("  {}", v["command"].as_str().unwrap_or(""));
                Ok(0)
            }),
            NodeSub::Secret(s) => client_do(s.url, s.token, s.data, |c| async move {
                let v = c.json(Method::GET, &format!("/api/nodes/{}", s.name), "").await?;
                println!("{}", v["secret"].as_str().unwrap_or(""));
                Ok(0)
            }),
            NodeSub::Rm(r) => client_do(r.url, r.token, r.data, |c| async move {
                c.json(Method::DELETE, &format!("/api/nodes/{}", r.name), "").await?;
                println!("node '{}' removed", r.name);
                Ok(0)
            }),
        },
        Cmd::Nodes(n) => client_do(n.url, n.token, n.data, |c| async move {
            let v = c.json(Method::GET, "/api/nodes", "").await?;
            for n in v["nodes"].as_array().into_iter().flatten() {
                let labels: Vec<&str> =
                    n["labels"].as_array().into_iter().flatten().filter_map(|l| l.as_str()).collect();
                println!(
                    "{}\t{}\t{}\t{}",
                    n["name"].as_str().unwrap_or(""),
                    if n["online"].as_bool() == Some(true) { "online" } else { "offline" },
                    n["executors"],
                    labels.join(" ")
                );
            }
            Ok(0)
        }),
        Cmd::Run(r) => {
            let yaml = std::fs::read_to_string(&r.file)
                .unwrap_or_else(|e| die(format!("cannot read {}: {e}", r.file.display())));
            if r.follow && r.wait {
                die("--follow already waits for the result: give one of --follow and --wait");
            }
            client_do(r.url, r.token, r.data, |c| async move {
                if r.wait {
                    submit_and_wait(&c, &yaml).await
                } else {
                    submit(&c, &yaml, r.follow).await
                }
            })
        }
        Cmd::Builds(b) => client_do(b.url, b.token, b.data, |c| async move {
            let v = c.json(Method::GET, "/api/builds", "").await?;
            for b in v["builds"].as_array().into_iter().flatten() {
                println!(
                    "#{}\t{}\t{}\t{}\t{}",
                    b["id"],
                    b["state"].as_str().unwrap_or(""),
                    b["name"].as_str().unwrap_or(""),
                    b["node"].as_str().unwrap_or("-"),
                    b["message"].as_str().unwrap_or("")
                );
            }
            Ok(0)
        }),
        Cmd::Log(l) => {
            client_do(l.url, l.token, l.data, |c| async move { show_log(&c, l.id, l.follow).await })
        }
        Cmd::Cancel(x) => client_do(x.url, x.token, x.data, |c| async move {
            c.json(Method::POST, &format!("/api/builds/{}/cancel", x.id), "").await?;
            println!("build #{} cancelled", x.id);
            Ok(0)
        }),
        Cmd::Token(t) => match t.cmd {
            TokenSub::Rotate(r) => client_do(r.url, r.token, r.data, |c| async move {
                let v = c.json(Method::POST, "/api/token/rotate", "").await?;
                println!("{}", v["token"].as_str().unwrap_or(""));
                Ok(0)
            }),
        },
        Cmd::Demo(d) => demo(d),
    };
    std::process::exit(code);
}

fn client_do<F, Fut>(url: Option<String>, token: Option<String>, data: Option<PathBuf>, f: F) -> i32
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<i32, String>>,
{
    let client = Client::new(url, token, data).unwrap_or_else(|e| die(e));
    match smol::block_on(f(client)) {
        Ok(code) => code,
        Err(e) => die(e),
    }
}

async fn submit(c: &Client, yaml: &str, follow: bool) -> Result<i32, String> {
    let v = c.json(Method::POST, "/api/builds", yaml.to_string()).await?;
    let id = v["id"].as_u64().ok_or("the controller did not return a build number")?;
    eprintln!("build #{id} queued at {}", c.url());
    if !follow {
        println!("{id}");
        return Ok(0);
    }
    show_log(c, id, true).await
}

/// Submit and wait for the result in one call (`POST /api/builds?wait=`), asking again while
/// the build runs longer than the controller's longest wait.
async fn submit_and_wait(c: &Client, yaml: &str) -> Result<i32, String> {
    let mut v = c.json(Method::POST, "/api/builds?wait=300", yaml.to_string()).await?;
    let id = v["id"].as_u64().ok_or("the controller did not return a build number")?;
    eprintln!("build #{id} queued at {}", c.url());
    while matches!(v["state"].as_str(), Some("queued" | "running")) {
        v = c.json(Method::GET, &format!("/api/builds/{id}?wait=300"), "").await?;
    }
    let state = v["state"].as_str().unwrap_or("unknown");
    let message =
        v["message"].as_str().filter(|m| !m.is_empty()).map(|m| format!(": {m}")).unwrap_or_default();
    let bytes: u64 = v["steps"].as_array().into_iter().flatten().filter_map(|s| s["bytes"].as_u64()).sum();
    println!("build #{id} {}{message} ({bytes} output bytes stored)", state.to_uppercase());
    Ok(exit_code(BuildState::parse(state)))
}

/// The CLI's exit code for a build's final state.
fn exit_code(state: BuildState) -> i32 {
    match state {
        BuildState::Success => 0,
        BuildState::Aborted => EXIT_ABORTED,
        _ => EXIT_FAILURE,
    }
}

async fn show_log(c: &Client, id: u64, follow: bool) -> Result<i32, String> {
    let path = format!("/api/builds/{id}/log{}", if follow { "?follow=1" } else { "" });
    c.stream(&path, &mut std::io::stdout().lock()).await?;
    if !follow {
        return Ok(0);
    }
    let b = c.json(Method::GET, &format!("/api/builds/{id}"), "").await?;
    Ok(exit_code(BuildState::parse(b["state"].as_str().unwrap_or_default())))
}

const SAMPLE: &str = include_str!("../../examples/hello.yaml");

fn demo(d: Demo) -> i32 {
    let cfg = ServeConfig {
        data: d.data.clone(),
        bind: [127, 0, 0, 1].into(),
        http_port: 0,
        agent_port: 0,
        ..ServeConfig::default()
    };
    let ctl = start(cfg).unwrap_or_else(|e| die(e));
    let (http, _) = *ctl.addrs.get().expect("listening");
    let url = format!("https://{http}/");
    // The local agent pins the controller's own identity, as `wisp node add` tells agents to.
    let pin = std::fs::read_to_string(d.data.join("fingerprint"))
        .ok()
        .and_then(|f| crate::tls::parse_fingerprint(&f).ok());
    let name = "local";
    if ctl.node(name).is_none() {
        let rec = super::store::NodeRecord {
            name: name.into(),
            labels: vec!["local".into(), std::env::consts::OS.into(), std::env::consts::ARCH.into()],
            executors: 2,
            websocket: true,
            work_dir: String::new(),
        };
        ctl.add_node(rec).unwrap_or_else(|e| die(e.message));
    }
    let agent_cfg = crate::agent::Config {
        url: url.clone(),
        name: name.into(),
        secret: ctl.secret(name),
        mode: crate::agent::Mode::WebSocket,
        work_dir: d.data.join("agent"),
        trust: crate::tls::Trust { pin, ..Default::default() },
        spool_cap: crate::agent::DEFAULT_SPOOL_CAP,
    };
    std::thread::spawn(move || {
        if let Err(e) = crate::agent::run(agent_cfg, crate::agent::Shutdown::never()) {
            eprintln!("wisp: local agent: {e}");
        }
    });
    let yaml = match &d.pipeline {
        Some(p) => {
            std::fs::read_to_string(p).unwrap_or_else(|e| die(format!("cannot read {}: {e}", p.display())))
        }
        None => SAMPLE.to_string(),
    };
    let client = Client::new(None, None, Some(d.data)).unwrap_or_else(|e| die(e));
    let code = smol::block_on(submit(&client, &yaml, true)).unwrap_or_else(|e| die(e));
    let _ = std::io::stdout().flush();
    code
}
