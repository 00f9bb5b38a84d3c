"""Peak host memory of loading a sharded MoE checkpoint with its experts on kt_ops:
transformers' `from_pretrained` followed by `apply_kt`, against `kt_ops.integration.from_pretrained`
(meta-device model, experts streamed layer by layer into the packed form).

A synthetic Qwen3-MoE checkpoint (bf16, per-expert keys as the published checkpoints have them, one
shard per layer) is written to a temporary directory and removed afterwards. Each loader runs in a
fresh subprocess; its peak RSS is `ru_maxrss` after loading and one forward. The import-only RSS
(python + torch + transformers + kt_ops) is measured the same way and reported beside it.

    python benchmarks/bench_load.py                  # ~2.5 GB checkpoint, AMXBF16 and AMXINT8
    python benchmarks/bench_load.py --layers 4       # smaller
    python benchmarks/bench_load.py --shared-experts # 2 gloo processes: own experts vs one shared file

`--shared-experts` loads the checkpoint in two DDP-style processes (gloo), first each with its own
packed experts, then with `kt_shared_experts` (one read-only file mapped by both), and reports each
process's RSS and PSS from /proc/self/smaps_rollup after a forward with every expert page touched.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's kt_ops, for this process and (via PYTHONPATH) the children
from common import ChildFailed, MarkdownTable, machine_line, proc_status_kib, run_child  # noqa: E402


def config(args):
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=8192,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.moe_intermediate,
        num_experts=args.experts,
        num_experts_per_tok=4,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        norm_topk_prob=True,
        dtype="bfloat16",
    )


def write_checkpoint(path, args) -> dict:
    """One shard per layer (written and freed one at a time) plus one for the rest."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = config(args)
    cfg.save_pretrained(path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters() if ".mlp.experts." not in n}
    weight_map, sizes = {}, {"experts": 0, "other": 0}
    shards = args.layers + 1

    def rand(shape, std=0.02):
        return (torch.randn(shape, generator=gen) * std).bfloat16()

    for layer in range(args.layers):
        tensors = {}
        for e in range(args.experts):
            for proj, shape in (
                ("gate_proj", (args.moe_intermediate, args.hidden)),
                ("up_proj", (args.moe_intermediate, args.hidden)),
                ("down_proj", (args.hidden, args.moe_intermediate)),
            ):
                tensors[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = rand(shape)
        sizes["experts"] += sum(t.numel() * 2 for t in tensors.values())
        for name, shape in shapes.items():
            if name.startswith(f"model.layers.{layer}."):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16) if "norm" in name else rand(shape)
                sizes["other"] += tensors[name].numel() * 2
        name = f"model-{layer + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    rest = {
        n: (torch.ones(s, dtype=torch.bfloat16) if "norm" in n else rand(s))
        for n, s in shapes.items()
        if not n.startswith("model.layers.")
    }
    sizes["other"] += sum(t.numel() * 2 for t in rest.values())
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(rest, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f)
    sizes["layer_source"] = sizes["experts"] // args.layers
    return sizes


