//! Soak: runs `brain-ops serve` as a child process under mixed load — `CheckOperation`, keyed
//! `Record`, held `Watch` streams, evidence exports and `/metrics` scrapes — for a chosen time,
//! and reports errors, latency percentiles, RSS over time and the idempotency index size.
//!
//! ```sh
//! cargo build --release && cargo run --release --example soak -- --seconds 3600
//! ```
//!
//! Exits 1 when any call failed, the server's RSS grew by more than `--max-rss-growth-mib` after
//! the warm-up, or the idempotency index outgrew what the retention window allows.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brain_ops::pb;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// How long the load runs.
    #[arg(long, default_value = "60")]
    seconds: u64,
    /// The server binary.
    #[arg(long, default_value = "target/release/brain-ops")]
    bin: PathBuf,
    /// Events per second recorded (keyed), spread over 4 clients.
    #[arg(long, default_value = "400")]
    record_rate: u64,
    /// `CheckOperation` clients, each calling back to back.
    #[arg(long, default_value = "4")]
    checkers: usize,
    /// `Watch` streams held open.
    #[arg(long, default_value = "100")]
    watchers: usize,
    /// The server's idempotency retention.
    #[arg(long, default_value = "20")]
    retention_seconds: u64,
    /// Seconds between evidence exports (0: none).
    #[arg(long, default_value = "2")]
    export_every_seconds: u64,
    /// The server's sled page cache, in MiB (its RSS levels off once the cache is full).
    #[arg(long, default_value = "16")]
    cache_mb: u64,
    /// Allowed RSS growth from the end of the warm-up to the end.
    #[arg(long, default_value = "48")]
    max_rss_growth_mib: u64,
}

/// Latencies and errors per operation.
#[derive(Default)]
struct Tally {
    latencies: BTreeMap<&'static str, Vec<Duration>>,
    errors: BTreeMap<&'static str, Vec<String>>,
}

type Shared = Arc<Mutex<Tally>>;

fn note(tally: &Shared, op: &'static str, started: Instant, outcome: Result<(), String>) {
    let mut tally = tally.lock().expect("lock");
    match outcome {
        Ok(()) => tally.latencies.entry(op).or_default().push(started.elapsed()),
        Err(e) => tally.errors.entry(op).or_default().push(e),
    }
}

