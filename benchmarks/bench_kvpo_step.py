"""Time and peak memory of one KVPOTrainer step against one CMGRPOTrainer step with the same number of videos.

Both trainers start from the bundled ShapesWorld model (float32; the random tiny pipeline when it is missing) with
the ShapesWorld rewards and LoRA of trainers/shapes_grpo.yaml (semantic 1.0, motion 0.25, fidelity 0.25; rank 32 on
every linear of the blocks) and make 93-frame 64x64 videos (24 latent frames, 8 chunks of 3) with a 12-frame window
and 3 sinks:

- **KVPO**: one prompt, an unrouted anchor and `num_branches` = 8 routed branches (9 videos), the docs' example
  (docs/training.md §7): `routed_chunks` 3 (the default 5 does not fit in 8 chunks once the pool allows 8 distinct
  plans: the fork is drawn in chunks 4..5), `selected_frames` 3, `recent_frames` 4, pool 35; the other fields are
  KVPOConfig's defaults (`grad_steps` 2, `beta` 10 so the initial policy's energy is replayed without gradient,
  `gate="skip"`, one PPO epoch).
- **CM-GRPO**: one prompt, `num_generations` = 9 rollouts (9 videos, a valid group size: the generation batch of 9
  is one whole group), the settings of shapes_grpo.yaml (consistency sampler, one policy step per rollout,
  `policy_loss_scaling` 100, `chunk_loss_alpha` −1, `beta` 0).

A step is `trainer.training_step` (generation batch, loss, backward), gradient clipping at `max_grad_norm` and the
optimizer step. Its phases are disjoint intervals, measured in wall-clock and in CPU seconds of the worker process
(``time.process_time``: what the step computes, much less sensitive than wall-clock time to the other jobs of a
shared machine) by wrapping the trainer's own methods:

- KVPO: `anchor_rollout` (``rollout_group`` from its start until ``branch_plans`` returns: the anchor with the fork
  snapshot, and the branch plans), `branch_rollouts` (the rest of ``rollout_group``: restore, route, sample every
  branch to the end), `decode` (``decode_videos``), `reward` (``score_videos``, global and local
  scores), `reference_replay` (the no-grad ``_energy`` replays of ``_generate``: the initial policy of the KL term),
  `generation_other` (the rest of ``_generate``: text states, advantages, gate), `policy` (``training_step``
  without ``_generate``: the energy replay with gradient through `grad_steps` steps, the loss, backward),
  `optimizer` (clipping and the optimizer step), `other` (the rest of the step: fetching the batch).
- CM-GRPO: `rollout` (``rollout``), `decode`, `reward`, `generation_other` (text states, advantages, policy-step
  draws), `policy`, `optimizer`, `other`.

The trainers' own wall-clock `timing/*` metrics are saved beside them (`trainer_timings` of every step;
`timing/rollout` spans the samplers and the decoding).

Each trainer runs in its own subprocess (a worker that loads the model, builds the trainer and then runs steps on
request), so the peak RSS of each is its own: the worker resets the kernel's high-water mark (``/proc/self/
clear_refs``) before every step and reads ``VmHWM`` and ``ru_maxrss`` after it (the reset lowers both), and reports
the step's peak, its increase over the RSS right after loading the model, and the RSS after building the trainer.
torch has no allocator statistics on the CPU, but its profiler records the CPU allocator's running total: one extra,
untimed profiled step per trainer gives the peak of tensor bytes allocated during the step (``--no-profile`` skips
it).

After one warm-up step each, the two workers step in turn (the order alternating), `--repeats` times, so that the
machine's load hits both; the ratios are medians of per-repeat ratios KVPO / CM-GRPO (wall-clock and CPU).

    python benchmarks/bench_kvpo_step.py [--repeats 3] [--threads 1] [--no-profile] [--source-commit C]
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO_ROOT,
    argument_parser,
    header,
    load_average,
    median,
    print_table,
    ratio_summary,
    result_name,
    rss_bytes,
    summarize,
    write_results,
)

KINDS = ("kvpo", "cmgrpo")
LABELS = {"kvpo": "KVPO", "cmgrpo": "CM-GRPO"}
VIDEO = dict(num_frames=93, height=64, width=64, window_frames=12, sink_frames=3)
COMMON = dict(learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=1000, save_strategy="no",
              use_cpu=True, seed=0, disable_tqdm=True, report_to="none", reward_weights=[1.0, 0.25, 0.25])
SETTINGS = {
    "kvpo": dict(per_device_train_batch_size=1, num_branches=8, routed_chunks=3, selected_frames=3, recent_frames=4),
    "cmgrpo": dict(per_device_train_batch_size=9, num_generations=9, sampler="consistency", policy_steps=1,
                   policy_loss_scaling=100.0, chunk_loss_alpha=-1.0, beta=0.0, reward_aggregation="normalize_then_sum",
                   scale_rewards="group"),
}
LORA = dict(r=32, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"])
PHASES = {
    "kvpo": ("anchor_rollout", "branch_rollouts", "decode", "reward", "reference_replay", "generation_other", "policy",
             "optimizer", "other"),
    "cmgrpo": ("rollout", "decode", "reward", "generation_other", "policy", "optimizer", "other"),
}
TRAINER_TIMINGS = ("timing/rollout", "timing/reward", "timing/generation", "timing/policy")
MB = 2**20


# ---------------------------------------------------------------------------------------------------- trainers
def build_trainer(kind: str, output_dir: str, model: str = "bundled", overrides: dict | None = None,
                  reward_funcs=None, num_prompts: int = 64):
    """The benchmarked trainer (``kind`` "kvpo" or "cmgrpo"), ready to be stepped by hand; returns it with the
    model's description and the RSS (bytes) right after loading the model."""
    from datasets import Dataset
    from peft import LoraConfig

    from diffusers_raven import CMGRPOConfig, CMGRPOTrainer, KVPOConfig, KVPOTrainer
    from diffusers_raven.pipelines.presets import load_pipeline
    from diffusers_raven.rewards import fidelity_reward, motion_reward, semantic_reward
    from diffusers_raven.shapes import caption, sample_scene

    pipe, description = load_pipeline(model, dtype=torch.float32)
    loaded_rss = rss_bytes()
    settings = {**VIDEO, **COMMON, **SETTINGS[kind], **(overrides or {})}
    config, trainer_class = (KVPOConfig, KVPOTrainer) if kind == "kvpo" else (CMGRPOConfig, CMGRPOTrainer)
    height, width = settings["height"], settings["width"]
    prompts = [caption(sample_scene(i, split="train", height=height, width=width)) for i in range(num_prompts)]
    funcs = reward_funcs if reward_funcs is not None else [semantic_reward, motion_reward, fidelity_reward]
    trainer = trainer_class(model=pipe, reward_funcs=funcs, args=config(output_dir=output_dir, **settings),
                            train_dataset=Dataset.from_dict({"prompt": prompts}), peft_config=LoraConfig(**LORA))
    trainer.create_optimizer_and_scheduler(num_training_steps=settings["max_steps"])
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this benchmark steps by hand
    trainer.model.train()
    trainer.batches = iter(trainer.get_train_dataloader())
    return trainer, description, loaded_rss


