//! Harness for Medley's end-to-end tests: builds the real binaries once, starts `medley serve`
//! on free loopback ports with its own shard sockets, waits until it is healthy, and stops the
//! whole process tree when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod affinity;
mod bins;
pub mod prom;
pub mod real_model;

use bins::bin_dir;
pub use bins::binaries;

/// The workspace root: the parent of this package's directory as cargo gives it to the test
/// process at run time, else as it was when this crate was compiled.
///
/// Run time first: checkouts that share a target directory (a CI clone built into the
/// developer's) also share this crate's compiled tests, since cargo's artifact names and
/// freshness do not depend on the checkout's path; a test compiled in another checkout would
/// otherwise build that checkout's binaries into the shared directory (see [`binaries`]) and
/// read its fixtures.
pub fn workspace_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.join("Cargo.toml").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The committed tiny model fixture.
pub fn tiny_model_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/tiny-llama")
}

/// A copy of the tiny model, in a temporary directory (removed on drop), whose
/// `tokenizer_config.json` also carries the `chat_template` of the router's fixture
/// `router/tests/fixtures/chat_templates/{template}.json` (e.g. `mistral`: plain text plus the
/// `<s>`/`</s>` the tiny tokenizer has).
pub fn tiny_model_with_chat_template(template: &str) -> anyhow::Result<tempfile::TempDir> {
    let fixture = workspace_root().join(format!(
        "router/tests/fixtures/chat_templates/{template}.json"
    ));
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&fixture).with_context(|| fixture.display().to_string())?,
    )?;
    let chat_template = fixture
        .get("chat_template")
        .context("the template fixture has no `chat_template`")?
        .clone();
    let dir = tempfile::tempdir()?;
    for entry in std::fs::read_dir(tiny_model_dir())? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.path().join(entry.file_name()))?;
    }
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    config
        .as_object_mut()
        .context("tokenizer_config.json is not an object")?
        .insert("chat_template".into(), chat_template);
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;
    Ok(dir)
}

/// The committed PEFT adapter fixtures.
pub fn fixture_adapters() -> PathBuf {
    workspace_root().join("tests/fixtures/adapters")
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Options for [`Server::start`].
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Model directory (`None` = the embedded default).
    pub model: Option<PathBuf>,
    /// Extra flags for `medley serve`.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Serve TLS with this certificate and key: they are written to the server's directory and
    /// passed as `--tls-cert-file`/`--tls-key-file`; [`Server::http`] and [`Server::grpc`] are
    /// then `https://` URLs and the harness's clients trust the certificate.
    pub tls: Option<TlsPem>,
    /// Send the launcher's stdout and stderr (the shards' output included: the launcher
    /// forwards it) to this file instead of the test's output.
    pub log_file: Option<PathBuf>,
}

