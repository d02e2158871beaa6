//! The example files are what they say: the Kubernetes manifests deserialize strictly (no field
//! the Kubernetes API types do not know) into k8s-openapi's types, and the cloud files and
//! pipelines in them parse as `wisp cloud apply` and `wisp run` parse them.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde::de::DeserializeOwned;
use wisp::controller::pipeline;
use wisp::controller::template::parse_clouds;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn strict<T: DeserializeOwned>(doc: &serde_yaml_ng::Value) -> T {
    let mut unknown = Vec::new();
    let v: T = serde_ignored::deserialize(doc.clone(), |path| unknown.push(path.to_string()))
        .unwrap_or_else(|e| panic!("{e}: {doc:?}"));
    assert!(unknown.is_empty(), "fields the API does not know: {unknown:?}");
    v
}

#[test]
fn the_kubernetes_example_is_valid_kubernetes_and_its_cloud_and_build_parse() {
    let text = std::fs::read_to_string(format!("{ROOT}/examples/kubernetes/controller.yaml")).unwrap();
    let mut kinds = Vec::new();
    let mut files = None;
    for d in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc: serde_yaml_ng::Value = serde::Deserialize::deserialize(d).unwrap();
        let kind = doc["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "Namespace" => drop(strict::<Namespace>(&doc)),
            "ServiceAccount" => drop(strict::<ServiceAccount>(&doc)),
            "Role" => {
                let r: Role = strict(&doc);
                let verbs: Vec<String> = r.rules.unwrap().iter().flat_map(|r| r.verbs.clone()).collect();
                for v in ["create", "delete", "list", "watch"] {
                    assert!(verbs.iter().any(|x| x == v), "the role allows {v}");
                }
            }
            "RoleBinding" => drop(strict::<RoleBinding>(&doc)),
            "PersistentVolumeClaim" => drop(strict::<PersistentVolumeClaim>(&doc)),
            "ConfigMap" => files = strict::<ConfigMap>(&doc).data,
            "Deployment" => {
                let d: Deployment = strict(&doc);
                let spec = d.spec.unwrap().template.spec.unwrap();
                assert_eq!(spec.service_account_name.as_deref(), Some("wisp"));
            }
            "Service" => drop(strict::<Service>(&doc)),
            other => panic!("unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    assert_eq!(kinds.len(), 8, "{kinds:?}");
    let files = files.expect("the ConfigMap with the cloud file");
    let clouds = parse_clouds(&files["cloud.yaml"]).unwrap_or_else(|e| panic!("cloud.yaml: {e}"));
    assert_eq!(clouds[0].name, "cluster");
    pipeline::parse(&files["build.yaml"]).unwrap_or_else(|e| panic!("build.yaml: {e}"));
}

#[test]
fn the_podman_example_cloud_and_build_parse() {
    let cloud = std::fs::read_to_string(format!("{ROOT}/examples/podman/cloud.yaml")).unwrap();
    let clouds = parse_clouds(&cloud).unwrap_or_else(|e| panic!("cloud.yaml: {e}"));
    assert_eq!(clouds[0].templates[0].default_container.as_deref(), Some("build"));
    let build = std::fs::read_to_string(format!("{ROOT}/examples/podman/build.yaml")).unwrap();
    let p = pipeline::parse(&build).unwrap_or_else(|e| panic!("build.yaml: {e}"));
    assert!(clouds[0].template_for(&p.label_expr).is_some(), "the build's label names the template");
}
