//! The operator library: traits every operator implements, the registry of kinds, and the
//! built-in operators.
//!
//! An operator *kind* (e.g. `window_aggregate`) is registered with a builder that validates
//! the spec's `params` once, at submission, and returns an [`OperatorFactory`]. The factory
//! creates one instance per subtask. Instances own their state; `snapshot()` turns it into
//! bytes and `restore()` rebuilds it, which is all ABS and DCAS need from an operator.
//!
//! Invariant: an instance restored from `snapshot()` taken after input prefix P produces, for
//! any suffix S, exactly the output that the original produces for S.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::expr::{EvalError, Expr};
use crate::record::{CheckpointId, Record};
use crate::spec::{OperatorSpec, SpecError};

pub mod agg;
pub mod join;
pub mod sink;
pub mod source;
pub mod transform;
pub mod window;

/// Error of an operator on the hot path: small, no allocation unless it is rare.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpError {
    /// An expression failed on a record.
    #[error("expression '{expr}' failed: {error}")]
    Eval {
        /// The expression's source.
        expr: Arc<str>,
        /// Why it failed.
        error: Box<EvalError>,
    },
    /// An expression returned a value of the wrong type.
    #[error("expression '{expr}' must return {expected}, got {got}")]
    Type {
        /// The expression's source.
        expr: Arc<str>,
        /// The type required.
        expected: &'static str,
        /// The type returned.
        got: &'static str,
    },
    /// Reading or writing a file or other resource failed.
    #[error("{0}")]
    Io(String),
    /// A snapshot could not be encoded or restored.
    #[error("state: {0}")]
    State(String),
    /// Input data could not be used (undecodable line, missing field).
    #[error("bad input: {0}")]
    Data(String),
}

impl From<crate::codec::CodecError> for OpError {
    fn from(e: crate::codec::CodecError) -> OpError {
        OpError::State(e.0)
    }
}

/// Evaluates `expr` on `rec`, mapping the error to an `OpError`.
#[inline]
pub fn eval(expr: &Expr, rec: &Record) -> Result<crate::Value, OpError> {
    expr.eval(rec).map_err(|error| OpError::Eval {
        expr: expr.source().into(),
        error,
    })
}

/// A transform or sink instance (one subtask of one operator).
pub trait Operator: Send {
    /// Consumes every record of `batch` (from input `input`; 0 unless two-input) and appends
    /// the results to `out`. `batch` is left empty or may be swapped with an empty `out`.
    fn process(
        &mut self,
        input: usize,
        batch: &mut Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), OpError>;

    /// The combined input watermark advanced to `wm`: fire what is complete.
    fn on_watermark(&mut self, _wm: i64, _out: &mut Vec<Record>) -> Result<(), OpError> {
        Ok(())
    }

    /// All inputs ended: emit everything still pending (a bounded job's final results).
    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), OpError> {
        Ok(())
    }

    /// The state as bytes. Stateless operators return an empty vector. Also the point that
    /// the next [`Operator::snapshot_changes`] is relative to.
    fn snapshot(&mut self) -> Result<Vec<u8>, OpError> {
        Ok(Vec::new())
    }

    /// Incremental snapshots (DCAS): what changed since the previous `snapshot` or
    /// `snapshot_changes`, as bytes [`Operator::restore_changes`] applies on top of the
    /// state as it was then; its cost follows the changes, not the whole state. `None` when
    /// the operator keeps no such record (the caller then takes a whole `snapshot`).
    fn snapshot_changes(&mut self) -> Result<Option<Vec<u8>>, OpError> {
        Ok(None)
    }

    /// Applies changes from [`Operator::snapshot_changes`] on the state they follow. After an
    /// error here or in `restore` the operator's state is unspecified (it may hold part of
    /// what was read): the caller fails the subtask and drops the operator.
    fn restore_changes(&mut self, _changes: &[u8]) -> Result<(), OpError> {
        Err(OpError::State(
            "this operator takes no incremental snapshots".into(),
        ))
    }

    /// Replaces the state with one produced by `snapshot()`. An exactly-once sink takes back
    /// what the snapshot had staged, but commits nothing here: the runtime then calls
    /// `commit` with what the restore point allows (all of it after an ABS checkpoint or a
    /// DCAS snapshot; under a DCAS job's fallback checkpoints, only what the last completed
    /// fallback covers, which the DCAS snapshot records).
    fn restore(&mut self, _state: &[u8]) -> Result<(), OpError> {
        Ok(())
    }

    /// The barrier of checkpoint `n` reached this operator (called just before `snapshot`):
    /// an exactly-once sink stages what it received since the previous barrier as the output
    /// of `n`, invisible until `commit(n)`.
    fn pre_commit(&mut self, _n: CheckpointId) -> Result<(), OpError> {
        Ok(())
    }

    /// Checkpoint `n` completed: make the output staged for every checkpoint up to `n`
    /// visible. Idempotent per checkpoint.
    fn commit(&mut self, _n: CheckpointId) -> Result<(), OpError> {
        Ok(())
    }

    /// Operator-specific metrics (e.g. late records dropped), read about once a second.
    fn metrics(&self) -> Vec<Metric> {
        Vec::new()
    }

    /// True when what the operator emits, and the state it keeps, follow from the records
    /// it is given and the state restored before them alone: not from watermarks, timers,
    /// or when records arrive. Running the same records again from a restored state then
    /// gives the same output. DCAS lets a replayable source's subtask whose whole chain is
    /// record-driven regenerate its output from its snapshot instead of logging its polls.
    fn record_driven(&self) -> bool {
        false
    }
}

