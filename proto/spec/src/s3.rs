//! S3 adapter ids: `s3://bucket/prefix`, where the prefix is the "directory" holding
//! `adapter_config.json` and `adapter_model.safetensors`. The router checks the shape (so a bad
//! id is a validation error before anything is scheduled) and normalises it (no trailing `/`); the
//! shard parses it again into the bucket and the prefix it fetches.

use std::fmt;

use crate::error::SpecError;

/// The scheme every S3 adapter id starts with.
pub const S3_SCHEME: &str = "s3://";

/// Longest prefix accepted: S3 keys are at most 1024 bytes, and the prefix is followed by
/// `/adapter_model.safetensors`.
pub const MAX_S3_PREFIX_BYTES: usize = 990;

/// A parsed S3 adapter id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Location {
    /// The bucket name (S3 naming rules: 3 to 63 lower-case letters, digits, `.` and `-`).
    pub bucket: String,
    /// The key prefix, without leading or trailing `/` (never empty).
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://bucket/prefix` (one trailing `/` allowed).
    pub fn parse(id: &str) -> Result<Self, SpecError> {
        let bad = |reason: &str| SpecError::InvalidS3Id {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        let rest = id
            .strip_prefix(S3_SCHEME)
            .ok_or_else(|| bad("it does not start with `s3://`"))?;
        let (bucket, prefix) = rest
            .split_once('/')
            .ok_or_else(|| bad("it names no prefix after the bucket"))?;
        check_bucket(bucket).map_err(|r| bad(&r))?;
        let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
        if prefix.is_empty() {
            return Err(bad("it names no prefix after the bucket"));
        }
        if prefix.len() > MAX_S3_PREFIX_BYTES {
            return Err(bad(&format!(
                "the prefix is longer than {MAX_S3_PREFIX_BYTES} bytes"
            )));
        }
        if prefix.chars().any(char::is_control) {
            return Err(bad("the prefix contains control characters"));
        }
        if prefix
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(bad(
                "the prefix has an empty, `.` or `..` segment (`//`, `/./`, `/../`)",
            ));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The key of the object `name` inside the prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }
}

impl fmt::Display for S3Location {
    /// The canonical id, `s3://bucket/prefix`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{S3_SCHEME}{}/{}", self.bucket, self.prefix)
    }
}

/// S3's bucket naming rules (general purpose buckets).
fn check_bucket(bucket: &str) -> Result<(), String> {
    if bucket.is_empty() {
        return Err("the bucket name is empty".into());
    }
    if !(3..=63).contains(&bucket.len()) {
        return Err(format!(
            "the bucket name `{bucket}` must be 3 to 63 characters long"
        ));
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
        || !edge_ok(bucket.chars().next())
        || !edge_ok(bucket.chars().last())
        || bucket.contains("..")
    {
        return Err(format!(
            "the bucket name `{bucket}` must be lower-case letters, digits, `.` and `-`, starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_parse_and_normalise() {
        let l = S3Location::parse("s3://my-bucket/adapters/sql/").expect("valid");
        assert_eq!(l.bucket, "my-bucket");
        assert_eq!(l.prefix, "adapters/sql");
        assert_eq!(l.to_string(), "s3://my-bucket/adapters/sql");
        assert_eq!(
            l.key("adapter_config.json"),
            "adapters/sql/adapter_config.json"
        );
        for id in ["s3://abc/x", "s3://a.b-c.1/x y/Z_9+=,@", "s3://123/ü/v1"] {
            let l = S3Location::parse(id).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(l.to_string(), id);
        }
    }

    #[test]
    fn invalid_ids_say_why() {
        for (id, reason) in [
            ("org/name", "does not start with `s3://`"),
            ("S3://bucket/x", "does not start with `s3://`"),
            ("s3://bucket", "names no prefix"),
            ("s3://bucket/", "names no prefix"),
            ("s3://bucket//", "names no prefix"),
            ("s3://bucket//x", "empty, `.` or `..` segment"),
            ("s3:///x", "bucket name is empty"),
            ("s3://ab/x", "3 to 63 characters"),
            ("s3://Bucket/x", "lower-case letters"),
            ("s3://bucket_1/x", "lower-case letters"),
            ("s3://-bucket/x", "lower-case letters"),
            ("s3://a..b/x", "lower-case letters"),
            ("s3://bucket/a//b", "empty, `.` or `..` segment"),
            ("s3://bucket/a/../b", "empty, `.` or `..` segment"),
            ("s3://bucket/./b", "empty, `.` or `..` segment"),
            ("s3://bucket/a\nb", "control characters"),
        ] {
            let err = S3Location::parse(id).expect_err(id).to_string();
            assert!(err.contains(reason), "{id}: {err}");
            assert!(err.contains("s3://bucket/prefix"), "{id}: {err}");
        }
        let long = format!("s3://bucket/{}", "a".repeat(MAX_S3_PREFIX_BYTES + 1));
        assert!(
            S3Location::parse(&long)
                .expect_err("long")
                .to_string()
                .contains("longer than")
        );
    }
}
