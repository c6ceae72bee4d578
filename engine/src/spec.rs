//! Job specs: the JSON a user submits, and the error that names what is wrong with it.
//!
//! Parsing here only checks the shape (JSON syntax, field names and types, with line and
//! column). Everything that needs to know the operator library — kinds, inputs, cycles,
//! parameters, expressions — is checked by [`crate::graph::JobGraph::build`], which is the
//! one place a spec becomes something runnable. Nothing runs from a spec that failed either.

use serde::{Deserialize, Serialize};

/// A job: a DAG of operators, each with a parallelism.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Human-readable name.
    pub name: String,
    /// Fault tolerance settings; absent means none.
    #[serde(default)]
    pub checkpointing: Option<CheckpointingSpec>,
    /// Batching and flow-control settings; absent means defaults.
    #[serde(default)]
    pub runtime: RuntimeSpec,
    /// The operators, in any order; edges are given by each operator's `input`.
    pub operators: Vec<OperatorSpec>,
}

/// One operator of a job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OperatorSpec {
    /// Unique id within the job; names the operator in errors, metrics and REST.
    pub id: String,
    /// Operator kind, e.g. `generator`, `map`, `window_aggregate`.
    pub kind: String,
    /// Number of parallel subtasks (default 1, at least 1).
    #[serde(default)]
    pub parallelism: Option<u32>,
    /// Upstream operator id (or ids, in order, for two-input operators such as `join`).
    #[serde(default)]
    pub input: Option<Inputs>,
    /// How records reach this operator's subtasks from its inputs: `forward`, `rebalance`,
    /// `broadcast`, `hash` (by record key) or `hash(<expr>)`. Default: `hash` for keyed
    /// operators, `forward` for equal parallelism, else `rebalance`.
    #[serde(default)]
    pub partition: Option<String>,
    /// Slot sharing group (as Flink's): subtask *i* of every task of a group shares slot *i*
    /// of that group; operators of different groups are never chained and take separate
    /// slots. Default: `default`.
    #[serde(default)]
    pub slot_sharing_group: Option<String>,
    /// Kind-specific parameters.
    #[serde(default = "empty_params")]
    pub params: serde_json::Value,
}

fn empty_params() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl OperatorSpec {
    /// The parallelism, defaulting to 1.
    pub fn parallelism(&self) -> u32 {
        self.parallelism.unwrap_or(1)
    }

    /// The slot sharing group, defaulting to `default`.
    pub fn slot_group(&self) -> &str {
        self.slot_sharing_group.as_deref().unwrap_or("default")
    }

    /// The input ids in order (empty for sources).
    pub fn inputs(&self) -> Vec<&str> {
        match &self.input {
            None => vec![],
            Some(Inputs::One(s)) => vec![s.as_str()],
            Some(Inputs::Many(v)) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// One input id or a list of them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Inputs {
    /// A single upstream operator.
    One(String),
    /// Several upstream operators, in input order.
    Many(Vec<String>),
}

/// Fault-tolerance mode of a job.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointMode {
    /// No checkpoints: a failure fails the job.
    #[default]
    None,
    /// Aligned barrier snapshots to disk.
    Abs,
    /// Per-task asynchronous snapshots and input logs in the distributed cache.
    Dcas,
}

/// Checkpointing settings of a job.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointingSpec {
    /// Mode: `none`, `abs` or `dcas`.
    #[serde(default)]
    pub mode: CheckpointMode,
    /// ABS: milliseconds between checkpoints.
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// DCAS: records per micro-window snapshot.
    #[serde(default)]
    pub snapshot_every_records: Option<u64>,
    /// DCAS: milliseconds per micro-window snapshot (whichever comes first).
    #[serde(default)]
    pub snapshot_interval_ms: Option<u64>,
    /// DCAS: milliseconds between fallback ABS checkpoints to disk.
    #[serde(default)]
    pub fallback_abs_interval_ms: Option<u64>,
    /// DCAS: whether a snapshot may carry only the state changed since the previous one
    /// (default true).
    #[serde(default)]
    pub incremental: Option<bool>,
    /// ABS: a checkpoint not complete after this many milliseconds is declared failed.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// ABS: checkpoints in flight at once.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Restarts after failures before the job fails (absent: unlimited).
    #[serde(default)]
    pub max_restarts: Option<u32>,
    /// Milliseconds between a failure and the restart.
    #[serde(default)]
    pub restart_delay_ms: Option<u64>,
}

