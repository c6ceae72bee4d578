//! Parser: precedence climbing from tokens to an abstract syntax tree ([`Ast`]).
//!
//! Invariants: variables are resolved here (an unknown identifier is an error naming it), every
//! node records the column where it starts, and nesting is bounded twice over: the parser's own
//! recursion and the height of the tree it builds are both capped at [`MAX_DEPTH`], so neither
//! parsing nor the later recursive passes (compile, evaluation, drop) can overflow the stack.

use std::sync::Arc;

use super::lexer::{Lexer, Tok, Token};
use super::{CResult, ExprError, MAX_DEPTH};
use crate::value::Value;

/// A record variable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Var {
    /// `value`: the payload.
    Value,
    /// `key`: the key, null when unset.
    Key,
    /// `ts`: the event time in ms.
    Ts,
}

/// A unary operator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum UnOp {
    /// `-x`
    Neg,
    /// `!x`
    Not,
}

/// A binary operator (including the short-circuiting `&&` and `||`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum BinOp {
    Mul,
    Div,
    Rem,
    Add,
    Sub,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    In,
    And,
    Or,
}

impl BinOp {
    fn from_tok(t: &Tok) -> Option<BinOp> {
        Some(match t {
            Tok::Star => BinOp::Mul,
            Tok::Slash => BinOp::Div,
            Tok::Percent => BinOp::Rem,
            Tok::Plus => BinOp::Add,
            Tok::Minus => BinOp::Sub,
            Tok::Lt => BinOp::Lt,
            Tok::Le => BinOp::Le,
            Tok::Gt => BinOp::Gt,
            Tok::Ge => BinOp::Ge,
            Tok::EqEq => BinOp::Eq,
            Tok::Ne => BinOp::Ne,
            Tok::In => BinOp::In,
            Tok::AndAnd => BinOp::And,
            Tok::OrOr => BinOp::Or,
            _ => return None,
        })
    }

    /// Binding strength: higher binds tighter. All binary operators are left-associative.
    fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And => 2,
            BinOp::In => 3,
            BinOp::Eq | BinOp::Ne => 4,
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 5,
            BinOp::Add | BinOp::Sub => 6,
            BinOp::Mul | BinOp::Div | BinOp::Rem => 7,
        }
    }
}

/// A syntax tree node: what it is, where it starts, and how tall its subtree is.
#[derive(Debug)]
pub(crate) struct Ast {
    /// The node.
    pub kind: Kind,
    /// 1-based column (chars) of the node's first token (of the operator for binary nodes).
    pub col: usize,
    /// Height of the subtree (a leaf is 1); never above `MAX_DEPTH`.
    pub height: usize,
}

/// The kinds of syntax tree node.
#[derive(Debug)]
pub(crate) enum Kind {
    /// A literal scalar.
    Lit(Value),
    /// A record variable.
    Var(Var),
    /// `[a, b, ...]`
    List(Vec<Ast>),
    /// `{k: v, ...}`, keys unique, in source order.
    Map(Vec<(Arc<str>, Ast)>),
    /// `base.name`
    Field(Box<Ast>, Box<str>),
    /// `base[index]`
    Index(Box<Ast>, Box<Ast>),
    /// `-x`, `!x`
    Unary(UnOp, Box<Ast>),
    /// `a op b`
    Binary(BinOp, Box<Ast>, Box<Ast>),
    /// `c ? a : b`
    Cond(Box<Ast>, Box<Ast>, Box<Ast>),
    /// `name(args...)`; the name is resolved by the compiler.
    Call(String, Vec<Ast>),
}

impl Ast {
    /// Builds a node, failing when it would make the tree taller than `MAX_DEPTH`.
    fn new(kind: Kind, col: usize) -> CResult<Box<Ast>> {
        let child_height = match &kind {
            Kind::Lit(_) | Kind::Var(_) => 0,
            Kind::List(items) | Kind::Call(_, items) => {
                items.iter().map(|a| a.height).max().unwrap_or(0)
            }
            Kind::Map(entries) => entries.iter().map(|(_, a)| a.height).max().unwrap_or(0),
            Kind::Field(a, _) | Kind::Unary(_, a) => a.height,
            Kind::Index(a, b) | Kind::Binary(_, a, b) => a.height.max(b.height),
            Kind::Cond(a, b, c) => a.height.max(b.height).max(c.height),
        };
        let height = child_height + 1;
        if height > MAX_DEPTH {
            return Err(too_deep(col));
        }
        Ok(Box::new(Ast { kind, col, height }))
    }
}

