"""ExpertSource: one reader over every place a layer's routed experts can come from."""

from __future__ import annotations

import os
from typing import Optional

from .ktransformers import KTWeightDirectory, is_kt_directory
from .loaders import BF16SafeTensorLoader, SafeTensorLoader
from .native import NativeCheckpoint
from .shards import safe_open


class ExpertSource:
    """Where a layer's routed experts come from, decided once per checkpoint: a KTransformers converted
    directory, kt_ops' packed files, a block-FP8 Hugging Face checkpoint (kept as fp8 codes for an fp8
    backend, else requantized to int8_kgroup) or a float one (read a projection and a few experts at
    a time)."""

    def __init__(self, path: str):
        self.path = path
        self.kt = KTWeightDirectory(path) if is_kt_directory(path) else None
        self.packed = None
        self.hf = None
        self.fp8 = None
        if self.kt is None:
            if os.path.isfile(path) or SafeTensorLoader(path).layers():
                self.packed = SafeTensorLoader(path)
            else:
                self.hf = BF16SafeTensorLoader(path)
                first = self.hf.moe_layers()[:1]
                if first and self._is_fp8(first[0]):
                    self.fp8 = NativeCheckpoint(path, "FP8")

    def _is_fp8(self, layer: int) -> bool:
        layout = self.hf.resolve_layout(f"model.layers.{layer}", num_experts=1)  # expert 0 tells
        key = layout.keys[0] if layout.fmt == "fused" else layout.keys[0][0]
        file = self.hf.key_to_file[key]
        with safe_open(file) as f:
            return f.get_slice(key).get_dtype() in ("F8_E4M3", "F8_E5M2")

    def is_quantized_source(self) -> bool:
        return self.hf is None or self.fp8 is not None

    def packed_layer(self, layer: int, E: int, H: int, I: int, weight_format: Optional[str] = None):
        """PackedExperts of `layer`, for pre-quantized sources. `weight_format` is the backend's: with
        'fp8' a block-FP8 checkpoint's codes are kept exactly; otherwise they become int8_kgroup."""
        if self.kt is not None:
            full = self.kt.layer(layer).packed()
        elif self.fp8 is not None:
            fmt = "fp8" if weight_format == "fp8" else "int8_kgroup"
            full = self.fp8.load_layer(layer, E, H, I, [(0, I)], 128, weight_format=fmt)[0]
        else:
            full = self.packed.load_packed(layer)
        if full.num_experts != E or (full.hidden_size, full.intermediate_size) != (H, I):
            raise ValueError(
                f"{self.path}: layer {layer} holds {full.num_experts} experts of hidden {full.hidden_size} "
                f"/ intermediate {full.intermediate_size}; the model needs {E} of {H} / {I}"
            )
        return full

    def projection_reader(
        self,
        layer: int,
        projection: str,
        num_experts: Optional[int] = None,
        hidden_major: bool = False,
        interleaved: bool = False,
    ):
        """read(lo, hi): experts [lo, hi) of one projection of a float checkpoint's layer (gate/up
        [n, I, H], down [n, H, I]). Per-expert keys are read a chunk at a time; a fused tensor is
        one tensor, read once. The keywords describe the layer as BF16SafeTensorLoader.load_projection
        says."""
        base = f"model.layers.{layer}"
        layout = dict(num_experts=num_experts, hidden_major=hidden_major, interleaved=interleaved)
        if self.hf.resolve_layout(base, num_experts).fmt == "fused":
            whole = self.hf.load_projection(base, projection, **layout)
            return lambda lo, hi: whole[lo:hi]
        return lambda lo, hi: self.hf.load_projection(base, projection, experts=range(lo, hi), **layout)
