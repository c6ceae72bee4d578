//! Aggregations shared by `reduce` and `window_aggregate`: count, sum, min, max, avg,
//! count_distinct.
//!
//! Params take either one aggregation (`"agg": "sum", "field": "value.amount"`, output field
//! named after the aggregation) or several (`"aggs": [{"name": "n", "agg": "count"}, ...]`).
//! Accumulators are plain data; operator state packs them ([`pack_keyed`]) with the data
//! plane's value encoding.

use std::collections::BTreeSet;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::{eval, OpError, Params};
use crate::codec::packed::{put_f64, put_i64, put_u64, put_value, Unpacker};
use crate::codec::{CodecError, MAX_VALUE_DEPTH};
use crate::expr::Expr;
use crate::record::Record;
use crate::spec::SpecError;
use crate::value::Value;

/// Which aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    /// Number of records.
    Count,
    /// Sum of a numeric field (int stays int until a float is seen).
    Sum,
    /// Smallest value of a field (any type, by `Value`'s total order).
    Min,
    /// Largest value of a field.
    Max,
    /// Mean of a numeric field (float).
    Avg,
    /// Number of distinct values of a field.
    CountDistinct,
}

impl AggKind {
    fn parse(s: &str) -> Option<AggKind> {
        Some(match s {
            "count" => AggKind::Count,
            "sum" => AggKind::Sum,
            "min" => AggKind::Min,
            "max" => AggKind::Max,
            "avg" => AggKind::Avg,
            "count_distinct" => AggKind::CountDistinct,
            _ => return None,
        })
    }

    /// Every kind, indexed by the code snapshots record it by ([`begin_state`]).
    const ALL: [AggKind; 6] = [
        AggKind::Count,
        AggKind::Sum,
        AggKind::Min,
        AggKind::Max,
        AggKind::Avg,
        AggKind::CountDistinct,
    ];

    fn name(self) -> &'static str {
        match self {
            AggKind::Count => "count",
            AggKind::Sum => "sum",
            AggKind::Min => "min",
            AggKind::Max => "max",
            AggKind::Avg => "avg",
            AggKind::CountDistinct => "count_distinct",
        }
    }
}

/// One configured aggregation: output name, kind, and the field expression it reads.
#[derive(Debug, Clone)]
pub struct AggSpec {
    /// Output field name.
    pub name: Arc<str>,
    /// Kind.
    pub kind: AggKind,
    /// What to aggregate; `None` for count (and then `value` for the others).
    pub field: Option<Expr>,
}

/// Parses `agg`/`field` or `aggs` from params.
pub fn parse_aggs(p: &Params<'_>) -> Result<Vec<AggSpec>, SpecError> {
    const KINDS: &str = "count, sum, min, max, avg, count_distinct";
    let one =
        |name: &str, kind: &str, field: Option<&str>, at: &str| -> Result<AggSpec, SpecError> {
            let kind = AggKind::parse(kind).ok_or_else(|| {
                p.error(
                    at,
                    format!("unknown aggregation '{kind}' (expected {KINDS})"),
                )
            })?;
            let field = match field {
                None if kind != AggKind::Count => {
                    return Err(p.error(at, format!("'{}' needs a 'field' expression", kind.name())))
                }
                None => None,
                Some(src) => {
                    Some(Expr::compile(src).map_err(|e| {
                        p.error(at, format!("invalid field expression '{src}': {e}"))
                    })?)
                }
            };
            Ok(AggSpec {
                name: Arc::from(if name.is_empty() { kind.name() } else { name }),
                kind,
                field,
            })
        };
    match (p.raw("agg"), p.raw("aggs")) {
        (Some(_), Some(_)) => Err(p.error("aggs", "give either 'agg' or 'aggs', not both")),
        (None, None) => Err(p.error("agg", "is required (or 'aggs')")),
        (Some(_), None) => Ok(vec![one(
            "",
            p.required_str("agg")?,
            p.str("field")?,
            "agg",
        )?]),
        (None, Some(list)) => {
            if p.raw("field").is_some() {
                return Err(p.error("field", "use 'field' inside each entry of 'aggs'"));
            }
            let list = list
                .as_array()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| p.error("aggs", "must be a non-empty list"))?;
            let mut out: Vec<AggSpec> = Vec::new();
            for (i, item) in list.iter().enumerate() {
                let at = format!("aggs[{i}]");
                let get = |k: &str| item.get(k).and_then(|v| v.as_str());
                let kind = get("agg").ok_or_else(|| p.error(&at, "needs an 'agg' string"))?;
                let spec = one(get("name").unwrap_or(""), kind, get("field"), &at)?;
                if out.iter().any(|o| o.name == spec.name) {
                    return Err(p.error(&at, format!("duplicate output name '{}'", spec.name)));
                }
                out.push(spec);
            }
            Ok(out)
        }
    }
}

