"""Reconciliation: what successive residency scans mean, and the reclaim estimate.

- ``diff``: two snapshots -> reported blocks, ballooned, unexplained and refaulted pages.
- ``ranges``: ``Ledger``, the per-VM history of reported ranges, counters and current bytes.
- ``estimate``: the per-VM reclaim estimate from the ledger, guest stats and the model.
- ``status``: ``HostStatus``, what the API and metrics read of a VM's host view.

Pure reconciliation: it takes values (scans, balloon sizes, guest stats) and returns values; the
VM's poll cycle (``daemon.vmcycle``) scans, calls it and publishes what it returns.
"""
