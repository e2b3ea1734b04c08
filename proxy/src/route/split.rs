//! A rule's weighted split over its backends: each request (each attempt,
//! below the retry layer) goes to one backend, picked by weight.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use crate::backend::balance::Balance;
use crate::backend::pick::pick_weighted;
use crate::core::body::{BoxFuture, ProxyBody};
use crate::core::error::ProxyError;

/// Sends each request to one of several backends, picked by weight.
#[derive(Clone, Debug)]
pub(crate) struct Split {
    backends: Arc<[(Balance, u32)]>,
    total_weight: u64,
}

impl Split {
    /// Splits over `backends`, each with its weight.
    pub(crate) fn new(backends: Vec<(Balance, u32)>) -> Self {
        let total_weight = backends.iter().map(|(_, w)| u64::from(*w)).sum();
        Split {
            backends: backends.into(),
            total_weight,
        }
    }
}

impl Service<Request<ProxyBody>> for Split {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let (balance, _) = pick_weighted(&self.backends, self.total_weight, |(_, w)| *w)
            .expect("validation refuses rules whose backend weights are all 0");
        balance.clone().call(request)
    }
}
