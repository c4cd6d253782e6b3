//! What `sluice serve` is configured with: the command line's options,
//! as one value the composition root hands out in parts.

use std::path::PathBuf;
use std::time::Duration;

use crate::model::Quotas;
use crate::query::QueryLimits;
use crate::runtime::Policy;
use crate::store::{DEFAULT_LEASE, KeySource, StoreConfig};

/// Everything `sluice serve` is configured with.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub store: StoreConfig,
    /// Where the key that seals secret config values comes from.
    pub secret_key: KeySource,
    /// Largest request body, compressed or not.
    pub max_body_bytes: usize,
    /// Capture answers 503 once this many events wait in the queue.
    pub max_queue_depth: i64,
    /// Capture answers 503 once the oldest queued event has waited this
    /// long: the pipeline is behind, and acknowledging more would promise
    /// what it cannot store soon.
    pub max_queue_age: Duration,
    /// How long a capture request's body may take to arrive; a slower one
    /// (a slowloris client holding a request slot) gets 408.
    pub capture_body_timeout: Duration,
    /// How long an API request's body may take to arrive; a slower one gets
    /// 408 (see `api::slow`).
    pub api_body_timeout: Duration,
    /// How long a capture request may take in all, body, parsing and
    /// commit; a slower one gets 503 with `Retry-After`.
    pub capture_request_timeout: Duration,
    /// Record the client address as `$ip`.
    pub record_ip: bool,
    /// What plugins may do; see `runtime::Policy`.
    pub policy: Policy,
    /// How long a worker holds claimed queue rows before another process may
    /// take them over.
    pub lease: Duration,
    /// What one analytics query may cost.
    pub query_limits: QueryLimits,
    /// Analytics queries running at once across all projects.
    pub max_concurrent_queries: u32,
    /// Every project's quotas, unless the project has its own.
    pub quotas: Quotas,
    /// Connections held open at once; see `listener`.
    pub max_connections: usize,
    /// How long a connection may take to send a request's headers, and
    /// may stay idle between requests, before it is closed: a client
    /// sending its header a byte at a time must not hold a connection slot
    /// for longer.
    pub header_timeout: Duration,
    /// Addresses whose `X-Forwarded-For` is believed: the reverse proxies in
    /// front of the server. Anyone else could write any address there.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Time between rounds of pruning plugin logs and dead letters (see
    /// `retention`): by default 5 minutes, often enough that a flood of
    /// log lines is cut back soon, rarely enough that the rounds that find
    /// nothing cost nothing to speak of.
    pub retention_period: Duration,
    /// Management and query API requests one personal API key may make
    /// per second, with bursts of twice as many.
    pub api_requests_per_second: u32,
    /// Networks whose clients `/metrics` answers; it names every
    /// project's ids and counts, so by default only this machine.
    pub metrics_allow: Vec<ipnet::IpNet>,
    /// How long, after the shutdown signal, the server goes on serving
    /// while `/_ready` answers 503, so load balancers stop sending it
    /// traffic before it stops accepting.
    pub shutdown_delay: Duration,
}

impl ServeConfig {
    pub fn with_data_dir(data_dir: PathBuf) -> Self {
        ServeConfig {
            secret_key: KeySource::in_dir(&data_dir),
            store: StoreConfig::Sqlite { data_dir },
            max_body_bytes: 20 << 20,
            max_queue_depth: 1_000_000,
            max_queue_age: Duration::from_secs(30),
            capture_body_timeout: Duration::from_secs(30),
            api_body_timeout: Duration::from_secs(30),
            capture_request_timeout: Duration::from_secs(60),
            record_ip: true,
            policy: Policy::default(),
            lease: DEFAULT_LEASE,
            query_limits: QueryLimits::default(),
            max_concurrent_queries: 4,
            quotas: Quotas::default(),
            max_connections: crate::listener::default_max_connections(),
            header_timeout: Duration::from_secs(30),
            trusted_proxies: default_trusted_proxies(),
            retention_period: Duration::from_secs(300),
            api_requests_per_second: 100,
            metrics_allow: default_trusted_proxies(),
            shutdown_delay: Duration::ZERO,
        }
    }
}

/// Loopback only: a reverse proxy (or, for `metrics_allow`, a scraper) on
/// the same machine.
pub fn default_trusted_proxies() -> Vec<ipnet::IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .map(|net| net.parse().expect("a valid network"))
        .collect()
}
