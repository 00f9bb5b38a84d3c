"""Which module subtrees KT owns while a model loads (`kt_kernel.sft.artifacts`' runtime ownership):
the routed experts of every MoE layer are computed by KT and never materialize in transformers, so
a KT-aware from_pretrained claims them (claim_kt_routed_expert_subtrees), keeps them out of
accelerate's device-map inference (project_kt_routed_experts_out_of_device_map), removes their
placements from the resolved map, refusing one that puts real tensors on the CPU or disk
(prepare_kt_non_expert_device_map), and hides them from dispatch hooks
(hide_kt_routed_experts_from_dispatch).

A claim records the subtrees' paths, the module objects and their tensor contract (names and shapes;
a zero-storage placeholder counts with the shape it stands for). Every later step checks all three
first and raises KTArtifactError on any drift, before touching the model or the map; on a model
that is not a supported MoE model every step is a no-op. The *_int8_* names are kt-kernel's older
DeepSeek-V3 INT8 entry points, checked against their own marks and then the same as the generic ones.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Tuple

import torch

from .arch import get_layers_prefix, get_model_container_and_layers, get_moe_arch_config, get_moe_module
from .artifact_common import KTArtifactError

_SUPPORTED_ARCHITECTURES = ("DeepseekV2", "DeepseekV3", "DeepseekV4", "KimiK2", "Qwen2Moe", "Qwen3Moe")
_SUPPORTED_ARCHITECTURES += ("Qwen3VLMoe", "Qwen3_5Moe", "Glm4Moe", "Mixtral")
_RUNTIME_PARAMETER_MARKER = "_is_kt_routed_expert_runtime_parameter"
RUNTIME_MODULE_MARKER = "_is_kt_routed_expert_runtime_module"
RUNTIME_MODULE_PATHS = "_kt_routed_expert_runtime_module_paths"
_RUNTIME_MODULE_REFS = "_kt_routed_expert_runtime_module_refs"
_RUNTIME_TENSOR_CONTRACTS = "_kt_routed_expert_runtime_tensor_contracts"
_CLAIM = (RUNTIME_MODULE_PATHS, _RUNTIME_MODULE_REFS, _RUNTIME_TENSOR_CONTRACTS)
_INT8_PARAMETER_MARKER = "_is_kt_int8_routed_expert_base_parameter"
_INT8_MODULE_MARKER = "_is_kt_int8_routed_expert_base_module"
_INT8_MODULE_PATHS = "_kt_int8_routed_expert_module_paths"

__all__ = [
    "claim_kt_routed_expert_subtrees",
    "hide_kt_int8_routed_experts_from_dispatch",
    "hide_kt_routed_experts_from_dispatch",
    "is_kt_int8_routed_expert_base_parameter",
    "is_kt_routed_expert_base_parameter",
    "is_kt_supported_moe_model",
    "mark_kt_int8_routed_expert_base_parameters",
    "prepare_kt_int8_non_expert_device_map",
    "prepare_kt_non_expert_device_map",
    "project_kt_int8_routed_experts_out_of_device_map",
    "project_kt_routed_experts_out_of_device_map",
]


def is_kt_supported_moe_model(model) -> bool:
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or ()
    return any(name in arch for arch in architectures for name in _SUPPORTED_ARCHITECTURES)


def _shape(tensor, name: str) -> Tuple[int, ...]:
    """The shape a tensor stands for (a zero-storage placeholder's original one)."""
    shape = getattr(tensor, "_kt_original_shape", None) if getattr(tensor, "_kt_zero_storage", False) else tensor.shape
    try:
        shape = tuple(int(v) for v in shape)
    except (TypeError, ValueError) as error:
        raise KTArtifactError(f"{name} has no valid routed-expert shape") from error
    if not shape or min(shape) <= 0:
        raise KTArtifactError(f"{name} has invalid routed-expert shape {shape}")
    return shape


def _contract(path: str, module) -> tuple:
    """Sorted (kind, name, shape) of every parameter and buffer of a subtree."""
    entries = [
        ("parameter", name, _shape(t, f"{path}.{name}"))
        for name, t in module.named_parameters(recurse=True, remove_duplicate=False)
    ]
    if not entries:
        raise KTArtifactError(f"routed-expert subtree {path!r} holds no parameters")
    entries += [
        ("buffer", name, _shape(t, f"{path}.{name}"))
        for name, t in module.named_buffers(recurse=True, remove_duplicate=False)
    ]
    if len({(kind, name) for kind, name, _ in entries}) != len(entries):
        raise KTArtifactError(f"{path} exposes a tensor name twice")
    return tuple(sorted(entries))


def _check_structure(path: str, experts, moe_config, hidden_size) -> None:
    """Fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) or E expert modules with the
    architecture's three Linear weights, in the sizes the config gives."""
    E, I, H = moe_config.expert_num, moe_config.intermediate_size, hidden_size
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (E, I, H)):
        raise KTArtifactError(f"{path} has invalid routed-expert dimensions {(E, I, H)}")
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    fused = {"gate_up_proj": (gate_up, (E, 2 * I, H)), "down_proj": (down, (E, H, I))}
    if any(isinstance(p, torch.nn.Parameter) for p, _ in fused.values()):
        for name, (parameter, want) in fused.items():
            if not isinstance(parameter, torch.nn.Parameter):
                raise KTArtifactError(f"{path} must register both fused gate_up_proj and down_proj parameters")
            if _shape(parameter, f"{path}.{name}") != want:
                raise KTArtifactError(f"{path}.{name} shape mismatch: expected={want}, actual={tuple(parameter.shape)}")
        return
    names = [name for name, _ in experts.named_children()]
    if names != [str(e) for e in range(E)]:
        raise KTArtifactError(f"{path} expert inventory mismatch: expected {E} experts 0..{E - 1}, got {names}")
    gate, up, down_name = moe_config.weight_names
    shapes = {gate: (I, H), up: (I, H), down_name: (H, I)}
    for index, expert in experts.named_children():
        for projection, want in shapes.items():
            weight = getattr(getattr(expert, projection, None), "weight", None)
            where = f"{path}.{index}.{projection}.weight"
            if not isinstance(weight, torch.nn.Parameter):
                raise KTArtifactError(f"{where} is not a Parameter")
            if _shape(weight, where) != want:
                raise KTArtifactError(f"{where} shape mismatch: expected={want}, actual={tuple(weight.shape)}")