def now() -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process, all its threads) of this moment."""
    return time.perf_counter(), time.process_time()


class PhaseClock:
    """Wall-clock and CPU seconds spent in wrapped methods and functions during a step (``reset`` before each step;
    ``restore`` puts the originals back)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.intervals: list[tuple[str, float, float]] = []  # (phase, wall start, wall end) of the step
        self._originals: list[tuple[Any, str, Any]] = []

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()
        self.intervals.clear()

    def add(self, phase: str, start: tuple[float, float], end: tuple[float, float]) -> None:
        self.wall[phase] += end[0] - start[0]
        self.cpu[phase] += end[1] - start[1]
        self.intervals.append((phase, start[0], end[0]))

    def patch(self, obj, name: str, replacement) -> None:
        self._originals.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, replacement)

    def wrap(self, obj, name: str, phase) -> None:
        """Time every call of ``obj.name`` into ``phase`` (a name, or a function of no arguments that returns one)."""
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            label = phase() if callable(phase) else phase
            start = now()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(label, start, now())

        self.patch(obj, name, timed)

    def restore(self) -> None:
        for obj, name, original in reversed(self._originals):
            if original is None:
                delattr(obj, name)  # an instance attribute over the class's method
            else:
                setattr(obj, name, original)
        self._originals.clear()


