#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;
use time::macros::date;

fn v(version: &str, released: Date, deprecated: Option<Date>, sunset: Option<Date>) -> VersionSpec {
    VersionSpec {
        version: version.into(),
        upstream: format!("http://upstream.test/{version}").parse().unwrap(),
        protocol: None,
        released,
        deprecated,
        sunset,
    }
}

fn svc(versions: Vec<VersionSpec>) -> ServiceSpec {
    ServiceSpec {
        family: "person".into(),
        id: "getPerson".into(),
        protocol: Protocol::Soap,
        versions,
    }
}

#[test]
fn four_live_versions_are_rejected_naming_the_service() {
    let spec = svc(vec![
        v("v1", date!(2020 - 01 - 01), None, None),
        v("v2", date!(2021 - 06 - 01), None, None),
        v("v3", date!(2022 - 09 - 01), None, None),
        v("v4", date!(2024 - 01 - 01), None, None),
    ]);
    let errs = validate_service(&spec);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let msg = errs[0].to_string();
    assert!(matches!(
        errs[0],
        RuleViolation::TooManyLive { count: 4, .. }
    ));
    assert!(msg.contains("person/getPerson"), "{msg}");
    assert!(msg.contains("v1, v2, v3, v4"), "{msg}");
}

#[test]
fn a_retired_version_does_not_count_as_live() {
    let spec = svc(vec![
        v(
            "v1",
            date!(2020 - 01 - 01),
            Some(date!(2021 - 06 - 01)),
            Some(date!(2023 - 06 - 01)),
        ),
        v("v2", date!(2021 - 06 - 01), None, None),
        v("v3", date!(2022 - 09 - 01), None, None),
        v("v4", date!(2024 - 01 - 01), None, None),
    ]);
    assert_eq!(validate_service(&spec), vec![]);
}

#[test]
fn a_future_release_that_would_make_four_live_is_caught_now() {
    let spec = svc(vec![
        v(
            "v1",
            date!(2020 - 01 - 01),
            Some(date!(2021 - 06 - 01)),
            Some(date!(2030 - 01 - 01)),
        ),
        v("v2", date!(2021 - 06 - 01), None, None),
        v("v3", date!(2022 - 09 - 01), None, None),
        v("v4", date!(2029 - 01 - 01), None, None),
    ]);
    // v1's sunset is also too late; both rules must be reported.
    let errs = validate_service(&spec);
    assert!(errs.iter().any(
        |e| matches!(e, RuleViolation::TooManyLive { date, .. } if *date == date!(2029 - 01 - 01))
    ));
    assert!(
        errs.iter()
            .any(|e| matches!(e, RuleViolation::SunsetTooLate { .. }))
    );
}

#[test]
fn sunset_three_years_after_deprecation_is_rejected() {
    let spec = svc(vec![
        v(
            "v1",
            date!(2020 - 01 - 01),
            Some(date!(2024 - 03 - 01)),
            Some(date!(2027 - 03 - 01)),
        ),
        v("v2", date!(2024 - 03 - 01), None, None),
    ]);
    let errs = validate_service(&spec);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let msg = errs[0].to_string();
    assert!(
        msg.contains("person/getPerson") && msg.contains("v1"),
        "{msg}"
    );
    assert!(
        msg.contains("2026-03-01"),
        "names the latest allowed date: {msg}"
    );
}

#[test]
fn sunset_exactly_two_years_after_deprecation_is_allowed() {
    let spec = svc(vec![
        v(
            "v1",
            date!(2020 - 01 - 01),
            Some(date!(2024 - 03 - 01)),
            Some(date!(2026 - 03 - 01)),
        ),
        v("v2", date!(2024 - 03 - 01), None, None),
    ]);
    assert_eq!(validate_service(&spec), vec![]);
}

#[test]
fn leap_day_deprecation_allows_sunset_on_28_february() {
    assert_eq!(latest_sunset(date!(2024 - 02 - 29)), date!(2026 - 02 - 28));
}

#[test]
fn sunset_needs_deprecation_and_must_follow_it() {
    let spec = svc(vec![
        v(
            "v1",
            date!(2020 - 01 - 01),
            None,
            Some(date!(2021 - 01 - 01)),
        ),
        v(
            "v2",
            date!(2020 - 06 - 01),
            Some(date!(2021 - 01 - 01)),
            Some(date!(2020 - 12 - 01)),
        ),
        v(
            "v3",
            date!(2021 - 06 - 01),
            Some(date!(2021 - 01 - 01)),
            None,
        ),
    ]);
    let errs = validate_service(&spec);
    assert!(
        errs.iter()
            .any(|e| matches!(e, RuleViolation::SunsetWithoutDeprecation { .. }))
    );
    assert!(
        errs.iter()
            .any(|e| matches!(e, RuleViolation::SunsetBeforeDeprecation { .. }))
    );
    assert!(
        errs.iter()
            .any(|e| matches!(e, RuleViolation::DeprecatedBeforeRelease { .. }))
    );
}

