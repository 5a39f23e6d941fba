//! Executable incident drills. Each scenario plays the siblings' and operators' parts over gRPC
//! and checks what the audit trail, the metrics and the evidence packs say. The same code runs
//! as an integration test (against a server the test starts) and as `brain-ops drill run`
//! (against a live deployment, or a server it starts itself with `--local`).
//!
//! Every event a drill records carries metadata `drill=true` and `drill_id`; events the service
//! writes in answer name the drill id in their reason where the RPC takes one. A drill leaves its
//! target as it found it: it thaws only a freeze it made, and releases the bundle it quarantined.

mod local;
mod scenarios;
mod sibling;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cli::Bearer;
use crate::pb;
use crate::pb::audit_service_client::AuditServiceClient;
use crate::pb::evidence_service_client::EvidenceServiceClient;
use crate::pb::metrics_service_client::MetricsServiceClient;
use crate::pb::override_service_client::OverrideServiceClient;
use crate::pb::safe_mode_service_client::SafeModeServiceClient;

pub use local::LocalServer;

/// The incident scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The bundle manager quarantines a bundle whose hash does not match.
    InvalidBundle,
    /// An executor step times out mid-deployment and is rolled back.
    ExecutorCrash,
    /// During a freeze, services try to lift it, reuse and stretch overrides, and force a mode
    /// change without one.
    OverrideAbuse,
    /// A stored record is edited while the service is down (local only).
    TamperedLog,
    /// The control plane is killed right after a freeze (local only).
    KilledDuringFreeze,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::InvalidBundle,
        Scenario::ExecutorCrash,
        Scenario::OverrideAbuse,
        Scenario::TamperedLog,
        Scenario::KilledDuringFreeze,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::InvalidBundle => "invalid-bundle",
            Scenario::ExecutorCrash => "executor-crash",
            Scenario::OverrideAbuse => "override-abuse",
            Scenario::TamperedLog => "tampered-log",
            Scenario::KilledDuringFreeze => "killed-during-freeze",
        }
    }

    /// Drills that edit the data directory or kill the server run only against a server they
    /// started themselves.
    pub fn local_only(self) -> bool {
        matches!(self, Scenario::TamperedLog | Scenario::KilledDuringFreeze)
    }
}

/// One checked step of a drill.
#[derive(Clone, Debug)]
pub struct Step {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// What a drill did and found.
#[derive(Clone, Debug)]
pub struct Report {
    pub scenario: Scenario,
    pub drill_id: String,
    pub steps: Vec<Step>,
    /// Why the drill did not run, when it did not.
    pub skipped: Option<String>,
    /// The ledger records written while the drill ran, oldest first.
    pub events: Vec<Value>,
}

/// A step failed in a way that leaves nothing further to check.
#[derive(Debug)]
struct Stop;

impl Report {
    fn new(scenario: Scenario) -> Report {
        Report {
            scenario,
            drill_id: new_drill_id(),
            steps: Vec::new(),
            skipped: None,
            events: vec![],
        }
    }

    /// Every step ran and passed.
    pub fn passed(&self) -> bool {
        self.skipped.is_none() && !self.steps.is_empty() && self.steps.iter().all(|s| s.passed)
    }

    /// Records a step; returns whether it passed.
    fn check(&mut self, name: &str, passed: bool, detail: impl Into<String>) -> bool {
        self.steps.push(Step { name: name.to_owned(), passed, detail: detail.into() });
        passed
    }

    /// Records a step that must pass for the drill to go on.
    fn require(&mut self, name: &str, passed: bool, detail: impl Into<String>) -> Result<(), Stop> {
        if self.check(name, passed, detail) { Ok(()) } else { Err(Stop) }
    }

