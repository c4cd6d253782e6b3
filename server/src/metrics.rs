//! The server's own numbers, at `GET /metrics` in Prometheus' text format:
//! capture's requests and events, the capture queue, every plugin config's
//! calls, failures and latency, and every destination's outcomes and
//! outbox.
//!
//! Each server has its own [`Registry`] rather than a process-wide one, so
//! two servers in one process (the tests run many) count apart. Labels
//! carry ids and plugin names only, never config values or event data.
//! The hot paths hold their handles: capture looks its counters up by
//! borrowed label values (no allocation), and each plugin config keeps a
//! [`PluginMetrics`] made once when its instance starts.
//!
//! What the store knows and this process does not (other processes share
//! a PostgreSQL queue and outboxes) is read by a supervised task every few
//! seconds ([`run_sampler`], and the queue monitor for the capture queue),
//! never per scrape: a scrape reads memory only.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus::core::Collector;
use prometheus::local::{LocalHistogram, LocalIntCounter};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use tokio::sync::watch;

use crate::api::error::{ErrorBody, ErrorType};
use crate::configs::ConfigWatch;
use crate::listener::{Peer, client_ip};
use crate::queue::QueueGauge;
use crate::runtime::{ExportFailure, PluginError, TrapReason};
use crate::store::{PluginConfig, Store};
use crate::supervisor::Health;

/// How often outbox depths are read from the store: a grouped count over
/// the outbox, cheap at this rate, and fresh enough for a gauge scraped
/// every 15 s or so.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Latency buckets, in seconds, for every hook: a transform takes tens of
/// microseconds to milliseconds, an export milliseconds to its 30 s
/// deadline, so one set spans both.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The hook a plugin call ran, as the `hook` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Transform,
    Export,
    Task,
}

impl Hook {
    fn label(self) -> &'static str {
        match self {
            Hook::Transform => "transform",
            Hook::Export => "export",
            Hook::Task => "task",
        }
    }
}

/// Why a plugin call failed, as the `kind` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin returned an error, refused a batch, or could not start.
    Error,
    /// The host stopped it at its deadline.
    Timeout,
    /// The host stopped it for anything else: memory, stack, a panic.
    Trap,
    /// There was no room to run it (a full pool, the project's quota).
    Exhausted,
}

impl FailureKind {
    const ALL: [FailureKind; 4] = [
        FailureKind::Error,
        FailureKind::Timeout,
        FailureKind::Trap,
        FailureKind::Exhausted,
    ];

    fn label(self) -> &'static str {
        match self {
            FailureKind::Error => "error",
            FailureKind::Timeout => "timeout",
            FailureKind::Trap => "trap",
            FailureKind::Exhausted => "exhausted",
        }
    }

    pub fn of(err: &PluginError) -> FailureKind {
        match err {
            PluginError::Exhausted { .. } => FailureKind::Exhausted,
            PluginError::Trapped {
                reason: TrapReason::Deadline(_),
                ..
            } => FailureKind::Timeout,
            PluginError::Trapped { .. } => FailureKind::Trap,
            _ => FailureKind::Error,
        }
    }

    pub fn of_export(err: &ExportFailure) -> FailureKind {
        match err {
            ExportFailure::Plugin(err) => FailureKind::of(err),
            ExportFailure::Retryable { .. } | ExportFailure::Permanent { .. } => FailureKind::Error,
        }
    }
}

/// The `plugin` label: the plugin's name without its version, so a
/// config's series go on across upgrades.
fn plugin_name(config: &PluginConfig) -> &str {
    config
        .plugin
        .split_once('@')
        .map_or(config.plugin.as_str(), |(name, _)| name)
}

/// Every metric of one server.
pub struct Metrics {
    registry: Registry,
    capture_requests: IntCounterVec,
    capture_events: IntCounterVec,
    queue_depth: IntGauge,
    queue_oldest_age: Gauge,
    plugin_invocations: IntCounterVec,
    plugin_failures: IntCounterVec,
    plugin_duration: HistogramVec,
    destination_events: IntCounterVec,
    destination_batches: IntCounterVec,
    outbox_depth: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(vec.clone()))
        .expect("registered once");
    vec
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("registered once");
    collector
}

