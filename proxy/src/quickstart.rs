//! `fsp quickstart`: a working platform on one machine in one command.
//!
//! It makes a development PKI (a CA, the gateway's server certificate, two consumer
//! certificates and a token-signing key), starts two sample providers of
//! `person/getPerson` (v3 over REST and the deprecated v2 over SOAP) and a small OAuth2
//! token endpoint ([`crate::devidp`]), writes a configuration split over three files with
//! `include`, starts the gateway, and prints commands that work when pasted: mTLS and
//! OAuth calls, and the admin API.
//!
//! Re-running it keeps what the user changed: the generated files' digests are kept in
//! `.quickstart.json`, and a file whose content no longer matches is left alone (and
//! said so); the sample providers come back on the same ports when they can. It starts
//! with no suspension left over from the last run unless `--keep-suspensions` is given.

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
    /// The OAuth2 token endpoint's port (http://127.0.0.1:PORT/token).
    pub oauth_port: u16,
    /// Keep the suspensions the last run left (by default they are lifted at start).
    pub keep_suspensions: bool,
}

/// The audience of the quickstart's tokens (`[oauth] audience`).
const AUDIENCE: &str = "fsp";
/// What the last run generated: the files' digests and the sample providers' addresses.
const STATE_FILE: &str = ".quickstart.json";

const CONSUMERS: &[(&str, &str, &str)] = &[
    ("ville-bxl", "monopinion.bruxelles.be", "Ville de Bruxelles"),
    ("cpas-liege", "eaide.cpas-liege.be", "CPAS de Liège"),
];

fn write(path: &Path, content: &str) -> anyhow::Result<()> {
    std::fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a key or secret readable by the user only.
fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| {
            // `mode` applies to a file it creates; one that was there is tightened.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(content.as_bytes())
        })
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Makes the keys and secrets of an existing directory readable by the user only (an
/// earlier version wrote them with the default mode).
fn tighten(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut private = vec![
        dir.join("admin-tokens"),
        dir.join("oauth-clients"),
        dir.join("COMMANDS.txt"),
        dir.join("pki/server.key"),
        dir.join("pki/oauth-signing.key"),
    ];
    private.extend(
        CONSUMERS
            .iter()
            .map(|(id, _, _)| dir.join(format!("pki/{id}.key"))),
    );
    for path in private {
        if path.exists() {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
    }
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
    write_private(&pki.join("server.key"), &server.key_pem)?;
    for (id, cn, _) in CONSUMERS {
        let c = ca.client(cn)?;
        write(&pki.join(format!("{id}.pem")), &c.cert_pem)?;
        write_private(&pki.join(format!("{id}.key")), &c.key_pem)?;
    }
    Ok(())
}

/// Writes the token-signing key and its JWKS unless both are there.
fn signing_key(dir: &Path) -> anyhow::Result<()> {
    let (key, jwks) = (
        dir.join("pki/oauth-signing.key"),
        dir.join("pki/oauth-jwks.json"),
    );
    if key.exists() && jwks.exists() {
        return Ok(());
    }
    let k = certs::devpki::SigningKey::generate()?;
    write_private(&key, &k.private_pem)?;
    write(&jwks, &format!("{:#}\n", crate::devidp::jwks(&k)))
}

/// Writes a secrets file unless it exists (the printed commands keep working).
fn secrets(dir: &Path) -> anyhow::Result<()> {
    let tokens = dir.join("admin-tokens");
    if !tokens.exists() {
        write_private(
            &tokens,
            &format!(
                "# one administrator per line: name:token (the name is recorded with each admin action)\nquickstart:{}\n",
                token()?
            ),
        )?;
    }
    let clients = dir.join("oauth-clients");
    if !clients.exists() {
        let mut text = String::from(
            "# the quickstart token endpoint's OAuth2 clients: client_id:secret per line\n",
        );
        for (id, _, _) in CONSUMERS {
            let _ = writeln!(text, "{id}-app:{}", token()?);
        }
        write_private(&clients, &text)?;
    }
    Ok(())
}

/// A fresh secret: 128 bits from the system's secure random generator, hex.
fn token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    certs::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system's random generator failed"))?;
    Ok(format!("qs-{}", hex::encode(bytes)))
}

fn date(d: OffsetDateTime) -> String {
    let d = d.date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The three configuration files, generated: (name, content), the main one first.
fn generate(
    o: &Options,
    rest: std::net::SocketAddr,
    soap: std::net::SocketAddr,
) -> Vec<(&'static str, String)> {
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

[oauth]
issuer     = "http://127.0.0.1:{oauth}"
jwks_file  = "pki/oauth-jwks.json"
audience   = "{AUDIENCE}"
algorithms = ["ES256"]
"#,
        port = o.port,
        admin = o.admin_port,
        oauth = o.oauth_port,
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
    vec![
        ("fsp.toml", main),
        ("catalogue.toml", catalogue),
        ("consumers.toml", consumers),
    ]
}

/// What the last run left in `.quickstart.json`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// File name → SHA-256 of the content the quickstart wrote.
    files: std::collections::BTreeMap<String, String>,
    rest: Option<std::net::SocketAddr>,
    soap: Option<std::net::SocketAddr>,
}

impl State {
    /// The last run's state; `Err` says why there is none to trust (then every
    /// existing configuration file counts as the user's).
    fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| format!("{} is unreadable ({e})", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if dir.join("fsp.toml").exists() {
                    Err(format!(
                        "{} is missing (written by an earlier version?)",
                        path.display()
                    ))
                } else {
                    Ok(Self::default())
                }
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Written whole or not at all (a temporary file renamed over it).
    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        write(
            &tmp,
            &serde_json::to_string_pretty(self).unwrap_or_default(),
        )?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))
            .with_context(|| format!("cannot write {}", dir.join(STATE_FILE).display()))
    }
}

