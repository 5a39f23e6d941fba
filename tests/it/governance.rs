//! The governance configuration: recorded whole when its digest changes, shown in packs as it was
//! at `as_of`, reread on SIGHUP, and the source of the retired keys that `GetPublicKeys` publishes.

use std::path::Path;

use brain_ops::evidence::keys::Signer;
use brain_ops::pb;
use brain_ops::pb::evidence_service_client::EvidenceServiceClient;
use serde_json::Value;
use tonic::transport::Channel;

use crate::helpers::{list_all, public_keys, record_of, serve_once, serve_process, spawn_app_in};

const EXAMPLE: &str = include_str!("../../deploy/governance.toml");

fn internal(as_of_seq: u64) -> pb::ExportRequest {
    pb::ExportRequest {
        from: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
        to: Some(prost_types::Timestamp { seconds: 4_000_000_000, nanos: 0 }),
        scope: pb::EvidenceScope::Internal.into(),
        exclude_executor_summary: false,
        as_of_seq,
    }
}

async fn export(channel: Channel, request: pb::ExportRequest) -> String {
    EvidenceServiceClient::new(channel)
        .export(request)
        .await
        .expect("exports")
        .into_inner()
        .pack_json
}

async fn verify(channel: Channel, pack_json: String) -> pb::VerifyResponse {
    EvidenceServiceClient::new(channel)
        .verify(pb::VerifyRequest { pack_json })
        .await
        .expect("verifies")
        .into_inner()
}

async fn loaded_events(channel: Channel) -> Vec<Value> {
    let mut audit = pb::audit_service_client::AuditServiceClient::new(channel);
    list_all(&mut audit, pb::AuditServiceListRequest::default())
        .await
        .iter()
        .filter(|e| e.event_type == "system.governance_config_loaded")
        .map(record_of)
        .collect()
}

fn configured(path: &Path) -> impl FnOnce(&mut brain_ops::config::Config) {
    let path = path.to_owned();
    move |config| config.governance_config = Some(path)
}

#[tokio::test]
async fn the_config_is_recorded_once_per_digest_and_packs_show_the_one_in_force_at_as_of() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let file = dir.path().join("governance.toml");
    std::fs::write(&file, EXAMPLE).expect("writes");
    let data = dir.path().join("data");

    let app = spawn_app_in(&data, configured(&file)).await;
    let loaded = loaded_events(app.channel.clone()).await;
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0]["metadata"]["config_toml"], EXAMPLE, "recorded whole");
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(EXAMPLE.as_bytes()));
    assert_eq!(loaded[0]["metadata"]["sha256"], digest.as_str());
    let as_of = app.record("factory.step_completed", "under the first config").await.seq;
    let before = export(app.channel.clone(), internal(as_of)).await;
    app.stop().await;

    let app = spawn_app_in(&data, configured(&file)).await;
    assert_eq!(loaded_events(app.channel.clone()).await.len(), 1, "same digest: not again");
    app.stop().await;

    std::fs::write(&file, EXAMPLE.replace("allow_unsigned = false", "allow_unsigned = true"))
        .expect("writes");
    let app = spawn_app_in(&data, configured(&file)).await;
    assert_eq!(loaded_events(app.channel.clone()).await.len(), 2, "a new digest is recorded");
    let then = export(app.channel.clone(), internal(as_of)).await;
    assert_eq!(then, before, "a pack as of before the change is unchanged, byte for byte");
    let then: Value = serde_json::from_str(&then).expect("JSON");
    let config = &then["pack"]["governance_config"];
    assert_eq!(config["settings"]["bundles"]["allow_unsigned"], false);
    assert_eq!(config["toml"], EXAMPLE);
    assert_eq!(config["sha256"], digest.as_str());
    let now: Value =
        serde_json::from_str(&export(app.channel.clone(), internal(0)).await).expect("JSON");
    assert_eq!(now["pack"]["governance_config"]["settings"]["bundles"]["allow_unsigned"], true);
    let mut investor = internal(0);
    investor.scope = pb::EvidenceScope::Investor.into();
    let investor = export(app.channel.clone(), investor).await;
    let investor_pack: Value = serde_json::from_str(&investor).expect("JSON");
    assert_eq!(investor_pack["pack"]["governance_config"]["toml"], Value::Null);
    assert!(investor_pack["pack"]["governance_config"]["settings"]["network"].is_object());
    assert!(verify(app.channel.clone(), investor).await.valid);
    app.stop().await;

    // No config any more: its removal is recorded, and packs say none is in force.
    let app = spawn_app_in(&data, |_| {}).await;
    let pack: Value =
        serde_json::from_str(&export(app.channel.clone(), internal(0)).await).expect("JSON");
    assert_eq!(pack["pack"]["governance_config"], Value::Null);
    assert_eq!(pack["pack"]["audit_summary"]["system.governance_config_removed"], 1);
}

