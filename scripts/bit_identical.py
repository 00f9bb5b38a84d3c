"""Outputs and gradients of every front-end (KTMoELayer, moe_sft, KTMoEFunction, the SFT and inference
wrappers, apply_kt + peft, from_pretrained) for every SFT method, saved to a file or compared with one.

A refactoring of the Python front-end must leave every number the kernels produce unchanged: run
`save` on the old checkout and `compare` on the new one, with the same extension (.so) and ISA:

    cd /tmp && PYTHONPATH=/path/to/old python /path/to/scripts/bit_identical.py save old.pt --threadpool 1
    cd /tmp && PYTHONPATH=/path/to/new python /path/to/scripts/bit_identical.py compare old.pt --threadpool 1

(`--threadpool 2` in a second process: the process's worker pool is configured once.) Only public
names that exist on both sides are used.
"""

from __future__ import annotations

import argparse
import sys

import torch

import kt_ops

SFT_METHODS = (
    "AMXBF16_SFT",
    "AMXINT8_SFT",
    "AMXINT4_SFT",
    "AMXINT4_1_SFT",
    "AMXINT4_KGroup_SFT",
    "AMXINT4_1KGroup_SFT",
    "AMXFP8_SFT",
)
BACKENDS = ("AMXBF16", "AMXINT8", "AMXINT4", "AMXINT4_1", "AMXINT4_KGroup", "AMXINT4_1KGroup", "AMXFP8")
E, K, H, I, R, T = 6, 2, 128, 256, 4, 9


