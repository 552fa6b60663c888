# Multi-stage build: compile the three binaries, ship them on a slim Debian base.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY vendor ./vendor
COPY src ./src
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --shell /usr/sbin/nologin kingdom-edge
COPY --from=build /src/target/release/kingdom-edge /src/target/release/kingdom-content \
    /src/target/release/kingdom-api /usr/local/bin/
COPY conf/ /etc/kingdom-edge/
COPY conf/container.yaml /etc/kingdom-edge/edge.yaml
WORKDIR /etc/kingdom-edge
USER kingdom-edge
EXPOSE 8080 9090
# conf/container.yaml listens on 0.0.0.0:8080 (proxy) and 0.0.0.0:9090 (admin, for probes only).
# It needs KINGDOM_API_SECRET, KINGDOM_STICKY_SECRET and KINGDOM_ADMIN_TOKEN (each at least
# 16 bytes) in the container's environment; `kingdom-edge check` names whichever is missing.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/kingdom-edge"]
CMD ["run", "-c", "/etc/kingdom-edge/edge.yaml"]
