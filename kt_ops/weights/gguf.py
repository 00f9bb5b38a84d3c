"""Expert weights from GGUF files (llama.cpp's format), for LlamafileMoEWrapper.

Which kernel format each GGUF type becomes (all K-group formats use groups of 32 along K, the
GGUF block size, so no block straddles a group):

    Q8_0        -> int8_kgroup     exact: the block's int8 codes with its fp16 scale
    Q8_K        -> int8_kgroup     exact: the 256-block's fp32 scale repeated over its 8 groups
    Q4_0        -> int4_kgroup     exact: u = q, w = (u - 8) * d
    Q4_1        -> int4_1_kgroup   exact: u = q, w = u * d + m
    Q4_K        -> int4_1_kgroup   exact: sub-block scale d * sc, min -dmin * m
    Q5_K, Q6_K  -> int8_kgroup     requantized from gguf's dequantized fp32 values
    F32, F16, BF16 -> bf16

A PackedExperts holds one format for gate, up and down, but GGUF mixes (Q4_K_M stores down as
Q6_K). When the three projections' formats differ the layer takes one that holds them all: bf16 if
any projection is a float type; otherwise int8_kgroup, where int4_kgroup codes stay exact (code
u - 8, same scale) and int4_1_kgroup blocks are requantized.

The files are memory-mapped (gguf.GGUFReader); a projection is decoded a few experts at a
time, so the fp32 working copies stay a few experts large whatever the layer size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.formats import PROJECTIONS
from ..core.packed import PackedExperts, quantize_int8_groups

GROUP_SIZE = 32


def _gguf():
    try:
        import gguf
    except ImportError as error:  # pragma: no cover - setup.sh installs it
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from error
    return gguf


def _types():
    t = _gguf().GGMLQuantizationType
    return {
        t.Q8_0: "int8_kgroup",
        t.Q8_K: "int8_kgroup",
        t.Q4_0: "int4_kgroup",
        t.Q4_1: "int4_1_kgroup",
        t.Q4_K: "int4_1_kgroup",
        t.Q5_K: "int8_kgroup",
        t.Q6_K: "int8_kgroup",
        t.F32: "bf16",
        t.F16: "bf16",
        t.BF16: "bf16",
    }


SUPPORTED_TYPES = ("Q8_0", "Q8_K", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "F32", "F16", "BF16")


def layer_format(types: Sequence) -> str:
    """The kernel format of a layer whose gate/up/down have these GGUF types (see module docstring)."""
    table = _types()
    formats = {table[t] for t in types}
    if len(formats) == 1:
        return formats.pop()
    return "bf16" if "bf16" in formats else "int8_kgroup"


@dataclass
class _Decoded:
    """One projection for a range of experts: exact codes in `fmt`, or fp32 `values`."""

    fmt: str
    codes: Optional[torch.Tensor] = None
    scales: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None

    def dequantized(self) -> torch.Tensor:
        if self.values is not None:
            return self.values
        E, N, K = self.codes.shape
        codes = self.codes.float().view(E, N, K // GROUP_SIZE, GROUP_SIZE)
        if self.fmt == "int8_kgroup":
            w = codes * self.scales[..., None]
        elif self.fmt == "int4_kgroup":
            w = (codes - 8) * self.scales[..., None]
        else:
            w = codes * self.scales[..., 0, None] + self.scales[..., 1, None]
        return w.view(E, N, K)

    def narrow(self, dim: int, lo: int, hi: int) -> "_Decoded":
        """Rows (dim 1) or columns (dim 2) lo:hi; column bounds fall on group boundaries."""
        if self.values is not None:
            return _Decoded(self.fmt, values=self.values.narrow(dim, lo, hi - lo))
        scales = (
            self.scales.narrow(dim, lo, hi - lo)
            if dim == 1
            else self.scales.narrow(2, lo // GROUP_SIZE, (hi - lo) // GROUP_SIZE)
        )
        return _Decoded(self.fmt, codes=self.codes.narrow(dim, lo, hi - lo), scales=scales)

    def pack(self, target: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(blob, scales) in kernel format `target`."""
        if target == "bf16":
            blob, _ = torch.ops.kt.pack_weights(self.dequantized().contiguous(), "bf16", GROUP_SIZE)
            return blob, None
        if self.codes is not None and self.fmt == target:
            return torch.ops.kt.pack_codes(self.codes.contiguous(), self.scales.contiguous(), target)
        if self.codes is not None and self.fmt == "int4_kgroup" and target == "int8_kgroup":
            return torch.ops.kt.pack_codes(
                (self.codes.to(torch.int16) - 8).contiguous(), self.scales.contiguous(), target
            )
        if target == "int8_kgroup":  # the kernel's rule, vectorized here (much faster than pack_weights)
            return torch.ops.kt.pack_codes(*quantize_int8_groups(self.dequantized(), GROUP_SIZE), target)
        return torch.ops.kt.pack_weights(self.dequantized().contiguous(), target, GROUP_SIZE)


