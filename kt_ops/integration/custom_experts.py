"""Experts modules that transformers runs without `@use_experts_implementation`, so that apply_kt
converts them like the decorated ones.

`adopt_custom_experts` gives them the attributes the decorator gives (config, has_gate, is_concatenated,
num_experts, _apply_gate, ...); once their weights are on kt, `install_custom_forward` routes their
calls to transformers' ExpertsInterface "kt" entry (kt_experts_forward), which needs the standard
(hidden_states, top_k_index, top_k_weights) call:

- Llama-4 (`Llama4TextMoe` / `Llama4TextExperts`): the experts are called on every (expert, token)
  row, and the router's sigmoid score scales the expert's input, not its output. As the experts are
  nonlinear, the score cannot be the op's output weight: each token is expanded to its k choices,
  x_{t,j} = x_t · s_{t,j}, routed to one expert each with weight 1, and the k rows of a token are
  summed, so autograd outside the op carries the score's and the input's gradients. The router and
  the shared expert stay transformers'. Its gate_up_proj is [E, H, 2I] (x @ W) without transformers'
  is_transposed, so stock peft sizes a LoRA on it as if it were [E, out, in]; kt keeps peft's layout
  (`kt_hidden_major`, see peft_lora.adapter_factors), so adapters load in either model.
- LongCat-Flash (`LongcatFlashExperts`): ids >= n_routed_experts are identity ("zero-computation")
  experts that return their input times its weight. The real experts run on kt (identity slots get
  id -1, which kt skips) and x · Σ(identity weights) is added outside the op. gate_up_proj has a row
  for every id, identity ones included (never read); only the first n_routed_experts are experts.
"""

from __future__ import annotations

import types

import torch
from torch import nn

# The text model types whose experts these are (benchmarks/arch_table.py lists them).
CUSTOM_EXPERTS_MODEL_TYPES = ("llama4_text", "longcat_flash")


def is_llama4_experts(module: nn.Module) -> bool:
    try:
        from transformers.models.llama4.modeling_llama4 import Llama4TextExperts
    except ImportError:
        return False
    return isinstance(module, Llama4TextExperts)


def is_longcat_experts(module: nn.Module) -> bool:
    try:
        from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashExperts
    except ImportError:
        return False
    return isinstance(module, LongcatFlashExperts)


def is_custom_experts(module: nn.Module) -> bool:
    return is_llama4_experts(module) or is_longcat_experts(module)


def adopt_custom_experts(model: nn.Module) -> None:
    """Give every Llama-4 / LongCat-Flash experts module of `model` the attributes transformers'
    @use_experts_implementation sets on the experts it decorates (nothing else changes)."""
    from transformers.configuration_utils import PreTrainedConfig
    from transformers.integrations.moe import _default_apply_gate

    configs = {}  # module name -> config of the nearest module above it that has one
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0] if name else None
        config = getattr(module, "config", None)
        configs[name] = config if isinstance(config, PreTrainedConfig) else configs.get(parent)
        if not is_custom_experts(module) or hasattr(module, "has_gate"):
            continue
        if not isinstance(getattr(module, "gate_up_proj", None), torch.Tensor):
            continue  # LongCat without routed experts (identity experts only): nothing for kt
        module.config = configs[name]
        module.has_gate, module.has_bias, module.has_post_expert_norm = True, False, False
        module.is_concatenated, module._is_expert_parallel = True, False
        module._apply_gate = types.MethodType(_default_apply_gate, module)
        if is_llama4_experts(module):
            module.kt_hidden_major = True  # weights [E, H, 2I] / [E, I, H]; not is_transposed, see above
        else:
            module.is_transposed = False
            module.num_experts = module.num_routed_experts


def install_custom_forward(model: nn.Module, name: str, module: nn.Module) -> None:
    """After apply_kt put the experts module `name` on kt: route its calls (and for Llama-4 its MoE
    block's) to the kt forward. Does nothing for experts transformers dispatches itself."""
    if is_longcat_experts(module):
        module.forward = types.MethodType(_longcat_forward, module)
    elif is_llama4_experts(module):
        module.forward = types.MethodType(_experts_interface_forward, module)
        holder = model.get_submodule(name.replace(".base_layer", "").rpartition(".")[0])
        holder.forward = types.MethodType(_llama4_moe_forward, holder)


def _experts_interface_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    # What @use_experts_implementation's forward does: the implementation the config names ("kt").
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS[self.config._experts_implementation](self, hidden_states, top_k_index, top_k_weights)


def _longcat_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    routed = top_k_index < self.num_experts
    out = _experts_interface_forward(self, hidden_states, torch.where(routed, top_k_index, -1), top_k_weights)
    identity = torch.where(routed, torch.zeros_like(top_k_weights), top_k_weights).sum(dim=-1, keepdim=True)
    return out + (hidden_states * identity).to(hidden_states.dtype)


def _llama4_moe_forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama4TextMoe.forward with the routed experts called once per (token, choice) row."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(hidden_states)  # scores: sigmoid of the top-k, else 0
    top_ids = torch.topk(router_logits, self.top_k, dim=1).indices  # the router's own choice
    scores = router_scores.gather(1, top_ids)
    routed_in = (hidden_states[:, None, :] * scores[:, :, None]).reshape(-1, self.hidden_dim)
    ones = torch.ones(routed_in.shape[0], 1, dtype=routed_in.dtype, device=routed_in.device)
    routed_out = self.experts(routed_in, top_ids.reshape(-1, 1), ones)
    out = self.shared_expert(hidden_states)
    return out + routed_out.view(-1, self.top_k, self.hidden_dim).sum(dim=1), router_logits
