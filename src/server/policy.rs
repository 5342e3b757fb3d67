//! Tenant policy, in one place: which adapters a caller sees, which names it may register,
//! who may name filesystem paths, hub ids and pins, quotas, what `/v1/models` and `/metrics`
//! show. Routes ask; they do not re-implement checks.
//!
//! | action | anonymous (open server) | tenant | admin |
//! |---|---|---|---|
//! | use / list adapters | all | public + own namespace | all |
//! | register by name (files under the root) | yes | own namespace | any |
//! | register by `path` | allow-list | no (403) | allow-list |
//! | register by `hub_id` | yes | if its key says `allow_hub` | yes (operator's token) |
//! | `pinned: true` | yes | no (403) | yes |
//! | unload | any | own namespace | any |
//! | quotas (`max_adapters`, `max_adapter_bytes`) | — | per key | — |
//! | `/metrics` | open | no (403) | yes (or `--metrics-key`) |
//! | filesystem paths in `/v1/models` and errors | shown | hidden | shown |
//! | `resident` in `/v1/adapters` | shown | hidden | shown |
//!
//! Another tenant's adapter is reported exactly like an unknown one (404, same body).

use std::path::{Path, PathBuf};

use super::auth::{bearer, ApiKeys, Caller, MetricsKey};
use super::error::ApiError;
use crate::adapters::hub::{self, HubOptions};
use crate::adapters::registry::AdapterEntry;
use crate::adapters::{AdapterName, Registry};

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// `--adapter-path-allow` (repeatable), allowed besides the adapters root.
    pub path_allow: Vec<PathBuf>,
    /// `--metrics-key`.
    pub metrics_key: Option<MetricsKey>,
    /// `--open-metrics`: `/metrics` needs no key (an in-cluster endpoint picker sends none).
    pub open_metrics: bool,
    /// `--max-hub-adapter-bytes`: largest adapter weights file downloaded from the hub.
    pub max_hub_bytes: u64,
}

#[derive(Debug)]
pub struct Policy {
    /// Canonical directories admins' paths must lie under.
    allow: Vec<PathBuf>,
    /// The adapters root as given and canonical, cut from what tenants see.
    root_forms: Vec<String>,
    metrics_key: Option<MetricsKey>,
    open_metrics: bool,
    max_hub_bytes: u64,
}

/// Where a registration's files come from, once the policy allowed it.
#[derive(Debug, Clone)]
pub enum AdapterSource {
    Dir(PathBuf),
    Hub {
        id: String,
        options: HubOptions,
    },
    /// A kept revision registered again (a rollback).
    Kept(AdapterEntry),
}

/// The request fields a registration names (`path` is `lora_path` on vLLM's route).
pub struct Registration<'a> {
    pub name: &'a str,
    pub path: Option<&'a str>,
    pub path_field: &'a str,
    pub hub_id: Option<&'a str>,
    pub pinned: bool,
    /// Register this kept revision of the name again (`revision`), or the one before the
    /// current (`rollback`).
    pub revision: Option<u64>,
    pub rollback: bool,
}

const TENANT_PATH: &str =
    "tenants may not name filesystem paths; register an adapter of your namespace by its name";

impl Policy {
    /// Whose files and fine-tuning jobs `caller` sees: an admin (or anyone on a server without
    /// keys) all of them (`None`), a tenant only its own (`Some(Some(tenant))`).
    pub fn owner_scope(caller: &Caller) -> Option<Option<&str>> {
        if caller.admin {
            None
        } else {
            Some(caller.tenant.as_deref())
        }
    }

    pub fn new(config: PolicyConfig, adapters_root: &Path) -> Self {
        // A directory that does not exist (yet) allows nothing.
        let allow = std::iter::once(adapters_root)
            .chain(config.path_allow.iter().map(PathBuf::as_path))
            .filter_map(|d| d.canonicalize().ok())
            .collect();
        let mut root_forms: Vec<String> = [
            Some(adapters_root.to_path_buf()),
            adapters_root.canonicalize().ok(),
        ]
        .into_iter()
        .flatten()
        .map(|p| p.display().to_string())
        .filter(|p| !p.is_empty())
        .collect();
        root_forms.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Self {
            allow,
            root_forms,
            metrics_key: config.metrics_key,
            open_metrics: config.open_metrics,
            max_hub_bytes: config.max_hub_bytes,
        }
    }

    /// Whether `caller` may see `name`: public adapters, its own namespace, everything for
    /// admins and on an open server.
    pub fn visible(caller: &Caller, name: &AdapterName) -> bool {
        caller.admin
            || caller.tenant.is_none()
            || name.tenant.is_none()
            || name.tenant == caller.tenant
    }

