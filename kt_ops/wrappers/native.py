"""NativeMoEWrapper (methods FP8, RAWINT4, MXFP4 and BF16): inference on the experts of a HuggingFace
safetensors checkpoint at `weight_path` as it is stored: pre-quantized (kt_ops.weights.native
documents the layouts and how each becomes a kernel format) or bf16 (BF16SafeTensorLoader's layouts).
Forward, submit_forward/sync_forward, chunked prefill, GPU experts and deferred experts are
AMXMoEWrapper's."""

from __future__ import annotations

import torch

from ..core.packed import check_expert_map, pack_split
from ..weights.loaders import BF16SafeTensorLoader
from ..weights.native import NativeCheckpoint
from .amx import AMXMoEWrapper


class NativeMoEWrapper(AMXMoEWrapper):
    # FP8 keeps the checkpoint's 128-wide blocks as int8 groups; RAWINT4 its 32-wide int4 groups; BF16
    # its weights. load_weights_from_tensors quantizes to the same format.
    METHOD_FORMATS = {
        "FP8": ("int8_kgroup", 128),
        "RAWINT4": ("int4_kgroup", 32),
        "MXFP4": ("fp8", 32),
        "BF16": ("bf16", 128),
    }
    SUPPORTED_METHODS = frozenset(METHOD_FORMATS)

    def __init__(self, *args, method: str = "FP8", **kwargs):
        if kwargs.get("cpu_save"):
            # load_weights_from_tensors would write kt_ops' packed form over the checkpoint at weight_path
            raise ValueError(
                "cpu_save=True is for the AMX methods' online quantization; FP8, RAWINT4, MXFP4 and BF16 read "
                "weight_path as a HuggingFace checkpoint, so it is never overwritten: pass cpu_save=False"
            )
        super().__init__(*args, method=method, **kwargs)

    def load_weights(self, physical_to_logical_map_cpu: torch.Tensor) -> None:
        """Read layer `layer_idx`'s experts from the checkpoint (file, directory or index.json) at
        `weight_path`."""

        mapping = check_expert_map(physical_to_logical_map_cpu, self.num_experts)
        if not self.weight_path:
            raise RuntimeError(
                "weight_path is not set: create the wrapper with weight_path naming the checkpoint, "
                "or call load_weights_from_tensors()"
            )
        if self.method == "BF16":
            gate, up, down = BF16SafeTensorLoader(self.weight_path).load_stacked(f"model.layers.{self.layer_idx}")
            E, H, I = self.num_experts, self.hidden_size, self.moe_intermediate_size
            if tuple(gate.shape) != (E, I, H) or tuple(down.shape) != (E, H, I):
                raise ValueError(
                    f"{self.weight_path}: layer {self.layer_idx} has experts gate {tuple(gate.shape)}, down "
                    f"{tuple(down.shape)}; the wrapper was built for gate {(E, I, H)}, down {(E, H, I)}"
                )
            self._set_parts(pack_split(gate, up, down, "bf16", self.group_size, self.split), mapping)
            return
        for name, size in (("hidden_size", self.hidden_size), ("moe_intermediate_size", self.moe_intermediate_size)):
            if size % self.group_size:
                raise ValueError(f"{name} ({size}) must be a multiple of {self.group_size} for method {self.method}")
        parts = NativeCheckpoint(self.weight_path, self.method).load_layer(
            self.layer_idx,
            self.num_experts,
            self.hidden_size,
            self.moe_intermediate_size,
            self.split,
            self.group_size,
            self.weight_format,
        )
        self._set_parts(parts, mapping)
