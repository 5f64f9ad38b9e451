//! Where things are in the recipe file: line and column of every key, from marked-yaml.
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use marked_yaml::{LoadError, LoaderOptions, Marker, Node};

use plumb_core::recipe::path::KeyPath;

/// A 1-based line and column (in characters) in the recipe file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pos {
    pub(crate) line: usize,
    pub(crate) column: usize,
}

impl Pos {
    pub(crate) const START: Pos = Pos { line: 1, column: 1 };

    fn of(marker: Option<&Marker>) -> Option<(usize, Pos)> {
        marker.map(|m| (m.character(), Pos { line: m.line(), column: m.column() }))
    }
}

/// Key path → position of its key (for sequence elements: of the element itself).
#[derive(Debug, Default)]
pub(crate) struct SpanIndex {
    spans: HashMap<KeyPath, Pos>,
}

impl SpanIndex {
    /// Indexes `text`, which serde_yaml has already accepted as one document holding a
    /// mapping. Fails with a position and message on what marked-yaml refuses (anchors,
    /// tags, non-scalar keys).
    pub(crate) fn build(text: &str) -> Result<SpanIndex, (Pos, String)> {
        let root = parse(text, LoaderOptions::default())?;
        let mut spans = HashMap::new();
        spans.insert(KeyPath::default(), start_of(&root).unwrap_or(Pos::START));
        // Explicit stack: no recursion however deep the document.
        let mut todo = vec![(KeyPath::default(), &root)];
        while let Some((path, node)) = todo.pop() {
            match node {
                Node::Mapping(map) => {
                    for (key, value) in map.iter() {
                        let child = path.key(key.as_str());
                        let at = Pos::of(key.span().start()).map(|(_, p)| p);
                        spans.insert(child.clone(), at.or_else(|| start_of(value)).unwrap_or(Pos::START));
                        todo.push((child, value));
                    }
                }
                Node::Sequence(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let child = path.index(i);
                        spans.insert(child.clone(), start_of(item).unwrap_or(Pos::START));
                        todo.push((child, item));
                    }
                }
                Node::Scalar(_) => {}
            }
        }
        Ok(SpanIndex { spans })
    }

    /// The position of the deepest prefix of `path` that is in the file.
    pub(crate) fn find(&self, path: &KeyPath) -> Pos {
        (0..=path.0.len())
            .rev()
            .find_map(|n| self.spans.get(&KeyPath(path.0[..n].to_vec())))
            .copied()
            .unwrap_or(Pos::START)
    }
}

/// Where a node starts. marked-yaml marks a block mapping after its first key, so a
/// mapping starts at whichever comes first: its own mark or its first key.
fn start_of(node: &Node) -> Option<Pos> {
    let own = Pos::of(node.span().start());
    let first_key = match node {
        Node::Mapping(map) => map.keys().next().and_then(|k| Pos::of(k.span().start())),
        _ => None,
    };
    match (own, first_key) {
        (Some(a), Some(b)) => Some(if b.0 < a.0 { b.1 } else { a.1 }),
        (a, b) => a.or(b).map(|(_, p)| p),
    }
}

/// Runs marked-yaml; a panic inside it (it has `unreachable!`s for event orders that
/// libyaml and yaml-rust2 might disagree on) becomes an error, not a crash.
fn parse(text: &str, options: LoaderOptions) -> Result<Node, (Pos, String)> {
    let result = catch_unwind(AssertUnwindSafe(|| marked_yaml::parse_yaml_with_options(0, text, options)));
    match result {
        Ok(Ok(node)) => Ok(node),
        Ok(Err(error)) => Err(describe(&error)),
        Err(_) => Err((Pos::START, "the YAML parser that locates keys failed on this file".into())),
    }
}

fn describe(error: &LoadError) -> (Pos, String) {
    let at = |m: &Marker| Pos { line: m.line(), column: m.column() };
    match error {
        LoadError::UnexpectedAnchor(m) => {
            (at(m), "YAML anchors and aliases (`&name`, `*name`) are not supported in recipes".into())
        }
        LoadError::UnexpectedTag(m) => (at(m), "YAML tags (`!tag`) are not supported in recipes".into()),
        LoadError::MappingKeyMustBeScalar(m) => {
            (at(m), "mapping keys must be plain names, not lists or mappings".into())
        }
        LoadError::TopLevelMustBeMapping(m) | LoadError::TopLevelMustBeSequence(m) => {
            (at(m), "expected a mapping at the top of the recipe".into())
        }
        LoadError::ScanError(m, e) => (at(m), format!("YAML syntax error: {}", e.info())),
        LoadError::DuplicateKey(dup) => {
            let second = Pos::of(dup.key.span().start()).map_or(Pos::START, |(_, p)| p);
            let first = Pos::of(dup.prev_key.span().start())
                .map_or(String::new(), |(_, p)| format!(" (first at line {}, column {})", p.line, p.column));
            (second, format!("duplicate key `{}`{first}", dup.key.as_str()))
        }
    }
}

