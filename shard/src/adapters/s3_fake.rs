//! A minimal S3: buckets of objects (body, ETag), the access key it accepts, counters of
//! object GETs, and switches for failures.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

#[derive(Default)]
pub(super) struct S3 {
    pub(super) buckets: Mutex<BTreeMap<String, BTreeMap<String, Vec<u8>>>>,
    /// Object GETs with a body, per key.
    pub(super) gets: Mutex<HashMap<String, usize>>,
    /// Keys whose GET fails with a 500 after the headers (a broken download).
    pub(super) broken: Mutex<Vec<String>>,
    /// Answer listings with AccessDenied (a GetObject-only principal).
    pub(super) deny_list: Mutex<bool>,
    pub(super) access_key: String,
}

impl S3 {
    pub(super) fn put(&self, bucket: &str, key: &str, body: Vec<u8>) {
        self.buckets
            .lock()
            .expect("lock")
            .entry(bucket.into())
            .or_default()
            .insert(key.into(), body);
    }

    pub(super) fn gets(&self, key: &str) -> usize {
        self.gets
            .lock()
            .expect("lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

pub(super) async fn serve(s3: Arc<S3>) -> String {
    let app = axum::Router::new()
        .route("/{bucket}", get(list))
        .route("/{bucket}/{*key}", get(object).head(object))
        .with_state(s3);
    medley_hub::testing::serve_loopback(app).await
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>1</RequestId></Error>"
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

fn no_such_bucket() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "NoSuchBucket",
        "The specified bucket does not exist",
    )
}

fn etag(body: &[u8]) -> String {
    format!("\"{}\"", hex::encode(&Sha256::digest(body)[..16]))
}

/// The access key of a SigV4 `Authorization` header.
fn authorized(s3: &S3, headers: &HeaderMap) -> Option<Response> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if auth.contains(&format!("Credential={}/", s3.access_key)) {
        None
    } else {
        Some(error(
            StatusCode::FORBIDDEN,
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
        ))
    }
}

async fn list(
    State(s3): State<Arc<S3>>,
    UrlPath(bucket): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = authorized(&s3, &headers) {
        return denied;
    }
    if *s3.deny_list.lock().expect("lock") {
        return error(StatusCode::FORBIDDEN, "AccessDenied", "Access Denied");
    }
    let buckets = s3.buckets.lock().expect("lock");
    let Some(objects) = buckets.get(&bucket) else {
        return no_such_bucket();
    };
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let mut contents = String::new();
    let mut prefixes = std::collections::BTreeSet::new();
    for (key, body) in objects.range(prefix.clone()..) {
        let Some(rest) = key.strip_prefix(&prefix) else {
            break;
        };
        if let Some((dir, _)) = rest.split_once('/') {
            prefixes.insert(format!("{prefix}{dir}/"));
            continue;
        }
        contents.push_str(&format!(
            "<Contents><Key>{key}</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified><ETag>{}</ETag><Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
            etag(body).replace('"', "&quot;"),
            body.len()
        ));
    }
    let common: String = prefixes
        .iter()
        .map(|p| format!("<CommonPrefixes><Prefix>{p}</Prefix></CommonPrefixes>"))
        .collect();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult><Name>{bucket}</Name><Prefix>{prefix}</Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{contents}{common}</ListBucketResult>"
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/xml")],
        body,
    )
        .into_response()
}

async fn object(
    State(s3): State<Arc<S3>>,
    UrlPath((bucket, key)): UrlPath<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = authorized(&s3, &headers) {
        return denied;
    }
    let body = {
        let buckets = s3.buckets.lock().expect("lock");
        let Some(objects) = buckets.get(&bucket) else {
            return no_such_bucket();
        };
        let Some(body) = objects.get(&key) else {
            return error(
                StatusCode::NOT_FOUND,
                "NoSuchKey",
                "The specified key does not exist.",
            );
        };
        body.clone()
    };
    let tag = etag(&body);
    if let Some(want) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok())
        && want != tag
    {
        return error(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
        );
    }
    let meta = [
        (header::ETAG, tag),
        (
            header::LAST_MODIFIED,
            "Mon, 01 Jan 2024 00:00:00 GMT".to_string(),
        ),
    ];
    if method == Method::HEAD {
        return (
            StatusCode::OK,
            [(header::CONTENT_LENGTH, body.len().to_string())],
            meta,
        )
            .into_response();
    }
    *s3.gets
        .lock()
        .expect("lock")
        .entry(key.clone())
        .or_default() += 1;
    if s3.broken.lock().expect("lock").contains(&key) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "We encountered an internal error. Please try again.",
        );
    }
    (StatusCode::OK, meta, body).into_response()
}
