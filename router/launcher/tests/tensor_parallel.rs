//! `medley serve --num-shard N` with a model that cannot be split over N ranks stops at start-up
//! with a message naming the reason and the flag (exit code 4: the shards could not start).

mod common;

#[test]
fn indivisible_heads_are_refused_at_startup() {
    // The embedded tiny model has 4 attention heads.
    let (status, output) = common::serve_until_exit(&["--num-shard", "3"]);
    assert_eq!(status.code(), Some(4), "{output}");
    let message = "4 attention heads do not divide by 3, so the model cannot be split over 3 \
                   tensor-parallel shards; choose a --num-shard that divides it";
    assert!(
        output.contains(message),
        "expected {message:?} in:\n{output}"
    );
}
