//! Built-in functions: the table of names and arities, and their implementations.
//!
//! Invariants: calls are resolved at compile time (an unknown name or a wrong argument count is
//! a compile error naming the function and the arities it accepts); every function is
//! deterministic (no clock, no randomness, no state) and total: a bad argument is an
//! [`EvalError`], never a panic, and results are size-capped where an input could blow them up
//! (`range()`, `replace()`).

use std::cmp::Ordering;
use std::sync::{Arc, OnceLock};

use super::compile::{self, compile_all, finish, list_get, Budget, Code, Node, R};
use super::parser::Ast;
use super::{CResult, EvalError, ExprError};
use crate::value::Value;

/// Largest `n` accepted by `range(n)`.
const MAX_RANGE: i64 = 1_000_000;

/// Largest string (in bytes) an expression may build (`replace()`, `concat()`, `+`).
pub(crate) const MAX_STRING: usize = 64 << 20;

/// Longest text `json_parse()` reads: a byte of JSON can become a 24-byte value and more,
/// so this keeps what one call builds near [`MAX_STRING`].
const MAX_JSON_TEXT: usize = MAX_STRING / 16;

/// How a function is implemented.
#[derive(Clone, Copy)]
enum Imp {
    /// One argument, evaluated by reference.
    A1(fn(&Value) -> R),
    /// One argument; the function charges what it builds as it builds it (its result can
    /// be far larger than its argument).
    Charged1(fn(&Value, &Budget) -> R),
    /// Two arguments; the function charges what it builds as it builds it.
    Charged2(fn(&Value, &Value, &Budget) -> R),
    /// Two arguments, evaluated by reference.
    A2(fn(&Value, &Value) -> R),
    /// Three arguments, evaluated by reference.
    A3(fn(&Value, &Value, &Value) -> R),
    /// At least this many arguments, all evaluated.
    Var(usize, fn(&[Value]) -> R),
    /// `if(c, a, b)`: lazy, like `c ? a : b`.
    If,
    /// `coalesce(a, ...)`: lazy, stops at the first non-null.
    Coalesce,
}

impl Imp {
    fn accepts(self, n: usize) -> bool {
        match self {
            Imp::A1(_) | Imp::Charged1(_) => n == 1,
            Imp::A2(_) | Imp::Charged2(_) => n == 2,
            Imp::A3(_) | Imp::If => n == 3,
            Imp::Var(min, _) => n >= min,
            Imp::Coalesce => n >= 1,
        }
    }

    /// Fewest and (when bounded) most arguments accepted.
    fn arity(self) -> (usize, Option<usize>) {
        match self {
            Imp::A1(_) | Imp::Charged1(_) => (1, Some(1)),
            Imp::A2(_) | Imp::Charged2(_) => (2, Some(2)),
            Imp::A3(_) | Imp::If => (3, Some(3)),
            Imp::Var(min, _) => (min, None),
            Imp::Coalesce => (1, None),
        }
    }
}

/// "1 argument", "2 or 3 arguments", "at least 1 argument".
fn describe_arities(imps: &[Imp]) -> String {
    let plural = |n: usize| if n == 1 { "argument" } else { "arguments" };
    let mut fixed: Vec<usize> = Vec::new();
    let mut parts: Vec<String> = Vec::new();
    for imp in imps {
        match imp.arity() {
            (min, Some(max)) if min == max => fixed.push(min),
            (min, _) => parts.push(format!("at least {min} {}", plural(min))),
        }
    }
    if let Some(&last) = fixed.last() {
        let counts: Vec<String> = fixed.iter().map(usize::to_string).collect();
        parts.insert(0, format!("{} {}", counts.join(" or "), plural(last)));
    }
    parts.join(" or ")
}

/// One entry of the function table (a name may have several entries with different arities).
struct FnDef {
    name: &'static str,
    imp: Imp,
    /// Returns one of its arguments or a part of one: builds nothing, is charged nothing.
    picks: bool,
}

const fn def(name: &'static str, imp: Imp) -> FnDef {
    FnDef {
        name,
        imp,
        picks: false,
    }
}

/// A function that returns one of its arguments or a part of one ([`FnDef::picks`]).
const fn pick(name: &'static str, imp: Imp) -> FnDef {
    FnDef {
        name,
        imp,
        picks: true,
    }
}

