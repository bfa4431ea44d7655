//! Reading PEM files. Every error names the file and says what was wrong with it.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// A certificate, key or CRL file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct CertError {
    pub path: PathBuf,
    pub reason: String,
}

impl CertError {
    pub fn new(path: &Path, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    // A large CA's CRL can run to tens of megabytes.
    read_regular_file(path, 256 << 20)
        .map_err(|e| CertError::new(path, format!("cannot read file: {e}")))
}

/// Reads a configuration file, certificate, key or list: a regular file (not a device,
/// a pipe or a directory, which could block or never end) of at most `max` bytes.
pub fn read_regular_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    // Opened without blocking: opening a named pipe for reading would otherwise wait for
    // a writer (and a path checked first could be swapped for a pipe before the open).
    // On a regular file the flag changes nothing.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut out = Vec::new();
    file.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {} MiB", max >> 20),
        ));
    }
    Ok(out)
}

/// Every certificate in a PEM file, in file order (for a chain: leaf first).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::new(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CertError::new(
            path,
            "holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c).map_err(|e| {
            CertError::new(
                path,
                format!("certificate #{} is not valid X.509: {e}", i + 1),
            )
        })?;
    }
    Ok(certs)
}

/// The one private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        CertError::new(
            path,
            format!("holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })
}

/// Every CRL in the given PEM files.
pub fn crls(paths: &[PathBuf]) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let mut out = Vec::new();
    for path in paths {
        let pem = read(path)?;
        let found = CertificateRevocationListDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::new(path, format!("not a valid PEM CRL: {e}")))?;
        if found.is_empty() {
            return Err(CertError::new(
                path,
                "holds no PEM CRL (expected -----BEGIN X509 CRL-----)",
            ));
        }
        out.extend(found);
    }
    Ok(out)
}
