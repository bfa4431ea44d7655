//! Phase 8, respond: the one place a call leaves the gateway. A provider's answer is
//! streamed back stamped with the FSP fields (and, for SOAP, the FSP header elements);
//! a refusal from any phase is rendered by [`crate::errors`] and logged. Either way the
//! call's record goes with the answer's body, which completes it when the answer ends
//! (see [`crate::response`]).

use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use http::header;

use super::call::Call;
use super::forward::Answer;
use crate::errors::{self, Rejection, Side};
use crate::headers::strip_hop_by_hop;
use crate::response::{Finisher, ResponseBody};
use crate::soap::HeaderStamp;
use crate::state::Local;

/// The provider's answer, on its way back to the consumer.
pub fn deliver(local: &Arc<Local>, call: Call, answer: Answer) -> Response<ResponseBody> {
    let Call {
        stamp,
        mut record,
        shared,
        ..
    } = call;
    let (mut parts, body) = answer.response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some([(id_name, id), (ts_name, ts)]) = answer.fsp {
        parts.headers.insert(id_name, id);
        parts.headers.insert(ts_name, ts);
    }
    if let Some(lifecycle) = answer.lifecycle {
        for (name, value) in lifecycle.iter() {
            parts.headers.append(name.clone(), value.clone());
        }
    }
    record.status = parts.status.as_u16();
    let finisher = Finisher::new(record, stamp.started, shared, local.clone());
    let stampable = answer.soap
        && parts
            .headers
            .get(header::CONTENT_ENCODING)
            .is_none_or(|v| v == "identity")
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("xml"));
    let body = if stampable {
        parts.headers.remove(header::CONTENT_LENGTH);
        ResponseBody::stamped(
            body,
            HeaderStamp::new(stamp.message_id(), stamp.timestamp()),
            finisher,
        )
    } else {
        ResponseBody::upstream(body, finisher)
    };
    Response::from_parts(parts, body)
}

/// A refusal, rendered, logged and recorded.
pub fn refuse(local: &Arc<Local>, call: Call, r: Rejection) -> Response<ResponseBody> {
    let Call {
        stamp,
        mut record,
        form,
        shared,
    } = call;
    let response = errors::render(&r, form, stamp.message_id(), stamp.timestamp());
    record.decision = r.code.as_str().to_owned();
    record.status = r.code.status().as_u16();
    record.fault = Some(r.side.as_str().to_owned());
    record.detail = Some(r.recorded_detail().to_owned());
    match r.side {
        Side::Consumer => {
            tracing::debug!(message_id = %stamp.message_id(), code = r.code.as_str(), fault = "consumer", detail = %r.recorded_detail(), "call refused")
        }
        side @ (Side::Provider | Side::Gateway) => {
            tracing::warn!(message_id = %stamp.message_id(), code = r.code.as_str(), fault = side.as_str(), detail = %r.recorded_detail(), "call failed")
        }
    }
    let (parts, bytes): (_, Bytes) = response.into_parts();
    let finisher = Finisher::new(record, stamp.started, shared, local.clone());
    Response::from_parts(parts, ResponseBody::full(bytes, Some(finisher)))
}
