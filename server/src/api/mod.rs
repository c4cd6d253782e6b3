//! The management and query API under `/api`, authorised by a personal API
//! key (`Authorization: Bearer KEY`) that belongs to the project in the path.

mod audit;
mod destinations;
pub mod error;
pub mod openapi;
pub mod page;
mod plugins;
mod query;
pub mod slow;
mod tenancy;

use std::marker::PhantomData;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{
    FromRef, FromRequest, FromRequestParts, Path, Query, RawPathParams, Request, State,
};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use self::error::{ErrorBody, ErrorType};
use self::openapi::{Errors, PersonList, ProjectPath, QuotasView};
use self::page::{Page, PageQuery};
use crate::configs::ConfigWatch;
use crate::model::format_timestamp;
use crate::query::{QueryLimits, QuerySlots};
use crate::queue::{QueueGauge, Wakeups};
use crate::quotas::QuotaBook;
use crate::rates::RequestRates;
use crate::runtime::Runtime;
use crate::store::{ApiKey, Cursor, EventFilter, Scope, Store, StoredEvent, now_rfc3339};

/// What the API needs: the store, the runtime to check plugins with, the
/// query budget and slots, the capture queue's gauge (replay adds to the
/// queue), and the signals that make a change take effect at once.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub runtime: Runtime,
    pub query_limits: QueryLimits,
    pub queries: QuerySlots,
    pub queue: Arc<QueueGauge>,
    /// The server's `--max-queue-depth`: replay adds nothing past it.
    pub max_queue_depth: i64,
    pub wake: Wakeups,
    /// Waited on after a plugin config changes, so the change applies to
    /// every event accepted after the response.
    pub configs: ConfigWatch,
    pub quotas: QuotaBook,
    pub checks: InstallChecks,
    pub keys: KeyUse,
    /// Capture's memory of tokens, told when a rotation retires one.
    pub tokens: crate::tokens::TokenCache,
}

/// Projects with a plugin config being checked right now (see
/// `plugins::try_install`).
#[derive(Clone, Default)]
pub struct InstallChecks(std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl InstallChecks {
    /// The project's turn, or `None` while another check of it runs.
    pub(crate) fn begin(&self, project_id: &str) -> Option<CheckTurn> {
        let inserted = self
            .0
            .lock()
            .expect("not poisoned")
            .insert(project_id.to_string());
        inserted.then(|| CheckTurn {
            checks: self.clone(),
            project_id: project_id.to_string(),
        })
    }
}

/// Ends a project's check when dropped.
pub(crate) struct CheckTurn {
    checks: InstallChecks,
    project_id: String,
}

impl Drop for CheckTurn {
    fn drop(&mut self) {
        self.checks
            .0
            .lock()
            .expect("not poisoned")
            .remove(&self.project_id);
    }
}

pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    ApiState: axum::extract::FromRef<S>,
{
    Router::new()
        .route("/api/projects/{project_id}/events", get(list_events))
        .route("/api/projects/{project_id}/persons", get(find_person))
        .route("/api/projects/{project_id}/quotas", get(project_quotas))
        .merge(plugins::router())
        .merge(destinations::router())
        .merge(query::router())
        .merge(tenancy::router())
        .layer(axum::middleware::from_fn(audit::record))
}

/// Why an API request failed, grouped by status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing API key: send `Authorization: Bearer KEY` with a personal API key")]
    MissingKey,
    #[error(
        "this API key is not valid: check that it was copied whole, or make one with `sluice key create`"
    )]
    UnknownKey,
    #[error(
        "this API key was revoked at {0}; make a new one with `sluice key create` or `POST /api/organisations/{{id}}/keys`"
    )]
    RevokedKey(String),
    #[error("this API key is not valid for project {0}")]
    Forbidden(String),
    #[error("this API key is not valid for organisation {0}")]
    ForbiddenOrganisation(String),
    #[error("this API key has scope `{}`; this route needs `{}`: use a key with that scope", has.as_str(), needs.as_str())]
    Scope { has: Scope, needs: Scope },
    /// Too many requests from one key: retry after the duration.
    #[error("{0}")]
    Throttled(String, std::time::Duration),
    #[error("{0}")]
    Invalid(String),
    /// A request the client must fix: `code` says how (see docs/api.md),
    /// `attr` names the field or parameter at fault.
    #[error("{detail}")]
    Validation {
        code: &'static str,
        attr: Option<String>,
        detail: String,
    },
    #[error("{0} not found")]
    NotFound(String),
    /// A quota that caps how much the project may have: asking again will
    /// not help until something is removed or the operator raises it.
    #[error("{0}")]
    OverQuota(String),
    /// A quota on what the project may do at once: worth retrying soon.
    #[error("{0}")]
    Busy(String),
    /// The server cannot take the work now (its queue is full): worth
    /// retrying once it has caught up.
    #[error("{0}")]
    Unavailable(String),
    #[error("{}", if .0.is_transient() {
        "the database is unavailable; retry later"
    } else {
        "internal error"
    })]
    Store(#[from] crate::store::Error),
}

