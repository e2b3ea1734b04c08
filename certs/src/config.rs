//! Building rustls server and client configurations for mutual TLS between
//! workloads, wired to a [`CertStore`] so certificate and bundle updates
//! apply to every new handshake.
//!
//! Both sides speak TLS 1.3 only unless TLS 1.2 is explicitly allowed, use
//! the `ring` provider, and have session resumption turned off: every
//! connection runs a full handshake, so each one is verified against the
//! store's *current* bundle and presents its *current* certificate (a resumed
//! session would carry an earlier verification over a rotation).

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::server::NoServerSessionStorage;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, ServerConfig, SupportedProtocolVersion};

use crate::peer::ExpectedIdentity;
use crate::resolve::StoreCertResolver;
use crate::store::CertStore;
use crate::verify::{SpiffeClientVerifier, SpiffeServerVerifier};

/// Settings for [`server_config`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerOptions {
    /// Which client IDs are accepted; `None` (the default) accepts any ID of
    /// the store's trust domain. Clients outside the trust domain are always
    /// refused.
    pub clients: Option<ExpectedIdentity>,
    /// Also accept TLS 1.2 (default: TLS 1.3 only).
    pub allow_tls12: bool,
    /// ALPN protocols to offer, most preferred first (default: none).
    pub alpn_protocols: Vec<Vec<u8>>,
    /// Also accept clients without a certificate (default: required); one
    /// that is presented is still verified.
    pub client_certificate_optional: bool,
}

/// Settings for [`client_config_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientOptions {
    /// Also offer TLS 1.2 (default: TLS 1.3 only).
    pub allow_tls12: bool,
    /// ALPN protocols to offer, most preferred first (default: none).
    pub alpn_protocols: Vec<Vec<u8>>,
}

/// A server configuration that presents the store's current certificate and
/// requires a client certificate, verified against the store's current trust
/// bundle and SPIFFE-checked (see [`ServerOptions::clients`]). Read the
/// client's identity after the handshake with [`crate::peer_identity`].
///
/// Fails only if the TLS versions cannot be enabled with the `ring` provider.
pub fn server_config(
    store: &Arc<CertStore>,
    options: &ServerOptions,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut verifier = SpiffeClientVerifier::new(store.clone(), options.clients.clone());
    if options.client_certificate_optional {
        verifier = verifier.optional();
    }
    let mut config = ServerConfig::builder_with_provider(store.provider().clone())
        .with_protocol_versions(versions(options.allow_tls12))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(StoreCertResolver::new(store.clone())));
    config.alpn_protocols = options.alpn_protocols.clone();
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client configuration (TLS 1.3 only) that presents the store's current
/// certificate and accepts only a server whose chain verifies against the
/// store's current bundle and whose SPIFFE ID matches `expected`.
///
/// The `ServerName` given when connecting is not checked (the SPIFFE check
/// replaces it); pass the peer's host name or any valid name, it is only sent
/// as SNI. A mismatch fails the handshake with an error naming the expected
/// and the presented IDs.
pub fn client_config(
    store: &Arc<CertStore>,
    expected: ExpectedIdentity,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    client_config_with(store, expected, &ClientOptions::default())
}

/// [`client_config`] with explicit [`ClientOptions`].
pub fn client_config_with(
    store: &Arc<CertStore>,
    expected: ExpectedIdentity,
    options: &ClientOptions,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let verifier = SpiffeServerVerifier::new(store.clone(), expected);
    let mut config = ClientConfig::builder_with_provider(store.provider().clone())
        .with_protocol_versions(versions(options.allow_tls12))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(StoreCertResolver::new(store.clone())));
    config.alpn_protocols = options.alpn_protocols.clone();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&TLS13];
static TLS13_AND_TLS12: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

fn versions(allow_tls12: bool) -> &'static [&'static SupportedProtocolVersion] {
    if allow_tls12 {
        TLS13_AND_TLS12
    } else {
        TLS13_ONLY
    }
}