static FUNCTIONS: &[FnDef] = &[
    def("split", Imp::Charged2(split)),
    def("words", Imp::Charged1(words)),
    def("lower", Imp::A1(lower)),
    def("upper", Imp::A1(upper)),
    def("trim", Imp::A1(trim)),
    def("len", Imp::A1(len)),
    def("contains", Imp::A2(contains)),
    def("starts_with", Imp::A2(starts_with)),
    def("ends_with", Imp::A2(ends_with)),
    def("replace", Imp::A3(replace)),
    def("substr", Imp::A2(substr2)),
    def("substr", Imp::A3(substr3)),
    def("concat", Imp::Var(1, concat)),
    def("string", Imp::A1(string)),
    def("int", Imp::A1(int)),
    def("float", Imp::A1(float)),
    def("hash", Imp::A1(hash)),
    def("abs", Imp::A1(abs)),
    pick("min", Imp::Var(1, min)),
    pick("max", Imp::Var(1, max)),
    def("floor", Imp::A1(floor)),
    def("ceil", Imp::A1(ceil)),
    def("round", Imp::A1(round)),
    def("sqrt", Imp::A1(sqrt)),
    def("coalesce", Imp::Coalesce),
    def("type_of", Imp::A1(type_of)),
    def("keys", Imp::A1(keys)),
    pick("get", Imp::A3(get)),
    def("json_parse", Imp::Charged1(json_parse)),
    def("to_json", Imp::A1(to_json)),
    def("if", Imp::If),
    def("range", Imp::Charged1(range)),
    def("bucket", Imp::A2(bucket)),
];

/// True when `name` is a built-in function.
pub(crate) fn is_function(name: &str) -> bool {
    FUNCTIONS.iter().any(|d| d.name == name)
}

/// Resolves and compiles the call `name(args)` found at column `col`.
pub(crate) fn compile_call(name: &str, args: &[Ast], col: usize, fold: &Budget) -> CResult<Code> {
    let (imp, picks) = resolve(name, args.len(), col)?;
    let args = compile_all(args, fold)?;
    call_code(imp, picks, args, name, col, fold)
}

/// The implementation of `name` taking `n` arguments, or an error naming the function and
/// the arities it accepts.
#[inline(never)]
fn resolve(name: &str, n: usize, col: usize) -> CResult<(Imp, bool)> {
    let defs: Vec<&FnDef> = FUNCTIONS.iter().filter(|d| d.name == name).collect();
    let imps: Vec<Imp> = defs.iter().map(|d| d.imp).collect();
    if imps.is_empty() {
        return Err(ExprError::new(col, format!("unknown function '{name}'")));
    }
    match defs.iter().find(|d| d.imp.accepts(n)) {
        Some(d) => Ok((d.imp, d.picks)),
        None => Err(ExprError::new(
            col,
            format!(
                "function '{name}' expects {}, got {n}",
                describe_arities(&imps)
            ),
        )),
    }
}

