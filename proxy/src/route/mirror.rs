//! Mirroring: a share of a rule's requests is copied to a shadow backend,
//! fire and forget. The copy's body is teed from the client's frame by
//! frame through a small bounded channel; if the shadow cannot keep up, the
//! copy is abandoned, never the client's request slowed. The shadow's
//! answer is read and dropped in a task of its own.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::HOST;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus::IntCounter;
use rand::RngExt;
use tokio::sync::mpsc;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::core::body::{BoxError, BoxFuture, ProxyBody, boxed, empty};
use crate::core::context::RequestContext;
use crate::core::error::{ProxyError, find_source};
use crate::route::metrics::Metrics;

/// Frames of a request body that may wait for the shadow at once.
const COPY_FRAMES: usize = 32;

type ShadowService = BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, ProxyError>;

/// Where copies go, and how many.
#[derive(Clone)]
pub(crate) struct MirrorLayer(Arc<Shadow>);

struct Shadow {
    service: ShadowService,
    percent: u32,
    completed: IntCounter,
    failed: IntCounter,
    abandoned: IntCounter,
}

impl std::fmt::Debug for MirrorLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorLayer")
            .field("percent", &self.0.percent)
            .finish_non_exhaustive()
    }
}

impl MirrorLayer {
    /// Copies `percent` of requests to `service`, the shadow backend's
    /// stack, named `backend` in metrics.
    pub(crate) fn new(
        service: ShadowService,
        backend: &str,
        percent: u32,
        metrics: &Metrics,
    ) -> Self {
        let counter = |result| {
            metrics
                .mirrored_requests
                .with_label_values(&[backend, result])
        };
        MirrorLayer(Arc::new(Shadow {
            service,
            percent,
            completed: counter("completed"),
            failed: counter("failed"),
            abandoned: counter("abandoned"),
        }))
    }
}

impl<S> Layer<S> for MirrorLayer {
    type Service = Mirror<S>;
    fn layer(&self, inner: S) -> Mirror<S> {
        Mirror {
            inner,
            shadow: self.0.clone(),
        }
    }
}

/// See [`MirrorLayer`].
#[derive(Clone)]
pub(crate) struct Mirror<S> {
    inner: S,
    shadow: Arc<Shadow>,
}

impl<S> Service<Request<ProxyBody>> for Mirror<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let copied = rand::rng().random_range(0..100) < self.shadow.percent;
        if !copied {
            return Box::pin(self.inner.call(request));
        }
        let (parts, body) = request.into_parts();
        let mut copy = Request::new(empty());
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.version_mut() = parts.version;
        *copy.headers_mut() = parts.headers.clone();
        *copy.extensions_mut() = parts.extensions.clone();
        // The mirror's attempt is not the request's: the access log names
        // the backend the client waited on.
        if let Some(context) = copy.extensions_mut().remove::<RequestContext>() {
            copy.extensions_mut().insert(context.for_mirror());
        }
        mark_as_shadow(&mut copy);
        let body = if body.is_end_stream() {
            body
        } else {
            let (tx, rx) = mpsc::channel(COPY_FRAMES);
            *copy.body_mut() = boxed(CopyBody {
                rx,
                size: body.size_hint(),
                ended: false,
            });
            boxed(Tee {
                inner: body,
                tx: Some(tx),
            })
        };
        let shadow = self.shadow.clone();
        let sent: BoxFuture<_> = Box::pin(shadow.service.clone().oneshot(copy));
        tokio::spawn(async move {
            match sent.await {
                Ok(response) => {
                    // Read and drop the answer frame by frame: a shadow's
                    // long generation is never held in memory.
                    let mut body = response.into_body();
                    let ended = loop {
                        match body.frame().await {
                            None => break true,
                            Some(Ok(_)) => {}
                            Some(Err(_)) => break false,
                        }
                    };
                    if ended {
                        shadow.completed.inc()
                    } else {
                        shadow.failed.inc()
                    }
                }
                Err(e) if find_source::<Abandoned>(&e).is_some() => shadow.abandoned.inc(),
                Err(e) => {
                    tracing::debug!(error = %e, "mirrored request failed");
                    shadow.failed.inc();
                }
            }
        });
        Box::pin(self.inner.call(Request::from_parts(parts, body)))
    }
}

/// Gives the copy's host a `-shadow` suffix (`models.example.com:8080`
/// becomes `models.example.com-shadow:8080`), in the URI's authority when
/// it has one and in `Host`.
fn mark_as_shadow<B>(request: &mut Request<B>) {
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let Some(authority) = authority else { return };
    // An IPv6 literal is left alone: with the suffix it would not parse.
    let shadowed = match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    };
    let Ok(new_authority) = Authority::try_from(shadowed.as_str()) else {
        return;
    };
    if request.uri().authority().is_some() {
        let mut parts = request.uri().clone().into_parts();
        parts.authority = Some(new_authority);
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    if let Ok(host) = HeaderValue::from_str(&shadowed) {
        request.headers_mut().insert(HOST, host);
    }
}

/// One step of the copied body.
enum Copied {
    Frame(Frame<Bytes>),
    End,
}

/// The client's request body, passing a copy of each frame to the shadow.
struct Tee {
    inner: ProxyBody,
    tx: Option<mpsc::Sender<Copied>>,
}