def _routed_subtrees(model) -> Tuple[Tuple[str, Any], ...]:
    """(path, experts module) of every MoE layer of a supported model, () for any other model."""
    if not is_kt_supported_moe_model(model):
        return ()
    try:
        config = model.config
        moe_config = get_moe_arch_config(config)
        _, layers = get_model_container_and_layers(model, purpose="routed-expert ownership")
        prefix = get_layers_prefix(config)
        registered = model.get_submodule(prefix)
    except Exception as error:
        raise KTArtifactError(f"could not enumerate the KT routed-expert layers: {error}") from error
    if registered is not layers:
        raise KTArtifactError(f"model layer path {prefix!r} is not the model's layer container")
    hidden_size = getattr(getattr(config, "text_config", None) or config, "hidden_size", None)
    found, seen = [], set()
    for index, layer in enumerate(layers):
        moe = get_moe_module(layer, moe_config)
        if moe is None:
            continue
        path = f"{prefix}.{index}.{moe_config.moe_layer_attr}.{moe_config.experts_attr}"
        experts = getattr(moe, moe_config.experts_attr, None)
        try:
            same = experts is not None and model.get_submodule(path) is experts
        except (AttributeError, KeyError):
            same = False
        if not same:
            raise KTArtifactError(f"routed-expert subtree {path!r} is missing or not the layer's experts module")
        if getattr(experts, "_is_kt_routed_experts_wrapper", False):
            experts = getattr(experts, experts._experts_attr)
        if id(experts) in seen:
            raise KTArtifactError(f"routed-expert subtree {path!r} shares its module with another layer")
        seen.add(id(experts))
        _check_structure(path, experts, moe_config, hidden_size)
        found.append((path, experts))
    if not found:
        raise KTArtifactError("the supported KT MoE model has no routed-expert layers")
    return tuple(found)


