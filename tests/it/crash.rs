//! The crash harness: `sluice serve` SIGKILLed at seeded random moments,
//! at least 20 times a run, while official-client-shaped batches stream in
//! (identifies among them, so persons merge), a transformation runs on
//! every event and a webhook destination delivers to a local receiver;
//! restarted each time. On SQLite one process; on PostgreSQL two sharing
//! the database, either of which may be the one killed.
//!
//! At the end, with the servers left to drain:
//! - every acknowledged event is stored exactly once (the senders retry an
//!   unanswered batch with the same uuids, as the SDKs do, until it is
//!   acknowledged; so nothing was sent that is not acknowledged);
//! - every stored event reached the receiver at least once, or is a dead
//!   letter (none is expected: the receiver never fails);
//! - no event is both dead-lettered and delivered;
//! - persons are consistent: every distinct id is on exactly one person,
//!   that person exists, and both ids of every identify are on the same
//!   person.
//!
//! `SLUICE_CRASH_SEED` and `SLUICE_CRASH_KILLS` change the run; the
//! harness prints the seed and what it found, for `docs/reliability.md`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::{Value, json};

use crate::common;
use crate::common::postgres::TestDatabase;
use crate::common::process::{ServerProcess, Target, create_project_on};
use crate::common::server::wait_until;

/// A small, seeded generator (xorshift64*): the same seed, the same kill
/// moments and victims.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The webhook receiver: what it was sent, and how many requests are being
/// answered right now.
#[derive(Clone, Default)]
struct Receiver {
    received: common::Received,
    in_flight: Arc<AtomicUsize>,
}

impl Receiver {
    fn start(&self) -> String {
        let me = self.clone();
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: Bytes| {
                let me = me.clone();
                async move {
                    me.in_flight.fetch_add(1, Ordering::SeqCst);
                    // Long enough that deliveries are in flight at kills.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    me.received.record(&body);
                    me.in_flight.fetch_sub(1, Ordering::SeqCst);
                    "ok"
                }
            }),
        );
        format!("http://{}/hook", common::serve(router))
    }
}

/// The servers now running, by slot; the senders pick any live one.
#[derive(Clone, Default)]
struct Bases(Arc<RwLock<Vec<Option<String>>>>);

impl Bases {
    fn any(&self, pick: usize) -> Option<String> {
        let bases = self.0.read().unwrap();
        let live: Vec<&String> = bases.iter().flatten().collect();
        (!live.is_empty()).then(|| live[pick % live.len()].clone())
    }

    fn set(&self, slot: usize, base: Option<String>) {
        self.0.write().unwrap()[slot] = base;
    }
}

/// What the senders did.
#[derive(Default)]
struct Sent {
    acknowledged: HashSet<String>,
    /// (anonymous id, identified id) of every acknowledged `$identify`.
    merges: Vec<(String, String)>,
    /// Requests answered with anything but 200, or not answered.
    retried: usize,
}

/// One batch as posthog-python sends it: `api_key`, `batch`, `sent_at`,
/// each event with a uuid, `timestamp` and `$lib`. Every fifth event an
/// anonymous visitor identifies, merging two persons.
fn batch(token: &str, sender: usize, round: usize) -> (Value, Vec<String>, Vec<(String, String)>) {
    let now = chrono::Utc::now().to_rfc3339();
    let mut uuids = Vec::new();
    let mut merges = Vec::new();
    let events: Vec<Value> = (0..20)
        .map(|i| {
            let uuid = uuid::Uuid::now_v7().to_string();
            uuids.push(uuid.clone());
            let anon = format!("anon-{sender}-{round}-{i}");
            if i % 5 == 4 {
                let user = format!("user-{sender}-{}", (round * 7 + i) % 50);
                merges.push((anon.clone(), user.clone()));
                json!({"event": "$identify", "distinct_id": user, "uuid": uuid, "timestamp": now,
                       "properties": {"$anon_distinct_id": anon, "$lib": "posthog-python",
                                      "$lib_version": "3.7.0", "$set": {"plan": "pro"}}})
            } else {
                json!({"event": "$pageview", "distinct_id": anon, "uuid": uuid, "timestamp": now,
                       "properties": {"$lib": "posthog-python", "$lib_version": "3.7.0",
                                      "$current_url": "https://app.example.com/?email=someone@example.com",
                                      "email": "someone@example.com"}})
            }
        })
        .collect();
    let body = json!({"api_key": token, "batch": events, "sent_at": now});
    (body, uuids, merges)
}

