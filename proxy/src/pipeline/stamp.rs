//! Phase 1, stamp: the FSP message id (UUID v7) and timestamp every call is given on
//! arrival, before anything can refuse it, so every answer and record carries them.

use std::time::Instant;

use time::OffsetDateTime;
use time::macros::format_description;

/// The moment a call was received, in the forms the gateway writes it.
#[derive(Debug)]
pub struct Stamp {
    /// The FSP message id, hyphenated lower-case UUID text.
    id: [u8; uuid::fmt::Hyphenated::LENGTH],
    /// RFC 3339 with milliseconds (always 24 bytes for the current time).
    ts: [u8; 24],
    pub now: OffsetDateTime,
    pub started: Instant,
}

impl Stamp {
    pub fn now() -> Self {
        thread_local! {
            /// Message ids increase within a millisecond per worker thread, without a
            /// lock shared by the threads (what `Uuid::now_v7` takes).
            static UUID_CONTEXT: uuid::timestamp::context::ContextV7 =
                const { uuid::timestamp::context::ContextV7::new() };
        }
        let now = OffsetDateTime::now_utc();
        // The id carries the same instant as the timestamp.
        let ts = uuid::Timestamp::from_unix(
            uuid::timestamp::context::ThreadLocalContext::new(&UUID_CONTEXT),
            u64::try_from(now.unix_timestamp()).unwrap_or_default(),
            now.nanosecond(),
        );
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        uuid::Uuid::new_v7(ts).hyphenated().encode_lower(&mut id);
        Self {
            id,
            ts: rfc3339_millis_bytes(now).unwrap_or(*b"0000-00-00T00:00:00.000Z"),
            now,
            started: Instant::now(),
        }
    }

    pub fn message_id(&self) -> &str {
        std::str::from_utf8(&self.id).unwrap_or_default()
    }

    pub fn timestamp(&self) -> &str {
        std::str::from_utf8(&self.ts).unwrap_or_default()
    }

    /// `FSP-Message-ID` and `FSP-Timestamp` as header fields (made once, sent to the
    /// provider and back to the consumer).
    pub fn fields(&self) -> Option<[(http::HeaderName, http::HeaderValue); 2]> {
        let id = http::HeaderValue::from_str(self.message_id()).ok()?;
        let ts = http::HeaderValue::from_str(self.timestamp()).ok()?;
        Some([
            (crate::headers::FSP_MESSAGE_ID, id),
            (crate::headers::FSP_TIMESTAMP, ts),
        ])
    }
}

/// RFC 3339 in UTC with milliseconds: `2026-11-24T10:15:30.123Z`.
///
/// Written digit by digit: it runs for every call, and a format description is
/// interpreted each time.
pub fn rfc3339_millis(t: OffsetDateTime) -> String {
    match rfc3339_millis_bytes(t) {
        Some(b) => std::str::from_utf8(&b)
            .map(str::to_owned)
            .unwrap_or_default(),
        None => t
            .to_offset(time::UtcOffset::UTC)
            .format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .unwrap_or_default(),
    }
}

/// [`rfc3339_millis`] for the years 0 to 9999, without allocating.
fn rfc3339_millis_bytes(t: OffsetDateTime) -> Option<[u8; 24]> {
    let t = t.to_offset(time::UtcOffset::UTC);
    let (year, month, day) = t.to_calendar_date();
    let year = u16::try_from(year).ok().filter(|y| *y <= 9999)?;
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u16| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, u16::from(u8::from(month)));
    put(8, 2, u16::from(day));
    put(11, 2, u16::from(t.hour()));
    put(14, 2, u16::from(t.minute()));
    put(17, 2, u16::from(t.second()));
    put(20, 3, t.millisecond());
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_the_wire_format() {
        let t = time::macros::datetime!(2026-11-24 10:15:30.123456 UTC);
        assert_eq!(rfc3339_millis(t), "2026-11-24T10:15:30.123Z");
        let t = time::macros::datetime!(0999-01-02 03:04:05.006 UTC);
        assert_eq!(rfc3339_millis(t), "0999-01-02T03:04:05.006Z");
        let t = time::macros::datetime!(2026-11-24 23:59:59.999 -01:00);
        assert_eq!(rfc3339_millis(t), "2026-11-25T00:59:59.999Z");
        let t = time::macros::datetime!(2026-02-28 00:00:00.0 UTC);
        assert_eq!(rfc3339_millis(t), "2026-02-28T00:00:00.000Z");
    }

    #[test]
    fn message_ids_carry_the_timestamp_and_increase() {
        let a = Stamp::now();
        let b = Stamp::now();
        assert!(a.message_id() < b.message_id());
        let id = uuid::Uuid::parse_str(a.message_id()).unwrap_or_default();
        assert_eq!(id.get_version_num(), 7);
        let (secs, _) = id.get_timestamp().map(|t| t.to_unix()).unwrap_or_default();
        assert_eq!(
            i64::try_from(secs).unwrap_or_default(),
            a.now.unix_timestamp()
        );
    }
}
