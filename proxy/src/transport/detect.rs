//! Telling protocols apart by a connection's first bytes, looked at and
//! left unread: whether a captured connection speaks HTTP (else it is
//! passed through as TCP) and how long to wait for a client that says
//! nothing, and whether a plaintext HTTP client speaks HTTP/2.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// How long a captured connection may stay silent before it is taken for a
/// protocol whose server speaks first (SMTP, MySQL...) and passed through
/// as TCP. (To a destination known to speak HTTP, clients get
/// [`MESH_DETECT_TIMEOUT`]: pools open connections ahead of requests.)
pub(crate) const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a connection to a backend's address may stay silent before it
/// is taken for another protocol than HTTP.
pub(crate) const MESH_DETECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Request methods whose request line marks a connection as HTTP/1 (or the
/// HTTP/2 preface, which starts with `PRI `).
const METHODS: [&[u8]; 10] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PRI",
];

/// The preface every HTTP/2 connection starts with; a plaintext client
/// speaking HTTP/2 with prior knowledge sends it first.
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether `start`, the first bytes of an HTTP connection, are the HTTP/2
/// preface: `Some(true)` or `Some(false)` once it can tell, `None` while
/// they are the preface's beginning.
pub(crate) fn starts_http2(start: &[u8]) -> Option<bool> {
    http2_told(start, 0)
}

