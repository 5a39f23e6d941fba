//! MetricsService over gRPC.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::micros_to_pb;
use crate::ledger::Ledger;
use crate::ledger::record::Mode;
use crate::metrics::{Metrics, current_mode};
use crate::pb;

#[derive(Clone, Debug)]
pub struct MetricsApi {
    ledger: Ledger,
    metrics: Arc<Metrics>,
}

impl MetricsApi {
    pub fn new(ledger: Ledger, metrics: Arc<Metrics>) -> MetricsApi {
        MetricsApi { ledger, metrics }
    }
}

#[tonic::async_trait]
impl pb::metrics_service_server::MetricsService for MetricsApi {
    async fn get_summary(
        &self,
        _request: Request<pb::GetSummaryRequest>,
    ) -> Result<Response<pb::GetSummaryResponse>, Status> {
        let state = self.ledger.state();
        let summary = self.metrics.summary(&state);
        let mode = match current_mode(&state) {
            Mode::Online => pb::OperationMode::Online,
            Mode::Offline => pb::OperationMode::Offline,
            Mode::Sovereign => pb::OperationMode::Sovereign,
            Mode::Quarantine => pb::OperationMode::Quarantine,
        };
        Ok(Response::new(pb::GetSummaryResponse {
            current_mode: mode.into(),
            mode_switches: summary.mode_switches,
            override_active: summary.override_active,
            quarantines: summary.quarantines,
            executor_failures: summary.executor_failures,
            last_success: summary.last_success_micros.map(micros_to_pb),
            uptime_seconds: summary.uptime_seconds,
            safe_mode: summary.safe_mode,
            ledger_head_seq: summary.ledger_head_seq,
        }))
    }
}
