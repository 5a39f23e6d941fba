//! SafeModeService over gRPC.

use tonic::{Request, Response, Status};

use crate::ledger::Ledger;
use crate::pb;

/// The SafeModeService adapter.
#[derive(Clone, Debug)]
pub struct SafeModeApi {
    ledger: Ledger,
}

impl SafeModeApi {
    pub fn new(ledger: Ledger) -> SafeModeApi {
        SafeModeApi { ledger }
    }
}

#[tonic::async_trait]
impl pb::safe_mode_service_server::SafeModeService for SafeModeApi {
    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let state = self.ledger.state();
        Ok(Response::new(pb::GetStatusResponse { status: Some((&state.safe_mode).into()) }))
    }
}
