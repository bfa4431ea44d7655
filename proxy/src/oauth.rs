//! OAuth2 consumers: `Authorization: Bearer <JWT>`.
//!
//! A token is accepted when it is signed by a key of the identity provider's JWKS with an
//! algorithm from the explicit allow-list (asymmetric only: never `none`, never an HMAC
//! keyed with a public key), its header lists no critical extension (`crit`), its issuer
//! and audience are the configured ones, and it is within `exp`/`nbf` (with bounded
//! clock skew). The client id claim (`client_id`, else `azp`) names the consumer. A
//! token bound to a certificate (`cnf.x5t#S256`, RFC 8705) must come over a TLS
//! connection with that certificate; `require_certificate_binding` makes the binding
//! mandatory.
//!
//! Keys: fetched before the listener accepts traffic, refreshed periodically, and
//! refetched when a token names an unknown `kid` (one fetch at a time, at most one per
//! [`MIN_REFETCH_INTERVAL`]). When the identity provider is down, the last good keys stay;
//! when it answers a key set with no key the gateway can use, it has withdrawn the keys
//! held, and tokens are refused until it publishes one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{JwksSource, OAuth};

/// At most one refetch of the JWKS in this interval when tokens name unknown keys.
pub const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Keys are refreshed this often even when every `kid` is known.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(600);
const JWKS_MAX_BYTES: usize = 1 << 20;
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a token is not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("the access token is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the access token is not a valid JWT: {0}")]
    Invalid(String),
    #[error("the token's algorithm {0} is not accepted (accepted: {1})")]
    Algorithm(String, String),
    #[error("no key of the identity provider matches the token (kid {0})")]
    UnknownKey(String),
    #[error(
        "the identity provider's keys are not available (not fetched yet, or none it publishes can check a token)"
    )]
    NoKeys,
    #[error("the token has no `{0}` claim naming the client")]
    NoClientId(String),
    #[error("certificate-bound token (RFC 8705): {0}")]
    Binding(String),
}

impl TokenError {
    /// Binding failures are authorisation refusals; everything else is authentication.
    pub fn is_binding(&self) -> bool {
        matches!(self, Self::Binding(_))
    }
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub client_id: String,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(flatten)]
    other: HashMap<String, serde_json::Value>,
}

#[derive(Default)]
pub(crate) struct KeySet {
    by_kid: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    /// Keys without a `kid`, tried in turn for tokens without one.
    anonymous: Vec<(DecodingKey, Option<Algorithm>)>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .field("anonymous", &self.anonymous.len())
            .finish()
    }
}

/// Why a fetched key set is not put in force.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JwksError {
    /// Not fetched, or not a JWK set: the identity provider may be down or answering
    /// from a broken page, and the last good keys stay.
    #[error("{0}")]
    Unavailable(String),
    /// A JWK set, but none of its keys checks a signature here: the identity provider
    /// publishes no key the gateway may use any longer.
    #[error("the JWK set holds no usable public key")]
    NoUsableKey,
}

