"""Loaders for MoE expert weights stored as safetensors.

* `SafeTensorLoader` reads the pre-quantized form written by `packed_io.save_packed_experts`
  (`blk.{L}.ffn_{gate,up,down}_exps.*`), from one file or a directory of them.
* `BF16SafeTensorLoader` reads the float expert weights of a HuggingFace checkpoint (deepseek/qwen,
  mixtral, mistral or transformers-v5 fused key layouts, with or without a `language_model.` prefix).
* KTransformers' converted CPU weights (`blk.{L}.ffn_*_exps.{E}.numa.{N}.weight/.scale`, or its
  `_layer_{L}/_numa_{N}/*.kt` folders) are read by `SafeTensorLoader` too (`kt_ops.weights.ktransformers`
  documents the layout); `load_layer_parts` gives any of these forms as packed experts.

Only a key -> file index is built up front (from `model.safetensors.index.json` or the files'
headers); tensors are read one layer at a time, and every file is opened inside a `with` block, so
no handle outlives a call and a checkpoint far larger than memory can be walked layer by layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..core.checks import check_int
from ..core.formats import PROJECTIONS
from ..core.packed import PackedExperts
from .packed_io import load_packed_experts, packed_key, packed_layers
from .shards import INDEX_NAME, SafeTensorFiles, check_base_key

__all__ = ["INDEX_NAME", "BF16SafeTensorLoader", "SafeTensorLoader", "candidate_bases"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SafeTensorLoader(SafeTensorFiles):
    """The pre-quantized form: `path` is a safetensors file, a directory of them, or a
    `*.index.json` weight map (see SafeTensorFiles)."""

    def __init__(self, path):
        super().__init__(path)
        self._layer_files: Optional[dict[int, str]] = None

    def _packed_layer_files(self) -> dict[int, str]:
        if self._layer_files is None:
            layer_files: dict[int, str] = {}
            for file in sorted(set(self.key_to_file.values())):
                try:
                    file_layers = packed_layers(file)
                except (ValueError, FileNotFoundError):
                    continue  # not a kt_ops file (or a missing shard): it describes no packed layer
                for layer in file_layers:
                    if layer in layer_files:
                        raise ValueError(f"layer {layer} is in both {layer_files[layer]} and {file}")
                    layer_files[layer] = file
            self._layer_files = layer_files
        return self._layer_files

    def _kt_directory(self):
        """The KTransformers view of these files, or None when they hold no KTransformers experts."""
        if not hasattr(self, "_kt"):
            from .ktransformers import WEIGHT_KEY, KTWeightDirectory

            has_kt = any(WEIGHT_KEY.fullmatch(k) for k in self.key_to_file)
            self._kt = KTWeightDirectory(self.path, loader=self) if has_kt else None
        return self._kt

    def layers(self) -> list[int]:
        """Layer indices described by kt_ops metadata in the file(s), else those of KTransformers'
        converted experts."""
        layers = sorted(self._packed_layer_files())
        if not layers and self._kt_directory() is not None:
            return self._kt_directory().layers()
        return layers

    def load_experts(self, base_key: str, device="cpu") -> dict:
        """The packed blobs and scales of `base_key` ("blk.{L}") as stored; a scale is None where
        the file has none (bf16)."""
        m = re.fullmatch(r"blk\.(\d+)", check_base_key(base_key))
        if m is None:
            raise ValueError(f"base_key must look like 'blk.<layer>' for the pre-quantized form, got {base_key!r}")
        layer = int(m.group(1))
        if layer not in self._packed_layer_files() and self._kt_directory() is not None:
            return self._kt_directory().load_experts(layer)
        wanted = {}
        for proj in PROJECTIONS:
            weight_key, scale_key = packed_key(layer, proj, "weight"), packed_key(layer, proj, "scale")
            if weight_key not in self.key_to_file:
                raise KeyError(
                    f"tensor {weight_key!r} is not in {self.path}; available layers: "
                    f"{', '.join(f'blk.{L}' for L in self.layers()) or 'none'}{self._not_found_hint()}"
                )
            wanted[weight_key] = proj
            if scale_key in self.key_to_file:
                wanted[scale_key] = proj + "_scale"
        out = dict.fromkeys((*PROJECTIONS, *(p + "_scale" for p in PROJECTIONS)))
        for key, t in self.iter_tensors(wanted, device):
            out[wanted[key]] = t
        return out

    def load_packed(self, layer_idx: int) -> PackedExperts:
        """The PackedExperts of layer `layer_idx`, described by the file's metadata."""
        check_int(layer_idx, "layer_idx", 0)
        files = self._packed_layer_files()
        if layer_idx not in files and self._kt_directory() is not None:
            return self._kt_directory().layer(layer_idx).packed()
        if layer_idx not in files:
            raise KeyError(
                f"layer {layer_idx} (key {packed_key(layer_idx, 'gate', 'weight')!r}) is not in "
                f"{self.path}; available layers: {sorted(files) or 'none'}{self._not_found_hint()}"
            )
        return load_packed_experts(files[layer_idx], layer_idx)