impl Tee {
    fn send(&mut self, item: Copied) {
        let Some(tx) = &self.tx else { return };
        // Only the end may take the last free slot, so the end always fits
        // after the last frame.
        let room = if matches!(item, Copied::End) { 1 } else { 2 };
        if tx.capacity() < room || tx.try_send(item).is_err() {
            // The shadow fell behind or is gone: abandon the copy.
            self.tx = None;
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let copy = if let Some(data) = frame.data_ref() {
                    Frame::data(data.clone())
                } else if let Some(trailers) = frame.trailers_ref() {
                    Frame::trailers(trailers.clone())
                } else {
                    return polled;
                };
                self.send(Copied::Frame(copy));
                if self.inner.is_end_stream() {
                    self.send(Copied::End);
                    self.tx = None;
                }
            }
            Poll::Ready(None) => {
                self.send(Copied::End);
                self.tx = None;
            }
            Poll::Ready(Some(Err(_))) => self.tx = None,
            Poll::Pending => {}
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

/// The copy could not follow the client's request body.
#[derive(Debug, thiserror::Error)]
#[error("the mirrored copy fell behind the request body and was abandoned")]
struct Abandoned;

/// The shadow's copy of the request body.
struct CopyBody {
    rx: mpsc::Receiver<Copied>,
    size: SizeHint,
    ended: bool,
}

impl Body for CopyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Copied::Frame(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Copied::End)) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Err(Box::new(Abandoned))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of_copy(uri: &str, host: Option<&str>) -> (String, Option<String>) {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        let mut request = builder.body(()).unwrap();
        mark_as_shadow(&mut request);
        (
            request.uri().to_string(),
            request
                .headers()
                .get(HOST)
                .map(|h| h.to_str().unwrap().to_owned()),
        )
    }

    /// A client body of `frames` one-byte frames, teed into a channel of
    /// `capacity`; the client side is read to its end first.
    async fn tee(frames: usize, capacity: usize) -> Vec<Result<Bytes, String>> {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = (0..frames)
            .map(|_| Ok(Frame::data(Bytes::from_static(b"x"))))
            .collect();
        let source = boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            chunks,
        )));
        let (tx, rx) = mpsc::channel(capacity);
        let mut client = Tee {
            inner: source,
            tx: Some(tx),
        };
        while client.frame().await.is_some() {}
        let mut copy = CopyBody {
            rx,
            size: SizeHint::default(),
            ended: false,
        };
        let mut seen = Vec::new();
        while let Some(frame) = copy.frame().await {
            seen.push(
                frame
                    .map(|f| f.into_data().unwrap())
                    .map_err(|e| e.to_string()),
            );
        }
        seen
    }

    #[tokio::test]
    async fn the_copys_attempts_are_not_the_requests() {
        use crate::core::context::{ConnectionInfo, Upstream};
        use crate::core::error::ErrorKind;

        let metrics = Metrics::register(&crate::core::metrics::Registry::new());
        let (seen, mut copies) = mpsc::channel(1);
        let shadow =
            BoxCloneSyncService::new(tower::service_fn(move |copy: Request<ProxyBody>| {
                let seen = seen.clone();
                async move {
                    let _ = seen
                        .send(copy.extensions().get::<RequestContext>().cloned())
                        .await;
                    Err::<Response<ProxyBody>, _>(ProxyError::new(ErrorKind::NoEndpoint))
                }
            }));
        let primary =
            tower::service_fn(|_: Request<ProxyBody>| async { Ok(Response::new(empty())) });
        let mut service = MirrorLayer::new(shadow, "shadow", 100, &metrics).layer(primary);
        let context = RequestContext::new(Arc::new(ConnectionInfo::for_test()));
        let mut request = Request::new(empty());
        request.extensions_mut().insert(context.clone());
        service.call(request).await.unwrap();
        let copy = copies
            .recv()
            .await
            .unwrap()
            .expect("the copy knows its connection");
        assert!(Arc::ptr_eq(copy.connection(), context.connection()));
        // The shadow's balancer notes its attempt: the access log must
        // still name the backend the client waited on.
        copy.note_attempt(Upstream {
            backend: Arc::from("shadow"),
            endpoint: "127.0.0.1:9".parse().unwrap(),
            retries: 0,
        });
        assert!(context.last_attempt().is_none());
    }

    #[tokio::test]
    async fn the_copy_gets_every_frame_and_its_end_when_it_keeps_up() {
        let seen = tee(3, 4).await;
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(Result::is_ok), "{seen:?}");
    }

    #[tokio::test]
    async fn a_copy_that_falls_behind_is_abandoned_not_truncated() {
        let seen = tee(5, 3).await;
        let (last, frames) = seen.split_last().unwrap();
        assert!(frames.iter().all(Result::is_ok));
        assert_eq!(
            last.as_ref().unwrap_err(),
            "the mirrored copy fell behind the request body and was abandoned"
        );
    }

    #[test]
    fn the_copy_is_addressed_to_the_shadow_host() {
        assert_eq!(
            host_of_copy("/v1/chat", Some("models.example.com")),
            ("/v1/chat".into(), Some("models.example.com-shadow".into()))
        );
        assert_eq!(
            host_of_copy("/", Some("models:8080")),
            ("/".into(), Some("models-shadow:8080".into()))
        );
        assert_eq!(
            host_of_copy("http://models.example.com/v1", None),
            (
                "http://models.example.com-shadow/v1".into(),
                Some("models.example.com-shadow".into())
            )
        );
    }
}
