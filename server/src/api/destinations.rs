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
use super::openapi::{ConfigPath, DestinationDetail, DestinationView, Errors, ProjectPath};
use super::page::{Page, PageQuery};
use super::plugins::public_view;
use super::{ApiError, ApiPath, ApiQuery, Authorised, Read, Write};
use crate::model::quotas::Hit;
use crate::store::{PluginConfig, ReplaySelector, Replayed, StoredDeadLetter};

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
/// its counts, in chain order (by position, then id).
#[utoipa::path(get, path = "/api/projects/{project_id}/destinations", tag = "destinations",
    params(ProjectPath, PageQuery),
    responses((status = 200, description = "A page of destinations.", body = Page<DestinationView>), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn list(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Value>>, ApiError> {
    let request = page.request::<(i64, String)>(100)?;
    let destinations: Vec<PluginConfig> = state
        .store
        .plugin_configs(&project_id)
        .await?
        .into_iter()
        .filter(PluginConfig::is_destination)
        .collect();
    let page = Page::from_sorted(destinations, &request, |config| {
        (config.position, config.id.clone())
    });
    let mut results = Vec::with_capacity(page.results.len());
    for config in &page.results {
        results.push(summary(&state, config).await?);
    }
    Ok(Json(Page {
        results,
        next: page.next,
    }))
}

/// `GET /api/projects/{id}/destinations/{config_id}`: counts, the last
/// error, recent attempts with status code and latency, and the log.
#[utoipa::path(get, path = "/api/projects/{project_id}/destinations/{config_id}", tag = "destinations",
    params(ConfigPath),
    responses((status = 200, description = "The destination.", body = DestinationDetail), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
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

/// `POST .../pause`: deliveries stop until resumed; events keep queueing
/// in the destination's outbox.
#[utoipa::path(post, path = "/api/projects/{project_id}/destinations/{config_id}/pause", tag = "destinations",
    params(ConfigPath),
    responses((status = 200, description = "The paused destination.", body = DestinationView), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("write"))))]
async fn pause(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Write>,
    ApiPath((_, config_id)): ApiPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    set_paused(state, project_id, config_id, true).await
}

#[utoipa::path(post, path = "/api/projects/{project_id}/destinations/{config_id}/resume", tag = "destinations",
    params(ConfigPath),
    responses((status = 200, description = "The resumed destination.", body = DestinationView), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("write"))))]
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

/// The filter of the dead-letters list; paging is a [`PageQuery`].
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DeadLetterQuery {
    /// Only the letters of this plugin config.
    plugin_config_id: Option<String>,
}

/// `GET /api/projects/{id}/dead-letters`, newest first (by id).
#[utoipa::path(get, path = "/api/projects/{project_id}/dead-letters", tag = "destinations",
    params(ProjectPath, DeadLetterQuery, PageQuery),
    responses((status = 200, description = "A page of dead letters.", body = Page<StoredDeadLetter>), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn dead_letters(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
    ApiQuery(query): ApiQuery<DeadLetterQuery>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<StoredDeadLetter>>, ApiError> {
    let request = page.request::<i64>(100)?;
    let letters = state
        .store
        .dead_letters_before(
            &project_id,
            query.plugin_config_id.as_deref(),
            request.after,
            request.fetch(),
        )
        .await?;
    Ok(Json(Page::new(letters, &request, |letter| letter.id)))
}

/// Which dead letters to replay: exactly one of the fields.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Replay {
    /// These letters, by id (at most 10000).
    ids: Option<Vec<i64>>,
    /// Every letter of this plugin config.
    plugin_config_id: Option<String>,
    /// Every letter of the project: `true`.
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
#[utoipa::path(post, path = "/api/projects/{project_id}/dead-letters/replay", tag = "destinations",
    params(ProjectPath), request_body = Replay,
    responses((status = 200, description = "How many were replayed, and how many remain.", body = Replayed), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("write"))))]
async fn replay(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Write>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: Replay = serde_json::from_slice(&body).map_err(|err| {
        let err = err.to_string();
        ApiError::Validation {
            code: "invalid_body",
            attr: super::error::attr_of_serde_error(&err),
            detail: format!(
                "the body must be JSON with one of `ids`, `plugin_config_id` or `all`: {err}"
            ),
        }
    })?;
    let selector = match request {
        Replay {
            ids: Some(ids),
            plugin_config_id: None,
            all: None,
        } => {
            if ids.len() > 10_000 {
                return Err(ApiError::field(
                    "ids",
                    "`ids` may name at most 10000 dead letters; replay by `plugin_config_id` or `all` for more",
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

/// The routes of this module, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, show, pause, resume, dead_letters, replay))]
pub(super) struct Doc;
