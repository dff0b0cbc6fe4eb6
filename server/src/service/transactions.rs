//! Open transactions, addressed by opaque handles bound to the tenant that
//! opened them. Unused transactions are rolled back after the tenant's idle
//! timeout, returning their connection, and so are those whose opener's
//! credential a reload revoked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::RngCore;

use crate::backend::{BackendError, SqlTransaction};
use crate::error::Error;
use crate::tenant::{Caller, Revocation, Source};
use tokio_util::sync::CancellationToken;

type Handle = [u8; 16];

/// Longest an idle transaction's rollback may take before its connection is dropped.
const REAP_ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5);

pub struct OpenTransaction {
    pub tx: Arc<dyn SqlTransaction>,
    pub source: String,
    /// The transaction could not write when it began (its source was
    /// read-only, or the caller asked for a read-only transaction).
    began_read_only: bool,
    idle_timeout: Duration,
    last_used: Mutex<Instant>,
    /// The opener's credential: once revoked, the transaction is not
    /// served again and is rolled back by the next reap.
    revoked: Revocation,
    /// Its source's [`Source::retired`].
    source_retired: CancellationToken,
    /// The idle reaper is rolling it back: it stays open (and counted
    /// against the tenant's limit) until the rollback is done, and no later
    /// reap starts another.
    reaping: AtomicBool,
    /// Statements of its caller under way ([`InUse`]): a transaction is
    /// not idle while one runs, however long it takes.
    statements: AtomicUsize,
}

impl OpenTransaction {
    fn touch(&self) {
        *self.last_used.lock() = Instant::now();
    }
}

/// A transaction a statement is using. The idle reaper leaves it alone
/// until the statement is done (decided before it had the session, a
/// rollback would otherwise wait for a long statement and undo it right
/// after its caller was told it succeeded), and its idle time starts then.
pub struct InUse(Arc<OpenTransaction>);

impl InUse {
    fn new(entry: Arc<OpenTransaction>) -> Self {
        entry.statements.fetch_add(1, Ordering::AcqRel);
        entry.touch();
        Self(entry)
    }
}

