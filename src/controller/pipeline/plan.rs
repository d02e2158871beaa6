//! A pipeline made concrete for one build: its parameters given, every matrix cell expanded,
//! every `when:` decided, each stage's agent resolved, and every step numbered with its whole
//! environment merged. What the runner walks, and what the store's step rows are made from.
//!
//! Steps are numbered from 1 in the order written (a matrix's cells in the order of their axes,
//! each cell's post steps after its steps, the pipeline's post steps last). A retried step or
//! stage gets new numbers after these when it runs again. Units are the agent reservations a
//! build needs: unit 0 is the pipeline's own agent (for stages that name none, and for the
//! pipeline's `post`), held from its first use to the build's end; every stage, branch or matrix
//! cell with an agent of its own is a unit of its own, held while it runs.

use super::stages::{fill, Body, Parameter, Retry, Selection, Stage, StepKind, StepSpec};
use super::{env_entry_len, frame_len, labels, Pipeline, PipelineError, Step, MAX_ENV_VARS, MAX_FRAME};
use crate::controller::labels::LabelExpr;
use crate::controller::template::PodTemplate;
use std::collections::BTreeMap;

/// Steps one build may plan (after matrix expansion).
pub const MAX_PLANNED: usize = 1024;
/// Bytes of all the planned steps' scripts and environments together.
pub const MAX_PLAN_BYTES: usize = 16 << 20;

/// One agent reservation of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The stage it is for ("" for the pipeline's own agent).
    pub stage: String,
    /// The label expression, filled in and trimmed; `None` for any node.
    pub label: Option<String>,
    /// `label` parsed.
    pub label_expr: LabelExpr,
    /// An inline pod template.
    pub kubernetes: Option<PodTemplate>,
}

/// What a planned step does besides `sh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Run `step.script`.
    Sh,
    /// Keep files as stash `name` for later stages.
    Stash {
        /// The stash's name.
        name: String,
        /// What to keep (relative to `step.dir`).
        sel: Selection,
    },
    /// Put stash `name`'s files into the workspace (under `step.dir`).
    Unstash {
        /// The stash's name.
        name: String,
    },
    /// Keep files as the build's artifacts.
    Archive {
        /// What to keep (relative to `step.dir`).
        sel: Selection,
    },
}

/// One numbered step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The unit it runs on.
    pub unit: u32,
    /// Its stage's path ("build / arch=x86_64"); "" for a pipeline of plain steps.
    pub stage: String,
    /// The step: name, script, timeout, merged env, dir, shell, container.
    pub step: Step,
    /// What it does.
    pub kind: Kind,
    /// Attempts in all (`retry: N` on the step).
    pub attempts: u32,
    /// Decided at planning: a `when:` that does not hold skips it.
    pub skipped: bool,
}

impl std::ops::Deref for Planned {
    type Target = Step;
    fn deref(&self) -> &Step {
        &self.step
    }
}

/// Post steps of a block, by condition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PostSteps {
    /// Run whatever the result.
    pub always: Vec<u32>,
    /// Run after success.
    pub success: Vec<u32>,
    /// Run after failure.
    pub failure: Vec<u32>,
    /// Run after a cancel.
    pub aborted: Vec<u32>,
}

impl PostSteps {
    /// Every step number in it.
    pub fn all(&self) -> impl Iterator<Item = u32> + '_ {
        self.always.iter().chain(&self.success).chain(&self.failure).chain(&self.aborted).copied()
    }
}

/// A stage's steps on one unit: what a retry runs again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The unit it runs on.
    pub unit: u32,
    /// Its stage's path.
    pub stage: String,
    /// Its steps, in order.
    pub steps: Vec<u32>,
    /// Its post steps.
    pub post: PostSteps,
    /// Its `retry:`.
    pub retry: Retry,
    /// Skipped by its `when:`.
    pub skipped: bool,
}

/// How a build's blocks run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exec {
    /// One after another; the first failure stops the rest.
    Seq(Vec<Exec>),
    /// All at once; the result is the worst of theirs.
    Par {
        /// The branches.
        branches: Vec<Exec>,
        /// A failing branch cancels the others.
        fail_fast: bool,
    },
    /// One stage's steps.
    Block(Block),
    /// The pipeline's `post:`, after everything else, on unit 0.
    Post {
        /// Everything else.
        body: Box<Exec>,
        /// The post steps.
        post: PostSteps,
    },
}

