//! The Kubernetes backend of pod clouds: pods created, deleted, listed and watched through the API
//! server with kube-rs. Every call is bounded in time (a hung API server never hangs the
//! controller) and runs inside `async_compat::Compat`, because kube needs a tokio reactor and the
//! controller runs on smol.

use super::backend::{
    BackendFuture, ContainerState, Diagnosis, Phase, PodBackend, PodEvent, PodInfo, Selector,
};
use crate::controller::template::CloudSpec;
use crate::text::truncate;
use async_compat::Compat;
use futures_rustls::pki_types::{pem::PemObject, CertificateDer};
use k8s_openapi::api::core::v1::{ContainerStatus, Event as KubeEvent, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams, PropagationPolicy};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Config};
use smol::stream::StreamExt;
use smol::Timer;
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest one API call may take before it fails: a hung API server must not hang the cloud.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A watch that reports nothing for this long starts again with a fresh list, so a stream that
/// went dead without an error (a proxy that stopped forwarding) costs at most this much.
pub const WATCH_SILENCE: Duration = Duration::from_secs(300);
/// Backoff after a failed watch, doubling up to [`BACKOFF_MAX`]; reset after a run of the watch
/// that lasted at least that long (a server that lists but fails every watch is not hammered).
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest pause between two tries of a failing watch.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Longest connect to the API server (within [`CALL_TIMEOUT`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a container's log one diagnosis reads (its tail is what matters).
const MAX_LOG_BYTES: i64 = 64 * 1024;
/// Most events one diagnosis keeps (the newest).
const MAX_EVENTS: usize = 20;
/// Longest line of a diagnosis or of an API server's message quoted in an error.
const MAX_LINE: usize = 512;
/// Largest token file or PEM certificate read.
const MAX_CREDENTIAL_BYTES: u64 = 64 * 1024;

/// Where the API server is and how to talk to it: the Kubernetes fields of a cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSpec {
    /// API server URL; when set, no kubeconfig is read. `server_certificate`, `token`,
    /// `namespace` and `skip_tls_verify` apply to whichever source is used.
    pub server_url: Option<String>,
    /// The API server's CA certificate(s), PEM text.
    pub server_certificate: Option<String>,
    /// A bearer token, or `@FILE` to read one from FILE: a file that holds the token alone is read
    /// again as it changes (service account tokens rotate); one with a trailing newline or other
    /// space around the token is read once and trimmed.
    pub token: Option<String>,
    /// kubeconfig path; else `KUBECONFIG`, else `~/.kube/config`, else the in-cluster account.
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context; else its current context.
    pub context: Option<String>,
    /// Namespace of the pods; else the kubeconfig context's, else `default`.
    pub namespace: Option<String>,
    /// Skip the API server's certificate check.
    pub skip_tls_verify: bool,
    /// Longest one call may take ([`CALL_TIMEOUT`]).
    pub call_timeout: Duration,
    /// A watch silent this long lists again ([`WATCH_SILENCE`]).
    pub watch_silence: Duration,
}

impl Default for ConnectSpec {
    fn default() -> Self {
        Self {
            server_url: None,
            server_certificate: None,
            token: None,
            kubeconfig: None,
            context: None,
            namespace: None,
            skip_tls_verify: false,
            call_timeout: CALL_TIMEOUT,
            watch_silence: WATCH_SILENCE,
        }
    }
}

impl From<&CloudSpec> for ConnectSpec {
    fn from(c: &CloudSpec) -> Self {
        let some = |s: &Option<String>| s.clone().filter(|s| !s.trim().is_empty());
        Self {
            server_url: some(&c.server_url),
            server_certificate: some(&c.server_certificate),
            token: some(&c.credentials_token),
            kubeconfig: some(&c.kubeconfig).map(PathBuf::from),
            context: some(&c.context),
            namespace: some(&c.namespace),
            skip_tls_verify: c.skip_tls_verify,
            ..Self::default()
        }
    }
}

/// A cloud's pods in one namespace of one Kubernetes cluster.
pub struct Kubernetes {
    client: Client,
    namespace: String,
    server: String,
    call_timeout: Duration,
    watch_silence: Duration,
}

impl Kubernetes {
    /// Connects to the API server `spec` names. Credentials come from, in this order: the URL
    /// with its certificate and token; a kubeconfig (the given path, `KUBECONFIG`,
    /// `~/.kube/config`) and its context; the in-cluster service account. Nothing is sent yet: a
    /// server that is down shows in the first call.
    pub async fn connect(spec: &ConnectSpec) -> Result<Self, String> {
        Compat::new(Self::connect_inner(spec)).await
    }

    async fn connect_inner(spec: &ConnectSpec) -> Result<Self, String> {
        let mut config = match &spec.server_url {
            Some(url) => {
                let uri = url.trim().parse::<hyper::Uri>().map_err(|e| {
                    format!("serverUrl {url:?} is not a URL ({e}): give it as https://HOST:PORT")
                })?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(format!(
                        "serverUrl {url:?} is not an http(s) URL: give it as https://HOST:PORT"
                    ));
                }
                Config::new(uri)
            }
            None => from_kubeconfig_or_cluster(spec).await?,
        };
        if let Some(pem) = &spec.server_certificate {
            config.root_cert = Some(certificates(pem)?);
        }
        if let Some(token) = &spec.token {
            config.auth_info.token_file = None;
            config.auth_info.token = None;
            if let Some(file) = token.strip_prefix('@') {
                let text = read_bounded(Path::new(file), "credentialsToken file")?;
                if text.trim() == text {
                    // kube reads the file again as it changes: a service account token rotates.
                    config.auth_info.token_file = Some(file.to_string());
                } else {
                    config.auth_info.token = Some(text.trim().to_string().into());
                }
            } else {
                config.auth_info.token = Some(token.trim().to_string().into());
            }
        }
        if spec.skip_tls_verify {
            config.accept_invalid_certs = true;
        }
        if let Some(ns) = &spec.namespace {
            config.default_namespace = ns.clone();
        }
        let namespace = config.default_namespace.clone();
        check_name("namespace", &namespace)?;
        config.connect_timeout = Some(CONNECT_TIMEOUT.min(spec.call_timeout));
        // Calls are bounded here by `call_timeout`; a read timeout would also cut quiet watches.
        config.read_timeout = None;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config)
            .map_err(|e| format!("cannot set up a Kubernetes client for {server}: {}", chain(&e)))?;
        Ok(Self {
            client,
            namespace,
            server,
            call_timeout: spec.call_timeout,
            watch_silence: spec.watch_silence,
        })
    }

    /// The namespace its pods go into.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The API server's URL, for messages.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// `fut`, or a sentence about `what` when it takes longer than the call timeout.
    async fn timed<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, String> {
        let limit = self.call_timeout;
        smol::future::or(async { Ok(fut.await) }, async {
            Timer::after(limit).await;
            Err(format!(
                "{what}: the Kubernetes API at {} did not answer within {} s; check that it is up and reachable",
                self.server,
                limit.as_secs_f32()
            ))
        })
        .await
    }

    /// `fut`, failing with a sentence about `what` if it errs or takes too long.
    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, String> {
        self.timed(what, fut).await?.map_err(|e| self.describe(what, &e))
    }

    /// One sentence for a failed call: what was done, what the server or the link said, and
    /// what to check.
    fn describe(&self, what: &str, e: &kube::Error) -> String {
        let ns = &self.namespace;
        match e {
            kube::Error::Api(s) => {
                let said = truncate(s.message.trim(), MAX_LINE);
                let hint = match s.code {
                    401 => "; check the cloud's credentials (token, kubeconfig user)".to_string(),
                    403 => format!("; give the account the right to manage pods in namespace {ns}"),
                    404 if what.starts_with("creating") => format!("; check that namespace {ns} exists"),
                    409 => {
                        "; a pod of that name exists already (delete it, or let the cloud pick another name)"
                            .to_string()
                    }
                    422 | 400 => "; the pod manifest is not valid for this cluster".to_string(),
                    _ => String::new(),
                };
                let reason = truncate(s.reason.trim(), 64);
                format!("{what}: the Kubernetes API answered {} {reason}: {said}{hint}", s.code)
            }
            _ => {
                let why = chain(e);
                let hint = if why.contains("certificate") || why.contains("Certificate") {
                    "; give the API server's CA as serverCertificate (or in the kubeconfig), or set skipTlsVerify"
                } else if why.contains("token") {
                    "; check credentialsToken (or the kubeconfig user's token)"
                } else {
                    "; check serverUrl (or the kubeconfig's server) and that the API server is up"
                };
                format!("{what}: cannot reach the Kubernetes API at {}: {why}{hint}", self.server)
            }
        }
    }

    /// One run of a watch: its list, then changes until an error or a silence.
    async fn watch_once(
        &self,
        labels: &str,
        selector: &Selector,
        on: &mut (dyn FnMut(PodEvent) + Send + '_),
    ) -> WatchEnd {
        let config = watcher::Config::default().labels(labels);
        let mut stream = std::pin::pin!(watcher(self.pods(), config));
        let mut init: Vec<PodInfo> = Vec::new();
        let mut in_list = true;
        loop {
            let limit = if in_list { self.call_timeout } else { self.watch_silence };
            let next = smol::future::or(async { Some(stream.next().await) }, async {
                Timer::after(limit).await;
                None
            })
            .await;
            let event = match next {
                None if in_list => {
                    return WatchEnd::Failed(format!(
                        "the Kubernetes API at {} did not list the pods within {} s",
                        self.server,
                        limit.as_secs_f32()
                    ))
                }
                None => return WatchEnd::Silent,
                Some(None) => return WatchEnd::Failed("the watch stream ended".into()),
                Some(Some(Err(e))) => return WatchEnd::Failed(self.describe_watch(&e)),
                Some(Some(Ok(event))) => event,
            };
            match event {
                watcher::Event::Init => {
                    init.clear();
                    in_list = true;
                }
                watcher::Event::InitApply(pod) => {
                    if matches(selector, &pod) {
                        init.push(pod_info(&pod));
                    }
                }
                watcher::Event::InitDone => {
                    in_list = false;
                    on(PodEvent::Listed(std::mem::take(&mut init)));
                }
                watcher::Event::Apply(pod) => {
                    if matches(selector, &pod) {
                        on(PodEvent::Changed(pod_info(&pod)));
                    }
                }
                watcher::Event::Delete(pod) => {
                    if matches(selector, &pod) {
                        let info = pod_info(&pod);
                        on(PodEvent::Deleted { name: info.name, labels: info.labels });
                    }
                }
            }
        }
    }

    fn describe_watch(&self, e: &watcher::Error) -> String {
        match e {
            watcher::Error::InitialListFailed(e) => self.describe("listing pods", e),
            watcher::Error::WatchStartFailed(e) => self.describe("starting a watch", e),
            watcher::Error::WatchFailed(e) => self.describe("watching pods", e),
            watcher::Error::WatchError(s) => self.describe("watching pods", &kube::Error::Api(s.clone())),
            watcher::Error::NoResourceVersion => format!(
                "the Kubernetes API at {} sent a pod without metadata.resourceVersion; it cannot be watched",
                self.server
            ),
        }
    }

    async fn diagnose_inner(&self, name: &str, container: &str, lines: usize) -> Diagnosis {
        let mut d = Diagnosis::default();
        let events: Api<KubeEvent> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = ListParams::default().fields(&format!("involvedObject.name={name}"));
        match self.bounded(&format!("reading the events of pod {name}"), events.list(&params)).await {
            Ok(list) => d.events = event_lines(name, list.items),
            Err(e) => log::debug!("kubernetes: {e}"),
        }
        if lines > 0 {
            let params = LogParams {
                container: Some(container.to_string()),
                tail_lines: Some(lines.min(i64::MAX as usize) as i64),
                limit_bytes: Some(MAX_LOG_BYTES),
                ..LogParams::default()
            };
            let what = format!("reading the log of container {container} of pod {name}");
            match self.bounded(&what, self.pods().logs(name, &params)).await {
                Ok(text) => d.log_tail = tail(&text, lines),
                Err(e) => log::debug!("kubernetes: {e}"),
            }
        }
        d
    }
}