/// One operator metric: a counter or gauge, optionally for one part of the operator (a Kafka
/// partition, say, as `topic/partition`).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Metric {
    /// What is measured (`late_dropped`, `lag`, `offset`, ...).
    pub name: String,
    /// Which part of the operator; empty for the whole subtask.
    pub part: String,
    /// The value.
    pub value: i64,
}

impl Metric {
    /// A metric of the whole subtask.
    pub fn total(name: &str, value: i64) -> Metric {
        Metric {
            name: name.to_string(),
            part: String::new(),
            value,
        }
    }

    /// A metric of one part of the subtask.
    pub fn part(name: &str, part: String, value: i64) -> Metric {
        Metric {
            name: name.to_string(),
            part,
            value,
        }
    }
}

/// What a source reports after a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePoll {
    /// Records were produced (maybe zero); poll again.
    Ready,
    /// Nothing may be produced before this much time passes (rate limit, idle input).
    Wait(Duration),
    /// The source is exhausted; it will produce nothing more.
    Finished,
}

/// A source instance (one subtask of a source operator).
pub trait Source: Send {
    /// Appends at most `max` records to `out`.
    fn poll(&mut self, max: usize, out: &mut Vec<Record>) -> Result<SourcePoll, OpError>;

    /// The source's watermark after the records produced so far, if it has one.
    fn watermark(&self) -> Option<i64>;

    /// The source position (and any state) as bytes.
    fn snapshot(&mut self) -> Result<Vec<u8>, OpError>;

    /// Rewinds to a position produced by `snapshot()`.
    fn restore(&mut self, state: &[u8]) -> Result<(), OpError>;

    /// True when the records are a pure function of the position, so that
    /// [`Source::regenerate`] from a restored position yields exactly what the polls from
    /// there returned (a generator). DCAS logs such a source's polls as record counts, not
    /// records, and replay derives the records again without reading anything; when every
    /// operator chained after it is [record-driven](Operator::record_driven), it logs
    /// nothing and a restart regenerates everything after the snapshot.
    fn replayable(&self) -> bool {
        false
    }

    /// Appends the `n` records from the current position and moves past them, as the poll
    /// that returned them did, whatever its pace; only for a [`Source::replayable`] source.
    /// Other state the poll kept (a feed's start time) may differ: DCAS restores the state
    /// logged after the poll once the records are regenerated.
    fn regenerate(&mut self, n: usize, out: &mut Vec<Record>) -> Result<(), OpError> {
        let _ = (n, out);
        Err(OpError::State(
            "this source cannot regenerate its records; its polls are logged whole".into(),
        ))
    }

    /// Source-specific metrics (positions, lag), read about once a second.
    fn metrics(&self) -> Vec<Metric> {
        Vec::new()
    }

    /// Records available to the source but not read yet (a generator behind its feed, a
    /// consumer behind the end of its log), when the source knows; read after every poll.
    /// Recovery tracking uses it to tell when a restarted job has caught up.
    fn lag(&self) -> Option<u64> {
        None
    }
}

/// A running instance: a source, or a transform/sink.
pub enum Instance {
    /// A source.
    Source(Box<dyn Source>),
    /// A transform or sink.
    Operator(Box<dyn Operator>),
}

