//! Outbound HTTP through the host, with serde bodies.
//!
//! The host sends a request only to hosts listed under `http_hosts` in
//! `plugin.toml` (and allowed by the operator), refuses private and loopback
//! addresses unless the operator allows them, and does not follow redirects.
//!
//! ```no_run
//! # use sluice_plugin_sdk::{http::Request, ExportError};
//! # fn send(body: &serde_json::Value) -> Result<(), ExportError> {
//! Request::post("https://api.example.com/v1/events")
//!     .bearer_auth("token")
//!     .json(body)?
//!     .send()?
//!     .error_for_status()?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, ExportError, Result};

/// An HTTP method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// HEAD
    Head,
    /// POST
    Post,
    /// PUT
    Put,
    /// PATCH
    Patch,
    /// DELETE
    Delete,
}

/// An outbound request, built with the constructors and sent with
/// [`Request::send`].
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// Absolute `http://` or `https://` URL.
    pub url: String,
    /// Headers in the order they are sent.
    pub headers: Vec<(String, String)>,
    /// The body, if any.
    pub body: Option<Vec<u8>>,
    /// Timeout for the whole request; the host's own limit still applies.
    pub timeout: Option<Duration>,
}

impl Request {
    /// A request with no headers and no body.
    pub fn new(method: Method, url: impl Into<String>) -> Self {
        Request {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: None,
            timeout: None,
        }
    }

    /// A GET request.
    pub fn get(url: impl Into<String>) -> Self {
        Request::new(Method::Get, url)
    }

    /// A POST request.
    pub fn post(url: impl Into<String>) -> Self {
        Request::new(Method::Post, url)
    }

    /// A PUT request.
    pub fn put(url: impl Into<String>) -> Self {
        Request::new(Method::Put, url)
    }

    /// A PATCH request.
    pub fn patch(url: impl Into<String>) -> Self {
        Request::new(Method::Patch, url)
    }

    /// A DELETE request.
    pub fn delete(url: impl Into<String>) -> Self {
        Request::new(Method::Delete, url)
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Adds `Authorization: Bearer TOKEN`.
    pub fn bearer_auth(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    /// Adds HTTP Basic authorisation.
    pub fn basic_auth(self, user: &str, password: &str) -> Self {
        let credentials = base64_encode(format!("{user}:{password}").as_bytes());
        self.header("authorization", format!("Basic {credentials}"))
    }

    /// Sets a JSON body and `Content-Type: application/json`.
    pub fn json<T: Serialize + ?Sized>(self, body: &T) -> Result<Self> {
        let bytes = serde_json::to_vec(body)?;
        Ok(self.header("content-type", "application/json").body(bytes))
    }

    /// Sets an `application/x-www-form-urlencoded` body.
    pub fn form(self, fields: &[(&str, &str)]) -> Self {
        let body = fields
            .iter()
            .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        self.header("content-type", "application/x-www-form-urlencoded")
            .body(body.into_bytes())
    }

    /// Sets a raw body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets the timeout for the whole request.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request and waits for the whole response. Any status code is
    /// a response; use [`Response::error_for_status`] to turn failures into
    /// errors.
    pub fn send(&self) -> Result<Response, HttpError> {
        crate::host::http_fetch(self)
    }
}

/// Whether `url` starts with `http://` or `https://` (in any case) and has
/// something after it.
///
/// Check a configured URL with it in [`Plugin::new`](crate::Plugin::new), so
/// a missing scheme fails the install instead of every request. The host
/// still checks the rest when it sends.
pub fn is_absolute_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    ["http://", "https://"]
        .iter()
        .any(|scheme| lower.starts_with(scheme) && lower.len() > scheme.len())
}

/// A response with its whole body.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The body; cut at the host's size limit if it was longer, when the
    /// header `x-sluice-body-truncated` says so.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a status and a body, for mock HTTP handlers.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header, for mock HTTP handlers.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str> {
        std::str::from_utf8(&self.body)
            .map_err(|err| Error::msg(format!("response body is not UTF-8: {err}")))
    }

    /// The body deserialised from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|err| {
            Error::msg(format!(
                "response (status {}) is not the expected JSON: {err}",
                self.status
            ))
        })
    }

    /// The delay the `Retry-After` header asks for, in seconds or as an HTTP
    /// date.
    pub fn retry_after(&self) -> Option<Duration> {
        let value = self.header("retry-after")?.trim();
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(Duration::from_secs(seconds));
        }
        let when = httpdate::parse_http_date(value).ok()?;
        Some(
            when.duration_since(crate::clock::now())
                .unwrap_or(Duration::ZERO),
        )
    }

    /// Keeps a 2xx response and classifies the rest for delivery: 408, 429
    /// and 5xx are retryable (honouring `Retry-After`), anything else is
    /// permanent. The error message carries the status and the start of the
    /// body.
    pub fn error_for_status(self) -> Result<Self, ExportError> {
        if self.is_success() {
            return Ok(self);
        }
        let snippet: String = String::from_utf8_lossy(&self.body)
            .chars()
            .take(300)
            .collect();
        let message = format!("HTTP {}: {}", self.status, snippet.trim());
        if self.status == 408 || self.status == 429 || self.status >= 500 {
            Err(ExportError::Retryable {
                message,
                retry_after: self.retry_after(),
            })
        } else {
            Err(ExportError::Permanent(message))
        }
    }
}