impl ApiError {
    /// A bad value of one field or parameter, named in `attr`.
    pub(crate) fn field(attr: &str, detail: impl Into<String>) -> ApiError {
        ApiError::Validation {
            code: "invalid_input",
            attr: Some(attr.to_string()),
            detail: detail.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = self.to_string();
        let mut throttled_for = None;
        let (status, kind, code, attr) = match self {
            ApiError::MissingKey => (
                StatusCode::UNAUTHORIZED,
                ErrorType::AuthenticationError,
                "missing_api_key",
                None,
            ),
            ApiError::UnknownKey => (
                StatusCode::UNAUTHORIZED,
                ErrorType::AuthenticationError,
                "invalid_api_key",
                None,
            ),
            ApiError::RevokedKey(_) => (
                StatusCode::UNAUTHORIZED,
                ErrorType::AuthenticationError,
                "revoked_api_key",
                None,
            ),
            ApiError::Forbidden(_) | ApiError::ForbiddenOrganisation(_) => (
                StatusCode::FORBIDDEN,
                ErrorType::PermissionDenied,
                "not_this_keys_resource",
                None,
            ),
            ApiError::Scope { .. } => (
                StatusCode::FORBIDDEN,
                ErrorType::PermissionDenied,
                "scope_too_low",
                None,
            ),
            ApiError::Throttled(_, wait) => {
                throttled_for = Some(wait);
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorType::Throttled,
                    "rate_limited",
                    None,
                )
            }
            ApiError::Invalid(_) => (
                StatusCode::BAD_REQUEST,
                ErrorType::ValidationError,
                "invalid_input",
                None,
            ),
            ApiError::Validation { code, attr, .. } => (
                StatusCode::BAD_REQUEST,
                ErrorType::ValidationError,
                code,
                attr,
            ),
            ApiError::NotFound(_) => (
                StatusCode::NOT_FOUND,
                ErrorType::NotFound,
                "not_found",
                None,
            ),
            ApiError::OverQuota(_) => (
                StatusCode::FORBIDDEN,
                ErrorType::PermissionDenied,
                "quota_exceeded",
                None,
            ),
            ApiError::Busy(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                ErrorType::Throttled,
                "busy",
                None,
            ),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorType::Unavailable,
                "unavailable",
                None,
            ),
            ApiError::Store(err) => {
                tracing::error!("API request failed: {err}");
                if err.is_transient() {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorType::Unavailable,
                        "database_unavailable",
                        None,
                    )
                } else {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        ErrorType::ServerError,
                        "server_error",
                        None,
                    )
                }
            }
        };
        let retry_after = match throttled_for {
            Some(wait) => Some(wait.as_secs_f64().ceil().max(1.0) as u64),
            None => matches!(
                status,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
            )
            .then_some(5),
        };
        let mut body = ErrorBody::new(kind, code, detail);
        body.attr = attr;
        body.respond(status, retry_after)
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
            Err(rejection) => {
                let text = rejection.body_text();
                Err(ApiError::Validation {
                    code: match rejection {
                        JsonRejection::MissingJsonContentType(_) => "unsupported_media_type",
                        _ => "invalid_body",
                    },
                    attr: error::attr_of_serde_error(&text),
                    detail: format!(
                        "the request body must be a JSON object as documented in docs/api.md: {text}"
                    ),
                })
            }
        }
    }
}

/// The scope a route needs, as a type: a handler names it in its
/// extractor (`Authorised<Write>`), so no route can forget to say.
pub(crate) trait NeedsScope: Send + Sync {
    const SCOPE: Scope;
}

/// Reading: GET routes and queries.
pub(crate) struct Read;
/// Changing a project's pipeline.
pub(crate) struct Write;
/// Managing projects, keys, tokens; reading the audit log.
pub(crate) struct Admin;

impl NeedsScope for Read {
    const SCOPE: Scope = Scope::Read;
}
impl NeedsScope for Write {
    const SCOPE: Scope = Scope::Write;
}
impl NeedsScope for Admin {
    const SCOPE: Scope = Scope::Admin;
}

