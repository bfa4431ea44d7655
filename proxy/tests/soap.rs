//! SOAP as toolkits speak it: a client built by Python `zeep` from the WSDL the gateway
//! serves, SOAP 1.1 and 1.2 envelopes in their many spellings, providers' answers that
//! attack the consumer, and large bodies with flat memory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

const SOAP11: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const SOAP12: &str = "http://www.w3.org/2003/05/soap-envelope";

/// The provider's WSDL: SOAP 1.1 and 1.2 ports at its own (internal) address, and a
/// schema imported by a relative location.
fn provider_wsdl(addr: SocketAddr) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<wsdl:definitions xmlns:wsdl="http://schemas.xmlsoap.org/wsdl/"
  xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/"
  xmlns:soap12="http://schemas.xmlsoap.org/wsdl/soap12/"
  xmlns:xsd="http://www.w3.org/2001/XMLSchema"
  xmlns:tns="urn:person" xmlns:t="urn:person:types" targetNamespace="urn:person">
  <wsdl:types>
    <xsd:schema targetNamespace="urn:person">
      <xsd:import namespace="urn:person:types" schemaLocation="types.xsd"/>
    </xsd:schema>
  </wsdl:types>
  <wsdl:message name="GetPersonRequest"><wsdl:part name="parameters" element="t:GetPerson"/></wsdl:message>
  <wsdl:message name="GetPersonResponse"><wsdl:part name="parameters" element="t:GetPersonResponse"/></wsdl:message>
  <wsdl:portType name="PersonPort">
    <wsdl:operation name="GetPerson">
      <wsdl:input message="tns:GetPersonRequest"/>
      <wsdl:output message="tns:GetPersonResponse"/>
    </wsdl:operation>
  </wsdl:portType>
  <wsdl:binding name="PersonSoap11" type="tns:PersonPort">
    <soap:binding style="document" transport="http://schemas.xmlsoap.org/soap/http"/>
    <wsdl:operation name="GetPerson">
      <soap:operation soapAction="urn:person:GetPerson"/>
      <wsdl:input><soap:body use="literal"/></wsdl:input>
      <wsdl:output><soap:body use="literal"/></wsdl:output>
    </wsdl:operation>
  </wsdl:binding>
  <wsdl:binding name="PersonSoap12" type="tns:PersonPort">
    <soap12:binding style="document" transport="http://schemas.xmlsoap.org/soap/http"/>
    <wsdl:operation name="GetPerson">
      <soap12:operation soapAction="urn:person:GetPerson"/>
      <wsdl:input><soap12:body use="literal"/></wsdl:input>
      <wsdl:output><soap12:body use="literal"/></wsdl:output>
    </wsdl:operation>
  </wsdl:binding>
  <wsdl:service name="PersonService">
    <wsdl:port name="PersonSoap11Port" binding="tns:PersonSoap11"><soap:address location="http://{addr}/soap/v1"/></wsdl:port>
    <wsdl:port name="PersonSoap12Port" binding="tns:PersonSoap12"><soap12:address location="http://{addr}/soap/v1"/></wsdl:port>
  </wsdl:service>
</wsdl:definitions>
"#
    )
}

const TYPES_XSD: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<xsd:schema xmlns:xsd="http://www.w3.org/2001/XMLSchema" targetNamespace="urn:person:types" elementFormDefault="qualified">
  <xsd:element name="GetPerson"><xsd:complexType><xsd:sequence><xsd:element name="ssin" type="xsd:string"/></xsd:sequence></xsd:complexType></xsd:element>
  <xsd:element name="GetPersonResponse"><xsd:complexType><xsd:sequence><xsd:element name="name" type="xsd:string"/></xsd:sequence></xsd:complexType></xsd:element>
</xsd:schema>
"#;

/// What the SOAP provider saw: each request as `METHOD path?query` plus its SOAP action
/// and content type.
type Seen = Arc<Mutex<Vec<String>>>;

