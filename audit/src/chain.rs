//! The hash chain of contract section 6: `hash` = SHA-256 over the record's canonical
//! form and `prev_hash`, one chain per node, so that one altered, removed, inserted or
//! reordered record breaks verification.
//!
//! - The **canonical form** of a record is its JSON object exactly as
//!   [`Record::write_json`] writes it (the contract's field order, the same bytes as
//!   `serde_json`), without the `prev_hash` and `hash` members: the bytes from `{` up to
//!   the `,"prev_hash":` member, then `}`.
//! - `hash` is the lower-case hex SHA-256 of the canonical form followed by the
//!   `prev_hash` text (nothing for a node's first record, whose `prev_hash` is null).
//! - [`Chain`] seals records in the order they are written; [`Verifier`] walks them in
//!   the same order and names the first one that does not fit.

use std::collections::HashMap;

use aws_lc_rs::digest;

use crate::Record;

/// Where `prev_hash` starts in a record's JSON line (the canonical form ends there).
const PREV_HASH_MEMBER: &[u8] = b",\"prev_hash\":";

impl Record {
    /// Appends the record's canonical form (see the module documentation).
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        let start = out.len();
        self.write_json(out);
        // `write_json` always writes the member, the second to last.
        if let Some(end) = canonical_end(&out[start..]) {
            out.truncate(start + end);
            out.push(b'}');
        }
    }
}

/// The length of the canonical part of a JSON line as `write_json` writes it: up to the
/// `prev_hash` member, which is always the second to last.
fn canonical_end(line: &[u8]) -> Option<usize> {
    memchr::memmem::rfind(line, PREV_HASH_MEMBER)
}

/// `hash` for a record whose canonical form is `canonical`, after `prev`.
pub fn hash(canonical: &[u8], prev: Option<&str>) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(canonical);
    if let Some(p) = prev {
        ctx.update(p.as_bytes());
    }
    hex(ctx.finish().as_ref())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// One node's chain, as its records are written.
#[derive(Debug, Default, Clone)]
pub struct Chain {
    last: Option<String>,
}

impl Chain {
    /// A chain that continues after a record whose hash is `last` (`None`: a new chain).
    pub fn after(last: Option<String>) -> Self {
        Self { last }
    }

    /// The hash of the last record sealed.
    pub fn last(&self) -> Option<&str> {
        self.last.as_deref()
    }

    /// Seals one JSON line as [`Record::write_json`] wrote it (with or without a line
    /// break; `prev_hash` and `hash` as written are replaced): appends the sealed line,
    /// with a line break, to `out`. A line that is not such a record is appended as it
    /// is and `false` returned.
    pub fn seal_line(&mut self, line: &[u8], out: &mut Vec<u8>) -> bool {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let Some(end) = canonical_end(line) else {
            out.extend_from_slice(line);
            out.push(b'\n');
            return false;
        };
        let start = out.len();
        out.extend_from_slice(&line[..end]);
        out.push(b'}');
        let h = hash(&out[start..], self.last.as_deref());
        out.pop();
        out.extend_from_slice(PREV_HASH_MEMBER);
        match &self.last {
            Some(p) => {
                out.push(b'"');
                out.extend_from_slice(p.as_bytes());
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"hash\":\"");
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\"}\n");
        self.last = Some(h);
        true
    }

    /// Seals a record in place.
    pub fn seal(&mut self, record: &mut Record) {
        let mut canonical = Vec::with_capacity(768);
        record.write_canonical(&mut canonical);
        let h = hash(&canonical, self.last.as_deref());
        record.prev_hash = self.last.take();
        record.hash = Some(h.clone());
        self.last = Some(h);
    }
}

/// Why a record does not fit its chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    #[error("record {message_id} at {at} was altered: its hash does not match its content")]
    Altered { at: String, message_id: String },
    #[error(
        "record {message_id} at {at} does not follow the record before it on node {node} (a record was removed, inserted or moved before it)"
    )]
    Unlinked {
        at: String,
        message_id: String,
        node: String,
    },
    #[error("record {message_id} at {at} carries no hash")]
    Unsealed { at: String, message_id: String },
}