fn digest(content: &[u8]) -> String {
    certs::identity::sha256(content).to_string()
}

/// Writes the generated files, except those the user changed since the quickstart wrote
/// them (or wrote themselves): those are kept and named in the answer.
fn configure(
    o: &Options,
    state: &mut State,
    files: Vec<(&'static str, String)>,
) -> anyhow::Result<(PathBuf, Vec<&'static str>)> {
    let mut kept = Vec::new();
    for (name, content) in files {
        let path = o.dir.join(name);
        if let Ok(current) = std::fs::read(&path) {
            let ours = state.files.get(name) == Some(&digest(&current));
            if !ours {
                kept.push(name);
                continue;
            }
        }
        write(&path, &content)?;
        state
            .files
            .insert(name.to_owned(), digest(content.as_bytes()));
    }
    Ok((o.dir.join("fsp.toml"), kept))
}

/// Binds a sample provider where the last run had it (so that an edited catalogue still
/// points at it), else anywhere on loopback.
async fn bind_sample(previous: Option<std::net::SocketAddr>) -> anyhow::Result<TcpListener> {
    if let Some(addr) = previous.filter(|a| a.ip().is_loopback())
        && let Ok(l) = TcpListener::bind(addr).await
    {
        return Ok(l);
    }
    Ok(TcpListener::bind("127.0.0.1:0").await?)
}

/// What the printed commands need to know.
#[derive(Debug)]
pub struct Printed<'a> {
    pub dir: &'a Path,
    pub port: u16,
    pub admin_port: u16,
    /// An administrator's token (from `tokens_file`), for the admin API examples.
    pub admin_token: Option<&'a str>,
    /// The admin API is served over TLS (`[admin] tls`).
    pub admin_tls: bool,
    /// The token endpoint's URL, a client id and its secret, for the OAuth example.
    pub oauth: Option<(String, &'a str, &'a str)>,
}

