# The FSP gateway as a container image: one static binary (musl) and the CA certificates,
# nothing else. It runs as a non-root numeric user and with a read-only root file system;
# the audit trail (file backend) and the suspension state live on a mounted volume
# (`/var/lib/fsp` in the Helm chart, helm/fsp).
#
#   docker build -t fsp:0.1.0 .      or      .ci/image   (buildah, no daemon needed)
#
# RUST_IMAGE may name a mirror of the official Rust image (Debian based, with rustup).
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm

FROM ${RUST_IMAGE} AS build
# aws-lc-sys ships pregenerated bindings for x86_64-unknown-linux-musl and compiles its C
# with the `cc` crate, so a musl C compiler (musl-gcc) is all it needs: no cmake, clang, Go
# or perl. mimalloc (the gateway's allocator, which also spares it musl's slow malloc) is C
# built the same way.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
# The registry and target caches only speed up rebuilds; the binary is copied out of the
# cached target directory in the same step.
RUN --mount=type=cache,id=fsp-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=fsp-target-musl,target=/src/target \
    cargo build --release --locked -p proxy --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/fsp /fsp

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /fsp /fsp
USER 65532:65532
EXPOSE 8443 9443
ENTRYPOINT ["/fsp"]
CMD ["serve", "--config", "/etc/fsp/fsp.toml"]
