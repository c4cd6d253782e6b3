//! The capture API: PostHog-compatible endpoints. A request is decoded
//! (gzip, form `data=` base64 or LZ-string, JSON), every event is
//! normalised, and the whole request is written to the durable queue in
//! one transaction before the 200; a request with any bad event stores
//! nothing.
//!
//! Capture is shared by every project, so what one token sends must not
//! cost the others: a token is checked (known, within its project's
//! request rate, its project's queue not over its share) before its body
//! is read wherever the wire format puts the token outside the body; a
//! body must arrive, and a request finish, within a time bound; and large
//! bodies are parsed off the async runtime.

mod body;
mod bounded;
mod commit;
mod lz64;
mod normalize;
mod posthog;
mod segment;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::MatchedPath;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::api::error::{ErrorBody, ErrorType};
use crate::config::ServeConfig;
use crate::metrics::Metrics;
use crate::model::Quotas;
use crate::model::quotas::Hit;
use crate::queue::{QueueGauge, Wakeups};
use crate::quotas::QuotaBook;
use crate::store::{QueueWrite, Store};

pub use crate::rates::RequestRates;
pub use crate::tokens::TokenCache;
pub use body::Parsers;
pub use commit::GroupCommit;
pub use normalize::{Normalizer, RawBatch};

/// What capture needs: where to write, the queue's bounds and gauge, the
/// projects' quotas, and whom to wake.
#[derive(Clone)]
pub struct CaptureState {
    pub store: Store,
    pub config: Arc<ServeConfig>,
    /// The capture queue's depth and oldest age, in all and per project,
    /// cheap enough to check on every request.
    pub queue: Arc<QueueGauge>,
    /// Where capture writes: concurrent requests share commits.
    pub commit: GroupCommit,
    pub tokens: TokenCache,
    pub quotas: QuotaBook,
    /// Each token's `capture_requests_per_second`.
    pub rates: RequestRates,
    pub parsers: Parsers,
    pub wake: Wakeups,
}

impl CaptureState {
    /// Capture's state, with its own group commit writers, token cache,
    /// request rates and parsers.
    pub fn new(
        store: Store,
        config: Arc<ServeConfig>,
        queue: Arc<QueueGauge>,
        quotas: QuotaBook,
        wake: Wakeups,
    ) -> CaptureState {
        CaptureState {
            commit: GroupCommit::start(store.clone()),
            store,
            config,
            queue,
            tokens: TokenCache::default(),
            quotas,
            rates: RequestRates::default(),
            parsers: Parsers::default(),
            wake,
        }
    }
}

/// The PostHog- and Segment-compatible capture routes. Browsers send
/// events from other origins (posthog-js, analytics.js), so CORS allows any
/// origin, with credentials, and answers preflights. Every answer is
/// counted in `metrics`, shed and timed-out requests included.
pub fn router<S>(config: &ServeConfig, metrics: Arc<Metrics>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    CaptureState: axum::extract::FromRef<S>,
{
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let timeout = config.capture_request_timeout;
    posthog::router()
        .merge(segment::router())
        .layer(axum::middleware::from_fn(move |request, next| {
            limit_requests(in_flight.clone(), timeout, request, next)
        }))
        .layer(axum::middleware::from_fn(move |request, next| {
            count_requests(metrics.clone(), request, next)
        }))
        .layer(tower_http::cors::CorsLayer::very_permissive())
}

/// How many events a capture request held, once its body was read; set
/// on the answer by [`answer`] for [`count_requests`].
#[derive(Clone, Copy, Debug)]
struct EventCount(usize);

/// The class of a refusal (see [`CaptureError::reason`]), set on the
/// answer for [`count_requests`].
#[derive(Clone, Copy, Debug)]
struct Refused(&'static str);

/// A handler's answer, carrying the number of events the request held if
/// its body was read.
pub(crate) fn answer(
    result: Result<Json<serde_json::Value>, CaptureError>,
    events: Option<usize>,
) -> Response {
    let mut response = result.into_response();
    if let Some(events) = events {
        response.extensions_mut().insert(EventCount(events));
    }
    response
}

/// Counts each answer by endpoint and status, and its events by outcome.
async fn count_requests(
    metrics: Arc<Metrics>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let endpoint = endpoint(request.extensions().get::<MatchedPath>());
    let response = next.run(request).await;
    let events = response.extensions().get::<EventCount>().map(|c| c.0);
    let refused = response.extensions().get::<Refused>().map(|r| r.0);
    metrics.capture_request(endpoint, response.status(), events, refused);
    response
}

/// The `endpoint` label: the route, without a trailing slash, from a
/// fixed set, so no request can make a new series.
fn endpoint(path: Option<&MatchedPath>) -> &'static str {
    let path = path.map_or("", |path| path.as_str().trim_end_matches('/'));
    ["/capture", "/e", "/batch", "/i/v0/e", "/v1/{kind}"]
        .into_iter()
        .find(|known| *known == path)
        .unwrap_or("other")
}

/// The OpenAPI description of the capture routes: each PostHog path, and
/// Segment's, with and without the trailing slash they are routed with.
pub fn document() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    let mut doc = posthog::Doc::openapi();
    doc.merge(segment::Doc::openapi());
    for path in posthog::PATHS {
        crate::api::openapi::copy_path(&mut doc, posthog::DOCUMENTED_PATH, path);
        crate::api::openapi::copy_path(&mut doc, posthog::DOCUMENTED_PATH, &format!("{path}/"));
    }
    let segment = segment::DOCUMENTED_PATH;
    crate::api::openapi::copy_path(&mut doc, segment, &format!("{segment}/"));
    doc
}

