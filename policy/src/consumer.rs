//! Consumers and how a credential identifies one.
//!
//! A consumer declares the certificates it calls with (by subject CN, optionally pinned
//! to one certificate by its SHA-256 fingerprint, or by fingerprint alone) and its OAuth
//! client ids. Each credential belongs to exactly one consumer: [`Consumers::new`] refuses
//! a registry where two consumers could claim the same caller.

// Keys come from the configuration (requests only look them up): a fast hash will do.
use foldhash::{HashMap, HashMapExt as _};
use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;

/// A SHA-256 digest, as used for certificate fingerprints.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// Parses 64 hex digits, optionally separated by `:` (as `openssl x509 -fingerprint`
    /// prints them).
    pub fn parse(s: &str) -> Option<Self> {
        let hexdigits: String = s.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&hexdigits, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

/// What the TLS layer learned about a client certificate that chained to a trusted CA.
#[derive(Clone, Debug)]
pub struct CertificateIdentity {
    pub cn: Option<String>,
    pub sha256: Sha256,
}

/// How a caller proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    Certificate { sha256: Sha256 },
    OAuth { client_id: String },
}

impl Credential {
    /// `certificate` or `oauth`, as in audit records.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Certificate { .. } => "certificate",
            Self::OAuth { .. } => "oauth",
        }
    }

    /// The certificate fingerprint or client id, as in audit records.
    pub fn id(&self) -> String {
        match self {
            Self::Certificate { sha256 } => sha256.to_string(),
            Self::OAuth { client_id } => client_id.clone(),
        }
    }
}

/// One certificate a consumer calls with.
#[derive(Clone, Debug, Default)]
pub struct CertificateSpec {
    pub cn: Option<String>,
    pub sha256: Option<Sha256>,
}

/// A consumer as declared.
#[derive(Clone, Debug, Default)]
pub struct ConsumerSpec {
    pub id: String,
    pub organisation: String,
    pub enterprise_number: Option<String>,
    pub certificates: Vec<CertificateSpec>,
    pub oauth_client_ids: Vec<String>,
    pub source_ips: Vec<IpNet>,
}

/// One credential of a consumer, as an administrator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialView {
    /// A client certificate: by subject CN (any certificate of the trusted CA with that
    /// CN, or only the pinned ones), or by pin alone.
    Certificate {
        cn: Option<String>,
        pins: Vec<Sha256>,
    },
    /// An OAuth2 client id.
    OAuth { client_id: String },
}

/// A validated consumer.
#[derive(Debug)]
pub struct Consumer {
    pub id: Arc<str>,
    pub organisation: String,
    pub enterprise_number: Option<String>,
    /// Empty: any address.
    pub source_ips: Vec<IpNet>,
}

/// Why a registry of consumers is inconsistent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumersError {
    #[error("consumer id {id} is declared more than once")]
    DuplicateId { id: String },
    #[error(
        "certificate CN {cn} is claimed by consumers {first} and {second}; a credential belongs to one consumer only"
    )]
    SharedCn {
        cn: String,
        first: String,
        second: String,
    },
    #[error(
        "certificate fingerprint {sha256} is claimed by consumers {first} and {second}; a credential belongs to one consumer only"
    )]
    SharedFingerprint {
        sha256: String,
        first: String,
        second: String,
    },
    #[error(
        "OAuth client id {client_id} is claimed by consumers {first} and {second}; a credential belongs to one consumer only"
    )]
    SharedClientId {
        client_id: String,
        first: String,
        second: String,
    },
    #[error("consumer {id}: a certificate entry needs a `cn`, a `sha256`, or both")]
    EmptyCertificate { id: String },
}

/// Why a credential does not identify a consumer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("the client certificate (CN {cn}, SHA-256 {sha256}) is not registered to any consumer")]
    UnknownCertificate { cn: String, sha256: Sha256 },
    #[error(
        "the client certificate CN {cn} is registered, but only for pinned certificates and this one (SHA-256 {sha256}) is not among them"
    )]
    PinMismatch { cn: String, sha256: Sha256 },
    #[error("the OAuth client id {client_id} is not registered to any consumer")]
    UnknownClientId { client_id: String },
}

