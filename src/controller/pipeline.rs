//! Pipelines: the YAML a user submits, checked field by field and turned into the steps to dispatch.
//!
//! ```yaml
//! name: hello                  # [A-Za-z0-9._-], 1 to 64 characters
//! agent: {label: "linux && x86_64"}   # optional; see `labels::parse`
//! # agent: {kubernetes: {containers: [{name: build, image: maven}]}}  # an inline pod template,
//! #   fields as in a cloud's template (`template`), `name` optional
//! env: {GREETING: hi}          # optional; numbers and booleans are kept as written
//! steps:                       # 1 to 256
//!   - sh: echo "$GREETING"     # the script, run as `SHELL -c SCRIPT`
//!     name: say hi             # default: the script's first line
//!     timeout: 5m              # seconds, or "30s", "5m", "1h30m", "2d"; at most 7 days
//!     env: {A: "1"}            # merged over the pipeline's env
//!     dir: sub/dir             # relative to the workspace
//!     shell: /bin/bash         # default /bin/sh
//!     container: build         # run in the pod's `build` container (see below)
//! ```
//!
//! `container: NAME` runs the step in a sibling container of the agent's pod instead of in the
//! agent's own: NAME is a container name (a DNS-1123 label: lowercase letters, digits and `-`, not
//! starting or ending with `-`, at most 63 characters), and `jnlp`, the agent's own container, means
//! the agent itself. A step without it runs where the pipeline's default container says (a pod
//! template's `defaultContainer`), else in the agent. The container runs the agent's step server
//! (`wisp-agent step-server --socket /wisp/NAME.sock`) on a volume it shares with the agent; the
//! step then behaves as an `sh` step in the agent does (process group, timeout, cancel, exit code,
//! output byte for byte) and runs in the same workspace directory, which the pod mounts at the
//! same path in every container. An agent too old to forward steps fails such a step with a
//! message saying so.
//!
//! `stages:` (in place of `steps:`), `parallel`, `matrix`, `post`, `retry`, `when`,
//! `parameters` and the `stash`, `unstash` and `archive` steps are described in [`stages`]; a
//! parsed pipeline is made concrete for one build (parameters given, cells expanded, steps
//! numbered) by [`plan`].
//!
//! Parsing goes through hand-written serde visitors rather than derived structs so that every
//! check runs while serde_yaml_ng still knows where it is: errors then carry the field's path and
//! its line and column, and unknown or repeated fields are refused with the fields that exist.
//!
//! Memory stays bounded even though YAML aliases let 1 MiB of input name the same text many
//! times: every string is checked against its limit as it is read, each env map stops once it
//! could no longer fit a protocol frame, and a parsed pipeline holds at most 256 steps of one
//! frame (64 KiB) each. Time stays linear in the input: nesting deeper than [`MAX_NESTING`] is
//! refused by a scan ([`depth`]) before serde_yaml_ng, whose time grows with the square of the
//! depth, sees the text.

pub(crate) mod depth;
pub mod plan;
pub mod stages;

pub use plan::{Kind, Plan, Planned};
pub use stages::{Parameter, Selection, Stage};

use super::labels::{self, LabelExpr};
use super::template::PodTemplate;
use crate::proto::MAX_FRAME;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use stages::{StepKind, StepSpec};
use std::collections::BTreeMap;
use std::fmt;

/// Largest pipeline YAML accepted, in bytes; larger input is refused before it is parsed.
pub const MAX_YAML: usize = 1024 * 1024;
/// Deepest nesting accepted, counting `[ ]`, `{ }` and indented block levels together. A pipeline
/// needs 4 (pipeline, steps, step, env); past this the text is refused before it is parsed, which
/// keeps the parse linear (64 levels cost libyaml 1 ms on 1 MiB, 64 Ki levels 4 s).
pub const MAX_NESTING: usize = 32;
/// Longest pipeline name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Most steps in one pipeline.
pub const MAX_STEPS: usize = 256;
/// Largest step script, in bytes.
pub const MAX_SCRIPT: usize = 60_000;
/// Most environment variables in one env map, and in a step's merged environment.
pub const MAX_ENV_VARS: usize = 128;
/// Longest step timeout, in seconds (7 days).
pub const MAX_TIMEOUT_SECS: u32 = 7 * 24 * 60 * 60;
/// Shell a step runs with when it names none.
pub const DEFAULT_SHELL: &str = "/bin/sh";
/// Longest explicit step name, in characters.
pub const MAX_STEP_NAME: usize = 100;
/// Length a default step name (the script's first line) is cut to, in characters.
const DEFAULT_NAME_CHARS: usize = 60;
/// Longest path component, in bytes (the usual file system limit).
const MAX_COMPONENT: usize = 255;
/// Longest `dir` or `shell`, in bytes: the protocol refuses longer ones.
const MAX_PATH: usize = 4096;
/// Bytes of a `StepStart` frame besides dir, shell, script and env: type, build, step, timeout and
/// credit, four length prefixes, the env count, a workspace name at the protocol's limit of 255
/// bytes (so how the controller names workspaces can never push a step over), and a container
/// name at its limit with its length prefix (so a default container set later cannot either).
const FRAME_FIXED: usize = 1 + 8 + 4 + 4 + 4 + 4 * 4 + 2 + 255 + 4 + crate::proto::MAX_CONTAINER;
/// The container name that means the agent's own container (the Kubernetes plugin's name for it).
pub const AGENT_CONTAINER: &str = "jnlp";

/// A checked pipeline, ready to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    /// Name, made of `[A-Za-z0-9._-]`; also names the workspace (see [`workspace_name`]).
    pub name: String,
    /// The label expression as written (trimmed), or `None` when absent or blank.
    pub label: Option<String>,
    /// `label` parsed; matches every node when `label` is `None`.
    pub label_expr: LabelExpr,
    /// `agent.kubernetes`: a pod template given inline, as written (not resolved).
    pub kubernetes: Option<PodTemplate>,
    /// Pipeline-level environment, sorted by name (merged into each step's `env` by the plan).
    pub env: Vec<(String, String)>,
    /// `parameters:`, in the order declared.
    pub parameters: Vec<Parameter>,
    /// The stages, in order; a pipeline of plain `steps:` has one, named "".
    pub stages: Vec<Stage>,
    /// The pipeline's `post:`.
    pub post: stages::Post,
    /// The plan with every parameter at its default (made by [`parse`], which it checks).
    pub plan: Plan,
    /// The container a step runs in when it names none (a pod template's `defaultContainer`);
    /// `None` (what [`parse`] gives) or [`AGENT_CONTAINER`] for the agent's own.
    pub default_container: Option<String>,
}

impl Pipeline {
    /// The plan for parameter values `given` (the defaults for the others).
    pub fn plan_with(&self, given: &[(String, String)]) -> Result<Plan, PipelineError> {
        if given.is_empty() {
            return Ok(self.plan.clone());
        }
        plan::plan(self, given)
    }

    /// The container `step` (one of this pipeline's) runs in, as its `StepStart` names it: "" for the agent's own
    /// container, else a valid container name. The step's own `container:` wins over
    /// `default_container`, and `jnlp` is the agent itself.
    pub fn container_of<'a>(&'a self, step: &'a Step) -> &'a str {
        match step.container.as_deref().or(self.default_container.as_deref()) {
            None | Some(AGENT_CONTAINER) => "",
            Some(c) => c,
        }
    }
}

/// One step of a plan, with defaults filled in and its environment merged (`script` and
/// `shell` are empty for a step that is not `sh`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Display name: as given, or the script's first non-blank line cut to 60 characters.
    pub name: String,
    /// The script, run as `SHELL -c SCRIPT`.
    pub script: String,
    /// Seconds before the step is killed; 0 for no limit.
    pub timeout_secs: u32,
    /// The pipeline's env overridden by the step's own, sorted by name.
    pub env: Vec<(String, String)>,
    /// Normalised directory relative to the workspace; "" for the workspace itself.
    pub dir: String,
    /// Absolute path of the shell program.
    pub shell: String,
    /// The container named by the step's `container:` (a DNS-1123 label), if any.
    pub container: Option<String>,
}

