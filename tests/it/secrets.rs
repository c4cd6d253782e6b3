//! Secrets in plugin configs: the API never returns them, and a change
//! that moves where a plugin sends its requests must give them again, so
//! a key holder cannot point a destination at their own host and have the
//! stored token sent there.

use reqwest::Method;
use serde_json::{Value, json};
use sluice::model::manifest::{FieldType, Manifest};
use sluice::server::open_store;
use sluice::store::{Backend, KEY_FILE, KeySource, Keyring, StoreConfig};

use crate::common;
use crate::common::postgres::TestDatabase;
use crate::common::process::{Target, create_project_on, sluice_bin};
use crate::common::server::{TestServer, wait_until};

/// Installs `plugin` with `config`; the install's id.
async fn install(server: &TestServer, plugin: &str, config: Value) -> String {
    server.upload_and_install(plugin, config, "open").await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn patch(server: &TestServer, id: &str, config: Value) -> (u16, Value) {
    server
        .call_api(
            Method::PATCH,
            &format!("/plugin-configs/{id}"),
            Some(json!({"config": config})),
        )
        .await
}

/// Where a moved host points.
const ATTACKER: &str = "https://collector.attacker.example";

/// A first-party destination, a field that grants it a host, and a config
/// whose host is `host`.
struct HostCase {
    plugin: &'static str,
    host_field: &'static str,
    config_at: fn(&str) -> Value,
}

fn host_cases() -> Vec<HostCase> {
    vec![
        HostCase {
            plugin: "webhook",
            host_field: "url",
            config_at: |host| json!({"url": format!("{host}/in"), "secret": "hmac-key-123456"}),
        },
        HostCase {
            plugin: "sendgrid",
            host_field: "base_url",
            config_at: |host| json!({"api_key": "SG.secret-key-123456", "base_url": host}),
        },
        HostCase {
            plugin: "hubspot",
            host_field: "base_url",
            config_at: |host| json!({"token": "pat-na1-secret-123456", "base_url": host}),
        },
        HostCase {
            plugin: "clickhouse",
            host_field: "url",
            config_at: |host| crate::clickhouse::config(host, json!({})),
        },
        HostCase {
            plugin: "s3",
            host_field: "endpoint",
            config_at: |host| {
                crate::s3::fake_config(host, json!({"session_token": "session-token-123456"}))
            },
        },
        HostCase {
            plugin: "bigquery",
            host_field: "api_base",
            config_at: crate::bigquery::config,
        },
        HostCase {
            plugin: "salesforce",
            host_field: "login_url",
            config_at: crate::salesforce::config,
        },
        HostCase {
            plugin: "salesforce",
            host_field: "instance_url",
            config_at: |host| {
                let mut config = crate::salesforce::config("https://login.salesforce.com");
                config["instance_url"] = json!(host);
                config
            },
        },
    ]
}

/// Every first-party destination's manifest, with the fields that grant
/// it a host and are not secrets themselves (a Slack webhook URL is its
/// own secret: moving it gives it).
fn host_fields_of_first_party_destinations() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let first_party = common::workspace_root().join("plugins");
    for dir in common::plugin_crates() {
        if !dir.starts_with(&first_party) {
            continue;
        }
        let text = std::fs::read_to_string(dir.join("plugin.toml")).unwrap();
        let manifest = Manifest::parse(&text).unwrap();
        if !manifest.is_destination() {
            continue;
        }
        let has_secrets = manifest
            .config
            .values()
            .any(|field| field.kind == FieldType::Secret);
        for field in manifest.host_fields() {
            if has_secrets && manifest.config[field].kind != FieldType::Secret {
                found.push((manifest.name.clone(), field.to_string()));
            }
        }
    }
    found
}

