# seedcache in a container: `docker compose up` runs it next to Redis (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs: the tests, examples and benchmarks stay out (.dockerignore).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY cli ./cli
RUN pip install . && rm -rf /src

# A non-root user; /data is its working directory, so the default disk store (.seedcache)
# is writable when no Redis is configured. Mount a volume there to keep it.
RUN useradd --create-home --uid 10001 seedcache \
    && mkdir /data \
    && chown seedcache:seedcache /data
USER seedcache
WORKDIR /data

# seedcache binds 127.0.0.1 by default (DESIGN §10); in a container only binding every interface
# makes the published port reachable, so that is chosen here, explicitly.
ENV SEEDCACHE_HOST=0.0.0.0 \
    SEEDCACHE_PORT=8080
EXPOSE 8080

# The health endpoint needs no access token, even with --access-token.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SEEDCACHE_PORT', '8080') + '/_seedcache/health', timeout=2)"]

ENTRYPOINT ["seedcache"]
CMD ["serve"]
