//! SOAP: recognising the version of a call, writing faults, and stamping responses.
//!
//! The gateway does not parse SOAP bodies it forwards. It only needs the SOAP version
//! (from the `Content-Type`: `text/xml` is 1.1, `application/soap+xml` is 1.2), the
//! action, and — on the way back — to add `<fsp:MessageID>` and `<fsp:Timestamp>` to the
//! response's SOAP Header. [`HeaderStamp`] does that while streaming: it holds back only
//! the bytes up to the Header (or Body) start tag, at most [`STAMP_SCAN_LIMIT`], and
//! passes the rest through untouched. What a request's SOAP Header holds is read by the
//! XML guard ([`crate::xml`]) while it checks the envelope.

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http::header::CONTENT_TYPE;
use quick_xml::escape::escape;
use quick_xml::events::Event;

/// The FSP XML namespace.
pub const FSP_NS: &str = "urn:be:fgov:fsp:1";
/// How far into a response the header stamp looks for the SOAP Header or Body.
pub const STAMP_SCAN_LIMIT: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoapVersion {
    V11,
    V12,
}

impl SoapVersion {
    pub fn envelope_ns(self) -> &'static str {
        match self {
            Self::V11 => "http://schemas.xmlsoap.org/soap/envelope/",
            Self::V12 => "http://www.w3.org/2003/05/soap-envelope",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::V11 => "text/xml; charset=utf-8",
            Self::V12 => "application/soap+xml; charset=utf-8",
        }
    }

    /// The SOAP version a request's `Content-Type` announces, if any.
    pub fn of(headers: &HeaderMap) -> Option<Self> {
        let ct = headers.get(CONTENT_TYPE)?.to_str().ok()?;
        let mime = ct.split(';').next()?.trim();
        if mime.eq_ignore_ascii_case("application/soap+xml") {
            Some(Self::V12)
        } else if mime.eq_ignore_ascii_case("text/xml") {
            Some(Self::V11)
        } else {
            None
        }
    }
}

/// The SOAP action: the `SOAPAction` header (1.1) or the `action` parameter of the
/// `Content-Type` (1.2).
pub fn action(headers: &HeaderMap) -> Option<String> {
    if let Some(a) = headers.get("soapaction").and_then(|v| v.to_str().ok()) {
        let a = a.trim().trim_matches('"');
        if !a.is_empty() {
            return Some(a.to_owned());
        }
    }
    let ct = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    ct.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        let v = v.trim().trim_matches('"');
        (k.trim().eq_ignore_ascii_case("action") && !v.is_empty()).then(|| v.to_owned())
    })
}

/// The header elements stamped into every SOAP message from the gateway.
pub(crate) fn stamp_elements(message_id: &str, timestamp: &str) -> String {
    format!(
        "<fsp:MessageID xmlns:fsp=\"{FSP_NS}\">{}</fsp:MessageID><fsp:Timestamp xmlns:fsp=\"{FSP_NS}\">{}</fsp:Timestamp>",
        escape(message_id),
        escape(timestamp)
    )
}

/// A SOAP Fault envelope of the given version.
pub fn fault(
    version: SoapVersion,
    client_fault: bool,
    code: &str,
    title: &str,
    detail: &str,
    message_id: &str,
    timestamp: &str,
) -> String {
    let ns = version.envelope_ns();
    let stamp = stamp_elements(message_id, timestamp);
    let reason = escape(title);
    let detail = escape(detail);
    let error = format!(
        "<fsp:Error xmlns:fsp=\"{FSP_NS}\"><fsp:Code>{code}</fsp:Code><fsp:MessageID>{}</fsp:MessageID><fsp:Detail>{detail}</fsp:Detail></fsp:Error>",
        escape(message_id)
    );
    match version {
        SoapVersion::V11 => {
            let who = if client_fault { "Client" } else { "Server" };
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<soap:Envelope xmlns:soap=\"{ns}\"><soap:Header>{stamp}</soap:Header><soap:Body><soap:Fault><faultcode>soap:{who}</faultcode><faultstring xml:lang=\"en\">{reason}: {detail}</faultstring><detail>{error}</detail></soap:Fault></soap:Body></soap:Envelope>\n"
            )
        }
        SoapVersion::V12 => {
            let who = if client_fault { "Sender" } else { "Receiver" };
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<env:Envelope xmlns:env=\"{ns}\"><env:Header>{stamp}</env:Header><env:Body><env:Fault><env:Code><env:Value>env:{who}</env:Value></env:Code><env:Reason><env:Text xml:lang=\"en\">{reason}: {detail}</env:Text></env:Reason><env:Detail>{error}</env:Detail></env:Fault></env:Body></env:Envelope>\n"
            )
        }
    }
}

