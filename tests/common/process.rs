//! `sluice serve` as a real process, for tests that kill and restart it or
//! drive it with official client libraries.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a server may take to start: generous, since it bounds a hang
/// (migrations on a busy machine), not a speed.
const STARTUP: Duration = Duration::from_secs(60);

pub struct ServerProcess {
    pub child: Child,
    pub base: String,
}

/// Where a process keeps its data: the arguments that say so.
#[derive(Clone, Debug)]
pub enum Target {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Target {
    fn args(&self) -> Vec<String> {
        match self {
            Target::Sqlite(dir) => vec!["--data-dir".into(), dir.display().to_string()],
            Target::Postgres(url) => vec!["--database-url".into(), url.clone()],
        }
    }
}

/// Where `child`, a `sluice serve` started with its stderr piped, listens:
/// it says so on stderr once it has bound. The rest of its output goes on
/// to the test's, to show under a failing test.
pub async fn listening_on(child: &mut Child) -> String {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (found, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(base) = line.strip_prefix("sluice listening on ") {
                let _ = found.send(base.to_string());
            }
            eprintln!("{line}");
        }
    });
    tokio::task::spawn_blocking(move || listening.recv_timeout(STARTUP))
        .await
        .unwrap()
        .unwrap_or_else(|_| {
            panic!(
                "sluice serve did not say where it listens within {} s",
                STARTUP.as_secs()
            )
        })
}

/// The secret key of every server process on PostgreSQL, which has no data
/// dir of the test's to keep a key file in: the same for all, as the
/// servers of one database must share theirs.
pub const TEST_SECRET_KEY: &str = "c2x1aWNlIHRlc3Qga2V5OiAzMiBieXRlcyBsb25nISE=";

pub fn sluice_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sluice"))
}

impl ServerProcess {
    /// Starts `sluice serve --data-dir DIR` and waits until `/_health`
    /// answers.
    pub async fn start(data_dir: &Path) -> ServerProcess {
        Self::start_on(&Target::Sqlite(data_dir.to_path_buf()), &[]).await
    }

    /// Starts `sluice serve` on `target` with extra arguments, on a port
    /// the server chooses (so no other test can take it between choosing
    /// and binding), and waits until `/_health` answers.
    pub async fn start_on(target: &Target, extra: &[&str]) -> ServerProcess {
        let mut command = Command::new(sluice_bin());
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(target.args())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Target::Postgres(_) = target {
            command.env(sluice::store::KEY_ENV, TEST_SECRET_KEY);
        }
        let mut child = command.spawn().expect("sluice serve starts");
        let base = listening_on(&mut child).await;
        let deadline = Instant::now() + STARTUP;
        let client = reqwest::Client::new();
        loop {
            let health = client.get(format!("{base}/_health")).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sluice serve did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ServerProcess { child, base }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sluice project create`, as a user runs it.
pub fn create_project(data_dir: &Path) -> Value {
    create_project_on(&Target::Sqlite(data_dir.to_path_buf()))
}

pub fn create_project_on(target: &Target) -> Value {
    let out = Command::new(sluice_bin())
        .args(["project", "create", "--name", "test"])
        .args(target.args())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("project create prints JSON")
}

/// Every stored event of the project, newest first, once at least `n` are
/// there (the worker stores them shortly after capture answers).
pub async fn wait_for_events(base: &str, project: &Value, n: usize) -> Vec<Value> {
    let url = format!(
        "{base}/api/projects/{}/events?limit=1000",
        project["project_id"].as_str().unwrap()
    );
    let key = project["api_key"].as_str().unwrap();
    let client = reqwest::Client::new();
    super::server::wait_until(&format!("{n} events to be stored"), || async {
        let response = client.get(&url).bearer_auth(key).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        let stored = body["results"].as_array().unwrap().clone();
        (stored.len() >= n).then_some(stored)
    })
    .await
}
