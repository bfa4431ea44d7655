//! The HTTP/1.1 heads exchanged with a provider: the request line and fields written
//! with the gateway's framing, and the answer's status line and fields parsed (RFC 9112
//! §2-§6), with the framing of the body that follows.

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Version};
use std::io;

use super::chunked::{self, Chunk, Framing};
use crate::headers::Outbound;
use crate::transport::body::BodyError;

/// Largest response head accepted (status line and header fields).
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in a response head.
const MAX_HEADERS: usize = 100;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the provider closed the connection without answering")]
    Closed,
    #[error("the provider's answer is not valid HTTP/1.1: {0}")]
    Protocol(String),
    #[error(transparent)]
    RequestBody(BodyError),
}

/// The provider's answer: its head, how its body is framed, and whether the connection
/// can serve another call once that body has been read.
#[derive(Debug)]
pub struct Answer {
    pub head: http::response::Parts,
    pub framing: Framing,
    pub reusable: bool,
}

/// How the request body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Out {
    None,
    Length(u64),
    Chunked,
}

/// The request line and header fields, with the framing chosen for the body.
pub(super) fn encode_head(
    buf: &mut Vec<u8>,
    method: &Method,
    path: &PathAndQuery,
    host: Option<&HeaderValue>,
    fields: &Outbound<'_>,
    out: Out,
) {
    buf.extend_from_slice(method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(path.as_str().as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        buf.extend_from_slice(b"host: ");
        buf.extend_from_slice(host.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    fields.for_each(|name, value| {
        // Framing is the gateway's own.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            return;
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    });
    match out {
        Out::Length(n) => {
            buf.extend_from_slice(b"content-length: ");
            push_decimal(buf, n);
            buf.extend_from_slice(b"\r\n");
        }
        Out::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Out::None => {}
    }
    buf.extend_from_slice(b"\r\n");
}

/// Appends the decimal digits of `n`, without the formatter.
pub(super) fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

pub(super) enum Parsed {
    /// A 1xx answer, skipped.
    Interim,
    Final(Answer),
}

/// Parses an answer's head from the start of `rbuf`, consuming it when complete.
pub(super) fn parse_head(
    rbuf: &mut BytesMut,
    head_only: bool,
) -> Result<Option<Parsed>, ExchangeError> {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, rbuf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::Protocol(format!(
                "more than {MAX_HEADERS} header fields"
            )));
        }
        Err(e) => return Err(ExchangeError::Protocol(e.to_string())),
    };
    let code = res.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| ExchangeError::Protocol(format!("status code {code}")))?;
    if status.is_informational() {
        if code == 101 {
            return Err(ExchangeError::Protocol(
                "the provider switched protocols (101), which the gateway does not relay".into(),
            ));
        }
        rbuf.advance(len);
        return Ok(Some(Parsed::Interim));
    }
    let http10 = res.version == Some(0);
    let base = rbuf.as_ptr() as usize;
    let count = res.headers.len();
    // Field positions in the head, so the values can share its buffer.
    // (u32: a head is at most MAX_HEAD bytes.)
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut coded = false;
    let mut close = http10;
    for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
        *span = (
            (h.name.as_ptr() as usize - base) as u32,
            h.name.len() as u32,
            (h.value.as_ptr() as usize - base) as u32,
            h.value.len() as u32,
        );
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            for part in h.value.split(|&b| b == b',') {
                let n = parse_decimal(chunked::trim(part)).ok_or_else(|| {
                    ExchangeError::Protocol(format!(
                        "invalid Content-Length {:?}",
                        String::from_utf8_lossy(h.value)
                    ))
                })?;
                if length.is_some_and(|l| l != n) {
                    return Err(ExchangeError::Protocol(
                        "conflicting Content-Length values".into(),
                    ));
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // The gateway frames the body again for the consumer.
            span.1 = 0;
            coded = true;
            // Only the last coding says whether the body is chunked.
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| chunked::trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            // Hop-by-hop: left out here when it only says close or keep-alive; when it
            // names other fields, kept for the caller's hop-by-hop stripping to see.
            let mut names_fields = false;
            for token in h.value.split(|&b| b == b',').map(chunked::trim) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    if http10 {
                        close = false;
                    }
                } else if !token.is_empty() {
                    names_fields = true;
                }
            }
            if !names_fields {
                span.1 = 0;
            }
        } else if name.eq_ignore_ascii_case(b"keep-alive") {
            span.1 = 0;
        }
    }
    let head = rbuf.split_to(len).freeze();
    // Room for the fields the gateway adds (FSP, lifecycle).
    let mut headers = HeaderMap::with_capacity(count + 4);
    for &(ns, nl, vs, vl) in &spans[..count] {
        if nl == 0 {
            continue; // hop-by-hop
        }
        let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
        let name = HeaderName::from_bytes(&head[ns..ns + nl]).map_err(|_| {
            ExchangeError::Protocol(format!(
                "invalid header name {:?}",
                String::from_utf8_lossy(&head[ns..ns + nl])
            ))
        })?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
            .map_err(|_| ExchangeError::Protocol(format!("invalid value for {name}")))?;
        headers.append(name, value);
    }
    let framing = if head_only || code == 204 || code == 304 {
        Framing::Done
    } else if coded {
        // A body both coded and with a length: the coding wins, and the connection
        // cannot be trusted afterwards (RFC 9112 §6.3).
        if length.is_some() {
            close = true;
        }
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(0) => Framing::Done,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = Version::HTTP_11;
    *response.headers_mut() = headers;
    let reusable = !close && framing != Framing::UntilClose;
    Ok(Some(Parsed::Final(Answer {
        head: response.into_parts().0,
        framing,
        reusable,
    })))
}

