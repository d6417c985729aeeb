//! `S3` adapters: `s3://bucket/prefix`, where the prefix is the "directory" holding
//! `adapter_config.json` and `adapter_model.safetensors`, fetched with `object_store`'s S3 client
//! into a local cache.
//!
//! * **Credentials** come from the shard's environment (the launcher passes its own through):
//!   `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`; the region
//!   from `AWS_REGION` (or `AWS_DEFAULT_REGION`, default `us-east-1`); an S3-compatible server
//!   from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, addressed path-style. Only static keys are
//!   used: no profile files, no instance metadata.
//! * **Cache**: `$MEDLEY_S3_CACHE`, else `$XDG_CACHE_HOME/medley/s3`, else `~/.cache/medley/s3`.
//!   Each resolve lists the prefix (one request) to learn the objects' ETags; the files live in
//!   `<cache>/<bucket>/<digest of the prefix>/<digest of bucket, prefix and ETags>/`, so a second
//!   load downloads nothing while an object changed on the server (new ETag) is fetched again.
//!   Downloads go to a temporary directory inside the cache (`.download-*`, each object fetched
//!   with `If-Match` on the listed ETag) and are renamed into place whole: a failed or partial
//!   download leaves nothing behind.
//! * **Errors**: a missing bucket or object is `NotFound` (404); credentials S3 refuses
//!   (`InvalidAccessKeyId`, `SignatureDoesNotMatch`, `AccessDenied`, any 401/403) are
//!   `PermissionDenied` (403); missing credentials and other S3 failures are `S3` (424), with a
//!   message that says what to set or what S3 answered. Secrets never appear in messages or logs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medley_hub::model_dir::check_repo_dir;
use medley_spec::S3Location;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

use super::AdapterError;
use super::source::ADAPTER_LAYOUT;

/// The variables S3 adapters read (for messages).
pub const CREDENTIAL_VARS: &str = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary credentials; AWS_REGION, and AWS_ENDPOINT_URL for an S3-compatible server)";

/// Name of the file describing a cached adapter (bucket, prefix, ETags) for people.
pub const SOURCE_FILE: &str = "medley-s3-source.json";

/// Prefix of the temporary directories downloads go to.
const PARTIAL_PREFIX: &str = ".download-";

/// S3 access and cache location, from the environment.
#[derive(Clone, Default)]
pub struct S3Settings {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    /// The region requests are signed for.
    pub region: String,
    /// An S3-compatible server (path-style addressing); `None` for AWS.
    pub endpoint: Option<String>,
    /// Where downloaded adapters are kept; `None` when no location could be derived.
    pub cache_dir: Option<PathBuf>,
    /// Timeout of one request (downloads included).
    pub request_timeout: Duration,
    /// Retries of failed requests (5xx, connection errors).
    pub max_retries: usize,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Settings")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("session_token", &redacted(&self.session_token))
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

impl S3Settings {
    /// The settings of the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The settings of `get` (a variable lookup; empty values count as unset).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let cache_dir = var("MEDLEY_S3_CACHE").map(PathBuf::from).or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
                .map(|c| c.join("medley").join("s3"))
        });
        Self {
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            endpoint: var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL")),
            cache_dir,
            request_timeout: Duration::from_secs(300),
            max_retries: 3,
        }
    }

    /// The static credentials, or the message saying what to set.
    fn credentials(&self) -> Result<(&str, &str), String> {
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(key), Some(secret)) => Ok((key, secret)),
            (Some(_), None) => Err(format!(
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: S3 adapters need {CREDENTIAL_VARS} in the environment of the server"
            )),
            (None, Some(_)) => Err(format!(
                "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: S3 adapters need {CREDENTIAL_VARS} in the environment of the server"
            )),
            (None, None) => Err(format!(
                "no S3 credentials: set {CREDENTIAL_VARS} in the environment of the server"
            )),
        }
    }
}

/// One object of an adapter as the server lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteObject {
    /// The file name (`adapter_config.json`, ...).
    pub name: String,
    /// The object's ETag (quotes included, as S3 sends it); `None` when the server sends none.
    pub etag: Option<String>,
    /// Bytes.
    pub size: u64,
    /// Last modification (RFC 3339), the identity when there is no ETag.
    pub last_modified: String,
}

impl RemoteObject {
    fn from_meta(name: &str, meta: &ObjectMeta) -> Self {
        Self {
            name: name.to_string(),
            etag: meta.e_tag.clone(),
            size: meta.size,
            last_modified: meta.last_modified.to_rfc3339(),
        }
    }
}