#[derive(Debug)]
struct CnEntry {
    consumer: usize,
    /// Empty: any certificate with this CN from the trusted CA.
    pins: Vec<Sha256>,
}

/// Every consumer, indexed by each of its credentials.
#[derive(Debug, Default)]
pub struct Consumers {
    list: Vec<Consumer>,
    by_id: HashMap<Arc<str>, usize>,
    by_cn: HashMap<Box<str>, CnEntry>,
    by_pin: HashMap<Sha256, usize>,
    by_client_id: HashMap<Box<str>, usize>,
}

impl Consumers {
    /// Builds the registry; fails with every conflict found.
    pub fn new(specs: Vec<ConsumerSpec>) -> Result<Self, Vec<ConsumersError>> {
        let mut me = Self::default();
        let mut errors = Vec::new();
        // Every pinned fingerprint, with or without a CN, and its one owner.
        let mut pin_owner: HashMap<Sha256, usize> = HashMap::new();
        for spec in specs {
            let idx = me.list.len();
            let id: Arc<str> = spec.id.as_str().into();
            if me.by_id.insert(id.clone(), idx).is_some() {
                errors.push(ConsumersError::DuplicateId {
                    id: spec.id.clone(),
                });
                continue;
            }
            for cert in &spec.certificates {
                if let Some(pin) = cert.sha256 {
                    let owner = *pin_owner.entry(pin).or_insert(idx);
                    if owner != idx {
                        errors.push(ConsumersError::SharedFingerprint {
                            sha256: pin.to_string(),
                            first: me.list[owner].id.to_string(),
                            second: spec.id.clone(),
                        });
                        continue;
                    }
                }
                match (&cert.cn, cert.sha256) {
                    (None, None) => errors.push(ConsumersError::EmptyCertificate {
                        id: spec.id.clone(),
                    }),
                    (Some(cn), pin) => {
                        let entry = me.by_cn.entry(cn.as_str().into()).or_insert(CnEntry {
                            consumer: idx,
                            pins: Vec::new(),
                        });
                        if entry.consumer != idx {
                            errors.push(ConsumersError::SharedCn {
                                cn: cn.clone(),
                                first: me.list[entry.consumer].id.to_string(),
                                second: spec.id.clone(),
                            });
                        } else if let Some(pin) = pin {
                            entry.pins.push(pin);
                        }
                    }
                    (None, Some(pin)) => {
                        me.by_pin.insert(pin, idx);
                    }
                }
            }
            for client_id in &spec.oauth_client_ids {
                if let Some(&other) = me.by_client_id.get(client_id.as_str()) {
                    if other != idx {
                        errors.push(ConsumersError::SharedClientId {
                            client_id: client_id.clone(),
                            first: me.list[other].id.to_string(),
                            second: spec.id.clone(),
                        });
                    }
                } else {
                    me.by_client_id.insert(client_id.as_str().into(), idx);
                }
            }
            me.list.push(Consumer {
                id,
                organisation: spec.organisation,
                enterprise_number: spec.enterprise_number,
                source_ips: spec.source_ips,
            });
        }
        if errors.is_empty() {
            Ok(me)
        } else {
            Err(errors)
        }
    }

    /// The consumer with this id.
    pub fn get(&self, id: &str) -> Option<&Consumer> {
        self.by_id.get(id).map(|&i| &self.list[i])
    }

    /// Every consumer, in declaration order.
    pub fn iter(&self) -> impl Iterator<Item = &Consumer> {
        self.list.iter()
    }

    /// The credentials that identify consumer `id` (for administrators' views, not
    /// the request path): certificate CNs with their pins, pins alone, client ids.
    pub fn credentials_of(&self, id: &str) -> Vec<CredentialView> {
        let Some(&i) = self.by_id.get(id) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut pinned_by_cn = std::collections::HashSet::new();
        for (cn, entry) in &self.by_cn {
            if entry.consumer == i {
                pinned_by_cn.extend(entry.pins.iter().copied());
                out.push(CredentialView::Certificate {
                    cn: Some(cn.to_string()),
                    pins: entry.pins.clone(),
                });
            }
        }
        for (pin, &owner) in &self.by_pin {
            if owner == i && !pinned_by_cn.contains(pin) {
                out.push(CredentialView::Certificate {
                    cn: None,
                    pins: vec![*pin],
                });
            }
        }
        for (client_id, &owner) in &self.by_client_id {
            if owner == i {
                out.push(CredentialView::OAuth {
                    client_id: client_id.to_string(),
                });
            }
        }
        out.sort_by_key(|c| format!("{c:?}"));
        out
    }

