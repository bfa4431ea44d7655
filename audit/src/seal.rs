//! Signed heads and anchors: what the hash chain alone cannot show.
//!
//! The chain (see [`crate::chain`]) has no secret: whoever can write the trail (a
//! database administrator, a backup operator, anyone with the volume) can alter a
//! record and compute every later hash again, head and anchor included, and `verify`
//! passes. With `[audit] signing_key`, the writer signs each node's head (its last
//! record, rewritten about once a second and at a clean stop) and each anchor (where
//! the chain goes on after retention) with an Ed25519 key the trail's readers do not
//! hold. A record altered, removed or inserted before the head then changes every
//! later hash, the signed head no longer matches its chain, and no one without the key
//! can sign one that does. `verify` checks the signatures with the public keys it
//! trusts (the signing key's, `[audit] verify_keys`, `--public-key`): an unsigned head
//! or anchor, or one signed by another key, is a break.
//!
//! What a signature covers is [`message`]: a label naming what is signed, then each
//! field as its length (4 bytes, big-endian) and its bytes, so that no two different
//! heads have the same message.

use aws_lc_rs::digest;

use crate::chain::hex;
use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the algorithm
/// identifier and the bit string's header; the 32 bytes of the key follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The writer's key: signs heads and anchors.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    id: String,
    /// The key as it was read (PKCS#8 PEM), for [`SigningKey::pkcs8_pem`].
    pem: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("id", &self.id).finish()
    }
}

/// A signature and the key that made it, as heads and anchors carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    /// The signing key's id (see [`key_id`]).
    pub key: String,
    /// The Ed25519 signature, lower-case hex.
    pub signature: String,
}

impl SigningKey {
    /// An Ed25519 private key in PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), as
    /// `openssl genpkey -algorithm ed25519` writes it.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| {
            format!("holds no PKCS#8 PEM private key (-----BEGIN PRIVATE KEY-----): {e}")
        })?;
        let pair = Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der())
            .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der()))
            .map_err(|_| {
                "is not an Ed25519 private key (make one with `openssl genpkey -algorithm ed25519`)"
                    .to_owned()
            })?;
        let id = key_id(pair.public_key().as_ref());
        let pem = pem_text("PRIVATE KEY", der.secret_pkcs8_der());
        Ok(Self { pair, id, pem })
    }

    /// A new random key (tests, and tools that make one).
    pub fn generate() -> Result<(Self, Vec<u8>), String> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|_| "cannot generate an Ed25519 key".to_owned())?;
        let pem = pem_text("PRIVATE KEY", pkcs8.as_ref());
        Ok((Self::from_pem(pem.as_bytes())?, pem.into_bytes()))
    }

    /// The private key as PKCS#8 PEM (to write a key made by [`SigningKey::generate`]).
    pub fn pkcs8_pem(&self) -> String {
        self.pem.clone()
    }

    /// The key's id: the first 16 hex digits of the SHA-256 of its public key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public key as a PEM SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`), as
    /// `openssl pkey -pubout` writes it: what auditors are given.
    pub fn public_pem(&self) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.pair.public_key().as_ref());
        pem_text("PUBLIC KEY", &der)
    }

    /// Signs `fields` under `label` (see [`message`]).
    pub fn seal(&self, label: &str, fields: &[&str]) -> Seal {
        let sig = self.pair.sign(&message(label, fields));
        Seal {
            key: self.id.clone(),
            signature: hex(sig.as_ref()),
        }
    }

    /// The public half, trusted.
    pub fn trusted(&self) -> PublicKey {
        PublicKey {
            id: self.id.clone(),
            raw: self.pair.public_key().as_ref().to_vec(),
        }
    }
}

/// A public key `verify` trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    id: String,
    raw: Vec<u8>,
}

