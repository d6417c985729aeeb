//! Which `.gguf` file of a hub repository to serve: the one `--gguf-file` names, the one a
//! quantization tag (`owner/repo:Q4_K_M`) matches, or the only one. Pure functions over the
//! repository's file names (the hub's listing, or what the cache holds).

use std::collections::BTreeMap;
use std::fmt;

/// What selects the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Selector {
    /// `--gguf-file NAME`.
    File(String),
    /// `--model owner/repo:TAG`.
    Tag(String),
    /// Neither: the repository's only GGUF file.
    Only,
}

/// The file chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Picked {
    /// Its name in the repository.
    pub name: String,
    /// False when a tag matched only inside a longer token (`Q4_K` in `Q4_K_M`): the hub may
    /// hold other files the same tag matches, so a pick among cached files alone is not final.
    pub exact: bool,
}

/// Why no single file could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PickError {
    /// The repository holds no `.gguf` file at all.
    NoGguf {
        /// The selector that found nothing.
        selector: Selector,
        /// Whether the repository has a `config.json` (a safetensors model).
        has_config: bool,
    },
    /// `--gguf-file` names a file the repository does not hold.
    NotInRepo {
        /// The name given.
        file: String,
        /// The repository's GGUF files.
        candidates: Vec<String>,
    },
    /// No GGUF file name contains the tag.
    NoMatch {
        /// The tag.
        tag: String,
        /// The repository's GGUF files.
        candidates: Vec<String>,
    },
    /// Several GGUF files match the tag.
    Ambiguous {
        /// The tag.
        tag: String,
        /// The files it matches.
        matches: Vec<String>,
    },
    /// Several GGUF files and nothing to choose between them.
    Unselected {
        /// The repository id, for the suggested flags.
        repo_id: String,
        /// The repository's GGUF files.
        candidates: Vec<String>,
    },
    /// The chosen model is split into several files (`-00001-of-0000N.gguf`).
    Split {
        /// Its first part.
        first: String,
        /// How many parts.
        parts: u32,
    },
}

impl fmt::Display for PickError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PickError::NoGguf {
                selector,
                has_config,
            } => {
                write!(f, "the repository holds no .gguf file")?;
                match (selector, has_config) {
                    (Selector::File(_), true) => write!(
                        f,
                        " (it is a safetensors model: drop --gguf-file to serve it as one)"
                    ),
                    (Selector::Tag(tag), true) => write!(
                        f,
                        ", so `:{tag}` selects nothing (it is a safetensors model: drop `:{tag}` to serve it as one)"
                    ),
                    (Selector::File(_), false) => write!(f, ", so --gguf-file selects nothing"),
                    (Selector::Tag(tag), false) => write!(f, ", so `:{tag}` selects nothing"),
                    (Selector::Only, _) => Ok(()),
                }
            }
            PickError::NotInRepo { file, candidates } => write!(
                f,
                "--gguf-file {file}: no such file in the repository; its .gguf files are: {}",
                describe(candidates)
            ),
            PickError::NoMatch { tag, candidates } => write!(
                f,
                "no .gguf file name contains the tag `{tag}` (case-insensitive); the .gguf files are: {}",
                describe(candidates)
            ),
            PickError::Ambiguous { tag, matches } => write!(
                f,
                "the tag `{tag}` matches several .gguf files: {}; use a longer tag or --gguf-file NAME",
                describe(matches)
            ),
            PickError::Unselected {
                repo_id,
                candidates,
            } => write!(
                f,
                "no config.json but several .gguf files: {}; choose one with --gguf-file NAME or \
                 --model {repo_id}:TAG (a quantization such as Q4_K_M)",
                describe(candidates)
            ),
            PickError::Split { first, parts } => write!(
                f,
                "{first} is the first of {parts} parts of a split GGUF file, which Medley's GGUF \
                 loader cannot read: merge the parts with `llama-gguf-split --merge` and serve the \
                 merged file as --model PATH, or choose an unsplit quantization"
            ),
        }
    }
}

