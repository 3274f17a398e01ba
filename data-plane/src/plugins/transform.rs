//! Plugins that change requests and responses on the way
//! (`request-transformer`, `response-transformer`, `correlation-id`) and
//! `proxy-cache`.
//!
//! Kong runs these with Lua tables and nginx's argument and header APIs;
//! the helpers here reproduce what those do to a request (argument
//! decoding and encoding, header lookups that ignore case and `_`/`-`,
//! cjson's quirks, Penlight templates with their Lua expressions) so that
//! the observable result is Kong's.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{AGE, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, EXPIRES, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body_util::{Either, Full};
use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};

use super::auth::header_key;
use super::{
    error_message, exit_message, typed, BuildContext, Ctx, Flow, Needs, Plugin, PluginRequest,
    Shared,
};
use crate::proxy::ResponseBody;

// ---------------------------------------------------------------------------
// Kong's `name:value` configuration entries

/// Lua's `entry:match("^([^:]+):*(.-)$")`: the name before the first colon
/// and what follows the colons after it; an empty value is none.
fn split_entry(entry: &str) -> (&str, Option<&str>) {
    match entry.find(':') {
        None => (entry, None),
        Some(colon) => {
            let value = entry[colon..].trim_start_matches(':');
            (&entry[..colon], (!value.is_empty()).then_some(value))
        }
    }
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("'{name}' is not a valid header"))
}

/// The plugins answer Lua runtime errors the way Kong's error handler does.
fn runtime_error(plugin: &str, error: &str) -> Flow {
    tracing::error!(plugin, "{error}");
    Flow::Exit(error_message(
        StatusCode::INTERNAL_SERVER_ERROR,
        "An unexpected error occurred",
    ))
}

// ---------------------------------------------------------------------------
// Lua numbers

/// Lua's `tostring` of a number (`%.14g`).
fn lua_number(n: f64) -> String {
    if n.is_nan() {
        return if n.is_sign_negative() { "-nan" } else { "nan" }.to_owned();
    }
    if n.is_infinite() {
        return if n > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    if n == 0.0 {
        return if n.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    fn trim_fraction(s: &str) -> &str {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.')
        } else {
            s
        }
    }
    let scientific = format!("{n:.13e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if !(-4..14).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim_fraction(mantissa), exponent.abs())
    } else {
        let precision = usize::try_from(13 - exponent).unwrap_or(0);
        trim_fraction(&format!("{n:.precision$}")).to_owned()
    }
}

/// Lua's `tonumber` of a string: decimal or hexadecimal, surrounding
/// whitespace allowed, no `inf` or `nan`.
fn lua_tonumber(s: &str) -> Option<f64> {
    let s = s.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c'));
    let (negative, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let value = if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        hex.chars()
            .filter_map(|c| c.to_digit(16))
            .fold(0.0, |acc, d| acc * 16.0 + f64::from(d))
    } else {
        let plain = body
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
        if !plain || body.starts_with(['+', '-']) {
            return None;
        }
        body.parse::<f64>().ok()?
    };
    Some(if negative { -value } else { value })
}

/// A JSON number as cjson writes a Lua number: integral values without a
/// fraction.
fn json_number(n: f64) -> Json {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        // Exact: the magnitude is below 2^53.
        Json::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number)
    }
}

// ---------------------------------------------------------------------------
// nginx argument tables (`ngx.req.get_uri_args`, `ngx.decode_args`,
// `ngx.encode_args`)

/// nginx's default `max_args` for argument tables.
const MAX_ARGS: usize = 100;

/// One argument as Lua sees it: `true` for a name without `=`, a string,
/// or a list for a repeated name.
#[derive(Clone, Debug, PartialEq)]
enum Arg {
    Flag,
    Text(String),
    List(Vec<Arg>),
}

/// Arguments in the order they first appeared (Lua tables have none; the
/// order only shows where Kong's own is unspecified).
#[derive(Clone, Debug, Default, PartialEq)]
struct Args(Vec<(String, Arg)>);

fn unescape(raw: &[u8]) -> String {
    let plus: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_encoding::percent_decode(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

/// `ngx.escape_uri` for an argument: everything but unreserved characters.
const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn escape_component(s: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(s, COMPONENT)
}

impl Args {
    fn parse(raw: &[u8]) -> Args {
        let mut args = Args::default();
        for pair in raw
            .split(|&b| b == b'&')
            .filter(|p| !p.is_empty())
            .take(MAX_ARGS)
        {
            let (key, value) = match pair.iter().position(|&b| b == b'=') {
                Some(eq) => (&pair[..eq], Some(&pair[eq + 1..])),
                None => (pair, None),
            };
            let key = unescape(key);
            if key.is_empty() {
                continue;
            }
            args.push(key, value.map_or(Arg::Flag, |v| Arg::Text(unescape(v))));
        }
        args
    }

    /// A repeated name turns into a list, as nginx builds it.
    fn push(&mut self, key: String, value: Arg) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, Arg::List(list))) => list.push(value),
            Some((_, existing)) => {
                let first = std::mem::replace(existing, Arg::Flag);
                *existing = Arg::List(vec![first, value]);
            }
            None => self.0.push((key, value)),
        }
    }

    fn get(&self, key: &str) -> Option<&Arg> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn set(&mut self, key: &str, value: Arg) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, existing)) => *existing = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }

    fn remove(&mut self, key: &str) -> Option<Arg> {
        let at = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(at).1)
    }

    /// request-transformer's `rename`: moves a present argument, replacing
    /// any under the new name.
    fn rename(&mut self, old: &str, new: &str) -> bool {
        if old == new || self.get(old).is_none() {
            return false;
        }
        if self.get(new).is_some() {
            let value = self.remove(old).unwrap_or(Arg::Flag);
            self.set(new, value);
        } else if let Some((key, _)) = self.0.iter_mut().find(|(k, _)| k == old) {
            new.clone_into(key);
        }
        true
    }

    /// request-transformer's `append_value`: a string becomes a list, a
    /// list grows, anything else (`true` included) is replaced by a list.
    fn append(&mut self, key: &str, value: String) {
        let new = match self.remove_in_place(key) {
            Some(Arg::Text(current)) => Arg::List(vec![Arg::Text(current), Arg::Text(value)]),
            Some(Arg::List(mut list)) => {
                list.push(Arg::Text(value));
                Arg::List(list)
            }
            _ => Arg::List(vec![Arg::Text(value)]),
        };
        self.set(key, new);
    }

    /// Takes a value out, keeping the argument's place.
    fn remove_in_place(&mut self, key: &str) -> Option<Arg> {
        self.0
            .iter_mut()
            .find(|(k, _)| k == key)
            .map(|(_, v)| std::mem::replace(v, Arg::Flag))
    }

    fn encode_one(out: &mut String, key: &str, value: &Arg) {
        use std::fmt::Write;
        match value {
            Arg::Flag => {
                let _ = write!(out, "{}", escape_component(key));
            }
            Arg::Text(text) => {
                let _ = write!(out, "{}={}", escape_component(key), escape_component(text));
            }
            Arg::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push('&');
                    }
                    Args::encode_one(out, key, item);
                }
            }
        }
    }

    /// `ngx.encode_args`.
    fn encode(&self) -> String {
        let mut out = String::new();
        for (key, value) in &self.0 {
            if !out.is_empty() {
                out.push('&');
            }
            Args::encode_one(&mut out, key, value);
        }
        out
    }

    /// `kong.service.request.set_query`: each argument encoded, sorted.
    fn encode_sorted(&self) -> String {
        let mut parts: Vec<String> = self
            .0
            .iter()
            .map(|(key, value)| {
                let mut part = String::new();
                Args::encode_one(&mut part, key, value);
                part
            })
            .filter(|part| !part.is_empty())
            .collect();
        parts.sort_unstable();
        parts.join("&")
    }
}

fn set_query(req: &mut PluginRequest<'_>, query: String) {
    req.query = (!query.is_empty()).then_some(Cow::Owned(query));
}

// ---------------------------------------------------------------------------
// Route captures

/// The captures of the route's regex path, as Kong's router hands them to
/// plugins (`uri_captures`): by position (0 is the whole match) and by name.
#[derive(Debug, Default)]
pub(crate) struct UriCaptures {
    positional: Vec<Option<String>>,
    named: Vec<(String, String)>,
}

impl UriCaptures {
    /// The captures `regex` makes on the normalized request path; none
    /// when it does not match or captures nothing besides the whole match
    /// (Kong's router leaves `uri_captures` unset then).
    pub(crate) fn new(regex: &Regex, path: &str) -> Option<UriCaptures> {
        let captures = regex.captures(path)?;
        let positional: Vec<Option<String>> = captures
            .iter()
            .map(|m| m.map(|m| m.as_str().to_owned()))
            .collect();
        let named: Vec<(String, String)> = regex
            .capture_names()
            .flatten()
            .filter_map(|name| {
                captures
                    .name(name)
                    .map(|m| (name.to_owned(), m.as_str().to_owned()))
            })
            .collect();
        let entries = positional.iter().flatten().count() + named.len();
        (entries > 1).then_some(UriCaptures { positional, named })
    }

    fn index(&self, i: usize) -> Option<&str> {
        self.positional.get(i).and_then(Option::as_deref)
    }

    /// `kong.request.get_uri_captures()`: the groups by position (from the
    /// first, the whole match left out) and by name.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let unnamed: Vec<serde_json::Value> = self
            .positional
            .iter()
            .skip(1)
            .map(|group| {
                group
                    .as_deref()
                    .map_or(serde_json::Value::Bool(false), Into::into)
            })
            .collect();
        let named: serde_json::Map<String, serde_json::Value> = self
            .named
            .iter()
            .map(|(name, value)| (name.clone(), value.as_str().into()))
            .collect();
        serde_json::json!({ "named": named, "unnamed": unnamed })
    }

    fn name(&self, name: &str) -> Option<&str> {
        self.named
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Lua's `#` of the table: the positions present from 1 on.
    fn len(&self) -> usize {
        self.positional
            .iter()
            .skip(1)
            .take_while(|c| c.is_some())
            .count()
    }
}

// ---------------------------------------------------------------------------
// Penlight templates (`$(expression)`) with the Lua expressions Kong's
// sandbox evaluates

/// What a template can read: the request as it was when the plugin
/// started, as Kong's lazily loaded template environment sees it.
struct Env<'e> {
    headers: Option<&'e HeaderMap>,
    query: Option<&'e Args>,
    captures: Option<&'e UriCaptures>,
}

#[derive(Debug)]
enum Piece {
    Text(String),
    /// A Lua expression, or why it does not compile (Kong fails the
    /// request when it renders it).
    Expr(Result<lua::Expr, String>),
}

#[derive(Debug)]
enum Template {
    Plain(String),
    Pieces(Vec<Piece>),
}

impl Template {
    fn parse(source: &str) -> Template {
        let bytes = source.as_bytes();
        let mut pieces = Vec::new();
        let mut text_start = 0;
        let mut i = 0;
        while i + 1 < bytes.len() {
            if bytes[i] == b'$' && bytes[i + 1] == b'(' {
                if let Some(close) = Template::balanced(bytes, i + 1) {
                    if text_start < i {
                        pieces.push(Piece::Text(source[text_start..i].to_owned()));
                    }
                    pieces.push(Piece::Expr(lua::parse(&source[i + 2..close])));
                    i = close + 1;
                    text_start = i;
                    continue;
                }
            }
            i += 1;
        }
        if pieces.is_empty() {
            return Template::Plain(source.to_owned());
        }
        if text_start < source.len() {
            pieces.push(Piece::Text(source[text_start..].to_owned()));
        }
        Template::Pieces(pieces)
    }

    /// Lua's `%b()`: the index of the parenthesis closing the one at `open`.
    fn balanced(bytes: &[u8], open: usize) -> Option<usize> {
        let mut depth = 0usize;
        for (i, &b) in bytes.iter().enumerate().skip(open) {
            match b {
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Whether an expression reads the global `name`.
    fn reads(&self, name: &str) -> bool {
        match self {
            Template::Plain(_) => false,
            Template::Pieces(pieces) => pieces.iter().any(|piece| match piece {
                Piece::Expr(Ok(expr)) => expr.reads(name),
                _ => false,
            }),
        }
    }

    /// Penlight's render: each expression as `tostring(value or '')`.
    fn render<'t>(&'t self, env: &Env<'_>) -> Result<Cow<'t, str>, String> {
        let pieces = match self {
            Template::Plain(text) => return Ok(Cow::Borrowed(text)),
            Template::Pieces(pieces) => pieces,
        };
        let mut out = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Expr(Err(error)) => return Err(error.clone()),
                Piece::Expr(Ok(expr)) => {
                    let value = lua::eval(expr, env)?;
                    if value.truthy() {
                        out.push_str(&value.to_text());
                    }
                }
            }
        }
        Ok(Cow::Owned(out))
    }
}

/// A configured value: a template, and its header value when it is plain.
#[derive(Debug)]
struct Value {
    template: Template,
    header: Option<HeaderValue>,
}

impl Value {
    fn new(source: &str) -> Value {
        let template = Template::parse(source);
        let header = match &template {
            Template::Plain(text) => HeaderValue::from_str(text).ok(),
            Template::Pieces(_) => None,
        };
        Value { template, header }
    }