impl PublicKey {
    /// An Ed25519 public key in PEM (`-----BEGIN PUBLIC KEY-----`, as `openssl pkey
    /// -pubout` writes it), or the private key's PEM, whose public half is taken.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        if let Ok(der) = SubjectPublicKeyInfoDer::from_pem_slice(pem) {
            let raw = der
                .as_ref()
                .strip_prefix(&ED25519_SPKI_PREFIX[..])
                .filter(|k| k.len() == 32)
                .ok_or_else(|| "is not an Ed25519 public key".to_owned())?;
            return Ok(Self {
                id: key_id(raw),
                raw: raw.to_vec(),
            });
        }
        SigningKey::from_pem(pem)
            .map(|k| k.trusted())
            .map_err(|_| {
                "holds no Ed25519 public key (-----BEGIN PUBLIC KEY-----, as `openssl pkey -pubout` writes it)"
                    .to_owned()
            })
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The keys `verify` accepts signatures from. Empty: signatures are not required (and
/// not checked).
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        let mut out = Self::default();
        for k in keys {
            if !out.keys.contains(&k) {
                out.keys.push(k);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// The ids of the keys, for what `verify` prints.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Checks `seal` over `fields` under `label`. `Ok` when no key is trusted (nothing
    /// required), else the seal must be there and verify with the key it names.
    pub fn check(
        &self,
        seal: Option<&Seal>,
        label: &str,
        fields: &[&str],
    ) -> Result<(), SealError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let Some(seal) = seal else {
            return Err(SealError::Unsigned);
        };
        let Some(key) = self.keys.iter().find(|k| k.id == seal.key) else {
            return Err(SealError::UntrustedKey {
                key: seal.key.clone(),
                trusted: self.ids().join(", "),
            });
        };
        let sig = unhex(&seal.signature).ok_or(SealError::Malformed)?;
        UnparsedPublicKey::new(&signature::ED25519, &key.raw)
            .verify(&message(label, fields), &sig)
            .map_err(|_| SealError::Altered {
                key: seal.key.clone(),
            })
    }
}

/// Why a head or an anchor is not signed by a trusted key (each reads after its name:
/// "head-n.json is not signed, ...").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealError {
    /// Written without a key (before one was set), or stripped.
    Unsigned,
    /// Signed by a key not trusted: an earlier key missing from `verify_keys`, or a key
    /// of someone else's.
    UntrustedKey { key: String, trusted: String },
    /// A signature that is not one.
    Malformed,
    /// Signed by a trusted key, and changed since: tampering, never a mistake.
    Altered { key: String },
}

impl SealError {
    /// Whether this is evidence of tampering (a trusted key's signature that does not
    /// fit), which no operator should sign over, rather than a trail written without
    /// the key or with another one.
    pub fn is_tampering(&self) -> bool {
        matches!(self, SealError::Malformed | SealError::Altered { .. })
    }
}

impl std::fmt::Display for SealError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SealError::Unsigned => write!(f, "is not signed, and a signing key is trusted"),
            SealError::UntrustedKey { key, trusted } => write!(
                f,
                "is signed by key {key}, which is not trusted (trusted: {trusted})"
            ),
            SealError::Malformed => write!(f, "has a malformed signature: it was altered"),
            SealError::Altered { key } => write!(
                f,
                "has a signature by key {key} that does not match what it says: it was altered after it was signed"
            ),
        }
    }
}

/// What an operator is told to do about a head or an anchor a writer will not start on
/// (`why`: `None` when it is missing), for the trail named `what`.
pub fn advice(why: Option<&SealError>, what: &str) -> String {
    if why.is_some_and(SealError::is_tampering) {
        format!(
            "{what} was changed after the gateway signed it: this is the mark of tampering. Do not run `fsp audit seal` over it: compare the trail with its backups, and keep it as evidence"
        )
    } else {
        format!(
            "{what} may have been altered while the gateway was stopped, or was written without this key. Run `fsp audit verify`; once the trail is accounted for, `fsp audit seal` signs its heads and anchors with the configured key, and the gateway writes on"
        )
    }
}

/// A writer's signing: the key it signs heads and anchors with, and the keys whose
/// signatures it accepts on the ones it finds when it starts (its own and earlier ones).
/// Without a key, nothing is signed or required.
#[derive(Debug, Clone, Default)]
pub struct Seals {
    pub key: Option<std::sync::Arc<SigningKey>>,
    pub trusted: TrustedKeys,
}

