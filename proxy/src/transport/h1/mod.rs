//! HTTP/1.1 towards providers, spoken by the call's own task: the heads ([`codec`]), the
//! body framing and its chunked decoder ([`chunked`]), and the exchange over a pooled
//! connection ([`conn`]). Each file uses only those listed before it.

pub mod chunked;
pub mod codec;
pub mod conn;
