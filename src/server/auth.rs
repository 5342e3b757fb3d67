//! API keys: `--api-keys FILE` (TOML) maps each key to a tenant and an admin flag.
//!
//! ```toml
//! [keys."sk-acme-1"]
//! tenant = "acme"
//! admin = false
//! max_adapters = 16            # run-time adapters in the tenant's namespace
//! max_adapter_bytes = 1073741824
//! allow_hub = false            # may add adapters by hub id
//! max_file_bytes = 268435456   # uploaded training files together (`/v1/files`)
//! max_files = 1000             # uploaded training files kept at once
//! max_jobs = 2                 # fine-tuning jobs queued or running at once
//! max_job_bytes = 1073741824   # fine-tuning jobs' outputs on disk together
//! weight = 1.0                 # share of the engine against other busy tenants
//! tokens_per_minute = 100000   # prompt + completion tokens served in any 60 s (429 past it)
//! requests_per_minute = 600    # requests started in any 60 s
//! max_concurrent_requests = 64 # requests in flight at once
//! min_priority = 0             # the most urgent `priority` the key may ask for (lower: sooner)
//! ```
//!
//! Rate limits and the weight are the tenant's: every key of a tenant draws on one budget (each
//! request is checked against its own key's values, so give a tenant's keys the same ones).
//!
//! A top-level `max_queue_per_tenant` bounds each tenant's waiting requests. Keys are kept only
//! as SHA-256 digests and compared in constant time.

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: cannot read: {message}")]
    Read { path: String, message: String },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

/// What one tenant may load at run time (from its key's entry; admins are not bounded).
#[derive(Debug, Clone, PartialEq)]
pub struct TenantLimits {
    /// `max_adapters`: adapters registered at run time in the tenant's namespace.
    pub max_adapters: usize,
    /// `max_adapter_bytes`: their weights together, as their safetensors headers declare.
    pub max_adapter_bytes: u64,
    /// `allow_hub`: may add adapters by hub id (downloaded without the operator's token).
    pub allow_hub: bool,
    /// `max_file_bytes`: the tenant's uploaded files together.
    pub max_file_bytes: u64,
    /// `max_files`: how many uploaded files the tenant keeps (each costs an index entry and two
    /// inodes however small it is).
    pub max_files: usize,
    /// `max_jobs`: the tenant's fine-tuning jobs queued or running at once.
    pub max_jobs: usize,
    /// `max_job_bytes`: what the tenant's fine-tuning jobs keep on disk (adapters, served
    /// checkpoints; a job at work counts its estimate).
    pub max_job_bytes: u64,
    /// `weight`: the tenant's share of the engine while others are busy too (2: twice).
    pub weight: f64,
    /// `tokens_per_minute`, `requests_per_minute`, `max_concurrent_requests`.
    pub rate: RateLimits,
    /// `min_priority`: the most urgent (lowest) request priority the key may ask for (tenant
    /// keys: 0, so they may only defer their own requests; admin keys: any).
    pub min_priority: i32,
}

/// A tenant's rate limits (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub tokens_per_minute: Option<u64>,
    pub requests_per_minute: Option<u64>,
    pub max_concurrent_requests: Option<u64>,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            max_adapters: 16,
            max_adapter_bytes: 1 << 30,
            allow_hub: false,
            max_file_bytes: 256 << 20,
            max_files: 1000,
            max_jobs: 2,
            max_job_bytes: 1 << 30,
            weight: 1.0,
            rate: RateLimits::default(),
            min_priority: 0,
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// `None` when the server runs without keys.
    pub tenant: Option<String>,
    pub admin: bool,
    pub limits: TenantLimits,
}

