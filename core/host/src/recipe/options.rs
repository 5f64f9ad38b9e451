//! A configuration section's options, read from the JSON Schema its plugin hands over
//! (each config struct derives `schemars::JsonSchema`: doc comments become descriptions,
//! serde defaults become `default`s). [`options`] lists them one per key, nested sections
//! flattened as dotted keys (`optimizer.lr`), for `plumb explain`; [`fill_defaults`] writes
//! the defaults a recipe's section leaves out into it, for `plumb validate` and the run's
//! `recipe.yaml`.
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// Deeper than any real config nests; guards against a schema that refers to itself.
const MAX_DEPTH: usize = 16;

/// One key of a section.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionDoc {
    /// Dotted from the section's top: `optimizer.lr`, `data.fields.prompt`.
    pub key: String,
    /// What it accepts, in YAML words: `integer`, `number`, `string`, `boolean`,
    /// `` `cosine` | `linear` ``, `list of string`, `[number, number]`, `mapping`, ...
    pub kind: String,
    /// Its default, as YAML (`0.001`, `[0.9, 0.95]`, `null` for an optional key left unset);
    /// `None` where the schema gives none.
    pub default: Option<String>,
    /// The section is refused without it.
    pub required: bool,
    /// A mapping of keys of its own, listed after it (`optimizer` before `optimizer.lr`).
    pub section: bool,
    /// The first paragraph of its doc comment, on one line; empty when it has none.
    pub doc: String,
}

/// Every key of the section `schema` describes, sorted, each section before its keys.
pub fn options(schema: &Json) -> Vec<OptionDoc> {
    let mut out = Vec::new();
    walk(schema, schema, "", &mut out, 0);
    out
}

/// The first paragraph of a schema's own doc (its `title`, else its `description`).
pub fn summary(schema: &Json) -> String {
    doc_of(schema, schema)
}

fn walk(root: &Json, schema: &Json, prefix: &str, out: &mut Vec<OptionDoc>, depth: usize) {
    let Some(object) = object_of(root, schema, depth) else { return };
    for (key, property) in object.properties {
        let full = format!("{prefix}{key}");
        let required = object.required.contains(&key.as_str());
        let default = default_of(root, property, depth);
        let doc = doc_of(root, property);
        match object_of(root, property, depth + 1) {
            // A struct with no keys (`objective: {}` of an objective with no settings).
            Some(inner) if inner.properties.is_empty() => {}
            Some(_) => {
                let kind = if nullable(root, property, depth) { "mapping | null" } else { "mapping" };
                out.push(OptionDoc { key: full.clone(), kind: kind.into(), default, required, section: true, doc });
                walk(root, property, &format!("{full}."), out, depth + 1);
            }
            None => {
                let kind = kind_of(root, property, depth);
                out.push(OptionDoc { key: full, kind, default, required, section: false, doc });
            }
        }
    }
}

/// Fills into `section` (a recipe's config mapping) every default its schema gives for
/// a key it leaves out, inside nested mappings too; keys it sets are kept as they are.
/// A left-out mapping whose keys all have defaults is added with them; one that may be
/// `null` is added only where its default is given.
pub fn fill_defaults(schema: &Json, section: &mut Yaml) {
    fill(schema, schema, section, 0);
}

fn fill(root: &Json, schema: &Json, value: &mut Yaml, depth: usize) {
    let Some(object) = object_of(root, schema, depth) else { return };
    let Yaml::Mapping(mapping) = value else { return };
    for (key, property) in object.properties {
        let name = Yaml::String(key.clone());
        if !mapping.contains_key(&name) {
            let added = match property.get("default") {
                Some(default) => serde_yaml::to_value(default).ok(),
                // A struct-typed key with a serde default its type cannot write out: its
                // own keys' defaults, added below.
                None if !object.required.contains(&key.as_str()) && !nullable(root, property, depth) => {
                    object_of(root, property, depth + 1).map(|_| Yaml::Mapping(Default::default()))
                }
                None => None,
            };
            let Some(added) = added else { continue };
            mapping.insert(name.clone(), added);
        }
        if let Some(inner) = mapping.get_mut(&name) {
            fill(root, property, inner, depth + 1);
        }
    }
}