const PLUGIN_LABELS: &[&str] = &["project_id", "config_id", "plugin", "hook"];
const DESTINATION_LABELS: &[&str] = &["project_id", "config_id", "plugin"];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new(
                "sluice_build_info",
                "Always 1; the version label says which sluice answers.",
            ),
            &["version"],
        )
        .expect("a valid metric");
        register(&registry, build.clone())
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Metrics {
            capture_requests: counter(
                &registry,
                "sluice_capture_requests_total",
                "Capture requests answered, by endpoint and HTTP status.",
                &["endpoint", "status"],
            ),
            capture_events: counter(
                &registry,
                "sluice_capture_events_total",
                "Events in capture requests: accepted into the queue, or refused with the reason's class (counted once the body was read).",
                &["outcome", "reason"],
            ),
            queue_depth: register(
                &registry,
                IntGauge::new(
                    "sluice_capture_queue_depth",
                    "Events accepted and not yet stored, by every process on this store.",
                )
                .expect("a valid metric"),
            ),
            queue_oldest_age: register(
                &registry,
                Gauge::new(
                    "sluice_capture_queue_oldest_age_seconds",
                    "How long the oldest queued event has waited; 0 when the queue is empty.",
                )
                .expect("a valid metric"),
            ),
            plugin_invocations: counter(
                &registry,
                "sluice_plugin_invocations_total",
                "Calls of a plugin config's hook, failed ones included.",
                PLUGIN_LABELS,
            ),
            plugin_failures: counter(
                &registry,
                "sluice_plugin_failures_total",
                "Failed calls of a plugin config's hook, by kind: error, timeout, trap, exhausted.",
                &["project_id", "config_id", "plugin", "hook", "kind"],
            ),
            plugin_duration: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "sluice_plugin_duration_seconds",
                        "How long a plugin config's hook calls took, failed ones included.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    PLUGIN_LABELS,
                )
                .expect("a valid metric"),
            ),
            destination_events: counter(
                &registry,
                "sluice_destination_events_total",
                "Events in a destination's export attempts, by what became of the attempt: delivered, retrying (failed, to be tried again) or dead_lettered.",
                &["project_id", "config_id", "plugin", "outcome"],
            ),
            destination_batches: counter(
                &registry,
                "sluice_destination_batches_total",
                "A destination's export attempts (batches), by outcome: delivered, retrying or dead_lettered.",
                &["project_id", "config_id", "plugin", "outcome"],
            ),
            outbox_depth: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "sluice_destination_outbox_depth",
                        "Events waiting in a destination's outbox, retries included; sampled from the store every few seconds.",
                    ),
                    DESTINATION_LABELS,
                )
                .expect("a valid metric"),
            ),
            registry,
        }
    }

    /// Counts one answered capture request of `events` events (when its
    /// body was read), refused with `refused` unless it succeeded.
    pub fn capture_request(
        &self,
        endpoint: &str,
        status: StatusCode,
        events: Option<usize>,
        refused: Option<&str>,
    ) {
        self.capture_requests
            .with_label_values(&[endpoint, status.as_str()])
            .inc();
        let Some(events) = events.filter(|n| *n > 0) else {
            return;
        };
        let labels = match refused {
            None if status.is_success() => ["accepted", ""],
            None => ["refused", "other"],
            Some(reason) => ["refused", reason],
        };
        self.capture_events
            .with_label_values(&labels)
            .inc_by(events as u64);
    }

    /// The handles of one plugin config's hook; made once when its
    /// instance starts.
    pub fn plugin(&self, config: &PluginConfig, hook: Hook) -> PluginMetrics {
        let labels = [
            config.project_id.as_str(),
            config.id.as_str(),
            plugin_name(config),
            hook.label(),
        ];
        let failures = FailureKind::ALL.map(|kind| {
            let [project, config, plugin, hook] = labels;
            self.plugin_failures
                .with_label_values(&[project, config, plugin, hook, kind.label()])
        });
        PluginMetrics {
            invocations: self.plugin_invocations.with_label_values(&labels),
            failures,
            duration: self.plugin_duration.with_label_values(&labels),
        }
    }

    /// The handles of one destination's outcomes.
    pub fn destination(&self, config: &PluginConfig) -> DestinationMetrics {
        let outcome = |vec: &IntCounterVec, outcome: &str| {
            vec.with_label_values(&[
                config.project_id.as_str(),
                config.id.as_str(),
                plugin_name(config),
                outcome,
            ])
        };
        let by_outcome = |vec: &IntCounterVec| {
            [
                outcome(vec, "delivered"),
                outcome(vec, "retrying"),
                outcome(vec, "dead_lettered"),
            ]
        };
        DestinationMetrics {
            events: by_outcome(&self.destination_events),
            batches: by_outcome(&self.destination_batches),
        }
    }

    /// Sets every destination's outbox depth from a sample (0 for one
    /// absent from `depths`); series of destinations no longer there, and
    /// shown before, are dropped.
    fn set_outbox_depths<'a>(
        &self,
        destinations: impl IntoIterator<Item = &'a PluginConfig>,
        depths: &std::collections::HashMap<String, i64>,
        shown: &mut HashSet<[String; 3]>,
    ) {
        let mut now_shown = HashSet::new();
        for config in destinations {
            let labels = [
                config.project_id.clone(),
                config.id.clone(),
                plugin_name(config).to_string(),
            ];
            let depth = depths.get(&config.id).copied().unwrap_or(0);
            self.outbox_depth
                .with_label_values(&[&labels[0], &labels[1], &labels[2]])
                .set(depth);
            now_shown.insert(labels);
        }
        for gone in shown.difference(&now_shown) {
            let _ = self
                .outbox_depth
                .remove_label_values(&[&gone[0], &gone[1], &gone[2]]);
        }
        *shown = now_shown;
    }

    /// The text exposition of every metric, the queue's gauges read now.
    fn render(&self, queue: &QueueGauge) -> String {
        self.queue_depth.set(queue.depth().max(0));
        self.queue_oldest_age.set(queue.oldest_age().as_secs_f64());
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .expect("text encoding into memory does not fail");
        String::from_utf8(text).expect("the text format is UTF-8")
    }
}

