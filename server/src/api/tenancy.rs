//! Organisations, their projects and keys, capture tokens and the audit
//! log.
//!
//! Keys can only hand out what they hold: a key makes, lists and revokes
//! only keys whose projects it reaches itself, and a key limited to some
//! projects cannot create projects (it could not reach them).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Admin, AnyKey, ApiError, ApiPath, ApiQuery, ApiState, Authorised, JsonBody, OrgAuthorised, Read,
};
use crate::model::format_timestamp;
use crate::store::{ApiKey, KeyError, KeySpec, Scope};

pub(super) fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    ApiState: axum::extract::FromRef<S>,
{
    Router::new()
        .route("/api/me", get(me))
        .route("/api/organisations/{organisation_id}", get(organisation))
        .route(
            "/api/organisations/{organisation_id}/projects",
            get(list_projects).post(create_project),
        )
        .route(
            "/api/organisations/{organisation_id}/keys",
            get(list_keys).post(create_key),
        )
        .route(
            "/api/organisations/{organisation_id}/keys/{key_id}",
            delete(revoke_key),
        )
        .route(
            "/api/organisations/{organisation_id}/audit-log",
            get(audit_log),
        )
        .route(
            "/api/projects/{project_id}/capture-tokens",
            get(capture_tokens),
        )
        .route(
            "/api/projects/{project_id}/capture-tokens/rotate",
            post(rotate_capture_token),
        )
}

/// Longest grace period of a rotated capture token: a month is time
/// enough to ship every app; longer and an old token would never die.
const MAX_GRACE_SECONDS: u64 = 30 * 24 * 3600;

/// The grace period when none is given: a day.
const DEFAULT_GRACE_SECONDS: u64 = 24 * 3600;

/// A page of a list: `?limit=N&cursor=C`, where `C` is the `next` of the
/// page before.
#[derive(Debug, Deserialize)]
struct PageQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

const MAX_PAGE: u32 = 1000;

impl PageQuery {
    fn limit(&self) -> Result<u32, ApiError> {
        match &self.limit {
            None => Ok(100),
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_PAGE).contains(n))
                .ok_or_else(|| {
                    ApiError::Invalid(format!(
                        "`limit` must be a number from 1 to {MAX_PAGE}, got {text}"
                    ))
                }),
        }
    }
}

/// `{"results", "next"}`, `next` being the cursor of the page after, or
/// null on the last page.
fn page<T: serde::Serialize>(results: Vec<T>, limit: u32, cursor: impl Fn(&T) -> String) -> Value {
    let next = (results.len() == limit as usize)
        .then(|| results.last().map(&cursor))
        .flatten();
    json!({"results": results, "next": next})
}

/// `GET /api/me`: the key the request was made with, and its organisation.
async fn me(State(state): State<ApiState>, AnyKey(key): AnyKey) -> Result<Json<Value>, ApiError> {
    let organisation = state.store.organisation(&key.organisation_id).await?;
    Ok(Json(json!({"key": key, "organisation": organisation})))
}

async fn organisation(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Read>,
) -> Result<Json<Value>, ApiError> {
    let organisation = state
        .store
        .organisation(&key.organisation_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("organisation {}", key.organisation_id)))?;
    Ok(Json(
        serde_json::to_value(organisation).expect("serialises"),
    ))
}

/// The organisation's projects the key reaches.
async fn list_projects(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Read>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit()?;
    let mut after = query.cursor.clone();
    let mut results = Vec::new();
    // A key limited to some projects skips the others; read on until the
    // page is full or the organisation has no more.
    loop {
        let rows = state
            .store
            .projects_of(&key.organisation_id, after.as_deref(), limit)
            .await?;
        let last = rows.len() < limit as usize;
        after = rows.last().map(|p| p.id.clone());
        results.extend(rows.into_iter().filter(|p| key.reaches(&p.id)));
        if last || results.len() >= limit as usize {
            break;
        }
    }
    results.truncate(limit as usize);
    Ok(Json(page(results, limit, |p| p.id.clone())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewProject {
    name: String,
    timezone: Option<String>,
}

async fn create_project(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Admin>,
    JsonBody(body): JsonBody<NewProject>,
) -> Result<Response, ApiError> {
    if key.projects.is_some() {
        return Err(ApiError::Invalid(
            "this API key is limited to some projects, so it cannot create one: use a key of the whole organisation".into(),
        ));
    }
    let name = body.name.trim();
    if name.is_empty() {
        return Err(ApiError::Invalid("`name` must not be empty".into()));
    }
    let timezone = body.timezone.as_deref().unwrap_or("UTC");
    let Some(tz) = crate::query::spec::parse_tz(timezone) else {
        return Err(ApiError::Invalid(format!(
            "`timezone` must be an IANA time zone such as Europe/Berlin or UTC, got {timezone}"
        )));
    };
    let created = state
        .store
        .create_project_with(Some(&key.organisation_id), name, tz.name(), false)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("organisation {}", key.organisation_id)))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": created.project_id,
            "organisation_id": created.organisation_id,
            "name": name,
            "timezone": tz.name(),
            "capture_token": created.capture_token,
        })),
    )
        .into_response())
}

