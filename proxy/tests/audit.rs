//! The audit trail's hash chain, end to end: records written by a running gateway
//! verify with `fsp audit verify`; one altered, removed or swapped record makes it exit
//! 4 naming that record; a restarted gateway continues the chain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use http::StatusCode;

/// `fsp audit <command> --config <config> <args>`.
fn fsp_audit(command: &str, config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fsp"))
        .args(["audit", command, "--config"])
        .arg(config)
        .args(args)
        .env("FSP_LOG", "warn")
        .output()
        .unwrap()
}

/// `fsp audit verify` on `config`: exit code and what it printed.
fn verify(config: &Path) -> (i32, String) {
    let out = fsp_audit("verify", config, &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

async fn calls(gw: &Gateway, pki: &Pki, n: usize) {
    let c = client(pki, Some(&pki.consumer), false);
    for i in 0..n {
        // Allowed calls and refused ones: both are in the trail.
        let path = if i % 3 == 2 {
            "/person/getPerson/v1/retired"
        } else {
            "/person/getPerson/v3/p"
        };
        let (status, ..) = send(&c, get(&gw.url(path))).await.unwrap();
        assert!(status == StatusCode::OK || status == StatusCode::GONE);
    }
}

#[tokio::test]
async fn the_trail_verifies_and_any_altered_removed_or_swapped_record_is_named() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let mut gw = Gateway::start(&config).await;
    calls(&gw, &pki, 6).await;
    gw.stop();
    // A restarted gateway continues the same chain.
    let mut gw = Gateway::start(&config).await;
    calls(&gw, &pki, 3).await;
    gw.stop();

    let (code, out) = verify(&config);
    assert_eq!(code, 0, "{out}");
    // Nine calls: six forwarded (a request line, then its outcome), three refused (one
    // line each).
    assert!(out.contains("15 records"), "{out}");
    let (file, lines) = trail(&pki);
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records[0]["prev_hash"].is_null());
    for pair in records.windows(2) {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"]);
        assert_eq!(pair[1]["hash"].as_str().unwrap().len(), 64);
    }
    let id = |i: usize| records[i]["message_id"].as_str().unwrap().to_owned();
    let write = |lines: &[String]| std::fs::write(&file, lines.join("\n") + "\n").unwrap();

    // Altered: one field of the fifth record.
    let mut altered = lines.clone();
    altered[4] = altered[4].replace("\"decision\":\"", "\"decision\":\"X");
    write(&altered);
    let (code, out) = verify(&config);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains(&id(4)) && out.contains("altered"), "{out}");

    // Removed: the third record; the fourth no longer follows the second.
    let mut removed = lines.clone();
    removed.remove(2);
    write(&removed);
    let (code, out) = verify(&config);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains(&id(3)), "{out}");

    // Swapped: the second and third.
    let mut swapped = lines.clone();
    swapped.swap(1, 2);
    write(&swapped);
    let (code, out) = verify(&config);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains(&id(2)), "{out}");

    // A line cut short (as by a crash mid-write) is named too.
    let mut torn = lines.clone();
    let cut = torn[7].len() / 2;
    torn[7].truncate(cut);
    write(&torn);
    let (code, out) = verify(&config);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains(":8 is not a whole audit record"), "{out}");

    // A message id made to drive the terminal (retitle it, clear it) is printed inert.
    let mut escaped = lines.clone();
    escaped[4] = escaped[4].replacen(&id(4), "\\u001b]0;pwned\\u0007\\u001b[2J", 1);
    write(&escaped);
    let (code, out) = verify(&config);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("?]0;pwned??[2J") && !out.contains('\u{1b}') && !out.contains('\u{7}'),
        "{out:?}"
    );

    write(&lines);
    assert_eq!(verify(&config).0, 0);
}

