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
    use std::io::Read;
    // Checked before opening: a device is not opened at all (opening some has effects).
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = open_regular(path)?;
    let mut out = Vec::new();
    file.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} MiB", max >> 20),
        ));
    }
    Ok(out)
}

fn not_regular() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")
}

/// Opens `path` for reading if it is a regular file: without blocking and without taking
/// a terminal, then checked, since the path may have been swapped after a check for a
/// named pipe (whose opening would wait for a writer) or a device. On a regular file the
/// flags change nothing.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    Ok(file)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A path swapped for a named pipe after it was checked is refused at the open, at
    /// once: the open does not wait for a writer (without a writer, a blocking open
    /// never returns, and this test would hang).
    #[test]
    fn a_named_pipe_reached_after_the_check_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = dir.path().join("swapped.pem");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &pipe,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .unwrap();
        let refused = open_regular(&pipe).expect_err("a pipe is not a regular file");
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput);
        let regular = dir.path().join("ok.pem");
        std::fs::write(&regular, b"x").unwrap();
        assert_eq!(read_regular_file(&regular, 16).unwrap(), b"x");
        assert!(read_regular_file(&regular, 0).is_err());
    }
}