#[cold]
#[inline(never)]
fn too_deep(col: usize) -> Box<ExprError> {
    ExprError::new(
        col,
        format!("expression is nested too deeply (the limit is {MAX_DEPTH})"),
    )
}

/// "expected {what}, found {token}" at the token.
#[cold]
#[inline(never)]
fn expected(what: &str, t: &Token) -> Box<ExprError> {
    ExprError::new(
        t.col,
        format!("expected {what}, found {}", t.tok.describe()),
    )
}

/// Parses a whole expression; anything after it is an error.
pub(crate) fn parse(src: &str) -> CResult<Box<Ast>> {
    let mut p = Parser {
        lex: Lexer::new(src),
        peeked: None,
        depth: 0,
    };
    let ast = p.expr()?;
    let t = p.next()?;
    if t.tok != Tok::Eof {
        return Err(ExprError::new(
            t.col,
            format!(
                "unexpected {} after the end of the expression",
                t.tok.describe()
            ),
        ));
    }
    Ok(ast)
}

/// Recursive-descent parser with one token of lookahead.
///
/// The functions on the recursion path (`expr`, `ternary`, `binary`, `unary`, `postfix`,
/// `primary`, `paren`, `items`, `map_entries`) keep few locals and leave error formatting to
/// cold helpers, so one nesting level costs little stack even in debug builds.
struct Parser {
    lex: Lexer,
    peeked: Option<Token>,
    /// Current recursion depth of `expr`/`unary`, capped at `MAX_DEPTH`.
    depth: usize,
}

impl Parser {
    fn peek(&mut self) -> CResult<&Token> {
        let t = match self.peeked.take() {
            Some(t) => t,
            None => self.lex.next_token()?,
        };
        Ok(self.peeked.insert(t))
    }

