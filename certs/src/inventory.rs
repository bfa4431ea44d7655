//! What certificates a configuration depends on, and when they expire.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::load::{self, CertError};

/// One certificate found in a file the configuration references.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// What the configuration uses it for (`listener.server_cert`, ...).
    pub role: String,
    pub path: PathBuf,
    pub subject: String,
    pub issuer: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub sha256: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    /// Whole days from `now` until expiry (negative once expired).
    pub fn days_left(&self, now: OffsetDateTime) -> i64 {
        (self.not_after - now).whole_days()
    }
}

/// Describes every certificate in a PEM file.
pub fn describe(role: &str, path: &Path) -> Result<Vec<CertInfo>, CertError> {
    let certs = load::certificates(path)?;
    let mut out = Vec::with_capacity(certs.len());
    for der in certs {
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CertError::new(path, format!("not valid X.509: {e}")))?;
        let validity = cert.validity();
        out.push(CertInfo {
            role: role.to_owned(),
            path: path.to_owned(),
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            sha256: crate::sha256(&der).to_string(),
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
        });
    }
    Ok(out)
}
