//! Test helpers: a word-level tokenizer, small limits, a deterministic fake [`Backend`] and a
//! loopback server started on it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokenizers::Tokenizer;
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::{AdapterSource, AdapterSpec};
use super::{
    FinishReason, GeneratedText, Infer, InferStreamResponse, PrefillToken, Token,
    ValidGenerateRequest,
};
use crate::backend::{Backend, BackendInfo};
use crate::config::{AdapterPolicy, BatchingConfig, Limits, RouterConfig, TokenFlags};
use crate::error::InferError;
use crate::server::{Server, ServerError};
use crate::validation::Validation;

/// Words of the test vocabulary after the three special tokens (`<unk>`=0, `<s>`=1, `</s>`=2).
fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = ["hello", "world", "Write", "an", "essay", "about"]
        .iter()
        .map(|w| w.to_string())
        .collect();
    words.extend((0..50).map(|i| format!("w{i}")));
    words
}

/// A WordLevel tokenizer (whitespace pre-tokenizer, unknown words → `<unk>` = 0) that adds a
/// BOS `<s>` = 1 when special tokens are requested.
pub(crate) fn word_tokenizer() -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["<unk>", "<s>", "</s>"]
        .into_iter()
        .map(String::from)
        .chain(vocabulary())
        .enumerate()
    {
        vocab.insert(w, serde_json::json!(i));
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    Tokenizer::from_str(&json.to_string()).expect("valid test tokenizer")
}

/// Small limits: input 32, total 64, default new tokens 16, 4 stop sequences, 5 alternatives,
/// 8 concurrent requests; merges of at most 3 adapters, local adapters under
/// [`TEST_ADAPTER_ROOT`], PEFT semantics, served model `test/tiny-model`.
pub(crate) fn test_limits() -> Limits {
    Limits {
        max_concurrent_requests: 8,
        max_input_length: 32,
        max_total_tokens: 64,
        max_stop_sequences: 4,
        max_top_n_tokens: 5,
        default_max_new_tokens: 16,
        validation_workers: 2,
        adapters: AdapterPolicy {
            max_merge_adapters: 3,
            adapter_roots: vec![PathBuf::from(TEST_ADAPTER_ROOT)],
            default_source: AdapterSource::Hub,
            merge_semantics: medley_spec::Semantics::Peft,
            served_model_id: TEST_MODEL_ID.into(),
        },
    }
}

/// The `--adapter-root` of [`test_limits`] (never read: validation checks paths lexically).
pub(crate) const TEST_ADAPTER_ROOT: &str = "/srv/medley-test-adapters";
/// The model id of test servers.
pub(crate) const TEST_MODEL_ID: &str = "test/tiny-model";

/// An [`Infer`] over `backend` with [`test_limits`] but only 2 concurrent requests.
pub(crate) fn test_infer(backend: FakeBackend) -> Infer {
    let limits = Limits {
        max_concurrent_requests: 2,
        ..test_limits()
    };
    let validation = Validation::new(word_tokenizer(), limits).expect("tokenizer workers");
    Infer::new(Arc::new(backend), validation)
}

/// How the fake backend answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behavior {
    /// Streams `max_new_tokens` tokens (fewer if a stop sequence appears), then `End`.
    Normal,
    /// Sends a generation error instead of token number `n` (0-based).
    FailAfter(u32),
    /// Closes the channel instead of sending the last token.
    CloseWithoutEnd,
    /// `schedule` itself fails with `Unavailable`.
    RejectSchedule,
    /// Like `Normal`, but never reports the seed in the final text.
    OmitSeed,
    /// Like `Normal` for the base model; a request for any adapter or merge fails with
    /// [`InferError::AdapterNotFound`] as its first event, as the real backend answers a
    /// shard's NOT_FOUND.
    AdaptersNotFound,
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<ValidGenerateRequest>>,
    cancelled: AtomicUsize,
    /// For each cancelled request, how many tokens it had sent.
    sent_before_cancel: Mutex<Vec<u32>>,
    cancel_notify: Notify,
    unhealthy: AtomicBool,
}

/// A deterministic backend: generated token `i` of a request is input token
/// `input_ids[i % len]`, with text `" t<id>"`. Records every scheduled request and counts the
/// requests whose receiver was dropped before they finished.
#[derive(Clone)]
pub(crate) struct FakeBackend {
    delay: Duration,
    behavior: Behavior,
    /// Prompt tokens reported as taken from the prefix cache (capped by the prompt).
    cached_tokens: Option<u32>,
    shared: Arc<Shared>,
}

