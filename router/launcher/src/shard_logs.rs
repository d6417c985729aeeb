//! Forwards a shard's stdout/stderr into the launcher's log, prefixed with the rank, and keeps
//! the last lines for error reports.
//!
//! Shards run with `--json-output`; their `tracing` JSON lines are re-emitted at their own
//! level. Anything else (a panic message, a library printing to stderr) is logged as is: stdout
//! at INFO, stderr at WARN.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Lines kept per shard for error reports.
pub const TAIL_LINES: usize = 20;

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The shard's stdout.
    Stdout,
    /// The shard's stderr.
    Stderr,
}

/// What a shard printed last, shared by its two forwarders: the last [`TAIL_LINES`] lines and
/// the first line that reads like the reason it failed (`Error: ...` from `main`, a panic, an
/// ERROR log), which a long backtrace would otherwise push out of the tail.
#[derive(Debug, Clone, Default)]
pub struct OutputTail {
    inner: Arc<Mutex<TailState>>,
}

#[derive(Debug, Default)]
struct TailState {
    lines: VecDeque<String>,
    first_error: Option<String>,
}

/// A summary of a shard's output for error reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TailSnapshot {
    /// The first error-looking line, if any.
    pub first_error: Option<String>,
    /// The last lines, oldest first.
    pub lines: Vec<String>,
}

impl OutputTail {
    fn push(&self, line: String, is_error: bool) {
        // A poisoned lock only means another forwarder panicked mid-push; the data is fine.
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if is_error && state.first_error.is_none() {
            state.first_error = Some(line.clone());
        }
        if state.lines.len() == TAIL_LINES {
            state.lines.pop_front();
        }
        state.lines.push_back(line);
    }

    /// A copy of what is kept.
    pub fn snapshot(&self) -> TailSnapshot {
        let state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        TailSnapshot {
            first_error: state.first_error.clone(),
            lines: state.lines.iter().cloned().collect(),
        }
    }
}

/// True for the lines that usually say why a process failed.
fn looks_like_error(line: &ShardLine) -> bool {
    match line.level {
        Some(level) => level == tracing::Level::ERROR,
        None => {
            let text = line.text.trim_start();
            text.starts_with("Error:") || text.starts_with("error:") || text.contains("panicked at")
        }
    }
}

/// A shard log line after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLine {
    /// `tracing` level (`INFO`...) or `None` for plain text.
    pub level: Option<tracing::Level>,
    /// The shard's `target` (module path), when JSON.
    pub target: Option<String>,
    /// Message plus any extra fields as `key=value`.
    pub text: String,
}

/// Parses one line of shard output (`tracing-subscriber` JSON, or plain text).
pub fn parse_line(line: &str) -> ShardLine {
    let plain = || ShardLine {
        level: None,
        target: None,
        text: line.to_string(),
    };
    let Ok(serde_json::Value::Object(json)) = serde_json::from_str::<serde_json::Value>(line)
    else {
        return plain();
    };
    let Some(level) = json
        .get("level")
        .and_then(|l| l.as_str())
        .and_then(|l| l.parse::<tracing::Level>().ok())
    else {
        return plain();
    };
    let mut text = String::new();
    if let Some(fields) = json.get("fields").and_then(|f| f.as_object()) {
        if let Some(message) = fields.get("message") {
            text.push_str(&value_text(message));
        }
        for (key, value) in fields.iter().filter(|(k, _)| *k != "message") {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(&format!("{key}={}", value_text(value)));
        }
    }
    ShardLine {
        level: Some(level),
        target: json
            .get("target")
            .and_then(|t| t.as_str())
            .map(str::to_string),
        text,
    }
}

/// Strings without their JSON quotes; everything else as JSON.
fn value_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Reads `reader` line by line until EOF, logging each line and keeping it in `tail`.
pub async fn forward(
    reader: impl AsyncRead + Unpin,
    rank: usize,
    stream: Stream,
    tail: OutputTail,
) {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(rank, error = %e, "reading shard output failed");
                break;
            }
        }
        let raw = String::from_utf8_lossy(&buf);
        let raw = raw.trim_end_matches(['\n', '\r']);
        if raw.is_empty() {
            continue;
        }
        let line = parse_line(raw);
        emit(rank, stream, &line);
        let is_error = looks_like_error(&line);
        tail.push(
            match line.level {
                Some(level) => format!("{level} {}", line.text),
                None => line.text,
            },
            is_error,
        );
    }
}

