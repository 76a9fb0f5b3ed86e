#!/bin/sh
# Boots reclaimd's demo guest: the test guest kernel and initramfs under QEMU, with
# virtio-balloon free page reporting on, guest RAM in a memfd, and a QMP socket that reclaimd
# attaches to in connect mode. The guest runs a workload that allocates and frees memory in a
# loop, so reported ranges, refaults and the estimate move.
#
# The demo-vm container's entrypoint; on a bare host run it the same way with the image built by
# `python -m daemon.testguest build` (it prints the directory holding vmlinuz and initrd.gz):
#   DEMO_VM_IMAGE=DIR QMP_SOCKET=/tmp/qmp/demo.qmp deploy/docker/demo-vm.sh
set -eu

: "${DEMO_VM_NAME:=demo}"
: "${DEMO_VM_MEMORY_MIB:=512}"
: "${DEMO_VM_ACCEL:=tcg}" # tcg works everywhere; kvm needs /dev/kvm passed in
: "${DEMO_VM_WORKLOAD:=alloc:192,hold:60,free,sleep:60,repeat}"
: "${DEMO_VM_IMAGE:=/opt/reclaimd-guest}"
: "${QMP_SOCKET:=/run/qmp/${DEMO_VM_NAME}.qmp}"

for file in "$DEMO_VM_IMAGE/vmlinuz" "$DEMO_VM_IMAGE/initrd.gz"; do
	if [ ! -r "$file" ]; then
		echo "demo-vm: cannot read $file (set DEMO_VM_IMAGE)" >&2
		exit 1
	fi
done
case "$DEMO_VM_ACCEL" in
tcg) cpu=max ;;
kvm) cpu=host ;;
*)
	echo "demo-vm: DEMO_VM_ACCEL=$DEMO_VM_ACCEL: expected tcg or kvm" >&2
	exit 1
	;;
esac

mkdir -p "$(dirname "$QMP_SOCKET")"
rm -f "$QMP_SOCKET"
echo "demo-vm: booting $DEMO_VM_NAME (${DEMO_VM_MEMORY_MIB} MiB, $DEMO_VM_ACCEL), QMP at $QMP_SOCKET"
# exec: QEMU receives the container's SIGTERM and exits cleanly.
exec qemu-system-x86_64 \
	-name "$DEMO_VM_NAME" \
	-machine q35,memory-backend=ram0 \
	-accel "$DEMO_VM_ACCEL" -cpu "$cpu" -smp 1 \
	-m "${DEMO_VM_MEMORY_MIB}M" \
	-object "memory-backend-memfd,id=ram0,size=${DEMO_VM_MEMORY_MIB}M" \
	-nodefaults -no-user-config -display none \
	-serial stdio \
	-kernel "$DEMO_VM_IMAGE/vmlinuz" \
	-initrd "$DEMO_VM_IMAGE/initrd.gz" \
	-append "console=ttyS0 panic=-1 reclaimd.workload=$DEMO_VM_WORKLOAD" \
	-device virtio-balloon-pci,id=balloon0,free-page-reporting=on \
	-qmp "unix:$QMP_SOCKET,server=on,wait=off" \
	-no-reboot