/// A certificate (chain) and its private key, PEM.
#[derive(Debug, Clone)]
pub struct TlsPem {
    /// The certificate; the harness's clients trust it as a root.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

/// A running `medley serve` process tree.
pub struct Server {
    child: Option<Child>,
    /// HTTP base URL, e.g. `http://127.0.0.1:1234`.
    pub http: String,
    /// gRPC endpoint URL.
    pub grpc: String,
    /// HTTP port.
    pub port: u16,
    /// Private directory (shard sockets, cache).
    pub dir: tempfile::TempDir,
    /// HTTP client for [`Server::http`] (trusting the certificate of [`ServerOptions::tls`]).
    pub client: reqwest::Client,
    /// The certificate of [`ServerOptions::tls`], PEM.
    tls_cert: Option<String>,
}

impl Server {
    /// Starts `medley serve` and waits (up to 120 s) until `/health` answers 200.
    pub async fn start(opts: ServerOptions) -> anyhow::Result<Self> {
        let bins = binaries()?;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let grpc_port = free_port()?;
        let mut cmd = Command::new(bins.join("medley"));
        cmd.arg("serve")
            .args(["--hostname", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(["--grpc-port", &grpc_port.to_string()])
            .arg("--shard-uds-path")
            .arg(dir.path().join("shard"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .env("HF_HUB_OFFLINE", "1")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        if let Some(m) = &opts.model {
            cmd.arg("--model").arg(m);
        }
        cmd.args(&opts.args);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut client = reqwest::Client::builder();
        let scheme = match &opts.tls {
            Some(tls) => {
                let (cert, key) = (
                    dir.path().join("tls-cert.pem"),
                    dir.path().join("tls-key.pem"),
                );
                std::fs::write(&cert, &tls.cert)?;
                std::fs::write(&key, &tls.key)?;
                cmd.arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key);
                client = client
                    .add_root_certificate(reqwest::Certificate::from_pem(tls.cert.as_bytes())?);
                "https"
            }
            None => "http",
        };
        if let Some(path) = &opts.log_file {
            let log = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            cmd.stdout(log.try_clone()?).stderr(log);
        }
        let child = cmd.spawn().context("spawning medley serve")?;
        let mut server = Self {
            child: Some(child),
            http: format!("{scheme}://127.0.0.1:{port}"),
            grpc: format!("{scheme}://127.0.0.1:{grpc_port}"),
            port,
            dir,
            client: client.build()?,
            tls_cert: opts.tls.map(|t| t.cert),
        };
        server.wait_healthy(Duration::from_secs(120)).await?;
        Ok(server)
    }

    /// Starts `medley serve` on the tiny model with `root` as its adapter root (prompts up to
    /// 128 tokens, 256 in all).
    pub async fn with_adapter_root(root: &Path) -> anyhow::Result<Self> {
        Self::with_adapter_root_and_shards(root, 1).await
    }

    /// [`Server::with_adapter_root`] split over `num_shard` tensor-parallel ranks.
    pub async fn with_adapter_root_and_shards(root: &Path, num_shard: u32) -> anyhow::Result<Self> {
        Self::start(ServerOptions {
            model: Some(tiny_model_dir()),
            args: vec![
                "--adapter-root".into(),
                root.display().to_string(),
                "--max-input-length".into(),
                "128".into(),
                "--max-total-tokens".into(),
                "256".into(),
                "--num-shard".into(),
                num_shard.to_string(),
            ],
            ..Default::default()
        })
        .await
    }

    /// Socket of the shard of `rank` (the router's internal gRPC endpoint).
    pub fn shard_socket(&self, rank: usize) -> PathBuf {
        self.dir.path().join(format!("shard-{rank}"))
    }

    /// A gRPC channel to [`Server::grpc`] (over TLS, trusting the certificate, when the server
    /// has one).
    pub async fn grpc_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let mut endpoint = tonic::transport::Channel::from_shared(self.grpc.clone())?;
        if let Some(cert) = &self.tls_cert {
            endpoint = endpoint.tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(cert))
                    .domain_name("localhost"),
            )?;
        }
        Ok(endpoint.connect().await?)
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = self.client.clone();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("medley serve exited before becoming healthy: {status}");
            }
            if let Ok(r) = client.get(format!("{}/health", self.http)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("medley serve not healthy after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends SIGTERM and waits for the process tree to exit; returns the exit status.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("already stopped");
        };
        terminate(&child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("medley serve did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Process id of the launcher.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Process id of the running shard of `rank` (found by its socket on its command line in
    /// `/proc`), if there is one.
    pub fn shard_pid(&self, rank: usize) -> Option<u32> {
        let socket = self.shard_socket(rank);
        let socket = socket.to_str()?;
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .find_map(|entry| {
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                args.windows(2)
                    .any(|w| w[0] == b"--uds-path" && w[1] == socket.as_bytes())
                    .then_some(pid)
            })
    }
}

/// Sends SIGTERM to the launcher (it forwards shutdown to its shards).
pub fn terminate(child: &Child) {
    // SAFETY: kill(2) on a pid this process spawned, with a valid signal number.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// A JSON response: status code and parsed body (`Value::Null` when the body is not JSON).
#[derive(Debug)]
pub struct JsonResponse {
    /// HTTP status.
    pub status: u16,
    /// Parsed body.
    pub body: serde_json::Value,
}

impl Server {
    /// POSTs a JSON value to `path`.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<JsonResponse> {
        self.post_raw(path, "application/json", body.to_string())
            .await
    }

    /// POSTs raw bytes with a content type (for malformed-body tests).
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: String,
    ) -> anyhow::Result<JsonResponse> {
        let r = self
            .client
            .post(format!("{}{path}", self.http))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok(JsonResponse {
            status,
            body: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        })
    }

    /// The token ids `POST /tokenize` gives for `text`.
    pub async fn tokenize_ids(&self, text: &str) -> anyhow::Result<Vec<u64>> {
        let r = self
            .post("/tokenize", &serde_json::json!({"inputs": text}))
            .await?;
        r.body
            .as_array()
            .with_context(|| format!("/tokenize answered {}", r.body))?
            .iter()
            .map(|t| t["id"].as_u64().with_context(|| format!("no id in {t}")))
            .collect()
    }

    /// GETs `path` and returns status and text.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let r = self
            .client
            .get(format!("{}{path}", self.http))
            .send()
            .await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    /// DELETEs `path` and returns status and text.
    pub async fn delete(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let r = self
            .client
            .delete(format!("{}{path}", self.http))
            .send()
            .await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    /// POSTs to an SSE route and collects every `data:` event until the stream ends.
    pub async fn sse(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        use futures::StreamExt;
        let r = self
            .client
            .post(format!("{}{path}", self.http))
            .json(body)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "status {}", r.status());
        let mut stream = r.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk?));
        }
        Ok(parse_sse(&buf))
    }

