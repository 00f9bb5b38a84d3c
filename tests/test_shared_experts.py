"""One copy of the experts per node: two DDP processes (gloo) map one read-only packed-experts file,
so the experts' pages are counted once across them (each process's PSS holds half), LoRA stays per
process and is all-reduced, and training equals one process on the global batch."""

import json
import os

import pytest
import torch

from kt_testing import isa_rounds_activations

pytest.importorskip("transformers")

STEPS = 2
GLOBAL_BATCH = 4


def _data():
    return torch.randint(4, 100, (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(123))


def _train(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    for _ in range(STEPS):
        for batch in batches:
            model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _model(checkpoint, shared=None):
    import kt_ops
    from kt_ops.integration import from_pretrained

    kt_ops.set_num_threads(1)
    model = from_pretrained(checkpoint, lora_rank=4, lora_alpha=8.0, dtype=torch.float32, kt_shared_experts=shared)
    model.train()
    # the same LoRA everywhere whatever RNG the loading used; nonzero B so every LoRA matrix trains
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name) + 7 * ("lora_b" in name)))
    return model


def mappings_of(path):
    """[(start, end, rss_kB, pss_kB)] of this process's mappings of `path`, from /proc/self/smaps."""
    real = os.path.realpath(path)
    out, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                current = None
                if len(fields) >= 6 and fields[-1] == real:
                    lo, hi = (int(v, 16) for v in fields[0].split("-"))
                    current = [lo, hi, 0, 0]
                    out.append(current)
            elif current is not None and fields[0] in ("Rss:", "Pss:"):
                current[2 if fields[0] == "Rss:" else 3] = int(fields[1])
    return [tuple(m) for m in out]


def rollup():
    with open("/proc/self/smaps_rollup") as f:
        return {line.split()[0].rstrip(":"): int(line.split()[1]) for line in f if line.split()[-1] == "kB"}


def _worker(rank, world, init_file, checkpoint, shared, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from kt_ops.integration import kt_experts_modules

        model = _model(checkpoint, shared)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        per_rank = GLOBAL_BATCH // world
        _train(ddp, [_data()[rank * per_rank : (rank + 1) * per_rank]])
        experts = [kt.experts for _, _, kt in kt_experts_modules(model)]
        for e in experts:  # touch every page, whatever the routing used
            for t in (e.gate, e.up, e.down, e.gate_scale, e.up_scale, e.down_scale):
                if t is not None:
                    t.sum()
        torch.distributed.barrier()  # both processes have every page mapped before either measures
        maps = mappings_of(shared)
        inside = all(
            any(lo <= t.data_ptr() < hi for lo, hi, _, _ in maps) for e in experts for t in (e.gate, e.up, e.down)
        )
        stats = {
            "rss_kB": sum(m[2] for m in maps),
            "pss_kB": sum(m[3] for m in maps),
            "mappings": len(maps),
            "experts_in_mapping": inside,
            "rollup": rollup(),
        }
        torch.distributed.barrier()
        torch.save(
            {n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(out_dir, f"rank{rank}.pt")
        )
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(stats, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_share_one_copy_and_train_like_one(tmp_path):
    from kt_ops.integration.tiny import tiny_model

    # experts large enough that page rounding does not blur the counts: 2 MoE layers x 8 experts x 3 x 64 x 256 bf16
    tiny_model("tiny-qwen3-moe", moe_intermediate_size=256).save_pretrained(tmp_path / "ckpt")
    shared = str(tmp_path / "experts.safetensors")
    torch.multiprocessing.spawn(
        _worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ckpt"), shared, str(tmp_path)), nprocs=2, join=True
    )
    size_kB = os.path.getsize(shared) / 1024
    stats = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    for s in stats:
        assert s["experts_in_mapping"], "the experts are not views of the shared mapping"
        assert s["mappings"] == 1
        assert s["rss_kB"] >= 0.95 * size_kB  # every page resident in each process...
        assert abs(s["pss_kB"] - s["rss_kB"] / 2) <= 8  # ...and each page counted half in each
    assert abs(sum(s["pss_kB"] for s in stats) - stats[0]["rss_kB"]) <= 16  # once in total

    single = _model(str(tmp_path / "ckpt"))
    _train(single, [_data()])
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    expert_lora = [n for n in rank0 if "kt_experts" in n and "lora" in n]
    assert expert_lora
    fresh = dict(_model(str(tmp_path / "ckpt")).named_parameters())
    # With activations rounded to bf16, the ranks' halves of the batch and the single process's whole
    # batch give gradients that differ in their last bits (summation order), and SGD at lr 0.5 makes
    # that a few 1e-6 absolute on the parameters.
    atol = 1e-5 if isa_rounds_activations() else 1e-6
    for name, p in single.named_parameters():
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
        torch.testing.assert_close(rank0[name], p.detach(), rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")
    assert all(not torch.equal(rank0[n], fresh[n].detach()) for n in expert_lora)


def test_mapped_experts_are_read_only_views(tmp_path):
    from kt_ops.core.packed import pack_experts
    from kt_ops.weights.packed_io import load_packed_experts, save_packed_experts

    g = torch.Generator().manual_seed(0)
    experts = pack_experts(
        torch.randn(2, 64, 64, generator=g),
        torch.randn(2, 64, 64, generator=g),
        torch.randn(2, 64, 64, generator=g),
        "int8",
    )
    path = str(tmp_path / "p.safetensors")
    save_packed_experts(path, {5: experts})
    mapped = load_packed_experts(path, 5, mmap=True)
    ((lo, hi, _, _),) = mappings_of(path)
    assert lo <= mapped.gate.data_ptr() < hi and lo <= mapped.down_scale.data_ptr() < hi
    load_packed_experts(path, 5, mmap=True)  # a second load reuses the one mapping of the file
    assert len(mappings_of(path)) == 1
    copied = load_packed_experts(path, 5)
    for name in ("gate", "up", "down", "gate_scale", "up_scale", "down_scale"):
        assert torch.equal(getattr(mapped, name), getattr(copied, name))
    from kt_ops.weights.packed_io import _mapped_file

    assert not _mapped_file(path)[0].flags.writeable  # mapped PROT_READ: a stray write faults


def test_share_kt_experts_on_an_apply_kt_model(tmp_path):
    from kt_ops.integration import apply_kt, kt_experts_modules, share_kt_experts
    from kt_ops.integration.tiny import tiny_model

    model = apply_kt(tiny_model("tiny-qwen3-moe"), lora_rank=2)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    share_kt_experts(model, tmp_path / "e.safetensors")
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    ((lo, hi, _, _),) = mappings_of(tmp_path / "e.safetensors")
    assert all(lo <= kt.experts.down.data_ptr() < hi for _, _, kt in kt_experts_modules(model))
