//! Delivery visibility and control: each destination's counts, last error,
//! recent attempts and log; pause and resume; dead letters and their
//! replay.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiState;
use super::plugins::public_view;
use super::{ApiError, ApiPath, ApiQuery, Authorised, Read, Write};
use crate::model::quotas::Hit;
use crate::store::{PluginConfig, ReplaySelector};

pub(super) fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    ApiState: axum::extract::FromRef<S>,
{
    Router::new()
        .route("/api/projects/{project_id}/destinations", get(list))
        .route(
            "/api/projects/{project_id}/destinations/{config_id}",
            get(show),
        )
        .route(
            "/api/projects/{project_id}/destinations/{config_id}/pause",
            post(pause),
        )
        .route(
            "/api/projects/{project_id}/destinations/{config_id}/resume",
            post(resume),
        )
        .route("/api/projects/{project_id}/dead-letters", get(dead_letters))
        .route(
            "/api/projects/{project_id}/dead-letters/replay",
            post(replay),
        )
}

async fn destination(
    state: &ApiState,
    project_id: &str,
    config_id: &str,
) -> Result<PluginConfig, ApiError> {
    state
        .store
        .plugin_config(project_id, config_id)
        .await?
        .filter(PluginConfig::is_destination)
        .ok_or_else(|| ApiError::NotFound(format!("destination {config_id}")))
}

async fn summary(state: &ApiState, config: &PluginConfig) -> Result<Value, ApiError> {
    let mut view = public_view(config);
    view["stats"] = json!(state.store.destination_stats(&config.id).await?);
    Ok(view)
}

/// `GET /api/projects/{id}/destinations`: every destination install with
/// its counts.
async fn list(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
) -> Result<Json<Value>, ApiError> {
    let mut results = Vec::new();
    for config in state.store.plugin_configs(&project_id).await? {
        if config.is_destination() {
            results.push(summary(&state, &config).await?);
        }
    }
    Ok(Json(json!({"results": results})))
}

/// `GET /api/projects/{id}/destinations/{config_id}`: counts, the last
/// error, recent attempts with status code and latency, and the log.
async fn show(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
    ApiPath((_, config_id)): ApiPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let config = destination(&state, &project_id, &config_id).await?;
    let mut view = summary(&state, &config).await?;
    view["recent_attempts"] = json!(state.store.delivery_attempts(&config.id, 100).await?);
    view["logs"] = json!(state.store.plugin_logs(&config.id, 100).await?);
    Ok(Json(view))
}

async fn pause(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Write>,
    ApiPath((_, config_id)): ApiPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    set_paused(state, project_id, config_id, true).await
}

async fn resume(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Write>,
    ApiPath((_, config_id)): ApiPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    set_paused(state, project_id, config_id, false).await
}

async fn set_paused(
    state: ApiState,
    project_id: String,
    config_id: String,
    paused: bool,
) -> Result<Json<Value>, ApiError> {
    destination(&state, &project_id, &config_id).await?;
    state
        .store
        .set_paused(
            &project_id,
            &config_id,
            paused.then_some("paused through the API"),
        )
        .await?;
    state.configs.changed().await;
    state.wake.delivery.notify_waiters();
    let config = destination(&state, &project_id, &config_id).await?;
    Ok(Json(summary(&state, &config).await?))
}

#[derive(Debug, Deserialize)]
struct DeadLetterQuery {
    plugin_config_id: Option<String>,
    limit: Option<u32>,
}

/// `GET /api/projects/{id}/dead-letters`, newest first.
async fn dead_letters(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
    ApiQuery(query): ApiQuery<DeadLetterQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Invalid(
            "`limit` must be between 1 and 1000".into(),
        ));
    }
    let letters = state
        .store
        .dead_letters(&project_id, query.plugin_config_id.as_deref(), limit)
        .await?;
    Ok(Json(json!({"results": letters})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Replay {
    ids: Option<Vec<i64>>,
    plugin_config_id: Option<String>,
    all: Option<bool>,
}

/// `POST /api/projects/{id}/dead-letters/replay` with exactly one of
/// `{"ids": [...]}`, `{"plugin_config_id": "..."}` or `{"all": true}`.
///
/// One request replays at most the project's `replay_batch` letters,
/// oldest first, and no more than the capture queue has room for; the
/// answer says how many remain, to replay again. While the queue is over
/// the project's share or the server's bound, it replays nothing and
/// answers 503: replayed events would only wait behind the backlog, or
/// push capture into refusing the project's new events.
async fn replay(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Write>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: Replay = serde_json::from_slice(&body).map_err(|err| {
        ApiError::Invalid(format!(
            "the body must be JSON with one of `ids`, `plugin_config_id` or `all`: {err}"
        ))
    })?;
    let selector = match request {
        Replay {
            ids: Some(ids),
            plugin_config_id: None,
            all: None,
        } => {
            if ids.len() > 10_000 {
                return Err(ApiError::Invalid(
                    "`ids` may name at most 10000 dead letters; replay by `plugin_config_id` or `all` for more".into(),
                ));
            }
            ReplaySelector::Ids(ids)
        }
        Replay {
            ids: None,
            plugin_config_id: Some(id),
            all: None,
        } => ReplaySelector::PluginConfig(id),
        Replay {
            ids: None,
            plugin_config_id: None,
            all: Some(true),
        } => ReplaySelector::All,
        _ => {
            return Err(ApiError::Invalid(
                "give exactly one of `ids` (a list of dead-letter ids), `plugin_config_id`, or `all: true`".into(),
            ));
        }
    };
    let limit = replay_room(&state, &project_id).await?;
    let done = state
        .store
        .replay_dead_letters(&project_id, &selector, limit)
        .await?;
    state.wake.worker.notify_one();
    state.wake.delivery.notify_waiters();
    Ok(Json(json!(done)))
}

/// How many letters one replay of the project may send back now: its
/// `replay_batch`, within what is left of the capture queue's bounds.
async fn replay_room(state: &ApiState, project_id: &str) -> Result<u64, ApiError> {
    let quotas = state.quotas.get(project_id);
    let depth = state.queue.depth();
    if depth >= state.max_queue_depth {
        return Err(ApiError::Unavailable(format!(
            "the capture queue holds {depth} events, the server's limit (--max-queue-depth {}); replay once the pipeline has caught up",
            state.max_queue_depth
        )));
    }
    let queued = state.store.project_queue_depth(project_id).await?;
    let share = i64::try_from(quotas.queued_events).unwrap_or(i64::MAX);
    if queued >= share {
        return Err(ApiError::Unavailable(format!(
            "the project has {queued} events waiting in the capture queue, {}; replay once the pipeline has caught up",
            Hit {
                quota: "queued_events",
                limit: quotas.queued_events,
            }
        )));
    }
    let room = (share - queued).min(state.max_queue_depth - depth);
    Ok(u64::from(quotas.replay_batch).min(room as u64))
}
