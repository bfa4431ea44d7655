#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use proptest::prelude::*;
use time::macros::date;

use super::*;
use crate::authorisation::{LegalBasis, LegalBasisKind};

fn consumer(id: &str, nets: &[&str]) -> Consumer {
    Consumer {
        id: Arc::from(id),
        organisation: id.to_uppercase(),
        enterprise_number: None,
        source_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
    }
}

fn auth(id: &str, purpose: &str, from: Date, until: Option<Date>) -> Authorisation {
    Authorisation {
        id: id.into(),
        consumer: "bxl".into(),
        service: "person/getPerson".into(),
        versions: vec![],
        purpose: purpose.into(),
        legal_basis: LegalBasis {
            kind: LegalBasisKind::Deliberation,
            reference: "CSI/20/123".into(),
            issuer: None,
        },
        provider_approval: "RRN-1".into(),
        valid_from: from,
        valid_until: until,
        revoked: None,
    }
}

fn ask<'a>(purpose: Option<&'a str>, today: Date) -> Ask<'a> {
    Ask {
        service: "person/getPerson",
        version: "v3",
        provider: "rrn",
        purpose,
        source_ip: "192.0.2.10".parse().unwrap(),
        today,
        any_purpose: false,
    }
}

#[derive(Default)]
struct Cut(HashSet<String>, HashSet<String>);

impl Suspensions for Cut {
    fn consumer_suspended(&self, c: &str) -> bool {
        self.0.contains(c)
    }
    fn provider_suspended(&self, p: &str) -> bool {
        self.1.contains(p)
    }
}

const TODAY: Date = date!(2026 - 11 - 24);

#[test]
fn a_live_authorisation_is_chosen_with_or_without_the_purpose() {
    let all = Authorisations::new(vec![auth("a1", "vote", date!(2020 - 01 - 01), None)]);
    let c = consumer("bxl", &[]);
    assert_eq!(
        decide(&c, &ask(None, TODAY), &all, &NoSuspensions)
            .unwrap()
            .id,
        "a1"
    );
    assert_eq!(
        decide(&c, &ask(Some("vote"), TODAY), &all, &NoSuspensions)
            .unwrap()
            .id,
        "a1"
    );
}

#[test]
fn no_authorisation_for_another_service_consumer_or_version() {
    let mut narrowed = auth("a1", "vote", date!(2020 - 01 - 01), None);
    narrowed.versions = vec!["v2".into()];
    let all = Authorisations::new(vec![narrowed]);
    let c = consumer("bxl", &[]);
    assert!(matches!(
        decide(&c, &ask(None, TODAY), &all, &NoSuspensions),
        Err(Denial::NoAuthorisation { .. })
    ));
    let other = consumer("gent", &[]);
    let mut a = ask(None, TODAY);
    a.version = "v2";
    assert!(decide(&c, &a, &all, &NoSuspensions).is_ok());
    assert!(matches!(
        decide(&other, &a, &all, &NoSuspensions),
        Err(Denial::NoAuthorisation { .. })
    ));
    a.service = "person/getAddress";
    assert!(matches!(
        decide(&c, &a, &all, &NoSuspensions),
        Err(Denial::NoAuthorisation { .. })
    ));
}

#[test]
fn an_unauthorised_purpose_names_the_authorised_ones() {
    let all = Authorisations::new(vec![
        auth("a1", "vote", date!(2020 - 01 - 01), None),
        auth("a2", "tax", date!(2020 - 01 - 01), None),
    ]);
    let err = decide(
        &consumer("bxl", &[]),
        &ask(Some("marketing"), TODAY),
        &all,
        &NoSuspensions,
    )
    .unwrap_err();
    assert!(
        matches!(&err, Denial::PurposeNotAuthorised { authorised, .. } if authorised == "tax, vote"),
        "{err}"
    );
}

