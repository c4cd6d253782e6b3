//! A 200 from capture means the events are durable: the server is killed
//! with SIGKILL right after acknowledging, restarted, and every acknowledged
//! event is found stored exactly once.

#[path = "common/process.rs"]
mod process;

use std::collections::HashSet;

use process::{ServerProcess, create_project, wait_for_events};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn events_acknowledged_before_a_sigkill_are_stored_once_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path()).await;
    // Created while the server runs on the same store.
    let project = create_project(dir.path());
    let token = project["capture_token"].as_str().unwrap();

    let client = reqwest::Client::new();
    let mut acknowledged = HashSet::new();
    for round in 0..5 {
        let batch: Vec<Value> = (0..200)
            .map(|i| {
                let uuid = uuid::Uuid::now_v7().to_string();
                json!({"event": "load", "distinct_id": format!("u{i}"), "uuid": uuid, "properties": {"round": round}})
            })
            .collect();
        let response = client
            .post(format!("{}/batch/", server.base))
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
    // No grace: whatever the worker was doing is cut off mid-way.
    server.kill();

    let restarted = ServerProcess::start(dir.path()).await;
    let stored = wait_for_events(&restarted.base, &project, acknowledged.len()).await;
    let uuids: Vec<String> = stored
        .iter()
        .map(|e| e["uuid"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<String> = uuids.iter().cloned().collect();
    assert_eq!(uuids.len(), unique.len(), "an event was stored twice");
    assert_eq!(
        unique, acknowledged,
        "stored events differ from acknowledged ones"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_server_cleanly_and_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path()).await;
    let project = create_project(dir.path());
    let batch: Vec<Value> = (0..300)
        .map(|i| json!({"event": "e", "distinct_id": format!("u{i}"), "uuid": uuid::Uuid::now_v7().to_string()}))
        .collect();
    let body = json!({"api_key": project["capture_token"], "batch": batch});
    let response = reqwest::Client::new()
        .post(format!("{}/batch/", server.base))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

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

    let restarted = ServerProcess::start(dir.path()).await;
    let stored = wait_for_events(&restarted.base, &project, 300).await;
    let unique: HashSet<&str> = stored.iter().map(|e| e["uuid"].as_str().unwrap()).collect();
    assert_eq!((stored.len(), unique.len()), (300, 300));
}