def instrument(kind: str, trainer) -> PhaseClock:
    """Wrap the trainer's methods (on the instance; ``score_videos`` in its module) so that a step's phases are
    timed by a :class:`PhaseClock`."""
    clock = PhaseClock()
    clock.wrap(trainer, "training_step", "training_step")
    clock.wrap(trainer, "_generate", "generation")
    clock.wrap(trainer, "decode_videos", "decode")
    clock.wrap(sys.modules[type(trainer).__module__], "score_videos", "reward")
    if kind == "cmgrpo":
        clock.wrap(trainer, "rollout", "rollout")
        return clock
    # KVPO: rollout_group rolls out the anchor, draws the branch plans (once, after the anchor), then the branches.
    module = sys.modules[type(trainer).__module__]
    plans_drawn: list[tuple[float, float]] = []
    draw_plans = module.branch_plans

    def branch_plans(*args, **kwargs):
        result = draw_plans(*args, **kwargs)
        plans_drawn.append(now())
        return result

    group = trainer.rollout_group

    def rollout_group(*args, **kwargs):
        plans_drawn.clear()
        start = now()
        result = group(*args, **kwargs)
        end = now()
        split = plans_drawn[0] if plans_drawn else end
        clock.add("anchor_rollout", start, split)
        clock.add("branch_rollouts", split, end)
        return result

    clock.patch(module, "branch_plans", branch_plans)
    clock.patch(trainer, "rollout_group", rollout_group)
    # the energy replays of _generate run without gradient (torch.no_grad); compute_loss's with it
    clock.wrap(trainer, "_energy", lambda: "policy_replay" if torch.is_grad_enabled() else "reference_replay")
    return clock


def split_phases(kind: str, clock: dict[str, float], step: float, optimizer: float) -> dict[str, float]:
    """Disjoint phases of one step (wall-clock or CPU seconds) from the wrapped methods' seconds ``clock``; the
    rest of the generation batch is ``generation_other``, the step without the generation ``policy`` and what is left
    of ``step`` ``other``, so that the phases sum to the step."""
    samplers = ("anchor_rollout", "branch_rollouts") if kind == "kvpo" else ("rollout",)
    phases = {p: clock.get(p, 0.0) for p in (*samplers, "decode", "reward")}
    if kind == "kvpo":
        phases["reference_replay"] = clock.get("reference_replay", 0.0)
    generation = clock.get("generation", 0.0)
    phases["generation_other"] = generation - sum(phases.values())
    phases["policy"] = clock.get("training_step", 0.0) - generation
    phases["optimizer"] = optimizer
    phases["other"] = step - sum(phases.values())
    return {p: phases[p] for p in PHASES[kind]}


def rl_step(kind: str, trainer, clock: PhaseClock) -> dict[str, Any]:
    """One optimizer step by hand (what ``Trainer``'s loop does for one step without accumulation); returns its
    wall-clock and CPU seconds, their phases and the trainer's own ``timing/*`` metrics (wall-clock)."""
    clock.reset()
    start = now()
    trainer.training_step(trainer.model, next(trainer.batches))
    optimizer_start = now()
    if trainer.args.max_grad_norm:
        trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    end = now()
    trainer.state.global_step += 1
    metrics = trainer._metrics["train"]
    logged = {name: sum(values) for name, values in metrics.items()}
    metrics.clear()
    return {
        "step_s": end[0] - start[0],
        "cpu_s": end[1] - start[1],
        "phases": split_phases(kind, clock.wall, end[0] - start[0], end[0] - optimizer_start[0]),
        "cpu_phases": split_phases(kind, clock.cpu, end[1] - start[1], end[1] - optimizer_start[1]),
        "trainer_timings": {name: logged[name] for name in TRAINER_TIMINGS},
        "clock": dict(clock.wall),
        "fork_chunk": logged.get("kvpo/fork_chunk"),
        "reward": logged.get("reward"),
    }


