//! `fsp check --config FILE` run as a real process: exit 0 on a valid configuration, exit 1
//! with every problem listed (file, key path, reason) otherwise.
//!
//! Certificates and keys are generated at test time into a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use certs::devpki::{DevCa, Issued};

const MAIN: &str = r#"environment = "INT"
node        = "check-cli-1"
include     = ["catalogue.toml", "consumers.toml"]

[listener]
address     = "127.0.0.1:8443"
public_url  = "https://fsp.example.be"
server_cert = "pki/server.pem"
server_key  = "pki/server.key"
client_ca   = "pki/consumers-ca.pem"
crls        = ["pki/consumers.crl"]

[admin]
address     = "127.0.0.1:9443"
tokens_file = "admin-tokens"

[oauth]
issuer      = "https://idp.example/"
jwks_url    = "https://idp.example/jwks"
audience    = "fsp"

[audit]
backend     = "file"
dir         = "data/audit"

[throttle]
backend     = "local"
"#;

const CATALOGUE: &str = r#"
[[provider]]
id     = "rrn"
name   = "Registre national"
limit  = { rate = "1000/s", burst = 200 }
consumer_limit = { rate = "50/s", burst = 10 }
consumer_limits = [ { consumer = "ville-bxl", rate = "200/s", burst = 20 } ]
upstream_ca = "pki/providers-ca.pem"

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

const CONSUMERS: &str = r#"
[[consumer]]
id           = "ville-bxl"
organisation = "Ville de Bruxelles"
certificates = [ { cn = "monopinion.bruxelles.be" } ]
oauth_client_ids = ["ville-bxl-monopinion"]
source_ips   = ["192.0.2.0/24"]

[[consumer]]
id           = "cpas-liege"
organisation = "CPAS de Liège"
certificates = [ { cn = "eaide.cpas-liege.be" } ]
"#;

const AUTHORISATION: &str = r#"
[[authorisation]]
id          = "csi-2020-123-person"
consumer    = "ville-bxl"
service     = "person/getPerson"
purpose     = "participation-vote"
legal_basis = { kind = "deliberation", reference = "CSI/20/123" }
provider_approval = "RRN-2020-456"
valid_from  = 2020-10-09
"#;

/// The issue's acceptance criterion: `person/getPerson` has 4 live versions from
/// 2023-01-01, and `person/getAddress` v1 has its sunset 3 years after its deprecation.
const BAD_CATALOGUE: &str = r#"
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

/// `root/conf/` holds a configuration split over three files and `root/conf/pki/` its
/// certificates; `fsp` runs in `root`, so relative paths only work from `conf/`.
struct Setup {
    tmp: tempfile::TempDir,
    /// The consumers' CA, to issue consumers' certificates.
    ca: DevCa,
}

impl Setup {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = tmp.path().join("conf/pki");
        fs::create_dir_all(&pki).unwrap();
        let ca = DevCa::new("Check CLI Consumers CA").unwrap();
        let server = ca.server(&["localhost", "127.0.0.1"]).unwrap();
        let providers = DevCa::new("Check CLI Providers CA").unwrap();
        fs::write(pki.join("consumers-ca.pem"), ca.cert_pem()).unwrap();
        fs::write(pki.join("server.pem"), &server.cert_pem).unwrap();
        fs::write(pki.join("server.key"), &server.key_pem).unwrap();
        fs::write(pki.join("consumers.crl"), ca.crl(&[]).unwrap()).unwrap();
        fs::write(pki.join("providers-ca.pem"), providers.cert_pem()).unwrap();
        fs::write(
            tmp.path().join("conf/admin-tokens"),
            "check-cli-admin-token-0123456789\n",
        )
        .unwrap();
        let me = Self { tmp, ca };
        me.write("fsp.toml", MAIN);
        me.write("catalogue.toml", CATALOGUE);
        me.write("consumers.toml", &format!("{CONSUMERS}{AUTHORISATION}"));
        me
    }

    /// Issues a client certificate for `cn`, valid from yesterday until `until` from now,
    /// into `conf/NAME`.
    fn consumer_cert(&self, name: &str, cn: &str, until: time::Duration) -> Issued {
        let now = time::OffsetDateTime::now_utc();
        let issued = self
            .ca
            .client_valid(cn, now - time::Duration::days(1), now + until)
            .unwrap();
        let path = self.root().join("conf").join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &issued.cert_pem).unwrap();
        issued
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.root().join("conf").join(name);
        fs::write(&path, text).unwrap();
        path
    }

    /// Runs `fsp` in the root directory with the given arguments.
    fn fsp(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_fsp"))
            .args(args)
            .current_dir(self.root())
            .env_remove("FSP_CONFIG")
            .env_remove("FSP_LOG")
            .output()
            .unwrap()
    }

    fn check(&self) -> Output {
        self.fsp(&["check", "--config", "conf/fsp.toml"])
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The problem lines of `fsp check`'s error output.
fn problem_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("  - ")).collect()
}

