//! Tests of configuration loading: the contract example loads with real certificates,
//! `include` splits it over files, unknown keys are refused at every level, and every rule
//! `fsp check` enforces is reported with the file, the key path and a clear reason.
//!
//! Every certificate and key is generated at test time by [`certs::devpki::DevCa`] into a
//! temporary directory; nothing secret is committed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use certs::devpki::{DevCa, Issued};
use proptest::prelude::*;
use tempfile::TempDir;

use super::*;

// ---------------------------------------------------------------- fixture ----

/// Top of the main file: plain keys must precede every table.
const MAIN_TOP: &str = r#"environment = "INT"
node        = "test-node-1"
"#;

/// The sections of the main file (the contract example, with real files under `pki/`).
const MAIN_SECTIONS: &str = r#"
[listener]
address     = "127.0.0.1:8443"
public_url  = "https://fsp.example.be/"
server_cert = "pki/server.pem"
server_key  = "pki/server.key"
client_ca   = "pki/consumers-ca.pem"
crls        = ["pki/consumers.crl"]
drain_timeout = "15s"

[admin]
address     = "127.0.0.1:9443"
tokens_file = "admin-tokens"

[oauth]
issuer      = "https://idp.example/"
jwks_url    = "https://idp.example/jwks"
audience    = "fsp"
algorithms  = ["RS256", "ES256", "PS256", "EdDSA"]
client_id_claim = "client_id"
require_certificate_binding = false

[audit]
backend     = "file"
dir         = "data/audit"
fail_closed = true
retention_days = 3653

[throttle]
backend     = "local"
on_backend_error = "local"
"#;

/// The provider's file. `{PKI}` is the directory of the PEM files relative to this file.
const CATALOGUE: &str = r#"
[[provider]]
id     = "rrn"
name   = "Registre national"
limit  = { rate = "1000/s", burst = 200 }
consumer_limit = { rate = "50/s", burst = 10 }
consumer_limits = [ { consumer = "ville-bxl", rate = "200/s", burst = 20 } ]
upstream_ca   = "{PKI}/providers-ca.pem"
client_cert   = "{PKI}/fsp-client.pem"
client_key    = "{PKI}/fsp-client.key"
connect_timeout = "3s"

[[family]]
id       = "person"
provider = "rrn"

[[family.service]]
id       = "getPerson"
protocol = "soap"

[[family.service.version]]
version  = "v3"
upstream = "https://rrn.example/person/v3"
released = 2026-03-01

[[family.service.version]]
version    = "v2"
upstream   = "https://rrn.example/person/v2"
released   = 2024-05-01
deprecated = 2026-03-01
sunset     = 2027-09-01
"#;

/// The administrators' file. `{PIN}` is the fingerprint of a generated client certificate.
const CONSUMERS: &str = r#"
[[consumer]]
id           = "ville-bxl"
organisation = "Ville de Bruxelles"
enterprise_number = "0207.373.429"
certificates = [ { cn = "monopinion.bruxelles.be" } ]
oauth_client_ids = ["ville-bxl-monopinion"]
source_ips   = ["192.0.2.0/24"]

[[consumer]]
id           = "cpas-liege"
organisation = "CPAS de Liège"
certificates = [ { sha256 = "{PIN}" } ]
oauth_client_ids = ["cpas-liege-app"]
source_ips   = ["2001:db8::/32", "198.51.100.7"]

[[authorisation]]
id          = "csi-2020-123-person"
consumer    = "ville-bxl"
service     = "person/getPerson"
versions    = ["v3"]
purpose     = "participation-vote"
legal_basis = { kind = "deliberation", reference = "CSI/20/123", issuer = "Comité de sécurité de l'information" }
provider_approval = "RRN-2020-456"
valid_from  = 2020-10-09
valid_until = 2026-10-09
"#;

/// A catalogue breaking the two lifecycle rules of the issue's acceptance criterion:
/// `person/getPerson` has 4 live versions from 2023-01-01 on, and version v1 of
/// `person/getAddress` has its sunset 3 years after its deprecation.
const BAD_LIFECYCLE_CATALOGUE: &str = r#"
[[provider]]
id   = "rrn"
name = "Registre national"

[[family]]
id       = "person"
provider = "rrn"

[[family.service]]
id       = "getPerson"
protocol = "rest"

[[family.service.version]]
version  = "v1"
upstream = "https://rrn.example/person/v1"
released = 2020-01-01

[[family.service.version]]
version  = "v2"
upstream = "https://rrn.example/person/v2"
released = 2021-01-01

[[family.service.version]]
version  = "v3"
upstream = "https://rrn.example/person/v3"
released = 2022-01-01

[[family.service.version]]
version  = "v4"
upstream = "https://rrn.example/person/v4"
released = 2023-01-01

[[family.service]]
id       = "getAddress"
protocol = "rest"

[[family.service.version]]
version    = "v1"
upstream   = "https://rrn.example/address/v1"
released   = 2020-01-01
deprecated = 2022-01-01
sunset     = 2025-01-01

[[family.service.version]]
version  = "v2"
upstream = "https://rrn.example/address/v2"
released = 2022-01-01
"#;

/// A temporary installation: `root/conf/` holds the configuration and `root/conf/pki/`
/// freshly generated certificates, keys and a CRL.
struct Fixture {
    _tmp: TempDir,
    /// The configuration directory (canonical).
    dir: PathBuf,
    /// SHA-256 of a client certificate issued by the consumers' CA, as hex.
    pin: String,
    /// The consumers' CA, to issue more client certificates.
    consumers_ca: DevCa,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("conf");
        let pki = dir.join("pki");
        fs::create_dir_all(&pki).unwrap();
        let dir = fs::canonicalize(&dir).unwrap();

        let consumers_ca = DevCa::new("Test Consumers CA").unwrap();
        let server = consumers_ca.server(&["localhost", "127.0.0.1"]).unwrap();
        let pinned = consumers_ca.client("eaide.cpas-liege.be").unwrap();
        let other_server = consumers_ca.server(&["other.example"]).unwrap();
        let providers_ca = DevCa::new("Test Providers CA").unwrap();
        let fsp_client = providers_ca.client("fsp.example.be").unwrap();

        let w = |name: &str, text: &str| fs::write(pki.join(name), text).unwrap();
        w("consumers-ca.pem", &consumers_ca.cert_pem());
        w("server.pem", &server.cert_pem);
        w("server.key", &server.key_pem);
        w("other.key", &other_server.key_pem);
        w(
            "consumers.crl",
            &consumers_ca.crl(&[pinned.serial + 1000]).unwrap(),
        );
        w("providers-ca.pem", &providers_ca.cert_pem());
        w("fsp-client.pem", &fsp_client.cert_pem);
        w("fsp-client.key", &fsp_client.key_pem);
        w("not-pem.pem", "this is not a certificate\n");
        fs::write(
            dir.join("admin-tokens"),
            "# one token per line\nadmin-token-0123456789abcdef\n",
        )
        .unwrap();

        Self {
            _tmp: tmp,
            dir,
            pin: certs::sha256(&pinned.der).to_string(),
            consumers_ca,
        }
    }

    /// Issues a client certificate for `cn` valid from `from` to `until` days from now
    /// and writes it, with the CA after it, to `name` (relative to the configuration
    /// directory).
    fn consumer_cert(&self, name: &str, cn: &str, from: i64, until: i64) -> Issued {
        let now = time::OffsetDateTime::now_utc();
        let issued = self
            .consumers_ca
            .client_valid(
                cn,
                now + time::Duration::days(from),
                now + time::Duration::days(until),
            )
            .unwrap();
        self.write(
            name,
            &format!("{}{}", issued.cert_pem, self.consumers_ca.cert_pem()),
        );
        issued
    }

    /// The catalogue file's text, for a file whose PEM files are under `pki`.
    fn catalogue(&self, pki: &str) -> String {
        CATALOGUE.replace("{PKI}", pki)
    }

    fn consumers(&self) -> String {
        CONSUMERS.replace("{PIN}", &self.pin)
    }

    /// The whole contract example in one file.
    fn single_file(&self) -> String {
        format!(
            "{MAIN_TOP}{MAIN_SECTIONS}{}{}",
            self.catalogue("pki"),
            self.consumers()
        )
    }

    /// The main file of a split configuration, including `includes`.
    fn main_including(&self, includes: &[&str]) -> String {
        let list: Vec<String> = includes.iter().map(|i| format!("{i:?}")).collect();
        format!(
            "{MAIN_TOP}include     = [{}]\n{MAIN_SECTIONS}",
            list.join(", ")
        )
    }

    /// Writes `name` (relative to the configuration directory); returns its path.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, text).unwrap();
        path
    }

    /// Writes the configuration as one file `fsp.toml` and loads it.
    fn load_single(&self, text: &str) -> Result<Config, ConfigError> {
        load(&self.write("fsp.toml", text))
    }

    /// Writes the given one-file configuration, expects it to fail and returns the problems.
    fn problems(&self, text: &str) -> Vec<Problem> {
        match self.load_single(text) {
            Ok(_) => panic!("the configuration was accepted:\n{text}"),
            Err(e) => e.0,
        }
    }

    /// The contract example with one edit applied; expects it to fail.
    fn problems_after(&self, from: &str, to: &str) -> Vec<Problem> {
        self.problems(&edit(&self.single_file(), from, to))
    }
}

/// Replaces the first `from` by `to`, making sure the fixture does contain `from`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the fixture has no {from:?}");
    text.replacen(from, to, 1)
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("\n  - {p}"))
        .collect::<String>()
}

fn file_name(p: &Problem) -> &str {
    p.file.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// The problem in `file` (a file name) at exactly `key`, whose reason contains every
/// `parts`; panics listing every problem otherwise.
fn expect<'a>(problems: &'a [Problem], file: &str, key: &str, parts: &[&str]) -> &'a Problem {
    problems
        .iter()
        .find(|p| {
            file_name(p) == file && p.key == key && parts.iter().all(|s| p.reason.contains(s))
        })
        .unwrap_or_else(|| {
            panic!(
                "no problem in {file} at `{key}` mentioning {parts:?}; got:{}",
                list(problems)
            )
        })
}

/// As [`expect`], and that problem is the only one.
fn expect_only(problems: &[Problem], file: &str, key: &str, parts: &[&str]) {
    expect(problems, file, key, parts);
    assert_eq!(
        problems.len(),
        1,
        "expected one problem, got:{}",
        list(problems)
    );
}

fn date(y: i32, m: u8, d: u8) -> time::Date {
    time::Date::from_calendar_date(y, time::Month::try_from(m).unwrap(), d).unwrap()
}

// ------------------------------------------------------- valid configurations ----

