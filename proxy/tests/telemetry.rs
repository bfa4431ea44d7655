//! OpenTelemetry: a consumer's trace is continued, its span reaches a collector (a
//! test-owned OTLP receiver that decodes the protobuf, over HTTP and over gRPC) with
//! the call's attributes, the provider gets the same trace, and the audit record holds
//! its id.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::sync::mpsc;

/// A collector on loopback: every span it receives, with its resource's service name.
async fn collector(grpc: bool) -> (SocketAddr, mpsc::UnboundedReceiver<(String, Span)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let message = if grpc {
                            assert_eq!(
                                path,
                                "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
                            );
                            // Length-prefixed message: not compressed, 4-byte length.
                            assert_eq!(body[0], 0);
                            let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
                            body.slice(5..5 + len)
                        } else {
                            assert_eq!(path, "/v1/traces");
                            body
                        };
                        let export = ExportTraceServiceRequest::decode(message).unwrap();
                        for rs in export.resource_spans {
                            let service = rs
                                .resource
                                .as_ref()
                                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                                .and_then(|a| a.value.as_ref()?.value.clone())
                                .map(|v| match v {
                                    Value::StringValue(s) => s,
                                    other => format!("{other:?}"),
                                })
                                .unwrap_or_default();
                            for ss in rs.scope_spans {
                                for span in ss.spans {
                                    let _ = tx.send((service.clone(), span));
                                }
                            }
                        }
                        let response: Response<StreamBody<_>> = if grpc {
                            let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                                Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
                                Ok(Frame::trailers({
                                    let mut t = http::HeaderMap::new();
                                    t.insert("grpc-status", "0".parse().unwrap());
                                    t
                                })),
                            ];
                            let mut r =
                                Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                            r.headers_mut()
                                .insert("content-type", "application/grpc".parse().unwrap());
                            r
                        } else {
                            let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                                vec![Ok(Frame::data(Bytes::new()))];
                            let mut r =
                                Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                            r.headers_mut()
                                .insert("content-type", "application/x-protobuf".parse().unwrap());
                            r
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(io, svc)
                .await;
            });
        }
    });
    (addr, rx)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.clone())
        .map(|v| match v {
            Value::StringValue(s) => s,
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

async fn a_consumer_trace_reaches_the_collector_the_provider_and_the_audit_record(grpc: bool) {
    let (otlp, mut spans) = collector(grpc).await;
    let pki = Pki::new();
    let up = upstream().await;
    let (port, admin) = (free_port(), free_port());
    let endpoint = if grpc {
        format!("grpc://{otlp}")
    } else {
        format!("http://{otlp}")
    };
    // Ratio 0: only what the consumer sampled is kept (parent-based).
    let config = write_config(
        &pki,
        up,
        port,
        admin,
        &format!(
            "\n[telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"fsp-test\"\nsampling_ratio = 0.0\n"
        ),
    );
    let mut gw = Gateway::spawn(&config, port, admin).await;
    let c = client(&pki, Some(&pki.consumer), false);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";

    // Sampled by the consumer: continued and exported.
    let mut req = get(&gw.url("/person/getPerson/v3/traced"));
    req.headers_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent}-01").parse().unwrap(),
    );
    req.headers_mut()
        .insert("fsp-purpose", "participation-vote".parse().unwrap());
    let (status, _, body, _) = send(&c, req).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let sent = echoed["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(sent.starts_with(&format!("00-{trace_id}-")), "{sent}");
    assert!(sent.ends_with("-01"), "{sent}");
    let hop = sent[36..52].to_owned();
    assert_ne!(hop, parent, "the provider's parent is the gateway's span");

    // Not sampled by the consumer, and a call with no trace: not exported (ratio 0),
    // yet each has a trace id of its own, sent to the provider and recorded.
    let mut req = get(&gw.url("/person/getPerson/v3/unsampled"));
    req.headers_mut().insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
            .parse()
            .unwrap(),
    );
    let (_, _, body, _) = send(&c, req).await.unwrap();
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let unsampled = echoed["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        unsampled.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{unsampled}"
    );
    assert!(unsampled.ends_with("-00"), "{unsampled}");
    let (_, _, body, _) = send(&c, get(&gw.url("/person/getPerson/v3/fresh")))
        .await
        .unwrap();
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let fresh = echoed["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(fresh.len(), 55, "{fresh}");

    // Stopping flushes the queue to the collector.
    assert_eq!(gw.stop().code(), Some(0));
    let (service, span) = tokio::time::timeout(Duration::from_secs(10), spans.recv())
        .await
        .expect("no span reached the collector")
        .unwrap();
    assert_eq!(service, "fsp-test");
    assert_eq!(hex::encode(&span.trace_id), trace_id);
    assert_eq!(hex::encode(&span.parent_span_id), parent);
    assert_eq!(hex::encode(&span.span_id), hop);
    assert_eq!(
        attribute(&span, "fsp.consumer").as_deref(),
        Some("ville-bxl")
    );
    assert_eq!(
        attribute(&span, "fsp.service").as_deref(),
        Some("person/getPerson")
    );
    assert_eq!(attribute(&span, "fsp.version").as_deref(), Some("v3"));
    assert_eq!(
        attribute(&span, "fsp.purpose").as_deref(),
        Some("participation-vote")
    );
    assert_eq!(attribute(&span, "fsp.decision").as_deref(), Some("allowed"));
    assert_eq!(
        attribute(&span, "http.response.status_code").as_deref(),
        Some("200")
    );
    // Only the sampled one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(spans.try_recv().is_err(), "an unsampled call was exported");

    let records = audit_records(&pki);
    let ids: Vec<&str> = records
        .iter()
        .map(|r| r["trace_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [trace_id, "0af7651916cd43dd8448eb211c80319c", &fresh[3..35]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_otlp_http() {
    a_consumer_trace_reaches_the_collector_the_provider_and_the_audit_record(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_otlp_grpc() {
    a_consumer_trace_reaches_the_collector_the_provider_and_the_audit_record(true).await;
}
