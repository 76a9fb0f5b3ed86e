"""Simulated guests: processes that speak QMP as QEMU 7.2 does and run the allocator model.

A simulated guest looks to reclaimd like ``qemu-system-x86_64 -M pc,memory-backend=ram0
-object memory-backend-memfd,id=ram0,size=R -device virtio-balloon-pci,id=balloon0,
free-page-reporting=on -qmp unix:PATH,server=on,wait=off``: the same greeting, negotiation,
commands, replies, error classes and events, and guest RAM in a memfd mapping that the host view
reads through ``/proc`` unchanged. Inside runs ``daemon.model``: a buddy allocator with a
workload, free page reporting and a balloon driver, whose writes and discards reach the memfd
the way QEMU's do. The guest also knows the truth (free, used, reported per block), served on
the out-of-band socket ``PATH.truth`` (see ``truth``).

Run one: ``python -m daemon.simguest run --name vm1 --ram 512M --socket /tmp/vm1.qmp
--workload memhog``; many: ``python -m daemon.simguest fleet --count 500 --dir /tmp/fleet``
(one forked process per guest); from Python: ``launcher.GuestProcess`` / ``FleetProcess``.

Modules, from the wire up:

- ``wire``: JSON stream framing, QMP message shapes, ``QMPError``.
- ``schema``: argument checks with QEMU's QAPI messages.
- ``monitor``: a QMP monitor (negotiation, dispatch, events to the client).
- ``transport``: the socket chardev modes (server socket; connect out with ``reconnect=N``).
- ``events``: event delivery with QEMU's rate limits.
- ``qom``, ``balloon``, ``machine``, ``commands``: what QMP sees of the VM.
- ``ram``: guest RAM as a memfd (writes, discards).
- ``guestos``: the guest kernel backed by the allocator model.
- ``guest``: one guest at run time (``SimGuestSpec``, ``SimGuest``).
- ``truth``, ``accuracy``: ground truth and how far an estimate is from it.
- ``process``, ``launcher``, ``cli``: processes, and starting them from elsewhere.

Known differences from QEMU: only the QOM objects reclaimd walks exist (``qom-list /machine``
shows a subset; memory-region children cannot be listed); commands reclaimd does not use are
``CommandNotFound``; the version is 7.2.0 with an empty package string.
"""

from daemon.simguest.guest import SimGuest, SimGuestSpec
from daemon.simguest.launcher import FleetProcess, GuestProcess, LaunchError
from daemon.simguest.truth import read_truth, truth_path

__all__ = [
    "FleetProcess",
    "GuestProcess",
    "LaunchError",
    "SimGuest",
    "SimGuestSpec",
    "read_truth",
    "truth_path",
]
