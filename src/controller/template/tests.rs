//! Tests of the cloud file's parser, `Retention::keeps` and `template_for`.

use super::*;
use crate::controller::labels;

/// The brief's example file, in full.
const FULL: &str = r#"
clouds:
  - podman:
      name: local
      containerCap: 10
      podRetention: never
      podLabels: {jenkins: slave}
      webSocket: true
      jenkinsUrl: http://127.0.0.1:8080/
      agentImage: localhost/wisp-agent:dev
      network: host
      templates:
        - name: base
          containers: [{name: jnlp, image: localhost/wisp-agent:dev}]
        - name: maven
          label: "maven java"
          inheritFrom: base
          instanceCap: 3
          idleMinutes: 0
          podRetention: default
          activeDeadlineSeconds: 0
          connectTimeout: 100
          defaultContainer: build
          yamlMergeStrategy: override
          yaml: |
            apiVersion: v1
            kind: Pod
            spec: {containers: [{name: build, image: busybox}]}
          containers:
            - {name: build, image: localhost/busybox:wisp, command: [sleep], args: ["9999"],
               env: [{key: A, value: b}] , workingDir: /home/jenkins/agent,
               resources: {limits: {memory: 1Gi}}}
          envVars: [{key: K, value: v}]
          volumes: [{emptyDirVolume: {mountPath: /cache}}, {hostPathVolume: {hostPath: /x, mountPath: /y}}]
          nodeSelector: "disk=ssd,zone=a"
          serviceAccount: builder
          imagePullSecrets: [regcred]
          annotations: {a: b}
          labels: {team: x}
  - kubernetes:
      name: k8s
      namespace: ci
      serverUrl: https://k8s:6443
      serverCertificate: "-----BEGIN CERTIFICATE-----..."
      credentialsToken: "@/var/run/token"
      kubeconfig: /root/.kube/config
      context: ci
      skipTlsVerify: false
      directConnection: true
      jenkinsTunnel: wisp:50000
      podLabels: [{key: app, value: wisp}]
      templates:
        - name: k
          nodeSelector: {disk: ssd}
          imagePullSecrets: [{name: regcred}]
          annotations: [{key: x.io/a, value: "1"}]
          envVars: {K: v}
"#;

fn err(text: &str) -> String {
    parse_clouds(text).unwrap_err().to_string()
}

