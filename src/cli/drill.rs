//! `brain-ops drill`: the incident drills, against a live deployment or a scratch server.

use clap::Subcommand;
use clap::builder::PossibleValuesParser;
use serde_json::Value;

use super::{Bearer, ClientArgs, Failure, Output, exit, print_json};
use crate::drill::{self, Report, Scenario, Target};

#[derive(Debug, Subcommand)]
pub enum DrillCommand {
    /// Run one drill or all of them and print a pass/fail report per step; exits 1 when a step
    /// fails. Every event a drill records carries metadata drill=true and its drill id, and the
    /// target is left as found (only a freeze the drill made is thawed).
    Run {
        /// The drill to run.
        #[arg(value_parser = PossibleValuesParser::new([
            "all", "invalid-bundle", "executor-crash", "override-abuse", "tampered-log",
            "killed-during-freeze",
        ]))]
        name: String,
        /// Run against a scratch server started from this binary (one per drill) instead of
        /// --server. tampered-log and killed-during-freeze run only this way.
        #[arg(long)]
        local: bool,
        /// A token of a principal with role `service`, for override-abuse against --server.
        #[arg(long, env = "BRAIN_SERVICE_TOKEN", hide_env_values = true)]
        service_token: Option<String>,
        /// Also print the ledger records each drill caused.
        #[arg(long)]
        events: bool,
    },
    /// List the drills.
    List,
}

pub(super) async fn run(client: &ClientArgs, command: DrillCommand) -> Result<u8, Failure> {
    let usage = |message: String| Failure { code: exit::USAGE, message };
    match command {
        DrillCommand::List => {
            for scenario in Scenario::ALL {
                let place = if scenario.local_only() { " (--local only)" } else { "" };
                println!("{}{place}", scenario.name());
            }
            Ok(exit::OK)
        }
        DrillCommand::Run { name, local, service_token, events } => {
            let scenarios: Vec<Scenario> =
                Scenario::ALL.into_iter().filter(|s| name == "all" || s.name() == name).collect();
            if let [only] = scenarios[..]
                && only.local_only()
                && !local
            {
                return Err(usage(format!(
                    "{name} edits the data directory or kills the server: run it with --local"
                )));
            }
            let binary = std::env::current_exe()
                .map_err(|e| usage(format!("cannot find this binary to start a server: {e}")))?;
            let mut reports = Vec::new();
            for scenario in scenarios {
                let mut target = if local {
                    Target::local(&binary)
                        .await
                        .map_err(|message| Failure { code: exit::SOFTWARE, message })?
                } else {
                    let (channel, operator) = client.connect().await?;
                    let service = match service_token.as_deref() {
                        None => None,
                        Some(token) => Some(Bearer::new(Some(token)).ok_or_else(|| {
                            usage("--service-token holds invalid characters".into())
                        })?),
                    };
                    Target::remote(channel, operator, service)
                };
                let report = drill::run(scenario, &mut target).await;
                if client.output == Output::Human {
                    print_human(&report, events);
                }
                reports.push(report);
            }
            let failed = reports.iter().any(|r| r.skipped.is_none() && !r.passed());
            if client.output == Output::Json {
                print_json(&Value::Array(reports.iter().map(|r| r.to_json(events)).collect()));
            }
            Ok(if failed { exit::NEGATIVE } else { exit::OK })
        }
    }
}

fn print_human(report: &Report, events: bool) {
    println!("drill {} ({})", report.scenario.name(), report.drill_id);
    if let Some(why) = &report.skipped {
        println!("  SKIP  {why}");
        return;
    }
    for step in &report.steps {
        let mark = if step.passed { "PASS" } else { "FAIL" };
        if step.detail.is_empty() {
            println!("  {mark}  {}", step.name);
        } else {
            println!("  {mark}  {}: {}", step.name, step.detail);
        }
    }
    if events {
        for record in &report.events {
            let text = |key: &str| record[key].as_str().unwrap_or("").to_owned();
            println!(
                "  event {} {} {} by {}",
                record["seq"],
                text("event_type"),
                text("severity"),
                text("source")
            );
        }
    }
    println!("  => {}", if report.passed() { "PASS" } else { "FAIL" });
}
