//! # Policy: who is calling, and may they?
//!
//! This crate holds the platform's knowledge of its *consumers* (the applications of
//! public bodies that call services) and of the *authorisations* that let them call a
//! service for a purpose on a legal basis. It does no I/O: the gateway hands it what it
//! learned from the connection (a certificate's CN and fingerprint, an OAuth client id)
//! and gets back a consumer or a typed refusal.
//!
//! - [`consumer`]: consumers and identification from credentials.
//! - [`authorisation`]: legal bases and authorisations as declared;
//! - [`decision`]: the one function that decides a call.

pub mod authorisation;
pub mod consumer;
pub mod decision;

pub use authorisation::{Authorisation, LegalBasis, LegalBasisKind};
pub use consumer::{
    CertificateIdentity, Consumer, ConsumerSpec, Consumers, ConsumersError, Credential,
    CredentialView, IdentityError, Sha256,
};
pub use decision::{Ask, Authorisations, Denial, NoSuspensions, Suspensions, decide};
