//! The parts of a pipeline beyond a list of steps: `stages`, `parallel`, `matrix`, `post`,
//! `retry`, `when`, `parameters`, and the `stash`, `unstash` and `archive` steps. Parsed with the
//! same kind of serde visitors as the rest of the pipeline (see the parent module), so every error
//! carries its field's path and its line and column.
//!
//! ```yaml
//! parameters:
//!   - {name: TARGET, default: x86_64, choices: [x86_64, aarch64]}
//! stages:
//!   - name: build
//!     agent: {label: "linux && ${arch}"}      # `${NAME}`: an axis, parameter or pipeline env value
//!     matrix:
//!       axes: {arch: [x86_64, aarch64, armv7]}
//!       exclude: [{arch: armv7}]
//!     steps:
//!       - sh: make
//!       - stash: {name: bin, paths: ["target/*/wisp-agent"]}
//!     archive: {paths: ["dist/**"], exclude: ["dist/tmp/**"]}
//!   - name: test
//!     failFast: true
//!     parallel:
//!       - {name: unit, steps: [{unstash: bin}, {sh: make test}]}
//!       - {name: lint, when: {env: {TARGET: x86_64}}, retry: 2, steps: [{sh: make lint}]}
//!     retry: {count: 2, on: [agent-lost]}   # (on a branch, or a stage with steps)
//! post:
//!   always: [{sh: echo done}]
//!   failure: [{sh: echo failed}]
//! ```

use super::{
    check_env_value, check_label, check_name, check_step_name, valid_env_name, EnvSeed, Field, Nullable,
    Text, MAX_ENV_VARS,
};
use crate::controller::labels::LabelExpr;
use crate::controller::template::PodTemplate;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Stages in one `stages:` list, branches in one `parallel:`.
pub const MAX_STAGES: usize = 64;
/// Axes of one matrix.
pub const MAX_AXES: usize = 8;
/// Values of one axis.
pub const MAX_AXIS_VALUES: usize = 64;
/// Cells of one matrix (after `exclude`).
pub const MAX_CELLS: usize = 256;
/// Patterns in one `paths:` or `exclude:` list.
pub const MAX_PATTERNS: usize = 64;
/// Bytes of one path pattern.
pub const MAX_PATTERN: usize = 1024;
/// Attempts `retry:` may ask for.
pub const MAX_RETRY: u32 = 10;
/// Parameters of one pipeline.
pub const MAX_PARAMETERS: usize = 64;
/// Nesting of `not`, `anyOf` and `allOf` in one `when:`.
pub const MAX_WHEN_DEPTH: usize = 4;

/// What a stage's `agent:` asks for: a label expression (as written; it may hold `${NAME}`,
/// filled in per matrix cell) and an inline pod template.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentSpec {
    /// The label as written, trimmed; `None` when absent or blank.
    pub label: Option<String>,
    /// An inline pod template.
    pub kubernetes: Option<PodTemplate>,
}

/// A path selection: globs relative to the workspace (or the step's `dir`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selection {
    /// Files and directories to take: any of these.
    pub paths: Vec<String>,
    /// Minus any of these.
    pub exclude: Vec<String>,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// `sh: SCRIPT`, run as `SHELL -c SCRIPT`.
    Sh {
        /// The script.
        script: String,
        /// Absolute path of the shell.
        shell: String,
    },
    /// `stash: {name, paths, exclude}`: keep these files for later stages of the build.
    Stash {
        /// The stash's name, unique in the build (a later stash of the name replaces it).
        name: String,
        /// What to keep.
        sel: Selection,
    },
    /// `unstash: NAME`: put a stash's files into the workspace.
    Unstash {
        /// The stash's name.
        name: String,
    },
    /// `archive: {paths, exclude}`: keep these files as the build's artifacts.
    Archive {
        /// What to keep.
        sel: Selection,
    },
}

/// One step as written (its environment not merged yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpec {
    /// As given, else derived from what it does.
    pub name: String,
    /// What it does.
    pub kind: StepKind,
    /// Seconds before it is stopped; 0 for no limit.
    pub timeout_secs: u32,
    /// Its own environment, sorted by name.
    pub env: Vec<(String, String)>,
    /// Normalised directory relative to the workspace.
    pub dir: String,
    /// `container:`, if given.
    pub container: Option<String>,
    /// Attempts: 1 unless `retry: N`.
    pub attempts: u32,
}

/// When a stage's `retry:` runs it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// After any failure (`retry: N`, or `on: [failure]`).
    Failure,
    /// Only when its agent was lost (`on: [agent-lost]`): the node went away, its pod failed or
    /// was deleted, or it did not come back within the agent grace.
    AgentLost,
}

