//! The stateful layer around [`Policy::resolve`]: per-device policies, a
//! sliding-window spend tracker and a concurrency limiter.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use crate::PolicyError;
use crate::context::Context;
use crate::decision::{Decision, Outcome};
use crate::policy::{Policy, PolicyDocument, PowerThresholds, resolve};

/// Length of the spend window: one hour.
pub const SPEND_WINDOW_MS: u64 = 3_600_000;

/// Spend in the last hour, kept in one-second buckets (at most 3600), in whole
/// micro-units so sums are exact. Sans-IO: time is passed in.
#[derive(Debug, Default)]
pub struct SpendWindow {
    /// (second since epoch, micro-units spent in that second), oldest first.
    buckets: VecDeque<(u64, i128)>,
    total: i128,
    /// Seconds at or before this have been forgotten; records there are ignored.
    forgotten_up_to: Option<u64>,
}

impl SpendWindow {
    /// Records `amount` spent at `now_unix_ms` (negative amounts adjust an earlier record).
    pub fn record(&mut self, now_unix_ms: u64, amount: f64) {
        if !amount.is_finite() {
            return;
        }
        let micros = (amount * 1_000_000.0).round() as i128;
        let sec = now_unix_ms / 1000;
        if self.forgotten_up_to.is_some_and(|f| sec <= f) {
            return; // adjusting a record that already left the window
        }
        match self.buckets.iter_mut().rev().find(|(s, _)| *s <= sec) {
            Some((s, m)) if *s == sec => *m += micros,
            _ => {
                // Keep buckets ordered even if the clock stepped back.
                let pos = self.buckets.partition_point(|(s, _)| *s < sec);
                self.buckets.insert(pos, (sec, micros));
            }
        }
        self.total += micros;
    }

    /// What was spent in the hour ending at `now_unix_ms` (one-second resolution).
    pub fn total(&mut self, now_unix_ms: u64) -> f64 {
        self.expire(now_unix_ms);
        self.total.max(0) as f64 / 1_000_000.0
    }

    /// Drops buckets at least an hour old.
    fn expire(&mut self, now_unix_ms: u64) {
        let now_sec = now_unix_ms / 1000;
        let horizon = now_sec.saturating_sub(SPEND_WINDOW_MS / 1000);
        while let Some(&(s, m)) = self.buckets.front() {
            if s > horizon || now_sec < SPEND_WINDOW_MS / 1000 {
                break;
            }
            self.buckets.pop_front();
            self.total -= m;
            self.forgotten_up_to = Some(self.forgotten_up_to.map_or(s, |f| f.max(s)));
        }
    }
}

#[derive(Debug, Default)]
struct DeviceState {
    policy: RwLock<Option<Arc<Policy>>>,
    spend: Mutex<SpendWindow>,
    in_flight: AtomicU32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Per-device policies with the state that feeds them.
///
/// [`PolicyEngine::authorize`] fills `spent_last_hour` and `concurrent_calls`
/// of the context from its own records, resolves, and on `allow` reserves the
/// estimated cost and takes a concurrency slot, all under one lock per device,
/// so concurrent requests cannot all slip under a limit. The slot is a
/// [`CallPermit`] released on drop — also when the call fails or panics.
#[derive(Debug, Default)]
pub struct PolicyEngine {
    devices: RwLock<HashMap<String, Arc<DeviceState>>>,
    thresholds: PowerThresholds,
}

/// The result of [`PolicyEngine::authorize`]: a decision, and a permit when allowed.
#[derive(Debug)]
pub struct Authorization {
    /// The decision.
    pub decision: Decision,
    /// Held while the call runs; present exactly when the decision is `allow`.
    pub permit: Option<CallPermit>,
}

impl PolicyEngine {
    /// An engine with the default power thresholds.
    pub fn new() -> Self {
        Self::default()
    }

    /// An engine whose policies use `thresholds` for the power rules.
    pub fn with_thresholds(thresholds: PowerThresholds) -> Self {
        PolicyEngine {
            devices: RwLock::default(),
            thresholds,
        }
    }

