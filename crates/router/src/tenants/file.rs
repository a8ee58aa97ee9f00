//! The tenants file (`--tenants`): YAML, one entry per tenant.
//!
//! ```yaml
//! tenants:
//!   - name: search
//!     api_keys_sha256: ["<hex sha-256 of the key>"]
//!     max_priority: 5
//!     weight: 2
//!     requests_per_minute: 600
//!     tokens_per_minute: 200000
//!     max_concurrent: 64
//! ```
//!
//! Every field but `name` and `api_keys_sha256` may be left out (no cap, weight 1, no quota).
//! Unknown fields are refused, not ignored: a misspelt quota must not silently be no quota.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Deserialize;

use super::{Directory, Tenant};

/// Largest tenants file read, in bytes.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Most tenants in one file (each is a metric label value: this bounds their cardinality).
pub const MAX_TENANTS: usize = 1024;
/// Most keys one tenant holds (room for rotation: old and new keys side by side).
pub const MAX_KEYS_PER_TENANT: usize = 64;
/// Longest tenant name.
pub const MAX_NAME_BYTES: usize = 64;
/// Largest weight (and 1 / the smallest).
pub const MAX_WEIGHT: f64 = 1e6;

/// Why a tenants file was not taken (the one in force, if any, stays).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TenantsError {
    /// It could not be read.
    #[error("cannot read the tenants file {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// It is larger than [`MAX_FILE_BYTES`].
    #[error("the tenants file is {0} bytes, over the limit of {MAX_FILE_BYTES}")]
    TooLarge(usize),
    /// It is not YAML of the documented shape.
    #[error("the tenants file is not valid: {0}")]
    Syntax(String),
    /// An entry breaks a rule; the message names the tenant and the field.
    #[error("tenant #{index} ({name}): {message}")]
    Entry {
        /// Its position in the file, from 1.
        index: usize,
        /// Its name as written (bounded).
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Too many tenants.
    #[error("the tenants file lists {0} tenants, over the limit of {MAX_TENANTS}")]
    TooMany(usize),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    tenants: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    api_keys_sha256: Vec<String>,
    #[serde(default)]
    max_priority: Option<i32>,
    #[serde(default)]
    weight: Option<f64>,
    #[serde(default)]
    requests_per_minute: Option<u64>,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    max_concurrent: Option<u64>,
}

/// Parses and checks a tenants file's bytes. Any broken rule refuses the whole file.
pub fn parse(bytes: &[u8]) -> Result<Directory, TenantsError> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(TenantsError::TooLarge(bytes.len()));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|e| TenantsError::Syntax(format!("not UTF-8: {e}")))?;
    let shape: FileShape = serde_yaml_ng::from_str(text)
        .map_err(|e| TenantsError::Syntax(openinfer_core::bounded(e.to_string())))?;
    if shape.tenants.len() > MAX_TENANTS {
        return Err(TenantsError::TooMany(shape.tenants.len()));
    }
    let mut names = HashSet::new();
    let mut seen_keys = HashSet::new();
    let mut tenants = Vec::with_capacity(shape.tenants.len());
    let mut keys = Vec::new();
    for (i, e) in shape.tenants.into_iter().enumerate() {
        let fail = |message: String| TenantsError::Entry {
            index: i + 1,
            name: openinfer_core::echo(&e.name),
            message,
        };
        check_name(&e.name).map_err(|m| fail(m.into()))?;
        if !names.insert(e.name.clone()) {
            return Err(fail("`name` is used by an earlier tenant".into()));
        }
        if e.api_keys_sha256.is_empty() {
            return Err(fail("`api_keys_sha256` lists no key".into()));
        }
        if e.api_keys_sha256.len() > MAX_KEYS_PER_TENANT {
            return Err(fail(format!(
                "`api_keys_sha256` lists {} keys, over the limit of {MAX_KEYS_PER_TENANT}",
                e.api_keys_sha256.len()
            )));
        }
        for (k, hex) in e.api_keys_sha256.iter().enumerate() {
            let hash = decode_sha256(hex).ok_or_else(|| {
                fail(format!(
                    "`api_keys_sha256[{k}]` must be 64 hex digits (the SHA-256 of the key, as `sha256sum` prints it), not the key itself"
                ))
            })?;
            if !seen_keys.insert(hash) {
                return Err(fail(format!(
                    "`api_keys_sha256[{k}]` is listed twice (a key names one tenant)"
                )));
            }
            keys.push((hash, i));
        }
        let weight = e.weight.unwrap_or(1.0);
        if !(weight.is_finite() && (1.0 / MAX_WEIGHT..=MAX_WEIGHT).contains(&weight)) {
            return Err(fail(format!(
                "`weight` must be a number from {} to {MAX_WEIGHT}",
                1.0 / MAX_WEIGHT
            )));
        }
        for (field, v) in [
            ("requests_per_minute", e.requests_per_minute),
            ("tokens_per_minute", e.tokens_per_minute),
            ("max_concurrent", e.max_concurrent),
        ] {
            if v == Some(0) {
                return Err(fail(format!(
                    "`{field}` must be at least 1 (leave it out for no limit)"
                )));
            }
        }
        tenants.push(Arc::new(Tenant {
            name: e.name.into(),
            max_priority: e.max_priority,
            weight,
            requests_per_minute: e.requests_per_minute,
            tokens_per_minute: e.tokens_per_minute,
            max_concurrent: e.max_concurrent,
        }));
    }
    Ok(Directory::new(tenants, keys))
}

