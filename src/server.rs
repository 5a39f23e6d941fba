//! The gRPC server, assembled in one place: the services with their descriptors, health,
//! reflection, and the layer stack.

use std::sync::Arc;
use std::time::Duration;

use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use tower::layer::util::{Identity, Stack};

use crate::drain::{Drain, DrainLayer};
use crate::grpc::audit::AuditApi;
use crate::grpc::authn::AuthLayer;
use crate::grpc::evidence::EvidenceApi;
use crate::grpc::metrics::MetricsApi;
use crate::grpc::observe::ObserveLayer;
use crate::grpc::overrides::OverrideApi;
use crate::grpc::safe_mode::SafeModeApi;
use crate::limits::LimitLayer;
use crate::pb;

/// Largest request message of the audit and evidence services: a `RecordBatch` of up to 4 MiB,
/// a pack given to `Verify`, one chunk of `VerifyStream`.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Largest request message of the safe-mode, metrics and override services, whose requests
/// hold a reason or a token at most.
pub const MAX_SMALL_REQUEST_BYTES: usize = 64 * 1024;
/// HTTP/2 keepalive, so that dead `Watch` peers are noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Names the health service reports, besides the whole server ("").
pub const SERVICE_NAMES: [&str; 5] = [
    "brain.ops.v1.SafeModeService",
    "brain.ops.v1.AuditService",
    "brain.ops.v1.EvidenceService",
    "brain.ops.v1.MetricsService",
    "brain.ops.v1.OverrideService",
];

/// Sets the health of the server and of every service.
pub async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Every gRPC route: the five brain-ops services, health, and reflection v1 and v1alpha.
pub fn routes(
    audit: AuditApi,
    safe_mode: SafeModeApi,
    metrics: MetricsApi,
    evidence: EvidenceApi,
    overrides: OverrideApi,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Routes {
    let descriptors = [pb::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET];
    let mut reflection = tonic_reflection::server::Builder::configure();
    let mut reflection_alpha = tonic_reflection::server::Builder::configure();
    for set in descriptors {
        reflection = reflection.register_encoded_file_descriptor_set(set);
        reflection_alpha = reflection_alpha.register_encoded_file_descriptor_set(set);
    }
    let reflection = reflection.build_v1().expect("the compiled descriptors are valid");
    let reflection_alpha =
        reflection_alpha.build_v1alpha().expect("the compiled descriptors are valid");

    let audit = pb::audit_service_server::AuditServiceServer::new(audit)
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let safe_mode = pb::safe_mode_service_server::SafeModeServiceServer::new(safe_mode)
        .max_decoding_message_size(MAX_SMALL_REQUEST_BYTES);
    let evidence = pb::evidence_service_server::EvidenceServiceServer::new(evidence)
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let metrics = pb::metrics_service_server::MetricsServiceServer::new(metrics)
        .max_decoding_message_size(MAX_SMALL_REQUEST_BYTES);
    let overrides = pb::override_service_server::OverrideServiceServer::new(overrides)
        .max_decoding_message_size(MAX_SMALL_REQUEST_BYTES);

    Routes::new(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(safe_mode)
        .add_service(audit)
        .add_service(evidence)
        .add_service(metrics)
        .add_service(overrides)
}

/// The server's layers, outermost first.
type Layers = Stack<AuthLayer, Stack<LimitLayer, Stack<DrainLayer, Stack<ObserveLayer, Identity>>>>;

/// The server with its layer stack.
pub fn server(
    observe: ObserveLayer,
    drain: Arc<Drain>,
    limits: LimitLayer,
    auth: AuthLayer,
) -> tonic::transport::Server<Layers> {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        // Outermost of all: every call is timed and counted with its outcome, refusals too.
        .layer(observe)
        // Next: while draining, refuse new calls before any work is done, and count the
        // calls in flight so that shutdown can wait for them.
        .layer(DrainLayer(drain))
        // Then admission: a full pool refuses at once, and unary calls get their deadline.
        .layer(limits)
        // Then authentication and roles, before any service sees the call; health and
        // reflection pass without a token so that probes and tools work.
        .layer(auth)
}