/// [`starts_http2`] for bytes seen a piece at a time: `seen` are the
/// connection's bytes from offset `at`, every byte before them having
/// matched the preface.
pub(crate) fn http2_told(seen: &[u8], at: usize) -> Option<bool> {
    let end = (at + seen.len()).min(H2_PREFACE.len());
    if at >= end {
        // Past the whole preface (or nothing new): told, if anything.
        return (at >= H2_PREFACE.len()).then_some(true);
    }
    if seen[..end - at] != H2_PREFACE[at..end] {
        Some(false)
    } else if end == H2_PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

/// Whether `start`, the first bytes of a connection, begin an HTTP request:
/// `Some(true)` or `Some(false)` once it can tell, `None` while every byte
/// so far could still start one.
fn looks_like_http(start: &[u8]) -> Option<bool> {
    let mut undecided = false;
    for method in METHODS {
        let line = [method, b" "].concat();
        if start.starts_with(&line) {
            return Some(true);
        }
        undecided |= line.starts_with(start);
    }
    if undecided { None } else { Some(false) }
}

/// Whether the client on `stream` speaks HTTP, judged by its first bytes
/// (left unread). A client that sends nothing for `wait` is not taken for
/// HTTP.
pub(crate) async fn speaks_http(stream: &TcpStream, wait: Duration) -> io::Result<bool> {
    let decided = tokio::time::timeout(wait, peek_until::<8>(stream, looks_like_http));
    decided.await.unwrap_or(Ok(false))
}

/// Whether the HTTP client on `stream` speaks HTTP/2 (with prior
/// knowledge), by its first bytes, left unread. Waits for as long as the
/// client sends nothing or only the preface's beginning: the caller bounds
/// the wait. A client that closes first is taken for HTTP/1.
pub(crate) async fn speaks_http2(stream: &TcpStream) -> io::Result<bool> {
    peek_until::<{ H2_PREFACE.len() }>(stream, starts_http2).await
}

/// Looks at up to `N` first bytes of `stream`, left unread, until `decide`
/// can tell from them; `false` when the client closes first.
async fn peek_until<const N: usize>(
    stream: &TcpStream,
    decide: fn(&[u8]) -> Option<bool>,
) -> io::Result<bool> {
    let mut start = [0u8; N];
    loop {
        let read = stream.peek(&mut start).await?;
        if read == 0 {
            return Ok(false);
        }
        if let Some(decided) = decide(&start[..read]) {
            return Ok(decided);
        }
        // Split over segments: wait for the rest. (The socket stays
        // readable while bytes are unread, so poll slowly.)
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_http_and_other_protocols_are_not() {
        assert_eq!(looks_like_http(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(looks_like_http(b"POST /v1/chat"), Some(true));
        assert_eq!(looks_like_http(b"PRI * HTTP/2.0"), Some(true));
        // A TLS ClientHello, Redis, PostgreSQL's startup message.
        assert_eq!(looks_like_http(&[0x16, 0x03, 0x01]), Some(false));
        assert_eq!(looks_like_http(b"*1\r\n$4\r\nPING"), Some(false));
        assert_eq!(looks_like_http(&[0, 0, 0, 8, 4, 210]), Some(false));
        // Redis inline commands are upper case but are not methods.
        assert_eq!(looks_like_http(b"PING\r\n"), Some(false));
        assert_eq!(looks_like_http(b"GETX"), Some(false));
    }

    #[test]
    fn a_split_request_line_is_awaited() {
        assert_eq!(looks_like_http(b"G"), None);
        assert_eq!(looks_like_http(b"PO"), None);
        assert_eq!(looks_like_http(b"DELETE"), None);
        assert_eq!(looks_like_http(b"OPTIONS "), Some(true));
    }

    #[test]
    fn http2_is_told_by_its_whole_preface() {
        assert_eq!(starts_http2(b"GET / HTTP/1.1\r\n"), Some(false));
        assert_eq!(starts_http2(b"POST"), Some(false));
        assert_eq!(starts_http2(b"PRI * HTTP/1.1"), Some(false));
        assert_eq!(starts_http2(b"P"), None);
        assert_eq!(starts_http2(b"PRI * HTTP/2.0\r\n\r\nSM\r\n"), None);
        assert_eq!(starts_http2(H2_PREFACE), Some(true));
        assert_eq!(
            starts_http2(&[H2_PREFACE, b"\0\0\x12\x04"].concat()),
            Some(true)
        );
    }

    /// A client of `addr` that sends `first`, then `rest` 20 ms later.
    fn split_client(
        addr: std::net::SocketAddr,
        first: &'static [u8],
        rest: &'static [u8],
    ) -> tokio::task::JoinHandle<TcpStream> {
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(first).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(rest).await.unwrap();
            s
        })
    }

    #[test]
    fn http2_is_told_from_pieces_as_from_the_whole() {
        // The preface one piece at a time, as a connection's reads see it.
        assert_eq!(http2_told(&H2_PREFACE[..5], 0), None);
        assert_eq!(http2_told(&H2_PREFACE[5..20], 5), None);
        assert_eq!(http2_told(&H2_PREFACE[20..], 20), Some(true));
        assert_eq!(http2_told(b"\0\0\x12", 24), Some(true));
        // A request line leaves the preface in a later piece.
        assert_eq!(http2_told(b"PO", 0), Some(false));
        assert_eq!(http2_told(b"T /v1 HTTP/1.1", 3), Some(false));
        assert_eq!(http2_told(b"", 3), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_split_preface_is_awaited_and_left_unread() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = split_client(addr, &H2_PREFACE[..5], &H2_PREFACE[5..]);
        let (server, _) = listener.accept().await.unwrap();
        assert!(speaks_http2(&server).await.unwrap());
        let mut buf = [0u8; 24];
        server.peek(&mut buf).await.unwrap();
        assert_eq!(&buf, H2_PREFACE, "detection left the bytes unread");
        let _client = client.await.unwrap();

        let closed = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        drop(closed);
        assert!(
            !speaks_http2(&server).await.unwrap(),
            "a client that closes is not HTTP/2"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn detection_reads_nothing_and_gives_up_on_silence() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = split_client(addr, b"GE", b"T / HTTP/1.1\r\n\r\n");
        let (server, _) = listener.accept().await.unwrap();
        assert!(speaks_http(&server, Duration::from_secs(5)).await.unwrap());
        let mut buf = [0u8; 3];
        server.peek(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET", "detection left the bytes unread");
        let _client = client.await.unwrap();

        let silent = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert!(
            !speaks_http(&server, Duration::from_millis(50))
                .await
                .unwrap()
        );
        drop(silent);
    }
}