#[test]
fn the_contract_example_loads_with_every_section_and_paths_relative_to_its_file() {
    let fx = Fixture::new();
    // The test process runs in the crate directory, not in `conf/`: the relative paths
    // only resolve against the configuration file's own directory.
    assert_ne!(std::env::current_dir().unwrap(), fx.dir);
    let config = fx
        .load_single(&fx.single_file())
        .unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(config.source, fx.dir.join("fsp.toml"));
    assert_eq!(config.environment, Environment::Int);
    assert_eq!(config.node, "test-node-1");

    let l = &config.listener;
    assert_eq!(l.address, "127.0.0.1:8443".parse().unwrap());
    assert_eq!(
        l.public_url, "https://fsp.example.be",
        "trailing slash dropped"
    );
    assert_eq!(l.tls_files.server_cert, fx.dir.join("pki/server.pem"));
    assert_eq!(l.tls_files.server_key, fx.dir.join("pki/server.key"));
    assert_eq!(l.tls_files.client_ca, fx.dir.join("pki/consumers-ca.pem"));
    assert_eq!(l.tls_files.crls, vec![fx.dir.join("pki/consumers.crl")]);
    assert_eq!(l.drain_timeout, Duration::from_secs(15));
    assert_eq!(l.handshake_timeout, Duration::from_secs(10), "default");
    assert_eq!(
        l.tls.config.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );

    let admin = config.admin.as_ref().expect("[admin]");
    assert_eq!(admin.address, "127.0.0.1:9443".parse().unwrap());
    assert_eq!(
        admin.access.tokens,
        vec![AdminToken {
            name: "token#1".to_owned(),
            token: "admin-token-0123456789abcdef".to_owned(),
            line: None,
        }]
    );
    assert!(admin.access.tls.is_none());
    assert!(admin.access.cns.is_empty());

    let oauth = config.oauth.as_ref().expect("[oauth]");
    assert_eq!(oauth.issuer, "https://idp.example/");
    assert!(matches!(&oauth.jwks, JwksSource::Url(u) if u == "https://idp.example/jwks"));
    assert_eq!(oauth.audience, "fsp");
    {
        use jsonwebtoken::Algorithm::*;
        assert_eq!(oauth.algorithms, [RS256, ES256, PS256, EdDSA]);
    }
    assert_eq!(oauth.client_id_claim, "client_id");
    assert!(!oauth.require_certificate_binding);

    let AuditBackend::File { dir } = &config.audit.backend else {
        panic!("file backend expected")
    };
    assert_eq!(dir, &fx.dir.join("data/audit"));
    assert!(config.audit.fail_closed);
    assert_eq!(config.audit.retention_days, 3653);
    assert_eq!(config.throttle.backend, ThrottleBackend::Local);
    assert_eq!(config.throttle.on_backend_error, OnBackendError::Local);

    assert_eq!(config.providers.len(), 1);
    let p = &config.providers[0];
    assert_eq!(
        (p.id.as_str(), p.name.as_str()),
        ("rrn", "Registre national")
    );
    let second = Duration::from_secs(1);
    assert_eq!(
        p.limit,
        Some(Rate {
            count: 1000,
            per: second,
            burst: 200
        })
    );
    assert_eq!(
        p.consumer_limit,
        Some(Rate {
            count: 50,
            per: second,
            burst: 10
        })
    );
    assert_eq!(
        p.consumer_limits.get("ville-bxl"),
        Some(&Rate {
            count: 200,
            per: second,
            burst: 20
        })
    );
    assert_eq!(p.connect_timeout, Duration::from_secs(3));
    assert_eq!(p.response_timeout, Duration::from_secs(60), "default");

    let svc = config
        .catalogue
        .service("person", "getPerson")
        .expect("person/getPerson");
    assert_eq!(&*svc.name, "person/getPerson");
    assert_eq!(&*svc.provider, "rrn");
    assert_eq!(svc.protocol, Protocol::Soap);
    let versions: Vec<&str> = svc.versions.iter().map(|v| &*v.version).collect();
    assert_eq!(versions, ["v3", "v2"], "newest release first");
    let v2 = &svc.versions[1];
    assert_eq!(v2.released, date(2024, 5, 1));
    assert_eq!(v2.deprecated, Some(date(2026, 3, 1)));
    assert_eq!(v2.sunset, Some(date(2027, 9, 1)));
    assert_eq!(v2.upstream, "https://rrn.example/person/v2");

    let ids: Vec<&str> = config.consumers.iter().map(|c| &*c.id).collect();
    assert_eq!(ids, ["ville-bxl", "cpas-liege"]);
    let bxl = config.consumers.get("ville-bxl").unwrap();
    assert_eq!(bxl.enterprise_number.as_deref(), Some("0207.373.429"));
    assert_eq!(
        bxl.source_ips,
        vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]
    );
    let liege = config.consumers.get("cpas-liege").unwrap();
    assert_eq!(
        liege.source_ips,
        vec![
            "2001:db8::/32".parse::<IpNet>().unwrap(),
            "198.51.100.7/32".parse::<IpNet>().unwrap()
        ],
        "a bare address is a /32"
    );
    let by_pin = config
        .consumers
        .identify_certificate(&policy::CertificateIdentity {
            cn: Some("whatever".into()),
            sha256: Sha256::parse(&fx.pin).unwrap(),
        })
        .unwrap();
    assert_eq!(&*by_pin.id, "cpas-liege");
    let by_client_id = config
        .consumers
        .identify_client_id("ville-bxl-monopinion")
        .unwrap();
    assert_eq!(&*by_client_id.id, "ville-bxl");

    assert_eq!(config.authorisations.len(), 1);
    let a = &config.authorisations[0];
    assert_eq!(a.id, "csi-2020-123-person");
    assert_eq!(a.consumer, "ville-bxl");
    assert_eq!(a.service, "person/getPerson");
    assert_eq!(a.versions, ["v3"]);
    assert_eq!(a.legal_basis.kind, LegalBasisKind::Deliberation);
    assert_eq!(a.legal_basis.reference, "CSI/20/123");
    assert_eq!(a.valid_from, date(2020, 10, 9));
    assert_eq!(a.valid_until, Some(date(2026, 10, 9)));

    let files: Vec<&Path> = config
        .certificate_files
        .iter()
        .map(|(_, p)| p.as_path())
        .collect();
    for f in [
        "pki/server.pem",
        "pki/consumers-ca.pem",
        "pki/providers-ca.pem",
        "pki/fsp-client.pem",
    ] {
        assert!(
            files.contains(&fx.dir.join(f).as_path()),
            "{f} missing from {files:?}"
        );
    }
}

#[test]
fn optional_sections_have_their_defaults() {
    let fx = Fixture::new();
    let text = r#"
environment = "PROD"

[listener]
address     = "[::1]:8443"
public_url  = "https://fsp.example.be"
server_cert = "pki/server.pem"
server_key  = "pki/server.key"
client_ca   = "pki/consumers-ca.pem"
"#;
    let config = fx.load_single(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.environment, Environment::Prod);
    assert!(config.admin.is_none());
    assert!(config.oauth.is_none());
    let AuditBackend::File { dir } = &config.audit.backend else {
        panic!("file backend expected")
    };
    assert_eq!(dir, &fx.dir.join("audit"));
    assert!(
        config.audit.fail_closed,
        "fail closed unless told otherwise"
    );
    assert_eq!(config.throttle.backend, ThrottleBackend::Local);
    assert!(config.providers.is_empty());
    assert_eq!(config.catalogue.services().count(), 0);
    assert!(config.listener.tls_files.crls.is_empty());
}

// ---------------------------------------------------------------- include ----

#[test]
fn include_splits_the_configuration_and_each_file_resolves_its_own_paths() {
    let fx = Fixture::new();
    // The provider's file lives in a subdirectory: its PEM paths start from there.
    fx.write("providers/catalogue.toml", &fx.catalogue("../pki"));
    fx.write("consumers.toml", &fx.consumers());
    let main = fx.write(
        "fsp.toml",
        &fx.main_including(&["providers/catalogue.toml", "consumers.toml"]),
    );
    let config = load(&main).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.providers.len(), 1);
    let svc = config.catalogue.service("person", "getPerson").unwrap();
    assert_eq!(&*svc.provider, "rrn");
    assert_eq!(svc.versions.len(), 2);
    assert_eq!(config.consumers.iter().count(), 2);
    assert_eq!(config.authorisations.len(), 1);
    assert!(
        config
            .certificate_files
            .iter()
            .any(|(_, p)| p == &fx.dir.join("providers/../pki/providers-ca.pem")),
        "{:?}",
        config.certificate_files
    );

    // The same relative path from the main file's directory does not exist.
    fx.write("providers/catalogue.toml", &fx.catalogue("pki"));
    let problems = load(&main).unwrap_err().0;
    let p = expect(
        &problems,
        "catalogue.toml",
        "provider[0].upstream_ca",
        &["providers-ca.pem", "cannot read"],
    );
    assert!(
        p.file.ends_with("providers/catalogue.toml"),
        "{}",
        p.file.display()
    );
    assert!(
        p.reason.contains("providers/pki/providers-ca.pem"),
        "{}",
        p.reason
    );
}

#[test]
fn includes_nest() {
    let fx = Fixture::new();
    fx.write(
        "catalogue.toml",
        &format!("include = [\"consumers.toml\"]\n{}", fx.catalogue("pki")),
    );
    fx.write("consumers.toml", &fx.consumers());
    let main = fx.write("fsp.toml", &fx.main_including(&["catalogue.toml"]));
    let config = load(&main).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.consumers.iter().count(), 2);
    assert_eq!(config.authorisations.len(), 1);
}

#[test]
fn a_section_defined_in_two_files_is_reported_in_the_second_file() {
    let fx = Fixture::new();
    let listener = r#"
[listener]
address     = "127.0.0.1:7443"
public_url  = "https://other.example.be"
server_cert = "pki/server.pem"
server_key  = "pki/server.key"
client_ca   = "pki/consumers-ca.pem"
"#;
    fx.write(
        "catalogue.toml",
        &format!("{}{listener}", fx.catalogue("pki")),
    );
    fx.write("consumers.toml", &fx.consumers());
    let main = fx.write(
        "fsp.toml",
        &fx.main_including(&["catalogue.toml", "consumers.toml"]),
    );
    let problems = load(&main).unwrap_err().0;
    expect_only(
        &problems,
        "catalogue.toml",
        "listener",
        &["already defined in", "fsp.toml", "one file only"],
    );
}

#[test]
fn a_top_level_key_defined_in_two_files_is_reported_in_the_second_file() {
    let fx = Fixture::new();
    fx.write(
        "catalogue.toml",
        &format!("environment = \"PROD\"\n{}", fx.catalogue("pki")),
    );
    fx.write("consumers.toml", &fx.consumers());
    let main = fx.write(
        "fsp.toml",
        &fx.main_including(&["catalogue.toml", "consumers.toml"]),
    );
    let problems = load(&main).unwrap_err().0;
    expect_only(
        &problems,
        "catalogue.toml",
        "environment",
        &["already defined in", "fsp.toml"],
    );
}

#[test]
fn a_file_included_twice_is_a_problem() {
    let fx = Fixture::new();
    fx.write("catalogue.toml", &fx.catalogue("pki"));
    fx.write("consumers.toml", &fx.consumers());
    let main = fx.write(
        "fsp.toml",
        &fx.main_including(&["catalogue.toml", "consumers.toml", "./catalogue.toml"]),
    );
    let problems = load(&main).unwrap_err().0;
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    let p = &problems[0];
    assert_eq!(p.key, "include[2]");
    assert!(p.reason.contains("included more than once"), "{p}");
    assert!(p.reason.contains("catalogue.toml"), "{p}");
    assert!(p.file.ends_with("fsp.toml"), "{p}");
}

#[test]
fn an_include_cycle_is_a_problem() {
    let fx = Fixture::new();
    fx.write("catalogue.toml", &fx.catalogue("pki"));
    // consumers.toml includes the main file back.
    fx.write(
        "consumers.toml",
        &format!("include = [\"fsp.toml\"]\n{}", fx.consumers()),
    );
    let main = fx.write(
        "fsp.toml",
        &fx.main_including(&["catalogue.toml", "consumers.toml"]),
    );
    let problems = load(&main).unwrap_err().0;
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    let p = &problems[0];
    assert_eq!(p.key, "include[0]");
    assert!(p.reason.contains("includes itself"), "{p}");
    assert!(p.reason.contains("fsp.toml"), "{p}");
    assert_eq!(file_name(p), "consumers.toml");

    // A file including itself directly.
    let main = fx.write(
        "self.toml",
        &format!("include = [\"self.toml\"]\n{}", fx.single_file()),
    );
    let problems = load(&main).unwrap_err().0;
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    assert_eq!(problems[0].key, "include[0]");
    assert!(
        problems[0].reason.contains("includes itself"),
        "{}",
        problems[0]
    );
}

#[test]
fn a_missing_included_file_is_named() {
    let fx = Fixture::new();
    fx.write("catalogue.toml", &fx.catalogue("pki"));
    let main = fx.write(
        "fsp.toml",
        &fx.main_including(&["catalogue.toml", "consumerz.toml"]),
    );
    let problems = load(&main).unwrap_err().0;
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    let p = &problems[0];
    assert_eq!(p.file, main);
    assert_eq!(p.key, "include[1]");
    assert!(p.reason.contains("cannot read"), "{p}");
    assert!(p.to_string().contains("consumerz.toml"), "{p}");
}

/// A device, a directory, a named pipe or a huge file named by `include` is refused at
/// once, not read until memory runs out (`/dev/zero` never ends) or waited on (a pipe).
#[test]
fn an_include_that_is_not_a_reasonable_file_is_refused() {
    let fx = Fixture::new();
    fx.write("catalogue.toml", &fx.catalogue("pki"));
    fx.write("consumers.toml", &fx.consumers());
    let huge = fx.write("huge.toml", "");
    std::fs::File::options()
        .write(true)
        .open(&huge)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    std::fs::create_dir(fx.dir.join("folder.toml")).unwrap();
    // A named pipe without a writer: opening it must not wait for one.
    let made = std::process::Command::new("mkfifo")
        .arg(fx.dir.join("pipe.toml"))
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    for (include, said) in [
        ("/dev/zero", "not a regular file"),
        ("folder.toml", "not a regular file"),
        ("pipe.toml", "not a regular file"),
        ("huge.toml", "larger than 16 MiB"),
    ] {
        let main = fx.write(
            "fsp.toml",
            &fx.main_including(&["catalogue.toml", "consumers.toml", include]),
        );
        let problems = load(&main).unwrap_err().0;
        expect_only(&problems, "fsp.toml", "include[2]", &["cannot read", said]);
    }
}

#[test]
fn a_missing_main_file_is_named() {
    let fx = Fixture::new();
    let missing = fx.dir.join("nope.toml");
    let problems = load(&missing).unwrap_err().0;
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    assert_eq!(problems[0].file, missing);
    assert!(
        problems[0].reason.contains("cannot read file"),
        "{}",
        problems[0]
    );
}

