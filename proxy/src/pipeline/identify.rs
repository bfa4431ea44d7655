//! Phase 2, identify: who is calling. A bearer token (when OAuth is configured) names the
//! consumer by its client id; otherwise the client certificate verified in the TLS
//! handshake does. The answer is a [`Caller`], which only this phase makes.

use http::HeaderMap;
use http::header;
use policy::{Consumer, Credential};

use super::call::{Call, ConnInfo};
use crate::errors::{Code, Rejection, map};
use crate::state::Local;

/// A consumer the gateway has identified, with the credential it presented.
#[derive(Debug)]
pub struct Caller<'s> {
    consumer: &'s Consumer,
}

impl<'s> Caller<'s> {
    pub fn consumer(&self) -> &'s Consumer {
        self.consumer
    }
}

/// Identifies the caller and writes who it is (or the credential it presented, when it
/// is refused) into the call's record. A token that identified the caller on a
/// connection that presented a certificate leaves both in the record: the token as the
/// credential, the certificate as `certificate_sha256`, whether the two name one
/// consumer (the call goes on) or two (it is refused).
pub async fn identify<'s>(
    local: &'s Local,
    conn: &ConnInfo,
    call: &mut Call,
    headers: &HeaderMap,
) -> Result<Caller<'s>, Rejection> {
    let (found, credential) = find(local, conn, headers).await;
    let record = &mut call.record;
    if let Some(c) = &credential {
        record.credential = Some(c.kind().into());
        record.credential_id = Some(match c {
            Credential::Certificate { .. } => conn.certificate_sha256.clone().unwrap_or_default(),
            Credential::OAuth { client_id } => {
                record.certificate_sha256 = conn.certificate_sha256.clone();
                client_id.clone()
            }
        });
    }
    let consumer = found?;
    record.consumer = Some(consumer.id.to_string());
    Ok(Caller { consumer })
}

/// The consumer, and the credential that was presented (if any).
async fn find<'s>(
    local: &'s Local,
    conn: &ConnInfo,
    headers: &HeaderMap,
) -> (Result<&'s Consumer, Rejection>, Option<Credential>) {
    let (gw, snap) = (&*local.gw, &*local.snap);
    // The certificate was checked by the handshake: one that has expired since, or that
    // a reload revoked or no longer trusts, names nobody (and binds no token).
    if let Some(cert) = &conn.certificate
        && !conn.certificate_still_valid(&gw.tls.load())
    {
        return (
            Err(Rejection::new(
                Code::AuthnUnknownIdentity,
                "the client certificate of this connection is no longer valid (expired, revoked or no longer trusted since the connection was opened): connect again with a valid certificate",
            )),
            Some(Credential::Certificate {
                sha256: cert.sha256,
            }),
        );
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    if let (Some(token), Some(verifier)) = (bearer, &gw.oauth) {
        let sha = conn.certificate.as_ref().map(|c| &c.sha256.0);
        // Boxed: verification may fetch keys, a large future most calls do not need.
        return match Box::pin(verifier.verify(token, sha)).await {
            Ok(t) => {
                let mut found = snap
                    .consumers
                    .identify_client_id(&t.client_id)
                    .map_err(|e| Rejection::new(Code::AuthnUnknownIdentity, e.to_string()));
                // One call, one consumer: a certificate that names another consumer than
                // the token is refused, never resolved in favour of either.
                if let (Ok(by_token), Some(cert)) = (&found, &conn.certificate)
                    && let Ok(by_certificate) = snap.consumers.identify_certificate(cert)
                    && by_certificate.id != by_token.id
                {
                    let mut r = Rejection::new(
                        Code::AuthzCredentialConflict,
                        format!(
                            "the client certificate identifies consumer {} and the bearer token consumer {}: a call is made by one consumer",
                            by_certificate.id, by_token.id
                        ),
                    );
                    r.internal = Some(format!(
                        "certificate {} (consumer {}) with the token of client {} (consumer {})",
                        cert.sha256, by_certificate.id, t.client_id, by_token.id
                    ));
                    found = Err(r);
                }
                let credential = Credential::OAuth {
                    client_id: t.client_id,
                };
                (found, Some(credential))
            }
            Err(e) => (Err(map::token(&e)), None),
        };
    }
    match &conn.certificate {
        Some(cert) => (
            snap.consumers
                .identify_certificate(cert)
                .map_err(|e| Rejection::new(Code::AuthnUnknownIdentity, e.to_string())),
            Some(Credential::Certificate {
                sha256: cert.sha256,
            }),
        ),
        None => (
            Err(Rejection::new(
                Code::AuthnMissing,
                if gw.oauth.is_some() {
                    "no credential: present a client certificate issued by a CA this platform trusts, or an OAuth2 access token (Authorization: Bearer)"
                } else {
                    "no credential: present a client certificate issued by a CA this platform trusts"
                },
            )),
            None,
        ),
    }
}
