//! `brain-ops audit list|verify`.

use clap::Subcommand;
use serde_json::{Value, json};

use super::{ClientArgs, Failure, Output, exit, print_json};
use crate::grpc::convert::micros_to_pb;
use crate::ledger::record::{format_time, parse_time};
use crate::pb;
use crate::pb::audit_service_client::AuditServiceClient;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List stored events in seq order.
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
