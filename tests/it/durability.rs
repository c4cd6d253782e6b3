//! A 200 from capture means the events are durable: the server is killed
//! with SIGKILL right after acknowledging, or stopped with SIGTERM, or one of
//! two processes sharing PostgreSQL is killed mid-stream, and every
//! acknowledged event is found stored exactly once.

use crate::common::postgres;
use crate::common::process;

use std::collections::HashSet;

use process::{ServerProcess, Target, create_project_on, wait_for_events};
use serde_json::{Value, json};

/// A target for one test, with whatever must live as long as it.
async fn target(backend: &str) -> (Target, tempfile::TempDir, Option<postgres::TestDatabase>) {
    let dir = tempfile::tempdir().unwrap();
    match backend {
        "sqlite" => (Target::Sqlite(dir.path().to_path_buf()), dir, None),
        _ => {
            let database = postgres::TestDatabase::create().await;
            (Target::Postgres(database.url.clone()), dir, Some(database))
        }
    }
}

/// Posts `batches` batches of 200 new events; returns their uuids.
async fn send(base: &str, token: &str, batches: usize) -> HashSet<String> {
    let client = reqwest::Client::new();
    let mut acknowledged = HashSet::new();
    for round in 0..batches {
        let batch: Vec<Value> = (0..200)
            .map(|i| {
                let uuid = uuid::Uuid::now_v7().to_string();
                json!({"event": "load", "distinct_id": format!("u{i}"), "uuid": uuid, "properties": {"round": round}})
            })
            .collect();
        let response = client
            .post(format!("{base}/batch/"))
            .body(serde_json::to_vec(&json!({"api_key": token, "batch": batch})).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        acknowledged.extend(
            batch
                .iter()
                .map(|e| e["uuid"].as_str().unwrap().to_string()),
        );
    }
    acknowledged
}

fn assert_stored_once(stored: &[Value], acknowledged: &HashSet<String>) {
    let uuids: Vec<String> = stored
        .iter()
        .map(|e| e["uuid"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<String> = uuids.iter().cloned().collect();
    assert_eq!(uuids.len(), unique.len(), "an event was stored twice");
    assert_eq!(
        &unique, acknowledged,
        "stored events differ from acknowledged ones"
    );
}

async fn events_acknowledged_before_a_sigkill_are_stored_once_after_restart(backend: &str) {
    let (target, _dir, _database) = target(backend).await;
    let server = ServerProcess::start_on(&target, &[]).await;
    // Created while the server runs on the same store.
    let project = create_project_on(&target);
    let acknowledged = send(&server.base, project["capture_token"].as_str().unwrap(), 5).await;
    // No grace: whatever the worker was doing is cut off mid-way.
    server.kill();

    // A short lease, so the restarted worker takes over the dead one's rows.
    let restarted = ServerProcess::start_on(&target, &["--lease-seconds", "1"]).await;
    let stored = wait_for_events(&restarted.base, &project, acknowledged.len()).await;
    assert_stored_once(&stored, &acknowledged);
}

async fn sigterm_stops_the_server_cleanly_and_nothing_acknowledged_is_lost(backend: &str) {
    let (target, _dir, _database) = target(backend).await;
    let mut server = ServerProcess::start_on(&target, &[]).await;
    let project = create_project_on(&target);
    let acknowledged = send(&server.base, project["capture_token"].as_str().unwrap(), 2).await;

    let pid = server.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "a SIGTERM is a clean stop, got {status}");

    let restarted = ServerProcess::start_on(&target, &[]).await;
    let stored = wait_for_events(&restarted.base, &project, acknowledged.len()).await;
    assert_stored_once(&stored, &acknowledged);
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_events_acknowledged_before_a_sigkill_are_stored_once_after_restart() {
    events_acknowledged_before_a_sigkill_are_stored_once_after_restart("sqlite").await
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_events_acknowledged_before_a_sigkill_are_stored_once_after_restart() {
    events_acknowledged_before_a_sigkill_are_stored_once_after_restart("postgres").await
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_sigterm_stops_the_server_cleanly_and_nothing_acknowledged_is_lost() {
    sigterm_stops_the_server_cleanly_and_nothing_acknowledged_is_lost("sqlite").await
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_sigterm_stops_the_server_cleanly_and_nothing_acknowledged_is_lost() {
    sigterm_stops_the_server_cleanly_and_nothing_acknowledged_is_lost("postgres").await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_share_postgres_and_a_killed_ones_events_are_stored_once_by_the_other() {
    let (target, _dir, _database) = target("postgres").await;
    let lease = ["--lease-seconds", "2"];
    let first = ServerProcess::start_on(&target, &lease).await;
    let second = ServerProcess::start_on(&target, &lease).await;
    let project = create_project_on(&target);
    let token = project["capture_token"].as_str().unwrap().to_string();

    // Both take traffic; the first dies while its worker holds leases.
    // 1,000 events in all: what one page of the events API shows.
    let (a, b) = tokio::join!(send(&first.base, &token, 2), send(&second.base, &token, 2));
    first.kill();
    let after = send(&second.base, &token, 1).await;

    let acknowledged: HashSet<String> = a.into_iter().chain(b).chain(after).collect();
    let stored = wait_for_events(&second.base, &project, acknowledged.len()).await;
    assert_stored_once(&stored, &acknowledged);
}
