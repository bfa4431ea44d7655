//! The one place that turns a refusal into a response.
//!
//! Every phase of the pipeline that refuses a call returns a [`Rejection`]: a contract
//! [`Code`], a human explanation, and any headers the code implies (`Retry-After`, ...).
//! [`render`] writes it as `application/problem+json` (RFC 9457) for REST services and as
//! a SOAP 1.1 or 1.2 Fault for SOAP services; both carry the code and the FSP message id.
//!
//! Every rejection knows which [`Side`] caused it, as pingora's errors do: the audit trail
//! is the platform's evidence and must never blame a provider for a consumer's upload that
//! stalled, nor show a consumer the provider's internal address (that goes to the log and
//! the audit record only, see [`Rejection::internal`]).

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::headers::{FSP_MESSAGE_ID, FSP_TIMESTAMP};
use crate::soap::{self, SoapVersion};

pub mod map;

/// The error codes of the contract (section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Code {
    AuthnMissing,
    AuthnUnknownIdentity,
    AuthnInvalidToken,
    AuthzSourceIp,
    AuthzNoAuthorisation,
    AuthzNotYetValid,
    AuthzExpired,
    AuthzSuspended,
    AuthzTokenBinding,
    /// The client certificate and the bearer token of one call name two different
    /// consumers (extension: 403 `FSP-AUTHZ-CREDENTIAL-CONFLICT`).
    AuthzCredentialConflict,
    PurposeRequired,
    RequestMalformed,
    /// The consumer stopped sending its request body (extension: 408).
    RequestTimeout,
    /// The consumer's request body did not arrive whole: it hung up, or sent fewer bytes
    /// than it announced (extension: 400).
    RequestIncomplete,
    RouteUnknownService,
    RouteUnknownVersion,
    RouteVersionRetired,
    RequestTooLarge,
    Throttled,
    UpstreamUnavailable,
    UpstreamTimeout,
    /// The provider's connection cap is reached and no connection freed up in time:
    /// `FSP-UPSTREAM-UNAVAILABLE` with 503 and `Retry-After` (nothing was sent to it).
    UpstreamBusy,
    AuditUnavailable,
    /// A replica of a cluster that does not know the cluster's suspensions yet (its Redis
    /// has not answered since the start and it keeps no last known set): it cannot tell
    /// a consumer cut off elsewhere from one that is not (extension: 503
    /// `FSP-GATEWAY-NOT-READY`, with `Retry-After`).
    GatewayNotReady,
}

