//! Crash harness: `brain-ops serve` as a child process under concurrent `RecordBatch`, keyed
//! `Record` and `Enable`/`Disable` load, SIGKILLed at random moments and restarted on the same
//! data directory. After every restart: every acknowledged event is there with the same seq and
//! hash, seqs are gapless, the chain verifies, safe mode equals the last change on record (never
//! older than the last acknowledged one), idempotent retries answer the original, and the served
//! projections equal a fold of the ledger.
//!
//! CI runs 20 cycles. A long run: `BRAIN_CRASH_CYCLES=500 cargo test --release --test it crash --
//! --nocapture` (`BRAIN_CRASH_SEED` replays a run).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brain_ops::ledger::record::Record;
use brain_ops::pb;
use brain_ops::pb::audit_service_client::AuditServiceClient;
use brain_ops::pb::safe_mode_service_client::SafeModeServiceClient;
use brain_ops::state::State;
use tonic::transport::Channel;

use crate::helpers::{list_all, serve_process};

/// A small deterministic generator (xorshift64*), so that a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A keyed `Record` and what it was answered, if it was.
#[derive(Clone, Debug)]
struct Keyed {
    key: String,
    event: pb::Event,
    answer: Option<(u64, String)>,
}

/// Everything the clients were told, across all cycles.
#[derive(Default)]
pub(crate) struct Acks {
    /// seq → hash of every acknowledged event.
    pub(crate) events: BTreeMap<u64, String>,
    keyed: Vec<Keyed>,
    /// Revision of the newest acknowledged safe-mode change.
    safe_mode_revision: u64,
}

fn event(rng: &mut Rng, client: usize, n: usize) -> pb::Event {
    let kinds = [
        "factory.step_completed",
        "factory.step_failed",
        "sovereign.bundle_quarantined",
        "sovereign.bundle_released",
        "sovereign.mode_changed",
    ];
    let kind = kinds[rng.below(kinds.len() as u64) as usize];
    let mut event = pb::Event {
        event_type: kind.into(),
        reason: format!("client {client} event {n} {}", "x".repeat(rng.below(300) as usize)),
        bundle_id: format!("bundle-{}", rng.below(4)),
        ..Default::default()
    };
    if kind == "sovereign.mode_changed" {
        event.mode_before = (rng.below(4) as i32) + 1;
        event.mode_after = (rng.below(4) as i32) + 1;
    }
    event
}

/// Drives load until the server goes away; returns what was acknowledged.
pub(crate) async fn batch_client(
    channel: Channel,
    seed: u64,
    client: usize,
    acks: Arc<Mutex<Acks>>,
) {
    let mut rng = Rng(seed);
    let mut audit = AuditServiceClient::new(channel);
    for n in 0.. {
        let size = 1 + rng.below(20) as usize;
        let records = (0..size)
            .map(|i| pb::BatchRecord {
                event: Some(event(&mut rng, client, n * 100 + i)),
                idempotency_key: String::new(),
            })
            .collect();
        let Ok(answer) = audit.record_batch(pb::RecordBatchRequest { records }).await else {
            return;
        };
        let mut acks = acks.lock().expect("lock");
        for result in answer.into_inner().results {
            acks.events.insert(result.seq, result.hash);
        }
    }
}

async fn keyed_client(channel: Channel, seed: u64, client: usize, acks: Arc<Mutex<Acks>>) {
    let mut rng = Rng(seed);
    let mut audit = AuditServiceClient::new(channel);
    for n in 0.. {
        let key = format!("k-{seed}-{client}-{n}");
        let event = event(&mut rng, client, n);
        let request =
            pb::RecordRequest { event: Some(event.clone()), idempotency_key: key.clone() };
        let answer = audit.record(request).await.ok().map(|r| r.into_inner());
        let answered = answer.as_ref().map(|a| (a.seq, a.hash.clone()));
        let mut acks = acks.lock().expect("lock");
        if let Some((seq, hash)) = &answered {
            acks.events.insert(*seq, hash.clone());
        }
        acks.keyed.push(Keyed { key, event, answer: answered.clone() });
        if answered.is_none() {
            return;
        }
    }
}

async fn toggler(channel: Channel, acks: Arc<Mutex<Acks>>) {
    let mut safe_mode = SafeModeServiceClient::new(channel);
    for n in 0u64.. {
        let status = if n % 2 == 0 {
            let request = pb::EnableRequest { reason: format!("crash drill {n}") };
            safe_mode.enable(request).await.map(|r| r.into_inner().status)
        } else {
            let request = pb::DisableRequest { reason: format!("crash drill {n}") };
            safe_mode.disable(request).await.map(|r| r.into_inner().status)
        };
        let Ok(Some(status)) = status else { return };
        let mut acks = acks.lock().expect("lock");
        acks.safe_mode_revision = acks.safe_mode_revision.max(status.revision);
    }
}

