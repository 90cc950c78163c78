//! The policy document, its compiled form, and `resolve`.

use std::sync::Arc;

use globset::{Candidate, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::PolicyError;
use crate::context::{Context, DeviceClass, JobSize, PowerState, Thermal, WorkKind};
use crate::decision::{Decision, Detail, Outcome, Reason};
use crate::hours::HourWindow;

/// A policy as written (JSON, snake_case). Compile it with [`Policy::compile`].
///
/// ```json
/// {
///   "is_enabled": true,
///   "allowed_commands": ["chat.*", "sessions.list"],
///   "blocked_commands": ["chat.admin.*"],
///   "require_approval": false,
///   "max_tokens_per_call": 4000,
///   "max_cost_per_hour": 2.5,
///   "max_concurrent_calls": 2,
///   "require_vpn": false,
///   "allowed_hours_utc": ["09:00-17:00", "20:00-22:00"],
///   "disallow_on_battery": false
/// }
/// ```
///
/// Absent fields: `is_enabled` true, lists empty (so nothing is allowed),
/// flags false, limits unlimited, hours unrestricted. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// A disabled policy denies everything.
    #[serde(default = "default_true")]
    pub is_enabled: bool,
    /// Globs of commands the device may run (`*` matches anything, dots included).
    #[serde(default)]
    pub allowed_commands: Vec<String>,
    /// Globs of commands refused even when allowed.
    #[serde(default)]
    pub blocked_commands: Vec<String>,
    /// Every allowed command needs approval on the primary.
    #[serde(default)]
    pub require_approval: bool,
    /// Most tokens one call may ask for (a whole number, 0 or more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_per_call: Option<f64>,
    /// Most the device may spend in any sliding hour (0 or more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_per_hour: Option<f64>,
    /// Most calls in flight at once (a whole number, 0 or more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_calls: Option<f64>,
    /// Only on the VPN.
    #[serde(default)]
    pub require_vpn: bool,
    /// UTC windows when commands may run: one `"HH:MM-HH:MM"` or a list (any matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_hours_utc: Option<HoursSpec>,
    /// Refuse while the device is on battery.
    #[serde(default)]
    pub disallow_on_battery: bool,
    /// Largest file (bytes) the device may send or be sent (`files.send`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_bytes: Option<u64>,
}

fn default_true() -> bool {
    true
}

/// `allowed_hours_utc`: one window or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HoursSpec {
    /// `"09:00-17:00"`
    One(String),
    /// `["09:00-12:00", "13:00-17:00"]`
    Many(Vec<String>),
}

impl PolicyDocument {
    /// Parses the JSON form (syntax, types and unknown fields; [`Policy::compile`] checks the rest).
    pub fn from_json(json: &str) -> Result<Self, PolicyError> {
        serde_json::from_str(json).map_err(|e| PolicyError::Document(e.to_string()))
    }

    /// The JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        // A struct of plain fields always serializes.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Thresholds of the power rules (R-POL2). The defaults are the source design's.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PowerThresholds {
    /// iOS/Android on battery: at or below this percentage, deny. Default 20.
    pub mobile_battery_stop_percent: f64,
    /// Laptop on battery: below this percentage, deny. Default 15.
    pub laptop_battery_stop_percent: f64,
    /// Laptop on battery: up to and including this percentage, small jobs only. Default 40.
    pub laptop_small_jobs_up_to_percent: f64,
    /// Non-server CPU above this percentage: defer. Default 85.
    pub cpu_defer_above_percent: f64,
    /// How long to defer for a busy CPU, milliseconds. Default 5000.
    pub cpu_defer_ms: u64,
}

impl Default for PowerThresholds {
    fn default() -> Self {
        PowerThresholds {
            mobile_battery_stop_percent: 20.0,
            laptop_battery_stop_percent: 15.0,
            laptop_small_jobs_up_to_percent: 40.0,
            cpu_defer_above_percent: 85.0,
            cpu_defer_ms: 5_000,
        }
    }
}

