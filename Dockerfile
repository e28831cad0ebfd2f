# s3proxy: authenticating byte-range proxy from S3 to MistServer.
#   docker build -t s3proxy .
#   docker run -p 8080:8080 -p 9101:9101 -e S3PROXY_S3_BUCKET=my-bucket \
#     -e S3PROXY_JWT_SECRET=... -e S3PROXY_ADMIN_TOKEN=... -e AWS_REGION=... s3proxy
# The admin listener is on all interfaces (for Prometheus), so POST /warm needs
# `Authorization: Bearer $S3PROXY_ADMIN_TOKEN`; start-up refuses without that secret.
# Credentials: the standard AWS chain (task role, instance profile, web identity, env).
# With server.workers > 1 and no disk tier, the workers share blocks on /dev/shm: give
# the container room for cache.max_bytes there (--shm-size=600m for the default 512MiB).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    S3PROXY_CONFIG=/etc/s3proxy/s3proxy.yaml \
    S3PROXY_ADMIN_HOST=0.0.0.0 \
    S3PROXY_ADMIN_TOKEN_ENV=S3PROXY_ADMIN_TOKEN

WORKDIR /src
COPY pyproject.toml README.md ./
COPY s3proxy ./s3proxy
RUN pip install . && rm -rf /src \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin s3proxy
COPY config/s3proxy.yaml /etc/s3proxy/s3proxy.yaml

USER s3proxy
WORKDIR /
EXPOSE 8080 9101
HEALTHCHECK --interval=10s --timeout=3s \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9101/healthz', timeout=2)" || exit 1
# SIGTERM drains in-flight responses (server.shutdown_timeout_s), then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["s3proxy"]
CMD ["serve"]