    fn text<'v>(&'v self, env: &Env<'_>) -> Result<Cow<'v, str>, String> {
        self.template.render(env)
    }

    fn header_value(&self, env: &Env<'_>) -> Result<HeaderValue, String> {
        if let Some(value) = &self.header {
            return Ok(value.clone());
        }
        let text = self.text(env)?;
        HeaderValue::from_str(&text).map_err(|_| format!("invalid header value: {text:?}"))
    }
}

mod lua {
    //! The part of Lua that template expressions use: literals, the
    //! template environment (`headers`, `query_params`, `uri_captures`,
    //! `shared`), indexing, the operators, `type` (all Kong's sandbox adds)
    //! and a few string methods (`s:upper()`).

    use std::borrow::Cow;

    use super::{lua_number, lua_tonumber, Arg, Env};

    #[derive(Debug, Clone, Copy, PartialEq)]
    pub(super) enum Bin {
        Add,
        Sub,
        Mul,
        Div,
        Mod,
        Pow,
        Concat,
        Eq,
        Ne,
        Lt,
        Le,
        Gt,
        Ge,
        And,
        Or,
    }

    #[derive(Debug)]
    pub(super) enum Expr {
        Nil,
        Bool(bool),
        Num(f64),
        Str(String),
        Global(String),
        Index(Box<Expr>, Box<Expr>),
        Call(Box<Expr>, Vec<Expr>),
        Method(Box<Expr>, String, Vec<Expr>),
        Not(Box<Expr>),
        Neg(Box<Expr>),
        Len(Box<Expr>),
        Bin(Bin, Box<Expr>, Box<Expr>),
    }

