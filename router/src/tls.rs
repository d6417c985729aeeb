//! Optional TLS on both listeners (rustls with the `ring` provider).
//!
//! `--tls-cert-file` (`MEDLEY_TLS_CERT_FILE`: a PEM certificate chain, the server's certificate
//! first) and `--tls-key-file` (`MEDLEY_TLS_KEY_FILE`: its PEM private key, PKCS#8, PKCS#1 or
//! SEC1) come together or not at all. With them the HTTP port speaks HTTPS only (HTTP/1.1 and
//! HTTP/2 by ALPN) and the gRPC port gRPC over TLS only; there is no plaintext fallback. Both
//! files are read and checked when the configuration is built, so a missing or invalid file is a
//! start-up error naming it.
//!
//! A connection whose handshake fails (or takes longer than [`HANDSHAKE_TIMEOUT`]) is dropped
//! and logged at debug level; the listener keeps accepting.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

use crate::config::ConfigError;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the HTTP server to take them.
const ACCEPT_QUEUE: usize = 64;

/// The TLS flags (part of [`crate::config::RouterArgs`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain (the server's certificate first): serve HTTPS on the HTTP port and
    /// gRPC over TLS on the gRPC port (no plaintext). Needs --tls-key-file.
    #[arg(long, env = "MEDLEY_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert-file.
    #[arg(long, env = "MEDLEY_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS settings with both files read and checked; `None` without the flags.
    pub fn into_config(self) -> Result<Option<TlsConfig>, ConfigError> {
        let given = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        match (given(self.tls_cert_file), given(self.tls_key_file)) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => TlsConfig::from_files(&cert, &key).map(Some),
            (Some(_), None) => Err(ConfigError::Invalid(
                "--tls-cert-file needs --tls-key-file (MEDLEY_TLS_KEY_FILE): give both or neither"
                    .into(),
            )),
            (None, Some(_)) => Err(ConfigError::Invalid(
                "--tls-key-file needs --tls-cert-file (MEDLEY_TLS_CERT_FILE): give both or neither"
                    .into(),
            )),
        }
    }
}

/// A checked certificate and key, ready for both listeners.
#[derive(Clone)]
pub struct TlsConfig {
    cert_file: PathBuf,
    key_file: PathBuf,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    http: Arc<rustls::ServerConfig>,
}

/// Never shows the key.
impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads and checks a PEM certificate chain and its private key.
    pub fn from_files(cert_file: &Path, key_file: &Path) -> Result<Self, ConfigError> {
        let read = |flag: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| ConfigError::Invalid(format!("{flag} {}: {e}", path.display())))
        };
        let cert_pem = read("--tls-cert-file", cert_file)?;
        let key_pem = read("--tls-key-file", key_file)?;
        Self::from_pem(cert_file, key_file, cert_pem, key_pem)
    }

    /// Checks PEM contents (`cert_file` and `key_file` name them in errors).
    fn from_pem(
        cert_file: &Path,
        key_file: &Path,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> Result<Self, ConfigError> {
        let cert_error = |what: String| {
            ConfigError::Invalid(format!("--tls-cert-file {}: {what}", cert_file.display()))
        };
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| cert_error(format!("not a PEM certificate chain: {e}")))?;
        if certs.is_empty() {
            return Err(cert_error(
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
            ));
        }
        // Details of a key parse error could quote the file: only say what is wrong.
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            let what = match e {
                pem::Error::NoItemsFound => {
                    "holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)"
                }
                _ => "not a valid PEM private key",
            };
            ConfigError::Invalid(format!("--tls-key-file {}: {what}", key_file.display()))
        })?;
        let mut http = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            ConfigError::Invalid(format!(
                "--tls-cert-file {} with --tls-key-file {}: {e}",
                cert_file.display(),
                key_file.display()
            ))
        })?;
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            cert_pem,
            key_pem,
            http: Arc::new(http),
        })
    }

    /// The certificate chain file.
    pub fn cert_file(&self) -> &Path {
        &self.cert_file
    }

    /// The gRPC listener's TLS settings.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        // tonic builds its rustls config with the process-wide provider: make it ring (a no-op
        // when one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Wraps the HTTP listener: what it accepts is handshaken TLS.
    pub(crate) fn http_listener(&self, listener: TcpListener, addr: SocketAddr) -> TlsListener {
        TlsListener::new(listener, addr, Arc::clone(&self.http))
    }
}

/// An [`axum::serve::Listener`] yielding TLS connections: a background task accepts TCP
/// connections and handshakes each on its own task, so a slow or failing client delays no one.
/// Dropping it stops accepting (and closes the port).
pub(crate) struct TlsListener {
    addr: SocketAddr,
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accept_task: tokio::task::AbortHandle,
}

