"""kt-kernel 0.7's staged SFT profile (`kt_kernel.sft.profiler`): per-layer timers of the backends'
compute objects (get_profile_stats / reset_profile_stats, recording when KT_SFT_PROFILE=1 was set
before the model was wrapped) gathered over a model and printed as one table summed over layers.

A timer is `<scope>.<stage>.total_ns` with `.calls` (and optionally `.bytes`), scope `wrapper` (the
whole layer) or `tp.<i>` (one sub-pool); `<scope>.tokens` counts the tokens the scope saw. Each row's
parent% is its share of the enclosing stage (forward.total, backward.total, ...), 0 for the
outermost stages and for worker-CPU time, which is summed over threads and no share of wall time.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

from .arch import find_kt_wrappers

__all__ = ["collect_kt_sft_profile", "format_kt_sft_profile", "reset_kt_sft_profile"]


def _profiled_moe(layer_wrapper: Any):
    moe = getattr(getattr(layer_wrapper, "wrapper", layer_wrapper), "moe", None)
    return moe if hasattr(moe, "get_profile_stats") else None


def collect_kt_sft_profile(model: Any, reset: bool = False) -> Dict[str, Any]:
    """{'enabled': whether any layer records, 'layers': {layer_idx: {timer: value}}} (JSON-ready);
    reset=True starts every layer's timers afresh after reading them."""
    layers: Dict[int, Dict[str, float]] = {}
    for layer_wrapper in find_kt_wrappers(model) or ():
        moe = _profiled_moe(layer_wrapper)
        if moe is None:
            continue
        raw = {str(k): float(v) for k, v in moe.get_profile_stats(reset).items()}
        layers[int(raw.get("layer_idx", getattr(layer_wrapper, "layer_idx", len(layers))))] = raw
    return {"enabled": any(raw.get("wrapper.enabled", 0.0) for raw in layers.values()), "layers": layers}


def reset_kt_sft_profile(model: Any) -> None:
    """Zero every layer's timers."""
    for layer_wrapper in find_kt_wrappers(model) or ():
        moe = _profiled_moe(layer_wrapper)
        if moe is not None and hasattr(moe, "reset_profile_stats"):
            moe.reset_profile_stats()


def _scope_and_stage(key: str) -> Optional[Tuple[str, str]]:
    if not key.endswith(".total_ns"):
        return None
    timer = key[: -len(".total_ns")]
    if timer.startswith("wrapper."):
        return "wrapper", timer[len("wrapper.") :]
    parts = timer.split(".", 2)
    if parts[0] == "tp" and len(parts) == 3:
        return f"tp.{parts[1]}", parts[2]
    return None


# stage prefix -> the stage it is part of; the first match wins (order matters)
_PARENTS = (
    ("backward.base_weight_grad.worker_cpu.", None),
    ("backward.base_weight_grad.", "backward.base_weight_grad"),
    ("weights.base_reload.", "weights.base_reload"),
    ("backward.down.total", "backward.total"),
    ("backward.gate_up.total", "backward.total"),
    ("backward.down.", "backward.down.total"),
    ("backward.gate_up.", "backward.gate_up.total"),
)
_TOP_PARENTS = (("forward.", "forward.total"), ("backward.", "backward.total"))
_TOP_PARENTS += (("tp.forward.", "tp.forward.total"), ("tp.backward.", "tp.backward.total"))


def _parent(stage: str) -> Optional[str]:
    for prefix, parent in _PARENTS:
        if stage.startswith(prefix):
            return parent
    if stage.endswith(".total"):
        return None
    return next((parent for prefix, parent in _TOP_PARENTS if stage.startswith(prefix)), None)


def _rows(profile: Dict[str, Any]) -> List[Dict[str, Any]]:
    sums: Dict[Tuple[str, str], Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for raw in profile.get("layers", {}).values():
        for key, total_ns in raw.items():
            found = _scope_and_stage(key)
            if found is None or total_ns <= 0.0:
                continue
            scope, stage = found
            base = key[: -len("total_ns")]
            row = sums[(scope, stage)]
            row["total_ns"] += total_ns
            row["calls"] += raw.get(base + "calls", 0.0)
            row["bytes"] += raw.get(base + "bytes", 0.0)
            row["tokens"] += raw.get(f"{scope}.tokens", 0.0)
    rows = []
    for (scope, stage), v in sums.items():
        parent = _parent(stage)
        parent_ns = sums[(scope, parent)]["total_ns"] if parent and (scope, parent) in sums else 0.0
        rows.append(
            {
                "scope": scope,
                "stage": stage,
                "calls": v["calls"],
                "total_ms": v["total_ns"] / 1e6,
                "avg_ms": v["total_ns"] / v["calls"] / 1e6 if v["calls"] else 0.0,
                "us_per_token": v["total_ns"] / v["tokens"] / 1e3 if v["tokens"] else 0.0,
                "mib": v["bytes"] / 2**20,
                "parent_pct": 100.0 * v["total_ns"] / parent_ns if parent_ns else 0.0,
            }
        )
    return sorted(rows, key=lambda r: (r["scope"], -r["total_ms"], r["stage"]))


def format_kt_sft_profile(profile: Dict[str, Any]) -> str:
    """The profile as a table, one row per (scope, stage) summed over layers."""
    if not profile.get("enabled"):
        return "KT SFT profiler disabled or no profiled KT layers found. Set KT_SFT_PROFILE=1 before model creation."
    header = (
        f"{'scope':<9} {'stage':<34} {'calls':>7} {'total_ms':>11} {'avg_ms':>10} {'us/token':>10} {'MiB':>10} "
        f"{'parent%':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in _rows(profile):
        lines.append(
            f"{r['scope']:<9} {r['stage']:<34} {r['calls']:>7.0f} {r['total_ms']:>11.3f} {r['avg_ms']:>10.3f} "
            f"{r['us_per_token']:>10.3f} {r['mib']:>10.2f} {r['parent_pct']:>8.1f}%"
        )
    return "\n".join(lines)
