# OpenRouter Gateway: a two-stage build on the slim Python image.
#   docker build -t openrouter-gateway .
#   docker run -p 8080:8080 -e OPENROUTER_API_KEY=... -e GATEWAY_ADMIN_KEY=... openrouter-gateway
# Configuration comes only from the environment and a mounted config file
# (GATEWAY_CONFIG, default /etc/gateway/gateway.yaml).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
# Wheels for the gateway and everything it needs; the runtime stage installs only these.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels openrouter-gateway && rm -rf /wheels
COPY config/gateway.yaml /etc/gateway/gateway.yaml
ENV GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    PYTHONUNBUFFERED=1
USER gateway
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
# Exec form: the gateway is PID 1 and receives SIGTERM itself (graceful drain, exit 0).
ENTRYPOINT ["gateway"]
CMD ["serve"]