/// Sends batches until `stop`, each retried with the same uuids until it
/// is acknowledged.
async fn sender(
    id: usize,
    token: String,
    bases: Bases,
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    sent: Arc<Mutex<Sent>>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut round = 0;
    while !stop.load(Ordering::SeqCst) {
        let (body, uuids, merges) = batch(&token, id, round);
        let body = body.to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(base) = bases.any(id + attempt) else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            in_flight.fetch_add(1, Ordering::SeqCst);
            let answer = client
                .post(format!("{base}/batch/"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            if answer.is_ok_and(|r| r.status() == 200) {
                let mut sent = sent.lock().unwrap();
                sent.acknowledged.extend(uuids);
                sent.merges.extend(merges);
                break;
            }
            sent.lock().unwrap().retried += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// The database behind the servers, read directly for the final checks.
enum Db {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Db {
    /// Every row of `sql`, whose columns must all be text.
    async fn strings(&self, sql: &str) -> Vec<Vec<String>> {
        use sqlx::{Connection, Row};
        match self {
            Db::Sqlite(dir) => {
                let url = format!("sqlite://{}", dir.join("sluice.db").display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                let rows = sqlx::query(sql).fetch_all(&mut conn).await.unwrap();
                rows.iter()
                    .map(|row| (0..row.len()).map(|i| row.get::<String, _>(i)).collect())
                    .collect()
            }
            Db::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                let rows = sqlx::query(sql).fetch_all(&mut conn).await.unwrap();
                rows.iter()
                    .map(|row| (0..row.len()).map(|i| row.get::<String, _>(i)).collect())
                    .collect()
            }
        }
    }

    async fn count(&self, sql: &str) -> usize {
        self.strings(sql).await[0][0].parse().unwrap()
    }
}

async fn crash_harness(backend: &str) {
    let seed = setting("SLUICE_CRASH_SEED", 0x5eed_2026_1208);
    let kills = setting("SLUICE_CRASH_KILLS", 20) as usize;
    eprintln!("crash harness ({backend}): seed {seed:#x}, {kills} kills");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let database = match backend {
        "postgres" => Some(TestDatabase::create().await),
        _ => None,
    };
    let (target, db) = match &database {
        Some(database) => (
            Target::Postgres(database.url.clone()),
            Db::Postgres(database.url.clone()),
        ),
        None => {
            let data = dir.path().join("data");
            (Target::Sqlite(data.clone()), Db::Sqlite(data))
        }
    };
    let config_file = dir.path().join("sluice.toml");
    std::fs::write(&config_file, "[plugins]\nallow_loopback = true\n").unwrap();
    let config = config_file.display().to_string();
    // A short lease, so a restarted or surviving worker takes over a dead
    // one's claims soon.
    let args = ["--config", config.as_str(), "--lease-seconds", "1"];
    let slots = if backend == "postgres" { 2 } else { 1 };

    let mut servers = Vec::new();
    let bases = Bases(Arc::new(RwLock::new(vec![None; slots])));
    for slot in 0..slots {
        let server = ServerProcess::start_on(&target, &args).await;
        bases.set(slot, Some(server.base.clone()));
        servers.push(Some(server));
    }
    let project = create_project_on(&target);
    let project_id = project["project_id"].as_str().unwrap().to_string();
    let token = project["capture_token"].as_str().unwrap().to_string();
    let receiver = Receiver::default();
    let hook = receiver.start();
    let base = bases.any(0).unwrap();
    let api = |path: &str| format!("{base}/api/projects/{project_id}{path}");
    let key = project["api_key"].as_str().unwrap().to_string();
    let client = reqwest::Client::new();
    for (plugin, config, delivery) in [
        ("pii-scrubber", json!({"redact_emails": true}), Value::Null),
        (
            "webhook",
            json!({"url": hook}),
            json!({"batch_size": 50, "linger_ms": 20, "concurrency": 2}),
        ),
    ] {
        let uploaded: Value = client
            .post(api("/plugins"))
            .bearer_auth(&key)
            .body(common::wasm(plugin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .map(|text| serde_json::from_str(&text).unwrap())
            .unwrap();
        let mut install = json!({"plugin_sha256": uploaded["sha256"], "config": config});
        if !delivery.is_null() {
            install["delivery"] = delivery;
        }
        let created = client
            .post(api("/plugin-configs"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body((install).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let capture_in_flight = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(Mutex::new(Sent::default()));
    let senders: Vec<_> = (0..2)
        .map(|id| {
            tokio::spawn(sender(
                id,
                token.clone(),
                bases.clone(),
                stop.clone(),
                capture_in_flight.clone(),
                sent.clone(),
            ))
        })
        .collect();

    // What was going on at each kill.
    let (mut during_capture, mut during_delivery, mut with_queue) = (0, 0, 0);
    let started = Instant::now();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(1000))).await;
        let slot = rng.below(slots as u64) as usize;
        let victim = servers[slot].take().unwrap();
        bases.set(slot, None);
        if capture_in_flight.load(Ordering::SeqCst) > 0 {
            during_capture += 1;
        }
        if receiver.in_flight.load(Ordering::SeqCst) > 0 {
            during_delivery += 1;
        }
        victim.kill();
        if db
            .count("SELECT CAST(COUNT(*) AS TEXT) FROM capture_queue")
            .await
            > 0
        {
            with_queue += 1;
        }
        let restarted = ServerProcess::start_on(&target, &args).await;
        bases.set(slot, Some(restarted.base.clone()));
        servers[slot] = Some(restarted);
    }
    let killing = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    for sender in senders {
        sender.await.unwrap();
    }
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let acknowledged = sent.acknowledged;

    // Drained: everything stored, the outbox empty, the receiver caught up.
    let stored_query = format!("SELECT uuid FROM events WHERE project_id = '{project_id}'");
    let stored: Vec<String> = wait_until("every acknowledged event to be stored", || async {
        let stored: Vec<String> = db
            .strings(&stored_query)
            .await
            .into_iter()
            .map(|mut row| row.remove(0))
            .collect();
        (stored.len() >= acknowledged.len()).then_some(stored)
    })
    .await;
    wait_until("an empty outbox", || async {
        (db.count("SELECT CAST(COUNT(*) AS TEXT) FROM outbox").await == 0).then_some(())
    })
    .await;
    let dead: HashSet<String> = db
        .strings(&format!(
            "SELECT COALESCE(event_uuid, '') FROM dead_letters WHERE project_id = '{project_id}'"
        ))
        .await
        .into_iter()
        .map(|mut row| row.remove(0))
        .collect();

    // Every acknowledged event stored, once, and nothing else.
    let unique: HashSet<String> = stored.iter().cloned().collect();
    assert_eq!(stored.len(), unique.len(), "an event was stored twice");
    assert_eq!(
        unique, acknowledged,
        "stored events differ from acknowledged ones"
    );
    // Every stored event delivered at least once, or dead-lettered; never
    // both.
    let delivered = receiver.received.uuids();
    let missing: Vec<&String> = unique
        .iter()
        .filter(|u| !delivered.contains(*u) && !dead.contains(*u))
        .collect();
    assert!(
        missing.is_empty(),
        "{} stored events never delivered",
        missing.len()
    );
    let both: Vec<&String> = dead.intersection(&delivered).collect();
    assert!(
        both.is_empty(),
        "{} events both dead-lettered and delivered",
        both.len()
    );
    assert!(
        dead.is_empty(),
        "the receiver never fails, yet {} dead letters",
        dead.len()
    );
    let duplicates = receiver.received.duplicates();

    // Persons: every distinct id on one person that exists; every identify
    // on one person.
    let ids = db
        .strings(&format!(
            "SELECT d.distinct_id, d.person_id, COALESCE(p.id, '') FROM person_distinct_ids d \
             LEFT JOIN persons p ON p.project_id = d.project_id AND p.id = d.person_id \
             WHERE d.project_id = '{project_id}'"
        ))
        .await;
    let mut person_of: HashMap<String, String> = HashMap::new();
    for row in &ids {
        assert_eq!(row[1], row[2], "distinct id {} points at no person", row[0]);
        assert!(
            person_of.insert(row[0].clone(), row[1].clone()).is_none(),
            "distinct id {} is on two persons",
            row[0]
        );
    }
    for (anon, user) in &sent.merges {
        let (a, u) = (person_of.get(anon), person_of.get(user));
        assert!(
            a.is_some() && a == u,
            "{anon} and {user} were identified as one person: {a:?} {u:?}"
        );
    }
    eprintln!(
        "crash harness ({backend}): {kills} kills in {:.0} s (capture in flight at {during_capture}, \
         deliveries in flight at {during_delivery}, queue not empty at {with_queue}); \
         {} events acknowledged and stored once, {} retried requests, {} merges checked, \
         {} distinct ids on {} persons, {duplicates} duplicate deliveries, 0 lost",
        killing.as_secs_f64(),
        acknowledged.len(),
        sent.retried,
        sent.merges.len(),
        person_of.len(),
        person_of.values().collect::<HashSet<_>>().len(),
    );
    assert!(
        kills == 0 || during_capture > 0,
        "no kill landed during capture"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_crash_harness_loses_and_doubles_nothing_over_repeated_sigkills() {
    crash_harness("sqlite").await
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_crash_harness_loses_and_doubles_nothing_over_repeated_sigkills() {
    crash_harness("postgres").await
}
