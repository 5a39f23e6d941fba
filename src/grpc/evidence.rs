//! EvidenceService over gRPC. Built so far: `GetPublicKeys`; the rest answer UNIMPLEMENTED.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::evidence::keys::Signer;
use crate::pb;

#[derive(Clone, Debug)]
pub struct EvidenceApi {
    signer: Arc<Signer>,
}

impl EvidenceApi {
    pub fn new(signer: Arc<Signer>) -> EvidenceApi {
        EvidenceApi { signer }
    }
}

#[tonic::async_trait]
impl pb::evidence_service_server::EvidenceService for EvidenceApi {
    async fn get_public_keys(
        &self,
        _request: Request<pb::GetPublicKeysRequest>,
    ) -> Result<Response<pb::GetPublicKeysResponse>, Status> {
        let current = pb::PublicKey {
            key_id: self.signer.key_id().to_owned(),
            algorithm: "ed25519".into(),
            public_key: self.signer.public_key_base64(),
            retired: false,
        };
        Ok(Response::new(pb::GetPublicKeysResponse { keys: vec![current] }))
    }
}
