//! Generated protobuf and gRPC code. The only module that silences lints for generated code.
#![allow(unreachable_pub, missing_debug_implementations, clippy::all, clippy::pedantic)]

tonic::include_proto!("brain.ops.v1");

/// Serialized descriptors of every service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("brain_ops_descriptor");