/// One plugin config's hook: its call count, failures by kind and
/// latency. Shared handles; see [`LocalPluginMetrics`] for a hot loop.
#[derive(Clone)]
pub struct PluginMetrics {
    invocations: IntCounter,
    failures: [IntCounter; 4],
    duration: Histogram,
}

impl PluginMetrics {
    /// Counts one call that took `took` and failed with `failure`, if it did.
    pub fn record(&self, took: Duration, failure: Option<FailureKind>) {
        self.invocations.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = failure {
            self.failures[kind as usize].inc();
        }
    }

    /// Handles that count in this thread and add to the shared ones on
    /// [`LocalPluginMetrics::flush`]: no shared cache line is touched per
    /// call.
    pub fn local(&self) -> LocalPluginMetrics {
        LocalPluginMetrics {
            invocations: self.invocations.local(),
            failures: self.failures.each_ref().map(IntCounter::local),
            duration: self.duration.local(),
        }
    }
}

/// [`PluginMetrics`] counted locally, for the pipeline's per-event calls;
/// the worker flushes them once per batch.
pub struct LocalPluginMetrics {
    invocations: LocalIntCounter,
    failures: [LocalIntCounter; 4],
    duration: LocalHistogram,
}

impl LocalPluginMetrics {
    pub fn record(&mut self, took: Duration, failure: Option<FailureKind>) {
        self.invocations.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = failure {
            self.failures[kind as usize].inc();
        }
    }

    pub fn flush(&mut self) {
        self.invocations.flush();
        for failures in &mut self.failures {
            failures.flush();
        }
        self.duration.flush();
    }
}

/// One destination's outcome counters, by [`crate::model::AttemptOutcome`].
#[derive(Clone)]
pub struct DestinationMetrics {
    events: [IntCounter; 3],
    batches: [IntCounter; 3],
}

impl DestinationMetrics {
    pub fn record(&self, outcome: crate::model::AttemptOutcome, events: usize) {
        use crate::model::AttemptOutcome;
        let index = match outcome {
            AttemptOutcome::Delivered => 0,
            AttemptOutcome::Retrying => 1,
            AttemptOutcome::DeadLettered => 2,
        };
        self.events[index].inc_by(events as u64);
        self.batches[index].inc();
    }
}

/// Reads every destination's outbox depth from the store every
/// [`SAMPLE_EVERY`], until `stop`. A failed read ends the task, for its
/// supervisor to report and restart.
pub async fn run_sampler(
    metrics: Arc<Metrics>,
    store: Store,
    configs: ConfigWatch,
    health: Health,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut shown = HashSet::new();
    let configs = configs.subscribe();
    loop {
        let snapshot = configs.borrow().clone();
        if let Some(snapshot) = snapshot {
            let depths = store
                .outbox_depths()
                .await
                .map_err(|err| anyhow::anyhow!("failed to read the outboxes' depths: {err}"))?;
            let destinations = snapshot.iter().filter(|c| c.is_destination());
            metrics.set_outbox_depths(destinations, &depths, &mut shown);
        }
        health.ready();
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// What `/metrics` needs: the metrics, the queue's gauge, and whom to
/// answer.
#[derive(Clone)]
pub struct MetricsState {
    pub metrics: Arc<Metrics>,
    pub queue: Arc<QueueGauge>,
    /// `--metrics-allow`.
    pub allow: Arc<[ipnet::IpNet]>,
    /// `--trusted-proxies`: through them, the forwarded client is judged.
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
}

/// `GET /metrics`: every metric in Prometheus' text format, to clients in
/// `--metrics-allow` only, since it names every project's ids and
/// counts. Behind a trusted proxy the forwarded client is judged, so a
/// proxy on the same machine does not open it to the world.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Every metric, in Prometheus' text format (see docs/operators.md).", body = String, content_type = "text/plain"),
        (status = 403, description = "The client is not in `--metrics-allow`.", body = ErrorBody)))]
