//! What administrators can read back from the admin API: the loaded consumers (with
//! their credentials, source addresses and authorisations), services (with each
//! version's lifecycle state), the configuration's digest, and what a reload changed.
//! Everything is read from the snapshot in force; nothing here is on the request path.

use serde_json::{Value, json};
use time::Date;

use crate::state::Snapshot;

fn date(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Every consumer, briefly.
pub fn consumers(snap: &Snapshot, suspended: &crate::suspend::Suspended) -> Value {
    let list: Vec<Value> = snap
        .consumers
        .iter()
        .map(|c| {
            json!({
                "id": &*c.id,
                "organisation": c.organisation,
                "enterprise_number": c.enterprise_number,
                "credentials": credentials(snap, &c.id),
                "source_ips": c.source_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "authorisations": snap.authorisations.iter().filter(|a| a.consumer == *c.id).count(),
                "suspended": suspended.consumers.contains_key(&*c.id),
            })
        })
        .collect();
    json!({ "consumers": list })
}

fn credentials(snap: &Snapshot, id: &str) -> Vec<Value> {
    snap.consumers
        .credentials_of(id)
        .into_iter()
        .map(|c| match c {
            policy::CredentialView::Certificate { cn, pins } => json!({
                "kind": "certificate",
                "cn": cn,
                "sha256": pins.iter().map(ToString::to_string).collect::<Vec<_>>(),
            }),
            policy::CredentialView::OAuth { client_id } => json!({
                "kind": "oauth",
                "client_id": client_id,
            }),
        })
        .collect()
}

/// One consumer in full, with its authorisations' validity on `today`; None if unknown.
pub fn consumer(
    snap: &Snapshot,
    suspended: &crate::suspend::Suspended,
    id: &str,
    today: Date,
) -> Option<Value> {
    let c = snap.consumers.get(id)?;
    let mut authorisations: Vec<&policy::Authorisation> = snap
        .authorisations
        .iter()
        .filter(|a| a.consumer == *c.id)
        .collect();
    authorisations.sort_by(|a, b| a.id.cmp(&b.id));
    let authorisations: Vec<Value> = authorisations
        .into_iter()
        .map(|a| {
            let end = match (a.valid_until, a.revoked) {
                // Revoked from that day: the last valid day is the one before.
                (Some(u), Some(r)) => Some(u.min(r.previous_day().unwrap_or(r))),
                (None, Some(r)) => Some(r.previous_day().unwrap_or(r)),
                (u, None) => u,
            };
            let state = if a.revoked.is_some_and(|r| r <= today) {
                "revoked"
            } else if today < a.valid_from {
                "not yet valid"
            } else if a.valid_until.is_some_and(|u| today > u) {
                "expired"
            } else {
                "valid"
            };
            json!({
                "id": a.id,
                "service": a.service,
                "versions": if a.versions.is_empty() { json!("all") } else { json!(a.versions) },
                "purpose": a.purpose,
                "legal_basis": {
                    "kind": a.legal_basis.kind.as_str(),
                    "reference": a.legal_basis.reference,
                    "issuer": a.legal_basis.issuer,
                },
                "provider_approval": a.provider_approval,
                "valid_from": date(a.valid_from),
                "valid_until": a.valid_until.map(date),
                "revoked": a.revoked.map(date),
                "state": state,
                "days_left": end.map(|e| (e - today).whole_days() + 1).map(|d| d.max(0)),
            })
        })
        .collect();
    Some(json!({
        "id": &*c.id,
        "organisation": c.organisation,
        "enterprise_number": c.enterprise_number,
        "credentials": credentials(snap, &c.id),
        "source_ips": c.source_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "suspended": suspended.consumers.get(&*c.id),
        "authorisations": authorisations,
    }))
}

/// An upstream address without what may be a secret: user information and query.
fn redacted(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let host = uri.host().unwrap_or("");
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{scheme}://{host}{port}{}", uri.path())
}

/// The lifecycle state of a version on `today`.
fn state(v: &catalogue::Version, today: Date) -> &'static str {
    if today < v.released {
        "announced"
    } else if v.sunset.is_some_and(|s| today >= s) {
        "retired"
    } else if v.deprecated.is_some_and(|d| today >= d) {
        "deprecated"
    } else {
        "live"
    }
}

/// Every service with its versions.
pub fn services(snap: &Snapshot, today: Date) -> Value {
    let mut list: Vec<&catalogue::Service> = snap.catalogue.services().collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    let list: Vec<Value> = list
        .into_iter()
        .map(|s| {
            json!({
                "service": &*s.name,
                "provider": &*s.provider,
                "protocol": s.protocol.to_string(),
                "current": s.current(today).map(|v| &*v.version),
                "versions": s.versions.iter().map(|v| json!({
                    "version": &*v.version,
                    "protocol": v.protocol.to_string(),
                    "state": state(v, today),
                    "released": date(v.released),
                    "deprecated": v.deprecated.map(date),
                    "sunset": v.sunset.map(date),
                    "upstream": redacted(&v.upstream),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "services": list })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn upstream_addresses_are_shown_without_user_information_or_query() {
        let uri: http::Uri = "https://svc:s3cret@rrn.example:8443/person/v3?apikey=k"
            .parse()
            .unwrap();
        assert_eq!(redacted(&uri), "https://rrn.example:8443/person/v3");
        let uri: http::Uri = "http://10.0.0.5/soap/v1".parse().unwrap();
        assert_eq!(redacted(&uri), "http://10.0.0.5/soap/v1");
    }
}