/// A build's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Agent reservations; 0 is the pipeline's own.
    pub units: Vec<Unit>,
    /// Steps; step N is `steps[N - 1]`.
    pub steps: Vec<Planned>,
    /// How they run.
    pub root: Exec,
    /// The parameters' values, by name.
    pub params: Vec<(String, String)>,
}

impl Plan {
    /// Step `n` (from 1).
    pub fn step(&self, n: u32) -> Option<&Planned> {
        self.steps.get((n as usize).checked_sub(1)?)
    }
}

/// Every parameter's value: `given` over the defaults. A name the pipeline does not declare, or
/// a value not among a parameter's choices, is an error.
pub fn resolve_params(
    declared: &[Parameter],
    given: &[(String, String)],
) -> Result<Vec<(String, String)>, PipelineError> {
    let mut out: BTreeMap<String, String> =
        declared.iter().map(|p| (p.name.clone(), p.default.clone())).collect();
    for (k, v) in given {
        let Some(p) = declared.iter().find(|p| p.name == *k) else {
            let names: Vec<&str> = declared.iter().map(|p| p.name.as_str()).collect();
            return Err(PipelineError::new(if names.is_empty() {
                format!("-p {k}: the pipeline declares no parameters (add a \"parameters:\" list)")
            } else {
                format!("-p {k}: the pipeline has no parameter {k:?}; it has {}", names.join(", "))
            }));
        };
        if v.contains('\0') || v.len() > MAX_FRAME {
            return Err(PipelineError::new(format!("-p {k}: the value is not a valid variable value")));
        }
        if !p.choices.is_empty() && !p.choices.contains(v) {
            return Err(PipelineError::new(format!(
                "-p {k}={v}: {v:?} is not one of its choices: {}",
                p.choices.join(", ")
            )));
        }
        out.insert(k.clone(), v.clone());
    }
    Ok(out.into_iter().collect())
}

struct Planner<'a> {
    p: &'a Pipeline,
    units: Vec<Unit>,
    steps: Vec<Planned>,
    bytes: usize,
}

/// The environment a stage sees, lowest first: parameters and the pipeline's env, then matrix
/// axes, then the stage's own.
type Env = BTreeMap<String, String>;

