//! LoRAX response headers (`x-model-id`, `x-compute-type`, timings, token counts), and
//! `x-affinity-model`: the name the request's adapter or merge goes by for gateway routing
//! ([`crate::affinity`]).

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::AppState;
use crate::infer::{GenerateOutput, RequestMeta};

fn insert(headers: &mut HeaderMap, name: &'static str, value: impl ToString) {
    match HeaderValue::from_str(&value.to_string()) {
        Ok(v) => {
            headers.insert(HeaderName::from_static(name), v);
        }
        Err(_) => tracing::debug!(header = name, "value is not a valid header; skipped"),
    }
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

/// Headers every generation response carries: `x-model-id`, `x-compute-type`, and what is known
/// once the request is admitted (`x-prompt-tokens`, `x-validation-time`).
pub(super) fn admitted(state: &AppState, meta: &RequestMeta) -> HeaderMap {
    let mut h = HeaderMap::new();
    insert(&mut h, "x-model-id", &state.config.model_id);
    insert(
        &mut h,
        "x-compute-type",
        state.infer.backend_info().model_device_type,
    );
    insert(&mut h, "x-prompt-tokens", meta.input_length);
    insert(&mut h, "x-validation-time", millis(meta.validation_time));
    if let Some((ids, source)) = &meta.adapter {
        insert(&mut h, "x-adapter-id", ids);
        insert(&mut h, "x-adapter-source", source);
    }
    if let Some(label) = &meta.affinity {
        insert(&mut h, "x-affinity-model", label);
    }
    h
}

/// Headers of a finished (non-streamed) generation; times in milliseconds except
/// `x-compute-time` (seconds, like LoRAX).
pub(super) fn finished(state: &AppState, out: &GenerateOutput) -> HeaderMap {
    let mut h = admitted(state, &out.meta);
    let t = &out.timings;
    insert(&mut h, "x-compute-time", t.total.as_secs_f64());
    insert(&mut h, "x-total-time", millis(t.total));
    insert(&mut h, "x-queue-time", millis(t.queue));
    insert(&mut h, "x-inference-time", millis(t.inference));
    insert(&mut h, "x-time-per-token", millis(t.time_per_token));
    insert(
        &mut h,
        "x-generated-tokens",
        out.generated_text.generated_tokens,
    );
    insert(
        &mut h,
        "x-total-tokens",
        out.meta.input_length + out.generated_text.generated_tokens,
    );
    h
}
