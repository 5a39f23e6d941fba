//! Safe mode end to end: the kill switch over real gRPC.

use std::time::Duration;

use brain_ops::pb;
use brain_ops::pb::safe_mode_service_client::SafeModeServiceClient;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{TestApp, list_all, record_of, serve_process, spawn_app, spawn_app_in};

async fn enable(client: &mut SafeModeServiceClient<Channel>, reason: &str) -> pb::EnableResponse {
    client
        .enable(pb::EnableRequest { reason: reason.into() })
        .await
        .expect("Enable answers")
        .into_inner()
}

async fn disable(client: &mut SafeModeServiceClient<Channel>, reason: &str) -> pb::DisableResponse {
    client
        .disable(pb::DisableRequest { reason: reason.into() })
        .await
        .expect("Disable answers")
        .into_inner()
}

async fn check(
    app: &TestApp,
    kind: pb::OperationKind,
    operation: &str,
) -> pb::CheckOperationResponse {
    app.safe_mode()
        .check_operation(pb::CheckOperationRequest {
            kind: kind.into(),
            operation: operation.into(),
        })
        .await
        .expect("CheckOperation answers")
        .into_inner()
}

async fn events_of(app: &TestApp, prefix: &str) -> Vec<pb::LedgerEvent> {
    let request =
        pb::AuditServiceListRequest { event_type_prefix: prefix.into(), ..Default::default() };
    list_all(&mut app.audit(), request).await
}

#[tokio::test]
async fn enable_and_disable_are_idempotent_and_report_every_status_field() {
    let app = spawn_app().await;
    let mut client = app.safe_mode();
    let enabled = enable(&mut client, "incident 42: bad bundle").await;
    assert!(enabled.changed);
    let status = enabled.status.expect("status");
    assert!(status.enabled);
    assert_eq!(status.reason, "incident 42: bad bundle");
    assert_eq!(status.enabled_by, "anonymous");
    assert_eq!(status.source(), pb::SafeModeSource::Api);
    assert!(status.enabled_at.is_some());
    assert_eq!(status.blocked_operations, ["Factory executions", "Deployments", "Bundle loads"]);
    assert_eq!(
        status.allowed_operations,
        ["Read-only APIs", "Monitoring", "Audit log access", "Metrics"]
    );
    let events = events_of(&app, "system.safe_mode_").await;
    assert_eq!(events.len(), 1);
    assert_eq!(status.revision, events[0].seq, "the revision is the seq of the change");
    let record = record_of(&events[0]);
    assert_eq!(
        (record["severity"].as_str(), record["metadata"]["source"].as_str()),
        (Some("critical"), Some("api"))
    );

    let again = enable(&mut client, "again").await;
    assert!(!again.changed);
    assert_eq!(
        again.status.expect("status").reason,
        "incident 42: bad bundle",
        "the first freeze stands"
    );
    assert_eq!(events_of(&app, "system.safe_mode_").await.len(), 1, "a repeat appends nothing");

    let disabled = disable(&mut client, "bundle replaced").await;
    assert!(disabled.changed);
    let status = disabled.status.expect("status");
    assert!(!status.enabled);
    assert!(
        status.enabled_at.is_none() && status.reason.is_empty() && status.enabled_by.is_empty()
    );
    assert!(status.blocked_operations.is_empty());
    assert_eq!(status.allowed_operations.len(), 7);
    assert!(!disable(&mut client, "again").await.changed);
    let events = events_of(&app, "system.safe_mode_").await;
    assert_eq!(events.len(), 2);
    assert_eq!(record_of(&events[1])["severity"], "warning");
    assert_eq!(status.revision, events[1].seq);
}

