//! The load generator measures what it claims to: known latencies, known
//! stalls (visible only with the coordinated-omission correction), the
//! requested rate, error shares, streams, and every transport.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use infermesh_bench::load::{self, LoadOptions, LoadReport, Protocol, Template};
use infermesh_bench::mock::{
    ErrorRule, Fault, Latency, MockServer, ModelSpec, ServerSpec, TlsSpec,
};
use infermesh_bench::tls::ClientTls;
use tokio::time::Instant;

fn ms(v: u64) -> infermesh_api::Duration {
    infermesh_api::Duration::from_millis(v)
}

async fn mock(model: ModelSpec, tls: Option<TlsSpec>) -> SocketAddr {
    let spec = ServerSpec {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls,
        models: vec![model],
    };
    let server = MockServer::bind(&spec, 11).await.unwrap();
    let addr = server.local_addr();
    tokio::spawn(server.serve());
    addr
}

fn options(url: String, rate: Option<f64>, connections: usize, seconds: f64) -> LoadOptions {
    let mut o = LoadOptions::new(&url);
    o.rate = rate;
    o.connections = connections;
    o.duration = Duration::from_secs_f64(seconds);
    o.warmup = Duration::from_millis(300);
    o
}

fn secs(ms: f64) -> f64 {
    ms / 1e3
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fixed_latency_is_reported_within_tolerance() {
    let addr = mock(ModelSpec::simple("m", ms(20), ms(0), 1), None).await;
    let mut o = options(
        format!("http://{addr}{}", Template::OpenaiChat.path("m")),
        Some(100.0),
        8,
        2.0,
    );
    o.request = Template::OpenaiChat.request("m");
    let r = load::run(o).await.unwrap();
    assert_eq!(r.errors.total(), 0);
    // The server sleeps 20 ms: nothing can be faster; allow 12 ms above
    // for a loaded two-core machine.
    for (name, v) in [("p50", r.latency.p50), ("p90", r.latency.p90)] {
        assert!(
            (secs(20.0)..secs(32.0)).contains(&v),
            "{name} = {v}s\n{}",
            r.table()
        );
    }
    assert!(r.latency.min >= secs(20.0), "{}", r.table());
}

/// Answers at once, except between 1.0 s and 1.5 s after its first
/// request, when every request waits for the end of that stall.
async fn stalling_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first: Arc<OnceLock<Instant>> = Arc::default();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let first = first.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let first = first.clone();
                    async move {
                        let now = Instant::now();
                        let start = *first.get_or_init(|| now);
                        let (from, to) = (
                            start + Duration::from_millis(1000),
                            start + Duration::from_millis(1500),
                        );
                        if now >= from && now < to {
                            tokio::time::sleep_until(to).await;
                        }
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stall_shows_in_corrected_latency_and_hides_without_the_correction() {
    let addr = stalling_server().await;
    let mut o = options(format!("http://{addr}/"), Some(200.0), 4, 3.0);
    o.warmup = Duration::ZERO;
    let r = load::run(o).await.unwrap();
    assert_eq!(r.errors.total(), 0);
    // About 100 of the 600 requests were due during the 500 ms stall and
    // waited for its end: the top sixth of corrected latencies spans
    // 0-500 ms, so p90 is well above 100 ms and the maximum near 500 ms.
    assert!(
        r.latency.p90 > secs(100.0),
        "corrected p90 {}\n{}",
        r.latency.p90,
        r.table()
    );
    assert!(
        r.latency.max > secs(400.0),
        "corrected max {}\n{}",
        r.latency.max,
        r.table()
    );
    // Measured from when requests actually went out, only the 4 in flight
    // when the stall began look slow: the stall all but vanishes.
    assert!(
        r.service_time.p90 < secs(50.0),
        "service p90 {}\n{}",
        r.service_time.p90,
        r.table()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_requested_rate_is_achieved() {
    let addr = mock(ModelSpec::simple("m", ms(2), ms(0), 1), None).await;
    let r = load::run(options(
        format!("http://{addr}/v1/models"),
        Some(300.0),
        8,
        2.0,
    ))
    .await
    .unwrap();
    assert!(
        (r.achieved_rate - 300.0).abs() < 300.0 * 0.03,
        "achieved {}\n{}",
        r.achieved_rate,
        r.table()
    );
    assert!((585..=615).contains(&r.requests), "{} requests", r.requests);
    assert!(!r.behind_schedule);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ten_percent_error_mock_reports_ten_percent_errors() {
    let mut model = ModelSpec::simple("m", ms(1), ms(0), 1);
    model.errors = vec![ErrorRule {
        percent: 10.0,
        fault: Fault::Status(503),
    }];
    let addr = mock(model, None).await;
    let mut o = options(
        format!("http://{addr}{}", Template::KserveV2.path("m")),
        Some(500.0),
        8,
        2.0,
    );
    o.request = Template::KserveV2.request("m");
    let r = load::run(o).await.unwrap();
    // 1000 draws with p = 0.1: standard deviation 0.95 points; allow three.
    assert!(
        (0.07..=0.13).contains(&r.error_rate),
        "error rate {}\n{}",
        r.error_rate,
        r.table()
    );
    assert_eq!(r.errors.status_5xx, r.errors.total());
    assert_eq!(r.ok + r.errors.total(), r.requests);
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_report_time_to_first_event_and_gaps() {
    let mut model = ModelSpec::simple("m", ms(0), ms(10), 5);
    model.time_to_first_token = Some(Latency::Fixed(ms(50)));
    let addr = mock(model, None).await;
    let mut o = options(
        format!("http://{addr}{}", Template::OpenaiChatStream.path("m")),
        Some(20.0),
        8,
        2.0,
    );
    o.request = Template::OpenaiChatStream.request("m");
    let r = load::run(o).await.unwrap();
    let s = r.stream.clone().expect("stream figures");
    // 5 tokens, a finish chunk and [DONE]: 7 events per stream.
    assert_eq!(s.events, 7 * s.streams, "{}", r.table());
    assert!(
        (secs(50.0)..secs(70.0)).contains(&s.time_to_first_event.p50),
        "{}",
        r.table()
    );
    assert!(
        (secs(9.0)..secs(16.0)).contains(&s.inter_event_gap.p50),
        "{}",
        r.table()
    );
    // The whole stream: 50 ms to the first event, then 6 gaps of 10 ms.
    assert!(
        (secs(110.0)..secs(140.0)).contains(&r.latency.p50),
        "{}",
        r.table()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_loop_and_http2_share_connections() {
    let addr = mock(ModelSpec::simple("m", ms(5), ms(0), 1), None).await;
    let mut o = options(format!("http://{addr}/v1/models"), None, 2, 1.0);
    o.protocol = Protocol::Http2;
    o.concurrency = Some(20);
    let r = load::run(o).await.unwrap();
    assert_eq!(r.errors.total(), 0, "{}", r.table());
    assert_eq!((r.connections, r.concurrency), (2, 20));
    // 20 in flight over 2 connections, 5 ms each: about 4000 req/s; far
    // more than 2 connections could carry one at a time (400 req/s).
    assert!(r.achieved_rate > 1000.0, "{}", r.table());
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for `localhost`, and a client certificate.
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.pem());
        for (name, san) in [("server", "localhost"), ("client", "client.test")] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![san.to_owned()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn https_and_mutual_tls_over_both_http_versions() {
    let pki = Pki::new();
    let tls = TlsSpec {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.pem")),
    };
    let addr = mock(ModelSpec::simple("m", ms(1), ms(0), 1), Some(tls)).await;
    let url = format!("https://localhost:{}/v1/models", addr.port());
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let mut o = options(url.clone(), Some(100.0), 2, 0.5);
        o.protocol = protocol;
        o.tls = ClientTls {
            ca: Some(pki.path("ca.pem")),
            identity: Some((pki.path("client.pem"), pki.path("client.key"))),
            insecure: false,
        };
        let r: LoadReport = load::run(o).await.unwrap();
        assert_eq!(r.errors.total(), 0, "{protocol:?}\n{}", r.table());
        assert!(r.protocol.ends_with("over TLS"), "{}", r.protocol);
        assert!(r.ok > 40);
    }
    // Without a client certificate the server refuses every handshake.
    let mut o = options(url, Some(100.0), 2, 0.5);
    o.tls = ClientTls {
        ca: Some(pki.path("ca.pem")),
        identity: None,
        insecure: false,
    };
    let refused = load::run(o).await;
    assert!(refused.is_err() || refused.as_ref().unwrap().errors.total() > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_and_refused_connections_are_errors_by_kind() {
    let mut model = ModelSpec::simple("m", ms(0), ms(0), 1);
    model.errors = vec![ErrorRule {
        percent: 100.0,
        fault: Fault::Hang,
    }];
    let addr = mock(model, None).await;
    let mut o = options(
        format!("http://{addr}{}", Template::OpenaiChat.path("m")),
        Some(20.0),
        4,
        1.0,
    );
    o.request = Template::OpenaiChat.request("m");
    o.timeout = Duration::from_millis(200);
    let r = load::run(o).await.unwrap();
    assert!(
        r.errors.timeout > 0 && r.errors.timeout == r.errors.total(),
        "{}",
        r.table()
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let error = load::run(options(format!("http://{closed}/"), Some(10.0), 1, 0.5))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("cannot connect"), "{error}");
}