/// Why a pipeline was refused: where, what, and what to do. Displays as `pipeline: line L column
/// C: FIELD: what` (the position when known, the field's path when there is one), so a client
/// that read the YAML from a file can put the file's name in place of `pipeline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineError {
    message: String,
    at: Option<(usize, usize)>,
    kind: ErrorKind,
}

/// What kind of refusal a [`PipelineError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Larger than [`MAX_YAML`].
    TooLarge,
    /// Nested deeper than [`MAX_NESTING`].
    TooDeep,
    /// Anything else: bad YAML, a missing, unknown or bad field, a step over a limit.
    Invalid,
}

impl PipelineError {
    fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), at: None, kind: ErrorKind::Invalid }
    }

    /// From serde_yaml_ng's error, with its position moved to the front.
    fn from_yaml(e: &serde_yaml_ng::Error) -> Self {
        let text = e.to_string();
        // serde_yaml_ng's wording names its own API; say what the user should change instead.
        if text.starts_with("deserializing from YAML containing more than one document") {
            return Self::new(
                "the YAML holds more than one document (\"---\"); submit one pipeline at a time",
            );
        }
        let Some(loc) = e.location() else { return Self::new(text) };
        let (line, column) = (loc.line(), loc.column());
        let suffix = format!(" at line {line} column {column}");
        // serde_yaml_ng appends the position, and libyaml puts it after the problem and before
        // what it was scanning ("... at line 3 column 1, while parsing ..."); with neither
        // (a mark at the very start is not printed) the message keeps no position.
        let message = match text.find(&suffix) {
            Some(i) => format!("{}{}", &text[..i], &text[i + suffix.len()..]),
            None => return Self::new(text),
        };
        Self { message, at: Some((line, column)), kind: ErrorKind::Invalid }
    }

    /// Line and column (from 1, columns in characters) where the problem is, when known.
    pub fn position(&self) -> Option<(usize, usize)> {
        self.at
    }

    /// What went wrong, without the `pipeline:` prefix and the position.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The kind of refusal.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, column)) => write!(f, "pipeline: line {line} column {column}: {}", self.message),
            None => write!(f, "pipeline: {}", self.message),
        }
    }
}

impl std::error::Error for PipelineError {}

/// Parse and check a pipeline; errors name the field (`steps[2].timeout`, indexes from 0) and,
/// for most, its line and column. Takes time linear in the input.
pub fn parse(yaml: &str) -> Result<Pipeline, PipelineError> {
    if yaml.len() > MAX_YAML {
        return Err(PipelineError {
            kind: ErrorKind::TooLarge,
            ..PipelineError::new(format!("the YAML is {} bytes; the limit is {MAX_YAML} (1 MiB)", yaml.len()))
        });
    }
    depth::scan(yaml, MAX_NESTING).map_err(|d| PipelineError {
        message: format!(
            "the YAML nests deeper than {MAX_NESTING} levels here (counting [ ], {{ }} and indented \
             blocks); a pipeline with stages needs about 10"
        ),
        at: Some((d.line, d.column)),
        kind: ErrorKind::TooDeep,
    })?;
    let raw = PipelineSeed
        .deserialize(serde_yaml_ng::Deserializer::from_str(yaml))
        .map_err(|e| PipelineError::from_yaml(&e))?;
    let (label, label_expr) = match raw.label {
        Some((text, expr)) => (Some(text), expr),
        None => (None, LabelExpr::default()),
    };
    let mut p = Pipeline {
        name: raw.name,
        label,
        label_expr,
        kubernetes: raw.kubernetes,
        env: raw.env,
        parameters: raw.parameters,
        stages: raw.stages,
        post: raw.post,
        plan: Plan {
            units: Vec::new(),
            steps: Vec::new(),
            root: plan::Exec::Seq(Vec::new()),
            params: Vec::new(),
        },
        default_container: None,
    };
    p.plan = plan::plan(&p, &[])?;
    Ok(p)
}

/// Parse a duration: whole seconds (`"90"`), or amounts with units `d`, `h`, `m`, `s` in that
/// order, each at most once (`"30s"`, `"5m"`, `"1h30m"`); returns seconds, at most 7 days.
pub fn parse_duration(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a duration (use seconds or e.g. \"30s\", \"5m\", \"1h\")");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let too_long = || format!("{s:?} is longer than the limit of 7 days");
    let mut total: u64 = 0;
    let mut rest = t;
    // Units must come largest first, each once; `last` is the rank of the previous unit.
    let mut last = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let mut n: u64 = 0;
        for b in rest[..digits].bytes() {
            n = n.checked_mul(10).and_then(|n| n.checked_add(u64::from(b - b'0'))).ok_or_else(too_long)?;
        }
        rest = &rest[digits..];
        let (rank, unit) = match rest.bytes().next() {
            // A bare number is seconds, but only on its own: "1h30" is ambiguous.
            None if last == 0 => (4, 1),
            None => return Err(bad()),
            Some(b'd') => (1, 86_400),
            Some(b'h') => (2, 3_600),
            Some(b'm') => (3, 60),
            Some(b's') => (4, 1),
            Some(_) => return Err(bad()),
        };
        if rank <= last {
            return Err(bad());
        }
        last = rank;
        rest = rest.get(1..).unwrap_or("");
        total = n.checked_mul(unit).and_then(|v| v.checked_add(total)).ok_or_else(too_long)?;
    }
    if total > u64::from(MAX_TIMEOUT_SECS) {
        return Err(too_long());
    }
    Ok(total as u32)
}

/// The workspace directory name for a pipeline: one safe path component, never "", "." or
/// "..", with anything outside `[A-Za-z0-9._-]` replaced by `_` and at most 64 characters.
pub fn workspace_name(pipeline_name: &str) -> String {
    let safe: String = pipeline_name
        .chars()
        .take(MAX_NAME_LEN)
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .collect();
    match safe.as_str() {
        "" | "." => "_".into(),
        ".." => "__".into(),
        _ => safe,
    }
}

/// Normalise a step directory relative to the workspace (`a//b/./c/` becomes `a/b/c`, and "" or
/// "." the workspace itself); refuses absolute paths, `..`, NUL and components over 255 bytes.
pub fn safe_rel_dir(dir: &str) -> Result<String, String> {
    if dir.contains('\0') {
        return Err(format!("{dir:?} contains a NUL byte"));
    }
    if dir.starts_with('/') {
        return Err(format!("{dir:?} is absolute; give a directory relative to the workspace"));
    }
    let mut parts = Vec::new();
    for part in dir.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!("{dir:?} contains \"..\"; the directory must stay inside the workspace"))
            }
            p if p.len() > MAX_COMPONENT => {
                return Err(format!("{dir:?} has a component longer than {MAX_COMPONENT} bytes"))
            }
            p => parts.push(p),
        }
    }
    let out = parts.join("/");
    if out.len() > MAX_PATH {
        return Err(format!("the directory is {} bytes long; the limit is {MAX_PATH}", out.len()));
    }
    Ok(out)
}

/// Bytes one variable adds to a `StepStart` frame: two length prefixes, name and value.
fn env_entry_len(k: &str, v: &str) -> usize {
    8 + k.len() + v.len()
}

/// Encoded size of the step's `StepStart` frame with the longest workspace name the protocol allows.
fn frame_len<'a>(
    dir: &str,
    shell: &str,
    script: &str,
    env: impl Iterator<Item = (&'a str, &'a str)>,
) -> usize {
    FRAME_FIXED
        + dir.len()
        + shell.len()
        + script.len()
        + env.map(|(k, v)| env_entry_len(k, v)).sum::<usize>()
}

/// The first non-blank line of the script, trimmed, control characters blanked, cut to 60 characters.
fn default_step_name(script: &str) -> String {
    let line = script.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
    line.chars().take(DEFAULT_NAME_CHARS).map(|c| if c.is_control() { ' ' } else { c }).collect()
}

// ---------------------------------------------------------------------------------------------
// Field checks, each run on a scalar's text as serde_yaml_ng reads it.