#[test]
fn several_live_purposes_need_the_purpose_header() {
    let all = Authorisations::new(vec![
        auth("a1", "vote", date!(2020 - 01 - 01), None),
        auth("a2", "tax", date!(2020 - 01 - 01), None),
    ]);
    let c = consumer("bxl", &[]);
    let err = decide(&c, &ask(None, TODAY), &all, &NoSuspensions).unwrap_err();
    assert!(
        matches!(&err, Denial::PurposeRequired { purposes, .. } if purposes == "tax, vote"),
        "{err}"
    );
    assert_eq!(
        decide(&c, &ask(Some("tax"), TODAY), &all, &NoSuspensions)
            .unwrap()
            .id,
        "a2"
    );
    // The version's metadata (its WSDL) is covered by either, and a stated purpose is
    // still checked.
    let metadata = Ask {
        any_purpose: true,
        ..ask(None, TODAY)
    };
    assert!(decide(&c, &metadata, &all, &NoSuspensions).is_ok());
    let other = Ask {
        any_purpose: true,
        ..ask(Some("health"), TODAY)
    };
    assert!(matches!(
        decide(&c, &other, &all, &NoSuspensions),
        Err(Denial::PurposeNotAuthorised { .. })
    ));
    // An expired authorisation for another purpose does not make the purpose required.
    let all = Authorisations::new(vec![
        auth("a1", "vote", date!(2020 - 01 - 01), None),
        auth(
            "a2",
            "tax",
            date!(2020 - 01 - 01),
            Some(date!(2021 - 01 - 01)),
        ),
    ]);
    assert_eq!(
        decide(&c, &ask(None, TODAY), &all, &NoSuspensions)
            .unwrap()
            .id,
        "a1"
    );
}

#[test]
fn not_yet_valid_expired_and_revoked() {
    let c = consumer("bxl", &[]);
    let later = Authorisations::new(vec![auth("a1", "vote", date!(2027 - 01 - 01), None)]);
    assert!(
        matches!(decide(&c, &ask(None, TODAY), &later, &NoSuspensions), Err(Denial::NotYetValid { valid_from, .. }) if valid_from == date!(2027 - 01 - 01))
    );
    let over = Authorisations::new(vec![auth(
        "a1",
        "vote",
        date!(2020 - 01 - 01),
        Some(date!(2026 - 10 - 09)),
    )]);
    let err = decide(&c, &ask(None, TODAY), &over, &NoSuspensions).unwrap_err();
    assert!(
        matches!(&err, Denial::Expired { why, .. } if why.contains("2026-10-09")),
        "{err}"
    );
    let mut revoked = auth("a1", "vote", date!(2020 - 01 - 01), None);
    revoked.revoked = Some(date!(2026 - 06 - 01));
    let err = decide(
        &c,
        &ask(None, TODAY),
        &Authorisations::new(vec![revoked]),
        &NoSuspensions,
    )
    .unwrap_err();
    assert!(
        matches!(&err, Denial::Expired { why, .. } if why.contains("revoked on 2026-06-01")),
        "{err}"
    );
}

#[test]
fn source_addresses_are_enforced_for_v4_and_v6() {
    let all = Authorisations::new(vec![auth("a1", "vote", date!(2020 - 01 - 01), None)]);
    let c = consumer("bxl", &["192.0.2.0/24", "2001:db8::/32"]);
    let mut a = ask(None, TODAY);
    assert!(decide(&c, &a, &all, &NoSuspensions).is_ok());
    a.source_ip = "2001:db8::42".parse().unwrap();
    assert!(decide(&c, &a, &all, &NoSuspensions).is_ok());
    for ip in ["198.51.100.1", "2001:db9::1", "::ffff:198.51.100.1"] {
        a.source_ip = ip.parse::<IpAddr>().unwrap();
        assert!(
            matches!(
                decide(&c, &a, &all, &NoSuspensions),
                Err(Denial::SourceIp { .. })
            ),
            "{ip}"
        );
    }
}

#[test]
fn suspensions_come_first() {
    let all = Authorisations::new(vec![auth("a1", "vote", date!(2020 - 01 - 01), None)]);
    let c = consumer("bxl", &[]);
    let mut cut = Cut::default();
    cut.0.insert("bxl".into());
    assert!(matches!(
        decide(&c, &ask(None, TODAY), &all, &cut),
        Err(Denial::ConsumerSuspended { .. })
    ));
    let mut cut = Cut::default();
    cut.1.insert("rrn".into());
    assert!(matches!(
        decide(&c, &ask(None, TODAY), &all, &cut),
        Err(Denial::ProviderSuspended { .. })
    ));
}

