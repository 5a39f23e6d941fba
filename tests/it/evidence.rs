//! Evidence signing keys: generated once and kept, or configured; published by GetPublicKeys.

use base64::Engine;
use brain_ops::pb;
use brain_ops::pb::evidence_service_client::EvidenceServiceClient;
use sha2::{Digest, Sha256};

use crate::helpers::{BIN, serve_process, spawn_app_in};

async fn public_keys(channel: tonic::transport::Channel) -> Vec<pb::PublicKey> {
    EvidenceServiceClient::new(channel)
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys
}

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
    let output = std::process::Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("BRAIN_DATA_DIR", dir.path().join("data"))
        .env("BRAIN_GRPC_ADDR", "127.0.0.1:0")
        .env("BRAIN_METRICS_ADDR", "127.0.0.1:0")
        .env("BRAIN_SIGNING_KEY_FILE", &key_file)
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("BRAIN_SIGNING_KEY_FILE"));
}