# ---------------------------------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """``VmHWM`` of ``/proc/self/status``: the peak RSS since the process started or the last reset."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def allocator_peak(kind: str, trainer, clock: PhaseClock) -> dict[str, Any]:
    """One profiled step: the peak and final values of the CPU allocator's running total of bytes allocated since
    the step began (torch's profiler with ``profile_memory``; tensors alive before the step are not counted)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = rl_step(kind, trainer, clock)
    totals: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            totals.append((node.start_time_ns, node.extra_fields.total_allocated))
        stack.extend(node.children)
    totals.sort()
    return {
        "peak_allocated_bytes": max((t for _, t in totals), default=0),
        "end_allocated_bytes": totals[-1][1] if totals else 0,
        "allocation_events": len(totals),
        "profiled_step_s": result["step_s"],
    }


# ---------------------------------------------------------------------------------------------------- workers
def worker(kind: str, conn, threads: int, model: str) -> None:
    """A subprocess that owns one trainer: builds it, then answers "step", "profile" and "stop"."""
    torch.set_num_threads(threads)
    start_rss = rss_bytes()
    trainer, description, loaded_rss = build_trainer(kind, tempfile.mkdtemp(prefix=f"bench_{kind}_"), model)
    clock = instrument(kind, trainer)
    built_rss = rss_bytes()
    conn.send({"description": description, "start_rss": start_rss, "loaded_rss": loaded_rss, "built_rss": built_rss,
               "ru_maxrss_after_build": ru_maxrss_bytes(), "fork_chunks": [trainer.fork_start_chunk,
                                                                          trainer.fork_end_chunk]
               if kind == "kvpo" else None})
    while True:
        command = conn.recv()
        if command == "step":
            resettable = reset_peak_rss()
            result = rl_step(kind, trainer, clock)
            # after the reset ru_maxrss is the step's peak too (the kernel takes it from the same high-water mark)
            result.update(peak_rss=peak_rss_bytes() if resettable else None, ru_maxrss=ru_maxrss_bytes(),
                          rss_after=rss_bytes())
            conn.send(result)
        elif command == "profile":
            conn.send(allocator_peak(kind, trainer, clock))
        else:
            conn.send({"rss": rss_bytes()})
            conn.close()
            return


class Worker:
    def __init__(self, kind: str, threads: int, model: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=worker, args=(kind, child, threads, model), daemon=True)
        self.process.start()
        child.close()
        self.info = self.conn.recv()

    def call(self, command: str) -> dict[str, Any]:
        self.conn.send(command)
        return self.conn.recv()

    def stop(self) -> dict[str, Any]:
        final = self.call("stop")
        self.process.join(timeout=60)
        return final


def memory_summary(info: dict, steps: list[dict], final: dict) -> dict[str, Any]:
    """Memory of one worker from its unprofiled steps (warm-up first). Each step's peak is ``VmHWM`` and
    ``ru_maxrss`` after a reset of the high-water mark at the step's start (without the reset, ``ru_maxrss`` alone:
    the peak of the worker's life so far); the increase is over the RSS right after loading the model."""
    resettable = all(s["peak_rss"] is not None for s in steps)
    peaks = [s["peak_rss"] if resettable else s["ru_maxrss"] for s in steps]
    ru_peaks = [s["ru_maxrss"] for s in steps]
    peak = max(peaks)
    return {
        "rss_start_mb": info["start_rss"] / MB,
        "rss_after_loading_model_mb": info["loaded_rss"] / MB,
        "rss_after_building_trainer_mb": info["built_rss"] / MB,
        "ru_maxrss_loading_and_building_mb": info["ru_maxrss_after_build"] / MB,
        "step_peak_rss_mb": peak / MB,
        "step_peak_rss_source": "VmHWM reset before each step" if resettable else "ru_maxrss (no reset)",
        "step_peak_rss_increase_over_loaded_model_mb": (peak - info["loaded_rss"]) / MB,
        "step_peak_rss_increase_over_built_trainer_mb": (peak - info["built_rss"]) / MB,
        "step_peak_rss_per_step_mb": [p / MB for p in peaks],
        "step_peak_rss_median_timed_steps_mb": median(peaks[1:]) / MB if len(peaks) > 1 else None,
        "ru_maxrss_per_step_mb": [p / MB for p in ru_peaks],
        "ru_maxrss_process_mb": max(info["ru_maxrss_after_build"], *ru_peaks) / MB,
        "rss_at_exit_mb": final["rss"] / MB,  # after the profiled step too, whose records it holds
    }


