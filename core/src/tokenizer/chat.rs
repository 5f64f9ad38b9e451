//! Chat templates: the Jinja template a model ships in `tokenizer_config.json` (`chat_template`) or, as
//! newer transformers save it, in `chat_template.jinja` beside it, which turns a conversation into the
//! prompt text the model was trained on.
//!
//! Rendered with minijinja set up the way transformers' `apply_chat_template` sets up Jinja2
//! (`transformers/utils/chat_template_utils.py`: `_cached_compile_jinja_template`, `render_jinja_template`):
//!
//! - `trim_blocks` and `lstrip_blocks` on; `keep_trailing_newline` off (Jinja2's default, which they
//!   keep), so the newline most template files end with is dropped; no auto-escaping;
//! - globals `raise_exception(message)`, which fails the render with the message, and
//!   `strftime_now(format)`, today's date for Llama 3.x's "Today Date" line;
//! - a `tojson` filter with Python's `json.dumps` output (`ensure_ascii=False`, `indent`, `separators`,
//!   `sort_keys`) instead of Jinja's HTML-safe one;
//! - Python's str, dict and list methods (`.strip()`, `.items()`, ...) through minijinja-contrib's pycompat;
//! - variables `messages` (dicts with `role` and `content`, in that order), `add_generation_prompt`,
//!   `tools` and `documents` (none), and every named special token (`bos_token`, `eos_token`, ...).
//!
//! One difference remains: `strftime_now` formats the current UTC time, where transformers formats the
//! machine's local time. Pass `date_string` through [`ChatTemplate::render_with`] for reproducible prompts.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Kwargs, Object, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, State};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoResultExt, Result};

/// The file newer transformers versions save a tokenizer's (default) chat template in.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// The name of the one template in a [`ChatTemplate`]'s environment.
const NAME: &str = "chat_template";

/// One turn of a conversation: `role` is `system`, `user`, `assistant` (or what the template accepts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template and the special tokens it sees.
pub struct ChatTemplate {
    source: String,
    /// The file the template came from; errors name it.
    origin: PathBuf,
    tokens: BTreeMap<String, String>,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).field("tokens", &self.tokens).finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `origin` is the file it came from, named in errors. `special_tokens` are
    /// template variables by name (`bos_token` → `<s>`).
    pub fn new(
        source: impl Into<String>,
        origin: impl Into<PathBuf>,
        special_tokens: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let source = source.into();
        let origin = origin.into();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| template_error(&origin, &e))?;
        let mut env = Environment::new();
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.clone()).map_err(|e| template_error(&origin, &e))?;
        Ok(Self { source, origin, tokens: special_tokens.clone(), env })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The file the template was read from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// `messages` as the model's prompt text, ending with the assistant's header when
    /// `add_generation_prompt` (for generation; without it, for training on whole conversations).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`render`](Self::render) with more template variables, as keyword arguments to transformers'
    /// `apply_chat_template`: `date_string` (Llama 3.x), `enable_thinking` (Qwen3), `tools`. They
    /// override special tokens of the same name. Their objects' keys come in serde_json's (sorted) order,
    /// which `tojson` keeps; Python would keep the order they were written in.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        variables: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::file(&self.origin, "cannot apply the chat template to an empty conversation"));
        }
        let mut context: BTreeMap<String, Value> =
            self.tokens.iter().map(|(key, token)| (key.clone(), Value::from(token.as_str()))).collect();
        context.insert("tools".into(), Value::from(()));
        context.insert("documents".into(), Value::from(()));
        for (key, value) in variables {
            if key == "messages" || key == "add_generation_prompt" {
                return Err(Error::Other(format!("`{key}` is not an extra chat template variable; it is an argument")));
            }
            context.insert(key.clone(), from_json(value));
        }
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                OrderedMap::value(vec![
                    ("role".into(), Value::from(m.role.as_str())),
                    ("content".into(), Value::from(m.content.as_str())),
                ])
            })
            .collect();
        context.insert("messages".into(), Value::from(messages));
        context.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        self.env
            .get_template(NAME)
            .and_then(|template| template.render(Value::from(context)))
            .map_err(|e| template_error(&self.origin, &e))
    }
}

