//! `serve(config, listener, shutdown)`: the whole server. It opens the store,
//! starts the pipeline worker, delivery and the scheduler, and serves the HTTP API until `shutdown`
//! resolves, then stops accepting, lets the worker finish its batch and
//! gives back its leases.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::capture::{GroupCommit, TokenCache};
use crate::query::QueryLimits;
use crate::queue::QueueGauge;
use crate::runtime::{Policy, Runtime, RuntimeConfig};
use crate::store::{DEFAULT_LEASE, Store, StoreConfig};
use crate::{api, capture, delivery, pipeline, queue};

/// Everything `sluice serve` is configured with.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub store: StoreConfig,
    /// Largest request body, compressed or not.
    pub max_body_bytes: usize,
    /// Capture answers 503 once this many events wait in the queue.
    pub max_queue_depth: i64,
    /// Capture answers 503 once the oldest queued event has waited this
    /// long: the pipeline is behind, and acknowledging more would promise
    /// what it cannot store soon.
    pub max_queue_age: Duration,
    /// Record the client address as `$ip`.
    pub record_ip: bool,
    /// What plugins may do; see `runtime::Policy`.
    pub policy: Policy,
    /// How long a worker holds claimed queue rows before another process may
    /// take them over.
    pub lease: Duration,
    /// What one analytics query may cost.
    pub query_limits: QueryLimits,
}

impl ServeConfig {
    pub fn with_data_dir(data_dir: PathBuf) -> Self {
        ServeConfig {
            store: StoreConfig::Sqlite { data_dir },
            max_body_bytes: 20 << 20,
            max_queue_depth: 1_000_000,
            max_queue_age: Duration::from_secs(30),
            record_ip: true,
            policy: Policy::default(),
            lease: DEFAULT_LEASE,
            query_limits: QueryLimits::default(),
        }
    }
}

/// Shared by the handlers and the worker. Small on purpose.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<ServeConfig>,
    /// The capture queue's depth and oldest age, cheap enough to check on
    /// every request.
    pub queue: Arc<QueueGauge>,
    /// Where capture writes: concurrent requests share commits.
    pub commit: GroupCommit,
    pub tokens: TokenCache,
    pub wake_worker: Arc<Notify>,
    /// Wakes idle delivery lanes when events reach an outbox.
    pub wake_delivery: Arc<Notify>,
    pub runtime: Runtime,
}

/// Opens the store named by `config`, running migrations.
pub async fn open_store(config: &StoreConfig) -> anyhow::Result<Store> {
    Store::open(config).await
}

pub async fn serve(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = open_store(&config.store).await?;
    let queue = Arc::new(QueueGauge::default());
    queue.set(store.queue_status().await?);
    let runtime = Runtime::new(RuntimeConfig {
        policy: config.policy.clone(),
        ..RuntimeConfig::default()
    })?;
    let state = AppState {
        store: store.clone(),
        config: Arc::new(config),
        queue,
        commit: GroupCommit::start(store.clone()),
        tokens: TokenCache::default(),
        wake_worker: Arc::new(Notify::new()),
        wake_delivery: Arc::new(Notify::new()),
        runtime,
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(pipeline::run_worker(state.clone(), stop_rx.clone()));
    let delivery = tokio::spawn(delivery::run_delivery(state.clone(), stop_rx.clone()));
    let scheduler = tokio::spawn(delivery::run_scheduler(state.clone(), stop_rx.clone()));
    let checkpoints = tokio::spawn(store.clone().run_checkpoints(stop_rx.clone()));
    let monitor = tokio::spawn(queue::run_monitor(
        store.clone(),
        state.queue.clone(),
        state.config.max_queue_age,
        stop_rx,
    ));

    let app = Router::new()
        .route("/_health", get(|| async { "ok" }))
        .merge(capture::router())
        .merge(api::router())
        .with_state(state.clone());
    tracing::info!(addr = %listener.local_addr()?, "sluice is serving");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;

    let _ = stop_tx.send(true);
    state.wake_worker.notify_one();
    worker.await??;
    delivery.await??;
    scheduler.await??;
    monitor.await?;
    checkpoints.await?;
    tracing::info!(queued = state.queue.depth(), "sluice stopped");
    store.close().await;
    Ok(())
}
