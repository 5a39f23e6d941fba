//! The HTTP port: probes now, metrics later.
//!
//! `/livez`: the process is alive and its ledger writer is running. `/readyz`: the ledger was
//! verified and the state rebuilt (the server only listens after that), and it is not shutting
//! down. A frozen or degraded service is still ready, because operators must reach it to act.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::drain::Drain;
use crate::ledger::Ledger;

#[derive(Clone, Debug)]
struct Probes {
    ledger: Ledger,
    drain: Arc<Drain>,
}

/// The HTTP routes.
pub fn router(ledger: Ledger, drain: Arc<Drain>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(Probes { ledger, drain })
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