impl std::ops::Deref for InUse {
    type Target = OpenTransaction;
    fn deref(&self) -> &OpenTransaction {
        &self.0
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.touch();
        self.0.statements.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
pub struct Transactions {
    open: Mutex<HashMap<(String, Handle), Arc<OpenTransaction>>>,
    /// Commits and rollbacks under way, which outlive their calls: the
    /// shutdown waits for them (within its budget) rather than cut a COMMIT.
    ending: tokio_util::task::TaskTracker,
}

fn key(caller: &Caller, handle: &[u8]) -> Result<(String, Handle), Error> {
    let handle: Handle = handle.try_into().map_err(|_| Error::TransactionNotFound)?;
    Ok((caller.tenant.id.clone(), handle))
}

/// The tenant's open transactions; revoked ones waiting for their rollback no longer count.
fn open_of(open: &HashMap<(String, Handle), Arc<OpenTransaction>>, caller: &Caller) -> u32 {
    let n = open
        .iter()
        .filter(|((tenant, _), e)| *tenant == caller.tenant.id && !e.revoked.is_cancelled())
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Transactions {
    /// Refuses a new transaction when the tenant has its maximum open.
    pub fn check_room(&self, caller: &Caller) -> Result<(), Error> {
        let limit = caller.tenant.limits.max_open_transactions;
        if open_of(&self.open.lock(), caller) >= limit {
            let e = Error::TooManyTransactions { limit };
            crate::limits::admission::count_refusal(&caller.tenant.id, &e);
            return Err(e);
        }
        Ok(())
    }

    /// Registers an opened transaction; one that lost a race for the
    /// tenant's last place is rolled back and refused.
    pub async fn insert(
        &self,
        caller: &Caller,
        source: &Source,
        read_only: bool,
        tx: Box<dyn SqlTransaction>,
    ) -> Result<Vec<u8>, Error> {
        let mut handle = [0u8; 16];
        rand::rng().fill_bytes(&mut handle);
        let entry = OpenTransaction {
            tx: Arc::from(tx),
            source: source.name.clone(),
            began_read_only: read_only || source.config.read_only,
            idle_timeout: caller.tenant.limits.transaction_idle_timeout,
            last_used: Mutex::new(Instant::now()),
            revoked: caller.revoked.clone(),
            source_retired: source.retired.clone(),
            reaping: AtomicBool::new(false),
            statements: AtomicUsize::new(0),
        };
        let refused = {
            let mut open = self.open.lock();
            let limit = caller.tenant.limits.max_open_transactions;
            if open_of(&open, caller) >= limit {
                Some((entry, limit))
            } else {
                open.insert((caller.tenant.id.clone(), handle), Arc::new(entry));
                None
            }
        };
        if let Some((entry, limit)) = refused {
            let _ = entry.tx.rollback().await;
            let e = Error::TooManyTransactions { limit };
            crate::limits::admission::count_refusal(&caller.tenant.id, &e);
            return Err(e);
        }
        Ok(handle.to_vec())
    }

    /// The caller's transaction, for a statement; another tenant's handle
    /// is simply not found.
    pub fn get(&self, caller: &Caller, handle: &[u8]) -> Result<InUse, Error> {
        let key = key(caller, handle)?;
        // Being rolled back for its idle time (no statement of it runs, or
        // the reaper would have left it): it expired, and is gone in a moment.
        let entry = self.take_up(&key, true)?;
        self.check_source(caller, &key, &entry.0)?;
        Ok(entry)
    }

    /// The transaction `key`, in use from now, counted under the registry's
    /// lock, which the reaper decides under: it never takes a transaction a
    /// statement or its end has just been given. Not found while the reaper
    /// rolls it back, if `not_while_reaped`.
    fn take_up(&self, key: &(String, Handle), not_while_reaped: bool) -> Result<InUse, Error> {
        let open = self.open.lock();
        let entry = open
            .get(key)
            .filter(|e| !e.revoked.is_cancelled())
            .ok_or(Error::TransactionNotFound)?;
        if not_while_reaped && entry.reaping.load(Ordering::Acquire) {
            return Err(Error::TransactionNotFound);
        }
        Ok(InUse::new(entry.clone()))
    }

    /// Ends a transaction whose source a reload took away from the tenant,
    /// made read-only after the transaction began on it writable, or
    /// pointed elsewhere: the tenant may no longer work there as it did.
    /// Rolled back in the background.
    fn check_source(&self, caller: &Caller, key: &(String, Handle), entry: &Arc<OpenTransaction>) -> Result<(), Error> {
        let why = match caller.tenant.source(&entry.source) {
            None => "its source was removed by a configuration reload",
            Some(s) if s.config.read_only && !entry.began_read_only => {
                "its source was made read-only by a configuration reload"
            }
            Some(_) if entry.source_retired.is_cancelled() => {
                "its source was pointed at another server, database or login by a configuration reload"
            }
            Some(_) => return Ok(()),
        };
        if let Some(entry) = self.open.lock().remove(key) {
            tokio::spawn(async move {
                if let Err(e) = entry.tx.rollback().await {
                    tracing::warn!(error = %e, "rolling back a transaction whose source was withdrawn");
                }
            });
        }
        Err(Error::from(BackendError::TransactionRolledBack(why)))
    }

    /// Commits or rolls back. The handle stays valid only if the transaction
    /// was busy with a statement; after any other outcome it is gone.
    pub async fn finish(self: &Arc<Self>, caller: &Caller, handle: &[u8], commit: bool) -> Result<(), Error> {
        let key = key(caller, handle)?;
        // A commit or rollback uses the transaction: the reaper leaves it.
        let entry = self.take_up(&key, false)?;
        if commit {
            self.check_source(caller, &key, &entry.0)?;
        }
        // Bounded like a statement: a COMMIT the engine does not answer (a
        // synchronous standby gone, a deferred trigger) would hold the
        // caller's slot, the connection and the transaction's place for ever.
        // By the tenant's limit, not the caller's deadline (which cuts the
        // call as before), and never within the wait for a statement still
        // running to end (`Busy`), so that a timeout here means COMMIT was
        // sent and not answered.
        let limit = caller
            .tenant
            .limits
            .statement_timeout
            .max(2 * crate::backend::TURN_WAIT);
        // Run to its end even when the call is dropped (its deadline, a
        // client gone): cut half way, the transaction would keep its
        // connection and its place in the tenant's limit until the idle
        // reaper found it, and its handle would answer nothing but NOT_FOUND.
        let registry = self.clone();
        let ending = async move { registry.end(key, entry, commit, limit).await };
        match self.ending.spawn(tracing::Instrument::in_current_span(ending)).await {
            Ok(ended) => ended,
            // Cut by the runtime's end, or failed: a COMMIT may have gone.
            Err(e) if commit => {
                Err(BackendError::CommitOutcomeUnknown(format!("ending the transaction failed: {e}")).into())
            }
            Err(e) => Err(BackendError::Internal(format!("ending the transaction failed: {e}")).into()),
        }
    }

    /// [`Self::finish`]'s work on the session, bounded by `limit`; in use
    /// meanwhile, so that the reaper does not wait on a long COMMIT.
    async fn end(&self, key: (String, Handle), entry: InUse, commit: bool, limit: Duration) -> Result<(), Error> {
        let finishing = async {
            if commit {
                entry.tx.commit().await
            } else {
                entry.tx.rollback().await
            }
        };
        let Ok(result) = tokio::time::timeout(limit, finishing).await else {
            // The transaction goes, and a network engine's connection with
            // it: the engine rolls back whatever it had not committed.
            self.open.lock().remove(&key);
            return if commit {
                Err(BackendError::CommitOutcomeUnknown(format!(
                    "the database did not answer the commit within its time limit ({limit:?}) and Weir let the \
                     transaction go; it may or may not have committed: check whether its writes are there"
                ))
                .into())
            } else {
                Ok(())
            };
        };
        if !matches!(result, Err(BackendError::Busy)) {
            self.open.lock().remove(&key);
        }
        match result {
            // The engine rolled back a transaction whose session it lost: what was asked for holds.
            Err(e) if !commit && e.is_unavailable() => Ok(()),
            // A session known lost before COMMIT was sent is TransactionRolledBack instead.
            Err(e) if e.is_unavailable() => Err(BackendError::CommitOutcomeUnknown(e.to_string()).into()),
            other => other.map_err(|e| Error::from(e).in_transaction()),
        }
    }

    /// Rolls back transactions idle past their timeout, or opened with a
    /// credential since revoked. Each rollback runs on its own, bounded in
    /// time, so one hung database cannot hold up the others. A transaction
    /// with a statement under way is not idle; a revoked one whose session
    /// is still busy (a statement being cancelled) stays, found and counted
    /// as before, until the next reap. Entries stay
    /// in the registry until their rollback is done: taken out first, such a
    /// transaction would not count against the tenant's limit, and its
    /// handle would be NOT_FOUND, while the reaper waits for its session.
    pub fn reap_idle(self: &Arc<Self>) {
        let now = Instant::now();
        let expired: Vec<_> = self
            .open
            .lock()
            .iter()
            .filter(|(_, e)| {
                let idle = e.statements.load(Ordering::Acquire) == 0
                    && now.duration_since(*e.last_used.lock()) >= e.idle_timeout;
                (e.revoked.is_cancelled() || idle) && !e.reaping.swap(true, Ordering::AcqRel)
            })
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        for (key, entry) in expired {
            let registry = self.clone();
            tokio::spawn(async move {
                let outcome = tokio::time::timeout(REAP_ROLLBACK_TIMEOUT, entry.tx.rollback()).await;
                if let Ok(Err(BackendError::Busy)) = outcome {
                    entry.touch();
                    entry.reaping.store(false, Ordering::Release);
                    return;
                }
                registry.forget(&key, &entry);
                match outcome {
                    // Committed or rolled back by its caller meanwhile.
                    // A statement of it had already ended it (MySQL's DDL,
                    // a SQL Server procedure's COMMIT).
                    Ok(Err(
                        BackendError::TransactionEnded
                        | BackendError::CommittedImplicitly
                        | BackendError::EndedByStatement,
                    )) => {}
                    Ok(_) if entry.revoked.is_cancelled() => tracing::info!(
                        tenant = key.0,
                        source = entry.source,
                        "rolled back a transaction whose credential was revoked"
                    ),
                    Ok(_) => tracing::info!(tenant = key.0, source = entry.source, "rolled back an idle transaction"),
                    // Dropping the transaction discards its connection: the engine rolls back.
                    Err(_) => tracing::warn!(
                        tenant = key.0,
                        source = entry.source,
                        "idle transaction rollback timed out"
                    ),
                }
            });
        }
    }

    /// Takes `entry` out of the registry, unless it is gone already.
    fn forget(&self, key: &(String, Handle), entry: &Arc<OpenTransaction>) {
        let mut open = self.open.lock();
        if open.get(key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            open.remove(key);
        }
    }

    /// Rolls back everything still open (shutdown), all at once and each
    /// bounded in time: a database that stopped answering cannot hold the
    /// process up. A transaction not rolled back in time has its connection
    /// dropped, and the engine rolls it back.
    pub async fn rollback_all(&self) {
        let all: Vec<_> = self.open.lock().drain().map(|(_, e)| e).collect();
        // Beside the rollbacks, the commits and rollbacks their callers
        // began, to their end: cut, a COMMIT's outcome would be unknown.
        self.ending.close();
        let rollbacks = futures::future::join_all(
            all.iter()
                .map(|entry| tokio::time::timeout(REAP_ROLLBACK_TIMEOUT, entry.tx.rollback())),
        );
        tokio::join!(rollbacks, self.ending.wait());
    }
}
