//! Record-at-a-time transforms: `map`, `filter`, `flat_map`, `key_by` (stateless) and
//! `reduce` (a keyed running aggregation).
//!
//! Stateless transforms work on the batch in place where they can, so a chain of them moves
//! each record once per operator at most and allocates nothing for scalar values.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::agg::{
    add_all, begin_state, new_accs, open_state, pack_keyed, parse_aggs, unpack_keyed, Accs,
    AggSpec, ResultFields,
};
use super::{eval, Instance, OpError, Operator, OperatorFactory, Params, SubtaskContext};
use crate::codec::MAX_VALUE_DEPTH;
use crate::expr::Expr;
use crate::record::Record;
use crate::spec::{OperatorSpec, SpecError};
use crate::value::Value;

/// What a stateless transform does with its expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `value = expr`.
    Map,
    /// Keep when `expr` is true.
    Filter,
    /// One output per element of the list `expr`.
    FlatMap,
    /// `key = expr`.
    KeyBy,
}

/// A validated stateless transform; its own factory and instance (it has no state).
#[derive(Clone)]
struct Stateless {
    mode: Mode,
    expr: Expr,
}

fn build_stateless(spec: &OperatorSpec, mode: Mode) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    let p = Params::new(spec, &["expr"])?;
    Ok(Arc::new(Stateless {
        mode,
        expr: p.required_expr("expr")?,
    }))
}

/// Builds a `map`: replaces each record's value with `expr`.
pub fn build_map(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    build_stateless(spec, Mode::Map)
}

/// Builds a `filter`: keeps records for which `expr` is `true`.
pub fn build_filter(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    build_stateless(spec, Mode::Filter)
}

/// Builds a `flat_map`: `expr` returns a list; each element becomes a record (same key and
/// event time). `null` yields nothing.
pub fn build_flat_map(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    build_stateless(spec, Mode::FlatMap)
}

/// Builds a `key_by`: sets each record's key to `expr`.
pub fn build_key_by(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    build_stateless(spec, Mode::KeyBy)
}

impl OperatorFactory for Stateless {
    fn instantiate(&self, _ctx: &SubtaskContext) -> Result<Instance, OpError> {
        Ok(Instance::Operator(Box::new(self.clone())))
    }
}

impl Operator for Stateless {
    fn record_driven(&self) -> bool {
        true
    }

    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        let e = &self.expr;
        match self.mode {
            Mode::Map | Mode::KeyBy => {
                for r in batch.iter_mut() {
                    let v = eval(e, r)?;
                    if self.mode == Mode::Map {
                        r.value = v;
                    } else if v.fits_one_level_down() {
                        r.key = Some(v);
                    } else {
                        // Aggregates and joins put the key in their results.
                        return Err(OpError::Data(format!(
                            "{}: a key nested deeper than {} levels",
                            e.source(),
                            MAX_VALUE_DEPTH - 1
                        )));
                    }
                }
                if out.is_empty() {
                    std::mem::swap(batch, out);
                } else {
                    out.append(batch);
                }
            }
            Mode::Filter => {
                for r in batch.drain(..) {
                    match eval(e, &r)? {
                        Value::Bool(true) => out.push(r),
                        Value::Bool(false) => {}
                        other => return Err(type_error(e, "a bool", &other)),
                    }
                }
            }
            Mode::FlatMap => {
                for r in batch.drain(..) {
                    match eval(e, &r)? {
                        Value::List(items) => out.extend(items.iter().map(|v| Record {
                            key: r.key.clone(),
                            ts: r.ts,
                            value: v.clone(),
                        })),
                        Value::Null => {}
                        other => return Err(type_error(e, "a list", &other)),
                    }
                }
            }
        }
        Ok(())
    }
}

fn type_error(e: &Expr, expected: &'static str, got: &Value) -> OpError {
    OpError::Type {
        expr: e.source().into(),
        expected,
        got: got.type_name(),
    }
}

