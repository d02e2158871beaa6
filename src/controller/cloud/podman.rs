//! shim
use super::backend::*;
/// shim
pub struct Podman;
impl Podman {
    /// shim
    pub fn new(_: Option<String>, _: Option<String>) -> Self {
        Podman
    }
}
impl PodBackend for Podman {
    fn kind(&self) -> &'static str {
        "podman"
    }
    fn create<'a>(&'a self, _: &'a k8s_openapi::api::core::v1::Pod) -> BackendFuture<'a, Result<(), String>> {
        Box::pin(async { Err("shim".into()) })
    }
    fn delete<'a>(&'a self, _: &'a str) -> BackendFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn list<'a>(&'a self, _: &'a Selector) -> BackendFuture<'a, Result<Vec<PodInfo>, String>> {
        Box::pin(async { Ok(vec![]) })
    }
    fn watch<'a>(
        &'a self,
        _: &'a Selector,
        _: Box<dyn FnMut(PodEvent) + Send + 'a>,
    ) -> BackendFuture<'a, ()> {
        Box::pin(std::future::pending())
    }
    fn diagnose<'a>(&'a self, _: &'a str, _: &'a str, _: usize) -> BackendFuture<'a, Diagnosis> {
        Box::pin(async { Diagnosis::default() })
    }
}
