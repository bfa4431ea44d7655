//! Everything written before a run: the throw-away PKI (the project's development PKI),
//! the bodies, nginx's configurations and fsp's, the latter built from the gateway's own
//! configuration types and checked by its own loader before anything starts.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use proxy::config::raw::*;

use crate::scenario::{Audit, Fsp, Throttle};

/// The CN of the load generator's client certificate, and the consumer it identifies.
pub const CLIENT_CN: &str = "loadtest.example.be";
/// Sent with every call (and to nginx too, so that every target gets the same request).
pub const PURPOSE_HEADER: &str = "FSP-Purpose: benchmark";
pub const BIG_BYTES: usize = 1 << 20;

/// Files of the PKI, all PEM.
#[derive(Debug)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn write_private(path: &Path, content: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::io::Write::write_all(&mut f, content)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn write(path: &Path, content: &[u8]) -> Result<()> {
    fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))
}

/// A CA, a server certificate for localhost and the load generator's client certificate.
pub fn pki(dir: &Path) -> Result<Pki> {
    fs::create_dir(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711))?;
    let ca = certs::devpki::DevCa::new("fsp load-test CA").context("cannot make the CA")?;
    let server = ca
        .server(&["localhost", "127.0.0.1"])
        .context("cannot issue the server certificate")?;
    let client = ca
        .client(CLIENT_CN)
        .context("cannot issue the client certificate")?;
    let pki = Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    write(&pki.ca, ca.cert_pem().as_bytes())?;
    write(&pki.server_cert, server.cert_pem.as_bytes())?;
    write(&pki.client_cert, client.cert_pem.as_bytes())?;
    write_private(&pki.client_key, client.key_pem.as_bytes())?;
    // nginx's workers may run as another user than its master: they read the key at start
    // in the master, so 0600 is enough.
    write_private(&pki.server_key, server.key_pem.as_bytes())?;
    Ok(pki)
}

/// The upstream's JSON answer: exactly 1024 bytes, without `'`, `$` or `\` (so that nginx
/// can return it verbatim from its configuration).
pub fn json_body() -> String {
    let mut items = String::new();
    for i in 0..12 {
        if i > 0 {
            items.push(',');
        }
        let _ = write!(
            items,
            r#"{{"id":{i},"name":"item-{i}","active":{}}}"#,
            i % 2 == 0
        );
    }
    let head = format!(
        r#"{{"service":"bench/echo","version":"v1","status":"ok","items":[{items}],"padding":""#
    );
    let tail = r#""}"#;
    let pad = 1024 - head.len() - tail.len();
    format!("{head}{}{tail}", "x".repeat(pad))
}

/// The provider's 1 KiB SOAP answer: many small elements, as a real answer has.
pub fn soap_answer() -> String {
    let mut items = String::new();
    for i in 0..8 {
        let _ = write!(
            items,
            r#"<b:item id="{i}"><b:name>item-{i}</b:name><b:active>{}</b:active></b:item>"#,
            i % 2 == 0
        );
    }
    let head = r#"<?xml version="1.0" encoding="UTF-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><b:getItemsResponse xmlns:b="urn:bench">"#;
    let tail = "</b:getItemsResponse></soap:Body></soap:Envelope>";
    let pad = 1024 - head.len() - items.len() - tail.len() - "<b:padding></b:padding>".len();
    format!(
        "{head}{items}<b:padding>{}</b:padding>{tail}",
        "x".repeat(pad)
    )
}

/// The consumer's 1 KiB SOAP request, its purpose in the SOAP Header.
pub fn soap_request() -> String {
    let mut items = String::new();
    for i in 0..40 {
        let _ = write!(items, "<b:id>{i:04}</b:id>");
    }
    let head = concat!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">"#,
        r#"<soap:Header><fsp:Purpose xmlns:fsp="urn:be:fgov:fsp:1">benchmark</fsp:Purpose></soap:Header>"#,
        r#"<soap:Body><b:getItems xmlns:b="urn:bench">"#
    );
    let tail = "</b:getItems></soap:Body></soap:Envelope>";
    let pad = 1024 - head.len() - items.len() - tail.len() - "<b:note></b:note>".len();
    format!("{head}{items}<b:note>{}</b:note>{tail}", "n".repeat(pad))
}

