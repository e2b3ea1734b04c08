//! Where the load goes and how to reach it: the URL, and connections over
//! HTTP/1.1 or HTTP/2, cleartext (h2c with prior knowledge) or TLS (ALPN),
//! with an optional client certificate for mutual TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri, Version, header};
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::request::RequestTemplate;
use crate::tls::{ClientTls, client_config};

/// HTTP versions the generator speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1: one request at a time per connection.
    Http1,
    /// HTTP/2: many streams per connection.
    Http2,
}

/// The parsed target URL.
#[derive(Clone, Debug)]
pub struct Target {
    /// `https` URLs use TLS.
    pub tls: bool,
    /// Host, as written in the URL (also the TLS server name).
    pub host: String,
    /// The address connected to (resolved once, at start).
    pub addr: SocketAddr,
    /// `host:port` for `Host` / `:authority`.
    pub authority: Authority,
    /// Path and query of every request.
    pub path: PathAndQuery,
}

impl Target {
    /// Parses `url` (`http://` or `https://`) and resolves its host.
    pub async fn resolve(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid URL {url:?}"))?;
        let tls = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => false,
            Some(s) if *s == Scheme::HTTPS => true,
            _ => anyhow::bail!("URL {url:?} must start with http:// or https://"),
        };
        let authority = uri
            .authority()
            .cloned()
            .with_context(|| format!("URL {url:?} has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = *infermesh_dns::system()
            .lookup(&host, port)
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .first()
            .with_context(|| format!("{host} resolves to no address"))?;
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Ok(Target {
            tls,
            host,
            addr,
            authority,
            path,
        })
    }

    /// The request to send, for `protocol`.
    pub fn request(&self, template: &RequestTemplate, protocol: Protocol) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(template.body.clone()));
        *request.method_mut() = template.method.clone();
        *request.headers_mut() = template.headers.clone();
        match protocol {
            Protocol::Http1 => {
                *request.uri_mut() = Uri::from(self.path.clone());
                let host = header::HeaderValue::from_str(self.authority.as_str())
                    .expect("an authority is a header value");
                request.headers_mut().insert(header::HOST, host);
            }
            Protocol::Http2 => {
                *request.version_mut() = Version::HTTP_2;
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(if self.tls {
                    Scheme::HTTPS
                } else {
                    Scheme::HTTP
                });
                parts.authority = Some(self.authority.clone());
                parts.path_and_query = Some(self.path.clone());
                *request.uri_mut() =
                    Uri::from_parts(parts).expect("scheme, authority and path make a URI");
            }
        }
        request
    }
}

/// One connection, ready to send requests.
pub enum Connection {
    /// HTTP/1.1: one request at a time.
    Http1(http1::SendRequest<Full<Bytes>>),
    /// HTTP/2: shared by many workers.
    Http2(http2::SendRequest<Full<Bytes>>),
}

/// Makes connections to the target.
#[derive(Clone)]
pub struct Connector {
    target: Arc<Target>,
    protocol: Protocol,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Connector {
    /// A connector for `target`; TLS settings apply to `https` targets.
    pub fn new(target: Arc<Target>, protocol: Protocol, tls: &ClientTls) -> anyhow::Result<Self> {
        let tls = if target.tls {
            let alpn: &[&[u8]] = match protocol {
                Protocol::Http1 => &[b"http/1.1"],
                Protocol::Http2 => &[b"h2"],
            };
            let config = client_config(tls, alpn)?;
            let name = ServerName::try_from(target.host.clone())
                .with_context(|| format!("{} is not a TLS server name", target.host))?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        Ok(Connector {
            target,
            protocol,
            tls,
        })
    }

    /// The target.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// The HTTP version spoken.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Opens one connection (TCP, TLS if asked, then the HTTP handshake).
    pub async fn connect(&self) -> Result<Connection, std::io::Error> {
        let stream = TcpStream::connect(self.target.addr).await?;
        stream.set_nodelay(true)?;
        match &self.tls {
            None => handshake(TokioIo::new(stream), self.protocol).await,
            Some((connector, name)) => {
                let stream = connector.connect(name.clone(), stream).await?;
                handshake(TokioIo::new(stream), self.protocol).await
            }
        }
    }
}

async fn handshake<T>(io: TokioIo<T>, protocol: Protocol) -> Result<Connection, std::io::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let failed = |e: hyper::Error| std::io::Error::other(e);
    match protocol {
        Protocol::Http1 => {
            let (sender, connection) = http1::handshake(io).await.map_err(failed)?;
            tokio::spawn(connection);
            Ok(Connection::Http1(sender))
        }
        Protocol::Http2 => {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .adaptive_window(true)
                .handshake(io)
                .await
                .map_err(failed)?;
            tokio::spawn(connection);
            Ok(Connection::Http2(sender))
        }
    }
}