    /// Awaits a call the drill needs; its failure is a failed step that ends the drill.
    async fn need<T>(
        &mut self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Stop> {
        match call.await {
            Ok(answer) => Ok(answer.into_inner()),
            Err(status) => {
                self.check(what, false, describe(&status));
                Err(Stop)
            }
        }
    }

    /// Awaits a call that must be refused with `code`, the message containing `mentions`.
    async fn refused<T: std::fmt::Debug>(
        &mut self,
        name: &str,
        code: tonic::Code,
        mentions: &str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> bool {
        match call.await {
            Ok(answer) => self.check(name, false, format!("allowed: {:?}", answer.into_inner())),
            Err(status) => self.check(
                name,
                status.code() == code && status.message().contains(mentions),
                describe(&status),
            ),
        }
    }

    /// The report as JSON (`-o json`, and the docs' captured runs).
    pub fn to_json(&self, with_events: bool) -> Value {
        let mut report = json!({
            "drill": self.scenario.name(),
            "drill_id": self.drill_id,
            "passed": self.passed(),
            "skipped": self.skipped,
            "steps": self.steps.iter().map(|s| json!({
                "step": s.name, "passed": s.passed, "detail": s.detail,
            })).collect::<Vec<_>>(),
        });
        if with_events {
            report["events"] = Value::Array(self.events.clone());
        }
        report
    }
}

fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn new_drill_id() -> String {
    let mut bytes = [0u8; 4];
    // A drill id only has to be unlikely to repeat; the clock will do if the OS has no entropy.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        bytes = nanos.to_be_bytes();
    }
    format!("drill-{}", hex::encode(bytes))
}

type Client = InterceptedService<Channel, Bearer>;

/// Where a drill runs: a live deployment (operator and, for override abuse, service
/// credentials), or a server the drill started.
#[derive(Debug)]
pub struct Target {
    channel: Channel,
    operator: Bearer,
    service: Option<Bearer>,
    /// The principal of the service credential, as the ledger names it.
    service_name: Option<String>,
    local: Option<LocalServer>,
}

impl Target {
    /// A running deployment. `service` is a credential of role `service`, needed only by the
    /// override-abuse drill; its principal's name is learnt from the ledger.
    pub fn remote(channel: Channel, operator: Bearer, service: Option<Bearer>) -> Target {
        Target { channel, operator, service, service_name: None, local: None }
    }

    /// A fresh server started from `binary` on a scratch data directory, with principals of
    /// every role and a 1-second `Watch` heartbeat.
    pub async fn local(binary: &std::path::Path) -> Result<Target, String> {
        let server = LocalServer::start(binary)?;
        let channel = server.channel().await?;
        Ok(Target {
            channel,
            operator: Bearer::new(Some(&server.tokens.operator)).ok_or("operator token")?,
            service: Bearer::new(Some(&server.tokens.service)),
            service_name: Some(local::SERVICE.to_owned()),
            local: Some(server),
        })
    }

    /// The server this target started, if it did.
    pub fn local_server(&self) -> Option<&LocalServer> {
        self.local.as_ref()
    }

    /// Starts the local server again on its data directory, and reconnects to it.
    async fn restart(&mut self, report: &mut Report, step: &str) -> Result<(), Stop> {
        let server = self.local.as_mut().ok_or(Stop)?;
        let restarted = match server.restart() {
            Ok(()) => server.channel().await,
            Err(e) => Err(e),
        };
        let detail = restarted.as_ref().err().cloned().unwrap_or_default();
        report.require(step, restarted.is_ok(), detail)?;
        self.channel = restarted.map_err(|_| Stop)?;
        Ok(())
    }

    fn safe_mode(&self, who: &Bearer) -> SafeModeServiceClient<Client> {
        SafeModeServiceClient::with_interceptor(self.channel.clone(), who.clone())
    }

    fn audit(&self) -> AuditServiceClient<Client> {
        AuditServiceClient::with_interceptor(self.channel.clone(), self.operator.clone())
    }

    fn audit_as(&self, who: &Bearer) -> AuditServiceClient<Client> {
        AuditServiceClient::with_interceptor(self.channel.clone(), who.clone())
    }

    fn evidence(&self) -> EvidenceServiceClient<Client> {
        EvidenceServiceClient::with_interceptor(self.channel.clone(), self.operator.clone())
            .max_decoding_message_size(8 << 20)
    }

    fn metrics(&self) -> MetricsServiceClient<Client> {
        MetricsServiceClient::with_interceptor(self.channel.clone(), self.operator.clone())
    }

    fn overrides(&self, who: &Bearer) -> OverrideServiceClient<Client> {
        OverrideServiceClient::with_interceptor(self.channel.clone(), who.clone())
    }

