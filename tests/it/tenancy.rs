//! Organisations, scoped personal API keys, capture token rotation, the
//! audit log and the API's rate limit per key, through the API and the
//! CLI as users meet them.

use std::borrow::Cow;
use std::path::Path;

use reqwest::Method;
use serde_json::{Value, json};
use sluice::server::open_store;
use sluice::store::{Backend, KeySpec, Scope, StoreConfig};
use sqlx::Connection;

use crate::common::postgres::TestDatabase;
use crate::common::server::{TestServer, answer, wait_until};

/// A request to `path` with `key`; the status, `Retry-After` and body.
async fn call(
    server: &TestServer,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let mut request = server
        .client
        .request(method, format!("{}{path}", server.base))
        .bearer_auth(key);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    answer(request.send().await.unwrap()).await
}

/// An organisation with an org-wide admin key, made as the operator does.
async fn organisation(server: &TestServer) -> (String, String) {
    let store = open_store(&server.store).await.unwrap();
    let organisation = store.create_organisation("acme").await.unwrap();
    let key = store
        .create_key(&KeySpec {
            organisation_id: organisation.id.clone(),
            name: "root".into(),
            scope: Scope::Admin,
            projects: None,
            created_by: "cli".into(),
        })
        .await
        .unwrap();
    store.close().await;
    (organisation.id, key.api_key)
}

