//! # Certificates and TLS identity
//!
//! Everything the gateway knows about X.509 lives here:
//!
//! - [`load`]: reading PEM certificates, keys and CRLs, with errors that name the file;
//! - [`tls`]: the rustls configurations: the consumer-facing server (client certificates
//!   optional at the TLS level but, when presented, verified against the consumer CAs and
//!   CRLs) and the upstream clients (provider CA, FSP's own client certificate);
//! - [`identity`]: the subject CN and SHA-256 fingerprint of a verified client certificate;
//! - [`inventory`]: subject, fingerprint and expiry of every certificate a config uses;
//! - [`devpki`]: a throw-away PKI for the quickstart and the tests.
//!
//! One crypto provider serves the whole gateway: aws-lc-rs ([`provider`]).

use std::sync::Arc;

pub mod devpki;
pub mod identity;
pub mod inventory;
pub mod load;
pub mod tls;

pub use identity::{certificate_identity, sha256};
pub use load::CertError;

/// The crypto provider used for every TLS configuration of the gateway.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
