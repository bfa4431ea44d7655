//! OAuth2 consumers end to end: JWTs validated against a JWKS served by the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const ISSUER: &str = "https://idp.test/";
const CLIENT: &str = "ville-bxl-app";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key and its public JWK.
struct Key {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: serde_json::Value,
    /// The public key as PEM, for the HMAC confusion attack.
    public_pem: String,
}

fn ec_key(kid: &str) -> Key {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw();
    assert_eq!(raw.len(), 65);
    Key {
        kid: kid.into(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256", "x": b64(&raw[1..33]), "y": b64(&raw[33..])}),
        public_pem: pair.public_key_pem(),
    }
}

fn rsa_key(kid: &str) -> Key {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let der = rcgen::PublicKeyData::subject_public_key_info(&pair);
    let (_, spki) =
        <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<_>>::from_der(
            &der,
        )
        .unwrap();
    let x509_parser::public_key::PublicKey::RSA(rsa) = spki.parsed().unwrap() else {
        panic!("not RSA")
    };
    let strip = |b: &[u8]| {
        b.iter()
            .skip_while(|x| **x == 0)
            .copied()
            .collect::<Vec<u8>>()
    };
    Key {
        kid: kid.into(),
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64(&strip(rsa.modulus)), "e": b64(&strip(rsa.exponent))}),
        public_pem: pair.public_key_pem(),
    }
}

/// A JWKS endpoint whose keys the test can change, and which can be taken down.
#[derive(Clone)]
struct Idp {
    keys: Arc<Mutex<Vec<serde_json::Value>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    fetches: Arc<std::sync::atomic::AtomicUsize>,
    port: u16,
}