/// The organisation's keys that the caller's key covers.
async fn list_keys(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Admin>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit()?;
    let mut after = query.cursor.clone();
    let mut results: Vec<ApiKey> = Vec::new();
    loop {
        let rows = state
            .store
            .keys(&key.organisation_id, after.as_deref(), limit)
            .await?;
        let last = rows.len() < limit as usize;
        after = rows.last().map(|k| k.id.clone());
        results.extend(
            rows.into_iter()
                .filter(|other| key.covers(other.projects.as_deref())),
        );
        if last || results.len() >= limit as usize {
            break;
        }
    }
    results.truncate(limit as usize);
    Ok(Json(page(results, limit, |k| k.id.clone())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKeyBody {
    name: String,
    scope: String,
    /// The projects the key is limited to; left out for every project of
    /// the organisation.
    projects: Option<Vec<String>>,
}

async fn create_key(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Admin>,
    JsonBody(body): JsonBody<NewKeyBody>,
) -> Result<Response, ApiError> {
    let name = body.name.trim();
    if name.is_empty() {
        return Err(ApiError::Invalid("`name` must not be empty".into()));
    }
    let scope = Scope::parse(&body.scope).ok_or_else(|| {
        ApiError::Invalid(format!(
            "`scope` must be one of {}, got {}",
            Scope::NAMES.join(", "),
            body.scope
        ))
    })?;
    if scope > key.scope {
        return Err(ApiError::Invalid(format!(
            "`scope`: a key of scope `{}` cannot make one of scope `{}`",
            key.scope.as_str(),
            scope.as_str()
        )));
    }
    if body.projects.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::Invalid(
            "`projects` must name at least one project, or be left out for every project of the organisation".into(),
        ));
    }
    if !key.covers(body.projects.as_deref()) {
        return Err(ApiError::Invalid(
            "`projects`: this API key is limited to some projects, and a key it makes must be limited to those too".into(),
        ));
    }
    let spec = KeySpec {
        organisation_id: key.organisation_id.clone(),
        name: name.to_string(),
        scope,
        projects: body.projects,
        created_by: key.id.clone(),
    };
    match state.store.create_key(&spec).await {
        Ok(created) => Ok((
            StatusCode::CREATED,
            Json(serde_json::to_value(created).expect("serialises")),
        )
            .into_response()),
        Err(KeyError::ForeignProject(project, _)) => Err(ApiError::Invalid(format!(
            "`projects`: {project} is not a project of this organisation"
        ))),
        Err(KeyError::NoOrganisation(id)) => Err(ApiError::NotFound(format!("organisation {id}"))),
        Err(KeyError::Store(err)) => Err(err.into()),
    }
}

async fn revoke_key(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Admin>,
    ApiPath((_, key_id)): ApiPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let target = state
        .store
        .key(&key.organisation_id, &key_id)
        .await?
        .filter(|target| key.covers(target.projects.as_deref()))
        .ok_or_else(|| ApiError::NotFound(format!("key {key_id}")))?;
    let revoked = state
        .store
        .revoke_key(&key.organisation_id, &target.id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("key {key_id}")))?;
    Ok(Json(serde_json::to_value(revoked).expect("serialises")))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// Newest first. A key limited to some projects sees their entries only.
async fn audit_log(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Admin>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = PageQuery {
        limit: query.limit,
        cursor: None,
    }
    .limit()?;
    let before = query
        .cursor
        .map(|text| {
            text.parse::<i64>().map_err(|_| {
                ApiError::Invalid(format!(
                    "`cursor` must be the `next` of an earlier page, got {text}"
                ))
            })
        })
        .transpose()?;
    let entries = state
        .store
        .audit_log(&key.organisation_id, key.projects.as_deref(), before, limit)
        .await?;
    Ok(Json(page(entries, limit, |e| e.id.to_string())))
}

async fn capture_tokens(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
) -> Result<Json<Value>, ApiError> {
    let tokens = state
        .store
        .capture_tokens(&project_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("project {project_id}")))?;
    Ok(Json(json!({"results": tokens, "next": null})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the old token is still accepted, in seconds.
    grace_seconds: Option<u64>,
}

async fn rotate_capture_token(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Admin>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    // The body is optional: an empty one takes the default grace.
    let body: RotateBody = if body.iter().all(u8::is_ascii_whitespace) {
        RotateBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            ApiError::Invalid(format!(
                "the request body must be a JSON object such as {{\"grace_seconds\": 3600}}: {err}"
            ))
        })?
    };
    let grace = body.grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
    if grace > MAX_GRACE_SECONDS {
        return Err(ApiError::Invalid(format!(
            "`grace_seconds` must be at most {MAX_GRACE_SECONDS} (30 days), got {grace}"
        )));
    }
    let valid_until =
        format_timestamp(chrono::Utc::now() + chrono::Duration::seconds(grace as i64));
    let (token, old) = state
        .store
        .rotate_capture_token(&project_id, &valid_until)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("project {project_id}")))?;
    state.tokens.forget(&old);
    Ok(Json(json!({
        "capture_token": token,
        "previous_valid_until": valid_until,
    })))
}
