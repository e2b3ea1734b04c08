//! Sidecar mode: the proxy injected beside a model server in its pod. It
//! runs the same machinery as a gateway, plus two capture listeners that
//! take the pod's traffic as iptables redirects it (`infermesh-proxy
//! init`): `inbound` on 15006 (mutual TLS from other sidecars, permissive
//! by default as Istio's is; authorization; forwarded in plaintext to the
//! app at its original destination) and `outbound` on 15001 (the app's own
//! calls, routed, with mutual TLS originated per backend; destinations
//! outside the mesh passed through). The config file may redefine either
//! listener by name to change its address or modes.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;

/// Logs the user the sidecar runs as: `infermesh-proxy init` must exempt
/// it (`--proxy-uid`, default 1337), or the sidecar's own connections are
/// redirected back to it, round and round.
pub fn log_user() {
    // /proc/self belongs to the process's effective user and group.
    match std::fs::metadata("/proc/self") {
        Ok(me) => tracing::info!(
            uid = me.uid(),
            gid = me.gid(),
            "sidecar user: `infermesh-proxy init --proxy-uid` must name this uid (or --proxy-gid this gid), or the sidecar's own connections loop back to it"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot tell which user the sidecar runs as"),
    }
}

/// Where a sidecar's capture listeners bind, unless its config defines
/// listeners of the same names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureAddresses {
    /// `inbound`: where iptables sends the pod's incoming connections.
    pub inbound: SocketAddr,
    /// `outbound`: where iptables sends the app's own calls.
    pub outbound: SocketAddr,
}

impl Default for CaptureAddresses {
    /// The ports `infermesh-proxy init` redirects to: 15006 and 15001.
    fn default() -> Self {
        CaptureAddresses {
            inbound: SocketAddr::from(([0, 0, 0, 0], 15006)),
            outbound: SocketAddr::from(([127, 0, 0, 1], 15001)),
        }
    }
}

/// How errors name the built-in documents.
pub const BUILT_IN_NAME: &str = "<sidecar built-in listeners>";

impl CaptureAddresses {
    /// The built-in documents of the two capture listeners: `inbound`
    /// (mutual TLS permissive, as Istio's is) and `outbound`.
    pub fn built_in_documents(&self) -> String {
        format!(
            "apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: inbound }}
spec:
  address: \"{}\"
  capture: inbound
  tls: {{ mode: permissive }}
---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: outbound }}
spec:
  address: \"{}\"
  capture: outbound
",
            self.inbound, self.outbound
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_api::{Capture, Config, OutsideMesh, Source, TlsMode};

    fn load(file: &str) -> Config {
        let built_in = CaptureAddresses::default().built_in_documents();
        Config::load_with_defaults(
            &[Source {
                name: "sidecar.yaml",
                text: file,
            }],
            &[Source {
                name: BUILT_IN_NAME,
                text: &built_in,
            }],
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_sidecar_has_both_capture_listeners_by_default() {
        let config = load(
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: { name: m }\nspec: {}\n",
        );
        let inbound = config.listener("inbound").unwrap();
        assert_eq!(inbound.spec.address, "0.0.0.0:15006".parse().unwrap());
        assert_eq!(inbound.spec.capture, Some(Capture::Inbound));
        assert_eq!(inbound.spec.tls.as_ref().unwrap().mode, TlsMode::Permissive);
        let outbound = config.listener("outbound").unwrap();
        assert_eq!(outbound.spec.address, "127.0.0.1:15001".parse().unwrap());
        assert!(outbound.spec.is_outbound_capture());
        assert_eq!(
            outbound.spec.outside_mesh.unwrap_or_default(),
            OutsideMesh::Passthrough
        );
    }

    #[test]
    fn the_file_replaces_a_built_in_listener_and_policies_may_name_it() {
        let config = load(
            "apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: { name: outbound }
spec: { address: 127.0.0.1:25001, capture: outbound, outsideMesh: blocked }
---
apiVersion: infermesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: mesh-only }
spec:
  listeners: [inbound]
  rules: [{ from: [{ identityPrefixes: [spiffe://cluster.local/] }] }]
",
        );
        assert_eq!(config.listeners.len(), 2);
        let outbound = config.listener("outbound").unwrap();
        assert_eq!(outbound.spec.address.port(), 25001);
        assert_eq!(outbound.spec.outside_mesh, Some(OutsideMesh::Blocked));
        assert_eq!(
            config.listener("inbound").unwrap().spec.address.port(),
            15006
        );
    }
}
