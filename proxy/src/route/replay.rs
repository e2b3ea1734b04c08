//! Keeping a request body so that a retry can send it again: [`ReplayBody`]
//! streams the client's body to the first attempt frame by frame, with no
//! delay, while recording the frames (up to a cap on data bytes) so a later
//! attempt can be given the same frames again.
//!
//! A retry layer wraps the request body once with [`ReplayBody::new`],
//! keeps a [`ReplayHandle`] while the first attempt reads the body, and, if
//! that attempt fails, takes a [`ReplayHandle::replay`] for the next
//! attempt. A replay yields the recorded frames, then goes on reading from
//! the client where the previous attempt stopped. From then on the client's
//! body belongs to the newest reader: an older one (a failed attempt whose
//! connection still pulls the body) gets an error instead of frames, so it
//! cannot push the recording over the cap behind the retry's back.
//!
//! The body stops being replayable when recording would go over the cap
//! (the recorded frames are then dropped to free the memory, and the attempt
//! reading keeps getting the client's frames), when the client's declared
//! length is already over the cap, or when the client's body fails.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::core::body::{BoxError, ProxyBody};

/// Why a [`ReplayBody`] reader could not be given a frame it had not read
/// yet. Only a reader running at the same time as another one can see
/// these: the newest reader of a body that is still replayable never does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReplayError {
    /// A newer reader (the next attempt) took over the client's body.
    #[error("the request body was taken over by a retry")]
    Superseded,
    /// The recorded frames were dropped because the body went over the cap.
    #[error("the request body went over the replay cap and can no longer be replayed")]
    OverCap,
    /// The client's body failed while another reader was reading it.
    #[error("the request body failed in an earlier read")]
    SourceFailed,
}

/// A frame kept for replay.
enum Recorded {
    Data(Bytes),
    Trailers(HeaderMap),
}

/// The state shared by every reader of one request body.
struct Shared {
    /// The frames recorded so far; emptied once the body is not replayable.
    frames: Vec<Recorded>,
    /// How many frames the source has yielded, recorded or not: the
    /// position of the source's next frame.
    frames_read: usize,
    /// The client's body; `None` once it ended or failed.
    source: Option<ProxyBody>,
    /// Whether the source yielded its last frame.
    source_ended: bool,
    /// Whether the source yielded an error.
    source_failed: bool,
    /// Whether recording went (or would have gone) over the cap.
    over_cap: bool,
    /// Data bytes in `frames`.
    recorded_bytes: usize,
    /// Data bytes the source has yielded, recorded or not.
    bytes_read: u64,
    /// The most data bytes kept.
    cap: usize,
    /// The newest reader's generation: only it may read the source.
    generation: u64,
}

impl Shared {
    fn recording(&self) -> bool {
        !self.over_cap && !self.source_failed
    }

    /// Stops recording and frees the recorded frames.
    fn drop_recording(&mut self) {
        self.frames = Vec::new();
        self.recorded_bytes = 0;
    }

    /// Records a frame the source just yielded.
    fn record(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.bytes_read += data.len() as u64;
        }
        if !self.recording() {
            return;
        }
        if let Some(data) = frame.data_ref() {
            if self.recorded_bytes + data.len() > self.cap {
                self.over_cap = true;
                self.drop_recording();
            } else {
                self.recorded_bytes += data.len();
                self.frames.push(Recorded::Data(data.clone()));
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            self.frames.push(Recorded::Trailers(trailers.clone()));
        } else {
            // A kind of frame this version cannot keep: the body can still
            // be read, but not replayed.
            self.over_cap = true;
            self.drop_recording();
        }
    }

    fn lost(&self) -> ReplayError {
        if self.source_failed {
            ReplayError::SourceFailed
        } else {
            ReplayError::OverCap
        }
    }
}

