# syntax=docker/dockerfile:1
# reclaimd's demo guest: QEMU plus the test guest (a Debian kernel and a busybox initramfs with
# qemu-ga, built by `python -m daemon.testguest build`). Build from the repository root:
#   docker build -f deploy/docker/demo-vm.Dockerfile -t reclaimd-demo-vm .
#
# QEMU runs as uid/gid 10001, the same ids as reclaimd's image, so reclaimd may read this
# QEMU's /proc files without any capability. No /dev/kvm is needed (TCG).

ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS guest
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 busybox-static qemu-guest-agent ca-certificates
WORKDIR /src
COPY daemon ./daemon
RUN dir="$(python3 -m daemon.testguest build --cache /tmp/guest-cache)" \
 && install -d /opt/reclaimd-guest \
 && cp "$dir/vmlinuz" "$dir/initrd.gz" "$dir/image.json" /opt/reclaimd-guest/

FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 demo \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin demo \
 && install -d -o 10001 -g 10001 -m 0755 /run/qmp
COPY --from=guest /opt/reclaimd-guest /opt/reclaimd-guest
COPY deploy/docker/demo-vm.sh /usr/local/bin/demo-vm
USER 10001:10001
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["sh", "-c", "test -S \"${QMP_SOCKET:-/run/qmp/demo.qmp}\""]
ENTRYPOINT ["/usr/local/bin/demo-vm"]