impl Seals {
    /// Signs with `key`; accepts its signatures and those of `earlier` keys.
    pub fn new(key: SigningKey, earlier: impl IntoIterator<Item = PublicKey>) -> Self {
        let trusted = TrustedKeys::new(std::iter::once(key.trusted()).chain(earlier));
        Self {
            key: Some(std::sync::Arc::new(key)),
            trusted,
        }
    }

    /// Whether heads and anchors must be signed.
    pub fn required(&self) -> bool {
        !self.trusted.is_empty()
    }
}

/// What is signed: `label`, a zero byte, then each field as its length (4 bytes,
/// big-endian) followed by its bytes.
pub fn message(label: &str, fields: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + fields.iter().map(|f| f.len() + 4).sum::<usize>());
    out.extend_from_slice(b"fsp-audit-seal-v1:");
    out.extend_from_slice(label.as_bytes());
    out.push(0);
    for f in fields {
        out.extend_from_slice(&u32::try_from(f.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(f.as_bytes());
    }
    out
}

/// A key's id: the first 16 hex digits of the SHA-256 of its 32 raw bytes.
fn key_id(raw: &[u8]) -> String {
    let mut id = hex(digest::digest(&digest::SHA256, raw).as_ref());
    id.truncate(16);
    id
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 256 {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16);
            Some((d(p[0])? * 16 + d(p[1])?) as u8)
        })
        .collect()
}

fn pem_text(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_seal_verifies_with_its_key_only_and_over_its_fields_only() {
        let (key, pem) = SigningKey::generate().unwrap();
        let again = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(key.id(), again.id());
        let public = PublicKey::from_pem(key.public_pem().as_bytes()).unwrap();
        assert_eq!(public, key.trusted());
        let trusted = TrustedKeys::new([public]);
        let seal = key.seal("head", &["n1", "abc"]);
        trusted.check(Some(&seal), "head", &["n1", "abc"]).unwrap();
        // Another field, another label, fields moved across the boundary: refused.
        for (label, fields) in [
            ("head", &["n1", "abd"][..]),
            ("anchor", &["n1", "abc"][..]),
            ("head", &["n1a", "bc"][..]),
        ] {
            let e = trusted.check(Some(&seal), label, fields).unwrap_err();
            assert!(e.is_tampering() && e.to_string().contains("altered"), "{e}");
        }
        // No seal, or one by another key: refused while a key is trusted.
        assert_eq!(
            trusted.check(None, "head", &["n1"]).unwrap_err(),
            SealError::Unsigned
        );
        let (other, _) = SigningKey::generate().unwrap();
        let e = trusted
            .check(
                Some(&other.seal("head", &["n1", "abc"])),
                "head",
                &["n1", "abc"],
            )
            .unwrap_err();
        assert!(
            !e.is_tampering() && e.to_string().contains("not trusted"),
            "{e}"
        );
        // A forged key id with the other key's signature: still refused.
        let mut forged = other.seal("head", &["n1", "abc"]);
        forged.key = key.id().to_owned();
        assert!(
            trusted
                .check(Some(&forged), "head", &["n1", "abc"])
                .is_err()
        );
        // Nothing trusted: nothing required.
        TrustedKeys::default().check(None, "head", &[]).unwrap();
    }

    /// The keys `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write
    /// (PKCS#8 v1 without the public key; SPKI) are read.
    #[test]
    fn openssl_pem_keys_are_read() {
        // A test vector made by openssl for this test, never used to sign a trail.
        let private = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIMB4B3Y+xSuNZHgKb/xgXHSsMy+HnWMqBj12O1onmWnd\n-----END PRIVATE KEY-----\n";
        let openssl_public = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA6QnBPebyNfvYEXquWa3qQLIFZY7QDTeUh4sf4kuatQ4=\n-----END PUBLIC KEY-----\n";
        let key = SigningKey::from_pem(private.as_bytes()).unwrap();
        let public = PublicKey::from_pem(openssl_public.as_bytes()).unwrap();
        assert_eq!(public.id(), key.id());
        assert_eq!(key.public_pem(), openssl_public);
        // A private key given where a public one is expected: its public half.
        assert_eq!(PublicKey::from_pem(private.as_bytes()).unwrap(), public);
        assert!(SigningKey::from_pem(b"not a key").is_err());
        assert!(
            PublicKey::from_pem(b"-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n")
                .is_err()
        );
    }
}
