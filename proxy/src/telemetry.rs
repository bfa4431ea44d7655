//! OpenTelemetry traces (`[telemetry]`): one span per call, exported over OTLP/HTTP
//! (protobuf) or OTLP/gRPC by a batch processor on a thread of its own, so that a slow
//! or absent collector never holds a call (spans beyond the queue are dropped).
//!
//! The spans are `tracing` spans of the target [`CALL_TARGET`] bridged by
//! `tracing-opentelemetry`; only that layer sees them (the log output does not). Sampling
//! is parent-based: a consumer's sampled trace is always kept, an unsampled one never,
//! and a trace the gateway starts is kept with `sampling_ratio`. Without `[telemetry]`
//! no span is made at all (see `crate::trace`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

use crate::config::{OtlpEndpoint, Telemetry};

/// The target of the per-call spans.
pub const CALL_TARGET: &str = "fsp::call";

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The tracer provider in force; shut down (flushing what is queued) at exit.
#[derive(Debug)]
pub struct Exporting {
    provider: SdkTracerProvider,
}

impl Exporting {
    /// Sends what is still queued, within a few seconds.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "spans still queued at exit may be lost");
        }
    }
}

/// Builds the exporter and the tracer for `cfg`; call it inside the control runtime
/// (the exporters' connections live there). `node` names the instance.
pub fn start(
    cfg: &Telemetry,
    node: &str,
) -> anyhow::Result<(opentelemetry_sdk::trace::Tracer, Exporting)> {
    let exporter = match &cfg.endpoint {
        OtlpEndpoint::Http(base) => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(HttpClient::new()?)
            .with_endpoint(format!("{base}/v1/traces"))
            .with_timeout(EXPORT_TIMEOUT)
            .build()?,
        OtlpEndpoint::Grpc(url) => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(url.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()?,
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .with_attributes([
            opentelemetry::KeyValue::new("service.instance.id", node.to_owned()),
            opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        // The sampling decision is `crate::trace`'s, taken before a span is made (so a
        // call that is not kept costs no span): every span that reaches here is kept.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("fsp");
    Ok((tracer, Exporting { provider }))
}

/// OTLP/HTTP over the gateway's own HTTP stack (hyper, rustls with the system's CA
/// certificates). The batch processor's thread awaits each export; the request itself
/// runs on the control runtime.
#[derive(Debug)]
struct HttpClient {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    runtime: tokio::runtime::Handle,
}

impl HttpClient {
    fn new() -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        let tls = rustls::ClientConfig::builder_with_provider(certs::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(https);
        Ok(Self {
            client,
            runtime: tokio::runtime::Handle::try_current()?,
        })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for HttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, Full::new(body));
        let exchange = async move {
            let response = client.request(request).await?;
            let (parts, body) = response.into_parts();
            // The collector's answer is small; more is not read.
            let body = http_body_util::Limited::new(body, 1 << 20)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        };
        let timed = async move {
            tokio::time::timeout(EXPORT_TIMEOUT, exchange)
                .await
                .map_err(|_| -> opentelemetry_http::HttpError {
                    "the collector did not answer in time".into()
                })?
        };
        self.runtime.spawn(timed).await?
    }
}
