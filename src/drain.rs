//! Shutdown draining: once draining starts, new calls (other than health checks) are refused
//! with UNAVAILABLE, and shutdown waits for the calls already in flight.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tonic::codegen::http;

/// Shared drain state.
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    signal: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Drain {
        Drain {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            signal: watch::channel(false).0,
        }
    }
}

impl Drain {
    /// Starts draining: refuse new calls and tell long-lived streams to end.
    pub fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.signal.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Resolves once draining has started; streams select on it to end cleanly.
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut signal = self.signal.subscribe();
        async move {
            let _ = signal.wait_for(|draining| *draining).await;
        }
    }

    /// Waits until no call is in flight, or `deadline` passes; returns how many were left.
    pub async fn wait_idle(&self, deadline: Duration) -> usize {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                if self.in_flight.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.in_flight.load(Ordering::SeqCst)
    }

    fn enter(self: &Arc<Drain>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

/// One call in flight; leaving decrements the count.
struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The tower layer that applies [`Drain`] to every gRPC call.
#[derive(Clone, Debug)]
pub struct DrainLayer(pub Arc<Drain>);

impl<S> tower::Layer<S> for DrainLayer {
    type Service = DrainService<S>;

    fn layer(&self, inner: S) -> DrainService<S> {
        DrainService { inner, drain: self.0.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct DrainService<S> {
    inner: S,
    drain: Arc<Drain>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for DrainService<S>
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
        let is_health = request.uri().path().starts_with("/grpc.health.v1.Health/");
        if self.drain.is_draining() && !is_health {
            let status = tonic::Status::unavailable("brain-ops is shutting down; retry shortly");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let in_flight = self.drain.enter();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            drop(in_flight);
            response
        })
    }
}
