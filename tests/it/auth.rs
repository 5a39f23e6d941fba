//! Authentication and roles: every RPC × every kind of caller, refusals on record, reloads and
//! protected mode.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use brain_ops::pb;
use brain_ops::pb::audit_service_client::AuditServiceClient;
use brain_ops::pb::evidence_service_client::EvidenceServiceClient;
use brain_ops::pb::metrics_service_client::MetricsServiceClient;
use brain_ops::pb::override_service_client::OverrideServiceClient;
use brain_ops::pb::safe_mode_service_client::SafeModeServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::helpers::{TestApp, event, list_all, record_of, serve_process, spawn_app_in};

/// Writes a principals file for `(name, role)` pairs and returns each name's token.
pub fn write_principals(path: &Path, principals: &[(&str, &str)]) -> HashMap<String, String> {
    let mut tokens = HashMap::new();
    let mut file = String::new();
    for (name, role) in principals {
        let (token, digest) = brain_ops::auth::new_token().expect("randomness");
        file.push_str(&format!(
            "[[principal]]\nname = \"{name}\"\nrole = \"{role}\"\ntoken_sha256 = \"{digest}\"\n\n"
        ));
        tokens.insert((*name).to_owned(), token);
    }
    std::fs::write(path, file).expect("writes the principals file");
    tokens
}

pub fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("ascii");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// A service with three principals: factory-executor (service), ops-alice (operator),
/// audit-bob (auditor).
async fn secured_app(dir: &Path) -> (TestApp, HashMap<String, String>) {
    let file = dir.join("principals.toml");
    let tokens = write_principals(
        &file,
        &[("factory-executor", "service"), ("ops-alice", "operator"), ("audit-bob", "auditor")],
    );
    let app = spawn_app_in(&dir.join("data"), |config| config.auth_file = Some(file)).await;
    (app, tokens)
}

fn code<T>(result: Result<T, tonic::Status>) -> Code {
    result.map_or_else(|status| status.code(), |_| Code::Ok)
}

/// Calls one RPC with default arguments and returns the status code.
async fn call(channel: &Channel, rpc: &str, token: Option<&str>) -> Code {
    let mut safe = SafeModeServiceClient::new(channel.clone());
    let mut audit = AuditServiceClient::new(channel.clone());
    let mut evidence = EvidenceServiceClient::new(channel.clone());
    let mut metrics = MetricsServiceClient::new(channel.clone());
    let mut overrides = OverrideServiceClient::new(channel.clone());
    let t = token;
    match rpc {
        "SafeModeService/GetStatus" => {
            code(safe.get_status(with_token(pb::GetStatusRequest {}, t)).await)
        }
        "SafeModeService/Enable" => {
            code(safe.enable(with_token(pb::EnableRequest::default(), t)).await)
        }
        "SafeModeService/Disable" => {
            code(safe.disable(with_token(pb::DisableRequest::default(), t)).await)
        }
        "SafeModeService/CheckOperation" => {
            code(safe.check_operation(with_token(pb::CheckOperationRequest::default(), t)).await)
        }
        "SafeModeService/Watch" => code(safe.watch(with_token(pb::WatchRequest {}, t)).await),
        "AuditService/Record" => {
            code(audit.record(with_token(pb::RecordRequest::default(), t)).await)
        }
        "AuditService/RecordBatch" => {
            code(audit.record_batch(with_token(pb::RecordBatchRequest::default(), t)).await)
        }
        "AuditService/List" => {
            code(audit.list(with_token(pb::AuditServiceListRequest::default(), t)).await)
        }
        "AuditService/VerifyChain" => {
            code(audit.verify_chain(with_token(pb::VerifyChainRequest::default(), t)).await)
        }
        "EvidenceService/Export" => {
            code(evidence.export(with_token(pb::ExportRequest::default(), t)).await)
        }
        "EvidenceService/ExportStream" => {
            code(evidence.export_stream(with_token(pb::ExportStreamRequest::default(), t)).await)
        }
        "EvidenceService/Verify" => {
            code(evidence.verify(with_token(pb::VerifyRequest::default(), t)).await)
        }
        "EvidenceService/VerifyStream" => {
            let chunks = tokio_stream::iter(Vec::<pb::VerifyStreamRequest>::new());
            code(evidence.verify_stream(with_token(chunks, t)).await)
        }
        "EvidenceService/GetPublicKeys" => {
            code(evidence.get_public_keys(with_token(pb::GetPublicKeysRequest {}, t)).await)
        }
        "MetricsService/GetSummary" => {
            code(metrics.get_summary(with_token(pb::GetSummaryRequest {}, t)).await)
        }
        "OverrideService/Grant" => {
            code(overrides.grant(with_token(pb::GrantRequest::default(), t)).await)
        }
        "OverrideService/Consume" => {
            code(overrides.consume(with_token(pb::ConsumeRequest::default(), t)).await)
        }
        "OverrideService/Revoke" => {
            code(overrides.revoke(with_token(pb::RevokeRequest::default(), t)).await)
        }
        "OverrideService/List" => {
            code(overrides.list(with_token(pb::OverrideServiceListRequest::default(), t)).await)
        }
        other => panic!("unknown rpc {other}"),
    }
}