#[test]
fn invalid_toml_is_reported_with_line_and_column() {
    let fx = Fixture::new();
    fx.write("catalogue.toml", "[[provider]\nid = \"rrn\"\n");
    let main = fx.write("fsp.toml", &fx.main_including(&["catalogue.toml"]));
    let problems = load(&main).unwrap_err().0;
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    let p = &problems[0];
    assert_eq!(file_name(p), "catalogue.toml");
    assert!(p.reason.contains("not valid TOML"), "{p}");
    assert!(p.reason.contains("line 1"), "{p}");
}

#[test]
fn problems_in_separate_files_are_all_reported() {
    let fx = Fixture::new();
    fx.write(
        "catalogue.toml",
        &edit(&fx.catalogue("pki"), "\"1000/s\"", "\"fast\""),
    );
    fx.write(
        "consumers.toml",
        &edit(&fx.consumers(), "192.0.2.0/24", "192.0.2.0/33"),
    );
    let main = fx.write(
        "fsp.toml",
        &fx.main_including(&["catalogue.toml", "consumers.toml"]),
    );
    let problems = load(&main).unwrap_err().0;
    expect(
        &problems,
        "catalogue.toml",
        "provider[0].limit.rate",
        &["`fast`"],
    );
    expect(
        &problems,
        "consumers.toml",
        "consumer[0].source_ips[0]",
        &["192.0.2.0/33"],
    );
    assert_eq!(problems.len(), 2, "{}", list(&problems));
}

// ---------------------------------------------------------- unknown keys ----

#[test]
fn an_unknown_top_level_key_is_an_error() {
    let fx = Fixture::new();
    let problems = fx.problems(&format!("colour = \"blue\"\n{}", fx.single_file()));
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    let p = &problems[0];
    assert_eq!(file_name(p), "fsp.toml");
    assert_eq!(p.key, "colour", "{p}");
    assert!(p.reason.contains("unknown field `colour`"), "{p}");
    assert!(p.reason.contains("line 1"), "{p}");
}

#[test]
fn an_unknown_key_in_the_listener_is_an_error() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "drain_timeout = \"15s\"",
        "drain_timeout = \"15s\"\nidle_timeout = \"5s\"",
    );
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    let p = &problems[0];
    assert_eq!(file_name(p), "fsp.toml");
    assert_eq!(p.key, "listener.idle_timeout", "{p}");
    assert!(p.reason.contains("unknown field `idle_timeout`"), "{p}");
}

#[test]
fn an_unknown_key_in_a_version_is_an_error_with_its_path() {
    let fx = Fixture::new();
    fx.write(
        "catalogue.toml",
        &edit(
            &fx.catalogue("pki"),
            "sunset     = 2027-09-01",
            "sunsett    = 2027-09-01",
        ),
    );
    fx.write("consumers.toml", &fx.consumers());
    let main = fx.write(
        "fsp.toml",
        &fx.main_including(&["catalogue.toml", "consumers.toml"]),
    );
    let problems = load(&main).unwrap_err().0;
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    let p = &problems[0];
    assert_eq!(file_name(p), "catalogue.toml");
    assert_eq!(p.key, "family[0].service[0].version[1].sunsett", "{p}");
    assert!(p.reason.contains("unknown field `sunsett`"), "{p}");
    let text = fs::read_to_string(fx.dir.join("catalogue.toml")).unwrap();
    let line = text.lines().position(|l| l.starts_with("sunsett")).unwrap() + 1;
    assert!(p.reason.contains(&format!("line {line}")), "{p}");
}

#[test]
fn an_unknown_key_in_a_consumer_is_an_error_with_its_path() {
    let fx = Fixture::new();
    fx.write("catalogue.toml", &fx.catalogue("pki"));
    fx.write(
        "consumers.toml",
        &edit(
            &fx.consumers(),
            "oauth_client_ids = [\"cpas-liege-app\"]",
            "oauth_client_ids = [\"cpas-liege-app\"]\norganization = \"typo\"",
        ),
    );
    let main = fx.write(
        "fsp.toml",
        &fx.main_including(&["catalogue.toml", "consumers.toml"]),
    );
    let problems = load(&main).unwrap_err().0;
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    let p = &problems[0];
    assert_eq!(file_name(p), "consumers.toml");
    assert_eq!(p.key, "consumer[1].organization", "{p}");
    assert!(p.reason.contains("unknown field `organization`"), "{p}");
}

#[test]
fn unknown_keys_in_inline_tables_are_errors() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "{ rate = \"50/s\", burst = 10 }",
        "{ rate = \"50/s\", bust = 10 }",
    );
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    assert_eq!(
        problems[0].key, "provider[0].consumer_limit.bust",
        "{}",
        problems[0]
    );
    assert!(
        problems[0].reason.contains("unknown field `bust`"),
        "{}",
        problems[0]
    );

    let problems = fx.problems_after(
        "certificates = [ { cn = \"monopinion.bruxelles.be\" } ]",
        "certificates = [ { cn = \"monopinion.bruxelles.be\", sha1 = \"00\" } ]",
    );
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    assert_eq!(
        problems[0].key, "consumer[0].certificates[0].sha1",
        "{}",
        problems[0]
    );
    assert!(
        problems[0].reason.contains("unknown field `sha1`"),
        "{}",
        problems[0]
    );
}

#[test]
fn a_value_of_the_wrong_type_names_its_key() {
    let fx = Fixture::new();
    let problems = fx.problems_after("retention_days = 3653", "retention_days = \"ten years\"");
    assert_eq!(problems.len(), 1, "{}", list(&problems));
    assert_eq!(problems[0].key, "audit.retention_days", "{}", problems[0]);
}

#[test]
fn the_admin_api_shares_no_port_with_consumers_and_the_audit_dir_is_a_directory() {
    let fx = Fixture::new();
    for admin in ["127.0.0.1:8443", "0.0.0.0:8443"] {
        let problems = fx.problems_after(
            "address     = \"127.0.0.1:9443\"",
            &format!("address     = \"{admin}\""),
        );
        expect_only(
            &problems,
            "fsp.toml",
            "admin.address",
            &["is the consumers' listener's address too"],
        );
    }
    fx.write("a-file", "");
    let problems = fx.problems_after("dir         = \"data/audit\"", "dir = \"a-file\"");
    expect_only(&problems, "fsp.toml", "audit.dir", &["is not a directory"]);
}

#[test]
fn a_retention_beyond_a_hundred_years_is_refused() {
    let fx = Fixture::new();
    for days in ["0", "36526", "4294967295"] {
        let problems =
            fx.problems_after("retention_days = 3653", &format!("retention_days = {days}"));
        expect_only(
            &problems,
            "fsp.toml",
            "audit.retention_days",
            &["must be from 1 to 36525 (100 years)"],
        );
    }
    let text = edit(
        &fx.single_file(),
        "retention_days = 3653",
        "retention_days = 36525",
    );
    assert_eq!(fx.load_single(&text).unwrap().audit.retention_days, 36525);
}

// ------------------------------------------------- the issue's lifecycle rules ----

fn bad_lifecycle_config(fx: &Fixture) -> PathBuf {
    fx.write("catalogue.toml", BAD_LIFECYCLE_CATALOGUE);
    // Consumers only: no authorisation depends on the broken services.
    let consumers = fx.consumers();
    let consumers = &consumers[..consumers.find("[[authorisation]]").unwrap()];
    fx.write("consumers.toml", consumers);
    fx.write(
        "fsp.toml",
        &fx.main_including(&["catalogue.toml", "consumers.toml"]),
    )
}

#[test]
fn four_live_versions_and_a_late_sunset_are_both_reported() {
    let fx = Fixture::new();
    let problems = load(&bad_lifecycle_config(&fx)).unwrap_err().0;
    let live = expect(
        &problems,
        "catalogue.toml",
        "family[0].service[0]",
        &["person/getPerson", "4 live versions", "at most 3"],
    );
    assert!(live.reason.contains("v1, v2, v3, v4"), "{live}");
    assert!(live.reason.contains("2023-01-01"), "{live}");
    let late = expect(
        &problems,
        "catalogue.toml",
        "family[0].service[1].version[0]",
        &["person/getAddress", "version v1", "2025-01-01", "2 years"],
    );
    assert!(
        late.reason.contains("2024-01-01"),
        "names the latest allowed sunset: {late}"
    );
    assert_eq!(problems.len(), 2, "{}", list(&problems));
}

#[test]
fn four_live_versions_alone() {
    let fx = Fixture::new();
    let text = format!(
        "{}{}",
        fx.single_file(),
        r#"
[[family.service]]
id       = "getFamily"
protocol = "rest"

[[family.service.version]]
version  = "v1"
upstream = "https://rrn.example/family/v1"
released = 2020-01-01

[[family.service.version]]
version  = "v2"
upstream = "https://rrn.example/family/v2"
released = 2021-06-01

[[family.service.version]]
version  = "v3"
upstream = "https://rrn.example/family/v3"
released = 2022-06-01

[[family.service.version]]
version  = "v4"
upstream = "https://rrn.example/family/v4"
released = 2023-06-01
"#
    );
    // The appended tables continue the last [[family]], after the consumers: TOML puts
    // `[[family.service]]` under the last family whatever comes between.
    let problems = fx.problems(&text);
    expect(
        &problems,
        "fsp.toml",
        "family[0].service[1]",
        &["person/getFamily", "4 live versions"],
    );

    // Retiring v1 before v4 is released makes it valid.
    let fixed = edit(
        &text,
        "released = 2020-01-01\n",
        "released = 2020-01-01\ndeprecated = 2022-06-01\nsunset = 2023-06-01\n",
    );
    fx.load_single(&fixed).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_sunset_exactly_two_years_after_deprecation_is_allowed_one_day_more_is_not() {
    let fx = Fixture::new();
    let ok = edit(
        &fx.single_file(),
        "sunset     = 2027-09-01",
        "sunset     = 2028-03-01",
    );
    fx.load_single(&ok).unwrap_or_else(|e| panic!("{e}"));
    let problems = fx.problems(&edit(&ok, "2028-03-01", "2028-03-02"));
    expect(
        &problems,
        "fsp.toml",
        "family[0].service[0].version[1]",
        &["person/getPerson", "version v2", "2028-03-02", "2028-03-01"],
    );
}

#[test]
fn a_sunset_without_deprecation_or_before_it_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("deprecated = 2026-03-01\n", "");
    expect(
        &problems,
        "fsp.toml",
        "family[0].service[0].version[1]",
        &["person/getPerson", "version v2", "not deprecated"],
    );
    let problems = fx.problems_after("sunset     = 2027-09-01", "sunset     = 2026-01-01");
    expect(
        &problems,
        "fsp.toml",
        "family[0].service[0].version[1]",
        &[
            "person/getPerson",
            "version v2",
            "must come after deprecation",
        ],
    );
}

/// A service with five versions whose lives do not overlap by more than 3, released on
/// the given dates.
fn five_releases(dates: [&str; 5]) -> String {
    let mut out = String::from("\n[[family.service]]\nid = \"getCitizen\"\nprotocol = \"rest\"\n");
    for (i, d) in dates.iter().enumerate() {
        out += &format!(
            "\n[[family.service.version]]\nversion = \"v{}\"\nupstream = \"https://rrn.example/citizen/v{}\"\nreleased = {d}\n",
            i + 1,
            i + 1
        );
        // Each version but the last two is retired when the one after next comes out.
        if i + 2 < dates.len() {
            out += &format!("deprecated = {}\nsunset = {}\n", dates[i + 1], dates[i + 2]);
        }
    }
    out
}

#[test]
fn five_releases_within_365_days_are_refused() {
    let fx = Fixture::new();
    let text = format!(
        "{}{}",
        fx.single_file(),
        five_releases([
            "2025-01-01",
            "2025-03-01",
            "2025-05-01",
            "2025-07-01",
            "2025-12-31"
        ])
    );
    let problems = fx.problems(&text);
    expect(
        &problems,
        "fsp.toml",
        "family[0].service[1]",
        &[
            "person/getCitizen",
            "releases 5 versions",
            "2025-01-01",
            "2025-12-31",
            "at most 4",
        ],
    );

    // 365 days between the first and the fifth: no 365-day window holds all five.
    let text = text.replace("2025-12-31", "2026-01-01");
    fx.load_single(&text).unwrap_or_else(|e| panic!("{e}"));
}

// ------------------------------------------------------------ other rules ----

#[test]
fn a_certificate_cn_shared_by_two_consumers_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "certificates = [ { sha256 = ",
        "certificates = [ { cn = \"monopinion.bruxelles.be\" }, { sha256 = ",
    );
    expect(
        &problems,
        "fsp.toml",
        "consumer[1]",
        &[
            "monopinion.bruxelles.be",
            "ville-bxl",
            "cpas-liege",
            "one consumer only",
        ],
    );
}

