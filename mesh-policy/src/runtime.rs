//! A [`PolicyEngine`] as mesh-core's
//! [`CommandPolicy`] ([`RuntimePolicy`]), so a primary decides
//! its workers' commands with per-device policy documents, the sliding-hour
//! spend window and concurrency permits held while the command runs.

use mesh_core::identity::NodeId;
use mesh_core::node::{CommandPolicy, CommandRequest, Permit, Verdict};
use mesh_core::wire;

use crate::{
    Context, DeviceClass, JobSize, Outcome, PolicyDocument, PolicyEngine, PowerState, Thermal,
};

/// The device class of a request: its platform as paired, and a desktop
/// that reports a battery is a laptop.
fn device_class(request: &CommandRequest<'_>) -> DeviceClass {
    match request.platform {
        wire::Platform::Ios => DeviceClass::Ios,
        wire::Platform::Android => DeviceClass::Android,
        // A browser tab has no power rules of its own: its host is judged
        // as a desktop, or a laptop if it reports a battery.
        wire::Platform::Desktop | wire::Platform::Web if request.reports_battery() => {
            DeviceClass::Laptop
        }
        wire::Platform::Desktop | wire::Platform::Web => DeviceClass::Desktop,
    }
}

/// The power context of a request: the device class, and its latest
/// heartbeat (battery, charging, low-power mode, thermal state, CPU).
///
/// What a device leaves unsaid counts against it, not for it: a phone or
/// tablet is on battery unless it reports charging (with no heartbeat yet
/// too), and a device that reports a battery level is on battery unless it
/// reports charging. So a device cannot slip past the battery rules by
/// leaving `charging` out.
fn power_state(request: &CommandRequest<'_>) -> PowerState {
    let class = device_class(request);
    let mobile = matches!(class, DeviceClass::Ios | DeviceClass::Android);
    let Some(m) = request.metrics else {
        return PowerState {
            device_class: Some(class),
            on_battery: mobile.then_some(true),
            ..PowerState::default()
        };
    };
    let charging = m.charging == Some(true);
    let on_battery = if mobile || m.battery_percent.is_some() {
        Some(!charging)
    } else {
        m.charging.map(|_| false)
    };
    PowerState {
        device_class: Some(class),
        on_battery,
        battery_percent: m.battery_percent,
        low_power_mode: m.low_power_mode,
        thermal: m.thermal.map(|t| match t {
            wire::Thermal::Nominal => Thermal::Nominal,
            wire::Thermal::Fair => Thermal::Fair,
            wire::Thermal::Serious => Thermal::Serious,
            wire::Thermal::Critical => Thermal::Critical,
        }),
        cpu_percent: m.cpu_percent,
    }
}

/// A policy engine keyed by node id.
#[derive(Debug, Default)]
pub struct RuntimePolicy {
    engine: PolicyEngine,
}

impl RuntimePolicy {
    /// An engine with no policies (every device is denied until it has one).
    pub fn new() -> Self {
        Self::default()
    }

    /// Wraps an engine configured elsewhere (e.g. custom power thresholds).
    pub fn with_engine(engine: PolicyEngine) -> Self {
        RuntimePolicy { engine }
    }

    /// The engine.
    pub fn engine(&self) -> &PolicyEngine {
        &self.engine
    }
}

impl CommandPolicy for RuntimePolicy {
    fn decide(&self, request: &CommandRequest<'_>) -> (Verdict, Permit) {
        let mut ctx = Context::at(request.now.as_millis());
        ctx.power = Some(power_state(request));
        ctx.cost = request.usage.cost.unwrap_or(0.0);
        ctx.tokens = request.usage.tokens.unwrap_or(0);
        ctx.file_bytes = request.file_bytes.unwrap_or(0);
        ctx.job_size = match request.usage.job_size.unwrap_or_default() {
            wire::JobSize::Small => JobSize::Small,
            wire::JobSize::Large => JobSize::Large,
        };
        let auth = self
            .engine
            .authorize(&request.device.to_string(), request.command, ctx);
        let d = auth.decision;
        let (code, message) = (d.reason().code().to_owned(), d.message());
        let verdict = match d.outcome() {
            Outcome::Allow => Verdict::Allow,
            Outcome::Deny => Verdict::Deny { code, message },
            Outcome::NeedsApproval => Verdict::NeedsApproval { code, message },
            Outcome::Defer { delay_ms } => Verdict::Defer {
                delay_ms,
                code,
                message,
            },
        };
        let permit = auth.permit.map_or_else(Permit::none, Permit::holding);
        (verdict, permit)
    }

    fn validate(&self, document: &str) -> Result<(), String> {
        PolicyDocument::from_json(document)
            .and_then(|doc| self.engine.check(&doc))
            .map_err(|e| e.to_string())
    }

