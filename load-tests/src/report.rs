//! The table, the ratios and `latest.json`: medians over the rounds of each target.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::scenario::{Audit, Comparison, Server, Target, Throttle};
use crate::{Args, Measured};

#[derive(Debug)]
pub struct Context<'a> {
    pub args: &'a Args,
    pub fsp_version: &'a str,
    pub loadavg: &'a str,
    pub git: String,
    pub clock_ticks: u64,
    /// One synchronous direct 4 KiB write to the disk the file trails are on (see
    /// [`crate::disk`]), when a target writes one.
    pub disk_write: Option<std::time::Duration>,
}

/// One run, as read from oha's results and the CPU counters.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    round: u32,
    raw: String,
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    front_cpu_us_per_req: Option<f64>,
    front_cores: Option<f64>,
    upstream_cpu_us_per_req: Option<f64>,
    loadgen_cores: Option<f64>,
    other_cores: Option<f64>,
    status_codes: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

/// A target's medians.
#[derive(Debug, Clone, serde::Serialize)]
struct Summary {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    front_cpu_us_per_req: Option<f64>,
    front_cores: Option<f64>,
    upstream_cpu_us_per_req: Option<f64>,
    loadgen_cores: Option<f64>,
    other_cores_max: Option<f64>,
    requests: u64,
    all_200: bool,
    runs: Vec<Run>,
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn run_of(m: &Measured, t: &Target, ticks: u64, results: &Path) -> Run {
    let o = &m.oha;
    let codes = counts(&o["statusCodeDistribution"]);
    let errors = counts(&o["errorDistribution"]);
    let requests = codes.values().sum::<u64>() + errors.values().sum::<u64>();
    let elapsed = o["summary"]["total"].as_f64().unwrap_or(0.0);
    let secs = |t: u64| t as f64 / ticks as f64;
    let per_req = |s: f64| (requests > 0).then(|| s * 1e6 / requests as f64);
    let per_sec = |s: f64| (elapsed > 0.0).then(|| s / elapsed);
    let ours = secs(m.servers_ticks) + secs(m.loadgen_ticks);
    Run {
        round: m.round,
        raw: m
            .raw
            .strip_prefix(results)
            .unwrap_or(&m.raw)
            .display()
            .to_string(),
        requests,
        rps: o["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_ms: o["latencyPercentiles"]["p50"].as_f64().unwrap_or(0.0) * 1e3,
        p99_ms: o["latencyPercentiles"]["p99"].as_f64().unwrap_or(0.0) * 1e3,
        front_cpu_us_per_req: per_req(secs(m.front_ticks)),
        front_cores: per_sec(secs(m.front_ticks)),
        upstream_cpu_us_per_req: if t.server == Server::Upstream {
            None
        } else {
            per_req(secs(m.upstream_ticks))
        },
        loadgen_cores: per_sec(secs(m.loadgen_ticks)),
        other_cores: per_sec((secs(m.host_ticks) - ours).max(0.0)),
        status_codes: codes,
        errors,
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn summarise(runs: Vec<Run>) -> Summary {
    let med = |f: fn(&Run) -> Option<f64>| median(runs.iter().filter_map(f).collect());
    Summary {
        rps: med(|r| Some(r.rps)).unwrap_or(0.0),
        p50_ms: med(|r| Some(r.p50_ms)).unwrap_or(0.0),
        p99_ms: med(|r| Some(r.p99_ms)).unwrap_or(0.0),
        front_cpu_us_per_req: med(|r| r.front_cpu_us_per_req),
        front_cores: med(|r| r.front_cores),
        upstream_cpu_us_per_req: med(|r| r.upstream_cpu_us_per_req),
        loadgen_cores: med(|r| r.loadgen_cores),
        other_cores_max: runs
            .iter()
            .filter_map(|r| r.other_cores)
            .max_by(f64::total_cmp),
        requests: runs.iter().map(|r| r.requests).sum(),
        all_200: runs.iter().all(|r| {
            r.requests > 0 && r.requests == r.status_codes.get("200").copied().unwrap_or(0)
        }),
        runs,
    }
}

fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

fn f(v: Option<f64>, width: usize, prec: usize) -> String {
    match v {
        Some(v) => format!("{v:>width$.prec$}"),
        None => format!("{:>width$}", "-"),
    }
}

/// Prints the table and the comparisons, writes `latest.json` (and a dated copy); true
/// when every response of every run was 200.
pub fn report(
    cx: &Context,
    targets: &[Target],
    comparisons: &[Comparison],
    results: &[Vec<Measured>],
) -> Result<bool> {
    let a = cx.args;
    let mut per: BTreeMap<&str, Summary> = BTreeMap::new();
    let mut problems = Vec::new();
    for (t, ms) in targets.iter().zip(results) {
        let runs: Vec<Run> = ms
            .iter()
            .map(|m| run_of(m, t, cx.clock_ticks, &a.results))
            .collect();
        for r in &runs {
            let ok = r.status_codes.get("200").copied().unwrap_or(0);
            if r.requests == 0 {
                problems.push(format!(
                    "{} round {}: no call counted (did oha's JSON change? see {})",
                    t.name, r.round, r.raw
                ));
            } else if ok != r.requests {
                problems.push(format!(
                    "{} round {}: {} of {} responses were not 200 (status codes {:?}, errors {:?})",
                    t.name,
                    r.round,
                    r.requests - ok,
                    r.requests,
                    r.status_codes,
                    r.errors
                ));
            }
        }
        per.insert(t.name, summarise(runs));
    }

    let agg = if a.rounds > 1 {
        format!("median of {} rounds", a.rounds)
    } else {
        "1 round".into()
    };
    println!();
    println!(
        "mTLS, c={}, {} s per target ({agg}), load average before: {}, {}",
        a.concurrency, a.duration, cx.loadavg, cx.fsp_version
    );
    println!(
        "(GET of 1 KiB JSON over HTTP/1.1 keep-alive unless the name says otherwise: -h2 HTTP/2, \
         -1mib a 1 MiB answer, -churn a handshake per call, *post and soap* POSTs of 1 KiB)"
    );
    println!();
    println!(
        "{:<17} {:>9} {:>8} {:>8} {:>9} {:>4} {:>10} {:>6} {:>12} {:>9} {:>6}",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "requests",
        "200",
        "CPU us/req",
        "cores",
        "upstr us/req",
        "oha cores",
        "other"
    );
    println!("{}", "-".repeat(110));
    for t in targets {
        let p = &per[t.name];
        println!(
            "{:<17} {:>9.0} {:>8.3} {:>8.3} {:>9} {:>4} {} {} {} {} {}",
            t.name,
            p.rps,
            p.p50_ms,
            p.p99_ms,
            p.requests,
            if p.all_200 { "all" } else { "NO" },
            f(p.front_cpu_us_per_req, 10, 1),
            f(p.front_cores, 6, 2),
            f(p.upstream_cpu_us_per_req, 12, 1),
            f(p.loadgen_cores, 9, 2),
            f(p.other_cores_max, 6, 2)
        );
    }
    println!(
        "(CPU us/req, cores: the process terminating mTLS - the upstream nginx for direct, the \
         proxy nginx, or the fsp - per request and on average; upstr: the upstream nginx behind \
         it; other: cores used outside the benchmark, worst round, PostgreSQL's and Redis's \
         included for the targets that use them)"
    );
    // PostgreSQL and Redis work for the targets that use them: their CPU shows as "other".
    let external = |t: &Target| matches!(t.server, Server::Fsp(v) if v.audit == Audit::Postgres || v.throttle == Throttle::Redis);
    let noisy: Vec<&str> = targets
        .iter()
        .filter(|t| !external(t) && per[t.name].other_cores_max.unwrap_or(0.0) > 0.25)
        .map(|t| t.name)
        .collect();
    if !noisy.is_empty() {
        println!(
            "WARNING: other processes used more than 0.25 core during {}: figures are disturbed; \
             run again on an idle machine",
            noisy.join(", ")
        );
    }
    println!();
    println!(
        "{:<44} {:>10} {:>8} {:>9}   target",
        "ratio (medians)", "throughput", "p99", "CPU/call"
    );
    let mut checks = Vec::new();
    for c in comparisons {
        let (n, d) = (&per[c.num], &per[c.den]);
        let rps = div(Some(n.rps), Some(d.rps));
        let p99 = div(Some(n.p99_ms), Some(d.p99_ms));
        let cpu = div(n.front_cpu_us_per_req, d.front_cpu_us_per_req);
        let comparable = n.all_200 && d.all_200;
        let mut verdicts = Vec::new();
        let mut pass = true;
        if let Some(min) = c.min_rps {
            verdicts.push(format!("throughput >= {min}"));
            pass &= rps.is_some_and(|r| r >= min);
        }
        if let Some(max) = c.max_p99 {
            verdicts.push(format!("p99 <= {max}"));
            pass &= p99.is_some_and(|r| r <= max);
        }
        let verdict = if verdicts.is_empty() {
            String::new()
        } else if !comparable {
            format!("{}  INVALID (not all 200)", verdicts.join(", "))
        } else {
            format!(
                "{}  {}",
                verdicts.join(", "),
                if pass { "PASS" } else { "MISS" }
            )
        };
        println!(
            "{:<44} {} {} {}   {verdict}",
            c.label,
            f(rps, 10, 3),
            f(p99, 8, 3),
            f(cpu, 9, 3)
        );
        // The same ratio round by round (the two runs of a round are minutes apart at
        // most): its spread says how far the medians' ratio can be trusted.
        let per_round: Vec<f64> = n
            .runs
            .iter()
            .zip(&d.runs)
            .filter(|(a, b)| a.round == b.round && b.rps > 0.0)
            .map(|(a, b)| a.rps / b.rps)
            .collect();
        // Printed where a target is at stake: a verdict near its bound, or one round far
        // from the others (the machine drifted), shows here.
        if c.min_rps.is_some() && per_round.len() > 1 {
            let rounds: Vec<String> = per_round.iter().map(|r| format!("{r:.3}")).collect();
            println!(
                "{:<44} {:>10}   (throughput, each round's own ratio)",
                "  round by round",
                rounds.join(" ")
            );
        }
        // A file trail written ahead against none: what the disk leaves it at best, at
        // this concurrency.
        let audit = |name: &str| {
            targets
                .iter()
                .find(|t| t.name == name)
                .and_then(Target::audit)
        };
        let file_trail = audit(c.num) == Some(Audit::File) && audit(c.den) == Some(Audit::None);
        let ceiling = match cx.disk_write {
            Some(w) if file_trail => {
                let ceiling = crate::disk::write_ahead_ceiling(w, d.rps, a.concurrency);
                println!(
                    "{:<44} {ceiling:>10.3}   (a call waits for one {} us disk write: c / (c + write x {} req/s))",
                    "  at most, from the disk alone",
                    w.as_micros(),
                    d.rps.round()
                );
                Some(ceiling)
            }
            _ => None,
        };
        checks.push(json!({
            "label": c.label, "numerator": c.num, "denominator": c.den,
            "rps": rps, "p99": p99, "cpu_per_req": cpu, "disk_ceiling": ceiling,
            "rps_by_round": per_round, "rps_median_of_rounds": median(per_round.clone()),
            "min_rps": c.min_rps, "max_p99": c.max_p99,
            "pass": if verdicts.is_empty() || !comparable { Value::Null } else { Value::Bool(pass) },
        }));
    }

    let summary = json!({
        "generated_at": time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        "git": cx.git,
        "host": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_before": cx.loadavg,
            "disk_sync_write_us": cx.disk_write.map(|w| w.as_secs_f64() * 1e6),
        },
        "fsp": cx.fsp_version,
        "workload": {
            "tls": "mTLS (EC P-256)", "concurrency": a.concurrency, "duration_s": a.duration,
            "warmup_s": a.warmup, "rounds": a.rounds,
            "scenarios": a.scenario.iter().map(|s| s.key()).collect::<Vec<_>>(),
        },
        "targets": per,
        "comparisons": checks,
        "valid": problems.is_empty(),
        "problems": problems,
    });
    let latest = a.results.join("latest.json");
    let text = serde_json::to_string_pretty(&summary)? + "\n";
    fs::write(&latest, &text).with_context(|| format!("cannot write {}", latest.display()))?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let _ = fs::write(a.results.join(format!("summary-{stamp}.json")), &text);
    println!();
    println!(
        "summary: {}   raw oha results: {}/",
        latest.display(),
        a.results.join("raw").display()
    );
    if !problems.is_empty() {
        println!();
        println!("INVALID RUN: not every response was 200:");
        for p in &problems {
            println!("  {p}");
        }
    }
    Ok(problems.is_empty())
}
