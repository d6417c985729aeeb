//! `medley merge`: merge PEFT LoRA adapters offline into a new PEFT adapter directory, with the
//! same strategies, parameters and numerics as per-request merges in the server.
//!
//! ```text
//! medley merge --adapters DIR_OR_ID,DIR_OR_ID,... --weights 2.0,0.3,0.7 \
//!     --strategy ties --density 0.2 [--majority-sign-method total] [--seed N] --out DIR
//! ```
//!
//! Each adapter is a local directory (used as is) or a Hugging Face hub id (the cache first, then
//! a download, like the server). The output loads in PEFT (`PeftModel.from_pretrained`) and in
//! Medley (`adapter_id` with `adapter_source: local` under an `--adapter-root`), where it gives the
//! same outputs as the on-the-fly merge of the same request.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medley_hub::HubSettings;
use medley_merge::peft::{
    PeftAdapter, TensorDtype, WriteOptions, merged_target_modules, read_adapter_dir,
    write_merged_dir,
};
use medley_shard::adapters::source::AdapterSources;
use medley_spec::{
    AdapterRef, AdapterSource, MergeLimits, MergeSpec, MergedAdapters, Semantics, SpecError,
    is_hub_id,
};

/// Flags of `medley merge`.
#[derive(Debug, Clone, clap::Args)]
pub struct MergeArgs {
    /// Adapters to merge, in order: local directories or hub ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub adapters: Vec<String>,
    /// One weight per adapter, comma-separated (default: 1 each).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub weights: Vec<f32>,
    /// linear | ties | dare_linear | dare_ties | magnitude_prune | cat | svd | ties_svd |
    /// dare_linear_svd | dare_ties_svd | magnitude_prune_svd (case-insensitive).
    #[arg(long, default_value = "linear")]
    pub strategy: String,
    /// Fraction of entries kept by ties / dare / magnitude_prune, in [0, 1].
    #[arg(long)]
    pub density: Option<f32>,
    /// Sign election of ties: total | frequency.
    #[arg(long, default_value = "total")]
    pub majority_sign_method: String,
    /// Seed of the DARE masks (default: derived from the merge, like the server's default for
    /// the same adapter ids; pass it explicitly to reproduce a server merge whose ids differ).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Rank of SVD-family results (default: the largest component rank).
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// Clamp SVD factors to this quantile of their entries (PEFT's `svd_clamp`).
    #[arg(long)]
    pub svd_clamp: Option<f32>,
    /// peft (PEFT >= 0.19 `add_weighted_adapter`) | lorax (LoRAX's per-side math).
    #[arg(long, default_value = "peft")]
    pub semantics: String,
    /// Hub revision of hub adapters.
    #[arg(long)]
    pub revision: Option<String>,
    /// Tensor dtype of the output: f32 | bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// `base_model_name_or_path` of the output (default: the first adapter's).
    #[arg(long)]
    pub base_model: Option<String>,
    /// Output directory (created; must not exist unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the files of an existing output directory.
    #[arg(long)]
    pub force: bool,
}

/// Errors of `medley merge` (exit code 2 for bad arguments, 1 otherwise).
#[derive(Debug, thiserror::Error)]
pub enum MergeCmdError {
    /// A flag is invalid.
    #[error("{0}")]
    Usage(String),
    /// The merge the flags describe is invalid: the same message as the server's for the same
    /// `merged_adapters`, with the flag that carries the field.
    #[error("{error} ({flag})")]
    Spec {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        error: SpecError,
    },
    /// An adapter could not be found or read.
    #[error("{0}")]
    Adapter(String),
    /// The merge itself failed (e.g. mixed ranks with an equal-rank strategy).
    #[error("merge failed: {0}")]
    Merge(#[from] medley_merge::MergeError),
    /// Writing the output failed.
    #[error("writing {path}: {message}")]
    Write {
        /// Output directory.
        path: PathBuf,
        /// Cause.
        message: String,
    },
}

impl MergeCmdError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) | Self::Spec { .. } => 2,
            _ => 1,
        }
    }
}

/// What a merge did, for the summary line.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// Rank of the output.
    pub rank: usize,
    /// Modules written.
    pub modules: usize,
    /// Bytes of the merged factors.
    pub bytes: usize,
    /// Time spent resolving and reading the adapters.
    pub read: Duration,
    /// Time spent merging.
    pub merge: Duration,
    /// Time spent writing the output.
    pub write: Duration,
}

/// The flag of `medley merge` that carries the field a [`SpecError`] is about.
fn flag_of(e: &SpecError) -> &'static str {
    match e {
        SpecError::UnknownName {
            field: "majority_sign_method",
            ..
        } => "--majority-sign-method",
        SpecError::UnknownName {
            field: "semantics", ..
        } => "--semantics",
        SpecError::UnknownName { .. } => "--strategy",
        SpecError::MissingDensity { .. } | SpecError::DensityRange(_) => "--density",
        SpecError::WeightCount { .. } | SpecError::NonFiniteWeight { .. } => "--weights",
        SpecError::SvdRank => "--svd-rank",
        SpecError::SvdClampRange(_) => "--svd-clamp",
        _ => "--adapters",
    }
}

