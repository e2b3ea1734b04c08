//! The certificate authority: creating a self-signed root (and optionally an
//! intermediate) for a trust domain, loading one from PEM, and signing
//! workload CSRs into short-lived SPIFFE leaf certificates.
//!
//! The identity in an issued certificate always comes from the caller (who
//! derived it from an authenticated credential); the CSR contributes only its
//! public key, after its signature has been checked. Subject, SANs and
//! extensions requested in the CSR are ignored.
//!
//! Leaf validity is `[now - clock_skew, now + ttl]`, clamped to the validity
//! of the CA chain, so a peer whose clock runs a little behind the CA's still
//! accepts a fresh certificate and no leaf outlives its issuers. The default
//! skew allowance is [`DEFAULT_CLOCK_SKEW`] (one minute): generous for
//! NTP-synchronised clusters (Linkerd and Vault backdate by 20–30 s), while
//! keeping the backdated window short.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::FromDer;

use crate::inspect::{self, display_time};
use crate::pem_io;
use crate::spiffe::{SpiffeId, TrustDomain};

/// Default validity of a CA created by [`CertificateAuthority::new_root`]: one year.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Default lifetime of a workload certificate: 24 hours.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Default backdating of `not_before`, allowing for clocks that run behind
/// the CA's: one minute.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why the CA could not be created, loaded, or could not sign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// Key generation or certificate encoding failed inside rcgen.
    #[error("cannot {action}: {source}; this is a bug or an unsupported key, please report it")]
    Crypto {
        /// What was being done.
        action: &'static str,
        /// The rcgen error.
        source: rcgen::Error,
    },
    /// Something that should not happen did.
    #[error("internal error: {0}; this is a bug, please report it")]
    Internal(String),
    /// A validity period that is zero or too long to represent.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidDuration {
        /// Which setting.
        what: &'static str,
        /// The rejected value.
        value: Duration,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The CA PEM input is unusable.
    #[error("cannot load the CA: {0}")]
    Load(String),
    /// The CSR is not a parseable PKCS#10 request.
    #[error("the CSR is malformed ({0}); send a PEM or DER PKCS#10 certificate request")]
    MalformedCsr(String),
    /// The CSR's self-signature does not verify.
    #[error(
        "the CSR's signature does not verify with its own public key; it was altered or signed with another key, generate a new CSR"
    )]
    CsrSignature,
    /// The CSR's key type is not one the CA signs for.
    #[error("the CSR's public key is not supported ({0}); use an ECDSA P-256 key")]
    UnsupportedKey(String),
    /// The identity to certify is in another trust domain.
    #[error(
        "cannot issue {identity}: this CA signs only for trust domain `{ca_trust_domain}`; use that trust domain's CA"
    )]
    TrustDomainMismatch {
        /// The requested identity.
        identity: SpiffeId,
        /// The CA's trust domain.
        ca_trust_domain: TrustDomain,
    },
    /// The identity is a bare trust domain (`spiffe://<td>`), which names the
    /// trust domain itself, not a workload.
    #[error(
        "cannot issue {0}: it names the trust domain itself; a workload identity has a path such as `/ns/<namespace>/sa/<service-account>`"
    )]
    NotAWorkload(SpiffeId),
    /// A DNS name given for a server certificate is not one.
    #[error(
        "`{0}` is not a DNS name for a certificate (lowercase letters, digits, `-` and `.`, like `svc.ns.svc`)"
    )]
    InvalidDnsName(String),
    /// The CA (or one of its issuers) is not valid at signing time.
    #[error(
        "the CA chain is not valid at {at} (it is valid from {not_before} until {not_after}); create or load a new CA"
    )]
    CaNotValid {
        /// The signing time.
        at: String,
        /// Start of the CA's validity.
        not_before: String,
        /// End of the CA chain's validity.
        not_after: String,
    },
}