/// An accumulator: 16 bytes, so keyed state of a single aggregation stays compact (the
/// per-key entry of a window is the key plus this). Rare or large states are boxed.
#[derive(Debug, Clone, PartialEq)]
pub enum Acc {
    /// Records counted.
    Count(u64),
    /// Sum while every value was an int.
    SumInt(i64),
    /// Sum once a float (or an int overflow) was seen.
    SumFloat(f64),
    /// Smallest so far; `None` before the first value.
    Min(Option<Box<Value>>),
    /// Largest so far; `None` before the first value.
    Max(Option<Box<Value>>),
    /// Sum and count.
    Avg(Box<(f64, u64)>),
    /// Distinct values seen.
    Distinct(Box<DistinctSet>),
}

/// The values seen by `count_distinct`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DistinctSet(pub BTreeSet<Value>);

/// Tag bytes of packed accumulators ([`Acc::pack`]).
const COUNT: u8 = 0;
const SUM_INT: u8 = 1;
const SUM_FLOAT: u8 = 2;
const MIN_NONE: u8 = 3;
const MIN: u8 = 4;
const MAX_NONE: u8 = 5;
const MAX: u8 = 6;
const AVG: u8 = 7;
const DISTINCT: u8 = 8;

impl Acc {
    /// A fresh accumulator for `kind`.
    pub fn new(kind: AggKind) -> Acc {
        match kind {
            AggKind::Count => Acc::Count(0),
            AggKind::Sum => Acc::SumInt(0),
            AggKind::Min => Acc::Min(None),
            AggKind::Max => Acc::Max(None),
            AggKind::Avg => Acc::Avg(Box::new((0.0, 0))),
            AggKind::CountDistinct => Acc::Distinct(Box::default()),
        }
    }

    /// Folds one record in.
    #[inline]
    pub fn add(&mut self, spec: &AggSpec, rec: &Record) -> Result<(), OpError> {
        if let Acc::Count(n) = self {
            *n += 1;
            return Ok(());
        }
        let v = match &spec.field {
            Some(e) => eval(e, rec)?,
            None => rec.value.clone(),
        };
        let expr = || -> Arc<str> {
            spec.field
                .as_ref()
                .map(|e| e.source().into())
                .unwrap_or_else(|| "value".into())
        };
        let not_numeric = |v: &Value| OpError::Type {
            expr: expr(),
            expected: "a number",
            got: v.type_name(),
        };
        // A kept value goes into snapshots and, for min and max, one level down into
        // results, whose reader (the data plane's) refuses deeper nesting: refused here, the
        // record fails instead of a restore or the next task manager.
        let deepest = match self {
            Acc::Min(_) | Acc::Max(_) => Some(MAX_VALUE_DEPTH - 1),
            Acc::Distinct(_) => Some(MAX_VALUE_DEPTH),
            _ => None,
        };
        if let Some(deepest) = deepest.filter(|&d| v.nested_deeper_than(d)) {
            return Err(OpError::Data(format!(
                "{}: a value nested deeper than {deepest} levels cannot be kept in state",
                expr()
            )));
        }
        match self {
            Acc::Count(_) => {}
            Acc::SumInt(_) | Acc::SumFloat(_) => match v {
                Value::Int(i) => self.add_int(i),
                Value::Float(f) => self.add_float(f),
                other => return Err(not_numeric(&other)),
            },
            Acc::Min(m) => keep(m, v, std::cmp::Ordering::Less),
            Acc::Max(m) => keep(m, v, std::cmp::Ordering::Greater),
            Acc::Avg(avg) => {
                avg.0 += v.as_f64().ok_or_else(|| not_numeric(&v))?;
                avg.1 += 1;
            }
            Acc::Distinct(set) => {
                set.0.insert(v);
            }
        }
        Ok(())
    }

