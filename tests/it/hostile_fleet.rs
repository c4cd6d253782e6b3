//! Hostile plugins at scale: 50 plugin configs across 13 projects, a
//! quarter of them from `tests/plugins/` (memory bombs, endless loops,
//! deep recursion, huge output, log floods, file reads through WASI,
//! requests to the cloud metadata address, a panic in setup). The healthy
//! projects' events are all stored and delivered, their configs stay
//! enabled, the hostile ones that fail are disabled with their reason, and
//! the server's memory and the healthy throughput beside the fleet are
//! reported (measured in release builds by `scripts/bench-load.sh`; here
//! they are printed, not asserted, since a test checks behaviour).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use reqwest::Method;
use serde_json::{Value, json};
use sluice::runtime::Policy;
use sluice::store::{Backend, CreatedProject, StoreConfig};

use crate::common::server::{TestServer, wait_until};

/// Healthy projects, and the plugins each runs.
const HEALTHY: usize = 10;
/// Hostile projects' configs: 12 of the 50.
const HOSTILE: [&[&str]; 3] = [
    &[
        "memory-bomb",
        "spin-forever",
        "deep-recursion",
        "huge-output",
    ],
    &["log-flood", "wasi-file-read", "http-probe", "memory-bomb"],
    &[
        "spin-forever",
        "deep-recursion",
        "huge-output",
        "wasi-file-read",
    ],
];
/// Those that fail every call, and so are disabled.
const FAILING: [&str; 5] = [
    "memory-bomb",
    "spin-forever",
    "deep-recursion",
    "huge-output",
    "wasi-file-read",
];

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

async fn stored_count(server: &TestServer, projects: &[CreatedProject]) -> usize {
    use sqlx::{Connection, Row};
    let ids: Vec<String> = projects
        .iter()
        .map(|p| format!("'{}'", p.project_id))
        .collect();
    let sql = format!(
        "SELECT CAST(COUNT(*) AS TEXT) FROM events WHERE project_id IN ({})",
        ids.join(",")
    );
    let text: String = match &server.store {
        StoreConfig::Sqlite { data_dir } => {
            let url = format!("sqlite://{}", data_dir.join("sluice.db").display());
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query(&sql).fetch_one(&mut conn).await.unwrap().get(0)
        }
        StoreConfig::Postgres { url } => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query(&sql).fetch_one(&mut conn).await.unwrap().get(0)
        }
    };
    text.parse().unwrap()
}

