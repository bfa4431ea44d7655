//! Header names of the contract and the header rules of a proxy (RFC 9110 §7.6.1).

use http::HeaderMap;
use http::header::{self, HeaderName};

pub const FSP_MESSAGE_ID: HeaderName = HeaderName::from_static("fsp-message-id");
pub const FSP_TIMESTAMP: HeaderName = HeaderName::from_static("fsp-timestamp");
pub const FSP_CONSUMER: HeaderName = HeaderName::from_static("fsp-consumer");
pub const FSP_PURPOSE: HeaderName = HeaderName::from_static("fsp-purpose");
pub const FSP_LEGAL_BASIS: HeaderName = HeaderName::from_static("fsp-legal-basis");
pub const FSP_END_USER: HeaderName = HeaderName::from_static("fsp-end-user");
/// Extension: the id of the authorisation that covers the call (sent to providers).
pub const FSP_AUTHORISATION: HeaderName = HeaderName::from_static("fsp-authorisation");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const DEPRECATION: HeaderName = HeaderName::from_static("deprecation");
pub const SUNSET: HeaderName = HeaderName::from_static("sunset");
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the hop-by-hop fields: `Connection` and every field it names, `Keep-Alive`,
/// `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade` and the proxy credentials.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds the hop-by-hop fields present (usually none, or only
    // `Connection: keep-alive`); only those are removed, without hashing the others.
    let mut present: [Option<HeaderName>; 8] = Default::default();
    let mut n = 0;
    for name in headers.keys() {
        if n < present.len()
            && is_hop_by_hop(name)
            && !present[..n].iter().any(|p| p.as_ref() == Some(name))
        {
            present[n] = Some(name.clone());
            n += 1;
        }
    }
    if n == 0 {
        return;
    }
    // Fields named by `Connection` (other than the options `close` and `keep-alive`,
    // whose field is removed anyway).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in present.into_iter().flatten() {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHENTICATE
        || *name == header::PROXY_AUTHORIZATION
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
}

/// Drops every `FSP-*` field a consumer sent except `FSP-Purpose` and `FSP-End-User`:
/// only the gateway speaks for the platform.
pub fn strip_consumer_fsp_headers(headers: &mut HeaderMap) {
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("fsp-") && **k != FSP_PURPOSE && **k != FSP_END_USER)
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
}

/// The first value of a header as text, if it is valid visible ASCII.
pub fn text<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn connection_keep_alive_alone_goes_and_nothing_else() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "Keep-Alive".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-kept"]);

        let mut none = HeaderMap::new();
        none.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut none);
        assert_eq!(none.len(), 1);

        let mut close = HeaderMap::new();
        close.insert(header::CONNECTION, "close, X-Private".parse().unwrap());
        close.insert("x-private", "1".parse().unwrap());
        close.append(header::TE, "trailers".parse().unwrap());
        close.append(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut close);
        assert!(close.is_empty(), "{close:?}");
    }

    #[test]
    fn only_purpose_and_end_user_survive_from_consumers() {
        let mut h = HeaderMap::new();
        for n in [
            "fsp-consumer",
            "fsp-legal-basis",
            "fsp-message-id",
            "fsp-purpose",
            "fsp-end-user",
            "fsp-anything",
        ] {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                "x".parse().unwrap(),
            );
        }
        strip_consumer_fsp_headers(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["fsp-end-user", "fsp-purpose"]);
    }
}