/// A request body that can be sent again: the first reader gets the
/// client's frames as they arrive, and each [`replay`](ReplayHandle::replay) gets
/// the same frames from the start.
///
/// Every reader has its own position; they share the recorded frames and
/// the client's body (behind a mutex that is never held across an await).
/// The newest reader, past the recorded frames, reads the client's body
/// itself and records what it gets; an older reader gets
/// [`ReplayError::Superseded`] there instead. A reader that is behind when
/// the recording is dropped (over the cap, or the client's body failed)
/// gets a [`ReplayError`] too.
pub(crate) struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// The index of this reader's next frame.
    position: usize,
    /// Data bytes this reader was given.
    bytes_read: u64,
    /// Which replay this reader is: 0 for the first.
    generation: u64,
}

impl ReplayBody {
    /// Wraps the client's `body`, keeping up to `cap` data bytes for replay.
    /// A body whose declared length (its size hint's lower bound) is already
    /// over `cap` is not replayable from the start and nothing is recorded.
    pub(crate) fn new(body: ProxyBody, cap: usize) -> ReplayBody {
        let over_cap = body.size_hint().lower() > cap as u64;
        let source_ended = body.is_end_stream();
        let shared = Shared {
            frames: Vec::new(),
            frames_read: 0,
            source: (!source_ended).then_some(body),
            source_ended,
            source_failed: false,
            over_cap,
            recorded_bytes: 0,
            bytes_read: 0,
            cap,
            generation: 0,
        };
        ReplayBody {
            shared: Arc::new(Mutex::new(shared)),
            position: 0,
            bytes_read: 0,
            generation: 0,
        }
    }

    /// A handle that makes replays of this body later, without being a
    /// reader itself.
    pub(crate) fn handle(&self) -> ReplayHandle {
        ReplayHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reading a body's state without a handle, for the tests.
#[cfg(test)]
impl ReplayBody {
    /// Whether the body can still be sent again: nothing was dropped because
    /// of the cap and the client's body did not fail.
    fn is_replayable(&self) -> bool {
        self.lock().recording()
    }

    /// A new reader of the body, starting from its first frame; `None` when
    /// the body is not replayable: over the cap, or the client's body failed.
    fn replay(&self) -> Option<ReplayBody> {
        self.handle().replay()
    }
}

/// Makes replays of a [`ReplayBody`]; see [`ReplayBody::handle`].
pub(crate) struct ReplayHandle {
    shared: Arc<Mutex<Shared>>,
}

impl ReplayHandle {
    /// Whether the client's whole body was read and recorded: replays then
    /// read only the recording, and readers at the same time (hedged
    /// attempts) cannot disturb one another.
    pub(crate) fn is_complete(&self) -> bool {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.source_ended && shared.recording()
    }

    /// A new reader of the body, starting from its first frame, for the
    /// next attempt; `None` when the body is not replayable (over the cap,
    /// or the client's body failed). The new reader takes the client's
    /// body over from every earlier one.
    pub(crate) fn replay(&self) -> Option<ReplayBody> {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if !shared.recording() {
            return None;
        }
        shared.generation += 1;
        Some(ReplayBody {
            shared: Arc::clone(&self.shared),
            position: 0,
            bytes_read: 0,
            generation: shared.generation,
        })
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut guard = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let shared = &mut *guard;

        // Behind the source: replay a recorded frame.
        if this.position < shared.frames_read {
            let Some(recorded) = shared.frames.get(this.position) else {
                return Poll::Ready(Some(Err(shared.lost().into())));
            };
            this.position += 1;
            let frame = match recorded {
                Recorded::Data(data) => {
                    this.bytes_read += data.len() as u64;
                    Frame::data(data.clone())
                }
                Recorded::Trailers(trailers) => Frame::trailers(trailers.clone()),
            };
            return Poll::Ready(Some(Ok(frame)));
        }

        // At the source: read the client's next frame, if no newer reader
        // took it over.
        if this.generation != shared.generation && shared.source.is_some() {
            return Poll::Ready(Some(Err(ReplayError::Superseded.into())));
        }
        let Some(source) = shared.source.as_mut() else {
            return Poll::Ready(if shared.source_failed {
                Some(Err(ReplayError::SourceFailed.into()))
            } else {
                None
            });
        };
        let polled = Pin::new(source).poll_frame(cx);
        let result = match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                shared.record(&frame);
                shared.frames_read += 1;
                this.position = shared.frames_read;
                if let Some(data) = frame.data_ref() {
                    this.bytes_read += data.len() as u64;
                }
                if shared.source.as_ref().is_some_and(Body::is_end_stream) {
                    shared.source = None;
                    shared.source_ended = true;
                }
                Some(Ok(frame))
            }
            Poll::Ready(Some(Err(error))) => {
                shared.source = None;
                shared.source_failed = true;
                shared.drop_recording();
                Some(Err(error))
            }
            Poll::Ready(None) => {
                shared.source = None;
                shared.source_ended = true;
                None
            }
        };
        Poll::Ready(result)
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.lock();
        self.position >= shared.frames_read && shared.source_ended
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.lock();
        let behind = shared.bytes_read.saturating_sub(self.bytes_read);
        let (lower, upper) = match &shared.source {
            Some(source) => {
                let hint = source.size_hint();
                (hint.lower(), hint.upper())
            }
            None if shared.source_ended => (0, Some(0)),
            None => (0, None),
        };
        let mut hint = SizeHint::new();
        if let Some(upper) = upper {
            hint.set_upper(upper.saturating_add(behind));
        }
        hint.set_lower(lower.saturating_add(behind));
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use http::HeaderValue;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    use super::*;
    use crate::core::body::{boxed, full};

    type Item = Result<Frame<Bytes>, BoxError>;

    /// A body whose frames the test sends, with an optional declared length.
    struct ChannelBody {
        rx: mpsc::Receiver<Item>,
        remaining: Option<u64>,
    }

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
            let polled = self.rx.poll_recv(cx);
            if let Poll::Ready(Some(Ok(frame))) = &polled
                && let (Some(data), Some(remaining)) = (frame.data_ref(), &mut self.remaining)
            {
                *remaining -= data.len() as u64;
            }
            polled
        }