#[inline(never)]
fn call_code(
    imp: Imp,
    picks: bool,
    args: Vec<Code>,
    name: &str,
    col: usize,
    fold: &Budget,
) -> CResult<Code> {
    let constant = args.iter().all(Code::is_const);
    // What a function returns is charged unless it picks an argument (or a part of one) or
    // returns one unchanged (`lower` of a lower-case string): those are no new allocation.
    let charge = move |budget: &Budget, v: Value, args: &[&Value]| {
        if picks || args.iter().any(|a| v.shares_allocation(a)) {
            Ok(v)
        } else {
            budget.built(v)
        }
    };
    // `resolve` checked the arity, so the conversions to fixed-size arrays succeed.
    let arity_bug = || ExprError::new(col, format!("internal error: arity of '{name}'"));
    let node = |n: Node| finish(fold, constant, n);
    Ok(match imp {
        Imp::A1(f) => {
            let [a] = <[Code; 1]>::try_from(args).map_err(|_| arity_bug())?;
            node(Box::new(move |rec, budget| {
                let a = a.eval_cow(rec, budget)?;
                charge(budget, f(&a)?, &[&a])
            }))
        }
        Imp::Charged1(f) => {
            let [a] = <[Code; 1]>::try_from(args).map_err(|_| arity_bug())?;
            node(Box::new(move |rec, budget| {
                f(&*a.eval_cow(rec, budget)?, budget)
            }))
        }
        Imp::Charged2(f) => {
            let [a, b] = <[Code; 2]>::try_from(args).map_err(|_| arity_bug())?;
            node(Box::new(move |rec, budget| {
                let a = a.eval_cow(rec, budget)?;
                f(&a, &*b.eval_cow(rec, budget)?, budget)
            }))
        }
        Imp::A2(f) => {
            let [a, b] = <[Code; 2]>::try_from(args).map_err(|_| arity_bug())?;
            node(Box::new(move |rec, budget| {
                let a = a.eval_cow(rec, budget)?;
                let b = b.eval_cow(rec, budget)?;
                charge(budget, f(&a, &b)?, &[&a, &b])
            }))
        }
        Imp::A3(f) => {
            let [a, b, c] = <[Code; 3]>::try_from(args).map_err(|_| arity_bug())?;
            node(Box::new(move |rec, budget| {
                let a = a.eval_cow(rec, budget)?;
                let b = b.eval_cow(rec, budget)?;
                let c = c.eval_cow(rec, budget)?;
                charge(budget, f(&a, &b, &c)?, &[&a, &b, &c])
            }))
        }
        Imp::Var(_, f) => node(Box::new(move |rec, budget| {
            // Up to four arguments are gathered on the stack, more in a Vec.
            if args.len() <= 4 {
                let mut buf: [Value; 4] = Default::default();
                for (slot, a) in buf.iter_mut().zip(&args) {
                    *slot = a.eval(rec, budget)?;
                }
                let args = &buf[..args.len()]; // in bounds: len <= 4 checked above
                let refs: [&Value; 4] = [&buf[0], &buf[1], &buf[2], &buf[3]];
                charge(budget, f(args)?, &refs[..args.len()])
            } else {
                let vals = args
                    .iter()
                    .map(|a| a.eval(rec, budget))
                    .collect::<Result<Vec<_>, _>>()?;
                let refs: Vec<&Value> = vals.iter().collect();
                charge(budget, f(&vals)?, &refs)
            }
        })),
        Imp::If => {
            let [c, a, b] = <[Code; 3]>::try_from(args).map_err(|_| arity_bug())?;
            compile::cond(fold, c, a, b, "if()")
        }
        Imp::Coalesce => node(Box::new(move |rec, budget| {
            for a in &args {
                let v = a.eval_cow(rec, budget)?;
                if !matches!(*v, Value::Null) {
                    return Ok(v.into_owned());
                }
            }
            Ok(Value::Null)
        })),
    })
}

fn bad(func: &'static str, expected: &'static str, got: &Value) -> Box<EvalError> {
    Box::new(EvalError::BadArg {
        func,
        expected,
        got: got.type_name(),
    })
}

fn want_str<'a>(func: &'static str, v: &'a Value) -> Result<&'a str, Box<EvalError>> {
    match v {
        Value::Str(s) => Ok(s),
        other => Err(bad(func, "a string", other)),
    }
}

fn want_int(func: &'static str, v: &Value) -> Result<i64, Box<EvalError>> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(bad(func, "an int", other)),
    }
}

fn want_num(func: &'static str, v: &Value) -> Result<f64, Box<EvalError>> {
    v.as_f64().ok_or_else(|| bad(func, "a number", v))
}

