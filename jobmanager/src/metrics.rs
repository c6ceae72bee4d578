//! Prometheus text exposition of the job manager's view of the cluster, rendered per scrape
//! with the `prometheus` crate's encoder.

use prometheus::{Encoder, GaugeVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::cache_master::CacheView;
use crate::dispatcher::{JobSummary, SubtaskMetrics};
use crate::resource_manager::TaskManagerView;

/// Renders the metrics for the given task managers and jobs.
pub fn render(
    tms: &[TaskManagerView],
    jobs: &[JobSummary],
    operators: &[SubtaskMetrics],
    cache: &CacheView,
) -> Result<String, String> {
    let registry = Registry::new();
    let e = |e: prometheus::Error| e.to_string();
    render_cache(&registry, cache).map_err(e)?;
    let taskmanagers = IntGaugeVec::new(
        Opts::new("weir_taskmanagers", "Task managers by state"),
        &["state"],
    )
    .map_err(e)?;
    let slots = IntGaugeVec::new(
        Opts::new("weir_taskmanager_slots", "Slots of alive task managers"),
        &["taskmanager"],
    )
    .map_err(e)?;
    let heartbeat = IntGaugeVec::new(
        Opts::new(
            "weir_taskmanager_heartbeat_age_ms",
            "Milliseconds since the last heartbeat",
        ),
        &["taskmanager"],
    )
    .map_err(e)?;
    let job_states =
        IntGaugeVec::new(Opts::new("weir_jobs", "Jobs by state"), &["state"]).map_err(e)?;
    let throughput = GaugeVec::new(
        Opts::new(
            "weir_job_source_records_per_second",
            "Records per second read by a job's sources",
        ),
        &["job", "name"],
    )
    .map_err(e)?;
    for m in [&taskmanagers, &slots, &heartbeat, &job_states] {
        registry.register(Box::new(m.clone())).map_err(e)?;
    }
    registry.register(Box::new(throughput.clone())).map_err(e)?;
    let operator = IntGaugeVec::new(
        Opts::new(
            "weir_operator_metric",
            "Operator-specific metrics of running subtasks (Kafka offset and lag per partition, late records, ...)",
        ),
        &["job", "task", "subtask", "operator", "name", "part"],
    )
    .map_err(e)?;
    registry.register(Box::new(operator.clone())).map_err(e)?;
    for s in operators {
        let (task, subtask) = (s.task.to_string(), s.subtask.to_string());
        for (op, m) in &s.metrics {
            operator
                .with_label_values(&[&s.jid, &task, &subtask, op, &m.name, &m.part])
                .set(m.value);
        }
    }
    for state in ["ALIVE", "DEAD"] {
        taskmanagers
            .with_label_values(&[state])
            .set(tms.iter().filter(|t| t.state == state).count() as i64);
    }
    for t in tms.iter().filter(|t| t.state == "ALIVE") {
        slots.with_label_values(&[&t.id]).set(t.slots as i64);
        heartbeat
            .with_label_values(&[&t.id])
            .set(t.heartbeat_age_ms as i64);
    }
    for state in [
        "CREATED",
        "RUNNING",
        "CANCELLING",
        "FINISHED",
        "CANCELED",
        "FAILED",
    ] {
        let n = jobs
            .iter()
            .filter(|j| {
                serde_json::to_value(j.state)
                    .ok()
                    .and_then(|v| v.as_str().map(|s| s == state))
                    == Some(true)
            })
            .count();
        job_states.with_label_values(&[state]).set(n as i64);
    }
    for j in jobs.iter().filter(|j| !j.state.is_terminal()) {
        throughput
            .with_label_values(&[&j.jid, &j.name])
            .set(j.throughput);
    }
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .map_err(e)?;
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// Cache gauges per member (memory, entries, partitions, operations, latency histogram as
/// cumulative counts per bucket) and cluster-wide partition health.
fn render_cache(registry: &Registry, cache: &CacheView) -> Result<(), prometheus::Error> {
    let member = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["member"]);
    let bytes = member(
        "weir_cache_bytes",
        "Bytes held by a cache member (primary and backup copies)",
    )?;
    let limit = member("weir_cache_limit_bytes", "Memory limit of a cache member")?;
    let entries = member(
        "weir_cache_map_entries",
        "Map entries held by a cache member",
    )?;
    let items = member("weir_cache_list_items", "List items held by a cache member")?;
    let primaries = member(
        "weir_cache_primary_partitions",
        "Partitions a member is primary of",
    )?;
    let backups = member(
        "weir_cache_backup_partitions",
        "Partitions a member holds a backup of",
    )?;
    let ops = member(
        "weir_cache_operations_total",
        "Operations served as primary",
    )?;
    let replicated = member(
        "weir_cache_replicated_total",
        "Mutations applied as a backup",
    )?;
    let full = member(
        "weir_cache_full_rejections_total",
        "Writes refused because the member was full",
    )?;
    let latency = IntGaugeVec::new(
        Opts::new(
            "weir_cache_operations_by_latency",
            "Operations served within le_us microseconds (cumulative; le_us=\"+Inf\" is all)",
        ),
        &["member", "le_us"],
    )?;
    let health = IntGaugeVec::new(
        Opts::new("weir_cache_partitions", "Cache partitions by health"),
        &["state"],
    )?;
    for m in [
        &bytes,
        &limit,
        &entries,
        &items,
        &primaries,
        &backups,
        &ops,
        &replicated,
        &full,
        &latency,
        &health,
    ] {
        registry.register(Box::new(m.clone()))?;
    }
    for m in &cache.members {
        let l = [m.addr.as_str()];
        bytes.with_label_values(&l).set(m.stats.bytes as i64);
        limit.with_label_values(&l).set(m.stats.limit as i64);
        entries
            .with_label_values(&l)
            .set(m.stats.map_entries as i64);
        items.with_label_values(&l).set(m.stats.list_items as i64);
        primaries.with_label_values(&l).set(m.primaries as i64);
        backups.with_label_values(&l).set(m.backups as i64);
        ops.with_label_values(&l).set(m.stats.ops as i64);
        replicated
            .with_label_values(&l)
            .set(m.stats.replicated as i64);
        full.with_label_values(&l)
            .set(m.stats.full_rejections as i64);
        let mut total = 0u64;
        for (i, n) in m.stats.latency_us.iter().enumerate() {
            total += n;
            let le = cache
                .latency_buckets_us
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            latency
                .with_label_values(&[m.addr.as_str(), le.as_str()])
                .set(total as i64);
        }
    }
    health
        .with_label_values(&["lost"])
        .set(cache.lost_partitions.len() as i64);
    health
        .with_label_values(&["under_replicated"])
        .set(cache.progress.under_replicated as i64);
    health
        .with_label_values(&["copying"])
        .set(cache.progress.syncing as i64);
    Ok(())
}
