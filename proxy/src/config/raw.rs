//! The configuration as written: one struct per TOML table, every unknown key refused.
//!
//! Nothing here is checked beyond its TOML type; [`super::build`] turns these into the
//! validated [`super::Config`]. Tools that write configurations (the load program in
//! `load-tests/`) build these structs and serialise them, so that a renamed key breaks
//! their build rather than their run.

use serde::{Deserialize, Serialize};
use toml::value::Datetime;

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub include: Option<Vec<String>>,
    pub environment: Option<String>,
    /// Extension: the name this gateway instance writes into audit records.
    pub node: Option<String>,
    pub listener: Option<RawListener>,
    pub admin: Option<RawAdmin>,
    pub oauth: Option<RawOAuth>,
    pub audit: Option<RawAudit>,
    pub throttle: Option<RawThrottle>,
    pub cluster: Option<RawCluster>,
    pub telemetry: Option<RawTelemetry>,
    #[serde(default)]
    pub provider: Vec<RawProvider>,
    #[serde(default)]
    pub family: Vec<RawFamily>,
    #[serde(default)]
    pub consumer: Vec<RawConsumer>,
    #[serde(default)]
    pub authorisation: Vec<RawAuthorisation>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub address: String,
    pub public_url: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_ca: String,
    pub crls: Option<Vec<String>>,
    // Extensions.
    pub max_request_bytes: Option<u64>,
    pub handshake_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub drain_timeout: Option<String>,
    /// Worker threads serving consumers (default: one per CPU).
    pub threads: Option<usize>,
    pub request_body_timeout: Option<String>,
    pub response_send_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub max_anonymous_connections: Option<usize>,
    pub max_anonymous_connections_per_ip: Option<usize>,
    /// Load balancers allowed to send the PROXY protocol (v1/v2), as CIDRs.
    pub proxy_protocol_from: Option<Vec<String>>,
    /// Extension: after SIGTERM, how long `/readyz` answers 503 while the listener still
    /// serves, so that load balancers stop sending before it closes.
    pub shutdown_delay: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub address: String,
    pub tokens_file: Option<String>,
    pub admin_cns: Option<Vec<String>>,
    pub tls: Option<bool>,
    /// Extension: trust anchors for admin client certificates (default: `client_ca`).
    pub admin_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth {
    pub issuer: String,
    pub jwks_url: Option<String>,
    pub jwks_file: Option<String>,
    pub audience: String,
    pub algorithms: Option<Vec<String>>,
    pub client_id_claim: Option<String>,
    pub require_certificate_binding: Option<bool>,
    // Extensions.
    pub leeway: Option<String>,
    pub max_token_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub backend: String,
    pub dir: Option<String>,
    pub url: Option<String>,
    /// Extension: a file holding `url` (a mounted secret; the URL carries a password).
    pub url_file: Option<String>,
    pub fail_closed: Option<bool>,
    pub retention_days: Option<u32>,
    /// Extension: an Ed25519 private key (PKCS#8 PEM) the writer signs each node's head
    /// and anchors with, so that the trail cannot be written again without it.
    pub signing_key: Option<String>,
    /// Extension: public keys (PEM) of earlier signing keys whose signatures are still
    /// accepted (after a key rotation).
    pub verify_keys: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawThrottle {
    pub backend: String,
    pub url: Option<String>,
    /// Extension: a file holding `url`.
    pub url_file: Option<String>,
    pub on_backend_error: Option<String>,
    /// Extension: how many gateways share the limits (for the `local` fallback).
    pub replicas: Option<u32>,
    /// Extension: TLS to Redis, for a `rediss://` URL.
    pub tls: Option<RawRedisTls>,
}

/// Extension: TLS to Redis (`rediss://`): the server's CA, and a client certificate.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisTls {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// `[cluster]`: state shared by every replica.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub redis_url: Option<String>,
    /// Extension: a file holding `redis_url`.
    pub redis_url_file: Option<String>,
    /// Extension: the prefix of every key and channel the cluster uses in Redis.
    pub key_prefix: Option<String>,
    /// Extension: TLS to Redis, for a `rediss://` URL.
    pub redis_tls: Option<RawRedisTls>,
}

/// `[telemetry]`: OpenTelemetry traces.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub otlp_endpoint: String,
    pub service_name: Option<String>,
    pub sampling_ratio: Option<f64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    pub rate: String,
    pub burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumerLimit {
    pub consumer: String,
    pub rate: String,
    pub burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub id: String,
    pub name: String,
    pub limit: Option<RawLimit>,
    pub consumer_limit: Option<RawLimit>,
    pub consumer_limits: Option<Vec<RawConsumerLimit>>,
    pub upstream_ca: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    // Extensions.
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub pool_idle_timeout: Option<String>,
    pub pool_max_idle: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_connections_per_consumer: Option<usize>,
    pub queue_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFamily {
    pub id: String,
    pub provider: String,
    #[serde(default)]
    pub service: Vec<RawService>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub id: String,
    pub protocol: String,
    /// Extension: bounds of the XML threat protection for this service's requests and
    /// XML answers.
    pub xml_limits: Option<RawXmlLimits>,
    /// Extension: `false` turns the XML threat protection off for this service, both
    /// ways (a SOAP request's Header is still read).
    pub xml_checks: Option<bool>,
    /// Extension (SOAP services): the gateway's faults are sent under HTTP 500, as the
    /// WS-I Basic Profile asks, instead of the contract's status of each code.
    pub soap_faults_as_500: Option<bool>,
    #[serde(default)]
    pub version: Vec<RawVersion>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawXmlLimits {
    pub max_depth: Option<u32>,
    pub max_attributes: Option<u32>,
    pub max_name_length: Option<u32>,
    pub max_attribute_length: Option<u32>,
    pub max_text_length: Option<u64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawVersion {
    pub version: String,
    pub upstream: String,
    pub released: Datetime,
    pub deprecated: Option<Datetime>,
    pub sunset: Option<Datetime>,
    /// Extension: this version speaks another protocol than the service's default.
    pub protocol: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumer {
    pub id: String,
    pub organisation: String,
    pub enterprise_number: Option<String>,
    pub certificates: Option<Vec<RawCertificate>>,
    pub oauth_client_ids: Option<Vec<String>>,
    pub source_ips: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cn: Option<String>,
    pub sha256: Option<String>,
    /// Extension: the certificate itself (PEM, leaf first): pins its SHA-256 as `sha256`
    /// does, and lets `fsp check` and the inventory see its subject and validity.
    pub file: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthorisation {
    pub id: String,
    pub consumer: String,
    pub service: String,
    pub versions: Option<Vec<String>>,
    pub purpose: String,
    pub legal_basis: RawLegalBasis,
    pub provider_approval: String,
    pub valid_from: Datetime,
    pub valid_until: Option<Datetime>,
    /// Extension: the day from which a revoked authorisation no longer applies.
    pub revoked: Option<Datetime>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLegalBasis {
    pub kind: String,
    pub reference: String,
    pub issuer: Option<String>,
}
