//! The hot-swappable certificate store: the workload's current certificate
//! chain and private key, and the trust bundle of its trust domain, each an
//! immutable snapshot behind an `ArcSwap`.
//!
//! TLS configurations built from a store (see [`crate::server_config`] and
//! [`crate::client_config`]) read the current snapshots at the start of
//! every handshake, so an update applies to the next handshake; connections
//! already established keep the keys they negotiated and are not touched.
//! Nothing is swapped unless the new material passed every check: a failed
//! update or reload leaves the old material in place.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::inspect::{self, display_time};
use crate::peer::CertificateIdentityError;
use crate::pem_io;
use crate::spiffe::{SpiffeId, TrustDomain};

/// Why certificate material was refused. The store keeps what it had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}; check the path and its permissions")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Input is not valid PEM.
    #[error("{what} is not valid PEM ({detail}); expected `-----BEGIN ...-----` blocks")]
    Pem {
        /// Which input.
        what: String,
        /// The PEM parser's complaint.
        detail: String,
    },
    /// No certificate where a chain was expected.
    #[error(
        "{what} holds no certificate; it needs at least one `-----BEGIN CERTIFICATE-----` block, the leaf first"
    )]
    NoCertificate {
        /// Which input.
        what: String,
    },
    /// No private key where one was expected.
    #[error(
        "{what} holds no private key; it needs a `PRIVATE KEY` (PKCS#8), `EC PRIVATE KEY` or `RSA PRIVATE KEY` block"
    )]
    NoKey {
        /// Which input.
        what: String,
    },
    /// The leaf certificate cannot be parsed.
    #[error(
        "the certificate in {what} cannot be parsed ({detail}); it must be an X.509 certificate"
    )]
    BadCertificate {
        /// Which input.
        what: String,
        /// The parser's complaint.
        detail: String,
    },
    /// The leaf has no usable SPIFFE ID.
    #[error("the certificate in {what} has no usable SPIFFE ID: {source}")]
    NoIdentity {
        /// Which input.
        what: String,
        /// Why.
        source: CertificateIdentityError,
    },
    /// The leaf's SPIFFE ID is in another trust domain.
    #[error(
        "the certificate in {what} is for {identity}, outside this store's trust domain `{trust_domain}`; use a certificate issued by the `{trust_domain}` CA"
    )]
    WrongTrustDomain {
        /// Which input.
        what: String,
        /// The certificate's identity.
        identity: SpiffeId,
        /// The store's trust domain.
        trust_domain: TrustDomain,
    },
    /// The leaf has already expired.
    #[error(
        "the certificate in {what} expired at {not_after}; issue a new one (for example with `infermesh-control-plane ca issue`)"
    )]
    Expired {
        /// Which input.
        what: String,
        /// When it expired (RFC 3339).
        not_after: String,
    },
    /// The private key is not the certificate's key.
    #[error(
        "the private key ({key}) does not match the certificate ({cert}); use the key the certificate was issued for"
    )]
    KeyMismatch {
        /// Where the key came from.
        key: String,
        /// Where the certificate came from.
        cert: String,
    },
    /// The private key cannot be used.
    #[error(
        "the private key in {what} cannot be used ({detail}); use an unencrypted ECDSA P-256/P-384, Ed25519 or RSA key"
    )]
    BadKey {
        /// Which input.
        what: String,
        /// Why.
        detail: String,
    },
    /// The chain does not verify against the trust bundle.
    #[error(
        "the certificate in {what} is not trusted by {bundle} ({detail}); the bundle must hold the root of the CA that issued it and the chain must include any intermediate"
    )]
    Untrusted {
        /// Which input.
        what: String,
        /// Where the bundle came from.
        bundle: String,
        /// The verifier's complaint.
        detail: String,
    },
    /// The bundle has no roots.
    #[error("{what} holds no root certificate; a trust bundle needs at least one CA certificate")]
    EmptyBundle {
        /// Which input.
        what: String,
    },
    /// A root in the bundle is unusable.
    #[error(
        "root #{index} in {what} cannot be used as a trust anchor ({detail}); remove or replace it"
    )]
    BadRoot {
        /// Which input.
        what: String,
        /// 1-based position in the bundle.
        index: usize,
        /// Why.
        detail: String,
    },
}

