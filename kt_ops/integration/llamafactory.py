"""LLaMA-Factory's data conventions for kt-sft: its dataset registry (`dataset_dir/dataset_info.json`,
alpaca and sharegpt formattings with column and tag mappings), its chat templates for the MoE
families kt_ops serves, and the tokenization of conversations into `input_ids` / `labels` in which
only the assistant turns are learned (every assistant turn, as LLaMA-Factory does by default).

The semantics follow LLaMA-Factory (read from its source); the code is kt_ops's own.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional

DATASET_INFO = "dataset_info.json"


class DataError(ValueError):
    """A dataset, dataset_info.json entry or template that cannot be used."""


# --------------------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class ChatTemplate:
    """One LLaMA-Factory template. `{content}` is the message; `{eos}` the tokenizer's eos token."""

    user: str
    assistant: str = "{content}{eos}"
    system: str = "{content}"
    bos_prefix: bool = False  # the tokenizer's bos token starts the conversation
    default_system: str = ""
    stop_word: Optional[str] = None  # becomes the tokenizer's eos (LLaMA-Factory's replace_eos)
    # Reasoning templates: an answer without a thought is learned behind an empty one, so the model
    # learns to close its (empty) thinking before answering.
    empty_thought: Optional[str] = None


_CHATML = dict(
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    stop_word="<|im_end|>",
)
_THOUGHT = "<think>\n\n</think>\n\n"

TEMPLATES: dict[str, ChatTemplate] = {
    "empty": ChatTemplate(user="{content}", assistant="{content}"),
    "default": ChatTemplate(
        user="Human: {content}{eos}\nAssistant:", assistant="{content}{eos}\n", system="System: {content}{eos}\n"
    ),
    "deepseek": ChatTemplate(user="User: {content}\n\nAssistant:", system="{content}\n\n", bos_prefix=True),
    "deepseek3": ChatTemplate(user="<｜User｜>{content}<｜Assistant｜>", bos_prefix=True),
    "deepseekr1": ChatTemplate(user="<｜User｜>{content}<｜Assistant｜>", bos_prefix=True, empty_thought=_THOUGHT),
    "qwen": ChatTemplate(
        **_CHATML, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    ),
    "qwen3": ChatTemplate(**_CHATML, empty_thought=_THOUGHT),
    "qwen3_nothink": ChatTemplate(**_CHATML),
    "qwen3_vl": ChatTemplate(**_CHATML, empty_thought=_THOUGHT),
    "qwen3_vl_nothink": ChatTemplate(**_CHATML),
    "qwen3_5": ChatTemplate(**_CHATML, empty_thought=_THOUGHT),
    "qwen3_5_nothink": ChatTemplate(**_CHATML),
    "mistral": ChatTemplate(user="[INST] {content}[/INST]", bos_prefix=True),
}


def get_template(name: Optional[str], tokenizer):
    """The named template, or (name None) the tokenizer's own chat template, or else `empty` — the
    order LLaMA-Factory uses. A template's stop word becomes the tokenizer's eos, added as a special
    token when the tokenizer lacks it (the caller then resizes the embeddings)."""
    if name is None:
        if isinstance(getattr(tokenizer, "chat_template", None), str):
            return None  # encode() renders with tokenizer.apply_chat_template
        return TEMPLATES["empty"]
    if name not in TEMPLATES:
        raise DataError(
            f"template {name!r} is not known; choose one of {sorted(TEMPLATES)} or leave it unset "
            "to use the tokenizer's chat template"
        )
    template = TEMPLATES[name]
    if template.stop_word is not None and tokenizer.eos_token != template.stop_word:
        tokenizer.add_special_tokens({"eos_token": template.stop_word})
    return template


def _special_tokens_in(template: ChatTemplate) -> list[str]:
    text = template.user + template.assistant + template.system + (template.empty_thought or "")
    return sorted(set(re.findall(r"<\|[a-z_]+\|>|<｜[A-Za-z]+｜>|</?think>", text)))


