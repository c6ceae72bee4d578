//! Logging set-up shared by every binary (`tracing` with `RUST_LOG` filtering), and the
//! wall clock that timestamps cross process boundaries.

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
