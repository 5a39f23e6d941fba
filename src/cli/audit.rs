//! `brain-ops audit record|record-batch|list|verify`.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ClientArgs, Failure, Output, exit, print_json};
use crate::grpc::convert::micros_to_pb;
use crate::ledger::record::{format_time, parse_time};
use crate::pb;
use crate::pb::audit_service_client::AuditServiceClient;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Record one event (for scripts and drills); prints its seq and hash once durable.
    ///
    /// RPC: AuditService.Record
    Record {
        /// Event type, e.g. factory.step_failed.
        #[arg(long = "type")]
        event_type: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// info, warning, error or critical (default: derived from the type).
        #[arg(long, value_enum)]
        severity: Option<SeverityArg>,
        /// The reporter's own actor string.
        #[arg(long, default_value = "")]
        triggered_by: String,
        #[arg(long, default_value = "")]
        error: String,
        #[arg(long, default_value = "")]
        bundle_id: String,
        #[arg(long, value_enum)]
        mode_before: Option<ModeArg>,
        #[arg(long, value_enum)]
        mode_after: Option<ModeArg>,
        /// Report a failure (success = false).
        #[arg(long)]
        failed: bool,
        /// Metadata entry key=value (repeatable).
        #[arg(long = "meta", value_parser = parse_meta)]
        metadata: Vec<(String, String)>,
        /// Makes retries safe: a repeat answers the original seq.
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Record many events at once, all or none; prints each one's seq and hash once durable.
    ///
    /// The file holds one JSON object per line, with the fields of `record`: "type" (required),
    /// "reason", "severity", "triggered_by", "error", "bundle_id", "mode_before", "mode_after",
    /// "success" (true or false), "metadata" (an object of strings) and "idempotency_key".
    /// Blank lines are skipped; an unknown field is an error naming its line.
    ///
    /// RPC: AuditService.RecordBatch
    RecordBatch {
        /// The JSON Lines file, or - for standard input.
        #[arg(long)]
        file: PathBuf,
    },
    /// List stored events in seq order.
    ///
    /// RPC: AuditService.List
    List {
        /// Only events at or after this time (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Only events before this time (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        /// Only event types starting with this.
        #[arg(long, default_value = "")]
        type_prefix: String,
        /// Start after this seq.
        #[arg(long, default_value = "0")]
        after_seq: u64,
        /// Events per page (1 to 1000).
        #[arg(long)]
        page_size: Option<u32>,
        /// Follow every page to the end.
        #[arg(long)]
        all: bool,
    },
    /// Verify the hash chain; exits 1 when it is broken.
    ///
    /// RPC: AuditService.VerifyChain
    Verify {
        /// First seq (default: 1).
        #[arg(long, default_value = "0")]
        from_seq: u64,
        /// Last seq (default: the head).
        #[arg(long, default_value = "0")]
        to_seq: u64,
    },
}

pub(super) async fn run(client: &ClientArgs, command: AuditCommand) -> Result<u8, Failure> {
    let (channel, bearer) = client.connect().await?;
    let mut audit = AuditServiceClient::with_interceptor(channel, bearer);
    match command {
        AuditCommand::Record {
            event_type,
            reason,
            severity,
            triggered_by,
            error,
            bundle_id,
            mode_before,
            mode_after,
            failed,
            metadata,
            idempotency_key,
        } => {
            let line = EventLine {
                event_type,
                reason,
                severity,
                triggered_by,
                error,
                bundle_id,
                mode_before,
                mode_after,
                success: failed.then_some(false),
                metadata: metadata.into_iter().collect(),
                idempotency_key,
            };
            let answer = audit.record(line.into_request()).await?.into_inner();
            match client.output {
                Output::Json => print_json(&json!({
                    "seq": answer.seq, "hash": answer.hash, "duplicate": answer.duplicate,
                })),
                Output::Human if answer.duplicate => {
                    println!(
                        "duplicate of seq {} (hash {}): nothing appended",
                        answer.seq, answer.hash
                    )
                }
                Output::Human => println!("recorded seq {} hash {}", answer.seq, answer.hash),
            }
            Ok(exit::OK)
        }
        AuditCommand::RecordBatch { file } => {
            let records = read_batch(&file)?
                .into_iter()
                .map(|line| {
                    let request = line.into_request();
                    pb::BatchRecord {
                        event: request.event,
                        idempotency_key: request.idempotency_key,
                    }
                })
                .collect();
            let answer = audit.record_batch(pb::RecordBatchRequest { records }).await?.into_inner();
            match client.output {
                Output::Json => print_json(&Value::Array(
                    answer
                        .results
                        .iter()
                        .map(|r| json!({ "seq": r.seq, "hash": r.hash, "duplicate": r.duplicate }))
                        .collect(),
                )),
                Output::Human => {
                    for r in &answer.results {
                        let what = if r.duplicate { "duplicate of" } else { "recorded" };
                        println!("{what} seq {} hash {}", r.seq, r.hash);
                    }
                }
            }
            Ok(exit::OK)
        }
        AuditCommand::List { from, to, type_prefix, after_seq, page_size, all } => {
            let time = |flag: &str, value: Option<String>| {
                value
                    .map(|v| {
                        parse_time(&v).map(micros_to_pb).ok_or_else(|| Failure {
                            code: exit::USAGE,
                            message: format!("--{flag} {v:?} is not an RFC 3339 time"),
                        })
                    })
                    .transpose()
            };
            let mut request = pb::AuditServiceListRequest {
                from: time("from", from)?,
                to: time("to", to)?,
                event_type_prefix: type_prefix,
                after_seq,
                page_size,
            };
            let mut events = Vec::new();
            let next = loop {
                let page = audit.list(request.clone()).await?.into_inner();
                events.extend(page.events);
                if !all || page.next_after_seq == 0 {
                    break page.next_after_seq;
                }
                request.after_seq = page.next_after_seq;
            };
            print_events(client.output, &events, next);
            Ok(exit::OK)
        }
        AuditCommand::Verify { from_seq, to_seq } => {
            let report =
                audit.verify_chain(pb::VerifyChainRequest { from_seq, to_seq }).await?.into_inner();
            match client.output {
                Output::Json => print_json(&json!({
                    "valid": report.valid,
                    "checked": report.checked,
                    "first_bad_seq": report.first_bad_seq,
                    "problem": report.problem,
                    "head_seq": report.head_seq,
                    "head_hash": report.head_hash,
                })),
                Output::Human if report.valid => println!(
                    "chain valid: {} records checked; head seq {} hash {}",
                    report.checked, report.head_seq, report.head_hash
                ),
                Output::Human => println!(
                    "chain BROKEN at seq {}: {}\n{} records checked; head seq {} hash {}",
                    report.first_bad_seq,
                    report.problem,
                    report.checked,
                    report.head_seq,
                    report.head_hash
                ),
            }
            Ok(if report.valid { exit::OK } else { exit::NEGATIVE })
        }
    }
}

