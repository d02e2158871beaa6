//! Parse arbitrary text as a pipeline (what `POST /api/builds` accepts from any token holder).
//!
//! Properties: the parser never panics; whatever it accepts obeys the limits it promises: a safe
//! name and workspace (one path component, never "." or ".."), relative step directories without
//! "..", a bounded plan (1 to `MAX_PLANNED` steps, every unit it names exists), and every step's
//! directory passes `safe_rel_dir` again unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wisp::controller::pipeline::plan::MAX_PLANNED;
use wisp::controller::pipeline::{parse, safe_rel_dir, workspace_name};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(p) = parse(text) else { return };
    let ws = workspace_name(&p.name);
    assert!(!ws.is_empty() && ws != "." && ws != ".." && !ws.contains('/'), "unsafe workspace {ws:?}");
    let steps = &p.plan.steps;
    assert!(!steps.is_empty() && steps.len() <= MAX_PLANNED, "{} steps", steps.len());
    for s in steps {
        assert!((s.unit as usize) < p.plan.units.len(), "step on unit {} of {}", s.unit, p.plan.units.len());
        assert!(!s.dir.starts_with('/'), "absolute dir {:?}", s.dir);
        assert!(!s.dir.split('/').any(|c| c == ".."), "dir with .. {:?}", s.dir);
        assert_eq!(safe_rel_dir(&s.dir).as_deref(), Ok(s.dir.as_str()), "dir not canonical");
    }
});