/// A SOAP provider: serves its WSDL and schema, and answers `GetPerson` in the SOAP
/// version of the request. Answers with an attack when the SOAP action names one.
async fn soap_provider() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move { Ok::<_, Infallible>(answer(addr, req, &log).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

type Body = AnyBody;

fn full_body(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

/// A body sent as the given frames, one by one (a streamed answer or request).
struct Chunks(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

fn streamed(parts: Vec<Bytes>) -> Body {
    Chunks(parts.into()).boxed_unsync()
}

async fn answer(addr: SocketAddr, req: Request<Incoming>, log: &Seen) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let text = |ct: &str, body: Body| {
        let mut r = Response::new(body);
        r.headers_mut().insert("content-type", ct.parse().unwrap());
        r
    };
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let header = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let ct = header("content-type");
    let action = match header("soapaction").trim_matches('"') {
        "" => ct
            .split(';')
            .find_map(|p| p.trim().strip_prefix("action="))
            .unwrap_or("")
            .trim_matches('"')
            .to_owned(),
        a => a.to_owned(),
    };
    log.lock()
        .unwrap()
        .push(format!("{} {pq} action={action} ct={ct}", parts.method));
    if let Some(kind) = pq.strip_prefix("/person/v3/ct/") {
        // REST answers with awkward Content-Types.
        let (types, body): (&[&str], &str) = match kind {
            "twice" => (&["application/json", "text/xml"], "<!DOCTYPE a><a/>"),
            "utf7" => (&["text/xml; charset=utf-7"], "<a/>"),
            "none-doctype" => (&[], "  <!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>"),
            "none-json" => (&[], "{\"a\": 1}"),
            "docx" => (
                &["application/vnd.openxmlformats-officedocument.wordprocessingml.document"],
                "PK\u{3}\u{4}<!DOCTYPE not xml at all",
            ),
            "problem-xml-doctype" => (&["application/problem+xml"], "<!DOCTYPE p><p/>"),
            _ => (&["application/xml"], "<a>1</a>"),
        };
        let mut r = Response::new(full_body(body.to_owned()));
        for t in types {
            r.headers_mut().append("content-type", t.parse().unwrap());
        }
        return r;
    }
    if parts.method == http::Method::GET {
        return match pq.as_str() {
            "/soap/v1?wsdl" => text("text/xml", full_body(provider_wsdl(addr))),
            "/soap/types.xsd" => text("text/xml", full_body(TYPES_XSD)),
            _ => {
                let mut r = Response::new(full_body("no such document"));
                *r.status_mut() = StatusCode::NOT_FOUND;
                r
            }
        };
    }
    // Read the request whole, counting it (a 20 MB body is not kept).
    let mut body = body;
    let (mut n, mut start) = (0usize, Vec::new());
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(d) = frame.into_data() {
            n += d.len();
            if start.len() < 4096 {
                start.extend_from_slice(&d[..d.len().min(4096 - start.len())]);
            }
        }
    }
    let (ns, ct) = if ct.starts_with("application/soap+xml") {
        (SOAP12, "application/soap+xml; charset=utf-8")
    } else {
        (SOAP11, "text/xml; charset=utf-8")
    };
    let envelope = |inner: &str| {
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{ns}"><env:Body>{inner}</env:Body></env:Envelope>"#
        )
    };
    match action.as_str() {
        "attack:billion-laughs" => text(
            ct,
            full_body(format!(
                r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;"><!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]><env:Envelope xmlns:env="{ns}"><env:Body><r>&lol3;</r></env:Body></env:Envelope>"#
            )),
        ),
        "attack:xxe" => text(
            ct,
            full_body(format!(
                r#"<?xml version="1.0"?><!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><env:Envelope xmlns:env="{ns}"><env:Body><r>&xxe;</r></env:Body></env:Envelope>"#
            )),
        ),
        "attack:deep" => {
            let deep = "<a>".repeat(10_000) + &"</a>".repeat(10_000);
            text(ct, full_body(envelope(&deep)))
        }
        "attack:attribute" => {
            // A 40 MiB attribute value, streamed in 64 KiB pieces.
            let mut parts = vec![Bytes::from(format!(
                r#"<env:Envelope xmlns:env="{ns}"><env:Body><r v=""#
            ))];
            parts.extend((0..640).map(|_| Bytes::from(vec![b'x'; 64 * 1024])));
            parts.push(Bytes::from_static(b"\"/></env:Body></env:Envelope>"));
            text(ct, streamed(parts))
        }
        "attack:late-doctype" => {
            // 1 MiB of good text, then a DTD where no DTD may be.
            let mut parts = vec![Bytes::from(format!(
                r#"<env:Envelope xmlns:env="{ns}"><env:Body><r>"#
            ))];
            parts.extend((0..16).map(|_| Bytes::from(vec![b'x'; 64 * 1024])));
            parts.push(Bytes::from_static(
                b"<!DOCTYPE x [<!ENTITY e 'e'>]>&e;</r></env:Body></env:Envelope>",
            ));
            text(ct, streamed(parts))
        }
        "attack:truncated" => {
            // A large answer that ends before its envelope does.
            let mut parts = vec![Bytes::from(format!(
                r#"<env:Envelope xmlns:env="{ns}"><env:Body><r>"#
            ))];
            parts.extend((0..4).map(|_| Bytes::from(vec![b'x'; 64 * 1024])));
            text(ct, streamed(parts))
        }
        "big" => {
            // As large as the request, streamed back.
            let mut parts = vec![Bytes::from(format!(
                r#"<env:Envelope xmlns:env="{ns}"><env:Body><r>"#
            ))];
            parts.extend((0..n / (64 * 1024)).map(|_| element(b'y')));
            parts.push(Bytes::from_static(b"</r></env:Body></env:Envelope>"));
            text(ct, streamed(parts))
        }
        // As .NET writes it by default: a UTF-8 byte order mark first.
        "answer:bom" => text(
            ct,
            full_body(
                [
                    &b"\xEF\xBB\xBF"[..],
                    format!(r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{ns}"><s:Header><a xmlns="urn:a">1</a></s:Header><s:Body><r/></s:Body></s:Envelope>"#).as_bytes(),
                ]
                .concat(),
            ),
        ),
        // The provider's own FSP fields, behind a CDATA section the stamp would stop at.
        "answer:forged" => text(
            ct,
            full_body(format!(
                r#"<s:Envelope xmlns:s="{ns}"><![CDATA[]]><s:Header><fsp:MessageID xmlns:fsp="urn:be:fgov:fsp:1">00000000-0000-0000-0000-000000000000</fsp:MessageID></s:Header><s:Body><r/></s:Body></s:Envelope>"#
            )),
        ),
        // A SOAP answer that says it is plain text.
        "answer:plain" => text(
            "text/plain",
            full_body(envelope("<r/>")),
        ),
        "fault" => {
            let mut r = text(
                ct,
                full_body(envelope(
                    "<env:Fault><faultcode>env:Server</faultcode><faultstring>provider trouble</faultstring></env:Fault>",
                )),
            );
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
        _ => {
            let got = String::from_utf8_lossy(&start);
            let ssin = got
                .split("ssin>")
                .nth(1)
                .and_then(|s| s.split('<').next())
                .unwrap_or("?")
                .to_owned();
            text(
                ct,
                full_body(envelope(&format!(
                    r#"<t:GetPersonResponse xmlns:t="urn:person:types"><t:name>Person {ssin} ({n} bytes)</t:name></t:GetPersonResponse>"#
                ))),
            )
        }
    }
}

/// An element of 64 KiB (a large document is many elements: one text node may not
/// exceed the XML limits' 16 MiB).
fn element(fill: u8) -> Bytes {
    let mut e = b"<e>".to_vec();
    e.resize(64 * 1024 - 4, fill);
    e.extend_from_slice(b"</e>");
    Bytes::from(e)
}

/// The trail's records (one per call) once `done` holds of them (the file sink writes
/// them a moment after the answer); the last read after 10 s otherwise.
async fn records_when(
    pki: &Pki,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let records = audit_records(pki);
        if done(&records) || std::time::Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

// Field order matters: the gateway stops before its directory is removed.
struct Setup {
    gw: Gateway,
    pki: Pki,
    seen: Seen,
}

/// The gateway with its `public_url` at its own address (so a toolkit can follow the
/// WSDL), in this process or as a process of its own (to measure its memory).
async fn start(process: bool, service_extra: &str) -> Setup {
    let (up, seen) = soap_provider().await;
    let pki = Pki::new();
    let (port, admin) = (free_port(), free_port());
    let config = write_config_with(&pki, up, port, admin, "drain_timeout = \"1s\"", "", "");
    // A second SOAP service whose provider has no WSDL to give.
    let broken = format!(
        r#"
[[family]]
id       = "other"
provider = "rrn"

[[family.service]]
id       = "broken"
protocol = "soap"

[[family.service.version]]
version  = "v1"
upstream = "http://{up}/broken/v1"
released = 2024-01-01

[[authorisation]]
id          = "bxl-broken"
consumer    = "ville-bxl"
service     = "other/broken"
purpose     = "participation-vote"
legal_basis = {{ kind = "deliberation", reference = "CSI/20/123" }}
provider_approval = "RRN-2020-456"
valid_from  = 2020-01-01
"#
    );
    let text = (std::fs::read_to_string(&config).unwrap() + &broken)
        .replace(
            "https://fsp.int.example.be",
            &format!("https://localhost:{port}"),
        )
        .replace(
            "id       = \"getPersonSoap\"\nprotocol = \"soap\"",
            &format!("id       = \"getPersonSoap\"\nprotocol = \"soap\"\n{service_extra}"),
        );
    std::fs::write(&config, text).unwrap();
    let gw = if process {
        Gateway::spawn(&config, port, admin).await
    } else {
        Gateway::start(&config).await
    };
    Setup { gw, pki, seen }
}

fn envelope(ns: &str, prefix: &str, header: Option<&str>, body: &str) -> String {
    let header = header.map_or(String::new(), |h| {
        format!("<{prefix}:Header>{h}</{prefix}:Header>")
    });
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><{prefix}:Envelope xmlns:{prefix}="{ns}">{header}<{prefix}:Body>{body}</{prefix}:Body></{prefix}:Envelope>"#
    )
}

fn soap_request(s: &Setup, v12: bool, action: &str, body: String) -> Request<AnyBody> {
    let url = s.gw.url("/person/getPersonSoap/v1");
    if v12 {
        post(
            &url,
            &format!("application/soap+xml; charset=utf-8; action=\"{action}\""),
            &body,
        )
    } else {
        let mut r = post(&url, "text/xml; charset=utf-8", &body);
        r.headers_mut()
            .insert("soapaction", format!("\"{action}\"").parse().unwrap());
        r
    }
}

// ---------------------------------------------------------------------------------
// zeep

/// The Python with `zeep`: `FSP_TEST_PYTHON`, else `python3`. `None` (the test is
/// skipped, saying why) when it has no zeep, unless `FSP_TEST_ZEEP=1` (CI) requires it.
fn python_with_zeep() -> Option<String> {
    let python = std::env::var("FSP_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = std::process::Command::new(&python)
        .args(["-c", "import zeep"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has {
        return Some(python);
    }
    assert!(
        !std::env::var("FSP_TEST_ZEEP").is_ok_and(|v| v == "1"),
        "FSP_TEST_ZEEP=1 but {python} cannot import zeep: pip install zeep (or set FSP_TEST_PYTHON)"
    );
    eprintln!("skipped: {python} cannot import zeep (pip install zeep; CI sets FSP_TEST_ZEEP=1)");
    None
}

const ZEEP_CLIENT: &str = r#"
import json, sys
import requests, zeep
from lxml import etree
from zeep.plugins import HistoryPlugin
from zeep.transports import Transport

wsdl, cert, key, ca, port = sys.argv[1:6]
FSP = "{urn:be:fgov:fsp:1}"

class Recording(Transport):
    """Every document zeep loads, by URL."""
    loaded = []
    def load(self, url):
        self.loaded.append(url)
        return super().load(url)

session = requests.Session()
# Not REQUESTS_CA_BUNDLE or proxies from the environment: this test's CA, directly.
session.trust_env = False
session.cert = (cert, key)
session.verify = ca
transport = Recording(session=session)
history = HistoryPlugin()
client = zeep.Client(wsdl, transport=transport, plugins=[history])
service = client.bind("PersonService", port)
out = {"address": service._binding_options["address"], "loaded": transport.loaded}
result = service.GetPerson(ssin="85010100123")
out["result"] = str(result)
received = history.last_received
out["message_id"] = received["envelope"].find(".//" + FSP + "MessageID").text
out["http_message_id"] = received["http_headers"].get("FSP-Message-ID")
# A purpose the consumer is not authorised for, in the SOAP Header: a refusal.
purpose = etree.Element(FSP + "Purpose")
purpose.text = "not-authorised"
try:
    service.GetPerson(ssin="1", _soapheaders=[purpose])
    out["fault"] = None
except zeep.exceptions.Fault as fault:
    code = fault.detail.find(".//" + FSP + "Code") if fault.detail is not None else None
    out["fault"] = {"message": fault.message, "code": code.text if code is not None else None}
print(json.dumps(out))
"#;

fn write_pem_files(s: &Setup) -> (PathBuf, PathBuf, PathBuf) {
    let dir = s.pki.path();
    let (cert, key) = (dir.join("zeep-client.pem"), dir.join("zeep-client.key"));
    std::fs::write(&cert, &s.pki.consumer.cert_pem).unwrap();
    std::fs::write(&key, &s.pki.consumer.key_pem).unwrap();
    (cert, key, dir.join("ca.pem"))
}

fn run_zeep(python: &str, dir: &Path, args: &[&str]) -> serde_json::Value {
    let script = dir.join("zeep_client.py");
    std::fs::write(&script, ZEEP_CLIENT).unwrap();
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "zeep failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeep_builds_its_client_from_the_gateways_wsdl_and_calls_through_it() {
    let Some(python) = python_with_zeep() else {
        return;
    };
    let s = start(false, "").await;
    let (cert, key, ca) = write_pem_files(&s);
    let gateway = format!("https://localhost:{}", s.gw.port);
    let wsdl = format!("{gateway}/person/getPersonSoap/v1?wsdl");
    for (port, v12) in [("PersonSoap11Port", false), ("PersonSoap12Port", true)] {
        let dir = s.pki.path().to_owned();
        let args: Vec<String> = [
            wsdl.as_str(),
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
            ca.to_str().unwrap(),
            port,
        ]
        .map(str::to_owned)
        .into();
        let python = python.clone();
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_zeep(&python, &dir, &args)
        })
        .await
        .unwrap();
        // The client posts to the gateway, and every document it loaded came from it.
        assert_eq!(
            out["address"],
            format!("{gateway}/person/getPersonSoap/v1"),
            "{out}"
        );
        let loaded: Vec<&str> = out["loaded"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(loaded.len() >= 2, "the WSDL and its schema: {loaded:?}");
        assert!(loaded.iter().all(|u| u.starts_with(&gateway)), "{loaded:?}");
        assert!(
            out["result"]
                .as_str()
                .unwrap()
                .contains("Person 85010100123"),
            "{out}"
        );
        // The FSP message id is read from the SOAP Header, and is the HTTP field's.
        let id = out["message_id"].as_str().unwrap();
        assert_eq!(out["http_message_id"], id);
        assert_eq!(id.len(), 36, "{id}");
        // A refusal surfaces as zeep's Fault, carrying the code.
        assert_eq!(
            out["fault"]["code"], "FSP-AUTHZ-NO-AUTHORISATION",
            "{out} ({port})"
        );
        // The provider saw the call in the binding's SOAP version.
        let seen = s.seen.lock().unwrap().clone();
        let call = seen.iter().rev().find(|l| l.starts_with("POST")).unwrap();
        assert!(
            call.contains(if v12 {
                "ct=application/soap+xml"
            } else {
                "ct=text/xml"
            }),
            "{call}"
        );
    }
    // The provider was asked for its WSDL and schema once (then the cache served them),
    // never with the consumer's credentials.
    let seen = s.seen.lock().unwrap().clone();
    let gets: Vec<&String> = seen.iter().filter(|l| l.starts_with("GET")).collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    // Every fetch of the WSDL and schema is recorded like a call.
    let is_wsdl = |r: &serde_json::Value| {
        r["operation"]
            .as_str()
            .is_some_and(|o| o.starts_with("GET /person/getPersonSoap/v1?"))
    };
    let records = records_when(&s.pki, |r| r.iter().filter(|r| is_wsdl(r)).count() >= 4).await;
    let wsdl_records: Vec<_> = records.iter().filter(|r| is_wsdl(r)).collect();
    assert!(wsdl_records.len() >= 4, "{wsdl_records:?}");
    assert!(
        wsdl_records.iter().all(|r| r["status"] == 200
            && r["consumer"] == "ville-bxl"
            && r["decision"] == "allowed")
    );
}

// ---------------------------------------------------------------------------------
// The WSDL as served

#[tokio::test]
async fn the_wsdl_points_at_the_gateway_and_is_served_to_authorised_consumers_only() {
    let s = start(false, "").await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    let gateway = format!("https://localhost:{}/person/getPersonSoap/v1", s.gw.port);
    let (status, h, body, _) = send(&c, get(&s.gw.url("/person/getPersonSoap/v1?WSDL")))
        .await
        .unwrap();
    let wsdl = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, StatusCode::OK, "{wsdl}");
    assert!(h["content-type"].to_str().unwrap().starts_with("text/xml"));
    assert!(h.contains_key("fsp-message-id"));
    assert!(
        !wsdl.contains("127.0.0.1"),
        "no provider address left: {wsdl}"
    );
    assert!(
        wsdl.contains(&format!(r#"<soap:address location="{gateway}"/>"#)),
        "{wsdl}"
    );
    assert!(
        wsdl.contains(&format!(r#"<soap12:address location="{gateway}"/>"#)),
        "{wsdl}"
    );
    assert!(
        wsdl.contains(&format!(r#"schemaLocation="{gateway}?xsd=1""#)),
        "{wsdl}"
    );
    let (status, _, xsd, _) = send(&c, get(&format!("{gateway}?xsd=1"))).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(xsd, TYPES_XSD.as_bytes());
    // Documents the WSDL does not reference are not fetched for anyone.
    for q in ["xsd=2", "wsdl=1", "xsd=0", "xsd=../../etc/passwd"] {
        let (status, _, body, _) = send(&c, get(&format!("{gateway}?{q}"))).await.unwrap();
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{q}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    // A consumer without an authorisation for the service gets no WSDL.
    let stranger = client(&s.pki, Some(&s.pki.stranger), false);
    let (status, _, _, _) = send(&stranger, get(&format!("{gateway}?wsdl")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let anonymous = client(&s.pki, None, false);
    let (status, _, _, _) = send(&anonymous, get(&format!("{gateway}?wsdl")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A GET without ?wsdl is still refused, naming the way to the WSDL.
    let (status, _, body, _) = send(&c, get(&gateway)).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("?wsdl"));
    let seen = s.seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|l| l.starts_with("GET")).count(),
        2,
        "{seen:?}"
    );
}

// ---------------------------------------------------------------------------------
// Envelopes

#[tokio::test]
async fn soap_11_and_12_envelopes_in_any_spelling_are_forwarded_and_stamped() {
    let s = start(false, "").await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    let call = r#"<t:GetPerson xmlns:t="urn:person:types"><t:ssin>42</t:ssin></t:GetPerson>"#;
    let wsa = r#"<wsa:MessageID xmlns:wsa="http://www.w3.org/2005/08/addressing">urn:uuid:consumer-1</wsa:MessageID><wsa:Action xmlns:wsa="http://www.w3.org/2005/08/addressing">urn:wsa:GetPerson</wsa:Action>"#;
    for (v12, prefix, header) in [
        (false, "soap", None),
        (false, "SOAP-ENV", Some(wsa)),
        (false, "e", Some("")),
        (true, "env", None),
        (true, "s12", Some(wsa)),
        (
            true,
            "x",
            Some(r#"<fsp:EndUser xmlns:fsp="urn:be:fgov:fsp:1">agent-7</fsp:EndUser>"#),
        ),
    ] {
        let ns = if v12 { SOAP12 } else { SOAP11 };
        let body = envelope(ns, prefix, header, call);
        let (status, h, answer, _) = send(&c, soap_request(&s, v12, "", body)).await.unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(status, StatusCode::OK, "{prefix}: {text}");
        let id = h["fsp-message-id"].to_str().unwrap();
        assert!(
            text.contains(&format!(
                "<fsp:MessageID xmlns:fsp=\"urn:be:fgov:fsp:1\">{id}</fsp:MessageID>"
            )),
            "{text}"
        );
        assert!(text.contains("Person 42"), "{text}");
        let expected = if v12 {
            "application/soap+xml"
        } else {
            "text/xml"
        };
        assert!(h["content-type"].to_str().unwrap().starts_with(expected));
        // The stamped answer is well-formed XML.
        let mut reader = quick_xml::Reader::from_str(&text);
        loop {
            match reader.read_event() {
                Ok(quick_xml::events::Event::Eof) => break,
                Ok(_) => {}
                Err(e) => panic!("{e}: {text}"),
            }
        }
    }
    // The records: WS-Addressing's MessageID as the consumer's reference, its Action
    // (or the Body's first child) as the operation, the end user from the Header.
    let records = records_when(&s.pki, |r| r.len() >= 6).await;
    let ops: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap_or(""),
                r["consumer_ref"].as_str().unwrap_or(""),
                r["end_user"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("GetPerson", "", ""),
            ("urn:wsa:GetPerson", "urn:uuid:consumer-1", ""),
            ("GetPerson", "", ""),
            ("GetPerson", "", ""),
            ("urn:wsa:GetPerson", "urn:uuid:consumer-1", ""),
            ("GetPerson", "", "agent-7"),
        ]
    );
    // The HTTP action (SOAPAction, or SOAP 1.2's action parameter) wins when given.
    for v12 in [false, true] {
        let ns = if v12 { SOAP12 } else { SOAP11 };
        let (status, _, _, _) = send(
            &c,
            soap_request(&s, v12, "urn:http:GetPerson", envelope(ns, "s", None, call)),
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    let records = records_when(&s.pki, |r| r.len() >= 10).await;
    assert!(
        records[records.len() - 2..]
            .iter()
            .all(|r| r["operation"] == "urn:http:GetPerson")
    );
    // Given both ways, the HTTP action and WS-Addressing's Action must be the same (the
    // record names one operation; the provider may dispatch on either).
    for (action, status) in [
        ("urn:wsa:GetPerson", StatusCode::OK),
        ("urn:http:GetPerson", StatusCode::BAD_REQUEST),
    ] {
        for v12 in [false, true] {
            let ns = if v12 { SOAP12 } else { SOAP11 };
            let body = envelope(ns, "s", Some(wsa), call);
            let (got, _, answer, _) = send(&c, soap_request(&s, v12, action, body)).await.unwrap();
            let text = String::from_utf8_lossy(&answer);
            assert_eq!(got, status, "{action}: {text}");
            if status == StatusCode::BAD_REQUEST {
                assert!(text.contains("WS-Addressing Action"), "{text}");
            }
        }
    }
}

/// The stamp goes into the SOAP Header of every answer of a SOAP service, once: behind a
/// byte order mark, and whatever the answer says its type is. An answer it cannot go into
/// (text before the Header, here hiding a Header with the provider's own FSP fields) is a
/// fault, the provider's.
#[tokio::test]
async fn every_soap_answer_is_stamped_in_its_header_or_refused() {
    let mut s = start(true, "").await;
    for v12 in [false, true] {
        let ns = if v12 { SOAP12 } else { SOAP11 };
        for action in ["answer:bom", "answer:plain"] {
            let req = soap_request(&s, v12, action, envelope(ns, "s", None, "<q/>"));
            let c = client(&s.pki, Some(&s.pki.consumer), false);
            let (status, body) = read_whole(&c, req).await;
            let body = body.unwrap();
            assert_eq!(status, StatusCode::OK, "{action}");
            let text = String::from_utf8_lossy(&body);
            assert_eq!(
                text.matches("<fsp:MessageID").count(),
                1,
                "{action}: {text}"
            );
            // Parsed as a consumer would: well-formed, the stamp inside the Header.
            let start = usize::from(action == "answer:bom") * 3;
            assert!(
                body.starts_with(b"\xEF\xBB\xBF") == (start == 3),
                "{action}"
            );
            let mut r = quick_xml::Reader::from_reader(&body[start..]);
            let mut open: Vec<String> = Vec::new();
            loop {
                match r
                    .read_event()
                    .unwrap_or_else(|e| panic!("{action}: {e}: {text}"))
                {
                    quick_xml::events::Event::Start(e) => {
                        let name = e.local_name().as_ref().to_owned();
                        if name == "MessageID" {
                            assert_eq!(open, ["Envelope", "Header"], "{action}: {text}");
                        }
                        open.push(name);
                    }
                    quick_xml::events::Event::End(_) => {
                        open.pop();
                    }
                    quick_xml::events::Event::Eof => break,
                    _ => {}
                }
            }
        }
        let req = soap_request(&s, v12, "answer:forged", envelope(ns, "s", None, "<q/>"));
        let c = client(&s.pki, Some(&s.pki.consumer), false);
        let (status, body) = read_whole(&c, req).await;
        let text = String::from_utf8_lossy(&body.unwrap()).into_owned();
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{text}");
        assert!(text.contains("FSP-UPSTREAM-UNAVAILABLE"), "{text}");
        assert!(!text.contains("00000000-0000"), "{text}");
    }
    s.gw.stop();
}

#[tokio::test]
async fn a_providers_fault_is_passed_on_stamped() {
    let s = start(false, "").await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    for v12 in [false, true] {
        let ns = if v12 { SOAP12 } else { SOAP11 };
        let (status, h, body, _) = send(
            &c,
            soap_request(&s, v12, "fault", envelope(ns, "s", None, "<q/>")),
        )
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let id = h["fsp-message-id"].to_str().unwrap();
        assert!(
            text.contains(&format!(">{id}</fsp:MessageID>")) && text.contains("provider trouble"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn refusals_can_be_sent_under_500_for_toolkits_that_read_no_fault_otherwise() {
    let s = start(false, "soap_faults_as_500 = true").await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    let mut req = soap_request(&s, false, "", envelope(SOAP11, "s", None, "<q/>"));
    req.headers_mut()
        .insert("fsp-purpose", "not-authorised".parse().unwrap());
    let (status, _, body, _) = send(&c, req).await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
    assert!(
        text.contains("<fsp:Code>FSP-AUTHZ-NO-AUTHORISATION</fsp:Code>"),
        "{text}"
    );
    let last = records_when(&s.pki, |r| !r.is_empty()).await.pop().unwrap();
    assert_eq!(
        (last["status"].as_u64(), last["decision"].as_str()),
        (Some(500), Some("FSP-AUTHZ-NO-AUTHORISATION"))
    );
}

// ---------------------------------------------------------------------------------
// Attacks in providers' answers

#[tokio::test]
async fn rest_answers_are_checked_when_a_consumer_could_take_them_for_xml() {
    let s = start(false, "").await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    for (kind, expected) in [
        ("xml-ok", StatusCode::OK),
        ("none-json", StatusCode::OK),
        ("docx", StatusCode::OK),
        ("twice", StatusCode::BAD_GATEWAY),
        ("utf7", StatusCode::BAD_GATEWAY),
        ("none-doctype", StatusCode::BAD_GATEWAY),
        ("problem-xml-doctype", StatusCode::BAD_GATEWAY),
    ] {
        let mut req = get(&s.gw.url(&format!("/person/getPerson/v3/ct/{kind}")));
        req.headers_mut()
            .insert("fsp-purpose", "participation-vote".parse().unwrap());
        let (status, _, body, _) = send(&c, req).await.unwrap();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, expected, "{kind}: {text}");
        if expected == StatusCode::BAD_GATEWAY {
            assert!(
                text.contains("FSP-UPSTREAM-UNAVAILABLE") && !text.contains("DOCTYPE"),
                "{kind}: {text}"
            );
        }
    }
}

#[tokio::test]
async fn a_head_of_an_xml_answer_keeps_the_length_of_what_a_get_would_give() {
    let s = start(false, "").await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    let mut req = get(&s.gw.url("/person/getPerson/v3/ct/xml-ok"));
    *req.method_mut() = http::Method::HEAD;
    req.headers_mut()
        .insert("fsp-purpose", "participation-vote".parse().unwrap());
    let (status, h, body, _) = send(&c, req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    assert_eq!(
        h.get("content-length").map(|v| v.to_str().unwrap()),
        Some("8")
    );
}

#[tokio::test]
async fn an_http_10_consumer_gets_a_checked_answer_whole_or_a_fault() {
    use tokio::io::AsyncWriteExt;
    let s = start(false, "").await;
    for (action, status) in [("", 200), ("attack:late-doctype", 502)] {
        let body = envelope(
            SOAP11,
            "s",
            None,
            "<t:GetPerson xmlns:t=\"urn:person:types\"><t:ssin>7</t:ssin></t:GetPerson>",
        );
        let request = format!(
            "POST /person/getPersonSoap/v1 HTTP/1.0\r\nHost: localhost\r\nContent-Type: text/xml; charset=utf-8\r\nSOAPAction: \"{action}\"\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut tls = raw_tls(&s.pki, &s.pki.consumer, s.gw.port).await;
        tls.write_all(request.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        let (got, text) = read_response(&mut tls).await;
        assert_eq!(got, status, "{action}: {text}");
        if status == 502 {
            // A late refusal cannot be shown to an HTTP/1.0 client by cutting the answer
            // off: it is read whole first, and refused whole.
            assert!(
                text.contains("FSP-UPSTREAM-UNAVAILABLE") && !text.contains("xxxx"),
                "{text}"
            );
        }
    }
}

#[tokio::test]
async fn a_wsdl_the_provider_cannot_give_is_a_fault_and_is_not_asked_again_at_once() {
    let s = start(false, "").await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    for _ in 0..3 {
        let (status, _, body, _) = send(&c, get(&s.gw.url("/other/broken/v1?wsdl")))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{text}");
        assert!(
            text.contains("FSP-UPSTREAM-UNAVAILABLE") && !text.contains("127.0.0.1"),
            "{text}"
        );
    }
    let seen = s.seen.lock().unwrap().clone();
    let asked = seen
        .iter()
        .filter(|l| l.starts_with("GET /broken/v1?wsdl"))
        .count();
    assert_eq!(asked, 1, "{seen:?}");
    let records = records_when(&s.pki, |r| {
        r.iter().filter(|r| r["status"] == 502).count() >= 3
    })
    .await;
    assert!(
        records
            .iter()
            .all(|r| r["status"] == 502 && r["fault"] == "provider" && r["purpose"].is_null()),
        "{records:?}"
    );
}

/// Reads an answer whole; `Err` when it was cut off (not complete).
async fn read_whole(
    c: &hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        AnyBody,
    >,
    req: Request<AnyBody>,
) -> (StatusCode, Result<Bytes, String>) {
    // Cut off before its head was flushed: no answer at all.
    let resp = match c.request(req).await {
        Ok(resp) => resp,
        Err(e) => return (StatusCode::BAD_GATEWAY, Err(format!("no answer: {e}"))),
    };
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (status, body)
}

/// Streams a few 2 MiB calls and answers over new connections, so that every worker
/// thread has made its buffers for large bodies (a one-time cost, not a growth) before
/// memory is measured.
async fn warm_up(s: &Setup) {
    for _ in 0..4 {
        let c = client(&s.pki, Some(&s.pki.consumer), false);
        let mut parts = vec![Bytes::from(format!(
            r#"<s:Envelope xmlns:s="{SOAP11}"><s:Body><big>"#
        ))];
        parts.extend((0..32).map(|_| element(b'w')));
        parts.push(Bytes::from_static(b"</big></s:Body></s:Envelope>"));
        let req = Request::post(s.gw.url("/person/getPersonSoap/v1"))
            .header("content-type", "text/xml; charset=utf-8")
            .header("soapaction", "\"big\"")
            .body(streamed(parts))
            .unwrap();
        let (status, body) = read_whole(&c, req).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.unwrap().len() > 2_000_000);
    }
}

#[tokio::test]
async fn attacks_in_providers_answers_are_faults_and_nothing_complete_is_delivered() {
    let mut s = start(true, "").await;
    warm_up(&s).await;
    let (peak_before, _) = s.gw.memory_kib();
    for v12 in [false, true] {
        let ns = if v12 { SOAP12 } else { SOAP11 };
        for attack in [
            "billion-laughs",
            "xxe",
            "deep",
            "attribute",
            "late-doctype",
            "truncated",
        ] {
            let req = soap_request(
                &s,
                v12,
                &format!("attack:{attack}"),
                envelope(ns, "s", None, "<q/>"),
            );
            // A connection of its own: one cut off is not reused.
            let c = client(&s.pki, Some(&s.pki.consumer), false);
            let (status, body) = read_whole(&c, req).await;
            match body {
                Ok(body) => {
                    // Refused before its head: the documented fault, of the request's version.
                    let text = String::from_utf8_lossy(&body);
                    assert_eq!(status, StatusCode::BAD_GATEWAY, "{attack}: {text}");
                    assert!(
                        text.contains("<fsp:Code>FSP-UPSTREAM-UNAVAILABLE</fsp:Code>"),
                        "{attack}: {text}"
                    );
                    assert!(text.contains(ns), "{attack}: {text}");
                    assert!(!text.contains("lol") && !text.contains("passwd"), "{text}");
                }
                // Refused after its head: cut off, never complete.
                Err(e) => assert!(
                    matches!(attack, "attribute" | "late-doctype" | "truncated"),
                    "{attack}: cut off ({e}) though it could be refused whole"
                ),
            }
        }
    }
    let (peak_after, _) = s.gw.memory_kib();
    let growth_mib = (peak_after.saturating_sub(peak_before)) as f64 / 1024.0;
    eprintln!("gateway peak RSS {peak_before} KiB -> {peak_after} KiB (+{growth_mib:.1} MiB)");
    // A gateway that held the 40 MiB attribute would grow by 40 MiB at least; the
    // allocator alone grows in 4 MiB steps and was seen to add 14.3 MiB on a loaded
    // machine (a clean-clone CI run, the baseline taken low).
    assert!(growth_mib < 20.0, "peak RSS grew by {growth_mib:.1} MiB");
    // Each is recorded as the provider's fault.
    let is_attack = |r: &serde_json::Value| {
        r["operation"]
            .as_str()
            .is_some_and(|o| o.starts_with("attack:"))
    };
    // Each call's outcome, not only its write-ahead line (the outcome is written when
    // the answer's body is dropped, a moment after the client has read it).
    let records = records_when(&s.pki, |r| {
        r.iter()
            .filter(|r| is_attack(r) && r["phase"] != "request")
            .count()
            >= 12
    })
    .await;
    let attacks: Vec<_> = records.iter().filter(|r| is_attack(r)).collect();
    assert_eq!(attacks.len(), 12);
    assert!(
        attacks.iter().all(|r| r["fault"] == "provider"),
        "{attacks:?}"
    );
    s.gw.stop();
}

#[tokio::test]
async fn a_20_mb_soap_call_and_answer_stream_with_flat_memory() {
    let mut s = start(true, "").await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    warm_up(&s).await;
    let (peak_before, _) = s.gw.memory_kib();
    // 20 MB of text in the Body, streamed in 64 KiB frames.
    let head = format!(r#"<s:Envelope xmlns:s="{SOAP11}"><s:Header/><s:Body><big>"#);
    let mut parts = vec![Bytes::from(head)];
    parts.extend((0..320).map(|_| element(b'z')));
    parts.push(Bytes::from_static(b"</big></s:Body></s:Envelope>"));
    let total: usize = parts.iter().map(Bytes::len).sum();
    let req = Request::post(s.gw.url("/person/getPersonSoap/v1"))
        .header("content-type", "text/xml; charset=utf-8")
        .header("soapaction", "\"big\"")
        .body(streamed(parts))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let (mut got, mut start) = (0usize, Vec::new());
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            got += d.len();
            if start.len() < 512 {
                start.extend_from_slice(&d[..d.len().min(512 - start.len())]);
            }
        }
    }
    assert!(got >= 20 * 1024 * 1024, "{got} bytes back");
    assert!(
        String::from_utf8_lossy(&start).contains("<fsp:MessageID"),
        "stamped"
    );
    let (peak_after, _) = s.gw.memory_kib();
    let growth_mib = (peak_after.saturating_sub(peak_before)) as f64 / 1024.0;
    eprintln!(
        "{total} bytes up and {got} down; gateway peak RSS {peak_before} KiB -> {peak_after} KiB (+{growth_mib:.1} MiB)"
    );
    // A gateway that held either 20 MiB body would grow by 20 MiB at least; the
    // allocator alone was seen to add 8.0 MiB (a clean CI run failed on `< 8.0`).
    assert!(growth_mib < 12.0, "peak RSS grew by {growth_mib:.1} MiB");
    // The four warm-up calls and this one, each with its outcome.
    let done = |r: &serde_json::Value| r["operation"] == "big" && r["phase"] != "request";
    let records = records_when(&s.pki, |r| r.iter().filter(|r| done(r)).count() >= 5).await;
    let big = records.iter().rev().find(|r| done(r)).unwrap();
    assert_eq!(big["request_bytes"].as_u64(), Some(total as u64));
    s.gw.stop();
}
