"""The reclaim controller's decisions: step each VM's balloon towards its advice, safely.

Pure (no I/O, no clock): the daemon feeds it each VM's advice and the host's memory use, and
carries out (``act``) or logs (``advise``) what it decides. The rules, in order:

1. A VM that opted out is left alone.
2. **Deflate at once** when the guest shows pressure (to the advice's target, which then gives
   memory back), or when its available memory falls towards the margin (below twice the margin)
   while the balloon holds memory: deflations are never bounded by the step nor delayed by the
   cool-down, because a late deflation costs the guest swap or an OOM kill.
3. **Honour deflate-on-oom**: a guest whose balloon grew smaller than reclaimd set it, on a
   device with deflate-on-oom, let pages go to avoid an OOM kill. The target follows it (so
   QEMU does not inflate again) and the VM gets a long cool-down.
4. **Inflate** only while the host's memory use is above its goal (as Proxmox's
   ``ballooning-target``), only on advice newer than the last action, at most ``step_bytes``
   per cycle, and only after ``cooldown_seconds`` since the VM's last action.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from daemon.ledger.advice import Advice

MiB = 1 << 20
Action = Literal["inflate", "deflate", "hold"]
#: A balloon this close to its target is there (the driver moves in 256-page rounds).
AT_TARGET = 4 * MiB


@dataclass(frozen=True)
class ReclaimPolicy:
    step_bytes: int = 256 * MiB  # most an inflation moves one VM's balloon in one cycle
    cooldown_seconds: float = 30.0  # between an action on a VM and its next inflation
    oom_cooldown_seconds: float = 300.0  # after the guest deflated itself on OOM
    host_target: float = 0.80  # inflate only while host memory use is above this share


@dataclass(frozen=True)
class Decision:
    vm: str
    action: Action
    reason: str  # advice, pressure, near_margin, deflate_on_oom, or why it holds
    target_bytes: int | None  # what to set (None: nothing)
    inputs: dict[str, object]


@dataclass
class _VMState:
    last_action_at: float | None = None
    cooldown: float = 0.0
    set_target: int | None = None  # what reclaimd last set


@dataclass
class ReclaimController:
    policy: ReclaimPolicy = field(default_factory=ReclaimPolicy)
    _vms: dict[str, _VMState] = field(default_factory=dict)

    def forget(self, vm: str) -> None:
        self._vms.pop(vm, None)

    def decide(
        self,
        vm: str,
        advice: Advice | None,
        *,
        now: float,
        ram_bytes: int | None,
        actual_bytes: int | None,
        available_bytes: int | None,
        margin_bytes: int,
        deflate_on_oom: bool,
        host_use: float | None,
        opted_out: bool = False,
    ) -> Decision:
        """What to do with ``vm``'s balloon now. Call ``done`` after carrying it out."""
        state = self._vms.setdefault(vm, _VMState())
        inputs: dict[str, object] = {
            "actual_bytes": actual_bytes,
            "advice_target_bytes": advice.target_bytes if advice else None,
            "expected_gain_bytes": advice.expected_gain_bytes if advice else None,
            "available_bytes": available_bytes,
            "margin_bytes": margin_bytes,
            "host_use": host_use,
            "pressure": list(advice.pressure.signals) if advice else [],
        }

        def hold(reason: str) -> Decision:
            return Decision(vm, "hold", reason, None, inputs)

        if opted_out:
            return hold("opted_out")
        if advice is None or ram_bytes is None or actual_bytes is None:
            return hold("no_advice")
        ballooned = actual_bytes < ram_bytes - AT_TARGET

        if advice.pressure.under and advice.target_bytes is not None:
            if advice.target_bytes > actual_bytes + AT_TARGET:
                return Decision(vm, "deflate", "pressure", advice.target_bytes, inputs)
            return hold("pressure")
        if ballooned and available_bytes is not None and available_bytes < 2 * margin_bytes:
            target = min(ram_bytes, actual_bytes + 2 * margin_bytes - available_bytes)
            return Decision(vm, "deflate", "near_margin", max(target, actual_bytes), inputs)
        if (
            deflate_on_oom
            and state.set_target is not None
            and actual_bytes > state.set_target + AT_TARGET
        ):
            state.cooldown = self.policy.oom_cooldown_seconds
            return Decision(vm, "deflate", "deflate_on_oom", actual_bytes, inputs)

        if advice.target_bytes is None:
            return hold("no_advice")
        if advice.target_bytes >= actual_bytes - AT_TARGET:
            return hold("at_target")
        if host_use is None:
            return hold("host_use_unknown")
        if host_use <= self.policy.host_target:
            return hold("host_below_target")
        if state.last_action_at is not None:
            if advice.at <= state.last_action_at:
                return hold("advice_not_newer")
            if now - state.last_action_at < state.cooldown:
                return hold("cooldown")
        target = max(advice.target_bytes, actual_bytes - self.policy.step_bytes)
        return Decision(vm, "inflate", "advice", target, inputs)

    def done(self, decision: Decision, now: float, *, applied: bool = True) -> None:
        """``decision`` was carried out at ``now`` (``applied``), or, in advise mode, would
        have been: the cool-down runs for both, but only a target really set is the balloon's."""
        if decision.target_bytes is None:
            return
        state = self._vms.setdefault(decision.vm, _VMState())
        state.last_action_at = now
        if applied:
            state.set_target = decision.target_bytes
        if decision.reason != "deflate_on_oom":
            state.cooldown = self.policy.cooldown_seconds