/// Settings for creating a CA certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaOptions {
    /// How long the CA certificate is valid (clamped to the parent's expiry for
    /// an intermediate). Default [`DEFAULT_CA_VALIDITY`].
    pub validity: Duration,
    /// How far `not_before` is backdated, for the CA certificate itself and for
    /// every leaf it signs. Default [`DEFAULT_CLOCK_SKEW`].
    pub clock_skew: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            validity: DEFAULT_CA_VALIDITY,
            clock_skew: DEFAULT_CLOCK_SKEW,
        }
    }
}

/// A certificate just issued by [`CertificateAuthority::sign_csr`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    identity: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    chain_pem: String,
    serial: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl IssuedCertificate {
    /// The SPIFFE ID in the certificate's URI SAN.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The chain to present in TLS: the leaf first, then the intermediate CA
    /// certificates (if any). The root is not included; it belongs in the
    /// peers' trust bundle.
    pub fn chain_der(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf certificate (DER).
    pub fn leaf_der(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// [`Self::chain_der`] as consecutive PEM `CERTIFICATE` blocks.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// The leaf certificate as one PEM block.
    pub fn leaf_pem(&self) -> String {
        pem_io::encode("CERTIFICATE", &self.chain[0])
    }

    /// The leaf's serial number, big-endian, without leading zero bytes.
    pub fn serial(&self) -> &[u8] {
        &self.serial
    }

    /// Start of the leaf's validity (already backdated by the clock skew).
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// A CA for one trust domain: a signing key, its certificate, and the chain
/// up to its root.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// Certificates between this CA and the root (both excluded), nearest first.
    above: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
    not_before: SystemTime,
    /// The earliest expiry along the chain (this CA, intermediates, root).
    chain_not_after: SystemTime,
    clock_skew: Duration,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("is_root", &self.is_root())
            .field("not_before", &display_time(self.not_before))
            .field("not_after", &display_time(self.chain_not_after))
            .field("key", &"[elided]")
            .finish()
    }
}

impl CertificateAuthority {
    /// Creates a self-signed root CA for `trust_domain`, with a new ECDSA
    /// P-256 key: `CA:true, pathlen:1` (room for one intermediate),
    /// keyCertSign + cRLSign, URI SAN `spiffe://<trust-domain>`.
    pub fn new_root(trust_domain: &TrustDomain, options: &CaOptions) -> Result<Self, CaError> {
        Self::new_root_at(trust_domain, options, SystemTime::now())
    }

    /// [`Self::new_root`] as if the current time were `now` (for tests and
    /// for pre-dating a CA).
    pub fn new_root_at(
        trust_domain: &TrustDomain,
        options: &CaOptions,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let (not_before, not_after) = ca_validity(options, now, None)?;
        let key = generate_key()?;
        let params = ca_params(trust_domain, "root", not_before, not_after, 1)?;
        let cert = params.self_signed(&key).map_err(|source| CaError::Crypto {
            action: "self-sign the root CA certificate",
            source,
        })?;
        let der = cert.der().clone();
        Self::assemble(trust_domain.clone(), der.clone(), key, Vec::new(), der)
            .map(|ca| ca.with_clock_skew(options.clock_skew))
    }

    /// Creates an intermediate CA signed by this CA (`CA:true, pathlen:0`),
    /// valid for `options.validity` but never past this CA's expiry. Leaves
    /// it signs carry it in their chain.
    pub fn new_intermediate(&self, options: &CaOptions) -> Result<Self, CaError> {
        self.new_intermediate_at(options, SystemTime::now())
    }

    /// [`Self::new_intermediate`] as if the current time were `now`.
    pub fn new_intermediate_at(
        &self,
        options: &CaOptions,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        self.check_valid_at(now)?;
        let (not_before, not_after) = ca_validity(options, now, Some(self.chain_not_after))?;
        let key = generate_key()?;
        let mut params = ca_params(&self.trust_domain, "intermediate", not_before, not_after, 0)?;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CaError::Crypto {
                action: "sign the intermediate CA certificate",
                source,
            })?;
        let mut above = Vec::new();
        if !self.is_root() {
            above.push(self.cert.clone());
            above.extend(self.above.iter().cloned());
        }
        Self::assemble(
            self.trust_domain.clone(),
            cert.der().clone(),
            key,
            above,
            self.root.clone(),
        )
        .map(|ca| ca.with_clock_skew(options.clock_skew))
    }

    /// Loads a CA from PEM: `chain_pem` holds the CA's certificate first, then
    /// the certificates that issued it up to and including the self-signed
    /// root (for a root CA, just its certificate); `key_pem` holds the CA's
    /// PKCS#8 private key. The trust domain is read from the CA certificate's
    /// `spiffe://<trust-domain>` URI SAN.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let chain = pem_io::certificates(chain_pem.as_bytes())
            .map_err(|e| CaError::Load(format!("the CA certificate PEM is invalid: {e}")))?;
        let Some(cert) = chain.first().cloned() else {
            return Err(CaError::Load(
                "the CA certificate PEM holds no `CERTIFICATE` block".to_owned(),
            ));
        };
        let facts = inspect::facts(&cert)
            .map_err(|e| CaError::Load(format!("the CA certificate cannot be parsed: {e}")))?;
        if !facts.is_ca || !facts.can_sign_certs {
            return Err(CaError::Load(
                "the first certificate is not a CA certificate (it needs basicConstraints CA:true and keyCertSign); put the CA's own certificate first".to_owned(),
            ));
        }
        let trust_domain = match facts.identity {
            Ok(id) if id.path().is_empty() => id.trust_domain().clone(),
            Ok(id) => {
                return Err(CaError::Load(format!(
                    "the CA certificate's URI SAN {id} has a path; a CA carries `spiffe://<trust-domain>` only"
                )));
            }
            Err(e) => {
                return Err(CaError::Load(format!(
                    "the CA certificate does not name its trust domain ({e}); it needs a `spiffe://<trust-domain>` URI SAN, as `ca init` creates"
                )));
            }
        };
        let key = match pem_io::private_key(key_pem.as_bytes()) {
            Ok(Some(PrivateKeyDer::Pkcs8(pkcs8))) => KeyPair::try_from(pkcs8.secret_pkcs8_der())
                .map_err(|e| CaError::Load(format!("the CA key cannot be used: {e}")))?,
            Ok(Some(_)) => {
                return Err(CaError::Load(
                    "the CA key must be PKCS#8 (`BEGIN PRIVATE KEY`); convert it with `openssl pkcs8 -topk8 -nocrypt`".to_owned(),
                ));
            }
            Ok(None) => {
                return Err(CaError::Load(
                    "the CA key PEM holds no private key block".to_owned(),
                ));
            }
            Err(e) => return Err(CaError::Load(format!("the CA key PEM is invalid: {e}"))),
        };
        if key.subject_public_key_info() != facts.spki {
            return Err(CaError::Load(
                "the CA key does not match the CA certificate; use the key file created with this certificate".to_owned(),
            ));
        }

        // The rest of the chain: each certificate issued the one before it, and
        // the last one is the self-signed root.
        for (i, pair) in chain.windows(2).enumerate() {
            let signed = inspect::is_signed_by(&pair[0], &pair[1]).map_err(|e| {
                CaError::Load(format!("certificate #{} cannot be parsed: {e}", i + 2))
            })?;
            if !signed {
                return Err(CaError::Load(format!(
                    "certificate #{} is not signed by certificate #{}; list the CA first, then each issuer up to the root",
                    i + 1,
                    i + 2
                )));
            }
        }
        let root = chain[chain.len() - 1].clone();
        let root_facts = inspect::facts(&root)
            .map_err(|e| CaError::Load(format!("the root certificate cannot be parsed: {e}")))?;
        if !root_facts.self_signed {
            return Err(CaError::Load(
                "the CA chain does not end with a self-signed root; append the root certificate after the CA certificate".to_owned(),
            ));
        }
        let above = if chain.len() > 2 {
            chain[1..chain.len() - 1].to_vec()
        } else {
            Vec::new()
        };
        Self::assemble(trust_domain, cert, key, above, root)
    }

    fn assemble(
        trust_domain: TrustDomain,
        cert: CertificateDer<'static>,
        key: KeyPair,
        above: Vec<CertificateDer<'static>>,
        root: CertificateDer<'static>,
    ) -> Result<Self, CaError> {
        let own = inspect::facts(&cert)
            .map_err(|e| CaError::Load(format!("the CA certificate cannot be parsed: {e}")))?;
        let mut chain_not_after = own.not_after;
        for issuer in above.iter().chain(std::iter::once(&root)) {
            let facts = inspect::facts(issuer).map_err(|e| {
                CaError::Load(format!("an issuer certificate cannot be parsed: {e}"))
            })?;
            chain_not_after = chain_not_after.min(facts.not_after);
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|source| CaError::Crypto {
            action: "read the CA certificate for signing",
            source,
        })?;
        Ok(Self {
            trust_domain,
            issuer,
            cert,
            above,
            root,
            not_before: own.not_before,
            chain_not_after,
            clock_skew: DEFAULT_CLOCK_SKEW,
        })
    }

    /// Sets how far leaf `not_before` is backdated (default [`DEFAULT_CLOCK_SKEW`]).
    pub fn with_clock_skew(mut self, clock_skew: Duration) -> Self {
        self.clock_skew = clock_skew;
        self
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Whether this CA is the self-signed root (not an intermediate).
    pub fn is_root(&self) -> bool {
        self.cert == self.root
    }

    /// This CA's certificate (DER).
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// This CA's certificate as PEM.
    pub fn certificate_pem(&self) -> String {
        pem_io::encode("CERTIFICATE", &self.cert)
    }

    /// This CA's private key as a PKCS#8 PEM block. Secret: write it only to
    /// a file readable by its owner (mode 0600).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The root certificate (DER): the trust anchor peers must hold.
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The root certificate as PEM: the trust bundle for this trust domain.
    pub fn root_pem(&self) -> String {
        pem_io::encode("CERTIFICATE", &self.root)
    }

    /// Start of this CA certificate's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The earliest expiry along this CA's chain (its own, its issuers', the
    /// root's): no leaf it signs is valid past this.
    pub fn not_after(&self) -> SystemTime {
        self.chain_not_after
    }

    /// Signs a workload CSR (PEM or DER) into a leaf certificate for
    /// `identity`, valid from now minus the clock skew (but not before the
    /// CA's own `not_before`) until now plus `ttl` (but not past the CA
    /// chain's expiry).
    ///
    /// The CSR's signature is verified and only its public key is used; the
    /// identity is the caller's, never the CSR's. The leaf has exactly one URI
    /// SAN (`identity`), `CA:false`, digitalSignature, serverAuth + clientAuth,
    /// and a random 128-bit serial.
    pub fn sign_csr(
        &self,
        csr: &[u8],
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        self.sign_csr_at(csr, identity, ttl, SystemTime::now())
    }

    /// [`Self::sign_csr`] as if the current time were `now` (for tests, e.g.
    /// to issue an already expired certificate).
    pub fn sign_csr_at(
        &self,
        csr: &[u8],
        identity: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        self.sign_leaf(csr, identity, &[], ttl, now)
    }

    /// Signs a CSR into a server certificate that carries, besides the
    /// URI SAN `identity`, the DNS names `dns_names` as DNS SANs: for a
    /// server that clients outside the mesh reach by name and check by
    /// name, not by SPIFFE ID. The Kubernetes API server calling the
    /// control plane's injection webhook at `<service>.<namespace>.svc` is
    /// one; it trusts the root of this CA (the webhook's `caBundle`).
    ///
    /// Otherwise as [`Self::sign_csr`]: the CSR gives only its public key,
    /// the leaf is valid for `ttl` backdated by the clock skew, and it can
    /// serve and be a client (serverAuth + clientAuth), so a
    /// [`crate::CertStore`] of the trust domain takes it. Each name must be
    /// a DNS name (letters, digits, `-`, `.`; a leading `*.` is allowed);
    /// one that is not is refused with [`CaError::InvalidDnsName`].
    pub fn sign_csr_with_dns_names(
        &self,
        csr: &[u8],
        identity: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        self.sign_leaf(csr, identity, dns_names, ttl, SystemTime::now())
    }

    fn sign_leaf(
        &self,
        csr: &[u8],
        identity: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        let mut dns_sans = Vec::with_capacity(dns_names.len());
        for name in dns_names {
            dns_sans.push(dns_san(name)?);
        }
        if identity.path().is_empty() {
            return Err(CaError::NotAWorkload(identity.clone()));
        }
        if !identity.is_member_of(&self.trust_domain) {
            return Err(CaError::TrustDomainMismatch {
                identity: identity.clone(),
                ca_trust_domain: self.trust_domain.clone(),
            });
        }
        if ttl.is_zero() {
            return Err(CaError::InvalidDuration {
                what: "certificate ttl",
                value: ttl,
                reason: "it must be longer than zero, e.g. 24h",
            });
        }
        self.check_valid_at(now)?;
        let public_key = csr_public_key(csr)?;

        let now = whole_seconds(now);
        let not_before = now
            .checked_sub(self.clock_skew)
            .unwrap_or(UNIX_EPOCH)
            .max(self.not_before);
        let not_after = now
            .checked_add(ttl)
            .unwrap_or(self.chain_not_after)
            .min(self.chain_not_after);

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![uri_san(identity)?];
        params.subject_alt_names.extend(dns_sans);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|source| CaError::Crypto {
                action: "sign the workload certificate",
                source,
            })?;

        let leaf_der = leaf.der().clone();
        let facts = inspect::facts(&leaf_der).map_err(|e| {
            CaError::Internal(format!("the issued certificate cannot be read back: {e}"))
        })?;
        let mut chain = vec![leaf_der];
        if !self.is_root() {
            chain.push(self.cert.clone());
            chain.extend(self.above.iter().cloned());
        }
        Ok(IssuedCertificate {
            identity: identity.clone(),
            chain_pem: pem_io::encode_certificates(&chain),
            chain,
            serial: facts.serial,
            not_before: facts.not_before,
            not_after: facts.not_after,
        })
    }

    fn check_valid_at(&self, now: SystemTime) -> Result<(), CaError> {
        if now < self.not_before || now >= self.chain_not_after {
            return Err(CaError::CaNotValid {
                at: display_time(now),
                not_before: display_time(self.not_before),
                not_after: display_time(self.chain_not_after),
            });
        }
        Ok(())
    }
}

