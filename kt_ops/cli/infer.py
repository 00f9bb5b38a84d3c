"""kt-sft generate / score / export: the config's model with a trained adapter, answering a prompt,
compared with the training answers, or written with its LoRA merged."""

from __future__ import annotations

import os
from typing import Optional

from .config import ConfigError, load_config
from .data import load_rows
from .model import build_model, chat_template


def _trained_model(config: dict, adapter_dir: Optional[str]):
    """The config's model with the adapter from `adapter_dir` (default output_dir; "none": the base
    model as training starts, LoRA B = 0), in eval mode, its tokenizer and template."""
    from ..core.durable import recover
    from ..integration import load_kt_adapter

    model, tokenizer = build_model(config)
    adapter_dir = adapter_dir or config["output_dir"]
    if adapter_dir != "none":
        if not os.path.isdir(adapter_dir):
            raise ConfigError(f"no adapter directory {adapter_dir}: run `kt-sft train` first or pass --adapter")
        recover(adapter_dir)  # completes a final save that a kill interrupted
        if config["use_kt"]:
            load_kt_adapter(model, adapter_dir)
        else:
            import peft

            peft.set_peft_model_state_dict(model, peft.load_peft_weights(adapter_dir))
    model.eval()
    return model, tokenizer, chat_template(config, tokenizer)


def _greedy_answers(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuations of `texts` (batched, left-padded), each up to its first eos."""
    import torch

    answers, side = [], tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(texts), batch_size):
            inputs = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            with torch.no_grad():
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            answers += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def generate(config, prompt: str, max_new_tokens: int = 32, adapter_dir: Optional[str] = None) -> str:
    """Greedy answer to `prompt` (a user message, formatted with the config's template) by the base
    model with the trained adapter (from `adapter_dir`, default the config's output_dir; "none" for
    the untrained model), its experts computed by kt_ops when use_kt."""
    from ..integration import llamafactory as lf

    config = load_config(config, quiet=True)
    model, tokenizer, template = _trained_model(config, adapter_dir)
    text = lf.prompt_text(template, [{"role": "user", "content": prompt}], None, tokenizer)
    return _greedy_answers(model, tokenizer, [text], max_new_tokens)[0]


def score(config, adapter_dir: Optional[str] = None, show: int = 3) -> dict:
    """Greedy answers to every single-turn training question, compared exactly with the dataset's
    answers (surrounding whitespace and an empty thought aside). Prints the first `show` side by side;
    returns {"exact": n, "total": n, "rows": [(question, expected, answer)]}."""
    from ..integration import llamafactory as lf

    config = load_config(config, quiet=True)
    rows = [r for r in load_rows(config) if "messages" in r and "chosen" not in r and len(r["messages"]) == 2]
    if not rows:
        raise ConfigError("score needs single-turn question/answer records in the dataset")
    model, tokenizer, template = _trained_model(config, adapter_dir)
    texts = [lf.prompt_text(template, row["messages"][:1], row["system"], tokenizer) for row in rows]
    budget = max(len(tokenizer(r["messages"][1]["content"], add_special_tokens=False)["input_ids"]) for r in rows)
    answers = _greedy_answers(model, tokenizer, texts, budget + 8)
    results = [
        (row["messages"][0]["content"], row["messages"][1]["content"], answer.strip())
        for row, answer in zip(rows, answers)
    ]
    exact = sum(expected.strip() == answer for _, expected, answer in results)
    for question, expected, answer in results[:show]:
        print(f"  Q: {question!r}\n     expected {expected!r}\n     model    {answer!r}")
    print(f"kt-sft: {exact}/{len(results)} training answers reproduced exactly ({100 * exact / len(results):.0f}%)")
    return {"exact": exact, "total": len(results), "rows": results}


def export(config, output: Optional[str] = None, adapter_dir: Optional[str] = None) -> list[str]:
    """Write the trained model with its LoRA merged (experts: W + scaling·B·A in bf16) as a plain
    transformers checkpoint in `output` (default: <output_dir>/merged). Returns the files written."""
    from ..integration import export_merged

    config = load_config(config, quiet=True)
    if not config["use_kt"]:
        raise ConfigError("kt-sft export merges a kt model (use_kt: true); peft's merge_and_unload covers the rest")
    if adapter_dir == "none":
        raise ConfigError("kt-sft export needs a trained adapter; --adapter none has nothing to merge")
    model, tokenizer, _ = _trained_model(config, adapter_dir)
    output = output or os.path.join(config["output_dir"], "merged")
    return export_merged(model, output, tokenizer=tokenizer)