/// Logs one parsed line through the launcher's subscriber.
fn emit(rank: usize, stream: Stream, line: &ShardLine) {
    let text = line.text.as_str();
    let level = line.level.unwrap_or(match stream {
        Stream::Stdout => tracing::Level::INFO,
        Stream::Stderr => tracing::Level::WARN,
    });
    // `tracing` needs the level at compile time: one arm per level, with and without target.
    macro_rules! at {
        ($mac:ident) => {
            match line.target.as_deref() {
                Some(target) => tracing::$mac!(rank, shard_target = target, "{text}"),
                None => tracing::$mac!(rank, "{text}"),
            }
        };
    }
    match level {
        tracing::Level::ERROR => at!(error),
        tracing::Level::WARN => at!(warn),
        tracing::Level::INFO => at!(info),
        tracing::Level::DEBUG => at!(debug),
        tracing::Level::TRACE => at!(trace),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tracing_json() {
        let line = r#"{"timestamp":"2025-01-01T00:00:00Z","level":"WARN","fields":{"message":"kv cache small","tokens":128,"dtype":"f32"},"target":"medley_shard::engine"}"#;
        let parsed = parse_line(line);
        assert_eq!(parsed.level, Some(tracing::Level::WARN));
        assert_eq!(parsed.target.as_deref(), Some("medley_shard::engine"));
        // Extra fields follow the message (in the JSON map's order, sorted here).
        assert!(
            parsed.text.starts_with("kv cache small "),
            "{}",
            parsed.text
        );
        assert!(parsed.text.contains("tokens=128"), "{}", parsed.text);
        assert!(parsed.text.contains("dtype=f32"), "{}", parsed.text);
    }

    #[test]
    fn plain_text_and_foreign_json_stay_verbatim() {
        for line in [
            "thread 'main' panicked at src/main.rs:1:1",
            r#"{"level":"LOUD","fields":{}}"#,
            "[1, 2]",
        ] {
            let parsed = parse_line(line);
            assert_eq!(parsed.level, None, "{line}");
            assert_eq!(parsed.text, line);
        }
    }

    #[tokio::test]
    async fn forward_keeps_the_last_lines() {
        let mut text = String::new();
        for i in 0..(TAIL_LINES + 5) {
            text.push_str(&format!("line {i}\n"));
        }
        text.push_str("no newline at the end \u{fffd}");
        let tail = OutputTail::default();
        forward(text.as_bytes(), 0, Stream::Stderr, tail.clone()).await;
        let lines = tail.snapshot().lines;
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 6");
        assert_eq!(lines[TAIL_LINES - 1], "no newline at the end \u{fffd}");
    }

    #[tokio::test]
    async fn invalid_utf8_does_not_stop_forwarding() {
        let bytes: &[u8] = b"ok\n\xff\xfe bad\nafter\n";
        let tail = OutputTail::default();
        forward(bytes, 1, Stream::Stdout, tail.clone()).await;
        let lines = tail.snapshot().lines;
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2], "after");
    }

    #[tokio::test]
    async fn first_error_survives_a_long_backtrace() {
        let mut text = String::from("loading\nError: tensor parallelism is not supported\n");
        for i in 0..(TAIL_LINES * 2) {
            text.push_str(&format!("   {i}: frame\n"));
        }
        text.push_str("Error: a second one\n");
        let tail = OutputTail::default();
        forward(text.as_bytes(), 0, Stream::Stderr, tail.clone()).await;
        let snapshot = tail.snapshot();
        assert_eq!(
            snapshot.first_error.as_deref(),
            Some("Error: tensor parallelism is not supported")
        );
        assert!(!snapshot.lines.iter().any(|l| l.contains("parallelism")));

        let json = r#"{"level":"ERROR","fields":{"message":"bad weights"},"target":"s"}"#;
        let tail = OutputTail::default();
        forward(
            format!("{json}\n").as_bytes(),
            0,
            Stream::Stdout,
            tail.clone(),
        )
        .await;
        assert_eq!(
            tail.snapshot().first_error.as_deref(),
            Some("ERROR bad weights")
        );
        let tail = OutputTail::default();
        forward(&b"all good\n"[..], 0, Stream::Stdout, tail.clone()).await;
        assert_eq!(tail.snapshot().first_error, None);
    }
}
