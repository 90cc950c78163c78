use std::panic::{AssertUnwindSafe, catch_unwind};

use proptest::prelude::*;

use crate::*;

const H: u64 = 3_600_000;
const MIN: u64 = 60_000;

fn policy(json: &str) -> Policy {
    Policy::from_json(json).unwrap()
}

fn reason(p: &Policy, cmd: &str, ctx: &Context) -> &'static str {
    p.resolve(cmd, ctx).reason().code()
}

#[test]
fn reason_codes_are_exactly_the_documented_ones() {
    let codes: Vec<_> = Reason::ALL.iter().map(Reason::code).collect();
    assert_eq!(
        codes,
        [
            "policy_disabled",
            "blocked_command",
            "command_not_allowed",
            "outside_allowed_hours",
            "vpn_required",
            "on_battery",
            "power_low_power_mode",
            "power_thermal",
            "power_battery_low",
            "power_peer_work_on_battery",
            "power_small_jobs_only",
            "tokens_exceeded",
            "file_too_large",
            "cost_exceeded",
            "concurrency_exceeded",
            "cpu_busy",
            "approval_required",
            "allowed",
        ]
    );
}

#[test]
fn no_policy_and_disabled_policy_deny() {
    let ctx = Context::at(0);
    let none = resolve(None, "chat.send", &ctx);
    assert_eq!(none.outcome(), Outcome::Deny);
    assert_eq!(none.reason(), Reason::PolicyDisabled);
    assert!(none.message().contains("no policy"));
    let off = policy(r#"{"is_enabled": false, "allowed_commands": ["*"]}"#);
    assert_eq!(reason(&off, "chat.send", &ctx), "policy_disabled");
    // An empty document allows nothing.
    assert_eq!(
        reason(&policy("{}"), "chat.send", &ctx),
        "command_not_allowed"
    );
}

/// Starts from a request that fails every rule, then fixes the deciding rule
/// one at a time: the reasons must come out in exactly the documented order.
#[test]
fn evaluation_order_is_exact() {
    let p = policy(
        r#"{"allowed_commands": ["chat.*", "ops.*"], "blocked_commands": ["ops.*"],
            "require_approval": true, "max_tokens_per_call": 100, "max_cost_per_hour": 1.0,
            "max_concurrent_calls": 1, "require_vpn": true, "allowed_hours_utc": "09:00-17:00",
            "disallow_on_battery": true}"#,
    );
    let p_battery_ok = policy(
        r#"{"allowed_commands": ["chat.*"], "require_approval": true, "max_tokens_per_call": 100,
            "max_cost_per_hour": 1.0, "max_concurrent_calls": 1, "require_vpn": true,
            "allowed_hours_utc": "09:00-17:00", "max_file_bytes": 10}"#,
    );
    let mut ctx = Context {
        now_unix_ms: 20 * H,
        tokens: 500,
        cost: 0.8,
        spent_last_hour: 0.5,
        concurrent_calls: 1,
        on_vpn: false,
        power: Some(PowerState {
            device_class: Some(DeviceClass::Ios),
            on_battery: Some(true),
            battery_percent: Some(10.0),
            low_power_mode: Some(true),
            thermal: Some(Thermal::Critical),
            cpu_percent: Some(99.0),
        }),
        work: WorkKind::PeerDirect,
        job_size: JobSize::Large,
        file_bytes: 20,
    };
    let mut seen = vec![];
    let mut cmd = "ops.restart";
    seen.push(reason(&p, cmd, &ctx)); // blocked
    cmd = "files.read";
    seen.push(reason(&p, cmd, &ctx)); // not allowed
    cmd = "chat.send";
    seen.push(reason(&p, cmd, &ctx)); // hours
    ctx.now_unix_ms = 10 * H;
    seen.push(reason(&p, cmd, &ctx)); // vpn
    ctx.on_vpn = true;
    seen.push(reason(&p, cmd, &ctx)); // on battery
    let p = p_battery_ok;
    seen.push(reason(&p, cmd, &ctx)); // low power mode
    let power = ctx.power.as_mut().unwrap();
    power.low_power_mode = Some(false);
    seen.push(reason(&p, cmd, &ctx)); // thermal
    ctx.power.as_mut().unwrap().thermal = Some(Thermal::Nominal);
    seen.push(reason(&p, cmd, &ctx)); // battery low (mobile)
    ctx.power.as_mut().unwrap().battery_percent = Some(50.0);
    seen.push(reason(&p, cmd, &ctx)); // peer work on battery
    ctx.work = WorkKind::Coordinator;
    ctx.power.as_mut().unwrap().device_class = Some(DeviceClass::Laptop);
    ctx.power.as_mut().unwrap().battery_percent = Some(30.0);
    seen.push(reason(&p, cmd, &ctx)); // small jobs only
    ctx.job_size = JobSize::Small;
    seen.push(reason(&p, cmd, &ctx)); // tokens
    ctx.tokens = 100;
    seen.push(reason(&p, cmd, &ctx)); // file size
    ctx.file_bytes = 10;
    seen.push(reason(&p, cmd, &ctx)); // cost
    ctx.cost = 0.5;
    seen.push(reason(&p, cmd, &ctx)); // concurrency
    ctx.concurrent_calls = 0;
    seen.push(reason(&p, cmd, &ctx)); // cpu
    ctx.power.as_mut().unwrap().cpu_percent = Some(85.0);
    seen.push(reason(&p, cmd, &ctx)); // approval
    let open = policy(r#"{"allowed_commands": ["chat.*"]}"#);
    seen.push(reason(&open, cmd, &ctx)); // allowed
    let expected: Vec<_> = Reason::ALL[1..].iter().map(Reason::code).collect();
    assert_eq!(seen, expected);
}

