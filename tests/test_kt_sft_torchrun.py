"""kt-sft under torchrun (gloo on the CPU), the way a user launches it:

- two `torchrun --nnodes 2 --nproc-per-node 2` launches meeting on 127.0.0.1, as two nodes: data
  parallel (DDP) over the four processes, the experts packed once per node and mapped by its two
  processes, rank 0 alone printing and writing;
- `torchrun --standalone --nproc-per-node 2` with `fsdp: full_shard auto_wrap`: FSDP2 over the two
  processes, sharded checkpoints; a resume from one of them ends where the uninterrupted run ends.

Each run's losses and adapter equal one process's on the same global batch (8 examples a step:
4 processes x 1 x 2 accumulated, or 2 x 2 x 2, against 1 x 4 x 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
yaml = pytest.importorskip("yaml")

from kt_ops import cli  # noqa: E402
from kt_ops.integration.checkpoints import CheckpointError, check_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(output_dir, **overrides):
    config = {
        "model_name_or_path": "tiny-qwen3-moe",
        "dataset": os.path.join(ROOT, "examples", "data", "alpaca_tiny.jsonl"),
        "output_dir": str(output_dir),
        "lora_rank": 4,
        "cutoff_len": 48,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 0.01,
        "lr_scheduler_type": "constant",
        "max_steps": STEPS,
        "save_steps": 0,
        "torch_num_threads": 1,
    }
    config.update(overrides)
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, config: dict, nodes: int, per_node: int) -> str:
    """kt-sft train in `nodes` torchrun launches of `per_node` processes; their output, all launches'."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(per_node)]
    if nodes == 1:
        launches = [launcher + ["--standalone"]]
    else:
        port = str(_free_port())
        launches = [
            launcher
            + ["--nnodes", str(nodes), "--node-rank", str(n), "--master-addr", "127.0.0.1", "--master-port", port]
            for n in range(nodes)
        ]
    procs = [
        subprocess.Popen(
            [*launch, "-m", "kt_ops.cli", "train", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for launch in launches
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return "\n".join(outputs)


def _losses(output_dir):
    with open(os.path.join(output_dir, "loss.csv")) as f:
        return [float(line.split(",")[1]) for line in f.read().splitlines()[1:]]


def _assert_same_adapter(got_dir, want_dir, rel):
    """Every adapter tensor within `rel` of the other's, in relative L2 norm."""
    from safetensors.torch import load_file

    got = load_file(os.path.join(got_dir, "adapter_model.safetensors"))
    want = load_file(os.path.join(want_dir, "adapter_model.safetensors"))
    assert got.keys() == want.keys() and any(".experts." in k for k in want)
    for key in want:
        assert float((got[key] - want[key]).norm()) <= rel * float(want[key].norm()), key


def _assert_rank0_reports(output: str) -> None:
    for step in range(1, STEPS + 1):
        assert output.count(f"step {step}/{STEPS} ") == 1, output[-4000:]
    assert output.count("kt-sft: wrote") == 1


def _shared_files(output: str) -> list:
    """The shared experts files kt-sft reported, which must be gone (removed once mapped)."""
    line = next(line for line in output.splitlines() if "packed once per node" in line)
    files = line.split(": ", 1)[1].split(" (removed")[0].split(", ")
    assert not any(os.path.exists(f) for f in files), files
    return files


# Adam over the halves of a batch and the whole batch: the gradients differ in their last bits
# (summation order; more where activations are rounded to bf16), and Adam's normalised steps carry
# that to the parameters, most for the experts that few tokens reach (gradients near Adam's eps).
ACROSS_WORLD_SIZES = 1e-3


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    torch.set_num_threads(1)
    cli.train(_config(out))
    return out


def test_two_nodes_train_data_parallel_like_one_process(one_process, tmp_path):
    out = tmp_path / "run"
    # kt_num_threads unset: the node's cores are split between its two processes
    output = _torchrun(tmp_path, _config(out, per_device_train_batch_size=1, save_steps=2), nodes=2, per_node=2)
    _assert_rank0_reports(output)
    files = _shared_files(output)
    assert len(files) == 2 and files[0].endswith("node0.safetensors") and files[1].endswith("node1.safetensors")
    assert _losses(out) == pytest.approx(_losses(one_process), rel=1e-4)
    _assert_same_adapter(out, one_process, ACROSS_WORLD_SIZES)
    assert not [n for n in os.listdir(out) if n.startswith(".kt_ops")]
    # one checkpoint directory, every process's RNG state in it, complete for a resume by four
    check_checkpoint(str(out / "checkpoint-2"), processes=4)
    assert {f"rng_state_{r}.pth" for r in range(4)} <= set(os.listdir(out / "checkpoint-2"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "run"
    config = _config(
        out,
        per_device_train_batch_size=2,
        save_steps=2,
        kt_num_threads=1,
        fsdp="full_shard auto_wrap",
        fsdp_config={"fsdp_version": 2},
    )
    return tmp, config, _torchrun(tmp, config, nodes=1, per_node=2)


def test_fsdp_trains_like_one_process(one_process, fsdp_run):
    _, config, output = fsdp_run
    out = config["output_dir"]
    _assert_rank0_reports(output)
    assert len(_shared_files(output)) == 1
    assert _losses(out) == pytest.approx(_losses(one_process), rel=1e-4)
    _assert_same_adapter(out, one_process, ACROSS_WORLD_SIZES)
    checkpoint = sorted(os.listdir(os.path.join(out, "checkpoint-2")))
    assert checkpoint == [
        "fsdp_model",
        "fsdp_optimizer",
        "kt_checkpoint.json",
        *(f"rng_state_{r}.pth" for r in range(2)),
        "scheduler.pt",
        "trainer_state.json",
    ]
    for part in ("fsdp_model", "fsdp_optimizer"):  # DCP: the metadata and each rank's shards
        assert sorted(os.listdir(os.path.join(out, "checkpoint-2", part))) == [
            ".metadata",
            *(f"__{r}_0.distcp" for r in range(2)),
        ]


def test_fsdp_resume_ends_where_the_uninterrupted_run_ends(fsdp_run):
    tmp, config, _ = fsdp_run
    checkpoint = os.path.join(config["output_dir"], "checkpoint-2")
    out = tmp / "resumed"
    resumed = dict(config, output_dir=str(out), resume_from_checkpoint=checkpoint)
    (tmp / "resume").mkdir()
    _torchrun(tmp / "resume", resumed, nodes=1, per_node=2)
    assert _losses(out) == pytest.approx(_losses(config["output_dir"]), rel=1e-5)
    _assert_same_adapter(out, config["output_dir"], 0.0)  # resumed exactly
    # a sharded checkpoint resumes only sharded, and with as many processes
    with pytest.raises(cli.ConfigError, match="saved sharded by FSDP2; resume it with fsdp"):
        cli.train(_config(tmp / "other", resume_from_checkpoint=checkpoint))
    with pytest.raises(CheckpointError, match=r"saved by 2 process\(es\) .* this run has 4"):
        check_checkpoint(checkpoint, processes=4, sharded=True)


def test_fsdp_adapter_loads_in_plain_peft_and_exports_merged(fsdp_run, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    from kt_ops.integration import load_kt_adapter
    from kt_ops.integration.tiny import tiny_model

    _, config, _ = fsdp_run
    out = config["output_dir"]
    plain = peft.PeftModel.from_pretrained(tiny_model("tiny-qwen3-moe", seed=0), out)  # no kt_ops in the model
    saved = peft.load_peft_weights(out)
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(plain.get_parameter(q_proj.replace(".weight", ".default.weight")), saved[q_proj])
    merged = tmp_path / "merged"
    cli.export(config, str(merged))  # the training config, fsdp and all, in one process
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    model, _ = cli.build_model(cli.load_config(config))
    load_kt_adapter(model, out)
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model.eval()(input_ids=ids).logits, plain(input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) < 0.03  # the experts merged in bf16


def test_fsdp_settings_are_checked(tmp_path):
    def load(**overrides):
        return cli.load_config(_config(tmp_path / "run", **overrides), quiet=True)

    config = load(fsdp="shard_grad_op", fsdp_config={"fsdp_transformer_layer_cls_to_wrap": "Qwen3MoeDecoderLayer"})
    assert config["fsdp"] == ["shard_grad_op"]
    assert config["fsdp_config"]["reshard_after_forward"] is False
    assert config["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["Qwen3MoeDecoderLayer"]
    assert load(fsdp=True)["fsdp"] == ["full_shard", "auto_wrap"] and load()["fsdp"] == []
    for overrides, message in (
        ({"fsdp": "full_shard hybrid_shard"}, "'hybrid_shard' exists only in FSDP1"),
        ({"fsdp": "full_shard shard_grad_op"}, "exclude each other"),
        ({"fsdp": "full_shard offload"}, "does not offload"),
        ({"fsdp": "full_shrad"}, r"unknown fsdp option 'full_shrad'; valid options"),
        ({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 1}}, "version must be 2"),
        (
            {"fsdp": "full_shard", "fsdp_config": {"min_num_params": 9}},
            r"unknown fsdp_config keys \['min_num_params'\]",
        ),
        ({"fsdp": "full_shard", "fsdp_config": {"auto_wrap_policy": "SIZE_BASED_WRAP"}}, "auto_wrap_policy must be"),
        ({"fsdp": "full_shard", "fsdp_config": {"reshard_after_forward": "yes"}}, "must be true or false"),
        ({"fsdp_config": {"fsdp_version": 2}}, "fsdp_config is set, but fsdp is not"),
        ({"fsdp": 3}, "fsdp must be an option string"),
    ):
        with pytest.raises(cli.ConfigError, match=message):
            load(**overrides)
    # one process, or DPO, cannot shard; said before the model loads
    with pytest.raises(
        cli.ConfigError, match="fsdp shards the model over several processes: launch kt-sft with torchrun"
    ):
        cli.train(_config(tmp_path / "run", fsdp="full_shard"))
    with pytest.raises(cli.ConfigError, match="transformer_layer_cls_to_wrap"):
        load(fsdp="full_shard", fsdp_config={"transformer_layer_cls_to_wrap": [3]})


def test_processes_come_from_torchrun_and_the_experts_file_finds_room(tmp_path, monkeypatch):
    from kt_ops.cli import launch

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch.Processes.from_env() == launch.Processes()  # one process alone
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(cli.ConfigError, match="launch the processes of kt-sft with torchrun"):
        launch.Processes.from_env()
    for name, value in (("RANK", "3"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    processes = launch.Processes.from_env()
    assert (processes.node, processes.main, processes.distributed) == (1, False, True)
    config = cli.load_config(_config(tmp_path / "run"), quiet=True)
    launch.split_threads(config, processes)  # kt_num_threads unset: the node's cores, halved
    import kt_ops

    cores = min(kt_ops.cpu_info()["physical_cores"], len(os.sched_getaffinity(0)))
    assert config["kt_num_threads"] == max(1, cores // 2)
    # /dev/shm when it has room for the packed experts, else output_dir
    monkeypatch.setattr(launch, "SHARED_MEMORY", str(tmp_path / "no-shm"))
    assert launch._directory(config) == config["output_dir"]
    monkeypatch.setattr(launch, "SHARED_MEMORY", str(tmp_path))
    assert launch._directory(config) == str(tmp_path)