/// Where the stamp goes in a SOAP message.
#[derive(Debug, PartialEq, Eq)]
enum Spot {
    /// Not enough bytes yet.
    NeedMore,
    /// Not a SOAP envelope: pass through.
    NotSoap,
    /// Splice `replacement` over `start..end`.
    Splice {
        start: usize,
        end: usize,
        replacement: String,
    },
}

/// Where the stamp goes in the first bytes of an answer: into the SOAP Header, which
/// must be the Envelope's first child element, in the Envelope's own namespace (matched
/// by namespace, not by prefix or local name alone); a Header made before the Body when
/// there is none. A UTF-8 byte order mark is passed on as it is, in front.
fn find_spot(buf: &[u8], stamp: &str) -> Spot {
    use quick_xml::name::{Namespace, ResolveResult};
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    if buf.len() < BOM.len() && BOM.starts_with(buf) {
        return Spot::NeedMore;
    }
    // The reader skips a byte order mark without counting it in its positions: it is
    // taken off here, and its length added to every position.
    let skip = if buf.starts_with(BOM) { BOM.len() } else { 0 };
    // The markup the stamp looks for is ASCII, and the reader wants UTF-8: every other
    // byte is read as `x`, one for one, so that positions stay those of `buf` and an
    // answer in ISO-8859-1 or windows-1252 (or a second byte order mark) is read like
    // any other. (A namespace name with such a byte is not SOAP's either way.)
    let ascii;
    let rest = if buf[skip..].is_ascii() {
        &buf[skip..]
    } else {
        ascii = buf[skip..]
            .iter()
            .map(|&b| if b.is_ascii() { b } else { b'x' })
            .collect::<Vec<u8>>();
        &ascii[..]
    };
    let mut reader = quick_xml::NsReader::from_reader(rest);
    let mut envelope: Option<&'static str> = None;
    loop {
        let before = skip + reader.buffer_position() as usize;
        let (soap_ns, event) = match reader.read_resolved_event() {
            Ok((ns, event)) => {
                let soap_ns = match ns {
                    ResolveResult::Bound(Namespace(n)) if n == SoapVersion::V11.envelope_ns() => {
                        Some(SoapVersion::V11.envelope_ns())
                    }
                    ResolveResult::Bound(Namespace(n)) if n == SoapVersion::V12.envelope_ns() => {
                        Some(SoapVersion::V12.envelope_ns())
                    }
                    _ => None,
                };
                (soap_ns, event)
            }
            // Truncated input looks like an error: wait for more.
            Err(_) => return Spot::NeedMore,
        };
        let after = skip + reader.buffer_position() as usize;
        match (&event, envelope) {
            (Event::Eof, _) => return Spot::NeedMore,
            (Event::Decl(_) | Event::Comment(_) | Event::PI(_) | Event::DocType(_), _) => {}
            (Event::Text(t), _) if t.chars().all(|c| c.is_ascii_whitespace()) => {}
            // Whitespace written as a character reference (`&#10;`) is whitespace.
            (Event::GeneralRef(r), _)
                if r.resolve_char_ref()
                    .ok()
                    .flatten()
                    .is_some_and(|c| c.is_ascii_whitespace()) => {}
            (Event::Start(s), None) => {
                if s.local_name().as_ref() != "Envelope" || soap_ns.is_none() {
                    return Spot::NotSoap;
                }
                envelope = soap_ns;
            }
            (Event::Start(s) | Event::Empty(s), Some(ns)) => {
                let ours = soap_ns == Some(ns);
                let is_empty = matches!(event, Event::Empty(_));
                return match (s.local_name().as_ref(), ours, is_empty) {
                    ("Header", true, false) => Spot::Splice {
                        start: after,
                        end: after,
                        replacement: stamp.to_owned(),
                    },
                    // `<h .../>` becomes `<h ...>stamp</h>`, closed with its own name: its
                    // attributes (and namespace declarations) stay.
                    ("Header", true, true) => Spot::Splice {
                        start: after.saturating_sub(2),
                        end: after,
                        replacement: format!(">{stamp}</{h}>", h = s.name().as_ref()),
                    },
                    // A Header of its own namespace declaration, whatever prefixes are
                    // declared where.
                    ("Body", true, _) => Spot::Splice {
                        start: before,
                        end: before,
                        replacement: format!("<Header xmlns=\"{ns}\">{stamp}</Header>"),
                    },
                    _ => Spot::NotSoap,
                };
            }
            _ => return Spot::NotSoap,
        }
    }
}

