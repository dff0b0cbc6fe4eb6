//! Tenants, the ways they authenticate (API keys kept only as SHA-256
//! hashes, JWTs, client certificates) and their sources. The whole set is
//! one immutable snapshot; a reload builds the next one beside it.

pub mod reload;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::backend::{self, Backend, BackendError};
use crate::config::{Config, GlobalLimitsConfig, LimitsConfig, SourceConfig};
use crate::limits::global::GlobalLimiter;
use crate::limits::TenantLimiter;
use crate::metrics::{SourceMetrics, TenantMetrics};
use crate::transport::jwt::{looks_like_jwt, JwtVerifier};

/// Live state of a source, refreshed by the health checker and by
/// TestConnection.
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    pub healthy: bool,
    pub server_version: String,
    /// Probes failed in a row since the source last answered.
    failures: u32,
}

/// Failed probes in a row that take a source that was up down. One slow
/// answer (a checkpoint, the first second of a failover) would otherwise
/// take every replica out of service at once, and clients that watch
/// health would drop them all; a source never up is down at its first.
const DOWN_AFTER: u32 = 2;

impl SourceStatus {
    /// The source answered (with its version, when the probe learned it),
    /// or was too busy to: every connection in use is not a source down.
    pub fn answered(&mut self, server_version: Option<String>) {
        self.healthy = true;
        self.failures = 0;
        if let Some(version) = server_version {
            self.server_version = version;
        }
    }

    /// Records a failed probe; whether the source went down with it.
    pub fn failed(&mut self) -> bool {
        self.failures = self.failures.saturating_add(1);
        let went_down = self.healthy && self.failures >= DOWN_AFTER;
        if went_down {
            self.healthy = false;
        }
        went_down
    }

    /// Up, with a failed probe still to be confirmed by the next.
    pub fn in_doubt(&self) -> bool {
        self.healthy && self.failures > 0
    }
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
    /// Cancelled once a reload removed the source or pointed it at another
    /// server, database or login: its transactions and change streams end.
    pub retired: CancellationToken,
    /// Set, before `retired` is cancelled, when the reload removed the source.
    pub removed: Arc<std::sync::atomic::AtomicBool>,
}

impl Source {
    /// Records a failed probe (the health monitor's, or a TestConnection),
    /// and says so when the source goes down with it.
    pub fn probe_failed(&self, tenant: &str) {
        if self.status.write().failed() {
            tracing::warn!(tenant, source = self.name, "source became unreachable");
        }
    }

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
    /// Behind a lock so that a reload can point an older snapshot, still
    /// held by a long call, at the sources in force (see
    /// [`Tenants::let_go_of_replaced_sources`]).
    sources: RwLock<HashMap<String, Arc<Source>>>,
    /// The revocation of every call made with a JWT for this tenant.
    jwt_revoked: Revocation,
}

impl Tenant {
    /// Only this tenant's sources are visible; callers map `None` to the
    /// same NOT_FOUND whether the source is unknown or another tenant's.
    pub fn source(&self, name: &str) -> Option<Arc<Source>> {
        self.sources.read().get(name).cloned()
    }

    /// Counts rows and bytes one of this tenant's sources, named, returned to a caller.
    pub fn count_returned(&self, source: &str, rows: u64, bytes: u64) {
        if let Some(source) = self.sources.read().get(source) {
            source.count_returned(rows, bytes);
        }
    }

