//! The quickstart's OAuth2 token endpoint: the client-credentials grant (RFC 6749 §4.4)
//! for the sample consumers' OAuth clients, access tokens signed (ES256) with the
//! quickstart's own key, whose JWKS the gateway reads from a file (`[oauth] jwks_file`).
//!
//! A development aid on loopback, so that a newcomer sees an OAuth call end to end; it is
//! not an identity provider (no consent, no refresh tokens, no key rotation).

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// How long an issued token is valid.
const TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// The largest token request read.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// The key id in the JWKS and in every token's header.
pub const KEY_ID: &str = "quickstart-1";

/// Issues tokens to known clients.
pub struct TokenIssuer {
    issuer: String,
    audience: String,
    key: jsonwebtoken::EncodingKey,
    /// Client id and secret, from the clients file.
    clients: Vec<(String, String)>,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("issuer", &self.issuer)
            .field(
                "clients",
                &self.clients.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// `key`: the signing key (PKCS#8 PEM); `clients`: `client_id:secret` per line
    /// (blank lines and `#` comments skipped).
    pub fn load(issuer: &str, audience: &str, key: &Path, clients: &Path) -> anyhow::Result<Self> {
        let pem = std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem)
            .with_context(|| format!("{} is not an EC private key", key.display()))?;
        let text = std::fs::read_to_string(clients)
            .with_context(|| format!("cannot read {}", clients.display()))?;
        let mut list = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((id, secret)) = line.split_once(':') else {
                anyhow::bail!(
                    "{} line {}: expected client_id:secret",
                    clients.display(),
                    n + 1
                );
            };
            list.push((id.trim().to_owned(), secret.trim().to_owned()));
        }
        Ok(Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            key,
            clients: list,
        })
    }

    /// The first client of the clients file: its id and secret.
    pub fn first_client(&self) -> Option<(&str, &str)> {
        self.clients.first().map(|(c, s)| (c.as_str(), s.as_str()))
    }

    /// The client whose id and secret these are.
    fn client(&self, id: &str, secret: &str) -> Option<&str> {
        // Every client is compared, each in constant time, so timing says nothing.
        let mut found = None;
        for (known, known_secret) in &self.clients {
            let same = same_digest(known.as_bytes(), id.as_bytes())
                & same_digest(known_secret.as_bytes(), secret.as_bytes());
            if same && found.is_none() {
                found = Some(known.as_str());
            }
        }
        found
    }

    /// A signed access token for `client_id`.
    fn issue(&self, client_id: &str) -> anyhow::Result<String> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": client_id,
            "client_id": client_id,
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_LIFETIME.as_secs() as i64,
            "jti": uuid::Uuid::now_v7().to_string(),
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(KEY_ID.to_owned());
        header.typ = Some("at+jwt".to_owned());
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }
}

fn same_digest(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (certs::identity::sha256(a).0, certs::identity::sha256(b).0);
    a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The JWKS (one ES256 key) for a key's public point.
pub fn jwks(key: &certs::devpki::SigningKey) -> serde_json::Value {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    serde_json::json!({"keys": [{
        "kty": "EC",
        "crv": "P-256",
        "x": b64(&key.x),
        "y": b64(&key.y),
        "alg": "ES256",
        "use": "sig",
        "kid": KEY_ID,
    }]})
}

/// Serves `POST /token` until the task is dropped.
pub async fn serve(issuer: Arc<TokenIssuer>, listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let issuer = issuer.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let issuer = issuer.clone();
                async move { Ok::<_, Infallible>(token(&issuer, req).await) }
            });
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let _ = tokio::time::timeout(
                Duration::from_secs(60),
                http.serve_connection(TokioIo::new(tcp), svc),
            )
            .await;
        });
    }
}

/// An OAuth2 error answer (RFC 6749 §5.2).
fn error(status: StatusCode, code: &str, description: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"error": code, "error_description": description});
    let mut r = json(status, &body);
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"fsp-quickstart\""),
        );
    }
    r
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    // Tokens are never cached (RFC 6749 §5.1).
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

/// The client id and secret from HTTP Basic authentication (RFC 6749 §2.3.1).
fn basic(req: &Request<Incoming>) -> Option<(String, String)> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

async fn token(issuer: &TokenIssuer, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/token" {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the token endpoint is POST /token",
        );
    }
    if req.method() != Method::POST {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint takes POST",
        );
        r.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return r;
    }
    let from_header = basic(&req);
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body is unreadable or larger than 8 KiB",
            );
        }
    };
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if field("grant_type") != Some("client_credentials") {
        return error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only grant_type=client_credentials is supported",
        );
    }
    let credentials = from_header.or_else(|| {
        Some((
            field("client_id")?.to_owned(),
            field("client_secret")?.to_owned(),
        ))
    });
    let Some(client) = credentials
        .as_ref()
        .and_then(|(id, secret)| issuer.client(id, secret))
    else {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "unknown client or wrong secret (HTTP Basic, or client_id and client_secret in the form)",
        );
    };
    match issuer.issue(client) {
        Ok(token) => json(
            StatusCode::OK,
            &serde_json::json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": TOKEN_LIFETIME.as_secs(),
            }),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &format!("cannot sign the token: {e}"),
        ),
    }
}
