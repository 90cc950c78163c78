//! One fixture of device policies, written once and rendered two ways: as a
//! mesh-policy document and as the equivalent Cedar policy text. Shared by the
//! differential test (`tests/policy_differential.rs`) and the benches
//! (`benches/policy.rs`, `benches/policy_latency.rs`) through `#[path]`, so
//! cedar-policy stays a dev-dependency.
//!
//! The fixture uses the subset both engines express the same way: globs made
//! of literals and `*` (Cedar's `like`), hour windows (Cedar sees the minute of
//! the day in the context), `disallow_on_battery`, the laptop low-battery
//! power rule, token, hourly-cost and concurrency limits. Requests are laptop,
//! coordinator work, small jobs, no CPU load, so no other rule can differ.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::str::FromStr;

use mesh_policy::{Context, DeviceClass, Policy, PolicyDocument, PowerState};

pub use mesh_benches::Rng;

/// One device's policy, in both forms.
pub struct DeviceFixture {
    pub id: String,
    pub document: PolicyDocument,
    pub cedar: String,
    /// Commands that some allowed pattern matches (for request generation).
    pub sample_commands: Vec<String>,
    /// Commands that a blocked pattern matches.
    pub blocked_commands: Vec<String>,
}

const MAX_TOKENS: u64 = 4000;
const MAX_COST_MICROS: u64 = 2_000_000;
const MAX_CONCURRENT: u64 = 4;

/// `devices` device policies with `patterns` allowed globs each.
pub fn devices(devices: usize, patterns: usize, seed: u64) -> Vec<DeviceFixture> {
    let mut rng = Rng::new(seed);
    (0..devices)
        .map(|d| device(d, patterns, &mut rng))
        .collect()
}

fn device(d: usize, patterns: usize, rng: &mut Rng) -> DeviceFixture {
    let id = format!("dev{d}");
    let mut allowed = Vec::with_capacity(patterns);
    let mut samples = Vec::new();
    for k in 0..patterns {
        // A realistic mix: service prefixes, exact commands, and `*` inside.
        match k % 4 {
            0 | 1 => {
                allowed.push(format!("svc{k}.*"));
                samples.push(format!("svc{k}.op{}", rng.below(9)));
            }
            2 => {
                allowed.push(format!("app{k}.read"));
                samples.push(format!("app{k}.read"));
            }
            _ => {
                allowed.push(format!("job{k}.*.run"));
                samples.push(format!("job{k}.q{}.run", rng.below(9)));
            }
        }
    }
    let blocked = vec![
        "svc0.admin*".to_owned(),
        "*.delete".to_owned(),
        format!("app{}.read", 2),
    ];
    let blocked_samples = vec![
        "svc0.admin.kick".to_owned(),
        format!("svc1.delete"),
        "app2.read".to_owned(),
    ];
    let hours = match d % 3 {
        0 => None,
        1 => Some(("08:00-20:00", 8 * 60, 20 * 60)),
        _ => Some(("22:00-06:00", 22 * 60, 6 * 60)),
    };
    let disallow_on_battery = d % 5 == 4;

    let document = PolicyDocument {
        is_enabled: true,
        allowed_commands: allowed.clone(),
        blocked_commands: blocked.clone(),
        require_approval: false,
        max_tokens_per_call: Some(MAX_TOKENS as f64),
        max_cost_per_hour: Some(MAX_COST_MICROS as f64 / 1e6),
        max_concurrent_calls: Some(MAX_CONCURRENT as f64),
        require_vpn: false,
        allowed_hours_utc: hours.map(|(h, _, _)| mesh_policy::HoursSpec::One(h.to_owned())),
        disallow_on_battery,
        max_file_bytes: None,
    };

    let mut cedar = String::new();
    let likes = |pats: &[String]| {
        let terms: Vec<String> = pats
            .iter()
            .map(|p| format!("context.command like \"{p}\""))
            .collect();
        balanced_or(&terms)
    };
    let _ = write!(
        cedar,
        "permit (principal == Device::\"{id}\", action == Action::\"run\", resource)\nwhen {{\n  ({})\n",
        likes(&allowed)
    );
    if let Some((_, s, e)) = hours {
        if s < e {
            let _ = writeln!(
                cedar,
                "  && (context.minute >= {s} && context.minute < {e})"
            );
        } else {
            let _ = writeln!(
                cedar,
                "  && (context.minute >= {s} || context.minute < {e})"
            );
        }
    }
    if disallow_on_battery {
        let _ = writeln!(cedar, "  && !context.on_battery");
    }
    let _ = write!(
        cedar,
        "  && !(context.on_battery && context.battery < 15)\n  && context.tokens <= {MAX_TOKENS}\n  && context.spent + context.cost <= {MAX_COST_MICROS}\n  && context.in_flight < {MAX_CONCURRENT}\n}};\n"
    );
    let _ = write!(
        cedar,
        "forbid (principal == Device::\"{id}\", action == Action::\"run\", resource)\nwhen {{ {} }};\n",
        likes(&blocked)
    );
    DeviceFixture {
        id,
        document,
        cedar,
        sample_commands: samples,
        blocked_commands: blocked_samples,
    }
}

/// `a || b || …` as a balanced tree: Cedar's evaluator recurses per `||`, and
/// a flat chain of 100 terms hits its recursion limit (the policy then errors
/// and is skipped). A balanced tree is depth log2(n) and the fastest form for Cedar.
fn balanced_or(terms: &[String]) -> String {
    match terms {
        [] => "false".to_owned(),
        [one] => one.clone(),
        _ => {
            let (a, b) = terms.split_at(terms.len() / 2);
            format!("({} || {})", balanced_or(a), balanced_or(b))
        }
    }
}

