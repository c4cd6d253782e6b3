//! What an install of a plugin in a project is configured to do.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// What a transformation's failure does to the event it failed on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// The event goes on unchanged: losing an enrichment beats losing the
    /// event.
    #[default]
    Open,
    /// The event goes to dead letters: for a plugin whose output must not
    /// be skipped, such as one that scrubs personal data.
    Closed,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Open => "open",
            FailurePolicy::Closed => "closed",
        }
    }
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailurePolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "open" => Ok(FailurePolicy::Open),
            "closed" => Ok(FailurePolicy::Closed),
            other => Err(format!(
                "`failure_policy` must be \"open\" or \"closed\", got \"{other}\""
            )),
        }
    }
}
