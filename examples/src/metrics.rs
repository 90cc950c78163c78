//! Heartbeat metrics of the machine the worker runs on: CPU and memory
//! (sysinfo), free disk space, battery level and charging (starship-battery)
//! where the OS reports them. Phones supply their own through the bindings.

use std::fmt;
use std::sync::{Mutex, PoisonError};

use mesh_core::node::MetricsSource;
use mesh_core::wire::HealthMetrics;
use starship_battery::units::ratio::percent;
use starship_battery::{Manager, State};
use sysinfo::{Disks, System};

/// Samples the local machine.
pub struct SystemMetrics {
    system: Mutex<System>,
    disks: Mutex<Disks>,
    battery: Option<Mutex<Manager>>,
}

impl fmt::Debug for SystemMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemMetrics")
            .field("battery", &self.battery.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for SystemMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SystemMetrics {
    /// Starts sampling (the first CPU figure is 0: usage needs two samples).
    pub fn new() -> Self {
        let mut system = System::new();
        system.refresh_cpu_usage();
        SystemMetrics {
            system: Mutex::new(system),
            disks: Mutex::new(Disks::new_with_refreshed_list()),
            battery: Manager::new().ok().map(Mutex::new),
        }
    }

    fn battery(&self) -> (Option<f64>, Option<bool>) {
        let Some(manager) = &self.battery else {
            return (None, None);
        };
        let manager = manager.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(Ok(battery)) = manager.batteries().ok().and_then(|mut b| b.next()) else {
            return (None, None);
        };
        let level = f64::from(battery.state_of_charge().get::<percent>());
        let charging = match battery.state() {
            State::Charging | State::Full => Some(true),
            State::Discharging | State::Empty => Some(false),
            State::Unknown => None,
        };
        (Some(level.clamp(0.0, 100.0)), charging)
    }
}

impl MetricsSource for SystemMetrics {
    fn sample(&self) -> HealthMetrics {
        let (cpu, memory) = {
            let mut s = self.system.lock().unwrap_or_else(PoisonError::into_inner);
            s.refresh_cpu_usage();
            s.refresh_memory();
            let total = s.total_memory();
            let memory = (total > 0).then(|| s.used_memory() as f64 * 100.0 / total as f64);
            (f64::from(s.global_cpu_usage()), memory)
        };
        let disk_free_gb = {
            let mut disks = self.disks.lock().unwrap_or_else(PoisonError::into_inner);
            disks.refresh(true);
            // The disk holding the root file system, else the largest one.
            disks
                .list()
                .iter()
                .find(|d| d.mount_point() == std::path::Path::new("/"))
                .or_else(|| disks.list().iter().max_by_key(|d| d.total_space()))
                .map(|d| d.available_space() as f64 / 1e9)
        };
        let (battery_percent, charging) = self.battery();
        HealthMetrics {
            cpu_percent: Some(cpu.clamp(0.0, 100.0)),
            memory_percent: memory.map(|m| m.clamp(0.0, 100.0)),
            disk_free_gb,
            battery_percent,
            charging,
            ..HealthMetrics::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_valid_heartbeat_metrics() {
        let m = SystemMetrics::new();
        let sample = m.sample();
        mesh_core::health::validate(&sample).unwrap();
        assert!(sample.memory_percent.is_some_and(|p| p > 0.0), "{sample:?}");
        assert!(sample.cpu_percent.is_some());
    }
}
