//! Authorisations: a consumer may call a service (optionally only some versions) for one
//! purpose, on a legal basis, with the provider's approval, within a validity window.

use std::fmt;

use time::Date;

/// The three kinds of legal basis recognised by the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegalBasisKind {
    /// A law or regulation names the consumer and the data.
    Authorisation,
    /// A protocol agreement between the consumer and the provider.
    Protocol,
    /// A deliberation of the information security committee.
    Deliberation,
}

impl LegalBasisKind {
    /// Parses the configuration spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "authorisation" => Some(Self::Authorisation),
            "protocol" => Some(Self::Protocol),
            "deliberation" => Some(Self::Deliberation),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorisation => "authorisation",
            Self::Protocol => "protocol",
            Self::Deliberation => "deliberation",
        }
    }
}

/// The legal ground on which data flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegalBasis {
    pub kind: LegalBasisKind,
    pub reference: String,
    pub issuer: Option<String>,
}

impl fmt::Display for LegalBasis {
    /// The form sent to providers in `FSP-Legal-Basis`: `kind; reference`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; {}", self.kind.as_str(), self.reference)
    }
}

/// One authorisation, as declared.
#[derive(Clone, Debug)]
pub struct Authorisation {
    pub id: String,
    pub consumer: String,
    /// `family/service`.
    pub service: String,
    /// Empty: every version.
    pub versions: Vec<String>,
    pub purpose: String,
    pub legal_basis: LegalBasis,
    pub provider_approval: String,
    pub valid_from: Date,
    /// The last day the authorisation is valid (inclusive).
    pub valid_until: Option<Date>,
    /// From this day on the authorisation no longer applies (revoked before its end).
    pub revoked: Option<Date>,
}
