//! The record as one JSON line, written by hand.
//!
//! Every call writes one, so this is on the hot path: field names are literals, strings
//! that need no escaping (nearly all) are copied as they are, and anything else goes
//! through `serde_json`. The output is byte for byte what `serde_json::to_writer` makes
//! of a [`Record`] (a test holds it to that), so readers need not care which wrote it.

use crate::Record;

impl Record {
    /// Appends the record as one JSON object, without a line break, in the contract's
    /// field order.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.reserve(768);
        out.extend_from_slice(b"{\"message_id\":");
        string(out, &self.message_id);
        out.extend_from_slice(b",\"timestamp\":");
        string(out, &self.timestamp);
        out.extend_from_slice(b",\"consumer\":");
        optional(out, self.consumer.as_deref());
        out.extend_from_slice(b",\"credential\":");
        optional(out, self.credential.as_deref());
        out.extend_from_slice(b",\"credential_id\":");
        optional(out, self.credential_id.as_deref());
        out.extend_from_slice(b",\"source_ip\":");
        string(out, &self.source_ip);
        out.extend_from_slice(b",\"service\":");
        optional(out, self.service.as_deref());
        out.extend_from_slice(b",\"version\":");
        optional(out, self.version.as_deref());
        out.extend_from_slice(b",\"operation\":");
        string(out, &self.operation);
        out.extend_from_slice(b",\"purpose\":");
        optional(out, self.purpose.as_deref());
        out.extend_from_slice(b",\"authorisation\":");
        optional(out, self.authorisation.as_deref());
        out.extend_from_slice(b",\"legal_basis\":");
        optional(out, self.legal_basis.as_deref());
        out.extend_from_slice(b",\"end_user\":");
        optional(out, self.end_user.as_deref());
        out.extend_from_slice(b",\"consumer_ref\":");
        optional(out, self.consumer_ref.as_deref());
        out.extend_from_slice(b",\"decision\":");
        string(out, &self.decision);
        out.extend_from_slice(b",\"status\":");
        integer(out, u64::from(self.status));
        out.extend_from_slice(b",\"duration_ms\":");
        // Floats are rare enough in a record to leave their formatting to serde_json.
        if serde_json::to_writer(&mut *out, &self.duration_ms).is_err() {
            out.extend_from_slice(b"null");
        }
        out.extend_from_slice(b",\"request_bytes\":");
        integer(out, self.request_bytes);
        out.extend_from_slice(b",\"response_bytes\":");
        integer(out, self.response_bytes);
        out.extend_from_slice(b",\"trace_id\":");
        optional(out, self.trace_id.as_deref());
        out.extend_from_slice(b",\"node\":");
        string(out, &self.node);
        out.extend_from_slice(b",\"fault\":");
        optional(out, self.fault.as_deref());
        out.extend_from_slice(b",\"detail\":");
        optional(out, self.detail.as_deref());
        if let Some(phase) = self.phase {
            out.extend_from_slice(b",\"phase\":");
            string(out, phase.as_str());
        }
        if let Some(sha256) = &self.certificate_sha256 {
            out.extend_from_slice(b",\"certificate_sha256\":");
            string(out, sha256);
        }
        out.extend_from_slice(b",\"prev_hash\":");
        optional(out, self.prev_hash.as_deref());
        out.extend_from_slice(b",\"hash\":");
        optional(out, self.hash.as_deref());
        out.push(b'}');
    }
}

fn optional(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    if plain(s.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, s).is_err() {
        // Writing a str into a Vec cannot fail; keep the line valid regardless.
        out.extend_from_slice(b"null");
    }
}

/// Whether `s` needs no escaping: no control character, quote or backslash. Eight
/// bytes at a time (a record is mostly such text, and this runs on every field).
fn plain(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Some byte of `w` is below `n` (exact for n <= 0x80; bytes >= 0x80 never match).
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH != 0;
    let zero = |w: u64| below(w, 1);
    let mut chunks = s.chunks_exact(8);
    for chunk in &mut chunks {
        let w = <[u8; 8]>::try_from(chunk).map_or(0, u64::from_ne_bytes);
        if below(w, 0x20)
            || zero(w ^ (ONES * u64::from(b'"')))
            || zero(w ^ (ONES * u64::from(b'\\')))
        {
            return false;
        }
    }
    chunks
        .remainder()
        .iter()
        .all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
}

