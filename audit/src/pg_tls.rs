//! TLS to the audit database, with libpq's URL parameters: `sslmode` (`disable`,
//! `prefer`: no TLS from this gateway; `require`, `verify-ca`, `verify-full`: TLS, or no
//! connection), `sslrootcert` (the PEM trust anchors of the server's certificate; the
//! system's when absent, or when it is `system`), and `sslcert` with `sslkey` (a client
//! certificate, for PostgreSQL's `cert` authentication or `clientcert=verify-full`).
//!
//! Stricter than libpq in one place: libpq's `require` checks no certificate at all
//! (anyone on the path can read and change the trail); here `require` checks the
//! server's certificate chain as `verify-ca` does. `verify-full` also checks that the
//! certificate names the host of the URL, and so do `require` and `verify-ca` when the
//! trust anchors are the system's (as libpq does with `sslrootcert=system`): any public
//! CA would vouch for a certificate of someone else's domain.
//!
//! The parameters are taken out of the URL before the `postgres` crate reads it (it
//! knows only `disable`, `prefer` and `require`); the connection is then made with the
//! gateway's own rustls (the same cryptography as every other TLS it speaks).

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How far the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Its chain, to the trust anchors (`require`, `verify-ca`).
    Chain,
    /// Its chain, and that it names the host connected to (`verify-full`).
    ChainAndName,
}

/// A database URL with the TLS parameters taken out.
#[derive(Clone)]
pub struct Target {
    /// The URL the `postgres` crate reads (`sslmode=require` when TLS is used).
    pub url: String,
    /// The TLS configuration, when the URL asks for TLS.
    pub tls: Option<Arc<ClientConfig>>,
    pub check: Option<Check>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("tls", &self.tls.is_some())
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}

/// The TLS parameters of `url` (see the module documentation), their files read: an
/// error says which parameter or file is wrong, in words for an operator.
pub fn target(url: &str) -> Result<Target, String> {
    // The `postgres` crate takes the credentials up to the first `@`: a `?` in a
    // password is not the query's.
    let after_credentials = url.find('@').map_or(0, |at| at + 1);
    let (base, query) = match url[after_credentials..].find('?') {
        Some(q) => (
            &url[..after_credentials + q],
            &url[after_credentials + q + 1..],
        ),
        None => (url, ""),
    };
    let mut kept: Vec<&str> = Vec::new();
    let mut mode: Option<String> = None;
    let mut root: Option<String> = None;
    let mut cert: Option<String> = None;
    let mut key: Option<String> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || percent_decode(v);
        // A file named in a URL is read wherever the gateway runs: named absolutely.
        let file = || {
            let path = value()?;
            if path == "system" || Path::new(&path).is_absolute() {
                Ok(path)
            } else {
                Err(format!("{k}={path} must be an absolute path"))
            }
        };
        match k {
            "sslmode" => mode = Some(value()?),
            "sslrootcert" => root = Some(file()?),
            "sslcert" => cert = Some(file()?),
            "sslkey" => key = Some(file()?),
            _ => kept.push(pair),
        }
    }
    let check = match mode.as_deref() {
        None | Some("disable" | "prefer") => None,
        Some("require" | "verify-ca") => Some(Check::Chain),
        Some("verify-full") => Some(Check::ChainAndName),
        Some(other) => {
            return Err(format!(
                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            ));
        }
    };
    let Some(mut check) = check else {
        if root.is_some() || cert.is_some() || key.is_some() {
            return Err(
                "sslrootcert, sslcert and sslkey take effect only with sslmode=require, verify-ca or verify-full"
                    .into(),
            );
        }
        if let Some(m) = &mode {
            kept.push(if m == "disable" {
                "sslmode=disable"
            } else {
                "sslmode=prefer"
            });
        }
        return Ok(Target {
            url: join(base, &kept),
            tls: None,
            check: None,
        });
    };
    // The `postgres` crate's part: TLS or no connection.
    kept.push("sslmode=require");
    let roots = match root.as_deref() {
        None | Some("system") => {
            // Any public CA issues certificates for anybody's own domain: trusting them,
            // only the name tells the database from someone on the path (libpq forces
            // verify-full with sslrootcert=system for the same reason).
            check = Check::ChainAndName;
            let mut store = RootCertStore::empty();
            store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if store.is_empty() {
                return Err("no sslrootcert given and the system has no CA certificates: give sslrootcert=/path/to/ca.pem".into());
            }
            store
        }
        Some(path) => {
            let mut store = RootCertStore::empty();
            for c in certificates(Path::new(path), "sslrootcert")? {
                store.add(c).map_err(|e| {
                    format!(
                        "sslrootcert {path}: a certificate is not usable as a trust anchor: {e}"
                    )
                })?;
            }
            store
        }
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("sslrootcert: cannot check the server's certificate with it: {e}"))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier {
            inner: verifier,
            check,
        }));
    let config = match (cert, key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = certificates(Path::new(&cert), "sslcert")?;
            let key = certs::load::private_key(Path::new(&key))
                .map_err(|e| format!("sslkey {}: {}", e.path.display(), e.reason))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert and sslkey do not make a client certificate: {e}"))?
        }
        _ => return Err("sslcert and sslkey go together: give both, or neither".into()),
    };
    Ok(Target {
        url: join(base, &kept),
        tls: Some(Arc::new(config)),
        check: Some(check),
    })
}

