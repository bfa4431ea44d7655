//! What a request's path names: `/{family}/{service}/{version}{rest}`, looked up in the
//! catalogue on arrival (the protocol it finds decides the form of any refusal), and the
//! path a call is forwarded to.

use catalogue::{Protocol, RouteError};
use http::Uri;
use http::uri::PathAndQuery;

use crate::state::Snapshot;

/// The service version a request's path names, as looked up in the catalogue. It keeps
/// where the path's parts are, not the path itself, so the request stays free to move.
#[derive(Debug)]
pub struct Target<'s> {
    spans: Option<Spans>,
    resolved: Option<Result<catalogue::Route<'s>, RouteError>>,
}

/// Where `family`, `service` and `version` end in a path (`/{family}/{service}/{version}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Spans {
    family_end: usize,
    service_end: usize,
    version_end: usize,
}

impl Spans {
    fn of(path: &str) -> Option<Self> {
        let p = path.strip_prefix('/')?;
        let family_end = 1 + p.find('/')?;
        let after_family = &path[family_end + 1..];
        let service_end = family_end + 1 + after_family.find('/')?;
        let after_service = &path[service_end + 1..];
        let version_end = service_end + 1 + after_service.find('/').unwrap_or(after_service.len());
        let spans = Self {
            family_end,
            service_end,
            version_end,
        };
        let empty =
            family_end == 1 || service_end == family_end + 1 || version_end == service_end + 1;
        (!empty).then_some(spans)
    }

    fn path(self, path: &str) -> RoutePath<'_> {
        RoutePath {
            family: &path[1..self.family_end],
            service: &path[self.family_end + 1..self.service_end],
            version: &path[self.service_end + 1..self.version_end],
            rest: &path[self.version_end..],
        }
    }
}

impl<'s> Target<'s> {
    pub fn of(snap: &'s Snapshot, path: &str, today: time::Date) -> Self {
        let spans = Spans::of(path);
        let resolved = spans.map(|s| {
            let p = s.path(path);
            snap.catalogue
                .resolve(p.family, p.service, p.version, today)
        });
        Self { spans, resolved }
    }

    /// The protocol of the service addressed, when the service exists.
    pub fn protocol(&self) -> Option<Protocol> {
        match &self.resolved {
            Some(Ok(r)) => Some(r.protocol()),
            Some(Err(e)) => e.protocol(),
            None => None,
        }
    }

    /// The parts of `path` (the request's, as given to [`Target::of`]).
    pub fn path<'p>(&self, path: &'p str) -> Option<RoutePath<'p>> {
        self.spans.map(|s| s.path(path))
    }

    /// What the catalogue says of the path: `None` when it names no service version.
    pub fn into_resolved(self) -> Option<Result<catalogue::Route<'s>, RouteError>> {
        self.resolved
    }
}

/// The gateway path split into its routing parts: `/{family}/{service}/{version}{rest}`.
#[derive(Debug, PartialEq, Eq)]
pub struct RoutePath<'a> {
    pub family: &'a str,
    pub service: &'a str,
    pub version: &'a str,
    /// Empty or starting with `/`.
    pub rest: &'a str,
}

/// Splits a request path; `None` when it has fewer than three segments.
pub fn split_path(path: &str) -> Option<RoutePath<'_>> {
    Spans::of(path).map(|s| s.path(path))
}

/// The path and query a call is forwarded to: the version's base path, the rest of the
/// gateway path, and the query string unchanged.
pub fn upstream_path(
    base: &Uri,
    rest: &str,
    query: Option<&str>,
) -> Result<PathAndQuery, http::Error> {
    let base_path = base.path().trim_end_matches('/');
    // Exactly the length needed: the buffer becomes the path's own without a copy.
    let path_len = (base_path.len() + rest.len()).max(1);
    let mut pq = String::with_capacity(path_len + query.map_or(0, |q| q.len() + 1));
    pq.push_str(base_path);
    pq.push_str(rest);
    if pq.is_empty() {
        pq.push('/');
    }
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    Ok(PathAndQuery::try_from(pq)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The whole upstream URL of a call, as the provider sees it.
    fn upstream_uri(base: &Uri, rest: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut parts = base.clone().into_parts();
        parts.path_and_query = Some(upstream_path(base, rest, query)?);
        Ok(Uri::from_parts(parts)?)
    }

    #[test]
    fn splits_gateway_paths() {
        assert_eq!(
            split_path("/person/getPerson/v3/persons/123"),
            Some(RoutePath {
                family: "person",
                service: "getPerson",
                version: "v3",
                rest: "/persons/123"
            })
        );
        assert_eq!(
            split_path("/person/getPerson/v3"),
            Some(RoutePath {
                family: "person",
                service: "getPerson",
                version: "v3",
                rest: ""
            })
        );
        assert_eq!(split_path("/person/getPerson/v3/").unwrap().rest, "/");
        assert_eq!(split_path("/person/getPerson"), None);
        assert_eq!(split_path("/person/getPerson/"), None);
        assert_eq!(split_path("//x/v1"), None);
        assert_eq!(split_path("/"), None);
    }

    #[test]
    fn maps_to_upstream_urls() {
        let base: Uri = "https://rrn.example/person/v3".parse().unwrap();
        assert_eq!(
            upstream_uri(&base, "/persons/1", Some("a=1&b=2")).unwrap(),
            "https://rrn.example/person/v3/persons/1?a=1&b=2"
        );
        assert_eq!(
            upstream_uri(&base, "", None).unwrap(),
            "https://rrn.example/person/v3"
        );
        let root: Uri = "http://127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            upstream_uri(&root, "", None).unwrap().to_string(),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(
            upstream_uri(&root, "/data", None).unwrap().to_string(),
            "http://127.0.0.1:8080/data"
        );
        let slash: Uri = "http://h/base/".parse().unwrap();
        assert_eq!(
            upstream_uri(&slash, "/x", None).unwrap().to_string(),
            "http://h/base/x"
        );
    }
}