impl FakeBackend {
    /// A healthy, instant backend.
    pub(crate) fn new() -> Self {
        Self {
            delay: Duration::ZERO,
            behavior: Behavior::Normal,
            cached_tokens: None,
            shared: Arc::default(),
        }
    }

    /// Waits `delay` before each token.
    pub(crate) fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Answers with `behavior`.
    pub(crate) fn with_behavior(mut self, behavior: Behavior) -> Self {
        self.behavior = behavior;
        self
    }

    /// Reports `n` prompt tokens (at most the prompt) as taken from the prefix cache.
    pub(crate) fn with_cached_tokens(mut self, n: u32) -> Self {
        self.cached_tokens = Some(n);
        self
    }

    /// Sets what `health()` reports.
    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.shared.unhealthy.store(!healthy, Ordering::SeqCst);
    }

    /// Every request scheduled so far.
    pub(crate) fn requests(&self) -> Vec<ValidGenerateRequest> {
        self.shared.requests.lock().expect("lock").clone()
    }

    /// Waits (at most 10 s, then panics) until `n` requests saw their receiver dropped.
    pub(crate) async fn wait_cancelled(&self, n: usize) {
        let wait = async {
            loop {
                let notified = self.shared.cancel_notify.notified();
                if self.shared.cancelled.load(Ordering::SeqCst) >= n {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the backend never saw the request's receiver dropped");
    }

    /// Number of requests whose receiver was dropped early.
    pub(crate) fn cancelled(&self) -> usize {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// The token generated at step `i` for a prompt.
    pub(crate) fn token(input_ids: &[u32], i: u32) -> Token {
        let id = input_ids
            .get(i as usize % input_ids.len().max(1))
            .copied()
            .unwrap_or(0);
        Token {
            id,
            text: format!(" t{id}"),
            logprob: -0.5,
            special: false,
        }
    }

    /// The text of the first `n` generated tokens.
    pub(crate) fn expected_text(input_ids: &[u32], n: u32) -> String {
        (0..n).map(|i| Self::token(input_ids, i).text).collect()
    }

    /// For each cancelled request (in order), how many tokens it had sent before it noticed.
    pub(crate) fn sent_before_cancel(&self) -> Vec<u32> {
        self.shared.sent_before_cancel.lock().expect("lock").clone()
    }

    fn mark_cancelled(&self, sent: u32) {
        self.shared
            .sent_before_cancel
            .lock()
            .expect("lock")
            .push(sent);
        self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
        self.shared.cancel_notify.notify_waiters();
    }

    async fn run(
        self,
        req: ValidGenerateRequest,
        tx: UnboundedSender<Result<InferStreamResponse, InferError>>,
    ) {
        let queued = Instant::now();
        if self.behavior == Behavior::AdaptersNotFound && req.adapter != AdapterSpec::Base {
            let message = format!("adapter `{}` not found", req.adapter.ids());
            let _ = tx.send(Err(InferError::AdapterNotFound(message)));
            return;
        }
        if req.decoder_input_details {
            let prefill = req
                .input_ids
                .iter()
                .enumerate()
                .map(|(i, &id)| PrefillToken {
                    id,
                    text: format!("p{id}"),
                    logprob: (i > 0).then_some(-0.25),
                })
                .collect();
            if tx.send(Ok(InferStreamResponse::Prefill(prefill))).is_err() {
                return self.mark_cancelled(0);
            }
        }
        let start = Instant::now();
        let n = req.stopping_parameters.max_new_tokens;
        let mut text = String::new();
        for i in 0..n {
            if !self.delay.is_zero() {
                tokio::select! {
                    _ = tx.closed() => return self.mark_cancelled(i),
                    _ = tokio::time::sleep(self.delay) => {}
                }
            }
            match self.behavior {
                Behavior::FailAfter(k) if k == i => {
                    let _ = tx.send(Err(InferError::Generation("fake shard failure".into())));
                    return;
                }
                Behavior::CloseWithoutEnd if i + 1 == n => return,
                _ => {}
            }
            let token = Self::token(&req.input_ids, i);
            let top_tokens = (1..=req.top_n_tokens)
                .map(|k| Token {
                    id: token.id + k,
                    text: format!(" a{k}"),
                    logprob: -(k as f32),
                    special: false,
                })
                .collect();
            text.push_str(&token.text);
            let stopped = req
                .stopping_parameters
                .stop_sequences
                .iter()
                .any(|s| text.contains(s.as_str()));
            let event = if stopped || i + 1 == n {
                InferStreamResponse::End {
                    token,
                    top_tokens,
                    generated_text: GeneratedText {
                        text: std::mem::take(&mut text),
                        generated_tokens: i + 1,
                        finish_reason: if stopped {
                            FinishReason::StopSequence
                        } else {
                            FinishReason::Length
                        },
                        seed: (req.parameters.do_sample && self.behavior != Behavior::OmitSeed)
                            .then_some(req.parameters.seed),
                    },
                    queued,
                    start,
                    cached_tokens: self.cached_tokens.map(|n| n.min(req.input_length())),
                }
            } else {
                InferStreamResponse::Intermediate { token, top_tokens }
            };
            let last = matches!(event, InferStreamResponse::End { .. });
            if tx.send(Ok(event)).is_err() {
                return self.mark_cancelled(i);
            }
            if last {
                return;
            }
        }
    }
}

impl Backend for FakeBackend {
    fn schedule(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<UnboundedReceiver<Result<InferStreamResponse, InferError>>, InferError> {
        if self.behavior == Behavior::RejectSchedule {
            return Err(InferError::Unavailable(
                "fake backend rejects requests".into(),
            ));
        }
        self.shared
            .requests
            .lock()
            .expect("lock")
            .push(request.clone());
        let (tx, rx) = unbounded_channel();
        tokio::spawn(self.clone().run(request, tx));
        Ok(rx)
    }

    fn health(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move { !self.shared.unhealthy.load(Ordering::SeqCst) })
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            model_dtype: "float32".into(),
            model_device_type: "cpu".into(),
            world_size: 1,
            max_batch_total_tokens: 4096,
            max_adapter_slots: 4,
            adapter_memory_bytes: 1 << 20,
            kv_block_tokens: 64,
        }
    }
}

/// A router serving a [`FakeBackend`] on loopback ports chosen by the OS.
pub(crate) struct TestServer {
    /// HTTP address.
    pub http: SocketAddr,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// The backend behind it.
    pub backend: FakeBackend,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
    _dir: tempfile::TempDir,
}

/// The config of a test server (addresses are ignored: listeners are passed in).
pub(crate) fn test_config(limits: Limits, tokenizer_path: PathBuf) -> RouterConfig {
    RouterConfig {
        http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        model_id: TEST_MODEL_ID.into(),
        merges: crate::merges::NamedMerges::default(),
        access: crate::access::AccessConfig::default(),
        tls: None,
        preload: Vec::new(),
        tokenizer_path,
        shard_uds_paths: Vec::new(),
        token_flags: TokenFlags {
            max_input_length: Some(limits.max_input_length),
            max_total_tokens: Some(limits.max_total_tokens),
        },
        limits,
        batching: BatchingConfig {
            max_batch_prefill_tokens: 4096,
            max_batch_prefill_tokens_set: true,
            max_idle_prefill_tokens: None,
            max_batch_total_tokens: None,
            max_batch_size: None,
            waiting_served_ratio: 0.3,
            max_waiting_tokens: 20,
            max_active_adapters: 128,
            adapter_cycle_time: Duration::from_secs(2),
        },
    }
}

impl TestServer {
    /// Starts a server on `backend` with [`test_limits`].
    pub(crate) async fn start(backend: FakeBackend) -> Self {
        Self::start_with(backend, test_limits()).await
    }

    /// Starts a server on `backend` with `limits`.
    pub(crate) async fn start_with(backend: FakeBackend, limits: Limits) -> Self {
        Self::start_in(backend, limits, &[]).await
    }

    /// Starts a server on `backend` with `limits` whose model directory (the one holding
    /// `tokenizer.json`) also has `files` (name, content), e.g. a `tokenizer_config.json`.
    pub(crate) async fn start_in(
        backend: FakeBackend,
        limits: Limits,
        files: &[(&str, &str)],
    ) -> Self {
        Self::start_configured(backend, limits, files, |_| {}).await
    }

    /// [`TestServer::start_in`], with `configure` applied to the config first (access rules...).
    pub(crate) async fn start_configured(
        backend: FakeBackend,
        limits: Limits,
        files: &[(&str, &str)],
        configure: impl FnOnce(&mut RouterConfig),
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("write a model file");
        }
        let path = dir.path().join("tokenizer.json");
        word_tokenizer().save(&path, false).expect("save tokenizer");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut config = test_config(limits, path);
        configure(&mut config);
        let server =
            Server::from_listeners(config, Arc::new(backend.clone()), http, grpc).expect("server");
        let (http, grpc) = (server.http_addr(), server.grpc_addr());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        Self {
            http,
            grpc,
            backend,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    /// `http://<addr><path>`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// `http://<grpc addr>`.
    pub(crate) fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Shuts the server down gracefully and checks that it stopped without error.
    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops within 10 s")
                .expect("server task")
                .expect("server result");
        }
    }
}
