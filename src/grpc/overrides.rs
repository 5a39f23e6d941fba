//! OverrideService over gRPC.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::micros_to_pb;
use super::principal;
use crate::overrides::{End, Override, Overrides, Standing};
use crate::pb;

/// The OverrideService adapter.
#[derive(Clone, Debug)]
pub struct OverrideApi {
    overrides: Arc<Overrides>,
}

impl OverrideApi {
    pub fn new(overrides: Arc<Overrides>) -> OverrideApi {
        OverrideApi { overrides }
    }

    fn to_pb(&self, o: &Override) -> pb::Override {
        to_pb(o, self.overrides.standing(o))
    }
}

fn to_pb(o: &Override, standing: Standing) -> pb::Override {
    let state = match standing {
        Standing::Active => pb::OverrideState::Active,
        Standing::Consumed => pb::OverrideState::Consumed,
        Standing::Revoked => pb::OverrideState::Revoked,
        Standing::Expired => pb::OverrideState::Expired,
    };
    let mut out = pb::Override {
        id: o.id.clone(),
        reason: o.reason.clone(),
        scope: o.scope.clone(),
        granted_by: o.granted_by.clone(),
        granted_at: Some(micros_to_pb(o.granted_at)),
        expires_at: Some(micros_to_pb(o.expires_at)),
        state: state.into(),
        ..pb::Override::default()
    };
    match &o.end {
        Some(End::Consumed { by, at, purpose }) => {
            out.consumed_by.clone_from(by);
            out.consumed_at = Some(micros_to_pb(*at));
            out.purpose.clone_from(purpose);
        }
        Some(End::Revoked { by, at, reason }) => {
            out.revoked_by.clone_from(by);
            out.revoked_at = Some(micros_to_pb(*at));
            out.revoke_reason.clone_from(reason);
        }
        Some(End::Expired { .. }) | None => {}
    }
    out
}

#[tonic::async_trait]
impl pb::override_service_server::OverrideService for OverrideApi {
    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::GrantResponse>, Status> {
        let principal = principal(&request);
        let r = request.into_inner();
        let granted = self.overrides.grant(&principal, r.reason, r.ttl_seconds, r.scope).await?;
        tracing::warn!(%principal, id = %granted.granted.id, scope = %granted.granted.scope, "emergency override granted");
        Ok(Response::new(pb::GrantResponse {
            r#override: Some(self.to_pb(&granted.granted)),
            token: granted.token,
        }))
    }

    async fn consume(
        &self,
        request: Request<pb::ConsumeRequest>,
    ) -> Result<Response<pb::ConsumeResponse>, Status> {
        let principal = principal(&request);
        let r = request.into_inner();
        let consumed = self.overrides.consume(&principal, &r.token, r.purpose).await?;
        tracing::warn!(%principal, id = %consumed.id, "emergency override consumed");
        Ok(Response::new(pb::ConsumeResponse { r#override: Some(self.to_pb(&consumed)) }))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let principal = principal(&request);
        let r = request.into_inner();
        let revoked = self.overrides.revoke(&principal, r.id, r.reason).await?;
        Ok(Response::new(pb::RevokeResponse { r#override: Some(self.to_pb(&revoked)) }))
    }

    async fn list(
        &self,
        request: Request<pb::OverrideServiceListRequest>,
    ) -> Result<Response<pb::OverrideServiceListResponse>, Status> {
        let overrides = self
            .overrides
            .list(request.get_ref().include_inactive)
            .iter()
            .map(|(o, standing)| to_pb(o, *standing))
            .collect();
        Ok(Response::new(pb::OverrideServiceListResponse { overrides }))
    }
}