/// The role matrix of docs/SECURITY.md: (rpc, service, operator, auditor).
const EXPECTED: [(&str, bool, bool, bool); 19] = [
    ("SafeModeService/GetStatus", true, true, true),
    ("SafeModeService/Enable", true, true, false),
    ("SafeModeService/Disable", false, true, false),
    ("SafeModeService/CheckOperation", true, true, false),
    ("SafeModeService/Watch", true, true, true),
    ("AuditService/Record", true, true, false),
    ("AuditService/RecordBatch", true, true, false),
    ("AuditService/List", false, true, true),
    ("AuditService/VerifyChain", false, true, true),
    ("EvidenceService/Export", false, true, true),
    ("EvidenceService/ExportStream", false, true, true),
    ("EvidenceService/Verify", false, true, true),
    ("EvidenceService/VerifyStream", false, true, true),
    ("EvidenceService/GetPublicKeys", false, true, true),
    ("MetricsService/GetSummary", true, true, true),
    ("OverrideService/Grant", false, true, false),
    ("OverrideService/Consume", true, true, false),
    ("OverrideService/Revoke", false, true, false),
    ("OverrideService/List", false, true, false),
];

#[tokio::test]
async fn every_rpc_answers_each_kind_of_caller_as_the_matrix_says() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (app, tokens) = secured_app(dir.path()).await;
    let wrong = "brainops_0000000000000000000000000000000000000000000000000000000000000000";
    for (rpc, service, operator, auditor) in EXPECTED {
        for (who, token, allowed) in [
            ("service", Some(tokens["factory-executor"].as_str()), service),
            ("operator", Some(tokens["ops-alice"].as_str()), operator),
            ("auditor", Some(tokens["audit-bob"].as_str()), auditor),
        ] {
            let code = call(&app.channel, rpc, token).await;
            if allowed {
                assert!(
                    code != Code::PermissionDenied && code != Code::Unauthenticated,
                    "{who} may call {rpc}, got {code:?}"
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "{who} may not call {rpc}");
            }
        }
        assert_eq!(
            call(&app.channel, rpc, None).await,
            Code::Unauthenticated,
            "{rpc} without a token"
        );
        assert_eq!(
            call(&app.channel, rpc, Some(wrong)).await,
            Code::Unauthenticated,
            "{rpc} with a wrong token"
        );
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let probe = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
    assert!(probe.is_ok(), "health needs no token");
}

#[tokio::test]
async fn the_authenticated_principal_is_the_source_and_enabled_by() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (app, tokens) = secured_app(dir.path()).await;
    let mut safe = SafeModeServiceClient::new(app.channel.clone());
    let enabled = safe
        .enable(with_token(
            pb::EnableRequest { reason: "alice freezes".into() },
            Some(&tokens["ops-alice"]),
        ))
        .await
        .expect("enabled")
        .into_inner();
    assert_eq!(enabled.status.expect("status").enabled_by, "ops-alice");
    let mut e = event("factory.step_failed", "timeout");
    e.triggered_by = "executor-7 (says so itself)".into();
    AuditServiceClient::new(app.channel.clone())
        .record(with_token(
            pb::RecordRequest { event: Some(e), idempotency_key: String::new() },
            Some(&tokens["factory-executor"]),
        ))
        .await
        .expect("recorded");
    let events = list_as(&app, &tokens["audit-bob"]).await;
    let step = events
        .iter()
        .map(record_of)
        .find(|r| r["event_type"] == "factory.step_failed")
        .expect("recorded");
    assert_eq!(step["source"], "factory-executor");
    assert_eq!(step["triggered_by"], "executor-7 (says so itself)");
}