/// How one run of a watch ended.
enum WatchEnd {
    /// Nothing came for the silence limit: list again at once.
    Silent,
    /// An error: log it, back off, list again.
    Failed(String),
}

impl PodBackend for Kubernetes {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn create<'a>(&'a self, pod: &'a Pod) -> BackendFuture<'a, Result<(), String>> {
        Box::pin(Compat::new(async move {
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            check_name("pod name", name)?;
            let what = format!("creating pod {name} in namespace {}", self.namespace);
            self.bounded(&what, self.pods().create(&PostParams::default(), pod)).await.map(drop)
        }))
    }

    fn delete<'a>(&'a self, name: &'a str) -> BackendFuture<'a, Result<(), String>> {
        Box::pin(Compat::new(async move {
            check_name("pod name", name)?;
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            };
            let what = format!("deleting pod {name} in namespace {}", self.namespace);
            match self.timed(&what, self.pods().delete(name, &params)).await? {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                Err(e) => Err(self.describe(&what, &e)),
            }
        }))
    }

    fn list<'a>(&'a self, selector: &'a Selector) -> BackendFuture<'a, Result<Vec<PodInfo>, String>> {
        Box::pin(Compat::new(async move {
            let labels = selector_text(selector)?;
            let what = format!("listing pods {labels} in namespace {}", self.namespace);
            let list = self.bounded(&what, self.pods().list(&ListParams::default().labels(&labels))).await?;
            // A server that ignores the selector must not hand us other pods.
            Ok(list.items.iter().filter(|p| matches(selector, p)).map(pod_info).collect())
        }))
    }

    fn watch<'a>(
        &'a self,
        selector: &'a Selector,
        mut on: Box<dyn FnMut(PodEvent) + Send + 'a>,
    ) -> BackendFuture<'a, ()> {
        Box::pin(Compat::new(async move {
            let labels = match selector_text(selector) {
                Ok(l) => l,
                Err(e) => {
                    log::error!("kubernetes: cannot watch pods: {e}");
                    return smol::future::pending().await;
                }
            };
            let mut backoff = BACKOFF_MIN;
            loop {
                let started = Instant::now();
                let end = self.watch_once(&labels, selector, &mut *on).await;
                if started.elapsed() >= BACKOFF_MAX {
                    backoff = BACKOFF_MIN;
                }
                match end {
                    WatchEnd::Silent => {
                        log::debug!(
                            "kubernetes: no change to pods {labels} for {} s; listing them again",
                            self.watch_silence.as_secs()
                        );
                    }
                    WatchEnd::Failed(why) => {
                        log::warn!(
                            "kubernetes: watching pods {labels} in namespace {}: {why}; listing again in {} s",
                            self.namespace,
                            backoff.as_secs_f32()
                        );
                        Timer::after(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }))
    }

    fn diagnose<'a>(
        &'a self,
        name: &'a str,
        container: &'a str,
        lines: usize,
    ) -> BackendFuture<'a, Diagnosis> {
        Box::pin(Compat::new(self.diagnose_inner(name, container, lines)))
    }
}

