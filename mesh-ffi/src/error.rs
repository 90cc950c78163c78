//! One error enum for every call, with variants an app can act on.

use mesh_core::node::{FilesErrorKind, MeshErrorKind, NodeError, SyncErrorKind};
use mesh_core::registry::RegistryError;

/// What went wrong. Each variant carries `detail`, a message for people;
/// the variant (and `code`, where there is one) is for code. (Not named
/// `message`: Kotlin exceptions have that already.)
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The network or the peer failed (unreachable, refused, lost).
    #[error("network: {detail}")]
    Network {
        /// What happened.
        detail: String,
    },
    /// Pairing failed: wrong code, rejected, expired, too many attempts.
    #[error("pairing: {detail}")]
    Pairing {
        /// What happened.
        detail: String,
    },
    /// The other side's execution policy refused the command.
    #[error("policy denied ({code}): {detail}")]
    PolicyDenied {
        /// Reason code, e.g. `blocked_command`, `needs_approval`.
        code: String,
        /// Explanation.
        detail: String,
    },
    /// The command was allowed but failed (handler error, timeout, unknown
    /// command).
    #[error("command failed ({code}): {detail}")]
    CommandFailed {
        /// Reason code, e.g. `handler_failed`, `unknown_action`.
        code: String,
        /// Explanation.
        detail: String,
    },
    /// No answer in time.
    #[error("timed out: {detail}")]
    Timeout {
        /// What timed out.
        detail: String,
    },
    /// A device was refused: unknown, revoked, wrong token.
    #[error("not authorized: {detail}")]
    Unauthorized {
        /// What happened.
        detail: String,
    },
    /// Not possible now: not started, stopped, not paired, not connected,
    /// or an operation of the other role.
    #[error("unavailable: {detail}")]
    Unavailable {
        /// Why.
        detail: String,
    },
    /// The data directory, the key or the database failed.
    #[error("storage: {detail}")]
    Storage {
        /// What happened.
        detail: String,
    },
    /// An argument is malformed (a node id, an address, JSON, a policy).
    #[error("invalid input: {detail}")]
    InvalidInput {
        /// What is wrong.
        detail: String,
    },
    /// No such device, request or action.
    #[error("not found: {detail}")]
    NotFound {
        /// What was looked for.
        detail: String,
    },
    /// Joining the mesh was refused, or a mesh operation failed: `code`
    /// is `token_invalid`, `token_expired`, `token_used`, `token_revoked`,
    /// `issuer_unreachable` or `join_refused`.
    #[error("mesh ({code}): {detail}")]
    Join {
        /// The error kind.
        code: String,
        /// Explanation.
        detail: String,
    },
    /// A replicated write was refused: `code` is `exists` (a row inserted
    /// that is there) or `full` (a namespace, or the number of namespaces,
    /// at its limit).
    #[error("replicated state ({code}): {detail}")]
    Replica {
        /// The error kind.
        code: String,
        /// Explanation.
        detail: String,
    },
    /// A file transfer was refused or failed: `code` is `bad_name`,
    /// `forbidden` (no `files:write` scope, or the policy does not allow
    /// `files.send`), `too_large`, `not_paired`, `already_ended` or `busy`.
    #[error("file transfer ({code}): {detail}")]
    File {
        /// The error kind.
        code: String,
        /// Explanation.
        detail: String,
    },
    /// An app callback failed unexpectedly.
    #[error("callback failed: {detail}")]
    Callback {
        /// What happened.
        detail: String,
    },
    /// A bug in the SDK.
    #[error("internal error: {detail}")]
    Internal {
        /// What happened.
        detail: String,
    },
}

impl MeshError {
    pub(crate) fn invalid(message: impl std::fmt::Display) -> Self {
        MeshError::InvalidInput {
            detail: message.to_string(),
        }
    }

    pub(crate) fn unavailable(message: impl std::fmt::Display) -> Self {
        MeshError::Unavailable {
            detail: message.to_string(),
        }
    }
}

impl From<uniffi::UnexpectedUniFFICallbackError> for MeshError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        MeshError::Callback { detail: e.reason }
    }
}