pub(crate) fn parse_jwks(bytes: &[u8]) -> Result<KeySet, JwksError> {
    let set: JwkSet = serde_json::from_slice(bytes)
        .map_err(|e| JwksError::Unavailable(format!("not a JWK set: {e}")))?;
    let mut keys = KeySet::default();
    for jwk in &set.keys {
        // A shared secret published in a key set is a misconfiguration: never trust it.
        if matches!(
            jwk.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
        ) {
            tracing::warn!(kid = ?jwk.common.key_id, "symmetric key in the JWKS ignored");
            continue;
        }
        // A key published for encryption (`use: enc`, `key_ops` without `verify`, or an
        // encryption algorithm such as RSA-OAEP) never checks a signature: whoever can
        // make the identity provider decrypt with it could forge one.
        let common = &jwk.common;
        if common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
            || common
                .key_operations
                .as_ref()
                .is_some_and(|ops| !ops.contains(&jsonwebtoken::jwk::KeyOperations::Verify))
        {
            tracing::warn!(kid = ?jwk.common.key_id, "key in the JWKS not published for signatures: ignored");
            continue;
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(a) => match a.to_string().parse::<Algorithm>() {
                Ok(alg) => Some(alg),
                Err(_) => {
                    tracing::warn!(kid = ?jwk.common.key_id, algorithm = %a, "key in the JWKS for an algorithm that signs nothing: ignored");
                    continue;
                }
            },
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            // Unsupported key types are skipped.
            continue;
        };
        match &jwk.common.key_id {
            Some(kid) => {
                keys.by_kid.insert(kid.clone(), (key, alg));
            }
            None => keys.anonymous.push((key, alg)),
        }
    }
    if keys.by_kid.is_empty() && keys.anonymous.is_empty() {
        return Err(JwksError::NoUsableKey);
    }
    Ok(keys)
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<bytes::Bytes>,
>;

/// Validates bearer tokens against the identity provider's keys.
pub struct Verifier {
    source: JwksSource,
    keys: ArcSwap<KeySet>,
    /// When a token with an unknown `kid` last caused a fetch; the lock also makes
    /// fetches one at a time.
    last_on_demand: tokio::sync::Mutex<Option<Instant>>,
    validations: HashMap<Algorithm, Validation>,
    allowed: String,
    client_id_claim: String,
    require_binding: bool,
    max_token_bytes: usize,
    http: HttpClient,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("source", &self.source)
            .field("keys", &self.keys.load())
            .field("allowed", &self.allowed)
            .finish()
    }
}

impl Verifier {
    pub fn new(cfg: &OAuth) -> anyhow::Result<Self> {
        let mut validations = HashMap::new();
        for &alg in &cfg.algorithms {
            // Only one algorithm per validation: jsonwebtoken requires every listed
            // algorithm to match the key's family.
            let mut v = Validation::new(alg);
            v.set_issuer(&[cfg.issuer.as_str()]);
            v.set_audience(&[cfg.audience.as_str()]);
            v.leeway = cfg.leeway.as_secs();
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
            validations.insert(alg, v);
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(certs::tls::upstream_config(None, None)?)
            .https_or_http()
            .enable_http1()
            .build();
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        Ok(Self {
            source: match &cfg.jwks {
                JwksSource::Url(u) => JwksSource::Url(u.clone()),
                JwksSource::File(p) => JwksSource::File(p.clone()),
            },
            keys: ArcSwap::from_pointee(KeySet::default()),
            last_on_demand: tokio::sync::Mutex::new(None),
            validations,
            allowed: cfg
                .algorithms
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            client_id_claim: cfg.client_id_claim.clone(),
            require_binding: cfg.require_certificate_binding,
            max_token_bytes: cfg.max_token_bytes,
            http,
        })
    }

    async fn fetch(&self) -> Result<Vec<u8>, String> {
        let bytes = match &self.source {
            JwksSource::File(p) => {
                let path = p.clone();
                tokio::task::spawn_blocking(move || {
                    certs::load::read_regular_file(&path, JWKS_MAX_BYTES as u64)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?
            }
            JwksSource::Url(url) => {
                let req = http::Request::get(url.clone())
                    .header(http::header::ACCEPT, "application/json")
                    .body(Empty::new())
                    .map_err(|e| e.to_string())?;
                let resp = tokio::time::timeout(JWKS_TIMEOUT, self.http.request(req))
                    .await
                    .map_err(|_| format!("{url} did not answer within {JWKS_TIMEOUT:?}"))?
                    .map_err(|e| format!("{url}: {e}"))?;
                if !resp.status().is_success() {
                    return Err(format!("{url} answered {}", resp.status()));
                }
                let body = tokio::time::timeout(
                    JWKS_TIMEOUT,
                    Limited::new(resp.into_body(), JWKS_MAX_BYTES).collect(),
                )
                .await
                .map_err(|_| format!("{url} body did not arrive within {JWKS_TIMEOUT:?}"))?
                .map_err(|e| format!("{url}: {e}"))?;
                body.to_bytes().to_vec()
            }
        };
        Ok(bytes)
    }

    /// Fetches the keys now (at start-up and periodically). Keeps the last good keys when
    /// the fetch fails.
    pub async fn refresh(&self) -> Result<(), String> {
        let _one_at_a_time = self.last_on_demand.lock().await;
        self.fetch_and_store().await
    }

    /// Fetches the keys because a token names an unknown key, at most once per
    /// [`MIN_REFETCH_INTERVAL`]: unknown `kid`s must not let anyone hammer the identity
    /// provider through the gateway.
    async fn refetch_on_demand(&self) {
        let mut last = self.last_on_demand.lock().await;
        if last.is_some_and(|t| t.elapsed() < MIN_REFETCH_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        let _ = self.fetch_and_store().await;
    }

    async fn fetch_and_store(&self) -> Result<(), String> {
        let fetched = match self.fetch().await {
            Ok(bytes) => parse_jwks(&bytes),
            Err(e) => Err(JwksError::Unavailable(e)),
        };
        match fetched {
            Ok(keys) => {
                tracing::info!(kids = ?keys.by_kid.keys().collect::<Vec<_>>(), "identity provider keys loaded");
                self.keys.store(Arc::new(keys));
                metrics::counter!("fsp_jwks_fetches_total", "result" => "ok").increment(1);
                Ok(())
            }
            // The identity provider answered, and vouches for none of the keys held: a
            // key withdrawn (leaked, say) before its successor is published must stop
            // verifying tokens now, not when another key appears.
            Err(e @ JwksError::NoUsableKey) => {
                tracing::error!(error = %e, "the identity provider publishes no usable key: the keys held are dropped, and bearer tokens are refused until it publishes one");
                self.keys.store(Arc::new(KeySet::default()));
                metrics::counter!("fsp_jwks_fetches_total", "result" => "error").increment(1);
                Err(e.to_string())
            }
            Err(JwksError::Unavailable(e)) => {
                tracing::warn!(error = %e, "identity provider keys could not be fetched; keeping the last good ones");
                metrics::counter!("fsp_jwks_fetches_total", "result" => "error").increment(1);
                Err(e)
            }
        }
    }

    /// Refreshes the keys every [`REFRESH_INTERVAL`] until the verifier is dropped.
    pub fn spawn_refresher(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH_INTERVAL).await;
                let Some(v) = weak.upgrade() else { break };
                let _ = v.refresh().await;
            }
        });
    }