    fn next(&mut self) -> CResult<Token> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lex.next_token(),
        }
    }

    /// Consumes the next token if it is `tok`.
    fn eat(&mut self, tok: &Tok) -> CResult<bool> {
        if &self.peek()?.tok == tok {
            self.peeked = None;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Consumes the next token, which must be `tok`.
    fn expect(&mut self, tok: &Tok, context: &str) -> CResult<()> {
        let t = self.next()?;
        if &t.tok == tok {
            Ok(())
        } else {
            Err(expected_symbol(tok, context, &t))
        }
    }

    /// Column of the next token (for errors raised before consuming it).
    #[cold]
    #[inline(never)]
    fn too_deep_here(&mut self) -> Box<ExprError> {
        let col = self.peek().map(|t| t.col).unwrap_or(1);
        too_deep(col)
    }

    /// expr := binary ('?' expr ':' expr)?
    fn expr(&mut self) -> CResult<Box<Ast>> {
        self.depth += 1;
        let r = if self.depth > MAX_DEPTH {
            Err(self.too_deep_here())
        } else {
            self.ternary()
        };
        self.depth -= 1;
        r
    }

    fn ternary(&mut self) -> CResult<Box<Ast>> {
        let c = self.binary(1)?;
        match self.peek()? {
            Token {
                tok: Tok::Question,
                col,
            } => {
                let col = *col;
                self.peeked = None;
                self.ternary_branches(c, col)
            }
            _ => Ok(c),
        }
    }

    #[inline(never)]
    fn ternary_branches(&mut self, c: Box<Ast>, col: usize) -> CResult<Box<Ast>> {
        let then = self.expr()?;
        self.expect(&Tok::Colon, "in a conditional 'c ? a : b'")?;
        let other = self.expr()?;
        Ast::new(Kind::Cond(c, then, other), col)
    }

    /// Precedence climbing over binary operators binding at least as tightly as `min_prec`.
    fn binary(&mut self, min_prec: u8) -> CResult<Box<Ast>> {
        let mut lhs = self.unary()?;
        loop {
            let t = self.peek()?;
            let Some(op) = BinOp::from_tok(&t.tok) else {
                break;
            };
            let prec = op.precedence();
            if prec < min_prec {
                break;
            }
            let col = t.col;
            self.peeked = None;
            let rhs = self.binary(prec + 1)?;
            lhs = Ast::new(Kind::Binary(op, lhs, rhs), col)?;
        }
        Ok(lhs)
    }

    /// unary := ('-' | '!') unary | postfix
    fn unary(&mut self) -> CResult<Box<Ast>> {
        let (op, col) = match self.peek()? {
            Token {
                tok: Tok::Minus,
                col,
            } => (UnOp::Neg, *col),
            Token {
                tok: Tok::Bang,
                col,
            } => (UnOp::Not, *col),
            _ => return self.postfix(),
        };
        self.peeked = None;
        // `-9223372036854775808` is i64::MIN: the literal alone would not fit.
        if op == UnOp::Neg && self.peek()?.tok == Tok::Int(1u64 << 63) {
            self.peeked = None;
            return self.postfix_ops(Ast::new(Kind::Lit(Value::Int(i64::MIN)), col)?);
        }
        self.depth += 1;
        let operand = if self.depth > MAX_DEPTH {
            Err(too_deep(col))
        } else {
            self.unary()
        };
        self.depth -= 1;
        Ast::new(Kind::Unary(op, operand?), col)
    }

    /// postfix := primary ('.' name | '[' expr ']')*
    fn postfix(&mut self) -> CResult<Box<Ast>> {
        let base = self.primary()?;
        self.postfix_ops(base)
    }

    fn postfix_ops(&mut self, mut base: Box<Ast>) -> CResult<Box<Ast>> {
        loop {
            base = match self.peek()? {
                Token { tok: Tok::Dot, col } => {
                    let col = *col;
                    self.peeked = None;
                    self.field(base, col)?
                }
                Token {
                    tok: Tok::LBracket,
                    col,
                } => {
                    let col = *col;
                    self.peeked = None;
                    self.index(base, col)?
                }
                _ => return Ok(base),
            };
        }
    }

    #[inline(never)]
    fn field(&mut self, base: Box<Ast>, col: usize) -> CResult<Box<Ast>> {
        let name = self.next()?;
        match name_of(&name.tok) {
            Some(field) => Ast::new(Kind::Field(base, field.into()), col),
            None => Err(expected("a field name after '.'", &name)),
        }
    }

    #[inline(never)]
    fn index(&mut self, base: Box<Ast>, col: usize) -> CResult<Box<Ast>> {
        let index = self.expr()?;
        self.expect(&Tok::RBracket, "to close the index")?;
        Ast::new(Kind::Index(base, index), col)
    }

    fn primary(&mut self) -> CResult<Box<Ast>> {
        let t = self.next()?;
        let col = t.col;
        match t.tok {
            Tok::LParen => self.paren(),
            Tok::LBracket => self.list(col),
            Tok::LBrace => self.map(col),
            Tok::Ident(name) => self.ident(name, col),
            tok => leaf(Token { tok, col }),
        }
    }

    #[inline(never)]
    fn paren(&mut self) -> CResult<Box<Ast>> {
        let inner = self.expr()?;
        self.expect(&Tok::RParen, "to close '('")?;
        Ok(inner)
    }

    #[inline(never)]
    fn list(&mut self, col: usize) -> CResult<Box<Ast>> {
        let items = self.items(&Tok::RBracket, "list")?;
        Ast::new(Kind::List(items), col)
    }

    #[inline(never)]
    fn map(&mut self, col: usize) -> CResult<Box<Ast>> {
        let entries = self.map_entries()?;
        Ast::new(Kind::Map(entries), col)
    }

    #[inline(never)]
    fn ident(&mut self, name: String, col: usize) -> CResult<Box<Ast>> {
        if self.eat(&Tok::LParen)? {
            let args = self.items(&Tok::RParen, "argument list")?;
            Ast::new(Kind::Call(name, args), col)
        } else {
            Ast::new(Kind::Var(variable(&name, col)?), col)
        }
    }

    /// Comma-separated expressions up to `close` (a trailing comma is allowed).
    #[inline(never)]
    fn items(&mut self, close: &Tok, what: &str) -> CResult<Vec<Ast>> {
        let mut items = Vec::new();
        loop {
            if self.eat(close)? {
                return Ok(items);
            }
            items.push(*self.expr()?);
            let t = self.next()?;
            if t.tok == *close {
                return Ok(items);
            }
            if t.tok != Tok::Comma {
                return Err(expected_separator(close, what, &t));
            }
        }
    }

    /// `key: expr` entries up to `}`; keys are names or strings and must be unique.
    #[inline(never)]
    fn map_entries(&mut self) -> CResult<Vec<(Arc<str>, Ast)>> {
        let mut entries: Vec<(Arc<str>, Ast)> = Vec::new();
        loop {
            let t = self.next()?;
            if t.tok == Tok::RBrace {
                return Ok(entries);
            }
            let key = map_key(&t, &entries)?;
            self.expect(&Tok::Colon, "after a map key")?;
            let value = self.expr()?;
            entries.push((key, *value));
            let t = self.next()?;
            match t.tok {
                Tok::RBrace => return Ok(entries),
                Tok::Comma => {}
                _ => return Err(expected_separator(&Tok::RBrace, "map", &t)),
            }
        }
    }
}

/// A literal (or an error for a token that cannot start an expression).
#[inline(never)]
fn leaf(t: Token) -> CResult<Box<Ast>> {
    let kind = match t.tok {
        Tok::Int(i) => match i64::try_from(i) {
            Ok(i) => Kind::Lit(Value::Int(i)),
            Err(_) => {
                return Err(ExprError::new(
                    t.col,
                    format!("integer {i} is out of range"),
                ))
            }
        },
        Tok::Float(f) => Kind::Lit(Value::Float(f)),
        Tok::Str(s) => Kind::Lit(Value::from(s)),
        Tok::True => Kind::Lit(Value::Bool(true)),
        Tok::False => Kind::Lit(Value::Bool(false)),
        Tok::Null => Kind::Lit(Value::Null),
        _ => return Err(expected("an expression", &t)),
    };
    Ast::new(kind, t.col)
}

/// The key of a map entry: a name or a string, not seen before in this map.
#[inline(never)]
fn map_key(t: &Token, entries: &[(Arc<str>, Ast)]) -> CResult<Arc<str>> {
    let key: Arc<str> = match &t.tok {
        Tok::Str(s) => Arc::from(s.as_str()),
        tok => match name_of(tok) {
            Some(name) => Arc::from(name),
            None => return Err(expected("a map key", t)),
        },
    };
    if entries.iter().any(|(k, _)| *k == key) {
        return Err(ExprError::new(
            t.col,
            format!("duplicate map key {:?}", &*key),
        ));
    }
    Ok(key)
}

#[cold]
#[inline(never)]
fn expected_symbol(tok: &Tok, context: &str, found: &Token) -> Box<ExprError> {
    ExprError::new(
        found.col,
        format!(
            "expected '{}' {context}, found {}",
            tok.symbol(),
            found.tok.describe()
        ),
    )
}

#[cold]
#[inline(never)]
fn expected_separator(close: &Tok, what: &str, found: &Token) -> Box<ExprError> {
    ExprError::new(
        found.col,
        format!(
            "expected ',' or '{}' in {what}, found {}",
            close.symbol(),
            found.tok.describe()
        ),
    )
}

/// The name a token spells when used as a field name or map key (identifiers and keywords).
fn name_of(tok: &Tok) -> Option<&str> {
    match tok {
        Tok::Ident(s) => Some(s),
        Tok::True | Tok::False | Tok::Null | Tok::In => Some(tok.symbol()),
        _ => None,
    }
}

#[inline(never)]
fn variable(name: &str, col: usize) -> CResult<Var> {
    match name {
        "value" => Ok(Var::Value),
        "key" => Ok(Var::Key),
        "ts" => Ok(Var::Ts),
        _ if super::functions::is_function(name) => Err(ExprError::new(
            col,
            format!("unknown variable '{name}' ('{name}' is a function: call it as {name}(...))"),
        )),
        _ => Err(ExprError::new(
            col,
            format!("unknown variable '{name}' (the variables are value, key and ts)"),
        )),
    }
}
