//! HTTP/2 frames a hostile client sends to exhaust the consumer listener, written by
//! hand (no client library would send them): rapid reset, CONTINUATION floods, HPACK
//! bombs, streams the server is made to reset, control-frame floods. Each must end the
//! connection (or the stream) early, with little work done and nothing forwarded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix, the prefix's other bits set to `high`.
fn int(out: &mut Vec<u8>, n: u32, high: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(high | v as u8);
        return;
    }
    out.push(high | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal field, not indexed (or added to the dynamic table when `index`).
fn literal(out: &mut Vec<u8>, name: &str, value: &[u8], index: bool) {
    if index {
        out.push(0x40);
    } else {
        out.push(0x00);
    }
    int(out, 7, 0, name.len());
    out.extend_from_slice(name.as_bytes());
    int(out, 7, 0, value.len());
    out.extend_from_slice(value);
}

/// The head of `GET path`.
fn get_block(path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, ":method", b"GET", false);
    literal(&mut b, ":scheme", b"https", false);
    literal(&mut b, ":authority", b"localhost", false);
    literal(&mut b, ":path", path.as_bytes(), false);
    b
}

struct Setup {
    gw: Gateway,
    pki: Pki,
}

async fn start(up: SocketAddr, listener: &str) -> Setup {
    let pki = Pki::new();
    let listener = format!("drain_timeout = \"1s\"\n{listener}");
    let config = write_config_with(&pki, up, 0, 0, &listener, "", "");
    let gw = Gateway::start(&config).await;
    Setup { gw, pki }
}

/// A TLS connection that spoke h2's preface and empty SETTINGS.
async fn open(s: &Setup, certificate: bool) -> Tls {
    let who = certificate.then_some(&s.pki.consumer);
    let mut tls = tls_connect(&s.pki, who, s.gw.port, b"h2").await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    tls.write_all(&hello).await.unwrap();
    tls
}

/// What the server sent until it closed the connection or `within` passed: the frames'
/// types, and the GOAWAY error code if one came.
async fn read_until_closed(tls: &mut Tls, within: Duration) -> (bool, Option<u32>, usize) {
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    let (mut goaway, mut headers) = (None, 0);
    for (kind, _, p) in frames(&buf) {
        if kind == GOAWAY && p.len() >= 8 {
            goaway = Some(u32::from_be_bytes(p[4..8].try_into().unwrap()));
        }
        if kind == HEADERS {
            headers += 1;
        }
    }
    (closed, goaway, headers)
}

/// The whole frames at the start of `buf`: type, stream and payload of each.
fn frames(buf: &[u8]) -> impl Iterator<Item = (u8, u32, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let head = buf.get(at..at + 9)?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let payload = buf.get(at + 9..at + 9 + len)?;
        let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
        at += 9 + len;
        Some((head[3], stream, payload))
    })
}

