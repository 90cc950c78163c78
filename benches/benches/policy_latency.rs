//! Per-call latency of policy decisions, p50 / p99 / p99.9, native against
//! cedar_sliced on the same requests (100 patterns per device).
//!
//! Each call is timed on its own with `Instant`; the cost of reading the clock
//! twice, measured in the same run on an empty body, is subtracted. Printed as
//! a table; `BENCHMARKS.md` records a run.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../common/policy_fixture.rs"]
mod policy_fixture;

use std::hint::black_box;
use std::time::Instant;

use cedar_policy::{Authorizer, Entities};
use mesh_benches::percentile;
use policy_fixture::*;

const CALLS: usize = 200_000;

/// Times `f` once per call, `calls` times; returns sorted nanoseconds.
fn sample(calls: usize, mut f: impl FnMut(usize)) -> Vec<u64> {
    // Warm up caches and branch predictors.
    for i in 0..calls / 10 {
        f(i);
    }
    let mut out = Vec::with_capacity(calls);
    for i in 0..calls {
        let t = Instant::now();
        f(i);
        out.push(t.elapsed().as_nanos() as u64);
    }
    out.sort_unstable();
    out
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then
    // run one small configuration only, to show the harness works.
    let quick = std::env::args().all(|a| a != "--bench");
    let calls = if quick { 1_000 } else { CALLS };
    let overhead = sample(calls, |i| {
        black_box(i);
    });
    let clock_ns = percentile(&overhead, 0.5);
    println!("clock overhead (median of two Instant reads): {clock_ns} ns; subtracted below");
    println!("| engine | devices | patterns | p50 | p99 | p99.9 |");
    println!("|---|---|---|---|---|---|");
    let authorizer = Authorizer::new();
    let entities = Entities::empty();
    for n_devices in [5usize, 50, 500] {
        let devs = devices(n_devices, 100, 7);
        let reqs = requests(&devs, 4096, 13);
        let native = native(&devs);
        let sliced = cedar_sliced(&devs);
        let (native_inputs, cedar_inputs) = prepared(&devs, &reqs);
        let n = reqs.len();
        let native_ns = sample(calls, |i| {
            let (dev, cmd, ctx) = &native_inputs[i % n];
            black_box(mesh_policy::resolve(native.get(*dev), black_box(cmd), ctx).outcome());
        });
        let cedar_ns = sample(calls, |i| {
            let (dev, req) = &cedar_inputs[i % n];
            black_box(
                authorizer
                    .is_authorized(black_box(req), &sliced[*dev], &entities)
                    .decision(),
            );
        });
        for (name, v) in [("native", &native_ns), ("cedar_sliced", &cedar_ns)] {
            let p = |q| percentile(v, q).saturating_sub(clock_ns) as f64 / 1000.0;
            println!(
                "| {name} | {n_devices} | 100 | {:.3} µs | {:.3} µs | {:.3} µs |",
                p(0.5),
                p(0.99),
                p(0.999)
            );
        }
        let ratio = percentile(&cedar_ns, 0.5).saturating_sub(clock_ns) as f64
            / percentile(&native_ns, 0.5).saturating_sub(clock_ns).max(1) as f64;
        println!("| cedar_sliced / native (p50) | {n_devices} | 100 | {ratio:.1}× | | |");
        if quick {
            break;
        }
    }
}
