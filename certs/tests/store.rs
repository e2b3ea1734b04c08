//! Loading and reloading a `CertStore` from PEM files: what is accepted, and
//! errors that name the file and the problem while keeping the old material.

mod common;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use infermesh_certs::{CaOptions, CertStore, CertificateAuthority, StoreError};

struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

impl Files {
    fn paths(&self) -> (&Path, &Path, &Path) {
        (&self.cert, &self.key, &self.bundle)
    }
}

fn write(cert: &str, key: &str, bundle: &str) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let files = Files {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
        bundle: dir.path().join("bundle.pem"),
        _dir: dir,
    };
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    std::fs::write(&files.bundle, bundle).unwrap();
    files
}

fn issued_files(
    ca: &CertificateAuthority,
    sa: &str,
) -> (Files, infermesh_certs::IssuedCertificate) {
    let (issued, key) = issue(ca, &workload_id(sa), DAY);
    let files = write(issued.chain_pem(), &key.private_key_pem(), &ca.root_pem());
    (files, issued)
}

fn load(files: &Files) -> Result<CertStore, StoreError> {
    let (c, k, b) = files.paths();
    CertStore::load_files(c, k, b)
}

#[test]
fn loads_a_valid_set() {
    let ca = root_ca(TD);
    let (files, issued) = issued_files(&ca, "web");
    let store = load(&files).unwrap();
    assert_eq!(store.trust_domain().as_str(), TD);
    let info = store.certificate().unwrap();
    assert_eq!(info.identity, workload_id("web"));
    assert_eq!(info.serial, issued.serial());
    let not_after = issued
        .not_after()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(store.not_after_unix(), Some(not_after));
    assert_eq!(store.roots(), vec![ca.root_der().clone()]);
}

#[test]
fn errors_name_the_file_and_the_problem() {
    let ca = root_ca(TD);
    let (good, _) = issued_files(&ca, "web");
    let cert_pem = std::fs::read_to_string(&good.cert).unwrap();
    let key_pem = std::fs::read_to_string(&good.key).unwrap();
    let bundle_pem = ca.root_pem();

    // Missing file.
    let (_, k, b) = good.paths();
    let missing = good.cert.with_file_name("nope.pem");
    let err = CertStore::load_files(&missing, k, b).unwrap_err();
    assert!(matches!(err, StoreError::Read { .. }), "{err}");
    assert!(err.to_string().contains("nope.pem"), "{err}");

    // The cert file holds only a key.
    let files = write(&key_pem, &key_pem, &bundle_pem);
    let err = load(&files).unwrap_err();
    assert!(matches!(err, StoreError::NoCertificate { .. }), "{err}");
    assert!(
        err.to_string().contains(&files.cert.display().to_string()),
        "{err}"
    );

    // The key file holds no key.
    let files = write(&cert_pem, &cert_pem, &bundle_pem);
    let err = load(&files).unwrap_err();
    assert!(matches!(err, StoreError::NoKey { .. }), "{err}");
    assert!(err.to_string().contains("key.pem"), "{err}");

    // The key is another certificate's.
    let (other, _) = issued_files(&ca, "api");
    let other_key = std::fs::read_to_string(&other.key).unwrap();
    let files = write(&cert_pem, &other_key, &bundle_pem);
    let err = load(&files).unwrap_err();
    assert!(matches!(err, StoreError::KeyMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("key.pem") && text.contains("cert.pem") && text.contains("does not match"),
        "{text}"
    );

    // Broken PEM.
    let files = write("-----BEGIN CERTIFICATE-----\nAAAA\n", &key_pem, &bundle_pem);
    let err = load(&files).unwrap_err();
    assert!(matches!(err, StoreError::Pem { .. }), "{err}");

    // Bundle from another CA.
    let stranger = root_ca(TD);
    let files = write(&cert_pem, &key_pem, &stranger.root_pem());
    let err = load(&files).unwrap_err();
    assert!(matches!(err, StoreError::Untrusted { .. }), "{err}");
    assert!(err.to_string().contains("bundle.pem"), "{err}");

    // The certificate passed as the bundle.
    let files = write(&cert_pem, &key_pem, &cert_pem);
    let err = load(&files).unwrap_err();
    assert!(matches!(err, StoreError::BadRoot { index: 1, .. }), "{err}");

    // Empty bundle.
    let files = write(&cert_pem, &key_pem, "");
    let err = load(&files).unwrap_err();
    assert!(matches!(err, StoreError::EmptyBundle { .. }), "{err}");
}

#[test]
fn expired_certificate_is_refused() {
    let old = CertificateAuthority::new_root_at(
        &td(TD),
        &CaOptions::default(),
        SystemTime::now() - 10 * DAY,
    )
    .unwrap();
    let (issued, key) = issue_at(&old, &workload_id("web"), HOUR, SystemTime::now() - 2 * DAY);
    let files = write(issued.chain_pem(), &key.private_key_pem(), &old.root_pem());
    let err = load(&files).unwrap_err();
    assert!(matches!(err, StoreError::Expired { .. }), "{err}");
    assert!(err.to_string().contains("expired at"), "{err}");
}

#[test]
fn reload_swaps_everything_or_nothing() {
    let ca = root_ca(TD);
    let (files, first) = issued_files(&ca, "web");
    let store = load(&files).unwrap();

    // A good reload: new certificate and a bundle with an extra root.
    let next_root = root_ca(TD);
    let (issued, key) = issue(&ca, &workload_id("web"), 2 * HOUR);
    let good = write(
        issued.chain_pem(),
        &key.private_key_pem(),
        &(ca.root_pem() + &next_root.root_pem()),
    );
    let (c, k, b) = good.paths();
    store.reload_files(c, k, b).unwrap();
    assert_eq!(store.certificate().unwrap().serial, issued.serial());
    assert_ne!(issued.serial(), first.serial());
    assert_eq!(store.roots().len(), 2);

    // A bad reload (mismatched key) changes nothing.
    let (other, _) = issued_files(&ca, "api");
    let bad = write(
        issued.chain_pem(),
        &std::fs::read_to_string(&other.key).unwrap(),
        &ca.root_pem(),
    );
    let (c, k, b) = bad.paths();
    let err = store.reload_files(c, k, b).unwrap_err();
    assert!(matches!(err, StoreError::KeyMismatch { .. }), "{err}");
    assert_eq!(store.certificate().unwrap().serial, issued.serial());
    assert_eq!(store.roots().len(), 2, "bundle kept too");

    // A certificate of another trust domain is refused on reload.
    let foreign_ca = root_ca("other.org");
    let (foreign, key) = issue(
        &foreign_ca,
        &id("spiffe://other.org/ns/default/sa/web"),
        HOUR,
    );
    let files = write(
        foreign.chain_pem(),
        &key.private_key_pem(),
        &foreign_ca.root_pem(),
    );
    let (c, k, b) = files.paths();
    let err = store.reload_files(c, k, b).unwrap_err();
    assert!(matches!(err, StoreError::WrongTrustDomain { .. }), "{err}");
    assert_eq!(store.certificate().unwrap().serial, issued.serial());
}
