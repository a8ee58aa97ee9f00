//! Who is asking: the tenants file (`--tenants`), API keys that name a tenant, and what each
//! tenant may ask for (a priority cap, a weight in the fair share of its priority level, and
//! quotas).
//!
//! | module | concept |
//! |---|---|
//! | [`file`] | the YAML file: parsing and every rule it must keep |
//! | [`quota`] | per-tenant sliding-minute windows and concurrency, pure state |
//! | [`reload`] | following the file: reloaded on change or `SIGHUP` |
//!
//! Keys are never stored: the file holds their SHA-256, and a presented key is hashed and
//! compared with every stored hash in constant time. Without a file every request belongs to
//! one anonymous tenant with no cap and no quota (for trusted networks only).

pub mod file;
pub mod quota;
pub mod reload;

use std::sync::{Arc, RwLock};

use openinfer_core::{Code, ErrorCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use file::{parse, TenantsError};
pub use quota::{Quotas, Reservation};

/// The tenant of every request when no tenants file is configured.
pub const ANONYMOUS: &str = "anonymous";

/// What one tenant may do.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    /// Its name: a metric label, a span attribute, a log field.
    pub name: Arc<str>,
    /// The highest priority it may ask for (`None`: any).
    pub max_priority: Option<i32>,
    /// Its share of capacity inside a priority level, relative to the other tenants'.
    pub weight: f64,
    /// Requests it may start in any minute.
    pub requests_per_minute: Option<u64>,
    /// Tokens (prompt + `max_new_tokens`, reserved at admission) it may use in any minute.
    pub tokens_per_minute: Option<u64>,
    /// Requests it may have in flight at once.
    pub max_concurrent: Option<u64>,
}

impl Tenant {
    /// The tenant of every request without a tenants file.
    pub fn anonymous() -> Tenant {
        Tenant {
            name: ANONYMOUS.into(),
            max_priority: None,
            weight: 1.0,
            requests_per_minute: None,
            tokens_per_minute: None,
            max_concurrent: None,
        }
    }
}

/// The tenants and their keys, as one file defines them.
#[derive(Debug, Clone, PartialEq)]
pub struct Directory {
    tenants: Vec<Arc<Tenant>>,
    /// SHA-256 of each key, and the index of its tenant.
    keys: Vec<([u8; 32], usize)>,
}

/// Why a caller is not let in.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer` credentials.
    #[error("this router requires an API key: send `authorization: Bearer <key>`")]
    Missing,
    /// A malformed `authorization` value.
    #[error("the `authorization` metadata must be `Bearer <key>`")]
    Malformed,
    /// A key no tenant holds.
    #[error("the API key is not valid here; check the key or ask the operator for one")]
    Unknown,
    /// A priority above the tenant's cap.
    #[error("priority {priority} is above the max_priority of {cap} of tenant `{tenant}`; send a priority of at most {cap}")]
    PriorityCap {
        /// The tenant.
        tenant: Arc<str>,
        /// What the request asked for.
        priority: i32,
        /// The cap.
        cap: i32,
    },
}

impl AuthError {
    /// The `reason` label of `openinfer_router_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Unknown => "unknown",
            AuthError::PriorityCap { .. } => "priority_cap",
        }
    }
}

impl ErrorCode for AuthError {
    fn code(&self) -> Code {
        match self {
            AuthError::PriorityCap { .. } => Code::PermissionDenied,
            _ => Code::Unauthenticated,
        }
    }
}

impl Directory {
    /// A directory of `tenants`; `keys` pairs a key's SHA-256 with its tenant's index.
    fn new(tenants: Vec<Arc<Tenant>>, keys: Vec<([u8; 32], usize)>) -> Self {
        Directory { tenants, keys }
    }

    /// The tenants, in file order.
    pub fn tenants(&self) -> &[Arc<Tenant>] {
        &self.tenants
    }

    /// The tenant holding `key`. Every stored hash is compared, in constant time, whatever
    /// matches: the time taken says nothing about which key, or how much of it, matched.
    pub fn tenant_of(&self, key: &str) -> Option<Arc<Tenant>> {
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (hash, tenant) in &self.keys {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(*tenant);
            }
        }
        found.and_then(|i| self.tenants.get(i).cloned())
    }
}

/// The tenants in force: none configured (everyone is [`Tenant::anonymous`]), or the latest
/// file that parsed. Cheap to clone; reloading swaps the directory for every clone.
#[derive(Clone)]
pub struct Tenants {
    directory: Option<Arc<RwLock<Arc<Directory>>>>,
    anonymous: Arc<Tenant>,
}

