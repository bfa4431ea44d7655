//! Header names of the contract and the header rules of a proxy (RFC 9110 §7.6.1).

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

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
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

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
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(named_by_connection)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in present.into_iter().flatten() {
        headers.remove(name);
    }
}

/// Removes from a provider's answer what only the platform says: `FSP-*` fields (a
/// provider's `FSP-Consumer` would read as the gateway's) and `Deprecation` and `Sunset`
/// (a version's lifecycle is the catalogue's; the gateway adds its own). One pass over
/// the names; nothing is removed from the usual answer, which has none of them.
pub fn strip_platform_fields(headers: &mut HeaderMap) {
    let is_platform = |name: &HeaderName| {
        let n = name.as_str();
        n.starts_with("fsp-") || n == "deprecation" || n == "sunset"
    };
    if !headers.keys().any(is_platform) {
        return;
    }
    let found: Vec<HeaderName> = headers.keys().filter(|n| is_platform(n)).cloned().collect();
    for name in found {
        headers.remove(name);
    }
}

/// The field names a `Connection` value lists, without the options `close` and
/// `keep-alive` (whose field goes anyway).
fn named_by_connection(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| {
        !t.is_empty() && !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive")
    })
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

/// The header fields of a request on its way to a provider: the consumer's, less those
/// not meant for the provider (hop-by-hop fields, `Host`, `Authorization`, the `FSP-*`
/// fields only the gateway may set), then the gateway's own. Written straight onto an
/// HTTP/1.1 connection ([`Outbound::for_each`]), made into a map for HTTP/2.
#[derive(Debug)]
pub struct Outbound<'a> {
    consumer: HeaderMap,
    /// The gateway's fields; a consumer's field of the same name is not forwarded.
    gateway: [&'a [(HeaderName, HeaderValue)]; 3],
    /// The consumer's address, sent as `X-Forwarded-For`: the gateway vouches only for
    /// the peer it saw, never for addresses a consumer claims.
    peer: &'a HeaderValue,
}

impl<'a> Outbound<'a> {
    /// `fsp`, `grant` and `trace` are the gateway's fields; `peer` is the consumer's
    /// address.
    pub fn new(
        mut consumer: HeaderMap,
        fsp: &'a [(HeaderName, HeaderValue)],
        grant: &'a [(HeaderName, HeaderValue)],
        trace: &'a [(HeaderName, HeaderValue)],
        peer: &'a HeaderValue,
    ) -> Self {
        // Fields named by `Connection` are rare: strip them the long way.
        if consumer.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map_or(true, |v| named_by_connection(v).next().is_some())
        }) {
            strip_hop_by_hop(&mut consumer);
        }
        Self {
            consumer,
            gateway: [fsp, grant, trace],
            peer,
        }
    }

    fn forwards(&self, name: &HeaderName) -> bool {
        // `Expect` was the consumer's business with the gateway (hyper answers
        // `100 Continue`); the gateway sends the body without waiting, so a provider told
        // to expect could answer before it and read the body as the next request.
        if is_hop_by_hop(name)
            || name == header::EXPECT
            || name == header::HOST
            || name == header::AUTHORIZATION
            || is_look_alike(name)
            || is_forwarding(name)
        {
            return false;
        }
        if name.as_str().starts_with("fsp-") {
            return (name == FSP_PURPOSE || name == FSP_END_USER)
                && !self
                    .gateway
                    .iter()
                    .flat_map(|g| g.iter())
                    .any(|(n, _)| n == name);
        }
        true
    }

    /// Every field for the provider, in order: the consumer's, then the gateway's.
    pub fn for_each(&self, mut f: impl FnMut(&HeaderName, &HeaderValue)) {
        for (name, value) in &self.consumer {
            if self.forwards(name) {
                f(name, value);
            }
        }
        for (name, value) in self.gateway.iter().flat_map(|g| g.iter()) {
            f(name, value);
        }
        f(&X_FORWARDED_FOR, self.peer);
        f(&X_FORWARDED_PROTO, &HTTPS);
    }

    /// The fields as a map (for an HTTP/2 provider).
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.consumer.len() + 8);
        self.for_each(|name, value| {
            map.append(name.clone(), value.clone());
        });
        map
    }
}

const HTTPS: HeaderValue = HeaderValue::from_static("https");

/// A name with an underscore. CGI, WSGI, PHP and many frameworks map `-` and `_` to the
/// same variable, so `FSP_Consumer` or `X_Forwarded_For` would reach such a provider as
/// the field the gateway sets, or merged with it. Like nginx (`underscores_in_headers
/// off`), every such field is dropped: no standard field has an underscore.
fn is_look_alike(name: &HeaderName) -> bool {
    // A plain loop: names are short, and a call to memchr costs more than the scan.
    name.as_str().bytes().any(|b| b == b'_')
}

