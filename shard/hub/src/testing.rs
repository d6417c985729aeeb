//! Helpers for tests of hub-cache consumers (here, in the shard and in the launcher): a fake
//! cache layout ([`fake_cache`]), a fake hub server on loopback ([`fake_hub`]) and the
//! loopback server under it ([`serve_loopback`]).

use std::path::{Path, PathBuf};

/// The commit id `fake_cache` names its snapshot after (and the fake hub answers with).
pub const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// Builds `models--org--name/snapshots/{SHA}/` (filled by `fill`) + `refs/{revision}` under
/// `cache`; returns the snapshot dir.
pub fn fake_cache(
    cache: &Path,
    repo_id: &str,
    revision: &str,
    fill: impl FnOnce(&Path),
) -> PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(SHA);
    fill(&snapshot);
    let ref_path = repo_dir.join("refs").join(revision);
    std::fs::create_dir_all(ref_path.parent().expect("parent")).expect("mkdir refs");
    std::fs::write(ref_path, format!("{SHA}\n")).expect("ref");
    snapshot
}

/// Serves `app` on a free loopback port from a background task; returns its `http://` URL.
pub async fn serve_loopback(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// A minimal hub: the repo listing API and `resolve/` with HTTP ranges, ETag and
/// `X-Repo-Commit`, like huggingface.co. Records every request, every file fetched and the
/// `Authorization` header. Every repository and revision it is asked for holds `Hub::files`
/// at commit [`SHA`].
pub mod fake_hub {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use sha2::{Digest, Sha256};

    use super::SHA;

    /// The repository the fake hub serves, and what it saw.
    #[derive(Default)]
    pub struct Hub {
        /// File name (may contain `/`) → contents.
        pub files: BTreeMap<String, Vec<u8>>,
        /// Files fetched through `resolve/` with a body (not the 1-byte metadata probe).
        pub fetched: Mutex<Vec<String>>,
        /// Every request, as `listing {org}/{name}@{rev}` or `resolve {org}/{name}@{rev}/{file}`.
        pub requests: Mutex<Vec<String>>,
        /// The `Authorization` header of the last listing.
        pub auth: Mutex<Option<String>>,
        /// Answer the listing with 404 (an unknown repository).
        pub unknown: bool,
    }

    impl Hub {
        /// A hub holding `files` (name, contents).
        pub fn with_files<'a>(files: impl IntoIterator<Item = (&'a str, Vec<u8>)>) -> Self {
            Self {
                files: files.into_iter().map(|(n, b)| (n.to_string(), b)).collect(),
                ..Self::default()
            }
        }

        /// How many requests it has answered.
        pub fn request_count(&self) -> usize {
            self.requests.lock().expect("lock").len()
        }

        /// The files fetched with a body, sorted and deduplicated.
        pub fn fetched_files(&self) -> Vec<String> {
            let mut fetched = self.fetched.lock().expect("lock").clone();
            fetched.sort();
            fetched.dedup();
            fetched
        }
    }

    /// Serves `hub` on a free loopback port; returns the endpoint URL.
    pub async fn serve(hub: Arc<Hub>) -> String {
        let app = axum::Router::new()
            .route("/api/models/{org}/{name}/revision/{rev}", get(listing))
            .route("/{org}/{name}/resolve/{rev}/{*file}", get(resolve))
            .with_state(hub);
        super::serve_loopback(app).await
    }

    async fn listing(
        State(hub): State<Arc<Hub>>,
        UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
        headers: HeaderMap,
    ) -> Response {
        hub.requests
            .lock()
            .expect("lock")
            .push(format!("listing {org}/{name}@{rev}"));
        *hub.auth.lock().expect("lock") = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if hub.unknown {
            return StatusCode::NOT_FOUND.into_response();
        }
        let siblings: Vec<_> = hub
            .files
            .keys()
            .map(|name| serde_json::json!({ "rfilename": name }))
            .collect();
        axum::Json(serde_json::json!({ "sha": SHA, "siblings": siblings })).into_response()
    }

    async fn resolve(
        State(hub): State<Arc<Hub>>,
        UrlPath((org, name, rev, file)): UrlPath<(String, String, String, String)>,
        headers: HeaderMap,
    ) -> Response {
        hub.requests
            .lock()
            .expect("lock")
            .push(format!("resolve {org}/{name}@{rev}/{file}"));
        let Some(bytes) = hub.files.get(&file) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let total = bytes.len();
        let (start, stop) = headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
            .unwrap_or((0, total.saturating_sub(1)));
        let stop = stop.min(total - 1);
        if stop > start || total == 1 {
            hub.fetched.lock().expect("lock").push(file.clone());
        }
        let etag = hex::encode(Sha256::digest(bytes));
        (
            StatusCode::PARTIAL_CONTENT,
            [
                (header::ETAG.as_str(), format!("\"{etag}\"")),
                ("x-repo-commit", SHA.to_string()),
                (
                    header::CONTENT_RANGE.as_str(),
                    format!("bytes {start}-{stop}/{total}"),
                ),
            ],
            bytes[start..=stop].to_vec(),
        )
            .into_response()
    }
}