    impl Expr {
        pub(super) fn reads(&self, name: &str) -> bool {
            match self {
                Expr::Global(global) => global == name,
                Expr::Index(a, b) | Expr::Bin(_, a, b) => a.reads(name) || b.reads(name),
                Expr::Call(f, args) | Expr::Method(f, _, args) => {
                    f.reads(name) || args.iter().any(|a| a.reads(name))
                }
                Expr::Not(e) | Expr::Neg(e) | Expr::Len(e) => e.reads(name),
                Expr::Nil | Expr::Bool(_) | Expr::Num(_) | Expr::Str(_) => false,
            }
        }
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Tok {
        Name(String),
        Num(f64),
        Str(String),
        Sym(&'static str),
        Eof,
    }

    const SYMBOLS: [&str; 26] = [
        "...", "..", "==", "~=", "<=", ">=", "<", ">", "=", "+", "-", "*", "/", "%", "^", "#", "(",
        ")", "[", "]", "{", "}", ";", ":", ",", ".",
    ];

    const KEYWORDS: [&str; 21] = [
        "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if",
        "in", "local", "nil", "not", "or", "repeat", "return", "then", "true", "until",
    ];

    fn lex(src: &str) -> Result<Vec<Tok>, String> {
        let b = src.as_bytes();
        let mut toks = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c.is_ascii_whitespace() {
                i += 1;
            } else if src[i..].starts_with("--") {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |p| i + p);
            } else if c.is_ascii_alphabetic() || c == b'_' {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                toks.push(Tok::Name(src[start..i].to_owned()));
            } else if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
            {
                let start = i;
                if src[i..].starts_with("0x") || src[i..].starts_with("0X") {
                    i += 2;
                    while i < b.len() && b[i].is_ascii_hexdigit() {
                        i += 1;
                    }
                } else {
                    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                        i += 1;
                    }
                    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
                        i += 1;
                        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
                            i += 1;
                        }
                        while i < b.len() && b[i].is_ascii_digit() {
                            i += 1;
                        }
                    }
                }
                let text = &src[start..i];
                let n =
                    lua_tonumber(text).ok_or_else(|| format!("malformed number near '{text}'"))?;
                toks.push(Tok::Num(n));
            } else if c == b'"' || c == b'\'' {
                let (s, next) = string(src, i)?;
                toks.push(Tok::Str(s));
                i = next;
            } else if c == b'[' && matches!(b.get(i + 1), Some(b'[' | b'=')) {
                let level = b[i + 1..].iter().take_while(|&&c| c == b'=').count();
                if b.get(i + 1 + level) != Some(&b'[') {
                    toks.push(Tok::Sym("["));
                    i += 1;
                    continue;
                }
                let close = format!("]{}]", "=".repeat(level));
                let body = i + level + 2;
                let end = src[body..].find(&close).ok_or("unfinished long string")?;
                let text = &src[body..body + end];
                toks.push(Tok::Str(text.strip_prefix('\n').unwrap_or(text).to_owned()));
                i = body + end + close.len();
            } else if let Some(sym) = SYMBOLS.iter().find(|s| src[i..].starts_with(**s)) {
                toks.push(Tok::Sym(sym));
                i += sym.len();
            } else {
                return Err(format!("unexpected symbol near '{}'", char::from(c)));
            }
        }
        toks.push(Tok::Eof);
        Ok(toks)
    }

    /// A quoted string with Lua's escapes; returns it and where it ends.
    fn string(src: &str, start: usize) -> Result<(String, usize), String> {
        let b = src.as_bytes();
        let quote = b[start];
        let mut out: Vec<u8> = Vec::new();
        let mut i = start + 1;
        loop {
            let Some(&c) = b.get(i) else {
                return Err("unfinished string".into());
            };
            i += 1;
            match c {
                _ if c == quote => break,
                b'\n' => return Err("unfinished string".into()),
                b'\\' => {
                    let Some(&e) = b.get(i) else {
                        return Err("unfinished string".into());
                    };
                    i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'a' => out.push(0x07),
                        b'b' => out.push(0x08),
                        b'f' => out.push(0x0c),
                        b'v' => out.push(0x0b),
                        b'\n' => out.push(b'\n'),
                        b'x' => {
                            let hex = src.get(i..i + 2).ok_or("invalid escape sequence")?;
                            out.push(
                                u8::from_str_radix(hex, 16)
                                    .map_err(|_| "invalid escape sequence")?,
                            );
                            i += 2;
                        }
                        b'0'..=b'9' => {
                            let digits = b[i - 1..]
                                .iter()
                                .take(3)
                                .take_while(|c| c.is_ascii_digit())
                                .count();
                            let n: u32 = src[i - 1..i - 1 + digits].parse().unwrap_or(256);
                            out.push(u8::try_from(n).map_err(|_| "escape sequence too large")?);
                            i += digits - 1;
                        }
                        other => out.push(other),
                    }
                }
                _ => out.push(c),
            }
        }
        Ok((String::from_utf8_lossy(&out).into_owned(), i))
    }

    struct Parser {
        toks: Vec<Tok>,
        pos: usize,
        depth: usize,
    }

    /// Lua's limit on nested expressions ("too many syntax levels").
    const MAX_DEPTH: usize = 200;

    pub(super) fn parse(src: &str) -> Result<Expr, String> {
        let mut parser = Parser {
            toks: lex(src)?,
            pos: 0,
            depth: 0,
        };
        let expr = parser.expr(0)?;
        match parser.peek() {
            Tok::Eof => Ok(expr),
            other => Err(format!("unexpected {other:?} in template expression")),
        }
    }

    impl Parser {
        fn peek(&self) -> &Tok {
            &self.toks[self.pos.min(self.toks.len() - 1)]
        }

        fn next(&mut self) -> Tok {
            let tok = self.peek().clone();
            self.pos += 1;
            tok
        }

        fn is_sym(&self, sym: &str) -> bool {
            matches!(self.peek(), Tok::Sym(s) if *s == sym)
        }

        fn expect(&mut self, sym: &str) -> Result<(), String> {
            if self.is_sym(sym) {
                self.pos += 1;
                Ok(())
            } else {
                Err(format!("'{sym}' expected near {:?}", self.peek()))
            }
        }

        fn binary(&self) -> Option<(Bin, u8, u8)> {
            Some(match self.peek() {
                Tok::Sym("+") => (Bin::Add, 6, 6),
                Tok::Sym("-") => (Bin::Sub, 6, 6),
                Tok::Sym("*") => (Bin::Mul, 7, 7),
                Tok::Sym("/") => (Bin::Div, 7, 7),
                Tok::Sym("%") => (Bin::Mod, 7, 7),
                Tok::Sym("^") => (Bin::Pow, 10, 9),
                Tok::Sym("..") => (Bin::Concat, 5, 4),
                Tok::Sym("==") => (Bin::Eq, 3, 3),
                Tok::Sym("~=") => (Bin::Ne, 3, 3),
                Tok::Sym("<") => (Bin::Lt, 3, 3),
                Tok::Sym("<=") => (Bin::Le, 3, 3),
                Tok::Sym(">") => (Bin::Gt, 3, 3),
                Tok::Sym(">=") => (Bin::Ge, 3, 3),
                Tok::Name(n) if n == "and" => (Bin::And, 2, 2),
                Tok::Name(n) if n == "or" => (Bin::Or, 1, 1),
                _ => return None,
            })
        }

        /// Lua's `subexpr`: operators binding tighter than `limit`.
        fn expr(&mut self, limit: u8) -> Result<Expr, String> {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err("chunk has too many syntax levels".into());
            }
            let expr = self.subexpr(limit);
            self.depth -= 1;
            expr
        }

        fn subexpr(&mut self, limit: u8) -> Result<Expr, String> {
            const UNARY: u8 = 8;
            let mut left = match self.peek() {
                Tok::Name(n) if n == "not" => {
                    self.pos += 1;
                    Expr::Not(Box::new(self.expr(UNARY)?))
                }
                Tok::Sym("-") => {
                    self.pos += 1;
                    Expr::Neg(Box::new(self.expr(UNARY)?))
                }
                Tok::Sym("#") => {
                    self.pos += 1;
                    Expr::Len(Box::new(self.expr(UNARY)?))
                }
                _ => self.simple()?,
            };
            while let Some((op, left_priority, right_priority)) = self.binary() {
                if left_priority <= limit {
                    break;
                }
                self.pos += 1;
                let right = self.expr(right_priority)?;
                left = Expr::Bin(op, Box::new(left), Box::new(right));
            }
            Ok(left)
        }

        fn simple(&mut self) -> Result<Expr, String> {
            let expr = match self.peek().clone() {
                Tok::Num(n) => Expr::Num(n),
                Tok::Str(s) => Expr::Str(s),
                Tok::Name(n) if n == "nil" => Expr::Nil,
                Tok::Name(n) if n == "true" => Expr::Bool(true),
                Tok::Name(n) if n == "false" => Expr::Bool(false),
                _ => return self.suffixed(),
            };
            self.pos += 1;
            Ok(expr)
        }

        fn suffixed(&mut self) -> Result<Expr, String> {
            let mut expr = match self.next() {
                Tok::Name(n) if !KEYWORDS.contains(&n.as_str()) => Expr::Global(n),
                Tok::Sym("(") => {
                    let inner = self.expr(0)?;
                    self.expect(")")?;
                    inner
                }
                other => return Err(format!("unexpected symbol {other:?}")),
            };
            loop {
                expr = match self.peek().clone() {
                    Tok::Sym(".") => {
                        self.pos += 1;
                        let Tok::Name(key) = self.next() else {
                            return Err("<name> expected after '.'".into());
                        };
                        Expr::Index(Box::new(expr), Box::new(Expr::Str(key)))
                    }
                    Tok::Sym("[") => {
                        self.pos += 1;
                        let key = self.expr(0)?;
                        self.expect("]")?;
                        Expr::Index(Box::new(expr), Box::new(key))
                    }
                    Tok::Sym(":") => {
                        self.pos += 1;
                        let Tok::Name(method) = self.next() else {
                            return Err("<name> expected after ':'".into());
                        };
                        let args = self.args()?;
                        Expr::Method(Box::new(expr), method, args)
                    }
                    Tok::Sym("(") | Tok::Str(_) => {
                        let args = self.args()?;
                        Expr::Call(Box::new(expr), args)
                    }
                    Tok::Sym("{") => return Err("table constructors are not supported".into()),
                    _ => return Ok(expr),
                };
            }
        }

        fn args(&mut self) -> Result<Vec<Expr>, String> {
            if let Tok::Str(s) = self.peek().clone() {
                self.pos += 1;
                return Ok(vec![Expr::Str(s)]);
            }
            self.expect("(")?;
            let mut args = Vec::new();
            if !self.is_sym(")") {
                loop {
                    args.push(self.expr(0)?);
                    if !self.is_sym(",") {
                        break;
                    }
                    self.pos += 1;
                }
            }
            self.expect(")")?;
            Ok(args)
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    pub(super) enum Func {
        Type,
        Lower,
        Upper,
        Len,
        Sub,
        Rep,
        Reverse,
    }

    #[derive(Debug, Clone)]
    pub(super) enum Table<'e> {
        Headers,
        Query,
        Captures,
        /// `shared` and anything else Kong gives as an empty table.
        Empty,
        /// A repeated header or argument.
        List(Vec<Val<'e>>),
    }

    #[derive(Debug, Clone)]
    pub(super) enum Val<'e> {
        Nil,
        Bool(bool),
        Num(f64),
        Str(Cow<'e, str>),
        Table(Table<'e>),
        Func(Func),
    }

    impl Val<'_> {
        pub(super) fn truthy(&self) -> bool {
            !matches!(self, Val::Nil | Val::Bool(false))
        }

        fn type_name(&self) -> &'static str {
            match self {
                Val::Nil => "nil",
                Val::Bool(_) => "boolean",
                Val::Num(_) => "number",
                Val::Str(_) => "string",
                Val::Table(_) => "table",
                Val::Func(_) => "function",
            }
        }

        /// Lua's `tostring`, except that a repeated header or argument
        /// (a table, printed as its address by Lua) shows its values.
        pub(super) fn to_text(&self) -> Cow<'_, str> {
            match self {
                Val::Nil => Cow::Borrowed("nil"),
                Val::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
                Val::Num(n) => Cow::Owned(lua_number(*n)),
                Val::Str(s) => Cow::Borrowed(s),
                Val::Table(Table::List(items)) => Cow::Owned(
                    items
                        .iter()
                        .map(|item| item.to_text().into_owned())
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                Val::Table(_) => Cow::Borrowed("table"),
                Val::Func(_) => Cow::Borrowed("function: builtin"),
            }
        }

        fn number(&self) -> Option<f64> {
            match self {
                Val::Num(n) => Some(*n),
                Val::Str(s) => lua_tonumber(s),
                _ => None,
            }
        }

        /// A string or number, as string functions and `..` take them.
        fn string(&self) -> Option<Cow<'_, str>> {
            match self {
                Val::Str(s) => Some(Cow::Borrowed(s)),
                Val::Num(n) => Some(Cow::Owned(lua_number(*n))),
                _ => None,
            }
        }
    }

    fn arg_value(arg: &Arg) -> Val<'_> {
        match arg {
            Arg::Flag => Val::Bool(true),
            Arg::Text(text) => Val::Str(Cow::Borrowed(text)),
            Arg::List(items) => Val::Table(Table::List(items.iter().map(arg_value).collect())),
        }
    }

    fn global<'e>(name: &str) -> Val<'e> {
        match name {
            "headers" => Val::Table(Table::Headers),
            "query_params" => Val::Table(Table::Query),
            "uri_captures" => Val::Table(Table::Captures),
            "shared" => Val::Table(Table::Empty),
            // Kong's sandbox (the default `untrusted_lua = sandbox`) adds
            // `type` and nothing else: `tostring`, `string` or `math` are
            // nil there, and a template that calls them fails (500).
            // Strings keep their methods (`s:sub(1, 2)`).
            "type" => Val::Func(Func::Type),
            _ => Val::Nil,
        }
    }

    fn string_function(name: &str) -> Val<'static> {
        match name {
            "lower" => Val::Func(Func::Lower),
            "upper" => Val::Func(Func::Upper),
            "len" => Val::Func(Func::Len),
            "sub" => Val::Func(Func::Sub),
            "rep" => Val::Func(Func::Rep),
            "reverse" => Val::Func(Func::Reverse),
            _ => Val::Nil,
        }
    }

    fn index<'e>(table: Val<'e>, key: Val<'e>, env: &Env<'e>) -> Result<Val<'e>, String> {
        let table = match table {
            Val::Table(table) => table,
            // Strings index the string library, as their metatable does.
            Val::Str(_) => {
                return Ok(match key {
                    Val::Str(name) => string_function(&name),
                    _ => Val::Nil,
                })
            }
            other => return Err(format!("attempt to index a {} value", other.type_name())),
        };
        Ok(match (table, key) {
            (Table::Headers, Val::Str(name)) => {
                let Some(headers) = env.headers else {
                    return Ok(Val::Nil);
                };
                let mut values: Vec<Val<'e>> = headers
                    .get_all(super::header_key(&name).as_str())
                    .iter()
                    .map(|v| Val::Str(String::from_utf8_lossy(v.as_bytes())))
                    .collect();
                match values.len() {
                    0 => Val::Nil,
                    1 => values.remove(0),
                    _ => Val::Table(Table::List(values)),
                }
            }
            (Table::Query, Val::Str(name)) => env
                .query
                .and_then(|query| query.get(&name))
                .map_or(Val::Nil, arg_value),
            (Table::Captures, Val::Num(n)) => env
                .captures
                .filter(|_| n >= 0.0 && n.fract() == 0.0)
                .and_then(|captures| captures.index(n as usize))
                .map_or(Val::Nil, |s| Val::Str(Cow::Borrowed(s))),
            (Table::Captures, Val::Str(name)) => env
                .captures
                .and_then(|captures| captures.name(&name))
                .map_or(Val::Nil, |s| Val::Str(Cow::Borrowed(s))),
            (Table::List(items), Val::Num(n)) if n >= 1.0 && n.fract() == 0.0 => {
                items.into_iter().nth(n as usize - 1).unwrap_or(Val::Nil)
            }
            _ => Val::Nil,
        })
    }

    /// The longest string a template may build (`string.rep`).
    const MAX_STRING: usize = 1 << 20;

    fn call<'e>(func: Val<'e>, args: Vec<Val<'e>>) -> Result<Val<'e>, String> {
        let Val::Func(func) = func else {
            return Err(format!("attempt to call a {} value", func.type_name()));
        };
        let arg = |i: usize| args.get(i).cloned().unwrap_or(Val::Nil);
        let bad = |i: usize, name: &str, expected: &str| {
            format!(
                "bad argument #{} to '{name}' ({expected} expected, got {})",
                i + 1,
                args.get(i).map_or("no value", Val::type_name)
            )
        };
        let string_arg = |i: usize, name: &str| -> Result<String, String> {
            args.get(i)
                .and_then(Val::string)
                .map(Cow::into_owned)
                .ok_or_else(|| bad(i, name, "string"))
        };
        let number_arg = |i: usize, name: &str| -> Result<f64, String> {
            args.get(i)
                .and_then(Val::number)
                .ok_or_else(|| bad(i, name, "number"))
        };
        Ok(match func {
            Func::Type => Val::Str(Cow::Borrowed(arg(0).type_name())),
            Func::Lower => Val::Str(Cow::Owned(string_arg(0, "lower")?.to_ascii_lowercase())),
            Func::Upper => Val::Str(Cow::Owned(string_arg(0, "upper")?.to_ascii_uppercase())),
            Func::Len => Val::Num(string_arg(0, "len")?.len() as f64),
            Func::Reverse => {
                let mut bytes = string_arg(0, "reverse")?.into_bytes();
                bytes.reverse();
                Val::Str(Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()))
            }
            Func::Rep => {
                let s = string_arg(0, "rep")?;
                let n = number_arg(1, "rep")?.floor();
                if n <= 0.0 {
                    Val::Str(Cow::Borrowed(""))
                } else if s.len() as f64 * n > MAX_STRING as f64 {
                    return Err("not enough memory".into());
                } else {
                    Val::Str(Cow::Owned(s.repeat(n as usize)))
                }
            }
            Func::Sub => {
                let s = string_arg(0, "sub")?;
                let len = s.len() as i64;
                let relative = |pos: f64| {
                    let pos = pos as i64;
                    if pos < 0 {
                        len + pos + 1
                    } else {
                        pos
                    }
                };
                let start = relative(number_arg(1, "sub")?).max(1);
                let end = match args.get(2) {
                    Some(_) => relative(number_arg(2, "sub")?),
                    None => len,
                }
                .min(len);
                if start > end {
                    Val::Str(Cow::Borrowed(""))
                } else {
                    let bytes = &s.as_bytes()[(start - 1) as usize..end as usize];
                    Val::Str(Cow::Owned(String::from_utf8_lossy(bytes).into_owned()))
                }
            }
        })
    }

    fn arithmetic(op: Bin, a: &Val<'_>, b: &Val<'_>) -> Result<f64, String> {
        let operand = |v: &Val<'_>| {
            v.number().ok_or_else(|| {
                format!("attempt to perform arithmetic on a {} value", v.type_name())
            })
        };
        let (x, y) = (operand(a)?, operand(b)?);
        Ok(match op {
            Bin::Add => x + y,
            Bin::Sub => x - y,
            Bin::Mul => x * y,
            Bin::Div => x / y,
            Bin::Mod => x - (x / y).floor() * y,
            _ => x.powf(y),
        })
    }

    fn equal(a: &Val<'_>, b: &Val<'_>) -> bool {
        match (a, b) {
            (Val::Nil, Val::Nil) => true,
            (Val::Bool(x), Val::Bool(y)) => x == y,
            (Val::Num(x), Val::Num(y)) => x == y,
            (Val::Str(x), Val::Str(y)) => x == y,
            (Val::Func(x), Val::Func(y)) => x == y,
            (Val::Table(x), Val::Table(y)) => matches!(
                (x, y),
                (Table::Headers, Table::Headers)
                    | (Table::Query, Table::Query)
                    | (Table::Captures, Table::Captures)
            ),
            _ => false,
        }
    }

    fn less(a: &Val<'_>, b: &Val<'_>, or_equal: bool) -> Result<bool, String> {
        match (a, b) {
            (Val::Num(x), Val::Num(y)) => Ok(if or_equal { x <= y } else { x < y }),
            (Val::Str(x), Val::Str(y)) => Ok(if or_equal { x <= y } else { x < y }),
            _ => Err(format!(
                "attempt to compare {} with {}",
                a.type_name(),
                b.type_name()
            )),
        }
    }

    pub(super) fn eval<'e>(expr: &'e Expr, env: &Env<'e>) -> Result<Val<'e>, String> {
        Ok(match expr {
            Expr::Nil => Val::Nil,
            Expr::Bool(b) => Val::Bool(*b),
            Expr::Num(n) => Val::Num(*n),
            Expr::Str(s) => Val::Str(Cow::Borrowed(s)),
            Expr::Global(name) => global(name),
            Expr::Index(table, key) => index(eval(table, env)?, eval(key, env)?, env)?,
            Expr::Call(func, args) => {
                let func = eval(func, env)?;
                let args = args
                    .iter()
                    .map(|a| eval(a, env))
                    .collect::<Result<_, _>>()?;
                call(func, args)?
            }
            Expr::Method(object, name, args) => {
                let object = eval(object, env)?;
                let func = index(object.clone(), Val::Str(Cow::Borrowed(name)), env)?;
                let mut all = vec![object];
                for a in args {
                    all.push(eval(a, env)?);
                }
                call(func, all)?
            }
            Expr::Not(e) => Val::Bool(!eval(e, env)?.truthy()),
            Expr::Neg(e) => {
                let v = eval(e, env)?;
                Val::Num(-v.number().ok_or_else(|| {
                    format!("attempt to perform arithmetic on a {} value", v.type_name())
                })?)
            }
            Expr::Len(e) => match eval(e, env)? {
                Val::Str(s) => Val::Num(s.len() as f64),
                Val::Table(Table::List(items)) => Val::Num(items.len() as f64),
                Val::Table(Table::Captures) => Val::Num(env.captures.map_or(0, |c| c.len()) as f64),
                Val::Table(_) => Val::Num(0.0),
                other => {
                    return Err(format!(
                        "attempt to get length of a {} value",
                        other.type_name()
                    ))
                }
            },
            Expr::Bin(Bin::And, a, b) => {
                let a = eval(a, env)?;
                if a.truthy() {
                    eval(b, env)?
                } else {
                    a
                }
            }
            Expr::Bin(Bin::Or, a, b) => {
                let a = eval(a, env)?;
                if a.truthy() {
                    a
                } else {
                    eval(b, env)?
                }
            }
            Expr::Bin(op, a, b) => {
                let (a, b) = (eval(a, env)?, eval(b, env)?);
                match op {
                    Bin::Concat => {
                        let text = |v: &Val<'e>| {
                            v.string().map(Cow::into_owned).ok_or_else(|| {
                                format!("attempt to concatenate a {} value", v.type_name())
                            })
                        };
                        Val::Str(Cow::Owned(text(&a)? + &text(&b)?))
                    }
                    Bin::Eq => Val::Bool(equal(&a, &b)),
                    Bin::Ne => Val::Bool(!equal(&a, &b)),
                    Bin::Lt => Val::Bool(less(&a, &b, false)?),
                    Bin::Le => Val::Bool(less(&a, &b, true)?),
                    Bin::Gt => Val::Bool(less(&b, &a, false)?),
                    Bin::Ge => Val::Bool(less(&b, &a, true)?),
                    _ => Val::Num(arithmetic(*op, &a, &b)?),
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------
// request-transformer

#[derive(Deserialize, Default)]
#[serde(default)]
struct Lists {
    body: Vec<String>,
    headers: Vec<String>,
    querystring: Vec<String>,
    uri: Option<String>,
}

#[derive(Deserialize)]
struct RequestTransformerConfig {
    #[serde(default)]
    http_method: Option<String>,
    #[serde(default)]
    remove: Lists,
    #[serde(default)]
    rename: Lists,
    #[serde(default)]
    replace: Lists,
    #[serde(default)]
    add: Lists,
    #[serde(default)]
    append: Lists,
}

/// Header operations, names lower-cased as nginx compares them.
#[derive(Default)]
struct HeaderOps {
    remove: Vec<HeaderName>,
    rename: Vec<(HeaderName, Value)>,
    replace: Vec<(HeaderName, Option<Value>)>,
    /// With the name nginx's lookup also finds it under (`_` as `-`).
    add: Vec<(HeaderName, Option<HeaderName>, Option<Value>)>,
    append: Vec<(HeaderName, Option<Value>)>,
}

/// Query string or body operations.
#[derive(Default)]
struct ArgOps {
    remove: Vec<String>,
    rename: Vec<(String, Value)>,
    replace: Vec<(String, Option<Value>)>,
    add: Vec<(String, Option<Value>)>,
    append: Vec<(String, Option<Value>)>,
}

impl ArgOps {
    fn new(
        remove: &[String],
        rename: &[String],
        replace: &[String],
        add: &[String],
        append: &[String],
    ) -> ArgOps {
        let valued = |list: &[String]| -> Vec<(String, Option<Value>)> {
            list.iter()
                .map(|entry| {
                    let (name, value) = split_entry(entry);
                    (name.to_owned(), value.map(Value::new))
                })
                .collect()
        };
        ArgOps {
            remove: remove.iter().map(|e| split_entry(e).0.to_owned()).collect(),
            rename: valued(rename)
                .into_iter()
                .filter_map(|(name, value)| Some((name, value?)))
                .collect(),
            replace: valued(replace),
            add: valued(add),
            append: valued(append),
        }
    }

    fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.rename.is_empty()
            && self.replace.is_empty()
            && self.add.is_empty()
            && self.append.is_empty()
    }

    fn values(&self) -> impl Iterator<Item = &Value> {
        self.rename
            .iter()
            .map(|(_, v)| v)
            .chain(self.replace.iter().filter_map(|(_, v)| v.as_ref()))
            .chain(self.add.iter().filter_map(|(_, v)| v.as_ref()))
            .chain(self.append.iter().filter_map(|(_, v)| v.as_ref()))
    }

    /// The query string operations, in Kong's order.
    fn apply_query(&self, args: &mut Args, env: &Env<'_>) -> Result<(), String> {
        for name in &self.remove {
            args.remove(name);
        }
        for (old, new) in &self.rename {
            args.rename(old, &new.text(env)?);
        }
        for (name, value) in &self.replace {
            if args.get(name).is_some() {
                match value {
                    Some(value) => args.set(name, Arg::Text(value.text(env)?.into_owned())),
                    None => {
                        args.remove(name);
                    }
                }
            }
        }
        for (name, value) in &self.add {
            if let (None, Some(value)) = (args.get(name), value) {
                args.set(name, Arg::Text(value.text(env)?.into_owned()));
            }
        }
        for (name, value) in &self.append {
            if let Some(value) = value {
                args.append(name, value.text(env)?.into_owned());
            }
        }
        Ok(())
    }

    /// A form-urlencoded body; `None` when nothing changed it. Removing,
    /// renaming and replacing need a body; adding and appending do not.
    fn apply_form(&self, body: &[u8], env: &Env<'_>) -> Result<Option<String>, String> {
        let mut args = Args::parse(body);
        let mut changed = false;
        if !body.is_empty() {
            for name in &self.remove {
                args.remove(name);
                changed = true;
            }
            for (old, new) in &self.rename {
                changed |= args.rename(old, &new.text(env)?);
            }
            for (name, value) in &self.replace {
                if args.get(name).is_some() {
                    match value {
                        Some(value) => args.set(name, Arg::Text(value.text(env)?.into_owned())),
                        None => {
                            args.remove(name);
                        }
                    }
                    changed = true;
                }
            }
        }
        for (name, value) in &self.add {
            if args.get(name).is_none() {
                if let Some(value) = value {
                    args.set(name, Arg::Text(value.text(env)?.into_owned()));
                }
                changed = true;
            }
        }
        for (name, value) in &self.append {
            if let Some(value) = value {
                args.append(name, value.text(env)?.into_owned());
            }
            changed = true;
        }
        Ok(changed.then(|| args.encode()))
    }

    /// A JSON body; `None` when it is not an object Kong could change or
    /// nothing changed it. An empty body counts as `{}`.
    fn apply_json(&self, body: &[u8], env: &Env<'_>) -> Result<Option<Vec<u8>>, String> {
        let mut map = if body.is_empty() {
            Map::new()
        } else {
            match serde_json::from_slice(body) {
                Ok(Json::Object(map)) => map,
                _ => return Ok(None),
            }
        };
        // Lua truthiness of a decoded value: JSON null is cjson's userdata.
        let truthy = |v: Option<&Json>| !matches!(v, None | Some(Json::Bool(false)));
        let mut changed = false;
        if !body.is_empty() {
            for name in &self.remove {
                map.shift_remove(name);
                changed = true;
            }
            for (old, new) in &self.rename {
                let new = new.text(env)?;
                if *old != *new && truthy(map.get(old)) {
                    if let Some(value) = map.shift_remove(old) {
                        map.insert(new.into_owned(), value);
                        changed = true;
                    }
                }
            }
            for (name, value) in &self.replace {
                if truthy(map.get(name)) {
                    match value {
                        Some(value) => {
                            map.insert(name.clone(), Json::String(value.text(env)?.into_owned()));
                        }
                        None => {
                            map.shift_remove(name);
                        }
                    }
                    changed = true;
                }
            }
        }
        for (name, value) in &self.add {
            if !truthy(map.get(name)) {
                if let Some(value) = value {
                    map.insert(name.clone(), Json::String(value.text(env)?.into_owned()));
                }
                changed = true;
            }
        }
        for (name, value) in &self.append {
            if let Some(value) = value {
                let value = Json::String(value.text(env)?.into_owned());
                json_append(&mut map, name, value);
            }
            changed = true;
        }
        Ok(changed.then(|| serde_json::to_vec(&map).unwrap_or_default()))
    }
}

/// Both transformers' `append_value` on a decoded JSON object: a string
/// becomes a list, a list grows, other values are replaced by a list. A
/// non-empty object gains the value at Lua index 1 (key "1"), an empty one
/// is then an array to cjson.
fn json_append(map: &mut Map<String, Json>, name: &str, value: Json) {
    let new = match map.get_mut(name) {
        Some(Json::String(current)) => {
            Json::Array(vec![Json::String(std::mem::take(current)), value])
        }
        Some(Json::Array(list)) => {
            list.push(value);
            return;
        }
        Some(Json::Object(object)) if !object.is_empty() => {
            object.insert("1".to_owned(), value);
            return;
        }
        _ => Json::Array(vec![value]),
    };
    map.insert(name.to_owned(), new);
}

/// `kong.tools.uri.escape`, which `kong.service.request.set_path` applies.
const PATH_ESCAPE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b'/')
    .remove(b':')
    .remove(b';')
    .remove(b'=')
    .remove(b'?')
    .remove(b'@')
    .remove(b'[')
    .remove(b']')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'%');

/// The content types request-transformer can change a body of
/// (`get_content_type` in `access.lua`; multipart is not supported here).
#[derive(PartialEq)]
enum BodyType {
    Json,
    Multipart,
    Form,
}

fn body_type(content_type: &str) -> Option<BodyType> {
    let lower = content_type.to_ascii_lowercase();
    if lower.contains("application/json") {
        Some(BodyType::Json)
    } else if lower.contains("multipart/form-data") {
        Some(BodyType::Multipart)
    } else if lower.contains("application/x-www-form-urlencoded") {
        Some(BodyType::Form)
    } else {
        None
    }
}

/// `request-transformer` (`kong/plugins/request-transformer/access.lua`).
pub(crate) struct RequestTransformer {
    method: Option<Method>,
    /// Kong moves a form body into the query string when the method
    /// becomes GET, HEAD or TRACE.
    form_to_query: bool,
    uri: Option<Value>,
    headers: HeaderOps,
    query: ArgOps,
    body: ArgOps,
    /// Which request parts templates read, so that only those are kept
    /// as they were before the plugin changed them.
    reads_headers: bool,
    reads_query: bool,
    reads_captures: bool,
}

impl RequestTransformer {
    pub(crate) fn new(config: &serde_json::Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let config: RequestTransformerConfig = typed(config)?;
        let method = match &config.http_method {
            Some(m) => Some(
                Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let form_to_query = matches!(
            config.http_method.as_deref(),
            Some("GET" | "HEAD" | "TRACE")
        );
        let named_values = |list: &[String]| -> Result<Vec<(HeaderName, Option<Value>)>, String> {
            list.iter()
                .map(|entry| {
                    let (name, value) = split_entry(entry);
                    Ok((header_name(name)?, value.map(Value::new)))
                })
                .collect()
        };
        let headers = HeaderOps {
            remove: config
                .remove
                .headers
                .iter()
                .map(|e| header_name(split_entry(e).0))
                .collect::<Result<_, _>>()?,
            rename: named_values(&config.rename.headers)?
                .into_iter()
                .filter_map(|(name, value)| Some((name, value?)))
                .collect(),
            replace: named_values(&config.replace.headers)?,
            add: config
                .add
                .headers
                .iter()
                .map(|entry| {
                    let (name, value) = split_entry(entry);
                    let lookup = header_key(name);
                    let alt = (lookup != name.to_ascii_lowercase())
                        .then(|| HeaderName::from_bytes(lookup.as_bytes()).ok())
                        .flatten();
                    Ok((header_name(name)?, alt, value.map(Value::new)))
                })
                .collect::<Result<_, String>>()?,
            append: named_values(&config.append.headers)?,
        };
        let query = ArgOps::new(
            &config.remove.querystring,
            &config.rename.querystring,
            &config.replace.querystring,
            &config.add.querystring,
            &config.append.querystring,
        );
        let body = ArgOps::new(
            &config.remove.body,
            &config.rename.body,
            &config.replace.body,
            &config.add.body,
            &config.append.body,
        );
        // Kong renders nothing for an empty template (`param_value`).
        let uri = config
            .replace
            .uri
            .as_deref()
            .filter(|uri| !uri.is_empty())
            .map(Value::new);
        let mut templates: Vec<&Template> = Vec::new();
        templates.extend(uri.iter().map(|v| &v.template));
        templates.extend(headers.rename.iter().map(|(_, v)| &v.template));
        for list in [&headers.replace, &headers.append] {
            templates.extend(
                list.iter()
                    .filter_map(|(_, v)| v.as_ref().map(|v| &v.template)),
            );
        }
        templates.extend(
            headers
                .add
                .iter()
                .filter_map(|(_, _, v)| v.as_ref().map(|v| &v.template)),
        );
        templates.extend(query.values().chain(body.values()).map(|v| &v.template));
        let reads = |name: &str| templates.iter().any(|t| t.reads(name));
        let (reads_headers, reads_query, reads_captures) = (
            reads("headers"),
            reads("query_params"),
            reads("uri_captures"),
        );
        Ok(RequestTransformer {
            reads_headers,
            reads_query,
            reads_captures,
            method,
            form_to_query,
            uri,
            headers,
            query,
            body,
        })
    }

    fn transform_headers(&self, req: &mut PluginRequest<'_>, env: &Env<'_>) -> Result<(), String> {
        let ops = &self.headers;
        let headers = req.headers.map_mut();
        for name in &ops.remove {
            if *name != HOST {
                headers.remove(name);
            }
        }
        for (old, new) in &ops.rename {
            let new = new.text(env)?.to_ascii_lowercase();
            // A change of case only renames a header to itself.
            if *old == HOST || old.as_str() == new {
                continue;
            }
            let values: Vec<HeaderValue> = headers.get_all(old).iter().cloned().collect();
            if values.is_empty() {
                continue;
            }
            headers.remove(old);
            let new = HeaderName::from_bytes(new.as_bytes())
                .map_err(|_| format!("'{new}' is not a valid header"))?;
            headers.remove(&new);
            for value in values {
                headers.append(&new, value);
            }
        }
        for (name, value) in &ops.replace {
            if let Some(value) = value {
                if *name == HOST || headers.contains_key(name) {
                    headers.insert(name, value.header_value(env)?);
                }
            }
        }
        for (name, alt, value) in &ops.add {
            let present = headers.contains_key(name)
                || alt.as_ref().is_some_and(|alt| headers.contains_key(alt));
            if let (false, false, Some(value)) = (present, *name == HOST, value) {
                headers.insert(name, value.header_value(env)?);
            }
        }
        for (name, value) in &ops.append {
            if let Some(value) = value {
                let value = value.header_value(env)?;
                // Kong's table had no Host: appending sets it.
                if *name == HOST {
                    headers.insert(name, value);
                } else {
                    headers.append(name, value);
                }
            }
        }
        Ok(())
    }

    fn transform_body(&self, req: &mut PluginRequest<'_>, env: &Env<'_>) -> Result<(), String> {
        if self.body.is_empty() {
            return Ok(());
        }
        let body = req.body.clone().unwrap_or_default();
        let new = match body_type(req.content_type()) {
            Some(BodyType::Json) => self.body.apply_json(&body, env)?,
            Some(BodyType::Form) => self.body.apply_form(&body, env)?.map(String::into_bytes),
            Some(BodyType::Multipart) | None => None,
        };
        if let Some(new) = new {
            req.body = Some(Bytes::from(new));
        }
        Ok(())
    }

    fn transform_method(&self, req: &mut PluginRequest<'_>) {
        let Some(method) = &self.method else { return };
        req.method = method.clone();
        if !self.form_to_query || body_type(req.content_type()) != Some(BodyType::Form) {
            return;
        }
        let Some(body) = &req.body else { return };
        let form = Args::parse(body);
        if form.0.is_empty() {
            return;
        }
        let mut query = Args::parse(req.query.as_deref().unwrap_or("").as_bytes());
        for (name, value) in form.0 {
            let merged = match (query.remove_in_place(&name), value) {
                (None, value) => value,
                (Some(Arg::List(mut list)), Arg::List(more)) => {
                    list.extend(more);
                    Arg::List(list)
                }
                (Some(Arg::List(mut list)), value) => {
                    list.push(value);
                    Arg::List(list)
                }
                (Some(current), Arg::List(mut more)) => {
                    more.insert(0, current);
                    Arg::List(more)
                }
                (Some(current), value) => Arg::List(vec![current, value]),
            };
            query.set(&name, merged);
        }
        set_query(req, query.encode());
    }

    fn execute(&self, req: &mut PluginRequest<'_>, ctx: &Ctx<'_>) -> Result<(), String> {
        // Templates see the request as it came to this plugin.
        let headers = self.reads_headers.then(|| req.headers.map().clone());
        let query_args = self
            .reads_query
            .then(|| Args::parse(req.query.as_deref().unwrap_or("").as_bytes()));
        let env = Env {
            headers: headers.as_ref(),
            query: query_args.as_ref(),
            captures: ctx.uri_captures.as_deref().filter(|_| self.reads_captures),
        };
        if let Some(uri) = &self.uri {
            let path = uri.text(&env)?;
            if !path.starts_with('/') {
                return Err("path must start with /".into());
            }
            req.upstream_path =
                Some(percent_encoding::utf8_percent_encode(&path, PATH_ESCAPE).to_string());
        }
        self.transform_method(req);
        self.transform_headers(req, &env)?;
        self.transform_body(req, &env)?;
        if !self.query.is_empty() {
            // Kong changes its copy of the template environment's arguments.
            let mut args = match &query_args {
                Some(args) => args.clone(),
                None => Args::parse(req.query.as_deref().unwrap_or("").as_bytes()),
            };
            self.query.apply_query(&mut args, &env)?;
            set_query(req, args.encode_sorted());
        }
        Ok(())
    }
}

impl Plugin for RequestTransformer {
    fn filters_response(&self) -> bool {
        false
    }

    fn needs(&self) -> Needs {
        Needs {
            request_body: !self.body.is_empty() || self.form_to_query,
            uri_captures: self.reads_captures,
            ..Needs::default()
        }
    }

    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        match self.execute(req, ctx) {
            Ok(()) => Flow::Continue,
            Err(error) => runtime_error(
                "request-transformer",
                &format!("[request-transformer] failed to render the template: {error}"),
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Media types (`kong.tools.mime_type`)

#[derive(Debug, PartialEq)]
struct MediaType {
    kind: String,
    subtype: String,
    params: Vec<(String, String)>,
}

fn is_token(b: u8) -> bool {
    b < 0x80 && b > 0x1f && b != 0x7f && !b"()<>@,;:\\\"/[]?={} \t".contains(&b)
}

/// `parse_mime_type`: `type/subtype` (or `*`) and `; attribute=value`
/// parameters, nothing else; types lower-cased, parameter names too.
fn parse_media_type(s: &str) -> Option<MediaType> {
    let b = s.as_bytes();
    let token = |from: usize| {
        let len = b[from..].iter().take_while(|&&c| is_token(c)).count();
        (len > 0).then_some(from + len)
    };
    let (kind, subtype, mut pos) = match token(0) {
        Some(end) if b.get(end) == Some(&b'/') => {
            let sub_end = token(end + 1);
            match sub_end {
                Some(sub_end) => (
                    s[..end].to_ascii_lowercase(),
                    s[end + 1..sub_end].to_ascii_lowercase(),
                    sub_end,
                ),
                None if b.first() == Some(&b'*') => ("*".to_owned(), "*".to_owned(), 1),
                None => return None,
            }
        }
        _ if b.first() == Some(&b'*') => ("*".to_owned(), "*".to_owned(), 1),
        _ => return None,
    };
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        let mut p = pos;
        while matches!(b.get(p), Some(b' ' | b'\t')) {
            p += 1;
        }
        if b.get(p) != Some(&b';') {
            break;
        }
        p += 1;
        while matches!(b.get(p), Some(b' ' | b'\t')) {
            p += 1;
        }
        let Some(name_end) = token(p) else { break };
        if b.get(name_end) != Some(&b'=') {
            break;
        }
        let value_start = name_end + 1;
        let (value, end) = if let Some(value_end) = token(value_start) {
            (s[value_start..value_end].to_owned(), value_end)
        } else if b.get(value_start) == Some(&b'"') {
            let mut q = value_start + 1;
            // qdtext (any byte but controls and the quote) takes a
            // backslash before quoted-pair can, as the grammar orders them.
            while b
                .get(q)
                .is_some_and(|&c| c != b'"' && c > 0x1f && c != 0x7f)
            {
                q += 1;
            }
            if b.get(q) != Some(&b'"') {
                break;
            }
            (s[value_start + 1..q].to_owned(), q + 1)
        } else {
            break;
        };
        let name = s[p..name_end].to_ascii_lowercase();
        match params.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => *v = value,
            None => params.push((name, value)),
        }
        pos = end;
    }
    (pos == b.len()).then_some(MediaType {
        kind,
        subtype,
        params,
    })
}

/// response-transformer's `is_json_body`: any listed type that is
/// `application/json` or `application/*+json`.
fn is_json_body(content_type: Option<&HeaderValue>) -> bool {
    let Some(content_type) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    content_type.split(',').any(|part| {
        parse_media_type(part.trim()).is_some_and(|m| {
            m.kind == "application" && (m.subtype == "json" || m.subtype.ends_with("+json"))
        })
    })
}

// ---------------------------------------------------------------------------
// response-transformer

#[derive(Deserialize, Default)]
#[serde(default)]
struct JsonLists {
    json: Vec<String>,
    json_types: Vec<String>,
    headers: Vec<String>,
}

#[derive(Deserialize)]
struct ResponseTransformerConfig {
    #[serde(default)]
    remove: JsonLists,
    #[serde(default)]
    rename: JsonLists,
    #[serde(default)]
    replace: JsonLists,
    #[serde(default)]
    add: JsonLists,
    #[serde(default)]
    append: JsonLists,
}

/// A response header operation: the name set or cleared, and the name
/// nginx's header table finds it under.
struct ResponseHeader {
    name: HeaderName,
    lookup: HeaderName,
}

impl ResponseHeader {
    fn new(name: &str) -> Option<ResponseHeader> {
        header_name(name).ok()?;
        let lookup = HeaderName::from_bytes(header_key(name).as_bytes()).ok()?;
        // kong.response.set_header, add_header and clear_header go through
        // nginx's `ngx.header`, which writes `_` as `-`.
        Some(ResponseHeader {
            name: lookup.clone(),
            lookup,
        })
    }
}

#[derive(Default)]
struct JsonOps {
    remove: Vec<String>,
    rename: Vec<(String, String)>,
    replace: Vec<(String, Json)>,
    add: Vec<(String, Json)>,
    append: Vec<(String, Json)>,
}

/// cjson's string escaping.
fn cjson_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\x08' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\x0c' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// body_transformer's `json_value`: the configured text as cjson encodes
/// it, without the quotes and with `\"` and `\/` undone, then cast to the
/// configured JSON type. `None` when Kong skips the entry (no value, or
/// not a number).
fn json_value(value: Option<&str>, json_type: Option<&str>) -> Option<Json> {
    // `"k:"` has no value: Kong's `cjson.encode(nil)` makes it "null".
    let text = cjson_escape(value.unwrap_or("null"))
        .replace("\\\"", "\"")
        .replace("\\/", "/");
    match json_type {
        Some("number") => lua_tonumber(&text).map(json_number),
        Some("boolean") => Some(Json::Bool(text == "true")),
        _ => Some(Json::String(text)),
    }
}

impl JsonOps {
    fn new(config: &ResponseTransformerConfig) -> JsonOps {
        let typed_values = |lists: &JsonLists| -> Vec<(String, Json)> {
            lists
                .json
                .iter()
                .enumerate()
                .filter_map(|(i, entry)| {
                    let (name, value) = split_entry(entry);
                    let json_type = lists.json_types.get(i).map(String::as_str);
                    Some((name.to_owned(), json_value(value, json_type)?))
                })
                .collect()
        };
        JsonOps {
            remove: config
                .remove
                .json
                .iter()
                .map(|e| split_entry(e).0.to_owned())
                .collect(),
            rename: config
                .rename
                .json
                .iter()
                .filter_map(|entry| {
                    let (old, new) = split_entry(entry);
                    Some((old.to_owned(), new?.to_owned()))
                })
                .collect(),
            replace: typed_values(&config.replace),
            add: typed_values(&config.add),
            append: typed_values(&config.append),
        }
    }

    /// `transform_json_body`; `None` when the body is not a JSON object.
    fn transform(&self, body: &[u8]) -> Option<Vec<u8>> {
        let Ok(Json::Object(mut map)) = serde_json::from_slice::<Json>(body) else {
            return None;
        };
        for name in &self.remove {
            map.shift_remove(name);
        }
        for (old, new) in &self.rename {
            if let Some(value) = map.get(old).cloned() {
                map.insert(new.clone(), value);
                map.shift_remove(old);
            }
        }
        let truthy = |v: Option<&Json>| !matches!(v, None | Some(Json::Bool(false)));
        for (name, value) in &self.replace {
            if truthy(map.get(name)) {
                map.insert(name.clone(), value.clone());
            }
        }
        for (name, value) in &self.add {
            if !truthy(map.get(name)) {
                map.insert(name.clone(), value.clone());
            }
        }
        for (name, value) in &self.append {
            json_append(&mut map, name, value.clone());
        }
        serde_json::to_vec(&map).ok()
    }
}

/// `response-transformer` (`kong/plugins/response-transformer/`).
pub(crate) struct ResponseTransformer {
    remove: Vec<ResponseHeader>,
    rename: Vec<(ResponseHeader, HeaderName)>,
    replace: Vec<(ResponseHeader, HeaderValue)>,
    add: Vec<(ResponseHeader, HeaderValue)>,
    append: Vec<(HeaderName, HeaderValue)>,
    /// The JSON body operations, when there are any.
    json: Option<JsonOps>,
}

impl ResponseTransformer {
    pub(crate) fn new(config: &serde_json::Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let config: ResponseTransformerConfig = typed(config)?;
        // Kong's schema does not check these names; one nginx could not
        // send is left out rather than failing every response.
        let valued = |list: &[String]| -> Vec<(ResponseHeader, HeaderValue)> {
            list.iter()
                .filter_map(|entry| {
                    let (name, value) = split_entry(entry);
                    Some((
                        ResponseHeader::new(name)?,
                        HeaderValue::from_str(value?).ok()?,
                    ))
                })
                .collect()
        };
        let json = JsonOps::new(&config);
        let has_json = !(json.remove.is_empty()
            && json.rename.is_empty()
            && config.replace.json.is_empty()
            && config.add.json.is_empty()
            && config.append.json.is_empty());
        Ok(ResponseTransformer {
            remove: config
                .remove
                .headers
                .iter()
                .filter_map(|e| ResponseHeader::new(split_entry(e).0))
                .collect(),
            rename: config
                .rename
                .headers
                .iter()
                .filter_map(|entry| {
                    let (old, new) = split_entry(entry);
                    Some((ResponseHeader::new(old)?, header_name(new?).ok()?))
                })
                .collect(),
            replace: valued(&config.replace.headers),
            add: valued(&config.add.headers),
            append: valued(&config.append.headers)
                .into_iter()
                .map(|(h, v)| (h.name, v))
                .collect(),
            json: has_json.then_some(json),
        })
    }
}

impl Plugin for ResponseTransformer {
    fn needs(&self) -> Needs {
        Needs {
            response_body: self.json.is_some(),
            ..Needs::default()
        }
    }

    fn access(&self, _req: &mut PluginRequest<'_>, _ctx: &mut Ctx<'_>) -> Flow {
        Flow::Continue
    }

    fn response(&self, _ctx: &mut Ctx<'_>, _status: StatusCode, headers: &mut HeaderMap) {
        // Kong tests presence on the headers as the response came, before
        // any of the operations.
        let renamed: Vec<Vec<HeaderValue>> = self
            .rename
            .iter()
            .map(|(old, _)| headers.get_all(&old.lookup).iter().cloned().collect())
            .collect();
        let replace: Vec<bool> = self
            .replace
            .iter()
            .map(|(h, _)| headers.contains_key(&h.lookup))
            .collect();
        let add: Vec<bool> = self
            .add
            .iter()
            .map(|(h, _)| headers.contains_key(&h.lookup))
            .collect();
        let json_body = self.json.is_some() && is_json_body(headers.get(CONTENT_TYPE));
        for header in &self.remove {
            headers.remove(&header.name);
        }
        for ((old, new), values) in self.rename.iter().zip(renamed) {
            if values.is_empty() {
                continue;
            }
            headers.remove(new);
            for value in values {
                headers.append(new, value);
            }
            headers.remove(&old.name);
        }
        for ((header, value), present) in self.replace.iter().zip(replace) {
            if present {
                headers.insert(&header.name, value.clone());
            }
        }
        for ((header, value), present) in self.add.iter().zip(add) {
            if !present {
                headers.insert(&header.name, value.clone());
            }
        }
        for (name, value) in &self.append {
            headers.append(name, value.clone());
        }
        if json_body {
            headers.remove(CONTENT_LENGTH);
        }
    }

    fn response_body(
        &self,
        _ctx: &mut Ctx<'_>,
        _status: StatusCode,
        headers: &mut HeaderMap,
        body: &mut Bytes,
    ) {
        let Some(json) = &self.json else { return };
        if !is_json_body(headers.get(CONTENT_TYPE)) {
            return;
        }
        match json.transform(body) {
            Some(new) => *body = Bytes::from(new),
            None => tracing::warn!("body transform failed: failed parsing json body"),
        }
    }
}

// ---------------------------------------------------------------------------
// correlation-id

#[derive(Deserialize)]
struct CorrelationIdConfig {
    #[serde(default)]
    header_name: Option<String>,
    #[serde(default = "default_generator")]
    generator: String,
    #[serde(default)]
    echo_downstream: bool,
}

fn default_generator() -> String {
    "uuid#counter".to_owned()
}

#[derive(Clone, Copy)]
enum Generator {
    Uuid,
    UuidCounter,
    Tracker,
}

/// `uuid#counter`'s per-worker uuid and counter. They are per process and
/// outlive configurations: a counter restarting with each configuration
/// would hand out the same ids again.
fn worker_ids() -> &'static (String, AtomicU64) {
    static IDS: OnceLock<(String, AtomicU64)> = OnceLock::new();
    IDS.get_or_init(|| (uuid::Uuid::new_v4().to_string(), AtomicU64::new(0)))
}

impl Generator {
    fn generate(self, req: Option<&PluginRequest<'_>>) -> HeaderValue {
        let id = match self {
            Generator::Uuid => uuid::Uuid::new_v4().to_string(),
            Generator::UuidCounter => {
                let (uuid, counter) = worker_ids();
                format!("{uuid}#{}", counter.fetch_add(1, Ordering::Relaxed) + 1)
            }
            Generator::Tracker => {
                // nginx's server address and port, worker pid, connection
                // serial and request count on it, and time.
                let (addr, serial, requests) = req
                    .map_or((std::net::Ipv4Addr::UNSPECIFIED.into(), 0, 0), |r| {
                        r.connection
                    });
                let port = req.map_or(0, |r| r.local_port);
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                format!(
                    "{addr}-{port}-{}-{serial}-{requests}-{now:.3}",
                    std::process::id(),
                )
            }
        };
        HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// `correlation-id` (`kong/plugins/correlation-id/handler.lua`).
pub(crate) struct CorrelationId {
    header: HeaderName,
    generator: Generator,
    echo_downstream: bool,
}

impl CorrelationId {
    pub(crate) fn new(config: &serde_json::Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let config: CorrelationIdConfig = typed(config)?;
        let generator = match config.generator.as_str() {
            "uuid" => Generator::Uuid,
            "uuid#counter" => Generator::UuidCounter,
            "tracker" => Generator::Tracker,
            other => return Err(format!("unknown generator '{other}'")),
        };
        Ok(CorrelationId {
            header: header_name(config.header_name.as_deref().unwrap_or("Kong-Request-ID"))?,
            generator,
            echo_downstream: config.echo_downstream,
        })
    }
}

impl Plugin for CorrelationId {
    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        let sent = req
            .headers
            .get(self.header.as_str())
            .filter(|id| !id.trim_ascii().is_empty())
            .and_then(|id| HeaderValue::from_bytes(id).ok());
        let id = match sent {
            Some(id) => id,
            None => {
                let id = self.generator.generate(Some(req));
                req.headers.insert(self.header.clone(), id.clone());
                id
            }
        };
        // Kept for echo_downstream and for log entries, where Kong puts it
        // (`kong.log.set_serialize_value("correlation_id", …)`).
        ctx.correlation_id = Some(id);
        Flow::Continue
    }

    fn response(&self, ctx: &mut Ctx<'_>, _status: StatusCode, headers: &mut HeaderMap) {
        if !self.echo_downstream {
            return;
        }
        let id = ctx
            .correlation_id
            .clone()
            .unwrap_or_else(|| self.generator.generate(None));
        headers.insert(&self.header, id);
    }
}

// ---------------------------------------------------------------------------
// proxy-cache

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A stored response (the memory strategy's JSON document).
struct Cached {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    /// When it was stored, in whole seconds as `ngx.time()`.
    timestamp: u64,
    /// The resource's TTL at the time (`res_ttl`).
    ttl: f64,
    /// When the shared dictionary drops it; none for a TTL of 0.
    expires: Option<Instant>,
    size: usize,
    /// For least-recently-used eviction.
    used: AtomicU64,
}

/// proxy-cache's in-memory store, shared by runtimes: Kong's shared
/// dictionary, with entries that expire and the least recently used
/// evicted past a size cap.
pub(crate) struct Store {
    entries: DashMap<Box<str>, Arc<Cached>>,
    used_bytes: AtomicUsize,
    capacity: usize,
    clock: AtomicU64,
}

impl Default for Store {
    fn default() -> Store {
        // Kong's `kong_db_cache` dictionary is `mem_cache_size`, 128m by default.
        Store::with_capacity(128 * 1024 * 1024)
    }
}

impl Cached {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
}

impl Store {
    fn with_capacity(capacity: usize) -> Store {
        Store {
            entries: DashMap::new(),
            used_bytes: AtomicUsize::new(0),
            capacity,
            clock: AtomicU64::new(0),
        }
    }

    fn remove_where(&self, key: &str, condition: impl FnOnce(&Cached) -> bool) {
        if let Some((_, gone)) = self.entries.remove_if(key, |_, entry| condition(entry)) {
            self.used_bytes.fetch_sub(gone.size, Ordering::Relaxed);
        }
    }

    fn fetch(&self, key: &str) -> Option<Arc<Cached>> {
        let entry = Arc::clone(&*self.entries.get(key)?);
        let now = Instant::now();
        if entry.expired(now) {
            self.remove_where(key, |e| e.expired(now));
            return None;
        }
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        entry.used.store(tick, Ordering::Relaxed);
        Some(entry)
    }

    /// `dict:set(key, value, ttl)`: a TTL of 0 never expires.
    fn store(&self, key: &str, mut entry: Cached, ttl: f64) {
        if ttl < 0.0 || entry.size > self.capacity {
            return;
        }
        entry.expires = (ttl > 0.0).then(|| Instant::now() + Duration::from_secs_f64(ttl.min(1e9)));
        entry.used = AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed));
        let size = entry.size;
        if let Some(old) = self.entries.insert(key.into(), Arc::new(entry)) {
            self.used_bytes.fetch_sub(old.size, Ordering::Relaxed);
        }
        if self.used_bytes.fetch_add(size, Ordering::Relaxed) + size > self.capacity {
            self.evict();
        }
    }

    /// Drops expired entries, then the least recently used until the
    /// store fits its capacity again.
    fn evict(&self) {
        let now = Instant::now();
        self.entries.retain(|_, entry| {
            let expired = entry.expired(now);
            if expired {
                self.used_bytes.fetch_sub(entry.size, Ordering::Relaxed);
            }
            !expired
        });
        let mut candidates: Vec<(u64, Box<str>)> = self
            .entries
            .iter()
            .map(|e| (e.used.load(Ordering::Relaxed), e.key().clone()))
            .collect();
        candidates.sort_unstable();
        for (_, key) in candidates {
            if self.used_bytes.load(Ordering::Relaxed) <= self.capacity {
                break;
            }
            self.remove_where(&key, |_| true);
        }
    }
}

/// What proxy-cache decided for the response it will see.
#[derive(Clone, Copy, Debug, PartialEq)]
enum CacheStatus {
    Miss,
    Hit,
    Refresh,
    Bypass,
}

impl CacheStatus {
    fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheStatus::Miss => "Miss",
            CacheStatus::Hit => "Hit",
            CacheStatus::Refresh => "Refresh",
            CacheStatus::Bypass => "Bypass",
        })
    }
}

