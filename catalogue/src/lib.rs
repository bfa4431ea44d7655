//! # The service catalogue
//!
//! Providers publish *services* (such as `person/getPerson`) grouped in *families*; each
//! service exists in one or more *versions*, each with its own upstream address and a
//! lifecycle:
//!
//! ```text
//!   released ──────────► deprecated ──────────► sunset (retired)
//!   live, current        live, announces        answers 410
//!                        Deprecation/Sunset
//! ```
//!
//! The platform's rules, checked by [`validate_service`] and enforced by construction in
//! [`Catalogue::new`]:
//!
//! - at no date are more than [`MAX_LIVE_VERSIONS`] versions of one service live
//!   (released and not past their sunset);
//! - `sunset` comes after `deprecated` and at most [`MAX_SUNSET_YEARS`] years later; a
//!   version with a sunset must be deprecated first;
//! - at most [`MAX_RELEASES_PER_YEAR`] versions are released in any 365 days.
//!
//! This crate is pure: it never reads a clock. Every lookup takes `today` from the caller,
//! so the lifecycle can be tested at its edges.

// Keys come from the configuration (requests only look them up): a fast hash will do.
use foldhash::{HashMap, HashMapExt as _};
use std::fmt;
use std::sync::Arc;

use time::Date;

/// At most this many versions of a service are live on any date.
pub const MAX_LIVE_VERSIONS: usize = 3;
/// A version's sunset is at most this many years after its deprecation.
pub const MAX_SUNSET_YEARS: i32 = 2;
/// At most this many versions of a service are released in any 365 days.
pub const MAX_RELEASES_PER_YEAR: usize = 4;

/// The message style of a service version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// SOAP 1.1 or 1.2 envelopes posted to the version's address.
    Soap,
    /// Any HTTP method on any path below the version's address.
    Rest,
}

impl Protocol {
    /// Parses the configuration spelling (`soap` or `rest`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "soap" => Some(Self::Soap),
            "rest" => Some(Self::Rest),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Soap => "soap",
            Self::Rest => "rest",
        })
    }
}

/// One version of a service, as declared.
#[derive(Clone, Debug)]
pub struct VersionSpec {
    pub version: String,
    pub upstream: http::Uri,
    /// Overrides the service's protocol for this version (a service may move from SOAP
    /// to REST in a new version).
    pub protocol: Option<Protocol>,
    pub released: Date,
    pub deprecated: Option<Date>,
    pub sunset: Option<Date>,
}

/// One service, as declared.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub family: String,
    pub id: String,
    pub protocol: Protocol,
    pub versions: Vec<VersionSpec>,
}

/// A broken lifecycle rule, naming the service (and version) concerned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleViolation {
    #[error("service {service} has no version")]
    NoVersion { service: String },
    #[error("service {service} declares version {version} more than once")]
    DuplicateVersion { service: String, version: String },
    #[error(
        "service {service} would have {count} live versions on {date} ({versions}); at most {max} may be live at once: set a sunset on an older version"
    )]
    TooManyLive {
        service: String,
        date: Date,
        count: usize,
        versions: String,
        max: usize,
    },
    #[error(
        "service {service} version {version}: sunset {sunset} is more than {years} years after deprecation on {deprecated}; latest allowed sunset is {latest}"
    )]
    SunsetTooLate {
        service: String,
        version: String,
        deprecated: Date,
        sunset: Date,
        latest: Date,
        years: i32,
    },
    #[error(
        "service {service} version {version}: sunset {sunset} is set but the version is not deprecated; add `deprecated`"
    )]
    SunsetWithoutDeprecation {
        service: String,
        version: String,
        sunset: Date,
    },
    #[error(
        "service {service} version {version}: sunset {sunset} must come after deprecation {deprecated}"
    )]
    SunsetBeforeDeprecation {
        service: String,
        version: String,
        deprecated: Date,
        sunset: Date,
    },
    #[error(
        "service {service} version {version}: deprecated {deprecated} comes before its release {released}"
    )]
    DeprecatedBeforeRelease {
        service: String,
        version: String,
        released: Date,
        deprecated: Date,
    },
    #[error(
        "service {service} releases {count} versions between {from} and {to} ({versions}); at most {max} may be released in any 365 days"
    )]
    TooManyReleases {
        service: String,
        from: Date,
        to: Date,
        count: usize,
        versions: String,
        max: usize,
    },
    #[error(
        "service {service} version {version}: upstream {upstream} must be an absolute http:// or https:// URL"
    )]
    BadUpstream {
        service: String,
        version: String,
        upstream: String,
    },
}