    /// A Prometheus counter or gauge read from the local server's `/metrics`; `None` remotely,
    /// where the metrics port is usually not reachable from an operator's machine.
    async fn metric(&self, name: &str) -> Option<f64> {
        let server = self.local.as_ref()?;
        let body = server.scrape().await.ok()?;
        body.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    async fn summary(&self, report: &mut Report) -> Result<pb::GetSummaryResponse, Stop> {
        let mut metrics = self.metrics();
        report.need("read the summary", metrics.get_summary(pb::GetSummaryRequest {})).await
    }

    /// The ledger head's seq.
    async fn head(&self, report: &mut Report) -> Result<u64, Stop> {
        Ok(self.summary(report).await?.ledger_head_seq)
    }

    /// Ledger records after `after_seq`, as JSON.
    async fn records_after(&self, after_seq: u64) -> Result<Vec<Value>, Status> {
        let mut records = Vec::new();
        let mut after = after_seq;
        loop {
            let page = self
                .audit()
                .list(pb::AuditServiceListRequest {
                    after_seq: after,
                    page_size: Some(1000),
                    ..Default::default()
                })
                .await?
                .into_inner();
            for event in &page.events {
                records.push(serde_json::from_str(&event.record_json).unwrap_or(Value::Null));
            }
            if page.next_after_seq == 0 {
                return Ok(records);
            }
            after = page.next_after_seq;
        }
    }

    /// The stored record of `seq`.
    async fn record(&self, report: &mut Report, seq: u64) -> Result<Value, Stop> {
        let page = report
            .need(
                "read the ledger",
                self.audit().list(pb::AuditServiceListRequest {
                    after_seq: seq.saturating_sub(1),
                    page_size: Some(1),
                    ..Default::default()
                }),
            )
            .await?;
        let record = page
            .events
            .first()
            .filter(|e| e.seq == seq)
            .and_then(|e| serde_json::from_str(&e.record_json).ok());
        match record {
            Some(record) => Ok(record),
            None => {
                report.check("read the ledger", false, format!("seq {seq} is not in the ledger"));
                Err(Stop)
            }
        }
    }

    /// An evidence pack of `scope` over the event times of `first..=last` (seqs).
    async fn pack(
        &self,
        report: &mut Report,
        scope: pb::EvidenceScope,
        first: u64,
        last: u64,
    ) -> Result<(Value, pb::ExportResponse), Stop> {
        let time_of = |record: &Value| {
            record["time"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(
                |t| prost_types::Timestamp {
                    seconds: t.timestamp(),
                    nanos: t.timestamp_subsec_nanos() as i32,
                },
            )
        };
        let from = time_of(&self.record(report, first).await?);
        let mut to = time_of(&self.record(report, last).await?);
        if let Some(to) = &mut to {
            // `to` is exclusive: one microsecond past the last event.
            to.nanos += 1000;
        }
        let request = pb::ExportRequest { from, to, scope: scope.into(), ..Default::default() };
        let answer =
            report.need("export an evidence pack", self.evidence().export(request)).await?;
        let pack = serde_json::from_str::<Value>(&answer.pack_json)
            .map(|document| document["pack"].clone())
            .unwrap_or(Value::Null);
        Ok((pack, answer))
    }

    /// An event this drill reports, marked as a drill event.
    fn event(report: &Report, event_type: &str) -> pb::Event {
        pb::Event {
            event_type: event_type.to_owned(),
            triggered_by: format!("brain-ops {}", report.scenario.name()),
            metadata: BTreeMap::from([
                ("drill".to_owned(), "true".to_owned()),
                ("drill_id".to_owned(), report.drill_id.clone()),
            ])
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    /// Records `event` as the operator; returns its seq.
    async fn report_event(&self, report: &mut Report, event: pb::Event) -> Result<u64, Stop> {
        self.report_event_as(report, &self.operator.clone(), event).await
    }

    async fn report_event_as(
        &self,
        report: &mut Report,
        who: &Bearer,
        event: pb::Event,
    ) -> Result<u64, Stop> {
        let what = format!("record {}", event.event_type);
        let request = pb::RecordRequest { event: Some(event), idempotency_key: String::new() };
        Ok(report.need(&what, self.audit_as(who).record(request)).await?.seq)
    }
}

/// Runs one drill. A local-only drill against a remote target is skipped, saying why.
pub async fn run(scenario: Scenario, target: &mut Target) -> Report {
    let mut report = Report::new(scenario);
    if scenario.local_only() && target.local.is_none() {
        report.skipped = Some(format!(
            "{} edits the data directory or kills the server, so it runs only against a server \
             it starts: brain-ops drill run {} --local",
            scenario.name(),
            scenario.name()
        ));
        return report;
    }
    let start = target.head(&mut report).await.ok();
    let _ = match scenario {
        Scenario::InvalidBundle => scenarios::invalid_bundle(target, &mut report).await,
        Scenario::ExecutorCrash => scenarios::executor_crash(target, &mut report).await,
        Scenario::OverrideAbuse => scenarios::override_abuse(target, &mut report).await,
        Scenario::TamperedLog => scenarios::tampered_log(target, &mut report).await,
        Scenario::KilledDuringFreeze => scenarios::killed_during_freeze(target, &mut report).await,
    };
    if let Some(start) = start
        && let Ok(records) = target.records_after(start).await
    {
        report.events = records;
    }
    report
}

/// How long a `Watch` sibling waits for a message before it treats safe mode as on, in the
/// drills (the local server sends a heartbeat every second).
const STALENESS_BUDGET: Duration = Duration::from_secs(3);
