//! What a request looks like to the policy: time, usage, and the device's power state.

use serde::{Deserialize, Serialize};

use crate::ContextError;

/// Everything [`Policy::resolve`](crate::Policy::resolve) needs to know about one request.
///
/// Usage fields default to zero and `power` to `None` (power rules skipped).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Context {
    /// The time of the request, milliseconds since the Unix epoch (UTC).
    pub now_unix_ms: u64,
    /// Tokens this call asks for.
    pub tokens: u64,
    /// Estimated cost of this call.
    pub cost: f64,
    /// What the device spent in the last hour (filled by [`PolicyEngine`](crate::PolicyEngine)).
    pub spent_last_hour: f64,
    /// Calls of this device in flight now (filled by [`PolicyEngine`](crate::PolicyEngine)).
    pub concurrent_calls: u32,
    /// Whether the device is on the VPN.
    pub on_vpn: bool,
    /// The device's power state, if known.
    pub power: Option<PowerState>,
    /// Who asked for the work.
    pub work: WorkKind,
    /// How big the job is.
    pub job_size: JobSize,
    /// Bytes of the file a `files.send` moves (0 for other commands).
    pub file_bytes: u64,
}

impl Context {
    /// A context at `now_unix_ms` with no usage and no power state.
    pub fn at(now_unix_ms: u64) -> Self {
        Context {
            now_unix_ms,
            ..Context::default()
        }
    }

    /// Minute of the UTC day, 0–1439.
    pub(crate) fn minute_of_day(&self) -> u16 {
        ((self.now_unix_ms / 60_000) % 1440) as u16
    }
}

/// A device's power state. Every field is optional; what is unknown is not judged.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerState {
    /// The kind of device; unknown counts as `desktop`.
    pub device_class: Option<DeviceClass>,
    /// Running on battery (not on external power); unknown counts as `false`.
    pub on_battery: Option<bool>,
    /// Battery charge 0–100.
    pub battery_percent: Option<f64>,
    /// The OS's low-power mode (iOS, Android).
    pub low_power_mode: Option<bool>,
    /// Thermal state.
    pub thermal: Option<Thermal>,
    /// CPU load 0–100.
    pub cpu_percent: Option<f64>,
}

/// The kind of device, as the power rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceClass {
    /// iPhone, iPad.
    Ios,
    /// Android phone or tablet.
    Android,
    /// Desktop computer.
    Desktop,
    /// Laptop.
    Laptop,
    /// Server: power rules do not apply.
    Server,
}

impl DeviceClass {
    pub(crate) fn is_mobile(self) -> bool {
        matches!(self, DeviceClass::Ios | DeviceClass::Android)
    }
}

/// Thermal state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Thermal {
    /// Normal.
    Nominal,
    /// Warm.
    Fair,
    /// Hot: the OS throttles.
    Serious,
    /// Critical.
    Critical,
}

/// Who asked for the work (the swarm seed's distinction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkKind {
    /// Assigned by the coordinator (the primary).
    #[default]
    Coordinator,
    /// Asked for directly by another peer.
    PeerDirect,
}

/// Size of a job, for the laptop small-jobs-only band.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobSize {
    /// Small.
    #[default]
    Small,
    /// Large.
    Large,
}

/// The JSON form of a context, with the field names scripts and apps use.
///
/// ```json
/// {
///   "now_utc": "2026-11-21T09:30:00Z",
///   "tokens": 500, "cost": 0.02, "spent_last_hour": 1.5, "concurrent_calls": 1,
///   "on_vpn": true,
///   "power": {"device_class": "laptop", "on_battery": true, "battery_percent": 35,
///             "low_power_mode": false, "thermal": "nominal", "cpu_percent": 20},
///   "work": "coordinator", "job_size": "large", "file_bytes": 1048576
/// }
/// ```
///
/// Every field is optional: absent time = now, absent usage = zero, absent
/// power = power rules skipped, absent `work` = `coordinator`, absent
/// `job_size` = `small`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextDocument {
    /// RFC 3339 time of the request.
    pub now_utc: Option<String>,
    /// Tokens requested.
    pub tokens: Option<f64>,
    /// Estimated cost.
    pub cost: Option<f64>,
    /// Spend in the last hour.
    pub spent_last_hour: Option<f64>,
    /// Calls in flight.
    pub concurrent_calls: Option<f64>,
    /// On the VPN.
    pub on_vpn: Option<bool>,
    /// Power state.
    pub power: Option<PowerState>,
    /// Work kind.
    pub work: Option<WorkKind>,
    /// Job size.
    pub job_size: Option<JobSize>,
    /// Bytes of the file a `files.send` moves.
    pub file_bytes: Option<u64>,
}

impl ContextDocument {
    /// Parses the JSON form.
    pub fn from_json(json: &str) -> Result<Self, ContextError> {
        serde_json::from_str(json).map_err(|e| ContextError::Document(e.to_string()))
    }

