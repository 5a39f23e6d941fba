//! A large INTERNAL `ExportStream` is streamed, never held whole: the server's resident memory
//! grows by far less than the pack it sends.

use std::time::Duration;

use brain_ops::ledger::record::Draft;
use brain_ops::ledger::{Ledger, LedgerOptions};
use brain_ops::pb;
use brain_ops::pb::evidence_service_client::EvidenceServiceClient;
use sha2::{Digest, Sha256};

use crate::helpers::serve_process;

const EVENTS: u64 = 150_000;
/// The server's RSS may grow by less than this share of the pack it streams (about 113 MB). A
/// server holding the pack would grow by more than the whole pack; this one grows by what sled's
/// cache fills as the export reads and by what the allocator (mimalloc) keeps for reuse rather
/// than returning at once: measured 41-46 MiB alone, more beside the rest of the suite.
/// `docs/PERFORMANCE.md` (P6) has the 1,000,000-event figure, where the growth stays near this
/// while the pack is four times larger.
const RSS_GROWTH_SHARE: f64 = 0.75;

/// Writes `EVENTS` events of about 400 bytes straight through the ledger library.
async fn populate(dir: &std::path::Path) {
    let config = brain_ops::config::Config::ephemeral(dir);
    let options = LedgerOptions {
        dir: dir.to_owned(),
        sled: config.sled.clone(),
        faults: config.faults.clone(),
        clock: config.clock.clone(),
        idempotency_retention: config.idempotency_retention,
        fail_closed: brain_ops::safe_mode::fail_closed(),
        observer: None,
    };
    let (ledger, _) =
        tokio::task::spawn_blocking(move || Ledger::open(options)).await.expect("opens");
    let reason = "r".repeat(300);
    for batch in 0..EVENTS / 1000 {
        let drafts = (0..1000)
            .map(|i| {
                Draft::new("factory.step_completed", "loader")
                    .reason(format!("{reason} {batch}-{i}"))
                    .meta("step", format!("{i}"))
            })
            .collect();
        ledger.append(drafts).await.expect("appends");
    }
    ledger.shutdown().await;
}

/// Resident set size of a process in bytes (Linux).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS");
    kib * 1024
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_150000_event_internal_export_streams_with_bounded_server_memory() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    populate(dir.path()).await;
    // A small page cache, so that reading the ledger cannot pass for the pack; one malloc arena,
    // because glibc's per-thread arenas keep freed memory resident in whichever thread freed it,
    // which would measure the allocator rather than the export.
    let server = serve_process(dir.path(), &[("BRAIN_CACHE_MB", "8"), ("MALLOC_ARENA_MAX", "1")]);
    let pid = server.child.id();
    let channel = server.channel().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid);

    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let mut stream = EvidenceServiceClient::new(channel)
        .max_decoding_message_size(16 * 1024 * 1024)
        .export_stream(pb::ExportStreamRequest {
            from: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
            to: Some(prost_types::Timestamp { seconds: 4_000_000_000, nanos: 0 }),
            scope: pb::EvidenceScope::Internal.into(),
            exclude_executor_summary: false,
            as_of_seq: 0,
        })
        .await
        .expect("streams")
        .into_inner();
    // The client keeps the whole file only to check it; the server must not.
    let mut file = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.message().await.expect("a chunk") {
        file.extend_from_slice(&chunk.data);
        chunks += 1;
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");

    let text = std::str::from_utf8(&file).expect("UTF-8");
    let split = text.rfind(",\"content_hash\":\"").expect("a content hash");
    let pack = &text["{\"pack\":".len()..split];
    let claimed = &text[split + 17..split + 17 + 71];
    assert_eq!(claimed, format!("sha256:{}", hex::encode(Sha256::digest(pack.as_bytes()))));
    assert!(pack.contains(&format!("\"events_included\":{EVENTS}")));
    let growth = peak.saturating_sub(before);
    eprintln!(
        "pack {} bytes in {chunks} chunks; server RSS {} MiB before, peak growth {} MiB",
        file.len(),
        before >> 20,
        growth >> 20
    );
    assert!(
        (growth as f64) < file.len() as f64 * RSS_GROWTH_SHARE,
        "server RSS grew by {growth} bytes streaming a pack of {} bytes",
        file.len()
    );
}
