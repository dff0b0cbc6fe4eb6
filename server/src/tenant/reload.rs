//! Hot reload. The tenants in force are one snapshot behind a lock; a reload
//! (SIGHUP, or a change of the configuration file or of a file it names,
//! such as a ConfigMap or Secret update) builds the next snapshot beside it
//! and swaps it in. Calls in progress keep the snapshot they started with,
//! so they finish on the pools they began on, unless the credential they
//! were made with is taken away: those end (streams, loads) or are rolled
//! back (transactions); sources whose settings did
//! not change are carried over with their pools. A configuration that does
//! not load or validate is refused, logged, and the old one stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{Changes, Tenants};
use crate::backend::BackendError;
use crate::config::Config;
use crate::metrics::{OutcomeLabels, METRICS};
use crate::transport::tls::TlsReloader;

pub struct Registry {
    current: RwLock<Arc<Tenants>>,
    /// The configuration in force, for the files it names.
    running: Mutex<Config>,
    /// The last configuration read whose reload was refused, for the files
    /// it names: one refused for a file not there yet (a Secret volume that
    /// syncs after its ConfigMap) is tried again once the file appears.
    refused: Mutex<Option<Config>>,
    /// The configuration the process started with: settings read only at
    /// start stay as it had them, however many reloads come after.
    started: Config,
    tls: Option<Arc<TlsReloader>>,
    /// The parent of every credential's revocation token.
    stop: CancellationToken,
    /// Told of every applied reload, so that the health monitor probes the
    /// sources in force at once: a required source a reload adds while it
    /// is down is NOT_SERVING then, not at the next round.
    reloaded: tokio::sync::Notify,
}

/// `(name, whether it differs)` for each named field of `$was` and `$now`.
macro_rules! differing {
    ($was:expr, $now:expr, $prefix:literal: $($field:ident),+) => {
        [$((concat!($prefix, stringify!($field)), $was.$field != $now.$field)),+]
    };
}

/// Settings that `config` changes from `started` but that take effect only
/// after a restart: every `[server]` setting but the TLS files, and the
/// sections read at start.
fn needs_restart(started: &Config, config: &Config) -> Vec<&'static str> {
    let (was, now) = (&started.server, &config.server);
    // Every field named: one added to ServerConfig and not listed below
    // fails to compile here instead of changing silently on a reload.
    let crate::config::ServerConfig {
        listen: _,
        max_request_bytes: _,
        health_check_interval: _,
        shutdown_grace: _,
        shutdown_delay: _,
        reload_interval: _,
        max_concurrent_requests: _,
        max_queue_wait: _,
        stream_idle_timeout: _,
        keepalive_time: _,
        keepalive_interval: _,
        keepalive_retries: _,
        max_connection_age: _,
        compression: _,
        worker_threads: _,
        tls: _,
    } = was;
    let server = differing!(was, now, "server.":
        listen, max_request_bytes, max_concurrent_requests, max_queue_wait, compression,
        health_check_interval, reload_interval, shutdown_grace, shutdown_delay, stream_idle_timeout,
        keepalive_time, keepalive_interval, keepalive_retries, max_connection_age, worker_threads);
    let sections = differing!(started, config, "": metrics, telemetry, bulk, changes);
    let tls = ("server.tls (on or off)", was.tls.is_some() != now.tls.is_some());
    server
        .into_iter()
        .chain([tls])
        .chain(sections)
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
}

impl Registry {
    pub fn new(config: &Config, tls: Option<Arc<TlsReloader>>) -> Result<Self, BackendError> {
        let stop = CancellationToken::new();
        Ok(Self {
            current: RwLock::new(Arc::new(Tenants::build(config, &stop)?)),
            running: Mutex::new(config.clone()),
            refused: Mutex::new(None),
            started: config.clone(),
            tls,
            stop,
            reloaded: tokio::sync::Notify::new(),
        })
    }

    /// Completes at the next applied reload (or at once, for one applied
    /// since the last wait).
    pub async fn reloaded(&self) {
        self.reloaded.notified().await;
    }

    /// Ends every call still in progress, whatever its credential: the
    /// shutdown grace is over.
    pub fn stop_all(&self) {
        self.stop.cancel();
    }

    /// The token [`Self::stop_all`] cancels: a call's revocation completes
    /// with it, and whether it is cancelled tells shutdown from revocation.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// The server's TLS configuration, when it serves TLS.
    pub fn tls(&self) -> Option<Arc<TlsReloader>> {
        self.tls.clone()
    }