impl From<NodeError> for MeshError {
    fn from(e: NodeError) -> Self {
        let detail = e.to_string();
        if let Some((code, why)) = e.policy_refusal() {
            return MeshError::PolicyDenied {
                code: code.to_owned(),
                detail: why.to_owned(),
            };
        }
        match e {
            NodeError::Mesh { kind, message } => match kind {
                MeshErrorKind::NotFound => MeshError::NotFound { detail: message },
                MeshErrorKind::InvalidArgument => MeshError::InvalidInput { detail: message },
                MeshErrorKind::Left | MeshErrorKind::Disabled => {
                    MeshError::Unavailable { detail: message }
                }
                _ => MeshError::Join {
                    code: kind.code().into(),
                    detail: message,
                },
            },
            NodeError::Sync { kind, message } => match kind {
                SyncErrorKind::NotFound => MeshError::NotFound { detail: message },
                SyncErrorKind::InvalidArgument | SyncErrorKind::ValueTooLarge => {
                    MeshError::InvalidInput { detail: message }
                }
                SyncErrorKind::Disabled | SyncErrorKind::Unavailable => {
                    MeshError::Unavailable { detail: message }
                }
                _ => MeshError::Replica {
                    code: kind.code().into(),
                    detail: message,
                },
            },
            NodeError::Files { kind, message } => match kind {
                FilesErrorKind::NotFound => MeshError::NotFound { detail: message },
                FilesErrorKind::InvalidArgument => MeshError::InvalidInput { detail: message },
                _ => MeshError::File {
                    code: kind.as_str().into(),
                    detail: message,
                },
            },
            NodeError::Command { code, message } => MeshError::CommandFailed {
                code,
                detail: message,
            },
            NodeError::Transport(_)
            | NodeError::NotConnected(_)
            | NodeError::DeviceOffline(_)
            | NodeError::Discovery(_) => MeshError::Network { detail },
            NodeError::Pairing(_) => MeshError::Pairing { detail },
            NodeError::Auth(_) => MeshError::Unauthorized { detail },
            NodeError::Timeout(_) => MeshError::Timeout { detail },
            NodeError::Unavailable(_) | NodeError::Events(_) => MeshError::Unavailable { detail },
            NodeError::NotFound(_) => MeshError::NotFound { detail },
            NodeError::Policy(_) | NodeError::Protocol(_) => MeshError::InvalidInput { detail },
            NodeError::Storage(_) | NodeError::Identity(_) | NodeError::DataDir { .. } => {
                MeshError::Storage { detail }
            }
            NodeError::Registry(RegistryError::UnknownDevice(_)) => MeshError::NotFound { detail },
            NodeError::Registry(RegistryError::Storage(_) | RegistryError::Ledger(_)) => {
                MeshError::Storage { detail }
            }
            NodeError::Registry(_) => MeshError::InvalidInput { detail },
            _ => MeshError::Internal { detail },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(code: &str) -> MeshError {
        NodeError::Command {
            code: code.into(),
            message: "why".into(),
        }
        .into()
    }

    #[test]
    fn policy_refusals_and_failures_are_told_apart() {
        for code in [
            "blocked_command",
            "command_not_allowed",
            "needs_approval",
            "deferred",
        ] {
            assert!(
                matches!(command(code), MeshError::PolicyDenied { code: c, .. } if c == code),
                "{code}"
            );
        }
        for code in mesh_core::node::FAILURE_CODES {
            assert!(
                matches!(command(code), MeshError::CommandFailed { code: c, .. } if c == *code),
                "{code}"
            );
        }
    }

    #[test]
    fn other_errors_map_to_what_an_app_can_act_on() {
        let timeout: MeshError = NodeError::Timeout(std::time::Duration::from_secs(1)).into();
        assert!(matches!(timeout, MeshError::Timeout { .. }));
        let off: MeshError = NodeError::Unavailable("not paired".into()).into();
        assert!(matches!(off, MeshError::Unavailable { detail } if detail.contains("not paired")));
        let policy: MeshError = NodeError::Policy("bad glob".into()).into();
        assert!(matches!(policy, MeshError::InvalidInput { .. }));
    }
}
