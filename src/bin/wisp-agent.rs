//! `wisp-agent`: the build agent. Parses arguments and the Jenkins-style environment, scrubs the
//! secret from what /proc shows of this process, and runs the agent until SIGTERM or SIGINT; on
//! SIGHUP it upgrades in place (`agent::handover`). Also `wisp-agent step-server` and
//! `wisp-agent install`, for steps in a pod's other containers.

/// On musl, dlmalloc instead of musl's malloc: musl returns a page group to the kernel as soon as
/// it is empty, so each build mapped and unmapped about seven regions (the step's read buffer,
/// std's spawn arguments) and every unmap interrupted the other core to flush its TLB. With 100
/// agents on 2 cores that was about a third of the agent's CPU per build (BENCHMARKS.md).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

use argh::FromArgs;
use std::path::PathBuf;
use wisp::agent::{self, process, AgentError, Mode, Shutdown};

/// A tiny build agent: connects to a wisp controller and runs the build steps it is given.
///
/// Also takes the Jenkins inbound-agent forms: `wisp-agent SECRET NAME` with JENKINS_URL set,
/// the variables JENKINS_URL, JENKINS_SECRET, JENKINS_AGENT_NAME (or JENKINS_NAME),
/// JENKINS_WEB_SOCKET, JENKINS_DIRECT_CONNECTION, JENKINS_INSTANCE_IDENTITY, JENKINS_AGENT_WORKDIR, and single-dash
/// options such as -url, -webSocket, -workDir and -jnlpUrl.
///
/// A step with `container: NAME` is forwarded to the step server of that container of the pod,
/// at $WISP_STEP_SOCKETS/NAME.sock (default /wisp); a missing socket is waited for up to
/// WISP_STEP_SOCKET_WAIT (default 60s; also e.g. 2s, 500ms). In those containers:
/// `wisp-agent install DEST` (an init container copies the agent into the shared volume) and
/// `wisp-agent step-server --socket /wisp/NAME.sock [-- CMD ARGS...]`; each has --help.
///
/// Signals: SIGTERM or SIGINT stops the agent and its steps. SIGHUP upgrades it in place: it
/// executes the binary now at the path it was started from (put a new one there with `install` or
/// `mv`) in the same process, with the same arguments; running steps keep running and their logs
/// go on where the controller has them. If that binary cannot be executed the agent says why and
/// goes on as it was.
#[derive(FromArgs)]
struct Args {
    /// controller URL, e.g. http://ci.example.com:8080/ (or JENKINS_URL)
    #[argh(option)]
    url: Option<String>,
    /// node name (or JENKINS_AGENT_NAME / JENKINS_NAME)
    #[argh(option)]
    name: Option<String>,
    /// node secret, or @FILE to read it from a file and keep it out of `ps` (or JENKINS_SECRET)
    #[argh(option)]
    secret: Option<String>,
    /// connect over WebSocket on the controller's HTTP(S) port (or JENKINS_WEB_SOCKET=true)
    #[argh(switch)]
    websocket: bool,
    /// connect over TCP straight to HOST:PORT, the controller's agent port (or JENKINS_DIRECT_CONNECTION)
    #[argh(option)]
    direct: Option<String>,
    /// directory for workspaces (or JENKINS_AGENT_WORKDIR; default: the current directory)
    #[argh(option)]
    work_dir: Option<PathBuf>,
    /// start from the node's descriptor, http(s)://HOST/computer/NAME/jenkins-agent.jnlp: it gives
    /// the URL, name, transport and work dir (fetched sealed with the secret; no API token needed)
    #[argh(option)]
    jnlp_url: Option<String>,
    /// most output bytes a step keeps in its spool while the controller is away, e.g. 512M or 2G
    /// (default 1G); then the step is paused until the controller is back
    #[argh(option, from_str_fn(parse_size))]
    spool_cap: Option<u64>,
    /// extra CA certificate(s) in PEM to trust for https:// controllers (besides the built-in
    /// webpki roots)
    #[argh(option)]
    cert: Option<PathBuf>,
    /// pin the controller's public key, sha256:HEX as `wisp node add` prints it (for its own
    /// self-signed identity) or the base64 public key Jenkins passes (or JENKINS_INSTANCE_IDENTITY);
    /// names and CAs are then not checked
    #[argh(option)]
    instance_identity: Option<String>,
    /// do not check the controller's certificate at all (unsafe; warns at every connect)
    #[argh(switch)]
    no_certificate_check: bool,
    /// reach the controller through this Kafka cluster instead: bootstrap brokers
    /// HOST:PORT[,HOST:PORT...], the first that answers is used (needs an agent built with the
    /// `kafka` feature; --url is then not needed)
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
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    /// SECRET NAME, as Kubernetes pod templates pass them
    #[argh(positional, greedy)]
    positional: Vec<String>,
}

