//! The audit log: every management write made through the API is recorded
//! with the key that made it, the route, the path and the answer's status.
//!
//! The extractors that check a key (`Authorised`, `OrgAuthorised`) note
//! who is calling in a slot this middleware put in the request; once the
//! handler has answered, a write with a noted caller is recorded. A
//! request refused before its key was checked has no caller and leaves no
//! entry: it changed nothing, and an unknown key names no organisation.

use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;

use crate::store::{ApiKey, NewAuditEntry, Store};

/// POST routes that change nothing, so are not audited.
const READS: [&str; 1] = ["/api/projects/{project_id}/query"];

/// Who made a request, once their key was checked.
#[derive(Clone, Default)]
struct Slot(Arc<Mutex<Option<(Store, NewAuditEntry)>>>);

/// Notes the caller of a request, for the middleware to record.
pub(super) fn note(parts: &Parts, store: &Store, key: &ApiKey, project_id: Option<&str>) {
    if let Some(slot) = parts.extensions.get::<Slot>() {
        *slot.0.lock().expect("not poisoned") = Some((
            store.clone(),
            NewAuditEntry {
                organisation_id: key.organisation_id.clone(),
                project_id: project_id.map(str::to_string),
                actor: key.id.clone(),
                action: String::new(),
                target: None,
                status: 0,
            },
        ));
    }
}

pub(super) async fn record(mut request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string());
    let writes = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS)
        && route
            .as_deref()
            .is_some_and(|route| !READS.contains(&route));
    if !writes {
        return next.run(request).await;
    }
    let path = request.uri().path().to_string();
    let slot = Slot::default();
    request.extensions_mut().insert(slot.clone());
    let response = next.run(request).await;
    let noted = slot.0.lock().expect("not poisoned").take();
    if let Some((store, mut entry)) = noted {
        entry.action = format!("{method} {}", route.unwrap_or_default());
        entry.target = Some(path);
        entry.status = response.status().as_u16();
        // The change is made; an entry that cannot be written is an
        // operator's problem to see, not a reason to answer otherwise.
        if let Err(err) = store.record_audit(&entry).await {
            tracing::error!(
                "could not write the audit log entry for {} by key {}: {err}",
                entry.action,
                entry.actor
            );
        }
    }
    response
}