impl RuleViolation {
    /// The version concerned, when the rule is about one version.
    pub fn version(&self) -> Option<&str> {
        match self {
            Self::DuplicateVersion { version, .. }
            | Self::SunsetTooLate { version, .. }
            | Self::SunsetWithoutDeprecation { version, .. }
            | Self::SunsetBeforeDeprecation { version, .. }
            | Self::DeprecatedBeforeRelease { version, .. }
            | Self::BadUpstream { version, .. } => Some(version),
            _ => None,
        }
    }
}

/// The latest sunset allowed for a version deprecated on `deprecated`.
pub fn latest_sunset(deprecated: Date) -> Date {
    let year = deprecated.year() + MAX_SUNSET_YEARS;
    // 29 February + 2 years is 28 February.
    deprecated
        .replace_year(year)
        .or_else(|_| {
            deprecated
                .replace_day(28)
                .and_then(|d| d.replace_year(year))
        })
        .unwrap_or(Date::MAX)
}

fn is_live_on(v: &VersionSpec, date: Date) -> bool {
    v.released <= date && v.sunset.is_none_or(|s| date < s)
}

/// Checks every lifecycle rule of one service and returns all violations (empty: valid).
pub fn validate_service(spec: &ServiceSpec) -> Vec<RuleViolation> {
    let service = format!("{}/{}", spec.family, spec.id);
    let mut out = Vec::new();
    if spec.versions.is_empty() {
        out.push(RuleViolation::NoVersion { service });
        return out;
    }
    for (i, v) in spec.versions.iter().enumerate() {
        if spec.versions[..i].iter().any(|w| w.version == v.version) {
            out.push(RuleViolation::DuplicateVersion {
                service: service.clone(),
                version: v.version.clone(),
            });
        }
        let scheme_ok = matches!(v.upstream.scheme_str(), Some("http" | "https"));
        if !scheme_ok || v.upstream.authority().is_none() {
            out.push(RuleViolation::BadUpstream {
                service: service.clone(),
                version: v.version.clone(),
                upstream: v.upstream.to_string(),
            });
        }
        if let Some(dep) = v.deprecated
            && dep < v.released
        {
            out.push(RuleViolation::DeprecatedBeforeRelease {
                service: service.clone(),
                version: v.version.clone(),
                released: v.released,
                deprecated: dep,
            });
        }
        match (v.deprecated, v.sunset) {
            (None, Some(sunset)) => out.push(RuleViolation::SunsetWithoutDeprecation {
                service: service.clone(),
                version: v.version.clone(),
                sunset,
            }),
            (Some(deprecated), Some(sunset)) if sunset <= deprecated => {
                out.push(RuleViolation::SunsetBeforeDeprecation {
                    service: service.clone(),
                    version: v.version.clone(),
                    deprecated,
                    sunset,
                })
            }
            (Some(deprecated), Some(sunset)) if sunset > latest_sunset(deprecated) => {
                out.push(RuleViolation::SunsetTooLate {
                    service: service.clone(),
                    version: v.version.clone(),
                    deprecated,
                    sunset,
                    latest: latest_sunset(deprecated),
                    years: MAX_SUNSET_YEARS,
                })
            }
            _ => {}
        }
    }

    // Live versions: the count only rises at a release date, so checking each release
    // date covers every date, past and future.
    let mut worst: Option<(Date, Vec<&str>)> = None;
    for probe in spec.versions.iter().map(|v| v.released) {
        let live: Vec<&str> = spec
            .versions
            .iter()
            .filter(|v| is_live_on(v, probe))
            .map(|v| v.version.as_str())
            .collect();
        if live.len() > MAX_LIVE_VERSIONS
            && worst.as_ref().is_none_or(|(_, w)| live.len() > w.len())
        {
            worst = Some((probe, live));
        }
    }
    if let Some((date, live)) = worst {
        out.push(RuleViolation::TooManyLive {
            service: service.clone(),
            date,
            count: live.len(),
            versions: live.join(", "),
            max: MAX_LIVE_VERSIONS,
        });
    }

    // Releases per 365 days: a sliding window over the sorted release dates.
    let mut releases: Vec<(Date, &str)> = spec
        .versions
        .iter()
        .map(|v| (v.released, v.version.as_str()))
        .collect();
    releases.sort();
    let window = MAX_RELEASES_PER_YEAR + 1;
    if let Some(w) = releases
        .windows(window)
        .find(|w| (w[window - 1].0 - w[0].0).whole_days() < 365)
    {
        out.push(RuleViolation::TooManyReleases {
            service,
            from: w[0].0,
            to: w[window - 1].0,
            count: window,
            versions: w.iter().map(|(_, v)| *v).collect::<Vec<_>>().join(", "),
            max: MAX_RELEASES_PER_YEAR,
        });
    }
    out
}

