//! Every typed failure of a call, mapped to its contract code, in one place.
//!
//! Each function here takes one kind of failure (a policy denial, a routing error, a
//! refused token, a broken request body, a throttling decision, a failed exchange with a
//! provider) and says, by an exhaustive `match` without a default arm, which contract
//! [`Code`] it is, what the consumer is told, which [`Side`] caused it, and what only the
//! log and the audit record learn. A new variant anywhere is a compile error here until it
//! is mapped, never a silent `FSP-AUTHZ-NO-AUTHORISATION`.

use catalogue::RouteError;
use http::HeaderValue;
use http::header::{self, HeaderName};
use policy::Denial;

use super::{Code, Rejection, Side};
use crate::headers::SUNSET;
use crate::oauth::TokenError;
use crate::transport::body::{BodyError, ConsumerFault, Cut};
use crate::transport::h1::codec::ExchangeError;
use crate::transport::pool::UpstreamError;

/// A refusal by the authorisation policy.
pub fn denial(d: Denial) -> Rejection {
    let code = match &d {
        Denial::ConsumerSuspended { .. } | Denial::ProviderSuspended { .. } => Code::AuthzSuspended,
        Denial::SourceIp { .. } => Code::AuthzSourceIp,
        Denial::NoAuthorisation { .. } | Denial::PurposeNotAuthorised { .. } => {
            Code::AuthzNoAuthorisation
        }
        Denial::NotYetValid { .. } => Code::AuthzNotYetValid,
        Denial::Expired { .. } => Code::AuthzExpired,
        Denial::PurposeRequired { .. } => Code::PurposeRequired,
    };
    Rejection::new(code, d.to_string())
}

/// A path that does not lead to a live version. `successor` makes the `Link` to the
/// version that replaces a retired one, when the service has one.
pub fn route(e: RouteError, successor: impl Fn(&str) -> Option<HeaderValue>) -> Rejection {
    let detail = e.to_string();
    match e {
        RouteError::UnknownService { .. } => Rejection::new(Code::RouteUnknownService, detail),
        RouteError::UnknownVersion { .. } | RouteError::NotYetReleased { .. } => {
            Rejection::new(Code::RouteUnknownVersion, detail)
        }
        RouteError::Retired {
            sunset,
            successor: next,
            ..
        } => {
            let mut r = Rejection::new(Code::RouteVersionRetired, detail);
            if let Ok(v) = HeaderValue::from_str(&http_date(sunset)) {
                r = r.with_header(SUNSET, v);
            }
            if let Some(link) = next.as_deref().and_then(successor) {
                r = r.with_header(header::LINK, link);
            }
            r
        }
    }
}

/// A bearer token that was not accepted.
pub fn token(e: &TokenError) -> Rejection {
    let invalid = || {
        Rejection::new(Code::AuthnInvalidToken, e.to_string()).with_header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        )
    };
    match e {
        TokenError::Binding(_) => Rejection::new(Code::AuthzTokenBinding, e.to_string()),
        // The identity provider's keys could not be had: the token may be fine.
        TokenError::NoKeys => invalid().blaming(Side::Gateway),
        TokenError::TooLarge(_)
        | TokenError::Invalid(_)
        | TokenError::Algorithm(..)
        | TokenError::UnknownKey(_)
        | TokenError::NoClientId(_) => invalid(),
    }
}

/// A request body that failed on the consumer's side.
pub fn consumer_fault(fault: &ConsumerFault) -> Rejection {
    match fault {
        ConsumerFault::TooLarge(limit) => Rejection::new(
            Code::RequestTooLarge,
            format!("the request body may not exceed {limit} bytes"),
        ),
        ConsumerFault::Stalled(t) => Rejection::new(
            Code::RequestTimeout,
            format!("the request body stopped arriving: nothing was received for {t:?}"),
        ),
        ConsumerFault::Incomplete(why) => Rejection::new(
            Code::RequestIncomplete,
            "the request body did not arrive whole (the connection was closed, or fewer bytes were sent than announced)",
        )
        .with_internal(format!("request body incomplete: {why}")),
        ConsumerFault::Malformed(why) => Rejection::new(
            Code::RequestMalformed,
            "the request body is not validly framed (invalid chunked encoding)",
        )
        .with_internal(format!("request body framing: {why}")),
        ConsumerFault::Xml(why) => Rejection::new(Code::RequestMalformed, why.clone()),
        ConsumerFault::Suspended(cut) => {
            cut_off("the call was cut off while its request was being sent", cut)
        }
    }
}

