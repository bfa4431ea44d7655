//! Each call's W3C trace context: the consumer's `traceparent`, read strictly, is
//! continued; a call without a valid one starts a trace of its own. The provider always
//! receives a `traceparent` of the call's trace (whose parent is the gateway's hop) and
//! never the consumer's raw header, and the audit record's `trace_id` is that trace's.
//!
//! With `[telemetry]` the gateway's hop is an OpenTelemetry span (`crate::telemetry`)
//! whose ids are the ones sent and recorded; without it no span is made, and the ids
//! are drawn from a per-thread generator.

use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::headers::TRACEPARENT;

pub const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// The longest `tracestate` passed on (32 members of 512 bytes each are allowed by the
/// specification; 512 bytes in all is what it says may be truncated to).
const MAX_TRACESTATE: usize = 512;

/// A `traceparent` as the W3C Trace Context specification (level 1) defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

fn hex_into(src: &[u8], out: &mut [u8]) -> Option<()> {
    if src.len() != out.len() * 2 {
        return None;
    }
    for (i, pair) in src.chunks_exact(2).enumerate() {
        let d = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[i] = d(pair[0])? << 4 | d(pair[1])?;
    }
    Some(())
}

impl TraceParent {
    /// Parses one `traceparent` value; None when it is not valid (lowercase hex only,
    /// version `ff` and all-zero ids refused; a future version may carry more fields
    /// after a `-`, of which only the first four are read).
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() < 55 {
            return None;
        }
        let mut version = [0u8; 1];
        hex_into(&value[..2], &mut version)?;
        match version[0] {
            0xff => return None,
            0 if value.len() != 55 => return None,
            _ if value.len() > 55 && value[55] != b'-' => return None,
            _ => {}
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut tp = TraceParent {
            trace_id: [0; 16],
            parent_id: [0; 8],
            flags: 0,
        };
        hex_into(&value[3..35], &mut tp.trace_id)?;
        hex_into(&value[36..52], &mut tp.parent_id)?;
        let mut flags = [0u8; 1];
        hex_into(&value[53..55], &mut flags)?;
        tp.flags = flags[0];
        if tp.trace_id == [0; 16] || tp.parent_id == [0; 8] {
            return None;
        }
        Some(tp)
    }

    /// The consumer's trace context: exactly one valid `traceparent`.
    pub fn of(headers: &HeaderMap) -> Option<Self> {
        let mut all = headers.get_all(TRACEPARENT).iter();
        let one = all.next()?;
        if all.next().is_some() {
            return None;
        }
        Self::parse(one.as_bytes())
    }
}

/// The trace context of one call.
#[derive(Debug)]
pub struct CallTrace {
    pub trace_id: [u8; 16],
    /// The gateway's hop: the parent of what the provider does.
    pub span_id: [u8; 8],
    pub sampled: bool,
    /// The consumer's `tracestate`, passed on with its valid `traceparent`.
    pub tracestate: Option<HeaderValue>,
    /// The OpenTelemetry span of the call, with `[telemetry]`.
    pub span: Option<tracing::Span>,
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let mut b = [0u8; N];
        fastrand::fill(&mut b);
        if b != [0u8; N] {
            return b;
        }
    }
}

