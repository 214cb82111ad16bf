"""FSDP2 through the trainers' own code paths, on CPU: two gloo processes with every WanTransformerBlock sharded end
with the weights of the DDP run of the same configuration; an FSDP checkpoint resumes exactly; EMA, checkpoints,
``save_pipeline`` and ``export_transformer`` hold full weights; LoRA trains sharded; streaming prompts through a
2-prompt cache train the same; a run that asks for FSDP and cannot get it fails.

Three launches of ``tests/scripts/tiny_fsdp.py`` (see its docstring for the jobs): accelerate with the repository's
``trainers/accelerate_configs/fsdp.yaml`` (two processes, no mixed precision), torchrun with ``fsdp``/``fsdp_config``
in the training arguments, and torchrun without FSDP (DDP), the reference."""

import json
import os
import socket
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "tiny_fsdp.py")
FSDP_YAML = os.path.join(ROOT, "trainers", "accelerate_configs", "fsdp.yaml")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out, launcher: str, jobs: str, *flags, script: str = SCRIPT, mixed_precision: str = "no") -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_YAML, "--num_processes", "2",
               "--mixed_precision", mixed_precision, "--main_process_ip", "127.0.0.1", "--main_process_port", str(_port())]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_port())]
    subprocess.run([*cmd, script, "--output-dir", str(out), "--jobs", jobs, *flags], check=True, env=env, timeout=900,
                   cwd=out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    for name in ("yaml", "args", "ddp"):
        (root / name).mkdir()
    _launch(root / "yaml", "accelerate", "raven,resume,lora,stream")
    _launch(root / "args", "torchrun", "raven", "--fsdp")
    _launch(root / "ddp", "torchrun", "raven,lora")
    return root


def _read(runs, run: str, job: str, rank: int = 0) -> dict:
    return json.load(open(runs / run / f"{job}_rank{rank}.json"))


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("run", ["yaml", "args"])
def test_fsdp_is_engaged_with_every_block_sharded(runs, run):
    """Both ways of asking (the accelerate config file, the training arguments) give FSDP2 with every
    WanTransformerBlock of the student and of RAVEN's critic an FSDP unit whose parameters the two processes
    split between them (dim-0 shards: together they hold each element once)."""
    results = [_read(runs, run, "raven", rank) for rank in (0, 1)]
    for result in results:
        assert result["fsdp"] and result["distributed_type"] == "DistributedType.FSDP"
        assert result["world_size"] == 2
        for sharding in (result["student"], result["critic_sharding"]):
            assert sharding["root_fsdp"]
            assert sharding["blocks"] == sharding["fsdp_blocks"] == 2
            assert sharding["dtensor_params"] == sharding["block_params"]
            assert 0 < sharding["local_numel"] < sharding["full_numel"]
    for key in ("student", "critic_sharding"):
        assert sum(r[key]["local_numel"] for r in results) == results[0][key]["full_numel"]
    ddp = _read(runs, "ddp", "raven")
    assert not ddp["fsdp"] and ddp["distributed_type"] == "DistributedType.MULTI_CPU"
    assert ddp["student"]["fsdp_blocks"] == 0


@pytest.mark.parametrize("run", ["yaml", "args"])
def test_fsdp_run_ends_with_the_ddp_weights(runs, run):
    """Student, EMA and critic after 3 steps (2 micro-steps per generation batch, checkpoints every step) equal the
    DDP run's within float tolerance; the losses agree; both ranks export the same full weights."""
    ddp = _read(runs, "ddp", "raven")
    fsdp = _read(runs, run, "raven")
    assert torch.equal(_t(fsdp["weights"]), _t(_read(runs, run, "raven", 1)["weights"]))
    for key in ("weights", "ema", "critic"):
        assert torch.allclose(_t(fsdp[key]), _t(ddp[key]), atol=3e-5, rtol=1e-4), key
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    assert not torch.allclose(_t(fsdp["weights"]), _t(fsdp["ema"]))  # the EMA is a different set of weights


def test_fsdp_checkpoint_resumes_exactly(runs):
    """A fresh trainer resumed from checkpoint-1 (written under FSDP in the middle of a generation batch, so with
    each process's buffered rollouts) ends with the uninterrupted run's student, EMA, critic and losses."""
    straight, resumed = _read(runs, "yaml", "raven"), _read(runs, "yaml", "resume")
    for key in ("weights", "ema", "critic"):
        assert torch.equal(_t(resumed[key]), _t(straight[key])), key
    assert resumed["losses"] == straight["losses"]
    buffers = sorted(os.listdir(runs / "yaml" / "raven" / "checkpoint-1" / "raven_state"))
    assert "generation_buffer_rank0.pt" in buffers and "generation_buffer_rank1.pt" in buffers


def test_checkpoints_and_saved_pipeline_hold_full_weights(runs):
    """Files written under FSDP hold the full tensors: checkpoint-3's student is the final weights, its critic and
    EMA the gathered ones; the pipeline of ``save_model`` loads and holds the EMA weights."""
    from safetensors.torch import load_file

    from diffusers_raven import CausalVideoPipeline

    result = _read(runs, "yaml", "raven")
    checkpoint = runs / "yaml" / "raven" / "checkpoint-3"
    student = load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")  # keys sorted
    order = CausalVideoPipeline.from_pretrained(str(runs / "yaml" / "raven" / "final")).transformer.state_dict()
    assert torch.allclose(torch.cat([student[k].flatten() for k in order]).double(), _t(result["weights"]))
    critic = torch.load(checkpoint / "raven_state" / "critic.pt", weights_only=True)
    assert torch.allclose(torch.cat([v.flatten() for v in critic.values()]).double(), _t(result["critic"]))
    ema = torch.load(checkpoint / "raven_state" / "ema.pt", weights_only=True)["shadow_params"]
    assert sum(s.numel() for s in ema) == len(result["ema"])  # full tensors, not one process's shards
    assert not (checkpoint / "pytorch_model_fsdp.bin").exists()  # the student is stored once, in transformer/
    saved = CausalVideoPipeline.from_pretrained(str(runs / "yaml" / "raven" / "final")).transformer
    weights = torch.cat([v.flatten() for v in saved.state_dict().values()]).double()
    assert torch.allclose(weights, _t(result["ema"]))


def test_lora_trains_sharded_like_ddp(runs):
    """CM-GRPO with a LoRA adapter under FSDP: the adapter's weights are DTensor shards, only they train, and the
    adapter and the fused export equal the DDP run's; the saved pipeline holds the fused weights."""
    import sys as _sys

    from safetensors.torch import load_file

    from diffusers_raven import CausalVideoPipeline

    _sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_pipeline import make_pipeline

    fsdp, ddp = _read(runs, "yaml", "lora"), _read(runs, "ddp", "lora")
    assert fsdp["fsdp"] and fsdp["lora_dtensor"] and fsdp["student"]["fsdp_blocks"] == 2
    assert fsdp["trainable"] and all("lora" in n for n in fsdp["trainable"])
    assert torch.allclose(_t(fsdp["adapter"]), _t(ddp["adapter"]), atol=3e-5, rtol=1e-4)
    assert torch.allclose(_t(fsdp["weights"]), _t(ddp["weights"]), atol=3e-5, rtol=1e-4)
    base = torch.cat([v.flatten() for v in make_pipeline().transformer.state_dict().values()]).double()
    assert (_t(fsdp["weights"]) - base).abs().max() > 1e-4  # the adapter moved the fused weights
    final = runs / "yaml" / "lora" / "final"
    saved = CausalVideoPipeline.from_pretrained(str(final)).transformer
    assert torch.allclose(torch.cat([v.flatten() for v in saved.state_dict().values()]).double(), _t(fsdp["weights"]))
    adapter = load_file(final / "transformer_lora" / "pytorch_lora_weights.safetensors")
    assert sum(v.numel() for v in adapter.values()) == len(fsdp["adapter"])


def test_streaming_prompts_through_a_small_cache_train_the_same(runs):
    """The prompts the map-style run drew, streamed from a ``datasets.IterableDataset`` to two FSDP processes whose
    prompt caches hold 2 prompts (so prompts are evicted and encoded again), give the same run."""
    straight, stream = _read(runs, "yaml", "raven"), _read(runs, "yaml", "stream")
    for key in ("weights", "ema", "critic"):
        assert torch.allclose(_t(stream[key]), _t(straight[key]), atol=1e-6), key
    prompts, nbytes, evictions = stream["cache"]
    assert prompts == 2 and evictions > 0 and nbytes > 0


def test_asking_for_fsdp_in_one_process_fails(tmp_path, monkeypatch):
    """An accelerate FSDP launch that ends up with one process does not fall back to plain training."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))
    from tiny_raven import build

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="FSDP was asked for"):
        build(str(tmp_path), "raven")


def test_fsdp1_on_cpu_fails(monkeypatch):
    from accelerate.utils import DistributedType

    from diffusers_raven.trainer.fsdp import engage_fsdp

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    state = types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, mixed_precision="no")
    accelerator = types.SimpleNamespace(state=state, is_main_process=True)
    with pytest.raises(ValueError, match="FSDP2"):
        engage_fsdp(accelerator, types.SimpleNamespace(fsdp_plugin_args={"fsdp_version": 1}))
    assert not engage_fsdp(accelerator, types.SimpleNamespace(fsdp_plugin_args=None))


_MIXED_PRECISION_CACHE = """
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, sys.argv[1])
from test_pipeline import make_pipeline

