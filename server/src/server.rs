//! `serve(config, listener, shutdown)`: the composition root. It answers
//! 503 to every request while it starts, opens the store, hands each part of the server the handles it needs, runs the
//! background tasks under a `Supervisor` beside the HTTP listener until
//! `shutdown` resolves, then answers `/_ready` with 503, waits the
//! configured shutdown delay, stops accepting, lets the worker finish its
//! batch and gives back its leases.
//!
//! Nothing else in the crate imports this module.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tower::ServiceExt;
use utoipa::OpenApi;

use crate::api::ApiState;
use crate::capture::CaptureState;
pub use crate::config::ServeConfig;
use crate::configs::ConfigWatch;
use crate::delivery::Delivery;
use crate::listener::Limited;
use crate::metrics::{Metrics, MetricsState};
use crate::pipeline::Worker;
use crate::query::{QuerySlots, WAIT_FOR_A_SLOT};
use crate::queue::{QueueGauge, Wakeups};
use crate::quotas::QuotaBook;
use crate::retention::Retention;
use crate::runtime::{ProjectQuotas, Runtime, RuntimeConfig};
use crate::scheduler::Scheduler;
use crate::state::AppState;
use crate::store::{Backend, KeySource, Store, StoreConfig};
use crate::supervisor::{Readiness, Supervisor, task};
use crate::{api, capture, delivery, metrics, pipeline, queue, retention, scheduler};

/// How long `/_ready` waits for the database.
const READY_PING: Duration = Duration::from_secs(2);

/// Opens the store named by `config`, running migrations.
pub async fn open_store(config: &StoreConfig) -> anyhow::Result<Store> {
    Store::open(config).await
}

