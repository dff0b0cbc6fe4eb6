//! StreamService, change-stream part: `WatchChanges` (a bidirectional
//! stream: one `WatchStart`, then acknowledgements; change events back) and
//! `DeleteSubscription`. Subscriptions are namespaced per tenant, and the
//! positions handed out carry the tenant and subscription they belong to,
//! so one tenant can neither resume nor acknowledge another's stream.

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Streaming};
use weir_proto::v1 as pb;

use super::{bad, caller, check_plain_name, convert, source, StreamIn, StreamOut};
use crate::backend::changes::{ChangeItem, ChangeOp, Position, RowChange, TableName};
use crate::backend::WatchSpec;
use crate::config::ChangesConfig;
use crate::error::{Error, Result};
use crate::tenant::Caller;

/// Longest subscription name.
const MAX_SUBSCRIPTION: usize = 100;
/// Most tables one subscription watches.
const MAX_TABLES: usize = 100;
/// First byte of every position Weir hands out; a new layout gets a new one.
const POSITION_VERSION: u8 = 2;
/// Positions handed out before they named their source: still taken.
const POSITION_VERSION_WITHOUT_SOURCE: u8 = 1;
/// How long a call may take to send its WatchStart: a caller that never does
/// would otherwise hold a concurrency slot for good.
const START_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Responses buffered for a slow client before the engine's reader waits.
const WATCH_BUFFER: usize = 64;

type WatchSender = StreamOut<pb::WatchChangesResponse>;

fn check_subscription(name: &str) -> Result<()> {
    check_plain_name("subscription", name, MAX_SUBSCRIPTION)
}

/// The subscription's name in the engine: readable, unique per tenant (by
/// the hash), and a plain identifier of at most 63 bytes on every engine.
pub fn subscription_id(tenant: &str, name: &str) -> String {
    fn plain(s: &str, max: usize) -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(max)
            .collect()
    }
    let digest = Sha256::digest(format!("{tenant}\0{name}").as_bytes());
    format!(
        "weir_{}_{}_{}",
        plain(tenant, 20),
        plain(name, 24),
        hex::encode(&digest[..6])
    )
}

/// Whose a position is: a tenant's subscription on one of its sources.
/// Subscriptions of the same name on two sources (two servers) have
/// positions alike, and one taken for the other would skip changes there.
#[derive(Clone, Copy)]
struct Owner<'a> {
    tenant: &'a str,
    source: &'a str,
    subscription: &'a str,
}

/// A position as the client sees it: version, tenant, source, subscription,
/// then the engine's bytes.
fn encode_position(owner: Owner<'_>, p: &Position) -> Vec<u8> {
    let Owner {
        tenant,
        source,
        subscription,
    } = owner;
    let mut out = Vec::with_capacity(7 + tenant.len() + source.len() + subscription.len() + p.0.len());
    out.push(POSITION_VERSION);
    for part in [tenant, source, subscription] {
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(&p.0);
    out
}

fn decode_position(field: &'static str, owner: Owner<'_>, bytes: &[u8]) -> Result<Position> {
    let Owner {
        tenant,
        source,
        subscription,
    } = owner;
    let foreign = || {
        bad(
            field,
            format!("not a position of subscription \"{subscription}\" of source \"{source}\""),
        )
    };
    let (&version, mut rest) = bytes.split_first().ok_or_else(foreign)?;
    let parts: &[&str] = match version {
        POSITION_VERSION => &[tenant, source, subscription],
        POSITION_VERSION_WITHOUT_SOURCE => &[tenant, subscription],
        _ => return Err(foreign()),
    };
    for expected in parts {
        let (len, tail) = rest.split_at_checked(2).ok_or_else(foreign)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let (part, tail) = tail.split_at_checked(len).ok_or_else(foreign)?;
        if part != expected.as_bytes() {
            return Err(foreign());
        }
        rest = tail;
    }
    Ok(Position(rest.to_vec()))
}

fn tables(refs: Vec<pb::TableRef>) -> Result<Vec<TableName>> {
    if refs.is_empty() || refs.len() > MAX_TABLES {
        return Err(bad("tables", format!("name 1-{MAX_TABLES} tables to watch")));
    }
    refs.into_iter()
        .map(|t| {
            if t.table.is_empty() {
                return Err(bad("tables", "every table needs a name"));
            }
            Ok(TableName {
                schema: (!t.schema.is_empty()).then_some(t.schema),
                table: t.table,
            })
        })
        .collect()
}

struct Stamp<'a> {
    owner: Owner<'a>,
}

