//! kiln's expression language: a small, safe subset of Google's CEL.
//!
//! It decides pipeline `gate` steps (`steps.scan.output.critical == 0 &&
//! steps.licence.output.ok`) and filters events for automation rules and
//! admission policies (`event.type == "job.dead" && event.data.queue in
//! ["emails", "billing"]`). The syntax follows CEL so that anyone who has
//! written a Kubernetes admission policy can read and write it.
//!
//! The lexer, the Pratt parser and the evaluator are written by hand rather
//! than generated or borrowed, because expressions come from users and every
//! part of handling them must be bounded:
//!
//! | bound | limit |
//! |---|---|
//! | source length | [`MAX_SOURCE_LEN`] bytes |
//! | nesting depth of the syntax tree and of the parser's recursion | [`MAX_DEPTH`] |
//! | evaluation steps | [`MAX_STEPS`] |
//! | length of a string the expression builds | [`MAX_STRING_LEN`] bytes |
//! | length of a list the expression builds | [`MAX_LIST_LEN`] items |
//!
//! Every node visited costs one step, and so does every element a macro
//! (`exists`, `all`) visits. Work that grows with the size of a value also
//! costs steps, so a large context cannot turn a short expression into a long
//! computation: comparing or copying a JSON value costs one step per node, and
//! scanning a string one step per KiB (glob matching one per 256 comparisons).
//! `&&` and `||` are n-ary in the tree, so a long chain of conditions costs one
//! level of nesting, not one per operand. Exceeding any bound is an error, never
//! a panic, a stack overflow or a hang.
//!
//! Semantics in brief: a missing field, an out-of-range index and field access
//! on a non-map all evaluate to `null`; `&&`, `||`, `!` and `?:` need booleans;
//! numbers compare across int and double; integer arithmetic is checked; `==`
//! is JSON equality (with `1 == 1.0`); `in` tests list membership, map keys or
//! substrings. The functions are a fixed set: `size`, `has`, `startsWith`,
//! `endsWith`, `contains`, `matches` (glob with `*` and `?`), `int`, `string`,
//! `double`, `lower`, `upper`, and the macros `exists` and `all`, each callable
//! as `f(x, ...)` or `x.f(...)` (`has` only as `has(path)`).

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};

/// Longest accepted source, in bytes.
pub const MAX_SOURCE_LEN: usize = 4096;
/// Deepest nesting of the syntax tree (and of the parser's recursion).
pub const MAX_DEPTH: usize = 64;
/// Most evaluation steps one `eval` may take.
pub const MAX_STEPS: u64 = 100_000;
/// Longest string an expression may build, in bytes.
pub const MAX_STRING_LEN: usize = 64 * 1024;
/// Longest list an expression may build.
pub const MAX_LIST_LEN: usize = 10_000;

/// A parse or evaluation error. `pos` is a byte offset into the source: where
/// parsing failed, or the operator or call that failed to evaluate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at {pos}")]
pub struct ExprError {
    pub pos: usize,
    pub message: String,
}

impl ExprError {
    fn new(pos: usize, message: impl Into<String>) -> Self {
        ExprError {
            pos,
            message: message.into(),
        }
    }
}

type R<T> = Result<T, ExprError>;

fn err<T>(pos: usize, message: impl Into<String>) -> R<T> {
    Err(ExprError::new(pos, message))
}

/// A parsed expression. Serialises as its source text; deserialising parses.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    source: String,
    root: Node,
}