def add_template_tokens(template: Optional[ChatTemplate], tokenizer) -> int:
    """Register the template's markup tokens (<|im_start|>, <｜User｜>, ...) as special tokens where the
    tokenizer lacks them, so they are one id each. Returns how many were added."""
    if template is None:
        return 0
    vocab = tokenizer.get_vocab()
    missing = [t for t in _special_tokens_in(template) if t not in vocab]
    return tokenizer.add_special_tokens({"additional_special_tokens": missing}) if missing else 0


def _format(pattern: str, content: str, tokenizer) -> str:
    return pattern.replace("{eos}", tokenizer.eos_token or "").replace("{content}", content)


def _chat_template_turns(messages: list[dict], system: Optional[str], tokenizer) -> list[tuple[str, str]]:
    """(prompt text, answer text) per assistant turn, cut from the tokenizer's chat template renderings:
    the answer of turn k is what the rendering of the first 2k+2 messages adds to the rendering of the
    first 2k+1 with a generation prompt."""
    chat = ([{"role": "system", "content": system}] if system else []) + messages
    offset = 1 if system else 0
    turns, done = [], ""
    for k in range(0, len(messages), 2):
        prompt = tokenizer.apply_chat_template(chat[: offset + k + 1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(chat[: offset + k + 2], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                "the tokenizer's chat template does not render conversations as growing prefixes; "
                f"set `template` to one of {sorted(TEMPLATES)}"
            )
        answer = full[len(prompt) :]
        if tokenizer.eos_token and tokenizer.eos_token not in answer:
            answer += tokenizer.eos_token  # the answer must end in a token that stops generation
        turns.append((prompt[len(done) :], answer))
        done = full
    return turns


def template_turns(
    template: Optional[ChatTemplate], messages: list[dict], system: Optional[str], tokenizer
) -> list[tuple[str, str]]:
    """(prompt text, answer text) per user/assistant pair of `messages` (alternating, user first)."""
    if template is None:
        return _chat_template_turns(messages, system, tokenizer)
    system = system or template.default_system
    turns = []
    for k in range(0, len(messages), 2):
        prompt = ""
        if k == 0:
            if template.bos_prefix and tokenizer.bos_token:
                prompt += tokenizer.bos_token
            if system:
                prompt += _format(template.system, system, tokenizer)
        prompt += _format(template.user, messages[k]["content"], tokenizer)
        content = messages[k + 1]["content"]
        if template.empty_thought and "<think>" not in content and "</think>" not in content:
            content = template.empty_thought + content
        turns.append((prompt, _format(template.assistant, content, tokenizer)))
    return turns


def encode_conversation(
    template: Optional[ChatTemplate], messages: list[dict], system: Optional[str], tokenizer, cutoff_len: int
) -> Optional[dict]:
    """input_ids / labels (prompts masked with -100) cut to cutoff_len; None when no answer token fits."""
    input_ids, labels = [], []
    for prompt, answer in template_turns(template, messages, system, tokenizer):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        input_ids += prompt_ids + answer_ids
        labels += [-100] * len(prompt_ids) + answer_ids
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def prompt_text(template: Optional[ChatTemplate], messages: list[dict], system: Optional[str], tokenizer) -> str:
    """The text a model is given to answer the last (user) message of `messages`, history included."""
    turns = template_turns(template, messages + [{"role": "assistant", "content": ""}], system, tokenizer)
    return "".join(p + a for p, a in turns[:-1]) + turns[-1][0]


# ---------------------------------------------------------------------------------------------- datasets
@dataclass
class DatasetSpec:
    """One dataset_info.json entry (LLaMA-Factory's defaults for absent fields)."""

    name: str
    file: str
    formatting: str = "alpaca"
    ranking: bool = False
    columns: Optional[dict] = None
    tags: Optional[dict] = None


_ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "system": None,
    "chosen": None,
    "rejected": None,
    "images": None,
    "videos": None,
}
_SHAREGPT_COLUMNS = {
    "messages": "conversations",
    "system": None,
    "tools": None,
    "chosen": None,
    "rejected": None,
    "images": None,
    "videos": None,
}
_SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}