/// Parses `csr` (PEM or DER), verifies its self-signature, and returns only
/// its public key.
/// The URI names a CSR (PEM or DER) asks for in its subject alternative
/// names: what a signer compares with the identity the caller's
/// credential proves, to refuse a request for another name rather than
/// silently sign a different one.
pub fn csr_uri_names(csr: &[u8]) -> Result<Vec<String>, CaError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    let der = pem_io::csr(csr).map_err(CaError::MalformedCsr)?;
    let (_, request) = X509CertificationRequest::from_der(&der)
        .map_err(|e| CaError::MalformedCsr(e.to_string()))?;
    let mut names = Vec::new();
    for extension in request.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    names.push((*uri).to_owned());
                }
            }
        }
    }
    Ok(names)
}

fn csr_public_key(csr: &[u8]) -> Result<rcgen::SubjectPublicKeyInfo, CaError> {
    use x509_parser::certification_request::X509CertificationRequest;

    let der = pem_io::csr(csr).map_err(CaError::MalformedCsr)?;
    let (rest, request) = X509CertificationRequest::from_der(&der)
        .map_err(|e| CaError::MalformedCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::MalformedCsr(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    match request.verify_signature() {
        Ok(()) => {}
        Err(x509_parser::error::X509Error::SignatureUnsupportedAlgorithm) => {
            return Err(CaError::UnsupportedKey(
                "its signature algorithm cannot be verified".to_owned(),
            ));
        }
        Err(_) => return Err(CaError::CsrSignature),
    }
    let spki = request.certification_request_info.subject_pki.raw;
    rcgen::SubjectPublicKeyInfo::from_der(spki).map_err(|e| CaError::UnsupportedKey(e.to_string()))
}

fn generate_key() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::Crypto {
        action: "generate an ECDSA P-256 key",
        source,
    })
}