/// Default DCAS micro-window: input records per subtask between two snapshots. The paper's
/// 400 is per record; Weir moves records in batches of up to 1,000, and every snapshot
/// carries the subtask's retained output (tens of thousands of records at saturation), so
/// the window is chosen by `bench_dcas` (d): a snapshot every
/// [`DEFAULT_SNAPSHOT_INTERVAL_MS`], sooner only above 10 M records/s per subtask. At
/// saturation this ran at 43% of no checkpointing, against 25% with a window of 5,000
/// records, when it was chosen (BENCHMARKS.md); a restart replays at most one interval of
/// input from memory.
pub const DEFAULT_SNAPSHOT_EVERY_RECORDS: u64 = 1_000_000;

/// Default DCAS micro-window in time. 100 ms, not 200: halving it halves the input a
/// restart reads, decodes and replays (at 600,000 records/s, up to 60,000 records instead
/// of 120,000), which took the keyed aggregate's restart from 15–22 ms to 12–14 ms to
/// running, at 78–79% of no checkpointing's saturated throughput against 79–88% at 200 ms
/// in the same runs (`bench_dcas` (a) and (d), alternating, BENCHMARKS.md 2026-12-05).
pub const DEFAULT_SNAPSHOT_INTERVAL_MS: u64 = 100;

impl CheckpointMode {
    /// The mode as specs and the REST API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointMode::None => "none",
            CheckpointMode::Abs => "abs",
            CheckpointMode::Dcas => "dcas",
        }
    }
}

impl CheckpointingSpec {
    /// The settings of `spec` when they ask for ABS checkpoints: the one test of "is this an
    /// ABS job" for the job manager and the task managers.
    pub fn abs(spec: Option<&CheckpointingSpec>) -> Option<&CheckpointingSpec> {
        spec.filter(|c| c.mode == CheckpointMode::Abs)
    }

    /// The settings of `spec` when they ask for DCAS.
    pub fn dcas(spec: Option<&CheckpointingSpec>) -> Option<&CheckpointingSpec> {
        spec.filter(|c| c.mode == CheckpointMode::Dcas)
    }

    /// The settings of `spec` when its subtasks take barrier checkpoints to disk: ABS jobs,
    /// and DCAS jobs with `fallback_abs_interval_ms`.
    pub fn barriers(spec: Option<&CheckpointingSpec>) -> Option<&CheckpointingSpec> {
        spec.filter(|c| {
            c.mode == CheckpointMode::Abs
                || (c.mode == CheckpointMode::Dcas && c.fallback_abs_interval_ms.is_some())
        })
    }

    /// Time between barrier checkpoints: `interval_ms` (ABS, default 1 s), or a DCAS job's
    /// `fallback_abs_interval_ms`.
    pub fn barrier_interval(&self) -> std::time::Duration {
        match (self.mode, self.fallback_abs_interval_ms) {
            (CheckpointMode::Dcas, Some(ms)) => std::time::Duration::from_millis(ms),
            _ => self.interval(),
        }
    }

    /// DCAS micro-window in records (default [`DEFAULT_SNAPSHOT_EVERY_RECORDS`]).
    pub fn snapshot_every(&self) -> u64 {
        self.snapshot_every_records
            .unwrap_or(DEFAULT_SNAPSHOT_EVERY_RECORDS)
    }

