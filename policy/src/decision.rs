//! The authorisation decision: may this consumer call this service version, for this
//! purpose, today, from this address?
//!
//! [`decide`] is pure: the caller passes the date, the source address and the current
//! suspensions. It returns the authorisation that covers the call (its purpose and legal
//! basis go to the provider and into the audit record) or a typed [`Denial`] that maps
//! one-to-one onto the contract's error codes.
//!
//! Rules, in order:
//! 1. a suspended consumer or provider is refused (`FSP-AUTHZ-SUSPENDED`);
//! 2. a consumer with declared source addresses is refused from any other
//!    (`FSP-AUTHZ-SOURCE-IP`);
//! 3. the authorisations of this consumer for this service (and version, when they are
//!    narrowed to versions) are the candidates; none: `FSP-AUTHZ-NO-AUTHORISATION`;
//! 4. a stated purpose keeps only the candidates for that purpose; none:
//!    `FSP-AUTHZ-NO-AUTHORISATION`, naming the purposes that are authorised;
//! 5. of those, the ones valid today (from `valid_from` through `valid_until`, inclusive,
//!    and not revoked) are live; none: `FSP-AUTHZ-NOT-YET-VALID` if one starts later,
//!    else `FSP-AUTHZ-EXPIRED`;
//! 6. without a stated purpose, live authorisations for more than one purpose need the
//!    consumer to choose: `FSP-PURPOSE-REQUIRED`, listing them (except for a request for
//!    the version's metadata, [`Ask::any_purpose`], which any of them covers).

// Keys come from the configuration (requests only look them up): a fast hash will do.
use foldhash::{HashMap, HashMapExt as _};
use std::net::IpAddr;

use time::Date;

use crate::authorisation::Authorisation;
use crate::consumer::Consumer;

/// What is being asked.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'a> {
    /// `family/service`.
    pub service: &'a str,
    pub version: &'a str,
    pub provider: &'a str,
    pub purpose: Option<&'a str>,
    pub source_ip: IpAddr,
    pub today: Date,
    /// The service version's metadata (its WSDL) is asked for, not a call: without a
    /// stated purpose, a live authorisation for any purpose covers it (rule 6 does not
    /// apply).
    pub any_purpose: bool,
}

/// Who is cut off right now.
pub trait Suspensions {
    fn consumer_suspended(&self, consumer: &str) -> bool;
    fn provider_suspended(&self, provider: &str) -> bool;
}

/// No suspensions at all.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSuspensions;

impl Suspensions for NoSuspensions {
    fn consumer_suspended(&self, _: &str) -> bool {
        false
    }
    fn provider_suspended(&self, _: &str) -> bool {
        false
    }
}

/// Why a call is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
// Not `#[non_exhaustive]`: the gateway maps every variant to a contract code
// (`proxy::errors::map`), and a new one must be mapped there, not fall into a default.
pub enum Denial {
    #[error("consumer {consumer} is suspended on this platform")]
    ConsumerSuspended { consumer: String },
    #[error("provider {provider} is suspended on this platform; no call reaches it")]
    ProviderSuspended { provider: String },
    #[error(
        "consumer {consumer} may not call from {ip}: it is not among the consumer's declared source addresses"
    )]
    SourceIp { consumer: String, ip: IpAddr },
    #[error("consumer {consumer} holds no authorisation for {service} version {version}")]
    NoAuthorisation {
        consumer: String,
        service: String,
        version: String,
    },
    #[error(
        "consumer {consumer} holds no authorisation for {service} for the purpose `{purpose}`; authorised purposes: {authorised}"
    )]
    PurposeNotAuthorised {
        consumer: String,
        service: String,
        purpose: String,
        authorised: String,
    },
    #[error("authorisation {authorisation} for {service} is valid only from {valid_from}")]
    NotYetValid {
        authorisation: String,
        service: String,
        valid_from: Date,
    },
    #[error("authorisation {authorisation} for {service} {why}")]
    Expired {
        authorisation: String,
        service: String,
        why: String,
    },
    #[error(
        "consumer {consumer} holds authorisations for {service} for several purposes ({purposes}): state one in the FSP-Purpose header"
    )]
    PurposeRequired {
        consumer: String,
        service: String,
        purposes: String,
    },
}

/// Authorisations indexed by consumer and service, for the hot path.
#[derive(Debug, Default)]
pub struct Authorisations {
    /// consumer → service → authorisations: two borrowed lookups on the hot path.
    by_consumer: HashMap<String, HashMap<String, Vec<Authorisation>>>,
}

impl Authorisations {
    pub fn new(all: Vec<Authorisation>) -> Self {
        let mut by_consumer: HashMap<String, HashMap<String, Vec<Authorisation>>> = HashMap::new();
        for a in all {
            by_consumer
                .entry(a.consumer.clone())
                .or_default()
                .entry(a.service.clone())
                .or_default()
                .push(a);
        }
        Self { by_consumer }
    }