#[tokio::test]
async fn an_empty_reason_is_invalid_argument() {
    let app = spawn_app().await;
    let error = app
        .safe_mode()
        .enable(pb::EnableRequest { reason: " ".into() })
        .await
        .expect_err("refused");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().starts_with("reason"), "{}", error.message());
    let error = app.safe_mode().disable(pb::DisableRequest::default()).await.expect_err("refused");
    assert_eq!(error.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn of_50_concurrent_enables_exactly_one_changes_and_one_event_is_written() {
    let app = spawn_app().await;
    let calls = (0..50).map(|i| {
        let mut client = app.safe_mode();
        tokio::spawn(async move { enable(&mut client, &format!("caller {i}")).await.changed })
    });
    let mut changed = 0;
    for call in calls {
        changed += usize::from(call.await.expect("task"));
    }
    assert_eq!(changed, 1);
    assert_eq!(events_of(&app, "system.safe_mode_enabled").await.len(), 1);
}

#[tokio::test]
async fn a_blocked_check_of_each_kind_is_on_record_before_the_answer() {
    let app = spawn_app().await;
    for kind in
        [pb::OperationKind::Execution, pb::OperationKind::Deployment, pb::OperationKind::BundleLoad]
    {
        let answer = check(&app, kind, "allowed op").await;
        assert!(answer.allowed, "{kind:?} is allowed while safe mode is off");
        assert_eq!(answer.audit_seq, 0);
    }
    assert!(app.list_all().await.is_empty(), "allowed checks write nothing");

    enable(&mut app.safe_mode(), "freeze for the test").await;
    for (kind, name) in [
        (pb::OperationKind::Execution, "execution"),
        (pb::OperationKind::Deployment, "deployment"),
        (pb::OperationKind::BundleLoad, "bundle_load"),
    ] {
        let answer = check(&app, kind, "run pipeline 7").await;
        assert!(!answer.allowed);
        assert!(answer.message.contains("\"run pipeline 7\" is blocked"), "{}", answer.message);
        assert!(
            answer.message.contains("freeze for the test") && answer.message.contains("disable"),
            "{}",
            answer.message
        );
        // Readable through List the moment the answer arrives.
        let events = events_of(&app, "system.safe_mode_execution_blocked").await;
        let event =
            events.iter().find(|e| e.seq == answer.audit_seq).expect("the refusal is on record");
        let record = record_of(event);
        assert_eq!(record["metadata"]["kind"], name);
        assert_eq!(record["metadata"]["count"], "1");
        assert_eq!(record["reason"], "Operation blocked: run pipeline 7");
        assert_eq!(record["success"], false);
    }
    let unspecified = app
        .safe_mode()
        .check_operation(pb::CheckOperationRequest { kind: 0, operation: "x".into() })
        .await
        .expect_err("kind is required");
    assert_eq!(unspecified.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_burst_of_10000_blocked_checks_is_accounted_for_exactly_in_a_few_events() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    enable(&mut app.safe_mode(), "burst").await;
    // 16 callers × 625 calls = 10,000 blocked checks, as fast as they go.
    let tasks = (0..16).map(|_| {
        let mut client = app.safe_mode();
        tokio::spawn(async move {
            for _ in 0..625 {
                let request = pb::CheckOperationRequest {
                    kind: pb::OperationKind::Deployment.into(),
                    operation: "deploy api".into(),
                };
                let answer = client.check_operation(request).await.expect("answers").into_inner();
                assert!(!answer.allowed);
            }
        })
    });
    for task in tasks {
        task.await.expect("task");
    }
    // Shutdown writes the aggregate of the last second.
    app.stop().await;
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let events = events_of(&app, "system.safe_mode_execution_blocked").await;
    let total: u64 = events
        .iter()
        .map(|e| {
            record_of(e)["metadata"]["count"].as_str().expect("count").parse::<u64>().expect("int")
        })
        .sum();
    assert_eq!(total, 10_000, "every blocked call is counted exactly once");
    assert!(events.len() <= 2 * 60, "bounded: at most two events per second, got {}", events.len());
}

#[tokio::test]
async fn watch_sends_the_current_state_then_changes_and_heartbeats() {
    let app = spawn_app_in(tempfile::TempDir::new().expect("dir").keep().as_path(), |config| {
        config.watch_heartbeat = Duration::from_millis(200);
    })
    .await;
    let mut stream =
        app.safe_mode().watch(pb::WatchRequest {}).await.expect("watches").into_inner();
    let first = stream.next().await.expect("a first message").expect("ok");
    assert!(!first.heartbeat && !first.status.expect("status").enabled);

    enable(&mut app.safe_mode(), "seen by watchers").await;
    let change = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let message = stream.next().await.expect("open").expect("ok");
            if !message.heartbeat {
                return message;
            }
        }
    })
    .await
    .expect("the change arrives");
    let status = change.status.expect("status");
    assert!(status.enabled);
    assert_eq!(status.reason, "seen by watchers");

    let started = tokio::time::Instant::now();
    for _ in 0..3 {
        let beat = tokio::time::timeout(Duration::from_secs(2), stream.next())
            .await
            .expect("heartbeats keep coming")
            .expect("open")
            .expect("ok");
        assert!(beat.heartbeat);
        assert!(beat.status.expect("status").enabled, "heartbeats carry the latest status");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "three 200 ms heartbeats took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_watcher_that_stops_reading_does_not_stall_enable() {
    let app = spawn_app().await;
    let _stalled = app.safe_mode().watch(pb::WatchRequest {}).await.expect("watches").into_inner();
    let mut client = app.safe_mode();
    tokio::time::timeout(Duration::from_secs(20), async {
        for i in 0..100 {
            enable(&mut client, &format!("flip {i}")).await;
            disable(&mut client, &format!("flop {i}")).await;
        }
    })
    .await
    .expect("toggling never waits for a watcher");
}

#[tokio::test]
async fn a_freeze_survives_sigkill_right_after_it_is_acknowledged() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let mut process = serve_process(dir.path(), &[]);
    let mut client = SafeModeServiceClient::new(process.channel().await);
    let enabled = enable(&mut client, "freeze before the crash").await;
    process.child.kill().expect("SIGKILL");
    process.wait();
    let process = serve_process(dir.path(), &[]);
    let mut client = SafeModeServiceClient::new(process.channel().await);
    let status = client
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .status
        .expect("status");
    assert!(status.enabled, "still frozen after SIGKILL and restart");
    assert_eq!(status.revision, enabled.status.expect("status").revision);
    assert_eq!(status.reason, "freeze before the crash");
}