async fn list_as(app: &TestApp, token: &str) -> Vec<pb::LedgerEvent> {
    let mut client = AuditServiceClient::with_interceptor(app.channel.clone(), {
        let value: tonic::metadata::MetadataValue<_> =
            format!("Bearer {token}").parse().expect("ascii");
        move |mut request: Request<()>| {
            request.metadata_mut().insert("authorization", value.clone());
            Ok(request)
        }
    });
    let mut events = Vec::new();
    let mut request = pb::AuditServiceListRequest { page_size: Some(1000), ..Default::default() };
    loop {
        let page = client.list(request.clone()).await.expect("lists").into_inner();
        events.extend(page.events);
        if page.next_after_seq == 0 {
            return events;
        }
        request.after_seq = page.next_after_seq;
    }
}

#[tokio::test]
async fn a_service_principal_cannot_lift_a_freeze_and_the_attempt_is_critical_on_record() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (app, tokens) = secured_app(dir.path()).await;
    let mut safe = SafeModeServiceClient::new(app.channel.clone());
    let executor = Some(tokens["factory-executor"].as_str());
    safe.enable(with_token(pb::EnableRequest { reason: "a sibling may freeze".into() }, executor))
        .await
        .expect("a service may freeze");
    let denied = safe
        .disable(with_token(pb::DisableRequest { reason: "let me run".into() }, executor))
        .await
        .expect_err("a service may not thaw");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("factory-executor"), "{}", denied.message());
    let status =
        safe.get_status(with_token(pb::GetStatusRequest {}, executor)).await.expect("status");
    assert!(status.into_inner().status.expect("status").enabled, "still frozen");
    let events = list_as(&app, &tokens["audit-bob"]).await;
    let denial = events
        .iter()
        .map(record_of)
        .find(|r| r["event_type"] == "system.permission_denied")
        .expect("the attempt is on record before the answer");
    assert_eq!(denial["severity"], "critical");
    assert_eq!(denial["source"], "factory-executor");
    assert_eq!(denial["metadata"]["rpc"], "SafeModeService/Disable");
    assert_eq!(denial["metadata"]["peer"], "127.0.0.1");
}

#[tokio::test]
async fn a_flood_of_10000_bad_token_calls_is_counted_exactly_in_a_few_events() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (app, tokens) = secured_app(dir.path()).await;
    let tasks = (0..16).map(|_| {
        let channel = app.channel.clone();
        tokio::spawn(async move {
            let mut safe = SafeModeServiceClient::new(channel);
            for _ in 0..625 {
                let refused =
                    safe.get_status(with_token(pb::GetStatusRequest {}, Some("stolen?"))).await;
                assert_eq!(refused.expect_err("refused").code(), Code::Unauthenticated);
            }
        })
    });
    for task in tasks {
        task.await.expect("task");
    }
    let data = app.data_dir.clone();
    app.stop().await;
    let file = dir.path().join("principals.toml");
    let app = spawn_app_in(&data, |config| config.auth_file = Some(file)).await;
    let denials: Vec<_> = list_as(&app, &tokens["audit-bob"])
        .await
        .iter()
        .map(record_of)
        .filter(|r| r["event_type"] == "system.permission_denied")
        .collect();
    let total: u64 = denials
        .iter()
        .map(|r| r["metadata"]["count"].as_str().expect("count").parse::<u64>().expect("int"))
        .sum();
    assert_eq!(total, 10_000, "every refusal is counted exactly once");
    assert!(denials.len() <= 2 * 60, "bounded: {} events", denials.len());
    // Per peer and second: the first refusal on its own, at most one aggregate for the rest.
    let mut windows = std::collections::HashSet::new();
    for aggregate in denials.iter().filter(|r| r["metadata"]["aggregated"] == "true") {
        let window = aggregate["metadata"]["window_start"].as_str().expect("window").to_owned();
        assert!(windows.insert(window), "one aggregate per peer and second");
    }
    assert!(denials.iter().all(|r| r["source"] == "unauthenticated"));
}

