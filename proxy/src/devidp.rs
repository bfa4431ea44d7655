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
            let where_ = || format!("{} line {}", clients.display(), n + 1);
            let Some((id, secret)) = line.split_once(':') else {
                anyhow::bail!("{}: expected client_id:secret", where_());
            };
            let (id, secret) = (id.trim(), secret.trim());
            if id.is_empty() || secret.len() < 16 {
                anyhow::bail!(
                    "{}: a client needs an id and a secret of at least 16 characters",
                    where_()
                );
            }
            if list.iter().any(|(known, _): &(String, String)| known == id) {
                anyhow::bail!("{}: client {id} is given twice", where_());
            }
            list.push((id.to_owned(), secret.to_owned()));
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
            let same = certs::identity::same_secret(known.as_bytes(), id.as_bytes())
                & certs::identity::same_secret(known_secret.as_bytes(), secret.as_bytes());
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

/// Connections open at once (it shares the gateway's process and descriptors).
const MAX_CONNECTIONS: usize = 64;

/// Serves `POST /token` until the task is dropped.
pub async fn serve(issuer: Arc<TokenIssuer>, listener: TcpListener) {
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            continue;
        };
        let issuer = issuer.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let issuer = issuer.clone();
                async move { Ok::<_, Infallible>(token(&issuer, req).await) }
            });
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
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
    // Each part is form-urlencoded first (RFC 6749 §2.3.1).
    Some((form_decoded(id)?, form_decoded(secret)?))
}

/// `application/x-www-form-urlencoded` decoding of one value (None: not valid UTF-8).
fn form_decoded(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
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
    let authorization = req.headers().contains_key(header::AUTHORIZATION);
    let from_header = basic(&req);
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        Limited::new(req.into_body(), MAX_REQUEST_BYTES).collect(),
    );
    let body = match read.await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body is unreadable, larger than 8 KiB or took longer than 10 s",
            );
        }
    };
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    // A parameter given twice is refused (RFC 6749 §3.2), not read one way or the other.
    let repeated = form
        .iter()
        .enumerate()
        .any(|(i, (k, _))| form[..i].iter().any(|(earlier, _)| earlier == k));
    if repeated {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a parameter is given more than once",
        );
    }
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    // One way of authenticating the client (RFC 6749 §2.3), and a header that is there
    // must be readable.
    if authorization && (from_header.is_none() || field("client_secret").is_some()) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "authenticate the client one way: HTTP Basic, or client_id and client_secret in the form",
        );
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_decoded() {
        assert_eq!(form_decoded("a%3Ab+c").as_deref(), Some("a:b c"));
        assert_eq!(form_decoded("plain").as_deref(), Some("plain"));
        assert_eq!(form_decoded("bad%4"), None);
        assert_eq!(form_decoded("bad%zz"), None);
        assert_eq!(form_decoded("%ff"), None, "not UTF-8");
    }

    #[test]
    fn clients_need_an_id_and_a_long_secret_once() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let k = certs::devpki::SigningKey::generate().unwrap();
        std::fs::write(&key, &k.private_pem).unwrap();
        let clients = dir.path().join("clients");
        let load = |text: &str| {
            std::fs::write(&clients, text).unwrap();
            TokenIssuer::load("http://127.0.0.1:1", "fsp", &key, &clients)
        };
        let ok = load("# comment\napp:0123456789abcdef\n").unwrap();
        assert_eq!(ok.first_client(), Some(("app", "0123456789abcdef")));
        assert!(ok.client("app", "0123456789abcdef").is_some());
        assert!(ok.client("app", "0123456789abcdeF").is_none());
        assert!(ok.client("", "").is_none());
        for bad in [
            "app:\n",
            ":0123456789abcdef\n",
            "app:short\n",
            "no-colon\n",
            "app:0123456789abcdef\napp:fedcba9876543210\n",
        ] {
            assert!(load(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