/// The cache directory of one version of an adapter:
/// `<root>/<bucket>/<digest of the prefix>/<digest of bucket, prefix and the objects' ETags>`.
pub fn cache_dir(root: &Path, loc: &S3Location, objects: &[RemoteObject]) -> PathBuf {
    let mut version = Sha256::new();
    for part in [loc.bucket.as_str(), loc.prefix.as_str()] {
        version.update((part.len() as u64).to_le_bytes());
        version.update(part.as_bytes());
    }
    for o in objects {
        let identity = match &o.etag {
            Some(etag) => format!("etag:{etag}"),
            None => format!("size:{}:modified:{}", o.size, o.last_modified),
        };
        for part in [o.name.as_str(), identity.as_str()] {
            version.update((part.len() as u64).to_le_bytes());
            version.update(part.as_bytes());
        }
    }
    let prefix = Sha256::digest(loc.prefix.as_bytes());
    root.join(&loc.bucket)
        .join(hex::encode(&prefix[..12]))
        .join(hex::encode(&version.finalize()[..16]))
}

/// Resolves `S3` adapter ids to cached directories.
pub struct S3Adapters {
    settings: S3Settings,
    /// One client per bucket (connection pools are reused across loads).
    stores: Mutex<HashMap<String, Arc<AmazonS3>>>,
}

impl std::fmt::Debug for S3Adapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Adapters")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl S3Adapters {
    /// A resolver with `settings`.
    pub fn new(settings: S3Settings) -> Self {
        Self {
            settings,
            stores: Mutex::new(HashMap::new()),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &S3Settings {
        &self.settings
    }

    /// The cache directory of the adapter `id`, downloaded first unless the cache holds the
    /// version the server lists.
    pub async fn resolve(&self, id: &str) -> Result<PathBuf, AdapterError> {
        let loc = S3Location::parse(id)?;
        let Some(root) = self.settings.cache_dir.clone() else {
            return Err(AdapterError::S3 {
                id: id.to_string(),
                detail:
                    "cannot locate a cache directory for S3 adapters: set MEDLEY_S3_CACHE (or HOME)"
                        .into(),
            });
        };
        let store = self.store(id, &loc.bucket)?;
        let objects = self.stat(&store, id, &loc).await?;
        let dir = cache_dir(&root, &loc, &objects);
        if check_repo_dir(&dir, &ADAPTER_LAYOUT).is_ok() {
            tracing::debug!(id, dir = %dir.display(), "S3 adapter found in the cache");
            return Ok(dir);
        }
        let bytes: u64 = objects.iter().map(|o| o.size).sum();
        tracing::info!(id, bytes, dir = %dir.display(), "downloading the S3 adapter");
        download(store.as_ref(), id, &loc, &objects, &root, &dir).await?;
        Ok(dir)
    }

    /// The client of `bucket` (built once).
    fn store(&self, id: &str, bucket: &str) -> Result<Arc<AmazonS3>, AdapterError> {
        let mut stores = self
            .stores
            .lock()
            .map_err(|_| AdapterError::Internal("S3 client table poisoned".into()))?;
        if let Some(s) = stores.get(bucket) {
            return Ok(s.clone());
        }
        let s = &self.settings;
        let (key, secret) = s.credentials().map_err(|detail| AdapterError::S3 {
            id: id.to_string(),
            detail,
        })?;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&s.region)
            .with_access_key_id(key)
            .with_secret_access_key(secret)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: s.max_retries,
                retry_timeout: Duration::from_secs(60),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(s.request_timeout)
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_allow_http(
                        s.endpoint
                            .as_deref()
                            .is_some_and(|e| e.starts_with("http://")),
                    ),
            );
        if let Some(token) = &s.session_token {
            builder = builder.with_token(token);
        }
        builder = match &s.endpoint {
            // S3-compatible servers: path-style (`endpoint/bucket/key`).
            Some(endpoint) => builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false),
            // AWS: virtual-hosted style, except for bucket names with dots (TLS wildcards).
            None => builder.with_virtual_hosted_style_request(!bucket.contains('.')),
        };
        let store = Arc::new(builder.build().map_err(|e| AdapterError::S3 {
            id: id.to_string(),
            detail: format!("S3 client for bucket {bucket}: {e}"),
        })?);
        stores.insert(bucket.to_string(), store.clone());
        Ok(store)
    }

    /// The adapter's objects as the server has them now: one LIST of the prefix; HEAD per
    /// file when listing is not allowed (a principal that may only `GetObject`).
    async fn stat(
        &self,
        store: &AmazonS3,
        id: &str,
        loc: &S3Location,
    ) -> Result<Vec<RemoteObject>, AdapterError> {
        let prefix = ObjectPath::parse(&loc.prefix)
            .map_err(|e| AdapterError::Invalid(format!("S3 adapter id {id}: {e}")))?;
        let listed = match store.list_with_delimiter(Some(&prefix)).await {
            Ok(listed) => listed,
            Err(e) => {
                let failure = S3Failure::of(&e);
                if failure.code.as_deref() != Some("AccessDenied") {
                    return Err(failure.into_error(id, loc, None));
                }
                tracing::debug!(id, "listing the S3 prefix is denied: HEAD per file");
                let mut objects = Vec::with_capacity(ADAPTER_LAYOUT.required.len());
                for name in ADAPTER_LAYOUT.required {
                    let meta = store
                        .head(&object_path(loc, name)?)
                        .await
                        .map_err(|e| S3Failure::of(&e).into_error(id, loc, Some(name)))?;
                    objects.push(RemoteObject::from_meta(name, &meta));
                }
                return Ok(objects);
            }
        };
        let mut objects = Vec::with_capacity(ADAPTER_LAYOUT.required.len());
        for name in ADAPTER_LAYOUT.required {
            let want = object_path(loc, name)?;
            match listed.objects.iter().find(|m| m.location == want) {
                Some(meta) => objects.push(RemoteObject::from_meta(name, meta)),
                None => {
                    let mut present: Vec<String> = listed
                        .objects
                        .iter()
                        .filter_map(|m| m.location.filename().map(str::to_string))
                        .chain(
                            listed
                                .common_prefixes
                                .iter()
                                .filter_map(|p| p.filename().map(|f| format!("{f}/"))),
                        )
                        .collect();
                    present.truncate(20);
                    let detail = if present.is_empty() {
                        format!("no object under {loc}/ (bucket {})", loc.bucket)
                    } else {
                        format!(
                            "{loc}/ has no {name} (it holds {}); an adapter prefix holds adapter_config.json and adapter_model.safetensors",
                            present.join(", ")
                        )
                    };
                    return Err(AdapterError::NotFound {
                        id: id.to_string(),
                        detail,
                    });
                }
            }
        }
        Ok(objects)
    }
}

