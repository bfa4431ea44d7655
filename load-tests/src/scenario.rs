//! What can be measured: scenarios, the targets each one drives and the ratios it reports.
//!
//! A target is one URL on one server, driven with one kind of request. A scenario is a set
//! of targets and the comparisons between them; every target of every chosen scenario is
//! measured in each round, one after the other, so that a ratio compares two targets
//! measured minutes apart at most, under the same drift of the machine.

use clap::ValueEnum;

/// Which audit trail an fsp runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Audit {
    /// `[audit] backend = "none"`, `fail_closed = false`.
    None,
    /// Segment files, written ahead (`fail_closed = true`).
    File,
    /// PostgreSQL in a schema made for the run, written ahead.
    Postgres,
}

/// Which throttling an fsp runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Throttle {
    /// No limit configured: nothing is counted.
    Off,
    /// Local token buckets, limits far above the load (every call admitted, the cost measured).
    Local,
    /// Exact throttling through Redis, same limits, `on_backend_error = "deny"`.
    Redis,
}

/// One fsp process: a name and the features it runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fsp {
    pub name: &'static str,
    pub audit: Audit,
    pub throttle: Throttle,
    /// OpenTelemetry traces at a 1 % sampling ratio, exported to the program's own sink.
    pub telemetry: bool,
}

/// Every feature on: the file trail written ahead, local throttling, telemetry at 1 %.
pub const FSP_ALL: Fsp = Fsp {
    name: "fsp",
    audit: Audit::File,
    throttle: Throttle::Local,
    telemetry: true,
};
const FSP_NO_AUDIT: Fsp = Fsp {
    name: "fsp-no-audit",
    audit: Audit::None,
    throttle: Throttle::Local,
    telemetry: false,
};
const FSP_AUDIT_FILE: Fsp = Fsp {
    name: "fsp-audit-file",
    audit: Audit::File,
    throttle: Throttle::Local,
    telemetry: false,
};
const FSP_AUDIT_POSTGRES: Fsp = Fsp {
    name: "fsp-audit-pg",
    audit: Audit::Postgres,
    throttle: Throttle::Local,
    telemetry: false,
};
const FSP_NO_THROTTLE: Fsp = Fsp {
    name: "fsp-no-throttle",
    audit: Audit::None,
    throttle: Throttle::Off,
    telemetry: false,
};
const FSP_REDIS: Fsp = Fsp {
    name: "fsp-redis",
    audit: Audit::None,
    throttle: Throttle::Redis,
    telemetry: false,
};
const FSP_TELEMETRY: Fsp = Fsp {
    name: "fsp-telemetry",
    audit: Audit::None,
    throttle: Throttle::Local,
    telemetry: true,
};

/// The process that terminates the target's mTLS connections (whose CPU is charged to it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Server {
    /// The upstream nginx itself, on its mTLS port (the `direct` baseline).
    Upstream,
    /// nginx as an mTLS reverse proxy in front of the upstream.
    Nginx,
    Fsp(Fsp),
}

/// What the target's requests carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// GET of the upstream's 1 KiB JSON document.
    Get1KiB,
    /// GET of the upstream's 1 MiB file.
    Get1MiB,
    /// POST of 1 KiB of JSON, answered by the 1 KiB document.
    PostJson,
    /// POST of a 1 KiB SOAP envelope, answered by a 1 KiB envelope.
    PostSoap,
}

/// One URL on one server, driven one way.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: &'static str,
    pub server: Server,
    /// The path on the server (fsp paths name family, service and version).
    pub path: &'static str,
    pub request: Request,
    pub http2: bool,
    /// A new connection, so a new TLS handshake, for every call.
    pub churn: bool,
}

impl Target {
    /// The audit trail of an fsp target; `None` for nginx and direct.
    pub fn audit(&self) -> Option<Audit> {
        match self.server {
            Server::Fsp(v) => Some(v.audit),
            _ => None,
        }
    }
}

