"""Reconciliation: what successive residency scans mean, and the reclaim estimate.

- ``diff``: two snapshots -> reported blocks, ballooned, unexplained and refaulted pages.
- ``ranges``: ``Ledger``, the per-VM history of reported ranges, counters and current bytes.
- ``estimate``: the per-VM reclaim estimate from the ledger, guest stats and the model.
- ``tracker``: ``HostTracker``, which runs scans on a cadence and feeds ledger and estimate.
"""
