//! Metrics: OpenTelemetry instruments bridged to a Prometheus text endpoint. Every metric name,
//! unit and description is declared here, once. The contract names come out exactly: the
//! exporter adds no `_total`, no unit suffix, no `otel_scope_*` labels and no `target_info`.
//!
//! Totals are projections of the ledger, read from the published state when Prometheus scrapes
//! (memory only, however long the ledger). Latencies are recorded as they happen. Nothing here
//! can fail or slow a call: a metrics failure is logged and the call goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};
use serde::Serialize;

use crate::ledger::clock::Clock;
use crate::ledger::record::{Mode, format_time};
use crate::ledger::{AppendObserver, Ledger};
use crate::overrides;
use crate::state::{OperationKind, State};

/// Latency buckets in seconds, from 100 µs to 10 s.
const SECONDS_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0];

/// The operational picture: `/metrics/summary` and `MetricsService.GetSummary`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub current_mode: &'static str,
    pub mode_switches: u64,
    pub override_active: bool,
    pub quarantines: u64,
    pub executor_failures: u64,
    /// RFC 3339; `None` if nothing succeeded yet.
    pub last_success: Option<String>,
    #[serde(skip)]
    pub last_success_micros: Option<i64>,
    pub uptime_seconds: u64,
    pub safe_mode: bool,
    pub ledger_head_seq: u64,
    pub blocked_operations: BlockedByKind,
    pub safe_mode_violations: u64,
    pub override_violations: u64,
    pub permission_denied: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockedByKind {
    pub execution: u64,
    pub deployment: u64,
    pub bundle_load: u64,
}

/// The current mode as the metrics show it: online until a sibling reports another.
pub fn current_mode(state: &State) -> Mode {
    state.operations.mode.unwrap_or(Mode::Online)
}

impl Summary {
    pub fn of(state: &State, uptime: Duration, now_micros: i64) -> Summary {
        let ops = &state.operations;
        Summary {
            current_mode: current_mode(state).as_str(),
            mode_switches: ops.mode_switches,
            override_active: overrides::any_active(state, now_micros),
            quarantines: ops.quarantines,
            executor_failures: ops.executor_failures,
            last_success: ops.last_success_micros.map(format_time),
            last_success_micros: ops.last_success_micros,
            uptime_seconds: uptime.as_secs(),
            safe_mode: state.safe_mode.enabled,
            ledger_head_seq: state.head.seq,
            blocked_operations: BlockedByKind {
                execution: state.blocked[OperationKind::Execution as usize],
                deployment: state.blocked[OperationKind::Deployment as usize],
                bundle_load: state.blocked[OperationKind::BundleLoad as usize],
            },
            safe_mode_violations: state.violations.safe_mode,
            override_violations: state.violations.override_use,
            permission_denied: state.violations.permission_denied,
        }
    }
}

