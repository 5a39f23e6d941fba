//! Projections of sibling reports, violation detection, and the metrics that show them.

use std::collections::HashMap;

use brain_ops::pb;
use brain_ops::pb::metrics_service_client::MetricsServiceClient;
use tonic::Code;

use crate::helpers::{TestApp, event, http_get, record_of, spawn_app, spawn_app_in};

/// Metric name → its series as (labels, value).
pub type Scraped = HashMap<String, Vec<(HashMap<String, String>, f64)>>;

/// Scrapes /metrics and parses it with a Prometheus text parser.
pub async fn scrape(app: &TestApp) -> Scraped {
    let (code, body) = http_get(app.metrics_addr, "/metrics").await;
    assert_eq!(code, 200);
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let mut by_name: HashMap<String, Vec<_>> = HashMap::new();
    for sample in scrape.samples {
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let labels = sample.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        by_name.entry(sample.metric).or_default().push((labels, value));
    }
    for name in by_name.keys() {
        assert!(!name.ends_with("_total_total"), "doubled suffix: {name}");
    }
    assert!(!body.contains("otel_scope") && !body.contains("target_info"), "{body}");
    by_name
}

pub fn value(metrics: &Scraped, name: &str) -> f64 {
    let series = metrics.get(name).unwrap_or_else(|| panic!("{name} is exported"));
    assert_eq!(series.len(), 1, "{name} has one series");
    series[0].1
}

pub async fn report(app: &TestApp, event: pb::Event) -> pb::RecordResponse {
    app.audit()
        .record(pb::RecordRequest { event: Some(event), idempotency_key: String::new() })
        .await
        .expect("recorded")
        .into_inner()
}

pub fn mode_change(before: pb::OperationMode, after: pb::OperationMode) -> pb::Event {
    pb::Event {
        event_type: "sovereign.mode_changed".into(),
        mode_before: before.into(),
        mode_after: after.into(),
        reason: "gate result".into(),
        ..Default::default()
    }
}

fn bundle(event_type: &str, id: &str) -> pb::Event {
    pb::Event { event_type: event_type.into(), bundle_id: id.into(), ..Default::default() }
}

#[tokio::test]
async fn projections_follow_the_reports_and_survive_a_restart() {
    use pb::OperationMode::{Online, Quarantine, Sovereign};
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    report(&app, mode_change(Online, Sovereign)).await;
    report(&app, mode_change(Sovereign, Sovereign)).await; // a forced same-mode "switch"
    report(&app, bundle("sovereign.bundle_quarantined", "b1")).await;
    report(&app, bundle("sovereign.bundle_quarantined", "b1")).await; // still quarantined
    report(&app, bundle("sovereign.bundle_released", "b1")).await;
    report(&app, bundle("sovereign.bundle_quarantined", "b1")).await; // counts again
    report(&app, event("factory.step_failed", "timeout after 300 s")).await;
    report(&app, event("factory.execution_failed", "rollback")).await;
    let success = report(&app, event("factory.step_completed", "ok")).await;
    let mut failed_step = event("factory.step_completed", "reported with success false");
    failed_step.success = Some(false);
    report(&app, failed_step).await;
    report(&app, mode_change(Sovereign, Quarantine)).await;

    let stored = app.list_all().await;
    let success_time =
        record_of(stored.iter().find(|e| e.seq == success.seq).expect("stored"))["time"]
            .as_str()
            .expect("time")
            .to_owned();
    let success_secs =
        brain_ops::ledger::record::parse_time(&success_time).expect("time") / 1_000_000;

    assert_projections(&app, success_secs).await;
    app.stop().await;
    assert_projections(&spawn_app_in(dir.path(), |_| {}).await, success_secs).await;
}