/// Compact JSON text of a value, for `op`; fails once it would pass [`MAX_STRING`] (a value
/// shared many times over, or escapes, make the text far larger than the value).
fn json_text(op: &'static str, v: &Value) -> Result<String, Box<EvalError>> {
    struct Capped(Vec<u8>);
    impl std::io::Write for Capped {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0.len() + b.len() > MAX_STRING {
                return Err(std::io::ErrorKind::OutOfMemory.into());
            }
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // Serializing a Value fails only at the cap: map keys are strings and non-finite
    // floats become null. serde_json writes UTF-8.
    let mut text = Capped(Vec::new());
    serde_json::to_writer(&mut text, v).map_err(|_| Box::new(EvalError::TooLarge { op }))?;
    Ok(String::from_utf8(text.0)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// Converts an integral float to an int; NaN, infinities and out-of-range values fail.
fn float_to_int(func: &'static str, f: f64) -> R {
    // -2^63 is exactly i64::MIN; 2^63 is the first float above i64::MAX.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if f.is_finite() && (-LIMIT..LIMIT).contains(&f) {
        Ok(Value::Int(f as i64))
    } else {
        Err(Box::new(EvalError::IntRange { func }))
    }
}

fn split(s: &Value, sep: &Value, budget: &Budget) -> R {
    let s = want_str("split", s)?;
    let sep = want_str("split", sep)?;
    if sep.is_empty() {
        charged_strings(
            budget,
            s.char_indices().map(|(i, c)| &s[i..i + c.len_utf8()]),
        )
    } else {
        charged_strings(budget, s.split(sep))
    }
}

fn words(s: &Value, budget: &Budget) -> R {
    charged_strings(budget, want_str("words", s)?.split_whitespace())
}

/// The list of `parts`, each charged (its slot and its bytes) before it is built.
fn charged_strings<'a>(budget: &Budget, parts: impl Iterator<Item = &'a str>) -> R {
    let mut out = Vec::new();
    for part in parts {
        // Its slot, and the string's header and bytes.
        budget.charge(std::mem::size_of::<Value>() + 16 + part.len())?;
        out.push(Value::str(part));
    }
    Ok(Value::list(out))
}

fn lower(v: &Value) -> R {
    let s = want_str("lower", v)?;
    if s.is_ascii() && !s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Ok(v.clone());
    }
    Ok(Value::from(s.to_lowercase()))
}

fn upper(v: &Value) -> R {
    let s = want_str("upper", v)?;
    if s.is_ascii() && !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Ok(v.clone());
    }
    Ok(Value::from(s.to_uppercase()))
}

fn trim(v: &Value) -> R {
    let s = want_str("trim", v)?;
    let t = s.trim();
    Ok(if t.len() == s.len() {
        v.clone()
    } else {
        Value::str(t)
    })
}

fn count(n: usize) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

fn len(v: &Value) -> R {
    Ok(match v {
        Value::Str(s) => count(s.chars().count()),
        Value::List(items) => count(items.len()),
        Value::Map(entries) => count(entries.len()),
        Value::Bytes(b) => count(b.len()),
        other => return Err(bad("len", "a string, list, map or bytes", other)),
    })
}

fn contains(hay: &Value, x: &Value) -> R {
    match hay {
        Value::Str(s) => match x {
            Value::Str(sub) => Ok(Value::Bool(s.contains(&**sub))),
            other => Err(bad("contains", "a string to look for in a string", other)),
        },
        Value::List(items) => Ok(Value::Bool(items.iter().any(|i| i == x))),
        other => Err(bad("contains", "a string or list", other)),
    }
}

fn starts_with(s: &Value, p: &Value) -> R {
    Ok(Value::Bool(
        want_str("starts_with", s)?.starts_with(want_str("starts_with", p)?),
    ))
}

fn ends_with(s: &Value, p: &Value) -> R {
    Ok(Value::Bool(
        want_str("ends_with", s)?.ends_with(want_str("ends_with", p)?),
    ))
}

fn replace(v: &Value, from: &Value, to: &Value) -> R {
    let s = want_str("replace", v)?;
    let from = want_str("replace", from)?;
    let to = want_str("replace", to)?;
    if from.is_empty() || !s.contains(from) {
        return Ok(v.clone());
    }
    if to.len() > from.len() {
        // Bound the output before building it: matches * growth + input.
        let upper_bound = (s.len() / from.len()).saturating_mul(to.len());
        if upper_bound > MAX_STRING {
            let grown = s
                .matches(from)
                .count()
                .saturating_mul(to.len() - from.len());
            if grown.saturating_add(s.len()) > MAX_STRING {
                return Err(Box::new(EvalError::TooLarge { op: "replace()" }));
            }
        }
    }
    Ok(Value::from(s.replace(from, to)))
}

fn substr2(s: &Value, start: &Value) -> R {
    substr(s, start, None)
}

fn substr3(s: &Value, start: &Value, len: &Value) -> R {
    substr(s, start, Some(len))
}