/// The metrics of one service instance.
pub struct Metrics {
    /// The ledger's clock, for what depends on time (an override's expiry).
    clock: Arc<dyn Clock>,
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    meter: Meter,
    started: Instant,
    rpc_seconds: Histogram<f64>,
    append_seconds: Histogram<f64>,
    append_failures: Counter<u64>,
    /// Live `Watch` streams.
    pub watch_streams: Arc<AtomicI64>,
    /// Bytes of the ledger on disk, refreshed in the background.
    pub ledger_bytes: Arc<AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Sets up the exporter and the instruments that are recorded as things happen.
    pub fn new(clock: Arc<dyn Clock>) -> Result<Metrics, String> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_units()
            .without_counter_suffixes()
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| e.to_string())?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("brain-ops");
        let rpc_seconds = meter
            .f64_histogram("brain_rpc_duration_seconds")
            .with_description("gRPC call latency in seconds, by RPC and status code")
            .with_boundaries(SECONDS_BUCKETS.to_vec())
            .build();
        let append_seconds = meter
            .f64_histogram("brain_ledger_append_duration_seconds")
            .with_description("Time to store one batch durably (write, flush, fsync), in seconds")
            .with_boundaries(SECONDS_BUCKETS.to_vec())
            .build();
        let append_failures = meter
            .u64_counter("brain_ledger_append_failures_total")
            .with_description(
                "Batches the storage failed to store (nothing in them was acknowledged)",
            )
            .build();
        // Exported from the start at 0: `increase()` needs a sample before the first failure,
        // or the alert on it could never see that failure.
        append_failures.add(0, &[]);
        Ok(Metrics {
            clock,
            registry,
            provider,
            meter,
            started: Instant::now(),
            rpc_seconds,
            append_seconds,
            append_failures,
            watch_streams: Arc::default(),
            ledger_bytes: Arc::default(),
        })
    }

    /// What the ledger writer calls after every storage append.
    pub fn append_observer(&self) -> AppendObserver {
        let (seconds, failures) = (self.append_seconds.clone(), self.append_failures.clone());
        Arc::new(move |elapsed: Duration, ok: bool| {
            seconds.record(elapsed.as_secs_f64(), &[]);
            if !ok {
                failures.add(1, &[]);
            }
        })
    }

    /// Records one finished gRPC call.
    pub fn record_rpc(&self, rpc: &str, code: &str, elapsed: Duration) {
        let labels = [KeyValue::new("rpc", rpc.to_owned()), KeyValue::new("code", code.to_owned())];
        self.rpc_seconds.record(elapsed.as_secs_f64(), &labels);
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The summary of `state` as of now.
    pub fn summary(&self, state: &State) -> Summary {
        Summary::of(state, self.uptime(), self.clock.now_micros())
    }

    /// Registers every metric read from the published state at scrape time.
    pub fn observe(&self, ledger: &Ledger) {
        let gauge = |name: &'static str, help: &'static str, read: fn(&State) -> u64| {
            let ledger = ledger.clone();
            self.meter
                .u64_observable_gauge(name)
                .with_description(help)
                .with_callback(move |o| o.observe(read(&ledger.state()), &[]))
                .build();
        };
        let counter = |name: &'static str, help: &'static str, read: fn(&State) -> u64| {
            let ledger = ledger.clone();
            self.meter
                .u64_observable_counter(name)
                .with_description(help)
                .with_callback(move |o| o.observe(read(&ledger.state()), &[]))
                .build();
        };
        {
            let ledger = ledger.clone();
            self.meter
                .u64_observable_gauge("brain_mode_current")
                .with_description("Current operation mode: online 0, offline 1, sovereign 2, quarantine 3 (one series, labelled with the mode)")
                .with_callback(move |o| {
                    let mode = current_mode(&ledger.state());
                    o.observe(u64::from(mode.metric_value()), &[KeyValue::new("mode", mode.as_str())]);
                })
                .build();
        }
        counter(
            "brain_mode_switch_total",
            "Operation mode switches (sovereign.mode_changed where the mode changed)",
            |s| s.operations.mode_switches,
        );
        {
            let (ledger, clock) = (ledger.clone(), self.clock.clone());
            self.meter
                .u64_observable_gauge("brain_override_active")
                .with_description("1 while an emergency override can be consumed (granted, not consumed, revoked or expired), else 0")
                .with_callback(move |o| {
                    let active = overrides::any_active(&ledger.state(), clock.now_micros());
                    o.observe(u64::from(active), &[]);
                })
                .build();
        }
        counter(
            "brain_quarantine_total",
            "Bundle quarantines (a bundle still quarantined is not counted again)",
            |s| s.operations.quarantines,
        );
        counter(
            "brain_executor_failures_total",
            "Executor failures (factory.step_failed + factory.execution_failed)",
            |s| s.operations.executor_failures,
        );
        gauge(
            "brain_last_success_timestamp",
            "Unix seconds of the last successful execution or step; 0 if none",
            |s| {
                s.operations
                    .last_success_micros
                    .map_or(0, |m| u64::try_from(m.div_euclid(1_000_000)).unwrap_or(0))
            },
        );
        gauge("brain_safe_mode_enabled", "1 while safe mode is on, else 0", |s| {
            u64::from(s.safe_mode.enabled)
        });
        {
            let ledger = ledger.clone();
            self.meter
                .u64_observable_counter("brain_blocked_operations_total")
                .with_description("CheckOperation calls refused by safe mode, by kind")
                .with_callback(move |o| {
                    let state = ledger.state();
                    for kind in OperationKind::ALL {
                        o.observe(
                            state.blocked[kind as usize],
                            &[KeyValue::new("kind", kind.as_str())],
                        );
                    }
                })
                .build();
        }
        counter(
            "brain_safe_mode_violations_total",
            "Work reported as started during a freeze (system.safe_mode_violation)",
            |s| s.violations.safe_mode,
        );
        counter(
            "brain_override_violations_total",
            "Forced actions reported without a consumed override (system.override_violation)",
            |s| s.violations.override_use,
        );
        counter(
            "brain_permission_denied_total",
            "Calls refused for a missing or wrong token or role",
            |s| s.violations.permission_denied,
        );
        counter(
            "brain_integrity_violations_total",
            "Ledger integrity violations found at start",
            |s| s.violations.integrity,
        );
        counter(
            "brain_clock_regressions_total",
            "Times the system clock stepped back (system.clock_regression)",
            |s| s.clock_regressions,
        );
        gauge("brain_ledger_head_seq", "Seq of the newest durable ledger event", |s| s.head.seq);
        gauge(
            "brain_ledger_checkpoint_head_seq",
            "Head seq vouched for by the newest signed checkpoint; 0 if none",
            |s| s.checkpoint.as_ref().map_or(0, |c| c.head_seq),
        );
        {
            let ledger = ledger.clone();
            self.meter
                .u64_observable_gauge("brain_ledger_checkpoint_info")
                .with_description("The newest signed checkpoint: its head hash and signing key id (one series, value 1)")
                .with_callback(move |o| {
                    if let Some(c) = &ledger.state().checkpoint {
                        o.observe(
                            1,
                            &[
                                KeyValue::new("head_hash", c.head_hash.clone()),
                                KeyValue::new("key_id", c.key_id.clone()),
                            ],
                        );
                    }
                })
                .build();
        }
        {
            let ledger = ledger.clone();
            self.meter
                .u64_observable_gauge("brain_storage_degraded")
                .with_description("1 while the ledger storage cannot append, else 0")
                .with_callback(move |o| o.observe(u64::from(ledger.health().fault.is_some()), &[]))
                .build();
        }
        {
            let bytes = self.ledger_bytes.clone();
            self.meter
                .u64_observable_gauge("brain_ledger_size_bytes")
                .with_description("Bytes the ledger occupies on disk")
                .with_callback(move |o| o.observe(bytes.load(Ordering::Relaxed), &[]))
                .build();
        }
        {
            let ledger = ledger.clone();
            self.meter
                .u64_observable_gauge("brain_idempotency_keys")
                .with_description("Idempotency keys remembered (bounded by the retention window)")
                .with_callback(move |o| o.observe(ledger.idempotency_keys(), &[]))
                .build();
        }
        {
            let streams = self.watch_streams.clone();
            self.meter
                .i64_observable_gauge("brain_watch_streams")
                .with_description("Live SafeModeService/Watch streams")
                .with_callback(move |o| o.observe(streams.load(Ordering::Relaxed), &[]))
                .build();
        }
        {
            let started = self.started;
            self.meter
                .u64_observable_gauge("brain_uptime_seconds")
                .with_description("Seconds since this process started")
                .with_callback(move |o| o.observe(started.elapsed().as_secs(), &[]))
                .build();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, String> {
        let mut text = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut text).map_err(|e| e.to_string())?;
        String::from_utf8(text).map_err(|e| e.to_string())
    }

    /// Flushes nothing (the reader is pulled) but ends the provider cleanly.
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}
