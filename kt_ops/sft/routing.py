"""Routing of a KT-wrapped MoE block: the router's logits through the model's own top-k rule, kept
inside autograd when the router trains (router LoRA, or a trainable gate), so the routing weights'
gradient reaches it.

A transformers v5 router (TopKRouter: a module with a `weight` Parameter) is exposed to PEFT as a
Linear sharing that weight (DeepSeek's in fp32, as DeepSeek computes it), and the top-k rule of the
model type is applied to its output here: softmax top-k ('linear'), DeepSeek's sigmoid scores with a
correction bias and group-limited selection ('deepseek_gate'), or GLM-4-MoE's ('glm4_moe_gate')."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class DeepseekRouterLinear(nn.Linear):
    """A PEFT-visible Linear computing DeepSeek's gate projection in fp32."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(input.float(), self.weight.float(), bias)


@dataclass(frozen=True)
class DeepSeekRoutingSpec:
    """DeepSeek's routing parameters, read from the MoE block, the router and their configs, which
    must agree where several hold one."""

    expert_num: int
    n_group: int
    topk_group: int
    top_k: int
    norm_topk_prob: bool
    routed_scaling_factor: float

    @classmethod
    def from_modules(cls, *, moe: nn.Module, router: nn.Module, expert_num: int) -> "DeepSeekRoutingSpec":
        sources = [("moe", moe), ("router", router), ("moe.config", getattr(moe, "config", None))]
        sources.append(("router.config", getattr(router, "config", None)))

        def value(name: str, aliases: Tuple[str, ...]) -> Any:
            seen = []
            for where, source in sources:
                found = next((getattr(source, a) for a in aliases if getattr(source, a, None) is not None), None)
                if source is not None and found is not None:
                    seen.append((where, found))
            if not seen:
                raise ValueError(
                    f"DeepSeek routing metadata {name!r} is missing; checked {', '.join(w for w, _ in sources)}"
                )
            for where, found in seen[1:]:
                if found != seen[0][1]:
                    raise ValueError(
                        f"Conflicting DeepSeek routing metadata for {name}: {seen[0][0]}={seen[0][1]!r}, "
                        f"{where}={found!r}"
                    )
            return seen[0][1]

        def positive(name: str, aliases: Tuple[str, ...]) -> int:
            found = value(name, aliases)
            if isinstance(found, bool) or not isinstance(found, int) or found <= 0:
                raise ValueError(f"DeepSeek routing metadata {name} must be a positive integer, got {found!r}")
            return found

        n_group, topk_group = positive("n_group", ("n_group",)), positive("topk_group", ("topk_group",))
        routed = positive("n_routed_experts", ("n_routed_experts", "num_local_experts"))
        top_k = positive("top_k", ("top_k", "num_experts_per_tok"))
        norm = value("norm_topk_prob", ("norm_topk_prob",))
        if not isinstance(norm, bool):
            raise ValueError(f"DeepSeek routing metadata norm_topk_prob must be bool, got {norm!r}")
        scaling = float(value("routed_scaling_factor", ("routed_scaling_factor",)))
        if not math.isfinite(scaling) or scaling <= 0:
            raise ValueError(f"DeepSeek routed_scaling_factor must be finite and positive, got {scaling!r}")
        expert_num = int(expert_num)
        if routed != expert_num:
            raise ValueError(
                f"DeepSeek routed expert count does not match the KT architecture: routing={routed}, kt={expert_num}"
            )
        if expert_num % n_group or expert_num // n_group < 2:
            raise ValueError(
                f"DeepSeek needs at least two experts per group, and n_group={n_group} to divide {expert_num}"
            )
        if topk_group > n_group or top_k > topk_group * (expert_num // n_group):
            raise ValueError(
                f"DeepSeek top_k={top_k} / topk_group={topk_group} exceed the experts of the selected groups"
            )
        return cls(expert_num, n_group, topk_group, top_k, norm, scaling)


def group_limited_topk(
    probs: torch.Tensor, bias: Optional[torch.Tensor], n_group: int, topk_group: int, top_k: int
) -> torch.Tensor:
    """The top_k experts by probs (+ bias) among the topk_group groups whose two best experts score
    highest (DeepSeek-V3's and GLM-4-MoE's selection)."""
    scores = probs if bias is None else probs + bias.to(device=probs.device, dtype=probs.dtype)
    per_group = scores.shape[-1] // n_group
    group_scores = scores.view(-1, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    chosen = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
    keep = group_mask.unsqueeze(-1).expand(-1, n_group, per_group).reshape(-1, scores.shape[-1])
    return torch.topk(scores.masked_fill(~keep, 0.0), k=top_k, dim=-1, sorted=False)[1]


def deepseek_routing(logits: torch.Tensor, bias, spec: DeepSeekRoutingSpec):
    probs = torch.sigmoid(logits.float())
    ids = group_limited_topk(probs, bias, spec.n_group, spec.topk_group, spec.top_k)
    weights = probs.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * spec.routed_scaling_factor


def glm4_routing(logits: torch.Tensor, router: nn.Module, expert_num: int, default_top_k: int):
    probs = torch.sigmoid(logits.float())
    n_group = getattr(router, "n_group", 1)
    bias = getattr(router, "e_score_correction_bias", None)
    top_k = getattr(router, "top_k", default_top_k)
    ids = group_limited_topk(probs, bias, n_group, getattr(router, "topk_group", n_group), top_k)
    weights = probs.gather(1, ids)
    if getattr(router, "norm_topk_prob", True):
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * getattr(router, "routed_scaling_factor", 1.0)


def softmax_routing(logits: torch.Tensor, top_k: int, normalize: bool = True):
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(logits.dtype)