impl Stamp<'_> {
    fn position(&self, p: &Position) -> Vec<u8> {
        encode_position(self.owner, p)
    }

    /// The message for `item`; boundaries and heartbeats carry the time the stream has been throttled so far.
    fn response(&self, item: ChangeItem, throttled: std::time::Duration) -> pb::WatchChangesResponse {
        use pb::watch_changes_response::Message;
        let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(convert::timestamp);
        let message = match item {
            ChangeItem::Begin {
                txid,
                commit_time,
                position,
            } => Message::Transaction(pb::TransactionBoundary {
                begin: true,
                transaction_id: txid,
                commit_time: time(commit_time),
                position: self.position(&position),
                event_count: 0,
                throttled: Some(convert::duration(throttled)),
            }),
            ChangeItem::Commit {
                txid,
                commit_time,
                position,
                events,
            } => Message::Transaction(pb::TransactionBoundary {
                begin: false,
                transaction_id: txid,
                commit_time: time(commit_time),
                position: self.position(&position),
                event_count: events,
                throttled: Some(convert::duration(throttled)),
            }),
            ChangeItem::Heartbeat { position } => Message::Heartbeat(pb::Heartbeat {
                position: self.position(&position),
                server_time: Some(convert::timestamp(chrono::Utc::now())),
                throttled: Some(convert::duration(throttled)),
            }),
            ChangeItem::Change(c) => Message::Change(self.change(c)),
        };
        pb::WatchChangesResponse { message: Some(message) }
    }

    fn change(&self, c: RowChange) -> pb::ChangeEvent {
        let op = match c.op {
            ChangeOp::Insert => pb::ChangeOperation::Insert,
            ChangeOp::Update => pb::ChangeOperation::Update,
            ChangeOp::Delete => pb::ChangeOperation::Delete,
            ChangeOp::SnapshotRead => pb::ChangeOperation::SnapshotRead,
            ChangeOp::Truncate => pb::ChangeOperation::Truncate,
        };
        pb::ChangeEvent {
            op: op as i32,
            position: self.position(&c.position),
            schema: c.schema,
            table: c.table,
            columns: c.columns.iter().cloned().map(convert::column).collect(),
            before: c.before.map(convert::row),
            after: c.after.map(convert::row),
            unchanged_columns: c.unchanged,
            primary_key: c.primary_key.to_vec(),
            transaction_id: c.txid,
            commit_time: c.commit_time.map(convert::timestamp),
        }
    }
}

