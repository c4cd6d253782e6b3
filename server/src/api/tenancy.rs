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
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::openapi::{Errors, ProjectPath};
use super::page::{Page, PageQuery, PageRequest};
use super::{
    Admin, AnyKey, ApiError, ApiPath, ApiQuery, ApiState, Authorised, JsonBody, OrgAuthorised, Read,
};
use crate::model::format_timestamp;
use crate::store::{
    ApiKey, AuditEntry, CaptureToken, KeyError, KeySpec, NewKey, Organisation, ProjectSummary,
    Scope,
};

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

/// The organisation in the path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct OrganisationPath {
    /// The organisation's id.
    organisation_id: String,
}

/// A key of the organisation in the path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct KeyPath {
    /// The organisation's id.
    organisation_id: String,
    /// The key's id (not the key itself).
    key_id: String,
}

/// Reads a list kept in id order, page by page, keeping the rows `keep`
/// allows, until the page is full (and one more is known) or the list ends.
async fn filtered<T, F, Fut>(
    request: &PageRequest<String>,
    mut read: F,
    keep: impl Fn(&T) -> bool,
    id: impl Fn(&T) -> String,
) -> Result<Vec<T>, ApiError>
where
    F: FnMut(Option<String>, u32) -> Fut,
    Fut: std::future::Future<Output = crate::store::Result<Vec<T>>>,
{
    let mut after = request.after.clone();
    let mut rows = Vec::new();
    loop {
        let batch = read(after.clone(), request.fetch()).await?;
        let last = batch.len() < request.fetch() as usize;
        after = batch.last().map(&id);
        rows.extend(batch.into_iter().filter(|row| keep(row)));
        if last || rows.len() >= request.fetch() as usize {
            return Ok(rows);
        }
    }
}

/// What `GET /api/me` answers.
#[derive(Serialize, ToSchema)]
struct Me {
    key: ApiKey,
    organisation: Option<Organisation>,
}

/// `GET /api/me`: the key the request was made with, and its organisation.
#[utoipa::path(get, path = "/api/me", tag = "organisations",
    responses((status = 200, description = "The key (never the key itself) and its organisation.", body = Me), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn me(State(state): State<ApiState>, AnyKey(key): AnyKey) -> Result<Json<Me>, ApiError> {
    let organisation = state.store.organisation(&key.organisation_id).await?;
    Ok(Json(Me { key, organisation }))
}

#[utoipa::path(get, path = "/api/organisations/{organisation_id}", tag = "organisations",
    params(OrganisationPath),
    responses((status = 200, description = "The organisation.", body = Organisation), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn organisation(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Read>,
) -> Result<Json<Organisation>, ApiError> {
    let organisation = state
        .store
        .organisation(&key.organisation_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("organisation {}", key.organisation_id)))?;
    Ok(Json(organisation))
}

/// The organisation's projects the key reaches, by id.
#[utoipa::path(get, path = "/api/organisations/{organisation_id}/projects", tag = "organisations",
    params(OrganisationPath, PageQuery),
    responses((status = 200, description = "A page of the projects this key reaches.", body = Page<ProjectSummary>), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn list_projects(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Read>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<ProjectSummary>>, ApiError> {
    let request = page.request::<String>(100)?;
    let rows = filtered(
        &request,
        |after, limit| {
            let (store, organisation) = (state.store.clone(), key.organisation_id.clone());
            async move {
                store
                    .projects_of(&organisation, after.as_deref(), limit)
                    .await
            }
        },
        |project: &ProjectSummary| key.reaches(&project.id),
        |project| project.id.clone(),
    )
    .await?;
    Ok(Json(Page::new(rows, &request, |project| {
        project.id.clone()
    })))
}

/// A project to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewProject {
    #[schema(min_length = 1)]
    name: String,
    /// The IANA time zone its queries bucket days in; UTC when left out.
    timezone: Option<String>,
}

/// A project just created.
#[derive(Serialize, ToSchema)]
struct CreatedProjectView {
    id: String,
    organisation_id: String,
    name: String,
    timezone: String,
    /// The token apps send events with (also the Segment write key).
    capture_token: String,
}

#[utoipa::path(post, path = "/api/organisations/{organisation_id}/projects", tag = "organisations",
    params(OrganisationPath), request_body = NewProject,
    responses((status = 201, description = "The project, with its capture token.", body = CreatedProjectView), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("admin"))))]
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
        Json(CreatedProjectView {
            id: created.project_id,
            organisation_id: created.organisation_id,
            name: name.to_string(),
            timezone: tz.name().to_string(),
            capture_token: created.capture_token,
        }),
    )
        .into_response())
}

/// The organisation's keys that the caller's key covers, by id.
#[utoipa::path(get, path = "/api/organisations/{organisation_id}/keys", tag = "organisations",
    params(OrganisationPath, PageQuery),
    responses((status = 200, description = "A page of keys (never the keys themselves).", body = Page<ApiKey>), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("admin"))))]