/// Who caused a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The caller: bad credentials, no authorisation, a malformed, stalled or abandoned
    /// request.
    Consumer,
    /// The provider: unreachable, too slow, or an invalid answer.
    Provider,
    /// The platform itself: audit trail down, capacity protection, configuration.
    Gateway,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Consumer => "consumer",
            Self::Provider => "provider",
            Self::Gateway => "gateway",
        }
    }
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthnMissing => "FSP-AUTHN-MISSING",
            Self::AuthnUnknownIdentity => "FSP-AUTHN-UNKNOWN-IDENTITY",
            Self::AuthnInvalidToken => "FSP-AUTHN-INVALID-TOKEN",
            Self::AuthzSourceIp => "FSP-AUTHZ-SOURCE-IP",
            Self::AuthzNoAuthorisation => "FSP-AUTHZ-NO-AUTHORISATION",
            Self::AuthzNotYetValid => "FSP-AUTHZ-NOT-YET-VALID",
            Self::AuthzExpired => "FSP-AUTHZ-EXPIRED",
            Self::AuthzSuspended => "FSP-AUTHZ-SUSPENDED",
            Self::AuthzTokenBinding => "FSP-AUTHZ-TOKEN-BINDING",
            Self::AuthzCredentialConflict => "FSP-AUTHZ-CREDENTIAL-CONFLICT",
            Self::PurposeRequired => "FSP-PURPOSE-REQUIRED",
            Self::RequestMalformed => "FSP-REQUEST-MALFORMED",
            Self::RequestTimeout => "FSP-REQUEST-TIMEOUT",
            Self::RequestIncomplete => "FSP-REQUEST-INCOMPLETE",
            Self::RouteUnknownService => "FSP-ROUTE-UNKNOWN-SERVICE",
            Self::RouteUnknownVersion => "FSP-ROUTE-UNKNOWN-VERSION",
            Self::RouteVersionRetired => "FSP-ROUTE-VERSION-RETIRED",
            Self::RequestTooLarge => "FSP-REQUEST-TOO-LARGE",
            Self::Throttled => "FSP-THROTTLED",
            Self::UpstreamUnavailable => "FSP-UPSTREAM-UNAVAILABLE",
            Self::UpstreamTimeout => "FSP-UPSTREAM-TIMEOUT",
            Self::UpstreamBusy => "FSP-UPSTREAM-UNAVAILABLE",
            Self::AuditUnavailable => "FSP-AUDIT-UNAVAILABLE",
            Self::GatewayNotReady => "FSP-GATEWAY-NOT-READY",
        }
    }

    /// Who causes a failure of this kind, unless the rejection says otherwise.
    pub fn side(self) -> Side {
        match self {
            Self::AuthnMissing
            | Self::AuthnUnknownIdentity
            | Self::AuthnInvalidToken
            | Self::AuthzSourceIp
            | Self::AuthzNoAuthorisation
            | Self::AuthzNotYetValid
            | Self::AuthzExpired
            | Self::AuthzSuspended
            | Self::AuthzTokenBinding
            | Self::AuthzCredentialConflict
            | Self::PurposeRequired
            | Self::RequestMalformed
            | Self::RequestTimeout
            | Self::RequestIncomplete
            | Self::RouteUnknownService
            | Self::RouteUnknownVersion
            | Self::RouteVersionRetired
            | Self::RequestTooLarge
            | Self::Throttled => Side::Consumer,
            Self::UpstreamUnavailable | Self::UpstreamTimeout => Side::Provider,
            Self::UpstreamBusy | Self::AuditUnavailable | Self::GatewayNotReady => Side::Gateway,
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::AuthnMissing | Self::AuthnUnknownIdentity | Self::AuthnInvalidToken => {
                StatusCode::UNAUTHORIZED
            }
            Self::AuthzSourceIp
            | Self::AuthzNoAuthorisation
            | Self::AuthzNotYetValid
            | Self::AuthzExpired
            | Self::AuthzSuspended
            | Self::AuthzTokenBinding
            | Self::AuthzCredentialConflict => StatusCode::FORBIDDEN,
            Self::PurposeRequired | Self::RequestMalformed | Self::RequestIncomplete => {
                StatusCode::BAD_REQUEST
            }
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::RouteUnknownService | Self::RouteUnknownVersion => StatusCode::NOT_FOUND,
            Self::RouteVersionRetired => StatusCode::GONE,
            Self::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Throttled => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamBusy | Self::AuditUnavailable | Self::GatewayNotReady => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// A short, stable summary (the problem's `title`).
    pub fn title(self) -> &'static str {
        match self {
            Self::AuthnMissing => "No credential presented",
            Self::AuthnUnknownIdentity => "Credential not registered to a consumer",
            Self::AuthnInvalidToken => "Invalid access token",
            Self::AuthzSourceIp => "Source address not allowed",
            Self::AuthzNoAuthorisation => "No authorisation for this service",
            Self::AuthzNotYetValid => "Authorisation not yet valid",
            Self::AuthzExpired => "Authorisation expired",
            Self::AuthzSuspended => "Access suspended",
            Self::AuthzTokenBinding => "Token not bound to this certificate",
            Self::AuthzCredentialConflict => "Certificate and token name different consumers",
            Self::PurposeRequired => "Purpose required",
            Self::RequestMalformed => "Malformed request",
            Self::RequestTimeout => "Request body not received in time",
            Self::RequestIncomplete => "Request body incomplete",
            Self::RouteUnknownService => "Unknown service",
            Self::RouteUnknownVersion => "Unknown service version",
            Self::RouteVersionRetired => "Service version retired",
            Self::RequestTooLarge => "Request too large",
            Self::Throttled => "Too many requests",
            Self::UpstreamUnavailable => "Provider unavailable",
            Self::UpstreamTimeout => "Provider timed out",
            Self::UpstreamBusy => "Provider at capacity",
            Self::AuditUnavailable => "Audit trail unavailable",
            Self::GatewayNotReady => "Gateway not ready",
        }
    }

    /// Whether the fault lies with the caller (SOAP `Client`/`Sender`) or the platform.
    fn is_client_fault(self) -> bool {
        self.status().is_client_error()
    }
}