    /// Whether `peer`'s client certificate is still accepted (see
    /// [`TlsReloader::still_trusts`]); always without TLS.
    pub fn still_trusts(&self, peer: &crate::transport::tls::PeerInfo) -> bool {
        self.tls.as_ref().is_none_or(|tls| tls.still_trusts(peer))
    }

    /// Whether `peer` lacks the client certificate the server now requires
    /// (see [`TlsReloader::wants_certificate_of`]); never without TLS.
    pub fn wants_certificate_of(&self, peer: &crate::transport::tls::PeerInfo, trusted: bool) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|tls| tls.wants_certificate_of(peer, trusted))
    }

    /// The tenants in force; a call keeps what it got for its whole life.
    pub fn current(&self) -> Arc<Tenants> {
        self.current.read().clone()
    }

    /// Puts `config` in force: tenants, keys, limits, sources, authentication and TLS files.
    pub fn apply(&self, mut config: Config) -> Result<Changes, String> {
        let mut running = self.running.lock();
        let restart = needs_restart(&self.started, &config);
        if !restart.is_empty() {
            tracing::warn!(settings = ?restart, "these settings changed but take effect only after a restart");
        }
        // TLS goes off only with a restart: until then the TLS section in
        // force stays, its files watched, so that a certificate renewed
        // meanwhile is still put in place rather than served to its expiry.
        if self.tls.is_some() && config.server.tls.is_none() {
            config.server.tls.clone_from(&running.server.tls);
        }
        // Everything is built before anything is swapped: a refused reload
        // changes nothing. TLS files that cannot be used (a certificate
        // renewed before its key) keep the ones in force, as a source whose
        // password cannot be read keeps its pool: the rest still applies.
        let mut tls_kept = None;
        let tls = match (&self.tls, &config.server.tls) {
            (Some(tls), Some(files)) => match crate::transport::tls::server_config(files) {
                Ok(fresh) => Some((tls, fresh)),
                // A change of who may connect (a client certificate now
                // required, another client CA) is not applied by halves:
                // the rest of the reload going through would report it
                // applied while connections go on as before.
                Err(e)
                    if running.server.tls.as_ref().is_none_or(|was| {
                        (was.require_client_cert, &was.client_ca_file)
                            != (files.require_client_cert, &files.client_ca_file)
                    }) =>
                {
                    return Err(format!("the client certificate settings changed, but {e}"));
                }
                Err(e) => {
                    tls_kept = Some(e);
                    None
                }
            },
            _ => None,
        };
        let (tenants, changes) =
            Tenants::rebuild(&config, Some(&self.current()), &self.stop).map_err(|e| e.to_string())?;
        if let Some((reloader, fresh)) = tls {
            reloader.install(fresh);
        }
        let previous = std::mem::replace(&mut *self.current.write(), Arc::new(tenants));
        *running = config;
        // Only once the new snapshot is in force: a call made with a revoked
        // credential could otherwise still start on the old one.
        let current = self.current();
        let credentials_revoked = current.revoke_dropped(&previous);
        current.retire_replaced_topics(&previous);
        current.retire_replaced_sources(&previous);
        current.hand_over_limits(&previous);
        current.let_go_of_replaced_sources(&previous);
        self.reloaded.notify_one();
        Ok(Changes {
            credentials_revoked,
            tls_kept,
            ..changes
        })
    }

    /// Fingerprint of the configuration file and every file named by the
    /// configuration in force or the last one refused (certificates, keys,
    /// password and secret files).
    pub fn fingerprint(&self, path: &Path) -> [u8; 32] {
        let mut files = vec![path.to_path_buf()];
        named_files(&self.running.lock(), &mut files);
        if let Some(refused) = &*self.refused.lock() {
            named_files(refused, &mut files);
        }
        // Each once: a file both configurations name would otherwise make
        // the fingerprint of a refused reload differ from the one before
        // it, and the same refusal run again.
        files.sort_unstable();
        files.dedup();
        let mut hash = Sha256::new();
        for file in files {
            // A missing file hashes as empty: its return is a change too.
            hash.update(std::fs::read(file).unwrap_or_default());
            hash.update([0]);
        }
        hash.finalize().into()
    }

    /// Rereads `path` and applies it, logging and counting the outcome.
    pub fn reload_from(&self, path: &Path) {
        let result = Config::load(Some(path)).map_err(|e| e.to_string()).and_then(|config| {
            warn_about(&config);
            let tried = config.clone();
            let applied = self.apply(config);
            *self.refused.lock() = applied.is_err().then_some(tried);
            applied
        });
        match result {
            Ok(c) => {
                METRICS
                    .config_reloads
                    .get_or_create(&OutcomeLabels { outcome: "applied" })
                    .inc();
                tracing::info!(
                    path = %path.display(),
                    sources_kept = c.sources_kept,
                    sources_new = c.sources_new,
                    sources_dropped = c.sources_dropped,
                    credentials_revoked = c.credentials_revoked,
                    "configuration reloaded"
                );
                for stale in &c.sources_stale {
                    tracing::error!(path = %path.display(), error = %stale, "a source was kept as it was: its new settings could not be used");
                }
                if let Some(e) = &c.tls_kept {
                    tracing::error!(path = %path.display(), error = %e, "the TLS files in force were kept: the new ones could not be used");
                }
            }
            Err(e) => {
                METRICS
                    .config_reloads
                    .get_or_create(&OutcomeLabels { outcome: "rejected" })
                    .inc();
                tracing::error!(path = %path.display(), error = %e, "configuration reload refused; the previous configuration stays in force");
            }
        }
    }
}

