//! SPIFFE ID parsing, the CA (issuing, validity, refusals), the workload key
//! and CSR, and renewal timing.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use infermesh_certs::{
    CaError, CaOptions, CertStore, CertificateAuthority, DEFAULT_CLOCK_SKEW, SpiffeId,
    SpiffeIdError, StoreError, WorkloadKey, certificate_identity, renewal_time,
};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// Input, trust domain, path, and (namespace, service account) if any.
type Accepted<'a> = (&'a str, &'a str, &'a str, Option<(&'a str, &'a str)>);
/// Input, and a check of the error it gives.
type Refused<'a> = (&'a str, fn(&SpiffeIdError) -> bool);

#[test]
fn spiffe_ids_that_parse() {
    let cases: &[Accepted<'_>] = &[
        (
            "spiffe://cluster.local/ns/default/sa/web",
            "cluster.local",
            "/ns/default/sa/web",
            Some(("default", "web")),
        ),
        ("spiffe://example.org", "example.org", "", None),
        ("spiffe://a_b-c.9", "a_b-c.9", "", None),
        (
            "spiffe://example.org/Path/with.dots-and_under/X1",
            "example.org",
            "/Path/with.dots-and_under/X1",
            None,
        ),
        (
            "spiffe://td/ns/a/sa/b/extra",
            "td",
            "/ns/a/sa/b/extra",
            None,
        ),
        ("spiffe://td/ns/a/sb/b", "td", "/ns/a/sb/b", None),
        ("spiffe://td/ns/...", "td", "/ns/...", None),
    ];
    for (text, trust_domain, path, workload) in cases {
        let id = SpiffeId::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(id.trust_domain().as_str(), *trust_domain, "{text}");
        assert_eq!(id.path(), *path, "{text}");
        assert_eq!(id.to_string(), *text, "{text} round trip");
        let parts = id.namespace().zip(id.service_account());
        assert_eq!(parts, *workload, "{text}");
    }
}

#[test]
fn spiffe_ids_that_are_refused() {
    let long_path = format!("spiffe://example.org/{}", "a".repeat(2040));
    let long_td = format!("spiffe://{}/x", "a".repeat(256));
    let cases: Vec<Refused<'_>> = vec![
        ("", |e| matches!(e, SpiffeIdError::Empty)),
        ("http://example.org/x", |e| {
            matches!(e, SpiffeIdError::WrongScheme(_))
        }),
        ("SPIFFE://example.org/x", |e| {
            matches!(e, SpiffeIdError::WrongScheme(_))
        }),
        ("spiffe:/example.org/x", |e| {
            matches!(e, SpiffeIdError::WrongScheme(_))
        }),
        ("spiffe://", |e| {
            matches!(e, SpiffeIdError::MissingTrustDomain(_))
        }),
        ("spiffe:///x", |e| {
            matches!(e, SpiffeIdError::MissingTrustDomain(_))
        }),
        ("spiffe://Example.org/x", |e| {
            matches!(e, SpiffeIdError::TrustDomainChar { ch: 'E', .. })
        }),
        ("spiffe://exa mple.org/x", |e| {
            matches!(e, SpiffeIdError::TrustDomainChar { ch: ' ', .. })
        }),
        ("spiffe://user@example.org/x", |e| {
            matches!(e, SpiffeIdError::UserInfo(_))
        }),
        ("spiffe://example.org:8443/x", |e| {
            matches!(e, SpiffeIdError::Port(_))
        }),
        ("spiffe://example.org/x?y=1", |e| {
            matches!(e, SpiffeIdError::Query(_))
        }),
        ("spiffe://example.org/x#frag", |e| {
            matches!(e, SpiffeIdError::Fragment(_))
        }),
        ("spiffe://example.org/", |e| {
            matches!(e, SpiffeIdError::EmptySegment(_))
        }),
        ("spiffe://example.org//x", |e| {
            matches!(e, SpiffeIdError::EmptySegment(_))
        }),
        ("spiffe://example.org/x/", |e| {
            matches!(e, SpiffeIdError::EmptySegment(_))
        }),
        ("spiffe://example.org/./x", |e| {
            matches!(e, SpiffeIdError::DotSegment(_))
        }),
        ("spiffe://example.org/x/..", |e| {
            matches!(e, SpiffeIdError::DotSegment(_))
        }),
        ("spiffe://example.org/x%20y", |e| {
            matches!(e, SpiffeIdError::PathChar { ch: '%', .. })
        }),
        ("spiffe://example.org/x y", |e| {
            matches!(e, SpiffeIdError::PathChar { ch: ' ', .. })
        }),
        ("spiffe://example.org/caf\u{e9}", |e| {
            matches!(e, SpiffeIdError::PathChar { ch: '\u{e9}', .. })
        }),
        (&long_path, |e| matches!(e, SpiffeIdError::TooLong(_))),
        (&long_td, |e| {
            matches!(e, SpiffeIdError::TrustDomainTooLong(_))
        }),
    ];
    for (text, expected) in cases {
        match SpiffeId::parse(text) {
            Ok(id) => panic!("{text:?} parsed as {id}"),
            Err(e) => {
                assert!(expected(&e), "{text:?}: unexpected error {e:?}");
                assert!(!e.to_string().is_empty());
            }
        }
    }
}