/// Receives the records of `collect` sinks. Owned by whoever runs the job (the in-process
/// executor, later the job manager), never global.
pub trait CollectTarget: Send + Sync {
    /// Delivers records emitted by subtask `subtask` of collect operator `operator`; `epoch`
    /// is the checkpoint that committed them (exactly-once jobs, which may deliver an epoch
    /// again after a restore: the target keeps the first), `None` otherwise.
    fn deliver(
        &self,
        operator: &str,
        subtask: usize,
        epoch: Option<CheckpointId>,
        records: Vec<Record>,
    );

    /// An epoch of subtask `subtask` of `operator` up to which the target holds every
    /// epoch delivered to it, whole (`None`: none yet). A delivery may still be on its way
    /// (to another process) after `deliver` returns, and a crash then loses it unless the
    /// sink's snapshots keep it until the target has it. `Some(CheckpointId::MAX)`, the
    /// default, is a target that takes deliveries in `deliver`: sinks keep nothing.
    fn taken(&self, _operator: &str, _subtask: usize) -> Option<CheckpointId> {
        Some(CheckpointId::MAX)
    }
}

/// What an instance knows about where it runs.
#[derive(Clone)]
pub struct SubtaskContext {
    /// Operator id from the spec.
    pub operator: String,
    /// This subtask's index in `0..parallelism`.
    pub subtask: usize,
    /// The operator's parallelism.
    pub parallelism: usize,
    /// Where `collect` sinks deliver.
    pub collect: Arc<dyn CollectTarget>,
    /// Whether the job checkpoints with exactly-once sinks: sinks then make output visible
    /// only when a checkpoint completes.
    pub transactional: bool,
    /// The deployment attempt (generation), so files of an older attempt are never reused.
    pub attempt: u64,
    /// The job's id (names external resources that must not collide between jobs, such as
    /// Kafka transactional ids).
    pub job: String,
}

/// Creates instances of one validated operator.
pub trait OperatorFactory: Send + Sync {
    /// A new instance for one subtask.
    fn instantiate(&self, ctx: &SubtaskContext) -> Result<Instance, OpError>;
}

/// How many inputs and outputs an operator kind has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// No inputs.
    Source,
    /// One input, outputs.
    OneInput,
    /// Two inputs (left = 0, right = 1), outputs.
    TwoInput,
    /// One input, no outputs.
    Sink,
}

impl Shape {
    /// Number of inputs.
    pub fn inputs(self) -> usize {
        match self {
            Shape::Source => 0,
            Shape::OneInput | Shape::Sink => 1,
            Shape::TwoInput => 2,
        }
    }
}

/// Validates an operator's params and returns its factory.
pub type BuildFn = fn(&OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError>;

/// Looks up what an operator needs from outside systems at submission (a Kafka topic's
/// partitions and start offsets, say) and returns its params with that filled in. It may
/// block on the network, within a timeout the params set.
pub type ResolveFn = fn(&OperatorSpec) -> Result<serde_json::Value, SpecError>;

/// A registered operator kind.
#[derive(Clone, Copy)]
pub struct KindInfo {
    /// Inputs and outputs.
    pub shape: Shape,
    /// Whether its input defaults to a `hash` exchange by record key (keyed state).
    pub keyed: bool,
    /// Validates params and builds the factory.
    pub build: BuildFn,
    /// Resolves external facts once per submission (connectors only).
    pub resolve: Option<ResolveFn>,
}

impl KindInfo {
    /// A kind that needs nothing resolved at submission.
    pub fn new(shape: Shape, keyed: bool, build: BuildFn) -> KindInfo {
        KindInfo {
            shape,
            keyed,
            build,
            resolve: None,
        }
    }
}

/// Operator kinds by name: the built-ins plus Rust-defined ones registered by `jobs`.
#[derive(Clone)]
pub struct OperatorRegistry {
    kinds: BTreeMap<String, KindInfo>,
}

impl OperatorRegistry {
    /// The built-in operator library.
    pub fn builtin() -> OperatorRegistry {
        let mut r = OperatorRegistry {
            kinds: BTreeMap::new(),
        };
        let k = KindInfo::new;
        r.register(
            "generator",
            k(Shape::Source, false, source::build_generator),
        );
        r.register(
            "file_source",
            k(Shape::Source, false, source::build_file_source),
        );
        r.register("map", k(Shape::OneInput, false, transform::build_map));
        r.register("filter", k(Shape::OneInput, false, transform::build_filter));
        r.register(
            "flat_map",
            k(Shape::OneInput, false, transform::build_flat_map),
        );
        r.register("key_by", k(Shape::OneInput, false, transform::build_key_by));
        r.register("reduce", k(Shape::OneInput, true, transform::build_reduce));
        r.register("window_aggregate", k(Shape::OneInput, true, window::build));
        r.register("join", k(Shape::TwoInput, true, join::build));
        r.register("collect", k(Shape::Sink, false, sink::build_collect));
        r.register("file_sink", k(Shape::Sink, false, sink::build_file_sink));
        r.register("log", k(Shape::Sink, false, sink::build_log));
        r.register("discard", k(Shape::Sink, false, sink::build_discard));
        r.register(
            "kafka_source",
            KindInfo {
                resolve: Some(crate::kafka::source::resolve),
                ..k(Shape::Source, false, crate::kafka::source::build)
            },
        );
        r.register(
            "kafka_sink",
            KindInfo {
                resolve: Some(crate::kafka::sink::resolve),
                ..k(Shape::Sink, false, crate::kafka::sink::build)
            },
        );
        r
    }

    /// Resolves, in place, every operator of `spec` whose kind looks up external facts at
    /// submission (see [`ResolveFn`]). Call once per submission, before deploying; the
    /// resolved spec is what every task manager then builds, so all agree on it.
    pub fn resolve(&self, spec: &mut crate::spec::JobSpec) -> Result<(), SpecError> {
        for op in spec.operators.iter_mut() {
            if let Some(resolve) = self.get(&op.kind).and_then(|k| k.resolve) {
                op.params = resolve(op)?;
            }
        }
        Ok(())
    }

    /// Adds (or replaces) a kind.
    pub fn register(&mut self, name: &str, info: KindInfo) {
        self.kinds.insert(name.to_string(), info);
    }

    /// The kind with this name.
    pub fn get(&self, name: &str) -> Option<&KindInfo> {
        self.kinds.get(name)
    }

    /// All kind names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.kinds.keys().map(String::as_str).collect()
    }
}