/// Chars `start..start+len` of `s`, clamped to the string; a negative `start` counts from the
/// end, a negative `len` gives "".
fn substr(v: &Value, start: &Value, len: Option<&Value>) -> R {
    let s = want_str("substr", v)?;
    let start = want_int("substr", start)?;
    let len = len.map(|l| want_int("substr", l)).transpose()?;
    let start = if start < 0 {
        let n = i64::try_from(s.chars().count()).unwrap_or(i64::MAX);
        n.saturating_add(start).max(0)
    } else {
        start
    };
    let skip = usize::try_from(start).unwrap_or(usize::MAX);
    let take = match len {
        Some(l) => usize::try_from(l.max(0)).unwrap_or(usize::MAX),
        None => usize::MAX,
    };
    Ok(Value::from(
        s.chars().skip(skip).take(take).collect::<String>(),
    ))
}

fn concat(args: &[Value]) -> R {
    let mut out = String::new();
    for a in args {
        match a {
            Value::Str(s) => out.push_str(s),
            other => out.push_str(&json_text("concat()", other)?),
        }
        if out.len() > MAX_STRING {
            return Err(Box::new(EvalError::TooLarge { op: "concat()" }));
        }
    }
    Ok(Value::from(out))
}

fn string(v: &Value) -> R {
    Ok(match v {
        Value::Str(_) => v.clone(),
        other => Value::from(json_text("string()", other)?),
    })
}

fn int(v: &Value) -> R {
    match v {
        Value::Int(_) => Ok(v.clone()),
        Value::Float(f) => float_to_int("int", f.trunc()),
        Value::Bool(b) => Ok(Value::Int(i64::from(*b))),
        Value::Str(s) => {
            let t = s.trim();
            if let Ok(i) = t.parse::<i64>() {
                return Ok(Value::Int(i));
            }
            match t.parse::<f64>() {
                Ok(f) if f.is_finite() => float_to_int("int", f.trunc()),
                _ => Err(Box::new(EvalError::InvalidNumber { func: "int" })),
            }
        }
        other => Err(bad("int", "a number, bool or numeric string", other)),
    }
}

fn float(v: &Value) -> R {
    match v {
        Value::Int(i) => Ok(Value::Float(*i as f64)),
        Value::Float(_) => Ok(v.clone()),
        Value::Bool(b) => Ok(Value::Float(if *b { 1.0 } else { 0.0 })),
        Value::Str(s) => match s.trim().parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Value::Float(f)),
            _ => Err(Box::new(EvalError::InvalidNumber { func: "float" })),
        },
        other => Err(bad("float", "a number, bool or numeric string", other)),
    }
}

fn hash(v: &Value) -> R {
    // Masking the sign bit keeps the result non-negative; the cast is then lossless.
    Ok(Value::Int((v.stable_hash() & (i64::MAX as u64)) as i64))
}

fn abs(v: &Value) -> R {
    match v {
        Value::Int(i) => i
            .checked_abs()
            .map(Value::Int)
            .ok_or_else(|| Box::new(EvalError::Overflow { op: "abs()" })),
        Value::Float(f) => Ok(Value::Float(f.abs())),
        other => Err(bad("abs", "a number", other)),
    }
}

/// `floor`/`ceil`/`round`: ints unchanged, floats rounded by `f` and converted to int.
fn to_int_with(func: &'static str, v: &Value, f: fn(f64) -> f64) -> R {
    match v {
        Value::Int(_) => Ok(v.clone()),
        Value::Float(x) => float_to_int(func, f(*x)),
        other => Err(bad(func, "a number", other)),
    }
}

fn floor(v: &Value) -> R {
    to_int_with("floor", v, f64::floor)
}

fn ceil(v: &Value) -> R {
    to_int_with("ceil", v, f64::ceil)
}

fn round(v: &Value) -> R {
    to_int_with("round", v, f64::round)
}

fn sqrt(v: &Value) -> R {
    Ok(Value::Float(want_num("sqrt", v)?.sqrt()))
}

/// `min`/`max`: the argument that sorts first (`want == Less`) or last; all numbers or all
/// strings; the first of equal values wins.
fn extreme(func: &'static str, args: &[Value], want: Ordering) -> R {
    let mut best: Option<&Value> = None;
    for a in args {
        if !matches!(a, Value::Int(_) | Value::Float(_) | Value::Str(_)) {
            return Err(bad(func, "numbers or strings", a));
        }
        match best {
            None => best = Some(a),
            Some(b) => {
                if matches!(a, Value::Str(_)) != matches!(b, Value::Str(_)) {
                    return Err(Box::new(EvalError::Incomparable {
                        func,
                        left: b.type_name(),
                        right: a.type_name(),
                    }));
                }
                if a.cmp(b) == want {
                    best = Some(a);
                }
            }
        }
    }
    Ok(best.cloned().unwrap_or(Value::Null))
}