def _fp16(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).astype(np.float32)).squeeze(-1)


def _decode(data: np.ndarray, qtype, shape: Tuple[int, int, int]) -> _Decoded:
    """Decode GGUF blocks `data` ([E, N, bytes per row], uint8 for block types) of [E, N, K] weights."""
    gguf = _gguf()
    t = gguf.GGMLQuantizationType
    E, N, K = shape
    if qtype in (t.F32, t.F16):
        return _Decoded("bf16", values=torch.from_numpy(np.array(data, dtype=np.float32)).reshape(E, N, K))
    if qtype == t.BF16:
        bits = np.ascontiguousarray(data).view(np.int16).reshape(E, N, K)
        return _Decoded("bf16", values=torch.from_numpy(bits.copy()).view(torch.bfloat16).float())
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(data).reshape(E, N, K // block_elems, block_bytes)
    if qtype == t.Q8_0:
        scales = _fp16(blocks[..., 0:2])
        codes = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8))
        return _Decoded("int8_kgroup", codes=codes.reshape(E, N, K), scales=scales)
    if qtype == t.Q8_K:
        # fp32 d, 256 int8 codes, then 16 int16 partial sums that only matter to llama.cpp's dot products
        d = torch.from_numpy(np.ascontiguousarray(blocks[..., 0:4]).view(np.float32)).squeeze(-1)
        codes = torch.from_numpy(np.ascontiguousarray(blocks[..., 4 : 4 + block_elems]).view(np.int8))
        scales = d.repeat_interleave(block_elems // GROUP_SIZE, dim=-1)
        return _Decoded("int8_kgroup", codes=codes.reshape(E, N, K), scales=scales)
    if qtype in (t.Q4_0, t.Q4_1):
        head = 2 if qtype == t.Q4_0 else 4
        packed = torch.from_numpy(np.ascontiguousarray(blocks[..., head:]))
        # element j of a block sits in the low nibble of byte j, element j + 16 in its high nibble
        codes = torch.cat((packed & 0x0F, packed >> 4), dim=-1).reshape(E, N, K)
        if qtype == t.Q4_0:
            return _Decoded("int4_kgroup", codes=codes, scales=_fp16(blocks[..., 0:2]))
        scales = torch.stack((_fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])), dim=-1)
        return _Decoded("int4_1_kgroup", codes=codes, scales=scales)
    if qtype == t.Q4_K:
        return _decode_q4_k(blocks, (E, N, K))
    if qtype in (t.Q5_K, t.Q6_K):
        values = gguf.quants.dequantize(np.ascontiguousarray(data), qtype)
        return _Decoded(_types()[qtype], values=torch.from_numpy(np.asarray(values, np.float32)).reshape(E, N, K))
    raise ValueError(f"GGUF tensor type {t(qtype).name} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")