/// What the store knows about its current certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The SPIFFE ID the certificate carries.
    pub identity: SpiffeId,
    /// Serial number, big-endian, without leading zero bytes.
    pub serial: Vec<u8>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The certificate snapshot: what handshakes present.
#[derive(Debug)]
pub(crate) struct CurrentCertificate {
    pub(crate) certified: Arc<CertifiedKey>,
    info: CertificateInfo,
}

/// The trust bundle snapshot: what handshakes verify peers against.
pub(crate) struct TrustBundle {
    roots_der: Vec<CertificateDer<'static>>,
    pub(crate) roots: Arc<RootCertStore>,
    /// rustls' WebPKI client-certificate verifier over `roots`.
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots_der.len())
            .finish()
    }
}

/// Where material came from, for error messages.
struct Origins<'a> {
    cert: &'a str,
    key: &'a str,
    bundle: &'a str,
}

/// For [`CertStore::update_certificate`]: new pair, current bundle.
const NEW_CERTIFICATE: Origins<'static> = Origins {
    cert: "the new chain",
    key: "the new key",
    bundle: "the current trust bundle",
};

/// For [`CertStore::new`] and [`CertStore::update_bundle`].
const NEW_BUNDLE: &str = "the new trust bundle";

/// The workload's current certificate and key plus its trust bundle (one or
/// more roots: during a root rotation both old and new are trusted), for one
/// trust domain. Share it as `Arc<CertStore>`.
pub struct CertStore {
    trust_domain: TrustDomain,
    provider: Arc<CryptoProvider>,
    certificate: ArcSwapOption<CurrentCertificate>,
    bundle: ArcSwap<TrustBundle>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("trust_domain", &self.trust_domain)
            .field("certificate", &self.certificate())
            .field("roots", &self.bundle.load().roots_der.len())
            .finish()
    }
}

