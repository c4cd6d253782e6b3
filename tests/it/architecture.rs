//! What the house-keeping of the server promises: both migration trees
//! build the same schema, a background task that fails is reported and
//! started again, and a store that fails while a plugin starts does not
//! disable the plugin.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};
use sluice::server::open_store;
use sluice::store::{Backend, StoreConfig};
use sqlx::{Connection, Row};

use crate::common::postgres::TestDatabase;
use crate::common::server::{TestServer, wait_until};

/// A table's columns as `name type nullability`, types mapped to one
/// vocabulary.
type Schema = BTreeSet<String>;

fn sqlite_type(declared: &str) -> &'static str {
    match declared.to_ascii_uppercase().as_str() {
        "INTEGER" | "BIGINT" | "BOOLEAN" => "integer",
        "TEXT" => "text",
        "BLOB" => "bytes",
        "REAL" | "DOUBLE" => "real",
        other => panic!("a SQLite column is declared {other}: map it here and in postgres_type"),
    }
}

fn postgres_type(declared: &str) -> &'static str {
    match declared {
        "bigint" | "integer" | "smallint" | "boolean" => "integer",
        "text" | "character varying" => "text",
        "bytea" => "bytes",
        "double precision" | "real" => "real",
        other => panic!("a PostgreSQL column is of type {other}: map it here and in sqlite_type"),
    }
}

async fn sqlite_schema(path: &std::path::Path) -> (Schema, Schema) {
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table'
         AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut columns = Schema::new();
    let mut indexes = Schema::new();
    for table in tables {
        for row in sqlx::query("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?)")
            .bind(&table)
            .fetch_all(&mut conn)
            .await
            .unwrap()
        {
            let name: String = row.get("name");
            let declared: String = row.get("type");
            // SQLite lets a primary key column hold NULL unless it says
            // NOT NULL; PostgreSQL never does.
            let not_null = row.get::<i64, _>("notnull") != 0 || row.get::<i64, _>("pk") != 0;
            columns.insert(format!(
                "{table}.{name} {} {}",
                sqlite_type(&declared),
                if not_null { "not null" } else { "null" }
            ));
        }
        for row in sqlx::query(
            "SELECT name, \"unique\", origin FROM pragma_index_list(?) WHERE origin = 'c'",
        )
        .bind(&table)
        .fetch_all(&mut conn)
        .await
        .unwrap()
        {
            let name: String = row.get("name");
            let unique = row.get::<i64, _>("unique") != 0;
            let keys: Vec<String> =
                sqlx::query_scalar("SELECT name FROM pragma_index_info(?) ORDER BY seqno")
                    .bind(&name)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
            indexes.insert(format!(
                "{name} on {table} ({}){}",
                keys.join(", "),
                if unique { " unique" } else { "" }
            ));
        }
    }
    (columns, indexes)
}