fn integer(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn both(r: &Record) -> (String, String) {
        let mut mine = Vec::new();
        r.write_json(&mut mine);
        (
            String::from_utf8(mine).unwrap(),
            serde_json::to_string(r).unwrap(),
        )
    }

    #[test]
    fn the_word_at_a_time_check_agrees_with_the_byte_check() {
        let scalar = |s: &[u8]| s.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\');
        for fill in [b'a', 0x80, 0xff, 0x20, 0x7f] {
            for b in 0..=255u8 {
                for at in 0..17 {
                    let mut s = [fill; 17];
                    s[at] = b;
                    assert_eq!(plain(&s), scalar(&s), "byte {b:#x} at {at} among {fill:#x}");
                }
            }
        }
    }

    #[test]
    fn same_bytes_as_serde_for_a_full_record() {
        let r = Record {
            message_id: "0193f0c4-8e3a-7b21-9c4d-1a2b3c4d5e6f".into(),
            timestamp: "2026-11-24T10:15:30.123Z".into(),
            consumer: Some("city-ghent".into()),
            credential: Some("certificate".into()),
            credential_id: Some("ab".repeat(32)),
            source_ip: "2001:db8::1".into(),
            service: Some("person/getPerson".into()),
            version: Some("v3".into()),
            operation: "GET /person/getPerson/v3/persons/85073100145".into(),
            purpose: Some("social-housing".into()),
            authorisation: Some("AUTH-2026-017".into()),
            legal_basis: Some("deliberation; IVC/KSZG/26/042".into()),
            end_user: Some("officer 42 \"night shift\"\n\\ é ✓ \u{1}\u{7f}".into()),
            consumer_ref: Some("tab\there".into()),
            decision: "allowed".into(),
            status: 200,
            duration_ms: 12.345,
            request_bytes: 0,
            response_bytes: u64::MAX,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            node: "fsp-1".into(),
            fault: Some("provider".into()),
            detail: Some("cannot connect to 10.0.0.1:443: \"refused\"".into()),
            phase: None,
            certificate_sha256: None,
            prev_hash: None,
            hash: None,
        };
        let (mine, serde) = both(&r);
        assert_eq!(mine, serde);
        for phase in [crate::Phase::Request, crate::Phase::Outcome] {
            let r = Record {
                phase: Some(phase),
                ..r.clone()
            };
            let (mine, serde) = both(&r);
            assert_eq!(mine, serde);
        }
        // With the certificate beside a token, alone and with a phase, and with text
        // that needs escaping (the writer must not trust the field to be hex).
        for (phase, sha256) in [
            (None, "cd".repeat(32)),
            (Some(crate::Phase::Outcome), "cd".repeat(32)),
            (Some(crate::Phase::Request), "not \"hex\"\n".into()),
        ] {
            let r = Record {
                credential: Some("oauth".into()),
                credential_id: Some("ville-bxl-app".into()),
                phase,
                certificate_sha256: Some(sha256),
                ..r.clone()
            };
            let (mine, serde) = both(&r);
            assert_eq!(mine, serde);
            let back: Record = serde_json::from_str(&mine).unwrap();
            assert_eq!(back.certificate_sha256, r.certificate_sha256);
        }
    }

    #[test]
    fn same_bytes_as_serde_for_awkward_values() {
        for duration_ms in [
            0.0,
            1.0,
            0.001,
            1e-7,
            123456789.125,
            f64::NAN,
            f64::INFINITY,
        ] {
            for status in [0u16, 7, 404, u16::MAX] {
                let r = Record {
                    duration_ms,
                    status,
                    request_bytes: 10,
                    response_bytes: 1_000_000_007,
                    operation: String::new(),
                    decision: "FSP-AUTHZ-NO-AUTHORISATION".into(),
                    ..Default::default()
                };
                let (mine, serde) = both(&r);
                assert_eq!(mine, serde, "duration {duration_ms}, status {status}");
            }
        }
        // Every control character, quote and backslash, one string each.
        for c in (0u8..0x20).chain([b'"', b'\\', 0x7f, b' ', b'~']) {
            for at in 0..20 {
                let mut text: Vec<char> = "0123456789abcdéfghi".chars().collect();
                text.insert(at, char::from(c));
                let r = Record {
                    node: text.into_iter().collect(),
                    ..Default::default()
                };
                let (mine, serde) = both(&r);
                assert_eq!(mine, serde, "character {c:#x} at {at}");
            }
        }
    }
}
