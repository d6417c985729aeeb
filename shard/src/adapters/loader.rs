//! Turning a prepare's adapter spec into slot weights, off the engine thread: resolve every
//! component (cache or download), read and shape-check it (through the parsed-adapter cache),
//! merge on a dedicated thread pool, and copy the result to the device. The result waits staged
//! until the router installs it; the engine then only swaps it into its slot.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use medley_merge::peft::{PeftError, read_adapter_dir};
use medley_merge::{LoraAdapter, MergeSpec};
use medley_spec::{AdapterRef, AdapterSpec};

use super::AdapterError;
use super::base::BaseModules;
use super::cache::SourceCache;
use super::config::AdapterSettings;
use super::source::{AdapterSources, ResolvedSource};
use super::weights::{SlotAdapter, SlotWeights};

/// A finished adapter, ready to install.
#[derive(Debug)]
pub struct PreparedAdapter {
    /// The device weights.
    pub adapter: SlotAdapter,
    /// Time spent resolving and reading the adapter files.
    pub load_ns: u64,
    /// Time spent merging (0 for a single adapter).
    pub merge_ns: u64,
}

/// What a prepare asks for: the components and, for a merge, how to combine them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadPlan {
    /// The adapters to read, in component order.
    pub components: Vec<AdapterRef>,
    /// `None` for a single adapter (served with its own per-module scales).
    pub merge: Option<MergeSpec>,
}

impl LoadPlan {
    /// The plan of an (already validated) adapter spec; the base model is not loadable.
    pub fn from_spec(spec: AdapterSpec) -> Result<Self, AdapterError> {
        match spec {
            AdapterSpec::Base => Err(AdapterError::Invalid(
                "the base model is not loaded into an adapter slot".into(),
            )),
            AdapterSpec::Single(r) => Ok(Self {
                components: vec![r],
                merge: None,
            }),
            AdapterSpec::Merged(m) => Ok(Self {
                components: m.components,
                merge: Some(m.merge),
            }),
        }
    }
}

/// Called right before a merge starts (tests use it to hold a merge open).
pub type MergeHook = Arc<dyn Fn() + Send + Sync>;

/// Resolves, reads and merges adapters for the slots of one shard.
pub struct AdapterLoader {
    sources: AdapterSources,
    base: Arc<BaseModules>,
    cache: SourceCache,
    pool: rayon::ThreadPool,
    device: Device,
    max_slots: u32,
    before_merge: Option<MergeHook>,
}

impl std::fmt::Debug for AdapterLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterLoader")
            .field("roots", &self.sources.roots())
            .field("cache", &self.cache)
            .field("merge_threads", &self.pool.current_num_threads())
            .field("device", &self.device)
            .finish()
    }
}

