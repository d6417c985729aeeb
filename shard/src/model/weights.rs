//! Checkpoints: memory-mapped safetensors (a single `model.safetensors` or a sharded
//! `model.safetensors.index.json` with its shard files), or the `model.gguf` of a GGUF model
//! view (`weights_gguf`).
//!
//! Every tensor is looked up by name and checked against the shape the architecture expects before
//! it is copied to the device and converted to the requested dtype, so a broken checkpoint fails
//! with an error naming the tensor instead of a shape error deep inside the forward pass.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::ModelError;
use super::weights_gguf::GgufCheckpoint;

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// File name of a GGUF model's weights in a model view directory.
pub const GGUF_FILE: &str = medley_hub::gguf::GGUF_FILE;

/// An opened checkpoint: the memory maps of its files and their headers, or a GGUF file.
pub struct Checkpoint {
    source: Source,
    files: Vec<PathBuf>,
}

enum Source {
    Safetensors(MmapedSafetensors),
    Gguf(GgufCheckpoint),
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("files", &self.files)
            .finish()
    }
}

impl Checkpoint {
    /// Opens the weights of `dir`: the safetensors index, else a single safetensors file, else
    /// `model.gguf`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join(INDEX_FILE);
        let files = if index.exists() {
            shard_files(dir, &index)?
        } else if dir.join(SINGLE_FILE).exists() {
            vec![dir.join(SINGLE_FILE)]
        } else if dir.join(GGUF_FILE).exists() {
            let gguf = GgufCheckpoint::open(&dir.join(GGUF_FILE))?;
            return Ok(Self {
                files: vec![gguf.path().to_path_buf()],
                source: Source::Gguf(gguf),
            });
        } else {
            return Err(ModelError::Weights(format!(
                "no {SINGLE_FILE}, {INDEX_FILE} or {GGUF_FILE} in {}",
                dir.display()
            )));
        };
        for f in &files {
            if !f.is_file() {
                return Err(ModelError::Weights(format!(
                    "missing shard {}",
                    f.display()
                )));
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on the
        // checkpoint not being truncated or rewritten while the model is loading. Tensors are
        // copied out of the map before `Checkpoint` is dropped.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| ModelError::Weights(format!("reading safetensors headers: {e}")))?;
        Ok(Self {
            source: Source::Safetensors(st),
            files,
        })
    }

    /// The weight files, in index order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Whether the checkpoint holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors(st) => st.get(name).is_ok(),
            Source::Gguf(g) => g.contains(name),
        }
    }

    /// Loads tensor `name`, checking that its shape is `shape`, converted to `dtype` on `device`.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        self.tensor_part(name, shape, Part::Whole, dtype, device)
    }

    /// Loads `part` of the 2-D tensor `name` (whole shape `shape`), converted to `dtype` on
    /// `device`. Only the part's bytes are read from the memory-mapped file, so the ranks of a
    /// tensor-parallel group do not each hold a full copy.
    pub fn tensor_part(
        &self,
        name: &str,
        shape: &[usize],
        part: Part,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        match &self.source {
            Source::Safetensors(st) => safetensors_part(st, name, shape, part, dtype, device),
            Source::Gguf(g) => g.tensor_part(name, shape, part, dtype, device),
        }
    }
}

impl Checkpoint {
    /// Whether the weights come from a GGUF file.
    pub fn is_gguf(&self) -> bool {
        matches!(self.source, Source::Gguf(_))
    }

    /// `part` of the 2-D tensor `name` in the quantized (block) type the checkpoint stores it
    /// in, on `device`; `None` when it is stored as floats (always, for safetensors).
    pub fn qtensor_part(
        &self,
        name: &str,
        shape: &[usize],
        part: Part,
        device: &Device,
    ) -> Result<Option<candle_core::quantized::QTensor>, ModelError> {
        match &self.source {
            Source::Safetensors(_) => Ok(None),
            Source::Gguf(g) => g.qtensor_part(name, shape, part, device),
        }
    }
}

