//! Delivery throughput: events per second from the outbox to a local
//! receiver through the webhook destination.
//!
//! ```sh
//! scripts/test.sh                         # builds the plugins into target/plugins
//! cargo bench -p sluice --bench delivery  # SLUICE_DELIVERY_EVENTS, SLUICE_DELIVERY_BATCH, SLUICE_DELIVERY_CONCURRENCY
//! SLUICE_DELIVERY_DATABASE_URL=postgres://postgres@127.0.0.1/sluice_delivery cargo bench -p sluice --bench delivery
//! ```
//!
//! The server runs in this process with a fresh SQLite store, or on the
//! (empty) PostgreSQL database named by `SLUICE_DELIVERY_DATABASE_URL`. The
//! webhook destination is installed paused, the events are captured and
//! stored, and only then is it resumed: the clock runs from the resume until
//! the receiver has every event, so capture and storage are not measured.
//! The receiver is an axum server on loopback that parses each batch and
//! answers 200.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::{Value, json};
use sluice::runtime::Policy;
use sluice::server::{ServeConfig, open_store, serve};
use sluice::store::StoreConfig;

/// The allocator `sluice serve` runs with: the server runs in this process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

#[tokio::main]
async fn main() {
    let total = env("SLUICE_DELIVERY_EVENTS", 50_000);
    let batch_size = env("SLUICE_DELIVERY_BATCH", 500);
    let concurrency = env("SLUICE_DELIVERY_CONCURRENCY", 1);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let event: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/event-1k.json")).unwrap(),
    )
    .unwrap();
    let wasm = std::fs::read(target_dir().join("plugins/webhook.wasm"))
        .expect("target/plugins/webhook.wasm is missing: run scripts/test.sh first");

    // The receiver, in its own runtime so it does not share threads with the
    // server's handlers.
    let received: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen = received.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let router = axum::Router::new().route(
                "/hook",
                axum::routing::post(move |body: Bytes| {
                    let seen = seen.clone();
                    async move {
                        let records: Vec<Value> = serde_json::from_slice(&body).unwrap();
                        let mut seen = seen.lock().unwrap();
                        for record in records {
                            seen.insert(record["uuid"].as_str().unwrap().to_string());
                        }
                        "ok"
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, router).await.unwrap();
        });
    });
    let receiver = rx.recv().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::with_data_dir(dir.path().to_path_buf());
    config.policy = Policy {
        allow_loopback: true,
        ..Policy::default()
    };
    if let Ok(url) = std::env::var("SLUICE_DELIVERY_DATABASE_URL") {
        config.store = StoreConfig::Postgres { url };
    }
    let backend = match &config.store {
        StoreConfig::Sqlite { .. } => "SQLite",
        StoreConfig::Postgres { .. } => "PostgreSQL",
    };
    let store = open_store(&config.store).await.unwrap();
    let project = store.create_project("delivery").await.unwrap();
    store.close().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        serve(config, listener, std::future::pending())
            .await
            .unwrap();
    });

    let client = reqwest::Client::new();
    let api = format!("{base}/api/projects/{}", project.project_id);
    let auth = format!("Bearer {}", project.api_key);
    let uploaded: Value = client
        .post(format!("{api}/plugins"))
        .header("authorization", &auth)
        .body(wasm)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|text| serde_json::from_str(&text).unwrap())
        .unwrap();
    let created: Value = client
        .post(format!("{api}/plugin-configs"))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body(
            json!({
                "plugin_sha256": uploaded["sha256"],
                "config": {"url": format!("http://{receiver}/hook")},
                "delivery": {"batch_size": batch_size, "linger_ms": 0, "concurrency": concurrency},
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|text| serde_json::from_str(&text).unwrap())
        .unwrap();
    let id = created["id"].as_str().expect("the webhook was installed");
    let control = |action: &str| {
        client
            .post(format!("{api}/destinations/{id}/{action}"))
            .header("authorization", &auth)
            .send()
    };
    control("pause").await.unwrap();

    for chunk in (0..total).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|_| {
                let mut e = event.clone();
                e["uuid"] = json!(uuid::Uuid::now_v7().to_string());
                e
            })
            .collect();
        let response = client
            .post(format!("{base}/batch/"))
            .body(json!({"api_key": project.capture_token, "batch": batch}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let stats = || async {
        let view: Value = client
            .get(format!("{api}/destinations/{id}"))
            .header("authorization", &auth)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .map(|text| serde_json::from_str(&text).unwrap())
            .unwrap();
        view["stats"].clone()
    };
    while stats().await["pending"].as_u64() != Some(total as u64) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let started = Instant::now();
    control("resume").await.unwrap();
    while received.lock().unwrap().len() < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let stats = stats().await;
    println!(
        "{backend}: {total} events of {} bytes, batches of {batch_size}, concurrency {concurrency}",
        event.to_string().len()
    );
    println!(
        "  delivered in {:.2}s: {:.0} events/s ({} failed attempts)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        stats["failed_attempts"]
    );
}