pub async fn scrape(
    State(state): State<MetricsState>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    let client = client_ip(&headers, peer, &state.trusted_proxies);
    let allowed = client
        .parse::<IpAddr>()
        .is_ok_and(|ip| state.allow.iter().any(|net| net.contains(&ip)));
    if !allowed {
        return ErrorBody::new(
            ErrorType::PermissionDenied,
            "metrics_not_allowed",
            format!(
                "/metrics answers only the networks in --metrics-allow (SLUICE_METRICS_ALLOW, or `metrics_allow` in the config file), and {client} is in none of them; add it, as an address or a network such as 10.0.0.0/8, to scrape from there"
            ),
        )
        .respond(StatusCode::FORBIDDEN, None);
    }
    let text = state.metrics.render(&state.queue);
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AttemptOutcome, FailurePolicy};

    fn config(id: &str, plugin: &str) -> PluginConfig {
        PluginConfig {
            id: id.into(),
            project_id: "p1".into(),
            plugin_sha256: String::new(),
            plugin: plugin.into(),
            config: serde_json::json!({"api_key": "secret-value"}),
            enabled: true,
            position: 0,
            failure_policy: FailurePolicy::Open,
            consecutive_failures: 0,
            disabled_reason: None,
            delivery: Default::default(),
            paused_reason: None,
            updated_at: String::new(),
            manifest: None,
        }
    }

    #[test]
    fn labels_carry_ids_and_the_plugin_name_never_config_values() {
        let metrics = Metrics::new();
        let config = config("c1", "webhook@1.2.0");
        let mut local = metrics.plugin(&config, Hook::Transform).local();
        local.record(Duration::from_micros(30), None);
        local.record(Duration::from_millis(2), Some(FailureKind::Timeout));
        local.flush();
        metrics
            .destination(&config)
            .record(AttemptOutcome::Retrying, 7);
        let text = metrics.render(&QueueGauge::default());
        assert!(!text.contains("secret-value"), "{text}");
        assert!(
            text.contains(r#"sluice_plugin_invocations_total{config_id="c1",hook="transform",plugin="webhook",project_id="p1"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_plugin_failures_total{config_id="c1",hook="transform",kind="timeout",plugin="webhook",project_id="p1"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_plugin_duration_seconds_count{config_id="c1",hook="transform",plugin="webhook",project_id="p1"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_destination_events_total{config_id="c1",outcome="retrying",plugin="webhook",project_id="p1"} 7"#),
            "{text}"
        );
    }

    #[test]
    fn local_counts_show_only_once_flushed() {
        let metrics = Metrics::new();
        let handles = metrics.plugin(&config("c1", "x@1"), Hook::Transform);
        let mut local = handles.local();
        local.record(Duration::from_micros(5), None);
        assert_eq!(handles.invocations.get(), 0);
        local.flush();
        assert_eq!(handles.invocations.get(), 1);
    }

    #[test]
    fn a_gone_destination_loses_its_outbox_series() {
        let metrics = Metrics::new();
        let destinations = [config("d1", "webhook@1"), config("d2", "slack@1")];
        let mut shown = HashSet::new();
        let depths = std::collections::HashMap::from([("d1".to_string(), 4)]);
        metrics.set_outbox_depths(&destinations, &depths, &mut shown);
        let text = metrics.render(&QueueGauge::default());
        assert!(
            text.contains(r#"sluice_destination_outbox_depth{config_id="d1",plugin="webhook",project_id="p1"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_destination_outbox_depth{config_id="d2",plugin="slack",project_id="p1"} 0"#),
            "{text}"
        );
        metrics.set_outbox_depths(&destinations[1..], &depths, &mut shown);
        let text = metrics.render(&QueueGauge::default());
        assert!(!text.contains(r#"config_id="d1""#), "{text}");
        assert!(text.contains(r#"config_id="d2""#), "{text}");
    }
}