fn check_name(s: &str) -> Result<String, String> {
    const ALLOWED: &str = "use only letters, digits, \".\", \"_\" and \"-\"";
    if s.is_empty() {
        return Err(format!("is empty; give the pipeline a name ({ALLOWED})"));
    }
    if let Some((i, c)) =
        s.char_indices().find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        let col = s[..i].chars().count() + 1;
        return Err(format!("{s:?} has {c:?} at column {col}; {ALLOWED}"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(format!("{s:?} is {} characters long; the limit is {MAX_NAME_LEN}", s.len()));
    }
    if s == "." || s == ".." {
        return Err(format!("{s:?} cannot be a pipeline name"));
    }
    Ok(s.to_string())
}

fn check_label(s: &str) -> Result<Option<(String, LabelExpr)>, String> {
    let text = s.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let expr = labels::parse(text).map_err(|e| e.to_string())?;
    Ok(Some((text.to_string(), expr)))
}

fn check_script(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("the script is empty".into());
    }
    if s.len() > MAX_SCRIPT {
        return Err(format!(
            "the script is {} bytes; the limit is {MAX_SCRIPT} (put long scripts in a file in the workspace \
             and run that)",
            s.len()
        ));
    }
    if s.contains('\0') {
        return Err("the script contains a NUL byte".into());
    }
    Ok(s.to_string())
}

fn check_step_name(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("is empty (leave it out to use the script's first line)".into());
    }
    if t.chars().any(char::is_control) {
        return Err(format!("{t:?} must be one line of printable text"));
    }
    let n = t.chars().count();
    if n > MAX_STEP_NAME {
        return Err(format!("is {n} characters long; the limit is {MAX_STEP_NAME}"));
    }
    Ok(t.to_string())
}

fn check_shell(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err(format!("is empty (leave it out for {DEFAULT_SHELL})"));
    }
    if !s.starts_with('/') {
        return Err(format!("{s:?} is not an absolute path (e.g. \"/bin/bash\")"));
    }
    if s.contains('\0') {
        return Err(format!("{s:?} contains a NUL byte"));
    }
    // The agent runs exactly `SHELL -c SCRIPT`, so arguments here would be part of the file name.
    if s.chars().any(char::is_whitespace) {
        return Err(format!(
            "{s:?} must be a program path without arguments (put options like \"set -e\" in the script)"
        ));
    }
    if s.len() > MAX_PATH {
        return Err(format!("is {} bytes long; the limit is {MAX_PATH}", s.len()));
    }
    Ok(s.to_string())
}

fn check_container(s: &str) -> Result<String, String> {
    if crate::proto::valid_container_name(s) {
        return Ok(s.to_string());
    }
    let max = crate::proto::MAX_CONTAINER;
    Err(format!(
        "{s:?} is not a container name: use lowercase letters, digits and \"-\", starting and ending \
         with a letter or digit, at most {max} characters (a Kubernetes container name such as \"build\")"
    ))
}

fn check_env_value(s: &str) -> Result<String, String> {
    if s.contains('\0') {
        return Err("the value contains a NUL byte".into());
    }
    // One value alone can never fit a frame past this; refuse before copying it.
    if s.len() > MAX_FRAME {
        return Err(format!(
            "the value is {} bytes; a step's whole environment must fit in {MAX_FRAME} bytes",
            s.len()
        ));
    }
    Ok(s.to_string())
}

fn valid_env_name(k: &str) -> bool {
    let mut b = k.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

// ---------------------------------------------------------------------------------------------
// Deserialisation. Each seed checks what it reads before returning, so serde_yaml_ng attaches
// the path and position of the offending value (or key, or mapping) to the error.

/// A scalar read as the text it was written as (so `1.10` stays "1.10" and `yes` stays "yes"),
/// then checked. Null is not special here; wrap in [`Nullable`] where it should be.
struct Text<T> {
    expecting: &'static str,
    check: fn(&str) -> Result<T, String>,
}

impl<'de, T> DeserializeSeed<'de> for Text<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, T> Visitor<'de> for Text<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.check)(v).map_err(E::custom)
    }
}

/// `None` for a YAML null (`~`, `null` or nothing), else what the inner seed reads.
struct Nullable<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Nullable<S> {
    type Value = Option<S::Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for Nullable<S> {
    type Value = Option<S::Value>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value or nothing")
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(d).map(Some)
    }
}

/// A mapping key that must be one of `fields` and not seen before in this mapping.
struct Field<'a> {
    fields: &'static [&'static str],
    seen: &'a mut Vec<&'static str>,
}

impl<'de> DeserializeSeed<'de> for Field<'_> {
    type Value = &'static str;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<&'static str, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Field<'_> {
    type Value = &'static str;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<&'static str, E> {
        let Some(&field) = self.fields.iter().find(|&&f| f == v) else {
            let list = self.fields.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(", ");
            let hint = match self.fields.iter().find(|f| near(f, v)) {
                Some(f) => format!(" (did you mean {f:?}?)"),
                None => String::new(),
            };
            return Err(E::custom(format!("unknown field {v:?}{hint}; expected one of {list}")));
        };
        if self.seen.contains(&field) {
            return Err(E::custom(format!("field {field:?} is given twice")));
        }
        self.seen.push(field);
        Ok(field)
    }
}

/// True when `b` is `a` with one character changed, added or removed, or two neighbours swapped:
/// close enough to suggest as the intended field.
fn near(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let (a, b) = (&a[prefix..], &b[prefix..]);
    match (a.len(), b.len()) {
        (0, 0) => false,
        (x, y) if x == y => a[1..] == b[1..] || (x >= 2 && a[0] == b[1] && a[1] == b[0] && a[2..] == b[2..]),
        (x, y) if x == y + 1 => a[1..] == *b,
        (x, y) if y == x + 1 => *a == b[1..],
        _ => false,
    }
}

/// An env map's key: a valid variable name, not seen before in this map, within the count limit.
struct EnvKey<'a> {
    seen: &'a BTreeMap<String, String>,
}

impl<'de> DeserializeSeed<'de> for EnvKey<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for EnvKey<'_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a variable name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if !valid_env_name(v) {
            return Err(E::custom(format!(
                "{v:?} is not a valid variable name (use letters, digits and \"_\", not starting with a \
                 digit)"
            )));
        }
        if self.seen.contains_key(v) {
            return Err(E::custom(format!("variable {v:?} is set twice")));
        }
        if self.seen.len() == MAX_ENV_VARS {
            return Err(E::custom(format!("more than {MAX_ENV_VARS} variables")));
        }
        Ok(v.to_string())
    }
}

/// An `env:` mapping of names to scalars, sorted by name; null means empty.
struct EnvSeed;

impl<'de> DeserializeSeed<'de> for EnvSeed {
    type Value = Vec<(String, String)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Ok(Nullable(EnvMap).deserialize(d)?.unwrap_or_default())
    }
}

struct EnvMap;

impl<'de> DeserializeSeed<'de> for EnvMap {
    type Value = Vec<(String, String)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EnvMap {
    type Value = Vec<(String, String)>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of variable names to values, such as {GREETING: hi}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut vars = BTreeMap::new();
        let mut size = 0;
        while let Some(k) = map.next_key_seed(EnvKey { seen: &vars })? {
            let value = Text { expecting: "a string, number or boolean", check: check_env_value };
            let v = map.next_value_seed(Nullable(value))?.unwrap_or_default();
            size += env_entry_len(&k, &v);
            // Stop as soon as the map could not fit any step's frame, so aliases cannot make a
            // small document build a large one.
            if size > MAX_FRAME {
                return Err(de::Error::custom(format!(
                    "the variables take more than {MAX_FRAME} bytes; a step's script and environment must \
                     fit in one {MAX_FRAME}-byte message (keep large data in files)"
                )));
            }
            vars.insert(k, v);
        }
        Ok(vars.into_iter().collect())
    }
}

/// What the top-level mapping holds.
struct RawPipeline {
    name: String,
    label: Option<(String, LabelExpr)>,
    kubernetes: Option<PodTemplate>,
    env: Vec<(String, String)>,
    parameters: Vec<Parameter>,
    stages: Vec<Stage>,
    post: stages::Post,
}

struct PipelineSeed;

