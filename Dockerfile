# syntax=docker/dockerfile:1
# One image with every fleet binary: fleet (all-in-one), fleet-broker, fleet-gateway,
# robot-node. Built for linux/amd64 and linux/arm64 (the robots are Raspberry Pis) by
# .github/workflows/images.yml with buildx.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source changes reuse the cached dependency layer.
COPY Cargo.toml Cargo.lock ./
COPY protocol/Cargo.toml protocol/
COPY broker/Cargo.toml broker/
COPY robot-node/Cargo.toml robot-node/
COPY gateway/Cargo.toml gateway/
COPY runtime/Cargo.toml runtime/
COPY testkit/Cargo.toml testkit/
RUN cargo fetch --locked
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && cp target/release/fleet target/release/fleet-broker target/release/fleet-gateway \
       target/release/robot-node target/release/fleet-healthcheck /out/

# glibc and libgcc only; no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fleet" \
      org.opencontainers.image.description="Run a fleet of Raspberry Pi robots over MQTT: broker, gateway and robot node" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
# MQTT, websockets, HTTP (gateway), broker metrics, node metrics.
EXPOSE 1883 8083 8080 9101 9102
# For the default command (the all-in-one fleet); compose and Helm check each part on its
# own port.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
  CMD ["fleet-healthcheck", "127.0.0.1:8080/health"]
CMD ["fleet", "--mqtt-addr", "0.0.0.0:1883", "--ws-addr", "0.0.0.0:8083", "--http-addr", "0.0.0.0:8080", "--allow-remote-anonymous"]
