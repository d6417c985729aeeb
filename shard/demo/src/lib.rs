//! The demo's data: seeded generators of the three demo tasks (SQL, ads, ChatML instructions),
//! the base model's corpus, the demo tokenizer and the held-out task sets.
//!
//! Medley's trained demo is a small Llama-family base model plus three LoRA adapters, one per
//! task; a merge of the three solves all three. This crate makes everything they are trained and
//! evaluated on, deterministically from a seed:
//!
//! * [`generate`]: examples of one [`Task`] and [`Split`]. Each task has its own prompt format
//!   (`Schema: …\nQuestion: …\nSQL:`, `Product: …\nTone: …\nAd:`, a ChatML user turn), so a
//!   merged model can tell them apart from the prompt alone. A completion stops where generation
//!   should: the trainer appends the EOS token [`tokenizer::EOS_TOKEN`] (`<|im_end|>`) to it.
//!   Held-out and train prompts never overlap ([`split`]).
//! * [`base_corpus`]: text for pre-training the base over the same vocabulary, without the
//!   tasks' prompt → answer mappings.
//! * [`tokenizer()`]: the demo's byte-level BPE tokenizer ([`mod@tokenizer`] has its files, ids and
//!   chat template).
//! * [`heldout`]: the held-out sets in `medley eval`'s JSONL form, committed under
//!   `tests/fixtures/demo/tasks/`.

pub mod ad;
pub mod corpus;
pub mod heldout;
pub mod instruct;
pub mod recall;
pub mod split;
pub mod sql;
pub mod tokenizer;
pub mod vocab;

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use corpus::base_corpus;
pub use split::split_of;
pub use tokenizer::tokenizer;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Filesystem failure.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// JSON encoding or decoding failure.
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),
    /// Tokenizer training, encoding or saving failure.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A task id that is not `sql`, `ad` or `instruct`.
    #[error("unknown task {0:?} (expected sql, ad or instruct)")]
    UnknownTask(String),
}

impl From<medley_shard::fixture::FixtureError> for DemoError {
    fn from(e: medley_shard::fixture::FixtureError) -> Self {
        Self::Tokenizer(e.to_string())
    }
}

/// One of the demo's three tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// Question → SQL over a schema stated in the prompt ([`sql`]).
    Sql,
    /// Product + tone → a one-line ad ([`ad`]).
    Ad,
    /// ChatML instruction → exact answer ([`instruct`]).
    Instruct,
}

impl Task {
    /// All three, in a fixed order.
    pub const ALL: [Task; 3] = [Task::Sql, Task::Ad, Task::Instruct];

    /// `sql`, `ad` or `instruct`.
    pub fn id(self) -> &'static str {
        match self {
            Self::Sql => "sql",
            Self::Ad => "ad",
            Self::Instruct => "instruct",
        }
    }

    fn index(self) -> u64 {
        match self {
            Self::Sql => 0,
            Self::Ad => 1,
            Self::Instruct => 2,
        }
    }

    /// Draws one `(prompt, completion)` pair of this task for `split`; only `instruct` draws its
    /// training examples from another mix of kinds ([`instruct::TRAIN_WEIGHTS`]).
    fn sample(self, rng: &mut ChaCha8Rng, split: Split) -> (String, String) {
        match (self, split) {
            (Self::Sql, _) => sql::sample(rng),
            (Self::Ad, _) => ad::sample(rng),
            (Self::Instruct, Split::Train) => instruct::sample_train(rng),
            (Self::Instruct, Split::Heldout) => instruct::sample(rng),
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

impl FromStr for Task {
    type Err = DemoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.id() == s)
            .ok_or_else(|| DemoError::UnknownTask(s.to_string()))
    }
}

/// Training or held-out data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Examples to train on (prompts may repeat).
    Train,
    /// Examples to evaluate on (distinct prompts, none ever in a training set).
    Heldout,
}

impl Split {
    fn index(self) -> u64 {
        match self {
            Self::Train => 0,
            Self::Heldout => 1,
        }
    }
}

/// One task example.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Example {
    /// The task it belongs to.
    pub task: Task,
    /// The text the model is given.
    pub prompt: String,
    /// The text it should generate, without the EOS token (which the trainer appends).
    pub completion: String,
}

/// `n` examples of `task` in `split`, the same for the same `seed` (a ChaCha8 stream per task and
/// split; `generate(.., n)` is a prefix of `generate(.., n + k)`).
///
/// Held-out prompts are distinct; if the held-out prompt space ran out (it is far larger than
/// the sets used), fewer than `n` come back, with a warning.
pub fn generate(task: Task, split: Split, seed: u64, n: usize) -> Vec<Example> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(task.index() * 2 + split.index());
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    let max_draws = n.saturating_mul(1000).saturating_add(10_000);
    for _ in 0..max_draws {
        if out.len() == n {
            break;
        }
        let (prompt, completion) = task.sample(&mut rng, split);
        if split_of(&prompt) != split {
            continue;
        }
        if split == Split::Heldout && !seen.insert(prompt.clone()) {
            continue;
        }
        out.push(Example {
            task,
            prompt,
            completion,
        });
    }
    if out.len() < n {
        tracing::warn!(
            task = task.id(),
            wanted = n,
            got = out.len(),
            "held-out prompt space exhausted"
        );
    }
    out
}

#[cfg(test)]
mod tests;
