"""KTransformers' (kt-kernel's) converted CPU weights: the AMX INT8 / INT4 layouts its converter writes.

`kt-kernel/scripts/convert_cpu_weights.py --quant-method int8|int4` quantizes each expert matrix
W [n, k] (gate/up: n = intermediate rows of one NUMA part, k = hidden; down: n = hidden, k = the
part's intermediate columns) with kt-kernel's `BufferB::from_mat` and stores, per layer L, projection
P in {gate, up, down}, expert E and NUMA part N:

    blk.{L}.ffn_{P}_exps.{E}.numa.{N}.weight   int8, 1-D: the packed codes (n*k bytes INT8, n*k/2 INT4)
    blk.{L}.ffn_{P}_exps.{E}.numa.{N}.scale    fp32, 1-D [n]: one scale per row

one safetensors shard per layer plus `model.safetensors.index.json` (non-expert tensors renamed
`model.layers.` -> `blk.`, `model.` -> ``). With `--no-merge-safetensor` the same bytes stay in
`_layer_{L}/_numa_{N}/{INT8|INT4}_{P}_{E}_{bytes}Byte_{quant|scale}_.kt` files.

NUMA part N of `threadpool_count` parts holds intermediate rows [N*I/parts, (N+1)*I/parts) of gate and
up and the same columns of down (each part quantized on its own, so down has one scale per row and
part).

Quantization (symmetric, per row): INT8 d = max|w| / 127, q = round(w / d) saturated to int8,
w = q * d. INT4 d = max|w| / 112, the int8 code rounded to a multiple of 16 (c = nearest of
round(w / d) / 16 in [-8, 7]), w = c * 16 * d. Both are exactly kt_ops' `int8` and `int4` formats
(int4: u = c + 8, scale = 16 d), so they are repacked code for code, never requantized.

Packed order: rows in blocks of N_BLOCK (64 INT8, 128 INT4), each block's k in blocks of 3584, then
32-row steps, then k steps of 64 bytes; a 32 x 64-byte tile is two 16-row halves, each stored as the
16 x 16 transpose of 4-byte words. INT4 bytes hold element j of a 128-wide k step in the low nibble
and element 64 + j in the high nibble (two's complement nibbles).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..core.formats import PROJECTIONS
from ..core.packed import pack_experts_from_codes, pack_split, unpack_experts
from .shards import SafeTensorFiles

N_STEP = 32
K_BLOCK = 3584
TILE_BYTES = 64  # bytes of one k step in the byte matrix
N_BLOCK = {"INT8": 64, "INT4": 128}
KT_METHODS = ("INT8", "INT4")

WEIGHT_KEY = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.(\d+)\.numa\.(\d+)\.(weight|scale|qzeros)")
KT_FILE = re.compile(r"(INT8|INT4|BF16|[A-Z0-9_]+?)_(gate|up|down)_(\d+)_(\d+)Byte_(quant|scale)_\.kt")


def _check_geometry(n: int, k: int, method: str) -> None:
    if method not in KT_METHODS:
        raise ValueError(f"method must be one of {KT_METHODS}, got {method!r}")
    k_unit = 64 if method == "INT8" else 128
    if n % N_STEP or k % k_unit:
        raise ValueError(
            f"kt-kernel's {method} layout needs rows a multiple of {N_STEP} and columns a multiple "
            f"of {k_unit}; got a [{n}, {k}] matrix"
        )


def _blocks(n: int, kb: int, method: str):
    """(row0, rows, byte-col0, byte-cols) of each block, in storage order."""
    n_block, k_block = N_BLOCK[method], K_BLOCK if method == "INT8" else K_BLOCK // 2
    for r0 in range(0, n, n_block):
        for c0 in range(0, kb, k_block):
            yield r0, min(n_block, n - r0), c0, min(k_block, kb - c0)


def pack_layout(byte_matrix: torch.Tensor, method: str) -> torch.Tensor:
    """[n, kb] uint8 byte matrix -> the 1-D stored order."""
    n, kb = byte_matrix.shape
    chunks = []
    for r0, rows, c0, cols in _blocks(n, kb, method):
        block = byte_matrix[r0 : r0 + rows, c0 : c0 + cols]
        # (row step, half, row, k step, word, byte) -> (row step, k step, half, word, row, byte)
        tiles = block.reshape(rows // N_STEP, 2, 16, cols // TILE_BYTES, 16, 4).permute(0, 3, 1, 4, 2, 5)
        chunks.append(tiles.reshape(-1))
    return torch.cat(chunks)


def unpack_layout(stored: torch.Tensor, n: int, kb: int, method: str) -> torch.Tensor:
    """The 1-D stored order -> the [n, kb] uint8 byte matrix."""
    out = torch.empty((n, kb), dtype=torch.uint8)
    flat = stored.reshape(-1).view(torch.uint8)
    offset = 0
    for r0, rows, c0, cols in _blocks(n, kb, method):
        tiles = flat[offset : offset + rows * cols].reshape(rows // N_STEP, cols // TILE_BYTES, 2, 16, 16, 4)
        out[r0 : r0 + rows, c0 : c0 + cols] = tiles.permute(0, 2, 4, 1, 3, 5).reshape(rows, cols)
        offset += rows * cols
    return out


def _nibbles_to_bytes(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes c in [-8, 7], [n, k] -> [n, k/2] bytes: per 128-wide step, j low, 64 + j high."""
    n, k = codes.shape
    c = (codes.to(torch.int16) & 0xF).reshape(n, k // 128, 2, 64)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).to(torch.uint8).reshape(n, k // 2)


def _bytes_to_nibbles(byte_matrix: torch.Tensor) -> torch.Tensor:
    n, kb = byte_matrix.shape
    b = byte_matrix.to(torch.int16).reshape(n, kb // 64, 64)
    lo, hi = b & 0xF, b >> 4
    c = torch.stack((lo, hi), dim=2).reshape(n, kb * 2)
    return torch.where(c >= 8, c - 16, c).to(torch.int8)


def quantize(weight: torch.Tensor, method: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """kt-kernel's from_mat on one [n, k] matrix: (stored int8 1-D, scales fp32 [n])."""
    n, k = weight.shape
    _check_geometry(n, k, method)
    w = weight.to(torch.bfloat16).float()  # kt-kernel quantizes bf16 input
    d = w.abs().amax(dim=1) / (127.0 if method == "INT8" else 112.0)
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.round(w * inv[:, None]).clamp_(-128, 127)  # cvtps_epi32 (nearest even), saturating pack
    if method == "INT8":
        byte_matrix = q.to(torch.int8).view(torch.uint8)
    else:
        sign = torch.where(q < 0, -1.0, 1.0)
        c = sign * torch.div(q.abs() + 8, 16, rounding_mode="floor")
        c = torch.where(c > 7, c - 16, c)  # the 0x80 byte kt-kernel's rounding can produce
        byte_matrix = _nibbles_to_bytes(c.to(torch.int8))
    return pack_layout(byte_matrix, method).view(torch.int8), d


def codes(stored: torch.Tensor, n: int, k: int, method: str) -> torch.Tensor:
    """Signed codes [n, k] (int8: q; int4: c in [-8, 7]) of one stored matrix."""
    _check_geometry(n, k, method)
    kb = k if method == "INT8" else k // 2
    if stored.numel() * stored.element_size() != n * kb:
        raise ValueError(
            f"a [{n}, {k}] {method} matrix has {n * kb} packed bytes, got {stored.numel() * stored.element_size()}"
        )
    byte_matrix = unpack_layout(stored.contiguous().view(torch.uint8), n, kb, method)
    return byte_matrix.view(torch.int8) if method == "INT8" else _bytes_to_nibbles(byte_matrix)


def dequantize(stored: torch.Tensor, scale: torch.Tensor, n: int, k: int, method: str) -> torch.Tensor:
    """The fp32 [n, k] values a stored matrix stands for (kt-kernel's to_mat before bf16 rounding)."""
    step = 1.0 if method == "INT8" else 16.0
    return codes(stored, n, k, method).float() * (scale.float() * step)[:, None]


# ---- writing a directory the way convert_cpu_weights.py does (tests, benchmarks) ------------------


def convert_layer(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, layer_idx: int, method: str, numa_parts: int = 1
) -> Dict[str, torch.Tensor]:
    """The tensors convert_cpu_weights.py writes for one layer of [E, I, H], [E, I, H], [E, H, I]
    weights split over `numa_parts` parts."""
    E, I, H = gate.shape
    if I % numa_parts:
        raise ValueError(f"numa_parts ({numa_parts}) must divide the intermediate size ({I})")
    Ip = I // numa_parts
    out = {}
    for e in range(E):
        for part in range(numa_parts):
            lo, hi = part * Ip, (part + 1) * Ip
            for proj, w in (("gate", gate[e, lo:hi]), ("up", up[e, lo:hi]), ("down", down[e, :, lo:hi])):
                stored, scale = quantize(w, method)
                out[f"blk.{layer_idx}.ffn_{proj}_exps.{e}.numa.{part}.weight"] = stored
                out[f"blk.{layer_idx}.ffn_{proj}_exps.{e}.numa.{part}.scale"] = scale
    return out


# ---- reading ---------------------------------------------------------------------------------------


class KTLayer:
    """One layer's stored matrices: {(proj, expert, part): (weight, scale)} plus the geometry read
    from them (scale lengths give the rows, byte counts the method)."""

    def __init__(
        self,
        layer_idx: int,
        tensors: Dict[Tuple[str, int, int], Tuple[torch.Tensor, torch.Tensor]],
        source: str,
        method: Optional[str] = None,
    ):
        self.layer_idx, self.source = layer_idx, source
        experts = sorted({e for _, e, _ in tensors})
        parts = sorted({p for _, _, p in tensors})
        self.num_experts, self.num_parts = len(experts), len(parts)
        if experts != list(range(self.num_experts)) or parts != list(range(self.num_parts)):
            raise ValueError(
                f"{source}: layer {layer_idx} must have experts 0..E-1 and NUMA parts 0..N-1, got "
                f"experts {experts[:4]}{'...' if len(experts) > 4 else ''} and parts {parts}"
            )
        missing = [
            f"blk.{layer_idx}.ffn_{p}_exps.{e}.numa.{n}"
            for p in PROJECTIONS
            for e in experts
            for n in parts
            if (p, e, n) not in tensors
        ]
        if missing:
            raise ValueError(
                f"{source}: layer {layer_idx} lacks {missing[0]}.weight/.scale ({len(missing)} matrices missing)"
            )
        gate_w, gate_s = tensors[("gate", 0, 0)]
        down_w, down_s = tensors[("down", 0, 0)]
        self.part_rows, self.hidden_size = gate_s.numel(), down_s.numel()
        self.intermediate_size = self.part_rows * self.num_parts
        nbytes = gate_w.numel() * gate_w.element_size()
        found = {self.part_rows * self.hidden_size: "INT8", self.part_rows * self.hidden_size // 2: "INT4"}.get(nbytes)
        if found is None:
            raise ValueError(
                f"{source}: layer {layer_idx}: gate weight has {nbytes} bytes for a "
                f"[{self.part_rows}, {self.hidden_size}] matrix: neither INT8 ({self.part_rows * self.hidden_size}) "
                f"nor INT4 ({self.part_rows * self.hidden_size // 2}); kt_ops reads the AMX INT8/INT4 "
                "layouts (not moe_int8/moe_int4 or AWQ)"
            )
        if method is not None and method != found:
            raise ValueError(f"{source}: layer {layer_idx}: files are named {method} but hold {found} sizes")
        self.method = found
        self.tensors = tensors

    def split(self) -> List[Tuple[int, int]]:
        return [(p * self.part_rows, (p + 1) * self.part_rows) for p in range(self.num_parts)]

    def _codes_scales(self, proj: str, part: int, experts: Sequence[int]):
        n, k = (self.part_rows, self.hidden_size) if proj != "down" else (self.hidden_size, self.part_rows)
        cs, ss = [], []
        for e in experts:
            w, s = self.tensors[(proj, e, part)]
            if s.numel() != n:
                raise ValueError(
                    f"{self.source}: blk.{self.layer_idx}.ffn_{proj}_exps.{e}.numa.{part}.scale has "
                    f"{s.numel()} entries, expected {n}"
                )
            c = codes(w, n, k, self.method)
            if self.method == "INT8":
                cs.append(c)
                ss.append(s.float())
            else:
                cs.append((c.to(torch.int16) + 8).to(torch.uint8))
                ss.append(s.float() * 16.0)
        return torch.stack(cs), torch.stack(ss)[:, :, None]

    def packed_parts(self, experts: Optional[Sequence[int]] = None):
        """One PackedExperts per NUMA part (kt_ops `int8` / `int4`, code for code), experts in
        the order given (default: all, logical order)."""

        experts = list(range(self.num_experts)) if experts is None else list(experts)
        fmt = "int8" if self.method == "INT8" else "int4"
        return [
            pack_experts_from_codes(*(self._codes_scales(p, part, experts) for p in PROJECTIONS), fmt)
            for part in range(self.num_parts)
        ]

    def packed(self, experts: Optional[Sequence[int]] = None):
        """One PackedExperts for the whole layer. One part: `int8` / `int4`. Several: down's scales
        differ per part, so the layer is stored as `int8_kgroup` / `int4_kgroup` with one group per
        row for gate/up and one per part for down: still code for code."""

        experts = list(range(self.num_experts)) if experts is None else list(experts)
        if self.num_parts == 1:
            return self.packed_parts(experts)[0]
        per_part = [{p: self._codes_scales(p, part, experts) for p in PROJECTIONS} for part in range(self.num_parts)]
        gate, up = (
            (torch.cat([pp[p][0] for pp in per_part], 1), torch.cat([pp[p][1] for pp in per_part], 1))
            for p in ("gate", "up")
        )
        down = (torch.cat([pp["down"][0] for pp in per_part], 2), torch.cat([pp["down"][1] for pp in per_part], 2))
        fmt = "int8_kgroup" if self.method == "INT8" else "int4_kgroup"
        return pack_experts_from_codes(gate, up, down, fmt)


def is_kt_directory(path) -> bool:
    """Whether `path` holds KTransformers' converted CPU experts (merged safetensors or .kt folders)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    if glob.glob(os.path.join(path, "_layer_*", "_numa_*", "*.kt")):
        return True
    try:
        keys = SafeTensorFiles(path).keys()
    except (FileNotFoundError, ValueError):
        return False
    return any(WEIGHT_KEY.fullmatch(k) for k in keys)


class KTWeightDirectory:
    """Reads layers of a KTransformers converted directory, one layer at a time."""

    def __init__(self, path, loader=None):
        self.path = os.fspath(path)
        self._kt_folders = sorted(glob.glob(os.path.join(self.path, "_layer_*")))
        self._by_layer: Dict[int, Dict[Tuple[str, int, int, str], str]] = {}
        self.loader = None
        if any(glob.glob(os.path.join(d, "_numa_*", "*.kt")) for d in self._kt_folders):
            return
        self.loader = loader if loader is not None else SafeTensorFiles(self.path)
        for key in self.loader.keys():
            m = WEIGHT_KEY.fullmatch(key)
            if m:
                if m.group(5) == "qzeros":
                    raise ValueError(
                        f"{self.path} holds {key}: an AWQ conversion (column-major int4 with zero "
                        "points), which kt_ops does not read; convert with --quant-method int8 or int4"
                    )
                self._by_layer.setdefault(int(m.group(1)), {})[
                    (m.group(2), int(m.group(3)), int(m.group(4)), m.group(5))
                ] = key
        if not self._by_layer:
            raise ValueError(
                f"{self.path} has no blk.{{L}}.ffn_{{gate,up,down}}_exps.{{E}}.numa.{{N}}.weight keys "
                "nor _layer_{L}/_numa_{N}/*.kt files: not a KTransformers converted directory"
            )

    def layers(self) -> List[int]:
        if self.loader is None:
            return sorted(
                int(os.path.basename(d)[len("_layer_") :])
                for d in self._kt_folders
                if os.path.basename(d)[len("_layer_") :].isdigit()
            )
        return sorted(self._by_layer)

    def layer(self, layer_idx: int) -> KTLayer:
        if self.loader is None:
            return self._layer_from_kt_files(layer_idx)
        keys = self._by_layer.get(layer_idx)
        if keys is None:
            raise KeyError(
                f"layer {layer_idx} (blk.{layer_idx}.ffn_*_exps.*) is not in {self.path}; "
                f"available layers: {self.layers()}"
            )
        loaded = dict(self.loader.iter_tensors(keys.values(), "cpu"))
        tensors: Dict[Tuple[str, int, int], list] = {}
        for (proj, e, part, kind), key in keys.items():
            tensors.setdefault((proj, e, part), [None, None])[kind == "scale"] = loaded[key]
        incomplete = [k for k, v in tensors.items() if v[0] is None or v[1] is None]
        if incomplete:
            p, e, n = incomplete[0]
            raise ValueError(f"{self.path}: blk.{layer_idx}.ffn_{p}_exps.{e}.numa.{n} needs both .weight and .scale")
        return KTLayer(layer_idx, {k: tuple(v) for k, v in tensors.items()}, self.path)

    def load_experts(self, layer_idx: int) -> dict:
        """kt-kernel's `SafeTensorLoader.load_experts` result: {"gate": [[stored int8 per expert] per
        NUMA part], ..., "gate_scale": [[fp32 [n] per expert] per part], ...}."""
        layer = self.layer(layer_idx)
        out = {}
        for p in PROJECTIONS:
            out[p] = [[layer.tensors[(p, e, n)][0] for e in range(layer.num_experts)] for n in range(layer.num_parts)]
            out[p + "_scale"] = [
                [layer.tensors[(p, e, n)][1] for e in range(layer.num_experts)] for n in range(layer.num_parts)
            ]
        return out

    def _layer_from_kt_files(self, layer_idx: int) -> KTLayer:
        import numpy as np

        folder = os.path.join(self.path, f"_layer_{layer_idx}")
        if not os.path.isdir(folder):
            raise KeyError(f"layer {layer_idx} ({folder}) is not in {self.path}; available layers: {self.layers()}")
        tensors: Dict[Tuple[str, int, int], list] = {}
        methods = set()
        for numa_dir in sorted(glob.glob(os.path.join(folder, "_numa_*"))):
            part = int(os.path.basename(numa_dir)[len("_numa_") :])
            for file in os.listdir(numa_dir):
                m = KT_FILE.fullmatch(file)
                if m is None or "_bwd" in file:
                    continue  # backward copies: kt_ops' backward runs on the same packed weights
                methods.add(m.group(1))
                dtype = np.float32 if m.group(5) == "scale" else np.int8
                t = torch.from_numpy(np.fromfile(os.path.join(numa_dir, file), dtype=dtype))
                tensors.setdefault((m.group(2), int(m.group(3)), part), [None, None])[m.group(5) == "scale"] = t
        if len(methods) != 1 or not methods <= set(KT_METHODS):
            raise ValueError(
                f"{folder} holds .kt files of {sorted(methods) or 'no'} method(s); kt_ops reads one of "
                f"{KT_METHODS} per layer (not moe_int8/moe_int4)"
            )
        return KTLayer(layer_idx, {k: tuple(v) for k, v in tensors.items()}, folder, methods.pop())


def layer_parts(
    layer: KTLayer, weight_format: str, split: Sequence[Tuple[int, int]], group_size: int, shape: Tuple[int, int, int]
):
    """Packed experts of `layer` for a wrapper running `weight_format` over the intermediate ranges
    `split`, experts in logical order. The file's own NUMA split, or one part, is exact; another split
    is requantized (with a warning) from the stored values."""
    import warnings

    got = (layer.num_experts, layer.hidden_size, layer.intermediate_size)
    if got != tuple(shape):
        raise ValueError(
            f"{layer.source}: layer {layer.layer_idx} has (num_experts, hidden_size, intermediate_size) "
            f"= {got}, the wrapper was built for {tuple(shape)}"
        )
    accepted = ("int8", "int8_kgroup") if layer.method == "INT8" else ("int4", "int4_kgroup")
    if weight_format not in accepted:
        raise ValueError(
            f"{layer.source}: layer {layer.layer_idx} holds KTransformers {layer.method} experts (kt_ops "
            f"{accepted[0]}), but this wrapper's weight format is {weight_format!r}; use method "
            f"AMX{layer.method}_SFT (training) or AMX{layer.method} (inference)"
        )
    if list(split) == layer.split():
        return layer.packed_parts()
    if len(split) == 1:
        return [layer.packed()]
    warnings.warn(
        f"{layer.source}: layer {layer.layer_idx} was converted for {layer.num_parts} NUMA part(s); "
        f"repacking for {len(split)} requantizes from the stored values",
        RuntimeWarning,
        stacklevel=3,
    )
    gate, up, down = unpack_experts(layer.packed())
    return pack_split(gate, up, down, weight_format, group_size, split)


def load_kt_layer_parts(path, layer_idx: int, weight_format: str, split, group_size: int, shape):
    """Layer `layer_idx` of a KTransformers converted directory at `path` as packed experts per
    intermediate range of `split` (see kt_ops.weights.ktransformers.layer_parts), or None when `path`
    is not such a directory."""
    if path is None or not is_kt_directory(path):
        return None
    return layer_parts(KTWeightDirectory(path).layer(layer_idx), weight_format, split, group_size, shape)
