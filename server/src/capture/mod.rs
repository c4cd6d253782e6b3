//! The capture API: PostHog-compatible endpoints. A request is decoded
//! (gzip, form `data=`, JSON), every event is normalised, and the whole
//! request is written to the durable queue in one transaction before the 200;
//! a request with any bad event stores nothing.

mod commit;
mod normalize;
mod posthog;
mod segment;
mod tokens;

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use base64::Engine;
use serde_json::Value;

use crate::config::ServeConfig;
use crate::queue::{QueueGauge, Wakeups};
use crate::store::{QueueWrite, Store};

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};

use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::Semaphore;

pub use commit::GroupCommit;
pub use normalize::{Normalizer, RawBatch};
pub use tokens::TokenCache;

/// What capture needs: where to write, the queue's bounds and gauge, and
/// whom to wake.
#[derive(Clone)]
pub struct CaptureState {
    pub store: Store,
    pub config: Arc<ServeConfig>,
    /// The capture queue's depth and oldest age, cheap enough to check on
    /// every request.
    pub queue: Arc<QueueGauge>,
    /// Where capture writes: concurrent requests share commits.
    pub commit: GroupCommit,
    pub tokens: TokenCache,
    pub wake: Wakeups,
}

/// The PostHog- and Segment-compatible capture routes. Browsers send
/// events from other origins (posthog-js, analytics.js), so CORS allows any
/// origin, with credentials, and answers preflights.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    CaptureState: axum::extract::FromRef<S>,
{
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    posthog::router()
        .merge(segment::router())
        .layer(axum::middleware::from_fn(move |request, next| {
            shed_over_limit(in_flight.clone(), request, next)
        }))
        .layer(tower_http::cors::CorsLayer::very_permissive())
}

/// Capture requests handled at once. Each holds its body, decoded and
/// parsed, until its group commit is done; without a cap, clients that
/// keep sending while the server is slow (or many at once) grew the
/// server's memory past 2 GiB in the load benchmark. Past the cap a
/// request is answered 503 at once, before its body is read.
const MAX_IN_FLIGHT: usize = 256;

async fn shed_over_limit(
    in_flight: Arc<Semaphore>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match in_flight.try_acquire_owned() {
        Ok(permit) => {
            let response = next.run(request).await;
            drop(permit);
            response
        }
        Err(_) => CaptureError::Overloaded {
            reason: format!(
                "the server is busy: {MAX_IN_FLIGHT} capture requests are being handled"
            ),
            retry_after_secs: 1,
        }
        .into_response(),
    }
}

/// Stores a decoded request: checks the token and the queue's bounds,
/// normalises every event, and writes them all to the queue in one
/// transaction (shared with other requests arriving at the same time).
pub(crate) async fn accept(
    state: &CaptureState,
    token: &str,
    batch: RawBatch,
    ip: Option<String>,
) -> Result<usize, CaptureError> {
    let project_id = state
        .tokens
        .project_for(&state.store, token)
        .await?
        .ok_or(CaptureError::UnknownToken)?;
    if state.queue.depth() >= state.config.max_queue_depth {
        return Err(CaptureError::Overloaded {
            reason: "the queue is full".into(),
            retry_after_secs: 5,
        });
    }
    let age = state.queue.oldest_age();
    if age >= state.config.max_queue_age {
        return Err(CaptureError::Overloaded {
            reason: format!(
                "the queue is behind: its oldest event has waited {} s to be stored, over the bound of {} s",
                age.as_secs(),
                state.config.max_queue_age.as_secs()
            ),
            retry_after_secs: 5,
        });
    }
    if let Some(wait) = state.queue.predicted_wait()
        && wait >= state.config.max_queue_age
    {
        return Err(CaptureError::Overloaded {
            reason: format!(
                "the queue is behind: it holds {} events, about {} s of work at the rate this server stores them, over the bound of {} s",
                state.queue.depth(),
                wait.as_secs(),
                state.config.max_queue_age.as_secs()
            ),
            retry_after_secs: 5,
        });
    }
    let normalizer = Normalizer {
        now: chrono::Utc::now(),
        ip,
    };
    let events = normalizer.normalize(batch)?;
    let count = events.len();
    state
        .commit
        .enqueue(QueueWrite::new(&project_id, &events))
        .await?;
    state.queue.added(count);
    state.wake.worker.notify_one();
    Ok(count)
}

/// Why a capture request was refused. Grouped by status code in
/// `IntoResponse`.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{0}")]
    Invalid(String),
    #[error("no capture token in the request: send it as `api_key` or `token`")]
    MissingToken,
    #[error("unknown capture token: check the project's token")]
    UnknownToken,
    #[error("the request body is over the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error(
        "the request holds {count} events, over the limit of {limit} per request; send them in smaller batches"
    )]
    TooManyEvents { count: usize, limit: usize },
    #[error("{reason}; retry after {retry_after_secs} s")]
    Overloaded {
        reason: String,
        retry_after_secs: u64,
    },
    #[error("storage failed")]
    Store(#[from] crate::store::Error),
}

impl IntoResponse for CaptureError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            CaptureError::Invalid(_) => (StatusCode::BAD_REQUEST, "validation_error"),
            CaptureError::MissingToken | CaptureError::UnknownToken => {
                (StatusCode::UNAUTHORIZED, "authentication_error")
            }
            CaptureError::TooLarge { .. } | CaptureError::TooManyEvents { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "validation_error")
            }
            CaptureError::Overloaded { .. } | CaptureError::Store(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error")
            }
        };
        let detail = match &self {
            // Details of storage failures go to the log, not to clients.
            CaptureError::Store(err) => {
                tracing::error!("capture failed to store a request: {err}");
                "the server could not store the request; retry later".to_string()
            }
            other => other.to_string(),
        };
        let mut response = (status, Json(json!({"type": kind, "detail": detail}))).into_response();
        if let CaptureError::Overloaded {
            retry_after_secs, ..
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        } else if matches!(self, CaptureError::Store(_)) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(5u64));
        }
        response
    }
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

pub(crate) fn decode(
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
    // `curl -d '{...}'` labels JSON as a form: trust the bytes over the label.
    let looks_like_json = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[');
    if (content_type.starts_with("application/x-www-form-urlencoded") && !looks_like_json)
        || bytes.starts_with(b"data=")
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
