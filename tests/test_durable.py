"""Crash consistency (kt_ops/core/durable.py and its writers): a kill at any instant leaves every file
old or new and whole, write errors name the file and leave it as it was, concurrent cpu_saves keep
both layers, and kt-sft resumes a killed run exactly. The randomized campaign over every writer is
scripts/kill_campaign.py; this file runs it at a small size."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import kt_ops
from kt_ops.core import durable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests fork: a child's first parallel torch or kt_ops op hangs in libgomp when the parent ran
# OpenMP regions with several threads, so the parent keeps to one.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def in_child(fn, fsize_limit=None) -> str:
    """Run fn() in a forked child (optionally under RLIMIT_FSIZE); returns 'ok' or the exception as
    'Type: message'."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            if fsize_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            fn()
            result = "ok"
        except BaseException as e:  # noqa: BLE001 -- handed to the test
            result = f"{type(e).__name__}: {e}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        result = f.read()
    os.waitpid(pid, 0)
    return result


def kill_at(k: int):
    count = [0]

    def hook(event, path):
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def killed_child(fn, k: int) -> bool:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            durable.fault_hook = kill_at(k)
            fn()
        except BaseException:  # noqa: BLE001 -- a failed write shows as exit code 1
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert not os.WIFEXITED(status) or os.WEXITSTATUS(status) == 0, "the write failed"
    return os.WIFSIGNALED(status)


def temporaries(directory) -> list[str]:
    return [
        os.path.join(d, n)
        for d, dirs, files in os.walk(directory)
        for n in dirs + files
        if n.startswith((".kt_ops-", ".tmp")) or ".tmp-" in n
    ]


def read(path) -> str:
    with open(path) as f:
        return f.read()


# ---- the mechanisms, killed at every boundary ------------------------------------------------------


def _file_writer(path, text):
    def write():
        with durable.atomic_file(path) as tmp, open(tmp, "w") as f:
            f.write(text)

    return write


def _directory_writer(path, files):
    def write():
        with durable.atomic_directory(path) as new:
            for name, text in files.items():
                with open(os.path.join(new, name), "w") as f:
                    f.write(text)

    return write


def _files_writer(directory, files):
    def write():
        with durable.atomic_files(directory) as staging:
            for name, text in files.items():
                with open(os.path.join(staging, name), "w") as f:
                    f.write(text)

    return write


def _no_exchange(write):
    def without():
        durable._exchange = lambda a, b: False
        write()

    return without


OLD = {"a.json": "old a", "b.json": "old b", "only-old.txt": "old"}
NEW = {"a.json": "new a", "b.json": "new b", "only-new.txt": "new"}


@pytest.mark.parametrize("mechanism", ["file", "directory", "directory without RENAME_EXCHANGE", "files"])
def test_a_kill_at_every_boundary_leaves_old_or_new(tmp_path, mechanism):
    target = tmp_path / ("out.json" if mechanism == "file" else "out")
    if mechanism == "file":
        old, new, raw_atomic = _file_writer(target, "old"), _file_writer(target, "new"), True

        def state():
            return read(target)

        expect_old, expect_new = "old", "new"
    else:
        make = _directory_writer if mechanism.startswith("directory") else _files_writer
        old, new = make(target, OLD), make(target, NEW)
        raw_atomic = mechanism == "directory"  # the other two complete an interrupted switch in recover()
        if mechanism.startswith("directory without"):
            new = _no_exchange(new)

        def state():
            return {n: read(target / n) for n in sorted(os.listdir(target))} if target.exists() else None

        expect_old = OLD
        # a set of files joins the directory (only-old.txt stays); a directory is replaced whole
        expect_new = NEW if mechanism.startswith("directory") else {**OLD, **NEW}
    old()
    outcomes = []
    k = 1
    while killed_child(new, k):
        if raw_atomic:
            assert state() in (expect_old, expect_new), f"kill at boundary {k}"
        durable.recover(str(target if mechanism == "files" else tmp_path))  # where its staging directory is
        assert state() in (expect_old, expect_new), f"kill at boundary {k}, after recover"
        assert temporaries(tmp_path) == [], f"kill at boundary {k}"
        outcomes.append(state() == expect_new)
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        old()
        k += 1
    assert k > 4 and outcomes[0] is False and outcomes[-1] is True, outcomes  # both outcomes were reached
    assert state() == expect_new  # not killed at k: the write completed


