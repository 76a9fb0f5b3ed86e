# syntax=docker/dockerfile:1
# reclaimd. Build from the repository root:
#   docker build -f deploy/docker/reclaimd.Dockerfile -t reclaimd .
#
# Runs as the unprivileged user reclaimd (uid/gid 10001) and needs no capability to observe QEMU
# processes of that same uid and gid (as the compose demo guest is). To observe QEMUs of other
# users, reclaimd needs CAP_SYS_PTRACE, for /proc/PID/maps, /proc/PID/pagemap and /proc/PID/fd
# (ptrace "read" access; nothing is ever traced). Docker and Kubernetes grant an added capability
# to uid 0 only, so such a container runs as user 0 with every other capability dropped; see
# docs/operations.md and deploy/kubernetes/daemonset.yaml.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --build-arg EXTRAS=libvirt adds the libvirt source (libvirt-python builds against libvirt-dev).
ARG EXTRAS=

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS
WORKDIR /src
RUN if [ -n "$EXTRAS" ]; then apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc \
 && rm -rf /var/lib/apt/lists/*; fi
COPY pyproject.toml README.md deploy/docker/constraints.txt ./
COPY daemon ./daemon
COPY api ./api
# The dependencies at the exact versions of constraints.txt: the same image from the same tree.
RUN python -m venv /opt/reclaimd \
 && /opt/reclaimd/bin/pip install --no-cache-dir --disable-pip-version-check \
      -c constraints.txt ".${EXTRAS:+[$EXTRAS]}"

FROM ${PYTHON_IMAGE}
ARG EXTRAS
RUN if [ -n "$EXTRAS" ]; then apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 \
 && rm -rf /var/lib/apt/lists/*; fi
RUN groupadd --system --gid 10001 reclaimd \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/reclaimd \
      --shell /usr/sbin/nologin reclaimd \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/reclaimd \
 && install -d -o 10001 -g 10001 -m 0755 /run/qmp
COPY --from=build /opt/reclaimd /opt/reclaimd
ENV PATH=/opt/reclaimd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RECLAIMD_LISTEN=0.0.0.0:9947 \
    RECLAIMD_JOURNAL=/var/lib/reclaimd/journal.sqlite3
USER 10001:10001
EXPOSE 9947
VOLUME ["/var/lib/reclaimd"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9947/readyz', timeout=4)"]
ENTRYPOINT ["reclaimd"]
CMD ["serve"]