/// The config of a kubeconfig (the given path, `KUBECONFIG`, `~/.kube/config`), else of the
/// in-cluster service account.
async fn from_kubeconfig_or_cluster(spec: &ConnectSpec) -> Result<Config, String> {
    let options = KubeConfigOptions { context: spec.context.clone(), ..KubeConfigOptions::default() };
    let (kubeconfig, source) = if let Some(path) = &spec.kubeconfig {
        let path = home_relative(path);
        let kc = Kubeconfig::read_from(&path).map_err(|e| {
            format!(
                "cannot read the kubeconfig {}: {}; fix the cloud's kubeconfig",
                path.display(),
                chain(&e)
            )
        })?;
        (kc, format!("kubeconfig {}", path.display()))
    } else if let Some(kc) = Kubeconfig::from_env().map_err(|e| {
        format!("cannot read the kubeconfig that KUBECONFIG names: {}; fix or unset KUBECONFIG", chain(&e))
    })? {
        let var = std::env::var("KUBECONFIG").unwrap_or_default();
        (kc, format!("kubeconfig {var} (KUBECONFIG)"))
    } else if let Some(path) =
        std::env::var_os("HOME").map(|h| Path::new(&h).join(".kube/config")).filter(|p| p.exists())
    {
        let kc = Kubeconfig::read_from(&path).map_err(|e| {
            format!(
                "cannot read the kubeconfig {}: {}; fix it, or give the cloud a serverUrl or a kubeconfig",
                path.display(),
                chain(&e)
            )
        })?;
        (kc, format!("kubeconfig {}", path.display()))
    } else {
        return Config::incluster().map_err(|e| {
            format!(
                "no Kubernetes credentials: the cloud has no serverUrl and no kubeconfig, KUBECONFIG is unset, \
                 ~/.kube/config does not exist, and the in-cluster service account is not usable ({}); \
                 give the cloud a serverUrl (with credentialsToken and serverCertificate) or a kubeconfig",
                chain(&e)
            )
        });
    };
    Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|e| {
        let context = spec.context.as_deref().map(|c| format!(" (context {c})")).unwrap_or_default();
        format!("cannot use the {source}{context}: {}; fix it or name another context", chain(&e))
    })
}

