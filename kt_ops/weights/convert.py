"""Convert a HuggingFace MoE checkpoint into the kt_ops pre-quantized form, one layer at a time.

    python -m kt_ops.convert_weights --input <hf dir or file> --output <dir> --method AMXINT8_SFT \
        [--group-size 128] [--layers 0,1,5] [--overwrite] [--quiet]

Writes `<output>/blk.{L}.safetensors` per MoE layer (readable by `SafeTensorLoader`) and the manifest
`<output>/kt_ops_weights.json`. Only one layer's float experts and their packed form are in memory
at a time. A rerun with the same settings resumes: layers whose file reads back are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Optional, Sequence

from ..core.checks import check_int
from ..core.durable import STAGING_PREFIX, atomic_file, recover
from ..core.formats import GROUPED_FORMATS, SFT_METHOD_FORMATS
from ..core.packed import pack_experts
from .loaders import BF16SafeTensorLoader
from .packed_io import load_packed_experts, save_packed_experts

MANIFEST_NAME = "kt_ops_weights.json"
_MANIFEST_KIND = "kt_ops.packed_experts"
_OWN_FILE = re.compile(r"(blk\.\d+\.safetensors|kt_ops_weights\.json)(\.tmp-\d+)?")


class ConversionRefused(ValueError):
    """The output directory holds something this run must not mix with or silently replace."""


def layer_file(output_dir: str, layer: int) -> str:
    return os.path.join(output_dir, f"blk.{layer}.safetensors")


def _write_json_atomic(path: str, obj: dict) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")


def _read_manifest(output_dir: str) -> Optional[dict]:
    """The manifest, or None when the directory has no kt_ops manifest (missing or foreign)."""
    try:
        with open(os.path.join(output_dir, MANIFEST_NAME)) as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("kind") == _MANIFEST_KIND else None


def _is_complete(path: str, layer: int, weight_format: str) -> bool:
    try:
        return load_packed_experts(path, layer).weight_format == weight_format
    except Exception:  # truncated, foreign or otherwise unreadable: it will be rewritten
        return False


def _prepare_output(output_dir: str, settings: dict, overwrite: bool) -> list[int]:
    """Make `output_dir` ready and return the layers a previous compatible run recorded."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConversionRefused(f"--output {output_dir!r} exists and is not a directory")
    os.makedirs(output_dir, exist_ok=True)
    recover(output_dir)  # a killed run's staging directories
    entries = [name for name in os.listdir(output_dir) if not name.startswith(STAGING_PREFIX)]
    owned = {name: m.group(2) is not None for name in entries if (m := _OWN_FILE.fullmatch(name))}
    done: list[int] = []
    if not overwrite:
        manifest = _read_manifest(output_dir)
        if manifest is not None:
            old = {k: manifest.get(k) for k in settings}
            # A run that failed before writing any layer leaves nothing worth protecting.
            has_layers = manifest.get("layers") or any(n.startswith("blk.") and not t for n, t in owned.items())
            if old != settings and has_layers:
                diff = ", ".join(f"{k}: {old[k]!r} there, {v!r} now" for k, v in settings.items() if old[k] != v)
                raise ConversionRefused(
                    f"--output {output_dir!r} holds a conversion with other settings ({diff}); "
                    f"pass --overwrite to replace it or choose another --output"
                )
            if old == settings:
                done = [L for L in manifest.get("layers", []) if isinstance(L, int)]
        elif any(not owned.get(name, False) for name in entries):
            raise ConversionRefused(
                f"--output {output_dir!r} is not empty and is not a kt_ops conversion "
                f"(no valid {MANIFEST_NAME}); pass --overwrite to write into it anyway"
            )
    # Leftovers of a crashed write always go; finished files only with --overwrite, and only files
    # this tool names itself: --overwrite must never wipe a directory it did not create.
    for name, is_tmp in owned.items():
        if is_tmp or overwrite:
            os.remove(os.path.join(output_dir, name))
    return done