/// A call cut off by a suspension, `when` in its course: the consumer is told which
/// party was suspended, the log and the audit record also by whom.
pub fn cut_off(when: &str, cut: &Cut) -> Rejection {
    Rejection::new(Code::AuthzSuspended, format!("{when}: {cut}"))
        .with_internal(format!("{when}: {}", cut.recorded()))
}

/// 429 with `Retry-After` and the IETF `RateLimit-Policy` / `RateLimit` fields.
pub fn throttled(t: &throttle::Throttled, limits: &throttle::Limits) -> Rejection {
    let wait = t.retry_after.as_secs() + u64::from(t.retry_after.subsec_nanos() > 0);
    let wait = wait.max(1);
    let policies: Vec<String> = [
        limits.provider.map(|l| l.policy("provider")),
        limits.consumer.map(|l| l.policy("consumer")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let scope = t.scope.as_str();
    let mut r = Rejection::new(
        Code::Throttled,
        format!(
            "the {scope} limit of {} calls per {:?} (burst {}) is reached; retry in {wait} s",
            t.limit.count, t.limit.per, t.limit.burst
        ),
    );
    for (name, value) in [
        (header::RETRY_AFTER, wait.to_string()),
        (
            HeaderName::from_static("ratelimit-policy"),
            policies.join(", "),
        ),
        (
            HeaderName::from_static("ratelimit"),
            format!("\"{scope}\";r=0;t={wait}"),
        ),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            r = r.with_header(name, v);
        }
    }
    r
}

/// The shared throttling backend failed and `on_backend_error = deny`.
pub fn throttle_backend_down() -> Rejection {
    Rejection::new(
        Code::Throttled,
        "the throttling backend is unavailable and this platform refuses calls it cannot count (on_backend_error = deny)",
    )
    .blaming(Side::Gateway)
    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
}

/// A provider that could not be reached or answered wrongly: the consumer learns which
/// provider and service, the log and the audit record learn why.
pub fn upstream(provider: &str, service: &str, e: &UpstreamError) -> Rejection {
    use UpstreamError as E;
    let internal = error_chain(e);
    let retry = || HeaderValue::from_static("1");
    // What the consumer may know: which provider failed and how, in the gateway's own
    // words; never the provider's address or an operating system's error.
    let (code, detail, side) = match e {
        E::Busy { waited } => {
            return Rejection::new(
                Code::UpstreamBusy,
                format!(
                    "provider {provider} is at the gateway's connection limit for it; nothing was sent (waited {waited:?})"
                ),
            )
            .with_header(header::RETRY_AFTER, retry())
            .with_internal(internal);
        }
        E::ConsumerShare { limit } => {
            return Rejection::new(
                Code::Throttled,
                format!(
                    "this consumer already has {limit} calls in flight to provider {provider}, its share of the provider's capacity; retry when one ends"
                ),
            )
            .with_header(header::RETRY_AFTER, retry());
        }
        E::BadUrl(_) | E::ServerName { .. } => (
            Code::UpstreamUnavailable,
            format!("provider {provider} is not correctly configured on this platform"),
            Side::Gateway,
        ),
        E::Resolve { .. }
        | E::Connect { .. }
        | E::ConnectTimeout { .. }
        | E::Tls { .. }
        | E::Handshake { .. } => (
            Code::UpstreamUnavailable,
            format!("provider {provider} could not be reached for {service}"),
            Side::Provider,
        ),
        E::Exchange(ExchangeError::Protocol(_)) => (
            Code::UpstreamUnavailable,
            format!("provider {provider} answered {service} wrongly: {internal}"),
            Side::Provider,
        ),
        E::Exchange(ExchangeError::Closed) => (
            Code::UpstreamUnavailable,
            format!("provider {provider} closed the connection without answering {service}"),
            Side::Provider,
        ),
        // The body did not match its own declared length (a body the consumer broke
        // otherwise is caught as its fault where it was read, see `consumer_fault`).
        E::Exchange(ExchangeError::RequestBody(b)) => match b {
            BodyError::TooLarge(_)
            | BodyError::Client(_)
            | BodyError::Truncated
            | BodyError::Stalled(_)
            | BodyError::Xml(_) => (
                Code::RequestIncomplete,
                "the request body does not match its declared length".to_owned(),
                Side::Consumer,
            ),
            BodyError::CutOff(cut) => (
                Code::AuthzSuspended,
                format!("the call was cut off while its request was being sent: {cut}"),
                Side::Consumer,
            ),
        },
        E::Exchange(ExchangeError::Io(_)) | E::Http(_) => (
            Code::UpstreamUnavailable,
            format!("the exchange with provider {provider} for {service} failed"),
            Side::Provider,
        ),
    };
    tracing::warn!(provider = %provider, service = %service, error = %internal, "upstream call failed");
    Rejection::new(code, detail)
        .blaming(side)
        .with_internal(internal)
}

/// An HTTP-date (RFC 9110 IMF-fixdate) for midnight UTC of a day.
pub fn http_date(d: time::Date) -> String {
    d.format(time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] 00:00:00 GMT"
    ))
    .unwrap_or_default()
}