        fn size_hint(&self) -> SizeHint {
            self.remaining.map(SizeHint::with_exact).unwrap_or_default()
        }
    }

    fn channel_body(length: Option<u64>) -> (mpsc::Sender<Item>, ProxyBody) {
        let (tx, rx) = mpsc::channel(8);
        let body = ChannelBody {
            rx,
            remaining: length,
        };
        (tx, boxed(body))
    }

    fn data(bytes: &'static [u8]) -> Item {
        Ok(Frame::data(Bytes::from_static(bytes)))
    }

    fn trailers() -> HeaderMap {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers
    }

    /// Reads `body` to its end: its data frames and its trailers.
    async fn read_all(body: &mut ReplayBody) -> (Vec<Bytes>, Option<HeaderMap>) {
        let (mut chunks, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("a frame");
            match frame.into_data() {
                Ok(data) => chunks.push(data),
                Err(frame) => trailers = Some(frame.into_trailers().expect("trailers")),
            }
        }
        (chunks, trailers)
    }

    async fn next_data(body: &mut ReplayBody) -> Bytes {
        let frame = body.frame().await.expect("a frame").expect("not an error");
        frame.into_data().expect("a data frame")
    }

    fn poll_once(body: &mut ReplayBody, waker: &Waker) -> Poll<Option<Item>> {
        Pin::new(body).poll_frame(&mut Context::from_waker(waker))
    }

    #[tokio::test]
    async fn the_first_attempt_gets_each_frame_as_it_arrives() {
        let (tx, source) = channel_body(None);
        let mut body = ReplayBody::new(source, 1024);

        tx.send(data(b"one")).await.unwrap();
        assert_eq!(next_data(&mut body).await, "one");
        assert!(
            poll_once(&mut body, Waker::noop()).is_pending(),
            "the second frame was not sent yet"
        );

        tx.send(data(b"two")).await.unwrap();
        assert_eq!(next_data(&mut body).await, "two");
        drop(tx);
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_replay_after_a_full_read_yields_the_same_data_and_trailers() {
        let (tx, source) = channel_body(None);
        let mut first = ReplayBody::new(source, 1024);
        for item in [data(b"a"), data(b"bc"), Ok(Frame::trailers(trailers()))] {
            tx.send(item).await.unwrap();
        }
        drop(tx);

        let original = read_all(&mut first).await;
        assert_eq!(
            original,
            (vec![Bytes::from("a"), Bytes::from("bc")], Some(trailers()))
        );
        assert!(first.is_replayable());

        let mut second = first.replay().expect("replayable");
        assert_eq!(read_all(&mut second).await, original);
        let mut third = second.replay().expect("still replayable");
        assert_eq!(read_all(&mut third).await, original);
    }

    #[tokio::test]
    async fn a_replay_after_a_partial_read_continues_from_the_client() {
        let (tx, source) = channel_body(None);
        let first = ReplayBody::new(source, 1024);
        let keeper = first.handle();
        let mut first = first;

        tx.send(data(b"head")).await.unwrap();
        assert_eq!(next_data(&mut first).await, "head");
        drop(first); // the attempt failed half way

        let mut second = keeper.replay().expect("replayable");
        assert_eq!(next_data(&mut second).await, "head", "replayed");
        assert!(
            poll_once(&mut second, Waker::noop()).is_pending(),
            "waits for the client"
        );
        tx.send(data(b"tail")).await.unwrap();
        tx.send(Ok(Frame::trailers(trailers()))).await.unwrap();
        drop(tx);
        let rest = read_all(&mut second).await;
        assert_eq!(rest, (vec![Bytes::from("tail")], Some(trailers())));

        let mut third = keeper.replay().expect("replayable");
        let all = read_all(&mut third).await;
        assert_eq!(
            all,
            (
                vec![Bytes::from("head"), Bytes::from("tail")],
                Some(trailers())
            )
        );
    }

    #[tokio::test]
    async fn over_the_cap_the_attempt_gets_the_whole_body_but_it_cannot_be_replayed() {
        let (tx, source) = channel_body(None);
        let mut first = ReplayBody::new(source, 5);
        for item in [
            data(b"abc"),
            data(b"de"),
            data(b"fgh"),
            Ok(Frame::trailers(trailers())),
        ] {
            tx.send(item).await.unwrap();
        }
        drop(tx);

        assert_eq!(next_data(&mut first).await, "abc");
        assert_eq!(next_data(&mut first).await, "de");
        assert!(first.is_replayable(), "exactly at the cap");
        assert_eq!(next_data(&mut first).await, "fgh");
        assert!(!first.is_replayable());
        assert!(first.replay().is_none());
        assert!(first.lock().frames.is_empty(), "the recording is freed");

        let rest = read_all(&mut first).await;
        assert_eq!(rest, (vec![], Some(trailers())));
    }

    #[tokio::test]
    async fn a_declared_length_over_the_cap_is_not_replayable_from_the_start() {
        let (tx, source) = channel_body(Some(8));
        let mut first = ReplayBody::new(source, 7);
        assert!(!first.is_replayable());
        assert!(first.replay().is_none());

        tx.send(data(b"1234")).await.unwrap();
        tx.send(data(b"5678")).await.unwrap();
        drop(tx);
        assert_eq!(first.size_hint().exact(), Some(8));
        let (chunks, _) = read_all(&mut first).await;
        assert_eq!(chunks, [Bytes::from("1234"), Bytes::from("5678")]);
        assert!(first.lock().frames.is_empty(), "nothing was recorded");

        let within = ReplayBody::new(full("12345678"), 8);
        assert!(within.is_replayable(), "a length at the cap is fine");
    }

    #[tokio::test]
    async fn a_client_body_error_is_passed_on_and_stops_replays() {
        let (tx, source) = channel_body(None);
        let mut first = ReplayBody::new(source, 1024);
        let keeper = first.handle();
        tx.send(data(b"ok")).await.unwrap();
        tx.send(Err("client reset".into())).await.unwrap();

        assert_eq!(next_data(&mut first).await, "ok");
        let error = first
            .frame()
            .await
            .expect("a frame")
            .expect_err("the error");
        assert_eq!(error.to_string(), "client reset");
        assert!(!first.is_replayable());
        assert!(keeper.replay().is_none());
        assert!(keeper.replay().is_none());
        assert!(!first.is_end_stream(), "a failed body did not end cleanly");
    }

    #[tokio::test]
    async fn a_replay_reports_its_remaining_size_and_end() {
        let (tx, source) = channel_body(Some(6));
        let mut first = ReplayBody::new(source, 1024);
        assert_eq!(first.size_hint().exact(), Some(6));
        tx.send(data(b"abc")).await.unwrap();
        assert_eq!(next_data(&mut first).await, "abc");
        assert_eq!(first.size_hint().exact(), Some(3));

        let mut second = first.replay().expect("replayable");
        assert_eq!(second.size_hint().exact(), Some(6));
        assert!(!second.is_end_stream());
        assert_eq!(next_data(&mut second).await, "abc");
        assert_eq!(second.size_hint().exact(), Some(3));

        tx.send(data(b"def")).await.unwrap();
        drop(tx);
        assert_eq!(next_data(&mut second).await, "def");
        assert_eq!(second.size_hint().exact(), Some(0));
        assert!(second.frame().await.is_none());
        assert!(second.is_end_stream());

        let third = second.replay().expect("replayable");
        assert_eq!(third.size_hint().exact(), Some(6));
        assert!(!third.is_end_stream());

        // A body that says it is done after its last frame: the replay of a
        // fully read body is at its end without polling the client again.
        let mut whole = ReplayBody::new(full("xyz"), 1024);
        assert_eq!(next_data(&mut whole).await, "xyz");
        assert!(whole.is_end_stream());
        let mut again = whole.replay().expect("replayable");
        assert_eq!(again.size_hint().exact(), Some(3));
        assert_eq!(next_data(&mut again).await, "xyz");
        assert!(again.is_end_stream());
        assert_eq!(again.size_hint().exact(), Some(0));
    }

    #[tokio::test]
    async fn a_replay_boxes_into_a_proxy_body() {
        let first = ReplayBody::new(full("boxed"), 1024);
        let mut boxed_body: ProxyBody = boxed(first.replay().expect("replayable"));
        let data = boxed_body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        assert_eq!(data, "boxed");
        assert!(boxed_body.is_end_stream());
    }

    #[tokio::test]
    async fn a_replay_takes_the_client_body_over_from_the_earlier_reader() {
        let (tx, source) = channel_body(None);
        let mut first = ReplayBody::new(source, 1024);
        let handle = first.handle();
        tx.send(data(b"x")).await.unwrap();
        assert_eq!(next_data(&mut first).await, "x");

        // The retry starts while the failed attempt's connection still
        // reads the body: from now on only the retry reads the client.
        let mut retry = handle.replay().expect("replayable");
        tx.send(data(b"y")).await.unwrap();
        let fenced = first.frame().await.expect("an error").unwrap_err();
        assert_eq!(
            fenced.downcast_ref::<ReplayError>(),
            Some(&ReplayError::Superseded)
        );
        assert_eq!(next_data(&mut retry).await, "x", "replayed");
        assert_eq!(next_data(&mut retry).await, "y", "then from the client");
        drop(tx);
        assert!(retry.frame().await.is_none());
    }
}
