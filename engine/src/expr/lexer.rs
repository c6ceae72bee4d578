//! Lexer: turns expression source text into tokens, one at a time.
//!
//! Invariant: every token (and every lexing error) carries the 1-based column, counted in
//! chars, where it starts, so compile errors point at the right place even after non-ASCII
//! text; and lexing never panics, whatever the input.

use super::{CResult, ExprError};

/// A token kind, with its payload for literals and identifiers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    /// An integer literal; may be `i64::MAX + 1`, valid only after a unary minus.
    Int(u64),
    /// A float literal (always finite).
    Float(f64),
    /// A string literal, escapes resolved.
    Str(String),
    /// An identifier (a name that is not a keyword).
    Ident(String),
    /// `true`.
    True,
    /// `false`.
    False,
    /// `null`.
    Null,
    /// `in`.
    In,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Lt,
    Le,
    Gt,
    Ge,
    EqEq,
    Ne,
    AndAnd,
    OrOr,
    Bang,
    Question,
    Colon,
    Comma,
    Dot,
    LParen,
    RParen,
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    /// End of input.
    Eof,
}

impl Tok {
    /// How the token is named in error messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Tok::Int(i) => format!("number {i}"),
            Tok::Float(f) => format!("number {f}"),
            Tok::Str(s) => format!("string {s:?}"),
            Tok::Ident(s) => format!("'{s}'"),
            Tok::Eof => "end of input".to_string(),
            other => format!("'{}'", other.symbol()),
        }
    }

    /// The source spelling of a keyword or punctuation token.
    pub(crate) fn symbol(&self) -> &'static str {
        match self {
            Tok::True => "true",
            Tok::False => "false",
            Tok::Null => "null",
            Tok::In => "in",
            Tok::Plus => "+",
            Tok::Minus => "-",
            Tok::Star => "*",
            Tok::Slash => "/",
            Tok::Percent => "%",
            Tok::Lt => "<",
            Tok::Le => "<=",
            Tok::Gt => ">",
            Tok::Ge => ">=",
            Tok::EqEq => "==",
            Tok::Ne => "!=",
            Tok::AndAnd => "&&",
            Tok::OrOr => "||",
            Tok::Bang => "!",
            Tok::Question => "?",
            Tok::Colon => ":",
            Tok::Comma => ",",
            Tok::Dot => ".",
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::LBracket => "[",
            Tok::RBracket => "]",
            Tok::LBrace => "{",
            Tok::RBrace => "}",
            Tok::Int(_) | Tok::Float(_) | Tok::Str(_) | Tok::Ident(_) | Tok::Eof => "",
        }
    }
}

/// A token and the column it starts at.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    /// The token.
    pub tok: Tok,
    /// 1-based column in chars.
    pub col: usize,
}

/// Produces tokens on demand from the source text.
pub(crate) struct Lexer {
    chars: Vec<char>,
    pos: usize,
}

impl Lexer {
    /// A lexer at the start of `src`.
    pub(crate) fn new(src: &str) -> Lexer {
        Lexer {
            chars: src.chars().collect(),
            pos: 0,
        }
    }

