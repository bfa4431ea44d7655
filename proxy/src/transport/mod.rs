//! # Transport
//!
//! What sits below a call and knows nothing of the gateway's policy: the consumer's
//! request [`body`] on its way out, the HTTP/1.1 client ([`h1`]: codec, chunked decoding,
//! connection), and the [`pool`]s of kept-alive provider connections. Nothing here reads
//! the configuration, the catalogue, the audit trail or the gateway's state; the layers
//! above hand it what it needs.

pub mod body;
pub mod h1;
pub mod pool;
