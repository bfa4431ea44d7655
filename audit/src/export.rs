//! Records out of the trail, in the exchange format of contract section 6: JSON lines
//! (each record exactly as stored, hashes included) or CSV with a header row.

use std::io::Write;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Record;

/// Which records an export takes. Every given condition must hold.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Received at or after this instant.
    pub from: Option<OffsetDateTime>,
    /// Received before this instant.
    pub to: Option<OffsetDateTime>,
    pub consumer: Option<String>,
    pub message_id: Option<String>,
    pub end_user: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &Record) -> bool {
        let same = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        if !same(&self.message_id, Some(&r.message_id))
            || !same(&self.consumer, r.consumer.as_deref())
            || !same(&self.end_user, r.end_user.as_deref())
        {
            return false;
        }
        if self.from.is_none() && self.to.is_none() {
            return true;
        }
        // A record whose timestamp does not parse is outside every window.
        let Ok(at) = OffsetDateTime::parse(&r.timestamp, &Rfc3339) else {
            return false;
        };
        self.from.is_none_or(|f| at >= f) && self.to.is_none_or(|t| at < t)
    }
}

/// Parses `--from` / `--to`: an RFC 3339 instant, or a day (`YYYY-MM-DD`, its start in
/// UTC).
pub fn parse_instant(text: &str) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    let day = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(text, day)
        .map(|d| d.midnight().assume_utc())
        .map_err(|_| {
            format!(
                "{text:?} is neither an RFC 3339 time (2026-12-01T08:00:00Z) nor a day (2026-12-01)"
            )
        })
}

/// The export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

/// The CSV columns, in the contract's field order (with the `fault`, `detail`, `phase`
/// and `certificate_sha256` extensions before the chain).
pub const CSV_COLUMNS: [&str; 27] = [
    "message_id",
    "timestamp",
    "consumer",
    "credential",
    "credential_id",
    "source_ip",
    "service",
    "version",
    "operation",
    "purpose",
    "authorisation",
    "legal_basis",
    "end_user",
    "consumer_ref",
    "decision",
    "status",
    "duration_ms",
    "request_bytes",
    "response_bytes",
    "trace_id",
    "node",
    "fault",
    "detail",
    "phase",
    "certificate_sha256",
    "prev_hash",
    "hash",
];

