//! The part of a request path that goes to the provider, made unambiguous.
//!
//! A call names `/{family}/{service}/{version}` and the rest of its path is appended to
//! that version's upstream URL. Authorisation is decided on the version, so the rest must
//! never reach another version, another service or the provider's root, however the
//! provider (or a proxy in front of it) reads paths: nginx merges slashes and resolves dot
//! segments, Tomcat strips `;parameters` before resolving them (`..;/`), IIS and some
//! frameworks decode `%2f` or `%5c` into separators or decode twice.
//!
//! [`normalise_rest`] therefore:
//! - decodes percent-encoded *unreserved* characters (RFC 3986 §2.3, so `%2e` is `.`)
//!   and keeps every other escape as it is;
//! - merges repeated slashes, then removes dot segments (RFC 3986 §5.2.4);
//! - refuses what a provider could read differently from us: an encoded `/` or `\`, a
//!   backslash, an escape of `%` that introduces another escape (`%252e`), an escaped
//!   control character, a malformed escape, bytes that are not UTF-8 once decoded
//!   (overlong forms such as `%c0%ae`), characters that Unicode compatibility or Windows
//!   best-fit mapping turn into a dot or a slash (`．`, `／`, `‥`), a segment that is a
//!   dot segment once decoded, once its `;parameters` are stripped (`..;x`, `.%3b`) or
//!   once trailing spaces and dots are dropped (`..%20.`), and any `..` that would climb
//!   above the version's root;
//! - forwards raw non-ASCII bytes percent-encoded.
//!
//! What is forwarded is the normalised form, so the provider sees a path with no dot
//! segments and no empty segments, which every server reads the same way.
//!
//! Pure: no I/O, and a borrowed answer for the common path that needs no change.

use std::borrow::Cow;

/// Why a path is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("it contains an encoded slash or backslash (%2F or %5C)")]
    EncodedSeparator,
    #[error("it contains a backslash")]
    Backslash,
    #[error("it contains a double-encoded character (%25 followed by an escape)")]
    DoubleEncoding,
    #[error("it contains an encoded control character")]
    Control,
    #[error("it contains a malformed percent-escape")]
    BadEscape,
    #[error(
        "a segment would be read as `.` or `..` by some servers (`..;`, `.;` or an encoded form)"
    )]
    AmbiguousDotSegment,
    #[error("its `..` segments climb above the service version")]
    Escapes,
    #[error("it holds bytes that are not valid UTF-8 once decoded (such as overlong forms)")]
    NotUtf8,
    #[error("it holds a character that some servers read as a dot or a slash")]
    Confusable,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether the path needs the slow road: anything but plain segment characters and
/// single slashes.
fn needs_work(rest: &[u8]) -> bool {
    let mut prev_slash = false;
    for &b in rest {
        match b {
            b'%' | b'\\' | b'.' | b';' | 0x80.. => return true,
            b'/' if prev_slash => return true,
            _ => {}
        }
        prev_slash = b == b'/';
    }
    false
}

/// The rest of a gateway path (empty, or starting with `/`), normalised for forwarding;
/// see the module documentation.
pub fn normalise_rest(rest: &str) -> Result<Cow<'_, str>, PathError> {
    if !needs_work(rest.as_bytes()) {
        return Ok(Cow::Borrowed(rest));
    }
    // 1. Escapes: decode unreserved ones, refuse the dangerous ones, keep the rest.
    let raw = rest.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let (Some(h), Some(l)) = (
                    raw.get(i + 1).copied().and_then(hex),
                    raw.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let b = (h << 4) | l;
                match b {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    0..=0x1f | 0x7f => return Err(PathError::Control),
                    b if unreserved(b) => decoded.push(b),
                    _ => decoded.extend_from_slice(&raw[i..i + 3]),
                }
                i += 3;
            }
            // Raw non-ASCII (which a URI may not hold): forwarded percent-encoded.
            b @ 0x80.. => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                decoded.extend_from_slice(&[
                    b'%',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 15)],
                ]);
                i += 1;
            }
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    // An escaped `%` that, once the unreserved escapes around it are decoded, starts
    // another escape (`%252e`, `%25%32%65`, IIS's `%25u002e`): a server that decodes
    // twice reads the character behind it.
    if decoded.windows(5).any(|w| {
        w[..3].eq_ignore_ascii_case(b"%25")
            && ((hex(w[3]).is_some() && hex(w[4]).is_some()) || w[3].eq_ignore_ascii_case(&b'u'))
    }) {
        return Err(PathError::DoubleEncoding);
    }
    // 2. Segments: empty ones merged away, dot segments resolved, ambiguous ones refused.
    let trailing_slash =
        decoded.last() == Some(&b'/') || decoded.ends_with(b"/.") || decoded.ends_with(b"/..");
    let mut out: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" => {}
            b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(PathError::Escapes);
                }
            }
            s => {
                check_segment(s)?;
                out.push(s);
            }
        }
    }
    let mut path = Vec::with_capacity(decoded.len() + 1);
    for seg in &out {
        path.push(b'/');
        path.extend_from_slice(seg);
    }
    if trailing_slash || (path.is_empty() && !decoded.is_empty()) {
        path.push(b'/');
    }
    // Only ASCII went in (a URI path), and only whole escapes were kept.
    String::from_utf8(path)
        .map(Cow::Owned)
        .map_err(|_| PathError::BadEscape)
}

