//! Tests of inheritance and merging, rule by rule, with the plugin README's examples.

use super::super::{parse_clouds, ContainerTemplate, MergeStrategy, PodTemplate, Retention, TemplateVolume};
use super::*;
use serde_json::json;

/// The templates of a one-cloud file whose templates are `yaml` (a list of mappings).
fn templates(yaml: &str) -> Vec<PodTemplate> {
    let text = format!("clouds:\n  - podman:\n      name: c\n      templates:\n{yaml}");
    parse_clouds(&text).unwrap_or_else(|e| panic!("{e}\n{text}")).remove(0).templates
}

fn get<'a>(all: &'a [PodTemplate], name: &str) -> &'a PodTemplate {
    all.iter().find(|t| t.name == name).unwrap()
}

fn container<'a>(t: &'a PodTemplate, name: &str) -> &'a ContainerTemplate {
    t.containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

fn words(w: &[&str]) -> Option<Vec<String>> {
    Some(w.iter().map(|s| s.to_string()).collect())
}

#[test]
fn container_fields_fall_back_to_the_parents() {
    let all = templates(
        "        - name: p\n          containers:\n            - {name: a, image: img, command: [cat], args: [x], \
         workingDir: /w, env: {A: p, B: p}, resources: {limits: {cpu: 1, memory: 1Gi}, requests: {cpu: 100m}}}\n            \
         - {name: only-parent, image: o}\n        - name: c\n          containers:\n            - {name: a, env: {B: c, C: c}, \
         resources: {limits: {memory: 2Gi}}}\n            - {name: only-child, image: n}\n",
    );
    let t = combine(get(&all, "p"), get(&all, "c"));
    let names: Vec<&str> = t.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["a", "only-parent", "only-child"], "parent's order, then the child's new ones");
    let a = container(&t, "a");
    // (field, combined, expected)
    type Words = Option<Vec<String>>;
    let table: [(&str, Words, Words); 4] = [
        ("image", a.image.clone().map(|i| vec![i]), words(&["img"])),
        ("command", a.command.clone(), words(&["cat"])),
        ("args", a.args.clone(), words(&["x"])),
        ("workingDir", a.working_dir.clone().map(|w| vec![w]), words(&["/w"])),
    ];
    for (field, got, want) in table {
        assert_eq!(got, want, "{field} falls back to the parent's");
    }
    let env: Vec<(&str, &str)> = a.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(env, [("A", "p"), ("B", "c"), ("C", "c")], "env by name, the child's winning");
    assert_eq!(
        a.resources,
        Some(json!({"limits": {"cpu": "1", "memory": "2Gi"}, "requests": {"cpu": "100m"}})),
        "resources entry by entry"
    );
    // The child's own value wins where set.
    let all = templates(
        "        - name: p\n          containers: [{name: a, image: old, command: [cat]}]\n        - name: c\n          \
         containers: [{name: a, image: new, command: [sleep, '1']}]\n",
    );
    let a = combine(get(&all, "p"), get(&all, "c")).containers.remove(0);
    assert_eq!((a.image.as_deref(), a.command), (Some("new"), words(&["sleep", "1"])));
}

