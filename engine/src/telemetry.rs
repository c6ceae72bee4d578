//! Logging set-up shared by every binary (`tracing` with `RUST_LOG` filtering), the wall
//! clock that timestamps cross process boundaries, and the machine's CPU time.

use tracing_subscriber::EnvFilter;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Installs the global subscriber: compact lines on stderr, `RUST_LOG` respected, `default`
/// as the filter when it is unset. Safe to call twice (the second call does nothing).
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// The whole machine's CPU time so far, in clock ticks (Linux's `/proc/stat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    /// Idle or waiting for I/O.
    pub idle: u64,
    /// In every state (guests' time is already in user time).
    pub total: u64,
}

impl CpuTimes {
    /// The counters now; `None` where `/proc/stat` cannot be read (not Linux).
    pub fn read() -> Option<CpuTimes> {
        use std::io::Read;
        // The aggregate line comes first and is far shorter: one read, no allocation.
        let mut buf = [0u8; 256];
        let n = std::fs::File::open("/proc/stat")
            .and_then(|mut f| f.read(&mut buf))
            .ok()?;
        CpuTimes::parse(std::str::from_utf8(&buf[..n]).ok()?)
    }

    /// Reads the aggregate `cpu` line: user nice system idle iowait irq softirq steal.
    fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .take(8)
            .map(|t| t.parse().ok())
            .collect::<Option<_>>()?;
        let idle = ticks.get(3)? + ticks.get(4)?;
        Some(CpuTimes {
            idle,
            total: ticks.iter().sum(),
        })
    }

    /// The idle share of the CPU time since `earlier` (0 to 1); `None` when no tick passed.
    pub fn idle_since(&self, earlier: &CpuTimes) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total).filter(|&t| t > 0)?;
        // Linux's iowait may step back: never below `earlier`, never above the total.
        let idle = self.idle.saturating_sub(earlier.idle).min(total);
        Some(idle as f64 / total as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures the aggregate line is read (idle with iowait, guests left out), a short or
    /// foreign line is refused, and the idle share is bounded.
    #[test]
    fn cpu_times_parse_and_idle_share() {
        let stat = "cpu  100 5 50 800 45 0 0 0 30 0\ncpu0 50 2 25 400 20 0 0 0 15 0\n";
        let t = CpuTimes::parse(stat).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                idle: 845,
                total: 1000
            }
        );
        assert_eq!(CpuTimes::parse("cpu  1 2 3\n"), None);
        assert_eq!(CpuTimes::parse("intr 1 2 3 4 5\n"), None);

        let later = CpuTimes {
            idle: 895,
            total: 1200,
        };
        assert_eq!(later.idle_since(&t), Some(0.25));
        assert_eq!(t.idle_since(&t), None, "no tick passed");
        let stepped_back = CpuTimes {
            idle: 840,
            total: 1100,
        };
        assert_eq!(stepped_back.idle_since(&t), Some(0.0));

        if cfg!(target_os = "linux") {
            let now = CpuTimes::read().expect("/proc/stat is readable on Linux");
            assert!(now.total >= now.idle && now.total > 0, "{now:?}");
        }
    }
}
