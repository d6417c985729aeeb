//! A broken tensor-parallel group, as the engine reports it: health fails at once (answered
//! beside the engine thread, not behind a forward pass), and a step that fails in a collective
//! is `GroupBroken` (gRPC UNAVAILABLE: restart the group), not a model error.

#![allow(clippy::unwrap_used)]

mod engine_harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use engine_harness::{engine_over, tiny};
use medley_shard::adapters::{AdapterStore, LoraBackend};
use medley_shard::comm::{Comm, CommError};
use medley_shard::engine::{Batch, EngineError, EngineHandle, Request, SamplingParams, StopParams};
use medley_shard::kv_cache::{KvCache, KvCacheConfig};
use medley_shard::model::{LlamaModel, LoadOptions, TpLayout};

/// Rank 0 of a group of two whose peer answers nothing useful: collectives leave the buffers
/// as they are (wrong numbers, but this test only looks at failures) until the group breaks.
#[derive(Debug, Default)]
struct BreakableComm {
    broken: AtomicBool,
}

impl BreakableComm {
    fn result(&self) -> Result<(), CommError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(CommError::Poisoned { rank: 0 });
        }
        Ok(())
    }
}

impl Comm for BreakableComm {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CommError> {
        self.result()
    }
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        for chunk in output.chunks_mut(input.len()) {
            chunk.copy_from_slice(input);
        }
        self.result()
    }
    fn broadcast(&self, _buf: &mut [f32], _root: usize) -> Result<(), CommError> {
        self.result()
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.result()
    }
    fn check(&self) -> Result<(), CommError> {
        self.result()
    }
}

fn batch(id: u64) -> Batch {
    Batch {
        id,
        requests: vec![Request {
            id,
            input_ids: vec![1, 42, 361, 78],
            sampling: SamplingParams::default(),
            stopping: StopParams {
                max_new_tokens: 4,
                ..Default::default()
            },
            prefill_logprobs: false,
            top_n_tokens: 0,
            adapter_slot: 0,
        }],
        max_tokens: 8,
    }
}

#[tokio::test]
async fn a_broken_group_fails_health_and_steps_with_group_broken() {
    let comm = Arc::new(BreakableComm::default());
    let opts = LoadOptions {
        tp: TpLayout { rank: 0, world: 2 },
        comm: comm.clone(),
        ..Default::default()
    };
    let model = LlamaModel::load(&tiny(), &opts).unwrap();
    let kv = KvCache::new(
        model.kv_config(),
        model.dtype(),
        model.device(),
        KvCacheConfig::tokens(256),
    )
    .unwrap();
    let engine = engine_over(model, kv, AdapterStore::new(0, 0, LoraBackend::Kernels), 2);
    let (handle, _join) = EngineHandle::spawn(engine).unwrap();

    handle.health().unwrap();
    handle.prefill(batch(1), vec![]).await.unwrap();

    comm.broken.store(true, Ordering::Release);
    let health = handle.health().unwrap_err();
    assert!(matches!(health, EngineError::GroupBroken(_)), "{health}");
    let step = handle.prefill(batch(2), vec![]).await.unwrap_err();
    assert!(matches!(step, EngineError::GroupBroken(_)), "{step}");
    let status = tonic::Status::from(step);
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("tensor-parallel group broken"),
        "{status:?}"
    );
}
