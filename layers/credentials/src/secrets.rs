//! The secrets file and the per-project Langfuse keys.
//!
//! ```yaml
//! langfuse_keys:
//!   project_1_id:
//!     public_key: pk-lf-...
//!     secret_key: sk-lf-...
//!   project_2_id: {public_key: pk-lf-..., secret_key: sk-lf-...}
//! default_project_id: project_1_id
//! ```
//!
//! Error messages name keys and projects, never key values: the YAML is read into an untyped
//! tree (`serde-saphyr`, which refuses duplicate keys and is told to show no source snippet) and
//! walked by hand rather than deserialised into a typed struct, because serde's type errors quote
//! the offending value.
//!
//! Project ids are YAML scalars read as text: `12345:` and `"12345":` name the same project, as
//! they do in a `/project_id/12345/…` path.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use llmgate_core::{
    GatewayError,
    ext::{LangfuseKeys, Project, Secret},
};
use serde_json::Value;

// === SecretsError ===

/// Why the secrets file could not be loaded. Messages never contain key values.
#[derive(Debug)]
#[non_exhaustive]
pub enum SecretsError {
    /// The file does not exist.
    NotFound {
        /// The path tried.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    Read {
        /// The path tried.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML or has the wrong shape.
    InvalidFormat {
        /// The file (`<string>` when parsed from a string).
        path: PathBuf,
        /// What is wrong (with line and column for syntax errors), without values.
        message: String,
    },
    /// A required key is missing.
    MissingKey {
        /// The dotted key, e.g. `langfuse_keys.p1.secret_key`.
        key: String,
    },
    /// `default_project_id` names no project of `langfuse_keys`.
    UnknownDefaultProject {
        /// The configured default.
        project: String,
    },
}

impl fmt::Display for SecretsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound { path } => write!(
                f,
                "Secrets file not found! Expected it at {} (set SECRETS_PATH to point elsewhere)",
                path.display()
            ),
            Self::Read { path, source } => write!(f, "Could not read secrets file {}: {source}", path.display()),
            Self::InvalidFormat { path, message } => {
                write!(f, "Invalid format in secrets file {}: {message}", path.display())
            }
            Self::MissingKey { key } => write!(f, "Missing required key in secrets file: {key}"),
            Self::UnknownDefaultProject { project } => write!(
                f,
                "Invalid secrets file: default_project_id '{project}' is not one of the projects under langfuse_keys"
            ),
        }
    }
}

impl SecretsError {
    /// The message, naming the file at `path` where the message alone does not; it starts
    /// with the message the spec gives either way.
    pub fn describe(&self, path: &Path) -> String {
        match self {
            Self::NotFound { .. } | Self::Read { .. } | Self::InvalidFormat { .. } => self.to_string(),
            Self::MissingKey { .. } | Self::UnknownDefaultProject { .. } => {
                format!("{self} (in {})", path.display())
            }
        }
    }
}

impl std::error::Error for SecretsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

// === Secrets ===

/// The parsed and validated secrets file.
#[derive(Clone)]
pub struct Secrets {
    projects: Vec<Project>,
    default_project_id: Arc<str>,
}

