//! Build, then run: [`App::build`] opens and verifies the ledger and binds both listeners (port 0
//! works); [`App::run_until_stopped`] serves until the shutdown future resolves, then drains.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::audit::AuditLog;
use crate::auth::{Authenticator, DenialRecorder, PrincipalsError};
use crate::config::Config;
use crate::drain::Drain;
use crate::evidence::keys::{KeyError, Signer};
use crate::governance::{self, GovernanceError};
use crate::grpc::audit::AuditApi;
use crate::grpc::authn::AuthLayer;
use crate::grpc::evidence::EvidenceApi;
use crate::grpc::metrics::MetricsApi;
use crate::grpc::observe::ObserveLayer;
use crate::grpc::overrides::OverrideApi;
use crate::grpc::safe_mode::SafeModeApi;
use crate::ledger::Decision;
use crate::ledger::record::{Draft, Severity};
use crate::ledger::verify::{Damage, Verification};
use crate::ledger::{Ledger, LedgerOptions};
use crate::limits::{LimitLayer, Limits};
use crate::metrics::Metrics;
use crate::overrides::Overrides;
use crate::safe_mode::SafeModeControl;
use crate::tls::{Tls, TlsError};
use crate::{checkpoint, http, safe_mode, server};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid setting {setting}: cannot listen on {addr}: {source}")]
    Bind { setting: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("the ledger could not be opened: {0}")]
    Ledger(String),
    #[error("metrics could not be set up: {0}")]
    Metrics(String),
    #[error("invalid setting --auth-file / BRAIN_AUTH_FILE: {0}")]
    Principals(#[from] PrincipalsError),
    #[error("invalid setting --signing-key-file / BRAIN_SIGNING_KEY_FILE: {0}")]
    SigningKey(#[from] KeyError),
    #[error("invalid setting --governance-config / BRAIN_GOVERNANCE_CONFIG: {0}")]
    Governance(#[from] GovernanceError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl StartError {
    /// True when the operator must change the configuration.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            StartError::Bind { .. }
                | StartError::Principals(_)
                | StartError::SigningKey(_)
                | StartError::Governance(_)
                | StartError::Tls(_)
        )
    }
}

/// Why serving stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("the HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
}

/// A built service, ready to run.
#[derive(Debug)]
pub struct App {
    config: Config,
    grpc: TcpListener,
    http: TcpListener,
    tls: Option<Arc<Tls>>,
    /// The plaintext health-only port and its service.
    health_only: Option<(TcpListener, HealthServer<HealthService>)>,
    ledger: Ledger,
    control: Arc<SafeModeControl>,
    overrides: Arc<Overrides>,
    metrics: Arc<Metrics>,
    auth: AuthLayer,
    signer: Arc<Signer>,
    drain: Arc<Drain>,
    limits: Arc<Limits>,
    health: HealthReporter,
    routes: tonic::service::Routes,
}

