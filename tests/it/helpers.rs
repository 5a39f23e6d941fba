//! `spawn_app()` and friends: a temp data dir, port 0, typed clients, silent logs unless
//! `TEST_LOG` is set.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use brain_ops::config::{Config, LogFormat};
use brain_ops::ledger::Ledger;
use brain_ops::ledger::clock::SteppableClock;
use brain_ops::ledger::store::Faults;
use brain_ops::pb;
use brain_ops::pb::audit_service_client::AuditServiceClient;
use brain_ops::pb::safe_mode_service_client::SafeModeServiceClient;
use brain_ops::startup::{App, ServeError};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub struct TestApp {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The plaintext health-only port, when configured.
    pub health_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub ledger: Ledger,
    pub faults: Arc<Faults>,
    pub clock: Arc<SteppableClock>,
    pub channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    running: tokio::task::JoinHandle<Result<(), ServeError>>,
    _dir: Option<TempDir>,
}

fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            brain_ops::telemetry::init(LogFormat::Human);
        }
    });
}

/// A fresh service on a fresh data dir.
pub async fn spawn_app() -> TestApp {
    let dir = TempDir::new().expect("temp dir");
    let mut app = spawn_app_in(dir.path(), |_| {}).await;
    app._dir = Some(dir);
    app
}

/// A service on `data_dir` (which outlives it), after `configure` adjusts the config.
pub async fn spawn_app_in(data_dir: &Path, configure: impl FnOnce(&mut Config)) -> TestApp {
    init_logs();
    let faults = Arc::new(Faults::default());
    let clock = Arc::new(SteppableClock::default());
    let mut config = Config::ephemeral(data_dir);
    config.faults = faults.clone();
    config.clock = clock.clone();
    configure(&mut config);
    let tls = config.tls.is_some();
    let app = App::build(config).await.expect("the app builds");
    let (grpc_addr, metrics_addr, ledger) = (app.grpc_addr(), app.metrics_addr(), app.ledger());
    let health_addr = app.health_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let endpoint = Channel::from_shared(format!("http://{grpc_addr}")).expect("valid uri");
    // With TLS on, a plaintext channel cannot connect; tests make their own.
    let channel = if tls {
        endpoint.connect_lazy()
    } else {
        endpoint.connect().await.expect("the server accepts connections once bound")
    };
    TestApp {
        grpc_addr,
        metrics_addr,
        health_addr,
        data_dir: data_dir.to_owned(),
        ledger,
        faults,
        clock,
        channel,
        stop: Some(stop),
        running,
        _dir: None,
    }
}

impl TestApp {
    pub fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel.clone())
    }

    pub fn safe_mode(&self) -> SafeModeServiceClient<Channel> {
        SafeModeServiceClient::new(self.channel.clone())
    }

    /// Starts the shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits until the ledger is closed. Keeps the data dir.
    pub async fn stop(mut self) -> Option<TempDir> {
        self.begin_stop();
        let running = std::mem::replace(&mut self.running, tokio::spawn(async { Ok(()) }));
        running.await.expect("the server task ends").expect("the server stops cleanly");
        self._dir.take()
    }

    pub async fn status(&self) -> pb::SafeModeStatus {
        self.safe_mode()
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("GetStatus answers")
            .into_inner()
            .status
            .expect("status is set")
    }

    /// Records one event of `event_type` with `reason`.
    pub async fn record(&self, event_type: &str, reason: &str) -> pb::RecordResponse {
        self.audit()
            .record(pb::RecordRequest {
                event: Some(event(event_type, reason)),
                idempotency_key: String::new(),
            })
            .await
            .expect("Record answers")
            .into_inner()
    }

    /// Every event except the service's own checkpoints (one is appended at every shutdown).
    pub async fn list_all(&self) -> Vec<pb::LedgerEvent> {
        let mut events = self.list_everything().await;
        events.retain(|e| e.event_type != "system.checkpoint");
        events
    }

    /// Every event.
    pub async fn list_everything(&self) -> Vec<pb::LedgerEvent> {
        list_all(&mut self.audit(), pb::AuditServiceListRequest::default()).await
    }
}

pub fn event(event_type: &str, reason: &str) -> pb::Event {
    pb::Event { event_type: event_type.into(), reason: reason.into(), ..Default::default() }
}

pub async fn list_all(
    client: &mut AuditServiceClient<Channel>,
    mut request: pb::AuditServiceListRequest,
) -> Vec<pb::LedgerEvent> {
    request.page_size = Some(1000);
    let mut events = Vec::new();
    loop {
        let page = client.list(request.clone()).await.expect("List answers").into_inner();
        events.extend(page.events);
        if page.next_after_seq == 0 {
            return events;
        }
        request.after_seq = page.next_after_seq;
    }
}

/// The stored record of an event, parsed.
pub fn record_of(event: &pb::LedgerEvent) -> serde_json::Value {
    serde_json::from_str(&event.record_json).expect("stored records are JSON")
}

pub const BIN: &str = env!("CARGO_BIN_EXE_brain-ops");

/// `brain-ops serve` as a child process with JSON logs, on port 0.
pub struct ServeProcess {
    pub child: std::process::Child,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Kept so that the log reader keeps draining the child's stderr.
    _logs: std::sync::mpsc::Receiver<String>,
}

/// Starts `brain-ops serve` on `data_dir` and waits for its "serving" log line, which carries
/// the bound addresses.
pub fn serve_process(data_dir: &Path, env: &[(&str, &str)]) -> ServeProcess {
    use std::io::BufRead;
    let child = std::process::Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("BRAIN_GRPC_ADDR", "127.0.0.1:0")
        .env("BRAIN_METRICS_ADDR", "127.0.0.1:0")
        .env("BRAIN_DATA_DIR", data_dir)
        .env("BRAIN_LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut child = child;
    let stderr = child.stderr.take().expect("piped");
    let (lines, logs) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if std::env::var_os("TEST_LOG").is_some() {
                eprintln!("{line}");
            }
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // From here on, Drop kills and reaps the child whatever happens.
    let unbound = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut process =
        ServeProcess { child, grpc_addr: unbound, metrics_addr: unbound, _logs: logs };
    loop {
        let line = process
            ._logs
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the service logs that it is serving");
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if entry["message"] == "brain-ops serving" {
            let addr = |key: &str| -> SocketAddr {
                entry[key].as_str().expect("address").parse().expect("socket address")
            };
            process.grpc_addr = addr("grpc");
            process.metrics_addr = addr("metrics");
            return process;
        }
    }
}

impl ServeProcess {
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .expect("valid uri")
            .connect()
            .await
            .expect("connects")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (TERM, HUP, ...).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the process to exit (bounded) and returns its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("waits") {
                return status.code();
            }
            assert!(std::time::Instant::now() < deadline, "the process did not exit");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 GET on the metrics port: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connects");
    let request = format!("GET {path} HTTP/1.1\r\nHost: brain-ops\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("writes");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("reads");
    let code = response.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

/// The keys `GetPublicKeys` publishes.
pub async fn public_keys(channel: Channel) -> Vec<pb::PublicKey> {
    pb::evidence_service_client::EvidenceServiceClient::new(channel)
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .expect("GetPublicKeys answers")
        .into_inner()
        .keys
}

/// `brain-ops serve` on port 0 with only `env`, run to its exit (for configuration refusals).
pub fn serve_once(data_dir: &Path, env: &[(&str, &Path)]) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("BRAIN_DATA_DIR", data_dir)
        .env("BRAIN_GRPC_ADDR", "127.0.0.1:0")
        .env("BRAIN_METRICS_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .output()
        .expect("runs")
}
