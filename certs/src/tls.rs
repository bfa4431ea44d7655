//! rustls configurations for both sides of the gateway.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::load::{self, CertError};

/// The files behind the consumer-facing listener.
#[derive(Clone, Debug)]
pub struct ServerFiles {
    /// Chain, leaf first.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Trust anchors for consumer certificates.
    pub client_ca: PathBuf,
    pub crls: Vec<PathBuf>,
}

fn roots(path: &Path) -> Result<RootCertStore, CertError> {
    let mut store = RootCertStore::empty();
    for cert in load::certificates(path)? {
        store
            .add(cert)
            .map_err(|e| CertError::new(path, format!("not usable as a trust anchor: {e}")))?;
    }
    Ok(store)
}

/// The listener's TLS configuration: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`.
///
/// A client certificate is optional at the TLS level (OAuth consumers may come without
/// one), but one that is presented must chain to `client_ca`, be within its validity and
/// not be revoked by the CRLs; otherwise the handshake fails. A CRL past its nextUpdate
/// proves nothing any more (a certificate revoked since is not in it): the certificates
/// it covers are refused until a fresh one is in place, as OpenSSL does ("CRL has
/// expired").
pub fn server_config(files: &ServerFiles) -> Result<ServerConfig, CertError> {
    listener_tls(files).map(|tls| Arc::unwrap_or_clone(tls.config))
}

/// The consumer listener's TLS: its rustls configuration and the verifier that checks
/// client certificates in its handshakes, kept so that the certificate of a connection
/// opened earlier can be checked again (against today's date, and against the CAs and
/// CRLs of a later reload): a handshake, or a session resumed from it, checked it once.
#[derive(Debug)]
pub struct ListenerTls {
    pub config: Arc<ServerConfig>,
    pub clients: Arc<dyn ClientCertVerifier>,
    /// The earliest nextUpdate of its CRLs, in seconds since the Unix epoch (`i64::MAX`
    /// without CRLs): from then on, a certificate it accepted earlier must be checked
    /// again, since the CRL that covered it may no longer vouch for it.
    pub crls_fresh_before: i64,
}

/// [`server_config`] with its client certificate verifier.
pub fn listener_tls(files: &ServerFiles) -> Result<ListenerTls, CertError> {
    let chain = load::certificates(&files.server_cert)?;
    let key = load::private_key(&files.server_key)?;
    let client_roots = roots(&files.client_ca)?;
    let crl_path = files
        .crls
        .first()
        .map_or(files.client_ca.as_path(), |p| p.as_path());
    let (verifier, crls_fresh_before) =
        client_verifier(client_roots, &files.crls, false, crl_path)?;
    let mut config = ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::new(&files.server_cert, e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|e| key_mismatch(files, &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ListenerTls {
        config: Arc::new(config),
        clients: verifier,
        crls_fresh_before,
    })
}

/// The one way client certificates are verified, on the consumer listener and on the
/// admin listener: chaining to `anchors`, within validity, not revoked by the CRLs of
/// `crl_files`, and refused when the CRL that covers them is past its nextUpdate (a stale
/// CRL proves nothing: a certificate revoked since is not in it; rustls' default would
/// ignore the date). `unknown_ok`: a certificate no CRL covers is accepted (otherwise,
/// once CRLs are configured, it is refused). A verifier that cannot be built is blamed
/// on `blame`. Also returns the earliest nextUpdate of the CRLs (`i64::MAX` without one).
fn client_verifier(
    anchors: RootCertStore,
    crl_files: &[PathBuf],
    unknown_ok: bool,
    blame: &Path,
) -> Result<(Arc<dyn ClientCertVerifier>, i64), CertError> {
    let crls = load::crls(crl_files)?;
    let fresh_before = crls
        .iter()
        .filter_map(|der| x509_parser::parse_x509_crl(der).ok())
        .filter_map(|(_, crl)| crl.next_update().map(|t| t.timestamp()))
        .min()
        .unwrap_or(i64::MAX);
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(anchors), crate::provider())
            .with_crls(crls)
            .enforce_revocation_expiration()
            .allow_unauthenticated();
    if unknown_ok {
        builder = builder.allow_unknown_revocation_status();
    }
    let verifier = builder
        .build()
        .map_err(|e| CertError::new(blame, format!("cannot build the client verifier: {e}")))?;
    Ok((verifier, fresh_before))
}

