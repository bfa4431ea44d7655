//! Fuzz targets for every parser that takes bytes from the network or from an operator,
//! run on the stable toolchain.
//!
//! Each target (see `proxy::fuzz`) is driven by a small mutation fuzzer: it starts from
//! the corpus in `proxy/fuzz/corpus/<target>/` (files checked into the repository, one
//! input each), mutates inputs (bit flips, interesting bytes, dictionary tokens such as
//! `<!DOCTYPE`, `%2e`, `\r\n0\r\n`, deletions, duplications, splices of two inputs) and
//! runs the target on each, for `FSP_FUZZ_SECONDS` seconds per target (3 by default,
//! 30 in CI). It is not coverage-guided (no nightly toolchain here for libFuzzer, and AFL
//! needs its own runner); the targets check properties instead of only "no crash": the
//! same verdict however the bytes are chunked, nothing forwarded outside a version,
//! nothing of a provider's answer lost. A failing input is written to
//! `target/fuzz-failures/` and printed; `FSP_FUZZ_SEED` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// xorshift64*: small, fast, and reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[u8] = &[
    0, 0xff, 0x7f, 0x80, b'\r', b'\n', b' ', b'\t', b'<', b'>', b'/', b'&', b';', b'%', b'.', b'"',
    b'\'', b'=', b':', b'?', b'!', b'[', b']', b'-', b'0', b'9', b'a', b'f', b'\\',
];

const DICTIONARY: &[&[u8]] = &[
    b"<!DOCTYPE x [<!ENTITY e \"v\">]>",
    b"<!ENTITY",
    b"<?xml version=\"1.0\" encoding=\"UTF-7\"?>",
    b"<![CDATA[",
    b"]]>",
    b"<!--",
    b"-->",
    b"&lt;",
    b"&#0;",
    b"&#x10FFFF;",
    b"&e;",
    b"xmlns:fsp=\"urn:be:fgov:fsp:1\"",
    b"xmlns=\"http://schemas.xmlsoap.org/soap/envelope/\"",
    b"<s:Header>",
    b"</s:Header>",
    b"<s:Body>",
    b"\xef\xbb\xbf",
    b"%2e",
    b"%2f",
    b"%252e",
    b"%5c",
    b"..;",
    b"/../",
    b"//",
    b"\r\n",
    b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"transfer-encoding: chunked\r\n",
    b"content-length: 5\r\n",
    b"connection: close\r\n",
    b"0\r\n\r\n",
    b"ffffffffffffffff\r\n",
    b";ext=1",
    b"\"alg\":\"none\"",
    b"\"kid\":\"k1\"",
    b"\"kty\":\"EC\"",
    b"\"kty\":\"oct\"",
    b"eyJ",
    b"[listener]\n",
    b"include = [\"x.toml\"]\n",
    b"[[family.service.version]]\n",
    b"sunset = 2099-01-01\n",
    b"rate = \"1000/s\"\n",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let at = rng.below(len);
                input[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                input[at] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let at = rng.below(len + 1);
                let token = DICTIONARY[rng.below(DICTIONARY.len())];
                input.splice(at..at, token.iter().copied());
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below(16.min(len - at));
                input.drain(at..at + n);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below(64.min(len - at));
                let copy: Vec<u8> = input[at..at + n].to_vec();
                let to = rng.below(len + 1);
                input.splice(to..to, copy);
            }
            5 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            6 => {
                let at = rng.below(len + 1);
                let b = INTERESTING[rng.below(INTERESTING.len())];
                let n = 1 + rng.below(128);
                input.splice(at..at, std::iter::repeat_n(b, n));
            }
            _ => {
                let at = rng.below(len + 1);
                input.insert(at, rng.next() as u8);
            }
        }
    }
    input.truncate(64 * 1024);
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {} is missing: {e}", dir.display()))
        .flatten()
        .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "the corpus {} is empty", dir.display());
    inputs.into_iter().map(|(_, b)| b).collect()
}