/// The object path of `name` under the adapter's prefix.
fn object_path(loc: &S3Location, name: &str) -> Result<ObjectPath, AdapterError> {
    ObjectPath::parse(loc.key(name))
        .map_err(|e| AdapterError::Invalid(format!("S3 adapter id {loc}: {e}")))
}

/// Downloads `objects` into a temporary directory under `root` and renames it to `dir`.
async fn download(
    store: &AmazonS3,
    id: &str,
    loc: &S3Location,
    objects: &[RemoteObject],
    root: &Path,
    dir: &Path,
) -> Result<(), AdapterError> {
    let io = |what: &str, path: &Path, e: std::io::Error| {
        AdapterError::Internal(format!("S3 adapter {id}: {what} {}: {e}", path.display()))
    };
    std::fs::create_dir_all(root).map_err(|e| io("creating", root, e))?;
    // Removed on drop: every early return below leaves nothing in the cache.
    let partial = tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .tempdir_in(root)
        .map_err(|e| io("creating a temporary directory in", root, e))?;
    for o in objects {
        let path = partial.path().join(&o.name);
        let options = GetOptions {
            if_match: o.etag.clone(),
            ..Default::default()
        };
        let got = store
            .get_opts(&object_path(loc, &o.name)?, options)
            .await
            .map_err(|e| S3Failure::of(&e).into_error(id, loc, Some(&o.name)))?;
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| io("creating", &path, e))?;
        let mut stream = got.into_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| S3Failure::of(&e).into_error(id, loc, Some(&o.name)))?;
            file.write_all(&chunk)
                .await
                .map_err(|e| io("writing", &path, e))?;
            written += chunk.len() as u64;
        }
        file.sync_all().await.map_err(|e| io("writing", &path, e))?;
        if written != o.size {
            return Err(AdapterError::S3 {
                id: id.to_string(),
                detail: format!(
                    "{loc}/{}: the download has {written} bytes, the listing said {}",
                    o.name, o.size
                ),
            });
        }
    }
    let meta = serde_json::json!({
        "id": loc.to_string(),
        "bucket": loc.bucket,
        "prefix": loc.prefix,
        "objects": objects.iter().map(|o| serde_json::json!({
            "name": o.name, "etag": o.etag, "size": o.size, "last_modified": o.last_modified,
        })).collect::<Vec<_>>(),
    });
    let meta_path = partial.path().join(SOURCE_FILE);
    std::fs::write(&meta_path, format!("{meta:#}\n")).map_err(|e| io("writing", &meta_path, e))?;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("creating", parent, e))?;
    }
    match std::fs::rename(partial.path(), dir) {
        Ok(()) => {
            // Renamed away: nothing left for the guard to remove.
            let _ = partial.keep();
            Ok(())
        }
        // Another load (or rank) of the same version finished first: keep its copy.
        Err(_) if check_repo_dir(dir, &ADAPTER_LAYOUT).is_ok() => Ok(()),
        Err(e) => Err(io("renaming the download to", dir, e)),
    }
}

