//! WSDL and XML Schema documents as the gateway serves them: every address that points
//! at the provider rewritten to point at the gateway.
//!
//! A toolkit (zeep, CXF, .NET, JAX-WS) builds its client from a WSDL: it posts to the
//! endpoint address the WSDL names and fetches the documents it imports from their
//! locations. Served as the provider wrote it, a WSDL sends the consumer straight to the
//! provider's internal address. [`rewrite`] re-emits a document with
//!
//! - every endpoint address (`soap:address`, `soap12:address`, `http:address` and WSDL
//!   2.0's `endpoint`, and the WS-Addressing `Address` of an endpoint reference, in the
//!   2005/08, 2004/08, 2004/03 and older namespaces) set to
//!   the gateway's address of the service version;
//! - every reference to another document (`wsdl:import`/`wsdl:include` `location`,
//!   `xsd:import`/`xsd:include`/`xsd:redefine`/`xsd:override` `schemaLocation`) replaced
//!   with what the caller maps it to (the gateway's URL of that document), or left as it
//!   is when the caller does not map it;
//!
//! and every other byte as the provider wrote it (attributes of a rewritten start tag are
//! copied with `"` written `&quot;`). Elements are matched by namespace, not prefix, so
//! any prefix works; a namespace name written with a numeric character reference is
//! refused, and the rewritten document is read again to check that every endpoint address
//! is the gateway's before it is served. The document is expected to have passed the XML guard
//! ([`crate::xml`]) first: no DTD, no entities beyond the predefined ones.

use std::borrow::Cow;

use quick_xml::NsReader;
use quick_xml::events::attributes::Attribute;
use quick_xml::events::{BytesStart, BytesText, Event};
use quick_xml::name::ResolveResult;
use quick_xml::writer::Writer;

const WSDL11: &str = "http://schemas.xmlsoap.org/wsdl/";
const WSDL20: &str = "http://www.w3.org/ns/wsdl";
const SOAP11_BINDING: &str = "http://schemas.xmlsoap.org/wsdl/soap/";
const SOAP12_BINDING: &str = "http://schemas.xmlsoap.org/wsdl/soap12/";
const HTTP_BINDING: &str = "http://schemas.xmlsoap.org/wsdl/http/";
const XSD: &str = "http://www.w3.org/2001/XMLSchema";
const WSA10: &str = "http://www.w3.org/2005/08/addressing";
const WSA04: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing";
const WSA0403: &str = "http://schemas.xmlsoap.org/ws/2004/03/addressing";
/// Older WS-Addressing namespaces: WSE 2.0's, and the W3C drafts'.
const WSA_OLDER: [&str; 3] = [
    "http://schemas.xmlsoap.org/ws/2003/03/addressing",
    "http://www.w3.org/2004/12/addressing",
    "http://www.w3.org/2005/03/addressing",
];

/// What a reference points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocKind {
    /// Another WSDL document (`wsdl:import`, `wsdl:include`).
    Wsdl,
    /// An XML Schema (`xsd:import`, `xsd:include`, `xsd:redefine`, `xsd:override`).
    Schema,
}

impl DocKind {
    /// The query parameter the gateway serves this kind of document under.
    pub fn parameter(self) -> &'static str {
        match self {
            Self::Wsdl => "wsdl",
            Self::Schema => "xsd",
        }
    }
}

/// A document that could not be read as XML.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WsdlError(String);