/// Typed access to an operator's `params`, producing errors that name the operator and the
/// field (`params.<name>`).
pub struct Params<'a> {
    op: &'a str,
    map: &'a serde_json::Map<String, serde_json::Value>,
}

/// The longest duration a parameter may give (window sizes, gaps, lateness, out of
/// orderness), in ms: 2^47, about 4,000 years. Event-time arithmetic on i64 ms timestamps
/// then stays exact for every timestamp but those within it of the extremes, which the
/// operators refuse by name instead of wrapping around.
pub const MAX_DURATION_MS: i64 = 1 << 47;

impl<'a> Params<'a> {
    /// Params of `spec`, which must be a JSON object whose keys are all in `known`.
    pub fn new(spec: &'a OperatorSpec, known: &[&str]) -> Result<Params<'a>, SpecError> {
        let map = spec
            .params
            .as_object()
            .ok_or_else(|| SpecError::field(&spec.id, "params", "must be an object"))?;
        for k in map.keys() {
            if !known.contains(&k.as_str()) {
                return Err(SpecError::field(
                    &spec.id,
                    format!("params.{k}"),
                    format!(
                        "unknown parameter for kind '{}' (known: {})",
                        spec.kind,
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(Params { op: &spec.id, map })
    }

    /// An error about `params.<name>`.
    pub fn error(&self, name: &str, message: impl Into<String>) -> SpecError {
        SpecError::field(self.op, format!("params.{name}"), message)
    }

    /// The raw JSON of a parameter.
    pub fn raw(&self, name: &str) -> Option<&'a serde_json::Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// A non-negative integer parameter.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, SpecError> {
        match self.raw(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.error(name, "must be a non-negative integer")),
        }
    }

    /// A duration parameter in ms: a non-negative integer of at most [`MAX_DURATION_MS`].
    pub fn millis(&self, name: &str) -> Result<Option<u64>, SpecError> {
        match self.u64(name)? {
            Some(ms) if ms > MAX_DURATION_MS as u64 => Err(self.error(
                name,
                format!("must be at most {MAX_DURATION_MS} ms (about 4,000 years)"),
            )),
            ms => Ok(ms),
        }
    }

    /// A positive integer parameter.
    pub fn positive(&self, name: &str) -> Result<Option<u64>, SpecError> {
        match self.u64(name)? {
            Some(0) => Err(self.error(name, "must be greater than 0")),
            v => Ok(v),
        }
    }

    /// An integer parameter.
    pub fn i64(&self, name: &str) -> Result<Option<i64>, SpecError> {
        match self.raw(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.error(name, "must be an integer")),
        }
    }

    /// A string parameter.
    pub fn str(&self, name: &str) -> Result<Option<&'a str>, SpecError> {
        match self.raw(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.error(name, "must be a string")),
        }
    }

    /// A required string parameter.
    pub fn required_str(&self, name: &str) -> Result<&'a str, SpecError> {
        self.str(name)?
            .ok_or_else(|| self.error(name, "is required"))
    }

