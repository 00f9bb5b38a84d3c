"""kt-sft's data: LLaMA-Factory datasets read into conversation records, and the tokenized
examples (sft) or preference records (dpo) the trainers take."""

from __future__ import annotations

from .config import ConfigError


def load_rows(config: dict) -> list[dict]:
    """The records of every dataset in `config["dataset"]`, in LLaMA-Factory's conversation form."""
    from ..integration import llamafactory as lf

    identity = {k: config[f"identity_{k}"] for k in ("name", "author") if config[f"identity_{k}"] is not None}
    try:
        specs = lf.resolve_datasets(config["dataset"], config["dataset_dir"])
        return [row for spec in specs for row in lf.load_rows(spec, config["max_samples"], identity)]
    except lf.DataError as e:
        raise ConfigError(str(e)) from None


def chat_template(config: dict, tokenizer):
    """The config's template (see kt_ops.integration.llamafactory.get_template); None means the
    tokenizer's own chat template."""
    from ..integration import llamafactory as lf

    try:
        return lf.get_template(config["template"], tokenizer)
    except lf.DataError as e:
        raise ConfigError(str(e)) from None


def sft_examples(rows: list[dict], template, tokenizer, cutoff_len: int) -> list[dict]:
    """input_ids / labels per record: prompts are masked (-100) so only answers are learned."""
    from ..integration import llamafactory as lf

    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos token; answers need one to end on")
    examples = []
    for row in rows:
        if "chosen" in row:
            raise ConfigError(
                "stage sft needs alpaca or text records (or a sharegpt dataset); the dataset has "
                "preference records (chosen / rejected)"
            )
        if "text" in row:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            example = {"input_ids": ids[:cutoff_len], "labels": ids[:cutoff_len]}
        else:
            try:
                example = lf.encode_conversation(template, row["messages"], row["system"], tokenizer, cutoff_len)
            except lf.DataError as e:
                raise ConfigError(str(e)) from None
        if example is not None:  # None: the prompt alone fills cutoff_len, nothing to learn
            examples.append(example)
    if not examples:
        raise ConfigError(f"no example keeps any answer token within cutoff_len={cutoff_len}")
    return examples


def unigram_entropy(examples: list[dict]) -> float:
    """Entropy (nats) of the learned tokens' frequencies: the loss of a model that predicts every answer
    token from those frequencies alone, i.e. learned nothing about which answer goes with which prompt."""
    import math
    from collections import Counter

    counts = Counter(t for e in examples for t, label in zip(e["input_ids"], e["labels"]) if label != -100)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def preference_records(rows: list[dict], template, tokenizer) -> list[dict]:
    from ..integration import llamafactory as lf

    out = []
    for i, row in enumerate(rows):
        if "chosen" not in row or "rejected" not in row:
            raise ConfigError(f"stage dpo needs preference records (chosen / rejected); record {i} has none")
        prompt = (
            row["prompt"] if "prompt" in row else lf.prompt_text(template, row["messages"], row["system"], tokenizer)
        )
        out.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]})
    return out