/// A checked, compiled policy. Globs are compiled once into sets; resolving
/// never loops over patterns one by one.
#[derive(Debug, Clone)]
pub struct Policy {
    document: PolicyDocument,
    allowed: GlobSet,
    blocked: GlobSet,
    blocked_patterns: Vec<Arc<str>>,
    hours: Option<(Vec<HourWindow>, Arc<str>)>,
    max_tokens: Option<u64>,
    max_cost_micros: Option<i128>,
    max_concurrent: Option<u32>,
    power: PowerThresholds,
}

impl Policy {
    /// Checks and compiles a document with the default power thresholds.
    /// On error nothing is built: the caller's previous policy stays in force.
    pub fn compile(document: &PolicyDocument) -> Result<Self, PolicyError> {
        Self::compile_with(document, PowerThresholds::default())
    }

    /// Checks and compiles a document with the given power thresholds.
    pub fn compile_with(
        document: &PolicyDocument,
        power: PowerThresholds,
    ) -> Result<Self, PolicyError> {
        let allowed = glob_set("allowed_commands", &document.allowed_commands)?;
        let blocked = glob_set("blocked_commands", &document.blocked_commands)?;
        let hours = match &document.allowed_hours_utc {
            None => None,
            Some(spec) => {
                let texts: Vec<&str> = match spec {
                    HoursSpec::One(s) => vec![s.as_str()],
                    HoursSpec::Many(v) => v.iter().map(String::as_str).collect(),
                };
                if texts.is_empty() {
                    return Err(PolicyError::HourWindow {
                        window: "[]".into(),
                        reason: "an empty list allows no hour at all; omit the field for no restriction",
                    });
                }
                let windows = texts
                    .iter()
                    .map(|t| HourWindow::parse(t))
                    .collect::<Result<Vec<_>, _>>()?;
                let label: Arc<str> = windows
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
                    .into();
                Some((windows, label))
            }
        };
        let max_tokens = whole_limit("max_tokens_per_call", document.max_tokens_per_call)?;
        let max_concurrent = whole_limit("max_concurrent_calls", document.max_concurrent_calls)?
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        let max_cost_micros = match document.max_cost_per_hour {
            None => None,
            Some(v) if v.is_finite() && v >= 0.0 => Some(micros(v)),
            Some(v) => {
                return Err(PolicyError::Limit {
                    field: "max_cost_per_hour",
                    value: v.to_string(),
                    reason: "must be a finite number, 0 or more",
                });
            }
        };
        Ok(Policy {
            document: document.clone(),
            allowed: allowed.0,
            blocked: blocked.0,
            blocked_patterns: blocked.1,
            hours,
            max_tokens,
            max_cost_micros,
            max_concurrent,
            power,
        })
    }

    /// Parses and compiles the JSON form.
    pub fn from_json(json: &str) -> Result<Self, PolicyError> {
        Self::compile(&PolicyDocument::from_json(json)?)
    }

    /// The document this policy was compiled from.
    pub fn document(&self) -> &PolicyDocument {
        &self.document
    }

