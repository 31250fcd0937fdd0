# syntax=docker/dockerfile:1
# The gateway sidecar image. Build: docker build -t gateway .
# Ports: 8080 (clients), 9901 (admin: /healthz /readyz /metrics), 50051 (gRPC, when configured).

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m venv /opt/gateway \
 && /opt/gateway/bin/pip install --no-compile . \
 && /opt/gateway/bin/python -m compileall -q /opt/gateway

FROM python:3.11-slim-bookworm
COPY --from=build /opt/gateway /opt/gateway
COPY policies /etc/gateway/policies
# A fixed uid/gid (10001, as the Kubernetes manifests' runAsUser) with a matching group;
# --no-log-init keeps lastlog/faillog from growing with the uid.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-log-init --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin gateway
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080 9901 50051
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["gateway"]
CMD ["run", "-c", "/etc/gateway/policy.yaml", "--admin-listen", "0.0.0.0:9901"]