def _src_digest(files: dict[str, bytes]) -> str:
    """SHA-256 of ``.py`` files named relative to the repository root, in the form of ``code.src_sha256``."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(files, key=lambda n: PurePosixPath(n).parts):  # the order of sorted Path objects
        digest.update(name.encode() + b"\0" + files[name])
    return digest.hexdigest()


def commit_src_sha256(commit: str) -> str | None:
    """The ``src_sha256`` of ``commit``'s ``src`` tree, read from git's objects (None without git)."""
    try:
        names = subprocess.run(["git", "ls-tree", "-r", "--name-only", commit, "--", "src"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
        files = {n: subprocess.run(["git", "show", f"{commit}:{n}"], cwd=REPO_ROOT, capture_output=True,
                                   check=True).stdout for n in names if n.endswith(".py")}
    except (OSError, subprocess.SubprocessError):
        return None
    return _src_digest(files)


def imported_source(commit: str | None) -> dict[str, Any]:
    """Where the measured ``diffusers_raven`` was imported from and the SHA-256 of its ``src`` tree (as
    ``code.src_sha256``, which describes the working tree): a run on an export of a commit (``git archive <commit>
    src``, ``PYTHONPATH=<export>/src``) is unaffected by edits to the shared working tree; ``--source-commit`` names
    that commit, checked against git's objects."""
    import diffusers_raven

    src = Path(diffusers_raven.__file__).resolve().parents[1]
    digest = _src_digest({str(p.relative_to(src.parent)): p.read_bytes() for p in src.rglob("*.py")})
    info: dict[str, Any] = {"src": str(src), "src_sha256": digest,
                            "is_the_repository_src": src == (REPO_ROOT / "src").resolve()}
    if commit is not None:
        info.update(commit=commit, matches_commit=commit_src_sha256(commit) == digest)
    return info


def timing_report(steps: dict[str, list[dict]], total: str, parts: str) -> dict[str, Any]:
    """Medians and per-repeat series of the step time (``total``: "step_s" or "cpu_s") and its phases (``parts``:
    "phases" or "cpu_phases") of both trainers, the ratio KVPO / CM-GRPO of the step and of comparable phases, and
    KVPO's step time by fork chunk."""
    times = {kind: [s[total] for s in steps[kind]] for kind in KINDS}
    phases = {kind: {p: [s[parts][p] for s in steps[kind]] for p in PHASES[kind]} for kind in KINDS}

    def summed(kind, names):
        return [sum(s[parts][p] for p in names) for s in steps[kind]]

    by_fork = defaultdict(list)
    for step in steps["kvpo"]:
        by_fork[int(step["fork_chunk"])].append(step[total])
    return {
        "times": {kind: summarize(times[kind]) for kind in KINDS},
        "phases": {kind: {p: summarize(v) for p, v in phases[kind].items()} for kind in KINDS},
        "ratio_kvpo_over_cmgrpo": ratio_summary(times["kvpo"], times["cmgrpo"]),
        "phase_ratios_kvpo_over_cmgrpo": {
            "rollouts_and_decode": ratio_summary(summed("kvpo", ("anchor_rollout", "branch_rollouts", "decode")),
                                                 summed("cmgrpo", ("rollout", "decode"))),
            "rollouts": ratio_summary(summed("kvpo", ("anchor_rollout", "branch_rollouts")), phases["cmgrpo"]["rollout"]),
            "reward": ratio_summary(phases["kvpo"]["reward"], phases["cmgrpo"]["reward"]),
            "replay_and_policy": ratio_summary(summed("kvpo", ("reference_replay", "policy")),
                                               phases["cmgrpo"]["policy"]),
        },
        "kvpo_by_fork_chunk": {fork: summarize(v) for fork, v in sorted(by_fork.items())},
    }


