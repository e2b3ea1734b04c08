//! Classifying handshake failures into a few stable reasons for metrics and
//! logs (`unknown_ca`, `expired`, `bad_identity`, ...).
//!
//! The side that rejects a certificate knows the precise reason; the other
//! side only receives a TLS alert, which maps to the closest reason (an
//! identity rejected by the peer arrives as `certificate_unknown` and shows
//! up as `bad_certificate`).

use std::fmt;

use rustls::{AlertDescription, CertificateError, PeerIncompatible};

use crate::peer::PeerIdentityError;

/// Why a TLS handshake failed, coarse enough for a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// The peer's chain does not lead to a root in the trust bundle.
    UnknownCa,
    /// A certificate has expired (or, when told by an alert, is not valid now).
    Expired,
    /// A certificate is not valid yet (clock skew, or issued for the future).
    NotYetValid,
    /// The peer's SPIFFE ID is missing, foreign, or not the expected one.
    BadIdentity,
    /// The client presented no certificate.
    NoClientCert,
    /// The certificate is malformed, badly signed, or not for this use.
    BadCertificate,
    /// No TLS version in common (for example TLS 1.2 offered to a TLS 1.3-only peer).
    ProtocolVersion,
    /// Anything else (I/O, protocol errors, missing local certificate, ...).
    Other,
}

impl HandshakeFailure {
    /// The reason as a metric label: `unknown_ca`, `expired`,
    /// `not_yet_valid`, `bad_identity`, `no_client_cert`, `bad_certificate`,
    /// `protocol_version` or `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::BadIdentity => "bad_identity",
            Self::NoClientCert => "no_client_cert",
            Self::BadCertificate => "bad_certificate",
            Self::ProtocolVersion => "protocol_version",
            Self::Other => "other",
        }
    }

    /// Classifies a rustls error (local verification failure or received alert).
    pub fn from_rustls(error: &rustls::Error) -> Self {
        match error {
            rustls::Error::NoCertificatesPresented => Self::NoClientCert,
            rustls::Error::InvalidCertificate(cert) => Self::from_certificate_error(cert),
            rustls::Error::AlertReceived(alert) => Self::from_alert(*alert),
            rustls::Error::PeerIncompatible(
                PeerIncompatible::ServerDoesNotSupportTls12Or13
                | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
                | PeerIncompatible::SupportedVersionsExtensionRequired
                | PeerIncompatible::Tls12NotOffered
                | PeerIncompatible::Tls12NotOfferedOrEnabled,
            ) => Self::ProtocolVersion,
            _ => Self::Other,
        }
    }

    /// Classifies the `io::Error` a tokio-rustls handshake returns (it wraps
    /// the rustls error).
    pub fn from_io(error: &std::io::Error) -> Self {
        match error.get_ref() {
            Some(inner) => Self::from_error(inner),
            None => Self::Other,
        }
    }

    /// Classifies any error by looking for a rustls error in its source chain.
    pub fn from_error(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut current = Some(error);
        while let Some(error) = current {
            if let Some(rustls_error) = error.downcast_ref::<rustls::Error>() {
                return Self::from_rustls(rustls_error);
            }
            if let Some(io) = error.downcast_ref::<std::io::Error>()
                && let Some(inner) = io.get_ref()
            {
                return Self::from_error(inner);
            }
            current = error.source();
        }
        Self::Other
    }

    fn from_certificate_error(error: &CertificateError) -> Self {
        match error {
            CertificateError::UnknownIssuer => Self::UnknownCa,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Self::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Self::NotYetValid
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Self::BadIdentity
            }
            CertificateError::Other(other)
                if other.0.downcast_ref::<PeerIdentityError>().is_some() =>
            {
                Self::BadIdentity
            }
            _ => Self::BadCertificate,
        }
    }

    fn from_alert(alert: AlertDescription) -> Self {
        match alert {
            AlertDescription::UnknownCA => Self::UnknownCa,
            AlertDescription::CertificateExpired => Self::Expired,
            AlertDescription::CertificateRequired => Self::NoClientCert,
            AlertDescription::ProtocolVersion => Self::ProtocolVersion,
            AlertDescription::AccessDenied => Self::BadIdentity,
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate => Self::BadCertificate,
            _ => Self::Other,
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
