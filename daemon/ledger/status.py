"""What the API and metrics read of one VM's host view: a frozen record, replaced per poll.

The poll cycle publishes a ``HostStatus`` and the ``Estimate`` as plain objects on ``VMState``;
they become dicts only when a REST request asks for them, so a poll of 500 VMs pays nothing
for readers that may never come.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from daemon.ledger.ranges import LedgerSummary


@dataclass(frozen=True)
class HostStatus:
    available: bool  # a scan succeeded and no problem since
    problem: str | None  # an ``Unavailable`` reason, or "internal_error"
    problem_detail: str | None
    reporting_effective: bool | None
    scan_interval_seconds: float | None  # what the CPU budget allows for this VM, when known
    ledger: LedgerSummary | None = None

    def as_dict(self) -> dict[str, Any]:
        """The REST shape: the fields above with the ledger summary's fields flattened in."""
        body: dict[str, Any] = {
            "available": self.available,
            "problem": self.problem,
            "problem_detail": self.problem_detail,
            "reporting_effective": self.reporting_effective,
            "scan_interval_seconds": self.scan_interval_seconds,
        }
        if self.ledger is not None:
            body.update(asdict(self.ledger))
        return body

    @classmethod
    def failed(cls, problem: str, detail: str) -> HostStatus:
        return cls(False, problem, detail, None, None)
