//! # `fsp`: the federal service platform gateway
//!
//! The binary's crate. Consumers (applications of public bodies) call provider services
//! through it; it identifies them, decides, routes, forwards and records every call.
//!
//! - [`config`]: the TOML configuration, parsed then validated;
//! - [`server`]: the TLS listener and connection handling;
//! - [`pipeline`]: the phases of a request, in order;
//! - [`transport`]: below the call: request bodies, the HTTP/1.1 client, upstream pools;
//! - [`response`]: the answer's body and the audit record's completion;
//! - [`errors`]: the only place that renders refusals (problem+json, SOAP faults), and
//!   [`errors::map`], the only place that maps failures to contract codes;
//! - [`oauth`]: bearer tokens verified against the identity provider's keys;
//! - [`soap`]: SOAP versions, faults and response header stamping;
//! - [`xml`]: XML threat protection while bodies stream, and the SOAP Header fields;
//! - [`wsdl`]: WSDL and schema documents with their addresses pointing at the gateway;
//! - [`path`]: the rest of a request path, normalised so it never leaves its version;
//! - [`limits`]: bounds on connections, per source, per provider, and descriptors;
//! - [`state`]: the atomically swapped snapshot of configuration;
//! - [`admin`]: health, readiness, metrics and administrator actions;
//! - [`suspend`]: suspended consumers and providers, persisted;
//! - [`run`], [`quickstart`], [`samples`]: starting it all.

pub mod admin;
pub mod admin_views;
pub mod certwatch;
pub mod config;
pub mod devidp;
pub mod errors;
#[doc(hidden)]
pub mod fuzz;
pub mod headers;
pub mod limits;
pub mod loaded;
pub mod oauth;
pub mod observe;
pub mod path;
pub mod pipeline;
pub mod proxy_header;
pub mod quickstart;
pub mod redis_tls;
pub mod response;
pub mod run;
pub mod samples;
pub mod server;
pub mod soap;
pub mod state;
pub mod suspend;
pub mod telemetry;
pub mod trace;
pub mod transport;
pub mod wsdl;
pub mod xml;