    /// The registry name `requested` refers to for `caller` (a tenant may say `name` for
    /// `tenant/name`); anything it may not see is reported exactly like an unknown adapter.
    pub fn find(
        caller: &Caller,
        registry: &Registry,
        requested: &str,
    ) -> Result<AdapterEntry, ApiError> {
        let not_found = || ApiError::ModelNotFound(requested.to_string());
        // `name@REVISION`: that revision, the current one or one kept (`@` is in no name).
        let (requested_name, revision) = match requested.rsplit_once('@') {
            Some((n, r)) => (n, Some(r.parse::<u64>().map_err(|_| not_found())?)),
            None => (requested, None),
        };
        let name = AdapterName::parse(requested_name).map_err(|_| not_found())?;
        let mut candidates = Vec::new();
        if let (None, Some(t)) = (&name.tenant, &caller.tenant) {
            candidates.push(AdapterName {
                tenant: Some(t.clone()),
                name: name.name.clone(),
            });
        }
        candidates.push(name);
        candidates
            .into_iter()
            .filter(|c| Self::visible(caller, c))
            .find_map(|c| match revision {
                Some(r) => registry.get_revision(&c, r).ok(),
                None => registry.get(&c).ok(),
            })
            .ok_or_else(not_found)
    }

    /// The page of adapters `caller` may list (`lead` ids come before them: the base model in
    /// `/v1/models`), and whether more follow. Only the page's adapters are checked on disk: a
    /// name whose directory went away since the index was read drops out of its page.
    pub fn listing(
        caller: &Caller,
        registry: &Registry,
        page: &super::pages::Page,
        lead: &[String],
    ) -> (Vec<AdapterEntry>, bool, bool) {
        let names: Vec<AdapterName> = registry
            .names()
            .into_iter()
            .filter(|n| Self::visible(caller, n))
            .collect();
        let mut ids = lead.to_vec();
        ids.extend(names.iter().map(AdapterName::key));
        let (range, more) = page.window(&ids, lead.len());
        let with_lead = range.start < lead.len();
        let entries = names[range.start.saturating_sub(lead.len())..range.end - lead.len()]
            .iter()
            .filter_map(|n| registry.get(n).ok())
            .collect();
        (entries, with_lead, more)
    }

    /// The name `caller` may register or remove: a tenant's names live in its namespace; only
    /// admins act outside it. Another tenant's name is reported exactly like an unknown one.
    pub fn owned_name(caller: &Caller, requested: &str) -> Result<AdapterName, ApiError> {
        let mut name = AdapterName::parse(requested)?;
        if caller.admin {
            return Ok(name);
        }
        match (&name.tenant, &caller.tenant) {
            (None, Some(t)) => name.tenant = Some(t.clone()),
            (Some(n), Some(t)) if n == t => {}
            (Some(_), Some(_)) => return Err(ApiError::ModelNotFound(requested.to_string())),
            (_, None) => {}
        }
        Ok(name)
    }

