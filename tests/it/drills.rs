//! The incident drills: each runs against a server of its own and must pass every step; the
//! records it caused are checked here again, independently of the drill's own checks.

use std::path::Path;

use brain_ops::drill::{self, Report, Scenario, Target};
use serde_json::Value;

use crate::helpers::{BIN, spawn_app};

async fn run_locally(scenario: Scenario) -> Report {
    let mut target = Target::local(Path::new(BIN)).await.expect("a local server starts");
    let report = drill::run(scenario, &mut target).await;
    let json = serde_json::to_string_pretty(&report.to_json(true)).unwrap_or_default();
    assert!(report.passed(), "{json}");
    report
}

fn of_type<'a>(report: &'a Report, event_type: &str) -> Vec<&'a Value> {
    report.events.iter().filter(|e| e["event_type"] == event_type).collect()
}

/// Every event the drill reported itself is marked with its id.
fn assert_marked(report: &Report, reported: &[&str]) {
    let mine: Vec<&Value> = report
        .events
        .iter()
        .filter(|e| reported.contains(&e["event_type"].as_str().unwrap_or("")))
        .collect();
    assert!(!mine.is_empty(), "the drill reported events");
    for event in mine {
        assert_eq!(event["metadata"]["drill"], "true", "{event}");
        assert_eq!(event["metadata"]["drill_id"], report.drill_id.as_str(), "{event}");
    }
}

#[tokio::test]
async fn invalid_bundle() {
    let report = run_locally(Scenario::InvalidBundle).await;
    assert_marked(&report, &["sovereign.bundle_quarantined", "sovereign.bundle_released"]);
    let quarantines = of_type(&report, "sovereign.bundle_quarantined");
    assert_eq!(quarantines.len(), 3, "quarantined, repeated, re-quarantined");
    assert!(quarantines.iter().all(|e| e["severity"] == "warning"));
    assert_eq!(of_type(&report, "sovereign.bundle_released").len(), 2, "released twice");
}

#[tokio::test]
async fn executor_crash() {
    let report = run_locally(Scenario::ExecutorCrash).await;
    assert_marked(
        &report,
        &["factory.step_failed", "factory.rollback_started", "factory.rollback_completed"],
    );
    let failed = of_type(&report, "factory.step_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["metadata"]["timeout_seconds"], "300");
    assert_eq!(failed[0]["severity"], "error");
}

/// Takes a little over a minute: the shortest override lives 60 seconds.
#[tokio::test]
async fn override_abuse() {
    let report = run_locally(Scenario::OverrideAbuse).await;
    assert_marked(&report, &["sovereign.mode_changed"]);
    let denied = of_type(&report, "system.permission_denied");
    assert!(denied.iter().any(|e| e["source"] == "factory-executor"), "{denied:?}");
    let reuse = of_type(&report, "override.reuse_denied");
    assert_eq!(reuse.len(), 2, "reuse and expiry: {reuse:?}");
    let violations = of_type(&report, "system.override_violation");
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0]["source"], "sovereign");
    // Frozen by the drill and thawed by it: the last word on safe mode is the drill's thaw.
    let modes: Vec<&str> = report
        .events
        .iter()
        .filter_map(|e| e["event_type"].as_str())
        .filter(|t| t.starts_with("system.safe_mode_"))
        .collect();
    assert_eq!(modes.first(), Some(&"system.safe_mode_enabled"));
    assert_eq!(modes.last(), Some(&"system.safe_mode_disabled"));
}

#[tokio::test]
async fn tampered_log() {
    let report = run_locally(Scenario::TamperedLog).await;
    assert_eq!(of_type(&report, "system.integrity_violation").len(), 1);
    assert_eq!(of_type(&report, "system.integrity_acknowledged").len(), 1);
}

#[tokio::test]
async fn killed_during_freeze() {
    let report = run_locally(Scenario::KilledDuringFreeze).await;
    let enabled = of_type(&report, "system.safe_mode_enabled");
    assert_eq!(enabled.len(), 1, "one freeze, kept across the kill: {:?}", report.events);
    assert!(of_type(&report, "system.safe_mode_disabled").is_empty());
}

/// Against a deployment, the CLI runs what it can and says why it skips the rest.
#[tokio::test]
async fn the_cli_runs_drills_against_a_server_and_skips_local_only_ones() {
    let app = spawn_app().await;
    let output = tokio::process::Command::new(BIN)
        .args(["drill", "run", "all", "-o", "json"])
        .env_clear()
        .env("BRAIN_SERVER", format!("http://{}", app.grpc_addr))
        .output()
        .await
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reports: Value = serde_json::from_str(&stdout).expect("JSON");
    let reports = reports.as_array().expect("one report per drill");
    let by_name = |name: &str| reports.iter().find(|r| r["drill"] == name).expect(name);
    assert_eq!(by_name("invalid-bundle")["passed"], true);
    assert_eq!(by_name("executor-crash")["passed"], true);
    for skipped in ["override-abuse", "tampered-log", "killed-during-freeze"] {
        assert!(by_name(skipped)["skipped"].is_string(), "{skipped}");
    }
    // The drills left the deployment as they found it.
    assert!(!app.status().await.enabled);

    let alone = tokio::process::Command::new(BIN)
        .args(["drill", "run", "tampered-log"])
        .env_clear()
        .env("BRAIN_SERVER", format!("http://{}", app.grpc_addr))
        .output()
        .await
        .expect("runs");
    assert_eq!(alone.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&alone.stderr).contains("--local"));
}
