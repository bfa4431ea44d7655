//! HTTP/1.1 towards providers, spoken by the call's own task.
//!
//! hyper's client runs every connection as a task of its own, fed through a channel: each
//! call costs a hand-over to that task and back, and a second state machine. Here the
//! call's task writes the request and reads the answer on its pooled connection itself
//! ([`exchange`]), and the response body is read from the same connection as the consumer
//! takes it ([`poll_data`]). Bodies stream both ways; nothing is collected.
//!
//! The rules are RFC 9112's:
//! - the request is framed by `Content-Length` when its size is known, by chunked
//!   encoding otherwise;
//! - the answer's body is framed by `Transfer-Encoding: chunked`, `Content-Length`, or the
//!   end of the connection (§6.3), and has none for HEAD, 204 and 304;
//! - interim answers (1xx) are skipped; a protocol switch (101) is refused;
//! - a connection is reused only when the answer allows it, the request was sent whole and
//!   nothing follows the answer.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Version};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::io::poll_read_buf;

use crate::body::{BodyError, RequestBody};
use crate::headers::Outbound;

/// Largest response head accepted (status line and header fields).
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in a response head.
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line or trailer field accepted.
const MAX_LINE: usize = 4096;
/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;
/// Request body frames up to this size are copied next to their framing and written
/// with it; larger ones are written from their own buffer.
const COALESCE: usize = 16 * 1024;

/// The byte stream of a provider connection.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl fmt::Debug for Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Io::Plain(s) => f.debug_tuple("Plain").field(&s.peer_addr().ok()).finish(),
            Io::Tls(s) => f
                .debug_tuple("Tls")
                .field(&s.get_ref().0.peer_addr().ok())
                .finish(),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// An HTTP/1.1 connection to a provider, with its buffers (kept across calls, so a
/// reused connection allocates nothing for them).
#[derive(Debug)]
pub struct Conn {
    io: Io,
    /// Bytes read and not yet used: the answer's head, then its body.
    rbuf: BytesMut,
    /// The request head and small body frames with their framing, until written.
    wbuf: Vec<u8>,
}

impl Conn {
    pub fn new(io: Io) -> Self {
        Self {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::with_capacity(1024),
        }
    }

    /// Whether an idle connection can carry a request: the provider has neither closed
    /// it nor sent anything unasked. Costs no system call when nothing has happened on
    /// the socket since its last answer was read.
    pub fn is_idle_usable(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        // Pending: nothing to read, the connection is open. Anything else (end of
        // stream, unasked bytes, an error) makes it unusable.
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }

    /// Reads more of the provider's bytes into the buffer; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
    }
}

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

/// A failed exchange, with the request body given back when it may be sent again.
#[derive(Debug)]
pub struct Failed {
    pub error: ExchangeError,
    /// Untouched, and returned only when nothing of an answer was received: the caller
    /// may send the request again on another connection.
    pub body: Option<RequestBody>,
}

/// The provider's answer: its head, how its body is framed, and whether the connection
/// can serve another call once that body has been read.
#[derive(Debug)]
pub struct Answer {
    pub head: http::response::Parts,
    pub framing: Framing,
    pub reusable: bool,
}

/// How the rest of an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The body is complete (or there is none).
    Done,
    /// This many bytes remain.
    Length(u64),
    /// Chunked transfer coding, at this point of it.
    Chunked(Chunk),
    /// The body ends when the provider closes the connection.
    UntilClose,
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data remain.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line.
    Trailers,
}

impl Framing {
    pub fn is_done(&self) -> bool {
        matches!(self, Framing::Done)
    }
}

/// How the request body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    None,
    Length(u64),
    Chunked,
}