    fn peek_at(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    /// The next token; `Tok::Eof` (at column `len + 1`) once the input is exhausted.
    pub(crate) fn next_token(&mut self) -> CResult<Token> {
        while self.peek_at(0).is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
        let col = self.pos + 1;
        let Some(c) = self.peek_at(0) else {
            return Ok(Token { tok: Tok::Eof, col });
        };
        let next = self.peek_at(1);
        let (tok, width) = match c {
            '0'..='9' => return self.number(col),
            '"' | '\'' => return self.string(c, col),
            c if c.is_ascii_alphabetic() || c == '_' => return Ok(self.word(col)),
            '+' => (Tok::Plus, 1),
            '-' => (Tok::Minus, 1),
            '*' => (Tok::Star, 1),
            '/' => (Tok::Slash, 1),
            '%' => (Tok::Percent, 1),
            '<' if next == Some('=') => (Tok::Le, 2),
            '<' => (Tok::Lt, 1),
            '>' if next == Some('=') => (Tok::Ge, 2),
            '>' => (Tok::Gt, 1),
            '=' if next == Some('=') => (Tok::EqEq, 2),
            '!' if next == Some('=') => (Tok::Ne, 2),
            '!' => (Tok::Bang, 1),
            '&' if next == Some('&') => (Tok::AndAnd, 2),
            '|' if next == Some('|') => (Tok::OrOr, 2),
            '?' => (Tok::Question, 1),
            ':' => (Tok::Colon, 1),
            ',' => (Tok::Comma, 1),
            '.' => (Tok::Dot, 1),
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            '[' => (Tok::LBracket, 1),
            ']' => (Tok::RBracket, 1),
            '{' => (Tok::LBrace, 1),
            '}' => (Tok::RBrace, 1),
            '=' => return Err(ExprError::new(col, "unexpected '=' (did you mean '=='?)")),
            '&' => return Err(ExprError::new(col, "unexpected '&' (did you mean '&&'?)")),
            '|' => return Err(ExprError::new(col, "unexpected '|' (did you mean '||'?)")),
            other => {
                return Err(ExprError::new(
                    col,
                    format!("unexpected character {other:?}"),
                ));
            }
        };
        self.pos += width;
        Ok(Token { tok, col })
    }

    fn word(&mut self, col: usize) -> Token {
        let start = self.pos;
        while self
            .peek_at(0)
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.pos += 1;
        }
        // In bounds: `pos` only moves past chars that `peek_at` found, and never below `start`.
        let text: String = self.chars[start..self.pos].iter().collect();
        let tok = match text.as_str() {
            "true" => Tok::True,
            "false" => Tok::False,
            "null" => Tok::Null,
            "in" => Tok::In,
            _ => Tok::Ident(text),
        };
        Token { tok, col }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.peek_at(0).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self, col: usize) -> CResult<Token> {
        let start = self.pos;
        self.digits();
        let mut is_float = false;
        if self.peek_at(0) == Some('.') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            is_float = true;
            self.pos += 1;
            self.digits();
        }
        if matches!(self.peek_at(0), Some('e' | 'E')) {
            is_float = true;
            self.pos += 1;
            if matches!(self.peek_at(0), Some('+' | '-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(ExprError::new(
                    col,
                    "invalid number: missing exponent digits",
                ));
            }
        }
        // In bounds: `pos` only moves past chars that `peek_at` found, and never below `start`.
        let text: String = self.chars[start..self.pos].iter().collect();
        let tok = if is_float {
            match text.parse::<f64>() {
                Ok(f) if f.is_finite() => Tok::Float(f),
                _ => {
                    return Err(ExprError::new(
                        col,
                        format!("number {text} is out of range"),
                    ))
                }
            }
        } else {
            match text.parse::<u64>() {
                Ok(i) if i <= 1u64 << 63 => Tok::Int(i),
                _ => {
                    return Err(ExprError::new(
                        col,
                        format!("integer {text} is out of range"),
                    ));
                }
            }
        };
        Ok(Token { tok, col })
    }

    fn string(&mut self, quote: char, col: usize) -> CResult<Token> {
        self.pos += 1; // the opening quote
        let mut out = String::new();
        loop {
            let Some(c) = self.peek_at(0) else {
                return Err(ExprError::new(col, "unterminated string"));
            };
            let here = self.pos + 1;
            self.pos += 1;
            if c == quote {
                return Ok(Token {
                    tok: Tok::Str(out),
                    col,
                });
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some(e) = self.peek_at(0) else {
                return Err(ExprError::new(col, "unterminated string"));
            };
            self.pos += 1;
            match e {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                '0' => out.push('\0'),
                '\\' => out.push('\\'),
                '\'' => out.push('\''),
                '"' => out.push('"'),
                'u' => out.push(self.unicode_escape(here)?),
                other => {
                    return Err(ExprError::new(here, format!("unknown escape '\\{other}'")));
                }
            }
        }
    }

    /// Reads `{XXXX}` after `\u` (1 to 6 hex digits naming a Unicode scalar value).
    fn unicode_escape(&mut self, col: usize) -> CResult<char> {
        let err = || ExprError::new(col, "invalid unicode escape (expected \\u{XXXX})");
        if self.peek_at(0) != Some('{') {
            return Err(err());
        }
        self.pos += 1;
        let mut code: u32 = 0;
        let mut n = 0;
        while let Some(d) = self.peek_at(0).and_then(|c| c.to_digit(16)) {
            if n == 6 {
                return Err(err());
            }
            code = code * 16 + d;
            n += 1;
            self.pos += 1;
        }
        if n == 0 || self.peek_at(0) != Some('}') {
            return Err(err());
        }
        self.pos += 1;
        char::from_u32(code).ok_or_else(err)
    }
}