#[tokio::test]
async fn brain_safe_mode_values_follow_the_table() {
    for on in ["true", "1", "yes", "ON", " yes "] {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let process = serve_process(dir.path(), &[("BRAIN_SAFE_MODE", on)]);
        let mut client = SafeModeServiceClient::new(process.channel().await);
        let status = client
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .status
            .expect("status");
        assert!(status.enabled, "{on:?} enables");
        assert_eq!(status.source(), pb::SafeModeSource::Env, "{on:?}");
    }
    let frozen = tempfile::TempDir::new().expect("temp dir");
    drop(serve_process(frozen.path(), &[("BRAIN_SAFE_MODE", "true")]));
    for off in ["false", "0", "no", "off", ""] {
        let fresh = tempfile::TempDir::new().expect("temp dir");
        for (dir, persisted) in [(fresh.path(), false), (frozen.path(), true)] {
            let process = serve_process(dir, &[("BRAIN_SAFE_MODE", off)]);
            let mut client = SafeModeServiceClient::new(process.channel().await);
            let status = client
                .get_status(pb::GetStatusRequest {})
                .await
                .expect("status")
                .into_inner()
                .status
                .expect("status");
            assert_eq!(status.enabled, persisted, "{off:?} leaves the persisted state alone");
        }
    }
    let dir = tempfile::TempDir::new().expect("temp dir");
    let output = std::process::Command::new(crate::helpers::BIN)
        .arg("serve")
        .env_clear()
        .env("BRAIN_DATA_DIR", dir.path())
        .env("BRAIN_SAFE_MODE", "ture")
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("BRAIN_SAFE_MODE"));
}

#[tokio::test]
async fn enable_takes_effect_at_once_when_its_append_fails_and_is_written_after_recovery() {
    let app = spawn_app().await;
    app.faults.fail_next_appends(1);
    let enabled = enable(&mut app.safe_mode(), "freeze with a failing disk").await;
    assert!(enabled.changed);
    assert!(app.status().await.enabled, "frozen at once");
    let written = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let events = events_of(&app, "system.safe_mode_enabled").await;
            if let Some(event) = events.first() {
                return record_of(event);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the event is written once storage returns");
    assert_eq!(written["reason"], "freeze with a failing disk");
    assert_eq!(written["metadata"]["source"], "api");
}

#[tokio::test]
async fn a_failing_store_freezes_refuses_disable_keeps_checking_and_catches_up_on_recovery() {
    let app = spawn_app().await;
    app.record("test.before", "fine").await;
    app.faults.fail_next_fsyncs(u32::MAX);
    let refused = app
        .audit()
        .record(pb::RecordRequest {
            event: Some(crate::helpers::event("test.during", "x")),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("appends fail");
    assert_eq!(refused.code(), Code::Unavailable);
    let status = app.status().await;
    assert!(status.enabled, "a storage fault that recovery cannot clear freezes");
    assert_eq!(status.source(), pb::SafeModeSource::Storage);
    let enabled = enable(&mut app.safe_mode(), "operator freeze").await;
    assert!(!enabled.changed, "already frozen, by storage first");
    let error = app
        .safe_mode()
        .disable(pb::DisableRequest { reason: "thaw".into() })
        .await
        .expect_err("refused");
    assert_eq!(error.code(), Code::Unavailable);
    for _ in 0..5 {
        let answer = check(&app, pb::OperationKind::Execution, "run").await;
        assert!(!answer.allowed);
        assert_eq!(answer.audit_seq, 0, "not on record yet: counted for later");
    }

    app.faults.fail_next_fsyncs(0);
    let caught_up = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let blocked = events_of(&app, "system.safe_mode_execution_blocked").await;
            let counted: u64 = blocked
                .iter()
                .map(|e| {
                    record_of(e)["metadata"]["count"]
                        .as_str()
                        .unwrap_or("0")
                        .parse::<u64>()
                        .unwrap_or(0)
                })
                .sum();
            if counted == 5 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(caught_up.is_ok(), "the blocked calls are written as an aggregate after recovery");
    let enabled = events_of(&app, "system.safe_mode_enabled").await;
    assert_eq!(enabled.len(), 1);
    assert_eq!(record_of(&enabled[0])["metadata"]["source"], "storage");
    assert_eq!(app.status().await.revision, enabled[0].seq, "the revision is durable now");
    assert!(disable(&mut app.safe_mode(), "disk replaced").await.changed);
}

#[tokio::test]
async fn watch_streams_end_with_unavailable_at_shutdown() {
    let mut app = spawn_app().await;
    let mut stream =
        app.safe_mode().watch(pb::WatchRequest {}).await.expect("watches").into_inner();
    stream.next().await.expect("the current status").expect("ok");
    app.begin_stop();
    let ending = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream ends");
    let status = ending.expect("with a status, not silently");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("reconnect"), "{}", status.message());
}