impl Idp {
    async fn start(keys: Vec<serde_json::Value>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idp = Self {
            keys: Arc::new(Mutex::new(keys)),
            down: Arc::default(),
            fetches: Arc::default(),
            port: listener.local_addr().unwrap().port(),
        };
        let me = idp.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let me = me.clone();
                        async move {
                            me.fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let mut r = if me.down.load(std::sync::atomic::Ordering::SeqCst) {
                                http::Response::new(Full::new(Bytes::from("down for maintenance")))
                            } else {
                                let keys = me.keys.lock().unwrap().clone();
                                http::Response::new(Full::new(Bytes::from(
                                    json!({"keys": keys}).to_string(),
                                )))
                            };
                            if me.down.load(std::sync::atomic::Ordering::SeqCst) {
                                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            }
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        idp
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn claims(client: &str) -> serde_json::Value {
    json!({"iss": ISSUER, "aud": "fsp", "client_id": client, "iat": now(), "exp": now() + 300, "scope": "person"})
}

fn sign(key: &Key, claims: &serde_json::Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = (!key.kid.is_empty()).then(|| key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

struct Setup {
    gw: Gateway,
    pki: Pki,
}

async fn setup(idp: &Idp, binding: bool) -> Setup {
    let pki = Pki::new();
    let config = oauth_config(&pki, idp, binding, "").await;
    let gw = Gateway::start(&config).await;
    Setup { gw, pki }
}

/// The test configuration with the consumer's OAuth client id, `[oauth]` reading the
/// keys of `idp`, and `more` (consumers) appended.
async fn oauth_config(pki: &Pki, idp: &Idp, binding: bool, more: &str) -> std::path::PathBuf {
    let up = upstream().await;
    let config = write_config(pki, up, 0, 0, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "certificates = [ { cn = \"monopinion.bruxelles.be\" } ]",
        &format!("certificates = [ {{ cn = \"monopinion.bruxelles.be\" }} ]\noauth_client_ids = [\"{CLIENT}\"]"),
    );
    let oauth = format!(
        "\n[oauth]\nissuer = \"{ISSUER}\"\njwks_url = \"http://127.0.0.1:{}/jwks\"\naudience = \"fsp\"\nalgorithms = [\"ES256\", \"RS256\"]\nleeway = \"30s\"\nrequire_certificate_binding = {binding}\n",
        idp.port
    );
    std::fs::write(&config, format!("{text}{more}{oauth}")).unwrap();
    config
}

async fn call(
    s: &Setup,
    token: &str,
    with_cert: bool,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let c = client(&s.pki, with_cert.then_some(&s.pki.consumer), false);
    let mut req = get(&s.gw.url("/person/getPerson/v3/oauth"));
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (status, h, body, _) = send(&c, req).await.unwrap();
    (status, h, json(&body))
}

/// The token is refused with 401, and the problem says why in this gateway's words:
/// `said`, and nothing of the JWT library's own messages.
async fn refused_saying(s: &Setup, token: &str, what: &str, said: &str) {
    let (status, h, body) = call(s, token, false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
    assert_eq!(body["code"], "FSP-AUTHN-INVALID-TOKEN", "{what}: {body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(said), "{what}: {body}");
    for library in [
        "variant",
        "column",
        "Missing required",
        "Invalid",
        "Expired",
        "Immature",
    ] {
        assert!(!detail.contains(library), "{what}: {body}");
    }
    assert!(
        h["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"),
        "{what}"
    );
}

async fn refused(s: &Setup, token: &str, what: &str) {
    refused_saying(s, token, what, "").await;
}

#[tokio::test]
async fn valid_and_invalid_tokens() {
    let es = ec_key("es-1");
    let rsa = rsa_key("rsa-1");
    let idp = Idp::start(vec![es.jwk.clone(), rsa.jwk.clone()]).await;
    let s = setup(&idp, false).await;

    for key in [&es, &rsa] {
        let (status, h, body) = call(&s, &sign(key, &claims(CLIENT)), false).await;
        assert_eq!(status, StatusCode::OK, "{:?}: {body}", key.alg);
        assert_eq!(body["headers"]["fsp-consumer"], "ville-bxl");
        assert!(
            body["headers"].get("authorization").is_none(),
            "the token must not reach the provider"
        );
        let id = h["fsp-message-id"].to_str().unwrap().to_owned();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let r = audit_records(&s.pki)
            .into_iter()
            .find(|r| r["message_id"] == id.as_str())
            .unwrap();
        assert_eq!(
            (r["credential"].as_str(), r["credential_id"].as_str()),
            (Some("oauth"), Some(CLIENT))
        );
    }

    let mut c = claims(CLIENT);
    c["exp"] = json!(now() - 120);
    refused_saying(&s, &sign(&es, &c), "expired", "it has expired (exp)").await;
    let mut c = claims(CLIENT);
    c["nbf"] = json!(now() + 600);
    refused_saying(&s, &sign(&es, &c), "not yet valid", "not valid yet (nbf)").await;
    let mut c = claims(CLIENT);
    c["exp"] = json!(now() - 10);
    let (status, ..) = call(&s, &sign(&es, &c), false).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "10 s past exp is within the 30 s leeway"
    );
    let mut c = claims(CLIENT);
    c["iss"] = json!("https://evil.test/");
    refused_saying(
        &s,
        &sign(&es, &c),
        "wrong issuer",
        "another issuer made it (iss)",
    )
    .await;
    let mut c = claims(CLIENT);
    c["aud"] = json!("another-api");
    refused_saying(
        &s,
        &sign(&es, &c),
        "wrong audience",
        "another audience (aud)",
    )
    .await;
    // A claim of the wrong type is not called missing.
    let mut c = claims(CLIENT);
    c["exp"] = json!("9999999999");
    refused_saying(
        &s,
        &sign(&es, &c),
        "exp as text",
        "`exp` claim is missing or not of its type",
    )
    .await;

    // alg: none.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims(CLIENT).to_string().as_bytes())
    );
    refused_saying(&s, &none, "alg none", "such as none").await;

    // HS256, keyed with the RSA public key the gateway trusts.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(rsa.kid.clone());
    let confused = jsonwebtoken::encode(
        &header,
        &claims(CLIENT),
        &EncodingKey::from_secret(rsa.public_pem.as_bytes()),
    )
    .unwrap();
    refused(&s, &confused, "HS256 with the RSA public key").await;

    // Well signed by the identity provider, but its header marks an extension as
    // critical: a recipient that does not understand it must refuse the token
    // (RFC 7515 §4.1.11), never ignore the restriction it carries.
    let mut header = Header::new(es.alg);
    header.kid = Some(es.kid.clone());
    header.crit = Some(vec!["urn:example:use-only-from".into()]);
    header
        .extras
        .insert("urn:example:use-only-from", "10.1.2.3");
    let critical = jsonwebtoken::encode(&header, &claims(CLIENT), &es.encoding).unwrap();
    refused_saying(&s, &critical, "crit header", "critical (crit)").await;

    // A valid token whose payload is changed after signing.
    let good = sign(&es, &claims(CLIENT));
    let parts: Vec<&str> = good.split('.').collect();
    let mut forged = claims(CLIENT);
    forged["client_id"] = json!("cpas-liege-app");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(forged.to_string().as_bytes()),
        parts[2]
    );
    refused_saying(
        &s,
        &tampered,
        "tampered payload",
        "signature does not verify",
    )
    .await;

    refused(&s, &"a".repeat(9000), "oversize").await;
    refused_saying(&s, "not.a.jwt", "garbage", "not three base64url parts").await;

    // A well-signed token for a client no consumer owns.
    let (status, _, body) = call(&s, &sign(&es, &claims("stranger-app")), false).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("FSP-AUTHN-UNKNOWN-IDENTITY"))
    );
}

/// An identity provider may publish several keys without `kid`: a token without one is
/// tried against each, and when one of them verified its signature, the refusal names what
/// that key found wrong (expired, another audience), not the other keys' bad signature,
/// whichever place the right key has in the set.
#[tokio::test]
async fn with_several_keys_without_kid_the_key_that_verified_names_the_refusal() {
    let anonymous = |k: &Key| {
        let mut jwk = k.jwk.clone();
        jwk.as_object_mut().unwrap().remove("kid");
        jwk
    };
    let (mut first, mut second, mut stranger) = (ec_key(""), ec_key(""), ec_key(""));
    for k in [&mut first, &mut second, &mut stranger] {
        k.kid.clear();
    }
    let idp = Idp::start(vec![anonymous(&first), anonymous(&second)]).await;
    let s = setup(&idp, false).await;

    let expired = {
        let mut c = claims(CLIENT);
        c["iat"] = json!(now() - 600);
        c["exp"] = json!(now() - 300);
        c
    };
    let elsewhere = {
        let mut c = claims(CLIENT);
        c["aud"] = json!("another-platform");
        c
    };
    for (key, place) in [(&first, "first"), (&second, "second")] {
        let (status, _, body) = call(&s, &sign(key, &claims(CLIENT)), false).await;
        assert_eq!(status, StatusCode::OK, "the {place} key: {body}");
        let what = format!("expired, signed by the {place} key");
        refused_saying(&s, &sign(key, &expired), &what, "expired").await;
        let what = format!("another audience, signed by the {place} key");
        refused_saying(&s, &sign(key, &elsewhere), &what, "another audience").await;
    }
    // Signed by no key of the set: then the signature is what is wrong.
    refused_saying(
        &s,
        &sign(&stranger, &expired),
        "signed by a key not in the set",
        "signature does not verify",
    )
    .await;
}

#[tokio::test]
async fn unknown_kid_refetches_and_a_down_identity_provider_keeps_the_cached_keys() {
    let old = ec_key("2026-01");
    let idp = Idp::start(vec![old.jwk.clone()]).await;
    let s = setup(&idp, false).await;
    assert_eq!(
        call(&s, &sign(&old, &claims(CLIENT)), false).await.0,
        StatusCode::OK
    );

    // The identity provider rotates: a token signed with the new key is accepted after
    // one refetch.
    let new = ec_key("2026-02");
    idp.keys.lock().unwrap().push(new.jwk.clone());
    let before = idp.fetches.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        call(&s, &sign(&new, &claims(CLIENT)), false).await.0,
        StatusCode::OK
    );
    assert_eq!(
        idp.fetches.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );

    // Unknown kids do not hammer the identity provider.
    let rogue = ec_key("rogue");
    for _ in 0..5 {
        refused(&s, &sign(&rogue, &claims(CLIENT)), "unknown kid").await;
    }
    assert!(
        idp.fetches.load(std::sync::atomic::Ordering::SeqCst) <= before + 2,
        "refetches are rate-limited"
    );

    // The identity provider goes down: the cached keys still work.
    idp.down.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        call(&s, &sign(&old, &claims(CLIENT)), false).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, &sign(&new, &claims(CLIENT)), false).await.0,
        StatusCode::OK
    );
}