/// Walks records in the order they were written and checks every node's chain.
#[derive(Debug, Default)]
pub struct Verifier {
    last: HashMap<String, String>,
    checked: u64,
    canonical: Vec<u8>,
}

impl Verifier {
    /// Checks the next record; `at` says where it is (a file and line), for the report.
    pub fn check(&mut self, at: &str, record: &Record) -> Result<(), Break> {
        let Some(h) = record.hash.as_deref() else {
            return Err(Break::Unsealed {
                at: at.to_owned(),
                message_id: record.message_id.clone(),
            });
        };
        self.canonical.clear();
        record.write_canonical(&mut self.canonical);
        if hash(&self.canonical, record.prev_hash.as_deref()) != h {
            return Err(Break::Altered {
                at: at.to_owned(),
                message_id: record.message_id.clone(),
            });
        }
        if self.last.get(&record.node).map(String::as_str) != record.prev_hash.as_deref() {
            return Err(Break::Unlinked {
                at: at.to_owned(),
                message_id: record.message_id.clone(),
                node: record.node.clone(),
            });
        }
        self.last.insert(record.node.clone(), h.to_owned());
        self.checked += 1;
        Ok(())
    }

    /// Starts `node`'s chain after a record whose hash is `hash` (its earlier records were
    /// retired).
    pub fn continue_after(&mut self, node: &str, hash: String) {
        self.last.insert(node.to_owned(), hash);
    }

