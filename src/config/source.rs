//! The config file's text: parsing it, and naming the file, line, column and key path of an
//! error.
//!
//! Parse and type errors come from serde: `serde-saphyr` gives the line and column of the
//! offending node, `serde_path_to_error` the key path (`models[2].limits.rpm`). Errors found
//! after parsing (a model's unknown `upstream`, a bad number of seconds, …) name the key path of
//! the offending value; its line and column come from a second, span-keeping parse of the same
//! text into a tree of [`Spanned`] nodes, made only when an error is reported. Nothing searches
//! the text for a key: a key repeated in several entries (`name`, `upstream`) is found at the
//! entry the path names.

use std::{collections::HashMap, fmt, path::Path};

use serde::{
    Deserialize, Deserializer,
    de::{self, DeserializeOwned, MapAccess, SeqAccess, Visitor},
};
use serde_saphyr::{Location, Spanned};

use super::ConfigError;

/// The text a config came from, if any.
pub(super) struct Source<'a> {
    file: Option<(&'a Path, &'a str)>,
}

impl<'a> Source<'a> {
    /// No file: the embedded defaults and the environment.
    pub(super) fn none() -> Self {
        Self { file: None }
    }

    /// The file at `origin` holding `text`.
    pub(super) fn file(origin: &'a Path, text: &'a str) -> Self {
        Self { file: Some((origin, text)) }
    }

    /// Parses the text into `T` (unknown keys and duplicate keys refused); an error names the
    /// file, line, column and key path.
    pub(super) fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let Some((origin, text)) = self.file else {
            return Err(ConfigError("no config file to parse".into()));
        };
        let mut path = None;
        let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
            serde_path_to_error::deserialize(de).map_err(|error| {
                path = Some(key_path(error.path()));
                error.into_inner()
            })
        });
        parsed.map_err(|error| {
            let error = error.without_snippet();
            let path = path.unwrap_or_default();
            let location = error.location().filter(known).or_else(|| self.locate(&path));
            let mut message = error.to_string();
            if let Some(l) = location
                && let Some(plain) = message.strip_suffix(&format!(" at line {}, column {}", l.line(), l.column()))
            {
                message = plain.to_string();
            }
            // serde-saphyr's advice is for the program's author, not for the config's.
            if let Some(cut) = message.find(", set DuplicateKeyPolicy") {
                message.truncate(cut);
            }
            format_error(origin, location, &path, &message)
        })
    }

    /// An error about the value at `path` (`models[1].upstream`): the file, its line and
    /// column, the path, `message`. A path the file does not have (a default, a merged key)
    /// takes the line of its nearest ancestor that it has; without a file, only the path.
    pub(super) fn error(&self, path: &str, message: impl fmt::Display) -> ConfigError {
        match self.file {
            Some((origin, _)) => format_error(origin, self.locate(path), path, &message.to_string()),
            None => ConfigError(format!("{path}: {message}")),
        }
    }

    /// Where the value at `path`, or its nearest ancestor, starts.
    fn locate(&self, path: &str) -> Option<Location> {
        let (_, text) = self.file?;
        let root: Spanned<Node> = serde_saphyr::from_str_with_options(text, options()).ok()?;
        let mut locations = HashMap::new();
        flatten(&root, String::new(), &mut locations);
        let mut path = path;
        loop {
            if let Some(location) = locations.get(path) {
                return Some(*location);
            }
            if path.is_empty() {
                return None;
            }
            path = parent(path);
        }
    }
}

/// Duplicate keys refused (as serde_yaml did), no source snippets in messages (a snippet
/// could show a secret written in the file).
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! { with_snippet: false }
}

fn known(location: &Location) -> bool {
    location.line() > 0
}

/// `{file}:{line}:{column}: {path}: {message}`; the parts that are not known are left out.
fn format_error(origin: &Path, location: Option<Location>, path: &str, message: &str) -> ConfigError {
    let mut text = origin.display().to_string();
    if let Some(l) = location {
        text.push_str(&format!(":{}:{}", l.line(), l.column()));
    }
    text.push_str(": ");
    if !path.is_empty() {
        text.push_str(path);
        text.push_str(": ");
    }
    text.push_str(message);
    ConfigError(text)
}

/// `serde_path_to_error`'s path as `a.b[2].c`, without the segments it could not name.
fn key_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key } | serde_path_to_error::Segment::Enum { variant: key } => {
                push_key(&mut out, key);
            }
            serde_path_to_error::Segment::Unknown => {}
        }
    }
    out
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

/// `a.b[2]` → `a.b`, `a.b` → `a`, `a` → ``.
fn parent(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(cut) => &path[..cut],
        None => "",
    }
}

/// A YAML node, only for where its children are.
enum Node {
    Map(Vec<(String, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Scalar,
}

fn flatten(node: &Spanned<Node>, path: String, into: &mut HashMap<String, Location>) {
    match &node.value {
        Node::Map(entries) => {
            for (key, child) in entries {
                let mut child_path = path.clone();
                push_key(&mut child_path, key);
                flatten(child, child_path, into);
            }
        }
        Node::Seq(items) => {
            for (index, child) in items.iter().enumerate() {
                flatten(child, format!("{path}[{index}]"), into);
            }
        }
        Node::Scalar => {}
    }
    into.entry(path).or_insert(node.referenced);
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

macro_rules! scalar {
    ($($name:ident: $ty:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $ty) -> Result<Node, E> {
            Ok(Node::Scalar)
        })*
    };
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128,
        visit_f64: f64, visit_str: &str, visit_bytes: &[u8], visit_char: char);

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        Node::deserialize(deserializer)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        Node::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(Key(key)) = map.next_key()? {
            entries.push((key, map.next_value()?));
        }
        Ok(Node::Map(entries))
    }
}

/// A mapping key as text (keys of the config are strings; a number or a bool is written as
/// it reads).
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar key")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }

            fn visit_unit<E: de::Error>(self) -> Result<Key, E> {
                Ok(Key("~".into()))
            }
        }
        deserializer.deserialize_any(KeyVisitor)
    }
}