    /// A parameter that names one of `choices` (name, value); `default` when absent.
    pub fn choice<T: Copy>(
        &self,
        name: &str,
        default: T,
        choices: &[(&str, T)],
    ) -> Result<T, SpecError> {
        let Some(given) = self.str(name)? else {
            return Ok(default);
        };
        choices
            .iter()
            .find(|(n, _)| *n == given)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                self.error(
                    name,
                    format!("unknown value '{given}' (expected {})", names.join(", ")),
                )
            })
    }

    /// What the job manager resolved at submission (`params.resolved`, see
    /// [`ResolveFn`]), if it was resolved.
    pub fn resolved<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, SpecError> {
        match self.raw("resolved") {
            None => Ok(None),
            Some(r) => serde_json::from_value(r.clone()).map(Some).map_err(|e| {
                self.error(
                    "resolved",
                    format!("is written by the job manager at submission; leave it out ({e})"),
                )
            }),
        }
    }

    /// An expression parameter, compiled.
    pub fn expr(&self, name: &str) -> Result<Option<Expr>, SpecError> {
        match self.str(name)? {
            None => Ok(None),
            Some(src) => Expr::compile(src)
                .map(Some)
                .map_err(|e| self.error(name, format!("invalid expression '{src}': {e}"))),
        }
    }

    /// A required expression parameter, compiled.
    pub fn required_expr(&self, name: &str) -> Result<Expr, SpecError> {
        self.expr(name)?
            .ok_or_else(|| self.error(name, "is required"))
    }
}

/// Encodes operator state with rkyv.
pub fn encode_state<T>(state: &T) -> Result<Vec<u8>, OpError>
where
    T: for<'b> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'b>,
            rkyv::rancor::Error,
        >,
    >,
{
    crate::codec::encode(state)
        .map(|v| v.to_vec())
        .map_err(|e| OpError::State(e.0))
}

