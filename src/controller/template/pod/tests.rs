//! Tests of the Pod manifest: what every agent pod gets, the yaml precedence, and a strict round
//! trip through k8s-openapi's `Pod`.

use super::super::{parse_clouds, resolve, CloudSpec};
use super::*;

fn cloud(templates: &str) -> CloudSpec {
    let text = format!(
        "clouds:\n  - kubernetes:\n      name: c\n      namespace: ci\n      podLabels: {{jenkins: slave, app: wisp}}\n      \
         templates:\n{templates}"
    );
    parse_clouds(&text).unwrap_or_else(|e| panic!("{e}\n{text}")).remove(0)
}

fn agent() -> AgentEnv {
    AgentEnv {
        node: "maven-b2c4d".into(),
        secret: "s3cret".into(),
        url: "http://ctl:8080/".into(),
        direct: None,
        web_socket: true,
        instance_identity: "MIIB".into(),
        controller_id: "https://ctl:8080/jenkins/".into(),
        agent_image: "localhost/wisp-agent:dev".into(),
    }
}

/// The manifest of template `name` of `c`, resolved first.
fn manifest(c: &CloudSpec, name: &str, agent: &AgentEnv) -> Pod {
    let (t, warnings) = resolve(c.template(name).unwrap(), &c.templates);
    assert!(warnings.is_empty(), "{warnings:?}");
    pod_manifest(&t, c, agent).unwrap()
}

fn container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    pod.spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name}"))
}

fn env(c: &Container) -> Vec<(String, String)> {
    c.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect()
}

fn mounts(c: &Container) -> Vec<(String, String)> {
    c.volume_mounts.iter().flatten().map(|m| (m.name.clone(), m.mount_path.clone())).collect()
}

fn strs(w: &[&str]) -> Vec<String> {
    w.iter().map(|s| s.to_string()).collect()
}

const MAVEN: &str = "        - name: maven
          label: maven
          activeDeadlineSeconds: 600
          serviceAccount: builder
          nodeSelector: disk=ssd
          imagePullSecrets: [regcred]
          annotations: {note: x}
          labels: {team: ci}
          envVars: {SHARED: t}
          volumes: [{emptyDirVolume: {mountPath: /cache}}]
          containers:
            - {name: build, image: localhost/busybox:wisp, command: [sleep], args: ['9999'], env: {OWN: b, SHARED: own}}
            - {name: idle, image: localhost/busybox:wisp}
";

#[test]
fn the_manifest_has_what_every_agent_pod_needs() {
    let pod = manifest(&cloud(MAVEN), "maven", &agent());
    let meta = &pod.metadata;
    assert_eq!(meta.name.as_deref(), Some("maven-b2c4d"));
    assert_eq!(meta.namespace.as_deref(), Some("ci"));
    let labels = meta.labels.clone().unwrap();
    let want: BTreeMap<String, String> = [
        ("app", "wisp"),
        ("jenkins", "slave"),
        ("team", "ci"),
        ("wisp.dev/controller", "https___ctl_8080_jenkinsx"),
        ("wisp.dev/template", "maven"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(labels, want);
    assert_eq!(meta.annotations.clone().unwrap().get("note").map(String::as_str), Some("x"));
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.active_deadline_seconds, Some(600));
    assert_eq!(spec.service_account_name.as_deref(), Some("builder"));
    assert_eq!(spec.node_selector.clone().unwrap().get("disk").map(String::as_str), Some("ssd"));
    assert_eq!(spec.image_pull_secrets.clone().unwrap()[0].name, "regcred");

    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["build", "idle", "jnlp"], "jnlp is added when the template has none");
    let jnlp = container(&pod, "jnlp");
    assert_eq!(jnlp.image.as_deref(), Some("localhost/wisp-agent:dev"));
    assert_eq!(jnlp.command, None, "the agent image's own entrypoint");
    let e = env(jnlp);
    for (k, v) in [
        ("JENKINS_URL", "http://ctl:8080/"),
        ("JENKINS_SECRET", "s3cret"),
        ("JENKINS_AGENT_NAME", "maven-b2c4d"),
        ("JENKINS_NAME", "maven-b2c4d"),
        ("JENKINS_AGENT_WORKDIR", "/home/jenkins/agent"),
        ("JENKINS_WEB_SOCKET", "true"),
        ("JENKINS_INSTANCE_IDENTITY", "MIIB"),
        ("WISP_STEP_SOCKETS", "/wisp"),
        ("SHARED", "t"),
    ] {
        assert!(e.contains(&(k.to_string(), v.to_string())), "jnlp lacks {k}={v}: {e:?}");
    }
    assert!(!e.iter().any(|(k, _)| k == "JENKINS_DIRECT_CONNECTION"));

    let build = container(&pod, "build");
    let e = env(build);
    assert!(e.contains(&("OWN".into(), "b".into())) && e.contains(&("SHARED".into(), "own".into())), "{e:?}");
    assert!(!e.iter().any(|(k, _)| k.starts_with("JENKINS_")), "only jnlp gets the agent's settings: {e:?}");
    assert_eq!(
        build.command,
        Some(strs(&[
            "/wisp/wisp-agent",
            "step-server",
            "--socket",
            "/wisp/build.sock",
            "--",
            "sleep",
            "9999"
        ]))
    );
    assert_eq!(build.args, None);
    let idle = container(&pod, "idle");
    assert_eq!(idle.command, Some(strs(&["/wisp/wisp-agent", "step-server", "--socket", "/wisp/idle.sock"])));
    assert!(env(idle).contains(&("SHARED".into(), "t".into())), "every container gets envVars");

    for c in &spec.containers {
        assert_eq!(c.working_dir.as_deref(), Some(WORKSPACE_DIR), "{}", c.name);
        let m = mounts(c);
        assert!(m.contains(&("workspace-volume".into(), WORKSPACE_DIR.into())), "{}: {m:?}", c.name);
        assert!(m.contains(&("wisp-tools".into(), TOOLS_DIR.into())), "{}: {m:?}", c.name);
    }
    assert!(
        mounts(build).contains(&("volume-0".into(), "/cache".into())),
        "template volumes in template containers"
    );

    let init = spec.init_containers.as_ref().unwrap();
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].name, "wisp-tools");
    assert_eq!(init[0].image.as_deref(), Some("localhost/wisp-agent:dev"), "the jnlp container's image");
    assert_eq!(init[0].command, Some(strs(&["/wisp-agent", "install", "/wisp/wisp-agent"])));
    assert_eq!(mounts(&init[0]), [("wisp-tools".to_string(), "/wisp".to_string())]);

    let volumes: Vec<(&str, bool)> =
        spec.volumes.iter().flatten().map(|v| (v.name.as_str(), v.empty_dir.is_some())).collect();
    assert_eq!(volumes, [("volume-0", true), ("workspace-volume", true), ("wisp-tools", true)]);
}

