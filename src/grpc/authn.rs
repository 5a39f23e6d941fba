//! The authentication layer: every gRPC call except health and reflection must carry a bearer
//! token of a principal whose role allows the RPC. The principal rides in the request
//! extensions to the adapters; refusals are answered at once and recorded.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::auth::{Authenticator, DenialRecorder, Refusal, is_open};

/// The tower layer.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    pub auth: Arc<Authenticator>,
    pub denials: Arc<DenialRecorder>,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, layer: self.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn refusal_status(refusal: &Refusal, path: &str) -> Status {
    let rpc = path.trim_start_matches("/brain.ops.v1.");
    match refusal {
        Refusal::Unauthenticated => Status::unauthenticated(
            "a valid bearer token is required (metadata `authorization: Bearer <token>`)",
        ),
        Refusal::Forbidden(principal) => Status::permission_denied(format!(
            "principal {} (role {}) may not call {rpc}",
            principal.name,
            principal.role.map_or("all", |r| r.as_str())
        )),
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
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

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        if is_open(&path) {
            return Box::pin(self.inner.call(request));
        }
        let tls = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        // Only a verified certificate reaches here: the handshake checked it against the
        // client CA, or, without one, asked for none.
        let identities = tls
            .and_then(|t| t.peer_certs())
            .and_then(|certs| certs.first().map(|leaf| crate::tls::identities(leaf)))
            .unwrap_or_default();
        let header = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        match self.layer.auth.check(header, &identities, &path) {
            Ok(principal) => {
                request.extensions_mut().insert(principal);
                Box::pin(self.inner.call(request))
            }
            Err(refusal) => {
                let peer = request
                    .extensions()
                    .get::<TcpConnectInfo>()
                    .or_else(|| tls.map(|t| t.get_ref()))
                    .and_then(|i| i.remote_addr());
                let denials = self.layer.denials.clone();
                Box::pin(async move {
                    denials.record(&refusal, &path, peer).await;
                    Ok(refusal_status(&refusal, &path).into_http())
                })
            }
        }
    }
}
