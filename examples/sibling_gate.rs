//! How a sibling service gates its work on brain-ops safe mode (the client contract of
//! docs/SAFE_MODE.md): hold a `Watch` stream, decide from the last message seen, treat safe mode
//! as ON when no message (status or heartbeat) arrived within the staleness budget, and
//! reconnect with backoff. One-shot callers use `CheckOperation` with a deadline and treat any
//! error as blocked.
//!
//! Run against a live server: `cargo run --example sibling_gate -- http://127.0.0.1:50051`

use std::time::Duration;

use brain_ops::pb;
use brain_ops::pb::safe_mode_service_client::SafeModeServiceClient;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

/// Longer than a restart of brain-ops, so a restart alone does not stop the platform.
const STALENESS_BUDGET: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The last status seen, and when.
type Seen = Option<(Instant, bool)>;

/// The decision every execution, deployment and bundle load must pass.
fn may_run(seen: &Seen) -> bool {
    match seen {
        Some((at, safe_mode_on)) => at.elapsed() < STALENESS_BUDGET && !safe_mode_on,
        // Never heard from brain-ops: fail closed.
        None => false,
    }
}

/// Keeps `seen` current for as long as the process runs.
async fn follow(server: String, seen: watch::Sender<Seen>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match Endpoint::from_shared(server.clone()) {
            Ok(endpoint) => {
                if let Ok(channel) =
                    endpoint.connect_timeout(Duration::from_secs(5)).connect().await
                    // A server that accepts the connection but never answers must not hold the
                    // follower here: the call gets the budget too.
                    && let Ok(Ok(response)) = tokio::time::timeout(
                        STALENESS_BUDGET,
                        SafeModeServiceClient::new(channel).watch(pb::WatchRequest {}),
                    )
                    .await
                {
                    backoff = Duration::from_millis(100);
                    let mut stream = response.into_inner();
                    // A message within the budget keeps the status fresh; silence ends the stream.
                    while let Ok(Some(Ok(message))) =
                        tokio::time::timeout(STALENESS_BUDGET, stream.next()).await
                    {
                        let on = message.status.is_none_or(|s| s.enabled);
                        seen.send_replace(Some((Instant::now(), on)));
                    }
                }
            }
            Err(e) => eprintln!("bad server address: {e}"),
        }
        // The status ages out by itself: once it is older than the budget, may_run says no.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A one-shot check: anything but an explicit "allowed" is a no.
async fn check_once(server: &str, kind: pb::OperationKind, operation: &str) -> bool {
    let call = async {
        let mut client = SafeModeServiceClient::connect(server.to_owned()).await.ok()?;
        let request = pb::CheckOperationRequest { kind: kind.into(), operation: operation.into() };
        client.check_operation(request).await.ok().map(|r| r.into_inner().allowed)
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), call).await, Ok(Some(true)))
}

#[tokio::main]
async fn main() {
    let server = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let (tx, rx) = watch::channel(None);
    tokio::spawn(follow(server.clone(), tx));
    let one_shot = check_once(&server, pb::OperationKind::Deployment, "deploy api v2").await;
    println!("one-shot check: deployment allowed = {one_shot}");
    loop {
        println!("may run: {}", may_run(&rx.borrow()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
