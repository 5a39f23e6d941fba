//! `brain-ops metrics summary`.

use clap::Subcommand;
use serde_json::json;

use super::{ClientArgs, Failure, Output, exit, print_json};
use crate::ledger::record::format_time;
use crate::pb;
use crate::pb::metrics_service_client::MetricsServiceClient;

#[derive(Debug, Subcommand)]
pub enum MetricsCommand {
    /// The operational picture: mode, switches, quarantines, failures, last success, safe mode.
    ///
    /// RPC: MetricsService.GetSummary
    Summary,
}

pub(super) async fn run(client: &ClientArgs, command: MetricsCommand) -> Result<u8, Failure> {
    let MetricsCommand::Summary = command;
    let (channel, bearer) = client.connect().await?;
    let summary = MetricsServiceClient::with_interceptor(channel, bearer)
        .get_summary(pb::GetSummaryRequest {})
        .await?
        .into_inner();
    let mode = match summary.current_mode() {
        pb::OperationMode::Online | pb::OperationMode::Unspecified => "online",
        pb::OperationMode::Offline => "offline",
        pb::OperationMode::Sovereign => "sovereign",
        pb::OperationMode::Quarantine => "quarantine",
    };
    let last_success = summary
        .last_success
        .map(|t| format_time(t.seconds * 1_000_000 + i64::from(t.nanos / 1000)));
    match client.output {
        Output::Json => print_json(&json!({
            "current_mode": mode,
            "mode_switches": summary.mode_switches,
            "override_active": summary.override_active,
            "quarantines": summary.quarantines,
            "executor_failures": summary.executor_failures,
            "last_success": last_success,
            "uptime_seconds": summary.uptime_seconds,
            "safe_mode": summary.safe_mode,
            "ledger_head_seq": summary.ledger_head_seq,
        })),
        Output::Human => {
            println!("mode:              {mode}");
            println!("mode switches:     {}", summary.mode_switches);
            println!("override active:   {}", summary.override_active);
            println!("quarantines:       {}", summary.quarantines);
            println!("executor failures: {}", summary.executor_failures);
            println!("last success:      {}", last_success.as_deref().unwrap_or("never"));
            println!("safe mode:         {}", if summary.safe_mode { "ON" } else { "off" });
            println!("ledger head seq:   {}", summary.ledger_head_seq);
            println!("uptime:            {}s", summary.uptime_seconds);
        }
    }
    Ok(exit::OK)
}