/// The position and message of a duplicate key in `text`, if marked-yaml finds one.
/// Only for small texts: marked-yaml's nodes drop recursively, and serde_yaml, which
/// limits nesting, has not accepted this text.
pub(crate) fn duplicate_key(text: &str) -> Option<(Pos, String)> {
    if text.len() > (1 << 20) {
        return None;
    }
    match parse(text, LoaderOptions::default().error_on_duplicate_keys(true)) {
        Err((pos, message)) if message.starts_with("duplicate key") => Some((pos, message)),
        _ => None,
    }
}

/// Line and column of byte `offset` in `bytes`, counting characters of the valid UTF-8
/// before it.
pub(crate) fn pos_of_byte(bytes: &[u8], offset: usize) -> Pos {
    let before = &bytes[..offset.min(bytes.len())];
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    Pos { line, column }
}

/// The line that starts a second YAML document (`---` after some content), if any.
pub(crate) fn second_document(text: &str) -> Option<Pos> {
    let mut seen_content = false;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") && seen_content {
            return Some(Pos { line: i + 1, column: 1 });
        }
        let trimmed = line.trim();
        if !trimmed.is_empty() && !trimmed.starts_with('#') && !trimmed.starts_with("---") && !trimmed.starts_with('%')
        {
            seen_content = true;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(index: &SpanIndex, path: &str) -> (usize, usize) {
        let steps = plumb_core::recipe::path::parse_steps(path).unwrap();
        let root = serde_yaml::Value::Null;
        let pos = index.find(&plumb_core::recipe::path::resolve(&root, &steps));
        (pos.line, pos.column)
    }

    const TEXT: &str =
        "# comment\nrun:\n  seed: 1\nstages:\n  - name: a\n    config:\n      lr: 1\n  - {name: b, x: [1, 2]}\n";

    #[test]
    fn locates_keys_and_elements() {
        let index = SpanIndex::build(TEXT).unwrap();
        assert_eq!(at(&index, "run"), (2, 1));
        assert_eq!(at(&index, "run.seed"), (3, 3));
        assert_eq!(at(&index, "stages[0]"), (5, 5));
        assert_eq!(at(&index, "stages[0].config.lr"), (7, 7));
        assert_eq!(at(&index, "stages[1]"), (8, 5));
        assert_eq!(at(&index, "stages[1].x"), (8, 15));
        assert_eq!(at(&index, "stages[1].x[1]"), (8, 22));
    }

    #[test]
    fn falls_back_to_the_deepest_prefix() {
        let index = SpanIndex::build(TEXT).unwrap();
        assert_eq!(at(&index, "stages[0].config.missing.deeper"), (6, 5));
        assert_eq!(at(&index, "nothing"), (2, 1));
    }

    #[test]
    fn refuses_anchors_and_tags() {
        let (pos, message) = SpanIndex::build("a: &x 1\nb: *x\n").unwrap_err();
        assert_eq!((pos.line, message.contains("anchors")), (1, true));
        let (pos, message) = SpanIndex::build("a:\n  b: !foo 1\n").unwrap_err();
        assert_eq!((pos.line, message.contains("tags")), (2, true));
    }

    #[test]
    fn finds_duplicates() {
        let (pos, message) = duplicate_key("run:\n  seed: 1\n  seed: 2\n").unwrap();
        assert_eq!((pos.line, pos.column), (3, 3));
        assert_eq!(message, "duplicate key `seed` (first at line 2, column 3)");
    }

    #[test]
    fn positions_of_bytes_and_documents() {
        assert_eq!(pos_of_byte(b"ab\ncd\xff", 5), Pos { line: 2, column: 3 });
        assert_eq!(pos_of_byte("é\nxé".as_bytes(), 6), Pos { line: 2, column: 3 });
        assert_eq!(second_document("---\na: 1\n---\nb: 2\n"), Some(Pos { line: 3, column: 1 }));
        assert_eq!(second_document("# c\n---\na: 1\n"), None);
    }
}
