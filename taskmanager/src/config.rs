//! Task manager configuration: flags, an optional TOML file, and their defaults.
//!
//! Precedence (lowest to highest): defaults < `--config FILE` < command-line flags (each flag
//! also reads a `WEIR_TM_*` environment variable, which clap applies before the flag).

use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

/// Command-line flags of the `taskmanager` binary.
#[derive(Parser, Debug, Default)]
#[command(
    name = "taskmanager",
    version,
    about = "Weir task manager: runs subtasks for a job manager"
)]
pub struct Flags {
    /// Job manager control address (host:port) to register with. Default 127.0.0.1:6123.
    #[arg(long, env = "WEIR_TM_JOBMANAGER")]
    pub jobmanager: Option<String>,
    /// Subtask slots offered (slot groups of one subtask per task). Default: number of CPUs.
    #[arg(long, env = "WEIR_TM_SLOTS")]
    pub slots: Option<u32>,
    /// Address the data-plane server binds (host:port; port 0 picks a free one).
    /// Default 127.0.0.1:0.
    #[arg(long, env = "WEIR_TM_DATA_ADDR")]
    pub data_addr: Option<String>,
    /// Milliseconds between heartbeats to the job manager. Default 100.
    #[arg(long, env = "WEIR_TM_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Exit when the job manager has been unreachable this long, in ms (its subtasks are
    /// stopped as soon as the connection drops). Default 10000.
    #[arg(long, env = "WEIR_TM_EXIT_AFTER_DISCONNECT_MS")]
    pub exit_after_disconnect_ms: Option<u64>,
    /// Address the cache node binds (host:port; port 0 picks a free one). Default
    /// 127.0.0.1:0.
    #[arg(long, env = "WEIR_TM_CACHE_ADDR")]
    pub cache_addr: Option<String>,
    /// Memory the cache node may hold, in MiB (primary and backup copies); writes beyond it
    /// fail with "cache full". Default 1024.
    #[arg(long, env = "WEIR_TM_CACHE_MEMORY_MB")]
    pub cache_memory_mb: Option<u64>,
    /// TOML file with any of the settings above (keys in kebab-case); flags override it.
    #[arg(long, env = "WEIR_TM_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Resolved configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct TmConfig {
    /// Job manager control address.
    pub jobmanager: String,
    /// Slots offered.
    pub slots: u32,
    /// Data-plane bind address.
    pub data_addr: String,
    /// Heartbeat interval in ms.
    pub heartbeat_interval_ms: u64,
    /// Give up and exit after this long without the job manager, in ms.
    pub exit_after_disconnect_ms: u64,
    /// Cache node bind address.
    pub cache_addr: String,
    /// Cache memory limit in MiB.
    pub cache_memory_mb: u64,
}

impl Default for TmConfig {
    fn default() -> Self {
        TmConfig {
            jobmanager: "127.0.0.1:6123".into(),
            slots: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(2),
            data_addr: "127.0.0.1:0".into(),
            heartbeat_interval_ms: 100,
            exit_after_disconnect_ms: 10_000,
            cache_addr: "127.0.0.1:0".into(),
            cache_memory_mb: 1024,
        }
    }
}

impl TmConfig {
    /// Defaults, then the file named by `--config`, then flags.
    pub fn load(flags: &Flags) -> Result<TmConfig, String> {
        let mut c = match &flags.config {
            None => TmConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
        };
        if let Some(v) = &flags.jobmanager {
            c.jobmanager = v.clone();
        }
        if let Some(v) = flags.slots {
            c.slots = v;
        }
        if let Some(v) = &flags.data_addr {
            c.data_addr = v.clone();
        }
        if let Some(v) = flags.heartbeat_interval_ms {
            c.heartbeat_interval_ms = v;
        }
        if let Some(v) = flags.exit_after_disconnect_ms {
            c.exit_after_disconnect_ms = v;
        }
        if let Some(v) = &flags.cache_addr {
            c.cache_addr = v.clone();
        }
        if let Some(v) = flags.cache_memory_mb {
            c.cache_memory_mb = v;
        }
        c.validate()?;
        Ok(c)
    }

    /// Rejects impossible settings.
    pub fn validate(&self) -> Result<(), String> {
        if self.slots == 0 {
            return Err("slots must be at least 1".into());
        }
        if self.cache_memory_mb == 0 {
            return Err("cache-memory-mb must be at least 1".into());
        }
        if self.heartbeat_interval_ms == 0 {
            return Err("heartbeat-interval-ms must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tm.toml");
        std::fs::write(&path, "slots = 3\nheartbeat-interval-ms = 50\n").unwrap();
        let flags = Flags {
            config: Some(path.clone()),
            heartbeat_interval_ms: Some(20),
            ..Default::default()
        };
        let c = TmConfig::load(&flags).unwrap();
        assert_eq!((c.slots, c.heartbeat_interval_ms), (3, 20));
        std::fs::write(&path, "slotz = 3\n").unwrap();
        let err = TmConfig::load(&Flags {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.contains("slotz"), "{err}");
        let err = TmConfig::load(&Flags {
            slots: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.contains("slots"), "{err}");
    }
}
