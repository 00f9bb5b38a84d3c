"""`kt-sft plan`: memory needed to fine-tune a config's model, from its config.json alone.

The model is instantiated on PyTorch's meta device (shapes only, no storage, no weights read), so the
parameter counts are the architecture's own. Packed expert sizes come from packing one zero expert of
the real shape in each format (exact, panel padding and scales included). Activation figures are
estimates, stated with their formula in the report:

- non-expert activations per decoder layer: 34 * T * H bytes in bf16 (twice that in fp32), the usual
  transformer-layer figure with fused / flash attention (no T^2 score matrix). With gradient
  checkpointing only each layer's input (T * H) is kept, plus one layer's full activations during
  its recompute.
- kt_ops experts per MoE layer, as kt::moe_sft_forward saves them: the layer input (T * H), the fp32
  gate/up pre-activations (2 * T * k * I * 4) and LoRA intermediates (3 * T * k * r * 4); with
  kt_cpu_activation recompute only the input, ids and weights.
- logits: T * V * 4 bytes, twice (fp32 logits and their gradient).
- LoRA: parameter, gradient and two Adam moments in fp32 (16 bytes per parameter).
T = per_device_train_batch_size * cutoff_len tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

GiB = 1024**3
PLAN_FORMATS = ("bf16", "int8", "int4", "int4_kgroup")
_FORMAT_OF_BACKEND_PREFIX = {"AMXBF16": "bf16", "AMXINT8": "int8", "AMXINT4": "int4"}


def _fmt(nbytes: float) -> str:
    if nbytes >= GiB:
        return f"{nbytes / GiB:,.1f} GiB"
    return f"{nbytes / 1024**2:,.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.3f} M"


def _host_memory() -> tuple[int, int]:
    """(total, available) host RAM in bytes, from /proc/meminfo (sysconf where that is missing)."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


def _gpu_memory() -> Optional[tuple[int, int, str]]:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return total, free, torch.cuda.get_device_name()


