//! Aggregations shared by `reduce` and `window_aggregate`: count, sum, min, max, avg,
//! count_distinct.
//!
//! Params take either one aggregation (`"agg": "sum", "field": "value.amount"`, output field
//! named after the aggregation) or several (`"aggs": [{"name": "n", "agg": "count"}, ...]`).
//! Accumulators are plain data so operator state snapshots by encoding them.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{eval, OpError, Params};
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

/// An accumulator.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Acc {
    /// Records counted.
    Count(u64),
    /// Running sum (`Int` or `Float`); `Null` before the first value.
    Sum(Value),
    /// Smallest so far; `Null` before the first value.
    Min(Value),
    /// Largest so far; `Null` before the first value.
    Max(Value),
    /// Sum and count.
    Avg(f64, u64),
    /// Distinct values seen.
    Distinct(#[rkyv(with = rkyv::with::AsVec)] BTreeSet<Value>),
}

impl Acc {
    /// A fresh accumulator for `kind`.
    pub fn new(kind: AggKind) -> Acc {
        match kind {
            AggKind::Count => Acc::Count(0),
            AggKind::Sum => Acc::Sum(Value::Null),
            AggKind::Min => Acc::Min(Value::Null),
            AggKind::Max => Acc::Max(Value::Null),
            AggKind::Avg => Acc::Avg(0.0, 0),
            AggKind::CountDistinct => Acc::Distinct(BTreeSet::new()),
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
        let numeric = |v: &Value| -> Result<(), OpError> {
            match v {
                Value::Int(_) | Value::Float(_) => Ok(()),
                other => Err(OpError::Type {
                    expr: spec
                        .field
                        .as_ref()
                        .map(|e| e.source().into())
                        .unwrap_or_else(|| "value".into()),
                    expected: "a number",
                    got: other.type_name(),
                }),
            }
        };
        match self {
            Acc::Count(_) => {}
            Acc::Sum(s) => {
                numeric(&v)?;
                add_numbers(s, v);
            }
            Acc::Min(m) => {
                if m.is_null() || v < *m {
                    *m = v;
                }
            }
            Acc::Max(m) => {
                if m.is_null() || v > *m {
                    *m = v;
                }
            }
            Acc::Avg(sum, n) => {
                numeric(&v)?;
                *sum += v.as_f64().unwrap_or(0.0);
                *n += 1;
            }
            Acc::Distinct(set) => {
                set.insert(v);
            }
        }
        Ok(())
    }

    /// Folds another accumulator of the same kind in (merging session windows).
    pub fn merge(&mut self, other: Acc) {
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::Sum(a), Acc::Sum(b)) => {
                if !b.is_null() {
                    add_numbers(a, b)
                }
            }
            (Acc::Min(a), Acc::Min(b)) => {
                if !b.is_null() && (a.is_null() || b < *a) {
                    *a = b
                }
            }
            (Acc::Max(a), Acc::Max(b)) => {
                if !b.is_null() && (a.is_null() || b > *a) {
                    *a = b
                }
            }
            (Acc::Avg(s, n), Acc::Avg(s2, n2)) => {
                *s += s2;
                *n += n2;
            }
            (Acc::Distinct(a), Acc::Distinct(b)) => a.extend(b),
            // Accumulators come from the same aggregation list, so kinds always match.
            _ => debug_assert!(false, "merging accumulators of different kinds"),
        }
    }

    /// The aggregate's current result.
    pub fn result(&self) -> Value {
        match self {
            Acc::Count(n) => Value::Int(*n as i64),
            Acc::Sum(v) | Acc::Min(v) | Acc::Max(v) => v.clone(),
            Acc::Avg(_, 0) => Value::Null,
            Acc::Avg(s, n) => Value::Float(*s / *n as f64),
            Acc::Distinct(set) => Value::Int(set.len() as i64),
        }
    }
}

/// `sum += v` for numbers: ints stay ints until overflow or a float arrives.
fn add_numbers(sum: &mut Value, v: Value) {
    *sum = match (&*sum, &v) {
        (Value::Null, _) => v,
        (Value::Int(a), Value::Int(b)) => match a.checked_add(*b) {
            Some(x) => Value::Int(x),
            None => Value::Float(*a as f64 + *b as f64),
        },
        (a, b) => Value::Float(a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0)),
    };
}

/// Fresh accumulators for `aggs`.
pub fn new_accs(aggs: &[AggSpec]) -> Vec<Acc> {
    aggs.iter().map(|a| Acc::new(a.kind)).collect()
}

/// Folds a record into every accumulator.
#[inline]
pub fn add_all(accs: &mut [Acc], aggs: &[AggSpec], rec: &Record) -> Result<(), OpError> {
    for (acc, spec) in accs.iter_mut().zip(aggs) {
        acc.add(spec, rec)?;
    }
    Ok(())
}

/// `{key, <extra fields>, <agg name>: result ...}`.
pub fn result_value(key: &Value, extra: &[(&str, Value)], accs: &[Acc], aggs: &[AggSpec]) -> Value {
    let mut fields: Vec<(Arc<str>, Value)> = Vec::with_capacity(1 + extra.len() + aggs.len());
    fields.push((Arc::from("key"), key.clone()));
    fields.extend(extra.iter().map(|(k, v)| (Arc::from(*k), v.clone())));
    fields.extend(
        aggs.iter()
            .zip(accs)
            .map(|(s, a)| (s.name.clone(), a.result())),
    );
    Value::map(fields)
}