class _Progress:
    """`layer 3/27 [=====     ] 1.2 s/layer` on one stderr line, redrawn in place."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total, self.stream, self.width = total, stream, width
        self.converted, self.seconds = 0, 0.0

    def update(self, done: int, layer_seconds: Optional[float]) -> None:
        if layer_seconds is not None:
            self.converted, self.seconds = self.converted + 1, self.seconds + layer_seconds
        if self.stream is None:
            return
        filled = self.width * done // max(self.total, 1)
        rate = f"{self.seconds / self.converted:.1f} s/layer" if self.converted else "-- s/layer"
        self.stream.write(f"\rlayer {done}/{self.total} [{'=' * filled}{' ' * (self.width - filled)}] {rate}")
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def convert_checkpoint(
    input_path: str,
    output_dir: str,
    method: str,
    group_size: int = 128,
    layers: Optional[Sequence[int]] = None,
    overwrite: bool = False,
    progress=None,
) -> list[int]:
    """Convert the MoE layers `layers` (default: all) of `input_path` with `method` into `output_dir`.
    Returns the layers converted by this call (layers already complete are skipped). `progress` is a
    stream for the progress bar, or None."""
    if method not in SFT_METHOD_FORMATS:
        raise ValueError(f"unknown --method {method!r}; supported: {', '.join(SFT_METHOD_FORMATS)}")
    check_int(group_size, "--group-size", 1)
    weight_format = SFT_METHOD_FORMATS[method]
    loader = BF16SafeTensorLoader(input_path)
    available = loader.moe_layers()
    if not available:
        raise ValueError(f"--input {input_path!r} has no MoE expert weights under model.layers.<L>")
    if layers is None:
        layers = available
    else:
        unknown = sorted(set(layers) - set(available))
        if unknown:
            raise ValueError(f"--layers {unknown} have no experts in {input_path!r}; MoE layers: {available}")
        layers = sorted(set(layers))

    # group_size only shapes K-group formats; recording it otherwise would make an int8 rerun with
    # another --group-size refuse to resume output that is bit-identical anyway.
    settings = {
        "weight_format": weight_format,
        "group_size": group_size if weight_format in GROUPED_FORMATS else None,
        "source": os.path.abspath(input_path),
    }
    done = set(_prepare_output(output_dir, settings, overwrite))
    # Layers of an earlier run outside this one's --layers stay recorded; requested ones are
    # recorded again only once their file is verified or rewritten.
    kept = sorted(L for L in done if L not in layers and os.path.exists(layer_file(output_dir, L)))
    manifest = {
        "kind": _MANIFEST_KIND,
        "version": 1,
        "method": method,
        **settings,
        "file_pattern": "blk.{L}.safetensors",
        "layers": kept,
    }
    manifest_path = os.path.join(output_dir, MANIFEST_NAME)

    def record(layer: int) -> None:
        manifest["layers"] = sorted({*manifest["layers"], layer})
        _write_json_atomic(manifest_path, manifest)

    _write_json_atomic(manifest_path, manifest)
    bar, converted = _Progress(len(layers), progress), []
    for n, layer in enumerate(layers, 1):
        path = layer_file(output_dir, layer)
        # Judged by the file, not the manifest: a crash between rename and manifest update leaves a
        # complete file the manifest never recorded.
        if _is_complete(path, layer, weight_format):
            record(layer)
            bar.update(n, None)
            continue
        start = time.perf_counter()
        gate, up, down = loader.load_stacked(f"model.layers.{layer}")
        packed = pack_experts(gate, up, down, weight_format, group_size)
        del gate, up, down  # the float layer goes before the file is written: peak = one layer + its pack
        save_packed_experts(path, {layer: packed}, overwrite=True)
        del packed
        record(layer)
        converted.append(layer)
        bar.update(n, time.perf_counter() - start)
    return converted


def _parse_layers(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated layer indices like 0,1,5, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise ValueError(f"--layers must list non-negative layer indices like 0,1,5, got {text!r}")
    return layers


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kt_ops.convert_weights",
        description="Quantize a HuggingFace MoE checkpoint into the kt_ops pre-quantized form.",
    )
    parser.add_argument("--input", required=True, help="HuggingFace checkpoint directory or .safetensors file")
    parser.add_argument("--output", required=True, help="output directory (blk.{L}.safetensors + manifest)")
    parser.add_argument("--method", required=True, help=f"one of {', '.join(SFT_METHOD_FORMATS)}")
    parser.add_argument("--group-size", type=int, default=128, help="K-group size for the KGroup methods")
    parser.add_argument("--layers", help="comma-separated layer indices (default: every MoE layer)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output with other settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        converted = convert_checkpoint(
            args.input,
            args.output,
            args.method,
            args.group_size,
            _parse_layers(args.layers) if args.layers is not None else None,
            args.overwrite,
            progress=None if args.quiet else sys.stderr,
        )
    except (ValueError, KeyError, TypeError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"converted {len(converted)} layer(s) into {args.output}", file=sys.stderr)
    return 0