/// Logs what a configuration sets to no effect.
pub fn warn_about(config: &Config) {
    for host in config.unused_backend_hosts() {
        tracing::warn!(host = %host, "backend_hosts names a server no source connects to; its cap protects nothing");
    }
}

/// The files `config` names, added to `files`.
fn named_files(config: &Config, files: &mut Vec<PathBuf>) {
    if let Some(tls) = &config.server.tls {
        files.extend([tls.cert_file.clone(), tls.key_file.clone()]);
        files.extend(tls.client_ca_file.clone());
    }
    if let Some(jwt) = &config.auth.jwt {
        files.extend(jwt.secret_file.clone());
        files.extend(jwt.public_key_file.clone());
    }
    for tenant in config.tenants.values() {
        for source in tenant.sources.values() {
            files.extend(source.password_file.clone());
            files.extend(source.credential_files());
        }
    }
}

/// SIGHUP, listened for from when this is made. Its default action ends
/// the process, and `watch` starts only once the sources are set up: a
/// reload asked for while the server starts would kill it. One asked for in
/// between is kept for `watch`, which then reloads.
pub struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    pub fn listen() -> Self {
        Self {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// Completes at the next SIGHUP; never where there is none.
    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = self.signal.as_mut() {
            signal.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    }
}

/// Reloads on SIGHUP and whenever the fingerprint of the configuration's files changes.
/// `seen` is the fingerprint taken when the configuration in force was
/// loaded, before the server listened: a change made after that is a change.
pub async fn watch(registry: Arc<Registry>, path: PathBuf, interval: Duration, mut seen: [u8; 32], mut hangup: Hangup) {
    // Reading the files blocks: it runs on the blocking pool, not a runtime worker.
    let fingerprint = |registry: Arc<Registry>, path: PathBuf| async move {
        tokio::task::spawn_blocking(move || registry.fingerprint(&path))
            .await
            .unwrap_or_default()
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            () = hangup.next() => true,
            _ = ticker.tick() => false,
        };
        let now = fingerprint(registry.clone(), path.clone()).await;
        if forced || now != seen {
            if forced {
                tracing::info!("SIGHUP: reloading the configuration");
            }
            let (r, p) = (registry.clone(), path.clone());
            let _ = tokio::task::spawn_blocking(move || r.reload_from(&p)).await;
            // What was read, not what is there now: a change written during
            // the reload is picked up by the next check. (A reload that names
            // other files changes the fingerprint too, and the next check
            // reloads once more, to the same effect; a refused one names its
            // files too, so one that was missing is noticed when it comes.)
            seen = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_at_start_are_named_on_every_reload_that_changes_them() {
        let started = Config::from_toml("").unwrap();
        let edited =
            Config::from_toml("[server]\nstream_idle_timeout = \"1s\"\nkeepalive_time = \"5s\"\nworker_threads = 1\nshutdown_delay = \"2s\"\n")
                .unwrap();
        assert_eq!(
            needs_restart(&started, &edited),
            [
                "server.shutdown_delay",
                "server.stream_idle_timeout",
                "server.keepalive_time",
                "server.worker_threads"
            ]
        );
        assert!(needs_restart(&started, &started.clone()).is_empty());
    }
}