/// A podman cloud named `a` with one template whose mapping lines are `template`.
fn one_template(template: &str) -> String {
    let body: String = template.lines().map(|l| format!("          {l}\n")).collect();
    format!("clouds:\n  - podman:\n      name: a\n      templates:\n        - name: t\n{body}")
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn map(p: &[(&str, &str)]) -> BTreeMap<String, String> {
    p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn the_full_example_parses_into_every_field() {
    let clouds = parse_clouds(FULL).unwrap();
    assert_eq!(clouds.len(), 2);
    let local = &clouds[0];
    assert_eq!((local.name.as_str(), local.kind), ("local", Some(CloudKind::Podman)));
    assert_eq!(local.container_cap, 10);
    assert_eq!(local.pod_retention, Retention::Never);
    assert_eq!(local.pod_labels, map(&[("jenkins", "slave")]));
    assert!(local.web_socket && !local.direct_connection);
    assert_eq!(local.jenkins_url.as_deref(), Some("http://127.0.0.1:8080/"));
    assert_eq!(local.agent_image.as_deref(), Some("localhost/wisp-agent:dev"));
    assert_eq!(local.network.as_deref(), Some("host"));
    let m = &local.templates[1];
    assert_eq!(m.name, "maven");
    assert_eq!(m.label.as_deref(), Some("maven java"));
    assert_eq!(m.inherit_from.as_deref(), Some("base"));
    assert_eq!(m.instance_cap, Some(3));
    assert_eq!(m.connect_timeout, Some(100));
    assert_eq!(m.default_container.as_deref(), Some("build"));
    assert_eq!(m.yaml_merge_strategy, Some(MergeStrategy::Override));
    assert_eq!(m.yaml.len(), 1);
    assert!(m.yaml[0].starts_with("apiVersion: v1\n"));
    let build = &m.containers[0];
    assert_eq!(build.image.as_deref(), Some("localhost/busybox:wisp"));
    assert_eq!(build.command, Some(vec!["sleep".to_string()]));
    assert_eq!(build.args, Some(vec!["9999".to_string()]));
    assert_eq!(build.env, pairs(&[("A", "b")]));
    assert_eq!(build.working_dir.as_deref(), Some("/home/jenkins/agent"));
    assert_eq!(build.resources, Some(serde_json::json!({"limits": {"memory": "1Gi"}})));
    assert_eq!(m.env_vars, pairs(&[("K", "v")]));
    assert_eq!(
        m.volumes,
        vec![
            TemplateVolume::EmptyDirVolume { mount_path: "/cache".into(), memory: false },
            TemplateVolume::HostPathVolume {
                host_path: "/x".into(),
                mount_path: "/y".into(),
                read_only: false
            },
        ]
    );
    assert_eq!(m.node_selector, map(&[("disk", "ssd"), ("zone", "a")]));
    assert_eq!(m.service_account.as_deref(), Some("builder"));
    assert_eq!(m.image_pull_secrets, vec!["regcred".to_string()]);
    assert_eq!(m.annotations, map(&[("a", "b")]));
    assert_eq!(m.labels, map(&[("team", "x")]));

    let k8s = &clouds[1];
    assert_eq!(k8s.kind, Some(CloudKind::Kubernetes));
    assert_eq!(k8s.namespace.as_deref(), Some("ci"));
    assert_eq!(k8s.server_url.as_deref(), Some("https://k8s:6443"));
    assert_eq!(k8s.credentials_token.as_deref(), Some("@/var/run/token"));
    assert_eq!(k8s.context.as_deref(), Some("ci"));
    assert!(k8s.direct_connection);
    assert_eq!(k8s.jenkins_tunnel.as_deref(), Some("wisp:50000"));
    assert_eq!(k8s.pod_labels, map(&[("app", "wisp")]), "the list form, and no default beside it");
    let k = &k8s.templates[0];
    assert_eq!(k.node_selector, map(&[("disk", "ssd")]));
    assert_eq!(k.image_pull_secrets, vec!["regcred".to_string()]);
    assert_eq!(k.annotations, map(&[("x.io/a", "1")]));
    assert_eq!(k.env_vars, pairs(&[("K", "v")]));
}

#[test]
fn defaults_apply_when_fields_are_absent() {
    let c = &parse_clouds("clouds:\n  - podman: {name: a}\n").unwrap()[0];
    assert_eq!(c.pod_labels, map(&[("jenkins", "slave")]));
    assert_eq!((c.container_cap, c.pod_retention), (0, Retention::Default));
    assert!(c.templates.is_empty());
    assert_eq!(parse_clouds("clouds: []\n").unwrap(), vec![]);
    let t = &parse_clouds(&one_template("")).unwrap()[0].templates[0];
    assert_eq!((t.instance_cap, t.connect_timeout, t.pod_retention), (None, None, Retention::Default));
    assert!(t.yaml.is_empty() && t.containers.is_empty());
    assert_eq!(c.socket, None, "no socket: the controller runs podman's service");
}

#[test]
fn a_podman_cloud_may_name_the_service_socket_it_uses() {
    let c = &parse_clouds("clouds:\n  - podman: {name: a, socket: 'unix:///run/podman/podman.sock'}\n")
        .unwrap()[0];
    assert_eq!(c.socket.as_deref(), Some("unix:///run/podman/podman.sock"));
    let e = parse_clouds("clouds:\n  - kubernetes: {name: a, socket: /x}\n").unwrap_err();
    assert!(e.message.contains("unknown field \"socket\""), "{e}");
}

#[test]
fn serialized_clouds_hide_the_token() {
    let clouds = parse_clouds(FULL).unwrap();
    let json = serde_json::to_value(&clouds).unwrap();
    assert_eq!(json[1]["credentials_token"], "***");
    assert!(!json.to_string().contains("/var/run/token"));
    assert_eq!(json[0]["credentials_token"], serde_json::Value::Null);
    assert_eq!(json[0]["templates"][1]["name"], "maven");
}

#[test]
fn errors_carry_the_path_and_position() {
    // (file, the whole message)
    let cases: &[(&str, &str)] = &[
        (
            "clouds:\n  - podman:\n      name: a\n      containrCap: 3\n",
            "line 4, column 7: clouds[0].podman: unknown field \"containrCap\" (did you mean \"containerCap\"?); \
             expected one of \"name\", \"containerCap\", \"podLabels\", \"podRetention\", \"webSocket\", \
             \"directConnection\", \"jenkinsUrl\", \"jenkinsTunnel\", \"agentImage\", \"templates\", \"podman\", \
             \"network\", \"socket\"",
        ),
        (
            "clouds:\n  - podman:\n      name: a\n      containerCap: -1\n",
            "line 4, column 21: clouds[0].podman.containerCap: is -1; it must be 0 or more",
        ),
        (
            "clouds:\n  - podman:\n      name: a\n      podRetention: neverr\n",
            "line 4, column 21: clouds[0].podman.podRetention: unknown value \"neverr\" (did you mean \"never\"?); \
             expected one of \"default\", \"never\", \"onFailure\", \"always\", \"evicted\"",
        ),
        (
            "clouds:\n  - podmn:\n      name: a\n",
            "line 2, column 5: clouds[0]: unknown value \"podmn\" (did you mean \"podman\"?); expected one of \
             \"podman\", \"kubernetes\"",
        ),
        (
            "clouds:\n  - podman: {name: a}\n  - kubernetes: {name: a}\n",
            "line 2, column 3: clouds[1]: cloud name \"a\" is used twice (also at [0]); names must be unique",
        ),
        (
            "clouds:\n  - podman:\n      name: a\n      webSocket: true\n      directConnection: true\n",
            "line 2, column 5: clouds[0]: webSocket and directConnection are both true; agents use one of them",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(err(text), *want, "{text}");
    }
}

#[test]
fn template_and_container_names_are_checked() {
    let e = parse_clouds(&one_template("")).map(|_| ());
    assert_eq!(e, Ok(()));
    let long = "n".repeat(MAX_TEMPLATE_NAME);
    assert!(parse_clouds(&one_template("").replace("name: t", &format!("name: {long}"))).is_ok());
    let e = err(&one_template("").replace("name: t", &format!("name: {long}x")));
    assert!(e.contains("is 58 characters long; the limit is 57"), "{e}");
    for bad in ["Bad", "a_b", "-a", "a-", "\"\""] {
        let e = err(&one_template("").replace("name: t", &format!("name: {bad}")));
        assert!(
            e.starts_with("line 5, column 17: clouds[0].podman.templates[0].name: template name"),
            "{bad}: {e}"
        );
    }
    let e = err(&one_template("containers: [{name: A_b, image: x}]"));
    assert!(
        e.starts_with("line 6, column 31: clouds[0].podman.templates[0].containers[0].name: container name"),
        "{e}"
    );
    let e = err(&one_template("containers: [{image: x}]"));
    assert!(e.contains("containers[0]: missing field \"name\""), "{e}");
    let e = err(&one_template("containers: [{name: a}, {name: a}]"));
    assert!(
        e.contains("templates[0].containers[1]: container name \"a\" is used twice (also at [0])"),
        "{e}"
    );
    let e = err("clouds:\n  - podman:\n      name: a\n      templates: [{name: x}, {name: x}]\n");
    assert!(e.contains("templates[1]: template name \"x\" is used twice"), "{e}");
    let e = err("clouds:\n  - podman:\n      name: a\n      templates: [{label: x}]\n");
    assert!(e.contains("templates[0]: missing field \"name\""), "{e}");
}

#[test]
fn caps_and_enumerations_are_checked() {
    assert!(err(&one_template("instanceCap: -2"))
        .contains("templates[0].instanceCap: is -2; it must be 0 or more"));
    assert!(err(&one_template("instanceCap: 5000000000")).contains("is 5000000000; the limit is 4294967295"));
    assert!(err(&one_template("instanceCap: three")).contains("instanceCap: invalid type: string"));
    assert_eq!(parse_clouds(&one_template("instanceCap: 0")).unwrap()[0].templates[0].instance_cap, Some(0));
    let e = err(&one_template("yamlMergeStrategy: merg"));
    assert!(e.contains("unknown value \"merg\" (did you mean \"merge\"?)"), "{e}");
    assert_eq!(
        parse_clouds(&one_template("podRetention: onFailure")).unwrap()[0].templates[0].pod_retention,
        Retention::OnFailure
    );
    // The plugin's old name of connectTimeout.
    assert_eq!(
        parse_clouds(&one_template("slaveConnectTimeout: 5")).unwrap()[0].templates[0].connect_timeout,
        Some(5)
    );
}

#[test]
fn kind_specific_fields_stay_with_their_kind() {
    let e = err("clouds:\n  - kubernetes:\n      name: a\n      network: host\n");
    assert!(e.starts_with("line 4, column 7: clouds[0].kubernetes: unknown field \"network\""), "{e}");
    let e = err("clouds:\n  - podman:\n      name: a\n      namespace: ci\n");
    assert!(e.starts_with("line 4, column 7: clouds[0].podman: unknown field \"namespace\""), "{e}");
    let e = err("clouds:\n  - podman:\n      name: a\n    kubernetes: {}\n");
    assert!(e.contains("has a second key \"kubernetes\" beside \"podman\""), "{e}");
    assert!(err("clouds:\n  - podman: {name: a, jenkinsTunnel: \"h:1\"}\n")
        .contains("jenkinsTunnel is used only with directConnection: true"));
    assert!(err("clouds:\n  - podman: {name: a, jenkinsUrl: ftp://x}\n")
        .contains("is not an http:// or https:// URL"));
}

#[test]
fn the_pod_yaml_must_be_a_pod_kubernetes_knows() {
    let e = err(&one_template("yaml: |\n  spec:\n    containers:\n      - name: a\n        imagee: b"));
    assert_eq!(
        e,
        "line 6, column 17: clouds[0].podman.templates[0].yaml: the Pod YAML has a field Kubernetes' Pod does not \
         have: spec.containers[0].imagee (check its spelling and indentation)"
    );
    let e = err(&one_template("yaml: |\n  kind: Deployment"));
    assert!(
        e.contains("the Pod YAML is not a Pod: invalid value: string \"Deployment\", expected Pod"),
        "{e}"
    );
    // An error inside a block scalar is placed in the file itself.
    let e = parse_clouds(&one_template("yaml: |\n  metadata: {}\n  spec: [")).unwrap_err();
    assert_eq!((e.line, e.column), (Some(8), Some(19)), "{e}");
    assert!(
        e.message.ends_with("the Pod YAML is not a Pod: spec: invalid type: sequence, expected PodSpec"),
        "{e}"
    );
    assert!(err(&one_template("yaml: \"status: {phase: Running}\"")).contains("sets \"status\""));
    assert!(err(&one_template("yaml: \"a: 1\\n---\\nb: 2\"")).contains("more than one document"));
    // Fragments are fine, as in the plugin.
    let ok = parse_clouds(&one_template("yaml: \"spec: {nodeName: n1}\"")).unwrap();
    assert_eq!(ok[0].templates[0].yaml, vec!["spec: {nodeName: n1}".to_string()]);
}

#[test]
fn resources_are_checked_against_kubernetes() {
    let e = err(&one_template("containers: [{name: a, resources: {limits: {memory: 1Gi}, limitz: {}}}]"));
    assert!(e.contains("containers[0]: unknown field \"limitz\"; resources has"), "{e}");
    let ok = parse_clouds(&one_template("containers: [{name: a, resources: {requests: {cpu: 1}}}]")).unwrap();
    assert_eq!(
        ok[0].templates[0].containers[0].resources,
        Some(serde_json::json!({"requests": {"cpu": "1"}}))
    );
}

#[test]
fn labels_selectors_and_env_are_checked() {
    assert!(err(&one_template("label: \"a && b\"")).contains("templates[0].label: \"&&\" has '&'"));
    assert!(err(&one_template("labels: {team: \"-x\"}")).contains("label value \"-x\""));
    assert!(err(&one_template("labels: {\"a b\": x}")).contains("key \"a b\""));
    assert!(err(&one_template("nodeSelector: \"disk\"")).contains("\"disk\" is not key=value"));
    assert!(err(&one_template("envVars: {1A: x}")).contains("\"1A\" is not a valid variable name"));
    assert!(err(&one_template("envVars: [{key: A, value: x}, {key: A, value: y}]"))
        .contains("\"A\" is given twice"));
    assert!(err(&one_template("envVars: [{key: A, valu: x}]"))
        .contains("unknown field \"valu\" (did you mean \"value\"?)"));
    assert!(err(&one_template("imagePullSecrets: [Reg]")).contains("is not a Kubernetes object name"));
    assert!(err(&one_template("volumes: [{emptyDirVolum: {mountPath: /a}}]"))
        .contains("(did you mean \"emptyDirVolume\"?)"));
    assert!(err(&one_template("volumes: [{emptyDirVolume: {mountPath: a}}]"))
        .contains("\"a\" is not an absolute path"));
    let e = err(&one_template(
        "volumes: [{emptyDirVolume: {mountPath: /a}}, {hostPathVolume: {hostPath: /b, mountPath: /a}}]",
    ));
    assert!(e.contains("volumes[1]: mount path \"/a\" is used twice"), "{e}");
    let t = &parse_clouds(&one_template("label: \"  a   b \"\ncontainers: [{name: c, command: \"sh -c\"}]"))
        .unwrap()[0]
        .templates[0];
    assert_eq!(t.label.as_deref(), Some("a b"));
    assert_eq!(t.containers[0].command, Some(vec!["sh".to_string(), "-c".to_string()]));
    assert!(err(&one_template("containers: [{name: c, command: \"sh -c 'x y'\"}]"))
        .contains("give the words as a list"));
}

#[test]
fn input_is_bounded_before_it_is_parsed() {
    let huge = format!("clouds: []\n#{}", "x".repeat(MAX_FILE));
    assert_eq!(err(&huge), format!("the file is {} bytes; the limit is 1048576 (1 MiB)", huge.len()));
    let deep = format!("clouds: {}{}", "[".repeat(100), "]".repeat(100));
    let e = parse_clouds(&deep).unwrap_err();
    assert_eq!((e.line, e.column), (Some(1), Some(72)), "{e}");
    assert!(e.message.contains("nests deeper than 64 levels"), "{e}");
    let deep_pod = one_template(&format!("yaml: \"{}{}\"", "[".repeat(70), "]".repeat(70)));
    assert!(err(&deep_pod).contains("the Pod YAML nests deeper than 64 levels"));
    assert!(err("").starts_with("the file is empty"));
    assert!(err("clouds: {a: 1}").contains("clouds: invalid type: map, expected a list of clouds"));
}

#[test]
fn retention_defers_to_the_cloud_and_the_cloud_default_is_never() {
    use Retention::*;
    // (template, cloud, build failed, pod failed, evicted) -> kept
    let table = [
        (Default, Default, true, true, true, false),
        (Default, Never, true, true, true, false),
        (Default, Always, false, false, false, true),
        (Default, OnFailure, true, false, false, true),
        (Never, Always, true, true, true, false),
        (Always, Never, false, false, false, true),
        (OnFailure, Never, false, false, false, false),
        (OnFailure, Never, true, false, false, true),
        (OnFailure, Never, false, true, false, true),
        (OnFailure, Never, false, false, true, false),
        (Evicted, Never, true, true, false, false),
        (Evicted, Never, false, false, true, true),
    ];
    for (t, c, b, p, e, kept) in table {
        assert_eq!(t.keeps(c, b, p, e), kept, "{t:?} {c:?} build_failed={b} pod_failed={p} evicted={e}");
    }
}

#[test]
fn template_for_matches_labels_and_names() {
    let clouds = parse_clouds(&format!(
        "{}        - name: plain\n        - name: other\n          label: java\n",
        one_template("label: \"maven java\"")
    ))
    .unwrap();
    let c = &clouds[0];
    let pick = |e: &str| c.template_for(&labels::parse(e).unwrap()).map(|t| t.name.clone());
    assert_eq!(pick("maven").as_deref(), Some("t"));
    assert_eq!(pick("java").as_deref(), Some("t"), "the first template that matches");
    assert_eq!(pick("java && !maven").as_deref(), Some("other"));
    assert_eq!(pick("plain").as_deref(), Some("plain"), "a template without label serves its name");
    assert_eq!(pick("t && maven").as_deref(), Some("t"));
    assert_eq!(pick("gradle"), None);
    assert_eq!(c.template("other").map(|t| t.label.as_deref()), Some(Some("java")));
}
