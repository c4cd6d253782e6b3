//! The capture API: PostHog-compatible endpoints. A request is decoded
//! (gzip, form `data=`, JSON), every event is normalised, and the whole
//! request is written to the durable queue in one transaction before the 200;
//! a request with any bad event stores nothing.

mod normalize;
mod posthog;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub use normalize::{Normalizer, RawBatch};
pub use posthog::router;

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
    #[error("the queue is full; retry after {retry_after_secs} s")]
    Overloaded { retry_after_secs: u64 },
    #[error("storage failed")]
    Store(#[from] sqlx::Error),
}

impl IntoResponse for CaptureError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            CaptureError::Invalid(_) => (StatusCode::BAD_REQUEST, "validation_error"),
            CaptureError::MissingToken | CaptureError::UnknownToken => {
                (StatusCode::UNAUTHORIZED, "authentication_error")
            }
            CaptureError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "validation_error"),
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
        if let CaptureError::Overloaded { retry_after_secs } = self {
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
