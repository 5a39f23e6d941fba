//! Configuration of `brain-ops serve`: every setting has a flag and a `BRAIN_*` variable.
//! Raw values are read by clap as text and validated here, so every error names the setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::audit::MAX_BATCH_RECORDS;
use crate::ledger::clock::{Clock, SystemClock};
use crate::ledger::store::{Faults, SledOptions};
use crate::limits::LimitSettings;
use crate::tls::TlsFiles;

/// The raw settings of `brain-ops serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Address of the gRPC port.
    #[arg(long, env = "BRAIN_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: String,
    /// Address of the HTTP port for metrics and probes.
    #[arg(long, env = "BRAIN_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,
    /// Optional plaintext port serving only gRPC health, for probes when TLS is on.
    #[arg(long, env = "BRAIN_HEALTH_ADDR")]
    pub health_addr: Option<String>,
    /// Directory of the ledger.
    #[arg(long, env = "BRAIN_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// true|1|yes|on enables safe mode at start; false|0|no|off|"" leaves it as persisted.
    #[arg(long, env = "BRAIN_SAFE_MODE")]
    pub safe_mode: Option<String>,
    /// TOML principals file; without it only loopback addresses are served.
    #[arg(long, env = "BRAIN_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Ed25519 signing key (PKCS#8 PEM) for evidence packs and checkpoints.
    #[arg(long, env = "BRAIN_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// Governance configuration (TOML, docs/GOVERNANCE.md), recorded in the ledger when it
    /// changes; reread on SIGHUP.
    #[arg(long, env = "BRAIN_GOVERNANCE_CONFIG")]
    pub governance_config: Option<PathBuf>,
    /// TLS certificate chain (PEM).
    #[arg(long, env = "BRAIN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "BRAIN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to (mutual TLS).
    #[arg(long, env = "BRAIN_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Log format: human or json.
    #[arg(long, env = "BRAIN_LOG_FORMAT", default_value = "human")]
    pub log_format: String,
    /// Serve a non-loopback address without authentication.
    #[arg(long, env = "BRAIN_INSECURE_ALLOW_UNAUTHENTICATED")]
    pub insecure_allow_unauthenticated: bool,
    /// Seconds that in-flight calls get to finish at shutdown.
    #[arg(long, env = "BRAIN_DRAIN_TIMEOUT_SECONDS", default_value = "10")]
    pub drain_timeout_seconds: String,
    /// sled's page cache in MiB.
    #[arg(long, env = "BRAIN_CACHE_MB", default_value = "64")]
    pub cache_mb: String,
    /// Seconds between `Watch` heartbeats, 1 to 15: at most half the siblings' 30-second
    /// staleness budget, so that one lost or late heartbeat does not make them stale.
    #[arg(long, env = "BRAIN_WATCH_HEARTBEAT_SECONDS", default_value = "5")]
    pub watch_heartbeat_seconds: String,
    /// Seconds between signed checkpoints while events arrive (one is also taken at shutdown).
    #[arg(long, env = "BRAIN_CHECKPOINT_INTERVAL_SECONDS", default_value = "600")]
    pub checkpoint_interval_seconds: String,
    /// Seconds an idempotency key is remembered.
    #[arg(long, env = "BRAIN_IDEMPOTENCY_RETENTION_SECONDS", default_value = "86400")]
    pub idempotency_retention_seconds: String,
    /// Calls in flight at once outside the kill-switch path; more are refused at once.
    #[arg(long, env = "BRAIN_MAX_CALLS_IN_FLIGHT", default_value = "256")]
    pub max_calls_in_flight: String,
    /// Calls in flight at once on the kill-switch path (CheckOperation, GetStatus, Watch, health).
    #[arg(long, env = "BRAIN_MAX_CONTROL_CALLS_IN_FLIGHT", default_value = "1024")]
    pub max_control_calls_in_flight: String,
    /// `Watch` streams one principal may hold at once.
    #[arg(long, env = "BRAIN_MAX_WATCH_STREAMS_PER_PRINCIPAL", default_value = "1024")]
    pub max_watch_streams_per_principal: String,
    /// Events one principal may record per second; 0 turns the quota off.
    #[arg(long, env = "BRAIN_INGEST_EVENTS_PER_SECOND", default_value = "20000")]
    pub ingest_events_per_second: String,
    /// Evidence exports and verifications running at once.
    #[arg(long, env = "BRAIN_MAX_EVIDENCE_JOBS", default_value = "2")]
    pub max_evidence_jobs: String,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// A setting that cannot be used; `brain-ops serve` exits 64 with this message.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {message}")]
pub struct ConfigError {
    /// The flag and variable, e.g. `--grpc-addr / BRAIN_GRPC_ADDR`.
    pub setting: &'static str,
    pub message: String,
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError { setting, message: message.into() }
}