/// `~/x` under `$HOME`; any other path as it is.
fn home_relative(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => Path::new(&home).join(rest),
        _ => path.to_path_buf(),
    }
}

/// The DER certificates of PEM text.
fn certificates(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    if pem.len() as u64 > MAX_CREDENTIAL_BYTES {
        return Err(format!(
            "serverCertificate is longer than {MAX_CREDENTIAL_BYTES} bytes; give the CA certificate only"
        ));
    }
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("serverCertificate is not PEM text ({e}); give the CA certificate as -----BEGIN CERTIFICATE----- ..."))?;
    if certs.is_empty() {
        return Err("serverCertificate holds no certificate; give the CA certificate as -----BEGIN CERTIFICATE----- ...".into());
    }
    Ok(certs)
}

/// The text of `path`, a non-empty file of at most [`MAX_CREDENTIAL_BYTES`].
fn read_bounded(path: &Path, what: &str) -> Result<String, String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CREDENTIAL_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_CREDENTIAL_BYTES {
        return Err(format!(
            "the {what} {} is longer than {MAX_CREDENTIAL_BYTES} bytes; is it the token?",
            path.display()
        ));
    }
    if text.trim().is_empty() {
        return Err(format!("the {what} {} is empty; put the bearer token in it", path.display()));
    }
    Ok(text)
}

