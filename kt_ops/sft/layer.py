"""KTMoELayerWrapper (`kt_kernel.sft.layer`): the nn.Module that replaces a Hugging Face MoE block
for kt_ops.sft. It keeps the block's router, experts (where PEFT finds them; their weights become
placeholders once the CPU backend holds them) and shared experts under their own names, routes with
the model's rule (kt_ops.sft.routing), and runs the routed experts on an SFT wrapper through
KTMoEFunction: submit the forward, compute the shared experts on the GPU meanwhile, collect.

With several ranks the wrapper (the CPU backend) lives on rank 0 only; every rank takes the same
collective path, which the ranks check together before each step (dist_utils), and a failure on one
rank is raised on all of them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Any, List, Optional

import torch
from torch import nn

from .arch import MOEArchConfig
from .autograd import KTMoEFunction
from .checkpointing import (
    activation_checkpoint_action,
    check_cache_empty,
    check_cache_ready,
    poison_cache,
    validate_activation_checkpoint_phase,
)
from .config import KTActivationPolicy
from .dist_utils import checkpoint_hook_mode, distributed_on
from .layer_distributed import distributed_submit, no_grad_output
from .routing import DeepseekRouterLinear, DeepSeekRoutingSpec, deepseek_routing, glm4_routing, softmax_routing

logger = logging.getLogger(__name__)


_activation_checkpoint_action = activation_checkpoint_action  # kt-kernel's names
_validate_activation_checkpoint_phase = validate_activation_checkpoint_phase


def _drop_placeholders_from_state_dict(module, state_dict, prefix, _local_metadata) -> None:
    """Placeholders hold no weights: they never go into a checkpoint."""
    for name, parameter in module.named_parameters():
        if getattr(parameter, "_kt_zero_storage", False):
            state_dict.pop(f"{prefix}{name}", None)


def _supply_placeholders_on_load(module, state_dict, prefix, *_args) -> None:
    """...and are not reported missing when one is loaded."""
    for name, parameter in module.named_parameters():
        if getattr(parameter, "_kt_zero_storage", False):
            state_dict[f"{prefix}{name}"] = parameter


class KTMoELayerWrapper(nn.Module):
    def __init__(
        self,
        original_moe: nn.Module,
        wrapper: Any,
        lora_params: Optional[dict],  # kt-kernel's argument, unused there as here
        moe_config: MOEArchConfig,
        hidden_size: int,
        layer_idx: int,
        lora_experts: Optional[nn.Module] = None,
        full_weight_grad: Optional[bool] = None,
        uses_authoritative_optimizer_grads: Optional[bool] = None,
        activation_policy: Optional[KTActivationPolicy] = None,
    ):
        super().__init__()
        self._is_kt_moe_wrapper = True
        self.wrapper = wrapper
        self.moe_config = moe_config
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.router_type = moe_config.router_type
        # Submodules in the block's own order (router, experts, shared experts), so PEFT visits them
        # (and initializes their LoRA) in the order it would on the original model.
        self._install_router(original_moe, moe_config)
        self._experts_attr = moe_config.experts_attr
        setattr(self, self._experts_attr, getattr(original_moe, moe_config.experts_attr, None))
        self._install_shared_experts(original_moe, moe_config)
        self.lora_experts = lora_experts
        self._peft_lora_modules = None
        self._lora_pointers_dirty = False
        self._kt_managed_lora_enabled = False
        # Every rank must agree on these even though only rank 0 has the backend.
        if full_weight_grad is None:
            full_weight_grad = bool(getattr(wrapper, "_full_weight_grad", False))
        if uses_authoritative_optimizer_grads is None:
            uses_authoritative_optimizer_grads = bool(getattr(wrapper, "_uses_authoritative_optimizer_grads", False))
        self._full_weight_grad = bool(full_weight_grad)
        self._uses_authoritative_optimizer_grads = bool(uses_authoritative_optimizer_grads)
        if activation_policy is None:
            retain_both = not getattr(wrapper, "reuse_checkpoint_forward", False)
            activation_policy = KTActivationPolicy(cpu="retain", gpu="retain" if retain_both else "recompute")
        self._kt_activation_policy = activation_policy
        self.register_state_dict_post_hook(_drop_placeholders_from_state_dict)
        self.register_load_state_dict_pre_hook(_supply_placeholders_on_load)

    def _install_router(self, original_moe: nn.Module, moe_config: MOEArchConfig) -> None:
        router = getattr(original_moe, moe_config.router_attr, None)
        self._router_attr = moe_config.router_attr
        self._original_router = None
        self._deepseek_routing_spec = None
        weight = getattr(router, "weight", None)
        if router is not None and not isinstance(router, nn.Linear) and isinstance(weight, nn.Parameter):
            # transformers v5's TopKRouter: PEFT targets Linear layers, so the router's weight is
            # shared with one, and the router itself is kept for its top-k rule.
            linear_cls = DeepseekRouterLinear if self.router_type == "deepseek_gate" else nn.Linear
            linear = linear_cls(weight.shape[1], weight.shape[0], bias=False, device="meta")
            linear.weight = weight
            self._original_router = router
            router = linear
        setattr(self, self._router_attr, router)
        if self.router_type == "deepseek_gate" and self._original_router is not None:
            self._deepseek_routing_spec = DeepSeekRoutingSpec.from_modules(
                moe=original_moe, router=self._original_router, expert_num=moe_config.expert_num
            )
            bias = getattr(self._original_router, "e_score_correction_bias", None)
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (int(moe_config.expert_num),):
                raise ValueError(
                    f"Layer {self.layer_idx}: DeepSeek correction bias must have shape ({moe_config.expert_num},), "
                    f"got {getattr(bias, 'shape', None)}"
                )

    def _install_shared_experts(self, original_moe: nn.Module, moe_config: MOEArchConfig) -> None:
        """DeepSeek / GLM keep `shared_experts`; Qwen2-MoE / Qwen3.5 a `shared_expert` whose output a
        sigmoid `shared_expert_gate` scales. They stay ordinary (GPU, trainable) modules."""
        self._shared_expert_attr = self._shared_expert_gate_attr = None
        if not moe_config.has_shared_experts:
            return
        for name in ("shared_experts", "shared_expert"):
            if getattr(original_moe, name, None) is not None:
                setattr(self, name, getattr(original_moe, name))
                self._shared_expert_attr = name
                break
        else:
            raise ValueError(
                f"Layer {self.layer_idx}: the architecture declares shared experts, but the MoE module has neither "
                "'shared_experts' nor 'shared_expert'"
            )
        singular = self._shared_expert_attr == "shared_expert"
        gates = (
            ("shared_expert_gate", "shared_experts_gate") if singular else ("shared_experts_gate", "shared_expert_gate")
        )
        for name in gates:
            if getattr(original_moe, name, None) is not None:
                setattr(self, name, getattr(original_moe, name))
                self._shared_expert_gate_attr = name
                break
        if singular and self._shared_expert_gate_attr is None:
            raise ValueError(
                f"Layer {self.layer_idx}: singular 'shared_expert' requires 'shared_expert_gate' for Qwen-style gated "
                "output"
            )

    # ---- pieces of the forward ------------------------------------------------------------------

    def _compute_shared_expert(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        if self._shared_expert_attr is None:
            return None
        output = getattr(self, self._shared_expert_attr)(hidden_states)
        if self._shared_expert_gate_attr is not None:
            output = torch.sigmoid(getattr(self, self._shared_expert_gate_attr)(hidden_states)) * output
        return output

    def _compute_gpu_output(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        output = self._compute_shared_expert(hidden_states)
        if output is not None:
            output = output.to(hidden_states.dtype)
        if self.lora_experts is not None:
            extra = self.lora_experts(hidden_states)
            output = extra if output is None else output + extra
        return output

    def _compute_routing(self, hidden_states: torch.Tensor):
        """(topk_ids, topk_weights in bf16), inside autograd when the router trains (router LoRA, a
        trainable gate); a frozen router's weights are constants of the step, as in kt-kernel 0.7."""
        router = getattr(self, self._router_attr)
        tracked = torch.is_grad_enabled() and any(p.requires_grad for p in router.parameters())
        with contextlib.nullcontext() if tracked else torch.no_grad():
            ids, weights = self._route(router, hidden_states)
        if weights.is_floating_point():
            weights = weights.to(torch.bfloat16)
        if tracked and not weights.requires_grad:
            raise RuntimeError(
                f"Layer {self.layer_idx}: the trainable router produced detached routing weights, so no gradient "
                "would reach it"
            )
        return ids, weights

    def _route(self, router: nn.Module, hidden_states: torch.Tensor):
        flat = hidden_states.view(-1, self.hidden_size)
        original, k = self._original_router, self.moe_config.num_experts_per_tok
        if self.router_type == "deepseek_gate" and original is None:
            # a gate module that routes itself (DeepSeek's remote code); run as in eval mode
            was_training = router.training
            router.eval()
            try:
                output = router(hidden_states)
            finally:
                router.train(was_training)
            if not isinstance(output, (tuple, list)) or len(output) != 2:
                raise RuntimeError(f"Layer {self.layer_idx}: DeepSeek gate must return (topk_ids, topk_weights)")
            return output
        if original is not None:
            logits = router(flat)
            if self.router_type == "deepseek_gate":
                return deepseek_routing(logits, original.e_score_correction_bias, self._deepseek_routing_spec)
            if self.router_type == "glm4_moe_gate":
                return glm4_routing(logits, original, self.moe_config.expert_num, k)
            return softmax_routing(logits, getattr(original, "top_k", k), getattr(original, "norm_topk_prob", True))
        output = router(flat)
        if isinstance(output, tuple):
            if len(output) >= 3:  # transformers v5 TopKRouter: (logits, weights, ids), already top-k'd
                return output[2], output[1]
            output = output[0]
        return softmax_routing(output, k)

    def _refresh_backend_weights(self) -> None:
        if self._lora_pointers_dirty:
            self.update_lora_pointers()
            self._lora_pointers_dirty = False
        backend = self.wrapper
        if self._full_weight_grad and getattr(backend, "_kt_full_checkpoint_load_failed", False):
            raise RuntimeError(
                f"Layer {self.layer_idx}: a previous KT full checkpoint load failed; reload a valid checkpoint "
                "before running forward"
            )
        if self._full_weight_grad and getattr(backend, "_base_weights_dirty", False):
            backend.update_base_weights()
            backend._base_weights_dirty = False

    def update_lora_pointers(self) -> None:
        """Have the backend re-read the LoRA after an optimizer step (a no-op without a backend)."""
        backend = self.wrapper
        if backend is None:
            return
        if not getattr(backend, "_weights_loaded", False) or not getattr(backend, "_lora_initialized", False):
            logger.warning("Layer %s: update_lora_pointers skipped: the backend is not loaded", self.layer_idx)
            return
        backend.update_lora_weights()

    def _apply(self, fn, recurse=True):
        # The routed experts (and any PEFT LoRA on them) stay on the CPU with the backend.
        experts = self._modules.pop(self._experts_attr, None) if hasattr(self, "_experts_attr") else None
        try:
            return super()._apply(fn, recurse)
        finally:
            if experts is not None:
                self._modules[self._experts_attr] = experts

    # ---- forward ----------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        topk_ids, topk_weights = self._compute_routing(hidden_states)
        return self._forward_routed(hidden_states, topk_ids, topk_weights)

    def _train_lora(self) -> bool:
        return bool(
            self._kt_managed_lora_enabled or self._peft_lora_modules or getattr(self, "_fused_expert_lora_params", None)
        )

    def _forward_routed(self, hidden_states, topk_ids, topk_weights):
        train_lora, full = self._train_lora(), self._full_weight_grad
        needs_backward = (
            self.training
            and torch.is_grad_enabled()
            and (hidden_states.requires_grad or topk_weights.requires_grad or train_lora or full)
        )
        phase = checkpoint_hook_mode()
        action = activation_checkpoint_action(self._kt_activation_policy, phase)
        if not distributed_on()[0]:
            validate_activation_checkpoint_phase(self._kt_activation_policy, phase, requires_backward=needs_backward)
        # The first forward under checkpointing keeps nothing for backward (the recompute will),
        # unless its output is kept for the recompute.
        save = needs_backward and not (phase == "first_forward" and action != "cache_first_forward")
        gpu_output, all_qlens = self._submit_and_compute_gpu(hidden_states, topk_ids, topk_weights, save, phase, action)
        if needs_backward:
            output = KTMoEFunction.apply(
                hidden_states,
                topk_ids,
                topk_weights,
                self.wrapper,
                self._lora_ref(hidden_states, train_lora),
                self.hidden_size,
                self.moe_config.num_experts_per_tok,
                self.layer_idx,
                needs_backward,
                train_lora,
                all_qlens,
                action == "cache_first_forward",
                action == "reuse_recompute",
                *self._base_parameters(),
            )
        else:
            output = no_grad_output(self, hidden_states, all_qlens)
        return output if gpu_output is None else output + gpu_output

    def _lora_ref(self, hidden_states: torch.Tensor, train_lora: bool) -> torch.Tensor:
        """A tensor that needs a gradient whenever the experts train, so KTMoEFunction's backward runs
        (on ranks without the backend too, which own no KT parameter)."""
        if train_lora and self._peft_lora_modules:
            for loras in self._peft_lora_modules.values():
                for lora_a, _ in loras.values():
                    if lora_a.weight.requires_grad:
                        return lora_a.weight
        if train_lora and getattr(self, "_fused_expert_lora_params", None):
            return self._fused_expert_lora_params[0]
        if self._full_weight_grad and getattr(self.wrapper, "gate_proj_buf", None) is not None:
            return self.wrapper.gate_proj_buf
        return hidden_states.new_empty((), requires_grad=train_lora or self._full_weight_grad)

    def _base_parameters(self) -> List[Optional[torch.Tensor]]:
        if not self._full_weight_grad or self.wrapper is None:
            return [None, None, None]
        return [getattr(self.wrapper, f"{name}_proj_buf", None) for name in ("gate", "up", "down")]

    def _submit_and_compute_gpu(self, hidden_states, topk_ids, topk_weights, save, phase="none", action="normal"):
        """Submit the CPU experts' forward (rank 0 gathers every rank's rows) and compute the GPU-side
        experts meanwhile; (their output or None, every rank's qlen or None)."""
        if distributed_on()[0]:
            return distributed_submit(self, hidden_states, topk_ids, topk_weights, save, phase, action)
        self._refresh_backend_weights()
        backend = self.wrapper
        if action == "cache_first_forward":
            check_cache_empty(backend)
        qlen = hidden_states.shape[0] * hidden_states.shape[1]
        k = self.moe_config.num_experts_per_tok
        if action == "reuse_recompute":
            check_cache_ready(backend, qlen)
        else:
            try:
                backend.submit_forward(
                    hidden_states.view(qlen, self.hidden_size).detach(),
                    topk_ids.view(qlen, k).detach(),
                    topk_weights.view(qlen, k).detach(),
                    save_for_backward=save,
                )
            except Exception as error:
                if action == "cache_first_forward":
                    poison_cache(backend, error)
                raise
        try:
            return self._compute_gpu_output(hidden_states), None
        except Exception as error:
            if action != "normal":
                poison_cache(backend, error)
            raise


class KTRoutedExpertsWrapper(KTMoELayerWrapper):
    """Only the routed experts: the model routes and keeps its shared experts (DeepSeek-V4, whose
    routing is 'precomputed')."""

    def __init__(self, original_moe, **kwargs):
        config = kwargs["moe_config"]
        container = nn.Module()
        container.add_module(config.experts_attr, getattr(original_moe, config.experts_attr))
        kwargs["moe_config"] = replace(config, has_shared_experts=False)
        super().__init__(original_moe=container, **kwargs)
        self._is_kt_routed_experts_wrapper = True

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if hidden_states.ndim != 2 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError("KT routed experts require [tokens, hidden_size] activations")
        expected = (hidden_states.shape[0], self.moe_config.num_experts_per_tok)
        if tuple(top_k_index.shape) != expected or tuple(top_k_weights.shape) != expected:
            raise ValueError(f"KT routed experts require routing tensors shaped {expected}")
        return self._forward_routed(hidden_states.unsqueeze(0), top_k_index, top_k_weights).squeeze(0)