    /// Identifies the consumer behind a client certificate that already chained to a
    /// trusted CA. A fingerprint pin wins over a CN; a CN whose entries are all pinned
    /// only accepts those certificates.
    /// The consumer that pinned exactly this certificate, if one did.
    pub fn pinned(&self, sha256: &Sha256) -> Option<&Consumer> {
        self.by_pin.get(sha256).map(|&i| &self.list[i])
    }

    pub fn identify_certificate(
        &self,
        cert: &CertificateIdentity,
    ) -> Result<&Consumer, IdentityError> {
        if let Some(&i) = self.by_pin.get(&cert.sha256) {
            return Ok(&self.list[i]);
        }
        // A certificate without a (single, readable) CN is matched by no CN entry, not
        // even an empty one.
        let Some(cn) = cert.cn.as_deref() else {
            return Err(IdentityError::UnknownCertificate {
                cn: "(none)".into(),
                sha256: cert.sha256,
            });
        };
        match self.by_cn.get(cn) {
            Some(entry) if entry.pins.is_empty() || entry.pins.contains(&cert.sha256) => {
                Ok(&self.list[entry.consumer])
            }
            Some(_) => Err(IdentityError::PinMismatch {
                cn: cn.to_owned(),
                sha256: cert.sha256,
            }),
            None => Err(IdentityError::UnknownCertificate {
                cn: cn.to_owned(),
                sha256: cert.sha256,
            }),
        }
    }

