//! Compiler: from the syntax tree to a tree of closures, with constant folding.
//!
//! Invariants:
//! - Everything that can be decided once is decided here: names are resolved, arities checked,
//!   and subtrees made only of literals are evaluated once ([`finish`]). Evaluation per record
//!   never parses or looks names up.
//! - Record variables and paths of constant steps off them (`value.a.b`, `key[0]`) stay
//!   symbolic ([`Code::Path`]) so operators and functions can read them by reference
//!   ([`Code::eval_cow`]): `value.n > 3` neither allocates nor touches a reference count.
//! - Evaluation is a pure function of the record: folding is therefore always sound.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::Arc;

use super::parser::{Ast, BinOp, Kind, UnOp, Var};
use super::{functions, CResult, EvalError};
use crate::record::Record;
use crate::value::Value;

/// Result of evaluating (part of) an expression.
pub(crate) type R = Result<Value, Box<EvalError>>;

/// A compiled subtree as a closure: the record, and what the evaluation may still allocate.
pub(crate) type Node = Box<dyn Fn(&Record, &Budget) -> R + Send + Sync>;

/// What an evaluation may still allocate, in bytes. Every value an expression builds (a
/// string, a list's or a map's slots) is charged where it is built; values read from the
/// record or shared with a constant are not. One evaluation, or one expression's constant
/// folding, thus holds at most its budget plus the one value being built: what can be far
/// larger than its inputs (`range()`, `split()`, `json_parse()`, `+`) is charged before it is
/// built, and strings are capped ([`functions::MAX_STRING`]).
pub(crate) struct Budget(Cell<usize>);

impl Budget {
    /// A budget of `bytes`.
    pub(crate) fn new(bytes: usize) -> Budget {
        Budget(Cell::new(bytes))
    }

    /// Bytes left.
    pub(crate) fn left(&self) -> usize {
        self.0.get()
    }

    /// Takes `bytes` off; fails, leaving the budget as it was, when fewer are left.
    #[inline]
    pub(crate) fn charge(&self, bytes: usize) -> Result<(), Box<EvalError>> {
        match self.0.get().checked_sub(bytes) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(Box::new(EvalError::OverBudget)),
        }
    }

    /// Charges what `v` itself allocated (its bytes, or its slots) and passes it on.
    #[inline]
    pub(crate) fn built(&self, v: Value) -> R {
        self.charge(Self::own_size(&v))?;
        Ok(v)
    }

    /// What `v` itself takes beyond its 24 bytes: its bytes, or its slots (what its items
    /// hold is theirs).
    fn own_size(v: &Value) -> usize {
        match v {
            Value::Str(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::List(items) => std::mem::size_of_val::<[Value]>(items),
            Value::Map(entries) => std::mem::size_of_val::<[(Arc<str>, Value)]>(entries),
            _ => 0,
        }
    }

    /// What `a + b` builds, from the operands: two strings' bytes, or two lists' slots.
    fn size_of_sum(a: &Value, b: &Value) -> usize {
        match (a, b) {
            (Value::Str(_), Value::Str(_)) | (Value::List(_), Value::List(_)) => {
                Self::own_size(a) + Self::own_size(b)
            }
            _ => 0,
        }
    }
}

/// A null to hand out by reference for missing fields and unset keys.
static NULL: Value = Value::Null;

/// A compiled subtree.
pub(crate) enum Code {
    /// Known at compile time (a folded subtree; may be an error that only shows at runtime,
    /// e.g. `1 / 0` in a branch that is never taken).
    Const(R),
    /// A record variable followed by constant field/index steps, resolved by reference.
    Path(Path),
    /// The event time.
    Ts,
    /// Anything else.
    Dyn(Node),
}

impl Code {
    /// True for a compile-time constant.
    pub(crate) fn is_const(&self) -> bool {
        matches!(self, Code::Const(_))
    }

