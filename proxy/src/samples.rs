//! Sample providers for the quickstart: a National-Register-like `getPerson` over REST
//! and over SOAP, with a few fictitious people. They echo the FSP headers they received
//! so a newcomer can see what providers get from the platform.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use quick_xml::events::Event;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// A fictitious person as the register would describe them.
struct Person {
    ssin: &'static str,
    last_name: &'static str,
    first_names: &'static [&'static str],
    gender: &'static str,
    birth_date: &'static str,
    birth_place: &'static str,
    nationality: &'static str,
    civil_status: &'static str,
    street: &'static str,
    house_number: &'static str,
    postal_code: &'static str,
    municipality: &'static str,
    registered_since: &'static str,
}

const PEOPLE: &[Person] = &[
    Person {
        ssin: "85073003328",
        last_name: "Peeters",
        first_names: &["Marie", "Louise"],
        gender: "F",
        birth_date: "1985-07-30",
        birth_place: "Liège",
        nationality: "BE",
        civil_status: "married",
        street: "Rue de la Loi",
        house_number: "16",
        postal_code: "1000",
        municipality: "Bruxelles",
        registered_since: "2012-04-02",
    },
    Person {
        ssin: "92021415414",
        last_name: "Janssens",
        first_names: &["Thomas"],
        gender: "M",
        birth_date: "1992-02-14",
        birth_place: "Gent",
        nationality: "BE",
        civil_status: "single",
        street: "Korenmarkt",
        house_number: "3",
        postal_code: "9000",
        municipality: "Gent",
        registered_since: "2016-09-15",
    },
    Person {
        ssin: "01061827157",
        last_name: "El Amrani",
        first_names: &["Yasmine", "Nora"],
        gender: "F",
        birth_date: "2001-06-18",
        birth_place: "Bruxelles",
        nationality: "BE",
        civil_status: "single",
        street: "Chaussée de Wavre",
        house_number: "214",
        postal_code: "1050",
        municipality: "Ixelles",
        registered_since: "2019-01-07",
    },
];

/// Whether an SSIN (national register number) has a valid check number.
pub fn valid_ssin(ssin: &str) -> bool {
    if ssin.len() != 11 || !ssin.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let (base, check) = ssin.split_at(9);
    let (Ok(base), Ok(check)) = (base.parse::<u64>(), check.parse::<u64>()) else {
        return false;
    };
    97 - base % 97 == check || 97 - (2_000_000_000 + base) % 97 == check
}

fn find(ssin: &str) -> Option<&'static Person> {
    PEOPLE.iter().find(|p| p.ssin == ssin)
}

fn fsp_headers(req_headers: &http::HeaderMap) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in req_headers {
        if k.as_str().starts_with("fsp-") {
            m.insert(
                k.as_str().to_owned(),
                Value::String(v.to_str().unwrap_or("").to_owned()),
            );
        }
    }
    Value::Object(m)
}

fn person_json(p: &Person) -> Value {
    json!({
        "ssin": p.ssin,
        "name": { "last": p.last_name, "first": p.first_names },
        "gender": p.gender,
        "birth": { "date": p.birth_date, "place": p.birth_place },
        "nationality": p.nationality,
        "civilStatus": p.civil_status,
        "residence": {
            "street": p.street, "houseNumber": p.house_number,
            "postalCode": p.postal_code, "municipality": p.municipality,
            "since": p.registered_since
        }
    })
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// REST: `GET /persons/{ssin}`.
async fn rest(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let problem = |status: StatusCode, detail: String| {
        respond(status, "application/problem+json", json!({"title": status.canonical_reason(), "status": status.as_u16(), "detail": detail}).to_string())
    };
    if req.method() != Method::GET {
        return problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET /persons/{ssin}".into(),
        );
    }
    let Some(ssin) = req.uri().path().strip_prefix("/persons/") else {
        return problem(StatusCode::NOT_FOUND, "use GET /persons/{ssin}".into());
    };
    if !valid_ssin(ssin) {
        return problem(
            StatusCode::BAD_REQUEST,
            format!("{ssin} is not a valid national register number"),
        );
    }
    match find(ssin) {
        Some(p) => {
            let mut body = person_json(p);
            body["receivedFromPlatform"] = fsp_headers(req.headers());
            respond(StatusCode::OK, "application/json", body.to_string())
        }
        None => problem(
            StatusCode::NOT_FOUND,
            format!("no person with SSIN {ssin} in this sample register"),
        ),
    }
}