/// An identity provider that withdraws its only key (a leaked one, before the next is
/// made) answers a key set with no usable key: the withdrawn key must stop verifying
/// tokens, as it would were another key published beside it. Only a failed fetch keeps
/// the last good keys.
#[tokio::test]
async fn a_key_set_without_usable_keys_withdraws_the_keys_held() {
    let leaked = ec_key("leaked");
    let idp = Idp::start(vec![leaked.jwk.clone()]).await;
    let s = setup(&idp, false).await;
    let token = sign(&leaked, &claims(CLIENT));
    assert_eq!(call(&s, &token, false).await.0, StatusCode::OK);

    // Withdrawn, and only a key the gateway must not use left: a token naming an unknown
    // key makes the gateway fetch the set again.
    *idp.keys.lock().unwrap() =
        vec![json!({"kty": "oct", "k": "c2VjcmV0", "kid": "h", "use": "sig"})];
    let before = idp.fetches.load(std::sync::atomic::Ordering::SeqCst);
    refused(&s, &sign(&ec_key("next"), &claims(CLIENT)), "unknown kid").await;
    assert_eq!(
        idp.fetches.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );
    let (status, _, body) = call(&s, &token, false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], "FSP-AUTHN-INVALID-TOKEN", "{body}");
}

#[tokio::test]
async fn certificate_bound_tokens() {
    let key = ec_key("k");
    let idp = Idp::start(vec![key.jwk.clone()]).await;
    let s = setup(&idp, true).await;
    let thumb = b64(&certs::sha256(&s.pki.consumer.der).0);

    let mut bound = claims(CLIENT);
    bound["cnf"] = json!({"x5t#S256": thumb});
    let (status, _, body) = call(&s, &sign(&key, &bound), true).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, _, body) = call(&s, &sign(&key, &claims(CLIENT)), true).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("FSP-AUTHZ-TOKEN-BINDING")),
        "unbound token"
    );

    let (status, _, body) = call(&s, &sign(&key, &bound), false).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("FSP-AUTHZ-TOKEN-BINDING")),
        "no certificate"
    );

    let mut other = claims(CLIENT);
    other["cnf"] = json!({"x5t#S256": b64(&[7u8; 32])});
    let (status, _, body) = call(&s, &sign(&key, &other), true).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("FSP-AUTHZ-TOKEN-BINDING")),
        "another certificate"
    );
}

