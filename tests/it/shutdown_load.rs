//! SIGTERM under load: clients stream `RecordBatch` and hold `Watch` streams. Everything
//! acknowledged is durable, the streams end with a clear status, the process exits within the
//! drain deadline, and a final checkpoint covers the last event.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brain_ops::ledger::record::Record;
use brain_ops::pb;
use brain_ops::pb::safe_mode_service_client::SafeModeServiceClient;

use crate::crash::{Acks, batch_client};
use crate::helpers::{list_all, serve_process};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_keeps_every_ack_ends_streams_clearly_and_checkpoints() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let drain = Duration::from_secs(5);
    let mut server = serve_process(dir.path(), &[("BRAIN_DRAIN_TIMEOUT_SECONDS", "5")]);
    let channel = server.channel().await;

    let acks = Arc::new(Mutex::new(Acks::default()));
    let writers: Vec<_> = (0..4)
        .map(|client| {
            tokio::spawn(batch_client(channel.clone(), 7 + client as u64, client, acks.clone()))
        })
        .collect();
    let mut watchers = Vec::new();
    for _ in 0..8 {
        let mut stream = SafeModeServiceClient::new(channel.clone())
            .watch(pb::WatchRequest {})
            .await
            .expect("watches")
            .into_inner();
        watchers.push(tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return None,
                    Err(status) => return Some(status),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let signalled = Instant::now();
    server.terminate();
    assert_eq!(server.wait(), Some(0), "a clean exit");
    let took = signalled.elapsed();
    assert!(took < drain + Duration::from_secs(3), "exit took {took:?}");
    for watcher in watchers {
        let ended = tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the stream ends")
            .expect("watcher task")
            .expect("a Watch stream ends with a status, not silently");
        assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
        assert!(ended.message().contains("shutting down"), "{ended:?}");
    }
    for writer in writers {
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("writers notice")
            .expect("writer task");
    }

    let server = serve_process(dir.path(), &[]);
    let mut audit = pb::audit_service_client::AuditServiceClient::new(server.channel().await);
    let records: Vec<Record> = list_all(&mut audit, pb::AuditServiceListRequest::default())
        .await
        .iter()
        .map(|e| serde_json::from_str(&e.record_json).expect("a record"))
        .collect();
    let acks = acks.lock().expect("lock");
    assert!(acks.events.len() > 10, "the load was acknowledged");
    for (seq, hash) in &acks.events {
        let stored = records.get(*seq as usize - 1).map(|r| r.hash.as_str());
        assert_eq!(stored, Some(hash.as_str()), "acknowledged seq {seq} is durable");
    }
    let last = records.last().expect("events");
    assert_eq!(last.event_type, "system.checkpoint", "the final event is the shutdown checkpoint");
    assert_eq!(last.metadata["head_seq"], (last.seq - 1).to_string());
}
