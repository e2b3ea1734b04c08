//! Protocol switches (`Connection: upgrade`, as WebSocket uses): the
//! request is forwarded with its `Upgrade` header, and when the backend
//! answers `101 Switching Protocols`, the client and backend connections
//! are joined into one byte tunnel that lasts until either side closes.

use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tower::{Layer, Service};

use crate::backend::pool::UpstreamConnection;
use crate::core::body::{BoxFuture, ProxyBody};
use crate::core::error::ProxyError;
use crate::core::headers::is_upgrade;

/// Tunnels upgraded connections; see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UpgradeLayer;

impl<S> Layer<S> for UpgradeLayer {
    type Service = Upgrades<S>;
    fn layer(&self, inner: S) -> Upgrades<S> {
        Upgrades { inner }
    }
}

/// See [`UpgradeLayer`].
#[derive(Clone, Debug)]
pub(crate) struct Upgrades<S> {
    inner: S,
}

impl<S> Service<Request<ProxyBody>> for Upgrades<S>
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

    fn call(&mut self, mut request: Request<ProxyBody>) -> Self::Future {
        if !is_upgrade(&request) {
            // Nearly every request: nothing to watch for.
            return Box::pin(self.inner.call(request));
        }
        let client_side = hyper::upgrade::on(&mut request);
        let response: BoxFuture<Result<Response<ProxyBody>, ProxyError>> =
            Box::pin(self.inner.call(request));
        Box::pin(async move {
            let mut response = response.await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                let backend_side = hyper::upgrade::on(&mut response);
                // The tunnel keeps the upstream connection counted.
                let held = response.extensions_mut().remove::<UpstreamConnection>();
                tokio::spawn(tunnel(client_side, backend_side, held));
            }
            Ok(response)
        })
    }
}

async fn tunnel(client: OnUpgrade, backend: OnUpgrade, _held: Option<UpstreamConnection>) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "protocol switch did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        Ok((up, down)) => tracing::debug!(
            bytes_to_backend = up,
            bytes_to_client = down,
            "tunnel closed"
        ),
        Err(e) => tracing::debug!(error = %e, "tunnel ended with an error"),
    }
}
