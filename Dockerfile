# s3proxy: authenticating byte-range proxy from S3 to MistServer.
#   docker build -t s3proxy .
#   docker run -p 8080:8080 -p 9101:9101 -e S3PROXY_S3_BUCKET=my-bucket \
#     -e S3PROXY_JWT_SECRET=... -e S3PROXY_ADMIN_TOKEN=... -e AWS_REGION=... s3proxy
# The admin listener is on all interfaces (for Prometheus), so POST /warm needs
# `Authorization: Bearer $S3PROXY_ADMIN_TOKEN`; start-up refuses without that secret.
# Credentials: the standard AWS chain (task role, instance profile, web identity, env).
# With server.workers > 1 and no disk tier, the workers share blocks on /dev/shm: give
# the container room for cache.max_bytes there (--shm-size=600m for the default 512MiB).
#
# The ingest service (s3proxy ingest: ffmpeg added, admin on 9102, jobs in /work):
#   docker build --target ingest -t s3proxy-ingest .
#   docker run -p 9102:9102 -v /big/disk:/work -e S3PROXY_S3_BUCKET=my-bucket \
#     -e S3PROXY_INGEST_SOURCE=s3://my-uploads/raw/ -e S3PROXY_INGEST_QUEUE_URL=https://sqs... \
#     -e S3PROXY_INGEST_NOTIFY_URL=https://... -e S3PROXY_WEBHOOK_SECRET=... s3proxy-ingest
FROM python:3.11-slim-bookworm AS base

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
WORKDIR /
ENTRYPOINT ["s3proxy"]

FROM base AS ingest
RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /work && chown s3proxy /work
ENV S3PROXY_INGEST_ADMIN_HOST=0.0.0.0 S3PROXY_INGEST_WORK_DIR=/work
USER s3proxy
VOLUME /work
EXPOSE 9102
HEALTHCHECK --interval=10s --timeout=3s \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9102/healthz', timeout=2)" || exit 1
# SIGTERM lets running jobs finish (ingest.shutdown_timeout_s, 30 s), then gives the rest
# back: docker stop -t 45
STOPSIGNAL SIGTERM
CMD ["ingest"]

# the default target (last): the proxy
FROM base AS serve
USER s3proxy
EXPOSE 8080 9101
HEALTHCHECK --interval=10s --timeout=3s \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9101/healthz', timeout=2)" || exit 1
# SIGTERM drains in-flight responses (server.shutdown_timeout_s), then exits 0.
STOPSIGNAL SIGTERM
CMD ["serve"]