    /// Evaluates, borrowing from the record or the constant where possible.
    #[inline]
    pub(crate) fn eval_cow<'r>(
        &'r self,
        rec: &'r Record,
        budget: &Budget,
    ) -> Result<Cow<'r, Value>, Box<EvalError>> {
        match self {
            Code::Const(Ok(v)) => Ok(Cow::Borrowed(v)),
            Code::Const(Err(e)) => Err(e.clone()),
            Code::Path(p) => p.resolve(rec).map(Cow::Borrowed),
            Code::Ts => Ok(Cow::Owned(Value::Int(rec.ts))),
            Code::Dyn(f) => f(rec, budget).map(Cow::Owned),
        }
    }

    /// Evaluates to an owned value.
    #[inline]
    pub(crate) fn eval(&self, rec: &Record, budget: &Budget) -> R {
        match self {
            Code::Const(r) => r.clone(),
            Code::Path(p) => p.resolve(rec).cloned(),
            Code::Ts => Ok(Value::Int(rec.ts)),
            Code::Dyn(f) => f(rec, budget),
        }
    }

    /// Turns the compiled subtree into one closure.
    pub(crate) fn into_node(self) -> Node {
        match self {
            Code::Const(r) => Box::new(move |_, _| r.clone()),
            Code::Path(p) if p.steps.is_empty() => match p.root {
                Root::Value => Box::new(|rec, _| Ok(rec.value.clone())),
                Root::Key => Box::new(|rec, _| Ok(rec.key.clone().unwrap_or(Value::Null))),
            },
            Code::Path(p) => Box::new(move |rec, _| p.resolve(rec).cloned()),
            Code::Ts => Box::new(|rec, _| Ok(Value::Int(rec.ts))),
            Code::Dyn(f) => f,
        }
    }
}

/// Wraps a closure as [`Code`], evaluating it right away when `constant` (all of its inputs
/// are constants, so it does not read the record) and what it builds fits in `fold`, the
/// expression's folding budget; a constant that does not stays a closure, built per record
/// under that evaluation's budget.
pub(crate) fn finish(fold: &Budget, constant: bool, node: Node) -> Code {
    if !constant {
        return Code::Dyn(node);
    }
    let trial = Budget::new(fold.left());
    match node(&Record::default(), &trial) {
        Err(e) if *e == EvalError::OverBudget => Code::Dyn(node),
        folded => {
            fold.0.set(trial.left());
            Code::Const(folded)
        }
    }
}

/// Fails when `v`, put one level down into a list or map, would nest deeper than the data
/// plane carries ([`Value::fits_one_level_down`]): such a record could not leave its
/// subtask.
#[inline]
fn nestable(v: Value) -> R {
    if !v.fits_one_level_down() {
        return Err(Box::new(EvalError::TooDeep));
    }
    Ok(v)
}

/// Where a path starts.
#[derive(Clone, Copy)]
pub(crate) enum Root {
    /// `value`
    Value,
    /// `key` (null when unset)
    Key,
}

/// One constant step of a path.
pub(crate) enum Step {
    /// `.name`
    Field(Box<str>),
    /// `[constant]`
    Index(Value),
}

/// A record variable followed by constant steps.
pub(crate) struct Path {
    root: Root,
    steps: Vec<Step>,
}

impl Path {
    /// Follows the path into the record: one binary search per field step, no allocation.
    #[inline]
    fn resolve<'r>(&self, rec: &'r Record) -> Result<&'r Value, Box<EvalError>> {
        let mut cur = match self.root {
            Root::Value => &rec.value,
            Root::Key => rec.key.as_ref().unwrap_or(&NULL),
        };
        for step in &self.steps {
            cur = match step {
                Step::Field(name) => field(cur, name)?,
                Step::Index(i) => index(cur, i)?,
            };
        }
        Ok(cur)
    }
}

/// `base.name`: a map's field (null when missing), null on null, an error otherwise.
#[inline]
pub(crate) fn field<'a>(base: &'a Value, name: &str) -> Result<&'a Value, Box<EvalError>> {
    match base {
        Value::Map(_) => Ok(base.get(name).unwrap_or(&NULL)),
        Value::Null => Ok(&NULL),
        other => Err(Box::new(EvalError::FieldAccess {
            on: other.type_name(),
        })),
    }
}

/// `base[idx]`: list by int (negative counts from the end), map by string; null when out of
/// range or missing, and on a null base.
pub(crate) fn index<'a>(base: &'a Value, idx: &Value) -> Result<&'a Value, Box<EvalError>> {
    match (base, idx) {
        (Value::List(items), Value::Int(i)) => Ok(list_get(items, *i).unwrap_or(&NULL)),
        (Value::Map(_), Value::Str(k)) => Ok(base.get(k).unwrap_or(&NULL)),
        (Value::Null, _) => Ok(&NULL),
        _ => Err(Box::new(EvalError::BadIndex {
            on: base.type_name(),
            index: idx.type_name(),
        })),
    }
}

/// Item `i` of a list, negative `i` counting from the end; `None` when out of range.
pub(crate) fn list_get(items: &[Value], i: i64) -> Option<&Value> {
    let i = if i < 0 {
        i.checked_add(i64::try_from(items.len()).ok()?)?
    } else {
        i
    };
    items.get(usize::try_from(i).ok()?)
}

