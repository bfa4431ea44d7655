//! Entry points of the fuzz targets (run by `proxy/tests/fuzz.rs`).
//!
//! Each takes arbitrary bytes, runs one parser of bytes from the network or from an
//! operator, and checks the invariants that parser promises. A target panics only when
//! an invariant breaks (or when the parser itself panics): that is a bug.

use bytes::Bytes;

/// The first byte picks how the rest is cut into pieces, so the same input is tried
/// with several chunkings.
fn step_of(data: &[u8]) -> (usize, &[u8]) {
    match data.split_first() {
        Some((s, rest)) => (usize::from(*s % 17) + 1, rest),
        None => (1, data),
    }
}

/// A provider's HTTP/1.1 answer: head parser and body decoders (chunked, length,
/// until close). However the bytes are cut, the outcome is the same.
pub fn h1_answer(data: &[u8]) {
    let (step, data) = step_of(data);
    let whole = crate::transport::h1::codec::fuzz_answer(data, usize::MAX, false);
    let cut = crate::transport::h1::codec::fuzz_answer(data, step, false);
    // A head that is refused is refused however it arrives; a body that decodes,
    // decodes the same.
    match (&whole, &cut) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the body depends on the chunking"),
        (Err(_), Err(_)) => {}
        // Cut short mid-way: the whole input may complete where a prefix did not; both
        // orders are fine only if one of them is an "ended" error.
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => assert!(
            e.contains("cut short") || e.contains("ended") || e.contains("too large"),
            "whole {whole:?} / cut {cut:?}"
        ),
    }
    let _ = crate::transport::h1::codec::fuzz_answer(data, step, true);
}

/// The SOAP response stamp: it only ever inserts the FSP elements, never drops or
/// reorders the provider's bytes, whatever the chunking.
pub fn soap_stamp(data: &[u8]) {
    let (step, data) = step_of(data);
    let run = |step: usize| {
        let mut s = crate::soap::HeaderStamp::new("m-1", "2026-01-01T00:00:00.000Z");
        let mut out = Vec::new();
        for piece in data.chunks(step.max(1)) {
            if let Some(b) = s.push(Bytes::copy_from_slice(piece)) {
                out.extend_from_slice(&b);
            }
        }
        if let Some(b) = s.finish() {
            out.extend_from_slice(&b);
        }
        out
    };
    let whole = run(data.len().max(1));
    let cut = run(step);
    assert_eq!(whole, cut, "the output depends on the chunking");
    if !whole
        .windows(b"<fsp:MessageID".len())
        .any(|w| w == b"<fsp:MessageID")
    {
        assert_eq!(whole, data, "an unstamped answer must pass unchanged");
        return;
    }
    // Stamped: every byte of the provider's answer is still there, in order (only the
    // white space inside an empty `<Header />` the stamp expanded may go).
    let mut rest = data.iter().filter(|b| !b.is_ascii_whitespace()).peekable();
    for b in whole.iter() {
        if rest.peek() == Some(&b) {
            rest.next();
        }
    }
    assert!(rest.peek().is_none(), "the provider's bytes were altered");
}

/// The XML threat protection (and SOAP Header capture): the verdict and what it found
/// do not depend on how the bytes are cut.
pub fn xml_guard(data: &[u8]) {
    let (step, data) = step_of(data);
    let limits = crate::xml::Limits {
        max_depth: 16,
        max_attributes: 8,
        max_name_length: 32,
        max_attribute_length: 64,
        max_text_length: 256,
    };
    let run = |step: usize, soap: bool| {
        let mut g = if soap {
            crate::xml::Guard::soap(limits, 512)
        } else {
            crate::xml::Guard::new(limits)
        };
        let mut verdict = Ok(());
        for piece in data.chunks(step.max(1)) {
            verdict = g.feed(piece);
            if verdict.is_err() {
                break;
            }
        }
        if verdict.is_ok() {
            verdict = g.finish();
        }
        (verdict.map_err(|e| e.to_string()), g.soap_header().cloned())
    };
    for soap in [false, true] {
        let whole = run(data.len().max(1), soap);
        let cut = run(step, soap);
        assert_eq!(whole, cut, "the verdict depends on the chunking");
    }
}

/// Path normalisation: what is forwarded never leaves the version, and normalising is
/// idempotent.
pub fn path(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Only what can be a request's path reaches the normaliser (no `?`, `#`, spaces...).
    let Ok(target) = http::uri::PathAndQuery::try_from(format!("/{text}")) else {
        return;
    };
    let rest = target.path().to_owned();
    let Ok(n) = crate::path::normalise_rest(&rest) else {
        return;
    };
    assert!(n.is_empty() || n.starts_with('/'), "{rest:?} -> {n:?}");
    assert!(!n.contains("//"), "{rest:?} -> {n:?}");
    for seg in n.split('/') {
        assert!(seg != "." && seg != "..", "{rest:?} -> {n:?}");
    }
    assert_eq!(
        crate::path::normalise_rest(&n).ok().as_deref(),
        Some(&*n),
        "not idempotent"
    );
    // Read as leniently as any server would, it stays under the version's base path.
    let read = crate::path::lenient_reading(&format!("/base/v2{n}"));
    assert!(
        read == "/base/v2" || read.starts_with("/base/v2/"),
        "{rest:?} -> {n:?} read as {read:?}"
    );
}

/// A JWK set from the identity provider (or a file an operator points at).
pub fn jwks(data: &[u8]) {
    let _ = crate::oauth::parse_jwks(data);
}
