//! Tenants, their API keys (kept only as SHA-256 hashes) and their sources.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};

use crate::backend::{self, Backend, BackendError};
use crate::config::{Config, LimitsConfig, SourceConfig};
use crate::limits::global::GlobalLimiter;
use crate::limits::TenantLimiter;

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
}

pub struct Tenant {
    pub id: String,
    pub limits: LimitsConfig,
    pub limiter: TenantLimiter,
    sources: HashMap<String, Arc<Source>>,
}

impl Tenant {
    /// Only this tenant's sources are visible; callers map `None` to the
    /// same NOT_FOUND whether the source is unknown or another tenant's.
    pub fn source(&self, name: &str) -> Option<&Arc<Source>> {
        self.sources.get(name)
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
    pub key_id: Arc<str>,
}

pub struct Tenants {
    by_key: HashMap<[u8; 32], Caller>,
    all: Vec<Arc<Tenant>>,
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Tenants {
    /// Builds every tenant and its source pools (which connect lazily).
    pub fn build(config: &Config) -> Result<Self, BackendError> {
        let mut by_key = HashMap::new();
        let mut all = Vec::new();
        let shared = GlobalLimiter::new(&config.limits).map(Arc::new);
        for (id, t) in &config.tenants {
            let mut sources = HashMap::new();
            for (name, source) in &t.sources {
                let backend = backend::connect(name, source)
                    .map_err(|e| BackendError::Invalid(format!("tenant {id}, source {name}: {e}")))?;
                sources.insert(
                    name.clone(),
                    Arc::new(Source {
                        name: name.clone(),
                        config: source.clone(),
                        backend,
                        status: RwLock::default(),
                    }),
                );
            }
            let tenant = Arc::new(Tenant {
                id: id.clone(),
                limits: t.limits.clone(),
                limiter: TenantLimiter::new(id, &t.limits, shared.clone()),
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
                        },
                    );
                }
            }
            all.push(tenant);
        }
        Ok(Self { by_key, all })
    }

    /// Looks a presented key up by its hash; the same `None` for every failure.
    pub fn authenticate(&self, key: &str) -> Option<Caller> {
        self.by_key.get(&hash_key(key)).cloned()
    }

    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.all
    }
}