#[test]
fn template_fields_merge_by_their_rules() {
    let all = templates(
        "        - name: p
          label: parent-label
          envVars: {A: p, B: p}
          volumes: [{emptyDirVolume: {mountPath: /a}}, {hostPathVolume: {hostPath: /h, mountPath: /b}}]
          nodeSelector: {disk: ssd, zone: a}
          serviceAccount: parent-sa
          imagePullSecrets: [one, two]
          annotations: {x: p, y: p}
          labels: {team: p, tier: p}
          instanceCap: 3
          idleMinutes: 5
          podRetention: always
          activeDeadlineSeconds: 60
          connectTimeout: 30
          defaultContainer: build
          yaml: 'metadata: {labels: {from: p}}'
        - name: c
          envVars: {B: c, C: c}
          volumes: [{emptyDirVolume: {mountPath: /b, memory: true}}]
          nodeSelector: {zone: b}
          imagePullSecrets: [two, three]
          annotations: {y: c}
          labels: {tier: c}
          yaml: 'metadata: {labels: {from: c}}'
",
    );
    let (p, c) = (get(&all, "p"), get(&all, "c"));
    let t = combine(p, c);
    assert_eq!(t.name, "c");
    assert_eq!(t.label, None, "the label is the child's own (as in the plugin)");
    let env: Vec<(&str, &str)> = t.env_vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(env, [("A", "p"), ("B", "c"), ("C", "c")]);
    assert_eq!(
        t.volumes,
        vec![
            TemplateVolume::EmptyDirVolume { mount_path: "/a".into(), memory: false },
            TemplateVolume::EmptyDirVolume { mount_path: "/b".into(), memory: true },
        ],
        "volumes by mount path, the child's replacing the parent's"
    );
    assert_eq!(
        t.node_selector,
        [("zone".to_string(), "b".to_string())].into(),
        "replaced whole, as in the plugin"
    );
    assert_eq!(combine(c, p).node_selector.len(), 2);
    assert_eq!(combine(p, &PodTemplate::default()).node_selector, p.node_selector, "absent: the parent's");
    assert_eq!(t.service_account.as_deref(), Some("parent-sa"));
    assert_eq!(t.image_pull_secrets, ["one", "two", "three"]);
    assert_eq!(t.annotations, [("x".into(), "p".into()), ("y".into(), "c".into())].into());
    assert_eq!(t.labels, [("team".into(), "p".into()), ("tier".into(), "c".into())].into());
    assert_eq!(
        (t.instance_cap, t.idle_minutes, t.active_deadline_seconds, t.connect_timeout),
        (Some(3), 5, 60, Some(30))
    );
    assert_eq!(t.default_container.as_deref(), Some("build"));
    assert_eq!(t.pod_retention, Retention::Default, "the child's retention, as in the plugin");
    assert_eq!(t.yaml.len(), 2, "the parent's layer, then the child's");
    assert_eq!(t.yaml_layers(), &t.yaml[1..], "override: the last layer only");
    let merged = PodTemplate { yaml_merge_strategy: Some(MergeStrategy::Merge), ..t.clone() };
    assert_eq!(merged.yaml_layers(), &merged.yaml[..]);
    // Set scalars of the child win.
    let c2 = PodTemplate {
        name: "c2".into(),
        instance_cap: Some(0),
        idle_minutes: 1,
        active_deadline_seconds: 2,
        connect_timeout: Some(3),
        service_account: Some("child-sa".into()),
        pod_retention: Retention::Never,
        ..PodTemplate::default()
    };
    let t = combine(p, &c2);
    assert_eq!(
        (t.instance_cap, t.idle_minutes, t.active_deadline_seconds, t.connect_timeout),
        (Some(0), 1, 2, Some(3))
    );
    assert_eq!((t.service_account.as_deref(), t.pod_retention), (Some("child-sa"), Retention::Never));
}

#[test]
fn inherit_from_is_resolved_in_order_recursively_and_reports_what_it_skips() {
    let all = templates(
        "        - name: a
          containers: [{name: x, image: from-a, command: [a]}]
          envVars: {V: a}
        - name: b
          containers: [{name: x, image: from-b}]
          envVars: {V: b}
        - name: c
          inheritFrom: b
          containers: [{name: y, image: from-c}]
        - name: leaf
          inheritFrom: a c nope
        - name: off
          inheritFrom: ''
        - name: loop1
          inheritFrom: loop2
          envVars: {L: '1'}
        - name: loop2
          inheritFrom: loop1
          envVars: {L: '2'}
        - name: self
          inheritFrom: self
",
    );
    let (leaf, warnings) = resolve(get(&all, "leaf"), &all);
    let x = container(&leaf, "x");
    assert_eq!(x.image.as_deref(), Some("from-b"), "later parents win (c, through b)");
    assert_eq!(x.command, words(&["a"]), "and fall back to earlier ones");
    assert_eq!(container(&leaf, "y").image.as_deref(), Some("from-c"), "grandparents count (c inherits b)");
    assert_eq!(leaf.env_vars, [("V".to_string(), "b".to_string())]);
    assert_eq!(leaf.name, "leaf");
    assert_eq!(warnings, ["template \"leaf\": inheritFrom names \"nope\", which does not exist; skipped"]);

    let (off, warnings) = resolve(get(&all, "off"), &all);
    assert_eq!((&off, warnings.len()), (get(&all, "off"), 0), "'' turns inheritance off");
    let (plain, _) = resolve(get(&all, "a"), &all);
    assert_eq!(&plain, get(&all, "a"));

    let (l1, warnings) = resolve(get(&all, "loop1"), &all);
    assert_eq!(l1.env_vars, [("L".to_string(), "1".to_string())]);
    assert_eq!(
        warnings,
        ["template \"loop2\": inheritFrom \"loop1\" makes a cycle (loop1 -> loop2 -> loop1); skipped"]
    );
    let (s, warnings) = resolve(get(&all, "self"), &all);
    assert_eq!((s.name.as_str(), warnings.len()), ("self", 1));
}

#[test]
fn wide_inheritance_is_bounded() {
    // Each template names the previous one ten times: 10^20 combines without a bound.
    let mut yaml = String::from("        - name: t0\n          envVars: {A: '0'}\n");
    for i in 1..20 {
        yaml.push_str(&format!(
            "        - name: t{i}\n          inheritFrom: {}\n",
            vec![format!("t{}", i - 1); 10].join(" ")
        ));
    }
    let all = templates(&yaml);
    let (t, warnings) = resolve(get(&all, "t19"), &all);
    assert_eq!(t.env_vars, [("A".to_string(), "0".to_string())]);
    assert!(warnings.iter().any(|w| w.contains("more than 256 templates")), "{warnings:?}");
}

