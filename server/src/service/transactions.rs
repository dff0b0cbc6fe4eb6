//! Open transactions, addressed by opaque handles bound to the tenant that
//! opened them. Unused transactions are rolled back after the tenant's idle
//! timeout, returning their connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::RngCore;

use crate::backend::{BackendError, SqlTransaction};
use crate::error::Error;
use crate::tenant::Caller;

type Handle = [u8; 16];

pub struct OpenTransaction {
    pub tx: Arc<dyn SqlTransaction>,
    pub source: String,
    idle_timeout: Duration,
    last_used: Mutex<Instant>,
}

impl OpenTransaction {
    pub fn touch(&self) {
        *self.last_used.lock() = Instant::now();
    }
}

#[derive(Default)]
pub struct Transactions {
    open: Mutex<HashMap<(String, Handle), Arc<OpenTransaction>>>,
}

fn key(caller: &Caller, handle: &[u8]) -> Result<(String, Handle), Error> {
    let handle: Handle = handle.try_into().map_err(|_| Error::TransactionNotFound)?;
    Ok((caller.tenant.id.clone(), handle))
}

impl Transactions {
    pub fn insert(&self, caller: &Caller, source: &str, tx: Box<dyn SqlTransaction>) -> Vec<u8> {
        let mut handle = [0u8; 16];
        rand::rng().fill_bytes(&mut handle);
        let entry = OpenTransaction {
            tx: Arc::from(tx),
            source: source.to_string(),
            idle_timeout: caller.tenant.limits.transaction_idle_timeout,
            last_used: Mutex::new(Instant::now()),
        };
        self.open
            .lock()
            .insert((caller.tenant.id.clone(), handle), Arc::new(entry));
        handle.to_vec()
    }

    /// The caller's transaction; another tenant's handle is simply not found.
    pub fn get(&self, caller: &Caller, handle: &[u8]) -> Result<Arc<OpenTransaction>, Error> {
        let entry = self
            .open
            .lock()
            .get(&key(caller, handle)?)
            .cloned()
            .ok_or(Error::TransactionNotFound)?;
        entry.touch();
        Ok(entry)
    }

    /// Commits or rolls back. The handle stays valid only if the transaction
    /// was busy with a statement; after any other outcome it is gone.
    pub async fn finish(&self, caller: &Caller, handle: &[u8], commit: bool) -> Result<(), Error> {
        let key = key(caller, handle)?;
        let entry = self.open.lock().get(&key).cloned().ok_or(Error::TransactionNotFound)?;
        let result = if commit {
            entry.tx.commit().await
        } else {
            entry.tx.rollback().await
        };
        if !matches!(result, Err(BackendError::Busy)) {
            self.open.lock().remove(&key);
        }
        Ok(result?)
    }

    /// Rolls back transactions idle past their timeout.
    pub async fn reap_idle(&self) {
        let now = Instant::now();
        let expired: Vec<_> = {
            let mut open = self.open.lock();
            let keys: Vec<_> = open
                .iter()
                .filter(|(_, e)| now.duration_since(*e.last_used.lock()) >= e.idle_timeout)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| open.remove(&k).map(|e| (k.0, e)))
                .collect()
        };
        for (tenant, entry) in expired {
            tracing::info!(tenant, source = entry.source, "rolling back an idle transaction");
            // A statement still streaming holds the connection; it is
            // discarded (and so rolled back by the engine) when it ends.
            if let Err(e) = entry.tx.rollback().await {
                tracing::debug!(error = %e, "idle transaction rollback deferred");
            }
        }
    }

    /// Rolls back everything still open (shutdown).
    pub async fn rollback_all(&self) {
        let all: Vec<_> = self.open.lock().drain().map(|(_, e)| e).collect();
        for entry in all {
            let _ = entry.tx.rollback().await;
        }
    }
}
