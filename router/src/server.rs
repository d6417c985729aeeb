//! Runs the router's two fronts: HTTP (axum) on `config.http_addr` and gRPC (tonic: generation,
//! `grpc.health.v1`, reflection v1 and v1alpha) on `config.grpc_addr`, until a shutdown future
//! completes; both then stop gracefully (in-flight requests finish). With `config.tls` both speak
//! TLS only (see [`crate::tls`]).
//!
//! ```ignore
//! // Production: bind the configured addresses.
//! server::run(config, backend, shutdown_signal()).await?;
//! // Tests: bind port 0, learn the addresses, then serve.
//! let server = Server::from_listeners(config, backend, http_listener, grpc_listener)?;
//! let (http, grpc) = (server.http_addr(), server.grpc_addr());
//! tokio::spawn(server.serve(async { stop.await.ok(); }));
//! ```

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::access::GrpcAuth;
use crate::backend::Backend;
use crate::config::RouterConfig;
use crate::grpc::{AdapterGrpc, GenerationGrpc, GenerationServiceServer, MergeGrpc};
use crate::http::{self, AppState};
use crate::infer::Infer;
use crate::validation::Validation;
use tonic::service::interceptor::InterceptedService;

/// How often the gRPC health status is refreshed from the backend.
const HEALTH_REFRESH: Duration = Duration::from_secs(5);
/// How long one backend health check may take before it counts as unhealthy.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the Prometheus recorder's histograms are compacted.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);
/// gRPC name of the standard health service (listed by reflection).
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// gRPC name of the reflection v1 service (listed by reflection).
const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";
/// gRPC name of the reflection v1alpha service (listed by reflection), still the only version
/// spoken by Python's `grpcio-reflection`, older grpcurl and several GUI clients.
const REFLECTION_V1ALPHA_SERVICE: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Every service the gRPC port serves, sorted (what both reflection versions list).
#[cfg(test)]
pub(crate) const SERVED_SERVICES: [&str; 4] = [
    HEALTH_SERVICE,
    REFLECTION_SERVICE,
    REFLECTION_V1ALPHA_SERVICE,
    "medley.v1.GenerationService",
];

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listen address could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A listener's local address could not be read.
    #[error("listener address: {0}")]
    LocalAddr(std::io::Error),
    /// The tokenizer file could not be loaded.
    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
    /// The tokenizer worker threads could not be started.
    #[error("cannot start tokenizer workers: {0}")]
    Workers(std::io::Error),
    /// The reflection service could not be built from the descriptor sets.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A `--preload-adapters` / `--pin-adapters` entry could not be loaded.
    #[error(transparent)]
    Preload(#[from] crate::preload::PreloadError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The gRPC listener's TLS settings were refused.
    #[error("gRPC TLS: {0}")]
    Tls(tonic::transport::Error),
}

/// A router with its listeners bound, ready to [`Server::serve`].
pub struct Server {
    config: Arc<RouterConfig>,
    infer: Infer,
    http: TcpListener,
    grpc: TcpListener,
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
}

