//! brain-ops: the operational-resilience control plane of BRAiN.
//!
//! See `docs/ARCHITECTURE.md` for the map of this crate.

pub mod audit;
pub mod auth;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod drain;
pub mod drill;
pub mod evidence;
#[doc(hidden)]
pub mod fuzzing;
pub mod governance;
pub mod grpc;
pub mod http;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod overrides;
pub mod parallel;
pub mod pb;
pub mod safe_mode;
pub mod server;
pub mod startup;
pub mod state;
pub mod tally;
pub mod telemetry;
pub mod tls;
