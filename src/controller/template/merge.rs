//! Inheritance and merging, by the rules of the plugin's `PodTemplateUtils`: [`combine`] of two
//! templates (`combine(PodTemplate, PodTemplate)`), [`resolve`] of `inheritFrom` (`unwrap`), and
//! [`combine_pods`] of two Pod manifests (`combine(Pod, Pod)`), which merges `yaml` layers and
//! puts a template's fields over its `yaml`.
//!
//! Where wisp differs from the plugin, on purpose: lists keep their order (the plugin collects
//! containers and volumes into hash maps), annotations of the same key take the child's value,
//! and [`combine_pods`] keeps every field of the child's Pod, where the plugin's builder keeps
//! only the fields it names (so a `merge` of two `yaml` layers lost, e.g., the second one's
//! `hostname`).

use super::{ContainerTemplate, PodTemplate};
use serde_json::{Map, Value};

/// Most templates one [`resolve`] combines (counting repeats through diamonds): the cycle guard
/// stops loops, this stops a chain of templates that each name the previous one many times.
const MAX_COMBINES: usize = 256;

/// `child` over `parent`: containers by name (a child container's unset fields fall back to the
/// parent container's; env by name, the child's winning; resources entry by entry), volumes by
/// mount path, `envVars` by name, labels and annotations as maps, image pull secrets combined.
/// `nodeSelector` and `serviceAccount` are the child's when it sets them, else the parent's
/// (the plugin replaces a node selector whole). Name, label and `podRetention` are the child's;
/// other scalars the child's where set. The `yaml` layers are the parent's then the child's:
/// with `override` only the last of them makes the pod ([`PodTemplate::yaml_layers`]).
pub fn combine(parent: &PodTemplate, child: &PodTemplate) -> PodTemplate {
    let mut containers = parent.containers.clone();
    for c in &child.containers {
        match containers.iter_mut().find(|p| p.name == c.name) {
            Some(p) => *p = combine_container(p, c),
            None => containers.push(c.clone()),
        }
    }
    let mut volumes = parent.volumes.clone();
    for v in &child.volumes {
        match volumes.iter_mut().find(|p| p.mount_path() == v.mount_path()) {
            Some(p) => *p = v.clone(),
            None => volumes.push(v.clone()),
        }
    }
    let mut image_pull_secrets = parent.image_pull_secrets.clone();
    for s in &child.image_pull_secrets {
        if !image_pull_secrets.contains(s) {
            image_pull_secrets.push(s.clone());
        }
    }
    let maps = |p: &std::collections::BTreeMap<String, String>,
                c: &std::collections::BTreeMap<String, String>| {
        let mut m = p.clone();
        m.extend(c.iter().map(|(k, v)| (k.clone(), v.clone())));
        m
    };
    let either = |p: &Option<String>, c: &Option<String>| match c {
        Some(s) if !s.is_empty() => c.clone(),
        _ => p.clone(),
    };
    let mut yaml = parent.yaml.clone();
    yaml.extend(child.yaml.iter().cloned());
    PodTemplate {
        name: child.name.clone(),
        label: child.label.clone(),
        inherit_from: either(&parent.inherit_from, &child.inherit_from),
        yaml,
        yaml_merge_strategy: child.yaml_merge_strategy,
        containers,
        env_vars: merge_env(&parent.env_vars, &child.env_vars),
        volumes,
        node_selector: if child.node_selector.is_empty() {
            parent.node_selector.clone()
        } else {
            child.node_selector.clone()
        },
        service_account: either(&parent.service_account, &child.service_account),
        image_pull_secrets,
        annotations: maps(&parent.annotations, &child.annotations),
        labels: maps(&parent.labels, &child.labels),
        instance_cap: child.instance_cap.or(parent.instance_cap),
        idle_minutes: if child.idle_minutes != 0 { child.idle_minutes } else { parent.idle_minutes },
        pod_retention: child.pod_retention,
        active_deadline_seconds: if child.active_deadline_seconds != 0 {
            child.active_deadline_seconds
        } else {
            parent.active_deadline_seconds
        },
        connect_timeout: child.connect_timeout.or(parent.connect_timeout),
        default_container: either(&parent.default_container, &child.default_container),
    }
}