impl TlsListener {
    fn new(listener: TcpListener, addr: SocketAddr, config: Arc<rustls::ServerConfig>) -> Self {
        let (tx, accepted) = mpsc::channel(ACCEPT_QUEUE);
        let accept_task = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
        Self {
            addr,
            accepted,
            accept_task: accept_task.abort_handle(),
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept task is gone (it only ends when aborted): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Per-connection errors need no pause; others (out of file descriptors) do.
                if !is_connection_error(&e) {
                    tracing::error!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Self-signed certificates for tests.
#[cfg(test)]
pub(crate) mod testing {
    /// A self-signed certificate for `localhost` and 127.0.0.1: (certificate PEM, key PEM).
    pub(crate) fn self_signed() -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("self-signed certificate");
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, content).expect("write");
        path
    }

    fn args(cert: Option<&Path>, key: Option<&Path>) -> TlsArgs {
        TlsArgs {
            tls_cert_file: cert.map(Path::to_path_buf),
            tls_key_file: key.map(Path::to_path_buf),
        }
    }

    fn error(args: TlsArgs) -> String {
        match args.into_config() {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn both_files_or_neither() {
        assert!(args(None, None).into_config().expect("no TLS").is_none());
        let empty = TlsArgs {
            tls_cert_file: Some(PathBuf::new()),
            tls_key_file: Some(PathBuf::new()),
        };
        assert!(empty.into_config().expect("empty = unset").is_none());
        let e = error(args(Some(Path::new("/c.pem")), None));
        assert!(e.contains("--tls-cert-file needs --tls-key-file"), "{e}");
        let e = error(args(None, Some(Path::new("/k.pem"))));
        assert!(e.contains("--tls-key-file needs --tls-cert-file"), "{e}");
    }

    /// The flags are part of the router's (and `medley serve`'s) arguments.
    #[test]
    fn flags_reach_the_router_config() {
        use clap::Parser;

        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            router: crate::config::RouterArgs,
        }
        let config = |flags: &[&str]| {
            Cli::try_parse_from(std::iter::once("x").chain(flags.iter().copied()))
                .expect("flags parse")
                .router
                .into_config("m".into(), PathBuf::new(), vec![])
        };
        let dir = tempfile::tempdir().expect("tmp");
        let (cert, key) = testing::self_signed();
        let c = write(dir.path(), "cert.pem", &cert);
        let k = write(dir.path(), "key.pem", &key);
        let (c, k) = (c.to_str().expect("utf-8"), k.to_str().expect("utf-8"));
        assert!(config(&[]).expect("plaintext").tls.is_none());
        let on = config(&["--tls-cert-file", c, "--tls-key-file", k]).expect("TLS");
        assert_eq!(on.tls.expect("TLS on").cert_file(), Path::new(c));
        let e = config(&["--tls-key-file", k]).expect_err("a key alone");
        assert!(
            e.to_string()
                .contains("--tls-key-file needs --tls-cert-file"),
            "{e}"
        );
    }

    #[test]
    fn a_valid_pair_is_accepted_and_the_key_never_shown() {
        let dir = tempfile::tempdir().expect("tmp");
        let (cert, key) = testing::self_signed();
        let c = write(dir.path(), "cert.pem", &cert);
        let k = write(dir.path(), "key.pem", &key);
        let config = args(Some(&c), Some(&k))
            .into_config()
            .expect("valid")
            .expect("TLS on");
        assert_eq!(config.cert_file(), c);
        assert_eq!(config.http.alpn_protocols[0], b"h2");
        let shown = format!("{config:?}");
        assert!(
            shown.contains("cert.pem") && shown.contains("key.pem"),
            "{shown}"
        );
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        let key_body = key.lines().nth(1).expect("a key line");
        assert!(!shown.contains(key_body), "{shown}");
    }

    #[test]
    fn unreadable_or_invalid_files_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let (cert, key) = testing::self_signed();
        let c = write(dir.path(), "cert.pem", &cert);
        let k = write(dir.path(), "key.pem", &key);
        let missing = dir.path().join("missing.pem");

        let e = error(args(Some(&missing), Some(&k)));
        assert!(
            e.contains("--tls-cert-file") && e.contains("missing.pem"),
            "{e}"
        );
        let e = error(args(Some(&c), Some(&missing)));
        assert!(
            e.contains("--tls-key-file") && e.contains("missing.pem"),
            "{e}"
        );

        // A key where the certificate should be, and the other way round.
        let e = error(args(Some(&k), Some(&k)));
        assert!(
            e.contains("key.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = error(args(Some(&c), Some(&c)));
        assert!(
            e.contains("cert.pem") && e.contains("no PEM private key"),
            "{e}"
        );

        // Not PEM at all, and a broken PEM body.
        let junk = write(dir.path(), "junk.pem", "hello\n");
        let e = error(args(Some(&junk), Some(&k)));
        assert!(
            e.contains("junk.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let broken_key = key.replace(key.lines().nth(1).expect("a key line"), "@@@@");
        let bad = write(dir.path(), "bad-key.pem", &broken_key);
        let e = error(args(Some(&c), Some(&bad)));
        assert!(
            e.contains("bad-key.pem") && e.contains("not a valid PEM private key"),
            "{e}"
        );

        // A key that does not belong to the certificate.
        let (_, other_key) = testing::self_signed();
        let other = write(dir.path(), "other-key.pem", &other_key);
        let e = error(args(Some(&c), Some(&other)));
        assert!(e.contains("cert.pem") && e.contains("other-key.pem"), "{e}");
    }
}