    /// Checks every value and builds a [`Context`]; `now_unix_ms` is used when
    /// `now_utc` is absent.
    pub fn into_context(self, now_unix_ms: u64) -> Result<Context, ContextError> {
        let now_unix_ms = match &self.now_utc {
            None => now_unix_ms,
            Some(text) => parse_rfc3339_ms(text)?,
        };
        if let Some(p) = &self.power {
            percent("power.battery_percent", p.battery_percent)?;
            percent("power.cpu_percent", p.cpu_percent)?;
        }
        Ok(Context {
            now_unix_ms,
            tokens: whole("tokens", self.tokens)?,
            cost: amount("cost", self.cost)?,
            spent_last_hour: amount("spent_last_hour", self.spent_last_hour)?,
            concurrent_calls: u32::try_from(whole("concurrent_calls", self.concurrent_calls)?)
                .map_err(|_| ContextError::Value {
                    field: "concurrent_calls",
                    value: format!("{:?}", self.concurrent_calls),
                    reason: "too large",
                })?,
            on_vpn: self.on_vpn.unwrap_or(false),
            power: self.power,
            work: self.work.unwrap_or_default(),
            job_size: self.job_size.unwrap_or_default(),
            file_bytes: self.file_bytes.unwrap_or(0),
        })
    }
}

fn parse_rfc3339_ms(text: &str) -> Result<u64, ContextError> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| ContextError::Time(text.to_owned()))?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    u64::try_from(ms).map_err(|_| ContextError::Time(text.to_owned()))
}

fn value_err(field: &'static str, v: f64, reason: &'static str) -> ContextError {
    ContextError::Value {
        field,
        value: v.to_string(),
        reason,
    }
}

fn whole(field: &'static str, v: Option<f64>) -> Result<u64, ContextError> {
    match v {
        None => Ok(0),
        Some(v) if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= u64::MAX as f64 => {
            Ok(v as u64)
        }
        Some(v) => Err(value_err(field, v, "must be a whole number, 0 or more")),
    }
}

fn amount(field: &'static str, v: Option<f64>) -> Result<f64, ContextError> {
    match v {
        None => Ok(0.0),
        Some(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Some(v) => Err(value_err(field, v, "must be a finite number, 0 or more")),
    }
}

fn percent(field: &'static str, v: Option<f64>) -> Result<(), ContextError> {
    match v {
        Some(v) if !(0.0..=100.0).contains(&v) => Err(value_err(field, v, "must be 0-100")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_is_all_defaults() {
        let c = ContextDocument::from_json("{}")
            .unwrap()
            .into_context(42)
            .unwrap();
        assert_eq!(c, Context::at(42));
        assert_eq!(c.work, WorkKind::Coordinator);
        assert_eq!(c.job_size, JobSize::Small);
    }

    #[test]
    fn full_document() {
        let json = r#"{"now_utc": "2026-11-21T10:30:00+01:00", "tokens": 500, "cost": 0.25,
            "spent_last_hour": 1.5, "concurrent_calls": 2, "on_vpn": true,
            "power": {"device_class": "laptop", "on_battery": true, "battery_percent": 35,
                      "low_power_mode": false, "thermal": "fair", "cpu_percent": 20},
            "work": "peer_direct", "job_size": "large"}"#;
        let c = ContextDocument::from_json(json)
            .unwrap()
            .into_context(0)
            .unwrap();
        assert_eq!(c.minute_of_day(), 9 * 60 + 30);
        assert_eq!(c.tokens, 500);
        assert_eq!(c.concurrent_calls, 2);
        assert_eq!(
            c.power.as_ref().unwrap().device_class,
            Some(DeviceClass::Laptop)
        );
        assert_eq!(c.work, WorkKind::PeerDirect);
    }

    #[test]
    fn bad_contexts_are_refused() {
        for json in [
            r#"{"tokens": -1}"#,
            r#"{"tokens": 1.5}"#,
            r#"{"cost": -0.1}"#,
            r#"{"spent_last_hour": -3}"#,
            r#"{"concurrent_calls": 5000000000}"#,
            r#"{"power": {"battery_percent": 140}}"#,
            r#"{"power": {"cpu_percent": -1}}"#,
            r#"{"now_utc": "yesterday"}"#,
            r#"{"now_utc": "1960-01-01T00:00:00Z"}"#,
        ] {
            let r = ContextDocument::from_json(json).and_then(|d| d.into_context(0));
            assert!(r.is_err(), "{json} should be refused");
        }
        for json in [
            r#"{"tokenz": 1}"#,
            r#"{"power": {"battery": 5}}"#,
            r#"{"work": "boss"}"#,
            "[1]",
        ] {
            assert!(
                matches!(
                    ContextDocument::from_json(json),
                    Err(ContextError::Document(_))
                ),
                "{json}"
            );
        }
    }
}