/// The URL an agent that goes through Kafka is given: nothing is dialed there.
const KAFKA_URL: &str = "http://kafka.invalid/";

#[cfg(feature = "kafka")]
fn kafka_mode(
    brokers: &str,
    tls: bool,
    cert: Option<&std::path::Path>,
    [mechanism, user, password]: [Option<&str>; 3],
    name: &str,
) -> wisp::dial::KafkaMode {
    let client = format!("wisp-agent {name}");
    let cfg = wisp::kafka::Config::from_options(brokers, tls, cert, mechanism, user, password, &client)
        .unwrap_or_else(|e| fail(&e));
    wisp::dial::KafkaMode(std::sync::Arc::new(cfg))
}

#[cfg(not(feature = "kafka"))]
fn kafka_mode(
    _: &str,
    _: bool,
    _: Option<&std::path::Path>,
    _: [Option<&str>; 3],
    _: &str,
) -> std::convert::Infallible {
    fail("this wisp-agent was built without Kafka: build it with `--features kafka` (scripts/build-static.sh --kafka)")
}

/// A byte count with an optional K, M or G suffix (powers of 1024).
fn parse_size(v: &str) -> Result<u64, String> {
    let t = v.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("bad size {v:?}: use a number of bytes, optionally with K, M or G, e.g. 512M"))
}

/// Map Jenkins agent.jar's single-dash options onto ours.
fn jenkins_compat(arg: String) -> String {
    match arg.as_str() {
        "-url" => "--url".into(),
        "-name" => "--name".into(),
        "-secret" => "--secret".into(),
        "-webSocket" => "--websocket".into(),
        "-direct" => "--direct".into(),
        "-workDir" => "--work-dir".into(),
        "-cert" => "--cert".into(),
        "-instanceIdentity" => "--instance-identity".into(),
        "-noCertificateCheck" | "-disableHttpsCertValidation" => "--no-certificate-check".into(),
        "-jnlpUrl" => "--jnlp-url".into(),
        _ => arg,
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn fail(msg: &str) -> ! {
    eprintln!("wisp-agent: {msg}");
    std::process::exit(2);
}

/// Say why the agent ends (once) and exit with its code.
fn exit_with(e: AgentError) -> ! {
    log::error!("{e}");
    std::process::exit(e.exit_code());
}

/// Each running step holds a pipe, a pidfd and up to two spool files open: with up to 1024
/// executors the usual soft limit of 1024 descriptors is too few.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            log::debug!("could not raise the open-file limit from {soft} to {hard}");
        }
    }
}

/// `wisp-agent step-server ...`: serve steps in this container until stopped; never returns.
fn step_server(args: &[String]) -> ! {
    if let Err(e) = process::unblock_hangup() {
        fail(&format!("cannot set up signal handling: {e}"));
    }
    let opts = match agent::stepserver::parse_args(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{}", agent::stepserver::USAGE);
            std::process::exit(0);
        }
        Err(e) => fail(&e),
    };
    wisp::logger::init();
    std::process::exit(agent::stepserver::run(opts));
}

/// `wisp-agent install DEST`: copy this binary to DEST; never returns.
fn install(args: &[String]) -> ! {
    let _ = process::unblock_hangup();
    match args {
        [h] if h == "--help" || h == "-h" => {
            println!("{}", agent::stepserver::INSTALL_USAGE);
            std::process::exit(0);
        }
        [dest] => match agent::stepserver::install(std::path::Path::new(dest)) {
            Ok(path) => {
                println!("installed {}", path.display());
                std::process::exit(0);
            }
            Err(e) => fail(&e),
        },
        _ => fail("usage: wisp-agent install DEST (a file, or a directory to put wisp-agent in)"),
    }
}