fn seconds() -> Duration {
    let s = std::env::var("FSP_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(s)
}

/// Runs `target` on the corpus, then on mutations of it until the time is up.
fn fuzz(name: &str, target: impl Fn(&[u8])) {
    let seed = std::env::var("FSP_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let mut rng = Rng(seed);
    let pool = corpus(name);
    let run = |input: &[u8]| {
        if catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{name}-{seed}.bin"));
            let _ = std::fs::write(&file, input);
            panic!(
                "fuzz target {name} failed (FSP_FUZZ_SEED={seed}); input saved to {}: {:?}",
                file.display(),
                String::from_utf8_lossy(input)
            );
        }
    };
    for input in &pool {
        run(input);
    }
    let deadline = Instant::now() + seconds();
    let mut runs = 0u64;
    let mut input = Vec::new();
    while Instant::now() < deadline {
        // Mostly fresh mutations of a corpus input, sometimes a further mutation of the
        // last one (to reach deeper states).
        if rng.below(4) != 0 || input.is_empty() {
            input = pool[rng.below(pool.len())].clone();
        }
        mutate(&mut rng, &mut input, &pool);
        run(&input);
        runs += 1;
    }
    println!(
        "fuzz {name}: {runs} inputs in {:?} (seed {seed})",
        seconds()
    );
}

#[test]
fn fuzz_h1_answer() {
    fuzz("h1_answer", proxy::fuzz::h1_answer);
}

#[test]
fn fuzz_soap_stamp() {
    fuzz("soap_stamp", proxy::fuzz::soap_stamp);
}

#[test]
fn fuzz_xml_guard() {
    fuzz("xml_guard", proxy::fuzz::xml_guard);
}

#[test]
fn fuzz_path() {
    fuzz("path", proxy::fuzz::path);
}

#[test]
fn fuzz_jwks() {
    fuzz("jwks", proxy::fuzz::jwks);
}

/// Bearer tokens against a verifier with a real key: header and claims handling.
#[test]
fn fuzz_jwt() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "x": b64(&raw[1..33]), "y": b64(&raw[33..])}]});
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    let cfg = proxy::config::OAuth {
        issuer: "https://idp.test/".into(),
        jwks: proxy::config::JwksSource::File(jwks_file),
        audience: "fsp".into(),
        algorithms: vec![
            jsonwebtoken::Algorithm::ES256,
            jsonwebtoken::Algorithm::RS256,
        ],
        client_id_claim: "client_id".into(),
        require_certificate_binding: false,
        leeway: Duration::from_secs(60),
        max_token_bytes: 8192,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let verifier = rt.block_on(async {
        let v = proxy::oauth::Verifier::new(&cfg).unwrap();
        v.refresh().await.unwrap();
        v
    });
    // A valid token joins the corpus, so mutations start from something that verifies.
    let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 600;
    let valid = jsonwebtoken::encode(
        &header,
        &serde_json::json!({"iss": "https://idp.test/", "aud": "fsp", "exp": exp, "client_id": "c1", "cnf": {"x5t#S256": "abc"}}),
        &key,
    )
    .unwrap();
    let verified = rt.block_on(verifier.verify(&valid, None));
    assert!(verified.is_err(), "a bound token needs a certificate");
    let check = |data: &[u8]| {
        let Ok(token) = std::str::from_utf8(data) else {
            return;
        };
        let sha = [7u8; 32];
        let _ = rt.block_on(verifier.verify(token, Some(&sha)));
        let _ = rt.block_on(verifier.verify(token, None));
    };
    check(valid.as_bytes());
    fuzz("jwt", check);
}

/// Configuration files as an operator might write them (or mistype them).
#[test]
fn fuzz_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fsp.toml");
    fuzz("config", |data| {
        std::fs::write(&file, data).unwrap();
        if let Err(e) = proxy::config::load(&file) {
            // Every problem names the file it is in.
            assert!(!e.0.is_empty());
            assert!(e.to_string().contains("fsp.toml") || e.to_string().contains(".toml"));
        }
    });
}