/// A refused call: what to tell the consumer.
#[derive(Debug)]
pub struct Rejection {
    pub code: Code,
    /// Shown to the consumer: no internal addresses, OS errors or library names.
    pub detail: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub side: Side,
    /// The full story for the log and the audit record (addresses, OS errors), when it
    /// says more than `detail`.
    pub internal: Option<String>,
}

impl Rejection {
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            headers: Vec::new(),
            side: code.side(),
            internal: None,
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Blames another side than the code's usual one.
    pub fn blaming(mut self, side: Side) -> Self {
        self.side = side;
        self
    }

    /// Adds the detail meant for the log and the audit record only.
    pub fn with_internal(mut self, internal: impl Into<String>) -> Self {
        self.internal = Some(internal.into());
        self
    }

    /// What the audit record and the log keep of the reason.
    pub fn recorded_detail(&self) -> &str {
        self.internal.as_deref().unwrap_or(&self.detail)
    }
}

/// The form an error response takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorForm {
    Problem,
    Soap(SoapVersion),
}

/// Renders a rejection as a response, stamped with the call's message id and timestamp.
pub fn render(
    rejection: &Rejection,
    form: ErrorForm,
    message_id: &str,
    timestamp: &str,
) -> Response<Bytes> {
    let code = rejection.code;
    let (content_type, body): (&'static str, Bytes) = match form {
        ErrorForm::Problem => {
            let problem = serde_json::json!({
                "type": format!("urn:be:fgov:fsp:error:{}", code.as_str()),
                "title": code.title(),
                "status": code.status().as_u16(),
                "detail": rejection.detail,
                "code": code.as_str(),
                "messageId": message_id,
                "instance": format!("urn:uuid:{message_id}"),
            });
            ("application/problem+json", Bytes::from(problem.to_string()))
        }
        ErrorForm::Soap(version) => (
            version.content_type(),
            Bytes::from(soap::fault(
                version,
                code.is_client_fault(),
                code.as_str(),
                code.title(),
                &rejection.detail,
                message_id,
                timestamp,
            )),
        ),
    };
    let mut response = Response::new(body);
    *response.status_mut() = code.status();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(message_id) {
        headers.insert(FSP_MESSAGE_ID, v);
    }
    if let Ok(v) = HeaderValue::from_str(timestamp) {
        headers.insert(FSP_TIMESTAMP, v);
    }
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    for (name, value) in &rejection.headers {
        headers.append(name.clone(), value.clone());
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn problem_json_has_every_contract_field() {
        let r = Rejection::new(
            Code::RouteUnknownVersion,
            "service person/getPerson has no version v9",
        );
        let resp = render(
            &r,
            ErrorForm::Problem,
            "0190-abc",
            "2026-11-24T10:00:00.000Z",
        );
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(resp.headers()[FSP_MESSAGE_ID], "0190-abc");
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        for k in ["type", "title", "status", "detail", "code", "messageId"] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["code"], "FSP-ROUTE-UNKNOWN-VERSION");
        assert_eq!(v["status"], 404);
        assert_eq!(v["messageId"], "0190-abc");
    }

    #[test]
    fn every_code_has_the_contract_status() {
        use Code::*;
        let table = [
            (AuthnMissing, 401),
            (AuthnUnknownIdentity, 401),
            (AuthnInvalidToken, 401),
            (AuthzSourceIp, 403),
            (AuthzNoAuthorisation, 403),
            (AuthzNotYetValid, 403),
            (AuthzExpired, 403),
            (AuthzSuspended, 403),
            (AuthzTokenBinding, 403),
            (AuthzCredentialConflict, 403),
            (PurposeRequired, 400),
            (RequestMalformed, 400),
            (RequestTimeout, 408),
            (RequestIncomplete, 400),
            (RouteUnknownService, 404),
            (RouteUnknownVersion, 404),
            (RouteVersionRetired, 410),
            (RequestTooLarge, 413),
            (Throttled, 429),
            (UpstreamUnavailable, 502),
            (UpstreamTimeout, 504),
            (UpstreamBusy, 503),
            (AuditUnavailable, 503),
        ];
        for (code, status) in table {
            assert_eq!(code.status().as_u16(), status, "{}", code.as_str());
            assert!(code.as_str().starts_with("FSP-"));
        }
    }
}