impl Expr {
    pub fn parse(source: &str) -> Result<Expr, ExprError> {
        if source.len() > MAX_SOURCE_LEN {
            return err(
                MAX_SOURCE_LEN,
                format!(
                    "expression is {} bytes long; the limit is {MAX_SOURCE_LEN}",
                    source.len()
                ),
            );
        }
        let toks = lex(source)?;
        let mut p = Parser {
            toks,
            i: 0,
            depth: 0,
        };
        let root = p.expr()?;
        if *p.peek() != Tok::Eof {
            return err(p.pos(), format!("unexpected {}", describe(p.peek())));
        }
        Ok(Expr {
            source: source.to_string(),
            root,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every context path the expression reads, as segments from a root identifier,
    /// cut at the first dynamic index: `steps.scan.output.critical` → ["steps","scan","output","critical"];
    /// `steps.a.output[i]` → ["steps","a","output"]. Macro variables are not roots.
    /// Static indices are segments too (`a[0]` → ["a","0"], `a["k"]` → ["a","k"]).
    /// Each path appears once, in order of first appearance.
    pub fn references(&self) -> Vec<Vec<String>> {
        self.paths()
            .into_iter()
            .map(|p| {
                p.into_iter()
                    .map(|s| match s {
                        Seg::Field(s) | Seg::Key(s) => s,
                        Seg::Index(i) => i.to_string(),
                    })
                    .collect()
            })
            .collect()
    }

    pub fn eval(&self, context: &serde_json::Value) -> Result<serde_json::Value, ExprError> {
        self.eval_within(context, &mut MAX_STEPS.clone())
    }

    /// Evaluates with at most `budget` steps (and never more than
    /// [`MAX_STEPS`]), taking the steps used from it, so several
    /// expressions judging one thing share one bound.
    pub fn eval_within(
        &self,
        context: &serde_json::Value,
        budget: &mut u64,
    ) -> Result<serde_json::Value, ExprError> {
        let mut m = Machine {
            steps: 0,
            limit: (*budget).min(MAX_STEPS),
        };
        let scope = Scope {
            ctx: context,
            var: None,
            parent: None,
        };
        let out = m.eval(&self.root, &scope);
        *budget = budget.saturating_sub(m.steps);
        Ok(out?.into_owned())
    }

    /// Evaluates and requires a boolean.
    pub fn eval_bool(&self, context: &serde_json::Value) -> Result<bool, ExprError> {
        self.eval_bool_within(context, &mut MAX_STEPS.clone())
    }

    /// [`Expr::eval_bool`] within a shared budget (see [`Expr::eval_within`]).
    pub fn eval_bool_within(
        &self,
        context: &serde_json::Value,
        budget: &mut u64,
    ) -> Result<bool, ExprError> {
        match self.eval_within(context, budget)? {
            Value::Bool(b) => Ok(b),
            other => err(
                0,
                format!(
                    "the expression must yield a boolean, got {}",
                    type_name(&other)
                ),
            ),
        }
    }

    /// The value of each static path the expression reads, keyed by its dotted text
    /// (`steps.scan.output.critical` → 3), for recording why a gate decided as it did.
    /// Missing paths are recorded as null.
    pub fn bindings(
        &self,
        context: &serde_json::Value,
    ) -> std::collections::BTreeMap<String, serde_json::Value> {
        let mut out = BTreeMap::new();
        for path in self.paths() {
            let value = lookup_path(context, &path).cloned().unwrap_or(Value::Null);
            out.insert(path_text(&path), value);
        }
        out
    }

    fn paths(&self) -> Vec<Vec<Seg>> {
        let mut out = Vec::new();
        collect_refs(&self.root, &mut Vec::new(), &mut out);
        out
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for Expr {
    type Err = ExprError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Expr::parse(s)
    }
}

impl Serialize for Expr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Expr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = Cow::<'de, str>::deserialize(deserializer)?;
        Expr::parse(&source).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------- syntax tree

#[derive(Clone, Debug, PartialEq)]
struct Node {
    kind: Kind,
    pos: usize,
    /// Height of this subtree; bounded by MAX_DEPTH so every recursive walk
    /// over the tree (evaluation, references, drop) is bounded too.
    depth: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BinOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl BinOp {
    fn symbol(self) -> &'static str {
        match self {
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::In => "in",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Func {
    Size,
    Has,
    StartsWith,
    EndsWith,
    Contains,
    Matches,
    Int,
    String,
    Double,
    Lower,
    Upper,
}

impl Func {
    fn lookup(name: &str) -> Option<Func> {
        Some(match name {
            "size" => Func::Size,
            "has" => Func::Has,
            "startsWith" => Func::StartsWith,
            "endsWith" => Func::EndsWith,
            "contains" => Func::Contains,
            "matches" => Func::Matches,
            "int" => Func::Int,
            "string" => Func::String,
            "double" => Func::Double,
            "lower" => Func::Lower,
            "upper" => Func::Upper,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Func::Size => "size",
            Func::Has => "has",
            Func::StartsWith => "startsWith",
            Func::EndsWith => "endsWith",
            Func::Contains => "contains",
            Func::Matches => "matches",
            Func::Int => "int",
            Func::String => "string",
            Func::Double => "double",
            Func::Lower => "lower",
            Func::Upper => "upper",
        }
    }

    /// Arguments including the receiver of the method form.
    fn arity(self) -> usize {
        match self {
            Func::StartsWith | Func::EndsWith | Func::Contains | Func::Matches => 2,
            _ => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quant {
    Exists,
    All,
}

impl Quant {
    fn name(self) -> &'static str {
        match self {
            Quant::Exists => "exists",
            Quant::All => "all",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Lit(Value),
    Ident(String),
    Field(Box<Node>, String),
    Index(Box<Node>, Box<Node>),
    List(Vec<Node>),
    Map(Vec<(Node, Node)>),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
    Binary(BinOp, Box<Node>, Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
    Call(Func, Vec<Node>),
    Macro {
        quant: Quant,
        list: Box<Node>,
        var: String,
        body: Box<Node>,
    },
}

impl Kind {
    fn children(&self) -> Vec<&Node> {
        match self {
            Kind::Lit(_) | Kind::Ident(_) => Vec::new(),
            Kind::Field(b, _) | Kind::Not(b) | Kind::Neg(b) => vec![b],
            Kind::Index(a, b) | Kind::Binary(_, a, b) => vec![a, b],
            Kind::List(xs) | Kind::And(xs) | Kind::Or(xs) | Kind::Call(_, xs) => {
                xs.iter().collect()
            }
            Kind::Map(es) => es.iter().flat_map(|(k, v)| [k, v]).collect(),
            Kind::Cond(a, b, c) => vec![a, b, c],
            Kind::Macro { list, body, .. } => vec![list, body],
        }
    }
}

fn mk(kind: Kind, pos: usize) -> R<Node> {
    let depth = kind.children().iter().map(|c| c.depth).max().unwrap_or(0) + 1;
    if depth > MAX_DEPTH {
        return err(pos, too_deep());
    }
    Ok(Node { kind, pos, depth })
}

fn too_deep() -> String {
    format!("expression is nested too deeply (the limit is {MAX_DEPTH} levels)")
}

// ---------------------------------------------------------------------- lexer

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// Unsigned so that `-9223372036854775808` can be written.
    Int(u64),
    Float(f64),
    Str(String),
    Ident(String),
    P(&'static str),
    Eof,
}

struct Token {
    tok: Tok,
    pos: usize,
}

const PUNCT2: [&str; 6] = ["==", "!=", "<=", ">=", "&&", "||"];
const PUNCT1: [&str; 18] = [
    "(", ")", "[", "]", "{", "}", ".", ",", ":", "?", "!", "-", "+", "*", "/", "%", "<", ">",
];

fn describe(t: &Tok) -> String {
    match t {
        Tok::Int(_) | Tok::Float(_) => "number".to_string(),
        Tok::Str(_) => "string".to_string(),
        Tok::Ident(s) => format!("'{}'", clip(s)),
        Tok::P(p) => format!("'{p}'"),
        Tok::Eof => "end of input".to_string(),
    }
}

/// Shortens user text quoted in an error message.
fn clip(s: &str) -> String {
    const MAX: usize = 32;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(MAX).collect();
        out.push('…');
        out
    }
}

fn lex(src: &str) -> R<Vec<Token>> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    'outer: while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'0'..=b'9' => {
                let (tok, end) = lex_number(src, i)?;
                out.push(Token { tok, pos: i });
                i = end;
            }
            b'"' | b'\'' => {
                let (s, end) = lex_string(src, i)?;
                out.push(Token {
                    tok: Tok::Str(s),
                    pos: i,
                });
                i = end;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push(Token {
                    tok: Tok::Ident(src[start..i].to_string()),
                    pos: start,
                });
            }
            c => {
                for p in PUNCT2 {
                    if b[i..].starts_with(p.as_bytes()) {
                        out.push(Token {
                            tok: Tok::P(p),
                            pos: i,
                        });
                        i += 2;
                        continue 'outer;
                    }
                }
                for p in PUNCT1 {
                    if p.as_bytes()[0] == c {
                        out.push(Token {
                            tok: Tok::P(p),
                            pos: i,
                        });
                        i += 1;
                        continue 'outer;
                    }
                }
                return err(
                    i,
                    match c {
                        b'=' => "unexpected '=' (use '==' to compare)".to_string(),
                        b'&' => "unexpected '&' (use '&&')".to_string(),
                        b'|' => "unexpected '|' (use '||')".to_string(),
                        _ => {
                            let ch = src.get(i..).and_then(|s| s.chars().next()).unwrap_or('?');
                            format!("unexpected character '{}'", ch.escape_debug())
                        }
                    },
                );
            }
        }
    }
    out.push(Token {
        tok: Tok::Eof,
        pos: src.len(),
    });
    Ok(out)
}

fn lex_number(src: &str, start: usize) -> R<(Tok, usize)> {
    let b = src.as_bytes();
    let digits = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    let mut i = digits(start);
    let mut float = false;
    if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
        float = true;
        i = digits(i + 1);
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        let mut j = i + 1;
        if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            float = true;
            i = digits(j);
        }
    }
    let text = &src[start..i];
    if float {
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok((Tok::Float(f), i)),
            _ => err(start, format!("number {} is out of range", clip(text))),
        }
    } else {
        match text.parse::<u64>() {
            Ok(v) if v <= 1 << 63 => Ok((Tok::Int(v), i)),
            _ => err(start, format!("integer {} is out of range", clip(text))),
        }
    }
}

fn lex_string(src: &str, start: usize) -> R<(String, usize)> {
    let quote = char::from(src.as_bytes()[start]);
    let body = &src[start + 1..];
    let mut chars = body.char_indices();
    let mut out = String::new();
    let unterminated = || ExprError::new(start, "unterminated string");
    loop {
        let (off, c) = chars.next().ok_or_else(unterminated)?;
        let at = start + 1 + off;
        if c == quote {
            return Ok((out, at + 1));
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        let (_, e) = chars.next().ok_or_else(unterminated)?;
        let decoded = match e {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            '\\' => '\\',
            '"' => '"',
            '\'' => '\'',
            '/' => '/',
            'u' => {
                let bad = || ExprError::new(at, "invalid unicode escape");
                let hex4 = |chars: &mut std::str::CharIndices<'_>| {
                    let mut v = 0u32;
                    for _ in 0..4 {
                        let d = chars
                            .next()
                            .and_then(|(_, c)| c.to_digit(16))
                            .ok_or_else(bad)?;
                        v = v * 16 + d;
                    }
                    Ok::<u32, ExprError>(v)
                };
                let cp = hex4(&mut chars)?;
                if (0xD800..0xDC00).contains(&cp) {
                    // A high surrogate must be followed by an escaped low one.
                    let slash = chars.next().map(|(_, c)| c);
                    let u = chars.next().map(|(_, c)| c);
                    if slash != Some('\\') || u != Some('u') {
                        return Err(bad());
                    }
                    let low = hex4(&mut chars)?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return Err(bad());
                    }
                    let full = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    char::from_u32(full).ok_or_else(bad)?
                } else {
                    char::from_u32(cp).ok_or_else(bad)?
                }
            }
            other => return err(at, format!("unknown escape '\\{}'", other.escape_debug())),
        };
        out.push(decoded);
    }
}

// --------------------------------------------------------------------- parser

struct Parser {
    toks: Vec<Token>,
    i: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        // The token list always ends with Eof and `advance` never passes it.
        &self.toks[self.i].tok
    }

    fn peek2(&self) -> &Tok {
        self.toks.get(self.i + 1).map_or(&Tok::Eof, |t| &t.tok)
    }

    fn pos(&self) -> usize {
        self.toks[self.i].pos
    }

    fn advance(&mut self) {
        if self.i + 1 < self.toks.len() {
            self.i += 1;
        }
    }

    fn is(&self, p: &str) -> bool {
        matches!(self.peek(), Tok::P(q) if *q == p)
    }

    fn eat(&mut self, p: &str) -> bool {
        if self.is(p) {
            self.advance();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, p: &'static str) -> R<()> {
        if self.eat(p) {
            Ok(())
        } else {
            err(
                self.pos(),
                format!("expected '{p}', found {}", describe(self.peek())),
            )
        }
    }

    /// A full expression, including the ternary; every nested expression
    /// (parentheses, list items, arguments, indices) comes through here, so
    /// this counter bounds the parser's recursion.
    fn expr(&mut self) -> R<Node> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return err(self.pos(), too_deep());
        }
        let cond = self.binary(1)?;
        let node = if self.is("?") {
            self.ternary(cond)?
        } else {
            cond
        };
        self.depth -= 1;
        Ok(node)
    }

    fn ternary(&mut self, cond: Node) -> R<Node> {
        let pos = self.pos();
        self.advance();
        let then = self.expr()?;
        self.expect(":")?;
        let other = self.expr()?;
        mk(
            Kind::Cond(Box::new(cond), Box::new(then), Box::new(other)),
            pos,
        )
    }

    /// Binary operators by CEL precedence: 1 `||`, 2 `&&`, 3 relations and
    /// `in`, 4 `+ -`, 5 `* / %`; all left-associative.
    fn binary(&mut self, min: u8) -> R<Node> {
        let mut lhs = self.unary()?;
        while let Some((prec, op)) = binop(self.peek()) {
            if prec < min {
                break;
            }
            let pos = self.pos();
            self.advance();
            let rhs = self.binary(prec + 1)?;
            lhs = match op {
                Some(op) => mk(Kind::Binary(op, Box::new(lhs), Box::new(rhs)), pos)?,
                None => logical(prec == 2, lhs, rhs, pos)?,
            };
        }
        Ok(lhs)
    }

    /// Prefix operators are collected in a loop rather than by recursion, so
    /// `!!!!…` cannot exhaust the stack; the tree depth check rejects it.
    fn unary(&mut self) -> R<Node> {
        let mut ops = Vec::new();
        while self.is("!") || self.is("-") {
            if ops.len() >= MAX_DEPTH {
                return err(self.pos(), too_deep());
            }
            ops.push((self.is("!"), self.pos()));
            self.advance();
        }
        let mut node = match (ops.last(), self.peek()) {
            (Some((false, _)), Tok::Int(v)) if *v == 1 << 63 => {
                // The one integer literal that only exists negated.
                let pos = ops.pop().map_or(0, |(_, p)| p);
                self.advance();
                let lit = mk(Kind::Lit(Value::from(i64::MIN)), pos)?;
                self.postfix(lit)?
            }
            _ => {
                let base = self.primary()?;
                self.postfix(base)?
            }
        };
        for (not, pos) in ops.into_iter().rev() {
            let inner = Box::new(node);
            node = mk(
                if not {
                    Kind::Not(inner)
                } else {
                    Kind::Neg(inner)
                },
                pos,
            )?;
        }
        Ok(node)
    }

    fn postfix(&mut self, mut node: Node) -> R<Node> {
        loop {
            if self.is(".") {
                self.advance();
                let pos = self.pos();
                let name = match self.peek() {
                    Tok::Ident(s) => s.clone(),
                    other => {
                        return err(
                            pos,
                            format!("expected a field name after '.', found {}", describe(other)),
                        )
                    }
                };
                self.advance();
                if self.is("(") {
                    self.advance();
                    let args = self.args()?;
                    node = call(&name, pos, Some(node), args)?;
                } else {
                    node = mk(Kind::Field(Box::new(node), name), pos)?;
                }
            } else if self.is("[") {
                let pos = self.pos();
                self.advance();
                let idx = self.expr()?;
                self.expect("]")?;
                node = mk(Kind::Index(Box::new(node), Box::new(idx)), pos)?;
            } else {
                return Ok(node);
            }
        }
    }

    /// Arguments after the opening parenthesis, through the closing one.
    fn args(&mut self) -> R<Vec<Node>> {
        let mut args = Vec::new();
        if self.eat(")") {
            return Ok(args);
        }
        loop {
            args.push(self.expr()?);
            if self.eat(")") {
                return Ok(args);
            }
            self.expect(",")?;
        }
    }

    /// The recursive forms come first and the rest live in their own
    /// functions, so the frames on the recursion path stay small.
    fn primary(&mut self) -> R<Node> {
        let pos = self.pos();
        if self.eat("(") {
            let inner = self.expr()?;
            self.expect(")")?;
            return Ok(inner);
        }
        if self.eat("[") {
            return self.list(pos);
        }
        if self.eat("{") {
            return self.map(pos);
        }
        if matches!(self.peek(), Tok::Ident(_)) && matches!(self.peek2(), Tok::P("(")) {
            return self.global_call(pos);
        }
        self.atom(pos)
    }

    fn list(&mut self, pos: usize) -> R<Node> {
        let mut items = Vec::new();
        while !self.eat("]") {
            items.push(self.expr()?);
            if !self.is("]") {
                self.expect(",")?;
            }
        }
        mk(Kind::List(items), pos)
    }

    fn map(&mut self, pos: usize) -> R<Node> {
        let mut entries = Vec::new();
        while !self.eat("}") {
            let k = self.expr()?;
            self.expect(":")?;
            let v = self.expr()?;
            entries.push((k, v));
            if !self.is("}") {
                self.expect(",")?;
            }
        }
        mk(Kind::Map(entries), pos)
    }

    fn global_call(&mut self, pos: usize) -> R<Node> {
        let name = match self.peek() {
            Tok::Ident(name) => name.clone(),
            other => return err(pos, format!("unexpected {}", describe(other))),
        };
        self.advance();
        self.advance();
        let args = self.args()?;
        call(&name, pos, None, args)
    }

    /// Literals and plain identifiers.
    fn atom(&mut self, pos: usize) -> R<Node> {
        let lit = match self.peek() {
            Tok::Int(v) => match i64::try_from(*v) {
                Ok(v) => Value::from(v),
                Err(_) => return err(pos, "integer is out of range"),
            },
            Tok::Float(f) => match Number::from_f64(*f) {
                Some(n) => Value::Number(n),
                None => return err(pos, "number is out of range"),
            },
            Tok::Str(s) => Value::String(s.clone()),
            Tok::Ident(name) => match name.as_str() {
                "null" => Value::Null,
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                "in" => return err(pos, "unexpected 'in'"),
                _ => {
                    let name = name.clone();
                    self.advance();
                    return mk(Kind::Ident(name), pos);
                }
            },
            other => return err(pos, format!("unexpected {}", describe(other))),
        };
        self.advance();
        mk(Kind::Lit(lit), pos)
    }
}

/// Precedence and operator of a binary operator token; no operator for
/// `||` (1) and `&&` (2), which become n-ary nodes.
fn binop(t: &Tok) -> Option<(u8, Option<BinOp>)> {
    Some(match t {
        Tok::P("||") => (1, None),
        Tok::P("&&") => (2, None),
        Tok::P("==") => (3, Some(BinOp::Eq)),
        Tok::P("!=") => (3, Some(BinOp::Ne)),
        Tok::P("<") => (3, Some(BinOp::Lt)),
        Tok::P("<=") => (3, Some(BinOp::Le)),
        Tok::P(">") => (3, Some(BinOp::Gt)),
        Tok::P(">=") => (3, Some(BinOp::Ge)),
        Tok::Ident(s) if s == "in" => (3, Some(BinOp::In)),
        Tok::P("+") => (4, Some(BinOp::Add)),
        Tok::P("-") => (4, Some(BinOp::Sub)),
        Tok::P("*") => (5, Some(BinOp::Mul)),
        Tok::P("/") => (5, Some(BinOp::Div)),
        Tok::P("%") => (5, Some(BinOp::Rem)),
        _ => return None,
    })
}

/// Builds `&&` / `||`, flattening chains into one n-ary node.
fn logical(and: bool, lhs: Node, rhs: Node, pos: usize) -> R<Node> {
    match lhs.kind {
        Kind::And(mut xs) if and => {
            let depth = lhs.depth.max(rhs.depth + 1);
            if depth > MAX_DEPTH {
                return err(pos, too_deep());
            }
            xs.push(rhs);
            Ok(Node {
                kind: Kind::And(xs),
                pos: lhs.pos,
                depth,
            })
        }
        Kind::Or(mut xs) if !and => {
            let depth = lhs.depth.max(rhs.depth + 1);
            if depth > MAX_DEPTH {
                return err(pos, too_deep());
            }
            xs.push(rhs);
            Ok(Node {
                kind: Kind::Or(xs),
                pos: lhs.pos,
                depth,
            })
        }
        kind => {
            let lhs = Node { kind, ..lhs };
            if and {
                mk(Kind::And(vec![lhs, rhs]), pos)
            } else {
                mk(Kind::Or(vec![lhs, rhs]), pos)
            }
        }
    }
}

/// Resolves a call against the fixed function set; the receiver of the
/// method form becomes the first argument.
fn call(name: &str, pos: usize, receiver: Option<Node>, args: Vec<Node>) -> R<Node> {
    let method = receiver.is_some();
    let mut all: Vec<Node> = receiver.into_iter().collect();
    all.extend(args);
    let given = all.len() - usize::from(method);
    let quant = match name {
        "exists" => Some(Quant::Exists),
        "all" => Some(Quant::All),
        _ => None,
    };
    if let Some(quant) = quant {
        let want = if method { 2 } else { 3 };
        if given != want {
            return err(
                pos,
                format!(
                    "{name}() takes {want} arguments, as in {}",
                    if method {
                        format!("list.{name}(x, x > 0)")
                    } else {
                        format!("{name}(list, x, x > 0)")
                    }
                ),
            );
        }
        let mut it = all.into_iter();
        let (Some(list), Some(var), Some(body)) = (it.next(), it.next(), it.next()) else {
            return err(pos, format!("{name}() is missing arguments"));
        };
        let Kind::Ident(var_name) = var.kind else {
            return err(
                var.pos,
                format!("{name}() needs a variable name before the condition"),
            );
        };
        return mk(
            Kind::Macro {
                quant,
                list: Box::new(list),
                var: var_name,
                body: Box::new(body),
            },
            pos,
        );
    }
    let Some(func) = Func::lookup(name) else {
        return err(pos, format!("unknown function '{}'", clip(name)));
    };
    if func == Func::Has {
        if method {
            return err(pos, "has() is written has(a.b), not as a method");
        }
        if all.len() != 1 {
            return err(pos, "has() takes 1 argument");
        }
        if !matches!(
            all[0].kind,
            Kind::Ident(_) | Kind::Field(..) | Kind::Index(..)
        ) {
            return err(all[0].pos, "has() needs a path such as has(a.b)");
        }
    }
    if all.len() != func.arity() {
        let want = func.arity() - usize::from(method);
        return err(
            pos,
            format!(
                "{}() takes {want} argument{}, got {given}",
                func.name(),
                if want == 1 { "" } else { "s" }
            ),
        );
    }
    mk(Kind::Call(func, all), pos)
}

// ----------------------------------------------------------------- references

#[derive(Clone, Debug, PartialEq)]
enum Seg {
    /// A root identifier or `.name`.
    Field(String),
    /// `["name"]`
    Key(String),
    /// `[3]`
    Index(i64),
}

/// The whole path when `n` is a chain of fields and literal indices from an
/// unbound root identifier.
fn static_path(n: &Node, bound: &[&str]) -> Option<Vec<Seg>> {
    match &n.kind {
        Kind::Ident(name) if !bound.contains(&name.as_str()) => {
            Some(vec![Seg::Field(name.clone())])
        }
        Kind::Field(base, name) => {
            let mut p = static_path(base, bound)?;
            p.push(Seg::Field(name.clone()));
            Some(p)
        }
        Kind::Index(base, idx) => {
            let seg = match &idx.kind {
                Kind::Lit(Value::String(s)) => Seg::Key(s.clone()),
                Kind::Lit(Value::Number(n)) => Seg::Index(n.as_i64()?),
                _ => return None,
            };
            let mut p = static_path(base, bound)?;
            p.push(seg);
            Some(p)
        }
        _ => None,
    }
}

fn collect_refs<'a>(n: &'a Node, bound: &mut Vec<&'a str>, out: &mut Vec<Vec<Seg>>) {
    if let Some(p) = static_path(n, bound) {
        if !out.contains(&p) {
            out.push(p);
        }
        return;
    }
    match &n.kind {
        Kind::Macro {
            list, var, body, ..
        } => {
            collect_refs(list, bound, out);
            bound.push(var);
            collect_refs(body, bound, out);
            bound.pop();
        }
        kind => {
            for c in kind.children() {
                collect_refs(c, bound, out);
            }
        }
    }
}

fn path_text(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Field(name) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(name);
            }
            Seg::Key(k) => {
                s.push('[');
                s.push_str(&Value::String(k.clone()).to_string());
                s.push(']');
            }
            Seg::Index(i) => {
                s.push('[');
                s.push_str(&i.to_string());
                s.push(']');
            }
        }
    }
    s
}