/// The 1 MiB file the upstream serves (bytes that do not compress).
pub fn big_body() -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(0x6673_702d_6c6f_6164);
    let mut b = vec![0u8; BIG_BYTES];
    rng.fill(&mut b);
    b
}

fn nginx_common(dir: &Path, workers: u32) -> String {
    let d = dir.display();
    format!(
        "worker_processes {workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000;
    keepalive_timeout 75s;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path       {d}/tmp/proxy;
    fastcgi_temp_path     {d}/tmp/fastcgi;
    uwsgi_temp_path       {d}/tmp/uwsgi;
    scgi_temp_path        {d}/tmp/scgi;
    ssl_protocols TLSv1.2 TLSv1.3;
"
    )
}

fn mtls(pki: &Pki) -> String {
    format!(
        "        ssl_certificate        {};
        ssl_certificate_key    {};
        ssl_client_certificate {};
        ssl_verify_client      on;
",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display()
    )
}

/// The upstream: 1 KiB JSON on `/`, a 1 KiB SOAP answer on `/soap`, 1 MiB on `/big`, over
/// plain HTTP (behind the proxies) and over mTLS (the `direct` baseline).
pub fn nginx_upstream(dir: &Path, pki: &Pki, http_port: u16, tls_port: u16) -> Result<PathBuf> {
    fs::create_dir_all(dir.join("tmp"))?;
    fs::create_dir_all(dir.join("www"))?;
    write(&dir.join("www/big"), &big_body())?;
    let (json, soap) = (json_body(), soap_answer());
    for (what, s) in [("JSON", &json), ("SOAP", &soap)] {
        if s.contains(['\'', '$', '\\']) {
            bail!("the {what} body cannot be returned verbatim by nginx");
        }
    }
    let www = dir.join("www");
    let locations = format!(
        "        location / {{
            default_type application/json;
            return 200 '{json}';
        }}
        location /soap {{
            default_type text/xml;
            return 200 '{soap}';
        }}
        location = /big {{
            root {};
            default_type application/octet-stream;
        }}
",
        www.display()
    );
    let conf = format!(
        "{}    sendfile on;
    server {{
        listen 127.0.0.1:{http_port} backlog=4096;
{locations}    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl backlog=4096;
{}{locations}    }}
}}
",
        nginx_common(dir, 1),
        mtls(pki)
    );
    let path = dir.join("nginx.conf");
    write(&path, conf.as_bytes())?;
    Ok(path)
}

/// nginx as an mTLS reverse proxy (HTTP/1.1 and, by ALPN, HTTP/2), keep-alive upstream.
pub fn nginx_proxy(dir: &Path, pki: &Pki, port: u16, upstream_port: u16) -> Result<PathBuf> {
    fs::create_dir_all(dir.join("tmp"))?;
    let conf = format!(
        "{}    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 100000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2 backlog=4096;
{}        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            # Large answers are relayed through memory, never spilled to temporary files
            # (fsp streams them; nginx's default would write 1 MiB answers to disk).
            proxy_max_temp_file_size 0;
        }}
    }}
}}
",
        nginx_common(dir, 2),
        mtls(pki)
    );
    let path = dir.join("nginx.conf");
    write(&path, conf.as_bytes())?;
    Ok(path)
}

/// Where an fsp listens and what it talks to.
#[derive(Debug)]
pub struct FspPlace<'a> {
    pub dir: &'a Path,
    pub port: u16,
    pub admin_port: u16,
    pub upstream_port: u16,
    pub otlp_port: u16,
    pub redis_url: &'a str,
    /// The PostgreSQL URL, its search path set to the run's schema.
    pub postgres_url: Option<&'a str>,
}