#[test]
fn check_accepts_a_valid_configuration_run_from_another_directory() {
    let s = Setup::new();
    assert!(!s.root().join("pki").exists(), "only conf/pki exists");
    let out = s.check();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("conf/fsp.toml: valid"), "{stdout}");
    assert!(
        stdout.contains(
            "1 provider(s), 1 service(s), 2 version(s), 2 consumer(s), 1 authorisation(s)"
        ),
        "{stdout}"
    );
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn check_takes_the_config_from_the_environment_too() {
    let s = Setup::new();
    let out = Command::new(env!("CARGO_BIN_EXE_fsp"))
        .arg("check")
        .current_dir(s.root())
        .env("FSP_CONFIG", "conf/fsp.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("valid"));
}

#[test]
fn check_lists_every_lifecycle_problem_with_file_key_and_service() {
    let s = Setup::new();
    s.write("catalogue.toml", BAD_CATALOGUE);
    // No authorisation: only the two broken rules are wrong.
    s.write("consumers.toml", CONSUMERS);
    let out = s.check();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(!stdout.contains("valid"), "{stdout}");
    assert!(
        stderr.starts_with("the configuration has 2 problem(s):"),
        "{stderr}"
    );
    let lines = problem_lines(&stderr);
    assert_eq!(lines.len(), 2, "{stderr}");
    for line in &lines {
        assert!(line.contains("conf/catalogue.toml: "), "{line}");
        assert!(
            line.contains("person/getPerson") || line.contains("person/getAddress"),
            "{line}"
        );
    }
    let live = lines
        .iter()
        .find(|l| l.contains("person/getPerson"))
        .unwrap_or_else(|| panic!("no line for person/getPerson:\n{stderr}"));
    assert!(live.contains(": family[0].service[0]: "), "{live}");
    assert!(live.contains("4 live versions"), "{live}");
    assert!(live.contains("at most 3"), "{live}");
    let late = lines
        .iter()
        .find(|l| l.contains("person/getAddress"))
        .unwrap_or_else(|| panic!("no line for person/getAddress:\n{stderr}"));
    assert!(
        late.contains(": family[0].service[1].version[0]: "),
        "{late}"
    );
    assert!(late.contains("version v1"), "{late}");
    assert!(late.contains("sunset 2025-01-01"), "{late}");
    assert!(
        late.contains("more than 2 years after deprecation"),
        "{late}"
    );
}

#[test]
fn check_reports_an_unknown_key_with_its_path_and_line() {
    let s = Setup::new();
    s.write(
        "catalogue.toml",
        &CATALOGUE.replace("sunset     = 2027-09-01", "sunsett    = 2027-09-01"),
    );
    let out = s.check();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines = problem_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(
            "catalogue.toml: family[0].service[0].version[1].sunsett: unknown field `sunsett`"
        ),
        "{stderr}"
    );
    assert!(lines[0].contains("(line 28, column 1)"), "{stderr}");
}

#[test]
fn check_reports_problems_in_every_file() {
    let s = Setup::new();
    s.write(
        "catalogue.toml",
        &CATALOGUE.replace("rate = \"1000/s\"", "rate = \"fast\""),
    );
    s.write(
        "consumers.toml",
        &format!("{CONSUMERS}{AUTHORISATION}").replace(
            "service     = \"person/getPerson\"",
            "service     = \"person/getPerson\"\nversions    = [\"v9\"]",
        ),
    );
    s.write(
        "fsp.toml",
        &MAIN.replace("environment = \"INT\"", "environment = \"DEV\""),
    );
    let out = s.check();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines = problem_lines(&stderr);
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("conf/fsp.toml: environment: `DEV` is not INT or PROD")),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("catalogue.toml: provider[0].limit.rate: `fast`")),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("consumers.toml: authorisation[0].versions[0]: service person/getPerson has no version `v9`")),
        "{stderr}"
    );
}