impl CertStore {
    /// A store for `trust_domain` trusting `roots`, with no certificate yet:
    /// as a client it can verify servers but presents no certificate, as a
    /// server it fails handshakes until [`Self::update_certificate`].
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, StoreError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let bundle = build_bundle(roots, &provider, NEW_BUNDLE)?;
        Ok(Self {
            trust_domain,
            provider,
            certificate: ArcSwapOption::empty(),
            bundle: ArcSwap::from_pointee(bundle),
        })
    }

    /// Loads a store from PEM files: `cert` (the chain, leaf first), `key`
    /// (its private key) and `bundle` (the trusted roots). The trust domain
    /// is the leaf's. Errors name the file and what is wrong with it.
    pub fn load_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        bundle: impl AsRef<Path>,
    ) -> Result<Self, StoreError> {
        let files = FileSet::read(cert.as_ref(), key.as_ref(), bundle.as_ref())?;
        let origins = files.origins();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = parse_chain(&files.cert, origins.cert)?;
        let leaf = inspect::facts(&chain[0]).map_err(|detail| StoreError::BadCertificate {
            what: origins.cert.to_owned(),
            detail,
        })?;
        let trust_domain = match leaf.identity {
            Ok(id) => id.trust_domain().clone(),
            Err(source) => {
                return Err(StoreError::NoIdentity {
                    what: origins.cert.to_owned(),
                    source,
                });
            }
        };
        let roots = parse_bundle(&files.bundle, origins.bundle)?;
        let bundle = build_bundle(roots, &provider, origins.bundle)?;
        let key = parse_key(&files.key, origins.key)?;
        let current = prepare_certificate(&trust_domain, &provider, &bundle, chain, key, &origins)?;
        Ok(Self {
            trust_domain,
            provider,
            certificate: ArcSwapOption::from_pointee(current),
            bundle: ArcSwap::from_pointee(bundle),
        })
    }

    /// Re-reads the three files of [`Self::load_files`] and swaps in both the
    /// bundle and the certificate, or nothing if any check fails (the error
    /// names the file). The leaf must stay in this store's trust domain.
    pub fn reload_files(
        &self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        bundle: impl AsRef<Path>,
    ) -> Result<(), StoreError> {
        let files = FileSet::read(cert.as_ref(), key.as_ref(), bundle.as_ref())?;
        let origins = files.origins();
        let chain = parse_chain(&files.cert, origins.cert)?;
        let roots = parse_bundle(&files.bundle, origins.bundle)?;
        let bundle = build_bundle(roots, &self.provider, origins.bundle)?;
        let key = parse_key(&files.key, origins.key)?;
        let current = prepare_certificate(
            &self.trust_domain,
            &self.provider,
            &bundle,
            chain,
            key,
            &origins,
        )?;
        // Bundle first: during a root rotation the new bundle trusts both the
        // old and the new certificate.
        self.bundle.store(Arc::new(bundle));
        self.certificate.store(Some(Arc::new(current)));
        Ok(())
    }

    /// Replaces the certificate chain (leaf first, then intermediates) and
    /// its private key. Refused, keeping the old pair, if the chain is empty
    /// or unparsable, the leaf has no SPIFFE ID of this trust domain, has
    /// expired, does not match the key, or does not verify against the
    /// current trust bundle (update the bundle first when rotating roots).
    pub fn update_certificate(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), StoreError> {
        if chain.is_empty() {
            return Err(StoreError::NoCertificate {
                what: NEW_CERTIFICATE.cert.to_owned(),
            });
        }
        let bundle = self.bundle.load();
        let current = prepare_certificate(
            &self.trust_domain,
            &self.provider,
            &bundle,
            chain,
            key,
            &NEW_CERTIFICATE,
        )?;
        self.certificate.store(Some(Arc::new(current)));
        Ok(())
    }

    /// Replaces the trusted roots. Refused, keeping the old bundle, if it is
    /// empty or a root is not a usable CA certificate. The current
    /// certificate is not re-checked: a bundle that no longer trusts it only
    /// makes peers that use the same bundle refuse it.
    pub fn update_bundle(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), StoreError> {
        let bundle = build_bundle(roots, &self.provider, NEW_BUNDLE)?;
        self.bundle.store(Arc::new(bundle));
        Ok(())
    }

    /// The trust domain of this store.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The current certificate's identity, serial and validity, if any.
    pub fn certificate(&self) -> Option<CertificateInfo> {
        self.certificate
            .load()
            .as_ref()
            .map(|current| current.info.clone())
    }

    /// The current certificate's `not_after` as Unix seconds (for an expiry
    /// metric), if there is a certificate.
    pub fn not_after_unix(&self) -> Option<i64> {
        self.certificate
            .load()
            .as_ref()
            .map(|current| inspect::system_to_unix(current.info.not_after))
    }

    /// The current trusted roots (DER).
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.bundle.load().roots_der.clone()
    }

    pub(crate) fn current_certified(&self) -> Option<Arc<CertifiedKey>> {
        self.certificate
            .load()
            .as_ref()
            .map(|current| current.certified.clone())
    }

    pub(crate) fn current_bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    pub(crate) fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }
}

/// The raw contents of the three files, with their display names.
struct FileSet {
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
    names: [String; 3],
}

impl FileSet {
    fn read(cert: &Path, key: &Path, bundle: &Path) -> Result<Self, StoreError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| StoreError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        Ok(Self {
            cert: read(cert)?,
            key: read(key)?,
            bundle: read(bundle)?,
            names: [cert, key, bundle].map(|p| p.display().to_string()),
        })
    }

    fn origins(&self) -> Origins<'_> {
        Origins {
            cert: &self.names[0],
            key: &self.names[1],
            bundle: &self.names[2],
        }
    }
}

