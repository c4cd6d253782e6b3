//! End-to-end load: events per second from capture to stored, and capture
//! latency, with a chain of three transformation plugins.
//!
//! ```sh
//! scripts/test.sh                     # builds the plugins into target/plugins
//! cargo bench -p sluice --bench load  # SLUICE_LOAD_EVENTS, SLUICE_LOAD_CLIENTS, SLUICE_LOAD_BATCH
//! SLUICE_LOAD_DATABASE_URL=postgres://postgres@127.0.0.1/test cargo bench -p sluice --bench load
//! ```
//!
//! The server runs in this process on an ephemeral port with a fresh SQLite
//! store, or on the PostgreSQL database named by `SLUICE_LOAD_DATABASE_URL`
//! (which must be empty: the benchmark creates its own project in it);
//! clients post PostHog batches of the 1.3 KB fixture event over
//! loopback, each waiting for its answer before sending the next.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::server::{ServeConfig, open_store, serve};
use sluice::store::StoreConfig;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let total = env("SLUICE_LOAD_EVENTS", 50_000);
    let clients = env("SLUICE_LOAD_CLIENTS", 8);
    let batch_size = env("SLUICE_LOAD_BATCH", 50);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let event: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/event-1k.json")).unwrap(),
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::with_data_dir(dir.path().to_path_buf());
    if let Ok(url) = std::env::var("SLUICE_LOAD_DATABASE_URL") {
        config.store = StoreConfig::Postgres { url };
    }
    let backend = match &config.store {
        StoreConfig::Sqlite { .. } => "SQLite",
        StoreConfig::Postgres { .. } => "PostgreSQL",
    };
    let store_config = config.store.clone();
    let store = open_store(&config.store).await.unwrap();
    let project = store.create_project("load").await.unwrap();
    store.close().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        serve(config, listener, std::future::pending())
            .await
            .unwrap()
    });

    let client = reqwest::Client::new();
    let api = |path: &str| format!("{base}/api/projects/{}{path}", project.project_id);
    let wasm = std::fs::read(root.join("target/plugins/pii-scrubber.wasm"))
        .expect("run scripts/test.sh first to build the plugins");
    let uploaded: Value = serde_json::from_str(
        &client
            .post(api("/plugins"))
            .bearer_auth(&project.api_key)
            .body(wasm)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    for config in [
        json!({"drop": ["$set_once"]}),
        json!({"hash": ["email"], "salt": "s", "redact_phones": false}),
        json!({"redact_emails": false}),
    ] {
        let body = json!({"plugin_sha256": uploaded["sha256"], "config": config});
        let response = client
            .post(api("/plugin-configs"))
            .bearer_auth(&project.api_key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }

    let per_client = total / clients / batch_size;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = client.clone();
        let url = format!("{base}/batch/");
        let token = project.capture_token.clone();
        let event = event.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            for b in 0..per_client {
                let batch: Vec<Value> = (0..batch_size)
                    .map(|i| {
                        let mut e = event.clone();
                        e["uuid"] = json!(uuid::Uuid::new_v4().to_string());
                        e["distinct_id"] =
                            json!(format!("user-{c}-{}", (b * batch_size + i) % 1000));
                        e
                    })
                    .collect();
                let body = json!({"api_key": token, "batch": batch}).to_string();
                let sent = Instant::now();
                let response = client.post(&url).body(body).send().await.unwrap();
                assert_eq!(response.status(), 200);
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let accepted_in = started.elapsed();
    let sent = per_client * clients * batch_size;

    // The queue empties when the worker has stored the last event.
    let store = open_store(&store_config).await.unwrap();
    let stored_in = loop {
        if store.queue_depth().await.unwrap() == 0 {
            break started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    latencies.sort();
    println!(
        "events sent:              {sent} ({clients} clients, batches of {batch_size}, 1.3 KB events)"
    );
    println!("store:                    {backend}");
    println!("chain:                    3 x pii-scrubber");
    println!(
        "capture accepted:         {:.0} events/s ({:.2} s)",
        sent as f64 / accepted_in.as_secs_f64(),
        accepted_in.as_secs_f64()
    );
    println!(
        "capture -> stored:        {:.0} events/s ({:.2} s)",
        sent as f64 / stored_in.as_secs_f64(),
        stored_in.as_secs_f64()
    );
    println!(
        "batch request latency:    p50 {:.1} ms, p99 {:.1} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0
    );
}