/// What an element's attribute becomes.
enum Rewrite {
    Endpoint(&'static str),
    Reference(DocKind, &'static str),
}

fn rule(ns: &str, local: &str) -> Option<Rewrite> {
    Some(match (ns, local) {
        (SOAP11_BINDING | SOAP12_BINDING | HTTP_BINDING, "address") => {
            Rewrite::Endpoint("location")
        }
        (WSDL20, "endpoint") => Rewrite::Endpoint("address"),
        (WSDL11 | WSDL20, "import" | "include") => Rewrite::Reference(DocKind::Wsdl, "location"),
        (XSD, "import" | "include" | "redefine" | "override") => {
            Rewrite::Reference(DocKind::Schema, "schemaLocation")
        }
        _ => return None,
    })
}

/// Rewrites `doc` (see the module documentation): endpoint addresses become `endpoint`;
/// a reference becomes what `reference(kind, location as written)` returns, or stays.
pub fn rewrite(
    doc: &[u8],
    endpoint: &str,
    mut reference: impl FnMut(DocKind, &str) -> Option<String>,
) -> Result<Vec<u8>, WsdlError> {
    let bad =
        |e: &dyn std::fmt::Display| WsdlError(format!("the document is not well-formed XML: {e}"));
    let mut reader = NsReader::from_reader(doc);
    reader.config_mut().trim_text(false);
    let mut writer = Writer::new(Vec::with_capacity(doc.len() + 256));
    loop {
        let (ns, event) = reader.read_resolved_event().map_err(|e| bad(&e))?;
        let ns: Option<String> = match ns {
            ResolveResult::Bound(n) => Some(n.as_ref().to_owned()),
            _ => None,
        };
        let event = match event {
            Event::Eof => break,
            Event::Start(e)
                if ns.as_deref().is_some_and(|n| {
                    [WSA10, WSA04, WSA0403].contains(&n) || WSA_OLDER.contains(&n)
                }) && e.local_name().as_ref() == "Address" =>
            {
                // An endpoint reference's address: whatever it holds (text, references,
                // CDATA, elements) becomes the endpoint.
                let end = e.to_end().into_owned();
                reader.read_to_end(end.name()).map_err(|e| bad(&e))?;
                writer.write_event(Event::Start(e)).map_err(|e| bad(&e))?;
                writer
                    .write_event(Event::Text(BytesText::new(endpoint)))
                    .map_err(|e| bad(&e))?;
                Event::End(end)
            }
            Event::Start(e) | Event::Empty(e) if referenced_namespace(&e).is_some() => {
                return Err(WsdlError(format!(
                    "the namespace name of {} is written with a numeric character reference (&#...;), which the gateway does not accept in a WSDL",
                    referenced_namespace(&e).unwrap_or_default()
                )));
            }
            Event::Start(e) if ns.is_some() => {
                let ns = ns.as_deref().unwrap_or_default();
                Event::Start(element(e, ns, endpoint, &mut reference).map_err(|e| bad(&e))?)
            }
            Event::Empty(e) if ns.is_some() => {
                let ns = ns.as_deref().unwrap_or_default();
                Event::Empty(element(e, ns, endpoint, &mut reference).map_err(|e| bad(&e))?)
            }
            other => other,
        };
        writer.write_event(event).map_err(|e| bad(&e))?;
    }
    let out = writer.into_inner();
    check_rewritten(&out, endpoint)?;
    Ok(out)
}

/// An element's start tag, rewritten when a rule applies to it.
fn element<'a>(
    e: BytesStart<'a>,
    ns: &str,
    endpoint: &str,
    reference: &mut impl FnMut(DocKind, &str) -> Option<String>,
) -> Result<BytesStart<'a>, quick_xml::Error> {
    match rule(ns, e.local_name().as_ref()) {
        Some(r) => rewritten(&e, r, endpoint, reference),
        None => Ok(e),
    }
}

fn rewritten<'a>(
    e: &BytesStart<'a>,
    r: Rewrite,
    endpoint: &str,
    reference: &mut impl FnMut(DocKind, &str) -> Option<String>,
) -> Result<BytesStart<'a>, quick_xml::Error> {
    let target: &str = match r {
        Rewrite::Endpoint(a) | Rewrite::Reference(_, a) => a,
    };
    let name = e.name();
    let mut out = BytesStart::new(name.as_ref().to_owned());
    for attr in e.attributes() {
        let attr = attr.map_err(quick_xml::Error::from)?;
        if attr.key.as_ref() != target {
            out.push_attribute(requoted(attr));
            continue;
        }
        let new: Option<Cow<'_, str>> = match r {
            Rewrite::Endpoint(_) => Some(Cow::Borrowed(endpoint)),
            Rewrite::Reference(kind, _) => {
                let written = attr.normalized_value(quick_xml::XmlVersion::Implicit1_0)?;
                reference(kind, &written).map(Cow::Owned)
            }
        };
        match new {
            Some(value) => out.push_attribute(Attribute::from((target, value.as_ref()))),
            None => out.push_attribute(requoted(attr)),
        }
    }
    Ok(out)
}