fn parse_chain(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let chain = pem_io::certificates(pem).map_err(|detail| StoreError::Pem {
        what: what.to_owned(),
        detail,
    })?;
    if chain.is_empty() {
        return Err(StoreError::NoCertificate {
            what: what.to_owned(),
        });
    }
    Ok(chain)
}

fn parse_bundle(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    pem_io::certificates(pem).map_err(|detail| StoreError::Pem {
        what: what.to_owned(),
        detail,
    })
}

fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, StoreError> {
    pem_io::private_key(pem)
        .map_err(|detail| StoreError::Pem {
            what: what.to_owned(),
            detail,
        })?
        .ok_or_else(|| StoreError::NoKey {
            what: what.to_owned(),
        })
}

fn build_bundle(
    roots: Vec<CertificateDer<'static>>,
    provider: &Arc<CryptoProvider>,
    what: &str,
) -> Result<TrustBundle, StoreError> {
    if roots.is_empty() {
        return Err(StoreError::EmptyBundle {
            what: what.to_owned(),
        });
    }
    let mut store = RootCertStore::empty();
    for (i, root) in roots.iter().enumerate() {
        let bad_root = |detail: String| StoreError::BadRoot {
            what: what.to_owned(),
            index: i + 1,
            detail,
        };
        let facts = inspect::facts(root).map_err(bad_root)?;
        if !facts.is_ca {
            return Err(bad_root(
                "it is not a CA certificate; was a workload certificate passed as the bundle?"
                    .to_owned(),
            ));
        }
        store
            .add(root.clone())
            .map_err(|e| bad_root(e.to_string()))?;
    }
    let roots_store = Arc::new(store);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots_store.clone(), provider.clone())
            .build()
            .map_err(|e| StoreError::BadRoot {
                what: what.to_owned(),
                index: 1,
                detail: e.to_string(),
            })?;
    Ok(TrustBundle {
        roots_der: roots,
        roots: roots_store,
        client_verifier,
    })
}

/// Runs every check on a chain + key against `bundle` and builds the snapshot.
fn prepare_certificate(
    trust_domain: &TrustDomain,
    provider: &CryptoProvider,
    bundle: &TrustBundle,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    origins: &Origins<'_>,
) -> Result<CurrentCertificate, StoreError> {
    let what = || origins.cert.to_owned();
    let leaf = inspect::facts(&chain[0]).map_err(|detail| StoreError::BadCertificate {
        what: what(),
        detail,
    })?;
    let identity = leaf.identity.map_err(|source| StoreError::NoIdentity {
        what: what(),
        source,
    })?;
    if !identity.is_member_of(trust_domain) {
        return Err(StoreError::WrongTrustDomain {
            what: what(),
            identity,
            trust_domain: trust_domain.clone(),
        });
    }
    let now = SystemTime::now();
    if leaf.not_after <= now {
        return Err(StoreError::Expired {
            what: what(),
            not_after: display_time(leaf.not_after),
        });
    }
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => StoreError::KeyMismatch {
            key: origins.key.to_owned(),
            cert: what(),
        },
        other => StoreError::BadKey {
            what: origins.key.to_owned(),
            detail: other.to_string(),
        },
    })?;
    bundle
        .client_verifier
        .verify_client_cert(&certified.cert[0], &certified.cert[1..], UnixTime::now())
        .map_err(|e| StoreError::Untrusted {
            what: what(),
            bundle: origins.bundle.to_owned(),
            detail: e.to_string(),
        })?;
    Ok(CurrentCertificate {
        certified: Arc::new(certified),
        info: CertificateInfo {
            identity,
            serial: leaf.serial,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        },
    })
}