def test_recover_leaves_a_live_writer_alone(tmp_path):
    target = tmp_path / "x.json"
    with durable.atomic_file(target) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
        durable.recover(str(tmp_path))  # what another writer into the directory runs first
        assert os.path.exists(tmp)
    assert read(target) == "new" and temporaries(tmp_path) == []


def test_an_error_inside_the_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    _file_writer(target, "old")()
    with pytest.raises(ValueError, match="the writer's own error"), durable.atomic_file(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise ValueError("the writer's own error")  # not an I/O error: passes unchanged
    assert read(target) == "old" and temporaries(tmp_path) == []


def test_manifest_names_a_missing_truncated_or_changed_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 10)
    durable.write_manifest(str(tmp_path), "m.json")
    assert durable.verify_manifest(str(tmp_path), "m.json") == ["a.bin", os.path.join("sub", "b.bin")]
    (tmp_path / "a.bin").write_bytes(b"x" * 99)
    with pytest.raises(ValueError, match=r"a\.bin has 99 bytes, m\.json records 100"):
        durable.verify_manifest(str(tmp_path), "m.json")
    (tmp_path / "a.bin").write_bytes(b"z" * 100)
    with pytest.raises(ValueError, match=r"a\.bin does not match the SHA-256"):
        durable.verify_manifest(str(tmp_path), "m.json")
    (tmp_path / "sub" / "b.bin").unlink()
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"b\.bin is missing"):
        durable.verify_manifest(str(tmp_path), "m.json")
    (tmp_path / "m.json").unlink()
    with pytest.raises(ValueError, match="has no m.json"):
        durable.verify_manifest(str(tmp_path), "m.json")


# ---- every writer, killed: scripts/kill_campaign.py at the suite's size ----------------------------


def test_kill_campaign_quick():
    """Each writer (save_packed_experts, cpu_save, convert_moe_lora, export_merged with and without
    RENAME_EXCHANGE, from_pretrained's shared experts file, save_kt_adapter) killed at each boundary
    and at 2 random instants inside its writes; kt-sft's writers are killed in the tests below."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "kill_campaign.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert run.returncode in (0, 1), run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 7
    for result in results:
        assert result["failures"] == [], result
        assert result["kills"] >= result["boundaries"] and result["survived"] == result["kills"], result
        assert result["outcomes"].get("old") and result["outcomes"].get("new"), result


# ---- write errors: disk full, file size limit, I/O error, read-only directory ----------------------


def _packed(seed, E=4, H=256, I=256):
    g = torch.Generator().manual_seed(seed)
    return kt_ops.pack_experts(
        torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g), "bf16"
    )


def _adapter_input(path, E=4, H=256, I=256, r=64):
    from safetensors.torch import save_file

    from kt_ops.weights.moe_lora import NUM_EXPERTS_METADATA

    tensors = {}
    for e in range(E):
        for proj, (n_in, n_out) in (("gate_proj", (H, I)), ("up_proj", (H, I)), ("down_proj", (I, H))):
            key = f"base_model.model.model.layers.0.mlp.experts.{e}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in)
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r)
    save_file(tensors, str(path), metadata={NUM_EXPERTS_METADATA: str(E)})


def _writers(directory, inputs):
    """(destination in `directory`, write the old content, write the new content (~0.8-1.5 MB), read
    the destination); a converter's inputs go to `inputs`."""
    from kt_ops.weights.moe_lora import convert_moe_lora

    packed = os.path.join(directory, "experts.safetensors")
    small_input, big_input = os.path.join(inputs, "small.st"), os.path.join(inputs, "big.st")
    converted = os.path.join(directory, "moe_lora.pt")
    files = os.path.join(directory, "adapter")
    return {
        "save_packed_experts": (
            packed,
            lambda: kt_ops.save_packed_experts(packed, {0: _packed(0, H=32, I=32)}, overwrite=True),
            lambda: kt_ops.save_packed_experts(packed, {0: _packed(1)}, overwrite=True),
            lambda: kt_ops.load_packed_experts(packed, 0).gate.sum().item(),
        ),
        "convert_moe_lora": (
            converted,
            lambda: (
                _adapter_input(small_input, H=32, I=32),
                _adapter_input(big_input),
                convert_moe_lora(small_input, converted, lora_alpha=8.0),
            ),
            lambda: convert_moe_lora(big_input, converted, lora_alpha=8.0),
            lambda: torch.load(converted, weights_only=True)["metadata"]["hidden_size"],
        ),
        "atomic_files": (
            files,
            _files_writer(files, {"config.json": "old"}),
            _files_writer(files, {"weights.bin": "w" * (3 << 19), "config.json": "new"}),
            lambda: sorted(os.listdir(files)) + [read(os.path.join(files, "config.json"))],
        ),
    }


