//! Per-device execution policies for the mesh SDK.
//!
//! A policy says which commands a device may run, when, how much, and under
//! what power conditions. [`Policy::resolve`] turns `(policy, command,
//! context)` into a [`Decision`]: allow, deny, needs approval, or defer — with
//! a stable reason code and a sentence naming the rule (and the glob) that
//! decided. It is a pure, deterministic function; [`PolicyEngine`] wraps it
//! with per-device state (a sliding-hour spend tracker and a concurrency
//! limiter). The crate stands alone: `cargo add mesh-policy`.
//!
//! # Example
//!
//! ```
//! use mesh_policy::{Context, Outcome, Policy};
//!
//! let policy = Policy::from_json(r#"{
//!     "allowed_commands": ["chat.*", "sessions.list"],
//!     "blocked_commands": ["chat.admin.*"],
//!     "allowed_hours_utc": "09:00-17:00",
//!     "max_tokens_per_call": 4000
//! }"#)?;
//!
//! let at_ten = Context::at(10 * 3_600_000); // 10:00 UTC on 1970-01-01
//! assert_eq!(policy.resolve("chat.send", &at_ten).outcome(), Outcome::Allow);
//!
//! let blocked = policy.resolve("chat.admin.kick", &at_ten);
//! assert_eq!(blocked.reason().code(), "blocked_command");
//! assert_eq!(blocked.pattern(), Some("chat.admin.*"));
//!
//! let at_night = Context::at(23 * 3_600_000);
//! assert_eq!(policy.resolve("chat.send", &at_night).reason().code(), "outside_allowed_hours");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The policy document
//!
//! JSON, snake_case ([`PolicyDocument`]): `is_enabled`, `allowed_commands`
//! (globs), `blocked_commands` (globs), `require_approval`,
//! `max_tokens_per_call`, `max_cost_per_hour`, `max_concurrent_calls`,
//! `require_vpn`, `allowed_hours_utc` (`"09:00-17:00"` or a list),
//! `disallow_on_battery`, `max_file_bytes`. Absent limits mean no limit; absent lists allow
//! nothing. A device with no policy, or a disabled one, is denied.
//!
//! * **Globs**: `*` matches any characters, dots included (`chat.*` matches
//!   `chat.send` and `chat.a.b`; `*` matches everything); `?`, `[abc]` and
//!   `{a,b}` work as in globset; case-sensitive. Compiled once into sets.
//! * **Hour windows** (UTC): start inclusive, end exclusive, minute resolution;
//!   `22:00-06:00` wraps midnight; `00:00-24:00` is all day; several windows
//!   mean any of them.
//! * **Refused at set time**, with nothing applied ([`PolicyError`]): a bad or
//!   empty glob, a malformed or empty window (`25:00-26:00`, `9-17`,
//!   `09:00-09:00`, `[]`), negative or fractional limits, unknown fields.
//!
//! # The request context
//!
//! [`Context`] in Rust; [`ContextDocument`] in JSON with these fields, all
//! optional: `now_utc` (RFC 3339; absent = now), `tokens`, `cost`,
//! `spent_last_hour`, `concurrent_calls` (absent = 0), `on_vpn` (absent =
//! false), `power: {device_class, on_battery, battery_percent,
//! low_power_mode, thermal, cpu_percent}` (absent = power rules skipped),
//! `work` (`coordinator` | `peer_direct`, absent = `coordinator`), `job_size`
//! (`small` | `large`, absent = `small`). `device_class` is `ios`, `android`,
//! `desktop`, `laptop` or `server` (absent = `desktop`); `thermal` is
//! `nominal`, `fair`, `serious` or `critical`. A battery percentage that is
//! not reported is not judged.
//!
//! # Evaluation order
//!
//! The first rule that fails decides (reason codes in brackets):
//!
//! 1. no policy / disabled \[`policy_disabled`\] → deny
//! 2. a blocked glob matches \[`blocked_command`\] → deny (block always wins)
//! 3. no allowed glob matches \[`command_not_allowed`\] → deny
//! 4. outside every hour window \[`outside_allowed_hours`\] → deny
//! 5. VPN required, not on VPN \[`vpn_required`\] → deny
//! 6. `disallow_on_battery` and on battery \[`on_battery`\] → deny
//! 7. power rules, when a power state is given: server → skip; iOS/Android in
//!    low-power mode \[`power_low_power_mode`\] → deny; thermal serious or
//!    critical \[`power_thermal`\] → deny; external power → pass; iOS/Android on
//!    battery: ≤ 20 % \[`power_battery_low`\] → deny, peer-direct work
//!    \[`power_peer_work_on_battery`\] → deny; laptop on battery: < 15 %
//!    \[`power_battery_low`\] → deny, peer-direct work
//!    \[`power_peer_work_on_battery`\] → deny, 15–40 % and a large job
//!    \[`power_small_jobs_only`\] → deny (thresholds: [`PowerThresholds`])
//! 8. tokens > `max_tokens_per_call` \[`tokens_exceeded`\] → deny; a file
//!    (`files.send`) larger than `max_file_bytes` \[`file_too_large`\] → deny
//! 9. spend in the last hour + cost > `max_cost_per_hour` \[`cost_exceeded`\] → deny
//! 10. calls in flight ≥ `max_concurrent_calls` \[`concurrency_exceeded`\] → deny
//! 11. non-server with CPU > 85 % \[`cpu_busy`\] → defer (5 s)
//! 12. `require_approval` \[`approval_required`\] → needs approval
//! 13. otherwise \[`allowed`\] → allow
//!
//! # Feature flags
//!
//! None.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod context;
mod decision;
mod engine;
mod error;
mod hours;
mod policy;
pub mod presets;
#[cfg(feature = "runtime")]
pub mod runtime;

pub use context::{Context, ContextDocument, DeviceClass, JobSize, PowerState, Thermal, WorkKind};
pub use decision::{Decision, Outcome, Reason};
pub use engine::{Authorization, CallPermit, PolicyEngine, SPEND_WINDOW_MS, SpendWindow};
pub use error::{ContextError, PolicyError};
pub use hours::HourWindow;
pub use policy::{HoursSpec, Policy, PolicyDocument, PowerThresholds, resolve};

#[cfg(test)]
mod tests;
