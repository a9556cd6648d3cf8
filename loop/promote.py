"""Back to the fleet: a retrained version that beats the deployed one by a stated margin goes out as a canary.

decide() compares the candidate's and the deployed version's registered metric (fidelity_map by default, as
`edgestack registry push` records it per device class) over the device classes both were measured on: the
candidate must be better by at least `margin` (absolute) on every shared class, and no shared class may be
missing a value. promote() then either starts the rollout (fleet.rollout_cli.start_rollout with the strategy:
its first stage is the canary) or, with propose_only, returns the proposal for an operator to start.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from loop.errors import PromotionError

DEFAULT_METRIC = "fidelity_map"


@dataclass(frozen=True)
class Decision:
    model: str
    candidate: str
    deployed: str
    metric: str
    margin: float
    better: bool
    per_class: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # class -> (deployed, candidate)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_class"] = {c: {"deployed": d, "candidate": n} for c, (d, n) in self.per_class.items()}
        return out


def decide(model: str, candidate_ref: str, candidate_metrics: Mapping[str, Mapping[str, float]], deployed_ref: str,
           deployed_metrics: Mapping[str, Mapping[str, float]], *, metric: str = DEFAULT_METRIC,
           margin: float = 0.01) -> Decision:
    """Is the candidate better than the deployed version by margin on every device class both were measured on?"""
    if not margin >= 0:
        raise PromotionError(f"margin must be >= 0, not {margin!r}")
    shared = sorted(set(candidate_metrics) & set(deployed_metrics))
    if not shared:
        raise PromotionError(f"{model} {candidate_ref} and {deployed_ref} share no measured device class "
                             f"(candidate: {sorted(candidate_metrics)}, deployed: {sorted(deployed_metrics)})")
    per_class: dict[str, tuple[float, float]] = {}
    for device_class in shared:
        old, new = deployed_metrics[device_class].get(metric), candidate_metrics[device_class].get(metric)
        if old is None or new is None:
            raise PromotionError(f"{metric} not measured for device class {device_class} "
                                 f"({'deployed ' + deployed_ref if old is None else 'candidate ' + candidate_ref})")
        per_class[device_class] = (float(old), float(new))
    short = {c: v for c, v in per_class.items() if v[1] < v[0] + margin - 1e-9}  # 0.92 + 0.02 is 0.94000...01
    better = not short
    if better:
        reason = (f"{metric} better by >= {margin:g} on {', '.join(shared)} "
                  f"(min gain {min(n - o for o, n in per_class.values()):+.4f})")
    else:
        worst = min(short, key=lambda c: short[c][1] - short[c][0])
        reason = (f"{metric} on {worst}: {short[worst][1]:.4f} vs deployed {short[worst][0]:.4f}, "
                  f"needs >= {short[worst][0] + margin:.4f}")
    return Decision(model, candidate_ref, deployed_ref, metric, margin, better, per_class, reason)


async def promote(registry, bus, model: str, candidate_ref: str, deployed_ref: str, strategy, *,
                  metric: str = DEFAULT_METRIC, margin: float = 0.01, propose_only: bool = False,
                  rollout_id: str | None = None) -> dict[str, Any]:
    """Decide, then start the canary rollout (or only propose it). Returns what was done, as a JSON object."""
    from fleet.rollout_cli import start_rollout

    candidate, deployed = registry.show(model, candidate_ref), registry.show(model, deployed_ref)
    decision = decide(model, candidate_ref, candidate.metrics, deployed_ref, deployed.metrics, metric=metric,
                      margin=margin)
    out: dict[str, Any] = {"decision": decision.to_dict(), "action": "none"}
    if not decision.better:
        return out
    release = registry.resolve(model, candidate_ref)
    rollout_id = rollout_id or f"{model}-{release.version}".replace(".", "_").replace("+", "_")[:64]
    if propose_only or bus is None:
        out.update(action="proposed", rollout_id=rollout_id, release=release.to_dict(),
                   command=f"edgestack rollout start --strategy STRATEGY.yaml --model {model} --version {candidate_ref} "
                           f"--id {rollout_id}")
        return out
    rollout = await start_rollout(bus, rollout_id, release, strategy, time.time())
    out.update(action="started", rollout_id=rollout_id, state=rollout.state.value)
    return out