/// Stamps `<fsp:MessageID>` and `<fsp:Timestamp>` into a streamed SOAP response.
///
/// Feed it each data chunk with [`HeaderStamp::push`]; it returns what to send on.
/// Once the spot is found (or ruled out) every further chunk passes through untouched.
#[derive(Debug)]
pub struct HeaderStamp {
    state: StampState,
}

#[derive(Debug)]
enum StampState {
    Scanning {
        buf: BytesMut,
        stamp: String,
    },
    /// The spot was found and stamped (`true`), or the answer ruled out (`false`).
    Done(bool),
}

impl HeaderStamp {
    pub fn new(message_id: &str, timestamp: &str) -> Self {
        Self {
            state: StampState::Scanning {
                buf: BytesMut::new(),
                stamp: stamp_elements(message_id, timestamp),
            },
        }
    }

    /// Takes a chunk; returns the bytes to send now (possibly none).
    pub fn push(&mut self, chunk: Bytes) -> Option<Bytes> {
        let StampState::Scanning { buf, stamp } = &mut self.state else {
            return Some(chunk);
        };
        if buf.is_empty() {
            // Most responses fit their envelope start in the first chunk: try it in place.
            match find_spot(&chunk, stamp) {
                Spot::NeedMore if chunk.len() < STAMP_SCAN_LIMIT => {
                    buf.extend_from_slice(&chunk);
                    return None;
                }
                Spot::Splice {
                    start,
                    end,
                    replacement,
                } => {
                    let out = splice(&chunk, start, end, &replacement);
                    self.state = StampState::Done(true);
                    return Some(out);
                }
                _ => {
                    self.state = StampState::Done(false);
                    return Some(chunk);
                }
            }
        }
        buf.extend_from_slice(&chunk);
        match find_spot(buf, stamp) {
            Spot::NeedMore if buf.len() < STAMP_SCAN_LIMIT => None,
            Spot::Splice {
                start,
                end,
                replacement,
            } => {
                let out = splice(buf, start, end, &replacement);
                self.state = StampState::Done(true);
                Some(out)
            }
            _ => self.finish(),
        }
    }

    /// The end of the body: whatever is held back goes out unchanged.
    pub fn finish(&mut self) -> Option<Bytes> {
        match std::mem::replace(&mut self.state, StampState::Done(false)) {
            StampState::Scanning { buf, .. } if !buf.is_empty() => Some(buf.freeze()),
            StampState::Done(stamped) => {
                self.state = StampState::Done(stamped);
                None
            }
            _ => None,
        }
    }

    /// Whether the stamp went in (`None` while the spot is still looked for).
    pub fn stamped(&self) -> Option<bool> {
        match self.state {
            StampState::Scanning { .. } => None,
            StampState::Done(stamped) => Some(stamped),
        }
    }
}