impl Secrets {
    /// Reads and validates the secrets file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SecretsError> {
        let path = path.as_ref();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(SecretsError::NotFound { path: path.to_owned() });
            }
            Err(source) => {
                return Err(SecretsError::Read { path: path.to_owned(), source });
            }
        };
        Self::parse(&text, path)
    }

    /// Parses and validates secrets YAML held in memory.
    pub fn from_yaml_str(yaml: &str) -> Result<Self, SecretsError> {
        Self::parse(yaml, Path::new("<string>"))
    }

    fn parse(yaml: &str, path: &Path) -> Result<Self, SecretsError> {
        let invalid = |message: String| SecretsError::InvalidFormat { path: path.to_owned(), message };
        let root: Value =
            serde_saphyr::from_str_with_options(yaml, options()).map_err(|error| invalid(syntax_message(&error)))?;
        let root = match &root {
            Value::Object(map) => map,
            Value::Null => {
                return Err(SecretsError::MissingKey { key: "langfuse_keys".into() });
            }
            _ => return Err(invalid("the document must be a mapping".into())),
        };
        let keys = match root.get("langfuse_keys") {
            Some(Value::Object(keys)) => keys,
            Some(_) => {
                return Err(invalid("'langfuse_keys' must be a mapping of project ids".into()));
            }
            None => {
                return Err(SecretsError::MissingKey { key: "langfuse_keys".into() });
            }
        };
        let default_project_id: Arc<str> = match root.get("default_project_id") {
            Some(Value::String(id)) => id.as_str().into(),
            Some(Value::Number(id)) => id.to_string().into(),
            Some(_) => return Err(invalid("'default_project_id' must be a project id".into())),
            None => {
                return Err(SecretsError::MissingKey { key: "default_project_id".into() });
            }
        };
        let mut projects = Vec::with_capacity(keys.len());
        for (id, entry) in keys {
            let Value::Object(entry) = entry else {
                return Err(invalid(format!("'langfuse_keys.{id}' must be a mapping with public_key and secret_key")));
            };
            let field = |name: &str| match entry.get(name) {
                Some(Value::String(value)) if !value.is_empty() => Ok(value.as_str()),
                Some(_) => Err(invalid(format!("'langfuse_keys.{id}.{name}' must be a non-empty string"))),
                None => Err(SecretsError::MissingKey { key: format!("langfuse_keys.{id}.{name}") }),
            };
            let public_key = field("public_key")?;
            let secret_key = field("secret_key")?;
            projects.push(Project {
                id: id.as_str().into(),
                langfuse: LangfuseKeys { public_key: public_key.into(), secret_key: Secret::new(secret_key) },
            });
        }
        if !projects.iter().any(|p| p.id == default_project_id) {
            return Err(SecretsError::UnknownDefaultProject { project: default_project_id.to_string() });
        }
        Ok(Self { projects, default_project_id })
    }

    /// The projects, in file order.
    pub fn projects(&self) -> &[Project] {
        &self.projects
    }

    /// The default project's id.
    pub fn default_project_id(&self) -> &str {
        &self.default_project_id
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("projects", &self.projects.iter().map(|p| &*p.id).collect::<Vec<_>>())
            .field("default_project_id", &self.default_project_id)
            .finish()
    }
}

/// Duplicate keys refused; no source snippet in messages (it could show a key).
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! { with_snippet: false }
}

/// A YAML syntax error without any quoted input: the location and the parser's complaint.
fn syntax_message(error: &serde_saphyr::Error) -> String {
    // The parser's messages describe the grammar problem; keep only the text before any quote,
    // so that no fragment of the input can reach a log.
    let text = error.to_string();
    let safe = text.split(['"', '\'', '`']).next().unwrap_or_default().trim_end();
    match error.location() {
        Some(at) if at.line() > 0 && !safe.contains(" line ") => {
            format!("{safe} at line {} column {}", at.line(), at.column())
        }
        _ => safe.to_owned(),
    }
}

// === Projects ===

/// The projects a gateway knows, by id, and the default one. Cheap to share in an `Arc`.
///
/// Empty when no secrets file is configured: then requests without a `project_id` get no
/// [`Project`], and requests naming one get 404.
#[derive(Clone, Default)]
pub struct Projects {
    by_id: HashMap<Arc<str>, Project>,
    default: Option<Project>,
}

impl Projects {
    /// No projects (no secrets file configured).
    pub fn empty() -> Self {
        Self::default()
    }

    /// The projects of a loaded secrets file.
    pub fn from_secrets(secrets: Secrets) -> Self {
        let default = secrets.projects.iter().find(|p| p.id == secrets.default_project_id).cloned();
        let by_id = secrets.projects.into_iter().map(|p| (p.id.clone(), p)).collect();
        Self { by_id, default }
    }

    /// Loads the secrets file at `path` (see [`Secrets::load`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SecretsError> {
        Secrets::load(path).map(Self::from_secrets)
    }

    /// The project with this id.
    pub fn get(&self, id: &str) -> Option<&Project> {
        self.by_id.get(id)
    }

    /// The default project, if secrets are configured.
    pub fn default_project(&self) -> Option<&Project> {
        self.default.as_ref()
    }

    /// How many projects there are.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no projects are configured.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The project a request names, or the default when it names none.
    ///
    /// `Ok(None)` when it names none and no secrets are configured. A named project that does
    /// not exist is `GatewayError::NotFound("Project 'x' not found")`; other projects' names are
    /// never listed. The trace routes use this too, so both answer alike.
    pub fn resolve(&self, named: Option<&str>) -> Result<Option<Project>, GatewayError> {
        match named {
            Some(id) => match self.get(id) {
                Some(project) => Ok(Some(project.clone())),
                None => Err(GatewayError::NotFound(format!("Project '{id}' not found"))),
            },
            None => Ok(self.default.clone()),
        }
    }
}

