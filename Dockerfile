# syntax=docker/dockerfile:1
#
# The switchyard host in a small runtime image.
#
#   docker build -t switchyard:latest .                       # the host, with an empty /plugins
#   docker build --target examples -t switchyard:examples .   # the host and the example plugins
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

# ---------------------------------------------------------------------------------------------
# build: compiles the host and the example plugins. The host's build script compiles the
# example plugins for wasm32-wasip2 as well (`switchyard demo` embeds them), so the toolchain
# needs that target even for the host alone.
FROM rust:1.95-bookworm AS build
WORKDIR /src

# rust-toolchain.toml names channel 1.95.0, the toolchain this image ships; the target is
# added to it in a layer of its own, so that it survives changes to the sources.
COPY rust-toolchain.toml ./
RUN rustup target add wasm32-wasip2 && rustc --version

COPY . .

# The registry and the target folder are cache mounts, so a rebuild recompiles only what
# changed; because the target folder is not part of the image, the results are copied to /out
# in the same step. The plugins are built into target/plugins, the folder the host's build
# script already compiled them into, so this second cargo run finds them up to date.
# Cargo names a cdylib after its library (chat_moderator.wasm); the host names a plugin after
# its file, so each is copied as NAME.wasm, next to its manifest NAME.toml.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    set -eux; \
    cargo build --release --locked -p switchyard; \
    cargo build --release --locked --target wasm32-wasip2 --target-dir target/plugins \
        -p forward -p notify-router -p chat-moderator -p cache-invalidator -p metrics-rollup; \
    mkdir -p /out/bin /out/plugins; \
    cp target/release/switchyard /out/bin/switchyard; \
    for name in forward notify-router chat-moderator cache-invalidator metrics-rollup; do \
        cp "target/plugins/wasm32-wasip2/release/$(echo "$name" | tr - _).wasm" "/out/plugins/$name.wasm"; \
        cp "plugins/$name/$name.toml" "/out/plugins/$name.toml"; \
    done; \
    /out/bin/switchyard --version

# ---------------------------------------------------------------------------------------------
# base: the runtime shared by the two images below. The binary links only glibc and libgcc;
# TLS for webhooks uses rustls with its own bundled roots, and ca-certificates is there for
# anything in the image that reads the system's. The host runs as an unprivileged user (uid 10001) and writes nothing to disk
# in `switchyard run`, so a read-only root filesystem works.
FROM debian:bookworm-slim AS base
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --gid 10001 switchyard; \
    useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin switchyard; \
    mkdir /plugins; \
    chown 10001:10001 /plugins
COPY --from=build /out/bin/switchyard /usr/local/bin/switchyard

LABEL org.opencontainers.image.title="switchyard" \
      org.opencontainers.image.description="Routes Redis pub/sub messages to hot-reloaded WebAssembly component plugins." \
      org.opencontainers.image.licenses="Apache-2.0"

# The admin endpoint listens on loopback by default; in a container it must listen on every
# interface, or the kubelet's probes and Prometheus cannot reach it.
ENV SWITCHYARD_ADMIN_LISTEN=0.0.0.0:9090 \
    SWITCHYARD_PLUGINS_DIR=/plugins
EXPOSE 9090
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# SIGTERM drains the plugin queues (up to plugins.drain_ms, 10 s by default) and exits 0.
ENTRYPOINT ["switchyard"]
CMD ["run"]

# ---------------------------------------------------------------------------------------------
# examples: the runtime with the five example plugins and their manifests in /plugins.
# Also usable as the image of an init container that copies them into a shared volume.
FROM base AS examples
COPY --from=build /out/plugins/ /plugins/

# ---------------------------------------------------------------------------------------------
# runtime (the default target): the host alone; plugins come from a volume mounted at /plugins.
FROM base AS runtime