pub async fn watch(
    request: Request<Streaming<pb::WatchChangesRequest>>,
    config: &ChangesConfig,
    cut: CancellationToken,
    stream_idle: std::time::Duration,
) -> Result<StreamIn<pb::WatchChangesResponse>> {
    use pb::watch_changes_request::Message;
    let caller = caller(&request)?;
    let slot = super::slot_until_end(&request);
    let mut inbound = request.into_inner();
    let first = tokio::time::timeout(START_WAIT, inbound.message())
        .await
        .map_err(|_| bad("start", format!("no WatchStart within {START_WAIT:?}")))?
        .map_err(|e| {
            if super::refused_by_transport(&e) {
                Error::BadMessage(e)
            } else {
                bad("start", format!("could not read the first message: {}", e.message()))
            }
        })?;
    let Some(Message::Start(start)) = first.and_then(|m| m.message) else {
        return Err(bad("start", "the first message must be a WatchStart"));
    };
    let source = source(&caller, &start.source)?;
    let (sql, retired) = (source.backend.sql()?.clone(), source.retired.clone());
    check_subscription(&start.subscription)?;
    let tenant = caller.tenant.id.clone();
    let resume = (!start.resume_position.is_empty())
        .then(|| {
            let owner = Owner {
                tenant: &tenant,
                source: &start.source,
                subscription: &start.subscription,
            };
            decode_position("resume_position", owner, &start.resume_position)
        })
        .transpose()?;
    let tables = tables(start.tables)?;
    let names: Vec<String> = tables
        .iter()
        .map(|t| super::display_table(t.schema.as_deref(), &t.table))
        .collect();
    super::record_object(&names.join(","));
    let spec = WatchSpec {
        id: subscription_id(&tenant, &start.subscription),
        name: start.subscription.clone(),
        tables,
        resume: resume.clone(),
        snapshot: start.snapshot,
        take_over: start.take_over,
        poll_interval: config.poll_interval,
        heartbeat_interval: config.heartbeat_interval,
    };
    let permit = caller.tenant.limiter.admit_subscription()?;
    let feed = sql.watch(spec).await?;
    let floor = resume.clone().or_else(|| feed.start.clone());
    let (tx, rx) = StreamOut::channel(WATCH_BUFFER, stream_idle);
    let task = async move {
        let _slots = (permit, slot);
        let _active = caller.tenant.metrics.stream_started();
        let pump = Pump {
            caller: &caller,
            source: &start.source,
            subscription: &start.subscription,
            delivered: resume.clone().or(feed.acknowledged.clone()),
            resumed_at: floor,
            retired,
        };
        pump.run(feed, inbound, &tx, cut).await;
        tx.drained().await;
    };
    // In the call's span: what it logs names the tenant and the call.
    tokio::spawn(tracing::Instrument::in_current_span(task));
    Ok(rx)
}

struct Pump<'a> {
    caller: &'a Caller,
    source: &'a str,
    subscription: &'a str,
    /// The latest position sent (before any, where the stream started): an
    /// acknowledgement may not pass it.
    delivered: Option<Position>,
    /// Where the stream resumed (or, without a resume position, where the
    /// engine started: see `ChangeFeed::start`). Resumed inside a transaction, an engine
    /// sends that transaction's Begin first, from before this position: it
    /// is sent at this position instead, so that positions never go back and
    /// every one sent can be acknowledged and resumed from.
    resumed_at: Option<Position>,
    /// The source's [`crate::tenant::Source::retired`].
    retired: CancellationToken,
}

