//! Accepting TLS connections on one of the control plane's ports (the
//! gRPC port, the injection webhook's): each handshake runs in a task of
//! its own within [`HANDSHAKE_TIMEOUT`], so a slow or silent client holds
//! up no other, and one that fails is logged with the port's name.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` (the `port` of the log lines) for as
/// long as the control plane runs, and hands each to `connected` once its
/// handshake with `tls` is done.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    tls: TlsAcceptor,
    port: &'static str,
    connected: F,
) where
    F: Fn(TlsStream<TcpStream>, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("infermesh-control-plane: {port}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (tls, connected) = (tls.clone(), connected.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => connected(stream, client).await,
                Ok(Err(e)) => {
                    eprintln!(
                        "infermesh-control-plane: {port}: TLS handshake with {client} failed: {e}"
                    )
                }
                Err(_) => eprintln!(
                    "infermesh-control-plane: {port}: TLS handshake with {client} timed out"
                ),
            }
        });
    }
}
