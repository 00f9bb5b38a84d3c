"""Kill campaign: SIGKILL every kt_ops writer between each pair of its file operations and at random
instants inside its writes, and check after each kill that the destination loads and holds exactly
the old or exactly the new content, with no temporary file left once the next writer has run.

    PYTHONPATH=. python scripts/kill_campaign.py                   # every writer: each boundary + 20 random kills
    PYTHONPATH=. python scripts/kill_campaign.py --writer export --random 200 --seed 7
    PYTHONPATH=. python scripts/kill_campaign.py --quick --json    # the suite's size (tests/test_durable.py)

For each writer the old content is written first. A forked child then writes the new content and is
killed: by kt_ops.core.durable.fault_hook at its k-th boundary (each k in turn), or by this process
at a random instant inside one of its writes (a random delay after a write began, up to 1.2 times
that write's duration in a dry run).
After each kill the destination is checked twice: as the kill left it (the single-rename writers
promise old-or-new there already) and after `recover` (which the next kt_ops writer or kt-sft reader
runs; it completes an interrupted set of files). Prints, per writer, the kills and how many were
survived; exits 1 if any was not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time

import torch

from kt_ops.core import durable

# ---- fingerprints: what a writer's destination holds, read with kt_ops' (or the consumer's) loader ----


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        if t is None:
            continue
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def text(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def packed_file(path: str):
    from kt_ops import load_packed_experts, packed_layers

    if not os.path.exists(path):
        return None
    layers = {}
    for layer in packed_layers(path):
        p = load_packed_experts(path, layer)
        layers[layer] = digest(
            {k: getattr(p, k) for k in ("gate", "up", "down", "gate_scale", "up_scale", "down_scale")}
        )
    return json.dumps(layers, sort_keys=True)


def is_temporary(name: str) -> bool:
    return name.startswith((durable.STAGING_PREFIX, ".tmp", ".shard-")) or ".tmp-" in name


# ---- the writers ---------------------------------------------------------------------------------


class Writer:
    name = ""
    raw_atomic = True  # old-or-new even before recover (one rename or one exchange)

    def setup(self, work: str) -> None:
        """Create the inputs and self.dest / self.directory (where temporaries must not stay)."""

    def write_old(self) -> None:
        raise NotImplementedError

    def write_new(self) -> None:
        raise NotImplementedError

    def fingerprint(self):
        raise NotImplementedError

    def learn(self) -> None:
        """Called once the old content, and once the new content, is in place."""

    def recover(self) -> None:
        durable.recover(self.directory)


def experts(seed: int, E=8, H=512, I=512):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g))


class PackedExpertsFile(Writer):
    name = "save_packed_experts"

    def setup(self, work):
        import kt_ops

        self.directory, self.dest = work, os.path.join(work, "experts.safetensors")
        self.old = {L: kt_ops.pack_experts(*experts(L), "bf16") for L in (0, 1)}
        self.new = {L: kt_ops.pack_experts(*experts(10 + L), "bf16") for L in (0, 1)}

    def write_old(self):
        from kt_ops import save_packed_experts

        save_packed_experts(self.dest, self.old, overwrite=True)

    def write_new(self):
        from kt_ops import save_packed_experts

        save_packed_experts(self.dest, self.new, overwrite=True)

    def fingerprint(self):
        return packed_file(self.dest)


class CpuSave(PackedExpertsFile):
    """The AMX inference wrapper's cpu_save of layer 1 into a file that also holds layer 0."""

    name = "cpu_save"

    def write_new(self):
        import kt_ops

        E, I, H = 8, 512, 512
        wrapper = kt_ops.KTMoEWrapper(
            layer_idx=1,
            num_experts=E,
            num_experts_per_tok=2,
            hidden_size=H,
            moe_intermediate_size=I,
            num_gpu_experts=0,
            cpuinfer_threads=1,
            threadpool_count=1,
            weight_path=self.dest,
            chunked_prefill_size=64,
            cpu_save=True,
            method="AMXINT8",
            mode="inference",
        )
        wrapper.load_weights_from_tensors(*experts(11), torch.arange(E))