/// Validated configuration of the service.
#[derive(Clone, Debug)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// A plaintext port that serves only `grpc.health.v1`, for probes when TLS is on.
    pub health_addr: Option<SocketAddr>,
    /// TLS on the gRPC port; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
    /// The principals file; `None` serves everyone as `anonymous` (loopback only).
    pub auth_file: Option<PathBuf>,
    /// The Ed25519 signing key; `None` generates one in the data directory on first start.
    pub signing_key_file: Option<PathBuf>,
    /// The governance configuration file; `None` records none.
    pub governance_config: Option<PathBuf>,
    /// Time between checkpoints while events arrive.
    pub checkpoint_interval: Duration,
    /// Serving a non-loopback address without authentication, as
    /// `--insecure-allow-unauthenticated` allowed. Logged and recorded at start.
    pub exposed_without_auth: bool,
    pub data_dir: PathBuf,
    /// `BRAIN_SAFE_MODE` asked for safe mode at start.
    pub safe_mode_at_start: bool,
    pub log_format: LogFormat,
    pub drain_timeout: Duration,
    pub sled: SledOptions,
    pub idempotency_retention: Duration,
    pub watch_heartbeat: Duration,
    pub limits: LimitSettings,
    /// Test seam: faults injected into storage.
    pub faults: Arc<Faults>,
    /// Test seam: the writer's clock.
    pub clock: Arc<dyn Clock>,
}

impl Config {
    /// Defaults for tests and embedding: ports 0 on loopback, the given data directory.
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            health_addr: None,
            tls: None,
            auth_file: None,
            signing_key_file: None,
            governance_config: None,
            checkpoint_interval: Duration::from_secs(600),
            exposed_without_auth: false,
            data_dir: data_dir.into(),
            safe_mode_at_start: false,
            log_format: LogFormat::Human,
            drain_timeout: Duration::from_secs(10),
            sled: SledOptions::default(),
            idempotency_retention: Duration::from_secs(24 * 3600),
            watch_heartbeat: Duration::from_secs(5),
            limits: LimitSettings::default(),
            faults: Arc::default(),
            clock: Arc::new(SystemClock),
        }
    }
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    fn try_from(args: ServeArgs) -> Result<Config, ConfigError> {
        let grpc_addr = parse_addr("--grpc-addr / BRAIN_GRPC_ADDR", &args.grpc_addr)?;
        let metrics_addr = parse_addr("--metrics-addr / BRAIN_METRICS_ADDR", &args.metrics_addr)?;
        let safe_mode_at_start = parse_safe_mode(args.safe_mode.as_deref())?;
        let log_format = match args.log_format.trim().to_ascii_lowercase().as_str() {
            "human" | "" => LogFormat::Human,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "--log-format / BRAIN_LOG_FORMAT",
                    format!("{other:?} is not one of human, json"),
                ));
            }
        };
        let drain_timeout = Duration::from_secs(parse_whole(
            "--drain-timeout-seconds / BRAIN_DRAIN_TIMEOUT_SECONDS",
            &args.drain_timeout_seconds,
            1..=3600,
        )?);
        let cache_mb = parse_whole("--cache-mb / BRAIN_CACHE_MB", &args.cache_mb, 8..=65536)?;
        let retention_seconds = parse_whole(
            "--idempotency-retention-seconds / BRAIN_IDEMPOTENCY_RETENTION_SECONDS",
            &args.idempotency_retention_seconds,
            10..=366 * 86400,
        )?;
        let watch_heartbeat = Duration::from_secs(parse_whole(
            "--watch-heartbeat-seconds / BRAIN_WATCH_HEARTBEAT_SECONDS",
            &args.watch_heartbeat_seconds,
            1..=15,
        )?);
        let checkpoint_interval = Duration::from_secs(parse_whole(
            "--checkpoint-interval-seconds / BRAIN_CHECKPOINT_INTERVAL_SECONDS",
            &args.checkpoint_interval_seconds,
            1..=86400,
        )?);
        let ingest_events_per_second = parse_whole(
            "--ingest-events-per-second / BRAIN_INGEST_EVENTS_PER_SECOND",
            &args.ingest_events_per_second,
            0..=100_000_000,
        )?;
        // A whole batch must fit in one second of quota.
        if (1..MAX_BATCH_RECORDS as u64).contains(&ingest_events_per_second) {
            return Err(invalid(
                "--ingest-events-per-second / BRAIN_INGEST_EVENTS_PER_SECOND",
                format!("must be 0 (no quota) or at least {MAX_BATCH_RECORDS}, the largest batch"),
            ));
        }
        let count = |setting, raw: &str, max| -> Result<usize, ConfigError> {
            Ok(usize::try_from(parse_whole(setting, raw, 1..=max)?).unwrap_or(usize::MAX))
        };
        let limits = LimitSettings {
            max_calls_in_flight: count(
                "--max-calls-in-flight / BRAIN_MAX_CALLS_IN_FLIGHT",
                &args.max_calls_in_flight,
                1_000_000,
            )?,
            max_control_calls_in_flight: count(
                "--max-control-calls-in-flight / BRAIN_MAX_CONTROL_CALLS_IN_FLIGHT",
                &args.max_control_calls_in_flight,
                1_000_000,
            )?,
            max_watch_streams_per_principal: count(
                "--max-watch-streams-per-principal / BRAIN_MAX_WATCH_STREAMS_PER_PRINCIPAL",
                &args.max_watch_streams_per_principal,
                1_000_000,
            )?,
            ingest_events_per_second,
            max_evidence_jobs: count(
                "--max-evidence-jobs / BRAIN_MAX_EVIDENCE_JOBS",
                &args.max_evidence_jobs,
                64,
            )?,
        };
        if args.data_dir.as_os_str().is_empty() {
            return Err(invalid("--data-dir / BRAIN_DATA_DIR", "must not be empty"));
        }
        let tls = match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca: args.tls_client_ca }),
            (None, None) if args.tls_client_ca.is_some() => {
                return Err(invalid(
                    "--tls-client-ca / BRAIN_TLS_CLIENT_CA",
                    "needs --tls-cert and --tls-key: mutual TLS is TLS with client certificates",
                ));
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid("--tls-key / BRAIN_TLS_KEY", "is required with --tls-cert"));
            }
            (None, Some(_)) => {
                return Err(invalid("--tls-cert / BRAIN_TLS_CERT", "is required with --tls-key"));
            }
        };
        let health_addr = args
            .health_addr
            .as_deref()
            .filter(|a| !a.trim().is_empty())
            .map(|a| parse_addr("--health-addr / BRAIN_HEALTH_ADDR", a))
            .transpose()?;
        // Without a principals file every caller is anonymous with every role, which is only
        // acceptable where nobody else can connect.
        let mut exposed_without_auth = false;
        if args.auth_file.is_none() {
            for (setting, addr) in [
                ("--grpc-addr / BRAIN_GRPC_ADDR", grpc_addr),
                ("--metrics-addr / BRAIN_METRICS_ADDR", metrics_addr),
            ] {
                if addr.ip().is_loopback() {
                    continue;
                }
                if !args.insecure_allow_unauthenticated {
                    return Err(invalid(
                        setting,
                        format!(
                            "{addr} is not a loopback address and no principals file is \
                             configured; set BRAIN_AUTH_FILE, or pass \
                             --insecure-allow-unauthenticated"
                        ),
                    ));
                }
                exposed_without_auth = true;
            }
        }
        Ok(Config {
            grpc_addr,
            metrics_addr,
            health_addr,
            tls,
            auth_file: args.auth_file,
            signing_key_file: args.signing_key_file,
            governance_config: args.governance_config,
            checkpoint_interval,
            exposed_without_auth,
            data_dir: args.data_dir,
            safe_mode_at_start,
            log_format,
            drain_timeout,
            sled: SledOptions { cache_capacity: cache_mb * 1024 * 1024 },
            idempotency_retention: Duration::from_secs(retention_seconds),
            watch_heartbeat,
            limits,
            faults: Arc::default(),
            clock: Arc::new(SystemClock),
        })
    }
}