/// Picks the file `selector` names among the repository files `names`; `repo_id` is only
/// used in messages.
pub(super) fn pick(
    names: &[String],
    selector: &Selector,
    repo_id: &str,
) -> Result<Picked, PickError> {
    let models = model_ggufs(names);
    let no_gguf = || PickError::NoGguf {
        selector: selector.clone(),
        has_config: names.iter().any(|n| n == "config.json"),
    };
    if models.is_empty() {
        return Err(no_gguf());
    }
    let chosen = match selector {
        Selector::File(file) => {
            if !names.iter().any(|n| n == file) {
                return Err(PickError::NotInRepo {
                    file: file.clone(),
                    candidates: models,
                });
            }
            vec![file.clone()]
        }
        Selector::Tag(tag) => {
            let needle = tag.to_ascii_lowercase();
            let loose: Vec<String> = models
                .iter()
                .filter(|n| n.to_ascii_lowercase().contains(&needle))
                .cloned()
                .collect();
            if loose.is_empty() {
                return Err(PickError::NoMatch {
                    tag: tag.clone(),
                    candidates: models,
                });
            }
            let exact: Vec<String> = loose
                .iter()
                .filter(|n| contains_token(n, &needle))
                .cloned()
                .collect();
            match (exact.is_empty(), loose.len()) {
                // `F16` picks `x-F16.gguf` over `x-BF16.gguf`.
                (false, _) => exact,
                (true, 1) => {
                    return check_split(Picked {
                        name: loose.into_iter().next().unwrap_or_default(),
                        exact: false,
                    });
                }
                (true, _) => loose,
            }
        }
        Selector::Only => models,
    };
    if let Some(split) = one_split_set(&chosen) {
        return Err(split);
    }
    match chosen.as_slice() {
        [one] => check_split(Picked {
            name: one.clone(),
            exact: true,
        }),
        _ => Err(match selector {
            Selector::Tag(tag) => PickError::Ambiguous {
                tag: tag.clone(),
                matches: chosen,
            },
            _ => PickError::Unselected {
                repo_id: repo_id.to_string(),
                candidates: chosen,
            },
        }),
    }
}

/// Refuses a name that is part of a split GGUF file.
pub(super) fn check_split(picked: Picked) -> Result<Picked, PickError> {
    match split_part(&picked.name) {
        Some(part) => Err(PickError::Split {
            first: part.first_name(&picked.name),
            parts: part.count,
        }),
        None => Ok(picked),
    }
}

/// The GGUF model files among `names`: `.gguf`, without the multimodal projectors
/// (`mmproj-*.gguf`), which are not language models.
fn model_ggufs(names: &[String]) -> Vec<String> {
    let mut models: Vec<String> = names
        .iter()
        .filter(|n| is_gguf_name(n) && !base_name(n).to_ascii_lowercase().starts_with("mmproj"))
        .cloned()
        .collect();
    models.sort();
    models
}

/// Whether `name` ends in `.gguf` (any case).
pub(super) fn is_gguf_name(name: &str) -> bool {
    name.len() > 5
        && name
            .get(name.len() - 5..)
            .is_some_and(|ext| ext.eq_ignore_ascii_case(".gguf"))
}

fn base_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// Whether `needle` (lower case) occurs in `name` as a whole token: not preceded by a letter or
/// digit, not followed by a letter, digit or `_` (so `q4_k` is not a token of `q4_k_m`, and
/// `f16` not one of `bf16`).
fn contains_token(name: &str, needle: &str) -> bool {
    let hay = name.to_ascii_lowercase();
    let bytes = hay.as_bytes();
    hay.match_indices(needle).any(|(at, _)| {
        let end = at + needle.len();
        let before_ok = at == 0 || !bytes[at - 1].is_ascii_alphanumeric();
        let after_ok =
            end == bytes.len() || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_');
        before_ok && after_ok
    })
}

/// One part of a split GGUF file: `{prefix}-{index:05}-of-{count:05}.gguf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SplitPart {
    /// 1-based part number.
    pub index: u32,
    /// Number of parts.
    pub count: u32,
    /// Byte length of the `{prefix}` of the name.
    prefix_len: usize,
}