/// A validated `reduce`: per key, a running aggregate emitted after every record as
/// `{key, <agg>: result}` (like Flink's `KeyedStream.sum`).
struct ReduceFactory {
    aggs: Arc<[AggSpec]>,
    fields: Arc<ResultFields>,
}

/// Builds a `reduce`.
pub fn build_reduce(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    let p = Params::new(spec, &["agg", "aggs", "field"])?;
    let aggs = parse_aggs(&p)?;
    Ok(Arc::new(ReduceFactory {
        fields: Arc::new(ResultFields::new(&[], &aggs)),
        aggs: aggs.into(),
    }))
}

impl OperatorFactory for ReduceFactory {
    fn instantiate(&self, _ctx: &SubtaskContext) -> Result<Instance, OpError> {
        Ok(Instance::Operator(Box::new(Reduce {
            aggs: self.aggs.clone(),
            fields: self.fields.clone(),
            state: FxHashMap::default(),
            changed: Vec::new(),
            tracking: false,
        })))
    }
}

/// One subtask of a `reduce`.
struct Reduce {
    aggs: Arc<[AggSpec]>,
    fields: Arc<ResultFields>,
    /// Keyed state: the accumulators of every key seen.
    state: FxHashMap<Value, KeyState>,
    /// Keys updated since the last snapshot (each once: its `changed` flag is set).
    changed: Vec<Value>,
    /// Whether updates are tracked: from the first snapshot on (a job that never
    /// snapshots keeps no list of its keys).
    tracking: bool,
}

/// One key's accumulators, and whether they changed since the last snapshot (a flag in
/// the entry the update touches anyway, so tracking costs no extra lookup).
struct KeyState {
    accs: Accs,
    changed: bool,
}

/// Format byte of a `reduce` snapshot, whole or of the changed keys: the keys with their
/// accumulators, sorted by key ([`pack_keyed`]).
const REDUCE_STATE: u8 = 1;

/// Packs keyed accumulators in key order, a canonical state.
fn pack_sorted(aggs: &[AggSpec], mut entries: Vec<(&Value, &Accs)>) -> Vec<u8> {
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut out = begin_state(REDUCE_STATE, aggs, 16 + entries.len() * 8);
    pack_keyed(&mut out, &entries);
    out
}

impl Reduce {
    /// Sets the accumulators of the keys in `state` (a restored state, or changes on top of
    /// one).
    fn insert(&mut self, state: &[u8]) -> Result<(), OpError> {
        let mut r = open_state(state, REDUCE_STATE, "reduce snapshot", &self.aggs)?;
        let wrap = |accs| KeyState {
            accs,
            changed: false,
        };
        unpack_keyed(&mut r, self.aggs.len(), &mut self.state, wrap)?;
        Ok(r.finish()?)
    }
}

impl Operator for Reduce {
    /// Emits after every record, from its per-key state alone.
    fn record_driven(&self) -> bool {
        true
    }

    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        for r in batch.drain(..) {
            let key = r.key.clone().unwrap_or_default();
            let entry = self.state.entry(key.clone()).or_insert_with(|| KeyState {
                accs: new_accs(&self.aggs),
                changed: false,
            });
            if self.tracking && !entry.changed {
                entry.changed = true;
                self.changed.push(key.clone());
            }
            add_all(&mut entry.accs, &self.aggs, &r)?;
            let value = self.fields.value(&key, &[], &entry.accs);
            out.push(Record {
                key: Some(key),
                ts: r.ts,
                value,
            });
        }
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, OpError> {
        self.changed.clear();
        self.tracking = true;
        for v in self.state.values_mut() {
            v.changed = false;
        }
        let entries = self.state.iter().map(|(k, v)| (k, &v.accs)).collect();
        Ok(pack_sorted(&self.aggs, entries))
    }