@pytest.mark.parametrize("writer", ["save_packed_experts", "convert_moe_lora", "atomic_files"])
def test_file_size_limit_names_the_file_and_keeps_the_old_one(tmp_path, writer):
    """EFBIG (`ulimit -f`): the library's own error loses the errno or the path (safetensors: "os
    error 27", torch.save: "unexpected pos"); kt_ops names the file and the reason."""
    (tmp_path / "out").mkdir()
    destination, write_old, write_new, load = _writers(str(tmp_path / "out"), str(tmp_path))[writer]
    write_old()
    before = load()
    result = in_child(write_new, fsize_limit=256 << 10)
    assert result.startswith("OSError: ") and f"could not write {destination}" in result, result
    assert os.strerror(errno.EFBIG) in result and "left as it was" in result, result
    assert load() == before and temporaries(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root and mount needed; skipped elsewhere: the file size limit test covers the
    same path on every machine)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    busy = subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode
    if busy:
        subprocess.run(["umount", "-l", str(mount)], check=True)
    assert not busy, "a file on the tmpfs is still open after the failed write"


@pytest.mark.parametrize("writer", ["save_packed_experts", "convert_moe_lora", "atomic_files"])
def test_disk_full_names_the_file_and_keeps_the_old_one(small_tmpfs, writer):
    destination, write_old, write_new, load = _writers(str(small_tmpfs), str(small_tmpfs.parent))[writer]
    write_old()
    before = load()
    with pytest.raises(OSError, match=f"could not write {destination}: {os.strerror(errno.ENOSPC)}") as info:
        write_new()
    assert info.value.errno == errno.ENOSPC
    assert load() == before and temporaries(small_tmpfs) == []


@pytest.mark.parametrize("event", ["written", "synced", "committed", "moved"])
def test_io_error_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, event):
    destination, write_old, write_new, load = _writers(str(tmp_path), str(tmp_path))["atomic_files"]
    write_old()
    before = load()

    def fail(at, path):
        if at == event:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(durable, "fault_hook", fail)
    committed = event in ("committed", "moved")
    said = "could not finish writing" if committed else "could not write"
    with pytest.raises(OSError, match=f"{said} {destination}: Input/output error") as info:
        write_new()
    assert info.value.errno == errno.EIO
    monkeypatch.setattr(durable, "fault_hook", None)
    # Before the commit record nothing changed; after it the set is complete on disk and recover()
    # (run by the next writer or reader) finishes the switch.
    durable.recover(destination)
    assert load() == (["config.json", "weights.bin", "new"] if committed else before)
    assert temporaries(tmp_path) == []


def test_read_only_directory_names_the_file(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    target = directory / "x.json"
    _file_writer(target, "old")()
    if os.geteuid() == 0:  # root writes through file modes: a read-only mount is needed
        bind = ["mount", "--bind", str(directory), str(directory)]
        if shutil.which("mount") is None or subprocess.run(bind, capture_output=True, check=False).returncode:
            pytest.skip("cannot bind-mount here")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
    else:
        directory.chmod(0o555)
    try:
        with pytest.raises(OSError, match=f"could not write {target}: cannot create a file in {directory}"):
            _file_writer(target, "new")()
        assert read(target) == "old"
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(directory)], check=True)
        else:
            directory.chmod(0o755)