async fn assert_projections(app: &TestApp, success_secs: i64) {
    let metrics = scrape(app).await;
    assert_eq!(
        value(&metrics, "brain_mode_switch_total"),
        2.0,
        "same-mode reports are not switches"
    );
    assert_eq!(value(&metrics, "brain_quarantine_total"), 2.0);
    assert_eq!(value(&metrics, "brain_executor_failures_total"), 2.0);
    assert_eq!(value(&metrics, "brain_last_success_timestamp"), success_secs as f64);
    let mode = &metrics["brain_mode_current"];
    assert_eq!(mode.len(), 1);
    assert_eq!((mode[0].0["mode"].as_str(), mode[0].1), ("quarantine", 3.0));
    let summary = MetricsServiceClient::new(app.channel.clone())
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(summary.current_mode(), pb::OperationMode::Quarantine);
    assert_eq!((summary.mode_switches, summary.quarantines, summary.executor_failures), (2, 2, 2));
    assert_eq!(summary.last_success.expect("set").seconds, success_secs);
    // Eleven events, then also the checkpoint taken when the first instance stopped.
    let head = app.list_everything().await.last().map_or(0, |e| e.seq);
    assert!(head == 11 || head == 12, "{head}");
    assert_eq!(summary.ledger_head_seq, head);
    let (code, body) = http_get(app.metrics_addr, "/metrics/summary").await;
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (json["current_mode"].as_str(), json["quarantines"].as_u64()),
        (Some("quarantine"), Some(2))
    );
}

/// Every counter an alert takes `increase()` of is exported at 0 from the start: a series that
/// first appears at its first failure gives `increase()` no earlier sample, so the alert would
/// miss that failure.
#[tokio::test]
async fn counters_that_alerts_watch_are_exported_at_zero_on_a_fresh_server() {
    let app = spawn_app().await;
    let metrics = scrape(&app).await;
    for name in [
        "brain_ledger_append_failures_total",
        "brain_safe_mode_violations_total",
        "brain_override_violations_total",
        "brain_integrity_violations_total",
        "brain_permission_denied_total",
        "brain_clock_regressions_total",
    ] {
        assert_eq!(value(&metrics, name), 0.0, "{name}");
    }
}

#[tokio::test]
async fn brain_mode_current_keeps_a_single_series_as_the_mode_moves() {
    use pb::OperationMode::{Online, Quarantine, Sovereign};
    let app = spawn_app().await;
    let metrics = scrape(&app).await;
    let mode = &metrics["brain_mode_current"];
    assert_eq!((mode.len(), mode[0].0["mode"].as_str(), mode[0].1), (1, "online", 0.0));
    for (before, after, name, number) in [
        (Online, Sovereign, "sovereign", 2.0),
        (Sovereign, Quarantine, "quarantine", 3.0),
        (Quarantine, Online, "online", 0.0),
    ] {
        report(&app, mode_change(before, after)).await;
        let metrics = scrape(&app).await;
        let mode = &metrics["brain_mode_current"];
        assert_eq!(mode.len(), 1, "one series after moving to {name}: {mode:?}");
        assert_eq!((mode[0].0["mode"].as_str(), mode[0].1), (name, number));
    }
}

#[tokio::test]
async fn work_started_during_a_freeze_is_recorded_and_flagged_critical() {
    let app = spawn_app().await;
    report(&app, event("factory.execution_started", "before the freeze")).await;
    app.safe_mode().enable(pb::EnableRequest { reason: "freeze".into() }).await.expect("enabled");
    let started = report(&app, bundle("sovereign.bundle_loaded", "b7")).await;
    let mut deploy = event("api.deployment_started", "ignoring the freeze");
    deploy.triggered_by = "pipeline-9".into();
    report(&app, deploy).await;
    let events = app.list_all().await;
    let violations: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "system.safe_mode_violation")
        .map(record_of)
        .collect();
    assert_eq!(violations.len(), 2, "one per report of work started during the freeze");
    assert_eq!(violations[0]["severity"], "critical");
    assert_eq!(violations[0]["metadata"]["reported_event_type"], "sovereign.bundle_loaded");
    assert_eq!(violations[0]["bundle_id"], "b7");
    assert_eq!(violations[0]["seq"], started.seq + 1, "stored with the report, right after it");
    assert_eq!(value(&scrape(&app).await, "brain_safe_mode_violations_total"), 2.0);
}