/// The README's inheritance example: `anotherpod` inherits `mypod` and only changes the maven
/// image; ttyEnabled and command come from the parent, golang is added as it is.
#[test]
fn readme_inheritance_example() {
    let all = templates(
        "        - name: mypod
          containers:
            - {name: maven, image: 'maven:3.3.9-jdk-8-alpine', command: cat}
            - {name: golang, image: 'golang:1.8.0', command: cat}
        - name: anotherpod
          inheritFrom: mypod
          containers:
            - {name: maven, image: 'maven:3.3.9-jdk-7-alpine'}
",
    );
    let (t, _) = resolve(get(&all, "anotherpod"), &all);
    let maven = container(&t, "maven");
    assert_eq!(maven.image.as_deref(), Some("maven:3.3.9-jdk-7-alpine"));
    assert_eq!(maven.command, words(&["cat"]));
    assert_eq!(container(&t, "golang").image.as_deref(), Some("golang:1.8.0"));
}

/// The README's nesting example: a docker template and a maven template composed into one pod
/// with both containers and both templates' volumes.
#[test]
fn readme_composition_example() {
    let all = templates(
        "        - name: docker
          containers: [{name: docker, image: docker, command: cat}]
          volumes: [{hostPathVolume: {hostPath: /var/run/docker.sock, mountPath: /var/run/docker.sock}}]
        - name: maven
          containers: [{name: maven, image: maven, command: cat}]
          volumes: [{secretVolume: {secretName: maven-settings, mountPath: /root/.m2}},
                    {persistentVolumeClaim: {claimName: maven-local-repo, mountPath: /root/.m2nrepo}}]
        - name: both
          inheritFrom: docker maven
",
    );
    let (t, warnings) = resolve(get(&all, "both"), &all);
    assert!(warnings.is_empty());
    let names: Vec<&str> = t.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["docker", "maven"]);
    let paths: Vec<&str> = t.volumes.iter().map(|v| v.mount_path()).collect();
    assert_eq!(paths, ["/var/run/docker.sock", "/root/.m2", "/root/.m2nrepo"]);
}

fn pod_json(yaml: &str) -> Value {
    let pod: k8s_openapi::api::core::v1::Pod = serde_yaml_ng::from_str(yaml).unwrap();
    serde_json::to_value(pod).unwrap()
}

/// The plugin's yaml merge: containers by name with fields merged, volumes by name, labels as
/// maps, tolerations and pull secrets combined, other fields the child's where set.
#[test]
fn pods_combine_by_the_plugins_rules() {
    let parent = pod_json(
        "metadata: {labels: {a: p, b: p}, annotations: {x: p}}
spec:
  nodeSelector: {disk: ssd}
  serviceAccountName: p-sa
  hostname: parent-host
  containers:
    - {name: jnlp, image: agent, env: [{name: A, value: p}], volumeMounts: [{name: v, mountPath: /m}]}
    - {name: build, image: maven, command: [cat], resources: {limits: {cpu: '1'}}}
  volumes: [{name: v, emptyDir: {}}, {name: w, emptyDir: {}}]
  tolerations: [{key: k1, operator: Exists}]
  imagePullSecrets: [{name: one}]",
    );
    let child = pod_json(
        "metadata: {labels: {b: c}}
spec:
  nodeSelector: {zone: z}
  containers:
    - {name: build, image: maven:3, env: [{name: B, value: c}], resources: {limits: {memory: 1Gi}}}
    - {name: extra, image: busybox}
  volumes: [{name: w, hostPath: {path: /h}}]
  tolerations: [{key: k2, operator: Exists}]
  imagePullSecrets: [{name: one}, {name: two}]
  dnsPolicy: None",
    );
    let got = combine_pods(&parent, &child);
    let want = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"labels": {"a": "p", "b": "c"}, "annotations": {"x": "p"}},
        "spec": {
            "nodeSelector": {"disk": "ssd", "zone": "z"},
            "serviceAccountName": "p-sa",
            "hostname": "parent-host",
            "dnsPolicy": "None",
            "containers": [
                {"name": "jnlp", "image": "agent", "env": [{"name": "A", "value": "p"}],
                 "volumeMounts": [{"name": "v", "mountPath": "/m"}]},
                {"name": "build", "image": "maven:3", "command": ["cat"], "env": [{"name": "B", "value": "c"}],
                 "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}},
                {"name": "extra", "image": "busybox"}
            ],
            "volumes": [{"name": "v", "emptyDir": {}}, {"name": "w", "hostPath": {"path": "/h"}}],
            "tolerations": [{"key": "k1", "operator": "Exists"}, {"key": "k2", "operator": "Exists"}],
            "imagePullSecrets": [{"name": "one"}, {"name": "two"}]
        }
    });
    assert_eq!(got, want);
}