    /// How many records fitted their chain.
    pub fn checked(&self) -> u64 {
        self.checked
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(i: u32, node: &str) -> Record {
        Record {
            message_id: format!("0190-{i:04}"),
            timestamp: "2026-12-02T10:00:00.000Z".into(),
            source_ip: "192.0.2.1".into(),
            operation: "GET /person/getPerson/v3/p".into(),
            decision: "allowed".into(),
            status: 200,
            duration_ms: 1.25,
            node: node.into(),
            end_user: Some("agent \"7\"\n".into()),
            ..Default::default()
        }
    }

    fn sealed(n: u32) -> Vec<Record> {
        let mut chain = Chain::default();
        (0..n)
            .map(|i| {
                let mut r = record(i, "n1");
                chain.seal(&mut r);
                r
            })
            .collect()
    }

    fn verify(records: &[Record]) -> Result<u64, Break> {
        let mut v = Verifier::default();
        for (i, r) in records.iter().enumerate() {
            v.check(&format!("line {}", i + 1), r)?;
        }
        Ok(v.checked())
    }

    #[test]
    fn the_canonical_form_is_the_json_without_the_chain_members() {
        let mut r = record(1, "n1");
        r.prev_hash = Some("aa".into());
        r.hash = Some("bb".into());
        let mut c = Vec::new();
        r.write_canonical(&mut c);
        let c = String::from_utf8(c).unwrap();
        assert!(c.ends_with(",\"detail\":null}"), "{c}");
        assert!(!c.contains("prev_hash") && !c.contains("\"hash\""));
        // Still a JSON object of the same record.
        let back: serde_json::Value = serde_json::from_str(&c).unwrap();
        assert_eq!(back["end_user"], "agent \"7\"\n");
    }

    #[test]
    fn sealing_a_line_and_sealing_a_record_agree() {
        let mut by_record = Chain::default();
        let mut by_line = Chain::default();
        let mut out = Vec::new();
        for i in 0..3 {
            let mut r = record(i, "n1");
            let mut line = Vec::new();
            r.write_json(&mut line);
            line.push(b'\n');
            assert!(by_line.seal_line(&line, &mut out));
            by_record.seal(&mut r);
            let mut expected = Vec::new();
            r.write_json(&mut expected);
            expected.push(b'\n');
            assert!(out.ends_with(&expected));
        }
        assert_eq!(by_line.last(), by_record.last());
        // And what was written verifies.
        let records: Vec<Record> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(verify(&records), Ok(3));
    }

    #[test]
    fn an_altered_removed_inserted_or_swapped_record_breaks_the_chain() {
        let good = sealed(5);
        assert_eq!(verify(&good), Ok(5));

        let mut altered = good.clone();
        altered[2].purpose = Some("another purpose".into());
        assert!(
            matches!(verify(&altered), Err(Break::Altered { ref message_id, .. }) if message_id == "0190-0002")
        );

        let mut removed = good.clone();
        removed.remove(2);
        assert!(
            matches!(verify(&removed), Err(Break::Unlinked { ref message_id, .. }) if message_id == "0190-0003")
        );

        let mut swapped = good.clone();
        swapped.swap(1, 3);
        assert!(
            matches!(verify(&swapped), Err(Break::Unlinked { ref message_id, .. }) if message_id == "0190-0003")
        );

        let mut inserted = good.clone();
        let mut forged = record(9, "n1");
        forged.prev_hash = good[1].hash.clone();
        forged.hash = Some(hash(b"{}", forged.prev_hash.as_deref()));
        inserted.insert(2, forged);
        assert!(
            matches!(verify(&inserted), Err(Break::Altered { ref message_id, .. }) if message_id == "0190-0009")
        );

        let mut unsealed = good;
        unsealed[4].hash = None;
        assert!(matches!(verify(&unsealed), Err(Break::Unsealed { .. })));
    }

    #[test]
    fn the_certificate_beside_a_token_is_sealed_and_records_without_it_are_as_before() {
        // Without it, the canonical form (and so the hash) of a record is what it was
        // before the field existed: trails written then still verify.
        let mut c = Vec::new();
        record(1, "n1").write_canonical(&mut c);
        assert_eq!(
            String::from_utf8(c).unwrap(),
            "{\"message_id\":\"0190-0001\",\"timestamp\":\"2026-12-02T10:00:00.000Z\",\
             \"consumer\":null,\"credential\":null,\"credential_id\":null,\
             \"source_ip\":\"192.0.2.1\",\"service\":null,\"version\":null,\
             \"operation\":\"GET /person/getPerson/v3/p\",\"purpose\":null,\
             \"authorisation\":null,\"legal_basis\":null,\"end_user\":\"agent \\\"7\\\"\\n\",\
             \"consumer_ref\":null,\"decision\":\"allowed\",\"status\":200,\
             \"duration_ms\":1.25,\"request_bytes\":0,\"response_bytes\":0,\
             \"trace_id\":null,\"node\":\"n1\",\"fault\":null,\"detail\":null}"
        );
        // With it, it is part of what the hash covers.
        let mut chain = Chain::default();
        let mut lines = Vec::new();
        for i in 0..3 {
            let mut r = record(i, "n1");
            if i == 1 {
                r.credential = Some("oauth".into());
                r.credential_id = Some("ville-bxl-app".into());
                r.certificate_sha256 = Some("ab".repeat(32));
            }
            let mut line = Vec::new();
            r.write_json(&mut line);
            chain.seal_line(&line, &mut lines);
        }
        let good: Vec<Record> = lines
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(good[1].certificate_sha256, Some("ab".repeat(32)));
        assert_eq!(verify(&good), Ok(3));
        for changed in [None, Some("cd".repeat(32))] {
            let mut altered = good.clone();
            altered[1].certificate_sha256 = changed;
            assert!(
                matches!(verify(&altered), Err(Break::Altered { ref message_id, .. }) if message_id == "0190-0001")
            );
        }
    }

    #[test]
    fn each_node_has_its_own_chain() {
        let (mut a, mut b) = (Chain::default(), Chain::default());
        let mut records = Vec::new();
        for i in 0..4 {
            let (node, chain) = if i % 2 == 0 {
                ("n1", &mut a)
            } else {
                ("n2", &mut b)
            };
            let mut r = record(i, node);
            chain.seal(&mut r);
            records.push(r);
        }
        assert_eq!(verify(&records), Ok(4));
        assert_eq!(records[0].prev_hash, None);
        assert_eq!(records[1].prev_hash, None);
        assert_eq!(records[2].prev_hash, records[0].hash);
    }
}
