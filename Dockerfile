# syntax=docker/dockerfile:1
#
# Weir server image: `weir` on debian:bookworm-slim, running as uid 65532.
#
#   docker build -t weir:0.1.0 .
#   docker run --rm -p 50051:50051 weir:0.1.0                     # the public demo configuration
#   docker run --rm --read-only --tmpfs /tmp -p 50051:50051 -p 9090:9090 \
#     -v "$PWD/weir.toml:/etc/weir/weir.toml:ro" -e WEIR_CONFIG=/etc/weir/weir.toml \
#     -e ACME_PG_PASSWORD=... weir:0.1.0
#
# See docs/deployment.md. The build needs no protoc (the protos are compiled by
# the pure-Rust protox) and no network besides crates.io.

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS builder
# gcc and make build the bundled SQLite and librdkafka; librdkafka links
# OpenSSL (for Kafka TLS and SASL) and zlib.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc make pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and the build directory between
# builds (BuildKit); the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --profile production --locked -p weir-server --bin weir \
 && install -D -m 0755 target/production/weir /out/weir

FROM debian:bookworm-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="weir" \
      org.opencontainers.image.description="Weir: a multi-tenant gRPC gateway to databases and Kafka" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 weir \
 && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin weir
COPY --from=builder /out/weir /usr/local/bin/weir
# In a container both ports must listen on every interface. These are WEIR__
# overrides, so they win over `[server] listen` and `[metrics] listen` in a
# config file: change a port by setting its variable, not the file.
ENV WEIR__SERVER__LISTEN=0.0.0.0:50051 \
    WEIR__METRICS__LISTEN=0.0.0.0:9090
USER 65532:65532
# 50051: gRPC (health and reflection included); 9090: Prometheus metrics (/metrics, /healthz, /readyz).
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/weir"]
