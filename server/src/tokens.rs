//! Capture tokens resolved from memory: every capture request names one,
//! and a query per request was a round trip on the hot path.
//!
//! A known token is remembered for [`KNOWN_FOR`]; an unknown one for
//! [`UNKNOWN_FOR`], so a client hammering with a wrong token costs one
//! query a second, and a project created a moment ago is found soon after.
//! A token retired by a rotation is remembered no later than the end of
//! its grace period.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::store::{Result, Store};

/// How long a token found in the store is trusted without asking again.
const KNOWN_FOR: Duration = Duration::from_secs(30);

/// How long an unknown token is remembered as unknown.
const UNKNOWN_FOR: Duration = Duration::from_secs(1);

/// Tokens remembered at most; an attacker sending random tokens must not
/// grow memory without bound, so past this the cache starts over.
const MAX_ENTRIES: usize = 10_000;

/// A token's project (or none, for an unknown token) and when it was read.
/// A token's project (or none, for an unknown token), and until when
/// that answer may be used.
type Entry = (Option<String>, Instant);

#[derive(Clone, Default)]
pub struct TokenCache {
    entries: Arc<RwLock<HashMap<String, Entry>>>,
}

impl TokenCache {
    /// Forgets what is known of `token`, so that a rotation made through
    /// this server takes effect here at once; other servers sharing the
    /// database see it within [`KNOWN_FOR`].
    pub fn forget(&self, token: &str) {
        self.entries.write().expect("not poisoned").remove(token);
    }

    /// The project `token` belongs to, if any.
    pub async fn project_for(&self, store: &Store, token: &str) -> Result<Option<String>> {
        let now = Instant::now();
        if let Some((project, until)) = self.entries.read().expect("not poisoned").get(token)
            && now < *until
        {
            return Ok(project.clone());
        }
        let owner = store.project_for_token(token).await?;
        let until = match &owner {
            None => now + UNKNOWN_FOR,
            Some(owner) => {
                let left = owner
                    .valid_until
                    .as_deref()
                    .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
                    .map(|at| {
                        (at.to_utc() - chrono::Utc::now())
                            .to_std()
                            .unwrap_or_default()
                    });
                now + left.map_or(KNOWN_FOR, |left| left.min(KNOWN_FOR))
            }
        };
        let project = owner.map(|owner| owner.project_id);
        let mut entries = self.entries.write().expect("not poisoned");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(token.to_string(), (project.clone(), until));
        Ok(project)
    }
}