/// A stage's `retry:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all (1: no retry).
    pub count: u32,
    /// Which failures start another attempt.
    pub on: RetryOn,
}

impl Default for Retry {
    fn default() -> Self {
        Self { count: 1, on: RetryOn::Failure }
    }
}

/// `post:` blocks: steps run after a stage's steps (or the whole pipeline), by its result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Post {
    /// Whatever the result (first).
    pub always: Vec<StepSpec>,
    /// When it succeeded.
    pub success: Vec<StepSpec>,
    /// When it failed.
    pub failure: Vec<StepSpec>,
    /// When it was cancelled.
    pub aborted: Vec<StepSpec>,
}

impl Post {
    /// True when no block has a step.
    pub fn is_empty(&self) -> bool {
        self.always.is_empty()
            && self.success.is_empty()
            && self.failure.is_empty()
            && self.aborted.is_empty()
    }
}

/// A `when:` condition on the environment a stage sees (parameters, the pipeline's env, matrix
/// axes, the stage's env).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// `env: {NAME: value}` or `{NAME: [a, b]}`: each named variable has one of its values.
    Env(Vec<(String, Vec<String>)>),
    /// `not: {...}`.
    Not(Box<When>),
    /// `anyOf: [...]`.
    AnyOf(Vec<When>),
    /// `allOf: [...]` (also what several keys in one mapping mean).
    AllOf(Vec<When>),
}

impl When {
    /// Whether the condition holds in `env` (a variable not set is "").
    pub fn holds(&self, env: &dyn Fn(&str) -> Option<String>) -> bool {
        match self {
            When::Env(vars) => vars.iter().all(|(k, vs)| {
                let v = env(k).unwrap_or_default();
                vs.contains(&v)
            }),
            When::Not(w) => !w.holds(env),
            When::AnyOf(ws) => ws.iter().any(|w| w.holds(env)),
            When::AllOf(ws) => ws.iter().all(|w| w.holds(env)),
        }
    }
}

/// A `parameters:` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameter {
    /// A variable name: steps see the value as `$NAME`.
    pub name: String,
    /// The value when `wisp run -p NAME=VALUE` does not give one.
    pub default: String,
    /// The values allowed, when given (the default is one of them).
    pub choices: Vec<String>,
    /// What it is for.
    pub description: String,
}

/// What a stage runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Its own steps, in order.
    Steps(Vec<StepSpec>),
    /// Branches at once (each a stage with steps).
    Parallel(Vec<Stage>),
    /// The stage's steps once per cell of the axes, at once.
    Matrix {
        /// Axis names and their values, in the order written.
        axes: Vec<(String, Vec<String>)>,
        /// Cells left out: each entry names some axes' values; a cell matching all of them goes.
        exclude: Vec<Vec<(String, String)>>,
        /// The steps of each cell.
        steps: Vec<StepSpec>,
    },
}

/// One stage (or parallel branch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Its name, unique among its siblings.
    pub name: String,
    /// Its own agent, if it names one; else the pipeline's (or, for a branch, its parent's).
    pub agent: Option<AgentSpec>,
    /// Its environment, over the pipeline's.
    pub env: Vec<(String, String)>,
    /// Runs only when this holds.
    pub when: Option<When>,
    /// Runs again on failure.
    pub retry: Retry,
    /// `failFast`: a failing branch cancels the others.
    pub fail_fast: bool,
    /// What it runs.
    pub body: Body,
    /// Run after it.
    pub post: Post,
    /// `archive:`, run after its steps when they succeed.
    pub archive: Option<Selection>,
}

// ---------------------------------------------------------------------------------------------
// Checks.

fn check_stage_name(s: &str) -> Result<String, String> {
    check_step_name(s)
        .map_err(|e| e.replace("(leave it out to use the script's first line)", "(a stage needs a name)"))
}

/// A stash name: `[A-Za-z0-9._-]`, at most 64 characters once `${NAME}`s are filled in (by the
/// plan; here each stands for a plain word).
pub(super) fn check_stash_name(s: &str) -> Result<String, String> {
    let probe = fill(s, &|_| Some("x".to_string())).map_err(|e| format!("{s:?}: {e}"))?;
    check_name(&probe).map(|_| s.to_string()).map_err(|e| {
        e.replace("give the pipeline a name", "give the stash a name")
            .replace("a pipeline name", "a stash name")
    })
}

