//! mesh-policy against cedar-policy on the same decisions.
//!
//! Groups `native`, `cedar_sliced` (one Cedar policy set per device, looked up
//! in a HashMap, as the native engine looks up its policy) and `cedar_full`
//! (one set for all devices), over devices {5, 50, 500} × allowed patterns per
//! device {3, 10, 100}; plus compiling a policy of 1000 patterns. Requests are
//! prepared before timing for both engines (Cedar's `Request` with its context,
//! the native `Context`), so only the decision is timed. The differential test
//! (`tests/policy_differential.rs`) checks first that both decide the same.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../common/policy_fixture.rs"]
mod policy_fixture;

use std::hint::black_box;
use std::str::FromStr;

use cedar_policy::{Authorizer, Entities};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_policy::{Policy, PolicyDocument};
use policy_fixture::*;

const REQUESTS: usize = 4096;

fn decisions(c: &mut Criterion) {
    let authorizer = Authorizer::new();
    let entities = Entities::empty();
    for n_devices in [5usize, 50, 500] {
        for n_patterns in [3usize, 10, 100] {
            let devs = devices(n_devices, n_patterns, 7);
            let reqs = requests(&devs, REQUESTS, 13);
            let native = native(&devs);
            let sliced = cedar_sliced(&devs);
            let (native_inputs, cedar_inputs) = prepared(&devs, &reqs);
            let param = format!("{n_devices}dev/{n_patterns}pat");

            let mut g = c.benchmark_group("native");
            g.bench_function(BenchmarkId::from_parameter(&param), |b| {
                let mut i = 0;
                b.iter(|| {
                    let (dev, cmd, ctx) = &native_inputs[i % REQUESTS];
                    i += 1;
                    mesh_policy::resolve(native.get(*dev), black_box(cmd), ctx).outcome()
                })
            });
            g.finish();

            let mut g = c.benchmark_group("cedar_sliced");
            g.bench_function(BenchmarkId::from_parameter(&param), |b| {
                let mut i = 0;
                b.iter(|| {
                    let (dev, req) = &cedar_inputs[i % REQUESTS];
                    i += 1;
                    authorizer
                        .is_authorized(black_box(req), &sliced[*dev], &entities)
                        .decision()
                })
            });
            g.finish();

            let full = cedar_full(&devs);
            let mut g = c.benchmark_group("cedar_full");
            if n_devices * n_patterns >= 5_000 {
                g.sample_size(10);
            }
            g.bench_function(BenchmarkId::from_parameter(&param), |b| {
                let mut i = 0;
                b.iter(|| {
                    let (_, req) = &cedar_inputs[i % REQUESTS];
                    i += 1;
                    authorizer
                        .is_authorized(black_box(req), &full, &entities)
                        .decision()
                })
            });
            g.finish();
        }
    }
}

fn compile(c: &mut Criterion) {
    let devs = devices(1, 1000, 7);
    let doc: PolicyDocument = devs[0].document.clone();
    let cedar_text = devs[0].cedar.clone();
    let mut g = c.benchmark_group("compile_1000_patterns");
    g.sample_size(20);
    g.bench_function("native", |b| {
        b.iter(|| Policy::compile(black_box(&doc)).unwrap())
    });
    g.bench_function("cedar", |b| {
        b.iter(|| cedar_policy::PolicySet::from_str(black_box(&cedar_text)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, decisions, compile);
criterion_main!(benches);
