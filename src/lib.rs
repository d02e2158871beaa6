//! wisp: a tiny static build agent and the controller it serves.
//!
//! `proto` and `auth` are the protocol both sides share; `link` carries frames over WebSocket or
//! TCP; `tls` holds the certificate checks and identity fingerprints; `agent` is the agent. With
//! the `controller` feature, `controller` is the controller and `cli` the `wisp` command line
//! and its HTTP client.
#![warn(missing_docs)]

pub mod agent;
pub mod auth;
pub mod link;
pub mod logger;
pub mod proto;
pub mod text;
pub mod tls;

#[cfg(feature = "controller")]
pub mod cli;
#[cfg(feature = "controller")]
pub mod controller;
