//! The client commands against a live server: output formats and exit codes.

use std::sync::Arc;

use brain_ops::ledger::store::{SledOptions, SledStore, Storage};

use crate::helpers::{BIN, spawn_app, spawn_app_in};

/// Runs the CLI without blocking the runtime that serves the in-process server.
async fn run(server: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = tokio::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .env("BRAIN_SERVER", server)
        .output()
        .await
        .expect("runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn audit_list_prints_stored_records_as_json_and_as_a_table() {
    let app = spawn_app().await;
    app.record("factory.step_failed", "timeout after 300 s").await;
    app.record("factory.rollback_started", "step failed").await;
    let server = format!("http://{}", app.grpc_addr);
    let (code, stdout, stderr) = run(&server, &["audit", "list", "-o", "json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("JSON output");
    let events = listed["events"].as_array().expect("events");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["event_type"], "factory.step_failed");
    assert_eq!(events[0]["severity"], "error");
    assert_eq!(listed["next_after_seq"], 0);

    let (code, stdout, _) =
        run(&server, &["audit", "list", "--type-prefix", "factory.rollback"]).await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("factory.rollback_started") && !stdout.contains("factory.step_failed"),
        "{stdout}"
    );
}

#[tokio::test]
async fn audit_verify_exits_0_when_valid_and_1_when_broken() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    app.record("test.cli", "one").await;
    app.record("test.cli", "two").await;
    let server = format!("http://{}", app.grpc_addr);
    let (code, stdout, _) = run(&server, &["audit", "verify"]).await;
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("chain valid: 2 records checked"), "{stdout}");
    app.stop().await;

    let store = SledStore::open(dir.path(), SledOptions::default(), Arc::default()).expect("opens");
    let bytes = store.get(1).expect("reads").expect("stored");
    let edited = String::from_utf8(bytes).expect("utf8").replace("one", "uno");
    store.append(&[(1, edited.as_bytes())]).expect("writes");
    drop(store);

    let app = spawn_app_in(dir.path(), |_| {}).await;
    let server = format!("http://{}", app.grpc_addr);
    let (code, stdout, _) = run(&server, &["audit", "verify", "-o", "json"]).await;
    assert_eq!(code, Some(1), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON output");
    assert_eq!(report["valid"], false);
    assert_eq!(report["first_bad_seq"], 1);
}