pub async fn serve(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let readiness = Arc::new(Readiness::default());
    let shutdown = {
        let (readiness, delay) = (readiness.clone(), config.shutdown_delay);
        async move {
            shutdown.await;
            readiness.stopping();
            if !delay.is_zero() {
                tracing::warn!(
                    "shutting down in {} s; /_ready answers 503 meanwhile",
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
            }
        }
    };
    // Served from the start, so `/_ready` says why the server is not ready
    // while migrations run, rather than leaving requests unanswered; the
    // routes come once everything they need is open.
    let served_routes = Arc::new(OnceLock::new());
    tracing::info!(addr = %listener.local_addr()?, "sluice is serving");
    let listener = Limited::new(listener, config.max_connections);
    let server = crate::listener::serve(
        listener,
        front(served_routes.clone()),
        config.header_timeout,
        shutdown,
    );
    let mut server = AbortOnDrop(tokio::spawn(server));

    // One reader per query slot, and one for the events list.
    let store = Store::open_with_readers(&config.store, config.max_concurrent_queries + 1).await?;
    load_secret_key(&store, &config.secret_key).await?;
    let config = Arc::new(config);
    let gauge = Arc::new(QueueGauge::default());
    gauge.set(store.queue_status().await?);
    gauge.set_projects(store.queue_status_by_project().await?);
    let quotas = QuotaBook::new(config.quotas.clone());
    quotas.refresh(&store).await?;
    let runtime = Runtime::new(RuntimeConfig {
        policy: config.policy.clone(),
        quotas: ProjectQuotas::new({
            let quotas = quotas.clone();
            move |project_id| quotas.get(project_id)
        }),
        ..RuntimeConfig::default()
    })?;
    let wake = Wakeups::default();
    let configs = ConfigWatch::default();
    let metrics = Arc::new(Metrics::new());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Supervisor::new(readiness.clone(), stop_rx);
    tasks.spawn("config watcher", {
        let (configs, store) = (configs.clone(), store.clone());
        task(move |health, stop| configs.clone().run(store.clone(), health, stop))
    });
    tasks.spawn("quotas", {
        let (quotas, store) = (quotas.clone(), store.clone());
        task(move |health, stop| quotas.clone().run(store.clone(), health, stop))
    });
    let worker = Worker {
        store: store.clone(),
        runtime: runtime.clone(),
        configs: configs.clone(),
        queue: gauge.clone(),
        wake: wake.clone(),
        lease: config.lease,
        quotas: quotas.clone(),
        metrics: metrics.clone(),
    };
    tasks.spawn(
        "pipeline worker",
        task(move |health, stop| pipeline::run_worker(worker.clone(), health, stop)),
    );
    let delivery = Delivery {
        store: store.clone(),
        runtime: runtime.clone(),
        configs: configs.clone(),
        wake: wake.clone(),
        lease: config.lease,
        quotas: quotas.clone(),
        metrics: metrics.clone(),
    };
    tasks.spawn(
        "delivery",
        task(move |health, stop| delivery::run_delivery(delivery.clone(), health, stop)),
    );
    let scheduler = Scheduler {
        store: store.clone(),
        runtime: runtime.clone(),
        configs: configs.clone(),
        metrics: metrics.clone(),
    };
    tasks.spawn(
        "scheduler",
        task(move |health, stop| scheduler::run_scheduler(scheduler.clone(), health, stop)),
    );
    let retention = Retention {
        store: store.clone(),
        quotas: quotas.clone(),
        period: config.retention_period,
    };
    tasks.spawn(
        "retention",
        task(move |health, stop| retention::run_retention(retention.clone(), health, stop)),
    );
    tasks.spawn("queue monitor", {
        let (store, gauge, max_age) = (store.clone(), gauge.clone(), config.max_queue_age);
        task(move |health, stop| {
            health.ready();
            let (store, gauge) = (store.clone(), gauge.clone());
            async move {
                queue::run_monitor(store, gauge, max_age, stop).await;
                Ok(())
            }
        })
    });
    tasks.spawn("metrics sampler", {
        let (metrics, store, configs) = (metrics.clone(), store.clone(), configs.clone());
        task(move |health, stop| {
            metrics::run_sampler(
                metrics.clone(),
                store.clone(),
                configs.clone(),
                health,
                stop,
            )
        })
    });
    if store.backend() == Backend::Sqlite {
        tasks.spawn("checkpoints", {
            let store = store.clone();
            task(move |health, stop| {
                health.ready();
                let store = store.clone();
                async move {
                    store.run_checkpoints(stop).await;
                    Ok(())
                }
            })
        });
    }

    let capture = CaptureState::new(
        store.clone(),
        config.clone(),
        gauge.clone(),
        quotas.clone(),
        wake.clone(),
    );
    let state = AppState {
        api: ApiState {
            tokens: capture.tokens.clone(),
            store: store.clone(),
            runtime,
            query_limits: config.query_limits,
            queries: QuerySlots::new(config.max_concurrent_queries, WAIT_FOR_A_SLOT),
            queue: gauge.clone(),
            max_queue_depth: config.max_queue_depth,
            wake: wake.clone(),
            configs,
            quotas: quotas.clone(),
            checks: Default::default(),
            keys: api::KeyUse::new(config.api_requests_per_second),
        },
        capture,
        readiness,
        metrics: MetricsState {
            metrics: metrics.clone(),
            queue: gauge.clone(),
            allow: config.metrics_allow.clone().into(),
            trusted_proxies: config.trusted_proxies.clone().into(),
        },
    };
    let app = routes(&config, metrics.clone())
        .layer(axum::middleware::from_fn(api::error::uniform_errors))
        .with_state(state);
    let _ = served_routes.set(app);
    let served = loop {
        tokio::select! {
            served = &mut server.0 => break served,
            _ = tasks.watch() => {}
        }
    };

    let _ = stop_tx.send(true);
    wake.worker.notify_one();
    tasks.shutdown().await;
    tracing::info!(queued = gauge.depth(), "sluice stopped");
    store.close().await;
    served?;
    Ok(())
}

/// The server's outermost router: the routes once they are set, and until
/// then 503 to every request, `/_health` and `/_ready` included (tools wait
/// for `/_health` before they use the server, and its store).
fn front(routes: Arc<OnceLock<Router>>) -> Router {
    Router::new().fallback(move |request: Request| {
            let routes = routes.clone();
            async move {
                match routes.get() {
                    Some(routes) => routes.clone().oneshot(request).await.into_response(),
                    None => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(axum::http::header::RETRY_AFTER, "1")],
                        Json(json!({
                            "status": "starting",
                            "detail": "the server is starting: it opens the database and runs its migrations; retry shortly",
                        })),
                    )
                        .into_response(),
                }
            }
    })
}

