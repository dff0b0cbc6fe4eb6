//! A change stream from `WatchChanges`: events in, acknowledgements out on
//! the same bidirectional call.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Status, Streaming};
use weir_proto::v1::watch_changes_request::Message;
use weir_proto::v1::{WatchAck, WatchChangesRequest, WatchChangesResponse, WatchStart};

use crate::status::{request_id, with_request_id};
use crate::transport::SentNotice;
use crate::WeirClient;

/// Acknowledgements queued before `ack` waits for the call to take them.
const ACK_BUFFER: usize = 64;

/// How long [`ChangeWatch::finish`] waits for its acknowledgements to reach the server.
const FINISH_WAIT: Duration = Duration::from_secs(5);

/// A running `WatchChanges` call. Dropping it ends the call; the server
/// keeps the subscription, positioned at the last acknowledgement it
/// received (see [`ChangeWatch::finish`]).
pub struct ChangeWatch {
    events: Streaming<WatchChangesResponse>,
    acks: mpsc::Sender<WatchChangesRequest>,
    /// Fired once the request stream has ended and the server has read it.
    sent: oneshot::Receiver<()>,
    /// The server's id of the call, for the errors made on this side.
    request_id: Option<MetadataValue<Ascii>>,
}

impl ChangeWatch {
    /// The next event, transaction boundary or heartbeat; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<WatchChangesResponse>, Status> {
        let next = self.events.message().await;
        next.map_err(|status| with_request_id(status, self.request_id.as_ref()))
    }

    /// Tells the server that everything up to and including `position` is
    /// processed: it may release the engine's log up to there. The
    /// acknowledgement is queued; [`Self::finish`] waits until it is sent.
    /// On a call the server has ended, the error is the server's own status
    /// (a subscription taken over, a source gone), not a bare CANCELLED.
    pub async fn ack(&mut self, position: Vec<u8>) -> Result<(), Status> {
        let ack = WatchChangesRequest {
            message: Some(Message::Ack(WatchAck { position })),
        };
        if self.acks.send(ack).await.is_ok() {
            return Ok(());
        }
        // Events still unread go unacknowledged, and come again on the next watch.
        let ending = async {
            loop {
                match self.events.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return None,
                    Err(status) => return Some(status),
                }
            }
        };
        let ended = tokio::time::timeout(FINISH_WAIT, ending).await.ok().flatten();
        let status = ended.unwrap_or_else(|| Status::cancelled("the change stream has ended"));
        Err(with_request_id(status, self.request_id.as_ref()))
    }

    /// Ends the call once every acknowledgement queued has reached the
    /// server (within 5 s), for a consumer about to exit: dropping the
    /// watch, or the runtime, may lose the last ones, and a restart would
    /// get their changes again. Events that come meanwhile are dropped.
    pub async fn finish(self) -> Result<(), Status> {
        let ChangeWatch {
            mut events,
            acks,
            sent,
            request_id,
        } = self;
        // Ends the request stream after the queued acknowledgements.
        drop(acks);
        let mut sent = std::pin::pin!(sent);
        let settled = async {
            loop {
                tokio::select! {
                    confirmed = &mut sent => {
                        return confirmed.map_err(|_| {
                            Status::unavailable("the change stream ended before its acknowledgements were sent")
                        });
                    }
                    // Read, so that a server waiting to deliver reads the acknowledgements.
                    event = events.message() => match event {
                        Ok(Some(_)) => {}
                        Ok(None) => return Ok(()),
                        Err(status) => return Err(status),
                    },
                }
            }
        };
        let settled = tokio::time::timeout(FINISH_WAIT, settled).await.map_err(|_| {
            Status::deadline_exceeded(format!(
                "the acknowledgements did not reach the server within {FINISH_WAIT:?}"
            ))
        });
        settled
            .and_then(|s| s)
            .map_err(|status| with_request_id(status, request_id.as_ref()))
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
        let (notice, sent) = SentNotice::new();
        let mut request = tonic::Request::new(ReceiverStream::new(outbound));
        request.extensions_mut().insert(notice);
        let response = self.stream().watch_changes(request).await?;
        let request_id = request_id(&response);
        Ok(ChangeWatch {
            events: response.into_inner(),
            acks,
            sent,
            request_id,
        })
    }
}
