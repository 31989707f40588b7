//! Heartbeat telemetry: a cheap health sample of the PBX. Only what is sent is refreshed: CPU
//! and memory from sysinfo, the state directory's filesystem from one `statvfs`, uptime and
//! load from `/proc`, and a connect to the portal for its reachability and latency.

use crate::agent::portal::Portal;
use crate::config::AgentConfig;
use crate::protocol::Telemetry;
use std::path::PathBuf;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// Keeps the sysinfo state between samples (CPU use is a difference between two readings).
pub struct Sampler {
    sys: System,
    state_dir: PathBuf,
    firmware: String,
    /// Whether an unreadable /proc has been reported (once per sampler, not every heartbeat).
    warned: bool,
}

impl Sampler {
    /// A sampler for this config; takes the first CPU reading now.
    pub fn new(config: &AgentConfig) -> Sampler {
        let sys = System::new_with_specifics(
            RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing().with_cpu_usage()),
        );
        Sampler {
            sys,
            state_dir: config.paths.state_dir.clone(),
            firmware: config.pbx.firmware.clone(),
            warned: false,
        }
    }

    /// One sample. CPU use covers the time since the previous sample.
    pub async fn sample(
        &mut self,
        portal: &Portal,
        ha_state: Option<crate::protocol::HaState>,
    ) -> Telemetry {
        self.sys
            .refresh_cpu_specifics(CpuRefreshKind::nothing().with_cpu_usage());
        self.sys
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let total = self.sys.total_memory();
        if total == 0 && !self.warned {
            self.warned = true;
            tracing::warn!(
                "telemetry: /proc/meminfo is unreadable (a sandbox hiding /proc, such as \
                 ProcSubset=pid?); CPU, memory, uptime and load are sent as 0"
            );
        }
        let used = total.saturating_sub(self.sys.available_memory());
        let (disk_used, disk_total) = disk_usage(&self.state_dir);
        let load = System::load_average();
        let (portal_reachable, portal_latency_ms, portal_error) = match portal.probe().await {
            Ok(took) => (true, Some(took.as_secs_f64() * 1000.0), None),
            Err(e) => (false, None, Some(e.to_string())),
        };
        Telemetry {
            cpu_percent: self.sys.global_cpu_usage().clamp(0.0, 100.0),
            memory_used_bytes: used,
            memory_total_bytes: total,
            disk_used_bytes: disk_used,
            disk_total_bytes: disk_total,
            uptime_secs: System::uptime(),
            load: [load.one, load.five, load.fifteen],
            firmware: self.firmware.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            portal_reachable,
            portal_latency_ms,
            portal_error,
            ha_state,
        }
    }
}

/// (used, total) bytes of the filesystem holding `dir`; zeros if it cannot be read.
fn disk_usage(dir: &std::path::Path) -> (u64, u64) {
    match rustix::fs::statvfs(dir) {
        Ok(v) => {
            let frsize = v.f_frsize;
            let total = v.f_blocks.saturating_mul(frsize);
            // Used as `df` counts it: everything not free (root's reserve counts as used).
            let used = total.saturating_sub(v.f_bfree.saturating_mul(frsize));
            (used, total)
        }
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "statvfs failed");
            (0, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_usage_of_a_real_directory_is_sane() {
        let (used, total) = disk_usage(std::path::Path::new("/"));
        assert!(total > 0, "statvfs / gave no size");
        assert!(used <= total);
        assert_eq!(disk_usage(std::path::Path::new("/no/such/dir")), (0, 0));
    }
}
