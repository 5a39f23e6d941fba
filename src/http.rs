//! The HTTP port: metrics and probes.
//!
//! `/livez`: the process is alive and its ledger writer is running. `/readyz`: the ledger was
//! verified and the state rebuilt (the server only listens after that), and it is not shutting
//! down. A frozen or degraded service is still ready, because operators must reach it to act.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::drain::Drain;
use crate::ledger::Ledger;
use crate::metrics::{Metrics, Summary};
use crate::state::SafeModeSource;

#[derive(Clone, Debug)]
struct Probes {
    ledger: Ledger,
    drain: Arc<Drain>,
    metrics: Arc<Metrics>,
}

/// The HTTP routes.
pub fn router(ledger: Ledger, drain: Arc<Drain>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/metrics/summary", get(summary))
        .route("/metrics/health", get(health))
        .with_state(Probes { ledger, drain, metrics })
}

async fn prometheus(State(probes): State<Probes>) -> Response {
    match probes.metrics.render() {
        Ok(text) => {
            ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
        }
        Err(error) => {
            tracing::error!(%error, "metrics could not be rendered");
            (StatusCode::INTERNAL_SERVER_ERROR, "metrics could not be rendered\n").into_response()
        }
    }
}

async fn summary(State(probes): State<Probes>) -> Json<Summary> {
    Json(probes.metrics.summary(&probes.ledger.state()))
}

/// 200 when healthy; 503 with the reasons when degraded. Degraded is not unready: a degraded
/// service still answers (frozen), and operators must reach it.
async fn health(State(probes): State<Probes>) -> (StatusCode, Json<serde_json::Value>) {
    let mut reasons = Vec::new();
    if let Some(fault) = probes.ledger.health().fault {
        reasons.push(format!("ledger storage: {fault}"));
    }
    if !probes.ledger.writer_alive() && !probes.drain.is_draining() {
        reasons.push("the ledger writer has stopped".to_owned());
    }
    let state = probes.ledger.state();
    if state.safe_mode.enabled && state.safe_mode.source == Some(SafeModeSource::Integrity) {
        reasons.push(
            "frozen for ledger integrity damage; an operator must investigate and thaw".into(),
        );
    }
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "healthy" })))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "degraded", "reasons": reasons })))
    }
}

async fn livez(State(probes): State<Probes>) -> (StatusCode, &'static str) {
    if probes.ledger.writer_alive() || probes.drain.is_draining() {
        (StatusCode::OK, "alive\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the ledger writer has stopped\n")
    }
}

async fn readyz(State(probes): State<Probes>) -> (StatusCode, &'static str) {
    if probes.drain.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}
