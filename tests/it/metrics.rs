//! `/metrics` after a load with a failing plugin and a failing
//! destination, read with a parser of Prometheus' text format; and who
//! may read it.

use crate::common;
use crate::common::server::{TestServer, answer, wait_until};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::StatusCode;
use prometheus_parse::{Sample, Scrape, Value as Metric};
use serde_json::{Value, json};
use sluice::runtime::Policy;
use sluice::server::ServeConfig;
use sluice::store::Backend;

/// Kept out of every label: it is a config value.
const SECRET: &str = "metrics-must-never-show-this-secret";

/// A webhook receiver that answers every request 500, counting them.
fn failing_receiver() -> (String, Arc<AtomicUsize>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                (StatusCode::INTERNAL_SERVER_ERROR, "down")
            }
        }),
    );
    (format!("http://{}/hook", common::serve(router)), requests)
}

async fn scrape(server: &TestServer) -> (String, Scrape) {
    let response = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_string())))
        .unwrap_or_else(|err| panic!("/metrics does not parse: {err}\n{text}"));
    (text, scrape)
}

/// The samples of `name` whose labels include every one of `labels`.
fn samples<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

/// The one counter or gauge value of `name` with `labels`; 0 if none.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples(scrape, name, labels);
    assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
    match found.first().map(|s| &s.value) {
        None => 0.0,
        Some(Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v)) => *v,
        Some(other) => panic!("{name} is not a counter or gauge: {other:?}"),
    }
}

