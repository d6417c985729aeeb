//! GGUF checkpoints (the llama.cpp format) seen as a Hugging Face model directory.
//!
//! A `.gguf` file carries the model's configuration, tokenizer and chat template as metadata
//! next to its tensors. [`GgufMetadata::view_files`] turns that metadata into the files the rest
//! of Medley already reads: `config.json` (the shards), `tokenizer.json` and
//! `tokenizer_config.json` (the router's validation and chat template) and
//! `generation_config.json`. The launcher writes them into a directory beside a `model.gguf`
//! link to the file ([`GGUF_FILE`]); the shards read the weights from that link.
//!
//! Only the metadata is read here (candle's GGUF reader, which stops before the tensor data).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

mod config;
mod export;
mod tokenizer;

#[cfg(test)]
mod tests;

pub use config::config_json;
pub use export::{TokenizerExport, config_metadata, tokenizer_metadata};
pub use tokenizer::{tokenizer_config_json, tokenizer_json};

/// Name of the link to the GGUF file inside a model view directory.
pub const GGUF_FILE: &str = "model.gguf";

/// Architectures whose GGUF tensors map onto Medley's Llama implementation.
pub const SUPPORTED_ARCHITECTURES: [&str; 1] = ["llama"];

/// Why a GGUF file cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The file is not a readable GGUF file.
    #[error("{path} is not a readable GGUF file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the reader reported.
        reason: String,
    },
    /// A metadata key the conversion needs is absent.
    #[error("GGUF metadata has no `{0}`")]
    MissingKey(String),
    /// A metadata value has the wrong type or an impossible value.
    #[error("GGUF metadata `{key}`: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The model or tokenizer kind is not one Medley serves.
    #[error("unsupported GGUF model: {0}")]
    Unsupported(String),
    /// Building the tokenizer failed.
    #[error("GGUF tokenizer: {0}")]
    Tokenizer(String),
}

/// The metadata and tensor list of a GGUF file.
pub struct GgufMetadata {
    content: Content,
}

impl std::fmt::Debug for GgufMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufMetadata")
            .field("keys", &self.content.metadata.len())
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufMetadata {
    /// Reads the header, metadata and tensor infos of `path` (not the tensor data).
    pub fn read(path: &Path) -> Result<Self, GgufError> {
        let file = std::fs::File::open(path).map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = std::io::BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| GgufError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Self { content })
    }

    /// Wraps already parsed content (tests, and callers that read the file themselves).
    pub fn from_content(content: Content) -> Self {
        Self { content }
    }

    /// `general.architecture`, checked against [`SUPPORTED_ARCHITECTURES`].
    pub fn architecture(&self) -> Result<&str, GgufError> {
        let arch = self.string("general.architecture")?;
        if SUPPORTED_ARCHITECTURES.contains(&arch) {
            Ok(arch)
        } else {
            Err(GgufError::Unsupported(format!(
                "architecture `{arch}` (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            )))
        }
    }

    /// Whether the file holds a tensor called `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The row-major shape of tensor `name`.
    pub fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| t.shape.dims().to_vec())
    }

    /// The raw metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The parsed file (metadata and tensor infos), to read tensors with.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// Attention heads and key/value heads (`<arch>.attention.head_count[_kv]`): llama.cpp
    /// stores the rows of `attn_q` / `attn_k` permuted per head, and undoing that needs them.
    pub fn head_counts(&self) -> Result<(usize, usize), GgufError> {
        let arch = self.architecture()?;
        let heads = self.u64(&format!("{arch}.attention.head_count"))?;
        let kv = self
            .opt_u64(&format!("{arch}.attention.head_count_kv"))?
            .unwrap_or(heads);
        Ok((heads as usize, kv as usize))
    }

    /// The files of a model view directory (name, bytes), [`GGUF_FILE`] excepted.
    pub fn view_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>, GgufError> {
        let config = config_json(self)?;
        let tokenizer = tokenizer_json(self)?;
        let tokenizer_config = tokenizer_config_json(self)?;
        let mut generation = serde_json::Map::new();
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = config.get(key) {
                generation.insert(key.to_string(), v.clone());
            }
        }
        let pretty = |v: &serde_json::Value| {
            serde_json::to_vec_pretty(v).map_err(|e| GgufError::Tokenizer(e.to_string()))
        };
        Ok(vec![
            ("config.json", pretty(&config)?),
            ("generation_config.json", pretty(&generation.into())?),
            ("tokenizer.json", tokenizer),
            ("tokenizer_config.json", pretty(&tokenizer_config)?),
        ])
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub(crate) fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    pub(crate) fn string(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            other => Err(bad_type(key, "a string", other)),
        }
    }

    pub(crate) fn opt_string(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(bad_type(key, "a string", other)),
        }
    }

    pub(crate) fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key).map(|v| as_u64(key, v)).transpose()
    }

    pub(crate) fn u64(&self, key: &str) -> Result<u64, GgufError> {
        as_u64(key, self.require(key)?)
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(f64::from(*v))),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(other) => Err(bad_type(key, "a float", other)),
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(bad_type(key, "a boolean", other)),
        }
    }

    pub(crate) fn opt_array(&self, key: &str) -> Result<Option<&[Value]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(v)) => Ok(Some(v)),
            Some(other) => Err(bad_type(key, "an array", other)),
        }
    }
}

