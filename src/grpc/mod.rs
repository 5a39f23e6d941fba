//! Thin gRPC adapters: decode, call a domain handle, map the error. Conversions between prost
//! types and domain types live in [`convert`]; the error table is here.

pub mod audit;
pub mod authn;
pub mod convert;
pub mod evidence;
pub mod metrics;
pub mod observe;
pub mod overrides;
pub mod safe_mode;

use tonic::Status;

use crate::audit::AuditError;
use crate::overrides::OverrideError;
use crate::safe_mode::SafeModeError;

/// The principal every caller is while authentication is off.
pub const ANONYMOUS: &str = "anonymous";

/// The authenticated principal of a request, put there by [`authn::AuthLayer`].
pub fn principal<T>(request: &tonic::Request<T>) -> String {
    request
        .extensions()
        .get::<std::sync::Arc<crate::auth::Principal>>()
        .map_or_else(|| ANONYMOUS.to_owned(), |p| p.name.clone())
}

/// The one table that maps domain errors to gRPC statuses. Clients get a clear message and the
/// right code; causes that only operators can act on go to the log.
impl From<AuditError> for Status {
    fn from(error: AuditError) -> Status {
        match &error {
            AuditError::Invalid { .. } => Status::invalid_argument(error.to_string()),
            AuditError::Reserved { .. } => Status::permission_denied(error.to_string()),
            AuditError::KeyConflict { .. } => Status::already_exists(error.to_string()),
            AuditError::Unavailable(_) => {
                tracing::warn!(%error, "append refused");
                Status::unavailable(error.to_string())
            }
            AuditError::Storage(_) => {
                tracing::error!(%error, "ledger read failed");
                Status::unavailable("the ledger could not be read; see the brain-ops log")
            }
        }
    }
}

impl From<SafeModeError> for Status {
    fn from(error: SafeModeError) -> Status {
        match &error {
            SafeModeError::Invalid(_) => Status::invalid_argument(error.to_string()),
            SafeModeError::Unavailable(_) => {
                tracing::warn!(%error, "safe-mode change refused");
                Status::unavailable(error.to_string())
            }
        }
    }
}

impl From<OverrideError> for Status {
    fn from(error: OverrideError) -> Status {
        match &error {
            OverrideError::Invalid(_) => Status::invalid_argument(error.to_string()),
            OverrideError::NotFound(_) => Status::not_found(error.to_string()),
            OverrideError::Refused(_) => Status::failed_precondition(error.to_string()),
            OverrideError::Unavailable(_) => {
                tracing::warn!(%error, "override call refused");
                Status::unavailable(error.to_string())
            }
        }
    }
}