def _decode_q4_k(blocks: np.ndarray, shape: Tuple[int, int, int]) -> _Decoded:
    """Q4_K super-block (256 weights, 144 bytes): fp16 d, fp16 dmin, 12 bytes of eight 6-bit scales and
    eight 6-bit mins, 128 bytes of nibbles. Sub-block j (32 weights) is w = (d * sc_j) * q - dmin * m_j,
    i.e. int4_1_kgroup with scale d * sc_j and min -dmin * m_j: exact, no requantization."""
    E, N, K = shape
    d, dmin = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])
    packed_scales = torch.from_numpy(np.ascontiguousarray(blocks[..., 4:16])).to(torch.int32)
    lo, mid, hi = packed_scales[..., 0:4], packed_scales[..., 4:8], packed_scales[..., 8:12]
    # sub-blocks 0-3 keep their 6 bits in bytes 0-3 (scale) and 4-7 (min); sub-blocks 4-7 take their
    # low 4 bits from bytes 8-11 and their top 2 bits from the spare top bits of bytes 0-7
    sc = torch.cat((lo & 63, (hi & 15) | ((lo >> 6) << 4)), dim=-1).float()
    mins = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=-1).float()
    scales = torch.stack((d[..., None] * sc, -(dmin[..., None] * mins)), dim=-1)  # [E, N, blocks, 8, 2]
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., 16:])).view(E, N, K // 256, 4, 1, 32)
    # byte chunk c holds sub-block 2c in its low nibbles and sub-block 2c + 1 in its high nibbles
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-2).reshape(E, N, K)
    return _Decoded("int4_1_kgroup", codes=codes, scales=scales.reshape(E, N, K // GROUP_SIZE, 2))


class GGUFLoader:
    """`path`: a .gguf file, or a directory whose .gguf files (e.g. the -0000i-of-0000n splits of one
    model) are read together."""

    def __init__(self, path):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"weight_path must be a str or os.PathLike naming a .gguf file or a directory of "
                f"them, got {type(path).__name__}"
            )
        path = os.fspath(path)
        if os.path.isdir(path):
            files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".gguf"))
            if not files:
                raise FileNotFoundError(f"weight_path {path!r} is a directory without .gguf files")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise FileNotFoundError(f"weight_path {path!r} does not exist")
        self.path = path
        reader_cls = _gguf().GGUFReader
        self._tensors: Dict[str, object] = {}
        for file in files:
            try:
                reader = reader_cls(file)
            except Exception as error:
                raise ValueError(f"{file} is not a readable GGUF file: {error}") from error
            for tensor in reader.tensors:
                if tensor.name in self._tensors:
                    raise ValueError(f"tensor {tensor.name!r} appears in more than one file under {path}")
                self._tensors[tensor.name] = tensor

    def keys(self) -> List[str]:
        return list(self._tensors)

    def expert_tensor(self, layer_idx: int, projection: str):
        name = f"blk.{layer_idx}.ffn_{projection}_exps.weight"
        if name not in self._tensors:
            raise ValueError(
                f"{self.path} has no tensor {name!r} (the experts of layer {layer_idx}); "
                f"layers with experts: {self.expert_layers()}"
            )
        return self._tensors[name]

    def expert_layers(self) -> List[int]:
        layers = set()
        for name in self._tensors:
            parts = name.split(".")
            if len(parts) == 4 and parts[0] == "blk" and parts[2] == "ffn_gate_exps":
                layers.add(int(parts[1]))
        return sorted(layers)

    @staticmethod
    def torch_shape(tensor) -> Tuple[int, ...]:
        # GGUF lists dimensions innermost first (ne0 = K); torch lists them outermost first.
        return tuple(int(d) for d in reversed(tensor.shape.tolist()))

    def load_layer(
        self,
        layer_idx: int,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        split: Sequence[Tuple[int, int]] = None,
        chunk_elements: int = 1 << 26,
    ) -> List[PackedExperts]:
        """Layer `layer_idx`'s experts as PackedExperts, one per intermediate range of `split`
        (default: the whole range). Range bounds must be multiples of 32. Experts are decoded in
        chunks of about `chunk_elements` weights (256 MiB as fp32), at least one expert each."""
        E, H, I = num_experts, hidden_size, intermediate_size
        split = list(split) if split is not None else [(0, I)]
        tensors = {p: self.expert_tensor(layer_idx, p) for p in PROJECTIONS}
        table = _types()
        for p, tensor in tensors.items():
            if tensor.tensor_type not in table:
                raise ValueError(
                    f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which is not "
                    f"supported; supported: {', '.join(SUPPORTED_TYPES)}"
                )
            want = (E, H, I) if p == "down" else (E, I, H)
            got = self.torch_shape(tensor)
            if got != want:
                raise ValueError(
                    f"GGUF tensor {tensor.name!r} has shape {list(got)} (torch order); the wrapper was built for "
                    f"{list(want)} (num_experts, "
                    f"{'hidden, intermediate' if p == 'down' else 'intermediate, hidden'})"
                )
        if H % GROUP_SIZE or I % GROUP_SIZE:
            raise ValueError(
                f"hidden_size ({H}) and moe_intermediate_size ({I}) must be multiples of {GROUP_SIZE} for GGUF experts"
            )
        target = layer_format([tensors[p].tensor_type for p in PROJECTIONS])
        packed = {p: [[] for _ in split] for p in PROJECTIONS}
        scales = {p: [[] for _ in split] for p in PROJECTIONS}
        for p in PROJECTIONS:
            tensor = tensors[p]
            shape = self.torch_shape(tensor)
            expert_chunk = max(1, chunk_elements // (shape[1] * shape[2]))
            for start in range(0, E, expert_chunk):
                stop = min(start + expert_chunk, E)
                decoded = _decode(tensor.data[start:stop], tensor.tensor_type, (stop - start, *shape[1:]))
                for part, (lo, hi) in enumerate(split):
                    piece = decoded.narrow(2 if p == "down" else 1, lo, hi) if len(split) > 1 else decoded
                    blob, scale = piece.pack(target)
                    packed[p][part].append(blob)
                    scales[p][part].append(scale)
        result = []
        for part, (lo, hi) in enumerate(split):
            cat = lambda items: None if items[0] is None else torch.cat(items)  # noqa: E731
            result.append(
                PackedExperts(
                    cat(packed["gate"][part]),
                    cat(packed["up"][part]),
                    cat(packed["down"][part]),
                    cat(scales["gate"][part]),
                    cat(scales["up"][part]),
                    cat(scales["down"][part]),
                    target,
                    E,
                    H,
                    hi - lo,
                )
            )
        return result