/// An attribute copied into a start tag the gateway writes: its value as written (its
/// references stay references), with every `"` written `&quot;`. The writer puts values
/// between double quotes as they are, so a value the provider wrote between single
/// quotes could otherwise end early and make attributes of the provider's choosing (a
/// second `location`, say).
fn requoted(attr: Attribute<'_>) -> Attribute<'_> {
    if !attr.value.contains('"') {
        return attr;
    }
    Attribute {
        key: attr.key,
        value: Cow::Owned(attr.value.replace('"', "&quot;")),
    }
}

/// Reads a rewritten document again: well-formed, and every endpoint address the
/// gateway's. (With the same reader, so it catches what re-emitting got wrong, such as a
/// value ending early; not what another parser would read differently.) A document
/// where that does not hold is not served.
fn check_rewritten(doc: &[u8], endpoint: &str) -> Result<(), WsdlError> {
    let bad =
        |e: &dyn std::fmt::Display| WsdlError(format!("the document is not well-formed XML: {e}"));
    let mut reader = NsReader::from_reader(doc);
    loop {
        let (ns, event) = reader.read_resolved_event().map_err(|e| bad(&e))?;
        let ns: Option<String> = match ns {
            ResolveResult::Bound(n) => Some(n.as_ref().to_owned()),
            _ => None,
        };
        match event {
            Event::Eof => return Ok(()),
            Event::Start(e) | Event::Empty(e) => {
                let Some(Rewrite::Endpoint(target)) = ns
                    .as_deref()
                    .and_then(|ns| rule(ns, e.local_name().as_ref()))
                else {
                    continue;
                };
                for attr in e.attributes() {
                    let attr = attr.map_err(|e| bad(&e))?;
                    if attr.key.as_ref() == target
                        && attr
                            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .map_err(|e| bad(&e))?
                            != endpoint
                    {
                        return Err(WsdlError(format!(
                            "an endpoint address ({target}) would not point at the gateway"
                        )));
                    }
                }
            }
            _ => {}
        }
    }
}

/// A namespace declaration whose name is written with a numeric character reference
/// (`&#47;` for `/`): the reader here compares namespace names as written, a consumer's
/// parser after resolving references, so the two could see different namespaces. (The
/// predefined entities, `&amp;` and the like, stand for characters no namespace this
/// module looks for holds.)
fn referenced_namespace(e: &BytesStart<'_>) -> Option<String> {
    e.attributes().flatten().find_map(|a| {
        let key = a.key.as_ref();
        ((key == "xmlns" || key.starts_with("xmlns:")) && a.value.contains("&#"))
            .then(|| key.to_owned())
    })
}

/// Bounds on what the gateway fetches and keeps of a provider's WSDL.
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;
/// Documents of one version's WSDL: the WSDL and everything it imports, transitively.
pub const MAX_DOCUMENTS: usize = 64;
/// Bytes of one version's documents together (as fetched).
pub const MAX_SET_BYTES: usize = 16 * 1024 * 1024;
/// Bytes kept by the cache over every version; the oldest entries go first.
pub const MAX_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// How long a failed fetch is answered from memory, so that callers cannot make the
/// gateway ask a failing provider again and again.
pub const FAILURE_KEPT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a metadata request asks for: the WSDL (`?wsdl`) or a document it references
/// (`?wsdl=N`, `?xsd=N`, numbered by the gateway when it rewrote the references).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    Wsdl,
    Document(DocKind, usize),
    /// `?wsdl=` or `?xsd=` naming no number.
    Unknown,
}

impl Wanted {
    /// The metadata request a query string makes, if it makes one: `wsdl` (any case),
    /// `wsdl=N` or `xsd=N`.
    pub fn of(query: Option<&str>) -> Option<Self> {
        let q = query?;
        if q.eq_ignore_ascii_case("wsdl") {
            return Some(Self::Wsdl);
        }
        let (name, value) = q.split_once('=')?;
        let kind = if name.eq_ignore_ascii_case("wsdl") {
            DocKind::Wsdl
        } else if name.eq_ignore_ascii_case("xsd") {
            DocKind::Schema
        } else {
            return None;
        };
        Some(match value.parse::<usize>() {
            Ok(n) if n > 0 && !value.starts_with('0') => Self::Document(kind, n),
            _ => Self::Unknown,
        })
    }
}

/// A version's WSDL as the gateway serves it: the rewritten WSDL (number 0) and the
/// documents it references, each with its kind.
#[derive(Debug)]
pub struct Documents {
    pub docs: Vec<(DocKind, bytes::Bytes)>,
}

