//! Phase 4, authorise: suspensions, the source address, and the authorisation that
//! covers this consumer, service version and purpose today (`policy::decide`). The
//! purpose comes from `FSP-Purpose` or, for SOAP, from `<fsp:Purpose>` in the SOAP Header
//! (already in the record, see the inspect phase). The answer is a [`Granted`] call,
//! which only this phase makes, from a [`Caller`] and a [`Route`].

use super::call::{Call, ConnInfo};
use super::identify::Caller;
use super::route::Route;
use crate::errors::{Code, Rejection, map};
use crate::state::{Grant, Local};

/// A call an authorisation covers: who, where to, and under which legal basis.
#[derive(Debug)]
pub struct Granted<'s> {
    caller: Caller<'s>,
    route: Route<'s>,
    /// The `FSP-*` fields the provider is sent, made by this thread.
    grant: Option<&'s Grant>,
    /// The suspensions' change count before they were read for this decision: a call in
    /// flight is checked again whenever it moves (see `transport::body::Watch`).
    suspensions_seen: u64,
}

impl<'s> Granted<'s> {
    pub fn caller(&self) -> &Caller<'s> {
        &self.caller
    }

    pub fn route(&self) -> &Route<'s> {
        &self.route
    }

    pub fn into_parts(self) -> (Caller<'s>, Route<'s>, Option<&'s Grant>) {
        (self.caller, self.route, self.grant)
    }

    /// The suspensions' change count this decision saw (read before the sets).
    pub fn suspensions_seen(&self) -> u64 {
        self.suspensions_seen
    }
}

/// Decides, and writes the authorisation, purpose and legal basis into the record.
pub fn authorise<'s>(
    local: &'s Local,
    conn: &ConnInfo,
    call: &mut Call,
    caller: Caller<'s>,
    route: Route<'s>,
) -> Result<Granted<'s>, Rejection> {
    let (gw, snap) = (&*local.gw, &*local.snap);
    let record = &mut call.record;
    let metadata = route.metadata().is_some();
    let ask = policy::Ask {
        service: &route.service().name,
        version: &route.version().version,
        provider: &route.service().provider,
        purpose: record.purpose.as_deref(),
        source_ip: conn.peer.ip(),
        today: call.stamp.now.date(),
        any_purpose: metadata,
    };
    // A replica that does not know the cluster's suspensions cannot tell a consumer cut
    // off elsewhere from one that is not: it serves nobody (its /readyz says so too, but
    // not every path to it heeds readiness).
    if !gw.suspensions.is_known() {
        return Err(Rejection::new(
            Code::GatewayNotReady,
            "this gateway does not know the cluster's suspensions yet (its Redis has not answered since it started): try again shortly",
        )
        .with_header(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("5"),
        ));
    }
    // Read before the sets: a change landing after this is seen by the call's watch.
    let suspensions_seen = crate::transport::body::Suspensions::changes(&*gw.suspensions);
    // A guard, not a counted reference: it is read here and let go at once.
    let authorisation = policy::decide(
        caller.consumer(),
        &ask,
        &snap.authorisations,
        &**gw.suspensions.current(),
    )
    .map_err(map::denial)?;
    record.authorisation = Some(authorisation.id.clone());
    // (Reusing the buffer of the purpose the consumer gave, usually the same text.) A
    // request for the version's WSDL states no purpose and is recorded with none.
    match &mut record.purpose {
        Some(p) => p.clone_from(&authorisation.purpose),
        None if metadata => {}
        None => record.purpose = Some(authorisation.purpose.clone()),
    }
    let grant = local.grants.get(&authorisation.id);
    record.legal_basis = Some(match grant {
        Some(g) => g.legal_basis_text.clone(),
        None => authorisation.legal_basis.to_string(),
    });
    Ok(Granted {
        caller,
        route,
        grant,
        suspensions_seen,
    })
}