/// An error and its causes, each said once: many errors already end with their cause's
/// text, which is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_say_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer failed: {0}")]
        struct Outer(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("outer failed")]
        struct Bare(#[source] std::io::Error);
        let io = || std::io::Error::other("broken pipe");
        assert_eq!(error_chain(&Outer(io())), "outer failed: broken pipe");
        assert_eq!(error_chain(&Bare(io())), "outer failed: broken pipe");
    }

    #[test]
    fn http_dates_are_imf_fixdates() {
        let d = time::macros::date!(2027 - 09 - 01);
        assert_eq!(http_date(d), "Wed, 01 Sep 2027 00:00:00 GMT");
    }

    #[test]
    fn every_denial_has_its_code_and_the_consumer_is_blamed() {
        let s = || "x".to_owned();
        let cases = [
            (
                Denial::ConsumerSuspended { consumer: s() },
                Code::AuthzSuspended,
            ),
            (
                Denial::ProviderSuspended { provider: s() },
                Code::AuthzSuspended,
            ),
            (
                Denial::SourceIp {
                    consumer: s(),
                    ip: std::net::Ipv4Addr::LOCALHOST.into(),
                },
                Code::AuthzSourceIp,
            ),
            (
                Denial::NoAuthorisation {
                    consumer: s(),
                    service: s(),
                    version: s(),
                },
                Code::AuthzNoAuthorisation,
            ),
            (
                Denial::PurposeNotAuthorised {
                    consumer: s(),
                    service: s(),
                    purpose: s(),
                    authorised: s(),
                },
                Code::AuthzNoAuthorisation,
            ),
            (
                Denial::NotYetValid {
                    authorisation: s(),
                    service: s(),
                    valid_from: time::macros::date!(2027 - 01 - 01),
                },
                Code::AuthzNotYetValid,
            ),
            (
                Denial::Expired {
                    authorisation: s(),
                    service: s(),
                    why: s(),
                },
                Code::AuthzExpired,
            ),
            (
                Denial::PurposeRequired {
                    consumer: s(),
                    service: s(),
                    purposes: s(),
                },
                Code::PurposeRequired,
            ),
        ];
        for (d, code) in cases {
            let r = denial(d);
            assert_eq!(r.code, code);
            assert_eq!(r.side, Side::Consumer);
        }
    }
}