#[tokio::test]
async fn client_errors_map_to_documented_exit_codes() {
    let app = spawn_app().await;
    let server = format!("http://{}", app.grpc_addr);
    let (code, _, stderr) = run(&server, &["audit", "list", "--page-size", "0"]).await;
    assert_eq!(code, Some(4), "a refused request exits 4: {stderr}");
    assert!(stderr.contains("page_size"), "{stderr}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let unreachable = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let (code, _, stderr) = run(&unreachable, &["audit", "list"]).await;
    assert_eq!(code, Some(3), "an unreachable server exits 3: {stderr}");
    let (code, _, _) = run(&server, &["audit", "list", "--from", "yesterday"]).await;
    assert_eq!(code, Some(2), "a bad argument exits 2");
}

#[tokio::test]
async fn safe_mode_commands_freeze_check_and_thaw_with_documented_exit_codes() {
    let app = spawn_app().await;
    let server = format!("http://{}", app.grpc_addr);
    let (code, stdout, _) =
        run(&server, &["safe-mode", "check", "--kind", "deployment", "--operation", "deploy api"])
            .await;
    assert_eq!(code, Some(0), "allowed exits 0: {stdout}");

    let (code, stdout, stderr) =
        run(&server, &["safe-mode", "enable", "--reason", "incident 7"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("safe mode enabled\nsafe mode ON"), "{stdout}");
    let (_, stdout, _) = run(&server, &["safe-mode", "enable", "--reason", "again"]).await;
    assert!(stdout.starts_with("safe mode was already enabled"), "{stdout}");

    let (code, stdout, _) = run(&server, &["safe-mode", "status", "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        (status["enabled"].as_bool(), status["reason"].as_str()),
        (Some(true), Some("incident 7"))
    );
    assert_eq!(status["source"], "api");

    let (code, stdout, _) =
        run(&server, &["safe-mode", "check", "--kind", "bundle-load", "--operation", "load b1"])
            .await;
    assert_eq!(code, Some(1), "blocked exits 1");
    assert!(stdout.contains("Bundle load \"load b1\" is blocked"), "{stdout}");

    let (code, stdout, _) =
        run(&server, &["safe-mode", "disable", "--reason", "fixed", "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let answer: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        (answer["changed"].as_bool(), answer["status"]["enabled"].as_bool()),
        (Some(true), Some(false))
    );

    let (code, _, stderr) = run(&server, &["safe-mode", "enable", "--reason", ""]).await;
    assert_eq!(code, Some(4), "an empty reason is refused: {stderr}");
}

#[tokio::test]
async fn safe_mode_watch_prints_changes_and_exits_3_when_the_stream_goes_stale() {
    use tokio::io::AsyncBufReadExt;
    let app = spawn_app().await;
    let server = format!("http://{}", app.grpc_addr);
    let mut watch = tokio::process::Command::new(BIN)
        .args(["safe-mode", "watch", "--stale-after-seconds", "3"])
        .env_clear()
        .env("BRAIN_SERVER", &server)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().expect("piped")).lines();
    let first = lines.next_line().await.expect("reads").expect("a first line");
    assert!(first.starts_with("safe mode OFF"), "{first}");
    run(&server, &["safe-mode", "enable", "--reason", "watched"]).await;
    let change = lines.next_line().await.expect("reads").expect("a change");
    assert!(change.starts_with("safe mode ON") && change.ends_with("watched"), "{change}");
    // Heartbeats come every 5 s by default, so a 3 s budget goes stale.
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), watch.wait())
        .await
        .expect("watch exits")
        .expect("status");
    assert_eq!(status.code(), Some(3));
}

#[tokio::test]
async fn token_new_prints_a_token_whose_digest_goes_into_a_loadable_principals_file() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let file = dir.path().join("principals.toml");
    let file_arg = file.to_str().expect("utf8");
    let (code, stdout, stderr) =
        run("unused", &["token", "new", "--name", "ops-alice", "--role", "operator", "-o", "json"])
            .await;
    assert_eq!(code, Some(0), "{stderr}");
    let made: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let token = made["token"].as_str().expect("token");
    use sha2::Digest;
    assert_eq!(made["token_sha256"], hex::encode(sha2::Sha256::digest(token.as_bytes())));

    for name in ["ops-alice", "factory-executor"] {
        let (code, stdout, _) = run(
            "unused",
            &["token", "new", "--name", name, "--role", "service", "--append-to", file_arg],
        )
        .await;
        assert_eq!(code, Some(0));
        assert!(stdout.trim().starts_with("brainops_") && stdout.lines().count() == 1, "{stdout}");
    }
    let principals = brain_ops::auth::Principals::load(&file).expect("the file loads");
    assert_eq!(principals.len(), 2);
}

