"""KVPOTrainer: RL by KV-cache routing, the trajectory velocity energy and a Gibbs policy (METHOD.md §2, §7).

KVPO explores without injecting noise. For each prompt (one row of the dataset):

1. ``_generate`` (no grad, once per generation batch): an unrouted **anchor** is rolled out through a KV cache that
   keeps a pool of older frames; at the fork chunk (drawn per prompt) the cache and the sampler's generator are
   snapshotted, and each of the ``num_branches`` branches restores them and rolls the ``routed_chunks`` chunks of the
   routed stretch with its own routing plan (``branch_plans``: the sinks, ``selected_frames`` older frames and the
   ``recent_frames`` most recent frames), then continues unrouted to the end of the video. Anchor and branches share
   the initial noise and the sampler's noise: only the routing differs. Every video is decoded and scored by the
   reward functions on the whole video (global) and on the routed stretch's frames (local); anchor-relative
   advantages per scope are fused (``fuse_advantages``) and the safety gate decides whether the prompt trains.
2. ``compute_loss`` (per micro-batch and PPO epoch): each branch's recorded states are replayed under the
   **unrouted** context that inference uses (the interleaved training-time-test pass of METHOD §4, history = the
   branch's own context chunks, the training window and sinks), giving the trajectory velocity energy of the routed
   stretch with gradient through the first ``grad_steps`` steps; ``kvpo_loss`` is the clipped-ratio loss on the
   Gibbs policy ``softmax(−E)`` over the branches plus ``beta`` times the KL to the initial policy.

One prompt's branches and anchor stay on one process (its advantages need no gather; the processes train on
different prompts and DDP averages their gradients).

A row may also carry a **prompt schedule** (the long-video multi-prompt setting): ``prompt`` a list of prompts and
``switch_frames`` the output frames at which the next one takes over, as the pipeline's own arguments. Anchor and
branches then run the pipeline's chunk loop with its prompt switch (the LongLive re-cache of the visible frames under
the new prompt, METHOD §2), every segment of a video is scored against its own prompt, and the replay uses the
schedule (see :meth:`KVPOTrainer.replay_velocity`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..models.kv_cache import visible_history
from ..pipelines.chunk_sampler import CacheDenoiser, ChunkTrajectory
from ..training.kvpo import (
    anchor_advantages,
    branch_plans,
    fuse_advantages,
    gibbs_log_policy,
    kvpo_loss,
    recorded_velocity,
    safety_gate,
    trajectory_velocity_energy,
)
from ..training.rollout import RolloutRecord, pack_interleaved
from . import fsdp
from .base import CausalVideoTrainerBase, reward_name, score_videos
from .kvpo_config import KVPOConfig

KVPO_CITATION = """@article{kvpo2026,
  title   = {KVPO: Policy Optimization by KV-Cache Routing for Long Autoregressive Video Generation},
  journal = {arXiv preprint arXiv:2605.14278},
  year    = {2026}
}"""

#: Columns of a generation batch that are not dataset columns for the reward functions.
_INTERNAL_COLUMNS = ("prompt", "prompt_embeds", "sample_index", "switch_frames")


@dataclass(frozen=True)
class PromptSchedule:
    """The prompts of one dataset row: ``prompts[i + 1]`` takes over at chunk ``switch_chunks[i]``, the first chunk
    that starts at or after output frame ``switch_frames[i]`` (the pipeline's ``switch_frames``). One prompt and no
    switch for a row whose ``prompt`` is a string."""

    prompts: tuple[str, ...]
    switch_chunks: tuple[int, ...] = ()

    def prompt_index(self, chunk: int) -> int:
        """Index of the prompt in effect at ``chunk``."""
        return sum(1 for s in self.switch_chunks if s <= chunk)

    def segments(self, num_chunks: int) -> list[tuple[int, int, int]]:
        """``(prompt index, first chunk, end chunk)`` of every segment of a ``num_chunks``-chunk video."""
        bounds = [0, *self.switch_chunks, num_chunks]
        return [(i, bounds[i], bounds[i + 1]) for i in range(len(self.prompts))]


class _PolicyWeights:
    """The trained weights at the last old-policy sync (``old_policy_sync_every > 1``), saved in checkpoints.

    ``parameters`` returns the live trainable parameters by name: under FSDP they are ``DTensor`` shards, the copies
    are too (each process keeps its shard), checkpoints hold the full tensors (gathered by the trainer) and
    :meth:`load_state_dict` lays them out as the parameters again."""

    def __init__(self, parameters=None) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._parameters = parameters

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self._parameters() if self._parameters is not None else {}
        missing = sorted(set(params) - set(state))
        if missing:
            raise ValueError(f"The old-policy state lacks trainable weights: {missing[:3]}...")
        self.tensors = {k: fsdp.shard_like(v, params[k]).clone() if k in params else v.clone()
                        for k, v in state.items()}


class KVPOTrainer(CausalVideoTrainerBase):
    """Align a causal few-step video generator with rewards by KVPO: branches that differ only in their KV-cache
    routing, scored against an unrouted anchor, trained through a Gibbs policy over trajectory velocity energies.

    Args:
        model: the policy: a [`CausalVideoPipeline`] (or a path to one), or a [`CausalWanTransformer3DModel`]
            together with `pipeline=`.
        reward_funcs: one or more reward functions `fn(prompts, videos, **columns) -> list[float | None]`, applied to
            the whole video (global rewards, `reward_weights`) and to the routed stretch's frames (local rewards,
            `local_reward_weights`).
        args: a [`KVPOConfig`].
        train_dataset: a `datasets.Dataset` with a `prompt` column; one row = one prompt = one group of branches.
            A row may be a prompt schedule instead: `prompt` a list of prompts and a `switch_frames` column (the
            output frames at which the next prompt takes over, as the pipeline's `switch_frames`); its segments are
            scored against their own prompts.
        eval_dataset: prompts whose videos `evaluate()` scores with the same reward functions (one prompt a row).
        ref_model: the initial policy of the KL term when training all weights (default: a frozen copy of the start);
            with `peft_config` it is the model with its adapter disabled.
        peft_config: train a LoRA adapter (the documented default for RL).
    """

    _tag_names = ["diffusers-raven", "kvpo", "rl", "text-to-video", "autoregressive", "long-video"]
    _method_name = "KVPO (policy optimisation by KV-cache routing)"
    _citation = KVPO_CITATION
    config_class = KVPOConfig
    _card_curves = (("reward", "Reward during training"),)

    def __init__(self, model, reward_funcs=None, args: KVPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, ref_model=None, pipeline=None, peft_config=None, callbacks=None,
                 optimizers=(None, None)):
        args = args if args is not None else KVPOConfig(output_dir="kvpo-output")
        if isinstance(args, KVPOConfig):
            self.num_iterations = args.ppo_epochs
        if not reward_funcs:
            raise ValueError("`reward_funcs` is required: one or more functions `fn(prompts, videos, **columns)`.")
        super().__init__(model, args, train_dataset, eval_dataset, reward_funcs, pipeline, peft_config, callbacks,
                         optimizers)
        if args.local_reward_weights is not None and len(args.local_reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"`local_reward_weights` has {len(args.local_reward_weights)} entries for {len(self.reward_funcs)} "
                "reward functions."
            )
        if self.is_fsdp_enabled and args.fork_sampling != "batch":
            raise ValueError(
                f"FSDP needs `fork_sampling='batch'` (got {args.fork_sampling!r}): every sharded forward pass is a "
                "collective, so every process must roll its branches from the same fork (one per generation batch)."
            )
        self._check_geometry(args)
        self._check_schedules(train_dataset, eval_dataset)
        ones = [1.0] * len(self.reward_funcs)
        self.global_weights = torch.tensor(args.reward_weights or ones, dtype=torch.float64)
        self.local_weights = torch.tensor(args.local_reward_weights or ones, dtype=torch.float64)
        self._init_reference(ref_model, needed=args.beta > 0)
        self._old_policy = _PolicyWeights(self._trainable) if args.old_policy_sync_every > 1 else None

    # ------------------------------------------------------------------ set-up
    def routable_frame_count(self, fork_chunk: int, last_switch: int | None = None) -> int:
        """How many frames the branch plans can choose from at ``fork_chunk`` (what ``KVCache.routable_frames``
        returns there): the held frames that are neither sinks nor among the ``recent_frames`` most recent.

        ``last_switch``: the last chunk ``≤ fork_chunk`` at which a prompt schedule switched. The re-cache of a switch
        rebuilds only the frames the chunk sees (the sinks and the ``window_frames - sink_frames - chunk`` most recent
        frames of a windowed cache), so the pool starts again from those."""
        args, chunk = self.args, self.pipeline.chunk_frames
        written = fork_chunk * chunk
        held = written
        if args.window_frames is not None:
            sinks, pool = args.sink_frames, args.pool_frames
            if last_switch is None:
                held = max(0, min(written - sinks, pool - sinks))
            else:
                kept = max(0, min(args.window_frames - sinks - chunk, last_switch * chunk - sinks))
                held = max(0, min(kept + (fork_chunk - last_switch) * chunk, pool - sinks))
        return max(0, held - (args.recent_frames - chunk))

    def _check_geometry(self, args: KVPOConfig) -> None:
        """Bad settings that depend on the model and the video fail here, before any rollout."""
        chunk, chunks = self.pipeline.chunk_frames, len(self.chunk_sizes)
        if args.recent_frames < chunk:
            raise ValueError(
                f"`recent_frames` ({args.recent_frames}) counts the routed chunk's own frames: at least the chunk "
                f"size ({chunk})."
            )
        if args.routed_chunks >= chunks:
            raise ValueError(
                f"The routed stretch is longer than the video: `routed_chunks` ({args.routed_chunks}) after at least "
                f"one unrouted chunk needs {args.routed_chunks + 1} chunks; `num_frames`={args.num_frames} gives "
                f"{chunks}."
            )
        start = args.fork_start_chunk
        if start is None:  # the first fork with enough routable frames (or the last possible, which then fails below)
            needed = max(args.num_branches, args.selected_frames)
            start = next((s for s in range(1, chunks - args.routed_chunks + 1) if self.routable_frame_count(s) >= needed),
                         chunks - args.routed_chunks)
        self.fork_start_chunk = start
        if start + args.routed_chunks > chunks:
            raise ValueError(
                f"The routed stretch is longer than the video: `routed_chunks` ({args.routed_chunks}) from "
                f"`fork_start_chunk` ({start}) needs {start + args.routed_chunks} chunks; `num_frames`="
                f"{args.num_frames} gives {chunks}."
            )
        self.fork_end_chunk = chunks - args.routed_chunks if args.fork_end_chunk is None else args.fork_end_chunk
        if self.fork_end_chunk < start or self.fork_end_chunk + args.routed_chunks > chunks:
            raise ValueError(
                f"`fork_end_chunk` ({args.fork_end_chunk}) must lie in [{start}, {chunks - args.routed_chunks}]: from "
                f"the first fork to the last at which `routed_chunks` ({args.routed_chunks}) fits in {chunks} chunks."
            )
        if args.grad_steps > self.sampler.num_steps:
            raise ValueError(
                f"`grad_steps` ({args.grad_steps}) is beyond the {self.sampler.num_steps} steps of the sampler."
            )
        eligible = self.routable_frame_count(start)
        if eligible < args.selected_frames:
            raise ValueError(
                f"`selected_frames` ({args.selected_frames}) exceeds the {eligible} frames a branch can be routed to "
                f"at `fork_start_chunk` ({start}); fork later, keep a larger pool (`pool_frames`), use longer videos "
                "or select fewer frames."
            )
        if args.num_branches > eligible:
            raise ValueError(
                f"`num_branches` ({args.num_branches}) is more than the pool allows: at `fork_start_chunk` "
                f"({start}) the cache holds {eligible} routable frames, so some branches would share their plan; use "
                "fewer branches, a larger `pool_frames`, a later fork or longer videos."
            )

    def allowed_forks(self, schedule: PromptSchedule) -> list[int]:
        """The forks of ``[fork_start_chunk, fork_end_chunk]`` a row with ``schedule`` may draw: those whose routed
        stretch has no switch after its first chunk (a re-cache would drop the frames the branches are routed to) and
        whose pool, after the last switch, holds enough routable frames for ``num_branches`` distinct plans."""
        args = self.args
        needed = max(args.num_branches, args.selected_frames)
        forks = []
        for fork in range(self.fork_start_chunk, self.fork_end_chunk + 1):
            if any(fork < s < fork + args.routed_chunks for s in schedule.switch_chunks):
                continue
            last = max((s for s in schedule.switch_chunks if s <= fork), default=None)
            if self.routable_frame_count(fork, last) >= needed:
                forks.append(fork)
        return forks

    def prompt_schedule(self, prompt, switch_frames=None) -> PromptSchedule:
        """The :class:`PromptSchedule` of a dataset row (``prompt``: a string, or a list of prompts with
        ``switch_frames``, the output frames at which the next one takes over). Bad schedules raise a ``ValueError``
        naming the column."""
        if isinstance(prompt, str):
            if switch_frames:
                raise ValueError(
                    f"`switch_frames` ({list(switch_frames)}) needs a prompt schedule: `prompt` must then be a list of "
                    f"{len(switch_frames) + 1} prompts, one per segment; got the single prompt {prompt!r}."
                )
            return PromptSchedule((prompt,))
        if not isinstance(prompt, (list, tuple)) or not prompt or any(
            not isinstance(p, str) or not p.strip() for p in prompt
        ):
            raise ValueError(f"`prompt` must be a non-empty text or a list of non-empty texts, got {prompt!r}.")
        if switch_frames is None:
            raise ValueError(
                f"A row whose `prompt` is a list of {len(prompt)} prompts needs a `switch_frames` column: the "
                f"{len(prompt) - 1} output frames at which the next prompt takes over."
            )
        frames = list(switch_frames)
        if len(frames) != len(prompt) - 1:
            raise ValueError(
                f"`switch_frames` ({frames}) must hold one frame per switch: {len(prompt) - 1} for the {len(prompt)} "
                "prompts of `prompt`."
            )
        if any(isinstance(f, bool) or not isinstance(f, int) for f in frames) or frames != sorted(set(frames)):
            raise ValueError(f"`switch_frames` must be strictly increasing integers, got {frames}.")
        if frames and (frames[0] <= 0 or frames[-1] >= self.args.num_frames):
            raise ValueError(
                f"`switch_frames` ({frames}) must lie in [1, {self.args.num_frames - 1}]: output frames of the "
                f"{self.args.num_frames}-frame training video."
            )
        chunks = [self.pipeline._first_chunk_from(f) for f in frames]
        for i in range(1, len(chunks)):
            if chunks[i] == chunks[i - 1]:
                raise ValueError(
                    f"`switch_frames` {frames[i - 1]} and {frames[i]} take effect at the same chunk ({chunks[i]}): the "
                    "prompt between them would never be used."
                )
        if chunks and chunks[-1] >= len(self.chunk_sizes):
            raise ValueError(
                f"`switch_frames` {frames[-1]} falls inside the last chunk: a switch takes effect at the first chunk "
                "starting at or after its frame, and none does."
            )
        schedule = PromptSchedule(tuple(prompt), tuple(chunks))
        if not self.allowed_forks(schedule):
            raise ValueError(
                f"`switch_frames` ({frames}, chunks {chunks}) leave no fork in [{self.fork_start_chunk}, "
                f"{self.fork_end_chunk}]: every routed stretch of `routed_chunks` ({self.args.routed_chunks}) chunks "
                "either has a switch after its first chunk, or starts too soon after a switch for `num_branches` "
                f"({self.args.num_branches}) distinct plans (the re-cache keeps only the frames the window shows)."
            )
        return schedule

    def _check_schedules(self, train_dataset, eval_dataset) -> None:
        """Every row's schedule (bad ones fail here, before any rollout; the rows of a streaming dataset when they
        are drawn); `eval_dataset` has one prompt a row."""
        if not isinstance(train_dataset, torch.utils.data.IterableDataset):
            prompts = train_dataset["prompt"]
            if "switch_frames" in train_dataset.column_names:
                switches = train_dataset["switch_frames"]
            else:
                switches = [None] * len(prompts)
            for prompt, switch_frames in zip(prompts, switches):
                self._check_fsdp_schedule(self.prompt_schedule(prompt, switch_frames))
        if eval_dataset is not None and not isinstance(eval_dataset, dict):
            if any(not isinstance(p, str) for p in eval_dataset["prompt"]):
                raise ValueError(
                    "`eval_dataset` must have one prompt (a string) a row: `evaluate()` generates one video per "
                    "prompt; prompt schedules are for training."
                )

    def _check_fsdp_schedule(self, schedule: PromptSchedule) -> None:
        """Prompt schedules do not train under FSDP: their re-caches and replays run a number of forward passes that
        depends on the row, and under FSDP every pass is a collective all processes must join."""
        if self.is_fsdp_enabled and len(schedule.prompts) > 1:
            raise ValueError(
                f"Prompt schedules (a row with {len(schedule.prompts)} prompts) do not train under FSDP: the number "
                "of forward passes of their re-caches depends on the row, and every sharded pass is a collective. "
                "Train them with DDP or one process, or use one prompt a row."
            )

    def model_card_fields(self) -> dict:
        args = self.args
        return {
            "method": self._method_name,
            "base model": self.student.config.get("_name_or_path") or "unknown",
            "reward functions": ", ".join(reward_name(f) for f in self.reward_funcs),
            "global reward weights": self.global_weights.tolist(),
            "local reward weights": self.local_weights.tolist(),
            "branches per prompt": args.num_branches,
            "routed chunks": args.routed_chunks,
            "selected / recent frames": f"{args.selected_frames} / {args.recent_frames}",
            "window / sinks / pool": f"{args.window_frames} / {args.sink_frames} / {args.pool_frames}",
            "grad steps": args.grad_steps,
            "energy space": args.energy_space,
            "fusion": f"{args.fusion} (local {args.local_weight}, global {args.global_weight})",
            "gate": args.gate,
            "beta": args.beta,
        }

    # ------------------------------------------------------------------ rollouts
    def _draw_fork(self, schedule: PromptSchedule, key: str) -> int:
        """The fork of a row (``key``: generation batch and sample): its own draw, or with ``fork_sampling='batch'``
        the generation batch's draw, the same for every prompt and process."""
        generator = self.shared_generator("fork") if self.args.fork_sampling == "batch" else self._seeded(f"{key}/fork")
        if not schedule.switch_chunks:
            return int(torch.randint(self.fork_start_chunk, self.fork_end_chunk + 1, (1,), generator=generator))
        forks = self.allowed_forks(schedule)
        return forks[int(torch.randint(len(forks), (1,), generator=generator))]

    @torch.no_grad()
    def rollout_group(self, text: torch.Tensor, sample: int, schedule: PromptSchedule | None = None) -> dict[str, Any]:
        """The anchor and the branches of one prompt (``text`` ``[1, L, D]``, or one row per prompt of ``schedule``;
        ``sample`` its ``sample_index``).

        Returns ``record`` (a :class:`RolloutRecord` of ``G + 1`` rows: the branches, then the anchor), ``fork`` (the
        first routed chunk) and ``plans`` (``[G, n]`` the older frames of each branch)."""
        args = self.args
        schedule = schedule or PromptSchedule(("",))
        key = f"{self._generation}/{sample}"
        fork = self._draw_fork(schedule, key)
        channels, frames, h, w = self.latent_shape
        latents = torch.randn((1, channels, frames, h, w), generator=self._seeded(f"{key}/initial_noise"))
        latents = latents.to(self.accelerator.device, self.student.dtype)
        cache = self.new_kv_cache(1, args.pool_frames)
        stream = _ScheduledRollout(self, text, schedule, self._seeded(f"{key}/rollout"), cache, latents)
        anchor = []
        for c in range(len(self.chunk_sizes)):
            if c == fork:  # the fork, after its switch if any: the state every branch starts from
                stream.prepare()
                start = stream.state()
                pool = cache.routable_frames(args.recent_frames)
            anchor.append(stream.next_chunk())
        plans = branch_plans(pool, args.num_branches, args.selected_frames, self._seeded(f"{key}/plans"))
        branches = []
        for plan in plans.tolist():
            branch = _ScheduledRollout(self, text, schedule, None, cache, latents, start=start)
            cache.route(plan, recent_frames=args.recent_frames)
            routed = []
            for c in range(fork, len(self.chunk_sizes)):
                routed.append(branch.next_chunk())
                if c == fork + args.routed_chunks - 1:
                    cache.route(None)
            branches.append(RolloutRecord.from_chunks(anchor[:fork] + routed))
        branches.append(RolloutRecord.from_chunks(anchor))
        return {"record": _stack_records(branches), "fork": fork, "plans": plans}

    # ------------------------------------------------------------------ no-grad part: rollouts, rewards, advantages
    @torch.no_grad()
    def _generate(self, inputs: dict) -> dict:
        rows = len(inputs["prompt"])
        switch_frames = inputs.get("switch_frames", [None] * rows)
        schedules = [self.prompt_schedule(p, f) for p, f in zip(inputs["prompt"], switch_frames)]
        for schedule in schedules:
            self._check_fsdp_schedule(schedule)
        # `prompt` holds each row's first prompt from here on (its `prompt_embeds`); `kvpo` entries hold the rest
        inputs = super()._generate({**inputs, "prompt": [s.prompts[0] for s in schedules]})
        args = self.args
        text, index = inputs["prompt_embeds"], inputs["sample_index"]
        texts = [text[i : i + 1] if len(s.prompts) == 1 else self.encode_prompts(list(s.prompts))
                 for i, s in enumerate(schedules)]
        columns = {k: v for k, v in inputs.items() if k not in _INTERNAL_COLUMNS}
        size = args.num_branches + 1
        start = time.perf_counter()
        groups = [self.rollout_group(texts[i], int(index[i]), schedules[i]) for i in range(rows)]
        videos = [self.decode_videos(g["record"].clean) for g in groups]
        rollout_done = time.perf_counter()
        global_scores, local_scores = [], []
        for i, (group, video) in enumerate(zip(groups, videos)):
            row = {k: _repeat(v, i, size) for k, v in columns.items()}
            first, last = self._pixel_range(group["fork"])
            global_scores.append(self.score_segments(schedules[i], video, 0, video.shape[1], row))
            local_scores.append(self.score_segments(schedules[i], video, first, last, row))
        self.log_metric("timing/rollout", rollout_done - start)
        self.log_metric("timing/reward", time.perf_counter() - rollout_done)
        if all(bool(torch.isnan(s).all()) for s in global_scores + local_scores):
            raise ValueError(
                "Every reward function returned None for every video of the generation batch: no reward to learn from."
            )
        self._log_rewards(global_scores, local_scores, index)

        if self._old_policy is not None and self._generation % args.old_policy_sync_every == 0:
            self._old_policy.tensors = {n: p.detach().clone() for n, p in self._trainable().items()}
        records, win, skipped, scales, forks = [], [], [], [], []
        for i, group in enumerate(groups):
            fork, full = group["fork"], group["record"]
            stop = (fork + args.routed_chunks) * self.pipeline.chunk_frames
            record = _truncate(full, stop, fork + args.routed_chunks)  # the replay needs no later frame
            noisy, pred = self._routed(record.noisy, fork), self._routed(record.pred_original, fork)
            entry = {"record": record, "fork": fork, "plans": group["plans"],
                     "recorded_velocity": recorded_velocity(noisy, pred, record.sigmas[: record.num_steps]),
                     "texts": texts[i], "switch_chunks": schedules[i].switch_chunks,
                     "global_scores": global_scores[i], "local_scores": local_scores[i]}
            local = self._scope_advantages(local_scores[i], self.local_weights)
            global_ = self._scope_advantages(global_scores[i], self.global_weights)
            entry["advantages"] = fuse_advantages(local, global_, args.fusion, args.local_weight, args.global_weight,
                                                  args.adv_clip)
            improvement = fuse_advantages(local, global_, "none", args.local_weight, args.global_weight, None)
            text_i = text[i : i + 1]
            energy = anchor_energy = None
            if args.gate == "scale" or (args.ppo_epochs > 1 and self._old_policy is None):
                energies = self._energy(self.student, text_i, entry, rows=slice(None))  # the rollout policy
                energy, anchor_energy = energies[:-1], energies[-1]
            if self._old_policy is not None:
                with self._old_weights():
                    entry["old_log_policy"] = gibbs_log_policy(self._energy(self.student, text_i, entry))
            elif args.ppo_epochs > 1:
                entry["old_log_policy"] = gibbs_log_policy(energy)
            if args.beta > 0:  # a frozen copy is not prepared: the run's mixed precision through autocast
                with self.reference_model() as reference, self.accelerator.autocast():
                    entry["ref_log_policy"] = gibbs_log_policy(self._energy(reference, text_i, entry))
            gate = safety_gate(improvement, args.gate, energy, anchor_energy)
            entry["gate_scale"] = gate.scale
            if args.gate == "scale":
                self.log_metric("kvpo/anchor_probability", gate.anchor_probability)
                self.log_metric("kvpo/energy_anchor", anchor_energy)
            win.append(float((improvement > 0).double().mean()))
            skipped.append(float(gate.skip))
            scales.append(gate.scale)
            forks.append(fork)
            records.append(entry)
        self.log_metric("kvpo/anchor_win_rate", sum(win) / len(win))
        self.log_metric("kvpo/skipped_updates", sum(skipped) / len(skipped))
        self.log_metric("kvpo/gate_scale", sum(scales) / len(scales))
        self.log_metric("kvpo/fork_chunk", sum(forks) / len(forks))
        self.log_metric("kvpo/advantage_abs", torch.cat([e["advantages"].abs() for e in records]).mean())
        inputs["kvpo"] = records
        return inputs

    def _pixel_range(self, fork: int) -> tuple[int, int]:
        """The decoded frames ``[first, last)`` of the routed stretch."""
        return self._chunk_pixels(fork, fork + self.args.routed_chunks)

    def _chunk_pixels(self, first_chunk: int, end_chunk: int) -> tuple[int, int]:
        """The decoded frames ``[first, last)`` of chunks ``first_chunk .. end_chunk - 1`` (the causal VAE decodes
        latent frame 0 to one frame and every later latent frame to ``vae_scale_factor_temporal`` frames)."""
        t, chunk = self.pipeline.vae_scale_factor_temporal, self.pipeline.chunk_frames
        start, stop = first_chunk * chunk, end_chunk * chunk
        return (0 if start == 0 else t * (start - 1) + 1), t * (stop - 1) + 1

    def score_segments(self, schedule: PromptSchedule, videos: torch.Tensor, first: int, last: int,
                       columns: dict[str, Any]) -> torch.Tensor:
        """``[B, n_funcs]`` scores of the frames ``[first, last)`` of ``videos``: each segment of the schedule that
        overlaps them is scored on the overlap against its own prompt, and the scores are averaged weighted by the
        overlap's frames (a function's missing scores, None, left out of its mean; none left gives NaN). One prompt:
        the frames scored against it."""
        size = videos.shape[0]
        if len(schedule.prompts) == 1:
            return score_videos(self.reward_funcs, [schedule.prompts[0]] * size, videos[:, first:last], columns)
        total = torch.zeros(size, len(self.reward_funcs), dtype=torch.float64)
        weight = torch.zeros_like(total)
        for index, start, end in schedule.segments(len(self.chunk_sizes)):
            a, b = self._chunk_pixels(start, end)
            a, b = max(a, first), min(b, last)
            if a >= b:
                continue
            scores = score_videos(self.reward_funcs, [schedule.prompts[index]] * size, videos[:, a:b], columns)
            scored = ~torch.isnan(scores)
            total += torch.where(scored, scores, 0.0) * (b - a)
            weight += scored * float(b - a)
        return torch.where(weight > 0, total / weight, torch.full_like(total, math.nan))

    @staticmethod
    def _scope_advantages(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Anchor-relative advantages ``[G]`` of one scope (``scores`` ``[G + 1, n_funcs]``, the anchor last): the
        functions with a zero weight or a missing score (None) in this group are left out; none left gives 0."""
        keep = (weights != 0) & ~torch.isnan(scores).any(dim=0)
        if not bool(keep.any()):
            return torch.zeros(scores.shape[0] - 1, dtype=torch.float64)
        return anchor_advantages(scores[:-1, keep], scores[-1, keep], weights[keep])

    def _log_rewards(self, global_scores: list[torch.Tensor], local_scores: list[torch.Tensor],
                     index: torch.Tensor) -> None:
        """TRL's reward metrics over the branches' global scores of every process (gathered, so every process logs
        the same names), plus the anchor's and the local rewards (weighted sums, None skipped)."""
        device = self.accelerator.device
        branches = torch.cat([s[:-1] for s in global_scores])
        groups = torch.cat([torch.full((len(s) - 1,), int(i)) for s, i in zip(global_scores, index)])
        all_scores = self.accelerator.gather(branches.to(device)).cpu()
        all_groups = self.accelerator.gather(groups.to(device)).cpu()
        self.log_reward_metrics(all_scores, self.global_weights, all_groups)
        anchor = torch.stack([s[-1] for s in global_scores])
        self.log_metric("kvpo/anchor_reward", (anchor * self.global_weights).nansum(dim=1).mean())
        local = torch.cat([s[:-1] for s in local_scores])
        self.log_metric("kvpo/local_reward", (local * self.local_weights).nansum(dim=1).mean())

    # ------------------------------------------------------------------ the energy
    def _routed(self, per_step: torch.Tensor, fork: int) -> torch.Tensor:
        """``[K, B, C, F, h, w]`` recorded states → ``[B, P, K, C, f, h, w]`` of the routed chunks."""
        chunk, routed = self.pipeline.chunk_frames, self.args.routed_chunks
        stretch = per_step[:, :, :, fork * chunk : (fork + routed) * chunk]
        return stretch.unflatten(3, (routed, chunk)).permute(1, 3, 0, 2, 4, 5, 6)

    def replay_velocity(self, model, text: torch.Tensor, entry: dict, rows=slice(None, -1),
                        grad: bool = False) -> torch.Tensor:
        """``v_θ`` ``[B, P, K, C, f, h, w]`` of the routed chunks of ``rows`` (default: the branches), replayed under
        the unrouted context inference uses: one interleaved pass per step (METHOD §4: noisy = the recorded
        ``x_{σ_k}`` of every chunk, history = the row's own context chunks, the training window and sinks). With
        ``grad``, the first ``grad_steps`` steps run in one pass with gradients, the others without.

        A prompt schedule that switched at or before the fork is replayed through the cache instead
        (:meth:`replay_through_cache`): the interleaved pass has one prompt per sequence and cannot rebuild the
        re-cached frames; a schedule whose first switch comes after the routed stretch replays as one prompt."""
        if any(s <= entry["fork"] for s in entry.get("switch_chunks", ())):
            return self.replay_through_cache(model, entry, rows, grad)
        record, args = entry["record"][rows], self.args
        batch, steps = record.batch_size, record.num_steps
        cut = min(args.grad_steps, steps) if grad else 0
        velocities = []
        for ks, enabled in ((range(cut), True), (range(cut, steps), False)):
            if not len(ks):
                continue
            expanded = _repeat_record(record, len(ks))
            step_index = torch.tensor(list(ks)).repeat_interleave(batch)
            packed = pack_interleaved(expanded, step_index, args.context_noise, self.num_train_timesteps)
            with torch.set_grad_enabled(enabled):
                out = model(encoder_hidden_states=text.expand(len(step_index), -1, -1),
                            window_frames=args.window_frames, sink_frames=args.sink_frames, **packed).sample
            velocities.append(out.unflatten(0, (len(ks), batch)))
        return self._routed(torch.cat(velocities), entry["fork"])  # from [K, B, C, F, h, w], as recorded

    def replay_through_cache(self, model, entry: dict, rows=slice(None, -1), grad: bool = False) -> torch.Tensor:
        """``v_θ`` ``[B, P, K, C, f, h, w]`` of the routed chunks of ``rows`` under a prompt schedule's deployment
        context: the chunk loop of inference re-run on the rows' own recorded context latents (each chunk's context
        pass under the prompt in effect, the LongLive re-cache of the visible frames at every switch, the training
        window and sinks), and the recorded ``x_{σ_k}`` of every step of the routed chunks through that cache. The
        cache holds detached keys and values, as in inference, so with ``grad`` the gradient flows through the routed
        chunks' own passes of the first ``grad_steps`` steps."""
        record, args = entry["record"][rows], self.args
        chunk, fork = self.pipeline.chunk_frames, entry["fork"]
        batch, steps = record.batch_size, record.num_steps
        texts = entry["texts"].to(self.accelerator.device)
        switches = list(entry["switch_chunks"])
        cache = self.new_kv_cache(batch)
        denoiser = CacheDenoiser(model, cache, texts[:1].expand(batch, -1, -1))
        contexts: dict[int, torch.Tensor] = {}
        velocities = []
        for c in range(fork + args.routed_chunks):
            if c in switches:
                index = switches.index(c) + 1
                denoiser.prompt_embeds = texts[index : index + 1].expand(batch, -1, -1)
                cache.reset_text()
                self.sampler.recache(denoiser, contexts, chunk)
            lo, hi = c * chunk, (c + 1) * chunk
            if c >= fork:
                per_step = []
                for k in range(steps):
                    with torch.set_grad_enabled(grad and k < args.grad_steps):
                        t = self.sampler.timestep(float(record.sigmas[k]))
                        per_step.append(denoiser(record.noisy[k, :, :, lo:hi], t, lo))
                velocities.append(torch.stack(per_step, dim=1))
            if c < fork + args.routed_chunks - 1:
                context = record.context[:, :, lo:hi]
                self.sampler.write_context(denoiser, context, lo)
                _keep_contexts(contexts, context, lo, chunk, cache)
        return torch.stack(velocities, dim=1)

    def _energy(self, model, text: torch.Tensor, entry: dict, rows=slice(None, -1), grad: bool = False):
        """The trajectory velocity energy ``[B]`` of ``rows`` (default: the branches; ``slice(None)``: the branches
        and the anchor), METHOD §7."""
        args = self.args
        pred = self.replay_velocity(model, text, entry, rows, grad)
        recorded = entry["recorded_velocity"][rows].to(pred.device)
        sigmas = entry["record"].sigmas[: entry["record"].num_steps]
        return trajectory_velocity_energy(pred, recorded, sigmas, args.grad_steps, args.energy_space,
                                          args.sigma_floor)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters by name; under FSDP their ``DTensor`` shards. FSDP2 keeps the root module's
        parameters gathered after a forward pass (they are then plain full tensors, and writes to them are lost at the
        next reshard), so the modules are resharded first."""
        if self.is_fsdp_enabled:
            fsdp.reshard(self.student)
        return {n: p for n, p in self.student.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def _old_weights(self):
        """The student with the old policy's weights (``old_policy_sync_every > 1``) inside the block."""
        params = self._trainable()
        current = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self._old_policy.tensors[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(current[n])

    def extra_state(self) -> dict[str, Any]:
        return {"old_policy": self._old_policy} if self._old_policy is not None else {}

    @torch.no_grad()
    def write_samples(self, path: str) -> str:
        """As the base's; without ``sample_prompts``, when the first training row is a prompt schedule, the sample
        follows that schedule (the pipeline's prompt switches at the row's ``switch_frames``) and each segment is
        scored against its own prompt (:meth:`score_segments`)."""
        if self.args.sample_prompts:
            return super().write_samples(path)
        dataset = self.train_dataset
        row = next(iter(dataset)) if isinstance(dataset, torch.utils.data.IterableDataset) else dataset[0]
        schedule = self.prompt_schedule(row["prompt"], row.get("switch_frames"))
        if len(schedule.prompts) == 1:
            return super().write_samples(path)
        import json
        import os

        from ..utils.video import save_video

        video = self.pipeline(
            prompt_embeds=[self.encode_prompts([p]) for p in schedule.prompts], switch_frames=list(row["switch_frames"]),
            num_frames=self.args.num_frames, height=self.height, width=self.width, sigmas=self.args.denoising_sigmas,
            generator=[torch.Generator().manual_seed(int(self.args.seed))], window_frames=self.args.window_frames,
            sink_frames=self.args.sink_frames, context_noise=self.args.context_noise, output_type="pt",
        ).frames
        if not self.is_world_process_zero():
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_video(video[0].permute(0, 2, 3, 1).float().cpu().numpy(), path)
        if self.reward_funcs:
            scores = self.score_segments(schedule, video, 0, video.shape[1], {})[0].tolist()
            with open(os.path.splitext(path)[0] + ".json", "w") as f:
                json.dump({"prompt": list(schedule.prompts), "switch_frames": list(row["switch_frames"]),
                           "step": self.state.global_step,
                           "rewards": {reward_name(fn): None if math.isnan(v) else v
                                       for fn, v in zip(self.reward_funcs, scores)}}, f, indent=2)
        return path

    # ------------------------------------------------------------------ the policy's loss
    def _entry_loss(self, energy: torch.Tensor, entry: dict) -> tuple[torch.Tensor, dict]:
        args = self.args
        loss, stat = kvpo_loss(energy, entry["advantages"].to(energy.device), entry.get("old_log_policy"),
                               entry.get("ref_log_policy"), args.beta, args.epsilon_low, args.epsilon_high,
                               args.max_log_ratio)
        return loss * entry["gate_scale"], stat

    def _loss_scale(self, num_items_in_batch) -> float:
        """The factor ``Trainer.training_step`` applies to the returned loss before its backward pass (gradient
        accumulation), for the backward passes :meth:`compute_loss` runs itself."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        return 1.0 if scaled else 1.0 / self.current_gradient_accumulation_steps

    def _backward_per_branches(self, model, text: torch.Tensor, entries: list[dict], num_items_in_batch):
        """``branches_per_backward``: the gradient of the micro-batch's loss through one backward pass per slice of
        ``branches_per_backward`` branches. The loss depends on the weights only through the energies, so with
        ``w_g = ∂L/∂E_g`` (from energies computed without gradients) ``∇L = Σ_g w_g ∇E_g``: each slice's energies are
        replayed with gradients and ``Σ w_g E_g`` is backpropagated, then freed. Every process runs as many passes
        (none is skipped, even with zero weights: under FSDP each is a collective)."""
        per = self.args.branches_per_backward
        scale = self._loss_scale(num_items_in_batch) / len(entries)
        losses, stats, energies = [], [], []
        for i, entry in enumerate(entries):
            with torch.no_grad():
                energy = self._energy(model, text[i : i + 1], entry)
            leaf = energy.detach().requires_grad_()
            with torch.enable_grad():
                loss, stat = self._entry_loss(leaf, entry)
                (weights,) = torch.autograd.grad(loss.float() * scale, leaf)
            for start in range(0, len(energy), per):
                rows = slice(start, min(start + per, len(energy)))
                part = self._energy(model, text[i : i + 1], entry, rows=rows, grad=True)
                self.accelerator.backward((weights[rows].to(part.dtype) * part).sum())
            losses.append(loss.detach())
            stats.append({k: v.detach() for k, v in stat.items()})
            energies.append(energy)
        # Trainer runs its backward on the returned loss: a leaf, so that pass reaches no weight
        return torch.stack(losses).mean().float().requires_grad_(), stats, energies

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's KVPO loss (the mean over its prompts). With ``branches_per_backward``, while training, the
        gradient is already accumulated here, by a backward pass per slice of branches
        (:meth:`_backward_per_branches`), and the returned loss is a leaf."""
        text = inputs["prompt_embeds"]
        if self.args.branches_per_backward is not None and model.training and torch.is_grad_enabled():
            loss, stats, energies = self._backward_per_branches(model, text, inputs["kvpo"], num_items_in_batch)
        else:
            losses, stats, energies = [], [], []
            for i, entry in enumerate(inputs["kvpo"]):
                energy = self._energy(model, text[i : i + 1], entry, grad=True)
                loss, stat = self._entry_loss(energy, entry)
                losses.append(loss)
                stats.append(stat)
                energies.append(energy.detach())
            loss = torch.stack(losses).mean().float()
        for name in stats[0]:
            value = torch.stack([s[name] for s in stats]).mean()
            self.log_metric("kl" if name == "kvpo/kl" else name, value)
        energy = torch.stack(energies)
        self.log_metric("kvpo/energy_mean", energy.mean())
        self.log_metric("kvpo/energy_std", energy.std(dim=1).mean())
        self.log_metric("kvpo/energy_min", energy.min(dim=1).values.mean())
        self.log_metric("kvpo/energy_max", energy.max(dim=1).values.mean())
        self.log_metric("kvpo/loss", loss.detach())
        return (loss, energy) if return_outputs else loss


def _keep_contexts(contexts: dict[int, torch.Tensor], context: torch.Tensor, frame_start: int, chunk_frames: int,
                   cache) -> None:
    """Keep a chunk's context latents frame by frame and forget the frames the next chunk no longer sees: what a
    prompt switch re-caches (the pipeline's bookkeeping)."""
    for i in range(context.shape[2]):
        contexts[frame_start + i] = context[:, :, i : i + 1]
    if cache.window_frames is not None:
        end = frame_start + context.shape[2]
        visible = set(visible_history(end, chunk_frames, cache.window_frames, cache.sink_frames))
        for frame in [f for f in contexts if f not in visible]:
            del contexts[frame]


class _ScheduledRollout:
    """One rollout's chunk loop under a prompt schedule, as the pipeline runs it: before a chunk at which the
    schedule switches, the prompt changes, the text cache is dropped and the self-attention cache is rebuilt from the
    context latents of the frames that chunk sees (LongLive re-cache, METHOD §2), spending no random draw.

    ``start`` (a :meth:`state` of another rollout) continues from that state: its cache snapshot, sampler-noise
    state, kept contexts and prompt, at its chunk (a branch at the fork)."""

    def __init__(self, trainer: KVPOTrainer, texts: torch.Tensor, schedule: PromptSchedule,
                 generator: torch.Generator | None, cache, latents: torch.Tensor, start: dict | None = None) -> None:
        self.trainer, self.texts, self.schedule, self.cache = trainer, texts, schedule, cache
        self.chunk_frames = trainer.pipeline.chunk_frames
        if start is None:
            self.chunk, self.prepared, self.contexts = 0, 0, {}
        else:
            cache.restore(start["cache"])
            generator = torch.Generator().set_state(start["generator"])
            self.chunk = self.prepared = start["chunk"]
            self.contexts = dict(start["contexts"])
        self.generator = generator
        index = schedule.prompt_index(self.chunk)
        self.denoiser = CacheDenoiser(trainer.student, cache, texts[index : index + 1])
        channels, frames, h, w = trainer.latent_shape
        self.sampled = trainer.sampler.chunks(
            self.denoiser, (1, channels, h, w), self.chunk_frames, frames, generator=generator, latents=latents,
            record=True, first_frame=self.chunk * self.chunk_frames, device=texts.device, dtype=trainer.student.dtype,
        )

    def prepare(self) -> None:
        """Apply the switch due before the next chunk (once)."""
        due = self.prepared != self.chunk and self.chunk in self.schedule.switch_chunks
        self.prepared = self.chunk
        if not due:
            return
        index = self.schedule.prompt_index(self.chunk)
        self.denoiser.prompt_embeds = self.texts[index : index + 1]
        self.cache.reset_text()
        self.trainer.sampler.recache(self.denoiser, self.contexts, self.chunk_frames)

    def state(self) -> dict:
        """What a rollout continuing from here needs (the cache is snapshotted, copy on write)."""
        return {"cache": self.cache.snapshot(), "generator": self.generator.get_state(), "chunk": self.chunk,
                "contexts": dict(self.contexts)}

    def next_chunk(self) -> ChunkTrajectory:
        self.prepare()
        trajectory = next(self.sampled)
        if trajectory.context is not None and any(s > self.chunk for s in self.schedule.switch_chunks):
            _keep_contexts(self.contexts, trajectory.context, trajectory.frame_start, self.chunk_frames, self.cache)
        self.chunk += 1
        return trajectory


def _stack_records(records: list[RolloutRecord]) -> RolloutRecord:
    """One record whose batch rows are the given one-row records."""
    return RolloutRecord(
        sigmas=records[0].sigmas,
        noisy=torch.cat([r.noisy for r in records], dim=1),
        pred_original=torch.cat([r.pred_original for r in records], dim=1),
        clean=torch.cat([r.clean for r in records]),
        chunk_sizes=list(records[0].chunk_sizes),
        context=torch.cat([r.context for r in records]),
    )


def _truncate(record: RolloutRecord, frames: int, chunks: int) -> RolloutRecord:
    """The record of the first ``frames`` latent frames (``chunks`` chunks)."""
    return RolloutRecord(
        sigmas=record.sigmas, noisy=record.noisy[:, :, :, :frames], pred_original=record.pred_original[:, :, :, :frames],
        clean=record.clean[:, :, :frames], chunk_sizes=list(record.chunk_sizes[:chunks]),
        context=record.context[:, :, :frames],
    )


def _repeat_record(record: RolloutRecord, times: int) -> RolloutRecord:
    """The record repeated ``times`` along the batch (row ``j·B + b`` is row ``b``)."""
    return RolloutRecord(
        sigmas=record.sigmas, noisy=record.noisy.repeat(1, times, 1, 1, 1, 1),
        pred_original=record.pred_original.repeat(1, times, 1, 1, 1, 1), clean=record.clean.repeat(times, 1, 1, 1, 1),
        chunk_sizes=list(record.chunk_sizes), context=record.context.repeat(times, 1, 1, 1, 1),
    )


def _repeat(column, row: int, times: int):
    """Row ``row`` of a dataset column, repeated for the anchor and every branch."""
    if isinstance(column, torch.Tensor):
        return column[row : row + 1].expand(times, *column.shape[1:])
    return [column[row]] * times