/// Every check after a restart.
async fn check_recovered(channel: &Channel, acks: &mut Acks) {
    let mut audit = AuditServiceClient::new(channel.clone());
    let listed = list_all(&mut audit, pb::AuditServiceListRequest::default()).await;
    let records: Vec<Record> = listed
        .iter()
        .map(|e| serde_json::from_str(&e.record_json).expect("a stored record"))
        .collect();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.seq, i as u64 + 1, "seqs are gapless");
    }
    let stored: HashMap<u64, &str> = records.iter().map(|r| (r.seq, r.hash.as_str())).collect();
    for (seq, hash) in &acks.events {
        assert_eq!(stored.get(seq).copied(), Some(hash.as_str()), "acknowledged seq {seq} lost");
    }
    let chain =
        audit.verify_chain(pb::VerifyChainRequest::default()).await.expect("verifies").into_inner();
    assert!(chain.valid, "{chain:?}");

    // Safe mode is what the newest change on record says, and no older than the newest ack.
    let status = SafeModeServiceClient::new(channel.clone())
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .status
        .expect("set");
    let last_change = records.iter().rev().find(|r| {
        r.event_type == "system.safe_mode_enabled" || r.event_type == "system.safe_mode_disabled"
    });
    if let Some(change) = last_change {
        assert_eq!(status.revision, change.seq);
        assert_eq!(status.enabled, change.event_type == "system.safe_mode_enabled");
    }
    assert!(status.revision >= acks.safe_mode_revision, "an acknowledged change was lost");

    // Retries answer the original; one in flight at the kill lands at most once.
    let keyed = std::mem::take(&mut acks.keyed);
    for k in keyed {
        let request =
            pb::RecordRequest { event: Some(k.event.clone()), idempotency_key: k.key.clone() };
        let again = audit.record(request).await.expect("a retry is answered").into_inner();
        match &k.answer {
            Some((seq, hash)) => {
                assert_eq!((again.seq, &again.hash, again.duplicate), (*seq, hash, true));
            }
            None => {
                acks.events.insert(again.seq, again.hash.clone());
            }
        }
    }
    let listed = list_all(&mut audit, pb::AuditServiceListRequest::default()).await;
    let mut keys = HashMap::new();
    let mut state = State::default();
    for event in &listed {
        let record: Record = serde_json::from_str(&event.record_json).expect("a stored record");
        if let Some(key) = &record.idempotency_key {
            assert!(keys.insert(key.clone(), record.seq).is_none(), "key {key} stored twice");
        }
        state.apply(&record);
    }

    // The served projections equal a fold of the ledger.
    let summary = pb::metrics_service_client::MetricsServiceClient::new(channel.clone())
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("summary")
        .into_inner();
    let folded = brain_ops::metrics::Summary::of(
        &state,
        Duration::ZERO,
        chrono::Utc::now().timestamp_micros(),
    );
    assert_eq!(summary.ledger_head_seq, folded.ledger_head_seq);
    assert_eq!(summary.safe_mode, folded.safe_mode);
    assert_eq!(summary.mode_switches, folded.mode_switches);
    assert_eq!(summary.quarantines, folded.quarantines);
    assert_eq!(summary.executor_failures, folded.executor_failures);
    assert_eq!(
        summary.last_success.map(|t| t.seconds),
        folded.last_success_micros.map(|m| m.div_euclid(1_000_000))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_sigkill_at_random_moments() {
    let cycles: usize =
        std::env::var("BRAIN_CRASH_CYCLES").ok().and_then(|c| c.parse().ok()).unwrap_or(20);
    let seed =
        std::env::var("BRAIN_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("crash harness: {cycles} cycles, BRAIN_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::TempDir::new().expect("temp dir");
    let mut acks = Acks::default();
    for cycle in 0..=cycles {
        let mut server = serve_process(dir.path(), &[]);
        let channel = server.channel().await;
        check_recovered(&channel, &mut acks).await;
        if cycle == cycles {
            break;
        }
        let shared = Arc::new(Mutex::new(std::mem::take(&mut acks)));
        let mut load = Vec::new();
        for client in 0..3 {
            let task = batch_client(channel.clone(), rng.next() | 1, client, shared.clone());
            load.push(tokio::spawn(task));
        }
        for client in 3..5 {
            let task = keyed_client(channel.clone(), rng.next() | 1, client, shared.clone());
            load.push(tokio::spawn(task));
        }
        load.push(tokio::spawn(toggler(channel.clone(), shared.clone())));
        tokio::time::sleep(Duration::from_millis(20 + rng.below(400))).await;
        server.child.kill().expect("SIGKILL");
        server.wait();
        for task in load {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("clients notice the kill")
                .expect("client task");
        }
        acks = Arc::try_unwrap(shared).ok().expect("sole owner").into_inner().expect("lock");
        eprintln!("cycle {cycle}: {} events acknowledged so far", acks.events.len());
    }
    assert!(acks.events.len() > cycles, "the load acknowledged events");
}
