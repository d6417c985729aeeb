//! A pool of blocking tokenizer workers: tokenization is CPU-bound, so it runs on dedicated
//! threads instead of the async runtime. Jobs go through one shared queue (an idle worker takes
//! the next job) and answers come back on a oneshot channel. The threads exit when the pool is
//! dropped.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokenizers::Tokenizer;
use tokio::sync::oneshot;

use crate::error::ValidationError;

/// The token ids of a text and the byte span each token covers in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, special tokens included when asked.
    pub ids: Vec<u32>,
    /// Byte range `[start, stop)` of each token in the input (`(0, 0)` for added special tokens).
    pub offsets: Vec<(usize, usize)>,
}

/// One token of `/tokenize`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenSpan {
    /// Token id.
    pub id: u32,
    /// The part of the input the token covers (empty for added special tokens).
    pub text: String,
    /// Byte offset where the token starts.
    pub start: usize,
    /// Byte offset where the token ends (exclusive).
    pub stop: usize,
}

impl Encoded {
    /// Pairs each token with the text it covers in `input`.
    pub fn spans(&self, input: &str) -> Vec<TokenSpan> {
        self.ids
            .iter()
            .zip(&self.offsets)
            .map(|(&id, &(start, stop))| TokenSpan {
                id,
                text: slice_lossy(input, start, stop),
                start,
                stop,
            })
            .collect()
    }
}

/// `input[start..stop]`, tolerating offsets that are out of range or not on a char boundary
/// (byte-level tokenizers can split a multi-byte character).
fn slice_lossy(input: &str, start: usize, stop: usize) -> String {
    if let Some(s) = input.get(start..stop) {
        return s.to_string();
    }
    let bytes = input.as_bytes();
    let stop = stop.min(bytes.len());
    let start = start.min(stop);
    bytes
        .get(start..stop)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

struct Job {
    inputs: String,
    add_special_tokens: bool,
    reply: oneshot::Sender<Result<Encoded, String>>,
}

/// Handle to the worker threads.
pub(crate) struct TokenizerPool {
    jobs: mpsc::Sender<Job>,
}

impl TokenizerPool {
    /// Starts `workers` threads sharing `tokenizer`.
    pub(crate) fn new(tokenizer: Tokenizer, workers: usize) -> std::io::Result<Self> {
        let tokenizer = Arc::new(tokenizer);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..workers.max(1) {
            let tokenizer = Arc::clone(&tokenizer);
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("medley-tokenizer-{i}"))
                .spawn(move || worker(&tokenizer, &queue))?;
        }
        Ok(Self { jobs })
    }

    /// Tokenizes `inputs` on a worker.
    pub(crate) async fn encode(
        &self,
        inputs: String,
        add_special_tokens: bool,
    ) -> Result<Encoded, ValidationError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                inputs,
                add_special_tokens,
                reply,
            })
            .map_err(|_| ValidationError::Tokenizer("tokenizer workers stopped".into()))?;
        answer
            .await
            .map_err(|_| ValidationError::Tokenizer("tokenizer worker stopped".into()))?
            .map_err(ValidationError::Tokenizer)
    }
}

fn worker(tokenizer: &Tokenizer, queue: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        // Hold the lock only while waiting for the next job, not while tokenizing.
        let job = {
            let Ok(queue) = queue.lock() else { return };
            match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let result = tokenizer
            .encode(job.inputs.as_str(), job.add_special_tokens)
            .map(|e| Encoded {
                ids: e.get_ids().to_vec(),
                offsets: e.get_offsets().to_vec(),
            })
            .map_err(|e| e.to_string());
        // The requester may have gone away (client disconnected); nothing to do then.
        let _ = job.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::testing::word_tokenizer;

    #[tokio::test]
    async fn encodes_on_workers_with_offsets() {
        let pool = TokenizerPool::new(word_tokenizer(), 2).unwrap();
        let e = pool.encode("hello world".into(), false).await.unwrap();
        assert_eq!(e.offsets, vec![(0, 5), (6, 11)]);
        let spans = e.spans("hello world");
        assert_eq!(spans[1].text, "world");
        assert_eq!(spans[1].id, e.ids[1]);
        // Many concurrent jobs all get answered.
        let jobs = (0..16).map(|i| pool.encode(format!("w{i} hello"), true));
        for r in futures::future::join_all(jobs).await {
            assert_eq!(r.unwrap().ids.len(), 3, "BOS + two words");
        }
    }

    #[test]
    fn slice_lossy_never_panics() {
        assert_eq!(slice_lossy("héllo", 0, 2), "h\u{fffd}");
        assert_eq!(slice_lossy("abc", 2, 99), "c");
        assert_eq!(slice_lossy("abc", 5, 9), "");
        assert_eq!(slice_lossy("abc", 0, 0), "");
    }
}
