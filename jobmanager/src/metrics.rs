//! Prometheus text exposition of the job manager's view of the cluster, rendered per scrape
//! with the `prometheus` crate's encoder.

use prometheus::{Encoder, GaugeVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::dispatcher::{JobSummary, SubtaskMetrics};
use crate::resource_manager::TaskManagerView;

/// Renders the metrics for the given task managers and jobs.
pub fn render(
    tms: &[TaskManagerView],
    jobs: &[JobSummary],
    operators: &[SubtaskMetrics],
) -> Result<String, String> {
    let registry = Registry::new();
    let e = |e: prometheus::Error| e.to_string();
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