/// A DNS label or subdomain as Kubernetes names pods and namespaces: at most 253 bytes of
/// `a-z`, `0-9`, `-` and `.`, starting and ending with a letter or digit. Checked before a name
/// goes into a URL path.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.len() <= 253
        && name.chars().all(ok_char)
        && edge(name.chars().next())
        && edge(name.chars().last())
    {
        Ok(())
    } else {
        Err(format!(
            "{what} {:?} is not a Kubernetes name (lower-case letters, digits, '-' and '.', at most 253)",
            truncate(name, 80)
        ))
    }
}

/// A label selector's text (`a=b,c=d`), after checking that no key or value could change its
/// meaning (Kubernetes label syntax: letters, digits, `-`, `_`, `.`, and one `/` in a key).
fn selector_text(selector: &Selector) -> Result<String, String> {
    let ok = |s: &str, key: bool| {
        s.len() <= 316
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || (key && c == '/'))
            && (!key || (!s.is_empty() && s.matches('/').count() <= 1))
    };
    let mut parts = Vec::with_capacity(selector.len());
    for (k, v) in selector {
        if !ok(k, true) || !ok(v, false) {
            return Err(format!(
                "the label {}={} cannot be selected on (labels are letters, digits, '-', '_' and '.')",
                truncate(k, 80),
                truncate(v, 80)
            ));
        }
        parts.push(format!("{k}={v}"));
    }
    Ok(parts.join(","))
}