fn ssin_in(xml: &[u8]) -> Option<String> {
    let mut r = quick_xml::Reader::from_reader(xml);
    let mut inside = false;
    loop {
        match r.read_event().ok()? {
            Event::Start(s) => inside = s.local_name().as_ref().eq_ignore_ascii_case("ssin"),
            Event::Text(t) if inside => return Some(t.trim().to_owned()),
            Event::Eof => return None,
            _ => {}
        }
    }
}

fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(s)
}

/// The sample register's WSDL (`GET ...?wsdl`): SOAP 1.1 and 1.2 ports at the sample's
/// own address, which the gateway rewrites to its own when it serves the WSDL.
fn wsdl(host: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<wsdl:definitions xmlns:wsdl="http://schemas.xmlsoap.org/wsdl/"
    xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/"
    xmlns:soap12="http://schemas.xmlsoap.org/wsdl/soap12/"
    xmlns:xsd="http://www.w3.org/2001/XMLSchema"
    xmlns:rn="urn:be:fgov:sample:rn:person:v2"
    targetNamespace="urn:be:fgov:sample:rn:person:v2">
  <wsdl:types>
    <xsd:schema targetNamespace="urn:be:fgov:sample:rn:person:v2" elementFormDefault="qualified">
      <xsd:element name="getPersonRequest">
        <xsd:complexType><xsd:sequence><xsd:element name="ssin" type="xsd:string"/></xsd:sequence></xsd:complexType>
      </xsd:element>
      <xsd:element name="getPersonResponse">
        <xsd:complexType><xsd:sequence>
          <xsd:element name="Person"><xsd:complexType><xsd:sequence>
            <xsd:element name="SSIN" type="xsd:string"/>
            <xsd:element name="LastName" type="xsd:string"/>
            <xsd:element name="FirstName" type="xsd:string" minOccurs="0" maxOccurs="unbounded"/>
            <xsd:element name="Gender" type="xsd:string"/>
            <xsd:element name="BirthDate" type="xsd:string"/>
            <xsd:element name="BirthPlace" type="xsd:string"/>
            <xsd:element name="Nationality" type="xsd:string"/>
            <xsd:element name="CivilStatus" type="xsd:string"/>
            <xsd:element name="Residence"><xsd:complexType><xsd:sequence>
              <xsd:element name="Street" type="xsd:string"/>
              <xsd:element name="HouseNumber" type="xsd:string"/>
              <xsd:element name="PostalCode" type="xsd:string"/>
              <xsd:element name="Municipality" type="xsd:string"/>
            </xsd:sequence></xsd:complexType></xsd:element>
          </xsd:sequence></xsd:complexType></xsd:element>
          <xsd:element name="RequestedBy" type="xsd:string"/>
        </xsd:sequence></xsd:complexType>
      </xsd:element>
    </xsd:schema>
  </wsdl:types>
  <wsdl:message name="getPersonRequest"><wsdl:part name="parameters" element="rn:getPersonRequest"/></wsdl:message>
  <wsdl:message name="getPersonResponse"><wsdl:part name="parameters" element="rn:getPersonResponse"/></wsdl:message>
  <wsdl:portType name="PersonPortType">
    <wsdl:operation name="getPerson">
      <wsdl:input message="rn:getPersonRequest"/>
      <wsdl:output message="rn:getPersonResponse"/>
    </wsdl:operation>
  </wsdl:portType>
  <wsdl:binding name="PersonSoap11" type="rn:PersonPortType">
    <soap:binding style="document" transport="http://schemas.xmlsoap.org/soap/http"/>
    <wsdl:operation name="getPerson">
      <soap:operation soapAction="urn:getPerson"/>
      <wsdl:input><soap:body use="literal"/></wsdl:input>
      <wsdl:output><soap:body use="literal"/></wsdl:output>
    </wsdl:operation>
  </wsdl:binding>
  <wsdl:binding name="PersonSoap12" type="rn:PersonPortType">
    <soap12:binding style="document" transport="http://schemas.xmlsoap.org/soap/http"/>
    <wsdl:operation name="getPerson">
      <soap12:operation soapAction="urn:getPerson"/>
      <wsdl:input><soap12:body use="literal"/></wsdl:input>
      <wsdl:output><soap12:body use="literal"/></wsdl:output>
    </wsdl:operation>
  </wsdl:binding>
  <wsdl:service name="PersonService">
    <wsdl:port name="PersonSoap11" binding="rn:PersonSoap11"><soap:address location="http://{host}/soap"/></wsdl:port>
    <wsdl:port name="PersonSoap12" binding="rn:PersonSoap12"><soap12:address location="http://{host}/soap"/></wsdl:port>
  </wsdl:service>
</wsdl:definitions>
"#
    )
}