def child(mode: str, path: str, backend: str) -> None:
    import kt_ops
    from kt_ops.integration import apply_kt, from_pretrained, kt_experts_modules

    kt_ops.set_num_threads(1)
    t0 = time.perf_counter()
    if mode == "imports":
        import transformers  # noqa: F401

        model = None
    elif mode == "stock":
        from transformers import AutoModelForCausalLM

        model = apply_kt(
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), kt_backend=backend, lora_rank=8
        )
    else:
        model = from_pretrained(path, kt_backend=backend, lora_rank=8, dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    packed = 0
    if model is not None:
        packed = sum(kt.experts.nbytes() for _, _, kt in kt_experts_modules(model))
        with torch.no_grad():
            model(input_ids=torch.arange(16)[None])
    # VmHWM is this process's own high-water mark; ru_maxrss also keeps the parent's RSS at fork
    # (Linux carries it across execve), which only matters when the child stays below it.
    hwm_kB = proc_status_kib("VmHWM")
    peak_kB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kB": peak_kB, "hwm_kB": hwm_kB, "seconds": seconds, "packed": packed}))


def rollup() -> dict:
    with open("/proc/self/smaps_rollup") as f:
        return {line.split()[0].rstrip(":"): int(line.split()[1]) for line in f if line.split()[-1] == "kB"}


def shared_worker(rank, world, init_file, path, backend, shared, out_dir):
    import kt_ops
    from kt_ops.integration import from_pretrained, kt_experts_modules

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        kt_ops.set_num_threads(1)
        model = from_pretrained(path, kt_backend=backend, lora_rank=8, dtype=torch.bfloat16, kt_shared_experts=shared)
        with torch.no_grad():
            model(input_ids=torch.arange(16)[None])
            for _, _, kt in kt_experts_modules(model):  # every page resident, whatever the routing
                for t in (kt.experts.gate, kt.experts.up, kt.experts.down):
                    t.sum()
        torch.distributed.barrier()
        r = rollup()
        torch.distributed.barrier()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(r, f)
    finally:
        torch.distributed.destroy_process_group()


def shared_experts(root, backend):
    print(f"\n2 processes (gloo), {backend}: RSS / PSS per process from /proc/self/smaps_rollup (GiB)")
    table = MarkdownTable(
        "experts", "rank", "Rss", "Pss", "Pss_Anon", "Pss_File", "sum of Pss over ranks", align="llrrrrr"
    )
    for label, shared in (
        ("own copy per process", None),
        ("one shared file (kt_shared_experts)", os.path.join(root, "experts.safetensors")),
    ):
        out = tempfile.mkdtemp(dir=root)
        torch.multiprocessing.spawn(
            shared_worker, args=(2, os.path.join(out, "init"), root, backend, shared, out), nprocs=2, join=True
        )
        stats = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]
        total = sum(s["Pss"] for s in stats) / 2**20
        for r, s in enumerate(stats):
            g = {k: s.get(k, 0) / 2**20 for k in ("Rss", "Pss", "Pss_Anon", "Pss_File")}
            table.row(label, r, *(f"{g[k]:.2f}" for k in ("Rss", "Pss", "Pss_Anon", "Pss_File")), f"{total:.2f}")
        if shared:
            print(f"shared experts file: {os.path.getsize(shared) / 2**30:.2f} GiB")


def run_loader(mode, path, backend):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
    try:
        return run_child([__file__, "--child", mode, "--path", path, "--backend", backend], env=env)
    except ChildFailed as exc:
        raise RuntimeError(f"{mode} loader failed:\n{exc.stderr[-3000:]}") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--backends", default="AMXBF16,AMXINT8")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--child", default=None)
    parser.add_argument("--path", default=None)
    parser.add_argument("--backend", default="AMXBF16")
    parser.add_argument("--shared-experts", action="store_true")
    parser.add_argument("--loaders", default="stock,ours", help="which loaders to run: stock, ours")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.backend)
        return
    root = tempfile.mkdtemp(prefix="kt_bench_load_", dir=args.dir)
    try:
        t0 = time.perf_counter()
        sizes = write_checkpoint(root, args)
        print(f"# {machine_line()}")
        print(
            f"checkpoint: {(sizes['experts'] + sizes['other']) / 2**30:.2f} GiB ({sizes['experts'] / 2**30:.2f} GiB "
            f"experts, {sizes['other'] / 2**20:.0f} MiB other, one layer's experts "
            f"{sizes['layer_source'] / 2**20:.0f} MiB), written in {time.perf_counter() - t0:.0f} s; "
            f"{args.layers} layers x {args.experts} experts, hidden {args.hidden}, moe_intermediate "
            f"{args.moe_intermediate}"
        )
        if args.shared_experts:
            shared_experts(root, args.backends.split(",")[-1])
            return
        base = run_loader("imports", root, "AMXBF16")["hwm_kB"] / 2**20
        print(f"imports only (python + torch + transformers + kt_ops): VmHWM {base:.2f} GiB")
        table = MarkdownTable(
            "backend",
            "loader",
            "peak RSS: VmHWM (GiB)",
            "ru_maxrss (GiB)",
            "above imports (GiB)",
            "bound: packed + other + 1 layer + 10% (GiB)",
            "load time (s)",
            align="llrrrrr",
        )
        for backend in args.backends.split(","):
            for mode, label in (
                ("stock", "transformers from_pretrained + apply_kt"),
                ("ours", "kt_ops.integration.from_pretrained"),
            ):
                if mode not in args.loaders.split(","):
                    continue
                r = run_loader(mode, root, backend)
                peak = r["hwm_kB"] / 2**20
                bound = 1.1 * (r["packed"] + sizes["other"] + sizes["layer_source"]) / 2**30
                table.row(
                    backend,
                    label,
                    f"{peak:.2f}",
                    f"{r['peak_kB'] / 2**20:.2f}",
                    f"{peak - base:.2f}",
                    f"{bound:.2f}",
                    f"{r['seconds']:.1f}",
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
