"""Which transformers MoE architectures run on kt_ops: one row per model type whose experts use
`@use_experts_implementation` or that apply_kt adopts (Llama-4, LongCat-Flash), built tiny from its
config class (sizes shrunk, random weights, nothing downloaded).

    python benchmarks/arch_table.py [model_type ...]

Columns: logits of `apply_kt(model, lora_rank=0)` vs transformers' eager experts (fp32, relative L2;
the AMXBF16 backend packs to bf16), the same with AMXINT8 and AMXINT4 packing, and a 4-step AdamW
run through stock peft (expert LoRA via apply_kt's lora_rank + attention-free config) whose loss
must fall. An architecture apply_kt refuses shows the first line of its error. "not built" means
this generic shrinking did not produce a working causal LM for that config (not a kt_ops verdict).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from common import MarkdownTable, machine_line

# Shrunk sizes, applied to every config field of that name that exists.
SMALL = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "expert_ffn_hidden_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "n_routed_experts": 8,
    "num_local_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "top_k": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "qk_head_dim": 16,
    "first_k_dense_replace": 1,
    "n_group": 2,
    "topk_group": 1,
    "max_position_embeddings": 128,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "num_shared_experts": 1,
    "n_shared_experts": 1,
    "moe_layer_start_index": 0,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "tie_word_embeddings": False,
    "sliding_window": 64,
    # vision / audio towers of multimodal models (built, unused by text-only input)
    "depth": 1,
    "num_heads": 4,
    "out_hidden_size": 64,
    "encoder_layers": 1,
    "d_model": 64,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "output_dim": 64,
    # Jamba: layer 1 has attention and experts
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    # Mamba mixers: heads x head size = expand x hidden_size
    "mamba_n_heads": 4,
    "mamba_d_head": 32,
}
# Per model type, after SMALL: LongCat-Flash's 256 identity experts by default would leave the 8 real
# ones almost never chosen.
SMALL_BY_TYPE = {"longcat_flash": {"zero_expert_num": 4}}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _shrink(config):
    layers = getattr(config, "num_hidden_layers", None)
    head, rope, nope = (getattr(config, k, None) for k in ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim"))
    for key, value in {**SMALL, **SMALL_BY_TYPE.get(config.model_type, {})}.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except Exception:  # noqa: BLE001 - some configs validate fields; keep their value
                pass
    for key, value in list(vars(config).items()):
        # per-layer lists (layer_types, mlp_layer_types, ...) follow the shrunk depth, keeping one layer
        # of every kind they name first (a hybrid model keeps a full-attention layer)
        if key.endswith("layer_types") and isinstance(value, list) and layers and len(value) == layers:
            kinds = list(dict.fromkeys(value))[: config.num_hidden_layers]
            setattr(config, key, kinds + [value[0]] * (config.num_hidden_layers - len(kinds)))
        # token ids past the shrunk vocabulary (an embedding's padding_idx must lie inside it)
        if key in TOKEN_IDS and isinstance(value, int) and value >= SMALL["vocab_size"]:
            setattr(config, key, 0)
    if hasattr(config, "kv_lora_rank"):
        # MLA: one key/value head per query head; head_dim keeps its meaning (the rotary slice, or
        # the whole query/key head with a partial rotary factor)
        config.num_key_value_heads = config.num_attention_heads
        if head is not None and head == rope:
            config.head_dim = config.qk_rope_head_dim
        elif head is not None and nope is not None and head == rope + nope:
            config.head_dim = config.qk_rope_head_dim + config.qk_nope_head_dim
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "mrope_section" in (*rope, *getattr(config, "ignore_keys_at_rope_validation", ())):
        # multimodal RoPE: the sections split the rotary half of a (shrunk) head
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        half = int(head * rope.get("partial_rotary_factor", 1.0)) // 2
        n = len(rope.get("mrope_section", (0, 0, 0)))
        rope["mrope_section"] = [half // n + (i < half % n) for i in range(n)]
    for sub in getattr(config, "sub_configs", {}):
        if getattr(config, sub, None) is not None:
            _shrink(getattr(config, sub))
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    config.use_cache = False  # one forward per batch, no generation (a mamba-only model has no cache length)
    return config


def _build(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from kt_ops.integration.tiny import TINY_MODELS, tiny_config

    tiny = "tiny-" + model_type.replace("_", "-")
    # the test suite's hand-made tiny configs where the generic shrinking does not fit (MLA attention)
    config = tiny_config(tiny) if tiny in TINY_MODELS else _shrink(AutoConfig.for_model(model_type))
    # Qwen3-Omni: the thinker is the language model (its talker turns the thinker's output into speech)
    config = getattr(config, "thinker_config", None) or config
    torch.manual_seed(0)
    # vision-language models run text-only input through the whole conditional-generation model
    auto = (
        AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModelForImageTextToText
    )
    return auto.from_config(config, dtype=torch.float32).eval()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _row(model_type: str) -> tuple:
    import peft

    from kt_ops.integration import apply_kt
    from kt_ops.integration.tiny import train_steps

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    try:
        model = _build(model_type)
        with torch.no_grad():
            ref = model(input_ids=ids).logits
    except Exception as e:  # noqa: BLE001
        return (
            model_type,
            f"not built ({type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''})",
            "",
            "",
            "",
        )
    cells = []
    for backend in ("AMXBF16", "AMXINT8", "AMXINT4"):
        try:
            kt = apply_kt(_build(model_type), kt_backend=backend, lora_rank=0)
            with torch.no_grad():
                cells.append(f"{_rel(kt(input_ids=ids).logits, ref):.1e}")
        except Exception as e:  # noqa: BLE001
            return model_type, f"refused: {str(e).splitlines()[0][:300]}", "", "", ""
    try:
        model = apply_kt(_build(model_type).train(), lora_rank=4, lora_alpha=8.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[]))
        losses = train_steps(model, ids, steps=4, lr=2e-2)
        train = f"{losses[0]:.3f} -> {losses[-1]:.3f}" + ("" if losses[-1] < losses[0] else " (no fall)")
    except Exception as e:  # noqa: BLE001
        train = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return (model_type, *cells, train)


def model_types() -> list[str]:
    import pathlib

    import transformers

    from kt_ops.integration.custom_experts import CUSTOM_EXPERTS_MODEL_TYPES

    root = pathlib.Path(transformers.__file__).parent / "models"
    decorated = {
        p.parent.name
        for p in root.glob("*/modeling_*.py")
        if "modular" not in p.name and "use_experts_implementation" in p.read_text()
    }
    return sorted(decorated | set(CUSTOM_EXPERTS_MODEL_TYPES))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_type", nargs="*", help="transformers model types (default: every MoE one)")
    torch.set_num_threads(1)
    types = parser.parse_args(argv).model_type or model_types()
    print(f"# transformers MoE architectures on kt_ops; {machine_line()}")
    table = MarkdownTable(
        "model_type",
        "logits rel. err. AMXBF16",
        "AMXINT8",
        "AMXINT4",
        "expert-LoRA training loss (4 steps)",
        align="lrrrl",
    )
    for t in types:
        table.row(*_row(t))


if __name__ == "__main__":
    main(sys.argv[1:])
