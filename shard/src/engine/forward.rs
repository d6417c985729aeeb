//! The engine's forward steps: run as they come, or, with `--cuda-graphs`, decode steps replayed
//! from CUDA graphs (`medley_shard::model::graphs`, CUDA builds).

use candle_core::Tensor;

use super::Engine;
use crate::model::{ForwardBatch, ModelError, SeqChunk};

/// The decode-step graphs of an engine that records them (CUDA builds only).
#[derive(Default)]
pub(super) struct StepGraphs {
    #[cfg(feature = "cuda")]
    graphs: Option<crate::model::graphs::DecodeGraphs>,
}

impl StepGraphs {
    /// Recording graphs when `on` (on a GPU at world size 1; elsewhere every step runs as it
    /// comes). A build without CUDA has none.
    fn new(on: bool) -> Self {
        #[cfg(feature = "cuda")]
        return Self {
            graphs: on.then(|| {
                crate::model::graphs::DecodeGraphs::new(crate::model::graphs::DEFAULT_CAPACITY)
            }),
        };
        #[cfg(not(feature = "cuda"))]
        {
            let _ = on;
            Self::default()
        }
    }

    /// Whether graphs are recorded.
    fn on(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.graphs.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Drops every graph.
    fn clear(&mut self) {
        #[cfg(feature = "cuda")]
        if let Some(g) = self.graphs.as_mut() {
            g.clear();
        }
    }
}

impl Engine {
    /// Replays decode steps from CUDA graphs when `on` (`--cuda-graphs`; see
    /// `medley_shard::model::graphs`): on a GPU at world size 1 with a dense embedding, from the
    /// warm-up on. Without a GPU, or in a build without CUDA, steps run as they come.
    pub fn with_cuda_graphs(mut self, on: bool) -> Self {
        self.graphs = StepGraphs::new(on);
        self
    }

    /// One forward step over `chunks`.
    pub(super) fn forward_step(&mut self, chunks: Vec<SeqChunk>) -> Result<Tensor, ModelError> {
        let batch = ForwardBatch { chunks };
        #[cfg(feature = "cuda")]
        if let Some(g) = self.graphs.graphs.as_mut() {
            return g.forward(&self.model, &batch, &mut self.kv, &self.adapters);
        }
        self.model.forward(&batch, &mut self.kv, &self.adapters)
    }

    /// Before a warm-up: drops the graphs (the KV cache may be replaced) and, when they are
    /// recorded, builds the rotary table of positions below `max_total_tokens` so that steps
    /// read their ids and positions on the device.
    pub(super) fn reset_graphs(&mut self, max_total_tokens: usize) -> Result<(), ModelError> {
        self.graphs.clear();
        if self.graphs.on() {
            let positions = max_total_tokens.clamp(1, self.max_positions());
            self.model.build_rope_table(positions)?;
            if self.model.device_positions() == 0 {
                tracing::warn!(
                    "--cuda-graphs on has no effect here: decode steps are recorded on a GPU at \
                     world size 1 with a dense embedding"
                );
            } else {
                tracing::info!(positions, "decode steps are replayed from CUDA graphs");
            }
        }
        Ok(())
    }
}