/// A path pattern: relative, without `..` or NUL, at most [`MAX_PATTERN`] bytes. Its glob syntax
/// is checked by the agent that matches it.
pub fn check_pattern(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("is an empty pattern".into());
    }
    if t.len() > MAX_PATTERN {
        return Err(format!("the pattern is {} bytes; the limit is {MAX_PATTERN}", t.len()));
    }
    if t.contains('\0') {
        return Err("the pattern contains a NUL byte".into());
    }
    if t.starts_with('/') {
        return Err(format!(
            "{t:?} is absolute; patterns are relative to the workspace (e.g. \"target/*.tar.gz\")"
        ));
    }
    if t.split('/').any(|p| p == "..") {
        return Err(format!("{t:?} contains \"..\"; patterns must stay inside the workspace"));
    }
    Ok(t.to_string())
}

fn check_axis_value(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b)) {
        return Err(format!(
            "{s:?} is not an axis value: use 1 to 64 letters, digits, \".\", \"_\", \"-\" or \"+\" (it names \
             the cell and may go into a label)"
        ));
    }
    Ok(s.to_string())
}

fn check_var_name(s: &str) -> Result<String, String> {
    if !valid_env_name(s) {
        return Err(format!(
            "{s:?} is not a valid variable name (use letters, digits and \"_\", not starting with a digit)"
        ));
    }
    Ok(s.to_string())
}

/// A label that may hold `${NAME}`: checked with each placeholder standing for a plain label,
/// so a mistake in the expression itself is reported here, where its position is known.
fn check_label_template(s: &str) -> Result<Option<String>, String> {
    let text = s.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let probe = fill(text, &|_| Some("x".to_string())).map_err(|e| format!("{text:?}: {e}"))?;
    if probe != text {
        check_label(&probe).map_err(|e| format!("{text:?}, each ${{...}} taken for one label: {e}"))?;
    } else {
        check_label(&probe)?;
    }
    Ok(Some(text.to_string()))
}

/// `text` with each `${NAME}` replaced by `value(NAME)`; an unknown name or an unclosed `${` is
/// an error.
pub fn fill(text: &str, value: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(j) = after.find('}') else {
            return Err("a \"${\" is not closed by \"}\"".into());
        };
        let name = &after[..j];
        if !valid_env_name(name) {
            return Err(format!("${{{name}}} does not name a variable"));
        }
        match value(name) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(format!("${{{name}}} is not a matrix axis, parameter or pipeline env variable"))
            }
        }
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Visitors.

/// A list of at most `max` items of `what`, each read by `item`.
struct ListOf<F, T> {
    expecting: &'static str,
    max: usize,
    item: F,
    allow_empty: bool,
    /// Checks each item against the ones before it (while serde_yaml_ng knows where it is).
    check: fn(&[T], &T) -> Result<(), String>,
}

fn any_items<T>(_: &[T], _: &T) -> Result<(), String> {
    Ok(())
}

impl<'de, T, S: DeserializeSeed<'de, Value = T>, F: FnMut() -> S> DeserializeSeed<'de> for ListOf<F, T> {
    type Value = Vec<T>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, T, S: DeserializeSeed<'de, Value = T>, F: FnMut() -> S> Visitor<'de> for ListOf<F, T> {
    type Value = Vec<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_none<E: de::Error>(self) -> Result<Vec<T>, E> {
        if self.allow_empty {
            Ok(Vec::new())
        } else {
            Err(E::custom(format!("is empty; expected {}", self.expecting)))
        }
    }
    fn visit_unit<E: de::Error>(self) -> Result<Vec<T>, E> {
        self.visit_none()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(x) = seq.next_element_seed((self.item)())? {
            if out.len() == self.max {
                return Err(de::Error::custom(format!("more than {} entries", self.max)));
            }
            (self.check)(&out, &x).map_err(de::Error::custom)?;
            out.push(x);
        }
        if out.is_empty() && !self.allow_empty {
            return Err(de::Error::custom(format!("is empty; expected {}", self.expecting)));
        }
        Ok(out)
    }
}

/// A pattern, or a list of them.
struct Patterns;

impl<'de> DeserializeSeed<'de> for Patterns {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Patterns {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a path pattern such as \"target/*.tar.gz\", or a list of them")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
        check_pattern(v).map(|p| vec![p]).map_err(E::custom)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut out = Vec::new();
        while let Some(p) =
            seq.next_element_seed(Text { expecting: "a path pattern", check: check_pattern })?
        {
            if out.len() == MAX_PATTERNS {
                return Err(de::Error::custom(format!("more than {MAX_PATTERNS} patterns")));
            }
            out.push(p);
        }
        Ok(out)
    }
}

/// `{paths, exclude}` (and, with `named`, `name`) or, for `archive`, a bare list of patterns.
pub(super) struct SelectionSeed {
    pub named: bool,
}