/// A ratio between two targets' medians, with the target it must meet if any.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub label: &'static str,
    pub num: &'static str,
    pub den: &'static str,
    /// Throughput ratio at least this.
    pub min_rps: Option<f64>,
    /// p99 ratio at most this.
    pub max_p99: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum ScenarioName {
    /// direct, nginx as an mTLS proxy, and fsp with every feature on (file trail written
    /// ahead, local throttling, telemetry at 1 %); GET, 1 KiB answer, HTTP/1.1 keep-alive.
    Proxy,
    /// fsp with the file trail written ahead against fsp without a trail.
    AuditFile,
    /// fsp with the PostgreSQL trail written ahead against fsp without a trail.
    AuditPostgres,
    /// fsp with exact throttling through Redis against fsp without throttling.
    ThrottleRedis,
    /// fsp with telemetry sampled at 1 % against fsp without telemetry.
    Telemetry,
    /// SOAP POSTs with the XML checks on and off, and REST POSTs of the same size.
    Soap,
    /// nginx and fsp (every feature on) over HTTP/2.
    Http2,
    /// nginx and fsp (every feature on) answering 1 MiB.
    #[value(name = "body-1mib")]
    Body1Mib,
    /// nginx and fsp (every feature on) with a new TLS handshake per call.
    Churn,
    /// Every scenario above.
    All,
}

impl ScenarioName {
    pub fn every() -> [ScenarioName; 9] {
        use ScenarioName::*;
        [
            Proxy,
            AuditFile,
            AuditPostgres,
            ThrottleRedis,
            Telemetry,
            Soap,
            Http2,
            Body1Mib,
            Churn,
        ]
    }

    pub fn key(self) -> &'static str {
        use ScenarioName::*;
        match self {
            Proxy => "proxy",
            AuditFile => "audit-file",
            AuditPostgres => "audit-postgres",
            ThrottleRedis => "throttle-redis",
            Telemetry => "telemetry",
            Soap => "soap",
            Http2 => "http2",
            Body1Mib => "body-1mib",
            Churn => "churn",
            All => "all",
        }
    }
}

const REST: &str = "/bench/echo/v1/data";

const fn target(name: &'static str, server: Server, path: &'static str) -> Target {
    Target {
        name,
        server,
        path,
        request: Request::Get1KiB,
        http2: false,
        churn: false,
    }
}

const fn compare(
    label: &'static str,
    num: &'static str,
    den: &'static str,
    min_rps: Option<f64>,
    max_p99: Option<f64>,
) -> Comparison {
    Comparison {
        label,
        num,
        den,
        min_rps,
        max_p99,
    }
}

/// fsp with a feature on against fsp with it off (REST GETs); the target is named after
/// its fsp, and the throughput ratio must be at least `min`.
fn on_off(label: &'static str, on: Fsp, off: Fsp, min: f64) -> (Vec<Target>, Vec<Comparison>) {
    (
        vec![
            target(off.name, Server::Fsp(off), REST),
            target(on.name, Server::Fsp(on), REST),
        ],
        vec![compare(label, on.name, off.name, Some(min), None)],
    )
}

/// nginx and fsp driven the same way, the ratio reported without a target.
fn versus_nginx(label: &'static str, nginx: Target, fsp: Target) -> (Vec<Target>, Vec<Comparison>) {
    let c = compare(label, fsp.name, nginx.name, None, None);
    (vec![nginx, fsp], vec![c])
}