/// Fields through which a client claims another client address, certificate, user,
/// scheme, host, path or method than the ones the gateway saw and decided on. Only the
/// gateway speaks for the connection.
fn is_forwarding(name: &HeaderName) -> bool {
    let n = name.as_str();
    // By first letter: most fields (accept, content-type, user-agent...) are ruled out
    // after one or two comparisons, on every call.
    match n.as_bytes().first() {
        Some(b'x') => {
            n.starts_with("x-forwarded")
                || n.starts_with("x-envoy-")
                || n.starts_with("x-appengine-")
                || n.starts_with("x-ssl-")
                || n.starts_with("x-client-cert")
                || n.starts_with("x-client-dn")
                || n.starts_with("x-client-verify")
                || matches!(
                    n,
                    "x-real-ip"
                        | "x-client-ip"
                        | "x-cluster-client-ip"
                        | "x-originating-ip"
                        | "x-remote-ip"
                        | "x-remote-addr"
                        | "x-host"
                        | "x-original-host"
                        | "x-original-url"
                        | "x-rewrite-url"
                        | "x-arr-clientcert"
                        | "x-arr-ssl"
                        | "x-original-uri"
                        | "x-proxyuser-ip"
                        | "x-original-remote-addr"
                        | "x-client-addr"
                        | "x-azure-clientip"
                        | "x-real-host"
                        | "x-scheme"
                        | "x-url-scheme"
                        | "x-remote-user"
                        | "x-authenticated-user"
                        // A method other than the one the gateway authorised and recorded.
                        | "x-http-method-override"
                        | "x-http-method"
                        | "x-method-override"
                        | "x-original-forwarded-for"
                )
        }
        Some(b'f') => matches!(
            n,
            "forwarded" | "front-end-https" | "fly-client-ip" | "fastly-client-ip"
        ),
        Some(b'c') => matches!(n, "client-ip" | "cf-connecting-ip" | "cf-connecting-ipv6"),
        Some(b's') => n.starts_with("ssl-client"),
        Some(b't') => n == "true-client-ip",
        Some(b'r') => n == "remote-user",
        Some(b'v') => n == "via",
        // httpoxy: CGI providers read `Proxy` as HTTP_PROXY.
        Some(b'p') => n == "proxy",
        _ => false,
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

    fn forwarded(o: &Outbound<'_>) -> Vec<String> {
        let mut out = Vec::new();
        o.for_each(|k, v| out.push(format!("{k}={}", v.to_str().unwrap())));
        let mut from_map: Vec<String> = o
            .to_map()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap()))
            .collect();
        let mut sorted = out.clone();
        sorted.sort();
        from_map.sort();
        assert_eq!(sorted, from_map, "the map holds the same fields");
        out
    }

    #[test]
    fn consumer_fields_reach_providers_without_hop_by_hop_credentials_or_fsp_fields() {
        let peer = HeaderValue::from_static("192.0.2.7");
        let fsp = [(FSP_MESSAGE_ID, HeaderValue::from_static("id-1"))];
        let grant = [(FSP_PURPOSE, HeaderValue::from_static("granted"))];
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "gw.example".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::EXPECT, "100-continue".parse().unwrap());
        h.insert("fsp-consumer", "spoofed".parse().unwrap());
        h.insert("fsp-message-id", "spoofed".parse().unwrap());
        h.insert("fsp-purpose", "asked".parse().unwrap());
        h.insert("fsp-end-user", "u1".parse().unwrap());
        h.insert("x-forwarded-proto", "http".parse().unwrap());
        h.append("x-multi", "1".parse().unwrap());
        h.append("x-multi", "2".parse().unwrap());
        h.insert(header::ACCEPT, "application/json".parse().unwrap());
        let o = Outbound::new(h, &fsp, &grant, &[], &peer);
        assert_eq!(
            forwarded(&o),
            [
                "fsp-end-user=u1",
                "x-multi=1",
                "x-multi=2",
                "accept=application/json",
                "fsp-message-id=id-1",
                "fsp-purpose=granted",
                "x-forwarded-for=192.0.2.7",
                "x-forwarded-proto=https"
            ]
        );

        // Fields named by Connection go too; addresses a consumer claims are dropped.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, X-Private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("x-forwarded-for", "198.51.100.1".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        let o = Outbound::new(h, &[], &[], &[], &peer);
        assert_eq!(
            forwarded(&o),
            [
                "x-kept=1",
                "x-forwarded-for=192.0.2.7",
                "x-forwarded-proto=https"
            ]
        );
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
        let peer = HeaderValue::from_static("192.0.2.7");
        let o = Outbound::new(h, &[], &[], &[], &peer);
        let mut left: Vec<_> = o.to_map().keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "fsp-end-user",
                "fsp-purpose",
                "x-forwarded-for",
                "x-forwarded-proto"
            ]
        );
    }

    #[test]
    fn look_alike_and_forwarding_fields_never_reach_providers() {
        let mut h = HeaderMap::new();
        for n in [
            "fsp_consumer",
            "fsp_message_id",
            "x_forwarded_for",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-port",
            "forwarded",
            "x-real-ip",
            "true-client-ip",
            "x-original-url",
            "x-rewrite-url",
            "x-ssl-client-cert",
            "x-client-cert",
            "x-arr-clientcert",
            "proxy",
            "via",
            "x-http-method-override",
            "x-remote-user",
            "x-envoy-external-address",
            "my_field",
            "x-legit",
        ] {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                "evil-app".parse().unwrap(),
            );
        }
        let peer = HeaderValue::from_static("192.0.2.7");
        let o = Outbound::new(h, &[], &[], &[], &peer);
        assert_eq!(
            forwarded(&o),
            [
                "x-legit=evil-app",
                "x-forwarded-for=192.0.2.7",
                "x-forwarded-proto=https"
            ]
        );
    }
}
