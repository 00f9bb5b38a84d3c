"""kt-sft under torchrun: which process this one is, its share of the node's cores, and the one copy
of the packed experts that the processes of a node map.

torchrun (`torchrun --nnodes M --nproc-per-node N -m kt_ops.cli train config.yaml`) starts one
process per GPU (or, without GPUs, per share of the CPU) and tells each its place through the
environment; transformers' TrainingArguments (accelerate) starts torch.distributed from it.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Optional

from .config import ConfigError

# Where the processes of a node share the packed experts, when it has room: memory that is the file.
SHARED_MEMORY = "/dev/shm"


@dataclass(frozen=True)
class Processes:
    """This process's place among the job's: torchrun's RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE and GROUP_RANK (the node), or one process alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node: int = 0

    @classmethod
    def from_env(cls) -> "Processes":
        env = os.environ
        try:
            world = int(env.get("WORLD_SIZE", 1))
            if world > 1 and not all(name in env for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")):
                # Which processes share a node (and its experts file) is torchrun's to say.
                raise ConfigError(
                    "WORLD_SIZE is set, but not RANK, LOCAL_RANK and LOCAL_WORLD_SIZE: launch the processes "
                    "of kt-sft with torchrun"
                )
            local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
            rank = int(env.get("RANK", 0))
            node = int(env.get("GROUP_RANK", rank // local_world))
            return cls(rank, world, int(env.get("LOCAL_RANK", 0)), local_world, node)
        except ValueError as e:
            raise ConfigError(f"a torchrun environment variable is not an integer ({e})") from None

    @property
    def main(self) -> bool:
        """The process that logs and writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def split_threads(config: dict, processes: Processes) -> None:
    """Without kt_num_threads in the config, the node's physical cores are shared evenly among its
    processes (each would otherwise size its kt_ops pool to all of them)."""
    if config["kt_num_threads"] is not None or processes.local_world_size == 1:
        return
    from ..core.runtime import cpu_info, usable_cpus

    cores = min(cpu_info()["physical_cores"], usable_cpus())
    config["kt_num_threads"] = max(1, cores // processes.local_world_size)


def _unshareable(config: dict) -> Optional[str]:
    if config["kt_threadpool_count"] > 1:
        return "kt_threadpool_count > 1 splits each layer over sub-pools, and the shared file holds it whole"
    if config["kt_num_gpu_experts"]:
        return "kt_num_gpu_experts keeps experts in transformers, outside the shared file"
    return None


def _directory(config: dict) -> str:
    """/dev/shm when it has room for the packed experts (and a tenth more), else output_dir."""
    from ..plan import plan_from_config

    plan = plan_from_config(config, all_formats=False)
    need = plan.packed_bytes[plan.weight_format]
    try:
        stat = os.statvfs(SHARED_MEMORY)
        if os.access(SHARED_MEMORY, os.W_OK) and stat.f_bavail * stat.f_frsize > 1.1 * need:
            return SHARED_MEMORY
    except OSError:
        pass
    return config["output_dir"]


def shared_experts_file(config: dict, processes: Processes) -> Optional[str]:
    """(every process calls it; torch.distributed started) The file that the processes of this node map
    the packed experts from, which the node's local rank 0 writes (kt_ops.integration.from_pretrained's
    kt_shared_experts), or None where each process keeps its own experts (one process per node, or a
    setting the file cannot hold). One name per run and node: two nodes on one machine, or on one
    shared output_dir, write two files."""
    import torch.distributed as dist

    if not config["use_kt"] or processes.local_world_size == 1:
        return None
    reason = _unshareable(config)
    if reason is not None:
        if processes.main:
            print(f"kt-sft: each process holds its own copy of the experts: {reason}")
        return None
    run = [uuid.uuid4().hex[:12]]
    dist.broadcast_object_list(run, src=0)
    name = f"kt_sft-experts-{run[0]}-node{processes.node}.safetensors"
    mine = os.path.join(_directory(config), name) if processes.local_rank == 0 else None
    chosen = [None] * processes.world_size
    dist.all_gather_object(chosen, (processes.node, mine))
    # Every process of a node takes its local rank 0's choice.
    files = {node: path for node, path in chosen if path is not None}
    if processes.main:
        print(
            f"kt-sft: the experts are packed once per node and mapped by its {processes.local_world_size} "
            f"processes: {', '.join(files[n] for n in sorted(files))} (removed once mapped)"
        )
    return files[processes.node]


def release_shared_experts(path: Optional[str], processes: Processes) -> None:
    """(every process calls it) Once every process has mapped the shared file, the node's local rank 0
    removes its name: the mappings keep the pages until the last process exits, a killed one too, so
    nothing is left behind in /dev/shm or output_dir."""
    if path is None:
        return
    import torch.distributed as dist

    dist.barrier()
    if processes.local_rank == 0:
        os.unlink(path)
