//! Limits under abuse: a service that sheds load instead of falling over.
//!
//! - Calls in flight are capped in two pools. The kill-switch path (`CheckOperation`,
//!   `GetStatus`, `Watch` and health) has its own, so it keeps answering while ingestion is
//!   saturated. A call that finds its pool full is refused at once with RESOURCE_EXHAUSTED: it
//!   never waits in a queue, so overload shows up as fast refusals, not as hangs or memory.
//! - Every unary RPC has a server-side deadline (the client's `grpc-timeout`, when shorter,
//!   applies as well); streams have none.
//! - Each principal may hold a bounded number of `Watch` streams, and may record a bounded number
//!   of events per second (a token bucket refilled continuously, one second deep).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::codegen::http;

/// The configured limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitSettings {
    /// Calls in flight outside the kill-switch path.
    pub max_calls_in_flight: usize,
    /// Calls in flight on the kill-switch path (and health).
    pub max_control_calls_in_flight: usize,
    /// `Watch` streams one principal may hold at once.
    pub max_watch_streams_per_principal: usize,
    /// Events one principal may record per second (`Record` and `RecordBatch`); 0: no quota.
    pub ingest_events_per_second: u64,
    /// Evidence exports and verifications running at once (each may hold a large pack).
    pub max_evidence_jobs: usize,
}

impl Default for LimitSettings {
    fn default() -> LimitSettings {
        LimitSettings {
            max_calls_in_flight: 256,
            max_control_calls_in_flight: 1024,
            max_watch_streams_per_principal: 1024,
            ingest_events_per_second: 20_000,
            max_evidence_jobs: 2,
        }
    }
}

/// The RPCs of the kill-switch path, which have their own capacity.
const CONTROL_PATHS: [&str; 3] = [
    "/brain.ops.v1.SafeModeService/CheckOperation",
    "/brain.ops.v1.SafeModeService/GetStatus",
    "/brain.ops.v1.SafeModeService/Watch",
];

/// The server-side deadline of a unary RPC; `None` for streams, health and reflection.
pub fn deadline(path: &str) -> Option<Duration> {
    let rpc = path.strip_prefix("/brain.ops.v1.")?;
    let seconds = match rpc {
        "SafeModeService/Watch"
        | "EvidenceService/ExportStream"
        | "EvidenceService/VerifyStream" => {
            return None;
        }
        "SafeModeService/CheckOperation"
        | "SafeModeService/GetStatus"
        | "MetricsService/GetSummary"
        | "EvidenceService/GetPublicKeys" => 2,
        "AuditService/List" => 30,
        "EvidenceService/Export" | "EvidenceService/Verify" => 120,
        "AuditService/VerifyChain" => 600,
        // Enable, Disable, Record, RecordBatch and the override RPCs: they wait for the ledger.
        _ => 10,
    };
    Some(Duration::from_secs(seconds))
}

/// Shared limit state.
#[derive(Debug)]
pub struct Limits {
    settings: LimitSettings,
    general: Arc<Semaphore>,
    control: Arc<Semaphore>,
    evidence: Arc<Semaphore>,
    watches: Mutex<HashMap<String, usize>>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Arc<Limits> {
        Arc::new(Limits {
            general: Arc::new(Semaphore::new(settings.max_calls_in_flight)),
            control: Arc::new(Semaphore::new(settings.max_control_calls_in_flight)),
            evidence: Arc::new(Semaphore::new(settings.max_evidence_jobs)),
            watches: Mutex::default(),
            buckets: Mutex::default(),
            settings,
        })
    }