#[test]
fn check_names_a_missing_configuration_file() {
    let s = Setup::new();
    let out = s.fsp(&["check", "--config", "conf/nope.toml"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines = problem_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("conf/nope.toml: cannot read file"),
        "{stderr}"
    );
}

/// Regression (fixed): a duration too large for `u64` seconds makes `fsp check` panic
/// (exit 101) in a debug build instead of listing the problem (and wraps in release).
#[test]
fn check_refuses_a_huge_duration_without_crashing() {
    let s = Setup::new();
    s.write(
        "fsp.toml",
        &MAIN.replace(
            "crls        = [\"pki/consumers.crl\"]",
            "crls        = [\"pki/consumers.crl\"]\ndrain_timeout = \"5124095576030432h\"",
        ),
    );
    let out = s.check();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("listener.drain_timeout"), "{stderr}");
}

#[test]
fn an_expired_server_certificate_fails_the_check_and_the_inventory_says_since_when() {
    let s = Setup::new();
    let ca = DevCa::new("Check CLI Server CA").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .server_valid(
            &["localhost"],
            now - time::Duration::days(400),
            now - time::Duration::days(3),
        )
        .unwrap();
    let pki = s.root().join("conf/pki");
    fs::write(pki.join("server.pem"), &expired.cert_pem).unwrap();
    fs::write(pki.join("server.key"), &expired.key_pem).unwrap();
    let out = s.check();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("listener.server_cert") && stderr.contains("expired at"),
        "{stderr}"
    );
    let out = s.fsp(&["certs", "inventory", "--config", "conf/fsp.toml"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("expired 3 days ago"), "{stdout}");
    assert_eq!(out.status.code(), Some(3), "{stdout}");
}