impl SplitPart {
    /// The name of the first part of the file `name` belongs to.
    pub fn first_name(&self, name: &str) -> String {
        let prefix = name.get(..self.prefix_len).unwrap_or(name);
        let width = name
            .get(self.prefix_len + 1..)
            .and_then(|rest| rest.split('-').next())
            .map_or(5, str::len);
        let ext = name.get(name.len() - 5..).unwrap_or(".gguf");
        format!(
            "{prefix}-{:0width$}-of-{:0width$}{ext}",
            1,
            self.count,
            width = width
        )
    }
}

/// The split part `name` is, if it is one (llama.cpp's `gguf-split` naming).
pub(super) fn split_part(name: &str) -> Option<SplitPart> {
    if !is_gguf_name(name) {
        return None;
    }
    let stem = name.get(..name.len() - 5)?;
    let (before, count) = stem.rsplit_once("-of-")?;
    let (prefix, index) = before.rsplit_once('-')?;
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    let (index, count) = (number(index)?, number(count)?);
    (count > 1 && index >= 1 && index <= count).then_some(SplitPart {
        index,
        count,
        prefix_len: prefix.len(),
    })
}

/// When every name in `names` (two or more) is a part of one split file: that error.
fn one_split_set(names: &[String]) -> Option<PickError> {
    let [first, rest @ ..] = names else {
        return None;
    };
    if rest.is_empty() {
        return None;
    }
    let key = |n: &str| split_part(n).map(|p| (n[..p.prefix_len].to_string(), p.count));
    let set = key(first)?;
    rest.iter()
        .all(|n| key(n).as_ref() == Some(&set))
        .then(|| PickError::Split {
            first: split_part(first).map_or_else(|| first.clone(), |p| p.first_name(first)),
            parts: set.1,
        })
}

