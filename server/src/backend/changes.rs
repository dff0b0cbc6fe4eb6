//! Change streams, engine-independent: what a subscription asks for and
//! what an engine's change feed yields. Engines run the feed on a task of
//! their own and advance their retention point (replication slot, stored
//! binlog position) only to positions the client acknowledged.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::backend::{BackendError, Column, Row};

/// A table as the caller named it; `schema` empty means the source's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub table: String,
}

/// An engine's position in its change log. Engines encode positions so that
/// byte order is stream order: the service compares them without knowing
/// the engine (an acknowledgement may not run ahead of what was delivered).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position(pub Vec<u8>);

#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Unique per tenant and subscription, and safe as an engine identifier
    /// (slot, publication, lock and state-row name): `[a-z0-9_]`, at most 63 bytes.
    pub id: String,
    /// The subscription's name as the caller gave it, for messages.
    pub name: String,
    pub tables: Vec<TableName>,
    /// Deliver only what comes after this position.
    pub resume: Option<Position>,
    pub snapshot: bool,
    pub take_over: bool,
    pub poll_interval: Duration,
    pub heartbeat_interval: Duration,
    pub max_changes_per_poll: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    Insert,
    Update,
    Delete,
    SnapshotRead,
    Truncate,
}

/// One changed row (or, for `Truncate`, one emptied table).
#[derive(Debug, Clone)]
pub struct RowChange {
    pub op: ChangeOp,
    pub schema: String,
    pub table: String,
    pub columns: Arc<[Column]>,
    /// The old row, where the engine provides it.
    pub before: Option<Row>,
    pub after: Option<Row>,
    pub primary_key: Arc<[String]>,
    pub txid: String,
    pub commit_time: Option<DateTime<Utc>>,
    pub position: Position,
}

#[derive(Debug, Clone)]
pub enum ChangeItem {
    Begin {
        txid: String,
        commit_time: Option<DateTime<Utc>>,
        position: Position,
    },
    Change(RowChange),
    Commit {
        txid: String,
        commit_time: Option<DateTime<Utc>>,
        position: Position,
        events: u64,
    },
    /// Nothing to report up to `position`; acknowledging it lets the engine
    /// release the log it retains for quiet tables.
    Heartbeat { position: Position },
}

impl ChangeItem {
    pub fn position(&self) -> &Position {
        match self {
            ChangeItem::Begin { position, .. }
            | ChangeItem::Commit { position, .. }
            | ChangeItem::Heartbeat { position } => position,
            ChangeItem::Change(c) => &c.position,
        }
    }
}

/// A running change stream. Dropping `items` ends the engine's task and
/// releases the subscription for the next consumer.
pub struct ChangeFeed {
    pub items: mpsc::Receiver<Result<ChangeItem, BackendError>>,
    /// Positions the client acknowledged, in order.
    pub acks: mpsc::UnboundedSender<Position>,
}
