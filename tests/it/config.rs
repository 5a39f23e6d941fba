//! Bad configuration exits 64 with a message naming the setting.

use crate::helpers::BIN;

fn serve_with(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let output = std::process::Command::new(BIN)
        .arg("serve")
        .args(args)
        .env_clear()
        .env("BRAIN_DATA_DIR", dir.path())
        .env("BRAIN_GRPC_ADDR", "127.0.0.1:0")
        .env("BRAIN_METRICS_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .output()
        .expect("runs");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn bad_settings_exit_64_naming_the_setting() {
    let cases: [(&[(&str, &str)], &str); 7] = [
        (&[("BRAIN_SAFE_MODE", "maybe")], "BRAIN_SAFE_MODE"),
        (&[("BRAIN_GRPC_ADDR", "localhost")], "BRAIN_GRPC_ADDR"),
        (&[("BRAIN_METRICS_ADDR", "300.1.1.1:80")], "BRAIN_METRICS_ADDR"),
        (&[("BRAIN_LOG_FORMAT", "xml")], "BRAIN_LOG_FORMAT"),
        (&[("BRAIN_GRPC_ADDR", "0.0.0.0:0")], "BRAIN_GRPC_ADDR"),
        (&[("BRAIN_DRAIN_TIMEOUT_SECONDS", "0")], "BRAIN_DRAIN_TIMEOUT_SECONDS"),
        // Above half the siblings' staleness budget, they would go stale between heartbeats.
        (&[("BRAIN_WATCH_HEARTBEAT_SECONDS", "16")], "BRAIN_WATCH_HEARTBEAT_SECONDS"),
    ];
    for (env, setting) in cases {
        let (code, stderr) = serve_with(env, &[]);
        assert_eq!(code, Some(64), "{env:?}: {stderr}");
        assert!(stderr.contains(setting), "{env:?}: {stderr}");
    }
}

#[test]
fn an_unknown_flag_to_serve_exits_64() {
    let (code, stderr) = serve_with(&[], &["--no-such-flag"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

#[test]
fn an_address_in_use_exits_64_naming_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, stderr) = serve_with(&[("BRAIN_METRICS_ADDR", &addr)], &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("BRAIN_METRICS_ADDR"), "{stderr}");
}
