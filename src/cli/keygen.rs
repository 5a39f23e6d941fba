//! `brain-ops keygen --out FILE`: a new Ed25519 signing key pair, offline. `FILE` gets the
//! private key (PKCS#8 PEM, mode 0600), `FILE.pub` the public key (SPKI PEM).

use std::path::PathBuf;

use serde_json::json;

use super::{Failure, Output, exit, print_json};
use crate::evidence::keys::Signer;

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Where to write the private key; the public key goes to FILE.pub. Never overwrites.
    #[arg(long)]
    out: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value = "human")]
    output: Output,
}

pub(super) fn run(args: KeygenArgs) -> Result<u8, Failure> {
    let signer =
        Signer::generate().map_err(|e| Failure { code: exit::SOFTWARE, message: e.to_string() })?;
    let public = PathBuf::from(format!("{}.pub", args.out.display()));
    let refused =
        |e: crate::evidence::keys::KeyError| Failure { code: exit::USAGE, message: e.to_string() };
    signer.write_private(&args.out).map_err(refused)?;
    signer.write_public(&public).map_err(refused)?;
    match args.output {
        Output::Json => print_json(&json!({
            "key_id": signer.key_id(),
            "public_key": signer.public_key_base64(),
            "private_key_file": args.out,
            "public_key_file": public,
        })),
        Output::Human => {
            println!("key_id {}", signer.key_id());
            println!(
                "private key: {} (keep it secret; set BRAIN_SIGNING_KEY_FILE to it)",
                args.out.display()
            );
            println!("public key:  {}", public.display());
        }
    }
    Ok(exit::OK)
}