# Per-expert layouts: the module under the layer and the (gate, up, down) projection names.
_PER_EXPERT_FORMATS = {
    "deepseek": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2")),
    "mistral": ("experts", ("w1", "w3", "w2")),
    "deepseek_v4": ("ffn.experts", ("w1", "w3", "w2")),
}
# Fused layouts: the experts module under the layer (Llama-4's is feed_forward.experts).
_FUSED_MODULES = ("mlp.experts", "feed_forward.experts")
_FUSED_SUFFIXES = ("", ".weight")
_EXPERT_KEY = re.compile(r"(.+)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight")
_FUSED_KEY = re.compile(r"(.+)\.(?:mlp|feed_forward)\.experts\.gate_up_proj(?:\.weight)?")
_LAYER_BASE = re.compile(r"(?:language_model\.)?model\.(?:language_model\.)?layers\.(\d+)")
_FORMATS_TRIED = (
    "deepseek: {b}.mlp.experts.{E}.{gate,up,down}_proj.weight; "
    "mixtral: {b}.block_sparse_moe.experts.{E}.{w1,w3,w2}.weight; "
    "mistral: {b}.experts.{E}.{w1,w3,w2}.weight; "
    "deepseek_v4: {b}.ffn.experts.{E}.{w1,w3,w2}.weight; "
    "transformers-v5 fused: {b}.{mlp,feed_forward}.experts.gate_up_proj / down_proj"
)


def candidate_bases(base_key: str) -> list[str]:
    """The base key itself, then where multimodal checkpoints put the text model's layers."""
    bases = [base_key]
    if base_key.startswith("model."):
        bases.append("model.language_model." + base_key[len("model.") :])
    bases.append("language_model." + base_key)
    return list(dict.fromkeys(bases))


@dataclass(frozen=True)
class Layout:
    fmt: str
    prefix: str
    keys: tuple  # per-expert: ((gate, up, down) key per expert, ...); fused: (gate_up_key, down_key)


