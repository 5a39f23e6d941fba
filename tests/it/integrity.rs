//! Damage to stored records is detected at start: the service comes up frozen with source
//! INTEGRITY, names the first bad seq, and `VerifyChain` reports it.

use std::path::Path;
use std::sync::Arc;

use brain_ops::ledger::record::Record;
use brain_ops::ledger::store::{SledOptions, SledStore, Storage};
use brain_ops::pb;
use tempfile::TempDir;

use crate::helpers::{record_of, spawn_app_in};

/// Five events, seqs 1..=5, reasons "event 1".."event 5"; the service is stopped afterwards,
/// which appends a checkpoint (seq 6).
async fn populated_ledger() -> TempDir {
    let dir = TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    for i in 1..=5 {
        app.record("test.integrity", &format!("event {i}")).await;
    }
    app.stop().await;
    dir
}

/// Rewrites the stored bytes of `seq` while the service is down.
fn tamper(dir: &Path, seq: u64, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    let store = SledStore::open(dir, SledOptions::default(), Arc::default()).expect("opens");
    let bytes = store.get(seq).expect("reads").expect("stored");
    let edited = edit(bytes);
    store.append(&[(seq, &edited)]).expect("writes");
}

async fn assert_frozen_by_integrity_at(dir: &Path, bad_seq: u64) {
    let app = spawn_app_in(dir, |_| {}).await;
    let status = app.status().await;
    assert!(status.enabled, "the service starts frozen");
    assert_eq!(status.source(), pb::SafeModeSource::Integrity);
    assert!(status.reason.contains(&format!("seq {bad_seq}")), "{}", status.reason);

    let report = app
        .audit()
        .verify_chain(pb::VerifyChainRequest::default())
        .await
        .expect("verifies")
        .into_inner();
    assert!(!report.valid);
    assert_eq!(report.first_bad_seq, bad_seq, "{report:?}");

    let events = app.list_all().await;
    let violation = events
        .iter()
        .find(|e| e.event_type == "system.integrity_violation")
        .expect("a violation is recorded");
    let violation = record_of(violation);
    assert_eq!(violation["severity"], "critical");
    assert_eq!(violation["metadata"]["first_bad_seq"], bad_seq.to_string());
    let enabled = record_of(events.last().expect("events"));
    assert_eq!(enabled["event_type"], "system.safe_mode_enabled");
    assert_eq!(enabled["metadata"]["source"], "integrity");
    assert_eq!(status.revision, enabled["seq"].as_u64().expect("seq"));
    app.stop().await;
}

#[tokio::test]
async fn an_altered_record_starts_the_service_frozen_naming_its_seq() {
    let dir = populated_ledger().await;
    tamper(dir.path(), 3, |bytes| {
        String::from_utf8(bytes).expect("utf8").replace("event 3", "event X").into_bytes()
    });
    assert_frozen_by_integrity_at(dir.path(), 3).await;
}

#[tokio::test]
async fn a_broken_link_starts_the_service_frozen_naming_its_seq() {
    let dir = populated_ledger().await;
    // A record that is internally consistent (its own hash is right) but links elsewhere.
    tamper(dir.path(), 4, |bytes| {
        let mut record: Record = serde_json::from_slice(&bytes).expect("decodes");
        record.prev_hash = "f".repeat(64);
        record.hash = record.compute_hash();
        record.canonical_bytes()
    });
    assert_frozen_by_integrity_at(dir.path(), 4).await;
}

#[tokio::test]
async fn a_record_earlier_than_the_one_before_starts_the_service_frozen_naming_its_seq() {
    let dir = populated_ledger().await;
    // Consistent on its own and linked to seq 3, but dated before it. (Seq 5 then no longer
    // links; the first bad seq must still be 4, so the time itself is what is caught.)
    tamper(dir.path(), 4, |bytes| {
        let mut record: Record = serde_json::from_slice(&bytes).expect("decodes");
        record.time = brain_ops::ledger::record::format_time(0);
        record.hash = record.compute_hash();
        record.canonical_bytes()
    });
    assert_frozen_by_integrity_at(dir.path(), 4).await;
}

#[tokio::test]
async fn a_truncated_record_starts_the_service_frozen_naming_its_seq() {
    let dir = populated_ledger().await;
    tamper(dir.path(), 2, |mut bytes| {
        bytes.truncate(bytes.len() / 2);
        bytes
    });
    assert_frozen_by_integrity_at(dir.path(), 2).await;
}

#[tokio::test]
async fn known_damage_is_reported_once_and_keeps_the_service_frozen_across_restarts() {
    let dir = populated_ledger().await;
    // The head itself (the shutdown checkpoint) is damaged.
    tamper(dir.path(), 6, |mut bytes| {
        bytes.truncate(10);
        bytes
    });
    assert_frozen_by_integrity_at(dir.path(), 6).await;
    let app = spawn_app_in(dir.path(), |_| {}).await;
    assert!(app.status().await.enabled, "still frozen after a restart");
    let violations = app
        .list_all()
        .await
        .iter()
        .filter(|e| e.event_type == "system.integrity_violation")
        .count();
    assert_eq!(violations, 1, "the same damage is not reported at every restart");
    // Appends after the damaged head still chain: everything after seq 6 verifies.
    let appended = app.record("test.after_damage", "later").await;
    let report = app
        .audit()
        .verify_chain(pb::VerifyChainRequest { from_seq: 7, to_seq: appended.seq })
        .await
        .expect("verifies")
        .into_inner();
    assert!(report.valid, "{report:?}");
    app.stop().await;
}

#[tokio::test]
async fn an_intact_ledger_starts_unfrozen_with_nothing_to_report() {
    let dir = populated_ledger().await;
    let app = spawn_app_in(dir.path(), |_| {}).await;
    assert!(!app.status().await.enabled);
    let events = app.list_all().await;
    assert_eq!(events.len(), 5, "a clean start appends nothing");
    assert!(events.iter().all(|e| record_of(e)["source"] == "anonymous"));
}

#[tokio::test]
async fn disable_acknowledges_known_damage_so_restarts_stay_thawed_but_new_damage_freezes() {
    let dir = populated_ledger().await;
    tamper(dir.path(), 2, |bytes| {
        String::from_utf8(bytes).expect("utf8").replace("event 2", "event Y").into_bytes()
    });
    let app = spawn_app_in(dir.path(), |_| {}).await;
    assert!(app.status().await.enabled);
    let thawed = app
        .safe_mode()
        .disable(pb::DisableRequest { reason: "seq 2 edit investigated".into() })
        .await
        .expect("Disable answers")
        .into_inner();
    assert!(thawed.changed);
    let events = app.list_all().await;
    let ack = events
        .iter()
        .find(|e| e.event_type == "system.integrity_acknowledged")
        .expect("the damage is acknowledged on record");
    assert!(record_of(ack)["metadata"]["damaged"].as_str().expect("tags").starts_with("2:"));
    app.stop().await;

    let app = spawn_app_in(dir.path(), |_| {}).await;
    assert!(!app.status().await.enabled, "acknowledged damage does not freeze again");
    app.stop().await;

    tamper(dir.path(), 4, |mut bytes| {
        bytes.truncate(5);
        bytes
    });
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let status = app.status().await;
    assert!(status.enabled, "new damage freezes again");
    assert!(status.reason.contains("seq 4"), "{}", status.reason);
}
