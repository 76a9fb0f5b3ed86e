"""File descriptors: raise the soft limit at start, and the share HTTP connections may use.

Most systems start services with a soft RLIMIT_NOFILE of 1024 and a far higher hard limit; the
hard limit is the administrator's, the soft one only a default, so reclaimd raises the soft
limit to the hard one (as Go programs do at start). Whatever the limit, HTTP connections get at
most a quarter of it: the rest is kept for what the fleet view needs, per VM a QMP socket and
the host view's /proc/PID/pagemap and guest-RAM backing files (about 4 with a memfd or file
backend), and the journal (database, WAL, shared memory), the listen sockets and Python itself.
At the common 1024 that is 256 connections and room for some 190 VMs.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

HTTP_SHARE = 4  # HTTP connections use at most 1/HTTP_SHARE of the descriptors


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            # A sandbox may forbid it; the unit's LimitNOFILE= sets both limits anyway.
            log.info("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
        else:
            soft = hard
    return soft


def http_connection_limit(configured: int, soft_limit: int | None = None) -> int:
    """The HTTP connection cap: ``configured``, within the HTTP share of the descriptors."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft_limit // HTTP_SHARE))
