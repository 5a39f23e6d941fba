//! A sibling service as DESIGN.md's client rules describe it: it holds a `Watch` stream, decides
//! from the last status it saw, treats safe mode as on when nothing (status or heartbeat) has
//! arrived within the staleness budget, and reconnects with backoff.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

use crate::cli::Bearer;
use crate::pb;
use crate::pb::safe_mode_service_client::SafeModeServiceClient;

/// What the sibling believes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum View {
    /// Nothing heard yet: fail closed.
    Unknown,
    /// The last status heard, within the budget.
    Live { enabled: bool, revision: u64 },
    /// Nothing heard within the budget: fail closed.
    Stale,
}

impl View {
    /// Would the sibling refuse to run work now?
    pub(super) fn blocks_work(&self) -> bool {
        !matches!(self, View::Live { enabled: false, .. })
    }
}

/// A running sibling; it stops when dropped.
pub(super) struct Sibling {
    views: Arc<Mutex<Vec<View>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sibling {
    pub(super) fn spawn(addr: SocketAddr, token: String, budget: Duration) -> Sibling {
        let views = Arc::new(Mutex::new(vec![View::Unknown]));
        let task = tokio::spawn(run(addr, token, budget, views.clone()));
        Sibling { views, task }
    }

    /// Every view the sibling has held, in order (repeats collapsed).
    pub(super) fn history(&self) -> Vec<View> {
        self.views.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub(super) fn current(&self) -> View {
        self.history().pop().unwrap_or(View::Unknown)
    }

    /// Waits until the sibling holds a view that `wanted` accepts.
    pub(super) async fn wait_for(
        &self,
        wanted: impl Fn(&View) -> bool,
        within: Duration,
    ) -> Option<View> {
        let deadline = Instant::now() + within;
        loop {
            let view = self.current();
            if wanted(&view) {
                return Some(view);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sibling {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(addr: SocketAddr, token: String, budget: Duration, views: Arc<Mutex<Vec<View>>>) {
    let set = |view: View| {
        if let Ok(mut views) = views.lock()
            && views.last() != Some(&view)
        {
            views.push(view);
        }
    };
    let Some(bearer) = Bearer::new(Some(&token)) else { return };
    let Ok(endpoint) = Endpoint::from_shared(format!("http://{addr}")) else { return };
    let endpoint = endpoint.connect_timeout(Duration::from_secs(1));
    let mut last_heard = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        if last_heard.elapsed() >= budget {
            set(View::Stale);
        }
        if let Ok(channel) = endpoint.connect().await {
            let mut client = SafeModeServiceClient::with_interceptor(channel, bearer.clone());
            if let Ok(stream) = client.watch(pb::WatchRequest {}).await {
                let mut stream = stream.into_inner();
                backoff = Duration::from_millis(100);
                loop {
                    // Past the budget the view is stale; a fresh stream then still gets a budget
                    // of its own to deliver its first message.
                    let now = Instant::now();
                    let until = if last_heard + budget <= now {
                        set(View::Stale);
                        now + budget
                    } else {
                        last_heard + budget
                    };
                    match tokio::time::timeout_at(until, stream.next()).await {
                        Ok(Some(Ok(message))) => {
                            last_heard = Instant::now();
                            if let Some(status) = message.status.filter(|_| !message.heartbeat) {
                                set(View::Live {
                                    enabled: status.enabled,
                                    revision: status.revision,
                                });
                            }
                        }
                        Err(_) => {
                            set(View::Stale);
                            break;
                        }
                        // The stream ended or broke: reconnect, holding the last view until the
                        // budget runs out.
                        Ok(_) => break,
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
