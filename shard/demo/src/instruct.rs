//! The `instruct` task: one ChatML user turn with an instruction that has exactly one right
//! answer; the assistant's reply is that answer.
//!
//! ```text
//! <|im_start|>user
//! What is 7 plus 5?<|im_end|>
//! <|im_start|>assistant
//! ```
//! → `12`, then `<|im_end|>` (the EOS the trainer appends).
//!
//! Six kinds, two phrasings each: addition (operands 0–10), subtraction (0–20 minus at most 10,
//! never negative), the last word of a list of 3–5, three words sorted alphabetically, a word
//! repeated 2–5 times, the number of words in a list of 2–6. All word-level: no spelling or
//! reversing, which byte-level BPE makes far too hard for a model this small. Lists are
//! comma-separated, and so is a sorted answer.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::vocab::{WORDS, pick, pick_distinct};

/// The ChatML prompt of one user turn, ending where the assistant's reply starts; exactly what the
/// demo tokenizer's chat template renders for `[{"role": "user", "content": instruction}]`.
pub fn chatml_prompt(instruction: &str) -> String {
    format!("<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n")
}

/// The kinds of instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `a + b`.
    Add,
    /// `a - b`.
    Subtract,
    /// The last word of a list.
    LastWord,
    /// Three words in alphabetical order.
    Sort,
    /// One word `n` times.
    Repeat,
    /// The number of words in a list.
    Count,
}

/// Every kind.
pub const KINDS: [Kind; 6] = [
    Kind::Add,
    Kind::Subtract,
    Kind::LastWord,
    Kind::Sort,
    Kind::Repeat,
    Kind::Count,
];

fn list(words: &[&&str]) -> String {
    words.iter().map(|w| **w).collect::<Vec<_>>().join(", ")
}

/// Draws one instruction of `kind` and its answer.
pub fn instruction(rng: &mut ChaCha8Rng, kind: Kind) -> (String, String) {
    let second = rng.random_bool(0.5);
    match kind {
        Kind::Add => {
            let (a, b) = (rng.random_range(0..=10u32), rng.random_range(0..=10u32));
            let q = if second {
                format!("Add {a} and {b}.")
            } else {
                format!("What is {a} plus {b}?")
            };
            (q, (a + b).to_string())
        }
        Kind::Subtract => {
            let a = rng.random_range(0..=20u32);
            let b = rng.random_range(0..=a.min(10));
            let q = if second {
                format!("Subtract {b} from {a}.")
            } else {
                format!("What is {a} minus {b}?")
            };
            (q, (a - b).to_string())
        }
        Kind::LastWord => {
            let n = rng.random_range(3..=5);
            let words = pick_distinct(rng, WORDS, n);
            let q = if second {
                format!("Give the last word of: {}", list(&words))
            } else {
                format!("What is the last word in this list: {}?", list(&words))
            };
            let last = words.last().map(|w| w.to_string()).unwrap_or_default();
            (q, last)
        }
        Kind::Sort => {
            let words = pick_distinct(rng, WORDS, 3);
            let q = if second {
                format!("Put these words in alphabetical order: {}", list(&words))
            } else {
                format!("Sort these words alphabetically: {}", list(&words))
            };
            let mut sorted = words.clone();
            sorted.sort();
            (q, list(&sorted))
        }
        Kind::Repeat => {
            let word = pick(rng, WORDS);
            let n = rng.random_range(2..=5usize);
            let q = if second {
                format!("Say {word} {n} times.")
            } else {
                format!("Repeat the word {word} {n} times.")
            };
            (q, vec![*word; n].join(" "))
        }
        Kind::Count => {
            let n = rng.random_range(2..=6);
            let words = pick_distinct(rng, WORDS, n);
            let q = if second {
                format!("Count the words: {}", list(&words))
            } else {
                format!("How many words are in this list: {}?", list(&words))
            };
            (q, n.to_string())
        }
    }
}

/// How often each kind is drawn for training, relative to the others (held-out sets draw the six
/// kinds evenly, [`sample`]). An adapter trained on an even mix answers every held-out last-word,
/// repeat and count instruction but only a third of the sorts and two thirds of the sums and
/// differences (6000 steps; `bench/results/demo-eval-2026-12-05-s19.md`), so the kinds it
/// cannot yet do get more of the training examples.
pub const TRAIN_WEIGHTS: [(Kind, u32); 6] = [
    (Kind::Add, 2),
    (Kind::Subtract, 2),
    (Kind::LastWord, 1),
    (Kind::Sort, 4),
    (Kind::Repeat, 1),
    (Kind::Count, 1),
];

/// Draws one `(prompt, completion)` pair, each kind equally likely; the completion is the bare
/// answer (the trainer appends `<|im_end|>`).
pub fn sample(rng: &mut ChaCha8Rng) -> (String, String) {
    let kind = *pick(rng, &KINDS);
    let (q, answer) = instruction(rng, kind);
    (chatml_prompt(&q), answer)
}

