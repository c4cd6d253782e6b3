//! Attempts to reach past the sandbox, as a hostile tenant would make
//! them: addresses inside the network in every spelling, redirects to
//! them, and another project's key-value data. (Files and the environment
//! through WASI are tried in `runtime.rs`, and names that resolve to
//! inside addresses in `runtime::host::http`'s unit tests.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use sluice::runtime::Policy;
use sluice::store::Backend;

use crate::common::server::TestServer;
use crate::common::{self, event, install, wasm};

/// A server standing for something inside the network; counts requests.
fn inside() -> (u16, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let addr = common::serve(Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            "the secret"
        }
    }));
    (addr.port(), hits)
}

/// What http-probe saw when told to fetch `url`, with `url`'s host granted
/// as a tenant grants a webhook's.
fn probe(policy: Policy, url: &str) -> serde_json::Map<String, Value> {
    let runtime = common::runtime(policy);
    let plugin = runtime.load(&wasm("http-probe")).unwrap();
    let mut instance = plugin
        .install(install("probe", json!({"target": url})))
        .unwrap();
    let mut out = instance
        .transform(event("probe", json!({"url": url})))
        .expect("a refused request is an error value, not a trap");
    out.pop().unwrap().properties
}

#[test]
fn inside_addresses_in_every_spelling_are_refused_and_never_reached() {
    let (port, hits) = inside();
    for host in [
        "127.0.0.1",
        "2130706433",         // decimal
        "0x7f000001",         // hexadecimal
        "0177.0.0.1",         // octal
        "0x7f.1",             // mixed, short
        "127.1",              // short
        "[::ffff:127.0.0.1]", // IPv4-mapped
        "[::ffff:7f00:1]",
        "[::127.0.0.1]",     // IPv4-compatible
        "[64:ff9b::7f00:1]", // NAT64
        "[2002:7f00:1::]",   // 6to4
        "[::1]",
        "localhost",
        "0.0.0.0",
        "[::]",
    ] {
        let url = format!("http://{host}:{port}/");
        let seen = probe(Policy::default(), &url);
        let error = seen
            .get("http_error")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{url} was fetched: {seen:?}"));
        assert!(error.starts_with("HTTP request denied"), "{url}: {error}");
    }
    for metadata in [
        "169.254.169.254",
        "[::ffff:a9fe:a9fe]",
        "[64:ff9b::a9fe:a9fe]",
    ] {
        let url = format!("http://{metadata}/latest/meta-data/");
        let seen = probe(Policy::default(), &url);
        let error = seen["http_error"].as_str().unwrap();
        assert!(error.starts_with("HTTP request denied"), "{url}: {error}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing reached inside");
}

#[test]
fn a_redirect_inside_is_handed_to_the_plugin_never_followed() {
    let (inside_port, hits) = inside();
    // An allowed host (here on loopback, which this policy opens) that
    // answers every request with a redirect inside.
    for location in [
        format!("http://127.0.0.1:{inside_port}/secret"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("http://[::ffff:127.0.0.1]:{inside_port}/"),
    ] {
        let target = location.clone();
        let redirector = common::serve(Router::new().fallback(move || {
            let target = target.clone();
            async move { (StatusCode::FOUND, [(header::LOCATION, target)]).into_response() }
        }));
        let url = format!("http://127.0.0.1:{}/go", redirector.port());
        let seen = probe(
            Policy {
                allow_loopback: true,
                ..Policy::default()
            },
            &url,
        );
        assert_eq!(
            seen.get("status"),
            Some(&json!(302)),
            "{location}: {seen:?}"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "no redirect was followed");
}

/// Counts of `seen` that kv-counter wrote into a project's stored events.
fn seen_counts(events: &[Value]) -> Vec<i64> {
    let mut counts: Vec<i64> = events
        .iter()
        .map(|e| {
            e["properties"]["seen"]
                .as_i64()
                .expect("kv-counter counted")
        })
        .collect();
    counts.sort();
    counts
}

async fn another_projects_key_value_data_is_out_of_reach(backend: Backend) {
    let server = TestServer::start(backend).await;
    server
        .upload_and_install_as(&server.project, "kv-counter", json!({}), "open")
        .await;
    server
        .upload_and_install_as(&server.other, "kv-counter", json!({}), "open")
        .await;
    // The same keys (one distinct id) in both projects.
    let events = |n: usize| -> Value {
        (0..n)
            .map(|_| json!({"event": "count", "distinct_id": "shared-id"}))
            .collect()
    };
    let (status, _) = server.capture_batch_as(&server.project, events(3)).await;
    assert_eq!(status, 200);
    let (status, _) = server.capture_batch_as(&server.other, events(2)).await;
    assert_eq!(status, 200);
    let ours = server.wait_events_of(&server.project, 3).await;
    let theirs = server.wait_events_of(&server.other, 2).await;
    assert_eq!(seen_counts(&ours), [1, 2, 3]);
    assert_eq!(
        seen_counts(&theirs),
        [1, 2],
        "counted apart from the other project"
    );
}

on_both_backends!(another_projects_key_value_data_is_out_of_reach);