    /// Verifies a bearer token; `certificate_sha256` is the TLS client certificate's
    /// SHA-256 when one was presented on the connection.
    pub async fn verify(
        &self,
        token: &str,
        certificate_sha256: Option<&[u8; 32]>,
    ) -> Result<VerifiedToken, TokenError> {
        if token.len() > self.max_token_bytes {
            return Err(TokenError::TooLarge(self.max_token_bytes));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(why(&e)))?;
        // A header parameter listed in `crit` must be understood, or the token is invalid
        // (RFC 7515 §4.1.11): it may restrict what the token is good for, or change what
        // was signed (`b64`, RFC 7797). The gateway understands no extension, and the JWT
        // library would silently ignore every one.
        if header.crit.is_some() {
            return Err(TokenError::Invalid(
                "its header marks parameters as critical (crit), and this platform understands no header extension".into(),
            ));
        }
        let Some(validation) = self.validations.get(&header.alg) else {
            return Err(TokenError::Algorithm(
                format!("{:?}", header.alg),
                self.allowed.clone(),
            ));
        };
        let kid = header.kid.clone().unwrap_or_default();
        let mut keys = self.keys.load_full();
        let known = |k: &KeySet| {
            if kid.is_empty() {
                !k.anonymous.is_empty()
            } else {
                k.by_kid.contains_key(&kid)
            }
        };
        if !known(&keys) {
            // A new signing key at the identity provider: look again, once in a while.
            self.refetch_on_demand().await;
            keys = self.keys.load_full();
            if keys.by_kid.is_empty() && keys.anonymous.is_empty() {
                return Err(TokenError::NoKeys);
            }
            if !known(&keys) {
                return Err(TokenError::UnknownKey(if kid.is_empty() {
                    "none".into()
                } else {
                    kid
                }));
            }
        }
        let candidates: Vec<&(DecodingKey, Option<Algorithm>)> = if kid.is_empty() {
            keys.anonymous.iter().collect()
        } else {
            keys.by_kid.get(&kid).into_iter().collect()
        };
        let mut last_error = String::from("no key");
        let mut claims_checked = false;
        let mut claims = None;
        for (key, key_alg) in candidates {
            if key_alg.is_some_and(|a| a != header.alg) {
                last_error = format!(
                    "the key is for {key_alg:?}, the token says {:?}",
                    header.alg
                );
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                // A key that verified the signature says more (the token expired, is
                // for another audience...) than the keys that did not.
                Err(e) => {
                    let signature =
                        matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature);
                    if !signature || !claims_checked {
                        last_error = why(&e);
                    }
                    claims_checked |= !signature;
                }
            }
        }
        let claims = claims.ok_or(TokenError::Invalid(last_error))?;
        let client_id = claims
            .other
            .get(&self.client_id_claim)
            .or_else(|| claims.other.get("azp"))
            .and_then(|v| v.as_str())
            .ok_or_else(|| TokenError::NoClientId(self.client_id_claim.clone()))?
            .to_owned();
        // A `cnf` claim binds the token (RFC 7800): one the gateway cannot check (not a
        // certificate thumbprint, or a malformed one) is refused, never taken as unbound.
        let bound = match claims.other.get("cnf") {
            None => None,
            Some(cnf) => match cnf.get("x5t#S256").map(|v| v.as_str()) {
                Some(Some(thumb)) if cnf.as_object().is_some_and(|o| o.len() == 1) => Some(thumb),
                _ => {
                    return Err(TokenError::Binding(
                        "the token's cnf claim binds it in a way the gateway cannot check (only cnf.x5t#S256, a certificate thumbprint, is supported)".into(),
                    ));
                }
            },
        };
        match (bound, certificate_sha256) {
            (Some(thumb), Some(sha)) => {
                let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha);
                if thumb != expected {
                    return Err(TokenError::Binding(
                        "cnf.x5t#S256 names another certificate than the one presented on this connection".into(),
                    ));
                }
            }
            (Some(_), None) => {
                return Err(TokenError::Binding(
                    "the token is bound to a certificate but none was presented on this connection"
                        .into(),
                ));
            }
            (None, _) if self.require_binding => {
                return Err(TokenError::Binding(
                    "this platform requires tokens bound to the client certificate (cnf.x5t#S256)"
                        .into(),
                ));
            }
            (None, _) => {}
        }
        Ok(VerifiedToken { client_id })
    }
}

