# syntax=docker/dockerfile:1
# One image, every entry point: telehealth-core, telehealth-edge, telehealth-ctl,
# telehealth-device. The chart picks the program with `command:`.
#
#   docker build -t telehealth-mesh:dev .
#   docker run --rm --read-only -v th-data:/var/lib/telehealth telehealth-mesh:dev telehealth-core --help

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: wheels for the project and every dependency, then a venv from them ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# Dependencies first, so editing the sources does not rebuild every wheel.
COPY pyproject.toml README.md* ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip wheel --wheel-dir /wheels -r /tmp/requirements.txt

COPY telehealth ./telehealth
COPY core_services ./core_services
COPY edge_nodes ./edge_nodes
COPY clients ./clients
COPY loadtest ./loadtest
# Bytecode is compiled here because the runtime root filesystem is read-only; pip
# itself is not needed at runtime.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/telehealth \
 && /opt/telehealth/bin/pip install --no-index --find-links /wheels \
        -r /tmp/requirements.txt telehealth-mesh \
 && /opt/telehealth/bin/python -m compileall -q /opt/telehealth/lib \
 && /opt/telehealth/bin/python -m pip uninstall --yes pip

# ---- runtime: the venv, a non-root user and a data volume; nothing else ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="telehealth-mesh" \
      org.opencontainers.image.description="5G edge service mesh for remote healthcare: core, edge, ctl and device agent" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 telehealth \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/telehealth \
        --no-create-home --shell /usr/sbin/nologin telehealth \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/telehealth \
 && install -d -m 0755 /etc/telehealth/tls

COPY --from=builder /opt/telehealth /opt/telehealth

ENV PATH=/opt/telehealth/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /var/lib/telehealth
VOLUME ["/var/lib/telehealth"]
# Core gRPC, core HTTP (/metrics, console), edge gRPC, edge /metrics.
EXPOSE 50051 8080 50061 9102

# Settings come from TELEHEALTH_CONFIG / --config (the chart sets data_dir to the volume;
# no TELEHEALTH_* variable is baked in, as each program rejects keys it does not know).
# Exec form throughout: no shell is involved in starting or stopping a service, and
# SIGTERM reaches Python directly (graceful gRPC shutdown).
ENTRYPOINT []
CMD ["telehealth-core"]
