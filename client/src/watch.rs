//! A change stream from `WatchChanges`: events in, acknowledgements out on
//! the same bidirectional call.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use weir_proto::v1::watch_changes_request::Message;
use weir_proto::v1::{WatchAck, WatchChangesRequest, WatchChangesResponse, WatchStart};

use crate::WeirClient;

/// Acknowledgements queued before `ack` waits for the call to take them.
const ACK_BUFFER: usize = 64;

/// A running `WatchChanges` call. Dropping it ends the call; the server
/// keeps the subscription, positioned at the last acknowledgement.
pub struct ChangeWatch {
    events: Streaming<WatchChangesResponse>,
    acks: mpsc::Sender<WatchChangesRequest>,
}

impl ChangeWatch {
    /// The next event, transaction boundary or heartbeat; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<WatchChangesResponse>, Status> {
        self.events.message().await
    }

    /// Tells the server that everything up to and including `position` is
    /// processed: it may release the engine's log up to there.
    pub async fn ack(&self, position: Vec<u8>) -> Result<(), Status> {
        let ack = WatchChangesRequest {
            message: Some(Message::Ack(WatchAck { position })),
        };
        self.acks
            .send(ack)
            .await
            .map_err(|_| Status::cancelled("the change stream has ended"))
    }
}

impl WeirClient {
    /// Opens a change stream on `start.source` for `start.subscription`.
    pub async fn watch(&self, start: WatchStart) -> Result<ChangeWatch, Status> {
        let (acks, outbound) = mpsc::channel(ACK_BUFFER);
        let first = WatchChangesRequest {
            message: Some(Message::Start(start)),
        };
        acks.send(first)
            .await
            .map_err(|_| Status::internal("the request stream closed before it started"))?;
        let events = self
            .stream()
            .watch_changes(ReceiverStream::new(outbound))
            .await?
            .into_inner();
        Ok(ChangeWatch { events, acks })
    }
}
