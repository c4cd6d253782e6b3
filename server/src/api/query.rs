//! `POST /api/projects/{id}/query`, and the project settings queries use
//! (`GET`/`PATCH /api/projects/{id}`: its time zone).

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::ApiState;
use super::error::{ErrorBody, ErrorType};
use super::openapi::{Errors, JsonObject, ProjectPatch, ProjectPath, ProjectView};
use super::{Admin, ApiError, Authorised, Read};
use crate::query::{self, Query, QueryError, spec::parse_tz};

pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    ApiState: axum::extract::FromRef<S>,
{
    Router::new()
        .route("/api/projects/{project_id}/query", post(run_query))
        .route(
            "/api/projects/{project_id}",
            get(get_project).patch(update_project),
        )
}

/// Query failures: a bad query is 400 naming the field (`attr`), a query
/// over its budget 422, as sending it again will not help.
impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let detail = self.to_string();
        match self {
            QueryError::Invalid { attr, message } => {
                ErrorBody::new(ErrorType::ValidationError, "invalid_query", message)
                    .attr(attr)
                    .respond(StatusCode::BAD_REQUEST, None)
            }
            QueryError::TooManyRows { .. } => {
                ErrorBody::new(ErrorType::ValidationError, "query_too_large", detail)
                    .respond(StatusCode::UNPROCESSABLE_ENTITY, None)
            }
            QueryError::Timeout { .. } => {
                ErrorBody::new(ErrorType::ValidationError, "query_timeout", detail)
                    .respond(StatusCode::UNPROCESSABLE_ENTITY, None)
            }
            QueryError::Store(err) => {
                tracing::error!("query failed: {err}");
                if err.is_transient() {
                    ErrorBody::new(
                        ErrorType::Unavailable,
                        "database_unavailable",
                        "the database is unavailable; retry later",
                    )
                    .respond(StatusCode::SERVICE_UNAVAILABLE, Some(5))
                } else {
                    ErrorBody::new(ErrorType::ServerError, "server_error", "internal error")
                        .respond(StatusCode::INTERNAL_SERVER_ERROR, None)
                }
            }
        }
    }
}

/// A body that is not JSON gets the same kind of answer as a bad query.
fn parse_body(body: &[u8]) -> Result<Value, QueryError> {
    serde_json::from_slice(body).map_err(|err| QueryError::Invalid {
        attr: String::new(),
        message: format!("the request body must be a JSON query object: {err}"),
    })
}

/// A query runs once it has a slot (see `query::QuerySlots`): a project
/// already running its `concurrent_queries`, or a server running its
/// most, gets 429. A malformed query is refused before it takes one.
#[utoipa::path(post, path = "/api/projects/{project_id}/query", tag = "query",
    params(ProjectPath),
    request_body(content = JsonObject, description = "A query (`kind` of `trends`, `funnel`, `retention`, `paths` or `events`); see docs/api.md."),
    responses((status = 200, description = "The query's result.", body = JsonObject),
        (status = 422, description = "The query needs more rows or time than its budget; narrow it.", body = ErrorBody),
        Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn run_query(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
    body: Bytes,
) -> Result<Response, Response> {
    let value = parse_body(&body).map_err(IntoResponse::into_response)?;
    let query = Query::parse(&value).map_err(IntoResponse::into_response)?;
    let quota = state.quotas.get(&project_id).concurrent_queries;
    let _slot = state
        .queries
        .acquire(&project_id, quota)
        .await
        .map_err(|refused| ApiError::Busy(refused.to_string()).into_response())?;
    query::run(
        &state.store,
        &project_id,
        &query,
        state.query_limits,
        chrono::Utc::now(),
    )
    .await
    .map(|result| Json(result).into_response())
    .map_err(IntoResponse::into_response)
}

#[utoipa::path(get, path = "/api/projects/{project_id}", tag = "query",
    params(ProjectPath),
    responses((status = 200, description = "The project's settings.", body = ProjectView), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn get_project(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
) -> Result<Json<Value>, ApiError> {
    project_json(&state, &project_id).await
}

async fn project_json(state: &ApiState, project_id: &str) -> Result<Json<Value>, ApiError> {
    let (name, timezone) = state
        .store
        .project(project_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("project {project_id}")))?;
    Ok(Json(
        json!({"id": project_id, "name": name, "timezone": timezone}),
    ))
}

/// `PATCH {"timezone": "Europe/Berlin"}`.
#[utoipa::path(patch, path = "/api/projects/{project_id}", tag = "query",
    params(ProjectPath), request_body = ProjectPatch,
    responses((status = 200, description = "The project's settings.", body = ProjectView), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("admin"))))]
async fn update_project(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Admin>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let patch: Value = serde_json::from_slice(&body).map_err(|err| ApiError::Validation {
        code: "invalid_body",
        attr: None,
        detail: format!("the request body must be JSON: {err}"),
    })?;
    let fields = patch
        .as_object()
        .ok_or_else(|| ApiError::Invalid("the request body must be a JSON object".into()))?;
    for key in fields.keys() {
        if key != "timezone" {
            return Err(ApiError::field(
                key,
                format!("unknown field `{key}`; a project's settable field is `timezone`"),
            ));
        }
    }
    if let Some(value) = fields.get("timezone") {
        let name = value.as_str().unwrap_or_default();
        let tz = parse_tz(name).ok_or_else(|| {
            ApiError::field(
                "timezone",
                format!(
                    "`timezone` must be an IANA time zone such as Europe/Berlin or UTC, got {value}"
                ),
            )
        })?;
        state
            .store
            .set_project_timezone(&project_id, tz.name())
            .await?;
    }
    project_json(&state, &project_id).await
}

/// The routes of this module, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(run_query, get_project, update_project))]
pub(super) struct Doc;
