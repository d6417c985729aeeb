//! Who may call the server: optional API keys (`Authorization: Bearer <key>`) checked on every
//! HTTP route but health (and `/metrics`, unless `--metrics-require-key`) and on the gRPC
//! generation and merge services (the health and reflection services stay open), and the
//! largest request body.
//!
//! Keys come from `--api-key` (`MEDLEY_API_KEY`, comma-separated for several) and
//! `--api-key-file` (one key per line, `#` comments); any of them is accepted. Keys are compared
//! in constant time and never logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::ConfigError;

/// Default of `--max-request-bytes`: 2 MiB, TGI's and LoRAX's payload limit.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 2 << 20;

/// The access flags (part of [`crate::config::RouterArgs`]).
#[derive(Debug, Clone, clap::Args)]
pub struct AccessArgs {
    /// API key clients must send as `Authorization: Bearer <key>` (repeat the flag or separate
    /// with commas for several). Without keys the server is open.
    #[arg(
        long = "api-key",
        env = "MEDLEY_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// File of API keys, one per line (blank lines and `#` comments ignored).
    #[arg(long, env = "MEDLEY_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Ask for the API key on `/metrics` too (open by default, for Prometheus scrapers).
    #[arg(long, env = "METRICS_REQUIRE_KEY")]
    pub metrics_require_key: bool,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// Turn the management routes off: `/v1/adapters*` and `/v1/merges*` answer 404, and the
    /// gRPC `AdapterService` and `MergeService` are not served (UNIMPLEMENTED).
    #[arg(long, env = "MEDLEY_DISABLE_ADMIN")]
    pub disable_admin: bool,
    /// Key(s) of the management routes: with them, those routes take only these keys (not
    /// `--api-key`'s); without, they take the API keys like every route.
    #[arg(
        long = "admin-api-key",
        env = "MEDLEY_ADMIN_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_api_keys: Vec<String>,
}

/// The access rules the fronts enforce.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// The accepted keys; `None` leaves the server open.
    pub keys: Option<Arc<ApiKeys>>,
    /// Whether `/metrics` needs a key too.
    pub metrics_require_key: bool,
    /// Largest request body in bytes.
    pub max_request_bytes: usize,
    /// Whether the management routes are served.
    pub admin_enabled: bool,
    /// Keys of the management routes in place of `keys` (`None`: `keys` apply).
    pub admin_keys: Option<Arc<ApiKeys>>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            keys: None,
            metrics_require_key: false,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            admin_enabled: true,
            admin_keys: None,
        }
    }
}

impl AccessConfig {
    /// The keys the management routes take (`None`: open).
    pub fn admin_keys(&self) -> Option<Arc<ApiKeys>> {
        self.admin_keys.clone().or_else(|| self.keys.clone())
    }
}