#[test]
fn direct_connections_get_their_address_and_no_web_socket() {
    let a = AgentEnv { direct: Some("ctl:50000".into()), web_socket: false, ..agent() };
    let pod = manifest(&cloud(MAVEN), "maven", &a);
    let e = env(container(&pod, "jnlp"));
    assert!(e.contains(&("JENKINS_DIRECT_CONNECTION".into(), "ctl:50000".into())));
    assert!(!e.iter().any(|(k, _)| k == "JENKINS_WEB_SOCKET"));
}

#[test]
fn yaml_is_the_base_and_its_own_volumes_and_jnlp_are_kept() {
    let c = cloud(
        "        - name: y
          yaml: |
            metadata:
              labels: {from-yaml: 'yes', team: yaml}
            spec:
              hostname: from-yaml
              restartPolicy: Always
              containers:
                - name: jnlp
                  image: custom/agent
                  workingDir: /work
                  env: [{name: JENKINS_URL, value: 'http://override/'}]
                - name: tool
                  image: tool-image
                  args: [--serve]
                  volumeMounts: [{name: workspace-volume, mountPath: /ws}]
              volumes: [{name: workspace-volume, hostPath: {path: /srv/ws}}]
          labels: {team: template}
",
    );
    let pod = manifest(&c, "y", &agent());
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(labels.get("from-yaml").map(String::as_str), Some("yes"));
    assert_eq!(labels.get("team").map(String::as_str), Some("template"), "template fields win over the yaml");
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.hostname.as_deref(), Some("from-yaml"));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"), "always Never: the pod ends with its agent");
    let jnlp = container(&pod, "jnlp");
    assert_eq!(jnlp.image.as_deref(), Some("custom/agent"));
    assert!(
        env(jnlp).contains(&("JENKINS_URL".into(), "http://override/".into())),
        "the container's own env wins"
    );
    let tool = container(&pod, "tool");
    assert_eq!(tool.working_dir.as_deref(), Some("/work"), "working dirs default to jnlp's");
    assert_eq!(mounts(tool)[0], ("workspace-volume".into(), "/ws".into()), "its own workspace mount is kept");
    assert_eq!(tool.command, Some(strs(&["/wisp/wisp-agent", "step-server", "--socket", "/wisp/tool.sock"])));
    assert_eq!(tool.args, None, "args without a command cannot be kept");
    let ws: Vec<_> = spec.volumes.iter().flatten().filter(|v| v.name == "workspace-volume").collect();
    assert_eq!(ws.len(), 1);
    assert!(ws[0].host_path.is_some(), "the yaml's workspace volume is used");
    assert_eq!(spec.init_containers.as_ref().unwrap()[0].image.as_deref(), Some("custom/agent"));
}

/// Plugin issue #2830: a child's yaml container of the same name as a parent's container
/// template loses to the container template wherever that sets a field.
#[test]
fn a_parents_container_template_wins_over_a_childs_yaml_container() {
    let c = cloud(
        "        - name: parent
          containers: [{name: build, image: parent-image}]
        - name: child
          inheritFrom: parent
          yaml: |
            spec:
              containers:
                - {name: build, image: yaml-image, command: [make], tty: true}
",
    );
    let pod = manifest(&c, "child", &agent());
    let build = container(&pod, "build");
    assert_eq!(build.image.as_deref(), Some("parent-image"), "the container template wins");
    assert_eq!(build.tty, Some(true), "fields it does not set come from the yaml");
    assert_eq!(build.command.as_ref().unwrap()[4..], strs(&["--", "make"])[..]);
}