/// A validated version.
#[derive(Debug)]
pub struct Version {
    pub version: Arc<str>,
    pub upstream: http::Uri,
    pub protocol: Protocol,
    pub released: Date,
    pub deprecated: Option<Date>,
    pub sunset: Option<Date>,
}

/// A validated service: its versions obey every lifecycle rule.
#[derive(Debug)]
pub struct Service {
    /// `family/service`, as written in audit records and authorisations.
    pub name: Arc<str>,
    pub family: Arc<str>,
    pub id: Arc<str>,
    pub provider: Arc<str>,
    pub protocol: Protocol,
    /// Newest release first.
    pub versions: Vec<Version>,
}

impl Service {
    /// The version consumers should move to on `today`: the newest released version that
    /// is not deprecated, or failing that the newest live one.
    pub fn current(&self, today: Date) -> Option<&Version> {
        let live = || {
            self.versions
                .iter()
                .filter(move |v| v.released <= today && v.sunset.is_none_or(|s| today < s))
        };
        live()
            .find(|v| v.deprecated.is_none_or(|d| today < d))
            .or_else(|| live().next())
    }
}

/// Where a version stands on a given day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Live,
    /// Still served, but consumers are told to move.
    Deprecated {
        since: Date,
        sunset: Option<Date>,
    },
}

/// A successful route lookup.
#[derive(Debug)]
pub struct Route<'a> {
    pub service: &'a Service,
    pub version: &'a Version,
    pub lifecycle: Lifecycle,
    /// The version to move to, when this one is deprecated.
    pub successor: Option<&'a Version>,
}

impl Route<'_> {
    /// The protocol of the version being called.
    pub fn protocol(&self) -> Protocol {
        self.version.protocol
    }
}

/// Why a path does not lead to a live version.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
// Not `#[non_exhaustive]`: the gateway maps every variant to a contract code
// (`proxy::errors::map`), and a new one must be mapped there, not fall into a default.
pub enum RouteError {
    #[error("no service {family}/{service} is published on this platform")]
    UnknownService { family: String, service: String },
    #[error("service {service} has no version {version}; available: {available}")]
    UnknownVersion {
        service: String,
        version: String,
        available: String,
        /// The protocol the service mostly speaks, so the error takes its form.
        protocol: Protocol,
    },
    #[error(
        "service {service} version {version} is not released until {released}; available: {available}"
    )]
    NotYetReleased {
        service: String,
        version: String,
        released: Date,
        available: String,
        protocol: Protocol,
    },
    #[error("service {service} version {version} was retired on {sunset}{}", successor.as_ref().map(|s| format!("; use version {s}")).unwrap_or_default())]
    Retired {
        service: String,
        version: String,
        sunset: Date,
        successor: Option<String>,
        protocol: Protocol,
    },
}

impl RouteError {
    /// The protocol of the service addressed, when the service exists.
    pub fn protocol(&self) -> Option<Protocol> {
        match self {
            Self::UnknownService { .. } => None,
            Self::UnknownVersion { protocol, .. }
            | Self::NotYetReleased { protocol, .. }
            | Self::Retired { protocol, .. } => Some(*protocol),
        }
    }
}