/// The `Content-Type` a served document goes out with: its XML declaration's encoding
/// (UTF-8 when it names none), so the consumer reads it as the gateway checked it.
pub fn content_type(doc: &[u8]) -> String {
    let head = &doc[..doc.len().min(256)];
    let encoding = head
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(head)
        .strip_prefix(b"<?xml")
        .and_then(|d| d.split(|b| *b == b'>').next())
        .and_then(|decl| {
            let decl = std::str::from_utf8(decl).ok()?;
            let rest = &decl[decl.find("encoding")? + "encoding".len()..];
            let rest = rest.trim_start().strip_prefix('=')?.trim_start();
            let quote = rest.chars().next().filter(|q| *q == '"' || *q == '\'')?;
            let value = rest[1..].split(quote).next()?;
            value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                .then(|| value.to_owned())
        });
    format!(
        "text/xml; charset={}",
        encoding.unwrap_or_else(|| "utf-8".into())
    )
}

impl Documents {
    pub fn get(&self, wanted: Wanted) -> Option<&bytes::Bytes> {
        let (kind, n) = match wanted {
            Wanted::Wsdl => (DocKind::Wsdl, 0),
            Wanted::Document(kind, n) => (kind, n),
            Wanted::Unknown => return None,
        };
        self.docs.get(n).filter(|(k, _)| *k == kind).map(|(_, d)| d)
    }

    fn bytes(&self) -> usize {
        self.docs.iter().map(|(_, d)| d.len()).sum()
    }
}

/// The WSDLs served, per service version (`family/service/version`), bounded by
/// [`MAX_CACHE_BYTES`]. One per configuration snapshot, so a reload starts afresh.
#[derive(Debug, Default)]
pub struct Cache {
    inner: std::sync::Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    entries: std::collections::HashMap<String, std::sync::Arc<Documents>>,
    /// Keys, oldest first.
    order: std::collections::VecDeque<String>,
    bytes: usize,
    /// One fetch per version at a time: the others wait for it and take its result.
    flights: std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>,
    /// Recent failures, with when they happened and why.
    failures: std::collections::HashMap<String, (std::time::Instant, String)>,
}

impl Cache {
    /// The lock that one fetch of `key` holds while it runs.
    pub fn flight(&self, key: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.flights.entry(key.to_owned()).or_default().clone()
    }

    /// Why the last fetch of `key` failed, if it failed less than [`FAILURE_KEPT`] ago.
    pub fn recent_failure(&self, key: &str) -> Option<String> {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner
            .failures
            .get(key)
            .filter(|(at, _)| at.elapsed() < FAILURE_KEPT)
            .map(|(_, why)| why.clone())
    }