/// `[now - skew, now + validity]`, the end clamped to `parent_not_after`.
fn ca_validity(
    options: &CaOptions,
    now: SystemTime,
    parent_not_after: Option<SystemTime>,
) -> Result<(SystemTime, SystemTime), CaError> {
    if options.validity.is_zero() {
        return Err(CaError::InvalidDuration {
            what: "CA validity",
            value: options.validity,
            reason: "it must be longer than zero, e.g. 365d",
        });
    }
    let now = whole_seconds(now);
    let not_before = now.checked_sub(options.clock_skew).unwrap_or(UNIX_EPOCH);
    let Some(mut not_after) = now.checked_add(options.validity) else {
        return Err(CaError::InvalidDuration {
            what: "CA validity",
            value: options.validity,
            reason: "it is too long to represent, use at most a few decades",
        });
    };
    if let Some(parent) = parent_not_after {
        not_after = not_after.min(parent);
    }
    Ok((not_before, not_after))
}

fn ca_params(
    trust_domain: &TrustDomain,
    kind: &str,
    not_before: SystemTime,
    not_after: SystemTime,
    path_len: u8,
) -> Result<CertificateParams, CaError> {
    let serial = random_serial();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "infermesh");
    // A distinct name per CA keeps old and new roots apart during a rotation.
    name.push(
        DnType::CommonName,
        format!(
            "infermesh {kind} CA {}",
            &inspect::hex(&serial.to_bytes())[..8]
        ),
    );
    let mut params = CertificateParams::default();
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![uri_san(&trust_domain.id())?];
    params.serial_number = Some(serial);
    params.not_before = time::OffsetDateTime::from(not_before);
    params.not_after = time::OffsetDateTime::from(not_after);
    Ok(params)
}