    /// Every authorisation, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Authorisation> {
        self.by_consumer.values().flat_map(|m| m.values()).flatten()
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.by_consumer.is_empty()
    }

    fn for_pair(&self, consumer: &str, service: &str) -> &[Authorisation] {
        self.by_consumer
            .get(consumer)
            .and_then(|m| m.get(service))
            .map_or(&[], Vec::as_slice)
    }
}

impl Authorisation {
    /// Whether the authorisation covers this version.
    pub fn covers_version(&self, version: &str) -> bool {
        self.versions.is_empty() || self.versions.iter().any(|v| v == version)
    }

    /// Whether the authorisation is in force on `today`.
    pub fn in_force(&self, today: Date) -> bool {
        self.valid_from <= today
            && self.valid_until.is_none_or(|u| today <= u)
            && self.revoked.is_none_or(|r| today < r)
    }
}

/// The distinct purposes of some authorisations, sorted, for messages.
fn purpose_list(authorisations: &[&Authorisation]) -> String {
    let mut purposes: Vec<&str> = authorisations.iter().map(|a| a.purpose.as_str()).collect();
    purposes.sort_unstable();
    purposes.dedup();
    purposes.join(", ")
}

/// Decides a call; see the module documentation for the rules.
pub fn decide<'a>(
    consumer: &Consumer,
    ask: &Ask<'_>,
    authorisations: &'a Authorisations,
    suspensions: &dyn Suspensions,
) -> Result<&'a Authorisation, Denial> {
    if suspensions.consumer_suspended(&consumer.id) {
        return Err(Denial::ConsumerSuspended {
            consumer: consumer.id.to_string(),
        });
    }
    if suspensions.provider_suspended(ask.provider) {
        return Err(Denial::ProviderSuspended {
            provider: ask.provider.to_owned(),
        });
    }
    if !consumer.source_ips.is_empty()
        && !consumer
            .source_ips
            .iter()
            .any(|net| net.contains(&ask.source_ip))
    {
        return Err(Denial::SourceIp {
            consumer: consumer.id.to_string(),
            ip: ask.source_ip,
        });
    }
    let candidates: Vec<&Authorisation> = authorisations
        .for_pair(&consumer.id, ask.service)
        .iter()
        .filter(|a| a.covers_version(ask.version))
        .collect();
    if candidates.is_empty() {
        return Err(Denial::NoAuthorisation {
            consumer: consumer.id.to_string(),
            service: ask.service.to_owned(),
            version: ask.version.to_owned(),
        });
    }
    let for_purpose: Vec<&Authorisation> = match ask.purpose {
        Some(p) => candidates
            .iter()
            .copied()
            .filter(|a| a.purpose == p)
            .collect(),
        None => candidates.clone(),
    };
    if for_purpose.is_empty() {
        let purposes = purpose_list(&candidates);
        return Err(Denial::PurposeNotAuthorised {
            consumer: consumer.id.to_string(),
            service: ask.service.to_owned(),
            purpose: ask.purpose.unwrap_or_default().to_owned(),
            authorised: purposes,
        });
    }
    let mut live: Vec<&Authorisation> = for_purpose
        .iter()
        .copied()
        .filter(|a| a.in_force(ask.today))
        .collect();
    if live.is_empty() {
        // Prefer telling the consumer about one that starts later.
        if let Some(a) = for_purpose
            .iter()
            .filter(|a| a.valid_from > ask.today)
            .min_by_key(|a| a.valid_from)
        {
            return Err(Denial::NotYetValid {
                authorisation: a.id.clone(),
                service: ask.service.to_owned(),
                valid_from: a.valid_from,
            });
        }
        let Some(a) = for_purpose
            .iter()
            .max_by_key(|a| (a.revoked.or(a.valid_until), a.id.as_str()))
        else {
            return Err(Denial::NoAuthorisation {
                consumer: consumer.id.to_string(),
                service: ask.service.to_owned(),
                version: ask.version.to_owned(),
            });
        };
        let why = match (a.revoked, a.valid_until) {
            (Some(r), _) if r <= ask.today => format!("was revoked on {r}"),
            (_, Some(u)) => format!("expired after {u}"),
            _ => "is not in force".to_owned(),
        };
        return Err(Denial::Expired {
            authorisation: a.id.clone(),
            service: ask.service.to_owned(),
            why,
        });
    }
    if ask.purpose.is_none() && !ask.any_purpose {
        let first = live[0].purpose.as_str();
        if live.iter().any(|a| a.purpose != first) {
            let purposes = purpose_list(&live);
            return Err(Denial::PurposeRequired {
                consumer: consumer.id.to_string(),
                service: ask.service.to_owned(),
                purposes,
            });
        }
    }
    // Several live authorisations for one purpose: the one narrowed to this version wins,
    // then the most recent; ties broken by id so the choice is stable.
    live.sort_by(|a, b| {
        a.versions
            .is_empty()
            .cmp(&b.versions.is_empty())
            .then(b.valid_from.cmp(&a.valid_from))
            .then(a.id.cmp(&b.id))
    });
    Ok(live[0])
}

#[cfg(test)]
#[path = "decision_tests.rs"]
mod tests;
