//! `fsp quickstart`: a working platform on one machine in one command.
//!
//! It makes a development PKI (a CA, the gateway's server certificate and two consumer
//! certificates), starts two sample providers of `person/getPerson` (v3 over REST and
//! the deprecated v2 over SOAP), writes a configuration split over three files with
//! `include`, starts the gateway, and prints `curl` commands that work when pasted.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use time::{Duration, OffsetDateTime};
use tokio::net::TcpListener;

use crate::samples::{self, Sample};

/// Options of `fsp quickstart`.
#[derive(Clone, Debug)]
pub struct Options {
    pub dir: PathBuf,
    pub port: u16,
    pub admin_port: u16,
}

const CONSUMERS: &[(&str, &str, &str)] = &[
    ("ville-bxl", "monopinion.bruxelles.be", "Ville de Bruxelles"),
    ("cpas-liege", "eaide.cpas-liege.be", "CPAS de Liège"),
];

fn write(path: &Path, content: &str) -> anyhow::Result<()> {
    std::fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes the PKI unless a complete one is already there (so printed commands keep
/// working across runs).
fn pki(dir: &Path) -> anyhow::Result<()> {
    let pki = dir.join("pki");
    let mut needed = vec![
        pki.join("ca.pem"),
        pki.join("server.pem"),
        pki.join("server.key"),
    ];
    for (id, _, _) in CONSUMERS {
        needed.push(pki.join(format!("{id}.pem")));
        needed.push(pki.join(format!("{id}.key")));
    }
    if needed.iter().all(|p| p.exists()) {
        return Ok(());
    }
    std::fs::create_dir_all(&pki).with_context(|| format!("cannot create {}", pki.display()))?;
    let ca = certs::devpki::DevCa::new("FSP Quickstart CA")?;
    write(&pki.join("ca.pem"), &ca.cert_pem())?;
    let server = ca.server(&["localhost", "127.0.0.1"])?;
    write(&pki.join("server.pem"), &server.cert_pem)?;
    write(&pki.join("server.key"), &server.key_pem)?;
    for (id, cn, _) in CONSUMERS {
        let c = ca.client(cn)?;
        write(&pki.join(format!("{id}.pem")), &c.cert_pem)?;
        write(&pki.join(format!("{id}.key")), &c.key_pem)?;
    }
    Ok(())
}

fn token() -> String {
    let a = uuid::Uuid::now_v7().simple().to_string();
    let b = uuid::Uuid::now_v7().simple().to_string();
    format!("qs-{}{}", &a[16..], &b[16..])
}

fn date(d: OffsetDateTime) -> String {
    let d = d.date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Writes the three configuration files; returns the main one.
fn configure(
    o: &Options,
    rest: std::net::SocketAddr,
    soap: std::net::SocketAddr,
) -> anyhow::Result<PathBuf> {
    let dir = &o.dir;
    let tokens = dir.join("admin-tokens");
    if !tokens.exists() {
        write(
            &tokens,
            &format!("# one bearer token per line\n{}\n", token()),
        )?;
    }
    let now = OffsetDateTime::now_utc();
    let v3_released = now - Duration::days(270);
    let v2_released = now - Duration::days(900);
    let v2_sunset = v3_released + Duration::days(540);
    let main = format!(
        r#"# FSP quickstart configuration (generated; edit freely).
environment = "INT"
node        = "quickstart-1"
include     = ["catalogue.toml", "consumers.toml"]

[listener]
address     = "127.0.0.1:{port}"
public_url  = "https://localhost:{port}"
server_cert = "pki/server.pem"
server_key  = "pki/server.key"
client_ca   = "pki/ca.pem"

[admin]
address     = "127.0.0.1:{admin}"
tokens_file = "admin-tokens"

[audit]
backend     = "file"
dir         = "audit"
fail_closed = true
retention_days = 3653

[throttle]
backend = "local"
on_backend_error = "local"
"#,
        port = o.port,
        admin = o.admin_port
    );
    let catalogue = format!(
        r#"# The provider and its services (the provider's file).
[[provider]]
id     = "rrn"
name   = "Registre national (sample)"
limit  = {{ rate = "1000/s", burst = 200 }}
consumer_limit = {{ rate = "50/s", burst = 10 }}

[[family]]
id       = "person"
provider = "rrn"

[[family.service]]
id       = "getPerson"
protocol = "rest"

[[family.service.version]]
version  = "v3"
upstream = "http://{rest}"
released = {v3}

[[family.service.version]]
version    = "v2"
protocol   = "soap"
upstream   = "http://{soap}/soap"
released   = {v2}
deprecated = {v3}
sunset     = {sunset}
"#,
        v3 = date(v3_released),
        v2 = date(v2_released),
        sunset = date(v2_sunset),
    );
    let mut consumers =
        String::from("# Consumers and their authorisations (the administrators' file).\n");
    let purposes = [
        ("participation-vote", "deliberation", "CSI/20/123"),
        ("social-assistance", "protocol", "PROT-RRN-2023-017"),
    ];
    for ((id, cn, org), (purpose, kind, reference)) in CONSUMERS.iter().zip(purposes) {
        let _ = write!(
            consumers,
            r#"
[[consumer]]
id           = "{id}"
organisation = "{org}"
certificates = [ {{ cn = "{cn}" }} ]
oauth_client_ids = ["{id}-app"]

[[authorisation]]
id          = "{id}-person"
consumer    = "{id}"
service     = "person/getPerson"
purpose     = "{purpose}"
legal_basis = {{ kind = "{kind}", reference = "{reference}" }}
provider_approval = "RRN-OK-{id}"
valid_from  = {from}
"#,
            from = date(v2_released),
        );
    }
    write(&dir.join("catalogue.toml"), &catalogue)?;
    write(&dir.join("consumers.toml"), &consumers)?;
    let path = dir.join("fsp.toml");
    write(&path, &main)?;
    Ok(path)
}

/// The commands printed for the newcomer.
pub fn commands(dir: &Path, port: u16, admin_port: u16) -> String {
    let pki = dir.join("pki");
    let p = |f: &str| pki.join(f).display().to_string();
    let url = format!("https://localhost:{port}");
    let soap_body = r#"<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><getPersonRequest xmlns="urn:be:fgov:sample:rn:person:v2"><ssin>92021415414</ssin></getPersonRequest></soap:Body></soap:Envelope>"#;
    format!(
        r#"
# 1. REST, version 3, as Ville de Bruxelles (client certificate):
curl -i --cacert {ca} --cert {bxl} --key {bxlk} \
  -H 'FSP-Purpose: participation-vote' -H 'X-Request-ID: demo-1' \
  {url}/person/getPerson/v3/persons/85073003328

# 2. SOAP, version 2 (deprecated: see the Deprecation, Sunset and Link headers), as CPAS de Liège:
curl -i --cacert {ca} --cert {lg} --key {lgk} \
  -H 'Content-Type: text/xml; charset=utf-8' -H 'SOAPAction: "urn:getPerson"' \
  --data '{soap_body}' \
  {url}/person/getPerson/v2

# 2b. The WSDL of SOAP version 2, every address pointing at the gateway (a toolkit such as
#     zeep, CXF or .NET builds its client from this URL, with the same certificate):
curl --cacert {ca} --cert {lg} --key {lgk} '{url}/person/getPerson/v2?wsdl'

# 3. No certificate: 401 FSP-AUTHN-MISSING (problem+json)
curl -i --cacert {ca} {url}/person/getPerson/v3/persons/85073003328

# 4. A version that does not exist: 404 FSP-ROUTE-UNKNOWN-VERSION
curl -i --cacert {ca} --cert {bxl} --key {bxlk} {url}/person/getPerson/v9/persons/85073003328

# Health and metrics (admin listener); the audit trail is in {audit}
curl http://127.0.0.1:{admin_port}/readyz
curl -s http://127.0.0.1:{admin_port}/metrics | grep fsp_
"#,
        ca = p("ca.pem"),
        bxl = p("ville-bxl.pem"),
        bxlk = p("ville-bxl.key"),
        lg = p("cpas-liege.pem"),
        lgk = p("cpas-liege.key"),
        audit = dir.join("audit").display(),
    )
}

/// Runs the quickstart until Ctrl-C.
pub async fn run(o: Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&o.dir)
        .with_context(|| format!("cannot create {}", o.dir.display()))?;
    let dir = std::fs::canonicalize(&o.dir)?;
    let o = Options { dir, ..o };
    pki(&o.dir)?;
    let rest = samples::spawn(Sample::Rest, TcpListener::bind("127.0.0.1:0").await?);
    let soap = samples::spawn(Sample::Soap, TcpListener::bind("127.0.0.1:0").await?);
    let path = configure(&o, rest, soap)?;
    let config = crate::run::load_or_report(&path)
        .ok_or_else(|| anyhow::anyhow!("the generated configuration is invalid (see above)"))?;
    let shutdown = crate::run::shutdown_signal()?;
    println!(
        "FSP quickstart: configuration and development PKI in {}",
        o.dir.display()
    );
    println!(
        "Sample providers: REST getPerson v3 on http://{rest}, SOAP getPerson v2 on http://{soap}/soap"
    );
    println!(
        "Gateway: https://localhost:{} (mTLS); admin: http://127.0.0.1:{}",
        o.port, o.admin_port
    );
    println!(
        "Paste these in another terminal:{}",
        commands(&o.dir, o.port, o.admin_port)
    );
    println!("Press Ctrl-C to stop.");
    let text = commands(&o.dir, o.port, o.admin_port);
    let _ = std::fs::write(o.dir.join("COMMANDS.txt"), text);
    crate::run::serve(&path, config, shutdown).await
}
