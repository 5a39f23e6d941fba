//! The performance suite (docs/PERFORMANCE.md): runs `brain-ops serve` as a separate process,
//! drives it with one closed-loop load generator, and reports medians over repeated runs beside
//! two floors measured in the same run on the same machine:
//!
//! - the *tonic floor*: a bare tonic server (this binary, `floor-server`) whose `CheckOperation`
//!   handler does nothing, driven by the same generator at the same concurrency;
//! - the *storage floor*: raw sled inserts of the same record sizes in the same batch shapes and
//!   writer counts, each batch flushed and fsynced, with no gRPC, hashing or validation.
//!
//! ```sh
//! cargo build --release --examples
//! target/release/examples/bench                 # every scenario, 5 runs each
//! target/release/examples/bench --smoke         # seconds: proves the suite works (CI)
//! target/release/examples/bench --only p1,p4    # some scenarios
//! ```
//!
//! No figure is asserted: the suite measures, docs/PERFORMANCE.md records and compares.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use brain_ops::pb;
use brain_ops::pb::audit_service_client::AuditServiceClient;
use brain_ops::pb::safe_mode_service_client::SafeModeServiceClient;
use clap::Parser;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
struct Args {
    /// Runs per scenario; medians are reported.
    #[arg(long, default_value = "5")]
    repeats: usize,
    /// Seconds of load per run.
    #[arg(long, default_value = "5")]
    seconds: f64,
    /// A second of load and one run per scenario: proves the suite works, measures nothing.
    #[arg(long)]
    smoke: bool,
    /// Scenarios to run (comma-separated: p1, p1b, p2, p3, p4, p5, p5b, p6 ... p10, shed); all by
    /// default. p6 to p10 share one large ledger.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The server binary.
    #[arg(long, default_value = "target/release/brain-ops")]
    bin: PathBuf,
    /// Keep the large ledger of P6 to P10 in this directory and reuse it on later runs (the first
    /// run builds it; each run works on a copy, since P9 adds events); a scratch directory by
    /// default.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Internal: serve the tonic floor on 127.0.0.1:0 and print the address.
    #[arg(long, hide = true)]
    floor_server: bool,
}

/// A short reason: a stored record is then about 460 bytes (two 64-digit hashes, the time and
/// every key spelled out), the smallest realistic size near the targets' 400.
const REASON_BYTES: usize = 40;

/// The size of the stored record of [`event`], which the storage floor writes.
fn record_bytes() -> usize {
    let draft = brain_ops::ledger::record::Draft::new("factory.step_completed", "anonymous")
        .reason(format!("{:0>REASON_BYTES$}", 0));
    let sealed = brain_ops::ledger::record::Record::seal(
        draft,
        1_000_000,
        1_790_000_000_000_000,
        &"0".repeat(64),
    );
    sealed.map_or(460, |s| s.bytes.len())
}

fn main() {
    let mut args = Args::parse();
    if args.floor_server {
        return floor::serve();
    }
    if args.smoke {
        args.repeats = 1;
        args.seconds = 1.0;
    }
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(suite(args));
}

