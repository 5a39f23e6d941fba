//! EvidenceService over gRPC.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::convert::micros_from_pb;
use crate::evidence::keys::Signer;
use crate::evidence::pack::{self, ExportRequest, PackError, Scope};
use crate::ledger::Ledger;
use crate::limits::Limits;
use crate::pb;

/// Largest pack `VerifyStream` accepts.
pub const MAX_STREAMED_PACK_BYTES: usize = 512 * 1024 * 1024;
/// Largest pack `Export` returns in one message.
pub const MAX_UNARY_PACK_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct EvidenceApi {
    ledger: Ledger,
    signer: Arc<Signer>,
    limits: Arc<Limits>,
}

impl EvidenceApi {
    pub fn new(ledger: Ledger, signer: Arc<Signer>, limits: Arc<Limits>) -> EvidenceApi {
        EvidenceApi { ledger, signer, limits }
    }

    /// The current key and the retired keys listed in the governance configuration in force.
    fn public_keys(&self) -> Vec<pb::PublicKey> {
        let current = pb::PublicKey {
            key_id: self.signer.key_id().to_owned(),
            algorithm: "ed25519".into(),
            public_key: self.signer.public_key_base64(),
            retired: false,
        };
        let state = self.ledger.state();
        let retired =
            state.governance.iter().flat_map(|g| g.retired_keys()).map(|k| pb::PublicKey {
                key_id: k.key_id.clone(),
                algorithm: "ed25519".into(),
                public_key: k.public_key.clone(),
                retired: true,
            });
        std::iter::once(current)
            .chain(retired.filter(|k| k.key_id != self.signer.key_id()))
            .collect()
    }

    /// The public keys by id, for verification.
    fn keys(&self) -> BTreeMap<String, [u8; 32]> {
        self.public_keys()
            .into_iter()
            .filter_map(|k| {
                let raw = base64::engine::general_purpose::STANDARD.decode(&k.public_key).ok()?;
                Some((k.key_id, <[u8; 32]>::try_from(raw).ok()?))
            })
            .collect()
    }

    /// The first pass of an export, off the async runtime.
    async fn plan(
        &self,
        export: ExportRequest,
    ) -> Result<(Arc<dyn crate::ledger::store::Storage>, pack::Plan), Status> {
        let store = self
            .ledger
            .store()
            .ok_or_else(|| Status::unavailable("the ledger could not be opened"))?;
        let durable = self.ledger.durable_state();
        let for_plan = store.clone();
        let plan =
            tokio::task::spawn_blocking(move || pack::plan(for_plan.as_ref(), &durable, &export))
                .await
                .map_err(|e| Status::internal(format!("export task failed: {e}")))??;
        Ok((store, plan))
    }

    /// Verifies a pack file against this service's keys and ledger.
    async fn verdict(&self, file: String) -> Result<pb::VerifyResponse, Status> {
        let keys = self.keys();
        let store = self.ledger.store();
        let verdict = tokio::task::spawn_blocking(move || {
            crate::evidence::verify::verify(
                std::io::Cursor::new(file.as_bytes()),
                &keys,
                store.as_deref().map(|s| s as &dyn crate::ledger::store::Storage),
            )
        })
        .await
        .map_err(|e| Status::internal(format!("verify task failed: {e}")))?
        .map_err(Status::invalid_argument)?;
        Ok(pb::VerifyResponse {
            valid: verdict.valid(),
            hash_valid: verdict.hash_valid,
            chain_valid: verdict.chain_valid,
            signature_valid: verdict.signature_valid,
            matches_log: verdict.matches_log,
            computed_hash: verdict.computed_hash,
            problems: verdict.problems,
        })
    }
}

/// A validated export request.
fn export_request(request: &pb::ExportRequest) -> Result<ExportRequest, Status> {
    let (from, to) = (request.from.as_ref(), request.to.as_ref());
    let from = from.ok_or_else(|| Status::invalid_argument("from is required"))?;
    let to = to.ok_or_else(|| Status::invalid_argument("to is required"))?;
    let scope = match pb::EvidenceScope::try_from(request.scope) {
        Ok(pb::EvidenceScope::Audit) => Scope::Audit,
        Ok(pb::EvidenceScope::Investor) => Scope::Investor,
        Ok(pb::EvidenceScope::Internal) => Scope::Internal,
        _ => {
            return Err(Status::invalid_argument(
                "scope must be EVIDENCE_SCOPE_AUDIT, EVIDENCE_SCOPE_INVESTOR or EVIDENCE_SCOPE_INTERNAL",
            ));
        }
    };
    Ok(ExportRequest {
        from: micros_from_pb("from", from)?,
        to: micros_from_pb("to", to)?,
        scope,
        exclude_executor_summary: request.exclude_executor_summary,
        as_of_seq: request.as_of_seq,
    })
}