/// Compiles a syntax tree.
///
/// This and the `compile_*` functions are the recursion path of the compiler: they only
/// compile their children and hand the results to non-recursive `*_code` builders, so each
/// nesting level costs little stack, even in debug builds.
pub(crate) fn compile(ast: &Ast, fold: &Budget) -> CResult<Code> {
    match &ast.kind {
        Kind::Lit(v) => Ok(Code::Const(Ok(v.clone()))),
        Kind::Var(v) => Ok(var_code(*v)),
        Kind::List(items) => compile_list(items, fold),
        Kind::Map(entries) => compile_map(entries, fold),
        Kind::Field(base, name) => compile_field(base, name, fold),
        Kind::Index(base, idx) => compile_index(base, idx, fold),
        Kind::Unary(op, a) => compile_unary(*op, a, fold),
        Kind::Binary(op, a, b) => compile_binary(*op, a, b, fold),
        Kind::Cond(c, a, b) => compile_cond(c, a, b, fold),
        Kind::Call(name, args) => functions::compile_call(name, args, ast.col, fold),
    }
}

/// Compiles several subtrees.
pub(crate) fn compile_all(asts: &[Ast], fold: &Budget) -> CResult<Vec<Code>> {
    let mut out = Vec::with_capacity(asts.len());
    for a in asts {
        out.push(compile(a, fold)?);
    }
    Ok(out)
}

#[inline(never)]
fn compile_list(items: &[Ast], fold: &Budget) -> CResult<Code> {
    Ok(list_code(fold, compile_all(items, fold)?))
}

#[inline(never)]
fn compile_map(entries: &[(Arc<str>, Ast)], fold: &Budget) -> CResult<Code> {
    let mut compiled = Vec::with_capacity(entries.len());
    for (k, a) in entries {
        compiled.push((Arc::clone(k), compile(a, fold)?));
    }
    Ok(map_code(fold, compiled))
}

#[inline(never)]
fn compile_field(base: &Ast, name: &str, fold: &Budget) -> CResult<Code> {
    Ok(field_code(fold, compile(base, fold)?, name))
}

#[inline(never)]
fn compile_index(base: &Ast, idx: &Ast, fold: &Budget) -> CResult<Code> {
    let base = compile(base, fold)?;
    let idx = compile(idx, fold)?;
    Ok(index_code(fold, base, idx))
}

#[inline(never)]
fn compile_unary(op: UnOp, a: &Ast, fold: &Budget) -> CResult<Code> {
    Ok(unary_code(fold, op, compile(a, fold)?))
}

#[inline(never)]
fn compile_binary(op: BinOp, a: &Ast, b: &Ast, fold: &Budget) -> CResult<Code> {
    let l = compile(a, fold)?;
    let r = compile(b, fold)?;
    Ok(binary_code(fold, op, l, r))
}

#[inline(never)]
fn compile_cond(c: &Ast, a: &Ast, b: &Ast, fold: &Budget) -> CResult<Code> {
    let c = compile(c, fold)?;
    let a = compile(a, fold)?;
    let b = compile(b, fold)?;
    Ok(cond(fold, c, a, b, "?:"))
}

fn var_code(v: Var) -> Code {
    match v {
        Var::Value => Code::Path(Path {
            root: Root::Value,
            steps: Vec::new(),
        }),
        Var::Key => Code::Path(Path {
            root: Root::Key,
            steps: Vec::new(),
        }),
        Var::Ts => Code::Ts,
    }
}

#[inline(never)]
fn list_code(fold: &Budget, items: Vec<Code>) -> Code {
    let constant = items.iter().all(Code::is_const);
    finish(
        fold,
        constant,
        Box::new(move |rec, budget| {
            budget.charge(std::mem::size_of::<Value>() * items.len())?;
            let mut out = Vec::with_capacity(items.len());
            for item in &items {
                out.push(nestable(item.eval(rec, budget)?)?);
            }
            Ok(Value::list(out))
        }),
    )
}

#[inline(never)]
fn map_code(fold: &Budget, mut entries: Vec<(Arc<str>, Code)>) -> Code {
    // Keys are unique (the parser rejects duplicates); sorting once here lets evaluation
    // build the map's sorted entry list directly.
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let constant = entries.iter().all(|(_, c)| c.is_const());
    finish(
        fold,
        constant,
        Box::new(move |rec, budget| {
            budget.charge(std::mem::size_of::<(Arc<str>, Value)>() * entries.len())?;
            let mut out = Vec::with_capacity(entries.len());
            for (k, c) in &entries {
                out.push((Arc::clone(k), nestable(c.eval(rec, budget)?)?));
            }
            Ok(Value::Map(Arc::from(out)))
        }),
    )
}