#[tokio::test]
async fn moving_a_destinations_host_needs_its_secrets_again() {
    let cases = host_cases();
    // A destination added to plugins/ cannot be left out.
    for (plugin, field) in host_fields_of_first_party_destinations() {
        assert!(
            cases
                .iter()
                .any(|case| case.plugin == plugin && case.host_field == field),
            "{plugin}'s `{field}` grants a host: add it to host_cases()"
        );
    }
    let server = TestServer::start(Backend::Sqlite).await;
    for case in cases {
        let HostCase {
            plugin, host_field, ..
        } = case;
        let config = (case.config_at)("https://vendor.example.com");
        let manifest = manifest_of(plugin);
        let secrets: Vec<&str> = manifest
            .config
            .iter()
            .filter(|(name, field)| field.kind == FieldType::Secret && config.get(name).is_some())
            .map(|(name, _)| name.as_str())
            .collect();
        assert!(!secrets.is_empty(), "{plugin}: the case sets no secret");
        let id = install(&server, plugin, config.clone()).await;

        // The host moves and the secrets are left out: refused, naming both.
        let mut moved = config.clone();
        for secret in &secrets {
            moved.as_object_mut().unwrap().remove(*secret);
        }
        moved[host_field] = json!(ATTACKER);
        let (status, body) = patch(&server, &id, moved.clone()).await;
        assert_eq!(status, 400, "{plugin}: {body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("`{host_field}`")),
            "{plugin}: {detail}"
        );
        for secret in &secrets {
            assert!(
                detail.contains(&format!("`{secret}`")),
                "{plugin}: {detail}"
            );
        }
        let stored = server.plugin_config_view(&id).await;
        assert_ne!(
            stored["config"][host_field],
            json!(ATTACKER),
            "{plugin}: nothing changed"
        );

        // Given again with the new host: accepted.
        let again = (case.config_at)(ATTACKER);
        let mut given = moved.clone();
        for secret in &secrets {
            given[*secret] = again[*secret].clone();
        }
        let (status, body) = patch(&server, &id, given).await;
        assert_eq!(status, 200, "{plugin}: {body}");

        // A change that leaves the host alone keeps the stored secrets.
        let (status, body) = patch(&server, &id, moved).await;
        assert_eq!(status, 200, "{plugin}: {body}");
        assert_eq!(
            body["secrets_set"],
            json!(secrets),
            "{plugin}: the secrets are still set: {body}"
        );
    }
}

