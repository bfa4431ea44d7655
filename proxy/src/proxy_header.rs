//! The PROXY protocol (HAProxy's, versions 1 and 2): behind a TCP load balancer, the
//! consumer's address arrives in a header before the TLS handshake.
//!
//! Only peers listed in `listener.proxy_protocol_from` may send one, and they must: a
//! balancer that forgets it would make every consumer look like the balancer. From any
//! other peer a connection that starts with a PROXY header is refused, so that nobody can
//! claim an address of their choosing. The header is read exactly (never a byte of the
//! TLS handshake after it), within the handshake timeout.
//!
//! What is accepted, strictly: v1 `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n` and
//! `PROXY UNKNOWN...\r\n` (at most 107 bytes); v2 with the PROXY command over TCP/IPv4
//! or TCP/IPv6 (TLVs are skipped), and the LOCAL command (the balancer's own health
//! check). For UNKNOWN, LOCAL and the v2 families without an address, the connection is
//! the balancer's own and keeps its real address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// The shortest header of either version (`PROXY UNKNOWN\r\n`).
const MIN_HEADER: usize = 15;
/// The longest v2 address block and TLVs read (balancers send tens of bytes; the
/// format allows 64 KiB, which no connection is given before it is even attributed).
const V2_MAX: usize = 4096;

/// What a PROXY header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The consumer's address, as the balancer saw it.
    Client(SocketAddr),
    /// The balancer's own connection (health check): keep the real peer.
    Balancer,
}

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("no PROXY protocol header (required from this balancer address)")]
    Missing,
    #[error("malformed PROXY protocol v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY protocol v2 header: {0}")]
    V2(&'static str),
    #[error("the connection ended inside the PROXY protocol header")]
    Truncated,
}

/// Whether the first byte a peer sent may start a PROXY header (`P` or `\r`); a TLS
/// handshake starts with 0x16.
pub fn looks_like_header(first: u8) -> bool {
    first == b'P' || first == b'\r'
}

/// Reads the PROXY header at the start of `tcp`, leaving the stream at the first byte
/// after it.
pub async fn read(tcp: &mut TcpStream) -> Result<Origin, HeaderError> {
    let mut head = [0u8; V1_MAX];
    read_exact(tcp, &mut head[..MIN_HEADER]).await?;
    if head[..12] == V2_SIGNATURE[..] {
        read_exact(tcp, &mut head[MIN_HEADER..16]).await?;
        let fixed: [u8; 16] = head[..16].try_into().map_err(|_| HeaderError::Truncated)?;
        let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        if len > V2_MAX {
            return Err(HeaderError::V2(
                "longer than 4096 bytes of addresses and TLVs",
            ));
        }
        let mut rest = vec![0u8; len];
        read_exact(tcp, &mut rest).await?;
        return parse_v2(&fixed, &rest);
    }
    if !head.starts_with(b"PROXY ") {
        return Err(HeaderError::Missing);
    }
    // Up to the CRLF: what has arrived is looked at first, so that the common case is
    // one more read of exactly the right length.
    let mut len = MIN_HEADER;
    while !head[..len].ends_with(b"\r\n") {
        if len == V1_MAX {
            return Err(HeaderError::V1("longer than 107 bytes"));
        }
        let mut peeked = [0u8; V1_MAX];
        let seen = tcp
            .peek(&mut peeked[..V1_MAX - len])
            .await
            .map_err(|_| HeaderError::Truncated)?;
        if seen == 0 {
            return Err(HeaderError::Truncated);
        }
        // A CR ending what was read may be followed by its LF; else up to the first CRLF
        // of what arrived, or all of it when it holds none.
        let take = if head[len - 1] == b'\r' && peeked[0] == b'\n' {
            1
        } else {
            peeked[..seen]
                .windows(2)
                .position(|w| w == b"\r\n")
                .map_or(seen, |i| i + 2)
        };
        read_exact(tcp, &mut head[len..len + take]).await?;
        len += take;
    }
    parse_v1(&head[..len])
}

async fn read_exact(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<(), HeaderError> {
    tcp.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|_| HeaderError::Truncated)
}

