//! The demo pipeline end to end at the smoke size: it writes a base Medley loads (model,
//! tokenizer files) and three PEFT adapters `medley_merge::peft` reads; its losses fall, and a
//! second run with the same seed writes the same bytes.

#![allow(clippy::unwrap_used)]

use medley_merge::peft::read_adapter_dir;
use medley_shard::model::{LlamaModel, LoadOptions};
use medley_train::demo::{DemoConfig, run_demo};

#[test]
fn smoke_demo_writes_what_medley_loads() {
    let dir = tempfile::tempdir().unwrap();
    // Smaller still than the smoke preset: this checks the plumbing, not the learning.
    let mut cfg = DemoConfig::smoke(3);
    cfg.tokenizer_docs = 300;
    cfg.tokenizer_examples = 50;
    cfg.corpus_docs = 300;
    cfg.examples_per_task = 40;
    cfg.pretrain.steps = 4;
    cfg.pretrain.batch_size = 4;
    cfg.lora_train.steps = 2;
    cfg.lora_train.batch_size = 4;
    cfg.task_steps.set(medley_demo::Task::Instruct, 3);
    cfg.merge_tune.as_mut().unwrap().steps = 2;
    if let Some(a) = cfg.anchors.as_mut() {
        a.anchor.batch_size = 2;
        a.corpus_windows = 20;
        a.other_task_examples = 10;
    }
    cfg.eval_examples = 1;
    let summary = run_demo(dir.path(), &cfg).unwrap();
    let pretrain = summary.pretrain.as_ref().unwrap();
    assert!(pretrain.final_loss < pretrain.first_loss, "{pretrain:?}");
    let base = dir.path().join("base");
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(base.join(f).is_file(), "missing {f}");
    }
    let model = LlamaModel::load(&base, &LoadOptions::default()).unwrap();
    assert_eq!(model.config().vocab_size, summary.vocab_size);
    assert_eq!(
        model.config().eos_token_ids,
        vec![medley_demo::tokenizer::EOS_ID]
    );
    // The preset gives `instruct` a larger rank than the others; their merge-tuning and `cat`
    // merge take adapters of mixed ranks.
    let instruct_rank = cfg.task_lora.instruct.as_ref().unwrap().rank;
    assert_ne!(instruct_rank, cfg.lora.rank);
    for task in ["sql", "ad", "instruct"] {
        let peft = read_adapter_dir(&dir.path().join("adapters").join(task)).unwrap();
        let want = if task == "instruct" {
            instruct_rank
        } else {
            cfg.lora.rank
        };
        assert_eq!(peft.config.r, want, "{task}");
        assert_eq!(peft.adapter.modules().len(), 7 * cfg.dims.layers);
    }
    assert_eq!(summary.adapters.len(), 3);
    for a in &summary.adapters {
        let single = a.single.as_ref().unwrap();
        let want = if a.task == "instruct" { 3 } else { 2 };
        assert_eq!(single.steps, want, "{}", a.task);
        assert!(single.final_merged_loss.is_none());
        let tune = a.merge_tune.as_ref().unwrap();
        assert_eq!(tune.steps, 2);
        assert!(tune.final_merged_loss.unwrap().is_finite());
    }
    assert_eq!(summary.scores.len(), 3);
    assert!(dir.path().join("summary.json").is_file());

    // Reproducible from the seed: the same files, byte for byte (the base, its tokenizer and
    // every adapter; the summary's timings differ).
    let again = tempfile::tempdir().unwrap();
    run_demo(again.path(), &cfg).unwrap();
    let mut files = Vec::new();
    let alone = [
        "adapters-alone/sql",
        "adapters-alone/ad",
        "adapters-alone/instruct",
    ];
    for sub in ["base", "adapters/sql", "adapters/ad", "adapters/instruct"]
        .into_iter()
        .chain(alone)
    {
        for entry in std::fs::read_dir(dir.path().join(sub)).unwrap() {
            files.push(entry.unwrap().path());
        }
    }
    assert!(files.len() > 11, "{files:?}");
    // The adapters as trained alone are kept beside the merge-tuned ones, and differ from them.
    for task in ["sql", "ad", "instruct"] {
        let file = |d: &str| {
            std::fs::read(
                dir.path()
                    .join(d)
                    .join(task)
                    .join("adapter_model.safetensors"),
            )
            .unwrap()
        };
        assert!(file("adapters-alone") != file("adapters"), "{task}");
    }
    for f in files {
        let rel = f.strip_prefix(dir.path()).unwrap();
        let other = std::fs::read(again.path().join(rel)).unwrap();
        assert!(
            std::fs::read(&f).unwrap() == other,
            "{} differs",
            rel.display()
        );
    }
}