/// A response proxy-cache means to store (Kong's `ctx.proxy_cache`).
struct Pending {
    key: String,
    /// The headers to store, once `response` found the response cacheable.
    headers: Option<Vec<(HeaderName, HeaderValue)>>,
    ttl: f64,
}

/// proxy-cache's per-request state.
pub(crate) struct CacheState {
    key: Option<HeaderValue>,
    status: Option<CacheStatus>,
    /// The request asked for the diagnostic headers (`Kong-Debug`).
    debug: bool,
    pending: Option<Pending>,
}

/// A parsed `Cache-Control` value (`parse_directive_header`).
#[derive(Debug, PartialEq)]
enum Directive {
    Flag,
    Number(f64),
    Text(String),
}

fn directives<'h>(values: impl Iterator<Item = &'h [u8]>) -> Vec<(String, Directive)> {
    let joined = values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .collect::<Vec<_>>()
        .join(", ");
    let mut out: Vec<(String, Directive)> = Vec::new();
    for part in joined.split(',').filter(|p| !p.is_empty()) {
        let part = part.trim_start();
        let (name, value) = match part.split_once('=') {
            Some((name, value)) => (name, (!value.is_empty()).then_some(value)),
            None => (part, None),
        };
        if name.is_empty() {
            continue;
        }
        let directive = match value {
            None => Directive::Flag,
            Some(value) => lua_tonumber(value)
                .map_or_else(|| Directive::Text(value.to_owned()), Directive::Number),
        };
        let name = name.to_ascii_lowercase();
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, d)) => *d = directive,
            None => out.push((name, directive)),
        }
    }
    out
}

