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
use http::uri::PathAndQuery;
use http::{HeaderValue, Method};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::io::poll_read_buf;

use super::chunked::{self, Chunk, Framing};
use super::codec::{self, Answer, ExchangeError, MAX_HEAD, Out, Parsed};
use crate::headers::Outbound;
use crate::transport::body::{BodyError, RequestBody};

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

/// A failed exchange, with the request body given back when it may be sent again.
#[derive(Debug)]
pub struct Failed {
    pub error: ExchangeError,
    /// Untouched, and returned only when nothing of an answer was received: the caller
    /// may send the request again on another connection.
    pub body: Option<RequestBody>,
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
    codec::encode_head(&mut conn.wbuf, method, path, host, fields, out);
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
                match codec::parse_head(&mut self.conn.rbuf, self.head_only) {
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
                        if let Err(e) = chunked::advance(&mut conn.rbuf, framing) {
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                match chunked::advance(&mut conn.rbuf, framing) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::AsyncWriteExt;
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
}