/// Whether `pod`'s labels hold every pair of `selector`.
fn matches(selector: &Selector, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// What a pod's manifest and status tell (a pod without a status, just created, is `Pending`).
fn pod_info(pod: &Pod) -> PodInfo {
    let status = pod.status.as_ref();
    let phase = match status.and_then(|s| s.phase.as_deref()) {
        None | Some("Pending") => Phase::Pending,
        Some("Running") => Phase::Running,
        Some("Succeeded") => Phase::Succeeded,
        Some("Failed") => Phase::Failed,
        Some(_) => Phase::Unknown,
    };
    let text = |s: Option<&String>| truncate(s.map(String::as_str).unwrap_or_default(), MAX_LINE).to_string();
    let mut containers = Vec::new();
    if let Some(s) = status {
        let init = s.init_container_statuses.iter().flatten();
        for c in init.chain(s.container_statuses.iter().flatten()) {
            containers.push((c.name.clone(), container_state(c)));
        }
    }
    PodInfo {
        name: pod.metadata.name.clone().unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        phase,
        reason: text(status.and_then(|s| s.reason.as_ref())),
        message: text(status.and_then(|s| s.message.as_ref())),
        containers,
    }
}

/// A container's state; one that reports none yet is waiting, with no reason.
fn container_state(c: &ContainerStatus) -> ContainerState {
    let text = |s: &Option<String>| truncate(s.as_deref().unwrap_or_default(), MAX_LINE).to_string();
    let state = c.state.as_ref();
    if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
        ContainerState::Terminated {
            exit_code: t.exit_code,
            reason: text(&t.reason),
            message: text(&t.message),
        }
    } else if state.and_then(|s| s.running.as_ref()).is_some() {
        ContainerState::Running
    } else {
        let w = state.and_then(|s| s.waiting.as_ref());
        ContainerState::Waiting {
            reason: w.map(|w| text(&w.reason)).unwrap_or_default(),
            message: w.map(|w| text(&w.message)).unwrap_or_default(),
        }
    }
}

/// The events about pod `name`, oldest first, one line each (`Failed: message`, with a count
/// when it repeated), the newest [`MAX_EVENTS`] only.
fn event_lines(name: &str, mut events: Vec<KubeEvent>) -> Vec<String> {
    // The field selector asked for these; a server that ignores it sends others too.
    events.retain(|e| e.involved_object.name.as_deref() == Some(name));
    events.sort_by_key(|e| {
        let when = e.last_timestamp.clone().or_else(|| e.first_timestamp.clone()).map(|t| t.0);
        (
            when.or_else(|| e.event_time.as_ref().map(|t| t.0)),
            e.metadata.creation_timestamp.clone().map(|t| t.0),
        )
    });
    let skip = events.len().saturating_sub(MAX_EVENTS);
    events
        .iter()
        .skip(skip)
        .map(|e| {
            let reason = e.reason.as_deref().unwrap_or("Event");
            let message = e.message.as_deref().unwrap_or_default().trim();
            let times = match e.count {
                Some(n) if n > 1 => format!(" ({n} times)"),
                _ => String::new(),
            };
            let line = format!("{reason}: {message}{times}");
            truncate(&line, MAX_LINE).to_string()
        })
        .collect()
}

/// The last `lines` lines of `text`, each cut to [`MAX_LINE`].
fn tail(text: &str, lines: usize) -> Vec<String> {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|l| truncate(l, MAX_LINE).to_string()).collect()
}

/// An error and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    truncate(&out, 2 * MAX_LINE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_change_a_url_are_refused() {
        assert!(check_name("pod name", "agent-x1.b").is_ok());
        for bad in ["", "-a", "a-", "A", "a/b", "..", "a?b", "a b", &"a".repeat(254)] {
            assert!(check_name("pod name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn selectors_are_checked_and_joined() {
        let sel: Selector = [("jenkins", "slave"), ("wisp.dev/cloud", "k8s_1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(selector_text(&sel).unwrap(), "jenkins=slave,wisp.dev/cloud=k8s_1");
        assert_eq!(selector_text(&Selector::new()).unwrap(), "");
        for (k, v) in [("a", "b,c=d"), ("a=b", "c"), ("", "x"), ("a/b/c", "x"), ("a", "x y"), ("a", "b!")] {
            let sel: Selector = [(k.to_string(), v.to_string())].into();
            assert!(selector_text(&sel).is_err(), "{k}={v}");
        }
    }

    #[test]
    fn a_pod_without_status_is_pending_and_an_unknown_phase_is_unknown() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "labels": { "a": "b" } }
        }))
        .unwrap();
        let info = pod_info(&pod);
        assert_eq!((info.phase, info.containers.len()), (Phase::Pending, 0));
        pod.status = Some(serde_json::from_value(serde_json::json!({ "phase": "Weird" })).unwrap());
        assert_eq!(pod_info(&pod).phase, Phase::Unknown);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), ["b", "c"]);
        assert_eq!(tail("a\nb", 5), ["a", "b"]);
        assert!(tail("", 3).is_empty());
        assert_eq!(tail(&"x".repeat(2 * MAX_LINE), 1)[0].len(), MAX_LINE);
    }
}