/// Whether a client certificate chain (leaf first) is still accepted by `verifier` at
/// `now`: within its validity, chaining to its anchors, not revoked by its CRLs.
pub fn client_chain_accepted(
    verifier: &dyn ClientCertVerifier,
    chain: &[rustls_pki_types::CertificateDer<'static>],
    now: rustls_pki_types::UnixTime,
) -> bool {
    match chain.split_first() {
        Some((leaf, intermediates)) => verifier
            .verify_client_cert(leaf, intermediates, now)
            .is_ok(),
        None => false,
    }
}

/// The server key that rustls would not pair with the server certificate.
fn key_mismatch(files: &ServerFiles, e: &rustls::Error) -> CertError {
    CertError::new(
        &files.server_key,
        format!(
            "does not match the certificate in {}: {e}",
            files.server_cert.display()
        ),
    )
}

/// The admin listener's TLS configuration: the listener's certificate, TLS 1.2 and 1.3,
/// HTTP/1.1 only.
///
/// `admin_roots`: trust anchors for administrators' client certificates (checked against
/// the listener's CRLs too, with the same refusal of a CRL past its nextUpdate). A
/// client certificate is then optional at the TLS level (an administrator may come with
/// a bearer token instead), but one that is presented must chain to these anchors;
/// which CNs are administrators is decided per request. `None`: no client certificate
/// is asked for.
pub fn admin_server_config(
    files: &ServerFiles,
    admin_roots: Option<&Path>,
) -> Result<ServerConfig, CertError> {
    admin_tls(files, admin_roots).map(|tls| tls.config)
}

/// The admin listener's TLS: its rustls configuration and, when it asks for client
/// certificates, the verifier that checks them, kept so that an administrator's
/// certificate can be checked again on a connection opened earlier (a CRL may pass its
/// nextUpdate while the connection stays open).
#[derive(Debug)]
pub struct AdminTls {
    pub config: ServerConfig,
    pub clients: Option<Arc<dyn ClientCertVerifier>>,
    /// As [`ListenerTls::crls_fresh_before`].
    pub crls_fresh_before: i64,
}

/// [`admin_server_config`] with its client certificate verifier.
pub fn admin_tls(files: &ServerFiles, admin_roots: Option<&Path>) -> Result<AdminTls, CertError> {
    let chain = load::certificates(&files.server_cert)?;
    let key = load::private_key(&files.server_key)?;
    let builder = ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::new(&files.server_cert, e.to_string()))?;
    let mut clients = None;
    let mut crls_fresh_before = i64::MAX;
    let builder = match admin_roots {
        Some(path) => {
            // The listener's CRLs are the consumers' CAs': an administrators' own CA
            // they do not cover is not refused for that (a certificate a listed CRL
            // does cover is still checked against it).
            let own_ca = path != files.client_ca;
            let (verifier, fresh_before) =
                client_verifier(roots(path)?, &files.crls, own_ca, path)?;
            clients = Some(verifier.clone());
            crls_fresh_before = fresh_before;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| key_mismatch(files, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(AdminTls {
        config,
        clients,
        crls_fresh_before,
    })
}

/// The TLS configuration towards one provider.
///
/// `upstream_ca`: trust anchors for the provider's server certificate (the system's when
/// absent). `client`: FSP's own certificate chain and key, presented to the provider.
pub fn upstream_config(
    upstream_ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<ClientConfig, CertError> {
    let roots = match upstream_ca {
        Some(path) => roots(path)?,
        None => {
            let mut store = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(native.certs);
            store
        }
    };
    let builder = ClientConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::new(Path::new("(upstream TLS)"), e.to_string()))?
        .with_root_certificates(roots);
    match client {
        Some((cert, key)) => {
            let chain = load::certificates(cert)?;
            let key_der = load::private_key(key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| CertError::new(key, format!("does not match {}: {e}", cert.display())))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rustls_pki_types::UnixTime;
    use time::{Duration, OffsetDateTime};

    use super::*;
    use crate::devpki::DevCa;

    fn at(t: OffsetDateTime) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(t.unix_timestamp() as u64))
    }

    /// A CRL past its nextUpdate no longer vouches for the certificates it covers: they
    /// are refused (the admin listener's verifier is made by the same function), where
    /// rustls' default ignores the date.
    #[test]
    fn a_crl_past_its_next_update_refuses_the_certificates_it_covers() {
        let ca = DevCa::new("Stale CRL CA").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let server = ca.server(&["localhost"]).unwrap();
        let client = ca.client("app.example.be").unwrap();
        let now = OffsetDateTime::now_utc();
        let files = ServerFiles {
            server_cert: dir.path().join("server.pem"),
            server_key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.pem"),
            crls: vec![dir.path().join("c.crl")],
        };
        std::fs::write(&files.server_cert, &server.cert_pem).unwrap();
        std::fs::write(&files.server_key, &server.key_pem).unwrap();
        std::fs::write(&files.client_ca, ca.cert_pem()).unwrap();
        let crl = ca
            .crl_valid(&[], now - Duration::hours(1), now + Duration::hours(1))
            .unwrap();
        std::fs::write(&files.crls[0], crl).unwrap();
        let listener = listener_tls(&files).unwrap();
        assert_eq!(
            listener.crls_fresh_before,
            (now + Duration::hours(1)).unix_timestamp()
        );
        let chain = [rustls_pki_types::CertificateDer::from(client.der.clone())];
        assert!(client_chain_accepted(&*listener.clients, &chain, at(now)));
        assert!(!client_chain_accepted(
            &*listener.clients,
            &chain,
            at(now + Duration::hours(2))
        ));
    }
}