/// Reads and parses the tenants file at `path`.
pub fn load(path: &std::path::Path) -> Result<Directory, TenantsError> {
    let read = |message: String| TenantsError::Read {
        path: path.display().to_string(),
        message,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| read(e.to_string()))?
        .len();
    if len > MAX_FILE_BYTES as u64 {
        return Err(TenantsError::TooLarge(len as usize));
    }
    parse(&std::fs::read(path).map_err(|e| read(e.to_string()))?)
}

/// Names are metric label values and log fields: short, and of `[A-Za-z0-9._-]`.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err("`name` must be 1 to 64 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("`name` may hold only letters, digits, `.`, `_` and `-`");
    }
    if name == super::ANONYMOUS {
        return Err("`anonymous` is the tenant of requests without a tenants file");
    }
    Ok(())
}

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::key_sha256;
    use super::*;
    use proptest::prelude::*;

    fn one(extra: &str) -> String {
        format!(
            "tenants:\n  - name: search\n    api_keys_sha256: [\"{}\"]\n{extra}",
            key_sha256("k")
        )
    }

    #[test]
    fn the_documented_example_parses() {
        let d = parse(
            one("    max_priority: 5\n    weight: 2\n    requests_per_minute: 600\n    tokens_per_minute: 200000\n    max_concurrent: 64\n")
                .as_bytes(),
        )
        .unwrap();
        let t = &d.tenants()[0];
        assert_eq!(
            (
                t.max_priority,
                t.weight,
                t.requests_per_minute,
                t.tokens_per_minute,
                t.max_concurrent
            ),
            (Some(5), 2.0, Some(600), Some(200_000), Some(64))
        );
        assert_eq!(d.tenant_of("k").unwrap().name.as_ref(), "search");
    }

    #[test]
    fn broken_rules_name_the_tenant_and_field() {
        let cases = [
            (one("    weight: 0\n"), "`weight`"),
            (one("    tokens_per_minute: 0\n"), "`tokens_per_minute`"),
            (one("    max_tokens: 5\n"), "unknown field"),
            (
                "tenants:\n  - name: a\n    api_keys_sha256: [\"k\"]\n".into(),
                "64 hex digits",
            ),
            (
                "tenants:\n  - name: \"a b\"\n    api_keys_sha256: []\n".into(),
                "`name`",
            ),
            (
                "tenants:\n  - name: a\n    api_keys_sha256: []\n".into(),
                "no key",
            ),
            (
                format!(
                    "{}  - name: b\n    api_keys_sha256: [\"{}\"]\n",
                    one(""),
                    key_sha256("k")
                ),
                "listed twice",
            ),
            (
                format!(
                    "{}  - name: search\n    api_keys_sha256: [\"{}\"]\n",
                    one(""),
                    key_sha256("j")
                ),
                "earlier tenant",
            ),
            ("tenants: 5\n".into(), "not valid"),
        ];
        for (yaml, want) in cases {
            let e = parse(yaml.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{yaml:?}: {e}");
        }
    }

    proptest! {
        /// Random bytes, and random edits of a valid file: a clear error or a directory,
        /// never a panic.
        #[test]
        fn random_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn edited_files_never_panic(cut in 0usize..200, insert in "[ -~\n]{0,24}") {
            let mut yaml = one("    max_priority: 5\n    weight: 2\n    max_concurrent: 3\n");
            let at = cut.min(yaml.len());
            let at = (0..=at).rev().find(|&i| yaml.is_char_boundary(i)).unwrap_or(0);
            yaml.insert_str(at, &insert);
            if let Ok(d) = parse(yaml.as_bytes()) {
                for t in d.tenants() {
                    prop_assert!(t.weight > 0.0 && !t.name.is_empty());
                }
            }
        }
    }
}