fn min(args: &[Value]) -> R {
    extreme("min", args, Ordering::Less)
}

fn max(args: &[Value]) -> R {
    extreme("max", args, Ordering::Greater)
}

fn type_of(v: &Value) -> R {
    // The eight possible results are built once, so type_of() does not allocate per call.
    static NAMES: OnceLock<[Value; 8]> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        [
            "null", "bool", "int", "float", "string", "bytes", "list", "map",
        ]
        .map(Value::str)
    });
    let name = v.type_name();
    Ok(names
        .iter()
        .find(|n| n.as_str() == Some(name))
        .cloned()
        .unwrap_or_else(|| Value::str(name)))
}

fn keys(m: &Value) -> R {
    match m {
        Value::Map(entries) => Ok(Value::list(
            entries
                .iter()
                .map(|(k, _)| Value::Str(Arc::clone(k)))
                .collect(),
        )),
        other => Err(bad("keys", "a map", other)),
    }
}

/// `get(m, field, default)`: the field (map) or item (list), or `default` when it is missing
/// or null, or when `m` is null.
fn get(m: &Value, f: &Value, default: &Value) -> R {
    let found = match (m, f) {
        (Value::Null, _) => None,
        (Value::Map(_), Value::Str(k)) => m.get(k),
        (Value::List(items), Value::Int(i)) => list_get(items, *i),
        (Value::Map(_), other) => return Err(bad("get", "a string field name for a map", other)),
        (Value::List(_), other) => return Err(bad("get", "an int index for a list", other)),
        (other, _) => return Err(bad("get", "a map, list or null", other)),
    };
    Ok(match found {
        Some(v) if !matches!(v, Value::Null) => v.clone(),
        _ => default.clone(),
    })
}

fn json_parse(s: &Value, budget: &Budget) -> R {
    let text = want_str("json_parse", s)?;
    if text.len() > MAX_JSON_TEXT {
        return Err(Box::new(EvalError::TooLarge { op: "json_parse()" }));
    }
    // Two bytes of text (`0,`) can make a value: charged at that rate, before parsing.
    budget.charge(text.len() / 2 * std::mem::size_of::<Value>())?;
    serde_json::from_str::<Value>(text).map_err(|_| Box::new(EvalError::InvalidJson))
}

fn to_json(v: &Value) -> R {
    Ok(Value::from(json_text("to_json()", v)?))
}

fn range(n: &Value, budget: &Budget) -> R {
    let n = want_int("range", n)?;
    if n > MAX_RANGE {
        return Err(Box::new(EvalError::RangeTooLarge));
    }
    budget.charge(std::mem::size_of::<Value>() * n.max(0) as usize)?;
    Ok(Value::list((0..n.max(0)).map(Value::Int).collect()))
}

/// `bucket(x, width)`: `floor(x / width) * width`; ints stay ints (floor division), a float
/// operand gives a float. Width zero is a division by zero.
fn bucket(x: &Value, w: &Value) -> R {
    const OP: &str = "bucket()";
    match (x, w) {
        (Value::Int(x), Value::Int(w)) => {
            if *w == 0 {
                return Err(Box::new(EvalError::DivisionByZero));
            }
            let q = x
                .checked_div(*w)
                .ok_or_else(|| Box::new(EvalError::Overflow { op: OP }))?;
            let q = if x % w != 0 && ((*x < 0) != (*w < 0)) {
                q.checked_sub(1)
                    .ok_or_else(|| Box::new(EvalError::Overflow { op: OP }))?
            } else {
                q
            };
            q.checked_mul(*w)
                .map(Value::Int)
                .ok_or_else(|| Box::new(EvalError::Overflow { op: OP }))
        }
        _ => {
            let xf = x.as_f64().ok_or_else(|| bad("bucket", "numbers", x))?;
            let wf = w.as_f64().ok_or_else(|| bad("bucket", "numbers", w))?;
            if wf == 0.0 {
                return Err(Box::new(EvalError::DivisionByZero));
            }
            Ok(Value::Float((xf / wf).floor() * wf))
        }
    }
}
