//! Chat templates: the model's Hugging Face Jinja template, rendered with `minijinja` the way
//! `transformers`' `apply_chat_template` renders it.
//!
//! The template comes from the directory that holds the model's `tokenizer.json` (the one the
//! router validates with): `chat_template.jinja` when present (newer repositories; transformers
//! prefers it too), else `chat_template` of `tokenizer_config.json`, either a string or a list of
//! `{"name", "template"}` from which `default` is used.
//!
//! The environment matches transformers': `trim_blocks` and `lstrip_blocks`, loop controls,
//! Python string and dict methods (`.strip()`, `.startswith()`, `.items()`... via
//! `minijinja-contrib`'s pycompat), `raise_exception(msg)`, `strftime_now(fmt)`, and a
//! `tojson` that writes like Python's `json.dumps` (`", "` / `": "` separators, no HTML
//! escaping, optional `indent`). Variables: `messages`, `add_generation_prompt` (true), `tools`
//! and `documents` (none), and the special tokens `bos_token`, `eos_token`, `unk_token`,
//! `pad_token` that `tokenizer_config.json` defines.

use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use super::strftime::strftime_now;

/// Name of the chat template in the environment.
const NAME: &str = "chat";
/// The template file of newer Hugging Face repositories.
pub const JINJA_FILE: &str = "chat_template.jinja";
/// The tokenizer configuration holding `chat_template` and the special tokens.
pub const CONFIG_FILE: &str = "tokenizer_config.json";
/// Special tokens passed to the template when `tokenizer_config.json` defines them.
const SPECIAL_TOKENS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

/// Why a conversation could not be turned into a prompt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The model has no chat template (400).
    #[error(
        "this model has no chat template (no `chat_template` in its {CONFIG_FILE} and no {JINJA_FILE}); use /v1/completions with a formatted prompt"
    )]
    Missing,
    /// The template could not be read or compiled (500).
    #[error("the model's chat template cannot be used: {0}")]
    Broken(String),
    /// The template called `raise_exception(message)` (400 with the message).
    #[error("{0}")]
    Raised(String),
    /// Rendering failed for this conversation (400).
    #[error("the chat template failed on this conversation: {0}")]
    Render(String),
}

impl TemplateError {
    /// True when the client can fix the request (everything but a broken template).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, Self::Broken(_))
    }
}

/// The error `raise_exception` carries through minijinja.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

/// One message as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateMessage {
    /// `system`, `user`, `assistant`...
    pub role: String,
    /// The text.
    pub content: String,
    /// The participant's name, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A compiled chat template and the special tokens it may use.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: Vec<(&'static str, String)>,
}

impl ChatTemplate {
    /// Compiles `source`; `config` is the tokenizer configuration the special tokens come from.
    pub fn new(source: String, config: &serde_json::Value) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_template_owned(NAME, source)
            .map_err(|e| TemplateError::Broken(describe(&e)))?;
        let tokens = SPECIAL_TOKENS
            .into_iter()
            .filter_map(|name| special_token(config, name).map(|t| (name, t)))
            .collect();
        Ok(Self { env, tokens })
    }

    /// Loads the template of the model whose tokenizer files are in `dir`.
    pub fn load(dir: &Path) -> Result<Self, TemplateError> {
        let config = read_config(&dir.join(CONFIG_FILE))?;
        let jinja = dir.join(JINJA_FILE);
        let source = if jinja.is_file() {
            std::fs::read_to_string(&jinja)
                .map_err(|e| TemplateError::Broken(format!("{}: {e}", jinja.display())))?
        } else {
            template_in_config(&config)?
        };
        Self::new(source, &config)
    }

    /// Renders a conversation with the generation prompt of the assistant's turn.
    pub fn render(&self, messages: &[TemplateMessage]) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Broken(describe(&e)))?;
        let mut vars: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(true)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        vars.extend(
            self.tokens
                .iter()
                .map(|(name, token)| (*name, Value::from(token.as_str()))),
        );
        template
            .render(Value::from_iter(vars))
            .map_err(|e| match raised(&e) {
                Some(message) => TemplateError::Raised(message),
                None => TemplateError::Render(describe(&e)),
            })
    }
}

/// `tokenizer_config.json` as JSON (`null` when the file does not exist).
fn read_config(path: &Path) -> Result<serde_json::Value, TemplateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serde_json::Value::Null),
        Err(e) => return Err(TemplateError::Broken(format!("{}: {e}", path.display()))),
    };
    serde_json::from_str(&text)
        .map_err(|e| TemplateError::Broken(format!("{}: {e}", path.display())))
}

/// The `chat_template` of a tokenizer configuration: a string, or the `default` entry of a list
/// of named templates.
pub fn template_in_config(config: &serde_json::Value) -> Result<String, TemplateError> {
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Err(TemplateError::Missing),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                TemplateError::Broken("`chat_template` lists no template named `default`".into())
            }),
        Some(other) => Err(TemplateError::Broken(format!(
            "`chat_template` must be a string or a list of named templates, not {other}"
        ))),
    }
}

/// A special token of the configuration: a string, or an added-token object's `content`.
fn special_token(config: &serde_json::Value, name: &str) -> Option<String> {
    match config.get(name)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A minijinja error with its location and causes on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

/// The message of a `raise_exception` call somewhere in the error chain.
fn raised(e: &minijinja::Error) -> Option<String> {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(Raised(message)) = cause.downcast_ref::<Raised>() {
            return Some(message.clone());
        }
        source = cause.source();
    }
    None
}

/// `raise_exception(message)`: fails the rendering with `message`.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, "raise_exception")
            .with_source(Raised(message)),
    )
}

/// Python's `json.dumps` separators without indentation: `, ` and `: `.
struct PythonCompact;

/// `, ` before every item but the first (of an array or an object).
fn item_separator<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = " ".repeat(n);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(spaces.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, formatter,
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonCompact,
        )),
    };
    written.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON")
            .with_source(e)
    })?;
    let json = String::from_utf8(out).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "JSON is not UTF-8").with_source(e)
    })?;
    Ok(Value::from_safe_string(json))
}
