//! Capture tokens resolved from memory: every capture request names one,
//! and a query per request was a round trip on the hot path.
//!
//! A known token is remembered for [`KNOWN_FOR`]; an unknown one for
//! [`UNKNOWN_FOR`], so a client hammering with a wrong token costs one
//! query a second, and a project created a moment ago is found soon after.

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
type Entry = (Option<String>, Instant);

#[derive(Clone, Default)]
pub struct TokenCache {
    entries: Arc<RwLock<HashMap<String, Entry>>>,
}

impl TokenCache {
    /// The project `token` belongs to, if any.
    pub async fn project_for(&self, store: &Store, token: &str) -> Result<Option<String>> {
        let now = Instant::now();
        if let Some((project, at)) = self.entries.read().expect("not poisoned").get(token) {
            let ttl = if project.is_some() {
                KNOWN_FOR
            } else {
                UNKNOWN_FOR
            };
            if now.duration_since(*at) < ttl {
                return Ok(project.clone());
            }
        }
        let project = store.project_for_token(token).await?;
        let mut entries = self.entries.write().expect("not poisoned");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(token.to_string(), (project.clone(), now));
        Ok(project)
    }
}
