"""libvirt's event loop for this process: libvirt's own, run in one thread.

libvirt delivers events, keepalive and close notifications only through an event loop
implementation registered once per process, before any connection opens. Two choices:

- ``libvirtaio`` (shipped with the binding) runs it on the asyncio loop. But libvirt calls
  that loop's add/update/remove functions from whichever thread makes a libvirt call: every
  call run in a worker thread (as they must be, since they block) would then touch asyncio's
  selector and timers from outside the loop's thread, which asyncio does not allow. Measured
  here: ``libvirt.open`` and ``memoryStats`` in a worker thread call libvirtaio's
  ``_add_handle``/``_update_handle``/``_add_timeout`` from that worker thread.
- libvirt's default implementation (``virEventRegisterDefaultImpl``), which is thread-safe,
  run by one daemon thread that calls ``virEventRunDefaultImpl`` forever. Callbacks then run
  on that thread and are handed to asyncio with ``loop.call_soon_threadsafe``.

reclaimd uses the second. The thread only dispatches: callbacks must not call libvirtd.
"""

from __future__ import annotations

import logging
import threading
import time

import libvirt

__all__ = ["ensure_event_loop"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _ignore_error(_ctx: object, _error: object) -> None:
    """libvirt's default error handler prints every error to stderr, including the ones this
    package turns into exceptions; the exceptions carry the same text."""


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and start the thread that runs it; idempotent.

    Call before opening a connection (``LibvirtSource`` does). Raises RuntimeError when libvirt
    refuses the registration.
    """
    global _thread
    with _lock:
        if _thread is not None:
            return
        libvirt.registerErrorHandler(_ignore_error, None)
        if libvirt.virEventRegisterDefaultImpl() < 0:
            raise RuntimeError("libvirt refused to register its default event loop")
        thread = threading.Thread(target=_run, name="libvirt-events", daemon=True)
        thread.start()
        _thread = thread


def _run() -> None:
    while True:
        try:
            if libvirt.virEventRunDefaultImpl() < 0:
                log.warning("libvirt's event loop iteration failed")
                time.sleep(0.1)
        except Exception:
            # A callback that raised must not end event delivery for every connection.
            log.exception("libvirt event callback failed")
