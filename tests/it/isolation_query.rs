//! One project's queries, logs and dead letters must not hurt the others:
//! queries run in bounded slots (per project and across the server) on a
//! pool of their own, so capture goes on while they run; plugin logs and
//! dead letters are pruned by each project's quotas; and one replay request
//! queues a bounded batch.
//!
//! A query is held running deterministically on PostgreSQL: another
//! session locks `events`, and the query's read waits on the lock, slot
//! held, until the test lets go. (SQLite's readers never wait on a lock, so
//! there the slots are covered by the unit tests in `query::slots`.)

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sluice::model::{LogLevel, LogRecord, Quotas, format_timestamp, now_rfc3339};
use sluice::server::{ServeConfig, open_store};
use sluice::store::{
    Backend, CreatedProject, DeadLetter, PRUNE_CHUNK, ProcessedBatch, Store, StoreConfig,
};
use sqlx::Connection;

use crate::common::postgres::TestStore;
use crate::common::server::{PATIENCE, TestServer, answer, wait_until};

/// A trend over the project's last month: any query reads `events`.
fn trend() -> Value {
    json!({"kind": "trends", "series": [{}], "date_from": "-30d"})
}

/// A query answer: status, `Retry-After`, body.
type Answer = (u16, Option<String>, Value);

/// Runs `query` as `project` in a task of its own, so the test can hold
/// it running.
fn spawn_query(
    server: &TestServer,
    project: &CreatedProject,
    query: Value,
) -> tokio::task::JoinHandle<Answer> {
    let request = server
        .client
        .post(format!(
            "{}/api/projects/{}/query",
            server.base, project.project_id
        ))
        .bearer_auth(&project.api_key)
        .header("content-type", "application/json")
        .body(query.to_string());
    tokio::spawn(async move { answer(request.send().await.unwrap()).await })
}

/// Waits for a task's answer, failing instead of hanging if it never comes.
async fn finish(task: tokio::task::JoinHandle<Answer>) -> Answer {
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the query answered")
        .unwrap()
}

/// A session holding `events` locked in `mode` until [`Blocker::release`].
struct Blocker(sqlx::PgConnection);

impl Blocker {
    async fn lock(server: &TestServer, mode: &str) -> Blocker {
        let mut conn = sqlx::PgConnection::connect(server.database_url().unwrap())
            .await
            .unwrap();
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query(&format!("LOCK TABLE events IN {mode} MODE"))
            .execute(&mut conn)
            .await
            .unwrap();
        Blocker(conn)
    }

    /// Waits until `n` sessions of the database wait on a lock: the
    /// queries sent are running, each holding its slot.
    async fn wait_for_waiters(&mut self, n: i64) {
        let conn = tokio::sync::Mutex::new(&mut self.0);
        wait_until(&format!("{n} sessions to wait on the lock"), || async {
            let mut conn = conn.lock().await;
            // Inside a transaction the statistics views keep what they
            // showed first unless told to look again.
            sqlx::query("SELECT pg_stat_clear_snapshot()")
                .execute(&mut **conn)
                .await
                .unwrap();
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut **conn)
            .await
            .unwrap();
            (waiting == n).then_some(())
        })
        .await
    }

    async fn release(mut self) {
        sqlx::query("ROLLBACK").execute(&mut self.0).await.unwrap();
    }
}