#[test]
fn workload_ids_are_built_and_validated() {
    let web = SpiffeId::workload("cluster.local", "default", "web").unwrap();
    assert_eq!(web.to_string(), "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(web.namespace(), Some("default"));
    assert_eq!(web.service_account(), Some("web"));
    assert_eq!(
        web,
        "spiffe://cluster.local/ns/default/sa/web".parse().unwrap()
    );

    assert!(matches!(
        SpiffeId::workload("cluster.local", "a/b", "web"),
        Err(SpiffeIdError::PathChar { ch: '/', .. })
    ));
    assert!(matches!(
        SpiffeId::workload("cluster.local", "default", ""),
        Err(SpiffeIdError::EmptySegment(_))
    ));
    assert!(matches!(
        SpiffeId::workload("cluster.local", "..", "web"),
        Err(SpiffeIdError::DotSegment(_))
    ));
    assert!(matches!(
        SpiffeId::workload("Cluster.local", "default", "web"),
        Err(SpiffeIdError::TrustDomainChar { .. })
    ));
}

/// Parses a DER certificate with x509-parser for the assertions below.
fn parse(der: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn root_ca_certificate_is_a_constrained_spiffe_ca() {
    let ca = root_ca(TD);
    assert!(ca.is_root());
    assert_eq!(ca.root_der(), ca.certificate_der());
    let cert = parse(ca.certificate_der());
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(1));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    assert!(!ku.digital_signature());
    assert_eq!(
        certificate_identity(ca.certificate_der()).unwrap(),
        id("spiffe://cluster.local")
    );
    let lifetime = ca.not_after().duration_since(ca.not_before()).unwrap();
    assert_eq!(
        lifetime,
        Duration::from_secs(365 * 24 * 3600) + DEFAULT_CLOCK_SKEW
    );
    // P-256 key.
    assert_eq!(
        cert.public_key()
            .algorithm
            .parameters
            .as_ref()
            .unwrap()
            .as_oid()
            .unwrap()
            .to_id_string(),
        "1.2.840.10045.3.1.7"
    );
}

#[test]
fn leaf_carries_only_the_callers_identity() {
    let ca = root_ca(TD);
    let web = workload_id("web");

    // A CSR asking for another identity, a DNS name, a subject and CA rights.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["admin.example.org".to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    ));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = params.serialize_request(&key).unwrap();

    let issued = ca
        .sign_csr(csr.pem().unwrap().as_bytes(), &web, HOUR)
        .unwrap();
    assert_eq!(issued.identity(), &web);
    assert_eq!(
        issued.chain_der().len(),
        1,
        "a root CA adds no intermediate"
    );

    let leaf = parse(issued.leaf_der());
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")]
    );
    assert!(san.critical, "SAN is critical with an empty subject");
    assert_eq!(
        leaf.subject().iter_attributes().count(),
        0,
        "subject from the CSR ignored"
    );
    assert!(!leaf.is_ca());
    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    // The CSR's public key, and nothing else, was taken.
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );
    assert_eq!(certificate_identity(issued.leaf_der()).unwrap(), web);
    assert_eq!(
        leaf.issuer().as_raw(),
        parse(ca.certificate_der()).subject().as_raw()
    );
}

