//! wisp: a tiny static build agent and the controller it serves.
//!
//! `proto` and `auth` are the protocol both sides share; `transport` carries whole frames over one
//! kind of wire (TCP, WebSocket) and `link` tags and codes them over any transport; `dial` opens
//! connections to the controller for the agent and the CLI; `tls` holds the certificate checks and
//! identity fingerprints; `agent` is the agent. With the `controller` feature, `controller` is the
//! controller and `cli` the `wisp` command line and its HTTP client (the `parsers` feature alone
//! builds just the controller's parsers).
#![warn(missing_docs)]

pub mod agent;
pub mod archive;
pub mod auth;
pub mod dial;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod link;
pub mod logger;
pub mod proto;
pub mod text;
pub mod tls;
pub mod transport;

#[cfg(feature = "controller")]
pub mod cli;
#[cfg(feature = "parsers")]
pub mod controller;
