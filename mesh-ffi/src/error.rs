//! One error enum for every call, with variants an app can act on.

use mesh_core::node::NodeError;
use mesh_core::registry::RegistryError;

/// What went wrong. Each variant carries a message for people; the variant
/// (and `code`, where there is one) is for code.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The network or the peer failed (unreachable, refused, lost).
    #[error("network: {message}")]
    Network {
        /// What happened.
        message: String,
    },
    /// Pairing failed: wrong code, rejected, expired, too many attempts.
    #[error("pairing: {message}")]
    Pairing {
        /// What happened.
        message: String,
    },
    /// The other side's execution policy refused the command.
    #[error("policy denied ({code}): {message}")]
    PolicyDenied {
        /// Reason code, e.g. `blocked_command`, `needs_approval`.
        code: String,
        /// Explanation.
        message: String,
    },
    /// The command was allowed but failed (handler error, timeout, unknown
    /// command).
    #[error("command failed ({code}): {message}")]
    CommandFailed {
        /// Reason code, e.g. `handler_failed`, `unknown_action`.
        code: String,
        /// Explanation.
        message: String,
    },
    /// No answer in time.
    #[error("timed out: {message}")]
    Timeout {
        /// What timed out.
        message: String,
    },
    /// A device was refused: unknown, revoked, wrong token.
    #[error("not authorized: {message}")]
    Unauthorized {
        /// What happened.
        message: String,
    },
    /// Not possible now: not started, stopped, not paired, not connected,
    /// or an operation of the other role.
    #[error("unavailable: {message}")]
    Unavailable {
        /// Why.
        message: String,
    },
    /// The data directory, the key or the database failed.
    #[error("storage: {message}")]
    Storage {
        /// What happened.
        message: String,
    },
    /// An argument is malformed (a node id, an address, JSON, a policy).
    #[error("invalid input: {message}")]
    InvalidInput {
        /// What is wrong.
        message: String,
    },
    /// No such device, request or action.
    #[error("not found: {message}")]
    NotFound {
        /// What was looked for.
        message: String,
    },
    /// An app callback failed unexpectedly.
    #[error("callback failed: {message}")]
    Callback {
        /// What happened.
        message: String,
    },
    /// A bug in the SDK.
    #[error("internal error: {message}")]
    Internal {
        /// What happened.
        message: String,
    },
}

impl MeshError {
    pub(crate) fn invalid(message: impl std::fmt::Display) -> Self {
        MeshError::InvalidInput {
            message: message.to_string(),
        }
    }

    pub(crate) fn unavailable(message: impl std::fmt::Display) -> Self {
        MeshError::Unavailable {
            message: message.to_string(),
        }
    }
}

impl From<uniffi::UnexpectedUniFFICallbackError> for MeshError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        MeshError::Callback { message: e.reason }
    }
}

impl From<NodeError> for MeshError {
    fn from(e: NodeError) -> Self {
        let message = e.to_string();
        if let Some((code, why)) = e.policy_refusal() {
            return MeshError::PolicyDenied {
                code: code.to_owned(),
                message: why.to_owned(),
            };
        }
        match e {
            NodeError::Command { code, message } => MeshError::CommandFailed { code, message },
            NodeError::Transport(_) | NodeError::NotConnected(_) | NodeError::Discovery(_) => {
                MeshError::Network { message }
            }
            NodeError::Pairing(_) => MeshError::Pairing { message },
            NodeError::Auth(_) => MeshError::Unauthorized { message },
            NodeError::Timeout(_) => MeshError::Timeout { message },
            NodeError::Unavailable(_) | NodeError::Events(_) => MeshError::Unavailable { message },
            NodeError::Policy(_) | NodeError::Protocol(_) => MeshError::InvalidInput { message },
            NodeError::Storage(_) | NodeError::Identity(_) | NodeError::DataDir { .. } => {
                MeshError::Storage { message }
            }
            NodeError::Registry(RegistryError::UnknownDevice(_)) => MeshError::NotFound { message },
            NodeError::Registry(RegistryError::Storage(_) | RegistryError::Ledger(_)) => {
                MeshError::Storage { message }
            }
            NodeError::Registry(_) => MeshError::InvalidInput { message },
            _ => MeshError::Internal { message },
        }
    }
}