impl Server {
    /// Binds `config.http_addr` and `config.grpc_addr` and loads the tokenizer.
    pub async fn bind(
        config: RouterConfig,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, ServerError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })
        };
        let http = bind(config.http_addr).await?;
        let grpc = bind(config.grpc_addr).await?;
        Self::from_listeners(config, backend, http, grpc)
    }

    /// Uses already-bound listeners (tests bind port 0) and loads the tokenizer; the listen
    /// addresses in `config` are ignored.
    pub fn from_listeners(
        config: RouterConfig,
        backend: Arc<dyn Backend>,
        http: TcpListener,
        grpc: TcpListener,
    ) -> Result<Self, ServerError> {
        let tokenizer = tokenizers::Tokenizer::from_file(&config.tokenizer_path).map_err(|e| {
            ServerError::Tokenizer {
                path: config.tokenizer_path.clone(),
                message: e.to_string(),
            }
        })?;
        let validation =
            Validation::with_merges(tokenizer, config.limits.clone(), config.merges.clone())
                .map_err(ServerError::Workers)?;
        let infer = Infer::new(backend, validation);
        Ok(Self {
            http_addr: http.local_addr().map_err(ServerError::LocalAddr)?,
            grpc_addr: grpc.local_addr().map_err(ServerError::LocalAddr)?,
            config: Arc::new(config),
            infer,
            http,
            grpc,
        })
    }

    /// The address the HTTP front listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The address the gRPC front listens on.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Serves both fronts until `shutdown` completes (or one of them fails), then stops both
    /// gracefully.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let stop = CancellationToken::new();
        // Completing `shutdown` or dropping this future (task aborted) stops everything.
        let _stop_on_drop = stop.clone().drop_guard();
        tokio::spawn({
            let stop = stop.clone();
            async move {
                tokio::select! {
                    () = shutdown => stop.cancel(),
                    () = stop.cancelled() => {}
                }
            }
        });

        let metrics = crate::metrics::install();
        tokio::spawn({
            let (metrics, stop) = (metrics.clone(), stop.clone());
            async move {
                while stop
                    .run_until_cancelled(tokio::time::sleep(METRICS_UPKEEP))
                    .await
                    .is_some()
                {
                    metrics.run_upkeep();
                }
            }
        });

        // Adapters to have resident before the server answers (and health turns green).
        let preload = crate::preload::preload_all(&self.infer, &self.config.preload);
        if stop
            .run_until_cancelled(preload)
            .await
            .transpose()?
            .is_none()
        {
            return Ok(());
        }

        let (reporter, health_service) = tonic_health::server::health_reporter();
        // Report the real status before accepting connections, then refresh it periodically.
        report_health(&self.infer, &reporter).await;
        tokio::spawn(refresh_health(self.infer.clone(), reporter, stop.clone()));

        let reflection = reflection_builder().build_v1()?;
        let reflection_v1alpha = reflection_builder().build_v1alpha()?;

        let app = http::router(AppState {
            infer: self.infer.clone(),
            config: Arc::clone(&self.config),
            metrics,
        });
        let http_server: futures::future::BoxFuture<'static, std::io::Result<()>> =
            match &self.config.tls {
                Some(tls) => Box::pin(
                    axum::serve(tls.http_listener(self.http, self.http_addr), app)
                        .with_graceful_shutdown(stop.clone().cancelled_owned())
                        .into_future(),
                ),
                None => Box::pin(
                    axum::serve(self.http, app)
                        .with_graceful_shutdown(stop.clone().cancelled_owned())
                        .into_future(),
                ),
            };
        let mut grpc_builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.config.tls {
            grpc_builder = grpc_builder
                .tls_config(tls.grpc())
                .map_err(ServerError::Tls)?;
        }
        let admin = self.config.access.admin_enabled;
        let grpc_server = grpc_builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(InterceptedService::new(
                GenerationGrpc::new(self.infer.clone(), Arc::clone(&self.config)).into_server(),
                GrpcAuth::new(self.config.access.keys.clone()),
            ))
            // The management services: absent with --disable-admin, else behind the admin keys.
            .add_optional_service(admin.then(|| {
                InterceptedService::new(
                    MergeGrpc::new(self.infer.clone()).into_server(),
                    GrpcAuth::new(self.config.access.admin_keys()),
                )
            }))
            .add_optional_service(admin.then(|| {
                InterceptedService::new(
                    AdapterGrpc::new(self.infer.clone()).into_server(),
                    GrpcAuth::new(self.config.access.admin_keys()),
                )
            }))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(self.grpc),
                stop.clone().cancelled_owned(),
            );
        let (http_scheme, grpc_scheme) = match &self.config.tls {
            Some(_) => ("https", "grpcs"),
            None => ("http", "grpc"),
        };
        let tls_cert = (self.config.tls.as_ref()).map(|t| t.cert_file().display().to_string());
        tracing::info!(
            http = %format_args!("{http_scheme}://{}", self.http_addr),
            grpc = %format_args!("{grpc_scheme}://{}", self.grpc_addr),
            tls = self.config.tls.is_some(),
            tls_cert = tls_cert.as_deref(),
            model_id = %self.config.model_id,
            "router listening"
        );

        let result = tokio::try_join!(
            async { http_server.await.map_err(ServerError::Http) },
            async { grpc_server.await.map_err(ServerError::Grpc) },
        );
        stop.cancel();
        match &result {
            Ok(_) => tracing::info!("router stopped"),
            Err(e) => tracing::error!("router failed: {e}"),
        }
        result.map(|_| ())
    }
}

/// Binds the configured addresses and serves until `shutdown` completes.
pub async fn run(
    config: RouterConfig,
    backend: Arc<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::bind(config, backend).await?.serve(shutdown).await
}

/// Serves on already-bound listeners until `shutdown` completes.
pub async fn run_with_listeners(
    config: RouterConfig,
    backend: Arc<dyn Backend>,
    http: TcpListener,
    grpc: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::from_listeners(config, backend, http, grpc)?
        .serve(shutdown)
        .await
}

/// A reflection builder over the same descriptor sets and service list for both reflection
/// versions; each version also describes the other's service, since both are listed.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(medley_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .with_service_name(GenerationServiceServer::<GenerationGrpc>::NAME)
        .with_service_name(HEALTH_SERVICE)
        .with_service_name(REFLECTION_SERVICE)
        .with_service_name(REFLECTION_V1ALPHA_SERVICE)
}

async fn report_health(infer: &Infer, reporter: &HealthReporter) {
    // A backend that does not answer in time is not serving.
    let healthy = tokio::time::timeout(HEALTH_TIMEOUT, infer.health())
        .await
        .unwrap_or(false);
    let status = if healthy {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in ["", GenerationServiceServer::<GenerationGrpc>::NAME] {
        reporter.set_service_status(service, status).await;
    }
}

async fn refresh_health(infer: Infer, reporter: HealthReporter, stop: CancellationToken) {
    while stop
        .run_until_cancelled(tokio::time::sleep(HEALTH_REFRESH))
        .await
        .is_some()
    {
        report_health(&infer, &reporter).await;
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