/// One event to record, as `record` takes it on the command line and `record-batch` per line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    severity: Option<SeverityArg>,
    #[serde(default)]
    triggered_by: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    bundle_id: String,
    #[serde(default)]
    mode_before: Option<ModeArg>,
    #[serde(default)]
    mode_after: Option<ModeArg>,
    #[serde(default)]
    success: Option<bool>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    idempotency_key: String,
}

impl EventLine {
    fn into_request(self) -> pb::RecordRequest {
        let event = pb::Event {
            event_type: self.event_type,
            severity: self.severity.map_or(pb::Severity::Unspecified, Into::into).into(),
            triggered_by: self.triggered_by,
            reason: self.reason,
            success: self.success,
            error: self.error,
            mode_before: self.mode_before.map_or(pb::OperationMode::Unspecified, Into::into).into(),
            mode_after: self.mode_after.map_or(pb::OperationMode::Unspecified, Into::into).into(),
            bundle_id: self.bundle_id,
            metadata: self.metadata.into_iter().collect(),
        };
        pb::RecordRequest { event: Some(event), idempotency_key: self.idempotency_key }
    }
}

/// Reads a JSON Lines batch from `path` (`-`: standard input).
fn read_batch(path: &std::path::Path) -> Result<Vec<EventLine>, Failure> {
    let usage = |message: String| Failure { code: exit::USAGE, message };
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(path)
            .map_err(|e| usage(format!("--file {}: {e}", path.display())))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut lines = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| usage(format!("--file {}: {e}", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let event = serde_json::from_str(&line)
            .map_err(|e| usage(format!("--file {} line {}: {e}", path.display(), n + 1)))?;
        lines.push(event);
    }
    if lines.is_empty() {
        return Err(usage(format!("--file {}: no events", path.display())));
    }
    Ok(lines)
}

fn parse_meta(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

#[derive(Clone, Copy, Debug, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SeverityArg {
    Info,
    Warning,
    Error,
    Critical,
}

impl From<SeverityArg> for pb::Severity {
    fn from(s: SeverityArg) -> pb::Severity {
        match s {
            SeverityArg::Info => pb::Severity::Info,
            SeverityArg::Warning => pb::Severity::Warning,
            SeverityArg::Error => pb::Severity::Error,
            SeverityArg::Critical => pb::Severity::Critical,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModeArg {
    Online,
    Offline,
    Sovereign,
    Quarantine,
}

impl From<ModeArg> for pb::OperationMode {
    fn from(m: ModeArg) -> pb::OperationMode {
        match m {
            ModeArg::Online => pb::OperationMode::Online,
            ModeArg::Offline => pb::OperationMode::Offline,
            ModeArg::Sovereign => pb::OperationMode::Sovereign,
            ModeArg::Quarantine => pb::OperationMode::Quarantine,
        }
    }
}

fn print_events(output: Output, events: &[pb::LedgerEvent], next_after_seq: u64) {
    match output {
        Output::Json => {
            // The stored records are printed as stored, not re-encoded through proto types.
            let records: Vec<Value> = events
                .iter()
                .map(|e| {
                    serde_json::from_str(&e.record_json)
                        .unwrap_or(Value::String(e.record_json.clone()))
                })
                .collect();
            print_json(&json!({ "events": records, "next_after_seq": next_after_seq }));
        }
        Output::Human => {
            println!(
                "{:>8}  {:<27}  {:<8}  {:<40}  {:<16}  REASON",
                "SEQ", "TIME", "SEVERITY", "TYPE", "SOURCE"
            );
            for event in events {
                let record: Value = serde_json::from_str(&event.record_json).unwrap_or(Value::Null);
                let field =
                    |name: &str| record.get(name).and_then(Value::as_str).unwrap_or("-").to_owned();
                let time = event
                    .time
                    .as_ref()
                    .map(|t| format_time(t.seconds * 1_000_000 + i64::from(t.nanos / 1000)))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:>8}  {:<27}  {:<8}  {:<40}  {:<16}  {}",
                    event.seq,
                    time,
                    field("severity"),
                    if event.event_type.is_empty() { "(undecodable)" } else { &event.event_type },
                    field("source"),
                    field("reason"),
                );
            }
            if next_after_seq != 0 {
                println!("(more: --after-seq {next_after_seq}, or --all)");
            }
        }
    }
}