impl Pump<'_> {
    fn owner(&self) -> Owner<'_> {
        Owner {
            tenant: &self.caller.tenant.id,
            source: self.source,
            subscription: self.subscription,
        }
    }

    fn ack(&self, bytes: &[u8]) -> Result<Position> {
        let p = decode_position("ack.position", self.owner(), bytes)?;
        if self.delivered.as_ref().is_none_or(|d| &p > d) {
            return Err(bad(
                "ack.position",
                "acknowledges a position that was not delivered yet",
            ));
        }
        Ok(p)
    }

    async fn run(
        mut self,
        mut feed: crate::backend::ChangeFeed,
        mut inbound: Streaming<pb::WatchChangesRequest>,
        tx: &WatchSender,
        cut: CancellationToken,
    ) {
        use pb::watch_changes_request::Message;
        let mut tally = super::Tally::default();
        // Field by field: the pump's own state changes while the stamp is held.
        let stamp = Stamp {
            owner: Owner {
                tenant: &self.caller.tenant.id,
                source: self.source,
                subscription: self.subscription,
            },
        };
        let (revoked, expires) = (self.caller.revoked.clone(), self.caller.expires);
        let (cut, revoked, retired) = (&cut, &revoked, &self.retired.clone());
        // Why the stream must end now, whatever it waits for.
        let stopped = move || async move {
            tokio::select! {
                biased;
                e = super::stopped(cut, revoked, expires) => e,
                () = retired.cancelled() => Error::SourceRetired,
            }
        };
        // A client may half-close once it has nothing more to acknowledge.
        let mut listening = true;
        let mut throttled = std::time::Duration::ZERO;
        loop {
            tokio::select! {
                item = feed.items.recv() => {
                    let item = match item {
                        // The reader ends only after saying why, or when this
                        // stream is gone: this is a reader that panicked.
                        None => {
                            tx.fail(crate::backend::BackendError::Internal(
                                "the change stream's reader stopped unexpectedly (see the server log); \
                                 watch again to resume from the last acknowledged position"
                                    .into(),
                            ));
                            return;
                        }
                        Some(Err(e)) => {
                            tx.fail(e);
                            return;
                        }
                        Some(Ok(mut item)) => {
                            if let Some(floor) = &self.resumed_at {
                                item.not_before(floor);
                            }
                            item
                        }
                    };
                    // Never lowered: a stream started from its subscription's
                    // acknowledgement may send part of that transaction again.
                    if self.delivered.as_ref().is_none_or(|d| item.position() > d) {
                        self.delivered = Some(item.position().clone());
                    }
                    let is_change = matches!(item, ChangeItem::Change(_));
                    let response = stamp.response(item, throttled);
                    if is_change {
                        let bytes = prost::Message::encoded_len(&response) as u64;
                        // A throttled tenant may wait long here: a revocation
                        // or a client that left still ends the stream at once.
                        throttled += tokio::select! {
                            biased;
                            e = stopped() => {
                                tx.fail(e);
                                return;
                            }
                            () = tx.closed() => return,
                            waited = self.caller.tenant.limiter.charge_records(1, bytes) => waited,
                        };
                        self.caller.tenant.count_returned(self.source, 1, bytes);
                        tally.add(1, bytes);
                    }
                    // What was not acknowledged is sent again on resume. A
                    // client that stopped reading holds this wait until its
                    // idle timeout; a revocation or a shutdown ends it at once.
                    let delivered = tokio::select! {
                        biased;
                        e = stopped() => {
                            tx.fail(e);
                            return;
                        }
                        sent = tx.deliver(response) => sent,
                    };
                    if !delivered {
                        return;
                    }
                }
                message = inbound.message(), if listening => match message {
                    Ok(Some(pb::WatchChangesRequest { message: Some(Message::Ack(ack)) })) => {
                        match self.ack(&ack.position) {
                            // Only an ack that moves on wakes the reader.
                            Ok(p) => {
                                feed.acks.send_if_modified(|last| {
                                    let moves_on = last.as_ref().is_none_or(|a| &p > a);
                                    if moves_on {
                                        *last = Some(p);
                                    }
                                    moves_on
                                });
                            }
                            Err(e) => {
                                tx.fail(e);
                                return;
                            }
                        }
                    }
                    Ok(Some(_)) => {
                        tx.fail(bad("message", "after WatchStart, send only WatchAck"));
                        return;
                    }
                    Ok(None) => listening = false,
                    Err(status) => {
                        // A stream cut short never ends with OK.
                        if super::refused_by_transport(&status) {
                            tx.fail(Error::BadMessage(status));
                        }
                        return;
                    }
                },
                () = tx.closed() => return,
                e = stopped() => {
                    tx.fail(e);
                    return;
                }
            }
        }
    }
}