async fn list_keys(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Admin>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<ApiKey>>, ApiError> {
    let request = page.request::<String>(100)?;
    let rows = filtered(
        &request,
        |after, limit| {
            let (store, organisation) = (state.store.clone(), key.organisation_id.clone());
            async move { store.keys(&organisation, after.as_deref(), limit).await }
        },
        |other: &ApiKey| key.covers(other.projects.as_deref()),
        |other| other.id.clone(),
    )
    .await?;
    Ok(Json(Page::new(rows, &request, |other| other.id.clone())))
}

/// A key to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewKeyBody {
    /// What the key is for, to tell keys apart in lists.
    #[schema(min_length = 1)]
    name: String,
    /// `read`, `write` or `admin`.
    #[schema(value_type = Scope)]
    scope: String,
    /// The projects the key is limited to; left out for every project of
    /// the organisation.
    projects: Option<Vec<String>>,
}

#[utoipa::path(post, path = "/api/organisations/{organisation_id}/keys", tag = "organisations",
    params(OrganisationPath), request_body = NewKeyBody,
    responses((status = 201, description = "The key, shown this once.", body = NewKey), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("admin"))))]
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
        Ok(created) => Ok((StatusCode::CREATED, Json(created)).into_response()),
        Err(KeyError::ForeignProject(project, _)) => Err(ApiError::Invalid(format!(
            "`projects`: {project} is not a project of this organisation"
        ))),
        Err(KeyError::NoOrganisation(id)) => Err(ApiError::NotFound(format!("organisation {id}"))),
        Err(err @ KeyError::TooMany(_)) => Err(ApiError::OverQuota(err.to_string())),
        Err(KeyError::Store(err)) => Err(err.into()),
    }
}

/// Revokes a key at once. A key may revoke itself.
#[utoipa::path(delete, path = "/api/organisations/{organisation_id}/keys/{key_id}", tag = "organisations",
    params(KeyPath),
    responses((status = 200, description = "The key as it now is.", body = ApiKey), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("admin"))))]
async fn revoke_key(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Admin>,
    ApiPath((_, key_id)): ApiPath<(String, String)>,
) -> Result<Json<ApiKey>, ApiError> {
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
    Ok(Json(revoked))
}

/// Newest first. A key limited to some projects sees their entries only.
#[utoipa::path(get, path = "/api/organisations/{organisation_id}/audit-log", tag = "organisations",
    params(OrganisationPath, PageQuery),
    responses((status = 200, description = "A page of management writes, newest first.", body = Page<AuditEntry>), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("admin"))))]
async fn audit_log(
    State(state): State<ApiState>,
    OrgAuthorised(key, _): OrgAuthorised<Admin>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<AuditEntry>>, ApiError> {
    let request = page.request::<i64>(100)?;
    let entries = state
        .store
        .audit_log(
            &key.organisation_id,
            key.projects.as_deref(),
            request.after,
            request.fetch(),
        )
        .await?;
    Ok(Json(Page::new(entries, &request, |entry| entry.id)))
}

/// The current token first, then retired ones still accepted.
#[utoipa::path(get, path = "/api/projects/{project_id}/capture-tokens", tag = "organisations",
    params(ProjectPath, PageQuery),
    responses((status = 200, description = "The capture tokens still accepted.", body = Page<CaptureToken>), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn capture_tokens(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<CaptureToken>>, ApiError> {
    let request = page.request::<usize>(100)?;
    let tokens = state
        .store
        .capture_tokens(&project_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("project {project_id}")))?;
    // A handful of tokens: paged in memory, by their place in the list.
    let indexed: Vec<(usize, CaptureToken)> = tokens.into_iter().enumerate().collect();
    Ok(Json(
        Page::from_sorted(indexed, &request, |(index, _)| *index).map(|(_, token)| token),
    ))
}

/// A rotation's grace period.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the old token is still accepted, in seconds.
    grace_seconds: Option<u64>,
}

/// A new capture token.
#[derive(Serialize, ToSchema)]
struct RotatedToken {
    capture_token: String,
    /// Until when the token it replaced is still accepted.
    previous_valid_until: String,
}

/// Gives the project a new capture token; the old one is accepted for the
/// grace period (default a day, at most 30 days). The body may be empty.
#[utoipa::path(post, path = "/api/projects/{project_id}/capture-tokens/rotate", tag = "organisations",
    params(ProjectPath), request_body(content = Option<RotateBody>),
    responses((status = 200, description = "The new token.", body = RotatedToken), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("admin"))))]
async fn rotate_capture_token(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Admin>,
    body: axum::body::Bytes,
) -> Result<Json<RotatedToken>, ApiError> {
    // The body is optional: an empty one takes the default grace.
    let body: RotateBody = if body.iter().all(u8::is_ascii_whitespace) {
        RotateBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            ApiError::field(
                "grace_seconds",
                format!(
                    "the request body must be a JSON object such as {{\"grace_seconds\": 3600}}, or empty: {err}"
                ),
            )
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
    Ok(Json(RotatedToken {
        capture_token: token,
        previous_valid_until: valid_until,
    }))
}

/// The routes of this module, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    me,
    organisation,
    list_projects,
    create_project,
    list_keys,
    create_key,
    revoke_key,
    audit_log,
    capture_tokens,
    rotate_capture_token
))]
pub(super) struct Doc;
