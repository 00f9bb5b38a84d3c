"""FSDP2 (torch's `fully_shard`) on a model whose routed experts are on kt_ops, and its sharded state
through `torch.distributed.checkpoint` (DCP).

What FSDP2 shards are the model's parameters: attention, norms, embeddings, the dense layers, every
LoRA (peft's and the expert LoRA, which are ordinary parameters), their gradients and optimizer
state, 1/N per rank. The packed experts are not parameters (they stay one copy per process, or per
node with `kt_shared_experts`), but each converted experts module keeps one-element placeholders of
the fused weights' full shape for peft's `target_parameters`; `fully_shard` would allocate a shard of
that full shape for each, so they are passed to it as `ignored_params` (`kt_ignored_params`).

    fully_shard(layer, ignored_params=kt_ignored_params(model))    # for each decoder layer, then the root
    shard_model(model)                                              # the same, per decoder layer and the root

`gathered_adapter_params` lends rank 0 every parameter of the adapter whole, so the usual writers
(`save_pretrained`, `save_kt_adapter`) write the adapter; `save_sharded_*` / `load_sharded_*` write and
read the trainable state and the optimizer state of each rank through DCP.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from .adapter import EMBEDDING_LAYER_NAMES
from .install import kt_experts_modules
from .peft_lora import EXPERT_PARAMS

# Where save_sharded_model / save_sharded_optimizer put their DCP checkpoints inside a directory.
SHARDED_MODEL = "fsdp_model"
SHARDED_OPTIMIZER = "fsdp_optimizer"


def kt_ignored_params(model: nn.Module) -> set:
    """The parameters FSDP must leave alone in a model with kt experts: the placeholders of the experts'
    fused weights (stride 0 over the full shape; the packed experts hold the weights)."""
    return {getattr(module, name) for _, module, _ in kt_experts_modules(model) for name in EXPERT_PARAMS}


def _transformers_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # a peft PeftModel
    return get_base() if callable(get_base) else model


def _layers_to_shard(model: nn.Module, layer_classes: Optional[Iterable[str]]) -> list:
    """The modules of `model` whose class is named in `layer_classes` (default: the transformers
    model's `_no_split_modules`, its decoder layers), innermost first."""
    names = set(layer_classes if layer_classes is not None else _transformers_model(model)._no_split_modules or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    found = {type(m).__name__ for m in layers}
    if layer_classes is not None and found != names:
        raise ValueError(
            f"layer_classes {sorted(names - found)} name no module of {type(model).__name__} "
            f"(its decoder layers: {sorted(_transformers_model(model)._no_split_modules or ())})"
        )
    return layers[::-1]


def shard_model(
    model: nn.Module,
    *,
    mesh=None,
    layer_classes: Optional[Iterable[str]] = None,
    reshard_after_forward: bool = True,
    offload_policy=None,
) -> nn.Module:
    """Shard `model` (a transformers model or a PeftModel around one, kt experts converted or not) over
    the ranks of `mesh` (default: every process, on the GPU when there is one, else the CPU) with
    FSDP2: `fully_shard` on each module whose class `layer_classes` names (default: the decoder layers,
    `_no_split_modules`), then on the root, the kt experts' placeholders ignored. `reshard_after_forward`
    and `offload_policy` are fully_shard's. torch.distributed must be initialised. Returns `model`."""
    from torch.distributed.fsdp import OffloadPolicy, fully_shard

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError("shard_model: torch.distributed is not initialised (launch with torchrun)")
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"reshard_after_forward must be a bool, got {type(reshard_after_forward).__name__}")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    kwargs = dict(mesh=mesh, ignored_params=kt_ignored_params(model), offload_policy=offload_policy or OffloadPolicy())
    for layer in _layers_to_shard(model, layer_classes):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root's own parameters (embeddings, final norm, head) stay gathered between forward and
    # backward: fully_shard's default for the root.
    fully_shard(model, **kwargs)
    return model


def _adapter_params(model: nn.Module) -> list:
    """(module, parameter name, parameter), in one order on every rank, of what an adapter may hold: the
    trainable parameters, and the embedding layers' (peft saves those whole when LoRA targets them or
    the vocabulary grew)."""
    found = []
    for qualified, module in model.named_modules():
        embedding = any(part in EMBEDDING_LAYER_NAMES for part in qualified.split("."))
        found += [
            (module, n, p) for n, p in module._parameters.items() if p is not None and (embedding or p.requires_grad)
        ]
    return found


@contextlib.contextmanager
def gathered_adapter_params(model: nn.Module) -> Iterator[None]:
    """Inside the block rank 0's `model` holds whole, on the CPU, every parameter an adapter may hold
    (the other ranks keep their shards): what writing the adapter of an FSDP2 model needs, without
    gathering the frozen weights. Every rank must enter it (the gathers are collective); nothing may
    run the model inside it. The shards are put back on leaving."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    rank0 = torch.distributed.get_rank() == 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # The root stays gathered after backward (reshard_after_forward): back to its shards, whose
            # writers (state_dict's hooks) would otherwise put them back over the parameters lent here.
            module.reshard()
    lent = []
    try:
        with torch.no_grad():
            for module, name, p in _adapter_params(model):
                if not isinstance(p, DTensor):
                    continue
                whole = p.full_tensor().cpu()  # one parameter at a time: the device holds one whole
                if rank0:
                    module._parameters[name] = nn.Parameter(whole, requires_grad=p.requires_grad)
                    lent.append((module, name, p))
        yield
    finally:
        for module, name, p in lent:
            module._parameters[name] = p


def _trainable_state(model: nn.Module) -> dict:
    """The sharded (DTensor) state of the trainable parameters: what training changes; the frozen
    weights come from the base model again."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model).items() if k in names}


def save_sharded_model(directory: str, model: nn.Module) -> None:
    """Every rank writes its shards of the trainable parameters to `directory`/fsdp_model (DCP)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_trainable_state(model), checkpoint_id=os.path.join(directory, SHARDED_MODEL))


def load_sharded_model(directory: str, model: nn.Module) -> None:
    """Every trainable parameter from `directory`/fsdp_model (DCP reshards to this world size); a
    parameter the checkpoint lacks is an error."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = _trainable_state(model)
    dcp.load(state, checkpoint_id=os.path.join(directory, SHARDED_MODEL))
    # strict=False: the state holds the trainable parameters only (all of them, checked by dcp.load).
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))


def save_sharded_optimizer(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the optimizer state to `directory`/fsdp_optimizer (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=os.path.join(directory, SHARDED_OPTIMIZER))


def load_sharded_optimizer(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state from `directory`/fsdp_optimizer, resharded to this world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)  # the layout to read into (initialises Adam's moments)
    dcp.load(state, checkpoint_id=os.path.join(directory, SHARDED_OPTIMIZER))
    set_optimizer_state_dict(model, optimizer, state)