async fn new_project(server: &TestServer, org: &str, key: &str, name: &str) -> Value {
    let (status, _, body) = call(
        server,
        key,
        Method::POST,
        &format!("/api/organisations/{org}/projects"),
        Some(json!({"name": name})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body
}

async fn new_key(server: &TestServer, org: &str, key: &str, spec: Value) -> (u16, Value) {
    let (status, _, body) = call(
        server,
        key,
        Method::POST,
        &format!("/api/organisations/{org}/keys"),
        Some(spec),
    )
    .await;
    (status, body)
}

async fn organisation_keys_reach_what_they_name(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (org, root) = organisation(&server).await;
    let web = new_project(&server, &org, &root, "web").await;
    let app = new_project(&server, &org, &root, "app").await;
    let (web, app) = (web["id"].as_str().unwrap(), app["id"].as_str().unwrap());

    // The org-wide key reaches both projects, and lists both.
    for project in [web, app] {
        let (status, _, body) = call(
            &server,
            &root,
            Method::GET,
            &format!("/api/projects/{project}/plugin-configs"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, _, listed) = call(
        &server,
        &root,
        Method::GET,
        &format!("/api/organisations/{org}/projects"),
        None,
    )
    .await;
    assert_eq!(listed["results"].as_array().unwrap().len(), 2, "{listed}");

    // A key limited to `web` reaches it alone, and lists it alone.
    let (status, limited) = new_key(
        &server,
        &org,
        &root,
        json!({"name": "web only", "scope": "write", "projects": [web]}),
    )
    .await;
    assert_eq!(status, 201, "{limited}");
    let limited = limited["api_key"].as_str().unwrap();
    let (status, _, _) = call(
        &server,
        limited,
        Method::GET,
        &format!("/api/projects/{web}/plugin-configs"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, body) = call(
        &server,
        limited,
        Method::GET,
        &format!("/api/projects/{app}/plugin-configs"),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (_, _, listed) = call(
        &server,
        limited,
        Method::GET,
        &format!("/api/organisations/{org}/projects"),
        None,
    )
    .await;
    let ids: Vec<&str> = listed["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [web]);

    // No key of this organisation reaches another organisation's project,
    // nor the other way round.
    let (status, _, _) = call(
        &server,
        &root,
        Method::GET,
        &format!("/api/projects/{}/plugin-configs", server.project.project_id),
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = call(
        &server,
        &server.project.api_key,
        Method::GET,
        &format!("/api/organisations/{org}/projects"),
        None,
    )
    .await;
    assert_eq!(status, 403);

    // A key cannot hand out more than it holds.
    let (status, body) = new_key(
        &server,
        &org,
        limited,
        json!({"name": "x", "scope": "read"}),
    )
    .await;
    assert_eq!(status, 403, "a write key makes no keys: {body}");
    let (status, web_admin) = new_key(
        &server,
        &org,
        &root,
        json!({"name": "web admin", "scope": "admin", "projects": [web]}),
    )
    .await;
    assert_eq!(status, 201);
    let web_admin = web_admin["api_key"].as_str().unwrap();
    let (status, body) = new_key(
        &server,
        &org,
        web_admin,
        json!({"name": "wider", "scope": "read"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("projects"),
        "{body}"
    );
    let (status, body) = new_key(
        &server,
        &org,
        web_admin,
        json!({"name": "other", "scope": "read", "projects": [app]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = call(
        &server,
        web_admin,
        Method::POST,
        &format!("/api/organisations/{org}/projects"),
        Some(json!({"name": "mine"})),
    )
    .await;
    assert_eq!(status, 400, "a limited key creates no projects: {body}");
    let (status, body) = new_key(
        &server,
        &org,
        &root,
        json!({"name": "foreign", "scope": "read", "projects": [server.other.project_id]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("not a project of this organisation"),
        "{body}"
    );
}

async fn scopes_are_enforced(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (org, root) = organisation(&server).await;
    let project = new_project(&server, &org, &root, "web").await;
    let project = project["id"].as_str().unwrap();
    let (_, reader) = new_key(&server, &org, &root, json!({"name": "r", "scope": "read"})).await;
    let (_, writer) = new_key(&server, &org, &root, json!({"name": "w", "scope": "write"})).await;
    let reader = reader["api_key"].as_str().unwrap();
    let writer = writer["api_key"].as_str().unwrap();
    let install = json!({"plugin_sha256": "0".repeat(64), "config": {}});

    let (status, _, body) = call(
        &server,
        reader,
        Method::GET,
        &format!("/api/projects/{project}/events"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = call(
        &server,
        reader,
        Method::POST,
        &format!("/api/projects/{project}/query"),
        Some(json!({"kind": "trends", "series": [{"event": "$pageview"}], "date_from": "-7d"})),
    )
    .await;
    assert_ne!(status, 403, "a query is a read: {body}");
    let (status, _, body) = call(
        &server,
        reader,
        Method::POST,
        &format!("/api/projects/{project}/plugin-configs"),
        Some(install.clone()),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("needs `write`"),
        "{body}"
    );
    // The writer gets past the scope to the request's own faults.
    let (status, _, body) = call(
        &server,
        writer,
        Method::POST,
        &format!("/api/projects/{project}/plugin-configs"),
        Some(install),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("upload it first"),
        "{body}"
    );
    let (status, _, body) = call(
        &server,
        writer,
        Method::POST,
        &format!("/api/projects/{project}/capture-tokens/rotate"),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("needs `admin`"),
        "{body}"
    );
    let (status, _, body) = call(
        &server,
        writer,
        Method::GET,
        &format!("/api/organisations/{org}/audit-log"),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
}

async fn revoked_keys_are_refused_and_use_is_recorded(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (org, root) = organisation(&server).await;
    let (_, key) = new_key(&server, &org, &root, json!({"name": "ci", "scope": "read"})).await;
    let (secret, id) = (
        key["api_key"].as_str().unwrap(),
        key["id"].as_str().unwrap(),
    );
    let (status, _, me) = call(&server, secret, Method::GET, "/api/me", None).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["key"]["id"], id);
    assert!(
        me["key"].get("api_key").is_none(),
        "never shown again: {me}"
    );
    // `last_used_at` is written in the background.
    wait_until("last_used_at to be set", || async {
        let (_, _, keys) = call(
            &server,
            &root,
            Method::GET,
            &format!("/api/organisations/{org}/keys"),
            None,
        )
        .await;
        keys["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id && k["last_used_at"].is_string())
            .cloned()
    })
    .await;

    let (status, _, body) = call(
        &server,
        &root,
        Method::DELETE,
        &format!("/api/organisations/{org}/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["revoked_at"].is_string(), "{body}");
    let (status, _, body) = call(&server, secret, Method::GET, "/api/me", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    let (status, _, _) = call(&server, "phx_not_a_key", Method::GET, "/api/me", None).await;
    assert_eq!(status, 401);
}

async fn the_audit_log_records_management_writes(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (org, root) = organisation(&server).await;
    let web = new_project(&server, &org, &root, "web").await;
    let app = new_project(&server, &org, &root, "app").await;
    let (web, app) = (web["id"].as_str().unwrap(), app["id"].as_str().unwrap());
    let (_, web_admin) = new_key(
        &server,
        &org,
        &root,
        json!({"name": "web admin", "scope": "admin", "projects": [web]}),
    )
    .await;
    let web_admin = web_admin["api_key"].as_str().unwrap();
    for (key, project) in [(web_admin, web), (&root, app)] {
        let (status, _, body) = call(
            &server,
            key,
            Method::POST,
            &format!("/api/projects/{project}/capture-tokens/rotate"),
            Some(json!({"grace_seconds": 60})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    // Reads leave no entry.
    call(
        &server,
        &root,
        Method::GET,
        &format!("/api/projects/{web}/events"),
        None,
    )
    .await;
    call(
        &server,
        &root,
        Method::POST,
        &format!("/api/projects/{web}/query"),
        Some(json!({"kind": "trends", "series": [{"event": "x"}], "date_from": "-7d"})),
    )
    .await;

    let (status, _, log) = call(
        &server,
        &root,
        Method::GET,
        &format!("/api/organisations/{org}/audit-log"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{log}");
    let actions: Vec<(String, Option<String>)> = log["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["project_id"].as_str().map(str::to_string),
            )
        })
        .collect();
    let rotate = "POST /api/projects/{project_id}/capture-tokens/rotate".to_string();
    assert_eq!(
        actions,
        [
            (rotate.clone(), Some(app.to_string())),
            (rotate.clone(), Some(web.to_string())),
            (
                "POST /api/organisations/{organisation_id}/keys".into(),
                None
            ),
            (
                "POST /api/organisations/{organisation_id}/projects".into(),
                None
            ),
            (
                "POST /api/organisations/{organisation_id}/projects".into(),
                None
            ),
        ],
        "{log}"
    );
    let first = &log["results"][1];
    assert_eq!(first["status"], 200);
    assert!(
        first["at"].is_string() && first["actor"].is_string(),
        "{first}"
    );
    assert_eq!(
        first["target"],
        format!("/api/projects/{web}/capture-tokens/rotate")
    );

    // A key limited to `web` sees `web`'s entries alone.
    let (status, _, log) = call(
        &server,
        web_admin,
        Method::GET,
        &format!("/api/organisations/{org}/audit-log"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{log}");
    let results = log["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{log}");
    assert_eq!(results[0]["project_id"], web);

    // Pages follow each other by cursor.
    let (_, _, page) = call(
        &server,
        &root,
        Method::GET,
        &format!("/api/organisations/{org}/audit-log?limit=2"),
        None,
    )
    .await;
    assert_eq!(page["results"].as_array().unwrap().len(), 2);
    let next = page["next"].as_str().unwrap();
    let (_, _, rest) = call(
        &server,
        &root,
        Method::GET,
        &format!("/api/organisations/{org}/audit-log?limit=2&cursor={next}"),
        None,
    )
    .await;
    assert_eq!(
        rest["results"][0]["action"],
        "POST /api/organisations/{organisation_id}/keys"
    );
}

async fn a_rotated_capture_token_is_kept_for_its_grace(backend: Backend) {
    let server = TestServer::start(backend).await;
    let project = &server.project;
    let batch =
        |token: &str| json!({"api_key": token, "batch": [{"event": "e", "distinct_id": "u"}]});
    let send = |token: String| {
        let server = &server;
        async move {
            let response = server
                .client
                .post(format!("{}/batch", server.base))
                .header("content-type", "application/json")
                .body(batch(&token).to_string())
                .send()
                .await
                .unwrap();
            response.status().as_u16()
        }
    };
    let rotate = |grace: u64| {
        let server = &server;
        async move {
            let (status, body) = server
                .call_api(
                    Method::POST,
                    "/capture-tokens/rotate",
                    Some(json!({"grace_seconds": grace})),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            body["capture_token"].as_str().unwrap().to_string()
        }
    };

    // Rotated with a grace period: both tokens are accepted.
    let old = project.capture_token.clone();
    let new = rotate(3600).await;
    assert_eq!(send(new.clone()).await, 200);
    assert_eq!(send(old.clone()).await, 200);
    let (_, tokens) = server.call_api(Method::GET, "/capture-tokens", None).await;
    let listed: Vec<(&str, bool)> = tokens["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["token"].as_str().unwrap(),
                t["current"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed, [(new.as_str(), true), (old.as_str(), false)]);

    // Rotated with none: the token it replaces is refused at once by the
    // server that rotated it.
    let newest = rotate(0).await;
    assert_eq!(send(newest).await, 200);
    assert_eq!(send(new).await, 401);
    assert_eq!(send(old).await, 200, "still in its hour");
    let (status, body) = server
        .call_api(
            Method::POST,
            "/capture-tokens/rotate",
            Some(json!({"grace_seconds": 99_999_999})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

async fn each_key_has_its_own_request_rate(backend: Backend) {
    let server = TestServer::start_with(backend, |mut config| {
        config.api_requests_per_second = 1;
        config
    })
    .await;
    // A burst of twice the rate gets through, then 429 with Retry-After.
    let mut refused = None;
    for _ in 0..10 {
        let (status, retry_after, body) = call(
            &server,
            &server.project.api_key,
            Method::GET,
            &format!("/api/projects/{}/events", server.project.project_id),
            None,
        )
        .await;
        if status == 429 {
            refused = Some((retry_after, body));
            break;
        }
        assert_eq!(status, 200, "{body}");
    }
    let (retry_after, body) = refused.expect("the key was throttled");
    assert!(retry_after.is_some(), "Retry-After is set");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("requests a second"),
        "{body}"
    );
    // Another key has its own bucket.
    let (status, _, _) = call(
        &server,
        &server.other.api_key,
        Method::GET,
        &format!("/api/projects/{}/events", server.other.project_id),
        None,
    )
    .await;
    assert_eq!(status, 200);
}

on_both_backends!(
    organisation_keys_reach_what_they_name,
    scopes_are_enforced,
    revoked_keys_are_refused_and_use_is_recorded,
    the_audit_log_records_management_writes,
    a_rotated_capture_token_is_kept_for_its_grace,
    each_key_has_its_own_request_rate,
    rotating_and_making_keys_cannot_grow_the_shared_tables_without_end,
    keys_from_before_organisations_stay_admin_keys_of_their_project,
);

/// A database made before organisations existed: its project key keeps
/// working, as an admin key of that project alone.
async fn keys_from_before_organisations_stay_admin_keys_of_their_project(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let _database;
    let (config, url) = match backend {
        Backend::Sqlite => {
            let path = dir.path().join("sluice.db");
            (
                StoreConfig::Sqlite {
                    data_dir: dir.path().to_path_buf(),
                },
                format!("sqlite://{}?mode=rwc", path.display()),
            )
        }
        Backend::Postgres => {
            let database = TestDatabase::create().await;
            let url = database.url.clone();
            _database = database;
            (StoreConfig::Postgres { url: url.clone() }, url)
        }
    };
    let folder = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let migrations = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(folder);
    let mut before = sqlx::migrate::Migrator::new(migrations).await.unwrap();
    before.migrations = Cow::Owned(
        before
            .migrations
            .iter()
            .filter(|m| m.version < 12)
            .cloned()
            .collect(),
    );
    let secret = "phx_0123456789abcdef0123456789abcdef0123456789abcdef";
    let statements = [
        "INSERT INTO projects (id, name, capture_token, created_at) VALUES ('p1', 'old', 'phc_old', '2026-01-01T00:00:00.000Z')".to_string(),
        format!(
            "INSERT INTO api_keys (id, project_id, key_hash, scope, created_at) VALUES ('k1', 'p1', '{}', 'write', '2026-01-01T00:00:00.000Z')",
            sluice::store::hash_key(secret)
        ),
    ];
    match backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            before.run(&mut conn).await.unwrap();
            for sql in &statements {
                sqlx::query(sql).execute(&mut conn).await.unwrap();
            }
            conn.close().await.unwrap();
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            before.run(&mut conn).await.unwrap();
            for sql in &statements {
                sqlx::query(sql).execute(&mut conn).await.unwrap();
            }
            conn.close().await.unwrap();
        }
    }

    let store = open_store(&config).await.unwrap();
    let key = store.key_by_secret(secret).await.unwrap().unwrap();
    assert_eq!(key.scope, Scope::Admin);
    assert_eq!(key.projects.as_deref(), Some(&["p1".to_string()][..]));
    assert!(key.reaches("p1") && !key.reaches("p2"));
    assert_eq!(
        store.project_organisation("p1").await.unwrap().as_deref(),
        Some(key.organisation_id.as_str())
    );
    let owner = store.project_for_token("phc_old").await.unwrap().unwrap();
    assert_eq!(owner.project_id, "p1");
    store.close().await;
}

/// A project's own admin key may rotate tokens and make keys; doing so in
/// a loop must not grow the tables every tenant shares without end.
async fn rotating_and_making_keys_cannot_grow_the_shared_tables_without_end(backend: Backend) {
    let server = TestServer::start(backend).await;
    let max_retired = sluice::store::MAX_RETIRED_TOKENS as usize;
    for _ in 0..max_retired + 3 {
        let (status, body) = server
            .call_api(
                Method::POST,
                "/capture-tokens/rotate",
                Some(json!({"grace_seconds": 3600})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, tokens) = server.call_api(Method::GET, "/capture-tokens", None).await;
    assert_eq!(
        tokens["results"].as_array().unwrap().len(),
        1 + max_retired,
        "the current token and the newest retired ones: {tokens}"
    );

    let (org, root) = organisation(&server).await;
    let store = open_store(&server.store).await.unwrap();
    for n in 1..sluice::store::MAX_KEYS {
        store
            .create_key(&KeySpec {
                organisation_id: org.clone(),
                name: format!("k{n}"),
                scope: Scope::Read,
                projects: None,
                created_by: "cli".into(),
            })
            .await
            .unwrap();
    }
    store.close().await;
    let (status, body) = new_key(
        &server,
        &org,
        &root,
        json!({"name": "one more", "scope": "read"}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "quota_exceeded", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("revoke keys"),
        "{body}"
    );
}