impl Caller {
    pub fn open() -> Self {
        Self {
            tenant: None,
            admin: true,
            limits: TenantLimits {
                min_priority: i32::MIN,
                ..TenantLimits::default()
            },
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    tenant: String,
    #[serde(default)]
    admin: bool,
    max_adapters: Option<usize>,
    max_adapter_bytes: Option<u64>,
    #[serde(default)]
    allow_hub: bool,
    max_file_bytes: Option<u64>,
    max_files: Option<usize>,
    max_jobs: Option<usize>,
    max_job_bytes: Option<u64>,
    weight: Option<f64>,
    tokens_per_minute: Option<u64>,
    requests_per_minute: Option<u64>,
    max_concurrent_requests: Option<u64>,
    min_priority: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: std::collections::BTreeMap<String, KeyEntry>,
    max_queue_per_tenant: Option<usize>,
}

type Digest32 = [u8; 32];

fn digest(key: &str) -> Digest32 {
    Sha256::digest(key.as_bytes()).into()
}

/// Equality that takes the same time wherever the inputs differ.
fn ct_eq(a: &Digest32, b: &Digest32) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key of an `Authorization` header value: the `Bearer` scheme in any case, one space.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, key) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

/// The keys of `--api-keys`, kept as SHA-256 digests only (the file is read once and dropped).
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<(Digest32, Caller)>,
    /// `max_queue_per_tenant` at the top of the file.
    pub max_queue_per_tenant: Option<usize>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ApiKeys({} keys, {} tenants)",
            self.keys.len(),
            self.tenants()
        )
    }
}

impl ApiKeys {
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml(&path.display().to_string(), &text)
    }

    pub fn from_toml(path: &str, text: &str) -> Result<Self, AuthError> {
        let file: KeysFile = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            AuthError::Parse {
                path: path.to_string(),
                message: match line {
                    Some(l) => format!("line {l}: {}", e.message()),
                    None => e.message().to_string(),
                },
            }
        })?;
        let mut keys = Vec::new();
        for (key, entry) in file.keys {
            if crate::adapters::AdapterName::parse(&entry.tenant).is_err()
                || entry.tenant.contains('/')
            {
                return Err(AuthError::Parse {
                    path: path.to_string(),
                    message: format!(
                        "`keys.\"…\".tenant` = {:?} is not a valid tenant name",
                        entry.tenant
                    ),
                });
            }
            let defaults = TenantLimits::default();
            let bad = |message: String| AuthError::Parse {
                path: path.to_string(),
                message,
            };
            let weight = entry.weight.unwrap_or(1.0);
            if !(weight.is_finite() && (0.01..=1000.0).contains(&weight)) {
                return Err(bad(format!(
                    "`keys.\"…\".weight` = {weight} for tenant `{}`: must be between 0.01 and 1000",
                    entry.tenant
                )));
            }
            for (field, v) in [
                ("tokens_per_minute", entry.tokens_per_minute),
                ("requests_per_minute", entry.requests_per_minute),
                ("max_concurrent_requests", entry.max_concurrent_requests),
            ] {
                if v == Some(0) {
                    return Err(bad(format!(
                        "`keys.\"…\".{field}` for tenant `{}` must be at least 1 (leave it out for no limit)",
                        entry.tenant
                    )));
                }
            }
            let min_priority = entry
                .min_priority
                .unwrap_or(if entry.admin { i32::MIN } else { 0 });
            keys.push((
                digest(&key),
                Caller {
                    tenant: Some(entry.tenant),
                    admin: entry.admin,
                    limits: TenantLimits {
                        max_adapters: entry.max_adapters.unwrap_or(defaults.max_adapters),
                        max_adapter_bytes: entry
                            .max_adapter_bytes
                            .unwrap_or(defaults.max_adapter_bytes),
                        allow_hub: entry.allow_hub,
                        max_file_bytes: entry.max_file_bytes.unwrap_or(defaults.max_file_bytes),
                        max_files: entry.max_files.unwrap_or(defaults.max_files),
                        max_jobs: entry.max_jobs.unwrap_or(defaults.max_jobs),
                        max_job_bytes: entry.max_job_bytes.unwrap_or(defaults.max_job_bytes),
                        weight,
                        rate: RateLimits {
                            tokens_per_minute: entry.tokens_per_minute,
                            requests_per_minute: entry.requests_per_minute,
                            max_concurrent_requests: entry.max_concurrent_requests,
                        },
                        min_priority,
                    },
                },
            ));
        }
        if file.max_queue_per_tenant == Some(0) {
            return Err(AuthError::Parse {
                path: path.to_string(),
                message: "`max_queue_per_tenant` must be at least 1".into(),
            });
        }
        Ok(Self {
            keys,
            max_queue_per_tenant: file.max_queue_per_tenant,
        })
    }

    /// The caller a presented key belongs to. Every stored digest is compared, in constant
    /// time, whichever matches.
    pub fn caller(&self, presented: &str) -> Option<Caller> {
        let d = digest(presented);
        let mut found = None;
        for (stored, caller) in &self.keys {
            if ct_eq(stored, &d) {
                found = Some(caller);
            }
        }
        found.cloned()
    }

    /// The limits of `tenant`'s (first non-admin) key: what bounds the tenant's background work.
    pub fn limits_of(&self, tenant: &str) -> Option<TenantLimits> {
        self.keys
            .iter()
            .find(|(_, c)| !c.admin && c.tenant.as_deref() == Some(tenant))
            .map(|(_, c)| c.limits.clone())
    }

    /// Distinct tenants among the keys.
    pub fn tenants(&self) -> usize {
        let mut t: Vec<&Option<String>> = self.keys.iter().map(|(_, c)| &c.tenant).collect();
        t.sort();
        t.dedup();
        t.len()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// `--metrics-key`, kept as a digest.
#[derive(Clone)]
pub struct MetricsKey(Digest32);

impl std::fmt::Debug for MetricsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsKey(…)")
    }
}