/// `part` of tensor `name` from memory-mapped safetensors (see [`Checkpoint::tensor_part`]).
fn safetensors_part(
    st: &MmapedSafetensors,
    name: &str,
    shape: &[usize],
    part: Part,
    dtype: DType,
    device: &Device,
) -> Result<Tensor, ModelError> {
    let view = st.get(name).map_err(|_| ModelError::MissingTensor {
        name: name.to_string(),
    })?;
    if view.shape() != shape {
        return Err(ModelError::WrongShape {
            name: name.to_string(),
            expected: shape.to_vec(),
            actual: view.shape().to_vec(),
        });
    }
    let stored = match view.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F16 => DType::F16,
        other => {
            return Err(ModelError::Unsupported(format!(
                "tensor `{name}` stored as {other:?} (f32, bf16 and f16 are supported)"
            )));
        }
    };
    let elem = stored.size_in_bytes();
    let data = view.data();
    let (bytes, part_shape): (std::borrow::Cow<'_, [u8]>, Vec<usize>) = match (part, shape) {
        (Part::Whole, _) => (data.into(), shape.to_vec()),
        (Part::Rows(r), &[rows, cols]) if r.start <= r.end && r.end <= rows => (
            data[r.start * cols * elem..r.end * cols * elem].into(),
            vec![r.len(), cols],
        ),
        (Part::Cols(c), &[rows, cols]) if c.start <= c.end && c.end <= cols => {
            let mut out = Vec::with_capacity(rows * c.len() * elem);
            for row in data.chunks_exact(cols * elem) {
                out.extend_from_slice(&row[c.start * elem..c.end * elem]);
            }
            (out.into(), vec![rows, c.len()])
        }
        (part, _) => {
            return Err(ModelError::Weights(format!(
                "`{name}` of shape {shape:?} has no part {part:?}"
            )));
        }
    };
    let t = Tensor::from_raw_buffer(&bytes, stored, &part_shape, device).map_err(|e| {
        match ModelError::from(e) {
            ModelError::OutOfMemory(m) => ModelError::OutOfMemory(format!("loading `{name}`: {m}")),
            other => ModelError::Weights(format!("loading `{name}`: {other}")),
        }
    })?;
    drop(bytes);
    release_pages(data);
    Ok(t.to_dtype(dtype)?)
}

/// Drops the pages of the memory-mapped `bytes` from this process's resident set once they have
/// been copied (they stay in the page cache; a later read faults them in again). Without it a
/// rank's peak memory counts every checkpoint page it touched on top of its copies, and a
/// column slice touches nearly every page of its tensor.
fn release_pages(bytes: &[u8]) {
    const PAGE: usize = 4096;
    let start = bytes.as_ptr() as usize & !(PAGE - 1);
    let end = bytes.as_ptr() as usize + bytes.len();
    if end > start {
        // SAFETY: the range covers whole pages of a read-only shared file mapping that stays
        // mapped; MADV_DONTNEED only drops their resident copies, and their contents are read
        // back from the file on the next access, so no reference observes a change.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

/// Which part of a 2-D weight a rank loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// All of it.
    Whole,
    /// These rows (output features).
    Rows(std::ops::Range<usize>),
    /// These columns (input features).
    Cols(std::ops::Range<usize>),
}

/// The distinct shard files named by a `model.safetensors.index.json`, in order of appearance.
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Weights(format!("{}: {e}", index.display())))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Weights(format!("{}: no weight_map object", index.display())))?;
    let mut seen = BTreeSet::new();
    let mut files = vec![];
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            ModelError::Weights(format!(
                "{}: weight_map[{name}] is not a string",
                index.display()
            ))
        })?;
        // Shards must live next to the index: no absolute paths or `..` escapes.
        let rel = Path::new(file);
        if rel.components().count() != 1 || rel.is_absolute() {
            return Err(ModelError::Weights(format!(
                "{}: shard path `{file}` must be a plain file name",
                index.display()
            )));
        }
        if seen.insert(file.to_string()) {
            files.push(dir.join(rel));
        }
    }
    if files.is_empty() {
        return Err(ModelError::Weights(format!(
            "{}: empty weight_map",
            index.display()
        )));
    }
    Ok(files)
}