pub async fn delete(request: Request<pb::DeleteSubscriptionRequest>) -> Result<()> {
    let caller = caller(&request)?;
    let r = request.into_inner();
    let source = source(&caller, &r.source)?;
    let sql = source.backend.sql()?.clone();
    check_subscription(&r.subscription)?;
    // One at a time per source; the wait is bounded like a statement's, so
    // deletes piling up behind a slow one are not an unbounded queue.
    let wait = super::statement_timeout(&caller);
    let _one = tokio::time::timeout(wait, source.deletes.acquire())
        .await
        .map_err(|_| Error::Timeout(wait))?;
    sql.delete_subscription(&subscription_id(&caller.tenant.id, &r.subscription), &r.subscription)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Positions come back exactly for their own tenant and subscription, and never for another's.
        #[test]
        fn positions_round_trip_and_stay_bound(
            tenant in "[a-z]{1,10}", other in "[a-z]{1,10}", sub in "[a-z]{1,10}",
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let p = Position(bytes);
            let owner = |tenant, source| Owner { tenant, source, subscription: &sub };
            let encoded = encode_position(owner(&tenant, "db"), &p);
            proptest::prop_assert_eq!(decode_position("p", owner(&tenant, "db"), &encoded).ok(), Some(p.clone()));
            if other != tenant {
                proptest::prop_assert!(decode_position("p", owner(&other, "db"), &encoded).is_err());
            }
            proptest::prop_assert!(decode_position("p", owner(&tenant, "db2"), &encoded).is_err(), "another source's");
            // A position handed out before positions named their source.
            let mut old = vec![POSITION_VERSION_WITHOUT_SOURCE];
            for part in [tenant.as_str(), sub.as_str()] {
                old.extend_from_slice(&(part.len() as u16).to_be_bytes());
                old.extend_from_slice(part.as_bytes());
            }
            old.extend_from_slice(&p.0);
            proptest::prop_assert_eq!(decode_position("p", owner(&tenant, "db2"), &old).ok(), Some(p));
        }

        /// Forged bytes are refused or read as some position of the caller's own; never a panic.
        #[test]
        fn forged_positions_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..128)) {
            let owner = Owner { tenant: "t", source: "db", subscription: "s" };
            let _ = decode_position("p", owner, &bytes);
        }

        /// Subscription ids are plain identifiers of at most 63 bytes, whatever the names.
        #[test]
        fn subscription_ids_are_always_plain(tenant in ".{0,80}", name in ".{0,80}") {
            let id = subscription_id(&tenant, &name);
            proptest::prop_assert!(id.len() <= 63);
            proptest::prop_assert!(id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        }
    }

    #[test]
    fn subscription_ids_are_plain_unique_and_short() {
        let a = subscription_id("acme", "orders");
        assert!(a.starts_with("weir_acme_orders_"));
        assert_ne!(a, subscription_id("acme2", "orders"));
        // Names that sanitize alike still differ by the hash.
        assert_ne!(subscription_id("a-b", "x"), subscription_id("a_b", "x"));
        let long = subscription_id(&"T".repeat(200), &"s.".repeat(50));
        assert!(long.len() <= 63, "{}", long.len());
        assert!(long
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    }

    #[test]
    fn positions_are_bound_to_tenant_source_and_subscription() {
        let p = Position(vec![0, 1, 2, 3]);
        let owner = |tenant, source, subscription| Owner {
            tenant,
            source,
            subscription,
        };
        let bytes = encode_position(owner("acme", "pg_eu", "orders"), &p);
        assert_eq!(
            decode_position("f", owner("acme", "pg_eu", "orders"), &bytes).ok(),
            Some(p)
        );
        assert!(decode_position("f", owner("other", "pg_eu", "orders"), &bytes).is_err());
        assert!(decode_position("f", owner("acme", "pg_eu", "other"), &bytes).is_err());
        let err = decode_position("f", owner("acme", "pg_us", "orders"), &bytes).expect_err("another source's");
        assert!(format!("{err}").contains("of source \"pg_us\""), "{err}");
        for cut in 0..bytes.len() - 4 {
            assert!(decode_position("f", owner("acme", "pg_eu", "orders"), &bytes[..cut]).is_err());
        }
    }

    #[test]
    fn subscription_names_are_checked() {
        assert!(check_subscription("orders.v2_x-y").is_ok());
        for bad in ["", "a b", "a;drop", "é", &"x".repeat(101)] {
            assert!(check_subscription(bad).is_err(), "{bad:?}");
        }
    }
}