/// Writes `bytes`, ignoring a connection the server already closed.
async fn write(tls: &mut Tls, bytes: &[u8]) -> bool {
    tokio::time::timeout(Duration::from_secs(5), tls.write_all(bytes))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Calls the gateway recorded (once its trail is flushed).
async fn calls(pki: &Pki) -> usize {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    audit_records(pki)
        .iter()
        .filter(|r| r["operation"] == "GET /person/getPerson/v3/x")
        .count()
}

#[tokio::test]
async fn rapid_reset_ends_the_connection() {
    let up = upstream().await;
    let s = start(up, "").await;
    let mut tls = open(&s, true).await;
    let block = get_block("/person/getPerson/v3/x");
    let mut burst = Vec::new();
    for i in 0..5_000u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    write(&mut tls, &burst).await;
    let (closed, goaway, _) = read_until_closed(&mut tls, Duration::from_secs(10)).await;
    assert!(closed, "the connection is still open");
    assert_eq!(goaway, Some(0xb), "ENHANCE_YOUR_CALM");
    let calls = calls(&s.pki).await;
    assert!(calls < 100, "{calls} of the 5 000 streams were served");
}

#[tokio::test]
async fn a_continuation_flood_ends_the_connection() {
    let up = upstream().await;
    let s = start(up, "").await;
    let mut tls = open(&s, false).await;
    let block = get_block("/person/getPerson/v3/x");
    assert!(write(&mut tls, &frame(HEADERS, 0, 1, &block)).await);
    let mut junk = Vec::new();
    for i in 0..400 {
        literal(&mut junk, &format!("x-junk-{i}"), &[b'a'; 32], false);
    }
    // 64 MiB of CONTINUATION, never ending the block: the server stops reading long
    // before (what was sent beyond is what the socket buffers took).
    let mut sent = 0usize;
    while sent < 64 << 20 {
        if !write(&mut tls, &frame(CONTINUATION, 0, 1, &junk[..16_000])).await {
            break;
        }
        sent += 16_000;
    }
    assert!(
        sent < 64 << 20,
        "the gateway read 64 MiB of one header block"
    );
    let (closed, goaway, _) = read_until_closed(&mut tls, Duration::from_secs(5)).await;
    assert!(closed, "the connection is still open after {sent} bytes");
    assert_eq!(goaway, Some(0xb), "ENHANCE_YOUR_CALM");
}

#[tokio::test]
async fn an_hpack_bomb_is_refused_without_decoding_it_into_memory() {
    let up = upstream().await;
    let s = start(up, "").await;
    let mut tls = open(&s, true).await;
    let mut block = get_block("/person/getPerson/v3/x");
    literal(&mut block, "x-bomb", &[b'b'; 4000], true);
    // 16 000 references to it: 64 MB once decoded.
    block.extend(std::iter::repeat_n(0x80 | 62, 16_000));
    let mut burst = frame(HEADERS, END_STREAM, 1, &block[..16_000]);
    let mut rest = &block[16_000..];
    while !rest.is_empty() {
        let n = rest.len().min(16_000);
        let flags = if n == rest.len() { END_HEADERS } else { 0 };
        burst.extend(frame(CONTINUATION, flags, 1, &rest[..n]));
        rest = &rest[n..];
    }
    write(&mut tls, &burst).await;
    let (closed, goaway, _) = read_until_closed(&mut tls, Duration::from_secs(3)).await;
    assert!(closed, "the connection is still open");
    assert!(goaway.is_some(), "no GOAWAY");
    assert_eq!(calls(&s.pki).await, 0);
}

#[tokio::test]
async fn streams_the_server_is_made_to_reset_end_the_connection() {
    let up = upstream().await;
    let s = start(up, "").await;
    let mut tls = open(&s, true).await;
    let block = get_block("/person/getPerson/v3/x");
    let mut burst = Vec::new();
    // MadeYouReset (CVE-2025-8671): a connection-specific field (`connection`) makes
    // the stream malformed, a stream error the server answers with RST_STREAM; each such
    // stream costs the server its work and no longer counts against
    // max_concurrent_streams. h2 ends the connection after 1 024 of them.
    let mut bad = block.clone();
    literal(&mut bad, "connection", b"close", false);
    for i in 0..5_000u32 {
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &bad));
    }
    write(&mut tls, &burst).await;
    let (closed, goaway, _) = read_until_closed(&mut tls, Duration::from_secs(10)).await;
    assert_eq!(goaway, Some(0xb), "ENHANCE_YOUR_CALM");
    assert!(closed, "the connection is still open");
    let calls = calls(&s.pki).await;
    assert!(calls < 2_000, "{calls} of the 5 000 streams were served");
}

#[tokio::test]
async fn a_control_frame_flood_from_a_client_that_never_reads_is_bounded() {
    let up = upstream().await;
    let s = start(up, "").await;
    let mut tls = open(&s, false).await;
    let mut burst = Vec::new();
    for i in 0..10_000u64 {
        burst.extend(frame(PING, 0, 0, &i.to_be_bytes()));
        burst.extend(frame(SETTINGS, 0, 0, &[]));
        burst.extend(frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()));
    }
    let started = std::time::Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(6) {
        match tokio::time::timeout(Duration::from_secs(2), tls.write_all(&burst)).await {
            Ok(Ok(())) => rounds += 1,
            Ok(Err(_)) | Err(_) => break,
        }
    }
    // The server stops reading once its answers (pongs, SETTINGS acks) are not taken:
    // the socket buffers fill, and the writes block.
    assert!(
        rounds < 100,
        "{rounds} rounds of {} bytes read",
        burst.len()
    );
}