    fn add_int(&mut self, i: i64) {
        *self = match *self {
            Acc::SumInt(s) => match s.checked_add(i) {
                Some(x) => Acc::SumInt(x),
                None => Acc::SumFloat(s as f64 + i as f64),
            },
            Acc::SumFloat(s) => Acc::SumFloat(s + i as f64),
            _ => return,
        }
    }

    fn add_float(&mut self, f: f64) {
        *self = match *self {
            Acc::SumInt(s) => Acc::SumFloat(s as f64 + f),
            Acc::SumFloat(s) => Acc::SumFloat(s + f),
            _ => return,
        }
    }

    /// Folds another accumulator of the same kind in (merging session windows).
    pub fn merge(&mut self, other: Acc) {
        match (&mut *self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::SumInt(_) | Acc::SumFloat(_), Acc::SumInt(b)) => self.add_int(b),
            (Acc::SumInt(_) | Acc::SumFloat(_), Acc::SumFloat(b)) => self.add_float(b),
            (Acc::Min(a), Acc::Min(Some(b))) => keep(a, *b, std::cmp::Ordering::Less),
            (Acc::Max(a), Acc::Max(Some(b))) => keep(a, *b, std::cmp::Ordering::Greater),
            (Acc::Avg(a), Acc::Avg(b)) => {
                a.0 += b.0;
                a.1 += b.1;
            }
            (Acc::Distinct(a), Acc::Distinct(b)) => a.0.extend(b.0),
            // Accumulators come from the same aggregation list, so kinds always match
            // (and an empty min/max has nothing to merge).
            _ => {}
        }
    }

    /// Appends the accumulator packed: a tag byte, then its number(s) or value(s).
    pub fn pack(&self, out: &mut Vec<u8>) {
        match self {
            Acc::Count(n) => {
                out.push(COUNT);
                put_u64(out, *n);
            }
            Acc::SumInt(s) => {
                out.push(SUM_INT);
                put_i64(out, *s);
            }
            Acc::SumFloat(s) => {
                out.push(SUM_FLOAT);
                put_f64(out, *s);
            }
            Acc::Min(None) => out.push(MIN_NONE),
            Acc::Max(None) => out.push(MAX_NONE),
            Acc::Min(Some(v)) => {
                out.push(MIN);
                put_value(out, v);
            }
            Acc::Max(Some(v)) => {
                out.push(MAX);
                put_value(out, v);
            }
            Acc::Avg(a) => {
                out.push(AVG);
                put_f64(out, a.0);
                put_u64(out, a.1);
            }
            Acc::Distinct(set) => {
                out.push(DISTINCT);
                put_u64(out, set.0.len() as u64);
                for v in &set.0 {
                    put_value(out, v);
                }
            }
        }
    }

    /// Reads an accumulator [`Acc::pack`] wrote.
    pub fn unpack(r: &mut Unpacker<'_>) -> Result<Acc, CodecError> {
        Ok(match r.u8()? {
            COUNT => Acc::Count(r.u64()?),
            SUM_INT => Acc::SumInt(r.i64()?),
            SUM_FLOAT => Acc::SumFloat(r.f64()?),
            MIN_NONE => Acc::Min(None),
            MAX_NONE => Acc::Max(None),
            MIN => Acc::Min(Some(Box::new(r.value()?))),
            MAX => Acc::Max(Some(Box::new(r.value()?))),
            AVG => Acc::Avg(Box::new((r.f64()?, r.u64()?))),
            DISTINCT => {
                let n = r.count(1)?;
                let mut set = BTreeSet::new();
                for _ in 0..n {
                    set.insert(r.value()?);
                }
                Acc::Distinct(Box::new(DistinctSet(set)))
            }
            t => {
                return Err(CodecError(format!(
                    "packed state: unknown accumulator tag {t}"
                )))
            }
        })
    }

    /// The aggregate's current result.
    pub fn result(&self) -> Value {
        match self {
            Acc::Count(n) => Value::Int(*n as i64),
            Acc::SumInt(s) => Value::Int(*s),
            Acc::SumFloat(s) => Value::Float(*s),
            Acc::Min(v) | Acc::Max(v) => v.as_deref().cloned().unwrap_or_default(),
            Acc::Avg(a) if a.1 == 0 => Value::Null,
            Acc::Avg(a) => Value::Float(a.0 / a.1 as f64),
            Acc::Distinct(set) => Value::Int(set.0.len() as i64),
        }
    }
}

