"""Data parallel training with stock DDP (gloo on CPU): each process holds its own CPU experts, and
the expert LoRA (ordinary nn.Parameters) is all-reduced with everything else, so two processes on
half batches end where one process on the whole batch ends."""

import os

import pytest
import torch

pytest.importorskip("transformers")

STEPS = 2
GLOBAL_BATCH = 4


def _data():
    gen = torch.Generator().manual_seed(123)
    return torch.randint(4, 100, (GLOBAL_BATCH, 12), generator=gen)


def _train(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    for _ in range(STEPS):
        for batch in batches:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _model():
    import kt_ops
    from kt_ops.integration import apply_kt
    from kt_ops.integration.tiny import tiny_model

    kt_ops.set_num_threads(1)
    model = tiny_model("tiny-qwen3-moe", seed=0)
    apply_kt(model, lora_rank=4, lora_alpha=8.0)
    # B starts at zero in peft's convention; nonzero B makes every LoRA matrix's gradient nonzero.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        per_rank = GLOBAL_BATCH // world
        _train(ddp, [_data()[rank * per_rank : (rank + 1) * per_rank]])
        torch.save(
            {n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(out_dir, f"rank{rank}.pt")
        )
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = _model()
    _train(single, [_data()])
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    expert_lora = [n for n in rank0 if "kt_experts" in n and "lora" in n]
    assert expert_lora, "the model has no kt expert LoRA parameters"
    for name, p in single.named_parameters():
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
        torch.testing.assert_close(rank0[name], p.detach(), rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the expert LoRA actually trained
    fresh = dict(_model().named_parameters())
    assert all(not torch.equal(rank0[n], fresh[n].detach()) for n in expert_lora)
