//! Runs the router's two fronts: HTTP (axum) on `config.http_addr` and gRPC (tonic: generation,
//! `grpc.health.v1`, reflection v1 and v1alpha) on `config.grpc_addr`, until a shutdown future
//! completes; both then stop gracefully (in-flight requests finish).
//!
//! ```ignore
//! // Production: bind the configured addresses.
//! server::run(config, backend, shutdown_signal()).await?;
//! // Tests: bind port 0, learn the addresses, then serve.
//! let server = Server::from_listeners(config, backend, http_listener, grpc_listener)?;
//! let (http, grpc) = (server.http_addr(), server.grpc_addr());
//! tokio::spawn(server.serve(async { stop.await.ok(); }));
//! ```

use std::future::Future;
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
use crate::grpc::{GenerationGrpc, GenerationServiceServer, MergeGrpc};
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
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
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
        let http_server =
            axum::serve(self.http, app).with_graceful_shutdown(stop.clone().cancelled_owned());
        let grpc_server = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(InterceptedService::new(
                GenerationGrpc::new(self.infer.clone(), Arc::clone(&self.config)).into_server(),
                GrpcAuth::new(self.config.access.keys.clone()),
            ))
            .add_service(InterceptedService::new(
                MergeGrpc::new(self.infer.clone()).into_server(),
                GrpcAuth::new(self.config.access.keys.clone()),
            ))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(self.grpc),
                stop.clone().cancelled_owned(),
            );
        tracing::info!(http = %self.http_addr, grpc = %self.grpc_addr, model_id = %self.config.model_id, "router listening");

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
mod tests {
    use super::*;
    use crate::infer::testing::{FakeBackend, test_config, test_limits, word_tokenizer};

    fn backend() -> Arc<dyn Backend> {
        Arc::new(FakeBackend::new())
    }

    #[tokio::test]
    async fn startup_errors_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let missing = test_config(test_limits(), dir.path().join("missing.json"));
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken = http.local_addr().unwrap();
        assert!(matches!(
            Server::from_listeners(missing, backend(), http, grpc),
            Err(ServerError::Tokenizer { .. })
        ));

        let path = dir.path().join("tokenizer.json");
        word_tokenizer().save(&path, false).unwrap();
        let _holder = TcpListener::bind(taken).await.unwrap();
        let mut config = test_config(test_limits(), path);
        config.http_addr = taken;
        match run(config, backend(), std::future::ready(())).await {
            Err(ServerError::Bind { addr, .. }) => assert_eq!(addr, taken),
            other => panic!("expected a bind error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn run_with_listeners_serves_until_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        word_tokenizer().save(&path, false).unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_with_listeners(
            test_config(test_limits(), path),
            backend(),
            http,
            grpc,
            async move {
                let _ = stopped.await;
            },
        ));
        let resp = reqwest::get(format!("http://{http_addr}/health"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
        assert!(
            reqwest::get(format!("http://{http_addr}/health"))
                .await
                .is_err(),
            "the listener is closed after shutdown"
        );
    }

    /// The parts of a `google.protobuf.FileDescriptorProto` the reflection test looks at.
    #[derive(Clone, PartialEq, prost::Message)]
    struct FileDescriptorHead {
        #[prost(string, optional, tag = "2")]
        package: Option<String>,
        #[prost(message, repeated, tag = "6")]
        service: Vec<ServiceDescriptorHead>,
    }

    /// The name of a `google.protobuf.ServiceDescriptorProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct ServiceDescriptorHead {
        #[prost(string, optional, tag = "1")]
        name: Option<String>,
    }

    /// Clients that speak only reflection v1alpha (`grpcio-reflection`, older grpcurl) see the
    /// same services and descriptors as v1 clients.
    #[tokio::test]
    async fn reflection_v1alpha_lists_and_describes_the_services() {
        use futures::StreamExt;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

        use crate::infer::testing::TestServer;

        let server = TestServer::start(FakeBackend::new()).await;
        let channel = tonic::transport::Channel::from_shared(server.grpc_url())
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut c = ServerReflectionClient::new(channel);
        let requests = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("medley.v1.GenerationService".into()),
        ]
        .map(|message| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message),
        });
        let mut replies = c
            .server_reflection_info(futures::stream::iter(requests))
            .await
            .expect("reflection v1alpha")
            .into_inner();

        let reply = replies.next().await.expect("a reply").expect("ok");
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected reply {reply:?}");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        assert_eq!(names, SERVED_SERVICES);

        let reply = replies.next().await.expect("a reply").expect("ok");
        let Some(MessageResponse::FileDescriptorResponse(files)) = reply.message_response else {
            panic!("unexpected reply {reply:?}");
        };
        let [file] = files.file_descriptor_proto.as_slice() else {
            panic!(
                "expected one descriptor, got {}",
                files.file_descriptor_proto.len()
            );
        };
        let file = <FileDescriptorHead as prost::Message>::decode(file.as_slice())
            .expect("a FileDescriptorProto");
        assert_eq!(file.package.as_deref(), Some("medley.v1"));
        assert!(
            file.service
                .iter()
                .any(|s| s.name.as_deref() == Some("GenerationService")),
            "{file:?}"
        );
        drop(replies);
        server.stop().await;
    }
}