/// Characters that Unicode compatibility normalisation (NFKC) or Windows "best fit"
/// mapping turn into `.`, `/` or `\`: a server that applies either would see a dot
/// segment or a separator the gateway did not.
const CONFUSABLES: &[char] = &[
    '\u{2024}', // ONE DOT LEADER
    '\u{2025}', // TWO DOT LEADER
    '\u{2026}', // HORIZONTAL ELLIPSIS
    '\u{FE52}', // SMALL FULL STOP
    '\u{FF0E}', // FULLWIDTH FULL STOP
    '\u{3002}', // IDEOGRAPHIC FULL STOP
    '\u{FF61}', // HALFWIDTH IDEOGRAPHIC FULL STOP
    '\u{FF0F}', // FULLWIDTH SOLIDUS
    '\u{2215}', // DIVISION SLASH
    '\u{2044}', // FRACTION SLASH
    '\u{29F8}', // BIG SOLIDUS
    '\u{FF3C}', // FULLWIDTH REVERSE SOLIDUS
    '\u{FE68}', // SMALL REVERSE SOLIDUS
    '\u{29F9}', // BIG REVERSE SOLIDUS
];

/// Refuses a segment (already free of unreserved escapes, and not exactly `.` or `..`)
/// that some server would read otherwise than as a plain name: bytes that are not UTF-8
/// once decoded (overlong forms such as `%c0%ae` are read as `.` by some), characters
/// that normalise to a dot or a separator, and segments that are dot segments once fully
/// decoded, with their `;parameters` stripped (Tomcat), or with trailing spaces and dots
/// dropped (IIS).
fn check_segment(seg: &[u8]) -> Result<(), PathError> {
    if !seg.iter().any(|&b| b == b'%' || b == b'.' || b == b';') {
        return Ok(());
    }
    let full = percent_decode(seg);
    let Ok(text) = std::str::from_utf8(&full) else {
        return Err(PathError::NotUtf8);
    };
    if text.contains(CONFUSABLES) {
        return Err(PathError::Confusable);
    }
    if reads_as_dot_segment(text) {
        return Err(PathError::AmbiguousDotSegment);
    }
    Ok(())
}

/// Whether a decoded segment is a dot segment for a lenient server.
fn reads_as_dot_segment(full: &str) -> bool {
    let name = full.split(';').next().unwrap_or_default();
    let core = name.trim_end_matches(|c: char| c.is_whitespace() || c == '.');
    (name == "." || name == "..") || (core.is_empty() && name.contains('.'))
}

/// Decodes every well-formed percent-escape once (a malformed one is kept as it is).
pub fn percent_decode(p: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'%'
            && let (Some(h), Some(l)) = (
                p.get(i + 1).copied().and_then(hex),
                p.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h << 4) | l);
            i += 3;
        } else {
            out.push(p[i]);
            i += 1;
        }
    }
    out
}