# ---- concurrent cpu_save ---------------------------------------------------------------------------


def _cpu_save(path, layer):
    def save():
        wrapper = kt_ops.KTMoEWrapper(
            layer_idx=layer,
            num_experts=4,
            num_experts_per_tok=2,
            hidden_size=64,
            moe_intermediate_size=64,
            num_gpu_experts=0,
            cpuinfer_threads=1,
            threadpool_count=1,
            weight_path=str(path),
            chunked_prefill_size=64,
            cpu_save=True,
            method="AMXINT8",
            mode="inference",
        )
        g = torch.Generator().manual_seed(layer)
        wrapper.load_weights_from_tensors(
            torch.randn(4, 64, 64, generator=g),
            torch.randn(4, 64, 64, generator=g),
            torch.randn(4, 64, 64, generator=g),
            torch.arange(4),
        )

    return save


def test_two_processes_cpu_save_into_one_file_keep_both_layers(tmp_path):
    for round_ in range(5):
        path = tmp_path / f"experts-{round_}.safetensors"
        children = []
        for layer in (3, 7):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    _cpu_save(path, layer)()
                except BaseException:  # noqa: BLE001 -- reported through the exit code
                    code = 1
                os._exit(code)
            children.append(pid)
        assert all(os.waitpid(pid, 0)[1] == 0 for pid in children)
        assert kt_ops.packed_layers(str(path)) == [3, 7]


def test_a_killed_cpu_save_releases_its_lock(tmp_path):
    path = tmp_path / "experts.safetensors"
    assert in_child(_cpu_save(path, 0)) == "ok"
    # Killed while holding the file's lock, after writing its staging copy.
    assert killed_child(_cpu_save(path, 1), 2)
    assert in_child(_cpu_save(path, 2)) == "ok"
    assert kt_ops.packed_layers(str(path)) == [0, 2] and temporaries(tmp_path) == []


# ---- kt-sft: checkpoints, final outputs, resume ----------------------------------------------------

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("yaml")

from kt_ops import cli  # noqa: E402
from kt_ops.integration.checkpoints import CheckpointError, check_checkpoint, resume_checkpoint  # noqa: E402


def _config(output_dir, **overrides):
    config = {
        "model_name_or_path": "tiny-qwen3-moe",
        "dataset": os.path.join(ROOT, "examples", "data", "alpaca_tiny.jsonl"),
        "output_dir": str(output_dir),
        "lora_rank": 4,
        "lora_alpha": 8,
        "cutoff_len": 48,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 0.01,
        "lr_scheduler_type": "linear",
        "warmup_steps": 1,
        "max_steps": 8,
        "save_steps": 3,
        "torch_num_threads": 1,
    }
    config.update(overrides)
    return config