    /// Decides a registration: the name, where its files come from. Nothing on disk is touched
    /// for what a tenant may not do, so refusals say nothing about the filesystem.
    pub fn registration(
        &self,
        caller: &Caller,
        registry: &Registry,
        r: &Registration,
    ) -> Result<(AdapterName, AdapterSource), ApiError> {
        let name = Self::owned_name(caller, r.name)?;
        if r.pinned && !caller.admin {
            return Err(ApiError::forbidden(
                "pinned",
                "only admins may pin adapters",
            ));
        }
        if r.revision.is_some() || r.rollback {
            let field = if r.rollback { "rollback" } else { "revision" };
            if r.path.is_some() || r.hub_id.is_some() {
                return Err(ApiError::bad(
                    field,
                    format!(
                        "`{field}` restores a kept revision: give no `{}` or `hub_id` with it",
                        r.path_field
                    ),
                ));
            }
            if r.rollback && r.revision.is_some() {
                return Err(ApiError::bad(
                    "rollback",
                    "give `rollback` or `revision`, not both",
                ));
            }
            let kept = match r.revision {
                Some(rev) => registry.get_revision(&name, rev),
                None => registry.previous(&name),
            }
            .map_err(|_| match r.revision {
                Some(rev) => ApiError::ModelNotFound(format!("{}@{rev}", r.name)),
                None => ApiError::bad(
                    "rollback",
                    format!(
                        "`{}` has no earlier revision kept (`--adapter-revisions`)",
                        r.name
                    ),
                ),
            })?;
            return Ok((name, AdapterSource::Kept(kept)));
        }
        let source = match (r.path, r.hub_id) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad(
                    r.path_field,
                    format!("give at most one of `{}` and `hub_id`", r.path_field),
                ))
            }
            (Some(_), None) if !caller.admin => {
                return Err(ApiError::forbidden(r.path_field, TENANT_PATH))
            }
            (Some(p), None) => AdapterSource::Dir(self.allowed_path(p, r.path_field)?),
            (None, Some(id)) => {
                if !caller.admin && !caller.limits.allow_hub {
                    return Err(ApiError::forbidden(
                        "hub_id",
                        "this key may not add adapters from the hub",
                    ));
                }
                hub::validate_id(id).map_err(|e| ApiError::bad("hub_id", e.to_string()))?;
                AdapterSource::Hub {
                    id: id.to_string(),
                    options: HubOptions {
                        use_token: caller.admin,
                        max_bytes: self.max_hub_bytes,
                    },
                }
            }
            (None, None) => AdapterSource::Dir(
                registry
                    .directory(&name)
                    .ok_or_else(|| ApiError::ModelNotFound(r.name.to_string()))?,
            ),
        };
        Ok((name, source))
    }

    /// An admin's path, symlinks resolved, when it lies under the allow-list.
    fn allowed_path(&self, path: &str, field: &str) -> Result<PathBuf, ApiError> {
        let real = Path::new(path)
            .canonicalize()
            .map_err(|e| ApiError::bad(field, format!("`{field}` {path}: {e}")))?;
        if self.allow.iter().any(|a| real.starts_with(a)) {
            Ok(real)
        } else {
            Err(ApiError::forbidden(
                field,
                format!("`{field}` {path} resolves outside the allowed directories (`--adapter-path-allow`)"),
            ))
        }
    }

    /// A tenant's run-time registrations stay within its key's quotas; registering a name
    /// again replaces it and is not counted twice.
    pub fn check_quota(
        caller: &Caller,
        registry: &Registry,
        name: &AdapterName,
        bytes: u64,
    ) -> Result<(), ApiError> {
        let (Some(tenant), false) = (&caller.tenant, caller.admin) else {
            return Ok(());
        };
        let (mut count, mut total) = registry.added_by(tenant);
        if let Ok(old) = registry.get(name) {
            if old.added {
                count -= 1;
                total -= old.bytes;
            }
        }
        let limits = &caller.limits;
        if count + 1 > limits.max_adapters {
            return Err(ApiError::forbidden(
                "name",
                format!(
                    "quota: your key allows {} run-time adapters (`max_adapters`); remove one first",
                    limits.max_adapters
                ),
            ));
        }
        if total + bytes > limits.max_adapter_bytes {
            return Err(ApiError::forbidden(
                "name",
                format!(
                    "quota: {} more bytes of adapter weights would exceed `max_adapter_bytes` ({})",
                    bytes, limits.max_adapter_bytes
                ),
            ));
        }
        Ok(())
    }

    /// What an error says to `caller`: tenants see adapter files named relative to the
    /// adapters root (`acme/x/adapter_model.safetensors`), never the server's paths.
    pub fn redact(&self, caller: &Caller, err: ApiError) -> ApiError {
        if Self::shows_paths(caller) {
            return err;
        }
        let cut = |m: String| {
            self.root_forms.iter().fold(m, |m, root| {
                m.replace(&format!("{root}/"), "")
                    .replace(root.as_str(), "")
            })
        };
        match err {
            ApiError::BadRequest { message, param } => ApiError::BadRequest {
                message: cut(message),
                param,
            },
            other => other,
        }
    }

    /// Whether `caller` may see which adapters are resident: for a public adapter that tells
    /// whether another tenant used it lately.
    pub fn shows_cache(caller: &Caller) -> bool {
        caller.admin
    }

    /// Whether a filesystem path may be shown to `caller` (`/v1/models` `root`).
    pub fn shows_paths(caller: &Caller) -> bool {
        caller.admin
    }

    /// `/metrics`: open on an open server without a metrics key, or with `--open-metrics`; else
    /// the metrics key or an admin key. A tenant's key is refused: the series name adapters of
    /// every tenant.
    pub fn scrape(
        &self,
        keys: Option<&ApiKeys>,
        authorization: Option<&str>,
    ) -> Result<(), ApiError> {
        if self.open_metrics {
            return Ok(());
        }
        let presented = authorization.and_then(bearer);
        if let (Some(mk), Some(p)) = (&self.metrics_key, presented) {
            if mk.matches(p) {
                return Ok(());
            }
        }
        match (keys, presented) {
            (None, _) if self.metrics_key.is_none() => Ok(()),
            (Some(keys), Some(p)) => match keys.caller(p) {
                Some(c) if c.admin => Ok(()),
                Some(_) => Err(ApiError::forbidden(
                    "authorization",
                    "`/metrics` needs an admin key or the metrics key",
                )),
                None => Err(ApiError::Unauthorized),
            },
            _ => Err(ApiError::Unauthorized),
        }
    }

    /// Each tenant's share of the waiting queue: the keys file's `max_queue_per_tenant`, else
    /// `max_queue` split evenly over the tenants the keys name.
    pub fn queue_share(keys: Option<&ApiKeys>, max_queue: usize) -> usize {
        match keys {
            None => max_queue,
            Some(k) => k
                .max_queue_per_tenant
                .unwrap_or_else(|| max_queue.div_ceil(k.tenants().max(1)))
                .max(1),
        }
    }
}
