//! Clouds: sources of agents started on demand. Dispatch asks them, in the order they were
//! configured, when no node matches a queued build's label; a cloud that serves the label starts
//! an agent, whose node is added with the cloud as its origin, and the build runs there once the
//! agent connects. No cloud is implemented here (the Kubernetes and podman clouds come later).

pub mod backend;
pub mod podman;
pub mod template;

use super::labels::LabelExpr;
use super::store::NodeRecord;
use std::future::Future;
use std::pin::Pin;

/// A future a cloud answers with.
pub type CloudFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A source of agents.
pub trait Cloud: Send + Sync {
    /// Its name (a node's origin names it).
    fn name(&self) -> &str;

    /// Whether it can start an agent for a build that asks for `label`. Pure: dispatch asks it
    /// under its lock.
    fn serves(&self, label: &LabelExpr) -> bool;

    /// Start an agent for `label`: returns the node its agent will connect as (the controller
    /// adds the node, with this cloud as its origin, before the agent can connect).
    fn provision(&self, label: &LabelExpr) -> CloudFuture<Result<NodeRecord, String>>;

    /// Stop the agent of a node this cloud made (its build is over or the node was removed).
    fn release(&self, node: &str) -> CloudFuture<()>;
}

/// Where a node came from, as its record spells it.
pub const STATIC: &str = "static";
