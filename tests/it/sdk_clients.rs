//! The official Python client libraries, installed from PyPI into a
//! throwaway virtualenv and used unchanged against a running server.

use crate::common::process;

use std::process::Command;

use process::{ServerProcess, create_project, wait_for_events};
use serde_json::{Value, json};

const SCRIPT: &str = r#"
import sys
from posthog import Posthog
import segment.analytics as analytics

host, token = sys.argv[1], sys.argv[2]
errors = []

posthog = Posthog(token, host=host, sync_mode=True, on_error=lambda e, batch: errors.append(e))
posthog.capture("viewed pricing", distinct_id="anon-1", properties={"plan": "pro"})
posthog.capture("$identify", distinct_id="user-1",
                properties={"$anon_distinct_id": "anon-1", "$set": {"email": "ann@example.com"}})
posthog.flush()
posthog.shutdown()

analytics.write_key = token
analytics.host = host
analytics.sync_mode = True
analytics.on_error = lambda e, batch: errors.append(e)
analytics.track("seg-user", "Order Completed", {"total": 30})
analytics.identify("seg-user", {"email": "bob@example.com"})
analytics.page("seg-user", "Docs", "Home", {"url": "https://example.com/docs"})
analytics.flush()

if errors:
    print("client errors:", errors, file=sys.stderr)
    sys.exit(1)
"#;

fn venv_with_clients(dir: &std::path::Path) -> std::path::PathBuf {
    use crate::common::python::{POSTHOG, SEGMENT, venv};
    venv(dir, &[POSTHOG, SEGMENT]).join("python")
}

#[tokio::test(flavor = "multi_thread")]
async fn posthog_python_and_segment_analytics_python_work_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let python = venv_with_clients(dir.path());
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data).await;
    let project = create_project(&data);
    let token = project["capture_token"].as_str().unwrap();

    let script = dir.path().join("clients.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = Command::new(&python)
        .arg(&script)
        .arg(&server.base)
        .arg(token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the clients failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let stored = wait_for_events(&server.base, &project, 5).await;
    let find = |name: &str, distinct_id: &str| -> Value {
        stored
            .iter()
            .find(|e| e["event"] == json!(name) && e["distinct_id"] == json!(distinct_id))
            .unwrap_or_else(|| panic!("no {name} for {distinct_id} in {stored:#?}"))
            .clone()
    };
    let viewed = find("viewed pricing", "anon-1");
    assert_eq!(viewed["properties"]["plan"], json!("pro"));
    assert_eq!(viewed["properties"]["$lib"], json!("posthog-python"));
    let identify = find("$identify", "user-1");
    assert_eq!(
        identify["properties"]["$set"],
        json!({"email": "ann@example.com"})
    );
    assert_eq!(identify["properties"]["$anon_distinct_id"], json!("anon-1"));

    let order = find("Order Completed", "seg-user");
    assert_eq!(order["properties"]["total"], json!(30));
    assert_eq!(order["properties"]["$lib"], json!("analytics-python"));
    let seg_identify = find("$identify", "seg-user");
    assert_eq!(
        seg_identify["properties"]["$set"],
        json!({"email": "bob@example.com"})
    );
    let page = find("$pageview", "seg-user");
    assert_eq!(
        page["properties"]["$current_url"],
        json!("https://example.com/docs")
    );
    for event in &stored {
        assert!(uuid::Uuid::parse_str(event["uuid"].as_str().unwrap()).is_ok());
        assert!(chrono::DateTime::parse_from_rfc3339(event["timestamp"].as_str().unwrap()).is_ok());
    }
}