fn splice(buf: &[u8], start: usize, end: usize, replacement: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(buf.len() + replacement.len());
    out.extend_from_slice(&buf[..start]);
    out.extend_from_slice(replacement.as_bytes());
    out.extend_from_slice(&buf[end..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    const WITH_HEADER: &str = r#"<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Header><x:Other xmlns:x="urn:x"/></s:Header><s:Body><r/></s:Body></s:Envelope>"#;
    const NO_HEADER: &str = r#"<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope">
  <env:Body><r/></env:Body></env:Envelope>"#;
    const EMPTY_HEADER: &str = r#"<Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><Header/><Body/></Envelope>"#;

    fn stamp_all(chunks: &[&[u8]]) -> String {
        String::from_utf8(stamp_all_bytes(chunks)).unwrap()
    }

    fn assert_stamped(doc: &str) {
        let mut r = quick_xml::Reader::from_str(doc);
        let mut seen = Vec::new();
        loop {
            match r.read_event().unwrap() {
                Event::Eof => break,
                Event::Start(s) => seen.push(s.name().as_ref().to_owned()),
                _ => {}
            }
        }
        let header = seen
            .iter()
            .position(|n| n.ends_with("Header"))
            .expect("a Header");
        assert_eq!(seen[header + 1], "fsp:MessageID", "{doc}");
        assert!(seen.iter().any(|n| n == "fsp:Timestamp"));
        assert!(doc.contains(">m-1<"));
    }

    #[test]
    fn stamps_into_existing_missing_and_empty_headers() {
        for doc in [WITH_HEADER, NO_HEADER, EMPTY_HEADER] {
            let out = stamp_all(&[doc.as_bytes()]);
            assert_stamped(&out);
        }
        assert!(
            stamp_all(&[NO_HEADER.as_bytes()]).contains(
                "<Header xmlns=\"http://www.w3.org/2003/05/soap-envelope\"><fsp:MessageID"
            )
        );
        assert!(stamp_all(&[EMPTY_HEADER.as_bytes()]).contains("<Header><fsp:MessageID"));
        // An empty Header keeps its attributes and namespace declarations.
        let with_attrs =
            EMPTY_HEADER.replace("<Header/>", "<Header xmlns:w=\"urn:w\" w:Id=\"h\" />");
        let out = stamp_all(&[with_attrs.as_bytes()]);
        assert!(
            out.contains("<Header xmlns:w=\"urn:w\" w:Id=\"h\" ><fsp:MessageID"),
            "{out}"
        );
        assert_stamped(&out);
    }

    /// The stamp's elements in a stamped document that must be well-formed (every end tag
    /// matches its start), in the SOAP Header of the document's Envelope namespace, once.
    fn stamped_once_in_the_soap_header(out: &[u8]) {
        use quick_xml::name::{Namespace, ResolveResult};
        let mut r = quick_xml::NsReader::from_reader(out);
        let (mut path, mut found): (Vec<(bool, String)>, usize) = (Vec::new(), 0);
        loop {
            let (ns, event) = r
                .read_resolved_event()
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(out)));
            let soap = matches!(ns, ResolveResult::Bound(Namespace(n)) if n.ends_with("envelope/") || n.ends_with("soap-envelope"));
            match event {
                Event::Start(s) => {
                    let name = s.local_name().as_ref().to_owned();
                    if name == "MessageID" {
                        assert_eq!(
                            path.iter()
                                .map(|(s, n)| (*s, n.as_str()))
                                .collect::<Vec<_>>(),
                            [(true, "Envelope"), (true, "Header")],
                            "{}",
                            String::from_utf8_lossy(out)
                        );
                        found += 1;
                    }
                    path.push((soap, name));
                }
                Event::End(_) => {
                    path.pop();
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(found, 1, "{}", String::from_utf8_lossy(out));
    }

    /// A UTF-8 byte order mark (as .NET writes by default) does not shift the stamp; the
    /// Header is found by namespace whatever prefixes the provider chose, and closed
    /// with its own name; a Header or Envelope of another namespace is not SOAP's.
    #[test]
    fn the_stamp_lands_in_the_soap_header_whatever_the_bom_and_prefixes() {
        const S11: &str = "http://schemas.xmlsoap.org/soap/envelope/";
        let docs = [
            format!(
                r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{S11}"><s:Header><a xmlns="urn:a">1</a></s:Header><s:Body><r/></s:Body></s:Envelope>"#
            ),
            format!(r#"<s:Envelope xmlns:s="{S11}"><!--x--><s:Body><r/></s:Body></s:Envelope>"#),
            format!(r#"<s:Envelope xmlns:s="{S11}"><s:Header/><s:Body/></s:Envelope>"#),
            format!(
                r#"<soap:Envelope xmlns:soap="{S11}" xmlns:s="{S11}"><s:Header/><soap:Body/></soap:Envelope>"#
            ),
            format!(r#"<s:Envelope xmlns:s="{S11}"><Header xmlns="{S11}"/><s:Body/></s:Envelope>"#),
            format!(r#"<Envelope xmlns="{S11}" xmlns:s="{S11}"><s:Header/><Body/></Envelope>"#),
            format!(r#"<s:Envelope xmlns:s="{S11}"><b:Body xmlns:b="{S11}"/></s:Envelope>"#),
        ];
        for doc in &docs {
            for bom in [&b""[..], b"\xEF\xBB\xBF"] {
                let whole = [bom, doc.as_bytes()].concat();
                let out = stamp_all_bytes(&[&whole]);
                assert!(out.starts_with(bom));
                stamped_once_in_the_soap_header(&out[bom.len()..]);
                // Cut anywhere, the same.
                for cut in [1, 2, 3, 4, whole.len() / 2] {
                    assert_eq!(stamp_all_bytes(&[&whole[..cut], &whole[cut..]]), out);
                }
            }
        }
        // Not UTF-8 (ISO-8859-1 bytes before the Header), whitespace as a character
        // reference: stamped all the same.
        let latin1 = [
            &b"<?xml version='1.0' encoding='ISO-8859-1'?><!-- G\xe9n\xe9r\xe9 -->"[..],
            format!(r#"<s:Envelope xmlns:s="{S11}" a="é">&#10;<s:Header/><s:Body/></s:Envelope>"#)
                .as_bytes(),
        ]
        .concat();
        let mut s = HeaderStamp::new("m-1", "2026-11-24T10:00:00.000Z");
        let out = s.push(Bytes::from(latin1.clone())).unwrap();
        assert_eq!(s.stamped(), Some(true));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("&#10;<s:Header><fsp:MessageID"), "{text}");
        assert!(
            text.ends_with("</fsp:Timestamp></s:Header><s:Body/></s:Envelope>"),
            "{text}"
        );
        for not_soap in [
            format!(
                r#"<s:Envelope xmlns:s="{S11}"><x:Header xmlns:x="urn:x"/><s:Body/></s:Envelope>"#
            ),
            r#"<Envelope xmlns="urn:not-soap"><Body/></Envelope>"#.to_owned(),
            format!(r#"<s:Envelope xmlns:s="{S11}">&#65;<s:Header/><s:Body/></s:Envelope>"#),
            format!(
                "\u{feff}\u{feff}<s:Envelope xmlns:s=\"{S11}\"><s:Header/><s:Body/></s:Envelope>"
            ),
        ] {
            let mut s = HeaderStamp::new("m-1", "2026-11-24T10:00:00.000Z");
            let mut out = s
                .push(Bytes::from(not_soap.clone()))
                .unwrap_or_default()
                .to_vec();
            out.extend(s.finish().unwrap_or_default());
            assert_eq!(out, not_soap.as_bytes());
            assert_eq!(s.stamped(), Some(false), "{not_soap}");
        }
    }

    fn stamp_all_bytes(chunks: &[&[u8]]) -> Vec<u8> {
        let mut s = HeaderStamp::new("m-1", "2026-11-24T10:00:00.000Z");
        let mut out = Vec::new();
        for c in chunks {
            if let Some(b) = s.push(Bytes::copy_from_slice(c)) {
                out.extend_from_slice(&b);
            }
        }
        if let Some(b) = s.finish() {
            out.extend_from_slice(&b);
        }
        out
    }

    #[test]
    fn non_soap_passes_through_unchanged() {
        for doc in ["{\"json\":true}", "<html><body/></html>", ""] {
            assert_eq!(stamp_all(&[doc.as_bytes()]), doc);
        }
    }

    proptest! {
        /// However the response is cut into chunks, the output is the stamped document.
        #[test]
        fn chunking_does_not_matter(cuts in proptest::collection::vec(0usize..200, 0..6), which in 0usize..3) {
            let doc = [WITH_HEADER, NO_HEADER, EMPTY_HEADER][which].as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (doc.len() + 1)).collect();
            cuts.sort();
            let mut chunks = Vec::new();
            let mut last = 0;
            for c in cuts { chunks.push(&doc[last..c]); last = c; }
            chunks.push(&doc[last..]);
            let whole = stamp_all(&[doc]);
            prop_assert_eq!(stamp_all(&chunks), whole);
        }
    }

    #[test]
    fn faults_parse_and_carry_code_and_message_id() {
        for v in [SoapVersion::V11, SoapVersion::V12] {
            let f = fault(
                v,
                true,
                "FSP-AUTHN-MISSING",
                "No credential",
                "a <detail> & more",
                "m-1",
                "t",
            );
            assert!(f.contains(v.envelope_ns()));
            assert!(f.contains("<fsp:Code>FSP-AUTHN-MISSING</fsp:Code>"));
            assert!(f.contains("<fsp:MessageID>m-1</fsp:MessageID>"));
            assert!(f.contains("a &lt;detail&gt; &amp; more"));
            let mut r = quick_xml::Reader::from_str(&f);
            while !matches!(r.read_event().unwrap(), Event::Eof) {}
        }
    }

    #[test]
    fn version_and_action_from_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            "application/soap+xml; charset=utf-8; action=\"urn:getPerson\""
                .parse()
                .unwrap(),
        );
        assert_eq!(SoapVersion::of(&h), Some(SoapVersion::V12));
        assert_eq!(action(&h).as_deref(), Some("urn:getPerson"));
        h.insert(CONTENT_TYPE, "text/xml".parse().unwrap());
        h.insert("soapaction", "\"urn:getPerson11\"".parse().unwrap());
        assert_eq!(SoapVersion::of(&h), Some(SoapVersion::V11));
        assert_eq!(action(&h).as_deref(), Some("urn:getPerson11"));
    }
}