    fn install(&self, device: &NodeId, document: &str) -> Result<(), String> {
        let doc = PolicyDocument::from_json(document).map_err(|e| e.to_string())?;
        self.engine
            .set_policy(&device.to_string(), &doc)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn remove(&self, device: &NodeId) {
        self.engine.remove_policy(&device.to_string());
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::clock::Timestamp;
    use mesh_core::identity::NodeKey;
    use mesh_core::wire::HealthMetrics;

    use super::*;

    fn node() -> NodeId {
        NodeKey::from_secret_bytes(&[3; 32]).node_id()
    }

    static NODE: std::sync::LazyLock<NodeId> = std::sync::LazyLock::new(node);

    fn req<'a>(
        command: &'a str,
        now: Timestamp,
        metrics: Option<&'a HealthMetrics>,
    ) -> CommandRequest<'a> {
        CommandRequest::new(&NODE, command, now).metrics(metrics)
    }

    #[test]
    fn documents_drive_the_verdicts_and_permits_are_held() {
        let p = RuntimePolicy::new();
        let now = Timestamp::from_millis(1_750_000_000_000);
        assert!(
            matches!(p.decide(&req("a.b", now, None)).0, Verdict::Deny { code, .. } if code == "policy_disabled" || code == "no_policy")
        );
        let doc = r#"{"allowed_commands": ["notes.*"], "blocked_commands": ["notes.delete"], "max_concurrent_calls": 1}"#;
        p.install(&node(), doc).unwrap();
        let (allow, permit) = p.decide(&req("notes.write", now, None));
        assert_eq!(allow, Verdict::Allow);
        // The one slot is taken while the first command runs.
        assert!(!matches!(
            p.decide(&req("notes.write", now, None)).0,
            Verdict::Allow
        ));
        drop(permit);
        assert_eq!(p.decide(&req("notes.write", now, None)).0, Verdict::Allow);
        match p.decide(&req("notes.delete", now, None)).0 {
            Verdict::Deny { code, message } => {
                assert_eq!(code, "blocked_command");
                assert!(message.contains("notes.delete"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            p.install(&node(), "{\"allowed_commands\": [\"[\"]}")
                .is_err()
        );
        // A busy CPU on the device defers the command.
        let busy = HealthMetrics {
            cpu_percent: Some(99.0),
            ..HealthMetrics::default()
        };
        assert!(matches!(
            p.decide(&req("notes.write", now, Some(&busy))).0,
            Verdict::Defer { .. }
        ));
        p.remove(&node());
        assert!(matches!(
            p.decide(&req("notes.write", now, None)).0,
            Verdict::Deny { .. }
        ));
    }

    #[test]
    fn what_a_device_leaves_unsaid_counts_against_it() {
        let p = RuntimePolicy::new();
        let now = Timestamp::from_millis(1_750_000_000_000);
        p.install(&node(), r#"{"allowed_commands": ["jobs.*"]}"#)
            .unwrap();
        let code = |platform: wire::Platform, m: Option<&HealthMetrics>, large: bool| {
            let usage = wire::CommandUsage {
                job_size: Some(if large {
                    wire::JobSize::Large
                } else {
                    wire::JobSize::Small
                }),
                ..wire::CommandUsage::default()
            };
            let r = req("jobs.run", now, m).platform(platform).usage(usage);
            match p.decide(&r).0 {
                Verdict::Allow => "allow".to_owned(),
                Verdict::Deny { code, .. } | Verdict::NeedsApproval { code, .. } => code,
                Verdict::Defer { code, .. } => code,
            }
        };
        // A phone at 3 % that does not say whether it charges: on battery.
        let low = HealthMetrics {
            battery_percent: Some(3.0),
            ..HealthMetrics::default()
        };
        assert_eq!(
            code(wire::Platform::Android, Some(&low), false),
            "power_battery_low"
        );
        assert_eq!(
            code(wire::Platform::Ios, Some(&low), false),
            "power_battery_low"
        );
        // Saying it charges lifts the battery rule.
        let charging = HealthMetrics {
            charging: Some(true),
            ..low.clone()
        };
        assert_eq!(
            code(wire::Platform::Android, Some(&charging), false),
            "allow"
        );
        // A laptop (a desktop reporting a battery) at 30 %, charging unsaid:
        // small jobs only.
        let laptop = HealthMetrics {
            battery_percent: Some(30.0),
            ..HealthMetrics::default()
        };
        assert_eq!(
            code(wire::Platform::Desktop, Some(&laptop), true),
            "power_small_jobs_only"
        );
        assert_eq!(code(wire::Platform::Desktop, Some(&laptop), false), "allow");
        // A desktop with no battery, and a phone with no heartbeat yet (its
        // level unknown: nothing to stop it on), run.
        assert_eq!(code(wire::Platform::Desktop, None, true), "allow");
        assert_eq!(code(wire::Platform::Ios, None, false), "allow");
    }
}
