//! The body framing of a provider's answer (RFC 9112 §6.3, §7.1): how the rest of it is
//! delimited, and the chunked transfer coding's decoder, which walks the size lines, the
//! CRLF after each chunk's data and the trailer section as they arrive, bounded the same
//! way however the bytes were split.

use std::io;

use bytes::{Buf, BytesMut};

/// Longest chunk-size line or trailer field accepted.
const MAX_LINE: usize = 4096;

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

/// Moves a chunked decoder through the framing already buffered (size lines, the CRLF
/// after data, trailers), up to chunk data or the end. `Ok(false)` when more bytes are
/// needed to go on; `Ok(true)` when data is ready or the body is complete.
pub(super) fn advance(rbuf: &mut BytesMut, framing: &mut Framing) -> io::Result<bool> {
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

pub(super) fn trim(b: &[u8]) -> &[u8] {
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
