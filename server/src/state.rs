//! The state the HTTP routes share. Capture and the API each take only
//! their own part ([`CaptureState`], [`ApiState`]) through axum's
//! `FromRef`, so neither sees the other's handles, and neither imports
//! this module.

use std::sync::Arc;

use axum::extract::FromRef;

use crate::api::ApiState;
use crate::capture::CaptureState;
use crate::metrics::MetricsState;
use crate::supervisor::Readiness;

#[derive(Clone)]
pub struct AppState {
    pub capture: CaptureState,
    pub api: ApiState,
    /// What `/_ready` reports of the background tasks.
    pub readiness: Arc<Readiness>,
    /// What `/metrics` reads, and whom it answers.
    pub metrics: MetricsState,
}

impl FromRef<AppState> for CaptureState {
    fn from_ref(state: &AppState) -> Self {
        state.capture.clone()
    }
}

impl FromRef<AppState> for ApiState {
    fn from_ref(state: &AppState) -> Self {
        state.api.clone()
    }
}

impl FromRef<AppState> for MetricsState {
    fn from_ref(state: &AppState) -> Self {
        state.metrics.clone()
    }
}
