//! Job manager configuration.
//!
//! Precedence (lowest to highest): defaults < command-line flags (each flag also reads a
//! `WEIR_JM_*` environment variable, which clap applies before the flag).

use std::path::PathBuf;

use clap::Args;

/// Flags shared by `jobmanager serve` and `jobmanager local`.
#[derive(Args, Debug, Clone)]
pub struct JmConfig {
    /// Address of the REST API and dashboard.
    #[arg(long, env = "WEIR_JM_REST_ADDR", default_value = "127.0.0.1:8081")]
    pub rest_addr: String,
    /// Address task managers connect to (control plane). Port 0 picks a free one.
    #[arg(long, env = "WEIR_JM_CONTROL_ADDR", default_value = "127.0.0.1:6123")]
    pub control_addr: String,
    /// A task manager is declared dead after this many ms without a heartbeat (at once when
    /// its control connection drops).
    #[arg(long, env = "WEIR_JM_HEARTBEAT_TIMEOUT_MS", default_value_t = 1000)]
    pub heartbeat_timeout_ms: u64,
    /// Directory of the job manager's durable metadata (sled).
    #[arg(long, env = "WEIR_JM_DATA_DIR", default_value = "weir-data")]
    pub data_dir: PathBuf,
    /// When set, every mutating REST call needs `Authorization: Bearer <token>`.
    #[arg(long, env = "WEIR_API_TOKEN")]
    pub api_token: Option<String>,
    /// Largest accepted request body (job spec), in bytes.
    #[arg(long, env = "WEIR_JM_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Records kept per collect sink of a job (older output beyond this is dropped and counted).
    #[arg(long, env = "WEIR_JM_COLLECT_LIMIT", default_value_t = 2_000_000)]
    pub collect_limit: usize,
    /// Partitions of the distributed cache.
    #[arg(long, env = "WEIR_CACHE_PARTITIONS", default_value_t = engine::cache::DEFAULT_PARTITIONS)]
    pub cache_partitions: u32,
    /// Backup copies of every cache partition, each on a different task manager.
    #[arg(long, env = "WEIR_CACHE_BACKUP_COUNT", default_value_t = 1)]
    pub cache_backup_count: u32,
    /// Cache partitions copied at once during re-replication and migration (rate limit).
    #[arg(long, env = "WEIR_CACHE_MAX_COPIES", default_value_t = 8)]
    pub cache_max_copies: usize,
}

impl Default for JmConfig {
    fn default() -> Self {
        JmConfig {
            rest_addr: "127.0.0.1:8081".into(),
            control_addr: "127.0.0.1:6123".into(),
            heartbeat_timeout_ms: 1000,
            data_dir: PathBuf::from("weir-data"),
            api_token: None,
            max_body_bytes: 1 << 20,
            collect_limit: 2_000_000,
            cache_partitions: engine::cache::DEFAULT_PARTITIONS,
            cache_backup_count: 1,
            cache_max_copies: 8,
        }
    }
}