impl<'de> DeserializeSeed<'de> for SelectionSeed {
    type Value = (Option<String>, Selection);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SelectionSeed {
    type Value = (Option<String>, Selection);
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.named {
            f.write_str("a mapping such as {name: bin, paths: [\"target/release/app\"]}")
        } else {
            f.write_str("a mapping such as {paths: [\"dist/**\"]}, or a list of patterns")
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if self.named {
            return Err(E::custom(
                "give a mapping with \"name\" and \"paths\", such as {name: bin, paths: [\"out/**\"]}",
            ));
        }
        Ok((None, Selection { paths: Patterns.visit_str(v)?, exclude: Vec::new() }))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        if self.named {
            return Err(de::Error::custom(
                "give a mapping with \"name\" and \"paths\", such as {name: bin, paths: [\"out/**\"]}",
            ));
        }
        let paths = Patterns.visit_seq(seq)?;
        if paths.is_empty() {
            return Err(de::Error::custom("is empty; give at least one path pattern"));
        }
        Ok((None, Selection { paths, exclude: Vec::new() }))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let fields: &'static [&'static str] =
            if self.named { &["name", "paths", "exclude"] } else { &["paths", "exclude"] };
        let mut seen = Vec::new();
        let (mut name, mut paths, mut exclude) = (None, None, Vec::new());
        while let Some(f) = map.next_key_seed(Field { fields, seen: &mut seen })? {
            match f {
                "name" => {
                    name = Some(
                        map.next_value_seed(Text { expecting: "a stash name", check: check_stash_name })?,
                    )
                }
                "paths" => paths = Some(map.next_value_seed(Patterns)?),
                "exclude" => exclude = map.next_value_seed(Nullable(Patterns))?.unwrap_or_default(),
                _ => unreachable!(),
            }
        }
        if self.named && name.is_none() {
            return Err(de::Error::custom("missing field \"name\" (what unstash will ask for)"));
        }
        let paths = paths.filter(|p| !p.is_empty()).ok_or_else(|| {
            de::Error::custom(
                "missing field \"paths\": give the files to take, such as [\"target/*.tar.gz\"]",
            )
        })?;
        Ok((name, Selection { paths, exclude }))
    }
}

/// `retry: N` or `retry: {count: N, on: [agent-lost | failure]}`; `stage` allows `on`.
pub(super) struct RetrySeed {
    pub stage: bool,
}

fn check_count(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_RETRY).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number of attempts from 1 to {MAX_RETRY}")),
    }
}