#[tokio::test]
async fn sighup_reloads_principals_atomically_and_rejects_a_malformed_file() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let file = dir.path().join("principals.toml");
    let tokens = write_principals(&file, &[("ops-alice", "operator"), ("ops-carol", "operator")]);
    let file_env = file.to_str().expect("utf8").to_owned();
    let process = serve_process(&dir.path().join("data"), &[("BRAIN_AUTH_FILE", &file_env)]);
    let channel = process.channel().await;
    let (alice, carol) = (tokens["ops-alice"].clone(), tokens["ops-carol"].clone());
    assert_eq!(call(&channel, "SafeModeService/GetStatus", Some(&alice)).await, Code::Ok);

    // Revoke alice: keep carol's digest, drop alice's.
    let kept: String = std::fs::read_to_string(&file)
        .expect("reads")
        .split("[[principal]]")
        .filter(|block| block.contains("ops-carol"))
        .map(|block| format!("[[principal]]{block}"))
        .collect();
    std::fs::write(&file, kept).expect("writes");
    process.signal("HUP");
    let revoked = tokio::time::timeout(Duration::from_secs(10), async {
        while call(&channel, "SafeModeService/GetStatus", Some(&alice)).await
            != Code::Unauthenticated
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(revoked.is_ok(), "a revoked token stops working once the reload is done");
    assert_eq!(call(&channel, "SafeModeService/GetStatus", Some(&carol)).await, Code::Ok);

    std::fs::write(&file, "[[principal]]\nname = \"broken\"\nrole = \"superuser\"\n")
        .expect("writes");
    process.signal("HUP");
    let recorded = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut audit = AuditServiceClient::new(channel.clone());
            let request = pb::AuditServiceListRequest {
                event_type_prefix: "system.principals_reload".into(),
                ..Default::default()
            };
            let events = audit
                .list(with_token(request, Some(&carol)))
                .await
                .expect("lists")
                .into_inner()
                .events;
            if events.iter().any(|e| e.event_type == "system.principals_reload_failed") {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the rejected reload is recorded");
    assert!(recorded.iter().any(|e| e.event_type == "system.principals_reloaded"));
    assert_eq!(
        call(&channel, "SafeModeService/GetStatus", Some(&carol)).await,
        Code::Ok,
        "the old principals stay"
    );
}

#[tokio::test]
async fn protected_mode_refuses_0_0_0_0_without_auth_and_records_the_insecure_override() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let output = std::process::Command::new(crate::helpers::BIN)
        .arg("serve")
        .env_clear()
        .env("BRAIN_DATA_DIR", dir.path())
        .env("BRAIN_GRPC_ADDR", "0.0.0.0:0")
        .env("BRAIN_METRICS_ADDR", "127.0.0.1:0")
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("BRAIN_GRPC_ADDR"));

    let process = serve_process(
        dir.path(),
        &[("BRAIN_GRPC_ADDR", "0.0.0.0:0"), ("BRAIN_INSECURE_ALLOW_UNAUTHENTICATED", "true")],
    );
    let events = list_all(
        &mut AuditServiceClient::new(process.channel().await),
        pb::AuditServiceListRequest::default(),
    )
    .await;
    let insecure =
        events.iter().find(|e| e.event_type == "system.insecure_start").expect("recorded at start");
    assert_eq!(record_of(insecure)["severity"], "critical");
}

#[tokio::test]
async fn a_bad_principals_file_exits_64_naming_the_setting() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let file = dir.path().join("principals.toml");
    std::fs::write(
        &file,
        "[[principal]]\nname = \"x\"\nrole = \"service\"\ntoken_sha256 = \"nothex\"\n",
    )
    .expect("writes");
    let output = std::process::Command::new(crate::helpers::BIN)
        .arg("serve")
        .env_clear()
        .env("BRAIN_DATA_DIR", dir.path().join("data"))
        .env("BRAIN_GRPC_ADDR", "127.0.0.1:0")
        .env("BRAIN_METRICS_ADDR", "127.0.0.1:0")
        .env("BRAIN_AUTH_FILE", &file)
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("BRAIN_AUTH_FILE") && stderr.contains("principal[0].token_sha256"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_same_idempotency_key_from_two_principals_records_two_events() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let file = dir.path().join("principals.toml");
    let tokens = write_principals(
        &file,
        &[("executor-a", "service"), ("executor-b", "service"), ("audit-bob", "auditor")],
    );
    let app = spawn_app_in(&dir.path().join("data"), |config| config.auth_file = Some(file)).await;
    let mut audit = AuditServiceClient::new(app.channel.clone());
    let mut seqs = Vec::new();
    for who in ["executor-a", "executor-b", "executor-a"] {
        let request = pb::RecordRequest {
            event: Some(event("factory.step_completed", "same payload")),
            idempotency_key: "step-1".into(),
        };
        let answer = audit
            .record(with_token(request, Some(&tokens[who])))
            .await
            .expect("recorded")
            .into_inner();
        seqs.push((answer.seq, answer.duplicate));
    }
    assert_eq!(seqs, [(1, false), (2, false), (1, true)], "keys are scoped to their principal");
    let stored = list_as(&app, &tokens["audit-bob"]).await;
    let sources: Vec<_> =
        stored.iter().map(|e| record_of(e)["source"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(sources, ["executor-a", "executor-b"]);
}
