//! A [`PolicyEngine`] as mesh-core's
//! [`CommandPolicy`] ([`RuntimePolicy`]), so a primary decides
//! its workers' commands with per-device policy documents, the sliding-hour
//! spend window and concurrency permits held while the command runs.

use mesh_core::clock::Timestamp;
use mesh_core::identity::NodeId;
use mesh_core::node::{CommandPolicy, Permit, Verdict};
use mesh_core::wire::{self, HealthMetrics};

use crate::{Context, Outcome, PolicyDocument, PolicyEngine, PowerState, Thermal};

/// The power context of a heartbeat.
fn power_state(m: &HealthMetrics) -> PowerState {
    PowerState {
        on_battery: m.charging.map(|c| !c),
        battery_percent: m.battery_percent,
        low_power_mode: m.low_power_mode,
        thermal: m.thermal.map(|t| match t {
            wire::Thermal::Nominal => Thermal::Nominal,
            wire::Thermal::Fair => Thermal::Fair,
            wire::Thermal::Serious => Thermal::Serious,
            wire::Thermal::Critical => Thermal::Critical,
        }),
        cpu_percent: m.cpu_percent,
        ..PowerState::default()
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
    fn decide(
        &self,
        device: &NodeId,
        command: &str,
        now: Timestamp,
        metrics: Option<&HealthMetrics>,
    ) -> (Verdict, Permit) {
        let mut ctx = Context::at(now.as_millis());
        ctx.power = metrics.map(power_state);
        let auth = self.engine.authorize(&device.to_string(), command, ctx);
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
    use mesh_core::identity::NodeKey;

    use super::*;

    fn node() -> NodeId {
        NodeKey::from_secret_bytes(&[3; 32]).node_id()
    }

    #[test]
    fn documents_drive_the_verdicts_and_permits_are_held() {
        let p = RuntimePolicy::new();
        let now = Timestamp::from_millis(1_750_000_000_000);
        assert!(
            matches!(p.decide(&node(), "a.b", now, None).0, Verdict::Deny { code, .. } if code == "policy_disabled" || code == "no_policy")
        );
        let doc = r#"{"allowed_commands": ["notes.*"], "blocked_commands": ["notes.delete"], "max_concurrent_calls": 1}"#;
        p.install(&node(), doc).unwrap();
        let (allow, permit) = p.decide(&node(), "notes.write", now, None);
        assert_eq!(allow, Verdict::Allow);
        // The one slot is taken while the first command runs.
        assert!(!matches!(
            p.decide(&node(), "notes.write", now, None).0,
            Verdict::Allow
        ));
        drop(permit);
        assert_eq!(
            p.decide(&node(), "notes.write", now, None).0,
            Verdict::Allow
        );
        match p.decide(&node(), "notes.delete", now, None).0 {
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
            p.decide(&node(), "notes.write", now, Some(&busy)).0,
            Verdict::Defer { .. }
        ));
        p.remove(&node());
        assert!(matches!(
            p.decide(&node(), "notes.write", now, None).0,
            Verdict::Deny { .. }
        ));
    }
}
