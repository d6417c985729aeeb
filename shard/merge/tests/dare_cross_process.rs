//! DARE merges are identical across processes (and thread counts) for the same seed: runs the
//! `medley-merge-dev` binary twice with different `RAYON_NUM_THREADS` and compares the output
//! hashes with each other and with an in-process merge.

use std::path::Path;
use std::process::Command;

use medley_merge::fixture::{AdapterFixture, LlamaShape};
use medley_merge::peft::read_adapter_dir;
use medley_merge::{MergeSpec, Strategy, merge};

fn run(dirs: &[&Path], seed: u64, threads: &str) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medley-merge-dev"));
    cmd.env("RAYON_NUM_THREADS", threads).args([
        "merge",
        "--weights",
        "1.0,-0.5",
        "--strategy",
        "dare_ties",
        "--density",
        "0.3",
        "--seed",
        &seed.to_string(),
    ]);
    for d in dirs {
        cmd.arg("--adapter").arg(d);
    }
    let out = cmd.output().expect("run medley-merge-dev");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
    json["output_hash"]
        .as_str()
        .expect("output_hash")
        .to_string()
}

#[test]
fn same_seed_same_merge_in_every_process() {
    let tmp = tempfile::tempdir().unwrap();
    let shapes = LlamaShape::tiny().module_shapes();
    let dirs: Vec<_> = (0..2u64)
        .map(|i| {
            let d = tmp.path().join(format!("a{i}"));
            AdapterFixture::new(4, 40 + i).write(&d, &shapes).unwrap();
            d
        })
        .collect();
    let refs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
    let first = run(&refs, 7, "1");
    let second = run(&refs, 7, "2");
    assert_eq!(
        first, second,
        "same seed, different process and thread count"
    );
    assert_ne!(first, run(&refs, 8, "2"), "another seed gives other masks");

    let adapters: Vec<_> = dirs
        .iter()
        .map(|d| read_adapter_dir(d).unwrap().adapter)
        .collect();
    let comps: Vec<_> = adapters.iter().collect();
    let spec = MergeSpec::new(Strategy::DareTies, vec![1.0, -0.5])
        .with_density(0.3)
        .with_seed(7);
    let here = merge(&spec, &comps).unwrap();
    assert_eq!(
        hex::encode(here.content_hash()),
        first,
        "in-process merge matches"
    );
}