/// How the most lenient server reads a request path: percent-decoded twice,
/// backslashes taken as slashes, `;parameters` and trailing spaces dropped, slashes
/// merged, dot segments resolved (never above the root). The tests and the fuzz target
/// check that what the gateway forwards stays inside its version under this reading.
pub fn lenient_reading(path: &str) -> String {
    let path = path.split('?').next().unwrap_or_default();
    let decoded = percent_decode(&percent_decode(path.as_bytes()));
    let text = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        match seg.split(';').next().unwrap_or_default().trim_end() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn ok(rest: &str) -> String {
        normalise_rest(rest)
            .unwrap_or_else(|e| panic!("{rest:?}: {e}"))
            .into_owned()
    }

    #[test]
    fn plain_paths_are_borrowed_unchanged() {
        for p in ["", "/", "/persons/85073003328", "/a/b/", "/a-b_c~d"] {
            assert!(matches!(normalise_rest(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn dot_segments_inside_the_version_are_resolved() {
        assert_eq!(ok("/a/../b"), "/b");
        assert_eq!(ok("/a/./b"), "/a/b");
        assert_eq!(ok("/a//b"), "/a/b");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/."), "/a/");
        assert_eq!(ok("/."), "/");
        assert_eq!(ok("/a/%2e%2E/b"), "/b");
        assert_eq!(ok("/file.json"), "/file.json");
        assert_eq!(ok("/%41%7e"), "/A~");
        assert_eq!(ok("/a%20b/c%3Bd"), "/a%20b/c%3Bd");
        assert_eq!(ok("/x;jsessionid=1/y"), "/x;jsessionid=1/y");
        assert_eq!(ok("/a/...b"), "/a/...b");
        assert_eq!(ok("/M%C3%BCller/a.b."), "/M%C3%BCller/a.b.");
        assert_eq!(ok("/Müller"), "/M%C3%BCller");
        assert_eq!(ok("/100%25"), "/100%25");
    }

    #[test]
    fn escapes_and_ambiguities_are_refused() {
        use PathError::*;
        for (p, want) in [
            ("/..", Escapes),
            ("/../v3/x", Escapes),
            ("/a/../../v3", Escapes),
            ("/%2e%2e/v3", Escapes),
            ("/.%2E/v3", Escapes),
            ("//../v3", Escapes),
            ("/a/..%2fv3", EncodedSeparator),
            ("/..%2Fv3", EncodedSeparator),
            ("/..%5cv3", EncodedSeparator),
            ("/..\\v3", Backslash),
            ("/%252e%252e/v3", DoubleEncoding),
            ("/%25%32%65", DoubleEncoding),
            ("/%25%32%65%25%32%65/v3", DoubleEncoding),
            ("/..;/v3", AmbiguousDotSegment),
            ("/..;x=1/v3", AmbiguousDotSegment),
            ("/.;/x", AmbiguousDotSegment),
            ("/..%3b/v3", AmbiguousDotSegment),
            ("/..%20/v3", AmbiguousDotSegment),
            ("/.../v3", AmbiguousDotSegment),
            ("/%00", Control),
            ("/%0a", Control),
            ("/%zz", BadEscape),
            ("/%c0%ae%c0%ae/v2", NotUtf8),
            ("/%e0%80%ae%e0%80%ae/x", NotUtf8),
            ("/%c0%2e%c0%2e/x", NotUtf8),
            ("/..%a0/x", NotUtf8),
            ("/%25u002e%25u002e/x", DoubleEncoding),
            ("/%ef%bc%8e%ef%bc%8e/x", Confusable),
            ("/\u{ff0e}\u{ff0e}/x", Confusable),
            ("/a%ef%bc%8fb", Confusable),
            ("/..%20./x", AmbiguousDotSegment),
            ("/..%c2%a0/x", AmbiguousDotSegment),
            ("/%2", BadEscape),
        ] {
            assert_eq!(normalise_rest(p), Err(want), "{p}");
        }
    }

    proptest! {
        /// Whatever a consumer sends, what is forwarded stays below the version's base
        /// path for a server that reads paths as leniently as any.
        #[test]
        fn forwarded_paths_never_leave_the_version(
            segs in proptest::collection::vec(
                prop_oneof![
                    Just("..".to_owned()), Just(".".to_owned()), Just("".to_owned()),
                    Just("%2e%2e".to_owned()), Just("%2e".to_owned()), Just("..;x".to_owned()),
                    Just("%252e%252e".to_owned()), Just("..%2f".to_owned()), Just("%5c".to_owned()),
                    Just("a".to_owned()), Just("b%20c".to_owned()), Just(".%2e".to_owned()),
                    "[a-z.%;0-9]{0,6}",
                ],
                0..8,
            )
        ) {
            let rest = format!("/{}", segs.join("/"));
            if let Ok(n) = normalise_rest(&rest) {
                let forwarded = format!("/base/v2{n}");
                let read = lenient_reading(&forwarded);
                prop_assert!(
                    read == "/base/v2" || read.starts_with("/base/v2/"),
                    "{rest:?} -> {forwarded:?} read as {read:?}"
                );
                // Normalising is idempotent.
                prop_assert_eq!(normalise_rest(&n).unwrap(), n.clone());
            }
        }
    }
}