impl<'de> DeserializeSeed<'de> for PipelineSeed {
    type Value = RawPipeline;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawPipeline, D::Error> {
        match Nullable(PipelineMap).deserialize(d)? {
            Some(p) => Ok(p),
            None => Err(de::Error::custom(
                "the document is empty; expected a mapping with \"name\" and \"steps\"",
            )),
        }
    }
}

struct PipelineMap;

impl<'de> DeserializeSeed<'de> for PipelineMap {
    type Value = RawPipeline;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawPipeline, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PipelineMap {
    type Value = RawPipeline;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a pipeline: a mapping with \"name\" and \"steps\"")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawPipeline, A::Error> {
        const FIELDS: &[&str] = &["name", "agent", "env", "parameters", "steps", "stages", "post"];
        let mut seen = Vec::new();
        let (mut name, mut agent, mut env, mut steps, mut stages) = (None, None, Vec::new(), None, None);
        let (mut parameters, mut post) = (Vec::new(), stages::Post::default());
        while let Some(field) = map.next_key_seed(Field { fields: FIELDS, seen: &mut seen })? {
            match field {
                "name" => {
                    let text = Text { expecting: "a pipeline name", check: check_name };
                    // A null is refused here, at this mapping, so the message names the field itself.
                    match map.next_value_seed(Nullable(text))? {
                        Some(n) => name = Some(n),
                        None => {
                            return Err(de::Error::custom(format!("name: {}", check_name("").unwrap_err())))
                        }
                    }
                }
                "agent" => agent = map.next_value_seed(Nullable(AgentMap))?,
                "env" => env = map.next_value_seed(EnvSeed)?,
                "parameters" => parameters = map.next_value_seed(stages::ParamsSeed)?,
                "steps" => steps = Some(map.next_value_seed(StepsSeed)?),
                "stages" => stages = Some(map.next_value_seed(stages::StagesSeed { branch: false })?),
                "post" => post = map.next_value_seed(stages::PostSeed)?,
                _ => unreachable!("Field yields only names in FIELDS"),
            }
        }
        let name = name.ok_or_else(|| {
            de::Error::custom("missing field \"name\"; give the pipeline a name such as \"name: hello\"")
        })?;
        let stages = match (steps, stages) {
            (Some(steps), None) => vec![Stage {
                name: String::new(),
                agent: None,
                env: Vec::new(),
                when: None,
                retry: stages::Retry::default(),
                fail_fast: false,
                body: stages::Body::Steps(steps),
                post: stages::Post::default(),
                archive: None,
            }],
            (None, Some(stages)) => stages,
            (Some(_), Some(_)) => {
                return Err(de::Error::custom(
                    "give \"steps\" or \"stages\", not both (put the steps in a stage)",
                ))
            }
            (None, None) => {
                return Err(de::Error::custom(
                    "missing field \"steps\"; add a list of steps such as \"steps: [{sh: make}]\" (or \"stages\")",
                ))
            }
        };
        if let Some(p) = parameters.iter().find(|p| env.iter().any(|(k, _)| *k == p.name)) {
            return Err(de::Error::custom(format!(
                "{:?} is both a parameter and a variable of the pipeline's env; rename one",
                p.name
            )));
        }
        let (label, kubernetes) = agent.map(|a| (a.label, a.kubernetes)).unwrap_or_default();
        Ok(RawPipeline { name, label, kubernetes, env, parameters, stages, post })
    }
}

/// What the `agent:` mapping holds.
#[derive(Default)]
struct RawAgent {
    label: Option<(String, LabelExpr)>,
    kubernetes: Option<PodTemplate>,
}

/// The `agent:` mapping: a label expression and an inline pod template, both optional.
struct AgentMap;

