//! The original destination of a connection that iptables redirected to
//! a capture listener (`SO_ORIGINAL_DST`, read through `socket2`, the one
//! socket option the proxy needs that the standard library lacks).

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The address a redirected connection was sent to before iptables
/// redirected it, or `None` when it was not redirected (it was made to the
/// listener's own address, or the kernel keeps no NAT record of it).
pub(crate) fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let socket = socket2::SockRef::from(stream);
    // An IPv4 client of a dual-stack socket has a v4-mapped address, and
    // its NAT record is IPv4's.
    let ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let original = if ipv4 {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    let original = match original {
        Ok(address) => address.as_socket()?,
        Err(e) => {
            // ENOENT: no NAT record, the connection was not redirected.
            if e.raw_os_error() != Some(2) {
                tracing::warn!(error = %e, "cannot read a connection's original destination (SO_ORIGINAL_DST)");
            }
            return None;
        }
    };
    let unmapped = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    (unmapped(original) != unmapped(local)).then_some(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(original_destination(&server), None);
    }
}
