//! The controller: nodes, queue, dispatch, builds and their logs, clouds, and the HTTP API.
//!
//! The parsers of what users send (label expressions, pipelines, pod templates) build with the
//! `parsers` feature alone as well: the fuzz targets need them without the rest of the controller
//! and its dependencies (HTTP, SQLite, the Kubernetes client). Everything else needs `controller`.

pub mod labels;
pub mod pipeline;
pub mod template;

#[cfg(feature = "controller")]
pub mod api;
#[cfg(feature = "controller")]
pub mod archives;
#[cfg(feature = "controller")]
pub mod build;
#[cfg(feature = "controller")]
pub mod cloud;
#[cfg(feature = "controller")]
pub mod clouds;
#[cfg(feature = "controller")]
pub mod core;
#[cfg(feature = "controller")]
pub mod deadlines;
#[cfg(feature = "controller")]
pub mod http;
#[cfg(feature = "controller")]
pub mod identity;
#[cfg(all(feature = "controller", feature = "kafka"))]
pub mod kafka;
#[cfg(feature = "controller")]
pub mod logs;
#[cfg(feature = "controller")]
pub mod metrics;
#[cfg(feature = "controller")]
pub mod nodes;
#[cfg(feature = "controller")]
pub mod noisy;
#[cfg(feature = "controller")]
pub mod queue;
#[cfg(feature = "controller")]
pub mod runner;
#[cfg(feature = "controller")]
mod serve;
#[cfg(feature = "controller")]
pub mod server;
#[cfg(feature = "controller")]
pub mod session;
#[cfg(feature = "controller")]
pub mod steps;
#[cfg(feature = "controller")]
pub mod store;
#[cfg(feature = "controller")]
pub mod web;

#[cfg(feature = "controller")]
pub use self::core::Controller;
#[cfg(feature = "controller")]
pub use serve::{launch, serve, start, ServeConfig, Server};