    pub fn sources(&self) -> impl Iterator<Item = Arc<Source>> {
        let mut all: Vec<_> = self.sources.read().values().cloned().collect();
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
    /// (set at admission; reported in `QueryStats.queued`).
    pub rate_wait: Duration,
    /// When the client's deadline (`grpc-timeout`) passes, counted from the
    /// call's arrival as the transport counts it (set at admission).
    pub deadline: Option<tokio::time::Instant>,
    /// Cancelled when a reload takes away the credential this call was made
    /// with (the key, the client identity, the tenant, or the JWT settings),
    /// and for every call when the shutdown grace is over: the call's
    /// statements, streams and loads end, its transactions are rolled back.
    pub revoked: Revocation,
    /// When the credential stops being valid (a JWT's `exp` plus the
    /// leeway, a client certificate's end of validity): calls still
    /// running then end. None for keys.
    pub expires: Option<tokio::time::Instant>,
}

/// A credential's revocation. Shared behind an `Arc`: cloning a token takes
/// its node's mutex, and every call clones its caller's.
pub type Revocation = Arc<CancellationToken>;

/// How long until `moment` by the wall clock; zero once it has passed.
fn time_left(moment: std::time::SystemTime) -> Duration {
    moment.duration_since(std::time::SystemTime::now()).unwrap_or_default()
}

pub struct Tenants {
    by_key: HashMap<[u8; 32], Caller>,
    /// Client-certificate names (mTLS), the tenant each one is, and the
    /// revocation of the calls made with it.
    by_identity: HashMap<String, (Arc<Tenant>, Revocation)>,
    jwt: Option<JwtVerifier>,
    all: Vec<Arc<Tenant>>,
    shared: Option<Arc<GlobalLimiter>>,
    global: GlobalLimitsConfig,
    /// The tenants of every earlier snapshot that a call still holds (see
    /// [`Tenants::let_go_of_replaced_sources`]).
    superseded: parking_lot::Mutex<Vec<Weak<Tenant>>>,
}

/// What changed in a reload, for its log line.
#[derive(Debug, Default)]
pub struct Changes {
    pub sources_kept: usize,
    pub sources_new: usize,
    pub sources_dropped: usize,
    /// API keys, client identities and tenants' JWT callers taken away,
    /// whose calls in progress were ended.
    pub credentials_revoked: usize,
    /// Sources kept as they were because what their new settings need
    /// could not be read (a password file deleted for a while), each with
    /// why: the rest of the reload (a key revoked, say) still applies.
    pub sources_stale: Vec<String>,
    /// Why the server's TLS files in force were kept, when the new ones
    /// could not be used.
    pub tls_kept: Option<String>,
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// SHA-256 of the password as read and of the files the source's
/// connections read (its CA bundle, Kafka's certificates and keys), so that
/// a reload notices a rotated Secret or a renewed certificate and gives the
/// source a new pool. A file that cannot be read counts as its error: the
/// source's own setup says what is wrong with it.
fn secret_hash(source: &SourceConfig) -> Result<[u8; 32], String> {
    let mut hash = Sha256::new();
    if let Some(password) = source.password()? {
        hash.update(password.as_bytes());
    }
    for file in source.credential_files() {
        match std::fs::read(&file) {
            Ok(bytes) => hash.update(Sha256::digest(&bytes)),
            Err(e) => hash.update(e.kind().to_string().as_bytes()),
        }
    }
    Ok(hash.finalize().into())
}

impl Tenants {
    /// The shared (Redis) limits, when configured.
    pub fn shared_limits(&self) -> Option<&Arc<GlobalLimiter>> {
        self.shared.as_ref()
    }

    /// Builds every tenant and its source pools (which connect lazily).
    pub fn build(config: &Config, stop: &CancellationToken) -> Result<Self, BackendError> {
        Self::rebuild(config, None, stop).map(|(t, _)| t)
    }