#[test]
fn five_releases_in_a_year_are_rejected_four_are_not() {
    let d = |m: u8| Date::from_calendar_date(2025, time::Month::try_from(m).unwrap(), 1).unwrap();
    let retire = |m: u8| (Some(d(m)), Some(d(m + 1)));
    let mk = |n: usize| {
        svc((0..n)
            .map(|i| {
                let m = 1 + 2 * i as u8;
                let (dep, sun) = if i + 1 < n {
                    retire(m + 1)
                } else {
                    (None, None)
                };
                v(&format!("v{i}"), d(m), dep, sun)
            })
            .collect())
    };
    assert_eq!(validate_service(&mk(4)), vec![]);
    let errs = validate_service(&mk(5));
    assert!(
        matches!(
            errs.as_slice(),
            [RuleViolation::TooManyReleases { count: 5, .. }]
        ),
        "{errs:?}"
    );
}

#[test]
fn duplicate_versions_and_bad_upstreams_are_reported() {
    let mut bad = v("v1", date!(2020 - 01 - 01), None, None);
    bad.upstream = "/relative/only".parse().unwrap();
    let spec = svc(vec![bad, v("v1", date!(2021 - 01 - 01), None, None)]);
    let errs = validate_service(&spec);
    assert!(
        errs.iter()
            .any(|e| matches!(e, RuleViolation::DuplicateVersion { .. }))
    );
    assert!(
        errs.iter()
            .any(|e| matches!(e, RuleViolation::BadUpstream { .. }))
    );
}

fn sample() -> Catalogue {
    Catalogue::new([(
        "rrn".to_string(),
        svc(vec![
            v("v3", date!(2026 - 03 - 01), None, None),
            v(
                "v2",
                date!(2024 - 05 - 01),
                Some(date!(2026 - 03 - 01)),
                Some(date!(2027 - 09 - 01)),
            ),
            v("v4", date!(2027 - 01 - 01), None, None),
        ]),
    )])
    .unwrap()
}

#[test]
fn resolve_live_deprecated_retired_unknown() {
    let cat = sample();
    let today = date!(2026 - 11 - 24);
    let live = cat.resolve("person", "getPerson", "v3", today).unwrap();
    assert_eq!(live.lifecycle, Lifecycle::Live);
    assert_eq!(live.service.provider.as_ref(), "rrn");
    assert!(live.successor.is_none());

    let dep = cat.resolve("person", "getPerson", "v2", today).unwrap();
    assert_eq!(
        dep.lifecycle,
        Lifecycle::Deprecated {
            since: date!(2026 - 03 - 01),
            sunset: Some(date!(2027 - 09 - 01))
        }
    );
    assert_eq!(dep.successor.map(|s| &*s.version), Some("v3"));

    let gone = cat
        .resolve("person", "getPerson", "v2", date!(2027 - 09 - 01))
        .unwrap_err();
    assert!(
        matches!(gone, RouteError::Retired { ref successor, .. } if successor.as_deref() == Some("v4"))
    );

    assert!(matches!(
        cat.resolve("person", "getPerson", "v4", today).unwrap_err(),
        RouteError::NotYetReleased { .. }
    ));
    assert!(matches!(
        cat.resolve("person", "getPerson", "v9", today).unwrap_err(),
        RouteError::UnknownVersion { ref available, .. } if available == "v3, v2"
    ));
    assert!(matches!(
        cat.resolve("person", "nope", "v3", today).unwrap_err(),
        RouteError::UnknownService { .. }
    ));
}

#[test]
fn an_invalid_service_cannot_be_built_into_a_catalogue() {
    let err = Catalogue::new([(
        "rrn".to_string(),
        svc(vec![
            v("v1", date!(2020 - 01 - 01), None, None),
            v("v2", date!(2021 - 01 - 01), None, None),
            v("v3", date!(2022 - 01 - 01), None, None),
            v("v4", date!(2023 - 01 - 01), None, None),
        ]),
    )])
    .unwrap_err();
    assert_eq!(err.0.len(), 1);
}

fn arb_date() -> impl Strategy<Value = Date> {
    (0i32..3000).prop_map(|d| date!(2020 - 01 - 01) + time::Duration::days(d as i64))
}

proptest! {
    /// Whatever the dates, a service that passes validation never has more than three
    /// live versions on any day, and every version is routable only while live.
    #[test]
    fn valid_services_never_expose_more_than_three_live_versions(
        dates in proptest::collection::vec((arb_date(), proptest::option::of(0i64..900), proptest::option::of(1i64..800)), 1..7),
        probe in arb_date(),
    ) {
        let versions: Vec<VersionSpec> = dates.iter().enumerate().map(|(i, (rel, dep, sun))| {
            let deprecated = dep.map(|d| *rel + time::Duration::days(d));
            let sunset = deprecated.zip(*sun).map(|(d, s)| d + time::Duration::days(s));
            v(&format!("v{i}"), *rel, deprecated, sunset)
        }).collect();
        let spec = svc(versions.clone());
        if validate_service(&spec).is_empty() {
            let cat = Catalogue::new([("p".to_string(), spec)]).unwrap();
            let routable = versions.iter()
                .filter(|v| cat.resolve("person", "getPerson", &v.version, probe).is_ok())
                .count();
            prop_assert!(routable <= MAX_LIVE_VERSIONS);
            for v in &versions {
                let ok = cat.resolve("person", "getPerson", &v.version, probe).is_ok();
                prop_assert_eq!(ok, is_live_on(v, probe));
            }
        }
    }
}