/// The commands printed for the newcomer, each block a comment saying what it answers
/// and the command(s).
pub fn commands(p: &Printed<'_>) -> String {
    let (dir, port, admin_port) = (p.dir, p.port, p.admin_port);
    let pki = dir.join("pki");
    let f = |name: &str| pki.join(name).display().to_string();
    let url = format!("https://localhost:{port}");
    let admin = if p.admin_tls {
        format!("--cacert {} https://localhost:{admin_port}", f("ca.pem"))
    } else {
        format!("http://127.0.0.1:{admin_port}")
    };
    let soap_body = r#"<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><getPersonRequest xmlns="urn:be:fgov:sample:rn:person:v2"><ssin>92021415414</ssin></getPersonRequest></soap:Body></soap:Envelope>"#;
    let (ca, bxl, bxlk, lg, lgk) = (
        f("ca.pem"),
        f("ville-bxl.pem"),
        f("ville-bxl.key"),
        f("cpas-liege.pem"),
        f("cpas-liege.key"),
    );
    let mut out = format!(
        r#"
# 1. REST, version 3, as Ville de Bruxelles (client certificate): 200
curl -i --cacert {ca} --cert {bxl} --key {bxlk} \
  -H 'FSP-Purpose: participation-vote' -H 'X-Request-ID: demo-1' \
  {url}/person/getPerson/v3/persons/85073003328

# 2. SOAP, version 2 (deprecated: see the Deprecation, Sunset and Link headers), as CPAS de Liège: 200
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
"#
    );
    if let Some((token_url, client, secret)) = &p.oauth {
        let _ = write!(
            out,
            r#"
# 5. OAuth2 instead of a certificate: get an access token for the client {client}
#    (client-credentials grant at the quickstart's token endpoint), then call with it: 200
TOKEN=$(curl -s -u '{client}:{secret}' -d grant_type=client_credentials {token_url} | sed -E 's/.*"access_token":"([^"]+)".*/\1/')
curl -i --cacert {ca} -H "Authorization: Bearer $TOKEN" -H 'FSP-Purpose: participation-vote' \
  {url}/person/getPerson/v3/persons/85073003328
"#
        );
    }
    if let Some(token) = p.admin_token {
        let _ = write!(
            out,
            r#"
# 6. Administrators: cut CPAS de Liège off at once (every change is an audit record naming
#    the administrator; GET /admin/suspensions lists it): 200, then its calls get 403 FSP-AUTHZ-SUSPENDED
curl -i -X POST -H 'Authorization: Bearer {token}' -d '{{"reason": "quickstart demo"}}' \
  {admin}/admin/consumers/cpas-liege/suspend

# 7. ... and restore it: 200
curl -i -X POST -H 'Authorization: Bearer {token}' {admin}/admin/consumers/cpas-liege/resume
"#
        );
    }
    let _ = write!(
        out,
        r#"
# Health and metrics (admin listener); the audit trail is in {audit}
curl {admin}/readyz
curl -s {admin}/metrics | grep fsp_
"#,
        audit = dir.join("audit").display(),
    );
    out
}

/// The quickstart's token endpoint for this configuration: its issuer must be
/// `http://127.0.0.1:PORT` and its keys the quickstart's JWKS file (a configuration
/// edited to use another identity provider gets none).
fn token_endpoint(
    dir: &Path,
    config: &crate::config::Config,
) -> anyhow::Result<Option<(crate::devidp::TokenIssuer, std::net::SocketAddr)>> {
    let Some(oauth) = &config.oauth else {
        return Ok(None);
    };
    let ours = matches!(&oauth.jwks, crate::config::JwksSource::File(f) if *f == dir.join("pki/oauth-jwks.json"));
    let addr = oauth
        .issuer
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .filter(|a| a.ip().is_loopback());
    let Some(addr) = addr.filter(|_| ours) else {
        return Ok(None);
    };
    let issuer = crate::devidp::TokenIssuer::load(
        &oauth.issuer,
        &oauth.audience,
        &dir.join("pki/oauth-signing.key"),
        &dir.join("oauth-clients"),
    )?;
    Ok(Some((issuer, addr)))
}