fn as_u64(key: &str, v: &Value) -> Result<u64, GgufError> {
    let signed = |x: i64| {
        u64::try_from(x).map_err(|_| GgufError::BadValue {
            key: key.to_string(),
            reason: format!("negative value {x}"),
        })
    };
    match v {
        Value::U8(x) => Ok(u64::from(*x)),
        Value::U16(x) => Ok(u64::from(*x)),
        Value::U32(x) => Ok(u64::from(*x)),
        Value::U64(x) => Ok(*x),
        Value::I8(x) => signed(i64::from(*x)),
        Value::I16(x) => signed(i64::from(*x)),
        Value::I32(x) => signed(i64::from(*x)),
        Value::I64(x) => signed(*x),
        other => Err(bad_type(key, "an integer", other)),
    }
}

fn bad_type(key: &str, expected: &str, got: &Value) -> GgufError {
    GgufError::BadValue {
        key: key.to_string(),
        reason: format!("expected {expected}, found {:?}", got.value_type()),
    }
}

/// Writes the model view of the GGUF file `gguf` into the existing directory `dir`: the files of
/// [`GgufMetadata::view_files`] and a [`GGUF_FILE`] symbolic link to `gguf` (made absolute).
pub fn write_view(gguf: &Path, dir: &Path) -> Result<(), GgufError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GgufError::Io { path, source }
    };
    let target = std::fs::canonicalize(gguf).map_err(io(gguf))?;
    let meta = GgufMetadata::read(&target)?;
    for (name, bytes) in meta.view_files()? {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    let link = dir.join(GGUF_FILE);
    std::os::unix::fs::symlink(&target, &link).map_err(io(&link))?;
    Ok(())
}

/// The `.gguf` file `path` names: the path itself when it is a file, else the only `.gguf`
/// file of the directory `path` when that directory has no `config.json` (a Hugging Face
/// directory wins). `Ok(None)` when `path` is neither.
pub fn find_gguf(path: &Path) -> Result<Option<PathBuf>, GgufError> {
    if path.is_file() {
        return Ok(is_gguf_name(path).then(|| path.to_path_buf()));
    }
    if !path.is_dir() || path.join("config.json").exists() {
        return Ok(None);
    }
    let io = |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut found = vec![];
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.is_file() && is_gguf_name(&p) {
            found.push(p);
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(GgufError::Unsupported(format!(
            "{} holds several .gguf files ({}); pass one of them as --model",
            path.display(),
            found
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn is_gguf_name(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