impl Tenants {
    /// No tenants file: one anonymous tenant, no authentication.
    pub fn open() -> Self {
        Tenants {
            directory: None,
            anonymous: Arc::new(Tenant::anonymous()),
        }
    }

    /// Tenants from a parsed file.
    pub fn with(directory: Directory) -> Self {
        Tenants {
            directory: Some(Arc::new(RwLock::new(Arc::new(directory)))),
            anonymous: Arc::new(Tenant::anonymous()),
        }
    }

    /// True when a tenants file is in force.
    pub fn configured(&self) -> bool {
        self.directory.is_some()
    }

    /// The directory in force (`None` without a tenants file).
    pub fn directory(&self) -> Option<Arc<Directory>> {
        let d = self.directory.as_ref()?;
        Some(d.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Puts `directory` in force for requests that arrive from now on (no-op without a
    /// tenants file).
    pub fn replace(&self, directory: Directory) {
        if let Some(d) = &self.directory {
            *d.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(directory);
        }
    }

    /// The tenant a request's `authorization` value names, and whether it may ask for
    /// `priority`.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        priority: i32,
    ) -> Result<Arc<Tenant>, AuthError> {
        let Some(directory) = self.directory() else {
            return Ok(self.anonymous.clone());
        };
        let value = authorization.ok_or(AuthError::Missing)?;
        let key = bearer(value).ok_or(AuthError::Malformed)?;
        let tenant = directory.tenant_of(key).ok_or(AuthError::Unknown)?;
        match tenant.max_priority {
            Some(cap) if priority > cap => Err(AuthError::PriorityCap {
                tenant: tenant.name.clone(),
                priority,
                cap,
            }),
            _ => Ok(tenant),
        }
    }
}

/// The key of an `authorization: Bearer <key>` value (scheme case-insensitive, as RFC 6750).
fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// The lower-case hex SHA-256 of `key`: what the tenants file holds for it.
pub fn key_sha256(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants() -> Tenants {
        let yaml = format!(
            "tenants:\n  - name: search\n    api_keys_sha256: [\"{}\", \"{}\"]\n    max_priority: 5\n  - name: batch\n    api_keys_sha256: [\"{}\"]\n",
            key_sha256("s-key-1"),
            key_sha256("s-key-2"),
            key_sha256("b-key"),
        );
        Tenants::with(parse(yaml.as_bytes()).unwrap())
    }

    #[test]
    fn keys_name_their_tenant_and_the_cap_holds() {
        let t = tenants();
        let name = |auth: &str, p| {
            t.authenticate(Some(auth.as_bytes()), p)
                .map(|t| t.name.clone())
        };
        assert_eq!(name("Bearer s-key-1", 5).unwrap().as_ref(), "search");
        assert_eq!(name("bearer  s-key-2 ", 0).unwrap().as_ref(), "search");
        assert_eq!(name("Bearer b-key", 1000).unwrap().as_ref(), "batch");
        assert_eq!(name("Bearer nope", 0), Err(AuthError::Unknown));
        assert_eq!(name("Basic s-key-1", 0), Err(AuthError::Malformed));
        assert_eq!(name("Bearer ", 0), Err(AuthError::Malformed));
        assert_eq!(t.authenticate(None, 0), Err(AuthError::Missing));
        let capped = name("Bearer s-key-1", 6).unwrap_err();
        assert_eq!(capped.code(), Code::PermissionDenied);
        assert!(capped.to_string().contains("max_priority of 5"), "{capped}");
    }

    #[test]
    fn without_a_file_everyone_is_anonymous() {
        let t = Tenants::open();
        let tenant = t.authenticate(None, i32::MAX).unwrap();
        assert_eq!(tenant.name.as_ref(), ANONYMOUS);
        assert!(!t.configured());
    }

    #[test]
    fn replacing_the_directory_changes_who_gets_in() {
        let t = tenants();
        let clone = t.clone();
        let yaml = format!(
            "tenants:\n  - name: other\n    api_keys_sha256: [\"{}\"]\n",
            key_sha256("new")
        );
        t.replace(parse(yaml.as_bytes()).unwrap());
        assert!(clone.authenticate(Some(b"Bearer s-key-1"), 0).is_err());
        assert_eq!(
            clone
                .authenticate(Some(b"Bearer new"), 0)
                .unwrap()
                .name
                .as_ref(),
            "other"
        );
    }
}
