//! The control plane on Kubernetes (`serve --kubernetes`): the API server
//! as the mesh's config source, as the judge of proxies' ServiceAccount
//! tokens, and as the home of the injection webhook's configuration.
//!
//! - [`translate`]: what the watched objects mean, as config documents;
//! - [`source`]: the watches, and the snapshots built of them;
//! - [`token_review`]: ServiceAccount tokens checked with TokenReviews;
//! - [`webhook_ca`]: the webhook configuration's `caBundle`, kept equal to
//!   the CA's root.
//!
//! The client is configured as kubectl's is: in a pod, from its
//! ServiceAccount; elsewhere from `KUBECONFIG` or `~/.kube/config`.

pub mod source;
pub mod token_review;
pub mod translate;
pub mod webhook_ca;

/// A client of the cluster's API server: the in-cluster config, else
/// `KUBECONFIG` (kube's `Config::infer`).
pub async fn client() -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    let config = kube::Config::infer().await.context(
        "cannot find the Kubernetes API server: not in a pod, and no KUBECONFIG (or ~/.kube/config)",
    )?;
    kube::Client::try_from(config).context("cannot make a client of the Kubernetes API server")
}