/// Capture requests handled at once. Each holds its body, decoded and
/// parsed, until its group commit is done; without a cap, clients that
/// keep sending while the server is slow (or many at once) grew the
/// server's memory past 2 GiB in the load benchmark. Past the cap a
/// request is answered 503 at once, before its body is read.
const MAX_IN_FLIGHT: usize = 256;

/// Sheds requests past [`MAX_IN_FLIGHT`], and answers a request that has
/// not finished within `timeout` (waiting for a parser, a slow commit), so
/// no request keeps its slot for long.
async fn limit_requests(
    in_flight: Arc<Semaphore>,
    timeout: Duration,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Ok(permit) = in_flight.try_acquire_owned() else {
        return CaptureError::Overloaded {
            reason: format!(
                "the server is busy: {MAX_IN_FLIGHT} capture requests are being handled"
            ),
            retry_after_secs: 1,
        }
        .into_response();
    };
    let response = match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => CaptureError::TimedOut {
            seconds: timeout.as_secs_f64(),
        }
        .into_response(),
    };
    drop(permit);
    response
}

/// Seconds a client is asked to wait when capture is behind.
const BEHIND_RETRY_SECS: u64 = 5;

/// Checks what the token alone decides, so a request that will be refused
/// is refused before its body is read or parsed where the token comes
/// outside the body: the token is known, within its project's
/// `capture_requests_per_second`, and the project's part of the queue has
/// room. Returns the token's project.
pub(crate) async fn admit(state: &CaptureState, token: &str) -> Result<String, CaptureError> {
    let project_id = state
        .tokens
        .project_for(&state.store, token)
        .await?
        .ok_or(CaptureError::UnknownToken)?;
    let quotas = state.quotas.get(&project_id);
    if let Err(wait) = state.rates.take(token, quotas.capture_requests_per_second) {
        let hit = Hit {
            quota: "capture_requests_per_second",
            limit: quotas.capture_requests_per_second.into(),
        };
        return Err(CaptureError::RateLimited {
            reason: format!("this capture token sends requests faster than {hit}"),
            retry_after_secs: (wait.as_secs_f64().ceil() as u64).max(1),
        });
    }
    queue_has_room(state, &project_id, &quotas)?;
    Ok(project_id)
}

/// Refuses a project's request while its own part of the queue is over
/// its share or behind. The worker takes an equal slice of each waiting
/// project's events, so only the project's own backlog decides how long
/// its events would wait: a project's flood gets that project refused,
/// not every project. `max_queue_depth` stays as a cap on everyone.
fn queue_has_room(
    state: &CaptureState,
    project_id: &str,
    quotas: &Quotas,
) -> Result<(), CaptureError> {
    let behind = |reason: String| CaptureError::Overloaded {
        reason,
        retry_after_secs: BEHIND_RETRY_SECS,
    };
    if state.queue.depth() >= state.config.max_queue_depth {
        return Err(behind("the queue is full".into()));
    }
    let max_age = state.config.max_queue_age;
    let backlog = state.queue.backlog(project_id);
    if backlog.depth >= 0 && backlog.depth as u64 >= quotas.queued_events {
        let hit = Hit {
            quota: "queued_events",
            limit: quotas.queued_events,
        };
        return Err(behind(format!(
            "the project's events waiting in the queue to be stored ({}) are at {hit}",
            backlog.depth
        )));
    }
    if backlog.oldest_age >= max_age {
        return Err(behind(format!(
            "the queue is behind: its oldest event has waited {} s to be stored, over the bound of {} s (counting only this project's events)",
            backlog.oldest_age.as_secs(),
            max_age.as_secs()
        )));
    }
    if let Some(wait) = backlog.predicted_wait
        && wait >= max_age
    {
        return Err(behind(format!(
            "the queue is behind: it holds {} events of this project, about {} s of work at the rate this server stores them shared by {} projects waiting, over the bound of {} s",
            backlog.depth,
            wait.as_secs(),
            backlog.projects_waiting,
            max_age.as_secs()
        )));
    }
    Ok(())
}