/// Keeps `v` in `slot` when the slot is empty or `v` compares `want` to it.
fn keep(slot: &mut Option<Box<Value>>, v: Value, want: std::cmp::Ordering) {
    match slot {
        Some(cur) if v.cmp(cur) != want => {}
        Some(cur) => **cur = v,
        None => *slot = Some(Box::new(v)),
    }
}

/// The accumulators of one key: inline for the common single aggregation, so a keyed update
/// touches the hash table entry only. 16 bytes (the variant tag lives in `Acc`'s spare tag
/// values), so a window's entry for an int or string key is 40 bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Accs {
    /// One aggregation.
    One(Acc),
    /// Several aggregations (a thin pointer, so `Accs` stays 16 bytes).
    Many(Box<Vec<Acc>>),
}

impl Accs {
    /// From a list of accumulators.
    pub fn from_vec(mut v: Vec<Acc>) -> Accs {
        match v.len() {
            1 => Accs::One(v.remove(0)),
            _ => Accs::Many(Box::new(v)),
        }
    }
}

impl std::ops::Deref for Accs {
    type Target = [Acc];
    fn deref(&self) -> &[Acc] {
        match self {
            Accs::One(a) => std::slice::from_ref(a),
            Accs::Many(m) => m,
        }
    }
}

impl std::ops::DerefMut for Accs {
    fn deref_mut(&mut self) -> &mut [Acc] {
        match self {
            Accs::One(a) => std::slice::from_mut(a),
            Accs::Many(m) => m,
        }
    }
}

/// Appends keyed accumulators in the order given (sort them for a canonical state): their
/// number, then each key's value and its accumulators, one per aggregation.
pub fn pack_keyed(out: &mut Vec<u8>, entries: &[(&Value, &Accs)]) {
    put_u64(out, entries.len() as u64);
    for (key, accs) in entries {
        put_value(out, key);
        pack_accs(out, accs);
    }
}

/// Reads what [`pack_keyed`] wrote into `table`, each key with its `aggs` accumulators
/// (made a `T` by `wrap`), replacing what the table held for it.
pub fn unpack_keyed<T>(
    r: &mut Unpacker<'_>,
    aggs: usize,
    table: &mut FxHashMap<Value, T>,
    wrap: impl Fn(Accs) -> T,
) -> Result<(), CodecError> {
    // A key takes at least its value's tag and an accumulator's. Room for a count read
    // from the bytes is reserved up to a bound, as for events.
    let n = r.count(2)?;
    table.reserve(n.min(MAX_RESERVE_KEYS));
    for _ in 0..n {
        let key = r.value()?;
        table.insert(key, wrap(unpack_accs(r, aggs)?));
    }
    Ok(())
}

