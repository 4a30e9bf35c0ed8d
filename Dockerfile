# OpenRouter Gateway: a two-stage build on the slim Python image, installing exactly uv.lock.
#   docker build -t openrouter-gateway .
#   docker run -p 8080:8080 -v gateway-data:/var/lib/gateway \
#     -e OPENROUTER_API_KEY=... -e GATEWAY_ADMIN_KEY=... openrouter-gateway
# Configuration comes only from the environment and a mounted config file
# (GATEWAY_CONFIG, default /etc/gateway/gateway.yaml); the embedded store keeps its data in
# /var/lib/gateway (mount a volume there), or set GATEWAY_STORE to a Redis URL.

FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir uv==0.13.10
ENV UV_PROJECT_ENVIRONMENT=/opt/gateway \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
COPY pyproject.toml uv.lock README.md .python-version ./
# The locked dependencies first (a layer kept while only the code changes), then the gateway.
RUN uv sync --locked --no-dev --no-install-project
COPY app ./app
RUN uv sync --locked --no-dev --no-editable

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/gateway \
    && chown gateway /var/lib/gateway
COPY --from=build /opt/gateway /opt/gateway
COPY config/gateway.yaml /etc/gateway/gateway.yaml
ENV PATH=/opt/gateway/bin:$PATH \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    GATEWAY_DATA_DIR=/var/lib/gateway \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /var/lib/gateway
VOLUME /var/lib/gateway
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
# Exec form: the gateway is PID 1 and receives SIGTERM itself (graceful drain, exit 0).
ENTRYPOINT ["gateway"]
CMD ["serve"]
