# brain-ops container image (docs/DEPLOY.md):
#
#   docker build -t brain-ops:dev .
#
# Needs BuildKit (the default builder of Docker 23 and later) for the cache mounts.

# Builder: the official Rust image at the crate's rust-version (Cargo.toml), on Debian 12, the
# same glibc (2.36) as the runtime image. No system protoc: build.rs compiles proto/ with protox,
# in Rust. The image's gcc builds the C parts (mimalloc, ring).
ARG RUST_VERSION=1.88
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /build
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
# Cargo.toml declares the `micro` bench, so cargo refuses the manifest without its source.
COPY benches benches
COPY src src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin brain-ops \
    && install -D -m 0755 target/release/brain-ops /out/brain-ops \
    && install -d -m 0700 /out/data

# Runtime: distroless "cc" has what the binary links (glibc, libgcc_s) and nothing else: no
# shell, no package manager. Its `nonroot` user is 65532:65532.
FROM gcr.io/distroless/cc-debian12:nonroot
# checkov:skip=CKV_DOCKER_2: the image has no shell or HTTP client and the CLI has no probe command; Kubernetes ignores HEALTHCHECK and probes /livez and /readyz on port 9464 (deploy/kubernetes)
COPY --from=builder /out/brain-ops /usr/local/bin/brain-ops
# The ledger directory, owned by the runtime user so that a fresh volume mounted here is
# writable (Kubernetes sets the owner group of its volume with fsGroup instead).
COPY --from=builder --chown=65532:65532 /out/data /var/lib/brain-ops
# Listen on every interface inside the container. Without a principals file (BRAIN_AUTH_FILE)
# the service refuses non-loopback addresses and exits 64 naming the setting: configure auth,
# or pass --insecure-allow-unauthenticated for a throwaway test.
ENV BRAIN_GRPC_ADDR=0.0.0.0:50051 \
    BRAIN_METRICS_ADDR=0.0.0.0:9464 \
    BRAIN_DATA_DIR=/var/lib/brain-ops
USER 65532:65532
VOLUME ["/var/lib/brain-ops"]
# gRPC, and HTTP for /metrics, /livez and /readyz.
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/brain-ops", "serve"]
