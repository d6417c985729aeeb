//! The OTLP exporter: a `tracing` layer whose spans are batch-exported over gRPC to an
//! OpenTelemetry collector, and the [`Tracing`] handle that flushes them at shutdown.
//!
//! The exporter's gRPC channel runs on a small runtime of its own (one thread, started here),
//! so the layer can be installed before the process's runtime exists and spans are flushed
//! after it is gone. The batch processor exports every few seconds (`OTEL_BSP_*` variables
//! tune it); a collector that cannot be reached is reported as a warning and its spans are
//! dropped, it never stops the process.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tonic::codegen::http::Uri;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{Filtered, LevelFilter, Targets};
use tracing_subscriber::registry::Registry;

/// How long a shutdown waits for the last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the start-up reachability check waits for the collector.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Crates whose spans are exported (`medley`, `medley_router`, `medley_shard`, ...).
const EXPORTED_TARGETS: &str = "medley";

/// Where and as whom a process exports its spans.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://collector:4317`.
    pub endpoint: String,
    /// `service.name` of the process's spans.
    pub service_name: String,
    /// More resource attributes (e.g. `shard.rank`).
    pub attributes: Vec<KeyValue>,
}

impl OtlpConfig {
    /// A config for `endpoint` and `service_name`, without other attributes.
    pub fn new(endpoint: impl Into<String>, service_name: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            service_name: service_name.into(),
            attributes: Vec::new(),
        }
    }

    /// Adds a resource attribute.
    pub fn with_attribute(mut self, attribute: KeyValue) -> Self {
        self.attributes.push(attribute);
        self
    }
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `--otlp-endpoint` is not a usable URL.
    #[error("invalid --otlp-endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The value given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--otlp-service-name` is empty.
    #[error("--otlp-service-name must not be empty")]
    ServiceName,
    /// The exporter's runtime could not be started.
    #[error("cannot start the OTLP exporter: {0}")]
    Runtime(#[from] std::io::Error),
    /// The exporter refused its configuration.
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// The layer to put directly on the [`Registry`]: it exports the spans of Medley's crates at
/// INFO and above (whatever `RUST_LOG` says about the log output).
pub type OtlpLayer =
    Filtered<tracing_opentelemetry::OpenTelemetryLayer<Registry, SdkTracer>, Targets, Registry>;

/// The exporter behind an [`OtlpLayer`]. [`Tracing::shutdown`] (or dropping it) exports the
/// spans still buffered, then stops the exporter; call it when the process stops, after its
/// last requests.
#[derive(Debug)]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tracing {
    /// Exports the buffered spans (waiting at most a few seconds) and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            tracing::warn!("exporting the last spans failed: {e}");
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Checks `endpoint`: an absolute `http://host:port` URL (TLS to the collector is not
/// supported: run the collector, or a local agent, on a private network).
fn check_endpoint(endpoint: &str) -> Result<Uri, TelemetryError> {
    let bad = |reason: &str| TelemetryError::Endpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = endpoint.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "TLS to the collector is not supported; use an http:// endpoint",
            ));
        }
        Some(other) => return Err(bad(&format!("unsupported scheme `{other}`; use http://"))),
        None => return Err(bad("expected a URL such as http://collector:4317")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("the URL has no host"));
    }
    Ok(uri)
}

/// Builds the OTLP layer for `config` and the [`Tracing`] handle that owns its exporter. Fails
/// on a bad endpoint URL; an unreachable collector is only logged (once, shortly after start).
pub fn layer(config: &OtlpConfig) -> Result<(OtlpLayer, Tracing), TelemetryError> {
    let uri = check_endpoint(&config.endpoint)?;
    if config.service_name.trim().is_empty() {
        return Err(TelemetryError::ServiceName);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("otlp-export")
        .build()?;
    let exporter = {
        // The channel's background tasks go to this runtime.
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?
    };
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attributes(config.attributes.iter().cloned())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(env!("CARGO_PKG_NAME"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let endpoint = config.endpoint.clone();
    let thread = std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::spawn(probe(uri, endpoint));
                let _ = stopped.await;
            });
        })?;
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_filter(Targets::new().with_target(EXPORTED_TARGETS, LevelFilter::INFO));
    Ok((
        layer,
        Tracing {
            provider: Some(provider),
            stop: Some(stop),
            thread: Some(thread),
        },
    ))
}

/// Warns when nothing accepts connections at the collector's address.
async fn probe(uri: Uri, endpoint: String) {
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(80);
    let connect = tokio::net::TcpStream::connect((host, port));
    match tokio::time::timeout(PROBE_TIMEOUT, connect).await {
        Ok(Ok(_)) => tracing::debug!(endpoint, "OTLP collector reachable"),
        Ok(Err(e)) => tracing::warn!(
            endpoint,
            "OTLP collector unreachable ({e}); spans are dropped until it answers"
        ),
        Err(_) => tracing::warn!(
            endpoint,
            "OTLP collector did not answer within {} s; spans are dropped until it answers",
            PROBE_TIMEOUT.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        for good in [
            "http://collector:4317",
            "http://127.0.0.1:4317",
            "http://[::1]:4317/",
        ] {
            assert!(check_endpoint(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "collector:4317",
            "https://collector:4317",
            "ftp://collector",
            "http://",
            "not a url",
        ] {
            let err = check_endpoint(bad).expect_err(bad);
            assert!(err.to_string().contains("--otlp-endpoint"), "{err}");
        }
    }

    #[test]
    fn a_bad_config_is_an_error_and_a_dead_collector_is_not() {
        assert!(matches!(
            layer(&OtlpConfig::new("https://x:4317", "s")),
            Err(TelemetryError::Endpoint { .. })
        ));
        assert!(matches!(
            layer(&OtlpConfig::new("http://x:4317", " ")),
            Err(TelemetryError::ServiceName)
        ));
        // Nothing listens there: building works, and shutting down returns.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let (_layer, tracing) = layer(&OtlpConfig::new(
            format!("http://127.0.0.1:{port}"),
            "medley-test",
        ))
        .expect("the layer builds without a collector");
        tracing.shutdown();
    }
}
