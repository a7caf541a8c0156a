# VX11 Gateway image: the gateway (uvicorn, several workers), the health-check worker and
# one-off management commands all run from this one image (see docker-compose.yml and
# docs/DEPLOYMENT.md). tests/test_deployment.py keeps it in step with the README.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first (pinned), so code changes do not reinstall them. Every package ships
# wheels for CPython 3.12 on linux (psycopg[binary], uvloop, httptools, orjson, aiohttp),
# so no compiler is needed in the slim image.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY . .

# A non-root user owns only what the gateway writes: var/ (SQLite file when no DATABASE_URL,
# the generated secret key when no DJANGO_SECRET_KEY) and the Prometheus multiprocess folder.
RUN groupadd --system --gid 10001 vx11 \
    && useradd --system --uid 10001 --gid vx11 --home-dir /app --no-create-home vx11 \
    && mkdir -p /app/var /tmp/vx11-prometheus \
    && chown -R vx11:vx11 /app/var /tmp/vx11-prometheus \
    && chmod 0755 /app/docker/entrypoint.sh

# VX11_VAR_DIR: writable state. PROMETHEUS_MULTIPROC_DIR: the uvicorn workers write their
# metrics there and /metrics serves the sum over all of them; the entrypoint empties it
# before the processes start. VX11_WORKERS tells the system checks how many workers share
# this configuration (keep it equal to --workers below).
ENV VX11_VAR_DIR=/app/var \
    PROMETHEUS_MULTIPROC_DIR=/tmp/vx11-prometheus \
    VX11_WORKERS=4

# Numeric, so orchestrators can verify runAsNonRoot.
USER 10001:10001

EXPOSE 8000

# No curl in the slim image: the probe is a few lines of Python (docker/healthcheck.py).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]

# "migrate" runs `manage.py migrate --noinput`, "manage ARGS" any management command,
# anything else is executed as given (the default is the gateway itself).
ENTRYPOINT ["/app/docker/entrypoint.sh"]

# The README's production command. --no-proxy-headers is mandatory: the gateway applies its
# own X-Forwarded-For rules (VX11_TRUSTED_PROXIES). The --http protocol is uvicorn's httptools one
# with limits on request heads, slow and idle connections and their number (gateway/edge/server.py).
CMD ["uvicorn", "vx11site.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--workers", "4", "--loop", "uvloop", "--http", "gateway.edge.server:GatewayHttpProtocol", "--no-proxy-headers", "--no-access-log"]