def case(seed: int, dtype=torch.float32, lora_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[1, 0] = -1
    return dict(
        hidden=w(T, H).mul(10).to(dtype),
        ids=ids,
        weights=torch.rand(T, K, generator=g),
        gate=w(E, I, H),
        up=w(E, I, H),
        down=w(E, H, I),
        grad=w(T, H).mul(10).to(dtype),
        lora=[
            w(E, R, H).to(lora_dtype),
            w(E, I, R).to(lora_dtype),
            w(E, R, H).to(lora_dtype),
            w(E, I, R).to(lora_dtype),
            w(E, R, I).to(lora_dtype),
            w(E, H, R).to(lora_dtype),
        ],
    )


def layer_results(out: dict) -> None:
    for method in SFT_METHODS:
        for dtype, lora_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
            c = case(1, dtype, lora_dtype)
            layer = kt_ops.KTMoELayer(
                E, H, I, lora_rank=R, lora_alpha=8.0, method=method, lora_dtype=lora_dtype, group_size=32
            )
            layer.load_weights_from_tensors(c["gate"], c["up"], c["down"])
            with torch.no_grad():
                for p, t in zip(layer.lora_parameters(), c["lora"]):
                    p.copy_(t)
            x = c["hidden"].clone().requires_grad_()
            w = c["weights"].clone().requires_grad_()
            y = layer(x, c["ids"], w)
            y.backward(c["grad"])
            key = f"layer/{method}/{dtype}"
            out[key + "/y"] = y.detach()
            out[key + "/dx"], out[key + "/dw"] = x.grad, w.grad
            for i, p in enumerate(layer.lora_parameters()):
                out[f"{key}/dlora{i}"] = p.grad
            # functional form and autograd.Function over the same packed experts
            lora = [t.clone().requires_grad_() for t in c["lora"]]
            x2 = c["hidden"].clone().requires_grad_()
            y2 = kt_ops.KTMoEFunction.apply(x2, c["ids"], c["weights"], layer.experts, *lora, 2.0)
            y2.backward(c["grad"])
            out[key + "/fn/y"], out[key + "/fn/dx"] = y2.detach(), x2.grad
            for i, t in enumerate(lora):
                out[f"{key}/fn/dlora{i}"] = t.grad
            y3 = kt_ops.moe_sft(c["hidden"], c["ids"], c["weights"], layer.experts, None, 0.0)
            out[key + "/nolora/y"] = y3
        layer0 = kt_ops.KTMoELayer(E, H, I, lora_rank=0, method=method, group_size=32)
        c = case(2)
        layer0.load_weights_from_tensors(c["gate"], c["up"], c["down"])
        x = c["hidden"].clone().requires_grad_()
        y = layer0(x, c["ids"], c["weights"])
        y.backward(c["grad"])
        out[f"layer0/{method}/y"], out[f"layer0/{method}/dx"] = y.detach(), x.grad


def sft_wrapper_results(out: dict, threadpool: int) -> None:
    for method in SFT_METHODS + tuple(m + "_SkipLoRA" for m in SFT_METHODS):
        for gpu_experts, dtype in ((0, torch.float32), (1, torch.bfloat16)):
            c = case(3, dtype)
            wrapper = kt_ops.KTMoEWrapper(
                layer_idx=0,
                num_experts=E,
                num_experts_per_tok=K,
                hidden_size=H,
                moe_intermediate_size=I,
                num_gpu_experts=gpu_experts,
                cpuinfer_threads=2,
                threadpool_count=threadpool,
                weight_path=None,
                chunked_prefill_size=512,
                mode="sft",
                method=method,
                lora_rank=R,
                lora_alpha=8.0,
                max_cache_depth=2,
                group_size=32,
            )
            wrapper.load_weights_from_tensors(c["gate"], c["up"], c["down"], torch.arange(E))
            if not method.endswith("_SkipLoRA"):
                wrapper.init_lora_weights(*c["lora"])
            key = f"wrapper{threadpool}/{method}/{gpu_experts}"
            out[key + "/y0"] = wrapper.forward_sft(c["hidden"], c["ids"], c["weights"], save_for_backward=True)
            out[key + "/y1"] = wrapper.forward_sft(c["hidden"] * 0.5, c["ids"], c["weights"], save_for_backward=True)
            for step in (1, 0):
                grad_input, grads = wrapper.backward(c["grad"] * (step + 1))
                out[f"{key}/dx{step}"] = grad_input
                for name, g in sorted(grads.items()):
                    out[f"{key}/{name}{step}"] = g
            out[key + "/infer"] = wrapper.forward_sft(c["hidden"], c["ids"], c["weights"], save_for_backward=False)


def inference_wrapper_results(out: dict, threadpool: int) -> None:
    for method in ("AMXINT4", "AMXINT8", "MOE_INT4", "MOE_INT8", "LLAMAFILE", "FP8", "RAWINT4"):
        for deferred in (None, 1):
            c = case(4, torch.bfloat16)
            wrapper = kt_ops.KTMoEWrapper(
                layer_idx=0,
                num_experts=E,
                num_experts_per_tok=K,
                hidden_size=H,
                moe_intermediate_size=I,
                num_gpu_experts=1,
                cpuinfer_threads=2,
                threadpool_count=threadpool,
                weight_path=None,
                chunked_prefill_size=4,
                mode="inference",
                method=method,
                max_deferred_experts_per_token=deferred,
            )
            wrapper.load_weights_from_tensors(c["gate"], c["up"], c["down"], torch.arange(E))
            key = f"inference{threadpool}/{method}/{deferred}"
            out[key + "/y0"] = wrapper.forward(c["hidden"], c["ids"], c["weights"])
            out[key + "/y1"] = wrapper.forward(c["hidden"] * 2, c["ids"], c["weights"])
            if deferred:
                out[key + "/owed"] = wrapper.flush_deferred(c["hidden"])


def hf_results(out: dict, tmp: str) -> None:
    import peft

    from kt_ops.integration import apply_kt, from_pretrained
    from kt_ops.integration.tiny import tiny_model

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    for backend in BACKENDS:
        for gpu_experts, with_peft in ((0, True), (2, True), (0, False)):
            torch.manual_seed(0)
            model = apply_kt(
                tiny_model("tiny-qwen3-moe", hidden_size=128, moe_intermediate_size=128),
                kt_backend=backend,
                lora_rank=4,
                lora_alpha=8.0,
                kt_num_gpu_experts=gpu_experts,
            )
            if with_peft:
                torch.manual_seed(1)
                model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
            torch.manual_seed(2)
            for name, p in model.named_parameters():  # LoRA B is zero: give every LoRA factor values
                if "lora_" in name and p.requires_grad:
                    with torch.no_grad():
                        p.copy_(torch.randn_like(p) * 0.05)
            key = f"apply_kt/{backend}/{gpu_experts}/{with_peft}"
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            out[key + "/loss"] = loss.detach()
            for name, p in sorted(model.named_parameters()):
                if p.grad is not None:
                    out[f"{key}/grad/{name}"] = p.grad
    tiny_model("tiny-deepseek-v3").save_pretrained(tmp)
    for backend in ("AMXBF16", "AMXINT8"):
        model = from_pretrained(tmp, kt_backend=backend, lora_rank=4, lora_alpha=8.0, dtype=torch.float32)
        out[f"from_pretrained/{backend}/logits"] = model(input_ids=ids).logits.detach()


def collect(threadpool: int, tmp: str) -> dict:
    out: dict = {}
    sft_wrapper_results(out, threadpool)
    inference_wrapper_results(out, threadpool)
    if threadpool == 1:
        layer_results(out)
        hf_results(out, tmp)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("save", "compare"))
    parser.add_argument("file")
    parser.add_argument("--threadpool", type=int, default=1)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        got = collect(args.threadpool, tmp)
    if args.action == "save":
        torch.save(got, args.file)
        print(f"saved {len(got)} tensors ({kt_ops.get_isa()}) from {kt_ops.__file__}")
        return 0
    want = torch.load(args.file)
    missing = sorted(set(want) ^ set(got))
    differ = [k for k in sorted(set(want) & set(got)) if not torch.equal(want[k], got[k])]
    print(
        f"{len(got)} tensors ({kt_ops.get_isa()}) from {kt_ops.__file__}: {len(differ)} differ, "
        f"{len(missing)} present on one side only"
    )
    for k in (differ + missing)[:20]:
        print("  ", k)
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