/// The README's yaml examples: `override` keeps the last yaml only, `merge` combines them.
#[test]
fn yaml_merge_strategies() {
    let templates = |strategy: &str| {
        cloud(&format!(
            "        - name: base
          yaml: |
            metadata: {{labels: {{some-label: some-label-value}}}}
            spec:
              containers: [{{name: busybox, image: busybox, command: [cat], tty: true}}]
        - name: child
          inheritFrom: base
          yamlMergeStrategy: {strategy}
          yaml: |
            spec:
              containers: [{{name: maven, image: maven}}]
"
        ))
    };
    let pod = manifest(&templates("merge"), "child", &agent());
    let names: Vec<&str> = pod.spec.as_ref().unwrap().containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["busybox", "maven", "jnlp"]);
    assert!(pod.metadata.labels.as_ref().unwrap().contains_key("some-label"));
    let pod = manifest(&templates("override"), "child", &agent());
    let names: Vec<&str> = pod.spec.as_ref().unwrap().containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["maven", "jnlp"]);
    assert!(!pod.metadata.labels.as_ref().unwrap().contains_key("some-label"));
    // A child without yaml of its own keeps its parent's under override.
    let c = cloud(
        "        - name: base\n          yaml: 'spec: {hostname: h}'\n        - name: child\n          inheritFrom: base\n",
    );
    assert_eq!(manifest(&c, "child", &agent()).spec.unwrap().hostname.as_deref(), Some("h"));
}

#[test]
fn the_manifest_round_trips_through_kubernetes_pod_with_no_unknown_field() {
    let pod = manifest(&cloud(MAVEN), "maven", &agent());
    let yaml = serde_yaml_ng::to_string(&pod).unwrap();
    let mut unknown = Vec::new();
    let back: Pod = serde_ignored::deserialize(serde_yaml_ng::Deserializer::from_str(&yaml), |p| {
        unknown.push(p.to_string())
    })
    .unwrap();
    assert!(unknown.is_empty(), "{unknown:?}\n{yaml}");
    assert_eq!(back, pod);
    // The check can fail: a field Kubernetes does not know is reported.
    let mut unknown = Vec::new();
    let bad = yaml.replace("restartPolicy:", "restartPolicyy:");
    let _: Pod = serde_ignored::deserialize(serde_yaml_ng::Deserializer::from_str(&bad), |p| {
        unknown.push(p.to_string())
    })
    .unwrap();
    assert_eq!(unknown.len(), 1);
}

#[test]
fn refusals_name_the_template_and_what_to_do() {
    let no_image = cloud("        - name: t\n          containers: [{name: build}]\n");
    let e = pod_manifest(&no_image.templates[0], &no_image, &agent()).unwrap_err();
    assert_eq!(e, "template \"t\": container \"build\" has no image; give it one in containers or in yaml");
    let reserved =
        cloud("        - name: t\n          yaml: 'spec: {volumes: [{name: wisp-tools, emptyDir: {}}]}'\n");
    let e = pod_manifest(&reserved.templates[0], &reserved, &agent()).unwrap_err();
    assert!(e.contains("\"wisp-tools\" is reserved"), "{e}");
    let no_agent_image = AgentEnv { agent_image: String::new(), ..agent() };
    let plain = cloud("        - name: t\n");
    assert!(pod_manifest(&plain.templates[0], &plain, &no_agent_image)
        .unwrap_err()
        .contains("no agent image"));
}

#[test]
fn pod_names_are_the_template_and_five_random_characters() {
    let name = pod_name("maven");
    assert_eq!(name.len(), 11);
    assert!(name.starts_with("maven-"));
    assert!(name[6..].bytes().all(|b| SUFFIX_CHARS.contains(&b)), "{name}");
    assert_ne!(pod_name("maven"), pod_name("maven"), "random (1 in 24 million to collide)");
    let long = pod_name(&"a".repeat(80));
    assert_eq!(long.len(), 63);
    assert!(long.starts_with(&"a".repeat(57)));
    assert!(pod_name("").starts_with("agent-"));
    let seen: std::collections::BTreeSet<u8> = (0..200).flat_map(|_| pod_name("x").into_bytes()).collect();
    assert!(seen.len() > 25, "every suffix character shows up: {seen:?}");
}

#[test]
fn label_values_are_sanitized_like_the_plugins() {
    for (input, want) in
        [("https://ctl:8080/", "https___ctl_8080x"), ("-a-", "xax"), ("", ""), ("ok.value_1", "ok.value_1")]
    {
        assert_eq!(sanitize_label_value(input), want, "{input}");
    }
    let long = format!("{}z", "y".repeat(100));
    assert_eq!(sanitize_label_value(&long), format!("{}z", "y".repeat(62)), "the last 63 characters");
}
