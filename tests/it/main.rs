//! The one integration-test binary: real servers on port 0, real gRPC.
#![allow(unreachable_pub)]

mod auth;
mod canonical;
mod checkpoint;
mod cli;
mod config;
mod crash;
mod drills;
mod evidence;
mod export_memory;
mod fuzz_corpus;
mod governance;
mod helpers;
mod integrity;
mod ledger;
mod limits;
mod list;
mod metrics;
mod overrides;
mod safe_mode;
mod server;
mod shutdown_load;
mod storage_faults;
mod tls;