/// The catalogue errors found while building it.
#[derive(Debug, thiserror::Error)]
#[error("{} catalogue rule(s) broken", .0.len())]
pub struct InvalidCatalogue(pub Vec<RuleViolation>);

/// Every published service, indexed for lookup by `family` and `service` name.
#[derive(Debug, Default)]
pub struct Catalogue {
    families: HashMap<Box<str>, HashMap<Box<str>, Service>>,
}

impl Catalogue {
    /// Builds the catalogue from `(provider, service)` pairs; fails with every broken rule.
    pub fn new(
        services: impl IntoIterator<Item = (String, ServiceSpec)>,
    ) -> Result<Self, InvalidCatalogue> {
        let mut families: HashMap<Box<str>, HashMap<Box<str>, Service>> = HashMap::new();
        let mut violations = Vec::new();
        for (provider, spec) in services {
            let found = validate_service(&spec);
            if !found.is_empty() {
                violations.extend(found);
                continue;
            }
            let mut versions: Vec<Version> = spec
                .versions
                .into_iter()
                .map(|v| Version {
                    version: v.version.into(),
                    upstream: v.upstream,
                    protocol: v.protocol.unwrap_or(spec.protocol),
                    released: v.released,
                    deprecated: v.deprecated,
                    sunset: v.sunset,
                })
                .collect();
            versions.sort_by_key(|v| std::cmp::Reverse(v.released));
            let name: Arc<str> = format!("{}/{}", spec.family, spec.id).into();
            let family = families.entry(spec.family.as_str().into()).or_default();
            if family.contains_key(spec.id.as_str()) {
                violations.push(RuleViolation::DuplicateVersion {
                    service: name.to_string(),
                    version: "(whole service declared twice)".into(),
                });
                continue;
            }
            family.insert(
                spec.id.as_str().into(),
                Service {
                    name,
                    family: spec.family.into(),
                    id: spec.id.into(),
                    provider: provider.into(),
                    protocol: spec.protocol,
                    versions,
                },
            );
        }
        if violations.is_empty() {
            Ok(Self { families })
        } else {
            Err(InvalidCatalogue(violations))
        }
    }

    /// Looks a service up by its two names.
    pub fn service(&self, family: &str, service: &str) -> Option<&Service> {
        self.families.get(family)?.get(service)
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.families.values().flat_map(|f| f.values())
    }

    /// Resolves `family/service/version` on `today`.
    pub fn resolve(
        &self,
        family: &str,
        service: &str,
        version: &str,
        today: Date,
    ) -> Result<Route<'_>, RouteError> {
        let svc = self
            .service(family, service)
            .ok_or_else(|| RouteError::UnknownService {
                family: family.to_owned(),
                service: service.to_owned(),
            })?;
        let available = || {
            svc.versions
                .iter()
                .filter(|v| v.released <= today && v.sunset.is_none_or(|s| today < s))
                .map(|v| &*v.version)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(ver) = svc.versions.iter().find(|v| &*v.version == version) else {
            return Err(RouteError::UnknownVersion {
                service: svc.name.to_string(),
                version: version.to_owned(),
                available: available(),
                protocol: svc.protocol,
            });
        };
        if today < ver.released {
            return Err(RouteError::NotYetReleased {
                service: svc.name.to_string(),
                version: version.to_owned(),
                released: ver.released,
                available: available(),
                protocol: ver.protocol,
            });
        }
        let successor = svc.current(today).filter(|c| c.version != ver.version);
        if let Some(sunset) = ver.sunset
            && today >= sunset
        {
            return Err(RouteError::Retired {
                service: svc.name.to_string(),
                version: version.to_owned(),
                sunset,
                successor: successor.map(|s| s.version.to_string()),
                protocol: ver.protocol,
            });
        }
        let lifecycle = match ver.deprecated {
            Some(since) if today >= since => Lifecycle::Deprecated {
                since,
                sunset: ver.sunset,
            },
            _ => Lifecycle::Live,
        };
        Ok(Route {
            service: svc,
            version: ver,
            successor: if matches!(lifecycle, Lifecycle::Deprecated { .. }) {
                successor
            } else {
                None
            },
            lifecycle,
        })
    }
}

#[cfg(test)]
mod tests;