#[test]
fn outcomes_and_defer_delay() {
    let p = policy(r#"{"allowed_commands": ["*"], "require_approval": true}"#);
    let mut ctx = Context::at(0);
    assert_eq!(p.resolve("x", &ctx).outcome(), Outcome::NeedsApproval);
    ctx.power = Some(PowerState {
        cpu_percent: Some(90.0),
        ..Default::default()
    });
    let d = p.resolve("x", &ctx);
    assert_eq!(d.outcome(), Outcome::Defer { delay_ms: 5000 });
    assert_eq!(d.to_json()["defer_ms"], 5000);
    assert!(d.message().contains("90%"));
    // Servers are never deferred for CPU.
    ctx.power.as_mut().unwrap().device_class = Some(DeviceClass::Server);
    assert_eq!(p.resolve("x", &ctx).outcome(), Outcome::NeedsApproval);
}

#[test]
fn globs_match_across_dots_and_are_case_sensitive() {
    let p = policy(r#"{"allowed_commands": ["chat.*", "sessions.list", "ops.?"]}"#);
    let ctx = Context::at(0);
    for ok in ["chat.send", "chat.a.b", "chat.", "sessions.list", "ops.x"] {
        assert_eq!(reason(&p, ok, &ctx), "allowed", "{ok}");
    }
    for no in [
        "Chat.send",
        "chat",
        "sessions.list2",
        "xsessions.list",
        "ops.xy",
        "",
    ] {
        assert_eq!(reason(&p, no, &ctx), "command_not_allowed", "{no}");
    }
    let all = policy(r#"{"allowed_commands": ["*"]}"#);
    assert_eq!(reason(&all, "anything.at.all", &ctx), "allowed");
}

#[test]
fn blocked_message_names_the_pattern() {
    let p = policy(r#"{"allowed_commands": ["*"], "blocked_commands": ["fs.*", "shell.*"]}"#);
    let d = p.resolve("shell.exec", &Context::at(0));
    assert_eq!(d.pattern(), Some("shell.*"));
    assert!(d.message().contains("`shell.*`"), "{}", d.message());
    assert!(d.message().contains("`shell.exec`"));
    let j = d.to_json();
    assert_eq!(j["decision"], "deny");
    assert_eq!(j["reason"], "blocked_command");
    assert!(j.get("defer_ms").is_none());
}

#[test]
fn hour_windows_through_resolve() {
    let p = policy(
        r#"{"allowed_commands": ["*"], "allowed_hours_utc": ["22:00-06:00", "12:00-13:00"]}"#,
    );
    let at = |h: u64, m: u64| Context::at(3 * 24 * H + h * H + m * MIN);
    for (h, m, ok) in [
        (22, 0, true),
        (21, 59, false),
        (5, 59, true),
        (6, 0, false),
        (12, 0, true),
        (12, 59, true),
        (13, 0, false),
        (0, 0, true),
    ] {
        assert_eq!(reason(&p, "x", &at(h, m)) == "allowed", ok, "{h:02}:{m:02}");
    }
    let d = p.resolve("x", &at(9, 5));
    assert!(d.message().contains("09:05 UTC"), "{}", d.message());
    assert!(d.message().contains("22:00-06:00, 12:00-13:00"));
    // A single string works as well as a list.
    let one = policy(r#"{"allowed_commands": ["*"], "allowed_hours_utc": "00:00-24:00"}"#);
    assert_eq!(reason(&one, "x", &at(23, 59)), "allowed");
}

#[test]
fn every_validation_error() {
    let cases: &[(&str, &str)] = &[
        (r#"{"allowed_commands": ["chat.[a"]}"#, "invalid_glob"),
        (r#"{"blocked_commands": ["{a,b"]}"#, "invalid_glob"),
        (r#"{"allowed_commands": [""]}"#, "invalid_glob"),
        (
            r#"{"allowed_hours_utc": "25:00-26:00"}"#,
            "invalid_hour_window",
        ),
        (r#"{"allowed_hours_utc": "9-17"}"#, "invalid_hour_window"),
        (
            r#"{"allowed_hours_utc": "09:00-09:00"}"#,
            "invalid_hour_window",
        ),
        (
            r#"{"allowed_hours_utc": ["09:00-17:00", "bad"]}"#,
            "invalid_hour_window",
        ),
        (r#"{"allowed_hours_utc": []}"#, "invalid_hour_window"),
        (r#"{"max_tokens_per_call": -1}"#, "invalid_limit"),
        (r#"{"max_tokens_per_call": 1.5}"#, "invalid_limit"),
        (r#"{"max_cost_per_hour": -0.01}"#, "invalid_limit"),
        (r#"{"max_concurrent_calls": -3}"#, "invalid_limit"),
        (r#"{"allowed_comands": ["*"]}"#, "invalid_document"),
        (r#"{"is_enabled": "yes"}"#, "invalid_document"),
        (r#"{"allowed_hours_utc": 9}"#, "invalid_document"),
        (r#"{"allowed_commands": "chat.*"}"#, "invalid_document"),
        ("not json", "invalid_document"),
    ];
    for (json, kind) in cases {
        let err = Policy::from_json(json).unwrap_err();
        assert_eq!(err.kind(), *kind, "{json}: {err}");
        assert!(!err.to_string().is_empty());
    }
    let err = Policy::from_json(r#"{"max_tokens_per_call": -1}"#).unwrap_err();
    assert!(err.to_string().contains("negative"), "{err}");
}

#[test]
fn refused_policy_changes_nothing_in_the_engine() {
    let engine = PolicyEngine::new();
    engine
        .set_policy(
            "d",
            &PolicyDocument::from_json(r#"{"allowed_commands": ["chat.*"]}"#).unwrap(),
        )
        .unwrap();
    let bad =
        PolicyDocument::from_json(r#"{"allowed_commands": ["*"], "allowed_hours_utc": "9-17"}"#)
            .unwrap();
    assert!(engine.set_policy("d", &bad).is_err());
    assert_eq!(
        engine.policy("d").unwrap().document().allowed_commands,
        ["chat.*"]
    );
    assert_eq!(
        engine
            .authorize("d", "files.read", Context::at(0))
            .decision
            .reason(),
        Reason::CommandNotAllowed
    );
    // A refused first policy leaves the device without one.
    assert!(engine.set_policy("e", &bad).is_err());
    assert!(engine.policy("e").is_none());
}

#[test]
fn power_rule_edges() {
    let p = policy(r#"{"allowed_commands": ["*"]}"#);
    let run = |class, battery: f64, work, size| {
        let ctx = Context {
            power: Some(PowerState {
                device_class: Some(class),
                on_battery: Some(true),
                battery_percent: Some(battery),
                ..Default::default()
            }),
            work,
            job_size: size,
            ..Context::at(0)
        };
        p.resolve("x", &ctx).reason().code()
    };
    use DeviceClass::*;
    use JobSize::*;
    use WorkKind::*;
    assert_eq!(run(Ios, 20.0, Coordinator, Small), "power_battery_low");
    assert_eq!(run(Android, 20.5, Coordinator, Large), "allowed");
    assert_eq!(
        run(Ios, 50.0, PeerDirect, Small),
        "power_peer_work_on_battery"
    );
    assert_eq!(run(Laptop, 14.9, Coordinator, Small), "power_battery_low");
    assert_eq!(run(Laptop, 15.0, Coordinator, Small), "allowed");
    assert_eq!(
        run(Laptop, 15.0, Coordinator, Large),
        "power_small_jobs_only"
    );
    assert_eq!(
        run(Laptop, 40.0, Coordinator, Large),
        "power_small_jobs_only"
    );
    assert_eq!(run(Laptop, 40.1, Coordinator, Large), "allowed");
    assert_eq!(
        run(Laptop, 80.0, PeerDirect, Small),
        "power_peer_work_on_battery"
    );
    assert_eq!(run(Desktop, 5.0, PeerDirect, Large), "allowed");
    assert_eq!(run(Server, 1.0, PeerDirect, Large), "allowed");
    // NaN battery fails closed.
    assert_eq!(run(Ios, f64::NAN, Coordinator, Small), "power_battery_low");

    // External power passes everything after thermal; server skips even thermal.
    let ctx = |class, thermal, on_battery, low_power| Context {
        power: Some(PowerState {
            device_class: Some(class),
            on_battery: Some(on_battery),
            battery_percent: Some(1.0),
            low_power_mode: Some(low_power),
            thermal: Some(thermal),
            cpu_percent: None,
        }),
        work: PeerDirect,
        ..Context::at(0)
    };
    assert_eq!(
        reason(&p, "x", &ctx(Ios, Thermal::Fair, false, false)),
        "allowed"
    );
    assert_eq!(
        reason(&p, "x", &ctx(Ios, Thermal::Fair, false, true)),
        "power_low_power_mode"
    );
    assert_eq!(
        reason(&p, "x", &ctx(Laptop, Thermal::Serious, false, true)),
        "power_thermal"
    );
    assert_eq!(
        reason(&p, "x", &ctx(Server, Thermal::Critical, true, true)),
        "allowed"
    );
    // Low-power mode only counts on phones and tablets.
    assert_eq!(
        reason(&p, "x", &ctx(Desktop, Thermal::Nominal, false, true)),
        "allowed"
    );

    // Custom thresholds.
    let strict = Policy::compile_with(
        p.document(),
        PowerThresholds {
            mobile_battery_stop_percent: 50.0,
            ..PowerThresholds::default()
        },
    )
    .unwrap();
    let c = Context {
        power: Some(PowerState {
            device_class: Some(Ios),
            on_battery: Some(true),
            battery_percent: Some(45.0),
            ..Default::default()
        }),
        ..Context::at(0)
    };
    assert_eq!(reason(&strict, "x", &c), "power_battery_low");
}

#[test]
fn limits_at_their_edges() {
    let p = policy(
        r#"{"allowed_commands": ["*"], "max_tokens_per_call": 100, "max_cost_per_hour": 0.3,
            "max_concurrent_calls": 2}"#,
    );
    let c = |tokens, spent, cost, calls| Context {
        tokens,
        spent_last_hour: spent,
        cost,
        concurrent_calls: calls,
        ..Context::at(0)
    };
    assert_eq!(reason(&p, "x", &c(100, 0.0, 0.0, 0)), "allowed");
    assert_eq!(reason(&p, "x", &c(101, 0.0, 0.0, 0)), "tokens_exceeded");
    // 0.1 + 0.2 is exactly the 0.3 budget, not over it.
    assert_eq!(reason(&p, "x", &c(0, 0.1, 0.2, 0)), "allowed");
    assert_eq!(reason(&p, "x", &c(0, 0.1, 0.200001, 0)), "cost_exceeded");
    assert_eq!(reason(&p, "x", &c(0, f64::NAN, 0.0, 0)), "cost_exceeded");
    assert_eq!(reason(&p, "x", &c(0, 0.0, 0.0, 1)), "allowed");
    assert_eq!(reason(&p, "x", &c(0, 0.0, 0.0, 2)), "concurrency_exceeded");
    let zero = policy(r#"{"allowed_commands": ["*"], "max_concurrent_calls": 0}"#);
    assert_eq!(
        reason(&zero, "x", &c(0, 0.0, 0.0, 0)),
        "concurrency_exceeded"
    );
}

#[test]
fn engine_limits_concurrency_and_releases_permits_on_panic() {
    let engine = PolicyEngine::new();
    engine
        .set_policy(
            "d",
            &PolicyDocument::from_json(r#"{"allowed_commands": ["*"], "max_concurrent_calls": 1}"#)
                .unwrap(),
        )
        .unwrap();
    let first = engine.authorize("d", "job", Context::at(0));
    assert!(first.decision.is_allowed());
    let second = engine.authorize("d", "job", Context::at(0));
    assert_eq!(second.decision.reason(), Reason::ConcurrencyExceeded);
    assert!(second.permit.is_none());
    assert_eq!(engine.in_flight("d"), 1);

    // The call panics while holding the permit: the slot comes back.
    let permit = first.permit.unwrap();
    let result = catch_unwind(AssertUnwindSafe(move || {
        let _held = permit;
        panic!("handler crashed");
    }));
    assert!(result.is_err());
    assert_eq!(engine.in_flight("d"), 0);
    let third = engine.authorize("d", "job", Context::at(0));
    assert!(third.decision.is_allowed());
    drop(third); // an error path: dropped without settling
    assert_eq!(engine.in_flight("d"), 0);
    // Devices without a policy are denied and hold nothing.
    let unknown = engine.authorize("nobody", "job", Context::at(0));
    assert_eq!(unknown.decision.reason(), Reason::PolicyDisabled);
    assert_eq!(engine.in_flight("nobody"), 0);
}

#[test]
fn engine_spend_is_a_sliding_hour() {
    let engine = PolicyEngine::new();
    engine
        .set_policy(
            "d",
            &PolicyDocument::from_json(r#"{"allowed_commands": ["*"], "max_cost_per_hour": 1.0}"#)
                .unwrap(),
        )
        .unwrap();
    let t0 = 1_000 * H;
    let at = |t: u64, cost: f64| Context {
        cost,
        ..Context::at(t)
    };
    // 0.6 at t0, 0.4 at t0+30min: budget used up.
    engine
        .authorize("d", "a", at(t0, 0.6))
        .permit
        .unwrap()
        .settle(0.6);
    engine
        .authorize("d", "a", at(t0 + 30 * MIN, 0.4))
        .permit
        .unwrap()
        .settle(0.4);
    assert_eq!(engine.spent_last_hour("d", t0 + 30 * MIN), 1.0);
    let refused = engine.authorize("d", "a", at(t0 + 59 * MIN, 0.1));
    assert_eq!(refused.decision.reason(), Reason::CostExceeded);
    // An hour after the first spend it is forgotten; the second is not (a real
    // window, not a counter reset every hour).
    assert_eq!(engine.spent_last_hour("d", t0 + 60 * MIN), 0.4);
    assert!(
        engine
            .authorize("d", "a", at(t0 + 60 * MIN, 0.6))
            .decision
            .is_allowed()
    );
    assert_eq!(engine.spent_last_hour("d", t0 + 60 * MIN), 1.0);
    assert_eq!(
        engine
            .authorize("d", "a", at(t0 + 61 * MIN, 0.1))
            .decision
            .reason(),
        Reason::CostExceeded
    );
    assert!((engine.spent_last_hour("d", t0 + 91 * MIN) - 0.6).abs() < 1e-9);
}

#[test]
fn settle_replaces_the_estimate() {
    let engine = PolicyEngine::new();
    engine
        .set_policy(
            "d",
            &PolicyDocument::from_json(r#"{"allowed_commands": ["*"], "max_cost_per_hour": 1.0}"#)
                .unwrap(),
        )
        .unwrap();
    let ctx = Context {
        cost: 0.9,
        ..Context::at(5 * H)
    };
    let a = engine.authorize("d", "a", ctx.clone());
    // While the call runs, its estimate is reserved.
    assert_eq!(engine.spent_last_hour("d", 5 * H), 0.9);
    a.permit.unwrap().settle(0.1);
    assert_eq!(engine.spent_last_hour("d", 5 * H), 0.1);
    // An unsettled permit keeps its estimate.
    drop(engine.authorize("d", "a", Context { cost: 0.5, ..ctx }));
    assert_eq!(engine.spent_last_hour("d", 5 * H), 0.6);
}

#[test]
fn spend_window_edges() {
    let mut w = SpendWindow::default();
    w.record(10 * H, 0.25);
    assert_eq!(w.total(10 * H + H - 1000), 0.25);
    assert_eq!(w.total(10 * H + H), 0.0);
    // A late adjustment to a forgotten record is ignored.
    w.record(10 * H, -0.25);
    assert_eq!(w.total(11 * H), 0.0);
    // At most one bucket per second.
    for i in 0..10_000 {
        w.record(20 * H + i * 100, 0.001);
    }
    assert!((w.total(20 * H + 999_900) - 10.0).abs() < 1e-9);
}

#[test]
fn presets_compile_and_differ() {
    let ctx = Context::at(0);
    let new = Policy::compile(&presets::new_device()).unwrap();
    let trusted = Policy::compile(&presets::trusted()).unwrap();
    assert_eq!(reason(&new, "files.write", &ctx), "command_not_allowed");
    assert_eq!(reason(&new, "status.get", &ctx), "approval_required");
    assert_eq!(reason(&trusted, "files.write", &ctx), "allowed");
    assert_eq!(reason(&trusted, "shell.exec", &ctx), "blocked_command");
    assert_eq!(presets::for_trust_level(0.9), presets::trusted());
    assert_eq!(presets::for_trust_level(0.2), presets::new_device());
    assert_eq!(presets::for_trust_level(f64::NAN), presets::new_device());
}

#[test]
fn document_json_round_trip() {
    let doc = PolicyDocument::from_json(
        r#"{"allowed_commands": ["a.*"], "allowed_hours_utc": ["09:00-17:00"], "max_cost_per_hour": 2.5}"#,
    )
    .unwrap();
    let again: PolicyDocument = serde_json::from_value(doc.to_json()).unwrap();
    assert_eq!(again, doc);
}

fn arb_context() -> impl Strategy<Value = Context> {
    let power = proptest::option::of(
        (
            proptest::option::of(prop_oneof![
                Just(DeviceClass::Ios),
                Just(DeviceClass::Android),
                Just(DeviceClass::Desktop),
                Just(DeviceClass::Laptop),
                Just(DeviceClass::Server)
            ]),
            proptest::option::of(any::<bool>()),
            proptest::option::of(0.0f64..=100.0),
            proptest::option::of(any::<bool>()),
            proptest::option::of(prop_oneof![
                Just(Thermal::Nominal),
                Just(Thermal::Fair),
                Just(Thermal::Serious),
                Just(Thermal::Critical)
            ]),
            proptest::option::of(0.0f64..=100.0),
        )
            .prop_map(
                |(
                    device_class,
                    on_battery,
                    battery_percent,
                    low_power_mode,
                    thermal,
                    cpu_percent,
                )| {
                    PowerState {
                        device_class,
                        on_battery,
                        battery_percent,
                        low_power_mode,
                        thermal,
                        cpu_percent,
                    }
                },
            ),
    );
    (
        0u64..(4 * 24 * H),
        0u64..2000,
        0.0f64..5.0,
        0.0f64..5.0,
        0u32..5,
        any::<bool>(),
        power,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(now, tokens, cost, spent, calls, vpn, power, peer, large)| Context {
                now_unix_ms: now,
                tokens,
                cost,
                spent_last_hour: spent,
                concurrent_calls: calls,
                on_vpn: vpn,
                power,
                work: if peer {
                    WorkKind::PeerDirect
                } else {
                    WorkKind::Coordinator
                },
                job_size: if large {
                    JobSize::Large
                } else {
                    JobSize::Small
                },
                file_bytes: 0,
            },
        )
}

fn arb_command() -> impl Strategy<Value = String> {
    "(chat|ops|files|shell)\\.(send|list|a\\.b|restart)"
}

proptest! {
    /// Whatever else is true, a command matching a blocked glob is denied as blocked.
    #[test]
    fn block_always_wins(
        cmd in arb_command(),
        ctx in arb_context(),
        approval in any::<bool>(),
        vpn in any::<bool>(),
    ) {
        let doc = format!(
            r#"{{"allowed_commands": ["*", "{cmd}"], "blocked_commands": ["{cmd}"],
                "require_approval": {approval}, "require_vpn": {vpn}}}"#
        );
        let d = policy(&doc).resolve(&cmd, &ctx);
        prop_assert_eq!(d.outcome(), Outcome::Deny);
        prop_assert_eq!(d.reason(), Reason::BlockedCommand);
    }

    /// Same inputs, same decision; a recompiled policy decides the same too.
    #[test]
    fn resolve_is_deterministic(cmd in arb_command(), ctx in arb_context()) {
        let json = r#"{"allowed_commands": ["chat.*", "ops.*", "files.list"], "blocked_commands": ["ops.restart"],
            "max_tokens_per_call": 1000, "max_cost_per_hour": 6, "max_concurrent_calls": 3,
            "allowed_hours_utc": ["08:00-18:00", "22:00-02:00"], "disallow_on_battery": false}"#;
        let a = policy(json);
        let b = policy(json);
        let first = a.resolve(&cmd, &ctx);
        prop_assert_eq!(&first, &a.resolve(&cmd, &ctx));
        prop_assert_eq!(&first, &b.resolve(&cmd, &ctx));
        prop_assert_eq!(first.message(), b.resolve(&cmd, &ctx).message());
    }

    /// Allowing is monotone in the hour windows: adding a window never turns an
    /// allow into a deny.
    #[test]
    fn more_windows_never_deny_more(ctx in arb_context(), s in 0u16..24, e in 1u16..24) {
        prop_assume!(s != e);
        let one = policy(r#"{"allowed_commands": ["*"], "allowed_hours_utc": "09:00-17:00"}"#);
        let two = policy(&format!(
            r#"{{"allowed_commands": ["*"], "allowed_hours_utc": ["09:00-17:00", "{s:02}:00-{e:02}:00"]}}"#
        ));
        if one.resolve("x", &ctx).is_allowed() {
            prop_assert!(two.resolve("x", &ctx).is_allowed());
        }
    }
}

#[test]
fn a_file_over_max_file_bytes_is_denied() {
    let p =
        Policy::from_json(r#"{"allowed_commands": ["files.*"], "max_file_bytes": 1000}"#).unwrap();
    let mut ctx = Context::at(0);
    ctx.file_bytes = 1000;
    assert_eq!(p.resolve("files.send", &ctx).reason(), Reason::Allowed);
    ctx.file_bytes = 1001;
    let d = p.resolve("files.send", &ctx);
    assert_eq!(d.reason().code(), "file_too_large");
    assert!(d.message().contains("1001"), "{}", d.message());
    // No limit: any size.
    let open = Policy::from_json(r#"{"allowed_commands": ["files.*"]}"#).unwrap();
    ctx.file_bytes = u64::MAX;
    assert_eq!(open.resolve("files.send", &ctx).reason(), Reason::Allowed);
}
