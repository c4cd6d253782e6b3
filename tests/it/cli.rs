//! The `sluice plugin` and `sluice project` commands, run as a user runs them.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

fn sluice(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("sluice runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn fixture(name: &str) -> String {
    common::workspace_root()
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn plugin_test_prints_the_transformed_event_logs_and_http_calls_as_json() {
    let wasm = common::wasm_path("pii-scrubber");
    let out = sluice(
        &[
            "plugin",
            "test",
            &wasm.display().to_string(),
            "--event",
            &fixture("pageview.json"),
            "--config",
            r#"{"drop": ["email"]}"#,
        ],
        &common::workspace_root(),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(report["plugin"]["name"], json!("pii-scrubber"));
    assert_eq!(report["hook"], json!("transform"));
    let event = &report["events"][0];
    assert_eq!(event["uuid"], json!("01890000-0000-7000-8000-000000000001"));
    assert_eq!(event["properties"]["note"], json!("call me at [redacted]"));
    assert_eq!(event["properties"]["$set"], json!({"name": "Ann"}));
    assert!(event["properties"].get("email").is_none());
    assert_eq!(report["logs"], json!([]));
    assert_eq!(report["http_calls"], json!([]));
}

#[test]
fn plugin_test_reports_http_calls_of_a_destination() {
    let addr =
        common::serve(axum::Router::new().route("/hook", axum::routing::post(|| async { "ok" })));
    let wasm = common::wasm_path("webhook");
    let config = format!(
        r#"{{"url": "http://127.0.0.1:{}/hook", "secret": "k"}}"#,
        addr.port()
    );
    let out = sluice(
        &[
            "plugin",
            "test",
            &wasm.display().to_string(),
            "--event",
            &fixture("pageview.json"),
            "--config",
            &config,
            "--allow-loopback",
        ],
        &common::workspace_root(),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["hook"], json!("export"));
    let call = &report["http_calls"][0];
    assert_eq!(call["method"], json!("POST"));
    assert_eq!(call["status"], json!(200));
    assert!(call["request_body"].as_str().unwrap().contains("$pageview"));
}

#[test]
fn plugin_test_refuses_bad_events_configs_and_files_with_a_clear_message() {
    let root = common::workspace_root();
    let wasm = common::wasm_path("pii-scrubber").display().to_string();

    let out = sluice(
        &["plugin", "test", &wasm, "--event", r#"{"event": "x"}"#],
        &root,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("event #1 is invalid: `distinct_id` is missing"),
        "{stderr}"
    );

    let out = sluice(
        &[
            "plugin",
            "test",
            &wasm,
            "--event",
            &fixture("pageview.json"),
            "--config",
            r#"{"drop": 5}"#,
        ],
        &root,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("pii-scrubber@0.1.0 failed in setup: invalid config"),
        "{stderr}"
    );

    let out = sluice(
        &[
            "plugin",
            "test",
            &fixture("pageview.json"),
            "--event",
            &fixture("pageview.json"),
        ],
        &root,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("is not a WebAssembly component"),
        "{stderr}"
    );
}

#[test]
fn plugin_test_exits_nonzero_when_the_plugin_is_stopped() {
    let wasm = common::wasm_path("spin-forever").display().to_string();
    let out = sluice(
        &[
            "plugin",
            "test",
            &wasm,
            "--event",
            &fixture("pageview.json"),
        ],
        &common::workspace_root(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr
            .contains("spin-forever@0.1.0 was stopped during transform: it ran past its deadline"),
        "{stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("the report is still printed");
    assert!(report["error"].as_str().unwrap().contains("deadline"));
}

#[test]
fn a_new_plugin_scaffold_builds_tests_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice(&["plugin", "new", "demo"], dir.path());
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let demo = dir.path().join("demo");

    // The scaffold's own native tests pass.
    let test = Command::new("cargo")
        .arg("test")
        .current_dir(&demo)
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "cargo test failed: {}",
        text(&test.stderr)
    );

    let build = sluice(&["plugin", "build"], &demo);
    assert!(
        build.status.success(),
        "build failed: {}",
        text(&build.stderr)
    );
    assert!(text(&build.stdout).contains("built demo@0.1.0"));

    let run = sluice(
        &["plugin", "test", "demo.wasm", "--event", "sample.json"],
        &demo,
    );
    assert!(run.status.success(), "stderr: {}", text(&run.stderr));
    let report: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["events"][0]["event"], json!("$pageview"));
    assert_eq!(
        report["events"][0]["properties"]["processed_by_demo"],
        json!(true)
    );

    let dropped = sluice(
        &[
            "plugin",
            "test",
            "demo.wasm",
            "--event",
            "sample.json",
            "--config",
            r#"{"drop_event": "$pageview"}"#,
        ],
        &demo,
    );
    let report: Value = serde_json::from_slice(&dropped.stdout).unwrap();
    assert_eq!(report["events"], json!([]));
    assert_eq!(report["dropped"], json!(1));
}

#[test]
fn plugin_new_refuses_bad_names_and_existing_directories() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice(&["plugin", "new", "Bad_Name"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("must be lowercase letters"));
    std::fs::create_dir(dir.path().join("taken")).unwrap();
    let out = sluice(&["plugin", "new", "taken"], dir.path());
    assert!(text(&out.stderr).contains("already exists"));
}

#[test]
fn plugin_build_explains_a_missing_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice(&["plugin", "build", "."], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("plugin.toml") && stderr.contains("sluice plugin new"),
        "{stderr}"
    );
}

#[test]
fn serve_reads_a_config_file_and_refuses_unknown_settings() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:0\"\nlisten_port = 1\n").unwrap();
    let out = sluice(
        &["serve", "--config", &bad.display().to_string()],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("is invalid") && stderr.contains("unknown field `listen_port`"),
        "{stderr}"
    );

    let good = dir.path().join("sluice.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &good,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nlease_seconds = 5\n\n[plugins]\nallow_loopback = true\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config", &good.display().to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let base = crate::common::process::listening_on(&mut child).await;
        crate::common::server::wait_until("the server to answer /_health", || async {
            let health = reqwest::get(format!("{base}/_health")).await;
            health.is_ok_and(|r| r.status().is_success()).then_some(())
        })
        .await;
        base
    });
    assert!(
        base.starts_with("http://127.0.0.1:"),
        "the address comes from the file: {base}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        data.join("sluice.db").exists(),
        "the data dir comes from the file"
    );
}