class ConvertMoeLora(Writer):
    name = "convert_moe_lora"

    def setup(self, work):
        from safetensors.torch import save_file

        from kt_ops.weights.moe_lora import NUM_EXPERTS_METADATA

        self.directory, self.dest = work, os.path.join(work, "moe_lora.pt")
        L, E, H, I, r = 4, 16, 256, 256, 16
        self.inputs = []
        for seed in (0, 1):
            g = torch.Generator().manual_seed(seed)
            tensors = {}
            for layer in range(L):
                for e in range(E):
                    for proj, (n_in, n_out) in (("gate_proj", (H, I)), ("up_proj", (H, I)), ("down_proj", (I, H))):
                        key = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{proj}"
                        tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g)
                        tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g)
            path = os.path.join(work, f"adapter-{seed}.safetensors")
            save_file(tensors, path, metadata={NUM_EXPERTS_METADATA: str(E)})
            self.inputs.append(path)

    def write_old(self):
        from kt_ops.weights.moe_lora import convert_moe_lora

        convert_moe_lora(self.inputs[0], self.dest, lora_alpha=32.0)

    def write_new(self):
        from kt_ops.weights.moe_lora import convert_moe_lora

        convert_moe_lora(self.inputs[1], self.dest, lora_alpha=32.0)

    def fingerprint(self):
        if not os.path.exists(self.dest):
            return None
        saved = torch.load(self.dest, map_location="cpu", weights_only=True)
        meta = json.dumps(saved.pop("metadata"), sort_keys=True)
        return meta + digest({f"{layer}.{k}": v for layer, d in saved.items() for k, v in d.items()})


def tiny_kt_model():
    from kt_ops.integration import apply_kt
    from kt_ops.integration.tiny import tiny_model

    model = tiny_model("tiny-qwen3-moe", hidden_size=128, moe_intermediate_size=128, num_experts=16)
    return apply_kt(model, kt_backend="AMXBF16", lora_rank=8, lora_alpha=16)