def print_report(report: dict[str, Any], unit: str) -> None:
    for kind in KINDS:
        step = report["times"][kind]["median_s"]
        print(f"\n{LABELS[kind]}: median {step:.2f} {unit}/step")
        print_table(["phase", f"median {unit}", "share of the median step"],
                    [[p, v["median_s"], v["median_s"] / step] for p, v in report["phases"][kind].items()])
    ratio = report["ratio_kvpo_over_cmgrpo"]
    print(f"\n{unit} ratio KVPO / CM-GRPO: {ratio['median_ratio']:.3f} (median of per-repeat ratios; range "
          f"{ratio['min_ratio']:.3f}-{ratio['max_ratio']:.3f})")


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="bundled", help="a load_pipeline model string (default: bundled)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled step (allocator peak)")
    parser.add_argument("--source-commit", help="the commit whose export is imported (recorded and checked)")
    args = parser.parse_args()
    source = imported_source(args.source_commit)
    if args.source_commit is not None and not source["matches_commit"]:
        parser.error(f"the imported {source['src']} is not the src of commit {args.source_commit}")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    header("KVPOTrainer step vs CMGRPOTrainer step, 9 videos of 93 frames each")
    load_start = load_average()
    workers = {kind: Worker(kind, args.threads, args.model) for kind in KINDS}
    for kind, w in workers.items():
        print(f"  {LABELS[kind]} worker: {w.info['description']}, RSS after loading the model "
              f"{w.info['loaded_rss'] / MB:.0f} MB", flush=True)
    warmup = {kind: workers[kind].call("step") for kind in KINDS}
    print("  warm-up: " + ", ".join(f"{LABELS[k]} {warmup[k]['step_s']:.1f}s" for k in KINDS), flush=True)
    steps: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for r in range(args.repeats):
        for kind in KINDS if r % 2 == 0 else reversed(KINDS):
            steps[kind].append(workers[kind].call("step"))
        line = ", ".join(f"{LABELS[k]} {steps[k][-1]['step_s']:.1f}s ({steps[k][-1]['cpu_s']:.1f}s CPU)" for k in KINDS)
        print(f"  repeat {r + 1}/{args.repeats}: {line}, KVPO fork chunk {steps['kvpo'][-1]['fork_chunk']:.0f}, "
              f"load {load_average()[0]:.1f}", flush=True)
    allocator = {kind: None if args.no_profile else workers[kind].call("profile") for kind in KINDS}
    finals = {kind: workers[kind].stop() for kind in KINDS}

    wall, cpu = timing_report(steps, "step_s", "phases"), timing_report(steps, "cpu_s", "cpu_phases")
    print_report(wall, "s")
    print_report(cpu, "CPU s")
    memory = {kind: memory_summary(workers[kind].info, [warmup[kind], *steps[kind]], finals[kind]) for kind in KINDS}
    for kind in KINDS:
        if allocator[kind]:
            allocator[kind]["peak_allocated_mb"] = allocator[kind]["peak_allocated_bytes"] / MB
    print()
    print_table(["trainer", "RSS loaded MB", "step peak RSS MB", "increase MB", "allocator peak MB"],
                [[LABELS[k], memory[k]["rss_after_loading_model_mb"], memory[k]["step_peak_rss_mb"],
                  memory[k]["step_peak_rss_increase_over_loaded_model_mb"],
                  allocator[k]["peak_allocated_mb"] if allocator[k] else "-"] for k in KINDS])
    config = {
        "video": VIDEO, "common": COMMON, "lora": LORA, "model": workers["kvpo"].info["description"],
        "rewards": ["semantic_reward", "motion_reward", "fidelity_reward"],
        "kvpo": {**SETTINGS["kvpo"], "videos_per_step": SETTINGS["kvpo"]["num_branches"] + 1,
                 "fork_chunk_range": workers["kvpo"].info["fork_chunks"],
                 "defaults": "grad_steps 2, beta 10, gate skip, fusion std, ppo_epochs 1, pool_frames 35"},
        "cmgrpo": {**SETTINGS["cmgrpo"], "videos_per_step": SETTINGS["cmgrpo"]["num_generations"]},
        "repeats": args.repeats, "warmup_steps": 1, "niceness": os.nice(0),
    }
    write_results(
        result_name("kvpo_step", args.threads),
        {
            "config": config,
            "measured_source": source,
            "load_average_start": load_start,
            "wall": wall,
            "cpu": cpu,
            "memory": memory,
            "allocator": allocator,
            "warmup": {kind: {k: warmup[kind][k] for k in ("step_s", "cpu_s", "phases", "cpu_phases")}
                       for kind in KINDS},
            "steps": steps,
        },
        started,
    )


if __name__ == "__main__":
    main()
