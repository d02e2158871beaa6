//! The HTTP API's request and response types, shared by the routes and the CLI.
pub mod types;
