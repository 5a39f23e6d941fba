//! The ledger's invariants over real gRPC: gapless seqs, monotonic time, durability before
//! acknowledgement, validation and redaction, and sled's file layout.

use std::collections::HashMap;

use brain_ops::pb;
use tonic::Code;

use crate::helpers::{event, record_of, spawn_app, spawn_app_in};

#[tokio::test]
async fn seqs_are_gapless_and_times_never_decrease_under_64_concurrent_appenders() {
    let app = spawn_app().await;
    let mut tasks = Vec::new();
    for client in 0..64 {
        let mut audit = app.audit();
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..10 {
                let reason = format!("client {client} event {i}");
                let request = pb::RecordRequest {
                    event: Some(event("test.concurrent", &reason)),
                    idempotency_key: String::new(),
                };
                let ack = audit.record(request).await.expect("recorded").into_inner();
                acks.push((ack.seq, ack.hash, reason));
            }
            acks
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("client task"));
    }
    let events = app.list_all().await;
    assert_eq!(events.len(), 640);
    let mut last_time = String::new();
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.seq, i as u64 + 1, "seqs are gapless");
        let time = record_of(event)["time"].as_str().expect("time").to_owned();
        assert!(time >= last_time, "time went back at seq {}", event.seq);
        last_time = time;
    }
    let stored: HashMap<u64, &pb::LedgerEvent> = events.iter().map(|e| (e.seq, e)).collect();
    for (seq, hash, reason) in acked {
        let event = stored[&seq];
        assert_eq!(event.hash, hash, "the acknowledged hash is the stored one");
        assert_eq!(record_of(event)["reason"], reason.as_str());
    }
}

#[tokio::test]
async fn a_clock_stepped_back_keeps_time_monotonic_and_records_the_regression() {
    let app = spawn_app().await;
    app.record("test.before_step", "before").await;
    app.clock.step(-3_600_000_000);
    app.record("test.after_step", "after one").await;
    app.record("test.after_step", "after two").await;
    let events = app.list_all().await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["test.before_step", "system.clock_regression", "test.after_step", "test.after_step"],
        "the regression is recorded once, before the first event stamped during it"
    );
    let times: Vec<String> =
        events.iter().map(|e| record_of(e)["time"].as_str().expect("time").to_owned()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "times never decrease: {times:?}");
    assert_eq!(times[1], times[0], "the previous time is reused");
    let regression = record_of(&events[1]);
    assert_eq!(regression["severity"], "warning");
    let step: i64 =
        regression["metadata"]["step_micros"].as_str().expect("step").parse().expect("int");
    assert!(step >= 3_600_000_000 - 60_000_000, "the step is recorded: {step}");
}