/// Decodes operator state written by [`encode_state`].
pub fn decode_state<T>(bytes: &[u8]) -> Result<T, OpError>
where
    T: rkyv::Archive,
    T::Archived: for<'b> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'b, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    crate::codec::decode(bytes).map_err(|e| OpError::State(e.0))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers to drive an operator by hand in unit tests.
    use super::*;
    use std::sync::Mutex;

    /// A collect target that keeps everything in memory.
    #[derive(Default)]
    pub struct Collected(pub Mutex<Vec<Delivery>>);

    /// One delivered record: (operator, subtask, epoch, record).
    pub type Delivery = (String, usize, Option<CheckpointId>, Record);

    impl CollectTarget for Collected {
        fn deliver(
            &self,
            operator: &str,
            subtask: usize,
            epoch: Option<CheckpointId>,
            records: Vec<Record>,
        ) {
            let mut g = self.0.lock().unwrap();
            g.extend(
                records
                    .into_iter()
                    .map(|r| (operator.to_string(), subtask, epoch, r)),
            );
        }
    }

    /// Builds an operator from a JSON spec fragment via the built-in registry.
    pub fn factory(json: &str) -> Arc<dyn OperatorFactory> {
        let spec: OperatorSpec = serde_json::from_str(json).unwrap();
        let reg = OperatorRegistry::builtin();
        (reg.get(&spec.kind).unwrap().build)(&spec).unwrap()
    }

    /// The validation error for a JSON spec fragment.
    pub fn build_error(json: &str) -> SpecError {
        let spec: OperatorSpec = serde_json::from_str(json).unwrap();
        let reg = OperatorRegistry::builtin();
        match (reg.get(&spec.kind).unwrap().build)(&spec) {
            Ok(_) => panic!("expected an error for {json}"),
            Err(e) => e,
        }
    }

    /// A context for subtask `s` of `p`.
    pub fn ctx(s: usize, p: usize) -> SubtaskContext {
        SubtaskContext {
            operator: "op".into(),
            subtask: s,
            parallelism: p,
            collect: Arc::new(Collected::default()),
            transactional: false,
            attempt: 1,
            job: "test-job".into(),
        }
    }

    /// Instantiates a transform or sink.
    pub fn operator(json: &str) -> Box<dyn Operator> {
        match factory(json).instantiate(&ctx(0, 1)).unwrap() {
            Instance::Operator(o) => o,
            Instance::Source(_) => panic!("not an operator"),
        }
    }

    /// Instantiates subtask `s` of `p` of a source.
    pub fn source(json: &str, s: usize, p: usize) -> Box<dyn Source> {
        match factory(json).instantiate(&ctx(s, p)).unwrap() {
            Instance::Source(o) => o,
            Instance::Operator(_) => panic!("not a source"),
        }
    }

    /// One step of input for `run`.
    #[derive(Clone, Debug)]
    pub enum Step {
        /// Records on an input.
        Data(usize, Vec<Record>),
        /// A watermark.
        Wm(i64),
    }

    /// Runs the steps then `finish`, returning all output.
    pub fn run(op: &mut dyn Operator, steps: &[Step]) -> Vec<Record> {
        let mut out = Vec::new();
        feed(op, steps, &mut out);
        op.finish(&mut out).unwrap();
        out
    }

    /// Runs the steps without finishing.
    pub fn feed(op: &mut dyn Operator, steps: &[Step], out: &mut Vec<Record>) {
        for s in steps {
            match s {
                Step::Data(i, recs) => {
                    let mut b = recs.clone();
                    op.process(*i, &mut b, out).unwrap();
                }
                Step::Wm(w) => op.on_watermark(*w, out).unwrap(),
            }
        }
    }

    /// Ensures snapshot/restore equivalence: for every split point, running the prefix,
    /// snapshotting, restoring into a fresh instance and running the suffix gives the same
    /// output as an uninterrupted run.
    pub fn assert_snapshot_equivalence(json: &str, steps: &[Step]) {
        let mut whole = operator(json);
        let expected = run(whole.as_mut(), steps);
        assert!(!expected.is_empty(), "the test input must produce output");
        for cut in 0..=steps.len() {
            let mut first = operator(json);
            let mut out = Vec::new();
            feed(first.as_mut(), &steps[..cut], &mut out);
            let state = first.snapshot().unwrap();
            let mut second = operator(json);
            second.restore(&state).unwrap();
            feed(second.as_mut(), &steps[cut..], &mut out);
            second.finish(&mut out).unwrap();
            assert_eq!(out, expected, "output differs when restored at step {cut}");
        }
    }

    /// Asserts that an operator restored from `whole` and then given `changes` holds what
    /// `original` holds, and that `changes` is over `factor` times smaller than `whole`;
    /// returns that copy.
    pub fn assert_small_changes(
        json: &str,
        original: &mut dyn Operator,
        whole: &[u8],
        changes: &[u8],
        factor: usize,
        canonical: fn(&[u8]) -> String,
    ) -> Box<dyn Operator> {
        assert!(
            changes.len() * factor < whole.len(),
            "{} bytes of changes against {} whole",
            changes.len(),
            whole.len()
        );
        let mut copy = operator(json);
        copy.restore(whole).unwrap();
        copy.restore_changes(changes).unwrap();
        assert_eq!(
            canonical(&copy.snapshot().unwrap()),
            canonical(&original.snapshot().unwrap()),
            "the copy holds what the original holds"
        );
        copy
    }

    /// Ensures incremental snapshots rebuild the state: a copy restored from a whole
    /// snapshot and then given each step's (or every second step's) changes holds what the
    /// original holds at every point (equal whole snapshots, compared as `canonical` reads
    /// them), and produces the same output from there.
    pub fn assert_changes_equivalence(json: &str, steps: &[Step], canonical: fn(&[u8]) -> String) {
        for every in [1, 2] {
            let mut original = operator(json);
            let mut copy = operator(json);
            copy.restore(&original.snapshot().unwrap()).unwrap();
            let (mut out, mut copied) = (Vec::new(), Vec::new());
            for (i, step) in steps.iter().enumerate() {
                feed(original.as_mut(), std::slice::from_ref(step), &mut out);
                if (i + 1) % every != 0 {
                    continue;
                }
                let changes = original.snapshot_changes().unwrap().expect("changes");
                copy.restore_changes(&changes).unwrap();
                let a = canonical(&original.snapshot().unwrap());
                let b = canonical(&copy.snapshot().unwrap());
                assert_eq!(a, b, "state differs after step {i} (changes every {every})");
            }
            original.finish(&mut out).unwrap();
            copy.finish(&mut copied).unwrap();
            let tail = &out[out.len() - copied.len()..];
            assert_eq!(tail, copied, "final output differs (changes every {every})");
        }
    }
}