#[tokio::test]
async fn a_trail_file_removed_under_the_gateway_makes_it_unready_and_refuse_calls() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let gw = Gateway::start(&config).await;
    calls(&gw, &pki, 2).await;
    let readyz = || admin_request(gw.admin_port, "GET", "/readyz", None);
    assert_eq!(readyz().await.0, 200);
    // Once the records are on disk, the file is removed.
    let start = std::time::Instant::now();
    let file = loop {
        let dir = pki.path().join("audit");
        if let Some(f) = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.extension().is_some_and(|e| e == "jsonl")
                    && std::fs::read_to_string(p)
                        .is_ok_and(|t| common::record_lines(&t).count() == 4)
            })
        {
            break f;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    std::fs::remove_file(&file).unwrap();
    // Noticed within a second or so, without any call.
    let start = std::time::Instant::now();
    let ready = loop {
        let (status, r) = readyz().await;
        if status == 503 {
            break r;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "still ready: {r}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(ready.contains("removed or replaced"), "{ready}");
    // A fail-closed gateway forwards nothing it could not record safely.
    let c = client(&pki, Some(&pki.consumer), false);
    let (status, _, body, _) = send(&c, get(&gw.url("/person/getPerson/v3/p")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        String::from_utf8_lossy(&body).contains("FSP-AUDIT-UNAVAILABLE"),
        "{body:?}"
    );
}

/// `fsp audit export` with arguments: exit code and standard output.
fn export(config: &Path, args: &[&str]) -> (i32, String) {
    let out = fsp_audit("export", config, args);
    assert!(
        out.stderr.is_empty() || out.status.code() != Some(0),
        "{out:?}"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[tokio::test]
async fn export_writes_the_exchange_format_filtered() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let mut gw = Gateway::start(&config).await;
    let c = client(&pki, Some(&pki.consumer), false);
    let mut ids = Vec::new();
    for user in ["agent-1", "agent-2", "agent-1"] {
        let mut req = get(&gw.url("/person/getPerson/v3/p"));
        req.headers_mut()
            .insert("fsp-end-user", user.parse().unwrap());
        let (status, h, ..) = send(&c, req).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        ids.push(h["fsp-message-id"].to_str().unwrap().to_owned());
    }
    gw.stop();

    let (code, all) = export(&config, &[]);
    assert_eq!(code, 0);
    let records: Vec<serde_json::Value> = all
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r["hash"].as_str().is_some()));

    let (_, one) = export(&config, &["--message-id", &ids[1]]);
    assert_eq!(one.lines().count(), 1);
    assert!(one.contains(&ids[1]));

    let (_, agent) = export(&config, &["--end-user", "agent-1", "--format", "csv"]);
    let mut rows = agent.lines();
    assert!(
        rows.next()
            .unwrap()
            .starts_with("message_id,timestamp,consumer,")
    );
    assert_eq!(rows.count(), 2);

    let (_, none) = export(&config, &["--from", "2999-01-01"]);
    assert!(none.is_empty());
    let (_, consumer) = export(
        &config,
        &["--consumer", "ville-bxl", "--to", "2999-01-01T00:00:00Z"],
    );
    assert_eq!(consumer.lines().count(), 3);

    let (code, _) = export(&config, &["--from", "yesterday"]);
    assert_eq!(code, 2);
}

#[tokio::test]
async fn admin_audit_finds_a_call_by_its_message_id() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let gw = Gateway::start(&config).await;
    let c = client(&pki, Some(&pki.consumer), false);
    let mut req = get(&gw.url("/person/getPerson/v3/p"));
    req.headers_mut()
        .insert("fsp-end-user", "agent-9".parse().unwrap());
    let (status, h, ..) = send(&c, req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let id = h["fsp-message-id"].to_str().unwrap().to_owned();
    let token = std::fs::read_to_string(pki.path().join("admin-tokens")).unwrap();
    let token = token.lines().next().unwrap().to_owned();
    // The record is written as the call ends: a moment later at most.
    let start = std::time::Instant::now();
    let lookup = |path: String, token: Option<String>| async move {
        admin_request(gw.admin_port, "GET", &path, token.as_deref()).await
    };
    let found = loop {
        let (status, r) = lookup(format!("/admin/audit/{id}"), Some(token.clone())).await;
        if status == 200 {
            break r;
        }
        assert_eq!(status, 404, "{r}");
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "{r}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let body: serde_json::Value = serde_json::from_str(&found).unwrap();
    assert_eq!(body["message_id"], id.as_str());
    assert_eq!(body["end_user"], "agent-9");
    assert_eq!(body["hash"].as_str().unwrap().len(), 64);
    let other = "0190aaaa-0000-7000-8000-000000000000".to_owned();
    assert_eq!(
        lookup(format!("/admin/audit/{other}"), Some(token.clone()))
            .await
            .0,
        404
    );
    assert_eq!(
        lookup("/admin/audit/..%2f..%2fetc".into(), Some(token.clone()))
            .await
            .0,
        400
    );
    assert_eq!(lookup(format!("/admin/audit/{id}"), None).await.0, 401);
    let other_form = id.replace('-', "").to_uppercase();
    assert_eq!(
        lookup(format!("/admin/audit/{other_form}"), Some(token.clone()))
            .await
            .0,
        200
    );
    // A HEAD says whether the call exists (and is on the record as a HEAD).
    let (status, body) = admin_request(
        gw.admin_port,
        "HEAD",
        &format!("/admin/audit/{id}"),
        Some(&token),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, ""));
    let (_, metrics) = admin_request(gw.admin_port, "GET", "/metrics", None).await;
    assert!(
        metrics.contains("fsp_admin_calls_refused_total 1"),
        "the refused lookup is counted: {metrics}"
    );

    // Who read which call's record is on the record (a reading of personal data); the
    // refused lookup without a token is not (anyone could fill the trail with those).
    let mut gw = gw;
    assert_eq!(gw.stop().code(), Some(0));
    let records = audit_records(&pki);
    let readings: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["credential"] == "admin")
        .collect();
    // The readings while the record was not written yet, then the one that found it.
    let read = readings
        .iter()
        .take_while(|r| r["operation"] == format!("GET /admin/audit/{id}").as_str())
        .collect::<Vec<_>>();
    let last = read
        .last()
        .expect("the reading of the call's record is recorded");
    assert_eq!(last["detail"], "read the call's record");
    assert_eq!(last["credential_id"], "token#1");
    assert_eq!(last["status"], 200);
    assert_eq!(last["source_ip"], "127.0.0.1");
    // While the record was not written yet, the lookups that found nothing are on it too.
    assert!(read[..read.len() - 1].iter().all(|r| r["status"] == 404));
    let others: Vec<(&str, &str)> = readings[read.len()..]
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap(),
                r["detail"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        others,
        [
            (
                format!("GET /admin/audit/{other}").as_str(),
                "no call with this message id"
            ),
            ("GET /admin/audit/(not a message id)", "not a message id"),
            // Asked for in another form of the UUID: on the record as the trail writes it.
            (
                format!("GET /admin/audit/{id}").as_str(),
                "read the call's record"
            ),
            (
                format!("HEAD /admin/audit/{id}").as_str(),
                "read the call's record"
            ),
        ]
    );
}

#[tokio::test]
async fn stats_count_calls_by_version_and_consumer_from_the_daily_rollups() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let mut gw = Gateway::start(&config).await;
    let c = client(&pki, Some(&pki.consumer), false);
    for path in [
        "/person/getPerson/v3/p",
        "/person/getPerson/v3/p",
        "/person/getPerson/v2/p",
        "/person/getPerson/v1/retired",
    ] {
        send(&c, get(&gw.url(path))).await.unwrap();
    }
    gw.stop();

    // Who still calls the deprecated version, from the command line.
    let out = Command::new(env!("CARGO_BIN_EXE_fsp"))
        .args(["stats", "--config"])
        .arg(&config)
        .args(["--by", "version,consumer", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let calls = |version: &str| {
        rows.iter().find(|r| r["version"] == version).map(|r| {
            (
                r["consumer"].clone(),
                r["calls"].as_u64().unwrap(),
                r["errors"].as_u64().unwrap(),
            )
        })
    };
    let consumer = serde_json::json!("ville-bxl");
    assert_eq!(calls("v3"), Some((consumer.clone(), 2, 0)), "{rows:?}");
    assert_eq!(calls("v2"), Some((consumer.clone(), 1, 0)), "{rows:?}");
    // A refusal is a call, and an error.
    assert_eq!(calls("v1").map(|c| (c.1, c.2)), Some((1, 1)), "{rows:?}");
    for r in &rows {
        for key in ["p50_ms", "p95_ms", "p99_ms"] {
            assert!(r[key].as_f64().is_some(), "{r}");
        }
    }

    // The same, from a restarted gateway's admin API (its roll-ups are counted again from
    // the trail on start).
    let gw = Gateway::start(&config).await;
    let (status, body) = admin_request(
        gw.admin_port,
        "GET",
        "/admin/stats?by=code",
        Some("test-admin-token-0123456789"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let by_code = |code: &str| {
        rows.iter()
            .find(|r| r["code"] == code)
            .and_then(|r| r["calls"].as_u64())
    };
    assert_eq!(
        (by_code("200"), by_code("410")),
        (Some(3), Some(1)),
        "{rows:?}"
    );
    let (status, body) = admin_request(
        gw.admin_port,
        "GET",
        "/admin/stats?by=colour",
        Some("test-admin-token-0123456789"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}
