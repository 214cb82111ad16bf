"""KVPOTrainer under FSDP2 on CPU: two gloo processes with every WanTransformerBlock sharded draw the same forks and end
with the weights of the DDP run of the same configuration; a checkpoint written under FSDP (with its old-policy copy)
resumes exactly; a streaming prompt set trains the same; what FSDP cannot run fails with a clear error.

Two launches of ``tests/scripts/tiny_kvpo_fsdp.py`` (see its docstring for the jobs): accelerate with the repository's
``trainers/accelerate_configs/fsdp.yaml`` (two processes, no mixed precision) and torchrun without FSDP (DDP)."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from tiny_kvpo import build, losses  # noqa: E402

from test_fsdp import _launch  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "tiny_kvpo_fsdp.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvpo_fsdp")
    for name in ("fsdp", "ddp", "bf16"):
        (root / name).mkdir()
    _launch(root / "fsdp", "accelerate", "kvpo,whole,resume,stream,refuse", script=SCRIPT)
    _launch(root / "ddp", "torchrun", "kvpo,whole", script=SCRIPT)
    _launch(root / "bf16", "accelerate", "whole", script=SCRIPT, mixed_precision="bf16")
    return root


def _read(runs, run: str, job: str, rank: int = 0) -> dict:
    return json.load(open(runs / run / f"{job}_rank{rank}.json"))


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _checkpoint(runs, run: str, step: int) -> torch.Tensor:
    from safetensors.torch import load_file

    state = load_file(runs / run / "kvpo" / f"checkpoint-{step}" / "transformer" / "diffusion_pytorch_model.safetensors")
    return torch.cat([state[k].flatten() for k in sorted(state)]).double()


def test_fsdp_run_draws_the_ddp_forks_and_ends_with_its_weights(runs):
    """Every WanTransformerBlock is an FSDP unit split between the processes; both processes roll every prompt of a
    generation batch from the same fork, as the DDP run does. Two prompts per micro-batch, two backward passes per
    prompt (slices of 2 and 1 branches), two PPO epochs: after the first generation batch (checkpoint-2, the same
    rollouts) the weights equal the DDP run's within float tolerance; the second generation batch is rolled out by
    weights that differ by rounding, which its anchor-relative advantages amplify, so the end agrees more loosely."""
    fsdp, ddp = _read(runs, "fsdp", "kvpo"), _read(runs, "ddp", "kvpo")
    assert fsdp["fsdp"] and fsdp["distributed_type"] == "DistributedType.FSDP" and not ddp["fsdp"]
    sharding = fsdp["student"]
    assert sharding["root_fsdp"] and sharding["blocks"] == sharding["fsdp_blocks"] == 2
    assert sharding["dtensor_params"] == sharding["block_params"]
    assert sum(_read(runs, "fsdp", "kvpo", r)["student"]["local_numel"] for r in (0, 1)) == sharding["full_numel"]
    forks = [_read(runs, "fsdp", "kvpo", r)["forks"] for r in (0, 1)]
    assert forks[0] == forks[1] == ddp["forks"]
    assert all(len(set(f)) == 1 and len(f) == 2 for f in forks[0].values())  # one fork per generation batch
    assert torch.equal(_t(fsdp["weights"]), _t(_read(runs, "fsdp", "kvpo", 1)["weights"]))
    assert fsdp["losses"][0] == pytest.approx(ddp["losses"][0], rel=1e-6)
    assert torch.allclose(_checkpoint(runs, "fsdp", 1), _checkpoint(runs, "ddp", 1), atol=1e-6)
    assert torch.allclose(_checkpoint(runs, "fsdp", 2), _checkpoint(runs, "ddp", 2), atol=1e-4)
    # measured: 3e-8 after step 1, 2e-6 after step 2, 1.2e-3 at the end (losses within 0.3%), weights moving by 1.4
    assert torch.allclose(_t(fsdp["weights"]), _t(ddp["weights"]), atol=1e-2)
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=2e-2)
    assert torch.allclose(_t(fsdp["old_policy"]), _t(ddp["old_policy"]), atol=1e-6)
    assert (_t(fsdp["weights"]) - _checkpoint(runs, "fsdp", 1)).abs().max() > 1e-3  # the weights moved


def test_fsdp_checkpoint_resumes_exactly(runs):
    """A fresh trainer resumed from checkpoint-1 (written under FSDP between the two PPO epochs of a generation batch,
    with each process's buffered rollouts and the full old-policy copy, laid out again as shards on load) ends with
    the uninterrupted run's weights, old policy and losses."""
    straight, resumed = _read(runs, "fsdp", "kvpo"), _read(runs, "fsdp", "resume")
    assert torch.equal(_t(resumed["weights"]), _t(straight["weights"]))
    assert torch.equal(_t(resumed["old_policy"]), _t(straight["old_policy"]))
    assert resumed["losses"] == straight["losses"]
    assert resumed["forks"] == {"1": straight["forks"]["1"]}  # the first generation batch came from the checkpoint
    state = runs / "fsdp" / "kvpo" / "checkpoint-1" / "raven_state"
    old = torch.load(state / "old_policy.pt", weights_only=True)
    assert sum(v.numel() for v in old.values()) == len(straight["old_policy"])  # full tensors, not shards
    assert {"generation_buffer_rank0.pt", "generation_buffer_rank1.pt"} <= set(os.listdir(state))


def test_streaming_prompts_train_the_same_under_fsdp(runs):
    """The prompts the map-style run drew, streamed from a ``datasets.IterableDataset``, give the same run."""
    straight, stream = _read(runs, "fsdp", "kvpo"), _read(runs, "fsdp", "stream")
    assert torch.equal(_t(stream["weights"]), _t(straight["weights"]))
    assert stream["losses"] == straight["losses"]


def test_fsdp_refuses_per_prompt_forks_and_prompt_schedules(runs):
    errors = _read(runs, "fsdp", "refuse")
    assert "fork_sampling='batch'" in errors["fork_sampling"]
    assert "Prompt schedules" in errors["schedule"] and "FSDP" in errors["schedule"]


def test_fork_sampling(tmp_path):
    """``'prompt'``: each prompt its own fork (seeded by its sample index); ``'batch'``: one fork per generation batch
    for every prompt, changing from one generation batch to the next. A bad value fails."""
    from diffusers_raven import KVPOConfig
    from diffusers_raven.trainer.kvpo_trainer import PromptSchedule

    single = PromptSchedule(("a red circle",))
    per_prompt = build(str(tmp_path), fork_sampling="prompt")
    assert len({per_prompt._draw_fork(single, f"0/{i}") for i in range(16)}) > 1
    batch = build(str(tmp_path), fork_sampling="batch")
    per_batch = []
    for generation in range(8):
        batch._generation = generation
        forks = {batch._draw_fork(single, f"{generation}/{i}") for i in range(16)}
        assert len(forks) == 1
        per_batch.append(forks.pop())
    assert len(set(per_batch)) > 1 and set(per_batch) <= {2, 3, 4}
    with pytest.raises(ValueError, match="fork_sampling"):
        KVPOConfig(output_dir=str(tmp_path), fork_sampling="row")


def test_streaming_prompt_schedules_train(tmp_path):
    """A streaming ``datasets.IterableDataset`` of prompt schedules (no ``__getitem__``, no column to check up front)
    trains; a bad schedule in the stream fails with the schedule's error when its row is drawn."""
    from datasets import IterableDataset

    def rows(switch):
        for _ in range(4):
            yield {"prompt": ["a red circle", "a blue square"], "switch_frames": [switch]}

    stream = IterableDataset.from_generator(rows, gen_kwargs={"switch": 57})
    trainer = build(str(tmp_path / "ok"), max_steps=1, save_steps=10, train_dataset=stream)
    trainer.train()
    assert len(losses(trainer)) == 1 and trainer.state.log_history[0]["kvpo/fork_chunk"] in (2, 3)
    bad = IterableDataset.from_generator(rows, gen_kwargs={"switch": 68})  # inside the last chunk
    trainer = build(str(tmp_path / "bad"), max_steps=1, save_steps=10, train_dataset=bad)
    with pytest.raises(ValueError, match="falls inside the last chunk"):
        trainer.train()


@pytest.mark.parametrize("per", [1, 2])
def test_a_backward_per_slice_of_branches_gives_the_gradient_of_one(tmp_path, per):
    """``branches_per_backward``: the gradient accumulated by one backward pass per slice of branches (3 branches in
    slices of 1, or of 2 and 1) equals autograd's gradient of the whole loss in one pass, for two prompts in the
    micro-batch, under gradient accumulation's 1/2 scale; the returned loss is the same number."""
    trainer = build(str(tmp_path), max_steps=1, per_device_train_batch_size=2, gate="none", beta=0.5)
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.current_gradient_accumulation_steps = 2
    params = [p for p in trainer.student.parameters() if p.requires_grad]

    def gradient():
        grads = torch.cat([p.grad.flatten() for p in params])
        trainer.student.zero_grad(set_to_none=True)
        return grads

    whole = trainer.compute_loss(trainer.model, inputs)
    (whole / 2).backward()
    expected = gradient()
    trainer.args.branches_per_backward = per
    sliced = trainer.compute_loss(trainer.model, inputs)
    assert sliced.is_leaf and sliced.item() == pytest.approx(whole.item(), rel=1e-6)
    got = gradient()
    assert expected.abs().max() > 1e-4
    assert torch.allclose(got, expected, atol=1e-7, rtol=1e-4), (got - expected).abs().max()
    with pytest.raises(ValueError, match="branches_per_backward"):
        build(str(tmp_path), branches_per_backward=0)


def test_one_backward_per_micro_batch_under_fsdp_gives_the_ddp_weights(runs):
    """The default: each micro-batch's two prompts replayed with gradients (two passes through the sharded blocks),
    then one backward pass; one generation batch, two PPO epochs."""
    fsdp, ddp = _read(runs, "fsdp", "whole"), _read(runs, "ddp", "whole")
    assert fsdp["fsdp"] and not ddp["fsdp"]
    assert torch.allclose(_t(fsdp["weights"]), _t(ddp["weights"]), atol=1e-5)  # measured 2.8e-7
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    assert (_t(fsdp["weights"]) - _t(_read(runs, "fsdp", "kvpo")["weights"])).abs().max() > 1e-4


def test_bf16_mixed_precision_under_fsdp_trains(runs):
    """The repository's FSDP configuration as a GPU run uses it, with bf16 mixed precision: the rollouts write the KV
    cache (else the fork would find no frame to route to and the run would stop), the frozen reference runs under the
    same autocast, and 2 steps train (finite losses, the weights move)."""
    bf16, fp32 = _read(runs, "bf16", "whole"), _read(runs, "fsdp", "whole")
    assert bf16["fsdp"] and len(bf16["losses"]) == 2
    assert all(torch.isfinite(torch.tensor(bf16["losses"])))
    start = build(str(runs / "bf16" / "start"), max_steps=1)
    initial = torch.cat([v.flatten() for v in start.student.state_dict().values()]).double()
    assert (_t(bf16["weights"]) - initial).abs().max() > 1e-4
    assert (_t(bf16["weights"]) - _t(fp32["weights"])).abs().max() > 0  # bf16 numerics, not the fp32 run
