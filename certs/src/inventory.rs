//! What certificates and CRLs a configuration depends on, and when they expire.

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
    /// The subject's (first) common name, if it has one.
    pub cn: Option<String>,
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

    /// Whole days from `not_before` to `not_after`: how long the certificate was issued for.
    pub fn validity_days(&self) -> i64 {
        (self.not_after - self.not_before).whole_days()
    }

    /// `expired today`, `expired 1 day ago`, `expired N days ago`; `None` while it is
    /// still valid at `now`.
    pub fn expired_ago(&self, now: OffsetDateTime) -> Option<String> {
        if self.not_after >= now {
            return None;
        }
        Some(match (now - self.not_after).whole_days() {
            0 => "expired today".to_owned(),
            1 => "expired 1 day ago".to_owned(),
            ago => format!("expired {ago} days ago"),
        })
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
            cn: crate::identity::common_name(&der),
            issuer: cert.issuer().to_string(),
            sha256: crate::sha256(&der).to_string(),
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
        });
    }
    Ok(out)
}

/// One CRL found in a file the configuration references.
#[derive(Clone, Debug)]
pub struct CrlInfo {
    pub path: PathBuf,
    /// The CA that signed it (the certificates it speaks for).
    pub issuer: String,
    pub this_update: OffsetDateTime,
    /// When its issuer promised a fresher one; past it, the gateway no longer trusts it
    /// (and refuses the certificates it covers). `None`: the CRL names no date.
    pub next_update: Option<OffsetDateTime>,
}

impl CrlInfo {
    /// Whether the CRL is stale at `now`: its nextUpdate has come.
    pub fn stale(&self, now: OffsetDateTime) -> bool {
        self.next_update.is_some_and(|n| n <= now)
    }
}

/// Describes every CRL in a PEM file.
pub fn describe_crls(path: &Path) -> Result<Vec<CrlInfo>, CertError> {
    let crls = load::crls(&[path.to_owned()])?;
    let mut out = Vec::with_capacity(crls.len());
    for (i, der) in crls.iter().enumerate() {
        let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| {
            CertError::new(
                path,
                format!("CRL #{} is not a valid X.509 CRL: {e}", i + 1),
            )
        })?;
        out.push(CrlInfo {
            path: path.to_owned(),
            issuer: crl.issuer().to_string(),
            this_update: crl.last_update().to_datetime(),
            next_update: crl.next_update().map(|t| t.to_datetime()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use time::Duration;

    use super::*;
    use crate::devpki::DevCa;

    #[test]
    fn describes_subject_cn_fingerprint_and_validity_leaf_first() {
        let ca = DevCa::new("Inventory CA").unwrap();
        let now = OffsetDateTime::now_utc();
        let leaf = ca
            .client_valid(
                "app.example.be",
                now - Duration::days(10),
                now + Duration::days(720),
            )
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chain.pem");
        std::fs::write(&path, format!("{}{}", leaf.cert_pem, ca.cert_pem())).unwrap();
        let list = describe("consumer", &path).unwrap();
        assert_eq!(list.len(), 2);
        let first = &list[0];
        assert_eq!(first.role, "consumer");
        assert_eq!(first.cn.as_deref(), Some("app.example.be"));
        assert!(
            first.subject.contains("CN=app.example.be"),
            "{}",
            first.subject
        );
        assert_eq!(first.sha256, crate::sha256(&leaf.der).to_string());
        assert_eq!(first.validity_days(), 730);
        assert_eq!(first.days_left(now + Duration::hours(1)), 719);
        assert_eq!(first.expired_ago(now), None);
        assert_eq!(list[1].cn.as_deref(), Some("Inventory CA"));
    }

    #[test]
    fn says_how_long_ago_a_certificate_expired() {
        let ca = DevCa::new("Inventory CA").unwrap();
        let now = OffsetDateTime::now_utc();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.pem");
        let old = ca
            .client_valid("old", now - Duration::days(400), now - Duration::hours(1))
            .unwrap();
        std::fs::write(&path, &old.cert_pem).unwrap();
        let info = describe("consumer", &path).unwrap().remove(0);
        assert_eq!(info.expired_ago(now).as_deref(), Some("expired today"));
        assert_eq!(
            info.expired_ago(now + Duration::days(1)).as_deref(),
            Some("expired 1 day ago")
        );
        assert_eq!(
            info.expired_ago(now + Duration::days(3)).as_deref(),
            Some("expired 3 days ago")
        );
    }

    #[test]
    fn describes_a_crl_and_when_it_goes_stale() {
        let ca = DevCa::new("Inventory CRL CA").unwrap();
        let now = OffsetDateTime::now_utc();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.crl");
        let next = now + Duration::hours(2);
        std::fs::write(
            &path,
            ca.crl_valid(&[], now - Duration::hours(1), next).unwrap(),
        )
        .unwrap();
        let list = describe_crls(&path).unwrap();
        assert_eq!(list.len(), 1);
        assert!(
            list[0].issuer.contains("CN=Inventory CRL CA"),
            "{}",
            list[0].issuer
        );
        assert_eq!(
            list[0].next_update.map(|t| t.unix_timestamp()),
            Some(next.unix_timestamp())
        );
        assert!(!list[0].stale(now));
        assert!(list[0].stale(now + Duration::hours(3)));
    }
}