/// Sends one request on `conn` and reads the answer's head. The request body is sent as
/// the consumer delivers it, while the answer is awaited: a provider may answer early
/// (then the rest of the body is not sent, and the connection is not reused).
pub async fn exchange(
    conn: &mut Conn,
    method: &Method,
    path: &PathAndQuery,
    host: Option<&HeaderValue>,
    fields: &Outbound<'_>,
    body: RequestBody,
) -> Result<Answer, Failed> {
    let out = if body.is_end_stream() {
        if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            Out::Length(0)
        } else {
            Out::None
        }
    } else {
        match body.size_hint().exact() {
            Some(n) => Out::Length(n),
            None => Out::Chunked,
        }
    };
    conn.wbuf.clear();
    encode_head(&mut conn.wbuf, method, path, host, fields, out);
    let mut ex = Exchange {
        conn,
        body: Some(body),
        sending: !matches!(out, Out::None | Out::Length(0)),
        out,
        declared_left: match out {
            Out::Length(n) => n,
            _ => 0,
        },
        written: 0,
        large: None,
        chunk_end_after_large: false,
        need_flush: false,
        body_touched: false,
        received: false,
        write_error: None,
        head_only: *method == Method::HEAD,
    };
    match std::future::poll_fn(|cx| ex.poll(cx)).await {
        Ok(answer) => Ok(answer),
        Err(error) => Err(Failed {
            error,
            body: if ex.body_touched || ex.received {
                None
            } else {
                ex.body.take()
            },
        }),
    }
}

/// The state of one request in flight.
struct Exchange<'a> {
    conn: &'a mut Conn,
    body: Option<RequestBody>,
    out: Out,
    /// More request body frames are to be taken from the consumer.
    sending: bool,
    /// Bytes the request's `Content-Length` still announces.
    declared_left: u64,
    /// Bytes of `conn.wbuf` already written.
    written: usize,
    /// A large body frame being written after `conn.wbuf`.
    large: Option<Bytes>,
    chunk_end_after_large: bool,
    need_flush: bool,
    body_touched: bool,
    received: bool,
    /// Writing failed: the request is not sent whole, but an answer may still come.
    write_error: Option<io::Error>,
    head_only: bool,
}