fn lookup_path<'v>(ctx: &'v Value, path: &[Seg]) -> Option<&'v Value> {
    let mut v = ctx;
    for seg in path {
        v = match (seg, v) {
            (Seg::Field(k) | Seg::Key(k), Value::Object(m)) => m.get(k)?,
            (Seg::Index(i), Value::Array(a)) => a.get(usize::try_from(*i).ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

// ----------------------------------------------------------------- evaluation

/// Variables bound by macros, innermost first, over the context.
struct Scope<'s> {
    ctx: &'s Value,
    var: Option<(&'s str, &'s Value)>,
    parent: Option<&'s Scope<'s>>,
}

impl<'s> Scope<'s> {
    fn lookup(&self, name: &str) -> Cow<'s, Value> {
        let mut s = self;
        loop {
            if let Some((n, v)) = s.var {
                if n == name {
                    return Cow::Borrowed(v);
                }
            }
            match s.parent {
                Some(p) => s = p,
                None => break,
            }
        }
        match self.ctx {
            Value::Object(m) => m.get(name).map_or(Cow::Owned(Value::Null), Cow::Borrowed),
            _ => Cow::Owned(Value::Null),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Num {
    I(i64),
    F(f64),
}

fn num(v: &Value) -> Option<Num> {
    match v {
        Value::Number(n) => match n.as_i64() {
            Some(i) => Some(Num::I(i)),
            None => n.as_f64().map(Num::F),
        },
        _ => None,
    }
}

impl Num {
    fn f(self) -> f64 {
        match self {
            Num::I(i) => i as f64,
            Num::F(f) => f,
        }
    }
}

/// Exact comparison across int and double (no rounding of large ints).
fn cmp_num(a: Num, b: Num) -> Option<Ordering> {
    match (a, b) {
        (Num::I(x), Num::I(y)) => Some(x.cmp(&y)),
        (Num::F(x), Num::F(y)) => x.partial_cmp(&y),
        (Num::I(x), Num::F(y)) => cmp_int_float(x, y),
        (Num::F(x), Num::I(y)) => cmp_int_float(y, x).map(Ordering::reverse),
    }
}

fn cmp_int_float(i: i64, f: f64) -> Option<Ordering> {
    const TWO63: f64 = 9_223_372_036_854_775_808.0;
    if f.is_nan() {
        return None;
    }
    if f >= TWO63 {
        return Some(Ordering::Less);
    }
    if f < -TWO63 {
        return Some(Ordering::Greater);
    }
    let t = f.trunc();
    // In range, so the cast is exact.
    match i.cmp(&(t as i64)) {
        Ordering::Equal => 0.0f64.partial_cmp(&(f - t)),
        o => Some(o),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_i64() => "int",
        Value::Number(_) => "double",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "map",
    }
}

fn float_value(f: f64, pos: usize) -> R<Value> {
    match Number::from_f64(f) {
        Some(n) => Ok(Value::Number(n)),
        None => err(pos, "result is not a finite number"),
    }
}

fn field<'s>(base: Cow<'s, Value>, key: &str) -> Cow<'s, Value> {
    match base {
        Cow::Borrowed(Value::Object(m)) => {
            m.get(key).map_or(Cow::Owned(Value::Null), Cow::Borrowed)
        }
        Cow::Owned(Value::Object(mut m)) => Cow::Owned(m.remove(key).unwrap_or(Value::Null)),
        _ => Cow::Owned(Value::Null),
    }
}

struct Machine {
    steps: u64,
    limit: u64,
}

impl Machine {
    fn charge(&mut self, n: u64, pos: usize) -> R<()> {
        self.steps = self.steps.saturating_add(n);
        if self.steps > self.limit {
            return err(
                pos,
                format!("evaluation took more than {} steps", self.limit),
            );
        }
        Ok(())
    }

    fn tick(&mut self, pos: usize) -> R<()> {
        self.charge(1, pos)
    }

    /// Charges for scanning `bytes` of string: one step per KiB.
    fn scan(&mut self, bytes: usize, pos: usize) -> R<()> {
        self.charge((bytes / 1024) as u64, pos)
    }

    /// Takes ownership, paying for a copy of a borrowed value by its size.
    /// The copy is serde_json's recursive clone, bounded by the depth of the
    /// context (at most 128 levels when it was parsed from JSON text).
    fn own(&mut self, v: Cow<'_, Value>, pos: usize) -> R<Value> {
        match v {
            Cow::Owned(v) => Ok(v),
            Cow::Borrowed(b) => {
                let mut stack = vec![b];
                while let Some(x) = stack.pop() {
                    self.tick(pos)?;
                    match x {
                        Value::Array(a) => stack.extend(a.iter()),
                        Value::Object(m) => stack.extend(m.values()),
                        Value::String(s) => self.scan(s.len(), pos)?,
                        _ => {}
                    }
                }
                Ok(b.clone())
            }
        }
    }

    /// JSON equality with numbers compared by value; iterative, so deeply
    /// nested context values cannot exhaust the stack.
    fn equal(&mut self, a: &Value, b: &Value, pos: usize) -> R<bool> {
        let mut stack = vec![(a, b)];
        while let Some((x, y)) = stack.pop() {
            self.tick(pos)?;
            let same = match (x, y) {
                (Value::Null, Value::Null) => true,
                (Value::Bool(p), Value::Bool(q)) => p == q,
                (Value::Number(_), Value::Number(_)) => match (num(x), num(y)) {
                    (Some(p), Some(q)) => cmp_num(p, q) == Some(Ordering::Equal),
                    _ => false,
                },
                (Value::String(p), Value::String(q)) => {
                    self.scan(p.len().min(q.len()), pos)?;
                    p == q
                }
                (Value::Array(p), Value::Array(q)) if p.len() == q.len() => {
                    stack.extend(p.iter().zip(q.iter()));
                    true
                }
                (Value::Object(p), Value::Object(q)) if p.len() == q.len() => {
                    let mut all = true;
                    for (k, v) in p {
                        match q.get(k) {
                            Some(w) => stack.push((v, w)),
                            None => {
                                all = false;
                                break;
                            }
                        }
                    }
                    all
                }
                _ => false,
            };
            if !same {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Kept a thin dispatcher: each arm lives in its own function so the
    /// frame that recurses once per tree level stays small.
    fn eval<'s>(&mut self, n: &'s Node, sc: &Scope<'s>) -> R<Cow<'s, Value>> {
        self.tick(n.pos)?;
        match &n.kind {
            Kind::Lit(v) => Ok(Cow::Borrowed(v)),
            Kind::Ident(name) => Ok(sc.lookup(name)),
            Kind::Field(base, name) => Ok(field(self.eval(base, sc)?, name)),
            Kind::Index(base, idx) => self.eval_index(base, idx, n.pos, sc),
            Kind::List(items) => self.eval_list(items, n.pos, sc),
            Kind::Map(entries) => self.eval_map(entries, sc),
            Kind::Not(x) => self.eval_not(x, n.pos, sc),
            Kind::Neg(x) => self.eval_neg(x, n.pos, sc),
            Kind::And(xs) => self.eval_logical(true, xs, sc),
            Kind::Or(xs) => self.eval_logical(false, xs, sc),
            Kind::Cond(c, a, b) => self.eval_cond(c, a, b, n.pos, sc),
            Kind::Binary(op, a, b) => self.eval_binary(*op, a, b, n.pos, sc),
            Kind::Call(f, args) => self.eval_call(*f, args, n.pos, sc),
            Kind::Macro {
                quant,
                list,
                var,
                body,
            } => self.eval_macro(*quant, list, var, body, n.pos, sc),
        }
    }

    fn eval_index<'s>(
        &mut self,
        base: &'s Node,
        idx: &'s Node,
        pos: usize,
        sc: &Scope<'s>,
    ) -> R<Cow<'s, Value>> {
        let b = self.eval(base, sc)?;
        let i = self.eval(idx, sc)?;
        index(b, &i, pos)
    }

    fn eval_list<'s>(
        &mut self,
        items: &'s [Node],
        pos: usize,
        sc: &Scope<'s>,
    ) -> R<Cow<'s, Value>> {
        if items.len() > MAX_LIST_LEN {
            return err(pos, list_too_long());
        }
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            let v = self.eval(it, sc)?;
            out.push(self.own(v, it.pos)?);
        }
        Ok(Cow::Owned(Value::Array(out)))
    }

    fn eval_map<'s>(&mut self, entries: &'s [(Node, Node)], sc: &Scope<'s>) -> R<Cow<'s, Value>> {
        let mut out = Map::new();
        for (k, v) in entries {
            let key = match self.eval(k, sc)?.into_owned() {
                Value::String(s) => s,
                other => {
                    return err(
                        k.pos,
                        format!("map keys must be strings, got {}", type_name(&other)),
                    )
                }
            };
            if out.contains_key(&key) {
                return err(k.pos, format!("duplicate map key '{}'", clip(&key)));
            }
            let value = self.eval(v, sc)?;
            let value = self.own(value, v.pos)?;
            out.insert(key, value);
        }
        Ok(Cow::Owned(Value::Object(out)))
    }

    fn eval_not<'s>(&mut self, x: &'s Node, pos: usize, sc: &Scope<'s>) -> R<Cow<'s, Value>> {
        let v = self.eval(x, sc)?;
        match &*v {
            Value::Bool(b) => Ok(Cow::Owned(Value::Bool(!b))),
            other => err(pos, format!("'!' needs a bool, got {}", type_name(other))),
        }
    }

    fn eval_neg<'s>(&mut self, x: &'s Node, pos: usize, sc: &Scope<'s>) -> R<Cow<'s, Value>> {
        let v = self.eval(x, sc)?;
        match num(&v) {
            Some(Num::I(i)) => match i.checked_neg() {
                Some(r) => Ok(Cow::Owned(Value::from(r))),
                None => err(pos, "integer overflow"),
            },
            Some(Num::F(f)) => Ok(Cow::Owned(float_value(-f, pos)?)),
            None => err(pos, format!("'-' needs a number, got {}", type_name(&v))),
        }
    }

    fn eval_logical<'s>(&mut self, and: bool, xs: &'s [Node], sc: &Scope<'s>) -> R<Cow<'s, Value>> {
        for x in xs {
            let v = self.eval(x, sc)?;
            match &*v {
                Value::Bool(b) if *b != and => return Ok(Cow::Owned(Value::Bool(*b))),
                Value::Bool(_) => {}
                other => {
                    return err(
                        x.pos,
                        format!(
                            "'{}' needs bools, got {}",
                            if and { "&&" } else { "||" },
                            type_name(other)
                        ),
                    )
                }
            }
        }
        Ok(Cow::Owned(Value::Bool(and)))
    }

    fn eval_cond<'s>(
        &mut self,
        c: &'s Node,
        a: &'s Node,
        b: &'s Node,
        pos: usize,
        sc: &Scope<'s>,
    ) -> R<Cow<'s, Value>> {
        let v = self.eval(c, sc)?;
        match &*v {
            Value::Bool(true) => self.eval(a, sc),
            Value::Bool(false) => self.eval(b, sc),
            other => err(
                pos,
                format!(
                    "the condition of '?' must be a bool, got {}",
                    type_name(other)
                ),
            ),
        }
    }

    fn eval_binary<'s>(
        &mut self,
        op: BinOp,
        a: &'s Node,
        b: &'s Node,
        pos: usize,
        sc: &Scope<'s>,
    ) -> R<Cow<'s, Value>> {
        let a = self.eval(a, sc)?;
        let b = self.eval(b, sc)?;
        Ok(Cow::Owned(self.binary(op, a, b, pos)?))
    }

    fn eval_call<'s>(
        &mut self,
        f: Func,
        args: &'s [Node],
        pos: usize,
        sc: &Scope<'s>,
    ) -> R<Cow<'s, Value>> {
        let mut vals = Vec::with_capacity(args.len());
        for a in args {
            vals.push(self.eval(a, sc)?);
        }
        Ok(Cow::Owned(self.call(f, &vals, pos)?))
    }

    fn eval_macro<'s>(
        &mut self,
        quant: Quant,
        list: &'s Node,
        var: &'s str,
        body: &'s Node,
        pos: usize,
        sc: &Scope<'s>,
    ) -> R<Cow<'s, Value>> {
        let l = self.eval(list, sc)?;
        let keys: Vec<Value>;
        let items: Vec<&Value> = match &*l {
            Value::Array(a) => a.iter().collect(),
            Value::Object(m) => {
                self.charge(m.len() as u64, pos)?;
                keys = m.keys().map(|k| Value::String(k.clone())).collect();
                keys.iter().collect()
            }
            other => {
                return err(
                    pos,
                    format!(
                        "{}() needs a list or a map, got {}",
                        quant.name(),
                        type_name(other)
                    ),
                )
            }
        };
        let want = quant == Quant::Exists;
        for item in items {
            self.tick(pos)?;
            let inner = Scope {
                ctx: sc.ctx,
                var: Some((var, item)),
                parent: Some(sc),
            };
            match &*self.eval(body, &inner)? {
                Value::Bool(b) if *b == want => return Ok(Cow::Owned(Value::Bool(want))),
                Value::Bool(_) => {}
                other => {
                    return err(
                        body.pos,
                        format!(
                            "the condition of {}() must be a bool, got {}",
                            quant.name(),
                            type_name(other)
                        ),
                    )
                }
            }
        }
        Ok(Cow::Owned(Value::Bool(!want)))
    }
    fn binary(&mut self, op: BinOp, a: Cow<'_, Value>, b: Cow<'_, Value>, pos: usize) -> R<Value> {
        let mismatch = |what: &str| -> R<Value> {
            err(
                pos,
                format!(
                    "'{}' needs {what}, got {} and {}",
                    op.symbol(),
                    type_name(&a),
                    type_name(&b)
                ),
            )
        };
        match op {
            BinOp::Eq => Ok(Value::Bool(self.equal(&a, &b, pos)?)),
            BinOp::Ne => Ok(Value::Bool(!self.equal(&a, &b, pos)?)),
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                let ord = match (&*a, &*b) {
                    (Value::String(x), Value::String(y)) => {
                        self.scan(x.len().min(y.len()), pos)?;
                        Some(x.cmp(y))
                    }
                    (x, y) => match (num(x), num(y)) {
                        (Some(p), Some(q)) => cmp_num(p, q),
                        _ => None,
                    },
                };
                let Some(ord) = ord else {
                    return mismatch("two numbers or two strings");
                };
                Ok(Value::Bool(match op {
                    BinOp::Lt => ord == Ordering::Less,
                    BinOp::Le => ord != Ordering::Greater,
                    BinOp::Gt => ord == Ordering::Greater,
                    _ => ord != Ordering::Less,
                }))
            }
            BinOp::In => match (&*a, &*b) {
                (_, Value::Array(items)) => {
                    for item in items {
                        if self.equal(&a, item, pos)? {
                            return Ok(Value::Bool(true));
                        }
                    }
                    Ok(Value::Bool(false))
                }
                (Value::String(k), Value::Object(m)) => Ok(Value::Bool(m.contains_key(k))),
                (Value::String(needle), Value::String(hay)) => {
                    self.scan(hay.len(), pos)?;
                    Ok(Value::Bool(hay.contains(needle.as_str())))
                }
                _ => mismatch("a list, a map with a string key, or two strings"),
            },
            BinOp::Add => match (&*a, &*b) {
                (Value::String(x), Value::String(y)) => {
                    let len = x.len() + y.len();
                    if len > MAX_STRING_LEN {
                        return err(pos, string_too_long(len));
                    }
                    self.scan(len, pos)?;
                    let mut s = String::with_capacity(len);
                    s.push_str(x);
                    s.push_str(y);
                    Ok(Value::String(s))
                }
                (Value::Array(x), Value::Array(y)) => {
                    if x.len() + y.len() > MAX_LIST_LEN {
                        return err(pos, list_too_long());
                    }
                    let Value::Array(mut left) = self.own(a, pos)? else {
                        return err(pos, "internal error: list changed type");
                    };
                    let Value::Array(right) = self.own(b, pos)? else {
                        return err(pos, "internal error: list changed type");
                    };
                    left.extend(right);
                    Ok(Value::Array(left))
                }
                (x, y) => match (num(x), num(y)) {
                    (Some(p), Some(q)) => arith(op, p, q, pos),
                    _ => mismatch("two numbers, two strings or two lists"),
                },
            },
            BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => match (num(&a), num(&b)) {
                (Some(p), Some(q)) => arith(op, p, q, pos),
                _ => mismatch("two numbers"),
            },
        }
    }

    fn call(&mut self, f: Func, vals: &[Cow<'_, Value>], pos: usize) -> R<Value> {
        let a: &Value = vals.first().map_or(&Value::Null, |v| v);
        let b: &Value = vals.get(1).map_or(&Value::Null, |v| v);
        let wrong = |want: &str| -> R<Value> {
            let got: Vec<&str> = vals.iter().map(|v| type_name(v)).collect();
            err(
                pos,
                format!("{}() needs {want}, got {}", f.name(), got.join(" and ")),
            )
        };
        match f {
            Func::Size => match a {
                Value::String(s) => {
                    self.scan(s.len(), pos)?;
                    Ok(Value::from(s.chars().count()))
                }
                Value::Array(x) => Ok(Value::from(x.len())),
                Value::Object(m) => Ok(Value::from(m.len())),
                _ => wrong("a string, a list or a map"),
            },
            Func::Has => Ok(Value::Bool(!a.is_null())),
            Func::StartsWith | Func::EndsWith | Func::Contains | Func::Matches => {
                let (Value::String(s), Value::String(t)) = (a, b) else {
                    return wrong("strings");
                };
                Ok(Value::Bool(match f {
                    Func::StartsWith => {
                        self.scan(t.len(), pos)?;
                        s.starts_with(t.as_str())
                    }
                    Func::EndsWith => {
                        self.scan(t.len(), pos)?;
                        s.ends_with(t.as_str())
                    }
                    Func::Contains => {
                        self.scan(s.len(), pos)?;
                        s.contains(t.as_str())
                    }
                    _ => self.glob(s, t, pos)?,
                }))
            }
            Func::Int => match a {
                Value::String(s) => {
                    self.scan(s.len(), pos)?;
                    match s.parse::<i64>() {
                        Ok(i) => Ok(Value::from(i)),
                        Err(_) => err(pos, format!("cannot convert '{}' to int", clip(s))),
                    }
                }
                _ => match num(a) {
                    Some(Num::I(i)) => Ok(Value::from(i)),
                    Some(Num::F(x)) => {
                        const TWO63: f64 = 9_223_372_036_854_775_808.0;
                        if x.is_finite() && (-TWO63..TWO63).contains(&x) {
                            Ok(Value::from(x.trunc() as i64))
                        } else {
                            err(pos, format!("{x} is out of range for int"))
                        }
                    }
                    None => wrong("a number or a string"),
                },
            },
            Func::Double => match a {
                Value::String(s) => {
                    self.scan(s.len(), pos)?;
                    match s.parse::<f64>() {
                        Ok(x) if x.is_finite() => float_value(x, pos),
                        _ => err(pos, format!("cannot convert '{}' to double", clip(s))),
                    }
                }
                _ => match num(a) {
                    Some(n) => float_value(n.f(), pos),
                    None => wrong("a number or a string"),
                },
            },
            Func::String => match a {
                Value::String(s) => {
                    if s.len() > MAX_STRING_LEN {
                        return err(pos, string_too_long(s.len()));
                    }
                    self.scan(s.len(), pos)?;
                    Ok(Value::String(s.clone()))
                }
                Value::Null | Value::Bool(_) | Value::Number(_) => Ok(Value::String(a.to_string())),
                _ => wrong("a scalar"),
            },
            Func::Lower | Func::Upper => {
                let Value::String(s) = a else {
                    return wrong("a string");
                };
                self.scan(s.len(), pos)?;
                let out = if f == Func::Lower {
                    s.to_lowercase()
                } else {
                    s.to_uppercase()
                };
                if out.len() > MAX_STRING_LEN {
                    return err(pos, string_too_long(out.len()));
                }
                Ok(Value::String(out))
            }
        }
    }

    /// Glob match with `*` (any run of characters) and `?` (one character);
    /// greedy with backtracking to the last star, so at worst O(n·m) steps,
    /// which are charged.
    fn glob(&mut self, text: &str, pattern: &str, pos: usize) -> R<bool> {
        self.scan(text.len() + pattern.len(), pos)?;
        let t: Vec<char> = text.chars().collect();
        let p: Vec<char> = pattern.chars().collect();
        let (mut ti, mut pi) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        let mut iterations = 0u64;
        while ti < t.len() {
            iterations += 1;
            if iterations.is_multiple_of(256) {
                self.tick(pos)?;
            }
            if p.get(pi) == Some(&'*') {
                star = Some((pi, ti));
                pi += 1;
            } else if p.get(pi).is_some_and(|&c| c == '?' || c == t[ti]) {
                ti += 1;
                pi += 1;
            } else if let Some((sp, mark)) = star {
                pi = sp + 1;
                ti = mark + 1;
                star = Some((sp, mark + 1));
            } else {
                return Ok(false);
            }
        }
        while p.get(pi) == Some(&'*') {
            pi += 1;
        }
        Ok(pi == p.len())
    }
}