/// A whole number within `range`, or an error naming the setting and the range.
fn parse_whole(
    setting: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    raw.trim().parse::<u64>().ok().filter(|n| range.contains(n)).ok_or_else(|| {
        invalid(
            setting,
            format!("{raw:?} is not a whole number from {} to {}", range.start(), range.end()),
        )
    })
}

fn parse_addr(setting: &'static str, raw: &str) -> Result<SocketAddr, ConfigError> {
    raw.trim().parse().map_err(|_| {
        invalid(setting, format!("{raw:?} is not an IP address and port like 127.0.0.1:50051"))
    })
}

/// `true|1|yes|on` → true; `false|0|no|off|""` → false (any case, trimmed); else an error.
pub fn parse_safe_mode(raw: Option<&str>) -> Result<bool, ConfigError> {
    let Some(raw) = raw else { return Ok(false) };
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(invalid(
            "--safe-mode / BRAIN_SAFE_MODE",
            format!("{raw:?} is not one of true, 1, yes, on, false, 0, no, off"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_safe_mode;

    #[test]
    fn safe_mode_values_are_read_loosely_but_never_guessed() {
        for on in ["true", " TRUE ", "1", "yes", "On"] {
            assert!(parse_safe_mode(Some(on)).expect("valid"), "{on}");
        }
        for off in ["false", "0", "NO", "off", "", "  "] {
            assert!(!parse_safe_mode(Some(off)).expect("valid"), "{off}");
        }
        assert!(!parse_safe_mode(None).expect("absent is valid"));
        for bad in ["enable", "2", "y", "truee"] {
            let err = parse_safe_mode(Some(bad)).expect_err("invalid");
            assert!(err.to_string().contains("BRAIN_SAFE_MODE"), "{err}");
        }
    }
}