#[test]
fn an_oauth_client_id_shared_by_two_consumers_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "oauth_client_ids = [\"cpas-liege-app\"]",
        "oauth_client_ids = [\"cpas-liege-app\", \"ville-bxl-monopinion\"]",
    );
    expect(
        &problems,
        "fsp.toml",
        "consumer[1]",
        &[
            "OAuth client id ville-bxl-monopinion",
            "ville-bxl",
            "cpas-liege",
        ],
    );
}

#[test]
fn a_pinned_fingerprint_shared_by_two_consumers_is_refused() {
    let fx = Fixture::new();
    // Pinned alone by both.
    let pin = fx.pin.clone();
    let problems = fx.problems_after(
        "certificates = [ { cn = \"monopinion.bruxelles.be\" } ]",
        &format!("certificates = [ {{ sha256 = \"{pin}\" }} ]"),
    );
    expect(
        &problems,
        "fsp.toml",
        "consumer[1]",
        &[&pin, "fingerprint", "ville-bxl", "cpas-liege"],
    );

    // Pinned under a CN by one, alone by the other (colon-separated upper-case spelling).
    let colons = pin
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    let problems = fx.problems_after(
        "certificates = [ { cn = \"monopinion.bruxelles.be\" } ]",
        &format!(
            "certificates = [ {{ cn = \"monopinion.bruxelles.be\", sha256 = \"{colons}\" }} ]"
        ),
    );
    let p = problems
        .iter()
        .find(|p| p.reason.contains(&pin))
        .unwrap_or_else(|| panic!("no fingerprint problem:{}", list(&problems)));
    assert!(
        p.reason.contains("ville-bxl") && p.reason.contains("cpas-liege"),
        "{p}"
    );
    assert!(p.key.starts_with("consumer["), "{p}");
}

#[test]
fn a_malformed_fingerprint_is_refused() {
    let fx = Fixture::new();
    let pin = fx.pin.clone();
    let problems = fx.problems_after(&pin, &pin[..60]);
    expect(
        &problems,
        "fsp.toml",
        "consumer[1].certificates[0].sha256",
        &["64 hex digits"],
    );
}

#[test]
fn a_consumer_declared_twice_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "id           = \"cpas-liege\"",
        "id           = \"ville-bxl\"",
    );
    expect(
        &problems,
        "fsp.toml",
        "consumer[1]",
        &["consumer id ville-bxl is declared more than once"],
    );
}

#[test]
fn an_authorisation_for_an_unknown_consumer_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "consumer    = \"ville-bxl\"",
        "consumer    = \"ville-gand\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "authorisation[0].consumer",
        &["no consumer with id `ville-gand`"],
    );
}

#[test]
fn an_authorisation_for_an_unknown_service_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "service     = \"person/getPerson\"",
        "service     = \"person/getAddress\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "authorisation[0].service",
        &["no service `person/getAddress`", "family/service"],
    );
    // Without the family.
    let problems = fx.problems_after(
        "service     = \"person/getPerson\"",
        "service     = \"getPerson\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "authorisation[0].service",
        &["no service `getPerson`", "family/service"],
    );
}

#[test]
fn an_authorisation_for_an_unknown_version_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("versions    = [\"v3\"]", "versions    = [\"v3\", \"v9\"]");
    expect_only(
        &problems,
        "fsp.toml",
        "authorisation[0].versions[1]",
        &["person/getPerson", "no version `v9`"],
    );
}

#[test]
fn an_authorisation_with_bad_fields_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("kind = \"deliberation\"", "kind = \"gentleman-agreement\"");
    expect_only(
        &problems,
        "fsp.toml",
        "authorisation[0].legal_basis.kind",
        &["gentleman-agreement"],
    );
    let problems = fx.problems_after("valid_until = 2026-10-09", "valid_until = 2020-10-08");
    expect_only(
        &problems,
        "fsp.toml",
        "authorisation[0].valid_until",
        &["comes before valid_from"],
    );
    let problems = fx.problems_after(
        "valid_from  = 2020-10-09",
        "valid_from  = 2020-10-09T10:00:00Z",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "authorisation[0].valid_from",
        &["plain date"],
    );
    let problems = fx.problems_after(
        "purpose     = \"participation-vote\"",
        "purpose     = \" \"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "authorisation[0].purpose",
        &["` ` cannot be sent to providers in the FSP-Purpose header"],
    );
}

/// Each name the gateway puts in paths, headers, file names and records is refused, at
/// its own key, when another component could read it differently (or not at all).
#[test]
fn identifiers_and_header_texts_are_refused_where_they_could_be_misread() {
    let fx = Fixture::new();
    let cases = [
        (
            "node        = \"test-node-1\"",
            "node        = \"../node\"",
            "node",
            "not an identifier",
        ),
        (
            "id           = \"ville-bxl\"",
            "id = \"ville bxl\"",
            "consumer[0].id",
            "not an identifier",
        ),
        (
            "id     = \"rrn\"",
            "id = \"rrn\\r\\nX-Evil: 1\"",
            "provider[0].id",
            "`rrn\\r\\nX-Evil: 1` is not",
        ),
        (
            "id       = \"person\"",
            "id = \"per/son\"",
            "family[0].id",
            "not an identifier",
        ),
        (
            "id       = \"getPerson\"",
            "id = \"get%2FPerson\"",
            "family[0].service[0].id",
            "not an identifier",
        ),
        (
            "version  = \"v3\"",
            "version = \"..\"",
            "family[0].service[0].version[0].version",
            "not an identifier",
        ),
        (
            "id          = \"csi-2020-123-person\"",
            "id = \"csi 2020\"",
            "authorisation[0].id",
            "not an identifier",
        ),
        (
            "purpose     = \"participation-vote\"",
            "purpose = \"vote\\u0000\"",
            "authorisation[0].purpose",
            "FSP-Purpose header",
        ),
        (
            "reference = \"CSI/20/123\"",
            "reference = \"Délibération 20/123\"",
            "authorisation[0].legal_basis.reference",
            "FSP-Legal-Basis header",
        ),
    ];
    for (from, to, key, reason) in cases {
        // A renamed consumer, provider or family also leaves references to it dangling.
        expect(&fx.problems_after(from, to), "fsp.toml", key, &[reason]);
    }
    // A purpose with a space can be sent, and is accepted.
    let text = edit(
        &fx.single_file(),
        "purpose     = \"participation-vote\"",
        "purpose     = \"participation vote\"",
    );
    fx.load_single(&text).unwrap();
}

#[test]
fn an_identifier_is_letters_digits_dash_underscore_and_dot() {
    for good in [
        "v3",
        "v2.1",
        "ville-bxl",
        "A_b-c.9",
        "0",
        &"a".repeat(MAX_ID_LEN),
    ] {
        assert_eq!(id_problem(good), None, "{good:?}");
    }
    let long = "a".repeat(MAX_ID_LEN + 1);
    for bad in [
        "", ".", "..", ".hidden", "-x", "_x", "a/b", "a b", "a\n", "é", "a%2F", "a{b}", &long,
    ] {
        assert!(id_problem(bad).is_some(), "{bad:?}");
    }
}

#[test]
fn a_family_of_an_unknown_provider_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("provider = \"rrn\"", "provider = \"onem\"");
    expect_only(
        &problems,
        "fsp.toml",
        "family[0].provider",
        &["no provider with id `onem`"],
    );
}

#[test]
fn a_limit_for_an_unknown_consumer_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "consumer_limits = [ { consumer = \"ville-bxl\"",
        "consumer_limits = [ { consumer = \"ville-gand\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "provider[0].consumer_limits[0].consumer",
        &["no consumer with id `ville-gand`"],
    );
}

#[test]
fn a_rate_that_does_not_parse_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("rate = \"1000/s\"", "rate = \"fast\"");
    expect_only(
        &problems,
        "fsp.toml",
        "provider[0].limit.rate",
        &["`fast` is not a rate", "1000/s"],
    );
    let problems = fx.problems_after("rate = \"50/s\"", "rate = \"50/fortnight\"");
    expect_only(
        &problems,
        "fsp.toml",
        "provider[0].consumer_limit.rate",
        &["`50/fortnight`"],
    );
    let problems = fx.problems_after("rate = \"200/s\"", "rate = \"0/s\"");
    expect_only(
        &problems,
        "fsp.toml",
        "provider[0].consumer_limits[0].rate",
        &["`0/s`"],
    );
}

#[test]
fn a_duration_that_does_not_parse_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("drain_timeout = \"15s\"", "drain_timeout = \"soon\"");
    expect_only(
        &problems,
        "fsp.toml",
        "listener.drain_timeout",
        &["`soon` is not a duration"],
    );
    let problems = fx.problems_after(
        "connect_timeout = \"3s\"",
        "connect_timeout = \"3 fortnights\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "provider[0].connect_timeout",
        &["`3 fortnights` is not a duration"],
    );
    let problems = fx.problems_after(
        "require_certificate_binding = false",
        "require_certificate_binding = false\nleeway = \"1.5s\"",
    );
    expect_only(&problems, "fsp.toml", "oauth.leeway", &["`1.5s`"]);
}

/// A leeway of hours or days (a typo: `60m` for `60s`) would accept tokens long
/// expired: more than 5 minutes is refused.
#[test]
fn an_oauth_leeway_beyond_five_minutes_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "require_certificate_binding = false",
        "require_certificate_binding = false\nleeway = \"60m\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "oauth.leeway",
        &["3600s is more than 5m"],
    );
    let config = fx
        .load_single(&edit(
            &fx.single_file(),
            "require_certificate_binding = false",
            "require_certificate_binding = false\nleeway = \"5m\"",
        ))
        .unwrap();
    assert_eq!(
        config.oauth.map(|o| o.leeway),
        Some(Duration::from_secs(300))
    );
}

/// A duration of zero that would make every call fail, or silently switch a protection
/// off, is refused with its file, key and line; one whose zero has a documented meaning
/// (no delay, no leeway, no idle connection kept, no queueing) is accepted.
#[test]
fn durations_that_zero_would_break_are_refused_with_their_line() {
    let fx = Fixture::new();
    let text = edit(
        &edit(
            &fx.single_file(),
            "drain_timeout = \"15s\"",
            "drain_timeout = \"0s\"\nhandshake_timeout = \"0s\"\nheader_read_timeout = \"0ms\"\nrequest_body_timeout = \"999ms\"\nresponse_send_timeout = \"0s\"",
        ),
        "connect_timeout = \"3s\"",
        "connect_timeout = \"0s\"\nresponse_timeout = \"0ms\"",
    );
    let line_of = |written: &str| {
        text.lines()
            .position(|l| l.starts_with(written))
            .map(|i| format!("(line {})", i + 1))
            .unwrap()
    };
    let problems = fx.problems(&text);
    for (key, written, min) in [
        ("listener.drain_timeout", "drain_timeout = ", "at least 1s"),
        (
            "listener.handshake_timeout",
            "handshake_timeout = ",
            "at least 1s",
        ),
        (
            "listener.header_read_timeout",
            "header_read_timeout = ",
            "at least 1s",
        ),
        (
            "listener.request_body_timeout",
            "request_body_timeout = ",
            "at least 1s",
        ),
        (
            "listener.response_send_timeout",
            "response_send_timeout = ",
            "at least 1s",
        ),
        (
            "provider[0].connect_timeout",
            "connect_timeout = ",
            "at least 1ms",
        ),
        (
            "provider[0].response_timeout",
            "response_timeout = ",
            "at least 1ms",
        ),
    ] {
        expect(&problems, "fsp.toml", key, &[min, &line_of(written)]);
    }
    assert_eq!(problems.len(), 7, "{}", list(&problems));

    // Zero means something documented for these: accepted.
    let text = edit(
        &edit(
            &edit(
                &fx.single_file(),
                "drain_timeout = \"15s\"",
                "drain_timeout = \"15s\"\nshutdown_delay = \"0s\"",
            ),
            "connect_timeout = \"3s\"",
            "connect_timeout = \"3s\"\npool_idle_timeout = \"0s\"\nqueue_timeout = \"0s\"",
        ),
        "require_certificate_binding = false",
        "require_certificate_binding = false\nleeway = \"0s\"",
    );
    let config = fx.load_single(&text).unwrap();
    assert_eq!(config.providers[0].queue_timeout, Duration::ZERO);
    assert_eq!(config.providers[0].pool_idle_timeout, Duration::ZERO);
    assert_eq!(config.listener.shutdown_delay, Duration::ZERO);
}

#[test]
fn a_bad_source_ip_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("192.0.2.0/24", "192.0.2.0/33");
    expect_only(
        &problems,
        "fsp.toml",
        "consumer[0].source_ips[0]",
        &["`192.0.2.0/33` is not an IP address or CIDR block"],
    );
    let problems = fx.problems_after("\"198.51.100.7\"", "\"intranet.example\"");
    expect_only(
        &problems,
        "fsp.toml",
        "consumer[1].source_ips[1]",
        &["`intranet.example`"],
    );
}

