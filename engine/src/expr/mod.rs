//! The Weir expression language: small, C/JavaScript/CEL-like expressions over one record.
//!
//! Job specs use expressions for filters, maps, keys and the like (`value.user`,
//! `lower(value.word)`, `value.n > 3 && key != null`). The language is documented in
//! `docs/expressions.md`.
//!
//! An expression is parsed, type-checked for names and arities, constant-folded and turned into
//! a tree of closures once, by [`Expr::compile`]; evaluating it per record ([`Expr::eval`]) does
//! no parsing and no name lookup. Invariants this module guards:
//!
//! - **No panics, bounded recursion.** `compile` returns `Ok` or `Err` for every input string
//!   (nesting is capped at [`MAX_DEPTH`] so neither parsing, compiling nor evaluating can
//!   overflow the stack), and `eval` returns `Ok` or `Err` for every record.
//! - **Determinism.** Every expression is a pure function of the record: there is no clock, no
//!   randomness and no state, so replaying a stream after a recovery gives the same results.
//! - **Cheap hot paths.** `value`, `key`, `ts`, field paths such as `value.a.b`, int arithmetic
//!   and comparisons do not allocate; a field access is one binary search over the map.

mod compile;
mod functions;
mod lexer;
mod parser;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use crate::record::Record;
use crate::value::Value;

/// The deepest nesting an expression may have (parentheses, operators, calls, literals);
/// deeper input is a compile error rather than a stack overflow.
pub const MAX_DEPTH: usize = 256;

/// What evaluating an expression on one record may build, in bytes: the strings, lists and
/// maps it makes (values read from the record are not counted). Above it the evaluation
/// fails with [`EvalError::OverBudget`], so no expression can exhaust a task manager's
/// memory.
pub const MAX_EVAL_BYTES: usize = 256 << 20;

/// What the constants folded at compile time may take, in bytes: this floor plus
/// [`FOLD_BYTES_PER_CHAR`] per char of source. It is proportional to the source so a job
/// spec of bounded size holds bounded constants however many expressions it has; a
/// constant subexpression that would exceed it (`range(1000000)` in a short expression) is
/// not folded and is evaluated per record instead, under [`MAX_EVAL_BYTES`].
pub const FOLD_BYTES_FLOOR: usize = 32 << 10;

/// See [`FOLD_BYTES_FLOOR`].
pub const FOLD_BYTES_PER_CHAR: usize = 256;

/// The compiled evaluation function shared by all clones of an [`Expr`].
type EvalFn = dyn Fn(&Record, &compile::Budget) -> Result<Value, Box<EvalError>> + Send + Sync;

/// A compiled expression. Cheap to clone (Arc inside); Send + Sync; shared by all subtasks of an
/// operator.
#[derive(Clone)]
pub struct Expr {
    src: Arc<str>,
    f: Arc<EvalFn>,
}

impl Expr {
    /// Parses and compiles `src`. Errors name the problem and its 1-based column (in chars).
    pub fn compile(src: &str) -> Result<Expr, ExprError> {
        let ast = parser::parse(src).map_err(|e| *e)?;
        let fold = compile::Budget::new(
            FOLD_BYTES_PER_CHAR
                .saturating_mul(src.len())
                .saturating_add(FOLD_BYTES_FLOOR),
        );
        let code = compile::compile(&ast, &fold).map_err(|e| *e)?;
        Ok(Expr {
            src: Arc::from(src),
            f: Arc::from(code.into_node()),
        })
    }

    /// Evaluates the expression against one record.
    ///
    /// The error is boxed so the result is as small as a `Value` (24 bytes): results are passed
    /// between the closures of the compiled tree on every record, errors almost never.
    #[inline]
    pub fn eval(&self, rec: &Record) -> Result<Value, Box<EvalError>> {
        (self.f)(rec, &compile::Budget::new(MAX_EVAL_BYTES))
    }

    /// The source text the expression was compiled from.
    pub fn source(&self) -> &str {
        &self.src
    }
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expr({:?})", &*self.src)
    }
}

/// Compile error: Display is "at column {column}: {message}" (column 1-based, in chars).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("at column {column}: {message}")]
pub struct ExprError {
    /// 1-based column, counted in chars, where the problem starts.
    pub column: usize,
    /// What is wrong, e.g. "unknown function 'foo'".
    pub message: String,
}

