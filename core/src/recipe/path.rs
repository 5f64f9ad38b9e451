//! Key paths into a recipe: `stages[0].config.lr`.
//!
//! Errors print paths in that canonical form (indices in brackets). Users may also write
//! `stages.0.config.lr` or `stages.pretrain.config.lr` (a stage picked by its `name`) in
//! overrides and in `plumb_host::recipe::LoadedRecipe::error_at`; those are
//! [`Step`]s that [`resolve`] turns into canonical [`Seg`]s against the recipe's values.
use std::fmt;

use serde_yaml::Value;

/// One canonical step: a mapping key or a sequence index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A canonical path; renders as `stages[0].config.lr`, the empty path as "".
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn child(&self, seg: Seg) -> KeyPath {
        let mut segs = self.0.clone();
        segs.push(seg);
        KeyPath(segs)
    }

    pub fn key(&self, key: &str) -> KeyPath {
        self.child(Seg::Key(key.to_owned()))
    }

    pub fn index(&self, index: usize) -> KeyPath {
        self.child(Seg::Index(index))
    }

    pub fn starts_with(&self, prefix: &KeyPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// The path serde_path_to_error recorded; stops at a segment it could not name.
    pub fn from_serde(path: &serde_path_to_error::Path) -> KeyPath {
        use serde_path_to_error::Segment;
        let mut segs = Vec::new();
        for segment in path.iter() {
            match segment {
                Segment::Seq { index } => segs.push(Seg::Index(*index)),
                Segment::Map { key } => segs.push(Seg::Key(key.clone())),
                Segment::Enum { variant } => segs.push(Seg::Key(variant.clone())),
                Segment::Unknown => break,
            }
        }
        KeyPath(segs)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(key) if i == 0 => f.write_str(key)?,
                Seg::Key(key) => write!(f, ".{key}")?,
                Seg::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// One step as the user wrote it: `name` (a key, an index, or an element's `name`) or `[n]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Name(String),
    Index(usize),
}

/// Splits `a.b[0].c` into steps; the message says what is wrong.
pub fn parse_steps(text: &str) -> Result<Vec<Step>, String> {
    if text.is_empty() {
        return Err("the key path is empty".into());
    }
    let mut steps = Vec::new();
    for piece in text.split('.') {
        let (name, mut rest) = match piece.find('[') {
            Some(at) => (&piece[..at], &piece[at..]),
            None => (piece, ""),
        };
        if name.contains(']') {
            return Err(format!("unmatched `]` in `{piece}`"));
        }
        if name.is_empty() && (rest.is_empty() || steps.is_empty()) {
            return Err(format!("empty key in `{text}`"));
        }
        if !name.is_empty() {
            steps.push(Step::Name(name.to_owned()));
        }
        while !rest.is_empty() {
            let Some(inner) = rest.strip_prefix('[') else {
                return Err(format!("expected `[` in `{piece}`, found `{rest}`"));
            };
            let Some(close) = inner.find(']') else {
                return Err(format!("unclosed `[` in `{piece}`"));
            };
            let digits = &inner[..close];
            let index = digits
                .parse::<usize>()
                .map_err(|_| format!("expected an index inside `[...]` in `{piece}`, found `{digits}`"))?;
            steps.push(Step::Index(index));
            rest = &inner[close + 1..];
        }
    }
    Ok(steps)
}

/// How a step addresses an element of `items`: by number, or by the element's `name`.
pub enum Pick {
    At(usize),
    /// No element has that name; holds the names there are.
    NoSuchName(Vec<String>),
    /// The step is not a number and the elements have no names.
    NotAnIndex,
}

pub fn pick(items: &[Value], step: &Step) -> Pick {
    let name = match step {
        Step::Index(i) => return Pick::At(*i),
        Step::Name(name) => name,
    };
    if let Ok(i) = name.parse::<usize>() {
        return Pick::At(i);
    }
    let names: Vec<String> =
        items.iter().filter_map(|item| item.get("name").and_then(Value::as_str).map(str::to_owned)).collect();
    if names.is_empty() {
        return Pick::NotAnIndex;
    }
    match items.iter().position(|item| item.get("name").and_then(Value::as_str) == Some(name.as_str())) {
        Some(i) => Pick::At(i),
        None => Pick::NoSuchName(names),
    }
}

/// The key of `map` that a step names: an exact string key, else a non-string key
/// (`1:`, `true:`) that prints the same.
pub fn find_key(map: &serde_yaml::Mapping, name: &str) -> Option<Value> {
    map.keys()
        .find(|k| k.as_str() == Some(name))
        .or_else(|| map.keys().find(|k| scalar_text(k).as_deref() == Some(name)))
        .cloned()
}

/// The text of a scalar key, as it reads in a key path.
pub fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Canonical form of `steps` as far as `root` reaches; later steps are kept as keys
/// (or indices), so the path can name something that does not exist yet.
pub fn resolve(root: &Value, steps: &[Step]) -> KeyPath {
    let mut segs = Vec::with_capacity(steps.len());
    let mut here = Some(root);
    for step in steps {
        let node = here.take();
        match (node, step) {
            (Some(Value::Sequence(items)), _) => {
                if let Pick::At(i) = pick(items, step) {
                    segs.push(Seg::Index(i));
                    here = items.get(i);
                    continue;
                }
            }
            (Some(Value::Mapping(map)), Step::Name(name)) => {
                if let Some(key) = find_key(map, name) {
                    here = map.get(&key);
                }
            }
            _ => {}
        }
        segs.push(match step {
            Step::Name(name) => Seg::Key(name.clone()),
            Step::Index(i) => Seg::Index(*i),
        });
    }
    KeyPath(segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(text: &str) -> Vec<Step> {
        parse_steps(text).unwrap()
    }

    #[test]
    fn renders_canonically() {
        let path = KeyPath::default().key("stages").index(0).key("config").key("lr");
        assert_eq!(path.to_string(), "stages[0].config.lr");
        assert_eq!(KeyPath::default().to_string(), "");
    }

    #[test]
    fn parses_dots_and_brackets() {
        assert_eq!(steps("a.b"), vec![Step::Name("a".into()), Step::Name("b".into())]);
        assert_eq!(
            steps("stages[1].x[0][2]"),
            vec![Step::Name("stages".into()), Step::Index(1), Step::Name("x".into()), Step::Index(0), Step::Index(2)]
        );
        assert_eq!(steps("stages.0"), vec![Step::Name("stages".into()), Step::Name("0".into())]);
    }

    #[test]
    fn rejects_malformed_paths() {
        for bad in ["", "a..b", ".a", "a.", "a[", "a[x]", "a]b", "[0]", "a[0]x"] {
            assert!(parse_steps(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn resolves_names_and_indices() {
        let root: Value = serde_yaml::from_str("stages:\n  - name: a\n  - name: b\n    config: {lr: 1}\n").unwrap();
        assert_eq!(resolve(&root, &steps("stages.b.config.lr")).to_string(), "stages[1].config.lr");
        assert_eq!(resolve(&root, &steps("stages.1.config")).to_string(), "stages[1].config");
        assert_eq!(resolve(&root, &steps("stages[0].config.x.y")).to_string(), "stages[0].config.x.y");
        assert_eq!(resolve(&root, &steps("stages.zz.config")).to_string(), "stages.zz.config");
    }
}
