"""LlamafileMoEWrapper (method LLAMAFILE): inference on experts read from GGUF files. The GGUF types
map to kernel formats as kt_ops.weights.gguf documents (Q8_0 / Q4_0 / Q4_1 / Q8_K exactly, the other
K-quants requantized, float types as bf16); forward, submit_forward/sync_forward, chunked prefill,
GPU experts and deferred experts are AMXMoEWrapper's."""

from __future__ import annotations

from typing import Optional

import torch

from ..core.packed import check_expert_map
from ..weights.gguf import GGUFLoader
from .amx import AMXMoEWrapper


class LlamafileMoEWrapper(AMXMoEWrapper):
    # load_weights_from_tensors quantizes like Q8_0 (int8 per 32-wide group); GGUF files bring their own.
    # Splits across sub-pools fall on multiples of 32, the GGUF block, so every part stays exact.
    METHOD_FORMATS = {"LLAMAFILE": ("int8_kgroup", 32)}
    SUPPORTED_METHODS = frozenset(METHOD_FORMATS)

    def __init__(self, *args, method: str = "LLAMAFILE", **kwargs):
        if kwargs.get("cpu_save"):
            # load_weights_from_tensors would write kt_ops' packed form over the checkpoint at weight_path
            raise ValueError(
                "cpu_save=True is for the AMX methods' online quantization; LLAMAFILE reads weight_path as GGUF, so "
                "it is never overwritten: pass cpu_save=False"
            )
        super().__init__(*args, method=method, **kwargs)

    def load_weights(self, physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """Read blk.{layer_idx}.ffn_{gate,up,down}_exps.weight from the .gguf file or directory of
        .gguf files at `weight_path`; no map means identity (as kt-kernel)."""

        if physical_to_logical_map_cpu is None:
            physical_to_logical_map_cpu = torch.arange(self.num_experts)
        mapping = check_expert_map(physical_to_logical_map_cpu, self.num_experts)
        if not self.weight_path:
            raise RuntimeError(
                "weight_path is not set: create the wrapper with weight_path naming a .gguf file or "
                "a directory of them, or call load_weights_from_tensors()"
            )
        parts = GGUFLoader(self.weight_path).load_layer(
            self.layer_idx, self.num_experts, self.hidden_size, self.moe_intermediate_size, self.split
        )
        self._set_parts(parts, mapping)
