//! Tests of the router's flags: token limits and their defaults from the model, rejected
//! combinations, the prefill budget, the merges file and the adapter flags.

use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    router: RouterArgs,
}

fn args(flags: &[&str]) -> RouterArgs {
    Cli::try_parse_from(std::iter::once("x").chain(flags.iter().copied()))
        .unwrap()
        .router
}

#[test]
fn token_limit_defaults_follow_the_model() {
    let limits = |flags: &[&str], positions| args(flags).token_flags().resolve(positions);
    assert_eq!(limits(&[], None), (1024, 2048));
    assert_eq!(limits(&[], Some(1024)), (1023, 1024));
    assert_eq!(limits(&[], Some(131072)), (1024, 2048));
    let a = &["--max-total-tokens", "4096"];
    assert_eq!(limits(a, Some(1024)), (1024, 4096), "flags win");
    // The config follows the model once the shards report its positions.
    let mut c = args(&[])
        .into_config("m".into(), PathBuf::new(), vec![])
        .unwrap();
    assert_eq!(
        (c.limits.max_input_length, c.limits.max_total_tokens),
        (1024, 2048)
    );
    c.fit_model(512).unwrap();
    assert_eq!(
        (c.limits.max_input_length, c.limits.max_total_tokens),
        (511, 512)
    );
    let mut c = args(&["--max-input-length", "1000"])
        .into_config("m".into(), PathBuf::new(), vec![])
        .unwrap();
    assert!(
        c.fit_model(512).is_err(),
        "1000 prompt tokens cannot fit 512 positions"
    );
}

#[test]
fn inconsistent_flags_are_rejected() {
    let cfg = |flags: &[&str]| args(flags).into_config("m".into(), PathBuf::new(), vec![]);
    assert!(cfg(&[]).is_ok());
    assert!(cfg(&["--max-input-length", "2048"]).is_err());
    assert!(cfg(&["--max-input-length", "0"]).is_err());
    assert!(cfg(&["--max-batch-prefill-tokens", "0"]).is_err());
    assert!(cfg(&["--max-batch-total-tokens", "100"]).is_err());
    assert!(cfg(&["--waiting-served-ratio", "2"]).is_err());
    assert!(cfg(&["--hostname", "not-an-ip"]).is_err());
    let ok = cfg(&["--hostname", "127.0.0.1", "--port", "9"]).unwrap();
    assert_eq!(ok.http_addr.to_string(), "127.0.0.1:9");
    assert!(cfg(&["--max-merge-adapters", "0"]).is_err());
    assert!(cfg(&["--max-active-adapters", "0"]).is_err());
    assert!(cfg(&["--adapter-cycle-time=-1"]).is_err());
    assert!(cfg(&["--adapter-cycle-time", "NaN"]).is_err());
}

#[test]
fn the_prefill_budget_is_per_step_and_may_be_below_the_input_length() {
    let cfg = |flags: &[&str]| args(flags).into_config("m".into(), PathBuf::new(), vec![]);
    let mut c = cfg(&[]).unwrap();
    assert_eq!(
        c.batching.waiting_served_ratio, 0.0,
        "chunks bound a newcomer's cost"
    );
    assert_eq!(c.batching.max_batch_prefill_tokens, 32);
    assert_eq!(c.batching.idle_prefill_tokens(), 512);
    assert!(c.batching.max_batch_prefill_tokens < c.limits.max_input_length);
    c.fit_device("cuda");
    assert_eq!(c.batching.max_batch_prefill_tokens, 2048);
    assert_eq!(
        c.batching.idle_prefill_tokens(),
        2048,
        "never below the busy budget"
    );
    c.fit_device("cpu");
    assert_eq!(c.batching.max_batch_prefill_tokens, 32);
    let c = cfg(&["--max-idle-prefill-tokens", "100"]).unwrap();
    assert_eq!(c.batching.idle_prefill_tokens(), 100);
    let err = cfg(&["--max-idle-prefill-tokens", "0"]).unwrap_err();
    assert!(err.to_string().contains("must be positive"), "{err}");
    let mut c = cfg(&["--max-batch-prefill-tokens", "10"]).expect("prompts are chunked");
    c.fit_device("cuda");
    assert_eq!(c.batching.max_batch_prefill_tokens, 10, "the flag wins");
    c.fit_model(4096).expect("still fits the model");
    let err = cfg(&["--max-batch-prefill-tokens", "0"]).unwrap_err();
    assert!(err.to_string().contains("must be positive"), "{err}");
}

#[test]
fn merges_file_is_loaded_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("merges.yaml");
    std::fs::write(
        &good,
        "- name: both\n  merged_adapters: {ids: [org/a, org/b], weights: [1, 1]}\n",
    )
    .unwrap();
    let path = good.to_str().unwrap();
    let c = args(&["--merges", path])
        .into_config("m".into(), PathBuf::new(), vec![])
        .unwrap();
    assert!(c.merges.get("both").is_some());
    std::fs::write(&good, "- name: x\n  merged_adapters: {ids: []}\n").unwrap();
    let err = args(&["--merges", path])
        .into_config("m".into(), PathBuf::new(), vec![])
        .unwrap_err();
    assert!(err.to_string().contains("merge \"x\""), "{err}");
}

#[test]
fn adapter_flags() {
    let c = args(&[])
        .into_config("m".into(), PathBuf::new(), vec![])
        .unwrap();
    let a = &c.limits.adapters;
    assert_eq!(a.max_merge_adapters, 8);
    assert!(a.adapter_roots.is_empty());
    assert_eq!(a.default_source, AdapterSource::Hub);
    assert_eq!(a.merge_semantics, Semantics::Peft);
    assert_eq!(a.served_model_id, "m");
    assert_eq!(c.batching.max_active_adapters, 128);
    assert_eq!(c.batching.adapter_cycle_time, Duration::from_secs(2));
    let c = args(&[
        "--max-merge-adapters",
        "3",
        "--max-active-adapters",
        "4",
        "--adapter-cycle-time",
        "0.5",
        "--merge-semantics",
        "LoRAX",
        "--adapter-root",
        "/srv/a,/srv/b",
        "--adapter-root",
        "rel",
        "--default-adapter-source",
        "local",
    ])
    .into_config("m".into(), PathBuf::new(), vec![])
    .unwrap();
    let a = &c.limits.adapters;
    assert_eq!(a.max_merge_adapters, 3);
    assert_eq!(a.merge_semantics, Semantics::Lorax);
    assert_eq!(a.default_source, AdapterSource::Local);
    assert_eq!(
        a.adapter_roots[..2],
        [PathBuf::from("/srv/a"), PathBuf::from("/srv/b")]
    );
    assert!(a.adapter_roots[2].is_absolute() && a.adapter_roots[2].ends_with("rel"));
    assert_eq!(c.batching.max_active_adapters, 4);
    assert_eq!(c.batching.adapter_cycle_time, Duration::from_millis(500));
    let bad = Cli::try_parse_from(["x", "--merge-semantics", "mergekit"]);
    assert!(bad.is_err());
    let bad = Cli::try_parse_from(["x", "--default-adapter-source", "gcs"]);
    assert!(bad.is_err());
}