impl Planner<'_> {
    fn unit(
        &mut self,
        stage: &str,
        label: Option<&str>,
        kubernetes: Option<&PodTemplate>,
        env: &Env,
    ) -> Result<u32, PipelineError> {
        let (label, label_expr) = match label {
            None => (None, LabelExpr::default()),
            Some(text) => {
                let filled = fill(text, &|k| env.get(k).cloned())
                    .map_err(|e| PipelineError::new(format!("stage {stage:?}: agent.label: {e}")))?;
                match labels_parse(&filled).map_err(|e| {
                    PipelineError::new(format!("stage {stage:?}: agent.label {filled:?}: {e}"))
                })? {
                    None => (None, LabelExpr::default()),
                    Some((t, e)) => (Some(t), e),
                }
            }
        };
        self.units.push(Unit {
            stage: stage.to_string(),
            label,
            label_expr,
            kubernetes: kubernetes.cloned(),
        });
        Ok(self.units.len() as u32 - 1)
    }

    fn add(
        &mut self,
        unit: u32,
        stage: &str,
        spec: &StepSpec,
        env: &Env,
        skipped: bool,
    ) -> Result<u32, PipelineError> {
        if self.steps.len() == MAX_PLANNED {
            return Err(PipelineError::new(format!(
                "the pipeline makes more than {MAX_PLANNED} steps (matrix cells count each); split it"
            )));
        }
        let mut merged = env.clone();
        for (k, v) in &spec.env {
            merged.insert(k.clone(), v.clone());
        }
        let at = if stage.is_empty() {
            format!("steps[{}]", self.steps.len())
        } else {
            format!("stage {stage:?}, step {:?}", spec.name)
        };
        if merged.len() > MAX_ENV_VARS {
            return Err(PipelineError::new(format!(
                "{at}{}: with the pipeline's env the step has {} variables; the limit is {MAX_ENV_VARS}",
                if stage.is_empty() { ".env" } else { "" },
                merged.len()
            )));
        }
        let stash_name = |name: &str| -> Result<String, PipelineError> {
            fill(name, &|k| merged.get(k).cloned())
                .and_then(|n| super::check_name(&n).map_err(|e| format!("the stash name {n:?} {e}")))
                .map_err(|e| PipelineError::new(format!("{at}: {e}")))
        };
        // Patterns take `${NAME}` too (a matrix cell's own directory), checked again once filled.
        let fill_sel = |sel: &Selection| -> Result<Selection, PipelineError> {
            let one = |p: &String| {
                fill(p, &|k| merged.get(k).cloned())
                    .and_then(|f| super::stages::check_pattern(&f))
                    .map_err(|e| PipelineError::new(format!("{at}: pattern {p:?}: {e}")))
            };
            Ok(Selection {
                paths: sel.paths.iter().map(one).collect::<Result<_, _>>()?,
                exclude: sel.exclude.iter().map(one).collect::<Result<_, _>>()?,
            })
        };
        let (script, shell, kind) = match &spec.kind {
            StepKind::Sh { script, shell } => (script.clone(), shell.clone(), Kind::Sh),
            StepKind::Stash { name, sel } => {
                (String::new(), String::new(), Kind::Stash { name: stash_name(name)?, sel: fill_sel(sel)? })
            }
            StepKind::Unstash { name } => {
                (String::new(), String::new(), Kind::Unstash { name: stash_name(name)? })
            }
            StepKind::Archive { sel } => {
                (String::new(), String::new(), Kind::Archive { sel: fill_sel(sel)? })
            }
        };
        let sel_len = match &kind {
            Kind::Stash { sel, .. } | Kind::Archive { sel } => {
                sel.paths.iter().chain(&sel.exclude).map(|p| p.len() + 4).sum()
            }
            _ => 0,
        };
        let len = frame_len(&spec.dir, &shell, &script, merged.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            + sel_len;
        if len > MAX_FRAME {
            return Err(PipelineError::new(format!(
                "{at}: its script, environment, dir and shell take {len} bytes to send; the limit is {MAX_FRAME} \
                 (keep large data in files rather than in the script or env)"
            )));
        }
        self.bytes += len;
        if self.bytes > MAX_PLAN_BYTES {
            return Err(PipelineError::new(format!(
                "the pipeline's steps take more than {} MiB with every matrix cell expanded; make scripts shorter \
                 or the matrix smaller",
                MAX_PLAN_BYTES >> 20
            )));
        }
        let step = Step {
            name: spec.name.clone(),
            script,
            timeout_secs: spec.timeout_secs,
            env: merged.into_iter().collect(),
            dir: spec.dir.clone(),
            shell,
            container: spec.container.clone(),
        };
        self.steps.push(Planned {
            unit,
            stage: stage.to_string(),
            step,
            kind,
            attempts: spec.attempts,
            skipped,
        });
        Ok(self.steps.len() as u32)
    }

    fn post(
        &mut self,
        unit: u32,
        stage: &str,
        post: &super::stages::Post,
        env: &Env,
        skipped: bool,
    ) -> Result<PostSteps, PipelineError> {
        let mut out = PostSteps::default();
        for (list, into) in [
            (&post.always, &mut out.always),
            (&post.success, &mut out.success),
            (&post.failure, &mut out.failure),
            (&post.aborted, &mut out.aborted),
        ] {
            for s in list {
                into.push(self.add(unit, stage, s, env, skipped)?);
            }
        }
        Ok(out)
    }

    /// One block: `steps` (then `archive`, then `post`) of `stage` on a unit.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        stage: &Stage,
        path: &str,
        steps: &[StepSpec],
        env: &Env,
        agent: Option<&super::stages::AgentSpec>,
        skipped: bool,
    ) -> Result<Exec, PipelineError> {
        let skipped = skipped || stage.when.as_ref().is_some_and(|w| !w.holds(&|k| env.get(k).cloned()));
        let unit = match agent {
            Some(a) => self.unit(path, a.label.as_deref(), a.kubernetes.as_ref(), env)?,
            None => 0,
        };
        let mut nums = Vec::with_capacity(steps.len() + 1);
        for s in steps {
            nums.push(self.add(unit, path, s, env, skipped)?);
        }
        if let Some(sel) = &stage.archive {
            let kind = StepKind::Archive { sel: sel.clone() };
            let spec = StepSpec {
                name: super::stages::kind_name(&kind),
                kind,
                timeout_secs: 0,
                env: Vec::new(),
                dir: String::new(),
                container: None,
                attempts: 1,
            };
            nums.push(self.add(unit, path, &spec, env, skipped)?);
        }
        let post = self.post(unit, path, &stage.post, env, skipped)?;
        Ok(Exec::Block(Block {
            unit,
            stage: path.to_string(),
            steps: nums,
            post,
            retry: stage.retry,
            skipped,
        }))
    }

    fn stage(
        &mut self,
        stage: &Stage,
        parent: &str,
        env: &Env,
        inherited: Option<&super::stages::AgentSpec>,
        skipped: bool,
    ) -> Result<Exec, PipelineError> {
        let path = if parent.is_empty() { stage.name.clone() } else { format!("{parent} / {}", stage.name) };
        let mut env = env.clone();
        for (k, v) in &stage.env {
            env.insert(k.clone(), v.clone());
        }
        let agent = stage.agent.as_ref().or(inherited);
        match &stage.body {
            Body::Steps(steps) => self.block(stage, &path, steps, &env, agent, skipped),
            Body::Parallel(branches) => {
                let skipped =
                    skipped || stage.when.as_ref().is_some_and(|w| !w.holds(&|k| env.get(k).cloned()));
                let mut out = Vec::with_capacity(branches.len());
                for b in branches {
                    out.push(self.stage(b, &path, &env, agent, skipped)?);
                }
                Ok(Exec::Par { branches: out, fail_fast: stage.fail_fast })
            }
            Body::Matrix { axes, exclude, steps } => {
                let mut cells: Vec<Vec<(String, String)>> = vec![Vec::new()];
                for (name, values) in axes {
                    cells = cells
                        .into_iter()
                        .flat_map(|c| {
                            values.iter().map(move |v| {
                                let mut c = c.clone();
                                c.push((name.clone(), v.clone()));
                                c
                            })
                        })
                        .collect();
                }
                cells.retain(|c| !exclude.iter().any(|x| x.iter().all(|kv| c.contains(kv))));
                if cells.is_empty() {
                    return Err(PipelineError::new(format!(
                        "stage {path:?}: exclude leaves no cell of the matrix"
                    )));
                }
                if cells.len() > super::stages::MAX_CELLS {
                    return Err(PipelineError::new(format!(
                        "stage {path:?}: the matrix has {} cells; the limit is {}",
                        cells.len(),
                        super::stages::MAX_CELLS
                    )));
                }
                let mut out = Vec::with_capacity(cells.len());
                for c in cells {
                    let mut cenv = env.clone();
                    for (k, v) in &c {
                        cenv.insert(k.clone(), v.clone());
                    }
                    let name = c.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ");
                    out.push(self.block(stage, &format!("{path} / {name}"), steps, &cenv, agent, skipped)?);
                }
                Ok(Exec::Par { branches: out, fail_fast: stage.fail_fast })
            }
        }
    }
}

