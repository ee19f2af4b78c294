# syntax=docker/dockerfile:1
#
# The operator image: `docker build -t audience-token-operator .`
# Build stage: Rust on Debian 12 (bookworm), whose gcc and make build aws-lc-rs (cc crate,
# no cmake) and jemalloc, the allocator. The runtime is distroless Debian 12 with glibc and
# libgcc (the binary links glibc dynamically), CA certificates (system roots for token
# endpoints) and no shell.

FROM rust:1.95-bookworm AS builder
WORKDIR /build
# The whole workspace (Cargo.toml, Cargo.lock, src/, crates/oauth and whatever else the
# manifests name); .dockerignore keeps target/, node_modules and .git out.
COPY . .
# Cache mounts keep the registry and the build between builds (BuildKit); the binary is
# copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin audience-token-operator \
 && install -D -m 0755 target/release/audience-token-operator /out/audience-token-operator

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="audience-token-operator" \
      org.opencontainers.image.description="Kubernetes operator that issues single-audience OAuth 2.0 access tokens (RFC 8707) into Secrets and renews them" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /out/audience-token-operator /audience-token-operator
USER 65532:65532
# Metrics (/metrics) and probes (/healthz, /readyz), as the Helm chart runs it.
EXPOSE 8080 8081
ENTRYPOINT ["/audience-token-operator"]
CMD ["run"]