/// What S3 answered, from an `object_store` error (whose status and body only show in its
/// message for listings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Failure {
    /// The HTTP status, when known.
    pub status: Option<u16>,
    /// S3's error `Code` (`NoSuchBucket`, `InvalidAccessKeyId`, ...).
    pub code: Option<String>,
    /// S3's error `Message`.
    pub message: Option<String>,
    /// The whole error text (for failures without an S3 error body).
    pub text: String,
}

/// Error codes that mean the credentials were refused.
const DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
];

impl S3Failure {
    /// Reads an `object_store` error.
    pub fn of(e: &object_store::Error) -> Self {
        let text = e.to_string();
        let status = match e {
            object_store::Error::NotFound { .. } => Some(404),
            object_store::Error::PermissionDenied { .. } => Some(403),
            object_store::Error::Unauthenticated { .. } => Some(401),
            object_store::Error::Precondition { .. } => Some(412),
            _ => status_in(&text),
        };
        Self {
            status,
            code: xml_field(&text, "Code"),
            message: xml_field(&text, "Message"),
            text,
        }
    }

    /// The adapter error: not found, permission denied, or another S3 failure. `object` is the
    /// file the request was for (`None` for the listing).
    pub fn into_error(self, id: &str, loc: &S3Location, object: Option<&str>) -> AdapterError {
        let what = match object {
            Some(name) => format!("{loc}/{name}"),
            None => format!("{loc}/"),
        };
        let answer = match (&self.code, &self.message) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.clone(),
            _ => match self.status {
                Some(status) => format!("HTTP {status}"),
                None => truncate(&self.text, 300),
            },
        };
        let id = id.to_string();
        let code = self.code.as_deref();
        if code == Some("NoSuchBucket") {
            return AdapterError::NotFound {
                id,
                detail: format!("bucket {} does not exist ({answer})", loc.bucket),
            };
        }
        if self.status == Some(404) || code == Some("NoSuchKey") {
            return AdapterError::NotFound {
                id,
                detail: format!("no object {what} ({answer})"),
            };
        }
        if matches!(self.status, Some(401 | 403)) || code.is_some_and(|c| DENIED_CODES.contains(&c))
        {
            let hint = match code {
                Some("InvalidAccessKeyId") => "the server's AWS_ACCESS_KEY_ID is not known to S3",
                Some("SignatureDoesNotMatch") => {
                    "the server's AWS_SECRET_ACCESS_KEY does not match its AWS_ACCESS_KEY_ID"
                }
                Some("InvalidToken" | "ExpiredToken" | "TokenRefreshRequired") => {
                    "the server's AWS_SESSION_TOKEN is invalid or expired"
                }
                _ => "the server's credentials may not read this bucket or prefix",
            };
            return AdapterError::PermissionDenied {
                id,
                detail: format!("S3 refused to read {what} ({answer}): {hint}"),
            };
        }
        let hint = match code {
            Some("PermanentRedirect" | "AuthorizationHeaderMalformed") => {
                "; set AWS_REGION to the bucket's region"
            }
            _ => "",
        };
        AdapterError::S3 {
            id,
            detail: format!("reading {what} from S3 failed: {answer}{hint}"),
        }
    }
}

/// The HTTP status in `object_store`'s message (`... status code: 404 Not Found: ...`).
fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// The text of the first `<field>` element of an XML error body inside `text`.
fn xml_field(text: &str, field: &str) -> Option<String> {
    let open = format!("<{field}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&format!("</{field}>"))? + start;
    let value = text[start..end].trim();
    (!value.is_empty()).then(|| truncate(value, 300))
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

#[cfg(test)]
#[path = "s3_tests.rs"]
mod tests;