/// A consumer changing certificates pins both: the old one expires in 5 days, the new one
/// was issued for two years. Both are warnings: the configuration is valid (exit 0), and
/// the inventory lists both pinned certificates.
#[test]
fn pinned_consumer_certificates_are_warned_about_and_listed_by_the_inventory() {
    let s = Setup::new();
    let old = s.consumer_cert(
        "pki/consumers/liege-2025.pem",
        "eaide.cpas-liege.be",
        time::Duration::days(5) + time::Duration::hours(1),
    );
    let new = s.consumer_cert(
        "pki/consumers/liege-2026.pem",
        "eaide.cpas-liege.be",
        time::Duration::days(729) + time::Duration::hours(1),
    );
    s.write(
        "consumers.toml",
        &format!("{CONSUMERS}{AUTHORISATION}").replace(
            r#"certificates = [ { cn = "eaide.cpas-liege.be" } ]"#,
            r#"certificates = [
  { cn = "eaide.cpas-liege.be", file = "pki/consumers/liege-2025.pem" },
  { cn = "eaide.cpas-liege.be", file = "pki/consumers/liege-2026.pem" },
]"#,
        ),
    );
    let out = s.check();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("conf/fsp.toml: valid"), "{stdout}");
    let warnings: Vec<&str> = stderr.lines().collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    // `warning: FILE: KEY: reason`; an included file is named by its full path.
    let at = |w: &str| {
        assert!(w.starts_with("warning: "), "{stderr}");
        w.split_once("conf/consumers.toml: ")
            .unwrap_or_else(|| panic!("not in consumers.toml: {stderr}"))
            .1
            .to_owned()
    };
    let expiring = at(warnings[0]);
    assert!(
        expiring.starts_with(
            "consumer[1].certificates[0].file: pki/consumers/liege-2025.pem expires in 5 days ("
        ) && expiring.ends_with("): issue its successor and pin both during the changeover"),
        "{stderr}"
    );
    assert_eq!(
        at(warnings[1]),
        "consumer[1].certificates[1].file: pki/consumers/liege-2026.pem is valid for 730 days, more than 12 months: consumer certificates are replaced yearly",
        "{stderr}"
    );

    let out = s.fsp(&["certs", "inventory", "--config", "conf/fsp.toml"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(3),
        "the old one expires within 14 days:\n{stdout}\n{stderr}"
    );
    for (i, cert, days) in [(0, &old, "5"), (1, &new, "729")] {
        let role = format!("consumer[1].certificates[{i}].file (cpas-liege)");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&role))
            .unwrap_or_else(|| panic!("no line for {role}:\n{stdout}"));
        let columns: Vec<&str> = line[role.len()..].split_whitespace().collect();
        assert_eq!(columns[0], days, "{line}");
        assert!(columns[1].ends_with('Z'), "not-after: {line}");
        assert_eq!(columns[2], certs::sha256(&cert.der).to_string(), "{line}");
        assert!(line.contains("CN=eaide.cpas-liege.be"), "{line}");
    }
    assert!(
        stderr.contains("1 certificate(s) expire within 14 days"),
        "{stderr}"
    );
    let out = s.fsp(&[
        "certs",
        "inventory",
        "--config",
        "conf/fsp.toml",
        "--within",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// A CRL already past its nextUpdate would make the gateway refuse every certificate of
/// its CA (as OpenSSL refuses with "CRL has expired"): `fsp check` refuses it, naming the
/// file and the date and saying what to do. One that passes it within a day is a warning.
#[test]
fn check_refuses_a_crl_past_its_next_update_and_warns_of_one_about_to_pass_it() {
    let s = Setup::new();
    let now = time::OffsetDateTime::now_utc();
    let crl = s.root().join("conf/pki/consumers.crl");
    let next = now - time::Duration::hours(3);
    fs::write(
        &crl,
        s.ca.crl_valid(&[], now - time::Duration::days(8), next)
            .unwrap(),
    )
    .unwrap();
    let out = s.check();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines = problem_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    let line = lines[0];
    let day = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}",
        next.year(),
        u8::from(next.month()),
        next.day(),
        next.hour(),
        next.minute()
    );
    assert!(
        line.contains("conf/fsp.toml: listener.crls:")
            && line.contains("conf/pki/consumers.crl")
            && line.contains(&day)
            && line.contains("Publish a fresh CRL"),
        "{stderr}"
    );

    // Fresh for two more hours: valid, with a warning naming the file and the date.
    let next = now + time::Duration::hours(2);
    fs::write(
        &crl,
        s.ca.crl_valid(&[], now - time::Duration::days(1), next)
            .unwrap(),
    )
    .unwrap();
    let out = s.check();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with("warning: ")
            && l.contains("listener.crls")
            && l.contains("conf/pki/consumers.crl")
            && l.contains("nextUpdate")),
        "{stderr}"
    );
}

/// TLS to the audit database: `sslmode=verify-full` with an `sslrootcert` that can be
/// read passes the check; one that cannot, a relative path or an unknown `sslmode` is a
/// problem of `audit.url` that says which.
#[test]
fn check_takes_tls_to_postgresql_and_names_what_is_wrong_with_it() {
    let s = Setup::new();
    let ca = s.root().join("conf/pki/providers-ca.pem");
    let with = |params: &str| {
        MAIN.replace(
            "backend     = \"file\"\ndir         = \"data/audit\"",
            &format!("backend     = \"postgres\"\nurl         = \"postgres://fsp@db.internal/fsp?{params}\""),
        )
    };
    s.write(
        "fsp.toml",
        &with(&format!("sslmode=verify-full&sslrootcert={}", ca.display())),
    );
    let out = s.check();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for (params, says) in [
        (
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem".to_owned(),
            "sslrootcert /nonexistent/ca.pem",
        ),
        (
            "sslmode=verify-ca&sslrootcert=pki/providers-ca.pem".to_owned(),
            "absolute path",
        ),
        ("sslmode=allow".to_owned(), "sslmode=allow"),
        (
            format!("sslmode=disable&sslrootcert={}", ca.display()),
            "only with sslmode",
        ),
    ] {
        s.write("fsp.toml", &with(&params));
        let out = s.check();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{params}: {stderr}");
        let problems = problem_lines(&stderr);
        assert!(
            problems.len() == 1 && problems[0].contains("audit.url") && problems[0].contains(says),
            "{params}: {stderr}"
        );
    }
}