fn detail(body: &Value) -> &str {
    body["detail"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_project_over_its_query_quota_gets_429_naming_it_while_another_projects_query_runs()
 {
    let server = TestServer::start_with(Backend::Postgres, |config| ServeConfig {
        quotas: Quotas {
            concurrent_queries: 1,
            ..Quotas::default()
        },
        ..config
    })
    .await;
    let mut blocker = Blocker::lock(&server, "ACCESS EXCLUSIVE").await;

    let first = spawn_query(&server, &server.project, trend());
    blocker.wait_for_waiters(1).await;
    let others = spawn_query(&server, &server.other, trend());
    blocker.wait_for_waiters(2).await;

    let (status, retry_after, body) = finish(spawn_query(&server, &server.project, trend())).await;
    assert_eq!(status, 429, "{body}");
    assert!(retry_after.is_some(), "429 without Retry-After");
    assert!(
        detail(&body).contains("the project's quota `concurrent_queries` (1)"),
        "{body}"
    );

    blocker.release().await;
    for task in [first, others] {
        let (status, _, body) = finish(task).await;
        assert_eq!(status, 200, "{body}");
    }
    // The slot came back with the answer.
    let (status, _, body) = finish(spawn_query(&server, &server.project, trend())).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_capture_answers_while_every_query_slot_of_the_server_is_taken() {
    let server = TestServer::start_with(Backend::Postgres, |config| ServeConfig {
        max_concurrent_queries: 2,
        ..config
    })
    .await;
    let mut blocker = Blocker::lock(&server, "ACCESS EXCLUSIVE").await;
    let running = [
        spawn_query(&server, &server.project, trend()),
        spawn_query(&server, &server.project, trend()),
    ];
    blocker.wait_for_waiters(2).await;

    let (status, retry_after, body) = finish(spawn_query(&server, &server.other, trend())).await;
    assert_eq!(status, 429, "{body}");
    assert!(retry_after.is_some(), "429 without Retry-After");
    assert!(
        detail(&body).contains("running its most analytics queries at once (2"),
        "{body}"
    );
    let (status, body) = server
        .capture_batch(json!([{"event": "during", "distinct_id": "d"}]))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.call_api(Method::GET, "", None).await;
    assert_eq!(status, 200, "the API answers too: {body}");

    blocker.release().await;
    for task in running {
        let (status, _, body) = finish(task).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, _, body) = finish(spawn_query(&server, &server.other, trend())).await;
    assert_eq!(status, 200, "{body}");
    server.wait_events(1).await;
}

// ---------------------------------------------------------------------------
// Retention.

/// A raw connection to the store's database, to age rows as only time
/// would.
async fn raw(config: &StoreConfig) -> sqlx::AnyConnection {
    let url = match config {
        StoreConfig::Sqlite { data_dir } => {
            format!("sqlite://{}", data_dir.join("sluice.db").display())
        }
        StoreConfig::Postgres { url } => url.clone(),
    };
    sqlx::AnyConnection::connect(&url).await.unwrap()
}

fn days_ago(days: i64) -> String {
    format_timestamp(chrono::Utc::now() - chrono::Duration::days(days))
}

fn line(at: String, message: &str) -> LogRecord {
    LogRecord {
        at,
        level: LogLevel::Info,
        message: message.to_string(),
        fields: Vec::new(),
        event_uuid: None,
    }
}

/// A transformation's dead letter of an event with `uuid`, `days` old.
async fn dead_letter(
    store: &Store,
    db: &mut sqlx::AnyConnection,
    project_id: &str,
    uuid: &str,
    days: i64,
) {
    let batch = ProcessedBatch {
        dead_letters: vec![DeadLetter {
            project_id: project_id.to_string(),
            plugin_config_id: "a-transformation".into(),
            event: json!({"uuid": uuid, "event": "e", "distinct_id": "d",
                          "timestamp": now_rfc3339(), "properties": {}}),
            error: "it failed".into(),
        }],
        ..ProcessedBatch::default()
    };
    store.complete("test", &[], &batch, None).await.unwrap();
    sqlx::query("UPDATE dead_letters SET created_at = $1 WHERE event_uuid = $2")
        .bind(days_ago(days))
        .bind(uuid)
        .execute(db)
        .await
        .unwrap();
}

async fn letter_uuids(store: &Store, project_id: &str) -> Vec<String> {
    let mut uuids: Vec<String> = store
        .dead_letters(project_id, None, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|letter| letter.event_uuid)
        .collect();
    uuids.sort();
    uuids
}

async fn log_messages(store: &Store, config_id: &str) -> Vec<String> {
    store
        .plugin_logs(config_id, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|line| line.message)
        .collect()
}

async fn pruning_deletes_old_and_surplus_rows_in_chunks_and_keeps_the_rest(backend: Backend) {
    let test_store = TestStore::create(backend).await;
    let store = test_store.open().await;
    let mut db = raw(&test_store.config).await;
    let project = store.create_project("p").await.unwrap().project_id;
    let cutoff = days_ago(7);

    // More old lines than one chunk, then two recent ones.
    let old: Vec<LogRecord> = (0..PRUNE_CHUNK + 50)
        .map(|i| line(days_ago(30), &format!("old {i}")))
        .collect();
    store.append_plugin_logs("flooded", &old).await.unwrap();
    let recent = [
        line(now_rfc3339(), "recent 0"),
        line(now_rfc3339(), "recent 1"),
    ];
    store.append_plugin_logs("flooded", &recent).await.unwrap();
    store
        .append_plugin_logs("untouched", &[line(days_ago(30), "another config's")])
        .await
        .unwrap();
    let deleted = store
        .prune_plugin_logs("flooded", &cutoff, 100)
        .await
        .unwrap();
    assert_eq!(deleted, PRUNE_CHUNK + 50);
    assert_eq!(
        log_messages(&store, "flooded").await,
        ["recent 1", "recent 0"]
    );
    assert_eq!(
        log_messages(&store, "untouched").await,
        ["another config's"]
    );

    // Beyond the newest `keep`, recent lines go too, oldest first.
    let many: Vec<LogRecord> = (0..5)
        .map(|i| line(now_rfc3339(), &format!("line {i}")))
        .collect();
    store.append_plugin_logs("chatty", &many).await.unwrap();
    assert_eq!(
        store.prune_plugin_logs("chatty", &cutoff, 3).await.unwrap(),
        2
    );
    assert_eq!(
        log_messages(&store, "chatty").await,
        ["line 4", "line 3", "line 2"]
    );
    assert_eq!(
        store.prune_plugin_logs("chatty", &cutoff, 3).await.unwrap(),
        0
    );

    let other = store.create_project("q").await.unwrap().project_id;
    dead_letter(&store, &mut db, &project, "old-letter", 40).await;
    dead_letter(&store, &mut db, &project, "new-letter", 1).await;
    dead_letter(&store, &mut db, &other, "others-old-letter", 40).await;
    let cutoff = days_ago(30);
    assert_eq!(
        store.prune_dead_letters(&project, &cutoff).await.unwrap(),
        1
    );
    assert_eq!(letter_uuids(&store, &project).await, ["new-letter"]);
    assert_eq!(letter_uuids(&store, &other).await, ["others-old-letter"]);
    store.close().await;
}

/// The background task prunes every project by its own quotas: `b` keeps
/// its dead letters for a year, `a` for the default 30 days.
async fn the_retention_task_prunes_each_project_by_its_own_quotas(backend: Backend) {
    let server = TestServer::start_with(backend, |config| ServeConfig {
        retention_period: Duration::from_millis(50),
        quotas: Quotas {
            log_lines_per_config: 2,
            ..Quotas::default()
        },
        ..config
    })
    .await;
    let install = server
        .upload_and_install("passthrough", json!({}), "open")
        .await;
    let config_id = install["id"].as_str().unwrap().to_string();
    let store = open_store(&server.store).await.unwrap();
    let mut db = raw(&server.store).await;

    // Rounds take projects in id order: `a` first, then `b`.
    let mut projects = [server.project.clone(), server.other.clone()];
    projects.sort_by(|x, y| x.project_id.cmp(&y.project_id));
    let [a, b] = projects;
    server
        .set_quotas(&b, json!({"dead_letter_retention_days": 365}))
        .await;

    let lines = [
        line(days_ago(10), "too old"),
        line(now_rfc3339(), "one"),
        line(now_rfc3339(), "two"),
        line(now_rfc3339(), "three"),
    ];
    store.append_plugin_logs(&config_id, &lines).await.unwrap();
    dead_letter(&store, &mut db, &b.project_id, "b-40-days", 40).await;
    dead_letter(&store, &mut db, &a.project_id, "a-40-days", 40).await;
    dead_letter(&store, &mut db, &a.project_id, "a-1-day", 1).await;
    wait_until("a's old letter to be pruned", || async {
        (letter_uuids(&store, &a.project_id).await == ["a-1-day"]).then_some(())
    })
    .await;
    // The round that pruned it may still be on its way to `b`; the round
    // that prunes a second one began after it ended.
    dead_letter(&store, &mut db, &a.project_id, "a-40-days-again", 40).await;
    wait_until("a's second old letter to be pruned", || async {
        (letter_uuids(&store, &a.project_id).await == ["a-1-day"]).then_some(())
    })
    .await;
    assert_eq!(letter_uuids(&store, &b.project_id).await, ["b-40-days"]);
    let kept: Vec<String> = log_messages(&store, &config_id)
        .await
        .into_iter()
        .filter(|m| ["too old", "one", "two", "three"].contains(&m.as_str()))
        .collect();
    assert_eq!(kept, ["three", "two"]);
    store.close().await;
}

// ---------------------------------------------------------------------------
// Replay.

/// Five events a fail-closed plugin could not handle; the plugin is then
/// disabled so that replayed events are stored.
async fn five_dead_letters(server: &TestServer) -> Vec<i64> {
    let install = server
        .upload_and_install("wasi-file-read", json!({}), "closed")
        .await;
    let events: Vec<Value> = (0..5)
        .map(|i| json!({"event": "e", "distinct_id": format!("d{i}")}))
        .collect();
    let (status, body) = server.capture_batch(Value::Array(events)).await;
    assert_eq!(status, 200, "{body}");
    let mut ids = wait_until("5 dead letters", || async {
        let (_, body) = server.call_api(Method::GET, "/dead-letters", None).await;
        let ids: Vec<i64> = body["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|letter| letter["id"].as_i64().unwrap())
            .collect();
        (ids.len() == 5).then_some(ids)
    })
    .await;
    ids.sort();
    let (status, body) = server
        .call_api(
            Method::PATCH,
            &format!("/plugin-configs/{}", install["id"].as_str().unwrap()),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    ids
}

async fn one_replay_queues_at_most_replay_batch_letters_oldest_first(backend: Backend) {
    let server = TestServer::start_with(backend, |config| ServeConfig {
        quotas: Quotas {
            replay_batch: 3,
            ..Quotas::default()
        },
        ..config
    })
    .await;
    let ids = five_dead_letters(&server).await;

    let all = json!({"all": true});
    let (status, body) = server
        .call_api(Method::POST, "/dead-letters/replay", Some(all.clone()))
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"replayed": 3, "remaining": 2}))
    );
    let (_, body) = server.call_api(Method::GET, "/dead-letters", None).await;
    let mut left: Vec<i64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|letter| letter["id"].as_i64().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ids[3..], "the oldest went first");

    let (status, body) = server
        .call_api(Method::POST, "/dead-letters/replay", Some(all))
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"replayed": 2, "remaining": 0}))
    );
    server.wait_events(5).await;
}