/// Writes records in one format; CSV starts with its header row.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    format: Format,
    line: Vec<u8>,
    started: bool,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W, format: Format) -> Self {
        Self {
            out,
            format,
            line: Vec::with_capacity(1024),
            started: false,
        }
    }

    pub fn write(&mut self, r: &Record) -> std::io::Result<()> {
        self.line.clear();
        match self.format {
            Format::Jsonl => r.write_json(&mut self.line),
            Format::Csv => {
                if !self.started {
                    self.header()?;
                }
                self.csv_row(r);
            }
        }
        self.started = true;
        self.line.push(b'\n');
        self.out.write_all(&self.line)
    }

    /// Ends the export (a CSV export of no record is its header row alone).
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.format == Format::Csv && !self.started {
            self.header()?;
        }
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self) -> std::io::Result<()> {
        self.out.write_all(CSV_COLUMNS.join(",").as_bytes())?;
        self.out.write_all(b"\n")
    }

    fn csv_row(&mut self, r: &Record) {
        let status = r.status.to_string();
        let duration = r.duration_ms.to_string();
        let request_bytes = r.request_bytes.to_string();
        let response_bytes = r.response_bytes.to_string();
        let fields: [Option<&str>; 27] = [
            Some(&r.message_id),
            Some(&r.timestamp),
            r.consumer.as_deref(),
            r.credential.as_deref(),
            r.credential_id.as_deref(),
            Some(&r.source_ip),
            r.service.as_deref(),
            r.version.as_deref(),
            Some(&r.operation),
            r.purpose.as_deref(),
            r.authorisation.as_deref(),
            r.legal_basis.as_deref(),
            r.end_user.as_deref(),
            r.consumer_ref.as_deref(),
            Some(&r.decision),
            Some(&status),
            Some(&duration),
            Some(&request_bytes),
            Some(&response_bytes),
            r.trace_id.as_deref(),
            Some(&r.node),
            r.fault.as_deref(),
            r.detail.as_deref(),
            r.phase.map(crate::Phase::as_str),
            r.certificate_sha256.as_deref(),
            r.prev_hash.as_deref(),
            r.hash.as_deref(),
        ];
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                self.line.push(b',');
            }
            if let Some(f) = f {
                csv_field(&mut self.line, f);
            }
        }
    }
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break, its
/// quotes doubled. A text a spreadsheet would run as a formula (starting with `=`, `+`,
/// `-`, `@`, a tab or a carriage return: consumers choose paths and end-user references)
/// is prefixed with `'`; the JSON-lines export carries every value unchanged.
pub(crate) fn csv_field(out: &mut Vec<u8>, f: &str) {
    let formula = f.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let quote = formula || f.contains([',', '"', '\n', '\r']);
    if quote {
        out.push(b'"');
    }
    if formula {
        out.push(b'\'');
    }
    for b in f.bytes() {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    if quote {
        out.push(b'"');
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(id: &str, ts: &str, consumer: &str) -> Record {
        Record {
            message_id: id.into(),
            timestamp: ts.into(),
            consumer: Some(consumer.into()),
            source_ip: "192.0.2.1".into(),
            operation: "GET /a,b".into(),
            decision: "allowed".into(),
            status: 200,
            duration_ms: 1.5,
            node: "n1".into(),
            end_user: Some("=HYPERLINK(\"x\")".into()),
            ..Default::default()
        }
    }

    #[test]
    fn filters_take_what_every_condition_allows() {
        let r = record("m1", "2026-12-01T10:00:00.000Z", "ville-bxl");
        let at = |t: &str| Some(parse_instant(t).unwrap());
        assert!(Filter::default().matches(&r));
        let f = Filter {
            from: at("2026-12-01"),
            to: at("2026-12-01T10:00:00.001Z"),
            consumer: Some("ville-bxl".into()),
            ..Default::default()
        };
        assert!(f.matches(&r));
        assert!(
            !Filter {
                to: at("2026-12-01T10:00:00Z"),
                ..Default::default()
            }
            .matches(&r),
            "to is exclusive"
        );
        assert!(
            !Filter {
                consumer: Some("other".into()),
                ..Default::default()
            }
            .matches(&r)
        );
        assert!(
            !Filter {
                message_id: Some("m2".into()),
                ..Default::default()
            }
            .matches(&r)
        );
        assert!(parse_instant("yesterday").is_err());
    }

    #[test]
    fn csv_has_a_header_row_quotes_what_it_must_and_defuses_formulas() {
        let mut w = Writer::new(Vec::new(), Format::Csv);
        w.write(&record("m1", "2026-12-01T10:00:00.000Z", "ville-bxl"))
            .unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap(), CSV_COLUMNS.join(","));
        let row = lines.next().unwrap();
        assert!(
            row.starts_with("m1,2026-12-01T10:00:00.000Z,ville-bxl,,,192.0.2.1,,,\"GET /a,b\","),
            "{row}"
        );
        assert!(row.contains(",\"'=HYPERLINK(\"\"x\"\")\","), "{row}");
        assert!(row.contains(",allowed,200,1.5,0,0,,n1,"), "{row}");
        assert!(row.ends_with(",n1,,,,,,"), "{row}");
        // The certificate beside a token has its column, after the phase.
        let mut w = Writer::new(Vec::new(), Format::Csv);
        w.write(&Record {
            phase: Some(crate::Phase::Outcome),
            certificate_sha256: Some("ab".repeat(32)),
            ..record("m2", "2026-12-01T10:00:00.000Z", "ville-bxl")
        })
        .unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        let mut lines = text.lines();
        assert!(
            lines
                .next()
                .unwrap()
                .ends_with(",fault,detail,phase,certificate_sha256,prev_hash,hash")
        );
        let row = lines.next().unwrap();
        assert!(
            row.ends_with(&format!(",n1,,,outcome,{},,", "ab".repeat(32))),
            "{row}"
        );
        // An empty export is its header row.
        let empty = Writer::new(Vec::new(), Format::Csv).finish().unwrap();
        assert_eq!(empty.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn jsonl_is_the_record_as_stored() {
        for certificate_sha256 in [None, Some("ab".repeat(32))] {
            let r = Record {
                certificate_sha256,
                ..record("m1", "2026-12-01T10:00:00.000Z", "ville-bxl")
            };
            let mut w = Writer::new(Vec::new(), Format::Jsonl);
            w.write(&r).unwrap();
            let out = w.finish().unwrap();
            let line = out.strip_suffix(b"\n").unwrap();
            let back: Record = serde_json::from_slice(line).unwrap();
            assert_eq!(back, r);
            let mut stored = Vec::new();
            r.write_json(&mut stored);
            assert_eq!(line, stored);
        }
    }
}
