# The llmgate gateway as a container image (compose.yaml runs it with Redis and LiteLLM).
#
#   docker build -t llmgate .
#   docker run -p 4000:4000 -v "$PWD/llmgate.yaml:/etc/llmgate/llmgate.yaml:ro" \
#     -e LLMGATE_CONFIG=/etc/llmgate/llmgate.yaml llmgate
#
# Built like the README's run command (`cargo run --release`: the default features, the hyper
# engine, no cmake). The config and the secrets file are mounted at run time, never copied in.

ARG RUST_VERSION=1.95
ARG DEBIAN=trixie

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin llmgate \
    && cp target/release/llmgate /usr/local/bin/llmgate

FROM debian:${DEBIAN}-slim
# curl for the health check; the upstreams' TLS roots are compiled into the binary.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin llmgate
COPY --from=build /usr/local/bin/llmgate /usr/local/bin/llmgate
USER llmgate
# Inside a container the gateway listens on every interface (its default is 127.0.0.1).
ENV HOST=0.0.0.0 PORT=4000
EXPOSE 4000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT}/health" >/dev/null || exit 1
ENTRYPOINT ["llmgate"]
CMD ["serve"]