impl Exchange<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Answer, ExchangeError>> {
        loop {
            let mut progress = false;
            if self.write_error.is_none()
                && let Err(e) = self.poll_send(cx, &mut progress)
            {
                match e {
                    // The request cannot be completed; an early answer may still be read.
                    ExchangeError::Io(e) => {
                        self.write_error = Some(e);
                        self.sending = false;
                        self.large = None;
                        self.conn.wbuf.clear();
                    }
                    other => return Poll::Ready(Err(other)),
                }
            }
            if let Poll::Ready(r) = self.poll_answer(cx) {
                return Poll::Ready(r);
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Writes what is buffered and takes more of the request body; sets `progress` when
    /// anything moved.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        progress: &mut bool,
    ) -> Result<(), ExchangeError> {
        loop {
            let io = Pin::new(&mut self.conn.io);
            if self.written < self.conn.wbuf.len() {
                match io.poll_write(cx, &self.conn.wbuf[self.written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                    }
                    Poll::Ready(Ok(n)) => {
                        self.written += n;
                        *progress = true;
                        if self.written == self.conn.wbuf.len() {
                            self.conn.wbuf.clear();
                            self.written = 0;
                            self.need_flush = true;
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Err(e.into()),
                    Poll::Pending => return Ok(()),
                }
            }
            if let Some(large) = &mut self.large {
                match io.poll_write(cx, large) {
                    Poll::Ready(Ok(0)) => {
                        return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                    }
                    Poll::Ready(Ok(n)) => {
                        large.advance(n);
                        *progress = true;
                        if large.is_empty() {
                            self.large = None;
                            self.need_flush = true;
                            if std::mem::take(&mut self.chunk_end_after_large) {
                                self.conn.wbuf.extend_from_slice(b"\r\n");
                            }
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Err(e.into()),
                    Poll::Pending => return Ok(()),
                }
            }
            // Everything taken so far is written.
            if self.sending
                && let Some(body) = &mut self.body
            {
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        self.body_touched = true;
                        *progress = true;
                        // Trailers are not forwarded to HTTP/1.1 providers.
                        if let Ok(data) = frame.into_data() {
                            self.queue_data(data)?;
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        self.body_touched = true;
                        return Err(ExchangeError::RequestBody(e));
                    }
                    Poll::Ready(None) => {
                        self.body_touched = true;
                        self.sending = false;
                        *progress = true;
                        match self.out {
                            Out::Chunked => self.conn.wbuf.extend_from_slice(b"0\r\n\r\n"),
                            Out::Length(_) if self.declared_left > 0 => {
                                return Err(ExchangeError::RequestBody(BodyError::Truncated));
                            }
                            _ => {}
                        }
                        continue;
                    }
                    Poll::Pending => {}
                }
            }
            if self.need_flush {
                match Pin::new(&mut self.conn.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.need_flush = false,
                    Poll::Ready(Err(e)) => return Err(e.into()),
                    Poll::Pending => {}
                }
            }
            return Ok(());
        }
    }

    fn queue_data(&mut self, data: Bytes) -> Result<(), ExchangeError> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len();
        match self.out {
            Out::Length(_) => {
                if len as u64 > self.declared_left {
                    return Err(ExchangeError::RequestBody(BodyError::Truncated));
                }
                self.declared_left -= len as u64;
            }
            Out::Chunked => {
                use std::io::Write as _;
                let _ = write!(self.conn.wbuf, "{len:x}\r\n");
            }
            Out::None => return Ok(()),
        }
        let chunked = self.out == Out::Chunked;
        if len <= COALESCE {
            self.conn.wbuf.extend_from_slice(&data);
            if chunked {
                self.conn.wbuf.extend_from_slice(b"\r\n");
            }
        } else {
            self.large = Some(data);
            self.chunk_end_after_large = chunked;
        }
        Ok(())
    }

    /// Reads until the answer's final head is complete.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Result<Answer, ExchangeError>> {
        loop {
            if !self.conn.rbuf.is_empty() {
                match parse_head(&mut self.conn.rbuf, self.head_only) {
                    Ok(Some(Parsed::Interim)) => continue,
                    Ok(Some(Parsed::Final(mut answer))) => {
                        // Sent whole, or the connection is left with half a request.
                        answer.reusable &= !self.sending
                            && self.write_error.is_none()
                            && self.large.is_none()
                            && self.conn.wbuf.is_empty();
                        return Poll::Ready(Ok(answer));
                    }
                    Ok(None) if self.conn.rbuf.len() > MAX_HEAD => {
                        return Poll::Ready(Err(ExchangeError::Protocol(format!(
                            "the answer's head is larger than {MAX_HEAD} bytes"
                        ))));
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            match ready!(self.conn.poll_fill(cx)) {
                Ok(0) if self.received => {
                    return Poll::Ready(Err(ExchangeError::Protocol(
                        "the connection closed in the middle of the answer's head".into(),
                    )));
                }
                Ok(0) => {
                    return Poll::Ready(Err(match self.write_error.take() {
                        Some(e) => ExchangeError::Io(e),
                        None => ExchangeError::Closed,
                    }));
                }
                Ok(_) => self.received = true,
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

/// The request line and header fields, with the framing chosen for the body.
fn encode_head(
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
fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
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

enum Parsed {
    /// A 1xx answer, skipped.
    Interim,
    Final(Answer),
}

/// Parses an answer's head from the start of `rbuf`, consuming it when complete.
fn parse_head(rbuf: &mut BytesMut, head_only: bool) -> Result<Option<Parsed>, ExchangeError> {
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
                let n = parse_decimal(trim(part)).ok_or_else(|| {
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
                .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            // Hop-by-hop: left out here when it only says close or keep-alive; when it
            // names other fields, kept for the caller's hop-by-hop stripping to see.
            let mut names_fields = false;
            for token in h.value.split(|&b| b == b',').map(trim) {
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

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !matches!(c, b' ' | b'\t'))
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !matches!(c, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &b[start..end]
}

fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 {
        return None;
    }
    b.iter().try_fold(0u64, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0'))
    })
}

/// The next piece of an answer's body, read from `conn` as framed by `framing` (which
/// becomes [`Framing::Done`] once the body is complete). `None` at the end.
pub fn poll_data(
    conn: &mut Conn,
    framing: &mut Framing,
    cx: &mut Context<'_>,
) -> Poll<Option<io::Result<Bytes>>> {
    loop {
        match framing {
            Framing::Done => return Poll::Ready(None),
            Framing::Length(left) => {
                if conn.rbuf.is_empty() {
                    match ready!(conn.poll_fill(cx)) {
                        Ok(0) => {
                            return Poll::Ready(Some(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!(
                                    "the provider closed the connection {left} bytes before the end of the answer"
                                ),
                            ))));
                        }
                        Ok(_) => continue,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
                let take = (*left).min(conn.rbuf.len() as u64);
                *left -= take;
                let data = conn.rbuf.split_to(take as usize).freeze();
                if *left == 0 {
                    *framing = Framing::Done;
                }
                return Poll::Ready(Some(Ok(data)));
            }
            Framing::UntilClose => {
                if conn.rbuf.is_empty() {
                    match ready!(conn.poll_fill(cx)) {
                        Ok(0) => {
                            *framing = Framing::Done;
                            return Poll::Ready(None);
                        }
                        Ok(_) => continue,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
                return Poll::Ready(Some(Ok(conn.rbuf.split().freeze())));
            }
            Framing::Chunked(state) => {
                if let Chunk::Data(left) = state
                    && !conn.rbuf.is_empty()
                {
                    let take = (*left).min(conn.rbuf.len() as u64);
                    *left -= take;
                    let data = conn.rbuf.split_to(take as usize).freeze();
                    if *left == 0 {
                        *state = Chunk::DataEnd;
                        // The end of the body is often already here: notice it now, so
                        // the last data goes out as the end of the answer.
                        if let Err(e) = advance_chunked(&mut conn.rbuf, framing) {
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                match advance_chunked(&mut conn.rbuf, framing) {
                    Err(e) => return Poll::Ready(Some(Err(e))),
                    Ok(true) => continue,
                    Ok(false) => match ready!(conn.poll_fill(cx)) {
                        Ok(0) => {
                            return Poll::Ready(Some(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the provider closed the connection before the end of a chunked answer",
                            ))));
                        }
                        Ok(_) => continue,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    },
                }
            }
        }
    }
}

/// Moves a chunked decoder through the framing already buffered (size lines, the CRLF
/// after data, trailers), up to chunk data or the end. `Ok(false)` when more bytes are
/// needed to go on; `Ok(true)` when data is ready or the body is complete.
fn advance_chunked(rbuf: &mut BytesMut, framing: &mut Framing) -> io::Result<bool> {
    let invalid = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("invalid chunked answer: {what}"),
        )
    };
    loop {
        let Framing::Chunked(state) = framing else {
            return Ok(true);
        };
        match state {
            Chunk::Data(_) => return Ok(!rbuf.is_empty()),
            Chunk::Size => {
                let Some((len, used)) = line(rbuf)? else {
                    return Ok(false);
                };
                // chunk-size [ ; extensions ]
                let size = rbuf[..len]
                    .split(|&b| b == b';')
                    .next()
                    .map(trim)
                    .unwrap_or_default();
                let n = if size.is_empty() || size.len() > 15 {
                    None
                } else {
                    size.iter().try_fold(0u64, |n, &c| {
                        (c as char).to_digit(16).map(|d| (n << 4) | u64::from(d))
                    })
                };
                rbuf.advance(used);
                match n {
                    None => return Err(invalid("bad chunk size")),
                    Some(0) => *state = Chunk::Trailers,
                    Some(n) => *state = Chunk::Data(n),
                }
            }
            Chunk::DataEnd => {
                let Some((len, used)) = line(rbuf)? else {
                    return Ok(false);
                };
                if len != 0 {
                    return Err(invalid("chunk data longer than its size"));
                }
                rbuf.advance(used);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some((len, used)) = line(rbuf)? else {
                    return Ok(false);
                };
                rbuf.advance(used);
                if len == 0 {
                    *framing = Framing::Done;
                    return Ok(true);
                }
                // Trailer fields are not passed on.
            }
        }
    }
}

/// The length of the first buffered line without its CRLF (or bare LF), and with it;
/// `None` until the line is complete.
fn line(rbuf: &BytesMut) -> io::Result<Option<(usize, usize)>> {
    // Bounded the same way however the line arrived: in one read or in many.
    match rbuf.iter().take(MAX_LINE + 1).position(|&b| b == b'\n') {
        Some(i) => {
            let len = if i > 0 && rbuf[i - 1] == b'\r' {
                i - 1
            } else {
                i
            };
            Ok(Some((len, i + 1)))
        }
        None if rbuf.len() > MAX_LINE => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("invalid chunked answer: a line longer than {MAX_LINE} bytes"),
        )),
        None => Ok(None),
    }
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
                match advance_chunked(&mut rbuf, &mut framing) {
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
    use tokio::io::AsyncWriteExt;

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

    /// A connection whose provider side writes `wire` in pieces of `step` bytes.
    async fn fed(wire: Vec<u8>, step: usize) -> Conn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for piece in wire.chunks(step) {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            // Keep the connection open until the reader is done.
            let mut sink = [0u8; 1];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut sink).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        Conn::new(Io::Plain(tcp))
    }

    async fn read_body(conn: &mut Conn, mut framing: Framing) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(data) = std::future::poll_fn(|cx| poll_data(conn, &mut framing, cx)).await {
            out.extend_from_slice(&data?);
        }
        assert!(framing.is_done());
        Ok(out)
    }

    #[tokio::test]
    async fn chunked_bodies_decode_however_they_are_split() {
        let wire = b"5;name=value\r\nhello\r\n1b\r\n, and a longer second chunk\r\n0\r\ntrailer: x\r\n\r\nNEXT".to_vec();
        for step in [1, 2, 3, 5, 7, 64] {
            let mut conn = fed(wire.clone(), step).await;
            let body = read_body(&mut conn, Framing::Chunked(Chunk::Size))
                .await
                .unwrap();
            assert_eq!(body, b"hello, and a longer second chunk", "step {step}");
            // Whatever follows the body stays for the next answer.
            while conn.rbuf.len() < 4 {
                std::future::poll_fn(|cx| conn.poll_fill(cx)).await.unwrap();
            }
            assert_eq!(&conn.rbuf[..], b"NEXT", "step {step}");
        }
        // Bare LF line ends are accepted.
        let mut conn = fed(b"3\nabc\n0\n\n".to_vec(), 64).await;
        assert_eq!(
            read_body(&mut conn, Framing::Chunked(Chunk::Size))
                .await
                .unwrap(),
            b"abc"
        );
    }

    #[tokio::test]
    async fn broken_bodies_are_errors() {
        for (wire, says) in [
            (&b"zz\r\n"[..], "bad chunk size"),
            (&b"3\r\nabcdef\r\n"[..], "longer than its size"),
            (&b"11111111111111111\r\n"[..], "bad chunk size"),
        ] {
            let mut conn = fed(wire.to_vec(), 64).await;
            let e = read_body(&mut conn, Framing::Chunked(Chunk::Size))
                .await
                .err()
                .unwrap();
            assert!(e.to_string().contains(says), "{wire:?}: {e}");
        }
    }

    #[tokio::test]
    async fn a_length_body_cut_short_is_an_error_and_until_close_ends_at_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..2 {
                let (mut s, _) = listener.accept().await.unwrap();
                s.write_all(b"0123456789").await.unwrap();
            }
        });
        let mut conn = Conn::new(Io::Plain(TcpStream::connect(addr).await.unwrap()));
        let e = read_body(&mut conn, Framing::Length(20))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("10 bytes before the end"), "{e}");
        let mut conn = Conn::new(Io::Plain(TcpStream::connect(addr).await.unwrap()));
        assert_eq!(
            read_body(&mut conn, Framing::UntilClose).await.unwrap(),
            b"0123456789"
        );
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
        let fields = Outbound::new(headers, &[], &[], &peer);
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
        let fields = Outbound::new(HeaderMap::new(), &[], &[], &peer);
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
