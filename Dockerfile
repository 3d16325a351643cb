# One image for the session server and the tool workers:
#   docker run IMAGE server --listen 0.0.0.0:50051 --worker-token ... (the default command)
#   docker run IMAGE worker --connect SERVER:50051 --token ... --root /srv/repos
# docs/deploy.md explains the ports, the volumes and the sizing.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clients/python/codelane ./clients/python/codelane
COPY session_server ./session_server
COPY tool_worker ./tool_worker
RUN python -m venv /opt/codelane \
    && /opt/codelane/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
# A fixed uid: Kubernetes' runAsUser and the data volume's fsGroup name it.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/codelane --create-home codelane
COPY --from=build /opt/codelane /opt/codelane
ENV PATH=/opt/codelane/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /var/lib/codelane
# gRPC (clients and workers), gRPC health in plaintext (probes), Prometheus metrics.
EXPOSE 50051 50052 9464
ENTRYPOINT ["codelane"]
CMD ["server", "--listen", "0.0.0.0:50051", "--data-dir", "/var/lib/codelane/data", "--local-workers", "0", \
     "--health-listen", "0.0.0.0:50052", "--metrics-listen", "0.0.0.0:9464", "--log-format", "json"]