    /// Builds the tenants of `config`, keeping from `previous` every source
    /// whose settings and password are unchanged (its pool and open
    /// connections go on serving) and every limiter whose limits are (its
    /// buckets and slots in use stay counted).
    /// Credentials' revocation tokens are children of `stop`, which ends
    /// every call in progress when cancelled (the shutdown grace is over).
    pub fn rebuild(
        config: &Config,
        previous: Option<&Tenants>,
        stop: &CancellationToken,
    ) -> Result<(Self, Changes), BackendError> {
        let fresh = || Arc::new(stop.child_token());
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
        // Calls made with a JWT stay valid only while the tokens that made
        // them would still verify: the same issuer, key and settings.
        let same_jwt = |p: &&Tenants| match (&p.jwt, &jwt) {
            (Some(was), Some(now)) => now.keeps_tokens_of(was),
            _ => false,
        };
        let jwt_kept = previous.filter(same_jwt);
        for (id, t) in &config.tenants {
            let old = previous.and_then(|p| p.all.iter().find(|o| &o.id == id));
            let mut sources = HashMap::new();
            for (name, source) in &t.sources {
                let context = |e: String| BackendError::Invalid(format!("tenant {id}, source {name}: {e}"));
                let in_force = old.and_then(|o| o.source(name));
                let secret = match (secret_hash(source), &in_force) {
                    (Ok(secret), _) => secret,
                    // Its Secret unreadable for a while: the source serves on
                    // as it was, rather than holding up the whole reload. Not
                    // when the edit changes more of it (a narrower allow-list,
                    // read_only): that edit would be silently left out, so
                    // the reload is refused, as for any other bad setting.
                    (Err(e), Some(kept)) if kept.config.same_but_password(source) => {
                        changes.sources_stale.push(format!("tenant {id}, source {name}: {e}"));
                        sources.insert(name.clone(), kept.clone());
                        continue;
                    }
                    (Err(e), _) => return Err(context(e)),
                };
                let kept = in_force.as_ref().filter(|o| o.config == *source && o.secret == secret);
                let source = match kept {
                    Some(s) => {
                        changes.sources_kept += 1;
                        s.clone()
                    }
                    None => {
                        changes.sources_new += 1;
                        let same_target = in_force.as_ref().filter(|o| o.config.same_target(source));
                        let backend = backend::connect(name, source, same_target.map(|o| &o.backend))
                            .map_err(|e| context(e.to_string()))?;
                        Arc::new(Source {
                            name: name.clone(),
                            config: source.clone(),
                            backend,
                            // Where it reaches is unchanged (a password
                            // rotated, pool settings): so is what the probes
                            // found there, until the next probe says otherwise.
                            status: RwLock::new(
                                same_target.map_or_else(SourceStatus::default, |o| o.status.read().clone()),
                            ),
                            secret,
                            returned: SourceMetrics::new(id, name),
                            deletes: tokio::sync::Semaphore::new(1),
                            // One token for a source's whole line of pools
                            // that reach the same place: work begun on an
                            // older one ends when the source moves too.
                            retired: same_target.map_or_else(CancellationToken::new, |o| o.retired.clone()),
                            removed: same_target.map_or_else(Arc::default, |o| o.removed.clone()),
                        })
                    }
                };
                sources.insert(name.clone(), source);
            }
            if let Some(o) = old {
                changes.sources_dropped += o.sources.read().keys().filter(|n| !sources.contains_key(*n)).count();
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
                sources: RwLock::new(sources),
                jwt_revoked: jwt_kept.and(old).map_or_else(fresh, |o| o.jwt_revoked.clone()),
            });
            for key in &t.api_keys {
                let mut hash = [0u8; 32];
                // validate() has checked these are 64 hex digits.
                if hex::decode_to_slice(&key.sha256, &mut hash).is_ok() {
                    // A key that stays the same tenant's keeps its calls going.
                    let revoked = previous
                        .and_then(|p| p.by_key.get(&hash))
                        .filter(|c| c.tenant.id == *id)
                        .map_or_else(fresh, |c| c.revoked.clone());
                    by_key.insert(
                        hash,
                        Caller {
                            tenant: tenant.clone(),
                            key_id: key.id.as_str().into(),
                            rate_wait: Duration::ZERO,
                            deadline: None,
                            expires: None,
                            revoked,
                        },
                    );
                }
            }
            for identity in &t.client_identities {
                let revoked = previous
                    .and_then(|p| p.by_identity.get(identity))
                    .filter(|(t, _)| t.id == *id)
                    .map_or_else(fresh, |(_, r)| r.clone());
                by_identity.insert(identity.clone(), (tenant.clone(), revoked));
            }
            all.push(tenant);
        }
        if let Some(p) = previous {
            changes.sources_dropped += p
                .all
                .iter()
                .filter(|o| !config.tenants.contains_key(&o.id))
                .map(|o| o.sources.read().len())
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
                superseded: parking_lot::Mutex::default(),
            },
            changes,
        ))
    }

    /// The caller a bearer token (API key or JWT) and a verified client
    /// certificate's names make; the same `Err` for every failure, with the
    /// reason for the server's log only. When both are presented they must
    /// be the same tenant's.
    /// `not_after`: when the client certificate that `identities` come
    /// from stops being valid. A connection outlives its certificate: calls
    /// made on it are refused after that, and end then if still running.
    pub fn authenticate(
        &self,
        bearer: Option<&str>,
        identities: &[String],
        not_after: Option<std::time::SystemTime>,
    ) -> Result<Caller, String> {
        let mut matches = identities
            .iter()
            .filter_map(|name| self.by_identity.get(name).map(|(t, revoked)| (name, t, revoked)));
        let by_cert = matches.next();
        // A certificate whose names are two tenants' identities is neither's:
        // which one it would be must not depend on the order of its names.
        if let Some((_, first, _)) = by_cert {
            if let Some((_, other, _)) = matches.find(|(_, t, _)| t.id != first.id) {
                return Err(format!(
                    "the client certificate names identities of two tenants ({} and {})",
                    first.id, other.id
                ));
            }
        }
        let cert_expires = match not_after {
            Some(at) if by_cert.is_some() => match at.duration_since(std::time::SystemTime::now()) {
                Ok(left) => Some(tokio::time::Instant::now() + left),
                Err(_) => return Err("the client certificate has expired".into()),
            },
            _ => None,
        };
        let Some(token) = bearer else {
            return match by_cert {
                Some((name, tenant, revoked)) => Ok(Caller {
                    tenant: tenant.clone(),
                    key_id: format!("cert:{name}").into(),
                    rate_wait: Duration::ZERO,
                    deadline: None,
                    expires: cert_expires,
                    revoked: revoked.clone(),
                }),
                None if identities.is_empty() => Err("no credentials".into()),
                None => Err(format!("no tenant has a client identity among {identities:?}")),
            };
        };
        let caller = self.bearer(token)?;
        match by_cert {
            Some((_, tenant, _)) if tenant.id != caller.tenant.id => Err(format!(
                "the bearer token is tenant {}'s, the client certificate tenant {}'s",
                caller.tenant.id, tenant.id
            )),
            // Whichever of the token and the certificate ends first.
            _ => Ok(Caller {
                expires: match (caller.expires, cert_expires) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
                ..caller
            }),
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
                    deadline: None,
                    revoked: tenant.jwt_revoked.clone(),
                    // None past what the clock can hold: not in this process's lifetime.
                    expires: identity
                        .valid_until
                        .and_then(|t| tokio::time::Instant::now().checked_add(time_left(t))),
                })
            }
            _ => Err("unknown API key".into()),
        }
    }

    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.all
    }

    /// Ends the Kafka streams of `previous`'s sources that this snapshot
    /// replaced or removed, where they read a topic the source in force (if
    /// any) no longer allows: a narrowed allow-list must not leave consumers
    /// reading what it took away. Streams of topics still allowed go on.
    pub fn retire_replaced_topics(&self, previous: &Tenants) {
        for old_tenant in &previous.all {
            let tenant = self.all.iter().find(|t| t.id == old_tenant.id);
            for (name, old) in old_tenant.sources.read().iter() {
                let Ok(old_topics) = old.backend.topics() else {
                    continue;
                };
                let current = tenant.and_then(|t| t.source(name));
                if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, old)) {
                    continue;
                }
                let allowed = current.as_ref().and_then(|c| c.backend.topics().ok());
                old_topics.retire(&|topic| allowed.is_some_and(|a| a.allows(topic)));
            }
        }
    }

    /// Retires `previous`'s sources that this snapshot removed or pointed
    /// elsewhere (see [`SourceConfig::same_target`]): work in progress on
    /// them would otherwise go on reaching what the configuration no longer
    /// names, as a login it replaced (a read-only one, say) for as long as
    /// a transaction or a change stream lasts.
    pub fn retire_replaced_sources(&self, previous: &Tenants) {
        for old_tenant in &previous.all {
            let tenant = self.all.iter().find(|t| t.id == old_tenant.id);
            for (name, old) in old_tenant.sources.read().iter() {
                let current = tenant.and_then(|t| t.source(name));
                if current.is_none() {
                    old.removed.store(true, std::sync::atomic::Ordering::Release);
                }
                if !current.is_some_and(|c| c.config.same_target(&old.config)) {
                    old.retired.cancel();
                }
            }
        }
    }

    /// Points the tenants of `previous` and of every snapshot before it
    /// that calls still running hold (a change stream for days), at this
    /// snapshot's sources, and lets go of those it replaced or removed: a
    /// replaced source's pool then closes once no call uses it, instead of
    /// keeping its idle sessions (and logging in again, with an old
    /// password) for as long as any call of the tenant runs.
    pub fn let_go_of_replaced_sources(&self, previous: &Tenants) {
        let mut older = std::mem::take(&mut *previous.superseded.lock());
        older.extend(previous.all.iter().map(Arc::downgrade));
        older.retain(|t| t.strong_count() > 0);
        for old_tenant in older.iter().filter_map(Weak::upgrade) {
            let now: HashMap<String, Arc<Source>> = self
                .all
                .iter()
                .find(|t| t.id == old_tenant.id)
                .map(|t| t.sources.read().clone())
                .unwrap_or_default();
            *old_tenant.sources.write() = now;
        }
        *self.superseded.lock() = older;
    }

    /// Once this snapshot is in force: ends the calls made with credentials
    /// of `previous` that this one did not carry over, and counts them.
    pub fn revoke_dropped(&self, previous: &Tenants) -> usize {
        // `rebuild` decided what is carried over: a token it did not carry
        // into this snapshot is taken away.
        let kept: std::collections::HashSet<*const CancellationToken> = self.tokens().map(Arc::as_ptr).collect();
        let mut revoked = 0;
        for token in previous.tokens() {
            if !kept.contains(&Arc::as_ptr(token)) && !token.is_cancelled() {
                token.cancel();
                revoked += 1;
            }
        }
        revoked
    }

    /// Once this snapshot is in force: the loads and streams still running
    /// on `previous`'s limiters charge this snapshot's from now on, so that
    /// a rate changed by the reload holds them too.
    pub fn hand_over_limits(&self, previous: &Tenants) {
        for old in &previous.all {
            if let Some(new) = self.all.iter().find(|t| t.id == old.id) {
                old.limiter.hand_over(&new.limiter);
            }
        }
    }

    /// Every credential's revocation: keys, identities, and each tenant's
    /// JWT callers when JWTs are configured.
    fn tokens(&self) -> impl Iterator<Item = &Revocation> {
        let keys = self.by_key.values().map(|caller| &caller.revoked);
        let identities = self.by_identity.values().map(|(_, revoked)| revoked);
        let jwt = self.all.iter().filter(|_| self.jwt.is_some()).map(|t| &t.jwt_revoked);
        keys.chain(identities).chain(jwt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_that_was_up_goes_down_on_its_second_failed_probe_in_a_row() {
        let mut status = SourceStatus::default();
        // Never up: down at once.
        assert!(!status.failed());
        assert!(!status.healthy && !status.in_doubt());
        status.answered(Some("15.4".into()));
        assert!(status.healthy && !status.in_doubt());
        // One failure puts it in doubt; an answer clears the doubt.
        assert!(!status.failed());
        assert!(status.healthy && status.in_doubt());
        status.answered(None);
        assert!(status.healthy && !status.in_doubt());
        assert_eq!(status.server_version, "15.4", "a busy answer keeps the version");
        // Two in a row take it down, once.
        assert!(!status.failed());
        assert!(status.failed(), "the second failure in a row takes it down");
        assert!(!status.healthy && !status.in_doubt());
        assert!(!status.failed(), "already down");
    }

    fn keys(names: &[&str]) -> String {
        let keys: Vec<String> = names
            .iter()
            .map(|k| format!("{{ id = \"{k}\", sha256 = \"{}\" }}", hex::encode(hash_key(k))))
            .collect();
        format!("api_keys = [{}]\n", keys.join(", "))
    }

    fn tenants(text: &str, previous: Option<&Tenants>) -> Tenants {
        let config = Config::from_toml(&format!("{}{text}", crate::config::MUTUAL_TLS)).expect("config");
        Tenants::rebuild(&config, previous, &CancellationToken::new())
            .expect("tenants")
            .0
    }

    fn token(tenants: &Tenants, key: &str) -> Revocation {
        tenants.bearer(key).expect("a key in force").revoked
    }

    #[test]
    fn a_reload_revokes_only_the_credentials_it_takes_away() {
        let was = tenants(
            &format!(
                "[tenants.a]\n{}client_identities = [\"a.internal\", \"moves\"]\n[tenants.b]\n{}",
                keys(&["k1", "k2", "moves"]),
                keys(&["k3"])
            ),
            None,
        );
        let (k1, k2, k3, moved_key) = (
            token(&was, "k1"),
            token(&was, "k2"),
            token(&was, "k3"),
            token(&was, "moves"),
        );
        let identity = |t: &Tenants, name: &str| t.by_identity[name].1.clone();
        let (kept_identity, moved_identity) = (identity(&was, "a.internal"), identity(&was, "moves"));
        // k2 is gone, and the key and identity "moves" are tenant b's now.
        let now = tenants(
            &format!(
                "[tenants.a]\n{}client_identities = [\"a.internal\"]\n[tenants.b]\n{}client_identities = [\"moves\"]\n",
                keys(&["k1"]),
                keys(&["k3", "moves"])
            ),
            Some(&was),
        );
        assert_eq!(now.revoke_dropped(&was), 3);
        assert!(k2.is_cancelled() && moved_key.is_cancelled() && moved_identity.is_cancelled());
        assert!(!k1.is_cancelled() && !k3.is_cancelled() && !kept_identity.is_cancelled());
        let moved_now = token(&now, "moves");
        assert!(
            !moved_now.is_cancelled(),
            "a key that moved starts afresh with its new tenant"
        );
        // What stays is carried over: a later reload that takes k1 away ends
        // the calls k1 made before this one.
        let later = tenants(&format!("[tenants.b]\n{}", keys(&["k3"])), Some(&now));
        later.revoke_dropped(&now);
        assert!(k1.is_cancelled() && kept_identity.is_cancelled() && moved_now.is_cancelled());
        assert!(!k3.is_cancelled());
    }

    #[test]
    fn calls_made_with_jwts_end_when_the_jwt_settings_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        let config = |extra: &str| {
            format!(
                "[auth.jwt]\nissuer = \"https://issuer.example\"\naudience = \"weir\"\nalgorithm = \"HS256\"\n\
                 secret_file = {:?}\n{extra}[tenants.a]\n[tenants.b]\n",
                secret.display().to_string()
            )
        };
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef").expect("secret");
        let jwt_token = |t: &Tenants, id: &str| {
            t.all()
                .iter()
                .find(|t| t.id == id)
                .map(|t| t.jwt_revoked.clone())
                .expect("tenant")
        };
        let was = tenants(&config(""), None);
        let same = tenants(&config(""), Some(&was));
        assert_eq!(
            same.revoke_dropped(&was),
            0,
            "the same settings and secret keep JWT calls going"
        );
        let a = jwt_token(&same, "a");
        // A new secret: tokens signed with the old one no longer verify.
        std::fs::write(&secret, "fedcba9876543210fedcba9876543210").expect("secret");
        let rotated = tenants(&config(""), Some(&same));
        assert_eq!(rotated.revoke_dropped(&same), 2);
        assert!(a.is_cancelled() && !jwt_token(&rotated, "a").is_cancelled());
        // A removed tenant's JWT calls end too; the other tenant's go on.
        let b = jwt_token(&rotated, "b");
        let without_a = tenants(&config("").replace("[tenants.a]\n", ""), Some(&rotated));
        assert_eq!(without_a.revoke_dropped(&rotated), 1);
        assert!(jwt_token(&rotated, "a").is_cancelled() && !b.is_cancelled());
    }

    #[test]
    fn a_certificate_with_two_tenants_identities_is_neither_tenant() {
        let config = Config::from_toml(&format!(
            "{}[tenants.a]\nclient_identities = [\"a.internal\"]\n[tenants.b]\nclient_identities = [\"b.internal\"]\n",
            crate::config::MUTUAL_TLS
        ))
        .expect("config");
        let tenants = Tenants::build(&config, &CancellationToken::new()).expect("tenants");
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let caller = tenants
            .authenticate(None, &names(&["other", "a.internal"]), None)
            .expect("a");
        assert_eq!(caller.tenant.id, "a");
        for both in [["a.internal", "b.internal"], ["b.internal", "a.internal"]] {
            let err = tenants.authenticate(None, &names(&both), None).err().expect("refused");
            assert!(err.contains("two tenants"), "{err}");
        }
    }
}