fn date(s: &str) -> Result<toml::value::Datetime> {
    s.parse().with_context(|| format!("bad date {s}"))
}

fn version(upstream: String) -> Result<RawVersion> {
    Ok(RawVersion {
        version: "v1".into(),
        upstream,
        released: date("2025-01-01")?,
        deprecated: None,
        sunset: None,
        protocol: None,
    })
}

fn authorisation(id: &str, service: &str) -> Result<RawAuthorisation> {
    Ok(RawAuthorisation {
        id: id.into(),
        consumer: "loadtest".into(),
        service: service.into(),
        versions: None,
        purpose: "benchmark".into(),
        legal_basis: RawLegalBasis {
            kind: "protocol".into(),
            reference: "BENCH-1".into(),
            issuer: None,
        },
        provider_approval: "BENCH-OK".into(),
        valid_from: date("2025-01-01")?,
        valid_until: None,
        revoked: None,
    })
}

/// One fsp's configuration, as the gateway's own types: one REST service and two SOAP
/// services (XML checks on and off) on the upstream, one consumer authorised for all three.
pub fn fsp_config(v: &Fsp, pki: &Pki, at: &FspPlace) -> Result<RawFile> {
    let s = |p: &Path| p.display().to_string();
    let audit = match v.audit {
        Audit::None => RawAudit {
            backend: "none".into(),
            fail_closed: Some(false),
            ..Default::default()
        },
        Audit::File => RawAudit {
            backend: "file".into(),
            dir: Some(s(&at.dir.join("audit"))),
            fail_closed: Some(true),
            ..Default::default()
        },
        Audit::Postgres => RawAudit {
            backend: "postgres".into(),
            url: Some(
                at.postgres_url
                    .context("a PostgreSQL trail without a URL")?
                    .into(),
            ),
            dir: Some(s(&at.dir.join("audit"))),
            fail_closed: Some(true),
            ..Default::default()
        },
    };
    let throttle = match v.throttle {
        Throttle::Off | Throttle::Local => RawThrottle {
            backend: "local".into(),
            ..Default::default()
        },
        Throttle::Redis => RawThrottle {
            backend: "redis".into(),
            url: Some(at.redis_url.into()),
            on_backend_error: Some("deny".into()),
            ..Default::default()
        },
    };
    let limit = || RawLimit {
        rate: "10000000/s".into(),
        burst: Some(1_000_000),
    };
    let limited = v.throttle != Throttle::Off;
    let upstream = format!("http://127.0.0.1:{}", at.upstream_port);
    let soap = |id: &str, checks: bool| -> Result<RawFamily> {
        Ok(RawFamily {
            id: format!("b{id}"),
            provider: "bench".into(),
            service: vec![RawService {
                id: id.into(),
                protocol: "soap".into(),
                xml_checks: (!checks).then_some(false),
                version: vec![version(format!("{upstream}/soap"))?],
                ..Default::default()
            }],
        })
    };
    Ok(RawFile {
        environment: Some("INT".into()),
        listener: Some(RawListener {
            address: format!("127.0.0.1:{}", at.port),
            public_url: format!("https://localhost:{}", at.port),
            server_cert: s(&pki.server_cert),
            server_key: s(&pki.server_key),
            client_ca: s(&pki.ca),
            ..Default::default()
        }),
        admin: Some(RawAdmin {
            address: format!("127.0.0.1:{}", at.admin_port),
            tokens_file: Some(s(&at.dir.join("admin-tokens"))),
            ..Default::default()
        }),
        audit: Some(audit),
        throttle: Some(throttle),
        telemetry: v.telemetry.then(|| RawTelemetry {
            otlp_endpoint: format!("http://127.0.0.1:{}", at.otlp_port),
            service_name: Some("fsp-loadtest".into()),
            sampling_ratio: Some(0.01),
        }),
        provider: vec![RawProvider {
            id: "bench".into(),
            name: "Benchmark upstream".into(),
            limit: limited.then(limit),
            consumer_limit: limited.then(limit),
            ..Default::default()
        }],
        family: vec![
            RawFamily {
                id: "bench".into(),
                provider: "bench".into(),
                service: vec![RawService {
                    id: "echo".into(),
                    protocol: "rest".into(),
                    version: vec![version(upstream.clone())?],
                    ..Default::default()
                }],
            },
            soap("soap", true)?,
            soap("soapoff", false)?,
        ],
        consumer: vec![RawConsumer {
            id: "loadtest".into(),
            organisation: "Load test".into(),
            certificates: Some(vec![RawCertificate {
                cn: Some(CLIENT_CN.into()),
                ..Default::default()
            }]),
            ..Default::default()
        }],
        authorisation: vec![
            authorisation("bench-rest", "bench/echo")?,
            authorisation("bench-soap", "bsoap/soap")?,
            authorisation("bench-soapoff", "bsoapoff/soapoff")?,
        ],
        ..Default::default()
    })
}

