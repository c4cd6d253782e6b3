//! End-to-end load: events per second from capture to stored, capture
//! latency, capture→stored latency, queue depth and server memory, with a
//! chain of transformation plugins per project.
//!
//! ```sh
//! scripts/bench-load.sh                       # builds what it needs, runs both backends
//! cargo bench -p sluice --bench load          # SQLite, flat out
//! SLUICE_LOAD_POSTGRES=postgres://postgres@127.0.0.1:5432/test cargo bench -p sluice --bench load
//! SLUICE_LOAD_RATE=10000 cargo bench -p sluice --bench load   # a fixed offered rate
//! SLUICE_LOAD_PROJECTS=5 SLUICE_LOAD_CHAIN=4 cargo bench -p sluice --bench load  # 20 configs
//! SLUICE_LOAD_RATE=3000 SLUICE_LOAD_ATTACK=flood cargo bench -p sluice --bench load  # beside an attacker
//! SLUICE_LOAD_PROJECTS=9 SLUICE_LOAD_CHAIN=4 SLUICE_LOAD_ATTACK=hostile cargo bench -p sluice --bench load
//! ```
//!
//! With `SLUICE_LOAD_ATTACK`, one more project attacks while the others
//! are measured: it sends flat out from 8 clients of its own (a refusal is
//! waited out for its `Retry-After`, at most 1 s, and the batch sent
//! again), through a chain chosen by the mode: `flood` (the same three
//! plugins), `slow` (four `slow-link` test plugins of 35 ms each: 140 ms an
//! event, within every quota) or `multiply` (three `splitter` test plugins
//! making 100 events of each, over `events_per_input`), or `hostile`: a
//! fleet of 14 hostile test plugins (memory-bomb, spin-forever,
//! deep-recursion, huge-output, log-flood, wasi-file-read and http-probe,
//! two of each) fed 200 events/s in batches of 20, not flat out, since it
//! measures what hostile plugins cost others, not a flood (with
//! `SLUICE_LOAD_PROJECTS=9 SLUICE_LOAD_CHAIN=4`, 50 configs, 14 of them
//! hostile). Only the measured projects' events count: the drain ends when
//! none of theirs is queued.
//!
//! `sluice serve` runs as its own process (the release binary cargo built
//! for this bench) on a fresh SQLite data dir, or on a fresh PostgreSQL
//! database created on the server `SLUICE_LOAD_POSTGRES` names and dropped
//! afterwards. Each project gets its chain through the API:
//! `pii-scrubber` → `property-renamer` → `url-parser` (and a second
//! `pii-scrubber` with `SLUICE_LOAD_CHAIN=4`). Clients post PostHog
//! `/batch/` requests of the 1.1 KB fixture event, each with its own uuid.
//!
//! - Flat out (`SLUICE_LOAD_RATE` unset): `SLUICE_LOAD_CLIENTS` clients each
//!   send their next batch when the last is answered, `SLUICE_LOAD_EVENTS`
//!   in all. A 503 is waited out for its `Retry-After` (as official clients
//!   do) and the batch sent again.
//! - Fixed rate: batches start on a schedule for `SLUICE_LOAD_SECONDS`,
//!   whether or not earlier ones were answered, and latency counts from the
//!   scheduled start, so a slow server cannot hide its queueing.
//!
//! Capture→stored latency is sampled: the first event of every batch is
//! looked for in the events table every 10 ms (the 64 sent longest ago at
//! each look) until it is there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Connection};
use tokio::sync::Mutex;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Where the server keeps its data, and how the bench reads it.
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres { admin: String, name: String },
}

impl Backend {
    async fn create() -> Backend {
        let Ok(admin) = std::env::var("SLUICE_LOAD_POSTGRES") else {
            return Backend::Sqlite(tempfile::tempdir().unwrap());
        };
        let name = format!("sluice_load_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|err| panic!("cannot reach PostgreSQL at {admin}: {err}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        Backend::Postgres { admin, name }
    }

    fn label(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "SQLite",
            Backend::Postgres { .. } => "PostgreSQL",
        }
    }