    /// DCAS micro-window in time (default [`DEFAULT_SNAPSHOT_INTERVAL_MS`]).
    pub fn snapshot_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.snapshot_interval_ms
                .unwrap_or(DEFAULT_SNAPSHOT_INTERVAL_MS),
        )
    }

    /// DCAS: incremental snapshots (default on).
    pub fn incremental(&self) -> bool {
        self.incremental.unwrap_or(true)
    }

    /// ABS checkpoint interval (default 1 s).
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.interval_ms.unwrap_or(1000))
    }

    /// ABS checkpoint timeout (default 60 s, as Flink's 10 minutes is far too long for
    /// jobs that checkpoint every second).
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms.unwrap_or(60_000))
    }

    /// Checks the values; `Err` names the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let field = |f: &str| format!("checkpointing.{f}");
        if self.interval_ms.is_some_and(|v| v < 10) {
            return Err(SpecError::job(field("interval_ms"), "must be at least 10"));
        }
        if self.timeout_ms == Some(0) {
            return Err(SpecError::job(field("timeout_ms"), "must be positive"));
        }
        if self.max_concurrent.is_some_and(|v| v == 0 || v > 16) {
            return Err(SpecError::job(
                field("max_concurrent"),
                "must be between 1 and 16",
            ));
        }
        if self.snapshot_every_records == Some(0) {
            return Err(SpecError::job(
                field("snapshot_every_records"),
                "must be positive",
            ));
        }
        for (name, v) in [
            ("snapshot_interval_ms", self.snapshot_interval_ms),
            ("fallback_abs_interval_ms", self.fallback_abs_interval_ms),
        ] {
            if v.is_some_and(|v| v < 10) {
                return Err(SpecError::job(field(name), "must be at least 10"));
            }
        }
        if self.mode != CheckpointMode::Dcas && self.fallback_abs_interval_ms.is_some() {
            return Err(SpecError::job(
                field("fallback_abs_interval_ms"),
                "only DCAS jobs take fallback checkpoints (set interval_ms for ABS)",
            ));
        }
        if self.mode != CheckpointMode::Dcas && self.incremental.is_some() {
            return Err(SpecError::job(
                field("incremental"),
                "only DCAS takes incremental snapshots (ABS checkpoints are whole)",
            ));
        }
        if self.restart_delay_ms.is_some_and(|v| v > 3_600_000) {
            return Err(SpecError::job(
                field("restart_delay_ms"),
                "must be at most one hour",
            ));
        }
        Ok(())
    }
}

/// Batching and flow control of a job's channels.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSpec {
    /// Records per batch on a channel (and per source poll).
    pub batch_size: usize,
    /// Milliseconds a partly filled output batch may wait before it is sent.
    pub linger_ms: u64,
    /// Batches a receiver grants each sender in advance (credits per channel).
    pub credits: usize,
    /// Shortest time between two watermarks emitted by a source subtask, in ms.
    pub watermark_interval_ms: u64,
}

impl Default for RuntimeSpec {
    fn default() -> Self {
        RuntimeSpec {
            batch_size: 2048,
            linger_ms: 5,
            credits: 4,
            watermark_interval_ms: 50,
        }
    }
}

impl JobSpec {
    /// Parses a JSON spec. Syntax and shape errors carry line and column.
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        serde_json::from_str(text).map_err(|e| SpecError {
            operator: None,
            field: None,
            message: strip_position(&e.to_string()),
            line: Some(e.line()),
            column: Some(e.column()),
        })
    }

    /// The operator with this id.
    pub fn operator(&self, id: &str) -> Option<&OperatorSpec> {
        self.operators.iter().find(|o| o.id == id)
    }
}

/// serde_json appends " at line L column C"; we report them as fields instead.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// What is wrong with a spec: which operator, which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct SpecError {
    /// Id of the offending operator, when the error is about one.
    pub operator: Option<String>,
    /// Offending field, e.g. `parallelism`, `input`, `params.expr`.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// Line in the submitted JSON (syntax and shape errors).
    pub line: Option<usize>,
    /// Column in the submitted JSON (syntax and shape errors).
    pub column: Option<usize>,
}

