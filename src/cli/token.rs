//! `brain-ops token new`: a fresh token, shown once, and the principals-file block that holds
//! only its digest. Works offline; nothing is sent to a server.

use std::io::Write;
use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::json;

use super::{Failure, Output, exit, print_json};
use crate::auth::new_token;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token for a principal.
    New {
        /// The principal's name; it becomes `source` of its events.
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Append the block to this principals file and print only the token.
        #[arg(long)]
        append_to: Option<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "human")]
        output: Output,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleArg {
    Service,
    Operator,
    Auditor,
}

impl RoleArg {
    fn as_str(self) -> &'static str {
        match self {
            RoleArg::Service => "service",
            RoleArg::Operator => "operator",
            RoleArg::Auditor => "auditor",
        }
    }
}

#[derive(Serialize)]
struct Block<'a> {
    principal: [Entry<'a>; 1],
}

#[derive(Serialize)]
struct Entry<'a> {
    name: &'a str,
    role: &'a str,
    token_sha256: &'a str,
}

pub(super) fn run(command: TokenCommand) -> Result<u8, Failure> {
    let TokenCommand::New { name, role, append_to, output } = command;
    let software = |message: String| Failure { code: exit::SOFTWARE, message };
    let (token, digest) = new_token().map_err(|e| software(format!("no randomness: {e}")))?;
    let block = toml::to_string(&Block {
        principal: [Entry { name: &name, role: role.as_str(), token_sha256: &digest }],
    })
    .map_err(|e| software(e.to_string()))?;
    if let Some(path) = &append_to {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(format!("\n{block}").as_bytes()).map(|()| f))
            .map_err(|e| Failure {
                code: exit::USAGE,
                message: format!("--append-to {}: {e}", path.display()),
            })?;
        file.flush().map_err(|e| software(e.to_string()))?;
    }
    match (output, append_to.is_some()) {
        (Output::Json, _) => print_json(&json!({
            "name": name, "role": role.as_str(), "token": token, "token_sha256": digest,
        })),
        (Output::Human, true) => println!("{token}"),
        (Output::Human, false) => {
            println!("token for {name} (shown once; brain-ops keeps only its digest):\n{token}\n");
            println!("add to the principals file, then send SIGHUP to brain-ops:\n{block}");
        }
    }
    Ok(exit::OK)
}
