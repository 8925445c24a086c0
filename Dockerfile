# The agent's image for Raspberry Pi devices, linux/arm64 and linux/arm/v7:
#
#   docker buildx build --platform linux/arm64,linux/arm/v7 \
#     --tag REGISTRY/eventpi/autoupdate:VERSION --push .
#
# This build needs the base images rust:1-bookworm and debian:trixie-slim from
# a registry. The development machines of this project cannot pull any image,
# so their tests use an image built FROM scratch from a static build instead.
#
# Compose v2, git and the ssh client (for git over ssh only) sit in a layer
# below the agent, so a self-update downloads only the agent's own layer as
# long as that layer stays the same. Build with a cache, or pin
# debian:trixie-slim by digest, because a rebuild of the tools stage on a new
# base image changes it. .dockerignore keeps target/ out of the context.
#
# scripts/build-arm64-image.sh builds the linux/arm64 image without base
# images, from the cross-compiled agent and Debian's arm64 packages.

FROM --platform=$BUILDPLATFORM rust:1-bookworm AS build
ARG TARGETARCH
ARG TARGETVARIANT
RUN case "$TARGETARCH/$TARGETVARIANT" in \
      arm64/*) echo aarch64-unknown-linux-gnu >/target; packages=gcc-aarch64-linux-gnu ;; \
      arm/v7)  echo armv7-unknown-linux-gnueabihf >/target; packages=gcc-arm-linux-gnueabihf ;; \
      amd64/*) echo x86_64-unknown-linux-gnu >/target; packages= ;; \
      *) echo "unsupported platform $TARGETARCH/$TARGETVARIANT" >&2; exit 1 ;; \
    esac \
 && apt-get update \
 && apt-get install -y --no-install-recommends $packages \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(cat /target)"
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features gpio --target "$(cat /target)" \
 && cp "target/$(cat /target)/release/autoupdate" /autoupdate

# Debian trixie's docker-compose package is Compose v2 and installs the
# standalone /usr/bin/docker-compose, so no docker CLI is needed.
FROM debian:trixie-slim AS tools
RUN apt-get update \
 && apt-get install -y --no-install-recommends docker-compose git openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM tools
LABEL org.opencontainers.image.title="eventpi-autoupdate" \
      org.opencontainers.image.description="Keeps a headless Raspberry Pi up to date"
COPY --from=build /autoupdate /usr/local/bin/autoupdate
ENTRYPOINT ["/usr/local/bin/autoupdate"]
CMD ["run", "--config", "/etc/eventpi/autoupdate.toml"]