    /// Current value of a Prometheus metric (sum over label sets), if exported.
    pub async fn metric(&self, name: &str) -> anyhow::Result<Option<f64>> {
        self.metric_where(name, |_| true).await
    }

    /// Current value of a Prometheus metric with exactly the label set `labels` (as written
    /// between the braces, e.g. `method="decode"`), if exported.
    pub async fn metric_labeled(&self, name: &str, labels: &str) -> anyhow::Result<Option<f64>> {
        let want = format!("{{{labels}}}");
        self.metric_where(name, |l| l == want).await
    }

    /// Sum of the samples of metric `name` whose label part (`{...}`, or empty) passes `keep`.
    async fn metric_where(
        &self,
        name: &str,
        keep: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Option<f64>> {
        let (_, text) = self.get("/metrics").await?;
        let mut found = None;
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (metric, labels) = key.split_at(key.find('{').unwrap_or(key.len()));
            if metric == name && keep(labels) {
                *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        Ok(found)
    }
}

/// The generated token ids of a `/generate` reply with `details: true`.
pub fn token_ids(reply: &serde_json::Value) -> Vec<u64> {
    reply["details"]["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens in {reply}"))
        .iter()
        .map(|t| {
            t["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("a token without an id in {reply}"))
        })
        .collect()
}

/// Parses the `data:` lines of a server-sent-events body.
pub fn parse_sse(body: &str) -> Vec<serde_json::Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str(d.trim()).ok())
        .collect()
}

/// A Python interpreter with the test requirements (`tests/python/requirements.txt`:
/// `lorax-client`, `openai`, `grpcio-reflection`) installed: `$MEDLEY_PYTHON` when set (CI),
/// else a venv created once under the target directory.
pub fn python_with_lorax_client() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("MEDLEY_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let venv = VENV.get_or_init(|| {
        let target = bin_dir()
            .map_err(|e| e.to_string())?
            .parent()
            .map(Path::to_path_buf)
            .ok_or("no target dir")?;
        let venv = target.join("medley-pyenv");
        let python = venv.join("bin/python");
        if !python.exists() {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .map_err(|e| format!("python3 -m venv: {e}"))?;
            if !ok.success() {
                return Err("python3 -m venv failed".into());
            }
        }
        let req = workspace_root().join("tests/python/requirements.txt");
        let ok = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(req)
            .status()
            .map_err(|e| format!("pip install: {e}"))?;
        if !ok.success() {
            return Err(
                "pip install -r tests/python/requirements.txt failed (is PyPI reachable?)".into(),
            );
        }
        Ok(python)
    });
    match venv {
        Ok(p) => Ok(p.clone()),
        Err(e) => bail!("{e}"),
    }
}
