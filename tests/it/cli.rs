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
    let export = ["evidence", "export", "--scope", "audit", "--from", "2020-01-01T00:00:00Z"];
    let export = [&export[..], &["--to", "2100-01-01T00:00:00Z", "--out"]].concat();
    let (code, stdout, stderr) = run(&server, &[&export[..], &[pack_arg]].concat()).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("ep-"), "{stdout}");

    // A refused export (the range is backwards) leaves no file behind, finished or partial.
    let refused = dir.path().join("refused.json");
    let backwards = ["evidence", "export", "--scope", "audit", "--from", "2100-01-01T00:00:00Z"];
    let backwards = [&backwards[..], &["--to", "2020-01-01T00:00:00Z", "--out"]].concat();
    for unary in [&[][..], &["--unary"][..]] {
        let args = [&backwards[..], &[refused.to_str().expect("utf8")], unary].concat();
        let (code, _, stderr) = run(&server, &args).await;
        assert_eq!(code, Some(4), "{stderr}");
        assert!(!refused.exists() && !refused.with_extension("partial").exists());
    }

    // The same pack in one message (Export) rather than streamed.
    let unary = dir.path().join("unary.json");
    let unary_arg = unary.to_str().expect("utf8");
    let (code, _, stderr) = run(&server, &[&export[..], &[unary_arg, "--unary"]].concat()).await;
    assert_eq!(code, Some(0), "{stderr}");
    let hash_of = |path: &std::path::Path| {
        let pack: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).expect("reads")).expect("JSON");
        (pack["content_hash"].clone(), pack["pack"]["events_included"].as_u64())
    };
    assert_eq!(hash_of(&unary), hash_of(&pack), "Export and ExportStream give the same pack");
    assert_eq!(hash_of(&pack).1, Some(2));
    let (code, stdout, _) =
        run(&server, &["evidence", "verify", unary_arg, "--unary", "-o", "json"]).await;
    assert_eq!(code, Some(0), "{stdout}");
    let verdict: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        (verdict["valid"].as_bool(), verdict["matches_log"].as_bool()),
        (Some(true), Some(true))
    );

    let (code, stdout, stderr) = run(&server, &["evidence", "public-keys", "-o", "json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let keys: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let served = crate::helpers::public_keys(app.channel.clone()).await;
    assert_eq!(keys.as_array().map(Vec::len), Some(served.len()));
    assert_eq!(keys[0]["key_id"], served[0].key_id.as_str());
    assert_eq!(keys[0]["retired"], false);
    let key_file = dir.path().join("service.key");
    std::fs::write(&key_file, keys[0]["public_key"].as_str().expect("base64 key")).expect("writes");
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

#[tokio::test]
async fn audit_record_batch_appends_a_json_lines_file_all_or_nothing() {
    let app = spawn_app().await;
    let server = format!("http://{}", app.grpc_addr);
    let dir = tempfile::TempDir::new().expect("temp dir");
    let file = dir.path().join("batch.jsonl");
    let lines = [
        r#"{"type": "factory.step_failed", "reason": "timeout", "idempotency_key": "k1"}"#,
        "",
        r#"{"type": "sovereign.mode_changed", "mode_before": "online", "mode_after": "offline", "severity": "warning", "metadata": {"ticket": "42"}}"#,
        r#"{"type": "factory.step_failed", "reason": "timeout", "idempotency_key": "k1"}"#,
    ];
    std::fs::write(&file, lines.join("\n")).expect("writes");
    let file_arg = file.to_str().expect("utf8");
    let (code, stdout, stderr) =
        run(&server, &["audit", "record-batch", "--file", file_arg, "-o", "json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let results: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let seqs: Vec<_> = results
        .as_array()
        .expect("one result per event")
        .iter()
        .map(|r| (r["seq"].as_u64(), r["duplicate"].as_bool()))
        .collect();
    assert_eq!(seqs, [(Some(1), Some(false)), (Some(2), Some(false)), (Some(1), Some(true))]);
    let stored = app.list_all().await;
    assert_eq!(stored.len(), 2);
    let changed = crate::helpers::record_of(&stored[1]);
    assert_eq!(
        (changed["mode_after"].as_str(), changed["metadata"]["ticket"].as_str()),
        (Some("offline"), Some("42"))
    );

    // A bad line fails the whole file before anything is sent, naming the line.
    std::fs::write(&file, format!("{}\n{{\"type\": \"x.y\", \"sevrity\": \"info\"}}", lines[0]))
        .expect("writes");
    let (code, _, stderr) = run(&server, &["audit", "record-batch", "--file", file_arg]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("line 2") && stderr.contains("sevrity"), "{stderr}");
    // A record the server refuses (no type) fails the batch with nothing appended.
    std::fs::write(&file, format!("{}\n{{\"type\": \"\"}}", lines[2])).expect("writes");
    let (code, _, stderr) = run(&server, &["audit", "record-batch", "--file", file_arg]).await;
    assert_eq!(code, Some(4), "{stderr}");
    assert_eq!(app.list_all().await.len(), 2, "all or nothing");
}

#[tokio::test]
async fn completion_prints_a_script_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, stdout, stderr) = run("unused", &["completion", shell]).await;
        assert_eq!(code, Some(0), "{shell}: {stderr}");
        assert!(stdout.contains("record-batch") && stdout.contains("public-keys"), "{shell}");
    }
    let (code, _, _) = run("unused", &["completion", "tcsh"]).await;
    assert_eq!(code, Some(2));
}

/// Every RPC of every brain-ops service is named by the client command that calls it, in the
/// reference generated from the command definitions. (That the commands do call them is what
/// the live tests above show.)
#[test]
fn every_rpc_is_named_by_a_cli_command() {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(brain_ops::pb::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set decodes");
    let reference = brain_ops::cli::reference();
    let named = |rpc: &str| {
        reference.match_indices(rpc).any(|(at, _)| {
            !reference[at + rpc.len()..].starts_with(|c: char| c.is_ascii_alphanumeric())
        })
    };
    let mut rpcs = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                rpcs.push(format!("{}.{}", service.name(), method.name()));
            }
        }
    }
    assert!(rpcs.len() >= 19, "the five services' RPCs: {rpcs:?}");
    let missing: Vec<_> = rpcs.iter().filter(|rpc| !named(rpc)).collect();
    assert!(missing.is_empty(), "RPCs no CLI command calls: {missing:?}");
}

/// docs/CLI.md is what the command definitions render; `UPDATE_DOCS=1` rewrites it.
#[test]
fn reference_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CLI.md");
    let rendered = brain_ops::cli::reference();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(path, &rendered).expect("writes docs/CLI.md");
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == rendered,
        "docs/CLI.md is out of date: run `UPDATE_DOCS=1 cargo test --test it reference_is_current`"
    );
}