    /// Identifies the consumer behind an OAuth client id.
    pub fn identify_client_id(&self, client_id: &str) -> Result<&Consumer, IdentityError> {
        self.by_client_id
            .get(client_id)
            .map(|&i| &self.list[i])
            .ok_or_else(|| IdentityError::UnknownClientId {
                client_id: client_id.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fp(b: u8) -> Sha256 {
        Sha256([b; 32])
    }

    fn spec(id: &str, certs: Vec<CertificateSpec>, clients: &[&str]) -> ConsumerSpec {
        ConsumerSpec {
            id: id.into(),
            organisation: format!("Org {id}"),
            certificates: certs,
            oauth_client_ids: clients.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn cn(cn: &str, pin: Option<Sha256>) -> CertificateSpec {
        CertificateSpec {
            cn: Some(cn.into()),
            sha256: pin,
        }
    }

    fn ident(cn: &str, sha: Sha256) -> CertificateIdentity {
        CertificateIdentity {
            cn: Some(cn.into()),
            sha256: sha,
        }
    }

    #[test]
    fn a_certificate_without_a_cn_matches_no_cn_entry_not_even_an_empty_one() {
        let c = Consumers::new(vec![spec("odd", vec![cn("", None)], &[])]).unwrap();
        let none = CertificateIdentity {
            cn: None,
            sha256: fp(5),
        };
        assert!(matches!(
            c.identify_certificate(&none),
            Err(IdentityError::UnknownCertificate { .. })
        ));
    }

    #[test]
    fn identifies_by_cn_pin_and_client_id() {
        let c = Consumers::new(vec![
            spec("bxl", vec![cn("app.bxl.be", None)], &["bxl-app"]),
            spec("liege", vec![cn("app.liege.be", Some(fp(1)))], &[]),
            spec(
                "gent",
                vec![CertificateSpec {
                    cn: None,
                    sha256: Some(fp(2)),
                }],
                &[],
            ),
        ])
        .unwrap();
        assert_eq!(
            &*c.identify_certificate(&ident("app.bxl.be", fp(9)))
                .unwrap()
                .id,
            "bxl"
        );
        assert_eq!(
            &*c.identify_certificate(&ident("app.liege.be", fp(1)))
                .unwrap()
                .id,
            "liege"
        );
        assert!(matches!(
            c.identify_certificate(&ident("app.liege.be", fp(3))),
            Err(IdentityError::PinMismatch { .. })
        ));
        assert_eq!(
            &*c.identify_certificate(&ident("whatever", fp(2)))
                .unwrap()
                .id,
            "gent"
        );
        assert!(matches!(
            c.identify_certificate(&ident("stranger", fp(4))),
            Err(IdentityError::UnknownCertificate { .. })
        ));
        assert_eq!(&*c.identify_client_id("bxl-app").unwrap().id, "bxl");
        assert!(c.identify_client_id("nobody").is_err());
    }

    #[test]
    fn a_credential_belongs_to_one_consumer_only() {
        let errs = Consumers::new(vec![
            spec(
                "a",
                vec![
                    cn("x", None),
                    CertificateSpec {
                        cn: None,
                        sha256: Some(fp(1)),
                    },
                ],
                &["c1"],
            ),
            spec(
                "b",
                vec![
                    cn("x", None),
                    CertificateSpec {
                        cn: None,
                        sha256: Some(fp(1)),
                    },
                ],
                &["c1"],
            ),
            spec("a", vec![], &[]),
        ])
        .unwrap_err();
        assert!(
            errs.iter()
                .any(|e| matches!(e, ConsumersError::SharedCn { .. }))
        );
        assert!(
            errs.iter()
                .any(|e| matches!(e, ConsumersError::SharedFingerprint { .. }))
        );
        assert!(
            errs.iter()
                .any(|e| matches!(e, ConsumersError::SharedClientId { .. }))
        );
        assert!(
            errs.iter()
                .any(|e| matches!(e, ConsumersError::DuplicateId { .. }))
        );
    }

    #[test]
    fn one_fingerprint_pinned_by_two_consumers_under_different_cns_is_refused() {
        let errs = Consumers::new(vec![
            spec("a", vec![cn("a.example.be", Some(fp(7)))], &[]),
            spec("b", vec![cn("b.example.be", Some(fp(7)))], &[]),
        ])
        .unwrap_err();
        assert!(
            matches!(errs.as_slice(), [ConsumersError::SharedFingerprint { first, second, .. }] if first == "a" && second == "b"),
            "{errs:?}"
        );
    }

    /// A consumer replacing its certificate holds both for a while: either identifies it,
    /// whether pinned alone, pinned under one CN, or accepted by CN.
    #[test]
    fn a_consumer_may_hold_two_certificates_during_a_changeover() {
        let pin = |p: Sha256| CertificateSpec {
            cn: None,
            sha256: Some(p),
        };
        let c = Consumers::new(vec![
            spec("pins", vec![pin(fp(1)), pin(fp(2))], &[]),
            spec(
                "cn-pins",
                vec![
                    cn("app.cn-pins.be", Some(fp(3))),
                    cn("app.cn-pins.be", Some(fp(4))),
                ],
                &[],
            ),
            spec("cn", vec![cn("app.cn.be", None)], &[]),
        ])
        .unwrap();
        for (cn, sha, id) in [
            ("old.pins.be", fp(1), "pins"),
            ("new.pins.be", fp(2), "pins"),
            ("app.cn-pins.be", fp(3), "cn-pins"),
            ("app.cn-pins.be", fp(4), "cn-pins"),
            ("app.cn.be", fp(5), "cn"),
            ("app.cn.be", fp(6), "cn"),
        ] {
            assert_eq!(&*c.identify_certificate(&ident(cn, sha)).unwrap().id, id);
        }
        // A third certificate under the pinned CN is still refused.
        assert!(matches!(
            c.identify_certificate(&ident("app.cn-pins.be", fp(7))),
            Err(IdentityError::PinMismatch { .. })
        ));
        let mut views = c.credentials_of("pins");
        views.sort_by_key(|v| format!("{v:?}"));
        assert_eq!(views.len(), 2, "{views:?}");
        assert_eq!(
            c.credentials_of("cn-pins"),
            vec![CredentialView::Certificate {
                cn: Some("app.cn-pins.be".into()),
                pins: vec![fp(3), fp(4)],
            }]
        );
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(Sha256::parse(&hex), Sha256::parse(&colons));
        assert!(Sha256::parse("abc").is_none());
    }
}
