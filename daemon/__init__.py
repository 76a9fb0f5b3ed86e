"""reclaimd: host-side memory reclaim accounting for QEMU/KVM guests."""
