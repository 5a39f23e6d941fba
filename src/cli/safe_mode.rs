//! `brain-ops safe-mode status|enable|disable|check|watch`.

use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use super::{ClientArgs, Failure, Output, exit, print_json};
use crate::ledger::record::format_time;
use crate::pb;
use crate::pb::safe_mode_service_client::SafeModeServiceClient;

#[derive(Debug, Subcommand)]
pub enum SafeModeCommand {
    /// Show the current status.
    ///
    /// RPC: SafeModeService.GetStatus
    Status,
    /// Freeze: block every execution, deployment and bundle load.
    ///
    /// RPC: SafeModeService.Enable
    Enable {
        /// Why (required; it is recorded and shown to everyone who is blocked).
        #[arg(long)]
        reason: String,
    },
    /// Lift the freeze (operator role).
    ///
    /// RPC: SafeModeService.Disable
    Disable {
        /// Why it is safe now (required; recorded).
        #[arg(long)]
        reason: String,
    },
    /// Ask whether an operation may run now; exits 0 when allowed, 1 when blocked.
    ///
    /// RPC: SafeModeService.CheckOperation
    Check {
        #[arg(long, value_enum)]
        kind: Kind,
        /// What is about to run, for the audit trail.
        #[arg(long)]
        operation: String,
    },
    /// Print the status, then every change; exits 3 when no message (change or heartbeat)
    /// arrives within the staleness budget, as a sibling must then treat safe mode as on.
    ///
    /// RPC: SafeModeService.Watch
    Watch {
        #[arg(long, default_value = "30")]
        stale_after_seconds: u64,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Kind {
    Execution,
    Deployment,
    BundleLoad,
}

impl From<Kind> for pb::OperationKind {
    fn from(kind: Kind) -> pb::OperationKind {
        match kind {
            Kind::Execution => pb::OperationKind::Execution,
            Kind::Deployment => pb::OperationKind::Deployment,
            Kind::BundleLoad => pb::OperationKind::BundleLoad,
        }
    }
}

pub(super) async fn run(client: &ClientArgs, command: SafeModeCommand) -> Result<u8, Failure> {
    let streaming = matches!(command, SafeModeCommand::Watch { .. });
    let (channel, bearer) = client.connect_with(streaming).await?;
    let mut safe_mode = SafeModeServiceClient::with_interceptor(channel, bearer);
    match command {
        SafeModeCommand::Status => {
            let status = safe_mode.get_status(pb::GetStatusRequest {}).await?.into_inner().status;
            print_status(client.output, status.as_ref());
            Ok(exit::OK)
        }
        SafeModeCommand::Enable { reason } => {
            let answer = safe_mode.enable(pb::EnableRequest { reason }).await?.into_inner();
            print_change(client.output, answer.changed, "enabled", answer.status.as_ref());
            Ok(exit::OK)
        }
        SafeModeCommand::Disable { reason } => {
            let answer = safe_mode.disable(pb::DisableRequest { reason }).await?.into_inner();
            print_change(client.output, answer.changed, "disabled", answer.status.as_ref());
            Ok(exit::OK)
        }
        SafeModeCommand::Check { kind, operation } => {
            let kind = pb::OperationKind::from(kind).into();
            let answer = safe_mode
                .check_operation(pb::CheckOperationRequest { kind, operation })
                .await?
                .into_inner();
            match client.output {
                Output::Json => print_json(&json!({
                    "allowed": answer.allowed,
                    "message": answer.message,
                    "audit_seq": answer.audit_seq,
                    "status": status_json(answer.status.as_ref()),
                })),
                Output::Human => println!("{}", answer.message),
            }
            Ok(if answer.allowed { exit::OK } else { exit::NEGATIVE })
        }
        SafeModeCommand::Watch { stale_after_seconds } => {
            let budget = Duration::from_secs(stale_after_seconds.max(1));
            let mut stream = safe_mode.watch(pb::WatchRequest {}).await?.into_inner();
            loop {
                match tokio::time::timeout(budget, stream.next()).await {
                    Err(_) => {
                        return Err(Failure {
                            code: exit::UNAVAILABLE,
                            message: format!(
                                "no message for {stale_after_seconds}s: the status is stale; \
                                 treat safe mode as ON"
                            ),
                        });
                    }
                    Ok(None) => {
                        return Err(Failure {
                            code: exit::UNAVAILABLE,
                            message: "the stream ended: treat safe mode as ON and reconnect".into(),
                        });
                    }
                    Ok(Some(Err(status))) => return Err(status.into()),
                    Ok(Some(Ok(message))) if message.heartbeat => {}
                    Ok(Some(Ok(message))) => match client.output {
                        Output::Json => println!("{}", status_json(message.status.as_ref())),
                        Output::Human => println!("{}", one_line(message.status.as_ref())),
                    },
                }
            }
        }
    }
}

fn source_name(status: &pb::SafeModeStatus) -> &'static str {
    match status.source() {
        pb::SafeModeSource::Unspecified => "",
        pb::SafeModeSource::Api => "api",
        pb::SafeModeSource::Env => "env",
        pb::SafeModeSource::Integrity => "integrity",
        pb::SafeModeSource::Storage => "storage",
    }
}

pub(super) fn time_of(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.map(|t| format_time(t.seconds * 1_000_000 + i64::from(t.nanos / 1000)))
}

fn status_json(status: Option<&pb::SafeModeStatus>) -> Value {
    let Some(status) = status else { return Value::Null };
    json!({
        "enabled": status.enabled,
        "revision": status.revision,
        "enabled_at": time_of(status.enabled_at.as_ref()),
        "reason": status.reason,
        "enabled_by": status.enabled_by,
        "source": source_name(status),
        "blocked_operations": status.blocked_operations,
        "allowed_operations": status.allowed_operations,
    })
}

fn one_line(status: Option<&pb::SafeModeStatus>) -> String {
    match status {
        Some(s) if s.enabled => format!(
            "safe mode ON (revision {}) since {} by {} (source {}): {}",
            s.revision,
            time_of(s.enabled_at.as_ref()).unwrap_or_default(),
            s.enabled_by,
            source_name(s),
            s.reason
        ),
        Some(s) => format!("safe mode OFF (revision {})", s.revision),
        None => "safe mode status unknown: treat it as ON".into(),
    }
}

fn print_status(output: Output, status: Option<&pb::SafeModeStatus>) {
    match output {
        Output::Json => print_json(&status_json(status)),
        Output::Human => {
            println!("{}", one_line(status));
            if let Some(status) = status {
                if !status.blocked_operations.is_empty() {
                    println!("  blocked: {}", status.blocked_operations.join(", "));
                }
                println!("  allowed: {}", status.allowed_operations.join(", "));
            }
        }
    }
}

fn print_change(output: Output, changed: bool, verb: &str, status: Option<&pb::SafeModeStatus>) {
    match output {
        Output::Json => print_json(&json!({ "changed": changed, "status": status_json(status) })),
        Output::Human => {
            if changed {
                println!("safe mode {verb}");
            } else {
                println!("safe mode was already {verb}: nothing changed");
            }
            println!("{}", one_line(status));
        }
    }
}
