//! Logging set-up shared by every binary: `tracing` with `RUST_LOG` filtering.

use tracing_subscriber::EnvFilter;

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
