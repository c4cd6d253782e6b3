//! API request bodies arrive within a time bound. Without one, a client
//! with a key could start requests at its rate limit and send each body a
//! byte a minute, holding a connection slot per request until every slot
//! of the server was taken. Capture bounds its bodies itself (see
//! `capture::body::read`); this bounds the API's, without reading them:
//! the body is read by the handler as before (after the key is checked),
//! and fails once the time is up. The answer is then a JSON 408, and the
//! connection, with the rest of the body still on its way, is closed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::error::{ErrorBody, ErrorType};

/// The error a body gives once its time is up.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct TimedOut;

/// A body that fails once `deadline` passes before its end.
struct Deadlined {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

impl HttpBody for Deadlined {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        // The deadline first: a body trickling in a byte at a time always
        // has a frame ready.
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(TimedOut))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Gives the request's body `timeout` to arrive; a request whose body did
/// not gets 408 whatever its handler made of the failed read.
pub async fn bound_body(timeout: Duration, request: Request, next: Next) -> Response {
    let timed_out = Arc::new(AtomicBool::new(false));
    let (parts, body) = request.into_parts();
    let body = Body::new(Deadlined {
        inner: body,
        deadline: Box::pin(tokio::time::sleep(timeout)),
        timed_out: timed_out.clone(),
    });
    let response = next.run(Request::from_parts(parts, body)).await;
    if !timed_out.load(Ordering::Relaxed) {
        return response;
    }
    let detail = format!(
        "the request body did not arrive within {} s; send it again, on a faster link",
        timeout.as_secs_f64()
    );
    let mut response = ErrorBody::new(ErrorType::ValidationError, "body_timeout", detail)
        .respond(StatusCode::REQUEST_TIMEOUT, None);
    // The rest of the body may still be on its way: the connection cannot
    // carry another request.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