/// The chat template of the tokenizer in `dir`: `chat_template.jinja` when present (it takes priority, as
/// in transformers), else `chat_template` of `tokenizer_config.json` (`config`, read from `config_file`):
/// a string, or a list of `{name, template}` of which the one named `default` is used.
pub(crate) fn load(
    dir: &Path,
    config: &serde_json::Map<String, serde_json::Value>,
    config_file: &Path,
    special_tokens: &BTreeMap<String, String>,
) -> Result<Option<ChatTemplate>> {
    let file = dir.join(CHAT_TEMPLATE_FILE);
    if file.is_file() {
        let source = std::fs::read_to_string(&file).at(&file)?;
        return ChatTemplate::new(source, file, special_tokens).map(Some);
    }
    let source = match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(source)) => source.as_str(),
        Some(serde_json::Value::Array(templates)) => {
            let named: Option<Vec<(&str, &str)>> =
                templates.iter().map(|t| Some((t.get("name")?.as_str()?, t.get("template")?.as_str()?))).collect();
            let Some(named) = named else {
                return Err(Error::file(
                    config_file,
                    "`chat_template` entries must be objects with `name` and `template`",
                ));
            };
            match named.iter().find(|(name, _)| *name == "default") {
                Some((_, source)) => *source,
                None => {
                    let names: Vec<&str> = named.iter().map(|(name, _)| *name).collect();
                    return Err(Error::file(
                        config_file,
                        format!("`chat_template` lists templates {names:?} but none named `default`"),
                    ));
                }
            }
        }
        Some(_) => {
            return Err(Error::file(config_file, "`chat_template` must be a string or a list of named templates"))
        }
    };
    ChatTemplate::new(source, config_file, special_tokens).map(Some)
}

/// Marks the error `raise_exception` returns, to tell it from the engine's own.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// `chat template, line 3: syntax error: ...` or `chat template, line 7: raise_exception: ...`, on the file.
fn template_error(origin: &Path, e: &minijinja::Error) -> Error {
    let line = e.line().map(|line| format!(", line {line}")).unwrap_or_default();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(Raised(message)) = cause.downcast_ref::<Raised>() {
            return Error::file(origin, format!("chat template{line}: raise_exception: {message}"));
        }
        source = cause.source();
    }
    let detail = e.detail().map(|detail| format!(": {detail}")).unwrap_or_default();
    Error::file(origin, format!("chat template{line}: {}{detail}", e.kind()))
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

/// Python's `datetime.now().strftime(format)`, in UTC, through jiff's strftime-compatible `strtime`.
fn strftime_now(state: &State, format: String) -> Result<String, minijinja::Error> {
    // A format without directives is its own output (`datetimeformat` reads "short", "iso", ... as presets).
    if !format.contains('%') {
        return Ok(format);
    }
    let kwargs = Kwargs::from_iter([("format", Value::from(format))]);
    minijinja_contrib::filters::datetimeformat(state, minijinja_contrib::globals::now(), kwargs)
}

/// A map that keeps its keys in insertion order, as Python dicts do (minijinja's own maps sort them), so
/// `message | tojson` and `message.items()` list `role` before `content` as in transformers.
#[derive(Debug)]
struct OrderedMap(Vec<(String, Value)>);

impl OrderedMap {
    fn value(entries: Vec<(String, Value)>) -> Value {
        Value::from_object(Self(entries))
    }
}

impl Object for OrderedMap {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.0.iter().find(|(k, _)| k == key).map(|(_, value)| value.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(key, _)| Value::from(key.as_str())).collect())
    }
}

fn from_json(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::from(i),
            (_, Some(u), _) => Value::from(u),
            (_, _, f) => Value::from(f.unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => Value::from(items.iter().map(from_json).collect::<Vec<_>>()),
        serde_json::Value::Object(map) => {
            OrderedMap::value(map.iter().map(|(key, value)| (key.clone(), from_json(value))).collect())
        }
    }
}

/// How `tojson` lays out JSON: `json.dumps`'s options.
struct JsonStyle {
    ensure_ascii: bool,
    /// `None`: one line.
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, minijinja::Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(indent) if indent.is_none() => None,
        Some(indent) => match (indent.as_i64(), indent.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (_, Some(s)) => Some(s.to_owned()),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an int or a string",
                ))
            }
        },
    };
    let (item_separator, key_separator) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(separators) => match <[String; 2]>::try_from(separators) {
            Ok([item, key]) => (item, key),
            Err(_) => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be two strings",
                ))
            }
        },
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        indent,
        item_separator,
        key_separator,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(out)
}