/// Runs the quickstart until Ctrl-C.
pub async fn run(o: Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&o.dir)
        .with_context(|| format!("cannot create {}", o.dir.display()))?;
    let dir = std::fs::canonicalize(&o.dir)?;
    let o = Options { dir, ..o };
    // One quickstart per directory: a second one would rewrite files and lift
    // suspensions under the first. The lock goes with the process.
    let lock_path = o.dir.join(".quickstart.lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "another quickstart is running in {}: stop it first (Ctrl-C)",
            o.dir.display()
        );
    }
    // The ports asked for must be free before anything is written.
    for (port, option) in [
        (o.port, "--port"),
        (o.admin_port, "--admin-port"),
        (o.oauth_port, "--oauth-port"),
    ] {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("port {port} is taken: choose another with {option}"))?;
    }
    tighten(&o.dir);
    pki(&o.dir)?;
    signing_key(&o.dir)?;
    secrets(&o.dir)?;
    let mut state = State::read(&o.dir).unwrap_or_else(|why| {
        println!("Note: {why}; the configuration files there are kept as they are.");
        State::default()
    });
    let rest_listener = bind_sample(state.rest).await?;
    let soap_listener = bind_sample(state.soap).await?;
    let (rest, soap) = (rest_listener.local_addr()?, soap_listener.local_addr()?);
    let moved = state.rest != Some(rest) || state.soap != Some(soap);
    let files = generate(&o, rest, soap);
    let (path, kept) = configure(&o, &mut state, files)?;
    state.rest = Some(rest);
    state.soap = Some(soap);
    state.write(&o.dir)?;
    samples::spawn(Sample::Rest, rest_listener);
    samples::spawn(Sample::Soap, soap_listener);
    for name in &kept {
        println!(
            "Kept {} as you left it (it differs from what the quickstart wrote); delete it to get the generated one back.",
            o.dir.join(name).display()
        );
    }
    if moved && kept.contains(&"catalogue.toml") {
        println!(
            "Note: the sample providers could not come back on their previous ports; they now listen on http://{rest} (REST) and http://{soap}/soap (SOAP): update the upstream addresses in your catalogue.toml."
        );
    }
    let config = crate::run::load_or_report(&path).ok_or_else(|| {
        anyhow::anyhow!(
            "the configuration in {} is invalid (see above)",
            o.dir.display()
        )
    })?;
    let oauth = match token_endpoint(&o.dir, &config)? {
        Some((issuer, addr)) => {
            let listener = TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} for the quickstart's OAuth2 token endpoint (--oauth-port)")
            })?;
            let client = issuer
                .first_client()
                .map(|(c, s)| (c.to_owned(), s.to_owned()));
            tokio::spawn(crate::devidp::serve(std::sync::Arc::new(issuer), listener));
            client.map(|c| (format!("http://{addr}/token"), c))
        }
        None => {
            if config.oauth.is_some() {
                println!(
                    "OAuth: your fsp.toml names another identity provider, so the quickstart's token endpoint is not started."
                );
            }
            None
        }
    };
    let port = config.listener.address.port();
    let admin = config.admin.as_ref();
    let admin_port = admin.map_or(o.admin_port, |a| a.address.port());
    let admin_token = admin
        .and_then(|a| a.access.tokens.first())
        .map(|t| t.token.clone());
    let printed = Printed {
        dir: &o.dir,
        port,
        admin_port,
        admin_token: admin_token.as_deref(),
        admin_tls: admin.is_some_and(|a| a.access.tls.is_some()),
        oauth: oauth
            .as_ref()
            .map(|(url, (client, secret))| (url.clone(), client.as_str(), secret.as_str())),
    };
    let text = commands(&printed);
    let shutdown = crate::run::shutdown_signal()?;
    println!(
        "FSP quickstart: configuration and development PKI in {}",
        o.dir.display()
    );
    println!(
        "Sample providers: REST getPerson v3 on http://{rest}, SOAP getPerson v2 on http://{soap}/soap"
    );
    if let Some((url, _)) = &oauth {
        println!("OAuth2 token endpoint (client credentials): {url}");
    }
    let admin_url = if printed.admin_tls {
        format!("https://localhost:{admin_port}")
    } else {
        format!("http://127.0.0.1:{admin_port}")
    };
    println!("Gateway: https://localhost:{port} (mTLS or OAuth2); admin: {admin_url}");
    // Only the quickstart's own suspensions are lifted: not those shared with other
    // gateways through Redis, nor those of a state directory outside its own.
    let ours = config.cluster.is_none() && config.audit.backend.state_dir().starts_with(&o.dir);
    let started = crate::run::start(&path, config, shutdown).await?;
    if o.keep_suspensions {
        println!("Suspensions left by the last run are kept (--keep-suspensions).");
    } else if ours {
        // Through the gateway, as an administrator's resume would: each is in the trail.
        let lifted = crate::admin::lift_every_suspension(
            &started.gateway,
            "fsp quickstart",
            "lifted at the quickstart's start: left by its last run (--keep-suspensions keeps them)",
        )
        .await;
        if lifted > 0 {
            println!(
                "Lifted {lifted} suspension(s) left by the last run (start with --keep-suspensions to keep them)."
            );
        }
    }
    println!("Paste these in another terminal:{text}");
    println!("Press Ctrl-C to stop.");
    // It holds an administrator token and a client secret.
    let _ = write_private(&o.dir.join("COMMANDS.txt"), &text);
    let served = started.finished().await;
    drop(lock);
    served
}
