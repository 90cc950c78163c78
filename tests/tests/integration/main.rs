//! Cross-crate integration tests, written the way an app uses the SDK.
//! One test binary; one module per area.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod audit;
mod dashboard_browser;
mod delivery_runtime;
mod discovery_netns;
mod files_runtime;
mod foundation;
mod gateway;
mod hardening;
mod ledger_crash;
mod ledger_sync;
mod mesh_runtime;
mod node_e2e;
mod node_policy;
mod storage_crash;
mod support;
mod sync_runtime;