impl SpecError {
    /// An error about an operator's field.
    pub fn field(
        operator: &str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> SpecError {
        SpecError {
            operator: Some(operator.to_string()),
            field: Some(field.into()),
            message: message.into(),
            line: None,
            column: None,
        }
    }

    /// An error about the job as a whole.
    pub fn job(field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError {
            operator: None,
            field: Some(field.into()),
            message: message.into(),
            line: None,
            column: None,
        }
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, "invalid job spec at line {l}, column {c}: ")?;
        }
        if let Some(op) = &self.operator {
            write!(f, "operator '{op}': ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field '{field}': ")?;
        }
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_design_example() {
        let spec = JobSpec::from_json(
            r#"{ "name": "wordcount",
  "checkpointing": { "mode": "dcas", "interval_ms": 1000, "snapshot_every_records": 400 },
  "operators": [
    { "id": "src",   "kind": "generator", "parallelism": 2, "params": {"rate": 100000, "seed": 7} },
    { "id": "split", "kind": "flat_map",  "input": "src",   "params": {"expr": "split(value.line, ' ')"} },
    { "id": "join", "kind": "join",  "input": ["src", "split"] } ] }"#,
        )
        .unwrap();
        assert_eq!(spec.operators.len(), 3);
        assert_eq!(
            spec.checkpointing.as_ref().unwrap().mode,
            CheckpointMode::Dcas
        );
        assert_eq!(spec.operators[0].parallelism(), 2);
        assert_eq!(spec.operators[1].inputs(), vec!["src"]);
        assert_eq!(spec.operators[2].inputs(), vec!["src", "split"]);
        assert_eq!(spec.runtime, RuntimeSpec::default());
    }

    /// Ensures that malformed JSON is rejected with its line and column.
    #[test]
    fn malformed_json_has_line_and_column() {
        let err = JobSpec::from_json("{\n  \"name\": \"x\",\n  \"operators\": [ }").unwrap_err();
        assert_eq!(err.line, Some(3));
        assert_eq!(err.column, Some(18));
        assert!(
            err.to_string()
                .starts_with("invalid job spec at line 3, column 18: "),
            "{err}"
        );
    }

    /// Ensures that a misspelled field is named, with its position.
    #[test]
    fn unknown_field_is_named() {
        let err = JobSpec::from_json(
            r#"{"name":"x","operators":[{"id":"a","kind":"generator","paralelism":2}]}"#,
        )
        .unwrap_err();
        assert!(err.message.contains("paralelism"), "{err}");
        assert_eq!(err.line, Some(1));
    }

    /// Each bad checkpointing value is named by its field; a fallback interval outside DCAS
    /// is refused, never ignored.
    #[test]
    fn checkpointing_values_are_checked() {
        let check = |json: &str| {
            serde_json::from_str::<CheckpointingSpec>(json)
                .unwrap()
                .validate()
                .map_err(|e| (e.field.unwrap_or_default(), e.message))
        };
        assert_eq!(check(r#"{"mode":"abs","interval_ms":500}"#), Ok(()));
        for (json, field) in [
            (
                r#"{"mode":"abs","interval_ms":5}"#,
                "checkpointing.interval_ms",
            ),
            (
                r#"{"mode":"abs","max_concurrent":0}"#,
                "checkpointing.max_concurrent",
            ),
            (
                r#"{"mode":"abs","snapshot_every_records":0}"#,
                "checkpointing.snapshot_every_records",
            ),
            (
                r#"{"mode":"abs","snapshot_interval_ms":1}"#,
                "checkpointing.snapshot_interval_ms",
            ),
            (
                r#"{"mode":"abs","incremental":true}"#,
                "checkpointing.incremental",
            ),
            (
                r#"{"mode":"abs","fallback_abs_interval_ms":1000}"#,
                "checkpointing.fallback_abs_interval_ms",
            ),
            (
                r#"{"mode":"dcas","fallback_abs_interval_ms":5}"#,
                "checkpointing.fallback_abs_interval_ms",
            ),
        ] {
            let err = check(json).unwrap_err();
            assert_eq!(err.0, field, "{json}: {}", err.1);
        }
        assert_eq!(
            check(r#"{"mode":"dcas","snapshot_every_records":400,"snapshot_interval_ms":100}"#),
            Ok(())
        );
        assert_eq!(
            check(r#"{"mode":"dcas","fallback_abs_interval_ms":1000}"#),
            Ok(())
        );
        assert_eq!(check(r#"{"mode":"dcas","incremental":false}"#), Ok(()));
    }

    #[test]
    fn missing_operators_is_an_error() {
        let err = JobSpec::from_json(r#"{"name":"x"}"#).unwrap_err();
        assert!(err.message.contains("operators"), "{err}");
    }
}