#[test]
fn a_bad_environment_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("environment = \"INT\"", "environment = \"DEV\"");
    expect_only(
        &problems,
        "fsp.toml",
        "environment",
        &["`DEV` is not INT or PROD"],
    );
    let problems = fx.problems_after("environment = \"INT\"\n", "");
    expect_only(&problems, "fsp.toml", "environment", &["missing"]);
}

#[test]
fn oauth_needs_exactly_one_key_source() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "jwks_url    = \"https://idp.example/jwks\"",
        "jwks_url    = \"https://idp.example/jwks\"\njwks_file = \"jwks.json\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "oauth",
        &["exactly one of jwks_url and jwks_file"],
    );
    let problems = fx.problems_after("jwks_url    = \"https://idp.example/jwks\"\n", "");
    expect_only(
        &problems,
        "fsp.toml",
        "oauth",
        &["exactly one of jwks_url and jwks_file"],
    );
}

#[test]
fn oauth_refuses_symmetric_and_none_algorithms() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "algorithms  = [\"RS256\", \"ES256\", \"PS256\", \"EdDSA\"]",
        "algorithms  = [\"RS256\", \"HS256\"]",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "oauth.algorithms[1]",
        &["`HS256` is not allowed", "asymmetric"],
    );
    let problems = fx.problems_after(
        "algorithms  = [\"RS256\", \"ES256\", \"PS256\", \"EdDSA\"]",
        "algorithms  = [\"none\", \"ES256\", \"HS512\"]",
    );
    expect(
        &problems,
        "fsp.toml",
        "oauth.algorithms[0]",
        &["`none` is not allowed"],
    );
    expect(
        &problems,
        "fsp.toml",
        "oauth.algorithms[2]",
        &["`HS512` is not allowed"],
    );
    assert_eq!(problems.len(), 2, "{}", list(&problems));
}

#[test]
fn a_missing_server_certificate_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("pki/server.pem", "pki/missing.pem");
    expect_only(
        &problems,
        "fsp.toml",
        "listener.server_cert",
        &["missing.pem", "cannot read file"],
    );
}

#[test]
fn a_server_key_that_does_not_match_the_certificate_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("pki/server.key", "pki/other.key");
    expect_only(
        &problems,
        "fsp.toml",
        "listener.server_key",
        &["other.key", "does not match", "server.pem"],
    );
}

#[test]
fn a_server_key_that_is_not_a_key_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("pki/server.key", "pki/consumers-ca.pem");
    expect_only(
        &problems,
        "fsp.toml",
        "listener.server_key",
        &["consumers-ca.pem", "no usable PEM private key"],
    );
}

#[test]
fn a_client_ca_that_is_not_pem_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("pki/consumers-ca.pem", "pki/not-pem.pem");
    expect_only(
        &problems,
        "fsp.toml",
        "listener.client_ca",
        &["not-pem.pem", "no PEM certificate"],
    );
}

#[test]
fn a_crl_that_is_not_pem_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("pki/consumers.crl", "pki/not-pem.pem");
    expect_only(
        &problems,
        "fsp.toml",
        "listener.crls",
        &["not-pem.pem", "no PEM CRL"],
    );
}

#[test]
fn a_provider_client_certificate_without_its_key_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("client_key    = \"pki/fsp-client.key\"\n", "");
    expect(
        &problems,
        "fsp.toml",
        "provider[0]",
        &["client_cert and client_key go together"],
    );
}

#[test]
fn a_missing_admin_tokens_file_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "tokens_file = \"admin-tokens\"",
        "tokens_file = \"admin-tokenz\"",
    );
    expect(
        &problems,
        "fsp.toml",
        "admin.tokens_file",
        &["admin-tokenz", "cannot read"],
    );
}

#[test]
fn bad_listener_addresses_are_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "address     = \"127.0.0.1:8443\"",
        "address     = \"localhost\"",
    );
    expect_only(&problems, "fsp.toml", "listener.address", &["`localhost`"]);
    let problems = fx.problems_after(
        "public_url  = \"https://fsp.example.be/\"",
        "public_url  = \"fsp.example.be\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "listener.public_url",
        &["`fsp.example.be`"],
    );
}

#[test]
fn a_bad_version_date_or_upstream_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after("released = 2026-03-01", "released = 2026-03-01T00:00:00Z");
    expect(
        &problems,
        "fsp.toml",
        "family[0].service[0].version[0].released",
        &["plain date"],
    );
    let problems = fx.problems_after(
        "upstream = \"https://rrn.example/person/v3\"",
        "upstream = \"ftp://rrn.example/person/v3\"",
    );
    expect(
        &problems,
        "fsp.toml",
        "family[0].service[0].version[0]",
        &[
            "person/getPerson",
            "version v3",
            "absolute http:// or https:// URL",
        ],
    );
    let problems = fx.problems_after("protocol = \"soap\"", "protocol = \"grpc\"");
    expect(
        &problems,
        "fsp.toml",
        "family[0].service[0].protocol",
        &["`grpc`"],
    );
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let fx = Fixture::new();
    let text = fx.single_file();
    let text = edit(&text, "environment = \"INT\"", "environment = \"DEV\"");
    let text = edit(&text, "rate = \"1000/s\"", "rate = \"fast\"");
    let text = edit(&text, "192.0.2.0/24", "192.0.2.0/33");
    let text = edit(
        &text,
        "algorithms  = [\"RS256\",",
        "algorithms  = [\"HS256\",",
    );
    let text = edit(&text, "drain_timeout = \"15s\"", "drain_timeout = \"soon\"");
    let text = edit(&text, "sunset     = 2027-09-01", "sunset     = 2029-09-01");
    let problems = fx.problems(&text);
    for key in [
        "environment",
        "provider[0].limit.rate",
        "consumer[0].source_ips[0]",
        "oauth.algorithms[0]",
        "listener.drain_timeout",
        "family[0].service[0].version[1]",
    ] {
        assert!(
            problems.iter().any(|p| p.key == key),
            "{key} not reported:{}",
            list(&problems)
        );
    }
}

#[test]
fn problems_display_file_key_and_reason() {
    let p = Problem {
        file: PathBuf::from("/etc/fsp/catalogue.toml"),
        key: "family[0].service[1]".into(),
        reason: "service person/getPerson would have 4 live versions".into(),
    };
    assert_eq!(
        p.to_string(),
        "/etc/fsp/catalogue.toml: family[0].service[1]: service person/getPerson would have 4 live versions"
    );
    let whole = Problem {
        key: String::new(),
        ..p.clone()
    };
    assert_eq!(
        whole.to_string(),
        "/etc/fsp/catalogue.toml: service person/getPerson would have 4 live versions"
    );
    let e = ConfigError(vec![p, whole]).to_string();
    assert!(
        e.starts_with("the configuration has 2 problem(s):\n"),
        "{e}"
    );
    assert_eq!(
        e.lines().filter(|l| l.starts_with("  - ")).count(),
        2,
        "{e}"
    );
}

// ------------------------------------------------------------ rates, durations ----

#[test]
fn rates_and_durations_parse_the_documented_spellings() {
    let r = |s| parse_rate(s, Some(5));
    assert_eq!(
        r("1000/s"),
        Some(Rate {
            count: 1000,
            per: Duration::from_secs(1),
            burst: 5
        })
    );
    assert_eq!(
        r("60_000/min").map(|r| (r.count, r.per)),
        Some((60_000, Duration::from_secs(60)))
    );
    assert_eq!(
        r(" 100 / h ").map(|r| r.per),
        Some(Duration::from_secs(3600))
    );
    assert_eq!(
        r("10000/day").map(|r| r.per),
        Some(Duration::from_secs(86_400))
    );
    assert_eq!(parse_rate("3/s", None).map(|r| r.burst), Some(0));
    for junk in [
        "fast",
        "",
        "/s",
        "10",
        "10/",
        "0/s",
        "-1/s",
        "1.5/s",
        "10/s/s",
        "10/fortnight",
    ] {
        assert_eq!(parse_rate(junk, None), None, "{junk:?}");
    }

    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
    assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("2min"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_duration(" 10 s "), Some(Duration::from_secs(10)));
    for junk in [
        "soon",
        "",
        "5",
        "s",
        "1.5s",
        "-5s",
        "5d",
        "5 seconds",
        "5sms",
    ] {
        assert_eq!(parse_duration(junk), None, "{junk:?}");
    }
}

const DURATION_UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("s", 1000),
    ("m", 60_000),
    ("min", 60_000),
    ("h", 3_600_000),
];
const RATE_UNITS: &[(&str, u64)] = &[
    ("s", 1),
    ("sec", 1),
    ("second", 1),
    ("m", 60),
    ("min", 60),
    ("minute", 60),
    ("h", 3600),
    ("hour", 3600),
    ("d", 86_400),
    ("day", 86_400),
];

fn is_duration(s: &str) -> bool {
    let t = s.trim();
    let unit = t.trim_start_matches(|c: char| c.is_ascii_digit());
    unit.len() < t.len() && DURATION_UNITS.iter().any(|(name, _)| *name == unit.trim())
}

proptest! {
    #[test]
    fn durations_round_trip(
        n in 0u64..=(u64::MAX / 3600),
        unit in 0..DURATION_UNITS.len(),
        pad in "[ ]{0,2}",
    ) {
        let (name, millis) = DURATION_UNITS[unit];
        let text = format!("{pad}{n}{pad}{name}{pad}");
        let expected = match name {
            "ms" => Duration::from_millis(n),
            _ => Duration::from_secs(n * (millis / 1000)),
        };
        prop_assert_eq!(parse_duration(&text), Some(expected));
    }

    #[test]
    fn junk_durations_are_refused(s in "\\PC{0,12}") {
        prop_assume!(!is_duration(&s));
        prop_assert_eq!(parse_duration(&s), None);
    }

    #[test]
    fn rates_round_trip(
        count in 1u64..=u64::MAX / 2,
        unit in 0..RATE_UNITS.len(),
        burst in proptest::option::of(any::<u32>()),
    ) {
        let (name, secs) = RATE_UNITS[unit];
        let rate = parse_rate(&format!("{count}/{name}"), burst);
        prop_assert_eq!(
            rate,
            Some(Rate { count, per: Duration::from_secs(secs), burst: burst.unwrap_or(0) })
        );
    }

    #[test]
    fn rates_without_a_known_unit_or_count_are_refused(
        count in "[0-9]{0,4}",
        unit in "[a-z]{0,8}",
    ) {
        let known = RATE_UNITS.iter().any(|(n, _)| *n == unit);
        let positive = count.parse::<u64>().is_ok_and(|c| c > 0);
        let parsed = parse_rate(&format!("{count}/{unit}"), None);
        prop_assert_eq!(parsed.is_some(), known && positive, "{}/{}", count, unit);
    }

    #[test]
    fn junk_rates_are_refused(s in "[^/]{0,12}") {
        prop_assert_eq!(parse_rate(&s, None), None);
    }
}

// ------------------------------------------------- loader bugs (see report) ----

/// Regression (fixed): a duration too large for `u64` seconds overflows in `parse_duration` (panics in a
/// debug build, wraps in release) instead of being refused.
#[test]
fn a_huge_duration_is_refused_not_overflowed() {
    let n = u64::MAX / 3600 + 1;
    assert_eq!(parse_duration(&format!("{n}h")), None);
    assert_eq!(parse_duration(&format!("{}m", u64::MAX / 60 + 1)), None);
}

/// Regression (fixed): one broken service empties the whole catalogue, so every authorisation of every
/// (valid) service is also reported as referring to an undeclared service.
#[test]
fn a_broken_service_does_not_make_authorisations_of_it_unresolvable() {
    let fx = Fixture::new();
    let problems = fx.problems_after("sunset     = 2027-09-01", "sunset     = 2029-09-01");
    expect_only(
        &problems,
        "fsp.toml",
        "family[0].service[0].version[1]",
        &["person/getPerson", "v2"],
    );
}

/// Regression (fixed): one credential conflict empties the whole consumer registry, so every reference to
/// any (declared) consumer is also reported as undeclared.
#[test]
fn a_consumer_conflict_does_not_make_every_consumer_unknown() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "oauth_client_ids = [\"cpas-liege-app\"]",
        "oauth_client_ids = [\"ville-bxl-monopinion\"]",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "consumer[1]",
        &["ville-bxl-monopinion"],
    );
}

#[test]
fn a_duplicate_of_a_provider_that_failed_to_build_is_still_reported() {
    let fx = Fixture::new();
    let text = edit(&fx.single_file(), "pki/providers-ca.pem", "pki/not-pem.pem")
        + "\n[[provider]]\nid   = \"rrn\"\nname = \"Registre national, again\"\n";
    let problems = fx.problems(&text);
    expect(
        &problems,
        "fsp.toml",
        "provider[1].id",
        &["provider rrn is declared more than once"],
    );
}

