//! The native engine and Cedar, given the same fixture policies, make the same
//! allow/deny decision on thousands of requests covering every case the
//! benchmark times. Run before trusting any timing comparison.
#![allow(clippy::unwrap_used)]

#[path = "../common/policy_fixture.rs"]
mod policy_fixture;

use std::collections::BTreeMap;

use cedar_policy::{Authorizer, Decision, Entities};
use policy_fixture::*;

#[test]
fn native_and_cedar_decide_the_same() {
    let authorizer = Authorizer::new();
    let entities = Entities::empty();
    for (n_devices, n_patterns, n_requests, check_full) in [
        (5, 3, 3000, true),
        (50, 10, 3000, true),
        (20, 100, 2000, false),
    ] {
        let devs = devices(n_devices, n_patterns, 7);
        let native = native(&devs);
        let sliced = cedar_sliced(&devs);
        let full = check_full.then(|| cedar_full(&devs));
        let mut by_reason: BTreeMap<&'static str, usize> = BTreeMap::new();
        for r in requests(&devs, n_requests, 11 + n_devices as u64) {
            let decision =
                mesh_policy::resolve(native.get(&devs[r.device].id), &r.command, &r.context());
            *by_reason.entry(decision.reason().code()).or_default() += 1;
            let request = r.cedar(&devs);
            let cedar = authorizer.is_authorized(&request, &sliced[&devs[r.device].id], &entities);
            let errors: Vec<String> = cedar
                .diagnostics()
                .errors()
                .map(ToString::to_string)
                .collect();
            assert!(
                errors.is_empty(),
                "Cedar evaluation errors on {r:?}: {errors:?}"
            );
            assert_eq!(
                decision.is_allowed(),
                cedar.decision() == Decision::Allow,
                "sliced disagreement on {r:?}: native says {}",
                decision.message()
            );
            if let Some(full) = &full {
                let cedar_full = authorizer.is_authorized(&request, full, &entities);
                assert_eq!(
                    decision.is_allowed(),
                    cedar_full.decision() == Decision::Allow,
                    "full: {r:?}"
                );
            }
        }
        // The requests must exercise every case, or agreement proves little.
        for reason in [
            "allowed",
            "blocked_command",
            "command_not_allowed",
            "outside_allowed_hours",
            "on_battery",
            "power_battery_low",
            "tokens_exceeded",
            "cost_exceeded",
            "concurrency_exceeded",
        ] {
            let seen = by_reason.get(reason).copied().unwrap_or(0);
            assert!(
                seen >= 10,
                "{n_devices}x{n_patterns}: only {seen} requests decided by {reason}: {by_reason:?}"
            );
        }
        println!("{n_devices} devices x {n_patterns} patterns: {by_reason:?}");
    }
}