#[test]
fn project_quotas_are_shown_set_and_unset_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_dir = data.to_str().unwrap();
    let project = common::process::create_project(&data);
    let id = project["project_id"].as_str().unwrap();

    let out = sluice(
        &[
            "project",
            "quotas",
            id,
            "--set",
            "events_per_input=500",
            "--set",
            "plugin_configs=7",
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        shown["overrides"],
        json!({"events_per_input": 500, "plugin_configs": 7})
    );
    assert_eq!(shown["quotas"]["events_per_input"], 500);
    assert_eq!(
        shown["quotas"]["queued_events"], 200_000,
        "the rest keep the defaults"
    );

    let out = sluice(
        &[
            "project",
            "quotas",
            id,
            "--unset",
            "events_per_input",
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["overrides"], json!({"plugin_configs": 7}));
    assert_eq!(shown["quotas"]["events_per_input"], 1_000);

    let out = sluice(
        &[
            "project",
            "quotas",
            id,
            "--set",
            "events=5",
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    let error = text(&out.stderr);
    assert!(error.contains("no quota named `events`"), "{error}");
    assert!(
        error.contains("events_per_input"),
        "it lists the names: {error}"
    );

    let out = sluice(
        &[
            "project",
            "quotas",
            "no-such-project",
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("there is no project no-such-project"));
}

/// The operator's tenancy commands, as run from a shell: each prints JSON
/// (one object per line for lists), and a mistake names what to run.
#[test]
fn organisations_keys_and_tokens_are_managed_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_dir = data.to_str().unwrap();
    let json_of = |out: &Output| -> Value {
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let lines_of = |out: &Output| -> Vec<Value> {
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };

    let org = json_of(&sluice(
        &["org", "create", "--name", "acme", "--data-dir", data_dir],
        dir.path(),
    ));
    let org_id = org["organisation_id"].as_str().unwrap();
    assert!(org["api_key"].as_str().unwrap().starts_with("phx_"));
    let project = json_of(&sluice(
        &[
            "project",
            "create",
            "--name",
            "web",
            "--organisation",
            org_id,
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    ));
    assert_eq!(project["organisation_id"], org_id);
    let project_id = project["project_id"].as_str().unwrap();
    let listed = lines_of(&sluice(
        &[
            "project",
            "list",
            "--organisation",
            org_id,
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    ));
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], project_id);

    let key = json_of(&sluice(
        &[
            "key",
            "create",
            "--organisation",
            org_id,
            "--name",
            "ci",
            "--scope",
            "read",
            "--project",
            project_id,
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    ));
    assert_eq!(key["scope"], "read");
    assert_eq!(key["projects"], json!([project_id]));
    let keys = lines_of(&sluice(
        &[
            "key",
            "list",
            "--organisation",
            org_id,
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    ));
    assert_eq!(keys.len(), 3, "the org's, the project's and ci");
    assert!(
        keys.iter().all(|k| k.get("api_key").is_none()),
        "lists never show keys"
    );
    let revoked = json_of(&sluice(
        &[
            "key",
            "revoke",
            key["id"].as_str().unwrap(),
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    ));
    assert!(revoked["revoked_at"].is_string());

    let rotated = json_of(&sluice(
        &[
            "token",
            "rotate",
            "--project",
            project_id,
            "--grace-seconds",
            "60",
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    ));
    assert_ne!(rotated["capture_token"], project["capture_token"]);

    // Mistakes say what went wrong and what to run.
    let out = sluice(
        &[
            "key",
            "create",
            "--organisation",
            org_id,
            "--name",
            "x",
            "--scope",
            "root",
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--scope must be one of read, write, admin"));
    let out = sluice(
        &[
            "project",
            "create",
            "--name",
            "x",
            "--organisation",
            "nope",
            "--data-dir",
            data_dir,
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("`sluice org list`"),
        "{}",
        text(&out.stderr)
    );
    let out = sluice(
        &["key", "revoke", "nope", "--data-dir", data_dir],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("`sluice key list"),
        "{}",
        text(&out.stderr)
    );
}
