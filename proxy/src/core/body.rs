//! The one body type that flows through the proxy: a boxed stream of
//! `Bytes` frames (data and trailers), forwarded as they arrive.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};

use crate::core::context::RequestContext;

/// The error type of every body and of hyper's service boundary.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed, sendable future: what the proxy's services return.
pub(crate) type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// A request or response body as it passes through the proxy's layers.
pub(crate) type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body into a [`ProxyBody`]. Frames are passed on unchanged,
/// never collected.
pub(crate) fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A body holding `bytes`, sent in one frame.
pub(crate) fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    boxed(Full::new(bytes.into()))
}

/// An empty body.
pub(crate) fn empty() -> ProxyBody {
    boxed(Empty::new())
}

/// A body that keeps `held` alive until the body is finished or dropped:
/// a request's counters and circuit-breaker slots last as long as its
/// response streams.
pub(crate) fn holding<H: Send + Unpin + 'static>(body: ProxyBody, held: H) -> ProxyBody {
    boxed(Holding {
        inner: body,
        held: Some(held),
    })
}

struct Holding<H> {
    inner: ProxyBody,
    /// Released as soon as the body ends, not when it is dropped: a
    /// finished body may wait a while to be dropped, and what it holds
    /// (an attempt's span, say) must end before what encloses it.
    held: Option<H>,
}

impl<H: Unpin> Body for Holding<H> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            this.held = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that adds the data bytes it passes to its request's
/// count ([`RequestContext::add_request_bytes`]), for the access log and
/// `infermesh_request_size_bytes`. Put around the client's body, it counts
/// what was read from the client once, however often a retry replays it.
pub(crate) fn counting_request_bytes<B>(body: B, tally: RequestContext) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    boxed(Counting { inner: body, tally })
}

struct Counting<B> {
    inner: B,
    tally: RequestContext,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counting<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.tally.add_request_bytes(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Waits for the first frame of a response's body (or its end), and gives
/// the response back with that frame still to be read: the caller learns
/// that the answer has started (a streamed generation's first event)
/// without taking anything from it.
///
/// (Plain functions returning boxed futures, these two: rustc cannot yet
/// prove the futures of body combinators `Send` inside async blocks.)
pub(crate) fn first_frame(
    response: http::Response<ProxyBody>,
) -> BoxFuture<Result<http::Response<ProxyBody>, BoxError>> {
    Box::pin(async move {
        let (head, mut body) = response.into_parts();
        let mut read = VecDeque::new();
        if let Some(frame) = body.frame().await {
            read.push_back(Ok(frame?));
        }
        Ok(http::Response::from_parts(head, prepend(read, body)))
    })
}

/// A body was longer than the most the reader would hold.
#[derive(Debug, thiserror::Error)]
#[error("the body is longer than {0} bytes")]
pub(crate) struct BodyTooLarge(pub usize);

/// Reads a whole body of at most `limit` bytes (a longer one fails with
/// [`BodyTooLarge`]). A body of one data frame is returned without a copy.
pub(crate) fn collect_limited(
    mut body: ProxyBody,
    limit: usize,
) -> BoxFuture<Result<Bytes, BoxError>> {
    Box::pin(async move {
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut length = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                length += data.len();
                if length > limit {
                    return Err(Box::new(BodyTooLarge(limit)) as BoxError);
                }
                chunks.push(data);
            }
        }
        Ok(match chunks.len() {
            1 => chunks.pop().expect("one chunk"),
            _ => chunks.concat().into(),
        })
    })
}

/// A body whose first frames were already read: `read` is given again,
/// then the rest of `body`.
pub(crate) fn prepend(
    read: VecDeque<Result<Frame<Bytes>, BoxError>>,
    body: ProxyBody,
) -> ProxyBody {
    boxed(Prepended { read, rest: body })
}

struct Prepended {
    read: VecDeque<Result<Frame<Bytes>, BoxError>>,
    rest: ProxyBody,
}

impl Body for Prepended {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.read.pop_front() {
            return Poll::Ready(Some(frame));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .read
            .iter()
            .filter_map(|f| f.as_ref().ok()?.data_ref().map(|d| d.len() as u64))
            .sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + read);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + read);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::context::ConnectionInfo;

    #[tokio::test]
    async fn a_counted_body_adds_its_data_bytes_once() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"world"))),
            Ok(Frame::trailers(http::HeaderMap::new())),
        ];
        let tally = RequestContext::new(Arc::new(ConnectionInfo::for_test()));
        let body = counting_request_bytes(
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)),
            tally.clone(),
        );
        assert_eq!(tally.request_bytes(), 0);
        let read = body.collect().await.unwrap().to_bytes();
        assert_eq!(read, "hello world");
        assert_eq!(tally.request_bytes(), 11);
    }
}