/// A container template over its parent's of the same name.
fn combine_container(parent: &ContainerTemplate, child: &ContainerTemplate) -> ContainerTemplate {
    let words = |p: &Option<Vec<String>>, c: &Option<Vec<String>>| match c {
        Some(w) if !w.is_empty() => c.clone(),
        _ => p.clone(),
    };
    let text = |p: &Option<String>, c: &Option<String>| match c {
        Some(s) if !s.is_empty() => c.clone(),
        _ => p.clone(),
    };
    let resources = match (&parent.resources, &child.resources) {
        (Some(p), Some(c)) => Some(combine_resources(p, c)),
        (p, c) => c.clone().or_else(|| p.clone()),
    };
    ContainerTemplate {
        name: child.name.clone(),
        image: text(&parent.image, &child.image),
        command: words(&parent.command, &child.command),
        args: words(&parent.args, &child.args),
        env: merge_env(&parent.env, &child.env),
        working_dir: text(&parent.working_dir, &child.working_dir),
        resources,
    }
}

/// Variables by name: the parent's in order, each replaced by the child's of the same name, then
/// the child's new ones.
fn merge_env(parent: &[(String, String)], child: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = parent.to_vec();
    for (k, v) in child {
        match out.iter_mut().find(|(o, _)| o == k) {
            Some(e) => e.1 = v.clone(),
            None => out.push((k.clone(), v.clone())),
        }
    }
    out
}

/// `requests` and `limits` entry by entry (the child's winning), the rest the child's if set.
fn combine_resources(parent: &Value, child: &Value) -> Value {
    let mut out = overlay(parent, child);
    for key in ["requests", "limits"] {
        let merged = overlay(&parent[key], &child[key]);
        if let (Value::Object(o), false) = (&mut out, merged.is_null()) {
            o.insert(key.into(), merged);
        }
    }
    out
}

/// Apply `inheritFrom`: the named templates of `all` in order (each resolved itself first, later
/// ones winning), then `t` over them. Unknown names and cycles are skipped; each skip is
/// reported in the returned warnings, which the caller should show (the plugin only logs them).
/// `inheritFrom` empty or absent: `t` as it is.
pub fn resolve(t: &PodTemplate, all: &[PodTemplate]) -> (PodTemplate, Vec<String>) {
    let mut warnings = Vec::new();
    let mut stack = vec![t.name.clone()];
    let mut budget = MAX_COMBINES;
    let resolved = unwrap(t, all, &mut stack, &mut budget, &mut warnings);
    (resolved, warnings)
}

fn unwrap(
    t: &PodTemplate,
    all: &[PodTemplate],
    stack: &mut Vec<String>,
    budget: &mut usize,
    warnings: &mut Vec<String>,
) -> PodTemplate {
    let names: Vec<&str> = t.inherit_from.as_deref().unwrap_or("").split_whitespace().collect();
    let mut parent: Option<PodTemplate> = None;
    for name in names {
        if stack.iter().any(|s| s == name) {
            warnings.push(format!(
                "template {:?}: inheritFrom {name:?} makes a cycle ({} -> {name}); skipped",
                t.name,
                stack.join(" -> ")
            ));
            continue;
        }
        let Some(next) = all.iter().find(|x| x.name == name) else {
            warnings.push(format!(
                "template {:?}: inheritFrom names {name:?}, which does not exist; skipped",
                t.name
            ));
            continue;
        };
        if *budget == 0 {
            warnings.push(format!(
                "template {:?}: inheritance combines more than {MAX_COMBINES} templates; {name:?} and the rest \
                 skipped",
                t.name
            ));
            break;
        }
        *budget -= 1;
        stack.push(name.to_string());
        let next = unwrap(next, all, stack, budget, warnings);
        stack.pop();
        parent = Some(match parent {
            None => next,
            Some(p) => combine(&p, &next),
        });
    }
    match parent {
        None => t.clone(),
        Some(p) => combine(&p, t),
    }
}

// ---------------------------------------------------------------------------------------------
// Pods, as JSON objects (so that every field of k8s-openapi's Pod is kept without naming it).