/// The HTTP server's task, ended if `serve` returns early (the store did
/// not open), so no server is left answering 503 for ever.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Loads the key that seals secret config values, saying where a new one
/// was written: the operator must back it up.
async fn load_secret_key(store: &Store, source: &KeySource) -> anyhow::Result<()> {
    let loaded = store.load_secret_key(source).await?;
    if let Some(path) = &loaded.generated {
        tracing::warn!(
            key_id = %loaded.ids[0],
            "made a new secret key in {}; back it up with the database (without it, stored secrets cannot be read), and give the same key to every server of this database",
            path.display()
        );
    } else {
        tracing::info!(keys = %loaded.ids.join(", "), "loaded the secret key");
    }
    if loaded.sealed > 0 {
        tracing::info!(
            sealed = loaded.sealed,
            "sealed secret config values stored in plain text by an earlier version"
        );
    }
    Ok(())
}

/// Every route of the server. An unknown route gets the API's error shape
/// here, a method a route does not serve in `api::error::uniform_errors`; `tests::every_route_is_documented` holds this table and
/// [`openapi`] to the same routes.
fn routes(config: &ServeConfig, metrics: Arc<Metrics>) -> Router<AppState> {
    Router::new()
        .route("/_health", get(health))
        .route("/_ready", get(ready))
        .route("/metrics", get(metrics::scrape))
        .route("/api/openapi.json", get(openapi_json))
        .merge(capture::router(config, metrics))
        .merge({
            let timeout = config.api_body_timeout;
            api::router().layer(axum::middleware::from_fn(move |request, next| {
                api::slow::bound_body(timeout, request, next)
            }))
        })
        .fallback(api::error::unknown_route)
}

/// The routes this module serves itself, for the OpenAPI document.
#[derive(OpenApi)]
#[openapi(paths(health, ready, openapi_json, metrics::scrape))]
struct Operations;

/// The OpenAPI document of every route: capture, `/api`, and these.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api::openapi::document();
    doc.merge(capture::document());
    doc.merge(Operations::openapi());
    doc
}

/// `GET /api/openapi.json`: needs no key, so clients and tools can read it
/// before they have one. Built once: it depends on the code alone.
#[utoipa::path(get, path = "/api/openapi.json", tag = "operations",
    responses((status = 200, description = "This OpenAPI 3 document.", body = Object)))]
async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DOCUMENT.get_or_init(|| {
        serde_json::to_string(&openapi()).expect("the OpenAPI document serialises")
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        text.as_str(),
    )
        .into_response()
}

/// `GET /_health`: the process is up.
#[utoipa::path(get, path = "/_health", tag = "operations",
    responses((status = 200, description = "`ok`", body = String, content_type = "text/plain")))]
async fn health() -> &'static str {
    "ok"
}

/// What `/_ready` answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
struct ReadyStatus {
    /// `ready` or `not ready`.
    status: String,
    /// `ok`, or why the database did not answer (when not ready).
    database: Option<String>,
    /// The background tasks that are not working, and why, by name (when
    /// not ready).
    #[schema(value_type = Option<Object>)]
    tasks: Option<serde_json::Value>,
}