    /// A place for one call on `path`, or RESOURCE_EXHAUSTED when its pool is full.
    fn admit(&self, path: &str) -> Result<OwnedSemaphorePermit, Status> {
        let (pool, size, name) =
            if CONTROL_PATHS.contains(&path) || path.starts_with("/grpc.health.v1.Health/") {
                (&self.control, self.settings.max_control_calls_in_flight, "kill-switch")
            } else {
                (&self.general, self.settings.max_calls_in_flight, "general")
            };
        pool.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "brain-ops is at its limit of {size} {name} calls in flight; retry with backoff"
            ))
        })
    }

    /// A place for one evidence export or verification, which holds it until it ends.
    pub fn evidence_job(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.evidence.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} evidence exports or verifications are already running; retry when one ends",
                self.settings.max_evidence_jobs
            ))
        })
    }

    /// Counts one more `Watch` stream of `principal`, or refuses it past the limit. The stream
    /// is counted until the returned slot is dropped.
    pub fn watch_slot(self: &Arc<Self>, principal: &str) -> Result<WatchSlot, Status> {
        let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let held = watches.entry(principal.to_owned()).or_default();
        if *held >= self.settings.max_watch_streams_per_principal {
            return Err(Status::resource_exhausted(format!(
                "principal {principal} already holds {held} Watch streams, the most one \
                 principal may hold; close one first"
            )));
        }
        *held += 1;
        Ok(WatchSlot { limits: self.clone(), principal: principal.to_owned() })
    }

    /// Takes `events` from `principal`'s ingest quota, or refuses the whole call.
    pub fn take_ingest(&self, principal: &str, events: usize) -> Result<(), Status> {
        let rate = self.settings.ingest_events_per_second;
        if rate == 0 {
            return Ok(());
        }
        let (rate, wanted) = (rate as f64, events as f64);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets
            .entry(principal.to_owned())
            .or_insert_with(|| Bucket { tokens: rate, refilled: now });
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.refilled = now;
        if bucket.tokens < wanted {
            return Err(Status::resource_exhausted(format!(
                "principal {principal} is over its ingest quota of {} events per second; \
                 retry after {} ms",
                self.settings.ingest_events_per_second,
                ((wanted - bucket.tokens) / rate * 1000.0).ceil()
            )));
        }
        bucket.tokens -= wanted;
        Ok(())
    }
}

/// One `Watch` stream counted against its principal.
#[derive(Debug)]
pub struct WatchSlot {
    limits: Arc<Limits>,
    principal: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut watches = self.limits.watches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = watches.get_mut(&self.principal) {
            *held -= 1;
            if *held == 0 {
                watches.remove(&self.principal);
            }
        }
    }
}

/// The tower layer that admits calls and applies deadlines.
#[derive(Clone, Debug)]
pub struct LimitLayer(pub Arc<Limits>);

impl<S> tower::Layer<S> for LimitLayer {
    type Service = LimitService<S>;

    fn layer(&self, inner: S) -> LimitService<S> {
        LimitService { inner, limits: self.0.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct LimitService<S> {
    inner: S,
    limits: Arc<Limits>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for LimitService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let permit = match self.limits.admit(&path) {
            Ok(permit) => permit,
            Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
        };
        let deadline = deadline(&path);
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = match deadline {
                None => call.await,
                Some(deadline) => match tokio::time::timeout(deadline, call).await {
                    Ok(response) => response,
                    Err(_) => Ok(Status::deadline_exceeded(format!(
                        "{} did not finish within its {} s server deadline",
                        path.trim_start_matches('/'),
                        deadline.as_secs()
                    ))
                    .into_http()),
                },
            };
            drop(permit);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ingest_quota_refills_continuously_and_refuses_whole_calls() {
        let limits = Limits::new(LimitSettings {
            ingest_events_per_second: 1000,
            ..LimitSettings::default()
        });
        limits.take_ingest("a", 600).expect("within the quota");
        let refused = limits.take_ingest("a", 600).expect_err("over it");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("principal a"), "{}", refused.message());
        limits.take_ingest("b", 1000).expect("another principal has its own bucket");
        std::thread::sleep(Duration::from_millis(300));
        limits.take_ingest("a", 600).expect("refilled by about 300 events");
    }

    #[test]
    fn watch_slots_are_counted_per_principal_and_given_back() {
        let limits = Limits::new(LimitSettings {
            max_watch_streams_per_principal: 2,
            ..LimitSettings::default()
        });
        let first = limits.watch_slot("a").expect("one");
        let _second = limits.watch_slot("a").expect("two");
        assert_eq!(
            limits.watch_slot("a").expect_err("three").code(),
            tonic::Code::ResourceExhausted
        );
        let _other = limits.watch_slot("b").expect("another principal");
        drop(first);
        limits.watch_slot("a").expect("a slot came back");
    }

    #[test]
    fn streams_have_no_server_deadline_and_unary_calls_do() {
        assert_eq!(deadline("/brain.ops.v1.SafeModeService/Watch"), None);
        assert_eq!(deadline("/brain.ops.v1.EvidenceService/ExportStream"), None);
        assert_eq!(deadline("/grpc.health.v1.Health/Check"), None);
        assert_eq!(deadline("/brain.ops.v1.AuditService/Record"), Some(Duration::from_secs(10)));
        assert_eq!(
            deadline("/brain.ops.v1.SafeModeService/CheckOperation"),
            Some(Duration::from_secs(2))
        );
    }
}
