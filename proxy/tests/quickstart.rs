//! `fsp quickstart` as a newcomer uses it: start it, paste the printed `curl` commands.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::free_port;

/// The printed commands, as blocks of (title, shell text).
fn blocks(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter_map(|b| {
            let b = b.trim();
            let (title, cmd) = b.split_once('\n')?;
            title
                .starts_with("# ")
                .then(|| (title.to_owned(), cmd.to_owned()))
        })
        .collect()
}

/// A running `fsp quickstart`.
struct Quickstart {
    child: Child,
    stdout: String,
}

/// Starts the quickstart in `dir`; returns once its gateway is ready, with the commands
/// it printed.
fn start(dir: &Path, ports: (u16, u16, u16), extra: &[&str]) -> (Quickstart, String) {
    let (port, admin, oauth) = ports;
    // Removed first, so that the file found below is this run's.
    let commands = dir.join("COMMANDS.txt");
    let _ = std::fs::remove_file(&commands);
    let mut child = Command::new(env!("CARGO_BIN_EXE_fsp"))
        .args(["quickstart", "--dir"])
        .arg(dir)
        .args([
            "--port",
            &port.to_string(),
            "--admin-port",
            &admin.to_string(),
            "--oauth-port",
            &oauth.to_string(),
        ])
        .args(extra)
        .env("FSP_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&commands) {
            let ready = Command::new("curl")
                .args(["-sf", &format!("http://127.0.0.1:{admin}/readyz")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break t;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "quickstart exited early"
        );
        assert!(
            Instant::now() < deadline,
            "quickstart not ready within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        Quickstart {
            child,
            stdout: String::new(),
        },
        text,
    )
}

impl Quickstart {
    /// Ctrl-C; waits for a clean exit and keeps what it printed.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "quickstart did not stop on Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "quickstart exits 0 on Ctrl-C: {status}");
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        self.stdout = out;
    }
}

fn run(cmd: &str) -> String {
    let out = Command::new("bash").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The audit trail's lines so far.
fn audit_lines(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("audit")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "jsonl") {
            let text = std::fs::read_to_string(e.path()).unwrap();
            for line in text.split(['\n', '\0']).filter(|l| !l.is_empty()) {
                out.push(serde_json::from_str(line).unwrap());
            }
        }
    }
    out
}

#[test]
fn the_printed_commands_work_when_pasted() {
    if Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        panic!("curl is needed for this test (apt-get install curl)");
    }
    let dir = tempfile::tempdir().unwrap();
    let ports = (free_port(), free_port(), free_port());
    let port = ports.0;
    let (mut qs, text) = start(dir.path(), ports, &[]);

    // Keys and secrets are the user's alone.
    for private in [
        "admin-tokens",
        "oauth-clients",
        "COMMANDS.txt",
        "pki/server.key",
        "pki/ville-bxl.key",
        "pki/oauth-signing.key",
    ] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(private))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{private} is readable by others: {mode:o}");
    }
    // A second quickstart in the same directory refuses to start, touching nothing.
    let second = Command::new(env!("CARGO_BIN_EXE_fsp"))
        .args(["quickstart", "--dir"])
        .arg(dir.path())
        .args(["--port", &free_port().to_string()])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another quickstart is running"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    let blocks = blocks(&text);
    assert!(blocks.len() >= 9, "printed commands:\n{text}");
    let find = |prefix: &str| {
        blocks
            .iter()
            .find(|(t, _)| t.starts_with(prefix))
            .unwrap_or_else(|| panic!("no block {prefix} in:\n{text}"))
            .1
            .clone()
    };

    let rest = run(&find("# 1."));
    assert!(
        rest.starts_with("HTTP/2 200") || rest.starts_with("HTTP/1.1 200"),
        "{rest}"
    );
    assert!(
        rest.contains("fsp-message-id:") && rest.contains("fsp-timestamp:"),
        "{rest}"
    );
    assert!(
        rest.contains("\"ssin\":\"85073003328\"") && rest.contains("Peeters"),
        "{rest}"
    );
    assert!(rest.contains("\"fsp-consumer\":\"ville-bxl\""), "{rest}");

    let soap = run(&find("# 2."));
    assert!(soap.contains(" 200"), "{soap}");
    assert!(
        soap.contains("deprecation: @") && soap.contains("sunset:"),
        "{soap}"
    );
    assert!(soap.contains("rel=\"successor-version\""), "{soap}");
    assert!(
        soap.contains("<rn:LastName>Janssens</rn:LastName>"),
        "{soap}"
    );
    assert!(soap.contains("<fsp:MessageID"), "{soap}");

    let wsdl = run(&find("# 2b."));
    assert!(
        wsdl.contains(&format!(
            "<soap:address location=\"https://localhost:{port}/person/getPerson/v2\"/>"
        )) && wsdl.contains(&format!(
            "<soap12:address location=\"https://localhost:{port}/person/getPerson/v2\"/>"
        )) && !wsdl.contains("127.0.0.1"),
        "{wsdl}"
    );

    let anon = run(&find("# 3."));
    assert!(
        anon.contains(" 401") && anon.contains("FSP-AUTHN-MISSING"),
        "{anon}"
    );
    let unknown = run(&find("# 4."));
    assert!(
        unknown.contains(" 404") && unknown.contains("FSP-ROUTE-UNKNOWN-VERSION"),
        "{unknown}"
    );

    // OAuth: a token from the quickstart's token endpoint, then a call with it.
    let oauth = run(&find("# 5."));
    assert!(
        oauth.starts_with("HTTP/2 200") || oauth.starts_with("HTTP/1.1 200"),
        "{oauth}"
    );
    assert!(oauth.contains("\"fsp-consumer\":\"ville-bxl\""), "{oauth}");
    let by_token = audit_lines(dir.path())
        .into_iter()
        .rfind(|r| r["credential"] == "oauth")
        .expect("the OAuth call is recorded");
    assert_eq!(by_token["credential_id"], "ville-bxl-app");
    assert_eq!(by_token["decision"], "allowed");

    // The token endpoint refuses a wrong secret and other grants, in OAuth2's terms.
    let token_url = format!("http://127.0.0.1:{}/token", ports.2);
    let wrong = run(&format!(
        "curl -s -i -u 'ville-bxl-app:wrong' -d grant_type=client_credentials {token_url}"
    ));
    assert!(
        wrong.contains(" 401") && wrong.contains("invalid_client"),
        "{wrong}"
    );
    let grant = run(&format!(
        "curl -s -i -d grant_type=password -d username=x -d password=y {token_url}"
    ));
    assert!(
        grant.contains(" 400") && grant.contains("unsupported_grant_type"),
        "{grant}"
    );

    // Administrators: suspend, see the consumer refused, restore.
    let suspended = run(&find("# 6."));
    assert!(suspended.contains(" 200"), "{suspended}");
    let refused = run(&find("# 2."));
    assert!(
        refused.contains(" 403") && refused.contains("FSP-AUTHZ-SUSPENDED"),
        "{refused}"
    );
    let admin_record = audit_lines(dir.path())
        .into_iter()
        .rfind(|r| r["credential"] == "admin")
        .expect("the suspension is recorded");
    assert_eq!(admin_record["credential_id"], "quickstart");
    let restored = run(&find("# 7."));
    assert!(restored.contains(" 200"), "{restored}");
    assert!(run(&find("# 2.")).contains(" 200"));

    let health = run(&find("# Health"));
    assert!(
        health.contains("ready") && health.contains("fsp_requests_total"),
        "{health}"
    );
    qs.stop();
    // Every call above is in the audit trail.
    let calls = audit_lines(dir.path())
        .into_iter()
        .filter(|r| r["phase"] != "request")
        .count();
    assert!(calls >= 9, "{calls} audit records");
}