/// Draws one training pair, the kinds weighted by [`TRAIN_WEIGHTS`].
pub fn sample_train(rng: &mut ChaCha8Rng) -> (String, String) {
    let total: u32 = TRAIN_WEIGHTS.iter().map(|(_, w)| w).sum();
    let mut r = rng.random_range(0..total);
    let mut kind = Kind::Add;
    for (k, w) in TRAIN_WEIGHTS {
        if r < w {
            kind = k;
            break;
        }
        r -= w;
    }
    let (q, answer) = instruction(rng, kind);
    (chatml_prompt(&q), answer)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashSet;

    use rand::SeedableRng;

    use super::*;

    fn number(s: &str) -> Result<i64, String> {
        s.parse().map_err(|_| format!("{s:?} is not a number"))
    }

    fn words(s: &str) -> Vec<&str> {
        s.split(", ").collect()
    }

    /// Recomputes the answer of an instruction independently of the generator.
    pub(crate) fn solve(instruction: &str) -> Option<String> {
        let after = |p: &str| instruction.strip_prefix(p);
        let two = |s: &str, sep: &str, end: &str| -> Option<(i64, i64)> {
            let (a, b) = s.strip_suffix(end)?.split_once(sep)?;
            Some((number(a).ok()?, number(b).ok()?))
        };
        if let Some(rest) = after("What is the last word in this list: ") {
            return words(rest.strip_suffix('?')?).last().map(|w| w.to_string());
        }
        if let Some(rest) = after("Give the last word of: ") {
            return words(rest).last().map(|w| w.to_string());
        }
        if let Some(rest) = after("What is ") {
            if let Some((a, b)) = two(rest, " plus ", "?") {
                return Some((a + b).to_string());
            }
            let (a, b) = two(rest, " minus ", "?")?;
            return Some((a - b).to_string());
        }
        if let Some(rest) = after("Add ") {
            let (a, b) = two(rest, " and ", ".")?;
            return Some((a + b).to_string());
        }
        if let Some(rest) = after("Subtract ") {
            let (b, a) = two(rest, " from ", ".")?;
            return Some((a - b).to_string());
        }
        let sorted = |rest: &str| {
            let mut w = words(rest);
            w.sort();
            w.join(", ")
        };
        if let Some(rest) = after("Sort these words alphabetically: ") {
            return Some(sorted(rest));
        }
        if let Some(rest) = after("Put these words in alphabetical order: ") {
            return Some(sorted(rest));
        }
        let repeat = |rest: &str| -> Option<String> {
            let (word, n) = rest.strip_suffix(" times.")?.split_once(' ')?;
            let n = usize::try_from(number(n).ok()?).ok()?;
            Some(vec![word; n].join(" "))
        };
        if let Some(rest) = after("Repeat the word ") {
            return repeat(rest);
        }
        if let Some(rest) = after("Say ") {
            return repeat(rest);
        }
        if let Some(rest) = after("How many words are in this list: ") {
            return Some(words(rest.strip_suffix('?')?).len().to_string());
        }
        if let Some(rest) = after("Count the words: ") {
            return Some(words(rest).len().to_string());
        }
        None
    }

    /// Checks one example: ChatML framing, and the answer recomputed from the instruction.
    pub(crate) fn check(prompt: &str, completion: &str) -> Result<(), String> {
        let instruction = prompt
            .strip_prefix("<|im_start|>user\n")
            .and_then(|s| s.strip_suffix("<|im_end|>\n<|im_start|>assistant\n"))
            .ok_or("not a ChatML user turn")?;
        let want = solve(instruction).ok_or("unknown instruction")?;
        if completion != want {
            return Err(format!("want {want:?}"));
        }
        Ok(())
    }

    #[test]
    fn answers_are_right_and_small() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut kinds = HashSet::new();
        for _ in 0..5000 {
            let (p, c) = sample(&mut rng);
            check(&p, &c).unwrap_or_else(|e| panic!("{e}: {p:?} -> {c:?}"));
            if let Ok(n) = c.parse::<i64>() {
                assert!((0..=20).contains(&n), "{p:?} -> {c}");
            }
            kinds.insert(p.split_whitespace().nth(1).map(str::to_string));
        }
        assert!(kinds.len() >= 10, "{kinds:?}");
        for kind in KINDS {
            let (q, a) = instruction(&mut rng, kind);
            assert_eq!(solve(&q).as_deref(), Some(a.as_str()), "{kind:?}");
        }
        assert_eq!(solve("Spell the word moon."), None);
    }

    #[test]
    fn training_draws_follow_the_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 11_000;
        let sorts = (0..n)
            .map(|_| sample_train(&mut rng))
            .filter(|(p, c)| {
                check(p, c).unwrap_or_else(|e| panic!("{e}: {p:?}"));
                p.contains("alphabetical")
            })
            .count();
        // Sort has weight 4 of 11: 4000 expected, a standard deviation of about 50.
        assert_eq!(TRAIN_WEIGHTS.iter().map(|(_, w)| w).sum::<u32>(), 11);
        assert_eq!(TRAIN_WEIGHTS[3], (Kind::Sort, 4));
        assert!((3700..4300).contains(&sorts), "{sorts}");
    }

    #[test]
    fn known_answers() {
        assert_eq!(solve("What is 7 plus 5?").unwrap(), "12");
        assert_eq!(solve("Subtract 3 from 10.").unwrap(), "7");
        assert_eq!(
            solve("Sort these words alphabetically: tiger, apple, moon").unwrap(),
            "apple, moon, tiger"
        );
        assert_eq!(solve("Say moon 3 times.").unwrap(), "moon moon moon");
        assert_eq!(solve("Count the words: a, b, c, d").unwrap(), "4");
    }
}
