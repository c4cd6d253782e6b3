//! The real server in the test's process, on an ephemeral port, on either
//! backend, with two projects; and waits on what it reports.

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice::server::{ServeConfig, open_store, serve};
use sluice::store::{Backend, CreatedProject, StoreConfig};

use super::postgres::TestDatabase;

/// How long a wait on the server's state may take before the test fails:
/// generous, since it bounds a hang, not a speed.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct TestServer {
    pub base: String,
    pub project: CreatedProject,
    pub other: CreatedProject,
    pub client: reqwest::Client,
    pub store: StoreConfig,
    /// The data dir on SQLite.
    pub dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
    _database: Option<TestDatabase>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> TestServer {
        TestServer::start_with(backend, |config| config).await
    }

    pub async fn start_with(
        backend: Backend,
        config: impl FnOnce(ServeConfig) -> ServeConfig,
    ) -> TestServer {
        TestServer::start_in("UTC", backend, config).await
    }

    /// A server whose first project keeps time in `timezone`.
    pub async fn start_in(
        timezone: &str,
        backend: Backend,
        config: impl FnOnce(ServeConfig) -> ServeConfig,
    ) -> TestServer {
        // Server logs show up under failing tests.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut base_config = ServeConfig::with_data_dir(dir.path().to_path_buf());
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let database = TestDatabase::create().await;
                base_config.store = StoreConfig::Postgres {
                    url: database.url.clone(),
                };
                Some(database)
            }
        };
        let config = config(base_config);
        let store_config = config.store.clone();
        let store = open_store(&config.store).await.unwrap();
        let project = store.create_project_in("test", timezone).await.unwrap();
        let other = store.create_project("other").await.unwrap();
        store.close().await;
        // The listener is bound here and handed over, so no other test can
        // take the port between choosing and binding it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            serve(config, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        // The server answers 503 to everything while it opens its store.
        let client = reqwest::Client::new();
        wait_until("the server to start", || async {
            let health = client.get(format!("{base}/_health")).send().await;
            health.is_ok_and(|r| r.status() == 200).then_some(())
        })
        .await;
        TestServer {
            base,
            project,
            other,
            client,
            store: store_config,
            dir,
            _stop: stop,
            _database: database,
        }
    }

    /// The PostgreSQL database's URL; `None` on SQLite.
    pub fn database_url(&self) -> Option<&str> {
        match &self.store {
            StoreConfig::Postgres { url } => Some(url),
            StoreConfig::Sqlite { .. } => None,
        }
    }

    /// A request to the project's API with its key; the status and the
    /// JSON body (or the text, as a JSON string).
    pub async fn call_api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call_api_raw(method, path, body.map(|body| body.to_string().into_bytes()))
            .await
    }

    /// [`TestServer::call_api`] with a body sent as it is, malformed or not.
    pub async fn call_api_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        self.call_api_raw_as(&self.project, method, path, body)
            .await
    }

    /// [`TestServer::call_api`] for `project`, with its own key.
    pub async fn call_api_as(
        &self,
        project: &CreatedProject,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call_api_raw_as(
            project,
            method,
            path,
            body.map(|body| body.to_string().into_bytes()),
        )
        .await
    }

    async fn call_api_raw_as(
        &self,
        project: &CreatedProject,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let url = format!("{}/api/projects/{}{path}", self.base, project.project_id);
        let mut request = self
            .client
            .request(method, url)
            .bearer_auth(&project.api_key);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        read(request.send().await.unwrap()).await
    }

    pub async fn get_path(&self, path: &str) -> (u16, Value) {
        read(
            self.client
                .get(format!("{}{path}", self.base))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Uploads a built plugin and installs it in the project with `config`
    /// and a failure policy; the install as the API shows it.
    pub async fn upload_and_install(&self, plugin: &str, config: Value, policy: &str) -> Value {
        self.upload_and_install_as(&self.project, plugin, config, policy)
            .await
    }

    /// [`TestServer::upload_and_install`] in `project`.
    pub async fn upload_and_install_as(
        &self,
        project: &CreatedProject,
        plugin: &str,
        config: Value,
        policy: &str,
    ) -> Value {
        let response = self
            .client
            .post(format!(
                "{}/api/projects/{}/plugins",
                self.base, project.project_id
            ))
            .bearer_auth(&project.api_key)
            .header("content-type", "application/wasm")
            .body(super::wasm(plugin))
            .send()
            .await
            .unwrap();
        let (status, uploaded) = read(response).await;
        assert_eq!(status, 201, "{uploaded}");
        let (status, created) = self
            .call_api_as(
                project,
                reqwest::Method::POST,
                "/plugin-configs",
                Some(serde_json::json!({
                    "plugin_sha256": uploaded["sha256"],
                    "config": config,
                    "failure_policy": policy,
                })),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        created
    }

    /// Sends PostHog batch events with the project's capture token.
    pub async fn capture_batch(&self, events: Value) -> (u16, Value) {
        self.capture_batch_as(&self.project, events).await
    }

    /// Sends PostHog batch events with `project`'s capture token.
    pub async fn capture_batch_as(&self, project: &CreatedProject, events: Value) -> (u16, Value) {
        read(
            self.client
                .post(format!("{}/batch/", self.base))
                .header("content-type", "application/json")
                .body(
                    serde_json::json!({
                        "api_key": project.capture_token,
                        "batch": events,
                    })
                    .to_string(),
                )
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Waits until `/_ready` answers `status`; its body.
    pub async fn wait_ready(&self, status: u16, why: &str) -> Value {
        wait_until(why, || async {
            let (now, body) = self.get_path("/_ready").await;
            (now == status).then_some(body)
        })
        .await
    }

    /// Waits until the events API holds at least `n` events; them.
    pub async fn wait_events(&self, n: usize) -> Vec<Value> {
        self.wait_events_of(&self.project, n).await
    }

    /// Waits until `project` has at least `n` events stored; them.
    pub async fn wait_events_of(&self, project: &CreatedProject, n: usize) -> Vec<Value> {
        wait_until(
            &format!("{n} events of {} to be stored", project.project_id),
            || async {
                let (status, body) = self
                    .call_api_as(project, reqwest::Method::GET, "/events?limit=1000", None)
                    .await;
                assert_eq!(status, 200, "{body}");
                let results = body["results"].as_array().unwrap().clone();
                (results.len() >= n).then_some(results)
            },
        )
        .await
    }
}

impl TestServer {
    /// Runs one statement on the server's database behind its back, as a
    /// failure or an old version would leave it.
    pub async fn execute_sql(&self, sql: &str) {
        use sqlx::Connection;
        match &self.store {
            StoreConfig::Sqlite { data_dir } => {
                let url = format!("sqlite://{}", data_dir.join("sluice.db").display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::query(sql).execute(&mut conn).await.unwrap();
            }
            StoreConfig::Postgres { url } => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::query(sql).execute(&mut conn).await.unwrap();
            }
        }
    }

    /// One of the project's plugin configs as the API shows it.
    pub async fn plugin_config_view(&self, id: &str) -> Value {
        let (status, configs) = self
            .call_api(reqwest::Method::GET, "/plugin-configs", None)
            .await;
        assert_eq!(status, 200, "{configs}");
        configs["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|config| config["id"] == id)
            .unwrap_or_else(|| panic!("no plugin config {id}: {configs}"))
            .clone()
    }

    /// Sets `project`'s quota overrides in the store as the operator does
    /// (`sluice project quotas`), and waits until the server applies them.
    pub async fn set_quotas(&self, project: &CreatedProject, overrides: Value) {
        let store = open_store(&self.store).await.unwrap();
        assert!(
            store
                .set_project_quota_overrides(&project.project_id, Some(&overrides.to_string()))
                .await
                .unwrap(),
            "no project {}",
            project.project_id
        );
        store.close().await;
        wait_until("the server to apply the quota overrides", || async {
            let (status, body) = self
                .call_api_as(project, reqwest::Method::GET, "/quotas", None)
                .await;
            assert_eq!(status, 200, "{body}");
            overrides
                .as_object()
                .unwrap()
                .iter()
                .all(|(name, value)| body["quotas"][name] == *value)
                .then_some(())
        })
        .await;
    }
}

/// A response's status, `Retry-After` and JSON body (or text, as a JSON
/// string): what a refusal is checked by.
pub async fn answer(response: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = response.text().await.unwrap();
    (
        status,
        retry_after,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn read(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Asks `check` again until it gives a value, failing the test after
/// [`PATIENCE`] with what it waited for. Each ask is a request to the
/// server, so this waits on the state itself, never for a guessed time.
pub async fn wait_until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "waited {} s for {what}",
            PATIENCE.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