/// The PEM certificates of `path` (at least one, read as every file the configuration
/// names: a regular file of bounded size), named `what` in errors.
fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    certs::load::certificates(path)
        .map_err(|e| format!("{what} {}: {}", e.path.display(), e.reason))
}

fn join(base: &str, pairs: &[&str]) -> String {
    if pairs.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", pairs.join("&"))
    }
}

/// `%XX` decoded (a path in a URL may have them); `+` is kept as it is.
fn percent_decode(v: &str) -> Result<String, String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("the URL parameter value {v:?} has a bad % escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the URL parameter value {v:?} is not UTF-8"))
}

/// The server certificate check of `require` and `verify-ca` (the chain only) and of
/// `verify-full` (the chain and the host name), with the TLS signatures checked as
/// always.
#[derive(Debug)]
struct Verifier {
    inner: Arc<WebPkiServerVerifier>,
    check: Check,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // The chain is checked before the name: a certificate refused only for its
            // name has a good chain.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Makes TLS connections to the database with a [`Target`]'s configuration.
#[derive(Clone, Debug)]
pub struct MakeRustls(pub Arc<ClientConfig>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Connect, io::Error> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{domain}: {e}")))?;
        Ok(Connect {
            connector: tokio_rustls::TlsConnector::from(self.0.clone()),
            name,
        })
    }
}

/// One TLS connection about to be made.
#[allow(missing_debug_implementations)]
pub struct Connect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            self.connector
                .connect(self.name, stream)
                .await
                .map(|s| Stream(Box::new(s)))
        })
    }
}

/// A TLS connection to the database.
#[derive(Debug)]
pub struct Stream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // Not offered: the server's certificate is checked, and SCRAM without channel
        // binding is what every client without it does.
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn plain_urls_are_left_as_they_are_and_tls_parameters_taken_out() {
        let t = target("postgres://fsp@db/fsp").unwrap();
        assert_eq!(t.url, "postgres://fsp@db/fsp");
        assert!(t.tls.is_none());
        let t = target("postgres://fsp@db/fsp?sslmode=disable&connect_timeout=3").unwrap();
        assert_eq!(
            t.url,
            "postgres://fsp@db/fsp?connect_timeout=3&sslmode=disable"
        );
        assert!(t.tls.is_none());
        let t = target("postgres://fsp@db/fsp?sslmode=verify-full&connect_timeout=3").unwrap();
        assert_eq!(
            t.url,
            "postgres://fsp@db/fsp?connect_timeout=3&sslmode=require"
        );
        assert_eq!(t.check, Some(Check::ChainAndName));
        assert!(t.tls.is_some());
        assert_eq!(
            target("postgres://db/x?sslmode=require").unwrap().check,
            Some(Check::ChainAndName),
            "with the system's CAs, the name is checked whatever the mode"
        );
        // A `?` in the password is not the query's.
        let t = target("postgres://u:p?w@db/x?sslmode=disable").unwrap();
        assert_eq!(t.url, "postgres://u:p?w@db/x?sslmode=disable");
    }

    #[test]
    fn wrong_parameters_are_named() {
        let e = target("postgres://db/x?sslmode=allow").unwrap_err();
        assert!(e.contains("sslmode=allow"), "{e}");
        let e = target("postgres://db/x?sslrootcert=/x.pem").unwrap_err();
        assert!(e.contains("only with sslmode"), "{e}");
        let e = target("postgres://db/x?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
            .unwrap_err();
        assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
        let e = target("postgres://db/x?sslmode=verify-ca&sslcert=/a.pem").unwrap_err();
        assert!(e.contains("go together"), "{e}");
        let e = target("postgres://db/x?sslmode=verify-ca&sslrootcert=%zz").unwrap_err();
        assert!(e.contains("% escape"), "{e}");
        let e = target("postgres://db/x?sslmode=verify-ca&sslrootcert=pki/ca.pem").unwrap_err();
        assert!(e.contains("absolute"), "{e}");
    }
}