def _claimed(model) -> Tuple[Tuple[str, Any], ...]:
    """The claimed subtrees after checking the claim still holds: same paths, same modules, still
    marked, same tensor contract; () when nothing was claimed."""
    claim = tuple(getattr(model, name, None) for name in _CLAIM)
    if claim == (None, None, None):
        return ()
    if not all(isinstance(part, tuple) for part in claim):
        raise KTArtifactError("the routed-expert ownership claim is incomplete or malformed")
    paths, refs, contracts = claim
    current = _routed_subtrees(model)
    if paths != tuple(path for path, _ in current) or not len(refs) == len(contracts) == len(paths):
        raise KTArtifactError("the routed-expert ownership paths changed since the claim")
    for (path, module), claimed, contract in zip(current, refs, contracts):
        if module is not claimed:
            raise KTArtifactError(f"routed-expert subtree {path!r} is no longer the claimed module")
        if getattr(module, RUNTIME_MODULE_MARKER, False) is not True:
            raise KTArtifactError(f"routed-expert subtree {path!r} lost its ownership marker")
        if _contract(path, module) != contract:
            raise KTArtifactError(f"routed-expert subtree {path!r} changed its tensor contract")
    return current


def claim_kt_routed_expert_subtrees(model) -> Tuple[str, ...]:
    """Claim the routed experts for KT (idempotent: a held claim is checked and its paths returned);
    the claimed paths, () for a model KT does not own experts of."""
    if any(getattr(model, name, None) is not None for name in _CLAIM):
        return tuple(path for path, _ in _claimed(model))
    subtrees = _routed_subtrees(model)
    if not subtrees:
        return ()
    for path, module in subtrees:
        if getattr(module, RUNTIME_MODULE_MARKER, False):
            raise KTArtifactError(f"routed-expert subtree {path!r} carries a marker no claim made")
    claim = (
        tuple(path for path, _ in subtrees),
        tuple(module for _, module in subtrees),
        tuple(_contract(path, module) for path, module in subtrees),
    )  # computed before anything is marked, so a failure leaves the model as it was
    for _, module in subtrees:
        setattr(module, RUNTIME_MODULE_MARKER, True)
        for parameter in module.parameters(recurse=True):
            setattr(parameter, _RUNTIME_PARAMETER_MARKER, True)
    for name, value in zip(_CLAIM, claim):
        setattr(model, name, value)
    return claim[0]


def is_kt_routed_expert_base_parameter(parameter) -> bool:
    return getattr(parameter, _RUNTIME_PARAMETER_MARKER, False) is True


@contextlib.contextmanager
def project_kt_routed_experts_out_of_device_map(model) -> Iterator[None]:
    """Within the block the claimed experts' tensors (all still on the meta device) are empty meta
    tensors, so device-map inference gives them no memory; restored, the same objects, on exit."""
    subtrees = _claimed(model)
    restore = []
    try:
        for path, experts in subtrees:
            for module in experts.modules():
                for registry in (module._parameters, module._buffers):
                    for name, tensor in tuple(registry.items()):
                        if tensor is None:
                            continue
                        if tensor.device.type != "meta":
                            raise KTArtifactError(
                                f"{path}.{name} must be on the meta device before device-map inference"
                            )
                        empty = torch.empty(0, dtype=tensor.dtype, device="meta")
                        if isinstance(tensor, torch.nn.Parameter):
                            empty = torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
                        registry[name] = empty
                        restore.append((registry, name, tensor))
        yield
    finally:
        for registry, name, tensor in reversed(restore):
            registry[name] = tensor


def prepare_kt_non_expert_device_map(model, device_map):
    """A copy of `device_map` without the claimed experts' entries (the map itself is returned for a
    model without a claim). Raises KTArtifactError when nothing else remains or when a remaining
    module would be offloaded to the CPU, the meta device or disk."""
    subtrees = _claimed(model)
    if not subtrees:
        return device_map
    if not isinstance(device_map, dict):
        raise KTArtifactError("placing the non-expert modules needs a resolved device-map dictionary")
    paths = [path for path, _ in subtrees]
    kept = {k: v for k, v in device_map.items() if not any(k == p or k.startswith(f"{p}.") for p in paths)}
    if not kept:
        raise KTArtifactError("the device map became empty after removing the routed experts")
    offloaded = {k: v for k, v in kept.items() if _is_host(v)}
    if offloaded:
        listed = ", ".join(f"{k or '<root>'}={v}" for k, v in sorted(offloaded.items()))
        raise KTArtifactError(f"the non-expert device map offloaded real tensors to CPU/disk: {listed}")
    return kept


def _is_host(device) -> bool:
    if device == "disk":
        return True
    if isinstance(device, int):
        return False
    try:
        return torch.device(device).type in ("cpu", "meta")
    except (RuntimeError, TypeError):
        return False