#[tokio::test]
async fn audit_record_and_metrics_summary_drive_and_read_the_projections() {
    let app = spawn_app().await;
    let server = format!("http://{}", app.grpc_addr);
    let quarantine = [
        "audit",
        "record",
        "--type",
        "sovereign.bundle_quarantined",
        "--bundle-id",
        "b1",
        "--reason",
        "hash mismatch",
        "--meta",
        "expected_hash=aa",
        "--meta",
        "actual_hash=bb",
        "--idempotency-key",
        "q-b1",
        "-o",
        "json",
    ];
    let (code, stdout, stderr) = run(&server, &quarantine).await;
    assert_eq!(code, Some(0), "{stderr}");
    let first: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let (_, stdout, _) = run(&server, &quarantine).await;
    let again: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        (again["seq"].clone(), again["duplicate"].as_bool()),
        (first["seq"].clone(), Some(true))
    );
    let (code, _, _) = run(
        &server,
        &[
            "audit",
            "record",
            "--type",
            "sovereign.mode_changed",
            "--mode-before",
            "online",
            "--mode-after",
            "sovereign",
        ],
    )
    .await;
    assert_eq!(code, Some(0));
    let (code, _, stderr) =
        run(&server, &["audit", "record", "--type", "factory.step_failed", "--meta", "nokey"])
            .await;
    assert_eq!(code, Some(2), "{stderr}");

    let stored = app.list_all().await;
    let quarantined = crate::helpers::record_of(&stored[0]);
    assert_eq!(quarantined["metadata"]["expected_hash"], "aa");
    assert_eq!(quarantined["severity"], "warning");

    let (code, stdout, _) = run(&server, &["metrics", "summary", "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(summary["current_mode"], "sovereign");
    assert_eq!(
        (summary["quarantines"].as_u64(), summary["mode_switches"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn evidence_export_and_verify_work_offline_and_through_the_server() {
    let app = spawn_app().await;
    app.record("factory.step_failed", "timeout after 300 s").await;
    app.record("factory.rollback_started", "step failed").await;
    let server = format!("http://{}", app.grpc_addr);
    let dir = tempfile::TempDir::new().expect("temp dir");
    let pack = dir.path().join("pack.json");
    let pack_arg = pack.to_str().expect("utf8");
    let (code, stdout, stderr) = run(
        &server,
        &[
            "evidence",
            "export",
            "--scope",
            "audit",
            "--from",
            "2020-01-01T00:00:00Z",
            "--to",
            "2100-01-01T00:00:00Z",
            "--out",
            pack_arg,
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("ep-"), "{stdout}");

    let key = crate::helpers::public_keys(app.channel.clone()).await.remove(0);
    let key_file = dir.path().join("service.key");
    std::fs::write(&key_file, &key.public_key).expect("writes");
    let key_arg = key_file.to_str().expect("utf8");
    let (code, stdout, _) =
        run("http://127.0.0.1:1", &["evidence", "verify", pack_arg, "--public-key", key_arg]).await;
    assert_eq!(code, Some(0), "offline, no server needed: {stdout}");
    assert!(stdout.contains("VALID") && stdout.contains("matches_log: not checked"), "{stdout}");
    let (code, stdout, _) = run(&server, &["evidence", "verify", pack_arg, "-o", "json"]).await;
    assert_eq!(code, Some(0), "{stdout}");
    let verdict: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(verdict["matches_log"], true);

    let other = dir.path().join("other.pem");
    run("unused", &["keygen", "--out", other.to_str().expect("utf8")]).await;
    let other_pub = format!("{}.pub", other.display());
    let (code, stdout, _) =
        run("http://127.0.0.1:1", &["evidence", "verify", pack_arg, "--public-key", &other_pub])
            .await;
    assert_eq!(code, Some(1), "another key does not verify: {stdout}");

    let edited = std::fs::read_to_string(&pack)
        .expect("reads")
        .replace("timeout after 300 s", "timeout after 3 s");
    std::fs::write(&pack, edited).expect("writes");
    let (code, stdout, _) =
        run("http://127.0.0.1:1", &["evidence", "verify", pack_arg, "--public-key", key_arg]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("INVALID") && stdout.contains("problem:"), "{stdout}");
}

#[tokio::test]
async fn override_commands_grant_consume_list_and_revoke_with_documented_exit_codes() {
    let app = spawn_app().await;
    let server = format!("http://{}", app.grpc_addr);
    let grant = ["override", "grant", "--scope", "sovereign.mode_change", "--ttl-seconds", "600"];
    let (code, stdout, stderr) = run(
        &server,
        &[&grant[..], &["--reason", "IPv6 gate down, incident 42", "-o", "json"]].concat(),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let granted: serde_json::Value = serde_json::from_str(&stdout).expect("JSON output");
    let token = granted["token"].as_str().expect("token").to_owned();
    let id = granted["override"]["id"].as_str().expect("id").to_owned();
    assert_eq!(granted["override"]["state"], "active");

    let consume = ["override", "consume", "--override-token", &token, "--purpose", "switch"];
    let (code, stdout, stderr) = run(&server, &consume).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with(&format!("{id} CONSUMED scope sovereign.mode_change")), "{stdout}");
    let (code, _, stderr) = run(&server, &consume).await;
    assert_eq!(code, Some(4), "a refused reuse exits 4");
    assert!(stderr.contains("FailedPrecondition") && stderr.contains("consumed"), "{stderr}");

    let (code, stdout, _) = run(&server, &["override", "list"]).await;
    assert_eq!((code, stdout.trim()), (Some(0), "no overrides"));
    let (code, stdout, _) = run(&server, &["override", "list", "--all", "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("JSON output");
    assert_eq!(listed[0]["state"], "consumed");
    assert_eq!(listed[0]["purpose"], "switch");

    let (code, _, stderr) =
        run(&server, &["override", "revoke", "--id", &id, "--reason", "incident closed"]).await;
    assert_eq!(code, Some(4), "{stderr}");
    let (code, _, stderr) = run(&server, &[&grant[..], &["--reason", "short"]].concat()).await;
    assert_eq!(code, Some(4));
    assert!(stderr.contains("InvalidArgument: reason"), "{stderr}");
}
