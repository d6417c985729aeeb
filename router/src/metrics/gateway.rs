//! The info gauges of the inference gateway's model-server protocol, rendered at scrape time from
//! the backend's state (one series each, always current, never a stale label set left behind):
//!
//! - [`KV_CACHE_INFO`]`{block_size, num_blocks, num_gpu_blocks}` = 1: the KV cache's block size
//!   (tokens) and block count (`num_gpu_blocks` too, the label name vLLM's `cache_config_info`
//!   uses and the endpoint picker reads, also on CPU): the shards' block pool as the latest step
//!   reported it, else the shards' block size and the blocks the batch token budget holds.
//! - [`LORA_REQUESTS_INFO`]`{max_lora, running_lora_adapters, waiting_lora_adapters}` = unix
//!   time of the update (like vLLM's `lora_requests_info`): `max_lora` is the adapter slots,
//!   `running_lora_adapters` what is resident in a slot (ready to serve, merges already
//!   computed), `waiting_lora_adapters` what queued requests (or preloads) wait for. Each
//!   adapter or merge appears under the one name it goes by ([`crate::affinity::view_label`]).

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::affinity;
use crate::backend::adapters::{AdapterState, Residency};
use crate::backend::{BackendInfo, KvBlocks};
use crate::merges::NamedMerges;

/// Info gauge of the KV cache's block size and count.
pub const KV_CACHE_INFO: &str = "medley_kv_cache_info";
/// Info gauge of the adapters running and waiting (value: unix time of the update).
pub const LORA_REQUESTS_INFO: &str = "medley_lora_requests_info";

/// What the info gauges are rendered from.
#[derive(Debug, Clone, Copy)]
pub struct GatewayView<'a> {
    /// The model behind the backend (KV budget, block size, adapter slots).
    pub info: &'a BackendInfo,
    /// The shards' KV block pool after the latest step, when reported.
    pub kv: Option<KvBlocks>,
    /// Adapter residency; `None` while the shards are unavailable (no LoRA series then).
    pub residency: Option<&'a Residency>,
    /// The registered named merges.
    pub merges: &'a NamedMerges,
    /// The time of the update.
    pub now: SystemTime,
}

/// The two info gauges in Prometheus text format (empty when there is nothing to report).
pub fn render(view: GatewayView<'_>) -> String {
    let mut out = String::new();
    let (block, blocks) = match view.kv.filter(|kv| kv.block_tokens > 0) {
        Some(kv) => (kv.block_tokens, kv.total_blocks),
        None => {
            let block = view.info.kv_block_tokens;
            (
                block,
                view.info.max_batch_total_tokens.div_ceil(block.max(1)),
            )
        }
    };
    if block > 0 {
        header(
            &mut out,
            KV_CACHE_INFO,
            "KV cache block size (tokens) and block count (the shards' pool, or the batch token budget until a step reported it).",
        );
        let _ = writeln!(
            out,
            "{KV_CACHE_INFO}{{block_size=\"{block}\",num_blocks=\"{blocks}\",num_gpu_blocks=\"{blocks}\"}} 1"
        );
    }
    if let Some(residency) = view.residency.filter(|_| view.info.max_adapter_slots > 0) {
        let (running, waiting) = adapter_lists(residency, view.merges);
        let now = view
            .now
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        header(
            &mut out,
            LORA_REQUESTS_INFO,
            "Adapters and merges resident (running) and waited for (waiting); value: unix time of the update.",
        );
        let _ = writeln!(
            out,
            "{LORA_REQUESTS_INFO}{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {now}",
            residency.max_slots,
            escape(&running.join(",")),
            escape(&waiting.join(",")),
        );
    }
    out
}

/// The names of resident adapters, and of those requests wait for (each name once, in residency
/// order).
fn adapter_lists(residency: &Residency, merges: &NamedMerges) -> (Vec<String>, Vec<String>) {
    let (mut running, mut waiting) = (Vec::new(), Vec::new());
    for view in &residency.adapters {
        let list = match view.state {
            AdapterState::Resident => &mut running,
            AdapterState::Waiting | AdapterState::Loading => &mut waiting,
            AdapterState::Evicted | AdapterState::Failed if view.queued > 0 => &mut waiting,
            AdapterState::Evicted | AdapterState::Failed => continue,
        };
        if let Some(label) = affinity::view_label(view, merges)
            && !list.contains(&label)
        {
            list.push(label);
        }
    }
    (running, waiting)
}

fn header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
}

/// A Prometheus label value: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::adapters::AdapterView;
    use crate::infer::AdapterSpec;
    use medley_spec::{AdapterRef, AdapterSource};
    use std::time::Duration;

    fn info(slots: u32) -> BackendInfo {
        BackendInfo {
            model_dtype: "float32".into(),
            model_device_type: "cpu".into(),
            world_size: 1,
            max_batch_total_tokens: 1000,
            max_adapter_slots: slots,
            adapter_memory_bytes: 0,
            kv_block_tokens: 64,
        }
    }

    fn single(id: &str, state: AdapterState, queued: usize) -> AdapterView {
        let spec = AdapterSpec::Single(AdapterRef {
            id: id.into(),
            source: AdapterSource::Hub,
            revision: None,
            api_token: None,
        });
        AdapterView {
            key: spec.key(),
            spec,
            state,
            slot: None,
            bytes: None,
            pinned: false,
            running: 0,
            queued,
            last_used: UNIX_EPOCH,
            error: None,
        }
    }

    #[test]
    fn renders_block_info_and_adapter_lists() {
        let residency = Residency {
            adapters: vec![
                single("org/a", AdapterState::Resident, 0),
                single("org/b", AdapterState::Loading, 1),
                single("org/c", AdapterState::Evicted, 0),
                single("org/d", AdapterState::Failed, 2),
                single("we\"ird", AdapterState::Resident, 0),
            ],
            max_slots: 4,
            ..Default::default()
        };
        let text = render(GatewayView {
            info: &info(4),
            kv: None,
            residency: Some(&residency),
            merges: &NamedMerges::default(),
            now: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        });
        assert!(
            text.contains(
                "medley_kv_cache_info{block_size=\"64\",num_blocks=\"16\",num_gpu_blocks=\"16\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "medley_lora_requests_info{max_lora=\"4\",running_lora_adapters=\"org/a,we\\\"ird\",waiting_lora_adapters=\"org/b,org/d\"} 1700000000\n"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE medley_lora_requests_info gauge"));
    }

    #[test]
    fn no_lora_series_without_slots_or_residency() {
        let residency = Residency::default();
        for (slots, residency) in [(0, Some(&residency)), (4, None)] {
            let text = render(GatewayView {
                info: &info(slots),
                kv: None,
                residency,
                merges: &NamedMerges::default(),
                now: SystemTime::now(),
            });
            assert!(!text.contains(LORA_REQUESTS_INFO), "{text}");
            assert!(text.contains(KV_CACHE_INFO), "{text}");
        }
    }

    #[test]
    fn block_info_follows_the_shards_pool_once_reported() {
        let kv = KvBlocks {
            block_tokens: 16,
            total_blocks: 300,
            used_blocks: 10,
            cached_blocks: 5,
        };
        let text = render(GatewayView {
            info: &info(0),
            kv: Some(kv),
            residency: None,
            merges: &NamedMerges::default(),
            now: SystemTime::now(),
        });
        assert!(
            text.contains(
                "medley_kv_cache_info{block_size=\"16\",num_blocks=\"300\",num_gpu_blocks=\"300\"} 1\n"
            ),
            "{text}"
        );
    }
}
