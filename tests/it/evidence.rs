//! Evidence signing keys: generated once and kept, or configured; published by GetPublicKeys.

use std::io::Cursor;

use base64::Engine;
use brain_ops::pb;
use brain_ops::pb::evidence_service_client::EvidenceServiceClient;
use sha2::{Digest, Sha256};

use crate::helpers::{BIN, public_keys, serve_once, serve_process, spawn_app, spawn_app_in};

fn key_id_of(public_key_base64: &str) -> String {
    let raw = base64::engine::general_purpose::STANDARD.decode(public_key_base64).expect("base64");
    assert_eq!(raw.len(), 32, "a raw Ed25519 public key");
    hex::encode(Sha256::digest(&raw))[..16].to_owned()
}

#[tokio::test]
async fn a_key_is_generated_on_first_start_and_kept_across_restarts() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let keys = public_keys(app.channel.clone()).await;
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert_eq!((key.algorithm.as_str(), key.retired), ("ed25519", false));
    assert_eq!(key.key_id, key_id_of(&key.public_key), "key_id = first 16 hex of sha256(raw key)");
    let file = dir.path().join("signing-key.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            std::fs::metadata(&file).expect("the key is in the data dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
    }
    app.stop().await;
    let app = spawn_app_in(dir.path(), |_| {}).await;
    assert_eq!(
        public_keys(app.channel.clone()).await[0].key_id,
        key.key_id,
        "the same key after a restart"
    );
}

#[tokio::test]
async fn a_key_made_by_keygen_is_used_when_configured() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let key_file = dir.path().join("signing.pem");
    let output = std::process::Command::new(BIN)
        .args(["keygen", "--out", key_file.to_str().expect("utf8"), "-o", "json"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(0));
    let made: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert!(
        std::fs::read_to_string(dir.path().join("signing.pem.pub"))
            .expect("public key")
            .contains("PUBLIC KEY")
    );
    let again = std::process::Command::new(BIN)
        .args(["keygen", "--out", key_file.to_str().expect("utf8")])
        .output()
        .expect("runs");
    assert_ne!(again.status.code(), Some(0), "keygen never overwrites a key");

    let process = serve_process(
        &dir.path().join("data"),
        &[("BRAIN_SIGNING_KEY_FILE", key_file.to_str().expect("utf8"))],
    );
    let keys = public_keys(process.channel().await).await;
    assert_eq!(keys[0].key_id, made["key_id"].as_str().expect("key_id"));
    assert_eq!(keys[0].public_key, made["public_key"].as_str().expect("public key"));
    assert!(
        !dir.path().join("data").join("signing-key.pem").exists(),
        "no key is generated when one is configured"
    );
}

#[test]
fn an_unusable_key_file_exits_64_naming_the_setting() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let key_file = dir.path().join("bad.pem");
    std::fs::write(
        &key_file,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .expect("writes");
    let output =
        serve_once(&dir.path().join("data"), &[("BRAIN_SIGNING_KEY_FILE", key_file.as_path())]);
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("BRAIN_SIGNING_KEY_FILE"));
}

use prost_types::Timestamp;
use serde_json::Value;
use tonic::Code;

fn export_request(scope: pb::EvidenceScope, as_of_seq: u64) -> pb::ExportRequest {
    pb::ExportRequest {
        from: Some(Timestamp { seconds: 0, nanos: 0 }),
        to: Some(Timestamp { seconds: 4_000_000_000, nanos: 0 }),
        scope: scope.into(),
        exclude_executor_summary: false,
        as_of_seq,
    }
}

async fn export(app: &crate::helpers::TestApp, request: pb::ExportRequest) -> pb::ExportResponse {
    EvidenceServiceClient::new(app.channel.clone())
        .export(request)
        .await
        .expect("exports")
        .into_inner()
}

async fn verify(app: &crate::helpers::TestApp, pack_json: String) -> pb::VerifyResponse {
    EvidenceServiceClient::new(app.channel.clone())
        .verify(pb::VerifyRequest { pack_json })
        .await
        .expect("verifies")
        .into_inner()
}