/// Why a request got no response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The host refused to send it; the message names the host and the rule.
    Denied(String),
    /// The URL, a header or the body is malformed.
    InvalidRequest(String),
    /// No answer in time.
    Timeout,
    /// The response body is over the host's limit. Current hosts cut such a
    /// body instead and mark the [`Response`] with the header
    /// `x-sluice-body-truncated`.
    TooLarge(String),
    /// Connecting, TLS or reading failed; usually worth retrying.
    Connection(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(m) => write!(f, "HTTP request denied: {m}"),
            HttpError::InvalidRequest(m) => write!(f, "invalid HTTP request: {m}"),
            HttpError::Timeout => f.write_str("HTTP request timed out"),
            HttpError::TooLarge(m) => write!(f, "HTTP response too large: {m}"),
            HttpError::Connection(m) => write!(f, "HTTP connection failed: {m}"),
        }
    }
}

impl std::error::Error for HttpError {}

fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_is_base64_of_user_and_password() {
        let request = Request::get("https://x").basic_auth("Aladdin", "open sesame");
        assert_eq!(request.headers[0].1, "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    }

    #[test]
    fn form_bodies_are_url_encoded() {
        let request = Request::post("https://x").form(&[("a b", "c&d=é")]);
        assert_eq!(request.body.unwrap(), b"a+b=c%26d%3D%C3%A9");
    }

    #[test]
    fn absolute_urls_need_an_http_scheme_and_something_after_it() {
        assert!(is_absolute_url("https://api.example.com/v1"));
        assert!(is_absolute_url("HTTP://10.0.0.1:8080"));
        for url in ["", "api.example.com", "https://", "ftp://example.com"] {
            assert!(!is_absolute_url(url), "{url}");
        }
    }

    #[test]
    fn statuses_split_into_retryable_and_permanent() {
        let retry = Response::new(429, "slow down").with_header("Retry-After", "7");
        assert_eq!(
            retry.error_for_status(),
            Err(ExportError::Retryable {
                message: "HTTP 429: slow down".into(),
                retry_after: Some(Duration::from_secs(7)),
            })
        );
        assert!(matches!(
            Response::new(503, "").error_for_status(),
            Err(ExportError::Retryable { .. })
        ));
        assert_eq!(
            Response::new(400, "bad field").error_for_status(),
            Err(ExportError::Permanent("HTTP 400: bad field".into()))
        );
        assert!(Response::new(204, "").error_for_status().is_ok());
    }
}