#[inline(never)]
fn field_code(fold: &Budget, base: Code, name: &str) -> Code {
    let name: Box<str> = name.into();
    match base {
        Code::Path(mut p) => {
            p.steps.push(Step::Field(name));
            Code::Path(p)
        }
        base => {
            let constant = base.is_const();
            finish(
                fold,
                constant,
                Box::new(move |rec, budget| {
                    let b = base.eval_cow(rec, budget)?;
                    field(&b, &name).cloned()
                }),
            )
        }
    }
}

#[inline(never)]
fn index_code(fold: &Budget, base: Code, idx: Code) -> Code {
    match (base, idx) {
        (Code::Path(mut p), Code::Const(Ok(i))) => {
            p.steps.push(Step::Index(i));
            Code::Path(p)
        }
        (base, idx) => {
            let constant = base.is_const() && idx.is_const();
            finish(
                fold,
                constant,
                Box::new(move |rec, budget| {
                    let b = base.eval_cow(rec, budget)?;
                    let i = idx.eval_cow(rec, budget)?;
                    index(&b, &i).cloned()
                }),
            )
        }
    }
}

#[inline(never)]
fn unary_code(fold: &Budget, op: UnOp, a: Code) -> Code {
    let constant = a.is_const();
    let node: Node = match op {
        UnOp::Neg => Box::new(move |rec, budget| neg(&*a.eval_cow(rec, budget)?)),
        UnOp::Not => Box::new(move |rec, budget| match *a.eval_cow(rec, budget)? {
            Value::Bool(b) => Ok(Value::Bool(!b)),
            ref v => Err(Box::new(EvalError::BadOperand {
                op: "!",
                operand: v.type_name(),
            })),
        }),
    };
    finish(fold, constant, node)
}

#[inline(never)]
fn binary_code(fold: &Budget, op: BinOp, l: Code, r: Code) -> Code {
    let f: fn(&Value, &Value) -> R = match op {
        BinOp::And => return logic(fold, l, r, false, "&&"),
        BinOp::Or => return logic(fold, l, r, true, "||"),
        BinOp::Add => return binary(fold, l, r, add, true),
        BinOp::Sub => sub,
        BinOp::Mul => mul,
        BinOp::Div => div,
        BinOp::Rem => rem,
        BinOp::Lt => |a, b| Ok(Value::Bool(a < b)),
        BinOp::Le => |a, b| Ok(Value::Bool(a <= b)),
        BinOp::Gt => |a, b| Ok(Value::Bool(a > b)),
        BinOp::Ge => |a, b| Ok(Value::Bool(a >= b)),
        BinOp::Eq => |a, b| Ok(Value::Bool(a == b)),
        BinOp::Ne => |a, b| Ok(Value::Bool(a != b)),
        BinOp::In => in_op,
    };
    binary(fold, l, r, f, false)
}

/// A strict binary operator: both operands are evaluated (by reference), then `f`; when it
/// `allocates` (only `+` does: strings and lists) what it will build is charged first.
fn binary(fold: &Budget, l: Code, r: Code, f: fn(&Value, &Value) -> R, allocates: bool) -> Code {
    let constant = l.is_const() && r.is_const();
    finish(
        fold,
        constant,
        Box::new(move |rec, budget| {
            let a = l.eval_cow(rec, budget)?;
            let b = r.eval_cow(rec, budget)?;
            if allocates {
                budget.charge(Budget::size_of_sum(&a, &b))?;
            }
            f(&a, &b)
        }),
    )
}

/// `&&` (`stop == false`) and `||` (`stop == true`): the right side is evaluated only when the
/// left side is the bool that does not decide the result; both must be bools.
fn logic(fold: &Budget, l: Code, r: Code, stop: bool, op: &'static str) -> Code {
    if let Code::Const(Ok(Value::Bool(b))) = l {
        if b == stop {
            return Code::Const(Ok(Value::Bool(stop)));
        }
    }
    let constant = l.is_const() && r.is_const();
    finish(
        fold,
        constant,
        Box::new(move |rec, budget| {
            match *l.eval_cow(rec, budget)? {
                Value::Bool(b) if b == stop => return Ok(Value::Bool(stop)),
                Value::Bool(_) => {}
                ref v => {
                    return Err(Box::new(EvalError::NotBool {
                        op,
                        got: v.type_name(),
                    }))
                }
            }
            match *r.eval_cow(rec, budget)? {
                Value::Bool(b) => Ok(Value::Bool(b)),
                ref v => Err(Box::new(EvalError::NotBool {
                    op,
                    got: v.type_name(),
                })),
            }
        }),
    )
}