impl App {
    /// Binds the listeners, opens and verifies the ledger, rebuilds the state, and records what
    /// the start found (integrity damage, `BRAIN_SAFE_MODE`).
    pub async fn build(config: Config) -> Result<App, StartError> {
        let metrics = Arc::new(Metrics::new(config.clock.clone()).map_err(StartError::Metrics)?);
        let authenticator = match &config.auth_file {
            Some(path) => Authenticator::from_file(path)?,
            None => Authenticator::off(),
        };
        let governance = match &config.governance_config {
            Some(path) => Some(governance::Loaded::from_file(path)?),
            None => None,
        };
        let tls = config.tls.clone().map(Tls::load).transpose()?.map(Arc::new);
        let grpc = bind("--grpc-addr / BRAIN_GRPC_ADDR", config.grpc_addr).await?;
        let http = bind("--metrics-addr / BRAIN_METRICS_ADDR", config.metrics_addr).await?;
        let health_port = match config.health_addr {
            Some(addr) => Some(bind("--health-addr / BRAIN_HEALTH_ADDR", addr).await?),
            None => None,
        };
        let options = LedgerOptions {
            dir: config.data_dir.clone(),
            sled: config.sled.clone(),
            faults: config.faults.clone(),
            clock: config.clock.clone(),
            idempotency_retention: config.idempotency_retention,
            fail_closed: safe_mode::fail_closed(),
            observer: Some(metrics.append_observer()),
        };
        let (ledger, report) = tokio::task::spawn_blocking(move || Ledger::open(options))
            .await
            .map_err(|e| StartError::Ledger(e.to_string()))?;
        if let Some(error) = &report.storage_error {
            tracing::error!(%error, dir = %config.data_dir.display(), "ledger storage could not be opened; serving degraded from empty state");
        }
        if let Some(first) = report.verification.first_bad() {
            tracing::error!(
                first_bad_seq = first.seq,
                problem = %first.problem,
                damaged = report.verification.damage_total,
                "ledger integrity violation"
            );
        }
        metrics.observe(&ledger);
        // After the ledger, so that the data directory exists.
        let (signer, origin) =
            Signer::load_or_generate(config.signing_key_file.as_deref(), &config.data_dir)?;
        tracing::info!(key_id = signer.key_id(), origin = ?origin, "evidence signing key");
        let signer = Arc::new(signer);
        let state = ledger.state();
        tracing::info!(
            head_seq = state.head.seq,
            checked = report.verification.checked,
            safe_mode = state.safe_mode.enabled,
            "ledger verified and state rebuilt"
        );
        let mut verification = report.verification.clone();
        let anchor_lost = check_checkpoint(&ledger, &config.data_dir, &mut verification).await;
        let decision = safe_mode::startup_decision(verification, config.safe_mode_at_start);
        if let Err(error) = ledger.decide(decision).await {
            tracing::error!(%error, "could not take the start-up safe-mode decision");
        }
        if let Err(error) = ledger.decide(record_governance(governance)).await {
            tracing::error!(%error, "could not record the governance configuration");
        }
        if anchor_lost {
            // The damage is on record; a new checkpoint anchors the ledger as it now is.
            checkpoint::take(&ledger, signer.clone(), &config.data_dir).await;
        }
        if config.exposed_without_auth {
            tracing::warn!(grpc = %config.grpc_addr, metrics = %config.metrics_addr, "serving a non-loopback address WITHOUT authentication (--insecure-allow-unauthenticated)");
            let draft = Draft::new("system.insecure_start", safe_mode::SERVICE_PRINCIPAL)
                .severity(Severity::Critical)
                .reason("serving a non-loopback address without authentication (--insecure-allow-unauthenticated)")
                .meta("grpc_addr", config.grpc_addr.to_string())
                .meta("metrics_addr", config.metrics_addr.to_string());
            if let Err(error) = ledger.append(vec![draft]).await {
                tracing::error!(%error, "could not record the insecure start");
            }
        }
        let control = Arc::new(SafeModeControl::new(ledger.clone(), config.clock.clone()));
        let auth = AuthLayer {
            auth: Arc::new(authenticator),
            denials: Arc::new(DenialRecorder::new(ledger.clone(), config.clock.clone())),
        };
        let drain = Arc::new(Drain::default());
        let limits = Limits::new(config.limits.clone());
        let health = HealthReporter::new();
        let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
        let health_only = health_port.map(|listener| (listener, health_service.clone()));
        server::set_health(&health, ServingStatus::NotServing).await;
        let safe_mode_api = SafeModeApi::new(
            control.clone(),
            config.watch_heartbeat,
            drain.clone(),
            metrics.watch_streams.clone(),
            limits.clone(),
        );
        let audit_api = AuditApi::new(AuditLog::new(ledger.clone()), limits.clone());
        let metrics_api = MetricsApi::new(ledger.clone(), metrics.clone());
        let evidence_api = EvidenceApi::new(ledger.clone(), signer.clone(), limits.clone());
        let overrides = Arc::new(Overrides::new(ledger.clone(), config.clock.clone()));
        let override_api = OverrideApi::new(overrides.clone());
        let routes = server::routes(
            audit_api,
            safe_mode_api,
            metrics_api,
            evidence_api,
            override_api,
            health_service,
        );
        Ok(App {
            config,
            grpc,
            http,
            tls,
            health_only,
            ledger,
            control,
            overrides,
            metrics,
            auth,
            signer,
            drain,
            limits,
            health,
            routes,
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().expect("a bound listener has an address")
    }

    /// The bound HTTP (metrics and probes) address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.http.local_addr().expect("a bound listener has an address")
    }

    /// The bound plaintext health-only address, when configured.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_only.as_ref().and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// The ledger handle (for embedding and tests).
    pub fn ledger(&self) -> Ledger {
        self.ledger.clone()
    }

    /// Serves until `shutdown` resolves, then: health NOT_SERVING, refuse new calls, wait for
    /// calls in flight up to the drain deadline, stop both servers, and close the ledger after
    /// its queued appends are durable.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (grpc_addr, metrics_addr) = (self.grpc_addr(), self.metrics_addr());
        let health_addr = self.health_addr();
        let App {
            config,
            grpc,
            http,
            tls,
            health_only,
            ledger,
            control,
            overrides,
            metrics,
            auth,
            signer,
            drain,
            limits,
            health,
            routes,
        } = self;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stop_signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let router = server::server(
            ObserveLayer(metrics.clone()),
            drain.clone(),
            LimitLayer(limits),
            auth.clone(),
        )
        .add_routes(routes);
        let grpc_server = match &tls {
            Some(tls) => tokio::spawn(router.serve_with_incoming_shutdown(
                tls.clone().incoming(grpc),
                stop_signal(stopped.clone()),
            )),
            None => tokio::spawn(router.serve_with_incoming_shutdown(
                // Small responses must not wait for Nagle's algorithm.
                TcpIncoming::from(grpc).with_nodelay(Some(true)),
                stop_signal(stopped.clone()),
            )),
        };
        let health_server = health_only.map(|(listener, service)| {
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        TcpIncoming::from(listener).with_nodelay(Some(true)),
                        stop_signal(stopped.clone()),
                    ),
            )
        });
        // The HTTP port runs on a thread of its own, so that a scrape or a probe is not queued
        // behind gRPC work on the runtime's workers (and never slows them either).
        let http_server = {
            let (listener, stop) = (http.into_std()?, stop_signal(stopped.clone()));
            let app = http::router(ledger.clone(), drain.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    axum::serve(listener, app).with_graceful_shutdown(stop).await
                })
            })
        };
        // Aggregates of refusals are written once their second is over.
        let flusher = {
            let (control, denials) = (control.clone(), auth.denials.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    control.flush_blocked(false).await;
                    denials.flush(false).await;
                }
            })
        };
        let reloader = tokio::spawn(reload_on_sighup(
            auth.auth.clone(),
            config.governance_config.clone(),
            tls.clone(),
            ledger.clone(),
        ));
        let checkpointer = {
            let (ledger, signer, dir) = (ledger.clone(), signer.clone(), config.data_dir.clone());
            let every = config.checkpoint_interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tick.tick().await;
                    checkpoint::take(&ledger, signer.clone(), &dir).await;
                }
            })
        };
        let expirer = tokio::spawn(overrides.run_expiry());
        // The ledger's size on disk is read from the filesystem here, never during a scrape.
        let sizer = {
            let (ledger, bytes) = (ledger.clone(), metrics.ledger_bytes.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(10));
                loop {
                    tick.tick().await;
                    if let Some(store) = ledger.store() {
                        let size = tokio::task::spawn_blocking(move || store.size_on_disk()).await;
                        bytes.store(size.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        };
        server::set_health(&health, ServingStatus::Serving).await;
        tracing::info!(
            grpc = %grpc_addr,
            metrics = %metrics_addr,
            tls = tls.as_ref().map_or("off", |t| if t.mutual() { "mutual" } else { "on" }),
            health = ?health_addr,
            "brain-ops serving"
        );

        shutdown.await;
        tracing::info!("shutting down: draining calls in flight");
        server::set_health(&health, ServingStatus::NotServing).await;
        drain.start();
        let left = drain.wait_idle(config.drain_timeout).await;
        if left > 0 {
            tracing::warn!(left, "drain deadline passed with calls still in flight");
        }
        let _ = stop.send(true);
        let grace = Duration::from_secs(2);
        let grpc_result = tokio::time::timeout(grace, grpc_server).await;
        let http_result = tokio::time::timeout(grace, http_server).await;
        if let Some(health_server) = health_server {
            let _ = tokio::time::timeout(grace, health_server).await;
        }
        flusher.abort();
        reloader.abort();
        sizer.abort();
        checkpointer.abort();
        expirer.abort();
        control.flush_blocked(true).await;
        auth.denials.flush(true).await;
        checkpoint::take(&ledger, signer, &config.data_dir).await;
        ledger.shutdown().await;
        metrics.shutdown();
        tracing::info!("brain-ops stopped");
        if let Ok(Ok(Err(e))) = grpc_result {
            return Err(e.into());
        }
        if let Ok(Ok(Err(e))) = http_result {
            return Err(e.into());
        }
        Ok(())
    }
}

/// Compares the ledger with the checkpoint kept outside it and adds what does not match to the
/// start's damage. Returns true when the checkpoint file must be anchored anew (after damage, or
/// when it is missing while the ledger has checkpoints).
async fn check_checkpoint(
    ledger: &Ledger,
    dir: &std::path::Path,
    found: &mut Verification,
) -> bool {
    let Some(store) = ledger.store() else { return false };
    let head = ledger.state().head.seq;
    let newest = ledger.state().checkpoint.clone();
    let dir = dir.to_owned();
    let damage = tokio::task::spawn_blocking(move || match checkpoint::read_file(&dir) {
        Ok(Some(kept)) => checkpoint::check(&kept, store.as_ref(), head),
        Ok(None) => {
            if let Some(newest) = newest {
                tracing::warn!(
                    seq = newest.seq,
                    "{} is missing; recreated from the ledger",
                    checkpoint::FILE
                );
                if let Err(error) = checkpoint::write_file(&dir, &newest) {
                    tracing::error!(%error, "cannot write {}", checkpoint::FILE);
                }
            }
            None
        }
        Err(problem) => Some(Damage { seq: head + 1, problem, digest: "unreadable".into() }),
    })
    .await
    .unwrap_or(None);
    let Some(damage) = damage else { return false };
    tracing::error!(seq = damage.seq, problem = %damage.problem, "the ledger does not match its checkpoint");
    found.damage.insert(0, damage);
    found.damage_total += 1;
    true
}

/// Records the governance configuration when its digest differs from the one in force.
fn record_governance(
    configured: Option<governance::Loaded>,
) -> impl FnOnce(&crate::state::State) -> Decision + Send + 'static {
    move |state| Decision {
        drafts: governance::change(
            state.governance.as_deref(),
            configured.as_ref(),
            safe_mode::SERVICE_PRINCIPAL,
        ),
        safe_direction: false,
    }
}