/// Why a token was refused, in the consumer's terms: a sentence of this gateway's, never
/// the JWT library's own message (which names its types and parser positions).
fn why(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidToken | K::Base64(_) | K::Utf8(_) => {
            "it is not three base64url parts (header, claims, signature)".into()
        }
        K::Json(_) => "its header or claims are not the JSON a JWT holds, or its header names an algorithm this platform does not know (such as none)".into(),
        K::InvalidSignature => "its signature does not verify with the identity provider's key".into(),
        K::MissingRequiredClaim(c) | K::InvalidClaimFormat(c) => {
            format!("its `{c}` claim is missing or not of its type (a number of seconds for exp and nbf)")
        }
        K::ExpiredSignature => "it has expired (exp)".into(),
        K::ImmatureSignature => "it is not valid yet (nbf)".into(),
        K::InvalidIssuer => "another issuer made it (iss)".into(),
        K::InvalidAudience => "it is meant for another audience (aud)".into(),
        K::InvalidSubject => "its subject (sub) is not accepted".into(),
        K::InvalidAlgorithm | K::MissingAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm => {
            "its algorithm is not the key's".into()
        }
        _ => "the identity provider's key cannot check it".into(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_jwks_with_only_symmetric_keys_is_refused() {
        let set = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert!(parse_jwks(set.as_bytes()).is_err());
        assert!(parse_jwks(b"{}").is_err());
        assert!(parse_jwks(b"not json").is_err());
        // A set without a usable key withdraws the keys held; what is not a set keeps them.
        for set in [set.as_bytes(), br#"{"keys":[]}"#] {
            assert!(matches!(parse_jwks(set), Err(JwksError::NoUsableKey)));
        }
        for garbage in [&b"{}"[..], b"not json"] {
            assert!(matches!(
                parse_jwks(garbage),
                Err(JwksError::Unavailable(_))
            ));
        }
    }
}