fn labels_parse(text: &str) -> Result<Option<(String, LabelExpr)>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    labels::parse(t).map(|e| Some((t.to_string(), e))).map_err(|e| e.to_string())
}

/// Plan `p` with parameter values `given` (over the defaults).
pub fn plan(p: &Pipeline, given: &[(String, String)]) -> Result<Plan, PipelineError> {
    let params = resolve_params(&p.parameters, given)?;
    let mut env: Env = params.iter().cloned().collect();
    for (k, v) in &p.env {
        env.insert(k.clone(), v.clone());
    }
    let mut pl = Planner { p, units: Vec::new(), steps: Vec::new(), bytes: 0 };
    pl.units.push(Unit {
        stage: String::new(),
        label: pl.p.label.clone(),
        label_expr: pl.p.label_expr.clone(),
        kubernetes: pl.p.kubernetes.clone(),
    });
    let mut seq = Vec::with_capacity(p.stages.len());
    for s in &p.stages {
        seq.push(pl.stage(s, "", &env, None, false)?);
    }
    let mut root = Exec::Seq(seq);
    if !p.post.is_empty() {
        let post = pl.post(0, "post", &p.post, &env, false)?;
        root = Exec::Post { body: Box::new(root), post };
    }
    // Checked once more on the whole, since cells and posts add up.
    debug_assert!(pl.steps.iter().all(|s| s
        .step
        .env
        .iter()
        .map(|(k, v)| env_entry_len(k, v))
        .sum::<usize>()
        <= MAX_FRAME));
    Ok(Plan { units: pl.units, steps: pl.steps, root, params })
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Pipeline};
    use super::*;

    fn err(yaml: &str) -> String {
        parse(yaml).unwrap_err().to_string()
    }

    fn names(p: &Plan) -> Vec<String> {
        p.steps.iter().map(|s| format!("{}|{}", s.stage, s.step.name)).collect()
    }

    fn env(s: &Planned, k: &str) -> Option<String> {
        s.step.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    const FULL: &str = r#"
name: wisp
agent: {label: linux}
parameters:
  - {name: TARGET, default: x86_64, choices: [x86_64, aarch64]}
  - {name: FAST}
env: {V: "1"}
stages:
  - name: build
    agent: {label: "linux && ${arch}"}
    matrix:
      axes: {arch: [x86_64, aarch64, armv7], os: [linux]}
      exclude: [{arch: aarch64}]
    steps:
      - sh: make
      - stash: {name: bin, paths: "target/*/wisp-agent"}
    archive: ["dist/**"]
    post:
      failure: [{sh: echo failed}]
  - name: test
    failFast: true
    parallel:
      - name: unit
        retry: {count: 3, on: [agent-lost]}
        steps: [{unstash: bin}, {sh: make test, retry: 2}]
      - name: lint
        when: {env: {TARGET: aarch64}}
        agent: {label: lint}
        steps: [{sh: make lint}]
post:
  always: [{sh: echo done}]
"#;

    #[test]
    fn stages_matrix_parallel_and_post_expand_in_order() {
        let p = parse(FULL).unwrap();
        let plan = &p.plan;
        assert_eq!(
            names(plan),
            [
                "build / arch=x86_64, os=linux|make",
                "build / arch=x86_64, os=linux|stash bin (target/*/wisp-agent)",
                "build / arch=x86_64, os=linux|archive dist/**",
                "build / arch=x86_64, os=linux|echo failed",
                "build / arch=armv7, os=linux|make",
                "build / arch=armv7, os=linux|stash bin (target/*/wisp-agent)",
                "build / arch=armv7, os=linux|archive dist/**",
                "build / arch=armv7, os=linux|echo failed",
                "test / unit|unstash bin",
                "test / unit|make test",
                "test / lint|make lint",
                "post|echo done",
            ]
        );
        // Units: 0 the pipeline's, one per matrix cell, one for the lint branch (unit runs on 0).
        let labels: Vec<_> = plan.units.iter().map(|u| u.label.clone().unwrap_or_default()).collect();
        assert_eq!(labels, ["linux", "linux && x86_64", "linux && armv7", "lint"]);
        assert_eq!(plan.steps[0].unit, 1);
        assert_eq!(plan.steps[4].unit, 2);
        assert_eq!(plan.steps[8].unit, 0, "a branch without an agent runs on the pipeline's");
        assert_eq!(env(&plan.steps[0], "arch").as_deref(), Some("x86_64"));
        assert_eq!(env(&plan.steps[4], "arch").as_deref(), Some("armv7"));
        assert_eq!(env(&plan.steps[0], "TARGET").as_deref(), Some("x86_64"));
        assert_eq!(env(&plan.steps[0], "FAST").as_deref(), Some(""));
        assert_eq!(env(&plan.steps[0], "V").as_deref(), Some("1"));
        assert!(plan.steps[10].skipped, "lint's when does not hold by default");
        assert!(!plan.steps[9].skipped);
        assert_eq!(plan.steps[9].attempts, 2);
        assert!(
            matches!(&plan.steps[1].kind, Kind::Stash { name, sel } if name == "bin" && sel.paths == ["target/*/wisp-agent"])
        );
        assert!(matches!(&plan.steps[8].kind, Kind::Unstash { name } if name == "bin"));
        let Exec::Post { body, post } = &plan.root else { panic!("{:?}", plan.root) };
        assert_eq!(post.always, [12]);
        let Exec::Seq(stages) = &**body else { panic!() };
        let Exec::Par { branches, fail_fast: false } = &stages[0] else { panic!() };
        assert_eq!(branches.len(), 2);
        let Exec::Block(cell) = &branches[0] else { panic!() };
        assert_eq!((cell.steps.clone(), cell.post.failure.clone()), (vec![1, 2, 3], vec![4]));
        let Exec::Par { branches, fail_fast: true } = &stages[1] else { panic!() };
        let Exec::Block(unit) = &branches[0] else { panic!() };
        assert_eq!((unit.retry.count, unit.retry.on), (3, super::super::stages::RetryOn::AgentLost));
    }

    #[test]
    fn parameters_fill_env_labels_and_when() {
        let p = parse(FULL).unwrap();
        let plan =
            p.plan_with(&[("TARGET".into(), "aarch64".into()), ("FAST".into(), "yes".into())]).unwrap();
        assert!(!plan.steps[10].skipped, "lint runs for aarch64");
        assert_eq!(env(&plan.steps[0], "TARGET").as_deref(), Some("aarch64"));
        assert_eq!(
            plan.params,
            [("FAST".to_string(), "yes".to_string()), ("TARGET".into(), "aarch64".into())]
        );
        let e = p.plan_with(&[("TARGET".into(), "mips".into())]).unwrap_err().to_string();
        assert_eq!(e, "pipeline: -p TARGET=mips: \"mips\" is not one of its choices: x86_64, aarch64");
        let e = p.plan_with(&[("NOPE".into(), "1".into())]).unwrap_err().to_string();
        assert_eq!(e, "pipeline: -p NOPE: the pipeline has no parameter \"NOPE\"; it has TARGET, FAST");
        let plain = parse("name: a\nsteps: [{sh: make}]").unwrap();
        assert!(plain
            .plan_with(&[("X".into(), "1".into())])
            .unwrap_err()
            .to_string()
            .contains("declares no parameters"));
        // A parameter in a label.
        let p = parse("name: a\nparameters: [{name: L, default: big}]\nstages:\n  - name: s\n    agent: {label: \"${L} && x\"}\n    steps: [{sh: make}]").unwrap();
        assert_eq!(p.plan.units[1].label.as_deref(), Some("big && x"));
        let e = p.plan_with(&[("L".into(), "a b".into())]).unwrap_err().to_string();
        assert!(e.contains("stage \"s\": agent.label \"a b && x\""), "{e}");
    }

    #[test]
    fn plain_steps_are_one_stage_on_the_pipelines_agent() {
        let p: Pipeline = parse("name: a\nagent: {label: x}\nsteps: [{sh: make}, {sh: test}]").unwrap();
        assert_eq!(p.plan.units.len(), 1);
        assert_eq!(names(&p.plan), ["|make", "|test"]);
        assert_eq!(
            p.plan.root,
            Exec::Seq(vec![Exec::Block(Block {
                unit: 0,
                stage: String::new(),
                steps: vec![1, 2],
                post: PostSteps::default(),
                retry: Retry::default(),
                skipped: false,
            })])
        );
    }

    #[test]
    fn when_conditions_combine() {
        let yaml = |w: &str| {
            format!("name: a\nenv: {{A: x, B: y}}\nstages:\n  - name: s\n    when: {w}\n    steps: [{{sh: make}}]")
        };
        let skipped = |w: &str| parse(&yaml(w)).unwrap().plan.steps[0].skipped;
        assert!(!skipped("{env: {A: x}}"));
        assert!(skipped("{env: {A: z}}"));
        assert!(!skipped("{env: {A: [z, x]}}"));
        assert!(skipped("{not: {env: {A: x}}}"));
        assert!(!skipped("{anyOf: [{env: {A: z}}, {env: {B: y}}]}"));
        assert!(skipped("{allOf: [{env: {A: x}}, {env: {B: z}}]}"));
        assert!(skipped("{env: {A: x}, not: {env: {B: y}}}"), "two keys: both must hold");
        assert!(skipped("{env: {UNSET: x}}"));
        assert!(!skipped("{env: {UNSET: \"\"}}"), "an unset variable is empty");
        let e = err(&yaml("{env: {A: x}, nott: {}}"));
        assert!(
            e.contains("line 5 column") && e.contains("unknown field \"nott\" (did you mean \"not\"?)"),
            "{e}"
        );
        let deep = "{not: {not: {not: {not: {not: {not: {env: {A: x}}}}}}}}";
        assert!(err(&yaml(deep)).contains("conditions nest deeper than 4 levels"));
    }

    #[test]
    fn errors_name_the_field_and_its_position() {
        let e = err(
            "name: a\nstages:\n  - name: s\n    steps: [{sh: make}]\n  - name: s\n    steps: [{sh: make}]\n",
        );
        assert!(e.starts_with("pipeline: line 5 column 5: stages[1]: two stages are named \"s\""), "{e}");
        let e = err("name: a\nstages:\n  - steps: [{sh: make}]\n");
        assert!(e.contains("line 3 column 5: stages[0]: missing field \"name\""), "{e}");
        let e = err("name: a\nstages:\n  - name: s\n    stepz: [{sh: make}]\n");
        assert!(
            e.contains("line 4 column 5: stages[0]: unknown field \"stepz\" (did you mean \"steps\"?)"),
            "{e}"
        );
        let e = err("name: a\nstages:\n  - name: s\n");
        assert!(
            e.contains("stage \"s\" has nothing to run: give it \"steps\", \"parallel\" or \"matrix\""),
            "{e}"
        );
        let e = err("name: a\nsteps: [{sh: a}]\nstages: [{name: s, steps: [{sh: b}]}]\n");
        assert!(e.contains("give \"steps\" or \"stages\", not both"), "{e}");
        let e = err("name: a\nstages:\n  - name: s\n    parallel:\n      - name: b\n        parallel: []\n");
        assert!(e.contains("stages[0].parallel[0]: unknown field \"parallel\""), "{e}");
        let e =
            err("name: a\nstages:\n  - name: s\n    matrix: {axes: {arch: [a, a]}}\n    steps: [{sh: x}]\n");
        assert!(e.contains("stages[0].matrix.axes: axis \"arch\" lists \"a\" twice"), "{e}");
        let e = err("name: a\nstages:\n  - name: s\n    matrix: {axes: {arch: [a]}, exclude: [{os: b}]}\n    steps: [{sh: x}]\n");
        assert!(e.contains("exclude names axis \"os\", which the matrix does not have"), "{e}");
        let e = err("name: a\nstages:\n  - name: s\n    matrix: {axes: {arch: [a]}, exclude: [{arch: a}]}\n    steps: [{sh: x}]\n");
        assert_eq!(e, "pipeline: stage \"s\": exclude leaves no cell of the matrix");
        let e = err("name: a\nstages:\n  - name: s\n    agent: {label: \"${nope}\"}\n    steps: [{sh: x}]\n");
        assert_eq!(e, "pipeline: stage \"s\": agent.label: ${nope} is not a matrix axis, parameter or pipeline env variable");
        let e = err("name: a\nstages:\n  - name: s\n    agent: {label: \"${x} &&\"}\n    steps: [{sh: x}]\n");
        assert!(
            e.contains(
                "line 4 column 20: stages[0].agent.label: \"${x} &&\", each ${...} taken for one label:"
            ),
            "{e}"
        );
        let e = err("name: a\nsteps: [{sh: make, retry: 11}]\n");
        assert!(e.contains("steps[0].retry: \"11\" is not a number of attempts from 1 to 10"), "{e}");
        let e = err("name: a\nsteps: [{sh: make, retry: {count: 2, on: [agent-lost]}}]\n");
        assert!(e.contains("a step's retry is a number of attempts"), "{e}");
        let e = err("name: a\nstages: [{name: s, retry: {count: 2, on: [gone]}, steps: [{sh: make}]}]\n");
        assert!(e.contains("\"gone\" is not a retry condition; use agent-lost or failure"), "{e}");
        let e = err("name: a\nsteps: [{sh: make, unstash: x}]\n");
        assert!(e.contains("a step does one thing"), "{e}");
        let e = err("name: a\nsteps: [{archive: [\"../x\"]}]\n");
        assert!(e.contains("steps[0].archive[0]: \"../x\" contains \"..\""), "{e}");
        let e = err("name: a\nsteps: [{archive: [\"/etc/passwd\"]}]\n");
        assert!(e.contains("is absolute"), "{e}");
        let e = err("name: a\nsteps: [{stash: {paths: [x]}}]\n");
        assert!(e.contains("steps[0].stash: missing field \"name\""), "{e}");
        let e = err("name: a\nparameters: [{name: A}, {name: A}]\nsteps: [{sh: x}]\n");
        assert!(e.contains("parameter \"A\" is declared twice"), "{e}");
        let e = err("name: a\nparameters: [{name: A, default: z, choices: [x, y]}]\nsteps: [{sh: x}]\n");
        assert!(e.contains("the default \"z\" is not one of its choices"), "{e}");
        let e = err("name: a\nparameters: [{name: A}]\nenv: {A: x}\nsteps: [{sh: x}]\n");
        assert!(e.contains("\"A\" is both a parameter and a variable of the pipeline's env"), "{e}");
        let e = err("name: a\nstages: [{name: s, failFast: true, steps: [{sh: x}]}]\n");
        assert!(e.contains("failFast is for a stage with parallel branches or a matrix"), "{e}");
        let e = err("name: a\nstages: [{name: s, retry: 2, parallel: [{name: b, steps: [{sh: x}]}]}]\n");
        assert!(e.contains("post, retry and archive go in each parallel branch"), "{e}");
    }

    #[test]
    fn stash_names_take_axis_values() {
        let yaml = "name: a\nstages:\n  - name: s\n    matrix: {axes: {t: [x86_64, armv7]}}\n    steps: [{stash: {name: \"bin-${t}\", paths: [\"out/${t}/**\"]}}]\n  - name: u\n    steps: [{unstash: \"bin-armv7\"}]\n";
        let p = parse(yaml).unwrap();
        assert!(matches!(&p.plan.steps[1].kind, Kind::Stash { sel, .. } if sel.paths == ["out/armv7/**"]));
        let names: Vec<String> = p
            .plan
            .steps
            .iter()
            .map(|s| match &s.kind {
                Kind::Stash { name, .. } | Kind::Unstash { name } => name.clone(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(names, ["bin-x86_64", "bin-armv7", "bin-armv7"]);
        let e = err("name: a\nsteps: [{unstash: \"a b\"}]\n");
        assert!(e.contains("steps[0].unstash: \"a b\" has ' ' at column 2"), "{e}");
        let e = err("name: a\nparameters: [{name: P, default: \"x y\"}]\nsteps: [{unstash: \"${P}\"}]\n");
        assert!(e.contains("steps[0]: the stash name \"x y\" \"x y\" has ' '"), "{e}");
    }

    #[test]
    fn the_self_build_pipeline_plans() {
        let p = parse(include_str!("../../../.wisp/pipeline.yaml")).unwrap();
        let plan = p.plan_with(&[("SOURCE".into(), "/src/wisp".into())]).unwrap();
        let archived: Vec<String> = plan
            .steps
            .iter()
            .filter_map(|s| match &s.kind {
                Kind::Archive { sel } => Some(sel.paths.join(",")),
                _ => None,
            })
            .collect();
        assert_eq!(
            archived,
            [
                "out/x86_64-unknown-linux-musl/wisp-agent",
                "out/aarch64-unknown-linux-musl/wisp-agent",
                "out/armv7-unknown-linux-musleabihf/wisp-agent"
            ]
        );
        assert_eq!(env(&plan.steps[0], "SOURCE").as_deref(), Some("/src/wisp"));
    }

    #[test]
    fn expansion_is_bounded() {
        // 16 x 16 cells of a 40 KB script: over the plan's byte limit, refused, not built.
        let axis: Vec<String> = (0..16).map(|i| format!("v{i}")).collect();
        let yaml = format!(
            "name: a\nstages:\n  - name: s\n    matrix: {{axes: {{a: [{0}], b: [{0}]}}}}\n    steps:\n      - sh: \"{1}\"\n      - sh: \"{1}\"\n",
            axis.join(", "),
            "x".repeat(40_000)
        );
        let e = err(&yaml);
        assert!(e.contains("more than 16 MiB with every matrix cell expanded"), "{e}");
        let many: String = (0..5).map(|i| format!("      - sh: s{i}\n")).collect();
        let yaml = format!(
            "name: a\nstages:\n  - name: s\n    matrix: {{axes: {{a: [{0}], b: [{0}]}}}}\n    steps:\n{many}",
            axis.join(", ")
        );
        assert!(err(&yaml).contains("more than 1024 steps"));
        let big: Vec<String> = (0..40).map(|i| format!("v{i}")).collect();
        let yaml = format!("name: a\nstages:\n  - name: s\n    matrix: {{axes: {{a: [{0}], b: [{0}]}}}}\n    steps: [{{sh: x}}]\n", big.join(", "));
        assert!(err(&yaml).contains("the axes make 1600 cells; the limit is 256"));
    }
}