#[tokio::test]
async fn a_certificate_beside_a_token_is_recorded_and_refused_when_it_names_another_consumer() {
    let key = ec_key("k");
    let idp = Idp::start(vec![key.jwk.clone()]).await;
    let pki = Pki::new();
    // A second consumer, identified by another certificate.
    let config = oauth_config(
        &pki,
        &idp,
        false,
        "\n[[consumer]]\nid           = \"ville-gent\"\norganisation = \"Stad Gent\"\ncertificates = [ { cn = \"unknown.example.be\" } ]\n",
    )
    .await;
    let mut gw = Gateway::start(&config).await;
    let token = sign(&key, &claims(CLIENT));
    let with = |identity: Option<&certs::devpki::Issued>, path: &str| {
        let c = client(&pki, identity, false);
        let mut req = get(&gw.url(&format!("/person/getPerson/v3/{path}")));
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        async move {
            let (status, _, body, _) = send(&c, req).await.unwrap();
            (status, json(&body))
        }
    };
    // Ville de Gent's certificate with Ville de Bruxelles's token: refused.
    let (status, body) = with(Some(&pki.stranger), "mixed").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "FSP-AUTHZ-CREDENTIAL-CONFLICT", "{body}");
    // The same consumer both ways: served.
    let (status, body) = with(Some(&pki.consumer), "same").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The token alone: served, and no certificate to record.
    let (status, body) = with(None, "token-alone").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(gw.stop().code(), Some(0));
    let records = audit_records(&pki);
    let of = |path: &str| {
        records
            .iter()
            .find(|r| r["operation"] == format!("GET /person/getPerson/v3/{path}"))
            .unwrap_or_else(|| panic!("no record of {path}: {records:?}"))
    };
    let sha256 = |identity: &certs::devpki::Issued| certs::sha256(&identity.der).to_string();

    let refused = of("mixed");
    assert_eq!(
        refused["decision"], "FSP-AUTHZ-CREDENTIAL-CONFLICT",
        "{refused}"
    );
    assert_eq!(refused["status"], 403, "{refused}");
    assert_eq!(refused["credential"], "oauth");
    assert_eq!(refused["credential_id"], CLIENT);
    assert_eq!(
        refused["certificate_sha256"],
        sha256(&pki.stranger),
        "{refused}"
    );
    assert_eq!(refused["fault"], "consumer");
    let detail = refused["detail"].as_str().unwrap();
    assert!(
        detail.contains("ville-gent") && detail.contains("ville-bxl"),
        "{refused}"
    );

    let same = of("same");
    assert_eq!(same["decision"], "allowed", "{same}");
    assert_eq!(same["status"], 200, "{same}");
    assert_eq!(same["consumer"], "ville-bxl", "{same}");
    assert_eq!(same["credential"], "oauth");
    assert_eq!(same["credential_id"], CLIENT);
    assert_eq!(same["certificate_sha256"], sha256(&pki.consumer), "{same}");
    // Lower-case hex, as a certificate's `credential_id` is.
    assert!(
        same["certificate_sha256"]
            .as_str()
            .is_some_and(|h| h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))),
        "{same}"
    );

    let alone = of("token-alone");
    assert_eq!(alone["credential_id"], CLIENT, "{alone}");
    assert!(alone.get("certificate_sha256").is_none(), "{alone}");
    // Every line of the trail is sealed into the chain, with the field or without it.
    let verified = audit::file::verify_dir(&pki.path().join("audit"), None).unwrap();
    assert_eq!(verified.records, audit_lines(&pki).len() as u64);
}