/// The merge the flags describe, checked by the same rules as a request's `merged_adapters`
/// (`refs` are the adapters, in order). Weights default to 1 each.
fn parse_spec(args: &MergeArgs, refs: &[AdapterRef]) -> Result<MergeSpec, MergeCmdError> {
    let invalid = |error: SpecError| MergeCmdError::Spec {
        flag: flag_of(&error),
        error,
    };
    let semantics: Semantics = args.semantics.parse().map_err(|error| {
        invalid(SpecError::UnknownName {
            field: "semantics",
            error,
        })
    })?;
    let request = MergedAdapters {
        ids: Some(args.adapters.clone()),
        weights: Some(if args.weights.is_empty() {
            vec![1.0; args.adapters.len()]
        } else {
            args.weights.clone()
        }),
        merge_strategy: Some(args.strategy.clone()),
        density: args.density,
        majority_sign_method: Some(args.majority_sign_method.clone()),
        seed: args.seed,
        svd_rank: args.svd_rank.map(|r| u32::try_from(r).unwrap_or(u32::MAX)),
        svd_clamp: args.svd_clamp,
    };
    let limits = MergeLimits {
        max_adapters: usize::MAX,
        semantics,
    };
    let mut refs = refs.iter().cloned();
    let merged = request
        .validate(limits, |_| {
            refs.next()
                .ok_or(SpecError::Incomplete("an adapter has no source"))
        })
        .map_err(invalid)?;
    Ok(merged.merge)
}

/// Where one adapter argument points, and its identity for the default DARE seed: an existing
/// directory is a local adapter, `s3://bucket/prefix` an S3 adapter, anything else must be a
/// hub id.
fn classify(arg: &str, revision: Option<&str>) -> Result<AdapterRef, MergeCmdError> {
    let (source, revision) = if Path::new(arg).is_dir() {
        (AdapterSource::Local, None)
    } else if arg.starts_with(medley_spec::S3_SCHEME) {
        medley_spec::S3Location::parse(arg).map_err(|error| MergeCmdError::Spec {
            flag: "--adapters",
            error,
        })?;
        (AdapterSource::S3, None)
    } else if is_hub_id(arg) {
        (AdapterSource::Hub, revision.map(str::to_string))
    } else {
        return Err(MergeCmdError::Adapter(format!(
            "{arg} is not a directory, not an S3 id (`s3://bucket/prefix`) and not a hub repository id (`name` or `org/name`)"
        )));
    };
    Ok(AdapterRef {
        id: arg.to_string(),
        source,
        revision,
        api_token: None,
    })
}

/// The directory of an adapter (a hub or S3 adapter from its cache, or downloaded).
async fn resolve(r: &AdapterRef, sources: &AdapterSources) -> Result<PathBuf, MergeCmdError> {
    match r.source {
        AdapterSource::Local => Path::new(&r.id)
            .canonicalize()
            .map_err(|e| MergeCmdError::Adapter(format!("{}: {e}", r.id))),
        AdapterSource::Hub => sources
            .resolve_hub(&r.id, r.revision.as_deref(), None)
            .await
            .map(|resolved| resolved.dir)
            .map_err(|e| {
                MergeCmdError::Adapter(format!("{} is not a directory, and as a hub id: {e}", r.id))
            }),
        AdapterSource::S3 => sources
            .resolve_s3(&r.id)
            .await
            .map(|resolved| resolved.dir)
            .map_err(|e| MergeCmdError::Adapter(e.to_string())),
    }
}

