//! The server: health, reflection, probes, restarts, and graceful shutdown.

use std::time::Duration;

use brain_ops::pb;
use brain_ops::pb::audit_service_client::AuditServiceClient;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{event, http_get, serve_process, spawn_app, spawn_app_in};

async fn health_of(channel: tonic::transport::Channel, service: &str) -> ServingStatus {
    HealthClient::new(channel)
        .check(HealthCheckRequest { service: service.into() })
        .await
        .expect("health answers")
        .into_inner()
        .status()
}

#[tokio::test]
async fn health_is_serving_for_the_server_and_every_service_after_start() {
    let app = spawn_app().await;
    for service in [
        "",
        "brain.ops.v1.SafeModeService",
        "brain.ops.v1.AuditService",
        "brain.ops.v1.EvidenceService",
    ] {
        assert_eq!(
            health_of(app.channel.clone(), service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
}

#[tokio::test]
async fn shutdown_reports_not_serving_refuses_new_calls_and_finishes_calls_in_flight() {
    let mut app = spawn_app().await;
    app.faults.delay_fsyncs(Duration::from_millis(3000));
    let mut audit = app.audit();
    let in_flight = tokio::spawn(async move {
        audit
            .record(pb::RecordRequest {
                event: Some(event("test.in_flight", "slow disk")),
                idempotency_key: String::new(),
            })
            .await
    });
    // The call is in flight once the writer is syncing it (3 s on this slow disk); give the
    // client a moment to send it.
    let mut state = app.ledger.subscribe();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(state.borrow_and_update().head.seq, 0, "the call is still in flight");
    app.begin_stop();
    let mut health = HealthClient::new(app.channel.clone());
    let status = loop {
        let status = health
            .check(HealthCheckRequest { service: String::new() })
            .await
            .expect("health answers while draining")
            .into_inner()
            .status();
        if status == ServingStatus::NotServing {
            break status;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(status, ServingStatus::NotServing);
    let refused = app
        .audit()
        .record(pb::RecordRequest {
            event: Some(event("test.late", "too late")),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("new calls are refused while draining");
    assert_eq!(refused.code(), Code::Unavailable);
    let answered = in_flight.await.expect("task").expect("the call in flight completes");
    assert_eq!(answered.into_inner().seq, 1);
    let dir = app.data_dir.clone();
    let kept = app.stop().await;
    let app = spawn_app_in(&dir, |_| {}).await;
    let events = app.list_all().await;
    assert_eq!(events.len(), 1, "the call in flight is durable, the refused one is not");
    drop(kept);
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_all_five_services() {
    let app = spawn_app().await;
    let expected = [
        "brain.ops.v1.AuditService",
        "brain.ops.v1.EvidenceService",
        "brain.ops.v1.MetricsService",
        "brain.ops.v1.OverrideService",
        "brain.ops.v1.SafeModeService",
    ];
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut client = ServerReflectionClient::new(app.channel.clone());
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection answers")
            .into_inner();
        let answer = answers.next().await.expect("one answer").expect("ok");
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("not a service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for service in expected {
            assert!(names.iter().any(|n| n == service), "v1 lacks {service}: {names:?}");
        }
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut client = ServerReflectionClient::new(app.channel.clone());
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection answers")
            .into_inner();
        let answer = answers.next().await.expect("one answer").expect("ok");
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("not a service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for service in expected {
            assert!(names.iter().any(|n| n == service), "v1alpha lacks {service}: {names:?}");
        }
    }
}

#[tokio::test]
async fn probes_answer_on_the_metrics_port() {
    let app = spawn_app().await;
    assert_eq!(http_get(app.metrics_addr, "/livez").await.0, 200);
    assert_eq!(http_get(app.metrics_addr, "/readyz").await.0, 200);
    assert_eq!(http_get(app.metrics_addr, "/nothing").await.0, 404);
}

#[tokio::test]
async fn sigterm_with_calls_in_flight_exits_0_and_loses_no_acknowledged_event() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let mut process = serve_process(dir.path(), &[]);
    let channel = process.channel().await;
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for client in 0..16 {
        let mut audit = AuditServiceClient::new(channel.clone());
        let acked = acked_tx.clone();
        clients.push(tokio::spawn(async move {
            for i in 0.. {
                let request = pb::RecordRequest {
                    event: Some(event("test.shutdown", &format!("{client}/{i}"))),
                    idempotency_key: String::new(),
                };
                match audit.record(request).await {
                    Ok(ack) => {
                        let _ = acked.send(ack.into_inner());
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    drop(acked_tx);
    // Terminate once a few hundred events are acknowledged, with calls still streaming in.
    let mut acked = Vec::new();
    while acked.len() < 300 {
        acked.push(acked_rx.recv().await.expect("acks arrive"));
    }
    process.terminate();
    while let Some(ack) = acked_rx.recv().await {
        acked.push(ack);
    }
    for client in clients {
        client.await.expect("client task");
    }
    assert_eq!(process.wait(), Some(0), "SIGTERM exits 0");

    let app = spawn_app_in(dir.path(), |_| {}).await;
    let stored: std::collections::HashMap<u64, String> =
        app.list_all().await.into_iter().map(|e| (e.seq, e.hash)).collect();
    for ack in &acked {
        assert_eq!(stored.get(&ack.seq), Some(&ack.hash), "acknowledged seq {} is stored", ack.seq);
    }
    let report = app
        .audit()
        .verify_chain(pb::VerifyChainRequest::default())
        .await
        .expect("verifies")
        .into_inner();
    assert!(report.valid);
}

#[tokio::test]
async fn brain_safe_mode_freezes_at_start_and_the_freeze_survives_a_restart_without_it() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |config| config.safe_mode_at_start = true).await;
    let status = app.status().await;
    assert!(status.enabled);
    assert_eq!(status.source(), pb::SafeModeSource::Env);
    assert_eq!(status.enabled_by, "brain-ops");
    let revision = status.revision;
    app.stop().await;

    let app = spawn_app_in(dir.path(), |_| {}).await;
    let status = app.status().await;
    assert!(status.enabled, "BRAIN_SAFE_MODE unset never lifts a freeze");
    assert_eq!(status.revision, revision, "the revision is the seq of the change");
    app.stop().await;

    let app = spawn_app_in(dir.path(), |config| config.safe_mode_at_start = true).await;
    assert_eq!(app.list_all().await.len(), 1, "an existing freeze is not enabled twice");
}
