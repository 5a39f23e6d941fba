//! Limits under abuse: load is shed with RESOURCE_EXHAUSTED, never a hang or unbounded memory,
//! while the kill switch keeps answering; per-principal `Watch` limits and ingest quotas.

use std::time::{Duration, Instant};

use brain_ops::pb;
use brain_ops::pb::audit_service_client::AuditServiceClient;
use brain_ops::pb::safe_mode_service_client::SafeModeServiceClient;
use tonic::Code;

use crate::auth::{with_token, write_principals};
use crate::export_memory::rss_bytes;
use crate::helpers::{event, serve_process, spawn_app_in};

fn batch(events: usize) -> pb::RecordBatchRequest {
    pb::RecordBatchRequest {
        records: (0..events)
            .map(|i| pb::BatchRecord {
                event: Some(event("factory.step_completed", &format!("{i:0>360}"))),
                idempotency_key: String::new(),
            })
            .collect(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Many clients send `RecordBatch` as fast as they can against a server with 16 places for
/// calls in flight. Excess calls are refused quickly, memory stays bounded, and a sibling
/// calling `CheckOperation` throughout always gets its answer (its p99 is reported).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturating_ingestion_is_shed_quickly_while_the_kill_switch_stays_fast() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let server = serve_process(
        dir.path(),
        &[
            ("BRAIN_MAX_CALLS_IN_FLIGHT", "16"),
            ("BRAIN_INGEST_EVENTS_PER_SECOND", "0"),
            ("BRAIN_CACHE_MB", "8"),
            ("MALLOC_ARENA_MAX", "2"),
        ],
    );
    let pid = server.child.id();
    let channel = server.channel().await;
    let rss_before = rss_bytes(pid);
    let load_for = Duration::from_secs(6);

    // The sibling's checks run on their own thread and runtime, so that the test's own load
    // generator cannot delay them.
    // A sibling has its own connection: on a shared one its calls would queue behind the batches.
    let check_channel = server.channel().await;
    let checker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        runtime.expect("a runtime").block_on(async move {
            let mut client = SafeModeServiceClient::new(check_channel);
            let mut latencies = Vec::new();
            let started = Instant::now();
            while started.elapsed() < load_for {
                let request = pb::CheckOperationRequest {
                    kind: pb::OperationKind::Execution.into(),
                    operation: "run".into(),
                };
                let sent = Instant::now();
                let answer = client.check_operation(request).await.expect("CheckOperation answers");
                latencies.push(sent.elapsed());
                assert!(answer.into_inner().allowed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            latencies
        })
    });

    // The flooding clients run at a lower CPU priority than the server and the checker: in a
    // cluster they are other machines, here they share two cores with them. What is measured is
    // whether the server's own ingestion work holds the kill switch back.
    let flood = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| {
            rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10)
                .expect("lower this thread's priority");
        })
        .enable_all()
        .build()
        .expect("the clients' runtime");
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..48 {
        let mut client = AuditServiceClient::new(channel.clone());
        clients.spawn_on(
            async move {
                let (mut ok, mut shed, mut shed_latency) = (0u64, 0u64, Duration::ZERO);
                let request = batch(100);
                let started = Instant::now();
                while started.elapsed() < load_for {
                    let sent = Instant::now();
                    match client.record_batch(request.clone()).await {
                        Ok(_) => ok += 1,
                        Err(status) if status.code() == Code::ResourceExhausted => {
                            shed += 1;
                            shed_latency = shed_latency.max(sent.elapsed());
                            // Refused callers back off briefly, as the message asks.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(status) => {
                            panic!("only RESOURCE_EXHAUSTED may refuse a batch: {status:?}")
                        }
                    }
                }
                (ok, shed, shed_latency)
            },
            flood.handle(),
        );
    }
    let (mut accepted, mut shed) = (0u64, 0u64);
    let mut peak_rss = rss_before;
    while !clients.is_empty() {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                peak_rss = peak_rss.max(rss_bytes(pid));
            }
            Some(done) = clients.join_next() => {
                let (ok, refused, slowest) = done.expect("client task");
                assert!(slowest < Duration::from_secs(1), "a refusal took {slowest:?}");
                accepted += ok;
                shed += refused;
            }
        }
    }
    flood.shutdown_background();
    let mut latencies = checker.join().expect("the checker thread");
    latencies.sort();
    let p99 = percentile(&latencies, 0.99);
    let growth_mib = peak_rss.saturating_sub(rss_before) as f64 / (1024.0 * 1024.0);
    println!(
        "batches accepted {accepted}, shed {shed}; CheckOperation {} calls p50 {:?} p99 {p99:?}; \
         server RSS {:.1} MiB -> peak {:.1} MiB",
        latencies.len(),
        percentile(&latencies, 0.5),
        rss_before as f64 / 1048576.0,
        peak_rss as f64 / 1048576.0,
    );
    assert!(accepted > 0, "ingestion made progress");
    assert!(shed > 0, "48 clients against 16 places: some calls must be shed");
    // The 10 ms p99 target is a speed figure, measured by the benchmark suite on a release build
    // (`bench --only shed`, docs/PERFORMANCE.md). This unoptimised build on two shared cores
    // measures 7 to 10 ms; the bound here catches a kill switch that queues behind ingestion.
    assert!(p99 < Duration::from_millis(50), "CheckOperation p99 {p99:?} under the flood");
    assert!(latencies.len() > 100, "the kill switch answered throughout");
    assert!(growth_mib < 96.0, "server RSS grew {growth_mib:.1} MiB");
}