/// Refuses a key whose scope is below what the route needs.
fn needs<N: NeedsScope>(key: &ApiKey) -> Result<(), ApiError> {
    if key.scope < N::SCOPE {
        return Err(ApiError::Scope {
            has: key.scope,
            needs: N::SCOPE,
        });
    }
    Ok(())
}

/// The key a request was made with, once checked: known, not revoked,
/// within its rate.
async fn caller<S>(parts: &mut Parts, state: &S) -> Result<ApiKey, ApiError>
where
    ApiState: FromRef<S>,
{
    let secret = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or(ApiError::MissingKey)?;
    let state = ApiState::from_ref(state);
    let key = state
        .store
        .key_by_secret(secret)
        .await?
        .ok_or(ApiError::UnknownKey)?;
    if let Some(at) = &key.revoked_at {
        return Err(ApiError::RevokedKey(at.clone()));
    }
    state
        .keys
        .rates
        .take(&key.id, state.keys.requests_per_second)
        .map_err(|wait| {
            ApiError::Throttled(
                format!(
                    "this API key made more than {} requests a second; wait and retry",
                    state.keys.requests_per_second
                ),
                wait,
            )
        })?;
    state.keys.touch(&state.store, &key.id);
    Ok(key)
}

/// The project named in the path, once the bearer key was checked against
/// it and against the scope `S` the route needs: every project route takes
/// this instead of the raw path. A key of another project gets the same
/// answer as a project that does not exist.
pub(crate) struct Authorised<S>(pub String, pub PhantomData<S>);

impl<S, N> FromRequestParts<S> for Authorised<N>
where
    ApiState: FromRef<S>,
    S: Send + Sync,
    N: NeedsScope,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let project_id = path_param(parts, state, "project_id").await?;
        let key = caller(parts, state).await?;
        let api = ApiState::from_ref(state);
        let owner = api.store.project_organisation(&project_id).await?;
        if owner.as_deref() != Some(key.organisation_id.as_str()) || !key.reaches(&project_id) {
            return Err(ApiError::Forbidden(project_id));
        }
        needs::<N>(&key)?;
        audit::note(parts, &api.store, &key, Some(&project_id));
        Ok(Authorised(project_id, PhantomData))
    }
}

/// The organisation named in the path, once the bearer key was checked
/// against it and against the scope `S` the route needs. The key may be
/// limited to some projects: the handler keeps to them.
pub(crate) struct OrgAuthorised<S>(pub ApiKey, pub PhantomData<S>);

impl<S, N> FromRequestParts<S> for OrgAuthorised<N>
where
    ApiState: FromRef<S>,
    S: Send + Sync,
    N: NeedsScope,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let organisation_id = path_param(parts, state, "organisation_id").await?;
        let key = caller(parts, state).await?;
        if key.organisation_id != organisation_id {
            return Err(ApiError::ForbiddenOrganisation(organisation_id));
        }
        needs::<N>(&key)?;
        audit::note(parts, &ApiState::from_ref(state).store, &key, None);
        Ok(OrgAuthorised(key, PhantomData))
    }
}

/// Any valid key, whatever it may reach: for `GET /api/me`.
pub(crate) struct AnyKey(pub ApiKey);

impl<S> FromRequestParts<S> for AnyKey
where
    ApiState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        caller(parts, state).await.map(AnyKey)
    }
}

async fn path_param<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
    name: &str,
) -> Result<String, ApiError> {
    let params = RawPathParams::from_request_parts(parts, state)
        .await
        .map_err(|rejection| ApiError::Invalid(rejection.body_text()))?;
    Ok(params
        .iter()
        .find(|(param, _)| *param == name)
        .map(|(_, value)| value.to_string())
        .unwrap_or_else(|| panic!("a route with this extractor has a {{{name}}} parameter")))
}

/// What the API keeps about keys between requests: their rate buckets,
/// and when each was last recorded as used.
#[derive(Clone)]
pub struct KeyUse {
    rates: RequestRates,
    requests_per_second: u32,
    touched: Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
}

/// How often a key's `last_used_at` is written: a write per request would
/// put every API call in line for the database's write lock.
const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl KeyUse {
    pub fn new(requests_per_second: u32) -> Self {
        KeyUse {
            rates: RequestRates::default(),
            requests_per_second,
            touched: Default::default(),
        }
    }

    /// Records that the key was used, at most once a minute per key, in
    /// the background: the answer does not wait for it.
    fn touch(&self, store: &Store, key_id: &str) {
        let now = std::time::Instant::now();
        {
            let mut touched = self.touched.lock().expect("not poisoned");
            if touched
                .get(key_id)
                .is_some_and(|at| now.duration_since(*at) < TOUCH_EVERY)
            {
                return;
            }
            if touched.len() >= 10_000 {
                touched.clear();
            }
            touched.insert(key_id.to_string(), now);
        }
        let store = store.clone();
        let key_id = key_id.to_string();
        tokio::spawn(async move {
            if let Err(err) = store.touch_key(&key_id, &now_rfc3339()).await {
                tracing::warn!("could not record that API key {key_id} was used: {err}");
            }
        });
    }
}

