//! The soak's certificates, made with `infermesh-certs` as the control
//! plane's `ca` commands make them: one root CA, a SPIFFE certificate the
//! mock model servers present (and whose CA they require of clients), and
//! the proxy's own, which the soak replaces while the proxy runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use infermesh_certs::{CaOptions, CertificateAuthority, SpiffeId, TrustDomain, WorkloadKey};

/// The trust domain of every certificate of the soak.
pub const TRUST_DOMAIN: &str = "soak.local";
/// The SPIFFE ID the mock model servers present; the proxy's `Backend`
/// requires it.
pub const MODEL_IDENTITY: &str = "spiffe://soak.local/ns/soak/sa/model";
/// The SPIFFE ID of the proxy.
pub const PROXY_IDENTITY: &str = "spiffe://soak.local/ns/soak/sa/gateway";

/// A certificate chain and key, as PEM files.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The chain, leaf first.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// The CA and the files made from it.
pub struct Identities {
    ca: CertificateAuthority,
    /// The root certificate: the proxy's trust bundle, and the CA the mock
    /// servers require client certificates from.
    pub bundle: PathBuf,
    /// The mock model servers' certificate.
    pub model: Pair,
    /// The proxy's certificate, rewritten by [`Identities::rotate_proxy`].
    pub proxy: Pair,
    rotations: u32,
    proxy_not_after: SystemTime,
}

impl Identities {
    /// Creates the CA and both certificates under `dir` (the proxy's in a
    /// directory of its own, so that rewriting it disturbs no other
    /// watcher).
    pub fn create(dir: &Path) -> anyhow::Result<Identities> {
        let td = TrustDomain::new(TRUST_DOMAIN)?;
        let ca = CertificateAuthority::new_root(&td, &CaOptions::default())
            .context("cannot create the soak's CA")?;
        let model_dir = dir.join("model");
        let proxy_dir = dir.join("proxy");
        for d in [&model_dir, &proxy_dir] {
            std::fs::create_dir_all(d)?;
        }
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, ca.root_pem())?;
        let model = Pair {
            cert: model_dir.join("cert.pem"),
            key: model_dir.join("key.pem"),
        };
        let proxy = Pair {
            cert: proxy_dir.join("cert.pem"),
            key: proxy_dir.join("key.pem"),
        };
        let mut identities = Identities {
            ca,
            bundle,
            model,
            proxy,
            rotations: 0,
            proxy_not_after: SystemTime::UNIX_EPOCH,
        };
        identities.issue(
            MODEL_IDENTITY,
            &identities.model,
            Duration::from_secs(24 * 3600),
        )?;
        identities.proxy_not_after =
            identities.issue(PROXY_IDENTITY, &identities.proxy, proxy_ttl(0))?;
        Ok(identities)
    }

    /// Issues the proxy a new certificate with a new key, written over the
    /// old files each by an atomic rename (as `ca issue --force` does).
    /// Each has another lifetime, so that the proxy's
    /// `infermesh_identity_cert_expiry_timestamp_seconds` shows which one
    /// it loaded.
    pub fn rotate_proxy(&mut self) -> anyhow::Result<()> {
        self.rotations += 1;
        self.proxy_not_after =
            self.issue(PROXY_IDENTITY, &self.proxy, proxy_ttl(self.rotations))?;
        Ok(())
    }

    /// When the proxy's latest certificate expires, in Unix seconds (what
    /// `infermesh_identity_cert_expiry_timestamp_seconds` shows once the
    /// proxy loaded it).
    pub fn proxy_expiry(&self) -> u64 {
        self.proxy_not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    /// Certificates issued to the proxy after the first.
    pub fn rotations(&self) -> u32 {
        self.rotations
    }

    /// Issues a certificate for `identity` into `pair`; returns its expiry.
    fn issue(&self, identity: &str, pair: &Pair, ttl: Duration) -> anyhow::Result<SystemTime> {
        let id = SpiffeId::parse(identity)?;
        let key = WorkloadKey::generate()?;
        let csr = key.csr(&id)?;
        let issued = self
            .ca
            .sign_csr(csr.pem().as_bytes(), &id, ttl)
            .with_context(|| format!("cannot issue a certificate for {identity}"))?;
        // The key first: until the certificate follows, the pair does not
        // match and the proxy refuses the read, then applies the next one.
        write_atomically(&pair.key, key.private_key_pem().as_bytes())?;
        write_atomically(&pair.cert, issued.chain_pem().as_bytes())?;
        Ok(issued.not_after())
    }
}

/// The lifetime of the proxy's certificate number `n`: a day, plus `n`
/// minutes.
fn proxy_ttl(n: u32) -> Duration {
    Duration::from_secs(24 * 3600 + 60 * u64::from(n))
}

/// Writes `path` through a temporary file renamed over it, so that a
/// watcher never reads half a file.
pub fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .context("a file path has a file name")?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_carry_their_identities_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Identities::create(dir.path()).unwrap();
        let identity_of = |pair: &Pair| {
            let certs = crate::tls::certificates(&pair.cert).unwrap();
            infermesh_certs::certificate_identity(&certs[0])
                .unwrap()
                .to_string()
        };
        assert_eq!(identity_of(&ids.model), MODEL_IDENTITY);
        assert_eq!(identity_of(&ids.proxy), PROXY_IDENTITY);
        let before = std::fs::read(&ids.proxy.cert).unwrap();
        let expiry = ids.proxy_expiry();
        ids.rotate_proxy().unwrap();
        assert!(
            ids.proxy_expiry() >= expiry + 60,
            "each certificate lives a minute longer"
        );
        assert_ne!(std::fs::read(&ids.proxy.cert).unwrap(), before);
        assert_eq!(ids.rotations(), 1);
        // The mock's TLS configuration takes the files as they are.
        crate::tls::server_config(&ids.model.cert, &ids.model.key, Some(&ids.bundle)).unwrap();
    }
}