impl MetricsKey {
    pub fn new(key: &str) -> Self {
        Self(digest(key))
    }

    pub fn matches(&self, presented: &str) -> bool {
        ct_eq(&self.0, &digest(presented))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_and_rejects_bad_tenants() {
        let k = ApiKeys::from_toml(
            "keys.toml",
            "[keys.\"sk-a\"]\ntenant = \"acme\"\n[keys.\"sk-root\"]\ntenant = \"ops\"\nadmin = true\n",
        )
        .unwrap();
        assert_eq!(
            k.caller("sk-a"),
            Some(Caller {
                tenant: Some("acme".into()),
                admin: false,
                limits: TenantLimits::default(),
            })
        );
        assert!(k.caller("sk-root").unwrap().admin);
        assert!(k.caller("nope").is_none());
        let e = ApiKeys::from_toml("keys.toml", "[keys.\"x\"]\ntenant = \"../x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys.toml") && e.contains("tenant"), "{e}");
        let e = ApiKeys::from_toml("keys.toml", "[keys.\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys.toml") && e.contains("tenant"), "{e}");
        let e = ApiKeys::from_toml(
            "keys.toml",
            "[keys.\"x\"]\ntenant = \"a\"\nmax_adaptors = 3\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line") && e.contains("max_adaptors"), "{e}");
    }

    #[test]
    fn keys_are_kept_as_digests_and_limits_parse() {
        let k = ApiKeys::from_toml(
            "keys.toml",
            "max_queue_per_tenant = 5\n[keys.\"sk-secret-1\"]\ntenant = \"a\"\nmax_adapters = 2\nallow_hub = true\n",
        )
        .unwrap();
        assert!(!format!("{k:?}").contains("sk-secret-1"));
        let c = k.caller("sk-secret-1").unwrap();
        assert_eq!((c.limits.max_adapters, c.limits.allow_hub), (2, true));
        assert_eq!(k.max_queue_per_tenant, Some(5));
        assert!(k.caller("sk-secret-").is_none());
        let e = ApiKeys::from_toml(
            "keys.toml",
            "max_queue_per_tenant = 0\n[keys.\"x\"]\ntenant = \"a\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_queue_per_tenant"), "{e}");
        assert_eq!(bearer("bEaReR  sk-x"), Some("sk-x"));
        assert_eq!(bearer("Basic sk-x"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearersk-x"), None);
    }
}
