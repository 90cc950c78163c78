//! The result of resolving a request: what to do, why (a stable code), and a sentence.

use std::fmt;
use std::sync::Arc;

use serde_json::json;

use crate::context::Thermal;

/// What to do with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Run it.
    Allow,
    /// Refuse it.
    Deny,
    /// Ask the user on the primary first.
    NeedsApproval,
    /// Try again after the delay.
    Defer {
        /// How long to wait, milliseconds.
        delay_ms: u64,
    },
}

impl Outcome {
    /// `allow`, `deny`, `needs_approval` or `defer`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::NeedsApproval => "needs_approval",
            Outcome::Defer { .. } => "defer",
        }
    }
}

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident => $code:literal,)*) => {
        /// The rule that decided, as a stable machine-readable code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, in evaluation order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The code, e.g. `blocked_command`.
            pub fn code(&self) -> &'static str {
                match self {
                    $(Reason::$variant => $code,)*
                }
            }
        }
    };
}

reasons! {
    /// 1. No policy for the device, or it is disabled.
    PolicyDisabled => "policy_disabled",
    /// 2. A blocked glob matches.
    BlockedCommand => "blocked_command",
    /// 3. No allowed glob matches.
    CommandNotAllowed => "command_not_allowed",
    /// 4. Outside every hour window.
    OutsideAllowedHours => "outside_allowed_hours",
    /// 5. VPN required.
    VpnRequired => "vpn_required",
    /// 6. On battery while the policy disallows it.
    OnBattery => "on_battery",
    /// 7. Phone or tablet in low-power mode.
    PowerLowPowerMode => "power_low_power_mode",
    /// 7. Thermal state serious or critical.
    PowerThermal => "power_thermal",
    /// 7. Battery at or below the stop level.
    PowerBatteryLow => "power_battery_low",
    /// 7. Peer-direct work on battery.
    PowerPeerWorkOnBattery => "power_peer_work_on_battery",
    /// 7. Laptop in the small-jobs-only band asked for a large job.
    PowerSmallJobsOnly => "power_small_jobs_only",
    /// 8. More tokens than allowed per call.
    TokensExceeded => "tokens_exceeded",
    /// 8b. A file larger than `max_file_bytes`.
    FileTooLarge => "file_too_large",
    /// 9. Hourly cost budget would be exceeded.
    CostExceeded => "cost_exceeded",
    /// 10. Too many calls in flight.
    ConcurrencyExceeded => "concurrency_exceeded",
    /// 11. CPU busy: try later.
    CpuBusy => "cpu_busy",
    /// 12. The policy requires approval.
    ApprovalRequired => "approval_required",
    /// 13. Every rule passed.
    Allowed => "allowed",
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Facts behind a decision, turned into a sentence only when asked for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Detail {
    None,
    NoPolicy,
    Blocked {
        command: Box<str>,
        pattern: Arc<str>,
    },
    NotAllowed {
        command: Box<str>,
    },
    Hours {
        minute: u16,
        windows: Arc<str>,
    },
    Battery {
        percent: f64,
        rule: &'static str,
    },
    Thermal(Thermal),
    Tokens {
        requested: u64,
        max: u64,
    },
    FileSize {
        bytes: u64,
        max: u64,
    },
    Cost {
        spent: f64,
        cost: f64,
        max: f64,
    },
    Concurrency {
        in_flight: u32,
        max: u32,
    },
    Cpu {
        percent: f64,
        above: f64,
    },
}

/// A policy decision: the outcome, the reason code and the facts behind it.
///
/// Deterministic: the same policy, command and context give the same decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    outcome: Outcome,
    reason: Reason,
    detail: Detail,
}

impl Decision {
    pub(crate) fn new(outcome: Outcome, reason: Reason, detail: Detail) -> Self {
        Decision {
            outcome,
            reason,
            detail,
        }
    }

    pub(crate) fn deny(reason: Reason, detail: Detail) -> Self {
        Decision::new(Outcome::Deny, reason, detail)
    }

    /// What to do.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The rule that decided.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// Whether the request may run now.
    pub fn is_allowed(&self) -> bool {
        self.outcome == Outcome::Allow
    }

    /// The glob that decided, for `blocked_command`.
    pub fn pattern(&self) -> Option<&str> {
        match &self.detail {
            Detail::Blocked { pattern, .. } => Some(pattern),
            _ => None,
        }
    }

    /// A sentence for people naming the rule (and the pattern) that decided.
    pub fn message(&self) -> String {
        match &self.detail {
            Detail::NoPolicy => "denied: no policy is set for this device (secure default)".into(),
            Detail::Blocked { command, pattern } => {
                format!("denied: `{command}` matches blocked pattern `{pattern}` (blocked_commands always wins)")
            }
            Detail::NotAllowed { command } => {
                format!("denied: `{command}` matches no pattern in allowed_commands")
            }
            Detail::Hours { minute, windows } => format!(
                "denied: {:02}:{:02} UTC is outside allowed_hours_utc ({windows})",
                minute / 60,
                minute % 60
            ),
            Detail::Battery { percent, rule } => format!("denied: battery at {percent}% ({rule})"),
            Detail::Thermal(t) => {
                let state = match t {
                    Thermal::Nominal => "nominal",
                    Thermal::Fair => "fair",
                    Thermal::Serious => "serious",
                    Thermal::Critical => "critical",
                };
                format!("denied: thermal state is {state}; work waits until the device cools (power rule)")
            }
            Detail::Tokens { requested, max } => {
                format!("denied: {requested} tokens requested, max_tokens_per_call is {max}")
            }
            Detail::FileSize { bytes, max } => {
                format!("denied: a file of {bytes} bytes, max_file_bytes is {max}")
            }
            Detail::Cost { spent, cost, max } => format!(
                "denied: spent {spent} in the last hour plus estimated {cost} exceeds max_cost_per_hour {max}"
            ),
            Detail::Concurrency { in_flight, max } => {
                format!("denied: {in_flight} calls in flight, max_concurrent_calls is {max}")
            }
            Detail::Cpu { percent, above } => match self.outcome {
                Outcome::Defer { delay_ms } => format!(
                    "deferred: CPU at {percent}% (above {above}%); retry in {delay_ms} ms (power rule)"
                ),
                _ => format!("CPU at {percent}%"),
            },
            Detail::None => match self.reason {
                Reason::PolicyDisabled => "denied: the device's policy is disabled (is_enabled: false)".into(),
                Reason::VpnRequired => "denied: require_vpn is set and the device is not on the VPN".into(),
                Reason::OnBattery => "denied: disallow_on_battery is set and the device is on battery".into(),
                Reason::PowerLowPowerMode => "denied: the device is in low-power mode (power rule)".into(),
                Reason::PowerPeerWorkOnBattery => {
                    "denied: peer-direct work is not run on battery; coordinator work still is (power rule)".into()
                }
                Reason::ApprovalRequired => {
                    "needs approval: the policy sets require_approval; approve or reject on the primary".into()
                }
                Reason::Allowed => "allowed: the command passed every rule of the policy".into(),
                other => other.code().replace('_', " "),
            },
        }
    }

    /// The JSON form: `{"decision", "reason", "message", "defer_ms"?}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = json!({
            "decision": self.outcome.as_str(),
            "reason": self.reason.code(),
            "message": self.message(),
        });
        if let Outcome::Defer { delay_ms } = self.outcome {
            v["defer_ms"] = json!(delay_ms);
        }
        v
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}