    /// Decides `command` under this policy. Pure and deterministic; rules are
    /// checked in the documented order and the first that fails decides.
    pub fn resolve(&self, command: &str, ctx: &Context) -> Decision {
        let doc = &self.document;
        // 1. disabled
        if !doc.is_enabled {
            return Decision::deny(Reason::PolicyDisabled, Detail::None);
        }
        // 2. blocked (always wins)
        let candidate = Candidate::new(command);
        if self.blocked.is_match_candidate(&candidate) {
            let idx = self
                .blocked
                .matches_candidate(&candidate)
                .first()
                .copied()
                .unwrap_or(0);
            let pattern = self
                .blocked_patterns
                .get(idx)
                .cloned()
                .unwrap_or_else(|| "?".into());
            return Decision::deny(
                Reason::BlockedCommand,
                Detail::Blocked {
                    command: command.into(),
                    pattern,
                },
            );
        }
        // 3. allowed
        if !self.allowed.is_match_candidate(&candidate) {
            return Decision::deny(
                Reason::CommandNotAllowed,
                Detail::NotAllowed {
                    command: command.into(),
                },
            );
        }
        // 4. hour windows
        if let Some((windows, label)) = &self.hours {
            let minute = ctx.minute_of_day();
            if !windows.iter().any(|w| w.contains(minute)) {
                return Decision::deny(
                    Reason::OutsideAllowedHours,
                    Detail::Hours {
                        minute,
                        windows: label.clone(),
                    },
                );
            }
        }
        // 5. VPN
        if doc.require_vpn && !ctx.on_vpn {
            return Decision::deny(Reason::VpnRequired, Detail::None);
        }
        // 6. battery
        let on_battery = ctx
            .power
            .as_ref()
            .and_then(|p| p.on_battery)
            .unwrap_or(false);
        if doc.disallow_on_battery && on_battery {
            return Decision::deny(Reason::OnBattery, Detail::None);
        }
        // 7. power rules
        if let Some(power) = &ctx.power
            && let Some(d) = self.power_rules(power, ctx)
        {
            return d;
        }
        // 8. tokens
        if let Some(max) = self.max_tokens
            && ctx.tokens > max
        {
            return Decision::deny(
                Reason::TokensExceeded,
                Detail::Tokens {
                    requested: ctx.tokens,
                    max,
                },
            );
        }
        // 8b. file size
        if let Some(max) = doc.max_file_bytes
            && ctx.file_bytes > max
        {
            return Decision::deny(
                Reason::FileTooLarge,
                Detail::FileSize {
                    bytes: ctx.file_bytes,
                    max,
                },
            );
        }
        // 9. cost (in whole micro-units, so 0.1 + 0.2 is not over a 0.3 budget)
        if let Some(max) = self.max_cost_micros {
            // NaN or infinite usage fails closed (checked before clamping:
            // `f64::max` would turn NaN into 0).
            let finite = ctx.spent_last_hour.is_finite() && ctx.cost.is_finite();
            let spent = ctx.spent_last_hour.max(0.0);
            let cost = ctx.cost.max(0.0);
            let over = !finite || micros(spent) + micros(cost) > max;
            if over {
                return Decision::deny(
                    Reason::CostExceeded,
                    Detail::Cost {
                        spent,
                        cost,
                        max: doc.max_cost_per_hour.unwrap_or(0.0),
                    },
                );
            }
        }
        // 10. concurrency
        if let Some(max) = self.max_concurrent
            && ctx.concurrent_calls >= max
        {
            return Decision::deny(
                Reason::ConcurrencyExceeded,
                Detail::Concurrency {
                    in_flight: ctx.concurrent_calls,
                    max,
                },
            );
        }
        // 11. busy CPU on a non-server: defer
        if let Some(power) = &ctx.power
            && power.device_class != Some(DeviceClass::Server)
            && let Some(cpu) = power.cpu_percent
            && cpu > self.power.cpu_defer_above_percent
        {
            return Decision::new(
                Outcome::Defer {
                    delay_ms: self.power.cpu_defer_ms,
                },
                Reason::CpuBusy,
                Detail::Cpu {
                    percent: cpu,
                    above: self.power.cpu_defer_above_percent,
                },
            );
        }
        // 12. approval
        if doc.require_approval {
            return Decision::new(
                Outcome::NeedsApproval,
                Reason::ApprovalRequired,
                Detail::None,
            );
        }
        // 13.
        Decision::new(Outcome::Allow, Reason::Allowed, Detail::None)
    }

