//! A `brain-ops serve` child process on a scratch data directory, for the drills that edit the
//! data directory or kill the server, and for `drill run --local`.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::auth::new_token;

/// The service principal of a local server; the override-abuse drill acts as it.
pub(super) const SERVICE: &str = "factory-executor";
/// The principal that reports mode changes.
pub(super) const SOVEREIGN: &str = "sovereign";

/// Bearer tokens of a local server's principals.
#[derive(Debug)]
pub struct Tokens {
    pub operator: String,
    pub service: String,
    pub sovereign: String,
}

/// A server the drill started; it is killed and its directory removed on drop.
#[derive(Debug)]
pub struct LocalServer {
    binary: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    grpc: SocketAddr,
    metrics: SocketAddr,
    pub tokens: Tokens,
}

impl LocalServer {
    /// Starts a server from `binary` on a new scratch directory.
    pub fn start(binary: &Path) -> Result<LocalServer, String> {
        let token = || new_token().map_err(|e| format!("no randomness for tokens: {e}"));
        let (operator, operator_sha) = token()?;
        let (service, service_sha) = token()?;
        let (sovereign, sovereign_sha) = token()?;
        let dir = std::env::temp_dir().join(format!("brain-ops-{}", super::new_drill_id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let principals = format!(
            "[[principal]]\nname = \"drill-operator\"\nrole = \"operator\"\n\
             token_sha256 = \"{operator_sha}\"\n\n\
             [[principal]]\nname = \"{SERVICE}\"\nrole = \"service\"\n\
             token_sha256 = \"{service_sha}\"\n\n\
             [[principal]]\nname = \"{SOVEREIGN}\"\nrole = \"service\"\n\
             token_sha256 = \"{sovereign_sha}\"\n"
        );
        std::fs::write(dir.join("principals.toml"), principals)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut server = LocalServer {
            binary: binary.to_owned(),
            dir,
            child: None,
            grpc: unbound,
            metrics: unbound,
            tokens: Tokens { operator, service, sovereign },
        };
        server.restart()?;
        Ok(server)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
    }

    /// Starts the server again on the same data directory and gRPC port (the first start picks a
    /// free port). Waits until it serves.
    pub fn restart(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Err("the local server is still running".into());
        }
        let mut command = Command::new(&self.binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BRAIN_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .arg("serve")
            .env("BRAIN_GRPC_ADDR", self.grpc.to_string())
            .env("BRAIN_METRICS_ADDR", "127.0.0.1:0")
            .env("BRAIN_DATA_DIR", self.data_dir())
            .env("BRAIN_AUTH_FILE", self.dir.join("principals.toml"))
            .env("BRAIN_WATCH_HEARTBEAT_SECONDS", "1")
            .env("BRAIN_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (serving, addresses) = std::sync::mpsc::channel();
        // The log is read to the end, so that the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if entry["message"] == "brain-ops serving" {
                    let addr = |key: &str| entry[key].as_str().and_then(|a| a.parse().ok());
                    let _ = serving.send((addr("grpc"), addr("metrics")));
                }
            }
        });
        self.child = Some(child);
        match addresses.recv_timeout(Duration::from_secs(60)) {
            Ok((Some(grpc), Some(metrics))) => {
                self.grpc = grpc;
                self.metrics = metrics;
                Ok(())
            }
            _ => {
                self.kill();
                Err("the local server did not start serving within 60 s".into())
            }
        }
    }

    /// A channel to the server; it reconnects by itself after a restart.
    pub async fn channel(&self) -> Result<Channel, String> {
        Endpoint::from_shared(format!("http://{}", self.grpc))
            .map_err(|e| e.to_string())?
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .map_err(|e| format!("cannot reach the local server: {e}"))
    }

    /// SIGKILL, and wait for the process to go.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit; returns the exit code.
    pub fn stop(&mut self) -> Result<i32, String> {
        let Some(mut child) = self.child.take() else { return Err("not running".into()) };
        let pid = i32::try_from(child.id()).ok().and_then(rustix::process::Pid::from_raw);
        let pid = pid.ok_or("the server has no valid pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .map_err(|e| format!("cannot signal the server: {e}"))?;
        let exit = child.wait().map_err(|e| e.to_string())?;
        exit.code().ok_or_else(|| format!("the server ended by a signal: {exit}"))
    }

    /// The Prometheus exposition from `/metrics`.
    pub async fn scrape(&self) -> Result<String, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream =
            tokio::net::TcpStream::connect(self.metrics).await.map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.map_err(|e| e.to_string())?;
        Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