fn manifest_of(plugin: &str) -> Manifest {
    let path = common::workspace_root()
        .join("plugins")
        .join(plugin)
        .join("plugin.toml");
    Manifest::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn a_config_whose_manifest_cannot_be_read_shows_no_values() {
    let server = TestServer::start(Backend::Sqlite).await;
    let id = install(
        &server,
        "webhook",
        json!({"url": "https://hooks.example.com/in", "secret": "hmac-key-123456"}),
    )
    .await;
    // Which fields are secret comes from the stored manifest.
    server
        .execute_sql("UPDATE plugins SET manifest = 'not a manifest'")
        .await;
    let view = server.plugin_config_view(&id).await;
    assert_eq!(view["config"], json!({}), "{view}");
    assert!(!view.to_string().contains("hmac-key-123456"), "{view}");
    assert!(
        view["config_hidden"]
            .as_str()
            .unwrap()
            .contains("upload the plugin again"),
        "{view}"
    );
}

/// A HubSpot that refuses every token, quoting it in its error, as some
/// vendors do: the error a destination stores then holds the secret.
fn quoting_vendor() -> String {
    async fn refuse(headers: axum::http::HeaderMap) -> axum::response::Response {
        use axum::response::IntoResponse;
        let token = headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .trim_start_matches("Bearer ")
            .to_string();
        (
            axum::http::StatusCode::UNAUTHORIZED,
            axum::Json(json!({
                "status": "error",
                "message": format!("The access token {token} is not valid"),
                "correlationId": "4d8c1e2f",
                "category": "INVALID_AUTHENTICATION",
            })),
        )
            .into_response()
    }
    let router = axum::Router::new().route(
        "/crm/v3/objects/contacts/batch/upsert",
        axum::routing::post(refuse),
    );
    format!("http://127.0.0.1:{}", common::serve(router).port())
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `sluice serve` with its log in a file, to read afterwards.
struct LoggedServer {
    child: std::process::Child,
    base: String,
    log: std::path::PathBuf,
}

impl LoggedServer {
    async fn start(target: &Target, dir: &std::path::Path) -> LoggedServer {
        let config = dir.join("sluice.toml");
        std::fs::write(&config, "[plugins]\nallow_loopback = true\n").unwrap();
        let log = dir.join("server.log");
        let child = std::process::Command::new(sluice_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .args(target_args(target, dir))
            .env("SLUICE_LOG", "sluice=debug,info")
            .stdout(std::fs::File::create(dir.join("server.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let base = wait_until("the server to say where it listens", || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.lines()
                .find_map(|line| line.strip_prefix("sluice listening on "))
                .map(str::to_string)
        })
        .await;
        // It answers once its migrations ran.
        wait_until("the server to answer", || async {
            let health = reqwest::get(format!("{base}/_health")).await;
            health.is_ok_and(|r| r.status().is_success()).then_some(())
        })
        .await;
        LoggedServer { child, base, log }
    }

    /// Stops it (SIGTERM, a clean shutdown) and returns its whole log.
    fn stop(mut self) -> Vec<u8> {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap();
        let log = std::fs::read(&self.log).unwrap();
        let mut out = std::fs::read(self.log.with_file_name("server.out")).unwrap();
        out.extend(log);
        out
    }
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With a data dir on PostgreSQL too, for the key file.
fn target_args(target: &Target, dir: &std::path::Path) -> Vec<String> {
    match target {
        Target::Sqlite(data) => vec!["--data-dir".into(), data.display().to_string()],
        Target::Postgres(url) => vec![
            "--database-url".into(),
            url.clone(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
        ],
    }
}

/// The project's API, keeping every response body it got.
struct RecordingApi {
    client: reqwest::Client,
    base: String,
    key: String,
    bodies: std::sync::Mutex<Vec<String>>,
}

impl RecordingApi {
    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        self.bodies.lock().unwrap().push(text.clone());
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn json(&self, method: Method, path: &str, body: Value) -> (u16, Value) {
        self.call(method, path, Some(body.to_string().into_bytes()))
            .await
    }

    /// Uploads and installs a destination; its id.
    async fn install(&self, plugin: &str, config: Value, delivery: Value) -> String {
        let (status, uploaded) = self
            .call(Method::POST, "/plugins", Some(common::wasm(plugin)))
            .await;
        assert!(status == 201, "{plugin}: {uploaded}");
        let (status, created) = self
            .json(
                Method::POST,
                "/plugin-configs",
                json!({"plugin_sha256": uploaded["sha256"], "config": config, "delivery": delivery}),
            )
            .await;
        assert_eq!(status, 201, "{plugin}: {created}");
        created["id"].as_str().unwrap().to_string()
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(Method::GET, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }
}

/// Secrets set through the API on several destinations, one failing with
/// a vendor that quotes its token and one whose URL (with a token in its
/// query string) does not answer, are found in none of: the database's
/// files or dump, any API response, the server's log, the plugin logs. The
/// destinations deliver with them all the same.
async fn a_delivery_run_leaves_no_secret_anywhere(backend: Backend) {
    use crate::hubspot::{FakeHubSpot, TOKEN};
    use crate::salesforce::{CLIENT_SECRET, FakeSalesforce, REFRESH_TOKEN};
    use crate::sendgrid::{API_KEY, FakeSendGrid};
    use crate::slack::{FakeSlack, SECRET as SLACK_SECRET};
    const QUOTED_TOKEN: &str = "pat-na1-quoted-0000-1111-2222-333333333333";
    const SIGNING_SECRET: &str = "hmac-signing-secret-24680";
    // Not a secret field, but reqwest prints the URL of a failed request.
    const QUERY_TOKEN: &str = "query-token-1357913579";

    let slack = FakeSlack::start();
    let hubspot = FakeHubSpot::start();
    let sendgrid = FakeSendGrid::start();
    let salesforce = FakeSalesforce::default();
    let salesforce_base = salesforce.start();
    let quoting = quoting_vendor();
    let unanswered_url = format!(
        "http://127.0.0.1:{}/hook?token={QUERY_TOKEN}",
        closed_port()
    );

    let dir = tempfile::tempdir().unwrap();
    let database = match backend {
        Backend::Postgres => Some(TestDatabase::create().await),
        Backend::Sqlite => None,
    };
    let target = match &database {
        Some(database) => Target::Postgres(database.url.clone()),
        None => Target::Sqlite(dir.path().join("data")),
    };
    let server = LoggedServer::start(&target, dir.path()).await;
    let project = create_project_on(&target);
    let api = RecordingApi {
        client: reqwest::Client::new(),
        base: format!(
            "{}/api/projects/{}",
            server.base,
            project["project_id"].as_str().unwrap()
        ),
        key: project["api_key"].as_str().unwrap().to_string(),
        bodies: Default::default(),
    };

    let fast = json!({"linger_ms": 0});
    let slack_id = api
        .install(
            "slack",
            json!({"webhook_url": slack.webhook_url(), "events": ["signed up"]}),
            fast.clone(),
        )
        .await;
    let hubspot_id = api
        .install(
            "hubspot",
            json!({"token": TOKEN, "base_url": hubspot.base}),
            fast.clone(),
        )
        .await;
    let sendgrid_id = api
        .install(
            "sendgrid",
            json!({"api_key": API_KEY, "base_url": sendgrid.base}),
            fast.clone(),
        )
        .await;
    let salesforce_id = api
        .install(
            "salesforce",
            crate::salesforce::config(&salesforce_base),
            fast.clone(),
        )
        .await;
    // Both failures dead-letter at their first attempt.
    let give_up = json!({"linger_ms": 0, "max_retry_seconds": 0});
    let quoting_id = api
        .install(
            "hubspot",
            json!({"token": QUOTED_TOKEN, "base_url": quoting}),
            give_up.clone(),
        )
        .await;
    let unanswered_id = api
        .install(
            "webhook",
            json!({"url": unanswered_url, "secret": SIGNING_SECRET}),
            give_up,
        )
        .await;
    // A refused change answers with an error too.
    let (status, _) = api
        .json(
            Method::PATCH,
            &format!("/plugin-configs/{hubspot_id}"),
            json!({"config": {"base_url": ATTACKER}}),
        )
        .await;
    assert_eq!(status, 400);

    let capture = reqwest::Client::new()
        .post(format!("{}/batch/", server.base))
        .header("content-type", "application/json")
        .body(
            json!({
                "api_key": project["capture_token"],
                "batch": [{
                    "event": "signed up",
                    "distinct_id": "user-1",
                    "properties": {"$set": {
                        "email": "ada@example.com",
                        "first_name": "Ada",
                        "last_name": "Lovelace",
                    }},
                }],
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(capture.status(), 200);

    // Delivered with the secrets: each vendor checks them.
    wait_until("every vendor to get the event", || async {
        (!slack.messages().is_empty()
            && !hubspot.contacts().is_empty()
            && !sendgrid.contacts().is_empty()
            && salesforce.count("Lead") == 1)
            .then_some(())
    })
    .await;
    assert!(salesforce.token_requests() > 0);
    let letters = wait_until("both failing destinations to dead-letter", || async {
        let letters = api.get("/dead-letters").await["results"]
            .as_array()
            .unwrap()
            .clone();
        let of = |id: &str| letters.iter().any(|l| l["plugin_config_id"] == id);
        (of(&quoting_id) && of(&unanswered_id)).then_some(letters)
    })
    .await;
    // The errors held the token and the URL's query, and were scrubbed.
    for letter in &letters {
        let error = letter["error"].as_str().unwrap();
        assert!(error.contains("[redacted]"), "{error}");
        assert!(!error.contains(QUERY_TOKEN), "{error}");
    }
    let paused = wait_until("the unanswered destination to pause", || async {
        let view = api.get(&format!("/destinations/{unanswered_id}")).await;
        (view["paused"] == true).then_some(view)
    })
    .await;
    for stored in [&paused["stats"]["last_error"], &paused["paused_reason"]] {
        assert!(
            stored
                .as_str()
                .is_some_and(|error| error.contains("?[redacted]") && !error.contains(QUERY_TOKEN)),
            "{paused}"
        );
    }
    let ids = [
        &slack_id,
        &hubspot_id,
        &sendgrid_id,
        &salesforce_id,
        &quoting_id,
        &unanswered_id,
    ];
    let mut plugin_logs = Vec::new();
    for id in ids {
        api.get(&format!("/destinations/{id}")).await;
        let logs = api.get(&format!("/plugin-configs/{id}/logs")).await;
        plugin_logs.push(logs.to_string());
    }
    api.get("/plugin-configs").await;
    assert!(
        plugin_logs.iter().any(|logs| logs.contains("[redacted]")),
        "the failures' log lines held a secret: {plugin_logs:?}"
    );
    for logs in &plugin_logs {
        assert!(!logs.contains(QUERY_TOKEN), "{logs}");
    }

    // The SQLite files as the running server leaves them (its WAL holds
    // the latest writes), and again once it stopped and copied the WAL
    // into the database.
    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    let read_data_dir = |places: &mut Vec<(String, Vec<u8>)>, when: &str| {
        if let Target::Sqlite(data) = &target {
            for entry in std::fs::read_dir(data).unwrap() {
                let path = entry.unwrap().path();
                if path.file_name().unwrap() != "secret.key" {
                    let name = format!("{} {when}", path.display());
                    places.push((name, std::fs::read(&path).unwrap()));
                }
            }
        }
    };
    read_data_dir(&mut places, "while serving");
    if matches!(target, Target::Sqlite(_)) {
        assert!(
            places
                .iter()
                .any(|(name, _)| name.contains("sluice.db-wal")),
            "the WAL is looked at too"
        );
    }
    let log = server.stop();
    read_data_dir(&mut places, "after stopping");
    places.push(("the server's log".into(), log));
    for (i, body) in api.bodies.lock().unwrap().iter().enumerate() {
        places.push((format!("API response #{i}"), body.clone().into_bytes()));
    }
    for logs in plugin_logs {
        places.push(("plugin logs".into(), logs.into_bytes()));
    }
    if let Target::Postgres(url) = &target {
        let dump = std::process::Command::new("pg_dump")
            .arg("--dbname")
            .arg(url)
            .output()
            .unwrap();
        assert!(
            dump.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&dump.stderr)
        );
        assert!(
            String::from_utf8_lossy(&dump.stdout).contains("plugin_configs"),
            "the dump holds the configs"
        );
        places.push(("the database dump".into(), dump.stdout));
    }
    let secrets = [
        SLACK_SECRET,
        TOKEN,
        API_KEY,
        REFRESH_TOKEN,
        CLIENT_SECRET,
        QUOTED_TOKEN,
        SIGNING_SECRET,
    ];
    for (place, bytes) in &places {
        for secret in secrets {
            assert!(
                !contains(bytes, secret.as_bytes()),
                "{place} holds the secret {secret}"
            );
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The stored config of a plugin config, as the database holds it.
async fn stored_config(server: &TestServer, id: &str) -> String {
    use sqlx::Connection;
    let sql = "SELECT config FROM plugin_configs WHERE id = $1";
    match &server.store {
        StoreConfig::Sqlite { data_dir } => {
            let url = format!("sqlite://{}", data_dir.join("sluice.db").display());
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query_scalar(&sql.replace("$1", "?"))
                .bind(id)
                .fetch_one(&mut conn)
                .await
                .unwrap()
        }
        StoreConfig::Postgres { url } => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query_scalar(sql)
                .bind(id)
                .fetch_one(&mut conn)
                .await
                .unwrap()
        }
    }
}

/// The key a test server made on its first start.
fn key_file_of(server: &TestServer) -> (std::path::PathBuf, Keyring) {
    let path = server.dir.path().join(KEY_FILE);
    let keyring = Keyring::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (path, keyring)
}

fn key_source(file: &std::path::Path) -> KeySource {
    KeySource {
        key: None,
        file: file.to_path_buf(),
    }
}

const WEBHOOK_SECRET: &str = "hmac-key-sealed-123456";

async fn a_server_without_the_sealing_key_refuses_to_start_and_names_it(backend: Backend) {
    let server = TestServer::start(backend).await;
    let id = install(
        &server,
        "webhook",
        json!({"url": "https://hooks.example.com/in", "secret": WEBHOOK_SECRET}),
    )
    .await;
    let stored = stored_config(&server, &id).await;
    assert!(!stored.contains(WEBHOOK_SECRET), "{stored}");
    assert!(stored.contains("\"sealed\""), "{stored}");
    let (file, keyring) = key_file_of(&server);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only its owner reads the key file");
    }

    // A second server of the same database without the key: no new key
    // is made, and the error says which key is needed and where.
    let elsewhere = tempfile::tempdir().unwrap();
    let missing = elsewhere.path().join(KEY_FILE);
    let store = open_store(&server.store).await.unwrap();
    let err = store
        .load_secret_key(&key_source(&missing))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(keyring.current_id()), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(!missing.exists(), "no second key was made");

    // With another key: refused too, naming both.
    let (other, other_text) = Keyring::generate();
    std::fs::write(&missing, &other_text).unwrap();
    let err = store
        .load_secret_key(&key_source(&missing))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(keyring.current_id()) && err.contains(other.current_id()),
        "{err}"
    );
    // With the key: it starts.
    store.load_secret_key(&key_source(&file)).await.unwrap();
    store.close().await;

    // The key lost for good: its values are dropped, to be given again,
    // and a server starts with another key.
    let store = open_store(&server.store).await.unwrap();
    let dropped = store.forget_secret_key(keyring.current_id()).await.unwrap();
    assert_eq!(dropped, vec![(id.clone(), "secret".to_string())]);
    store.load_secret_key(&key_source(&missing)).await.unwrap();
    store.close().await;
    let view = server.plugin_config_view(&id).await;
    assert_eq!(view["secrets_set"], json!([]), "{view}");
}

async fn a_server_with_another_key_refuses_to_start_before_anything_is_sealed(backend: Backend) {
    // The first server registered the key it made.
    let server = TestServer::start(backend).await;
    server.wait_ready(200, "the server to start").await;
    let (_, keyring) = key_file_of(&server);
    let (other, other_text) = Keyring::generate();
    let file = server.dir.path().join("other.key");
    std::fs::write(&file, &other_text).unwrap();
    let store = open_store(&server.store).await.unwrap();
    let err = store
        .load_secret_key(&key_source(&file))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(keyring.current_id()) && err.contains(other.current_id()),
        "{err}"
    );
    store.close().await;
}

async fn rotating_the_key_seals_every_secret_under_the_new_one(backend: Backend) {
    let server = TestServer::start(backend).await;
    let id = install(
        &server,
        "webhook",
        json!({"url": "https://hooks.example.com/in", "secret": WEBHOOK_SECRET}),
    )
    .await;
    let (file, old) = key_file_of(&server);
    let old_text = std::fs::read_to_string(&file).unwrap();
    let (new, new_text) = Keyring::generate();
    let both = server.dir.path().join("rotated.key");
    std::fs::write(&both, format!("{new_text}\n{old_text}")).unwrap();

    // As the operator runs it, against the database.
    let mut rotate = std::process::Command::new(sluice_bin());
    rotate
        .args(["secrets", "rotate", "--secret-key-file"])
        .arg(&both);
    match &server.store {
        StoreConfig::Sqlite { data_dir } => rotate.arg("--data-dir").arg(data_dir),
        StoreConfig::Postgres { url } => rotate.arg("--database-url").arg(url),
    };
    let out = rotate.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rotated["key_id"], new.current_id(), "{rotated}");
    assert_eq!(rotated["resealed"], 1, "{rotated}");

    let stored = stored_config(&server, &id).await;
    assert!(stored.contains(new.current_id()), "{stored}");
    assert!(!stored.contains(old.current_id()), "{stored}");
    // The new key alone now opens everything; the old one alone does not.
    let only_new = server.dir.path().join("new.key");
    std::fs::write(&only_new, &new_text).unwrap();
    let store = open_store(&server.store).await.unwrap();
    store.load_secret_key(&key_source(&only_new)).await.unwrap();
    let err = open_store(&server.store)
        .await
        .unwrap()
        .load_secret_key(&key_source(&file))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(new.current_id()), "{err}");
    // The config still opens to what was set.
    let config = store
        .plugin_config(&server.project.project_id, &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.open_config(&config).unwrap()["secret"],
        WEBHOOK_SECRET
    );
    store.close().await;
}

async fn secrets_stored_in_plain_text_are_sealed_at_start(backend: Backend) {
    let server = TestServer::start(backend).await;
    let id = install(
        &server,
        "webhook",
        json!({"url": "https://hooks.example.com/in", "secret": WEBHOOK_SECRET}),
    )
    .await;
    // As an earlier version stored it.
    let plain = json!({"url": "https://hooks.example.com/in", "secret": "plain-secret-987654"});
    server
        .execute_sql(&format!(
            "UPDATE plugin_configs SET config = '{plain}' WHERE id = '{id}'"
        ))
        .await;
    let (file, _) = key_file_of(&server);
    let store = open_store(&server.store).await.unwrap();
    let loaded = store.load_secret_key(&key_source(&file)).await.unwrap();
    assert_eq!(loaded.sealed, 1);
    let stored = stored_config(&server, &id).await;
    assert!(!stored.contains("plain-secret-987654"), "{stored}");
    let config = store
        .plugin_config(&server.project.project_id, &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.open_config(&config).unwrap()["secret"],
        "plain-secret-987654"
    );
    store.close().await;
}

on_both_backends!(
    a_delivery_run_leaves_no_secret_anywhere,
    a_server_without_the_sealing_key_refuses_to_start_and_names_it,
    a_server_with_another_key_refuses_to_start_before_anything_is_sealed,
    rotating_the_key_seals_every_secret_under_the_new_one,
    secrets_stored_in_plain_text_are_sealed_at_start,
);