fn uri_san(id: &SpiffeId) -> Result<SanType, CaError> {
    let uri =
        rcgen::string::Ia5String::try_from(id.to_string()).map_err(|source| CaError::Crypto {
            action: "encode the SPIFFE ID as a URI SAN",
            source,
        })?;
    Ok(SanType::URI(uri))
}

/// `name` as a DNS SAN, checked: labels of letters, digits and `-` (not
/// at either end) of at most 63 characters, at most 253 in all, an
/// optional leading `*.` label.
fn dns_san(name: &str) -> Result<SanType, CaError> {
    let invalid = || CaError::InvalidDnsName(name.to_owned());
    let labels = name.strip_prefix("*.").unwrap_or(name);
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() > 253 || !labels.split('.').all(label_ok) {
        return Err(invalid());
    }
    let ia5 =
        rcgen::string::Ia5String::try_from(name.to_ascii_lowercase()).map_err(|_| invalid())?;
    Ok(SanType::DnsName(ia5))
}

/// 128 random bits, positive, never zero.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x40;
    SerialNumber::from_slice(&bytes)
}

/// X.509 times have whole seconds: drop the fraction so the certificate says
/// exactly what was computed.
fn whole_seconds(time: SystemTime) -> SystemTime {
    inspect::unix_to_system(inspect::system_to_unix(time))
}
