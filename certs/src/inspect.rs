//! Facts read out of X.509 certificates (validity, serial, CA flag, key,
//! SPIFFE ID), parsed with `x509-parser`; used by the CA and the store to
//! check material before using it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;

use crate::peer::{CertificateIdentityError, identity_of_parsed};
use crate::spiffe::SpiffeId;

/// What the crate needs to know about one certificate.
#[derive(Debug, Clone)]
pub(crate) struct CertFacts {
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// Big-endian serial, without leading zero bytes.
    pub(crate) serial: Vec<u8>,
    pub(crate) is_ca: bool,
    /// Whether keyCertSign is allowed (or no keyUsage extension at all).
    pub(crate) can_sign_certs: bool,
    /// Raw DER SubjectPublicKeyInfo.
    pub(crate) spki: Vec<u8>,
    /// Subject equals issuer and the signature verifies with its own key.
    pub(crate) self_signed: bool,
    pub(crate) identity: Result<SpiffeId, CertificateIdentityError>,
}

/// Parses `der`; the error is x509-parser's description.
pub(crate) fn facts(der: &[u8]) -> Result<CertFacts, String> {
    with_parsed(der, |cert| {
        let validity = cert.validity();
        let can_sign_certs = match cert.key_usage() {
            Ok(Some(ku)) => ku.value.key_cert_sign(),
            Ok(None) => true,
            Err(_) => false,
        };
        CertFacts {
            not_before: unix_to_system(validity.not_before.timestamp()),
            not_after: unix_to_system(validity.not_after.timestamp()),
            serial: strip_leading_zeros(cert.raw_serial()),
            is_ca: cert.is_ca(),
            can_sign_certs,
            spki: cert.public_key().raw.to_vec(),
            self_signed: cert.subject().as_raw() == cert.issuer().as_raw()
                && cert.verify_signature(None).is_ok(),
            identity: identity_of_parsed(cert),
        }
    })
}

/// Whether `child` (DER) carries a signature made by `issuer`'s (DER) key.
pub(crate) fn is_signed_by(child: &[u8], issuer: &[u8]) -> Result<bool, String> {
    let (_, issuer) = x509_parser::parse_x509_certificate(issuer).map_err(|e| e.to_string())?;
    with_parsed(child, |child| {
        child.verify_signature(Some(issuer.public_key())).is_ok()
    })
}

fn with_parsed<T>(der: &[u8], f: impl FnOnce(&X509Certificate<'_>) -> T) -> Result<T, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        ));
    }
    Ok(f(&cert))
}

pub(crate) fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Seconds since the Unix epoch (negative before it).
pub(crate) fn system_to_unix(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// RFC 3339 rendering for error messages.
pub(crate) fn display_time(time: SystemTime) -> String {
    // humantime panics before 1970 and fails after year 9999.
    const YEAR_10000: u64 = 253_402_300_800;
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) if since.as_secs() < YEAR_10000 => {
            humantime::format_rfc3339_seconds(time).to_string()
        }
        _ => format!("Unix time {}", system_to_unix(time)),
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[start..].to_vec()
}

/// Lower-case hex, as serial numbers are usually shown.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}
