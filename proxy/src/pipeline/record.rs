//! Phase 6, record: a fail-closed gateway forwards nothing it could not record. The
//! answer is a [`Cleared`] call, which only this phase makes, from an [`Admitted`] one;
//! the forward phase takes nothing else.
//!
//! The record itself is completed when the answer ends (see [`crate::response`]).

use super::throttle::Admitted;
use crate::errors::{Code, Rejection};
use crate::state::Local;

/// An admitted call the audit trail can take.
#[derive(Debug)]
pub struct Cleared<'s> {
    admitted: Admitted<'s>,
}

impl<'s> Cleared<'s> {
    pub fn into_admitted(self) -> Admitted<'s> {
        self.admitted
    }
}

/// Clears an admitted call for forwarding, unless the gateway is fail-closed and its
/// audit sink cannot take records.
pub fn gate<'s>(local: &Local, admitted: Admitted<'s>) -> Result<Cleared<'s>, Rejection> {
    if local.snap.fail_closed
        && let Err(e) = local.gw.audit.health()
    {
        return Err(Rejection::new(
            Code::AuditUnavailable,
            format!("the call cannot be recorded, so it is not forwarded: {e}"),
        ));
    }
    Ok(Cleared { admitted })
}