#[test]
fn a_second_run_keeps_edited_files_and_lifts_leftover_suspensions() {
    let dir = tempfile::tempdir().unwrap();
    let ports = (free_port(), free_port(), free_port());
    let (mut qs, text) = start(dir.path(), ports, &[]);
    let suspend = blocks(&text)
        .into_iter()
        .find(|(t, _)| t.starts_with("# 6."))
        .unwrap()
        .1;
    assert!(run(&suspend).contains(" 200"));
    qs.stop();
    assert!(qs.stdout.contains("Paste these"), "{}", qs.stdout);

    // The user edits one file; the others stay the quickstart's.
    let consumers = dir.path().join("consumers.toml");
    let edited = format!(
        "# my own notes\n{}",
        std::fs::read_to_string(&consumers).unwrap()
    );
    std::fs::write(&consumers, &edited).unwrap();
    let admin_tokens = std::fs::read_to_string(dir.path().join("admin-tokens")).unwrap();

    let (mut qs, again) = start(dir.path(), ports, &[]);
    // The same secrets (the printed commands keep working), the edit kept.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin-tokens")).unwrap(),
        admin_tokens
    );
    assert_eq!(std::fs::read_to_string(&consumers).unwrap(), edited);
    assert_eq!(blocks(&again).len(), blocks(&text).len());
    // No suspension left over: CPAS de Liège is served.
    let soap = blocks(&again)
        .into_iter()
        .find(|(t, _)| t.starts_with("# 2."))
        .unwrap()
        .1;
    assert!(run(&soap).contains(" 200"), "still suspended");
    // The lift is on the record, as an administrator's resume would be.
    let lift = audit_lines(dir.path())
        .into_iter()
        .rfind(|r| r["credential"] == "admin")
        .expect("the lift is recorded");
    assert_eq!(lift["credential_id"], "fsp quickstart", "{lift}");
    assert_eq!(
        lift["operation"], "POST /admin/consumers/cpas-liege/resume",
        "{lift}"
    );
    assert_eq!(lift["decision"], "allowed", "{lift}");
    assert!(
        lift["detail"]
            .as_str()
            .is_some_and(|d| d.contains("left by its last run")),
        "{lift}"
    );
    // And with --keep-suspensions, a suspension made now is still there after a restart.
    assert!(run(&suspend).contains(" 200"));
    qs.stop();
    assert!(
        qs.stdout.contains("Kept") && qs.stdout.contains("consumers.toml"),
        "{}",
        qs.stdout
    );
    assert!(qs.stdout.contains("Lifted 1 suspension"), "{}", qs.stdout);
    assert!(
        !qs.stdout.contains("fsp.toml as you left it"),
        "{}",
        qs.stdout
    );
    let (mut qs, _) = start(dir.path(), ports, &["--keep-suspensions"]);
    let refused = run(&soap);
    assert!(
        refused.contains(" 403") && refused.contains("FSP-AUTHZ-SUSPENDED"),
        "{refused}"
    );
    qs.stop();
}