    fn args(&self) -> Vec<String> {
        match self {
            Backend::Sqlite(dir) => vec!["--data-dir".into(), dir.path().display().to_string()],
            Backend::Postgres { .. } => vec!["--database-url".into(), self.url()],
        }
    }

    fn url(&self) -> String {
        match self {
            Backend::Sqlite(dir) => format!("sqlite://{}", dir.path().join("sluice.db").display()),
            Backend::Postgres { admin, name } => {
                let mut url = reqwest::Url::parse(admin).unwrap();
                url.set_path(name);
                url.to_string()
            }
        }
    }

    async fn drop_database(&self) {
        if let Backend::Postgres { admin, name } = self
            && let Ok(mut conn) = sqlx::PgConnection::connect(admin).await
        {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await;
        }
    }
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server binary: this build's, unless `SLUICE_LOAD_SERVER` names
/// another (an older build, for a same-hour comparison driven by one load
/// tool).
fn sluice_binary() -> std::path::PathBuf {
    std::env::var_os("SLUICE_LOAD_SERVER")
        .map_or_else(|| env!("CARGO_BIN_EXE_sluice").into(), Into::into)
}

impl Server {
    async fn start(backend: &Backend) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(sluice_binary())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(backend.args())
            .env(
                "SLUICE_LOG",
                std::env::var("SLUICE_LOAD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sluice serve starts");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !client
            .get(format!("{base}/_health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < deadline, "sluice serve did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Server { child, base }
    }

    /// CPU time the server has used so far, user and system, from
    /// `/proc/PID/stat` (in clock ticks of 1/100 s, as Linux reports them
    /// to user space).
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // The command name may hold spaces; the fields count from after it.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime: fields 14 and 15 of the line, so 11 and 12
        // counted from 0 after the name.
        (ticks(11) + ticks(12)) / 100.0
    }

    /// Resident memory in MiB: (all, peak, anonymous). SQLite's file is
    /// memory-mapped, so its pages that were read count in the first two;
    /// the anonymous part is the heap and stacks.
    fn rss_mib(&self) -> (f64, f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
                .unwrap_or(0.0)
        };
        (field("VmRSS:"), field("VmHWM:"), field("RssAnon:"))
    }
}

fn create_project(backend: &Backend, name: &str) -> Value {
    let out = Command::new(sluice_binary())
        .args(["project", "create", "--name", name])
        .args(backend.args())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn install_chain(
    client: &reqwest::Client,
    base: &str,
    project: &Value,
    root: &Path,
    chain: usize,
) {
    let mut links = vec![
        (
            "pii-scrubber",
            json!({"drop": ["phone"], "hash": ["email"], "salt": "s"}),
        ),
        (
            "property-renamer",
            json!({"properties": {"plan": "subscription_plan", "$browser": "browser", "$os": "os"}}),
        ),
        ("url-parser", json!({})),
    ];
    if chain >= 4 {
        links.push((
            "pii-scrubber",
            json!({"drop": ["$set_once"], "redact_phones": false}),
        ));
    }
    links.truncate(chain);
    install(client, base, project, root, &links).await;
}

/// The attacking project's chain for `mode` (see the module's docs).
async fn install_attack(
    client: &reqwest::Client,
    base: &str,
    project: &Value,
    root: &Path,
    mode: &str,
) {
    match mode {
        "flood" => install_chain(client, base, project, root, 3).await,
        "slow" => {
            let links = vec![("slow-link", json!({"ms": 35})); 4];
            install(client, base, project, root, &links).await;
        }
        "multiply" => {
            let links = vec![("splitter", json!({"copies": 99})); 3];
            install(client, base, project, root, &links).await;
        }
        "hostile" => {
            // `SLUICE_LOAD_HOSTILE` names another fleet, comma-separated,
            // to find which plugin costs what.
            let fleet: Vec<String> = std::env::var("SLUICE_LOAD_HOSTILE")
                .unwrap_or_else(|_| {
                    "memory-bomb,spin-forever,deep-recursion,huge-output,log-flood,wasi-file-read,http-probe".into()
                })
                .split(',')
                .map(str::to_string)
                .collect();
            let links: Vec<(&str, Value)> = fleet
                .iter()
                .chain(fleet.iter())
                .map(|plugin| (plugin.as_str(), json!({})))
                .collect();
            install(client, base, project, root, &links).await;
        }
        other => {
            panic!("SLUICE_LOAD_ATTACK must be flood, slow, multiply or hostile, got {other}")
        }
    }
}

async fn install(
    client: &reqwest::Client,
    base: &str,
    project: &Value,
    root: &Path,
    links: &[(&str, Value)],
) {
    let api = |path: &str| {
        format!(
            "{base}/api/projects/{}{path}",
            project["project_id"].as_str().unwrap()
        )
    };
    let key = project["api_key"].as_str().unwrap();
    for (plugin, config) in links {
        let wasm = std::fs::read(root.join(format!("target/plugins/{plugin}.wasm")))
            .unwrap_or_else(|_| panic!("target/plugins/{plugin}.wasm is missing: run scripts/bench-load.sh, which builds the plugins"));
        let uploaded: Value = serde_json::from_str(
            &client
                .post(api("/plugins"))
                .bearer_auth(key)
                .body(wasm)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        )
        .unwrap();
        let response = client
            .post(api("/plugin-configs"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(json!({"plugin_sha256": uploaded["sha256"], "config": config}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    }
}

/// What the clients saw.
#[derive(Default)]
struct Observed {
    latencies: Vec<Duration>,
    rejected: u64,
}

/// Sampled (project, uuid) pairs waiting to be seen stored, with when
/// they were sent.
type Pending = Arc<Mutex<HashMap<(String, String), Instant>>>;

/// Looks for the pending uuids every 10 ms; returns capture→stored
/// latencies once `done` is set and nothing is pending.
async fn watch_stored(pool: AnyPool, pending: Pending, done: Arc<AtomicU64>) -> Vec<Duration> {
    let mut seen = Vec::new();
    loop {
        // Events are stored roughly in the order they were sent, so the
        // oldest few are the ones worth asking about; asking about all of
        // them made this process compete with the server for the CPU.
        let wanted: Vec<(String, String)> = {
            let pending = pending.lock().await;
            let mut oldest: Vec<(&(String, String), &Instant)> = pending.iter().collect();
            oldest.sort_by_key(|(_, sent)| **sent);
            oldest
                .into_iter()
                .take(64)
                .map(|(key, _)| key.clone())
                .collect()
        };
        if wanted.is_empty() && done.load(Ordering::Relaxed) == 1 {
            return seen;
        }
        let mut by_project: HashMap<&str, Vec<&str>> = HashMap::new();
        for (project, uuid) in &wanted {
            by_project.entry(project).or_default().push(uuid);
        }
        // By the primary key (project, uuid), so looking costs the server's
        // database a few index probes, not a scan.
        for (project, uuids) in by_project {
            for chunk in uuids.chunks(500) {
                let list = chunk
                    .iter()
                    .map(|u| format!("'{u}'"))
                    .collect::<Vec<_>>()
                    .join(",");
                let found: Vec<String> = sqlx::query_scalar(&format!(
                    "SELECT uuid FROM events WHERE project_id = '{project}' AND uuid IN ({list})"
                ))
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
                let now = Instant::now();
                let mut pending = pending.lock().await;
                for uuid in found {
                    if let Some(sent) = pending.remove(&(project.to_string(), uuid)) {
                        seen.push(now - sent);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The fixture event as JSON text with its uuid and distinct id cut out,
/// so a batch is built by pasting strings: building it as a JSON tree per
/// event made the load tool compete with the server for the CPU.
struct Template {
    before_uuid: String,
    between: String,
    after_distinct_id: String,
}

impl Template {
    fn new(event: &Value) -> Self {
        let mut event = event.clone();
        let object = event.as_object_mut().unwrap();
        object.remove("uuid");
        object.remove("distinct_id");
        let rest = serde_json::to_string(&event).unwrap();
        Template {
            before_uuid: "{\"uuid\":\"".into(),
            between: "\",\"distinct_id\":\"".into(),
            after_distinct_id: format!("\",{}", &rest[1..]),
        }
    }

    /// A batch request body and the uuid of its first event.
    fn batch(&self, token: &str, size: usize, seq: u64) -> (String, String) {
        let mut body = format!("{{\"api_key\":{},\"batch\":[", json!(token));
        let mut first = String::new();
        for i in 0..size {
            let uuid = uuid::Uuid::new_v4().to_string();
            if i > 0 {
                body.push(',');
            } else {
                first = uuid.clone();
            }
            body.push_str(&self.before_uuid);
            body.push_str(&uuid);
            body.push_str(&self.between);
            // Spread users over 5,000 distinct ids, so persons are looked
            // up and updated as in real traffic rather than created once.
            body.push_str(&format!("user-{}", (seq as usize * size + i) % 5_000));
            body.push_str(&self.after_distinct_id);
        }
        body.push_str("]}");
        (body, first)
    }
}

/// Sends one batch until it is accepted; returns whether it was ever
/// refused.
async fn send(client: &reqwest::Client, url: &str, body: String) -> u64 {
    let mut refused = 0;
    loop {
        let response = match client.post(url).body(body.clone()).send().await {
            Ok(response) => response,
            Err(err) => {
                // Counted with the refusals: the batch is sent again.
                eprintln!("a batch could not be sent ({err}); sending it again in 1 s");
                refused += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        match response.status().as_u16() {
            200 => return refused,
            503 => {
                refused += 1;
                let wait: u64 = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            other => panic!(
                "capture answered {other}: {}",
                response.text().await.unwrap()
            ),
        }
    }
}

/// How the attacker sends: `clients` tasks each sending batches of `size`,
/// flat out or one every `pace`.
#[derive(Clone, Copy)]
struct Pacing {
    clients: usize,
    size: usize,
    pace: Option<Duration>,
}

/// The attacker: tasks sending as `pacing` says until `stop`; what capture
/// answered, by status.
fn attack(
    Pacing {
        clients,
        size,
        pace,
    }: Pacing,
    client: &reqwest::Client,
    url: &str,
    token: &str,
    template: &Arc<Template>,
    stop: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<HashMap<u16, u64>>> {
    (0..clients)
        .map(|c| {
            let (client, url, token, template, stop) = (
                client.clone(),
                url.to_string(),
                token.to_string(),
                template.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut answers: HashMap<u16, u64> = HashMap::new();
                let mut seq = (c as u64) << 32;
                while stop.load(Ordering::Relaxed) == 0 {
                    seq += 1;
                    let (body, _) = template.batch(&token, size, seq);
                    if let Some(pace) = pace {
                        tokio::time::sleep(pace).await;
                    }
                    let Ok(response) = client.post(&url).body(body).send().await else {
                        *answers.entry(0).or_default() += 1;
                        continue;
                    };
                    let status = response.status().as_u16();
                    *answers.entry(status).or_default() += 1;
                    if status != 200 {
                        let wait: u64 = response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(1);
                        tokio::time::sleep(Duration::from_secs(wait.min(1))).await;
                    }
                }
                answers
            })
        })
        .collect()
}

/// Sends a batch whose first event is `key`, timing it from `since`
/// (when it was sent, or when it was due), and records what the client saw.
async fn send_timed(
    client: &reqwest::Client,
    url: &str,
    body: String,
    key: (String, String),
    since: Instant,
    pending: &Pending,
    observed: &Mutex<Observed>,
) {
    pending.lock().await.insert(key, since);
    let refused = send(client, url, body).await;
    let mut observed = observed.lock().await;
    observed.latencies.push(since.elapsed());
    observed.rejected += refused;
}

#[tokio::main]
async fn main() {
    let clients = env("SLUICE_LOAD_CLIENTS", 8);
    let batch_size = env("SLUICE_LOAD_BATCH", 50);
    let projects = env("SLUICE_LOAD_PROJECTS", 1);
    let chain = env("SLUICE_LOAD_CHAIN", 3);
    let rate = env("SLUICE_LOAD_RATE", 0);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let event: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/event-1k.json")).unwrap(),
    )
    .unwrap();
    let template = Arc::new(Template::new(&event));

    sqlx::any::install_default_drivers();
    let backend = Backend::create().await;
    let created: Vec<Value> = (0..projects)
        .map(|p| create_project(&backend, &format!("load-{p}")))
        .collect();
    let server = Server::start(&backend).await;
    let client = reqwest::Client::new();
    for project in &created {
        install_chain(&client, &server.base, project, &root, chain).await;
    }
    let attack_mode = std::env::var("SLUICE_LOAD_ATTACK")
        .ok()
        .filter(|m| !m.is_empty());
    let attacker = match &attack_mode {
        Some(mode) => {
            let project = create_project(&backend, "attacker");
            install_attack(&client, &server.base, &project, &root, mode).await;
            Some(project)
        }
        None => None,
    };
    let tokens: Vec<String> = created
        .iter()
        .map(|p| p["capture_token"].as_str().unwrap().to_string())
        .collect();
    let project_ids: Vec<String> = created
        .iter()
        .map(|p| p["project_id"].as_str().unwrap().to_string())
        .collect();
    let pool = AnyPoolOptions::new()
        .max_connections(2)
        .connect(&backend.url())
        .await
        .unwrap();

    let pending: Pending = Arc::default();
    let done = Arc::new(AtomicU64::new(0));
    let watcher = tokio::spawn(watch_stored(pool.clone(), pending.clone(), done.clone()));
    let depth_samples = Arc::new(Mutex::new(Vec::<(f64, i64)>::new()));
    let url = format!("{}/batch/", server.base);
    // From here: starting the server and installing plugins (which may
    // compile them) is not the load's cost.
    let cpu_at_start = server.cpu_seconds();
    let started = Instant::now();
    let sampler = {
        let pool = pool.clone();
        let samples = depth_samples.clone();
        let done = done.clone();
        tokio::spawn(async move {
            while done.load(Ordering::Relaxed) == 0 {
                if let Ok(depth) =
                    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM capture_queue")
                        .fetch_one(&pool)
                        .await
                {
                    samples
                        .lock()
                        .await
                        .push((started.elapsed().as_secs_f64(), depth));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let attack_stop = Arc::new(AtomicU64::new(0));
    let attackers = match &attacker {
        Some(project) => attack(
            if attack_mode.as_deref() == Some("hostile") {
                Pacing {
                    clients: 1,
                    size: 20,
                    pace: Some(Duration::from_millis(100)),
                }
            } else {
                Pacing {
                    clients: 8,
                    size: 50,
                    pace: None,
                }
            },
            &client,
            &url,
            project["capture_token"].as_str().unwrap(),
            &template,
            &attack_stop,
        ),
        None => Vec::new(),
    };
    let observed = Arc::new(Mutex::new(Observed::default()));
    let sent_events;
    if rate == 0 {
        let total = env("SLUICE_LOAD_EVENTS", 100_000);
        let per_client = total / clients / batch_size;
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (client, url, template, pending, observed) = (
                client.clone(),
                url.clone(),
                template.clone(),
                pending.clone(),
                observed.clone(),
            );
            let token = tokens[c % tokens.len()].clone();
            let project = project_ids[c % tokens.len()].clone();
            tasks.push(tokio::spawn(async move {
                for b in 0..per_client {
                    let (body, first) =
                        template.batch(&token, batch_size, (c * per_client + b) as u64);
                    let key = (project.clone(), first);
                    send_timed(
                        &client,
                        &url,
                        body,
                        key,
                        Instant::now(),
                        &pending,
                        &observed,
                    )
                    .await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        sent_events = per_client * clients * batch_size;
    } else {
        let seconds = env("SLUICE_LOAD_SECONDS", 20);
        let batches = rate * seconds / batch_size;
        let interval = Duration::from_secs_f64(batch_size as f64 / rate as f64);
        let mut tasks = Vec::with_capacity(batches);
        for b in 0..batches {
            let due = started + interval * b as u32;
            tokio::time::sleep_until(due.into()).await;
            let (client, url, pending, observed) = (
                client.clone(),
                url.clone(),
                pending.clone(),
                observed.clone(),
            );
            let (body, first) = template.batch(&tokens[b % tokens.len()], batch_size, b as u64);
            let project = project_ids[b % tokens.len()].clone();
            tasks.push(tokio::spawn(async move {
                send_timed(
                    &client,
                    &url,
                    body,
                    (project, first),
                    due,
                    &pending,
                    &observed,
                )
                .await;
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        sent_events = batches * batch_size;
    }
    let accepted_in = started.elapsed();
    let (rss_loaded, _, anon_loaded) = server.rss_mib();
    let cpu_before_drain = server.cpu_seconds() - cpu_at_start;
    // Whether the queue is empty, through its primary key: a COUNT(*)
    // every 20 ms read the whole queue on PostgreSQL (tens of thousands of
    // rows when capture runs ahead) and took CPU from the server it times.
    let measured = project_ids
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(",");
    let stored_in = loop {
        // By the index on (project_id, id): only the measured projects'
        // events count, not the attacker's backlog.
        let head: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM capture_queue WHERE project_id IN ({measured}) ORDER BY id LIMIT 1"
        ))
        .fetch_optional(&pool)
        .await
        .unwrap();
        if head.is_none() {
            break started.elapsed();
        }
        // Even by the key, a look at a churning PostgreSQL queue steps over
        // the index entries of deleted rows (about 8 ms); every 50 ms keeps
        // that from the server's CPU and times the drain to within 2 % of a
        // run of a few seconds.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let server_cpu = server.cpu_seconds() - cpu_at_start;
    attack_stop.store(1, Ordering::Relaxed);
    let mut attacked: HashMap<u16, u64> = HashMap::new();
    for task in attackers {
        for (status, n) in task.await.unwrap() {
            *attacked.entry(status).or_default() += n;
        }
    }
    done.store(1, Ordering::Relaxed);
    let mut stored_latencies = watcher.await.unwrap();
    sampler.await.unwrap();
    let stored: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM events WHERE project_id IN ({measured})"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    let (_, rss_peak, _) = server.rss_mib();
    drop(server);
    pool.close().await;
    backend.drop_database().await;

    let observed = observed.lock().await;
    let mut latencies = observed.latencies.clone();
    latencies.sort();
    stored_latencies.sort();
    let samples = depth_samples.lock().await;
    let max_depth = samples.iter().map(|(_, d)| *d).max().unwrap_or(0);
    let depth_curve: Vec<String> = samples
        .iter()
        .map(|(t, d)| format!("{t:.0}s:{d}"))
        .collect();
    let mode = if rate == 0 {
        format!("flat out, {clients} clients")
    } else {
        format!("offered {rate} events/s")
    };
    println!("store:                    {}", backend.label());
    println!(
        "load:                     {mode}, batches of {batch_size}, {sent_events} events, {projects} project(s) x {chain} plugin configs"
    );
    println!(
        "capture accepted:         {:.0} events/s ({:.2} s), {} batches refused with 503 and sent again",
        sent_events as f64 / accepted_in.as_secs_f64(),
        accepted_in.as_secs_f64(),
        observed.rejected
    );
    println!(
        "capture -> stored:        {:.0} events/s ({:.2} s); {stored} events stored",
        sent_events as f64 / stored_in.as_secs_f64(),
        stored_in.as_secs_f64()
    );
    println!(
        "batch request latency:    p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 1.0))
    );
    println!(
        "capture -> stored latency: p50 {:.1} ms, p99 {:.1} ms ({} sampled events)",
        ms(percentile(&stored_latencies, 0.50)),
        ms(percentile(&stored_latencies, 0.99)),
        stored_latencies.len()
    );
    println!(
        "queue depth:              max {max_depth}; each second: {}",
        depth_curve.join(" ")
    );
    println!(
        "server CPU:               {server_cpu:.1} s ({:.1} s of it after capture ended), {:.0} µs per stored event",
        server_cpu - cpu_before_drain,
        server_cpu * 1e6 / sent_events as f64
    );
    println!(
        "server RSS:               {rss_loaded:.0} MiB at the end of the load ({anon_loaded:.0} MiB anonymous), peak {rss_peak:.0} MiB"
    );
    if let Some(mode) = attack_mode {
        let mut answers: Vec<(u16, u64)> = attacked.into_iter().collect();
        answers.sort();
        let answers: Vec<String> = answers
            .iter()
            .map(|(status, n)| format!("{n} x {status}"))
            .collect();
        println!(
            "attacker ({mode}):        batches of {} answered {}",
            if mode == "hostile" { 20 } else { 50 },
            answers.join(", ")
        );
    }
}
