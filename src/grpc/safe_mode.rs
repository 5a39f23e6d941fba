//! SafeModeService over gRPC.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::{kind_from_pb, micros_to_pb};
use super::principal;
use crate::drain::Drain;
use crate::limits::Limits;
use crate::pb;
use crate::safe_mode::SafeModeControl;
use crate::state::SafeMode;
use tonic::codegen::BoxStream;

/// The SafeModeService adapter.
#[derive(Clone, Debug)]
pub struct SafeModeApi {
    control: Arc<SafeModeControl>,
    heartbeat: Duration,
    drain: Arc<Drain>,
    /// Live `Watch` streams, for the metrics.
    streams: Arc<AtomicI64>,
    limits: Arc<Limits>,
}

impl SafeModeApi {
    pub fn new(
        control: Arc<SafeModeControl>,
        heartbeat: Duration,
        drain: Arc<Drain>,
        streams: Arc<AtomicI64>,
        limits: Arc<Limits>,
    ) -> SafeModeApi {
        SafeModeApi { control, heartbeat, drain, streams, limits }
    }
}

fn watch_message(safe_mode: &SafeMode, heartbeat: bool) -> pb::WatchResponse {
    pb::WatchResponse {
        status: Some(safe_mode.into()),
        heartbeat,
        sent_at: Some(micros_to_pb(chrono::Utc::now().timestamp_micros())),
    }
}

#[tonic::async_trait]
impl pb::safe_mode_service_server::SafeModeService for SafeModeApi {
    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let status = Some((&self.control.status()).into());
        Ok(Response::new(pb::GetStatusResponse { status }))
    }

    async fn enable(
        &self,
        request: Request<pb::EnableRequest>,
    ) -> Result<Response<pb::EnableResponse>, Status> {
        let principal = principal(&request);
        let change = self.control.enable(&principal, request.into_inner().reason).await?;
        let status = Some((&change.safe_mode).into());
        Ok(Response::new(pb::EnableResponse { changed: change.changed, status }))
    }

    async fn disable(
        &self,
        request: Request<pb::DisableRequest>,
    ) -> Result<Response<pb::DisableResponse>, Status> {
        let principal = principal(&request);
        let change = self.control.disable(&principal, request.into_inner().reason).await?;
        let status = Some((&change.safe_mode).into());
        Ok(Response::new(pb::DisableResponse { changed: change.changed, status }))
    }

    async fn check_operation(
        &self,
        request: Request<pb::CheckOperationRequest>,
    ) -> Result<Response<pb::CheckOperationResponse>, Status> {
        let principal = principal(&request);
        let request = request.into_inner();
        let kind = kind_from_pb(request.kind)?;
        let check = self.control.check(&principal, kind, &request.operation).await?;
        Ok(Response::new(pb::CheckOperationResponse {
            allowed: check.allowed,
            message: check.message,
            status: Some((&check.safe_mode).into()),
            audit_seq: check.audit_seq,
        }))
    }

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<BoxStream<pb::WatchResponse>>, Status> {
        let slot = self.limits.watch_slot(&principal(&request))?;
        let mut states = self.control.subscribe();
        let heartbeat = self.heartbeat;
        let drain = self.drain.started();
        // A small buffer: a client that stops reading only stalls its own stream task; the
        // writer publishes through a watch channel and never waits for it. Updates coalesce.
        let (tx, rx) = mpsc::channel(2);
        let streams = self.streams.clone();
        streams.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            // Counted while the stream task runs; it ends when the client goes away.
            struct Live(Arc<AtomicI64>);
            impl Drop for Live {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::Relaxed);
                }
            }
            let _live = Live(streams);
            let _slot = slot;
            tokio::pin!(drain);
            let mut last = states.borrow_and_update().safe_mode.clone();
            let mut ticker =
                tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut next = watch_message(&last, false);
            'stream: loop {
                tokio::select! {
                    sent = tx.send(Ok(next)) => if sent.is_err() { return },
                    () = &mut drain => break 'stream,
                }
                // Wait for a change of safe mode or the heartbeat, whichever comes first.
                next = loop {
                    tokio::select! {
                        changed = states.changed() => {
                            if changed.is_err() {
                                break 'stream;
                            }
                            let now = states.borrow_and_update().safe_mode.clone();
                            if now != last {
                                last = now;
                                break watch_message(&last, false);
                            }
                        }
                        _ = ticker.tick() => break watch_message(&last, true),
                        () = &mut drain => break 'stream,
                    }
                };
            }
            let closing = Status::unavailable("brain-ops is shutting down; reconnect with backoff");
            // Delivered after whatever is buffered, unless the client has stopped reading.
            let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(Err(closing))).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