fn main() {
    // First, while this is the only thread (threads started later inherit the mask): SIGTERM,
    // SIGINT, SIGHUP and SIGCHLD are blocked and read from signalfds.
    if let Err(e) = process::block_signals() {
        fail(&format!("cannot set up signal handling: {e}"));
    }
    let raw: Vec<String> = std::env::args().collect();
    match raw.get(1).map(String::as_str) {
        Some("step-server") => step_server(&raw[2..]),
        Some("install") => install(&raw[2..]),
        _ => {}
    }
    // Before an upgrade replaces the file (then the link reads "PATH (deleted)").
    let exe = agent::handover::own_exe();
    // What a previous agent handed over (and the variable gone before any step can see it).
    let handed = agent::handover::take_from_env();
    let argv: Vec<String> = raw.iter().cloned().map(jenkins_compat).collect();
    let strs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let args = match Args::from_args(&strs[..1], &strs[1..]) {
        Ok(a) => a,
        Err(e) => {
            if e.status.is_ok() {
                println!("{}", e.output);
                return;
            }
            eprintln!("{}", e.output);
            std::process::exit(2);
        }
    };
    if args.version {
        println!("wisp-agent {}", env!("WISP_VERSION"));
        return;
    }
    wisp::logger::init();
    let mut pos = args.positional.into_iter();
    let (pos_secret, pos_name) = (pos.next(), pos.next());
    if let Some(extra) = pos.next() {
        fail(&format!("unexpected argument {extra:?}: the positional form is `wisp-agent SECRET NAME`"));
    }
    let jnlp_url = args.jnlp_url;
    let jnlp_name = jnlp_url.as_deref().map(|u| agent::jnlp::split_url(u).unwrap_or_else(|e| fail(&e)));
    let name = args
        .name
        .or(pos_name)
        .or_else(|| env("JENKINS_AGENT_NAME"))
        .or_else(|| env("JENKINS_NAME"))
        .or_else(|| jnlp_name.as_ref().map(|(_, n)| n.clone()))
        .unwrap_or_else(|| fail("no node name: give --name NAME or set JENKINS_AGENT_NAME"));
    let secret = args.secret.or(pos_secret).or_else(|| env("JENKINS_SECRET"));
    let adopted = match handed {
        None => None,
        Some(Ok(state)) => Some(state),
        Some(Err(e)) => {
            log::error!("the previous agent's hand-over state is unusable: {e}; starting as a fresh agent");
            if secret.as_ref().is_none_or(|s| s.bytes().all(|b| b == b'*')) {
                fail(
                    "the previous agent's secret was on its command line or in its environment, where it \
                     is overwritten, and no usable hand-over state has it: start the agent again (prefer \
                     --secret @FILE)",
                );
            }
            None
        }
    };
    let (name, secret) = match (&adopted, secret) {
        // The node and secret the previous agent used (the secret is not on the command line, or
        // it is overwritten there).
        (Some((state, _)), _) => {
            if state.name != name {
                log::warn!(
                    "the command line names node '{name}' but the previous agent ran as '{}': staying that",
                    state.name
                );
            }
            (state.name.clone(), state.secret.clone())
        }
        (None, None) => fail("no secret: give --secret SECRET, --secret @FILE or set JENKINS_SECRET"),
        (None, Some(secret)) => match secret.strip_prefix('@') {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(s) => (name, s.trim().to_string()),
                Err(e) => fail(&format!("cannot read the secret from {path}: {e}")),
            },
            None => (name, secret),
        },
    };
    // What an upgrade executes: this command line, the secret overwritten as /proc shows it.
    let exec_argv: Vec<std::ffi::CString> = raw
        .iter()
        .map(|a| if *a == secret { "*".repeat(a.len()) } else { a.clone() })
        .filter_map(|a| std::ffi::CString::new(a).ok())
        .collect();
    let kafka = args.kafka.as_deref().map(|brokers| {
        let sasl = [args.kafka_sasl.as_deref(), args.kafka_user.as_deref(), args.kafka_password.as_deref()];
        kafka_mode(brokers, args.kafka_tls, args.kafka_cert.as_deref(), sasl, &name)
    });
    // Steps run as this user and may read /proc/PPID/cmdline and /proc/PPID/environ: the secret
    // must not stay there. Still the only thread here.
    match agent::scrub::scrub_secret(&secret) {
        Ok(n) => log::debug!("secret scrubbed from {n} place(s) of the command line and environment"),
        Err(e) => log::warn!(
            "could not scrub the secret from this process's command line and environment ({e}): \
             steps may read it from /proc/{}/; prefer --secret @FILE",
            std::process::id()
        ),
    }
    raise_open_file_limit();
    let signals = process::TermSignals::open().unwrap_or_else(|e| fail(&format!("signals: {e}")));
    let hangups = process::Hangups::open().unwrap_or_else(|e| fail(&format!("signals: {e}")));
    let mut shutdown = Shutdown::new(async move {
        let sig = signals.next().await;
        log::info!("{sig} received: stopping");
    });
    let pin = |fp: &str| agent::parse_instance_identity(fp).unwrap_or_else(|e| fail(&e));
    let identity = args.instance_identity.or_else(|| env("JENKINS_INSTANCE_IDENTITY"));
    let mut trust = wisp::tls::Trust {
        ca_file: args.cert,
        pin: identity.as_deref().map(pin),
        insecure: args.no_certificate_check,
    };
    // A descriptor fills in what the command line and the environment leave open.
    let desc = match jnlp_url
        .as_deref()
        .map(|u| agent::fetch_descriptor(u, &name, &secret, &trust, &mut shutdown))
    {
        None => None,
        Some(Ok(Some(d))) => Some(d),
        Some(Ok(None)) => {
            log::info!("agent stopped");
            return;
        }
        Some(Err(e)) => exit_with(e),
    };
    let url = args
        .url
        .or_else(|| kafka.is_some().then(|| KAFKA_URL.to_string()))
        .or_else(|| env("JENKINS_URL"))
        .or_else(|| desc.as_ref().and_then(|d| d.url.clone()))
        .or_else(|| jnlp_name.map(|(base, _)| base))
        .unwrap_or_else(|| fail("no controller URL: give --url http://HOST:8080/ or set JENKINS_URL"));
    let explicit = args.websocket || args.direct.is_some();
    let websocket = args.websocket
        || env("JENKINS_WEB_SOCKET").is_some_and(|v| v == "true")
        || (!explicit && desc.as_ref().is_some_and(|d| d.websocket));
    let direct = args.direct.or_else(|| env("JENKINS_DIRECT_CONNECTION")).or_else(|| {
        if websocket {
            None
        } else {
            desc.as_ref().and_then(|d| d.direct.clone())
        }
    });
    let mode = match (websocket, direct) {
        _ if kafka.is_some() && explicit => fail("choose one of --kafka, --websocket and --direct"),
        #[cfg(feature = "kafka")]
        _ if kafka.is_some() => Mode::Kafka(kafka.expect("checked")),
        (true, Some(_)) => fail("choose one of --websocket and --direct"),
        (true, None) => Mode::WebSocket,
        (false, Some(addr)) => Mode::Direct(addr),
        (false, None) => Mode::Discover,
    };
    let work_dir = args
        .work_dir
        .or_else(|| env("JENKINS_AGENT_WORKDIR").map(PathBuf::from))
        .or_else(|| desc.as_ref().and_then(|d| d.work_dir.as_ref()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    if trust.pin.is_none() {
        trust.pin = desc.as_ref().and_then(|d| d.instance_identity.as_deref()).map(pin);
    }
    let spool_cap = args.spool_cap.unwrap_or(agent::DEFAULT_SPOOL_CAP);
    let cfg = agent::Config { url, name, secret, mode, work_dir, trust, spool_cap };
    let upgrade = agent::Upgrade { exe, argv: exec_argv, requests: hangups, adopted };
    if let Err(e) = agent::run_upgradable(cfg, shutdown, Some(upgrade)) {
        exit_with(e);
    }
}