/// Most keys a restore reserves table room for ahead of reading them: a legitimate state of
/// more keys grows the table as it reads.
const MAX_RESERVE_KEYS: usize = 1 << 16;

/// Appends one key's (or session's) accumulators.
pub fn pack_accs(out: &mut Vec<u8>, accs: &[Acc]) {
    for a in accs {
        a.pack(out);
    }
}

/// Reads `aggs` accumulators [`pack_accs`] wrote.
pub fn unpack_accs(r: &mut Unpacker<'_>, aggs: usize) -> Result<Accs, CodecError> {
    Ok(match aggs {
        1 => Accs::One(Acc::unpack(r)?),
        n => Accs::Many(Box::new(
            (0..n).map(|_| Acc::unpack(r)).collect::<Result<_, _>>()?,
        )),
    })
}

/// Starts packed keyed state: the state's `format` byte (which operator wrote it, and for
/// an operator whose incremental snapshots differ from its whole ones, which kind), then the
/// aggregations per key, their number and kinds, which [`open_state`] checks: a state
/// restored into an operator whose aggregations changed would otherwise fold a sum into a
/// count. `capacity` is a guess of the bytes to come.
pub fn begin_state(format: u8, aggs: &[AggSpec], capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    out.push(format);
    put_u64(&mut out, aggs.len() as u64);
    out.extend(aggs.iter().map(|a| a.kind as u8));
    out
}

/// Reads the header [`begin_state`] wrote: an error names what differs when the bytes are
/// not `what` (a `format` snapshot) or hold other aggregations than `aggs`.
pub fn open_state<'a>(
    bytes: &'a [u8],
    format: u8,
    what: &str,
    aggs: &[AggSpec],
) -> Result<Unpacker<'a>, OpError> {
    let mut r = Unpacker::new(bytes);
    let found = r.u8()?;
    if found != format {
        return Err(OpError::State(format!(
            "{what}: format byte {found}, expected {format}"
        )));
    }
    let n = r.u64()?;
    if n != aggs.len() as u64 {
        return Err(OpError::State(format!(
            "{what}: {n} aggregations per key, the operator has {}",
            aggs.len()
        )));
    }
    for (i, spec) in aggs.iter().enumerate() {
        let code = r.u8()?;
        if code != spec.kind as u8 {
            let found = AggKind::ALL
                .get(usize::from(code))
                .map_or_else(|| format!("unknown kind {code}"), |k| k.name().to_string());
            return Err(OpError::State(format!(
                "{what}: aggregation {} ({}) is {found} in the snapshot, {} in the operator",
                i + 1,
                spec.name,
                spec.kind.name()
            )));
        }
    }
    Ok(r)
}

/// Fresh accumulators for `aggs`.
pub fn new_accs(aggs: &[AggSpec]) -> Accs {
    match aggs {
        [one] => Accs::One(Acc::new(one.kind)),
        _ => Accs::Many(Box::new(aggs.iter().map(|a| Acc::new(a.kind)).collect())),
    }
}

/// Folds a record into every accumulator.
#[inline]
pub fn add_all(accs: &mut [Acc], aggs: &[AggSpec], rec: &Record) -> Result<(), OpError> {
    for (acc, spec) in accs.iter_mut().zip(aggs) {
        acc.add(spec, rec)?;
    }
    Ok(())
}

/// Where a result field's value comes from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Key,
    Extra(usize),
    Agg(usize),
}

