//! The TCP passthrough: a connection that is not HTTP (or goes outside
//! the mesh) is joined byte for byte to its destination.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Connects to `destination` and copies bytes both ways until either side
/// closes. Returns the bytes sent each way.
pub(crate) async fn tunnel(
    mut client: TcpStream,
    destination: SocketAddr,
    connect_timeout: Duration,
) -> io::Result<(u64, u64)> {
    let mut server = tokio::time::timeout(connect_timeout, TcpStream::connect(destination))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = server.set_nodelay(true);
    // A peer that vanished (no FIN, no RST) is found by keep-alive probes,
    // so a tunnel does not stay open forever.
    for socket in [&client, &server] {
        let _ = socket2::SockRef::from(socket).set_keepalive(true);
    }
    tokio::io::copy_bidirectional(&mut client, &mut server).await
}