/// Reloads the principals file and the governance configuration on every SIGHUP, atomically: a
/// file that cannot be used is rejected and what is in force stays. Each attempt is recorded.
async fn reload_on_sighup(
    auth: Arc<Authenticator>,
    governance: Option<std::path::PathBuf>,
    tls: Option<Arc<Tls>>,
    ledger: Ledger,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; principals reload is unavailable");
            return;
        };
        while hangups.recv().await.is_some() {
            if let Some(path) = &governance {
                reload_governance(path, &ledger).await;
            }
            if let Some(tls) = &tls {
                reload_tls(tls, &ledger).await;
            }
            if !auth.is_on() {
                tracing::info!("SIGHUP: no principals file to reload");
                continue;
            }
            let draft = match auth.reload() {
                Ok(principals) => {
                    tracing::info!(principals = principals.len(), "principals reloaded");
                    Draft::new("system.principals_reloaded", safe_mode::SERVICE_PRINCIPAL)
                        .reason("SIGHUP: the principals file was reloaded")
                        .meta("principals", principals.len().to_string())
                        .meta("file_sha256", principals.file_sha256.clone())
                }
                Err(error) => {
                    tracing::error!(%error, "principals reload rejected; the previous principals stay in force");
                    Draft::new("system.principals_reload_failed", safe_mode::SERVICE_PRINCIPAL)
                        .severity(Severity::Warning)
                        .failed()
                        .reason("SIGHUP: the principals file was rejected; the previous principals stay in force")
                        .meta("error", error.to_string().chars().take(1000).collect::<String>())
                }
            };
            if let Err(error) = ledger.append(vec![draft]).await {
                tracing::error!(%error, "could not record the principals reload");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (auth, governance, tls, ledger);
}

/// Rereads the certificate, key and client CA; new connections use them, open ones keep theirs.
async fn reload_tls(tls: &Tls, ledger: &Ledger) {
    let draft = match tls.reload() {
        Ok(digest) => {
            tracing::info!(files_sha256 = %digest, "TLS certificate reloaded");
            Draft::new("system.tls_reloaded", safe_mode::SERVICE_PRINCIPAL)
                .reason("SIGHUP: the TLS certificate, key and client CA were reloaded")
                .meta("files_sha256", digest)
        }
        Err(error) => {
            tracing::error!(%error, "TLS reload rejected; the certificate in force stays");
            Draft::new("system.tls_reload_failed", safe_mode::SERVICE_PRINCIPAL)
                .severity(Severity::Warning)
                .failed()
                .reason("SIGHUP: the TLS files were rejected; the certificate in force stays")
                .meta("error", crate::ledger::record::truncate_utf8(error.to_string(), 1000))
        }
    };
    if let Err(error) = ledger.append(vec![draft]).await {
        tracing::error!(%error, "could not record the TLS reload");
    }
}

async fn reload_governance(path: &std::path::Path, ledger: &Ledger) {
    let outcome = match governance::Loaded::from_file(path) {
        Ok(loaded) => ledger.decide(record_governance(Some(loaded))).await.map(|d| d.changed),
        Err(error) => {
            tracing::error!(%error, "governance configuration rejected; the one in force stays");
            let draft =
                Draft::new("system.governance_config_rejected", safe_mode::SERVICE_PRINCIPAL)
                    .severity(Severity::Warning)
                    .failed()
                    .reason(
                        "SIGHUP: the governance configuration was rejected; the one in force stays",
                    )
                    .meta("error", crate::ledger::record::truncate_utf8(error.to_string(), 1000));
            ledger.append(vec![draft]).await.map(|_| false)
        }
    };
    match outcome {
        Ok(changed) => tracing::info!(changed, "SIGHUP: governance configuration reread"),
        Err(error) => tracing::error!(%error, "could not record the governance configuration"),
    }
}

async fn bind(setting: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { setting, addr, source })
}
