//! `fsp quickstart` as a newcomer uses it: start it, paste the printed `curl` commands.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

#[test]
fn the_printed_curl_commands_work_when_pasted() {
    if Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        panic!("curl is needed for this test (apt-get install curl)");
    }
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_fsp"))
        .args(["quickstart", "--dir"])
        .arg(dir.path())
        .args([
            "--port",
            &port.to_string(),
            "--admin-port",
            &admin.to_string(),
        ])
        .env("FSP_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();

    let commands = dir.path().join("COMMANDS.txt");
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

    let blocks = blocks(&text);
    assert!(blocks.len() >= 5, "printed commands:\n{text}");
    let run = |cmd: &str| {
        let out = Command::new("bash").args(["-c", cmd]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
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

    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "quickstart did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "quickstart exits 0 on Ctrl-C: {status}");
    // Every call above is in the audit trail.
    let audit: usize = std::fs::read_dir(dir.path().join("audit"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap().lines().count())
        .sum();
    assert!(audit >= 4, "{audit} audit records");
}