    fn device(&self, device: &str) -> Option<Arc<DeviceState>> {
        self.devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
            .cloned()
    }

    fn device_or_insert(&self, device: &str) -> Arc<DeviceState> {
        if let Some(d) = self.device(device) {
            return d;
        }
        self.devices
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(device.to_owned())
            .or_default()
            .clone()
    }

    /// Checks that `document` compiles with this engine's thresholds,
    /// without installing it.
    pub fn check(&self, document: &PolicyDocument) -> Result<(), PolicyError> {
        Policy::compile_with(document, self.thresholds.clone()).map(|_| ())
    }

    /// Checks, compiles and installs a policy for `device`. On error the
    /// previous policy stays in force unchanged. Spend and in-flight calls carry over.
    pub fn set_policy(
        &self,
        device: &str,
        document: &PolicyDocument,
    ) -> Result<Arc<Policy>, PolicyError> {
        let policy = Arc::new(Policy::compile_with(document, self.thresholds.clone())?);
        let state = self.device_or_insert(device);
        *state.policy.write().unwrap_or_else(PoisonError::into_inner) = Some(policy.clone());
        Ok(policy)
    }

    /// Removes the device's policy (its requests are then denied).
    pub fn remove_policy(&self, device: &str) {
        if let Some(state) = self.device(device) {
            *state.policy.write().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// The device's policy, if one is set.
    pub fn policy(&self, device: &str) -> Option<Arc<Policy>> {
        self.device(device).and_then(|s| {
            s.policy
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }

    /// Spend recorded for `device` in the hour ending at `now_unix_ms`.
    pub fn spent_last_hour(&self, device: &str, now_unix_ms: u64) -> f64 {
        self.device(device)
            .map_or(0.0, |s| lock(&s.spend).total(now_unix_ms))
    }

    /// Calls of `device` in flight now.
    pub fn in_flight(&self, device: &str) -> u32 {
        self.device(device)
            .map_or(0, |s| s.in_flight.load(Ordering::SeqCst))
    }

    /// Decides a request and, when allowed, reserves its estimated cost and a
    /// concurrency slot. `ctx.spent_last_hour` and `ctx.concurrent_calls` are
    /// replaced by the engine's own records.
    pub fn authorize(&self, device: &str, command: &str, mut ctx: Context) -> Authorization {
        let Some(state) = self.device(device) else {
            return Authorization {
                decision: resolve(None, command, &ctx),
                permit: None,
            };
        };
        let policy = state
            .policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut spend = lock(&state.spend);
        ctx.spent_last_hour = spend.total(ctx.now_unix_ms);
        ctx.concurrent_calls = state.in_flight.load(Ordering::SeqCst);
        let decision = resolve(policy.as_deref(), command, &ctx);
        let permit = (decision.outcome() == Outcome::Allow).then(|| {
            let reserved = if ctx.cost.is_finite() {
                ctx.cost.max(0.0)
            } else {
                0.0
            };
            spend.record(ctx.now_unix_ms, reserved);
            state.in_flight.fetch_add(1, Ordering::SeqCst);
            CallPermit {
                state: state.clone(),
                reserved,
                at_unix_ms: ctx.now_unix_ms,
            }
        });
        Authorization { decision, permit }
    }
}

/// A concurrency slot held while an allowed call runs. Dropping it frees the
/// slot, whether the call succeeded, failed or panicked.
#[derive(Debug)]
pub struct CallPermit {
    state: Arc<DeviceState>,
    reserved: f64,
    at_unix_ms: u64,
}

impl CallPermit {
    /// Replaces the reserved (estimated) cost with what the call actually cost,
    /// and frees the slot. Without this the estimate stays recorded.
    pub fn settle(self, actual_cost: f64) {
        if actual_cost.is_finite() {
            let delta = actual_cost.max(0.0) - self.reserved;
            lock(&self.state.spend).record(self.at_unix_ms, delta);
        }
    }
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
