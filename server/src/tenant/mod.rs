//! Tenants, the ways they authenticate (API keys kept only as SHA-256
//! hashes, JWTs, client certificates) and their sources. The whole set is
//! one immutable snapshot; a reload builds the next one beside it.

pub mod reload;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};

use crate::backend::{self, Backend, BackendError};
use crate::config::{Config, GlobalLimitsConfig, LimitsConfig, SourceConfig};
use crate::limits::global::GlobalLimiter;
use crate::limits::TenantLimiter;
use crate::metrics::{SourceMetrics, TenantMetrics};
use crate::transport::jwt::{looks_like_jwt, JwtVerifier};

/// Live state of a source, refreshed by the health checker.
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    pub healthy: bool,
    pub server_version: String,
}

pub struct Source {
    pub name: String,
    pub config: SourceConfig,
    pub backend: Backend,
    pub status: RwLock<SourceStatus>,
    /// SHA-256 of the password as read, so a reload notices a rotated Secret.
    secret: [u8; 32],
    returned: SourceMetrics,
    /// `DeleteSubscription` opens a session outside the pool: one at a time
    /// per source, which `backend_hosts` counts.
    pub deletes: tokio::sync::Semaphore,
}

impl Source {
    /// Counts rows and bytes this source returned to a caller.
    pub fn count_returned(&self, rows: u64, bytes: u64) {
        self.returned.returned(rows, bytes);
    }
}

pub struct Tenant {
    pub id: String,
    pub limits: LimitsConfig,
    pub limiter: Arc<TenantLimiter>,
    /// Put SQL text in the audit log.
    pub audit_sql: bool,
    pub metrics: TenantMetrics,
    sources: HashMap<String, Arc<Source>>,
}

impl Tenant {
    /// Only this tenant's sources are visible; callers map `None` to the
    /// same NOT_FOUND whether the source is unknown or another tenant's.
    pub fn source(&self, name: &str) -> Option<&Arc<Source>> {
        self.sources.get(name)
    }

    /// Counts rows and bytes one of this tenant's sources, named, returned to a caller.
    pub fn count_returned(&self, source: &str, rows: u64, bytes: u64) {
        if let Some(source) = self.sources.get(source) {
            source.count_returned(rows, bytes);
        }
    }

    pub fn sources(&self) -> impl Iterator<Item = &Arc<Source>> {
        let mut all: Vec<_> = self.sources.values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.into_iter()
    }
}

/// The authenticated caller, put into request extensions by the auth layer.
#[derive(Clone)]
pub struct Caller {
    pub tenant: Arc<Tenant>,
    /// The API key's id, `jwt:<sub>` or `cert:<name>`: for logs, never a secret.
    pub key_id: Arc<str>,
    /// How long this call waited for its turn at the tenant's request rate
    /// (set by the limits layer; reported in `QueryStats.queued`).
    pub rate_wait: Duration,
}

pub struct Tenants {
    by_key: HashMap<[u8; 32], Caller>,
    /// Client-certificate names (mTLS) and the tenant each one is.
    by_identity: HashMap<String, Arc<Tenant>>,
    jwt: Option<JwtVerifier>,
    all: Vec<Arc<Tenant>>,
    shared: Option<Arc<GlobalLimiter>>,
    global: GlobalLimitsConfig,
}

/// What changed in a reload, for its log line.
#[derive(Debug, Default)]
pub struct Changes {
    pub sources_kept: usize,
    pub sources_new: usize,
    pub sources_dropped: usize,
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn secret_hash(source: &SourceConfig) -> Result<[u8; 32], String> {
    Ok(source
        .password()?
        .map_or([0; 32], |p| Sha256::digest(p.as_bytes()).into()))
}

impl Tenants {
    /// Builds every tenant and its source pools (which connect lazily).
    pub fn build(config: &Config) -> Result<Self, BackendError> {
        Self::rebuild(config, None).map(|(t, _)| t)
    }