/// A small history: a mode change, a quarantine with a secret, an execution that failed.
async fn history(app: &crate::helpers::TestApp) {
    let mut mode = crate::helpers::event("sovereign.mode_changed", "egress lost: reason-text-42");
    mode.mode_before = pb::OperationMode::Online.into();
    mode.mode_after = pb::OperationMode::Sovereign.into();
    mode.triggered_by = "gatekeeper-7".into();
    let mut quarantine = crate::helpers::event("sovereign.bundle_quarantined", "hash mismatch");
    quarantine.bundle_id = "bundle-9".into();
    quarantine.metadata.insert("expected_hash".into(), "metadata-value-77".into());
    for e in [
        mode,
        quarantine,
        crate::helpers::event("factory.execution_started", "run 1"),
        crate::helpers::event("factory.step_failed", "timeout after 300 s"),
        crate::helpers::event("factory.execution_failed", "run 1 failed"),
    ] {
        app.audit()
            .record(pb::RecordRequest { event: Some(e), idempotency_key: String::new() })
            .await
            .expect("recorded");
    }
}

/// Verifies a pack with nothing but a JCS library, SHA-256 and Ed25519, as a third party would.
fn independently_verify(file: &str, public_key_base64: &str) {
    let document: Value = serde_json::from_str(file).expect("JSON");
    let pack = &document["pack"];
    let canonical = serde_jcs::to_string(pack).expect("JCS");
    let content_hash = format!("sha256:{}", hex::encode(Sha256::digest(canonical.as_bytes())));
    assert_eq!(document["content_hash"], content_hash.as_str());
    assert_eq!(document["pack_id"], format!("ep-{}", &content_hash[7..23]).as_str());
    let raw: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(public_key_base64)
        .expect("base64")
        .try_into()
        .expect("32 bytes");
    let key = ed25519_dalek::VerifyingKey::from_bytes(&raw).expect("key");
    let signature = base64::engine::general_purpose::STANDARD
        .decode(document["signature"]["value"].as_str().expect("value"))
        .expect("base64");
    let signature = ed25519_dalek::Signature::from_slice(&signature).expect("signature");
    key.verify_strict(content_hash.as_bytes(), &signature).expect("the signature verifies");
    let mut prev = pack["chain"]["prev_hash"].as_str().expect("prev_hash").to_owned();
    for event in pack["events"].as_array().expect("events") {
        let mut body = event.clone();
        let hash = body.as_object_mut().expect("object").remove("hash").expect("hash");
        assert_eq!(
            hash,
            hex::encode(Sha256::digest(serde_jcs::to_vec(&body).expect("JCS"))).as_str()
        );
        assert_eq!(event["prev_hash"], prev.as_str(), "each event links to the one before");
        prev = hash.as_str().expect("hash").to_owned();
    }
}

#[tokio::test]
async fn packs_are_deterministic_verify_independently_and_survive_a_restart() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    history(&app).await;
    let first = export(&app, export_request(pb::EvidenceScope::Internal, 5)).await;
    let again = export(&app, export_request(pb::EvidenceScope::Internal, 5)).await;
    assert_eq!(first.pack_json, again.pack_json, "byte-identical");
    assert_eq!((first.events_total, first.events_included), (5, 5));
    let key = public_keys(app.channel.clone()).await.remove(0);
    independently_verify(&first.pack_json, &key.public_key);
    let verdict = verify(&app, first.pack_json.clone()).await;
    assert!(verdict.valid, "{:?}", verdict.problems);

    app.record("factory.step_completed", "later").await;
    let grown = export(&app, export_request(pb::EvidenceScope::Internal, 0)).await;
    assert_ne!(grown.pack_json, first.pack_json, "as_of 0 follows the head");
    assert_eq!(grown.events_included, 6);
    app.stop().await;

    let app = spawn_app_in(dir.path(), |_| {}).await;
    let after = export(&app, export_request(pb::EvidenceScope::Internal, 5)).await;
    assert_eq!(after.pack_json, first.pack_json, "the same bytes after a restart");
    let pack: Value = serde_json::from_str(&first.pack_json).expect("JSON");
    assert_eq!(pack["pack"]["executor_summary"]["steps_failed"], 1);
    assert_eq!(pack["pack"]["bundle_summary"]["quarantined"], 1);
    assert_eq!(pack["pack"]["current_mode"], "sovereign");
}

#[tokio::test]
async fn each_scope_holds_what_it_should_and_investor_packs_name_nothing() {
    let app = spawn_app().await;
    history(&app).await;
    for i in 0..110 {
        app.record("factory.step_completed", &format!("step {i}")).await;
    }
    let audit = export(&app, export_request(pb::EvidenceScope::Audit, 0)).await;
    assert_eq!((audit.events_total, audit.events_included), (115, 100));
    let internal = export(&app, export_request(pb::EvidenceScope::Internal, 0)).await;
    assert_eq!(internal.events_included, 115);
    let investor = export(&app, export_request(pb::EvidenceScope::Investor, 0)).await;
    assert_eq!(investor.events_included, 0);
    for secret in
        ["reason-text-42", "metadata-value-77", "anonymous", "gatekeeper-7", "timeout after 300 s"]
    {
        assert!(
            !investor.pack_json.contains(secret),
            "an investor pack must not contain {secret:?}"
        );
    }
    let pack: Value = serde_json::from_str(&investor.pack_json).expect("JSON");
    assert_eq!(pack["pack"]["audit_summary"]["factory.step_completed"], 110);
    assert!(verify(&app, audit.pack_json).await.valid);
    assert!(verify(&app, investor.pack_json).await.valid);
}