impl AdapterLoader {
    /// A loader for a model with projections `base` on `device` (adapter factors are uploaded
    /// in [`super::LORA_DTYPE`] whatever the model's dtype).
    pub fn new(
        settings: &AdapterSettings,
        base: BaseModules,
        device: &Device,
    ) -> Result<Self, AdapterError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.merge_threads.max(1))
            .thread_name(|i| format!("medley-merge-{i}"))
            .build()
            .map_err(|e| AdapterError::Internal(format!("merge thread pool: {e}")))?;
        Ok(Self {
            sources: AdapterSources::new(&settings.roots, settings.hub.clone())?
                .with_builtin(settings.builtin.clone()),
            base: Arc::new(base),
            cache: SourceCache::new(settings.source_cache_bytes),
            pool,
            device: device.clone(),
            max_slots: settings.max_slots,
            before_merge: None,
        })
    }

    /// Installs a hook run on the worker right before each merge.
    #[doc(hidden)]
    pub fn with_before_merge(mut self, hook: MergeHook) -> Self {
        self.before_merge = Some(hook);
        self
    }

    /// Number of adapter slots of the shard (`--max-adapter-slots`).
    pub fn max_slots(&self) -> u32 {
        self.max_slots
    }

    /// The source resolver.
    pub fn sources(&self) -> &AdapterSources {
        &self.sources
    }

    /// The base model's projections.
    pub fn base(&self) -> &BaseModules {
        &self.base
    }

    /// Number of parsed source adapters cached, and their bytes.
    pub fn cache_stats(&self) -> (usize, u64) {
        self.cache.stats()
    }

    /// Resolves the components of `plan` (may download), then reads and merges them on the
    /// blocking pool. The calling task only awaits.
    pub async fn prepare(
        self: &Arc<Self>,
        plan: LoadPlan,
    ) -> Result<PreparedAdapter, AdapterError> {
        let t0 = Instant::now();
        let mut resolved = Vec::with_capacity(plan.components.len());
        for r in &plan.components {
            resolved.push(self.sources.resolve(r).await?);
        }
        let resolve_ns = t0.elapsed().as_nanos() as u64;
        let this = self.clone();
        // The caller's span (a traced prepare call) holds the read and merge spans.
        let span = tracing::Span::current();
        let mut prepared = tokio::task::spawn_blocking(move || {
            span.in_scope(|| this.build(&resolved, plan.merge.as_ref()))
        })
        .await
        .map_err(|e| AdapterError::Internal(format!("adapter worker failed: {e}")))??;
        prepared.load_ns += resolve_ns;
        Ok(prepared)
    }

    /// Reads (through the cache), checks and, with `merge`, merges `sources`, then copies the
    /// result to the device. Blocking: call it off the engine thread.
    pub fn build(
        &self,
        sources: &[ResolvedSource],
        merge: Option<&MergeSpec>,
    ) -> Result<PreparedAdapter, AdapterError> {
        let t0 = Instant::now();
        let adapters =
            child_span(|| tracing::info_span!("adapter_read", components = sources.len()))
                .in_scope(|| {
                    sources
                        .iter()
                        .map(|s| self.read(s))
                        .collect::<Result<Vec<_>, _>>()
                })?;
        let load_ns = t0.elapsed().as_nanos() as u64;
        let t1 = Instant::now();
        let (weights, merge_ns) = match (merge, adapters.as_slice()) {
            (None, [only]) => (SlotWeights::from_adapter(only, &self.base)?, 0),
            (None, _) => {
                return Err(AdapterError::Invalid(format!(
                    "{} adapters given without a merge",
                    adapters.len()
                )));
            }
            (Some(spec), _) => {
                if let Some(hook) = &self.before_merge {
                    hook();
                }
                let refs: Vec<&LoraAdapter> = adapters.iter().map(Arc::as_ref).collect();
                let span = child_span(|| {
                    let components = refs.len();
                    tracing::info_span!("adapter_merge", components, strategy = ?spec.strategy)
                });
                let merged = span
                    .in_scope(|| self.pool.install(|| medley_merge::merge(spec, &refs)))
                    .map_err(|e| {
                        let ids: Vec<&str> = sources.iter().map(|s| s.id.as_str()).collect();
                        AdapterError::Invalid(format!("cannot merge [{}]: {e}", ids.join(", ")))
                    })?;
                let weights = SlotWeights::from_merged(&merged, &self.base)?;
                (weights, t1.elapsed().as_nanos() as u64)
            }
        };
        let adapter = weights.to_device(&self.base, &self.device)?;
        tracing::info!(
            components = sources.len(),
            bytes = adapter.bytes(),
            rank = adapter.rank(),
            hash = adapter.content_hash(),
            load_ms = load_ns / 1_000_000,
            merge_ms = merge_ns / 1_000_000,
            "adapter prepared"
        );
        Ok(PreparedAdapter {
            adapter,
            load_ns,
            merge_ns,
        })
    }

    /// Reads and checks one adapter, or takes it from the cache.
    fn read(&self, s: &ResolvedSource) -> Result<Arc<LoraAdapter>, AdapterError> {
        let (adapter, hit) = self.cache.get_or_load(&s.key, || {
            let peft = read_adapter_dir(&s.dir).map_err(|e| peft_error(&s.id, &s.dir, e))?;
            self.base.check(&s.id, &peft.adapter)?;
            Ok::<_, AdapterError>(peft.adapter)
        })?;
        tracing::debug!(id = %s.id, dir = %s.dir.display(), cached = hit, "adapter read");
        Ok(adapter)
    }
}

/// File errors after resolution are internal (or a race with a deletion); everything else is a
/// problem of the adapter itself.
fn peft_error(id: &str, dir: &std::path::Path, e: PeftError) -> AdapterError {
    match e {
        PeftError::Io { source, path } if source.kind() == std::io::ErrorKind::NotFound => {
            AdapterError::NotFound {
                id: id.to_string(),
                detail: format!("{path} disappeared"),
            }
        }
        PeftError::Io { source, path } => {
            AdapterError::Internal(format!("adapter {id}: reading {path}: {source}"))
        }
        other => AdapterError::Invalid(format!(
            "adapter {id} ({}): {other}",
            PathBuf::from(dir).display()
        )),
    }
}

#[cfg(test)]
#[path = "loader_tests.rs"]
mod tests;

/// A span made by `make` when the current span is traced, else none: work outside a traced
/// call starts no trace of its own.
fn child_span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if tracing::Span::current().is_disabled() {
        tracing::Span::none()
    } else {
        make()
    }
}
