//! Errors: a policy refused at set time, a context refused before resolving.

/// Why a policy document was refused. Nothing of a refused document is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Not valid JSON, an unknown field, or a value of the wrong type.
    #[error("invalid policy document: {0}")]
    Document(String),
    /// A command pattern is not a valid glob.
    #[error("invalid glob {glob:?} in {field}: {reason}")]
    Glob {
        /// `allowed_commands` or `blocked_commands`.
        field: &'static str,
        /// The pattern as written.
        glob: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry of `allowed_hours_utc` is malformed or empty.
    #[error(
        "invalid hour window {window:?} in allowed_hours_utc: {reason} (expected \"HH:MM-HH:MM\", e.g. \"09:00-17:00\" or \"22:00-06:00\")"
    )]
    HourWindow {
        /// The window as written.
        window: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A limit is negative, fractional where it must be whole, or not finite.
    #[error("invalid limit {field} = {value}: {reason}")]
    Limit {
        /// The field.
        field: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl PolicyError {
    /// A stable machine-readable kind: `invalid_document`, `invalid_glob`,
    /// `invalid_hour_window` or `invalid_limit`.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyError::Document(_) => "invalid_document",
            PolicyError::Glob { .. } => "invalid_glob",
            PolicyError::HourWindow { .. } => "invalid_hour_window",
            PolicyError::Limit { .. } => "invalid_limit",
        }
    }
}

/// Why a request context was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// Not valid JSON, an unknown field, or a value of the wrong type.
    #[error("invalid context: {0}")]
    Document(String),
    /// `now_utc` is not an RFC 3339 time.
    #[error("invalid now_utc {0:?}: expected RFC 3339, e.g. \"2026-11-21T09:30:00Z\"")]
    Time(String),
    /// A number out of its range (negative usage, battery over 100 %, NaN, …).
    #[error("invalid context value {field} = {value}: {reason}")]
    Value {
        /// The field.
        field: &'static str,
        /// The value as given.
        value: String,
        /// The allowed range.
        reason: &'static str,
    },
}
