//! A throw-away PKI for the quickstart and the tests: a CA that issues server and client
//! certificates (ECDSA P-256) and CRLs. Nothing here is meant for production keys.

use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub use rcgen::Error;

/// A certificate with its private key, both PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
    pub serial: u64,
}

impl Issued {
    /// A TLS server configuration presenting this certificate (for test servers that
    /// stand in for a database or a Redis), asking for client certificates that chain
    /// to `client_ca` when given.
    pub fn server_tls(
        &self,
        client_ca: Option<&DevCa>,
    ) -> Result<rustls::ServerConfig, rustls::Error> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let pem = |e: rustls::pki_types::pem::Error| rustls::Error::General(e.to_string());
        let provider = crate::provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).map_err(pem)?)?;
                builder.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(
                        std::sync::Arc::new(roots),
                        provider,
                    )
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?,
                )
            }
            None => builder.with_no_client_auth(),
        };
        builder.with_single_cert(
            vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(pem)?],
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(pem)?,
        )
    }
}

/// A development certificate authority.
#[derive(Debug)]
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    next_serial: AtomicU64,
}

fn name(cn: &str, org: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "BE");
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    dn
}

impl DevCa {
    /// A new CA valid from yesterday for ten years.
    pub fn new(cn: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(cn, "FSP development PKI");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        params.serial_number = Some(SerialNumber::from(1u64));
        params.key_identifier_method = KeyIdMethod::Sha256;
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        // Serials unique across CAs made in one process, so CRL tests never collide.
        let seed = (now.unix_timestamp_nanos() as u64) & 0x0000_ffff_ffff_0000;
        Ok(Self {
            issuer,
            next_serial: AtomicU64::new(seed | 2),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(
        &self,
        cn: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
        validity: (OffsetDateTime, OffsetDateTime),
    ) -> Result<Issued, Error> {
        self.issue_to(name(cn, "FSP development PKI"), sans, usage, validity)
    }

    /// An end-entity certificate for `subject`, signed by this CA.
    fn issue_to(
        &self,
        subject: DistinguishedName,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
        validity: (OffsetDateTime, OffsetDateTime),
    ) -> Result<Issued, Error> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.not_before = validity.0;
        params.not_after = validity.1;
        params.use_authority_key_identifier_extension = true;
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            serial,
        })
    }

    fn default_validity() -> (OffsetDateTime, OffsetDateTime) {
        let now = OffsetDateTime::now_utc();
        (now - Duration::days(1), now + Duration::days(365))
    }

    /// A TLS server certificate for the given DNS names and IP addresses.
    pub fn server(&self, names: &[&str]) -> Result<Issued, Error> {
        let cn = names.first().copied().unwrap_or("localhost");
        self.issue(
            cn,
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            Self::default_validity(),
        )
    }

    /// A client certificate whose subject CN is `cn`.
    pub fn client(&self, cn: &str) -> Result<Issued, Error> {
        self.issue(
            cn,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            Self::default_validity(),
        )
    }

    /// A client certificate valid only between the two instants (for expiry tests).
    pub fn client_valid(
        &self,
        cn: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, Error> {
        self.issue(
            cn,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            (not_before, not_after),
        )
    }

    /// A client certificate whose subject holds two CN attributes, `first` then
    /// `second` (a name some CAs issue; rcgen keeps one value per type, so the second is
    /// written as a custom type with the CN's own OID, 2.5.4.3).
    pub fn client_with_two_cns(&self, first: &str, second: &str) -> Result<Issued, Error> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "BE");
        dn.push(DnType::CommonName, first);
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 3]), second);
        self.issue_to(
            dn,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            Self::default_validity(),
        )
    }

    /// A server certificate for `names` valid only between the two instants.
    pub fn server_valid(
        &self,
        names: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, Error> {
        let cn = names.first().copied().unwrap_or("localhost");
        self.issue(
            cn,
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            (not_before, not_after),
        )
    }

    /// A CRL, valid for a week, revoking the given serials.
    pub fn crl(&self, revoked: &[u64]) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        self.crl_valid(revoked, now - Duration::minutes(5), now + Duration::days(7))
    }

    /// A CRL revoking the given serials, issued at `this_update` and to be replaced by
    /// `next_update` (in the past, for a stale CRL).
    pub fn crl_valid(
        &self,
        revoked: &[u64],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: this_update,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer)?.pem()
    }
}

/// A development token-signing key (ECDSA P-256, for ES256 JWTs).
pub struct SigningKey {
    /// The private key, PKCS#8 PEM.
    pub private_pem: String,
    /// The public point's coordinates (32 bytes each), as a JWK's `x` and `y` carry them.
    pub x: Vec<u8>,
    pub y: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    // The private key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn generate() -> Result<Self, Error> {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        // Uncompressed point: 0x04, then x and y.
        let raw = pair.public_key_raw();
        match (raw.first(), raw.get(1..33), raw.get(33..65)) {
            (Some(4), Some(x), Some(y)) if raw.len() == 65 => Ok(Self {
                private_pem: pair.serialize_pem(),
                x: x.to_vec(),
                y: y.to_vec(),
            }),
            // Not a P-256 point as rcgen documents it.
            _ => Err(Error::KeyGenerationUnavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn issued_certificates_load_and_carry_their_cn() {
        let ca = DevCa::new("Test CA").unwrap();
        let client = ca.client("app.example.be").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.pem");
        std::fs::write(&p, &client.cert_pem).unwrap();
        let certs = crate::load::certificates(&p).unwrap();
        let id = crate::certificate_identity(&certs[0]);
        assert_eq!(id.cn.as_deref(), Some("app.example.be"));
        assert_eq!(id.sha256, crate::sha256(&client.der));
        let crl = ca.crl(&[client.serial]).unwrap();
        let crl_path = dir.path().join("c.crl");
        std::fs::write(&crl_path, crl).unwrap();
        assert_eq!(crate::load::crls(&[crl_path]).unwrap().len(), 1);
    }

    #[test]
    fn loading_reports_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.pem");
        std::fs::write(&p, "not a certificate").unwrap();
        let err = crate::load::certificates(&p).unwrap_err().to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
        let err = crate::load::private_key(&dir.path().join("missing.key"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing.key") && err.contains("cannot read"),
            "{err}"
        );
    }
}