/// SOAP 1.1 and 1.2: `getPersonRequest` with an `ssin` element; `GET ?wsdl`, its WSDL.
async fn soap(req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() == http::Method::GET {
        return match (req.uri().query(), req.headers().get(header::HOST)) {
            (Some(q), Some(host)) if q.eq_ignore_ascii_case("wsdl") => respond(
                StatusCode::OK,
                "text/xml; charset=utf-8",
                wsdl(host.to_str().unwrap_or("localhost")),
            ),
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "GET ?wsdl for the WSDL; POST a SOAP envelope to call getPerson".into(),
            ),
        };
    }
    let v12 = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/soap+xml"));
    let (ns, ct) = if v12 {
        (
            "http://www.w3.org/2003/05/soap-envelope",
            "application/soap+xml; charset=utf-8",
        )
    } else {
        (
            "http://schemas.xmlsoap.org/soap/envelope/",
            "text/xml; charset=utf-8",
        )
    };
    let received = fsp_headers(req.headers());
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let fault = |code: &str, text: &str| {
        let code = if v12 {
            format!(
                "<soap:Code><soap:Value>soap:{}</soap:Value></soap:Code><soap:Reason><soap:Text xml:lang=\"en\">{}</soap:Text></soap:Reason>",
                if code == "Client" {
                    "Sender"
                } else {
                    "Receiver"
                },
                esc(text)
            )
        } else {
            format!(
                "<faultcode>soap:{code}</faultcode><faultstring>{}</faultstring>",
                esc(text)
            )
        };
        respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            if v12 {
                "application/soap+xml; charset=utf-8"
            } else {
                "text/xml; charset=utf-8"
            },
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><soap:Envelope xmlns:soap=\"{ns}\"><soap:Body><soap:Fault>{code}</soap:Fault></soap:Body></soap:Envelope>"
            ),
        )
    };
    let Some(ssin) = ssin_in(&body) else {
        return fault("Client", "the request has no <ssin> element");
    };
    if !valid_ssin(&ssin) {
        return fault(
            "Client",
            &format!("{ssin} is not a valid national register number"),
        );
    }
    let Some(p) = find(&ssin) else {
        return fault(
            "Client",
            &format!("no person with SSIN {ssin} in this sample register"),
        );
    };
    let first: String = p
        .first_names
        .iter()
        .map(|f| format!("<rn:FirstName>{}</rn:FirstName>", esc(f)))
        .collect();
    let consumer = received
        .get("fsp-consumer")
        .and_then(Value::as_str)
        .unwrap_or("");
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<soap:Envelope xmlns:soap=\"{ns}\"><soap:Body><rn:getPersonResponse xmlns:rn=\"urn:be:fgov:sample:rn:person:v2\"><rn:Person><rn:SSIN>{}</rn:SSIN><rn:LastName>{}</rn:LastName>{first}<rn:Gender>{}</rn:Gender><rn:BirthDate>{}</rn:BirthDate><rn:BirthPlace>{}</rn:BirthPlace><rn:Nationality>{}</rn:Nationality><rn:CivilStatus>{}</rn:CivilStatus><rn:Residence><rn:Street>{}</rn:Street><rn:HouseNumber>{}</rn:HouseNumber><rn:PostalCode>{}</rn:PostalCode><rn:Municipality>{}</rn:Municipality></rn:Residence></rn:Person><rn:RequestedBy>{}</rn:RequestedBy></rn:getPersonResponse></soap:Body></soap:Envelope>\n",
        p.ssin,
        esc(p.last_name),
        p.gender,
        p.birth_date,
        esc(p.birth_place),
        p.nationality,
        p.civil_status,
        esc(p.street),
        p.house_number,
        p.postal_code,
        esc(p.municipality),
        esc(consumer)
    );
    respond(StatusCode::OK, ct, xml)
}

/// Which sample provider to run.
#[derive(Clone, Copy, Debug)]
pub enum Sample {
    Rest,
    Soap,
}

/// Starts a sample provider on `listener` (plain HTTP on loopback) in the background.
pub fn spawn(sample: Sample, listener: TcpListener) -> SocketAddr {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req| async move {
                    Ok::<_, Infallible>(match sample {
                        Sample::Rest => rest(req).await,
                        Sample::Soap => soap(req).await,
                    })
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_people_have_valid_ssins() {
        for p in PEOPLE {
            assert!(valid_ssin(p.ssin), "{}", p.ssin);
        }
        assert!(!valid_ssin("85073003329"));
        assert!(!valid_ssin("123"));
    }
}