/// A secured service with three service principals and `settings` applied.
async fn secured(
    dir: &std::path::Path,
    configure: impl FnOnce(&mut brain_ops::config::Config),
) -> (crate::helpers::TestApp, std::collections::HashMap<String, String>) {
    let file = dir.join("principals.toml");
    let tokens =
        write_principals(&file, &[("svc-a", "service"), ("svc-b", "service"), ("ops", "operator")]);
    let app = spawn_app_in(&dir.join("data"), |config| {
        config.auth_file = Some(file);
        configure(config);
    })
    .await;
    (app, tokens)
}

#[tokio::test]
async fn a_principal_over_its_watch_limit_is_refused_and_others_are_not() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (app, tokens) = secured(dir.path(), |c| c.limits.max_watch_streams_per_principal = 2).await;
    let watch = |name: &str| {
        let mut client = SafeModeServiceClient::new(app.channel.clone());
        let request = with_token(pb::WatchRequest {}, Some(&tokens[name]));
        async move { client.watch(request).await }
    };
    let first = watch("svc-a").await.expect("first stream");
    let _second = watch("svc-a").await.expect("second stream");
    let refused = watch("svc-a").await.expect_err("a third is over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("svc-a"), "{}", refused.message());
    let _other = watch("svc-b").await.expect("another principal is not affected");

    // Closing a stream gives its place back once the server notices.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match watch("svc-a").await {
            Ok(_stream) => break,
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("the place never came back: {status:?}"),
        }
    }
}

#[tokio::test]
async fn a_principal_over_its_ingest_quota_is_refused_and_others_are_not() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (app, tokens) = secured(dir.path(), |c| c.limits.ingest_events_per_second = 1000).await;
    let send = |name: &str, events: usize| {
        let mut client = AuditServiceClient::new(app.channel.clone());
        let request = with_token(batch(events), Some(&tokens[name]));
        async move { client.record_batch(request).await }
    };
    send("svc-a", 1000).await.expect("a full second's worth is allowed");
    let refused = send("svc-a", 1000).await.expect_err("over the quota");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("ingest quota of 1000"), "{}", refused.message());
    send("svc-b", 1000).await.expect("another principal has its own quota");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send("svc-a", 1000).await.expect("the quota refills");
}

#[tokio::test]
async fn requests_over_the_message_size_limit_are_refused() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let huge = pb::EnableRequest { reason: "x".repeat(100 * 1024) };
    let refused = app.safe_mode().enable(huge).await.expect_err("over 64 KiB");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(!app.status().await.enabled, "nothing was decided");
}
