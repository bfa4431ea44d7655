//! # The request pipeline
//!
//! Every call goes through these phases, in this order, one file each (TLS was accepted
//! and the client certificate verified by [`crate::server`] before the first request):
//!
//! 1. [`stamp`]: the FSP message id (UUID v7) and timestamp;
//! 2. [`identify`]: the consumer, from a bearer token or the client certificate → a
//!    [`Caller`](identify::Caller);
//! 3. [`route`]: the live version the path names, its provider's pool and the path the
//!    provider will read → a [`Route`](route::Route); then [`inspect`]: fields given
//!    once, XML threat protection, the SOAP Header;
//! 4. [`authorise`]: suspensions, source address, and the authorisation for this
//!    consumer, version and purpose today → a [`Granted`](authorise::Granted) call;
//! 5. [`throttle`]: the provider's and the consumer's limits → an
//!    [`Admitted`](throttle::Admitted) call (the consumer's share of the provider's
//!    slots is taken before phase 3 inspects the body: [`throttle::share`]);
//! 6. [`record`]: a fail-closed gateway forwards nothing it has not recorded: the
//!    call's `request` line is durable first (write-ahead) → a
//!    [`Cleared`](record::Cleared) call;
//! 7. [`forward`]: the request streamed to the provider (only a `Cleared` call can be);
//!    or, for a `GET ...?wsdl` of a SOAP service, [`metadata`]: the version's WSDL
//!    served by the gateway;
//! 8. [`respond`]: the answer streamed back, stamped and (XML) checked; or the refusal rendered. The
//!    call's audit record goes with the answer's body and is completed when it ends
//!    (the `outcome` line of a write-ahead call).
//!
//! Each permit is made only by its phase, from the permit before: the type system
//! refuses to forward a call that was not identified, routed, authorised, throttled and
//! cleared. [`Call`](call::Call) owns the audit record; a refusal leaves any phase by `?`
//! and reaches [`respond::refuse`], the one place that renders and records it.

pub mod authorise;
pub mod call;
pub mod forward;
pub mod identify;
pub mod inspect;
pub mod metadata;
pub mod record;
pub mod respond;
pub mod route;
pub mod stamp;
pub mod target;
pub mod throttle;

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::errors::Rejection;
use crate::response::ResponseBody;
use crate::state::Local;
use crate::transport::body::Unread;
use call::{Call, ConnInfo};
use inspect::FieldCounts;
use stamp::Stamp;
use target::Target;

/// Serves one request. Never fails: every refusal is a response.
pub async fn handle(
    local: Arc<Local>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let stamp = Stamp::now();
    let (parts, body) = req.into_parts();
    // Drained if the call is refused before its body is read (see `drain_later`).
    let mut body = Unread::new(body);
    let target = Target::of(&local.snap, parts.uri.path(), stamp.now.date());
    let mut call = Call::begin(
        stamp,
        &local.gw.node,
        &conn,
        &parts,
        &target,
        local.gw.telemetry,
    );
    let mut http10 = false;
    // Up to the audit gate, then the provider: only a cleared call reaches `forward`.
    let served = match clear(&local, &conn, &mut call, &parts, target, &mut body).await {
        Ok((cleared, _)) if let Some(wanted) = cleared.metadata() => {
            return Ok(
                match metadata::serve(&local, &conn, &mut call, cleared, wanted).await {
                    Ok(served) => respond::metadata(&local, call, served),
                    Err(refusal) => respond::refuse(&local, call, refusal),
                },
            );
        }
        Ok((cleared, content)) => {
            let (method, headers) = (parts.method, parts.headers);
            http10 = parts.version < http::Version::HTTP_11;
            forward::forward(
                &local, &conn, &mut call, cleared, method, headers, content, &mut body,
            )
            .await
        }
        Err(refusal) => Err(refusal),
    };
    Ok(match served {
        Ok(answer) => respond::deliver(&local, call, answer, http10)
            .await
            .map(|body| body.sent_over(|| conn.answer_progress())),
        Err(refusal) => respond::refuse(&local, call, refusal),
    })
}

/// The phases from identification to the audit gate: a call cleared for forwarding,
/// with the part of its body already read.
async fn clear<'s>(
    local: &'s Local,
    conn: &ConnInfo,
    call: &mut Call,
    parts: &http::request::Parts,
    target: Target<'s>,
    body: &mut Unread,
) -> Result<(record::Cleared<'s>, inspect::Content), Rejection> {
    let fields = FieldCounts::of(&parts.headers);
    inspect::one_host(parts, &fields)?;
    let caller = identify::identify(local, conn, call, &parts.headers).await?;
    let route = route::route(local, call, parts, target)?;
    // Before the body is read: a SOAP Header being read counts in the consumer's share.
    let share = throttle::share(&route, &caller)?;
    let content = inspect::inspect(&local.snap, call, parts, &fields, &route, body).await?;
    let granted = authorise::authorise(local, conn, call, caller, route)?;
    record::ready(local)?;
    let admitted = throttle::admit(local, granted, share).await?;
    let cleared = record::gate(local, call, admitted).await?;
    Ok((cleared, content))
}