async fn suite(args: Args) {
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    println!("machine: {}", machine());
    println!("{} run(s) of {:.1} s per scenario; medians\n", args.repeats, args.seconds);
    let load = Duration::from_secs_f64(args.seconds);
    if wanted("p1") {
        compare_check(&args, "P1 CheckOperation allowed, 64 in flight", false, load).await;
    }
    if wanted("p1b") {
        compare_check(&args, "P1b CheckOperation blocked, 64 in flight", true, load).await;
    }
    if wanted("p3") {
        let (mut runs, mut floors) = (Vec::new(), Vec::new());
        for _ in 0..args.repeats {
            let floor = floor::Floor::start();
            floors.push(drive(floor.addr, 128, 128, load, record_call).await);
            drop(floor);
            let server = Server::start(&args.bin);
            runs.push(drive(server.grpc, 128, 128, load, record_call).await);
        }
        // The floor answers `Record` with an empty handler: what tonic and this machine allow
        // for the request shape, connections and concurrency, before any durability.
        report("P3 Record single events, 128 clients, durable", &runs, Some(&floors), "events");
    }
    if wanted("p4") {
        let (mut runs, mut floors) = (Vec::new(), Vec::new());
        for _ in 0..args.repeats {
            let dir = tempfile::TempDir::new().expect("temp dir");
            floors.push(storage_floor(dir.path(), 16, 100, load));
            let server = Server::start(&args.bin);
            let mut run = drive(server.grpc, 16, 16, load, batch_call).await;
            run.per_second *= 100.0;
            runs.push(run);
        }
        report("P4 RecordBatch of 100, 16 clients, durable", &runs, Some(&floors), "events");
    }
    if wanted("shed") {
        shed(&args, load).await;
    }
    if wanted("p2") {
        p2(&args, load).await;
    }
    if wanted("p5") {
        p5(&args).await;
    }
    if wanted("p5b") {
        p5b(&args, load).await;
    }
    if wanted("p10") {
        let server = Server::start(&args.bin);
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("P10 RSS after start, empty ledger: {:.1} MiB\n", server.rss_mib());
    }
    if ["p6", "p7", "p8", "p9", "p10"].iter().any(|p| wanted(p)) {
        large_ledger(&args, load).await;
    }
}

/// The kill switch under an ingestion flood (issue #8's bound: `CheckOperation` p99 under
/// 10 ms): 48 clients send 100-event `RecordBatch`es back to back (backing off 100 ms when
/// refused) at a server with 16 places for calls in flight, while a sibling on its own
/// connection calls `CheckOperation` every 5 ms. The baseline is the same sibling with no flood.
async fn shed(args: &Args, load: Duration) {
    let (mut flooded, mut quiet) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        let server = Server::start_with(&args.bin, &[("BRAIN_MAX_CALLS_IN_FLIGHT", "16")]);
        quiet.push(paced_checks(server.grpc, load).await);
        let until = Instant::now() + load + Duration::from_millis(400);
        let mut flood = tokio::task::JoinSet::new();
        for c in 0..48u64 {
            let channel = endpoint(server.grpc).connect_lazy();
            flood.spawn(async move {
                let (mut accepted, mut refused) = (0u64, 0u64);
                let mut n = c << 40;
                while Instant::now() < until {
                    match batch_call(channel.clone(), n).await {
                        Ok(()) => accepted += 1,
                        Err(_) => {
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    n += 1;
                }
                (accepted, refused)
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        flooded.push(paced_checks(server.grpc, load).await);
        let (mut accepted, mut refused) = (0, 0);
        while let Some(done) = flood.join_next().await {
            let (a, r) = done.expect("flood client");
            accepted += a;
            refused += r;
        }
        println!("  (flood run: {accepted} batches accepted, {refused} refused)");
    }
    report(
        "shed: CheckOperation every 5 ms under a RecordBatch flood (48 clients, 16 places); floor row: no flood",
        &flooded,
        Some(&quiet),
        "calls",
    );
}

/// One `CheckOperation` every 5 ms on a connection of its own, for `load`.
async fn paced_checks(addr: SocketAddr, load: Duration) -> Run {
    let channel = endpoint(addr).connect().await.expect("connects");
    let until = Instant::now() + load;
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let sent = Instant::now();
        check_call(channel.clone(), 0).await.expect("the kill switch answers");
        latencies.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    summarise(latencies, load)
}

/// P2: `CheckOperation` at 64 in flight while 1,000 `Watch` streams are open and `Record` load
/// runs at 5,000 events/s, against the tonic floor.
async fn p2(args: &Args, load: Duration) {
    let (mut runs, mut floors) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        floors.push(tonic_floor(load).await);
        let server = Server::start(&args.bin);
        let watchers = watch_streams(server.grpc, 1000).await;
        let until = Instant::now() + load + Duration::from_millis(400);
        let recorder = tokio::spawn(paced_records(server.grpc, 5000, until));
        runs.push(drive(server.grpc, 64, 4, load, check_call).await);
        let recorded = recorder.await.expect("recorder");
        println!("  (P2 run: {recorded} events recorded alongside, {} streams)", watchers.len());
    }
    report(
        "P2 CheckOperation, 1,000 Watch streams, Record at 5,000/s",
        &runs,
        Some(&floors),
        "calls",
    );
}

/// Opens `n` `Watch` streams over 10 connections; each task forwards what its stream receives,
/// stamped with the time it arrived.
async fn watch_streams(
    addr: SocketAddr,
    n: usize,
) -> Vec<tokio::sync::mpsc::UnboundedReceiver<(Instant, bool)>> {
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(endpoint(addr).connect().await.expect("connects"));
    }
    let mut receivers = Vec::new();
    for i in 0..n {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut client = SafeModeServiceClient::new(channels[i % channels.len()].clone());
        let mut stream = client.watch(pb::WatchRequest {}).await.expect("Watch").into_inner();
        tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                if let Some(status) = message.status.filter(|_| !message.heartbeat)
                    && tx.send((Instant::now(), status.enabled)).is_err()
                {
                    break;
                }
            }
        });
        receivers.push(rx);
    }
    // Each stream's first message is the current status.
    for rx in &mut receivers {
        rx.recv().await.expect("the current status");
    }
    receivers
}

