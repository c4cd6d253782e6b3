//! Requests per second per caller: capture's per capture token (the
//! `capture_requests_per_second` quota) and the API's per personal key
//! (`--api-requests-per-second`). A token bucket per caller, refilled at
//! the rate and holding up to twice as much, so a client that flushes a
//! backlog after being offline gets through in a burst, and one that sends
//! without pause gets its share and no more.
//!
//! Only known callers get a bucket (capture tokens the
//! [`crate::tokens::TokenCache`] knows, keys the API found), and the
//! buckets are bounded in number: random tokens never reach here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Buckets kept at most. Past this, full buckets (idle tokens, which a
/// fresh bucket would treat the same) are dropped first.
const MAX_BUCKETS: usize = 10_000;

/// How many requests one token may burst, in seconds of its rate.
const BURST_SECONDS: f64 = 2.0;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Requests the token may still send at once.
    requests: f64,
    /// When `requests` was last brought up to date.
    at: Instant,
}

/// The tokens' buckets; cheap to clone.
#[derive(Clone, Default)]
pub struct RequestRates {
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
}

impl RequestRates {
    /// Takes one request from `token`'s bucket, refilled at `per_second`.
    /// With none left, the error is how long until there is one.
    pub fn take(&self, token: &str, per_second: u32) -> Result<(), Duration> {
        self.take_at(token, per_second, Instant::now())
    }

    fn take_at(&self, token: &str, per_second: u32, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(per_second.max(1));
        let burst = rate * BURST_SECONDS;
        let mut buckets = self.buckets.lock().expect("not poisoned");
        if !buckets.contains_key(token) && buckets.len() >= MAX_BUCKETS {
            // A bucket refilled to the brim holds nothing a new one would
            // not; if every bucket is in use, more tokens are busy than
            // the bound, and all start again with a full burst.
            buckets.retain(|_, bucket| {
                bucket.requests + now.duration_since(bucket.at).as_secs_f64() * rate < burst
            });
            if buckets.len() >= MAX_BUCKETS {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(token.to_string()).or_insert(Bucket {
            requests: burst,
            at: now,
        });
        let refilled = now.duration_since(bucket.at).as_secs_f64() * rate;
        bucket.requests = (bucket.requests + refilled).min(burst);
        bucket.at = now;
        if bucket.requests >= 1.0 {
            bucket.requests -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.requests) / rate))
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().expect("not poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_may_burst_twice_its_rate_then_waits_for_the_refill() {
        let rates = RequestRates::default();
        let start = Instant::now();
        for _ in 0..20 {
            rates.take_at("t", 10, start).unwrap();
        }
        let wait = rates.take_at("t", 10, start).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        rates
            .take_at("t", 10, start + Duration::from_millis(100))
            .unwrap();
        assert!(
            rates
                .take_at("t", 10, start + Duration::from_millis(100))
                .is_err()
        );
    }

    #[test]
    fn one_token_over_its_rate_leaves_another_alone() {
        let rates = RequestRates::default();
        let now = Instant::now();
        while rates.take_at("busy", 5, now).is_ok() {}
        rates.take_at("quiet", 5, now).unwrap();
    }

    #[test]
    fn the_buckets_are_bounded_and_idle_ones_go_first() {
        let rates = RequestRates::default();
        let start = Instant::now();
        for i in 0..MAX_BUCKETS {
            rates.take_at(&format!("t{i}"), 1, start).unwrap();
        }
        // "t0" is drained; the others refill to the brim by `later`.
        while rates.take_at("t0", 1, start).is_ok() {}
        let later = start + Duration::from_millis(1_500);
        rates.take_at("new", 1, later).unwrap();
        assert_eq!(rates.len(), 2, "only the drained bucket and the new one");
        assert!(
            rates.take_at("t0", 1, later).is_ok(),
            "1.5 s refilled one request"
        );
        assert!(
            rates.take_at("t0", 1, later).is_err(),
            "the drained bucket was kept"
        );
    }
}