    /// Builds the tenants of `config`, keeping from `previous` every source
    /// whose settings and password are unchanged (its pool and open
    /// connections go on serving) and every limiter whose limits are (its
    /// buckets and slots in use stay counted).
    pub fn rebuild(config: &Config, previous: Option<&Tenants>) -> Result<(Self, Changes), BackendError> {
        let mut changes = Changes::default();
        let mut by_key = HashMap::new();
        let mut by_identity = HashMap::new();
        let mut all = Vec::new();
        let same_global = previous.filter(|p| p.global == config.limits);
        let shared = match same_global {
            Some(p) => p.shared.clone(),
            None => GlobalLimiter::new(&config.limits).map(Arc::new),
        };
        let jwt = config
            .auth
            .jwt
            .as_ref()
            .map(JwtVerifier::new)
            .transpose()
            .map_err(|e| BackendError::Invalid(format!("auth.jwt: {e}")))?;
        for (id, t) in &config.tenants {
            let old = previous.and_then(|p| p.all.iter().find(|o| &o.id == id));
            let mut sources = HashMap::new();
            for (name, source) in &t.sources {
                let context = |e: String| BackendError::Invalid(format!("tenant {id}, source {name}: {e}"));
                let secret = secret_hash(source).map_err(context)?;
                let kept = old
                    .and_then(|o| o.sources.get(name))
                    .filter(|o| o.config == *source && o.secret == secret);
                let source = match kept {
                    Some(s) => {
                        changes.sources_kept += 1;
                        s.clone()
                    }
                    None => {
                        changes.sources_new += 1;
                        let backend = backend::connect(name, source).map_err(|e| context(e.to_string()))?;
                        Arc::new(Source {
                            name: name.clone(),
                            config: source.clone(),
                            backend,
                            status: RwLock::default(),
                            secret,
                            returned: SourceMetrics::new(id, name),
                            deletes: tokio::sync::Semaphore::new(1),
                        })
                    }
                };
                sources.insert(name.clone(), source);
            }
            if let Some(o) = old {
                changes.sources_dropped += o.sources.keys().filter(|n| !sources.contains_key(*n)).count();
            }
            let limiter = match old {
                Some(o) if o.limits == t.limits && same_global.is_some() => o.limiter.clone(),
                _ => Arc::new(TenantLimiter::new(
                    id,
                    &t.limits,
                    shared.clone(),
                    old.map(|o| o.limiter.as_ref()),
                )),
            };
            let tenant = Arc::new(Tenant {
                id: id.clone(),
                limits: t.limits.clone(),
                limiter,
                audit_sql: t.audit_sql,
                metrics: TenantMetrics::new(id),
                sources,
            });
            for key in &t.api_keys {
                let mut hash = [0u8; 32];
                // validate() has checked these are 64 hex digits.
                if hex::decode_to_slice(&key.sha256, &mut hash).is_ok() {
                    by_key.insert(
                        hash,
                        Caller {
                            tenant: tenant.clone(),
                            key_id: key.id.as_str().into(),
                            rate_wait: Duration::ZERO,
                        },
                    );
                }
            }
            for identity in &t.client_identities {
                by_identity.insert(identity.clone(), tenant.clone());
            }
            all.push(tenant);
        }
        if let Some(p) = previous {
            changes.sources_dropped += p
                .all
                .iter()
                .filter(|o| !config.tenants.contains_key(&o.id))
                .map(|o| o.sources.len())
                .sum::<usize>();
        }
        Ok((
            Self {
                by_key,
                by_identity,
                jwt,
                all,
                shared,
                global: config.limits.clone(),
            },
            changes,
        ))
    }

    /// The caller a bearer token (API key or JWT) and a verified client
    /// certificate's names make; the same `Err` for every failure, with the
    /// reason for the server's log only. When both are presented they must
    /// be the same tenant's.
    pub fn authenticate(&self, bearer: Option<&str>, identities: &[String]) -> Result<Caller, String> {
        let mut matches = identities
            .iter()
            .filter_map(|name| self.by_identity.get(name).map(|t| (name, t)));
        let by_cert = matches.next();
        // A certificate whose names are two tenants' identities is neither's:
        // which one it would be must not depend on the order of its names.
        if let Some((_, first)) = by_cert {
            if let Some((_, other)) = matches.find(|(_, t)| t.id != first.id) {
                return Err(format!(
                    "the client certificate names identities of two tenants ({} and {})",
                    first.id, other.id
                ));
            }
        }
        let Some(token) = bearer else {
            return match by_cert {
                Some((name, tenant)) => Ok(Caller {
                    tenant: tenant.clone(),
                    key_id: format!("cert:{name}").into(),
                    rate_wait: Duration::ZERO,
                }),
                None if identities.is_empty() => Err("no credentials".into()),
                None => Err(format!("no tenant has a client identity among {identities:?}")),
            };
        };
        let caller = self.bearer(token)?;
        match by_cert {
            Some((_, tenant)) if tenant.id != caller.tenant.id => Err(format!(
                "the bearer token is tenant {}'s, the client certificate tenant {}'s",
                caller.tenant.id, tenant.id
            )),
            _ => Ok(caller),
        }
    }

    fn bearer(&self, token: &str) -> Result<Caller, String> {
        if let Some(caller) = self.by_key.get(&hash_key(token)) {
            return Ok(caller.clone());
        }
        match &self.jwt {
            Some(jwt) if looks_like_jwt(token) => {
                let identity = jwt.verify(token).map_err(|e| format!("JWT rejected: {e}"))?;
                let tenant = self
                    .all
                    .iter()
                    .find(|t| t.id == identity.tenant)
                    .ok_or_else(|| format!("JWT for unknown tenant {:?}", identity.tenant))?;
                Ok(Caller {
                    tenant: tenant.clone(),
                    key_id: format!("jwt:{}", identity.subject).into(),
                    rate_wait: Duration::ZERO,
                })
            }
            _ => Err("unknown API key".into()),
        }
    }

    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_with_two_tenants_identities_is_neither_tenant() {
        let config = Config::from_toml(
            "[tenants.a]\nclient_identities = [\"a.internal\"]\n[tenants.b]\nclient_identities = [\"b.internal\"]\n",
        )
        .expect("config");
        let tenants = Tenants::build(&config).expect("tenants");
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let caller = tenants.authenticate(None, &names(&["other", "a.internal"])).expect("a");
        assert_eq!(caller.tenant.id, "a");
        for both in [["a.internal", "b.internal"], ["b.internal", "a.internal"]] {
            let err = tenants.authenticate(None, &names(&both)).err().expect("refused");
            assert!(err.contains("two tenants"), "{err}");
        }
    }
}
