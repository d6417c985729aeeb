#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::PathBuf;

use super::*;
use crate::heldout::{HeldoutOptions, file_name, heldout_jsonl, read_records, write_heldout};

fn check(ex: &Example) -> Result<(), String> {
    match ex.task {
        Task::Sql => sql::tests::check(&ex.prompt, &ex.completion),
        Task::Ad => ad::tests::check(&ex.prompt, &ex.completion),
        Task::Instruct => instruct::tests::check(&ex.prompt, &ex.completion),
    }
}

fn committed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/demo/tasks")
}

#[test]
fn generation_is_deterministic_per_seed_and_prefix_stable() {
    for task in Task::ALL {
        for split in [Split::Train, Split::Heldout] {
            let a = generate(task, split, 11, 200);
            assert_eq!(a.len(), 200);
            assert_eq!(a, generate(task, split, 11, 200));
            assert_ne!(a, generate(task, split, 12, 200));
            assert_eq!(a[..50], generate(task, split, 11, 50)[..]);
            assert!(a.iter().all(|e| e.task == task));
        }
    }
}

#[test]
fn heldout_never_shares_a_prompt_with_train() {
    for task in Task::ALL {
        let train: HashSet<String> = (0..4)
            .flat_map(|seed| generate(task, Split::Train, seed, 5000))
            .map(|e| e.prompt)
            .collect();
        for seed in [0, 1, 99] {
            let held = generate(task, Split::Heldout, seed, 300);
            let prompts: HashSet<&str> = held.iter().map(|e| e.prompt.as_str()).collect();
            assert_eq!(prompts.len(), held.len(), "{task}: held-out prompts repeat");
            for e in &held {
                assert!(
                    !train.contains(&e.prompt),
                    "{task}: {:?} in train",
                    e.prompt
                );
                assert_eq!(split_of(&e.prompt), Split::Heldout);
            }
        }
        assert!(train.iter().all(|p| split_of(p) == Split::Train));
    }
}

#[test]
fn answers_are_correct_by_construction() {
    for task in Task::ALL {
        for split in [Split::Train, Split::Heldout] {
            for ex in generate(task, split, 4, 1000) {
                check(&ex).unwrap_or_else(|e| panic!("{e}: {ex:?}"));
                assert!(!ex.completion.contains('\n'), "{ex:?}");
                assert!(!ex.completion.contains("<|"), "{ex:?}");
            }
        }
    }
}

#[test]
fn prompt_formats_tell_the_tasks_apart() {
    let starts = [
        (Task::Sql, "Schema: "),
        (Task::Ad, "Product: "),
        (Task::Instruct, "<|im_start|>user\n"),
    ];
    for (task, start) in starts {
        for ex in generate(task, Split::Train, 2, 500) {
            assert!(ex.prompt.starts_with(start));
            for (other, other_start) in starts {
                assert_eq!(ex.prompt.starts_with(other_start), task == other);
            }
        }
    }
}

#[test]
fn task_ids_parse() {
    for task in Task::ALL {
        assert_eq!(task.id().parse::<Task>().unwrap(), task);
        assert_eq!(task.to_string(), task.id());
    }
    assert!(matches!(
        "poetry".parse::<Task>(),
        Err(DemoError::UnknownTask(_))
    ));
}

#[test]
fn heldout_files_are_written_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let options = HeldoutOptions { seed: 5, n: 20 };
    let paths = write_heldout(dir.path(), &options).unwrap();
    assert_eq!(paths.len(), 3);
    for (task, path) in Task::ALL.into_iter().zip(paths) {
        let records = read_records(&path).unwrap();
        assert_eq!(records.len(), 20);
        for r in &records {
            assert_eq!(r.score, "exact");
            assert_eq!(r.expected, r.expected.trim());
        }
        let examples = generate(task, Split::Heldout, 5, 20);
        for (r, e) in records.iter().zip(examples) {
            assert_eq!(
                (r.prompt.as_str(), r.expected.as_str()),
                (e.prompt.as_str(), e.completion.trim())
            );
        }
    }
}

/// The committed held-out sets are what the generator writes today. Regenerate with
/// `cargo run -p medley-demo --bin medley-demo-data -- tasks --out tests/fixtures/demo/tasks --seed 0`.
#[test]
fn committed_heldout_sets_are_up_to_date() {
    for task in Task::ALL {
        let path = committed().join(file_name(task));
        let on_disk =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let fresh = heldout_jsonl(task, &HeldoutOptions::default()).unwrap();
        assert!(
            on_disk == fresh,
            "{} is stale: regenerate it",
            path.display()
        );
        let records = read_records(&path).unwrap();
        assert_eq!(records.len(), heldout::HELDOUT_N);
    }
}