/// The keys of an object schema.
struct Object<'s> {
    properties: Vec<(&'s String, &'s Json)>,
    required: Vec<&'s str>,
}

/// The keys of `schema` when it is a mapping with declared keys: directly, through a
/// `$ref`, or as the one non-null choice of an optional one.
fn object_of<'s>(root: &'s Json, schema: &'s Json, depth: usize) -> Option<Object<'s>> {
    if depth > MAX_DEPTH {
        return None;
    }
    let schema = resolve(root, schema);
    if let Some(properties) = schema.get("properties").and_then(Json::as_object) {
        let required = schema
            .get("required")
            .and_then(Json::as_array)
            .map(|r| r.iter().filter_map(Json::as_str).collect())
            .unwrap_or_default();
        return Some(Object { properties: properties.iter().collect(), required });
    }
    // A struct with no fields: `{"type": "object", "additionalProperties": false}`.
    if schema.get("type").and_then(Json::as_str) == Some("object")
        && schema.get("additionalProperties") == Some(&Json::Bool(false))
    {
        return Some(Object { properties: Vec::new(), required: Vec::new() });
    }
    let choices = choices(schema)?;
    let mut non_null = choices.iter().filter(|c| !is_null(root, c));
    match (non_null.next(), non_null.next()) {
        (Some(only), None) => object_of(root, only, depth + 1),
        _ => None,
    }
}

/// The alternatives of an `anyOf` or `oneOf`.
fn choices(schema: &Json) -> Option<&Vec<Json>> {
    schema.get("anyOf").or_else(|| schema.get("oneOf")).and_then(Json::as_array)
}

fn is_null(root: &Json, schema: &Json) -> bool {
    resolve(root, schema).get("type").and_then(Json::as_str) == Some("null")
}

/// Whether `null` is one of the values `schema` accepts (an `Option`).
fn nullable(root: &Json, schema: &Json, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    let schema = resolve(root, schema);
    match schema.get("type") {
        Some(Json::String(t)) => return t == "null",
        Some(Json::Array(types)) => return types.iter().any(|t| t == "null"),
        _ => {}
    }
    choices(schema).is_some_and(|c| c.iter().any(|c| nullable(root, c, depth + 1)))
}

/// A `$ref` followed to its definition (`#/$defs/Name`, or `#` for the root).
fn resolve<'s>(root: &'s Json, schema: &'s Json) -> &'s Json {
    let mut schema = schema;
    for _ in 0..MAX_DEPTH {
        let Some(reference) = schema.get("$ref").and_then(Json::as_str) else { break };
        let Some(pointer) = reference.strip_prefix('#') else { break };
        match root.pointer(pointer) {
            Some(target) => schema = target,
            None => break,
        }
    }
    schema
}