def set_lora(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


class ExportMerged(Writer):
    name = "export_merged"

    def setup(self, work):
        self.directory, self.dest = work, os.path.join(work, "merged")
        self.model = tiny_kt_model()

    def _export(self, seed):
        from kt_ops.integration import export_merged

        set_lora(self.model, seed)
        export_merged(self.model, self.dest, max_shard_size=1 << 20)

    def write_old(self):
        self._export(1)

    def write_new(self):
        self._export(2)

    def fingerprint(self):
        from safetensors import safe_open

        if not os.path.isdir(self.dest):
            return None
        names = sorted(os.listdir(self.dest))
        index = os.path.join(self.dest, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        else:
            shards = ["model.safetensors"]
        tensors = {}
        for shard in shards:
            with safe_open(os.path.join(self.dest, shard), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        return json.dumps(names) + text(os.path.join(self.dest, "config.json")) + digest(tensors)


class ExportWithoutExchange(ExportMerged):
    """export_merged on a filesystem without renameat2(RENAME_EXCHANGE): the old directory is moved
    aside and the new one renamed in, under a commit record that recover() completes."""

    name = "export_merged (no RENAME_EXCHANGE)"
    raw_atomic = False

    def write_new(self):
        durable._exchange = lambda a, b: False
        super().write_new()


class SharedExperts(Writer):
    """from_pretrained(kt_shared_experts=...): local rank 0 writes the node's packed experts file."""

    name = "from_pretrained shared experts"

    def setup(self, work):
        from transformers.utils import logging

        from kt_ops.integration.tiny import tiny_model

        logging.disable_progress_bar()
        self.directory, self.dest = work, os.path.join(work, "shared.safetensors")
        self.checkpoint = os.path.join(work, "tiny")
        tiny_model("tiny-qwen3-moe", hidden_size=128, moe_intermediate_size=256, num_experts=32).save_pretrained(
            self.checkpoint
        )

    def write_old(self):
        if os.path.exists(self.dest):
            os.remove(self.dest)  # the file does not exist before the first process of the node writes it

    def write_new(self):
        from kt_ops.integration import from_pretrained

        from_pretrained(self.checkpoint, kt_backend="AMXBF16", lora_rank=4, kt_shared_experts=self.dest)

    def fingerprint(self):
        return packed_file(self.dest)


class KtAdapter(Writer):
    name = "save_kt_adapter"
    raw_atomic = False  # two files: one set, completed by recover

    def setup(self, work):
        self.directory = self.dest = os.path.join(work, "adapter")
        self.model = tiny_kt_model()

    def _save(self, seed):
        from kt_ops.integration import save_kt_adapter

        set_lora(self.model, seed)
        save_kt_adapter(self.model, self.dest)

    def write_old(self):
        self._save(1)

    def write_new(self):
        self._save(2)

    def fingerprint(self):
        from safetensors.torch import load_file

        weights = os.path.join(self.dest, "adapter_model.safetensors")
        config = os.path.join(self.dest, "adapter_config.json")
        return digest(load_file(weights)) + text(config)


class KtSft(Writer):
    """kt-sft train over an earlier run's output_dir: checkpoints every 2 steps, then the final set
    (adapter, tokenizer, resolved config, loss.csv). Every checkpoint-N present must be complete
    and be the old run's or the new run's; the final set must be one run's; resume_from_checkpoint:
    true must find a complete checkpoint."""

    name = "kt-sft train"
    raw_atomic = False  # the final set joins output_dir through a commit record

    def setup(self, work):
        self.directory = self.dest = os.path.join(work, "run")
        examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
        base = {
            "model_name_or_path": "tiny-qwen3-moe",
            "dataset": os.path.join(examples, "data", "alpaca_tiny.jsonl"),
            "output_dir": self.dest,
            "lora_rank": 4,
            "lora_alpha": 8,
            "cutoff_len": 48,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "lr_scheduler_type": "constant",
            "torch_num_threads": 1,
            "save_steps": 2,
        }
        self.configs = [dict(base, max_steps=4, learning_rate=0.01), dict(base, max_steps=6, learning_rate=0.02)]
        self.checkpoints = {}

    def _train(self, config):
        import warnings

        from kt_ops import cli

        warnings.simplefilter("ignore")
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            cli.train(config)

    def _identity(self, checkpoint: str) -> str:
        """The trained state a checkpoint holds (trainer_state.json also records run times)."""
        with open(os.path.join(checkpoint, "kt_checkpoint.json")) as f:
            files = json.load(f)["files"]
        return "".join(files[n]["sha256"] for n in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt"))

    def write_old(self):
        self._train(self.configs[0])

    def write_new(self):
        self._train(self.configs[1])

    def learn(self):
        for name in os.listdir(self.dest):
            if name.startswith("checkpoint-"):
                self.checkpoints.setdefault(name, set()).add(self._identity(os.path.join(self.dest, name)))

    def fingerprint(self):
        from kt_ops.integration.checkpoints import check_checkpoint, resume_checkpoint

        for name in sorted(os.listdir(self.dest)):
            if name.startswith("checkpoint-"):
                check_checkpoint(os.path.join(self.dest, name))
                if self._identity(os.path.join(self.dest, name)) not in self.checkpoints.get(name, ()):
                    raise ValueError(f"{name} is complete but neither run's")
        if not resume_checkpoint(True, self.dest):
            raise ValueError("no checkpoint to resume from")
        from safetensors.torch import load_file

        final = (
            "adapter_config.json",
            "kt_sft_config.yaml",
            "loss.csv",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        )
        # safetensors writes its metadata in no fixed order: the adapter is compared tensor by tensor
        adapter = digest(load_file(os.path.join(self.dest, "adapter_model.safetensors")))
        return adapter + "".join(text(os.path.join(self.dest, name)) for name in final)


WRITERS = {
    w.name: w
    for w in (
        PackedExpertsFile,
        CpuSave,
        ConvertMoeLora,
        ExportMerged,
        ExportWithoutExchange,
        SharedExperts,
        KtAdapter,
        KtSft,
    )
}
QUICK = [name for name in WRITERS if name != KtSft.name]


# ---- the campaign --------------------------------------------------------------------------------


def run_forked(fn, hook=None, kill_in=None):
    """Run fn() in a forked child; returns (killed by SIGKILL, child exit code). kill_in=(n, delay):
    kill the child `delay` seconds after its n-th write began (its n-th "staged" boundary)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        if kill_in is not None:

            def hook(event, path):
                os.write(write, f"{event}\n".encode())

        code = 0
        try:
            durable.fault_hook = hook
            fn()
        except BaseException as e:  # noqa: BLE001 -- reported through the exit code
            print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr)
            code = 3
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as events:
        if kill_in is not None:
            n, delay = kill_in
            staged = 0
            for line in events:
                staged += line.strip() == "staged"
                if staged == n:
                    time.sleep(delay)
                    os.kill(pid, signal.SIGKILL)
                    break
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return killed, (os.WEXITSTATUS(status) if os.WIFEXITED(status) else None)


def kill_at(k: int):
    count = [0]

    def hook(event, path):
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def dry_run(writer: Writer):
    """Write the new content once, recording when each boundary passes: (events, the duration of each
    write from its "staged" to its "switched", in the order the writes began)."""
    read, write = os.pipe()
    start = time.monotonic()

    def record(event, path):
        os.write(write, f"{time.monotonic() - start:.6f} {event}\n".encode())

    run_forked(writer.write_new, hook=record)
    os.close(write)
    with os.fdopen(read) as f:
        events = [(float(t), e) for t, e in (line.split() for line in f)]
    durations, opened = [], []
    for t, event in events:
        if event == "staged":
            opened.append((len(durations), t))
            durations.append(0.0)
        elif event == "switched" and opened:
            i, begin = opened.pop()
            durations[i] = t - begin
    return events, durations


def snapshot(writer: Writer, backup: str) -> None:
    shutil.rmtree(backup, ignore_errors=True)
    shutil.copytree(writer.directory, backup, symlinks=True)


def restore(writer: Writer, backup: str) -> None:
    shutil.rmtree(writer.directory)
    shutil.copytree(backup, writer.directory, symlinks=True)


def leftovers(writer: Writer) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(writer.directory):
        found += [os.path.join(folder, n) for n in dirs + files if is_temporary(n)]
    return found


def check(writer: Writer, old, new) -> tuple[str, list[str]]:
    problems = []

    def state():
        try:
            value = writer.fingerprint()
        except Exception as e:  # noqa: BLE001 -- an unloadable destination is what is being looked for
            return f"unloadable ({type(e).__name__}: {e})"
        return "old" if value == old else "new" if value == new else "neither old nor new"

    raw = state()
    if writer.raw_atomic and raw not in ("old", "new"):
        problems.append(f"as the kill left it: {raw}")
    writer.recover()
    after = state()
    if after not in ("old", "new"):
        problems.append(f"after recover: {after}")
    left = leftovers(writer)
    if left:
        problems.append(f"temporaries left: {left}")
    return after, problems


def campaign(writer: Writer, work: str, boundaries: bool, random_kills: int, rng: random.Random) -> dict:
    os.makedirs(work)
    writer.setup(work)
    run_forked(writer.write_old)
    writer.learn()
    old = writer.fingerprint()
    backup = work.rstrip("/") + ".old"
    snapshot(writer, backup)
    events, durations = dry_run(writer)
    writer.learn()
    new = writer.fingerprint()
    restore(writer, backup)
    kills, survived, failures, outcomes = 0, 0, [], {}
    plans = [("boundary", k) for k in range(1, len(events) + 1)] if boundaries else []
    plans += [("random", None)] * random_kills
    for how, k in plans:
        if how == "boundary":
            killed, code = run_forked(writer.write_new, hook=kill_at(k))
            label = f"boundary {k} ({events[k - 1][1]})"
        else:
            n = rng.randrange(len(durations)) + 1
            delay = rng.uniform(0.0, 1.2 * durations[n - 1] + 0.001)
            killed, code = run_forked(writer.write_new, kill_in=(n, delay))
            label = f"random kill {delay * 1000:.1f} ms into write {n}"
        if code not in (None, 0):
            failures.append(f"{label}: the writer failed (exit {code})")
        elif killed:
            kills += 1
            outcome, problems = check(writer, old, new)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            survived += not problems
            failures += [f"{label}: {p}" for p in problems]
        restore(writer, backup)
    return {
        "writer": writer.name,
        "kills": kills,
        "survived": survived,
        "outcomes": outcomes,
        "boundaries": len(events),
        "failures": failures,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writer", action="append", choices=sorted(WRITERS), help="(repeatable) default: all")
    parser.add_argument("--random", type=int, default=20, help="random-instant kills per writer")
    parser.add_argument("--no-boundaries", action="store_true", help="only random kills")
    parser.add_argument("--quick", action="store_true", help="the suite's size: no kt-sft, 2 random kills each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.writer or (QUICK if args.quick else list(WRITERS))
    random_kills = 2 if args.quick else args.random
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="kt_ops-kill-campaign-") as root:
        for i, name in enumerate(names):
            result = campaign(WRITERS[name](), os.path.join(root, str(i)), not args.no_boundaries, random_kills, rng)
            results.append(result)
            if not args.json:
                print(
                    f"{name:38s} {result['survived']:4d}/{result['kills']:<4d} kills survived  "
                    f"({result['boundaries']} boundaries; outcomes {result['outcomes']})",
                    flush=True,
                )
                for failure in result["failures"]:
                    print(f"    FAILED {failure}", flush=True)
    if args.json:
        print(json.dumps(results))
    else:
        total = sum(r["kills"] for r in results)
        survived = sum(r["survived"] for r in results)
        print(f"total: {survived}/{total} kills survived")
    return 0 if all(not r["failures"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
