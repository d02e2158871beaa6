//! The `wisp` command line: `serve`, the client commands, and `demo`. Answers are read through
//! the types of `controller::api`, never by key, so the CLI and the routes cannot drift apart.

pub mod client;
mod demo;

use crate::controller::api::{
    ArtifactList, BuildInfo, BuildList, BuildState, Cancelled, CloudRemoved, CloudView, CloudsApplied,
    NewNode, NodeCreated, NodeInfo, NodeList, NodeRemoved, Submitted, TemplateView, TokenRotated,
};
use crate::controller::{labels, start, ServeConfig};
use argh::FromArgs;
use client::{Client, Error, Remote};
use hyper::Method;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Exit code for a build that failed.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code for a build that was cancelled.
pub const EXIT_ABORTED: i32 = 2;
/// Exit code for errors of the CLI itself (the controller unreachable or refusing, bad input).
pub const EXIT_ERROR: i32 = 3;
/// Exit code for a command line that does not parse (sysexits' `EX_USAGE`): kept apart from 1 and
/// 2, which say how a build ended.
pub const EXIT_USAGE: i32 = 64;

/// How long a follower keeps trying to get back to a controller it lost (a restart, a proxy
/// reload) before it gives up with exit code 3.
pub const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// First wait before trying again; it doubles on each failure up to `RECONNECT_MAX_DELAY`.
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(500);
/// Longest wait between two tries.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);

/// wisp: a build controller with tiny static agents. The client commands find the controller
/// through --url, WISP_URL or the data dir (--data, default ./wisp-data). Exit codes: 0 success,
/// 1 build failed, 2 build aborted, 3 the command failed (the message says why), 64 bad usage.
#[derive(FromArgs)]
struct Top {
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    #[argh(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Serve(Serve),
    Node(NodeCmd),
    Nodes(Nodes),
    Cloud(CloudCmd),
    Clouds(Clouds),
    Templates(Templates),
    Run(Run),
    Builds(Builds),
    Log(LogCmd),
    Cancel(Cancel),
    Artifacts(Artifacts),
    Artifact(ArtifactCmd),
    Token(TokenCmd),
    Demo(demo::Demo),
}