impl<'de> DeserializeSeed<'de> for AgentMap {
    type Value = RawAgent;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for AgentMap {
    type Value = RawAgent;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping such as {label: \"linux && x86_64\"}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = Vec::new();
        let mut agent = RawAgent::default();
        while let Some(field) =
            map.next_key_seed(Field { fields: &["label", "kubernetes"], seen: &mut seen })?
        {
            if field == "label" {
                let text = Text { expecting: "a label expression", check: check_label };
                agent.label = map.next_value_seed(Nullable(text))?.flatten();
            } else {
                // The template's own deserializer checks every field where serde_yaml_ng knows its
                // position, so its errors carry the path `agent.kubernetes.FIELD` and a line.
                agent.kubernetes = map.next_value::<Option<PodTemplate>>()?;
            }
        }
        Ok(agent)
    }
}

/// The `steps:` list: 1 to `MAX_STEPS` steps.
struct StepsSeed;

impl<'de> DeserializeSeed<'de> for StepsSeed {
    type Value = Vec<StepSpec>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<StepSpec>, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for StepsSeed {
    type Value = Vec<StepSpec>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of steps, each a mapping such as {sh: make}")
    }
    fn visit_none<E: de::Error>(self) -> Result<Vec<StepSpec>, E> {
        // serde_yaml_ng marks this error with the enclosing (top-level) mapping, so name the field.
        Err(E::custom("steps: is empty; add at least one step, such as \"- sh: make\""))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Vec<StepSpec>, D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<StepSpec>, A::Error> {
        let mut steps = Vec::new();
        while let Some(step) = seq.next_element_seed(StepMap)? {
            if steps.len() == MAX_STEPS {
                return Err(de::Error::custom(format!(
                    "more than {MAX_STEPS} steps; combine steps or split the pipeline"
                )));
            }
            steps.push(step);
        }
        if steps.is_empty() {
            return Err(de::Error::custom("is empty; add at least one step, such as \"- sh: make\""));
        }
        Ok(steps)
    }
}

/// One step's mapping.
struct StepMap;

impl<'de> DeserializeSeed<'de> for StepMap {
    type Value = StepSpec;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<StepSpec, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for StepMap {
    type Value = StepSpec;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a step: a mapping such as {sh: make}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StepSpec, A::Error> {
        const FIELDS: &[&str] = &[
            "sh",
            "stash",
            "unstash",
            "archive",
            "name",
            "timeout",
            "env",
            "dir",
            "shell",
            "container",
            "retry",
        ];
        let mut seen = Vec::new();
        let (mut name, mut timeout_secs, mut env, mut dir, mut shell, mut container, mut attempts) =
            (None, 0, Vec::new(), String::new(), None, None, 1);
        let mut kind = None;
        while let Some(field) = map.next_key_seed(Field { fields: FIELDS, seen: &mut seen })? {
            if matches!(field, "sh" | "stash" | "unstash" | "archive") && kind.is_some() {
                return Err(de::Error::custom(format!(
                    "a step does one thing: \"{field}\" and another of sh, stash, unstash, archive are both given"
                )));
            }
            match field {
                "sh" => {
                    let text = Text { expecting: "a script", check: check_script };
                    match map.next_value_seed(Nullable(text))? {
                        Some(s) => kind = Some(StepKind::Sh { script: s, shell: String::new() }),
                        None => {
                            return Err(de::Error::custom(format!("sh: {}", check_script("").unwrap_err())))
                        }
                    }
                }
                "stash" => {
                    let (n, sel) = map.next_value_seed(stages::SelectionSeed { named: true })?;
                    kind = Some(StepKind::Stash { name: n.unwrap_or_default(), sel });
                }
                "unstash" => {
                    let text = Text { expecting: "a stash name", check: stages::check_stash_name };
                    kind = Some(StepKind::Unstash { name: map.next_value_seed(text)? });
                }
                "archive" => {
                    kind = Some(StepKind::Archive {
                        sel: map.next_value_seed(stages::SelectionSeed { named: false })?.1,
                    })
                }
                "name" => {
                    let text = Text { expecting: "a step name", check: check_step_name };
                    name = map.next_value_seed(Nullable(text))?;
                }
                "timeout" => {
                    let text = Text { expecting: "a duration such as 30s, 5m or 1h", check: parse_duration };
                    timeout_secs = map.next_value_seed(Nullable(text))?.unwrap_or(0);
                }
                "env" => env = map.next_value_seed(EnvSeed)?,
                "dir" => {
                    let text =
                        Text { expecting: "a directory relative to the workspace", check: safe_rel_dir };
                    dir = map.next_value_seed(Nullable(text))?.unwrap_or_default();
                }
                "shell" => {
                    let text = Text { expecting: "an absolute path to a shell", check: check_shell };
                    shell = map.next_value_seed(Nullable(text))?;
                }
                "container" => {
                    let text = Text { expecting: "a container name such as build", check: check_container };
                    container = map.next_value_seed(Nullable(text))?;
                }
                "retry" => attempts = map.next_value_seed(stages::RetrySeed { stage: false })?.count,
                _ => unreachable!("Field yields only names in FIELDS"),
            }
        }
        let mut kind = kind.ok_or_else(|| {
            de::Error::custom("missing field \"sh\" (the script to run; or stash, unstash, archive)")
        })?;
        match &mut kind {
            StepKind::Sh { shell: s, .. } => *s = shell.unwrap_or_else(|| DEFAULT_SHELL.to_string()),
            _ if shell.is_some() => return Err(de::Error::custom("\"shell\" is for an sh step")),
            _ => {}
        }
        let name = name.unwrap_or_else(|| stages::kind_name(&kind));
        Ok(StepSpec { name, kind, timeout_secs, env, dir, container, attempts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{self, Frame, StepStart};

    fn err(yaml: &str) -> String {
        parse(yaml).unwrap_err().to_string()
    }

    /// A minimal valid pipeline with `extra` spliced into its first (and only) step.
    fn one_step(extra: &str) -> String {
        format!("name: t\nsteps:\n  - sh: make\n{extra}")
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const FULL: &str = r#"
name: hello
agent:
  label: "linux && x86_64"
env:
  GREETING: hi
  ZED: last
  A_FIRST: first
steps:
  - sh: echo "$GREETING"
    name: say hi
    timeout: 30s
    env: {A: "1", GREETING: step}
    dir: sub//dir/./
    shell: /bin/bash
  - sh: |

      make all
      make test
  - sh: true
    timeout: 90
"#;

    #[test]
    fn full_example_parses_with_defaults_and_merged_env() {
        let p = parse(FULL).unwrap();
        assert_eq!(p.name, "hello");
        assert_eq!(p.label.as_deref(), Some("linux && x86_64"));
        assert!(p.label_expr.matches(&["x86_64".into(), "linux".into()]));
        assert!(!p.label_expr.matches(&["linux".into()]));
        assert_eq!(p.env, pairs(&[("A_FIRST", "first"), ("GREETING", "hi"), ("ZED", "last")]));
        assert_eq!(p.plan.steps.len(), 3);

        let s = &p.plan.steps[0];
        assert_eq!(s.name, "say hi");
        assert_eq!(s.script, "echo \"$GREETING\"");
        assert_eq!(s.timeout_secs, 30);
        // The step's GREETING wins; the rest comes from the pipeline; all sorted by name.
        assert_eq!(s.env, pairs(&[("A", "1"), ("A_FIRST", "first"), ("GREETING", "step"), ("ZED", "last")]));
        assert_eq!(s.dir, "sub/dir");
        assert_eq!(s.shell, "/bin/bash");

        let s = &p.plan.steps[1];
        assert_eq!(s.name, "make all", "default name is the first non-blank line");
        assert_eq!(s.script, "\nmake all\nmake test\n");
        assert_eq!(s.timeout_secs, 0);
        assert_eq!(s.env, p.env);
        assert_eq!(s.dir, "");
        assert_eq!(s.shell, DEFAULT_SHELL);

        assert_eq!(p.plan.steps[2].script, "true", "a YAML boolean script is kept as written");
        assert_eq!(p.plan.steps[2].timeout_secs, 90);
    }

    #[test]
    fn shipped_example_parses() {
        let p = parse(include_str!("../../examples/hello.yaml")).unwrap();
        assert_eq!(p.name, "hello");
        assert!(!p.plan.steps.is_empty());
    }

    #[test]
    fn minimal_pipeline_matches_any_node() {
        let p = parse("name: a\nsteps: [{sh: make}]").unwrap();
        assert_eq!(p.label, None);
        assert!(p.label_expr.matches(&[]));
        assert!(p.env.is_empty());
        assert_eq!(p.plan.steps[0].name, "make");
    }

    #[test]
    fn blank_or_null_agent_and_label_match_any_node() {
        for agent in ["agent:", "agent: {}", "agent: {label: \"  \"}", "agent: {label: ~}"] {
            let p = parse(&format!("name: a\n{agent}\nsteps: [{{sh: make}}]")).unwrap();
            assert_eq!(p.label, None, "{agent}");
            assert!(p.label_expr.matches(&[]), "{agent}");
        }
    }

    #[test]
    fn env_values_keep_their_yaml_text() {
        let yaml = "name: a\nenv:\n  V: 1.10\n  B: yes\n  T: true\n  O: 010\n  N: ~\n  E:\n  Q: \"x y\"\n\
                    steps: [{sh: make}]";
        let p = parse(yaml).unwrap();
        let want =
            [("B", "yes"), ("E", ""), ("N", ""), ("O", "010"), ("Q", "x y"), ("T", "true"), ("V", "1.10")];
        assert_eq!(p.env, pairs(&want));
    }

    #[test]
    fn default_step_name_is_cut_to_60_characters() {
        let line = "é".repeat(80);
        let p = parse(&format!("name: a\nsteps:\n  - sh: \"  \\n  {line}\\nsecond\"")).unwrap();
        assert_eq!(p.plan.steps[0].name, "é".repeat(60));
    }

    #[test]
    fn explicit_step_names_are_trimmed_and_checked() {
        assert_eq!(parse(&one_step("    name: \"  build \"\n")).unwrap().plan.steps[0].name, "build");
        assert_eq!(parse(&one_step("    name: ~\n")).unwrap().plan.steps[0].name, "make");
        assert!(err(&one_step("    name: \" \"\n")).contains("steps[0].name: is empty"));
        assert!(err(&one_step("    name: \"a\\nb\"\n")).contains("must be one line"));
        let long = "n".repeat(MAX_STEP_NAME + 1);
        assert!(err(&one_step(&format!("    name: {long}\n")))
            .contains("is 101 characters long; the limit is 100"));
    }

    #[test]
    fn missing_required_fields_are_named() {
        assert_eq!(
            err("name: hello\n"),
            "pipeline: missing field \"steps\"; add a list of steps such as \"steps: [{sh: make}]\" (or \"stages\")"
        );
        assert_eq!(
            err("steps: [{sh: make}]\n"),
            "pipeline: missing field \"name\"; give the pipeline a name such as \"name: hello\""
        );
        assert_eq!(
            err("name: a\nsteps:\n  - sh: make\n  - name: second\n"),
            "pipeline: line 4 column 5: steps[1]: missing field \"sh\" (the script to run; or stash, unstash, archive)"
        );
    }

    #[test]
    fn empty_documents_and_non_mappings_are_refused() {
        for doc in ["", "  \n", "# only a comment\n", "~"] {
            assert_eq!(
                err(doc),
                "pipeline: the document is empty; expected a mapping with \"name\" and \"steps\"",
                "{doc:?}"
            );
        }
        assert!(err("- a\n- b\n").contains("invalid type: sequence, expected a pipeline"));
    }

    #[test]
    fn unknown_fields_are_refused_with_a_suggestion() {
        assert_eq!(
            err("name: a\nstpes: [{sh: make}]\n"),
            "pipeline: line 2 column 1: unknown field \"stpes\" (did you mean \"steps\"?); expected one \
             of \"name\", \"agent\", \"env\", \"parameters\", \"steps\", \"stages\", \"post\""
        );
        let e = err(&one_step("    timeuot: 5\n"));
        assert!(
            e.starts_with(
                "pipeline: line 4 column 5: steps[0]: unknown field \"timeuot\" (did you mean \"timeout\"?)"
            ),
            "{e}"
        );
        let e = err("name: a\nagent: {labels: linux}\nsteps: [{sh: make}]\n");
        assert!(
            e.contains(
                "agent: unknown field \"labels\" (did you mean \"label\"?); expected one of \"label\", \"kubernetes\""
            ),
            "{e}"
        );
        let e = err(&one_step("    cwd: x\n"));
        assert!(
            e.contains("unknown field \"cwd\"; expected one of"),
            "no suggestion when nothing is close: {e}"
        );
    }

    #[test]
    fn repeated_fields_are_refused() {
        assert_eq!(
            err("name: a\nname: b\nsteps: [{sh: make}]\n"),
            "pipeline: line 2 column 1: field \"name\" is given twice"
        );
        assert!(err(&one_step("    sh: again\n")).contains("steps[0]: field \"sh\" is given twice"));
    }

    #[test]
    fn pipeline_names_are_checked() {
        assert_eq!(parse("name: a.b_c-1\nsteps: [{sh: make}]").unwrap().name, "a.b_c-1");
        assert_eq!(
            parse(&format!("name: {}\nsteps: [{{sh: make}}]", "n".repeat(64))).unwrap().name.len(),
            64
        );
        let e = err("name: my app\nsteps: [{sh: make}]");
        assert_eq!(
            e,
            "pipeline: line 1 column 7: name: \"my app\" has ' ' at column 3; use only letters, digits, \
             \".\", \"_\" and \"-\""
        );
        assert!(
            err(&format!("name: {}\nsteps: [{{sh: make}}]", "n".repeat(65))).contains("65 characters long")
        );
        assert!(err("name: \"..\"\nsteps: [{sh: make}]").contains("\"..\" cannot be a pipeline name"));
        assert!(err("name: .\nsteps: [{sh: make}]").contains("\".\" cannot be a pipeline name"));
        assert!(err("name: a/b\nsteps: [{sh: make}]").contains("has '/' at column 2"));
        assert!(err("name: ~\nsteps: [{sh: make}]").contains(": name: is empty"));
        assert!(err("name: \"\"\nsteps: [{sh: make}]").contains(": name: is empty"));
        assert!(err("name: [a]\nsteps: [{sh: make}]").contains("name: invalid type: sequence"));
    }

    #[test]
    fn step_count_must_be_between_1_and_256() {
        assert!(err("name: a\nsteps: []").contains(": steps: is empty; add at least one step"));
        assert!(err("name: a\nsteps:").contains(": steps: is empty; add at least one step"));
        assert!(err("name: a\nsteps: make")
            .contains("steps: invalid type: string \"make\", expected a list of steps"));
        let many = |n: usize| format!("name: a\nsteps:\n{}", "  - sh: make\n".repeat(n));
        assert_eq!(parse(&many(MAX_STEPS)).unwrap().plan.steps.len(), MAX_STEPS);
        assert!(err(&many(MAX_STEPS + 1)).contains("steps: more than 256 steps"));
    }

    #[test]
    fn scripts_are_checked() {
        assert!(err("name: a\nsteps: [{sh: \"\"}]").contains("steps[0].sh: the script is empty"));
        assert!(err("name: a\nsteps: [{sh: \"  \\n\"}]").contains("steps[0].sh: the script is empty"));
        assert!(err("name: a\nsteps:\n  - sh:\n").contains("steps[0]: sh: the script is empty"));
        assert!(err("name: a\nsteps: [{sh: \"a\\0b\"}]").contains("NUL byte"));
        let ok = "x".repeat(MAX_SCRIPT);
        assert_eq!(
            parse(&format!("name: a\nsteps: [{{sh: {ok}}}]")).unwrap().plan.steps[0].script.len(),
            MAX_SCRIPT
        );
        let long = "x".repeat(MAX_SCRIPT + 1);
        assert!(err(&format!("name: a\nsteps: [{{sh: {long}}}]"))
            .contains("the script is 60001 bytes; the limit is 60000"));
    }

    #[test]
    fn timeouts_accept_seconds_and_units() {
        for (t, secs) in [
            ("30", 30),
            ("30s", 30),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            ("0", 0),
            ("~", 0),
            ("\"2d\"", 172_800),
        ] {
            assert_eq!(
                parse(&one_step(&format!("    timeout: {t}\n"))).unwrap().plan.steps[0].timeout_secs,
                secs,
                "{t}"
            );
        }
    }

    #[test]
    fn bad_timeouts_name_the_step_and_the_fix() {
        let yaml = "name: a\nsteps:\n  - sh: a\n  - sh: b\n  - sh: c\n    timeout: 5x\n";
        assert_eq!(
            err(yaml),
            "pipeline: line 6 column 14: steps[2].timeout: \"5x\" is not a duration (use seconds or e.g. \
             \"30s\", \"5m\", \"1h\")"
        );
        assert!(err(&one_step("    timeout: 8d\n"))
            .contains("steps[0].timeout: \"8d\" is longer than the limit of 7 days"));
        assert!(err(&one_step("    timeout: -1\n")).contains("\"-1\" is not a duration"));
        assert!(err(&one_step("    timeout: [1]\n")).contains("steps[0].timeout: invalid type: sequence"));
    }

    #[test]
    fn parse_duration_accepts_plain_seconds_and_ordered_units() {
        assert_eq!(parse_duration("0"), Ok(0));
        assert_eq!(parse_duration("45"), Ok(45));
        assert_eq!(parse_duration(" 45 "), Ok(45));
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("1d2h3m4s"), Ok(86_400 + 7200 + 180 + 4));
        assert_eq!(parse_duration("7d"), Ok(MAX_TIMEOUT_SECS));
        assert_eq!(parse_duration("604800"), Ok(MAX_TIMEOUT_SECS));
    }

    #[test]
    fn parse_duration_refuses_malformed_and_overlong_values() {
        let hint = "is not a duration (use seconds or e.g. \"30s\", \"5m\", \"1h\")";
        for bad in ["", " ", "5x", "s", "1.5h", "-1", "1 h", "30m1h", "1h1h", "1h30", "30S", "h1", "1hh"] {
            assert_eq!(parse_duration(bad), Err(format!("{bad:?} {hint}")), "{bad:?}");
        }
        let limit = "is longer than the limit of 7 days";
        for long in ["7d1s", "604801", "169h", "99999999999999999999999999", "18446744073709551615d"] {
            assert_eq!(parse_duration(long), Err(format!("{long:?} {limit}")), "{long:?}");
        }
    }

    #[test]
    fn bad_label_expressions_are_reported_with_their_position() {
        assert_eq!(
            err("name: a\nagent:\n  label: linux &&\nsteps: [{sh: make}]"),
            "pipeline: line 3 column 10: agent.label: label expression \"linux &&\": expected a label after \
             \"&&\" at column 9"
        );
        assert!(err("name: a\nagent: linux\nsteps: [{sh: make}]")
            .contains("agent: invalid type: string \"linux\""));
    }

    #[test]
    fn agent_takes_an_inline_pod_template() {
        let yaml = "name: a\nagent:\n  label: maven\n  kubernetes:\n    containers:\n      - {name: build, image: maven}\n    \
                    envVars: {K: v}\n    yaml: 'spec: {hostname: h}'\nsteps: [{sh: make}]";
        let p = parse(yaml).unwrap();
        assert_eq!(p.label.as_deref(), Some("maven"));
        let t = p.kubernetes.as_ref().unwrap();
        assert_eq!(t.name, "", "the name is optional inline");
        assert_eq!(t.containers[0].image.as_deref(), Some("maven"));
        assert_eq!(t.env_vars, pairs(&[("K", "v")]));
        assert_eq!(t.yaml, ["spec: {hostname: h}".to_string()]);
        assert_eq!(t.containers[0].name, "build");
        let p = parse("name: a\nagent: {kubernetes: {name: inline}}\nsteps: [{sh: make}]").unwrap();
        assert_eq!((p.label, p.kubernetes.map(|t| t.name)), (None, Some("inline".to_string())));
        let p = parse("name: a\nagent: {label: x}\nsteps: [{sh: make}]").unwrap();
        assert!(p.kubernetes.is_none());
    }

    #[test]
    fn inline_template_errors_carry_the_pipelines_path_and_position() {
        assert_eq!(
            err("name: a\nagent:\n  kubernetes:\n    containers:\n      - {name: Build}\nsteps: [{sh: make}]"),
            "pipeline: line 5 column 16: agent.kubernetes.containers[0].name: container name \"Build\" has 'B' at \
             column 1; use lower-case letters, digits and '-', starting and ending with a letter or digit"
        );
        let e = err("name: a\nagent:\n  kubernetes:\n    imagee: x\nsteps: [{sh: make}]");
        assert!(e.starts_with("pipeline: line 4 column 5: agent.kubernetes: unknown field `imagee`"), "{e}");
        let e =
            err("name: a\nagent:\n  kubernetes:\n    yaml: 'spec: {containerz: []}'\nsteps: [{sh: make}]");
        assert!(e.contains("agent.kubernetes.yaml: the Pod YAML has a field Kubernetes' Pod does not have: spec.containerz"), "{e}");
        assert!(err("name: a\nagent: {kubernetes: [x]}\nsteps: [{sh: make}]")
            .contains("agent.kubernetes: invalid type"));
    }

    #[test]
    fn label_precedence_and_name_matching_carry_through() {
        let p = parse("name: a\nagent: {label: \"a || b && !c\"}\nsteps: [{sh: make}]").unwrap();
        assert!(p.label_expr.matches(&["b".into()]));
        assert!(!p.label_expr.matches(&["b".into(), "c".into()]));
        assert!(p.label_expr.matches(&["a".into(), "c".into()]));
    }

    #[test]
    fn env_names_and_values_are_checked() {
        let e = err("name: a\nenv:\n  1A: x\nsteps: [{sh: make}]");
        assert_eq!(
            e,
            "pipeline: line 3 column 3: env: \"1A\" is not a valid variable name (use letters, digits and \
             \"_\", not starting with a digit)"
        );
        for bad in ["A-B", "A.B", "\"\"", "\"A B\"", "é"] {
            assert!(
                err(&format!("name: a\nenv: {{{bad}: x}}\nsteps: [{{sh: make}}]"))
                    .contains("is not a valid variable name"),
                "{bad}"
            );
        }
        assert!(parse("name: a\nenv: {_a1: x, Ab_9: y}\nsteps: [{sh: make}]").is_ok());
        assert!(err("name: a\nenv:\n  A: x\n  A: y\nsteps: [{sh: make}]")
            .contains("line 4 column 3: env: variable \"A\" is set twice"));
        assert!(err("name: a\nenv:\n  A: [1]\nsteps: [{sh: make}]")
            .contains("env.A: invalid type: sequence, expected a string, number or boolean"));
        assert!(err("name: a\nenv: {A: \"x\\0y\"}\nsteps: [{sh: make}]")
            .contains("env.A: the value contains a NUL byte"));
        assert!(err(&one_step("    env: [A]\n"))
            .contains("steps[0].env: invalid type: sequence, expected a mapping"));
    }

    #[test]
    fn env_maps_are_limited_to_128_variables() {
        let vars = |n: usize| (0..n).map(|i| format!("V{i}: x")).collect::<Vec<_>>().join(", ");
        let ok = parse(&format!("name: a\nenv: {{{}}}\nsteps: [{{sh: make}}]", vars(MAX_ENV_VARS))).unwrap();
        assert_eq!(ok.plan.steps[0].env.len(), MAX_ENV_VARS);
        let e = err(&format!("name: a\nenv: {{{}}}\nsteps: [{{sh: make}}]", vars(MAX_ENV_VARS + 1)));
        assert!(e.contains("env: more than 128 variables"), "{e}");
        // Each map may be within the limit while the merged step environment is not.
        let e = err(&format!(
            "name: a\nenv: {{{}}}\nsteps: [{{sh: make, env: {{EXTRA: y}}}}]",
            vars(MAX_ENV_VARS)
        ));
        assert_eq!(
            e,
            "pipeline: steps[0].env: with the pipeline's env the step has 129 variables; the limit is 128"
        );
    }

    /// A one-step pipeline whose `StepStart` frame is `target` bytes (with a 255-byte workspace).
    fn sized_step(target: usize) -> String {
        let fixed = FRAME_FIXED + DEFAULT_SHELL.len() + MAX_SCRIPT + env_entry_len("A", "");
        format!(
            "name: a\nenv: {{A: {}}}\nsteps: [{{sh: {}}}]",
            "v".repeat(target - fixed),
            "s".repeat(MAX_SCRIPT)
        )
    }

    #[test]
    fn the_largest_accepted_step_fits_one_protocol_frame() {
        let p = parse(&sized_step(MAX_FRAME)).unwrap();
        let s = &p.plan.steps[0];
        let mut envbuf = vec![0u8; MAX_FRAME];
        let env =
            proto::encode_env(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())), &mut envbuf).unwrap();
        let workspace = "w".repeat(255);
        let container = "c".repeat(proto::MAX_CONTAINER);
        let frame = Frame::StepStart(StepStart {
            build: u64::MAX,
            step: u32::MAX,
            timeout_secs: s.timeout_secs,
            credit: u32::MAX,
            workspace: &workspace,
            dir: &s.dir,
            shell: &s.shell,
            script: &s.script,
            env,
            container: &container,
        });
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(proto::encode(&frame, &mut buf).unwrap(), MAX_FRAME, "the size estimate is exact");
    }

    #[test]
    fn a_step_too_large_for_one_frame_is_refused() {
        let e = err(&sized_step(MAX_FRAME + 1));
        assert!(
            e.starts_with("pipeline: steps[0]: its script, environment, dir and shell take 65537 bytes"),
            "{e}"
        );
    }

    #[test]
    fn aliases_cannot_inflate_a_small_document() {
        let big = "x".repeat(40_000);
        // One env map naming the same large value twice is refused as soon as it outgrows a frame.
        let e = err(&format!("name: a\nenv: {{A: &big {big}, B: *big, C: *big}}\nsteps: [{{sh: make}}]"));
        assert!(e.contains("env: the variables take more than 65536 bytes"), "{e}");
        // 256 steps each merging a large pipeline value with its own aliased copy: the first is refused.
        let step = "  - {sh: make, env: {B: *big}}\n".repeat(MAX_STEPS);
        let e = err(&format!("name: a\nenv: {{A: &big {big}}}\nsteps:\n{step}"));
        assert!(e.starts_with("pipeline: steps[0]: its script, environment"), "{e}");
    }

    #[test]
    fn deep_yaml_nesting_fails_cleanly() {
        let deep = format!(
            "name: a\nsteps: [{{sh: make, env: {{A: {}{}}}}}]",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let e = parse(&deep).unwrap_err();
        assert_eq!((e.kind(), e.position()), (ErrorKind::TooDeep, Some((2, 57))), "{e}");
        let deep =
            format!("name: a\nfoo: {}{}\nsteps: [{{sh: make}}]", "{a: ".repeat(10_000), "}".repeat(10_000));
        assert_eq!(parse(&deep).unwrap_err().kind(), ErrorKind::TooDeep);
    }

    /// `head` and then `unit` repeated up to exactly the 1 MiB a pipeline may take.
    fn one_mib(head: &str, unit: &str) -> String {
        let mut s = head.to_string();
        while s.len() + unit.len() <= MAX_YAML {
            s.push_str(unit);
        }
        s
    }

    /// 1 MiB of nesting once took libyaml minutes (its time grows with the square of the depth);
    /// the depth scan refuses it after reading 33 levels.
    #[test]
    fn a_mebibyte_of_nesting_is_refused_by_the_depth_limit() {
        for (head, unit, at) in [
            ("name: a\nsteps: ", "[", (2, 39)),
            ("name: a\nsteps: ", "{", (2, 39)),
            ("name: a\nsteps: ", "{a: ", (2, 132)),
            ("name: a\nsteps:\n", "- ", (3, 65)),
            // Nesting after a block scalar holding a quote: the quote hides nothing.
            ("name: a\nsteps:\n  - sh: |\n      echo don't\n    env: ", "[", (5, 39)),
        ] {
            let yaml = one_mib(head, unit);
            let e = parse(&yaml).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::TooDeep, "{unit:?}: {e}");
            assert_eq!(e.position(), Some(at), "{unit:?}: {e}");
            assert_eq!(
                e.message(),
                "the YAML nests deeper than 32 levels here (counting [ ], { } and indented blocks); a \
                 pipeline with stages needs about 10"
            );
        }
        let e = parse(&one_mib("name: a\nsteps: ", "[")).unwrap_err().to_string();
        assert!(e.starts_with("pipeline: line 2 column 39: the YAML nests deeper than 32 levels"), "{e}");
    }

    #[test]
    fn nesting_up_to_the_limit_reaches_the_field_checks() {
        // 31 flow levels inside the top-level mapping: within the limit, refused for what it is.
        let yaml = format!("name: a\nsteps: {}{}", "[".repeat(31), "]".repeat(31));
        let e = parse(&yaml).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(e.message().contains("invalid type: sequence"), "{e}");
        let yaml = format!("name: a\nsteps: {}{}", "[".repeat(32), "]".repeat(32));
        assert_eq!(parse(&yaml).unwrap_err().kind(), ErrorKind::TooDeep);
    }

    #[test]
    fn step_dirs_are_normalised_and_confined() {
        assert_eq!(parse(&one_step("    dir: ./a//b/./c/\n")).unwrap().plan.steps[0].dir, "a/b/c");
        assert_eq!(parse(&one_step("    dir: .\n")).unwrap().plan.steps[0].dir, "");
        assert_eq!(parse(&one_step("    dir: ~\n")).unwrap().plan.steps[0].dir, "");
        assert_eq!(
            err(&one_step("    dir: /etc\n")),
            "pipeline: line 4 column 10: steps[0].dir: \"/etc\" is absolute; give a directory relative to \
             the workspace"
        );
        assert!(
            err(&one_step("    dir: a/../../b\n")).contains("steps[0].dir: \"a/../../b\" contains \"..\"")
        );
    }

    #[test]
    fn safe_rel_dir_normalises_relative_paths() {
        assert_eq!(safe_rel_dir("a//b/./c/"), Ok("a/b/c".into()));
        assert_eq!(safe_rel_dir(""), Ok("".into()));
        assert_eq!(safe_rel_dir("./"), Ok("".into()));
        assert_eq!(
            safe_rel_dir("..a/b..c/..."),
            Ok("..a/b..c/...".into()),
            "only a whole \"..\" component is refused"
        );
        assert_eq!(safe_rel_dir(&"c".repeat(255)), Ok("c".repeat(255)));
    }

    #[test]
    fn safe_rel_dir_refuses_escapes_nul_and_long_components() {
        assert!(safe_rel_dir("/abs").unwrap_err().contains("is absolute"));
        assert!(safe_rel_dir("//abs").unwrap_err().contains("is absolute"));
        assert!(safe_rel_dir("..").unwrap_err().contains("contains \"..\""));
        assert!(safe_rel_dir("a/..").unwrap_err().contains("contains \"..\""));
        assert!(safe_rel_dir("a/../b").unwrap_err().contains("contains \"..\""));
        assert!(safe_rel_dir("a\0b").unwrap_err().contains("NUL"));
        assert!(safe_rel_dir(&format!("a/{}", "c".repeat(256)))
            .unwrap_err()
            .contains("longer than 255 bytes"));
        let long = vec!["c".repeat(200); 21].join("/");
        assert!(safe_rel_dir(&long).unwrap_err().contains("the limit is 4096"));
    }

    #[test]
    fn shells_must_be_absolute_program_paths() {
        assert_eq!(
            parse(&one_step("    shell: /usr/bin/env\n")).unwrap().plan.steps[0].shell,
            "/usr/bin/env"
        );
        assert_eq!(parse(&one_step("    shell: ~\n")).unwrap().plan.steps[0].shell, DEFAULT_SHELL);
        assert!(
            err(&one_step("    shell: bash\n")).contains("steps[0].shell: \"bash\" is not an absolute path")
        );
        assert!(
            err(&one_step("    shell: /bin/bash -e\n")).contains("must be a program path without arguments")
        );
        assert!(err(&one_step("    shell: \"\"\n")).contains("steps[0].shell: is empty"));
    }

    #[test]
    fn containers_are_checked_and_the_step_wins_over_the_default() {
        let yaml = "name: a\nsteps:\n  - sh: make\n    container: build\n  - sh: test\n  - sh: x\n    container: jnlp\n";
        let mut p = parse(yaml).unwrap();
        assert_eq!(p.default_container, None);
        assert_eq!(p.plan.steps[0].container.as_deref(), Some("build"));
        assert_eq!(p.plan.steps[1].container, None);
        let names =
            |p: &Pipeline| p.plan.steps.iter().map(|s| p.container_of(s).to_string()).collect::<Vec<_>>();
        assert_eq!(names(&p), ["build", "", ""]);
        p.default_container = Some("tools".into());
        assert_eq!(names(&p), ["build", "tools", ""], "jnlp is the agent itself");
        p.default_container = Some(AGENT_CONTAINER.into());
        assert_eq!(names(&p), ["build", "", ""]);
        assert_eq!(parse(&one_step("    container: ~\n")).unwrap().plan.steps[0].container, None);
        assert_eq!(
            err(&one_step("    container: Build\n")),
            "pipeline: line 4 column 16: steps[0].container: \"Build\" is not a container name: use \
             lowercase letters, digits and \"-\", starting and ending with a letter or digit, at most 63 \
             characters (a Kubernetes container name such as \"build\")"
        );
        for bad in ["../x", "a/b", "-a", "a-", "\"\"", "a_b", &"c".repeat(64)] {
            assert!(
                err(&one_step(&format!("    container: {bad}\n"))).contains("is not a container name"),
                "{bad}"
            );
        }
        assert!(parse(&one_step(&format!("    container: {}\n", "c".repeat(63)))).is_ok());
        assert!(err(&one_step("    container: [a]\n")).contains("steps[0].container: invalid type: sequence"));
        assert!(err(&one_step("    contianer: a\n")).contains("(did you mean \"container\"?)"));
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let e = parse("name: a\nsteps: [{sh: make}\n").unwrap_err();
        assert_eq!(e.position(), Some((3, 1)));
        assert_eq!(
            e.to_string(),
            "pipeline: line 3 column 1: did not find expected ',' or ']', while parsing a flow sequence at \
             line 2 column 8"
        );
        let e = err("name: a\nsteps: [{sh: make}]\n  bad: indent\n");
        assert!(e.starts_with("pipeline: line 3 column"), "{e}");
    }

    #[test]
    fn multiple_documents_are_refused() {
        assert_eq!(
            err("name: a\nsteps: [{sh: make}]\n---\nname: b\n"),
            "pipeline: the YAML holds more than one document (\"---\"); submit one pipeline at a time"
        );
    }

    #[test]
    fn input_over_1_mib_is_refused_up_front() {
        let huge = format!("name: a\nsteps: [{{sh: make}}]\n#{}", "x".repeat(MAX_YAML));
        assert_eq!(
            err(&huge),
            format!("pipeline: the YAML is {} bytes; the limit is 1048576 (1 MiB)", huge.len())
        );
    }

    #[test]
    fn workspace_name_is_one_safe_component() {
        assert_eq!(workspace_name("hello-1.2_x"), "hello-1.2_x");
        assert_eq!(workspace_name("a/b c"), "a_b_c");
        assert_eq!(workspace_name("é"), "_");
        assert_eq!(workspace_name(""), "_");
        assert_eq!(workspace_name("."), "_");
        assert_eq!(workspace_name(".."), "__");
        assert_eq!(workspace_name("..."), "...");
        assert_eq!(workspace_name(&"n".repeat(300)).len(), MAX_NAME_LEN);
    }

    #[test]
    fn pipeline_error_is_a_std_error() {
        let e: Box<dyn std::error::Error> = Box::new(parse("").unwrap_err());
        assert!(e.to_string().starts_with("pipeline: "));
    }

    #[test]
    fn field_suggestions_need_a_close_match() {
        assert!(near("steps", "stpes"));
        assert!(near("steps", "step"));
        assert!(near("steps", "stepss"));
        assert!(near("timeout", "timout"));
        assert!(near("sh", "shh"));
        assert!(!near("sh", "cwd"));
        assert!(!near("name", "agent"));
    }
}
