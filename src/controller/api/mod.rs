//! The HTTP API's contract: the JSON bodies the routes answer with and the CLI reads, as serde
//! types, so the two sides are written against the same definitions and cannot drift apart.

pub mod types;

pub use types::*;