/// Declares a client command: its own fields (each ending in a comma), then the options every
/// client command shares.
macro_rules! client_command {
    ($(#[$meta:meta])* struct $name:ident { $($fields:tt)* }) => {
        #[derive(FromArgs)]
        $(#[$meta])*
        struct $name {
            $($fields)*
            /// controller URL (or WISP_URL; default: the one in --data, else http://127.0.0.1:8080)
            #[argh(option)]
            url: Option<String>,
            /// API token (or WISP_TOKEN; default: the one in --data)
            #[argh(option)]
            token: Option<String>,
            /// the controller's data dir, where its URL, token and identity are found (default
            /// ./wisp-data)
            #[argh(option)]
            data: Option<PathBuf>,
            /// pin the controller's public key, sha256:HEX as in its DATA/fingerprint (or
            /// WISP_INSTANCE_IDENTITY); names and CAs are then not checked
            #[argh(option)]
            instance_identity: Option<String>,
            /// extra CA certificate(s) in PEM to trust for an https:// controller (or WISP_CERT)
            #[argh(option)]
            cert: Option<PathBuf>,
            /// do not check the controller's certificate at all (unsafe: the token goes to
            /// whoever answers)
            #[argh(switch)]
            no_certificate_check: bool,
        }

        impl $name {
            fn remote(&self) -> Remote {
                Remote {
                    url: self.url.clone(),
                    token: self.token.clone(),
                    data: self.data.clone(),
                    instance_identity: self.instance_identity.clone(),
                    cert: self.cert.clone(),
                    no_certificate_check: self.no_certificate_check,
                }
            }
        }
    };
}

/// run the controller
#[derive(FromArgs)]
#[argh(subcommand, name = "serve")]
struct Serve {
    /// data directory (default ./wisp-data)
    #[argh(option, default = "PathBuf::from(\"wisp-data\")")]
    data: PathBuf,
    /// HTTP port: API, log streams, and agents over WebSocket (default 8080; 0 picks a free port)
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
    /// serve every HTTP path (web page, API, /wsagents/) under this prefix, e.g. /ci behind a
    /// shared host (default: the root)
    #[argh(option, default = "String::new()")]
    prefix: String,
    /// let /metrics answer without the API token (default: a scrape needs it as a bearer token)
    #[argh(switch)]
    metrics_public: bool,
    /// days a build's artifacts are kept after they were archived (default 30; 0 keeps them
    /// for ever)
    #[argh(option, default = "30")]
    keep_artifacts_days: u32,
    /// executor threads (default 1; more help only with many TLS agents streaming at once)
    #[argh(option)]
    threads: Option<usize>,
    /// connections per port that may be in the TLS handshake at once; more are closed (default
    /// 4096)
    #[argh(option)]
    handshake_budget: Option<usize>,
    /// also serve agents through this Kafka cluster: bootstrap brokers HOST:PORT[,HOST:PORT...]
    /// (each node's topic is wisp.NAME; see docs/PROTOCOL.md)
    #[argh(option)]
    kafka: Option<String>,
    /// reach the Kafka brokers over TLS (with the webpki roots and --kafka-cert)
    #[argh(switch)]
    kafka_tls: bool,
    /// extra CA certificate(s) in PEM for the Kafka brokers' TLS (implies --kafka-tls)
    #[argh(option)]
    kafka_cert: Option<PathBuf>,
    /// SASL mechanism for Kafka: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (default PLAIN when a user
    /// is given)
    #[argh(option)]
    kafka_sasl: Option<String>,
    /// SASL user for Kafka
    #[argh(option)]
    kafka_user: Option<String>,
    /// SASL password for Kafka, or @FILE to read it from a file
    #[argh(option)]
    kafka_password: Option<String>,
}

/// add, remove or show the secret of a node
#[derive(FromArgs)]
#[argh(subcommand, name = "node")]
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

client_command! {
    /// add a node and print its secret and the command that starts its agent
    #[argh(subcommand, name = "add")]
    struct NodeAdd {
        /// node name: letters, digits and _ . + -, at most 64 bytes
        #[argh(positional)]
        name: String,
        /// labels, separated by spaces or commas, e.g. "linux x86_64"
        #[argh(option, default = "String::new()")]
        labels: String,
        /// builds it runs at once (default 1)
        #[argh(option, default = "1")]
        executors: u32,
        /// its agent connects over the TCP agent port instead of WebSocket
        #[argh(switch)]
        tcp: bool,
        /// work dir for its agent (default: the agent's own)
        #[argh(option, default = "String::new()")]
        work_dir: String,
    }
}

client_command! {
    /// print a node's secret
    #[argh(subcommand, name = "secret")]
    struct NodeSecret {
        /// node name
        #[argh(positional)]
        name: String,
    }
}

client_command! {
    /// remove a node (its agent is disconnected)
    #[argh(subcommand, name = "rm")]
    struct NodeRm {
        /// node name
        #[argh(positional)]
        name: String,
    }
}

/// manage clouds (sources of agent pods): apply a cloud file, remove a cloud
#[derive(FromArgs)]
#[argh(subcommand, name = "cloud")]
struct CloudCmd {
    #[argh(subcommand)]
    sub: CloudSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum CloudSub {
    Apply(CloudApply),
    Rm(CloudRm),
}

client_command! {
    /// apply a cloud file (YAML with `clouds:`): each cloud in it is added or replaces the one of
    /// its name, without a restart; a bad file changes nothing
    #[argh(subcommand, name = "apply")]
    struct CloudApply {
        /// the cloud file
        #[argh(positional)]
        file: PathBuf,
    }
}

client_command! {
    /// remove a cloud (refused while it has pods)
    #[argh(subcommand, name = "rm")]
    struct CloudRm {
        /// cloud name
        #[argh(positional)]
        name: String,
    }
}

client_command! {
    /// list clouds: name, kind, pods, cap, templates, status
    #[argh(subcommand, name = "clouds")]
    struct Clouds {}
}

client_command! {
    /// list pod templates: cloud, name, labels, pods, cap, idle minutes, retention, status
    #[argh(subcommand, name = "templates")]
    struct Templates {}
}

client_command! {
    /// list nodes: name, online or offline, executors, labels, the agent's version and architecture
    #[argh(subcommand, name = "nodes")]
    struct Nodes {}
}

client_command! {
    /// submit a pipeline (YAML) and print its build number; with --follow or --wait, exit with its
    /// result
    #[argh(subcommand, name = "run")]
    struct Run {
        /// pipeline file
        #[argh(positional)]
        file: PathBuf,
        /// stream the log until the build ends (riding out controller restarts); exit 0 on
        /// success, 1 on failure, 2 if aborted
        #[argh(switch, short = 'f')]
        follow: bool,
        /// wait for the result without the log (one call, no polling); same exit codes as --follow
        #[argh(switch, short = 'w')]
        wait: bool,
        /// a parameter's value, NAME=VALUE (the pipeline's `parameters:`); repeat for more
        #[argh(option, short = 'p', long = "param")]
        param: Vec<String>,
    }
}

client_command! {
    /// list a build's artifacts: size, SHA-256, path
    #[argh(subcommand, name = "artifacts")]
    struct Artifacts {
        /// build number
        #[argh(positional)]
        id: u64,
    }
}

client_command! {
    /// download an artifact: `wisp artifact get ID PATH [-o FILE]` (to stdout without -o); its
    /// SHA-256 is checked against the one the controller recorded
    #[argh(subcommand, name = "artifact")]
    struct ArtifactCmd {
        /// get
        #[argh(positional)]
        action: String,
        /// build number
        #[argh(positional)]
        id: u64,
        /// the artifact's path, as `wisp artifacts` lists it
        #[argh(positional)]
        path: String,
        /// write it to this file (written whole, then renamed into place)
        #[argh(option, short = 'o')]
        output: Option<PathBuf>,
    }
}

client_command! {
    /// list the newest builds: number, state, pipeline, node, message
    #[argh(subcommand, name = "builds")]
    struct Builds {}
}

client_command! {
    /// print a build's log; a build that has ended exits with its result, as with --follow
    #[argh(subcommand, name = "log")]
    struct LogCmd {
        /// build number
        #[argh(positional)]
        id: u64,
        /// keep streaming until the build ends (riding out controller restarts), then exit with
        /// its result
        #[argh(switch, short = 'f')]
        follow: bool,
    }
}

client_command! {
    /// cancel a queued or running build
    #[argh(subcommand, name = "cancel")]
    struct Cancel {
        /// build number
        #[argh(positional)]
        id: u64,
    }
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

client_command! {
    /// replace the API token with a new one (kept in the controller's data dir) and print it; the
    /// old token stops working at once
    #[argh(subcommand, name = "rotate")]
    struct TokenRotate {}
}

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("wisp: {msg}");
    std::process::exit(EXIT_ERROR);
}

fn usage(msg: impl std::fmt::Display) -> ! {
    eprintln!("wisp: {msg}\nRun wisp --help for more information.");
    std::process::exit(EXIT_USAGE);
}

/// Parse the command line as argh does, but with our exit code for usage errors.
fn parse_args() -> Top {
    let args: Vec<String> = std::env::args().collect();
    let strs: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    match Top::from_args(&["wisp"], &strs) {
        Ok(top) => top,
        Err(e) if e.status.is_ok() => {
            println!("{}", e.output);
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("{}\nRun wisp --help for more information.", e.output);
            std::process::exit(EXIT_USAGE);
        }
    }
}

/// Let a closed stdout end the command as it ends `ls` or `cat` (`wisp builds | head -1`): by
/// SIGPIPE, quietly. Rust ignores SIGPIPE, which turns the closed pipe into a panic in `println!`.
/// Not for `serve`, whose log lines should never be what stops it.
fn die_on_closed_stdout() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: the default action has no handler to run; nothing else sets this signal's handler.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// Entry point of the `wisp` binary.
pub fn main() {
    let top = parse_args();
    if top.version {
        println!("wisp {}", env!("WISP_VERSION"));
        return;
    }
    let Some(cmd) = top.cmd else { usage("give a command, such as `wisp serve` or `wisp demo`") };
    let code = match cmd {
        Cmd::Serve(s) => serve(s),
        Cmd::Demo(d) => {
            die_on_closed_stdout();
            demo::run(d)
        }
        cmd => {
            die_on_closed_stdout();
            crate::logger::init();
            client_command(cmd)
        }
    };
    std::process::exit(code);
}

fn serve(s: Serve) -> i32 {
    crate::logger::init();
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
        prefix: s.prefix,
        metrics_public: s.metrics_public,
        keep_artifacts: (s.keep_artifacts_days > 0)
            .then(|| Duration::from_secs(u64::from(s.keep_artifacts_days) * 86_400)),
        threads: s.threads.unwrap_or(ServeConfig::default().threads).clamp(1, 64),
        handshake_budget: s.handshake_budget.unwrap_or(ServeConfig::default().handshake_budget).max(1),
        #[cfg(feature = "kafka")]
        kafka: match &s.kafka {
            None => None,
            Some(brokers) => match crate::kafka::Config::from_options(
                brokers,
                s.kafka_tls,
                s.kafka_cert.as_deref(),
                s.kafka_sasl.as_deref(),
                s.kafka_user.as_deref(),
                s.kafka_password.as_deref(),
                "wisp-controller",
            ) {
                Ok(c) => Some(c),
                Err(e) => die(e),
            },
        },
    };
    #[cfg(not(feature = "kafka"))]
    if s.kafka.is_some() || s.kafka_tls || s.kafka_cert.is_some() || s.kafka_sasl.is_some() {
        let _ = (&s.kafka_user, &s.kafka_password);
        die("this wisp was built without Kafka: build it with the `kafka` feature (on by default)");
    }
    let created = Created::before(&cfg.data);
    if let Err(e) = start(cfg) {
        created.undo();
        die(e);
    }
    loop {
        std::thread::park();
    }
}

/// The part of a data dir's path that did not exist before a command, so that a command that
/// fails can take away what it made and nothing else.
struct Created(Option<PathBuf>);

impl Created {
    fn before(data: &Path) -> Self {
        let missing = data
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && std::fs::symlink_metadata(a).is_err())
            .last();
        Self(missing.map(Path::to_path_buf))
    }

    fn undo(&self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn client_command(cmd: Cmd) -> i32 {
    match cmd {
        Cmd::Node(n) => match n.cmd {
            NodeSub::Add(a) => {
                labels::check_node_name(&a.name).unwrap_or_else(|e| die(e));
                with_client(&a.remote(), |c| async move {
                    let node = NewNode {
                        name: a.name.clone(),
                        labels: a.labels.clone(),
                        executors: a.executors,
                        websocket: !a.tcp,
                        work_dir: a.work_dir.clone(),
                    };
                    let body = serde_json::to_string(&node).map_err(|e| e.to_string())?;
                    let n: NodeCreated = c.call(Method::POST, "/api/nodes", body).await?;
                    let labels = n.node.labels.join(" ");
                    println!(
                        "node '{}' added (labels: {labels}; executors: {})",
                        n.node.name, n.node.executors
                    );
                    println!("secret: {}", n.secret);
                    println!("start its agent with:");
                    println!("  {}", n.command);
                    Ok(0)
                })
            }
            NodeSub::Secret(s) => with_client(&s.remote(), |c| async move {
                let n: NodeInfo = c.get(&format!("/api/nodes/{}", s.name)).await?;
                println!("{}", n.secret);
                Ok(0)
            }),
            NodeSub::Rm(r) => with_client(&r.remote(), |c| async move {
                let n: NodeRemoved = c.call(Method::DELETE, &format!("/api/nodes/{}", r.name), "").await?;
                println!("node '{}' removed", n.removed);
                Ok(0)
            }),
        },
        Cmd::Nodes(n) => with_client(&n.remote(), |c| async move {
            let list: NodeList = c.get("/api/nodes").await?;
            let mut out = std::io::stdout().lock();
            for n in list.nodes {
                let state = if n.online { "online" } else { "offline" };
                // The agent's build last, so that scripts reading the first columns keep working.
                let agent = n.agent.map_or("-".to_string(), |a| format!("{} {}/{}", a.version, a.arch, a.os));
                let _ =
                    writeln!(out, "{}\t{state}\t{}\t{}\t{agent}", n.name, n.executors, n.labels.join(" "));
            }
            Ok(0)
        }),
        Cmd::Cloud(c) => match c.sub {
            CloudSub::Apply(a) => {
                let text = std::fs::read_to_string(&a.file)
                    .unwrap_or_else(|e| die(format!("cannot read {}: {e}", a.file.display())));
                let file = a.file.clone();
                with_client(&a.remote(), |c| async move {
                    let r: CloudsApplied =
                        c.call(Method::POST, "/api/clouds", text).await.map_err(|e| match e {
                            // The controller's error names a line and column of the file.
                            Error::Refused { status, message } => {
                                Error::Refused { status, message: format!("{}: {message}", file.display()) }
                            }
                            other => other,
                        })?;
                    for w in r.warnings {
                        eprintln!("warning: {w}");
                    }
                    for name in r.applied {
                        println!("cloud '{name}' applied");
                    }
                    Ok(0)
                })
            }
            CloudSub::Rm(r) => with_client(&r.remote(), |c| async move {
                let n: CloudRemoved = c.call(Method::DELETE, &format!("/api/clouds/{}", r.name), "").await?;
                println!("cloud '{}' removed", n.removed);
                Ok(0)
            }),
        },
        Cmd::Clouds(l) => with_client(&l.remote(), |c| async move {
            let list: Vec<CloudView> = c.get("/api/clouds").await?;
            let mut out = std::io::stdout().lock();
            for c in list {
                let cap = if c.container_cap == 0 { "-".to_string() } else { c.container_cap.to_string() };
                let _ = writeln!(
                    out,
                    "{}\t{}\tpods {}\tcap {cap}\ttemplates {}\t{}",
                    c.name,
                    c.kind,
                    c.pods,
                    c.templates.len(),
                    c.status
                );
            }
            Ok(0)
        }),
        Cmd::Templates(l) => with_client(&l.remote(), |c| async move {
            let list: Vec<TemplateView> = c.get("/api/templates").await?;
            let mut out = std::io::stdout().lock();
            for t in list {
                let cap = t.instance_cap.map_or("-".to_string(), |c| c.to_string());
                let _ = writeln!(
                    out,
                    "{}\t{}\t{}\tpods {}\tcap {cap}\tidle {}m\t{}\t{}",
                    t.cloud, t.name, t.label, t.pods, t.idle_minutes, t.pod_retention, t.status
                );
            }
            Ok(0)
        }),
        Cmd::Run(r) => {
            if r.follow && r.wait {
                usage("give one of --follow and --wait (--follow waits for the result too)");
            }
            let yaml = std::fs::read_to_string(&r.file)
                .unwrap_or_else(|e| die(format!("cannot read {}: {e}", r.file.display())));
            let mut query = String::new();
            for p in &r.param {
                if !p.contains('=') {
                    usage(format!("-p {p}: give NAME=VALUE"));
                }
                query.push_str("&param=");
                query.extend(percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC));
            }
            with_client(&r.remote(), |c| async move {
                if r.wait {
                    return submit_and_wait(&c, &yaml, &r.file, &query).await;
                }
                let id = submit(&c, &yaml, &r.file, &query).await?;
                eprintln!("build #{id} queued at {}", c.url());
                if !r.follow {
                    println!("{id}");
                    return Ok(0);
                }
                Ok(exit_code(follow(&c, id).await?))
            })
        }
        Cmd::Builds(b) => with_client(&b.remote(), |c| async move {
            let list: BuildList = c.get("/api/builds").await?;
            let mut out = std::io::stdout().lock();
            for b in list.builds {
                let node = b.node.as_deref().unwrap_or("-");
                // A build that waits or stalls says why in the message column.
                let message = match &b.waiting {
                    Some(why) => format!("waiting: {why}"),
                    None => b.message,
                };
                let _ = writeln!(out, "#{}\t{}\t{}\t{node}\t{message}", b.id, b.state.as_str(), b.name);
            }
            Ok(0)
        }),
        Cmd::Log(l) => with_client(&l.remote(), |c| async move {
            let b: BuildInfo = c.get(&format!("/api/builds/{}", l.id)).await?;
            // An ended build's log ends as a follower sees it: with the result, and its code.
            if l.follow || b.build.state.is_final() {
                return Ok(exit_code(follow(&c, l.id).await?));
            }
            c.stream(&format!("/api/builds/{}/log", l.id), &mut std::io::stdout().lock()).await?;
            Ok(0)
        }),
        Cmd::Cancel(x) => with_client(&x.remote(), |c| async move {
            let _: Cancelled = c.call(Method::POST, &format!("/api/builds/{}/cancel", x.id), "").await?;
            println!("build #{} cancelled", x.id);
            Ok(0)
        }),
        Cmd::Artifacts(a) => with_client(&a.remote(), |c| async move {
            let list: ArtifactList = c.get(&format!("/api/builds/{}/artifacts", a.id)).await?;
            if list.artifacts.is_empty() {
                eprintln!("build #{} has no artifacts", a.id);
            }
            let mut out = std::io::stdout().lock();
            for x in &list.artifacts {
                let _ = writeln!(out, "{}\t{}\t{}", x.size, x.sha256, x.path);
            }
            Ok(0)
        }),
        Cmd::Artifact(a) => {
            if a.action != "get" {
                usage(format!("unknown action {:?}: use `wisp artifact get ID PATH [-o FILE]`", a.action));
            }
            with_client(
                &a.remote(),
                |c| async move { get_artifact(&c, a.id, &a.path, a.output.as_deref()).await },
            )
        }
        Cmd::Token(t) => match t.cmd {
            TokenSub::Rotate(r) => with_client(&r.remote(), |c| async move {
                let t: TokenRotated = c.call(Method::POST, "/api/token/rotate", "").await?;
                println!("{}", t.token);
                Ok(0)
            }),
        },
        Cmd::Serve(_) | Cmd::Demo(_) => unreachable!("not client commands"),
    }
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    sha: ring::digest::Context,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `wisp artifact get`: the bytes to `output` (a temporary file renamed into place once its
/// SHA-256 matches) or stdout.
async fn get_artifact(c: &Client, id: u64, path: &str, output: Option<&Path>) -> Result<i32, Error> {
    let list: ArtifactList = c.get(&format!("/api/builds/{id}/artifacts")).await?;
    let Some(want) = list.artifacts.iter().find(|a| a.path == path) else {
        return Err(Error::Other(format!(
            "build #{id} has no artifact {path:?} (`wisp artifacts {id}` lists them)"
        )));
    };
    let url_path: String = path
        .split('/')
        .map(|p| percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC).to_string())
        .collect::<Vec<_>>()
        .join("/");
    let route = format!("/api/builds/{id}/artifacts/{url_path}");
    let check = |sha: ring::digest::Context, bytes: u64| -> Result<(), Error> {
        let got = hex::encode(sha.finish().as_ref());
        if got != want.sha256 || bytes != want.size {
            return Err(Error::Other(format!(
                "artifact {path:?}: got {bytes} bytes with SHA-256 {got}, expected {} bytes with {}",
                want.size, want.sha256
            )));
        }
        Ok(())
    };
    match output {
        None => {
            let mut h = Hashing {
                inner: std::io::stdout().lock(),
                sha: ring::digest::Context::new(&ring::digest::SHA256),
                bytes: 0,
            };
            c.stream(&route, &mut h).await?;
            check(h.sha, h.bytes)?;
        }
        Some(file) => {
            let tmp = file.with_extension("part");
            let f = std::fs::File::create(&tmp)
                .map_err(|e| Error::Other(format!("cannot write {}: {e}", tmp.display())))?;
            let mut h = Hashing {
                inner: std::io::BufWriter::with_capacity(1 << 20, f),
                sha: ring::digest::Context::new(&ring::digest::SHA256),
                bytes: 0,
            };
            let r = c.stream(&route, &mut h).await;
            let r = r.and_then(|_| h.flush().map_err(|e| Error::Other(e.to_string())));
            if let Err(e) = r.and_then(|_| check(h.sha, h.bytes)) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, file)
                .map_err(|e| Error::Other(format!("cannot write {}: {e}", file.display())))?;
            eprintln!("{} ({} bytes, SHA-256 {})", file.display(), want.size, want.sha256);
        }
    }
    Ok(0)
}

/// Run `f` with a client for `remote`; its error ends the command with `EXIT_ERROR`.
fn with_client<F, Fut>(remote: &Remote, f: F) -> i32
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<i32, Error>>,
{
    let client = Client::new(remote).unwrap_or_else(|e| die(e));
    smol::block_on(f(client)).unwrap_or_else(|e| die(e))
}

/// A refused pipeline named after the file it came from: `FILE: line 3 column 5: ...`.
fn pipeline_refused(e: Error, file: &Path) -> Error {
    match e {
        Error::Refused { status: 400 | 413, message } => {
            let what = message.strip_prefix("pipeline: ").unwrap_or(&message);
            Error::Other(format!("{}: {what}", file.display()))
        }
        e => e,
    }
}

/// Queue the pipeline read from `file`; returns its build number.
/// `query` is `&param=...` for each parameter given.
async fn submit(c: &Client, yaml: &str, file: &Path, query: &str) -> Result<u64, Error> {
    let path = match query.strip_prefix('&') {
        Some(q) => format!("/api/builds?{q}"),
        None => "/api/builds".to_string(),
    };
    let s: Submitted =
        c.call(Method::POST, &path, yaml.to_string()).await.map_err(|e| pipeline_refused(e, file))?;
    Ok(s.id)
}

/// Submit, then wait for the result, asking again while the build runs longer than the
/// controller's longest wait, or the controller is away. Two calls, not one `POST ?wait=`: a
/// wait that a controller restart cuts off can be asked again, a submit could not be (it may
/// have been taken before the cut, and a second one would start a second build).
async fn submit_and_wait(c: &Client, yaml: &str, file: &Path, query: &str) -> Result<i32, Error> {
    let id = submit(c, yaml, file, query).await?;
    eprintln!("build #{id} queued at {}", c.url());
    let mut retry = Retry::new(c.url());
    let b = loop {
        match c.get::<BuildInfo>(&format!("/api/builds/{id}?wait=300")).await {
            Ok(b) if b.build.state.is_final() => break b,
            Ok(_) => retry = Retry::new(c.url()),
            Err(Error::Unreachable { cause, .. }) => retry.wait(&cause).await?,
            Err(e) => return Err(e),
        }
    };
    let message = Some(b.build.message.as_str()).filter(|m| !m.is_empty()).map(|m| format!(": {m}"));
    let bytes: u64 = b.steps.iter().map(|s| s.bytes).sum();
    println!(
        "build #{id} {}{} ({bytes} output bytes stored)",
        b.build.state.as_str().to_uppercase(),
        message.unwrap_or_default()
    );
    Ok(exit_code(b.build.state))
}

/// The CLI's exit code for a build's final state.
fn exit_code(state: BuildState) -> i32 {
    match state {
        BuildState::Success => 0,
        BuildState::Aborted => EXIT_ABORTED,
        _ => EXIT_FAILURE,
    }
}

/// Backoff for getting back to a lost controller: `RECONNECT_FIRST_DELAY` doubling to
/// `RECONNECT_MAX_DELAY`, with up to a fifth more at random so that many followers do not all
/// come back at once, for `RECONNECT_FOR` in all; one line to stderr before each wait.
struct Retry<'a> {
    url: &'a str,
    since: Instant,
    delay: Duration,
}

impl<'a> Retry<'a> {
    fn new(url: &'a str) -> Self {
        Self { url, since: Instant::now(), delay: RECONNECT_FIRST_DELAY }
    }

    /// Wait before the next try, or give up (`why` is what went wrong).
    async fn wait(&mut self, why: &str) -> Result<(), Error> {
        let left = RECONNECT_FOR.saturating_sub(self.since.elapsed());
        if left.is_zero() {
            let cause = format!("{why}; gave up after trying for {}s", RECONNECT_FOR.as_secs());
            return Err(Error::Unreachable { url: self.url.to_string(), cause, hint: false });
        }
        let delay = (self.delay + self.delay.mul_f64(jitter() / 5.0)).min(left);
        eprintln!(
            "wisp: lost the controller at {} ({why}); retrying in {:.1}s (for {}s more at most)",
            self.url,
            delay.as_secs_f64(),
            left.as_secs()
        );
        smol::Timer::after(delay).await;
        self.delay = (self.delay * 2).min(RECONNECT_MAX_DELAY);
        Ok(())
    }
}

/// A number in [0, 1) that differs from run to run (std's hasher keys are random per process).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Writes through to stdout, counting the bytes written.
struct Counted<'a> {
    out: std::io::StdoutLock<'a>,
    n: &'a mut u64,
    /// Still in the stream's prelude: the `==> build #N waiting: ...` notices the controller
    /// sends before the first step starts, which are not part of the log and not counted in
    /// `?offset=` (a resumed stream has no prelude).
    prelude: bool,
    /// A prelude line not yet complete.
    line: Vec<u8>,
}

