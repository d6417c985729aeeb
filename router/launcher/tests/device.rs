//! `medley serve --device cuda` where no GPU can be used fails at start-up with a clear error:
//! never a panic, never a hang. A CPU build says it was built without CUDA (exit code 2, before
//! the model is even resolved); a CUDA build on a machine without a usable GPU reports the shard's
//! "cannot open CUDA device" error (exit code 4). CI runs the CUDA build's variant against the
//! libcuda stub of scripts/cuda/env.sh with `MEDLEY_EXPECT_NO_GPU=1`; without that variable a CUDA
//! build skips it, since the machine may have a GPU and the server would then start.

mod common;

#[test]
fn cuda_without_a_usable_gpu_is_a_clear_startup_error() {
    if cfg!(feature = "cuda") && std::env::var_os("MEDLEY_EXPECT_NO_GPU").is_none() {
        eprintln!("skipped: a CUDA build may find a GPU here (set MEDLEY_EXPECT_NO_GPU=1)");
        return;
    }
    let (status, output) = common::serve_until_exit(&["--device", "cuda"]);
    let (code, message) = if cfg!(feature = "cuda") {
        (
            4,
            "cannot open CUDA device 0 (rank 0): no CUDA-capable GPU is visible",
        )
    } else {
        (2, "built without CUDA support")
    };
    assert_eq!(status.code(), Some(code), "{output}");
    assert!(
        output.contains(message),
        "expected {message:?} in:\n{output}"
    );
}

/// `--tp-comm nccl` where NCCL cannot run is refused before anything starts (exit code 2): a
/// CPU device in any build, two ranks on one GPU in a CUDA build, and anything in a CPU build.
#[test]
fn nccl_where_it_cannot_run_is_refused_at_startup() {
    let mut cases = vec![(
        vec!["--tp-comm", "nccl", "--num-shard", "2"],
        if cfg!(feature = "cuda") {
            "needs --device cuda"
        } else {
            "built with the `cuda` feature"
        },
    )];
    if cfg!(feature = "cuda") {
        cases.push((
            vec![
                "--tp-comm",
                "nccl",
                "--num-shard",
                "2",
                "--device",
                "cuda:0:shared",
            ],
            "NCCL refuses two ranks on the same device",
        ));
    }
    for (args, message) in cases {
        let (status, output) = common::serve_until_exit(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {output}");
        assert!(
            output.contains(message),
            "{args:?}: expected {message:?} in:\n{output}"
        );
    }
}