/// Stores a request of `project_id` (see [`admit`]): normalises every
/// event, and writes them all to the queue in one transaction (shared with
/// other requests arriving at the same time).
pub(crate) async fn accept(
    state: &CaptureState,
    project_id: &str,
    batch: RawBatch,
    ip: Option<String>,
) -> Result<usize, CaptureError> {
    let normalizer = Normalizer {
        now: chrono::Utc::now(),
        ip,
    };
    let events = normalizer.normalize(batch)?;
    let count = events.len();
    state
        .commit
        .enqueue(QueueWrite::new(project_id, &events))
        .await?;
    state.queue.added(project_id, count);
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
        "the request body's JSON would take more than {budget_mib} MiB of memory to read: it is nested or packed far beyond event data; send events as the capture API documents them"
    )]
    TooComplex { budget_mib: usize },
    #[error(
        "the request holds {count} events, over the limit of {limit} per request; send them in smaller batches"
    )]
    TooManyEvents { count: usize, limit: usize },
    #[error(
        "{which}is larger than the limit of {limit} bytes per event (as JSON); move bulky data out of event properties"
    )]
    EventTooLarge { which: String, limit: usize },
    #[error(
        "the request body did not arrive within {seconds} s; send it again, in smaller requests on a slow link"
    )]
    BodyTimeout { seconds: f64 },
    #[error("{reason}; retry after {retry_after_secs} s")]
    RateLimited {
        reason: String,
        retry_after_secs: u64,
    },
    #[error("{reason}; retry after {retry_after_secs} s")]
    Overloaded {
        reason: String,
        retry_after_secs: u64,
    },
    #[error(
        "the server did not finish the request within {seconds} s; retry later (a retried event keeps its uuid and is stored once)"
    )]
    TimedOut { seconds: f64 },
    /// Refused before the body was read: the rest of the body may still be
    /// on its way, so the connection cannot carry another request.
    #[error("{0}")]
    Unread(Box<CaptureError>),
    #[error("storage failed")]
    Store(#[from] crate::store::Error),
}

impl CaptureError {
    /// The refusal's class, for the `reason` label of
    /// `sluice_capture_events_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            CaptureError::Invalid(_) => "invalid",
            CaptureError::MissingToken => "missing_token",
            CaptureError::UnknownToken => "unknown_token",
            CaptureError::TooLarge { .. }
            | CaptureError::TooComplex { .. }
            | CaptureError::TooManyEvents { .. }
            | CaptureError::EventTooLarge { .. } => "too_large",
            CaptureError::BodyTimeout { .. } => "body_timeout",
            CaptureError::RateLimited { .. } => "rate_limited",
            CaptureError::Overloaded { .. } => "overloaded",
            CaptureError::TimedOut { .. } => "timed_out",
            CaptureError::Store(_) => "store_error",
            CaptureError::Unread(refused) => refused.reason(),
        }
    }

    /// This refusal, answered before the request's body was read.
    pub(crate) fn unread(self) -> CaptureError {
        CaptureError::Unread(Box::new(self))
    }

    /// Seconds a client should wait before sending again, for the answers
    /// that say so.
    fn retry_after_secs(&self) -> Option<u64> {
        match self {
            CaptureError::RateLimited {
                retry_after_secs, ..
            }
            | CaptureError::Overloaded {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            CaptureError::TimedOut { .. } | CaptureError::Store(_) => Some(BEHIND_RETRY_SECS),
            _ => None,
        }
    }
}

impl IntoResponse for CaptureError {
    fn into_response(self) -> Response {
        if let CaptureError::Unread(refused) = self {
            let mut response = refused.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
        use ErrorType::*;
        let (status, kind, code) = match &self {
            CaptureError::Invalid(_) => {
                (StatusCode::BAD_REQUEST, ValidationError, "invalid_payload")
            }
            CaptureError::MissingToken => (
                StatusCode::UNAUTHORIZED,
                AuthenticationError,
                "missing_token",
            ),
            CaptureError::UnknownToken => (
                StatusCode::UNAUTHORIZED,
                AuthenticationError,
                "invalid_token",
            ),
            CaptureError::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ValidationError,
                "payload_too_large",
            ),
            CaptureError::TooComplex { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ValidationError,
                "payload_too_complex",
            ),
            CaptureError::TooManyEvents { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ValidationError,
                "too_many_events",
            ),
            CaptureError::EventTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ValidationError,
                "event_too_large",
            ),
            CaptureError::BodyTimeout { .. } => {
                (StatusCode::REQUEST_TIMEOUT, ValidationError, "body_timeout")
            }
            CaptureError::RateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, Throttled, "rate_limited")
            }
            CaptureError::Overloaded { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, Unavailable, "overloaded")
            }
            CaptureError::TimedOut { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                Unavailable,
                "request_timeout",
            ),
            CaptureError::Store(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Unavailable,
                "storage_unavailable",
            ),
            CaptureError::Unread(_) => unreachable!("answered by the refusal it holds"),
        };
        let detail = match &self {
            // Details of storage failures go to the log, not to clients.
            CaptureError::Store(err) => {
                tracing::error!("capture failed to store a request: {err}");
                "the server could not store the request; retry later".to_string()
            }
            other => other.to_string(),
        };
        let attr = match &self {
            CaptureError::MissingToken => "api_key",
            _ => "",
        };
        let mut response = ErrorBody::new(kind, code, detail)
            .attr(attr)
            .respond(status, self.retry_after_secs());
        response.extensions_mut().insert(Refused(self.reason()));
        if matches!(self, CaptureError::BodyTimeout { .. }) {
            // The rest of the body is still on its way: the connection
            // cannot carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
