//! AuditService over gRPC.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::draft_from_event;
use super::principal;
use crate::audit::{AuditError, AuditLog, ListQuery, MAX_BATCH_RECORDS};
use crate::limits::Limits;
use crate::pb;

/// The AuditService adapter.
#[derive(Clone, Debug)]
pub struct AuditApi {
    log: AuditLog,
    limits: Arc<Limits>,
}

impl AuditApi {
    pub fn new(log: AuditLog, limits: Arc<Limits>) -> AuditApi {
        AuditApi { log, limits }
    }
}

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for AuditApi {
    async fn record(
        &self,
        request: Request<pb::RecordRequest>,
    ) -> Result<Response<pb::RecordResponse>, Status> {
        let source = principal(&request);
        self.limits.take_ingest(&source, 1)?;
        let request = request.into_inner();
        let draft = draft_from_event(request.event, request.idempotency_key, &source)
            .map_err(|invalid| AuditError::Invalid { index: None, invalid })?;
        let appended = self.log.record(vec![draft], false).await?;
        let first =
            appended.into_iter().next().ok_or_else(|| Status::internal("nothing appended"))?;
        Ok(Response::new(pb::RecordResponse {
            seq: first.seq,
            hash: first.hash,
            duplicate: first.duplicate,
        }))
    }

    async fn record_batch(
        &self,
        request: Request<pb::RecordBatchRequest>,
    ) -> Result<Response<pb::RecordBatchResponse>, Status> {
        let source = principal(&request);
        let records = request.into_inner().records;
        if records.is_empty() || records.len() > MAX_BATCH_RECORDS {
            return Err(Status::invalid_argument(format!(
                "records holds {} records; a batch holds 1 to {MAX_BATCH_RECORDS}",
                records.len()
            )));
        }
        self.limits.take_ingest(&source, records.len())?;
        let drafts = records
            .into_iter()
            .enumerate()
            .map(|(index, record)| {
                draft_from_event(record.event, record.idempotency_key, &source)
                    .map_err(|invalid| AuditError::Invalid { index: Some(index), invalid })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let appended = self.log.record(drafts, true).await?;
        let results = appended
            .into_iter()
            .map(|a| pb::RecordResult { seq: a.seq, hash: a.hash, duplicate: a.duplicate })
            .collect();
        Ok(Response::new(pb::RecordBatchResponse { results }))
    }

    async fn list(
        &self,
        request: Request<pb::AuditServiceListRequest>,
    ) -> Result<Response<pb::AuditServiceListResponse>, Status> {
        let query = ListQuery::try_from(request.into_inner())?;
        let page = self.log.list(query).await?;
        Ok(Response::new(pb::AuditServiceListResponse {
            events: page.events.into_iter().map(Into::into).collect(),
            next_after_seq: page.next_after_seq,
        }))
    }

    async fn verify_chain(
        &self,
        request: Request<pb::VerifyChainRequest>,
    ) -> Result<Response<pb::VerifyChainResponse>, Status> {
        let request = request.into_inner();
        let report = self.log.verify_chain(request.from_seq, request.to_seq).await?;
        Ok(Response::new(report.into()))
    }
}
