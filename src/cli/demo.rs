//! `wisp demo`: a controller, a local agent and a sample build in one process. The terminal gets
//! a short header and the build's log; the controller's and the agent's log lines go to files in
//! the data dir, which the header names.

use super::client::{Client, Remote};
use super::{die, exit_code, follow, submit, Created};
use crate::controller::store::NodeRecord;
use crate::controller::{start, ServeConfig};
use argh::FromArgs;
use std::io::Write;
use std::path::PathBuf;

/// The pipeline the demo runs unless given another.
const SAMPLE: &str = include_str!("../../examples/hello.yaml");

/// The node the demo's agent serves.
const NODE: &str = "local";

/// start a controller, a local agent and a sample build in one process, and print the build's log
#[derive(FromArgs)]
#[argh(subcommand, name = "demo")]
pub(super) struct Demo {
    /// data directory (default ./wisp-data); the controller's and the agent's log lines go to
    /// controller.log and agent.log in it
    #[argh(option, default = "PathBuf::from(\"wisp-data\")")]
    data: PathBuf,
    /// pipeline to run instead of the built-in sample (examples/hello.yaml)
    #[argh(option)]
    pipeline: Option<PathBuf>,
}

pub(super) fn run(d: Demo) -> i32 {
    let yaml = match &d.pipeline {
        Some(p) => {
            std::fs::read_to_string(p).unwrap_or_else(|e| die(format!("cannot read {}: {e}", p.display())))
        }
        None => SAMPLE.to_string(),
    };
    let created = Created::before(&d.data);
    let fail = |e: String| -> ! {
        created.undo();
        die(e)
    };
    let (controller_log, agent_log) = (d.data.join("controller.log"), d.data.join("agent.log"));
    let open = |p: &PathBuf| {
        std::fs::create_dir_all(&d.data)
            .and_then(|_| std::fs::OpenOptions::new().create(true).append(true).open(p))
            .unwrap_or_else(|e| fail(format!("cannot write {}: {e}", p.display())))
    };
    crate::logger::init_files(open(&controller_log), open(&agent_log));
    let cfg = ServeConfig {
        data: d.data.clone(),
        bind: [127, 0, 0, 1].into(),
        http_port: 0,
        agent_port: 0,
        ..ServeConfig::default()
    };
    let ctl = start(cfg).unwrap_or_else(|e| fail(e));
    let (http, _) = *ctl.addrs.get().expect("listening");
    let url = format!("https://{http}/");
    // The local agent pins the controller's own identity, as `wisp node add` tells agents to.
    let pin = std::fs::read_to_string(d.data.join("fingerprint"))
        .ok()
        .and_then(|f| crate::tls::parse_fingerprint(&f).ok());
    if ctl.node(NODE).is_none() {
        let rec = NodeRecord {
            name: NODE.into(),
            labels: vec![NODE.into(), std::env::consts::OS.into(), std::env::consts::ARCH.into()],
            executors: 2,
            websocket: true,
            work_dir: String::new(),
            origin: crate::controller::cloud::STATIC.into(),
        };
        smol::block_on(ctl.add_node(rec)).unwrap_or_else(|e| die(e.message));
    }
    let work_dir = d.data.join("agent");
    let agent_cfg = crate::agent::Config {
        url: url.clone(),
        name: NODE.into(),
        secret: ctl.secret(NODE),
        mode: crate::agent::Mode::WebSocket,
        work_dir: work_dir.clone(),
        trust: crate::tls::Trust { pin, ..Default::default() },
        spool_cap: crate::agent::DEFAULT_SPOOL_CAP,
    };
    std::thread::spawn(move || {
        if let Err(e) = crate::agent::run(agent_cfg, crate::agent::Shutdown::never()) {
            eprintln!("wisp: local agent: {e}");
        }
    });
    let remote = Remote { data: Some(d.data.clone()), ..Remote::default() };
    let client = Client::new(&remote).unwrap_or_else(|e| die(e));
    let code = smol::block_on(async {
        let id = submit(&client, &yaml, d.pipeline.as_deref().unwrap_or("examples/hello.yaml".as_ref()), "")
            .await?;
        eprintln!(
            "wisp demo: controller at {url} (data in {}), agent {NODE:?} (work dir {}), build #{id}\n\
             wisp demo: log lines in {} and {}; the build's log follows\n",
            d.data.display(),
            work_dir.display(),
            controller_log.display(),
            agent_log.display(),
        );
        follow(&client, id).await
    })
    .map(exit_code)
    .unwrap_or_else(|e| die(e));
    let _ = std::io::stdout().flush();
    code
}