#[tokio::test]
async fn a_failed_fsync_acknowledges_nothing_and_later_appends_continue_the_chain() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let first = app.record("test.durable", "kept").await;
    app.faults.fail_next_fsyncs(1);
    let failed = app
        .audit()
        .record(pb::RecordRequest {
            event: Some(event("test.lost", "never acknowledged")),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("the append fails");
    assert_eq!(failed.code(), Code::Unavailable);
    let next = app.record("test.durable", "after the fault").await;
    assert_eq!(next.seq, first.seq + 1, "the failed batch left no seq behind");
    app.stop().await;

    let app = spawn_app_in(dir.path(), |_| {}).await;
    let events = app.list_all().await;
    let reasons: Vec<String> =
        events.iter().map(|e| record_of(e)["reason"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(reasons, ["kept", "after the fault"], "nothing of the failed batch is readable");
    let verified = app
        .audit()
        .verify_chain(pb::VerifyChainRequest::default())
        .await
        .expect("verifies")
        .into_inner();
    assert!(verified.valid, "{verified:?}");
    assert!(!app.status().await.enabled, "a recovered fault does not freeze");
}

#[tokio::test]
async fn a_batch_is_all_or_nothing_and_the_error_names_the_record_and_field() {
    let app = spawn_app().await;
    let mut bad_metadata = event("test.ok", "fine");
    bad_metadata.metadata.insert("Bad Key".into(), "v".into());
    let records = vec![
        pb::BatchRecord { event: Some(event("test.ok", "first")), idempotency_key: String::new() },
        pb::BatchRecord { event: Some(event("test.ok", "second")), idempotency_key: String::new() },
        pb::BatchRecord { event: Some(bad_metadata), idempotency_key: String::new() },
    ];
    let error = app
        .audit()
        .record_batch(pb::RecordBatchRequest { records })
        .await
        .expect_err("the batch is refused");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().starts_with("records[2].event.metadata"), "{}", error.message());
    assert!(app.list_all().await.is_empty(), "nothing of the batch was stored");

    let error = app
        .audit()
        .record_batch(pb::RecordBatchRequest {
            records: vec![pb::BatchRecord {
                event: Some(event("nodots", "x")),
                idempotency_key: String::new(),
            }],
        })
        .await
        .expect_err("refused");
    assert!(error.message().starts_with("records[0].event.event_type"), "{}", error.message());

    let error = app
        .audit()
        .record(pb::RecordRequest { event: None, idempotency_key: String::new() })
        .await
        .expect_err("refused");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(error.message(), "event is required");
}

#[tokio::test]
async fn a_batch_answers_in_request_order_after_all_are_durable() {
    let app = spawn_app().await;
    let records = (0..100)
        .map(|i| pb::BatchRecord {
            event: Some(event("test.batch", &format!("n{i}"))),
            idempotency_key: String::new(),
        })
        .collect();
    let results = app
        .audit()
        .record_batch(pb::RecordBatchRequest { records })
        .await
        .expect("recorded")
        .into_inner()
        .results;
    assert_eq!(results.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=100).collect::<Vec<_>>());
    let events = app.list_all().await;
    for (result, event) in results.iter().zip(&events) {
        assert_eq!(result.hash, event.hash);
    }
    assert_eq!(record_of(&events[99])["reason"], "n99");
}

#[tokio::test]
async fn reserved_event_types_are_refused_for_producers() {
    let app = spawn_app().await;
    for reserved in ["system.safe_mode_disabled", "override.granted"] {
        let error = app
            .audit()
            .record(pb::RecordRequest {
                event: Some(event(reserved, "forged")),
                idempotency_key: String::new(),
            })
            .await
            .expect_err("refused");
        assert_eq!(error.code(), Code::PermissionDenied, "{reserved}");
        assert!(error.message().contains("reserved"), "{}", error.message());
    }
    assert!(app.list_all().await.is_empty());
}

#[tokio::test]
async fn secret_looking_metadata_is_redacted_before_it_is_stored() {
    let app = spawn_app().await;
    let mut e = event("test.secrets", "carry secrets");
    e.metadata.insert("api_key".into(), "sk-123".into());
    e.metadata.insert("db.password".into(), "hunter2".into());
    e.metadata.insert("expected_hash".into(), "abc".into());
    app.audit()
        .record(pb::RecordRequest { event: Some(e), idempotency_key: String::new() })
        .await
        .expect("recorded");
    let stored = &app.list_all().await[0];
    assert!(!stored.record_json.contains("sk-123") && !stored.record_json.contains("hunter2"));
    let metadata = &record_of(stored)["metadata"];
    assert_eq!(metadata["api_key"], "[REDACTED]");
    assert_eq!(metadata["db.password"], "[REDACTED]");
    assert_eq!(metadata["expected_hash"], "abc");
}

#[tokio::test]
async fn a_record_over_16_kib_is_refused_saying_so() {
    let app = spawn_app().await;
    let mut e = event("test.large", &"r".repeat(1024));
    for i in 0..20 {
        e.metadata.insert(format!("k{i}"), "v".repeat(1024));
    }
    let error = app
        .audit()
        .record(pb::RecordRequest { event: Some(e), idempotency_key: String::new() })
        .await
        .expect_err("too large");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("at most 16384"), "{}", error.message());
}

/// A producer event whose canonical record is just under the 16 KiB limit.
fn maximum_size_event(i: usize) -> pb::Event {
    let mut e = event("test.maximum_size", &format!("{i:0>1024}"));
    e.error = "e".repeat(1024);
    e.triggered_by = "t".repeat(256);
    e.bundle_id = "b".repeat(128);
    for k in 0..13 {
        e.metadata.insert(format!("key_{k:02}"), "m".repeat(1024));
    }
    e
}

#[tokio::test]
async fn no_blob_file_appears_after_10000_maximum_size_records() {
    let app = spawn_app().await;
    let mut audit = app.audit();
    for batch in 0..100 {
        let records = (0..100)
            .map(|i| pb::BatchRecord {
                event: Some(maximum_size_event(batch * 100 + i)),
                idempotency_key: String::new(),
            })
            .collect();
        audit.record_batch(pb::RecordBatchRequest { records }).await.expect("recorded");
    }
    let last = app.list_all().await.pop().expect("records");
    assert_eq!(last.seq, 10_000);
    let size = last.record_json.len();
    assert!((15 * 1024..=16 * 1024).contains(&size), "records are near the limit: {size}");
    let blobs = app.data_dir.join("blobs");
    let entries: Vec<_> = std::fs::read_dir(&blobs)
        .map(|dir| dir.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "sled wrote blob files: {entries:?}");
}

fn keyed(reason: &str, key: &str) -> pb::RecordRequest {
    pb::RecordRequest { event: Some(event("test.keyed", reason)), idempotency_key: key.into() }
}

#[tokio::test]
async fn a_repeated_idempotency_key_answers_the_original_and_appends_nothing() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let mut audit = app.audit();
    let first = audit.record(keyed("once", "k-1")).await.expect("recorded").into_inner();
    assert!(!first.duplicate);
    let again = audit.record(keyed("once", "k-1")).await.expect("answered").into_inner();
    assert_eq!((again.seq, &again.hash, again.duplicate), (first.seq, &first.hash, true));
    app.stop().await;

    // The index is rebuilt from the ledger, so a retry after a restart is still recognised.
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let after_restart = app.audit().record(keyed("once", "k-1")).await.expect("answered");
    let after_restart = after_restart.into_inner();
    assert_eq!((after_restart.seq, after_restart.duplicate), (first.seq, true));
    assert_eq!(app.list_all().await.len(), 1, "retries appended nothing");
}

