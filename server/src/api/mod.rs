//! The management and query API under `/api`, authorised by a personal API
//! key (`Authorization: Bearer KEY`) that belongs to the project in the path.

mod destinations;
mod plugins;
mod query;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::runtime::format_timestamp;
use crate::server::AppState;
use crate::store::EventFilter;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/projects/{project_id}/events", get(list_events))
        .route("/api/projects/{project_id}/persons", get(find_person))
        .merge(plugins::router())
        .merge(destinations::router())
        .merge(query::router())
}

/// Why an API request failed, grouped by status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing API key: send `Authorization: Bearer KEY` with a personal API key")]
    MissingKey,
    #[error("this API key is not valid for project {0}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("internal error")]
    Store(#[from] sqlx::Error),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::MissingKey => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Store(err) => {
                tracing::error!("API request failed: {err}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({"detail": self.to_string()}))).into_response()
    }
}

/// A JSON request body whose rejection is an [`ApiError`], so a malformed or
/// mistyped body gets the API's JSON error naming the problem rather than
/// axum's plain-text one.
pub(crate) struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::Invalid(format!(
                "the request body must be a JSON object as documented in docs/operators.md: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// Checks the bearer key against the project in the path. A key of another
/// project gets the same answer as a wrong key.
pub(crate) async fn authorise(
    state: &AppState,
    headers: &HeaderMap,
    project_id: &str,
) -> Result<(), ApiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or(ApiError::MissingKey)?;
    match state.store.project_for_key(key).await? {
        Some(owner) if owner == project_id => Ok(()),
        _ => Err(ApiError::Forbidden(project_id.to_string())),
    }
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    event: Option<String>,
    distinct_id: Option<String>,
    after: Option<String>,
    before: Option<String>,
    limit: Option<String>,
}

/// Most events one page may hold.
const MAX_LIMIT: u32 = 1000;

fn time_filter(name: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    value
        .map(|text| {
            chrono::DateTime::parse_from_rfc3339(&text)
                .map(|t| format_timestamp(t.to_utc()))
                .map_err(|_| {
                    ApiError::Invalid(format!("`{name}` must be an RFC 3339 time, got {text}"))
                })
        })
        .transpose()
}

async fn list_events(
    State(state): State<AppState>,
    Path(project_id): Path<String>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorise(&state, &headers, &project_id).await?;
    let limit = match query.limit {
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::Invalid(format!(
                    "`limit` must be a number from 1 to {MAX_LIMIT}, got {text}"
                ))
            })?,
        None => 100,
    };
    let filter = EventFilter {
        event: query.event,
        distinct_id: query.distinct_id,
        after: time_filter("after", query.after)?,
        before: time_filter("before", query.before)?,
        limit,
    };
    let results = state.store.list_events(&project_id, &filter).await?;
    Ok(Json(json!({"results": results})))
}

#[derive(Debug, Deserialize)]
struct PersonQuery {
    distinct_id: Option<String>,
}

/// `GET /api/projects/{id}/persons?distinct_id=X`: the person X belongs to.
async fn find_person(
    State(state): State<AppState>,
    Path(project_id): Path<String>,
    Query(query): Query<PersonQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorise(&state, &headers, &project_id).await?;
    let distinct_id = query
        .distinct_id
        .filter(|d| !d.is_empty())
        .ok_or_else(|| ApiError::Invalid("`distinct_id` is required".into()))?;
    Ok(
        match state
            .store
            .person_by_distinct_id(&project_id, &distinct_id)
            .await?
        {
            Some(person) => Json(json!({"results": [person]})).into_response(),
            None => Json(json!({"results": []})).into_response(),
        },
    )
}