async fn postgres_schema(url: &str) -> (Schema, Schema) {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let mut columns = Schema::new();
    for row in sqlx::query(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text
         FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    {
        let table: String = row.get(0);
        let name: String = row.get(1);
        let declared: String = row.get(2);
        let nullable: String = row.get(3);
        columns.insert(format!(
            "{table}.{name} {} {}",
            postgres_type(&declared),
            if nullable == "NO" { "not null" } else { "null" }
        ));
    }
    // Indexes made by CREATE INDEX: not those behind a primary key or a
    // UNIQUE constraint, which SQLite keeps apart as automatic indexes.
    let mut indexes = Schema::new();
    for row in sqlx::query(
        "SELECT i.relname::text, t.relname::text, x.indisunique,
                ARRAY(SELECT a.attname::text FROM unnest(x.indkey) WITH ORDINALITY k(attnum, n)
                      JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
                      ORDER BY k.n)
         FROM pg_index x
         JOIN pg_class i ON i.oid = x.indexrelid
         JOIN pg_class t ON t.oid = x.indrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = 'public'
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    {
        let name: String = row.get(0);
        let table: String = row.get(1);
        let unique: bool = row.get(2);
        let keys: Vec<String> = row.get(3);
        indexes.insert(format!(
            "{name} on {table} ({}){}",
            keys.join(", "),
            if unique { " unique" } else { "" }
        ));
    }
    (columns, indexes)
}

fn differences(sqlite: &Schema, postgres: &Schema) -> Vec<String> {
    sqlite
        .difference(postgres)
        .map(|only| format!("only on SQLite: {only}"))
        .chain(
            postgres
                .difference(sqlite)
                .map(|only| format!("only on PostgreSQL: {only}")),
        )
        .collect()
}

#[tokio::test]
async fn both_migration_trees_build_the_same_tables_columns_and_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = StoreConfig::Sqlite {
        data_dir: dir.path().to_path_buf(),
    };
    open_store(&sqlite).await.unwrap().close().await;
    let database = TestDatabase::create().await;
    let postgres = StoreConfig::Postgres {
        url: database.url.clone(),
    };
    open_store(&postgres).await.unwrap().close().await;

    let (sqlite_columns, sqlite_indexes) = sqlite_schema(&dir.path().join("sluice.db")).await;
    let (postgres_columns, postgres_indexes) = postgres_schema(&database.url).await;
    assert!(
        sqlite_columns.len() > 50,
        "the SQLite schema was not read: {sqlite_columns:?}"
    );
    let mut problems = differences(&sqlite_columns, &postgres_columns);
    problems.extend(differences(&sqlite_indexes, &postgres_indexes));
    assert!(
        problems.is_empty(),
        "the migrations in migrations/sqlite and migrations/postgres disagree:\n{}",
        problems.join("\n")
    );
}

/// The state `/_ready` reports for one task, once it reports it failed.
async fn wait_failed(server: &TestServer, task: &str) -> Value {
    wait_until(&format!("/_ready to report `{task}` failed"), || async {
        let (status, body) = server.get_path("/_ready").await;
        (status == 503 && body["tasks"][task]["state"] == "failed")
            .then(|| body["tasks"][task].clone())
    })
    .await
}

async fn a_failing_worker_is_reported_and_started_again(backend: Backend) {
    let server = TestServer::start(backend).await;
    server.wait_ready(200, "the server to be ready").await;

    // Every claim the worker makes now fails.
    server
        .execute_sql("ALTER TABLE capture_queue RENAME TO capture_queue_away")
        .await;
    let failed = wait_failed(&server, "pipeline worker").await;
    assert!(
        failed["error"].as_str().unwrap().contains("capture_queue"),
        "the error says what failed: {failed}"
    );

    server
        .execute_sql("ALTER TABLE capture_queue_away RENAME TO capture_queue")
        .await;
    server
        .wait_ready(200, "the worker to be started again and ready")
        .await;
    let (status, body) = server
        .capture_batch(json!([{"event": "after", "distinct_id": "u1"}]))
        .await;
    assert_eq!(status, 200, "{body}");
    let events = server.wait_events(1).await;
    assert_eq!(events[0]["event"], "after");
}

#[tokio::test]
async fn a_failing_worker_is_reported_and_started_again_on_sqlite() {
    a_failing_worker_is_reported_and_started_again(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_failing_worker_is_reported_and_started_again_on_postgres() {
    a_failing_worker_is_reported_and_started_again(Backend::Postgres).await;
}

async fn a_store_error_while_a_plugin_starts_leaves_it_enabled(backend: Backend) {
    let server = TestServer::start(backend).await;
    let installed = server
        .upload_and_install(
            "property-renamer",
            json!({"events": {"signup": "signed_up"}}),
            "open",
        )
        .await;
    let config_id = installed["id"].as_str().unwrap().to_string();
    server.wait_ready(200, "the server to be ready").await;

    // The configs still read; the plugin's `.wasm` does not.
    server
        .execute_sql("ALTER TABLE plugins RENAME COLUMN wasm TO wasm_away")
        .await;
    // A change to the install makes the worker start its plugin again.
    let (status, body) = server
        .call_api(
            Method::PATCH,
            &format!("/plugin-configs/{config_id}"),
            Some(json!({"failure_policy": "closed"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .capture_batch(json!([{"event": "signup", "distinct_id": "u1"}]))
        .await;
    assert_eq!(status, 200, "{body}");
    // The other project has no plugin to start: its events go on while
    // this project's wait, instead of the whole worker stopping.
    let (status, body) = server
        .capture_batch_as(
            &server.other,
            json!([{"event": "elsewhere", "distinct_id": "u2"}]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_until("the other project's event to be stored", || async {
        let (status, body) = server
            .call_api_as(&server.other, Method::GET, "/events", None)
            .await;
        assert_eq!(status, 200, "{body}");
        (body["results"].as_array().unwrap().len() == 1).then_some(())
    })
    .await;
    let (status, events) = server.call_api(Method::GET, "/events", None).await;
    assert_eq!(status, 200, "{events}");
    assert_eq!(
        events["results"],
        json!([]),
        "held back, not run without its link"
    );

    let (status, configs) = server.call_api(Method::GET, "/plugin-configs", None).await;
    assert_eq!(status, 200, "{configs}");
    let config = configs["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|config| config["id"] == config_id.as_str())
        .unwrap();
    assert_eq!(config["enabled"], true, "still enabled: {config}");
    assert_eq!(config["disabled_reason"], Value::Null, "{config}");

    server
        .execute_sql("ALTER TABLE plugins RENAME COLUMN wasm_away TO wasm")
        .await;
    // The event waited in the queue and went through the whole chain.
    let events = server.wait_events(1).await;
    assert_eq!(events[0]["event"], "signed_up");
}

#[tokio::test]
async fn a_store_error_while_a_plugin_starts_leaves_it_enabled_on_sqlite() {
    a_store_error_while_a_plugin_starts_leaves_it_enabled(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_store_error_while_a_plugin_starts_leaves_it_enabled_on_postgres() {
    a_store_error_while_a_plugin_starts_leaves_it_enabled(Backend::Postgres).await;
}

/// The top-level modules of `server/src` and the modules each names
/// through `crate::`, in its own files and those below it.
fn module_imports() -> std::collections::BTreeMap<String, BTreeSet<String>> {
    let root = crate::common::workspace_root().join("server/src");
    let single = regex::Regex::new(r"crate::(\w+)").unwrap();
    let group = regex::Regex::new(r"crate::\{([^}]*)\}").unwrap();
    let comment = regex::Regex::new(r"//.*").unwrap();
    let mut imports = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        if file == "lib.rs" || file == "main.rs" {
            continue;
        }
        let module = file.trim_end_matches(".rs").to_string();
        let mut files = vec![path.clone()];
        let mut deps = BTreeSet::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = comment.replace_all(&text, "");
            for names in group.captures_iter(&text) {
                for name in names[1].split(',') {
                    if let Some(first) = name.split("::").next().map(str::trim)
                        && !first.is_empty()
                    {
                        deps.insert(first.to_string());
                    }
                }
            }
            for name in single.captures_iter(&text) {
                deps.insert(name[1].to_string());
            }
        }
        deps.remove(&module);
        deps.remove("self");
        imports.insert(module, deps);
    }
    imports
}

/// The modules of a circle through `start`, if there is one.
fn circle(
    imports: &std::collections::BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    let last = path.last().unwrap().clone();
    for next in imports.get(&last).into_iter().flatten() {
        if let Some(at) = path.iter().position(|seen| seen == next) {
            let mut found = path[at..].to_vec();
            found.push(next.clone());
            return Some(found);
        }
        path.push(next.clone());
        if let Some(found) = circle(imports, path) {
            return Some(found);
        }
        path.pop();
    }
    None
}

#[test]
fn the_server_modules_import_each_other_without_a_circle() {
    let imports = module_imports();
    assert!(imports.contains_key("pipeline") && imports.contains_key("store"));
    for module in imports.keys() {
        if let Some(found) = circle(&imports, &mut vec![module.clone()]) {
            panic!(
                "server/src has an import circle: {} (see docs/architecture.md)",
                found.join(" -> ")
            );
        }
    }
    assert!(
        !imports["store"].contains("runtime"),
        "the store must not know the plugin runtime: {:?}",
        imports["store"]
    );
    assert!(
        imports["model"].is_empty(),
        "the model imports nothing from the crate: {:?}",
        imports["model"]
    );
}

#[tokio::test]
async fn every_project_route_checks_the_key_and_answers_bad_parameters_in_json() {
    let server = TestServer::start(Backend::Sqlite).await;
    let project = &server.project.project_id;
    let routes = [
        (Method::GET, format!("/api/projects/{project}/events")),
        (Method::GET, format!("/api/projects/{project}/dead-letters")),
        (
            Method::GET,
            format!("/api/projects/{project}/plugin-configs"),
        ),
        (Method::POST, format!("/api/projects/{project}/plugins")),
        (Method::POST, format!("/api/projects/{project}/query")),
        (Method::GET, format!("/api/projects/{project}")),
    ];
    for (method, path) in &routes {
        let url = format!("{}{path}", server.base);
        let missing = server
            .client
            .request(method.clone(), &url)
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 401, "{method} {path} without a key");
        let body: Value = serde_json::from_str(&missing.text().await.unwrap()).unwrap();
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{body}"
        );
        let foreign = server
            .client
            .request(method.clone(), &url)
            .bearer_auth(&server.other.api_key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            foreign.status(),
            403,
            "{method} {path} with another project's key"
        );
    }

    // A query parameter of the wrong type is named, in the API's shape.
    let (status, body) = server
        .call_api(Method::GET, "/dead-letters?limit=many", None)
        .await;
    assert_eq!(status, 400, "{body}");
    let detail = body["detail"].as_str().expect("a JSON error");
    assert!(detail.contains("limit"), "{detail}");
}
