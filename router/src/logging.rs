//! Log setup of the `medley` executable: `tracing` to stdout as text or JSON lines, filtered by
//! `RUST_LOG` (default `info`), and with `--otlp-endpoint` the OTLP span exporter
//! ([`medley_telemetry`]).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (`--json-output`).
    Json,
}

impl LogFormat {
    /// `Json` when `json_output` is set.
    pub fn from_json_flag(json_output: bool) -> Self {
        if json_output {
            LogFormat::Json
        } else {
            LogFormat::Text
        }
    }
}

/// Installs the global subscriber. Returns an error if `RUST_LOG` is invalid or a subscriber
/// is already installed.
pub fn init(format: LogFormat) -> Result<(), String> {
    init_with_otlp(format, None).map(|_| ())
}

/// Logging and tracing as a router's flags ask (`--json-output`, `--otlp-endpoint`,
/// `--otlp-service-name`): [`init_with_otlp`].
pub fn init_router(
    args: &crate::config::RouterArgs,
) -> Result<Option<medley_telemetry::Tracing>, String> {
    let otlp = crate::telemetry::otlp_config(args);
    init_with_otlp(LogFormat::from_json_flag(args.json_output), otlp.as_ref())
}

/// [`init`], plus, with `otlp`, the layer that exports spans to an OpenTelemetry collector
/// (`--otlp-endpoint`). The returned handle flushes the spans still buffered when it is shut
/// down or dropped: keep it until the process stops. A bad endpoint is an error; an
/// unreachable collector is only logged.
pub fn init_with_otlp(
    format: LogFormat,
    otlp: Option<&medley_telemetry::OtlpConfig>,
) -> Result<Option<medley_telemetry::Tracing>, String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => {
            EnvFilter::try_new(&spec).map_err(|e| format!("RUST_LOG={spec}: {e}"))?
        }
        _ => EnvFilter::new("info"),
    };
    let (otel, tracing) = match otlp {
        Some(config) => {
            let (layer, tracing) =
                medley_telemetry::otlp::layer(config).map_err(|e| e.to_string())?;
            (Some(layer), Some(tracing))
        }
        None => (None, None),
    };
    // The OTLP layer has its own filter: `RUST_LOG` only filters the log output.
    let registry = tracing_subscriber::registry().with(otel);
    let result = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_filter(filter))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(false)
                    .with_current_span(false)
                    .with_filter(filter),
            )
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    if let Some(config) = otlp {
        tracing::info!(
            endpoint = %config.endpoint,
            service = %config.service_name,
            "exporting traces over OTLP"
        );
    }
    Ok(tracing)
}