impl From<Secrets> for Projects {
    fn from(secrets: Secrets) -> Self {
        Self::from_secrets(secrets)
    }
}

impl fmt::Debug for Projects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&str> = self.by_id.keys().map(|id| &**id).collect();
        ids.sort_unstable();
        f.debug_struct("Projects")
            .field("projects", &ids)
            .field("default", &self.default.as_ref().map(|p| &*p.id))
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const GOOD: &str = "langfuse_keys:\n  p1:\n    public_key: pk-lf-AAA\n    secret_key: sk-lf-BBB\n  p2: {public_key: pk-lf-CCC, secret_key: sk-lf-DDD}\ndefault_project_id: p1\n";

    /// A file in a fresh temporary directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "llmgate-credentials-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("secrets.yaml");
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    #[test]
    fn loads_both_yaml_styles() {
        let file = TempFile::new(GOOD);
        let secrets = Secrets::load(&file.0).unwrap();
        assert_eq!(secrets.default_project_id(), "p1");
        assert_eq!(secrets.projects().len(), 2);
        let projects = Projects::from(secrets);
        let p2 = projects.get("p2").unwrap();
        assert_eq!(&*p2.langfuse.public_key, "pk-lf-CCC");
        assert_eq!(p2.langfuse.secret_key.expose(), "sk-lf-DDD");
        assert_eq!(projects.default_project().map(|p| &*p.id), Some("p1"));
    }

    #[test]
    fn resolve_rules() {
        let projects = Projects::from(Secrets::from_yaml_str(GOOD).unwrap());
        assert_eq!(projects.resolve(None).unwrap().map(|p| p.id), Some("p1".into()));
        assert_eq!(projects.resolve(Some("p2")).unwrap().map(|p| p.id), Some("p2".into()));
        let error = projects.resolve(Some("nope")).unwrap_err();
        assert_eq!(error, GatewayError::NotFound("Project 'nope' not found".into()));
        assert!(!error.to_string().contains("p1") && !error.to_string().contains("p2"));

        let empty = Projects::empty();
        assert!(empty.resolve(None).unwrap().is_none());
        assert!(matches!(empty.resolve(Some("p1")), Err(GatewayError::NotFound(_))));
    }

    #[test]
    fn missing_file() {
        let error = Secrets::load("/nonexistent/llmgate/secrets.yaml").unwrap_err();
        assert!(matches!(error, SecretsError::NotFound { .. }));
        assert!(error.to_string().starts_with("Secrets file not found!"), "{error}");
    }

    #[test]
    fn missing_keys() {
        let cases = [
            ("default_project_id: p1\n", "langfuse_keys"),
            ("langfuse_keys: {p1: {public_key: pk, secret_key: sk}}\n", "default_project_id"),
            ("langfuse_keys: {p1: {public_key: pk}}\ndefault_project_id: p1\n", "langfuse_keys.p1.secret_key"),
            ("langfuse_keys: {p1: {secret_key: sk-lf-ZZZ}}\ndefault_project_id: p1\n", "langfuse_keys.p1.public_key"),
            ("", "langfuse_keys"),
        ];
        for (yaml, key) in cases {
            let error = Secrets::from_yaml_str(yaml).unwrap_err();
            assert!(matches!(&error, SecretsError::MissingKey { key: k } if k == key), "{yaml}: {error}");
            assert!(error.to_string().starts_with("Missing required key in secrets file:"));
            assert!(!error.to_string().contains("sk-lf-ZZZ"));
        }
    }

    #[test]
    fn bad_yaml_and_bad_shapes_never_echo_values() {
        let file = TempFile::new(
            "langfuse_keys:\n  p1: {public_key: \"pk-lf-QQQ, secret_key: sk-lf-SECRET\ndefault_project_id: p1\n",
        );
        let error = Secrets::load(&file.0).unwrap_err();
        assert!(matches!(error, SecretsError::InvalidFormat { .. }), "{error}");
        let text = error.to_string();
        assert!(text.starts_with("Invalid format in secrets file"), "{text}");
        assert!(text.contains("line"), "{text}");
        assert!(!text.contains("SECRET") && !text.contains("QQQ"), "{text}");

        for yaml in [
            "- a\n- b\n",
            "langfuse_keys: [sk-lf-SECRET]\ndefault_project_id: p1\n",
            "langfuse_keys: {p1: sk-lf-SECRET}\ndefault_project_id: p1\n",
            "langfuse_keys: {p1: {public_key: pk, secret_key: [sk-lf-SECRET]}}\ndefault_project_id: p1\n",
            "langfuse_keys: {p1: {public_key: pk, secret_key: ''}}\ndefault_project_id: p1\n",
            "langfuse_keys: {p1: {public_key: pk, secret_key: sk}}\ndefault_project_id: [p1]\n",
            "langfuse_keys: {p1: {public_key: pk, secret_key: 12345}}\ndefault_project_id: p1\n",
            "langfuse_keys: {p1: {public_key: pk, secret_key: sk-lf-SECRET}, p1: {public_key: pk, secret_key: sk-lf-SECRET}}\ndefault_project_id: p1\n",
        ] {
            let error = Secrets::from_yaml_str(yaml).unwrap_err();
            assert!(matches!(error, SecretsError::InvalidFormat { .. }), "{yaml}: {error}");
            assert!(!error.to_string().contains("SECRET"), "{error}");
            assert!(!format!("{error:?}").contains("SECRET"), "{error:?}");
        }
    }

    /// A startup error starts with the spec's message and names the file once.
    #[test]
    fn a_described_error_names_the_file_once() {
        let missing = Path::new("/nowhere/secrets.yaml");
        let error = Secrets::load(missing).unwrap_err();
        let text = error.describe(missing);
        assert!(text.starts_with("Secrets file not found!"), "{text}");
        assert_eq!(text.matches("/nowhere/secrets.yaml").count(), 1, "{text}");

        let file = TempFile::new("langfuse_keys: {p1: {public_key: pk}}\ndefault_project_id: p1\n");
        let text = Secrets::load(&file.0).unwrap_err().describe(&file.0);
        assert!(text.starts_with("Missing required key in secrets file: langfuse_keys.p1.secret_key"), "{text}");
        assert_eq!(text.matches(&*file.0.to_string_lossy()).count(), 1, "{text}");

        let file = TempFile::new("langfuse_keys: [\n");
        let text = Secrets::load(&file.0).unwrap_err().describe(&file.0);
        assert!(text.starts_with("Invalid format in secrets file"), "{text}");
        assert_eq!(text.matches(&*file.0.to_string_lossy()).count(), 1, "{text}");
    }

    #[test]
    fn numeric_project_ids_are_text() {
        let yaml = "langfuse_keys:\n  12345: {public_key: pk, secret_key: sk}\n  \"007\": {public_key: pk, secret_key: sk}\ndefault_project_id: 12345\n";
        let projects = Projects::from(Secrets::from_yaml_str(yaml).unwrap());
        assert_eq!(projects.default_project().map(|p| &*p.id), Some("12345"));
        assert!(projects.get("007").is_some());
    }

    #[test]
    fn default_project_must_exist() {
        let yaml = "langfuse_keys: {p1: {public_key: pk, secret_key: sk}}\ndefault_project_id: p9\n";
        let error = Secrets::from_yaml_str(yaml).unwrap_err();
        assert!(matches!(&error, SecretsError::UnknownDefaultProject { project } if project == "p9"));
        assert!(!error.to_string().contains("p1"), "{error}");
    }

    #[test]
    fn debug_shows_no_keys() {
        let secrets = Secrets::from_yaml_str(GOOD).unwrap();
        let projects = Projects::from(secrets.clone());
        for text in [format!("{secrets:?}"), format!("{projects:?}"), format!("{:?}", Arc::new(projects))] {
            for key in ["pk-lf-AAA", "sk-lf-BBB", "pk-lf-CCC", "sk-lf-DDD", "AAA", "BBB", "DDD"] {
                assert!(!text.contains(key), "{text}");
            }
            assert!(text.contains("p1"), "{text}");
        }
    }
}