fn index<'s>(base: Cow<'s, Value>, idx: &Value, pos: usize) -> R<Cow<'s, Value>> {
    match idx {
        Value::String(k) => Ok(field(base, k)),
        Value::Number(_) => {
            let Some(Num::I(i)) = num(idx) else {
                return err(pos, "a list index must be an integer");
            };
            let Ok(i) = usize::try_from(i) else {
                return Ok(Cow::Owned(Value::Null));
            };
            Ok(match base {
                Cow::Borrowed(Value::Array(a)) => {
                    a.get(i).map_or(Cow::Owned(Value::Null), Cow::Borrowed)
                }
                Cow::Owned(Value::Array(mut a)) if i < a.len() => Cow::Owned(a.swap_remove(i)),
                _ => Cow::Owned(Value::Null),
            })
        }
        other => err(
            pos,
            format!(
                "an index must be an int or a string, got {}",
                type_name(other)
            ),
        ),
    }
}

fn arith(op: BinOp, a: Num, b: Num, pos: usize) -> R<Value> {
    if let (Num::I(x), Num::I(y)) = (a, b) {
        if y == 0 && matches!(op, BinOp::Div | BinOp::Rem) {
            return err(pos, "division by zero");
        }
        let r = match op {
            BinOp::Add => x.checked_add(y),
            BinOp::Sub => x.checked_sub(y),
            BinOp::Mul => x.checked_mul(y),
            BinOp::Div => x.checked_div(y),
            _ => x.checked_rem(y),
        };
        return match r {
            Some(r) => Ok(Value::from(r)),
            None => err(pos, "integer overflow"),
        };
    }
    let (x, y) = (a.f(), b.f());
    let r = match op {
        BinOp::Add => x + y,
        BinOp::Sub => x - y,
        BinOp::Mul => x * y,
        BinOp::Div if y == 0.0 => return err(pos, "division by zero"),
        BinOp::Div => x / y,
        _ => return err(pos, "'%' needs two ints"),
    };
    float_value(r, pos)
}

