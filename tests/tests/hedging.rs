//! Hedged requests through the real proxy: a POST stuck on a slow
//! endpoint gets a second attempt, with the same body, on another endpoint
//! after the hedge delay, the fast answer is used, and the slow server sees
//! its request cancelled (an HTTP/2 stream reset).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use infermesh_tests::backend::{MockBackend, Protocol, full};
use infermesh_tests::client;
use infermesh_tests::process::{Gateway, config, listener, route_with};

/// Counts a request whose handler was dropped before it answered.
struct Cancelled(Arc<AtomicUsize>, bool);

impl Cancelled {
    fn answered(&mut self) {
        self.1 = true;
    }
}

impl Drop for Cancelled {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_request_is_hedged_to_another_endpoint_and_the_stalled_one_cancelled() {
    let cancelled = Arc::new(AtomicUsize::new(0));
    let seen = cancelled.clone();
    let stalled = MockBackend::start(
        Protocol::Http2,
        Arc::new(move |_| {
            let seen = seen.clone();
            Box::pin(async move {
                let mut guard = Cancelled(seen, false);
                tokio::time::sleep(Duration::from_secs(30)).await;
                guard.answered();
                http::Response::builder()
                    .header("x-backend", "stalled")
                    .body(full("late"))
                    .unwrap()
            })
        }),
    )
    .await;
    let fast = MockBackend::echo("fast", Protocol::Http2).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        // Round robin by weight picks the stalled endpoint twice in three:
        // a hedge reaches the fast one only by avoiding the endpoint its
        // first attempt is on.
        &format!(
            "kind: Backend\nmetadata: {{ name: model }}\nspec:\n  protocol: http2\n  loadBalancer: {{ policy: roundRobin }}\n  endpoints:\n    - {{ address: \"{}\", weight: 2 }}\n    - {{ address: \"{}\", weight: 1 }}",
            stalled.addr, fast.addr
        ),
        &route_with("model", "hedge: { delay: 50ms }\nretry: { maxRetries: 0 }"),
    ]));

    let http = client::http1();
    for _ in 0..6 {
        // A POST: the hedge is sent from the recorded body once it is whole.
        let request = http::Request::post(gateway.url("web", "/v1/chat/completions"))
            .body(bytes::Bytes::from_static(b"{\"prompt\":\"hi\"}").into())
            .unwrap();
        let reply = client::send(&http, request).await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-backend"), Some("fast"), "{reply:?}");
        assert_eq!(reply.json()["body"], "{\"prompt\":\"hi\"}");
    }
    // Every first attempt that went to the stalled endpoint was hedged, to
    // the other endpoint, the hedge won, and the stall was reset.
    let stalls = stalled.requests();
    assert!(stalls >= 1, "round robin sends first attempts to both");
    let metrics = client::metrics(gateway.health).await;
    let hedges = |outcome: &str| {
        client::metric_value(
            &metrics,
            &format!("infermesh_hedges_total{{outcome=\"{outcome}\",route=\"r\"}}"),
        )
    };
    assert_eq!(hedges("sent"), Some(stalls as f64), "{metrics}");
    assert_eq!(hedges("won"), Some(stalls as f64), "{metrics}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cancelled.load(Ordering::SeqCst) < stalls {
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled server saw {} of {stalls} requests cancelled",
            cancelled.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
