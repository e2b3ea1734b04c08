//! The injection webhook's `caBundle`: the API server checks the
//! webhook's certificate against it, and the certificate is signed by the
//! mesh's CA, so every webhook of the MutatingWebhookConfiguration
//! [`WEBHOOK_CONFIGURATION`] must carry the CA's root. The control plane
//! watches that one configuration (by name) and, at start and whenever it
//! changes (a `kubectl apply` that dropped the bundle, a new webhook),
//! patches the webhooks whose `clientConfig.caBundle` differs.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio_stream::StreamExt as _;

/// The name of the webhook configuration (`deploy/kubernetes`).
pub const WEBHOOK_CONFIGURATION: &str = "infermesh-sidecar-injector";

/// Keeps the `caBundle` of every webhook of [`WEBHOOK_CONFIGURATION`]
/// equal to `root_pem`, for as long as the control plane runs.
pub async fn keep_ca_bundle(client: kube::Client, root_pem: String) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let config =
        watcher::Config::default().fields(&format!("metadata.name={WEBHOOK_CONFIGURATION}"));
    let mut events = std::pin::pin!(watcher::watcher(api.clone(), config).default_backoff());
    let mut seen = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(configuration) | Event::InitApply(configuration)) => {
                seen = true;
                if let Some(patch) = patch(&configuration, root_pem.as_bytes()) {
                    let params = PatchParams::default();
                    match api
                        .patch(WEBHOOK_CONFIGURATION, &params, &Patch::Strategic(patch))
                        .await
                    {
                        Ok(_) => eprintln!(
                            "infermesh-control-plane: kubernetes: the caBundle of {WEBHOOK_CONFIGURATION} is now the CA's root"
                        ),
                        Err(e) => eprintln!(
                            "infermesh-control-plane: kubernetes: cannot write the caBundle of {WEBHOOK_CONFIGURATION}: {e}; the API server cannot call the webhook until it is written"
                        ),
                    }
                }
            }
            Ok(Event::InitDone) if !seen => eprintln!(
                "infermesh-control-plane: kubernetes: there is no MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION}; its caBundle is written when it is created"
            ),
            Ok(_) => {}
            Err(e) => eprintln!(
                "infermesh-control-plane: kubernetes: watch of {WEBHOOK_CONFIGURATION}: {e}; trying again"
            ),
        }
    }
}

/// The strategic merge patch that gives every webhook of `configuration`
/// the bundle `root_pem` (the webhooks are merged by name); `None` when
/// every webhook has it already.
pub fn patch(
    configuration: &MutatingWebhookConfiguration,
    root_pem: &[u8],
) -> Option<serde_json::Value> {
    use base64::Engine as _;
    let bundle = base64::engine::general_purpose::STANDARD.encode(root_pem);
    let webhooks: Vec<serde_json::Value> = configuration
        .webhooks
        .iter()
        .flatten()
        .filter(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(root_pem))
        .map(|w| json!({ "name": w.name, "clientConfig": { "caBundle": bundle } }))
        .collect();
    (!webhooks.is_empty()).then(|| json!({ "webhooks": webhooks }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_webhooks_without_the_root_are_patched() {
        let configuration: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": { "name": WEBHOOK_CONFIGURATION },
            "webhooks": [
                { "name": "namespace.sidecar-injector.infermesh.io", "clientConfig": { "caBundle": "cm9vdA==" },
                  "admissionReviewVersions": ["v1"], "sideEffects": "None" },
                { "name": "object.sidecar-injector.infermesh.io", "clientConfig": {},
                  "admissionReviewVersions": ["v1"], "sideEffects": "None" }
            ]
        }))
        .unwrap();
        assert_eq!(
            patch(&configuration, b"root"),
            Some(json!({ "webhooks": [
                { "name": "object.sidecar-injector.infermesh.io", "clientConfig": { "caBundle": "cm9vdA==" } }
            ] }))
        );
        assert_eq!(
            patch(&configuration, b"other").unwrap()["webhooks"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