@contextlib.contextmanager
def hide_kt_routed_experts_from_dispatch(model) -> Iterator[None]:
    """Within the block each claimed subtree is replaced by an empty module in its parent (dispatch
    hooks never see it); the original objects are put back on exit, error or not."""
    subtrees = _claimed(model)
    restore = []
    try:
        for path, experts in subtrees:
            parent_path, child = path.rsplit(".", 1)
            parent = model.get_submodule(parent_path)
            if parent._modules.get(child) is not experts:
                raise KTArtifactError(f"routed-expert subtree {path!r} changed before dispatch")
            parent._modules[child] = torch.nn.Module()
            restore.append((parent, child, experts))
        yield
    finally:
        for parent, child, experts in reversed(restore):
            parent._modules[child] = experts


# ---- kt-kernel's DeepSeek-V3 INT8 entry points --------------------------------------------------


def _deepseek_routed_paths(config) -> Tuple[str, ...]:
    layers, first = getattr(config, "num_hidden_layers", None), getattr(config, "first_k_dense_replace", None)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (layers, first)) or not 0 <= first < layers:
        raise KTArtifactError("the model config has an invalid routed-expert layer range")
    return tuple(f"model.layers.{i}.mlp.experts" for i in range(first, layers))


def mark_kt_int8_routed_expert_base_parameters(model, plan) -> Tuple[str, ...]:
    """For a DeepSeek-V3 model loaded through a validated INT8 plan: check its fused experts'
    shapes, claim them, and mark them as INT8-owned; the paths (() without a plan or on another
    model)."""
    config = getattr(model, "config", None)
    if plan is None or getattr(config, "model_type", None) != "deepseek_v3":
        return ()
    E, I, H = (getattr(config, n, None) for n in ("n_routed_experts", "moe_intermediate_size", "hidden_size"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (E, I, H)):
        raise KTArtifactError("the model config has invalid routed-expert dimensions")
    shapes = {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}
    paths = _deepseek_routed_paths(config)
    modules, parameters = [], []
    for path in paths:
        try:
            experts = model.get_submodule(path)
        except (AttributeError, KeyError) as error:
            raise KTArtifactError(f"missing routed-expert subtree {path!r}") from error
        found: Dict[str, torch.nn.Parameter] = dict(experts.named_parameters(recurse=True))
        if set(found) != set(shapes):
            raise KTArtifactError(f"{path} parameters {sorted(found)} are not {sorted(shapes)}")
        for name, want in shapes.items():
            if tuple(found[name].shape) != want:
                raise KTArtifactError(
                    f"{path}.{name} shape mismatch: expected={want}, actual={tuple(found[name].shape)}"
                )
        modules.append(experts)
        parameters.extend(found.values())
    if tuple(path for path, _ in _routed_subtrees(model)) != paths or claim_kt_routed_expert_subtrees(model) != paths:
        raise KTArtifactError("the INT8 routed-expert paths differ from the runtime ownership claim")
    for module in modules:
        setattr(module, _INT8_MODULE_MARKER, True)
    for parameter in parameters:
        setattr(parameter, _INT8_PARAMETER_MARKER, True)
    setattr(model, _INT8_MODULE_PATHS, paths)
    return paths


def is_kt_int8_routed_expert_base_parameter(parameter) -> bool:
    return getattr(parameter, _INT8_PARAMETER_MARKER, False) is True


def _check_int8_marks(model) -> None:
    paths = getattr(model, _INT8_MODULE_PATHS, ())
    if not paths:
        return
    if tuple(paths) != _deepseek_routed_paths(model.config):
        raise KTArtifactError("the INT8 routed-expert ownership paths changed")
    for path in paths:
        try:
            module = model.get_submodule(path)
        except (AttributeError, KeyError) as error:
            raise KTArtifactError(f"routed-expert subtree {path!r} is no longer registered") from error
        if getattr(module, _INT8_MODULE_MARKER, False) is not True:
            raise KTArtifactError(f"routed-expert subtree {path!r} lost its INT8 ownership marker")


@contextlib.contextmanager
def project_kt_int8_routed_experts_out_of_device_map(model) -> Iterator[None]:
    _check_int8_marks(model)
    with project_kt_routed_experts_out_of_device_map(model):
        yield


def prepare_kt_int8_non_expert_device_map(model, device_map):
    _check_int8_marks(model)
    return prepare_kt_non_expert_device_map(model, device_map)


@contextlib.contextmanager
def hide_kt_int8_routed_experts_from_dispatch(model) -> Iterator[None]:
    _check_int8_marks(model)
    with hide_kt_routed_experts_from_dispatch(model):
        yield
