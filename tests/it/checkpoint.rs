//! Signed checkpoints: taken at shutdown and periodically while events arrive, kept outside the
//! ledger so that a cut-off tail is caught at start, exported as metrics and carried by packs.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use brain_ops::checkpoint::{Checkpoint, read_file};
use brain_ops::ledger::record::Record;
use brain_ops::ledger::store::{SledOptions, SledStore, Storage};
use brain_ops::pb;
use brain_ops::pb::evidence_service_client::EvidenceServiceClient;
use serde_json::Value;

use crate::helpers::{TestApp, http_get, public_keys, record_of, spawn_app_in};

async fn checkpoints(app: &TestApp) -> Vec<Value> {
    app.list_everything()
        .await
        .iter()
        .filter(|e| e.event_type == "system.checkpoint")
        .map(record_of)
        .collect()
}

async fn public_key(app: &TestApp) -> [u8; 32] {
    let keys = public_keys(app.channel.clone()).await;
    let raw = base64::engine::general_purpose::STANDARD.decode(&keys[0].public_key).expect("b64");
    raw.try_into().expect("32 bytes")
}

#[tokio::test]
async fn a_signed_checkpoint_is_taken_at_shutdown_kept_outside_and_exported_as_metrics() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let mut last = None;
    for i in 0..3 {
        last = Some(app.record("test.checkpointed", &format!("event {i}")).await);
    }
    let last = last.expect("recorded");
    app.stop().await;

    let app = spawn_app_in(dir.path(), |_| {}).await;
    let found = checkpoints(&app).await;
    assert_eq!(found.len(), 1);
    let meta = &found[0]["metadata"];
    assert_eq!(found[0]["seq"], last.seq + 1);
    assert_eq!(meta["head_seq"], last.seq.to_string());
    assert_eq!(meta["head_hash"], last.hash.as_str());
    let record: Record = serde_json::from_value(found[0].clone()).expect("a record");
    let checkpoint = Checkpoint::from_record(&record).expect("a checkpoint record");
    assert!(checkpoint.signature_verifies(&public_key(&app).await), "signed with the pack key");
    assert_eq!(read_file(dir.path()).expect("reads"), Some(checkpoint.clone()), "kept outside");

    let (_, metrics) = http_get(app.metrics_addr, "/metrics").await;
    assert!(
        metrics.contains(&format!("brain_ledger_checkpoint_head_seq {}", last.seq)),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("head_hash=\"{}\"", last.hash)), "{metrics}");
    app.stop().await;

    // Nothing new since: no second checkpoint.
    let app = spawn_app_in(dir.path(), |_| {}).await;
    assert_eq!(checkpoints(&app).await.len(), 1);
}

#[tokio::test]
async fn checkpoints_are_taken_periodically_while_events_arrive_and_only_then() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |config| {
        config.checkpoint_interval = Duration::from_millis(300);
    })
    .await;
    let recorded = app.record("test.periodic", "one").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while checkpoints(&app).await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no periodic checkpoint");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = checkpoints(&app).await;
    assert_eq!(first[0]["metadata"]["head_seq"], recorded.seq.to_string());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(checkpoints(&app).await.len(), 1, "no events, no new checkpoint");
}

/// Removes every record after `seq` while the service is down.
fn cut_tail(dir: &std::path::Path, after_seq: u64) {
    let store = SledStore::open(dir, SledOptions::default(), Arc::default()).expect("opens");
    store.truncate_after(after_seq).expect("cuts");
}

#[tokio::test]
async fn a_ledger_tail_cut_off_while_down_freezes_the_service_until_acknowledged() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    for i in 1..=5 {
        app.record("test.tail", &format!("event {i}")).await;
    }
    app.stop().await; // checkpoint at seq 6
    cut_tail(dir.path(), 3);

    let app = spawn_app_in(dir.path(), |_| {}).await;
    let status = app.status().await;
    assert!(status.enabled, "a cut-off tail freezes");
    assert_eq!(status.source(), pb::SafeModeSource::Integrity);
    let events = app.list_all().await;
    let violation = events
        .iter()
        .find(|e| e.event_type == "system.integrity_violation")
        .map(record_of)
        .expect("a violation is recorded");
    assert_eq!(violation["metadata"]["first_bad_seq"], "4");
    assert!(violation["reason"].as_str().expect("reason").contains("cut off"), "{violation}");
    app.stop().await;

    // Re-anchored: the known damage is not reported again, and the freeze holds.
    let app = spawn_app_in(dir.path(), |_| {}).await;
    assert!(app.status().await.enabled);
    let violations = app
        .list_all()
        .await
        .iter()
        .filter(|e| e.event_type == "system.integrity_violation")
        .count();
    assert_eq!(violations, 1);
    app.safe_mode()
        .disable(pb::DisableRequest { reason: "tail loss investigated".into() })
        .await
        .expect("an operator thaws");
    app.stop().await;
    let app = spawn_app_in(dir.path(), |_| {}).await;
    assert!(!app.status().await.enabled, "acknowledged damage does not freeze again");
}

#[tokio::test]
async fn packs_carry_the_newest_checkpoint_at_or_before_as_of() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let early = app.record("test.pack", "before any checkpoint").await;
    app.stop().await;
    let app = spawn_app_in(dir.path(), |_| {}).await;
    app.record("test.pack", "after the checkpoint").await;
    let export = |as_of_seq| {
        let channel = app.channel.clone();
        async move {
            let pack = EvidenceServiceClient::new(channel)
                .export(pb::ExportRequest {
                    from: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
                    to: Some(prost_types::Timestamp { seconds: 4_000_000_000, nanos: 0 }),
                    scope: pb::EvidenceScope::Investor.into(),
                    exclude_executor_summary: false,
                    as_of_seq,
                })
                .await
                .expect("exports")
                .into_inner()
                .pack_json;
            serde_json::from_str::<Value>(&pack).expect("JSON")
        }
    };
    assert_eq!(export(early.seq).await["pack"]["checkpoint"], Value::Null);
    let now = export(0).await;
    let checkpoint = &now["pack"]["checkpoint"];
    assert_eq!(checkpoint["head_seq"], early.seq);
    assert_eq!(checkpoint["head_hash"], early.hash.as_str());
    let verdict = EvidenceServiceClient::new(app.channel.clone())
        .verify(pb::VerifyRequest { pack_json: now.to_string() })
        .await
        .expect("verifies")
        .into_inner();
    assert!(verdict.valid, "{verdict:?}");
}