#[tokio::test]
async fn tampering_with_a_pack_is_caught() {
    let app = spawn_app().await;
    history(&app).await;
    let pack = export(&app, export_request(pb::EvidenceScope::Internal, 0)).await.pack_json;

    let edited = pack.replace("timeout after 300 s", "timeout after 30 s");
    let verdict = verify(&app, edited.clone()).await;
    assert!(!verdict.valid && !verdict.hash_valid && !verdict.chain_valid && !verdict.matches_log);

    // The same edit with the content hash recomputed: only the signature can tell.
    let mut document: Value = serde_json::from_str(&edited).expect("JSON");
    let rehashed = format!(
        "sha256:{}",
        hex::encode(Sha256::digest(serde_jcs::to_vec(&document["pack"]).expect("JCS")))
    );
    document["content_hash"] = Value::String(rehashed.clone());
    document["pack_id"] = Value::String(format!("ep-{}", &rehashed[7..23]));
    let verdict = verify(&app, document.to_string()).await;
    assert!(verdict.hash_valid && !verdict.signature_valid && !verdict.valid, "{verdict:?}");

    let mut swapped: Value = serde_json::from_str(&pack).expect("JSON");
    swapped["pack"]["events"].as_array_mut().expect("events").swap(1, 2);
    assert!(!verify(&app, swapped.to_string()).await.chain_valid);

    // An event removed from the middle, with the count adjusted to match.
    let mut removed: Value = serde_json::from_str(&pack).expect("JSON");
    removed["pack"]["events"].as_array_mut().expect("events").remove(2);
    removed["pack"]["events_included"] = Value::from(4);
    let verdict = verify(&app, removed.to_string()).await;
    assert!(!verdict.chain_valid && !verdict.hash_valid, "{verdict:?}");
    assert!(verdict.problems.iter().any(|p| p.contains("seq 4")), "{verdict:?}");

    // Signed by another key: under its own key_id (unknown here), and under ours.
    let other = brain_ops::evidence::keys::Signer::generate().expect("random");
    let mut foreign: Value = serde_json::from_str(&pack).expect("JSON");
    let content_hash = foreign["content_hash"].as_str().expect("hash").to_owned();
    foreign["signature"]["value"] = other.sign_base64(content_hash.as_bytes()).into();
    let verdict = verify(&app, foreign.to_string()).await;
    assert!(verdict.hash_valid && !verdict.signature_valid, "{verdict:?}");
    foreign["signature"]["key_id"] = other.key_id().into();
    let verdict = verify(&app, foreign.to_string()).await;
    assert!(verdict.hash_valid && !verdict.signature_valid, "{verdict:?}");
    assert!(verdict.problems.iter().any(|p| p.contains("not a known key")), "{verdict:?}");

    let mut recount: Value = serde_json::from_str(&pack).expect("JSON");
    recount["pack"]["bundle_summary"]["quarantined"] = Value::from(0);
    assert!(!verify(&app, recount.to_string()).await.hash_valid);

    let malformed = EvidenceServiceClient::new(app.channel.clone())
        .verify(pb::VerifyRequest { pack_json: "{not json".into() })
        .await
        .expect_err("malformed");
    assert_eq!(malformed.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn bad_export_requests_name_the_field() {
    let app = spawn_app().await;
    history(&app).await;
    let mut client = EvidenceServiceClient::new(app.channel.clone());
    let mut inverted = export_request(pb::EvidenceScope::Audit, 0);
    inverted.to = inverted.from;
    let mut no_scope = export_request(pb::EvidenceScope::Audit, 0);
    no_scope.scope = 0;
    let beyond = export_request(pb::EvidenceScope::Audit, 99);
    for (request, field) in [(inverted, "to"), (no_scope, "scope"), (beyond, "as_of_seq")] {
        let status = client.export(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{field}: {}", status.message());
    }
}

#[tokio::test]
async fn verify_stream_gives_the_verdict_of_verify_for_a_chunked_pack() {
    let app = spawn_app().await;
    history(&app).await;
    let pack = export(&app, export_request(pb::EvidenceScope::Audit, 0)).await.pack_json;
    let whole = verify(&app, pack.clone()).await;
    let chunks: Vec<pb::VerifyStreamRequest> =
        pack.as_bytes().chunks(100).map(|c| pb::VerifyStreamRequest { data: c.to_vec() }).collect();
    let streamed = EvidenceServiceClient::new(app.channel.clone())
        .verify_stream(tokio_stream::iter(chunks))
        .await
        .expect("verifies")
        .into_inner();
    assert!(streamed.valid, "{:?}", streamed.problems);
    assert_eq!(streamed.computed_hash, whole.computed_hash);
    let tampered = pack.replace("run 1 failed", "run 1 passed");
    let chunks: Vec<pb::VerifyStreamRequest> = tampered
        .as_bytes()
        .chunks(7)
        .map(|c| pb::VerifyStreamRequest { data: c.to_vec() })
        .collect();
    let streamed = EvidenceServiceClient::new(app.channel.clone())
        .verify_stream(tokio_stream::iter(chunks))
        .await
        .expect("verifies")
        .into_inner();
    assert!(!streamed.valid && !streamed.problems.is_empty());
}

async fn export_stream(app: &crate::helpers::TestApp, request: pb::ExportRequest) -> Vec<u8> {
    use tokio_stream::StreamExt;
    let request = pb::ExportStreamRequest {
        from: request.from,
        to: request.to,
        scope: request.scope,
        exclude_executor_summary: request.exclude_executor_summary,
        as_of_seq: request.as_of_seq,
    };
    let mut stream = EvidenceServiceClient::new(app.channel.clone())
        .export_stream(request)
        .await
        .expect("streams")
        .into_inner();
    let mut file = Vec::new();
    while let Some(chunk) = stream.next().await {
        file.extend(chunk.expect("a chunk").data);
    }
    file
}

#[tokio::test]
async fn export_stream_concatenated_equals_export() {
    let app = spawn_app().await;
    history(&app).await;
    for scope in
        [pb::EvidenceScope::Audit, pb::EvidenceScope::Investor, pb::EvidenceScope::Internal]
    {
        let whole = export(&app, export_request(scope, 0)).await.pack_json;
        let streamed = export_stream(&app, export_request(scope, 0)).await;
        assert_eq!(String::from_utf8(streamed).expect("utf8"), whole, "{scope:?}");
    }
}

#[tokio::test]
async fn a_pack_over_the_message_limit_is_refused_by_export_and_streamed_instead() {
    let app = spawn_app().await;
    for batch in 0..3 {
        let records = (0..100)
            .map(|i| {
                let mut e = crate::helpers::event(
                    "test.large",
                    &format!("{batch}/{i} {}", "r".repeat(1000)),
                );
                for k in 0..14 {
                    e.metadata.insert(format!("key_{k:02}"), "m".repeat(1000));
                }
                pb::BatchRecord { event: Some(e), idempotency_key: String::new() }
            })
            .collect();
        app.audit().record_batch(pb::RecordBatchRequest { records }).await.expect("recorded");
    }
    let refused = EvidenceServiceClient::new(app.channel.clone())
        .export(export_request(pb::EvidenceScope::Internal, 0))
        .await
        .expect_err("over 4 MiB");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("ExportStream"), "{}", refused.message());
    let file = export_stream(&app, export_request(pb::EvidenceScope::Internal, 0)).await;
    assert!(file.len() > 4 * 1024 * 1024);
    let key = public_keys(app.channel.clone()).await.remove(0);
    independently_verify(std::str::from_utf8(&file).expect("utf8"), &key.public_key);
    let chunks: Vec<_> =
        file.chunks(1 << 20).map(|c| pb::VerifyStreamRequest { data: c.to_vec() }).collect();
    let verdict = EvidenceServiceClient::new(app.channel.clone())
        .verify_stream(tokio_stream::iter(chunks))
        .await
        .expect("verifies")
        .into_inner();
    assert!(verdict.valid, "{:?}", verdict.problems);
}

#[test]
fn malformed_pack_files_are_refused_or_found_invalid_never_a_panic() {
    let corpus: Vec<String> = serde_json::from_str(include_str!("../corpus/malformed_packs.json"))
        .expect("corpus parses");
    assert!(corpus.len() >= 25);
    let keys = std::collections::BTreeMap::new();
    for file in &corpus {
        let streamed = brain_ops::evidence::verify::verify(Cursor::new(file), &keys, None);
        match brain_ops::evidence::verify::verify_document(file, &keys, None) {
            Err(_) => assert!(streamed.is_err(), "{file:?}: refused whole, not streamed"),
            Ok(verdict) => {
                assert!(!verdict.valid_offline(), "{file:?} passed verification");
                assert_eq!(streamed.as_ref(), Ok(&verdict), "{file:?}: streamed differently");
            }
        }
    }
}

#[tokio::test]
async fn every_exported_pack_matches_the_published_json_schema() {
    let schema: Value = serde_json::from_str(include_str!("../../docs/evidence-pack.schema.json"))
        .expect("schema parses");
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    // With a governance config (listing a retired key) and a checkpoint, so that every member
    // of the schema is exercised.
    let dir = tempfile::TempDir::new().expect("temp dir");
    let retired = brain_ops::evidence::keys::Signer::generate().expect("random");
    let config = dir.path().join("governance.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[[signing.retired_keys]]\nkey_id = \"{}\"\npublic_key = \"{}\"\n",
            include_str!("../../deploy/governance.toml"),
            retired.key_id(),
            retired.public_key_base64()
        ),
    )
    .expect("writes");
    let data = dir.path().join("data");
    let configure = |c: &mut brain_ops::config::Config| c.governance_config = Some(config.clone());
    let app = spawn_app_in(&data, configure).await;
    history(&app).await;
    app.stop().await;
    let app = spawn_app_in(&data, configure).await;
    for scope in
        [pb::EvidenceScope::Audit, pb::EvidenceScope::Investor, pb::EvidenceScope::Internal]
    {
        let mut request = export_request(scope, 0);
        request.exclude_executor_summary = scope == pb::EvidenceScope::Investor;
        let pack: Value =
            serde_json::from_str(&export(&app, request).await.pack_json).expect("JSON");
        assert!(pack["pack"]["governance_config"]["settings"].is_object());
        assert!(pack["pack"]["checkpoint"]["signature"].is_string());
        if let Err(error) = validator.validate(&pack) {
            panic!("{scope:?} pack does not match the schema: {error}");
        }
        let mut extra = pack.clone();
        extra["pack"]["unexpected"] = Value::from(1);
        assert!(!validator.is_valid(&extra), "the schema refuses unknown members");
    }
}

/// A pack of the head reads the state the writer keeps and finds its range by bisection; the
/// same pack asked for by seq after the head has moved folds the ledger instead. Both must give
/// the same bytes, for a range that starts and ends inside the ledger.
#[tokio::test]
async fn a_pack_of_the_head_equals_the_same_pack_asked_for_by_seq_later() {
    use brain_ops::ledger::record::parse_time;
    let app = spawn_app().await;
    history(&app).await;
    for i in 0..5 {
        app.record("factory.step_completed", &format!("step {i}")).await;
    }
    let records: Vec<Value> = app.list_all().await.iter().map(crate::helpers::record_of).collect();
    let time = |r: &Value| parse_time(r["time"].as_str().expect("time")).expect("a time");
    let (from, to) = (time(&records[2]), time(&records[7]));
    let expected: Vec<&Value> = records.iter().filter(|r| (from..to).contains(&time(r))).collect();
    let at = |micros: i64| Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    };
    let request = |as_of_seq| pb::ExportRequest {
        from: Some(at(from)),
        to: Some(at(to)),
        ..export_request(pb::EvidenceScope::Internal, as_of_seq)
    };
    let head = export(&app, request(0)).await;
    let pack: Value = serde_json::from_str(&head.pack_json).expect("JSON");
    let chain = &pack["pack"]["chain"];
    let first = expected.first().expect("events in the range");
    assert_eq!(chain["first_seq"], first["seq"]);
    assert_eq!(chain["last_seq"], expected.last().expect("events")["seq"]);
    assert_eq!(chain["prev_hash"], first["prev_hash"], "the hash of the event before the range");
    let seqs: Vec<&Value> =
        pack["pack"]["events"].as_array().expect("events").iter().map(|e| &e["seq"]).collect();
    assert_eq!(seqs, expected.iter().map(|r| &r["seq"]).collect::<Vec<_>>());
    let head_seq = pack["pack"]["as_of"]["seq"].as_u64().expect("seq");
    assert_eq!(head_seq, records.len() as u64);

    app.record("factory.step_completed", "after the pack").await;
    let later = export(&app, request(head_seq)).await;
    assert_eq!(later.pack_json, head.pack_json, "the same bytes from a fold of the ledger");
    assert!(verify(&app, head.pack_json).await.valid);
}
