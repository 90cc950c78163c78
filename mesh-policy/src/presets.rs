//! Progressive trust presets (R-POL6): restrictive for new devices, wider once trusted.

use crate::policy::PolicyDocument;

/// Trust level (0.0–1.0) from which [`for_trust_level`] returns the trusted preset.
pub const TRUSTED_FROM: f64 = 0.7;

/// For a device just paired: read-only and status commands, everything else
/// needs approval, one call at a time, a small budget, never shell or admin commands.
pub fn new_device() -> PolicyDocument {
    PolicyDocument {
        is_enabled: true,
        allowed_commands: vec![
            "ping".into(),
            "status.*".into(),
            "health.*".into(),
            "*.list".into(),
            "*.get".into(),
        ],
        blocked_commands: vec!["shell.*".into(), "admin.*".into(), "fs.delete*".into()],
        require_approval: true,
        max_tokens_per_call: Some(1_000.0),
        max_cost_per_hour: Some(0.5),
        max_concurrent_calls: Some(1.0),
        require_vpn: false,
        allowed_hours_utc: None,
        disallow_on_battery: false,
        max_file_bytes: None,
    }
}

/// For a device that earned trust: any command but shell and admin ones, no
/// approval, a larger budget.
pub fn trusted() -> PolicyDocument {
    PolicyDocument {
        is_enabled: true,
        allowed_commands: vec!["*".into()],
        blocked_commands: vec!["shell.*".into(), "admin.*".into()],
        require_approval: false,
        max_tokens_per_call: Some(32_000.0),
        max_cost_per_hour: Some(10.0),
        max_concurrent_calls: Some(4.0),
        require_vpn: false,
        allowed_hours_utc: None,
        disallow_on_battery: false,
        max_file_bytes: None,
    }
}

/// The preset for a trust level: [`trusted`] from [`TRUSTED_FROM`], else [`new_device`].
/// NaN counts as untrusted.
pub fn for_trust_level(trust: f64) -> PolicyDocument {
    if trust >= TRUSTED_FROM {
        trusted()
    } else {
        new_device()
    }
}