fn write_json(out: &mut String, value: &Value, style: &JsonStyle, depth: usize) -> Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&python_number(value)),
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, ('[', ']'), items, style, depth, |out, item| {
                write_json(out, &item, style, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, ('{', '}'), entries, style, depth, |out, (key, item)| {
                write_json_string(out, &key, style.ensure_ascii);
                out.push_str(&style.key_separator);
                write_json(out, &item, style, depth + 1)
            })?;
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// `[a, b]`, or with an indent one item per line, as `json.dumps` writes them; `[]` when empty.
fn write_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: Vec<T>,
    style: &JsonStyle,
    depth: usize,
    mut write_item: impl FnMut(&mut String, T) -> Result<(), minijinja::Error>,
) -> Result<(), minijinja::Error> {
    out.push(open);
    let empty = items.is_empty();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_separator);
        }
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(out, item)?;
    }
    if let (Some(indent), false) = (&style.indent, empty) {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// A dict key as `json.dumps` writes it: strings as they are, numbers, booleans and None as JSON text.
fn json_key(key: &Value) -> Result<String, minijinja::Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_owned()),
        ValueKind::Number => Ok(python_number(key)),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_owned()),
        ValueKind::None => Ok("null".to_owned()),
        kind => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

/// `json.dumps`'s string escaping: quotes, backslashes and control characters; every non-ASCII
/// character too with `ensure_ascii` (as UTF-16 `\uXXXX` units).
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// An int's digits, or a float as Python's `repr` writes it: `1.0`, `0.0001`, `1e+16`, `1.5e-05`, `NaN`.
fn python_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => python_float(f),
        Err(_) => value.to_string(),
    }
}

fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` has the shortest digits that round-trip, as `repr` does; only the layout differs.
    let scientific = format!("{f:e}");
    let Some((mantissa, exponent)) = scientific.split_once('e') else { return f.to_string() };
    let Ok(exponent) = exponent.parse::<i32>() else { return f.to_string() };
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        if exponent < 0 {
            return format!("{sign}0.{}{digits}", "0".repeat((-exponent - 1) as usize));
        }
        let point = exponent as usize + 1;
        if digits.len() <= point {
            format!("{sign}{digits}{}.0", "0".repeat(point - digits.len()))
        } else {
            format!("{sign}{}.{}", &digits[..point], &digits[point..])
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let mantissa = if rest.is_empty() { first.to_owned() } else { format!("{first}.{rest}") };
        format!("{sign}{mantissa}e{}{:02}", if exponent < 0 { '-' } else { '+' }, exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, variables: serde_json::Value) -> Result<String> {
        let serde_json::Value::Object(variables) = variables else { panic!("variables must be an object") };
        let template = ChatTemplate::new(source, "t.jinja", &BTreeMap::new())?;
        template.render_with(&[ChatMessage::new("user", "hi")], false, &variables)
    }

    /// Expected strings are what transformers' compiled template renders for the same input.
    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let data = serde_json::json!({
            "a": [1, 2.5, 1e20, true, null, -0.0, 1.5e-05, 0.0001, 123.456],
            "b": "ü<&>'\"\\\n\u{1}\u{7f}😀",
            "c": {},
            "d": [],
        });
        let source = "{{ data | tojson }}|{{ data | tojson(indent=2) }}|{{ data.b | tojson(ensure_ascii=true) }}|\
                      {{ {'z': 1, 'a': 2} | tojson(sort_keys=true, separators=(',', ':')) }}";
        // `b` as json.dumps writes it: quote, backslash and newline escaped, \x01 as \u0001, DEL and the rest as is.
        let b = "\"ü<&>'\\\"\\\\\\n\\u0001\u{7f}😀\"";
        let a = "[1, 2.5, 1e+20, true, null, -0.0, 1.5e-05, 0.0001, 123.456]";
        let line = format!(r#"{{"a": {a}, "b": {b}, "c": {{}}, "d": []}}"#);
        let a_lines = "[\n    1,\n    2.5,\n    1e+20,\n    true,\n    null,\n    -0.0,\n    1.5e-05,\n    0.0001,\n    123.456\n  ]";
        let indented = format!("{{\n  \"a\": {a_lines},\n  \"b\": {b},\n  \"c\": {{}},\n  \"d\": []\n}}");
        let ascii = r#""\u00fc<&>'\"\\\n\u0001\u007f\ud83d\ude00""#;
        let expected = format!("{line}|{indented}|{ascii}|{{\"a\":2,\"z\":1}}");
        assert_eq!(render(source, serde_json::json!({ "data": data })).unwrap(), expected);
    }

    #[test]
    fn floats_are_written_as_python_repr_writes_them() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.125, "123456789.125"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (-2.5e-7, "-2.5e-07"),
            (100.0, "100.0"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (value, repr) in cases {
            assert_eq!(python_float(value), repr, "{value:e}");
        }
    }

    #[test]
    fn messages_are_dicts_in_python_order_with_python_methods() {
        let source =
            "{{ messages[0] | tojson }}{% for k, v in messages[0].items() %}|{{ k }}={{ v.upper() }}{% endfor %}\
                      |{{ ' x '.strip() }}\n";
        assert_eq!(
            render(source, serde_json::json!({})).unwrap(),
            r#"{"role": "user", "content": "hi"}|role=USER|content=HI|x"#
        );
    }

    /// trim_blocks and lstrip_blocks drop the block lines; the template's final newline is dropped too
    /// (only one: keep_trailing_newline is off).
    #[test]
    fn block_lines_and_the_final_newline_are_trimmed_as_in_transformers() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n  <{{ m.content }}>\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(render(source, serde_json::json!({})).unwrap(), "  <hi>\n");
        assert_eq!(render("{{ messages[0].content }}\n", serde_json::json!({})).unwrap(), "hi");
        assert_eq!(render("{{ messages[0].content }}\n\n", serde_json::json!({})).unwrap(), "hi\n");
    }

    #[test]
    fn strftime_now_formats_the_date_and_passes_plain_text_through() {
        let rendered =
            render("{{ strftime_now('%Y-%m-%d') }}|{{ strftime_now('short') }}", serde_json::json!({})).unwrap();
        let (date, plain) = rendered.split_once('|').unwrap();
        assert_eq!(plain, "short");
        let parts: Vec<&str> = date.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [4, 2, 2], "{date}");
        assert!(parts.iter().all(|p| p.chars().all(|c| c.is_ascii_digit())), "{date}");
        assert!(date.as_bytes()[0] == b'2', "{date}");
    }

    #[test]
    fn raise_exception_fails_the_render_with_its_message() {
        let source =
            "{% if messages[0].role == 'user' %}\n{{ raise_exception('Only system messages, please') }}\n{% endif %}";
        let message = render(source, serde_json::json!({})).unwrap_err().to_string();
        assert_eq!(message, "t.jinja: chat template, line 2: raise_exception: Only system messages, please");
    }

    #[test]
    fn variables_override_tokens_but_not_the_arguments() {
        let tokens = BTreeMap::from([("bos_token".to_owned(), "<s>".to_owned())]);
        let template =
            ChatTemplate::new("{{ bos_token }}{{ tools is none }}{{ date_string }}", "t.jinja", &tokens).unwrap();
        let messages = [ChatMessage::new("user", "hi")];
        assert_eq!(template.render(&messages, false).unwrap(), "<s>True", "booleans print as in Python");
        let serde_json::Value::Object(variables) =
            serde_json::json!({ "date_string": "26 Jul 2024", "bos_token": "<b>" })
        else {
            unreachable!()
        };
        assert_eq!(template.render_with(&messages, false, &variables).unwrap(), "<b>True26 Jul 2024");
        let serde_json::Value::Object(bad) = serde_json::json!({ "messages": [] }) else { unreachable!() };
        let message = template.render_with(&messages, false, &bad).unwrap_err().to_string();
        assert_eq!(message, "`messages` is not an extra chat template variable; it is an argument");
        let message = template.render(&[], false).unwrap_err().to_string();
        assert_eq!(message, "t.jinja: cannot apply the chat template to an empty conversation");
    }
}