fn directive<'d>(directives: &'d [(String, Directive)], name: &str) -> Option<&'d Directive> {
    directives.iter().find(|(n, _)| n == name).map(|(_, d)| d)
}

/// A request directive Kong compares with a number; Lua fails comparing
/// anything else.
fn numeric_directive(
    directives: &[(String, Directive)],
    name: &str,
) -> Result<Option<f64>, String> {
    match directive(directives, name) {
        None => Ok(None),
        Some(Directive::Number(n)) => Ok(Some(*n)),
        Some(_) => Err(format!("attempt to compare number with non-number {name}")),
    }
}

#[derive(Deserialize)]
struct ResponseHeadersConfig {
    #[serde(default = "yes")]
    age: bool,
    #[serde(rename = "X-Cache-Status", default = "yes")]
    status: bool,
    #[serde(rename = "X-Cache-Key", default = "yes")]
    key: bool,
}

fn yes() -> bool {
    true
}

impl Default for ResponseHeadersConfig {
    fn default() -> Self {
        ResponseHeadersConfig {
            age: true,
            status: true,
            key: true,
        }
    }
}

#[derive(Deserialize)]
struct ProxyCacheConfig {
    response_code: Vec<u16>,
    request_method: Vec<String>,
    content_type: Vec<String>,
    #[serde(default)]
    cache_ttl: Option<u64>,
    #[serde(default)]
    cache_control: bool,
    #[serde(default)]
    ignore_uri_case: Option<bool>,
    #[serde(default)]
    storage_ttl: Option<i64>,
    #[serde(default)]
    vary_query_params: Option<Vec<String>>,
    #[serde(default)]
    vary_headers: Option<Vec<String>>,
    #[serde(default)]
    response_headers: Option<ResponseHeadersConfig>,
}

