//! The RPC metrics layer: latency and status code of every gRPC call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;

use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct ObserveLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> ObserveService<S> {
        ObserveService { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct ObserveService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The RPC label: `Service/Method` for brain-ops, the full path for health and reflection.
fn rpc_label(path: &str) -> String {
    path.strip_prefix("/brain.ops.v1.").unwrap_or(path).trim_start_matches('/').to_owned()
}

impl<S, B, R> tower::Service<http::Request<B>> for ObserveService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rpc = rpc_label(request.uri().path());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            // A refusal or error travels as a trailers-only response with grpc-status in the
            // headers; a success puts it in the trailers, which unary calls leave at OK.
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or_else(|| "Ok".to_owned(), |c| format!("{:?}", tonic::Code::from(c))),
                Err(_) => "Internal".to_owned(),
            };
            metrics.record_rpc(&rpc, &code, started.elapsed());
            response
        })
    }
}