/// Whether a value counts as set: not null, not "", not an empty list or map.
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// `child`'s set fields over `parent`'s (one level: a set field replaces the parent's whole).
fn overlay(parent: &Value, child: &Value) -> Value {
    match (parent, child) {
        (Value::Object(p), Value::Object(c)) => {
            let mut out = p.clone();
            for (k, v) in c {
                if is_set(v) {
                    out.insert(k.clone(), v.clone());
                }
            }
            Value::Object(out)
        }
        (_, c) if is_set(c) => c.clone(),
        (p, _) => p.clone(),
    }
}

/// Lists of objects merged by `key`: the parent's in order, each replaced by `merge(parent's,
/// child's)` for the child's entry of the same key, then the child's new ones.
fn by_key(parent: &Value, child: &Value, key: &str, merge: fn(&Value, &Value) -> Value) -> Value {
    let mut out: Vec<Value> = parent.as_array().cloned().unwrap_or_default();
    for c in child.as_array().into_iter().flatten() {
        match out.iter_mut().find(|p| p.get(key).is_some() && p.get(key) == c.get(key)) {
            Some(p) => *p = merge(p, c),
            None => out.push(c.clone()),
        }
    }
    Value::Array(out)
}

/// Two lists one after the other, without repeats.
fn union(parent: &Value, child: &Value) -> Value {
    let mut out: Vec<Value> = parent.as_array().cloned().unwrap_or_default();
    for c in child.as_array().into_iter().flatten() {
        if !out.contains(c) {
            out.push(c.clone());
        }
    }
    Value::Array(out)
}

fn replace(_: &Value, child: &Value) -> Value {
    child.clone()
}

/// Put `value` at `key` of `obj` when it is set, else remove the key.
fn put(obj: &mut Map<String, Value>, key: &str, value: Value) {
    if is_set(&value) {
        obj.insert(key.into(), value);
    } else {
        obj.remove(key);
    }
}

/// A container over its parent's of the same name: set fields win; env by name, volume mounts by
/// mount path, `envFrom` combined, resources entry by entry, securityContext field by field.
fn combine_container_json(parent: &Value, child: &Value) -> Value {
    let mut out = overlay(parent, child);
    let Value::Object(o) = &mut out else { return out };
    put(o, "env", by_key(&parent["env"], &child["env"], "name", replace));
    put(o, "volumeMounts", by_key(&parent["volumeMounts"], &child["volumeMounts"], "mountPath", replace));
    put(o, "envFrom", union(&parent["envFrom"], &child["envFrom"]));
    put(o, "resources", combine_resources(&parent["resources"], &child["resources"]));
    put(o, "securityContext", overlay(&parent["securityContext"], &child["securityContext"]));
    out
}

/// `child` over `parent`, two Pods as JSON (the plugin's `combine(Pod, Pod)`): metadata labels and
/// annotations as maps; containers and init containers by name, volumes by name, tolerations and
/// image pull secrets combined, nodeSelector as a map, securityContext field by field; every
/// other field the child's where set, else the parent's.
pub(super) fn combine_pods(parent: &Value, child: &Value) -> Value {
    let mut out = overlay(parent, child);
    let Value::Object(o) = &mut out else { return out };
    let mut meta = overlay(&parent["metadata"], &child["metadata"]);
    if let Value::Object(m) = &mut meta {
        for key in ["labels", "annotations"] {
            put(m, key, overlay(&parent["metadata"][key], &child["metadata"][key]));
        }
    }
    put(o, "metadata", meta);
    let (ps, cs) = (&parent["spec"], &child["spec"]);
    let mut spec = overlay(ps, cs);
    if let Value::Object(s) = &mut spec {
        put(s, "nodeSelector", overlay(&ps["nodeSelector"], &cs["nodeSelector"]));
        put(s, "containers", by_key(&ps["containers"], &cs["containers"], "name", combine_container_json));
        put(
            s,
            "initContainers",
            by_key(&ps["initContainers"], &cs["initContainers"], "name", combine_container_json),
        );
        put(s, "volumes", by_key(&ps["volumes"], &cs["volumes"], "name", replace));
        put(s, "tolerations", union(&ps["tolerations"], &cs["tolerations"]));
        put(s, "imagePullSecrets", union(&ps["imagePullSecrets"], &cs["imagePullSecrets"]));
        put(s, "securityContext", overlay(&ps["securityContext"], &cs["securityContext"]));
    }
    put(o, "spec", spec);
    out
}

#[cfg(test)]
mod tests;
