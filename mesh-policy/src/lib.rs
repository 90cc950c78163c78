//! Per-device execution policies for the mesh SDK.
//!
//! **Status: not implemented yet.** This crate will resolve
//! `(device, command, context)` to allowed / denied / needs-approval / deferred
//! with a reason code: command globs, hour windows, cost and concurrency
//! limits, and the power rules (issue 3). Until then it exports nothing.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