#[test]
fn workload_csr_round_trips_through_the_ca_in_pem_and_der() {
    let ca = root_ca(TD);
    let web = workload_id("web");
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&web).unwrap();
    assert!(csr.pem().starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
    for input in [csr.pem().as_bytes(), csr.der().as_ref()] {
        let issued = ca.sign_csr(input, &web, HOUR).unwrap();
        assert_eq!(
            parse(issued.leaf_der()).public_key().raw,
            key.public_key_der().as_slice()
        );
        assert!(
            issued
                .chain_pem()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert_eq!(issued.leaf_pem(), issued.chain_pem());
    }
}

#[test]
fn validity_is_now_minus_skew_to_now_plus_ttl() {
    let ca = root_ca(TD);
    let web = workload_id("web");
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&web).unwrap();
    let now = SystemTime::now();
    let issued = ca.sign_csr_at(csr.der(), &web, 2 * HOUR, now).unwrap();
    let now_s = unix(now);
    assert_eq!(
        unix(issued.not_before()),
        now_s - 60,
        "default skew is one minute"
    );
    assert_eq!(unix(issued.not_after()), now_s + 2 * 3600);
    // The accessors say what the certificate says.
    let leaf = parse(issued.leaf_der());
    assert_eq!(leaf.validity().not_before.timestamp() as u64, now_s - 60);
    assert_eq!(leaf.validity().not_after.timestamp() as u64, now_s + 7200);

    // Backdating never reaches before the CA's own start (here: one minute ago).
    let ca = ca.with_clock_skew(Duration::from_secs(300));
    let issued = ca.sign_csr_at(csr.der(), &web, HOUR, now).unwrap();
    assert_eq!(issued.not_before(), ca.not_before());
    let older_ca = CertificateAuthority::new_root_at(&td(TD), &CaOptions::default(), now - HOUR)
        .unwrap()
        .with_clock_skew(Duration::from_secs(300));
    let issued = older_ca.sign_csr_at(csr.der(), &web, HOUR, now).unwrap();
    assert_eq!(unix(issued.not_before()), now_s - 300);

    assert!(matches!(
        ca.sign_csr(csr.der(), &web, Duration::ZERO),
        Err(CaError::InvalidDuration { .. })
    ));
}

#[test]
fn leaf_never_outlives_the_ca() {
    let options = CaOptions {
        validity: 2 * HOUR,
        ..CaOptions::default()
    };
    let ca = CertificateAuthority::new_root(&td(TD), &options).unwrap();
    let web = workload_id("web");
    let (issued, _) = issue(&ca, &web, DAY);
    assert_eq!(issued.not_after(), ca.not_after());
    assert!(issued.not_after() < SystemTime::now() + 3 * HOUR);

    // An intermediate is clamped to its root, and its leaves to both.
    let intermediate = ca.new_intermediate(&CaOptions::default()).unwrap();
    assert_eq!(intermediate.not_after(), ca.not_after());
    let (issued, _) = issue(&intermediate, &web, DAY);
    assert_eq!(issued.not_after(), ca.not_after());

    // Past its expiry the CA refuses to sign.
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&web).unwrap();
    let later = SystemTime::now() + 3 * HOUR;
    let err = ca.sign_csr_at(csr.der(), &web, HOUR, later).unwrap_err();
    assert!(matches!(err, CaError::CaNotValid { .. }), "{err}");
    assert!(err.to_string().contains("create or load a new CA"), "{err}");
}

