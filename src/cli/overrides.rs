//! `brain-ops override grant|consume|revoke|list`.

use clap::Subcommand;
use serde_json::{Value, json};

use super::safe_mode::time_of;
use super::{ClientArgs, Failure, Output, exit, print_json};
use crate::pb;
use crate::pb::override_service_client::OverrideServiceClient;

#[derive(Debug, Subcommand)]
pub enum OverrideCommand {
    /// Grant a single-use, time-bound override (operator role). The token is printed once.
    ///
    /// RPC: OverrideService.Grant
    Grant {
        /// Why (at least 10 characters; recorded).
        #[arg(long)]
        reason: String,
        /// How long it can be consumed, 60 to 86400 seconds.
        #[arg(long, default_value = "900")]
        ttl_seconds: u32,
        /// The action it allows, e.g. sovereign.mode_change.
        #[arg(long)]
        scope: String,
    },
    /// Consume an override (service or operator role); a second use is refused and recorded.
    ///
    /// RPC: OverrideService.Consume
    Consume {
        /// The token `grant` printed.
        #[arg(long, env = "BRAIN_OVERRIDE_TOKEN", hide_env_values = true)]
        override_token: String,
        /// What it is used for (recorded).
        #[arg(long)]
        purpose: String,
    },
    /// Revoke an override that has not been used yet (operator role).
    ///
    /// RPC: OverrideService.Revoke
    Revoke {
        /// The override id (ovr-…).
        #[arg(long)]
        id: String,
        /// Why (recorded).
        #[arg(long)]
        reason: String,
    },
    /// List overrides that can still be consumed (operator role).
    ///
    /// RPC: OverrideService.List
    List {
        /// Include consumed, revoked and expired ones.
        #[arg(long)]
        all: bool,
    },
}

pub(super) async fn run(client: &ClientArgs, command: OverrideCommand) -> Result<u8, Failure> {
    let (channel, bearer) = client.connect().await?;
    let mut overrides = OverrideServiceClient::with_interceptor(channel, bearer);
    match command {
        OverrideCommand::Grant { reason, ttl_seconds, scope } => {
            let answer = overrides
                .grant(pb::GrantRequest { reason, ttl_seconds, scope })
                .await?
                .into_inner();
            match client.output {
                Output::Json => print_json(&json!({
                    "override": override_json(answer.r#override.as_ref()),
                    "token": answer.token,
                })),
                Output::Human => {
                    if let Some(o) = &answer.r#override {
                        println!("{}", one_line(o));
                    }
                    println!("token (shown once; hand it to the service that will consume it):");
                    println!("{}", answer.token);
                }
            }
        }
        OverrideCommand::Consume { override_token, purpose } => {
            let answer = overrides
                .consume(pb::ConsumeRequest { token: override_token, purpose })
                .await?
                .into_inner();
            print_one(client.output, answer.r#override.as_ref());
        }
        OverrideCommand::Revoke { id, reason } => {
            let answer = overrides.revoke(pb::RevokeRequest { id, reason }).await?.into_inner();
            print_one(client.output, answer.r#override.as_ref());
        }
        OverrideCommand::List { all } => {
            let answer = overrides
                .list(pb::OverrideServiceListRequest { include_inactive: all })
                .await?
                .into_inner();
            match client.output {
                Output::Json => print_json(&Value::Array(
                    answer.overrides.iter().map(|o| override_json(Some(o))).collect(),
                )),
                Output::Human if answer.overrides.is_empty() => println!("no overrides"),
                Output::Human => answer.overrides.iter().for_each(|o| println!("{}", one_line(o))),
            }
        }
    }
    Ok(exit::OK)
}

fn state_name(o: &pb::Override) -> &'static str {
    match o.state() {
        pb::OverrideState::Unspecified => "unknown",
        pb::OverrideState::Active => "active",
        pb::OverrideState::Consumed => "consumed",
        pb::OverrideState::Revoked => "revoked",
        pb::OverrideState::Expired => "expired",
    }
}

fn override_json(o: Option<&pb::Override>) -> Value {
    let Some(o) = o else { return Value::Null };
    json!({
        "id": o.id,
        "state": state_name(o),
        "scope": o.scope,
        "reason": o.reason,
        "granted_by": o.granted_by,
        "granted_at": time_of(o.granted_at.as_ref()),
        "expires_at": time_of(o.expires_at.as_ref()),
        "consumed_by": o.consumed_by,
        "consumed_at": time_of(o.consumed_at.as_ref()),
        "purpose": o.purpose,
        "revoked_by": o.revoked_by,
        "revoked_at": time_of(o.revoked_at.as_ref()),
        "revoke_reason": o.revoke_reason,
    })
}

fn one_line(o: &pb::Override) -> String {
    let mut line = format!(
        "{} {} scope {} granted by {} at {}, expires {}: {}",
        o.id,
        state_name(o).to_uppercase(),
        o.scope,
        o.granted_by,
        time_of(o.granted_at.as_ref()).unwrap_or_default(),
        time_of(o.expires_at.as_ref()).unwrap_or_default(),
        o.reason
    );
    if !o.consumed_by.is_empty() {
        line.push_str(&format!("; consumed by {} for {:?}", o.consumed_by, o.purpose));
    }
    if !o.revoked_by.is_empty() {
        line.push_str(&format!("; revoked by {}: {}", o.revoked_by, o.revoke_reason));
    }
    line
}

fn print_one(output: Output, o: Option<&pb::Override>) {
    match (output, o) {
        (Output::Json, o) => print_json(&override_json(o)),
        (Output::Human, Some(o)) => println!("{}", one_line(o)),
        (Output::Human, None) => {}
    }
}