pub(super) fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 {
        return None;
    }
    b.iter().try_fold(0u64, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0'))
    })
}

/// Fuzz entry point: parses `data` as a provider's answer (head, then body as framed),
/// fed in pieces of `step` bytes, as the connection code does. Returns the body read, or
/// why the answer was refused; panics only if an invariant breaks.
#[doc(hidden)]
pub fn fuzz_answer(data: &[u8], step: usize, head_only: bool) -> Result<Vec<u8>, String> {
    let step = step.max(1);
    let mut fed: usize = 0;
    let mut rbuf = BytesMut::new();
    let mut feed = |rbuf: &mut BytesMut| {
        let end = fed.saturating_add(step).min(data.len());
        rbuf.extend_from_slice(&data[fed..end]);
        let n = end - fed;
        fed = end;
        n
    };
    let mut framing = loop {
        match parse_head(&mut rbuf, head_only).map_err(|e| e.to_string())? {
            Some(Parsed::Interim) => continue,
            Some(Parsed::Final(answer)) => break answer.framing,
            None if rbuf.len() > MAX_HEAD => return Err("head too large".into()),
            None => {
                if feed(&mut rbuf) == 0 {
                    return Err("the answer ended in its head".into());
                }
            }
        }
    };
    let mut body = Vec::new();
    loop {
        match &mut framing {
            Framing::Done => return Ok(body),
            Framing::Length(left) => {
                if rbuf.is_empty() && feed(&mut rbuf) == 0 {
                    return Err("length body cut short".into());
                }
                let take = (*left).min(rbuf.len() as u64);
                *left -= take;
                body.extend_from_slice(&rbuf.split_to(take as usize));
                if *left == 0 {
                    framing = Framing::Done;
                }
            }
            Framing::UntilClose => {
                body.extend_from_slice(&rbuf.split());
                if feed(&mut rbuf) == 0 {
                    return Ok(body);
                }
            }
            Framing::Chunked(state) => {
                if let Chunk::Data(left) = state
                    && !rbuf.is_empty()
                {
                    let take = (*left).min(rbuf.len() as u64);
                    *left -= take;
                    body.extend_from_slice(&rbuf.split_to(take as usize));
                    if *left == 0 {
                        *state = Chunk::DataEnd;
                    }
                    continue;
                }
                match chunked::advance(&mut rbuf, &mut framing) {
                    Err(e) => return Err(e.to_string()),
                    Ok(true) => {}
                    Ok(false) => {
                        if feed(&mut rbuf) == 0 {
                            return Err("chunked body cut short".into());
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(head: &str, head_only: bool) -> Result<Option<Parsed>, ExchangeError> {
        let mut buf = BytesMut::from(head.as_bytes());
        parse_head(&mut buf, head_only)
    }

    fn answer(head: &str) -> Answer {
        match parse(head, false) {
            Ok(Some(Parsed::Final(a))) => a,
            other => panic!("{head:?} gave {:?}", other.map(|p| p.map(|_| ()))),
        }
    }

    #[test]
    fn answers_are_framed_as_rfc_9112_says() {
        let a = answer("HTTP/1.1 200 OK\r\ncontent-length: 12\r\nx-a: 1\r\nx-a: 2\r\n\r\n");
        assert_eq!(a.framing, Framing::Length(12));
        assert!(a.reusable);
        assert_eq!(a.head.status, StatusCode::OK);
        assert_eq!(a.head.headers.get_all("x-a").iter().count(), 2);

        // Hop-by-hop fields about this connection are not passed on; Connection naming
        // other fields is, for the caller to strip them.
        let a = answer(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\ntransfer-encoding: chunked\r\nx-b: 1\r\n\r\n",
        );
        assert_eq!(
            a.head
                .headers
                .keys()
                .map(|k| k.as_str())
                .collect::<Vec<_>>(),
            ["x-b"]
        );
        let a = answer("HTTP/1.1 200 OK\r\nconnection: x-b\r\nx-b: 1\r\ncontent-length: 0\r\n\r\n");
        assert!(a.head.headers.contains_key("connection"));

        let a = answer("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n");
        assert_eq!(a.framing, Framing::Chunked(Chunk::Size));
        assert!(a.reusable);
        // Chunked wins over a length, and the connection is not trusted afterwards.
        let a =
            answer("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(a.framing, Framing::Chunked(Chunk::Size));
        assert!(!a.reusable);
        // A coding that is not chunked last: the body runs to the end of the connection.
        let a = answer("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n");
        assert_eq!(a.framing, Framing::UntilClose);
        assert!(!a.reusable);
        let a = answer("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(a.framing, Framing::UntilClose);
        assert!(!a.reusable);

        let a = answer("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(a.framing, Framing::Done);
        assert!(a.reusable);
        for code in [204, 304] {
            let a = answer(&format!("HTTP/1.1 {code} X\r\ncontent-length: 7\r\n\r\n"));
            assert_eq!(a.framing, Framing::Done, "{code}");
        }
        match parse("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", true) {
            Ok(Some(Parsed::Final(a))) => assert_eq!(a.framing, Framing::Done),
            _ => panic!("HEAD answer"),
        }

        assert!(
            !answer("HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 1\r\n\r\n").reusable
        );
        assert!(!answer("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n").reusable);
        assert!(
            answer("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n")
                .reusable
        );
        // The same length repeated is one length.
        assert_eq!(
            answer("HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\n").framing,
            Framing::Length(3)
        );
    }

    #[test]
    fn bad_answers_are_refused_with_a_reason() {
        for (head, says) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
                "conflicting",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
                "switched protocols",
            ),
            ("HTTP/1.1 2000 OK\r\n\r\n", "not valid"),
            ("SSH-2.0-OpenSSH_9.2\r\n\r\n", "not valid"),
        ] {
            match parse(head, false) {
                Err(e) => assert!(e.to_string().contains(says), "{head:?}: {e}"),
                Ok(_) => panic!("{head:?} was accepted"),
            }
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let e = parse(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("more than 100 header fields"), "{e}");
    }

    #[test]
    fn interim_answers_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
        );
        assert!(matches!(
            parse_head(&mut buf, false),
            Ok(Some(Parsed::Interim))
        ));
        match parse_head(&mut buf, false) {
            Ok(Some(Parsed::Final(a))) => assert_eq!(a.framing, Framing::Length(2)),
            _ => panic!("final answer"),
        }
        assert_eq!(&buf[..], b"ok", "the body stays in the buffer");
        assert!(matches!(
            parse("HTTP/1.1 200 OK\r\ncontent-le", false),
            Ok(None)
        ));
    }

    #[test]
    fn request_heads_carry_the_gateway_framing() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(header::HOST, HeaderValue::from_static("consumer.example"));
        headers.insert("fsp-purpose", HeaderValue::from_static("benchmark"));
        let path = PathAndQuery::from_static("/a/b?c=d");
        let host = HeaderValue::from_static("provider.example:8443");
        let peer = HeaderValue::from_static("192.0.2.1");
        let fields = Outbound::new(headers, &[], &[], &[], &peer);
        let mut buf = Vec::new();
        encode_head(
            &mut buf,
            &Method::POST,
            &path,
            Some(&host),
            &fields,
            Out::Length(1234567),
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "POST /a/b?c=d HTTP/1.1\r\nhost: provider.example:8443\r\nfsp-purpose: benchmark\r\n\
             x-forwarded-for: 192.0.2.1\r\nx-forwarded-proto: https\r\ncontent-length: 1234567\r\n\r\n"
        );
        let fields = Outbound::new(HeaderMap::new(), &[], &[], &[], &peer);
        let mut buf = Vec::new();
        encode_head(&mut buf, &Method::PUT, &path, None, &fields, Out::Chunked);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "PUT /a/b?c=d HTTP/1.1\r\nx-forwarded-for: 192.0.2.1\r\nx-forwarded-proto: https\r\n\
             transfer-encoding: chunked\r\n\r\n"
        );
        let mut buf = Vec::new();
        push_decimal(&mut buf, 0);
        push_decimal(&mut buf, u64::MAX);
        assert_eq!(buf, b"018446744073709551615");
    }
}