#[test]
fn the_version_specific_authorisation_wins_for_one_purpose() {
    let general = auth("general", "vote", date!(2020 - 01 - 01), None);
    let mut specific = auth("specific", "vote", date!(2019 - 01 - 01), None);
    specific.versions = vec!["v3".into()];
    let all = Authorisations::new(vec![general, specific]);
    assert_eq!(
        decide(
            &consumer("bxl", &[]),
            &ask(None, TODAY),
            &all,
            &NoSuspensions
        )
        .unwrap()
        .id,
        "specific"
    );
}

fn arb_day() -> impl Strategy<Value = Date> {
    (0i64..4000).prop_map(|d| date!(2018 - 01 - 01) + time::Duration::days(d))
}

proptest! {
    /// An authorisation is used exactly on the days from valid_from through valid_until.
    #[test]
    fn validity_window_edges(from in arb_day(), len in proptest::option::of(0i64..2000), probe in -3i64..3, at_end in any::<bool>()) {
        let until = len.map(|l| from + time::Duration::days(l));
        let all = Authorisations::new(vec![auth("a", "vote", from, until)]);
        let base = if at_end { until.unwrap_or(from) } else { from };
        let today = base + time::Duration::days(probe);
        let result = decide(&consumer("bxl", &[]), &ask(Some("vote"), today), &all, &NoSuspensions);
        let expected = from <= today && until.is_none_or(|u| today <= u);
        prop_assert_eq!(result.is_ok(), expected, "from {} until {:?} today {}", from, until, today);
        if !expected {
            let not_yet = today < from;
            let said_not_yet = matches!(result, Err(Denial::NotYetValid { .. }));
            let said_expired = matches!(result, Err(Denial::Expired { .. }));
            prop_assert_eq!(said_not_yet, not_yet);
            prop_assert_eq!(said_expired, !not_yet);
        }
    }

    /// Whatever the authorisations, a granted call is covered by an authorisation of this
    /// consumer, service, version and stated purpose that is in force today; and without
    /// a purpose, a grant means every live authorisation shares one purpose.
    #[test]
    fn grants_are_always_covered(
        specs in proptest::collection::vec((0usize..3, arb_day(), proptest::option::of(0i64..1500), proptest::option::of(0usize..3)), 0..6),
        today in arb_day(),
        stated in proptest::option::of(0usize..3),
        version in 0usize..3,
    ) {
        const PURPOSES: [&str; 3] = ["vote", "tax", "aid"];
        const VERSIONS: [&str; 3] = ["v1", "v2", "v3"];
        let all: Vec<Authorisation> = specs.iter().enumerate().map(|(i, (p, from, len, ver))| {
            let mut a = auth(&format!("a{i}"), PURPOSES[*p], *from, len.map(|l| *from + time::Duration::days(l)));
            if let Some(v) = ver { a.versions = vec![VERSIONS[*v].into()]; }
            a
        }).collect();
        let index = Authorisations::new(all.clone());
        let mut q = ask(stated.map(|p| PURPOSES[p]), today);
        q.version = VERSIONS[version];
        let covering: Vec<&Authorisation> = all.iter()
            .filter(|a| a.covers_version(q.version) && a.in_force(today) && q.purpose.is_none_or(|p| a.purpose == p))
            .collect();
        match decide(&consumer("bxl", &[]), &q, &index, &NoSuspensions) {
            Ok(a) => {
                prop_assert!(a.covers_version(q.version) && a.in_force(today));
                prop_assert!(q.purpose.is_none_or(|p| a.purpose == p));
                if q.purpose.is_none() {
                    prop_assert!(covering.iter().all(|c| c.purpose == a.purpose));
                }
            }
            Err(Denial::PurposeRequired { .. }) => {
                prop_assert!(q.purpose.is_none());
                prop_assert!(covering.iter().any(|c| c.purpose != covering[0].purpose));
            }
            Err(_) => prop_assert!(covering.is_empty(), "refused although {:?} cover it", covering.iter().map(|a| &a.id).collect::<Vec<_>>()),
        }
    }
}
