"""``benchmarks/bench_kvpo_step.py`` on the random tiny pipeline: the phases of a KVPO and a CM-GRPO step are
disjoint, sum to the step time and agree with the trainers' own ``timing/*`` metrics; the memory summary."""

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from tiny_cmgrpo import brightness  # noqa: E402


def _load_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_kvpo_step", ROOT / "benchmarks" / "bench_kvpo_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

TINY = {
    # 6 latent frames (2 chunks of 3) of 16x16 pixels, a global cache, 2 branches routed for the second chunk
    "kvpo": dict(num_frames=21, height=16, width=16, max_sequence_length=16, window_frames=None, sink_frames=0,
                 num_branches=2, routed_chunks=1, selected_frames=1, recent_frames=3, beta=0.5, reward_weights=None),
    "cmgrpo": dict(num_frames=21, height=16, width=16, max_sequence_length=16, window_frames=None, sink_frames=0,
                   num_generations=2, per_device_train_batch_size=2, reward_weights=None),
}


def _build(kind, tmp_path):
    trainer, description, loaded_rss = bench.build_trainer(kind, str(tmp_path), model="random-tiny",
                                                           overrides=TINY[kind], reward_funcs=[brightness],
                                                           num_prompts=4)
    assert "random" in description and loaded_rss > 0
    return trainer


@pytest.mark.parametrize("kind", ["kvpo", "cmgrpo"])
def test_phases_are_disjoint_and_sum_to_the_step(kind, tmp_path):
    trainer = _build(kind, tmp_path)
    clock = bench.instrument(kind, trainer)
    try:
        for _ in range(2):  # the first step, and one with the optimizer's state
            result = bench.rl_step(kind, trainer, clock)
            for total, parts in (("step_s", "phases"), ("cpu_s", "cpu_phases")):
                phases, step = result[parts], result[total]
                assert list(phases) == list(bench.PHASES[kind])
                assert sum(phases.values()) == pytest.approx(step, rel=1e-9)
                assert all(v >= 0 for p, v in phases.items() if p != "other"), phases
                assert abs(phases["other"]) < 0.05 * step + 0.02, phases  # fetching the batch: nothing big left out
            phases, timings = result["phases"], result["trainer_timings"]
            samplers = ("anchor_rollout", "branch_rollouts") if kind == "kvpo" else ("rollout",)
            assert all(phases[p] > 0 for p in (*samplers, "decode", "reward", "policy"))
            # against the trainer's own clocks: the samplers and the VAE are its timing/rollout less a little list
            # building, the scoring its timing/reward, the rest of the step its timing/policy
            inside = sum(phases[p] for p in samplers) + phases["decode"]
            assert 0.9 * timings["timing/rollout"] <= inside <= timings["timing/rollout"]
            assert 0.9 * timings["timing/reward"] - 0.005 <= phases["reward"] <= timings["timing/reward"]
            assert phases["policy"] == pytest.approx(timings["timing/policy"], rel=0.1, abs=0.01)
            generation = sum(phases[p] for p in phases if p not in ("policy", "optimizer", "other"))
            assert generation == pytest.approx(timings["timing/generation"], rel=0.05, abs=0.01)
            if kind == "kvpo":
                assert phases["reference_replay"] > 0  # beta > 0: the initial policy's energies, without gradient
                assert 0 < result["clock"]["policy_replay"] <= phases["policy"]
                assert result["fork_chunk"] == 1
    finally:
        clock.restore()
    module = sys.modules[type(trainer).__module__]
    assert module.score_videos is sys.modules["diffusers_raven.trainer.base"].score_videos
    assert "training_step" not in vars(trainer) and "rollout_chunks" not in vars(trainer)


def test_kvpo_anchor_and_branches_split_where_the_first_branch_starts(tmp_path):
    """Every transformer pass of the anchor falls in `anchor_rollout`, every pass of the branches in
    `branch_rollouts`: counted by a forward hook, against the passes each makes (K steps per chunk, a context pass
    after every chunk but the last)."""
    trainer = _build("kvpo", tmp_path)
    passes = []
    hook = trainer.student.register_forward_hook(lambda *_: passes.append(time.perf_counter()))
    clock = bench.instrument("kvpo", trainer)
    try:
        result = bench.rl_step("kvpo", trainer, clock)
    finally:
        clock.restore()
        hook.remove()
    steps, chunks, fork = trainer.sampler.num_steps, len(trainer.chunk_sizes), int(result["fork_chunk"])
    branches = trainer.args.num_branches

    def inside(phase):
        (_, start, end), = [i for i in clock.intervals if i[0] == phase]
        return sum(start <= t <= end for t in passes)

    assert inside("anchor_rollout") == chunks * steps + chunks - 1
    assert inside("branch_rollouts") == branches * ((chunks - fork) * steps + chunks - fork - 1)


def test_allocator_peak_of_a_profiled_step(tmp_path):
    trainer = _build("cmgrpo", tmp_path)
    clock = bench.instrument("cmgrpo", trainer)
    try:
        bench.rl_step("cmgrpo", trainer, clock)
        peak = bench.allocator_peak("cmgrpo", trainer, clock)
    finally:
        clock.restore()
    assert peak["allocation_events"] > 0
    assert peak["peak_allocated_bytes"] > 0 and peak["peak_allocated_bytes"] >= peak["end_allocated_bytes"]


def test_memory_summary():
    mb = bench.MB
    info = {"start_rss": 100 * mb, "loaded_rss": 200 * mb, "built_rss": 210 * mb, "ru_maxrss_after_build": 250 * mb}
    steps = [{"peak_rss": p * mb, "ru_maxrss": p * mb} for p in (500, 400, 450, 420)]
    memory = bench.memory_summary(info, steps, {"rss": 300 * mb})
    assert memory["step_peak_rss_mb"] == 500
    assert memory["step_peak_rss_increase_over_loaded_model_mb"] == 300
    assert memory["step_peak_rss_increase_over_built_trainer_mb"] == 290
    assert memory["step_peak_rss_median_timed_steps_mb"] == 420  # warm-up (the first) left out
    assert memory["ru_maxrss_process_mb"] == 500
    no_reset = [{"peak_rss": None, "ru_maxrss": p * mb} for p in (500, 600)]
    assert bench.memory_summary(info, no_reset, {"rss": 0})["step_peak_rss_mb"] == 600