/// Found by a review: a consumer that opens its HTTP/2 windows wide, asks for large
/// answers on many streams and then reads nothing made the gateway buffer each stream's
/// answer up to hyper's default send buffer (400 KiB a stream, 100 MiB on a connection's
/// 256 streams) for `response_send_timeout`. The send buffer is now bounded lower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_client_does_not_read_are_buffered_within_a_small_bound_per_stream() {
    let up = upstream().await;
    let pki = Pki::new();
    let (port, admin) = (free_port(), free_port());
    let config = write_config_with(&pki, up, port, admin, "drain_timeout = \"1s\"", "", "");
    let gw = Gateway::spawn(&config, port, admin).await;
    let s = Setup { gw, pki };
    let mut tls = open(&s, true).await;
    // Windows opened as wide as they go, then 100 streams each asking for 4 MiB.
    let mut burst = frame(SETTINGS, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]);
    burst.extend(frame(
        WINDOW_UPDATE,
        0,
        0,
        &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
    ));
    let block = get_block("/person/getPerson/v3/big?bytes=4194304");
    for i in 0..100u32 {
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &block));
    }
    let (_, before) = s.gw.memory_kib();
    assert!(write(&mut tls, &burst).await);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, after) = s.gw.memory_kib();
    let grown = after.saturating_sub(before) / 1024;
    eprintln!("100 unread streams: {grown} MiB more resident ({before} KiB before)");
    // About 56 MiB before, 22 MiB with the 64 KiB send buffer.
    assert!(grown < 36, "{grown} MiB held for 100 unread answers");
    drop(tls);
}

/// Streams reset by their client while their calls wait for the provider give the
/// provider's slots back at once (the call's future is dropped with its slot).
#[tokio::test]
async fn streams_reset_while_their_calls_wait_give_the_providers_slots_back() {
    let up = upstream().await;
    let pki = Pki::new();
    let config = write_config_with(
        &pki,
        up,
        0,
        0,
        "drain_timeout = \"1s\"",
        "max_connections = 4\nmax_connections_per_consumer = 4\nqueue_timeout = \"200ms\"",
        "",
    );
    let gw = Gateway::start(&config).await;
    let s = Setup { gw, pki };
    let mut tls = open(&s, true).await;
    let block = get_block("/person/getPerson/v3/slow");
    let mut burst = Vec::new();
    for i in 0..4u32 {
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &block));
    }
    assert!(write(&mut tls, &burst).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    let url = s.gw.url("/person/getPerson/v3/x");
    let (status, ..) = send(&c, get(&url)).await.unwrap();
    assert_eq!(status, 503, "the four slow calls hold the four slots");
    let mut resets = Vec::new();
    for i in 0..4u32 {
        resets.extend(frame(RST_STREAM, 0, 2 * i + 1, &8u32.to_be_bytes()));
    }
    assert!(write(&mut tls, &resets).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, ..) = send(&c, get(&url)).await.unwrap();
    assert_eq!(
        status, 200,
        "the reset streams still hold the provider's slots"
    );
}

/// The first byte of the header block the server answers stream `id` with (HPACK's
/// indexed `:status`: 0x88 is 200, 0x8c 400), reading frames for at most 5 s.
async fn status_byte(tls: &mut Tls, id: u32) -> Option<u8> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((_, _, block)) = frames(&buf)
            .find(|&(kind, stream, block)| kind == HEADERS && stream == id && !block.is_empty())
        {
            return Some(block[0]);
        }
        match tokio::time::timeout_at(deadline, tls.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Found by an attacker's review, as a compatibility issue: some HTTP/2 clients send a
/// GET's HEADERS without END_STREAM and end the stream with an empty DATA frame. That
/// is a GET without content, served; a DATA frame with a byte in it is content (400).
#[tokio::test]
async fn a_get_whose_stream_ends_with_an_empty_data_frame_is_served() {
    const DATA: u8 = 0x0;
    let up = upstream().await;
    let s = start(up, "").await;
    for (data, want) in [(&b""[..], 0x88u8), (&b"x"[..], 0x8c)] {
        let mut tls = open(&s, true).await;
        let mut out = frame(
            HEADERS,
            END_HEADERS,
            1,
            &get_block("/person/getPerson/v3/x"),
        );
        out.extend(frame(DATA, END_STREAM, 1, data));
        assert!(write(&mut tls, &out).await);
        assert_eq!(
            status_byte(&mut tls, 1).await,
            Some(want),
            "DATA of {} bytes",
            data.len()
        );
    }
    // Two empty DATA frames, the second ending the stream: the same.
    let mut tls = open(&s, true).await;
    let mut out = frame(
        HEADERS,
        END_HEADERS,
        1,
        &get_block("/person/getPerson/v3/x"),
    );
    out.extend(frame(DATA, 0, 1, b""));
    out.extend(frame(DATA, END_STREAM, 1, b""));
    assert!(write(&mut tls, &out).await);
    assert_eq!(status_byte(&mut tls, 1).await, Some(0x88));
}