/// Sends `batches` batches of `size` events to each project at once, each
/// batch retried after a 503's `Retry-After` as the SDKs do (pushback on a
/// busy machine is not a failure); the statuses other than 200 seen, and
/// the batches never accepted.
async fn send(
    server: &TestServer,
    projects: &[CreatedProject],
    batches: usize,
    size: usize,
) -> (Vec<u16>, usize) {
    let refused = Arc::new(Mutex::new((Vec::new(), 0usize)));
    let tasks: Vec<_> = projects
        .iter()
        .map(|project| {
            let (client, base, token) = (
                server.client.clone(),
                server.base.clone(),
                project.capture_token.clone(),
            );
            let refused = refused.clone();
            tokio::spawn(async move {
                for _ in 0..batches {
                    let batch: Vec<Value> = (0..size)
                        .map(|i| {
                            json!({"event": "$pageview", "distinct_id": format!("user-{i}"),
                                   "uuid": uuid::Uuid::now_v7().to_string(),
                                   "properties": {"plan": "pro", "password": "hunter2",
                                                  "url": "http://169.254.169.254/latest/meta-data/",
                                                  "mode": "big",
                                                  "$current_url": "https://shop.example/cart?utm_source=ads"}})
                        })
                        .collect();
                    let body = json!({"api_key": token, "batch": batch}).to_string();
                    let mut accepted = false;
                    for _ in 0..30 {
                        let response = client
                            .post(format!("{base}/batch/"))
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await
                            .unwrap();
                        let status = response.status().as_u16();
                        if status == 200 {
                            accepted = true;
                            break;
                        }
                        refused.lock().unwrap().0.push(status);
                        let wait: u64 = response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or(1);
                        tokio::time::sleep(std::time::Duration::from_secs(wait.min(5))).await;
                    }
                    if !accepted {
                        refused.lock().unwrap().1 += 1;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    std::mem::take(&mut *refused.lock().unwrap())
}

/// Events/s at which `projects` get `batches` batches of 50 each stored,
/// while `also` get the same traffic unmeasured.
async fn stored_rate(
    server: &TestServer,
    projects: &[CreatedProject],
    also: &[CreatedProject],
    batches: usize,
) -> f64 {
    let before = stored_count(server, projects).await;
    let wanted = before + projects.len() * batches * 50;
    let started = Instant::now();
    let ((pushed_back, never), _) = tokio::join!(
        send(server, projects, batches, 50),
        send(server, also, batches, 20)
    );
    assert_eq!(
        never, 0,
        "healthy batches never accepted; answers {pushed_back:?}"
    );
    assert!(
        pushed_back.iter().all(|status| *status == 503),
        "healthy capture answered {pushed_back:?}"
    );
    if !pushed_back.is_empty() {
        println!(
            "healthy capture pushed back {} times (503)",
            pushed_back.len()
        );
    }
    wait_until("the healthy projects' events to be stored", || async {
        (stored_count(server, projects).await >= wanted).then_some(())
    })
    .await;
    (wanted - before) as f64 / started.elapsed().as_secs_f64()
}

async fn configs(server: &TestServer, project: &CreatedProject) -> Vec<Value> {
    let (status, body) = server
        .call_api_as(project, Method::GET, "/plugin-configs", None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["results"].as_array().unwrap().clone()
}

async fn a_fleet_of_hostile_plugins_is_disabled_and_the_healthy_projects_keep_going(
    backend: Backend,
) {
    let server = TestServer::start_with(backend, |mut config| {
        config.policy = Policy {
            allow_loopback: true,
            ..Policy::default()
        };
        config
    })
    .await;
    let store = sluice::server::open_store(&server.store).await.unwrap();
    let mut healthy = vec![server.project.clone(), server.other.clone()];
    for i in healthy.len()..HEALTHY {
        healthy.push(store.create_project(&format!("healthy {i}")).await.unwrap());
    }
    let mut hostile = Vec::new();
    for i in 0..HOSTILE.len() {
        hostile.push(store.create_project(&format!("hostile {i}")).await.unwrap());
    }
    store.close().await;

    // The healthy chain: three transformations and, for most, a webhook.
    let (hook, delivered) = crate::common::webhook_receiver();
    let mut configs_made = 0;
    for (i, project) in healthy.iter().enumerate() {
        let mut chain = vec![
            ("property-renamer", json!({"properties": {"plan": "tier"}})),
            ("pii-scrubber", json!({"drop": ["password"]})),
            ("url-parser", json!({})),
        ];
        if i < 8 {
            chain.push(("webhook", json!({"url": hook})));
        }
        for (plugin, config) in chain {
            server
                .upload_and_install_as(project, plugin, config, "open")
                .await;
            configs_made += 1;
        }
    }
    assert_eq!(configs_made, 38);

    // Healthy alone first, for the ratio.
    let alone = stored_rate(&server, &healthy, &[], 10).await;

    for (project, plugins) in hostile.iter().zip(HOSTILE) {
        for plugin in plugins {
            server
                .upload_and_install_as(project, plugin, json!({}), "open")
                .await;
            configs_made += 1;
        }
        // A plugin that panics in setup is refused at install.
        let uploaded: Value = server
            .client
            .post(format!(
                "{}/api/projects/{}/plugins",
                server.base, project.project_id
            ))
            .bearer_auth(&project.api_key)
            .body(crate::common::wasm("panic-in-setup"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .map(|text| serde_json::from_str(&text).unwrap())
            .unwrap();
        let (status, body) = server
            .call_api_as(
                project,
                Method::POST,
                "/plugin-configs",
                Some(json!({"plugin_sha256": uploaded["sha256"], "config": {}})),
            )
            .await;
        assert_eq!(status, 400, "panic in setup is refused: {body}");
    }
    assert_eq!(configs_made, 50);

    let beside = stored_rate(&server, &healthy, &hostile, 10).await;

    // The failing hostile configs are disabled, each with its reason.
    let disabled = wait_until("every failing hostile config disabled", || async {
        let mut disabled = Vec::new();
        for project in &hostile {
            for config in configs(&server, project).await {
                let name = config["plugin"].as_str().unwrap_or_default().to_string();
                if let Some(reason) = config["disabled_reason"].as_str() {
                    disabled.push((name, reason.to_string()));
                }
            }
        }
        let failing = HOSTILE
            .iter()
            .flat_map(|p| p.iter())
            .filter(|p| FAILING.contains(p))
            .count();
        (disabled.len() >= failing).then_some(disabled)
    })
    .await;
    for (name, reason) in &disabled {
        assert!(!reason.is_empty(), "{name} disabled without a reason");
    }
    // The healthy projects noticed nothing: every config enabled, every
    // event delivered.
    for project in &healthy {
        for config in configs(&server, project).await {
            assert_eq!(config["enabled"], true, "{config}");
        }
    }
    wait_until("the healthy projects' events delivered", || async {
        (delivered.uuids().len() >= 8 * 2 * 10 * 50).then_some(())
    })
    .await;
    println!(
        "hostile fleet ({backend:?}): 50 configs (12 hostile, {} disabled); healthy stored {alone:.0} events/s alone, \
         {beside:.0} beside the fleet (ratio {:.2}); peak RSS of the test process {} MiB",
        disabled.len(),
        beside / alone,
        rss_mib()
    );
    for (name, reason) in disabled {
        println!("  disabled {name}: {reason}");
    }
}

on_both_backends!(a_fleet_of_hostile_plugins_is_disabled_and_the_healthy_projects_keep_going);
