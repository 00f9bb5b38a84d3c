"""Moving a call's tensors to the host (the kernels compute on the CPU) and its output back.

Two ways, for two kinds of caller: `to_host` returns when the copy has landed (the layer, the SFT
wrappers: their next step reads the data); `to_host_async` queues the copies on a CUDA stream and
hands back an event, so that an inference engine's submit returns at once and the CPUInfer thread
waits for the event instead. Tensors already on the CPU are used as they are.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


def to_host(tensor: torch.Tensor, staging: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`tensor` on the CPU: itself there, else copied into `staging` (a reused, pinned buffer of its
    shape; a buffer of another dtype is not used) or into a new tensor (`Tensor.to`, which autograd
    follows back to the device)."""
    if tensor.device.type == "cpu":
        return tensor
    if staging is None or staging.dtype != tensor.dtype:
        return tensor.to("cpu")
    staging.copy_(tensor, non_blocking=True)
    if tensor.device.type == "cuda":
        torch.cuda.current_stream(tensor.device).synchronize()
    return staging


def cuda_stream_of(device: torch.device, cuda_stream):
    """`cuda_stream` as a torch stream: a torch.cuda.Stream, a raw stream handle, or None / 0 for the
    device's current stream."""
    if cuda_stream is None or cuda_stream == 0:
        return torch.cuda.current_stream(device)
    if isinstance(cuda_stream, int):
        return torch.cuda.ExternalStream(cuda_stream, device=device)
    return cuda_stream


def to_host_async(tensors: Sequence[torch.Tensor], cuda_stream=None) -> Tuple[list, Optional["torch.cuda.Event"]]:
    """The tensors on the CPU and, when the first is on a GPU, the event after which their pinned
    copies (ordered on `cuda_stream`) have landed; None when nothing was copied."""
    if tensors[0].device.type != "cuda":
        return [t.to("cpu") for t in tensors], None
    stream = cuda_stream_of(tensors[0].device, cuda_stream)
    with torch.cuda.stream(stream):
        host = []
        for t in tensors:
            if t.device.type == "cuda":
                pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                pinned.copy_(t, non_blocking=True)
                host.append(pinned)
            else:
                host.append(t)
        event = torch.cuda.Event()
        event.record(stream)
    return host, event


def to_device(output: torch.Tensor, device: torch.device, cuda_stream=None) -> torch.Tensor:
    """`output` on `device`; to a GPU through a pinned buffer, ordered on `cuda_stream`, without
    waiting for the copy."""
    if device.type != "cuda":
        return output.to(device)
    stream = cuda_stream_of(device, cuda_stream)
    with torch.cuda.stream(stream):
        pinned = torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
        pinned.copy_(output)
        result = torch.empty(output.shape, dtype=output.dtype, device=device)
        result.copy_(pinned, non_blocking=True)  # the caching host allocator keeps `pinned` alive for it
    return result
