//! PostHog's capture endpoints: `/capture`, `/e`, `/batch`, `/i/v0/e`, with
//! or without a trailing slash. The token comes as `api_key` or `token` in
//! the body, the batch or an event's properties. Bodies may be JSON, gzip
//! (`Content-Encoding: gzip` or `?compression=gzip-js`), or a form whose
//! `data` field is base64 JSON.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, header};
use axum::routing::post;
use base64::Engine;
use serde_json::{Map, Value, json};

use super::{CaptureError, Normalizer, RawBatch};
use crate::server::AppState;

pub fn router() -> Router<AppState> {
    let mut router = Router::new();
    for path in ["/capture", "/e", "/batch", "/i/v0/e"] {
        router = router
            .route(path, post(capture).get(capture))
            .route(&format!("{path}/"), post(capture).get(capture));
    }
    router
}

async fn capture(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, CaptureError> {
    let limit = state.config.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| CaptureError::TooLarge { limit })?;
    let value = decode(&headers, &query, &bytes, limit)?;
    let batch = raw_batch(value)?;
    let token = batch.token().ok_or(CaptureError::MissingToken)?;
    let project_id = state
        .store
        .project_for_token(&token)
        .await?
        .ok_or(CaptureError::UnknownToken)?;
    if state.queue_depth.load(Ordering::Relaxed) >= state.config.max_queue_depth {
        return Err(CaptureError::Overloaded {
            retry_after_secs: 5,
        });
    }
    let normalizer = Normalizer {
        now: chrono::Utc::now(),
        ip: state.config.record_ip.then(|| client_ip(&headers, peer)),
    };
    let events = normalizer.normalize(batch)?;
    state.store.enqueue(&project_id, &events).await?;
    state
        .queue_depth
        .fetch_add(events.len() as i64, Ordering::Relaxed);
    state.wake_worker.notify_one();
    Ok(Json(json!({"status": 1})))
}

/// The first `X-Forwarded-For` address when a proxy sets it, else the peer.
fn client_ip(headers: &HeaderMap, peer: SocketAddr) -> String {
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|ip| ip.trim().to_string())
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| peer.ip().to_string())
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

fn gunzip(bytes: &[u8], limit: usize) -> Result<Vec<u8>, CaptureError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|err| CaptureError::Invalid(format!("the body is not valid gzip: {err}")))?;
    if out.len() > limit {
        return Err(CaptureError::TooLarge { limit });
    }
    Ok(out)
}

fn decode(
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    bytes: &Bytes,
    limit: usize,
) -> Result<Value, CaptureError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let compression = query.get("compression").map(String::as_str).unwrap_or("");
    let mut bytes =
        if encoding.contains("gzip") || compression.starts_with("gzip") || is_gzip(bytes) {
            gunzip(bytes, limit)?
        } else {
            bytes.to_vec()
        };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("application/x-www-form-urlencoded") || bytes.starts_with(b"data=")
    {
        let fields: HashMap<String, String> = form_urlencoded::parse(&bytes).into_owned().collect();
        let data = fields.get("data").ok_or_else(|| {
            CaptureError::Invalid("a form body needs a `data` field holding base64 JSON".into())
        })?;
        let trimmed = data.trim().trim_end_matches('=');
        bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(trimmed)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
            .map_err(|err| {
                CaptureError::Invalid(format!("the form field `data` is not base64: {err}"))
            })?;
        if is_gzip(&bytes) {
            bytes = gunzip(&bytes, limit)?;
        }
    }
    serde_json::from_slice(&bytes)
        .map_err(|err| CaptureError::Invalid(format!("the body is not valid JSON: {err}")))
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