/// Found by an attacker's review: with binding not required, a token whose `cnf` could
/// not be read (an array, another confirmation method) was taken as unbound, and a key
/// published for encryption (`use: enc`, `alg: RSA-OAEP`, or `key_ops` without `verify`)
/// verified signatures. Now a `cnf` the gateway cannot check refuses the token, and such
/// keys are ignored.
#[tokio::test]
async fn an_unreadable_binding_refuses_and_encryption_keys_verify_nothing() {
    let key = ec_key("k");
    let mut enc = rsa_key("enc");
    enc.jwk["use"] = json!("enc");
    let mut oaep = rsa_key("oaep");
    oaep.jwk["alg"] = json!("RSA-OAEP");
    oaep.jwk.as_object_mut().unwrap().remove("use");
    let mut wrap = rsa_key("wrap");
    wrap.jwk["key_ops"] = json!(["encrypt", "wrapKey"]);
    for field in ["use", "alg"] {
        wrap.jwk.as_object_mut().unwrap().remove(field);
    }
    let idp = Idp::start(vec![
        key.jwk.clone(),
        enc.jwk.clone(),
        oaep.jwk.clone(),
        wrap.jwk.clone(),
    ])
    .await;
    let s = setup(&idp, false).await;
    for cnf in [
        json!({"x5t#S256": ["a", "b"]}),
        json!({"x5t#S256": 7}),
        json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}),
        json!("bound"),
    ] {
        let mut c = claims(CLIENT);
        c["cnf"] = cnf.clone();
        let (status, _, body) = call(&s, &sign(&key, &c), false).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("FSP-AUTHZ-TOKEN-BINDING")),
            "{cnf}: {body}"
        );
    }
    // The same token unbound passes: the key is fine.
    let (status, _, body) = call(&s, &sign(&key, &claims(CLIENT)), false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for k in [&enc, &oaep, &wrap] {
        refused(
            &s,
            &sign(k, &claims(CLIENT)),
            "a key published for encryption",
        )
        .await;
    }
}