#[tokio::test]
async fn the_same_key_with_a_different_payload_is_already_exists() {
    let app = spawn_app().await;
    let mut audit = app.audit();
    audit.record(keyed("original", "k-2")).await.expect("recorded");
    let conflict = audit.record(keyed("changed", "k-2")).await.expect_err("conflict");
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert!(conflict.message().contains("idempotency_key \"k-2\""), "{}", conflict.message());
    assert_eq!(app.list_all().await.len(), 1);
}

#[tokio::test]
async fn a_key_repeated_inside_one_batch_is_appended_once() {
    let app = spawn_app().await;
    let record = |reason: &str, key: &str| pb::BatchRecord {
        event: Some(event("test.keyed", reason)),
        idempotency_key: key.into(),
    };
    let results = app
        .audit()
        .record_batch(pb::RecordBatchRequest {
            records: vec![record("a", "k"), record("b", ""), record("a", "k")],
        })
        .await
        .expect("recorded")
        .into_inner()
        .results;
    let answers: Vec<(u64, bool)> = results.iter().map(|r| (r.seq, r.duplicate)).collect();
    assert_eq!(answers, [(1, false), (2, false), (1, true)]);
    assert_eq!(app.list_all().await.len(), 2);

    let conflict = app
        .audit()
        .record_batch(pb::RecordBatchRequest {
            records: vec![record("c", "new"), record("z", "k")],
        })
        .await
        .expect_err("the second record conflicts");
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert!(conflict.message().starts_with("records[1].idempotency_key"), "{}", conflict.message());
    let retry = app
        .audit()
        .record_batch(pb::RecordBatchRequest { records: vec![record("c", "new")] })
        .await
        .expect("the refused batch left no key behind")
        .into_inner();
    assert!(!retry.results[0].duplicate);
}

#[tokio::test]
async fn a_store_that_cannot_be_opened_serves_frozen_and_refuses_appends() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let not_a_dir = dir.path().join("data");
    std::fs::write(&not_a_dir, b"this is a file, not a directory").expect("writes");
    let app = spawn_app_in(&not_a_dir, |_| {}).await;
    let status = app.status().await;
    assert!(status.enabled, "no ledger means nothing may run");
    assert_eq!(status.source(), pb::SafeModeSource::Storage);
    let refused = app
        .audit()
        .record(pb::RecordRequest {
            event: Some(event("test.x", "y")),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("nothing can be appended");
    assert_eq!(refused.code(), Code::Unavailable);
    let listed = app.audit().list(pb::AuditServiceListRequest::default()).await;
    assert_eq!(listed.expect_err("no store to read").code(), Code::Unavailable);
}

#[tokio::test]
async fn a_panic_in_the_storage_engine_is_a_storage_fault_and_the_writer_goes_on() {
    let app = spawn_app().await;
    let before = app.record("test.before", "the writer is alive").await;
    app.faults.panic_next_appends(1);
    let failed = app
        .audit()
        .record(pb::RecordRequest {
            event: Some(event("test.lost", "the storage panics on this one")),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("nothing is acknowledged");
    assert_eq!(failed.code(), Code::Unavailable);
    assert!(failed.message().contains("panicked"), "{}", failed.message());
    // Handled like a failed append: the store is reopened and the chain goes on.
    let next = app.record("test.after", "the writer survived").await;
    assert_eq!(next.seq, before.seq + 1, "the failed batch left no seq behind");
    assert!(app.ledger.writer_alive());
    let reasons: Vec<String> = app
        .list_all()
        .await
        .iter()
        .map(|e| record_of(e)["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(reasons, ["the writer is alive", "the writer survived"]);
}

async fn check_execution(app: &crate::helpers::TestApp) -> pb::CheckOperationResponse {
    app.safe_mode()
        .check_operation(pb::CheckOperationRequest {
            kind: pb::OperationKind::Execution.into(),
            operation: "deploy-7".into(),
        })
        .await
        .expect("CheckOperation still answers")
        .into_inner()
}

#[tokio::test]
async fn a_writer_that_dies_freezes_the_service_instead_of_letting_work_through() {
    let app = spawn_app().await;
    app.record("test.before", "the writer is alive").await;
    // A bug in a decision kills the writer thread itself.
    let died = app
        .ledger
        .decide(|_| -> brain_ops::ledger::Decision { panic!("injected bug in a decision") })
        .await
        .expect_err("the writer is gone");
    assert!(died.to_string().contains("ledger writer stopped"), "{died}");
    let status = app.status().await;
    assert!(status.enabled, "the kill switch fails closed");
    assert_eq!(status.source(), pb::SafeModeSource::Storage);
    assert!(!check_execution(&app).await.allowed);
    let (code, body) = crate::helpers::http_get(app.metrics_addr, "/metrics/health").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("ledger writer stopped"), "{body}");
    let later = app
        .audit()
        .record(pb::RecordRequest {
            event: Some(event("test.later", "after the death")),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(later.code(), Code::Unavailable);
}
