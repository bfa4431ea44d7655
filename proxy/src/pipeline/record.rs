//! Phase 6, record: a fail-closed gateway forwards nothing it has not recorded. The
//! answer is a [`Cleared`] call, which only this phase makes, from an [`Admitted`] one;
//! the forward phase takes nothing else.
//!
//! Write-ahead: when fail-closed, the call's record is written as a `request` line and
//! made durable (synced to disk, or committed) before the call is cleared; concurrent
//! calls share one sync (the sink's group commit). The outcome is written as an
//! `outcome` line of the same message id when the answer ends (see
//! [`crate::response`]); a call refused from here on still gets that outcome line, so
//! the trail never shows a call as forwarded that was not. A fail-open gateway records
//! each call once, complete, when it ends.

use std::time::Duration;

use super::call::Call;
use super::throttle::Admitted;
use crate::errors::{Code, Rejection};
use crate::state::Local;

/// How long a call waits for its record to be durable before it is refused: a disk or
/// database that stalls must not hold calls (and their connections) for ever.
const DURABLE_WITHIN: Duration = Duration::from_secs(5);

/// An admitted call the audit trail can take.
#[derive(Debug)]
pub struct Cleared<'s> {
    admitted: Admitted<'s>,
}

impl<'s> Cleared<'s> {
    pub fn into_admitted(self) -> Admitted<'s> {
        self.admitted
    }

    /// For a request for the version's WSDL: what it asks for.
    pub fn metadata(&self) -> Option<crate::wsdl::Wanted> {
        self.admitted.granted().route().metadata()
    }
}

fn unavailable(e: &dyn std::fmt::Display) -> Rejection {
    Rejection::new(
        Code::AuditUnavailable,
        format!("the call cannot be recorded, so it is not forwarded: {e}"),
    )
}

/// When fail-closed, refuses a call at once while the audit sink is known to be
/// unhealthy: asked before the call is throttled, so that calls refused during an outage
/// of the trail spend no slot and no rate quota. (A write that fails or stalls is only
/// known at the [gate], after the call was throttled.)
pub fn ready(local: &Local) -> Result<(), Rejection> {
    if local.snap.fail_closed {
        local.gw.audit.health().map_err(|e| unavailable(&e))?;
    }
    Ok(())
}

/// Clears an admitted call for forwarding: when fail-closed, once its `request` line is
/// durable; refused when the audit sink cannot take it or make it durable in time.
pub async fn gate<'s>(
    local: &Local,
    call: &mut Call,
    mut admitted: Admitted<'s>,
) -> Result<Cleared<'s>, Rejection> {
    if !local.snap.fail_closed {
        return Ok(Cleared { admitted });
    }
    // Asked again: the sink may have failed while the call was throttled.
    local.gw.audit.health().map_err(|e| unavailable(&e))?;
    call.record.phase = Some(audit::Phase::Request);
    let durable = match local.gw.audit.submit_durable(&call.record) {
        Ok(d) => d,
        Err(e) => {
            // Not taken: nothing of this call is in the trail yet; its refusal is
            // recorded once, complete.
            call.record.phase = None;
            return Err(unavailable(&e));
        }
    };
    let asked = std::time::Instant::now();
    admitted.lend_slot();
    match tokio::time::timeout(DURABLE_WITHIN, durable).await {
        Ok(Ok(())) => {
            crate::observe::audit_write().record(asked.elapsed().as_secs_f64());
            admitted.retake_slot().await?;
            Ok(Cleared { admitted })
        }
        Ok(Err(e)) => Err(unavailable(&e)),
        Err(_) => Err(unavailable(&format_args!(
            "the audit store did not confirm the record within {} s",
            DURABLE_WITHIN.as_secs()
        ))),
    }
}