/// `GET /_ready`: 200 once the database answers and every background task
/// works; otherwise 503 naming what does not, and 503 from the moment the
/// server is told to stop.
#[utoipa::path(get, path = "/_ready", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve.", body = ReadyStatus),
        (status = 503, description = "Not ready: starting, shutting down, or the database or a background task is not working.", body = ReadyStatus)))]
async fn ready(State(state): State<AppState>) -> Response {
    if state.readiness.is_stopping() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    let database = match tokio::time::timeout(READY_PING, state.api.store.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(format!("the database did not answer: {err}")),
        Err(_) => Some(format!(
            "the database did not answer within {} s",
            READY_PING.as_secs()
        )),
    };
    let tasks = state.readiness.not_ready();
    if database.is_none() && tasks.is_empty() {
        return Json(json!({"status": "ready"})).into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "status": "not ready",
            "database": database.unwrap_or_else(|| "ok".into()),
            "tasks": tasks,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use tower::ServiceExt;

    /// The paths and methods the router serves, read from its `Debug`
    /// text: axum has no other way to list them. The shape read is
    /// axum 0.8's (`RouteId(n): MethodRouter { get: .., post: .. }` and
    /// `RouteId(n): "/path"`); if it changes, this finds no route and fails.
    fn served(router: &Router<AppState>) -> BTreeMap<String, BTreeSet<String>> {
        let text = format!("{router:?}");
        let text = text
            .split_once("fallback_router:")
            .map_or(text.as_str(), |(routes, _)| routes);
        let endpoint = regex::Regex::new(
            r"RouteId\((\d+)\): MethodRouter\(MethodRouter \{ get: (\w+).*?, delete: (\w+).*?, patch: (\w+).*?, post: (\w+).*?, put: (\w+)",
        )
        .unwrap();
        let path = regex::Regex::new(r#"RouteId\((\d+)\): "([^"]*)""#).unwrap();
        let mut methods: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for found in endpoint.captures_iter(text) {
            let served = ["get", "delete", "patch", "post", "put"]
                .iter()
                .zip(2..)
                .filter(|(_, group)| &found[*group] != "None")
                .map(|(name, _)| name.to_string())
                .collect();
            methods.insert(found[1].to_string(), served);
        }
        path.captures_iter(text)
            .map(|found| {
                let methods = methods.get(&found[1]).cloned().unwrap_or_default();
                (found[2].to_string(), methods)
            })
            .collect()
    }

    /// A route added to the router and not to the document (or the other
    /// way round) fails here.
    #[test]
    fn every_route_is_documented() {
        let router = routes(
            &ServeConfig::with_data_dir("unused".into()),
            Arc::new(Metrics::new()),
        );
        let served = served(&router);
        assert!(
            served.len() > 20 && served["/_health"].contains("get"),
            "the router's routes were not read: {served:?}"
        );
        let documented = api::openapi::methods_by_path(&openapi());
        for (path, methods) in &served {
            assert_eq!(
                documented.get(path),
                Some(methods),
                "{path} serves {methods:?}; add its #[utoipa::path] to the document"
            );
        }
        for path in documented.keys() {
            assert!(
                served.contains_key(path),
                "{path} is documented, not served"
            );
        }
    }

    async fn fetch(front: &Router, path: &str) -> (StatusCode, String) {
        let request = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = front.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn while_starting_every_path_answers_503_then_the_routes_answer() {
        let routes = Arc::new(OnceLock::new());
        let front = front(routes.clone());
        for path in ["/_ready", "/_health", "/batch"] {
            let (status, body) = fetch(&front, path).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert!(body.contains("migrations"), "{body}");
        }
        let _ = routes.set(Router::new().route("/_ready", get(|| async { "ready" })));
        assert_eq!(
            fetch(&front, "/_ready").await,
            (StatusCode::OK, "ready".into())
        );
        assert_eq!(fetch(&front, "/_health").await.0, StatusCode::NOT_FOUND);
    }
}