/// The layout of an aggregate's results, `{key, <extra fields>, <agg name>: result ...}`,
/// worked out once per operator: the names sorted as `Value::Map` keeps them (a later
/// duplicate wins, as in [`Value::map`]) and where each value comes from. A result is then
/// one allocation and reference-count bumps, not a string allocation per field and a sort.
#[derive(Debug, Clone)]
pub struct ResultFields {
    fields: Vec<(Arc<str>, Source)>,
}

impl ResultFields {
    /// The layout for results with `extra` fields (in their argument order) after `key`.
    pub fn new(extra: &[&str], aggs: &[AggSpec]) -> ResultFields {
        let mut all: Vec<(Arc<str>, Source)> = vec![(Arc::from("key"), Source::Key)];
        all.extend(
            extra
                .iter()
                .enumerate()
                .map(|(i, k)| (Arc::from(*k), Source::Extra(i))),
        );
        all.extend(
            aggs.iter()
                .enumerate()
                .map(|(i, a)| (a.name.clone(), Source::Agg(i))),
        );
        ResultFields {
            fields: crate::value::sorted_last_wins(all),
        }
    }

    /// One result: `extra` in the order given to [`ResultFields::new`], `accs` in the order
    /// of the aggregations.
    #[inline]
    pub fn value(&self, key: &Value, extra: &[Value], accs: &[Acc]) -> Value {
        // An exact-size iterator: `Arc<[_]>` allocates once and fills in place.
        Value::Map(
            self.fields
                .iter()
                .map(|(name, from)| {
                    let v = match *from {
                        Source::Key => key.clone(),
                        Source::Extra(i) => extra[i].clone(),
                        Source::Agg(i) => accs[i].result(),
                    };
                    (name.clone(), v)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keyed state entries are key + accumulators: keep them small (cache footprint).
    #[test]
    fn accumulators_are_compact() {
        assert_eq!(std::mem::size_of::<Acc>(), 16);
        assert_eq!(std::mem::size_of::<Accs>(), 16);
    }

    /// Ensures every accumulator packs and unpacks to itself (floats bit for bit), an int key
    /// with a small count takes seven bytes, and cut or corrupt bytes are errors.
    #[test]
    fn accumulators_pack_and_unpack() {
        let set: BTreeSet<Value> = [Value::Int(3), Value::str("x"), Value::Null].into();
        let accs = vec![
            Acc::Count(u64::MAX),
            Acc::SumInt(i64::MIN),
            Acc::SumFloat(f64::NAN),
            Acc::SumFloat(-0.0),
            Acc::Min(None),
            Acc::Min(Some(Box::new(Value::Null))),
            Acc::Max(None),
            Acc::Max(Some(Box::new(Value::str("zz")))),
            Acc::Avg(Box::new((2.5, 7))),
            Acc::Distinct(Box::new(DistinctSet(set))),
            Acc::Distinct(Box::default()),
        ];
        let (k1, k2) = (Value::Int(-5), Value::str("key"));
        let (a1, a2) = (
            Accs::Many(Box::new(accs.clone())),
            Accs::Many(Box::new(accs)),
        );
        let mut out = Vec::new();
        pack_keyed(&mut out, &[(&k1, &a1), (&k2, &a2)]);
        let mut table = FxHashMap::default();
        let mut r = Unpacker::new(&out);
        unpack_keyed(&mut r, a1.len(), &mut table, |a| a).unwrap();
        r.finish().unwrap();
        let mut again = Vec::new();
        pack_keyed(&mut again, &[(&k1, &table[&k1]), (&k2, &table[&k2])]);
        assert_eq!(again, out, "the same bytes, NaN and -0.0 included");

        let (key, count) = (Value::Int(12_345), Accs::One(Acc::Count(300)));
        let mut small = Vec::new();
        pack_keyed(&mut small, &[(&key, &count)]);
        assert_eq!(
            small.len(),
            1 + 4 + 3,
            "key count, key (tag, varint), count (tag, varint)"
        );

        for cut in 0..out.len() {
            let mut r = Unpacker::new(&out[..cut]);
            let mut t = FxHashMap::default();
            let read = unpack_keyed(&mut r, a1.len(), &mut t, |a| a);
            assert!(read.is_err() || r.finish().is_err(), "cut at {cut}");
        }
        let mut bad = small.clone();
        bad[5] = 99;
        let mut r = Unpacker::new(&bad);
        let err = unpack_keyed(&mut r, 1, &mut FxHashMap::default(), |a| a).unwrap_err();
        assert_eq!(err.0, "packed state: unknown accumulator tag 99");
    }

    /// A kind's snapshot code is its place in `AggKind::ALL`, so `open_state` names it back.
    #[test]
    fn kind_codes_name_their_kind() {
        for (code, kind) in AggKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, code);
            assert_eq!(AggKind::parse(kind.name()), Some(*kind));
        }
    }

    /// A result is the map `Value::map` builds from `key`, the extras and the aggregations,
    /// in that order: sorted by name, a later duplicate winning (an aggregation named like
    /// a window bound replaces it).
    #[test]
    fn result_fields_build_the_map_value_map_builds() {
        let agg = |name: &str, kind| AggSpec {
            name: name.into(),
            kind,
            field: None,
        };
        let aggs = [
            agg("n", AggKind::Count),
            agg("window_end", AggKind::Count),
            agg("a", AggKind::Avg),
        ];
        let mut accs: Vec<Acc> = aggs.iter().map(|a| Acc::new(a.kind)).collect();
        accs[0] = Acc::Count(3);
        accs[1] = Acc::Count(7);
        let extra = ["window_start", "window_end"];
        let fields = ResultFields::new(&extra, &aggs);
        let key = Value::str("k");
        let extras = [Value::Int(10), Value::Int(20)];
        let mut entries: Vec<(Arc<str>, Value)> = vec![("key".into(), key.clone())];
        entries.extend(
            extra
                .iter()
                .zip(&extras)
                .map(|(k, v)| ((*k).into(), v.clone())),
        );
        entries.extend(
            aggs.iter()
                .zip(&accs)
                .map(|(a, acc)| (a.name.clone(), acc.result())),
        );
        let built = fields.value(&key, &extras, &accs);
        assert_eq!(built, Value::map(entries));
        let Value::Map(m) = built else {
            panic!("a result is a map");
        };
        let names: Vec<&str> = m.iter().map(|(k, _)| &**k).collect();
        assert_eq!(names, ["a", "key", "n", "window_end", "window_start"]);
        assert_eq!(
            m[3].1,
            Value::Int(7),
            "the aggregation named window_end wins"
        );
    }

    #[test]
    fn sums_promote_and_merge() {
        let spec = |kind| AggSpec {
            name: "x".into(),
            kind,
            field: None,
        };
        let rec = |v: Value| Record::new(0, v);
        let s = spec(AggKind::Sum);
        let mut a = Acc::new(AggKind::Sum);
        a.add(&s, &rec(Value::Int(i64::MAX))).unwrap();
        a.add(&s, &rec(Value::Int(1))).unwrap();
        assert!(
            matches!(a.result(), Value::Float(_)),
            "overflow promotes to float"
        );
        let mut b = Acc::new(AggKind::Sum);
        b.add(&s, &rec(Value::Int(2))).unwrap();
        b.merge(Acc::SumFloat(0.5));
        assert_eq!(b.result(), Value::Float(2.5));
        assert!(b.add(&s, &rec(Value::str("x"))).is_err());
        let m = spec(AggKind::Min);
        let mut lo = Acc::new(AggKind::Min);
        assert_eq!(lo.result(), Value::Null);
        for v in [5, 3, 9] {
            lo.add(&m, &rec(Value::Int(v))).unwrap();
        }
        lo.merge(Acc::Min(Some(Box::new(Value::Int(4)))));
        assert_eq!(lo.result(), Value::Int(3));
    }
}