/// Regression (fixed): a provider whose TLS files are broken is dropped, so its families are also
/// reported as referring to an undeclared provider.
#[test]
fn a_provider_with_a_bad_certificate_is_still_declared() {
    let fx = Fixture::new();
    let problems = fx.problems_after("pki/providers-ca.pem", "pki/not-pem.pem");
    expect_only(
        &problems,
        "fsp.toml",
        "provider[0].upstream_ca",
        &["no PEM certificate"],
    );
}

/// Regression (fixed): a service declared twice in one family is only reported when nothing else is wrong
/// (and then against the main file and key `family`).
#[test]
fn a_service_declared_twice_is_reported_with_other_problems() {
    let fx = Fixture::new();
    let twice = format!(
        "{}{}",
        fx.single_file(),
        "\n[[family.service]]\nid = \"getPerson\"\nprotocol = \"rest\"\n\n[[family.service.version]]\nversion = \"v1\"\nupstream = \"https://rrn.example/v1\"\nreleased = 2020-01-01\n",
    );
    // Alone, it is reported where the second declaration is.
    let alone = fx.problems(&twice);
    assert!(
        alone.iter().any(|p| p.key == "family[0].service[1].id"
            && p.reason.contains("person/getPerson")
            && p.reason.contains("declared more than once")),
        "{}",
        list(&alone)
    );
    // Together with an unrelated problem, it disappears.
    let problems = fx.problems(&edit(
        &twice,
        "environment = \"INT\"",
        "environment = \"DEV\"",
    ));
    assert!(
        problems
            .iter()
            .any(|p| p.reason.contains("declared more than once")),
        "the duplicate service is not reported:{}",
        list(&problems)
    );
}

/// Regression (fixed): a file included twice is reported against the included file, with key `include`
/// that it may not even contain, instead of the including file and its `include[i]`.
#[test]
fn a_repeated_include_is_located_at_the_include_that_repeats_it() {
    let fx = Fixture::new();
    fx.write("catalogue.toml", &fx.catalogue("pki"));
    fx.write("consumers.toml", &fx.consumers());
    let main = fx.write(
        "fsp.toml",
        &fx.main_including(&["catalogue.toml", "consumers.toml", "catalogue.toml"]),
    );
    let problems = load(&main).unwrap_err().0;
    expect_only(&problems, "fsp.toml", "include[2]", &["catalogue.toml"]);
}

/// Regression (fixed): when `server_cert` and `server_key` name the same file (a combined PEM) that holds
/// no key, the problem is filed under `listener.server_cert` instead of `listener.server_key`.
#[test]
fn a_combined_pem_without_a_key_is_reported_at_server_key() {
    let fx = Fixture::new();
    let problems = fx.problems_after("pki/server.key", "pki/server.pem");
    expect_only(
        &problems,
        "fsp.toml",
        "listener.server_key",
        &["no usable PEM private key"],
    );
}

/// Regression (fixed): `jwks_file` is not checked to exist, although `fsp check` promises that files exist.
#[test]
fn a_missing_jwks_file_is_refused() {
    let fx = Fixture::new();
    let problems = fx.problems_after(
        "jwks_url    = \"https://idp.example/jwks\"",
        "jwks_file   = \"missing-jwks.json\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "oauth.jwks_file",
        &["missing-jwks.json"],
    );
}

#[test]
fn hardening_limits_are_read_and_zero_is_refused_where_it_is() {
    let f = Fixture::new();
    let text = edit(
        &edit(
            &edit(
                &f.single_file(),
                "drain_timeout = \"15s\"",
                "drain_timeout = \"15s\"\nrequest_body_timeout = \"7s\"\nmax_connections = 300\nmax_connections_per_ip = 20\nmax_anonymous_connections = 50\nmax_anonymous_connections_per_ip = 5",
            ),
            "connect_timeout = \"3s\"",
            "connect_timeout = \"3s\"\nmax_connections = 40\nqueue_timeout = \"250ms\"",
        ),
        "protocol = \"soap\"",
        "protocol = \"soap\"\nxml_limits = { max_depth = 12, max_text_length = 4096 }",
    );
    let c = f.load_single(&text).unwrap();
    assert_eq!(c.listener.request_body_timeout, Duration::from_secs(7));
    assert_eq!(
        c.listener.connections,
        ConnectionLimits {
            max: 300,
            max_explicit: true,
            per_ip: 20,
            anonymous: 50,
            anonymous_per_ip: 5
        }
    );
    assert_eq!(c.providers[0].max_connections, 40);
    assert_eq!(c.providers[0].cap.max(), 40);
    assert_eq!(c.providers[0].queue_timeout, Duration::from_millis(250));
    let options = c.service_options["person/getPerson"];
    let xml = options.xml.unwrap();
    assert_eq!((xml.max_depth, xml.max_text_length), (12, 4096));
    assert_eq!(
        xml.max_attributes,
        crate::xml::Limits::default().max_attributes
    );
    assert!(!options.faults_as_500);

    // The checks turned off, and faults under 500, for the SOAP service.
    let off = edit(
        &text,
        "xml_limits = { max_depth = 12, max_text_length = 4096 }",
        "xml_checks = false\nsoap_faults_as_500 = true",
    );
    let c = f.load_single(&off).unwrap();
    let options = c.service_options["person/getPerson"];
    assert_eq!(options.xml, None);
    assert!(options.faults_as_500);
    // Both ways at once, and faults under 500 for a REST service, are refused.
    let both = edit(
        &text,
        "xml_limits = { max_depth = 12, max_text_length = 4096 }",
        "xml_limits = { max_depth = 12 }\nxml_checks = false",
    );
    expect(
        &f.problems(&both),
        "fsp.toml",
        "family[0].service[0].xml_limits",
        &["no effect with xml_checks = false"],
    );
    let rest = edit(
        &edit(&text, "protocol = \"soap\"", "protocol = \"rest\""),
        "xml_limits = { max_depth = 12, max_text_length = 4096 }",
        "soap_faults_as_500 = true",
    );
    expect(
        &f.problems(&rest),
        "fsp.toml",
        "family[0].service[0].soap_faults_as_500",
        &["SOAP services only"],
    );

    let zeros = edit(
        &edit(
            &text,
            "max_anonymous_connections_per_ip = 5",
            "max_anonymous_connections_per_ip = 0",
        ),
        "xml_limits = { max_depth = 12",
        "xml_limits = { max_depth = 0",
    );
    let problems = f.problems(&zeros);
    expect(
        &problems,
        "fsp.toml",
        "listener.max_anonymous_connections_per_ip",
        &["at least 1"],
    );
    expect(
        &problems,
        "fsp.toml",
        "family[0].service[0].xml_limits.max_depth",
        &["at least 1"],
    );
    let problems = f.problems_after(
        "connect_timeout = \"3s\"",
        "connect_timeout = \"3s\"\nqueue_timeout = \"soon\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "provider[0].queue_timeout",
        &["not a duration"],
    );
}

#[test]
fn admin_tls_serves_the_listener_certificate_and_asks_admins_for_theirs() {
    let f = Fixture::new();
    let text = edit(
        &f.single_file(),
        "tokens_file = \"admin-tokens\"",
        "tokens_file = \"admin-tokens\"\ntls = true",
    );
    let config = f.load_single(&text).expect("valid");
    let tls = config
        .admin
        .as_ref()
        .unwrap()
        .access
        .tls
        .clone()
        .expect("tls");
    assert_eq!(tls.alpn_protocols, vec![b"http/1.1".to_vec()]);

    let text = edit(
        &f.single_file(),
        "tokens_file = \"admin-tokens\"",
        "tls = true\nadmin_cns = [\"ops.example.be\"]",
    );
    let config = f
        .load_single(&text)
        .expect("admin certificates alone are enough");
    let access = &config.admin.as_ref().unwrap().access;
    assert_eq!(access.cns, vec!["ops.example.be".to_owned()]);
    assert!(access.tokens.is_empty());
    assert!(access.tls.is_some());
}

#[test]
fn admin_certificate_keys_are_checked() {
    let f = Fixture::new();
    let problems = f.problems_after(
        "tokens_file = \"admin-tokens\"",
        "tokens_file = \"admin-tokens\"\nadmin_cns = [\"ops.example.be\"]",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "admin.admin_cns",
        &["set tls = true"],
    );

    let problems = f.problems_after(
        "tokens_file = \"admin-tokens\"",
        "tokens_file = \"admin-tokens\"\ntls = true\nadmin_ca = \"pki/consumers-ca.pem\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "admin.admin_ca",
        &["set admin_cns too"],
    );

    let problems = f.problems_after(
        "tokens_file = \"admin-tokens\"",
        "tokens_file = \"admin-tokens\"\ntls = true\nadmin_cns = [\"ops.example.be\", \"\", \"ops.example.be\"]",
    );
    expect(&problems, "fsp.toml", "admin.admin_cns[1]", &["empty CN"]);
    expect(
        &problems,
        "fsp.toml",
        "admin.admin_cns[2]",
        &["given twice"],
    );

    let problems = f.problems_after(
        "tokens_file = \"admin-tokens\"",
        "tokens_file = \"admin-tokens\"\ntls = true\nadmin_cns = [\"ops.example.be\"]\nadmin_ca = \"pki/missing.pem\"",
    );
    expect_only(&problems, "fsp.toml", "admin.admin_ca", &["missing.pem"]);
}

#[test]
fn an_admin_cn_is_never_a_consumer_cn_under_the_same_ca() {
    let f = Fixture::new();
    let problems = f.problems_after(
        "tokens_file = \"admin-tokens\"",
        "tokens_file = \"admin-tokens\"\ntls = true\nadmin_cns = [\"monopinion.bruxelles.be\"]",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "consumer[0].certificates",
        &["monopinion.bruxelles.be", "admin_cns"],
    );
    // With administrators' own CA, the same CN is a different certificate.
    let text = edit(
        &f.single_file(),
        "tokens_file = \"admin-tokens\"",
        "tokens_file = \"admin-tokens\"\ntls = true\nadmin_cns = [\"monopinion.bruxelles.be\"]\nadmin_ca = \"pki/consumers-ca.pem\"",
    );
    f.load_single(&text).expect("valid with admin_ca");
}

#[test]
fn an_include_naming_a_directory_is_blamed_on_the_include_entry() {
    let f = Fixture::new();
    let problems = f.problems("include = [\"\"]\nenvironment = \"INT\"\n");
    expect(&problems, "fsp.toml", "include[0]", &["cannot read"]);
}

#[test]
fn backends_and_token_settings_are_parsed_when_loaded() {
    let f = Fixture::new();
    let problems = f.problems_after(
        "jwks_url    = \"https://idp.example/jwks\"",
        "jwks_url    = \"idp.example/jwks\"",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "oauth.jwks_url",
        &["not an absolute https:// URL"],
    );
    let problems = f.problems_after(
        "backend     = \"local\"\non_backend_error",
        "backend     = \"local\"\nurl = \"redis://127.0.0.1:6379\"\non_backend_error",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "throttle.url",
        &["only used by the redis backend"],
    );
    let problems = f.problems_after(
        "backend     = \"local\"\non_backend_error",
        "backend     = \"redis\"\nurl = \"http://127.0.0.1:6379\"\non_backend_error",
    );
    expect_only(&problems, "fsp.toml", "throttle.url", &["not a Redis URL"]);
    let c = f
        .load_single(&edit(
            &f.single_file(),
            "backend     = \"local\"\non_backend_error",
            "backend     = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\non_backend_error",
        ))
        .unwrap();
    assert_eq!(
        c.throttle.backend,
        ThrottleBackend::Redis {
            url: "redis://127.0.0.1:6379".into(),
            tls: None
        }
    );
    // TLS to Redis, with the CA that issued its certificate.
    let ca = certs::devpki::DevCa::new("Redis CA").unwrap();
    f.write("pki/redis-ca.pem", &ca.cert_pem());
    let c = f
        .load_single(&edit(
            &f.single_file(),
            "backend     = \"local\"\non_backend_error",
            "backend     = \"redis\"\nurl = \"rediss://redis.internal:6380\"\ntls = { ca = \"pki/redis-ca.pem\" }\non_backend_error",
        ))
        .unwrap();
    let ThrottleBackend::Redis { tls: Some(tls), .. } = c.throttle.backend else {
        panic!("{:?}", c.throttle.backend);
    };
    assert_eq!(tls.ca, Some(ca.cert_pem().into_bytes()));
}

