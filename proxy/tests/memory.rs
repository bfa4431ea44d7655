//! Memory benchmarks (issue 15's targets), run explicitly with a release build:
//! `cargo nextest run --release -p proxy --test memory --run-ignored only --no-capture`.
//! They print what they measured; the targets are their assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// Idle consumer connections held open (handshake done, no request yet).
const IDLE: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: 10 000 mTLS connections; run with --release --run-ignored only"]
async fn ten_thousand_idle_mtls_connections_fit_in_512_mib() {
    let pki = Pki::new();
    let up = upstream().await;
    let (port, admin) = (free_port(), free_port());
    let config = write_config_with(
        &pki,
        up,
        port,
        admin,
        // Handshakes come a hundred at a time from one address, past half of
        // max_connections: more than the default bound on one address's handshakes.
        "max_connections = 12000\nmax_connections_per_ip = 12000\nmax_anonymous_connections_per_ip = 128\nheader_read_timeout = \"300s\"",
        "",
        "",
    );
    let gw = Gateway::spawn_with_nofile(&config, port, admin, 20_000).await;
    let (_, before) = gw.memory_kib();
    let mut open = Vec::with_capacity(IDLE);
    // Handshakes a hundred at a time.
    while open.len() < IDLE {
        let batch: Vec<_> = (0..100)
            .map(|_| {
                let pki = &pki;
                async move { tls_connect(pki, Some(&pki.consumer), port, b"http/1.1").await }
            })
            .collect();
        for c in futures_util::future::join_all(batch).await {
            open.push(c.expect("a handshake failed"));
        }
    }
    // Let the gateway settle (session tickets sent, buffers released).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (peak, rss) = gw.memory_kib();
    let per = (rss.saturating_sub(before)) as f64 * 1024.0 / IDLE as f64;
    eprintln!(
        "{IDLE} idle mTLS connections: gateway RSS {before} KiB -> {rss} KiB (peak {peak} KiB), {per:.0} bytes per connection"
    );
    // Still serving.
    let c = client(&pki, Some(&pki.consumer), false);
    let (status, _, _, _) = send(
        &c,
        get(&format!("https://localhost:{port}/person/getPerson/v3/x")),
    )
    .await
    .unwrap();
    assert_eq!(status, http::StatusCode::OK);
    assert!(
        rss < 512 * 1024,
        "gateway RSS {rss} KiB with {IDLE} idle connections"
    );
    drop(open);
}