/// `names` for a message: comma-separated, each split file once as its first part with
/// `(split in N parts)`.
pub(super) fn describe(names: &[String]) -> String {
    let mut shown: BTreeMap<String, Option<u32>> = BTreeMap::new();
    for name in names {
        match split_part(name) {
            Some(part) => {
                shown.insert(part.first_name(name), Some(part.count));
            }
            None => {
                shown.insert(name.clone(), None);
            }
        }
    }
    shown
        .into_iter()
        .map(|(name, split)| match split {
            Some(n) => format!("{name} (split in {n} parts)"),
            None => name,
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const REPO: [&str; 6] = [
        ".gitattributes",
        "README.md",
        "tinyllama.Q4_K_M.gguf",
        "tinyllama.Q4_K_S.gguf",
        "tinyllama.Q8_0.gguf",
        "mmproj-tinyllama-f16.gguf",
    ];

    fn tag(t: &str) -> Selector {
        Selector::Tag(t.into())
    }

    #[test]
    fn tags_pick_one_file_case_insensitively() {
        let repo = names(&REPO);
        for (t, want) in [
            ("Q4_K_M", "tinyllama.Q4_K_M.gguf"),
            ("q4_k_s", "tinyllama.Q4_K_S.gguf"),
            ("Q8", "tinyllama.Q8_0.gguf"),
        ] {
            assert_eq!(pick(&repo, &tag(t), "o/r").unwrap().name, want, "{t}");
        }
        assert!(pick(&repo, &tag("Q4_K_M"), "o/r").unwrap().exact);
        // `Q8` only matches inside `Q8_0`: a pick, but not final among cached files.
        assert!(!pick(&repo, &tag("Q8"), "o/r").unwrap().exact);
    }

    #[test]
    fn whole_tokens_win_over_substrings() {
        let repo = names(&["m-BF16.gguf", "m-F16.gguf", "m-Q4_0.gguf"]);
        assert_eq!(pick(&repo, &tag("f16"), "o/r").unwrap().name, "m-F16.gguf");
        assert_eq!(
            pick(&repo, &tag("BF16"), "o/r").unwrap().name,
            "m-BF16.gguf"
        );
    }

    #[test]
    fn ambiguous_and_missing_tags_name_the_candidates() {
        let repo = names(&REPO);
        let err = pick(&repo, &tag("Q4_K"), "o/r").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PickError::Ambiguous { .. }), "{err:?}");
        assert!(
            msg.contains("tinyllama.Q4_K_M.gguf, tinyllama.Q4_K_S.gguf") && !msg.contains("Q8_0"),
            "{msg}"
        );
        let err = pick(&repo, &tag("Q5_K_M"), "o/r").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PickError::NoMatch { .. }), "{err:?}");
        for n in &REPO[2..5] {
            assert!(msg.contains(n), "{msg}");
        }
        // The projector is not a candidate.
        assert!(!msg.contains("mmproj"), "{msg}");
    }

    #[test]
    fn files_and_the_only_file() {
        let repo = names(&REPO);
        let file = Selector::File("tinyllama.Q8_0.gguf".into());
        assert_eq!(
            pick(&repo, &file, "o/r").unwrap().name,
            "tinyllama.Q8_0.gguf"
        );
        let err = pick(&repo, &Selector::File("x.gguf".into()), "o/r").unwrap_err();
        assert!(matches!(err, PickError::NotInRepo { .. }), "{err:?}");
        assert!(err.to_string().contains("tinyllama.Q4_K_S.gguf"), "{err}");
        let err = pick(&repo, &Selector::Only, "o/r").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PickError::Unselected { .. }), "{err:?}");
        assert!(
            msg.contains("--gguf-file") && msg.contains("--model o/r:TAG"),
            "{msg}"
        );
        let single = names(&["README.md", "m.Q4_0.gguf", "mmproj.gguf"]);
        assert_eq!(
            pick(&single, &Selector::Only, "o/r").unwrap().name,
            "m.Q4_0.gguf"
        );
    }

    #[test]
    fn repos_without_gguf_files() {
        let st = names(&["config.json", "model.safetensors", "tokenizer.json"]);
        let err = pick(&st, &Selector::File("m.gguf".into()), "o/r").unwrap_err();
        assert!(err.to_string().contains("drop --gguf-file"), "{err}");
        let err = pick(&st, &tag("Q4_0"), "o/r").unwrap_err();
        assert!(err.to_string().contains("drop `:Q4_0`"), "{err}");
        let err = pick(&names(&["README.md"]), &tag("Q4_0"), "o/r").unwrap_err();
        assert!(
            matches!(
                err,
                PickError::NoGguf {
                    has_config: false,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn split_files_are_refused() {
        assert_eq!(
            split_part("big/M-Q8_0-00002-of-00003.gguf"),
            Some(SplitPart {
                index: 2,
                count: 3,
                prefix_len: "big/M-Q8_0".len()
            })
        );
        for not in [
            "m.gguf",
            "m-00001-of-00001.gguf",
            "m-1-of-x.gguf",
            "m-00001-of-00002.bin",
        ] {
            assert_eq!(split_part(not), None, "{not}");
        }
        let repo = names(&[
            "M-Q8_0-00001-of-00002.gguf",
            "M-Q8_0-00002-of-00002.gguf",
            "M-Q4_0.gguf",
        ]);
        for selector in [
            tag("Q8_0"),
            Selector::File("M-Q8_0-00002-of-00002.gguf".into()),
        ] {
            let err = pick(&repo, &selector, "o/r").unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, PickError::Split { parts: 2, .. }), "{err:?}");
            assert!(
                msg.contains("M-Q8_0-00001-of-00002.gguf") && msg.contains("llama-gguf-split"),
                "{msg}"
            );
        }
        assert_eq!(
            describe(&repo),
            "M-Q4_0.gguf, M-Q8_0-00001-of-00002.gguf (split in 2 parts)"
        );
        let only_split = names(&["M-00001-of-00002.gguf", "M-00002-of-00002.gguf"]);
        let err = pick(&only_split, &Selector::Only, "o/r").unwrap_err();
        assert!(matches!(err, PickError::Split { .. }), "{err:?}");
    }
}