impl<'a> Counted<'a> {
    fn new(out: std::io::StdoutLock<'a>, n: &'a mut u64) -> Self {
        let prelude = *n == 0;
        Self { out, n, prelude, line: Vec::new() }
    }
}

/// True for a line of the log stream's prelude (see [`Counted`]).
fn is_notice(line: &[u8]) -> bool {
    line.starts_with(b"==> build #") && line.windows(10).any(|w| w == b" waiting: ")
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.prelude {
            let n = self.out.write(buf)?;
            *self.n += n as u64;
            return Ok(n);
        }
        let mut rest = buf;
        while self.prelude && !rest.is_empty() {
            let end = rest.iter().position(|&b| b == b'\n').map(|i| i + 1);
            let take = end.unwrap_or(rest.len());
            self.line.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            let complete = end.is_some();
            const PREFIX: &[u8] = b"==> build #";
            let could_be = PREFIX.starts_with(&self.line) || self.line.starts_with(PREFIX);
            if complete || !could_be {
                self.out.write_all(&self.line)?;
                if !(complete && is_notice(&self.line)) {
                    // The first byte of the log proper: counted from here on.
                    self.prelude = false;
                    *self.n += self.line.len() as u64;
                }
                self.line.clear();
            }
        }
        if !rest.is_empty() {
            self.out.write_all(rest)?;
            *self.n += rest.len() as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Stream build `id`'s log until the build ends and return its result. When the controller goes
/// away (killed, restarted, a proxy reloading), come back with `Retry`'s backoff and go on at the
/// byte where the stream broke (`?offset=`), so the output is the log byte for byte, once. Called
/// once the controller has answered: one that is not there at all is not waited for.
async fn follow(c: &Client, id: u64) -> Result<BuildState, Error> {
    let mut offset = 0u64;
    let mut retry = Retry::new(c.url());
    loop {
        let before = offset;
        let path = match offset {
            0 => format!("/api/builds/{id}/log?follow=1"),
            n => format!("/api/builds/{id}/log?follow=1&offset={n}"),
        };
        let streamed = c.stream(&path, &mut Counted::new(std::io::stdout().lock(), &mut offset)).await;
        if offset > before {
            retry = Retry::new(c.url());
        }
        let why = match streamed {
            Ok(()) => match c.get::<BuildInfo>(&format!("/api/builds/{id}")).await {
                Ok(b) if b.build.state.is_final() => return Ok(b.build.state),
                // The stream ended before the build did (the controller stopping): go on.
                Ok(_) => "the log stream ended before the build".to_string(),
                Err(Error::Unreachable { cause, .. }) => cause,
                Err(e) => return Err(e),
            },
            Err(Error::Unreachable { cause, .. }) => cause,
            Err(e) => return Err(e),
        };
        retry.wait(&why).await?;
    }
}