/// Records single events at `rate` per second until `until`; returns how many were stored.
async fn paced_records(addr: SocketAddr, rate: u64, until: Instant) -> u64 {
    let tasks = 50u64;
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let channel = endpoint(addr).connect_lazy();
        set.spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(tasks as f64 / rate as f64));
            let mut stored = 0;
            for n in (t << 40).. {
                tick.tick().await;
                if Instant::now() >= until {
                    break;
                }
                stored += u64::from(record_call(channel.clone(), n).await.is_ok());
            }
            stored
        });
    }
    let mut stored = 0;
    while let Some(n) = set.join_next().await {
        stored += n.expect("recorder");
    }
    stored
}

/// P5: `Enable` until every one of 1,000 `Watch` streams has the change (and `Disable` back),
/// ten toggles per run.
async fn p5(args: &Args) {
    let mut runs = Vec::new();
    for _ in 0..args.repeats {
        let server = Server::start(&args.bin);
        let mut watchers = watch_streams(server.grpc, 1000).await;
        let mut client =
            SafeModeServiceClient::new(endpoint(server.grpc).connect().await.expect("connects"));
        let mut latencies = Vec::new();
        for toggle in 0..if args.smoke { 2 } else { 10 } {
            let enable = toggle % 2 == 0;
            let sent = Instant::now();
            let reason = "benchmark toggle".to_owned();
            if enable {
                client.enable(pb::EnableRequest { reason }).await.expect("Enable");
            } else {
                client.disable(pb::DisableRequest { reason }).await.expect("Disable");
            }
            for rx in &mut watchers {
                loop {
                    let (at, enabled) = rx.recv().await.expect("the stream runs");
                    if enabled == enable {
                        latencies.push(at - sent);
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        runs.push(summarise(latencies, Duration::from_secs(1)));
    }
    report("P5 Enable/Disable -> seen by each of 1,000 Watch streams", &runs, None, "deliveries");
}

/// P5b: `Enable`/`Disable` latency while P3's load (128 `Record` clients) runs.
async fn p5b(args: &Args, load: Duration) {
    let mut runs = Vec::new();
    for _ in 0..args.repeats {
        let server = Server::start(&args.bin);
        let background = tokio::spawn(drive(server.grpc, 128, 128, load, record_call));
        let mut client =
            SafeModeServiceClient::new(endpoint(server.grpc).connect().await.expect("connects"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let until = Instant::now() + load.saturating_sub(Duration::from_millis(300));
        let mut latencies = Vec::new();
        let mut enable = true;
        while Instant::now() < until {
            let sent = Instant::now();
            let reason = "benchmark toggle under load".to_owned();
            let answer = if enable {
                client.enable(pb::EnableRequest { reason }).await.map(drop)
            } else {
                client.disable(pb::DisableRequest { reason }).await.map(drop)
            };
            answer.expect("the kill switch answers");
            latencies.push(sent.elapsed());
            enable = !enable;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let records = background.await.expect("load");
        println!("  (P5b run: Record at {:.0} events/s alongside)", records.per_second);
        runs.push(summarise(latencies, load));
    }
    report("P5b Enable/Disable latency under P3 load", &runs, None, "toggles");
}

fn summarise(mut latencies: Vec<Duration>, over: Duration) -> Run {
    latencies.sort();
    let at = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p) as usize).copied();
    Run {
        per_second: latencies.len() as f64 / over.as_secs_f64(),
        p50: at(0.5).unwrap_or_default(),
        p99: at(0.99).unwrap_or_default(),
        errors: 0,
    }
}

/// P6-P10 on a ledger of 1,000,000 events (10,000 in smoke mode): cold start, RSS, scrapes,
/// a streamed INTERNAL export and its offline verification, bytes on disk per event.
async fn large_ledger(args: &Args, load: Duration) {
    let events: u64 = if args.smoke { 10_000 } else { 1_000_000 };
    let scratch = tempfile::TempDir::new().expect("temp dir");
    let data = args.ledger.clone().unwrap_or_else(|| scratch.path().join("data"));
    let built = Instant::now();
    let marker = data.join("bench-events");
    if std::fs::read_to_string(&marker).ok() == Some(events.to_string()) {
        println!("reusing the ledger of {events} events in {}", data.display());
    } else {
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).expect("the ledger directory");
        let server = Server::start_in(&args.bin, &data);
        let mut set = tokio::task::JoinSet::new();
        for w in 0..4u64 {
            let channel = endpoint(server.grpc).connect().await.expect("connects");
            set.spawn(async move {
                let mut client = AuditServiceClient::new(channel);
                let mut n = w * events / 4;
                while n < (w + 1) * events / 4 {
                    let records = (n..(n + 1000).min((w + 1) * events / 4))
                        .map(|i| pb::BatchRecord {
                            event: Some(event(i)),
                            idempotency_key: String::new(),
                        })
                        .collect::<Vec<_>>();
                    n += records.len() as u64;
                    client
                        .record_batch(pb::RecordBatchRequest { records })
                        .await
                        .expect("the ledger fills");
                }
            });
        }
        while let Some(done) = set.join_next().await {
            done.expect("filler");
        }
        server.terminate();
        std::fs::write(&marker, events.to_string()).expect("the ledger's marker");
    }
    let bytes = dir_bytes(&data);
    let data = if args.ledger.is_some() {
        let copy = scratch.path().join("data");
        let copied = std::process::Command::new("cp").arg("-a").arg(&data).arg(&copy).status();
        assert!(copied.is_ok_and(|s| s.success()), "the ledger copies");
        copy
    } else {
        data
    };
    println!(
        "ledger of {events} events ({:.1} s); {} bytes on disk, {:.0} bytes per event\n",
        built.elapsed().as_secs_f64(),
        bytes,
        bytes as f64 / events as f64
    );

    // P8: spawn to SERVING, the whole chain verified on the way; and P10 half a second later.
    let (mut starts, mut rss) = (Vec::new(), Vec::new());
    let server = loop {
        let started = Instant::now();
        let server = Server::start_in(&args.bin, &data);
        starts.push(started.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss.push(server.rss_mib());
        if starts.len() == args.repeats {
            break server;
        }
        server.terminate();
    };
    println!(
        "P8 cold start to SERVING ({events} events, chain verified): {:.2} s (per run {})",
        median(starts.clone()),
        listed(&starts, 2)
    );
    println!(
        "P10 RSS after start, {events} events: {:.1} MiB (per run {})",
        median(rss.clone()),
        listed(&rss, 1)
    );

    let scrapes = |n: usize| {
        let addr = server.metrics;
        async move {
            // One connection kept open, as Prometheus keeps its connection to a target.
            let mut connection = tokio::io::BufReader::new(
                tokio::net::TcpStream::connect(addr).await.expect("metrics port"),
            );
            let mut latencies = Vec::new();
            for _ in 0..n {
                let sent = Instant::now();
                scrape(&mut connection).await;
                latencies.push(sent.elapsed());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            summarise(latencies, Duration::from_secs(1))
        }
    };
    let idle = scrapes(if args.smoke { 20 } else { 500 }).await;
    println!(
        "P9 /metrics scrape, idle: p50 {:.2} ms, p99 {:.2} ms",
        idle.p50.as_secs_f64() * 1e3,
        idle.p99.as_secs_f64() * 1e3
    );

    let key = scratch.path().join("key.pub");
    let mut evidence = brain_ops::pb::evidence_service_client::EvidenceServiceClient::new(
        endpoint(server.grpc).connect().await.expect("connects"),
    );
    let keys = evidence.get_public_keys(pb::GetPublicKeysRequest {}).await.expect("keys");
    let current = keys.into_inner().keys.into_iter().find(|k| !k.retired).expect("a current key");
    std::fs::write(&key, current.public_key).expect("key file");
    let pack = scratch.path().join("pack.json");
    let (mut exports, mut growths, mut verifies, mut verify_rss) = (vec![], vec![], vec![], vec![]);
    for _ in 0..args.repeats {
        let (took, growth) = p6(&server, &pack, events).await;
        exports.push(took);
        growths.push(growth);
        let (took, peak) = p7(&args.bin, &pack, &key);
        verifies.push(took);
        verify_rss.push(peak);
    }
    println!(
        "P6 INTERNAL ExportStream of {events} events: {:.2} s, server RSS growth {:.1} MiB (per run {}; {})",
        median(exports.clone()),
        median(growths.clone()),
        listed(&exports, 2),
        listed(&growths, 1)
    );
    println!(
        "P7 offline evidence verify: {:.2} s, peak RSS {:.1} MiB (at least) (per run {}; {})",
        median(verifies.clone()),
        median(verify_rss.clone()),
        listed(&verifies, 2),
        listed(&verify_rss, 1)
    );

    // P9 under P3's load.
    let background = tokio::spawn(drive(server.grpc, 128, 128, load, record_call));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy = scrapes(if args.smoke { 20 } else { (load.as_millis() / 15) as usize }).await;
    let records = background.await.expect("load");
    println!(
        "P9 /metrics scrape under Record load ({:.0} events/s): p50 {:.2} ms, p99 {:.2} ms\n",
        records.per_second,
        busy.p50.as_secs_f64() * 1e3,
        busy.p99.as_secs_f64() * 1e3
    );
}

fn listed(values: &[f64], decimals: usize) -> String {
    values.iter().map(|v| format!("{v:.decimals$}")).collect::<Vec<_>>().join(" ")
}

/// P6: a streamed INTERNAL pack of every event, with the server's RSS sampled meanwhile:
/// (seconds, RSS growth in MiB).
async fn p6(server: &Server, pack: &Path, events: u64) -> (f64, f64) {
    let rss_before = server.rss_mib();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (pid, sampling) = (server.child.id(), sampling.clone());
        std::thread::spawn(move || {
            let mut peak = 0f64;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_mib(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let started = Instant::now();
    let bytes = export_stream(server.grpc, pack).await;
    let took = started.elapsed();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    println!(
        "  (P6 run: {events} events, {bytes} bytes; server RSS {rss_before:.1} -> peak {peak:.1} MiB)"
    );
    (took.as_secs_f64(), peak - rss_before)
}

/// P7: the offline verifier, as a third party would run it: (seconds, peak RSS in MiB).
fn p7(bin: &Path, pack: &Path, key: &Path) -> (f64, f64) {
    let started = Instant::now();
    let mut verifier = std::process::Command::new(bin)
        .args(["evidence", "verify"])
        .arg(pack)
        .arg("--public-key")
        .arg(key)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the verifier runs");
    let mut peak = 0f64;
    let status = loop {
        if let Some(status) = verifier.try_wait().expect("wait") {
            break status;
        }
        peak = peak.max(hwm_mib(verifier.id()));
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "the pack verifies");
    (started.elapsed().as_secs_f64(), peak)
}

async fn export_stream(addr: SocketAddr, out: &Path) -> u64 {
    use std::io::Write;
    let mut client = brain_ops::pb::evidence_service_client::EvidenceServiceClient::new(
        endpoint(addr).connect().await.expect("connects"),
    );
    let request = pb::ExportStreamRequest {
        from: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
        to: Some(prost_types::Timestamp { seconds: 4_102_444_800, nanos: 0 }),
        scope: pb::EvidenceScope::Internal.into(),
        ..Default::default()
    };
    let mut stream = client.export_stream(request).await.expect("ExportStream").into_inner();
    let mut file = std::io::BufWriter::new(std::fs::File::create(out).expect("pack file"));
    let mut bytes = 0u64;
    while let Some(chunk) = stream.message().await.expect("chunks") {
        bytes += chunk.data.len() as u64;
        file.write_all(&chunk.data).expect("write");
    }
    file.flush().expect("flush");
    bytes
}

/// One `GET /metrics` on a kept-alive HTTP/1.1 connection, read to the end of its body.
async fn scrape(connection: &mut tokio::io::BufReader<tokio::net::TcpStream>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let request = "GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n";
    connection.get_mut().write_all(request.as_bytes()).await.expect("request");
    let (mut line, mut length) = (String::new(), None);
    connection.read_line(&mut line).await.expect("status line");
    assert!(line.starts_with("HTTP/1.1 200"), "the scrape succeeds: {line}");
    loop {
        line.clear();
        connection.read_line(&mut line).await.expect("a header");
        let header = line.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(value) = header.strip_prefix("content-length:") {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let mut body = vec![0; length.expect("a Content-Length")];
    connection.read_exact(&mut body).await.expect("the body");
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Peak RSS so far (VmHWM) of a running process.
fn hwm_mib(pid: u32) -> f64 {
    proc_status_kib(pid, "VmHWM:") / 1024.0
}

/// One run of the tonic floor: `CheckOperation` at 64 in flight over 4 connections.
async fn tonic_floor(load: Duration) -> Run {
    let floor = floor::Floor::start();
    drive(floor.addr, 64, 4, load, check_call).await
}

/// P1/P1b: brain-ops against the tonic floor, alternating, same generator and concurrency.
async fn compare_check(args: &Args, title: &str, blocked: bool, load: Duration) {
    let (mut runs, mut floors) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        floors.push(tonic_floor(load).await);
        let server = Server::start(&args.bin);
        if blocked {
            let channel = endpoint(server.grpc).connect().await.expect("connects");
            let mut client = SafeModeServiceClient::new(channel);
            let reason = "benchmark: blocked CheckOperation".to_owned();
            client.enable(pb::EnableRequest { reason }).await.expect("Enable");
        }
        runs.push(drive(server.grpc, 64, 4, load, check_call).await);
    }
    report(title, &runs, Some(&floors), "calls");
}

/// One closed-loop run's result.
#[derive(Clone, Debug, Default)]
struct Run {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

type BoxCall = std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;
type Call = fn(Channel, u64) -> BoxCall;

fn check_call(channel: Channel, _n: u64) -> BoxCall {
    Box::pin(async move {
        let request = pb::CheckOperationRequest {
            kind: pb::OperationKind::Execution.into(),
            operation: "bench".into(),
        };
        SafeModeServiceClient::new(channel).check_operation(request).await.map(drop)
    })
}

fn event(n: u64) -> pb::Event {
    pb::Event {
        event_type: "factory.step_completed".into(),
        reason: format!("{n:0>REASON_BYTES$}"),
        ..Default::default()
    }
}

fn record_call(channel: Channel, n: u64) -> BoxCall {
    Box::pin(async move {
        let request = pb::RecordRequest { event: Some(event(n)), idempotency_key: String::new() };
        AuditServiceClient::new(channel).record(request).await.map(drop)
    })
}

fn batch_call(channel: Channel, n: u64) -> BoxCall {
    Box::pin(async move {
        let records = (0..100)
            .map(|i| pb::BatchRecord {
                event: Some(event(n * 100 + i)),
                idempotency_key: String::new(),
            })
            .collect();
        AuditServiceClient::new(channel)
            .record_batch(pb::RecordBatchRequest { records })
            .await
            .map(drop)
    })
}

/// `in_flight` workers call back to back over `connections` HTTP/2 connections for `load`.
async fn drive(
    addr: SocketAddr,
    in_flight: usize,
    connections: usize,
    load: Duration,
    call: Call,
) -> Run {
    let endpoint = endpoint(addr);
    let mut channels = Vec::new();
    while channels.len() < connections {
        channels.push(endpoint.connect().await.expect("connects"));
    }
    // A short warm-up, not measured.
    let warm = Instant::now() + Duration::from_millis(200);
    let started = Instant::now() + Duration::from_millis(200);
    let until = started + load;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..in_flight {
        let channel = channels[w % channels.len()].clone();
        workers.spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            let mut n = (w as u64) << 40;
            while Instant::now() < warm {
                let _ = call(channel.clone(), n).await;
                n += 1;
            }
            while Instant::now() < until {
                let sent = Instant::now();
                match call(channel.clone(), n).await {
                    Ok(()) => latencies.push(sent.elapsed()),
                    Err(_) => errors += 1,
                }
                n += 1;
            }
            (latencies, errors)
        });
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    while let Some(done) = workers.join_next().await {
        let (l, e) = done.expect("worker");
        latencies.extend(l);
        errors += e;
    }
    Run { errors, ..summarise(latencies, load) }
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}")).expect("uri")
}

/// `writers` threads each append batches of `batch` records to one sled tree, flushing and
/// fsyncing after every batch, for `load`; returns records per second.
fn storage_floor(dir: &Path, writers: usize, batch: u64, load: Duration) -> Run {
    let db = sled::Config::new()
        .path(dir)
        // As the ledger store: an 8 MiB segment, an explicit cache, no background flusher.
        .segment_size(8 << 20)
        .cache_capacity(64 << 20)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()
        .expect("sled opens");
    let tree = db.open_tree("events").expect("tree");
    let log = Arc::new(std::fs::File::options().write(true).open(dir.join("db")).expect("log"));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let value = vec![b'x'; record_bytes()];
    let until = Instant::now() + load;
    let handles: Vec<_> = (0..writers)
        .map(|_| {
            let (db, tree, log, next, value) =
                (db.clone(), tree.clone(), log.clone(), next.clone(), value.clone());
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    let sent = Instant::now();
                    let first = next.fetch_add(batch, std::sync::atomic::Ordering::Relaxed);
                    let mut writes = sled::Batch::default();
                    for seq in first..first + batch {
                        writes.insert(&seq.to_be_bytes(), value.as_slice());
                    }
                    tree.apply_batch(writes).expect("insert");
                    db.flush().expect("flush");
                    log.sync_data().expect("fsync");
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let latencies: Vec<Duration> =
        handles.into_iter().flat_map(|h| h.join().expect("writer")).collect();
    let mut run = summarise(latencies, load);
    run.per_second *= batch as f64;
    run
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn report(title: &str, runs: &[Run], floors: Option<&[Run]>, unit: &str) {
    let rate = median(runs.iter().map(|r| r.per_second).collect());
    let p50 = median(runs.iter().map(|r| r.p50.as_secs_f64() * 1e3).collect());
    let p99 = median(runs.iter().map(|r| r.p99.as_secs_f64() * 1e3).collect());
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    println!("{title}");
    println!(
        "  brain-ops  {rate:>10.0} {unit}/s  p50 {p50:>7.2} ms  p99 {p99:>7.2} ms  errors {errors}"
    );
    if let Some(floors) = floors {
        let f_rate = median(floors.iter().map(|r| r.per_second).collect());
        let f_p50 = median(floors.iter().map(|r| r.p50.as_secs_f64() * 1e3).collect());
        let f_p99 = median(floors.iter().map(|r| r.p99.as_secs_f64() * 1e3).collect());
        println!("  floor      {f_rate:>10.0} {unit}/s  p50 {f_p50:>7.2} ms  p99 {f_p99:>7.2} ms");
        println!(
            "  ratio      {:.2} x floor throughput, p99 {:.2} x floor p99",
            rate / f_rate.max(f64::MIN_POSITIVE),
            p99 / f_p99.max(f64::MIN_POSITIVE)
        );
    }
    println!(
        "  per run    {}",
        runs.iter().map(|r| format!("{:.0}", r.per_second)).collect::<Vec<_>>().join(" ")
    );
    println!();
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs, {model}")
}

/// A `brain-ops serve` child on a scratch directory, killed on drop.
struct Server {
    child: std::process::Child,
    grpc: SocketAddr,
    metrics: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// On a scratch directory of its own.
    fn start(bin: &Path) -> Server {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let mut server = Server::start_in(bin, dir.path());
        server._dir = Some(dir);
        server
    }

    /// On a scratch directory, with extra settings.
    fn start_with(bin: &Path, env: &[(&str, &str)]) -> Server {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let mut server = Server::start_in_with(bin, dir.path(), env);
        server._dir = Some(dir);
        server
    }

    fn start_in(bin: &Path, dir: &Path) -> Server {
        Server::start_in_with(bin, dir, &[])
    }

    fn start_in_with(bin: &Path, dir: &Path, env: &[(&str, &str)]) -> Server {
        let mut child = std::process::Command::new(bin)
            .arg("serve")
            .env_clear()
            .env("BRAIN_GRPC_ADDR", "127.0.0.1:0")
            .env("BRAIN_METRICS_ADDR", "127.0.0.1:0")
            .env("BRAIN_DATA_DIR", dir)
            .env("BRAIN_LOG_FORMAT", "json")
            // The bench measures throughput; the per-principal quota would cap it.
            .env("BRAIN_INGEST_EVENTS_PER_SECOND", "0")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {}: {e} (cargo build --release)", bin.display())
            });
        let mut lines = std::io::BufReader::new(child.stderr.take().expect("piped")).lines();
        let serving = loop {
            let line = lines.next().expect("the server logs until it serves").expect("a log line");
            let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if entry["message"] == "brain-ops serving" {
                break entry;
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        let addr = |key: &str| serving[key].as_str().expect("address").parse().expect("address");
        Server { grpc: addr("grpc"), metrics: addr("metrics"), child, _dir: None }
    }

    /// SIGTERM, and wait for the clean shutdown (final checkpoint included).
    fn terminate(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let status = self.child.wait().expect("the server exits");
        assert!(status.success(), "the server shut down cleanly: {status}");
    }

    fn rss_mib(&self) -> f64 {
        rss_mib(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_mib(pid: u32) -> f64 {
    proc_status_kib(pid, "VmRSS:") / 1024.0
}

fn proc_status_kib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

/// The tonic floor: the same service and request shape, a handler that does nothing.
mod floor {
    use super::*;
    use brain_ops::pb::audit_service_server::{AuditService, AuditServiceServer};
    use brain_ops::pb::safe_mode_service_server::{SafeModeService, SafeModeServiceServer};

    struct Empty;

    #[tonic::async_trait]
    impl AuditService for Empty {
        async fn record(
            &self,
            _: tonic::Request<pb::RecordRequest>,
        ) -> Result<tonic::Response<pb::RecordResponse>, tonic::Status> {
            Ok(tonic::Response::new(pb::RecordResponse::default()))
        }
    }

    #[tonic::async_trait]
    impl SafeModeService for Empty {
        async fn check_operation(
            &self,
            _: tonic::Request<pb::CheckOperationRequest>,
        ) -> Result<tonic::Response<pb::CheckOperationResponse>, tonic::Status> {
            Ok(tonic::Response::new(pb::CheckOperationResponse::default()))
        }
    }

    /// Runs in its own process (this binary with `--floor-server`), as brain-ops does.
    pub(super) fn serve() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
            println!("{}", listener.local_addr().expect("address"));
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tonic::transport::Server::builder()
                .add_service(SafeModeServiceServer::new(Empty))
                .add_service(AuditServiceServer::new(Empty))
                .serve_with_incoming(incoming)
                .await
                .expect("serves");
        });
    }

    pub(super) struct Floor {
        child: std::process::Child,
        pub(super) addr: SocketAddr,
    }

    impl Floor {
        pub(super) fn start() -> Floor {
            let exe = std::env::current_exe().expect("this binary");
            let mut child = std::process::Command::new(exe)
                .arg("--floor-server")
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("the floor starts");
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().expect("piped"))
                .read_line(&mut line)
                .expect("the floor prints its address");
            Floor { child, addr: line.trim().parse().expect("address") }
        }
    }

    impl Drop for Floor {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