/// The targets and comparisons of one scenario.
pub fn plan(name: ScenarioName) -> (Vec<Target>, Vec<Comparison>) {
    use ScenarioName::*;
    let fsp = Server::Fsp(FSP_ALL);
    match name {
        Proxy => (
            vec![
                target("direct", Server::Upstream, "/data"),
                target("nginx", Server::Nginx, "/data"),
                target("fsp", fsp, REST),
            ],
            vec![
                compare(
                    "fsp (every feature) / nginx",
                    "fsp",
                    "nginx",
                    Some(1.2),
                    Some(1.0),
                ),
                compare("fsp (every feature) / direct", "fsp", "direct", None, None),
                compare("nginx / direct", "nginx", "direct", None, None),
            ],
        ),
        AuditFile => on_off(
            "audit file (written ahead) on / off",
            FSP_AUDIT_FILE,
            FSP_NO_AUDIT,
            0.85,
        ),
        AuditPostgres => on_off(
            "audit PostgreSQL (written ahead) on / off",
            FSP_AUDIT_POSTGRES,
            FSP_NO_AUDIT,
            0.8,
        ),
        ThrottleRedis => on_off("throttling Redis on / off", FSP_REDIS, FSP_NO_THROTTLE, 0.9),
        Telemetry => on_off(
            "telemetry (1 %) on / off",
            FSP_TELEMETRY,
            FSP_NO_AUDIT,
            0.95,
        ),
        Soap => {
            let on = Server::Fsp(FSP_NO_AUDIT);
            let post = |name, path, request| Target {
                request,
                ..target(name, on, path)
            };
            (
                vec![
                    post("rest-post", REST, Request::PostJson),
                    post("soap", "/bsoap/soap/v1", Request::PostSoap),
                    post("soap-no-checks", "/bsoapoff/soapoff/v1", Request::PostSoap),
                ],
                vec![
                    compare(
                        "SOAP XML checks on / off",
                        "soap",
                        "soap-no-checks",
                        Some(0.9),
                        None,
                    ),
                    compare("SOAP / REST POST", "soap", "rest-post", None, None),
                ],
            )
        }
        Http2 => versus_nginx(
            "fsp / nginx over HTTP/2",
            Target {
                http2: true,
                ..target("nginx-h2", Server::Nginx, "/data")
            },
            Target {
                http2: true,
                ..target("fsp-h2", fsp, REST)
            },
        ),
        Body1Mib => versus_nginx(
            "fsp / nginx answering 1 MiB",
            Target {
                request: Request::Get1MiB,
                ..target("nginx-1mib", Server::Nginx, "/big")
            },
            Target {
                request: Request::Get1MiB,
                ..target("fsp-1mib", fsp, "/bench/echo/v1/big")
            },
        ),
        Churn => versus_nginx(
            "fsp / nginx, a handshake per call",
            Target {
                churn: true,
                ..target("nginx-churn", Server::Nginx, "/data")
            },
            Target {
                churn: true,
                ..target("fsp-churn", fsp, REST)
            },
        ),
        All => {
            let (mut targets, mut comparisons) = (Vec::new(), Vec::new());
            for s in ScenarioName::every() {
                let (t, c) = plan(s);
                targets.extend(t);
                comparisons.extend(c);
            }
            (targets, comparisons)
        }
    }
}

impl ScenarioName {
    fn every_but_all(self) -> Vec<ScenarioName> {
        if self == ScenarioName::All {
            Self::every().to_vec()
        } else {
            vec![self]
        }
    }
}

/// The union of the chosen scenarios: each target once, in order of first mention.
pub fn plan_all(names: &[ScenarioName]) -> (Vec<Target>, Vec<Comparison>) {
    let (mut targets, mut comparisons): (Vec<Target>, Vec<Comparison>) = (Vec::new(), Vec::new());
    for s in names.iter().flat_map(|n| n.every_but_all()) {
        let (t, c) = plan(s);
        for t in t {
            if !targets.iter().any(|x| x.name == t.name) {
                targets.push(t);
            }
        }
        for c in c {
            if !comparisons.iter().any(|x| x.label == c.label) {
                comparisons.push(c);
            }
        }
    }
    (targets, comparisons)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_comparison_names_targets_of_its_scenario_and_names_are_unique() {
        for s in ScenarioName::every() {
            let (targets, comparisons) = plan(s);
            for c in &comparisons {
                for side in [c.num, c.den] {
                    assert!(
                        targets.iter().any(|t| t.name == side),
                        "{}: {} is not one of its targets",
                        s.key(),
                        side
                    );
                }
            }
        }
        let (targets, _) = plan_all(&[ScenarioName::All]);
        for t in &targets {
            let same: Vec<_> = targets.iter().filter(|x| x.name == t.name).collect();
            assert_eq!(same.len(), 1, "{} listed twice", t.name);
        }
        // A name means one server and one request everywhere it is used.
        for a in ScenarioName::every() {
            for b in ScenarioName::every() {
                for x in plan(a).0 {
                    for y in plan(b).0.into_iter().filter(|y| y.name == x.name) {
                        assert_eq!(x.server, y.server, "{}", x.name);
                        assert_eq!(x.request, y.request, "{}", x.name);
                        assert_eq!(x.path, y.path, "{}", x.name);
                    }
                }
            }
        }
    }
}