const X_CACHE_STATUS: HeaderName = HeaderName::from_static("x-cache-status");
const X_CACHE_KEY: HeaderName = HeaderName::from_static("x-cache-key");
const KONG_DEBUG: HeaderName = HeaderName::from_static("kong-debug");

/// Headers a stored response never replays (`overwritable_header`), and
/// `Date`: nginx hides the upstream's and writes its own, which a hit then
/// gets too.
fn overwritable(name: &HeaderName) -> bool {
    const HOP_BY_HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    ];
    *name != http::header::DATE
        && !HOP_BY_HOP.contains(&name.as_str())
        && !name.as_str().contains("ratelimit-remaining")
}

fn sha256_hex(input: &str) -> String {
    use std::fmt::Write;
    Sha256::digest(input.as_bytes())
        .iter()
        .fold(String::with_capacity(64), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// `generate_key_from`: `field=value` for the fields present, repeated
/// values sorted and joined with commas, joined with colons.
fn key_from(fields: impl Iterator<Item = (String, Option<Arg>)>) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (field, value) in fields {
        match value {
            None => {}
            Some(Arg::Flag) => parts.push(field),
            Some(Arg::Text(text)) => parts.push(format!("{field}={text}")),
            Some(Arg::List(items)) => {
                let mut items: Vec<String> = items
                    .into_iter()
                    .map(|item| match item {
                        Arg::Text(text) => text,
                        _ => "true".to_owned(),
                    })
                    .collect();
                items.sort_unstable();
                parts.push(format!("{field}={}", items.join(",")));
            }
        }
    }
    parts.join(":")
}

/// `proxy-cache` with the memory strategy (`kong/plugins/proxy-cache/`).
pub(crate) struct ProxyCache {
    shared: Arc<Shared>,
    methods: Vec<Method>,
    response_codes: Vec<u16>,
    /// Configured content types; an invalid one never matches.
    content_types: Vec<Option<MediaType>>,
    cache_ttl: u64,
    storage_ttl: Option<i64>,
    cache_control: bool,
    ignore_uri_case: bool,
    /// None: every query argument is part of the key.
    vary_query_params: Option<Vec<String>>,
    /// As configured, with the header each names.
    vary_headers: Vec<(String, String)>,
    show_age: bool,
    show_status: bool,
    show_key: bool,
}

impl ProxyCache {
    pub(crate) fn new(config: &serde_json::Value, cx: &BuildContext<'_>) -> Result<Self, String> {
        ProxyCache::with_store(config, Arc::clone(cx.shared))
    }

    fn with_store(config: &serde_json::Value, shared: Arc<Shared>) -> Result<Self, String> {
        let config: ProxyCacheConfig = typed(config)?;
        let methods = config
            .request_method
            .iter()
            .map(|m| Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let shown = config.response_headers.unwrap_or_default();
        Ok(ProxyCache {
            shared,
            methods,
            response_codes: config.response_code,
            content_types: config
                .content_type
                .iter()
                .map(|ct| parse_media_type(ct))
                .collect(),
            cache_ttl: config.cache_ttl.unwrap_or(300),
            storage_ttl: config.storage_ttl,
            cache_control: config.cache_control,
            ignore_uri_case: config.ignore_uri_case.unwrap_or(false),
            vary_query_params: config.vary_query_params.filter(|v| !v.is_empty()),
            vary_headers: config
                .vary_headers
                .unwrap_or_default()
                .into_iter()
                .map(|h| {
                    let key = header_key(&h);
                    (h, key)
                })
                .collect(),
            show_age: shown.age,
            show_status: shown.status,
            show_key: shown.key,
        })
    }

    /// `build_cache_key`: the route (and consumer), method, request line,
    /// query arguments and the configured headers, hashed.
    fn cache_key(
        &self,
        req: &PluginRequest<'_>,
        consumer_id: Option<&str>,
        route_id: &str,
    ) -> String {
        let prefix = match consumer_id {
            Some(consumer_id) => format!("{consumer_id}:{route_id}"),
            None => route_id.to_owned(),
        };
        let method = req.method.as_str();
        // Kong strips `?...` from nginx's `$request`, the whole request
        // line: without a query the protocol stays in.
        let mut uri = match req.target.split_once('?') {
            Some((path, _)) => format!("{method} {path}"),
            None => format!("{method} {} HTTP/1.1", req.target),
        };
        if self.ignore_uri_case {
            uri = uri.to_lowercase();
        }
        let args = Args::parse(req.query.as_deref().unwrap_or("").as_bytes());
        let params = match &self.vary_query_params {
            Some(fields) => key_from(fields.iter().map(|f| (f.clone(), args.get(f).cloned()))),
            None => {
                let mut all = args.0;
                all.sort_by(|a, b| a.0.cmp(&b.0));
                key_from(all.into_iter().map(|(k, v)| (k, Some(v))))
            }
        };
        let headers = key_from(self.vary_headers.iter().map(|(field, key)| {
            let values: Vec<Arg> = req
                .headers
                .get_all(key.as_str())
                .map(|v| Arg::Text(String::from_utf8_lossy(v).into_owned()))
                .collect();
            let value = match values.len() {
                0 => None,
                1 => values.into_iter().next(),
                _ => Some(Arg::List(values)),
            };
            (field.clone(), value)
        }));
        sha256_hex(&format!("{prefix}|{method}|{uri}|{params}|{headers}"))
    }

    /// `calculate_resource_ttl`: `s-maxage`, `max-age`, else `Expires`.
    fn resource_ttl(cc: &[(String, Directive)], headers: &HeaderMap) -> f64 {
        let max_age = match directive(cc, "s-maxage").or_else(|| directive(cc, "max-age")) {
            Some(Directive::Number(n)) => Some(*n),
            // Lua fails on `math.max` of a non-number: not cacheable.
            Some(_) => Some(0.0),
            None => headers
                .get_all(EXPIRES)
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok())
                .map(|at| {
                    let at = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    at as f64 - now_secs() as f64
                }),
        };
        max_age.map_or(0.0, |ttl| ttl.max(0.0))
    }

    fn content_type_matches(&self, headers: &HeaderMap) -> bool {
        let Some(content_type) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        if content_type.is_empty() {
            return false;
        }
        let actual = parse_media_type(content_type);
        self.content_types.iter().flatten().any(|expected| {
            let kind =
                expected.kind == "*" || actual.as_ref().is_some_and(|a| a.kind == expected.kind);
            let subtype = expected.subtype == "*"
                || actual
                    .as_ref()
                    .is_some_and(|a| a.subtype == expected.subtype);
            let params = actual.as_ref().map_or(&[][..], |a| &a.params[..]);
            kind && subtype
                && params.len() == expected.params.len()
                && expected
                    .params
                    .iter()
                    .all(|(k, v)| params.iter().any(|(pk, pv)| pk == k && pv == v))
        })
    }

    fn cacheable_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        cc: &[(String, Directive)],
    ) -> bool {
        if !self.response_codes.contains(&status.as_u16()) || !self.content_type_matches(headers) {
            return false;
        }
        if self.cache_control
            && (["private", "no-store", "no-cache"]
                .iter()
                .any(|d| directive(cc, d).is_some())
                || ProxyCache::resource_ttl(cc, headers) <= 0.0)
        {
            return false;
        }
        true
    }

    fn hit(&self, cached: &Cached, key: HeaderValue, debug: bool) -> Response<ResponseBody> {
        let mut response = Response::new(Either::Right(Full::new(cached.body.clone())));
        *response.status_mut() = cached.status;
        let headers = response.headers_mut();
        for (name, value) in &cached.headers {
            headers.append(name, value.clone());
        }
        if debug || self.show_age {
            headers.insert(
                AGE,
                HeaderValue::from(now_secs().saturating_sub(cached.timestamp)),
            );
        }
        if debug || self.show_status {
            headers.insert(X_CACHE_STATUS, CacheStatus::Hit.header());
        }
        if debug || self.show_key {
            headers.insert(X_CACHE_KEY, key);
        }
        response
    }

    fn lookup(&self, req: &PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Result<Flow, String> {
        let debug = req.headers.contains(KONG_DEBUG);
        let cc = directives(req.headers.get_all(CACHE_CONTROL));
        let cacheable = self.methods.contains(&req.method)
            && !(self.cache_control
                && (directive(&cc, "no-store").is_some() || directive(&cc, "no-cache").is_some()));
        if !cacheable {
            ctx.cache = Some(Box::new(CacheState {
                key: None,
                status: Some(CacheStatus::Bypass),
                debug,
                pending: None,
            }));
            return Ok(Flow::Continue);
        }
        let consumer_id = ctx.consumer.as_ref().map(|c| &*c.id);
        let key = self.cache_key(req, consumer_id, ctx.route_id);
        let key_value = HeaderValue::from_str(&key).map_err(|e| e.to_string())?;
        let mut state = CacheState {
            key: Some(key_value.clone()),
            status: None,
            debug,
            pending: None,
        };
        let status = match self.shared.cache.fetch(&key) {
            None => {
                if self.cache_control && directive(&cc, "only-if-cached").is_some() {
                    ctx.cache = Some(Box::new(state));
                    return Ok(Flow::Exit(exit_message(
                        StatusCode::GATEWAY_TIMEOUT,
                        "The upstream server is timing out",
                    )));
                }
                CacheStatus::Miss
            }
            Some(cached) => {
                let age = now_secs().saturating_sub(cached.timestamp) as f64;
                let stale = if self.cache_control {
                    numeric_directive(&cc, "max-age")?.is_some_and(|max| age > max)
                        || numeric_directive(&cc, "max-stale")?
                            .is_some_and(|max| age - cached.ttl > max)
                        || numeric_directive(&cc, "min-fresh")?
                            .is_some_and(|min| cached.ttl - age < min)
                } else {
                    // The store may keep it up to `storage_ttl`; it is not
                    // served past `cache_ttl`.
                    age > self.cache_ttl as f64
                };
                if !stale {
                    ctx.cache = None;
                    return Ok(Flow::Exit(self.hit(&cached, key_value, debug)));
                }
                CacheStatus::Refresh
            }
        };
        state.status = Some(status);
        state.pending = Some(Pending {
            key,
            headers: None,
            ttl: 0.0,
        });
        ctx.cache = Some(Box::new(state));
        Ok(Flow::Continue)
    }
}

impl Plugin for ProxyCache {
    fn needs(&self) -> Needs {
        Needs {
            response_body: true,
            ..Needs::default()
        }
    }

    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        match self.lookup(req, ctx) {
            Ok(flow) => flow,
            Err(error) => runtime_error("proxy-cache", &error),
        }
    }

    fn response(&self, ctx: &mut Ctx<'_>, status: StatusCode, headers: &mut HeaderMap) {
        let Some(state) = ctx.cache.as_mut() else {
            return;
        };
        let mut ttl = None;
        if state.pending.is_some() {
            let cc = directives(
                headers
                    .get_all(CACHE_CONTROL)
                    .iter()
                    .map(HeaderValue::as_bytes),
            );
            if self.cacheable_response(status, headers, &cc) {
                ttl = Some(if self.cache_control {
                    ProxyCache::resource_ttl(&cc, headers)
                } else {
                    self.cache_ttl as f64
                });
            } else {
                state.status = Some(CacheStatus::Bypass);
                state.pending = None;
            }
        }
        if let Some(key) = state.key.as_ref().filter(|_| state.debug || self.show_key) {
            headers.insert(X_CACHE_KEY, key.clone());
        }
        if let Some(status) = state.status.filter(|_| state.debug || self.show_status) {
            headers.insert(X_CACHE_STATUS, status.header());
        }
        if let (Some(pending), Some(ttl)) = (state.pending.as_mut(), ttl) {
            pending.ttl = ttl;
            pending.headers = Some(
                headers
                    .iter()
                    .filter(|(name, _)| {
                        overwritable(name)
                            && **name != AGE
                            && **name != X_CACHE_STATUS
                            && **name != X_CACHE_KEY
                    })
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect(),
            );
        }
    }

    fn response_body(
        &self,
        ctx: &mut Ctx<'_>,
        status: StatusCode,
        _headers: &mut HeaderMap,
        body: &mut Bytes,
    ) {
        let Some(pending) = ctx.cache.as_mut().and_then(|s| s.pending.take()) else {
            return;
        };
        let Some(headers) = pending.headers else {
            return;
        };
        let size = pending.key.len()
            + body.len()
            + headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 32)
                .sum::<usize>()
            + 128;
        let ttl = match self.storage_ttl {
            Some(ttl) => ttl as f64,
            None if self.cache_control => pending.ttl,
            None => self.cache_ttl as f64,
        };
        let entry = Cached {
            status,
            headers,
            body: body.clone(),
            timestamp: now_secs(),
            ttl: pending.ttl,
            expires: None,
            size,
            used: AtomicU64::new(0),
        };
        self.shared.cache.store(&pending.key, entry, ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with<'e>(
        headers: &'e HeaderMap,
        query: &'e Args,
        captures: Option<&'e UriCaptures>,
    ) -> Env<'e> {
        Env {
            headers: Some(headers),
            query: Some(query),
            captures,
        }
    }

    fn render(source: &str, env: &Env<'_>) -> Result<String, String> {
        Template::parse(source).render(env).map(Cow::into_owned)
    }

    #[test]
    fn splits_entries_like_lua() {
        assert_eq!(split_entry("a:b"), ("a", Some("b")));
        assert_eq!(split_entry("h2:value:2"), ("h2", Some("value:2")));
        assert_eq!(split_entry("a::b"), ("a", Some("b")));
        assert_eq!(split_entry("a"), ("a", None));
        assert_eq!(split_entry("a:"), ("a", None));
    }

    #[test]
    fn formats_numbers_like_lua() {
        assert_eq!(lua_number(200.0), "200");
        assert_eq!(lua_number(0.5), "0.5");
        assert_eq!(lua_number(-3.25), "-3.25");
        assert_eq!(lua_number(1e15), "1e+15");
        assert_eq!(lua_number(0.1 + 0.2), "0.3");
        assert_eq!(lua_number(1e-5), "1e-05");
        assert_eq!(lua_tonumber(" 0x10 "), Some(16.0));
        assert_eq!(lua_tonumber("-1"), Some(-1.0));
        assert_eq!(lua_tonumber("1e2"), Some(100.0));
        assert_eq!(lua_tonumber("inf"), None);
        assert_eq!(lua_tonumber("--1"), None);
        assert_eq!(lua_tonumber("abc"), None);
    }

    #[test]
    fn parses_and_encodes_arguments_like_nginx() {
        let args = Args::parse(b"a=1&flag&b=x+y%21&a=2&=skipped&e=");
        assert_eq!(
            args.get("a"),
            Some(&Arg::List(vec![
                Arg::Text("1".into()),
                Arg::Text("2".into())
            ]))
        );
        assert_eq!(args.get("flag"), Some(&Arg::Flag));
        assert_eq!(args.get("b"), Some(&Arg::Text("x y!".into())));
        assert_eq!(args.get("e"), Some(&Arg::Text(String::new())));
        assert_eq!(args.get(""), None);
        // set_query: each argument encoded, the encoded parts sorted.
        assert_eq!(args.encode_sorted(), "a=1&a=2&b=x%20y%21&e=&flag");
        assert_eq!(args.encode(), "a=1&a=2&flag&b=x%20y%21&e=");
    }

    #[test]
    fn renders_templates_from_the_request() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("example.test"));
        headers.insert("x-foo", HeaderValue::from_static("bar"));
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        let query = Args::parse(b"q1=20&flag");
        let regex = Regex::new(r"^/requests/user1/(?P<user1>\w+)/user2/(?P<user2>\S+)").unwrap();
        let captures = UriCaptures::new(&regex, "/requests/user1/foo/user2/bar").unwrap();
        let env = env_with(&headers, &query, Some(&captures));

        assert_eq!(render("plain", &env).unwrap(), "plain");
        assert_eq!(render("$(headers.host)", &env).unwrap(), "example.test");
        assert_eq!(render("$(headers.X_Foo)", &env).unwrap(), "bar");
        assert_eq!(render("v=$(headers['x-foo'])!", &env).unwrap(), "v=bar!");
        assert_eq!(render("$(query_params.q1)", &env).unwrap(), "20");
        assert_eq!(render("$(query_params.flag)", &env).unwrap(), "true");
        assert_eq!(render("$(query_params.none)", &env).unwrap(), "");
        assert_eq!(
            render("/u/$(uri_captures.user2)/$(uri_captures[1])", &env).unwrap(),
            "/u/bar/foo"
        );
        assert_eq!(
            render("$(uri_captures.missing or 'default1')", &env).unwrap(),
            "default1"
        );
        assert_eq!(
            render("$('$(uri_captures.user1)')", &env).unwrap(),
            "$(uri_captures.user1)"
        );
        let first = concat!(
            r#"$(type(headers["x-multi"]) == "table""#,
            r#" and headers["x-multi"][1] .. "-first" or headers["x-multi"])"#
        );
        assert_eq!(render(first, &env).unwrap(), "1-first");
        assert_eq!(render("$(query_params.q1 * 2)", &env).unwrap(), "40");
        assert_eq!(
            render("$(headers.host:upper())", &env).unwrap(),
            "EXAMPLE.TEST"
        );
        assert_eq!(
            render("$(headers.host:sub(1, 7))", &env).unwrap(),
            "example"
        );
        // Kong's sandbox has no `string`, `tostring` or `math`.
        assert!(render("$(string.sub(headers.host, 1, 7))", &env).is_err());
        assert!(render("$(tostring(1))", &env).is_err());
        assert_eq!(render("$(shared.my_version)", &env).unwrap(), "");
        // Lua errors and code that does not compile fail the request.
        assert!(render("$(10 * uri_captures.user1)", &env).is_err());
        assert!(render("$(ERROR())", &env).is_err());
        assert!(render("$(shared.written = true)", &env).is_err());
        let deep = format!("$({}1{})", "(".repeat(500), ")".repeat(500));
        assert!(render(&deep, &env).is_err());
        // An unbalanced `$(` is text.
        assert_eq!(render("a$(b", &env).unwrap(), "a$(b");
        assert!(Template::parse("x-$(headers.a)").reads("headers"));
        assert!(!Template::parse("x-$(query_params.a)").reads("headers"));
    }

    #[test]
    fn captures_need_more_than_the_whole_match() {
        let plain = Regex::new("^/plain").unwrap();
        assert!(UriCaptures::new(&plain, "/plain/x").is_none());
        let one = Regex::new("^/(gw/)?api/(?<subpath>htest)$").unwrap();
        let captures = UriCaptures::new(&one, "/api/htest").unwrap();
        assert_eq!(captures.index(0), Some("/api/htest"));
        assert_eq!(captures.index(1), None);
        assert_eq!(captures.name("subpath"), Some("htest"));
    }

    fn ops(
        remove: &[&str],
        rename: &[&str],
        replace: &[&str],
        add: &[&str],
        append: &[&str],
    ) -> ArgOps {
        let owned = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        ArgOps::new(
            &owned(remove),
            &owned(rename),
            &owned(replace),
            &owned(add),
            &owned(append),
        )
    }

    #[test]
    fn transforms_json_request_bodies() {
        let headers = HeaderMap::new();
        let query = Args::default();
        let env = env_with(&headers, &query, None);
        let body_ops = ops(
            &["secret"],
            &["old:new"],
            &["mode:fast", "off:on"],
            &["added:new", "flag:x"],
            &["list:v"],
        );
        let body = br#"{"secret":"x","mode":"slow","old":1,"off":false,"flag":false,"list":"a","keep":[]}"#;
        let out = body_ops.apply_json(body, &env).unwrap().unwrap();
        let out: Json = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"mode":"fast","new":1,"off":false,"flag":"x","list":["a","v"],"keep":[],"added":"new"})
        );
        // Malformed JSON is left alone; an empty body only gets additions.
        assert_eq!(body_ops.apply_json(b"{oops", &env).unwrap(), None);
        let empty: Json =
            serde_json::from_slice(&body_ops.apply_json(b"", &env).unwrap().unwrap()).unwrap();
        assert_eq!(
            empty,
            serde_json::json!({"added":"new","flag":"x","list":["v"]})
        );
    }

    #[test]
    fn transforms_form_bodies_and_queries() {
        let headers = HeaderMap::new();
        let query = Args::default();
        let env = env_with(&headers, &query, None);
        let form_ops = ops(
            &["toremove"],
            &["a:b"],
            &["r:new value"],
            &["added:1"],
            &["p:2"],
        );
        let out = form_ops
            .apply_form(b"toremove=1&a=x&r=old&p=1", &env)
            .unwrap()
            .unwrap();
        assert_eq!(out, "b=x&r=new%20value&p=1&p=2&added=1");

        let query_ops = ops(
            &["q1"],
            &[],
            &["toreplacequery:no"],
            &["query-added:newvalue", "p1:anything:1"],
            &["p1:a2", "p2:b1"],
        );
        let mut args = Args::parse(b"q1=1&toreplacequery=yes&z=last");
        query_ops.apply_query(&mut args, &env).unwrap();
        assert_eq!(
            args.encode_sorted(),
            "p1=anything%3A1&p1=a2&p2=b1&query-added=newvalue&toreplacequery=no&z=last"
        );
    }

    #[test]
    fn json_values_follow_cjson() {
        assert_eq!(
            json_value(Some("v1"), None),
            Some(Json::String("v1".into()))
        );
        assert_eq!(
            json_value(Some("\"v1\""), Some("string")),
            Some(Json::String("\"v1\"".into()))
        );
        assert_eq!(
            json_value(Some("a/b"), None),
            Some(Json::String("a/b".into()))
        );
        assert_eq!(
            json_value(Some(r"a\b"), None),
            Some(Json::String(r"a\\b".into()))
        );
        assert_eq!(
            json_value(Some("-1"), Some("number")),
            Some(serde_json::json!(-1))
        );
        assert_eq!(
            json_value(Some("1.5"), Some("number")),
            Some(serde_json::json!(1.5))
        );
        assert_eq!(json_value(Some("x"), Some("number")), None);
        assert_eq!(
            json_value(Some("true"), Some("boolean")),
            Some(Json::Bool(true))
        );
        assert_eq!(
            json_value(Some("yes"), Some("boolean")),
            Some(Json::Bool(false))
        );
        // `"k:"`: cjson.encode(nil) is the text null.
        assert_eq!(json_value(None, None), Some(Json::String("null".into())));
    }

    #[test]
    fn transforms_json_response_bodies() {
        let config: ResponseTransformerConfig = serde_json::from_value(serde_json::json!({
            "remove": {"json": ["p1"]},
            "rename": {"json": ["p4:p2"]},
            "replace": {"json": ["p2:v2", "f:x"]},
            "add": {"json": ["p3:v1", "n:5", "f:y"], "json_types": ["string", "number", "string"]},
            "append": {"json": ["p3:v2", "o:z", "e:w"]},
        }))
        .unwrap();
        let ops = JsonOps::new(&config);
        let out = ops
            .transform(br#"{"p1":"v1","p4":"v1","f":false,"o":{"k":1},"e":{}}"#)
            .unwrap();
        let out: Json = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"f":"y","o":{"k":1,"1":"z"},"e":["w"],"p2":"v2","p3":["v1","v2"],"n":5})
        );
        assert_eq!(ops.transform(b"not json"), None);
        assert_eq!(ops.transform(b"[1,2]"), None);
    }

    #[test]
    fn parses_media_types_like_kong() {
        let m = parse_media_type("Application/JSON; Charset=utf-8; q=\"1\"").unwrap();
        assert_eq!(
            (m.kind.as_str(), m.subtype.as_str()),
            ("application", "json")
        );
        assert_eq!(
            m.params,
            vec![("charset".into(), "utf-8".into()), ("q".into(), "1".into())]
        );
        assert_eq!(parse_media_type("*").map(|m| m.kind), Some("*".into()));
        assert!(parse_media_type("application/xml;").is_none());
        assert!(parse_media_type("application/json ").is_none());
        assert!(parse_media_type("json").is_none());
        assert!(is_json_body(Some(&HeaderValue::from_static(
            "application/hal+json"
        ))));
        assert!(is_json_body(Some(&HeaderValue::from_static(
            "text/plain, application/json"
        ))));
        assert!(!is_json_body(Some(&HeaderValue::from_static("text/json"))));
    }

    #[test]
    fn parses_cache_control_like_kong() {
        let value = HeaderValue::from_static("max-age=60, No-Cache, private=\"x\", max-stale");
        let cc = directives(std::iter::once(value.as_bytes()));
        assert_eq!(directive(&cc, "max-age"), Some(&Directive::Number(60.0)));
        assert_eq!(directive(&cc, "no-cache"), Some(&Directive::Flag));
        assert_eq!(
            directive(&cc, "private"),
            Some(&Directive::Text("\"x\"".into()))
        );
        assert_eq!(directive(&cc, "max-stale"), Some(&Directive::Flag));
        assert!(numeric_directive(&cc, "max-stale").is_err());
    }

    #[test]
    fn builds_kongs_cache_key() {
        let cache = ProxyCache::with_store(
            &serde_json::json!({
                "response_code": [200], "request_method": ["GET"], "content_type": ["application/json"],
                "strategy": "memory", "vary_headers": ["X_Foo"],
            }),
            Arc::new(Shared::default()),
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.append("x-foo", HeaderValue::from_static("b"));
        headers.append("x-foo", HeaderValue::from_static("a"));
        let mut req = PluginRequest {
            method: Method::GET,
            version: http::Version::HTTP_11,
            path: "/pc/x",
            query: Some(Cow::Borrowed("b=2&a&a2=1&b=1")),
            headers: crate::plugins::RequestHeaders::from_map(headers),
            body: None,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            client_addr: "127.0.0.1",
            connection: (std::net::IpAddr::from([127, 0, 0, 1]), 1, 1),
            https: false,
            target: "/pc/x?b=2&a&a2=1&b=1",
            local_port: 8000,
            upstream_path: None,
        };
        assert_eq!(
            cache.cache_key(&req, None, "r1"),
            sha256_hex("r1|GET|GET /pc/x|a:a2=1:b=1,2|X_Foo=a,b")
        );
        req.query = None;
        req.target = "/pc/x";
        assert_eq!(
            cache.cache_key(&req, Some("c1"), "r1"),
            sha256_hex("c1:r1|GET|GET /pc/x HTTP/1.1||X_Foo=a,b")
        );
        assert_eq!(cache.cache_key(&req, None, "r1").len(), 64);
    }

    #[test]
    fn store_expires_and_evicts() {
        let store = Store::with_capacity(1000);
        let entry = |size: usize| Cached {
            status: StatusCode::OK,
            headers: Vec::new(),
            body: Bytes::new(),
            timestamp: now_secs(),
            ttl: 0.0,
            expires: None,
            size,
            used: AtomicU64::new(0),
        };
        store.store("a", entry(400), 0.0);
        store.store("b", entry(400), 60.0);
        assert!(store.fetch("a").is_some());
        // "b" is now the least recently used and goes first.
        store.store("c", entry(400), 60.0);
        assert!(store.fetch("b").is_none());
        assert!(store.fetch("a").is_some() && store.fetch("c").is_some());
        store.store("short", entry(10), 0.001);
        std::thread::sleep(Duration::from_millis(5));
        assert!(store.fetch("short").is_none());
        // Too large for the store at all; a negative TTL fails to store.
        store.store("huge", entry(2000), 60.0);
        store.store("neg", entry(10), -1.0);
        assert!(store.fetch("huge").is_none() && store.fetch("neg").is_none());
    }
}