/// A request in both engines' terms. Integers throughout, so both see the
/// same numbers (costs in micro-units).
#[derive(Clone, Debug)]
pub struct FixtureRequest {
    pub device: usize,
    pub command: String,
    pub minute: u64,
    pub on_battery: bool,
    pub battery: u64,
    pub tokens: u64,
    pub spent_micros: u64,
    pub cost_micros: u64,
    pub in_flight: u64,
}

impl FixtureRequest {
    /// The native context (a fixed day, plus the minute).
    pub fn context(&self) -> Context {
        Context {
            now_unix_ms: 20_000 * 86_400_000 + self.minute * 60_000,
            tokens: self.tokens,
            cost: self.cost_micros as f64 / 1e6,
            spent_last_hour: self.spent_micros as f64 / 1e6,
            concurrent_calls: self.in_flight as u32,
            on_vpn: false,
            power: Some(PowerState {
                device_class: Some(DeviceClass::Laptop),
                on_battery: Some(self.on_battery),
                battery_percent: Some(self.battery as f64),
                ..Default::default()
            }),
            ..Context::default()
        }
    }

    /// The Cedar request.
    pub fn cedar(&self, devices: &[DeviceFixture]) -> cedar_policy::Request {
        use cedar_policy::{Context as CedarContext, EntityUid, RestrictedExpression as E};
        let long = |v: u64| E::new_long(v as i64);
        let context = CedarContext::from_pairs([
            ("command".to_owned(), E::new_string(self.command.clone())),
            ("minute".to_owned(), long(self.minute)),
            ("on_battery".to_owned(), E::new_bool(self.on_battery)),
            ("battery".to_owned(), long(self.battery)),
            ("tokens".to_owned(), long(self.tokens)),
            ("spent".to_owned(), long(self.spent_micros)),
            ("cost".to_owned(), long(self.cost_micros)),
            ("in_flight".to_owned(), long(self.in_flight)),
        ])
        .unwrap();
        cedar_policy::Request::new(
            EntityUid::from_str(&format!("Device::\"{}\"", devices[self.device].id)).unwrap(),
            EntityUid::from_str("Action::\"run\"").unwrap(),
            EntityUid::from_str("Command::\"any\"").unwrap(),
            context,
            None,
        )
        .unwrap()
    }
}

/// `n` requests spread over the cases that matter: allowed, blocked,
/// unknown commands, off-hours, low battery, over budget, too many in flight.
pub fn requests(devices: &[DeviceFixture], n: usize, seed: u64) -> Vec<FixtureRequest> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let device = rng.below(devices.len() as u64) as usize;
            let dev = &devices[device];
            let command = match rng.below(10) {
                0 => dev.blocked_commands[rng.below(dev.blocked_commands.len() as u64) as usize]
                    .clone(),
                1 => format!("unknown{}.op", rng.below(50)),
                _ => dev.sample_commands[rng.below(dev.sample_commands.len() as u64) as usize]
                    .clone(),
            };
            FixtureRequest {
                device,
                command,
                minute: rng.below(1440),
                on_battery: rng.chance(30),
                battery: rng.below(101),
                tokens: if rng.chance(10) {
                    4000 + rng.below(3)
                } else {
                    rng.below(4000)
                },
                spent_micros: rng.below(2_100_000),
                cost_micros: rng.below(200_000),
                in_flight: if rng.chance(10) { 4 } else { rng.below(4) },
            }
        })
        .collect()
}

/// A native input: device id, command, context.
pub type NativeInput<'a> = (&'a str, &'a str, Context);
/// A Cedar input: device id, request.
pub type CedarInput<'a> = (&'a str, cedar_policy::Request);

/// Both engines' inputs for `reqs`, prepared outside any timed loop.
pub fn prepared<'a>(
    devs: &'a [DeviceFixture],
    reqs: &'a [FixtureRequest],
) -> (Vec<NativeInput<'a>>, Vec<CedarInput<'a>>) {
    let native = reqs
        .iter()
        .map(|r| (devs[r.device].id.as_str(), r.command.as_str(), r.context()))
        .collect();
    let cedar = reqs
        .iter()
        .map(|r| (devs[r.device].id.as_str(), r.cedar(devs)))
        .collect();
    (native, cedar)
}

/// Native policies by device id.
pub fn native(devices: &[DeviceFixture]) -> HashMap<String, Policy> {
    devices
        .iter()
        .map(|d| (d.id.clone(), Policy::compile(&d.document).unwrap()))
        .collect()
}

/// One Cedar policy set per device.
pub fn cedar_sliced(devices: &[DeviceFixture]) -> HashMap<String, cedar_policy::PolicySet> {
    devices
        .iter()
        .map(|d| {
            (
                d.id.clone(),
                cedar_policy::PolicySet::from_str(&d.cedar).unwrap(),
            )
        })
        .collect()
}

/// One Cedar policy set for all devices.
pub fn cedar_full(devices: &[DeviceFixture]) -> cedar_policy::PolicySet {
    let text: String = devices.iter().map(|d| d.cedar.as_str()).collect();
    cedar_policy::PolicySet::from_str(&text).unwrap()
}

/// Does the native engine allow this request?
pub fn native_allows(
    policies: &HashMap<String, Policy>,
    devices: &[DeviceFixture],
    r: &FixtureRequest,
) -> bool {
    let ctx = r.context();
    mesh_policy::resolve(policies.get(&devices[r.device].id), &r.command, &ctx).is_allowed()
}