struct Server {
    child: std::process::Child,
    grpc: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &Args, data: &std::path::Path) -> Server {
    let mut child = std::process::Command::new(&args.bin)
        .arg("serve")
        .env_clear()
        .env("BRAIN_GRPC_ADDR", "127.0.0.1:0")
        .env("BRAIN_METRICS_ADDR", "127.0.0.1:0")
        .env("BRAIN_DATA_DIR", data)
        .env("BRAIN_LOG_FORMAT", "json")
        .env("BRAIN_IDEMPOTENCY_RETENTION_SECONDS", args.retention_seconds.to_string())
        .env("BRAIN_CHECKPOINT_INTERVAL_SECONDS", "10")
        .env("BRAIN_CACHE_MB", args.cache_mb.to_string())
        .envs(std::env::var("MALLOC_ARENA_MAX").map(|v| ("MALLOC_ARENA_MAX", v)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", args.bin.display()));
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("piped")).lines();
    let serving = loop {
        let line = lines.next().expect("the server logs until it serves").expect("a log line");
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if entry["message"] == "brain-ops serving" {
            break entry;
        }
    };
    // Keep draining the log so that the server never blocks on it.
    std::thread::spawn(move || lines.for_each(drop));
    let addr = |key: &str| serving[key].as_str().expect("address").parse().expect("address");
    Server { grpc: addr("grpc"), metrics: addr("metrics"), child }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

async fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let request = "GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.map_err(|e| e.to_string())?;
    if !body.starts_with("HTTP/1.1 200") {
        return Err(body.lines().next().unwrap_or("").to_owned());
    }
    Ok(body)
}

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::TempDir::new().expect("temp dir");
    let server = start(&args, dir.path());
    let pid = server.child.id();
    let channel = Channel::from_shared(format!("http://{}", server.grpc))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    let tally: Shared = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();

    for c in 0..args.checkers {
        let (channel, tally) = (channel.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::safe_mode_service_client::SafeModeServiceClient::new(channel);
            while Instant::now() < deadline {
                let started = Instant::now();
                let request = pb::CheckOperationRequest {
                    kind: pb::OperationKind::Execution.into(),
                    operation: format!("soak-{c}"),
                };
                let outcome = client.check_operation(request).await;
                let outcome = outcome.map(drop).map_err(|e| e.to_string());
                note(&tally, "check_operation", started, outcome);
            }
        }));
    }
    let per_client = Duration::from_secs_f64(4.0 / args.record_rate.max(1) as f64);
    for c in 0..4 {
        let (channel, tally) = (channel.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::audit_service_client::AuditServiceClient::new(channel);
            let mut tick = tokio::time::interval(per_client);
            for n in 0u64.. {
                tick.tick().await;
                if Instant::now() >= deadline {
                    break;
                }
                let event = pb::Event {
                    event_type: "factory.step_completed".into(),
                    reason: format!("soak client {c} step {n} {}", "x".repeat(300)),
                    ..Default::default()
                };
                let request = pb::RecordRequest {
                    event: Some(event),
                    idempotency_key: format!("soak-{c}-{n}"),
                };
                let started = Instant::now();
                let outcome = client.record(request).await.map(drop).map_err(|e| e.to_string());
                note(&tally, "record", started, outcome);
            }
        }));
    }
    for _ in 0..args.watchers {
        let (channel, tally) = (channel.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::safe_mode_service_client::SafeModeServiceClient::new(channel);
            let started = Instant::now();
            let mut stream = match client.watch(pb::WatchRequest {}).await {
                Ok(s) => s.into_inner(),
                Err(e) => return note(&tally, "watch", started, Err(e.to_string())),
            };
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, stream.message()).await {
                    Err(_) => return note(&tally, "watch", started, Ok(())),
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) => return note(&tally, "watch", started, Err("ended".into())),
                    Ok(Err(e)) => return note(&tally, "watch", started, Err(e.to_string())),
                }
            }
        }));
    }
    if args.export_every_seconds > 0 {
        let every = Duration::from_secs(args.export_every_seconds);
        let (channel, tally) = (channel.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::evidence_service_client::EvidenceServiceClient::new(channel);
            while Instant::now() < deadline {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("after 1970")
                    .as_secs() as i64;
                let request = pb::ExportRequest {
                    from: Some(prost_types::Timestamp { seconds: now - 10, nanos: 0 }),
                    to: Some(prost_types::Timestamp { seconds: now + 1, nanos: 0 }),
                    scope: pb::EvidenceScope::Audit.into(),
                    exclude_executor_summary: false,
                    as_of_seq: 0,
                };
                let started = Instant::now();
                let outcome = client.export(request).await.map(drop).map_err(|e| e.to_string());
                note(&tally, "export", started, outcome);
                tokio::time::sleep(every).await;
            }
        }));
    }

    // Scrapes and RSS, once a second.
    // RSS is compared from the end of the warm-up, once sled's cache has filled.
    let warm_up = Duration::from_secs((args.seconds / 4).clamp(5, 300));
    let began = Instant::now();
    let (mut rss_after_warm_up, mut rss_max, mut keys_max) = (None, 0.0f64, 0.0f64);
    let mut rss_series = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        match scrape(server.metrics).await {
            Ok(metrics) => {
                note(&tally, "scrape", started, Ok(()));
                keys_max = keys_max.max(gauge(&metrics, "brain_idempotency_keys").unwrap_or(0.0));
            }
            Err(e) => note(&tally, "scrape", started, Err(e)),
        }
        let rss = rss_mib(pid);
        rss_max = rss_max.max(rss);
        if began.elapsed() >= warm_up && rss_after_warm_up.is_none() {
            rss_after_warm_up = Some(rss);
        }
        rss_series.push((began.elapsed().as_secs(), rss));
    }
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    }
    let rss_end = rss_mib(pid);

    let tally = tally.lock().expect("lock");
    println!("soak: {} s against {} (pid {pid})", args.seconds, args.bin.display());
    println!(
        "{:<16} {:>9} {:>7} {:>10} {:>10} {:>10}",
        "op", "calls", "errors", "p50", "p99", "max"
    );
    let mut failed = false;
    let ops: Vec<&str> = tally.latencies.keys().chain(tally.errors.keys()).copied().collect();
    let mut seen = std::collections::BTreeSet::new();
    for op in ops.into_iter().filter(|op| seen.insert(*op)) {
        let mut latencies = tally.latencies.get(op).cloned().unwrap_or_default();
        latencies.sort();
        let errors = tally.errors.get(op).map_or(0, Vec::len);
        failed |= errors > 0;
        println!(
            "{op:<16} {:>9} {errors:>7} {:>10.2?} {:>10.2?} {:>10.2?}",
            latencies.len() + errors,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies.last().copied().unwrap_or_default(),
        );
        if let Some(first) = tally.errors.get(op).and_then(|e| e.first()) {
            println!("  first {op} error: {first}");
        }
    }
    let step = (rss_series.len() / 12).max(1);
    let series: Vec<String> =
        rss_series.iter().step_by(step).map(|(t, r)| format!("{t}s:{r:.1}")).collect();
    println!("RSS MiB over time: {}", series.join(" "));
    let start = rss_after_warm_up.unwrap_or(rss_end);
    let growth = rss_end - start;
    println!(
        "RSS MiB: after warm-up {start:.1}, end {rss_end:.1}, max {rss_max:.1}, growth {growth:.1} (allowed {})",
        args.max_rss_growth_mib
    );
    // Keys live for the retention window; allow for the batch-time granularity of expiry.
    let key_bound = (args.record_rate * (args.retention_seconds + 5)) as f64 * 1.2;
    println!("idempotency keys: max {keys_max} (bound {key_bound:.0} from the retention window)");
    if growth > args.max_rss_growth_mib as f64 {
        println!("FAIL: RSS grew by {growth:.1} MiB");
        failed = true;
    }
    if keys_max > key_bound {
        println!("FAIL: the idempotency index outgrew its retention window");
        failed = true;
    }
    if failed {
        println!("FAIL");
        std::process::exit(1);
    }
    println!("PASS");
}