impl CallTrace {
    /// The call's trace: the consumer's continued, or a new one. With `[telemetry]`
    /// (`sampling`: its ratio) a sampled call gets a span whose ids are the ones used.
    ///
    /// The sampling decision is taken here, parent-based, before any span exists: a
    /// consumer's sampled trace is kept, an unsampled one is not, and a trace the gateway
    /// starts is kept with the ratio. A call that is not kept makes no span at all, so
    /// that telemetry costs next to nothing on the calls it does not record; the
    /// exporter's own sampler keeps every span it is given.
    pub fn begin(headers: &HeaderMap, message_id: &str, sampling: Option<f64>) -> Self {
        let parent = TraceParent::of(headers);
        let tracestate = parent.and_then(|_| {
            let mut all = headers.get_all(TRACESTATE).iter();
            let first = all.next()?;
            // One field only (a list split over several fields is dropped rather than
            // joined), printable and bounded.
            (all.next().is_none()
                && first.len() <= MAX_TRACESTATE
                && first.as_bytes().iter().all(|b| (0x20..0x7f).contains(b)))
            .then(|| first.clone())
        });
        let mut trace = Self {
            trace_id: parent.map_or_else(random_nonzero, |p| p.trace_id),
            span_id: random_nonzero(),
            sampled: parent.is_some_and(|p| p.flags & 1 == 1),
            tracestate,
            span: None,
        };
        let keep = match (sampling, parent) {
            (None, _) => false,
            (Some(_), Some(p)) => p.flags & 1 == 1,
            (Some(ratio), None) => ratio > 0.0 && fastrand::f64() < ratio,
        };
        if keep {
            let span = tracing::info_span!(
                target: "fsp::call",
                "fsp.call",
                otel.name = "fsp call",
                otel.kind = "server",
                fsp.message_id = message_id,
                fsp.consumer = tracing::field::Empty,
                fsp.service = tracing::field::Empty,
                fsp.version = tracing::field::Empty,
                fsp.purpose = tracing::field::Empty,
                fsp.decision = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
            );
            if let Some(p) = parent {
                let remote = SpanContext::new(
                    TraceId::from_bytes(p.trace_id),
                    SpanId::from_bytes(p.parent_id),
                    TraceFlags::new(p.flags & 1),
                    true,
                    TraceState::default(),
                );
                let _ =
                    span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
            }
            let cx = span.context();
            let sc = cx.span().span_context().clone();
            if sc.is_valid() {
                trace.trace_id = sc.trace_id().to_bytes();
                trace.span_id = sc.span_id().to_bytes();
                trace.sampled = sc.is_sampled();
            }
            trace.span = Some(span);
        }
        trace
    }

    /// The trace id as the audit record writes it (32 lowercase hex digits).
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The `traceparent` sent to the provider.
    pub fn traceparent(&self) -> HeaderValue {
        let mut v = [0u8; 55];
        v[..3].copy_from_slice(b"00-");
        hex_to(&self.trace_id, &mut v[3..35]);
        v[35] = b'-';
        hex_to(&self.span_id, &mut v[36..52]);
        v[52] = b'-';
        v[53] = b'0';
        v[54] = if self.sampled { b'1' } else { b'0' };
        HeaderValue::from_bytes(&v).unwrap_or_else(|_| {
            HeaderValue::from_static("00-00000000000000000000000000000000-0000000000000000-00")
        })
    }

    /// Says what became of the call, on its span (a no-op without `[telemetry]`).
    pub fn finish(&self, record: &audit::Record) {
        let Some(span) = &self.span else { return };
        if let Some(c) = &record.consumer {
            span.record("fsp.consumer", c.as_str());
        }
        if let Some(s) = &record.service {
            span.record("fsp.service", s.as_str());
        }
        if let Some(v) = &record.version {
            span.record("fsp.version", v.as_str());
        }
        if let Some(p) = &record.purpose {
            span.record("fsp.purpose", p.as_str());
        }
        span.record("fsp.decision", record.decision.as_str());
        span.record("http.response.status_code", record.status);
    }
}

fn hex_to(src: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in src.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0x0f)];
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_is_read_strictly() {
        let tp = TraceParent::parse(VALID.as_bytes()).unwrap();
        assert_eq!(hex::encode(tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(tp.parent_id), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        // A future version may carry more after a dash.
        assert!(
            TraceParent::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        ] {
            assert!(TraceParent::parse(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn two_traceparent_fields_are_no_trace_context() {
        let mut h = HeaderMap::new();
        h.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(TraceParent::of(&h).is_some());
        h.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(TraceParent::of(&h).is_none());
    }

    #[test]
    fn the_provider_gets_the_consumers_trace_with_the_gateways_hop() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        h.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        let t = CallTrace::begin(&h, "m", None);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let sent = t.traceparent();
        let sent = sent.to_str().unwrap();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(sent.ends_with("-01"), "{sent}");
        assert_ne!(&sent[36..52], "00f067aa0ba902b7");
        assert!(TraceParent::parse(sent.as_bytes()).is_some());
        assert_eq!(t.tracestate.unwrap(), "congo=t61rcWkgMzE");
        // An invalid one starts a new, unsampled trace, and its tracestate is dropped.
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("00-xyz"));
        h.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        let t = CallTrace::begin(&h, "m", None);
        assert_ne!(t.trace_id, [0; 16]);
        assert!(t.traceparent().to_str().unwrap().ends_with("-00"));
        assert!(t.tracestate.is_none());
    }

    proptest::proptest! {
        #[test]
        fn no_value_makes_the_parser_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let _ = TraceParent::parse(&bytes);
        }
    }
}
