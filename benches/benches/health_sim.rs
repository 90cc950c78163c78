//! Sweeps the phi threshold over the simulated scenarios and prints a table
//! (detection latency after a crash, false positives per 1,000 device-hours),
//! with the source design's fixed rule for comparison. Deterministic.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../common/health_sim.rs"]
mod health_sim;

use health_sim::*;

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test --benches` run a small sweep.
    let quick = std::env::args().all(|a| a != "--bench");
    let hours = |interval_ms: f64| match (quick, interval_ms < 10_000.0) {
        (true, _) => 20.0,
        (false, true) => 2_000.0,
        (false, false) => 20_000.0,
    };
    let trials = if quick { 200 } else { 10_000 };
    println!(
        "| scenario | detector | p50 detection | p99 detection | max | false positives / 1000 device-h |"
    );
    println!("|---|---|---|---|---|---|");
    for s in scenarios() {
        let mut detectors: Vec<(String, Detector)> = [1.0, 2.0, 4.0, 8.0, 12.0, 16.0]
            .into_iter()
            .map(|t| (format!("phi ≥ {t}"), phi(s.interval_ms, t)))
            .collect();
        // A device known to pause gets a larger acceptable pause instead.
        let long_pause = if s.interval_ms < 10_000.0 {
            3_500.0
        } else {
            40_000.0
        };
        detectors.push((
            format!("phi ≥ 8, acceptable pause {:.1} s", long_pause / 1000.0),
            phi_with_pause(s.interval_ms, 8.0, long_pause),
        ));
        detectors.push((
            "fixed: 2 missed periods".into(),
            Detector::FixedRule { missed: 2.0 },
        ));
        for (name, d) in detectors {
            let o = run(&s, &d, hours(s.interval_ms), trials, 42);
            println!(
                "| {} | {name} | {:.2} s | {:.2} s | {:.2} s | {:.2} |",
                s.name,
                o.p50_ms / 1000.0,
                o.p99_ms / 1000.0,
                o.max_ms / 1000.0,
                o.false_positives_per_1000_h
            );
        }
    }
}