    /// Remembers a failed fetch of `key` for [`FAILURE_KEPT`].
    pub fn failed(&self, key: &str, why: String) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner
            .failures
            .retain(|_, (at, _)| at.elapsed() < FAILURE_KEPT);
        inner
            .failures
            .insert(key.to_owned(), (std::time::Instant::now(), why));
    }

    pub fn get(&self, key: &str) -> Option<std::sync::Arc<Documents>> {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.entries.get(key).cloned()
    }

    /// Keeps `docs` for `key`, letting the oldest entries go to stay within the bound.
    pub fn put(&self, key: &str, docs: std::sync::Arc<Documents>) {
        let size = docs.bytes();
        if size > MAX_CACHE_BYTES {
            return;
        }
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let inner = &mut *inner;
        if let Some(old) = inner.entries.insert(key.to_owned(), docs) {
            inner.bytes -= old.bytes();
            inner.order.retain(|k| k != key);
        }
        inner.order.push_back(key.to_owned());
        inner.bytes += size;
        inner.failures.remove(key);
        while inner.bytes > MAX_CACHE_BYTES {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(gone) = inner.entries.remove(&oldest) {
                inner.bytes -= gone.bytes();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const WSDL: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<definitions xmlns="http://schemas.xmlsoap.org/wsdl/" xmlns:s11="http://schemas.xmlsoap.org/wsdl/soap/"
  xmlns:s12="http://schemas.xmlsoap.org/wsdl/soap12/" xmlns:xs="http://www.w3.org/2001/XMLSchema"
  xmlns:wsa="http://www.w3.org/2005/08/addressing" targetNamespace="urn:p">
  <!-- a comment & more -->
  <import namespace="urn:q" location="parts/other.wsdl"/>
  <types><xs:schema><xs:import namespace="urn:t" schemaLocation="https://rrn.internal/p/v2?xsd=1"/>
    <xs:include schemaLocation="common.xsd"></xs:include></xs:schema></types>
  <service name="S">
    <port name="P11" binding="tns:B11"><s11:address location="https://rrn.internal/p/v2"/></port>
    <port name="P12" binding="tns:B12"><s12:address location="http://10.0.0.7:8080/p/v2"/>
      <wsa:EndpointReference><wsa:Address>http://10.0.0.7:8080/p/v2</wsa:Address></wsa:EndpointReference></port>
  </service>
  <documentation>Text &amp; entities stay; a location="x" in text stays.</documentation>
</definitions>"#;

    #[test]
    fn endpoints_and_references_are_rewritten_and_nothing_else_changes() {
        let mut seen = Vec::new();
        let out = rewrite(
            WSDL.as_bytes(),
            "https://fsp.example/p/s/v2",
            |kind, loc| {
                seen.push((kind, loc.to_owned()));
                (loc != "common.xsd").then(|| {
                    format!(
                        "https://fsp.example/p/s/v2?{}={}",
                        kind.parameter(),
                        seen.len()
                    )
                })
            },
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            seen,
            [
                (DocKind::Wsdl, "parts/other.wsdl".to_owned()),
                (
                    DocKind::Schema,
                    "https://rrn.internal/p/v2?xsd=1".to_owned()
                ),
                (DocKind::Schema, "common.xsd".to_owned()),
            ]
        );
        assert!(
            !out.contains("rrn.internal") && !out.contains("10.0.0.7"),
            "{out}"
        );
        assert!(
            out.contains(
                r#"<import namespace="urn:q" location="https://fsp.example/p/s/v2?wsdl=1"/>"#
            ),
            "{out}"
        );
        assert!(out.contains(r#"<xs:import namespace="urn:t" schemaLocation="https://fsp.example/p/s/v2?xsd=2"/>"#), "{out}");
        // Not mapped: left as written.
        assert!(
            out.contains(r#"<xs:include schemaLocation="common.xsd"></xs:include>"#),
            "{out}"
        );
        assert!(
            out.contains(r#"<s11:address location="https://fsp.example/p/s/v2"/>"#),
            "{out}"
        );
        assert!(
            out.contains(r#"<s12:address location="https://fsp.example/p/s/v2"/>"#),
            "{out}"
        );
        assert!(
            out.contains("<wsa:Address>https://fsp.example/p/s/v2</wsa:Address>"),
            "{out}"
        );
        // Everything else byte for byte.
        assert!(out.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<definitions xmlns="));
        assert!(out.contains("<!-- a comment & more -->"));
        assert!(out.contains("Text &amp; entities stay; a location=\"x\" in text stays."));
    }

    #[test]
    fn an_endpoint_references_address_is_replaced_in_every_ws_addressing_version() {
        for ns in [WSA10, WSA04, WSA0403].into_iter().chain(WSA_OLDER) {
            let doc = format!(
                r#"<d xmlns:a="{ns}"><a:EndpointReference><a:Address>http://10.9.9.9/v1</a:Address></a:EndpointReference></d>"#
            );
            let out = rewrite(doc.as_bytes(), "https://gw/x/y/v1", |_, _| None).unwrap();
            let out = String::from_utf8(out).unwrap();
            assert!(
                out.contains("<a:Address>https://gw/x/y/v1</a:Address>"),
                "{ns}: {out}"
            );
        }
    }

    #[test]
    fn an_endpoint_references_address_is_replaced_whole_however_it_is_written() {
        for inner in [
            "http://10.0.0.7/p?a=1&amp;b=2",
            "&#104;&#116;&#116;&#112;://10.0.0.7/",
            "<![CDATA[http://10.0.0.7/]]>",
            "http://10.0.0.7/<x>y</x>rest",
            "a&lt;a&lt;a&lt;a&lt;a&lt;a&lt;a&lt;a&lt;",
        ] {
            let doc = format!(
                r#"<d xmlns:wsa="http://www.w3.org/2005/08/addressing"><wsa:EndpointReference><wsa:Address>{inner}</wsa:Address><wsa:Other>keep</wsa:Other></wsa:EndpointReference></d>"#
            );
            let out = rewrite(doc.as_bytes(), "https://gw/x/y/v1", |_, _| None).unwrap();
            let out = String::from_utf8(out).unwrap();
            assert_eq!(
                out,
                r#"<d xmlns:wsa="http://www.w3.org/2005/08/addressing"><wsa:EndpointReference><wsa:Address>https://gw/x/y/v1</wsa:Address><wsa:Other>keep</wsa:Other></wsa:EndpointReference></d>"#,
                "{inner}"
            );
        }
    }

    #[test]
    fn elements_are_matched_by_namespace_not_prefix() {
        let doc = r#"<w:definitions xmlns:w="http://schemas.xmlsoap.org/wsdl/" xmlns:soap="urn:not-soap">
<w:service><w:port><soap:address location="http://keep.me/"/><x:address xmlns:x="http://schemas.xmlsoap.org/wsdl/soap12/" location="http://change.me/"/></w:port></w:service></w:definitions>"#;
        let out = rewrite(doc.as_bytes(), "https://gw/x/y/v1", |_, _| None).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains(r#"<soap:address location="http://keep.me/"/>"#),
            "{out}"
        );
        assert!(
            out.contains(r#"location="https://gw/x/y/v1"/>"#) && !out.contains("change.me"),
            "{out}"
        );
    }

    #[test]
    fn an_endpoint_with_characters_to_escape_is_escaped() {
        let doc = r#"<definitions xmlns="http://schemas.xmlsoap.org/wsdl/" xmlns:s="http://schemas.xmlsoap.org/wsdl/soap/"><service><port><s:address location="x"/></port></service></definitions>"#;
        let out = rewrite(doc.as_bytes(), "https://gw/a&b\"c", |_, _| None).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains(r#"location="https://gw/a&amp;b&quot;c""#),
            "{out}"
        );
    }

    #[test]
    fn metadata_requests_are_read_from_the_query() {
        assert_eq!(Wanted::of(Some("wsdl")), Some(Wanted::Wsdl));
        assert_eq!(Wanted::of(Some("WSDL")), Some(Wanted::Wsdl));
        assert_eq!(
            Wanted::of(Some("xsd=3")),
            Some(Wanted::Document(DocKind::Schema, 3))
        );
        assert_eq!(
            Wanted::of(Some("wsdl=1")),
            Some(Wanted::Document(DocKind::Wsdl, 1))
        );
        for q in [
            "xsd=0",
            "xsd=01",
            "xsd=x",
            "xsd=",
            "wsdl=-1",
            "xsd=99999999999999999999999",
        ] {
            assert_eq!(Wanted::of(Some(q)), Some(Wanted::Unknown), "{q}");
        }
        for q in [None, Some(""), Some("a=b"), Some("wsdlx"), Some("wsdl&x=1")] {
            assert_eq!(Wanted::of(q), None, "{q:?}");
        }
    }

    #[test]
    fn the_cache_keeps_within_its_bound_and_lets_the_oldest_go() {
        let cache = Cache::default();
        let docs = |n: usize| {
            std::sync::Arc::new(Documents {
                docs: vec![(DocKind::Wsdl, bytes::Bytes::from(vec![b'x'; n]))],
            })
        };
        cache.put("a/b/v1", docs(MAX_CACHE_BYTES / 2));
        cache.put("a/b/v2", docs(MAX_CACHE_BYTES / 2));
        assert!(cache.get("a/b/v1").is_some());
        cache.put("a/b/v3", docs(10));
        assert!(cache.get("a/b/v1").is_none(), "the oldest went");
        assert!(cache.get("a/b/v2").is_some() && cache.get("a/b/v3").is_some());
        // Replaced, not counted twice; one too large for the cache is not kept.
        cache.put("a/b/v3", docs(20));
        cache.put("a/b/v4", docs(MAX_CACHE_BYTES + 1));
        assert!(cache.get("a/b/v4").is_none());
        let d = cache.get("a/b/v3").unwrap();
        assert_eq!(d.get(Wanted::Wsdl).unwrap().len(), 20);
        assert_eq!(d.get(Wanted::Document(DocKind::Schema, 0)), None);
    }

    #[test]
    fn documents_go_out_in_the_charset_they_declare() {
        assert_eq!(content_type(b"<a/>"), "text/xml; charset=utf-8");
        assert_eq!(
            content_type(b"<?xml version='1.0' encoding='ISO-8859-1'?><a/>"),
            "text/xml; charset=ISO-8859-1"
        );
        assert_eq!(
            content_type(b"\xEF\xBB\xBF<?xml version=\"1.0\" encoding = \"UTF-8\" ?><a/>"),
            "text/xml; charset=UTF-8"
        );
        // Nothing odd gets into the field.
        assert_eq!(
            content_type(b"<?xml version=\"1.0\" encoding=\"a\r\nX: y\"?><a/>"),
            "text/xml; charset=utf-8"
        );
    }

    #[test]
    fn malformed_documents_are_errors() {
        for doc in ["<definitions><service></definitions>", "<a></b>"] {
            assert!(
                rewrite(doc.as_bytes(), "https://gw/", |_, _| None).is_err(),
                "{doc}"
            );
        }
    }

    /// Every endpoint address of `out`, as a consumer's parser reads it.
    fn endpoints(out: &[u8]) -> Vec<String> {
        let mut reader = NsReader::from_reader(out);
        let mut found = Vec::new();
        loop {
            let (ns, event) = reader.read_resolved_event().unwrap();
            let ns = match ns {
                ResolveResult::Bound(n) => n.as_ref().to_owned(),
                _ => String::new(),
            };
            match event {
                Event::Eof => return found,
                Event::Start(e) | Event::Empty(e) => {
                    if let Some(Rewrite::Endpoint(t)) = rule(&ns, e.local_name().as_ref()) {
                        for a in e.attributes().flatten() {
                            if a.key.as_ref() == t {
                                found.push(a.value.into_owned());
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// An attribute a provider wrote between single quotes, holding `"`, cannot end
    /// early once re-emitted and make an address or location of its choosing.
    #[test]
    fn a_value_in_single_quotes_cannot_break_out_of_its_attribute() {
        let doc = r#"<definitions xmlns="http://schemas.xmlsoap.org/wsdl/" xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/" xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <types><xs:schema><xs:import namespace='urn:a" schemaLocation="http://10.9.9.9/evil.xsd' schemaLocation="a.xsd"/></xs:schema></types>
  <service name="S"><port name="P"><soap:address x='" location="http://10.9.9.9:8080/internal/v1' location="http://rrn.internal/p"/></port></service>
</definitions>"#;
        let mut locations = Vec::new();
        let out = rewrite(doc.as_bytes(), "https://gw/p/s/v1", |_, loc| {
            locations.push(loc.to_owned());
            Some("https://gw/p/s/v1?xsd=1".to_owned())
        })
        .unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(endpoints(&out), ["https://gw/p/s/v1"], "{text}");
        assert_eq!(locations, ["a.xsd"]);
        assert!(!text.contains(r#"location="http://10.9.9.9"#), "{text}");
        assert!(
            text.contains(r#"x="&quot; location=&quot;http://10.9.9.9:8080/internal/v1""#),
            "{text}"
        );
    }

    /// A binding namespace written with a character reference (`&#47;` is `/`) is the
    /// SOAP binding to a consumer's parser, and not to a comparison of names as written:
    /// such a document is refused rather than served with its address unchanged.
    #[test]
    fn a_namespace_name_written_with_a_reference_is_refused() {
        let doc = r#"<definitions xmlns="http://schemas.xmlsoap.org/wsdl/" xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap&#47;">
  <service name="S"><port name="P"><soap:address location="http://10.9.9.9:8080/internal/v1"/></port></service>
</definitions>"#;
        let refused = rewrite(doc.as_bytes(), "https://gw/p/s/v1", |_, _| None).unwrap_err();
        assert!(refused.to_string().contains("xmlns:soap"), "{refused}");
        assert!(!refused.to_string().contains("well-formed"), "{refused}");
        // A predefined entity in a namespace name is fine.
        let amp = r#"<definitions xmlns="http://schemas.xmlsoap.org/wsdl/" xmlns:tns="urn:x?a=1&amp;b=2"/>"#;
        assert!(rewrite(amp.as_bytes(), "https://gw/p/s/v1", |_, _| None).is_ok());
    }
}