/// Compile errors are boxed inside the compiler: results on its recursion paths stay two
/// words wide, which keeps stack frames (and so the stack used per nesting level) small.
type CResult<T> = Result<T, Box<ExprError>>;

impl ExprError {
    /// Builds a (boxed) error at `column`.
    #[cold]
    #[inline(never)]
    pub(crate) fn new(column: usize, message: impl Into<String>) -> Box<ExprError> {
        Box::new(ExprError {
            column,
            message: message.into(),
        })
    }
}

/// Runtime (evaluation) error. Small and allocation-free: payloads are static names of
/// operators, functions and value types (see `Value::type_name`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// A binary operator got operand types it does not accept.
    #[error("cannot apply '{op}' to {left} and {right}")]
    BadOperands {
        /// The operator, e.g. `+`.
        op: &'static str,
        /// Type of the left operand.
        left: &'static str,
        /// Type of the right operand.
        right: &'static str,
    },
    /// A unary operator got an operand type it does not accept.
    #[error("cannot apply '{op}' to {operand}")]
    BadOperand {
        /// The operator, `-` or `!`.
        op: &'static str,
        /// Type of the operand.
        operand: &'static str,
    },
    /// `&&`, `||` or the condition of `?:` got a non-bool.
    #[error("'{op}' expects a bool, got {got}")]
    NotBool {
        /// The operator: `&&`, `||` or `?:`.
        op: &'static str,
        /// Type of the value it got.
        got: &'static str,
    },
    /// Integer division or remainder by zero (or `bucket()` with width zero).
    #[error("division by zero")]
    DivisionByZero,
    /// Integer arithmetic overflowed i64.
    #[error("integer overflow in '{op}'")]
    Overflow {
        /// The operator or function, e.g. `*` or `abs()`.
        op: &'static str,
    },
    /// `.field` on a value that is neither a map nor null.
    #[error("field access on {on}")]
    FieldAccess {
        /// Type of the value accessed.
        on: &'static str,
    },
    /// `x[i]` with a base or index type that does not fit (lists take ints, maps strings).
    #[error("cannot index {on} with {index}")]
    BadIndex {
        /// Type of the indexed value.
        on: &'static str,
        /// Type of the index.
        index: &'static str,
    },
    /// A function got an argument of the wrong type.
    #[error("{func}() expects {expected}, got {got}")]
    BadArg {
        /// The function name.
        func: &'static str,
        /// What it accepts, e.g. "a string".
        expected: &'static str,
        /// Type of the value it got.
        got: &'static str,
    },
    /// `min()`/`max()` got values of types that do not compare (e.g. int and string).
    #[error("{func}() cannot compare {left} and {right}")]
    Incomparable {
        /// The function name.
        func: &'static str,
        /// Type of one value.
        left: &'static str,
        /// Type of the other value.
        right: &'static str,
    },
    /// `int()`/`float()` got a string that is not a number.
    #[error("{func}() cannot parse the string as a number")]
    InvalidNumber {
        /// The function name.
        func: &'static str,
    },
    /// A float-to-int conversion got NaN, an infinity or a number outside the i64 range.
    #[error("{func}() got a number that is NaN, infinite or out of the int range")]
    IntRange {
        /// The function name.
        func: &'static str,
    },
    /// `json_parse()` got a string that is not valid JSON.
    #[error("json_parse() got invalid JSON")]
    InvalidJson,
    /// `range(n)` with `n` above 1,000,000.
    #[error("range() argument exceeds the limit of 1000000")]
    RangeTooLarge,
    /// A function or `+` would build a string above 64 MiB, or `json_parse()` got more than
    /// 4 MiB of text.
    #[error("{op} would build a string above 64 MiB (json_parse(): read more than 4 MiB)")]
    TooLarge {
        /// The function, e.g. `replace()`, or the operator `+`.
        op: &'static str,
    },
    /// The values built while evaluating the expression on one record exceed
    /// [`MAX_EVAL_BYTES`].
    #[error("the expression built more than 256 MiB of values for one record")]
    OverBudget,
    /// A list or map would hold a value nested so deep that the record could not be sent.
    #[error("a list or map would nest deeper than 128 levels, more than a record may carry")]
    TooDeep,
}