    /// Rule 7, in the documented order. `None` means the power rules pass.
    fn power_rules(&self, p: &PowerState, ctx: &Context) -> Option<Decision> {
        let t = &self.power;
        let class = p.device_class.unwrap_or(DeviceClass::Desktop);
        if class == DeviceClass::Server {
            return None;
        }
        if class.is_mobile() && p.low_power_mode == Some(true) {
            return Some(Decision::deny(Reason::PowerLowPowerMode, Detail::None));
        }
        if let Some(th @ (Thermal::Serious | Thermal::Critical)) = p.thermal {
            return Some(Decision::deny(Reason::PowerThermal, Detail::Thermal(th)));
        }
        if p.on_battery != Some(true) {
            return None; // external power
        }
        let peer_work = ctx.work == WorkKind::PeerDirect;
        let battery = p.battery_percent;
        // An unreadable (NaN) battery level fails closed.
        let low = |percent: f64, rule: &'static str| {
            Some(Decision::deny(
                Reason::PowerBatteryLow,
                Detail::Battery { percent, rule },
            ))
        };
        match class {
            DeviceClass::Ios | DeviceClass::Android => {
                if let Some(b) = battery
                    && (b.is_nan() || b <= t.mobile_battery_stop_percent)
                {
                    return low(
                        b,
                        "phones and tablets stop at or below the mobile stop level",
                    );
                }
                if peer_work {
                    return Some(Decision::deny(Reason::PowerPeerWorkOnBattery, Detail::None));
                }
            }
            DeviceClass::Laptop => {
                if let Some(b) = battery
                    && (b.is_nan() || b < t.laptop_battery_stop_percent)
                {
                    return low(b, "laptops stop below the laptop stop level");
                }
                if peer_work {
                    return Some(Decision::deny(Reason::PowerPeerWorkOnBattery, Detail::None));
                }
                if let Some(b) = battery
                    && b <= t.laptop_small_jobs_up_to_percent
                    && ctx.job_size == JobSize::Large
                {
                    return Some(Decision::deny(
                        Reason::PowerSmallJobsOnly,
                        Detail::Battery {
                            percent: b,
                            rule: "laptops on battery between the stop level and the small-jobs level run only small jobs",
                        },
                    ));
                }
            }
            DeviceClass::Desktop | DeviceClass::Server => {}
        }
        None
    }
}

/// Decides `command` for a device whose policy may be missing: no policy is a
/// denial with `policy_disabled` (secure default).
pub fn resolve(policy: Option<&Policy>, command: &str, ctx: &Context) -> Decision {
    match policy {
        Some(p) => p.resolve(command, ctx),
        None => Decision::deny(Reason::PolicyDisabled, Detail::NoPolicy),
    }
}

fn micros(v: f64) -> i128 {
    (v * 1_000_000.0).round() as i128
}

fn whole_limit(field: &'static str, v: Option<f64>) -> Result<Option<u64>, PolicyError> {
    match v {
        None => Ok(None),
        Some(v) if v.is_finite() && v >= 0.0 && v.fract() == 0.0 => Ok(Some(v as u64)),
        Some(v) => Err(PolicyError::Limit {
            field,
            value: v.to_string(),
            reason: if v < 0.0 {
                "limits cannot be negative"
            } else {
                "must be a whole number"
            },
        }),
    }
}

fn glob_set(
    field: &'static str,
    patterns: &[String],
) -> Result<(GlobSet, Vec<Arc<str>>), PolicyError> {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        let bad = |reason: String| PolicyError::Glob {
            field,
            glob: p.clone(),
            reason,
        };
        if p.is_empty() {
            return Err(bad("empty pattern".into()));
        }
        let glob = GlobBuilder::new(p)
            .literal_separator(false)
            .case_insensitive(false)
            .backslash_escape(true)
            .build()
            .map_err(|e| bad(e.kind().to_string()))?;
        builder.add(glob);
    }
    let set = builder.build().map_err(|e| PolicyError::Glob {
        field,
        glob: e.glob().unwrap_or("").to_owned(),
        reason: e.kind().to_string(),
    })?;
    Ok((
        set,
        patterns.iter().map(|p| Arc::from(p.as_str())).collect(),
    ))
}