def _read_file(path: str) -> list[dict]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".json", ".jsonl")))
        return [r for f in files for r in _read_file(f)]
    if not os.path.isfile(path):
        raise DataError(f"dataset file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in f if line.strip()]
        else:
            records = json.load(f)
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise DataError(f"dataset {path}: expected a non-empty list of JSON objects")
    return records


def resolve_datasets(dataset: str, dataset_dir: str) -> list[DatasetSpec]:
    """The comma-separated `dataset` list as specs: each name is looked up in
    `dataset_dir/dataset_info.json`; an entry naming an existing .json/.jsonl file is used directly
    (alpaca / text / preference records, detected from the keys)."""
    names = [n.strip() for n in dataset.split(",") if n.strip()]
    if not names:
        raise DataError("dataset is empty")
    info, specs = None, []
    for name in names:
        if name.endswith((".json", ".jsonl")) and os.path.isfile(name):
            specs.append(DatasetSpec(name=name, file=name, formatting="auto"))
            continue
        if info is None:
            info_path = os.path.join(dataset_dir, DATASET_INFO)
            if not os.path.isfile(info_path):
                raise DataError(
                    f"dataset {name!r} is neither a .json/.jsonl file nor resolvable: no {info_path} "
                    "(set dataset_dir to the directory holding dataset_info.json)"
                )
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
        if name not in info:
            raise DataError(
                f"dataset {name!r} is not in {os.path.join(dataset_dir, DATASET_INFO)} (it lists {sorted(info)})"
            )
        entry = info[name]
        if "file_name" not in entry:
            raise DataError(
                f"dataset {name!r}: only local files (file_name) can be used here; hub, script and "
                "cloud datasets would need a download"
            )
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise DataError(f"dataset {name!r}: formatting {formatting!r} is not supported (alpaca, sharegpt)")
        specs.append(
            DatasetSpec(
                name=name,
                file=os.path.join(dataset_dir, entry["file_name"]),
                formatting=formatting,
                ranking=bool(entry.get("ranking", False)),
                columns=entry.get("columns"),
                tags=entry.get("tags"),
            )
        )
    return specs


def _alpaca_row(record: dict, cols: dict, ranking: bool, where: str) -> dict:
    def get(key):
        column = cols.get(key)
        return record.get(column) if column else None

    content = "\n".join(str(x) for x in (get("prompt"), get("query")) if x)
    messages = []
    for turn in get("history") or []:
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise DataError(f"{where}: history must be a list of [query, response] pairs")
        messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    messages.append({"role": "user", "content": content})
    row = {"system": get("system"), "media": bool(get("images") or get("videos"))}
    if ranking:
        if get("chosen") is None or get("rejected") is None:
            raise DataError(f"{where}: a ranking dataset needs chosen and rejected columns")
        row.update(messages=messages, chosen=str(get("chosen")), rejected=str(get("rejected")))
    else:
        response = get("response")
        if response is None:
            raise DataError(f"{where}: no response column {cols.get('response')!r}")
        row["messages"] = messages + [{"role": "assistant", "content": str(response)}]
    return row


def _sharegpt_row(record: dict, cols: dict, tags: dict, ranking: bool, where: str) -> dict:
    turns = record.get(cols["messages"])
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: column {cols['messages']!r} must be a non-empty list of messages")
    role_of = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["system_tag"]: "system",
        tags["observation_tag"]: "user",
        tags["function_tag"]: "assistant",
    }
    system = record.get(cols["system"]) if cols.get("system") else None
    messages = []
    for i, turn in enumerate(turns):
        role = role_of.get(turn.get(tags["role_tag"]))
        if role is None:
            raise DataError(
                f"{where}: message {i} has role {turn.get(tags['role_tag'])!r}; expected one of "
                f"{sorted(k for k in role_of if k)}"
            )
        content = str(turn.get(tags["content_tag"], ""))
        if role == "system" and i == 0:
            system = content
            continue
        messages.append({"role": role, "content": content})
    expected = ["user", "assistant"] * ((len(messages) + 1) // 2)
    if [m["role"] for m in messages] != expected[: len(messages)] or (not ranking and len(messages) % 2):
        raise DataError(
            f"{where}: messages must alternate user, assistant (user first"
            f"{'' if ranking else ', ending with assistant'})"
        )
    row = {
        "system": system,
        "messages": messages,
        "media": bool(
            (cols.get("images") and record.get(cols["images"])) or (cols.get("videos") and record.get(cols["videos"]))
        ),
    }
    if ranking:
        chosen, rejected = record.get(cols["chosen"] or ""), record.get(cols["rejected"] or "")
        if not isinstance(chosen, dict) or not isinstance(rejected, dict):
            raise DataError(f"{where}: a ranking sharegpt dataset needs chosen and rejected messages")
        row.update(chosen=str(chosen.get(tags["content_tag"], "")), rejected=str(rejected.get(tags["content_tag"], "")))
    return row


def _file_row(record: dict, where: str) -> dict:
    """A record of a plain .json/.jsonl file: preference (prompt or instruction/input, chosen, rejected),
    alpaca (instruction, input, output) or plain text (text)."""
    if "chosen" in record and "rejected" in record:
        if "prompt" in record:  # a ready prompt string, used as written
            return {
                "prompt": str(record["prompt"]),
                "chosen": str(record["chosen"]),
                "rejected": str(record["rejected"]),
            }
        row = _alpaca_row(record, {**_ALPACA_COLUMNS, "chosen": "chosen", "rejected": "rejected"}, True, where)
    elif "instruction" in record and "output" in record:
        row = _alpaca_row(record, _ALPACA_COLUMNS, False, where)
    elif "text" in record:
        return {"text": str(record["text"])}
    else:
        raise DataError(
            f"{where}: cannot tell the record layout from keys {sorted(record)}; expected alpaca "
            "(instruction, input, output), text, or preference (prompt/instruction, chosen, rejected)"
        )
    row.pop("media")
    return row


_MEDIA = re.compile(r"<image>|<video>|<audio>")


def load_rows(spec: DatasetSpec, max_samples: Optional[int] = None, identity: Optional[dict] = None) -> list[dict]:
    """Rows of one dataset: {"messages", "system"} (and "chosen"/"rejected" when ranking). `identity`
    maps placeholder names to text: {"name": "Kai"} turns {{name}} into Kai (LLaMA-Factory's
    identity.json carries {{name}} and {{author}} for the user to fill in)."""
    records = _read_file(spec.file)
    if max_samples is not None:
        records = records[:max_samples]  # per dataset, as in LLaMA-Factory
    if identity:
        text = json.dumps(records, ensure_ascii=False)
        for key, value in identity.items():
            text = text.replace("{{" + key + "}}", json.dumps(value, ensure_ascii=False)[1:-1])
        records = json.loads(text)
    if spec.formatting == "auto":
        return [_file_row(r, f"dataset {spec.name} record {i}") for i, r in enumerate(records)]
    if spec.formatting == "alpaca":
        cols = {**_ALPACA_COLUMNS, **(spec.columns or {})}
        rows = [_alpaca_row(r, cols, spec.ranking, f"dataset {spec.name} record {i}") for i, r in enumerate(records)]
    else:
        cols = {**_SHAREGPT_COLUMNS, **(spec.columns or {})}
        tags = {**_SHAREGPT_TAGS, **(spec.tags or {})}
        rows = [
            _sharegpt_row(r, cols, tags, spec.ranking, f"dataset {spec.name} record {i}") for i, r in enumerate(records)
        ]
    if any([row.pop("media") for row in rows]):
        # kt-sft trains language models on text: the <image>/<video> placeholders are removed and the
        # media files are not read (the vision tower, if any, is not trained or run).
        warnings.warn(
            f"dataset {spec.name}: images/videos are not used by kt-sft; training on the text only", stacklevel=2
        )
        for row in rows:
            for m in row["messages"]:
                m["content"] = _MEDIA.sub("", m["content"])
    if any("{{name}}" in m["content"] or "{{author}}" in m["content"] for row in rows for m in row["messages"]):
        print(
            f"kt-sft: dataset {spec.name} contains {{{{name}}}}/{{{{author}}}} placeholders; set identity_name "
            "and identity_author to fill them in (left as written otherwise)"
        )
    return rows