fn string_too_long(len: usize) -> String {
    format!("string of {len} bytes is longer than the limit of {MAX_STRING_LEN}")
}

fn list_too_long() -> String {
    format!("list is longer than the limit of {MAX_LIST_LEN} items")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Value {
        json!({
            "steps": {
                "scan": {"output": {"critical": 0, "high": 3, "name": "Scan-Report.TXT"}},
                "licence": {"output": {"ok": true}}
            },
            "event": {"type": "job.dead", "data": {"queue": "emails", "attempts": 5, "ratio": 0.5}},
            "nums": [1, 2, 3],
            "items": [{"sev": 1}, {"sev": 5}],
            "big": i64::MAX,
            "s": "hello"
        })
    }

    fn ev(src: &str) -> Result<Value, ExprError> {
        Expr::parse(src)?.eval(&ctx())
    }

    fn check_values(cases: &[(&str, Value)]) {
        for (src, want) in cases {
            match ev(src) {
                Ok(got) => assert_eq!(&got, want, "{src}"),
                Err(e) => panic!("{src}: unexpected error {e}"),
            }
        }
    }

    fn check_errors(cases: &[(&str, &str)]) {
        for (src, want) in cases {
            match ev(src) {
                Ok(v) => panic!("{src}: expected an error containing {want:?}, got {v}"),
                Err(e) => assert!(
                    e.message.contains(want),
                    "{src}: error {e:?} does not contain {want:?}"
                ),
            }
        }
    }

    #[test]
    fn literals() {
        check_values(&[
            ("null", Value::Null),
            ("true", json!(true)),
            ("false", json!(false)),
            ("42", json!(42)),
            ("-7", json!(-7)),
            ("1.5", json!(1.5)),
            ("1e3", json!(1000.0)),
            ("2.5E-1", json!(0.25)),
            ("-9223372036854775808", json!(i64::MIN)),
            (r#""a\nb\tc""#, json!("a\nb\tc")),
            (r#"'it\'s'"#, json!("it's")),
            (r#""say \"hi\"""#, json!("say \"hi\"")),
            (r#"'back\\slash'"#, json!("back\\slash")),
            (r#""caf\u00e9""#, json!("café")),
            (r#""\uD83D\uDE00""#, json!("😀")),
            (
                "'double \" inside single'",
                json!("double \" inside single"),
            ),
            ("[1, 'a', null, [true]]", json!([1, "a", null, [true]])),
            ("[1, 2,]", json!([1, 2])),
            ("[]", json!([])),
            (
                r#"{"k": 1, 'j': [2], "n": {"x": null}}"#,
                json!({"k": 1, "j": [2], "n": {"x": null}}),
            ),
            ("{}", json!({})),
        ]);
    }

    #[test]
    fn paths_and_missing_values() {
        check_values(&[
            ("steps.scan.output.critical", json!(0)),
            ("steps.scan.output.missing", Value::Null),
            ("steps.x.output.missing == null", json!(true)),
            ("missing", Value::Null),
            ("missing.deeper.still", Value::Null),
            ("nums[0]", json!(1)),
            ("nums[2]", json!(3)),
            ("nums[3]", Value::Null),
            ("nums[-1]", Value::Null),
            ("nums['x']", Value::Null),
            ("nums.x", Value::Null),
            ("s.x", Value::Null),
            ("big.x", Value::Null),
            (r#"steps["scan"].output.high"#, json!(3)),
            ("items[1].sev", json!(5)),
            ("items[1]['sev']", json!(5)),
            ("[10, 20][1]", json!(20)),
            (r#"{"a": 1}.a"#, json!(1)),
            (r#"{"a": 1}["b"]"#, Value::Null),
            (
                "event.data",
                json!({"queue": "emails", "attempts": 5, "ratio": 0.5}),
            ),
        ]);
        // Roots resolve to null when the context is not a map.
        let e = Expr::parse("a.b == null").unwrap();
        assert!(e.eval_bool(&json!([1, 2])).unwrap());
        assert!(e.eval_bool(&Value::Null).unwrap());
    }

    #[test]
    fn operators() {
        check_values(&[
            ("1 + 2", json!(3)),
            ("1 + 2.5", json!(3.5)),
            ("'a' + 'b'", json!("ab")),
            ("[1] + [2, 3]", json!([1, 2, 3])),
            ("nums + nums", json!([1, 2, 3, 1, 2, 3])),
            ("5 - 7", json!(-2)),
            ("0.5 - 1", json!(-0.5)),
            ("3 * 4", json!(12)),
            ("1.5 * 2", json!(3.0)),
            ("7 / 2", json!(3)),
            ("-7 / 2", json!(-3)),
            ("7.0 / 2", json!(3.5)),
            ("7 % 3", json!(1)),
            ("-7 % 3", json!(-1)),
            ("-(3)", json!(-3)),
            ("-event.data.ratio", json!(-0.5)),
            ("- -3", json!(3)),
            ("!true", json!(false)),
            ("!!true", json!(true)),
            ("1 == 1", json!(true)),
            ("1 == 1.0", json!(true)),
            ("1 == 2", json!(false)),
            ("1 != 2", json!(true)),
            ("1 != 1.0", json!(false)),
            ("'a' == 'a'", json!(true)),
            ("'a' == 1", json!(false)),
            ("null == false", json!(false)),
            ("null == null", json!(true)),
            ("[1, {'a': 2}] == [1.0, {'a': 2}]", json!(true)),
            ("[1, 2] == [2, 1]", json!(false)),
            ("{'a': 1} == {'a': 1, 'b': 2}", json!(false)),
            ("{'a': 1, 'b': 2} == {'b': 2, 'a': 1}", json!(true)),
            (
                "event.data == {'queue': 'emails', 'attempts': 5, 'ratio': 0.5}",
                json!(true),
            ),
            ("1 < 2", json!(true)),
            ("2 < 2", json!(false)),
            ("2 <= 2", json!(true)),
            ("3 > 2.5", json!(true)),
            ("2.5 >= 3", json!(false)),
            ("3 >= 3.0", json!(true)),
            ("'abc' < 'abd'", json!(true)),
            ("'b' > 'abc'", json!(true)),
            // Exact int/double comparison: 9223372036854775807.0 is 2^63.
            ("big == 9223372036854775807.0", json!(false)),
            ("big < 9223372036854775807.0", json!(true)),
            ("2 in [1, 2]", json!(true)),
            ("2.0 in [1, 2]", json!(true)),
            ("'x' in ['a']", json!(false)),
            ("[1] in [[1], [2]]", json!(true)),
            ("'queue' in event.data", json!(true)),
            ("'nope' in event.data", json!(false)),
            ("'ell' in s", json!(true)),
            ("'lle' in s", json!(false)),
            (
                "event.type == 'job.dead' && event.data.queue in ['emails', 'billing']",
                json!(true),
            ),
            ("true ? 1 : 2", json!(1)),
            ("false ? 1 : 2", json!(2)),
            ("1 < 2 ? 'a' : 'b'", json!("a")),
            ("false ? 1 : true ? 2 : 3", json!(2)),
            ("true && true && false", json!(false)),
            ("true && true && true", json!(true)),
            ("false || false || true", json!(true)),
            ("false || false", json!(false)),
        ]);
    }

    #[test]
    fn precedence() {
        check_values(&[
            ("1 + 2 * 3", json!(7)),
            ("(1 + 2) * 3", json!(9)),
            ("10 - 4 - 3", json!(3)),
            ("100 / 10 / 5", json!(2)),
            ("2 * 3 % 4", json!(2)),
            ("-1 + 2", json!(1)),
            ("-nums[1]", json!(-2)),
            ("true || false && false", json!(true)),
            ("(true || false) && false", json!(false)),
            ("!true && false", json!(false)),
            ("!(true && false)", json!(true)),
            ("1 + 2 == 3", json!(true)),
            ("1 < 2 == true", json!(true)),
            ("2 in [1, 2] == true", json!(true)),
            ("true ? 1 : 2 + 10", json!(1)),
            ("false ? 1 : 2 + 10", json!(12)),
            ("1 + 2 > 2 && 3 % 2 == 1", json!(true)),
            ("false && true || true", json!(true)),
            ("s.size() + 1", json!(6)),
            ("'a' + 'b' in ['ab']", json!(true)),
        ]);
    }

    #[test]
    fn short_circuit() {
        check_values(&[
            ("false && (1/0 == 1)", json!(false)),
            ("true || (1/0 == 1)", json!(true)),
            ("false && 'not a bool'", json!(false)),
            ("true ? 2 : 1/0", json!(2)),
            ("false ? 1/0 : 2", json!(2)),
            ("[1, 0].exists(x, 10 / x == 10)", json!(true)),
            ("[0, 1].all(x, x == 1 && 1 / x == 1)", json!(false)),
        ]);
        check_errors(&[
            ("true && (1/0 == 1)", "division by zero"),
            ("[0, 1].exists(x, 10 / x == 10)", "division by zero"),
        ]);
    }

    #[test]
    fn functions() {
        check_values(&[
            ("size('héllo')", json!(5)),
            ("size(nums)", json!(3)),
            ("size(event.data)", json!(3)),
            ("s.size()", json!(5)),
            ("size([])", json!(0)),
            ("has(steps.scan.output.critical)", json!(true)),
            ("has(steps.scan.output.nope)", json!(false)),
            ("has(steps.nope.output)", json!(false)),
            ("has(nums[1])", json!(true)),
            ("has(nums[9])", json!(false)),
            ("has(missing)", json!(false)),
            ("s.startsWith('he')", json!(true)),
            ("s.startsWith('lo')", json!(false)),
            ("startsWith(s, 'h')", json!(true)),
            ("s.endsWith('lo')", json!(true)),
            ("s.endsWith('he')", json!(false)),
            ("s.contains('ll')", json!(true)),
            ("s.contains('x')", json!(false)),
            ("steps.scan.output.name.matches('Scan-*.TXT')", json!(true)),
            ("steps.scan.output.name.matches('scan-*')", json!(false)),
            ("'abc'.matches('a?c')", json!(true)),
            ("'abc'.matches('a?')", json!(false)),
            ("'abc'.matches('a*')", json!(true)),
            ("'abc'.matches('b*')", json!(false)),
            ("'aXbXc'.matches('*X*X*')", json!(true)),
            ("'aXbc'.matches('*X*X*')", json!(false)),
            ("'abcabd'.matches('*abd')", json!(true)),
            ("''.matches('*')", json!(true)),
            ("'a'.matches('')", json!(false)),
            ("'é'.matches('?')", json!(true)),
            ("'a.b'.matches('a?b')", json!(true)),
            ("'x'.matches('**?**')", json!(true)),
            ("int('42')", json!(42)),
            ("int('-3')", json!(-3)),
            ("int(3.9)", json!(3)),
            ("int(-3.9)", json!(-3)),
            ("int(5)", json!(5)),
            ("double(2)", json!(2.0)),
            ("double('2.5')", json!(2.5)),
            ("double(2) == 2", json!(true)),
            ("string(12)", json!("12")),
            ("string(-1.5)", json!("-1.5")),
            ("string(true)", json!("true")),
            ("string(null)", json!("null")),
            ("string('x')", json!("x")),
            ("'n=' + string(size(nums))", json!("n=3")),
            ("lower('AbC')", json!("abc")),
            ("upper('AbC')", json!("ABC")),
            ("'AbC'.upper()", json!("ABC")),
            ("steps.scan.output.name.lower()", json!("scan-report.txt")),
            ("nums.exists(x, x > 2)", json!(true)),
            ("nums.exists(x, x > 3)", json!(false)),
            ("nums.all(x, x > 0)", json!(true)),
            ("nums.all(x, x > 1)", json!(false)),
            ("exists(items, i, i.sev > 3)", json!(true)),
            ("all(items, i, i.sev > 3)", json!(false)),
            ("[].all(x, false)", json!(true)),
            ("[].exists(x, true)", json!(false)),
            ("event.data.exists(k, k == 'queue')", json!(true)),
            ("event.data.all(k, size(k) > 3)", json!(true)),
            ("nums.exists(x, nums.exists(y, x + y == 6))", json!(true)),
            ("nums.exists(x, nums.exists(y, x + y == 7))", json!(false)),
            // A macro variable shadows a root of the same name, only inside.
            ("nums.exists(s, s == 3) && s == 'hello'", json!(true)),
            ("nums.exists(x, true) && x == null", json!(true)),
            ("items.exists(i, has(i.sev) && i.sev == 5)", json!(true)),
        ]);
    }

    #[test]
    fn type_and_arithmetic_errors() {
        check_errors(&[
            ("1 && true", "'&&' needs bools, got int"),
            ("false || 'x'", "'||' needs bools, got string"),
            ("!1", "'!' needs a bool, got int"),
            ("-'a'", "'-' needs a number, got string"),
            ("1 ? 2 : 3", "the condition of '?' must be a bool"),
            (
                "1 < 'a'",
                "'<' needs two numbers or two strings, got int and string",
            ),
            ("null < 1", "'<' needs two numbers or two strings"),
            ("[1] <= [2]", "'<=' needs"),
            ("true > false", "'>' needs"),
            ("s >= 1", "'>=' needs"),
            (
                "1 + 'a'",
                "'+' needs two numbers, two strings or two lists, got int and string",
            ),
            ("[1] + 'a'", "'+' needs"),
            ("null + 1", "'+' needs"),
            ("'a' - 'b'", "'-' needs two numbers, got string and string"),
            ("'a' * 2", "'*' needs two numbers"),
            ("big + 1", "integer overflow"),
            ("-9223372036854775808 - 1", "integer overflow"),
            ("big * 2", "integer overflow"),
            ("-(-9223372036854775807 - 1)", "integer overflow"),
            ("-9223372036854775808 / -1", "integer overflow"),
            ("-9223372036854775808 % -1", "integer overflow"),
            ("1 / 0", "division by zero"),
            ("1 % 0", "division by zero"),
            ("1.0 / 0", "division by zero"),
            ("1 / 0.0", "division by zero"),
            ("1.5 % 1", "'%' needs two ints"),
            ("1e308 * 10", "not a finite number"),
            ("1 in 2", "'in' needs"),
            ("1 in {'a': 1}", "'in' needs"),
            ("1 in 'abc'", "'in' needs"),
            ("nums[1.5]", "a list index must be an integer"),
            (
                "nums[true]",
                "an index must be an int or a string, got bool",
            ),
            ("nums[null]", "an index must be an int or a string"),
            ("size(1)", "size() needs a string, a list or a map, got int"),
            ("size(null)", "size() needs"),
            (
                "s.startsWith(1)",
                "startsWith() needs strings, got string and int",
            ),
            ("nums.contains(1)", "contains() needs strings"),
            ("s.matches(1)", "matches() needs strings"),
            ("int('x')", "cannot convert 'x' to int"),
            ("int('1.5')", "cannot convert"),
            ("int(1e300)", "out of range for int"),
            ("int(null)", "int() needs a number or a string"),
            ("double('nan')", "cannot convert 'nan' to double"),
            ("double('abc')", "cannot convert"),
            ("double([])", "double() needs"),
            ("string([1])", "string() needs a scalar, got list"),
            ("lower(1)", "lower() needs a string"),
            (
                "nums.exists(x, 1)",
                "the condition of exists() must be a bool, got int",
            ),
            ("nums.all(x, null)", "the condition of all() must be a bool"),
            (
                "exists(1, x, true)",
                "exists() needs a list or a map, got int",
            ),
            ("{1: 2}", "map keys must be strings, got int"),
            ("{'a': 1, 'a': 2}", "duplicate map key 'a'"),
        ]);
        let e = ev("1 + 'a'").unwrap_err();
        assert_eq!(e.pos, 2);
        assert_eq!(e.to_string(), format!("{} at 2", e.message));
        assert_eq!(ev("true && nums[0] / 0 == 1").unwrap_err().pos, 16);
        let e = Expr::parse("1 + 1").unwrap().eval_bool(&ctx()).unwrap_err();
        assert!(e.message.contains("must yield a boolean, got int"), "{e}");
        assert!(
            Expr::parse("steps.scan.output.critical == 0 && steps.licence.output.ok")
                .unwrap()
                .eval_bool(&ctx())
                .unwrap()
        );
    }

    #[test]
    fn parse_errors() {
        let cases: &[(&str, &str, usize)] = &[
            ("(1 + 2", "expected ')', found end of input", 6),
            ("(1 + 2,", "expected ')', found ','", 6),
            ("1 +", "unexpected end of input", 3),
            ("", "unexpected end of input", 0),
            ("a = 1", "use '=='", 2),
            ("a & b", "use '&&'", 2),
            ("a | b", "use '||'", 2),
            ("foo(1)", "unknown function 'foo'", 0),
            ("s.foo()", "unknown function 'foo'", 2),
            ("size(1, 2)", "size() takes 1 argument, got 2", 0),
            ("s.startsWith()", "startsWith() takes 1 argument, got 0", 2),
            ("startsWith(s)", "startsWith() takes 2 arguments, got 1", 0),
            ("has(1)", "has() needs a path", 4),
            ("has(a.b, c)", "has() takes 1 argument", 0),
            ("s.has()", "not as a method", 2),
            ("nums.exists(1, true)", "needs a variable name", 12),
            ("nums.exists(x.y, true)", "needs a variable name", 14),
            ("nums.exists(x)", "exists() takes 2 arguments", 5),
            ("exists(nums, x)", "exists() takes 3 arguments", 0),
            ("all(nums, x, true, 1)", "all() takes 3 arguments", 0),
            ("'abc", "unterminated string", 0),
            ("'abc\\", "unterminated string", 0),
            (r#"x + "\q""#, "unknown escape '\\q'", 5),
            (r#""\u12""#, "invalid unicode escape", 1),
            (r#""\uD800""#, "invalid unicode escape", 1),
            (r#""\uD800\u0041""#, "invalid unicode escape", 1),
            ("99999999999999999999", "out of range", 0),
            ("9223372036854775808", "integer is out of range", 0),
            ("1e999", "out of range", 0),
            ("a.1", "expected a field name after '.', found number", 2),
            (
                "a.",
                "expected a field name after '.', found end of input",
                2,
            ),
            ("1 2", "unexpected number", 2),
            ("a b", "unexpected 'b'", 2),
            ("#", "unexpected character '#'", 0),
            ("a + é", "unexpected character 'é'", 4),
            ("[1, 2", "expected ',', found end of input", 5),
            ("{'a' 1}", "expected ':', found number", 5),
            ("in", "unexpected 'in'", 0),
            ("true ? 1", "expected ':', found end of input", 8),
            ("nums[1", "expected ']'", 6),
            (")", "unexpected ')'", 0),
        ];
        for (src, want, pos) in cases {
            match Expr::parse(src) {
                Ok(e) => panic!("{src}: parsed as {e:?}"),
                Err(e) => {
                    assert!(e.message.contains(want), "{src}: {e:?} lacks {want:?}");
                    assert_eq!(e.pos, *pos, "{src}: {e:?}");
                }
            }
        }
        assert_eq!(
            Expr::parse("(1 + 2").unwrap_err().to_string(),
            "expected ')', found end of input at 6"
        );
        // Keywords are fine as field names.
        assert_eq!(
            Expr::parse("a.in.null.true")
                .unwrap()
                .eval(&json!({"a": {"in": {"null": {"true": 1}}}})),
            Ok(json!(1))
        );
    }

    fn depth_error(src: &str) {
        match Expr::parse(src) {
            Ok(_) => panic!("parsed a {} byte expression nested too deeply", src.len()),
            Err(e) => assert!(
                e.message.contains("nested too deeply") || e.message.contains("the limit is 4096"),
                "{e}"
            ),
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let n = 10_000;
        depth_error(&format!("{}1{}", "(".repeat(n), ")".repeat(n)));
        depth_error(&"(".repeat(n));
        depth_error(&format!("{}true", "!".repeat(n)));
        depth_error(&"!".repeat(n));
        // Within the length limit, so the depth limit is what stops them.
        for src in [
            format!("{}1{}", "(".repeat(2000), ")".repeat(2000)),
            "(".repeat(4000),
            "[".repeat(4000),
            "{'a':".repeat(800),
            format!("{}true", "!".repeat(4000)),
            format!("{}1", "-".repeat(4000)),
            format!("a{}", ".b".repeat(2000)),
            format!("a{}", "[0]".repeat(1300)),
            format!("1{}", "+1".repeat(2000)),
            format!("true{}", " ? 1 : true".repeat(300)),
            format!("{}1", "size(".repeat(800)),
            format!("{}true", "nums.all(x,".repeat(300)),
        ] {
            assert!(src.len() <= MAX_SOURCE_LEN);
            let e = Expr::parse(&src).unwrap_err();
            assert!(e.message.contains("nested too deeply"), "{e}");
        }
        // Just inside the limit parses and evaluates.
        let ok = format!(
            "{}1{}",
            "(".repeat(MAX_DEPTH - 1),
            ")".repeat(MAX_DEPTH - 1)
        );
        assert_eq!(Expr::parse(&ok).unwrap().eval(&ctx()), Ok(json!(1)));
        let ok = format!("{}true", "!".repeat(MAX_DEPTH - 1));
        assert_eq!(Expr::parse(&ok).unwrap().eval(&ctx()), Ok(json!(false)));
        let ok = format!("1{}", "+1".repeat(MAX_DEPTH - 2));
        assert_eq!(
            Expr::parse(&ok).unwrap().eval(&ctx()),
            Ok(json!(MAX_DEPTH - 1))
        );
        let too_deep = format!("1{}", "+1".repeat(MAX_DEPTH));
        assert!(Expr::parse(&too_deep).is_err());
        // A long chain of && is one level, not one per operand.
        let chain = format!("true{}", " && true".repeat(500));
        assert!(chain.len() <= MAX_SOURCE_LEN);
        assert!(Expr::parse(&chain).unwrap().eval_bool(&ctx()).unwrap());
        let chain = format!("false{}", " || false".repeat(400));
        assert!(!Expr::parse(&chain).unwrap().eval_bool(&ctx()).unwrap());
    }

    #[test]
    fn deepest_accepted_input_fits_a_small_stack() {
        // The depth bound, not the stack size, is what stops deep input: the
        // deepest accepted expressions parse and evaluate in half the 2 MiB a
        // spawned thread gets by default, even in a debug build.
        let worker = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(|| {
                let d = MAX_DEPTH - 1;
                let parens = format!("{}s{}", "(".repeat(d), ")".repeat(d));
                let sizes = format!("{}s{}", "size(string(".repeat(d / 2), "))".repeat(d / 2));
                let macros = format!("{}true{}", "[1].all(x,".repeat(d - 2), ")".repeat(d - 2));
                let mut out = Vec::new();
                for src in [parens, sizes, macros, "(".repeat(4000)] {
                    out.push(Expr::parse(&src).and_then(|e| e.eval(&ctx())));
                }
                out
            })
            .unwrap();
        let out = worker.join().unwrap();
        assert_eq!(out[0], Ok(json!("hello")));
        assert!(out[1].is_ok(), "{:?}", out[1]);
        assert_eq!(out[2], Ok(json!(true)));
        assert!(out[3].is_err());
    }

    #[test]
    fn source_length_is_bounded() {
        let exact = format!("1{}", " ".repeat(MAX_SOURCE_LEN - 1));
        assert_eq!(Expr::parse(&exact).unwrap().eval(&ctx()), Ok(json!(1)));
        let over = format!("1{}", " ".repeat(MAX_SOURCE_LEN));
        let e = Expr::parse(&over).unwrap_err();
        assert!(
            e.message.contains("4097 bytes long; the limit is 4096"),
            "{e}"
        );
    }

    fn big_ctx() -> Value {
        json!({
            "l1k": (0..1000).collect::<Vec<i64>>(),
            "l6k": (0..6000).collect::<Vec<i64>>(),
            "l200k": (0..200_000).collect::<Vec<i64>>(),
            "s40k": "x".repeat(40_000),
            "s70k": "A".repeat(70_000),
            "a60k": "a".repeat(60_000),
        })
    }

    #[test]
    fn steps_are_bounded() {
        let c = big_ctx();
        let run = |src: &str| Expr::parse(src).unwrap().eval(&c);
        // One pass over 1000 items fits; a nested pass (a million) does not.
        assert_eq!(run("l1k.exists(x, x == 999)"), Ok(json!(true)));
        let e = run("l1k.exists(x, l1k.exists(y, x + y < 0))").unwrap_err();
        assert!(e.message.contains("more than 100000 steps"), "{e}");
        let e = run("exists(l1k, x, all(l1k, y, y >= 0) && false)").unwrap_err();
        assert!(e.message.contains("more than 100000 steps"), "{e}");
        // Work proportional to value size is charged too.
        let e = run("l200k == l200k").unwrap_err();
        assert!(e.message.contains("steps"), "{e}");
        let e = run("size([l200k]) == 1").unwrap_err();
        assert!(e.message.contains("steps"), "{e}");
        assert_eq!(run("size(l200k)"), Ok(json!(200_000)));
        // Pathological glob: stopped by the budget, not left to run for O(n·m).
        let src = format!("a60k.matches('*{}b')", "a".repeat(2000));
        let e = run(&src).unwrap_err();
        assert!(e.message.contains("steps"), "{e}");
        assert_eq!(run("a60k.matches('*a*a*a*a*b')"), Ok(json!(false)));
        assert_eq!(run("a60k.matches('a*a?')"), Ok(json!(true)));
    }

    #[test]
    fn deep_context_values_compare_without_recursion() {
        let nest = |leaf: Value| {
            let mut v = leaf;
            for _ in 0..500 {
                // Built by hand: json!() would copy `v` through Serialize.
                let mut m = Map::new();
                m.insert("k".to_string(), Value::Null);
                v = Value::Array(vec![v, Value::Object(m)]);
            }
            v
        };
        let c = json!({"deep": nest(json!(1)), "same": nest(json!(1.0)), "other": nest(json!(2))});
        // A recursive comparison of 500 levels would not fit in this stack.
        let out = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn_scoped(scope, || {
                    ["deep == same", "deep == other", "deep != other"]
                        .map(|src| Expr::parse(src).and_then(|e| e.eval(&c)))
                })
                .unwrap()
                .join()
                .unwrap()
        });
        assert_eq!(out, [Ok(json!(true)), Ok(json!(false)), Ok(json!(true))]);
    }

    #[test]
    fn result_sizes_are_bounded() {
        let c = big_ctx();
        let run = |src: &str| Expr::parse(src).unwrap().eval(&c);
        assert_eq!(run("size(s40k + 'y')"), Ok(json!(40_001)));
        let e = run("s40k + s40k").unwrap_err();
        assert!(e.message.contains("longer than the limit of 65536"), "{e}");
        let e = run("size(s40k + 'y' + s40k) > 0").unwrap_err();
        assert!(e.message.contains("longer than the limit"), "{e}");
        let e = run("string(s70k)").unwrap_err();
        assert!(e.message.contains("longer than the limit"), "{e}");
        assert_eq!(run("size(string(s40k))"), Ok(json!(40_000)));
        let e = run("lower(s70k)").unwrap_err();
        assert!(e.message.contains("longer than the limit"), "{e}");
        assert_eq!(run("size(l6k + l1k)"), Ok(json!(7000)));
        let e = run("l6k + l6k").unwrap_err();
        assert!(
            e.message.contains("longer than the limit of 10000 items"),
            "{e}"
        );
    }

    #[test]
    fn references_cut_at_dynamic_indices() {
        let refs = |src: &str| Expr::parse(src).unwrap().references();
        let v = |paths: &[&[&str]]| -> Vec<Vec<String>> {
            paths
                .iter()
                .map(|p| p.iter().map(|s| s.to_string()).collect())
                .collect()
        };
        assert_eq!(
            refs("steps.scan.output.critical == 0 && steps.licence.output.ok"),
            v(&[
                &["steps", "scan", "output", "critical"],
                &["steps", "licence", "output", "ok"]
            ])
        );
        assert_eq!(
            refs("steps.a.output[i] > 0"),
            v(&[&["steps", "a", "output"], &["i"]])
        );
        assert_eq!(
            refs("steps.a.output[i].x"),
            v(&[&["steps", "a", "output"], &["i"]])
        );
        assert_eq!(refs("a['k'][0].b"), v(&[&["a", "k", "0", "b"]]));
        assert_eq!(refs("a[b.c].d"), v(&[&["a"], &["b", "c"]]));
        assert_eq!(refs("a[-1]"), v(&[&["a"]]));
        assert_eq!(
            refs("items.exists(x, x.sev > limit) && size(items) > 0"),
            v(&[&["items"], &["limit"]])
        );
        assert_eq!(refs("s.startsWith(prefix)"), v(&[&["s"], &["prefix"]]));
        assert_eq!(refs("has(a.b)"), v(&[&["a", "b"]]));
        assert_eq!(refs("[1, 2][0] + {'a': b}.a"), v(&[&["b"]]));
        assert_eq!(refs("1 + 2"), v(&[]));
        assert_eq!(
            refs("event.type == 'job.dead' && event.data.queue in ['emails', 'billing']"),
            v(&[&["event", "type"], &["event", "data", "queue"]])
        );
        assert_eq!(
            refs("nums.exists(steps, steps == 1) && steps.x"),
            v(&[&["nums"], &["steps", "x"]])
        );
        assert_eq!(
            refs("a.exists(x, b.all(y, x == y && z))"),
            v(&[&["a"], &["b"], &["z"]])
        );
        assert_eq!(
            refs("a.b ? c : d.e"),
            v(&[&["a", "b"], &["c"], &["d", "e"]])
        );
    }

    #[test]
    fn bindings_record_what_was_read() {
        let e = Expr::parse(
            "steps.scan.output.high > 2 && steps.licence.output.ok && missing.x == null \
             && nums[1] == 2 && steps['scan'].output.critical == 0 \
             && items.exists(i, i.sev > 4)",
        )
        .unwrap();
        assert!(e.eval_bool(&ctx()).unwrap());
        let b = e.bindings(&ctx());
        let want: BTreeMap<String, Value> = [
            ("steps.scan.output.high", json!(3)),
            ("steps.licence.output.ok", json!(true)),
            ("missing.x", Value::Null),
            ("nums[1]", json!(2)),
            ("steps[\"scan\"].output.critical", json!(0)),
            ("items", json!([{"sev": 1}, {"sev": 5}])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(b, want);
    }

    #[test]
    fn serde_round_trip() {
        let src = "steps.scan.output.critical == 0 && 'x' in ['x']";
        let e = Expr::parse(src).unwrap();
        assert_eq!(e.source(), src);
        assert_eq!(e.to_string(), src);
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(text, serde_json::to_string(src).unwrap());
        let back: Expr = serde_json::from_str(&text).unwrap();
        assert_eq!(back, e);
        assert_eq!(src.parse::<Expr>().unwrap(), e);

        #[derive(Debug, serde::Deserialize, serde::Serialize)]
        struct Gate {
            when: Expr,
        }
        let g: Gate = serde_json::from_value(json!({"when": "nums.all(x, x > 0)"})).unwrap();
        assert!(g.when.eval_bool(&ctx()).unwrap());
        assert_eq!(
            serde_json::to_value(&g).unwrap(),
            json!({"when": "nums.all(x, x > 0)"})
        );
        let bad = serde_json::from_value::<Gate>(json!({"when": "(1 +"})).unwrap_err();
        assert!(
            bad.to_string().contains("unexpected end of input at 4"),
            "{bad}"
        );
        assert!(serde_json::from_value::<Gate>(json!({"when": 1})).is_err());
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
            xs[self.below(xs.len())]
        }
    }

    /// A random expression that is valid by construction.
    fn gen(r: &mut XorShift, depth: u32) -> String {
        const ATOMS: &[&str] = &[
            "1",
            "0",
            "-3",
            "2.5",
            "'a'",
            "\"héllo\"",
            "null",
            "true",
            "false",
            "s",
            "nums",
            "items",
            "big",
            "steps.scan.output.critical",
            "steps.scan.output.name",
            "event.data",
            "event.data.queue",
            "missing.x",
            "nums[1]",
            "items[0].sev",
            "[]",
            "{}",
            "x",
        ];
        const BIN: &[&str] = &[
            "+", "-", "*", "/", "%", "==", "!=", "<", "<=", ">", ">=", "in", "&&", "||",
        ];
        const METHODS: &[&str] = &["startsWith", "endsWith", "contains", "matches"];
        const UNARY_FNS: &[&str] = &["size", "int", "string", "double", "lower", "upper"];
        if depth == 0 {
            return r.pick(ATOMS).to_string();
        }
        let d = depth - 1;
        match r.below(10) {
            0 => r.pick(ATOMS).to_string(),
            1 => format!("{}{}", r.pick(&["!", "-"]), gen(r, d)),
            2 | 3 => format!("{} {} {}", gen(r, d), r.pick(BIN), gen(r, d)),
            4 => format!("({} ? {} : {})", gen(r, d), gen(r, d), gen(r, d)),
            5 => format!("{}({})", r.pick(UNARY_FNS), gen(r, d)),
            6 => format!("{}.{}({})", gen(r, d), r.pick(METHODS), gen(r, d)),
            7 => format!(
                "{}.{}(x, {})",
                gen(r, d),
                r.pick(&["exists", "all"]),
                gen(r, d)
            ),
            8 => format!("[{}, {}]", gen(r, d), gen(r, d)),
            _ => format!("{{'k': {}}}[{}]", gen(r, d), gen(r, d)),
        }
    }

    fn exercise(src: &str, c: &Value) -> bool {
        match Expr::parse(src) {
            Ok(e) => {
                assert_eq!(Expr::parse(e.source()).as_ref(), Ok(&e), "{src}");
                if let Err(err) = e.eval(c) {
                    assert!(!err.message.is_empty());
                }
                let _ = e.eval_bool(c);
                let refs = e.references();
                assert!(refs.iter().all(|p| !p.is_empty()), "{src}");
                assert!(e.bindings(c).len() <= refs.len(), "{src}");
                true
            }
            Err(err) => {
                assert!(err.pos <= src.len(), "{src:?}: {err:?}");
                assert!(!err.message.is_empty());
                false
            }
        }
    }

    #[test]
    fn random_input_never_panics() {
        let c = ctx();
        let mut r = XorShift(0x9E37_79B9_7F4A_7C15);
        // Raw bytes.
        for _ in 0..2000 {
            let len = r.below(48);
            let bytes: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
            exercise(&String::from_utf8_lossy(&bytes), &c);
        }
        // Token soup, heavy on punctuation to reach odd parser states.
        const TOKS: &[&str] = &[
            "a",
            ".b",
            "1",
            "2.5",
            "'s'",
            "\"",
            "'",
            "\\",
            "(",
            ")",
            "[",
            "]",
            "{",
            "}",
            ",",
            ":",
            "?",
            "!",
            "-",
            "+",
            "*",
            "/",
            "%",
            "==",
            "<",
            "&&",
            "||",
            " in ",
            "size(",
            "exists(",
            ".all(x,",
            "x",
            "null",
            "\\u",
            "e9",
            "9223372036854775808",
        ];
        for _ in 0..2000 {
            let n = r.below(24);
            let src: String = (0..n).map(|_| r.pick(TOKS)).collect();
            exercise(&src, &c);
        }
        // Valid expressions, then the same with one byte damaged.
        let mut parsed = 0;
        for _ in 0..2000 {
            let depth = r.below(5) as u32;
            let src = gen(&mut r, depth);
            assert!(
                exercise(&src, &c),
                "generated expression failed to parse: {src}"
            );
            parsed += 1;
            let mut bytes = src.into_bytes();
            if !bytes.is_empty() {
                let i = r.below(bytes.len());
                bytes[i] = b"()[]{}.,'\"!x1 "[r.below(14)];
                exercise(&String::from_utf8_lossy(&bytes), &c);
            }
        }
        assert_eq!(parsed, 2000);
    }
}