impl<'de> DeserializeSeed<'de> for RetrySeed {
    type Value = Retry;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Retry, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RetrySeed {
    type Value = Retry;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.stage {
            f.write_str("a number of attempts, or {count: N, on: [agent-lost]}")
        } else {
            f.write_str("a number of attempts")
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Retry, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Retry, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Retry, E> {
        Ok(Retry { count: check_count(v).map_err(E::custom)?, on: RetryOn::Failure })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Retry, A::Error> {
        if !self.stage {
            return Err(de::Error::custom(
                "a step's retry is a number of attempts; `on:` belongs to a stage's retry (a new agent for each attempt)",
            ));
        }
        let mut seen = Vec::new();
        let mut retry = Retry::default();
        let mut count = None;
        while let Some(f) = map.next_key_seed(Field { fields: &["count", "on"], seen: &mut seen })? {
            if f == "count" {
                count = Some(
                    map.next_value_seed(Text { expecting: "a number of attempts", check: check_count })?,
                );
            } else {
                let on = map.next_value_seed(ListOf {
                    check: any_items,
                    expecting: "a list of conditions: agent-lost, failure",
                    max: 2,
                    allow_empty: false,
                    item: || Text {
                        expecting: "agent-lost or failure",
                        check: |s| match s {
                            "agent-lost" => Ok(RetryOn::AgentLost),
                            "failure" => Ok(RetryOn::Failure),
                            _ => Err(format!("{s:?} is not a retry condition; use agent-lost or failure")),
                        },
                    },
                })?;
                retry.on = if on.contains(&RetryOn::Failure) { RetryOn::Failure } else { RetryOn::AgentLost };
            }
        }
        retry.count = count.ok_or_else(|| de::Error::custom("missing field \"count\" (attempts in all)"))?;
        Ok(retry)
    }
}

/// A `when:` mapping.
struct WhenSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for WhenSeed {
    type Value = When;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<When, D::Error> {
        d.deserialize_map(self)
    }
}

/// `{NAME: value}` or `{NAME: [a, b]}`.
struct WhenEnv;

impl<'de> DeserializeSeed<'de> for WhenEnv {
    type Value = Vec<(String, Vec<String>)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

/// One value, or a list of them.
struct Values;

impl<'de> DeserializeSeed<'de> for Values {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Values {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value, or a list of values")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
        check_env_value(v).map(|v| vec![v]).map_err(E::custom)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Vec<String>, E> {
        Ok(vec![v.to_string()])
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Vec<String>, E> {
        Ok(vec![v.to_string()])
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vec<String>, E> {
        Ok(vec![v.to_string()])
    }
    fn visit_unit<E: de::Error>(self) -> Result<Vec<String>, E> {
        Ok(vec![String::new()])
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Text { expecting: "a value", check: check_env_value })? {
            if out.len() == MAX_AXIS_VALUES {
                return Err(de::Error::custom(format!("more than {MAX_AXIS_VALUES} values")));
            }
            out.push(v);
        }
        Ok(out)
    }
}

impl<'de> Visitor<'de> for WhenEnv {
    type Value = Vec<(String, Vec<String>)>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of variable names to values, such as {DEPLOY: \"yes\"}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        while let Some(k) = map.next_key_seed(Text { expecting: "a variable name", check: check_var_name })? {
            if out.iter().any(|(n, _)| *n == k) {
                return Err(de::Error::custom(format!("variable {k:?} is named twice")));
            }
            if out.len() == MAX_ENV_VARS {
                return Err(de::Error::custom(format!("more than {MAX_ENV_VARS} variables")));
            }
            out.push((k, map.next_value_seed(Values)?));
        }
        Ok(out)
    }
}

impl<'de> Visitor<'de> for WhenSeed {
    type Value = When;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a condition such as {env: {DEPLOY: \"yes\"}}, with not, anyOf or allOf")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<When, A::Error> {
        if self.depth > MAX_WHEN_DEPTH {
            return Err(de::Error::custom(format!("conditions nest deeper than {MAX_WHEN_DEPTH} levels")));
        }
        let mut seen = Vec::new();
        let mut all = Vec::new();
        let depth = self.depth + 1;
        while let Some(f) =
            map.next_key_seed(Field { fields: &["env", "not", "anyOf", "allOf"], seen: &mut seen })?
        {
            match f {
                "env" => all.push(When::Env(map.next_value_seed(WhenEnv)?)),
                "not" => all.push(When::Not(Box::new(map.next_value_seed(WhenSeed { depth })?))),
                "anyOf" | "allOf" => {
                    let list = map.next_value_seed(ListOf {
                        check: any_items,
                        expecting: "a list of conditions",
                        max: 16,
                        allow_empty: false,
                        item: || WhenSeed { depth },
                    })?;
                    all.push(if f == "anyOf" { When::AnyOf(list) } else { When::AllOf(list) });
                }
                _ => unreachable!(),
            }
        }
        match all.len() {
            0 => Err(de::Error::custom("is empty; give a condition such as {env: {DEPLOY: \"yes\"}}")),
            1 => Ok(all.pop().expect("one")),
            _ => Ok(When::AllOf(all)),
        }
    }
}

/// `post:`.
pub(super) struct PostSeed;

impl<'de> DeserializeSeed<'de> for PostSeed {
    type Value = Post;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Post, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PostSeed {
    type Value = Post;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping such as {always: [{sh: make clean}], failure: [...]}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Post, A::Error> {
        let mut seen = Vec::new();
        let mut post = Post::default();
        while let Some(f) = map
            .next_key_seed(Field { fields: &["always", "success", "failure", "aborted"], seen: &mut seen })?
        {
            let steps = map.next_value_seed(StepList)?;
            match f {
                "always" => post.always = steps,
                "success" => post.success = steps,
                "failure" => post.failure = steps,
                "aborted" => post.aborted = steps,
                _ => unreachable!(),
            }
        }
        Ok(post)
    }
}

/// A list of steps (1 to `MAX_STEPS`).
pub(super) struct StepList;

impl<'de> DeserializeSeed<'de> for StepList {
    type Value = Vec<StepSpec>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<StepSpec>, D::Error> {
        super::StepsSeed.deserialize(d)
    }
}

/// `parameters:`.
pub(super) struct ParamsSeed;

impl<'de> DeserializeSeed<'de> for ParamsSeed {
    type Value = Vec<Parameter>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Parameter>, D::Error> {
        ListOf {
            check: |before: &[Parameter], p: &Parameter| {
                if before.iter().any(|q| q.name == p.name) {
                    return Err(format!("parameter {:?} is declared twice", p.name));
                }
                Ok(())
            },
            expecting: "a list of parameters such as [{name: TARGET, default: x86_64}]",
            max: MAX_PARAMETERS,
            allow_empty: true,
            item: || ParamMap,
        }
        .deserialize(d)
    }
}

struct ParamMap;

impl<'de> DeserializeSeed<'de> for ParamMap {
    type Value = Parameter;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Parameter, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ParamMap {
    type Value = Parameter;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a parameter such as {name: TARGET, default: x86_64}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parameter, A::Error> {
        let mut seen = Vec::new();
        let mut p = Parameter {
            name: String::new(),
            default: String::new(),
            choices: Vec::new(),
            description: String::new(),
        };
        let mut name = None;
        let mut default = None;
        while let Some(f) = map.next_key_seed(Field {
            fields: &["name", "default", "choices", "description"],
            seen: &mut seen,
        })? {
            match f {
                "name" => {
                    name = Some(
                        map.next_value_seed(Text { expecting: "a variable name", check: check_var_name })?,
                    )
                }
                "default" => {
                    default =
                        map.next_value_seed(Nullable(Text { expecting: "a value", check: check_env_value }))?
                }
                "choices" => {
                    p.choices = map.next_value_seed(Values)?;
                    if p.choices.is_empty() {
                        return Err(de::Error::custom("choices: is empty; list the allowed values"));
                    }
                }
                "description" => {
                    p.description = map
                        .next_value_seed(Nullable(Text {
                            expecting: "a description",
                            check: |s| Ok(s.chars().take(500).collect()),
                        }))?
                        .unwrap_or_default()
                }
                _ => unreachable!(),
            }
        }
        p.name = name.ok_or_else(|| de::Error::custom("missing field \"name\" (the variable steps see)"))?;
        // With choices and no default, the first choice is the default (as in Jenkins).
        p.default = match default {
            Some(d) => d,
            None => p.choices.first().cloned().unwrap_or_default(),
        };
        if !p.choices.is_empty() && !p.choices.contains(&p.default) {
            return Err(de::Error::custom(format!(
                "parameter {}: the default {:?} is not one of its choices",
                p.name, p.default
            )));
        }
        Ok(p)
    }
}

/// A `stages:` list (or, with `branch`, a `parallel:` one): names unique.
pub(super) struct StagesSeed {
    pub branch: bool,
}

impl<'de> DeserializeSeed<'de> for StagesSeed {
    type Value = Vec<Stage>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Stage>, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for StagesSeed {
    type Value = Vec<Stage>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what())
    }
    fn visit_none<E: de::Error>(self) -> Result<Vec<Stage>, E> {
        Err(E::custom(format!("is empty; expected {}", self.what())))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Vec<Stage>, E> {
        self.visit_none()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Stage>, D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Stage>, A::Error> {
        let mut out: Vec<Stage> = Vec::new();
        loop {
            let names: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
            let Some(s) = seq.next_element_seed(StageMap { branch: self.branch, taken: &names })? else {
                break;
            };
            if out.len() == MAX_STAGES {
                return Err(de::Error::custom(format!("more than {MAX_STAGES} entries")));
            }
            out.push(s);
        }
        if out.is_empty() {
            return Err(de::Error::custom(format!("is empty; expected {}", self.what())));
        }
        Ok(out)
    }
}

impl StagesSeed {
    fn what(&self) -> &'static str {
        if self.branch {
            "a list of branches, each such as {name: unit, steps: [{sh: make test}]}"
        } else {
            "a list of stages, each such as {name: build, steps: [{sh: make}]}"
        }
    }
}

struct StageMap<'a> {
    branch: bool,
    /// Names of the siblings before it.
    taken: &'a [&'a str],
}

impl<'de> DeserializeSeed<'de> for StageMap<'_> {
    type Value = Stage;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Stage, D::Error> {
        d.deserialize_map(self)
    }
}

/// `matrix:`'s mapping.
struct MatrixMap;

type Axes = Vec<(String, Vec<String>)>;
type Excludes = Vec<Vec<(String, String)>>;

impl<'de> DeserializeSeed<'de> for MatrixMap {
    type Value = (Axes, Excludes);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

/// `axes:`: names to lists of values.
struct AxesMap;

impl<'de> DeserializeSeed<'de> for AxesMap {
    type Value = Axes;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Axes, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for AxesMap {
    type Value = Axes;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of axis names to lists of values, such as {arch: [x86_64, aarch64]}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Axes, A::Error> {
        let mut axes: Axes = Vec::new();
        while let Some(k) = map.next_key_seed(Text { expecting: "an axis name", check: check_var_name })? {
            if axes.iter().any(|(n, _)| *n == k) {
                return Err(de::Error::custom(format!("axis {k:?} is given twice")));
            }
            if axes.len() == MAX_AXES {
                return Err(de::Error::custom(format!("more than {MAX_AXES} axes")));
            }
            let values = map.next_value_seed(ListOf {
                check: any_items,
                expecting: "a list of values such as [x86_64, aarch64]",
                max: MAX_AXIS_VALUES,
                allow_empty: false,
                item: || Text { expecting: "an axis value", check: check_axis_value },
            })?;
            for (i, v) in values.iter().enumerate() {
                if values[..i].contains(v) {
                    return Err(de::Error::custom(format!("axis {k:?} lists {v:?} twice")));
                }
            }
            axes.push((k, values));
        }
        if axes.is_empty() {
            return Err(de::Error::custom(
                "is empty; give at least one axis, such as {arch: [x86_64, aarch64]}",
            ));
        }
        Ok(axes)
    }
}

/// One `exclude:` entry: axis names to one value each.
struct CellMap;

impl<'de> DeserializeSeed<'de> for CellMap {
    type Value = Vec<(String, String)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for CellMap {
    type Value = Vec<(String, String)>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of axis names to values, such as {arch: armv7}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out: Vec<(String, String)> = Vec::new();
        while let Some(k) = map.next_key_seed(Text { expecting: "an axis name", check: check_var_name })? {
            if out.iter().any(|(n, _)| *n == k) || out.len() == MAX_AXES {
                return Err(de::Error::custom(format!("axis {k:?} is given twice")));
            }
            out.push((k, map.next_value_seed(Text { expecting: "an axis value", check: check_axis_value })?));
        }
        if out.is_empty() {
            return Err(de::Error::custom("is empty; name the cell to leave out, such as {arch: armv7}"));
        }
        Ok(out)
    }
}

impl<'de> Visitor<'de> for MatrixMap {
    type Value = (Axes, Excludes);
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping such as {axes: {arch: [x86_64, aarch64]}, exclude: [{arch: aarch64}]}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = Vec::new();
        let (mut axes, mut exclude) = (None, Vec::new());
        while let Some(f) = map.next_key_seed(Field { fields: &["axes", "exclude"], seen: &mut seen })? {
            if f == "axes" {
                axes = Some(map.next_value_seed(AxesMap)?);
            } else {
                exclude = map.next_value_seed(ListOf {
                    check: any_items,
                    expecting: "a list of cells to leave out, such as [{arch: armv7}]",
                    max: MAX_CELLS,
                    allow_empty: true,
                    item: || CellMap,
                })?;
            }
        }
        let axes: Axes = axes
            .ok_or_else(|| de::Error::custom("missing field \"axes\", such as {arch: [x86_64, aarch64]}"))?;
        for cell in &exclude {
            for (k, v) in cell {
                match axes.iter().find(|(n, _)| n == k) {
                    None => {
                        return Err(de::Error::custom(format!(
                            "exclude names axis {k:?}, which the matrix does not have"
                        )))
                    }
                    Some((_, vs)) if !vs.contains(v) => {
                        return Err(de::Error::custom(format!(
                            "exclude names {k}={v}, which axis {k:?} does not list"
                        )))
                    }
                    _ => {}
                }
            }
        }
        let cells: usize = axes.iter().map(|(_, v)| v.len()).product();
        if cells > MAX_CELLS * 4 {
            return Err(de::Error::custom(format!("the axes make {cells} cells; the limit is {MAX_CELLS}")));
        }
        Ok((axes, exclude))
    }
}

/// The stage-level `agent:`: a label template and an inline pod template.
struct StageAgent;

impl<'de> DeserializeSeed<'de> for StageAgent {
    type Value = AgentSpec;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<AgentSpec, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for StageAgent {
    type Value = AgentSpec;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping such as {label: \"linux && ${arch}\"}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AgentSpec, A::Error> {
        let mut seen = Vec::new();
        let mut agent = AgentSpec::default();
        while let Some(f) = map.next_key_seed(Field { fields: &["label", "kubernetes"], seen: &mut seen })? {
            if f == "label" {
                let text = Text { expecting: "a label expression", check: check_label_template };
                agent.label = map.next_value_seed(Nullable(text))?.flatten();
            } else {
                agent.kubernetes = map.next_value::<Option<PodTemplate>>()?;
            }
        }
        Ok(agent)
    }
}

impl<'de> Visitor<'de> for StageMap<'_> {
    type Value = Stage;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a stage: a mapping such as {name: build, steps: [{sh: make}]}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Stage, A::Error> {
        const STAGE: &[&str] = &[
            "name", "agent", "env", "when", "retry", "steps", "parallel", "matrix", "failFast", "post",
            "archive",
        ];
        const BRANCH: &[&str] = &["name", "agent", "env", "when", "retry", "steps", "post", "archive"];
        let mut seen = Vec::new();
        let mut name = None;
        let mut stage = Stage {
            name: String::new(),
            agent: None,
            env: Vec::new(),
            when: None,
            retry: Retry::default(),
            fail_fast: false,
            body: Body::Steps(Vec::new()),
            post: Post::default(),
            archive: None,
        };
        let (mut steps, mut parallel, mut matrix) = (None, None, None);
        let mut has_retry = false;
        while let Some(f) =
            map.next_key_seed(Field { fields: if self.branch { BRANCH } else { STAGE }, seen: &mut seen })?
        {
            match f {
                "name" => {
                    let n =
                        map.next_value_seed(Text { expecting: "a stage name", check: check_stage_name })?;
                    if self.taken.contains(&n.as_str()) {
                        return Err(de::Error::custom(format!(
                            "two {} are named {n:?}; names must differ",
                            if self.branch { "branches" } else { "stages" }
                        )));
                    }
                    name = Some(n);
                }
                "agent" => stage.agent = map.next_value_seed(Nullable(StageAgent))?,
                "env" => stage.env = map.next_value_seed(EnvSeed)?,
                "when" => stage.when = Some(map.next_value_seed(WhenSeed { depth: 0 })?),
                "retry" => {
                    stage.retry = map.next_value_seed(RetrySeed { stage: true })?;
                    has_retry = true;
                }
                "steps" => steps = Some(map.next_value_seed(StepList)?),
                "parallel" => parallel = Some(map.next_value_seed(StagesSeed { branch: true })?),
                "matrix" => matrix = Some(map.next_value_seed(MatrixMap)?),
                "failFast" => {
                    stage.fail_fast = map.next_value_seed(Text {
                        expecting: "true or false",
                        check: |s| match s {
                            "true" => Ok(true),
                            "false" => Ok(false),
                            _ => Err(format!("{s:?} is not true or false")),
                        },
                    })?
                }
                "post" => stage.post = map.next_value_seed(PostSeed)?,
                "archive" => stage.archive = Some(map.next_value_seed(SelectionSeed { named: false })?.1),
                _ => unreachable!(),
            }
        }
        stage.name = name.ok_or_else(|| {
            de::Error::custom("missing field \"name\"; give the stage a name such as \"name: build\"")
        })?;
        stage.body = match (steps, parallel, matrix) {
            (Some(s), None, None) => Body::Steps(s),
            (None, Some(b), None) => {
                if !stage.post.is_empty() || has_retry || stage.archive.is_some() {
                    return Err(de::Error::custom(format!(
                        "stage {:?}: post, retry and archive go in each parallel branch (or, for post, at the \
                         pipeline level), not in the stage that holds them",
                        stage.name
                    )));
                }
                Body::Parallel(b)
            }
            (s, None, Some((axes, exclude))) => {
                let steps = s.ok_or_else(|| {
                    de::Error::custom(format!(
                        "stage {:?}: a matrix needs \"steps\" to run in each cell",
                        stage.name
                    ))
                })?;
                Body::Matrix { axes, exclude, steps }
            }
            (None, None, None) => {
                return Err(de::Error::custom(format!(
                    "stage {:?} has nothing to run: give it \"steps\"{}",
                    stage.name,
                    if self.branch { "" } else { ", \"parallel\" or \"matrix\"" }
                )))
            }
            _ => {
                return Err(de::Error::custom(format!(
                    "stage {:?}: give one of \"steps\" or \"parallel\" (a matrix takes \"steps\")",
                    stage.name
                )))
            }
        };
        if stage.fail_fast && matches!(stage.body, Body::Steps(_)) {
            return Err(de::Error::custom(format!(
                "stage {:?}: failFast is for a stage with parallel branches or a matrix",
                stage.name
            )));
        }
        Ok(stage)
    }
}

/// The default name of a step that is not `sh`.
pub(super) fn kind_name(kind: &StepKind) -> String {
    let list = |s: &Selection| {
        let mut t = s.paths.join(", ");
        if t.chars().count() > 50 {
            t = t.chars().take(50).collect::<String>() + "…";
        }
        t
    };
    match kind {
        StepKind::Sh { script, .. } => super::default_step_name(script),
        StepKind::Stash { name, sel } => format!("stash {name} ({})", list(sel)),
        StepKind::Unstash { name } => format!("unstash {name}"),
        StepKind::Archive { sel } => format!("archive {}", list(sel)),
    }
}

/// For a label without `${`: the expression, parsed.
pub fn parse_label(text: &str) -> Result<Option<(String, LabelExpr)>, String> {
    check_label(text)
}