def _train_killed(config, event, path_suffix):
    """kt-sft train in a new process, SIGKILLed at the first `event` boundary of a write whose
    destination ends with `path_suffix`."""
    script = textwrap.dedent(f"""
        import json, os, signal, sys
        from kt_ops.core import durable
        from kt_ops import cli

        def hook(event, path):
            if event == {event!r} and path.endswith({path_suffix!r}):
                os.kill(os.getpid(), signal.SIGKILL)

        durable.fault_hook = hook
        cli.train(json.loads(sys.argv[1]))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]


def _losses(output_dir):
    with open(os.path.join(output_dir, "loss.csv")) as f:
        return [float(line.split(",")[1]) for line in f.read().splitlines()[1:]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    cli.train(_config(out))  # torch_num_threads: 1
    return out


def test_a_run_killed_while_saving_a_checkpoint_resumes_exactly(uninterrupted, tmp_path):
    """Killed after checkpoint-3, while checkpoint-6 was on disk but not yet switched in: no partial
    checkpoint-6 is left, `resume_from_checkpoint: true` picks checkpoint-3, and every logged loss and
    the final adapter equal the uninterrupted run's (over an epoch boundary: 24 examples, 4 a step)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    _train_killed(_config(out), "synced", "checkpoint-6")
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-3"]
    assert temporaries(out)  # the killed save's staging directory, until the next writer runs
    cli.train(_config(out, resume_from_checkpoint=True, save_total_limit=1))
    assert temporaries(out) == []
    # save_total_limit 1: the rotation kept the last (Trainer also saves at the final step)
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-8"]
    whole, resumed = _losses(uninterrupted), _losses(out)
    assert len(whole) == 8 and resumed == pytest.approx(whole, rel=1e-4)
    final_whole = load_file(os.path.join(uninterrupted, "adapter_model.safetensors"))
    final_resumed = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert final_whole.keys() == final_resumed.keys() and any(".experts." in k for k in final_whole)
    for key in final_whole:
        torch.testing.assert_close(final_resumed[key], final_whole[key], rtol=1e-4, atol=1e-6, msg=key)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda c: _truncate(c / "adapter_model.safetensors"), r"adapter_model\.safetensors has \d+ bytes"),
        (lambda c: _truncate(c / "scheduler.pt"), r"scheduler\.pt has \d+ bytes"),
        (lambda c: (c / "optimizer.pt").unlink(), r"optimizer\.pt is missing"),
        (lambda c: (c / "rng_state.pth").unlink(), r"rng_state\.pth is missing"),
        (lambda c: (c / "kt_checkpoint.json").unlink(), "has no kt_checkpoint.json"),
    ],
)
def test_a_damaged_checkpoint_is_refused_by_name(uninterrupted, tmp_path, damage, named):
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(uninterrupted / "checkpoint-3", checkpoint)
    check_checkpoint(str(checkpoint))
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=named):
        check_checkpoint(str(checkpoint))


def test_resume_refuses_a_damaged_checkpoint_and_true_skips_one(uninterrupted, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-3", "checkpoint-6"):
        shutil.copytree(uninterrupted / name, out / name)
    (out / "checkpoint-6" / "optimizer.pt").unlink()
    with pytest.raises(cli.ConfigError, match=r"cannot resume from .*checkpoint-6: .*optimizer\.pt is missing"):
        cli.train(_config(out, resume_from_checkpoint=str(out / "checkpoint-6")))
    with pytest.warns(UserWarning, match=r"skips .*checkpoint-6: .*optimizer\.pt is missing"):
        assert resume_checkpoint(True, str(out)) == str(out / "checkpoint-3")
    shutil.rmtree(out / "checkpoint-3")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="holds no complete checkpoint-N"):
        resume_checkpoint(True, str(out))
    # save_only_model checkpoints hold no optimizer state: complete, but they cannot resume exactly.
    model_only = tmp_path / "model-only"
    shutil.copytree(uninterrupted / "checkpoint-3", model_only)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (model_only / name).unlink()
    durable.write_manifest(str(model_only), "kt_checkpoint.json")
    with pytest.raises(CheckpointError, match=r"no trainer_state.json|no optimizer\.pt .*save_only_model"):
        check_checkpoint(str(model_only))


def test_final_outputs_switch_as_one_set(uninterrupted, tmp_path):
    """kt-sft's final files over an earlier run's: killed after the first of them was renamed in, the
    directory is completed by the next kt-sft command (here: a read) to the new run's set."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    old_adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    _train_killed(
        _config(out, max_steps=2, save_steps=0, learning_rate=0.05), "moved", os.path.join("run", "adapter_config.json")
    )  # the set's first rename, not save_kt_adapter's own
    assert temporaries(out)
    cli.generate(_config(out), "hi", max_new_tokens=1)  # any kt-sft command reading the adapter completes it
    assert temporaries(out) == []
    assert "max_steps: 2" in read(out / "kt_sft_config.yaml") and len(_losses(out)) == 2
    new_adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert not torch.equal(next(iter(new_adapter.values())), next(iter(old_adapter.values())))