/// Chunks of an `ExportStream` response.
const STREAM_CHUNK_BYTES: usize = 256 * 1024;

impl From<PackError> for Status {
    fn from(error: PackError) -> Status {
        match &error {
            PackError::Invalid { .. } => Status::invalid_argument(error.to_string()),
            PackError::Storage(_) => {
                tracing::error!(%error, "evidence export failed");
                Status::unavailable(error.to_string())
            }
        }
    }
}

#[tonic::async_trait]
impl pb::evidence_service_server::EvidenceService for EvidenceApi {
    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportResponse>, Status> {
        let principal = super::principal(&request);
        let export = export_request(request.get_ref())?;
        let _job = self.limits.evidence_job()?;
        let (store, plan) = self.plan(export).await?;
        if plan.approx_bytes > MAX_UNARY_PACK_BYTES {
            return Err(Status::resource_exhausted(format!(
                "the pack is about {} bytes, over the {MAX_UNARY_PACK_BYTES}-byte message limit; use ExportStream",
                plan.approx_bytes
            )));
        }
        let signer = self.signer.clone();
        let built =
            tokio::task::spawn_blocking(move || pack::build(store.as_ref(), &plan, &signer))
                .await
                .map_err(|e| Status::internal(format!("export task failed: {e}")))??;
        tracing::info!(%principal, pack_id = %built.pack_id, events = built.events_included, "evidence pack exported");
        Ok(Response::new(pb::ExportResponse {
            pack_json: built.file,
            pack_id: built.pack_id,
            content_hash: built.content_hash,
            events_total: built.events_total,
            events_included: built.events_included,
        }))
    }

    async fn export_stream(
        &self,
        request: Request<pb::ExportStreamRequest>,
    ) -> Result<Response<BoxStream<pb::ExportStreamResponse>>, Status> {
        let principal = super::principal(&request);
        let r = request.get_ref();
        // The stream's request has the same fields; the contract gives each RPC its own message.
        let export = export_request(&pb::ExportRequest {
            from: r.from,
            to: r.to,
            scope: r.scope,
            exclude_executor_summary: r.exclude_executor_summary,
            as_of_seq: r.as_of_seq,
        })?;
        let job = self.limits.evidence_job()?;
        let (store, plan) = self.plan(export).await?;
        let signer = self.signer.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            // Held until the pack is written or the client goes away.
            let _job = job;
            let mut chunk = Vec::with_capacity(STREAM_CHUNK_BYTES);
            let send = |chunk: &mut Vec<u8>| {
                let data = std::mem::replace(chunk, Vec::with_capacity(STREAM_CHUNK_BYTES));
                tx.blocking_send(Ok(pb::ExportStreamResponse { data }))
                    .map_err(|_| PackError::Storage("the client went away".into()))
            };
            let written = pack::write(store.as_ref(), &plan, &signer, &mut |mut bytes| {
                while !bytes.is_empty() {
                    let room = STREAM_CHUNK_BYTES - chunk.len();
                    let (now, later) = bytes.split_at(room.min(bytes.len()));
                    chunk.extend_from_slice(now);
                    bytes = later;
                    if chunk.len() == STREAM_CHUNK_BYTES {
                        send(&mut chunk)?;
                    }
                }
                Ok(())
            })
            .and_then(|ids| send(&mut chunk).map(|()| ids));
            match written {
                Ok((_, pack_id)) => tracing::info!(%principal, %pack_id, "evidence pack streamed"),
                Err(error) => {
                    let _ = tx.blocking_send(Err(Status::from(error)));
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let _job = self.limits.evidence_job()?;
        Ok(Response::new(self.verdict(request.into_inner().pack_json).await?))
    }

    async fn verify_stream(
        &self,
        request: Request<tonic::Streaming<pb::VerifyStreamRequest>>,
    ) -> Result<Response<pb::VerifyStreamResponse>, Status> {
        let _job = self.limits.evidence_job()?;
        let mut chunks = request.into_inner();
        let mut file = Vec::new();
        while let Some(chunk) = chunks.message().await? {
            if file.len() + chunk.data.len() > MAX_STREAMED_PACK_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "the pack is over {MAX_STREAMED_PACK_BYTES} bytes"
                )));
            }
            file.extend_from_slice(&chunk.data);
        }
        let file = String::from_utf8(file)
            .map_err(|_| Status::invalid_argument("the pack is not UTF-8 JSON"))?;
        Ok(Response::new(self.verdict(file).await?.into()))
    }

    async fn get_public_keys(
        &self,
        _request: Request<pb::GetPublicKeysRequest>,
    ) -> Result<Response<pb::GetPublicKeysResponse>, Status> {
        Ok(Response::new(pb::GetPublicKeysResponse { keys: self.public_keys() }))
    }
}