/// Runs `medley merge`.
pub async fn run(args: MergeArgs) -> Result<MergeReport, MergeCmdError> {
    let t0 = Instant::now();
    if args.adapters.is_empty() {
        return Err(MergeCmdError::Usage("--adapters is empty".into()));
    }
    let dtype = match args.dtype.to_ascii_lowercase().as_str() {
        "f32" | "float32" => TensorDtype::F32,
        "bf16" | "bfloat16" => TensorDtype::Bf16,
        other => {
            return Err(MergeCmdError::Usage(format!(
                "--dtype {other}: use f32 or bf16"
            )));
        }
    };
    if args.out.exists() && !args.force {
        return Err(MergeCmdError::Usage(format!(
            "{} already exists (pass --force to replace its files)",
            args.out.display()
        )));
    }
    let refs = args
        .adapters
        .iter()
        .map(|a| classify(a, args.revision.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    let spec = parse_spec(&args, &refs)?;
    let sources = AdapterSources::new(&[], HubSettings::from_env(None))
        .map_err(|e| MergeCmdError::Adapter(e.to_string()))?;
    let mut dirs = Vec::with_capacity(refs.len());
    for r in &refs {
        dirs.push(resolve(r, &sources).await?);
    }
    // Read every adapter in parallel (file reads and f32 decoding dominate).
    let adapters: Vec<PeftAdapter> = std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .iter()
            .map(|d| scope.spawn(move || read_adapter_dir(d)))
            .collect();
        handles
            .into_iter()
            .zip(&args.adapters)
            .map(|(h, name)| match h.join() {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(e)) => Err(MergeCmdError::Adapter(format!("{name}: {e}"))),
                Err(_) => Err(MergeCmdError::Adapter(format!("{name}: reader panicked"))),
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    let read = t0.elapsed();
    let t1 = Instant::now();
    let components: Vec<&medley_merge::LoraAdapter> = adapters.iter().map(|a| &a.adapter).collect();
    let merged = medley_merge::merge(&spec, &components)?;
    let merge = t1.elapsed();
    let t2 = Instant::now();
    let configs: Vec<&medley_merge::peft::AdapterConfig> =
        adapters.iter().map(|a| &a.config).collect();
    let target_modules = merged_target_modules(&configs, merged.modules.keys().map(String::as_str));
    let base_model_name_or_path = args.base_model.clone().or_else(|| {
        adapters
            .first()
            .and_then(|a| a.config.base_model_name_or_path.clone())
    });
    write_merged_dir(
        &args.out,
        &merged,
        &WriteOptions {
            target_modules,
            base_model_name_or_path,
            dtype,
        },
    )
    .map_err(|e| MergeCmdError::Write {
        path: args.out.clone(),
        message: e.to_string(),
    })?;
    Ok(MergeReport {
        rank: merged.rank(),
        modules: merged.modules.len(),
        bytes: merged.byte_size(),
        read,
        merge,
        write: t2.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use medley_spec::Strategy;

    use super::*;

    fn adapters_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/adapters")
    }

    fn args(adapters: &[&str], strategy: &str, out: &Path) -> MergeArgs {
        MergeArgs {
            adapters: adapters
                .iter()
                .map(|a| adapters_dir().join(a).display().to_string())
                .collect(),
            weights: vec![],
            strategy: strategy.into(),
            density: None,
            majority_sign_method: "total".into(),
            seed: None,
            svd_rank: None,
            svd_clamp: None,
            semantics: "peft".into(),
            revision: None,
            dtype: "f32".into(),
            base_model: None,
            out: out.to_path_buf(),
            force: false,
        }
    }

    #[test]
    fn s3_ids_are_s3_adapters() {
        let r = classify("s3://bucket/team/sql", Some("v2")).unwrap();
        assert_eq!(
            (r.id.as_str(), r.source, r.revision),
            ("s3://bucket/team/sql", AdapterSource::S3, None)
        );
        let err = classify("s3://Bad_Bucket/x", None).unwrap_err().to_string();
        assert!(
            err.contains("not a valid S3 adapter id") && err.contains("--adapters"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn writes_a_peft_dir_equal_to_the_in_memory_merge() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let mut a = args(&["strong_a_r8", "strong_b_r8_attn"], "TIES", &out);
        a.weights = vec![1.0, -0.5];
        a.density = Some(0.5);
        let report = run(a.clone()).await.unwrap();
        assert_eq!(report.rank, 8);
        let written = read_adapter_dir(&out).unwrap();
        // Same merge in memory: the written factors (scale 1) reproduce B·A exactly.
        let inputs: Vec<PeftAdapter> = ["strong_a_r8", "strong_b_r8_attn"]
            .iter()
            .map(|n| read_adapter_dir(&adapters_dir().join(n)).unwrap())
            .collect();
        let refs: Vec<&medley_merge::LoraAdapter> = inputs.iter().map(|p| &p.adapter).collect();
        let spec = MergeSpec::new(Strategy::Ties, vec![1.0, -0.5]).with_density(0.5);
        let merged = medley_merge::merge(&spec, &refs).unwrap();
        assert_eq!(written.adapter.modules().len(), merged.modules.len());
        for (path, m) in &merged.modules {
            let w = &written.adapter.modules()[path];
            assert_eq!(w.scale(), 1.0, "{path}");
            assert_eq!(w.a().data(), m.a.data(), "{path} A");
            assert_eq!(w.b().data(), m.b.data(), "{path} B");
        }
        // The output exists now: a second run needs --force.
        let err = run(a.clone()).await.unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        a.force = true;
        run(a).await.unwrap();
    }

    #[tokio::test]
    async fn bad_arguments_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        let mut a = args(&["strong_a_r8", "strong_b_r8_attn"], "nope", &out);
        let e = run(a.clone()).await.unwrap_err();
        assert!(e.to_string().contains("--strategy"), "{e}");
        a.strategy = "ties".into();
        let e = run(a.clone()).await.unwrap_err();
        assert!(e.to_string().to_lowercase().contains("density"), "{e}");
        a.density = Some(0.5);
        a.weights = vec![1.0];
        let e = run(a.clone()).await.unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        // Mixed ranks with an equal-rank strategy: the message suggests `cat`.
        let mixed = args(&["strong_a_r8", "a_r4"], "linear", &out);
        let e = run(mixed).await.unwrap_err();
        assert!(e.to_string().contains("cat"), "{e}");
        // Neither a directory nor a valid hub id.
        let mut missing = args(&["strong_a_r8"], "linear", &out);
        missing.adapters = vec!["/definitely/not/here".into()];
        let e = run(missing).await.unwrap_err();
        assert!(e.to_string().contains("/definitely/not/here"), "{e}");
        assert!(!out.exists());
    }
}