/// While the project's events fill its share of the queue (the pipeline
/// cannot store: `events` is locked), replay refuses with 503 naming the
/// quota, and queues its letters once the pipeline caught up.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_replay_waits_while_the_projects_queue_is_full() {
    let server = TestServer::start_with(Backend::Postgres, |config| ServeConfig {
        quotas: Quotas {
            queued_events: 2,
            ..Quotas::default()
        },
        ..config
    })
    .await;
    let store = open_store(&server.store).await.unwrap();
    let mut db = raw(&server.store).await;
    dead_letter(
        &store,
        &mut db,
        &server.project.project_id,
        "0190a0a0-0000-7000-8000-00000000aa01",
        0,
    )
    .await;

    let blocker = Blocker::lock(&server, "EXCLUSIVE").await;
    let (status, body) = server
        .capture_batch(
            json!([{"event": "e", "distinct_id": "d"}, {"event": "e", "distinct_id": "d"}]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let response = server
        .client
        .post(format!(
            "{}/api/projects/{}/dead-letters/replay",
            server.base, server.project.project_id
        ))
        .bearer_auth(&server.project.api_key)
        .header("content-type", "application/json")
        .body(json!({"all": true}).to_string())
        .send()
        .await
        .unwrap();
    let (status, retry_after, body) = answer(response).await;
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some(), "503 without Retry-After");
    assert!(
        detail(&body).contains("the project's quota `queued_events` (2)"),
        "{body}"
    );
    assert_eq!(
        letter_uuids(&store, &server.project.project_id).await.len(),
        1,
        "nothing was replayed"
    );

    blocker.release().await;
    server.wait_events(2).await;
    let (status, body) = server
        .call_api(
            Method::POST,
            "/dead-letters/replay",
            Some(json!({"all": true})),
        )
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"replayed": 1, "remaining": 0}))
    );
    server.wait_events(3).await;
    store.close().await;
}

on_both_backends!(
    pruning_deletes_old_and_surplus_rows_in_chunks_and_keeps_the_rest,
    the_retention_task_prunes_each_project_by_its_own_quotas,
    one_replay_queues_at_most_replay_batch_letters_oldest_first,
);
