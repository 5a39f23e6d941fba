//! How much of what sled reads stays resident: appends records through `SledStore` in batches of
//! 100 and, with `--scan`, reads the whole ledger back after every 5,000, printing RSS as it goes.
//! No gRPC, hashing or validation: storage alone, to separate sled's memory from the service's.
//!
//! ```sh
//! cargo run --release --example sled_residency -- --records 500000 --cache-mb 8 --scan
//! ```

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use brain_ops::ledger::store::{SledOptions, SledStore, Storage};
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// Records to append.
    #[arg(long, default_value = "200000")]
    records: u64,
    /// Bytes per record.
    #[arg(long, default_value = "600")]
    record_bytes: usize,
    /// sled's page cache, in MiB.
    #[arg(long, default_value = "8")]
    cache_mb: u64,
    /// Records per appended batch.
    #[arg(long, default_value = "100")]
    batch: u64,
    /// Read everything back after every 5,000 records.
    #[arg(long)]
    scan: bool,
    /// Where the store goes (emptied first); a temporary directory when absent.
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    kib / 1024
}

fn main() {
    let args = Args::parse();
    let temp = tempfile::TempDir::new().expect("a temporary directory");
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().join("ledger"));
    let _ = std::fs::remove_dir_all(&dir);
    let options = SledOptions { cache_capacity: args.cache_mb << 20 };
    let store = SledStore::open(&dir, options, Arc::default()).expect("the store opens");
    let body = vec![b'x'; args.record_bytes];
    println!("records  rss_mib  disk_mib");
    let mut seq = 0;
    while seq < args.records {
        let batch: Vec<(u64, &[u8])> =
            (1..=args.batch).map(|i| (seq + i, body.as_slice())).collect();
        store.append(&batch).expect("appends");
        let before = seq;
        seq += args.batch;
        if seq / 5_000 != before / 5_000 && args.scan {
            let mut read = 0u64;
            store
                .scan(1, seq, &mut |_, bytes| {
                    read += bytes.len() as u64;
                    ControlFlow::Continue(())
                })
                .expect("scans");
            assert_eq!(read, seq * args.record_bytes as u64);
        }
        if seq / 25_000 != before / 25_000 {
            println!("{seq:>7}  {:>7}  {:>8}", rss_mib(), store.size_on_disk() >> 20);
        }
    }
}