/// Writes an fsp's directory (configuration, admin token) and checks the configuration
/// with the gateway's own loader, so that a mistake stops the run before it starts.
pub fn write_fsp(v: &Fsp, pki: &Pki, at: &FspPlace) -> Result<PathBuf> {
    fs::create_dir(at.dir)?;
    fs::set_permissions(at.dir, fs::Permissions::from_mode(0o700))?;
    fs::create_dir(at.dir.join("audit"))?;
    fs::set_permissions(at.dir.join("audit"), fs::Permissions::from_mode(0o700))?;
    let token = hex::encode(fastrand::u128(..).to_le_bytes());
    write_private(
        &at.dir.join("admin-tokens"),
        format!("{token}\n").as_bytes(),
    )?;
    let config = fsp_config(v, pki, at)?;
    let text = toml::to_string_pretty(&config)
        .with_context(|| format!("cannot write {}'s configuration as TOML", v.name))?;
    let path = at.dir.join("fsp.toml");
    write(&path, text.as_bytes())?;
    if let Err(e) = proxy::config::load(&path) {
        bail!(
            "{}: the configuration written for it is refused: {e}",
            v.name
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::scenario::{ScenarioName, Server, plan_all};

    /// Every fsp the scenarios start gets a configuration the gateway's own loader accepts
    /// (the program checks it again before each run, this catches it in CI).
    #[test]
    fn every_fsp_configuration_is_accepted_by_the_gateway() {
        let dir = std::env::temp_dir().join(format!(
            "fsp-load-test.{}.{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        fs::create_dir(&dir).unwrap();
        let pki = pki(&dir.join("pki")).unwrap();
        let (targets, _) = plan_all(&[ScenarioName::All]);
        let mut written = 0;
        for t in &targets {
            let Server::Fsp(v) = t.server else { continue };
            let fsp_dir = dir.join(v.name);
            if fsp_dir.exists() {
                continue;
            }
            let place = FspPlace {
                dir: &fsp_dir,
                port: 18443,
                admin_port: 19443,
                upstream_port: 18080,
                otlp_port: 14318,
                redis_url: "redis://127.0.0.1:6379",
                postgres_url: Some("postgres://postgres@127.0.0.1:5432/test"),
            };
            let path = write_fsp(&v, &pki, &place).unwrap();
            let text = fs::read_to_string(&path).unwrap();
            assert_eq!(text.contains("[telemetry]"), v.telemetry, "{}", v.name);
            assert_eq!(
                text.contains("[provider.limit]"),
                v.throttle != crate::scenario::Throttle::Off,
                "{}",
                v.name
            );
            written += 1;
        }
        assert!(written >= 7, "only {written} fsp configurations written");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bodies_have_their_sizes_and_nothing_nginx_would_read_as_syntax() {
        for b in [json_body(), soap_answer(), soap_request()] {
            assert_eq!(b.len(), 1024);
        }
        for b in [json_body(), soap_answer()] {
            assert!(!b.contains(['\'', '$', '\\']));
        }
        assert_eq!(big_body().len(), BIG_BYTES);
    }
}