#[test]
fn backend_urls_can_come_from_files_of_their_own() {
    let fx = Fixture::new();
    fx.write("secrets/redis-url", "redis://:s3cret@127.0.0.1:6379\n");
    let text = edit(
        &fx.single_file(),
        "backend     = \"local\"",
        "backend     = \"redis\"\nurl_file    = \"secrets/redis-url\"",
    );
    let config = fx.load_single(&text).unwrap();
    assert_eq!(
        config.throttle.backend,
        ThrottleBackend::Redis {
            url: "redis://:s3cret@127.0.0.1:6379".into(),
            tls: None
        }
    );
    // Both forms at once, and a file that is not there, are named with their key.
    let both = edit(
        &text,
        "url_file    = \"secrets/redis-url\"",
        "url_file    = \"secrets/redis-url\"\nurl = \"redis://127.0.0.1\"",
    );
    expect_only(
        &fx.problems(&both),
        "fsp.toml",
        "throttle.url_file",
        &["not both"],
    );
    let missing = edit(&text, "secrets/redis-url", "secrets/none");
    expect_only(
        &fx.problems(&missing),
        "fsp.toml",
        "throttle.url_file",
        &["cannot read", "secrets/none"],
    );
}

#[test]
fn cluster_telemetry_proxy_protocol_and_shutdown_delay_load() {
    let fx = Fixture::new();
    let text = edit(
        &fx.single_file(),
        "drain_timeout = \"15s\"",
        "drain_timeout = \"15s\"\nproxy_protocol_from = [\"10.0.0.0/24\", \"2001:db8::1\"]\nshutdown_delay = \"5s\"",
    );
    let text = edit(
        &text,
        "[throttle]",
        "[cluster]\nredis_url = \"redis://127.0.0.1:6379\"\n\n[telemetry]\notlp_endpoint = \"grpc://collector:4317\"\nservice_name = \"fsp-int\"\nsampling_ratio = 0.05\n\n[throttle]",
    );
    let config = fx.load_single(&text).unwrap();
    assert_eq!(config.listener.shutdown_delay, Duration::from_secs(5));
    assert_eq!(config.listener.proxy_protocol_from.len(), 2);
    assert!(config.cluster.is_some());
    let t = config.telemetry.unwrap();
    assert_eq!(
        t.endpoint,
        OtlpEndpoint::Grpc("http://collector:4317".into())
    );
    assert_eq!(t.service_name, "fsp-int");
    assert!((t.sampling_ratio - 0.05).abs() < 1e-9);
    let bad = edit(
        &text,
        "grpc://collector:4317\"\nservice_name = \"fsp-int\"\nsampling_ratio = 0.05",
        "udp://collector:4317\"\nservice_name = \"\"\nsampling_ratio = 1.5",
    );
    let problems = fx.problems(&bad);
    expect(
        &problems,
        "fsp.toml",
        "telemetry.otlp_endpoint",
        &["not an OTLP endpoint"],
    );
    expect(
        &problems,
        "fsp.toml",
        "telemetry.sampling_ratio",
        &["not between 0 and 1"],
    );
    expect(
        &problems,
        "fsp.toml",
        "telemetry.service_name",
        &["must not be empty"],
    );
    let bad = edit(&text, "\"2001:db8::1\"", "\"10.0.0.300/8\"");
    let problems = fx.problems(&bad);
    expect(
        &problems,
        "fsp.toml",
        "listener.proxy_protocol_from[1]",
        &["not an address or CIDR"],
    );
}

#[test]
fn the_cluster_section_names_its_redis_and_key_prefix() {
    let fx = Fixture::new();
    let with = |body: &str| {
        edit(
            &fx.single_file(),
            "[throttle]",
            &format!("[cluster]\n{body}\n\n[throttle]"),
        )
    };
    let config = fx
        .load_single(&with("redis_url = \"redis://127.0.0.1:6379\""))
        .unwrap();
    let cluster = config.cluster.unwrap();
    assert_eq!(cluster.redis_url, "redis://127.0.0.1:6379");
    assert_eq!(cluster.key_prefix, "fsp:");
    let config = fx
        .load_single(&with(
            "redis_url = \"redis://r.example:6380\"\nkey_prefix = \"fsp-int:\"",
        ))
        .unwrap();
    assert_eq!(config.cluster.unwrap().key_prefix, "fsp-int:");

    let problems = fx.problems(&with(
        "redis_url = \"http://127.0.0.1:6379\"\nkey_prefix = \"a b\"",
    ));
    assert_eq!(problems.len(), 2, "{}", list(&problems));
    expect(
        &problems,
        "fsp.toml",
        "cluster.redis_url",
        &["not a Redis URL"],
    );
    expect(
        &problems,
        "fsp.toml",
        "cluster.key_prefix",
        &["letters, digits"],
    );
    // TLS to Redis: the system's CAs, or the CA given; what is wrong is named.
    let config = fx
        .load_single(&with("redis_url = \"rediss://r.example:6380\""))
        .unwrap();
    assert_eq!(config.cluster.unwrap().redis_tls, None);
    let ca = certs::devpki::DevCa::new("Redis CA").unwrap();
    fx.write("pki/redis-ca.pem", &ca.cert_pem());
    let client = ca.client("fsp").unwrap();
    fx.write("pki/redis-client.pem", &client.cert_pem);
    fx.write("pki/redis-client.key", &client.key_pem);
    let config = fx
        .load_single(&with(
            "redis_url = \"rediss://r.example:6380\"\nredis_tls = { ca = \"pki/redis-ca.pem\", cert = \"pki/redis-client.pem\", key = \"pki/redis-client.key\" }",
        ))
        .unwrap();
    let tls = config.cluster.unwrap().redis_tls.unwrap();
    assert_eq!(tls.ca.unwrap(), ca.cert_pem().into_bytes());
    assert!(tls.client.is_some());
    for (body, key, says) in [
        (
            "redis_url = \"rediss://r.example:6380/#insecure\"",
            "cluster.redis_url",
            "#insecure",
        ),
        (
            "redis_url = \"rediss://r.example:6380/#insec\\ture\"",
            "cluster.redis_url",
            "#insecure",
        ),
        (
            "redis_url = \"redis://r.example:6379\"\nredis_tls = { ca = \"pki/redis-ca.pem\" }",
            "cluster.redis_tls",
            "only with a rediss://",
        ),
        (
            "redis_url = \"rediss://r.example:6380\"\nredis_tls = { ca = \"pki/missing.pem\" }",
            "cluster.redis_tls.ca",
            "missing.pem",
        ),
        (
            "redis_url = \"rediss://r.example:6380\"\nredis_tls = { ca = \"pki/redis-client.key\" }",
            "cluster.redis_tls.ca",
            "does not hold PEM certificates",
        ),
        (
            "redis_url = \"rediss://r.example:6380\"\nredis_tls = { cert = \"pki/redis-client.pem\" }",
            "cluster.redis_tls",
            "go together",
        ),
    ] {
        expect_only(&fx.problems(&with(body)), "fsp.toml", key, &[says]);
    }
    let problems = fx.problems(&with("key_prefix = \"fsp:\""));
    expect(
        &problems,
        "fsp.toml",
        "cluster.redis_url",
        &["required in [cluster]"],
    );
}

#[test]
fn admin_tokens_may_be_named_and_names_are_unique() {
    let t = AdminToken::parse("alice:alice-secret-token-0123456789", 0);
    assert_eq!(t.name, "alice");
    assert_eq!(t.token, "alice-secret-token-0123456789");
    // The token alone: named by its position; a prefix that is no name is token text.
    let t = AdminToken::parse("plain-admin-token-0123456789", 1);
    assert_eq!(t.name, "token#2");
    assert_eq!(t.token, "plain-admin-token-0123456789");
    let t = AdminToken::parse("not a name:rest-of-the-token-0123", 2);
    assert_eq!(t.name, "token#3");
    assert_eq!(t.token, "not a name:rest-of-the-token-0123");
    // The token never appears in a debug print.
    assert!(!format!("{:?}", AdminToken::parse("bob:bob-secret-0123456789", 0)).contains("secret"));

    let fx = Fixture::new();
    std::fs::write(
        fx.dir.join("admin-tokens"),
        "alice:alice-secret-token-0123456789\nalice:another-secret-token-0123456\nbob:short\ncarol:alice-secret-token-0123456789\nbad name:dave-secret-token-0123456789\n",
    )
    .unwrap();
    let problems = fx.problems(&fx.single_file());
    // A mistyped name is refused, not taken as part of a token; neither part is shown.
    let typo = expect(
        &problems,
        "fsp.toml",
        "admin.tokens_file",
        &["line 5", "the text before ':' is not a name"],
    );
    assert!(
        !typo.reason.contains("bad name") && !typo.reason.contains("dave-secret"),
        "{typo}"
    );
    expect(
        &problems,
        "fsp.toml",
        "admin.tokens_file",
        &["line 2", "`alice` is given twice"],
    );
    expect(
        &problems,
        "fsp.toml",
        "admin.tokens_file",
        &["line 3", "shorter than 16"],
    );
    expect(
        &problems,
        "fsp.toml",
        "admin.tokens_file",
        &["line 4", "token is given twice"],
    );
}

#[test]
fn settings_of_a_backend_not_in_use_are_refused() {
    let f = Fixture::new();
    let problems = f.problems_after(
        "backend     = \"local\"\non_backend_error",
        "backend     = \"local\"\nreplicas = 3\non_backend_error",
    );
    expect_only(
        &problems,
        "fsp.toml",
        "throttle.replicas",
        &["only used by the redis backend"],
    );
}

// ------------------------------------------------- consumer certificate files ----

/// The CN and fingerprint a consumer presents with `cert`.
fn presented(cn: &str, cert: &Issued) -> policy::CertificateIdentity {
    policy::CertificateIdentity {
        cn: Some(cn.into()),
        sha256: certs::sha256(&cert.der),
    }
}

/// The contract example with cpas-liege's certificate entries replaced by `entries`.
fn with_liege_certificates(fx: &Fixture, entries: &str) -> String {
    edit(
        &fx.single_file(),
        &format!("certificates = [ {{ sha256 = \"{}\" }} ]", fx.pin),
        &format!("certificates = [ {entries} ]"),
    )
}