#[test]
fn identity_from_another_trust_domain_is_refused() {
    let ca = root_ca(TD);
    let foreign = id("spiffe://other.org/ns/default/sa/web");
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&foreign).unwrap();
    let err = ca.sign_csr(csr.der(), &foreign, HOUR).unwrap_err();
    assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("spiffe://other.org/ns/default/sa/web") && text.contains("cluster.local"),
        "{text}"
    );
}

#[test]
fn bare_trust_domain_is_not_a_workload_identity() {
    let ca = root_ca(TD);
    let bare = id("spiffe://cluster.local");
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&bare).unwrap();
    let err = ca.sign_csr(csr.der(), &bare, HOUR).unwrap_err();
    assert!(matches!(err, CaError::NotAWorkload(_)), "{err}");
}

#[test]
fn tampered_or_malformed_csrs_are_refused() {
    let ca = root_ca(TD);
    let web = workload_id("web");
    let key = WorkloadKey::generate().unwrap();
    let csr = key
        .csr(&id("spiffe://cluster.local/ns/default/sa/web"))
        .unwrap();
    let mut der = csr.der().to_vec();
    // Change the requested identity after signing: `web` -> `wex`.
    let at = der.windows(7).position(|w| w == b"/sa/web").unwrap() + 6;
    der[at] = b'x';
    let err = ca.sign_csr(&der, &web, HOUR).unwrap_err();
    assert!(matches!(err, CaError::CsrSignature), "{err}");

    // A CSR whose public key was swapped for another key.
    let other = WorkloadKey::generate().unwrap();
    let original = csr.der().to_vec();
    let (_, parsed) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&original).unwrap();
    let old_spki = parsed.certification_request_info.subject_pki.raw.to_vec();
    let new_spki = other.public_key_der();
    assert_eq!(old_spki.len(), new_spki.len());
    let at = original
        .windows(old_spki.len())
        .position(|w| w == old_spki.as_slice())
        .unwrap();
    let mut swapped = original.clone();
    swapped[at..at + new_spki.len()].copy_from_slice(&new_spki);
    let err = ca.sign_csr(&swapped, &web, HOUR).unwrap_err();
    assert!(matches!(err, CaError::CsrSignature), "{err}");

    let err = ca.sign_csr(b"not a csr", &web, HOUR).unwrap_err();
    assert!(matches!(err, CaError::MalformedCsr(_)), "{err}");
    let err = ca
        .sign_csr(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            &web,
            HOUR,
        )
        .unwrap_err();
    assert!(matches!(err, CaError::MalformedCsr(_)), "{err}");
}

#[test]
fn serials_are_random_and_positive() {
    let ca = root_ca(TD);
    let web = workload_id("web");
    let (a, _) = issue(&ca, &web, HOUR);
    let (b, _) = issue(&ca, &web, HOUR);
    assert_ne!(a.serial(), b.serial());
    assert_eq!(a.serial().len(), 16);
    assert!(a.serial()[0] & 0x80 == 0);
}