@dataclass
class MemoryPlan:
    model: str
    architecture: str
    num_layers: int
    moe_layers: int
    experts: int
    experts_per_token: int
    hidden_size: int
    expert_intermediate: int
    vocab_size: int
    expert_params: int
    other_params: int
    packed_bytes: dict
    weight_format: str
    dtype_bytes: int
    lora_params: int
    tokens: int
    activations: dict
    host_total: int
    host_available: int
    gpu: Optional[tuple[int, int, str]]
    notes: list = field(default_factory=list)
    # non-expert and LoRA parameters of each FSDP2 unit: every decoder layer, and "" for the root
    unit_params: dict = field(default_factory=dict)
    unit_lora: dict = field(default_factory=dict)

    @property
    def other_bytes(self) -> int:
        return self.other_params * self.dtype_bytes

    @property
    def lora_bytes(self) -> int:
        return self.lora_params * 16

    def needs(self) -> tuple[int, int]:
        """(host bytes, GPU bytes) for the configured format; GPU is 0 without a GPU (all on the host)."""
        host = self.packed_bytes[self.weight_format] + self.activations["experts"]
        rest = self.other_bytes + self.activations["layers"] + self.activations["logits"] + self.lora_bytes
        if self.gpu is None:
            return host + rest, 0
        return host, rest

    def fits(self) -> bool:
        host, gpu = self.needs()
        if host > self.host_available:
            return False
        return self.gpu is None or gpu <= self.gpu[1]

    def report(self) -> str:
        host, gpu = self.needs()
        where = "GPU" if self.gpu else "CPU (no GPU: everything in host RAM)"
        lines = [
            f"model: {self.model} ({self.architecture}; config.json only, no weights read)",
            f"  {self.num_layers} layers, {self.moe_layers} with {self.experts} routed experts "
            f"(top-{self.experts_per_token}, hidden {self.hidden_size}, "
            f"expert intermediate {self.expert_intermediate})",
            f"  routed expert parameters {_count(self.expert_params)}, other parameters {_count(self.other_params)}",
            "host RAM for the packed routed experts (kt_ops):",
        ]
        for fmt, nbytes in self.packed_bytes.items():
            mark = "  <- configured" if fmt == self.weight_format else ""
            lines.append(f"  {fmt:12s} {_fmt(nbytes)}{mark}")
        lines += [
            f"non-expert weights ({self.dtype_bytes * 8}-bit) on {where}: {_fmt(self.other_bytes)}",
            f"LoRA ({_count(self.lora_params)} parameters; weights, grads, Adam): {_fmt(self.lora_bytes)}",
            f"activations for a batch of {self.tokens} tokens (estimates):",
            f"  decoder layers ({self.activations['layers_how']}): {_fmt(self.activations['layers'])}",
            f"  kt_ops experts on the host ({self.activations['experts_how']}): {_fmt(self.activations['experts'])}",
            f"  logits and their gradient: {_fmt(self.activations['logits'])}",
            f"this machine: host RAM {_fmt(self.host_available)} available of {_fmt(self.host_total)}"
            + (f"; GPU {self.gpu[2]} {_fmt(self.gpu[1])} free of {_fmt(self.gpu[0])}" if self.gpu else "; no GPU"),
            f"needed: host {_fmt(host)}" + (f", GPU {_fmt(gpu)}" if self.gpu else ""),
            f"fits: {'yes' if self.fits() else 'no'}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _unit_bytes(plan: MemoryPlan, unit: str) -> int:
    """One FSDP2 unit gathered whole: its weights, and its LoRA's weights and gradients (fp32)."""
    return plan.unit_params.get(unit, 0) * plan.dtype_bytes + plan.unit_lora.get(unit, 0) * 8


def per_gpu(plan: MemoryPlan, processes: int, fsdp: bool) -> dict:
    """{part: bytes} on each GPU when `processes` processes, one per GPU, train data-parallel: the
    whole non-expert model and LoRA state on each (DDP), or 1/N of them plus the units gathered at
    a time (FSDP2: the layer computing and the next one, prefetched, and the root: embeddings, final
    norm and head, kept gathered from forward to backward)."""
    activations = plan.activations["layers"] + plan.activations["logits"]
    if not fsdp:
        return {
            "non-expert weights": plan.other_bytes,
            "LoRA weights, grads, Adam": plan.lora_bytes,
            "activations": activations,
        }
    layers = [u for u in set(plan.unit_params) | set(plan.unit_lora) if u]
    gathered = 2 * max((_unit_bytes(plan, u) for u in layers), default=0) + _unit_bytes(plan, "")
    return {
        "non-expert weights": -(-plan.other_bytes // processes),
        "LoRA weights, grads, Adam": -(-plan.lora_bytes // processes),
        "gathered (2 layers + root)": gathered,
        "activations": activations,
    }


def several_gpus(
    plan: MemoryPlan, gpus: int, nodes: int = 1, gpu_memory: Optional[int] = None, host_memory: Optional[int] = None
) -> str:
    """The plan for `nodes` nodes of `gpus` GPUs (one process each, one copy of the experts per node),
    with and without FSDP2; whether it fits GPUs of `gpu_memory` bytes (default: this machine's GPU)
    and nodes of `host_memory` bytes (default: this machine's available RAM)."""
    processes = gpus * nodes
    gpu_memory = gpu_memory or (plan.gpu[0] if plan.gpu else None)
    host_memory = host_memory or plan.host_available
    plain, sharded = per_gpu(plan, processes, False), per_gpu(plan, processes, True)
    lines = [
        f"{nodes} node(s) x {gpus} GPU(s): {processes} processes, one per GPU; the experts once per node",
        f"  per GPU {'':26s} {'without FSDP2':>14s} {'with FSDP2':>14s}",
    ]
    for part in sharded:
        lines.append(f"    {part:30s} {_fmt(plain[part]) if part in plain else '-':>14s} {_fmt(sharded[part]):>14s}")
    totals = sum(plain.values()), sum(sharded.values())
    lines.append(f"    {'total':30s} {_fmt(totals[0]):>14s} {_fmt(totals[1]):>14s}")
    if gpu_memory:
        fits = ["yes" if t <= gpu_memory else "no" for t in totals]
        lines.append(f"    {'fits a ' + _fmt(gpu_memory) + ' GPU':30s} {fits[0]:>14s} {fits[1]:>14s}")
    else:
        lines.append("    fits: no GPU here; pass --gpu-memory GiB")
    experts = plan.packed_bytes[plan.weight_format]
    host = experts + gpus * plan.activations["experts"]
    # from_pretrained(kt_shared_experts=...): the node's local rank 0 packs every layer in memory, then
    # writes the file; every process holds the non-expert weights whole until fully_shard takes them.
    loading = 2 * experts + gpus * plan.other_bytes
    lines += [
        f"  per node, host RAM: packed experts ({plan.weight_format}) {_fmt(experts)} + {gpus} x kt_ops "
        f"activations {_fmt(plan.activations['experts'])} = {_fmt(host)}",
        f"    peak while loading: the experts twice (packed in memory, then written to the shared file) + "
        f"{gpus} x the non-expert weights (read whole, then sharded) = {_fmt(loading)}",
        f"    fits {_fmt(host_memory)}: training {'yes' if host <= host_memory else 'no'}, "
        f"loading {'yes' if loading <= host_memory else 'no'}",
    ]
    return "\n".join(lines)


def _load_model_config(name: str):
    """A transformers config from a model directory's config.json, or a built-in tiny model's."""
    from .integration.tiny import ALL_TINY_MODELS, tiny_config

    if name in ALL_TINY_MODELS:
        return tiny_config(name)
    path = os.path.join(name, "config.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model_name_or_path {name!r}: no config.json there (plan reads only it)")
    from transformers import AutoConfig

    with open(path) as f:
        raw = json.load(f)
    if "model_type" not in raw:
        raise ValueError(f"{path} has no model_type")
    raw.pop("quantization_config", None)  # the plan asks about kt_ops's formats, not the checkpoint's
    model_type = raw.pop("model_type")
    return AutoConfig.for_model(model_type, **raw)


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModelForImageTextToText.from_config(config)


def _packed_expert_bytes(hidden: int, intermediate: int, formats) -> dict:
    """Bytes of one expert packed in each format, measured by packing zeros of the real shape."""
    import torch

    from .core.packed import pack_experts

    sizes = {}
    gate = torch.zeros(1, intermediate, hidden, dtype=torch.bfloat16)
    down = torch.zeros(1, hidden, intermediate, dtype=torch.bfloat16)
    for fmt in formats:
        sizes[fmt] = pack_experts(gate, gate, down, fmt, group_size=_group_size(hidden, intermediate)).nbytes()
    return sizes


def _group_size(hidden: int, intermediate: int) -> int:
    for g in (128, 64, 32):
        if hidden % g == 0 and intermediate % g == 0:
            return g
    return 2


def _decoder_layers(model) -> list:
    """Names of the decoder layers (the model's _no_split_modules): the units FSDP2 shards one by one."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    return [name for name, m in model.named_modules() if type(m).__name__ in classes]


def _unit_of(name: str, layers: list) -> str:
    """The decoder layer holding `name`, or "" (the root: embeddings, final norm, head)."""
    return next((layer for layer in layers if name.startswith(layer + ".")), "")


def _lora_params(config: dict, model, experts: list, E: int, H: int, I: int, layers: list) -> dict:
    """LoRA parameters per FSDP unit (decoder layer, or "" for the root): every linear layer outside
    the experts that lora_target names (all: every one but the routers and the head; in + out per
    rank) plus the experts'."""
    import torch

    r = config["lora_rank"]
    lora: dict = {}
    expert_names = [n for n, _ in experts]
    if config["lora_target"] != "none":
        wanted = None if config["lora_target"] == "all" else {t.strip() for t in config["lora_target"].split(",")}
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or any(name.startswith(e + ".") for e in expert_names):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if (wanted is None and leaf not in ("lm_head", "gate", "router", "shared_expert_gate")) or (
                wanted is not None and leaf in wanted
            ):
                unit = _unit_of(name, layers)
                lora[unit] = lora.get(unit, 0) + r * (module.in_features + module.out_features)
    if config["use_kt"]:
        for name in expert_names:
            unit = _unit_of(name, layers)
            lora[unit] = lora.get(unit, 0) + E * r * (2 * (H + I) + (I + H))
    return lora


def _params_per_unit(model, experts: list, layers: list) -> dict:
    """Non-expert parameters per FSDP unit (decoder layer, or "" for the root)."""
    expert_params = {f"{name}.{p}" for name, _ in experts for p in ("gate_up_proj", "down_proj")}
    units: dict = {}
    for name, p in model.named_parameters():
        if name not in expert_params:
            unit = _unit_of(name, layers)
            units[unit] = units.get(unit, 0) + p.numel()
    return units


def _activations(
    config: dict, T: int, dtype_bytes: int, L: int, moe_layers: int, k: int, H: int, I: int, V: int
) -> dict:
    """Estimated activations of T tokens (formulas: the layers', the kt experts', the logits')."""
    r = config["lora_rank"]
    scale = dtype_bytes / 2
    if config["gradient_checkpointing"]:
        layers = L * T * H * dtype_bytes + 34 * T * H * scale
        layers_how = "checkpointed: T*H per layer + one layer's 34*T*H"
    else:
        layers = L * 34 * T * H * scale
        layers_how = "34*T*H per layer"
    if config["kt_cpu_activation"] == "recompute" or config["gradient_checkpointing"]:
        kt_act = moe_layers * T * (H * dtype_bytes + k * 12)
        kt_how = "recompute: inputs, ids and weights"
    else:
        kt_act = moe_layers * (T * H * dtype_bytes + 4 * T * k * (2 * I + 3 * r))
        kt_how = "retain: input + fp32 gate/up + LoRA intermediates"
    return {
        "layers": layers,
        "layers_how": layers_how,
        "experts": kt_act,
        "experts_how": kt_how,
        "logits": 2 * T * V * 4,
    }


def plan_from_config(config: dict, all_formats: bool = True) -> MemoryPlan:
    """The memory plan for a validated kt-sft config (kt_ops.cli.load_config); the packed experts'
    size in PLAN_FORMATS and the configured format, or (`all_formats=False`) in that one only."""
    from .core.formats import KT_BACKENDS
    from .integration import find_moe_experts

    model_config = _load_model_config(config["model_name_or_path"])
    model = _meta_model(model_config)
    experts = find_moe_experts(model)
    if not experts:
        raise ValueError(f"{config['model_name_or_path']}: no routed experts module found; nothing to plan for kt")
    _, first = experts[0]
    E, H, I = first.num_experts, first.hidden_dim, first.intermediate_dim
    expert_params = sum(m.gate_up_proj.numel() + m.down_proj.numel() for _, m in experts)
    total_params = sum(p.numel() for p in model.parameters())
    text_config = getattr(model_config, "text_config", None) or model_config
    k = int(getattr(text_config, "num_experts_per_tok", 1))
    V = int(text_config.vocab_size)
    L = int(text_config.num_hidden_layers)

    backend = config["kt_backend"]
    fmt = config["kt_expert_weight_format"] or (KT_BACKENDS[backend] if backend != "auto" else "bf16")
    formats = PLAN_FORMATS + ((fmt,) if fmt not in PLAN_FORMATS else ()) if all_formats else (fmt,)
    packed = {f: b * E * len(experts) for f, b in _packed_expert_bytes(H, I, formats).items()}

    layers = _decoder_layers(model)
    unit_lora = _lora_params(config, model, experts, E, H, I, layers)
    T = config["per_device_train_batch_size"] * config["cutoff_len"]
    dtype_bytes = 2 if config["bf16"] else 4
    activations = _activations(config, T, dtype_bytes, L, len(experts), k, H, I, V)
    host_total, host_available = _host_memory()
    notes = []
    if fmt != "bf16" and config["kt_weight_path"] is None:
        notes.append(
            f"packing {fmt} from a bf16 checkpoint also holds one layer's bf16 experts "
            f"({_fmt(E * 3 * H * I * 2)}) while converting"
        )
    return MemoryPlan(
        model=config["model_name_or_path"],
        architecture=type(model).__name__,
        num_layers=L,
        moe_layers=len(experts),
        experts=E,
        experts_per_token=k,
        hidden_size=H,
        expert_intermediate=I,
        vocab_size=V,
        expert_params=expert_params,
        other_params=total_params - expert_params,
        packed_bytes=packed,
        weight_format=fmt,
        dtype_bytes=dtype_bytes,
        lora_params=sum(unit_lora.values()),
        tokens=T,
        activations=activations,
        host_total=host_total,
        host_available=host_available,
        gpu=_gpu_memory(),
        notes=notes,
        unit_params=_params_per_unit(model, experts, layers),
        unit_lora=unit_lora,
    )