#[test]
fn a_certificate_file_pins_its_leaf_and_is_listed_and_watched() {
    let fx = Fixture::new();
    let cert = fx.consumer_cert("pki/consumers/liege.pem", "eaide.cpas-liege.be", -1, 365);
    let config = fx
        .load_single(&with_liege_certificates(
            &fx,
            r#"{ file = "pki/consumers/liege.pem" }"#,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let id = config
        .consumers
        .identify_certificate(&presented("any.cn.be", &cert))
        .unwrap();
    assert_eq!(
        &*id.id, "cpas-liege",
        "the file pins its leaf whatever its CN"
    );
    // The CA after the leaf is not pinned.
    let ca_der = certs::load::certificates(&fx.dir.join("pki/consumers-ca.pem")).unwrap();
    assert!(
        config
            .consumers
            .identify_certificate(&policy::CertificateIdentity {
                cn: Some("Test Consumers CA".into()),
                sha256: certs::sha256(&ca_der[0]),
            })
            .is_err()
    );
    let path = fx.dir.join("pki/consumers/liege.pem");
    assert!(
        config.certificate_files.contains(&(
            "consumer[1].certificates[0].file (cpas-liege)".into(),
            path.clone()
        )),
        "{:?}",
        config.certificate_files
    );
    assert!(config.tls_files.contains(&path), "{:?}", config.tls_files);
    // A year and a day (the dev PKI's default) is not warned about.
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    // The inventory shows it with subject, fingerprint and expiry.
    let inventory = crate::state::certificate_inventory(&config.certificate_files);
    let listed = inventory
        .iter()
        .find(|c| c.role == "consumer[1].certificates[0].file (cpas-liege)")
        .unwrap();
    assert_eq!(listed.sha256, certs::sha256(&cert.der).to_string());
    assert!(
        listed.subject.contains("eaide.cpas-liege.be"),
        "{}",
        listed.subject
    );
}

#[test]
fn a_certificate_file_is_relative_to_the_file_that_names_it() {
    let fx = Fixture::new();
    let cert = fx.consumer_cert("admins/pki/liege.pem", "eaide.cpas-liege.be", -1, 365);
    fx.write("catalogue.toml", &fx.catalogue("pki"));
    fx.write(
        "admins/consumers.toml",
        &fx.consumers().replace(
            &format!("{{ sha256 = \"{}\" }}", fx.pin),
            r#"{ file = "pki/liege.pem" }"#,
        ),
    );
    let main = fx.write(
        "fsp.toml",
        &fx.main_including(&["catalogue.toml", "admins/consumers.toml"]),
    );
    let config = load(&main).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        &*config
            .consumers
            .identify_certificate(&presented("eaide.cpas-liege.be", &cert))
            .unwrap()
            .id,
        "cpas-liege"
    );
}

#[test]
fn a_certificate_file_with_its_cn_or_fingerprint_must_agree_with_them() {
    let fx = Fixture::new();
    let cert = fx.consumer_cert("pki/liege.pem", "eaide.cpas-liege.be", -1, 365);
    let sha = certs::sha256(&cert.der).to_string();

    // The same fingerprint, in the colon spelling: accepted.
    let colons = sha
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    fx.load_single(&with_liege_certificates(
        &fx,
        &format!(r#"{{ file = "pki/liege.pem", sha256 = "{colons}" }}"#),
    ))
    .unwrap_or_else(|e| panic!("{e}"));

    // Another fingerprint: refused, naming the key.
    let problems = fx.problems(&with_liege_certificates(
        &fx,
        &format!(r#"{{ file = "pki/liege.pem", sha256 = "{}" }}"#, fx.pin),
    ));
    expect_only(
        &problems,
        "fsp.toml",
        "consumer[1].certificates[0].sha256",
        &[&fx.pin, "pki/liege.pem", &sha],
    );

    // With its CN: only that certificate under that CN.
    let config = fx
        .load_single(&with_liege_certificates(
            &fx,
            r#"{ cn = "eaide.cpas-liege.be", file = "pki/liege.pem" }"#,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        config
            .consumers
            .identify_certificate(&presented("eaide.cpas-liege.be", &cert))
            .is_ok()
    );
    let other = fx.consumer_cert("pki/other.pem", "eaide.cpas-liege.be", -1, 365);
    assert!(matches!(
        config
            .consumers
            .identify_certificate(&presented("eaide.cpas-liege.be", &other)),
        Err(policy::IdentityError::PinMismatch { .. })
    ));

    // With another CN: the entry could never accept it.
    let problems = fx.problems(&with_liege_certificates(
        &fx,
        r#"{ cn = "app.cpas-liege.be", file = "pki/liege.pem" }"#,
    ));
    expect_only(
        &problems,
        "fsp.toml",
        "consumer[1].certificates[0].cn",
        &["CN `eaide.cpas-liege.be`", "`app.cpas-liege.be`", "never"],
    );
}

#[test]
fn an_unreadable_or_unparsable_certificate_file_is_refused_under_its_key() {
    let fx = Fixture::new();
    for (file, reason) in [
        ("pki/missing.pem", "cannot read file"),
        ("pki/not-pem.pem", "no PEM certificate"),
        ("pki/server.key", "no PEM certificate"),
    ] {
        let problems = fx.problems(&with_liege_certificates(
            &fx,
            &format!(r#"{{ file = "{file}" }}"#),
        ));
        expect_only(
            &problems,
            "fsp.toml",
            "consumer[1].certificates[0].file",
            &[file, reason],
        );
    }
}

#[test]
fn an_empty_certificate_entry_is_refused_once() {
    let fx = Fixture::new();
    let problems = fx.problems(&with_liege_certificates(&fx, "{ }"));
    expect_only(
        &problems,
        "fsp.toml",
        "consumer[1].certificates[0]",
        &["`cn`", "`sha256`", "`file`"],
    );
}

#[test]
fn a_consumer_changing_certificates_may_pin_both() {
    let fx = Fixture::new();
    let old = fx.consumer_cert("pki/liege-old.pem", "eaide.cpas-liege.be", -350, 15);
    let new = fx.consumer_cert("pki/liege-new.pem", "eaide.cpas-liege.be", -1, 364);
    let stranger = fx.consumer_cert("pki/stranger.pem", "eaide.cpas-liege.be", -1, 364);
    for entries in [
        r#"{ file = "pki/liege-old.pem" }, { file = "pki/liege-new.pem" }"#,
        r#"{ cn = "eaide.cpas-liege.be", file = "pki/liege-old.pem" }, { cn = "eaide.cpas-liege.be", file = "pki/liege-new.pem" }"#,
    ] {
        let config = fx
            .load_single(&with_liege_certificates(&fx, entries))
            .unwrap_or_else(|e| panic!("{entries}: {e}"));
        for cert in [&old, &new] {
            let id = config
                .consumers
                .identify_certificate(&presented("eaide.cpas-liege.be", cert))
                .unwrap_or_else(|e| panic!("{entries}: {e}"));
            assert_eq!(&*id.id, "cpas-liege");
        }
        assert!(
            config
                .consumers
                .identify_certificate(&presented("eaide.cpas-liege.be", &stranger))
                .is_err(),
            "{entries}"
        );
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    }
    // The same certificate pinned by two consumers is still refused.
    let problems = fx.problems(&edit(
        &with_liege_certificates(&fx, r#"{ file = "pki/liege-new.pem" }"#),
        r#"certificates = [ { cn = "monopinion.bruxelles.be" } ]"#,
        r#"certificates = [ { file = "pki/liege-new.pem" } ]"#,
    ));
    expect(
        &problems,
        "fsp.toml",
        "consumer[1]",
        &["fingerprint", "ville-bxl", "cpas-liege"],
    );
}

#[test]
fn long_lived_expiring_and_expired_pinned_certificates_are_warnings() {
    let fx = Fixture::new();
    fx.consumer_cert("pki/two-years.pem", "a.cpas-liege.be", -1, 729);
    fx.consumer_cert("pki/five-days.pem", "b.cpas-liege.be", -300, 5);
    fx.consumer_cert("pki/expired.pem", "c.cpas-liege.be", -400, -3);
    let config = fx
        .load_single(&with_liege_certificates(
            &fx,
            r#"{ file = "pki/two-years.pem" }, { file = "pki/five-days.pem" }, { file = "pki/expired.pem" }"#,
        ))
        .unwrap_or_else(|e| panic!("valid, with warnings: {e}"));
    let w = &config.warnings;
    assert_eq!(w.len(), 3, "{}", list(w));
    expect(
        w,
        "fsp.toml",
        "consumer[1].certificates[0].file",
        &[
            "pki/two-years.pem is valid for 730 days, more than 12 months",
            "replaced yearly",
        ],
    );
    // Issued to end 5 days from when it was made, a moment ago: 4 whole days and some
    // hours are left (days are counted whole, as in the inventory).
    expect(
        w,
        "fsp.toml",
        "consumer[1].certificates[1].file",
        &[
            "pki/five-days.pem expires in 4 days (",
            "issue its successor and pin both during the changeover",
        ],
    );
    expect(
        w,
        "fsp.toml",
        "consumer[1].certificates[2].file",
        &["pki/expired.pem expired 3 days ago: remove it"],
    );
}

/// A certificate valid from `from` to `until` days from `now` (only the dates matter).
fn info(now: time::OffsetDateTime, from: i64, until: i64) -> certs::inventory::CertInfo {
    certs::inventory::CertInfo {
        role: "consumer[0].certificates[0].file (x)".into(),
        path: "x.pem".into(),
        subject: "CN=x".into(),
        cn: Some("x".into()),
        issuer: "CN=ca".into(),
        sha256: "00".repeat(32),
        not_before: now + time::Duration::days(from),
        not_after: now + time::Duration::days(until),
    }
}

#[test]
fn the_warning_rules_and_their_bounds() {
    let now = time::OffsetDateTime::now_utc();
    let said = |from, until| pinned_certificate_warnings("x.pem", &info(now, from, until), now);
    // 366 days (a leap year) is a year; 367 is more.
    assert!(said(-1, 365).is_empty());
    assert!(said(-100, 266).is_empty());
    let long = said(-1, 366);
    assert_eq!(long.len(), 1, "{long:?}");
    assert!(
        long[0].contains("valid for 367 days, more than 12 months"),
        "{long:?}"
    );
    // Expiring within 14 days, counted from now.
    assert!(said(-300, 14).is_empty());
    let soon = said(-300, 13);
    assert_eq!(soon.len(), 1, "{soon:?}");
    assert!(
        soon[0].starts_with("x.pem expires in 13 days ("),
        "{soon:?}"
    );
    let both = said(-400, 10);
    assert_eq!(both.len(), 2, "{both:?}");
    assert!(said(-10, 1)[0].contains("expires in 1 day ("));
    let today = pinned_certificate_warnings(
        "x.pem",
        &certs::inventory::CertInfo {
            not_after: now + time::Duration::hours(3),
            ..info(now, -10, 0)
        },
        now,
    );
    assert!(today[0].contains("expires in less than a day"), "{today:?}");
    // Expired: only "remove it", however long it was issued for.
    assert_eq!(said(-800, -1), ["x.pem expired 1 day ago: remove it"]);
}

/// `[audit] signing_key` is read and checked by `fsp check`: a missing file, a key that
/// is not Ed25519, a public key where the private one goes, and `verify_keys` without
/// `signing_key` are each named; a good key (and an earlier one) load.
#[test]
fn the_audit_signing_key_is_read_and_checked() {
    let fx = Fixture::new();
    let (key, pem) = audit::seal::SigningKey::generate().unwrap();
    let (old, _) = audit::seal::SigningKey::generate().unwrap();
    fx.write("keys/audit.pem", std::str::from_utf8(&pem).unwrap());
    fx.write("keys/old.pub.pem", &old.public_pem());
    fx.write("keys/audit.pub.pem", &key.public_pem());
    fx.write("keys/not-a-key.pem", "hello\n");
    let with = |lines: &str| {
        edit(
            &fx.single_file(),
            "retention_days = 3653",
            &format!("retention_days = 3653\n{lines}"),
        )
    };
    let config = fx
        .load_single(&with(
            "signing_key = \"keys/audit.pem\"\nverify_keys = [\"keys/old.pub.pem\"]",
        ))
        .unwrap();
    assert_eq!(
        config.audit.seals.key.as_ref().map(|k| k.id()),
        Some(key.id())
    );
    assert_eq!(config.audit.seals.trusted.ids(), [key.id(), old.id()]);
    assert!(
        fx.load_single(&fx.single_file())
            .unwrap()
            .audit
            .seals
            .key
            .is_none()
    );
    for (lines, key_path, says) in [
        (
            "signing_key = \"keys/missing.pem\"",
            "audit.signing_key",
            "cannot read",
        ),
        (
            "signing_key = \"keys/not-a-key.pem\"",
            "audit.signing_key",
            "no PKCS#8 PEM private key",
        ),
        (
            "signing_key = \"keys/audit.pub.pem\"",
            "audit.signing_key",
            "no PKCS#8 PEM private key",
        ),
        (
            "signing_key = \"keys/audit.pem\"\nverify_keys = [\"keys/not-a-key.pem\"]",
            "audit.verify_keys[0]",
            "no Ed25519 public key",
        ),
        (
            "verify_keys = [\"keys/old.pub.pem\"]",
            "audit.verify_keys",
            "signing_key",
        ),
    ] {
        let problems = fx.problems(&with(lines));
        expect_only(&problems, "fsp.toml", key_path, &[says]);
    }
}

/// A key set fetched in the clear can be replaced on its way (found by an attacker's
/// review: `http://` was accepted anywhere): `http://` only to this machine.
#[test]
fn a_jwks_url_in_the_clear_is_refused_unless_it_is_loopback() {
    let fx = Fixture::new();
    for url in [
        "http://idp.example/jwks",
        "http://10.0.0.7/jwks",
        "ftp://idp.example/jwks",
    ] {
        let problems = fx.problems_after(
            "jwks_url    = \"https://idp.example/jwks\"",
            &format!("jwks_url    = \"{url}\""),
        );
        expect_only(
            &problems,
            "fsp.toml",
            "oauth.jwks_url",
            &["https://", "loopback"],
        );
    }
    for url in [
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]:9000/jwks",
    ] {
        let text = edit(
            &fx.single_file(),
            "jwks_url    = \"https://idp.example/jwks\"",
            &format!("jwks_url    = \"{url}\""),
        );
        assert!(fx.load_single(&text).is_ok(), "{url}");
    }
}

/// Connections without a certificate are never evicted once past their handshake: a
/// bound on them at or above max_connections would let them hold every place, so it is
/// refused with its line; unset, it is a tenth of max_connections (at most 1 000).
#[test]
fn anonymous_connections_stay_below_max_connections() {
    let fx = Fixture::new();
    let text = edit(
        &fx.single_file(),
        "drain_timeout = \"15s\"",
        "drain_timeout = \"15s\"\nmax_connections = 200\nmax_anonymous_connections = 200",
    );
    let problems = fx.problems(&text);
    expect_only(
        &problems,
        "fsp.toml",
        "listener.max_anonymous_connections",
        &["must be below max_connections (200)", "never evicted"],
    );
    let text = edit(
        &fx.single_file(),
        "drain_timeout = \"15s\"",
        "drain_timeout = \"15s\"\nmax_connections = 200",
    );
    let c = fx.load_single(&text).unwrap();
    assert_eq!(c.listener.connections.anonymous, 20);
    let c = fx.load_single(&fx.single_file()).unwrap();
    assert_eq!(c.listener.connections.anonymous, 1_000);
}