#[tokio::test]
async fn an_edited_governance_config_in_a_pack_is_caught() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let file = dir.path().join("governance.toml");
    std::fs::write(&file, EXAMPLE).expect("writes");
    let app = spawn_app_in(&dir.path().join("data"), configured(&file)).await;
    let pack = export(app.channel.clone(), internal(0)).await;
    assert!(verify(app.channel.clone(), pack.clone()).await.valid);
    let mut edited: Value = serde_json::from_str(&pack).expect("JSON");
    edited["pack"]["governance_config"]["settings"]["bundles"]["allow_unsigned"] = true.into();
    let verdict = verify(app.channel.clone(), edited.to_string()).await;
    assert!(!verdict.valid && !verdict.hash_valid, "{verdict:?}");
    // The text edited too, with its digest left alone: inconsistent even before the hash.
    let mut text: Value = serde_json::from_str(&pack).expect("JSON");
    text["pack"]["governance_config"]["toml"] =
        EXAMPLE.replace("allow_unsigned = false", "allow_unsigned = true").into();
    let verdict = verify(app.channel.clone(), text.to_string()).await;
    assert!(!verdict.chain_valid, "{verdict:?}");
    assert!(verdict.problems.iter().any(|p| p.contains("governance_config.toml")), "{verdict:?}");
}

#[tokio::test]
async fn retired_keys_from_the_config_are_published_and_old_packs_still_verify() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let data = dir.path().join("data");
    let app = spawn_app_in(&data, |_| {}).await;
    app.record("factory.step_completed", "signed by the first key").await;
    let old_pack = export(app.channel.clone(), internal(1)).await;
    let old_key = public_keys(app.channel.clone()).await.remove(0);
    app.stop().await;

    // Rotate: a new key, the old one listed as retired.
    let new_key = dir.path().join("new.pem");
    Signer::generate().expect("random").write_private(&new_key).expect("writes");
    let file = dir.path().join("governance.toml");
    std::fs::write(
        &file,
        format!(
            "{EXAMPLE}\n[[signing.retired_keys]]\nkey_id = \"{}\"\npublic_key = \"{}\"\n\
             retired_at = \"2026-11-27T00:00:00Z\"\n",
            old_key.key_id, old_key.public_key
        ),
    )
    .expect("writes");
    let app = spawn_app_in(&data, |config| {
        config.signing_key_file = Some(new_key.clone());
        config.governance_config = Some(file.clone());
    })
    .await;
    let keys = public_keys(app.channel.clone()).await;
    assert_eq!(keys.len(), 2);
    assert!(!keys[0].retired && keys[0].key_id != old_key.key_id, "the current key first");
    assert_eq!((keys[1].key_id.as_str(), keys[1].retired), (old_key.key_id.as_str(), true));
    let verdict = verify(app.channel.clone(), old_pack.clone()).await;
    assert!(verdict.valid, "a pack signed before the rotation verifies: {verdict:?}");
    app.stop().await;

    // Without the retired key listed, the old signature is by an unknown key.
    std::fs::write(&file, EXAMPLE).expect("writes");
    let app = spawn_app_in(&data, |config| {
        config.signing_key_file = Some(new_key.clone());
        config.governance_config = Some(file.clone());
    })
    .await;
    let verdict = verify(app.channel.clone(), old_pack).await;
    assert!(!verdict.signature_valid, "{verdict:?}");
}

#[test]
fn an_invalid_config_exits_64_naming_the_setting_and_the_field() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let file = dir.path().join("governance.toml");
    std::fs::write(&file, EXAMPLE.replace("[audit]", "[audit]\nrecord_everything = true"))
        .expect("writes");
    let output =
        serve_once(&dir.path().join("data"), &[("BRAIN_GOVERNANCE_CONFIG", file.as_path())]);
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("BRAIN_GOVERNANCE_CONFIG"), "{stderr}");
    assert!(stderr.contains("record_everything"), "{stderr}");
}

#[tokio::test]
async fn sighup_rereads_the_config_and_a_rejected_one_leaves_the_one_in_force() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let file = dir.path().join("governance.toml");
    std::fs::write(&file, EXAMPLE).expect("writes");
    let data = dir.path().join("data");
    let server = serve_process(&data, &[("BRAIN_GOVERNANCE_CONFIG", file.to_str().expect("utf8"))]);
    let channel = server.channel().await;
    assert_eq!(loaded_events(channel.clone()).await.len(), 1);

    std::fs::write(&file, EXAMPLE.replace("guards_enabled = true", "guards_enabled = false"))
        .expect("writes");
    server.signal("HUP");
    let events = wait_for(&channel, |events| {
        events.iter().filter(|e| e.event_type == "system.governance_config_loaded").count() == 2
    })
    .await;
    let newest = events.iter().rev().find(|e| e.event_type == "system.governance_config_loaded");
    assert!(
        record_of(newest.expect("loaded"))["metadata"]["config_toml"]
            .as_str()
            .expect("text")
            .contains("guards_enabled = false")
    );

    std::fs::write(&file, "version = 1\n").expect("writes");
    server.signal("HUP");
    wait_for(&channel, |events| {
        events.iter().any(|e| e.event_type == "system.governance_config_rejected")
    })
    .await;
    let pack: Value =
        serde_json::from_str(&export(channel.clone(), internal(0)).await).expect("JSON");
    assert_eq!(
        pack["pack"]["governance_config"]["settings"]["network"]["guards_enabled"], false,
        "the config in force stays"
    );
}

/// Lists until `done` holds (bounded).
async fn wait_for(
    channel: &Channel,
    done: impl Fn(&[pb::LedgerEvent]) -> bool,
) -> Vec<pb::LedgerEvent> {
    let mut audit = pb::audit_service_client::AuditServiceClient::new(channel.clone());
    for _ in 0..200 {
        let events = list_all(&mut audit, pb::AuditServiceListRequest::default()).await;
        if done(&events) {
            return events;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the expected events never appeared");
}
