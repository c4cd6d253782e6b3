//! The one error shape every route answers with, the management API and
//! capture alike: `{"type", "code", "detail", "attr"}`. `type` is the class
//! of failure a client can branch on, `code` a stable machine-readable
//! reason, `detail` the sentence for a person (what went wrong and what to
//! do), and `attr` the field or parameter at fault, or null.
//!
//! Handlers build it through their own error enums (`ApiError`,
//! `CaptureError`, `QueryError`); what axum answers by itself (an unknown
//! route, a wrong method, a body it would not read) is rewritten into it by
//! [`uniform_errors`], so a client never meets a second shape.

use axum::Json;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The class of a failure: what a client can do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// The request is wrong: fix it before sending it again.
    ValidationError,
    /// No credential, or one the server does not know.
    AuthenticationError,
    /// A known credential that may not do this, or a quota that forbids it.
    PermissionDenied,
    /// Nothing at this path, or no such resource.
    NotFound,
    /// Too many requests: send again after `Retry-After` seconds.
    Throttled,
    /// The server failed; details are in its log, not in the answer.
    ServerError,
    /// The server cannot take the request now: retry after `Retry-After`.
    Unavailable,
}

/// An error answer. Every status of 400 and above has this body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "type": "validation_error",
    "code": "invalid_input",
    "detail": "`limit` must be a number from 1 to 1000, got 0",
    "attr": "limit"
}))]
pub struct ErrorBody {
    #[serde(rename = "type")]
    pub kind: ErrorType,
    /// A stable machine-readable reason, listed in docs/api.md.
    pub code: String,
    /// What went wrong and what to do about it.
    pub detail: String,
    /// The request field or parameter at fault, if one is.
    #[schema(required = true)]
    pub attr: Option<String>,
}

impl ErrorBody {
    pub fn new(kind: ErrorType, code: &str, detail: impl Into<String>) -> ErrorBody {
        ErrorBody {
            kind,
            code: code.to_string(),
            detail: detail.into(),
            attr: None,
        }
    }

    /// Names the field or parameter at fault; an empty name names none.
    pub fn attr(mut self, attr: impl Into<String>) -> ErrorBody {
        let attr = attr.into();
        self.attr = (!attr.is_empty()).then_some(attr);
        self
    }

    /// The answer, with `Retry-After` when the client should wait.
    pub fn respond(self, status: StatusCode, retry_after_secs: Option<u64>) -> Response {
        let mut response = (status, Json(self)).into_response();
        if let Some(seconds) = retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The field a serde error names (``missing field `x` ``, ``unknown field
/// `x` ``), or, for errors with a path (`limit: invalid digit`), the path.
pub(crate) fn attr_of_serde_error(message: &str) -> Option<String> {
    if let Some(start) = message.find("field `") {
        let rest = &message[start + "field `".len()..];
        return rest.find('`').map(|end| rest[..end].to_string());
    }
    let segments: Vec<&str> = message.split(": ").collect();
    let path = segments.len().checked_sub(2).map(|i| segments[i].trim())?;
    let is_path = !path.is_empty()
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']' | '-'));
    is_path.then(|| path.to_string())
}

/// Answers an unknown route. Installed as the router's fallback.
pub async fn unknown_route(request: Request) -> Response {
    ErrorBody::new(
        ErrorType::NotFound,
        "unknown_route",
        format!(
            "there is no route {} {}; the routes are listed at /api/openapi.json",
            request.method(),
            request.uri().path()
        ),
    )
    .respond(StatusCode::NOT_FOUND, None)
}

/// Largest body of a non-JSON error answer that is rewritten; axum's own
/// rejections are one line.
const MAX_REWRITTEN_BODY: usize = 64 << 10;

/// A middleware over the whole app: an error answer that is not JSON
/// (one of axum's own: a method the route does not serve, a body over its
/// limit, a path parameter that does not parse) is rewritten into
/// [`ErrorBody`], keeping its status and headers (`Allow`, `Retry-After`,
/// `Connection: close`).
pub async fn uniform_errors(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, MAX_REWRITTEN_BODY).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let (kind, code) = class_of(status);
    let detail = match status {
        // axum's own answer when a route does not serve the method, which
        // leaves each route's layers (capture's CORS) in place.
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "{path} does not serve {method}; the methods of each route are listed at /api/openapi.json"
        ),
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_string(),
        _ => text,
    };
    let attr = attr_of_serde_error(&detail).unwrap_or_default();
    let body = serde_json::to_vec(&ErrorBody::new(kind, code, detail).attr(attr))
        .expect("an error body serialises");
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// The type and code of an answer known only by its status.
fn class_of(status: StatusCode) -> (ErrorType, &'static str) {
    match status {
        StatusCode::UNAUTHORIZED => (ErrorType::AuthenticationError, "not_authenticated"),
        StatusCode::FORBIDDEN => (ErrorType::PermissionDenied, "permission_denied"),
        StatusCode::NOT_FOUND => (ErrorType::NotFound, "not_found"),
        StatusCode::METHOD_NOT_ALLOWED => (ErrorType::ValidationError, "method_not_allowed"),
        StatusCode::PAYLOAD_TOO_LARGE => (ErrorType::ValidationError, "payload_too_large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            (ErrorType::ValidationError, "unsupported_media_type")
        }
        StatusCode::TOO_MANY_REQUESTS => (ErrorType::Throttled, "throttled"),
        StatusCode::SERVICE_UNAVAILABLE => (ErrorType::Unavailable, "unavailable"),
        status if status.is_server_error() => (ErrorType::ServerError, "server_error"),
        _ => (ErrorType::ValidationError, "invalid_request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_errors_name_their_field() {
        assert_eq!(
            attr_of_serde_error("missing field `plugin_sha256` at line 1 column 2").as_deref(),
            Some("plugin_sha256")
        );
        assert_eq!(
            attr_of_serde_error("Failed to deserialize query string: limit: invalid digit")
                .as_deref(),
            Some("limit")
        );
        assert_eq!(attr_of_serde_error("expected value at line 1"), None);
    }
}