/// Whether an HTTP path is a management route (adapters and named merges).
pub fn is_admin_path(path: &str) -> bool {
    ["/v1/adapters", "/v1/merges"].iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

impl AccessArgs {
    /// The rules, with the key file read.
    pub fn into_config(self) -> Result<AccessConfig, ConfigError> {
        let mut keys = clean_keys(&self.api_keys);
        let admin_keys = clean_keys(&self.admin_api_keys);
        if let Some(path) = &self.api_key_file {
            keys.extend(read_key_file(path)?);
        }
        if self.max_request_bytes == 0 {
            return Err(ConfigError::Invalid(
                "--max-request-bytes must be positive".into(),
            ));
        }
        if self.disable_admin && !admin_keys.is_empty() {
            return Err(ConfigError::Invalid(
                "--admin-api-key has no use with --disable-admin".into(),
            ));
        }
        Ok(AccessConfig {
            keys: ApiKeys::new(keys),
            metrics_require_key: self.metrics_require_key,
            max_request_bytes: self.max_request_bytes,
            admin_enabled: !self.disable_admin,
            admin_keys: ApiKeys::new(admin_keys),
        })
    }
}

/// Keys given on the command line, trimmed, empty ones dropped.
fn clean_keys(keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect()
}

fn read_key_file(path: &Path) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Invalid(format!("--api-key-file {}: {e}", path.display())))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "--api-key-file {} holds no key",
            path.display()
        )));
    }
    Ok(keys)
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` credential.
    #[error("this server requires an API key: send `Authorization: Bearer <key>`")]
    Missing,
    /// A credential that is not one of the keys.
    #[error("invalid API key")]
    Invalid,
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        tonic::Status::unauthenticated(e.to_string())
    }
}

/// The accepted keys.
pub struct ApiKeys {
    keys: Vec<String>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

impl ApiKeys {
    /// The keys, or `None` when there are none.
    fn new(keys: Vec<String>) -> Option<Arc<Self>> {
        (!keys.is_empty()).then(|| Arc::new(Self { keys }))
    }

    /// Checks an `Authorization` header value.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        let presented = authorization
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        // Every key is compared (no early exit), each in constant time.
        let matched = self.keys.iter().fold(false, |found, k| {
            found | constant_time_eq(k.as_bytes(), presented.as_bytes())
        });
        if matched {
            Ok(())
        } else {
            Err(AuthError::Invalid)
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The tonic interceptor of the protected gRPC services: passes everything when no keys are
/// set.
#[derive(Debug, Clone)]
pub struct GrpcAuth {
    keys: Option<Arc<ApiKeys>>,
}

impl GrpcAuth {
    /// An interceptor checking `keys`.
    pub fn new(keys: Option<Arc<ApiKeys>>) -> Self {
        Self { keys }
    }
}

impl tonic::service::Interceptor for GrpcAuth {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(keys) = &self.keys {
            let header = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            keys.check(header)?;
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> ApiKeys {
        ApiKeys {
            keys: k.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn bearer_keys_are_checked() {
        let k = keys(&["alpha", "beta-2"]);
        assert_eq!(k.check(Some("Bearer alpha")), Ok(()));
        assert_eq!(k.check(Some("bearer   beta-2 ")), Ok(()));
        assert_eq!(k.check(Some("Bearer alph")), Err(AuthError::Invalid));
        assert_eq!(k.check(Some("Bearer alphaa")), Err(AuthError::Invalid));
        assert_eq!(k.check(Some("Basic alpha")), Err(AuthError::Missing));
        assert_eq!(k.check(Some("Bearer ")), Err(AuthError::Missing));
        assert_eq!(k.check(Some("alpha")), Err(AuthError::Missing));
        assert_eq!(k.check(None), Err(AuthError::Missing));
    }

    #[test]
    fn keys_come_from_flags_and_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("keys");
        std::fs::write(&file, "# operators\nfile-key\n\n").expect("write");
        let args = AccessArgs {
            api_keys: vec![" flag-key ".into(), String::new()],
            api_key_file: Some(file.clone()),
            metrics_require_key: false,
            max_request_bytes: 10,
            disable_admin: false,
            admin_api_keys: vec![],
        };
        let c = args.clone().into_config().expect("config");
        let k = c.keys.expect("keys");
        assert_eq!(k.check(Some("Bearer flag-key")), Ok(()));
        assert_eq!(k.check(Some("Bearer file-key")), Ok(()));
        assert_eq!(format!("{k:?}"), "ApiKeys(2 keys)");
        let open = AccessArgs {
            api_keys: vec![],
            api_key_file: None,
            ..args.clone()
        };
        assert!(open.into_config().expect("open").keys.is_none());
        std::fs::write(&file, "# nothing\n").expect("write");
        assert!(args.clone().into_config().is_err());
        let zero = AccessArgs {
            api_key_file: None,
            max_request_bytes: 0,
            ..args
        };
        assert!(zero.into_config().is_err());
    }
}
