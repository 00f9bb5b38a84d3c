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


def _lora_params(config: dict, model, experts: list, E: int, H: int, I: int) -> int:
    """LoRA parameters: every linear layer outside the experts that lora_target names (all: every one
    but the routers and the head; in + out per rank) plus the experts'."""
    import torch

    r = config["lora_rank"]
    lora = 0
    if config["lora_target"] != "none":
        wanted = None if config["lora_target"] == "all" else {t.strip() for t in config["lora_target"].split(",")}
        expert_names = [n for n, _ in experts]
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or any(name.startswith(e + ".") for e in expert_names):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if (wanted is None and leaf not in ("lm_head", "gate", "router", "shared_expert_gate")) or (
                wanted is not None and leaf in wanted
            ):
                lora += r * (module.in_features + module.out_features)
    if config["use_kt"]:
        lora += len(experts) * E * r * (2 * (H + I) + (I + H))
    return lora


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


def plan_from_config(config: dict) -> MemoryPlan:
    """The memory plan for a validated kt-sft config (kt_ops.cli.load_config)."""
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
    formats = PLAN_FORMATS + ((fmt,) if fmt not in PLAN_FORMATS else ())
    packed = {f: b * E * len(experts) for f, b in _packed_expert_bytes(H, I, formats).items()}

    lora = _lora_params(config, model, experts, E, H, I)
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
        lora_params=lora,
        tokens=T,
        activations=activations,
        host_total=host_total,
        host_available=host_available,
        gpu=_gpu_memory(),
        notes=notes,
    )
