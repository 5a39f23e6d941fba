//! Micro-benchmarks of the per-event work (docs/PERFORMANCE.md): validation, the writer's
//! sealing (canonical JSON and SHA-256), start-up verification of a stored record, and JCS of a
//! pack-sized document.
//!
//! ```sh
//! cargo bench --bench micro
//! ```

use std::hint::black_box;

use brain_ops::ledger::record::{Draft, Record};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sha2::{Digest, Sha256};

/// A draft whose stored record is about 500 bytes (the smallest realistic record is about 420:
/// two 64-digit hashes, the time and every key spelled out).
fn draft() -> Draft {
    Draft::new("factory.step_completed", "factory-executor")
        .reason("x".repeat(20))
        .meta("step", "deploy")
}

fn per_event(c: &mut Criterion) {
    let sealed = Record::seal(draft(), 42, 1_790_000_000_000_000, &"0".repeat(64)).expect("seals");
    let mut group = c.benchmark_group("per_event");
    group.throughput(Throughput::Elements(1));
    group.bench_function("validate_and_redact", |b| {
        b.iter_batched(
            draft,
            |mut d| {
                d.validate().expect("valid");
                d.redact();
                d
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("seal (JCS + SHA-256)", |b| {
        b.iter_batched(
            draft,
            |d| Record::seal(d, 42, 1_790_000_000_000_000, &"0".repeat(64)).expect("seals"),
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("decode_verified (start-up check)", |b| {
        b.iter(|| Record::decode_verified(black_box(&sealed.bytes)).expect("verifies"))
    });
    group.bench_function("sha256 of the stored bytes", |b| {
        b.iter(|| Sha256::digest(black_box(&sealed.bytes)))
    });
    group.finish();
    println!("stored record: {} bytes", sealed.bytes.len());
}

fn jcs(c: &mut Criterion) {
    let record: serde_json::Value = {
        let sealed =
            Record::seal(draft(), 1, 1_790_000_000_000_000, &"0".repeat(64)).expect("seals");
        serde_json::from_slice(&sealed.bytes).expect("JSON")
    };
    let pack =
        serde_json::json!({ "events": vec![record; 1000], "format": "brain-ops-evidence-pack/1" });
    let mut group = c.benchmark_group("jcs");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("a document of 1,000 records", |b| {
        b.iter(|| serde_json_canonicalizer::to_string(black_box(&pack)).expect("canonical"))
    });
    group.finish();
}

criterion_group!(benches, per_event, jcs);
criterion_main!(benches);
