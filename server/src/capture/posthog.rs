//! PostHog's capture endpoints: `/capture`, `/e`, `/batch`, `/i/v0/e`, with
//! or without a trailing slash. The token comes as `api_key` or `token` in
//! the body, the batch or an event's properties, or in the query string
//! (checked before the body is read). Bodies may be JSON, gzip
//! (`Content-Encoding: gzip` or `?compression=gzip-js`), or a form whose
//! `data` field is base64 JSON.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::listener::{Peer, client_ip};
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use serde_json::{Map, Value, json};

use super::CaptureState;
use super::{CaptureError, RawBatch, body};
use crate::api::openapi::{CaptureBody, CaptureErrors, CaptureOk};

/// Where PostHog's SDKs send events; each is served with a trailing slash
/// too.
pub(super) const PATHS: [&str; 4] = ["/capture", "/e", "/batch", "/i/v0/e"];

/// The path the handler's attribute documents; the document copies it to
/// the others.
pub(super) const DOCUMENTED_PATH: &str = "/e";

pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    CaptureState: axum::extract::FromRef<S>,
{
    let mut router = Router::new();
    for path in PATHS {
        router = router
            .route(path, post(capture).get(capture))
            .route(&format!("{path}/"), post(capture).get(capture));
    }
    router
}

/// Query parameters of PostHog's capture.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct CaptureQuery {
    /// The project's capture token, checked before the body is read (it
    /// may instead be in the body as `api_key` or `token`).
    api_key: Option<String>,
    /// Same as `api_key`.
    token: Option<String>,
    /// `gzip-js` for a gzip body.
    compression: Option<String>,
}

/// One event (`{"event", "distinct_id", "properties", ...}`), an array of
/// events, or `{"batch": [...], "api_key": ...}`, as JSON, gzip JSON, or a
/// form whose `data` field is base64 JSON. Nothing is stored unless every
/// event is valid.
#[utoipa::path(method(get, post), path = "/e", tag = "capture", operation_id = "post_e",
    params(CaptureQuery),
    request_body(content = CaptureBody, description = "An event, an array of events, or a batch. \
        Also accepted: the same gzip-compressed (`Content-Encoding: gzip` or `?compression=gzip-js`), \
        or a form whose `data` field is base64 JSON."),
    responses((status = 200, description = "Every event was stored.", body = CaptureOk), CaptureErrors))]
async fn capture(
    State(state): State<CaptureState>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut events = None;
    let result = receive(&state, peer, &query, &headers, body, &mut events).await;
    super::answer(result.map(|()| Json(json!({"status": 1}))), events)
}

/// Reads, checks and stores one request; sets `events` once the body says
/// how many it holds.
async fn receive(
    state: &CaptureState,
    peer: SocketAddr,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
    events: &mut Option<usize>,
) -> Result<(), CaptureError> {
    // A token in the query string is checked before the body is read; one
    // in the body (the usual place) only once it is parsed.
    let query_token = ["api_key", "token"]
        .iter()
        .find_map(|key| query.get(*key).filter(|token| !token.is_empty()))
        .cloned();
    let admitted = match &query_token {
        Some(token) => Some(
            super::admit(state, token)
                .await
                .map_err(CaptureError::unread)?,
        ),
        None => None,
    };
    let limit = state.config.max_body_bytes;
    let bytes = body::read(body, limit, state.config.capture_body_timeout).await?;
    let value = state.parsers.parse(headers, query, bytes, limit).await?;
    let batch = raw_batch(value)?;
    *events = Some(batch.events.len());
    // A token in the body wins, as it did before the query was read.
    let project_id = match (batch.token(), admitted) {
        (Some(token), Some(project_id)) if Some(&token) == query_token.as_ref() => project_id,
        (Some(token), _) => super::admit(state, &token).await?,
        (None, Some(project_id)) => project_id,
        (None, None) => return Err(CaptureError::MissingToken),
    };
    let ip = state
        .config
        .record_ip
        .then(|| client_ip(headers, peer, &state.config.trusted_proxies));
    super::accept(state, &project_id, batch, ip).await?;
    Ok(())
}

fn objects(items: Vec<Value>) -> Result<Vec<Map<String, Value>>, CaptureError> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(map) => Ok(map),
            _ => Err(CaptureError::Invalid(format!(
                "event #{} is not a JSON object",
                i + 1
            ))),
        })
        .collect()
}

fn take_string(map: &mut Map<String, Value>, key: &str) -> Option<String> {
    match map.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn raw_batch(value: Value) -> Result<RawBatch, CaptureError> {
    match value {
        Value::Object(mut map) if map.contains_key("batch") => {
            let events = match map.remove("batch") {
                Some(Value::Array(items)) => objects(items)?,
                _ => {
                    return Err(CaptureError::Invalid(
                        "`batch` must be an array of events".into(),
                    ));
                }
            };
            Ok(RawBatch {
                token: take_string(&mut map, "api_key").or_else(|| take_string(&mut map, "token")),
                sent_at: take_string(&mut map, "sent_at"),
                events,
            })
        }
        Value::Object(mut map) => Ok(RawBatch {
            token: take_string(&mut map, "api_key").or_else(|| take_string(&mut map, "token")),
            sent_at: None,
            events: vec![map],
        }),
        Value::Array(items) => Ok(RawBatch {
            token: None,
            sent_at: None,
            events: objects(items)?,
        }),
        _ => Err(CaptureError::Invalid(
            "the body must be an event, an array of events or {\"batch\": [...]}".into(),
        )),
    }
}

/// The route of this module, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(capture))]
pub(super) struct Doc;
