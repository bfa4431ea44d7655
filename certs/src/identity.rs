//! The identity a verified client certificate carries: its subject CN and fingerprint.

use policy::{CertificateIdentity, Sha256};
use rustls_pki_types::CertificateDer;

/// SHA-256 of a DER certificate: the fingerprint consumers pin and audit records carry.
pub fn sha256(der: &[u8]) -> Sha256 {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Sha256(out)
}

/// Whether two secrets are equal, compared without leaking through timing how much of
/// one matched: as SHA-256 digests, of equal length whatever was sent, so the time taken
/// says nothing about a secret's length either.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (sha256(a).0, sha256(b).0);
    a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The subject common name (first CN attribute), if any.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// How many CN attributes the subject holds (an administrator's certificate must hold
/// exactly one: with several, software that reads another one would see someone else).
pub fn common_name_count(der: &[u8]) -> usize {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert.subject().iter_common_name().count())
        .unwrap_or(0)
}

/// CN and fingerprint of the leaf certificate a client presented. A subject with
/// several CN attributes names nobody by CN (only a pinned fingerprint can identify it):
/// the gateway would read the first, and a CA's checks, a log reader or another gateway
/// may read another (RFC 6125 calls the last the most specific).
pub fn certificate_identity(leaf: &CertificateDer<'_>) -> CertificateIdentity {
    CertificateIdentity {
        cn: x509_parser::parse_x509_certificate(leaf)
            .ok()
            .and_then(|(_, cert)| {
                let mut cns = cert.subject().iter_common_name();
                let first = cns.next()?;
                match cns.next() {
                    Some(_) => None,
                    None => first.as_str().ok().map(str::to_owned),
                }
            }),
        sha256: sha256(leaf),
    }
}

/// The end of a certificate's validity (`notAfter`), in seconds since the Unix epoch.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}