/// `Path` whose rejection is the API's JSON error.
pub(crate) struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|rejection| {
                let text = rejection.body_text();
                ApiError::Validation {
                    code: "invalid_path",
                    attr: error::attr_of_serde_error(&text),
                    detail: text,
                }
            })
    }
}

/// `Query` whose rejection is the API's JSON error, naming the parameter.
pub(crate) struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| {
                let text = rejection.body_text();
                ApiError::Validation {
                    code: "invalid_parameter",
                    attr: error::attr_of_serde_error(&text),
                    detail: text,
                }
            })
    }
}

/// The filters of the events list; paging is a [`PageQuery`].
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Only events of this name.
    event: Option<String>,
    /// Only events of this distinct id.
    distinct_id: Option<String>,
    /// Only events with a later timestamp (RFC 3339).
    after: Option<String>,
    /// Only events with an earlier timestamp (RFC 3339).
    before: Option<String>,
}

fn time_filter(name: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    value
        .map(|text| {
            chrono::DateTime::parse_from_rfc3339(&text)
                .map(|t| format_timestamp(t.to_utc()))
                .map_err(|_| {
                    ApiError::field(
                        name,
                        format!("`{name}` must be an RFC 3339 time, got {text}"),
                    )
                })
        })
        .transpose()
}

/// `GET /api/projects/{id}/events`: newest first (by timestamp, then
/// uuid).
#[utoipa::path(get, path = "/api/projects/{project_id}/events", tag = "events",
    params(ProjectPath, EventsQuery, PageQuery),
    responses((status = 200, description = "A page of events.", body = Page<StoredEvent>), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn list_events(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<StoredEvent>>, ApiError> {
    let request = page.request::<(String, String)>(100)?;
    let filter = EventFilter {
        event: query.event,
        distinct_id: query.distinct_id,
        after: time_filter("after", query.after)?,
        before: time_filter("before", query.before)?,
        cursor: request
            .after
            .clone()
            .map(|(timestamp, uuid)| Cursor { timestamp, uuid }),
        limit: request.fetch(),
    };
    let rows = state.store.list_events(&project_id, &filter).await?;
    Ok(Json(Page::new(rows, &request, |event| {
        (event.timestamp.clone(), event.uuid.clone())
    })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PersonQuery {
    /// The distinct id to look up.
    #[param(required = true, min_length = 1)]
    distinct_id: Option<String>,
}

/// `GET /api/projects/{id}/persons?distinct_id=X`: the person X belongs to.
#[utoipa::path(get, path = "/api/projects/{project_id}/persons", tag = "events",
    params(ProjectPath, PersonQuery),
    responses((status = 200, description = "The person, or none.", body = PersonList), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn find_person(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
    ApiQuery(query): ApiQuery<PersonQuery>,
) -> Result<Response, ApiError> {
    let distinct_id = query
        .distinct_id
        .filter(|d| !d.is_empty())
        .ok_or_else(|| ApiError::field("distinct_id", "`distinct_id` is required"))?;
    Ok(
        match state
            .store
            .person_by_distinct_id(&project_id, &distinct_id)
            .await?
        {
            Some(person) => Json(json!({"results": [person], "next": null})).into_response(),
            None => Json(json!({"results": [], "next": null})).into_response(),
        },
    )
}

/// `GET /api/projects/{id}/quotas`: the project's quotas, and which of
/// them the operator set for it. Only the operator changes them (`sluice
/// project quotas`): a project's own key must not raise its share.
#[utoipa::path(get, path = "/api/projects/{project_id}/quotas", tag = "query",
    params(ProjectPath),
    responses((status = 200, description = "The project's quotas.", body = QuotasView), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn project_quotas(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
) -> Result<Json<Value>, ApiError> {
    let overrides = state
        .store
        .project_quota_overrides(&project_id)
        .await?
        .flatten()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .unwrap_or_else(|| json!({}));
    Ok(Json(json!({
        "project_id": project_id,
        "quotas": *state.quotas.get(&project_id),
        "overrides": overrides,
    })))
}

/// The routes of this module, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list_events, find_person, project_quotas))]
struct Doc;