from diffusers_raven import KVCache
from diffusers_raven.trainer.fsdp import keep_block_inputs

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=0, world_size=1)
model = make_pipeline().transformer
x, t, text = torch.randn(1, 4, 3, 4, 4), torch.zeros(1), torch.randn(1, 16, 32)
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
for block in model.blocks:
    fully_shard(block, mp_policy=policy)
fully_shard(model, mp_policy=policy)


def cached_frames():
    cache = KVCache.for_model(model, 1)
    with torch.no_grad():
        model(x, t, text, kv_cache=cache, update_cache=True)
    return cache.num_frames


before = cached_frames()
changed = keep_block_inputs(model)
print(json.dumps({"before": before, "changed": changed, "after": cached_frames()}))
dist.destroy_process_group()
"""


def test_bf16_mixed_precision_keeps_the_cache_written():
    """FSDP2 with bf16 mixed precision casts each unit's inputs by rebuilding them, which hands every block a copy of
    the pass's attention context (a dataclass the blocks put the new keys and values into): the cache stays empty.
    ``keep_block_inputs`` (applied by the trainers once the model is sharded) turns that cast off inside the root, and
    a cached pass of the sharded bf16 model writes its 3 frames."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MIXED_PRECISION_CACHE, os.path.join(ROOT, "tests"), str(_port())],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["changed"] == 2 and result["after"] == 3, result