/// `c ? a : b` and `if(c, a, b)`: only the chosen branch is evaluated; `c` must be a bool.
pub(crate) fn cond(fold: &Budget, c: Code, a: Code, b: Code, op: &'static str) -> Code {
    match c {
        Code::Const(Ok(Value::Bool(true))) => return a,
        Code::Const(Ok(Value::Bool(false))) => return b,
        _ => {}
    }
    // A constant non-bool condition always fails, whatever the branches are.
    let constant = c.is_const();
    finish(
        fold,
        constant,
        Box::new(move |rec, budget| match *c.eval_cow(rec, budget)? {
            Value::Bool(true) => a.eval(rec, budget),
            Value::Bool(false) => b.eval(rec, budget),
            ref v => Err(Box::new(EvalError::NotBool {
                op,
                got: v.type_name(),
            })),
        }),
    )
}

fn bad_operands(op: &'static str, a: &Value, b: &Value) -> Box<EvalError> {
    Box::new(EvalError::BadOperands {
        op,
        left: a.type_name(),
        right: b.type_name(),
    })
}

fn neg(a: &Value) -> R {
    match a {
        Value::Int(i) => i
            .checked_neg()
            .map(Value::Int)
            .ok_or_else(|| Box::new(EvalError::Overflow { op: "-" })),
        Value::Float(f) => Ok(Value::Float(-f)),
        other => Err(Box::new(EvalError::BadOperand {
            op: "-",
            operand: other.type_name(),
        })),
    }
}

/// Numeric operator: int with int via `int`, otherwise both as floats via `float`.
#[inline]
fn numeric(
    op: &'static str,
    a: &Value,
    b: &Value,
    int: impl Fn(i64, i64) -> R,
    float: impl Fn(f64, f64) -> f64,
) -> R {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => int(*x, *y),
        (Value::Int(x), Value::Float(y)) => Ok(Value::Float(float(*x as f64, *y))),
        (Value::Float(x), Value::Int(y)) => Ok(Value::Float(float(*x, *y as f64))),
        (Value::Float(x), Value::Float(y)) => Ok(Value::Float(float(*x, *y))),
        _ => Err(bad_operands(op, a, b)),
    }
}

fn checked(op: &'static str, r: Option<i64>) -> R {
    r.map(Value::Int)
        .ok_or_else(|| Box::new(EvalError::Overflow { op }))
}

fn add(a: &Value, b: &Value) -> R {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => {
            if x.len() + y.len() > functions::MAX_STRING {
                return Err(Box::new(EvalError::TooLarge { op: "+" }));
            }
            let mut s = String::with_capacity(x.len() + y.len());
            s.push_str(x);
            s.push_str(y);
            Ok(Value::from(s))
        }
        (Value::List(x), Value::List(y)) => {
            let mut v = Vec::with_capacity(x.len() + y.len());
            v.extend(x.iter().cloned());
            v.extend(y.iter().cloned());
            Ok(Value::list(v))
        }
        _ => numeric(
            "+",
            a,
            b,
            |x, y| checked("+", x.checked_add(y)),
            |x, y| x + y,
        ),
    }
}

fn sub(a: &Value, b: &Value) -> R {
    numeric(
        "-",
        a,
        b,
        |x, y| checked("-", x.checked_sub(y)),
        |x, y| x - y,
    )
}

fn mul(a: &Value, b: &Value) -> R {
    numeric(
        "*",
        a,
        b,
        |x, y| checked("*", x.checked_mul(y)),
        |x, y| x * y,
    )
}

fn div(a: &Value, b: &Value) -> R {
    let int = |x: i64, y: i64| {
        if y == 0 {
            Err(Box::new(EvalError::DivisionByZero))
        } else {
            checked("/", x.checked_div(y))
        }
    };
    numeric("/", a, b, int, |x, y| x / y)
}

fn rem(a: &Value, b: &Value) -> R {
    let int = |x: i64, y: i64| {
        if y == 0 {
            Err(Box::new(EvalError::DivisionByZero))
        } else {
            checked("%", x.checked_rem(y))
        }
    };
    numeric("%", a, b, int, |x, y| x % y)
}

/// `a in b`: element of a list, substring of a string, key of a map.
fn in_op(a: &Value, b: &Value) -> R {
    match (a, b) {
        (_, Value::List(items)) => Ok(Value::Bool(items.iter().any(|x| x == a))),
        (Value::Str(sub), Value::Str(s)) => Ok(Value::Bool(s.contains(&**sub))),
        (Value::Str(k), Value::Map(_)) => Ok(Value::Bool(b.get(k).is_some())),
        _ => Err(bad_operands("in", a, b)),
    }
}
