//! What operators run the server by: `/_ready` turning 503 the moment the
//! server is told to stop, and logs as JSON lines.

use crate::common::process::{ServerProcess, Target, sluice_bin};
use crate::common::server::PATIENCE;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn sigterm(pid: u32) {
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_answers_503_from_the_moment_of_a_sigterm_while_the_server_still_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start_on(
        &Target::Sqlite(dir.path().to_path_buf()),
        &["--shutdown-delay-seconds", "5"],
    )
    .await;
    let client = reqwest::Client::new();
    let ready = format!("{}/_ready", server.base);
    crate::common::server::wait_until("the server to be ready", || async {
        let response = client.get(&ready).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;

    sigterm(server.child.id());
    // Every answer until the 503 is a 200 (the signal not handled yet);
    // none is a refused connection, since the server goes on serving.
    let started = Instant::now();
    let body: Value = loop {
        let response = client
            .get(&ready)
            .send()
            .await
            .expect("the server still serves while /_ready says it is stopping");
        match response.status().as_u16() {
            200 => {}
            503 => break serde_json::from_str(&response.text().await.unwrap()).unwrap(),
            other => panic!("/_ready answered {other}"),
        }
        assert!(started.elapsed() < PATIENCE, "/_ready never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(body["status"], "shutting down", "{body}");
    // /_health is liveness: the process is alive and answers.
    let health = client
        .get(format!("{}/_health", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let status = tokio::task::spawn_blocking(move || server.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "a SIGTERM is a clean stop, got {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sluice_log_format_json_makes_every_log_line_a_json_object() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(sluice_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("SLUICE_LOG_FORMAT", "json")
        .env("SLUICE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            let _ = lines_tx.send(line);
        }
    });
    // The line that says where it listens is JSON too.
    let mut seen = Vec::new();
    let base = loop {
        let line = lines
            .recv_timeout(PATIENCE)
            .expect("sluice serve says where it listens");
        seen.push(line.clone());
        let Ok(record) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(addr) = record["fields"]["addr"].as_str()
            && record["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("sluice listening on "))
        {
            break format!("http://{addr}");
        }
    };
    crate::common::server::wait_until("the server to be ready", || async {
        let response = reqwest::get(format!("{base}/_ready")).await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    sigterm(child.id());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    reader.join().unwrap();
    seen.extend(lines.try_iter());

    assert!(seen.len() >= 3, "{seen:#?}");
    for line in &seen {
        let record: Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("not a JSON log line ({err}): {line}"));
        assert!(
            record["timestamp"].is_string()
                && record["level"].is_string()
                && record["fields"]["message"].is_string(),
            "a log record has a timestamp, a level and a message: {line}"
        );
    }
    assert!(
        seen.iter().any(|line| line.contains("sluice stopped")),
        "{seen:#?}"
    );
}