/// A whole v1 header, CRLF included.
pub fn parse_v1(line: &[u8]) -> Result<Origin, HeaderError> {
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or(HeaderError::V1("does not end with CRLF"))?;
    let text = std::str::from_utf8(line).map_err(|_| HeaderError::V1("not ASCII"))?;
    let rest = text
        .strip_prefix("PROXY ")
        .ok_or(HeaderError::V1("does not start with `PROXY `"))?;
    if rest == "UNKNOWN" || rest.starts_with("UNKNOWN ") {
        return Ok(Origin::Balancer);
    }
    let fields: Vec<&str> = rest.split(' ').collect();
    let [family, src, dst, sport, dport] = fields[..] else {
        return Err(HeaderError::V1(
            "expected `TCP4|TCP6 <src> <dst> <sport> <dport>`",
        ));
    };
    let (src, dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (
            src.parse::<Ipv4Addr>()
                .map_err(|_| HeaderError::V1("source is not an IPv4 address"))?
                .into(),
            dst.parse::<Ipv4Addr>()
                .map_err(|_| HeaderError::V1("destination is not an IPv4 address"))?
                .into(),
        ),
        "TCP6" => (
            src.parse::<Ipv6Addr>()
                .map_err(|_| HeaderError::V1("source is not an IPv6 address"))?
                .into(),
            dst.parse::<Ipv6Addr>()
                .map_err(|_| HeaderError::V1("destination is not an IPv6 address"))?
                .into(),
        ),
        _ => return Err(HeaderError::V1("the protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let _ = dst;
    let port = |p: &str| {
        // Decimal, no sign, no leading zero (as the specification writes them).
        if p.is_empty() || p.len() > 5 || (p.len() > 1 && p.starts_with('0')) {
            return None;
        }
        p.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| p.parse::<u16>().ok())
            .flatten()
    };
    let sport = port(sport).ok_or(HeaderError::V1("the source port is not 0 to 65535"))?;
    port(dport).ok_or(HeaderError::V1("the destination port is not 0 to 65535"))?;
    Ok(Origin::Client(SocketAddr::new(src.to_canonical(), sport)))
}

/// A v2 header: the 16 fixed bytes and the `len` bytes after them.
pub fn parse_v2(fixed: &[u8; 16], rest: &[u8]) -> Result<Origin, HeaderError> {
    if fixed[..12] != V2_SIGNATURE[..] {
        return Err(HeaderError::V2("wrong signature"));
    }
    if fixed[12] >> 4 != 2 {
        return Err(HeaderError::V2("version is not 2"));
    }
    let local = match fixed[12] & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(HeaderError::V2("command is neither LOCAL nor PROXY")),
    };
    if usize::from(u16::from_be_bytes([fixed[14], fixed[15]])) != rest.len() {
        return Err(HeaderError::V2("length does not match"));
    }
    if local {
        return Ok(Origin::Balancer);
    }
    let (family, transport) = (fixed[13] >> 4, fixed[13] & 0x0f);
    match (family, transport) {
        // UNSPEC, or a UNIX socket: no address to use.
        (0, _) | (3, 0 | 1) => Ok(Origin::Balancer),
        (1 | 2, 1) => {
            let (ip, port_at): (IpAddr, usize) = if family == 1 {
                let b: [u8; 4] = rest
                    .get(..4)
                    .and_then(|s| s.try_into().ok())
                    .ok_or(HeaderError::V2("too short for TCP over IPv4"))?;
                (Ipv4Addr::from(b).into(), 8)
            } else {
                let b: [u8; 16] = rest
                    .get(..16)
                    .and_then(|s| s.try_into().ok())
                    .ok_or(HeaderError::V2("too short for TCP over IPv6"))?;
                (Ipv6Addr::from(b).into(), 32)
            };
            let port = rest
                .get(port_at..port_at + 4)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .ok_or(HeaderError::V2("too short for its address family"))?;
            Ok(Origin::Client(SocketAddr::new(ip.to_canonical(), port)))
        }
        (_, 2) => Err(HeaderError::V2(
            "a datagram (UDP) connection on a TCP listener",
        )),
        _ => Err(HeaderError::V2("unknown address family or transport")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> ([u8; 16], Vec<u8>) {
        let mut fixed = [0u8; 16];
        fixed[..12].copy_from_slice(V2_SIGNATURE);
        fixed[12] = 0x20 | cmd;
        fixed[13] = fam;
        fixed[14..].copy_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        (fixed, body.to_vec())
    }

    #[test]
    fn v1_headers_are_read_strictly() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n"),
            Ok(Origin::Client("203.0.113.7:51000".parse().unwrap()))
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 443\r\n"),
            Ok(Origin::Client("[2001:db8::7]:65535".parse().unwrap()))
        );
        // An IPv4 client behind a dual-stack balancer: one form of its address.
        assert_eq!(
            parse_v1(b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:10.0.0.1 5 443\r\n"),
            Ok(Origin::Client("203.0.113.7:5".parse().unwrap()))
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(Origin::Balancer));
        assert_eq!(
            parse_v1(b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n"),
            Ok(Origin::Balancer)
        );
        for bad in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\n"[..],
            b"PROXY TCP4 203.0.113.7  10.0.0.1 51000 443\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 51000 443\r\n",
            b"PROXY TCP6 203.0.113.7 2001:db8::1 51000 443\r\n",
            b"PROXY TCP4 203.0.113.007 10.0.0.1 51000 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 051000 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 +5 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 5\r\n",
            b"PROXY UDP4 203.0.113.7 10.0.0.1 5 6\r\n",
            b"PROXY tcp4 203.0.113.7 10.0.0.1 5 6\r\n",
        ] {
            assert!(parse_v1(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn v2_headers_are_read_strictly() {
        let mut ipv4 = vec![203, 0, 113, 7, 10, 0, 0, 1];
        ipv4.extend_from_slice(&51000u16.to_be_bytes());
        ipv4.extend_from_slice(&443u16.to_be_bytes());
        let (f, r) = v2(1, 0x11, &ipv4);
        assert_eq!(
            parse_v2(&f, &r),
            Ok(Origin::Client("203.0.113.7:51000".parse().unwrap()))
        );
        // TLVs after the addresses are skipped.
        let mut with_tlv = ipv4.clone();
        with_tlv.extend_from_slice(&[0x04, 0x00, 0x02, b'x', b'y']);
        let (f, r) = v2(1, 0x11, &with_tlv);
        assert!(matches!(parse_v2(&f, &r), Ok(Origin::Client(_))));
        let mut ipv6 = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        ipv6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        ipv6.extend_from_slice(&[0x01, 0xbb, 0x01, 0xbb]);
        let (f, r) = v2(1, 0x21, &ipv6);
        assert_eq!(
            parse_v2(&f, &r),
            Ok(Origin::Client("[2001:db8::7]:443".parse().unwrap()))
        );
        // LOCAL and UNSPEC: the balancer's own connection.
        let (f, r) = v2(0, 0x00, &[]);
        assert_eq!(parse_v2(&f, &r), Ok(Origin::Balancer));
        let (f, r) = v2(1, 0x00, &[]);
        assert_eq!(parse_v2(&f, &r), Ok(Origin::Balancer));
        // Refused: UDP, short addresses, bad command or version, length mismatch.
        let (f, r) = v2(1, 0x12, &ipv4);
        assert!(parse_v2(&f, &r).is_err());
        let (f, r) = v2(1, 0x21, &ipv4);
        assert!(parse_v2(&f, &r).is_err());
        let (f, r) = v2(2, 0x11, &ipv4);
        assert!(parse_v2(&f, &r).is_err());
        let (mut f, r) = v2(1, 0x11, &ipv4);
        f[12] = 0x11;
        assert!(parse_v2(&f, &r).is_err());
        let (f, r) = v2(1, 0x11, &ipv4);
        assert!(parse_v2(&f, &r[..11]).is_err());
    }

    #[test]
    fn only_p_and_cr_look_like_a_header() {
        assert!(looks_like_header(b'P'));
        assert!(looks_like_header(b'\r'));
        assert!(!looks_like_header(0x16));
    }

    proptest::proptest! {
        #[test]
        fn no_input_makes_the_parsers_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..140)) {
            let _ = parse_v1(&bytes);
            let mut fixed = [0u8; 16];
            let n = bytes.len().min(16);
            fixed[..n].copy_from_slice(&bytes[..n]);
            fixed[..12].copy_from_slice(V2_SIGNATURE);
            let _ = parse_v2(&fixed, &bytes[n..]);
        }
    }
}