#[test]
fn intermediate_ca_signs_leaves_that_chain_to_the_root() {
    let root = root_ca(TD);
    let intermediate = root.new_intermediate(&CaOptions::default()).unwrap();
    assert!(!intermediate.is_root());
    assert_eq!(intermediate.root_der(), root.root_der());
    let cert = parse(intermediate.certificate_der());
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert_eq!(bc.path_len_constraint, Some(0));

    let web = workload_id("web");
    let (issued, key) = issue(&intermediate, &web, HOUR);
    assert_eq!(issued.chain_der().len(), 2);
    assert_eq!(&issued.chain_der()[1], intermediate.certificate_der());

    let store = CertStore::new(td(TD), vec![root.root_der().clone()]).unwrap();
    // Without the intermediate the leaf does not verify against the root.
    let err = store
        .update_certificate(vec![issued.leaf_der().clone()], key.private_key_der())
        .unwrap_err();
    assert!(matches!(err, StoreError::Untrusted { .. }), "{err}");
    store
        .update_certificate(issued.chain_der().to_vec(), key.private_key_der())
        .unwrap();
}

#[test]
fn ca_loads_from_pem() {
    let root = root_ca(TD);
    let loaded = CertificateAuthority::from_pem(&root.certificate_pem(), &root.key_pem()).unwrap();
    assert_eq!(loaded.trust_domain().as_str(), TD);
    assert!(loaded.is_root());
    assert_eq!(loaded.not_after(), root.not_after());
    let web = workload_id("web");
    let (issued, key) = issue(&loaded, &web, HOUR);
    let store = CertStore::new(td(TD), vec![root.root_der().clone()]).unwrap();
    store
        .update_certificate(issued.chain_der().to_vec(), key.private_key_der())
        .unwrap();

    // An intermediate: its certificate, then the root.
    let intermediate = root.new_intermediate(&CaOptions::default()).unwrap();
    let chain = intermediate.certificate_pem() + &root.certificate_pem();
    let loaded = CertificateAuthority::from_pem(&chain, &intermediate.key_pem()).unwrap();
    assert!(!loaded.is_root());
    let (issued, _) = issue(&loaded, &web, HOUR);
    assert_eq!(&issued.chain_der()[1], intermediate.certificate_der());

    let other = root_ca(TD);
    let err =
        CertificateAuthority::from_pem(&root.certificate_pem(), &other.key_pem()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    let err =
        CertificateAuthority::from_pem(&intermediate.certificate_pem(), &intermediate.key_pem())
            .unwrap_err();
    assert!(err.to_string().contains("self-signed root"), "{err}");
    let wrong_order = intermediate.certificate_pem() + &other.certificate_pem();
    let err = CertificateAuthority::from_pem(&wrong_order, &intermediate.key_pem()).unwrap_err();
    assert!(err.to_string().contains("not signed by"), "{err}");
    let (leaf, leaf_key) = issue(&root, &web, HOUR);
    let err =
        CertificateAuthority::from_pem(leaf.chain_pem(), &leaf_key.private_key_pem()).unwrap_err();
    assert!(err.to_string().contains("not a CA certificate"), "{err}");
    let err = CertificateAuthority::from_pem("", &root.key_pem()).unwrap_err();
    assert!(err.to_string().contains("no `CERTIFICATE`"), "{err}");
    let err = CertificateAuthority::from_pem(&root.certificate_pem(), "").unwrap_err();
    assert!(err.to_string().contains("no private key"), "{err}");
}

#[test]
fn renewal_time_is_about_half_the_lifetime() {
    let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let end = start + DAY;
    let (low, high) = (start + DAY.mul_f64(0.45), start + DAY.mul_f64(0.55));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        let at = renewal_time(start, end, infermesh_certs::DEFAULT_RENEWAL_JITTER);
        assert!(at >= low && at <= high, "{at:?} outside 45-55 %");
        seen.insert(at);
    }
    assert!(seen.len() > 100, "jitter spreads renewals");
    assert_eq!(renewal_time(start, end, 0.0), start + DAY / 2);
    // Jitter is clamped; the result stays within the lifetime and never before it.
    for _ in 0..100 {
        let at = renewal_time(start, end, 7.0);
        assert!(at >= start && at <= end);
    }
    assert_eq!(renewal_time(end, start, 0.05), end, "inverted period");
    assert_eq!(renewal_time(start, end, f64::NAN), start + DAY / 2);
}
