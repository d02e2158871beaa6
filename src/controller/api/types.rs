//! Placeholder: replaced by the typed API module at merge.
use serde::{Deserialize, Serialize};

/// Where a build is in its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    /// Waiting for a matching free executor.
    Queued,
    /// Running on a node.
    Running,
    /// Every step exited 0.
    Success,
    /// A step failed (or the build could not run).
    Failure,
    /// Cancelled by a user.
    Aborted,
}

impl BuildState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Aborted => "aborted",
        }
    }
    /// The state named `s` (anything unknown reads as a failure).
    pub fn parse(s: &str) -> Self {
        match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "success" => Self::Success,
            "aborted" => Self::Aborted,
            _ => Self::Failure,
        }
    }
    /// True once the build can no longer change.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Success | Self::Failure | Self::Aborted)
    }
}

/// Where a step is in its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Running.
    Running,
    /// Exited 0.
    Success,
    /// Failed.
    Failure,
    /// Cancelled.
    Aborted,
    /// Never ran.
    Skipped,
}

impl StepState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Aborted => "aborted",
            Self::Skipped => "skipped",
        }
    }
    /// The state named `s` (anything unknown reads as a failure).
    pub fn parse(s: &str) -> Self {
        match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "success" => Self::Success,
            "aborted" => Self::Aborted,
            "skipped" => Self::Skipped,
            _ => Self::Failure,
        }
    }
}
