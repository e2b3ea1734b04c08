//! Which HTTP version a client connection speaks, and the hyper connection
//! that serves it: a listener's hyper settings ([`HttpSettings`]), the
//! version told by ALPN on TLS or by the HTTP/2 preface on plaintext
//! ([`ClientStream`]), and [`HttpConnection`], the future that tells the
//! version and then serves the connection with hyper's own HTTP/1 or
//! HTTP/2 server.
//!
//! Why not hyper-util's version-detecting builder: it reads a connection's
//! first bytes into a buffer of its own and replays them to hyper through
//! a wrapper that stays around every read and write of the connection, and
//! its HTTP/2 state sits inline in every connection's task. Looking at the
//! bytes without reading them leaves hyper's reads its own, and an HTTP/1
//! connection carries only HTTP/1's state.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use infermesh_api::ListenerProtocol;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::server::lifetime::ClientIo;
use crate::server::request::RequestService;
use crate::snapshot::ListenerEntry;
use crate::transport::detect::speaks_http2;

/// How much of one request body an HTTP/2 client may send ahead of the
/// backend reading it, and how much of one response waits for the client
/// to read it: Envoy's recommended edge setting.
const STREAM_WINDOW: u32 = 64 * 1024;

/// How much of all its request bodies one HTTP/2 client may send ahead.
const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// How long a client may take to answer a keep-alive PING.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A client connection's byte stream, which can tell the HTTP version its
/// client speaks.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether the client speaks HTTP/2, told without taking any of its
    /// bytes. Resolves once the client said enough; the connection's
    /// first-byte timeout bounds the wait.
    fn speaks_http2(&self) -> impl Future<Output = io::Result<bool>> + Send;
}

impl ClientStream for TcpStream {
    /// By the HTTP/2 preface a client with prior knowledge starts with.
    fn speaks_http2(&self) -> impl Future<Output = io::Result<bool>> + Send {
        speaks_http2(self)
    }
}

impl ClientStream for TlsStream<TcpStream> {
    /// By the protocol agreed in the handshake (ALPN): over TLS, HTTP/2 is
    /// spoken only when agreed (RFC 9113, section 3.2), HTTP/1.1 otherwise.
    fn speaks_http2(&self) -> impl Future<Output = io::Result<bool>> + Send {
        let http2 = self.get_ref().1.alpn_protocol() == Some(b"h2");
        std::future::ready(Ok(http2))
    }
}

/// The hyper server settings of a listener: its protocols and limits.
pub(crate) struct HttpSettings {
    protocol: ListenerProtocol,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl HttpSettings {
    /// The settings of `listener`. Flow-control windows and send buffers
    /// are sized so that one HTTP/2 stream holds tens of KiB, not MiB,
    /// whatever its client does.
    pub(crate) fn new(listener: &ListenerEntry) -> Self {
        let limits = &listener.limits;
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // The header block's limit holds however its bytes arrive
            // (the read buffer's bound alone is checked only while a head
            // is incomplete: one that arrived whole in one read passed).
            .max_header_size(limits.max_header_bytes as usize)
            .max_buf_size(limits.max_header_bytes.max(8192) as usize)
            // The connection's watchdog times request heads (the
            // listener's requestHeadersTimeout, see
            // `crate::server::lifetime`): hyper's own timer would be armed
            // and disarmed for every request.
            .header_read_timeout(None);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(limits.max_header_bytes)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buf_size(STREAM_WINDOW as usize);
        if let Some(interval) = limits.keep_alive_interval.non_zero() {
            http2
                .keep_alive_interval(interval)
                .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
        }
        HttpSettings {
            protocol: listener.protocol,
            http1,
            http2,
        }
    }

    /// Serves `io` with `service`: HTTP/1 (with upgrades) or HTTP/2, as
    /// the listener allows and the client speaks.
    pub(crate) fn serve<I: ClientStream>(
        self: &Arc<Self>,
        io: ClientIo<I>,
        service: RequestService,
    ) -> HttpConnection<I> {
        match self.protocol {
            ListenerProtocol::Http1 => self.http1(io, service),
            ListenerProtocol::Http2 => self.http2(io, service),
            ListenerProtocol::Http => HttpConnection::Telling {
                telling: Box::pin(async move {
                    let http2 = io.get_ref().speaks_http2().await;
                    (io, http2)
                }),
                service: Some(service),
                settings: self.clone(),
            },
        }
    }

    fn http1<I: ClientStream>(
        &self,
        io: ClientIo<I>,
        service: RequestService,
    ) -> HttpConnection<I> {
        io.serving_http1();
        let connection = self
            .http1
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        HttpConnection::Http1(connection)
    }

    fn http2<I: ClientStream>(
        &self,
        io: ClientIo<I>,
        service: RequestService,
    ) -> HttpConnection<I> {
        let connection = self.http2.serve_connection(TokioIo::new(io), service);
        HttpConnection::Http2(Box::new(connection))
    }
}

/// A future telling the version of a connection, handing its stream back.
type Telling<I> = Pin<Box<dyn Future<Output = (ClientIo<I>, io::Result<bool>)> + Send>>;

/// One client connection served over HTTP: resolves when it ends.
// HTTP/1 inline: the common case's state, held for the connection's life
// (boxed, it would cost an allocation and save nothing).
#[allow(clippy::large_enum_variant)]
pub(crate) enum HttpConnection<I: ClientStream> {
    /// Waiting for the client to say which version it speaks. (Boxed: it
    /// lives only until the first bytes arrive.)
    Telling {
        telling: Telling<I>,
        service: Option<RequestService>,
        settings: Arc<HttpSettings>,
    },
    /// Serving HTTP/1, where a request may upgrade the connection.
    Http1(http1::UpgradeableConnection<TokioIo<ClientIo<I>>, RequestService>),
    /// Serving HTTP/2. Boxed: its state is twice HTTP/1's, and held
    /// inline it would make every HTTP/1 connection's task as large.
    Http2(Box<http2::Connection<TokioIo<ClientIo<I>>, RequestService, TokioExecutor>>),
    /// Closed before its version was told.
    Closed,
}

impl<I: ClientStream> HttpConnection<I> {
    /// Starts closing the connection: HTTP/1 after the request in flight,
    /// HTTP/2 by GOAWAY, once its streams are answered. One that has not
    /// said its version yet closes at once.
    pub(crate) fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.get_mut();
        match this {
            HttpConnection::Telling { .. } => *this = HttpConnection::Closed,
            HttpConnection::Http1(connection) => Pin::new(connection).graceful_shutdown(),
            HttpConnection::Http2(connection) => Pin::new(&mut **connection).graceful_shutdown(),
            HttpConnection::Closed => {}
        }
    }
}

impl<I: ClientStream> Future for HttpConnection<I> {
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match this {
                HttpConnection::Telling {
                    telling,
                    service,
                    settings,
                } => {
                    let (io, told) = ready!(telling.as_mut().poll(cx));
                    let service = service.take().expect("taken once, as the version is told");
                    *this = match told {
                        Ok(true) => settings.http2(io, service),
                        // HTTP/1 also when the stream failed: hyper meets
                        // the error on its first read and ends.
                        Ok(false) | Err(_) => settings.http1(io, service),
                    };
                }
                HttpConnection::Http1(connection) => return Pin::new(connection).poll(cx),
                HttpConnection::Http2(connection) => return Pin::new(&mut **connection).poll(cx),
                HttpConnection::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}