/// The first paragraph of a key's doc comment on one line: the key's own, else its type's.
fn doc_of(root: &Json, schema: &Json) -> String {
    let own = |s: &Json| -> Option<String> {
        let text = s.get("title").or_else(|| s.get("description")).and_then(Json::as_str)?;
        let first = text.split("\n\n").next().unwrap_or(text);
        // Rustdoc's links (`[`normalize`]`) read as plain code here.
        let first = first.replace("[`", "`").replace("`]", "`");
        Some(first.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    own(schema).or_else(|| own(resolve(root, schema))).unwrap_or_default()
}

/// The key's default as YAML; `null` for an optional key with none given.
fn default_of(root: &Json, schema: &Json, depth: usize) -> Option<String> {
    match schema.get("default") {
        Some(default) => Some(flow(default)),
        None if nullable(root, schema, depth) => Some("null".into()),
        None => None,
    }
}

/// A JSON value as a YAML reader would write it on one line: `0.001`, `cosine`,
/// `[0.9, 0.95]`, `{2: 0.2, 3: 0.18}`, `""`.
pub fn flow(value: &Json) -> String {
    match value {
        Json::Null => "null".into(),
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => n.to_string(),
        Json::String(s) => plain_or_quoted(s),
        Json::Array(items) => format!("[{}]", items.iter().map(flow).collect::<Vec<_>>().join(", ")),
        Json::Object(map) => format!(
            "{{{}}}",
            map.iter().map(|(k, v)| format!("{}: {}", plain_or_quoted(k), flow(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// `s` bare when YAML reads it back as the same string, else double-quoted.
fn plain_or_quoted(s: &str) -> String {
    let bare_is_string = matches!(serde_yaml::from_str::<Yaml>(s), Ok(Yaml::String(ref back)) if back == s);
    let flow_safe = !s.contains([',', '[', ']', '{', '}', '#', '"', '\'']);
    if !s.is_empty() && bare_is_string && flow_safe && s.trim() == s {
        s.to_owned()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}

/// What `schema` accepts, in YAML words.
fn kind_of(root: &Json, schema: &Json, depth: usize) -> String {
    if depth > MAX_DEPTH {
        return "any".into();
    }
    let schema = resolve(root, schema);
    if let Some(value) = schema.get("const") {
        return format!("`{}`", flow(value));
    }
    if let Some(values) = schema.get("enum").and_then(Json::as_array) {
        return values.iter().map(|v| format!("`{}`", flow(v))).collect::<Vec<_>>().join(" | ");
    }
    if let Some(choices) = choices(schema) {
        let mut kinds: Vec<String> = Vec::new();
        for choice in choices {
            let kind = kind_of(root, choice, depth + 1);
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        return kinds.join(" | ");
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Json::String(t)) => vec![t.as_str()],
        Some(Json::Array(types)) => types.iter().filter_map(Json::as_str).collect(),
        _ => return "any".into(),
    };
    let kinds: Vec<String> = types.iter().map(|t| type_word(root, schema, t, depth)).collect();
    kinds.join(" | ")
}

fn type_word(root: &Json, schema: &Json, type_name: &str, depth: usize) -> String {
    let count = |key: &str| schema.get(key).and_then(Json::as_u64);
    match type_name {
        "array" => {
            if let Some(items) = schema.get("prefixItems").and_then(Json::as_array) {
                let kinds: Vec<String> = items.iter().map(|i| kind_of(root, i, depth + 1)).collect();
                return format!("[{}]", kinds.join(", "));
            }
            let item = schema.get("items").map_or_else(|| "any".into(), |i| kind_of(root, i, depth + 1));
            match (count("minItems"), count("maxItems")) {
                (Some(min), Some(max)) if min == max && (1..=4).contains(&min) => {
                    format!("[{}]", vec![item; min as usize].join(", "))
                }
                _ => format!("list of {}", parenthesised(&item)),
            }
        }
        "object" => match object_of(root, schema, depth + 1) {
            Some(object) if !object.properties.is_empty() => {
                let keys: Vec<&str> = object.properties.iter().map(|(k, _)| k.as_str()).collect();
                format!("{{{}}}", keys.join(", "))
            }
            _ => match schema.get("additionalProperties") {
                Some(values @ Json::Object(_)) => {
                    format!("mapping of {}", parenthesised(&kind_of(root, values, depth + 1)))
                }
                _ => "mapping".into(),
            },
        },
        other => other.to_owned(),
    }
}

/// `a | b` in parentheses, so `list of (a | b)` reads as one list.
fn parenthesised(kind: &str) -> String {
    if kind.contains(" | ") {
        format!("({kind})")
    } else {
        kind.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    /// How fast.
    #[derive(Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case")]
    enum Pace {
        /// Slowly.
        #[default]
        Slow,
        /// Quickly.
        Fast,
    }

    /// The inner section.
    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        /// Steps per second.
        #[serde(default = "three")]
        rate: f64,
        /// Two bounds.
        #[serde(default)]
        bounds: [u32; 2],
        /// Given or not.
        #[serde(default)]
        note: Option<String>,
    }

    fn three() -> f64 {
        3.0
    }

    impl Default for Inner {
        fn default() -> Self {
            Self { rate: three(), bounds: [0, 0], note: None }
        }
    }

    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Section {
        /// A file to read.
        ///
        /// More about it, not shown.
        path: std::path::PathBuf,
        /// The pace.
        #[serde(default)]
        pace: Pace,
        /// The inner part.
        #[serde(default)]
        inner: Inner,
        /// Names, any number.
        #[serde(default = "names")]
        names: Vec<String>,
        /// Maybe a nested part.
        #[serde(default)]
        extra: Option<Inner>,
    }

    fn names() -> Vec<String> {
        vec!["a b".into(), "yes".into()]
    }

    fn schema() -> Json {
        serde_json::to_value(schemars::schema_for!(Section)).unwrap()
    }

    #[test]
    fn options_are_flattened_with_kind_default_and_doc() {
        let listed: Vec<(String, String, Option<String>, bool, String)> =
            options(&schema()).into_iter().map(|o| (o.key, o.kind, o.default, o.required, o.doc)).collect();
        let row = |key: &str, kind: &str, default: Option<&str>, required: bool, doc: &str| {
            (key.to_owned(), kind.to_owned(), default.map(str::to_owned), required, doc.to_owned())
        };
        assert_eq!(
            listed,
            vec![
                row("extra", "mapping | null", Some("null"), false, "Maybe a nested part."),
                row("extra.bounds", "[integer, integer]", Some("[0, 0]"), false, "Two bounds."),
                row("extra.note", "string | null", Some("null"), false, "Given or not."),
                row("extra.rate", "number", Some("3.0"), false, "Steps per second."),
                row("inner", "mapping", None, false, "The inner part."),
                row("inner.bounds", "[integer, integer]", Some("[0, 0]"), false, "Two bounds."),
                row("inner.note", "string | null", Some("null"), false, "Given or not."),
                row("inner.rate", "number", Some("3.0"), false, "Steps per second."),
                row("names", "list of string", Some("[a b, yes]"), false, "Names, any number."),
                row("pace", "`slow` | `fast`", Some("slow"), false, "The pace."),
                row("path", "string", None, true, "A file to read."),
            ]
        );
    }

    #[test]
    fn defaults_fill_in_what_the_section_leaves_out() {
        let mut section: Yaml = serde_yaml::from_str("path: x.txt\ninner: {rate: 5}\nextra: {note: hi}\n").unwrap();
        fill_defaults(&schema(), &mut section);
        let expected: Yaml = serde_yaml::from_str(
            "path: x.txt\ninner: {rate: 5, bounds: [0, 0], note: null}\n\
             extra: {note: hi, bounds: [0, 0], rate: 3.0}\npace: slow\nnames: [a b, 'yes']\n",
        )
        .unwrap();
        assert_eq!(section, expected);
        // What it wrote reads back as the section it stands for.
        let text = serde_yaml::to_string(&section).unwrap();
        let back: Section = serde_yaml::from_str(&text).unwrap();
        assert_eq!((back.path.to_str(), back.pace, back.names), (Some("x.txt"), Pace::Slow, names()));
        assert_eq!((back.inner.rate, back.inner.bounds, back.inner.note), (5.0, [0, 0], None));
        let extra = back.extra.unwrap();
        assert_eq!((extra.rate, extra.bounds, extra.note.as_deref()), (3.0, [0, 0], Some("hi")));
        // A set key is never replaced, and filling twice changes nothing.
        let once = section.clone();
        fill_defaults(&schema(), &mut section);
        assert_eq!(section, once);
    }

    #[test]
    fn flow_writes_yaml_that_reads_back() {
        for value in [
            serde_json::json!("yes"),
            serde_json::json!(""),
            serde_json::json!("a, b"),
            serde_json::json!({"a": 0.2, "b c": "d, e"}),
            serde_json::json!([0.9, 0.95]),
            serde_json::json!("plain words"),
        ] {
            let text = flow(&value);
            let back: Json = serde_yaml::from_str(&text).unwrap();
            assert_eq!(back, value, "{text}");
        }
        assert_eq!(flow(&serde_json::json!("cosine")), "cosine");
    }
}