class BF16SafeTensorLoader(SafeTensorLoader):
    """Float (bf16/fp16/fp32) expert weights of a HuggingFace checkpoint, `file_path` being its
    directory (sharded or not) or a single .safetensors file. The key layout is detected per layer."""

    MOE_FORMATS = (*_PER_EXPERT_FORMATS, "fused")

    def __init__(self, file_path):
        super().__init__(file_path)
        self._experts_by_prefix: Optional[dict[str, dict[int, set[str]]]] = None

    def _expert_table(self) -> dict[str, dict[int, set[str]]]:
        """{expert-module prefix: {expert id: projection names present}}, from one pass over the keys."""
        if self._experts_by_prefix is None:
            table: dict[str, dict[int, set[str]]] = {}
            for key in self.key_to_file:
                m = _EXPERT_KEY.fullmatch(key)
                if m:
                    table.setdefault(m.group(1), {}).setdefault(int(m.group(2)), set()).add(m.group(3))
            self._experts_by_prefix = table
        return self._experts_by_prefix

    def resolve_layout(self, base_key: str, num_experts: Optional[int] = None) -> "Layout":
        """The layer's key layout. `num_experts`: per-expert keys of higher ids are not the layer's
        experts and are ignored (LongCat-Flash saves gate/up rows, without down, for its identity
        experts)."""
        table = self._expert_table()
        for base in candidate_bases(check_base_key(base_key)):
            for fmt, (module, names) in _PER_EXPERT_FORMATS.items():
                prefix = f"{base}.{module}"
                experts = table.get(prefix, {})
                if num_experts is not None:
                    experts = {e: found for e, found in experts.items() if e < num_experts}
                if any(found & set(names) for found in experts.values()):
                    return self._complete_layout(base_key, fmt, prefix, experts, names)
            for prefix in (f"{base}.{module}" for module in _FUSED_MODULES):
                for suffix in _FUSED_SUFFIXES:
                    gate_up, down = f"{prefix}.gate_up_proj{suffix}", f"{prefix}.down_proj{suffix}"
                    if gate_up in self.key_to_file:
                        if down not in self.key_to_file:
                            raise ValueError(f"layer {base_key!r}: fused experts have {gate_up!r} but no {down!r}")
                        return Layout("fused", prefix, (gate_up, down))
        raise ValueError(
            f"no experts found for base_key {base_key!r} in {self.path}; tried prefixes "
            f"{candidate_bases(base_key)} as {{b}} in formats {_FORMATS_TRIED}{self._not_found_hint()}"
        )

    @staticmethod
    def _complete_layout(base_key, fmt, prefix, experts, names) -> Layout:
        num = max(experts) + 1
        gaps = [e for e in range(num) if e not in experts]
        partial = {
            e: [n for n in names if n not in experts[e]] for e in sorted(experts) if not set(names) <= experts[e]
        }
        if gaps or partial:
            detail = "; ".join(
                filter(
                    None,
                    (
                        f"missing expert ids {gaps}" if gaps else "",
                        f"experts missing projections {partial}" if partial else "",
                    ),
                )
            )
            raise ValueError(
                f"layer {base_key!r} ({fmt} keys under {prefix!r}): experts must be numbered "
                f"0..{num - 1} contiguously, each with {list(names)}; {detail}"
            )
        return Layout(fmt, prefix, tuple(tuple(f"{prefix}.{e}.{n}.weight" for n in names) for e in range(num)))

    def moe_layers(self) -> list[int]:
        """Indices L of `model.layers.{L}` (or its language_model variants) that have experts."""
        bases = {
            prefix[: -len(module) - 1]
            for prefix in self._expert_table()
            for module, _ in _PER_EXPERT_FORMATS.values()
            if prefix.endswith("." + module)
        }
        bases.update(m.group(1) for m in map(_FUSED_KEY.fullmatch, self.key_to_file) if m)
        return sorted({int(m.group(1)) for m in map(_LAYER_BASE.fullmatch, bases) if m})

    def layers(self) -> list[int]:
        return self.moe_layers()

    def num_experts(self, base_key: str) -> int:
        layout = self.resolve_layout(base_key)
        return len(layout.keys) if layout.fmt != "fused" else self._shape(layout.keys[0])[0]

    def _checked(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"tensor {key!r} has dtype {t.dtype}; expert weights must be bf16, fp16 or fp32 "
                f"(dequantize fp8/int checkpoints first)"
            )
        return t

    def _load_fused(self, base_key: str, layout: Layout, device) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up_key, down_key = layout.keys
        loaded = dict(self.iter_tensors(layout.keys, device))
        gate_up, down = self._checked(gate_up_key, loaded[gate_up_key]), self._checked(down_key, loaded[down_key])
        if gate_up.dim() != 3 or gate_up.shape[1] % 2:
            raise ValueError(f"layer {base_key!r}: {gate_up_key!r} must be [E, 2*I, H], got {tuple(gate_up.shape)}")
        E, two_i, H = gate_up.shape
        if tuple(down.shape) != (E, H, two_i // 2):
            raise ValueError(
                f"layer {base_key!r}: {down_key!r} must be [E, H, I] = {(E, H, two_i // 2)} to match "
                f"{gate_up_key!r} {tuple(gate_up.shape)}, got {tuple(down.shape)}"
            )
        return gate_up, down

    def _load_per_expert(self, base_key: str, layout: Layout, device, stacked: bool) -> dict:
        """Per-expert tensors as lists, or (stacked=True) copied straight into [E, ...] tensors so a
        layer never sits in memory twice."""
        slot = {key: (proj, e) for e, triple in enumerate(layout.keys) for proj, key in zip(PROJECTIONS, triple)}
        num = len(layout.keys)
        out: dict = {proj: (None if stacked else [None] * num) for proj in PROJECTIONS}
        first: dict[str, torch.Tensor] = {}
        for key, t in self.iter_tensors(slot, device):
            proj, e = slot[key]
            self._checked(key, t)
            ref = first.setdefault(proj, t)
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(
                    f"layer {base_key!r}: {key!r} is {tuple(t.shape)} {t.dtype}, but other {proj} "
                    f"experts are {tuple(ref.shape)} {ref.dtype}"
                )
            if stacked:
                if out[proj] is None:
                    out[proj] = torch.empty((num, *t.shape), dtype=t.dtype, device=t.device)
                out[proj][e].copy_(t)
            else:
                out[proj][e] = t
        gate, up, down = first["gate"], first["up"], first["down"]
        I, H = gate.shape
        if tuple(up.shape) != (I, H) or tuple(down.shape) != (H, I) or not gate.dtype == up.dtype == down.dtype:
            raise ValueError(
                f"layer {base_key!r}: expert weights must be gate [I, H], up [I, H], down [H, I] "
                f"of one dtype; got gate {tuple(gate.shape)} {gate.dtype}, "
                f"up {tuple(up.shape)} {up.dtype}, down {tuple(down.shape)} {down.dtype}"
            )
        return out

    def load_experts(self, base_key: str, device="cpu") -> dict:
        """{"gate": [[I, H] per expert], "up": [[I, H] ...], "down": [[H, I] ...], "*_scale": None} for
        `base_key` like "model.layers.0", in the stored dtype, on `device`."""
        layout = self.resolve_layout(base_key)
        if layout.fmt == "fused":
            gate_up, down = self._load_fused(base_key, layout, device)
            I = gate_up.shape[1] // 2
            out = {
                "gate": list(gate_up[:, :I].unbind(0)),
                "up": list(gate_up[:, I:].unbind(0)),
                "down": list(down.unbind(0)),
            }
        else:
            out = self._load_per_expert(base_key, layout, device, stacked=False)
        return {**out, "gate_scale": None, "up_scale": None, "down_scale": None}

    def load_projection(
        self,
        base_key: str,
        projection: str,
        device="cpu",
        experts: Optional[range] = None,
        num_experts: Optional[int] = None,
        hidden_major: bool = False,
        interleaved: bool = False,
    ) -> torch.Tensor:
        """One projection of the layer, stacked and contiguous: gate or up [E, I, H], down [E, H, I],
        in the stored dtype; `experts` (a range) limits it to those experts. Reading a layer a
        projection (and a few experts) at a time keeps a fraction of it in memory. `num_experts`:
        see resolve_layout. A fused layout is stored as the model's experts module holds it, which its
        shapes do not always tell (H may equal 2I): `hidden_major` means gate_up [E, H, 2I] and
        down [E, I, H] (gpt-oss, Llama-4), `interleaved` gate and up alternating along 2I (gpt-oss)
        instead of [gate; up]."""
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        layout = self.resolve_layout(base_key, num_experts)
        if layout.fmt == "fused":
            gate_up_key, down_key = layout.keys
            key = down_key if projection == "down" else gate_up_key
            ((_, t),) = self.iter_tensors([key], device)
            t = self._checked(key, t)
            if t.dim() == 3 and hidden_major:
                t = t.transpose(1, 2)
            if projection != "down" and (t.dim() != 3 or t.shape[1] % 2):
                layout_name = "[E, H, 2*I]" if hidden_major else "[E, 2*I, H]"
                raise ValueError(f"layer {base_key!r}: {key!r} must be {layout_name}, got {tuple(t.shape)}")
            if projection != "down":
                which = PROJECTIONS.index(projection)
                t = t[:, which::2] if interleaved else t.chunk(2, dim=1)[which]
            return (t if experts is None else t[experts.start : experts.stop]).contiguous()
        index = PROJECTIONS.index(projection)
        chosen = range(len(layout.keys)) if experts is None else experts
        slot = {layout.keys[e][index]: e - chosen.start for e in chosen}
        out, first = None, None
        for key, t in self.iter_tensors(slot, device):
            self._checked(key, t)
            if out is None:
                out, first = torch.empty((len(slot), *t.shape), dtype=t.dtype, device=t.device), t
            elif t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(
                    f"layer {base_key!r}: {key!r} is {tuple(t.shape)} {t.dtype}, but other {projection} "
                    f"experts are {tuple(first.shape)} {first.dtype}"
                )
            out[slot[key]].copy_(t)
        return out

    def load_stacked(self, base_key: str, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [E, I, H], up [E, I, H], down [E, H, I]), contiguous, in the stored dtype."""
        layout = self.resolve_layout(base_key)
        if layout.fmt == "fused":
            gate_up, down = self._load_fused(base_key, layout, device)
            I = gate_up.shape[1] // 2
            return gate_up[:, :I].contiguous(), gate_up[:, I:].contiguous(), down.contiguous()
        out = self._load_per_expert(base_key, layout, device, stacked=True)
        return out["gate"], out["up"], out["down"]