#[tokio::test]
async fn a_forced_action_without_a_consumed_override_is_flagged() {
    let app = spawn_app().await;
    let mut forced = mode_change(pb::OperationMode::Online, pb::OperationMode::Sovereign);
    forced.metadata.insert("forced".into(), "true".into());
    forced.metadata.insert("override_id".into(), "ov-unknown".into());
    report(&app, forced).await;
    let events = app.list_all().await;
    let violation =
        events.iter().find(|e| e.event_type == "system.override_violation").expect("flagged");
    let violation = record_of(violation);
    assert_eq!(violation["severity"], "critical");
    assert!(violation["reason"].as_str().expect("reason").contains("ov-unknown"));
    assert_eq!(value(&scrape(&app).await, "brain_override_violations_total"), 1.0);
}

#[tokio::test]
async fn a_forged_safe_mode_disabled_is_refused_and_the_freeze_stands() {
    let app = spawn_app().await;
    app.safe_mode().enable(pb::EnableRequest { reason: "freeze".into() }).await.expect("enabled");
    let forged = app
        .audit()
        .record(pb::RecordRequest {
            event: Some(event("system.safe_mode_disabled", "forged")),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(forged.code(), Code::PermissionDenied);
    assert!(app.status().await.enabled);
}

#[tokio::test]
async fn a_password_never_reaches_the_ledger_list_metrics_or_exports() {
    let app = spawn_app().await;
    let mut e = event("sovereign.bundle_quarantined", "hash mismatch");
    e.bundle_id = "b1".into();
    e.metadata.insert("password".into(), "pa55-w0rd-xyz".into());
    report(&app, e).await;
    let listed = app.list_all().await;
    assert!(listed.iter().all(|e| !e.record_json.contains("pa55-w0rd-xyz")));
    for path in ["/metrics", "/metrics/summary", "/metrics/health"] {
        assert!(!http_get(app.metrics_addr, path).await.1.contains("pa55-w0rd-xyz"), "{path}");
    }
    let export = pb::ExportRequest {
        from: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
        to: Some(prost_types::Timestamp { seconds: 4_000_000_000, nanos: 0 }),
        scope: pb::EvidenceScope::Internal.into(),
        ..Default::default()
    };
    let pack = pb::evidence_service_client::EvidenceServiceClient::new(app.channel.clone())
        .export(export)
        .await
        .expect("exports")
        .into_inner();
    assert_eq!(pack.events_included, 1);
    assert!(!pack.pack_json.contains("pa55-w0rd-xyz"), "nor any export");
    assert!(pack.pack_json.contains("[REDACTED]"));
}

#[tokio::test]
async fn health_is_503_with_the_reason_while_storage_fails() {
    let app = spawn_app().await;
    assert_eq!(http_get(app.metrics_addr, "/metrics/health").await.0, 200);
    app.faults.fail_next_fsyncs(u32::MAX);
    let _ = app
        .audit()
        .record(pb::RecordRequest {
            event: Some(event("test.x", "y")),
            idempotency_key: String::new(),
        })
        .await;
    let (code, body) = http_get(app.metrics_addr, "/metrics/health").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("degraded") && body.contains("ledger storage"), "{body}");
    let metrics = scrape(&app).await;
    assert_eq!(value(&metrics, "brain_storage_degraded"), 1.0);
    assert_eq!(value(&metrics, "brain_safe_mode_enabled"), 1.0, "frozen by the storage fault");
    assert_eq!(http_get(app.metrics_addr, "/readyz").await.0, 200, "degraded is still ready");
    app.faults.fail_next_fsyncs(0);
}