async fn a_load_with_a_failing_plugin_and_a_failing_destination_shows_in_the_metrics(
    backend: Backend,
) {
    let server = TestServer::start_with(backend, |config| ServeConfig {
        policy: Policy {
            allow_loopback: true,
            ..Policy::default()
        },
        ..config
    })
    .await;
    let project = server.project.project_id.clone();
    // Fail-open: failed events go on unchanged, so the destination gets
    // every one of them.
    let transform = server
        .upload_and_install("change-then-fail", json!({}), "open")
        .await;
    let transform_id = transform["id"].as_str().unwrap().to_string();
    let (url, receiver_requests) = failing_receiver();
    let destination = server
        .upload_and_install("webhook", json!({"url": url, "secret": SECRET}), "open")
        .await;
    let destination_id = destination["id"].as_str().unwrap().to_string();
    // Quick retries, given up after a second: retrying, then dead letters
    // and a pause.
    let (status, body) = server
        .call_api(
            reqwest::Method::PATCH,
            &format!("/plugin-configs/{destination_id}"),
            Some(json!({"delivery": {
                "batch_size": 10,
                "linger_ms": 50,
                "retry_initial_backoff_ms": 50,
                "retry_max_backoff_ms": 200,
                "max_retry_seconds": 1,
            }})),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // 30 events: five fail with an error and five trap, each followed by
    // events that pass, so the plugin is never disabled for failing in a
    // row.
    let modes = ["keep", "error", "keep", "panic", "keep", "keep"];
    let events: Vec<Value> = (0..30)
        .map(|i| {
            json!({
                "event": "load",
                "distinct_id": format!("user-{i}"),
                "properties": {"mode": modes[i % modes.len()]},
            })
        })
        .collect();
    for batch in events.chunks(10) {
        let (status, body) = server.capture_batch(json!(batch)).await;
        assert_eq!(status, 200, "{body}");
    }
    // Refused: an unknown token, with its two events.
    let response = server
        .client
        .post(format!("{}/batch", server.base))
        .body(json!({"api_key": "phc_nobody", "batch": [{"event": "a", "distinct_id": "x"}, {"event": "b", "distinct_id": "x"}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let view = || async {
        let (status, view) = server
            .call_api(
                reqwest::Method::GET,
                &format!("/destinations/{destination_id}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{view}");
        view
    };
    wait_until("the failing destination to be paused", || async {
        (view().await["paused"] == true).then_some(())
    })
    .await;
    assert!(receiver_requests.load(Ordering::SeqCst) > 0);
    let pending = view().await["stats"]["pending"].as_i64().unwrap();
    // While paused, new events wait in the outbox.
    let (status, body) = server
        .capture_batch(json!([
            {"event": "late", "distinct_id": "u", "properties": {"mode": "keep"}},
            {"event": "late", "distinct_id": "u", "properties": {"mode": "keep"}},
            {"event": "late", "distinct_id": "u", "properties": {"mode": "keep"}},
        ]))
        .await;
    assert_eq!(status, 200, "{body}");
    // Paused, its outbox changes only as the late events reach it.
    let paused = wait_until("the late events in the outbox", || async {
        let view = view().await;
        (view["stats"]["pending"].as_i64().unwrap() == pending + 3).then_some(view)
    })
    .await;
    let waiting = paused["stats"]["pending"].as_f64().unwrap()
        + paused["stats"]["retrying"].as_f64().unwrap();

    let destination_labels = [
        ("project_id", project.as_str()),
        ("config_id", destination_id.as_str()),
        ("plugin", "webhook"),
    ];
    // The outbox depth is sampled every few seconds; wait for the sample
    // that sees the late events.
    let (text, scrape) = wait_until("the outbox depth to show the late events", || async {
        let (text, scrape) = self::scrape(&server).await;
        let depth = value(
            &scrape,
            "sluice_destination_outbox_depth",
            &destination_labels,
        );
        let transformed = value(
            &scrape,
            "sluice_plugin_invocations_total",
            &[("config_id", transform_id.as_str()), ("hook", "transform")],
        );
        (depth == waiting && transformed == 33.0).then_some((text, scrape))
    })
    .await;

    // Labels hold ids and names, never config values.
    assert!(!text.contains(SECRET), "{text}");
    assert!(!text.contains(&url), "{text}");

    // Capture: requests by endpoint and status, events by outcome.
    assert_eq!(
        value(
            &scrape,
            "sluice_capture_requests_total",
            &[("endpoint", "/batch"), ("status", "200")]
        ),
        4.0
    );
    assert_eq!(
        value(
            &scrape,
            "sluice_capture_requests_total",
            &[("endpoint", "/batch"), ("status", "401")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "sluice_capture_events_total",
            &[("outcome", "accepted")]
        ),
        33.0
    );
    assert_eq!(
        value(
            &scrape,
            "sluice_capture_events_total",
            &[("outcome", "refused"), ("reason", "unknown_token")]
        ),
        2.0
    );

    // The transformation: every call counted, failures by kind, latency.
    let transform_labels = [
        ("project_id", project.as_str()),
        ("config_id", transform_id.as_str()),
        ("plugin", "change-then-fail"),
        ("hook", "transform"),
    ];
    let failures = |kind: &'static str| {
        let mut labels = transform_labels.to_vec();
        labels.push(("kind", kind));
        value(&scrape, "sluice_plugin_failures_total", &labels)
    };
    assert_eq!(failures("error"), 5.0);
    assert_eq!(failures("trap"), 5.0);
    assert_eq!(failures("timeout"), 0.0);
    assert_eq!(failures("exhausted"), 0.0);
    let histogram = samples(&scrape, "sluice_plugin_duration_seconds", &transform_labels);
    assert_eq!(histogram.len(), 1, "{histogram:?}");
    let Metric::Histogram(buckets) = &histogram[0].value else {
        panic!("not a histogram: {:?}", histogram[0]);
    };
    let infinite = buckets.last().unwrap();
    assert!(infinite.less_than.is_infinite());
    assert_eq!(infinite.count, 33.0);
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "{buckets:?}"
    );
    assert_eq!(
        value(
            &scrape,
            "sluice_plugin_duration_seconds_count",
            &transform_labels
        ),
        33.0
    );
    assert!(
        value(
            &scrape,
            "sluice_plugin_duration_seconds_sum",
            &transform_labels
        ) > 0.0
    );

    // The destination: its export calls failed, were retried, and ended in
    // dead letters; nothing was delivered.
    let export_labels = [("config_id", destination_id.as_str()), ("hook", "export")];
    let exports = value(&scrape, "sluice_plugin_invocations_total", &export_labels);
    let mut failed_labels = export_labels.to_vec();
    failed_labels.push(("kind", "error"));
    assert!(exports >= 2.0, "{text}");
    assert_eq!(
        value(&scrape, "sluice_plugin_failures_total", &failed_labels),
        exports
    );
    let outcome = |name: &str, outcome: &'static str| {
        let mut labels = destination_labels.to_vec();
        labels.push(("outcome", outcome));
        value(&scrape, name, &labels)
    };
    assert_eq!(outcome("sluice_destination_events_total", "delivered"), 0.0);
    assert!(outcome("sluice_destination_events_total", "retrying") >= 1.0);
    assert_eq!(
        outcome("sluice_destination_events_total", "dead_lettered"),
        view().await["stats"]["dead_lettered_total"]
            .as_f64()
            .unwrap()
    );
    assert!(outcome("sluice_destination_events_total", "dead_lettered") >= 1.0);
    assert_eq!(
        outcome("sluice_destination_batches_total", "retrying")
            + outcome("sluice_destination_batches_total", "dead_lettered"),
        exports,
        "every export call is one batch's attempt"
    );

    // The queue: drained, and its gauges are there.
    let queue = wait_until("the capture queue to drain", || async {
        let (_, scrape) = self::scrape(&server).await;
        (value(&scrape, "sluice_capture_queue_depth", &[]) == 0.0).then_some(scrape)
    })
    .await;
    assert_eq!(
        value(&queue, "sluice_capture_queue_oldest_age_seconds", &[]),
        0.0
    );
    assert!(!samples(&queue, "sluice_build_info", &[]).is_empty());
}

async fn metrics_answer_only_the_allowed_networks(backend: Backend) {
    let server = TestServer::start_with(backend, |config| ServeConfig {
        metrics_allow: vec!["10.0.0.0/8".parse().unwrap()],
        ..config
    })
    .await;
    let (status, _, body) = answer(
        server
            .client
            .get(format!("{}/metrics", server.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("--metrics-allow") && detail.contains("127.0.0.1"),
        "{detail}"
    );

    // Through a proxy on this machine (a trusted proxy), the client it
    // forwards is judged, not the proxy.
    let server = TestServer::start(backend).await;
    let forwarded = |client: &'static str| {
        server
            .client
            .get(format!("{}/metrics", server.base))
            .header("x-forwarded-for", client)
            .send()
    };
    let (status, _, body) = answer(forwarded("203.0.113.9").await.unwrap()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("203.0.113.9"));
    assert_eq!(forwarded("127.0.0.1").await.unwrap().status(), 200);
    assert_eq!(
        server
            .client
            .get(format!("{}/metrics", server.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

on_both_backends!(
    a_load_with_a_failing_plugin_and_a_failing_destination_shows_in_the_metrics,
    metrics_answer_only_the_allowed_networks,
);