    fn snapshot_changes(&mut self) -> Result<Option<Vec<u8>>, OpError> {
        if !self.tracking {
            // Changes since when? The caller takes a whole snapshot instead.
            return Ok(None);
        }
        let keys = std::mem::take(&mut self.changed);
        for k in &keys {
            if let Some(v) = self.state.get_mut(k) {
                v.changed = false;
            }
        }
        let entries = keys
            .iter()
            .filter_map(|k| self.state.get_key_value(k))
            .map(|(k, v)| (k, &v.accs))
            .collect();
        Ok(Some(pack_sorted(&self.aggs, entries)))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OpError> {
        self.state.clear();
        self.changed.clear();
        // Changes from here on are relative to this state.
        self.tracking = true;
        self.insert(state)
    }

    fn restore_changes(&mut self, changes: &[u8]) -> Result<(), OpError> {
        self.insert(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::testing::{
        assert_changes_equivalence, assert_small_changes, assert_snapshot_equivalence, build_error,
        operator, run, Step,
    };

    fn recs(vals: &[i64]) -> Vec<Record> {
        vals.iter()
            .map(|v| Record::new(*v, Value::Int(*v)))
            .collect()
    }

    #[test]
    fn map_filter_key_by() {
        let mut m = operator(r#"{"id":"m","kind":"map","params":{"expr":"value * 10"}}"#);
        let out = run(m.as_mut(), &[Step::Data(0, recs(&[1, 2]))]);
        assert_eq!(
            out.iter().map(|r| r.value.clone()).collect::<Vec<_>>(),
            vec![Value::Int(10), Value::Int(20)]
        );

        let mut f = operator(r#"{"id":"f","kind":"filter","params":{"expr":"value % 2 == 0"}}"#);
        let out = run(f.as_mut(), &[Step::Data(0, recs(&[1, 2, 3, 4]))]);
        assert_eq!(out, recs(&[2, 4]));

        let mut k = operator(r#"{"id":"k","kind":"key_by","params":{"expr":"value % 3"}}"#);
        let out = run(k.as_mut(), &[Step::Data(0, recs(&[4, 5]))]);
        assert_eq!(out[0].key, Some(Value::Int(1)));
        assert_eq!(out[1].key, Some(Value::Int(2)));
        assert_eq!(out[1].value, Value::Int(5));
    }

    #[test]
    fn flat_map_splits_lines() {
        let mut fm =
            operator(r#"{"id":"s","kind":"flat_map","params":{"expr":"split(value.line, ' ')"}}"#);
        let line = Record::new(7, Value::map([("line", Value::str("a b a"))]));
        let out = run(fm.as_mut(), &[Step::Data(0, vec![line])]);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|r| r.ts == 7));
        assert_eq!(out[2].value, Value::str("a"));
    }

    #[test]
    fn filter_and_flat_map_reject_wrong_types() {
        let mut f = operator(r#"{"id":"f","kind":"filter","params":{"expr":"value"}}"#);
        let err = f.process(0, &mut recs(&[1]), &mut Vec::new()).unwrap_err();
        assert!(
            err.to_string().contains("must return a bool, got int"),
            "{err}"
        );
        let mut fm = operator(r#"{"id":"s","kind":"flat_map","params":{"expr":"value"}}"#);
        let err = fm.process(0, &mut recs(&[1]), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("must return a list"), "{err}");
    }

    #[test]
    fn bad_expressions_are_rejected_at_build() {
        let e = build_error(r#"{"id":"m","kind":"map","params":{"expr":"value +"}}"#);
        assert_eq!(
            (e.operator.as_deref(), e.field.as_deref()),
            (Some("m"), Some("params.expr"))
        );
        let e = build_error(r#"{"id":"m","kind":"map","params":{}}"#);
        assert!(e.message.contains("required"), "{e}");
        let e =
            build_error(r#"{"id":"r","kind":"reduce","params":{"agg":"median","field":"value"}}"#);
        assert_eq!(e.field.as_deref(), Some("params.agg"));
        let e = build_error(r#"{"id":"r","kind":"reduce","params":{"agg":"sum"}}"#);
        assert!(e.message.contains("field"), "{e}");
    }

    fn keyed(k: i64, v: i64) -> Record {
        Record::keyed(Value::Int(k), v, Value::Int(v))
    }

    #[test]
    fn reduce_running_aggregates() {
        let spec = r#"{"id":"r","kind":"reduce","params":{"aggs":[{"agg":"count"},{"agg":"sum","field":"value"},{"agg":"max","name":"top","field":"value"}]}}"#;
        let mut r = operator(spec);
        let out = run(
            r.as_mut(),
            &[Step::Data(0, vec![keyed(1, 5), keyed(2, 1), keyed(1, 7)])],
        );
        assert_eq!(out.len(), 3);
        assert_eq!(
            out[2].value.to_string(),
            r#"{"count":2,"key":1,"sum":12,"top":7}"#
        );
        assert_eq!(
            out[1].value.to_string(),
            r#"{"count":1,"key":2,"sum":1,"top":1}"#
        );
    }

    /// Ensures that a restored reduce continues every key's aggregate exactly.
    #[test]
    fn reduce_snapshot_equivalence() {
        let spec = r#"{"id":"r","kind":"reduce","params":{"aggs":[{"agg":"avg","field":"value"},{"agg":"count_distinct","field":"value % 3"},{"agg":"min","field":"value"}]}}"#;
        let steps: Vec<Step> = (0..6)
            .map(|i| Step::Data(0, (0..5).map(|j| keyed(j % 3, i * 5 + j)).collect()))
            .collect();
        assert_snapshot_equivalence(spec, &steps);
        assert_changes_equivalence(spec, &steps, canonical);
    }

    /// A snapshot's content, comparable: equal states pack to equal bytes (keys sorted).
    fn canonical(state: &[u8]) -> String {
        format!("{state:?}")
    }

    /// Ensures an incremental snapshot holds the keys updated since the previous one, not
    /// the whole state: one key of 10,000 changed is a few dozen bytes.
    #[test]
    fn reduce_changes_follow_the_updates_not_the_state() {
        let spec = r#"{"id":"r","kind":"reduce","params":{"agg":"sum","field":"value"}}"#;
        let mut r = operator(spec);
        let mut out = Vec::new();
        let all: Vec<Record> = (0..10_000).map(|k| keyed(k, 1)).collect();
        r.process(0, &mut all.clone(), &mut out).unwrap();
        // Untracked until a first snapshot: a job without checkpoints keeps no key list.
        assert!(r.snapshot_changes().unwrap().is_none());
        let whole = r.snapshot().unwrap();
        assert_eq!(
            r.snapshot_changes().unwrap().unwrap().len(),
            4,
            "nothing changed: a format byte, one aggregation and its kind, no keys"
        );
        r.process(0, &mut vec![keyed(7, 2), keyed(7, 3)], &mut out)
            .unwrap();
        let changes = r.snapshot_changes().unwrap().unwrap();
        let mut copy = assert_small_changes(spec, r.as_mut(), &whole, &changes, 1000, canonical);
        let err = copy.restore_changes(b"not a snapshot").unwrap_err();
        assert!(matches!(err, OpError::State(_)), "{err}");
        // Packed, an int key and its int sum take 5–6 bytes.
        assert!(whole.len() < 6 * 10_000, "{} bytes", whole.len());
    }

    /// Ensures a key that results could not carry one level down fails its record, naming
    /// the expression.
    #[test]
    fn key_by_refuses_keys_too_deep_for_a_result() {
        let spec = |depth: usize| {
            let e = format!("{}value{}", "[".repeat(depth), "]".repeat(depth));
            format!(r#"{{"id":"k","kind":"key_by","params":{{"expr":"{e}"}}}}"#)
        };
        let mut out = Vec::new();
        let depth = crate::codec::MAX_VALUE_DEPTH - 1;
        operator(&spec(depth))
            .process(0, &mut vec![Record::new(0, Value::Int(3))], &mut out)
            .unwrap();
        assert!(out[0].key.as_ref().unwrap().fits_one_level_down());
        let err = operator(&spec(depth + 1))
            .process(0, &mut vec![Record::new(0, Value::Int(3))], &mut out)
            .unwrap_err();
        assert!(matches!(err, OpError::Data(_)), "{err}");
        assert!(
            err.to_string().contains("a key nested deeper than 127"),
            "{err}"
        );
    }

    /// Ensures a value kept in state (a max) may nest as deep as a snapshot can be read back,
    /// and that one nested deeper fails its record with an error naming it.
    #[test]
    fn reduce_refuses_to_keep_values_too_deep_to_restore() {
        let spec = |depth: usize| {
            let field = format!("{}value{}", "[".repeat(depth), "]".repeat(depth));
            format!(r#"{{"id":"r","kind":"reduce","params":{{"agg":"max","field":"{field}"}}}}"#)
        };
        let deepest = spec(crate::codec::MAX_VALUE_DEPTH - 1);
        let mut r = operator(&deepest);
        let mut out = Vec::new();
        r.process(0, &mut vec![keyed(1, 5)], &mut out).unwrap();
        let state = r.snapshot().unwrap();
        let mut copy = operator(&deepest);
        copy.restore(&state).unwrap();
        assert_eq!(copy.snapshot().unwrap(), state);

        // Its result carries it one level down, and still goes on the wire.
        let result = out.pop().unwrap();
        let mut bytes = Vec::new();
        crate::codec::packed::encode_records(0, std::slice::from_ref(&result), &mut bytes);
        let decoded = crate::codec::packed::decode_batch(&bytes).unwrap();
        assert_eq!(decoded.records, vec![result]);

        let mut r = operator(&spec(crate::codec::MAX_VALUE_DEPTH));
        let err = r.process(0, &mut vec![keyed(1, 5)], &mut out).unwrap_err();
        assert!(matches!(err, OpError::Data(_)), "{err}");
        assert!(
            err.to_string().contains("nested deeper than 127 levels"),
            "{err}"
        );
    }

    /// Ensures a snapshot another operator wrote, or one cut short, is refused with an error
    /// naming what is wrong, and never panics.
    #[test]
    fn reduce_refuses_foreign_and_cut_snapshots() {
        let spec = r#"{"id":"r","kind":"reduce","params":{"agg":"sum","field":"value"}}"#;
        let mut r = operator(spec);
        let mut out = Vec::new();
        r.process(0, &mut (0..50).map(|k| keyed(k, k)).collect(), &mut out)
            .unwrap();
        let whole = r.snapshot().unwrap();
        let two = operator(
            r#"{"id":"r","kind":"reduce","params":{"aggs":[{"agg":"count"},{"agg":"max","field":"value"}]}}"#,
        )
        .snapshot()
        .unwrap();
        let err = operator(spec).restore(&two).unwrap_err();
        assert_eq!(
            err.to_string(),
            "state: reduce snapshot: 2 aggregations per key, the operator has 1"
        );
        let err = operator(r#"{"id":"r","kind":"reduce","params":{"agg":"count"}}"#)
            .restore(&whole)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "state: reduce snapshot: aggregation 1 (count) is sum in the snapshot, count in the operator"
        );
        let mut wrong = whole.clone();
        wrong[0] = 7;
        let err = operator(spec).restore(&wrong).unwrap_err();
        assert_eq!(
            err.to_string(),
            "state: reduce snapshot: format byte 7, expected 1"
        );
        for cut in 0..whole.len() {
            assert!(
                operator(spec).restore(&whole[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = whole.clone();
        longer.push(0);
        let err = operator(spec).restore(&longer).unwrap_err();
        assert_eq!(
            err.to_string(),
            "state: packed state: 1 bytes after its end"
        );
    }
}
